"""Errors the emulator answers, in Google's JSON error shape and google.rpc.Code numbers."""

from __future__ import annotations

import json

# google.rpc.Code numbers and the HTTP status Google's REST front end answers with for each.
_CODES: dict[str, tuple[int, int]] = {
    "CANCELLED": (1, 499),
    "INVALID_ARGUMENT": (3, 400),
    "DEADLINE_EXCEEDED": (4, 504),
    "NOT_FOUND": (5, 404),
    "ALREADY_EXISTS": (6, 409),
    "RESOURCE_EXHAUSTED": (8, 429),
    "FAILED_PRECONDITION": (9, 400),
    "ABORTED": (10, 409),
    "UNIMPLEMENTED": (12, 501),
    "INTERNAL": (13, 500),
    "UNAVAILABLE": (14, 503),
    "PERMISSION_DENIED": (7, 403),
    "UNAUTHENTICATED": (16, 401),
}


class ApiError(Exception):
    """An error answered in Google's JSON error shape (and stored in failed operations)."""

    def __init__(self, status: str, message: str, details: list[dict] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details or []

    @property
    def http_code(self) -> int:
        return _CODES[self.status][1]

    @property
    def rpc_code(self) -> int:
        return _CODES[self.status][0]

    def body(self) -> bytes:
        error = {"code": self.http_code, "message": self.message, "status": self.status}
        if self.details:
            error["details"] = self.details
        return json.dumps({"error": error}).encode()
