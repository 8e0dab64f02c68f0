"""Register step: upload a Model Registry version whose serving container loads the mirrored weights from GCS."""

import logging
from dataclasses import dataclass
from typing import NamedTuple

from google_cloud_pipeline_components.types.artifact_types import VertexModel
from kfp import dsl

from vlp.components.deployment import Deployment

log = logging.getLogger("vlp.register")


@dataclass
class Registered:
    model_resource: str  # projects/P/locations/L/models/ID
    version_id: str
    created_model: bool  # a new parent model (not a new version of an existing one)


def find_parent_model(deployment: Deployment) -> str | None:
    """The Model Registry model earlier runs of this deployment registered versions under, if any."""
    from google.cloud import aiplatform_v1

    from vlp.components import clients

    region, project = deployment.region, deployment.project
    client = aiplatform_v1.ModelServiceClient(**clients.gapic_kwargs(region, deployment.api_endpoint))
    name = deployment.config.name
    request = aiplatform_v1.ListModelsRequest(
        parent=f"projects/{project}/locations/{region}", filter=f'labels.vlp-deployment="{name}"'
    )
    for model in client.list_models(request=request):
        return model.name
    return None


UPLOAD_WAIT_S = 1800
# With artifactUri set (TGI), Vertex copies the checkpoint into its own bucket before the upload finishes. No
# source gives the copy rate: 50 MB/s is a slow guess, so a 405B FP8 upload (~410 GB) gets about 2.8 h.
ARTIFACT_COPY_BYTES_PER_S = 50e6


def upload_wait_s(deployment: Deployment) -> float:
    """How long to wait for UploadModel: longer when Vertex copies the weights (TGI's artifactUri)."""
    if deployment.config.serving.engine != "tgi":
        return UPLOAD_WAIT_S
    weights = float(deployment.plan.get("weights_bytes") or 0)
    return UPLOAD_WAIT_S + weights / ARTIFACT_COPY_BYTES_PER_S


def register_model(deployment: Deployment, weights_uri: str, revision_sha: str) -> Registered:
    """Upload the model (or a new version of it) with the serving container spec from vlp.components.serving.engines."""
    from google.cloud import aiplatform_v1

    from vlp.components import clients
    from vlp.components.runtime import StepError
    from vlp.components.vertex.serving_spec import upload_model_request

    region, project = deployment.region, deployment.project
    api = deployment.api_endpoint
    client = aiplatform_v1.ModelServiceClient(**clients.gapic_kwargs(region, api))
    parent_model = find_parent_model(deployment)
    request = upload_model_request(deployment, weights_uri, revision_sha)
    if parent_model:
        # A new version of the deployment's model, not its default: `default` (what MODEL without @VERSION means to
        # every caller) moves to a version only when promote has tested and switched to it (promote.mark_promoted),
        # so a run that dies between here and promote leaves no untested version as the default.
        request.parent_model = parent_model
    log.info(
        "registering %s revision %s from %s (%s)",
        deployment.config.model.repo,
        revision_sha[:12],
        weights_uri,
        f"new version of {parent_model}" if parent_model else "new model",
    )
    try:
        response = client.upload_model(request=request).result(timeout=upload_wait_s(deployment))
    except Exception as exc:  # google.api_core errors carry the server's message
        # Vertex copies artifactUri as the Vertex AI Service Agent, not as the pipeline's account
        # (vertex-ai-samples#3710); the vLLM image reads gs:// as the endpoint's service account at deploy time.
        raise StepError(
            f"Model Registry upload of {deployment.config.model.repo} in {project}/{region} failed: {exc}. "
            "Check that the pipeline's service account has roles/aiplatform.user, and that the Vertex AI Service "
            f"Agent (service-PROJECT_NUMBER@gcp-sa-aiplatform.iam.gserviceaccount.com; gcloud projects describe "
            f"{project} --format='value(projectNumber)') can read {weights_uri} (roles/storage.objectViewer on the "
            "bucket), then re-run: the mirrored weights are kept."
        ) from None
    log.info("registered %s version %s", response.model, response.model_version_id)
    return Registered(response.model, response.model_version_id, created_model=not parent_model)


def register_model_op(
    deployment: dict,
    weights_uri: str,
    revision_sha: str,
    model: dsl.Output[VertexModel],
) -> NamedTuple("RegisterOutputs", [("model_resource", str), ("version_id", str)]):
    """Register a Model Registry version for the mirrored weights."""
    from collections import namedtuple

    from vlp.components.deployment import Deployment
    from vlp.components.runtime import checkpoint, setup_logging
    from vlp.components.vertex.register_model import register_model

    setup_logging()
    d = Deployment.parse(deployment)
    registered = register_model(d, weights_uri, revision_sha)
    versioned = f"{registered.model_resource}@{registered.version_id}"
    model.uri = f"https://{d.region}-aiplatform.googleapis.com/v1/{versioned}"
    model.metadata["resourceName"] = versioned
    checkpoint("register-model")
    return namedtuple("RegisterOutputs", ["model_resource", "version_id"])(
        registered.model_resource, registered.version_id
    )
