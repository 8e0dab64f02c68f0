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

from vlp.pipelines.pipeline import PIPELINE_NAME, Template, build_pipeline, generic_template, preset_template
from vlp.pipelines.presets import preset_paths

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # where `components/` and `pipelines/` are installed
COMPILED_DIR = Path("compiled")  # relative to the working directory: the user's project, not site-packages
_ARCHIVE_RE = re.compile(r"__KFP_EMBEDDED_ARCHIVE_B64 = '([A-Za-z0-9+/=]+)'")
IMAGE_SUFFIX = ".image.yaml"


# libyaml's loader where PyYAML was built with it (the wheels are): the same documents, ~10x faster on specs that
# embed their code (a template's spec took 0.35 s to read with the pure-Python loader, and every check reads several).
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_spec(text: str) -> Any:
    """A compiled spec (or any YAML document) as Python data, as yaml.safe_load reads it."""
    return yaml.load(text, Loader=_SAFE_LOADER)  # noqa: S506 - a safe loader (CSafeLoader or SafeLoader)


def templates() -> list[Template]:
    """Every template `vlp compile` writes: the generic one first, then one per preset."""
    return [generic_template(), *(preset_template(p) for p in preset_paths())]


def spec_path(out_dir: Path | None = None, image: str | None = None, template: Template | None = None) -> Path:
    name = (template or generic_template()).name
    return (out_dir or COMPILED_DIR) / (f"{name}{IMAGE_SUFFIX}" if image else f"{name}.yaml")


def _canonical_archive(b64: str) -> str:
    """The embedded archive re-packed without what varies between compiles: kfp gzips it with the current
    time, and tar keeps owners and modes. Same names and bytes in, same archive out."""
    raw = gzip.decompress(base64.b64decode(b64))
    key = hashlib.sha256(raw).hexdigest()
    if key not in _CANONICAL:
        _CANONICAL[key] = _repack(raw)
    return _CANONICAL[key]


# Repacked archives by the digest of the tar kfp made: the templates of one compile embed the same step archives
# (seven templates, fourteen steps, a handful of distinct archives), and gzip at level 9 is slow.
_CANONICAL: dict[str, str] = {}


def _repack(raw: bytes) -> str:
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(raw)) as src,
        tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as dst,
    ):
        for member in sorted(src.getmembers(), key=lambda m: m.name):
            data = src.extractfile(member).read() if member.isfile() else None  # type: ignore[union-attr]
            member.mtime = 0
            member.uid = member.gid = 0
            member.uname = member.gname = ""
            member.mode = 0o755 if member.isdir() else 0o644
            member.pax_headers = {}
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    return base64.b64encode(gzip.compress(out.getvalue(), compresslevel=9, mtime=0)).decode("ascii")


def compile_pipeline(out_path: Path, image: str | None = None, template: Template | None = None) -> Path:
    """Write one template's spec to out_path, byte-identical for identical code."""
    from kfp import compiler

    out_path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(image, template), package_path=str(out_path))
    text = out_path.read_text()
    out_path.write_text(
        _ARCHIVE_RE.sub(lambda m: f"__KFP_EMBEDDED_ARCHIVE_B64 = '{_canonical_archive(m.group(1))}'", text)
    )
    return out_path


def compile_all(out_dir: Path | None = None, image: str | None = None) -> list[Path]:
    """Every template into out_dir (default compiled/)."""
    return [compile_pipeline(spec_path(out_dir, image, t), image, t) for t in templates()]


def _code_digest(image: str | None) -> str:
    """A digest of everything a compile reads: the step code, the DAG and the SDK version."""
    import kfp

    digest = hashlib.sha256(f"{kfp.__version__}|{image or ''}".encode())
    components = PACKAGE_ROOT / "components"
    for path in sorted(
        [
            *components.rglob("*.py"),
            *components.glob("contract/*.json"),
            components / "step-packages.lock",
            PACKAGE_ROOT / "pipelines" / "pipeline.py",
        ]
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
    spec = read_spec(text)
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


def check_compiled(
    out_dir: Path | None = None, image: str | None = None, fresh: list[Path] | None = None
) -> list[str]:
    """Compile every template afresh (or take `fresh`, a compile_all just made) and compare with out_dir byte for
    byte (empty = no drift). A file whose bytes differ says where, after normalisation, it differs."""
    directory = out_dir or COMPILED_DIR
    if fresh is None:
        fresh = compile_all(Path(tempfile.mkdtemp(prefix="vlp-compile-check-")), image)
    problems = []
    expected = set()
    for made in fresh:
        committed = directory / made.name
        expected.add(committed.name)
        if not committed.is_file():
            problems.append(f"{committed} is missing")
        elif committed.read_bytes() != made.read_bytes():
            where = drift(committed, made) or ["the embedded archive's encoding only"]
            problems.append(f"{committed} differs in {', '.join(where)}")
    suffix = IMAGE_SUFFIX if image else ".yaml"
    for stale in sorted(directory.glob(f"*{suffix}")):
        if stale.name not in expected and (image or not stale.name.endswith(IMAGE_SUFFIX)):
            problems.append(f"{stale} is not a template the code compiles (a removed preset?)")
    return problems


def _task_input_constant(spec: dict[str, Any], task: str, name: str) -> Any:
    """A constant a task of the spec receives (e.g. the preset preflight starts from), wherever the task sits."""
    dags = [spec["root"].get("dag", {}), *(c.get("dag", {}) for c in spec.get("components", {}).values())]
    for dag in dags:
        params = dag.get("tasks", {}).get(task, {}).get("inputs", {}).get("parameters", {})
        if name in params:
            return params[name].get("runtimeValue", {}).get("constant")
    return None


def template_default_problems(path: Path) -> list[str]:
    """What is wrong with a compiled template's run form as it opens: its defaults must make a valid config,
    every input must say what it is for, and the form's fields must be plain strings, numbers and booleans."""
    from vlp.components.config import ConfigError, config_from_dict
    from vlp.components.run_form import FIELD_NAMES, resolve_config

    spec = read_spec(path.read_text())
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    problems = [f"input {n} has no description" for n, p in inputs.items() if not p.get("description")]
    problems += [
        f"input {n} is a {p['parameterType']}, not a plain string, number or boolean"
        for n, p in inputs.items()
        if n != "config" and p["parameterType"] not in ("STRING", "NUMBER_INTEGER", "NUMBER_DOUBLE", "BOOLEAN")
    ]
    defaults = {n: p.get("defaultValue") for n, p in inputs.items()}
    form = {n: defaults.get(n) for n in FIELD_NAMES}
    try:
        preset = _task_input_constant(spec, "preflight", "preset") or {}
        config_from_dict(resolve_config(preset, form, defaults.get("config") or {}), source=f"{path.name}'s defaults")
    except ConfigError as exc:
        problems.append(str(exc))
    return problems
