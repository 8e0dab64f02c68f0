"""Run the Vertex AI emulator in the foreground: prints `READY <url>` once listening, stops on SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from vlp.pipelines.local.emulator.plumbing import GRPC_ENV
from vlp.pipelines.local.emulator.server import create_emulator


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, serve until a signal arrives, then stop the model servers too."""
    parser = argparse.ArgumentParser(prog="python -m vlp.pipelines.local.emulator", description=__doc__)
    parser.add_argument("--state-dir", required=True, type=Path, help="where resources persist between runs")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--storage-endpoint", default=None, help="GCS emulator URL the serving copies weights from")
    parser.add_argument("--hub-upstream", default=None, help="Hugging Face Hub (or mirror) URL the gate proxies")
    parser.add_argument("--fault", action="append", default=[], help="inject a named fault; repeatable")
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument(
        "--grpc",
        action="store_true",
        default=os.environ.get(GRPC_ENV) == "1",
        help=f"serve gRPC (TLS) beside REST; also ${GRPC_ENV}=1, which `vlp local up` sets",
    )
    args = parser.parse_args(argv)
    # Logs go to stderr: stdout carries only the READY line a parent process waits for.
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)

    emu = create_emulator(
        args.state_dir,
        host=args.host,
        port=args.port,
        storage_endpoint=args.storage_endpoint,
        hub_upstream=args.hub_upstream,
        faults=args.fault,
        grpc=args.grpc,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    emu.start()
    print(f"READY {emu.url}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        emu.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
