"""Deployment config validation: every seed loads, and bad input names the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.config import ConfigError, config_from_dict, load_config

CONFIGS = sorted(Path(__file__).resolve().parent.parent.joinpath("configs").glob("*.yaml"))
MINIMAL = {"name": "demo", "model": {"repo": "org/model"}, "endpoint": {"name": "demo"}}


def test_every_seed_config_loads() -> None:
    names = {p.stem for p in CONFIGS}
    assert {
        "llama-3.1-8b-vllm-l4",
        "llama-3.1-70b-vllm-8xl4",
        "llama-3.1-405b-fp8-tgi-a3",
        "llama-3.2-11b-vision-vllm-a100",
        "llama-3.1-8b-awq-int4-tgi",
        "local-demo",
    } <= names
    for path in CONFIGS:
        cfg = load_config(path)
        assert cfg.endpoint.name and cfg.model.repo


def test_hardware_auto_short_form_and_defaults() -> None:
    cfg = config_from_dict({**MINIMAL, "hardware": "auto"})
    assert cfg.hardware.is_auto
    assert cfg.teardown == "on_failure"
    assert cfg.placement.regions == ["us-central1"]
    assert cfg.placement.project == ""  # no default target project, on purpose


@pytest.mark.parametrize(
    ("overrides", "field", "hint"),
    [
        (["serving.max_model_lenn=4096"], "serving.max_model_lenn", "unknown field"),
        (["serving.engine=triton"], "serving.engine", "'vllm' or 'tgi'"),
        (["endpoint.name=My_Endpoint"], "endpoint.name", "lowercase"),
        (["model.repo=not-a-repo"], "model.repo", "ORG/NAME"),
        (["model.hf_token_secret=hf_abcdefghijklmnop"], "model.hf_token_secret", "Secret Manager"),
        (["serving.gpu_memory_utilization=1.5"], "serving.gpu_memory_utilization", "less than or equal to 1"),
        (["hardware.accelerator_count=2"], "hardware", "name the GPU type too"),
        (["placement.regions=[mars-north1x]"], "placement.regions", "region name"),
        (["endpoint.traffic_steps=[50,10]"], "endpoint.traffic_steps", "end at 100"),
        (["teardown=sometimes"], "teardown", "on_failure"),
        (["serving.env={HF_TOKEN: x}"], "serving.env", "hf_token_secret"),
    ],
)
def test_bad_config_names_field_and_fix(overrides: list[str], field: str, hint: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(MINIMAL, overrides)
    message = str(err.value)
    assert f"  - {field}:" in message
    assert hint in message
    assert "Traceback" not in message


def test_secret_values_never_echoed() -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(MINIMAL, ["model.hf_token_secret=hf_SuperSecretValue123"])
    assert "SuperSecretValue" not in str(err.value)


def test_set_overrides_are_typed() -> None:
    cfg = config_from_dict(
        MINIMAL, ["serving.max_model_len=2048", "serving.enforce_eager=true", "placement.regions=[us-east4, us-west1]"]
    )
    assert cfg.serving.max_model_len == 2048
    assert cfg.serving.enforce_eager is True
    assert cfg.placement.regions == ["us-east4", "us-west1"]


def test_set_without_equals_is_explained() -> None:
    with pytest.raises(ConfigError, match="dotted.key=value"):
        config_from_dict(MINIMAL, ["serving.max_model_len"])


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
