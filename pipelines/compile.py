"""Compile the DAG to compiled/*.yaml, and compare a compiled spec with the committed one (the golden check)."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import re
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import yaml

from pipelines.pipeline import PIPELINE_NAME, build_pipeline

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPILED_DIR = REPO_ROOT / "compiled"
_ARCHIVE_RE = re.compile(r"__KFP_EMBEDDED_ARCHIVE_B64 = '([A-Za-z0-9+/=]+)'")


def spec_path(out_dir: Path | None = None, image: str | None = None) -> Path:
    name = f"{PIPELINE_NAME}.image.yaml" if image else f"{PIPELINE_NAME}.yaml"
    return (out_dir or COMPILED_DIR) / name


def compile_pipeline(out_path: Path, image: str | None = None) -> Path:
    """Write the pipeline spec to out_path."""
    from kfp import compiler

    out_path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(image), package_path=str(out_path))
    return out_path


def _code_digest(image: str | None) -> str:
    """A digest of everything a compile reads: the step code, the DAG and the SDK version."""
    import kfp

    digest = hashlib.sha256(f"{kfp.__version__}|{image or ''}".encode())
    components = REPO_ROOT / "components"
    for path in sorted(
        [*components.glob("*.py"), *components.glob("contract/*.json"), REPO_ROOT / "pipelines" / "pipeline.py"]
    ):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def compile_to_temp(image: str | None = None, reuse: bool = False) -> Path:
    """Compile into a temp file (for local runs and checks that must not touch compiled/).

    With reuse, a spec compiled earlier from byte-identical code is reused: local runs start ~1.5 s
    sooner, and a code change still gets a fresh compile."""
    if reuse:
        cached = Path(tempfile.gettempdir()) / "vlp-compiled" / _code_digest(image) / f"{PIPELINE_NAME}.yaml"
        if cached.is_file():
            return cached
        staged = compile_pipeline(Path(tempfile.mkdtemp(prefix="vlp-compile-")) / cached.name, image)
        cached.parent.mkdir(parents=True, exist_ok=True)
        staged.replace(cached)
        return cached
    tmp = Path(tempfile.mkdtemp(prefix="vlp-compile-")) / f"{PIPELINE_NAME}.yaml"
    return compile_pipeline(tmp, image)


def _archive_digest(b64: str) -> str:
    """A digest of what the embedded archive holds (names + bytes), not of its tar/gzip wrapping,
    which carries timestamps and so differs on every compile."""
    raw = gzip.decompress(base64.b64decode(b64))
    digest = hashlib.sha256()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        for member in sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name):
            digest.update(member.name.encode())
            digest.update(tar.extractfile(member).read())  # type: ignore[union-attr]
    return digest.hexdigest()


def normalize_spec(text: str) -> Any:
    """The spec with volatile fields replaced: SDK version, and embedded archives by their content digest."""
    text = _ARCHIVE_RE.sub(lambda m: f"__KFP_EMBEDDED_ARCHIVE_SHA256 = '{_archive_digest(m.group(1))}'", text)
    spec = yaml.safe_load(text)
    spec.pop("sdkVersion", None)
    return spec


def drift(committed: Path, fresh: Path) -> list[str]:
    """Top-level places where two specs differ after normalisation (empty = no drift)."""
    if not committed.is_file():
        return [f"{committed} is missing: run `vlp compile` and commit it"]
    a, b = normalize_spec(committed.read_text()), normalize_spec(fresh.read_text())
    if a == b:
        return []
    diffs = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            sub = a.get(key), b.get(key)
            if all(isinstance(s, dict) for s in sub):
                diffs += [f"{key}.{k}" for k in sorted(set(sub[0]) | set(sub[1])) if sub[0].get(k) != sub[1].get(k)]
            else:
                diffs.append(key)
    return diffs
