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


def forked_child(argv: list[str]) -> None:
    """A fork server's child for tests/test_forkserver.py; `argv[0]` says what it does."""
    import atexit
    import signal
    import threading
    import time

    what = argv[0]
    atexit.register(lambda: print("atexit ran", flush=True))
    if what == "ok":
        print(f"env CHILD={os.environ.get('CHILD')} SERVER_ONLY={os.environ.get('SERVER_ONLY')}")
        print(f"cwd {os.getcwd()}")
        print(f"own session {os.getsid(0) == os.getpid()}")
        threading.Thread(target=lambda: (time.sleep(0.3), print("thread done", flush=True))).start()
    elif what == "exit":
        raise SystemExit(int(argv[1]))
    elif what == "raise":
        raise ValueError("broken on purpose")
    elif what == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif what == "sleep":
        time.sleep(60)
    elif what == "metadata":
        from google.auth.compute_engine import _metadata

        print(f"metadata root {_metadata._get_metadata_root(False)}")
