"""`vlp setup`: make a project ready for a deployment, exactly as the policy in components/iam/policy.py says: enable
the APIs, create the bucket in the region, the pipeline's service account and (for a serving image hosted on Docker
Hub) the Artifact Registry remote repository deployments pull it through, and grant each binding, idempotently
(read, add, write back with the etag), the reader grant on that repository included (Artifact Registry's
repositories getIamPolicy / setIamPolicy). `--dry-run` prints the equivalent gcloud commands instead. The local stack runs
the same code before every `vlp run --local`, so local runs hold exactly these grants."""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass, field
from typing import Any

from vlp.components.config import regional_bucket
from vlp.components.deployment import default_pipeline_account
from vlp.components.iam.policy import (
    APIS,
    Binding,
    Identities,
    bindings,
    conditions,
    secret_id,
    serving_repositories,
)

SECRET_MANAGER_API = "secretmanager.googleapis.com"

GOOGLE_HOSTS = {
    "serviceusage": "https://serviceusage.googleapis.com",
    "iam": "https://iam.googleapis.com",
    "cloudresourcemanager": "https://cloudresourcemanager.googleapis.com",
    "secretmanager": "https://secretmanager.googleapis.com",
    "artifactregistry": "https://artifactregistry.googleapis.com",
}
ARTIFACT_REGISTRY_API = "artifactregistry.googleapis.com"
REMOTE_REPOSITORY_DESCRIPTION = (
    "Docker Hub images vlp deploys (Vertex AI pulls serving images only from Artifact Registry)"
)


@dataclass
class SetupPlan:
    """What `vlp setup` makes sure of, in order."""

    project: str
    region: str
    bucket: str
    apis: list[str]
    accounts: list[str]
    bindings: list[Binding] = field(default_factory=list)
    # Artifact Registry remote repositories (upstream: Docker Hub), by full name: projects/P/locations/L/repositories/R.
    repositories: list[str] = field(default_factory=list)
    # The Hub token's Secret Manager secret (a gated model), by id: created empty when missing; its value is the
    # owner's to add (never through vlp: it would pass through a command line or a log).
    secret: str = ""
    # A weights bucket per fallback region (region -> bucket, components/config.py regional_bucket): Vertex AI serves a
    # model's artifacts from a bucket in the endpoint's region, so preflight can fall back only where one is.
    regional_buckets: dict[str, str] = field(default_factory=dict)

    def secret_value_command(self) -> str:
        """How the owner puts the token in: from an environment variable, never echoed."""
        return (
            f'printf %s "$HF_TOKEN" | gcloud secrets versions add {self.secret} --data-file=- --project {self.project}'
        )

    def gcloud(self) -> list[str]:
        """The equivalent gcloud commands (what --dry-run prints)."""
        lines = [f"gcloud services enable {' '.join(self.apis)} --project {self.project}"]
        for region, bucket in {self.region: self.bucket, **self.regional_buckets}.items():
            lines.append(
                f"gcloud storage buckets create gs://{bucket} --project {self.project} --location {region} "
                "--uniform-bucket-level-access"
            )
        for name in self.repositories:
            # gcloud reference, `gcloud artifacts repositories create`: --mode, --remote-docker-repo (DOCKER-HUB: the
            # preset for Docker Hub), --remote-repo-config-desc.
            _, project, _, location, _, repository = name.split("/")
            lines.append(
                f"gcloud artifacts repositories create {repository} --project {project} --location {location} "
                "--repository-format=docker --mode=remote-repository --remote-docker-repo=DOCKER-HUB "
                f"--remote-repo-config-desc='Docker Hub' --description={shlex.quote(REMOTE_REPOSITORY_DESCRIPTION)}"
            )
        if self.secret:
            lines.append(f"gcloud secrets create {self.secret} --replication-policy=automatic --project {self.project}")
            lines.append(self.secret_value_command())
        for account in self.accounts:
            account_id = account.split("@", 1)[0]
            lines.append(f"gcloud iam service-accounts create {account_id} --project {self.project}")
        lines += [b.gcloud() for b in self.bindings]
        return lines


def plan_setup(
    cfg: Any,
    *,
    project: str,
    bucket: str,
    region: str,
    project_number: str,
    submitter: str = "",
    templates: bool = False,
    image: bool = False,
    kfp_repository: str = "",
    image_repository: str = "",
) -> SetupPlan:
    """The APIs, accounts and bindings a deployment config needs in a project."""
    pipeline_sa = cfg.placement.service_account or default_pipeline_account(project)
    runtime_sa = cfg.cloud_run.service_account if getattr(cfg, "target", "vertex") == "cloud_run" else ""
    repositories = remote_repositories(cfg, project, region)
    regional = {}
    if (getattr(cfg, "target", "vertex") or "vertex") != "cloud_run":  # a Cloud Run service reads any bucket
        fallbacks = [r for r in dict.fromkeys([region, *(getattr(cfg.placement, "regions", None) or [])]) if r != region]
        regional = {r: regional_bucket(bucket, r) for r in fallbacks}
    ids = Identities(
        project=project,
        project_number=project_number,
        bucket=bucket,
        pipeline_sa=pipeline_sa,
        runtime_sa=runtime_sa,
        secret=secret_id(cfg.model.hf_token_secret),
        submitter=submitter,
        kfp_repository=kfp_repository,
        image_repository=image_repository,
        serving_repositories=tuple(repositories),
        regional_buckets=tuple(regional.values()),
    )
    held = conditions(cfg, templates=templates, image=image)
    accounts = [
        a for a in dict.fromkeys([pipeline_sa, runtime_sa]) if a and a.endswith(f"@{project}.iam.gserviceaccount.com")
    ]
    apis = list(APIS[getattr(cfg, "target", "vertex") or "vertex"])
    if repositories and ARTIFACT_REGISTRY_API not in apis:
        apis.append(ARTIFACT_REGISTRY_API)
    secret = secret_id(cfg.model.hf_token_secret) if cfg.model.hf_token_secret else ""
    if secret and SECRET_MANAGER_API not in apis:
        apis.append(SECRET_MANAGER_API)  # the mirror and preflight read the token through it
    return SetupPlan(
        project=project,
        region=region,
        bucket=bucket,
        apis=apis,
        accounts=accounts,
        bindings=bindings(ids, held),
        repositories=repositories,
        secret=secret,
        regional_buckets=regional,
    )


def remote_repositories(cfg: Any, project: str, region: str) -> list[str]:
    """The Docker Hub remote repositories a deployment pulls its serving image through: one per Artifact Registry
    multi-region (us, europe, asia) that `region` and the config's regions fall in (components/iam/policy.py
    serving_repositories). Who pulls needs no grant: Vertex AI pulls with its service agent ("Vertex AI uses the
    default service account to pull images", vertex-ai/docs/general/custom-service-account) and Cloud Run with its own
    ("If your repositories are in a different project, you must grant Artifact Registry Reader permissions to the
    Cloud Run Service Agent", artifact-registry/docs/integrate-cloud-run); both read their own project's repositories
    ("Google Cloud runtime environments ... have preconfigured access to repositories in the same project by
    default", artifact-registry/docs/deploy). Who deploys a Cloud Run revision of the image does need
    roles/artifactregistry.reader on the repository ("To deploy to Cloud Run, you must have the Artifact Registry
    Reader role ... on the project or repository containing the images", the same page): the policy's
    serving_repository rule, which `apply` grants here."""
    return serving_repositories(cfg, project, [region, *(getattr(cfg.placement, "regions", None) or [])])


class _Api:
    """Authorised REST calls to Google's admin APIs (or all of them to one emulator host)."""

    def __init__(self, api_endpoint: str, credentials: Any) -> None:
        from google.auth.transport.requests import AuthorizedSession

        if credentials is None:
            import google.auth

            credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
        self.session = AuthorizedSession(credentials)
        self.api_endpoint = api_endpoint.rstrip("/")

    def call(self, service: str, method: str, path: str, body: Any = None) -> dict[str, Any]:
        base = self.api_endpoint or GOOGLE_HOSTS[service]
        response = self.session.request(method, f"{base}{path}", json=body, timeout=60)
        if response.status_code >= 400:
            from google.api_core import exceptions

            raise exceptions.from_http_response(response)
        return response.json() if response.content else {}


def project_number(project: str, *, api_endpoint: str = "", credentials: Any = None) -> str:
    """The project's number (Resource Manager projects.get): service agents' emails are named by it."""
    return str(
        _Api(api_endpoint, credentials).call("cloudresourcemanager", "GET", f"/v1/projects/{project}")["projectNumber"]
    )


def apply(
    plan: SetupPlan,
    *,
    api_endpoint: str = "",
    credentials: Any = None,
    storage_client: Any = None,
    log: Any = print,
) -> list[str]:
    """Make it so; returns what changed (nothing on a second run)."""
    from google.api_core import exceptions

    api = _Api(api_endpoint, credentials)
    changed: list[str] = []
    for service in plan.apis:
        state = api.call("serviceusage", "GET", f"/v1/projects/{plan.project}/services/{service}").get("state")
        if state != "ENABLED":
            api.call("serviceusage", "POST", f"/v1/projects/{plan.project}/services/{service}:enable", {})
            changed.append(f"enabled {service}")
    gcs = storage_client
    if gcs is None:
        from google.cloud import storage

        gcs = storage.Client(project=plan.project, credentials=credentials)
    for region, bucket in {plan.region: plan.bucket, **plan.regional_buckets}.items():
        if gcs.lookup_bucket(bucket) is None:
            gcs.create_bucket(bucket, project=plan.project, location=region)
            changed.append(f"created gs://{bucket} in {region}")
    for account in plan.accounts:
        account_id = account.split("@", 1)[0]
        try:
            api.call("iam", "POST", f"/v1/projects/{plan.project}/serviceAccounts", {"accountId": account_id})
            changed.append(f"created {account}")
        except exceptions.Conflict:
            pass
    if plan.secret and _create_secret(api, plan.project, plan.secret):
        changed.append(
            f"created the empty secret {plan.secret}: put the Hub token in it with {plan.secret_value_command()}"
        )
    for name in plan.repositories:
        if _create_remote_repository(api, name):
            changed.append(f"created Artifact Registry remote repository {name} (upstream: Docker Hub)")
    by_resource: dict[str, list[Binding]] = {}
    for binding in plan.bindings:
        by_resource.setdefault(binding.resource, []).append(binding)
    for resource, wanted in by_resource.items():
        if "/repositories/" in resource and resource not in plan.repositories:
            # A template or component image repository, possibly in another project: named by the user, not made here.
            log(f"not granted here (grant it with gcloud): {'; '.join(b.gcloud() for b in wanted)}")
            continue
        policy = _get_policy(api, gcs, resource)
        added = _add(policy, wanted)
        if added:
            _set_policy(api, gcs, resource, policy)
            changed += [f"granted {b.role} on {resource} to {b.member}" for b in added]
    for line in changed:
        log(line)
    return changed


def _create_secret(api: _Api, project: str, secret: str) -> bool:
    """Creates the secret, without a version, when it does not exist (Secret Manager v1 secrets.create:
    POST /v1/projects/P/secrets?secretId=ID with a Secret whose replication is automatic); True if it did. Its
    IAM binding follows in apply; the value is the owner's to add."""
    from google.api_core import exceptions

    try:
        api.call("secretmanager", "GET", f"/v1/projects/{project}/secrets/{secret}")
        return False
    except exceptions.NotFound:
        pass
    try:
        api.call(
            "secretmanager",
            "POST",
            f"/v1/projects/{project}/secrets?secretId={secret}",
            {"replication": {"automatic": {}}},
        )
    except exceptions.Conflict:
        return False
    return True


def remote_repository_body() -> dict[str, Any]:
    """The Repository `vlp setup` creates: google/devtools/artifactregistry/v1/repository.proto (Repository.format
    DOCKER, Repository.mode REMOTE_REPOSITORY, RemoteRepositoryConfig.docker_repository.public_repository
    DOCKER_HUB), sent as the body of CreateRepository (service.proto: POST /v1/{parent}/repositories, body
    "repository", repository_id in the query)."""
    return {
        "format": "DOCKER",
        "mode": "REMOTE_REPOSITORY",
        "description": REMOTE_REPOSITORY_DESCRIPTION,
        "remoteRepositoryConfig": {"description": "Docker Hub", "dockerRepository": {"publicRepository": "DOCKER_HUB"}},
    }


def _create_remote_repository(api: _Api, name: str, timeout_s: float = 300.0) -> bool:
    """Create the repository unless it is there (GET first; 409 ALREADY_EXISTS from a concurrent setup counts as
    there); waits for the creation's long-running operation. Returns whether it created it."""
    from google.api_core import exceptions

    try:
        api.call("artifactregistry", "GET", f"/v1/{name}")
        return False
    except exceptions.NotFound:
        pass
    parent, repository_id = name.rsplit("/repositories/", 1)
    try:
        op = api.call(
            "artifactregistry",
            "POST",
            f"/v1/{parent}/repositories?repositoryId={repository_id}",
            remote_repository_body(),
        )
    except exceptions.Conflict:
        return False
    deadline = time.monotonic() + timeout_s
    while not op.get("done"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"creating {name} did not finish in {timeout_s:.0f} s (operation {op.get('name')})")
        time.sleep(2)
        op = api.call("artifactregistry", "GET", f"/v1/{op['name']}")
    if op.get("error"):
        raise RuntimeError(f"creating {name} failed: {op['error'].get('message', op['error'])}")
    return True


def _add(policy: dict[str, Any], wanted: list[Binding]) -> list[Binding]:
    added = []
    entries = policy.setdefault("bindings", [])
    for b in wanted:
        entry = next((e for e in entries if e.get("role") == b.role and not e.get("condition")), None)
        if entry is None:
            entry = {"role": b.role, "members": []}
            entries.append(entry)
        if b.member not in entry["members"]:
            entry["members"].append(b.member)
            added.append(b)
    return added


def _get_policy(api: _Api, gcs: Any, resource: str) -> dict[str, Any]:
    if resource.startswith("buckets/"):
        policy = gcs.bucket(resource.split("/", 1)[1]).get_iam_policy(requested_policy_version=3)
        return {"bindings": [dict(b) for b in policy.bindings], "etag": policy.etag, "_policy": policy}
    service, method, path = _policy_call(resource, "get")
    return api.call(service, method, path, {} if method == "POST" else None)


def _set_policy(api: _Api, gcs: Any, resource: str, policy: dict[str, Any]) -> None:
    if resource.startswith("buckets/"):
        bucket_policy = policy.pop("_policy")
        bucket_policy.bindings = [{"role": b["role"], "members": set(b["members"])} for b in policy["bindings"]]
        gcs.bucket(resource.split("/", 1)[1]).set_iam_policy(bucket_policy)
        return
    service, method, path = _policy_call(resource, "set")
    api.call(service, "POST", path, {"policy": policy})


def _policy_call(resource: str, verb: str) -> tuple[str, str, str]:
    if "/repositories/" in resource:
        # google/devtools/artifactregistry/v1/service.proto: GetIamPolicy is
        # `get: "/v1/{resource=projects/*/locations/*/repositories/*}:getIamPolicy"`, SetIamPolicy
        # `post: "/v1/{resource=projects/*/locations/*/repositories/*}:setIamPolicy"` with body "*" ({"policy": ...}).
        return "artifactregistry", "GET" if verb == "get" else "POST", f"/v1/{resource}:{verb}IamPolicy"
    if "/serviceAccounts/" in resource:
        return "iam", "POST", f"/v1/{resource}:{verb}IamPolicy"
    if "/secrets/" in resource:
        return "secretmanager", "GET" if verb == "get" else "POST", f"/v1/{resource}:{verb}IamPolicy"
    return "cloudresourcemanager", "POST", f"/v1/{resource}:{verb}IamPolicy"


def describe(plan: SetupPlan) -> str:
    """The plan for people: one line per API, account and binding."""
    return json.dumps(
        {
            "apis": plan.apis,
            "bucket": f"gs://{plan.bucket} ({plan.region})",
            "regional_buckets": {r: f"gs://{b}" for r, b in plan.regional_buckets.items()},
            "accounts": plan.accounts,
            "repositories": plan.repositories,
            "bindings": [{"member": b.member, "role": b.role, "resource": b.resource} for b in plan.bindings],
        },
        indent=2,
    )
