"""Local runs: each step may import only the distributions its launcher installs on Vertex AI.

On Vertex a step starts from python:3.11-slim and installs its locked set with --no-deps
(pipelines/packaging.py), while a local run executes in the dev venv, which holds everything. To keep
the local run honest, a `sitecustomize` on the steps' PYTHONPATH marks every module of every other
installed distribution as absent (`sys.modules[name] = None`, which `import` reports as
ModuleNotFoundError and `importlib.util.find_spec` as None, as for a package that is not installed).
A step that needs a package its set lacks then fails here, not on its first run in the cloud.
"""

from __future__ import annotations

import os
import site
import sys
import tempfile
from pathlib import Path

ENV_FLAG = "VLP_IMPORT_GUARD"
# Always there: the launcher's own tools and this project's code (embedded in the spec on Vertex).
_ALWAYS = {"kfp", "vertex-llm-pipelines", "pip", "setuptools", "wheel"}
_SITECUSTOMIZE = """\
# Written by pipelines/local/import_guard.py for local pipeline runs.
import os
if os.environ.get("VLP_IMPORT_GUARD"):
    from vlp.pipelines.local.import_guard import install

    install()
"""


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _dist_files(site_dir: Path) -> dict[str, list[str]]:
    """distribution -> its importable files (.py/.so), read from the RECORD files (fast: no metadata parsing)."""
    files: dict[str, list[str]] = {}
    for record in site_dir.glob("*.dist-info/RECORD"):
        name = _canonical(record.parent.name.removesuffix(".dist-info").rsplit("-", 1)[0])
        for line in record.read_text(errors="replace").splitlines():
            path = line.split(",", 1)[0]
            if path.endswith((".py", ".so")) and not path.startswith(("..", "/")) and ".dist-info/" not in path:
                files.setdefault(name, []).append(path)
    return files


def _roots(paths: list[str]) -> set[str]:
    """The top modules of a distribution: its outermost regular packages and plain modules, below any
    namespace package (google/, google/cloud/) that other distributions share."""
    present = set(paths)
    roots = set()
    for path in paths:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) + "/__init__.py" in present:
                roots.add(".".join(parts[:depth]))
                break
        else:
            module = parts[-1].split(".", 1)[0]
            if module != "__init__":
                roots.add(".".join([*parts[:-1], module]))
    return roots


def blocked_modules(allowed: set[str]) -> set[str]:
    """Top modules of the installed distributions outside `allowed` (canonical names)."""
    allowed = {_canonical(a) for a in allowed} | _ALWAYS
    owned: dict[str, set[str]] = {}
    for site_dir in map(Path, site.getsitepackages()):
        for dist, paths in _dist_files(site_dir).items():
            owned.setdefault(dist, set()).update(_roots(paths))
    keep = set().union(*(roots for dist, roots in owned.items() if dist in allowed))
    blocked = set().union(*(roots for dist, roots in owned.items() if dist not in allowed)) - keep
    # Never hide a namespace an allowed distribution lives under.
    return {b for b in blocked if not any(k.startswith(b + ".") for k in keep)}


def allowed_by_op() -> dict[str, list[str]]:
    """Each step's KFP function -> the distributions its launcher installs (from the lock)."""
    from vlp.pipelines.packaging import STEP_OF_OP, read_lock

    lock = read_lock()
    return {op: sorted(n for n, (_, steps) in lock.items() if step in steps) for op, step in STEP_OF_OP.items()}


def install(argv: list[str] | None = None) -> str | None:
    """In a step's process: hide every distribution its package set lacks. Returns the step's function name,
    or None for a process that is not a pipeline step. The sets come from the JSON file ENV_FLAG names (the
    runner writes it), so this imports nothing of `components` before kfp puts the embedded copy on sys.path."""
    import json

    argv = list(sys.argv if argv is None else argv)
    if "--function_to_execute" not in argv or argv.index("--function_to_execute") + 1 >= len(argv):
        return None
    op = argv[argv.index("--function_to_execute") + 1]
    sets = json.loads(Path(os.environ[ENV_FLAG]).read_text())
    allowed = sets["packages"].get(op)
    if allowed is None:
        raise RuntimeError(f"import guard: no package set for step function {op}; add it to packaging.STEP_OF_OP")
    from vlp.pipelines.local import step_records

    step_records.install(sets["steps"][op], argv)  # the step's own record for the run summary
    for module in blocked_modules(set(allowed)):
        if module not in sys.modules:
            sys.modules[module] = None  # type: ignore[assignment]
    return op


def guard_env(state_dir: Path) -> dict[str, str]:
    """The environment that turns the guard on for the steps of a local run."""
    import json

    from vlp.pipelines.packaging import STEP_OF_OP

    sets = state_dir / "step-packages.json"
    sets.parent.mkdir(parents=True, exist_ok=True)
    sets.write_text(json.dumps({"packages": allowed_by_op(), "steps": STEP_OF_OP}, indent=1))
    path = [str(sitecustomize_dir()), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {ENV_FLAG: str(sets), "PYTHONPATH": os.pathsep.join(path)}


def sitecustomize_dir() -> Path:
    """A directory holding the guard's sitecustomize.py, for the steps' PYTHONPATH."""
    directory = Path(tempfile.gettempdir()) / "vlp-import-guard"
    directory.mkdir(exist_ok=True)
    target = directory / "sitecustomize.py"
    if not target.is_file() or target.read_text() != _SITECUSTOMIZE:
        staged = directory / f".sitecustomize.{os.getpid()}"
        staged.write_text(_SITECUSTOMIZE)
        staged.replace(target)
    return directory
