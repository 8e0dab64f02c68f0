"""The lifecycle commands of `vlp`: setup, schedule (create/list/pause/resume/delete), publish, teardown and gc."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from vlp.components.config import ConfigError, load_config
from vlp.pipelines.cli_options import (
    EXIT_FAILED,
    EXIT_OK,
    add_config_args,
    add_dry_run,
    add_json,
    add_placement_args,
    add_where_args,
)
from vlp.pipelines.presets import config_path


class UsageError(ConfigError):
    """Wrong arguments; a ConfigError so the CLI prints it without a traceback and exits 2."""


def _explain_google_errors(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A refused Google call ends the command with its message plus, on a 403, the role that fixes it."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        from google.api_core import exceptions

        from vlp.pipelines.submit import permission_hint

        try:
            return handler(args)
        except exceptions.GoogleAPICallError as exc:
            # Over REST a 403 arrives as Forbidden, over gRPC as PermissionDenied (what permission_hint reads).
            refused = exceptions.PermissionDenied(exc.message) if isinstance(exc, exceptions.Forbidden) else exc
            raise RuntimeError(f"{exc}. {permission_hint(refused)}".strip()) from None

    return run


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the lifecycle commands on the `vlp` parser."""
    p = sub.add_parser(
        "setup", help="enable the APIs, create the bucket and accounts, grant exactly the policy (docs/iam.md)"
    )
    add_config_args(p, config_required=False)
    add_placement_args(p)
    p.add_argument("--target", choices=["vertex", "cloud_run"], default="", help="overrides the config's target")
    p.add_argument("--submitter", default="", help="email of who starts runs (gets its roles too)")
    p.add_argument("--templates", action="store_true", help="runs start from a published template tag")
    p.add_argument("--repository", default="vlp-templates", help="the KFP template repository (with --templates)")
    p.add_argument("--dry-run", action="store_true", help="print the equivalent gcloud commands; change nothing")

    p = sub.add_parser("schedule", help="redeploy a config on a cron with Vertex AI pipeline schedules")
    ssub = p.add_subparsers(dest="schedule_command", metavar="ACTION")
    ssub.required = True
    c = ssub.add_parser("create", help="schedule a config's pipeline (one run at a time)")
    add_config_args(c)
    add_placement_args(c)
    c.add_argument("--cron", required=True, help="five cron fields, e.g. '0 3 * * 1' (Mondays 03:00)")
    c.add_argument("--time-zone", default="UTC", help="IANA zone the cron and naive --start/--end use (default UTC)")
    c.add_argument("--start", default="", help="first possible run, ISO 8601 (default: now)")
    c.add_argument("--end", default="", help="no runs after this time, ISO 8601 (default: never)")
    c.add_argument("--max-runs", type=int, default=0, help="stop after this many runs (default: no limit)")
    c.add_argument("--template", type=Path, default=None, help="compiled spec to schedule (default compiled/)")
    c.add_argument(
        "--template-uri",
        default="",
        help="a published template instead (https://REGION-kfp.pkg.dev/PROJECT/REPO/vlp-deploy-llm/latest): "
        "each run then takes what `vlp publish` last tagged",
    )
    add_json(c, "the created schedule")
    ls = ssub.add_parser("list", help="list the vlp schedules in a region")
    add_where_args(ls)
    ls.add_argument("--all", action="store_true", help="also schedules not made by vlp")
    add_json(ls, "the schedules")
    for action, text in (
        ("pause", "pause a schedule (no new runs)"),
        ("resume", "resume a paused schedule"),
        ("delete", "delete a schedule (its past runs are kept)"),
        ("get", "show one schedule"),
    ):
        a = ssub.add_parser(action, help=text)
        a.add_argument("schedule", help="resource name, numeric id, or display name (vlp-NAME or NAME)")
        add_where_args(a)

    p = sub.add_parser("publish", help="upload compiled/*.yaml to an Artifact Registry KFP repository (console runs)")
    p.add_argument("files", nargs="*", type=Path, help="compiled specs (default: compiled/*.yaml)")
    p.add_argument("--project", default="", help="project of the repository")
    p.add_argument("--region", default="", help="region of the repository, e.g. us-central1")
    p.add_argument("--repository", default="", help="Artifact Registry repository (format kfp)")
    p.add_argument("--host", default="", help="registry host instead of the three above")
    p.add_argument("--tag", action="append", default=[], help="version tag (default: the package version); repeatable")
    p.add_argument("--no-latest", action="store_true", help="do not move the `latest` tag")

    p = sub.add_parser("teardown", help="remove everything a deployment's runs created (undeploy, delete)")
    add_config_args(p)
    add_placement_args(p)
    add_dry_run(p)
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    p = sub.add_parser("gc", help="remove labelled leftovers of old runs that serve no traffic")
    p.add_argument("--older-than", required=True, help="age, e.g. 24h, 7d, 90m")
    p.add_argument("--project", required=True)
    p.add_argument("--region", action="append", default=[], required=True, help="region to sweep; repeatable")
    p.add_argument("--deployment", default="", help="only this vlp-deployment label")
    add_dry_run(p)


def cmd_schedule(args: argparse.Namespace) -> int:
    from vlp.pipelines import schedules

    api = args.api_endpoint
    action = args.schedule_command
    if action == "create":
        cfg = load_config(config_path(args.config), args.overrides)
        zone = args.time_zone
        info = schedules.create_schedule(
            cfg,
            cron=args.cron,
            project=args.project,
            region=args.region,
            bucket=args.bucket,
            service_account=args.service_account,
            time_zone=zone,
            start=schedules.parse_time(args.start, zone) if args.start else None,
            end=schedules.parse_time(args.end, zone) if args.end else None,
            max_run_count=args.max_runs,
            template_path=args.template,
            template_uri=args.template_uri,
            api_endpoint=api,
        )
        print(
            json.dumps(asdict(info), indent=2)
            if args.json
            else f"created {info.name} ({info.display_name}, {info.cron}, next run {info.next_run_time or 'unknown'})"
        )
        return EXIT_OK
    if action == "list":
        if not args.project or not args.region:
            raise UsageError("schedule list needs --project and --region")
        infos = schedules.list_schedules(args.project, args.region, api, only_vlp=not args.all)
        if args.json:
            print(json.dumps([asdict(i) for i in infos], indent=2))
        elif not infos:
            print(f"no {'' if args.all else 'vlp '}schedules in {args.project}/{args.region}")
        else:
            print(f"{'DISPLAY NAME':<32} {'STATE':<8} {'CRON':<32} {'NEXT RUN':<26} NAME")
            for i in infos:
                print(f"{i.display_name:<32} {i.state:<8} {i.cron:<32} {i.next_run_time:<26} {i.name}")
        return EXIT_OK
    fn = {
        "pause": schedules.pause_schedule,
        "resume": schedules.resume_schedule,
        "get": schedules.get_schedule,
    }.get(action)
    if fn is not None:
        info = fn(args.schedule, args.project, args.region, api)
        print(json.dumps(asdict(info), indent=2) if action == "get" else f"{info.name} is {info.state}")
        return EXIT_OK
    name = schedules.delete_schedule(args.schedule, args.project, args.region, api)
    print(f"deleted {name}")
    return EXIT_OK


def cmd_publish(args: argparse.Namespace) -> int:
    from vlp.pipelines import publish

    host = args.host or publish.registry_host(args.project, args.region, args.repository)
    tags = (args.tag or [publish.project_version()]) + ([] if args.no_latest else ["latest"])
    files = args.files or publish.template_files()
    for item in publish.publish_templates(host, files, tags):
        print(f"published {item.file} as {item.package} {item.version} tags {', '.join(item.tags)}")
        print(f"  template: {item.template_uri()}")
    return EXIT_OK


@_explain_google_errors
def cmd_teardown(args: argparse.Namespace) -> int:
    from vlp.pipelines import gc

    cfg = load_config(config_path(args.config), args.overrides)
    project = args.project or cfg.placement.project
    if not project:
        raise UsageError("no project: pass --project or set placement.project")
    regions = [args.region] if args.region else list(cfg.placement.regions)
    api = args.api_endpoint
    runs = gc.find_runs(project, regions, cfg.name, api)
    if not runs:
        print(f"nothing labelled vlp-deployment={cfg.name} in {project} ({', '.join(regions)})")
        _warn_schedule(cfg, project, regions, api)
        return EXIT_OK
    for run in runs:
        print(f"found {run.describe()}" + (" SERVING" if run.serving else ""))
    if args.dry_run:
        return EXIT_OK
    if not args.yes:
        if not sys.stdin.isatty():
            raise UsageError("teardown removes serving deployments: pass --yes to confirm (or --dry-run to look)")
        answer = input(f"type {cfg.name} to remove all of the above: ").strip()
        if answer != cfg.name:
            print("nothing removed")
            return EXIT_FAILED
    _, removed = gc.teardown_deployment(project, regions, cfg.name, api)
    for name in removed.undeployed:
        print(f"undeployed {name}")
    for name in removed.deleted:
        print(f"deleted {name}")
    left = gc.find_runs(project, regions, cfg.name, api)
    _warn_schedule(cfg, project, regions, api)
    if left:
        for run in left:
            print(f"still there: {run.describe()}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _warn_schedule(cfg: object, project: str, regions: list[str], api: str) -> None:
    """A schedule would bring the deployment back on its next run: say so (it is not removed unasked)."""
    from vlp.pipelines import schedules

    want = schedules.schedule_display_name(cfg)  # type: ignore[arg-type]
    for region in regions:
        try:
            found = [s for s in schedules.list_schedules(project, region, api) if s.display_name == want]
        except schedules.ScheduleError:
            return  # no permission to list schedules: teardown itself still did its job
        for s in found:
            print(f"note: schedule {s.name} ({s.state}) will redeploy it: `vlp schedule delete {s.name}`")


@_explain_google_errors
def cmd_gc(args: argparse.Namespace) -> int:
    from vlp.pipelines import gc

    age = gc.parse_age(args.older_than)
    report = gc.collect_garbage(
        args.project, args.region, age, dry_run=args.dry_run, deployment=args.deployment, api_endpoint=args.api_endpoint
    )
    verb = "would remove" if args.dry_run else "removing"
    for run in report.collected:
        print(f"{verb} {run.describe()}")
    for run, reason in report.kept:
        print(f"kept {run.describe()}: {reason}")
    for name in report.removed.undeployed:
        print(f"undeployed {name}")
    for name in report.removed.deleted:
        print(f"deleted {name}")
    if not report.collected:
        print(f"no leftovers older than {args.older_than} (cutoff {report.cutoff.isoformat(timespec='seconds')})")
    return EXIT_OK


@_explain_google_errors
def cmd_setup(args: argparse.Namespace) -> int:
    from vlp.pipelines.setup import apply, plan_setup, project_number

    cfg = load_config(config_path(args.config or "llama-3.1-8b-vllm-l4.yaml"), args.overrides)
    if args.target:
        cfg = cfg.model_copy(update={"target": args.target})
    if args.service_account:
        cfg.placement.service_account = args.service_account
    project = args.project or cfg.placement.project
    bucket = (args.bucket or cfg.placement.bucket).removeprefix("gs://").rstrip("/")
    if not project or not bucket:
        raise UsageError("vlp setup needs --project and --bucket (or placement.project / placement.bucket)")
    region = args.region or cfg.placement.regions[0]
    number = "PROJECT_NUMBER" if args.dry_run else project_number(project, api_endpoint=args.api_endpoint)
    plan = plan_setup(
        cfg,
        project=project,
        bucket=bucket,
        region=region,
        project_number=number,
        submitter=args.submitter,
        templates=args.templates,
        kfp_repository=f"projects/{project}/locations/{region}/repositories/{args.repository}",
    )
    if args.dry_run:
        print("\n".join(plan.gcloud()))
        return EXIT_OK
    changed = apply(plan, api_endpoint=args.api_endpoint)
    print(f"{project} is set up for {cfg.name}: {len(plan.bindings)} bindings, {len(changed)} changes")
    return EXIT_OK


COMMANDS = {
    "setup": cmd_setup,
    "schedule": cmd_schedule,
    "publish": cmd_publish,
    "teardown": cmd_teardown,
    "gc": cmd_gc,
}
