"""The deploy DAG: preflight → mirror → register → deploy → smoke test → promote or roll back, inside an exit handler.

One DAG, compiled as several templates: the generic one (`vlp-deploy-llm`, whose run form starts from a cheap
default) and one per preset config, whose form starts from the preset's values (vlp.components.run_form).
"""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp import dsl

from vlp.components.deployment import run_account
from vlp.components.run_form import FIELD_NAMES, FORM_FIELDS, GENERIC_DEFAULTS, form_values
from vlp.pipelines.packaging import as_component

PIPELINE_NAME = "vlp-deploy-llm"

_SUMMARY = """Deploy a Hugging Face model to a tested, serving Vertex AI endpoint.

1. Preflight: read the model's real size, plan the machine shape, check quota and access.
2. Mirror weights: stream the pinned revision from the Hub into gs://BUCKET/models/ORG/NAME/SHA/.
3. Register: upload a Model Registry version whose container loads the weights from GCS.
4. Deploy: create or reuse the endpoint; a redeploy goes blue/green beside the serving model.
5. Smoke test: a chat-templated prompt through the Vertex prediction path (plus a short benchmark).
6. Promote the new model, or roll back; an exit handler removes what a failed run created.
"""

# The console shows these under each input of the run form.
_RUN_ARGS = {
    "project": "Google Cloud project id to deploy into. No default, so nothing deploys by accident.",
    "bucket": "GCS bucket (name or gs://name) for the mirrored weights; in the same region as the endpoint.",
    "region": "Region to try first; empty = the regions field in order.",
    "service_account": "Service account the endpoint (and a big model's mirror job) runs as; empty = the default.",
    "force": "Redeploy even when the same revision and serving spec already serve healthily.",
    "api_endpoint": "Another Google API host (an emulator); leave empty on Vertex AI.",
    "config": "Optional: a deployment config (a configs/*.yaml file as JSON, or any part of one) merged over the "
    "form fields last; the way to set what the form does not show (serving flags, canary steps...).",
}
_PARAM_ORDER = ["project", "bucket", "region", "service_account", "force", "api_endpoint", "config", *FIELD_NAMES]


@dataclass
class Template:
    """One compiled template: its pipeline name, the preset it starts from (None = generic) and its form defaults."""

    name: str
    description: str
    preset: dict[str, Any] | None
    form: dict[str, Any]

    @property
    def file_name(self) -> str:
        return f"{self.name}.yaml"


def generic_template() -> Template:
    return Template(PIPELINE_NAME, _SUMMARY.splitlines()[0], None, dict(GENERIC_DEFAULTS))


def preset_template(path: Path) -> Template:
    """The template for a preset config: the preset's values are the form's defaults; project and bucket are asked."""
    from vlp.components.config import load_config

    cfg = load_config(path)
    preset = cfg.model_dump(mode="json", exclude_none=True)
    preset["placement"].pop("project", None)
    preset["placement"].pop("bucket", None)
    name = "vlp-" + re.sub(r"[^a-z0-9]+", "-", path.stem.lower()).strip("-")
    return Template(name, cfg.description or f"Deploy {cfg.model.repo}", preset, form_values(cfg))


def build_pipeline(image: str | None = None, template: Template | None = None) -> Any:
    """The pipeline function for a template (default: the generic one); `image` swaps the public base image +
    embedded code for a prebuilt image."""
    template = template or generic_template()
    preset_data = template.preset or {}
    from vlp.components.benchmark_step import benchmark_op
    from vlp.components.cleanup import cleanup_op
    from vlp.components.cloud_run.service import deploy_service_op, promote_service_op, roll_back_service_op
    from vlp.components.cloud_run.smoke_test import smoke_test_service_op
    from vlp.components.mirror.weights import mirror_weights_op
    from vlp.components.preflight import preflight_op
    from vlp.components.vertex.deploy_model import deploy_model_op
    from vlp.components.vertex.promote import promote_op
    from vlp.components.vertex.register_model import register_model_op
    from vlp.components.vertex.smoke_test import smoke_test_op
    from vlp.components.vertex.teardown import roll_back_op

    preflight_c = as_component(preflight_op, image)
    mirror_c = as_component(mirror_weights_op, image)
    # The same mirror component as a Vertex custom job on machines with more network, for big models;
    # preflight picks the branch from the model's real size (vlp.components.planning.catalog.mirror_machine_for).
    from google_cloud_pipeline_components.v1.custom_job import create_custom_training_job_from_component

    from vlp.components.planning.catalog import mirror_machine_for

    mirror_jobs = {
        size: create_custom_training_job_from_component(
            mirror_c, display_name=f"vlp-mirror-{size}", **mirror_machine_for(weights)
        )
        for size, weights in (("n2-standard-8", 100 * 10**9), ("n2-standard-16", 1000 * 10**9))
    }
    register_c = as_component(register_model_op, image)
    deploy_c = as_component(deploy_model_op, image)
    smoke_c = as_component(smoke_test_op, image)
    bench_c = as_component(benchmark_op, image)
    promote_c = as_component(promote_op, image)
    roll_back_c = as_component(roll_back_op, image)
    cleanup_c = as_component(cleanup_op, image)
    deploy_service_c = as_component(deploy_service_op, image)
    smoke_service_c = as_component(smoke_test_service_op, image)
    promote_service_c = as_component(promote_service_op, image)
    roll_back_service_c = as_component(roll_back_service_op, image)

    def deploy_llm(
        project: str,
        bucket: str,
        region: str,
        service_account: str,
        force: bool,
        api_endpoint: str,
        config: dict,
        model_repo: str,
        model_revision: str,
        hf_token_secret: str,
        engine: str,
        target: str,
        hardware: str,
        max_model_len: int,
        deployment_name: str,
        endpoint_name: str,
        endpoint_kind: str,
        regions: str,
        teardown: str,
        smoke_prompt: str,
        smoke_expect: str,
    ) -> None:
        params = locals()
        form = {name: params[name] for name in FIELD_NAMES}
        common = dict(project=project, region=region, config=config, preset=preset_data, **form)
        cleanup = cleanup_c(
            **common,
            run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
            api_endpoint=api_endpoint,
        ).set_display_name("Clean up what a failed run left")
        cleanup.set_caching_options(False)

        with dsl.ExitHandler(cleanup, name="deploy"):
            pre = preflight_c(
                **common,
                bucket=bucket,
                service_account=service_account,
                run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
                force=force,
                api_endpoint=api_endpoint,
            ).set_display_name("Preflight: plan, quota, access")
            pre.set_caching_options(False)  # quota and endpoint state change between runs
            deployment = pre.outputs["deployment"]

            with dsl.If(pre.outputs["action"] == "benchmark", name="benchmark-as-it-serves"):
                bench_c(deployment=deployment, api_endpoint=api_endpoint).set_display_name(
                    "Benchmark the deployment as it serves"
                ).set_caching_options(False)

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
                                # The account preflight decided and checked, not the raw form field: left empty, GCPC
                                # would run the job as the Custom Code Service Agent, which cannot read the Hub token.
                                service_account=pre.outputs["service_account"],
                                # The run's labels: a job left running by a run that failed is cancelled by the exit
                                # handler, which finds it by them (vlp.components.mirror.jobs).
                                labels=pre.outputs["labels"],
                            ).set_display_name(f"Mirror weights Hub → GCS (custom job, {size})")
                        )
                for task in mirrors:
                    # The mirror's own manifest makes a repeat a no-op; KFP's cache would hide a deleted bucket.
                    task.set_caching_options(False)
                weights_uri = dsl.OneOf(*(t.outputs["weights_uri"] for t in mirrors))
                revision_sha = dsl.OneOf(*(t.outputs["revision_sha"] for t in mirrors))

                with dsl.If(pre.outputs["target"] == "vertex", name="on-vertex"):
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
                with dsl.Else(name="on-cloud-run"):
                    service = deploy_service_c(deployment=deployment, weights_uri=weights_uri).set_display_name(
                        "Deploy a Cloud Run revision (0%, candidate tag)"
                    )
                    service.set_caching_options(False)
                    run_smoke = smoke_service_c(
                        deployment=deployment,
                        service=service.outputs["service"],
                        revision=service.outputs["revision"],
                        url=service.outputs["url"],
                        service_url=service.outputs["service_url"],
                        weights_uri=weights_uri,
                    ).set_display_name("Smoke test the new revision (tag URL)")
                    run_smoke.set_caching_options(False)
                    with dsl.If(run_smoke.outputs["verdict"] == "passed", name="revision-passed"):
                        promote_service_c(
                            deployment=deployment,
                            service=service.outputs["service"],
                            revision=service.outputs["revision"],
                        ).set_display_name("Promote: move the service's traffic").set_caching_options(False)
                    with dsl.Else(name="revision-failed"):
                        roll_back_service_c(
                            deployment=deployment,
                            service=service.outputs["service"],
                            revision=service.outputs["revision"],
                            reason=run_smoke.outputs["message"],
                        ).set_display_name("Roll back the new revision").set_caching_options(False)

    _describe(deploy_llm, template)
    return dsl.pipeline(name=template.name, description=template.description)(deploy_llm)


def _describe(func: Any, template: Template) -> None:
    """Defaults and the run form's descriptions for one template (KFP reads both from the function)."""
    defaults: dict[str, Any] = {
        "region": "",
        "service_account": "",
        "force": False,
        "api_endpoint": "",
        "config": {},
        **template.form,
    }
    if template.preset is None:
        defaults["bucket"] = ""  # the generic template also takes placement.bucket from `config`
    first_default = next(i for i, n in enumerate(_PARAM_ORDER) if n in defaults)
    assert all(n in defaults for n in _PARAM_ORDER[first_default:]), "defaults must trail the required inputs"
    func.__defaults__ = tuple(defaults[n] for n in _PARAM_ORDER[first_default:])
    docs = {**_RUN_ARGS, **{f.name: f.description for f in FORM_FIELDS}}
    intro = _SUMMARY if template.preset is None else f"{template.description}\n\n{_SUMMARY}"
    func.__doc__ = intro + "\nArgs:\n" + "".join(f"    {n}: {docs[n]}\n" for n in _PARAM_ORDER)


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
    """The run-time parameter values for a config: what `vlp run` submits and `vlp check` validates. The form
    fields show the config's values (what a person sees on the run's page); `config` carries all of it."""
    return {
        **form_values(cfg),
        "config": cfg.model_dump(mode="json", exclude_none=True),
        "project": project or cfg.placement.project,
        "region": region,
        "bucket": bucket or cfg.placement.bucket,
        "service_account": run_account(service_account, cfg),
        "force": force,
        # Only an emulator's address travels in the run: on Vertex the steps use Google's regional hosts.
        "api_endpoint": api_endpoint if api_endpoint.startswith("http://") else "",
    }
