"""The run's step view and step logs: what a person sees instead of kfp.local's raw output."""

from __future__ import annotations

import io

from vlp.pipelines.local.runner import _Tee, split_task_logs, steps_from_records
from vlp.pipelines.progress import StepView

# kfp.local's own lines, as the runner's log handler formats them, with a step's output in between.
KFP_LINES = [
    "09:00:01.000 Executing task \x1b[96m'preflight-op'\x1b[0m",
    "    2026-12-01 09:00:02,000 INFO vlp.preflight: planned g2-standard-8",
    "09:00:03.000 Task \x1b[96m'preflight-op'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m",
    "09:00:03.100 Executing task 'mirror-weights-op'",
    "    [KFP Executor 2026-12-01 09:00:03,200 INFO]: Got executor_input:",
    "    {",
    '        "inputs": {"parameterValues": {}}',
    "    }",
    "    2026-12-01 09:00:04,000 INFO vlp.mirror: mirror: 3/7 files, 40%",
    "Killed",
    "[vlp] step process exited with code 137",
    "09:00:09.000 Task 'mirror-weights-op' finished with status FAILURE",
    "09:00:09.100 Skipping task register-model-op: upstream task(s) ['mirror-weights-op'] failed.",
    "09:00:09.200 Executing task 'cleanup-op'",
    "    2026-12-01 09:00:10,000 INFO vlp: removed projects/p/locations/l/endpoints/1",
    "09:00:11.000 Task 'cleanup-op' finished with status SUCCESS",
]


def _feed(tee: _Tee) -> None:
    for line in KFP_LINES:
        tee.write(line[:10])  # writes arrive in pieces, not whole lines
        tee.write(line[10:] + "\n")


def test_without_a_terminal_each_state_change_is_one_line() -> None:
    out = io.StringIO()
    with StepView(out) as view:
        _feed(_Tee(view=view))
    lines = out.getvalue().splitlines()
    assert [ln.split()[:2] for ln in lines] == [
        ["preflight", "running"],
        ["preflight", "succeeded"],
        ["mirror-weights", "running"],
        ["mirror-weights", "failed"],
        ["register-model", "skipped"],
        ["cleanup", "running"],
        ["cleanup", "succeeded"],
    ]
    assert "40%" not in out.getvalue()  # a step's own output stays out of a non-terminal view
    assert "\x1b" not in out.getvalue()


def test_on_a_terminal_the_block_is_redrawn_with_the_running_steps_latest_line() -> None:
    out = io.StringIO()
    view = StepView(out, live=True)
    view.update("mirror-weights-op", "RUNNING")
    view.update("mirror-weights-op", "RUNNING", detail="mirror: 3/7 files, 40%")
    text = out.getvalue()
    assert "\x1b[F" in text and "\x1b[2K" in text  # cursor up, clear line: redrawn in place
    assert text.rstrip().endswith("mirror: 3/7 files, 40%")
    # Fed by the runner, only the steps' own log records become the detail, not kfp's input dump.
    out2 = io.StringIO()
    live = StepView(out2, live=True)
    _feed(_Tee(view=live))
    assert "parameterValues" not in out2.getvalue() and "3/7 files, 40%" in out2.getvalue()


def test_verbose_streams_the_raw_output_and_keeps_it() -> None:
    raw = io.StringIO()
    tee = _Tee(raw)
    _feed(tee)
    assert raw.getvalue() == tee.buffer_text.getvalue()
    assert "Executing task 'mirror-weights-op'" in raw.getvalue()


def test_a_killed_step_says_which_signal_and_each_step_has_its_own_log() -> None:
    """The steps' own records (a killed step wrote no end; the runner added the exit code), not the log text."""
    text = "\n".join(KFP_LINES)
    records = [
        {"name": "preflight", "op": "preflight_op", "started": 1.0, "ended": 3.5, "status": "succeeded"},
        {"name": "mirror-weights", "op": "mirror_weights_op", "started": 4.0, "status": "failed", "exit_code": 137},
        {"name": "cleanup", "op": "cleanup_op", "started": 9.0, "ended": 10.0, "status": "succeeded"},
    ]
    steps, error = steps_from_records(records)
    assert error == "step mirror-weights was killed by SIGKILL (exit code 137)"
    assert [s["seconds"] for s in steps] == [2.5, None, 1.0]
    assert {s["name"]: s["status"] for s in steps} == {
        "preflight": "succeeded",
        "mirror-weights": "failed",
        "cleanup": "succeeded",
    }
    logs = split_task_logs(text)
    assert logs["mirror-weights"][5].strip().endswith("mirror: 3/7 files, 40%")
    assert any("removed projects/p/locations/l/endpoints/1" in ln for ln in logs["cleanup"])
    assert not any("planned" in ln for ln in logs["cleanup"])


def test_every_step_of_the_compiled_pipeline_shows_in_wait_and_no_group_does() -> None:
    """`vlp run --wait` lists Vertex's task details by name: the custom-job mirrors (`mirror-weights-op-2`, -3) are
    steps too; exit handlers and conditions are not."""
    from pathlib import Path

    import yaml

    from vlp.pipelines.progress import is_step, step_name

    spec = yaml.safe_load((Path(__file__).resolve().parent.parent / "compiled" / "vlp-deploy-llm.yaml").read_text())
    components = spec["components"]
    steps, groups = set(), set()

    def walk(dag: dict) -> None:
        for task, body in dag.get("tasks", {}).items():
            component = components[body["componentRef"]["name"]]
            if "dag" in component:
                groups.add(task)
                walk(component["dag"])
            else:
                steps.add(task)

    walk(spec["root"]["dag"])
    assert {"mirror-weights-op-2", "mirror-weights-op-3", "cleanup-op"} <= steps and "exit-handler-1" in groups
    assert all(is_step(t) for t in steps) and not any(is_step(t) for t in groups)
    assert step_name("mirror-weights-op-2") == "mirror-weights-2" and step_name("preflight-op") == "preflight"
