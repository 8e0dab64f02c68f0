"""Who needs which role on which resource for vlp to run: the one policy that docs/iam.md shows, `vlp setup` grants,
preflight checks and the local stack runs under (nothing more is granted there)."""

from __future__ import annotations

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
        "roles/aiplatform.viewer lacks)",
        checks=(
            "aiplatform.endpoints.list",
            "aiplatform.endpoints.predict",
            "aiplatform.models.upload",
            "aiplatform.endpoints.deploy",
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
        "roles/storage.objectAdmin",
        "bucket",
        "mirror weights, smoke test, all (pipeline root)",
        "write and verify `gs://BUCKET/models/...` (and mark each verified object), overwrite the manifest, the "
        "pipeline root; read the tokenizer",
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
        "`storage.buckets.get`: the bucket's region must match the run's (roles/storage.objectAdmin has no bucket get)",
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
        "deploy",
        "the endpoint's model server runs as the pipeline SA, which reads the weights (vLLM downloads "
        "`--model=gs://...` itself); deploying as an account needs `iam.serviceAccounts.actAs` on it, asked even for "
        "the caller's own (strict: unverified whether Google waives it)",
        "vertex",
        checks=("iam.serviceAccounts.actAs",),
    ),
    Rule(
        "pipeline",
        "roles/run.admin",
        "project",
        "preflight, deploy service, promote / roll back / clean up",
        "create, update and delete the service and its revisions, and grant itself roles/run.invoker "
        "(`setIamPolicy`, which roles/run.developer lacks)",
        "cloud_run",
        checks=("run.services.create", "run.services.setIamPolicy", "run.revisions.delete"),
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
        "vertex_agent",
        "roles/storage.objectViewer",
        "bucket",
        "register model",
        "Vertex AI copies a Model's `artifactUri` at upload as its service agent",
        "tgi_vertex",
    ),
    Rule(
        "vertex_agent",
        "roles/artifactregistry.reader",
        "kfp_repository",
        "(Vertex AI Pipelines)",
        "a run from a template tag (`.../latest`) is resolved by the service agent, not the caller "
        "(python-aiplatform#2398)",
        "templates",
    ),
    Rule(
        "custom_code_agent",
        "roles/storage.objectAdmin",
        "bucket",
        "mirror weights (custom job)",
        "a GCPC custom job without a service account runs as this agent; it cannot read Secret Manager, so "
        "preflight refuses a gated model this way",
        "mirror_job_agent",
    ),
    Rule(
        "pipeline",
        "roles/artifactregistry.reader",
        "image_repository",
        "all",
        "pull the prebuilt component image",
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

# The APIs a deployment's steps call, per target (what `vlp setup` enables).
APIS = {
    "vertex": [
        "aiplatform.googleapis.com",
        "storage.googleapis.com",
        "cloudquotas.googleapis.com",
        "logging.googleapis.com",
        "iam.googleapis.com",
    ],
    "cloud_run": [
        "aiplatform.googleapis.com",
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
        }[scope]


def secret_id(secret: str) -> str:
    """The secret's id in `model.hf_token_secret` (NAME, projects/P/secrets/NAME or .../versions/V)."""
    if not secret:
        return ""
    return secret.split("/secrets/", 1)[1].split("/", 1)[0] if "/secrets/" in secret else secret


def member_of(email: str) -> str:
    """The IAM member string for an email: service accounts and agents, else a user."""
    return f"serviceAccount:{email}" if email.endswith("gserviceaccount.com") else f"user:{email}"


def conditions(cfg: Any, *, mirror_job: bool = False, templates: bool = False, image: bool = False) -> set[str]:
    """Which rule conditions hold for a deployment config (vlp.components.config.DeploymentConfig)."""
    held = {""}
    target = getattr(cfg, "target", "vertex") or "vertex"
    held.add(target)
    if cfg.model.hf_token_secret:
        held.add("gated")
    if target == "vertex" and cfg.serving.engine == "tgi":
        held.add("tgi_vertex")
    if (
        target == "cloud_run"
        and cfg.cloud_run.service_account
        and (cfg.cloud_run.service_account != cfg.placement.service_account)
    ):
        held.add("runtime_separate")
    if mirror_job and not cfg.placement.service_account:
        held.add("mirror_job_agent")
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
        email, resource = ids.email(rule.who), ids.resource(rule.on)
        if not email or not resource:
            continue
        key = (member_of(email), rule.role, resource)
        if key not in seen:
            seen.add(key)
            out.append(Binding(member_of(email), rule.role, resource, rule))
    return out
