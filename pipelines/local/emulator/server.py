"""Vertex AI v1 REST emulator: models, endpoints, long-running operations, pipeline jobs and schedules."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from google.cloud import aiplatform_v1 as v1
from google.longrunning import operations_pb2
from google.protobuf import empty_pb2, field_mask_pb2, json_format

from pipelines.local.emulator import contract
from pipelines.local.emulator.errors import _CODES, ApiError

_LOG = logging.getLogger(__name__)

STATE_FILE = "emulator-state.json"
_ID_BASE = 1_000_000_000_000_000_000  # 19-digit ids, the shape Vertex uses for models and endpoints

_LOC = r"/v1/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)"
_ALIAS_RE = re.compile(r"^[a-z][a-zA-Z0-9-]{0,126}[a-z0-9]$|^[a-z]$")
_RESOURCE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_PREDICT_KINDS = ("predict", "rawPredict", "chat", "invoke")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _to_dict(pb: Any) -> dict[str, Any]:
    return json_format.MessageToDict(pb)


def _conform(proto_cls: Any, data: dict[str, Any]) -> dict[str, Any]:
    """Round-trip through the proto so every answer has exactly the shape a client will parse."""
    return _to_dict(json_format.ParseDict(data, proto_cls.pb()()))


def _parse_request(
    proto_cls: Any,
    body: bytes,
    *,
    body_field: str | None = "*",
    query: dict[str, list[str]] | None = None,
    path_fields: dict[str, str] | None = None,
) -> Any:
    """Parse body + query + path into the request proto, rejecting unknown or mistyped fields as Vertex does."""
    # proto-plus classes expose .pb(); plain protobuf classes (longrunning) are used as they are.
    pb_cls = proto_cls.pb() if hasattr(proto_cls, "pb") else proto_cls
    msg = pb_cls()
    text = body.decode("utf-8") if body else ""
    try:
        if body_field == "*" and text.strip():
            json_format.Parse(text, msg, ignore_unknown_fields=False)
        elif body_field and body_field != "*" and text.strip():
            json_format.Parse(text, getattr(msg, body_field), ignore_unknown_fields=False)
        if query:
            # Query values arrive as strings; json_format accepts strings for numbers and field masks.
            flat = {k: v[0] for k, v in query.items() if not k.startswith("$") and v}
            extra = pb_cls()
            json_format.ParseDict(flat, extra, ignore_unknown_fields=False)
            msg.MergeFrom(extra)
    except (json_format.ParseError, UnicodeDecodeError, ValueError) as exc:
        raise ApiError("INVALID_ARGUMENT", f"Invalid JSON payload received. {exc}") from exc
    for field, value in (path_fields or {}).items():
        setattr(msg, field, value)
    return msg


def _pack_op(
    name: str,
    metadata: Any,
    *,
    response: Any | None = None,
    error: ApiError | None = None,
    done: bool = False,
) -> dict[str, Any]:
    op = operations_pb2.Operation(name=name, done=done)
    op.metadata.Pack(metadata)
    if error is not None:
        op.done = True
        op.error.code = error.rpc_code
        op.error.message = error.message
    elif response is not None:
        op.done = True
        op.response.Pack(response)
    return json_format.MessageToDict(op)


def _generic_meta(meta_cls: Any, created: str) -> Any:
    meta = meta_cls.pb()()
    json_format.ParseDict({"genericMetadata": {"createTime": created, "updateTime": _now()}}, meta)
    return meta


_FILTER_TERM = re.compile(r'^\s*(?P<key>[A-Za-z_][A-Za-z0-9_.\-]*)\s*(?P<op>!=|=|:)\s*(?P<value>"[^"]*"|\S+)\s*$')


def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _filter_items(items: list[dict[str, Any]], expr: str) -> list[dict[str, Any]]:
    """Apply the subset of AIP-160 filters the SDK and our pipelines send: `a=b AND labels.k="v"`."""
    if not expr.strip():
        return items
    terms = []
    for raw in re.split(r"\s+AND\s+", expr.strip()):
        m = _FILTER_TERM.match(raw)
        if not m:
            raise ApiError("INVALID_ARGUMENT", f"Unsupported filter term {raw!r} in filter {expr!r}.")
        value = m["value"]
        if value.startswith('"'):
            value = value[1:-1]
        terms.append((m["key"], m["op"], value))

    def lookup(item: dict[str, Any], key: str) -> Any:
        if key.startswith("labels."):
            return item.get("labels", {}).get(key[len("labels.") :])
        return item.get(_camel(key))

    def matches(item: dict[str, Any]) -> bool:
        for key, op, value in terms:
            have = lookup(item, key)
            if op == ":":
                ok = have is not None and (value == "*" or value in str(have))
            else:
                ok = have is not None and str(have) == value
                ok = ok if op == "=" else not ok
            if not ok:
                return False
        return True

    return [item for item in items if matches(item)]


def _paginate(items: list[Any], page_size: int, page_token: str) -> tuple[list[Any], str]:
    start = int(page_token) if page_token.isdigit() else 0
    size = page_size if page_size > 0 else 100
    page = items[start : start + size]
    nxt = str(start + size) if start + size < len(items) else ""
    return page, nxt


def _apply_mask(dest: dict[str, Any], src: dict[str, Any], paths: Iterable[str]) -> None:
    """Copy each masked field from src into dest (absent in src means cleared), as UpdateX does."""
    for path in paths:
        parts = [_camel(p) for p in path.split(".")]
        d, s = dest, src
        for part in parts[:-1]:
            d = d.setdefault(part, {})
            s = s.get(part, {}) if isinstance(s, dict) else {}
        if parts[-1] in s:
            d[parts[-1]] = s[parts[-1]]
        else:
            d.pop(parts[-1], None)


def _check_mask(mask: field_mask_pb2.FieldMask, descriptor: Any) -> list[str]:
    if not mask.paths:
        raise ApiError("INVALID_ARGUMENT", "update_mask is required and must name at least one field.")
    if not mask.IsValidForDescriptor(descriptor):
        raise ApiError("INVALID_ARGUMENT", f"update_mask {list(mask.paths)} names unknown fields.")
    return list(mask.paths)


def _engine(spec: dict[str, Any]) -> str:
    from pipelines.local.emulator.serving import engine_for

    return engine_for(spec)


def _machine_memory_gb(machine_type: str) -> float | None:
    # Machine sizes are Compute Engine facts (cloud.google.com/compute/docs/gpus); the project's catalog records them.
    from components.planning import MACHINE_TYPES

    machine = MACHINE_TYPES.get(machine_type)
    return machine.memory_gb if machine else None


_MODEL_ARG = re.compile(r"^--model=(gs://\S+)$")


def _weights_source(version: dict[str, Any]) -> str:
    """Where the serving container reads weights: Vertex's copy of artifactUri (AIP_STORAGE_URI), else a
    `--model=gs://…` argument, which the Model Garden vLLM image downloads itself (Model Garden's recipe)."""
    if version.get("artifactUri"):
        return str(version["artifactUri"])
    spec = version.get("containerSpec", {})
    for arg in spec.get("args", []):
        match = _MODEL_ARG.match(str(arg))
        if match and _engine(spec) == "vllm":
            return match.group(1)
    return ""


class _Route:
    def __init__(self, method: str, pattern: str, handler: Callable[..., Any]) -> None:
        self.method = method
        self.regex = re.compile("^" + pattern + "$")
        self.handler = handler


class Emulator:
    """The emulator: state, routes, and the HTTP server that serves them from a background thread."""

    def __init__(
        self,
        state_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        storage_endpoint: str | None = None,
        hub_upstream: str | None = None,
        faults: Iterable[str] = (),
        serving: Any = None,
        deploy_timeout_s: float = 900.0,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port
        self.storage_endpoint = storage_endpoint
        self.hub_upstream = hub_upstream
        self.faults: set[str] = set(faults)
        self.calls: list[str] = []
        self.serving = serving
        self.deploy_timeout_s = deploy_timeout_s
        self.url = ""
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._workers: list[threading.Thread] = []
        # Resource state, persisted: stored as the camelCase JSON of each proto.
        self._counter = 0
        self._models: dict[str, dict[str, Any]] = {}  # model name -> {"versions": {vid: Model}, "nextVersion": n}
        self._endpoints: dict[str, dict[str, Any]] = {}
        self._pipeline_jobs: dict[str, dict[str, Any]] = {}
        self._schedules: dict[str, dict[str, Any]] = {}
        self._operations: dict[str, dict[str, Any]] = {}  # op id -> Operation JSON
        # Runtime-only state.
        self._pending_deploys: dict[str, set[str]] = {}  # endpoint name -> deployed model ids being deployed
        self._serving_status: dict[str, str] = {}  # deployed model id -> "starting" | "ready" | failure text
        self._throttled: dict[str, int] = {}  # deployed model id -> 429s already answered (fault predict-429)
        self._cancelled_ops: set[str] = set()
        self._logging_off: set[str] = set()  # deployed model ids deployed through v1beta1 without container logging
        self._multihost: dict[str, int] = {}  # deployed model id -> nodes per replica (v1beta1 only)
        self._routes = self._build_routes()
        self._load()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Listen, serve in a background thread, and restart the servers of models deployed in a previous run."""
        handler = _make_handler(self)
        self._httpd = ThreadingHTTPServer((self.host, self.port), handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.url = f"http://{self.host}:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="vertex-emulator", daemon=True)
        self._thread.start()
        with self._lock:
            restarts = [(ep, dm) for ep in self._endpoints.values() for dm in ep.get("deployedModels", [])]
            jobs = [
                name
                for name, job in self._pipeline_jobs.items()
                if job.get("state") in ("PIPELINE_STATE_PENDING", "PIPELINE_STATE_RUNNING")
            ]
        for _ep, dm in restarts:
            self._serving_status[dm["id"]] = "starting"
            self._spawn(self._restart_serving, dm)
        for name in jobs:
            self._spawn(self._run_pipeline_job, name)

    def stop(self) -> None:
        """Stop answering, then stop every serving process this emulator started."""
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self.serving is not None:
            try:
                self.serving.stop_all()
            except Exception:  # noqa: BLE001 - shutdown must finish even if a child misbehaves
                _LOG.exception("stopping serving processes failed")
        for worker in self._workers:
            worker.join(timeout=5)

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        worker = threading.Thread(target=target, args=args, daemon=True)
        self._workers = [w for w in self._workers if w.is_alive()] + [worker]
        worker.start()

    # ------------------------------------------------------------------ persistence

    def _load(self) -> None:
        path = self.state_dir / STATE_FILE
        if not path.exists():
            return
        data = json.loads(path.read_text())
        self._counter = data.get("counter", 0)
        self._models = data.get("models", {})
        self._endpoints = data.get("endpoints", {})
        self._pipeline_jobs = data.get("pipelineJobs", {})
        self._schedules = data.get("schedules", {})
        self._operations = data.get("operations", {})
        self._multihost = data.get("multihost", {})
        self._logging_off = set(data.get("loggingOff", []))
        # Work that was in flight when the last run ended will never finish; say so instead of hanging pollers.
        for op in self._operations.values():
            if not op.get("done"):
                op.pop("_model", None)
                op.update(
                    done=True,
                    error={"code": _CODES["UNAVAILABLE"][0], "message": "The emulator restarted while this ran."},
                )

    def _save(self) -> None:
        # Keep the newest operations only: clients poll an operation for minutes, not across weeks.
        if len(self._operations) > 500:
            for key in list(self._operations)[: len(self._operations) - 500]:
                del self._operations[key]
        data = {
            "counter": self._counter,
            "models": self._models,
            "endpoints": self._endpoints,
            "pipelineJobs": self._pipeline_jobs,
            "schedules": self._schedules,
            "operations": self._operations,
            # v1beta1-only facts of deployed models, kept beside the v1 resources.
            "multihost": self._multihost,
            "loggingOff": sorted(self._logging_off),
        }
        fd, tmp = tempfile.mkstemp(dir=self.state_dir, prefix=".emulator-state.", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1)
        os.replace(tmp, self.state_dir / STATE_FILE)
        self._changed.notify_all()

    def _new_id(self) -> str:
        self._counter += 1
        return str(_ID_BASE + self._counter)

    def _new_small_id(self) -> str:
        # DeployedModel ids must be 1-10 digits.
        self._counter += 1
        return str(1_000_000_000 + self._counter % 8_999_999_999)

    # ------------------------------------------------------------------ control surface

    def snapshot(self) -> dict[str, Any]:
        """Every model version, endpoint, pipeline job and schedule, as their Vertex JSON."""
        with self._lock:
            return {
                "models": [
                    self._model_view(name, vid) for name, entry in self._models.items() for vid in entry["versions"]
                ],
                "endpoints": [_conform(v1.Endpoint, ep) for ep in self._endpoints.values()],
                "pipelineJobs": list(self._pipeline_jobs.values()),
                "schedules": list(self._schedules.values()),
            }

    def _control(self, method: str, path: str, body: bytes) -> tuple[int, bytes] | None:
        if path == "/healthz":
            return 200, b'{"status": "ok"}'
        if path == "/_emulator/calls" and method == "GET":
            return 200, json.dumps({"calls": list(self.calls)}).encode()
        if path == "/_emulator/calls:clear" and method == "POST":
            self.calls.clear()
            return 200, b"{}"
        if path == "/_emulator/faults":
            if method == "POST":
                wanted = json.loads(body or b"{}").get("faults", [])
                # Replace in place: the serving manager and side APIs hold this same set.
                self.faults.clear()
                self.faults.update(wanted)
            return 200, json.dumps({"faults": sorted(self.faults)}).encode()
        if path == "/_emulator/state" and method == "GET":
            return 200, json.dumps(self.snapshot()).encode()
        return None

    # ------------------------------------------------------------------ dispatch

    def handle(
        self, method: str, raw_path: str, query: dict[str, list[str]], body: bytes, headers: Any
    ) -> tuple[int, bytes, str, dict[str, str]]:
        """Answer one HTTP request: (status, body, content type, extra headers)."""
        path = unquote(raw_path)
        control = self._control(method, path, body)
        if control is not None:
            return control[0], control[1], "application/json", {}
        # Control routes (ours and the side APIs' /_emulator/...) are test plumbing, not API traffic.
        if not path.startswith("/_emulator/"):
            self.calls.append(f"{method} {path}")
        try:
            for route in self._routes:
                if route.method != method:
                    continue
                m = route.regex.match(path)
                if m:
                    # The host the client called: prediction routes check it (dedicated DNS vs regional host).
                    params = {**m.groupdict(), "_host": (headers.get("Host") if headers is not None else "") or ""}
                    return route.handler(params, query, body)
            answer = self._side_apis(method, raw_path, query, body, headers)
            if answer is not None:
                return answer
            raise ApiError("NOT_FOUND", f"The emulator does not serve {method} {path}.")
        except ApiError as err:
            return err.http_code, err.body(), "application/json", {}
        except Exception as exc:  # noqa: BLE001 - a bug here must reach the client as a 500, not a hang
            _LOG.exception("emulator handler failed for %s %s", method, path)
            err = ApiError("INTERNAL", f"Emulator error handling {method} {path}: {exc!r}")
            return err.http_code, err.body(), "application/json", {}

    def _side_apis(
        self, method: str, path: str, query: dict[str, list[str]], body: bytes, headers: Any
    ) -> tuple[int, bytes, str, dict[str, str]] | None:
        try:
            from pipelines.local.emulator import side_apis
        except ImportError:
            return None
        return side_apis.handle(self, method, path, query, body, headers)

    def _build_routes(self) -> list[_Route]:
        ep = _LOC + r"/endpoints/(?P<endpoint>[^/:]+)"
        model = _LOC + r"/models/(?P<model>[^/:]+)"
        # The REST operations client tries its http_options in order, and the /ui/ ones come first.
        ops = _LOC.replace("/v1/", "/(?:v1|v1beta1|ui)/", 1) + r"(?P<scope>/[^:]+?)?/operations"
        job = _LOC + r"/pipelineJobs/(?P<job>[^/:]+)"
        sched = _LOC + r"/schedules/(?P<schedule>[^/:]+)"
        r = _Route
        return [
            r("POST", _LOC + r"/models:upload", self._upload_model),
            r("GET", _LOC + r"/models", self._list_models),
            r("GET", model + r":listVersions", self._list_model_versions),
            r("GET", model, self._get_model),
            r("PATCH", model, self._update_model),
            r("DELETE", model + r":deleteVersion", self._delete_model_version),
            r("DELETE", model, self._delete_model),
            r("POST", model + r":mergeVersionAliases", self._merge_version_aliases),
            r("POST", _LOC + r"/endpoints", self._create_endpoint),
            r("GET", _LOC + r"/endpoints", self._list_endpoints),
            r("GET", _LOC.replace("/v1/", "/v1beta1/", 1) + r"/endpoints", self._list_endpoints_beta),
            r("GET", ep, self._get_endpoint),
            r("PATCH", ep, self._update_endpoint),
            r("DELETE", ep, self._delete_endpoint),
            r("POST", ep + r":deployModel", self._deploy_model),
            r("POST", ep.replace("/v1/", "/v1beta1/", 1) + r":deployModel", self._deploy_model_beta),
            r("POST", ep + r":undeployModel", self._undeploy_model),
            r("POST", ep + r":mutateDeployedModel", self._mutate_deployed_model),
            r("POST", ep + r":predict", self._predict),
            r("POST", ep + r":rawPredict", self._raw_predict),
            r("POST", ep + r"[:/]invoke(?P<subpath>/.*)?", self._invoke_endpoint),
            # PredictionService.ChatCompletions exists in v1beta1 only (prediction_service.proto).
            r("POST", ep.replace("/v1/", "/v1beta1/", 1) + r"/chat/completions", self._chat),
            # REST reference and the SDK's Endpoint.invoke use ".../deployedModels/ID/invoke/ROUTE";
            # the ":invoke" spelling is accepted too.
            r("POST", ep + r"/deployedModels/(?P<dm>[^/:]+)[:/]invoke(?P<subpath>/.*)?", self._invoke_deployed),
            r("GET", ops + r"/(?P<op>[^/:]+)", self._get_operation),
            r("POST", ops + r"/(?P<op>[^/:]+):wait", self._wait_operation),
            r("POST", ops + r"/(?P<op>[^/:]+):cancel", self._cancel_operation),
            r("DELETE", ops + r"/(?P<op>[^/:]+)", self._delete_operation),
            r("GET", ops, self._list_operations),
            r("POST", _LOC + r"/pipelineJobs", self._create_pipeline_job),
            r("GET", _LOC + r"/pipelineJobs", self._list_pipeline_jobs),
            r("GET", job, self._get_pipeline_job),
            r("POST", job + r":cancel", self._cancel_pipeline_job),
            r("DELETE", job, self._delete_pipeline_job),
            r("POST", _LOC + r"/schedules", self._create_schedule),
            r("GET", _LOC + r"/schedules", self._list_schedules),
            r("GET", sched, self._get_schedule),
            r("PATCH", sched, self._update_schedule),
            r("POST", sched + r":pause", self._pause_schedule),
            r("POST", sched + r":resume", self._resume_schedule),
            r("DELETE", sched, self._delete_schedule),
        ]

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _json(data: Any, status: int = 200) -> tuple[int, bytes, str, dict[str, str]]:
        return status, json.dumps(data).encode(), "application/json", {}

    def _proto(self, proto_cls: Any, data: dict[str, Any]) -> tuple[int, bytes, str, dict[str, str]]:
        return self._json(_conform(proto_cls, data))

    def _record_op(self, name: str, op: dict[str, Any]) -> dict[str, Any]:
        self._operations[name.rsplit("/", 1)[1]] = op
        return op

    def _op_name(self, scope: str) -> str:
        return f"{scope}/operations/{self._new_id()}"

    def _done_op(self, scope: str, meta_cls: Any, response: Any) -> tuple[int, bytes, str, dict[str, str]]:
        name = self._op_name(scope)
        op = _pack_op(name, _generic_meta(meta_cls, _now()), response=response)
        self._record_op(name, op)
        self._save()
        return self._json(op)

    # ------------------------------------------------------------------ models

    def _model_entry(self, name: str) -> dict[str, Any]:
        entry = self._models.get(name)
        if entry is None:
            raise ApiError("NOT_FOUND", f"Model {name} is not found.")
        return entry

    def _resolve_version(self, entry: dict[str, Any], name: str, ref: str | None) -> str:
        versions = entry["versions"]
        ref = ref or "default"
        if ref in versions:
            return ref
        for vid, version in versions.items():
            if ref in version.get("versionAliases", []):
                return vid
        raise ApiError("NOT_FOUND", f"Model {name}@{ref} is not found: no such version or alias.")

    def _split_model_ref(self, p: dict[str, str]) -> tuple[str, str | None]:
        model_id, _, ref = p["model"].partition("@")
        name = f"projects/{p['project']}/locations/{p['location']}/models/{model_id}"
        return name, ref or None

    def _name_to_model_ref(self, full: str) -> tuple[str, str | None]:
        name, _, ref = full.partition("@")
        if not re.match(r"^projects/[^/]+/locations/[^/]+/models/[^/@]+$", name):
            raise ApiError("INVALID_ARGUMENT", f"{full!r} is not a model resource name.")
        return name, ref or None

    def _deployments_of(self, model_name: str, vid: str | None = None) -> list[dict[str, str]]:
        refs = []
        for ep_name, ep in self._endpoints.items():
            for dm in ep.get("deployedModels", []):
                if dm.get("model") == model_name and (vid is None or dm.get("modelVersionId") == vid):
                    refs.append({"endpoint": ep_name, "deployedModelId": dm["id"]})
        return refs

    def _pending_deploys_of(self, model_name: str) -> list[str]:
        return [op["name"] for op in self._operations.values() if not op.get("done") and op.get("_model") == model_name]

    def _model_view(self, name: str, vid: str) -> dict[str, Any]:
        version = dict(self._models[name]["versions"][vid])
        deployed = self._deployments_of(name, vid)
        if deployed:
            version["deployedModels"] = deployed
        return _conform(v1.Model, version)

    def _move_aliases(self, entry: dict[str, Any], vid: str, aliases: list[str]) -> None:
        """Give `aliases` to version `vid`, taking them off any other version (an alias names one version)."""
        for alias in aliases:
            if not _ALIAS_RE.match(alias) or alias.isdigit():
                raise ApiError(
                    "INVALID_ARGUMENT",
                    f"Version alias {alias!r} is invalid: use [a-z][a-zA-Z0-9-]{{0,126}}[a-z0-9], not only digits.",
                )
        now = _now()
        for other_vid, version in entry["versions"].items():
            if other_vid == vid:
                continue
            kept = [a for a in version.get("versionAliases", []) if a not in aliases]
            if kept != version.get("versionAliases", []):
                version["versionAliases"] = kept
                version["versionUpdateTime"] = now
        mine = entry["versions"][vid].setdefault("versionAliases", [])
        for alias in aliases:
            if alias not in mine:
                mine.append(alias)

    def _upload_model(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        parent = f"projects/{p['project']}/locations/{p['location']}"
        req = _parse_request(v1.UploadModelRequest, body, query=query, path_fields={"parent": parent})
        if not req.model.display_name:
            raise ApiError("INVALID_ARGUMENT", "model.display_name is required.")
        contract.check_container_spec(_to_dict(req.model).get("containerSpec", {}))
        if req.model.artifact_uri:
            location = self._bucket_location(req.model.artifact_uri)
            contract.check_artifact_region(req.model.artifact_uri, location, p["location"])
        with self._lock:
            if req.parent_model:
                name, _ = self._name_to_model_ref(req.parent_model)
                entry = self._model_entry(name)
                if req.model_id and req.model_id != name.rsplit("/", 1)[1]:
                    raise ApiError("INVALID_ARGUMENT", "model_id and parent_model name different models.")
            else:
                model_id = req.model_id or self._new_id()
                if not _RESOURCE_ID_RE.match(model_id):
                    raise ApiError("INVALID_ARGUMENT", f"model_id {model_id!r} is invalid: use [a-z0-9_-], up to 63.")
                name = f"{parent}/models/{model_id}"
                if name in self._models:
                    raise ApiError(
                        "ALREADY_EXISTS", f"Model {name} already exists; pass parent_model to add a version."
                    )
                entry = None
            op_name = self._op_name(name)
            meta = _generic_meta(v1.UploadModelOperationMetadata, _now())
            if "upload-error" in self.faults:
                err = ApiError(
                    "INTERNAL",
                    f"Upload of model {req.model.display_name!r} ({name}) failed: internal error "
                    "(injected fault upload-error).",
                )
                op = self._record_op(op_name, _pack_op(op_name, meta, error=err))
                self._save()
                return self._json(op)
            now = _now()
            if entry is None:
                entry = {"versions": {}, "nextVersion": 1, "createTime": now}
                self._models[name] = entry
            vid = str(entry["nextVersion"])
            entry["nextVersion"] += 1
            version = _to_dict(req.model)
            version.update(
                {
                    "name": name,
                    "versionId": vid,
                    "versionAliases": [],
                    "createTime": entry["createTime"],
                    "updateTime": now,
                    "versionCreateTime": now,
                    "versionUpdateTime": now,
                }
            )
            version.pop("deployedModels", None)
            if "containerSpec" in version:
                # What Vertex reports for custom-container models; the SDK's deploy() reads it.
                version["supportedDeploymentResourcesTypes"] = ["DEDICATED_RESOURCES", "SHARED_RESOURCES"]
            entry["versions"][vid] = version
            aliases = list(dict.fromkeys(req.model.version_aliases))
            # The first version is always the default; later ones only when asked, as on Vertex.
            if vid == "1" and "default" not in aliases:
                aliases.insert(0, "default")
            self._move_aliases(entry, vid, aliases)
            response = v1.UploadModelResponse.pb()(model=name, model_version_id=vid)
            op = self._record_op(op_name, _pack_op(op_name, meta, response=response))
            self._save()
            return self._json(op)

    def _bucket_location(self, uri: str) -> str:
        """The location of a gs:// URI's bucket in fake GCS ("" when there is no GCS peer or no such bucket)."""
        if not self.storage_endpoint or not uri.startswith("gs://"):
            return ""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        client = storage.Client(
            project="local", credentials=AnonymousCredentials(), client_options={"api_endpoint": self.storage_endpoint}
        )
        try:
            bucket = client.lookup_bucket(uri[5:].split("/", 1)[0])
        except Exception:  # noqa: BLE001 - an unreachable GCS is the serving step's error to report
            return ""
        return (bucket.location or "") if bucket is not None else ""

    def _get_model(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        name, ref = self._split_model_ref(p)
        with self._lock:
            entry = self._model_entry(name)
            return self._json(self._model_view(name, self._resolve_version(entry, name, ref)))

    def _list_models(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        parent = f"projects/{p['project']}/locations/{p['location']}"
        req = _parse_request(v1.ListModelsRequest, b"", body_field=None, query=query)
        with self._lock:
            items = [
                self._model_view(name, self._resolve_version(entry, name, None))
                for name, entry in self._models.items()
                if name.startswith(parent + "/")
            ]
        page, token = _paginate(_filter_items(items, req.filter), req.page_size, req.page_token)
        return self._json({"models": page, **({"nextPageToken": token} if token else {})})

    def _list_model_versions(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        name, _ = self._split_model_ref(p)
        req = _parse_request(v1.ListModelVersionsRequest, b"", body_field=None, query=query)
        with self._lock:
            entry = self._model_entry(name)
            items = [self._model_view(name, vid) for vid in entry["versions"]]
        page, token = _paginate(_filter_items(items, req.filter), req.page_size, req.page_token)
        return self._json({"models": page, **({"nextPageToken": token} if token else {})})

    def _update_model(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        name, ref = self._split_model_ref(p)
        req = _parse_request(v1.UpdateModelRequest, body, body_field="model", query=query)
        paths = _check_mask(req.update_mask, v1.Model.pb().DESCRIPTOR)
        with self._lock:
            entry = self._model_entry(name)
            vid = self._resolve_version(entry, name, ref)
            version = entry["versions"][vid]
            src = _to_dict(req.model)
            aliases = [p_ for p_ in paths if p_ == "version_aliases"]
            _apply_mask(version, src, [p_ for p_ in paths if p_ != "version_aliases"])
            if aliases:
                self._move_aliases(entry, vid, list(src.get("versionAliases", [])))
            version["updateTime"] = version["versionUpdateTime"] = _now()
            self._save()
            return self._json(self._model_view(name, vid))

    def _delete_model(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        name, ref = self._split_model_ref(p)
        if ref:
            return self._delete_model_version(p, query, body)
        _parse_request(v1.DeleteModelRequest, b"", body_field=None, query=query)
        with self._lock:
            self._model_entry(name)
            deployed = self._deployments_of(name)
            if deployed or self._pending_deploys_of(name):
                where = ", ".join(f"{d['endpoint']} (deployed model {d['deployedModelId']})" for d in deployed)
                raise ApiError(
                    "FAILED_PRECONDITION",
                    f"Model {name} has deployed or being deployed version(s): {where or 'deploy in progress'}. "
                    "Undeploy them before deleting the model.",
                )
            del self._models[name]
            return self._done_op(name, v1.DeleteOperationMetadata, empty_pb2.Empty())

    def _delete_model_version(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        name, ref = self._split_model_ref(p)
        if not ref:
            raise ApiError("INVALID_ARGUMENT", f"DeleteModelVersion needs a versioned name such as {name}@2.")
        with self._lock:
            entry = self._model_entry(name)
            vid = self._resolve_version(entry, name, ref)
            if len(entry["versions"]) == 1:
                raise ApiError("FAILED_PRECONDITION", f"{name}@{vid} is the only version: delete the model instead.")
            if "default" in entry["versions"][vid].get("versionAliases", []):
                raise ApiError(
                    "FAILED_PRECONDITION",
                    f"{name}@{vid} is the default version: move the 'default' alias to another version first.",
                )
            if self._deployments_of(name, vid):
                raise ApiError("FAILED_PRECONDITION", f"{name}@{vid} is deployed: undeploy it first.")
            del entry["versions"][vid]
            return self._done_op(name, v1.DeleteOperationMetadata, empty_pb2.Empty())

    def _merge_version_aliases(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        name, ref = self._split_model_ref(p)
        req = _parse_request(v1.MergeVersionAliasesRequest, body, query=query)
        with self._lock:
            entry = self._model_entry(name)
            vid = self._resolve_version(entry, name, ref)
            add = [a for a in req.version_aliases if not a.startswith("-")]
            remove = [a[1:] for a in req.version_aliases if a.startswith("-")]
            if "default" in remove:
                raise ApiError(
                    "INVALID_ARGUMENT", "The 'default' alias cannot be removed, only moved to another version."
                )
            self._move_aliases(entry, vid, add)
            version = entry["versions"][vid]
            version["versionAliases"] = [a for a in version.get("versionAliases", []) if a not in remove]
            version["versionUpdateTime"] = _now()
            self._save()
            return self._json(self._model_view(name, vid))

    # ------------------------------------------------------------------ endpoints

    def _endpoint(self, p: dict[str, str]) -> tuple[str, dict[str, Any]]:
        name = f"projects/{p['project']}/locations/{p['location']}/endpoints/{p['endpoint']}"
        ep = self._endpoints.get(name)
        if ep is None:
            raise ApiError("NOT_FOUND", f"Endpoint {name} is not found.")
        return name, ep

    def _create_endpoint(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        parent = f"projects/{p['project']}/locations/{p['location']}"
        req = _parse_request(v1.CreateEndpointRequest, body, body_field="endpoint", query=query)
        if not req.endpoint.display_name:
            raise ApiError("INVALID_ARGUMENT", "endpoint.display_name is required.")
        with self._lock:
            endpoint_id = req.endpoint_id or self._new_id()
            if not re.match(r"^[a-z0-9][a-z0-9-]{0,62}$", endpoint_id):
                raise ApiError("INVALID_ARGUMENT", f"endpoint_id {endpoint_id!r} is invalid: use [a-z0-9-], up to 63.")
            name = f"{parent}/endpoints/{endpoint_id}"
            if name in self._endpoints:
                raise ApiError("ALREADY_EXISTS", f"Endpoint {name} already exists.")
            now = _now()
            ep = _to_dict(req.endpoint)
            ep.update({"name": name, "createTime": now, "updateTime": now, "etag": now})
            ep.pop("deployedModels", None)
            ep.pop("trafficSplit", None)
            if ep.get("dedicatedEndpointEnabled"):
                # The DNS name Vertex gives a dedicated endpoint; local clients keep using the emulator URL.
                ep["dedicatedEndpointDns"] = (
                    f"{endpoint_id}.{p['location']}-{p['project']}{contract.DEDICATED_DNS_SUFFIX}"
                )
            self._endpoints[name] = ep
            response = json_format.ParseDict(ep, v1.Endpoint.pb()())
            return self._done_op(name, v1.CreateEndpointOperationMetadata, response)

    def _get_endpoint(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        with self._lock:
            _, ep = self._endpoint(p)
            return self._proto(v1.Endpoint, ep)

    def _beta_endpoint(self, ep: dict[str, Any]) -> dict[str, Any]:
        """An endpoint as v1beta1 shows it: the same, plus MachineSpec.multihost_gpu_node_count (v1beta1 only)."""
        from google.cloud import aiplatform_v1beta1 as v1beta1

        out = _conform(v1beta1.Endpoint, _conform(v1.Endpoint, ep))
        for dm in out.get("deployedModels", []):
            nodes = self._multihost.get(dm["id"])
            if nodes and "dedicatedResources" in dm:
                dm["dedicatedResources"].setdefault("machineSpec", {})["multihostGpuNodeCount"] = nodes
        return out

    def _list_endpoints_beta(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        return self._list_endpoints(p, query, body, view=self._beta_endpoint)

    def _list_endpoints(
        self, p: dict[str, str], query: dict[str, list[str]], body: bytes, view: Callable[..., Any] | None = None
    ) -> Any:
        parent = f"projects/{p['project']}/locations/{p['location']}/"
        req = _parse_request(v1.ListEndpointsRequest, b"", body_field=None, query=query)
        show = view or (lambda ep: _conform(v1.Endpoint, ep))
        with self._lock:
            items = [show(ep) for name, ep in self._endpoints.items() if name.startswith(parent)]
        page, token = _paginate(_filter_items(items, req.filter), req.page_size, req.page_token)
        return self._json({"endpoints": page, **({"nextPageToken": token} if token else {})})

    @staticmethod
    def _check_split(split: dict[str, int], allowed: set[str], what: str) -> None:
        unknown = sorted(set(split) - allowed)
        if unknown:
            raise ApiError("INVALID_ARGUMENT", f"{what} names deployed model(s) not on this endpoint: {unknown}.")
        if any(v < 0 or v > 100 for v in split.values()):
            raise ApiError("INVALID_ARGUMENT", f"{what} percentages must be between 0 and 100: {split}.")
        if split and sum(split.values()) != 100:
            raise ApiError("INVALID_ARGUMENT", f"{what} must add up to 100, got {sum(split.values())}: {split}.")

    def _update_endpoint(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        req = _parse_request(v1.UpdateEndpointRequest, body, body_field="endpoint", query=query)
        paths = _check_mask(req.update_mask, v1.Endpoint.pb().DESCRIPTOR)
        with self._lock:
            _, ep = self._endpoint(p)
            src = _to_dict(req.endpoint)
            if "traffic_split" in paths:
                ids = {dm["id"] for dm in ep.get("deployedModels", [])}
                split = {k: int(v) for k, v in src.get("trafficSplit", {}).items()}
                self._check_split(split, ids, "traffic_split")
                if ids and not split:
                    raise ApiError("INVALID_ARGUMENT", "traffic_split must add up to 100 while models are deployed.")
            forbidden = {"deployed_models", "name", "create_time", "dedicated_endpoint_dns"} & set(paths)
            if forbidden:
                raise ApiError("INVALID_ARGUMENT", f"Fields {sorted(forbidden)} cannot be updated.")
            _apply_mask(ep, src, paths)
            ep["updateTime"] = ep["etag"] = _now()
            self._save()
            return self._proto(v1.Endpoint, ep)

    def _delete_endpoint(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        with self._lock:
            name, ep = self._endpoint(p)
            if ep.get("deployedModels") or self._pending_deploys.get(name):
                ids = [dm["id"] for dm in ep.get("deployedModels", [])] + sorted(self._pending_deploys.get(name, ()))
                raise ApiError(
                    "FAILED_PRECONDITION",
                    f"Endpoint {name} has deployed or being deployed DeployedModel(s): {ids}. "
                    "Undeploy them first (the SDK: endpoint.delete(force=True)).",
                )
            del self._endpoints[name]
            return self._done_op(name, v1.DeleteOperationMetadata, empty_pb2.Empty())

    def _deploy_model_beta(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        # v1beta1 DeployModel: the only API with MachineSpec.multihost_gpu_node_count. Container logging is off
        # there unless asked for ("On the v1beta1 service endpoint, container logging is disabled by default",
        # docs predictions/online-prediction-logging).
        from google.cloud import aiplatform_v1beta1 as v1beta1

        req = _parse_request(v1beta1.DeployModelRequest, body, query=query)
        dm = req.deployed_model
        nodes = dm.dedicated_resources.machine_spec.multihost_gpu_node_count
        logging_on = dm.enable_container_logging
        dm.dedicated_resources.machine_spec.multihost_gpu_node_count = 0
        dm.enable_container_logging = False  # v1beta1 only; the v1 parse below would refuse it
        v1_body = json_format.MessageToJson(req)
        return self._deploy_model(
            p, query, v1_body.encode(), nodes=nodes or 1, container_logging=logging_on, api=v1beta1
        )

    def _deploy_model(
        self,
        p: dict[str, str],
        query: dict[str, list[str]],
        body: bytes,
        *,
        nodes: int = 1,
        container_logging: bool = True,
        api: Any = v1,
    ) -> Any:
        req = _parse_request(v1.DeployModelRequest, body, query=query)
        with self._lock:
            ep_name, ep = self._endpoint(p)
            if not req.deployed_model.model:
                raise ApiError("INVALID_ARGUMENT", "deployed_model.model is required.")
            model_name, ref = self._name_to_model_ref(req.deployed_model.model)
            entry = self._model_entry(model_name)
            vid = self._resolve_version(entry, model_name, ref)
            existing = {dm["id"] for dm in ep.get("deployedModels", [])}
            pending = self._pending_deploys.setdefault(ep_name, set())
            dm_id = req.deployed_model.id or self._new_small_id()
            if not re.match(r"^[0-9]{1,10}$", dm_id):
                raise ApiError("INVALID_ARGUMENT", f"deployed_model.id {dm_id!r} is invalid: use 1-10 digits.")
            if dm_id in existing or dm_id in pending:
                raise ApiError("ALREADY_EXISTS", f"Deployed model {dm_id} already exists on {ep_name}.")
            split = dict(req.traffic_split)
            self._check_split(split, existing | {"0"}, "traffic_split")
            spec = entry["versions"][vid].get("containerSpec", {})
            contract.check_deploy_target(spec, ep, model_name)
            machine = req.deployed_model.dedicated_resources.machine_spec.machine_type
            contract.check_shared_memory(spec, _machine_memory_gb(machine), machine)
            if not container_logging:
                self._logging_off.add(dm_id)
            if nodes > 1:
                self._multihost[dm_id] = nodes
            dm = _to_dict(req.deployed_model)
            dm.update({"id": dm_id, "model": model_name, "modelVersionId": vid, "createTime": _now()})
            dm.setdefault("displayName", entry["versions"][vid].get("displayName", ""))
            version = entry["versions"][vid]
            op_name = self._op_name(ep_name)
            # The operation carries the calling API version's types: a v1beta1 client unpacks v1beta1 messages.
            meta = _generic_meta(api.DeployModelOperationMetadata, _now())
            op = self._record_op(op_name, _pack_op(op_name, meta))
            op["_model"] = model_name  # private marker: blocks model deletion while deploying
            pending.add(dm_id)
            self._save()
        job = {
            "op": op_name,
            "endpoint": ep_name,
            "dm": dm,
            "split": split,
            "artifact_uri": _weights_source(version),
            "container_spec": version.get("containerSpec", {}),
            "meta": meta,
            "api": api,
        }
        worker = threading.Thread(target=self._run_deploy, args=(job,), daemon=True)
        self._workers = [w for w in self._workers if w.is_alive()] + [worker]
        worker.start()
        # A fast deploy answers done at once, so clients skip the SDK's first one-second poll.
        worker.join(timeout=0.2)
        with self._lock:
            return self._json(self._public_op(self._operations[op_name.rsplit("/", 1)[1]]))

    def _run_deploy(self, job: dict[str, Any]) -> None:
        dm_id = job["dm"]["id"]
        error: ApiError | None = None
        started = False
        try:
            if "deploy-error" in self.faults:
                time.sleep(0.1)
                raise ApiError(
                    "FAILED_PRECONDITION",
                    f"Model server never became ready: deployed model {dm_id} did not answer its health route "
                    "(injected fault deploy-error). Check the serving container's arguments and logs.",
                )
            if "deploy-timeout" in self.faults:
                waited = 2
                self._stopping.wait(waited)
                raise ApiError("DEADLINE_EXCEEDED", f"Deployment of {dm_id} timed out after {waited} s.")
            try:
                self.serving.start(dm_id, job["artifact_uri"], job["container_spec"], self.deploy_timeout_s)
                started = True
            except Exception as exc:  # noqa: BLE001 - any serving failure ends the operation with its reason
                message = getattr(exc, "message", None) or str(exc) or repr(exc)
                tail = list(getattr(exc, "log_tail", []) or [])
                if tail:
                    message += "\nModel server log (last lines):\n" + "\n".join(tail)
                code = getattr(exc, "status", None)
                raise ApiError(code if code in _CODES else "FAILED_PRECONDITION", message) from exc
        except ApiError as err:
            error = err
        with self._lock:
            self._pending_deploys.get(job["endpoint"], set()).discard(dm_id)
            op_key = job["op"].rsplit("/", 1)[1]
            ep = self._endpoints.get(job["endpoint"])
            if error is None and op_key in self._cancelled_ops:
                error = ApiError("CANCELLED", f"Deployment of {dm_id} was cancelled.")
            if error is None and ep is None:
                error = ApiError("NOT_FOUND", f"Endpoint {job['endpoint']} was deleted during deployment.")
            if error is None and ep is not None:
                ep.setdefault("deployedModels", []).append(job["dm"])
                ids = {dm["id"] for dm in ep["deployedModels"]}
                if job["split"]:
                    split = {(dm_id if k == "0" else k): v for k, v in job["split"].items()}
                    ep["trafficSplit"] = {k: v for k, v in split.items() if k in ids}
                elif not any(ep.get("trafficSplit", {}).values()):
                    ep["trafficSplit"] = {dm_id: 100}
                ep["updateTime"] = ep["etag"] = _now()
                self._serving_status[dm_id] = "ready"
                self._throttled[dm_id] = 0
                response = job["api"].DeployModelResponse.pb()()
                json_format.ParseDict({"deployedModel": job["dm"]}, response)
                self._operations[op_key] = _pack_op(job["op"], job["meta"], response=response)
            else:
                self._operations[op_key] = _pack_op(job["op"], job["meta"], error=error)
            self._save()
        if error is not None and started:
            self.serving.stop(dm_id)

    def _undeploy_model(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        req = _parse_request(v1.UndeployModelRequest, body, query=query)
        with self._lock:
            ep_name, ep = self._endpoint(p)
            dms = ep.get("deployedModels", [])
            if req.deployed_model_id not in {dm["id"] for dm in dms}:
                raise ApiError("NOT_FOUND", f"Deployed model {req.deployed_model_id} is not on {ep_name}.")
            remaining = {dm["id"] for dm in dms} - {req.deployed_model_id}
            split = dict(req.traffic_split)
            if split:
                self._check_split(split, remaining, "traffic_split")
            else:
                split = {k: v for k, v in ep.get("trafficSplit", {}).items() if k != req.deployed_model_id}
                if remaining and ep.get("trafficSplit", {}).get(req.deployed_model_id) and sum(split.values()) != 100:
                    raise ApiError(
                        "FAILED_PRECONDITION",
                        f"Deployed model {req.deployed_model_id} still receives traffic; undeploying it would leave "
                        f"the endpoint's traffic at {sum(split.values())}%. Pass traffic_split for the remaining "
                        f"deployed models {sorted(remaining)}.",
                    )
        # Stopping a server can take seconds; do it outside the lock so predictions keep flowing.
        if self.serving is not None:
            self.serving.stop(req.deployed_model_id)
        with self._lock:
            ep_name, ep = self._endpoint(p)
            ep["deployedModels"] = [dm for dm in ep.get("deployedModels", []) if dm["id"] != req.deployed_model_id]
            ep["trafficSplit"] = split if ep["deployedModels"] else {}
            ep["updateTime"] = ep["etag"] = _now()
            self._serving_status.pop(req.deployed_model_id, None)
            self._multihost.pop(req.deployed_model_id, None)
            return self._done_op(ep_name, v1.UndeployModelOperationMetadata, v1.UndeployModelResponse.pb()())

    def _mutate_deployed_model(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        req = _parse_request(v1.MutateDeployedModelRequest, body, query=query)
        paths = _check_mask(req.update_mask, v1.DeployedModel.pb().DESCRIPTOR)
        with self._lock:
            ep_name, ep = self._endpoint(p)
            target = next((dm for dm in ep.get("deployedModels", []) if dm["id"] == req.deployed_model.id), None)
            if target is None:
                raise ApiError("NOT_FOUND", f"Deployed model {req.deployed_model.id!r} is not on {ep_name}.")
            forbidden = {"id", "model", "model_version_id", "create_time"} & set(paths)
            if forbidden:
                raise ApiError("INVALID_ARGUMENT", f"Fields {sorted(forbidden)} of a deployed model cannot change.")
            _apply_mask(target, _to_dict(req.deployed_model), paths)
            ep["updateTime"] = ep["etag"] = _now()
            response = v1.MutateDeployedModelResponse.pb()()
            json_format.ParseDict({"deployedModel": target}, response)
            return self._done_op(ep_name, v1.MutateDeployedModelOperationMetadata, response)

    # ------------------------------------------------------------------ prediction

    def _spec_of(self, dm: dict[str, Any]) -> dict[str, Any]:
        version = self._models.get(dm.get("model", ""), {"versions": {}})["versions"].get(
            dm.get("modelVersionId", ""), {}
        )
        return version.get("containerSpec", {})

    def _prediction_endpoint(self, p: dict[str, str], body: bytes) -> tuple[str, dict[str, Any]]:
        """The endpoint a prediction call names, after the host and size rules (contract V-HOST, V-SIZE)."""
        contract.check_request_size(body)
        ep_name, ep = self._endpoint(p)
        regional = (
            f"{p['location']}-aiplatform.googleapis.com",
            f"{self.host}:{self.port}",
            f"localhost:{self.port}",
            "",
        )
        contract.check_host(ep, p.get("_host", ""), regional)
        return ep_name, ep

    def _pick_deployed_model(
        self, p: dict[str, str], body: bytes, kind: str
    ) -> tuple[str, dict[str, Any], dict[str, Any]]:
        with self._lock:
            ep_name, ep = self._prediction_endpoint(p, body)
            split = {k: v for k, v in ep.get("trafficSplit", {}).items() if v > 0}
            if not split:
                raise ApiError(
                    "FAILED_PRECONDITION",
                    f"Endpoint {ep_name} has no deployed model with traffic: deploy a model or set traffic_split.",
                )
            dm_id = random.choices(list(split), weights=list(split.values()))[0]
            dm = next(d for d in ep["deployedModels"] if d["id"] == dm_id)
            spec = self._spec_of(dm)
            if kind == "invoke":
                contract.check_invoke(ep, spec, dm_id, p.get("subpath") or "/", _engine(spec))
            else:
                contract.check_predict_route(spec, dm_id, kind)
            return ep_name, ep, dict(dm)

    def _forward(
        self, ep_name: str, dm: dict[str, Any], kind: str, body: bytes, subpath: str
    ) -> tuple[int, bytes, str, dict[str, str]]:
        dm_id = dm["id"]
        headers = {"X-Vertex-AI-Deployed-Model-Id": dm_id}
        with self._lock:
            status = self._serving_status.get(dm_id, "ready")
            throttle = "predict-429" in self.faults and self._throttled.get(dm_id, 0) < 2
            if throttle:
                self._throttled[dm_id] = self._throttled.get(dm_id, 0) + 1
        if throttle:
            err = ApiError(
                "RESOURCE_EXHAUSTED",
                f"Too many requests for deployed model {dm_id} on {ep_name} (injected fault predict-429); retry later.",
            )
            return err.http_code, err.body(), "application/json", headers
        if status != "ready":
            what = "is still starting" if status == "starting" else f"is not serving: {status}"
            err = ApiError("UNAVAILABLE", f"Deployed model {dm_id} on {ep_name} {what}.")
            return err.http_code, err.body(), "application/json", headers
        try:
            code, out, ctype = self.serving.forward(dm_id, kind, body, subpath)
        except Exception as exc:  # noqa: BLE001 - a dead model server is a 503, as Vertex answers
            message = getattr(exc, "message", None) or str(exc) or repr(exc)
            err = ApiError("UNAVAILABLE", f"Deployed model {dm_id} on {ep_name} did not answer: {message}")
            return err.http_code, err.body(), "application/json", headers
        if kind == "predict" and code == 200:
            out = self._stamp_prediction(out, dm)
        return code, out, ctype, headers

    @staticmethod
    def _stamp_prediction(out: bytes, dm: dict[str, Any]) -> bytes:
        """Fill in which deployed model answered, as Vertex's PredictResponse does."""
        try:
            data = json.loads(out)
        except ValueError:
            return out
        if not isinstance(data, dict):
            return out
        data.setdefault("deployedModelId", dm["id"])
        data.setdefault("model", dm["model"])
        data.setdefault("modelVersionId", dm.get("modelVersionId", ""))
        return json.dumps(data).encode()

    def _predict(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        _parse_request(v1.PredictRequest, body)
        ep_name, _, dm = self._pick_deployed_model(p, body, "predict")
        return self._forward(ep_name, dm, "predict", body, "")

    def _raw_predict(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        # rawPredict carries the model server's own payload (an HttpBody), so there is no proto to parse.
        ep_name, _, dm = self._pick_deployed_model(p, body, "rawPredict")
        return self._forward(ep_name, dm, "rawPredict", body, "")

    def _chat(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        ep_name, _, dm = self._pick_deployed_model(p, body, "chat")
        return self._forward(ep_name, dm, "chat", body, "/chat/completions")

    def _invoke_endpoint(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        ep_name, _, dm = self._pick_deployed_model(p, body, "invoke")
        return self._forward(ep_name, dm, "invoke", body, p.get("subpath") or "/")

    def _invoke_deployed(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        with self._lock:
            ep_name, ep = self._prediction_endpoint(p, body)
            dm = next((dict(d) for d in ep.get("deployedModels", []) if d["id"] == p["dm"]), None)
            if dm is None:
                raise ApiError("NOT_FOUND", f"Deployed model {p['dm']} is not on {ep_name}.")
            spec = self._spec_of(dm)
            contract.check_invoke(ep, spec, dm["id"], p.get("subpath") or "/", _engine(spec))
        return self._forward(ep_name, dm, "invoke", body, p.get("subpath") or "/")

    def _restart_serving(self, dm: dict[str, Any]) -> None:
        """Bring a deployed model from a previous run back up; on failure it stays listed and answers 503."""
        model = self._models.get(dm.get("model", ""), {"versions": {}})
        version = model["versions"].get(dm.get("modelVersionId", ""), {})
        try:
            self.serving.start(
                dm["id"], _weights_source(version), version.get("containerSpec", {}), self.deploy_timeout_s
            )
            status = "ready"
        except Exception as exc:  # noqa: BLE001 - recorded and answered as 503 on predict
            status = f"restart failed: {getattr(exc, 'message', None) or exc}"
            _LOG.warning("restarting deployed model %s failed: %s", dm["id"], status)
        with self._lock:
            self._serving_status[dm["id"]] = status

    # ------------------------------------------------------------------ operations

    @staticmethod
    def _public_op(op: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in op.items() if not k.startswith("_")}

    def _find_op(self, p: dict[str, str]) -> dict[str, Any]:
        op = self._operations.get(p["op"])
        if op is None:
            raise ApiError("NOT_FOUND", f"Operation {p['op']} is not found.")
        return op

    def _get_operation(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        with self._lock:
            return self._json(self._public_op(self._find_op(p)))

    def _wait_operation(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        req = _parse_request(operations_pb2.WaitOperationRequest, body, query=query)
        timeout = req.timeout.ToTimedelta().total_seconds() if req.HasField("timeout") else 60.0
        deadline = time.monotonic() + min(timeout, 300.0)
        with self._lock:
            while not self._find_op(p).get("done") and time.monotonic() < deadline:
                self._changed.wait(timeout=max(0.0, deadline - time.monotonic()))
            return self._json(self._public_op(self._find_op(p)))

    def _cancel_operation(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        with self._lock:
            op = self._find_op(p)
            if not op.get("done"):
                self._cancelled_ops.add(p["op"])
            return self._json({})

    def _delete_operation(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        with self._lock:
            self._find_op(p)
            del self._operations[p["op"]]
            return self._json({})

    def _list_operations(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        prefix = f"projects/{p['project']}/locations/{p['location']}{p.get('scope') or ''}/operations/"
        with self._lock:
            ops = [self._public_op(op) for op in self._operations.values() if op["name"].startswith(prefix)]
        return self._json({"operations": ops})

    # ------------------------------------------------------------------ pipeline jobs

    def _job(self, p: dict[str, str]) -> tuple[str, dict[str, Any]]:
        name = f"projects/{p['project']}/locations/{p['location']}/pipelineJobs/{p['job']}"
        job = self._pipeline_jobs.get(name)
        if job is None:
            raise ApiError("NOT_FOUND", f"PipelineJob {name} is not found.")
        return name, job

    def _create_pipeline_job(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        parent = f"projects/{p['project']}/locations/{p['location']}"
        req = _parse_request(v1.CreatePipelineJobRequest, body, body_field="pipeline_job", query=query)
        if not req.pipeline_job.HasField("pipeline_spec") and not req.pipeline_job.template_uri:
            raise ApiError("INVALID_ARGUMENT", "pipeline_job needs pipeline_spec or template_uri.")
        with self._lock:
            job_id = req.pipeline_job_id or self._new_id()
            if not re.match(r"^[a-z0-9][a-z0-9-]{0,127}$", job_id):
                raise ApiError("INVALID_ARGUMENT", f"pipeline_job_id {job_id!r} is invalid: use [a-z0-9-], up to 128.")
            name = f"{parent}/pipelineJobs/{job_id}"
            if name in self._pipeline_jobs:
                raise ApiError("ALREADY_EXISTS", f"PipelineJob {name} already exists.")
            now = _now()
            job = _to_dict(req.pipeline_job)
            job.update({"name": name, "state": "PIPELINE_STATE_PENDING", "createTime": now, "updateTime": now})
            self._pipeline_jobs[name] = job
            self._save()
            out = _conform(v1.PipelineJob, job)
        self._spawn(self._run_pipeline_job, name)
        return self._json(out)

    def _run_pipeline_job(self, name: str) -> None:
        """Walk the job through the states Vertex reports; the emulator stores jobs, it does not run them."""
        steps = [(0.2, "PIPELINE_STATE_RUNNING"), (0.8, None)]
        for delay, state in steps:
            if self._stopping.wait(delay):
                return
            with self._lock:
                job = self._pipeline_jobs.get(name)
                if job is None or job["state"] not in ("PIPELINE_STATE_PENDING", "PIPELINE_STATE_RUNNING"):
                    return
                now = _now()
                if state is None:
                    if "pipeline-fail" in self.faults:
                        job["state"] = "PIPELINE_STATE_FAILED"
                        job["error"] = {
                            "code": _CODES["INTERNAL"][0],
                            "message": "The DAG failed because some tasks failed (injected fault pipeline-fail).",
                        }
                    else:
                        job["state"] = "PIPELINE_STATE_SUCCEEDED"
                    job["endTime"] = now
                else:
                    job["state"] = state
                    job["startTime"] = now
                job["updateTime"] = now
                self._save()

    def _get_pipeline_job(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        with self._lock:
            return self._proto(v1.PipelineJob, self._job(p)[1])

    def _list_pipeline_jobs(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        parent = f"projects/{p['project']}/locations/{p['location']}/"
        req = _parse_request(v1.ListPipelineJobsRequest, b"", body_field=None, query=query)
        with self._lock:
            items = [_conform(v1.PipelineJob, j) for n, j in self._pipeline_jobs.items() if n.startswith(parent)]
        page, token = _paginate(_filter_items(items, req.filter), req.page_size, req.page_token)
        return self._json({"pipelineJobs": page, **({"nextPageToken": token} if token else {})})

    def _cancel_pipeline_job(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        with self._lock:
            _, job = self._job(p)
            if job["state"] in ("PIPELINE_STATE_PENDING", "PIPELINE_STATE_RUNNING"):
                job["state"] = "PIPELINE_STATE_CANCELLED"
                job["endTime"] = job["updateTime"] = _now()
                self._save()
            return self._json({})

    def _delete_pipeline_job(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        with self._lock:
            name, job = self._job(p)
            if job["state"] in ("PIPELINE_STATE_PENDING", "PIPELINE_STATE_RUNNING"):
                raise ApiError("FAILED_PRECONDITION", f"PipelineJob {name} is still running: cancel it first.")
            del self._pipeline_jobs[name]
            scope = f"projects/{p['project']}/locations/{p['location']}"
            return self._done_op(scope, v1.DeleteOperationMetadata, empty_pb2.Empty())

    # ------------------------------------------------------------------ schedules

    def _schedule(self, p: dict[str, str]) -> tuple[str, dict[str, Any]]:
        name = f"projects/{p['project']}/locations/{p['location']}/schedules/{p['schedule']}"
        sched = self._schedules.get(name)
        if sched is None:
            raise ApiError("NOT_FOUND", f"Schedule {name} is not found.")
        return name, sched

    def _create_schedule(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        parent = f"projects/{p['project']}/locations/{p['location']}"
        req = _parse_request(v1.CreateScheduleRequest, body, body_field="schedule", query=query)
        s = req.schedule
        if not s.display_name:
            raise ApiError("INVALID_ARGUMENT", "schedule.display_name is required.")
        if not s.cron:
            raise ApiError("INVALID_ARGUMENT", "schedule.cron is required (e.g. 'TZ=UTC 0 3 * * 1').")
        if not s.HasField("create_pipeline_job_request"):
            raise ApiError("INVALID_ARGUMENT", "schedule.create_pipeline_job_request is required.")
        if s.max_concurrent_run_count <= 0:
            raise ApiError("INVALID_ARGUMENT", "schedule.max_concurrent_run_count must be positive.")
        fields = s.cron.split()
        if fields and fields[0].startswith(("TZ=", "CRON_TZ=")):
            fields = fields[1:]
        if len(fields) != 5:
            raise ApiError("INVALID_ARGUMENT", f"schedule.cron {s.cron!r} must have 5 fields after an optional TZ=.")
        with self._lock:
            name = f"{parent}/schedules/{self._new_id()}"
            now = _now()
            sched = _to_dict(s)
            sched.update({"name": name, "state": "ACTIVE", "createTime": now, "updateTime": now})
            sched.setdefault("nextRunTime", sched.get("startTime", now))
            self._schedules[name] = sched
            self._save()
            return self._proto(v1.Schedule, sched)

    def _get_schedule(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        with self._lock:
            return self._proto(v1.Schedule, self._schedule(p)[1])

    def _list_schedules(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        parent = f"projects/{p['project']}/locations/{p['location']}/"
        req = _parse_request(v1.ListSchedulesRequest, b"", body_field=None, query=query)
        with self._lock:
            items = [_conform(v1.Schedule, s) for n, s in self._schedules.items() if n.startswith(parent)]
        page, token = _paginate(_filter_items(items, req.filter), req.page_size, req.page_token)
        return self._json({"schedules": page, **({"nextPageToken": token} if token else {})})

    def _update_schedule(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        req = _parse_request(v1.UpdateScheduleRequest, body, body_field="schedule", query=query)
        paths = _check_mask(req.update_mask, v1.Schedule.pb().DESCRIPTOR)
        with self._lock:
            _, sched = self._schedule(p)
            _apply_mask(sched, _to_dict(req.schedule), paths)
            sched["updateTime"] = _now()
            self._save()
            return self._proto(v1.Schedule, sched)

    def _set_schedule_state(self, p: dict[str, str], want_from: str, to: str) -> Any:
        with self._lock:
            name, sched = self._schedule(p)
            if sched["state"] != want_from:
                raise ApiError("FAILED_PRECONDITION", f"Schedule {name} is {sched['state']}, not {want_from}.")
            sched["state"] = to
            sched["updateTime"] = _now()
            self._save()
            return self._json({})

    def _pause_schedule(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        return self._set_schedule_state(p, "ACTIVE", "PAUSED")

    def _resume_schedule(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        return self._set_schedule_state(p, "PAUSED", "ACTIVE")

    def _delete_schedule(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        with self._lock:
            name, _ = self._schedule(p)
            del self._schedules[name]
            return self._done_op(name, v1.DeleteOperationMetadata, empty_pb2.Empty())


def _make_handler(emu: Emulator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.1 keeps the SDK's requests sessions alive between LRO polls.
        protocol_version = "HTTP/1.1"

        def _read_body(self) -> bytes:
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _serve(self) -> None:
            parts = urlsplit(self.path)
            body = self._read_body()
            query = parse_qs(parts.query, keep_blank_values=True)
            status, out, ctype, extra = emu.handle(self.command, parts.path, query, body, self.headers)
            extra = {k: v for k, v in extra.items()}
            lowered = {k.lower(): k for k in extra}
            # A proxied HEAD reports the upstream's length for an empty body; otherwise the length is ours.
            length = str(len(out))
            if "content-length" in lowered:
                upstream_length = extra.pop(lowered["content-length"])
                if self.command == "HEAD":
                    length = upstream_length
            if "content-type" in lowered:
                extra.pop(lowered["content-type"])
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", length)
            for key, value in extra.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(out)

        do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = do_HEAD = _serve

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            _LOG.debug("%s %s", self.address_string(), format % args)

    return Handler


def create_emulator(
    state_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    storage_endpoint: str | None = None,
    hub_upstream: str | None = None,
    faults: Iterable[str] = (),
    serving: Any = None,
    deploy_timeout_s: float = 900.0,
) -> Emulator:
    """Build an emulator over `state_dir` (loading what a previous run left there); call .start() to serve."""
    emu = Emulator(
        Path(state_dir),
        host=host,
        port=port,
        storage_endpoint=storage_endpoint,
        hub_upstream=hub_upstream,
        faults=faults,
        serving=serving,
        deploy_timeout_s=deploy_timeout_s,
    )
    if emu.serving is None:
        from pipelines.local.emulator.serving import ServingManager

        emu.serving = ServingManager(state_dir=Path(state_dir), storage_endpoint=storage_endpoint, faults=emu.faults)
    return emu
