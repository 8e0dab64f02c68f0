"""Errors the emulator answers, in Google's JSON error shape and google.rpc.Code numbers."""

from __future__ import annotations

import json
from pathlib import Path

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


class DamagedStateError(RuntimeError):
    """A state file that cannot be read back; the message names it and the way out."""


def read_state_file(path: Path) -> dict:
    """A JSON state file of the local stack, or a message naming the file and `vlp local reset` when it is damaged
    (a disk that filled up, an editor, a kill in the middle of someone else's write)."""
    try:
        data = json.loads(Path(path).read_text())
    except ValueError as exc:
        raise DamagedStateError(
            f"the local stack's state file {path} is damaged ({exc}): `vlp local reset` starts from an empty state "
            "(what it records locally is lost: models, endpoints, mirrored weights), or restore the file"
        ) from None
    if not isinstance(data, dict):
        raise DamagedStateError(f"the local stack's state file {path} holds no JSON object: `vlp local reset`")
    return data
