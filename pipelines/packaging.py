"""How a step's plain Python function becomes a KFP component that runs on Vertex without an image build."""

from __future__ import annotations

import functools
import hashlib
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

BASE_IMAGE = "python:3.11-slim"  # public, has pip; the project's code travels embedded in the spec

# The distributions each step imports at run time, by task name, with why. A step installs these and what
# they need in turn (the lock below), nothing else: the mirror has no use for the Vertex SDK, and only the
# smoke test reads tokenizer files. kfp itself is installed by KFP's own launcher command (--no-deps).
STEP_NEEDS: dict[str, tuple[str, ...]] = {
    "preflight": (
        "google-cloud-aiplatform",  # endpoint lookup for no-op detection, serving GPU usage (v1beta1)
        "google-cloud-run",  # target cloud_run: the service for no-op detection, the region's Cloud Run usage
        "google-cloud-quotas",  # serving GPU quota per region (Cloud Quotas API v1)
        "google-crc32c",  # the Hub token's payload checksum (Secret Manager REST, components/clients.py)
        "huggingface_hub",  # model facts: config and safetensors headers from the Hub
        "requests",  # the no-op probe's call to the serving endpoint
        "pydantic",  # the deployment config model
        "PyYAML",  # config parsing shared with the CLI
    ),
    "mirror-weights": (
        "google-cloud-storage",  # JSON API + resumable uploads: the path fake-gcs-server also serves
        "google-crc32c",  # C-accelerated crc32c: verifying 400 GB in pure Python would take hours
        "huggingface_hub",  # Hub metadata, LFS sha256, resolve URLs; honours HF_ENDPOINT
        "requests",  # streamed range requests to the Hub
        "pydantic",
        "PyYAML",
    ),
    "register-model": (
        "google-cloud-aiplatform",  # Model Registry upload (GAPIC v1)
        "google-cloud-pipeline-components",  # the google.VertexModel artifact type in the step's signature
        "pydantic",
        "PyYAML",
    ),
    "deploy-model": (
        "google-cloud-aiplatform",  # endpoints, deployModel (v1, v1beta1 for multi-host)
        "google-cloud-pipeline-components",  # google.VertexModel / google.VertexEndpoint artifact types
        "google-cloud-logging",  # the model server's log lines for a failed deploy
        "pydantic",
        "PyYAML",
    ),
    "smoke-test": (
        "google-cloud-aiplatform",  # endpoint description, :predict / invoke on the real prediction path
        "google-cloud-pipeline-components",  # the google.VertexEndpoint artifact type
        "google-cloud-storage",  # tokenizer files next to the weights
        "google-cloud-logging",  # the model server's log lines for a failed smoke test
        "Jinja2",  # the chat template, rendered as transformers renders it (components/smoke/chat_template.py)
        "requests",  # the prediction calls, through google-auth's AuthorizedSession
        "pydantic",
        "PyYAML",
    ),
    "benchmark": (  # a run that changed nothing, with smoke_test.benchmark: the deployment as it serves
        "google-cloud-aiplatform",  # the endpoint and its traffic
        "google-cloud-pipeline-components",  # vlp.components.vertex.smoke_test's artifact types, imported with it
        "google-cloud-run",  # target cloud_run: the service's URL
        "google-cloud-storage",  # imported with vlp.components.vertex.smoke_test (its tokenizer download)
        "google-cloud-logging",  # imported with vlp.components.vertex.smoke_test (server logs)
        "Jinja2",  # imported with vlp.components.vertex.smoke_test (the chat template)
        "requests",  # the streamed requests
        "pydantic",
        "PyYAML",
    ),
    "promote": ("google-cloud-aiplatform", "pydantic", "PyYAML"),  # traffic split, undeploy the old model
    "roll-back": ("google-cloud-aiplatform", "pydantic", "PyYAML"),  # undeploy / delete what the run created
    "cleanup": (
        "google-cloud-aiplatform",
        "google-cloud-run",  # a Cloud Run run's services and revisions (target cloud_run)
        "pydantic",
        "PyYAML",
    ),
    "deploy-service": (
        "google-cloud-run",  # Cloud Run Admin API v2: services, revisions, IAM policy, operations
        "google-cloud-logging",  # the revision's log lines for a failed deploy
        "requests",  # the step's own account, from the metadata server (roles/run.invoker for it)
        "pydantic",
        "PyYAML",
    ),
    "smoke-test-service": (
        "google-cloud-storage",  # tokenizer files next to the weights
        "google-cloud-logging",  # the revision's log lines for a failed smoke test
        "Jinja2",  # the chat template (components/smoke/chat_template.py)
        "requests",  # the calls to the tag URL, and google-auth's ID token fetch
        "pydantic",
        "PyYAML",
    ),
    "promote-service": ("google-cloud-run", "pydantic", "PyYAML"),  # the service's traffic
    "roll-back-service": ("google-cloud-run", "pydantic", "PyYAML"),  # traffic back, the revision deleted
}

# Declared dependencies no step imports. Steps install with --no-deps from the lock, so leaving these out
# is what keeps a step small; the local runs check it (pipelines/local/import_guard.py refuses any import
# outside a step's set) and benchmarks/step_startup.py imports each step's modules in a fresh venv.
NOT_AT_RUN_TIME: dict[str, str] = {
    "google-cloud-bigquery": "aiplatform's high-level SDK (datasets, feature store); the steps use the GAPIC clients",
    "google-cloud-resource-manager": "aiplatform's high-level SDK only",
    "google-genai": "aiplatform's generative-AI SDK (vertexai.*), never imported by the GAPIC clients",
    "docstring_parser": "aiplatform's high-level SDK and kfp's compiler",
    "shapely": "aiplatform's high-level SDK (vector search)",
    "kfp": "installed by KFP's launcher command itself, --no-deps",
    "hf-xet": "huggingface_hub's Xet transfer backend; the mirror streams files over HTTP range requests itself",
    "fsspec": "huggingface_hub's HfFileSystem only",
    "click": "huggingface_hub's CLI only",
    "typer": "huggingface_hub's CLI only",
}

# The KFP function behind each step, so a component finds its package set by the function it wraps.
STEP_OF_OP = {
    "preflight_op": "preflight",
    "mirror_weights_op": "mirror-weights",
    "register_model_op": "register-model",
    "deploy_model_op": "deploy-model",
    "smoke_test_op": "smoke-test",
    "benchmark_op": "benchmark",
    "promote_op": "promote",
    "roll_back_op": "roll-back",
    "cleanup_op": "cleanup",
    "deploy_service_op": "deploy-service",
    "smoke_test_service_op": "smoke-test-service",
    "promote_service_op": "promote-service",
    "roll_back_service_op": "roll-back-service",
}

# The module each KFP function lives in (what a step's program imports first).
MODULE_OF_OP = {
    "preflight_op": "vlp.components.preflight",
    "mirror_weights_op": "vlp.components.mirror.weights",
    "register_model_op": "vlp.components.vertex.register_model",
    "deploy_model_op": "vlp.components.vertex.deploy_model",
    "smoke_test_op": "vlp.components.vertex.smoke_test",
    "benchmark_op": "vlp.components.benchmark_step",
    "promote_op": "vlp.components.vertex.promote",
    "roll_back_op": "vlp.components.vertex.teardown",
    "cleanup_op": "vlp.components.cleanup",
    "deploy_service_op": "vlp.components.cloud_run.service",
    "smoke_test_service_op": "vlp.components.cloud_run.smoke_test",
    "promote_service_op": "vlp.components.cloud_run.service",
    "roll_back_service_op": "vlp.components.cloud_run.service",
}

# Imported but not declared: with NOT_AT_RUN_TIME left out, these would be missing.
UNDECLARED: dict[str, tuple[str, ...]] = {
    # aiplatform_v1's IAM policy mixins import google.iam.v1; aiplatform gets it only through resource-manager.
    "google-cloud-aiplatform": ("grpc-google-iam-v1",),
}

# The step code: the components/ folder beside this one (build-time code lives here, outside it), installed and
# imported as the `vlp.components` package (pyproject.toml maps the folder).
COMPONENTS = Path(__file__).resolve().parent.parent / "components"
PACKAGE = "vlp.components"
LOCK_FILE = COMPONENTS / "step-packages.lock"


def read_lock(path: Path = LOCK_FILE) -> dict[str, tuple[str, tuple[str, ...]]]:
    """The lock: distribution -> (exact version, the steps that install it). Lines read
    `name==version  # steps: a, b`, a form pip also takes as a constraints file (the Makefile does)."""
    lock = {}
    for line in path.read_text().splitlines():
        pin, _, comment = line.partition("#")
        pin = pin.strip()
        if not pin:
            continue
        name, _, version = pin.partition("==")
        steps = tuple(s.strip() for s in comment.removeprefix(" steps:").split(",") if s.strip())
        lock[name] = (version, steps)
    return lock


def step_packages(step: str) -> list[str]:
    """What one step's launcher installs: its locked set, exact, with --no-deps (the lock is complete)."""
    if step not in STEP_NEEDS:
        raise KeyError(f"no package set for step {step!r}: add it to vlp.pipelines.packaging.STEP_NEEDS")
    pins = sorted(f"{name}=={version}" for name, (version, steps) in read_lock().items() if step in steps)
    return ["--no-deps", *pins]


_EMBED_ROOT = Path(tempfile.gettempdir()) / "vlp-embedded"


def _module_path(module: str) -> Path | None:
    """The source file of a step-code module (`vlp.components.vertex.promote`), or None if it is not one."""
    if not module.startswith(PACKAGE + "."):
        return None
    path = COMPONENTS.joinpath(*module.removeprefix(PACKAGE + ".").split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def step_modules(module: str) -> list[str]:
    """The step-code modules a step's module can import, at module level or inside functions (read from
    the sources, not by importing them), so a step embeds only the code it can run. Dotted names below
    `vlp.components`, packages included (importing `vlp.components.vertex.x` runs `components/vertex/__init__.py`)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = _module_path(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        parent = name.rpartition(".")[0]
        if parent != PACKAGE:
            todo.append(parent)
        stat = path.stat()
        todo += _components_imported(str(path), stat.st_mtime_ns, stat.st_size)
    return sorted(n.removeprefix(PACKAGE + ".") for n in seen)


@functools.lru_cache(maxsize=256)
def _components_imported(path: str, mtime_ns: int, size: int) -> list[str]:
    """The step-code modules one source file imports (dotted, from `vlp.components.`). Cached by the file's version
    (its mtime and size): a compile builds about a hundred step components over the same few files, and parsing them
    was a third of it."""
    import ast

    names: list[str] = []
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and f"{node.module}.".startswith(PACKAGE + "."):
            # `from vlp.components.vertex import promote` imports a module; `from vlp.components.config import X` a name.
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names if a.name.startswith(PACKAGE + ".")]
    return names


def lean_source(text: str) -> str:
    """A module's source without comments and docstrings, every statement on the line it had (a traceback from a
    Vertex step points at the repository's line). Comments and docstrings are a third of the code, and a step's
    program, embedded archive included, must fit one 128 KiB Linux argument."""
    import ast
    import io
    import tokenize

    docstrings = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                if isinstance(first.value.value, str):
                    docstrings.add((first.lineno, first.col_offset))  # indentation: bytes and characters agree
    cuts: list[tuple[tuple[int, int], tuple[int, int], str]] = []
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            cuts.append((tok.start, tok.end, ""))
        elif tok.type == tokenize.STRING and tok.start in docstrings:
            cuts.append((tok.start, tok.end, '""'))
    lines = text.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))

    def offset(pos: tuple[int, int]) -> int:
        return starts[pos[0] - 1] + pos[1]

    out = text
    for start, end, replacement in sorted(cuts, reverse=True):
        kept_newlines = "\n" * text[offset(start) : offset(end)].count("\n")
        out = out[: offset(start)] + replacement + kept_newlines + out[offset(end) :]
    return out


def embedded_code_dir(module: str) -> Path:
    """A clean copy of the part of the step code a step's module can import, to embed in its component.

    kfp tars the directory into the spec and puts its root on sys.path at run time, so `import vlp.components.x`
    works on Vertex exactly as here. A Linux argument is at most 128 KiB and kfp passes the embedded archive
    as one, so a step carries only its own modules. Copying (not pointing at the source tree) keeps
    __pycache__ and editor files out.
    """
    src = COMPONENTS
    modules = step_modules(module)
    files = [src / "__init__.py", *(_module_path(f"{PACKAGE}.{m}") for m in modules)]
    if "serving.images" in modules:  # the serving image catalog and each image's fixture (flags, architectures)
        from vlp.components.serving.images import catalog

        files += [src / "serving" / "images.yaml", *(src / "contract" / i.fixture for i in catalog())]
    files = sorted(set(files))
    digest = hashlib.sha256(b"lean-source-2")  # how the files are copied is part of what the directory holds
    for p in files:
        digest.update(p.relative_to(src).as_posix().encode())
        digest.update(p.read_bytes())
    root = _EMBED_ROOT / digest.hexdigest()[:16]
    # Laid out as installed: vlp/ (a namespace package, no __init__.py) holding components/.
    package_dir = Path(*PACKAGE.split("."))
    if not (root / package_dir / "__init__.py").exists():
        staging = Path(tempfile.mkdtemp(prefix="vlp-embed-"))
        (staging / package_dir).mkdir(parents=True)
        for p in files:
            dest = staging / package_dir / p.relative_to(src)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if p.suffix == ".py":
                dest.write_text(lean_source(p.read_text(encoding="utf-8")), encoding="utf-8")
            else:
                shutil.copyfile(p, dest)
        root.parent.mkdir(parents=True, exist_ok=True)
        try:
            staging.rename(root)
        except OSError:  # another process staged the same digest first
            shutil.rmtree(staging, ignore_errors=True)
    return root


def as_component(func: Callable[..., Any], image: str | None = None) -> Any:
    """Wrap a step's thin KFP function as a component: public image + the step's locked packages + embedded
    code, or a prebuilt image (see Dockerfile) that already holds all of it."""
    import typing

    from kfp import dsl

    # Modules with `from __future__ import annotations` hold string annotations, which KFP would read
    # as artifact type names; resolve them (keeping dsl.Input/Output wrappers) before KFP looks.
    hints = typing.get_type_hints(func, include_extras=True)
    if hints.get("return") is type(None):
        hints["return"] = None  # KFP reads a bare None as "no outputs"; NoneType would be an artifact
    func.__annotations__ = hints
    if image:
        return dsl.component(func, base_image=image, install_kfp_package=False)
    return dsl.component(
        func,
        base_image=BASE_IMAGE,
        packages_to_install=step_packages(STEP_OF_OP[func.__name__]),
        embedded_artifact_path=str(embedded_code_dir(func.__module__)),
    )
