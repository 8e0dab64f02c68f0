"""The options and exit codes every `vlp` command shares, defined once: a command added later takes them from here."""

from __future__ import annotations

import argparse

# Exit codes CI can trust.
EXIT_OK = 0
EXIT_FAILED = 1  # the run (or check) ran and failed
EXIT_USAGE = 2  # bad arguments or config: nothing was started


def add_config_args(p: argparse.ArgumentParser, config_required: bool = True) -> None:
    """CONFIG and --set: a deployment config and dotted overrides of its fields."""
    p.add_argument("config", nargs=None if config_required else "?", help="deployment config YAML (configs/*.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set serving.max_model_len=4096 (repeatable)",
    )


def add_placement_args(p: argparse.ArgumentParser) -> None:
    """Where a command acts: project, region, bucket, service account (each overrides the config's placement)."""
    p.add_argument("--project", default="", help="Google Cloud project id (overrides placement.project)")
    p.add_argument("--region", default="", help="region to try first (default: placement.regions in order)")
    p.add_argument("--bucket", default="", help="GCS bucket for weights and pipeline root (overrides placement.bucket)")
    p.add_argument("--service-account", default="", help="service account for the pipeline and the endpoint")


def add_where_args(p: argparse.ArgumentParser) -> None:
    """--project and --region for commands that name a resource (not needed with a full resource name)."""
    p.add_argument("--project", default="", help="Google Cloud project id (not needed with a resource name)")
    p.add_argument("--region", default="", help="region (not needed with a resource name)")


def add_dry_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")


def add_json(p: argparse.ArgumentParser, what: str = "the result") -> None:
    p.add_argument("--json", action="store_true", help=f"print {what} as JSON")
