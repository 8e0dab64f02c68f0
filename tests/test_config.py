"""Deployment config validation: every seed loads, and bad input names the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlp.components.config import ConfigError, config_from_dict, load_config

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
        # Numbers no engine or machine takes are typos, refused at load (issue 37), not rendered into the container.
        (["serving.max_num_seqs=1.0e+23"], "serving.max_num_seqs", "exceeded maximum size"),
        (["serving.max_num_seqs=100000000"], "serving.max_num_seqs", "less than or equal to 65536"),
        (["serving.tensor_parallel_size=16"], "serving.tensor_parallel_size", "less than or equal to 8"),
        (["serving.max_lora_rank=1024"], "serving.max_lora_rank", "less than or equal to 512"),
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


def test_every_hardware_set_works_on_an_auto_config() -> None:
    auto = {**MINIMAL, "hardware": "auto"}
    cfg = config_from_dict(auto, ["hardware.objective=cost_per_hour"])
    assert cfg.hardware.is_auto and cfg.hardware.objective == "cost_per_hour"
    cfg = config_from_dict(auto, ["hardware.accelerator_type=NVIDIA_L4"])
    assert cfg.hardware.accelerator_type == "NVIDIA_L4"


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


BAD_INPUTS = [
    # (the CLI arguments after the config, the field the error must name, words of the fix)
    (["--set", "model.repo=a/.."], "model.repo", "not a Hub repo id"),
    (["--set", "model.repo=../x"], "model.repo", "not a Hub repo id"),
    (["--set", "model.repo=org--x/y"], "model.repo", "'--' and '..'"),
    (["--set", "model.revision=abc1234"], "model.revision", "give all 40 characters"),
    (["--set", "model.revision=main..x"], "model.revision", "not a branch, tag or commit"),
    (["--set", "placement.project=../../x"], "placement.project", "not a Google Cloud project id"),
    (["--project", "../../x"], "--project", "not a Google Cloud project id"),
    (["--project", "My Project"], "--project", "not a Google Cloud project id"),
    (["--set", "placement.bucket=gs://../x"], "placement.bucket", "not a Cloud Storage bucket name"),
    (["--bucket", "gs://../x"], "--bucket", "not a Cloud Storage bucket name"),
    (["--bucket", "gs://b/with/path"], "--bucket", "no path"),
    (["--set", "smoke_test.attempts=1000"], "smoke_test.attempts", "less than or equal to 30"),
    (["--set", "serving.max_model_len=100000000"], "serving.max_model_len", "less than or equal to 10485760"),
]


@pytest.mark.parametrize(("args", "field", "words"), BAD_INPUTS, ids=[" ".join(a) for a, _, _ in BAD_INPUTS])
def test_bad_inputs_exit_2_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], field: str, words: str
) -> None:
    from vlp.pipelines.cli import main

    state = tmp_path / "state"
    code = main(["run", "--local", "configs/local-demo.yaml", "--state-dir", str(state), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert field in err and words in err, err
    assert "Traceback" not in err
    assert not state.exists()  # no stack, no lock, nothing


def test_good_names_pass() -> None:
    good = [
        "model.repo=meta-llama/Llama-3.1-8B-Instruct",
        "model.repo=HuggingFaceTB/SmolLM2-135M-Instruct",
        "model.revision=refs/pr/12",
        "model.revision=v1.0",
        "model.revision=" + "0123456789abcdef0123456789abcdef01234567",
        "placement.project=my-project-123",
        "placement.project=example.com:my-project",
        "placement.bucket=gs://vlp-weights.example_1/",
    ]
    for override in good:
        load_config(CONFIGS[0], [override])
    assert load_config(CONFIGS[0], ["placement.bucket=gs://b-1/"]).placement.bucket == "b-1"


def test_a_config_that_is_not_utf8_is_named_and_the_others_still_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vlp.pipelines.cli import main

    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: d\u00e9mo\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml is not UTF-8 text \(byte 7"):
        load_config(bad)
    good = Path(__file__).resolve().parent.parent / "configs" / "local-demo.yaml"
    code = main(["check", str(bad), str(good)])
    out = capsys.readouterr().out
    assert code != 0
    assert f"FAIL {bad}" in out and "save it as UTF-8" in out
    assert f"ok   {good}" in out


def test_a_key_written_twice_is_refused_naming_both_lines(tmp_path: Path) -> None:
    """PyYAML keeps the second `name:` without a word; a config with a repeated key is refused, naming the key and
    both lines (nested keys too), while an anchor merged into a mapping may still be overridden."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("name: first\nmodel:\n  repo: org/model\nname: second\n")
    with pytest.raises(ConfigError, match=r"the key 'name' appears twice, on line 1 and line 4: keep one"):
        load_config(twice)
    nested = tmp_path / "nested.yaml"
    nested.write_text("name: demo\nmodel:\n  repo: org/model\n  revision: main\n  repo: org/other\n")
    with pytest.raises(ConfigError, match=r"the key 'repo' appears twice, on line 3 and line 5"):
        load_config(nested)
    import yaml

    from vlp.components.config import _UniqueKeyLoader

    merged = yaml.load("a: &x {k: 1, j: 1}\nb:\n  <<: *x\n  k: 2\n", Loader=_UniqueKeyLoader)
    assert merged == {"a": {"k": 1, "j": 1}, "b": {"k": 2, "j": 1}}


def test_a_directory_given_as_the_config_is_named_as_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory: pass a config file in it"):
        load_config(tmp_path)


def test_a_bucket_name_with_no_room_for_a_fallback_regions_bucket_says_how_long_it_may_be() -> None:
    from vlp.components.config import regional_bucket

    assert regional_bucket("my-bucket", "europe-west4") == "my-bucket-europe-west4"
    long = "b" * 55
    with pytest.raises(ValueError, match="use a bucket name of at most 50 characters, or remove europe-west4"):
        regional_bucket(long, "europe-west4")
