"""A run never leaves a deployment worse than it found it: kills between any two API calls of promote, roll-back and
the exit handler, on both Vertex endpoint kinds and on Cloud Run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.test_cloud_run_target import run_config
from tests.test_local_run import emulator_state, run, tiny_config

MAX_CALLS = 30  # far more than any of these steps makes; a loop past it means the kill never fires


def serving(state_dir: Path, *, only: bool = False) -> dict[str, int]:
    """The one endpoint's traffic split, checked to be whole: every deployed model it names is deployed and the
    shares sum to 100; `only`: no other deployed model idles beside it (read from the emulator's persisted state)."""
    endpoints = list(emulator_state(state_dir).get("endpoints", {}).values())
    assert len(endpoints) == 1, endpoints
    [ep] = endpoints
    deployed = {dm["id"] for dm in ep.get("deployedModels", [])}
    split = {k: int(v) for k, v in ep.get("trafficSplit", {}).items() if int(v)}
    assert deployed, "the endpoint serves nothing"
    assert sum(split.values()) == 100 and set(split) <= deployed, (split, deployed)
    if only:
        assert set(split) == deployed, (split, deployed)
    return split


def model_versions(state_dir: Path) -> dict[str, dict[str, str]]:
    """MODEL@VERSION -> the version's labels."""
    out = {}
    for name, model in emulator_state(state_dir).get("models", {}).items():
        for vid, version in model.get("versions", {}).items():
            out[f"{name}@{vid}"] = version.get("labels", {})
    return out


def kill_at_every_call(
    state: Path, cfg: Any, model_dir: Path, step: str, check: Any, faults: tuple[str, ...] = ()
) -> list[str]:
    """Redeploy again and again, killing `step` after its 1st, 2nd, ... API call, until a run gets past the step's
    last call; `check(summary)` runs after each killed run. Returns what each check returned."""
    outcomes = []
    for calls in range(1, MAX_CALLS):
        summary = run(state, cfg, model_dir, force=True, faults=[*faults, f"kill-step:{step}@{calls}"])
        if f"step {step} was killed" not in (summary["error"] or ""):
            return outcomes
        assert "SIGKILL" in summary["error"], summary["error"]
        outcomes.append(check(summary))
    raise AssertionError(f"{step} was still killed after {MAX_CALLS} calls")


ENDPOINT_KINDS = {"shared": ("endpoint.traffic_steps=[50,100]",), "dedicated": ("endpoint.dedicated=true",)}


@pytest.mark.parametrize("kind", list(ENDPOINT_KINDS))
def test_a_kill_between_any_two_calls_of_promote_leaves_one_model_at_100(
    tmp_path: Path, tiny_model_dir: Path, kind: str
) -> None:
    state = tmp_path / "state"
    cfg = tiny_config("tiny", *ENDPOINT_KINDS[kind])
    first = run(state, cfg, tiny_model_dir)
    assert first["status"] == "succeeded", first["error"]
    before = {"split": serving(state)}

    def check(summary: dict[str, Any]) -> str:
        split = serving(state, only=True)
        [(serving_id, _)] = split.items()  # one model, at 100%, and nothing else deployed
        old = serving_id in before["split"]
        versions = model_versions(state)
        run_versions = [v for v, labels in versions.items() if labels.get("vlp-run") == summary["run"].lower()]
        if old:
            # Rolled back: the run's version went with its deployed model.
            assert run_versions == [], versions
        else:
            # Rolled forward: the run's promoted version holds the endpoint; the old one was retired.
            assert len(run_versions) == 1 and versions[run_versions[0]].get("vlp-promoted") == "true", versions
        before["split"] = split
        return "old" if old else "new"

    outcomes = kill_at_every_call(state, cfg, tiny_model_dir, "promote", check)
    print(f"promote killed after each of its {len(outcomes)} calls left: {outcomes}")
    # Both sides of the commit point were hit: early kills roll back, late ones roll forward.
    assert "old" in outcomes and "new" in outcomes, outcomes
    assert outcomes == sorted(outcomes, key=lambda o: o == "new"), outcomes
    # The next run converges: the serving model matches the config and answers, so nothing is redeployed.
    again = run(state, cfg, tiny_model_dir)
    assert again["status"] == "noop", again


def test_a_kill_between_any_two_calls_of_the_exit_handler_or_roll_back_keeps_the_old_model(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """A failed smoke test rolls back; a kill inside the roll-back hands over to the exit handler, and a kill inside
    the exit handler leaves whatever it had not yet removed: the old model keeps 100% throughout."""
    state = tmp_path / "state"
    cfg = tiny_config("tiny", "smoke_test.expect_regex=^(?!I am not sure)")
    first = run(state, cfg, tiny_model_dir)
    assert first["status"] == "succeeded", first["error"]
    old = serving(state)

    def check(summary: dict[str, Any]) -> str:
        assert serving(state) == old
        return "old"

    outcomes = kill_at_every_call(state, cfg, tiny_model_dir, "roll-back", check, faults=("smoke-fail",))
    # A smoke test killed leaves the new model for the exit handler, which is then killed at each of its calls.
    outcomes += kill_at_every_call(state, cfg, tiny_model_dir, "cleanup", check, faults=("kill-step:smoke-test",))
    assert len(outcomes) > 4, outcomes
    assert serving(state) == old
