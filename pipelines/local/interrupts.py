"""SIGINT and SIGTERM during `vlp run --local`: the run stops like a failed step, not like a crashed program.

On Vertex AI Pipelines a cancelled run still runs its exit handler (dsl.ExitHandler, PipelineTaskFinalStatus
CANCELLED); locally the terminal's Ctrl-C or CI's `timeout` must not leave an endpoint, a model server or a peer
behind either. The first signal stops the running step's process group (steps run in sessions of their own, so
the terminal's Ctrl-C reaches only vlp), lets no further step start except the exit handler, and gives that
handler EXIT_HANDLER_GRACE_S to finish; a second signal, or the grace running out, stops at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# Long enough for the local exit handler (it waits on pending deploy operations, then undeploys and deletes:
# seconds each on the local stack); a bound, so a hung handler cannot keep a stopped run alive.
EXIT_HANDLER_GRACE_S = 240.0
EXIT_HANDLER_OP = "cleanup_op"
STEP_STOP_WAIT_S = 10.0


class StopNow(BaseException):
    """Raised in the main thread by a second signal: unwinds kfp.local at once (BaseException, so no step code's
    `except Exception` swallows it)."""


class _State:
    def __init__(self) -> None:
        self.signal: str | None = None  # the first signal's name, once one came
        self.stopped_at_once = False
        self.current: Any = None  # the running step (step_launch.StepProcess)
        self.current_op: str | None = None
        self.timer: threading.Timer | None = None


_state = _State()


def signal_name() -> str | None:
    """The first signal that stopped the run (SIGINT or SIGTERM), or None."""
    return _state.signal


def stopped_at_once() -> bool:
    """Whether a second signal (or the grace running out) cut the exit handler short."""
    return _state.stopped_at_once


def _stop_group(process: Any, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop_step(process: Any) -> None:
    """SIGTERM to the step's group, SIGKILL if it is still there STEP_STOP_WAIT_S later (off the main thread:
    the main thread is reading the step's output until it ends)."""
    _stop_group(process, signal.SIGTERM)

    def finish() -> None:
        try:
            process.wait(timeout=STEP_STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            _stop_group(process, signal.SIGKILL)

    threading.Thread(target=finish, daemon=True).start()


def _on_signal(signum: int, frame: Any) -> None:  # noqa: ARG001 - the signal module's signature
    name = signal.Signals(signum).name
    if _state.signal is None:
        _state.signal = name
        running = _state.current_op
        if running == EXIT_HANDLER_OP:
            what = "the exit handler is running: it finishes"
        else:
            what = "stopping the running step; the exit handler then removes what the run created"
        print(
            f"\n[vlp] {name}: {what} (at most {EXIT_HANDLER_GRACE_S:.0f} s). Send it again to stop at once.",
            file=sys.stderr,
            flush=True,
        )
        if _state.current is not None and running != EXIT_HANDLER_OP:
            _stop_step(_state.current)
        _state.timer = threading.Timer(EXIT_HANDLER_GRACE_S, os.kill, (os.getpid(), signum))
        _state.timer.daemon = True
        _state.timer.start()
        return
    _state.stopped_at_once = True
    if _state.current is not None:
        _stop_group(_state.current, signal.SIGKILL)
    print(f"\n[vlp] {name} again: stopping at once.", file=sys.stderr, flush=True)
    raise StopNow(name)


@contextmanager
def handled() -> Iterator[None]:
    """SIGINT and SIGTERM handled as above for the duration (main thread only), the previous handlers after."""
    global _state
    _state = _State()
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; a run started elsewhere keeps the process's own
        return
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if _state.timer is not None:
            _state.timer.cancel()


def run_step(full_command: list[str], env: dict[str, str] | None, op: str | None) -> int:
    """kfp.local's subprocess call, in a session of its own, registered so a signal can stop it. After a first
    signal no step but the exit handler starts (it answers 128 + the signal's number, as if killed by it)."""
    if _state.signal is not None and op != EXIT_HANDLER_OP:
        return 128 + int(signal.Signals[_state.signal])
    from vlp.pipelines.local import step_launch

    process = step_launch.start(full_command, env, op)
    _state.current, _state.current_op = process, op
    try:
        if process.stdout:
            for line in iter(process.stdout.readline, ""):
                print(line, end="")
            print("\n")
        return process.wait()
    finally:
        _state.current, _state.current_op = None, None
        process.close()
