"""Blue/green arithmetic both targets share: the traffic split that gives a new model or revision its share, and
the pause between canary steps."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vlp.components.deployment import Deployment

STEP_PAUSE_S = 60.0  # between canary steps: long enough for errors to show in monitoring


def split_with(new_id: str, percent: int, others: dict[str, int]) -> dict[str, int]:
    """A traffic split giving `percent` to new_id and the rest to the others in their current ratio."""
    rest = 100 - percent
    total = sum(others.values())
    split: dict[str, int] = {new_id: percent}
    if not others or rest == 0:
        return split if rest == 0 else {new_id: 100}
    ids = sorted(others)
    given = 0
    for i, dm in enumerate(ids):
        share = rest - given if i == len(ids) - 1 else round(rest * (others[dm] / total if total else 1 / len(ids)))
        split[dm] = share
        given += share
    return split


def step_pause(deployment: Deployment, pause_s: float | None = None) -> float:
    """Seconds between canary steps: `pause_s` when given, else STEP_PAUSE_S, or 1 s on the local stack (the canary
    logic is exercised, the minutes are not)."""
    if pause_s is not None:
        return pause_s
    return 1.0 if deployment.api_endpoint.startswith("http://") else STEP_PAUSE_S
