"""A local Vertex AI API emulator that the real google-cloud-aiplatform clients talk to over REST.

`Emulator`, `create_emulator` and `ApiError` are read from the server module on first use (PEP 562): importing
the package for one of its modules (every service module does) must not import the server, which imports them
all back."""

from __future__ import annotations

from typing import Any

__all__ = ["ApiError", "Emulator", "create_emulator"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from vlp.pipelines.local.emulator import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
