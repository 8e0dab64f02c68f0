"""Local runs: each step process writes its own record (started, ended, status, error, exit code), and the run
summary reads those instead of parsing kfp.local's log text.

The step side is installed by the same sitecustomize as the import guard (pipelines/local/import_guard.py),
so the components know nothing of it: a record is STATE/records/RUN_KEY/STEP.json, opened when the step's
interpreter starts, closed at exit with `succeeded`, or with `failed` and the exception's message when one
escaped the step. A step killed by a signal writes no end; the runner's wrapper around kfp.local's
subprocess call (pipelines/local/kfp_fixes.py) adds the exit code it saw.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

ENV_DIR = "VLP_STEP_RECORDS"


def write(path: Path, record: dict[str, Any]) -> None:
    """Write a step record atomically (a reader never sees half of one)."""
    staged = path.with_suffix(f".{os.getpid()}.tmp")
    staged.write_text(json.dumps(record))
    staged.replace(path)


def op_of(argv: list[str]) -> str | None:
    """The step's KFP function name from a step process's command line; for GCPC's custom-job launcher (the big-model
    mirror, pipelines/local/gcpc_launcher.py), the function its job runs, from the job's command in --payload."""
    if "--function_to_execute" in argv and argv.index("--function_to_execute") + 1 < len(argv):
        return argv[argv.index("--function_to_execute") + 1]
    if "--payload" in argv and argv.index("--payload") + 1 < len(argv):
        found = re.search(r'\\?"--function_to_execute\\?",\s*\\?"(\w+)', argv[argv.index("--payload") + 1])
        return found.group(1) if found else None
    return None


def record_path(directory: str | Path, op: str) -> Path:
    return Path(directory) / f"{op}.json"


def install(step: str, argv: list[str] | None = None) -> None:
    """In a step's process (from sitecustomize): open the record and close it at exit."""
    directory = os.environ.get(ENV_DIR)
    op = op_of(list(sys.argv if argv is None else argv))
    if not directory or not op:
        return
    path = record_path(directory, op)
    record: dict[str, Any] = {"name": step, "op": op, "started": time.time(), "status": "running"}
    write(path, record)
    previous = sys.excepthook

    def failed(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
        record.update(status="failed", error=str(exc).strip() or kind.__name__)
        previous(kind, exc, tb)

    def ended() -> None:
        if record["status"] == "running":
            record["status"] = "succeeded"
        record["ended"] = time.time()
        write(path, record)

    sys.excepthook = failed
    atexit.register(ended)


def add_exit_code(directory: str | Path, full_command: list[str], code: int) -> None:
    """From the runner's side: the exit code kfp.local saw for a step that did not exit 0."""
    op = op_of(full_command)
    if not op or not directory:
        return
    path = record_path(directory, op)
    record = json.loads(path.read_text()) if path.is_file() else {"op": op, "status": "failed"}
    record["exit_code"] = code
    if record.get("status") in ("running", "succeeded"):
        record["status"] = "failed"
    write(path, record)


def read_records(directory: str | Path) -> list[dict[str, Any]]:
    """Every step record of one run, in the order the steps started."""
    records = [json.loads(p.read_text()) for p in Path(directory).glob("*.json")]
    return sorted(records, key=lambda r: r.get("started", float("inf")))
