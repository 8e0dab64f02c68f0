"""Google's system parameters: query parameters every Google REST API accepts besides the method's own fields
(cloud.google.com/apis/docs/system-parameters), each also spelled with a leading `$`. The emulator takes them off the
query before a method parses it (a method refuses names its request does not have), answers `fields` with a partial
response, and refuses an `alt` it does not produce."""

from __future__ import annotations

from typing import Any

from vlp.pipelines.local.emulator.errors import ApiError

# The page's list (HTTP and query forms): `$.xgafv`, access_token, alt, callback, fields, key, prettyPrint, quotaUser,
# upload_protocol, uploadType, and the deprecated userIp.
NAMES = {
    ".xgafv", "access_token", "alt", "callback", "fields", "key", "prettyPrint", "quotaUser", "upload_protocol",
    "uploadType", "userIp",
}  # fmt: skip


def split(query: dict[str, list[str]]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """(the method's own query, the system parameters given: name without `$` -> last value)."""
    own, system = {}, {}
    for key, values in query.items():
        name = key.removeprefix("$")
        if name in NAMES:
            system[name] = values[-1] if values else ""
        else:
            own[key] = values
    alt = system.get("alt", "json")
    if alt.split(";", 1)[0] != "json":
        # alt=media and alt=proto exist for some APIs; this emulator answers JSON only (unverified elsewhere: strict).
        raise ApiError("INVALID_ARGUMENT", f"Invalid value for system parameter alt: {alt!r}; this API answers alt=json.")
    return own, system


def _parse(text: str) -> dict[str, Any]:
    """`a,b.c,d(e,f/g)` -> {"a": {}, "b": {"c": {}}, "d": {"e": {}, "f": {"g": {}}}} ({} = the whole field)."""
    tree: dict[str, Any] = {}
    i = 0

    def selection(until: str) -> dict[str, Any]:
        nonlocal i
        out: dict[str, Any] = {}
        while i < len(text) and text[i] != until:
            start = i
            while i < len(text) and text[i] not in ",()":
                i += 1
            path = [p for p in text[start:i].replace("/", ".").split(".") if p.strip()]
            node = out
            for part in path:
                node = node.setdefault(part.strip(), {})
            if i < len(text) and text[i] == "(":
                i += 1
                node.update(selection(")"))
                if i >= len(text):
                    raise ApiError("INVALID_ARGUMENT", f"Invalid field selection {text!r}: unbalanced parentheses.")
                i += 1
            if i < len(text) and text[i] == ",":
                i += 1
        return out

    tree = selection("")
    if i != len(text):
        raise ApiError("INVALID_ARGUMENT", f"Invalid field selection {text!r}.")
    return tree


def _select(value: Any, tree: dict[str, Any]) -> Any:
    if not tree:
        return value
    if isinstance(value, list):
        return [_select(v, tree) for v in value]
    if isinstance(value, dict):
        return {k: _select(value[k], sub) for k, sub in tree.items() if k in value}
    return value


def partial(body: bytes, fields: str) -> bytes:
    """The JSON answer with only the fields `fields` selects (Google's partial response)."""
    import json

    if not fields.strip():
        return body
    return json.dumps(_select(json.loads(body or b"{}"), _parse(fields))).encode()
