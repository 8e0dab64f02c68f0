"""How a step's plain Python function becomes a KFP component that runs on Vertex without an image build."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

BASE_IMAGE = "python:3.11-slim"  # public, has pip; the project's code travels embedded in the spec

# What a step installs at start on Vertex. Exact pins: a spec compiled today must run the same in a
# year, and `vlp run --local` runs the same spec, so these equal the versions pyproject.toml pins.
RUNTIME_PACKAGES = [
    "google-cloud-aiplatform==1.165.1",  # Model Registry, endpoints, predict; gcpc 2.22 requires <2
    "google-cloud-pipeline-components==2.22.0",  # google.VertexModel / google.VertexEndpoint artifact types
    "google-cloud-storage==3.17.1",  # JSON API + resumable uploads: the path fake-gcs-server also serves
    "google-cloud-secret-manager==2.32.0",  # Hub token read by the mirror step only
    "google-cloud-quotas==0.6.3",  # serving GPU quota per region (Cloud Quotas API v1)
    "google-cloud-logging==3.17.0",  # model server log lines for failed deploys and smoke tests
    "google-crc32c==1.9.0",  # C-accelerated crc32c: verifying 400 GB in pure Python would take hours
    "huggingface_hub==2.4.0",  # Hub metadata, LFS sha256, resolve URLs; honours HF_ENDPOINT
    "transformers==5.23.0",  # apply_chat_template for the smoke prompt (tokenizer only, no torch)
    "pydantic==2.14.3",  # the deployment config model
    "PyYAML==6.0.3",  # config parsing shared with the CLI
    "requests==2.33.0",  # streamed range requests to the Hub
]

_EMBED_ROOT = Path(tempfile.gettempdir()) / "vlp-embedded"


def embedded_code_dir() -> Path:
    """A clean copy of the `components` package (sources only), to embed in each component.

    kfp tars the directory into the spec and puts its root on sys.path at run time, so
    `import components.x` works on Vertex exactly as here. Copying (not pointing at the source
    tree) keeps __pycache__ and editor files out, and fixed mtimes keep the archive stable.
    """
    src = Path(__file__).resolve().parent
    # The sources, plus the upstream contract fixtures the serving presets check flags against.
    files = sorted([*src.glob("*.py"), *src.glob("contract/*.json")])
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.relative_to(src).as_posix().encode())
        digest.update(p.read_bytes())
    root = _EMBED_ROOT / digest.hexdigest()[:16]
    if not (root / "components" / "__init__.py").exists():
        staging = Path(tempfile.mkdtemp(prefix="vlp-embed-"))
        (staging / "components").mkdir()
        for p in files:
            dest = staging / "components" / p.relative_to(src)
            dest.parent.mkdir(exist_ok=True)
            shutil.copyfile(p, dest)
            os.utime(dest, (0, 0))
        for d in sorted({p.parent for p in files}, reverse=True):
            os.utime(staging / "components" / d.relative_to(src), (0, 0))
        root.parent.mkdir(parents=True, exist_ok=True)
        try:
            staging.rename(root)
        except OSError:  # another process staged the same digest first
            shutil.rmtree(staging, ignore_errors=True)
    return root


def as_component(func: Callable[..., Any], image: str | None = None) -> Any:
    """Wrap a step's thin KFP function as a component: public image + pins + embedded code,
    or a prebuilt image (see Dockerfile) that already holds all of it."""
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
        packages_to_install=RUNTIME_PACKAGES,
        embedded_artifact_path=str(embedded_code_dir()),
    )
