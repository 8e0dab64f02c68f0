"""What a serving image does at start, as the emulator's stand-in reproduces it: the image is looked up in the
serving image catalog (components/serving/images.yaml), whose fixtures were extracted from each engine version's own
source (scripts/contract_fixtures.py). A flag outside the version's argument parser, or a model its engine does not
serve, stops the container at start with the engine's own kind of log line, before the server answers its health
route (docs/vertex-contract.md, rows I1-I3)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlp.components.serving.images import ServingImage, engine_name, find


def image_of(container_spec: dict[str, Any]) -> ServingImage | None:
    """The catalog entry of a container's image (its URI or its Artifact Registry remote path); None if unknown."""
    return find(str(container_spec.get("imageUri") or container_spec.get("image_uri") or container_spec.get("image") or ""))


# How each image's argument parser names itself in its usage error (argparse's `prog: error: ...`; clap's `error:`):
# vLLM 0.34's `vllm serve`: the subparser hands unknown arguments back to the top-level parser, whose prog is `vllm`
# (vllm/entrypoints/cli/main.py, run at v0.34.0); vLLM 0.6.2's demo server under `python -m
# vllm.entrypoints.api_server` (FlexibleArgumentParser() with no prog: the script name); TGI's launcher is clap.
_USAGE_ERROR = {
    "openai": "vllm: error: unrecognized arguments: {flags}",
    "model-garden": "api_server.py: error: unrecognized arguments: {flags}",
    "tgi": "error: unexpected argument '{first}' found",
}


def unknown_flag_exit(image: ServingImage, args: list[str]) -> tuple[int, list[str]] | None:
    """I1: a --flag the version's parser does not know ends the container with argparse's (clap's) exit code 2."""
    unknown = set(image.unknown_flags(args))
    bad = [a for a in args if a.startswith("--") and a.split("=", 1)[0] in unknown]
    if not bad:
        return None
    line = _USAGE_ERROR.get(image.api, _USAGE_ERROR["openai"]).format(flags=" ".join(bad), first=bad[0].split("=")[0])
    return 2, [line]


def _model_config(model_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def unsupported_model_exit(image: ServingImage, model_dir: Path) -> tuple[int, list[str]] | None:
    """I2: a model whose architecture (vLLM: config.json architectures, looked up in the model registry) or model
    type (TGI: get_model's dispatch) the engine version does not serve ends the container at start."""
    config = _model_config(model_dir)
    architectures = [str(a) for a in config.get("architectures") or []]
    model_type = str(config.get("model_type") or "")
    if image.serves(architectures[0] if architectures else "", model_type) is not False:
        return None
    if image.engine == "tgi":
        # server/text_generation_server/models/__init__.py get_model, at v2.4.0: the final branch.
        return 1, [f"ValueError: Unsupported model type {model_type}"]
    removed = image.removed_in(architectures[0])
    if removed:
        # vllm/model_executor/models/registry.py _raise_for_unsupported (a model in _PREVIOUSLY_SUPPORTED_MODELS).
        return 1, [
            f"ValueError: Model architecture {architectures[0]} was supported in vLLM until v{removed}, and is not "
            "supported anymore. Please use an older version of vLLM if you want to use this model architecture."
        ]
    # vllm/model_executor/models/registry.py _raise_for_unsupported.
    supported = sorted(image.contract().get("architectures", []))
    return 1, [
        f"ValueError: Model architectures {architectures!r} are not supported for now. Supported architectures: "
        f"dict_keys({supported!r})"
    ]


def start_refusal(container_spec: dict[str, Any], model_dir: Path) -> tuple[int, list[str]] | None:
    """(exit code, log lines) when the catalog image would stop at start on these args and this model; None when it
    starts (or the image is not in the catalog: nothing to check it against)."""
    image = image_of(container_spec)
    if image is None:
        return None
    args = [str(a) for a in container_spec.get("args") or []]
    return unknown_flag_exit(image, args) or unsupported_model_exit(image, model_dir)


def describe(image: ServingImage) -> str:
    return f"{engine_name(image.engine)} {image.engine_version}"
