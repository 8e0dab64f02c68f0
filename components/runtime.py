"""What every step does the same way at run time: logging, labels, fault points, user-facing errors."""

from __future__ import annotations

import logging
import os
import re
import signal
import sys

KILL_STEP_ENV = "VLP_INJECT_KILL_STEP"
# On a model version (Vertex) or a revision (Cloud Run): the weights revision and the serving spec hash, which is how
# the next run spots a no-op.
LABEL_REVISION = "vlp-revision"
LABEL_SPEC = "vlp-spec"

_LABEL_RE = re.compile(r"[^a-z0-9_-]+")


class StepError(RuntimeError):
    """A failure a person can act on: the message says what happened, which resource, and the fix."""


def setup_logging() -> logging.Logger:
    """One log format for every step, so Vertex's log view and the local run read the same."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout, force=True
    )
    # The google clients log request bodies at DEBUG; keep them quiet so nothing sensitive leaks.
    for noisy in ("urllib3", "google", "huggingface_hub", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return logging.getLogger("vlp")


def label_value(value: str) -> str:
    """A string made valid as a GCP label value (lowercase, [a-z0-9_-], at most 63 chars)."""
    return _LABEL_RE.sub("-", value.lower()).strip("-")[:63].rstrip("-") or "none"


def checkpoint(step: str) -> None:
    """A fault point: `vlp run --local --inject kill-step:STEP` kills the step here, after its main
    side effect, to prove the exit handler cleans up after a crashed step. `kill-step:STEP@N` kills it
    instead right after the N-th Google API call it makes from here on has been answered: between two
    calls, where a crash is most likely to leave a half-done change. `kill-step:STEP@Nw` counts only the calls that
    may change something (any method but GET and HEAD): a kill after a read leaves exactly what the kill after the
    write before it left, so a test that kills after every write has covered every state a kill can leave."""
    for wanted in os.environ.get(KILL_STEP_ENV, "").split(","):
        if wanted == step:
            _kill(f"fault injected: killing step {step}")
        name, _, calls = wanted.partition("@")
        writes = calls.endswith("w")
        calls = calls.removesuffix("w")
        if name == step and calls.isdigit():
            _kill_after_calls(step, int(calls), writes_only=writes)


def _kill(message: str) -> None:
    logging.getLogger("vlp").error(message)
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_after_calls(step: str, calls: int, writes_only: bool = False) -> None:
    """Count every HTTP request the step sends (the google clients' REST transports and the prediction session
    all go through requests), except token fetches from the metadata server, whose timing depends on caching;
    `writes_only`: and except GET and HEAD (a POST that only reads, such as :predict, still counts: counting too
    many kill points only repeats a state, counting too few would skip one)."""
    import requests

    send = requests.Session.send
    answered = 0

    def counting_send(self: requests.Session, request: requests.PreparedRequest, **kwargs: object) -> object:
        nonlocal answered
        response = send(self, request, **kwargs)
        if "/computeMetadata/" not in (request.url or "") and not (writes_only and request.method in ("GET", "HEAD")):
            answered += 1
            if answered >= calls:
                _kill(f"fault injected: killing step {step} after call {answered} ({request.method} {request.url})")
        return response

    requests.Session.send = counting_send  # type: ignore[method-assign]


def without_nulls(value: object) -> object:
    """The value with None-valued keys dropped: KFP parameters (protobuf Structs, as kfp.local
    builds them) cannot carry null, and every reader of these dicts treats missing as unset."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value if v is not None]
    return value


def deployed_version_name(deployed_model: object) -> str:
    """MODEL@VERSION for a DeployedModel: the bare model name answers with the default version, whose
    labels belong to whichever run registered it, not necessarily this deployed model's."""
    model = deployed_model.model  # type: ignore[attr-defined]
    version = getattr(deployed_model, "model_version_id", "")
    return f"{model}@{version}" if version and "@" not in model else model


def region_of(resource_name: str) -> str:
    """The location segment of projects/P/locations/L/... ."""
    parts = resource_name.split("/")
    return parts[parts.index("locations") + 1] if "locations" in parts else ""
