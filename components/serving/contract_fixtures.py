"""What the pinned serving images accept, extracted from upstream source (scripts/contract_fixtures.py)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

_DIR = Path(__file__).resolve().parent.parent / "contract"  # components/contract


@cache
def fixture(engine: str) -> dict[str, Any]:
    """The fixture for the pinned image of `engine` ("vllm" or "tgi")."""
    name = {"vllm": "vllm-0.6.2.json", "tgi": "tgi-2.4.0.json"}[engine]
    return json.loads((_DIR / name).read_text())


def vllm_quantization_methods() -> list[str]:
    """vLLM's --quantization choices at the pinned version."""
    return list(fixture("vllm")["quantization_methods"])


def accepted_flags(engine: str) -> set[str]:
    """Every --flag the pinned engine's argument parser knows."""
    return set(fixture(engine)["flags"])


def accepted_env(engine: str) -> set[str]:
    """Every env name the pinned image reads (TGI: the launcher's env-backed options; vLLM: the image's own)."""
    data = fixture(engine)
    return set(data.get("env", [])) | set(data.get("image_env", []))
