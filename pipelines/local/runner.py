"""`vlp run --local`: the compiled pipeline, run by kfp.local against the local stack, ending in a run summary."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import requests

from vlp.components.config import ConfigError, DeploymentConfig
from vlp.components.runtime import KILL_STEP_ENV, label_value
from vlp.pipelines.pipeline import pipeline_parameters
from vlp.pipelines.progress import StepView
from vlp.pipelines.summary import empty_summary, print_summary

DEMO_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMULATOR_FAULTS = {
    "quota-exhausted",
    "hub-gated",
    "upload-error",
    "deploy-error",
    "deploy-timeout",
    "server-crash",
    "predict-429",
    "smoke-fail",
    "revision-conflict",
}
# A fault of the run itself: its PipelineJob names no service account, as a console run with Advanced options left
# empty does, so every step runs as the project's Compute Engine default account (pipeline_job.proto). Locally that
# account holds no role, as in a project whose organization enforces iam.automaticIamGrantsForDefaultServiceAccounts
# (no automatic Editor grant: organization-policy/restrict-service-accounts); the local default, see docs/iam.md.
NO_SERVICE_ACCOUNT = "no-service-account"
KILLABLE_STEPS = {
    "preflight",
    "mirror-weights",
    "register-model",
    "deploy-model",
    "smoke-test",
    "benchmark",
    "promote",
    "deploy-service",
    "smoke-test-service",
    "promote-service",
    "roll-back",
    "roll-back-service",
    "cleanup",
}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TASK_START = re.compile(r"Executing task '?([\w-]+)'?")
_TASK_END = re.compile(r"Task '?([\w-]+)'? finished with status (\w+)")

log = logging.getLogger("vlp.local")


def split_faults(faults: list[str]) -> tuple[list[str], str]:
    """Emulator faults, and the steps to kill (kill-step:STEP[@N], comma-joined for the steps' environment),
    validated with a message that lists the choices."""
    emulator, kills = [], []
    for fault in faults:
        if fault.startswith("kill-step:"):
            kills.append(fault.split(":", 1)[1])
            step, at, calls = kills[-1].partition("@")
            if step not in KILLABLE_STEPS:
                raise ConfigError(f"--inject {fault}: unknown step; choose one of {', '.join(sorted(KILLABLE_STEPS))}")
            count = calls.removesuffix("w")
            if at and not (count.isdigit() and int(count) > 0):
                raise ConfigError(
                    f"--inject {fault}: after '@' comes a number of API calls (1 or more), or of calls that may "
                    "change something with a 'w' after it (3w: after the third call that is not a GET)"
                )
        elif fault in EMULATOR_FAULTS:
            emulator.append(fault)
        elif fault != NO_SERVICE_ACCOUNT:
            choices = ", ".join(sorted(EMULATOR_FAULTS | {NO_SERVICE_ACCOUNT, "kill-step:STEP", "kill-step:STEP@N[w]"}))
            raise ConfigError(f"--inject {fault}: unknown fault; choose one of {choices}")
    return emulator, ",".join(kills)


def _hub_reachable() -> bool:
    try:
        return requests.head("https://huggingface.co/api/models", timeout=3).status_code < 500
    except requests.RequestException:
        return False


def prepare_model(cfg: DeploymentConfig, mirrors_dir: Path, model_dir: Path | None) -> str:
    """Make cfg.model.repo available from the local Hub mirror; returns the HF endpoint mode ("mirror" or "hub")."""
    from vlp.pipelines.local.models import publish_to_hub_mirror, smollm2_dir

    if model_dir is not None:
        if not model_dir.is_dir():
            raise ConfigError(
                f"--model-dir {model_dir} is not a directory holding a model (config.json, *.safetensors)"
            )
        publish_to_hub_mirror(model_dir, mirrors_dir, cfg.model.repo)
        return "mirror"
    if cfg.model.repo == DEMO_REPO:
        publish_to_hub_mirror(smollm2_dir(), mirrors_dir, cfg.model.repo)
        return "mirror"
    if (mirrors_dir / "models" / cfg.model.repo).is_dir():
        return "mirror"
    if _hub_reachable():
        return "hub"
    raise ConfigError(
        f"model.repo {cfg.model.repo} is not in the local Hub mirror and huggingface.co cannot be reached: "
        f"pass --model-dir DIR to serve a local model directory as {cfg.model.repo}, or run online"
    )


# A record of the steps' own loggers (vlp.components.runtime.setup_logging), as kfp.local relays it.
_STEP_LOG = re.compile(r"^\s*\d{4}-\d\d-\d\d [\d:,.]+ (?:INFO|WARNING|ERROR) vlp[\w.]*: (.*)$")
_SKIPPED = re.compile(r"Skipping task '?([\w-]+)'?: upstream")


class _Tee(io.TextIOBase):
    """Keeps kfp.local's output for the summary and the step logs; streams it raw (`--verbose`), or feeds the
    live step view one line at a time."""

    def __init__(self, *streams: Any, view: StepView | None = None) -> None:
        self.streams = streams
        self.view = view
        self.buffer_text = io.StringIO()
        self._partial = ""
        self._current: str | None = None

    def write(self, s: str) -> int:
        for stream in self.streams:
            stream.write(s)
        self.buffer_text.write(s)
        if self.view is not None:
            lines = (self._partial + s).split("\n")
            self._partial = lines.pop()
            for line in lines:
                self._see(_ANSI.sub("", line))
        return len(s)

    def _see(self, line: str) -> None:
        assert self.view is not None
        if m := _TASK_START.search(line):
            self._current = m.group(1)
            self.view.update(self._current, "running")
        elif m := _TASK_END.search(line):
            self.view.update(m.group(1), m.group(2))
            self._current = None
        elif (m := _SKIPPED.search(line)) and m.group(1).endswith("-op"):
            self.view.update(m.group(1), "skipped")
        elif self._current and (m := _STEP_LOG.match(line)):
            # The running step's latest log line (the mirror's progress, a deploy wait...) beside its state.
            self.view.update(self._current, "running", detail=m.group(1))

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def split_task_logs(text: str) -> dict[str, list[str]]:
    """Each step's own output lines (between kfp.local's start and end lines), by step name."""
    text = _ANSI.sub("", text)
    logs: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if m := _TASK_START.search(line):
            current = m.group(1).removesuffix("-op")
            logs[current] = [line]
        elif current:
            logs[current].append(line)
            if _TASK_END.search(line):
                current = None
    return logs


def _killed_by(code: int) -> int | None:
    """The signal that ended a step: a negative return code, or a shell's 128+N (kfp runs steps via `sh -c`)."""
    if code < 0:
        return -code
    return code - 128 if 128 < code <= 128 + 64 else None


def _signal_text(code: int) -> str:
    number = _killed_by(code)
    if number is None:
        return f"exited with code {code}"
    try:
        return f"killed by {signal.Signals(number).name} (exit code {code})"
    except ValueError:
        return f"killed by signal {number} (exit code {code})"


def steps_from_records(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str | None]:
    """Steps (name, status, seconds) and the first failing step's error, from the records the steps wrote
    (pipelines/local/step_records.py), in the order they started."""
    steps, error = [], None
    for r in records:
        step: dict[str, Any] = {"name": r.get("name") or r["op"].removesuffix("_op").replace("_", "-")}
        ended = r.get("ended")
        step["seconds"] = round(ended - r["started"], 1) if ended and r.get("started") else None
        code = r.get("exit_code")
        killed = code is not None and _killed_by(int(code)) is not None
        step["status"] = "succeeded" if r.get("status") == "succeeded" and not code else "failed"
        if step["status"] == "failed" and error is None:
            if killed:
                step["exit"] = _signal_text(int(code))
                error = f"step {step['name']} was {step['exit']}"
            elif r.get("error"):
                error = r["error"]
            elif ended is None:
                error = f"step {step['name']} was killed"
            else:
                error = f"step {step['name']} failed" + (f" ({_signal_text(int(code))})" if code else "")
        steps.append(step)
    return steps, error


LAST_LINES = 15


def _without_executor_input(lines: list[str]) -> list[str]:
    """A step's lines without kfp's JSON dump of its inputs (dozens of lines nobody needs in a failure report)."""
    out, dumping = [], False
    for line in lines:
        if "Got executor_input:" in line:
            dumping = True
            continue
        if (dumping and line.lstrip().startswith("[KFP Executor")) or _STEP_LOG.match(line):
            dumping = False
        if not dumping:
            out.append(line)
    return out


# How many past runs' logs, KFP outputs and step records a state dir keeps (the newest; the current run always):
# each run adds ~100 KB and a dozen files, never read again once a later run has its own.
KEEP_RUNS_ENV = "VLP_KEEP_RUNS"
DEFAULT_KEEP_RUNS = 20


def runs_kept() -> int:
    """VLP_KEEP_RUNS (a whole number, at least 1), else 20."""
    value = os.environ.get(KEEP_RUNS_ENV, "")
    return int(value) if value.isdigit() and int(value) > 0 else DEFAULT_KEEP_RUNS


def prune_run_records(state_dir: Path, *, keep: int, current: str = "") -> list[Path]:
    """Removes all but the `keep` newest runs' directories from the state dir's logs/, pipeline-root/ and records/
    (oldest first, by modification time; `current` is never removed); returns what it removed."""
    removed: list[Path] = []
    for area in ("logs", "pipeline-root", "records"):
        root = state_dir / area
        if not root.is_dir():
            continue
        runs = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in runs[keep:]:
            if old.name != current:
                shutil.rmtree(old, ignore_errors=True)
                removed.append(old)
    return removed


def _write_step_logs(summary: dict[str, Any], text: str, log_dir: Path) -> None:
    """Each step's log to LOG_DIR/STEP.log (and the whole run to run.log), named in the summary, and the failing
    step's last lines."""
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "run.log").write_text(_ANSI.sub("", text))
    summary["log_dir"] = str(log_dir)
    logs = split_task_logs(text)
    for step in summary["steps"]:
        lines = logs.get(step["name"], [])
        path = log_dir / f"{step['name']}.log"
        path.write_text("\n".join(lines) + "\n")
        step["log"] = str(path)
        if step["status"] == "failed" and "failed_step" not in summary:
            body = [ln for ln in _without_executor_input(lines[1:]) if ln.strip() and not _TASK_END.search(ln)]
            summary["failed_step"] = {"name": step["name"], "log": str(path), "last_lines": body[-LAST_LINES:]}


def _emulator_json(api: str, path: str, plumbing: dict[str, str]) -> Any:
    answer = requests.get(f"{api}/_emulator/{path}", headers=plumbing, timeout=10)
    answer.raise_for_status()
    return answer.json()


def build_summary(
    cfg: DeploymentConfig,
    run_label: str,
    steps: list[dict[str, Any]],
    error: str | None,
    api: str,
    smoke: dict[str, Any],
    project: str = "local-project",
    plumbing: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The run summary from the steps, the emulator's audit log of this run's calls (what they created and
    removed, so a resource a failed run created and its exit handler removed shows in both) and its state."""
    summary = empty_summary()
    summary["steps"] = steps
    summary["error"] = error
    state = _emulator_json(api, "state", plumbing or {})
    audit = _emulator_json(api, "audit", plumbing or {})["entries"]
    summary["created"] = list(dict.fromkeys(e["resourceName"] for e in audit if e["action"] == "created"))
    summary["deleted"] = list(dict.fromkeys(e["resourceName"] for e in audit if e["action"] == "deleted"))
    calls = _emulator_json(api, "calls", plumbing or {})["calls"]
    # Google API calls only; the Hub requests the emulator's /hf gate proxied are listed apart.
    summary["api_calls"] = [c for c in calls if " /hf/" not in c]
    summary["hub_calls"] = [c for c in calls if " /hf/" in c]
    ran = {s["name"] for s in steps}
    noop = bool(steps) and not error and "mirror-weights" not in ran
    if noop:
        summary["status"] = "noop"
    elif error is None and all(s["status"] == "succeeded" for s in steps):
        summary["status"] = "succeeded"
    endpoint = next((e for e in state["endpoints"] if e.get("displayName") == cfg.endpoint.name), None)
    if endpoint:
        summary["endpoint"] = endpoint["name"]
        split = endpoint.get("trafficSplit", {})
        summary["deployed_models"] = [
            {"id": dm["id"], "model": dm["model"], "traffic_percent": int(split.get(dm["id"], 0))}
            for dm in endpoint.get("deployedModels", [])
        ]
        summary["left_running"] = [
            f"{endpoint['name']}/deployedModels/{dm['id']}" for dm in endpoint.get("deployedModels", [])
        ]
    if cfg.target == "cloud_run":
        _service_summary(summary, cfg, project, api)
    # The version that serves: a deployed model names it in modelVersionId (or as MODEL@VERSION); a no-op run made
    # none of its own, and "the first version of that model" would name one that does not serve.
    versions = {dm["id"]: dm.get("modelVersionId", "") for dm in (endpoint or {}).get("deployedModels", [])}
    serving = [
        (dm["model"], versions.get(dm["id"], "")) for dm in summary["deployed_models"] if dm["traffic_percent"] > 0
    ]
    ours = [m for m in state["models"] if m.get("labels", {}).get("vlp-run") == run_label]
    model = ours[0] if ours else None
    if model is None and serving:
        name, version = serving[0]
        base, _, ver = name.partition("@")
        ver = ver or version
        model = next((m for m in state["models"] if m["name"] == base and (not ver or m.get("versionId") == ver)), None)
    if model:
        summary["model"] = {"resource_name": model["name"], "version_id": model.get("versionId")}
    summary["smoke"] = smoke
    return summary


def dead_peers(stack: Any) -> list[str]:
    """The stack's peers that are no longer running, each named with its log."""
    names = {"emulator": "the Vertex AI emulator", "gcs": "fake-gcs-server (Cloud Storage)", "hub": "the Hub mirror"}
    return [
        f"{names[attr]} (its log: {peer.log_path})"
        for attr in ("emulator", "gcs", "hub")
        if (peer := getattr(stack, attr, None)) is not None and not peer.alive()
    ]


def name_dead_peers(summary: dict[str, Any], stack: Any) -> None:
    """A run that failed while the emulator still answered (its summary was read) but another peer had died: the
    summary says which, first, since the step's own error (a refused connection) follows from it."""
    down = dead_peers(stack)
    if summary.get("status") != "failed" or not down:
        return
    summary["stack_error"] = (
        f"a peer of the local stack died during the run: {', '.join(down)} is down. Start the stack again (the next "
        "`vlp run --local`, or `vlp local up`)"
    )
    summary["error"] = f"{summary['stack_error']}\n{summary['error']}" if summary.get("error") else summary["stack_error"]


def stack_failed_summary(
    steps: list[dict[str, Any]], error: str | None, stack: Any, exc: BaseException, smoke: dict[str, Any]
) -> dict[str, Any]:
    """The run summary when the local stack cannot answer: the steps and their error from the records the step
    processes wrote, and which peer died, with its log; what the run created is unknown (`stack_error` says so)."""
    down = dead_peers(stack)
    what = ", ".join(down) or f"the local stack at {getattr(stack.emulator, 'url', '?')} ({type(exc).__name__}: {exc})"
    summary = empty_summary()
    summary["steps"] = steps
    summary["status"] = "failed"
    summary["stack_error"] = (
        f"the local stack stopped answering during the run: {what} is down. What the run created and removed could "
        "not be read: start the stack again (the next `vlp run --local`, or `vlp local up`) and `vlp gc` removes "
        "what this run left"
    )
    # The cause first: the step's own error (a refused connection) follows from it.
    summary["error"] = f"{summary['stack_error']}\n{error}" if error else summary["stack_error"]
    summary["smoke"] = smoke
    return summary


def _service_summary(summary: dict[str, Any], cfg: DeploymentConfig, project: str, api: str) -> None:
    """`service` and `revisions` ({name, traffic_percent, tag}) from the Cloud Run Admin API, as a user reads them;
    what serves (traffic or a tag) is what is left running."""
    from vlp.components.cloud_run.probe import get_service
    from vlp.components.cloud_run.service_spec import revisions_client, services_client

    summary["service"], summary["revisions"] = None, []
    services, revisions = services_client(api), revisions_client(api)
    for region in cfg.placement.regions:
        name = f"projects/{project}/locations/{region}/services/{cfg.service_id}"
        service = get_service(services, name)
        if service is None:
            continue
        summary["service"] = name
        summary["service_url"] = service.uri
        traffic = {t.revision: t for t in service.traffic_statuses}
        for revision in revisions.list_revisions(parent=name):
            rev = revision.name.rsplit("/", 1)[1]
            target = traffic.get(rev)
            entry = {"name": rev, "traffic_percent": int(target.percent) if target else 0}
            if target is not None and target.tag:
                entry["tag"] = target.tag
            summary["revisions"].append(entry)
        summary["left_running"] = [
            f"{name}/revisions/{r['name']}" for r in summary["revisions"] if r["traffic_percent"] or r.get("tag")
        ]
        break


def _exit_handler_removed(pipeline_root: Path, run_dir: str) -> list[str]:
    """What the exit handler removed: its `removed` output, from kfp.local's executor output file."""
    for path in (pipeline_root / run_dir).glob("cleanup*/executor_output.json"):
        return list(json.loads(path.read_text()).get("parameterValues", {}).get("removed") or [])
    return []


def _smoke_outputs(pipeline_root: Path, run_dir: str) -> dict[str, Any]:
    """The smoke test step's outputs (verdict, answer, latency, benchmark) from kfp.local's output files."""
    smoke: dict[str, Any] = {"passed": None, "answer": None, "latency_s": None}
    for path in (pipeline_root / run_dir).glob("smoke-test*/executor_output.json"):
        params = json.loads(path.read_text()).get("parameterValues", {})
        smoke = {
            "passed": params.get("verdict") == "passed",
            "answer": params.get("answer"),
            "latency_s": params.get("latency_s"),
        }
        if params.get("benchmark"):
            smoke["benchmark"] = params["benchmark"]
        if params.get("benchmark_skipped"):
            smoke["benchmark_skipped"] = params["benchmark_skipped"]
        # The step's HTML report (smoke answer, and the benchmark's table when it ran) as kfp.local leaves it:
        # a file named `report` with no extension. The run's logs get a copy a browser opens.
        report = path.parent / "report"
        if report.is_file():
            smoke["report_source"] = str(report)
    # A run that changed nothing benchmarks the deployment as it serves (the benchmark step, no smoke test).
    for path in (pipeline_root / run_dir).glob("benchmark*/executor_output.json"):
        params = json.loads(path.read_text()).get("parameterValues", {})
        for key in ("benchmark", "benchmark_skipped"):
            if params.get(key):
                smoke[key] = params[key]
        if (path.parent / "report").is_file():
            smoke["report_source"] = str(path.parent / "report")
    return smoke


def interrupted_error(summary: dict[str, Any], at_once: bool) -> str:
    """What a stopped run tells its user: which signal, where it struck, and what may be left."""
    failed = next((s["name"] for s in summary["steps"] if s["status"] == "failed" and s["name"] != "cleanup"), "")
    text = f"the run was stopped by {summary['interrupted']}" + (f" during step {failed}" if failed else "")
    if at_once:
        left = ", ".join(summary.get("left_running") or []) or "nothing found running"
        return (
            f"{text}, and stopped again before the exit handler finished: what it may have left: {left}. "
            "It stays in the local state: the next run replaces the deployment, `vlp local reset` clears it all."
        )
    cleanup = next((s for s in summary["steps"] if s["name"] == "cleanup"), None)
    if cleanup is None or cleanup["status"] != "succeeded":
        return f"{text}; the exit handler did not run to the end: see left running below"
    return f"{text}; the exit handler removed what the run created"


def setup_local(
    stack: Any, cfg: DeploymentConfig, *, project: str, bucket: str, region: str
) -> tuple[str, str]:
    """`vlp setup` on the local stack, as the project's owner; returns (the owner, the pipeline's service account)."""
    from google.cloud import storage

    from vlp.components.deployment import run_account
    from vlp.pipelines.local.emulator.iam import project_number
    from vlp.pipelines.setup import apply, plan_setup

    owner = stack.bootstrap_owner(project, bucket)
    credentials = stack.credentials(owner)
    plan = plan_setup(cfg, project=project, bucket=bucket, region=region, project_number=project_number(project))
    gcs = storage.Client(project=project, credentials=credentials, client_options={"api_endpoint": stack.storage_endpoint})
    apply(plan, api_endpoint=stack.api_endpoint, credentials=credentials, storage_client=gcs, log=log.info)
    return owner, run_account("", cfg, project)


def request_cloud_run_gpu_quota(stack: Any, cfg: DeploymentConfig, region: str) -> str:
    """A fresh project has no Cloud Run GPU quota: on Google its owner requests some before the first deploy. Locally
    the runner does the same, once, for the config's GPU in its region, unless the stack already holds a limit for it:
    room for three revisions at max_instances (the serving one, a blue/green candidate beside it, and one a failed run
    left behind its tag), since each counts at its max instances. Returns what it granted ("" if nothing)."""
    from vlp.components.cloud_run.quota import gpu_quota_id
    from vlp.components.planning.catalog import RUN_GPUS

    if cfg.target != "cloud_run":
        return ""
    quota_id = gpu_quota_id(cfg.cloud_run.gpu_type, cfg.cloud_run.zonal_redundancy)
    state = requests.get(f"{stack.api_endpoint}/_emulator/quotas", headers=stack.plumbing_headers, timeout=10).json()
    if region in (state.get("quotas") or {}).get(quota_id, {}):
        return ""
    want = 3 * cfg.cloud_run.max_instances * RUN_GPUS[cfg.cloud_run.gpu_type].quota_per_gpu
    quotas = {**state.get("quotas", {}), quota_id: {**state.get("quotas", {}).get(quota_id, {}), region: want}}
    requests.post(
        f"{stack.api_endpoint}/_emulator/quotas",
        json={"quotas": quotas, "default": state.get("default", 8)},
        headers=stack.plumbing_headers,
        timeout=10,
    ).raise_for_status()
    return f"{quota_id} = {want} in {region}"


def run_local(
    cfg: DeploymentConfig,
    *,
    state_dir: Path,
    faults: list[str] | None = None,
    force: bool = False,
    model_dir: Path | None = None,
    project: str = "",
    region: str = "",
    bucket: str = "",
    summary_json: Path | None = None,
    quiet: bool = False,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run the compiled pipeline on the local stack; returns (and prints) the run summary.

    The terminal shows one line per step (`verbose`: kfp.local's raw output instead); every step's full log
    is written under STATE_DIR/logs/RUN/STEP.log either way."""
    from kfp import components as kfp_components
    from kfp import local

    from vlp.pipelines.compile import compile_to_temp
    from vlp.pipelines.local import background, import_guard, interrupts, kfp_fixes, step_launch, step_records
    from vlp.pipelines.local.peers import LocalStack

    kfp_fixes.apply()

    emulator_faults, kill_step = split_faults(faults or [])
    project = project or cfg.placement.project or "local-project"
    bucket = bucket or cfg.placement.bucket or "vlp-local"
    state_dir = state_dir.resolve()
    started = time.monotonic()
    saved_env = dict(os.environ)
    step_launch.base_env = saved_env  # the steps' fork servers start from the environment the run found
    # The stack first: the emulator restarts the model servers of earlier runs while the rest is set up.
    holder = f"vlp run --local of deployment {cfg.name}"
    # SIGINT/SIGTERM from here on stop the run like a failed step: the exit handler still runs (interrupts.py).
    # A stack `vlp local up` keeps running is used as it is (its deployments stay up after the run); else the run
    # starts one of its own and stops it at the end.
    stack = background.attach(state_dir, emulator_faults, holder) or LocalStack(
        state_dir, faults=emulator_faults, holder=holder
    )
    with interrupts.handled(), stack:
        template = compile_to_temp(reuse=True)  # the same compiler as `vlp compile`: the run executes the spec
        pipeline = kfp_components.load_component_from_file(str(template))
        hub_mode = prepare_model(cfg, stack.mirrors_dir, model_dir)
        # Least privilege, as on Google: the project's owner runs `vlp setup` (the APIs, the bucket, the accounts and
        # exactly the policy's grants), then every step runs as the pipeline's service account.
        owner, pipeline_sa = setup_local(
            stack, cfg, project=project, bucket=bucket, region=region or cfg.placement.regions[0]
        )
        granted = request_cloud_run_gpu_quota(stack, cfg, region or cfg.placement.regions[0])
        if granted:
            log.info("local stack: granted the Cloud Run GPU quota a project owner would request first (%s)", granted)
        if NO_SERVICE_ACCOUNT in (faults or []):
            from vlp.pipelines.local.emulator.iam import compute_default_account

            pipeline_sa = compute_default_account(project)
        os.environ.update(stack.env(pipeline_sa))
        # Each step imports only what its launcher installs on Vertex (pipelines/local/import_guard.py).
        os.environ.update(import_guard.guard_env(state_dir))
        records_dir = state_dir / "records" / str(time.time_ns())
        records_dir.mkdir(parents=True)
        os.environ[step_records.ENV_DIR] = str(records_dir)
        if hub_mode == "hub":
            os.environ.pop("HF_ENDPOINT", None)
        if kill_step:
            os.environ[KILL_STEP_ENV] = kill_step
        else:
            os.environ.pop(KILL_STEP_ENV, None)
        api = stack.api_endpoint
        requests.post(f"{api}/_emulator/calls:clear", headers=stack.plumbing_headers, timeout=10).raise_for_status()
        pipeline_root = state_dir / "pipeline-root"
        local.init(
            runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=False
        )
        params = pipeline_parameters(cfg, project=project, region=region, bucket=bucket, force=force, api_endpoint=api)
        runs_before = set(os.listdir(pipeline_root)) if pipeline_root.exists() else set()
        view = None if quiet or verbose else StepView(sys.stdout)
        tee = _Tee(*((sys.stdout,) if verbose and not quiet else ()), view=view)
        handler = logging.StreamHandler(tee)
        handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d %(message)s", "%H:%M:%S"))
        root = logging.getLogger()
        root.addHandler(handler)
        try:
            with contextlib.redirect_stdout(tee), view or contextlib.nullcontext(), warnings.catch_warnings():
                # kfp.local warns, per task, that display names and resource limits mean nothing locally.
                warnings.filterwarnings("ignore", message=".*have no effect in the current local runner")
                # ...and that GCPC's launcher image is not a Python one: its task runs vlp's stand-in (gcpc_launcher.py).
                warnings.filterwarnings("ignore", message=".*google-cloud-pipeline-components.* in a Python environment")
                if interrupts.signal_name() is None:  # a signal while the stack started: nothing to run
                    pipeline(**params)
        except interrupts.StopNow:
            pass  # a second signal: the summary below says what the unfinished exit handler may have left
        finally:
            root.removeHandler(handler)
            os.environ.clear()
            os.environ.update(saved_env)
        new_runs = sorted(set(os.listdir(pipeline_root)) - runs_before) if pipeline_root.exists() else []
        run_dir = new_runs[-1] if new_runs else ""
        text = tee.buffer_text.getvalue()
        steps, error = steps_from_records(step_records.read_records(records_dir))
        # The summary reads what the run left as the project's owner (the person who started the run).
        os.environ.update(stack.env(owner))
        try:
            summary = build_summary(
                cfg, label_value(run_dir), steps, error, api, _smoke_outputs(pipeline_root, run_dir), project,
                plumbing=stack.plumbing_headers,
            )
            name_dead_peers(summary, stack)
        except (requests.RequestException, OSError) as exc:
            # A peer of the stack died (or stopped answering): the summary and the step logs are still written, from
            # what the runner knows itself, and say what could not be read and why.
            summary = stack_failed_summary(steps, error, stack, exc, _smoke_outputs(pipeline_root, run_dir))
        finally:
            os.environ.clear()
            os.environ.update(saved_env)
        _write_step_logs(summary, text, state_dir / "logs" / (run_dir or "run"))
        prune_run_records(state_dir, keep=runs_kept(), current=run_dir)
        source = (summary.get("smoke") or {}).pop("report_source", None)
        if source:
            name = "benchmark-report.html" if Path(source).parent.name.startswith("benchmark") else "smoke-test-report.html"
            report = Path(summary["log_dir"]) / name
            shutil.copyfile(source, report)
            summary["report"] = str(report)
        summary["removed_by_exit_handler"] = _exit_handler_removed(pipeline_root, run_dir)
        summary["run"] = run_dir
        if interrupts.signal_name():
            summary["interrupted"] = interrupts.signal_name()
            summary["status"] = "failed"
            summary["error"] = interrupted_error(summary, interrupts.stopped_at_once())
        summary["seconds"] = round(time.monotonic() - started, 1)
        summary["logs"] = [str(p) for p in stack.log_paths()]
        if stack.attached:
            summary["stack"] = (
                f"the local stack keeps running at {api} (`vlp local up`): `vlp local status` shows how to call what "
                "it serves, `vlp local down` stops it"
            )
        else:
            summary["stack"] = (
                "the local stack stopped with this run, and what it serves with it; `vlp local up` keeps it running "
                "between runs, to call the deployment"
            )
    if summary["status"] == "failed" and not summary["error"]:
        summary["error"] = "the run failed; see the step output above"
    if not quiet:
        print_summary(summary)
    if summary_json:
        summary_json.parent.mkdir(parents=True, exist_ok=True)
        summary_json.write_text(json.dumps(summary, indent=2, default=str))
    return summary
