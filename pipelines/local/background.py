"""`vlp local up | down`: the local stack kept running in the background between runs, at stable addresses, so a
person can call the deployments it serves; `vlp run --local` uses it when it is up.

The background process holds the state dir's stack lock for as long as it runs and records where its peers answer
in STATE_DIR/stack.json; it stops them all on SIGTERM (`vlp local down`), SIGINT or SIGHUP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from vlp.pipelines.local.peers import (
    REPO_ROOT,
    RUN_LOCK,
    LocalStack,
    StateDirBusy,
    _alive,
    _log_tail,
    lock_state_dir,
    python_env,
)

STACK_FILE = "stack.json"
UP_TIMEOUT_S = 120.0
DOWN_TIMEOUT_S = 60.0


class StackError(RuntimeError):
    """The background stack did not start or stop as asked; the message says why and where its log is."""


# How the background stack names itself in the state dir's lock (what a refused `vlp local reset` prints).
HOLDER = "the background stack of `vlp local up` (stop it with `vlp local down`)"


def running(state_dir: Path) -> dict[str, Any] | None:
    """What stack.json records, when its process is alive and its emulator answers; None otherwise."""
    try:
        info = json.loads((Path(state_dir) / STACK_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not _alive(int(info.get("pid") or 0)):
        return None
    try:
        with urllib.request.urlopen(f"{info['emulator']}/healthz", timeout=5) as resp:
            return info if resp.status == 200 else None
    except (urllib.error.URLError, OSError, KeyError):
        return None


def attach(state_dir: Path, faults: list[str], holder: str) -> LocalStack | None:
    """The running background stack as a LocalStack to start (a run on it), or None when no stack is up."""
    info = running(state_dir)
    return LocalStack.attach(state_dir, info, faults=faults, holder=holder) if info else None


def up(state_dir: Path, timeout: float = UP_TIMEOUT_S, grpc: bool = True) -> dict[str, Any]:
    """Starts the background stack (or finds it running) and returns what stack.json records. `grpc`: its emulator
    serves gRPC (TLS) beside REST, for people's own client code on its default transport; the runs vlp makes
    itself use REST and need none."""
    state_dir = Path(state_dir).resolve()
    if info := running(state_dir):
        return {**info, "already_up": True}
    # Refused here, with the holder's name, while a run holds the dir with a stack of its own.
    lock_state_dir(state_dir, "vlp local up").close()
    log_path = state_dir / "logs" / "stack.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = python_env(os.environ)
    from vlp.pipelines.local.emulator.plumbing import GRPC_ENV

    env[GRPC_ENV] = "1" if grpc else "0"
    with log_path.open("ab") as log:
        offset = log.tell()
        process = subprocess.Popen(
            [sys.executable, "-m", "vlp.pipelines.local.background", "--state-dir", str(state_dir)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=env,
            start_new_session=True,  # outlives this command and the terminal's Ctrl-C
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = running(state_dir)
        if info and info.get("pid") == process.pid:
            return info
        if process.poll() is not None:
            raise StackError(
                f"the local stack did not start (exit status {process.returncode}); log {log_path}:\n"
                + _log_tail(log_path, offset)
            )
        time.sleep(0.2)
    _stop_pid(process.pid, DOWN_TIMEOUT_S)
    raise StackError(f"the local stack did not start within {timeout:.0f}s; log {log_path}:\n{_log_tail(log_path, offset)}")


def down(state_dir: Path, timeout: float = DOWN_TIMEOUT_S) -> dict[str, Any] | None:
    """Stops the background stack and every process it started; returns what it found and stopped, or None if
    nothing of a stack ran. Finds the stack from every record there is: stack.json, the state dir's lock (which the
    background process holds, naming its pid, even when stack.json is garbled or gone), and the processes whose
    command line names the state dir (its peers, fork servers and model servers). Refuses (StateDirBusy) while a run
    is using it."""
    state_dir = Path(state_dir).resolve()
    try:
        info = json.loads((state_dir / STACK_FILE).read_text())
        info = info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        info = {}
    pid = int(info.get("pid") or 0)
    holder = _lock_record(state_dir)
    if not (pid > 0 and _alive(pid)) and holder.get("holder") == HOLDER:
        pid = int(holder.get("pid") or 0)  # stack.json garbled or deleted: the lock still names the stack
    # pid 0 would signal this process's own group (kill(0, ...)): only a real pid counts.
    was_up = pid > 0 and _alive(pid)
    strays = _processes_naming(state_dir)
    if was_up or strays:
        lock_state_dir(state_dir, "vlp local down", name=RUN_LOCK).close()
    if was_up:
        _stop_pid(pid, timeout)
    # A stack killed before it could stop its peers leaves them running (each is its own process group): end those
    # that still name this state dir (a recorded pid reused by another program is left alone).
    orphans = [_kill_peer(int(info.get(f"{key}_pid") or 0), state_dir) for key in ("emulator", "hub", "gcs")]
    # And whatever else still names the state dir once the stack is gone (peers stack.json no longer records).
    stopped = [p for p in _processes_naming(state_dir) if _kill_stray(p)]
    (state_dir / STACK_FILE).unlink(missing_ok=True)
    if not (was_up or any(orphans) or stopped):
        return None
    return {**info, "pid": pid or info.get("pid"), "stopped_strays": len(stopped), "from": _how(info, holder, pid)}


def _how(info: dict[str, Any], holder: dict[str, Any], pid: int) -> str:
    if info.get("pid") == pid and pid:
        return "stack.json"
    if holder.get("pid") == pid and pid:
        return "the state dir's lock (stack.json was unreadable)"
    return "the processes naming the state dir"


def _lock_record(state_dir: Path) -> dict[str, Any]:
    """What the state dir's lock file says about its holder (written by the holder once it has the lock)."""
    try:
        record = json.loads((state_dir / "lock").read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _processes_naming(state_dir: Path) -> list[int]:
    """Live processes whose command line names the state dir, other than this one, its ancestors and vlp commands
    (a `vlp … --state-dir DIR` a person runs): the stack's peers, fork servers and model servers."""
    skip = {os.getpid()}
    parent = os.getppid()
    while parent > 1 and parent not in skip:
        skip.add(parent)
        try:
            parent = int(Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    needle = str(state_dir).encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in skip:
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle not in b" ".join(argv) or not _alive(int(proc.name)):
            continue
        if any(a.endswith((b"/vlp", b"vlp.pipelines.cli")) for a in argv[:3]):
            continue
        found.append(int(proc.name))
    return found


def _kill_stray(pid: int) -> bool:
    """SIGKILLs one process (its group too when it leads one: a peer's children go with it)."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _kill_peer(pid: int, state_dir: Path) -> bool:
    """SIGKILLs the process group of a recorded peer that is still alive and still names `state_dir`."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if pid and _alive(pid) else b""
    except OSError:
        return False
    if str(state_dir).encode() not in cmdline:
        return False
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _stop_pid(pid: int, timeout: float) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def serve(state_dir: Path) -> int:
    """The background process: start the stack, record it, keep it up until a signal or a peer's death."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    stack = LocalStack(state_dir, holder=HOLDER)
    try:
        stack.start()
    except StateDirBusy as exc:
        print(f"error: {exc}", flush=True)
        return 2
    record = Path(stack.state_dir) / STACK_FILE
    try:
        # The local project has an owner from the start, as a Google Cloud project has its creator: `vlp local token`
        # (and gcloud or a client with it) can list and create before any run has set the project up.
        stack.bootstrap_owner("local-project")
        peers = {"emulator": stack.emulator, "hub": stack.hub, "gcs": stack.gcs}
        info: dict[str, Any] = {"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for key, peer in peers.items():
            assert peer is not None
            info[key], info[f"{key}_pid"] = peer.url, peer.process.pid
        tmp = record.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=1))
        os.replace(tmp, record)
        print(f"local stack up: Vertex AI API {stack.api_endpoint}", flush=True)
        while not stop.wait(1.0):
            dead = [p.name for p in peers.values() if p is not None and not p.alive()]
            if dead:
                print(f"error: {', '.join(dead)} exited; stopping the local stack (see its log)", flush=True)
                return 1
    finally:
        record.unlink(missing_ok=True)
        stack.stop()
        print("local stack stopped", flush=True)
    return 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vlp.pipelines.local.background", description=__doc__)
    parser.add_argument("--state-dir", required=True, type=Path)
    sys.exit(serve(parser.parse_args().state_dir))
