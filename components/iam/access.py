"""What preflight can know about access before anything costs money: whether the pipeline's own account holds each
grant the policy (components/iam/policy.py) gives it, asked with testIamPermissions (which needs no permission itself)
on the project, the bucket, the service accounts, the secret and the serving image's Artifact Registry repositories;
and Google's SERVICE_DISABLED answers as a fix."""

from __future__ import annotations

from typing import Any

from vlp.components.iam.policy import (
    RULES,
    Identities,
    conditions,
    is_compute_default_account,
    member_of,
    secret_id,
    serving_repositories,
)

GOOGLE_API = {"aiplatform": "https://{region}-aiplatform.googleapis.com", "run": "https://run.googleapis.com"}
GOOGLE = {
    "cloudresourcemanager": "https://cloudresourcemanager.googleapis.com",
    "iam": "https://iam.googleapis.com",
    "secretmanager": "https://secretmanager.googleapis.com",
    "artifactregistry": "https://artifactregistry.googleapis.com",
}


def check_access(cfg: Any, *, project: str, bucket: str, api_endpoint: str = "") -> list[str]:
    """One line per grant of the policy that the step's account lacks (empty when all hold, or when the step has no
    service account to ask about: a developer's own credentials)."""
    from vlp.components.clients import own_account

    account = own_account(api_endpoint)
    if not account:
        return []
    ids = Identities(
        project=project,
        project_number="",
        bucket=bucket,
        pipeline_sa=account,
        runtime_sa=cfg.cloud_run.service_account if cfg.target == "cloud_run" else "",
        secret=secret_id(cfg.model.hf_token_secret),
        # The repositories of the config's regions (a region given only at run time is not among them).
        serving_repositories=tuple(serving_repositories(cfg, project, list(cfg.placement.regions))),
    )
    held = conditions(cfg)
    asker = _Asker(api_endpoint, project)
    problems = asker.disabled_apis(cfg, project)
    for rule in RULES:
        if rule.who != "pipeline" or rule.when not in held or not rule.checks:
            continue
        for resource in ids.resources(rule.on):
            try:
                granted = asker.held(resource, list(rule.checks))
            except _Missing as exc:
                if str(exc) not in problems:  # one disabled API or missing bucket answers for several rules
                    problems.append(str(exc))
                continue
            missing = [p for p in rule.checks if p not in granted]
            if missing:
                from vlp.components.iam.policy import Binding

                binding = Binding(member_of(account), rule.role, resource, rule)
                problems.append(
                    f"{account} lacks {', '.join(missing)} on {_pretty(resource)} ({rule.steps}: {rule.why}). Grant "
                    f"{rule.role}: {binding.gcloud()} (or run `vlp setup`, which grants the whole policy: docs/iam.md)"
                )
    if problems and is_compute_default_account(account):
        # The first real run's usual failure: a PipelineJob that names no serviceAccount runs as this account, which
        # `vlp setup` never granted anything (and whose automatic Editor role, where a project still grants it, lacks
        # the secret, the invoker grant and ID tokens).
        from vlp.components.deployment import run_account

        pipeline_sa = run_account("", cfg, project)
        problems.insert(
            0,
            f"this run runs as {account}, the Compute Engine default service account: its PipelineJob named no "
            f"service account. Run it as the pipeline's account, {pipeline_sa}: `vlp run` and `vlp schedule create` "
            f"name it (or pass --service-account); in the console's Create run form, set Advanced options > Service "
            f"account to it; from the SDK, PipelineJob.submit(service_account={pipeline_sa!r})",
        )
    return problems


class _Missing(Exception):
    """A resource the check needs is not there (a bucket not created yet)."""


class _Asker:
    def __init__(self, api_endpoint: str, project: str) -> None:
        from google.auth.transport.requests import AuthorizedSession

        from vlp.components.clients import api_endpoint as resolve
        from vlp.components.clients import credentials

        self.host = resolve(api_endpoint)
        self.local = self.host.startswith("http://")
        creds = credentials(self.host)
        if creds is None:
            import google.auth

            creds, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
        self.session = AuthorizedSession(creds)
        self.project = project

    def disabled_apis(self, cfg: Any, project: str) -> list[str]:
        """One cheap list call per API the steps drive: a disabled one answers SERVICE_DISABLED whoever asks."""
        region = cfg.placement.regions[0] if cfg.placement.regions else "us-central1"
        probes = {"aiplatform": f"/v1/projects/{project}/locations/{region}/endpoints?pageSize=1"}
        if cfg.target == "cloud_run":
            probes["run"] = f"/v2/projects/{project}/locations/{region}/services?pageSize=1"
        problems = []
        for service, path in probes.items():
            base = self.host.rstrip("/") if self.local else GOOGLE_API[service].format(region=region)
            response = self.session.get(f"{base}{path}", timeout=30)
            fix = _disabled_answer(response)
            if fix:
                problems.append(fix.replace("PROJECT", project))
        return problems

    def held(self, resource: str, permissions: list[str]) -> set[str]:
        """The permissions of `permissions` the caller holds on `resource`."""
        if resource.startswith("buckets/"):
            from google.api_core import exceptions

            from vlp.components.clients import storage_client

            name = resource.split("/", 1)[1]
            try:
                return set(storage_client(self.project).bucket(name).test_iam_permissions(permissions))
            except exceptions.NotFound:
                raise _Missing(
                    f"bucket gs://{name} does not exist: create it in the run's region (gcloud storage buckets create "
                    f"gs://{name} --location REGION, or `vlp setup`)"
                ) from None
        if "/serviceAccounts/" in resource:
            service, path = "iam", f"/v1/projects/-/serviceAccounts/{resource.rsplit('/', 1)[1]}"
        elif "/secrets/" in resource:
            service, path = "secretmanager", f"/v1/{resource}"
        elif "/repositories/" in resource:
            # google/devtools/artifactregistry/v1/service.proto: TestIamPermissions is
            # `post: "/v1/{resource=projects/*/locations/*/repositories/*}:testIamPermissions"`, body "*".
            service, path = "artifactregistry", f"/v1/{resource}"
        else:
            service, path = "cloudresourcemanager", f"/v1/{resource}"
        base = self.host.rstrip("/") if self.local else GOOGLE[service]
        response = self.session.post(f"{base}{path}:testIamPermissions", json={"permissions": permissions}, timeout=30)
        if response.status_code == 404:
            raise _Missing(f"{_pretty(resource)} does not exist (or cannot be seen): create it, or run `vlp setup`")
        # testIamPermissions needs no permission, so a 403 is the API itself: Resource Manager is not on in a new
        # project (service-usage/docs/enabled-service), and the check asks it about the project.
        fix = _disabled_answer(response)
        if fix:
            raise _Missing(fix.replace("PROJECT", self.project))
        response.raise_for_status()
        return set(response.json().get("permissions") or [])


def _pretty(resource: str) -> str:
    if resource.startswith("buckets/"):
        return "gs://" + resource.split("/", 1)[1]
    return resource


def disabled_api(exc: BaseException) -> str:
    """A fix for Google's SERVICE_DISABLED answer ("" for any other error): which API, in which project."""
    if getattr(exc, "reason", None) == "SERVICE_DISABLED":
        return _enable_fix(dict(getattr(exc, "metadata", None) or {}).get("service", "the API"))
    return _disabled_in(getattr(exc, "details", None) or [])


def _disabled_answer(response: Any) -> str:
    """The fix for a REST answer that is Google's SERVICE_DISABLED 403 ("" for any other answer)."""
    if response.status_code != 403:
        return ""
    try:
        return _disabled_in(response.json().get("error", {}).get("details") or [])
    except ValueError:
        return ""


def _disabled_in(details: list[Any]) -> str:
    """The same fix, read from an error's details (ErrorInfo protos, or the JSON of a REST answer)."""
    for detail in details:
        reason = getattr(detail, "reason", None) or (detail.get("reason") if isinstance(detail, dict) else None)
        if reason == "SERVICE_DISABLED":
            metadata = getattr(detail, "metadata", None) or (detail.get("metadata") if isinstance(detail, dict) else {})
            return _enable_fix(dict(metadata or {}).get("service", "the API"))
    return ""


def _enable_fix(service: str) -> str:
    return (
        f"{service} is disabled in this project: enable it (gcloud services enable {service} --project PROJECT, or "
        "`vlp setup`), wait a minute for it to take effect, then run again"
    )
