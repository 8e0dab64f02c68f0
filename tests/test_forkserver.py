"""The fork server local runs start steps and model servers from: a forked child must end, report and read its
environment as a fresh interpreter would (pipelines/local/forkserver.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vlp.pipelines.local.forkserver import ForkServer, SharedForkServer

ROOT = Path(__file__).resolve().parent.parent
TARGET = "tests.processes:forked_child"  # what the child does is chosen by its first argument


@pytest.fixture
def server() -> Iterator[ForkServer]:
    forks = ForkServer(["json"], env={**os.environ, "SERVER_ONLY": "yes"})
    try:
        yield forks
    finally:
        forks.close()


def spawn(server: ForkServer, tmp_path: Path, *argv: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    out = tmp_path / "out.txt"
    with out.open("wb") as stream:
        child = server.spawn(
            TARGET, list(argv), env=env or {"PATH": os.environ.get("PATH", ""), "CHILD": "1"}, cwd=str(tmp_path),
            stdout_fd=stream.fileno(),
        )  # fmt: skip
    code = child.wait(timeout=60)
    return code, out.read_text()


def test_a_child_ends_as_an_interpreter_ends(server: ForkServer, tmp_path: Path) -> None:
    code, out = spawn(server, tmp_path, "ok")
    assert code == 0, out
    # Its own environment, directory and session; a non-daemon thread joined, then the atexit handlers.
    assert "env CHILD=1 SERVER_ONLY=None" in out
    assert f"cwd {tmp_path}" in out
    assert "own session True" in out
    assert out.index("thread done") < out.index("atexit ran"), out
    assert spawn(server, tmp_path, "exit", "3")[0] == 3
    code, out = spawn(server, tmp_path, "raise")
    assert code == 1 and "Traceback" in out and "ValueError: broken on purpose" in out and "atexit ran" in out
    assert spawn(server, tmp_path, "kill")[0] == -signal.SIGKILL


def test_wait_times_out_and_a_signal_to_the_group_stops_the_child(server: ForkServer, tmp_path: Path) -> None:
    with (tmp_path / "out.txt").open("wb") as stream:
        child = server.spawn(TARGET, ["sleep"], env={}, cwd=str(tmp_path), stdout_fd=stream.fileno())
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(timeout=0.2)
    assert child.poll() is None
    os.killpg(child.pid, signal.SIGTERM)  # pid is its process group, as with start_new_session=True
    assert child.wait(timeout=30) == -signal.SIGTERM


def command_line_once_written(pid: int, title: str, timeout_s: float = 10) -> str:
    """A forked child's command line, read once it is `title` or after `timeout_s`: the child writes it first thing
    after the fork, which spawn does not wait for."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    deadline = time.monotonic() + timeout_s
    while cmdline.read_bytes().rstrip(b"\0") != title.encode() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cmdline.read_bytes().rstrip(b"\0").decode()


def test_a_shared_server_says_its_environment_and_its_children_name_themselves(tmp_path: Path) -> None:
    """Another process's fork server, used through its socket: it tells the environment its preload saw (what a
    caller compares before sharing it), and a child given a title shows it as its command line (ps, /proc), where a
    stack's leftovers are looked for by state dir."""
    forks = ForkServer(["json"], env={**os.environ, "SERVER_ONLY": "yes"}, title_room=512)
    try:
        shared = SharedForkServer(forks.socket_path)
        assert shared.pid == forks.process.pid and shared.alive()
        assert shared.env["SERVER_ONLY"] == "yes"
        assert shared.differences({**shared.env, "VLP_X": "1", "PYTEST_Y": "2"}, ("VLP_", "PYTEST_")) == []
        mine = {**shared.env, "SERVER_ONLY": "no", "EXTRA": "1"}
        mine.pop("PATH", None)
        assert shared.differences(mine, ("VLP_",)) == ["EXTRA", "PATH", "SERVER_ONLY"]
        title = f"vlp model server dm-1 model-servers:{tmp_path / 'state'}"
        with (tmp_path / "out.txt").open("wb") as stream:
            child = shared.spawn(TARGET, ["sleep"], env={}, cwd=str(tmp_path), stdout_fd=stream.fileno(), title=title)
        try:
            assert command_line_once_written(child.pid, title) == title
            assert Path(f"/proc/{forks.process.pid}/cmdline").read_bytes().startswith(sys.executable.encode())
        finally:
            child.kill()
        assert child.wait(timeout=30) == -signal.SIGKILL
        shared.close()  # not its owner: the server keeps running
        assert forks.alive()
    finally:
        forks.close()


def test_a_module_that_reads_the_environment_when_imported_is_reloaded_in_the_child(tmp_path: Path) -> None:
    """google-auth reads its metadata server's address at import: the child must see its own, not the server's."""
    from vlp.pipelines.local import step_launch

    env = {**os.environ, "GCE_METADATA_HOST": "server.invalid:1"}
    forks = ForkServer(["google.auth.compute_engine._metadata"], env=env, reload=step_launch.RELOAD)
    try:
        code, out = spawn(forks, tmp_path, "metadata", env={**env, "GCE_METADATA_HOST": "child.invalid:2"})
    finally:
        forks.close()
    assert code == 0, out
    assert "metadata root http://child.invalid:2/" in out, out


def test_a_step_server_starts_cold_when_an_unreloaded_import_time_variable_differs() -> None:
    from vlp.pipelines.local import step_launch

    forks = ForkServer([], env=dict(os.environ), same_env=step_launch.SAME_ENV)
    try:
        assert forks.can_fork(dict(os.environ))
        assert not forks.can_fork({**os.environ, "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python"})
    finally:
        forks.close()


_AUDIT = r"""
import ast, json, os, sys
os.environ["_KFP_RUNTIME"] = "true"
before = set(sys.modules)
from vlp.pipelines.local.step_launch import PRELOAD
import importlib
for name in PRELOAD:
    importlib.import_module(name)

def reads_env(node):
    # Module-level code only: function and class bodies run later, with the child's environment.
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda, ast.Import, ast.ImportFrom)):
        return False
    if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv") and getattr(node.value, "id", "") == "os":
        return True
    if isinstance(node, ast.Name) and node.id in ("environ", "getenv"):
        return True
    return any(reads_env(child) for child in ast.iter_child_nodes(node))

found = []
for name, module in list(sys.modules.items()):
    if name in before:
        continue  # loaded when any interpreter starts, with its own environment
    path = getattr(module, "__file__", None) or ""
    if not path.endswith(".py"):
        continue
    tree = ast.parse(open(path, encoding="utf-8", errors="replace").read())
    if any(reads_env(node) for node in tree.body):
        found.append(name)
print(json.dumps(sorted(found)))
"""


@pytest.mark.slow
def test_every_preloaded_module_that_reads_the_environment_when_imported_is_known() -> None:
    """The audit behind step_launch.ENV_AT_IMPORT: a new module-level environment read in the steps' preloaded
    imports (after an upgrade) fails here until it is reloaded in the child or its variables must match."""
    import json

    from vlp.pipelines.local import step_launch

    result = subprocess.run([sys.executable, "-c", _AUDIT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = set(json.loads(result.stdout))
    unknown = found - set(step_launch.ENV_AT_IMPORT) - {"vlp.pipelines.local.step_launch", "vlp.pipelines.local.forkserver"}
    assert not unknown, f"modules that read the environment when imported, not in step_launch.ENV_AT_IMPORT: {unknown}"


_MODEL_AUDIT = r"""
import json, os, sys
before = set(sys.modules)
from vlp.pipelines.local.emulator.serving import _PRELOAD, IMPORT_SAFE_PREFIXES
import importlib
for name in _PRELOAD:
    importlib.import_module(name)
found = []
for name, module in list(sys.modules.items()):
    path = getattr(module, "__file__", None) or ""
    if name in before or not path.endswith(".py") or not os.path.isfile(path) or name.startswith("vlp."):
        continue
    text = open(path, encoding="utf-8", errors="replace").read()
    found += [f"{name}: {prefix}" for prefix in IMPORT_SAFE_PREFIXES if prefix in text]
print(json.dumps(sorted(found)))
"""


@pytest.mark.slow
def test_no_module_the_model_servers_preload_names_a_variable_a_shared_server_may_differ_in() -> None:
    """The audit behind serving.IMPORT_SAFE_PREFIXES: stacks share a model fork server although their environments
    differ in VLP_* and PYTEST_* variables, which is sound only while no module of its preload (torch, transformers,
    `transformers serve`) mentions such a name at all (stricter than reading one when imported)."""
    import json

    result = subprocess.run([sys.executable, "-c", _MODEL_AUDIT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout) == []


@pytest.mark.slow
def test_the_session_publishes_a_step_server_per_package_set_for_every_run_in_it(tmp_path: Path) -> None:
    """The suite's runs, in a worker or as `vlp run --local` commands, find the session's step servers (conftest,
    step_launch.share_servers): one per package set, forking under the same SAME_ENV rule as a server of their own,
    each child naming its run's step sets file (in the state dir) on its command line."""
    from vlp.pipelines.local import step_launch
    from vlp.pipelines.local.import_guard import allowed_by_op

    assert os.environ.get(step_launch.SHARED_SERVERS_ENV), "the suite's step servers are not published"
    sets = {tuple(v) for v in allowed_by_op().values()}
    published = {allowed: step_launch._published(allowed) for allowed in sets}
    step_env = {**os.environ, "_KFP_RUNTIME": "true"}  # what step_launch.start asks with
    assert all(server is not None and server.can_fork(step_env) for server in published.values()), published
    server = next(iter(published.values()))
    assert not server.can_fork({**step_env, "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python"})
    title = f"vlp step preflight_op of the run with step sets {tmp_path / 'state' / 'step-packages.json'}"
    with (tmp_path / "out.txt").open("wb") as stream:
        child = server.spawn(TARGET, ["sleep"], env={}, cwd=str(tmp_path), stdout_fd=stream.fileno(), title=title)
    try:
        assert command_line_once_written(child.pid, title) == title
    finally:
        child.kill()
    assert child.wait(timeout=30) == -signal.SIGKILL
