"""Artifact Registry as the emulator serves it, and the rules on serving images that depend on it: the Docker Hub
remote repository `vlp setup` creates (repositories.get and repositories.create, state in STATE_DIR/
artifact_registry.json; its IAM policy, getIamPolicy / setIamPolicy / testIamPermissions, kept in iam.py's policy
store), which images Vertex AI takes at upload, which it (and Cloud Run) can pull, and who may deploy a Cloud Run
revision of an image in it.

Each rule is one function with the source that states it (docs/vertex-contract.md lists them). A rule whose exact
error text no source gives says "unverified": the emulator refuses anyway, so the pipeline cannot come to depend on
what Google would refuse.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from pathlib import Path
from typing import Any

from vlp.components.serving.images import REMOTE_REPOSITORY_NAME, multi_region
from vlp.pipelines.local.emulator.core import _now, _Route
from vlp.pipelines.local.emulator.errors import ApiError
from vlp.pipelines.local.emulator.iam import denied, member

Answer = tuple[int, bytes, str, dict[str, str]]

STATE_FILE = "artifact_registry.json"
_TYPE = "type.googleapis.com/google.devtools.artifactregistry.v1."
# Repository's fields (google/devtools/artifactregistry/v1/repository.proto, message Repository), as JSON names.
_REPOSITORY_FIELDS = {
    "name", "format", "description", "labels", "createTime", "updateTime", "kmsKeyName", "mode", "cleanupPolicies",
    "sizeBytes", "satisfiesPzs", "cleanupPolicyDryRun", "mavenConfig", "dockerConfig", "virtualRepositoryConfig",
    "remoteRepositoryConfig", "vulnerabilityScanningConfig", "disallowUnspecifiedMode", "satisfiesPzi", "registryUri",
}  # fmt: skip
_OUTPUT_ONLY = {"name", "createTime", "updateTime", "sizeBytes", "satisfiesPzs", "satisfiesPzi", "registryUri"}
_FORMATS = {"DOCKER", "MAVEN", "NPM", "APT", "YUM", "PYTHON", "KFP", "GO", "GENERIC"}  # Repository.Format
_MODES = {"STANDARD_REPOSITORY", "VIRTUAL_REPOSITORY", "REMOTE_REPOSITORY"}  # Repository.Mode
# RemoteRepositoryConfig's fields and its remote_source oneof (one per format).
_REMOTE_FIELDS = {"description", "upstreamCredentials", "disableUpstreamValidation", "commonRepository"}
_REMOTE_SOURCES = {
    "dockerRepository": "DOCKER",
    "mavenRepository": "MAVEN",
    "npmRepository": "NPM",
    "pythonRepository": "PYTHON",
    "aptRepository": "APT",
    "yumRepository": "YUM",
}
# Artifact Registry's repository ids: lowercase letters, digits and hyphens, from a letter, at most 63
# (artifact-registry/docs/repositories/create-repos, "Repository names").
_REPOSITORY_ID = re.compile(r"[a-z]([a-z0-9-]{0,61}[a-z0-9])?")
# An image on Artifact Registry's Docker hosts: LOCATION-docker.pkg.dev/PROJECT/REPOSITORY/PATH.
_AR_IMAGE = re.compile(r"(?P<location>[a-z0-9-]+)-docker\.pkg\.dev/(?P<project>[^/]+)/(?P<repository>[^/]+)/.+")


# ----------------------------------------------------------------------------- state


# Kept as side_apis keeps its secrets and quotas (read whole, written whole then renamed); its helpers are not imported
# because side_apis imports this module for the route.
_STATE_LOCK = threading.Lock()


def _state_path(emu: Any) -> Path:
    return Path(emu.state_dir) / STATE_FILE


def _read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {"repositories": {}}


def _write_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(state, indent=1))
    partial.replace(path)


def repositories(emu: Any) -> dict[str, dict[str, Any]]:
    """Every repository the emulator holds, by full name (projects/P/locations/L/repositories/R)."""
    return dict(_read_state(_state_path(emu)).get("repositories") or {})


def create_repository(emu: Any, name: str, repository: dict[str, Any]) -> dict[str, Any]:
    """Store a repository (what repositories.create does once its request is valid); ALREADY_EXISTS if it is there.
    Also how a test seeds one behind the API's back."""
    with _STATE_LOCK:
        state = _read_state(_state_path(emu))
        stored = state.setdefault("repositories", {})
        if name in stored:
            # gcloud prints Google's answer as "ALREADY_EXISTS: the repository already exists".
            raise ApiError("ALREADY_EXISTS", "the repository already exists")
        now = _now()
        stored[name] = {**repository, "name": name, "createTime": now, "updateTime": now}
        _write_state(_state_path(emu), state)
        return dict(stored[name])


# ----------------------------------------------------------------------------- the API


def handle(
    emu: Any,
    method: str,
    project: str,
    location: str,
    repository_id: str | None,
    query: dict[str, list[str]],
    body: bytes,
) -> Answer:
    """repositories.get (GET .../repositories/R) and repositories.create (POST .../repositories?repositoryId=R),
    as google/devtools/artifactregistry/v1/service.proto binds them; create answers an Operation that is done at
    once, its response the Repository (Google's finishes in seconds; clients poll it)."""
    try:
        parent = f"projects/{project}/locations/{location}"
        if repository_id is not None and method == "GET":
            found = repositories(emu).get(f"{parent}/repositories/{repository_id}")
            if found is None:
                # Google's generic NOT_FOUND text; the exact words for a repository are unverified.
                raise ApiError("NOT_FOUND", "Requested entity was not found.")
            return _json(found)
        if repository_id is None and method == "POST":
            return _json(_create(emu, parent, query, body))
        raise ApiError("NOT_FOUND", f"The emulator does not serve {method} on Artifact Registry {parent} repositories.")
    except ApiError as err:
        return err.http_code, err.body(), "application/json", {}


def _create(emu: Any, parent: str, query: dict[str, list[str]], body: bytes) -> dict[str, Any]:
    repository_id = (query.get("repositoryId") or query.get("repository_id") or [""])[0]
    if not _REPOSITORY_ID.fullmatch(repository_id):
        raise ApiError(
            "INVALID_ARGUMENT",
            f"repository_id {repository_id!r} is invalid: use 1-63 lowercase letters, digits or hyphens, starting with "
            "a letter and ending with a letter or digit.",
        )
    repository = _parse_repository(body)
    created = create_repository(emu, f"{parent}/repositories/{repository_id}", repository)
    return {
        "name": f"{parent}/operations/{uuid.uuid4()}",
        "metadata": {"@type": _TYPE + "OperationMetadata"},
        "done": True,
        "response": {"@type": _TYPE + "Repository", **created},
    }


def _parse_repository(body: bytes) -> dict[str, Any]:
    """The request's Repository, refused as Google's JSON front end refuses a field the message lacks; a remote
    repository must name an upstream of its own format (repository.proto: RemoteRepositoryConfig.remote_source)."""
    data = {_camel(k): v for k, v in _body(body).items()}
    _known(data, _REPOSITORY_FIELDS, "repository")
    repository = {k: v for k, v in data.items() if k not in _OUTPUT_ONLY}
    fmt = repository.get("format", "FORMAT_UNSPECIFIED")
    if fmt not in _FORMATS:
        raise ApiError(
            "INVALID_ARGUMENT", f"Invalid value at 'repository.format' ({fmt!r}): use one of {sorted(_FORMATS)}."
        )
    mode = repository.get("mode", "STANDARD_REPOSITORY")
    if mode not in _MODES:
        raise ApiError(
            "INVALID_ARGUMENT", f"Invalid value at 'repository.mode' ({mode!r}): use one of {sorted(_MODES)}."
        )
    remote = repository.get("remoteRepositoryConfig")
    if mode == "REMOTE_REPOSITORY":
        if not isinstance(remote, dict):
            raise ApiError("INVALID_ARGUMENT", "A remote repository needs remote_repository_config (its upstream).")
        remote = {_camel(k): v for k, v in remote.items()}
        _known(remote, _REMOTE_FIELDS | set(_REMOTE_SOURCES), "repository.remote_repository_config")
        sources = [k for k in remote if k in _REMOTE_SOURCES]
        if len(sources) != 1 or _REMOTE_SOURCES[sources[0]] != fmt:
            raise ApiError(
                "INVALID_ARGUMENT",
                f"remote_repository_config must name one upstream of format {fmt} (found {sources or 'none'}).",
            )
        if sources[0] == "dockerRepository":
            docker = {_camel(k): v for k, v in (remote["dockerRepository"] or {}).items()}
            _known(
                docker,
                {"publicRepository", "customRepository"},
                "repository.remote_repository_config.docker_repository",
            )
            if "customRepository" not in docker and docker.get("publicRepository") != "DOCKER_HUB":
                raise ApiError(
                    "INVALID_ARGUMENT",
                    "docker_repository.public_repository must be DOCKER_HUB (RemoteRepositoryConfig.DockerRepository."
                    "PublicRepository), or name a custom_repository.",
                )
        repository["remoteRepositoryConfig"] = remote
    elif remote is not None:
        raise ApiError("INVALID_ARGUMENT", f"remote_repository_config is only for REMOTE_REPOSITORY, not {mode}.")
    return repository


def _camel(key: str) -> str:
    return re.sub(r"_([a-z])", lambda m: m.group(1).upper(), key)


def _known(data: dict[str, Any], fields: set[str], where: str) -> None:
    for key in data:
        if key not in fields:
            raise ApiError(
                "INVALID_ARGUMENT",
                f"Invalid JSON payload received. Unknown name \"{key}\" at '{where}': Cannot find field.",
            )


def _json(data: Any) -> Answer:
    return 200, json.dumps(data).encode(), "application/json", {}


# ----------------------------------------------------------------------------- a repository's IAM policy

# google/devtools/artifactregistry/v1/service.proto binds them: GetIamPolicy `get: "/v1/{resource=projects/*/
# locations/*/repositories/*}:getIamPolicy"`, SetIamPolicy and TestIamPermissions `post: ...:setIamPolicy` /
# `...:testIamPermissions` with body "*". The policy lives in iam.py's store (etag checked on set as for the other
# policies) and grants on the repository as a project binding does (IamService.allowed: the repository, then its
# project). authorize() has checked the caller (iam_methods.py METHOD_TABLE) before these run.
_REPOSITORY_PATH = r"/v1/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)/repositories/(?P<repository>[^/:]+)"


def iam_routes(emu: Any) -> list[_Route]:
    """The routes of a repository's getIamPolicy, setIamPolicy and testIamPermissions (server.py's route table,
    through iam.py: they carry the caller, which testIamPermissions answers about)."""

    def get_policy(p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Answer:
        return _json(_public(emu.policy_of(_existing(emu, p))))

    def set_policy(p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Answer:
        name = _existing(emu, p)
        policy = _body(body).get("policy")
        if not isinstance(policy, dict):
            raise ApiError("INVALID_ARGUMENT", "policy is required (SetIamPolicyRequest.policy).")
        return _json(_public(emu.set_policy(name, policy)))

    def test_permissions(p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Answer:
        name = _existing(emu, p)
        asked = _body(body).get("permissions") or []
        scopes = [name, f"projects/{p['project']}"]
        held = [x for x in asked if emu.allowed(p["_principal"], x, scopes)]
        return _json({"permissions": held} if held else {})

    return [
        _Route("GET", _REPOSITORY_PATH + r":getIamPolicy", get_policy),
        _Route("POST", _REPOSITORY_PATH + r":setIamPolicy", set_policy),
        _Route("POST", _REPOSITORY_PATH + r":testIamPermissions", test_permissions),
    ]


def _existing(emu: Any, p: dict[str, str]) -> str:
    name = f"projects/{p['project']}/locations/{p['location']}/repositories/{p['repository']}"
    if name not in repositories(emu):
        raise ApiError("NOT_FOUND", "Requested entity was not found.")  # as repositories.get answers
    return name


def _body(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body or b"{}")
    except ValueError as exc:
        raise ApiError("INVALID_ARGUMENT", f"Invalid JSON payload received. {exc}") from None
    if not isinstance(data, dict):
        raise ApiError("INVALID_ARGUMENT", "Invalid JSON payload received. The request must be a JSON object.")
    return data


def _public(policy: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in policy.items() if not k.startswith("_")}


# ----------------------------------------------------------------------------- the rules on serving images


def registry_host(image: str) -> str:
    """The registry an image reference names: its first path component when that is a host (has a dot or a port, or
    is localhost: Docker's reference grammar), else Docker Hub."""
    first, _, rest = image.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return first.lower()
    return "docker.io"


def _pullable_host(host: str) -> bool:
    return host.endswith("-docker.pkg.dev") or host == "gcr.io" or host.endswith(".gcr.io")


def remote_path(image: str, location: str) -> str:
    """Where a Docker Hub image is reached through `vlp setup`'s remote repository (PROJECT left for the reader)."""
    path = image.split("/", 1)[1] if registry_host(image) == "docker.io" and image.startswith("docker.io/") else image
    if "/" not in path:
        path = f"library/{path}"  # Docker Hub's official images live under library/
    return f"{multi_region(location)}-docker.pkg.dev/PROJECT/{REMOTE_REPOSITORY_NAME}/{path}"


def check_upload_image(image_uri: str, location: str) -> None:
    """V-IMAGE-REGISTRY: Vertex AI serves only images from Artifact Registry (`*-docker.pkg.dev`) or Container Registry
    (`gcr.io`, `*.gcr.io`): "imageUri (Required): The Artifact Registry URI of the container image"
    (vertex-ai/docs/predictions/use-custom-container); ModelContainerSpec.image_uri "must identify an image in
    Artifact Registry or Container Registry" (aiplatform_v1 types/model.py). Refused at models.upload with
    INVALID_ARGUMENT; the exact error text (and whether Google refuses at upload or in the upload's operation) is
    unverified."""
    image = image_uri.strip()
    if not image:
        return
    host = registry_host(image)
    if _pullable_host(host):
        return
    fix = (
        f"proxy Docker Hub through an Artifact Registry remote repository and name the image there: `vlp setup` "
        f"creates {REMOTE_REPOSITORY_NAME}, through which this image is {remote_path(image, location)}"
        if host == "docker.io"
        else f"push it to an Artifact Registry repository (or proxy {host} through a remote repository)"
    )
    raise ApiError(
        "INVALID_ARGUMENT",
        f"container_spec.image_uri {image!r} is on {host}: Vertex AI pulls serving images only from Artifact Registry "
        f"(LOCATION-docker.pkg.dev) or Container Registry (gcr.io). Fix: {fix}.",
    )


def repository_of(emu: Any, image_uri: str, project: str) -> str:
    """The full name of the Artifact Registry repository an image is in, for an image in `project` (the deploying
    project) or in any project the emulator holds repositories in; "" otherwise. Images in other projects (Google's
    public `vertex-ai`, `deeplearning-platform-release`) are taken as they are."""
    match = _AR_IMAGE.fullmatch(image_uri.strip())
    if match is None:
        return ""
    name = f"projects/{match['project']}/locations/{match['location']}/repositories/{match['repository']}"
    ours = match["project"] == project or any(n.startswith(f"projects/{match['project']}/") for n in repositories(emu))
    return name if ours else ""


def missing_repository(emu: Any, image_uri: str, project: str) -> str:
    """The full name of the repository an image names (repository_of) when the emulator does not have it; "" when
    it has it, or when the image is not one the emulator decides on."""
    name = repository_of(emu, image_uri, project)
    return name if name and name not in repositories(emu) else ""


def _fix(name: str) -> str:
    if name.endswith(f"/repositories/{REMOTE_REPOSITORY_NAME}"):
        return f"run `vlp setup` for the project: it creates {REMOTE_REPOSITORY_NAME}, the Docker Hub remote repository"
    return "create the repository and push the image to it, or name an image in a repository that exists"


def check_vertex_pull(emu: Any, image_uri: str, project: str) -> None:
    """V-IMAGE-PULL: Vertex AI pulls the serving image with its service agent ("Vertex AI uses the default service
    account to pull images", vertex-ai/docs/general/custom-service-account), which reads its own project's
    repositories (roles/aiplatform.serviceAgent holds artifactregistry.repositories.downloadArtifacts; "Google Cloud
    runtime environments ... have preconfigured access to repositories in the same project", artifact-registry/docs/
    deploy). An image in a repository that does not exist cannot be pulled: the deploy fails (FAILED_PRECONDITION
    here; Google's exact status and text are unverified)."""
    name = missing_repository(emu, image_uri, project)
    if name:
        raise ApiError(
            "FAILED_PRECONDITION",
            f"Model server never started: Vertex AI could not pull the image {image_uri}: repository not found "
            f"({name} does not exist). Fix: {_fix(name)}.",
        )


def check_run_pull(emu: Any, image_uri: str, project: str) -> None:
    """V-RUN-IMAGE-PULL: Cloud Run imports the image when a revision is deployed (run/docs/deploying: "The container
    image is imported by Cloud Run when deployed"), as its service agent, which reads its own project's repositories
    ("If your repositories are in a different project, you must grant Artifact Registry Reader permissions to the
    Cloud Run Service Agent", artifact-registry/docs/integrate-cloud-run; roles/run.serviceAgent holds
    artifactregistry.repositories.downloadArtifacts). An image in a repository that does not exist fails the revision
    with "Image '…' not found" (gcloud run deploy's message; the rest of the text is ours)."""
    name = missing_repository(emu, image_uri, project)
    if name:
        raise ApiError(
            "FAILED_PRECONDITION",
            f"Image '{image_uri}' not found. The Artifact Registry repository {name} does not exist. Fix: {_fix(name)}.",
        )


DOWNLOAD = "artifactregistry.repositories.downloadArtifacts"


def check_run_deployer(emu: Any, principal: str, template: dict[str, Any], project: str) -> None:
    """V-RUN-IMAGE-READER: whoever creates a Cloud Run revision must be able to read its images: "To deploy to Cloud
    Run, you must have the Artifact Registry Reader role (roles/artifactregistry.reader) on the project or repository
    containing the images you want to deploy and the Cloud Run deployment permissions. If your repositories are in a
    different project, you must grant Artifact Registry Reader permissions to the Cloud Run Service Agent"
    (artifact-registry/docs/integrate-cloud-run). roles/run.developer holds no artifactregistry permission, so the
    pipeline's account needs roles/artifactregistry.reader on the serving repository (components/iam/policy.py, the
    serving_repository rule; `vlp setup` grants it). Checked for each container image of the revision in a repository
    of the deploying project (repository_of): the caller must hold artifactregistry.repositories.downloadArtifacts
    (in roles/artifactregistry.reader) on the repository or its project, whether or not the repository exists, as
    Google's 403 "(or it may not exist)" does not tell; else 403 PERMISSION_DENIED. Images in other projects (Google's
    public ones) are not checked. Refused at services.create / services.patch, before the revision exists: whether
    Google refuses the request or fails the revision, and its exact text, are unverified (the message is Google's
    IAM denial followed by ours)."""
    for container in template.get("containers") or []:
        image = str(container.get("image") or "")
        name = repository_of(emu, image, project)
        if not name or emu.allowed(principal, DOWNLOAD, [name, f"projects/{name.split('/')[1]}"]):
            continue
        _, repo_project, _, location, _, repository = name.split("/")
        gcloud = (
            f"gcloud artifacts repositories add-iam-policy-binding {repository} --location {location} "
            f'--project {repo_project} --member "{member(principal)}" --role roles/artifactregistry.reader'
        )
        google = denied(DOWNLOAD, f"//artifactregistry.googleapis.com/{name}", "artifactregistry.googleapis.com")
        raise ApiError(
            "PERMISSION_DENIED",
            f"{google.message} {principal} deploys the image {image} to Cloud Run, which needs {DOWNLOAD} on its "
            f"repository {name}. Fix: grant roles/artifactregistry.reader on the repository (run `vlp setup`, which "
            f"grants it to the pipeline's account; or {gcloud}).",
            details=google.details,
        )
