"""Vertex AI REST emulator: the server (lifecycle, persistence, dispatch) over one module per service:
models.py, endpoints.py, prediction.py, operations.py, pipeline_jobs.py, and side_apis.py for the APIs around
Vertex (Secret Manager, Cloud Quotas, Cloud Logging, the Hub gate)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from google.cloud import aiplatform_v1 as v1

from vlp.pipelines.local.emulator import artifact_registry, plumbing, system_params
from vlp.pipelines.local.emulator.cloud_run import CloudRunService
from vlp.pipelines.local.emulator.core import (
    _ID_BASE,
    _LOG,
    STATE_FILE,
    _conform,
    _generic_meta,
    _now,
    _pack_op,
    _Route,
)
from vlp.pipelines.local.emulator.custom_jobs import CustomJobsService
from vlp.pipelines.local.emulator.endpoints import EndpointsService
from vlp.pipelines.local.emulator.errors import _CODES, ApiError, read_state_file
from vlp.pipelines.local.emulator.iam import IamService
from vlp.pipelines.local.emulator.models import ModelsService
from vlp.pipelines.local.emulator.operations import OperationsService
from vlp.pipelines.local.emulator.pipeline_jobs import PipelineJobsService
from vlp.pipelines.local.emulator.prediction import PredictionService
from vlp.pipelines.local.emulator.storage_gate import GCS_PATH, StorageGate


class Emulator(
    ModelsService,
    EndpointsService,
    PredictionService,
    OperationsService,
    PipelineJobsService,
    CustomJobsService,
    CloudRunService,
    IamService,
    StorageGate,
):
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
        grpc: bool = False,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port
        self.storage_endpoint = storage_endpoint
        self.hub_upstream = hub_upstream
        self.faults: set[str] = set(faults)
        self.hub_access: set[str] = set()  # Hub tokens with access to gated repos (/_emulator/hub-access)
        self.calls: list[str] = []
        # What each call created or removed, as Cloud Audit Logs records it (methodName, resourceName):
        # the run summary's created / deleted come from here, not from comparing state before and after.
        self.audit: list[dict[str, str]] = []
        self.serving = serving
        self.deploy_timeout_s = deploy_timeout_s
        self.url = ""
        # gRPC beside REST (grpc_bridge.py): off unless asked for (`vlp local up` asks); its TLS endpoint once up.
        self.grpc = grpc
        self.grpc_endpoint = self.https_endpoint = ""
        self._grpc_server: Any = None
        self._https: ThreadingHTTPServer | None = None
        # The plumbing routes' key (plumbing.py): made with the state dir, the same across restarts.
        self.plumbing_key = plumbing.ensure_key(self.state_dir)
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
        self._custom_jobs: dict[str, dict[str, Any]] = {}  # custom_jobs.py; "_runAs" is the account a job runs as
        self._job_processes: dict[str, Any] = {}  # custom job name -> its replica's process (runtime only)
        self._operations: dict[str, dict[str, Any]] = {}  # op id -> Operation JSON
        # Cloud Run Admin API v2 (cloud_run.py): services, revisions (by full name) and IAM policies.
        self._run_services: dict[str, dict[str, Any]] = {}
        self._run_revisions: dict[str, dict[str, Any]] = {}
        self._run_policies: dict[str, dict[str, Any]] = {}
        # IAM (iam.py): policies on projects, buckets, secrets and service accounts; access tokens -> principals;
        # APIs turned off per project.
        self._iam_policies: dict[str, dict[str, Any]] = {}
        self._tokens: dict[str, str] = {}
        self._disabled_apis: dict[str, list[str]] = {}
        self._upload_sessions: dict[str, str] = {}  # resumable upload id -> who started it (runtime only)
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
        if self.hub_upstream and hasattr(self.serving, "hub_endpoint"):
            self.serving.hub_endpoint = f"{self.url}/hf"  # `--model=ORG/NAME` downloads through the Hub gate
        if self.grpc:
            self._start_grpc()
        else:
            (self.state_dir / "grpc.json").unlink(missing_ok=True)  # no stale endpoint for `vlp local status`
        with self._lock:
            restarts = [(ep, dm) for ep in self._endpoints.values() for dm in ep.get("deployedModels", [])]
            in_use = {dm["id"] for _ep, dm in restarts} | {self._serving_id(r) for r in self._run_revisions}
            jobs = [
                name
                for name, job in self._pipeline_jobs.items()
                if job.get("state") in ("PIPELINE_STATE_PENDING", "PIPELINE_STATE_RUNNING")
            ]
        self._remove_unused_copies(in_use)
        for _ep, dm in restarts:
            self._serving_status[dm["id"]] = "starting"
            self._spawn(self._restart_serving, dm)
        for name in jobs:
            self._spawn(self._run_pipeline_job, name)
        self._restart_custom_jobs()

    def _start_grpc(self) -> None:
        """gRPC beside REST on a TLS port of its own (grpc_bridge.py, tls.py), the port it had last time when free;
        recorded in STATE/grpc.json for `vlp local status`."""
        from concurrent.futures import ThreadPoolExecutor

        import grpc

        from vlp.pipelines.local.emulator import grpc_bridge, tls

        certs = tls.ensure_certificates(self.state_dir)
        credentials = grpc.ssl_server_credentials([(certs.key.read_bytes(), certs.cert.read_bytes())])
        record = self.state_dir / "grpc.json"
        try:
            previous = json.loads(record.read_text())
        except (OSError, ValueError):
            previous = {}

        def last_port(key: str) -> int:
            """The port this listener had last time (addresses stay valid across restarts when free)."""
            try:
                return int(str(previous.get(key, ":0")).rsplit(":", 1)[1])
            except (ValueError, AttributeError, IndexError):
                return 0

        last = last_port("endpoint")
        server = grpc.server(
            ThreadPoolExecutor(max_workers=16, thread_name_prefix="grpc-bridge"),
            handlers=[grpc_bridge.BridgeHandler(self.handle, grpc_bridge.method_table())],
        )
        port = 0
        for wanted in dict.fromkeys([last, 0]):
            try:
                port = server.add_secure_port(f"{self.host}:{wanted}", credentials)
            except RuntimeError:  # that port is taken now
                continue
            if port:
                break
        server.start()
        self._grpc_server = server
        self.grpc_endpoint = f"{self.host}:{port}"
        # And REST over HTTPS: the aiplatform SDK and gapic's REST transport call https://API_ENDPOINT.
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certs.cert, certs.key)
        for wanted in dict.fromkeys([last_port("https_endpoint"), 0]):
            try:
                self._https = ThreadingHTTPServer((self.host, wanted), _make_handler(self))
                break
            except OSError:
                continue
        self._https.daemon_threads = True
        self._https.socket = context.wrap_socket(self._https.socket, server_side=True)
        threading.Thread(target=self._https.serve_forever, name="vertex-emulator-https", daemon=True).start()
        self.https_endpoint = f"{self.host}:{self._https.server_address[1]}"
        record.write_text(
            json.dumps(
                {
                    "endpoint": self.grpc_endpoint,
                    "https_endpoint": self.https_endpoint,
                    "ca": str(certs.ca),
                    "bundle": str(certs.bundle),
                }
            )
        )

    def _remove_unused_copies(self, in_use: set[str]) -> None:
        """Serving copies of the weights that no deployed model or Cloud Run revision uses any more: one a crash left
        half-copied, or one whose model went while the emulator was down. Each is the model's full size; the model
        server logs stay (as Cloud Logging keeps them)."""
        serving_dir = getattr(self.serving, "serving_dir", None)
        # Only the copies of this emulator's own serving manager (a test may hand several emulators one manager).
        if serving_dir is None or Path(serving_dir).resolve().parent != self.state_dir.resolve():
            return
        if not Path(serving_dir).is_dir():
            return
        import shutil

        in_use = in_use | set(getattr(self.serving, "known_ids", lambda: [])())

        for copy in Path(serving_dir).iterdir():
            if copy.is_dir() and copy.name not in in_use:
                _LOG.warning("removing the serving copy %s: no deployed model or revision uses it", copy)
                shutil.rmtree(copy, ignore_errors=True)

    def stop(self) -> None:
        """Stop answering, then stop every serving process this emulator started."""
        self._stopping.set()
        if self._grpc_server is not None:
            self._grpc_server.stop(grace=1).wait(5)
            self._grpc_server = None
        if self._https is not None:
            self._https.shutdown()
            self._https.server_close()
            self._https = None
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        with self._lock:
            replicas = list(self._job_processes.values())
        for process in replicas:  # a custom job's replica ends with the emulator; a restart runs the job again
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
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
        data = read_state_file(path)
        self._counter = data.get("counter", 0)
        self._models = data.get("models", {})
        self._endpoints = data.get("endpoints", {})
        self._pipeline_jobs = data.get("pipelineJobs", {})
        self._custom_jobs = data.get("customJobs", {})
        self._schedules = data.get("schedules", {})
        self._operations = data.get("operations", {})
        self._run_services = data.get("runServices", {})
        self._run_revisions = data.get("runRevisions", {})
        self._run_policies = data.get("runPolicies", {})
        self._iam_policies = data.get("iamPolicies", {})
        self._tokens = data.get("tokens", {})
        self._disabled_apis = data.get("disabledApis", {})
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
            "customJobs": self._custom_jobs,
            "schedules": self._schedules,
            "operations": self._operations,
            "runServices": self._run_services,
            "runRevisions": self._run_revisions,
            "runPolicies": self._run_policies,
            "iamPolicies": self._iam_policies,
            "tokens": self._tokens,
            "disabledApis": self._disabled_apis,
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
                # As GetService answers them (URLs naming the emulator's address now): what `vlp local status` lists.
                "runServices": [self._run_view(s) for s in self._run_services.values()],
            }

    def _control(self, method: str, path: str, body: bytes) -> tuple[int, bytes] | None:
        if path == "/healthz":
            return 200, b'{"status": "ok"}'
        if path == "/_emulator/calls" and method == "GET":
            return 200, json.dumps({"calls": list(self.calls)}).encode()
        if path == "/_emulator/calls:clear" and method == "POST":
            self.calls.clear()
            self.audit.clear()
            return 200, b"{}"
        if path == "/_emulator/audit" and method == "GET":
            return 200, json.dumps({"entries": list(self.audit)}).encode()
        if path == "/_emulator/faults":
            if method == "POST":
                wanted = json.loads(body or b"{}").get("faults", [])
                # Replace in place: the serving manager and side APIs hold this same set.
                self.faults.clear()
                self.faults.update(wanted)
            return 200, json.dumps({"faults": sorted(self.faults)}).encode()
        if path == "/_emulator/hub-access":
            # Hub tokens whose users have accepted a gated repo's terms: with the hub-gated fault, the Hub gate lets
            # these through and refuses every other (hub_gate.py). Runtime only, as faults are.
            if method == "POST":
                self.hub_access = set(json.loads(body or b"{}").get("tokens", []))
            return 200, json.dumps({"tokens": len(self.hub_access)}).encode()
        if path == "/_emulator/state" and method == "GET":
            return 200, json.dumps(self.snapshot()).encode()
        return self._iam_control(method, path, body)

    # ------------------------------------------------------------------ dispatch

    def handle(
        self, method: str, raw_path: str, query: dict[str, list[str]], body: bytes, headers: Any
    ) -> tuple[int, bytes, str, dict[str, str]]:
        """Answer one HTTP request: (status, body, content type, extra headers)."""
        path = unquote(raw_path)
        if path.startswith("/_emulator/") and not plumbing.allowed(
            self.plumbing_key, headers.get(plumbing.HEADER) if headers is not None else None
        ):
            err = ApiError(
                "PERMISSION_DENIED",
                f"{method} {path} is the local stack's own plumbing: it needs the stack's key (header "
                f"{plumbing.HEADER}, from {plumbing.key_path(self.state_dir)}, readable only by the stack's owner).",
            )
            return err.http_code, err.body(), "application/json", {}
        control = self._control(method, path, body)
        if control is not None:
            return control[0], control[1], "application/json", {}
        # Control routes (ours and the side APIs' /_emulator/...) are test plumbing, not API traffic.
        if not path.startswith("/_emulator/"):
            self.calls.append(f"{method} {path}")
        try:
            # Who is calling, and may they (iam.py): Google answers 401 / 403 before anything else.
            principal = self.authorize(method, path, query, body, headers)
            if GCS_PATH.match(path):
                return self.storage(method, raw_path, query, body, headers, principal)
            answer = self._route(method, path, raw_path, query, body, headers, principal)
        except ApiError as err:
            return err.http_code, err.body(), "application/json", {}
        except Exception as exc:  # noqa: BLE001 - a bug here must reach the client as a 500, not a hang
            _LOG.exception("emulator handler failed for %s %s", method, path)
            err = ApiError("INTERNAL", f"Emulator error handling {method} {path}: {exc!r}")
            return err.http_code, err.body(), "application/json", {}
        return answer

    def _route(
        self,
        method: str,
        path: str,
        raw_path: str,
        query: dict[str, list[str]],
        body: bytes,
        headers: Any,
        principal: str,
    ) -> tuple[int, Any, str, dict[str, str]]:
        """A Google API call: its system parameters taken off the query first (system_params.py: `alt`, `fields`,
        `prettyPrint`, `key`...), then the method's route; `fields` makes a 200's JSON a partial response. The Hub,
        the metadata server and Cloud Run service URLs are not Google APIs: their query is theirs."""
        system: dict[str, str] = {}
        if not (path == "/hf" or path.startswith(("/hf/", "/_md/", "/_run/"))):
            query, system = system_params.split(query)
        status, out, ctype, extra = self._dispatch(method, path, raw_path, query, body, headers, principal)
        if system.get("fields") and status == 200 and isinstance(out, bytes) and "json" in ctype:
            out = system_params.partial(out, system["fields"])
        return status, out, ctype, extra

    def _dispatch(
        self,
        method: str,
        path: str,
        raw_path: str,
        query: dict[str, list[str]],
        body: bytes,
        headers: Any,
        principal: str,
    ) -> tuple[int, Any, str, dict[str, str]]:
        # Vertex AI's v1beta1 serves every v1 method at the same path (a superset, googleapis
        # google/cloud/aiplatform/v1beta1): what has no v1beta1 route of its own here answers as its v1 form.
        forms = [path]
        if path.startswith("/v1beta1/projects/") and "/locations/" in path:
            forms.append("/v1/" + path.removeprefix("/v1beta1/"))
        for route, m in ((r, r.regex.match(f)) for f in forms for r in self._routes if r.method == method):
            if m:
                # The host the client called: prediction routes check it (dedicated DNS vs regional host).
                params = {
                    **{k: v or "" for k, v in m.groupdict().items()},
                    "_host": (headers.get("Host") if headers is not None else "") or "",
                    "_authorization": (headers.get("Authorization") if headers is not None else "") or "",
                    "_principal": principal,
                }
                return route.handler(params, query, body)
        answer = self._side_apis(method, raw_path, query, body, headers)
        if answer is not None:
            return answer
        raise ApiError("NOT_FOUND", f"The emulator does not serve {method} {path}.")

    def _side_apis(
        self, method: str, path: str, query: dict[str, list[str]], body: bytes, headers: Any
    ) -> tuple[int, bytes, str, dict[str, str]] | None:
        try:
            from vlp.pipelines.local.emulator import side_apis
        except ImportError:
            return None
        return side_apis.handle(self, method, path, query, body, headers)

    def _build_routes(self) -> list[_Route]:
        # Each service module declares its own routes; the first match answers, so the order is kept.
        return [
            *self._iam_routes(),
            *artifact_registry.iam_routes(self),
            *self._model_routes(),
            *self._endpoint_routes(),
            *self._prediction_routes(),
            *self._operation_routes(),
            *self._pipeline_routes(),
            *self._custom_job_routes(),
            *self._cloud_run_routes(),
        ]

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _json(data: Any, status: int = 200) -> tuple[int, bytes, str, dict[str, str]]:
        return status, json.dumps(data).encode(), "application/json", {}

    def _proto(self, proto_cls: Any, data: dict[str, Any]) -> tuple[int, bytes, str, dict[str, str]]:
        return self._json(_conform(proto_cls, data))

    def _audit(self, action: str, method: str, resource: str) -> None:
        """One audit entry: `action` is created or deleted, `method` the API method (google.cloud.aiplatform.v1...)."""
        self.audit.append({"action": action, "methodName": method, "resourceName": resource})

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
            length = str(len(out)) if isinstance(out, bytes) else ""
            if "content-length" in lowered:
                upstream_length = extra.pop(lowered["content-length"])
                if self.command == "HEAD":
                    length = upstream_length
            if "content-type" in lowered:
                extra.pop(lowered["content-type"])
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            streaming = not isinstance(out, bytes)
            if streaming:
                # An event stream passed on as the model server sends it (HTTP/1.1 chunked), as Google's front
                # end passes a streaming prediction's chunks on.
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Content-Length", length)
            for key, value in extra.items():
                self.send_header(key, value)
            self.end_headers()
            if streaming:
                self._write_chunks(out)
            elif self.command != "HEAD":
                self.wfile.write(out)

        def _write_chunks(self, chunks: Any) -> None:
            try:
                for chunk in chunks:
                    if chunk:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except OSError:
                self.close_connection = True  # the client went away: stop reading the model server
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()

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
    grpc: bool = False,
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
        grpc=grpc,
    )
    if emu.serving is None:
        from vlp.pipelines.local.emulator.serving import ServingManager

        emu.serving = ServingManager(state_dir=Path(state_dir), storage_endpoint=storage_endpoint, faults=emu.faults)
    return emu
