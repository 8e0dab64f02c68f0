"""The console run form: typed fields, merged over a preset, with `config` last."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlp.components.config import ConfigError, config_from_dict, load_config
from vlp.components.run_form import (
    FIELD_NAMES,
    GENERIC_DEFAULTS,
    FormError,
    form_values,
    hardware_section,
    name_from_repo,
    resolve_config,
)
from vlp.pipelines.pipeline import preset_template
from vlp.pipelines.presets import preset_paths

PRESETS = preset_paths()


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_a_preset_form_left_as_it_opens_gives_the_preset_itself(path: Path) -> None:
    cfg = load_config(path)
    template = preset_template(path)
    resolved = config_from_dict(resolve_config(template.preset, template.form, {}))
    expected = cfg.model_dump(mode="json", exclude_none=True)
    expected["placement"].pop("project", None)
    expected["placement"].pop("bucket", None)
    got = resolved.model_dump(mode="json", exclude_none=True)
    got["placement"].pop("project", None)
    got["placement"].pop("bucket", None)
    assert got == expected


def test_what_vlp_run_submits_resolves_to_the_config_exactly() -> None:
    cfg = load_config(PRESETS[0], ["serving.max_model_len=2048", "endpoint.traffic_steps=[10, 100]"])
    full = cfg.model_dump(mode="json", exclude_none=True)
    assert resolve_config({}, form_values(cfg), full) == full


def test_filled_fields_override_the_preset_and_config_overrides_them() -> None:
    template = preset_template(next(p for p in PRESETS if "8b-vllm-l4" in p.name))
    form = {
        **template.form,
        "model_repo": "Qwen/Qwen2.5-7B-Instruct",
        "hardware": "auto",
        "max_model_len": 8192.0,  # KFP hands integers over as floats
        "endpoint_kind": "dedicated",
        "regions": "europe-west4, us-east4",
        "smoke_expect": "",  # empty keeps the preset's value
    }
    cfg = config_from_dict(resolve_config(template.preset, form, {"serving": {"max_num_seqs": 32}}))
    assert cfg.model.repo == "Qwen/Qwen2.5-7B-Instruct"
    assert cfg.hardware.is_auto and cfg.hardware.accelerator_count == 0
    assert cfg.serving.max_model_len == 8192 and cfg.serving.max_num_seqs == 32
    assert cfg.serving.gpu_memory_utilization == 0.9  # from the preset, which the form does not show
    assert cfg.endpoint.dedicated and cfg.placement.regions == ["europe-west4", "us-east4"]
    assert cfg.smoke_test.expect == "Paris"
    later = config_from_dict(resolve_config(template.preset, form, {"model": {"repo": "org/other"}}))
    assert later.model.repo == "org/other"  # config is merged last


def test_the_generic_form_derives_names_from_the_model() -> None:
    form = {**GENERIC_DEFAULTS, "model_repo": "mistralai/Mistral-7B-Instruct-v0.3"}
    cfg = config_from_dict(resolve_config({}, form, {}))
    assert cfg.name == "mistral-7b-instruct-v0-3" == cfg.endpoint.name
    assert name_from_repo("org/7B-model") == "m-7b-model"
    assert set(GENERIC_DEFAULTS) == set(FIELD_NAMES)


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("hardware", "g2-standard-12:NVIDIA_L4", "MACHINE_TYPE:GPU_TYPE:GPU_COUNT"),
        ("hardware", "8x L4", "MACHINE_TYPE:GPU_TYPE:GPU_COUNT"),
        ("endpoint_kind", "private", "shared or dedicated"),
        ("max_model_len", 4096.5, "whole number"),
    ],
)
def test_a_field_that_cannot_be_read_names_itself_and_the_form_it_takes(field: str, value: object, says: str) -> None:
    with pytest.raises(FormError, match=says) as err:
        resolve_config({}, {**GENERIC_DEFAULTS, field: value}, {})
    assert field in str(err.value)


def test_a_bad_value_is_reported_by_the_config_model_with_the_field() -> None:
    with pytest.raises(ConfigError, match="model.repo"):
        config_from_dict(resolve_config({}, {**GENERIC_DEFAULTS, "model_repo": "not a repo"}, {}))
    assert hardware_section("g2-standard-8") == {
        "machine_type": "g2-standard-8",
        "accelerator_type": "",
        "accelerator_count": 0,
    }


def test_every_function_that_takes_the_form_takes_all_of_it() -> None:
    """KFP reads each component's inputs from its function's signature, so the form's fields are written out in
    the pipeline, preflight and the exit handler; they must stay the same list."""
    import inspect

    from vlp.components.cleanup import cleanup_op
    from vlp.components.preflight import preflight_op
    from vlp.pipelines.pipeline import build_pipeline

    pipeline_inputs = build_pipeline().component_spec.inputs
    for name in FIELD_NAMES:
        assert name in pipeline_inputs, name
    for func in (preflight_op, cleanup_op):
        params = inspect.signature(func).parameters
        assert [n for n in params if n in FIELD_NAMES] == list(FIELD_NAMES), func.__name__
