"""Extract, from a public machine-readable IAM dataset, the permission each REST method vlp calls needs and the
permissions each predefined role vlp grants holds, as the JSON fixture components/contract/gcp-iam.json.

Run by a developer when the policy or the methods change (CI never runs it: it needs the dataset's git repository):

    python scripts/iam_fixture.py --repo PATH/TO/iam-dataset      # a clone of github.com/iann0036/iam-dataset

- methods: `gcp/map.json` (REST method id -> permissions). The dataset leaves some methods without permissions;
  those come from METHOD_GAPS below, each with its source or marked unverified (the emulator is strict there).
- roles: `gcp/roles/ROLE.json` `includedPermissions`, cut to the permissions some method in the fixture needs (plus
  EXTRA_PERMISSIONS, which no REST method of their own checks), so the fixture stays small and reviewable.
The fixture records the dataset's commit; the emulator (pipelines/local/emulator/iam.py) and the policy tests read it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "components" / "contract" / "gcp-iam.json"
SOURCE = "github.com/iann0036/iam-dataset gcp/map.json and gcp/roles/*.json"

# Every REST method the pipeline, the CLI or the local stack's clients call (the emulator serves exactly these).
METHODS = [
    *(
        f"aiplatform.projects.locations.{m}"
        for m in (
            "models.upload",
            "models.list",
            "models.get",
            "models.listVersions",
            "models.patch",
            "models.delete",
            "models.deleteVersion",
            "models.mergeVersionAliases",
            "endpoints.create",
            "endpoints.list",
            "endpoints.get",
            "endpoints.patch",
            "endpoints.delete",
            "endpoints.deployModel",
            "endpoints.undeployModel",
            "endpoints.mutateDeployedModel",
            "endpoints.predict",
            "endpoints.rawPredict",
            "endpoints.streamRawPredict",
            "endpoints.serverStreamingPredict",
            "endpoints.invoke.invoke",
            "endpoints.deployedModels.invoke.invoke",
            "endpoints.chat.completions",
            "operations.get",
            "operations.wait",
            "operations.cancel",
            "operations.delete",
            "operations.list",
            "customJobs.create",
            "customJobs.list",
            "customJobs.get",
            "customJobs.cancel",
            "customJobs.delete",
            "pipelineJobs.create",
            "pipelineJobs.list",
            "pipelineJobs.get",
            "pipelineJobs.cancel",
            "pipelineJobs.delete",
            "schedules.create",
            "schedules.list",
            "schedules.get",
            "schedules.patch",
            "schedules.pause",
            "schedules.resume",
            "schedules.delete",
        )
    ),
    *(
        f"run.projects.locations.{m}"
        for m in (
            "services.create",
            "services.list",
            "services.get",
            "services.patch",
            "services.delete",
            "services.getIamPolicy",
            "services.setIamPolicy",
            "services.testIamPermissions",
            "services.revisions.list",
            "services.revisions.get",
            "services.revisions.delete",
            "operations.get",
            "operations.wait",
            "operations.list",
            "operations.delete",
        )
    ),
    "run.invoke",  # calling a service URL (not a REST method of the Admin API)
    "secretmanager.projects.secrets.versions.access",
    "secretmanager.projects.secrets.versions.get",
    "secretmanager.projects.secrets.create",
    "secretmanager.projects.secrets.get",
    "secretmanager.projects.secrets.delete",
    "secretmanager.projects.secrets.addVersion",
    "secretmanager.projects.secrets.getIamPolicy",
    "secretmanager.projects.secrets.setIamPolicy",
    "cloudquotas.projects.locations.services.quotaInfos.get",
    "cloudquotas.projects.locations.services.quotaInfos.list",
    "logging.entries.list",
    "iamcredentials.projects.serviceAccounts.generateIdToken",
    "iamcredentials.projects.serviceAccounts.generateAccessToken",
    "iam.projects.serviceAccounts.create",
    "iam.projects.serviceAccounts.getIamPolicy",
    "iam.projects.serviceAccounts.setIamPolicy",
    "cloudresourcemanager.projects.get",
    "cloudresourcemanager.projects.testIamPermissions",
    "iam.projects.serviceAccounts.testIamPermissions",
    "secretmanager.projects.secrets.testIamPermissions",
    "cloudresourcemanager.projects.getIamPolicy",
    "cloudresourcemanager.projects.setIamPolicy",
    "serviceusage.services.enable",
    "serviceusage.services.get",
    # `vlp setup`'s Docker Hub remote repository (components/serving/images.py REMOTE_REPOSITORY_NAME).
    "artifactregistry.projects.locations.repositories.get",
    "artifactregistry.projects.locations.repositories.create",
    # ... and its reader grant to the pipeline's account, who deploys Cloud Run revisions of the image in it.
    "artifactregistry.projects.locations.repositories.getIamPolicy",
    "artifactregistry.projects.locations.repositories.setIamPolicy",
    "artifactregistry.projects.locations.repositories.testIamPermissions",
    "storage.buckets.get",
    "storage.buckets.list",
    "storage.buckets.insert",
    "storage.buckets.getIamPolicy",
    "storage.buckets.setIamPolicy",
    "storage.buckets.testIamPermissions",
    "storage.objects.get",
    "storage.objects.insert",
    "storage.objects.list",
    "storage.objects.delete",
    "storage.objects.patch",
    "storage.objects.compose",
]

# Methods the dataset lists without a permission (or not at all): [permissions], "source or 'unverified: why'".
METHOD_GAPS: dict[str, tuple[list[str], str]] = {
    "aiplatform.projects.locations.models.listVersions": (
        ["aiplatform.models.list"],
        "unverified: the only list permission on models (Vertex AI access control lists no other)",
    ),
    "aiplatform.projects.locations.models.deleteVersion": (
        ["aiplatform.models.delete"],
        "unverified: the only delete permission on models",
    ),
    "aiplatform.projects.locations.models.mergeVersionAliases": (
        ["aiplatform.models.update"],
        "unverified: aliases are a field of the Model",
    ),
    "aiplatform.projects.locations.endpoints.mutateDeployedModel": (
        ["aiplatform.endpoints.update"],
        "unverified: it changes the endpoint's deployed model",
    ),
    "aiplatform.projects.locations.endpoints.invoke.invoke": (
        ["aiplatform.endpoints.predict"],
        "unverified: the prediction permission, as for predict and rawPredict",
    ),
    "aiplatform.projects.locations.endpoints.deployedModels.invoke.invoke": (
        ["aiplatform.endpoints.predict"],
        "unverified: the prediction permission, as for predict and rawPredict",
    ),
    "aiplatform.projects.locations.endpoints.streamRawPredict": (
        ["aiplatform.endpoints.predict"],
        "unverified: the prediction permission, as for predict and rawPredict (the dataset lists none)",
    ),
    "aiplatform.projects.locations.endpoints.serverStreamingPredict": (
        ["aiplatform.endpoints.predict"],
        "REST reference, projects.locations.publishers.models/serverStreamingPredict (v1beta1): \"Requires the "
        "following IAM permission on the endpoint resource: aiplatform.endpoints.predict\"",
    ),
    "aiplatform.projects.locations.endpoints.chat.completions": (
        ["aiplatform.endpoints.predict"],
        "Vertex AI docs, 'Call Vertex AI models by using the OpenAI library': the caller needs Vertex AI User",
    ),
    **{
        f"aiplatform.projects.locations.operations.{m}": (
            ["aiplatform.operations.list"],
            "unverified: the only operations permission roles/aiplatform.viewer holds",
        )
        for m in ("get", "wait", "cancel", "delete", "list")
    },
    "aiplatform.projects.locations.schedules.pause": (["aiplatform.schedules.update"], "unverified"),
    "aiplatform.projects.locations.schedules.resume": (["aiplatform.schedules.update"], "unverified"),
    "run.projects.locations.services.testIamPermissions": (
        [],
        "IAM docs, testIamPermissions: 'There are no permissions required for making this API call'",
    ),
    **{
        method: ([], "IAM docs, testIamPermissions: 'There are no permissions required for making this API call'")
        for method in (
            "cloudresourcemanager.projects.testIamPermissions",
            "iam.projects.serviceAccounts.testIamPermissions",
            "secretmanager.projects.secrets.testIamPermissions",
            "artifactregistry.projects.locations.repositories.testIamPermissions",
        )
    },
    "run.projects.locations.services.revisions.list": (["run.revisions.list"], "run.projects.locations.revisions.list"),
    "run.projects.locations.services.revisions.get": (["run.revisions.get"], "run.projects.locations.revisions.get"),
    "run.projects.locations.services.revisions.delete": (
        ["run.revisions.delete"],
        "run.projects.locations.revisions.delete",
    ),
    "run.invoke": (["run.routes.invoke"], "Cloud Run docs, 'Authenticating service-to-service': roles/run.invoker"),
    "cloudquotas.projects.locations.services.quotaInfos.get": (
        ["cloudquotas.quotas.get"],
        "Cloud Quotas docs, 'Cloud Quotas roles and permissions'",
    ),
    "cloudquotas.projects.locations.services.quotaInfos.list": (
        ["cloudquotas.quotas.get"],
        "Cloud Quotas docs, 'Cloud Quotas roles and permissions'",
    ),
    "logging.entries.list": (["logging.logEntries.list"], "Cloud Logging docs, 'Access control with IAM'"),
    "secretmanager.projects.secrets.setIamPolicy": (
        ["secretmanager.secrets.setIamPolicy"],
        "Secret Manager docs, 'Access control with IAM'",
    ),
    "storage.buckets.insert": (["storage.buckets.create"], "Cloud Storage docs, 'IAM permissions for JSON methods'"),
    "storage.buckets.setIamPolicy": (
        ["storage.buckets.setIamPolicy"],
        "Cloud Storage docs, 'IAM permissions for JSON methods'",
    ),
    "storage.buckets.testIamPermissions": ([], "Cloud Storage docs, 'IAM permissions for JSON methods': none"),
}

# The dataset lists a second permission Google asks only for some forms of the call; vlp never makes those.
CONDITIONAL = {
    "storage.buckets.get": (
        ["storage.buckets.get"],
        "Cloud Storage docs, 'IAM permissions for JSON methods': storage.buckets.getIamPolicy only to read ACLs "
        "(projection=full)",
    ),
    "storage.buckets.list": (["storage.buckets.list"], "the same page: getIamPolicy only to read ACLs"),
    "storage.objects.get": (["storage.objects.get"], "the same page: getIamPolicy only to read ACLs"),
    "storage.objects.list": (["storage.objects.list"], "the same page: getIamPolicy only to read ACLs"),
    "storage.objects.insert": (
        ["storage.objects.create"],
        "the same page: storage.objects.delete only to overwrite an existing object",
    ),
    "storage.objects.patch": (
        ["storage.objects.update"],
        "the same page: get/setIamPolicy only to change ACLs",
    ),
}

# Every role vlp's policy grants, and the ones its errors may suggest.
ROLES = [
    "roles/aiplatform.user",
    "roles/aiplatform.viewer",
    "roles/aiplatform.serviceAgent",
    "roles/aiplatform.customCodeServiceAgent",
    "roles/cloudquotas.viewer",
    "roles/secretmanager.secretAccessor",
    "roles/storage.objectAdmin",
    "roles/storage.objectViewer",
    "roles/storage.objectUser",
    "roles/storage.objectCreator",  # create-only: what the emulator's overwrite rule (storage.objects.delete) is tested with
    "roles/storage.bucketViewer",
    "roles/storage.legacyBucketReader",
    "roles/storage.admin",
    "roles/storage.legacyBucketOwner",
    "roles/storage.legacyBucketWriter",
    "roles/storage.legacyObjectOwner",
    "roles/storage.legacyObjectReader",
    "roles/logging.viewer",
    "roles/iam.serviceAccountUser",
    "roles/iam.serviceAccountTokenCreator",
    "roles/iam.serviceAccountOpenIdTokenCreator",
    "roles/run.admin",
    "roles/run.developer",
    "roles/run.viewer",
    "roles/run.invoker",
    "roles/resourcemanager.projectIamAdmin",
    "roles/serviceusage.serviceUsageAdmin",
    "roles/secretmanager.admin",
    "roles/iam.serviceAccountAdmin",
    "roles/artifactregistry.admin",  # creates the remote repository (`vlp setup`)
    "roles/artifactregistry.reader",
    "roles/artifactregistry.writer",
    "roles/run.serviceAgent",  # pulls a revision's image: its downloadArtifacts is recorded, not checked
    "roles/owner",
    "roles/editor",
    "roles/viewer",
]
# Permissions no REST method of their own checks: acting as an account, and pulling an image (Vertex AI and Cloud Run
# pull a serving image with their service agents, whose automatic roles hold it for their own project's repositories;
# whoever deploys a Cloud Run revision needs it on the image's repository: the emulator checks it at services.create
# and services.patch, pipelines/local/emulator/artifact_registry.py check_run_deployer).
EXTRA_PERMISSIONS = ["iam.serviceAccounts.actAs", "artifactregistry.repositories.downloadArtifacts"]


def _show(repo: Path, path: str) -> str:
    return subprocess.check_output(["git", "-C", str(repo), "show", f"HEAD:{path}"], text=True)


def build(repo: Path) -> dict:
    """The fixture's content from the dataset's git repository at its HEAD."""
    commit = subprocess.check_output(["git", "-C", str(repo), "rev-parse", "HEAD"], text=True).strip()
    apis = json.loads(_show(repo, "gcp/map.json"))["api"]
    methods: dict[str, dict] = {}
    for method in METHODS:
        api = method.split(".", 1)[0]
        listed = [p["name"] for p in ((apis.get(api, {}).get("methods", {}).get(method)) or {}).get("permissions", [])]
        if method in CONDITIONAL:
            permissions, source = CONDITIONAL[method]
            if not set(permissions) <= set(listed):
                raise SystemExit(f"{method}: the dataset now lists {listed}; review CONDITIONAL")
            methods[method] = {"permissions": permissions, "source": f"dataset lists {listed}; {source}"}
        elif listed:
            methods[method] = {"permissions": listed, "source": "dataset"}
        elif method in METHOD_GAPS:
            permissions, source = METHOD_GAPS[method]
            methods[method] = {"permissions": permissions, "source": source}
        else:
            raise SystemExit(f"{method}: no permission in the dataset and none in METHOD_GAPS")
    universe = {p for m in methods.values() for p in m["permissions"]} | set(EXTRA_PERMISSIONS)
    roles: dict[str, list[str]] = {}
    for role in ROLES:
        data = json.loads(_show(repo, f"gcp/{role}.json"))
        roles[role] = sorted(set(data.get("includedPermissions", [])) & universe)
    return {
        "source": SOURCE,
        "commit": commit,
        "note": "roles are cut to the permissions some method here needs, plus " + ", ".join(EXTRA_PERMISSIONS),
        "methods": methods,
        "roles": roles,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, required=True, help="a git clone of iann0036/iam-dataset")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out.write_text(json.dumps(build(args.repo), indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
