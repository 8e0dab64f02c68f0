"""The emulator's shared core: request parsing into protos, long-running operation packing, list filters and
pages, field masks, and the route type every service module declares its routes with."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from google.longrunning import operations_pb2
from google.protobuf import field_mask_pb2, json_format

from vlp.pipelines.local.emulator.errors import ApiError

_LOG = logging.getLogger(__name__)

STATE_FILE = "emulator-state.json"
_ID_BASE = 1_000_000_000_000_000_000  # 19-digit ids, the shape Vertex uses for models and endpoints

_LOC = r"/v1/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)"
_ALIAS_RE = re.compile(r"^[a-z][a-zA-Z0-9-]{0,126}[a-z0-9]$|^[a-z]$")
_RESOURCE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _to_dict(pb: Any) -> dict[str, Any]:
    return json_format.MessageToDict(pb)


def _conform(proto_cls: Any, data: dict[str, Any]) -> dict[str, Any]:
    """Round-trip through the proto so every answer has exactly the shape a client will parse."""
    return _to_dict(json_format.ParseDict(data, proto_cls.pb()()))


def _parse_request(
    proto_cls: Any,
    body: bytes,
    *,
    body_field: str | None = "*",
    query: dict[str, list[str]] | None = None,
    path_fields: dict[str, str] | None = None,
) -> Any:
    """Parse body + query + path into the request proto, rejecting unknown or mistyped fields as Vertex does."""
    # proto-plus classes expose .pb(); plain protobuf classes (longrunning) are used as they are.
    pb_cls = proto_cls.pb() if hasattr(proto_cls, "pb") else proto_cls
    msg = pb_cls()
    text = body.decode("utf-8") if body else ""
    try:
        if body_field == "*" and text.strip():
            json_format.Parse(text, msg, ignore_unknown_fields=False)
        elif body_field and body_field != "*" and text.strip():
            json_format.Parse(text, getattr(msg, body_field), ignore_unknown_fields=False)
        if query:
            # Query values arrive as strings; json_format accepts strings for numbers and field masks.
            flat = {k: v[0] for k, v in query.items() if not k.startswith("$") and v}
            extra = pb_cls()
            json_format.ParseDict(flat, extra, ignore_unknown_fields=False)
            msg.MergeFrom(extra)
    except (json_format.ParseError, UnicodeDecodeError, ValueError) as exc:
        raise ApiError("INVALID_ARGUMENT", f"Invalid JSON payload received. {exc}") from exc
    for field, value in (path_fields or {}).items():
        setattr(msg, field, value)
    return msg


def _pack_op(
    name: str,
    metadata: Any,
    *,
    response: Any | None = None,
    error: ApiError | None = None,
    done: bool = False,
) -> dict[str, Any]:
    op = operations_pb2.Operation(name=name, done=done)
    op.metadata.Pack(metadata)
    if error is not None:
        op.done = True
        op.error.code = error.rpc_code
        op.error.message = error.message
    elif response is not None:
        op.done = True
        op.response.Pack(response)
    return json_format.MessageToDict(op)


def _generic_meta(meta_cls: Any, created: str) -> Any:
    meta = meta_cls.pb()()
    json_format.ParseDict({"genericMetadata": {"createTime": created, "updateTime": _now()}}, meta)
    return meta


_FILTER_TERM = re.compile(r'^\s*(?P<key>[A-Za-z_][A-Za-z0-9_.\-]*)\s*(?P<op>!=|=|:)\s*(?P<value>"[^"]*"|\S+)\s*$')


def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _filter_items(items: list[dict[str, Any]], expr: str) -> list[dict[str, Any]]:
    """Apply the subset of AIP-160 filters the SDK and our pipelines send: `a=b AND labels.k="v"`."""
    if not expr.strip():
        return items
    terms = []
    for raw in re.split(r"\s+AND\s+", expr.strip()):
        m = _FILTER_TERM.match(raw)
        if not m:
            raise ApiError("INVALID_ARGUMENT", f"Unsupported filter term {raw!r} in filter {expr!r}.")
        value = m["value"]
        if value.startswith('"'):
            value = value[1:-1]
        terms.append((m["key"], m["op"], value))

    def lookup(item: dict[str, Any], key: str) -> Any:
        if key.startswith("labels."):
            return item.get("labels", {}).get(key[len("labels.") :])
        return item.get(_camel(key))

    def matches(item: dict[str, Any]) -> bool:
        for key, op, value in terms:
            have = lookup(item, key)
            if op == ":":
                ok = have is not None and (value == "*" or value in str(have))
            else:
                ok = have is not None and str(have) == value
                ok = ok if op == "=" else not ok
            if not ok:
                return False
        return True

    return [item for item in items if matches(item)]


def _paginate(items: list[Any], page_size: int, page_token: str) -> tuple[list[Any], str]:
    start = int(page_token) if page_token.isdigit() else 0
    size = page_size if page_size > 0 else 100
    page = items[start : start + size]
    nxt = str(start + size) if start + size < len(items) else ""
    return page, nxt


def _apply_mask(dest: dict[str, Any], src: dict[str, Any], paths: Iterable[str]) -> None:
    """Copy each masked field from src into dest (absent in src means cleared), as UpdateX does."""
    for path in paths:
        parts = [_camel(p) for p in path.split(".")]
        d, s = dest, src
        for part in parts[:-1]:
            d = d.setdefault(part, {})
            s = s.get(part, {}) if isinstance(s, dict) else {}
        if parts[-1] in s:
            d[parts[-1]] = s[parts[-1]]
        else:
            d.pop(parts[-1], None)


def _check_mask(mask: field_mask_pb2.FieldMask, descriptor: Any) -> list[str]:
    if not mask.paths:
        raise ApiError("INVALID_ARGUMENT", "update_mask is required and must name at least one field.")
    if not mask.IsValidForDescriptor(descriptor):
        raise ApiError("INVALID_ARGUMENT", f"update_mask {list(mask.paths)} names unknown fields.")
    return list(mask.paths)


def _engine(spec: dict[str, Any]) -> str:
    from vlp.pipelines.local.emulator.engine_routes import engine_for

    return engine_for(spec)


def _machine_memory_gb(machine_type: str) -> float | None:
    # Machine sizes are Compute Engine facts (cloud.google.com/compute/docs/gpus); the project's catalog records them.
    from vlp.components.planning.catalog import MACHINE_TYPES

    machine = MACHINE_TYPES.get(machine_type)
    return machine.memory_gb if machine else None


_MODEL_ARG = re.compile(r"^--model=(gs://\S+)$")
# `--model=ORG/NAME`: a Hub repo the Model Garden vLLM image downloads itself (its notebooks' default), with the
# container's HF_TOKEN for a gated one.
_HUB_MODEL_ARG = re.compile(r"^--model=([A-Za-z0-9][\w.-]*/[\w.-]+)$")
HUB_SCHEME = "hf://"


def _weights_source(version: dict[str, Any]) -> str:
    """Where the serving container reads weights: Vertex's copy of artifactUri (AIP_STORAGE_URI), else a
    `--model=gs://…` argument, which the Model Garden vLLM image downloads itself (Model Garden's recipe), a
    `--model=ORG/NAME` Hub repo it downloads from the Hub (hf://ORG/NAME here: the stack's Hub mirror), or the gs://
    model of `vllm serve`, which vLLM's own image streams."""
    if version.get("artifactUri"):
        return str(version["artifactUri"])
    spec = version.get("containerSpec", {})
    engine = _engine(spec)
    for arg in spec.get("args", []):
        match = _MODEL_ARG.match(str(arg))
        if match and engine in ("vllm", "vllm-openai"):
            return match.group(1)
        hub = _HUB_MODEL_ARG.match(str(arg))
        if hub and engine in ("vllm", "vllm-openai"):
            return HUB_SCHEME + hub.group(1)
        # `vllm serve gs://…` (vLLM's own image streams it with --load-format runai_streamer).
        if engine == "vllm-openai" and str(arg).startswith("gs://"):
            return str(arg)
    return ""


class _Route:
    def __init__(self, method: str, pattern: str, handler: Callable[..., Any]) -> None:
        self.method = method
        self.regex = re.compile("^" + pattern + "$")
        self.handler = handler
