"""Who is calling, and may they: the emulator's principals, IAM policies and the check every API call goes through.

- Principals: the metadata-server stand-in serves `/_md/EMAIL/computeMetadata/v1/...` (a step's GCE_METADATA_HOST
  points there), so google-auth's compute credentials fetch an access token for that service account; every request
  then carries `Authorization: Bearer TOKEN`, which the emulator maps back to the account. A call without a token
  answers 401, as Google does.
- Policies: on projects, buckets, secrets, service accounts and Artifact Registry repositories (here; the
  repositories' IAM methods are artifact_registry.py's), and on Cloud Run services (cloud_run.py keeps those). A permission on a resource is held when a binding on the resource or on its project grants a role that
  contains it.
- Facts: which permission each REST method needs and which permissions each predefined role holds (iam_methods.py,
  from components/contract/gcp-iam.json).
- Answers: 403 PERMISSION_DENIED "Permission 'P' denied on resource 'R' (or it may not exist)." with an ErrorInfo
  (reason IAM_PERMISSION_DENIED), and 403 SERVICE_DISABLED for an API turned off in the project.
Rules and sources: docs/vertex-contract.md section E.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import zlib
from pathlib import Path
from typing import Any

from vlp.pipelines.local.emulator.core import _now, _Route
from vlp.pipelines.local.emulator.errors import ApiError
from vlp.pipelines.local.emulator.iam_methods import (
    API_OF,
    UNCHECKED,
    fixture,
    method_of,
    permissions_of,
    role_permissions,
)

_PROJECT_OF_NUMBER: dict[str, str] = {}


def project_number(project: str) -> str:
    """A stable 12-digit project number for a local project id (Google assigns one per project)."""
    number = str(100_000_000_000 + zlib.crc32(project.encode()) % 900_000_000_000)
    _PROJECT_OF_NUMBER[number] = project
    return number


def vertex_service_agent(project: str) -> str:
    """The Vertex AI Service Agent: copies a Model's artifactUri at upload, resolves template tags."""
    return f"service-{project_number(project)}@gcp-sa-aiplatform.iam.gserviceaccount.com"


def custom_code_service_agent(project: str) -> str:
    """The Vertex AI Custom Code Service Agent: runs custom jobs (a pipeline's steps) without an account, pulls their
    images, resolves template tags (python-aiplatform#2398)."""
    return f"service-{project_number(project)}@gcp-sa-aiplatform-cc.iam.gserviceaccount.com"


# Each service agent's automatic project role (iam-dataset roles/aiplatform.serviceAgent, customCodeServiceAgent).
SERVICE_AGENT_ROLES = {
    "roles/aiplatform.serviceAgent": vertex_service_agent,
    "roles/aiplatform.customCodeServiceAgent": custom_code_service_agent,
}


def compute_default_account(project: str) -> str:
    """The Compute Engine default service account: a Cloud Run revision's identity when it names none."""
    return f"{project_number(project)}-compute@developer.gserviceaccount.com"


def member(principal: str) -> str:
    """The IAM member string of a principal's email."""
    return f"serviceAccount:{principal}" if principal.endswith("gserviceaccount.com") else f"user:{principal}"


def denied(permission: str, resource: str, domain: str = "") -> ApiError:
    """Google's 403 for a missing permission (the resource may also not exist: Google does not say which)."""
    return ApiError(
        "PERMISSION_DENIED",
        f"Permission '{permission}' denied on resource '{resource}' (or it may not exist).",
        details=[
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "IAM_PERMISSION_DENIED",
                "domain": domain or "iam.googleapis.com",
                "metadata": {"permission": permission, "resource": resource},
            }
        ],
    )


class IamService:
    """Principals, policies and the per-call check; mixed into the Emulator (server.py)."""

    _lock: Any
    _run_policies: dict[str, dict[str, Any]]
    _iam_policies: dict[str, dict[str, Any]]
    _tokens: dict[str, str]
    _disabled_apis: dict[str, list[str]]
    _upload_sessions: dict[str, str]

    # ------------------------------------------------------------------ principals

    def token_for(self, principal: str) -> str:
        """An access token for `principal` (what the metadata server hands a process running as it)."""
        with self._lock:
            for token, who in self._tokens.items():
                if who == principal:
                    return token
            token = "ya29.local-" + secrets.token_urlsafe(24)
            self._tokens[token] = principal
            self._save()
            return token

    def credentials_for(self, principal: str) -> Any:
        """google-auth credentials that call this emulator as `principal` (tests, in-process tools)."""
        from google.oauth2.credentials import Credentials

        return Credentials(token=self.token_for(principal))

    def principal_of(self, authorization: str) -> str:
        """The principal a request's Authorization header names; 401 when it names none, as Google answers."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                "UNAUTHENTICATED",
                "Request is missing required authentication credential. Expected OAuth 2 access token, login cookie "
                "or other valid authentication credential.",
            )
        principal = self._tokens.get(token.strip())
        if principal is None:
            raise ApiError(
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or "
                "other valid authentication credential.",
            )
        return principal

    # ------------------------------------------------------------------ ID tokens

    def _id_token_key(self) -> tuple[Any, bytes]:
        """The RSA key the stand-in signs ID tokens with (RS256, as Google's are), kept in the state dir so tokens
        outlive a restart of the stack; (signer, public key PEM)."""
        import os

        from google.auth import crypt

        cached = getattr(self, "_id_key", None)
        if cached is not None:
            return cached
        path = Path(self.state_dir) / "id-token-key.pem"  # type: ignore[attr-defined]
        if not path.exists():
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric import rsa

            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(pem)
        from cryptography.hazmat.primitives import serialization

        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        public = private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self._id_key = (crypt.RSASigner.from_string(path.read_bytes(), key_id=ID_TOKEN_KEY_ID), public)
        return self._id_key

    def id_token(self, principal: str, audience: str) -> str:
        """A signed ID token for `audience`, as the metadata server or IAM Credentials hand one out."""
        from google.auth import jwt

        signer, _ = self._id_token_key()
        return jwt.encode(signer, id_token_claims(principal, audience)).decode()

    def verify_id_token(self, token: str) -> dict[str, Any]:
        """The claims of an ID token this stand-in signed and that has not expired; ValueError otherwise (a forged
        signature, another key, a token past its `exp`)."""
        from google.auth import jwt

        _, public = self._id_token_key()
        return dict(jwt.decode(token, certs={ID_TOKEN_KEY_ID: public}, verify=True, clock_skew_in_seconds=10))

    # ------------------------------------------------------------------ policies

    def policy_of(self, resource: str) -> dict[str, Any]:
        """The IAM policy on a resource: projects/P, buckets/B, projects/P/secrets/S, projects/P/serviceAccounts/E,
        projects/P/locations/L/repositories/R, or a Cloud Run service's full name."""
        with self._lock:
            store = self._run_policies if "/services/" in resource else self._iam_policies
            found = store.get(resource)
            if found:
                return found
            bindings: list[dict[str, Any]] = []
            if re.fullmatch(r"projects/[^/]+", resource):
                # A project's Vertex AI service agents hold their roles from the start: Google grants them when the
                # API is enabled (vertex-ai/docs/general/access-control, "Service agents"), and they show in the
                # project's policy. The policy grants them only what these roles lack.
                project = resource.split("/", 1)[1]
                bindings = [
                    {"role": role, "members": [f"serviceAccount:{agent(project)}"]}
                    for role, agent in SERVICE_AGENT_ROLES.items()
                ]
            return {"version": 1, "bindings": bindings, "etag": base64.b64encode(b"\0").decode()}

    def set_policy(self, resource: str, policy: dict[str, Any], *, check_etag: bool = True) -> dict[str, Any]:
        """Replace a resource's policy (etag checked as setIamPolicy does); roles the fixture does not know are
        refused, since the emulator could not say what they grant."""
        with self._lock:
            current = self.policy_of(resource)
            if check_etag and policy.get("etag") and policy["etag"] != current["etag"]:
                raise ApiError("ABORTED", "There were concurrent policy changes: get the policy again and retry.")
            for binding in policy.get("bindings") or []:
                if binding.get("role") not in fixture()["roles"]:
                    raise ApiError(
                        "INVALID_ARGUMENT",
                        f"Role {binding.get('role')} is not known to the local emulator (components/contract/"
                        "gcp-iam.json): add it to scripts/iam_fixture.py ROLES and regenerate the fixture.",
                    )
            stored = {
                "version": policy.get("version", 1),
                "bindings": [
                    {"role": b["role"], "members": sorted(set(b.get("members") or []))}
                    for b in policy.get("bindings") or []
                    if b.get("members")
                ],
                "etag": base64.b64encode(_now().encode()).decode(),
            }
            store = self._run_policies if "/services/" in resource else self._iam_policies
            # Facts kept beside a policy (a bucket's project) outlive its replacement.
            stored.update({k: v for k, v in (store.get(resource) or {}).items() if k.startswith("_")})
            store[resource] = stored
            self._save()
            return stored

    def grant(self, resource: str, role: str, principal_member: str) -> None:
        """Add one binding (what `gcloud ... add-iam-policy-binding` does)."""
        with self._lock:
            policy = self.policy_of(resource)
            bindings = [dict(b) for b in policy.get("bindings") or []]
            for b in bindings:
                if b["role"] == role:
                    b["members"] = sorted(set(b["members"]) | {principal_member})
                    break
            else:
                bindings.append({"role": role, "members": [principal_member]})
            self.set_policy(resource, {"bindings": bindings}, check_etag=False)

    def revoke(self, resource: str, role: str, principal_member: str) -> None:
        """Remove one binding (what `gcloud ... remove-iam-policy-binding` does)."""
        with self._lock:
            policy = self.policy_of(resource)
            kept = [
                {"role": b["role"], "members": [m for m in b["members"] if m != principal_member]}
                if b["role"] == role
                else b
                for b in policy.get("bindings") or []
            ]
            self.set_policy(resource, {"bindings": kept}, check_etag=False)

    def allowed(self, principal: str, permission: str, resources: list[str]) -> bool:
        """Whether a binding on any of `resources` (the resource, then its project) grants `permission`."""
        members = {"allUsers"} | ({member(principal), "allAuthenticatedUsers"} if principal else set())
        with self._lock:
            for resource in resources:
                for b in self.policy_of(resource).get("bindings") or []:
                    if permission not in role_permissions(b["role"]):
                        continue
                    granted = set(b.get("members") or [])
                    if members & granted or any(self._convenience(principal, m) for m in granted):
                        return True
        return False

    def _convenience(self, principal: str, value: str) -> bool:
        """A bucket's convenience members (projectOwner:P, projectEditor:P, projectViewer:P): whoever holds that
        basic role on the project (Cloud Storage docs, "IAM roles for Cloud Storage", convenience values)."""
        kind, _, project = value.partition(":")
        role = {"projectOwner": "roles/owner", "projectEditor": "roles/editor", "projectViewer": "roles/viewer"}.get(
            kind
        )
        if not role or not principal:
            return False
        return any(
            b["role"] == role and member(principal) in (b.get("members") or [])
            for b in self.policy_of(f"projects/{project}").get("bindings") or []
        )

    def record_bucket(self, bucket: str, project: str, location: str = "") -> None:
        """A bucket belongs to `project`; a new one gets Cloud Storage's default policy: the project's owners and
        editors own it and its objects, its viewers read them (Cloud Storage docs, "IAM roles for Cloud Storage":
        the convenience values a new bucket's policy grants)."""
        resource = f"buckets/{bucket}"
        with self._lock:
            entry = self._iam_policies.setdefault(resource, dict(self.policy_of(resource)))
            entry["_project"] = project
            if location:
                # fake-gcs-server puts every bucket in US-CENTRAL1; the gate keeps and reports the one asked for.
                entry["_location"] = location.upper()
            if not entry.get("bindings"):
                owners = [f"projectEditor:{project}", f"projectOwner:{project}"]
                entry["bindings"] = [
                    {"role": "roles/storage.legacyBucketOwner", "members": owners},
                    {"role": "roles/storage.legacyBucketReader", "members": [f"projectViewer:{project}"]},
                    {"role": "roles/storage.legacyObjectOwner", "members": owners},
                    {"role": "roles/storage.legacyObjectReader", "members": [f"projectViewer:{project}"]},
                ]
            self._save()

    def bucket_location(self, bucket: str) -> str:
        """The location a bucket was created in (recorded by the gate), or "" when it was not created through it."""
        with self._lock:
            return self._iam_policies.get(f"buckets/{bucket}", {}).get("_location", "")

    def bucket_project(self, bucket: str) -> str:
        """The project a bucket belongs to (recorded when it was created through the storage API)."""
        with self._lock:
            return self._iam_policies.get(f"buckets/{bucket}", {}).get("_project", "")

    def can_read_objects(self, principal: str, uri: str) -> bool:
        """Whether `principal` may list and read the objects under a gs:// URI (what a serving container does)."""
        if not getattr(self, "storage_endpoint", None):
            return True  # an emulator without Cloud Storage (API-only tests) has no bucket to decide on
        bucket = uri[5:].split("/", 1)[0]
        project = self.bucket_project(bucket)
        scopes = [f"buckets/{bucket}"] + ([f"projects/{project}"] if project else [])
        return all(self.allowed(principal, p, scopes) for p in ("storage.objects.get", "storage.objects.list"))

    # ------------------------------------------------------------------ the check

    def authorize(self, http_method: str, path: str, query: dict[str, list[str]], body: bytes, headers: Any) -> str:
        """The caller of an API request, once it may make it; raises Google's 401 / 403 otherwise. Returns "" for
        paths that are not Google APIs (the metadata server, test plumbing)."""
        if UNCHECKED.match(path):
            return ""
        found = method_of(http_method, path)
        authorization = (headers.get("Authorization") if headers is not None else "") or ""
        if found is not None and found[0].startswith("storage."):
            return self._authorize_storage(found[0], found[1], query, authorization, body)
        principal = self.principal_of(authorization)
        if found is None:
            return principal  # the route table answers 404 for what the emulator does not serve
        method_id, params = found
        if method_id == "logging.entries.list":
            params = {**params, "project": _logging_project(body)}
        api = API_OF[method_id.split(".", 1)[0]]
        project = params.get("project", "")
        if project and project != "-":
            project_number(project)  # known from now on: accounts named by its number resolve to it
        if project and project != "-" and api in self._disabled_apis.get(project, []):
            raise ApiError(
                "PERMISSION_DENIED",
                f"{_api_title(api)} has not been used in project {project_number(project)} before or it is disabled. "
                f"Enable it by visiting https://console.developers.google.com/apis/api/{api}/overview?project="
                f"{project_number(project)} then retry.",
                details=[
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": "SERVICE_DISABLED",
                        "domain": "googleapis.com",
                        "metadata": {"service": api, "consumer": f"projects/{project_number(project)}"},
                    }
                ],
            )
        resource, scopes = _resource_of(path, params, api)
        for permission in permissions_of(method_id):
            if not self.allowed(principal, permission, scopes):
                raise denied(permission, resource, api)
        mask = ",".join(query.get("updateMask") or query.get("update_mask") or [])
        if mask and not any(path.strip().startswith("template") for path in mask.split(",")):
            return principal  # an update that leaves the template alone creates no revision: no one runs as anyone
        for account in _acts_as(method_id, body, project):
            self.check_act_as(principal, account)
        return principal

    def _authorize_storage(
        self, method_id: str, params: dict[str, str], query: dict[str, list[str]], authorization: str, body: bytes = b""
    ) -> str:
        """Cloud Storage's check: the bucket's policy, then its project's; GCS words its denials its own way."""
        from vlp.pipelines.local.emulator.storage_gate import storage_denied

        try:
            principal = self.principal_of(authorization)
        except ApiError:
            principal = ""
        upload_id = (query.get("upload_id") or [""])[0]
        if upload_id:
            # "The session URI acts as an authentication token" (Cloud Storage docs, resumable uploads): the check
            # happened when the session started.
            with self._lock:
                starter = self._upload_sessions.get(upload_id)
            if starter is None:
                raise ApiError("NOT_FOUND", f"No such upload session: {upload_id}.")
            return starter
        bucket = params.get("bucket", "")
        project = (query.get("project") or [""])[0] if not bucket else self.bucket_project(bucket)
        scopes = ([f"buckets/{bucket}"] if bucket else []) + ([f"projects/{project}"] if project else [])
        what = "object" if params.get("object") or ".objects." in method_id else "bucket"
        if bucket and principal and not self.bucket_exists(bucket):
            return principal  # Cloud Storage answers 404 for a bucket that does not exist (fake-gcs-server does)
        if not principal and permissions_of(method_id):
            raise storage_denied("", permissions_of(method_id)[0], what)
        for permission in permissions_of(method_id):
            if not self.allowed(principal, permission, scopes):
                raise storage_denied(principal, permission, what)
        if method_id == "storage.objects.insert" and (query.get("ifGenerationMatch") or [""])[0] != "0":
            # Replacing an object deletes the old one: "storage.objects.delete ... also required to overwrite an
            # existing object" (Cloud Storage IAM permissions page; roles/storage.objectCreator "does not give
            # permission to ... replace objects"). Checked when the upload starts, as the other permissions are.
            name = _upload_object_name(query, body)
            if name and not self.allowed(principal, "storage.objects.delete", scopes) and self.object_exists(bucket, name):
                raise storage_denied(principal, "storage.objects.delete", what)
        return principal

    def check_act_as(self, principal: str, account: str) -> None:
        """iam.serviceAccounts.actAs on `account`: needed to make anything run as another identity. Asked even when
        the account is the caller's own (strict: no source says Google waives it; docs/vertex-contract.md E4)."""
        project = _account_project(account)
        scopes = [f"projects/{project}/serviceAccounts/{account}"] + ([f"projects/{project}"] if project else [])
        if not self.allowed(principal, "iam.serviceAccounts.actAs", scopes):
            raise ApiError(
                "PERMISSION_DENIED",
                f"Permission 'iam.serviceAccounts.actAs' denied on service account {account} (or it may not exist).",
                details=[
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": "IAM_PERMISSION_DENIED",
                        "domain": "iam.googleapis.com",
                        "metadata": {
                            "permission": "iam.serviceAccounts.actAs",
                            "resource": f"projects/-/serviceAccounts/{account}",
                        },
                    }
                ],
            )

    # ------------------------------------------------------------------ routes

    def _md_answer(self, data: Any, ctype: str) -> Any:
        body = data if isinstance(data, bytes) else json.dumps(data).encode()
        return 200, body, ctype, {"Metadata-Flavor": "Google"}

    def _md_ping(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        return self._md_answer(b"", "application/text")

    def _md_account(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        info = {
            "aliases": ["default"],
            "email": p["principal"],
            "scopes": ["https://www.googleapis.com/auth/cloud-platform"],
        }
        return self._md_answer(info, "application/json")

    def _md_email(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        return self._md_answer(p["principal"].encode(), "application/text")

    def _md_project(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        """project/project-id and project/numeric-project-id: the project the VM runs in, which google.auth.default()
        reads when no other source names one. The stand-in's VM runs in its account's project (a service account's
        email names it; the Compute Engine default account's names the number); another principal has none here."""
        principal = p["principal"]
        project = ""
        if principal.endswith(".iam.gserviceaccount.com") and "@gcp-sa-" not in principal:
            project = principal.split("@", 1)[1].split(".", 1)[0]
        elif principal.endswith("-compute@developer.gserviceaccount.com"):
            project = _PROJECT_OF_NUMBER.get(principal.split("-", 1)[0], "")
        if not project:
            raise ApiError("NOT_FOUND", f"The local metadata server knows no project for {principal}.")
        value = project_number(project) if p.get("which") == "numeric-project-id" else project
        return self._md_answer(value.encode(), "application/text")

    def _md_token(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        answer = {"access_token": self.token_for(p["principal"]), "expires_in": 3599, "token_type": "Bearer"}
        return self._md_answer(answer, "application/json")

    def _md_identity(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        audience = (query.get("audience") or [""])[0]
        if not audience:
            raise ApiError("INVALID_ARGUMENT", "audience is required")
        return self._md_answer(self.id_token(p["principal"], audience).encode(), "application/text")

    def _project_policy_get(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        return 200, json.dumps(_public(self.policy_of(f"projects/{p['project']}"))).encode(), "application/json", {}

    def _project_policy_set(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        policy = (json.loads(body or b"{}").get("policy")) or {}
        stored = self.set_policy(f"projects/{p['project']}", policy)
        return 200, json.dumps(_public(stored)).encode(), "application/json", {}

    def _project_get(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        project = p["project"]
        answer = {"projectId": project, "projectNumber": project_number(project), "lifecycleState": "ACTIVE"}
        return 200, json.dumps(answer).encode(), "application/json", {}

    def _account_policy_get(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        resource = f"projects/{_account_project(p['account'])}/serviceAccounts/{p['account']}"
        return 200, json.dumps(_public(self.policy_of(resource))).encode(), "application/json", {}

    def _account_policy_set(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        resource = f"projects/{_account_project(p['account'])}/serviceAccounts/{p['account']}"
        stored = self.set_policy(resource, (json.loads(body or b"{}").get("policy")) or {})
        return 200, json.dumps(_public(stored)).encode(), "application/json", {}

    def _generate_id_token(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        """IAM Credentials generateIdToken: an ID token for a service account, asked by a caller that holds
        iam.serviceAccounts.getOpenIdToken on it (checked in authorize through the account's policy)."""
        audience = json.loads(body or b"{}").get("audience") or ""
        if not audience:
            raise ApiError("INVALID_ARGUMENT", "audience is required.")
        return 200, json.dumps({"token": self.id_token(p["account"], audience)}).encode(), "application/json", {}

    def _enable_service(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        with self._lock:
            disabled = self._disabled_apis.get(p["project"], [])
            if p["service"] in disabled:
                disabled.remove(p["service"])
            self._save()
        done = {"name": "operations/noop.DONE_OPERATION", "done": True}
        return 200, json.dumps(done).encode(), "application/json", {}

    def _get_service_state(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        state = "DISABLED" if p["service"] in self._disabled_apis.get(p["project"], []) else "ENABLED"
        answer = {"name": f"projects/{project_number(p['project'])}/services/{p['service']}", "state": state}
        return 200, json.dumps(answer).encode(), "application/json", {}

    def _create_account(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        """IAM projects.serviceAccounts.create: the emulator keeps no account list (any email can be a principal),
        so this answers what Google would, 409 included for an account created before."""
        account_id = json.loads(body or b"{}").get("accountId", "")
        if not re.fullmatch(r"[a-z][a-z0-9-]{4,28}[a-z0-9]", account_id):
            raise ApiError("INVALID_ARGUMENT", f"accountId {account_id!r} must be 6-30 of [a-z0-9-], from a letter.")
        email = f"{account_id}@{p['project']}.iam.gserviceaccount.com"
        resource = f"projects/{p['project']}/serviceAccounts/{email}"
        with self._lock:
            if resource in self._iam_policies and self._iam_policies[resource].get("_created"):
                raise ApiError("ALREADY_EXISTS", f"Service account {account_id} already exists within project.")
            self._iam_policies.setdefault(resource, dict(self.policy_of(resource)))["_created"] = _now()
            self._save()
        answer = {
            "name": resource,
            "projectId": p["project"],
            "email": email,
            "uniqueId": str(zlib.crc32(email.encode())),
        }
        return 200, json.dumps(answer).encode(), "application/json", {}

    def _secret_policy_get(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        resource = f"projects/{p['project']}/secrets/{p['secret']}"
        return 200, json.dumps(_public(self.policy_of(resource))).encode(), "application/json", {}

    def _secret_policy_set(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        resource = f"projects/{p['project']}/secrets/{p['secret']}"
        stored = self.set_policy(resource, (json.loads(body or b"{}").get("policy")) or {})
        return 200, json.dumps(_public(stored)).encode(), "application/json", {}

    def _test_permissions(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        """testIamPermissions on a project, a service account or a secret: which of the asked permissions the
        caller holds there (a permission asked that the fixture does not know is simply not held)."""
        params = {k: v for k, v in p.items() if not k.startswith("_")}
        if params.get("secret"):
            from vlp.pipelines.local.emulator.side_apis import _read_state, _secrets_path

            if params["secret"] not in _read_state(_secrets_path(self), {}):
                raise ApiError(
                    "NOT_FOUND", f"Secret [projects/{params['project']}/secrets/{params['secret']}] not found."
                )
        _, scopes = _resource_of("", params, "")
        asked = json.loads(body or b"{}").get("permissions") or []
        held = [x for x in asked if self.allowed(p["_principal"], x, scopes)]
        return 200, json.dumps({"permissions": held} if held else {}).encode(), "application/json", {}

    def _iam_routes(self) -> list[_Route]:
        md = r"/_md/(?P<principal>[^/]+)"
        sa = r"/computeMetadata/v1/instance/service-accounts/(?:default|(?P=principal))"
        acct = r"/v1/projects/[^/]+/serviceAccounts/(?P<account>[^/:]+)"
        r = _Route
        return [
            r("GET", md + r"/?", self._md_ping),
            # google-auth asks for "default" first, then for the account by its email.
            r("GET", md + sa + r"/?", self._md_account),
            r("GET", md + sa + r"/email", self._md_email),
            r("GET", md + sa + r"/token", self._md_token),
            r("GET", md + sa + r"/identity", self._md_identity),
            r("GET", md + r"/computeMetadata/v1/project/(?P<which>project-id|numeric-project-id)", self._md_project),
            r("GET", r"/v1/projects/(?P<project>[^/:]+)", self._project_get),
            r("POST", r"/v1/projects/(?P<project>[^/:]+):getIamPolicy", self._project_policy_get),
            r("POST", r"/v1/projects/(?P<project>[^/:]+):setIamPolicy", self._project_policy_set),
            r("POST", acct + r":getIamPolicy", self._account_policy_get),
            r("POST", acct + r":setIamPolicy", self._account_policy_set),
            r("POST", acct + r":generateIdToken", self._generate_id_token),
            r("POST", r"/v1/projects/(?P<project>[^/]+)/services/(?P<service>[^/:]+):enable", self._enable_service),
            r("POST", r"/v1/projects/(?P<project>[^/]+)/serviceAccounts", self._create_account),
            r("POST", r"/v1/projects/(?P<project>[^/:]+):testIamPermissions", self._test_permissions),
            r("POST", acct + r":testIamPermissions", self._test_permissions),
            r(
                "POST",
                r"/v1/projects/(?P<project>[^/]+)/secrets/(?P<secret>[^/:]+):testIamPermissions",
                self._test_permissions,
            ),
            r(
                "GET",
                r"/v1/projects/(?P<project>[^/]+)/secrets/(?P<secret>[^/:]+):getIamPolicy",
                self._secret_policy_get,
            ),
            r(
                "POST",
                r"/v1/projects/(?P<project>[^/]+)/secrets/(?P<secret>[^/:]+):getIamPolicy",
                self._secret_policy_get,
            ),
            r(
                "POST",
                r"/v1/projects/(?P<project>[^/]+)/secrets/(?P<secret>[^/:]+):setIamPolicy",
                self._secret_policy_set,
            ),
            r("GET", r"/v1/projects/(?P<project>[^/]+)/services/(?P<service>[^/:]+)", self._get_service_state),
            # Artifact Registry repositories' policies are kept in this store too; artifact_registry.py serves their
            # routes (server.py adds them: that module imports this one).
        ]

    def _iam_control(self, method: str, path: str, body: bytes) -> tuple[int, bytes] | None:
        """Test plumbing: mint a token, read or set any policy, turn an API off or on."""
        if not path.startswith(("/_emulator/token", "/_emulator/iam", "/_emulator/apis")):
            return None
        data = json.loads(body or b"{}") if method == "POST" else {}
        if path == "/_emulator/token" and method == "POST":
            return 200, json.dumps({"token": self.token_for(data["principal"])}).encode()
        if path == "/_emulator/iam" and method == "GET":
            with self._lock:
                policies = {**self._iam_policies, **self._run_policies}
                return 200, json.dumps({k: _public(v) for k, v in policies.items()}).encode()
        if path == "/_emulator/iam" and method == "POST":
            resource = data["resource"]
            if data.get("project_of_bucket"):
                self.record_bucket(resource.split("/", 1)[1], data["project_of_bucket"], data.get("location", ""))
            if "policy" in data:
                project = self._iam_policies.get(resource, {}).get("_project")
                stored = self.set_policy(resource, data["policy"], check_etag=False)
                if project:
                    stored["_project"] = project
            return 200, json.dumps(_public(self.policy_of(resource))).encode()
        if path == "/_emulator/iam:grant" and method == "POST":
            self.grant(data["resource"], data["role"], data["member"])
            return 200, json.dumps(_public(self.policy_of(data["resource"]))).encode()
        if path == "/_emulator/iam:revoke" and method == "POST":
            self.revoke(data["resource"], data["role"], data["member"])
            return 200, json.dumps(_public(self.policy_of(data["resource"]))).encode()
        if path == "/_emulator/apis" and method == "POST":
            with self._lock:
                self._disabled_apis[data["project"]] = sorted(set(data.get("disabled") or []))
                self._save()
            return 200, b"{}"
        return None


ID_TOKEN_KEY_ID = "vlp-local"


def id_token_claims(principal: str, audience: str) -> dict[str, Any]:
    """The claims of an ID token for `audience`, as Google's identity endpoint fills them."""
    import time

    now = int(time.time())
    return {
        "aud": audience,
        "azp": principal,
        "email": principal,
        "email_verified": True,
        "exp": now + 3600,
        "iat": now,
        "iss": "https://accounts.google.com",
        "sub": str(100_000_000_000_000_000_000 + zlib.crc32(principal.encode())),
    }


def _public(policy: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in policy.items() if not k.startswith("_")}


def _api_title(api: str) -> str:
    titles = {
        "aiplatform.googleapis.com": "Vertex AI API",
        "run.googleapis.com": "Cloud Run Admin API",
        "cloudquotas.googleapis.com": "Cloud Quotas API",
        "secretmanager.googleapis.com": "Secret Manager API",
        "logging.googleapis.com": "Cloud Logging API",
        "iamcredentials.googleapis.com": "IAM Service Account Credentials API",
        "cloudresourcemanager.googleapis.com": "Cloud Resource Manager API",
        "iam.googleapis.com": "Identity and Access Management (IAM) API",
    }
    return titles.get(api, api)


def _upload_object_name(query: dict[str, list[str]], body: bytes) -> str:
    """The object an upload writes: `name` in the query (media and resumable uploads), else in the JSON metadata (a
    resumable session's start, or a multipart upload's first part)."""
    name = (query.get("name") or [""])[0]
    if name:
        return name
    match = re.search(rb'"name"\s*:\s*"((?:[^"\\]|\\.)*)"', body[:65536])
    if not match:
        return ""
    try:
        return json.loads(b'"' + match.group(1) + b'"')
    except ValueError:
        return ""


def _logging_project(body: bytes) -> str:
    """entries.list names its projects in the body (resourceNames: ["projects/P"])."""
    try:
        names = json.loads(body or b"{}").get("resourceNames") or []
    except ValueError:
        return ""
    return next((n.split("/")[1] for n in names if n.startswith("projects/")), "")


def _account_project(account: str) -> str:
    """The project a service account lives in: in its email, or, for the Compute Engine default account and the
    service agents, the project whose number the email carries."""
    number = re.fullmatch(r"(?:service-)?(\d+)(?:-compute)?@(?:developer|gcp-sa-[a-z-]+)\..*", account)
    if number:
        return _PROJECT_OF_NUMBER.get(number.group(1), "")
    match = re.fullmatch(r"[^@]+@([^.]+)\.iam\.gserviceaccount\.com", account)
    return match.group(1) if match else ""


def _resource_of(path: str, params: dict[str, str], api: str) -> tuple[str, list[str]]:
    """The full resource name a denial names, and the policies that may grant it (the resource's own, the project's)."""
    project = params.get("project", "")
    project_scope = [f"projects/{project}"] if project and project != "-" else []
    if params.get("service"):
        name = f"projects/{project}/locations/{params['location']}/services/{params['service']}"
        return f"//{api}/{name}", [name, *project_scope]
    if params.get("secret"):
        name = f"projects/{project}/secrets/{params['secret']}"
        return f"//{api}/{name}", [name, *project_scope]
    if params.get("repository"):
        # An Artifact Registry repository: its own policy (get/setIamPolicy on it), then its project's.
        name = f"projects/{project}/locations/{params['location']}/repositories/{params['repository']}"
        return f"//{api}/{name}", [name, *project_scope]
    if params.get("account"):
        account_project = _account_project(params["account"])
        name = f"projects/{account_project}/serviceAccounts/{params['account']}"
        return f"//iam.googleapis.com/{name}", [name] + ([f"projects/{account_project}"] if account_project else [])
    match = re.match(r"^/v[0-9a-z]+/(projects/.*?)(?::[a-zA-Z]+)?$", path)
    name = match.group(1) if match else (f"projects/{project}" if project else path)
    # Vertex names the location (or the project) in a denial on a collection; the path's resource otherwise.
    return f"//{api}/{name}", project_scope


def _acts_as(method_id: str, body: bytes, project: str) -> list[str]:
    """The service accounts a request would make something run as (each needs iam.serviceAccounts.actAs)."""
    if method_id not in _ACT_AS_FIELDS:
        return []
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        return []
    account = _dig(data, _ACT_AS_FIELDS[method_id])
    if not account and method_id.startswith("run."):
        # A revision that names no account runs as the Compute Engine default service account.
        account = compute_default_account(project)
    return [account] if account else []


_ACT_AS_FIELDS = {
    "aiplatform.projects.locations.endpoints.deployModel": ("deployedModel", "serviceAccount"),
    "aiplatform.projects.locations.pipelineJobs.create": ("serviceAccount",),
    # custom_job.proto CustomJobSpec.service_account: "Users submitting jobs must have act-as permission on this
    # run-as account."
    "aiplatform.projects.locations.customJobs.create": ("jobSpec", "serviceAccount"),
    "aiplatform.projects.locations.schedules.create": ("createPipelineJobRequest", "pipelineJob", "serviceAccount"),
    "run.projects.locations.services.create": ("template", "serviceAccount"),
    "run.projects.locations.services.patch": ("template", "serviceAccount"),
}


def _dig(data: Any, keys: tuple[str, ...]) -> str:
    for key in keys:
        if not isinstance(data, dict):
            return ""
        data = data.get(key) or data.get(re.sub(r"[A-Z]", lambda m: "_" + m.group(0).lower(), key))
    return data if isinstance(data, str) else ""
