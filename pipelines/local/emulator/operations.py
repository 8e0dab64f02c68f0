"""The emulator's long-running operations: get, wait, cancel, delete, list."""

from __future__ import annotations

import time
from typing import Any

from google.longrunning import operations_pb2

from vlp.pipelines.local.emulator.core import (
    _LOC,
    _parse_request,
    _Route,
)
from vlp.pipelines.local.emulator.errors import ApiError


class OperationsService:
    """Mixed into Emulator (server.py), whose state and helpers its handlers use."""

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

    def _operation_routes(self) -> list[_Route]:
        # The REST operations client tries its http_options in order, and the /ui/ ones come first; Cloud Run uses /v2/.
        ops = _LOC.replace("/v1/", "/(?:v1|v1beta1|v2|ui)/", 1) + r"(?P<scope>/[^:]+?)?/operations"
        r = _Route
        return [
            r("GET", ops + r"/(?P<op>[^/:]+)", self._get_operation),
            r("POST", ops + r"/(?P<op>[^/:]+):wait", self._wait_operation),
            r("POST", ops + r"/(?P<op>[^/:]+):cancel", self._cancel_operation),
            r("DELETE", ops + r"/(?P<op>[^/:]+)", self._delete_operation),
            r("GET", ops, self._list_operations),
        ]
