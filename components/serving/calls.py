"""How a serving container is called, on either target: the HTTP session (ADC, or the local stack through a
loopback adapter), the error a call raises, and a reply parsed the same way for every engine and route."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


class EndpointError(RuntimeError):
    """An endpoint or deployed model that cannot be called as asked; the message says why and the fix."""


def is_local(api_endpoint: str) -> bool:
    """True for a plain-HTTP emulator on loopback (the local stack)."""
    from vlp.components.clients import api_endpoint as resolve

    return resolve(api_endpoint).startswith("http://")


def loopback_adapter(emulator_url: str) -> Any:
    """A transport adapter that sends https://HOST/PATH to the emulator, keeping HOST in the Host header.

    Prediction URLs are built exactly as for Google (regional host, or a dedicated endpoint's own DNS); the
    emulator sees which host was called and refuses the wrong one, as Vertex does."""
    from urllib.parse import urlsplit

    from requests.adapters import HTTPAdapter

    class _ToEmulator(HTTPAdapter):
        def send(self, request: Any, **kwargs: Any) -> Any:
            parts = urlsplit(request.url)
            request.headers["Host"] = parts.netloc
            request.url = emulator_url.rstrip("/") + parts.path + (f"?{parts.query}" if parts.query else "")
            return super().send(request, **kwargs)

    return _ToEmulator()


def http_session(api_endpoint: str = "") -> Any:
    """A requests session that authenticates as the Vertex SDK does (ADC), or, for the emulator, as the process's
    account from the local metadata server."""
    from google.auth.transport.requests import AuthorizedSession

    from vlp.components.clients import api_endpoint as resolve
    from vlp.components.clients import local_credentials

    if is_local(api_endpoint):
        session = AuthorizedSession(local_credentials())
        session.mount("https://", loopback_adapter(resolve(api_endpoint)))
        return session
    import google.auth

    creds, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
    return AuthorizedSession(creds)


@dataclass
class Reply:
    answer: str
    finish_reason: str
    tokens: dict[str, int]
    raw: str


def parse_reply(engine: str, route_kind: str, data: Any) -> Reply:
    raw = json.dumps(data)[:4000]
    if route_kind == "chat":
        choice = (data.get("choices") or [{}])[0]
        content = (choice.get("message") or {}).get("content") or ""
        usage = data.get("usage") or {}
        tokens = {k: int(usage[k]) for k in ("prompt_tokens", "completion_tokens", "total_tokens") if k in usage}
        return Reply(str(content), str(choice.get("finish_reason") or ""), tokens, raw)
    # :predict (TGI DLC's Vertex route): predictions are the generated texts themselves.
    predictions = data.get("predictions") or [""]
    first = predictions[0]
    if isinstance(first, dict):  # a chat-shaped prediction, as the vLLM Model Garden handler answers chat
        return parse_reply(engine, "chat", first)
    return Reply(str(first), "", {}, raw)
