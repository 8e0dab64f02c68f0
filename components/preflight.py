"""The preflight step: config -> plan -> quota and region -> Hub access; fails before anything costs money."""

from collections.abc import Mapping
from typing import NamedTuple

from kfp import dsl

from vlp.components import clients
from vlp.components.config import DeploymentConfig, regional_bucket
from vlp.components.deployment import Deployment, run_account
from vlp.components.deployment import build as build_deployment
from vlp.components.planning.catalog import ACCELERATORS, MACHINE_TYPES
from vlp.components.planning.model_facts import ModelAccessError, read_model_facts
from vlp.components.planning.plan import Plan, plan_for_facts, plan_model
from vlp.components.runtime import label_value

__all__ = ["PreflightError", "plan_deployment", "plan_model", "run_preflight", "label_value", "preflight_op"]


class PreflightError(RuntimeError):
    """The deployment cannot go ahead; the message lists every problem and its fix. `.plan` holds the plan."""

    def __init__(self, message: str, plan: Plan | None = None) -> None:
        super().__init__(message)
        self.plan = plan


def _candidate_regions(cfg: DeploymentConfig, regions: list[str] | None) -> list[str]:
    out: list[str] = []
    for r in list(regions or []) + list(cfg.placement.regions):
        if r and r not in out:
            out.append(r)
    return out


_MULTI_REGIONS = {"US": "us-", "EU": "europe-", "ASIA": "asia-"}


def _location_of(bucket: str, project: str) -> str | None:
    """A bucket's location (upper case, as GCS answers it), None when it does not exist."""
    try:
        found = clients.storage_client(project).lookup_bucket(bucket)
    except Exception as exc:  # noqa: BLE001 - the region guard must not be skipped in silence
        raise PreflightError(
            f"cannot read bucket gs://{bucket} ({str(exc)[:300]}): the run needs its region. Grant the pipeline's "
            f"service account roles/storage.bucketViewer on it (gcloud storage buckets add-iam-policy-binding "
            f"gs://{bucket} --member serviceAccount:ACCOUNT --role roles/storage.bucketViewer), or run `vlp setup`"
        ) from None
    return (getattr(found, "location", "") or "").upper() if found is not None else None


def _serves(location: str, region: str) -> bool:
    prefix = _MULTI_REGIONS.get(location)
    return region.startswith(prefix) if prefix else region.upper() == location


def buckets_by_region(regions: list[str], bucket: str, project: str) -> dict[str, str]:
    """The candidate regions a weights bucket can serve, each with its bucket: Vertex wants a model's artifacts in a
    bucket in the endpoint's region (import-model doc; enforcement unverified, so the quota fallback never leaves
    it). A region the bucket is not in is served by its regional bucket (config.regional_bucket, made by `vlp setup`)
    where that exists there; a region with neither is not a candidate."""
    if not bucket:
        return {r: "" for r in regions}
    location = _location_of(bucket, project)
    if not location:
        return {r: bucket for r in regions}
    kept: dict[str, str] = {}
    for region in regions:
        if _serves(location, region):
            kept[region] = bucket
            continue
        try:
            other = regional_bucket(bucket, region)
        except ValueError:
            continue  # a name too long to be a bucket: setup could not have made it
        if _location_of(other, project) == region.upper():
            kept[region] = other
    if not kept:
        raise PreflightError(
            f"bucket gs://{bucket} is in {location}, and Vertex AI serves a model's artifacts from a bucket in the "
            f"endpoint's region; none of the candidate regions {regions} is there: use a bucket in "
            f"{regions[0]} (gcloud storage buckets create gs://NAME --location={regions[0]}), add "
            f"{location.lower()} to placement.regions, or run `vlp setup`, which makes gs://{bucket}-REGION for each "
            "region of placement.regions"
        )
    return kept


def plan_deployment(
    cfg: DeploymentConfig,
    *,
    project: str = "",
    regions: list[str] | None = None,
    api_endpoint: str = "",
    hf_token: str | None = None,
    check_quota: bool = True,
    hub_endpoint: str = "",
    prices: Mapping[str, float] | None = None,
    bucket: str = "",
    model_dir: str = "",
    buckets: dict[str, str] | None = None,
) -> Plan:
    """Plan a deployment config: model facts from the Hub (or a local dir), the shape, and quota per region.

    Problems land in `plan.errors` (never raised here): gated repo without access, no chat template while
    serving.chat_template is empty, a shape that does not fit, no quota in any candidate region. The one
    exception: a weights bucket in none of the candidate regions raises PreflightError.
    """
    cloud_run = cfg.target == "cloud_run"
    regions = _candidate_regions(cfg, regions)
    if not cloud_run:  # a Cloud Run service reads its weights from any bucket (the copy is the DLC's)
        # `buckets`: the caller's own buckets_by_region of these regions, so the buckets are looked up once.
        regions = list(buckets if buckets is not None else buckets_by_region(regions, bucket, project))
    try:
        # model_dir: a local copy of the repo (`vlp plan` offline, from the local Hub mirror).
        facts = read_model_facts(
            model_dir or cfg.model.repo, revision=cfg.model.revision, endpoint=hub_endpoint, token=hf_token
        )
        if model_dir:
            facts.repo = cfg.model.repo
    except ModelAccessError as exc:
        return Plan(
            model=cfg.model.repo,
            revision=cfg.model.revision,
            engine=cfg.serving.engine,
            access="denied",
            gated="gated" in str(exc),
            regions=regions,
            errors=[str(exc)],
        )
    if cloud_run:
        from vlp.components.cloud_run.plan import adapt_plan
        from vlp.components.config import Hardware
        from vlp.components.planning.catalog import RUN_GPUS

        # One GPU of the instance's type: the same memory and throughput model as on Vertex, then Cloud Run's shape.
        one_gpu = Hardware(accelerator_type=RUN_GPUS[cfg.cloud_run.gpu_type].accelerator, accelerator_count=1)
        plan = plan_for_facts(facts, cfg.serving, one_gpu, prices=prices, workload=cfg.workload, target="cloud_run")
        plan.regions = list(regions)
        if plan.fits:
            adapt_plan(plan, cfg)
    else:
        plan = plan_for_facts(
            facts,
            cfg.serving,
            cfg.hardware,
            regions=regions,
            prices=prices,
            workload=cfg.workload,
            dedicated=cfg.endpoint.dedicated,
        )
    if not facts.has_chat_template and not cfg.serving.chat_template:
        plan.warnings = [w for w in plan.warnings if "has no chat template" not in w]
        plan.errors.append(
            f"{cfg.model.repo} has no chat template: set serving.chat_template (a Jinja template, e.g. the "
            "base model's) so /v1/chat/completions and the smoke test can format prompts"
        )
    if plan.fits and check_quota and cloud_run:
        from vlp.components.cloud_run.quota import check_quota as check_cloud_run_quota

        check_cloud_run_quota(plan, cfg, project, regions, api_endpoint)
    elif plan.fits and check_quota:
        _check_quota(plan, cfg, project, regions, api_endpoint)
    elif regions:
        plan.region = (plan.regions or regions)[0]
    plan.fits = plan.fits and not plan.errors
    return plan


def _check_quota(plan: Plan, cfg: DeploymentConfig, project: str, regions: list[str], api_endpoint: str) -> None:
    from vlp.components.vertex.quota import QuotaError, choose_region, quota_needs

    if not project:
        plan.errors.append("no project to check quota in: pass --project or set placement.project")
        return
    machine = MACHINE_TYPES.get(plan.machine_type)
    vcpus = machine.vcpus * plan.node_count if machine else 0
    replicas = max(cfg.hardware.replica_count, cfg.hardware.max_replica_count or 0)
    try:
        needs = quota_needs(
            plan.accelerator_type, plan.accelerator_count * plan.node_count, vcpus, replicas, spot=cfg.hardware.spot
        )
    except QuotaError as exc:
        plan.errors.append(str(exc))
        return
    acc = ACCELERATORS.get(plan.accelerator_type)
    region, results, message = choose_region(
        project,
        regions,
        needs,
        plan.accelerator_type,
        spot=cfg.hardware.spot,
        machine_vcpus={m.name: m.vcpus for m in MACHINE_TYPES.values()},
        offered_in=list(acc.regions) if acc else None,
        api_endpoint=api_endpoint,
    )
    plan.quota = {r: q.to_dict() for r, q in results.items()}
    plan.quota_checked = True
    if region:
        plan.region = region
        checks = [results[region].gpu, *results[region].companions]
        for c in checks:
            if c.ok is None and c.limit is not None:
                plan.warnings.append(
                    f"{c.quota_id} in {region}: limit {c.limit}, in use {c.usage}, need {c.need}: unverified whether "
                    "GPU machine types draw on it (Google's Model Garden check reads only the GPU quota); if the "
                    "deploy fails on CPU quota, request more of it"
                )
        unread = [c for c in checks if c.ok is None and c.limit is None]
        if unread:
            notes = "; ".join(c.note for c in unread if c.note)
            plan.warnings.append(f"quota in {region} could not be read ({notes}): going ahead without the check")
        skipped = [r for r in regions[: regions.index(region)]]
        if skipped:
            plan.warnings.append(f"no quota in {', '.join(skipped)}: using {region}, the next candidate region")
    else:
        plan.errors.append(message)


def _read_hf_token(cfg: DeploymentConfig, project: str, api_endpoint: str) -> str | None:
    secret = cfg.model.hf_token_secret
    if not secret:
        return None
    from google.api_core import exceptions as gexc

    try:
        return clients.read_secret(project, secret, api_endpoint)
    except gexc.NotFound:
        raise PreflightError(
            f"Secret Manager secret {secret!r} (model.hf_token_secret) does not exist in project {project} or has no "
            f'enabled version: create it with `printf %s "$HF_TOKEN" | gcloud secrets create {secret.split("/")[-1]} '
            f"--data-file=- --project={project}`, or correct model.hf_token_secret"
        ) from None
    except gexc.Forbidden:  # REST answers Forbidden; gRPC PermissionDenied, a subclass
        raise PreflightError(
            f"cannot read Secret Manager secret {secret!r} (model.hf_token_secret): grant the pipeline's service "
            "account roles/secretmanager.secretAccessor on it"
        ) from None


def _revision_sha(plan: Plan) -> str:
    return plan.revision_sha if plan.source == "hub" else ""


def run_preflight(
    cfg: DeploymentConfig,
    *,
    project: str,
    region: str = "",
    bucket: str = "",
    service_account: str = "",
    run_name: str = "",
    api_endpoint: str = "",
    hf_token: str | None = None,
    hub_endpoint: str = "",
    prices: Mapping[str, float] | None = None,
    check_quota: bool = True,
    check_grants: bool = True,
) -> Deployment:
    """Plan, check quota and access, and return the deployment every later step takes (as its to_dict() struct).

    Raises PreflightError listing every error (with `.plan` set when a plan was made).
    """
    project = project or cfg.placement.project
    if not project:
        raise PreflightError("no project: pass project (the pipeline's run-time parameter) or set placement.project")
    regions = _candidate_regions(cfg, [region] if region else None)
    bucket = (bucket or cfg.placement.bucket).removeprefix("gs://").rstrip("/")
    if check_grants:
        # Every grant the policy gives the pipeline's account, before the Hub, the mirror or a GPU is touched.
        from vlp.components.iam.access import check_access

        problems = check_access(cfg, project=project, bucket=bucket, api_endpoint=api_endpoint)
        if problems:
            head = f"preflight failed for deployment {cfg.name}: the pipeline's service account lacks grants it needs:"
            raise PreflightError("\n".join([head] + [f"- {p}" for p in problems]))
    token = hf_token if hf_token is not None else _read_hf_token(cfg, project, api_endpoint)
    # Each candidate region's weights bucket (the bucket, or the region's own): the fallback stays where one is.
    buckets = buckets_by_region(regions, bucket, project) if cfg.target != "cloud_run" else None
    plan = plan_deployment(
        cfg,
        project=project,
        regions=regions,
        api_endpoint=api_endpoint,
        hf_token=token,
        check_quota=check_quota,
        hub_endpoint=hub_endpoint,
        prices=prices,
        bucket=bucket,
        buckets=buckets,
    )
    if plan.errors or not plan.fits:
        errors = plan.errors or [f"{cfg.model.repo} does not fit the planned shape"]
        head = f"preflight failed for deployment {cfg.name} ({cfg.model.repo}):"
        raise PreflightError("\n".join([head] + [f"- {e}" for e in errors]), plan)
    if buckets and bucket:
        bucket = buckets.get(plan.region, bucket)  # where the chosen region's endpoint reads the weights
    deployment = build_deployment(
        cfg,
        project=project,
        region=plan.region,
        bucket=bucket,
        # Who the model server (or revision) will run as, decided once: every later step, and the no-op check's spec
        # hash, see the same account (the pipeline's own unless the run or the config names one).
        service_account=run_account(service_account, cfg) or clients.own_account(api_endpoint),
        run_name=run_name,
        plan=plan.to_dict(),
        revision_sha=_revision_sha(plan),
        api_endpoint=api_endpoint,
    )
    _render_or_fail(deployment)
    return deployment


def _render_or_fail(deployment: Deployment) -> None:
    """Build the requests deploy will send (upload and deploy, or the Cloud Run service) now: a setting the serving
    presets cannot turn into a container fails here, before the weights are mirrored, not at register."""
    from vlp.components.serving.engines import ServingSpecError

    cfg = deployment.config
    uri = f"gs://{deployment.bucket or 'BUCKET'}/models/{cfg.model.repo}/{deployment.revision_sha or 'SHA'}/"
    try:
        if cfg.target == "cloud_run":
            from vlp.components.cloud_run.service_spec import service_request

            service_request(deployment, uri)
        else:
            from vlp.components.vertex.serving_spec import deploy_model_request, upload_model_request

            upload_model_request(deployment, uri, deployment.revision_sha or "SHA")
            deploy_model_request(deployment, f"projects/{deployment.project}/locations/REGION/models/{cfg.name}")
    except ServingSpecError as exc:
        raise PreflightError(f"preflight failed for deployment {cfg.name} ({cfg.model.repo}):\n- {exc}") from None


def mirror_broken(deployment: Deployment) -> str:
    """Why the deployment's mirrored weights can no longer be trusted (an object gone or changed), or "" (also when
    there is nothing to check: no pinned revision, or a bucket preflight could not read)."""
    from vlp.components.mirror.manifest import weights_intact

    cfg = deployment.config
    if not deployment.revision_sha or not deployment.bucket:
        return ""
    try:
        return weights_intact(cfg.model.repo, deployment.revision_sha, deployment.bucket, project=deployment.project)
    except Exception as exc:  # noqa: BLE001 - unreadable here: the no-op probe decides as before
        import logging

        logging.getLogger("vlp.preflight").info("could not list the mirrored weights (%s): not checked", exc)
        return ""


def preflight_op(
    project: str,
    region: str,
    bucket: str,
    service_account: str,
    config: dict,
    preset: dict,
    model_repo: str,
    model_revision: str,
    hf_token_secret: str,
    engine: str,
    target: str,
    hardware: str,
    max_model_len: int,
    deployment_name: str,
    endpoint_name: str,
    endpoint_kind: str,
    regions: str,
    teardown: str,
    smoke_prompt: str,
    smoke_expect: str,
    run_name: str,
    api_endpoint: str,
    force: bool,
    report: dsl.Output[dsl.Markdown],
    metrics: dsl.Output[dsl.Metrics],
) -> NamedTuple(
    "PreflightOutputs",
    [
        ("deployment", dict),
        ("region", str),
        ("action", str),
        ("mirror_on", str),
        ("target", str),
        ("service_account", str),
        ("labels", dict),
    ],
):  # noqa: F821, UP014
    """Preflight: plan the hardware, check quota and Hub access, and fail before anything costs money."""
    from collections import namedtuple

    from vlp.components.config import config_from_dict
    from vlp.components.planning.report import render_markdown
    from vlp.components.preflight import PreflightError, mirror_broken, run_preflight
    from vlp.components.run_form import FIELD_NAMES, resolve_config
    from vlp.components.runtime import checkpoint, setup_logging, without_nulls
    from vlp.components.vertex.unchanged import unchanged_deployment

    log = setup_logging()
    params = locals()
    form = {name: params[name] for name in FIELD_NAMES}
    cfg = config_from_dict(resolve_config(preset, form, config), source="the run form and config parameter")
    args = dict(
        project=project,
        region=region,
        bucket=bucket,
        service_account=service_account,
        run_name=run_name,
        api_endpoint=api_endpoint,
    )
    # "noop" skips every later step: same revision, same serving spec, healthy endpoint. It is decided
    # before the quota check, since a deployment that stays as it is needs no more quota.
    action = "deploy"
    deployment = None
    if not force:
        try:
            candidate = run_preflight(cfg, check_quota=False, check_grants=False, **args)
        except PreflightError:
            candidate = None  # the full preflight below reports it
        broken = mirror_broken(candidate) if candidate else ""
        if broken:
            # Checked first, by one listing: the serving model may still answer from its copy, or answer 503 after a
            # restart that could not load them; either way only a new mirror and deploy put it right.
            # (Also a first run: nothing is mirrored yet, so nothing can be unchanged.)
            log.info("no complete mirror of this revision in the bucket (%s): mirroring it, then deploying", broken)
            unchanged = None
        elif candidate and cfg.target == "cloud_run":
            from vlp.components.cloud_run.probe import unchanged_service

            unchanged = unchanged_service(candidate)
        else:
            unchanged = unchanged_deployment(candidate) if candidate else None
        if unchanged:
            log.info("nothing changed: %s; pass force to redeploy anyway", unchanged)
            action, deployment = "noop", candidate
            if cfg.smoke_test.benchmark:
                # Asked for a benchmark: measure the deployment as it serves rather than redeploy it to measure.
                log.info("smoke_test.benchmark is set: benchmarking the deployment as it serves")
                action = "benchmark"
    if deployment is None:
        try:
            deployment = run_preflight(cfg, **args)
        except PreflightError as exc:
            if exc.plan is not None:
                with open(report.path, "w") as fh:
                    fh.write(render_markdown(exc.plan))
            raise
    plan = deployment.plan
    with open(report.path, "w") as fh:
        fh.write(render_markdown(plan))
    for key, value in (
        ("weights_gb", plan["weights_gb"]),
        ("params_b", round(plan["params"] / 1e9, 3)),
        ("price_per_hour_usd", plan["price_per_hour_usd"]),
        ("accelerator_count", plan["accelerator_count"]),
        ("node_count", plan["node_count"]),
        ("max_model_len", plan["max_model_len"]),
        ("max_num_seqs", plan["max_num_seqs"]),
        ("kv_cache_tokens", plan["limits"].get("kv_cache_tokens", 0)),
        ("concurrent_sequences", plan["limits"].get("concurrent_sequences", 0)),
    ):
        metrics.log_metric(key, value)
    # Where the mirror runs: small models on the pipeline step itself, big ones as a custom job on a
    # machine with more network (the step's e2-standard-4 egress caps at ~8 Gbps).
    from vlp.components.planning.catalog import mirror_machine_for

    machine = mirror_machine_for(int(plan.get("weights_bytes") or 0), cfg.model.mirror_job_above_gb)["machine_type"]
    mirror_on = "step" if machine == "e2-standard-4" else machine
    if mirror_on != "step" and cfg.model.hf_token_secret and not deployment.service_account:
        # A GCPC custom job without service_account runs as the Vertex AI Custom Code Service Agent, which cannot
        # read Secret Manager (kubeflow/pipelines components/google-cloud v1/custom_job/utils.py).
        raise PreflightError(
            f"{cfg.model.repo} ({plan['weights_gb']} GB) is mirrored by a Vertex custom job on {machine}, which needs "
            f"a named service account to read the Hub token secret {cfg.model.hf_token_secret!r}: set "
            "placement.service_account (or the service_account parameter) to an account with "
            "roles/secretmanager.secretAccessor and roles/storage.objectUser on the bucket, and give the "
            "pipeline's service account roles/iam.serviceAccountUser on it (docs/iam.md)"
        )
    checkpoint("preflight")
    outputs = namedtuple(
        "PreflightOutputs", ["deployment", "region", "action", "mirror_on", "target", "service_account", "labels"]
    )
    # service_account: who the steps after this one name as the run's account (a big model's mirror custom job runs
    # as it), decided here once: the run's, the config's, else this step's own. labels: the run's (vlp-deployment,
    # vlp-run), for the mirror's custom job, which the exit handler finds by them.
    return outputs(
        without_nulls(deployment.to_dict()),
        deployment.region,
        action,
        mirror_on,
        cfg.target,
        deployment.service_account,
        dict(deployment.labels),
    )
