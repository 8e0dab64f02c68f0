"""A custom job's replica on the local stack: runs the job's container command in a process group of its own and ends
that group when the emulator that started it is gone, even by SIGKILL (where its atexit never runs), or when asked
to stop (SIGTERM, as Vertex stops a cancelled job's containers). Kept apart from custom_jobs.py so that a replica's
start imports nothing of the emulator.

    python -m vlp.pipelines.local.emulator.job_process OWNER_PID -- COMMAND...
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading


def main(argv: list[str]) -> int:
    owner, command = int(argv[0]), argv[argv.index("--") + 1 :]
    process = subprocess.Popen(command)  # same process group: this one's, which the emulator started as a session

    def watch() -> None:
        # A pidfd becomes readable when the owner ends, and names that process only (no pid reuse).
        try:
            handle = os.pidfd_open(owner)
            select.select([handle], [], [])
        except ProcessLookupError:
            pass
        os.killpg(0, signal.SIGKILL)  # this process too: the job ends with the emulator

    # A cancel reaches the whole group (custom_jobs.py); this process only waits for the command's exit status.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=watch, daemon=True).start()
    return process.wait()


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.exit(code if code >= 0 else 128 - code)
