"""gRPC beside REST: the emulator's own handlers, reached through the transport Google's clients use by default.

Google's client libraries (gapic) speak gRPC unless told otherwise, over TLS. This bridge serves every method of the
services below on one TLS port, with nothing hand-written per method: each library's own gRPC transport says which
methods exist and their request and response types (its stubs, recorded from a channel that only listens), and the
same library's REST transport says how each maps onto REST (its `google.api.http` bindings and its transcoding,
`path_template.transcode`, exactly what the REST transport sends). A call is transcoded to that REST request, answered
by `Emulator.handle` (the same IAM checks, errors and long-running operations as REST), and the JSON answer parsed
back into the response type. A REST error becomes the gRPC status of the same name, with its details.

TLS: the stack makes its own CA (tls.py); a client trusts it through GRPC_DEFAULT_SSL_ROOTS_FILE_PATH, which
`vlp local status` prints.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

_LOG = logging.getLogger(__name__)

# The client libraries whose services the emulator answers (each only where it is installed).
LIBRARIES = [
    "google.cloud.aiplatform_v1",
    "google.cloud.aiplatform_v1beta1",
    "google.cloud.run_v2",
    "google.cloud.secretmanager_v1",
    "google.cloud.cloudquotas_v1",
    "google.cloud.resourcemanager_v3",
    "google.cloud.artifactregistry_v1",
]


@dataclass
class _Method:
    """One RPC: how its request and response travel, and the REST binding the library's REST transport uses."""

    kind: str  # unary_unary or unary_stream
    request_type: Any
    response_type: Any  # None: google.protobuf.Empty
    rest: list[Any]  # the REST base classes (`_BaseGetEndpoint`...) that can carry it, tried in order

    def deserialize(self, data: bytes) -> Any:
        return self.request_type.deserialize(data) if _is_proto_plus(self.request_type) else self.request_type.FromString(data)

    def serialize(self, message: Any) -> bytes:
        if _is_proto_plus(type(message)):
            return type(message).serialize(message)
        return message.SerializeToString()


def _is_proto_plus(cls: Any) -> bool:
    return hasattr(cls, "pb") and hasattr(cls, "deserialize")


class _Recorder(grpc.Channel):
    """A channel that records the stubs a gRPC transport asks for (method path, serializer, deserializer)."""

    def __init__(self) -> None:
        self.stubs: dict[str, tuple[str, Any, Any]] = {}

    def _record(self, kind: str) -> Callable[..., Any]:
        def stub(
            method: str, request_serializer: Any = None, response_deserializer: Any = None, *_: Any, **__: Any
        ) -> Any:
            self.stubs[method] = (kind, request_serializer, response_deserializer)
            return lambda *a, **k: None

        return stub

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._record("unary_unary")(method, *args, **kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._record("unary_stream")(method, *args, **kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._record("stream_unary")(method, *args, **kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._record("stream_stream")(method, *args, **kwargs)

    def subscribe(self, *args: Any, **kwargs: Any) -> None:
        pass

    def unsubscribe(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


# The mixin RPCs every service carries; their stubs name no request class (they serialize with the raw pb).
def _mixin_request_types() -> dict[str, Any]:
    from google.longrunning import operations_pb2

    return {
        "GetOperation": operations_pb2.GetOperationRequest,
        "ListOperations": operations_pb2.ListOperationsRequest,
        "CancelOperation": operations_pb2.CancelOperationRequest,
        "DeleteOperation": operations_pb2.DeleteOperationRequest,
        "WaitOperation": operations_pb2.WaitOperationRequest,
    }


def _services(library: str) -> Iterator[tuple[Any, Any]]:
    """(gRPC transport class, REST base transport class) of each service the library has."""
    try:
        package = importlib.import_module(f"{library}.services")
    except ImportError:
        return
    for info in pkgutil.iter_modules(package.__path__):
        try:
            grpc_module = importlib.import_module(f"{library}.services.{info.name}.transports.grpc")
            rest_module = importlib.import_module(f"{library}.services.{info.name}.transports.rest_base")
        except ImportError:
            continue
        transport = next(
            (c for n, c in vars(grpc_module).items() if n.endswith("GrpcTransport") and inspect.isclass(c)), None
        )
        rest = next((c for n, c in vars(rest_module).items() if n.startswith("_Base") and n.endswith("RestTransport")), None)
        if transport is not None and rest is not None:
            yield transport, rest


def method_table(libraries: list[str] = LIBRARIES) -> dict[str, _Method]:
    """'/package.Service/Method' -> how to answer it, for every RPC of the installed libraries that has a REST
    binding (an RPC without one, such as a client-streaming one, is not served: UNIMPLEMENTED)."""
    from google.auth.credentials import AnonymousCredentials
    from google.protobuf import empty_pb2

    mixins = _mixin_request_types()
    table: dict[str, _Method] = {}
    for library in libraries:
        for transport_cls, rest_base in _services(library):
            recorder = _Recorder()
            transport = transport_cls(channel=recorder, credentials=AnonymousCredentials())
            transport._logged_channel = recorder  # the stubs straight from the recorder, not through the logger
            transport._stubs = {}
            for name in dir(transport_cls):
                if isinstance(getattr(transport_cls, name, None), property) and name not in ("grpc_channel", "kind"):
                    try:
                        getattr(transport, name)
                    except Exception:  # noqa: BLE001 - a property that is not a stub
                        continue
            for path, (kind, serializer, deserializer) in recorder.stubs.items():
                short = path.rsplit("/", 1)[1]
                base = getattr(rest_base, f"_Base{short}", None)
                if base is None or not hasattr(base, "_get_http_options"):
                    continue
                request_type = getattr(serializer, "__self__", None) or mixins.get(short)
                if request_type is None or kind not in ("unary_unary", "unary_stream"):
                    continue
                response_type = getattr(deserializer, "__self__", None) or (empty_pb2.Empty if deserializer is None else None)
                if response_type is None:
                    continue
                if path in table:
                    # The operations mixin: one binding per API (v1, v2...), tried in turn; the same one once.
                    if all(b._get_http_options() != base._get_http_options() for b in table[path].rest):
                        table[path].rest.append(base)
                    continue
                table[path] = _Method(kind, request_type, response_type, [base])
    return table


class _Headers(dict):
    """The REST request's headers as Emulator.handle reads them (case-insensitive get)."""

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        for k, v in self.items():
            if k.lower() == key.lower():
                return v
        return default


def _rest_request(base: Any, request: Any) -> tuple[str, str, dict[str, list[str]], bytes]:
    """(method, path, query, body) as the library's REST transport would send `request`."""
    from google.api_core import rest_helpers

    options = base._get_http_options()
    transcoded = base._get_transcoded_request(options, request)
    body = base._get_request_body_json(transcoded).encode() if hasattr(base, "_get_request_body_json") else b""
    raw = getattr(request, "http_body", None)
    if raw is not None and getattr(raw, "data", b""):
        body = bytes(raw.data)  # RawPredict and its streaming forms: the container's own payload, as REST sends it
    query: dict[str, list[str]] = {}
    for key, value in rest_helpers.flatten_query_params(base._get_query_params_json(transcoded), strict=True):
        query.setdefault(key, []).append(str(value))
    return transcoded["method"].upper(), transcoded["uri"], query, body


def _response(method: _Method, data: bytes) -> Any:
    from google.protobuf import json_format

    if _is_proto_plus(method.response_type):
        return method.response_type.from_json(data or b"{}", ignore_unknown_fields=True)
    return json_format.Parse(data or b"{}", method.response_type(), ignore_unknown_fields=True)


def _abort(context: grpc.ServicerContext, status: int, data: bytes) -> None:
    """The REST error as the gRPC status of the same name (google.rpc.Status: code, message, details)."""
    from google.protobuf import any_pb2, json_format
    from google.rpc import code_pb2, error_details_pb2, status_pb2  # noqa: F401 - error_details: the details' types
    from grpc_status import rpc_status

    try:
        error = json.loads(data).get("error", {})
    except (ValueError, AttributeError):
        error = {}
    name = str(error.get("status") or "UNKNOWN")
    code = code_pb2.Code.Value(name) if name in code_pb2.Code.keys() else code_pb2.UNKNOWN
    message = str(error.get("message") or data[:500].decode(errors="replace") or f"HTTP {status}")
    details = []
    for detail in error.get("details") or []:
        try:
            packed = any_pb2.Any()
            json_format.ParseDict(detail, packed)
            details.append(packed)
        except (json_format.ParseError, TypeError, ValueError):
            continue
    context.abort_with_status(rpc_status.to_status(status_pb2.Status(code=code, message=message, details=details)))


class BridgeHandler(grpc.GenericRpcHandler):
    """Answers every RPC of `table` through `handle` (Emulator.handle)."""

    def __init__(self, handle: Callable[..., tuple[int, Any, str, dict[str, str]]], table: dict[str, _Method]) -> None:
        self._handle = handle
        self._table = table

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = self._table.get(handler_call_details.method)
        if method is None:
            return None  # UNIMPLEMENTED, as for a method the service does not have
        if method.kind == "unary_stream":
            return grpc.unary_stream_rpc_method_handler(
                lambda request, context: self._stream(method, request, context),
                request_deserializer=method.deserialize,
                response_serializer=method.serialize,
            )
        return grpc.unary_unary_rpc_method_handler(
            lambda request, context: self._unary(method, request, context),
            request_deserializer=method.deserialize,
            response_serializer=method.serialize,
        )

    def _call(self, method: _Method, request: Any, context: grpc.ServicerContext) -> tuple[int, Any]:
        headers = _Headers({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
        if "authorization" in headers:
            headers["Authorization"] = headers.pop("authorization")
        status, out = 404, b""
        for base in method.rest:
            verb, path, query, body = _rest_request(base, request)
            status, out, _, _ = self._handle(verb, path, query, body, headers)
            if status != 404:
                break
        return status, out

    def _unary(self, method: _Method, request: Any, context: grpc.ServicerContext) -> Any:
        status, out = self._call(method, request, context)
        if not isinstance(out, bytes):
            out = b"".join(out)
        if status != 200:
            _abort(context, status, out)
        return _response(method, out)

    def _stream(self, method: _Method, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        """A server-streaming RPC: each JSON message of the REST stream (a JSON array, as Google's REST streams
        are), or each event line of an HttpBody stream, as it comes."""
        status, out = self._call(method, request, context)
        if status != 200:
            _abort(context, status, out if isinstance(out, bytes) else b"".join(out))
        chunks = [out] if isinstance(out, bytes) else out
        if method.response_type.__name__ == "HttpBody":
            for chunk in chunks:
                yield method.response_type(content_type="text/event-stream", data=chunk)
            return
        for chunk in chunks:
            text = chunk.decode().strip().lstrip("[").rstrip("]").strip(",").strip()
            if text:
                yield _response(method, text.encode())
