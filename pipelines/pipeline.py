"""The deploy DAG: preflight → mirror → register → deploy → smoke test → promote or roll back, inside an exit handler."""

from typing import Any

from kfp import dsl

from components.packaging import as_component

PIPELINE_NAME = "vlp-deploy-llm"

# Task names double as the names `--inject kill-step:NAME` and the run summary use.
STEPS = ["preflight", "mirror-weights", "register-model", "deploy-model", "smoke-test", "promote", "roll-back"]


def build_pipeline(image: str | None = None) -> Any:
    """The pipeline function; `image` swaps the public base image + embedded code for a prebuilt image."""
    from components.deploy_model import deploy_model_op
    from components.mirror_weights import mirror_weights_op
    from components.preflight import preflight_op
    from components.promote import promote_op
    from components.register_model import register_model_op
    from components.smoke_test import smoke_test_op
    from components.teardown import cleanup_op, roll_back_op

    preflight_c = as_component(preflight_op, image)
    mirror_c = as_component(mirror_weights_op, image)
    # The same mirror component as a Vertex custom job on machines with more network, for big models;
    # preflight picks the branch from the model's real size (components.mirror_weights.mirror_machine_for).
    from google_cloud_pipeline_components.v1.custom_job import create_custom_training_job_from_component

    from components.mirror_weights import mirror_machine_for

    mirror_jobs = {
        size: create_custom_training_job_from_component(
            mirror_c, display_name=f"vlp-mirror-{size}", **mirror_machine_for(weights)
        )
        for size, weights in (("n2-standard-8", 100 * 10**9), ("n2-standard-16", 1000 * 10**9))
    }
    register_c = as_component(register_model_op, image)
    deploy_c = as_component(deploy_model_op, image)
    smoke_c = as_component(smoke_test_op, image)
    promote_c = as_component(promote_op, image)
    roll_back_c = as_component(roll_back_op, image)
    cleanup_c = as_component(cleanup_op, image)

    @dsl.pipeline(name=PIPELINE_NAME)
    def deploy_llm(
        config: dict,
        project: str,
        region: str = "",
        bucket: str = "",
        service_account: str = "",
        force: bool = False,
        api_endpoint: str = "",
    ) -> None:
        """Deploy a Hugging Face model to a tested, serving Vertex AI endpoint.

        1. Preflight: read the model's real size, plan the machine shape, check quota and access.
        2. Mirror weights: stream the pinned revision from the Hub into gs://BUCKET/models/ORG/NAME/SHA/.
        3. Register: upload a Model Registry version whose container loads the weights from GCS.
        4. Deploy: create or reuse the endpoint; a redeploy goes blue/green beside the serving model.
        5. Smoke test: a chat-templated prompt through the Vertex prediction path (plus a short benchmark).
        6. Promote the new model, or roll back; an exit handler removes what a failed run created.

        Args:
            config: The deployment config (the contents of a configs/*.yaml file as JSON): model, serving,
                hardware, placement, endpoint, smoke_test and teardown sections. `vlp run` fills it in.
            project: Google Cloud project id to deploy into. No default, so nothing deploys by accident.
            region: Region to try first; empty = the config's placement.regions in order.
            bucket: GCS bucket (name or gs://name) for the mirrored weights; empty = placement.bucket.
            service_account: Service account the endpoint runs as; empty = placement.service_account.
            force: Redeploy even when the same revision and serving spec already serve healthily.
            api_endpoint: Another Google API host (an emulator); leave empty on Vertex AI.
        """
        cleanup = cleanup_c(
            project=project,
            region=region,
            config=config,
            run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
            api_endpoint=api_endpoint,
        ).set_display_name("Clean up what a failed run left")
        cleanup.set_caching_options(False)

        with dsl.ExitHandler(cleanup, name="deploy"):
            pre = preflight_c(
                project=project,
                region=region,
                bucket=bucket,
                service_account=service_account,
                config=config,
                run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
                force=force,
                api_endpoint=api_endpoint,
            ).set_display_name("Preflight: plan, quota, access")
            pre.set_caching_options(False)  # quota and endpoint state change between runs
            deployment = pre.outputs["deployment"]

            with dsl.If(pre.outputs["action"] == "deploy", name="something-changed"):
                mirrors = []
                with dsl.If(pre.outputs["mirror_on"] == "step", name="mirror-on-step"):
                    mirror = mirror_c(deployment=deployment, api_endpoint=api_endpoint).set_display_name(
                        "Mirror weights Hub → GCS"
                    )
                    mirrors.append(mirror.set_cpu_limit("4").set_memory_limit("16G"))
                for size, branch in (("n2-standard-8", dsl.Elif), ("n2-standard-16", dsl.Else)):
                    condition = (pre.outputs["mirror_on"] == size,) if branch is dsl.Elif else ()
                    with branch(*condition, name=f"mirror-on-{size}"):
                        mirrors.append(
                            mirror_jobs[size](
                                deployment=deployment,
                                api_endpoint=api_endpoint,
                                project=project,
                                location=pre.outputs["region"],
                                service_account=service_account,
                            ).set_display_name(f"Mirror weights Hub → GCS (custom job, {size})")
                        )
                for task in mirrors:
                    # The mirror's own manifest makes a repeat a no-op; KFP's cache would hide a deleted bucket.
                    task.set_caching_options(False)
                weights_uri = dsl.OneOf(*(t.outputs["weights_uri"] for t in mirrors))
                revision_sha = dsl.OneOf(*(t.outputs["revision_sha"] for t in mirrors))

                register = register_c(
                    deployment=deployment,
                    weights_uri=weights_uri,
                    revision_sha=revision_sha,
                ).set_display_name("Register model version")
                register.set_caching_options(False)

                deploy = deploy_c(deployment=deployment, model=register.outputs["model"]).set_display_name(
                    "Deploy to endpoint"
                )
                deploy.set_caching_options(False)

                smoke = smoke_c(
                    deployment=deployment,
                    endpoint=deploy.outputs["endpoint"],
                    deployed_model_id=deploy.outputs["deployed_model_id"],
                    weights_uri=weights_uri,
                    api_endpoint=api_endpoint,
                ).set_display_name("Smoke test the new deployment")
                smoke.set_caching_options(False)  # a cached smoke test would report a stale pass

                with dsl.If(smoke.outputs["verdict"] == "passed", name="smoke-passed"):
                    promote_c(
                        deployment=deployment,
                        endpoint_resource=deploy.outputs["endpoint_resource"],
                        deployed_model_id=deploy.outputs["deployed_model_id"],
                    ).set_display_name("Promote: move traffic, retire old").set_caching_options(False)
                with dsl.Else(name="smoke-failed"):
                    roll_back_c(deployment=deployment, reason=smoke.outputs["message"]).set_display_name(
                        "Roll back the new deployment"
                    ).set_caching_options(False)

    return deploy_llm


def pipeline_parameters(
    cfg: Any,
    *,
    project: str = "",
    region: str = "",
    bucket: str = "",
    service_account: str = "",
    force: bool = False,
    api_endpoint: str = "",
) -> dict[str, Any]:
    """The run-time parameter values for a config: what `vlp run` submits and `vlp check` validates."""
    return {
        "config": cfg.model_dump(mode="json", exclude_none=True),
        "project": project or cfg.placement.project,
        "region": region,
        "bucket": bucket or cfg.placement.bucket,
        "service_account": service_account or cfg.placement.service_account,
        "force": force,
        # Only an emulator's address travels in the run: on Vertex the steps use Google's regional hosts.
        "api_endpoint": api_endpoint if api_endpoint.startswith("http://") else "",
    }
