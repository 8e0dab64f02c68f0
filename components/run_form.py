"""The run form: the typed fields a person fills in the Vertex console, and how they become a deployment config.

A template's config is built in three layers, later ones winning: the preset the template was compiled from
(empty for the generic template), the form fields that are filled in (an empty string or 0 keeps the layer
below), and the optional `config` parameter, a deployment config (or part of one) merged last.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

from vlp.components.config import ConfigError, DeploymentConfig


@dataclass(frozen=True)
class FormField:
    """One run-form field: its parameter name, where it lands in the config, and what the form says."""

    name: str
    path: str  # dotted config path
    kind: type  # str or int: the console shows STRING / INTEGER inputs
    description: str


FORM_FIELDS: tuple[FormField, ...] = (
    FormField(
        "model_repo",
        "model.repo",
        str,
        "Hugging Face Hub model to deploy, as ORG/NAME (e.g. meta-llama/Llama-3.1-8B-Instruct).",
    ),
    FormField(
        "model_revision", "model.revision", str, "Branch, tag or commit of the model; the run pins it to a commit."
    ),
    FormField(
        "hf_token_secret",
        "model.hf_token_secret",
        str,
        "Secret Manager secret holding a Hub token, for gated models (e.g. hf-token); never the token itself.",
    ),
    FormField("engine", "serving.engine", str, "Serving engine: vllm or tgi."),
    FormField(
        "target",
        "target",
        str,
        "Where the model serves: vertex (a Vertex AI endpoint) or cloud_run (a private Cloud Run GPU service; "
        "engine tgi; its size is the config's cloud_run section).",
    ),
    FormField(
        "hardware",
        "hardware",
        str,
        "auto (the shape with the lowest cost per output token that fits the model's real size), or "
        "MACHINE_TYPE:GPU_TYPE:GPU_COUNT, "
        "e.g. g2-standard-12:NVIDIA_L4:1.",
    ),
    FormField(
        "max_model_len",
        "serving.max_model_len",
        int,
        "Longest sequence (prompt + answer) in tokens; 0 = planned from the GPU memory left for the KV cache.",
    ),
    FormField(
        "deployment_name",
        "name",
        str,
        "Deployment name, the label on everything the run creates; empty = derived from the model name.",
    ),
    FormField(
        "endpoint_name",
        "endpoint.name",
        str,
        "Endpoint display name; a run with the same name redeploys onto it blue/green. Empty = the deployment name.",
    ),
    FormField(
        "endpoint_kind",
        "endpoint.dedicated",
        str,
        "shared (the regional aiplatform.googleapis.com host) or dedicated (its own DNS, long requests).",
    ),
    FormField(
        "regions",
        "placement.regions",
        str,
        "Candidate regions, comma-separated, in order of preference; the first with quota is used.",
    ),
    FormField(
        "teardown",
        "teardown",
        str,
        "on_failure (remove what a failed run created), always (also after success, for CI) or never.",
    ),
    FormField("smoke_prompt", "smoke_test.prompt", str, "Prompt the smoke test sends before traffic moves."),
    FormField(
        "smoke_expect",
        "smoke_test.expect",
        str,
        "Text the smoke answer must contain (case-insensitive); empty = the preset's, or any non-empty answer.",
    ),
)
FIELD_NAMES = tuple(f.name for f in FORM_FIELDS)

# What the generic template's form shows when nobody has filled it in: a complete, cheap deployment.
GENERIC_DEFAULTS: dict[str, Any] = {
    "model_repo": "meta-llama/Llama-3.1-8B-Instruct",
    "model_revision": "main",
    "hf_token_secret": "hf-token",
    "engine": "vllm",
    "target": "vertex",
    "hardware": "auto",
    "max_model_len": 4096,
    "deployment_name": "",
    "endpoint_name": "",
    "endpoint_kind": "shared",
    "regions": "us-central1",
    "teardown": "on_failure",
    "smoke_prompt": "What is the capital of France?",
    "smoke_expect": "Paris",
}

_HARDWARE_RE = re.compile(r"^(?P<machine>[a-z0-9-]+)(:(?P<gpu>[A-Z0-9_]+)(:(?P<count>\d+))?)?$")


class FormError(ConfigError):
    """A form field that cannot be read; the message names the field and shows the form it takes."""


def name_from_repo(repo: str) -> str:
    """A deployment name from a Hub repo id: meta-llama/Llama-3.1-8B-Instruct -> llama-3-1-8b-instruct."""
    name = re.sub(r"[^a-z0-9]+", "-", repo.rsplit("/", 1)[-1].lower()).strip("-")
    if not name or not name[0].isalpha():
        name = f"m-{name}"
    return name[:63].rstrip("-")


def hardware_section(value: str) -> dict[str, Any]:
    """`auto` or MACHINE_TYPE[:GPU_TYPE:GPU_COUNT] as the config's hardware section (shape fields only)."""
    value = value.strip()
    if value == "auto":
        return {"machine_type": "auto", "accelerator_type": "", "accelerator_count": 0}
    m = _HARDWARE_RE.match(value)
    if not m or (m["gpu"] and not m["count"]):
        raise FormError(
            f"hardware {value!r}: write auto, or MACHINE_TYPE:GPU_TYPE:GPU_COUNT such as g2-standard-12:NVIDIA_L4:1 "
            "(a machine type alone for a CPU-only machine)"
        )
    return {
        "machine_type": m["machine"],
        "accelerator_type": m["gpu"] or "",
        "accelerator_count": int(m["count"] or 0),
    }


def hardware_value(cfg: DeploymentConfig) -> str:
    """The config's shape in the form's notation."""
    hw = cfg.hardware
    if hw.is_auto:
        return "auto"
    return f"{hw.machine_type}:{hw.accelerator_type}:{hw.accelerator_count}" if hw.accelerator_type else hw.machine_type


def form_values(cfg: DeploymentConfig) -> dict[str, Any]:
    """The form as a config fills it in: a preset template's defaults, and what `vlp run CONFIG` submits."""
    return {
        "model_repo": cfg.model.repo,
        "model_revision": cfg.model.revision,
        "hf_token_secret": cfg.model.hf_token_secret,
        "engine": cfg.serving.engine,
        "target": cfg.target,
        "hardware": hardware_value(cfg),
        "max_model_len": cfg.serving.max_model_len or 0,
        "deployment_name": cfg.name,
        "endpoint_name": cfg.endpoint.name,
        "endpoint_kind": "dedicated" if cfg.endpoint.dedicated else "shared",
        "regions": ",".join(cfg.placement.regions),
        "teardown": cfg.teardown,
        "smoke_prompt": cfg.smoke_test.prompt,
        "smoke_expect": cfg.smoke_test.expect,
    }


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value


def _get(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _as_field_value(field: FormField, raw: Any) -> Any:
    """The form's value as the config holds it; KFP hands integers over as floats."""
    if field.kind is int:
        if isinstance(raw, float) and not raw.is_integer():
            raise FormError(f"{field.name} is {raw}: give a whole number")
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise FormError(f"{field.name} is {raw!r}: give a whole number") from None
    text = str(raw).strip()
    if field.name == "endpoint_kind":
        if text not in ("shared", "dedicated"):
            raise FormError(f"endpoint_kind is {text!r}: write shared or dedicated")
        return text == "dedicated"
    if field.name == "target" and text not in ("vertex", "cloud_run"):
        raise FormError(f"target is {text!r}: write vertex or cloud_run")
    if field.name == "regions":
        return [r.strip() for r in text.split(",") if r.strip()]
    if field.name == "hardware":
        return hardware_section(text)
    return text


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` on top of `base`: sections merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _plain(value: Any) -> Any:
    """KFP struct parameters arrive as dict-likes (protobuf Structs): plain dicts and lists from here on."""
    if hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def resolve_config(preset: Any, form: dict[str, Any], override: Any) -> dict[str, Any]:
    """The deployment config a run uses: preset, then the filled-in form fields, then `override` merged last."""
    unknown = set(form) - set(FIELD_NAMES)
    if unknown:
        raise FormError(f"unknown form fields {sorted(unknown)}; the form has {list(FIELD_NAMES)}")
    data = _plain(preset or {})
    for field in FORM_FIELDS:
        raw = form.get(field.name)
        if raw is None or raw == "" or (field.kind is int and raw == 0):
            continue  # not filled in: the layer below holds
        value = _as_field_value(field, raw)
        if field.name == "hardware":
            data["hardware"] = merge(data.get("hardware") if isinstance(data.get("hardware"), dict) else {}, value)
        else:
            _set(data, field.path, value)
    data = merge(data, _plain(override or {}))
    # Names follow the model when nobody gave one: a console user picks a model, not a label value.
    if not data.get("name") and _get(data, "model.repo"):
        data["name"] = name_from_repo(str(_get(data, "model.repo")))
    if not _get(data, "endpoint.name") and data.get("name"):
        _set(data, "endpoint.name", data["name"])
    if data.get("hardware") == "auto":
        data["hardware"] = {"machine_type": "auto"}
    return data
