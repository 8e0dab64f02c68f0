"""The Cloud Run service's life: deploy a revision behind the `candidate` tag, promote it or roll it back, spot a
redeploy that changes nothing, and remove what a run created (google-cloud-run, run_v2)."""

from __future__ import annotations

import concurrent.futures
import logging
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

from components.cloud_run_probe import _clients, get_service

log = logging.getLogger("vlp.cloud_run")

INVOKER = "roles/run.invoker"
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


def _config(deployment: dict[str, Any]) -> Any:
    from components.config import config_from_dict

    return config_from_dict(deployment["config"], source="deployment['config']")


def pinned(targets: Any) -> list[Any]:
    """Traffic as run_v2.TrafficTargets pinned to revisions (LATEST resolved), without the candidate tag."""
    from google.cloud import run_v2

    from components.cloud_run import CANDIDATE_TAG

    pin = run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION
    return [
        run_v2.TrafficTarget(type_=pin, revision=t.revision, percent=t.percent, tag=t.tag)
        for t in targets
        if (t.percent or t.tag) and t.tag != CANDIDATE_TAG
    ]


def wait_for(operation: Any, what: str, timeout_s: float) -> Any:
    """An operation's result within a real deadline; a refusal or a timeout becomes a StepError saying which."""
    from components.runtime import StepError

    try:
        return operation.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        raise StepError(
            f"{what} did not finish within {timeout_s:.0f} s (operation {operation.operation.name}): the model may "
            "load slower than cloud_run.startup_timeout_s allows; read the revision's logs"
        ) from None


def grant_invoker(services: Any, name: str, member: str) -> None:
    """roles/run.invoker for `member` on the service (never allUsers), keeping the policy's etag round trip."""
    from google.iam.v1 import iam_policy_pb2

    policy = services.get_iam_policy(request=iam_policy_pb2.GetIamPolicyRequest(resource=name))
    for binding in policy.bindings:
        if binding.role == INVOKER:
            if member in binding.members:
                return
            binding.members.append(member)
            break
    else:
        policy.bindings.add(role=INVOKER, members=[member])
    services.set_iam_policy(request=iam_policy_pb2.SetIamPolicyRequest(resource=name, policy=policy))
    log.info("granted %s on %s to %s", INVOKER, name, member)


def caller_member(api_endpoint: str) -> str:
    """The IAM member the pipeline's steps call as (empty when it cannot be read: then only accounts already
    granted can call)."""
    from components.clients import own_account

    email = own_account(api_endpoint)
    return f"serviceAccount:{email}" if email else ""


def deploy_revision(deployment: dict[str, Any], weights_uri: str) -> DeployedRevision:
    """Create the service, or add a revision to it at 0% behind the `candidate` tag (blue/green), and wait for it."""
    from components.cloud_run import CANDIDATE_TAG, service_name, service_request
    from components.runtime import StepError

    cfg = _config(deployment)
    services, _ = _clients(deployment)
    name = service_name(deployment)
    current = get_service(services, name)
    previous = pinned(current.traffic_statuses) if current is not None else []
    if not cfg.cloud_run.service_account:
        from components.clients import serving_account

        # The revision runs as the pipeline's account unless the config names one (else the Compute Engine default).
        deployment = {**deployment, "service_account": serving_account(deployment, cfg)}
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
        else:
            request.name = name
            request.labels = dict(current.labels)  # the service keeps the labels of the run that created it
            operation = services.update_service(service=request)
        service = wait_for(operation, f"deploying {what}", deadline)
    except StepError:
        raise
    except Exception as exc:
        from components.server_logs import revision_failure_message

        raise StepError(
            revision_failure_message(
                deployment["project"],
                cfg.service_id,
                request.template.revision,
                getattr(exc, "message", None) or str(exc),
                deployment.get("api_endpoint", ""),
            )
        ) from None
    member = caller_member(deployment.get("api_endpoint", ""))
    if member:
        from google.api_core import exceptions

        try:
            grant_invoker(services, name, member)
        except exceptions.Forbidden as exc:  # PermissionDenied (gRPC) is a Forbidden (REST) too
            raise StepError(
                f"cannot grant {INVOKER} on {name} to {member} ({exc.message}): give the pipeline's service account "
                "roles/run.admin on the project (setIamPolicy), or grant it roles/run.invoker on the service yourself"
            ) from None
    url = next((t.uri for t in service.traffic_statuses if t.tag == CANDIDATE_TAG), "")
    if not url:
        raise StepError(f"{what} has no URL for the {CANDIDATE_TAG} tag: traffic is {list(service.traffic_statuses)}")
    log.info("revision %s is ready at %s", request.template.revision, url)
    return DeployedRevision(name, request.template.revision, url, service.uri)


def move_traffic(deployment: dict[str, Any], name: str, revision: str, pause_s: float | None = None) -> None:
    """Promote: the revision takes the config's canary steps (endpoint.traffic_steps) and then 100%; its tag goes."""
    from google.cloud import run_v2
    from google.protobuf import field_mask_pb2

    from components.cloud_run import CANDIDATE_TAG
    from components.promote import split_with, step_pause

    cfg = _config(deployment)
    services, _ = _clients(deployment)
    service = services.get_service(name=name)
    others = {t.revision: t.percent for t in service.traffic_statuses if t.revision != revision and t.percent}
    steps = cfg.endpoint.traffic_steps or [100]
    pause = step_pause(deployment, pause_s)
    pin = run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION
    for i, percent in enumerate(steps):
        split = split_with(revision, percent, others)
        tag = CANDIDATE_TAG if percent < 100 else ""
        traffic = [
            run_v2.TrafficTarget(type_=pin, revision=rev, percent=share, tag=tag if rev == revision else "")
            for rev, share in split.items()
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
    from google.cloud import run_v2
    from google.protobuf import field_mask_pb2

    service = get_service(services, name)
    if service is None:
        return []
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
    if any(t.revision == revision for t in service.traffic_statuses):
        update = run_v2.Service(name=name, traffic=rest)
        mask = field_mask_pb2.FieldMask(paths=["traffic"])
        wait_for(services.update_service(service=update, update_mask=mask), f"moving traffic off {revision}", 1800)
        log.info("traffic on %s: %s", name, {t.revision: t.percent for t in rest})
    from google.api_core import exceptions

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
    from components.cloud_run import revisions_client, services_client

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

    from components.cloud_run_service import deploy_revision
    from components.runtime import checkpoint, setup_logging

    setup_logging()
    deployed = deploy_revision(deployment, weights_uri)
    checkpoint("deploy-service")
    outputs = namedtuple("DeployServiceOutputs", ["service", "revision", "url", "service_url"])
    return outputs(deployed.service, deployed.revision, deployed.url, deployed.service_url)


def promote_service_op(deployment: dict, service: str, revision: str) -> None:
    """Move the service's traffic to the revision that passed its smoke test (canary steps too)."""
    from components.cloud_run_service import move_traffic
    from components.runtime import checkpoint, setup_logging

    setup_logging()
    checkpoint("promote-service")
    move_traffic(deployment, service, revision)


def roll_back_service_op(deployment: dict, service: str, revision: str, reason: str) -> None:
    """Roll back after a failed smoke test: the old revision keeps its traffic, the new one is deleted."""
    from components.cloud_run_service import _clients, remove_revision
    from components.runtime import StepError, checkpoint, setup_logging

    log = setup_logging()
    checkpoint("roll-back-service")
    if deployment["config"]["teardown"] == "never":
        log.warning("teardown: never — leaving revision %s in place (0%% traffic) for debugging", revision)
    else:
        for name in remove_revision(*_clients(deployment), service, revision):
            log.info("removed %s", name)
    raise StepError(f"smoke test failed, deployment rolled back: {reason}")
