"""A live view of a run's steps: one line per step, redrawn in place on a terminal, one line per change elsewhere."""

from __future__ import annotations

import re
import threading
import time
from typing import Any, TextIO

# What kfp.local and Vertex call a task state, as the user reads it.
STATES = {
    "SUCCESS": "succeeded",
    "SUCCEEDED": "succeeded",
    "FAILURE": "failed",
    "FAILED": "failed",
    "RUNNING": "running",
    "PENDING": "waiting",
    "SKIPPED": "skipped",
    "CANCELLED": "cancelled",
    "NOT_TRIGGERED": "skipped",
}


# KFP names a component's task after its function (`mirror_weights_op` -> `mirror-weights-op`) and numbers the
# repeats (`mirror-weights-op-2`: the custom-job mirrors); DAG groups are `exit-handler-N`, `condition-N`,
# `condition-branches-N`.
_STEP = re.compile(r"^(?P<name>.+)-op(?P<repeat>-\d+)?$")


def is_step(task: str) -> bool:
    """Whether a task is a step (a container or custom job), not one of the DAG's groups."""
    return bool(_STEP.match(task))


def step_name(task: str) -> str:
    """The step name a person reads: kfp's task name without the `-op` suffix (a repeat keeps its number)."""
    match = _STEP.match(task)
    return f"{match['name']}{match['repeat'] or ''}" if match else task


class StepView:
    """Step states as they change. `live` (a terminal) redraws the block in place with elapsed times and the
    running step's latest output line; otherwise each change is printed once, so CI logs stay short."""

    def __init__(self, stream: TextIO, live: bool | None = None, refresh_s: float = 0.5) -> None:
        self.stream = stream
        self.live = bool(getattr(stream, "isatty", lambda: False)()) if live is None else live
        self.refresh_s = refresh_s
        self.steps: dict[str, dict[str, Any]] = {}
        self._drawn = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __enter__(self) -> StepView:
        if self.live:
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2)
        with self._lock:
            self._draw()

    def update(self, task: str, state: str, detail: str = "") -> None:
        """Record a step's state (kfp or Vertex spelling, or ours); prints or redraws."""
        name = step_name(task)
        state = STATES.get(state.upper().removeprefix("PIPELINE_TASK_STATE_").removeprefix("TASK_STATE_"), state)
        with self._lock:
            step = self.steps.setdefault(name, {"state": "", "since": time.monotonic(), "detail": ""})
            changed = step["state"] != state
            if changed:
                step.update(state=state, detail="")
                if state == "running":
                    step["since"] = time.monotonic()
                step["ended"] = time.monotonic() if state not in ("running", "waiting") else None
            if detail:
                step["detail"] = detail
            if self.live:
                self._draw()
            elif changed:
                self.stream.write(self._line(name, step) + "\n")
                self.stream.flush()

    def _line(self, name: str, step: dict[str, Any]) -> str:
        elapsed = ""
        if step["state"] in ("succeeded", "failed") or (step["state"] == "running" and self.live):
            end = step.get("ended") or time.monotonic()
            elapsed = f"{end - step['since']:6.1f}s"
        detail = f"  {step['detail'][:60]}" if step["state"] == "running" and step["detail"] and self.live else ""
        return f"  {name:<20} {step['state']:<10} {elapsed}{detail}".rstrip()

    def _draw(self) -> None:
        if not self.live:
            return
        # Move up over the block drawn last time, clear each line, draw again.
        out = "\x1b[F" * self._drawn
        out += "".join(f"\x1b[2K{self._line(n, s)}\n" for n, s in self.steps.items())
        self.stream.write(out)
        self.stream.flush()
        self._drawn = len(self.steps)

    def _tick(self) -> None:
        while not self._stop.wait(self.refresh_s):
            with self._lock:
                if any(s["state"] == "running" for s in self.steps.values()):
                    self._draw()
