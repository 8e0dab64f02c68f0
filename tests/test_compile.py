"""Golden compile test: compiled/ matches the code, and the spec loads in aiplatform.PipelineJob with every config."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from components.config import load_config
from components.packaging import RUNTIME_PACKAGES
from pipelines.compile import compile_to_temp, drift, normalize_spec, spec_path
from pipelines.pipeline import pipeline_parameters

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def fresh_spec() -> Path:
    return compile_to_temp()


def test_compiled_spec_has_not_drifted(fresh_spec: Path) -> None:
    # Regenerate with `vlp compile` (never done by CI); this only compares.
    assert drift(spec_path(), fresh_spec) == []


def test_normalisation_catches_a_code_change(fresh_spec: Path) -> None:
    """The embedded archive is compared by content: a one-byte change in embedded code is drift."""
    text = fresh_spec.read_text()
    spec = normalize_spec(text)
    assert "__KFP_EMBEDDED_ARCHIVE_SHA256" in yaml.safe_dump(spec)
    import base64
    import gzip
    import io
    import tarfile

    b64 = re.search(r"__KFP_EMBEDDED_ARCHIVE_B64 = '([^']+)'", text).group(1)
    raw = gzip.decompress(base64.b64decode(b64))
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(raw)) as src, tarfile.open(fileobj=out, mode="w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read() if m.isfile() else None
            if m.name.endswith("runtime.py"):
                data += b"\n# changed\n"
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data) if data is not None else None)
    changed_b64 = base64.b64encode(gzip.compress(out.getvalue())).decode()
    changed = text.replace(b64, changed_b64)
    assert normalize_spec(changed) != spec


def test_recompiling_is_stable(fresh_spec: Path) -> None:
    assert normalize_spec(fresh_spec.read_text()) == normalize_spec(compile_to_temp().read_text())


def test_spec_is_runtime_parameterised_and_cache_free(fresh_spec: Path) -> None:
    spec = yaml.safe_load(fresh_spec.read_text())
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {"config", "project", "region", "bucket", "service_account", "force", "api_endpoint"} <= set(params)
    assert "defaultValue" not in params["project"]  # nothing deploys to a project by accident
    for name, p in params.items():
        assert p.get("description"), f"parameter {name} has no description for the console form"

    def tasks(dag: dict) -> dict:
        return dag.get("tasks", {})

    all_tasks = dict(tasks(spec["root"]["dag"]))
    for comp in spec["components"].values():
        all_tasks.update(tasks(comp.get("dag", {})))
    for name, task in all_tasks.items():
        if "componentRef" in task and not name.startswith(("condition", "exit-handler")):
            assert task.get("cachingOptions", {}).get("enableCache") is not True, name
            assert task["taskInfo"]["name"], name
    text = fresh_spec.read_text()
    for pin in RUNTIME_PACKAGES:
        assert pin in text
    assert not re.search(r"hf_[A-Za-z0-9]{20,}", text)  # no Hub token anywhere in the spec


def test_no_secret_or_environment_baked_in(fresh_spec: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Project/bucket come from run-time parameters, never from the compiling machine's environment."""
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "compile-time-project-xyz")
    monkeypatch.setenv("HF_TOKEN", "hf_compileTimeSecret123")
    text = compile_to_temp().read_text()
    assert "compile-time-project-xyz" not in text
    assert "hf_compileTimeSecret123" not in text


@pytest.mark.parametrize("config_path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_spec_loads_in_pipeline_job_with_every_config(config_path: Path) -> None:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import aiplatform

    cfg = load_config(config_path)
    aiplatform.init(project="p", location="us-central1", credentials=AnonymousCredentials())
    job = aiplatform.PipelineJob(
        display_name="golden",
        template_path=str(spec_path()),
        pipeline_root="gs://bucket/root",
        parameter_values=pipeline_parameters(cfg, project="p", bucket="b"),
        enable_caching=False,
    )
    runtime = job._gca_resource.runtime_config  # the request submit() would send
    assert runtime.parameter_values["project"] == "p"
    assert dict(runtime.parameter_values["config"])["name"] == cfg.name


def test_image_variant_uses_prebuilt_image() -> None:
    text = compile_to_temp(image="us-docker.pkg.dev/p/r/vlp:1").read_text()
    assert "us-docker.pkg.dev/p/r/vlp:1" in text
    assert "__KFP_EMBEDDED_ARCHIVE_B64" not in text
    assert "pip install" not in text


def test_dockerfile_and_pyproject_pin_what_components_install() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    for pin in RUNTIME_PACKAGES:
        assert pin in dockerfile, f"Dockerfile lacks {pin}"
        name, version = pin.split("==")
        assert re.search(rf'"{re.escape(name)}(\[\w+\])?=={re.escape(version)}"', pyproject), f"pyproject lacks {pin}"


def test_big_models_mirror_as_a_custom_job_with_more_network(fresh_spec: Path) -> None:
    """Preflight's `mirror_on` picks the branch: the step itself, or a custom job on n2-standard-8/16."""
    spec = yaml.safe_load(fresh_spec.read_text())
    conditions = [
        task.get("triggerPolicy", {}).get("condition", "")
        for comp in spec["components"].values()
        for task in comp.get("dag", {}).get("tasks", {}).values()
    ]
    assert any("mirror_on" in c and "'step'" in c for c in conditions), conditions
    assert any("mirror_on" in c and "'n2-standard-8'" in c for c in conditions), conditions
    machine_types = re.findall(r'"machine_type": "([\w-]+)"', fresh_spec.read_text()) + re.findall(
        r"machine_type: ([\w-]+)", fresh_spec.read_text()
    )
    text = fresh_spec.read_text()
    assert "n2-standard-8" in text and "n2-standard-16" in text, machine_types
    from components.mirror_weights import mirror_machine_for

    assert mirror_machine_for(16 * 10**9)["machine_type"] == "e2-standard-4"  # 8B BF16: on the step
    assert mirror_machine_for(410 * 10**9)["machine_type"] == "n2-standard-16"  # 405B FP8: 32 Gbps
