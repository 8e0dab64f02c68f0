"""A warm interpreter that forks the local stack's short-lived Python processes instead of starting them cold.

A local run starts about seven step processes, and the emulator a model server per deploy; each used to import kfp
and the Google clients (1-2 s of CPU) or torch and transformers (2-3 s) afresh, most of a short run's CPU on a small
machine. A fork server imports them once (`preload`) and forks a child per process. The child is then made what a
fresh process would be: a session of its own, the caller's environment, working directory, argv and stdout/stderr,
and an interpreter's ending (non-daemon threads joined, atexit handlers run, sys.excepthook and exit code 1 for an
uncaught exception, -N for a signal), reported to the caller as Popen reports it.

What a fork cannot make fresh is a module that read the environment when it was imported: it keeps the server's
value. `reload` names such modules to re-execute in the child (module-level code only, no classes: safe to reload);
`same_env` names variables read at import by modules that cannot be reloaded: a caller whose value differs from the
server's gets a fresh process instead (`ForkServer.can_fork`). tests/test_forkserver.py audits the preloaded
modules for module-level environment reads that neither list covers.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

_HEADER = struct.Struct("!I")


def _send(sock: socket.socket, obj: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(obj).encode()
    header = _HEADER.pack(len(data))
    if fds:
        socket.send_fds(sock, [header], fds)
        sock.sendall(data)
    else:
        sock.sendall(header + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise EOFError("the other side closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket, max_fds: int = 0) -> tuple[dict[str, Any], list[int]]:
    fds: list[int] = []
    if max_fds:
        header, fds, _, _ = socket.recv_fds(sock, _HEADER.size, max_fds)
        if not header:
            raise EOFError("the other side closed the connection")
        header += _recv_exact(sock, _HEADER.size - len(header))
    else:
        header = _recv_exact(sock, _HEADER.size)
    (length,) = _HEADER.unpack(header)
    return json.loads(_recv_exact(sock, length)), fds


# ----- the server (python -m vlp.pipelines.local.forkserver SOCKET SPEC) -----


def _block_outside(allowed: list[str]) -> None:
    """The import guard of a step's package set, in the server itself: it may preload only what the set holds, so
    a child's guard (which hides only modules not yet imported) hides the same modules a fresh step's would."""
    from vlp.pipelines.local.import_guard import blocked_modules

    for module in blocked_modules(set(allowed)):
        sys.modules.setdefault(module, None)  # type: ignore[arg-type]


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def _set_command_line(title: str) -> None:
    """Rewrites this process's command line (what ps and /proc/PID/cmdline show) in place, within the bytes the
    server's own argv took: a child of a server that other callers share says whose it is there. The argv memory is
    written through /proc/self/mem, which a process may always do to itself (no privilege); best effort."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end: fields 48 and 49 of proc(5)
        data = title.encode()[: end - start - 1]
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(start)
            mem.write(data + b"\0" * (end - start - len(data)))
    except (OSError, ValueError, IndexError):
        pass


def _run_child(request: dict[str, Any], out_fd: int, reload: list[str]) -> None:
    """In the forked child: become the requested process, run its target, end as an interpreter ends."""
    code = 1
    try:
        os.setsid()
        if request.get("title"):
            _set_command_line(request["title"])
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        os.close(out_fd)
        os.close(devnull)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        if os.environ.get("PYTHONUNBUFFERED"):
            sys.stdout.reconfigure(write_through=True)  # type: ignore[union-attr]
        sys.argv = list(request["argv"])
        for name in reload:
            if sys.modules.get(name) is not None:
                importlib.reload(sys.modules[name])
        module, _, function = request["target"].partition(":")
        try:
            getattr(importlib.import_module(module), function)(list(request["argv"]))
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc)
        except BaseException:
            sys.excepthook(*sys.exc_info())
            code = 1
        # What the interpreter does at exit: join non-daemon threads, then the atexit handlers.
        threading._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001,S110 - nothing left to report it to
                pass
        os._exit(code)


def serve(socket_path: str, spec: dict[str, Any]) -> None:
    """Preload, then fork a child per request until the process that started this one is gone."""
    parent = os.getppid()
    preloading = threading.Event()
    preloading.set()

    def orphaned_while_preloading() -> None:
        # Preloading takes seconds (more on a busy machine): a parent that dies meanwhile must not leave this behind.
        while preloading.is_set():
            if os.getppid() != parent:
                os._exit(0)
            time.sleep(0.2)

    watchdog = threading.Thread(target=orphaned_while_preloading, daemon=True)
    watchdog.start()
    os.environ.update(spec.get("env_at_preload", {}))
    started_env = dict(os.environ)
    if spec.get("allowed") is not None:
        _block_outside(spec["allowed"])
    for module in spec.get("preload", []):
        try:
            importlib.import_module(module)
        except ImportError:
            pass  # outside this server's package set: its children import it (or fail to) as a fresh process would
    preloading.clear()
    # What a sharing caller compares its environment with: the server's before the preload, and after it, which may
    # have set some (torch sets TORCHINDUCTOR_CACHE_DIR, as it does in a caller that imported torch too).
    preloaded_env = dict(os.environ)
    watchdog.join()  # no thread but this one from here on: forking a process with other threads is unsafe
    # The preloaded modules' objects into the collector's permanent generation: a child's collections then never
    # walk them, so never write to (and copy) the pages the server shares with every child. Measured on a warm
    # redeploy (4 runs, 28 steps): the steps' CPU 14.5 s without, 13.7 s with; small, and free.
    gc.collect()
    gc.freeze()
    reload = list(spec.get("reload", []))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(64)
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}
    print("READY", flush=True)
    while os.getppid() == parent:
        for key, _ in selector.select(timeout=1.0):
            if key.fileobj is wake_r:
                try:
                    wake_r.recv(4096)
                except BlockingIOError:
                    pass
                continue
            conn, _ = listener.accept()
            try:
                request, fds = _recv(conn, max_fds=1)
            except (OSError, EOFError, ValueError):
                conn.close()
                continue
            if request.get("describe"):
                # A caller that shares this server (SharedForkServer) compares its environment with the one the
                # preloaded modules saw.
                try:
                    _send(conn, {"env": preloaded_env, "env_before": started_env, "pid": os.getpid()})
                except OSError:
                    pass
                conn.close()
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                for sock in (listener, wake_r, wake_w, *children.values()):
                    sock.close()
                conn.close()
                _run_child(request, fds[0], reload)
            for fd in fds:
                os.close(fd)
            try:
                _send(conn, {"pid": pid})
            except OSError:
                pass
            children[pid] = conn
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                try:
                    _send(conn, {"returncode": os.waitstatus_to_exitcode(status)})
                except OSError:
                    pass
                conn.close()


# ----- the caller's side -----


def _spawn(
    socket_path: str, target: str, argv: list[str], *, env: dict[str, str], cwd: str, stdout_fd: int, title: str
) -> Forked:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(socket_path)
        request = {"target": target, "argv": argv, "env": env, "cwd": cwd, **({"title": title} if title else {})}
        _send(conn, request, [stdout_fd])
        reply, _ = _recv(conn)
    except BaseException:
        conn.close()
        raise
    return Forked(conn, int(reply["pid"]), [target, *argv[:1]])


class Forked:
    """A child of a fork server, answering as subprocess.Popen does: pid (also its process group), poll(), wait(),
    kill(), returncode (negative: the signal that ended it). A thread waits for the server's word on its end, so
    any thread may wait, with or without a timeout."""

    def __init__(self, conn: socket.socket, pid: int, args: list[str]) -> None:
        self.pid = pid
        self.args = args
        self.returncode: int | None = None
        self._ended = threading.Event()
        threading.Thread(target=self._await_end, args=(conn,), daemon=True).start()

    def _await_end(self, conn: socket.socket) -> None:
        try:
            reply, _ = _recv(conn)
            code = int(reply["returncode"])
        except (EOFError, OSError, ValueError, KeyError):
            # The fork server died first: the child is no longer anyone's to wait for. Wait until it is gone.
            while _exists(self.pid):
                time.sleep(0.1)
            code = -signal.SIGKILL
        finally:
            conn.close()
        self.returncode = code
        self._ended.set()

    def poll(self) -> int | None:
        return self.returncode if self._ended.is_set() else None

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ForkServer:
    """Starts `python -m vlp.pipelines.local.forkserver` with `env`, preloading `preload` (within `allowed`, a step's
    package set, when given); `spawn` forks a child that runs `target` ("module:function", called with argv).
    `label` goes on its command line, which its children share (ps shows it; `vlp local down` finds a stack's
    leftovers by the state dir there)."""

    def __init__(
        self,
        preload: list[str],
        *,
        env: dict[str, str],
        allowed: list[str] | None = None,
        reload: list[str] | None = None,
        same_env: list[str] | None = None,
        env_at_preload: dict[str, str] | None = None,
        stderr: Any = None,
        label: str = "",
        title_room: int = 0,
    ) -> None:
        self.env = {**env, **(env_at_preload or {})}
        self.same_env = list(same_env or [])
        self._dir = tempfile.mkdtemp(prefix="vlp-fork-")
        self.socket_path = str(Path(self._dir) / "s")
        spec = {"preload": preload, "allowed": allowed, "reload": reload or [], "env_at_preload": env_at_preload or {}}
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "vlp.pipelines.local.forkserver", self.socket_path, json.dumps(spec),
                *([label] if label else []),
                # Room in argv for the command lines its children write (_set_command_line): blanks.
                *([" " * title_room] if title_room else []),
            ],  # fmt: skip
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
            text=True,
        )
        assert self.process.stdout is not None
        ready = self.process.stdout.readline().strip()
        if ready != "READY":
            self.close()
            raise RuntimeError(f"the fork server did not start (exit code {self.process.poll()}); see its stderr")

    def alive(self) -> bool:
        return self.process.poll() is None

    def can_fork(self, env: dict[str, str]) -> bool:
        """Whether a child with `env` would be what a fresh process is: the server runs, and the variables read at
        import by modules that cannot be reloaded have the server's values."""
        return self.alive() and all(env.get(name) == self.env.get(name) for name in self.same_env)

    def spawn(
        self, target: str, argv: list[str], *, env: dict[str, str], cwd: str, stdout_fd: int, title: str = ""
    ) -> Forked:
        """Fork a child running `target(argv)` with this environment and directory, its stdout and stderr on
        `stdout_fd` (the caller keeps its own copy of the descriptor and closes it when it likes); `title`, when
        given, becomes its command line (as much as the server's title_room holds)."""
        return _spawn(self.socket_path, target, argv, env=env, cwd=cwd, stdout_fd=stdout_fd, title=title)

    def close(self) -> None:
        """Stop the server (its running children go on to their own end)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        shutil.rmtree(self._dir, ignore_errors=True)


class SharedForkServer:
    """A fork server another process started and owns (its socket path), used as ForkServer is: `env` is the
    environment its preloaded modules were imported with, `same_env` what can_fork compares. close() leaves it
    running for its owner."""

    def __init__(self, socket_path: str, same_env: list[str] | None = None) -> None:
        self.socket_path = socket_path
        self.same_env = list(same_env or [])
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.settimeout(10)
            conn.connect(socket_path)
            _send(conn, {"describe": True})
            reply, _ = _recv(conn)
        finally:
            conn.close()
        self.env: dict[str, str] = dict(reply["env"])
        self.env_before: dict[str, str] = dict(reply["env_before"])
        self.pid = int(reply["pid"])

    def alive(self) -> bool:
        return _exists(self.pid)

    def can_fork(self, env: dict[str, str]) -> bool:
        """As ForkServer.can_fork: the server runs, and `same_env`'s variables have its values in `env`."""
        return self.alive() and all(env.get(name) == self.env.get(name) for name in self.same_env)

    def differences(self, env: dict[str, str], ignore_prefixes: tuple[str, ...]) -> list[str]:
        """The variables whose value in `env` differs from the server's, before its preload and after it (a variable
        the preload set itself may have either value), but for names with `ignore_prefixes` (ones no preloaded
        module reads when imported; the caller audits that)."""
        names = set(env) | set(self.env) | set(self.env_before)
        return sorted(
            n
            for n in names
            if not n.startswith(ignore_prefixes) and env.get(n) not in (self.env.get(n), self.env_before.get(n))
        )

    def spawn(
        self, target: str, argv: list[str], *, env: dict[str, str], cwd: str, stdout_fd: int, title: str = ""
    ) -> Forked:
        return _spawn(self.socket_path, target, argv, env=env, cwd=cwd, stdout_fd=stdout_fd, title=title)

    def close(self) -> None:
        pass


if __name__ == "__main__":
    serve(sys.argv[1], json.loads(sys.argv[2]))
