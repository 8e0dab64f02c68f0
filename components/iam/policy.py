"""Who needs which role on which resource for vlp to run: the one policy that docs/iam.md shows, `vlp setup` grants,
preflight checks and the local stack runs under (nothing more is granted there)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rule:
    """One role an identity needs on one kind of resource, when, for which steps, and why."""

    who: str
    role: str
    on: str
    steps: str
    why: str
    when: str = ""
    # The permissions preflight tests (testIamPermissions) to know the grant is there; each is in the role.
    checks: tuple[str, ...] = ()


RULES: tuple[Rule, ...] = (
    Rule(
        "pipeline",
        "roles/aiplatform.user",
        "project",
        "all",
        "Vertex AI Pipelines runs the job's tasks; register, deploy, smoke test (`endpoints.predict`), promote, "
        "roll back, clean up; preflight lists what serves and probes it (`endpoints.predict`, which "
        "roles/aiplatform.viewer lacks); a big model's mirror runs as a custom job, which the exit handler cancels "
        "if the run fails while it runs (`customJobs.create`, `customJobs.cancel`)",
        checks=(
            "aiplatform.endpoints.list",
            "aiplatform.endpoints.predict",
            "aiplatform.models.upload",
            "aiplatform.endpoints.deploy",
            "aiplatform.customJobs.create",
            "aiplatform.customJobs.cancel",
        ),
    ),
    Rule(
        "pipeline",
        "roles/cloudquotas.viewer",
        "project",
        "preflight",
        "GPU, CPU and memory quota per region",
        checks=("cloudquotas.quotas.get",),
    ),
    Rule(
        "pipeline",
        "roles/logging.viewer",
        "project",
        "deploy, smoke test",
        "the model server's log lines in a failed deploy or smoke test",
        checks=("logging.logEntries.list",),
    ),
    Rule(
        "pipeline",
        "roles/storage.objectUser",
        "bucket",
        "mirror weights, smoke test, all (pipeline root)",
        "write and verify `gs://BUCKET/models/...` (and mark each verified object), overwrite the manifest (an "
        "overwrite needs `storage.objects.delete` too), the pipeline root; read the tokenizer. Not objectAdmin: its "
        "extra permissions set object ACLs and retention, which vlp never does",
        checks=(
            "storage.objects.create",
            "storage.objects.get",
            "storage.objects.list",
            "storage.objects.delete",
            "storage.objects.update",
        ),
    ),
    Rule(
        "pipeline",
        "roles/storage.bucketViewer",
        "bucket",
        "preflight",
        "`storage.buckets.get`: the bucket's region must match the run's (roles/storage.objectUser has no bucket get)",
        checks=("storage.buckets.get",),
    ),
    Rule(
        "pipeline",
        "roles/secretmanager.secretAccessor",
        "secret",
        "preflight, mirror weights",
        "check gated-model access and download it",
        "gated",
        checks=("secretmanager.versions.access",),
    ),
    Rule(
        "pipeline",
        "roles/iam.serviceAccountUser",
        "pipeline_sa",
        "deploy, mirror weights (custom job)",
        "the endpoint's model server runs as the pipeline SA, which reads the weights (vLLM downloads "
        "`--model=gs://...` itself), and a big model's mirror custom job runs as it on either target; creating either "
        "as an account needs `iam.serviceAccounts.actAs` on it, asked even for the caller's own (strict: unverified "
        "whether Google waives it)",
        "",
        checks=("iam.serviceAccounts.actAs",),
    ),
    Rule(
        "pipeline",
        "roles/run.developer",
        "project",
        "preflight, deploy service, smoke test service, promote / roll back / clean up",
        "create, update and delete the service and its revisions, and call it (`run.routes.invoke`, in this role). "
        "Not run.admin: its `setIamPolicy` could make any service in the project public",
        "cloud_run",
        checks=("run.services.create", "run.routes.invoke", "run.revisions.delete"),
    ),
    Rule(
        "pipeline",
        "roles/artifactregistry.reader",
        "serving_repository",
        "deploy service",
        "deploy a revision of vLLM's image from the project's Docker Hub remote repository: \"To deploy to Cloud Run, "
        "you must have the Artifact Registry Reader role (roles/artifactregistry.reader) on the project or repository "
        'containing the images you want to deploy" (artifact-registry/docs/integrate-cloud-run), and '
        "roles/run.developer has no artifactregistry permission. On the repository, not the project",
        "cloud_run_docker_hub",
        checks=("artifactregistry.repositories.downloadArtifacts",),
    ),
    Rule(
        "pipeline",
        "roles/iam.serviceAccountUser",
        "runtime_sa",
        "deploy service",
        "a revision runs as the runtime SA (`iam.serviceAccounts.actAs`)",
        "cloud_run",
        checks=("iam.serviceAccounts.actAs",),
    ),
    Rule(
        "pipeline",
        "roles/iam.serviceAccountOpenIdTokenCreator",
        "pipeline_sa",
        "smoke test service, preflight (no-op probe)",
        "mint an ID token for itself with IAM Credentials `generateIdToken` to call the private service",
        "cloud_run",
        checks=("iam.serviceAccounts.getOpenIdToken",),
    ),
    Rule(
        "runtime",
        "roles/storage.objectViewer",
        "bucket",
        "(serving)",
        "the TGI DLC copies the weights (`weights: copy`) or the volume reads them (`weights: mount`) as this account",
        "runtime_separate",
    ),
    Rule(
        "custom_code_agent",
        "roles/artifactregistry.reader",
        "kfp_repository",
        "(Vertex AI Pipelines)",
        "a run from a template tag (`.../latest`) is resolved by the Custom Code Service Agent, not the caller "
        "(python-aiplatform#2398); its automatic role reads a repository in its own project already, so this "
        "matters for one in another project",
        "templates",
    ),
    Rule(
        "custom_code_agent",
        "roles/artifactregistry.reader",
        "image_repository",
        "all",
        "pull the prebuilt component image: Vertex AI pulls with its own agent, never a custom service account "
        "(vertex-ai/docs/general/custom-service-account); its automatic role reads its own project's repositories, "
        "so this matters for an image in another project",
        "image",
    ),
    Rule(
        "submitter",
        "roles/aiplatform.user",
        "project",
        "`vlp run`, `vlp schedule`, `vlp teardown`, `vlp gc`",
        "create and follow pipeline jobs and schedules; undeploy and delete",
    ),
    Rule(
        "submitter",
        "roles/iam.serviceAccountUser",
        "pipeline_sa",
        "`vlp run`, `vlp schedule create`",
        "a run, or a schedule's runs, act as the pipeline SA",
    ),
    Rule(
        "publisher",
        "roles/artifactregistry.writer",
        "kfp_repository",
        "`vlp publish`",
        "upload templates, move the `latest` / version tags",
    ),
    Rule(
        "publisher",
        "roles/artifactregistry.writer",
        "image_repository",
        "CI",
        "push `vlp-components:TAG`",
        "image",
    ),
)

# The APIs a deployment's steps call, per target (what `vlp setup` enables). Resource Manager: preflight asks it
# which project grants the pipeline's account holds (projects.testIamPermissions), and `vlp setup` writes the project's
# policy through it; a new project does not have it on (service-usage/docs/enabled-service lists what it has).
APIS = {
    "vertex": [
        "aiplatform.googleapis.com",
        "cloudresourcemanager.googleapis.com",
        "storage.googleapis.com",
        "cloudquotas.googleapis.com",
        "logging.googleapis.com",
        "iam.googleapis.com",
    ],
    "cloud_run": [
        "aiplatform.googleapis.com",
        "cloudresourcemanager.googleapis.com",
        "run.googleapis.com",
        "storage.googleapis.com",
        "cloudquotas.googleapis.com",
        "logging.googleapis.com",
        "iam.googleapis.com",
        "iamcredentials.googleapis.com",
    ],
}


@dataclass(frozen=True)
class Binding:
    """One grant: `member` gets `role` on `resource` (an IAM resource name the emulator and `vlp setup` share)."""

    member: str
    role: str
    resource: str
    rule: Rule

    def gcloud(self) -> str:
        """The gcloud command that makes this grant."""
        kind, _, rest = self.resource.partition("/")
        args = f'--member "{self.member}" --role {self.role}'
        if kind == "buckets":
            return f"gcloud storage buckets add-iam-policy-binding gs://{rest} {args}"
        if "/secrets/" in self.resource:
            project, secret = self.resource.split("/")[1], self.resource.rsplit("/", 1)[1]
            return f"gcloud secrets add-iam-policy-binding {secret} --project {project} {args}"
        if "/serviceAccounts/" in self.resource:
            return f"gcloud iam service-accounts add-iam-policy-binding {self.resource.rsplit('/', 1)[1]} {args}"
        if "/repositories/" in self.resource:
            parts = self.resource.split("/")
            return (
                f"gcloud artifacts repositories add-iam-policy-binding {parts[5]} --location {parts[3]} "
                f"--project {parts[1]} {args}"
            )
        return f"gcloud projects add-iam-policy-binding {rest} {args}"


@dataclass
class Identities:
    """The concrete accounts and resources of one deployment."""

    project: str
    project_number: str
    bucket: str
    pipeline_sa: str
    runtime_sa: str = ""
    secret: str = ""
    submitter: str = ""
    publisher: str = ""
    kfp_repository: str = ""
    image_repository: str = ""
    # The Docker Hub remote repositories the serving image is pulled through (serving_repositories below).
    serving_repositories: tuple[str, ...] = ()
    # The weights buckets of the fallback regions (config.regional_bucket): each gets the bucket's grants.
    regional_buckets: tuple[str, ...] = ()

    def email(self, who: str) -> str:
        return {
            "pipeline": self.pipeline_sa,
            "runtime": self.runtime_sa or self.pipeline_sa,
            "vertex_agent": f"service-{self.project_number}@gcp-sa-aiplatform.iam.gserviceaccount.com",
            "custom_code_agent": f"service-{self.project_number}@gcp-sa-aiplatform-cc.iam.gserviceaccount.com",
            "submitter": self.submitter,
            "publisher": self.publisher,
        }[who]

    def resource(self, scope: str) -> str:
        return {
            "project": f"projects/{self.project}",
            "bucket": f"buckets/{self.bucket}" if self.bucket else "",
            "secret": f"projects/{self.project}/secrets/{self.secret}" if self.secret else "",
            "pipeline_sa": f"projects/{self.project}/serviceAccounts/{self.pipeline_sa}",
            "runtime_sa": f"projects/{self.project}/serviceAccounts/{self.runtime_sa or self.pipeline_sa}",
            "kfp_repository": self.kfp_repository,
            "image_repository": self.image_repository,
            "serving_repository": self.serving_repositories[0] if self.serving_repositories else "",
        }[scope]

    def resources(self, scope: str) -> list[str]:
        """Every resource a scope names: one per serving repository, else the one `resource` gives (none if empty)."""
        if scope == "serving_repository":
            return list(self.serving_repositories)
        if scope == "bucket" and self.bucket:
            return [f"buckets/{b}" for b in (self.bucket, *self.regional_buckets)]
        return [r for r in [self.resource(scope)] if r]


def is_compute_default_account(email: str) -> bool:
    """The Compute Engine default service account (PROJECT_NUMBER-compute@developer.gserviceaccount.com): who a
    PipelineJob runs as when it names no serviceAccount (pipeline_job.proto, PipelineJob.service_account)."""
    return bool(re.fullmatch(r"[0-9]+-compute@developer\.gserviceaccount\.com", email))


def secret_id(secret: str) -> str:
    """The secret's id in `model.hf_token_secret` (NAME, projects/P/secrets/NAME or .../versions/V)."""
    if not secret:
        return ""
    return secret.split("/secrets/", 1)[1].split("/", 1)[0] if "/secrets/" in secret else secret


def member_of(email: str) -> str:
    """The IAM member string for an email: service accounts and agents, else a user."""
    return f"serviceAccount:{email}" if email.endswith("gserviceaccount.com") else f"user:{email}"


def docker_hub_image(cfg: Any) -> Any:
    """The catalog image (components/serving/images.py ServingImage) the config's serving uses when it is hosted on
    Docker Hub (None otherwise): serving.image, or the engine's default image for the target when none is named
    (preflight may still choose an older image for a model the default does not serve; the repository then goes
    unused)."""
    from vlp.components.serving.images import default_image, find

    target = getattr(cfg, "target", "vertex") or "vertex"
    image = find(cfg.serving.image) if cfg.serving.image else default_image(cfg.serving.engine, target)
    return image if image is not None and image.registry == "docker-hub" else None


def serving_repositories(cfg: Any, project: str, regions: list[str]) -> list[str]:
    """The Docker Hub remote repositories a deployment pulls its serving image through (none for an image on Artifact
    Registry already): one per Artifact Registry multi-region (us, europe, asia) that `regions` fall in, by full name
    (projects/P/locations/L/repositories/R). `vlp setup` creates them; who pulls needs no grant in its own project
    (Vertex AI and Cloud Run pull with their service agents, whose automatic roles, roles/aiplatform.serviceAgent and
    roles/run.serviceAgent, hold artifactregistry.repositories.downloadArtifacts: components/contract/gcp-iam.json),
    but whoever deploys a Cloud Run revision of the image needs roles/artifactregistry.reader on it (the
    serving_repository rule)."""
    from vlp.components.serving.images import REMOTE_REPOSITORY_NAME, multi_region

    if docker_hub_image(cfg) is None:
        return []
    locations = dict.fromkeys(multi_region(r) for r in regions if r)
    return [f"projects/{project}/locations/{loc}/repositories/{REMOTE_REPOSITORY_NAME}" for loc in locations]


def conditions(cfg: Any, *, templates: bool = False, image: bool = False) -> set[str]:
    """Which rule conditions hold for a deployment config (vlp.components.config.DeploymentConfig)."""
    held = {""}
    target = getattr(cfg, "target", "vertex") or "vertex"
    held.add(target)
    if cfg.model.hf_token_secret:
        held.add("gated")
    if (
        target == "cloud_run"
        and cfg.cloud_run.service_account
        and (cfg.cloud_run.service_account != cfg.placement.service_account)
    ):
        held.add("runtime_separate")
    if target == "cloud_run" and docker_hub_image(cfg) is not None:
        # The deployer of a Cloud Run revision needs to read its image's repository (the serving_repository rule);
        # on Vertex AI the deploy needs no such grant (Vertex pulls with its service agent).
        held.add("cloud_run_docker_hub")
    if templates:
        held.add("templates")
    if image:
        held.add("image")
    return held


def bindings(ids: Identities, held: set[str], *, who: set[str] | None = None) -> list[Binding]:
    """The grants the policy asks for: every rule whose condition holds, for the identities that are known."""
    out: list[Binding] = []
    seen: set[tuple[str, str, str]] = set()
    for rule in RULES:
        if rule.when not in held or (who is not None and rule.who not in who):
            continue
        email = ids.email(rule.who)
        if not email:
            continue
        for resource in ids.resources(rule.on):
            key = (member_of(email), rule.role, resource)
            if key not in seen:
                seen.add(key)
                out.append(Binding(member_of(email), rule.role, resource, rule))
    return out
