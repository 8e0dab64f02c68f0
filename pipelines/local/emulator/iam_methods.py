"""Which IAM permission each Google REST method the emulator serves needs, and which permissions each predefined role
holds: the method table (path patterns to method ids) and the facts from components/contract/gcp-iam.json
(scripts/iam_fixture.py, from iann0036/iam-dataset at a recorded commit). Rules and sources: docs/vertex-contract.md
section E."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

FIXTURE = Path(__file__).resolve().parents[3] / "components" / "contract" / "gcp-iam.json"


# The Google API each REST method family belongs to: what SERVICE_DISABLED names.
API_OF = {
    "aiplatform": "aiplatform.googleapis.com",
    "run": "run.googleapis.com",
    "secretmanager": "secretmanager.googleapis.com",
    "cloudquotas": "cloudquotas.googleapis.com",
    "logging": "logging.googleapis.com",
    "iamcredentials": "iamcredentials.googleapis.com",
    "iam": "iam.googleapis.com",
    "cloudresourcemanager": "cloudresourcemanager.googleapis.com",
    "serviceusage": "serviceusage.googleapis.com",
    "storage": "storage.googleapis.com",
    "artifactregistry": "artifactregistry.googleapis.com",
}


_V = r"/v1(?:beta1)?/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)"


# The REST operations client tries its http_options in order, and the /ui/ ones come first.
_VOPS = r"/(?:v1|v1beta1|ui)/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)(?:/[a-zA-Z]+/[^/:]+)*/operations"


_ROPS = r"/v2/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)/operations"


_RUN = r"/v2/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)/services"


_SVC = _RUN + r"/(?P<service>[^/:]+)"


_EP = _V + r"/endpoints/[^/:]+"


_AR = r"/v1/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)/repositories"


_MODEL = _V + r"/models/[^/:]+"


# (HTTP method, path, REST method id). The first match decides; every API route the emulator serves has one
# (tests/test_iam.py), so nothing is reachable without a principal. Paths are matched decoded.
METHOD_TABLE: list[tuple[str, str, str]] = [
    ("POST", _V + r"/models:upload", "aiplatform.projects.locations.models.upload"),
    ("GET", _V + r"/models", "aiplatform.projects.locations.models.list"),
    ("GET", _MODEL + r":listVersions", "aiplatform.projects.locations.models.listVersions"),
    ("GET", _MODEL, "aiplatform.projects.locations.models.get"),
    ("PATCH", _MODEL, "aiplatform.projects.locations.models.patch"),
    ("DELETE", _MODEL + r":deleteVersion", "aiplatform.projects.locations.models.deleteVersion"),
    ("DELETE", _MODEL, "aiplatform.projects.locations.models.delete"),
    ("POST", _MODEL + r":mergeVersionAliases", "aiplatform.projects.locations.models.mergeVersionAliases"),
    ("POST", _V + r"/endpoints", "aiplatform.projects.locations.endpoints.create"),
    ("GET", _V + r"/endpoints", "aiplatform.projects.locations.endpoints.list"),
    ("GET", _EP, "aiplatform.projects.locations.endpoints.get"),
    ("PATCH", _EP, "aiplatform.projects.locations.endpoints.patch"),
    ("DELETE", _EP, "aiplatform.projects.locations.endpoints.delete"),
    ("POST", _EP + r":deployModel", "aiplatform.projects.locations.endpoints.deployModel"),
    ("POST", _EP + r":undeployModel", "aiplatform.projects.locations.endpoints.undeployModel"),
    ("POST", _EP + r":mutateDeployedModel", "aiplatform.projects.locations.endpoints.mutateDeployedModel"),
    ("POST", _EP + r":predict", "aiplatform.projects.locations.endpoints.predict"),
    ("POST", _EP + r":rawPredict", "aiplatform.projects.locations.endpoints.rawPredict"),
    ("POST", _EP + r":streamRawPredict", "aiplatform.projects.locations.endpoints.streamRawPredict"),
    ("POST", _EP + r":serverStreamingPredict", "aiplatform.projects.locations.endpoints.serverStreamingPredict"),
    (
        "POST",
        _EP + r"/deployedModels/[^/:]+[:/]invoke(?:/.*)?",
        "aiplatform.projects.locations.endpoints.deployedModels.invoke.invoke",
    ),
    ("POST", _EP + r"[:/]invoke(?:/.*)?", "aiplatform.projects.locations.endpoints.invoke.invoke"),
    ("POST", _EP + r"/chat/completions", "aiplatform.projects.locations.endpoints.chat.completions"),
    ("GET", _ROPS + r"/[^/:]+", "run.projects.locations.operations.get"),
    ("POST", _ROPS + r"/[^/:]+:wait", "run.projects.locations.operations.wait"),
    ("DELETE", _ROPS + r"/[^/:]+", "run.projects.locations.operations.delete"),
    ("GET", _ROPS, "run.projects.locations.operations.list"),
    ("GET", _VOPS + r"/[^/:]+", "aiplatform.projects.locations.operations.get"),
    ("POST", _VOPS + r"/[^/:]+:wait", "aiplatform.projects.locations.operations.wait"),
    ("POST", _VOPS + r"/[^/:]+:cancel", "aiplatform.projects.locations.operations.cancel"),
    ("DELETE", _VOPS + r"/[^/:]+", "aiplatform.projects.locations.operations.delete"),
    ("GET", _VOPS, "aiplatform.projects.locations.operations.list"),
    ("POST", _V + r"/customJobs", "aiplatform.projects.locations.customJobs.create"),
    ("GET", _V + r"/customJobs", "aiplatform.projects.locations.customJobs.list"),
    ("GET", _V + r"/customJobs/[^/:]+", "aiplatform.projects.locations.customJobs.get"),
    ("POST", _V + r"/customJobs/[^/:]+:cancel", "aiplatform.projects.locations.customJobs.cancel"),
    ("DELETE", _V + r"/customJobs/[^/:]+", "aiplatform.projects.locations.customJobs.delete"),
    ("POST", _V + r"/pipelineJobs", "aiplatform.projects.locations.pipelineJobs.create"),
    ("GET", _V + r"/pipelineJobs", "aiplatform.projects.locations.pipelineJobs.list"),
    ("GET", _V + r"/pipelineJobs/[^/:]+", "aiplatform.projects.locations.pipelineJobs.get"),
    ("POST", _V + r"/pipelineJobs/[^/:]+:cancel", "aiplatform.projects.locations.pipelineJobs.cancel"),
    ("DELETE", _V + r"/pipelineJobs/[^/:]+", "aiplatform.projects.locations.pipelineJobs.delete"),
    ("POST", _V + r"/schedules", "aiplatform.projects.locations.schedules.create"),
    ("GET", _V + r"/schedules", "aiplatform.projects.locations.schedules.list"),
    ("GET", _V + r"/schedules/[^/:]+", "aiplatform.projects.locations.schedules.get"),
    ("PATCH", _V + r"/schedules/[^/:]+", "aiplatform.projects.locations.schedules.patch"),
    ("POST", _V + r"/schedules/[^/:]+:pause", "aiplatform.projects.locations.schedules.pause"),
    ("POST", _V + r"/schedules/[^/:]+:resume", "aiplatform.projects.locations.schedules.resume"),
    ("DELETE", _V + r"/schedules/[^/:]+", "aiplatform.projects.locations.schedules.delete"),
    ("POST", _RUN, "run.projects.locations.services.create"),
    ("GET", _RUN, "run.projects.locations.services.list"),
    ("GET", _SVC + r":getIamPolicy", "run.projects.locations.services.getIamPolicy"),
    ("POST", _SVC + r":setIamPolicy", "run.projects.locations.services.setIamPolicy"),
    ("POST", _SVC + r":testIamPermissions", "run.projects.locations.services.testIamPermissions"),
    ("GET", _SVC + r"/revisions", "run.projects.locations.services.revisions.list"),
    ("GET", _SVC + r"/revisions/[^/:]+", "run.projects.locations.services.revisions.get"),
    ("DELETE", _SVC + r"/revisions/[^/:]+", "run.projects.locations.services.revisions.delete"),
    ("GET", _SVC, "run.projects.locations.services.get"),
    ("PATCH", _SVC, "run.projects.locations.services.patch"),
    ("DELETE", _SVC, "run.projects.locations.services.delete"),
    (
        "GET",
        r"/v1/projects/(?P<project>[^/]+)/(?:locations/[^/]+/)?secrets/(?P<secret>[^/:]+)/versions/[^/:]+:access",
        "secretmanager.projects.secrets.versions.access",
    ),
    ("POST", r"/v1/projects/(?P<project>[^/]+)/secrets", "secretmanager.projects.secrets.create"),
    (
        "POST",
        r"/v1/projects/(?P<project>[^/]+)/secrets/(?P<secret>[^/:]+):addVersion",
        "secretmanager.projects.secrets.addVersion",
    ),
    (
        "GET",
        r"/v1/projects/(?P<project>[^/]+)/secrets/(?P<secret>[^/:]+)/versions/[^/:]+",
        "secretmanager.projects.secrets.versions.get",
    ),
    ("GET", r"/v1/projects/(?P<project>[^/]+)/secrets/(?P<secret>[^/:]+)", "secretmanager.projects.secrets.get"),
    ("DELETE", r"/v1/projects/(?P<project>[^/]+)/secrets/(?P<secret>[^/:]+)", "secretmanager.projects.secrets.delete"),
    (
        "(?:GET|POST)",
        r"/v1/projects/(?P<project>[^/]+)/secrets/(?P<secret>[^/:]+):getIamPolicy",
        "secretmanager.projects.secrets.getIamPolicy",
    ),
    (
        "POST",
        r"/v1/projects/(?P<project>[^/]+)/secrets/(?P<secret>[^/:]+):setIamPolicy",
        "secretmanager.projects.secrets.setIamPolicy",
    ),
    (
        "GET",
        r"/v1/projects/(?P<project>[^/]+)/locations/[^/]+/services/[^/]+/quotaInfos/[^/]+",
        "cloudquotas.projects.locations.services.quotaInfos.get",
    ),
    (
        "GET",
        r"/v1/projects/(?P<project>[^/]+)/locations/[^/]+/services/[^/]+/quotaInfos",
        "cloudquotas.projects.locations.services.quotaInfos.list",
    ),
    ("POST", r"/v2/entries:list", "logging.entries.list"),
    (
        "POST",
        r"/v1/projects/[^/]+/serviceAccounts/(?P<account>[^/:]+):generateIdToken",
        "iamcredentials.projects.serviceAccounts.generateIdToken",
    ),
    (
        "POST",
        r"/v1/projects/[^/]+/serviceAccounts/(?P<account>[^/:]+):generateAccessToken",
        "iamcredentials.projects.serviceAccounts.generateAccessToken",
    ),
    (
        "POST",
        r"/v1/projects/[^/]+/serviceAccounts/(?P<account>[^/:]+):getIamPolicy",
        "iam.projects.serviceAccounts.getIamPolicy",
    ),
    (
        "POST",
        r"/v1/projects/[^/]+/serviceAccounts/(?P<account>[^/:]+):setIamPolicy",
        "iam.projects.serviceAccounts.setIamPolicy",
    ),
    # Cloud Storage JSON API (storage_gate.py forwards to fake-gcs-server once the check passes).
    ("GET", r"/storage/v1/b", "storage.buckets.list"),
    ("POST", r"/storage/v1/b", "storage.buckets.insert"),
    ("GET", r"/storage/v1/b/(?P<bucket>[^/]+)/iam/testPermissions", "storage.buckets.testIamPermissions"),
    ("GET", r"/storage/v1/b/(?P<bucket>[^/]+)/iam", "storage.buckets.getIamPolicy"),
    ("PUT", r"/storage/v1/b/(?P<bucket>[^/]+)/iam", "storage.buckets.setIamPolicy"),
    ("GET", r"/storage/v1/b/(?P<bucket>[^/]+)", "storage.buckets.get"),
    ("GET", r"/storage/v1/b/(?P<bucket>[^/]+)/o", "storage.objects.list"),
    ("GET", r"/(?:download/)?storage/v1/b/(?P<bucket>[^/]+)/o/(?P<object>.+)", "storage.objects.get"),
    ("POST", r"/upload/storage/v1/b/(?P<bucket>[^/]+)/o", "storage.objects.insert"),
    ("(?:PUT|DELETE)", r"/upload/storage/v1/b/(?P<bucket>[^/]+)/o", "storage.objects.insert"),
    ("POST", r"/storage/v1/b/(?P<bucket>[^/]+)/o/(?P<object>.+)/compose", "storage.objects.compose"),
    ("PATCH", r"/storage/v1/b/(?P<bucket>[^/]+)/o/(?P<object>.+)", "storage.objects.patch"),
    ("DELETE", r"/storage/v1/b/(?P<bucket>[^/]+)/o/(?P<object>.+)", "storage.objects.delete"),
    ("POST", r"/v1/projects/(?P<project>[^/]+)/serviceAccounts", "iam.projects.serviceAccounts.create"),
    ("GET", r"/v1/projects/(?P<project>[^/:]+)", "cloudresourcemanager.projects.get"),
    (
        "POST",
        r"/v1/projects/(?P<project>[^/:]+):testIamPermissions",
        "cloudresourcemanager.projects.testIamPermissions",
    ),
    (
        "POST",
        r"/v1/projects/[^/]+/serviceAccounts/(?P<account>[^/:]+):testIamPermissions",
        "iam.projects.serviceAccounts.testIamPermissions",
    ),
    (
        "POST",
        r"/v1/projects/(?P<project>[^/]+)/secrets/(?P<secret>[^/:]+):testIamPermissions",
        "secretmanager.projects.secrets.testIamPermissions",
    ),
    ("POST", r"/v1/projects/(?P<project>[^/:]+):getIamPolicy", "cloudresourcemanager.projects.getIamPolicy"),
    ("POST", r"/v1/projects/(?P<project>[^/:]+):setIamPolicy", "cloudresourcemanager.projects.setIamPolicy"),
    ("POST", r"/v1/projects/(?P<project>[^/]+)/services/[^/:]+:enable", "serviceusage.services.enable"),
    ("GET", r"/v1/projects/(?P<project>[^/]+)/services/[^/:]+", "serviceusage.services.get"),
    # Artifact Registry (artifact_registry.py): the Docker Hub remote repository `vlp setup` creates, and its IAM
    # policy (google/devtools/artifactregistry/v1/service.proto: GetIamPolicy is a GET, Set and Test are POSTs).
    (
        "GET",
        _AR + r"/(?P<repository>[^/:]+):getIamPolicy",
        "artifactregistry.projects.locations.repositories.getIamPolicy",
    ),
    (
        "POST",
        _AR + r"/(?P<repository>[^/:]+):setIamPolicy",
        "artifactregistry.projects.locations.repositories.setIamPolicy",
    ),
    (
        "POST",
        _AR + r"/(?P<repository>[^/:]+):testIamPermissions",
        "artifactregistry.projects.locations.repositories.testIamPermissions",
    ),
    ("GET", _AR + r"/(?P<repository>[^/:]+)", "artifactregistry.projects.locations.repositories.get"),
    ("POST", _AR, "artifactregistry.projects.locations.repositories.create"),
]


_COMPILED = [(re.compile("^" + m + "$"), re.compile("^" + p + "$"), mid) for m, p, mid in METHOD_TABLE]


# Paths that are not Google APIs: the metadata server (reachable only from inside the machine on Google), the
# emulator's own test plumbing, the Hub gate, and Cloud Run service URLs (checked with the ID token: cloud_run.py).
UNCHECKED = re.compile(r"^(?:/_md/.*|/_emulator/.*|/healthz|/hf(?:/.*)?|/_run/.*)$")


@cache
def fixture() -> dict[str, Any]:
    """The role/permission facts (components/contract/gcp-iam.json)."""
    return json.loads(FIXTURE.read_text())


def permissions_of(method_id: str) -> list[str]:
    """The permissions a REST method needs."""
    return list(fixture()["methods"][method_id]["permissions"])


def role_permissions(role: str) -> set[str]:
    """The permissions a predefined role holds (of those the fixture tracks); an unknown role holds none."""
    return set(fixture()["roles"].get(role, []))


def method_of(http_method: str, path: str) -> tuple[str, dict[str, str]] | None:
    """The REST method id a request calls and its path parameters, or None for a path that is not a Google API."""
    for method, regex, method_id in _COMPILED:
        if method.match(http_method):
            match = regex.match(path)
            if match:
                return method_id, {k: v for k, v in match.groupdict().items() if v}
    return None
