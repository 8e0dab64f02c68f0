"""Stand-in for a Vertex AI serving container: copies a model out of GCS and serves it with `transformers serve`."""

from __future__ import annotations

import atexit
import http.client
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# What the "smoke-fail" fault makes the served model say: a wrong answer, not an error.
WRONG_ANSWER = "I am not sure."

# vLLM's SamplingParams default; TGI's default max_new_tokens (router `default_max_new_tokens`).
_VLLM_DEFAULT_MAX_TOKENS = 16
_TGI_DEFAULT_MAX_NEW_TOKENS = 100
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
    from pipelines.local.forkserver import ForkServer

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


@dataclass
class _Server:
    deployed_model_id: str
    engine: str
    model_dir: Path
    log_path: Path
    port: int
    process: Any  # a forkserver.Forked (or a Popen), with its own process group
    container_spec: dict = field(default_factory=dict)
    crash_on_first_request: bool = False  # the server-crash fault


def engine_for(container_spec: dict) -> str:
    """Names the serving engine a Vertex containerSpec runs: "vllm", "tgi" or "openai"."""
    image = str(container_spec.get("imageUri") or container_spec.get("image_uri") or "")
    words = " ".join(
        [image, *map(str, container_spec.get("args") or []), *map(str, container_spec.get("command") or [])]
    ).lower()
    if "vllm" in words:
        return "vllm"
    if "text-generation-inference" in words or re.search(r"\btgi\b", words):
        return "tgi"
    return "openai"


def google_error(code: int, message: str, status: str) -> bytes:
    """A Google API error body, the shape google-api-core turns into a typed exception."""
    return json.dumps({"error": {"code": code, "message": message, "status": status}}).encode()


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


class ServingManager:
    """Starts, stops and talks to one local model server per deployed model."""

    def __init__(self, state_dir: Path, storage_endpoint: str | None, faults: set[str]) -> None:
        self.state_dir = Path(state_dir)
        self.storage_endpoint = storage_endpoint
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
        self._copy_model(artifact_uri, model_dir)

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
                "pipelines.local.emulator.serving:serve_child", args, env=env, cwd=str(model_dir.parent),
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
        from pipelines.local.forkserver import SharedForkServer

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

    def forward(
        self, deployed_model_id: str, kind: str, body: bytes, subpath: str | None = None, method: str = "POST"
    ) -> tuple[int, bytes, str]:
        """Answers a predict / rawPredict / invoke / chat request as the deployed container would."""
        server = self._servers.get(deployed_model_id)
        if server is None:
            return 404, google_error(404, f"Deployed model {deployed_model_id} is not served.", "NOT_FOUND"), _JSON
        dead = self._dead(server)
        if dead:
            return dead
        if server.crash_on_first_request:
            server.crash_on_first_request = False
            self._crash(server)  # returns once the process is gone, so _dead answers
            return self._dead(server)  # type: ignore[return-value]
        if server.engine == "tgi" and kind in ("rawPredict", "invoke"):
            # rawPredict reaches the container's predict route, which the DLC serves with vertex_compatibility;
            # invoke and a Cloud Run URL name the route themselves.
            predict_route = str(server.container_spec.get("predictRoute") or "/vertex")
            path = predict_route if kind == "rawPredict" else (subpath or "/")
            try:
                return self._tgi_route(server, method if kind == "invoke" else "POST", path, body)
            except _Upstream as exc:
                return exc.answer
        try:
            payload = json.loads(body or b"{}")
        except ValueError as exc:
            return 400, google_error(400, f"Request body is not JSON: {exc}", "INVALID_ARGUMENT"), _JSON
        if not isinstance(payload, dict):
            return 400, google_error(400, "Request body must be a JSON object.", "INVALID_ARGUMENT"), _JSON
        try:
            refused = self._refuse_images(server, payload)
            if refused:
                return refused
            if kind == "predict":
                return self._predict(server, payload, with_id=True)
            if kind == "chat":
                if server.engine == "tgi":
                    # Vertex forwards chat completions to the container's predict route, which for the TGI DLC is
                    # /vertex: it takes only {"instances": [...]} (router/src/vertex.rs, v2.4.0) and answers 422.
                    return (
                        422,
                        json.dumps({"error": "Input validation error", "error_type": "validation"}).encode(),
                        _JSON,
                    )
                return self._openai(server, "/v1/chat/completions", payload)
            if kind == "rawPredict":
                return self._raw(server, payload, None)
            if kind == "invoke":
                return self._raw(server, payload, subpath or "/")
        except _Upstream as exc:
            return exc.answer
        except _BadRequest as exc:
            return 400, google_error(400, str(exc), "INVALID_ARGUMENT"), _JSON
        return 400, google_error(400, f"Unknown request kind {kind!r}.", "INVALID_ARGUMENT"), _JSON

    def _tgi_route(self, server: _Server, method: str, path: str, body: bytes) -> tuple[int, bytes, str]:
        """TGI's own router (router/src/server.rs, v2.4.0: the routes every TGI 2.x release serves, plus the
        AIP_PREDICT_ROUTE / AIP_HEALTH_ROUTE of its `google` feature): an unknown path is 404, a known one with
        the other method 405, a body without the route's required field 422 (axum's Json rejection)."""
        predict = str(server.container_spec.get("predictRoute") or "/vertex")
        health = str(server.container_spec.get("healthRoute") or "/health")
        posts = TGI_POST_ROUTES | {predict}
        gets = TGI_GET_ROUTES | {health}
        if path not in posts | gets:
            return 404, b"", "text/plain"
        if (method == "GET" and path not in gets) or (method != "GET" and path not in posts):
            return 405, b"", "text/plain"
        if method == "GET":
            if path == "/info":
                info = {"model_id": str(server.model_dir), "model_dtype": "torch.float16", "router": "text-generation-router"}
                return 200, json.dumps(info).encode(), _JSON
            if path == "/metrics":
                return 200, b"# TYPE tgi_request_count counter\n", "text/plain; version=0.0.4"
            return 200, b"", "text/plain"
        try:
            payload = json.loads(body or b"{}")
        except ValueError as exc:
            return 400, f"Failed to parse the request body as JSON: {exc}".encode(), "text/plain"
        if not isinstance(payload, dict):
            return 422, b"Failed to deserialize the JSON body into the target type: expected a map", "text/plain"

        def missing(field_name: str) -> tuple[int, bytes, str]:
            text = f"Failed to deserialize the JSON body into the target type: missing field `{field_name}`"
            return 422, text.encode(), "text/plain"

        try:
            refused = self._refuse_images(server, payload)
            if refused:
                return refused
            if path in ("/vertex", predict):
                if not isinstance(payload.get("instances"), list):
                    return missing("instances")
                return self._predict(server, payload, with_id=False)
            if path == "/v1/chat/completions":
                if "messages" not in payload:
                    return missing("messages")
                return self._openai(server, path, payload)
            if path == "/v1/completions":
                if "prompt" not in payload:
                    return missing("prompt")
                return self._openai(server, path, payload)
            if path == "/tokenize":
                return 501, b"the local stand-in does not emulate TGI's /tokenize", "text/plain"
            if not isinstance(payload.get("inputs"), str):
                return missing("inputs")
            text = self._generate_tgi(server, payload["inputs"], payload.get("parameters") or {})
            if path == "/generate_stream":
                event = {"index": 1, "token": {"id": 0, "text": text, "special": False}, "generated_text": text}
                return 200, f"data:{json.dumps(event)}\n\n".encode(), "text/event-stream"
            if path in ("/", "/invocations"):  # compat_generate answers a list
                return 200, json.dumps([{"generated_text": text}]).encode(), _JSON
            return 200, json.dumps({"generated_text": text}).encode(), _JSON
        except _BadRequest as exc:
            return 422, f"Input validation error: {exc}".encode(), "text/plain"

    def _refuse_images(self, server: _Server, payload: dict) -> tuple[int, bytes, str] | None:
        """Image content sent to a text-only model: the containers refuse it (vLLM 0.6.2's chat_utils raises for a
        model type without an image placeholder; TGI validates chunks against the model's processor: wording of
        both unverified). Dropping it would let a Vision smoke test pass while testing nothing."""
        if not _has_image(payload) or _is_vision_model(server.model_dir):
            return None
        message = f"{server.model_dir.name} is not a multimodal model: image content is not supported for this model"
        if server.engine == "tgi":
            return 422, json.dumps({"error": f"Input validation error: {message}", "error_type": "validation"}).encode(), _JSON
        return 400, json.dumps({"object": "error", "message": message, "type": "BadRequestError", "code": 400}).encode(), _JSON

    def _predict(self, server: _Server, payload: dict, with_id: bool) -> tuple[int, bytes, str]:
        instances = payload.get("instances")
        if not isinstance(instances, list) or not instances:
            raise _BadRequest('PredictRequest needs a non-empty "instances" list.')
        parameters = payload.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise _BadRequest('"parameters" must be a JSON object.')
        predictions = [self._predict_one(server, instance, parameters) for instance in instances]
        answer: dict[str, Any] = {"predictions": predictions}
        if with_id:
            answer["deployedModelId"] = server.deployed_model_id
        return 200, json.dumps(answer).encode(), _JSON

    def _predict_one(self, server: _Server, instance: Any, parameters: dict) -> Any:
        if not isinstance(instance, dict):
            raise _BadRequest("Each instance must be a JSON object.")
        if server.engine == "tgi":
            return self._predict_tgi(server, instance, parameters)
        # vLLM (Vertex Model Garden handler) and the generic OpenAI engine share the instance format:
        # {"prompt", "max_tokens", "temperature", "top_p", "top_k", "raw_response"} or, with
        # "@requestFormat": "chatCompletions", an OpenAI chat body whose whole response is the prediction.
        settings = {**parameters, **instance}
        if settings.get("@requestFormat") == "chatCompletions" or "messages" in instance:
            chat = {k: v for k, v in settings.items() if k not in ("@requestFormat", "raw_response", "top_k")}
            chat.pop("stream", None)
            answer = self._call_json(server, "/v1/chat/completions", chat)
            # The handler answers as the server it wraps: with its served name, never the emulator's local path.
            answer["model"] = chat.get("model") or _served_names(server)[0]
            return answer
        prompt = instance.get("prompt")
        if not isinstance(prompt, str):
            raise _BadRequest('A vLLM instance needs a "prompt" string (or "@requestFormat": "chatCompletions").')
        text = self._complete_vllm(server, prompt, settings)
        if server.engine == "openai" or settings.get("raw_response"):
            return text
        return f"Prompt:\n{prompt}\nOutput:\n{text}"

    def _predict_tgi(self, server: _Server, instance: dict, parameters: dict) -> str:
        # The Hugging Face TGI DLC's Vertex route (/vertex) takes {"inputs", "parameters"} per instance, or an
        # OpenAI chat body, and answers {"predictions": [str, ...]}: the generated text itself, no wrapper.
        # PredictRequest.parameters never reach TGI: its VertexRequest has only `instances`.
        if "messages" in instance:
            # A ChatRequest: temperature 0 means greedy (router/src/lib.rs, v2.4.0).
            chat = {k: v for k, v in instance.items() if k not in ("stream",)}
            answer = self._call_json(server, "/v1/chat/completions", chat)
            return str(answer["choices"][0]["message"]["content"])
        inputs = instance.get("inputs")
        if not isinstance(inputs, str):
            raise _BadRequest('A TGI instance needs an "inputs" string (or OpenAI "messages").')
        # The `inputs` form forces do_sample: true and keeps only max_new_tokens and seed (router/src/vertex.rs).
        given = instance.get("parameters") or {}
        forced = {"max_new_tokens": given.get("max_new_tokens"), "seed": given.get("seed"), "do_sample": True}
        return self._generate_tgi(server, inputs, forced)

    def _generate_tgi(self, server: _Server, inputs: str, params: dict) -> str:
        text = self._complete(
            server,
            inputs,
            max_tokens=params.get("max_new_tokens") or _TGI_DEFAULT_MAX_NEW_TOKENS,
            # TGI samples when a warper (temperature, top_p, top_k) is set, else decodes greedily, as
            # transformers serve does with the model's default generation config.
            temperature=params.get("temperature"),
            top_p=params.get("top_p"),
            top_k=params.get("top_k"),
            stop=params.get("stop"),
            seed=params.get("seed"),
            do_sample=params.get("do_sample"),
        )
        return inputs + text if params.get("return_full_text") else text

    def _raw(self, server: _Server, payload: dict, subpath: str | None) -> tuple[int, bytes, str]:
        # rawPredict sends the body to the container's predict route untouched; invoke names the route.
        # Routes are told apart by the body's shape, as the containers' own routers do.
        route = subpath or str(server.container_spec.get("predictRoute") or "")
        if server.engine == "vllm" and not subpath and "instances" not in payload:
            return self._vllm_generate(server, payload)
        openai_body = not subpath and "instances" not in payload
        if route.endswith("/chat/completions") or (openai_body and "messages" in payload):
            return self._openai(server, "/v1/chat/completions", payload)
        if route.endswith("/completions") or (openai_body and "prompt" in payload):
            return self._openai(server, "/v1/completions", payload)
        if "instances" in payload:
            return self._predict(server, payload, with_id=False)
        if "inputs" in payload:
            # TGI's /generate: {"inputs", "parameters"} -> {"generated_text"}.
            text = self._generate_tgi(server, str(payload["inputs"]), payload.get("parameters") or {})
            return 200, json.dumps({"generated_text": text}).encode(), _JSON
        if subpath:
            return self._send(server, "POST", subpath, json.dumps(payload).encode())
        raise _BadRequest("rawPredict body is neither a PredictRequest, a TGI /generate body nor an OpenAI body.")

    def _vllm_generate(self, server: _Server, payload: dict) -> tuple[int, bytes, str]:
        """A body without `instances` on the vLLM image's predict route (/generate): vLLM 0.6.2's api_server pops
        `prompt` and `stream` and builds SamplingParams from the rest, so an OpenAI body (`model`, `messages`) is
        an unexpected keyword: 500 Internal Server Error; a `prompt` body answers {"text": [prompt + output]}
        (vllm/entrypoints/api_server.py at v0.6.2; what Model Garden's build adds on this route besides
        `instances` is not published: unverified, so only upstream's shape is answered)."""
        body = dict(payload)
        prompt = body.pop("prompt", None)
        body.pop("stream", None)
        unknown = sorted(set(body) - _VLLM_SAMPLING_PARAMS)
        if not isinstance(prompt, str) or unknown:
            return 500, b"Internal Server Error", "text/plain; charset=utf-8"
        text = self._complete_vllm(server, prompt, body)
        return 200, json.dumps({"text": [prompt + text]}).encode(), _JSON

    def _complete_vllm(self, server: _Server, prompt: str, params: dict) -> str:
        """A completion with vLLM's sampling parameters (its default max_tokens when none is given)."""
        return self._complete(
            server,
            prompt,
            max_tokens=params.get("max_tokens", _VLLM_DEFAULT_MAX_TOKENS),
            temperature=params.get("temperature"),
            top_p=params.get("top_p"),
            top_k=params.get("top_k"),
            stop=params.get("stop"),
            seed=params.get("seed"),
        )

    def _openai(self, server: _Server, path: str, payload: dict) -> tuple[int, bytes, str]:
        body = dict(payload)
        requested = body.get("model")
        shown = requested
        if server.engine == "vllm":
            # vLLM 0.6.2 serving_engine._check_model: a name other than --served-model-name is 404. A request
            # without one is let through: what the Model Garden image does with it (Vertex's chat route for
            # self-deployed models) no source settles (unverified; upstream vLLM would answer 400).
            names = _served_names(server)
            if requested and requested not in names:
                message = f"The model `{requested}` does not exist."
                error = {"object": "error", "message": message, "type": "NotFoundError", "param": None, "code": 404}
                return 404, json.dumps(error).encode(), _JSON
        elif server.engine == "tgi":
            # TGI ignores the request's model and answers with its own model id (router/src/server.rs,
            # chat_completions: `model: info.model_id`).
            shown = _tgi_model_id(server)
        # transformers serve is pinned to the model directory and refuses any other model name.
        body["model"] = str(server.model_dir)
        status, data, ctype = self._send(server, "POST", path, json.dumps(body).encode())
        if status != 200:
            return status, data, ctype
        return 200, self._rewrite(data, ctype, shown), ctype

    def _rewrite(self, data: bytes, ctype: str, requested: Any) -> bytes:
        """Shows the caller's model name instead of the local path, and applies the smoke-fail fault."""
        wrong = "smoke-fail" in self.faults
        name = requested if isinstance(requested, str) and requested else None
        if "text/event-stream" in ctype:
            out: list[str] = []
            first = True
            for line in data.decode("utf-8", errors="replace").split("\n"):
                if line.startswith("data: ") and line[6:].strip() not in ("", "[DONE]"):
                    try:
                        chunk = json.loads(line[6:])
                    except ValueError:
                        out.append(line)
                        continue
                    if name:
                        chunk["model"] = name
                    if wrong:
                        for choice in chunk.get("choices") or []:
                            delta = choice.get("delta") or {}
                            if delta.get("content") is not None:
                                delta["content"] = WRONG_ANSWER if first else ""
                                first = False
                            if choice.get("text") is not None:
                                choice["text"] = WRONG_ANSWER if first else ""
                                first = False
                    line = "data: " + json.dumps(chunk)
                out.append(line)
            return "\n".join(out).encode()
        try:
            answer = json.loads(data)
        except ValueError:
            return data
        if name:
            answer["model"] = name
        if wrong:
            _make_wrong(answer)
        return json.dumps(answer).encode()

    def _complete(self, server: _Server, prompt: str, *, max_tokens: Any, **sampling: Any) -> str:
        body: dict[str, Any] = {"model": str(server.model_dir), "prompt": prompt, "max_tokens": int(max_tokens)}
        for key in ("temperature", "top_p", "stop", "seed"):
            if sampling.get(key) is not None:
                body[key] = sampling[key]
        top_k = sampling.get("top_k")
        top_k = int(top_k) if top_k is not None and int(top_k) > 0 else None
        if top_k or sampling.get("do_sample"):
            # The OpenAI completions schema has no top_k or do_sample; transformers serve takes them inside a full
            # generation_config, which replaces the model's own, so start from the model's.
            config_path = server.model_dir / "generation_config.json"
            config = json.loads(config_path.read_text()) if config_path.exists() else {}
            config.pop("transformers_version", None)
            config.update(do_sample=True, **({"top_k": top_k} if top_k else {}))
            body["generation_config"] = json.dumps(config)
        answer = self._call_json(server, "/v1/completions", body)
        return str(answer["choices"][0]["text"])

    def _call_json(self, server: _Server, path: str, body: dict) -> dict:
        body = {**body, "model": str(server.model_dir)}
        status, data, ctype = self._send(server, "POST", path, json.dumps(body).encode())
        if status != 200:
            raise _Upstream((status, data, ctype))
        answer = json.loads(data)
        if "smoke-fail" in self.faults:
            _make_wrong(answer)
        return answer

    def _send(self, server: _Server, method: str, path: str, body: bytes | None) -> tuple[int, bytes, str]:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=_GENERATE_TIMEOUT_S)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            data = response.read()  # buffers SSE streams too: simple, and fine for local models
            return response.status, data, response.getheader("Content-Type") or _JSON
        except OSError:
            dead = self._dead(server, wait_s=2.0)
            if dead:
                raise _Upstream(dead) from None
            message = f"Model server for deployed model {server.deployed_model_id} did not answer."
            raise _Upstream((503, google_error(503, message, "UNAVAILABLE"), _JSON)) from None
        finally:
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
        for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
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
        process.wait()

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


_JSON = "application/json"
# TGI 2.x's routes (router/src/server.rs): base, info and health routes; `/invocations` is its SageMaker route.
TGI_POST_ROUTES = frozenset(
    {"/", "/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions", "/vertex", "/tokenize", "/invocations"}
)
TGI_GET_ROUTES = frozenset({"/", "/info", "/health", "/ping", "/metrics"})
# vLLM 0.6.2's SamplingParams fields (vllm/sampling_params.py): what its api_server's /generate takes besides prompt.
_VLLM_SAMPLING_PARAMS = frozenset(
    {
        "n", "best_of", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p",
        "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos", "max_tokens", "min_tokens", "logprobs",
        "prompt_logprobs", "detokenize", "skip_special_tokens", "spaces_between_special_tokens",
        "include_stop_str_in_output", "truncate_prompt_tokens", "guided_decoding", "logit_bias", "allowed_token_ids",
    }
)  # fmt: skip


def _served_names(server: _Server) -> list[str]:
    """vLLM's --served-model-name values (the model path when there are none)."""
    args = [str(a) for a in server.container_spec.get("args") or []]
    names: list[str] = []
    for i, arg in enumerate(args):
        if arg.startswith("--served-model-name="):
            names += arg.split("=", 1)[1].split()
        elif arg == "--served-model-name":
            names += [a for a in args[i + 1 :] if not a.startswith("--")][:1]
    if names:
        return names
    model = next((a.split("=", 1)[1] for a in args if a.startswith("--model=")), "")
    return [model or str(server.model_dir)]


def _tgi_model_id(server: _Server) -> str:
    """TGI's model id: --model-id, else MODEL_ID (the DLC points it at the copied weights)."""
    args = [str(a) for a in server.container_spec.get("args") or []]
    for i, arg in enumerate(args):
        if arg.startswith("--model-id="):
            return arg.split("=", 1)[1]
        if arg == "--model-id" and i + 1 < len(args):
            return args[i + 1]
    env = {e.get("name"): e.get("value") for e in server.container_spec.get("env") or [] if isinstance(e, dict)}
    return str(env.get("MODEL_ID") or "/tmp/model")


def _has_image(payload: Any) -> bool:
    """Image content anywhere in a request: OpenAI `image_url` parts, or vLLM's `multi_modal_data`."""
    if isinstance(payload, dict):
        if "multi_modal_data" in payload or payload.get("type") == "image_url" or "image_url" in payload:
            return True
        return any(_has_image(v) for v in payload.values())
    if isinstance(payload, list):
        return any(_has_image(v) for v in payload)
    return False


def _is_vision_model(model_dir: Path) -> bool:
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return "vision_config" in config or any("Vision" in a or "Llava" in a for a in config.get("architectures") or [])


class _BadRequest(Exception):
    pass


class _Upstream(Exception):
    def __init__(self, answer: tuple[int, bytes, str]) -> None:
        super().__init__(answer[0])
        self.answer = answer


def _make_wrong(answer: Any) -> None:
    if not isinstance(answer, dict):
        return
    for choice in answer.get("choices") or []:
        if isinstance(choice.get("message"), dict):
            choice["message"]["content"] = WRONG_ANSWER
        if "text" in choice:
            choice["text"] = WRONG_ANSWER
