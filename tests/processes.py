"""Which processes a test left behind: shared by the tests that stop a stack or a run and check nothing is left."""

from __future__ import annotations

import os
from pathlib import Path


def processes_naming(state_dir: Path) -> list[str]:
    """Live processes (zombies aside) whose command line or environment names `state_dir`: a stack's peers, its model
    servers, a run's steps. This process is not counted."""
    mine, found = str(os.getpid()), []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or proc.name == mine:
            continue
        try:
            seen = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
            zombie = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        except (OSError, IndexError):
            continue
        if str(state_dir).encode() in seen and not zombie:
            found.append(f"{proc.name}: {(proc / 'cmdline').read_bytes()[:200]!r}")
    return found
