"""The stack's own key for its plumbing routes (`/_emulator/*`: mint a token, grant a role, set quotas, seed a
secret, inject faults, read the whole state).

Those routes exist for the runner, `vlp local` and the tests; on a shared machine any local user could otherwise
reach the loopback port and mint a token for any principal or grant themselves roles/owner. The key is made once per
emulator state dir, kept 0600 beside its state, and sent as a header by whoever can read that file (the user who
owns the stack). Google APIs on the same port keep their own checks (OAuth tokens and IAM, iam.py).
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

KEY_FILE = "plumbing.key"
# Set to 1 in a stack's environment (`vlp local up` does): its emulator serves gRPC beside REST (grpc_bridge.py).
GRPC_ENV = "VLP_STACK_GRPC"
HEADER = "X-Vlp-Stack-Key"


def key_path(emulator_state_dir: Path) -> Path:
    return Path(emulator_state_dir) / KEY_FILE


def ensure_key(emulator_state_dir: Path) -> str:
    """The state dir's key, made on first use: 0600 from its creation, never world- or group-readable."""
    path = key_path(emulator_state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_key(emulator_state_dir)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(secrets.token_urlsafe(32))
    return read_key(emulator_state_dir)


def read_key(emulator_state_dir: Path) -> str:
    """The key of a running stack's emulator (its state dir is STATE/emulator for a `vlp` stack)."""
    return key_path(emulator_state_dir).read_text(encoding="utf-8").strip()


def headers(emulator_state_dir: Path) -> dict[str, str]:
    """The header that opens the plumbing routes of the emulator on `emulator_state_dir`."""
    return {HEADER: read_key(emulator_state_dir)}


def allowed(key: str, presented: str | None) -> bool:
    return bool(presented) and hmac.compare_digest(key.encode(), (presented or "").encode())
