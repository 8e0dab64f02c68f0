"""The serving image catalog: each image's fixture, the image preflight chooses for a model, and the refusal when the
chosen or named image's engine does not serve it (issue 31)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_planning import LLAMA_32_11B_VISION, write_header_only_model

from vlp.components.serving import images
from vlp.pipelines.cli import main

REPO = Path(__file__).resolve().parents[1]
OLD_VLLM = "us-docker.pkg.dev/vertex-ai/vertex-vision-model-garden-dockers/pytorch-vllm-serve:20241001_0916_RC00"
CURRENT_VLLM = "docker.io/vllm/vllm-openai:v0.34.0"

# config.json as published on the Hub (Qwen/Qwen3-8B, openai/gpt-oss-20b, google/gemma-3-4b-it), trimmed to the
# fields the planner reads; index total_size from each repo's model.safetensors.index.json.
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "vocab_size": 151936,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"],
    "model_type": "gpt_oss",
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "num_attention_heads": 64,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "num_local_experts": 32,
    "num_experts_per_tok": 4,
    "max_position_embeddings": 131072,
    "vocab_size": 201088,
    "sliding_window": 128,
    "torch_dtype": "bfloat16",
}
GEMMA3_4B = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "model_type": "gemma3",
    "text_config": {
        "model_type": "gemma3_text",
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "num_attention_heads": 8,
        "num_hidden_layers": 34,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "sliding_window": 1024,
        "max_position_embeddings": 131072,
        "vocab_size": 262208,
    },
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "num_hidden_layers": 27},
    "torch_dtype": "bfloat16",
}
CHECKOUTS = {
    "qwen3": (QWEN3_8B, 16_381_470_720),
    "gpt-oss": (GPT_OSS_20B, 13_761_264_768),
    "gemma3": (GEMMA3_4B, 8_600_158_944),
    "vision": (LLAMA_32_11B_VISION, 21_340_441_670),
}


@pytest.fixture(scope="module")
def checkouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkouts")
    return {
        name: write_header_only_model(root / name, config, tensors=[], index_only_total=total)
        for name, (config, total) in CHECKOUTS.items()
    }


def test_every_catalog_image_names_its_engine_version_source_and_fixture() -> None:
    ids = [i.id for i in images.catalog()]
    assert len(ids) == len(set(ids))
    for image in images.catalog():
        data = image.contract()
        # The fixture was extracted from the version the entry names, and says from where.
        assert data["version"] == image.engine_version, image.id
        assert data["source"] and image.version_source and image.why and image.routes_source
        assert image.status in images.STATUS_ORDER and image.api in ("openai", "model-garden", "tgi")
        assert image.health_route in image.routes or image.api == "tgi"
        assert set(image.targets) <= {"vertex", "cloud_run"}
        served = data["model_types"] if image.engine == "tgi" else data["architectures"]
        assert len(served) > 10, image.id
    # One current vLLM image for each target; TGI is frozen, never a new default.
    for target in ("vertex", "cloud_run"):
        assert images.default_image("vllm", target).status == "current"
    assert images.default_image("tgi").status == "frozen"


def test_the_engine_registries_hold_what_their_versions_shipped() -> None:
    old, new = images.by_id("model-garden-vllm-20241001"), images.by_id("vllm-0.34.0")
    for arch in ("Qwen3ForCausalLM", "GptOssForCausalLM", "Gemma3ForConditionalGeneration"):
        assert old.serves(arch, "") is False and new.serves(arch, "") is True
    assert old.serves("MllamaForConditionalGeneration", "") is True
    assert new.serves("MllamaForConditionalGeneration", "") is False
    assert new.removed_in("MllamaForConditionalGeneration") == "0.10.2"
    assert "--swap-space" in old.flags() and "--swap-space" not in new.flags()


@pytest.mark.parametrize(
    ("name", "image", "version"),
    [
        ("qwen3", CURRENT_VLLM, "0.34.0"),
        ("gpt-oss", CURRENT_VLLM, "0.34.0"),
        ("gemma3", CURRENT_VLLM, "0.34.0"),
        ("vision", OLD_VLLM, "0.6.2"),  # mllama: removed from vLLM after 0.10.2
    ],
)
def test_plan_json_names_an_image_whose_engine_serves_the_model(
    checkouts: dict[str, Path], capsys: pytest.CaptureFixture[str], name: str, image: str, version: str
) -> None:
    main(["plan", "--model", str(checkouts[name]), "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert (plan["serving_image"], plan["engine_version"]) == (image, version), plan["errors"]


def test_forcing_the_2024_image_on_qwen3_is_refused_naming_one_that_serves_it(
    checkouts: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["plan", "--model", str(checkouts["qwen3"]), "--image", OLD_VLLM, "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert code != 0 and not plan["fits"]
    (error,) = plan["errors"]
    assert "Qwen3ForCausalLM" in error and "vLLM 0.6.2" in error and CURRENT_VLLM in error, error


def test_tgi_is_checked_by_model_type_and_said_to_be_frozen(checkouts: dict[str, Path]) -> None:
    tgi = images.by_id("tgi-2.4.0-dlc")
    assert tgi.serves("", "llama") is True and tgi.serves("", "gpt_oss") is False
    with pytest.raises(images.ImageChoiceError, match="model type 'gpt_oss'.*vllm/vllm-openai:v0.34.0.*engine: vllm"):
        images.choose_image("tgi", "vertex", "GptOssForCausalLM", "gpt_oss")


def _deployment(name: str, overrides: list[str], plan: dict[str, Any] | None = None) -> Any:
    from test_serving import seed

    return seed(name, plan, overrides)


def test_a_docker_hub_image_is_named_through_the_projects_remote_repository() -> None:
    from vlp.components.serving.engines import resolve_shape

    shape = resolve_shape(_deployment("llama-3.1-8b-vllm-l4", []))
    assert shape.image == "us-docker.pkg.dev/test-project/vlp-docker-hub/vllm/vllm-openai:v0.34.0"
    assert shape.serving_image and shape.serving_image.id == "vllm-0.34.0"
    assert images.find(shape.image) == shape.serving_image
    assert images.by_id("vllm-0.34.0").uri("p", "europe-west4").startswith("europe-docker.pkg.dev/p/vlp-docker-hub/")


def test_a_flag_the_images_version_removed_is_refused_at_render() -> None:
    from vlp.components.serving.engines import ServingSpecError
    from vlp.components.vertex.serving_spec import container_spec

    with pytest.raises(ServingSpecError, match=r"vLLM 0\.34\.0 .* does not accept --swap-space"):
        container_spec(_deployment("llama-3.1-8b-vllm-l4", ["serving.swap_space=16"]))
    with pytest.raises(ServingSpecError, match="does not accept --no-such-flag"):
        container_spec(_deployment("llama-3.1-8b-vllm-l4", ["serving.extra_args=[--no-such-flag=1]"]))
    # The 2024 image still takes it (and gets Model Garden's 16 GiB when unset).
    spec = container_spec(_deployment("llama-3.2-11b-vision-vllm-a100", []))
    assert "--swap-space=16" in spec.args


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs").glob("*.yaml")))
def test_every_preset_renders_flags_its_images_engine_version_parses(name: str) -> None:
    """Both targets: the container args of every preset, each flag checked against the fixture of its image."""
    from vlp.components.config import load_config
    from vlp.components.serving.engines import resolve_shape

    plan = {"machine_type": "g2-standard-12", "accelerator_type": "NVIDIA_L4", "accelerator_count": 1}
    deployment = _deployment(name, [], plan if load_config(REPO / "configs" / f"{name}.yaml").hardware.is_auto else None)
    image = resolve_shape(deployment).serving_image
    assert image is not None
    if deployment.config.target == "cloud_run":
        from vlp.components.cloud_run.service_spec import revision_template

        (container,) = revision_template(deployment, "gs://b/models/x/sha", {}).containers
        args, uri = list(container.args), container.image
    else:
        from vlp.components.vertex.serving_spec import container_spec

        spec = container_spec(deployment, "gs://b/models/x/sha")
        args, uri = list(spec.args), spec.image_uri
    assert images.find(uri) == image
    assert [a for a in args if a.startswith("--")] and image.unknown_flags(args) == [], (image.id, args)


def test_the_multi_host_image_is_chosen_for_multi_host_shapes_only() -> None:
    """Model Garden's multi-host build (vLLM past 0.7.3, Ray launcher) serves the page's models; a single-node shape
    never gets it, even for a model only kept images serve (Llama 3.2 Vision stays on the 2024 build)."""
    multi = images.by_id("model-garden-vllm-20250312-multihost")
    assert multi.multi_host and multi.status == "kept" and multi.targets == ("vertex",)
    assert multi.contract()["version"] == "0.7.3" and multi.fixture == "vllm-0.7.3.json"
    for arch in ("LlamaForCausalLM", "DeepseekV3ForCausalLM"):
        assert multi.serves(arch, "") is True
        assert images.choose_image("vllm", "vertex", arch, "", multi_host=True) == multi
        assert images.choose_image("vllm", "vertex", arch, "") == images.by_id("vllm-0.34.0")
    assert multi.serves("MllamaForConditionalGeneration", "") is True
    assert images.choose_image("vllm", "vertex", "MllamaForConditionalGeneration", "") == images.by_id(
        "model-garden-vllm-20241001"
    )
    assert not images.default_image("vllm", "vertex").multi_host
    assert images.default_image("vllm", "vertex", multi_host=True) == multi
    for engine, target in (("tgi", "vertex"), ("vllm", "cloud_run")):
        with pytest.raises(images.ImageChoiceError, match="no multi-host"):
            images.choose_image(engine, target, "LlamaForCausalLM", "llama", multi_host=True)
    # The page's flags (and vlp's Model Garden flags) are in vLLM 0.7.3's parser.
    page = ["--host", "--port", "--model", "--tensor-parallel-size", "--pipeline-parallel-size",
            "--gpu-memory-utilization", "--max-model-len", "--max-num-seqs", "--enable-chunked-prefill",
            "--kv-cache-dtype", "--trust-remote-code", "--disable-log-requests"]  # fmt: skip
    assert multi.unknown_flags([f"{f}=1" for f in page]) == []
