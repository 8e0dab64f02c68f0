"""A run never leaves a deployment worse than it found it: kills between any two API calls of promote, roll-back and
the exit handler, on both Vertex endpoint kinds and on Cloud Run."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.processes import processes_naming
from tests.test_cloud_run_target import run_config
from tests.test_local_run import emulator_state, run, tiny_config

# Whole runs on the local stack (minutes each): left out of `make test-fast`.
pytestmark = pytest.mark.slow

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
        # Serving copies of the weights go with their deployed models (the logs stay).
        copies = {p.name for p in (state_dir / "emulator" / "serving").iterdir() if p.is_dir()}
        assert copies == deployed, (copies, deployed)
    return split


def model_versions(state_dir: Path) -> dict[str, dict[str, str]]:
    """MODEL@VERSION -> the version's labels."""
    out = {}
    for name, model in emulator_state(state_dir).get("models", {}).items():
        for vid, version in model.get("versions", {}).items():
            out[f"{name}@{vid}"] = version.get("labels", {})
    return out


def default_is_serving(state_dir: Path) -> bool:
    """Whether the model's `default` version is the one that holds the endpoint's traffic: an untested version never
    becomes the default (register leaves the alias to promote), and a tested one does even if promote died after
    switching (the exit handler finishes it)."""
    state = emulator_state(state_dir)
    [ep] = state.get("endpoints", {}).values()
    split = {k for k, v in ep.get("trafficSplit", {}).items() if int(v) == 100}
    [holder] = [dm for dm in ep.get("deployedModels", []) if dm["id"] in split]
    model = state["models"][holder["model"].split("@")[0]]
    defaults = [vid for vid, v in model["versions"].items() if "default" in v.get("versionAliases", [])]
    return defaults == [holder.get("modelVersionId") or holder["model"].split("@")[1]]


def killed(summary: dict[str, Any], step: str) -> bool:
    """Whether the fault killed `step` (the run's error names only the first step that failed)."""
    ran = [s for s in summary["steps"] if s["name"] == step]
    return bool(ran) and "fault injected: killing step" in Path(ran[0]["log"]).read_text()


def kill_at_every_call(
    state: Path, cfg: Any, model_dir: Path, step: str, check: Any, faults: tuple[str, ...] = ()
) -> list[str]:
    """Redeploy again and again, killing `step` before its first API call (at its checkpoint, which these steps pass
    before any call), then right after its 1st, 2nd, ... call that may change something (any but a GET:
    `kill-step:STEP@Nw`), until a run gets past the step's last one; `check(summary)` runs after each killed run.
    Returns what each check returned. A kill after a read leaves what the kill after the write before it left (or,
    before the first write, the kill before any call): the step's memory dies either way. So these are every state a
    kill between two calls can leave, in about half the runs."""
    outcomes = []
    for calls in range(MAX_CALLS):
        at = f"@{calls}w" if calls else ""
        summary = run(state, cfg, model_dir, force=True, faults=[*faults, f"kill-step:{step}{at}"])
        if not killed(summary, step):
            return outcomes
        outcomes.append(check(summary))
    raise AssertionError(f"{step} was still killed after {MAX_CALLS} calls")


ENDPOINT_KINDS = {"shared": ("endpoint.traffic_steps=[50,100]",), "dedicated": ("endpoint.dedicated=true",)}


@pytest.mark.parametrize("kind", list(ENDPOINT_KINDS))
def test_a_kill_between_any_two_calls_of_promote_leaves_one_model_at_100(
    tmp_path: Path, tiny_model_dir: Path, kind: str, keep_stack_up: Callable[[Path], None]
) -> None:
    state = tmp_path / "state"
    keep_stack_up(state)  # a dozen runs on one state dir: one stack for all of them
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
        assert default_is_serving(state), model_versions(state)
        return "old" if old else "new"

    outcomes = kill_at_every_call(state, cfg, tiny_model_dir, "promote", check)
    print(f"promote killed after each of its {len(outcomes)} calls left: {outcomes}")
    # Both sides of the commit point were hit: early kills roll back, late ones roll forward.
    assert "old" in outcomes and "new" in outcomes, outcomes
    assert outcomes == sorted(outcomes, key=lambda o: o == "new"), outcomes
    # The next run converges: the serving model matches the config and answers, so nothing is redeployed.
    again = run(state, cfg, tiny_model_dir)
    assert again["status"] == "noop", again


def _failing_redeploy_setup(
    tmp_path: Path, tiny_model_dir: Path, keep_stack_up: Callable[[Path], None]
) -> tuple[Path, Any, dict[str, int]]:
    """A state dir whose endpoint serves a first run's model, and the config whose redeploys the tests below fail."""
    state = tmp_path / "state"
    keep_stack_up(state)
    cfg = tiny_config("tiny", "smoke_test.expect_regex=^(?!I am not sure)")
    first = run(state, cfg, tiny_model_dir)
    assert first["status"] == "succeeded", first["error"]
    return state, cfg, serving(state)


# The roll-back and the exit-handler halves are two tests (they were one), so that parallel workers run them side by
# side: each starts from its own first run, and every assertion of the one test is kept.
def test_a_kill_between_any_two_calls_of_roll_back_keeps_the_old_model(
    tmp_path: Path, tiny_model_dir: Path, keep_stack_up: Callable[[Path], None]
) -> None:
    """A failed smoke test rolls back; a kill inside the roll-back hands over to the exit handler: the old model
    keeps 100% throughout."""
    state, cfg, old = _failing_redeploy_setup(tmp_path, tiny_model_dir, keep_stack_up)

    def rolled_back(summary: dict[str, Any]) -> str:
        assert summary["status"] == "failed"
        assert serving(state, only=True) == old
        assert default_is_serving(state), model_versions(state)
        return "old"

    outcomes = kill_at_every_call(state, cfg, tiny_model_dir, "roll-back", rolled_back, faults=("smoke-fail",))
    assert len(outcomes) >= 3, outcomes


def test_a_kill_between_any_two_calls_of_the_exit_handler_keeps_the_old_model(
    tmp_path: Path, tiny_model_dir: Path, keep_stack_up: Callable[[Path], None]
) -> None:
    """A kill inside the exit handler leaves whatever it had not yet removed: the old model keeps its traffic, and
    the next run converges."""
    state, cfg, old = _failing_redeploy_setup(tmp_path, tiny_model_dir, keep_stack_up)

    def partly_cleaned(summary: dict[str, Any]) -> str:
        # Nothing runs after the exit handler: what it had not removed yet stays (the candidate at its canary share
        # on a shared endpoint, until a run promotes or `vlp gc`), but the old model never loses its traffic.
        split = serving(state)
        [(old_id, _)] = old.items()
        assert split.get(old_id, 0) > 50, split
        # Each killed handler leaves its candidate; the next canary takes its share from all of them in their ratio.
        assert all(0 < share <= cfg.endpoint.canary_percent for dm, share in split.items() if dm != old_id), split
        return "old" if split == old else "candidate left"

    # A killed smoke test leaves the new model to the exit handler, which is then killed at each of its calls.
    outcomes = kill_at_every_call(
        state, cfg, tiny_model_dir, "cleanup", partly_cleaned, faults=("kill-step:smoke-test",)
    )
    assert "candidate left" in outcomes, outcomes
    # The next run converges: its promote retires whatever a killed exit handler left.
    again = run(state, cfg, tiny_model_dir, force=True)
    assert again["status"] == "succeeded", again["error"]
    assert len(serving(state, only=True)) == 1


def test_a_kill_between_any_two_calls_of_promote_service_leaves_one_revision_at_100(
    tmp_path: Path, tiny_model_dir: Path, keep_stack_up: Callable[[Path], None]
) -> None:
    state = tmp_path / "state"
    keep_stack_up(state)
    cfg = run_config("tiny-run", "endpoint.traffic_steps=[50,100]")
    first = run(state, cfg, tiny_model_dir)
    assert first["status"] == "succeeded", first["error"]
    before = {"serving": [r["name"] for r in first["revisions"] if r["traffic_percent"] == 100]}

    def check(summary: dict[str, Any]) -> str:
        held = {r["name"]: r["traffic_percent"] for r in summary["revisions"] if r["traffic_percent"]}
        assert list(held.values()) == [100], summary["revisions"]
        assert not any(r.get("tag") for r in summary["revisions"]), summary["revisions"]  # no candidate left
        old = list(held) == before["serving"]
        before["serving"] = list(held)
        return "old" if old else "new"

    outcomes = kill_at_every_call(state, cfg, tiny_model_dir, "promote-service", check)
    print(f"promote-service killed after each of its {len(outcomes)} calls left: {outcomes}")
    assert len(outcomes) >= 3, outcomes  # a read, the 50% step, the 100% step at least
    again = run(state, cfg, tiny_model_dir)
    assert again["status"] == "noop", again


def test_two_runs_on_one_state_dir_one_refuses_naming_the_other(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Started together: the second to take the lock exits 2 at once, naming the holder; the first runs to the end."""
    import subprocess
    import sys

    from tests.test_local_run import ROOT, TINY_REPO

    state = tmp_path / "state"
    sets = [f"model.repo={TINY_REPO}", "smoke_test.expect=", "smoke_test.max_tokens=8", "serving.max_model_len=512"]
    command = [
        sys.executable, "-m", "vlp.pipelines.cli", "run", "--local", str(ROOT / "configs" / "local-demo.yaml"),
        "--model-dir", str(tiny_model_dir), "--state-dir", str(state), *(a for s in sets for a in ("--set", s)),
    ]  # fmt: skip
    runs = [
        subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"
    ]
    outputs = [p.communicate(timeout=600) for p in runs]  # both read to the end: no pipe fills up
    results = [(p.returncode, out, err) for p, (out, err) in zip(runs, outputs, strict=True)]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], [(code, err[-2000:]) for code, _, err in results]
    refused = next(err for code, _, err in results if code == 2)
    winner = next(p for p, (code, _, _) in zip(runs, results, strict=True) if code == 0)
    assert f"is in use by vlp run --local of deployment smollm2-demo (pid {winner.pid}" in refused, refused
    assert "--state-dir" in refused and "Traceback" not in refused
    # One run's resources, one summary: the refused run started nothing and wrote nothing.
    assert len(list((state / "logs").glob("*/run.log"))) == 1


def test_a_killed_run_leaves_no_stale_lock(tmp_path: Path) -> None:
    import subprocess
    import sys

    from vlp.pipelines.local.peers import StateDirBusy, lock_state_dir

    state = tmp_path / "state"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from vlp.pipelines.local.peers import "
         "lock_state_dir; held = lock_state_dir(Path(sys.argv[1]), 'a test run'); print('held', flush=True); time.sleep(60)",
         str(state)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    with pytest.raises(StateDirBusy, match=rf"in use by a test run \(pid {holder.pid}, since"):
        lock_state_dir(state, "another")
    holder.kill()
    holder.wait()
    lock_state_dir(state, "after the kill").close()  # flock dies with its process


def test_a_refused_run_names_the_holder_even_in_the_instant_before_it_writes_its_name(tmp_path: Path) -> None:
    """The race CI met: the winner has the flock but has not yet written who it is (the file is empty, or still names
    the previous, ended holder). The refusal must still name the live holder, not '(pid ?)' or a dead pid."""
    import fcntl
    import json
    import os
    import subprocess
    import sys
    import threading
    import time

    from vlp.pipelines.local.peers import StateDirBusy, lock_state_dir

    state = tmp_path / "state"
    state.mkdir()
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(ended.stdout)
    (state / "lock").write_text(json.dumps({"holder": "an ended run", "pid": dead_pid, "since": "earlier"}))
    winner = (state / "lock").open("a+", encoding="utf-8")
    fcntl.flock(winner, fcntl.LOCK_EX | fcntl.LOCK_NB)  # locked, the previous holder's name still in the file

    def write_name_late() -> None:
        time.sleep(0.5)
        winner.seek(0)
        winner.truncate()
        winner.write(json.dumps({"holder": "the winner", "pid": os.getpid(), "since": "now"}))
        winner.flush()

    writer = threading.Thread(target=write_name_late)
    writer.start()
    try:
        with pytest.raises(StateDirBusy, match=rf"in use by the winner \(pid {os.getpid()}, since now\)"):
            lock_state_dir(state, "the loser")
    finally:
        writer.join()
        winner.close()


def _start_run(state: Path, model_dir: Path, summary: Path, *more_sets: str) -> Any:
    import subprocess
    import sys

    from tests.test_local_run import ROOT, TINY_REPO

    sets = [f"model.repo={TINY_REPO}", "smoke_test.expect=", "smoke_test.max_tokens=8", "serving.max_model_len=512"]
    sets += more_sets
    command = [
        sys.executable, "-m", "vlp.pipelines.cli", "run", "--local", str(ROOT / "configs" / "local-demo.yaml"),
        "--model-dir", str(model_dir), "--state-dir", str(state), "--summary-json", str(summary),
        *(a for s in sets for a in ("--set", s)),
    ]  # fmt: skip
    # A session of its own, as a terminal's foreground job: a signal to the group reaches what a Ctrl-C reaches.
    return subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _wait_for_step(state: Path, op: str, process: Any, timeout_s: float = 300) -> None:
    import json
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for record in state.glob(f"records/*/{op}.json"):
            if json.loads(record.read_text() or "{}").get("status") == "running":
                return
        assert process.poll() is None, process.communicate()[0][-3000:]
        time.sleep(0.2)  # polling a file another process writes; no readiness signal exists for it
    raise AssertionError(f"{op} never ran")


@pytest.mark.parametrize(("sig", "op"), [("SIGTERM", "deploy_model_op"), ("SIGINT", "smoke_test_op")])
def test_a_signal_stops_the_run_like_a_failed_step(tmp_path: Path, tiny_model_dir: Path, sig: str, op: str) -> None:
    import json
    import os
    import signal

    from tests.test_local_run import vertex_resources

    state, summary_path = tmp_path / "state", tmp_path / "summary.json"
    process = _start_run(state, tiny_model_dir, summary_path)
    _wait_for_step(state, op, process)
    os.killpg(process.pid, signal.Signals[sig])
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 128 + signal.Signals[sig], output[-3000:]
    assert "Send it again to stop at once" in output
    summary = json.loads(summary_path.read_text())
    assert summary["interrupted"] == sig and summary["status"] == "failed"
    step = op.removesuffix("_op").replace("_", "-")
    assert summary["error"].startswith(f"the run was stopped by {sig} during step {step}"), summary["error"]
    assert "the exit handler removed what the run created" in summary["error"], summary["error"]
    # The exit handler ran; no step after the stopped one did.
    names = [s["name"] for s in summary["steps"]]
    assert names[-1] == "cleanup" and summary["steps"][-1]["status"] == "succeeded", summary["steps"]
    assert "promote" not in names
    assert vertex_resources(state) == {"models": [], "endpoints": [], "deployed_models": []}
    assert summary["left_running"] == []
    assert processes_naming(state) == []


def test_a_signal_during_the_mirror_custom_job_cancels_the_job(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A run stopped while its big-model mirror runs as a Vertex custom job: GCPC's launcher cancels the job on
    SIGTERM (its ExecutionContext), so nothing paid is left running; the job's replica processes are gone."""
    import json
    import os
    import signal
    import time

    from tests.test_local_run import emulator_state

    state, summary_path = tmp_path / "state", tmp_path / "summary.json"
    process = _start_run(state, tiny_model_dir, summary_path, "model.mirror_job_above_gb=0")
    _wait_for_step(state, "mirror_weights_op", process)
    deadline = time.monotonic() + 120
    while not any(j.get("state") == "JOB_STATE_RUNNING" for j in emulator_state(state).get("customJobs", {}).values()):
        assert time.monotonic() < deadline and process.poll() is None, "the mirror's custom job never ran"
        time.sleep(0.1)  # the emulator's state file is the only witness of the job's state from outside
    os.killpg(process.pid, signal.SIGTERM)
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["interrupted"] == "SIGTERM" and summary["status"] == "failed"
    (job,) = emulator_state(state)["customJobs"].values()
    assert job["state"] == "JOB_STATE_CANCELLED", job["state"]
    assert any(c.startswith("POST ") and c.endswith(":cancel") and "/customJobs/" in c for c in summary["api_calls"])
    assert summary["left_running"] == []
    assert processes_naming(state) == []


def test_a_second_signal_stops_at_once_and_says_what_may_be_left(tmp_path: Path, tiny_model_dir: Path) -> None:
    import json
    import os
    import signal

    state, summary_path = tmp_path / "state", tmp_path / "summary.json"
    process = _start_run(state, tiny_model_dir, summary_path)
    _wait_for_step(state, "smoke_test_op", process)
    os.killpg(process.pid, signal.SIGTERM)
    _wait_for_step(state, "cleanup_op", process)
    os.killpg(process.pid, signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "SIGTERM again: stopping at once" in output
    summary = json.loads(summary_path.read_text())
    assert "stopped again before the exit handler finished: what it may have left: " in summary["error"]
    # Whatever the handler had not removed yet is named (the deployed model, unless it was already gone).
    for name in summary["left_running"]:
        assert name in summary["error"]
    assert processes_naming(state) == []


def test_a_broken_serving_model_does_not_block_its_replacement(tmp_path: Path, tiny_model_dir: Path) -> None:
    """On a shared endpoint the new model is tested as a 5% canary, so most smoke requests reach the old model. When
    the old model is broken (503), those failures must not count against the new one's attempts."""
    state = tmp_path / "state"
    # smoke_test.attempts=3: without the fix, 3 failed requests roll the new model back. The broken model answers 503
    # for good, so preflight's health probe need not wait the 90 s a restarting container gets.
    cfg = tiny_config("tiny", "endpoint.health_wait_s=5")
    first = run(state, cfg, tiny_model_dir)
    assert first["status"] == "succeeded", first["error"]
    [old] = first["deployed_models"]
    # Break the old model's copy of its weights (same size, so the emulator's restart keeps it): it answers 503.
    weights = state / "emulator" / "serving" / old["id"] / "model" / "model.safetensors"
    weights.write_bytes(bytes(weights.stat().st_size))
    second = run(state, cfg, tiny_model_dir)
    # Not a no-op: preflight's health probe found the serving model broken, so the same revision is redeployed.
    assert second["status"] == "succeeded", second["error"]
    [new] = second["deployed_models"]
    assert new["id"] != old["id"] and new["traffic_percent"] == 100
    assert any(c.endswith(":rawPredict") for c in second["api_calls"])


def test_a_kill_between_any_two_calls_of_a_cloud_run_roll_back_keeps_the_old_revision_at_100(
    tmp_path: Path, tiny_model_dir: Path, keep_stack_up: Callable[[Path], None]
) -> None:
    """Cloud Run refuses to take the serving revision's template back when it is not the one that made it
    (revision-conflict: Knative's name check, as users meet it): the roll-back moves the traffic alone. Killed after
    any of its calls, the exit handler that runs next does the same; the old revision keeps 100% and no other
    revision is left serving; the next forced run deploys and promotes a new one. (Killing the exit handler itself
    at each call too, on Cloud Run, would add a minute and a half to a suite at its 10-minute line.)"""
    step, faults = "roll-back-service", ("smoke-fail",)
    state = tmp_path / "state"
    # Room for the candidates a killed exit handler leaves behind their tags (a tag holds quota until `vlp gc`).
    (state / "emulator").mkdir(parents=True)
    quotas = {
        "CpuAllocPerProjectRegion": {"us-central1": 12 * 4000},
        "MemAllocPerProjectRegion": {"us-central1": 12 * 16 * 2**30},
        "NvidiaL4GpuAllocNoZonalRedundancyPerProjectRegion": {"us-central1": 12},
    }
    (state / "emulator" / "quotas.json").write_text(json.dumps({"quotas": quotas, "default": 8}))
    keep_stack_up(state)
    cfg = run_config("tiny-run", "smoke_test.expect_regex=^(?!I am not sure)")
    first = run(state, cfg, tiny_model_dir)
    assert first["status"] == "succeeded", first["error"]
    [old] = [r["name"] for r in first["revisions"] if r["traffic_percent"] == 100]

    def kept(summary: dict[str, Any]) -> str:
        assert summary["status"] == "failed"
        held = {r["name"]: r["traffic_percent"] for r in summary["revisions"] if r["traffic_percent"]}
        assert held == {old: 100}, summary["revisions"]
        return "old"

    outcomes = kill_at_every_call(state, cfg, tiny_model_dir, step, kept, faults=(*faults, "revision-conflict"))
    assert len(outcomes) >= 2, outcomes
    again = run(state, cfg, tiny_model_dir, force=True)
    assert again["status"] == "succeeded", again["error"]
    held = {r["name"]: r["traffic_percent"] for r in again["revisions"] if r["traffic_percent"]}
    assert list(held.values()) == [100] and old not in held, again["revisions"]


def _emulator_pid(state: Path, marker: bytes = b"vlp.pipelines.local.emulator") -> int:
    """The stack's Vertex AI emulator process (its command line names the state dir), or another peer's (`marker`:
    a word of its command line)."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if marker in cmdline and str(state).encode() in cmdline:
            return int(proc.name)
    raise AssertionError(f"no process of {marker.decode()} names {state}")


# fake-gcs-server killed the same way also passes, but takes ~200 s on these machines: google-cloud-storage retries a
# refused connection for its default 120 s deadline in each step that reads the bucket. The naming is the same code.
@pytest.mark.parametrize(("marker", "named", "log"), [(b"olah", "the Hub mirror", "hub-mirror.log")], ids=["hub-mirror"])
def test_a_run_whose_hub_mirror_dies_names_it_in_its_summary(
    tmp_path: Path, tiny_model_dir: Path, marker: bytes, named: str, log: str
) -> None:
    """kill -9 of the Hub mirror while preflight runs: the mirror step after it cannot work, and the summary (the
    emulator still answers) names the peer that died and its log before the step's own error."""
    import json
    import os
    import signal

    state, summary_path = tmp_path / "state", tmp_path / "summary.json"
    process = _start_run(state, tiny_model_dir, summary_path)
    _wait_for_step(state, "preflight_op", process)
    os.kill(_emulator_pid(state, marker), signal.SIGKILL)
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 1, output[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "failed"
    assert f"{named} (its log: " in summary["stack_error"] and log in summary["stack_error"], summary["stack_error"]
    assert summary["error"].startswith(summary["stack_error"])
    assert "preflight.log" in {p.name for p in Path(summary["log_dir"]).iterdir()}
    assert processes_naming(state) == []


def test_a_run_whose_emulator_dies_still_writes_its_summary_and_step_logs(tmp_path: Path, tiny_model_dir: Path) -> None:
    """kill -9 of the stack's emulator during a step: the run fails, and still writes --summary-json and every step
    log, naming the peer that died and its log (issue 37: the runner asked the dead emulator for the summary first)."""
    import json
    import os
    import signal

    state, summary_path = tmp_path / "state", tmp_path / "summary.json"
    process = _start_run(state, tiny_model_dir, summary_path)
    _wait_for_step(state, "register_model_op", process)
    os.kill(_emulator_pid(state), signal.SIGKILL)
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 1, output[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "failed"
    assert "the Vertex AI emulator (its log: " in summary["stack_error"] and "emulator.log" in summary["stack_error"]
    assert summary["error"].startswith(summary["stack_error"])  # the cause first, then the step's own error
    logs = Path(summary["log_dir"])
    assert {"preflight.log", "register-model.log"} <= {p.name for p in logs.iterdir()}, sorted(logs.iterdir())
    assert "== vlp run FAILED ==" in output
    assert processes_naming(state) == []


def test_a_state_dir_keeps_only_the_newest_runs_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each run leaves its logs, KFP outputs and step records; the state dir keeps the newest VLP_KEEP_RUNS (20) and
    the current one, and the stack's own logs and state are never touched (issue 37)."""
    import os

    from vlp.pipelines.local.runner import prune_run_records, runs_kept

    for area in ("logs", "pipeline-root", "records"):
        for i in range(25):
            run = tmp_path / area / f"run-{i:02d}"
            run.mkdir(parents=True)
            (run / "x.log").write_text("x")
            os.utime(run, (1_000_000 + i, 1_000_000 + i))
    (tmp_path / "logs" / "emulator.log").write_text("the stack's own log")
    os.utime(tmp_path / "logs" / "run-00", (2_000_000, 2_000_000))  # touched last, yet the current run below
    removed = prune_run_records(tmp_path, keep=20, current="run-03")
    newest = [f"run-{i:02d}" for i in range(24, -1, -1)]  # by modification time, newest first
    for area in ("logs", "pipeline-root", "records"):
        order = ["run-00", *newest[:-1]] if area == "logs" else newest
        left = sorted(p.name for p in (tmp_path / area).iterdir() if p.is_dir())
        assert left == sorted({*order[:20], "run-03"}), (area, left)
    assert (tmp_path / "logs" / "emulator.log").is_file() and len(removed) == 3 * 4
    monkeypatch.setenv("VLP_KEEP_RUNS", "5")
    assert runs_kept() == 5
    monkeypatch.setenv("VLP_KEEP_RUNS", "zero")
    assert runs_kept() == 20
