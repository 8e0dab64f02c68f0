"""Stand-in for a Vertex AI serving container: copies a model out of GCS and serves it with `transformers serve`
(one process per deployed model, forked from a warm interpreter); engine_routes.py answers its requests."""

from __future__ import annotations

import atexit
import http.client
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlp.pipelines.local.emulator.engine_routes import _JSON, EngineRoutes, _Server, _Upstream, engine_for, google_error

_LOG_TAIL_LINES = 30
_GENERATE_TIMEOUT_S = 600.0

# What a model server's process imports before it reads its arguments: the fork server (pipelines/local/forkserver.py)
# imports it once, and each model server is forked from it (2-3 s of CPU saved per start).
# Measured with -X importtime after the first four: the rest is what `transformers serve` still imported on start.
_PRELOAD = [
    "torch",
    "transformers",
    "transformers.cli.transformers",
    "transformers.cli.serving",
    "transformers.integrations.hub_kernels",
    "transformers.cli.serving.chat_completion",
    "transformers.cli.serving.completion",
    "transformers.cli.serving.response",
    "transformers.cli.serving.transcription",
    "transformers.cli.serving.systemone",
    "transformers.image_processing_utils",
    "transformers.models.auto.tokenization_auto",
    "transformers.models.auto.auto_factory",
    "transformers.modeling_layers",
    "transformers.masking_utils",
    "transformers.generation.candidate_generator",
    "pydantic.v1",
    "uvicorn",
    "uvicorn.loops.asyncio",
    "uvicorn.protocols.http.h11_impl",
    "uvicorn.protocols.websockets.websockets_sansio_impl",
    "anyio._core._sockets",
]


# CPU threads each local model server may use (torch's intra-op pool); unset: torch's default, one per core.
SERVING_THREADS_ENV = "VLP_SERVING_THREADS"
# The socket of a model fork server that several stacks share (one per test worker in the suite: the preload above
# costs ~5 s of CPU, once per stack otherwise). Used only where the environment the server preloaded with equals
# the model server's, but for names with IMPORT_SAFE_PREFIXES, which no preloaded module reads when imported
# (tests/test_forkserver.py audits that); else the emulator starts its own, and the model server's log says why.
SHARED_FORK_SERVER_ENV = "VLP_MODEL_FORK_SERVER"
IMPORT_SAFE_PREFIXES = ("VLP_", "PYTEST_")
# The emulator a model server belongs to: the server ends when that process is gone, whichever fork server forked it.
OWNER_ENV = "VLP_MODEL_SERVER_OWNER"
# Room for a shared server's children's command lines, which name their state dir (_set_command_line).
TITLE_ROOM = 4096


def model_server_env(base: dict[str, str]) -> dict[str, str]:
    """A model server's environment, from the emulator's: offline (it serves the weights from their GCS copy only:
    no Hub traffic, no Hub token), unbuffered, and without a terminal's size (its output goes to a log file; the
    sizes a shell or a test runner set would only tell its fork servers apart)."""
    env = dict(base)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "COLUMNS", "LINES"):
        env.pop(name, None)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_UPDATE_CHECK="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def start_model_fork_server(env: dict[str, str], label: str) -> Any:
    """A fork server with the model servers' preload, whose children may name themselves (TITLE_ROOM)."""
    from vlp.pipelines.local.forkserver import ForkServer

    return ForkServer(_PRELOAD, env=model_server_env(env), label=label, title_room=TITLE_ROOM)


def serve_child(argv: list[str]) -> None:
    """A model server's process, forked from the fork server: `transformers serve ARGS`. A watchdog thread ends it
    when the emulator that asked for it (OWNER_ENV) is gone, even by SIGKILL, where atexit never runs; the fork
    server may be one that outlives it. PR_SET_PDEATHSIG is not used because it fires when the *thread* that forked
    exits, and the parent may be a shared fork server."""
    owner = int(os.environ.get(OWNER_ENV) or os.getppid())

    def watch() -> None:
        # A pidfd becomes readable when the process ends, and names that process only (no pid reuse).
        try:
            handle = os.pidfd_open(owner)
        except ProcessLookupError:
            os._exit(0)
        select.select([handle], [], [])
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()
    import torch  # preloaded by the fork server: no import cost here

    threads = os.environ.get(SERVING_THREADS_ENV, "")
    if threads:
        # torch sized its thread pool when the fork server imported it; set it here, per server. Several stacks on
        # few cores (the test suite) spend most of a second thread spinning: 2x the CPU for the same latency on the
        # tiny model.
        torch.set_num_threads(int(threads))
    print(f"[emulator] torch threads: {torch.get_num_threads()}", flush=True)
    sys.argv = ["transformers", "serve", *argv]
    from transformers.cli.transformers import main

    main()


def terminate_group(process: Any, grace_s: float = 10.0) -> None:
    """Stop a process group as a container is stopped: SIGTERM, SIGKILL `grace_s` later (a model server; a custom
    job's replica, custom_jobs.py)."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    if process.poll() is None:
        process.kill()


class ServingError(Exception):
    """The model server could not be started; `log_tail` holds the last lines it wrote."""

    def __init__(self, message: str, log_tail: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.log_tail = list(log_tail or [])

    def __str__(self) -> str:
        if not self.log_tail:
            return self.message
        return self.message + "\n--- model server log (tail) ---\n" + "\n".join(self.log_tail)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _split_gcs_uri(uri: str) -> tuple[str, str]:
    match = re.fullmatch(r"gs://([^/]+)/?(.*)", uri.strip())
    if not match:
        raise ServingError(f"artifact_uri {uri!r} is not a gs://BUCKET/PREFIX/ URI: point the Model at its GCS copy")
    prefix = match.group(2)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return match.group(1), prefix


def _tail(path: Path, limit: int) -> list[str]:
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    # Progress bars rewrite one line with \r: keep only what was finally shown.
    lines = [line.rsplit("\r", 1)[-1].rstrip() for line in text.split("\n")]
    lines = [line for line in lines if line.strip()]
    return lines[-limit:] if limit > 0 else []


class ServingManager(EngineRoutes):
    """Starts, stops and talks to one local model server per deployed model."""

    def __init__(self, state_dir: Path, storage_endpoint: str | None, faults: set[str]) -> None:
        self.state_dir = Path(state_dir)
        self.storage_endpoint = storage_endpoint
        self.hub_endpoint = ""  # the stack's Hub (its gate, EMULATOR/hf): set by the emulator when it starts
        # Kept by reference: the emulator flips faults at run time and every call reads them afresh.
        self.faults = faults
        self._servers: dict[str, _Server] = {}
        self._lock = threading.Lock()
        self._forks: Any = None
        self._fork_lock = threading.Lock()
        atexit.register(self.stop_all)

    # ----- lifecycle -----

    @property
    def serving_dir(self) -> Path:
        """Where model copies and model server logs live."""
        return self.state_dir / "serving"

    def log_path(self, deployed_model_id: str) -> Path:
        """The model server log file of a deployed model (kept after undeploy, as Cloud Logging keeps it)."""
        return self.serving_dir / f"{deployed_model_id}.log"

    def logged_ids(self) -> list[str]:
        """Deployed model ids that have a model server log, running or not."""
        if not self.serving_dir.is_dir():
            return []
        return sorted(p.stem for p in self.serving_dir.glob("*.log"))

    def start(self, deployed_model_id: str, artifact_uri: str, container_spec: dict, timeout_s: float = 300) -> None:
        """Copies the model out of GCS and starts its server; returns once /health answers."""
        threads = os.environ.get(SERVING_THREADS_ENV, "")
        if threads and not (threads.isdigit() and int(threads) > 0):
            raise ServingError(
                f"{SERVING_THREADS_ENV}={threads!r}: set a whole number of threads (1 or more), or unset it"
            )
        self.stop(deployed_model_id)
        model_dir = self.serving_dir / deployed_model_id / "model"
        log_path = self.log_path(deployed_model_id)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if artifact_uri.startswith("hf://"):
            self._download_from_hub(artifact_uri.removeprefix("hf://"), container_spec, model_dir)
        else:
            self._copy_model(artifact_uri, model_dir)
        from vlp.pipelines.local.emulator.images import start_refusal

        refused = start_refusal(container_spec, model_dir)
        if refused:
            # The image's own server would stop here, before it answers its health route: write its line to the log
            # that Cloud Logging would show, and fail the deploy as the exited container does.
            code, lines = refused
            with log_path.open("ab") as log:
                log.write(("\n".join(lines) + "\n").encode())
            raise ServingError(
                f"model server for deployed model {deployed_model_id} exited with code {code} before it became "
                f"healthy: the serving container stopped at start (see the log tail)",
                _tail(log_path, _LOG_TAIL_LINES),
            )

        port = _free_port()
        env = {**model_server_env(dict(os.environ)), OWNER_ENV: str(os.getpid())}
        args = [str(model_dir), "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), "--log-level", "info"]
        with log_path.open("ab") as log:
            log.write(f"[emulator] starting model server for {deployed_model_id} on port {port}\n".encode())
            forks, how = self._fork_server(env)
            log.write(f"[emulator] {how}\n".encode())
            log.flush()
            # In a session of its own: stop() signals the whole tree. Its command line names the state dir, as
            # every process of a stack does (`vlp local down` and the tests find leftovers by it).
            process = forks.spawn(
                "vlp.pipelines.local.emulator.serving:serve_child", args, env=env, cwd=str(model_dir.parent),
                stdout_fd=log.fileno(), title=f"vlp model server {deployed_model_id} model-servers:{self.state_dir}",
            )  # fmt: skip
        server = _Server(
            deployed_model_id, engine_for(container_spec), model_dir, log_path, port, process, container_spec
        )
        with self._lock:
            self._servers[deployed_model_id] = server

        deadline = time.monotonic() + timeout_s
        while True:
            code = process.poll()
            if code is not None:
                self._forget(deployed_model_id)
                raise ServingError(
                    f"model server for deployed model {deployed_model_id} exited with code {code} before it became "
                    f"healthy: the weights under {artifact_uri} do not load (see the log tail)",
                    _tail(log_path, _LOG_TAIL_LINES),
                )
            if self._health(server):
                break
            if time.monotonic() > deadline:
                self.stop(deployed_model_id)
                raise ServingError(
                    f"model server for deployed model {deployed_model_id} was not healthy within {timeout_s:.0f} s: "
                    "raise the deploy timeout or serve a smaller model",
                    _tail(log_path, _LOG_TAIL_LINES),
                )
            time.sleep(0.3)

        # The server-crash fault: the server dies on the first request it is sent (as a model that runs out of
        # memory on its first generation does), not on a timer, which a fast smoke test could outrun.
        server.crash_on_first_request = "server-crash" in self.faults

    def _fork_server(self, env: dict[str, str]) -> tuple[Any, str]:
        """The fork server the model servers start from, and a line for the log saying which: the shared one
        (SHARED_FORK_SERVER_ENV) where its environment allows, else the emulator's own (one per environment; the
        emulator's never changes)."""
        from vlp.pipelines.local.forkserver import SharedForkServer

        # Its own lock: starting the server takes seconds, and self._lock guards what every API call reads.
        with self._fork_lock:
            why_not = ""
            shared_path = env.get(SHARED_FORK_SERVER_ENV, "")
            if shared_path:
                try:
                    shared = SharedForkServer(shared_path)
                except (OSError, EOFError, ValueError, KeyError) as exc:
                    why_not = f"the shared fork server at {shared_path} does not answer ({exc})"
                else:
                    differs = shared.differences(env, IMPORT_SAFE_PREFIXES)
                    if not differs:
                        return shared, f"forked from the shared fork server at {shared_path}"
                    why_not = f"the shared fork server's environment differs in {', '.join(differs)}"
            if self._forks is None or not self._forks.alive() or self._forks.env != env:  # env is a model server's already
                if self._forks is not None:
                    self._forks.close()
                # sys.executable is the venv's interpreter, so this works without an activated venv.
                self._forks = start_model_fork_server(env, label=f"model-servers:{self.state_dir}")
            return self._forks, "forked from this emulator's fork server" + (f" ({why_not})" if why_not else "")

    def stop(self, deployed_model_id: str, remove_copy: bool = False) -> None:
        """Stops a model server: SIGTERM to its process group, SIGKILL if it lingers. `remove_copy` (the model
        is undeployed or its revision deleted, not just scaled to zero) also deletes its copy of the weights;
        the log stays, as Cloud Logging keeps it."""
        server = self._forget(deployed_model_id)
        if server is not None:
            self._terminate(server.process)
        if remove_copy:
            import shutil

            shutil.rmtree(self.serving_dir / deployed_model_id, ignore_errors=True)

    def stop_all(self) -> None:
        """Stops every model server this manager started, at once: the emulator is shutting down, and a
        model server keeps nothing worth a graceful stop (the weights stay on disk for the restart)."""
        with self._lock:
            ids = list(self._servers)
        servers = [s for s in (self._forget(i) for i in ids) if s is not None]
        for server in servers:
            try:
                os.killpg(server.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for server in servers:
            server.process.wait()
        with self._fork_lock:
            forks, self._forks = self._forks, None
        if forks is not None:
            forks.close()

    def is_healthy(self, deployed_model_id: str) -> bool:
        """True when the model server runs and its /health answers 200."""
        server = self._servers.get(deployed_model_id)
        return server is not None and server.process.poll() is None and self._health(server)

    def logs(self, deployed_model_id: str, limit: int = 50) -> list[str]:
        """The last lines of a model server's log."""
        return _tail(self.log_path(deployed_model_id), limit)

    def known_ids(self) -> list[str]:
        """Deployed model ids started and not stopped (a crashed server stays known until stopped)."""
        with self._lock:
            return sorted(self._servers)

    # ----- requests -----

    def _send(
        self, server: _Server, method: str, path: str, body: bytes | None, stream: bool = False
    ) -> tuple[int, bytes | Iterator[bytes], str]:
        """One request to the model server. `stream`: an event stream that answers 200 comes back as an iterator of
        its lines, each as the server sends it, so the caller sees the first token when the server sends it, not
        after the last (the connection closes when the iterator is exhausted or closed)."""
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=_GENERATE_TIMEOUT_S)
        handed_over = False
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            ctype = response.getheader("Content-Type") or _JSON
            if stream and response.status == 200 and "text/event-stream" in ctype:
                handed_over = True
                return response.status, _lines(conn, response), ctype
            return response.status, response.read(), ctype
        except OSError:
            dead = self._dead(server, wait_s=2.0)
            if dead:
                raise _Upstream(dead) from None
            message = f"Model server for deployed model {server.deployed_model_id} did not answer."
            raise _Upstream((503, google_error(503, message, "UNAVAILABLE"), _JSON)) from None
        finally:
            if not handed_over:
                conn.close()

    # ----- internals -----

    def _dead(self, server: _Server, wait_s: float = 0.0) -> tuple[int, bytes, str] | None:
        try:
            code = server.process.wait(timeout=wait_s) if wait_s else server.process.poll()
        except subprocess.TimeoutExpired:
            code = None
        if code is None:
            return None
        message = (
            f"The model server of deployed model {server.deployed_model_id} exited with code {code}; "
            "read its logs (prediction_container) and redeploy."
        )
        return 503, google_error(503, message, "UNAVAILABLE"), _JSON

    def _health(self, server: _Server) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=2)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def _crash(self, server: _Server) -> None:
        if server.process.poll() is not None:
            return
        with server.log_path.open("ab") as log:
            log.write(b"[emulator] fault server-crash: killing the model server (SIGKILL)\n")
        try:
            os.killpg(server.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.process.wait()

    def _forget(self, deployed_model_id: str) -> _Server | None:
        with self._lock:
            return self._servers.pop(deployed_model_id, None)

    @staticmethod
    def _terminate(process: Any) -> None:
        terminate_group(process)
        process.wait()

    def _download_from_hub(self, repo_id: str, container_spec: dict, model_dir: Path) -> None:
        """`--model=ORG/NAME`: the image downloads the repo from the Hub itself, with the container's HF_TOKEN (or
        HUGGING_FACE_HUB_TOKEN) for a gated one. Here the Hub is the stack's gate in front of its mirror (the emulator
        sets `hub_endpoint` when it starts), which answers a gated repo as the Hub does."""
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

        if not self.hub_endpoint:
            raise ServingError(f"--model={repo_id} names a Hub repo, and this stack has no Hub to download it from")
        env = {str(e.get("name")): str(e.get("value", "")) for e in container_spec.get("env") or []}
        token = env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN") or False
        try:
            snapshot_download(repo_id, local_dir=model_dir, endpoint=self.hub_endpoint, token=token)
        except GatedRepoError as exc:
            raise ServingError(
                f"{repo_id} is gated: the container's HF_TOKEN has no access (or the container has none); "
                "set HF_TOKEN in the container's env to a token that was granted the model"
            ) from exc
        except RepositoryNotFoundError as exc:
            raise ServingError(f"{repo_id} is not on the Hub (the local stack's Hub mirror has no such repo)") from exc

    def _copy_model(self, artifact_uri: str, model_dir: Path) -> None:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        bucket_name, prefix = _split_gcs_uri(artifact_uri)
        endpoint = self.storage_endpoint or os.environ.get("STORAGE_EMULATOR_HOST")
        if not endpoint:
            raise ServingError("no GCS endpoint configured: start the emulator with the fake-gcs-server URL")
        client = storage.Client(
            project="local", credentials=AnonymousCredentials(), client_options={"api_endpoint": endpoint}
        )
        try:
            blobs = [b for b in client.list_blobs(bucket_name, prefix=prefix) if not b.name.endswith("/")]
        except Exception as exc:  # the storage client raises many kinds; all mean "cannot read the model"
            raise ServingError(f"cannot list {artifact_uri} in GCS ({endpoint}): {exc}") from exc
        if not blobs:
            raise ServingError(f"no objects under {artifact_uri}: mirror the weights to GCS before deploying")

        model_dir.mkdir(parents=True, exist_ok=True)
        wanted = {blob.name[len(prefix) :]: blob for blob in blobs}
        for path in sorted(model_dir.rglob("*"), reverse=True):
            rel = path.relative_to(model_dir).as_posix()
            if path.is_file() and rel not in wanted:
                path.unlink()  # left over from another artifact: the copy must mirror GCS exactly
        for rel, blob in wanted.items():
            dest = model_dir / rel
            if dest.is_file() and dest.stat().st_size == blob.size:
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            partial = dest.with_name(dest.name + ".partial")
            blob.download_to_filename(str(partial))
            partial.replace(dest)




def _lines(conn: http.client.HTTPConnection, response: http.client.HTTPResponse) -> Iterator[bytes]:
    """An event stream's lines as the model server sends them; the connection closes with the iterator."""
    try:
        while True:
            line = response.readline()
            if not line:
                return
            yield line
    except OSError:
        return  # the server went away mid-stream: the caller's stream ends there, as a cut connection would
    finally:
        conn.close()
