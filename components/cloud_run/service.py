"""The Cloud Run service's life: deploy a revision behind the `candidate` tag, promote it or roll it back, spot a
redeploy that changes nothing, and remove what a run created (google-cloud-run, run_v2)."""

from __future__ import annotations

import concurrent.futures
import logging
import time
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from vlp.components.cloud_run.probe import _clients, get_service
from vlp.components.deployment import Deployment

log = logging.getLogger("vlp.cloud_run")

# A revision's operation ends when its instances pass the startup probe; the first deploy of an image also imports it
# (about 5 minutes for the TGI DLC, per the Hugging Face Cloud Run example), so the wait is the probe's window plus
# ten minutes.
IMAGE_IMPORT_S = 600


@dataclass
class DeployedRevision:
    service: str  # resource name
    revision: str  # revision id
    url: str  # the candidate tag's URL: the new revision alone
    service_url: str


def pinned(targets: Any) -> list[Any]:
    """Traffic as run_v2.TrafficTargets pinned to revisions (LATEST resolved), without the candidate tag: a revision
    that held it and still has a share (a canary a killed run left) keeps its share untagged, so the percents still
    add up to 100; other revisions' tags (set outside vlp) stay."""
    from google.cloud import run_v2

    from vlp.components.cloud_run.service_spec import CANDIDATE_TAG

    pin = run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION
    kept = []
    for t in targets:
        tag = "" if t.tag == CANDIDATE_TAG else t.tag
        if t.percent or tag:
            kept.append(run_v2.TrafficTarget(type_=pin, revision=t.revision, percent=t.percent, tag=tag))
    return kept


# Labels and annotations Cloud Run sets itself on a revision; a template may not carry them.
_SYSTEM_KEYS = ("run.googleapis.com/", "cloud.googleapis.com/", "serving.knative.dev/", "client.knative.dev/")
# The template fields a deployment config decides; every other field of a service's template (VPC access,
# annotations, timeout, encryption key, session affinity...) is kept as the service has it.
_OWNED_TEMPLATE_FIELDS = (
    "revision",
    "containers",
    "volumes",
    "scaling",
    "max_instance_request_concurrency",
    "node_selector",
    "gpu_zonal_redundancy_disabled",
    "service_account",
)


def template_of(revision: Any) -> Any:
    """The run_v2.RevisionTemplate that names `revision` again with its own configuration: what a service's template
    goes back to before its latest revision can be removed (Cloud Run refuses to delete the latest created revision;
    a template naming an existing revision with the same configuration creates nothing new)."""
    from google.cloud import run_v2
    from google.protobuf import json_format

    data = json_format.MessageToDict(run_v2.Revision.pb(revision), preserving_proto_field_name=True)
    fields = {f.name for f in run_v2.RevisionTemplate.pb().DESCRIPTOR.fields}
    kept = {k: v for k, v in data.items() if k in fields}
    for key in ("labels", "annotations"):
        kept[key] = {k: v for k, v in (kept.get(key) or {}).items() if not k.startswith(_SYSTEM_KEYS)}
    message = run_v2.RevisionTemplate.pb()()
    json_format.ParseDict(kept, message)
    template = run_v2.RevisionTemplate.wrap(message)
    template.revision = revision.name.rsplit("/", 1)[1]
    return template


def merged_service(current: Any, request: Any) -> Any:
    """The service as read (etag included) with what the deployment decides: its template's owned fields, the
    traffic, ingress and launch stage. Fields set outside vlp (custom audiences, Binary Authorization, IAP,
    annotations, the template's VPC access...) stay, and the etag makes a concurrent change refuse the write."""
    from google.cloud import run_v2

    merged = run_v2.Service.wrap(type(run_v2.Service.pb(current))())
    run_v2.Service.pb(merged).CopyFrom(run_v2.Service.pb(current))
    template = merged.template
    for field in _OWNED_TEMPLATE_FIELDS:
        setattr(template, field, getattr(request.template, field))
    template.labels = {**{k: v for k, v in current.template.labels.items()}, **dict(request.template.labels)}
    merged.template = template
    merged.traffic = list(request.traffic)
    merged.ingress = request.ingress
    if request.launch_stage:
        merged.launch_stage = request.launch_stage
    if not merged.description:
        merged.description = request.description
    return merged


def stale_etag(exc: Exception) -> bool:
    """Whether an update was refused because the service changed since it was read (ABORTED, AIP-154)."""
    response = getattr(exc, "response", None)
    try:
        return response is not None and response.json()["error"]["status"] == "ABORTED"
    except (ValueError, KeyError, TypeError, AttributeError):
        return False


def update_read_service(services: Any, name: str, change: Any, what: str, timeout_s: float, tries: int = 3) -> Any:
    """Read the service, `change(service)` it, and write it back with its etag, reading again when another writer
    got there first. Returns the finished operation's Service."""
    from google.api_core import exceptions

    for attempt in range(tries):
        current = services.get_service(name=name)
        try:
            return wait_for(services.update_service(service=change(current)), what, timeout_s)
        except exceptions.Conflict as exc:
            if not stale_etag(exc) or attempt == tries - 1:
                raise
            log.info("%s changed while being updated (etag): reading it again", name)
    raise AssertionError("unreachable")


def wait_for(operation: Any, what: str, timeout_s: float) -> Any:
    """An operation's result within a real deadline; a refusal or a timeout becomes a StepError saying which."""
    from vlp.components.runtime import StepError

    try:
        return operation.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        raise StepError(
            f"{what} did not finish within {timeout_s:.0f} s (operation {operation.operation.name}): the model may "
            "load slower than cloud_run.startup_timeout_s allows; read the revision's logs"
        ) from None


def deploy_revision(deployment: Deployment, weights_uri: str) -> DeployedRevision:
    """Create the service, or add a revision to it at 0% behind the `candidate` tag (blue/green), and wait for it."""
    from vlp.components.cloud_run.service_spec import CANDIDATE_TAG, service_name, service_request
    from vlp.components.runtime import StepError

    cfg = deployment.config
    services, _ = _clients(deployment)
    name = service_name(deployment)
    current = get_service(services, name)
    previous = pinned(current.traffic_statuses) if current is not None else []
    if not cfg.cloud_run.service_account:
        from vlp.components.deployment import serving_account

        # The revision runs as the pipeline's account unless the config names one (else the Compute Engine default).
        deployment = replace(deployment, service_account=serving_account(deployment))
    request = service_request(deployment, weights_uri, previous)
    deadline = cfg.cloud_run.startup_timeout_s + IMAGE_IMPORT_S
    what = f"revision {request.template.revision} of Cloud Run service {name}"
    log.info(
        "deploying %s (%s beside %s)",
        what,
        "0% behind the candidate tag" if previous else "first revision",
        ", ".join(f"{t.revision} {t.percent}%" for t in previous) or "nothing",
    )
    try:
        if current is None:
            parent, _, service_id = name.rpartition("/services/")
            operation = services.create_service(parent=parent, service=request, service_id=service_id)
            service = wait_for(operation, f"deploying {what}", deadline)
        else:
            # Read, modify, write with the etag: a maskless update replaces the whole service, so it starts from
            # the service as it is (the labels of the run that created it, and fields vlp does not own).
            def change(latest: Any) -> Any:
                request.traffic = [*pinned(latest.traffic_statuses), request.traffic[-1]]
                return merged_service(latest, request)

            service = update_read_service(services, name, change, f"deploying {what}", deadline)
    except StepError:
        raise
    except Exception as exc:
        from vlp.components.serving.logs import revision_failure_message

        raise StepError(
            revision_failure_message(
                deployment.project,
                cfg.service_id,
                request.template.revision,
                getattr(exc, "message", None) or str(exc),
                deployment.api_endpoint,
            )
        ) from None
    # No invoker grant here: the pipeline's account calls the service through its project role, roles/run.developer
    # (run.routes.invoke), which `vlp setup` grants once; granting itself per service needed setIamPolicy (run.admin).
    url = next((t.uri for t in service.traffic_statuses if t.tag == CANDIDATE_TAG), "")
    if not url:
        raise StepError(f"{what} has no URL for the {CANDIDATE_TAG} tag: traffic is {list(service.traffic_statuses)}")
    log.info("revision %s is ready at %s", request.template.revision, url)
    return DeployedRevision(name, request.template.revision, url, service.uri)


def move_traffic(deployment: Deployment, name: str, revision: str, pause_s: float | None = None) -> None:
    """Promote: the revision takes the config's canary steps (endpoint.traffic_steps) and then 100%; its tag goes."""
    from google.cloud import run_v2
    from google.protobuf import field_mask_pb2

    from vlp.components.cloud_run.service_spec import CANDIDATE_TAG
    from vlp.components.rollout import split_with, step_pause

    cfg = deployment.config
    services, _ = _clients(deployment)
    service = services.get_service(name=name)
    others = {t.revision: t.percent for t in service.traffic_statuses if t.revision != revision and t.percent}
    # Tags set outside vlp (on the old revision or any other) stay where they are, at 0% when their revision
    # gives up its share; only the candidate tag is vlp's to move and drop.
    tags = {t.revision: t.tag for t in pinned(service.traffic_statuses) if t.tag and t.revision != revision}
    steps = cfg.endpoint.traffic_steps or [100]
    pause = step_pause(deployment, pause_s)
    pin = run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION
    for i, percent in enumerate(steps):
        split = split_with(revision, percent, others)
        tag = CANDIDATE_TAG if percent < 100 else ""
        traffic = [
            run_v2.TrafficTarget(
                type_=pin, revision=rev, percent=share, tag=tag if rev == revision else tags.get(rev, "")
            )
            for rev, share in split.items()
        ]
        traffic += [
            run_v2.TrafficTarget(type_=pin, revision=rev, percent=0, tag=kept)
            for rev, kept in tags.items()
            if rev not in split
        ]
        update = run_v2.Service(name=name, traffic=traffic)
        mask = field_mask_pb2.FieldMask(paths=["traffic"])
        wait_for(services.update_service(service=update, update_mask=mask), f"moving traffic on {name}", 1800)
        log.info("traffic on %s: %s", name, split)
        if i < len(steps) - 1:
            time.sleep(pause)


def remove_revision(services: Any, revisions: Any, name: str, revision: str) -> list[str]:
    """Roll back: the service's traffic without the revision (the old one keeps 100%), then the revision itself, or
    the whole service when the revision was its only one. Returns what was removed."""
    from google.api_core import exceptions
    from google.cloud import run_v2
    from google.protobuf import field_mask_pb2

    service = get_service(services, name)
    if service is None:
        return []
    rev_name = f"{name}/revisions/{revision}"
    rest = [t for t in pinned(service.traffic_statuses) if t.revision != revision]
    if not any(t.percent for t in rest):
        others = [r for r in revisions.list_revisions(parent=name) if r.name.rsplit("/", 1)[1] != revision]
        if not others:
            log.info("deleting service %s: its only revision %s is the one rolled back", name, revision)
            wait_for(services.delete_service(name=name), f"deleting {name}", 600)
            return [name]
        newest = max(others, key=lambda r: r.create_time.timestamp() if r.create_time else 0)
        pin = run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION
        rest = [run_v2.TrafficTarget(type_=pin, revision=newest.name.rsplit("/", 1)[1], percent=100)]
    total = sum(t.percent for t in rest)
    if rest and total != 100:
        # The revision held a canary share (a run stopped mid-promotion): the others take it back, the largest first.
        max(rest, key=lambda t: t.percent).percent += 100 - total
    named = any(t.revision == revision for t in [*service.traffic_statuses, *service.traffic])
    if service.latest_created_revision == rev_name:
        # Its template names the revision (after a failed rollout too: the spec stays as submitted), and Cloud Run
        # will not delete the latest created revision: the template goes back to the revision that keeps the most
        # traffic, which creates nothing new, in the same write as the traffic.
        keeper = max(rest, key=lambda t: t.percent).revision
        back = template_of(revisions.get_revision(name=f"{name}/revisions/{keeper}"))

        def restore(latest: Any) -> Any:
            latest.template = back
            latest.traffic = rest
            return latest

        try:
            update_read_service(services, name, restore, f"restoring {name} to revision {keeper}", 1800)
        except exceptions.Conflict as exc:
            if stale_etag(exc):
                raise
            # Cloud Run reuses a named revision only for exactly the template that made it (Knative's name check):
            # one rebuilt from the revision as read can differ in a default or an annotation, and is refused with
            # 409 "different configuration". Then the traffic moves alone (its tags with it): the rolled-back
            # revision stays the service's latest, with no traffic and no tag (it serves nothing and holds no
            # quota), until the next deploy makes it deletable (`vlp gc`).
            update = run_v2.Service(name=name, traffic=rest)
            mask = field_mask_pb2.FieldMask(paths=["traffic"])
            wait_for(services.update_service(service=update, update_mask=mask), f"moving traffic off {revision}", 1800)
            log.info(
                "traffic on %s: %s; revision %s stays without traffic or tag (the template could not go back: %s)",
                name, {t.revision: t.percent for t in rest}, revision, getattr(exc, "message", exc),
            )  # fmt: skip
            return []
        log.info("%s is back on revision %s; traffic %s", name, keeper, {t.revision: t.percent for t in rest})
    elif named:
        update = run_v2.Service(name=name, traffic=rest)
        mask = field_mask_pb2.FieldMask(paths=["traffic"])
        wait_for(services.update_service(service=update, update_mask=mask), f"moving traffic off {revision}", 1800)
        log.info("traffic on %s: %s", name, {t.revision: t.percent for t in rest})
    try:
        wait_for(revisions.delete_revision(name=f"{name}/revisions/{revision}"), f"deleting {revision}", 600)
    except exceptions.NotFound:
        return []
    return [f"{name}/revisions/{revision}"]


def remove_run_services(
    project: str, regions: list[str], deployment_name: str, run_label: str, api_endpoint: str = ""
) -> list[str]:
    """The exit handler's part on Cloud Run: services this run created go; in services other runs created, this
    run's revisions go and the traffic they held returns to the newest other revision. Safe to call twice."""
    from vlp.components.cloud_run.service_spec import revisions_client, services_client

    services, revisions = services_client(api_endpoint), revisions_client(api_endpoint)
    removed: list[str] = []
    for region in dict.fromkeys(regions):
        for service in services.list_services(parent=f"projects/{project}/locations/{region}"):
            if service.labels.get("vlp-deployment") != deployment_name:
                continue
            if service.labels.get("vlp-run") == run_label:
                log.info("deleting Cloud Run service %s (created by run %s)", service.name, run_label)
                wait_for(services.delete_service(name=service.name), f"deleting {service.name}", 600)
                removed.append(service.name)
                continue
            for revision in revisions.list_revisions(parent=service.name):
                if revision.labels.get("vlp-run") == run_label:
                    removed += remove_revision(services, revisions, service.name, revision.name.rsplit("/", 1)[1])
    return removed


def deploy_service_op(deployment: dict, weights_uri: str) -> NamedTuple(
    "DeployServiceOutputs", [("service", str), ("revision", str), ("url", str), ("service_url", str)]
):
    """Deploy the mirrored weights as a new revision of the Cloud Run service, at 0% behind the candidate tag."""
    from collections import namedtuple

    from vlp.components.cloud_run.service import deploy_revision
    from vlp.components.deployment import Deployment
    from vlp.components.runtime import checkpoint, setup_logging

    setup_logging()
    deployed = deploy_revision(Deployment.parse(deployment), weights_uri)
    checkpoint("deploy-service")
    outputs = namedtuple("DeployServiceOutputs", ["service", "revision", "url", "service_url"])
    return outputs(deployed.service, deployed.revision, deployed.url, deployed.service_url)


def promote_service_op(deployment: dict, service: str, revision: str) -> None:
    """Move the service's traffic to the revision that passed its smoke test (canary steps too)."""
    from vlp.components.cloud_run.service import move_traffic
    from vlp.components.deployment import Deployment
    from vlp.components.runtime import checkpoint, setup_logging

    setup_logging()
    checkpoint("promote-service")
    move_traffic(Deployment.parse(deployment), service, revision)


def roll_back_service_op(deployment: dict, service: str, revision: str, reason: str) -> None:
    """Roll back after a failed smoke test: the old revision keeps its traffic, the new one is deleted."""
    from vlp.components.cloud_run.service import _clients, remove_revision
    from vlp.components.deployment import Deployment
    from vlp.components.runtime import StepError, checkpoint, setup_logging

    log = setup_logging()
    checkpoint("roll-back-service")
    d = Deployment.parse(deployment)
    if d.config.teardown == "never":
        log.warning("teardown: never — leaving revision %s in place (0%% traffic) for debugging", revision)
    else:
        for name in remove_revision(*_clients(d), service, revision):
            log.info("removed %s", name)
    raise StepError(f"smoke test failed, deployment rolled back: {reason}")
