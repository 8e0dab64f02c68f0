"""Calling a private Cloud Run service as the step's own account (an ID token from IAM Credentials), the one-token
health probe, and the no-op check preflight makes: kept apart from service.py so preflight's embedded code
does not carry the deploy, promote and clean-up logic (kfp passes a step's code as one argument, capped at 128 KiB)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlp.components.deployment import Deployment

log = logging.getLogger("vlp.cloud_run")


def _clients(deployment: Deployment) -> tuple[Any, Any]:
    from vlp.components.cloud_run.service_spec import revisions_client, services_client

    api = deployment.api_endpoint
    return services_client(api), revisions_client(api)


def get_service(services: Any, name: str) -> Any:
    from google.api_core import exceptions

    try:
        return services.get_service(name=name)
    except exceptions.NotFound:
        return None


def unchanged_service(deployment: Deployment) -> str | None:
    """A description of the revision that already serves exactly this deployment at 100% and answers, or None."""
    from vlp.components.cloud_run.service_spec import service_name, spec_hash
    from vlp.components.runtime import LABEL_REVISION, LABEL_SPEC

    sha = deployment.revision_sha
    if not sha:
        return None
    services, revisions = _clients(deployment)
    name = service_name(deployment)
    service = get_service(services, name)
    if service is None:
        return None
    serving = [t for t in service.traffic_statuses if t.percent == 100]
    if not serving:
        return None
    revision = revisions.get_revision(name=f"{name}/revisions/{serving[0].revision}")
    wanted = spec_hash(deployment)
    if revision.labels.get(LABEL_REVISION) != sha[:12].lower() or revision.labels.get(LABEL_SPEC) != wanted:
        return None
    if not answers(deployment, service.uri):
        log.info("revision %s matches but does not answer: redeploying", serving[0].revision)
        return None
    return f"{name} already serves revision {serving[0].revision} (weights {sha[:12]}, spec {wanted}) and answers"


def id_token_headers(audience: str) -> dict[str, str]:
    """An Authorization header with an ID token for the service, minted for the step's own account.

    Through IAM Credentials `generateIdToken` (the documented way for a service account to get an ID token, which
    needs iam.serviceAccounts.getOpenIdToken on itself): no source says a Vertex AI worker's metadata server serves
    `identity?audience=`. Without a metadata account (a developer's key file in GOOGLE_APPLICATION_CREDENTIALS),
    google.oauth2.id_token.fetch_id_token."""
    import google.auth.exceptions
    import google.auth.transport.requests
    import google.oauth2.id_token

    from vlp.components.clients import own_account
    from vlp.components.runtime import StepError

    account = own_account()
    if account:
        return {"Authorization": f"Bearer {_generate_id_token(account, audience)}"}
    try:
        token = google.oauth2.id_token.fetch_id_token(google.auth.transport.requests.Request(), audience)
    except google.auth.exceptions.GoogleAuthError as exc:
        raise StepError(
            f"cannot get an ID token for {audience} ({str(exc)[:200]}): a private Cloud Run service takes only ID "
            "tokens, which a service account mints (the metadata server on Vertex AI, or a key file in "
            "GOOGLE_APPLICATION_CREDENTIALS); user credentials from `gcloud auth application-default login` cannot"
        ) from None
    return {"Authorization": f"Bearer {token}"}


def _generate_id_token(account: str, audience: str) -> str:
    """IAM Credentials projects.serviceAccounts.generateIdToken for `account`, called as the step itself."""
    from google.auth.transport.requests import AuthorizedSession

    from vlp.components.clients import api_endpoint, credentials
    from vlp.components.runtime import StepError
    from vlp.components.serving.calls import is_local

    host = api_endpoint()
    base = host.rstrip("/") if is_local(host) else "https://iamcredentials.googleapis.com"
    creds = credentials(host)
    if creds is None:
        import google.auth

        creds, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
    response = AuthorizedSession(creds).post(
        f"{base}/v1/projects/-/serviceAccounts/{account}:generateIdToken",
        json={"audience": audience, "includeEmail": True},
        timeout=30,
    )
    if response.status_code == 403:
        raise StepError(
            f"{account} may not mint an ID token for itself (IAM Credentials generateIdToken answered 403: "
            f"{_error_message(response)}). The smoke test calls the private service with one: grant it "
            "roles/iam.serviceAccountOpenIdTokenCreator on itself: gcloud iam service-accounts add-iam-policy-binding "
            f"{account} --member serviceAccount:{account} --role roles/iam.serviceAccountOpenIdTokenCreator "
            "(or run `vlp setup`)"
        )
    if response.status_code >= 400:
        raise StepError(
            f"IAM Credentials generateIdToken for {account} answered {response.status_code}: "
            f"{_error_message(response)}"
        )
    return str(response.json()["token"])


def _error_message(response: Any) -> str:
    try:
        return str(response.json()["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return response.text[:300]


def id_token_session(audience: str) -> Any:
    import requests

    session = requests.Session()
    session.headers.update(id_token_headers(audience))
    return session


# A scaled-to-zero GPU revision takes minutes to start, and Cloud Run answers 429 ("no available instance") or 503
# meanwhile: the no-op probe waits that long before it calls an unchanged, healthy service broken and redeploys it.
COLD_START_WAIT_S = 600


def answers(deployment: Deployment, url: str, wait_s: float = COLD_START_WAIT_S, backoff_s: float = 2.0) -> bool:
    """A short chat request to the service answers 200 (the no-op check's health probe), 429s and 503s of a cold
    start retried for up to `wait_s`."""
    import time

    from vlp.components.serving.engines import served_model_name

    body = {"model": served_model_name(deployment), "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
    deadline = time.monotonic() + wait_s
    try:
        session = id_token_session(url)
        while True:
            status = session.post(f"{url}/v1/chat/completions", json=body, timeout=120).status_code
            if status not in (429, 503) or time.monotonic() + backoff_s > deadline:
                return status == 200
            log.info("%s answered %d (starting an instance): asking again in %.0f s", url, status, backoff_s)
            time.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 30.0)
    except Exception:  # noqa: BLE001 - any other failure just means "redeploy"
        return False


# ----------------------------------------------------------------------------- KFP shells
