"""Golden compile test: compiled/ matches the code, and the spec loads in aiplatform.PipelineJob with every config."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from vlp.components.config import load_config
from vlp.pipelines.compile import (
    check_compiled,
    compile_to_temp,
    normalize_spec,
    spec_path,
    template_default_problems,
    templates,
)
from vlp.pipelines.pipeline import pipeline_parameters

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def fresh_spec() -> Path:
    return compile_to_temp()


@pytest.mark.slow
def test_compiled_templates_have_not_drifted_and_two_compiles_are_byte_identical() -> None:
    """compiled/ is what the code compiles to, byte for byte (regenerate with `vlp compile`; this only compares). That
    is also the reproducibility check: compiled/ was written by another process (`vlp compile`), at another time, so
    equal bytes mean two compiles of the same code are identical. A compile that varied (a timestamp, a dict order, an
    archive's gzip header) fails here. One compile instead of the three the suite made before."""
    assert check_compiled() == []


def test_every_embedded_program_fits_one_linux_argument() -> None:
    """kfp passes each step's program (with its embedded archive) as one argv string, and Linux caps one
    argument at MAX_ARG_STRLEN = 32 pages = 131072 bytes: over it, the step cannot even start."""
    for path in sorted(Path(spec_path().parent).glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())
        for name, executor in spec["deploymentSpec"]["executors"].items():
            container = executor.get("container", {})
            for arg in container.get("command", []) + container.get("args", []):
                assert len(arg.encode()) < 131072, f"{path.name} {name}: {len(arg.encode())} bytes"


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
    assert params["config"].get("isOptional") and params["config"]["defaultValue"] == {}
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
    from vlp.components.planning.catalog import mirror_machine_for

    assert mirror_machine_for(16 * 10**9)["machine_type"] == "e2-standard-4"  # 8B BF16: on the step
    assert mirror_machine_for(410 * 10**9)["machine_type"] == "n2-standard-16"  # 405B FP8: 32 Gbps


@pytest.mark.parametrize("template", templates(), ids=lambda t: t.name)
def test_each_template_opens_with_a_valid_form_and_loads_with_only_project_and_bucket(template, tmp_path: Path) -> None:
    """The console's run form: plain typed inputs with descriptions whose defaults make a valid config; a
    preset asks only for project and bucket, the generic template only for project."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import aiplatform

    path = spec_path(template=template)
    assert template_default_problems(path) == []
    spec = yaml.safe_load(path.read_text())
    required = {n for n, p in spec["root"]["inputDefinitions"]["parameters"].items() if not p.get("isOptional")}
    assert required == ({"project"} if template.preset is None else {"project", "bucket"})
    aiplatform.init(project="p", location="us-central1", credentials=AnonymousCredentials())
    values = {"project": "p"} if template.preset is None else {"project": "p", "bucket": "b"}
    job = aiplatform.PipelineJob(
        display_name="form", template_path=str(path), pipeline_root="gs://b/root", parameter_values=values
    )
    runtime = job._gca_resource.runtime_config
    assert runtime.parameter_values["project"] == "p"
    assert spec["pipelineInfo"]["name"] == template.name
