"""How a serving container answers: the routes of the vLLM and TGI images the emulator stands in for, translated to
the `transformers serve` process behind them (pipelines/local/emulator/serving.py starts and stops those)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# What the "smoke-fail" fault makes the served model say: a wrong answer, not an error.
WRONG_ANSWER = "I am not sure."


# vLLM's SamplingParams default; TGI's default max_new_tokens (router `default_max_new_tokens`).
_VLLM_DEFAULT_MAX_TOKENS = 16


_TGI_DEFAULT_MAX_NEW_TOKENS = 100


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
    """Names the serving engine a Vertex containerSpec runs: "vllm-openai" (vLLM's own image, `vllm serve`), "vllm"
    (Model Garden's vLLM image), "tgi" or "openai" (an image the catalog does not know)."""
    from vlp.pipelines.local.emulator.images import image_of

    known = image_of(container_spec)
    if known is not None:
        return {"openai": "vllm-openai", "model-garden": "vllm", "tgi": "tgi"}[known.api]
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


def _vllm_error(message: str, code: int = 400) -> bytes:
    """vLLM's OpenAI server error body (ErrorResponse)."""
    kind = "BadRequestError" if code == 400 else "NotImplementedError"
    return json.dumps({"object": "error", "message": message, "type": kind, "param": None, "code": code}).encode()


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


class EngineRoutes:
    """The request side of the model servers (mixed into serving.ServingManager, which owns the processes and
    provides `_servers`, `_send`, `_dead`, `_crash` and `faults`)."""

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
        if server.engine == "vllm-openai":
            try:
                return self._vllm_openai(server, kind, body, subpath, method)
            except _Upstream as exc:
                return exc.answer
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

    def _vllm_openai(
        self, server: _Server, kind: str, body: bytes, subpath: str | None, method: str
    ) -> tuple[int, bytes, str]:
        """vLLM's own image (`vllm serve`): OpenAI routes only. :predict and :rawPredict reach its predict route
        (predictRoute), invoke names the route. Vertex's v1beta1 chat-completions route is documented for Model
        Garden and TGI images only (unverified for this one, so refused)."""
        from vlp.pipelines.local.emulator.images import image_of

        if kind == "chat":
            message = (
                "Chat completions through Vertex are not documented for this serving container (vLLM's own image): "
                "call its predict route with :rawPredict, or its /v1/chat/completions through invoke."
            )
            return 400, google_error(400, message, "FAILED_PRECONDITION"), _JSON
        image = image_of(server.container_spec)
        routes = set(image.routes) if image else set()
        path = (subpath or "/") if kind == "invoke" else str(server.container_spec.get("predictRoute") or "/")
        if path not in routes:
            return 404, json.dumps({"detail": "Not Found"}).encode(), _JSON  # FastAPI's answer to an unknown route
        if method == "GET" or path in ("/health", "/ping"):
            if path in ("/health", "/ping"):
                return 200, b"", _JSON
            if path == "/v1/models":
                models = [{"id": n, "object": "model", "owned_by": "vllm"} for n in _served_names(server)]
                return 200, json.dumps({"object": "list", "data": models}).encode(), _JSON
            if path == "/version":
                return 200, json.dumps({"version": image.engine_version if image else ""}).encode(), _JSON
            return 405, json.dumps({"detail": "Method Not Allowed"}).encode(), _JSON
        try:
            payload = json.loads(body or b"{}")
        except ValueError as exc:
            return 400, _vllm_error(f"JSON decode error: {exc}"), _JSON
        if not isinstance(payload, dict):
            return 400, _vllm_error("Input should be a valid dictionary"), _JSON
        if path == "/invocations":  # its SageMaker route: the body's shape picks chat or completions
            path = "/v1/chat/completions" if "messages" in payload else "/v1/completions"
        required = "messages" if path == "/v1/chat/completions" else "prompt"
        if path not in ("/v1/chat/completions", "/v1/completions"):
            return 501, _vllm_error(f"{path} is served by the image but not by the local stand-in"), _JSON
        if required not in payload:
            # A PredictRequest ({"instances": ...}) sent by :predict lands here: an OpenAI route refuses it
            # (request validation: 400; exact wording unverified).
            return 400, _vllm_error(f"[{{'type': 'missing', 'loc': ('body', '{required}'), 'msg': 'Field required'}}]"), _JSON
        refused = self._refuse_images(server, payload)
        if refused:
            return refused
        return self._openai(server, path, payload)

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
        if server.engine in ("vllm", "vllm-openai"):
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
        # `stream`: the events pass on as the model server sends them (a client's time to first token is real).
        status, data, ctype = self._send(server, "POST", path, json.dumps(body).encode(), stream=bool(body.get("stream")))
        if status != 200:
            return status, data, ctype
        if not isinstance(data, bytes):
            return 200, self._rewrite_stream(data, shown), ctype
        return 200, self._rewrite(data, ctype, shown), ctype

    def _rewrite_stream(self, lines: Iterator[bytes], requested: Any) -> Iterator[bytes]:
        """_rewrite for an event stream, line by line as it arrives."""
        name = requested if isinstance(requested, str) and requested else None
        state = {"first": True, "wrong": "smoke-fail" in self.faults}
        try:
            for line in lines:
                text = line.decode("utf-8", errors="replace")
                end = text[len(text.rstrip("\r\n")) :]
                yield (_rewrite_event_line(text.rstrip("\r\n"), name, state) + end).encode()
        finally:
            close = getattr(lines, "close", None)
            if close is not None:
                close()  # the caller stopped reading: let the model server's connection go

    def _rewrite(self, data: bytes, ctype: str, requested: Any) -> bytes:
        """Shows the caller's model name instead of the local path, and applies the smoke-fail fault."""
        wrong = "smoke-fail" in self.faults
        name = requested if isinstance(requested, str) and requested else None
        if "text/event-stream" in ctype:
            state = {"first": True, "wrong": wrong}
            lines = data.decode("utf-8", errors="replace").split("\n")
            return "\n".join(_rewrite_event_line(line, name, state) for line in lines).encode()
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


def _rewrite_event_line(line: str, name: str | None, state: dict[str, bool]) -> str:
    """One line of an OpenAI event stream with the caller's model name and the smoke-fail fault applied (`state`:
    whether the fault's wrong answer is still to be sent, across the stream's lines)."""
    if not (line.startswith("data: ") and line[6:].strip() not in ("", "[DONE]")):
        return line
    try:
        chunk = json.loads(line[6:])
    except ValueError:
        return line
    if name:
        chunk["model"] = name
    if state["wrong"]:
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content") is not None:
                delta["content"] = WRONG_ANSWER if state["first"] else ""
                state["first"] = False
            if choice.get("text") is not None:
                choice["text"] = WRONG_ANSWER if state["first"] else ""
                state["first"] = False
    return "data: " + json.dumps(chunk)
