"""Google Cloud clients built one way, so every step honours `--api-endpoint` and the local emulators."""

from __future__ import annotations

import os
from typing import Any

# On Vertex every variable below is unset and the clients use Google's endpoints and the
# step's service account. Locally, `vlp run --local` sets them to the emulators on loopback.
API_ENDPOINT_ENV = "VLP_API_ENDPOINT"
STORAGE_ENDPOINT_ENV = "STORAGE_EMULATOR_HOST"
# The deadline for one API call where the generated client's default is too short for a loaded service (v1beta1
# gives several Vertex methods 5 s with no retry; v1 gives the same methods none).
CALL_TIMEOUT_S = 60.0


def api_endpoint(explicit: str = "") -> str:
    """The Google API host to talk to: the explicit value, else $VLP_API_ENDPOINT, else Google's."""
    return explicit or os.environ.get(API_ENDPOINT_ENV, "")


def _is_local(endpoint: str) -> bool:
    return endpoint.startswith("http://")


def credentials(endpoint: str = "") -> Any:
    """The step's own credentials: Application Default Credentials (None) on Google; against a plain-HTTP emulator,
    compute credentials from the local metadata server (GCE_METADATA_HOST), as on a Vertex AI worker."""
    if _is_local(api_endpoint(endpoint)):
        return local_credentials()
    return None


def local_credentials() -> Any:
    """Compute Engine credentials from the metadata server GCE_METADATA_HOST names (the local stack's stand-in
    answers for the account the process runs as). Without one, anonymous: the emulator then answers 401."""
    host = sync_metadata_host()
    if not host:
        from google.auth.credentials import AnonymousCredentials

        return AnonymousCredentials()
    from google.auth import compute_engine

    return compute_engine.Credentials()


def sync_metadata_host() -> str:
    """google-auth reads GCE_METADATA_HOST once, at import; a local stack started later in the same process (the
    CLI's own calls, tests) sets it afterwards, so the module's copy follows the environment here."""
    host = os.environ.get("GCE_METADATA_HOST", "")
    if host:
        from google.auth.compute_engine import _metadata

        if _metadata._GCE_METADATA_HOST != host:
            _metadata._GCE_METADATA_HOST = host
    return host


def own_account(endpoint: str = "") -> str:
    """The service account this step runs as, from the metadata server (Vertex AI's, or the local stand-in that
    GCE_METADATA_HOST names); empty when there is none (a developer's own credentials)."""
    host = "http://metadata.google.internal"
    if _is_local(api_endpoint(endpoint)):
        host = "http://" + os.environ.get("GCE_METADATA_HOST", "metadata.google.internal")
    if host not in _ACCOUNTS:
        account = _account_at(host)
        if not account:
            return ""  # not remembered: the next call asks again
        _ACCOUNTS[host] = account
    return _ACCOUNTS[host]


# Asked once per metadata server: preflight needs it for the grant check, the deployment and the no-op probe.
_ACCOUNTS: dict[str, str] = {}


def _account_at(host: str) -> str:
    import requests

    try:
        email = requests.get(
            f"{host}/computeMetadata/v1/instance/service-accounts/default/email",
            headers={"Metadata-Flavor": "Google"},
            timeout=5,
        ).text.strip()
    except requests.RequestException:
        return ""
    return email if "@" in email else ""


def init_aiplatform(project: str, region: str, endpoint: str = "", staging_bucket: str | None = None) -> None:
    """Point the aiplatform SDK at the project, region and (when given) another API host."""
    from google.cloud import aiplatform

    host = api_endpoint(endpoint)
    kwargs: dict[str, Any] = {"project": project, "location": region}
    if staging_bucket:
        kwargs["staging_bucket"] = staging_bucket if staging_bucket.startswith("gs://") else f"gs://{staging_bucket}"
    if host:
        # REST is the transport that works over plain HTTP on loopback; it also works against Google.
        kwargs.update(api_endpoint=host, api_transport="rest", credentials=credentials(host))
    aiplatform.init(**kwargs)


def client_options(region: str | None = None, endpoint: str = "") -> dict[str, Any]:
    """Client options for GAPIC clients (Vertex services, Secret Manager, Cloud Quotas)."""
    host = api_endpoint(endpoint)
    if host:
        return {"api_endpoint": host}
    return {"api_endpoint": f"{region}-aiplatform.googleapis.com"} if region else {}


def gapic_kwargs(region: str | None = None, endpoint: str = "") -> dict[str, Any]:
    """Keyword arguments for any GAPIC client: endpoint, transport and credentials."""
    host = api_endpoint(endpoint)
    kwargs: dict[str, Any] = {"client_options": client_options(region, host)}
    if _is_local(host):
        kwargs.update(transport="rest", credentials=credentials(host))
    return kwargs


def storage_client(project: str | None = None) -> Any:
    """A google-cloud-storage client; STORAGE_EMULATOR_HOST (fake-gcs-server locally) is honoured."""
    from google.cloud import storage

    emulator = os.environ.get(STORAGE_ENDPOINT_ENV, "")
    if emulator:
        return storage.Client(
            project=project or "local",
            credentials=local_credentials(),
            client_options={"api_endpoint": emulator},
        )
    return storage.Client(project=project)


def _service_client(client_cls: Any, endpoint: str) -> Any:
    """A GAPIC client of a global service (no regional host), pointed at `endpoint` when one is set."""
    host = api_endpoint(endpoint)
    kwargs: dict[str, Any] = {}
    if host:
        kwargs["client_options"] = {"api_endpoint": host}
    if _is_local(host):
        kwargs.update(transport="rest", credentials=credentials(host))
    return client_cls(**kwargs)


def quotas_client(endpoint: str = "") -> Any:
    """A Cloud Quotas client (serving GPU quota per region)."""
    from google.cloud import cloudquotas_v1

    return _service_client(cloudquotas_v1.CloudQuotasClient, endpoint)


def logging_client(project: str, endpoint: str = "") -> Any:
    """A Cloud Logging client (model server logs of a deployed model)."""
    from google.cloud import logging as cloud_logging

    host = api_endpoint(endpoint)
    kwargs: dict[str, Any] = {"project": project}
    if host:
        kwargs.update(client_options={"api_endpoint": host}, _use_grpc=False)
    if _is_local(host):
        kwargs["credentials"] = credentials(host)
    return cloud_logging.Client(**kwargs)


def read_secret(project: str, secret: str, endpoint: str = "") -> str:
    """Read a secret's value (NAME, projects/P/secrets/NAME or .../versions/V); never logged.

    Through Secret Manager's REST method projects.secrets.versions.access with google-auth, not the GAPIC
    client: the mirror step reads one secret, and the client's gRPC stack would be a third of its install.
    Errors are google.api_core exceptions, as the client raises them (NotFound, PermissionDenied...).
    """
    import base64

    import google_crc32c
    from google.api_core import exceptions

    name = secret
    if not name.startswith("projects/"):
        name = f"projects/{project}/secrets/{name}"
    if "/versions/" not in name:
        name = f"{name}/versions/latest"
    host = api_endpoint(endpoint)
    if _is_local(host):
        from google.auth.transport.requests import AuthorizedSession

        base, session = host.rstrip("/"), AuthorizedSession(local_credentials())
    else:
        import google.auth
        from google.auth.transport.requests import AuthorizedSession

        creds, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
        base, session = f"https://{host or 'secretmanager.googleapis.com'}", AuthorizedSession(creds)
    response = session.get(f"{base}/v1/{name}:access", timeout=60)
    if response.status_code >= 400:
        raise exceptions.from_http_response(response)
    payload = response.json().get("payload") or {}
    data = base64.b64decode(payload.get("data") or "")
    expected = payload.get("dataCrc32c")
    if expected is not None and int(expected) != int.from_bytes(google_crc32c.Checksum(data).digest(), "big"):
        raise exceptions.DataLoss(f"secret {name}: the payload's CRC32C does not match; read it again")
    return data.decode("utf-8").strip()
