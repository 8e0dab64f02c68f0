"""The exit handler, both targets: whatever happened, remove per the teardown policy what the run created."""

from typing import NamedTuple

from kfp import dsl


def should_remove(policy: str, run_state: str) -> bool:
    """The teardown policy: `always` removes what the run created; `on_failure` only when it did not succeed."""
    if policy == "never":
        return False
    return policy == "always" or run_state != "SUCCEEDED"


def cleanup_op(
    project: str,
    region: str,
    config: dict,
    preset: dict,
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
    run_name: str,
    api_endpoint: str,
    status: dsl.PipelineTaskFinalStatus,
) -> NamedTuple("CleanupOutputs", [("removed", list)]):  # noqa: F821, UP014
    """Exit handler: whatever happened, remove per the teardown policy what this run created. Its output lists
    what it removed (the local run summary reads it from the step's executor output)."""
    from collections import namedtuple

    from vlp.components.cleanup import should_remove
    from vlp.components.config import ConfigError, config_from_dict
    from vlp.components.run_form import FIELD_NAMES, resolve_config
    from vlp.components.runtime import checkpoint, label_value, setup_logging
    from vlp.components.vertex.teardown import Removed, remove_run_resources

    outputs = namedtuple("CleanupOutputs", ["removed"])
    log = setup_logging()
    checkpoint("cleanup")
    params = locals()
    form = {name: params[name] for name in FIELD_NAMES}
    try:
        cfg = config_from_dict(resolve_config(preset, form, config), source="the run form and config parameter")
    except ConfigError as exc:
        # Preflight failed on the same input before creating anything, so there is nothing to remove.
        log.info("nothing to remove: the run's config is not valid (%s)", str(exc).splitlines()[0])
        return outputs([])
    state = status.state
    log.info("run %s ended %s; teardown policy %s", run_name, state, cfg.teardown)
    if status.error_message:
        log.info("run error: %s", status.error_message)
    regions = [r for r in [region, *cfg.placement.regions] if r]
    project = project or cfg.placement.project
    abandoned = Removed()
    if state != "SUCCEEDED":
        # A big model's mirror custom job still running: its launcher died without cancelling it (a stopped launcher
        # cancels it itself). Whatever the teardown policy, it is paid compute for a run that is over.
        from vlp.components.mirror.jobs import cancel_run_mirror_jobs

        for name in cancel_run_mirror_jobs(project, regions, label_value(run_name), api_endpoint):
            log.info("cancelled %s (the mirror's custom job, still running)", name)
            abandoned.deleted.append(name)
    if state == "SUCCEEDED" and cfg.target != "cloud_run" and cfg.teardown != "never":
        # The deployment is whole again: what earlier runs left when they died before their own exit handler (an
        # untested version, an empty endpoint) goes now, not at the next `vlp gc`.
        from vlp.components.vertex.teardown import remove_abandoned_runs

        abandoned = remove_abandoned_runs(project, regions, cfg.name, label_value(run_name), api_endpoint)
        for name in abandoned.undeployed + abandoned.deleted:
            log.info("removed %s (left by a run that died)", name)
    if not should_remove(cfg.teardown, state):
        return outputs(abandoned.undeployed + abandoned.deleted)
    if cfg.target == "cloud_run":
        from vlp.components.cloud_run.service import remove_run_services

        removed = Removed(deleted=remove_run_services(project, regions, cfg.name, label_value(run_name), api_endpoint))
    else:
        # A failed run whose model was promoted keeps it (teardown: always removes it, as after a success).
        removed = remove_run_resources(
            project,
            regions,
            cfg.name,
            label_value(run_name),
            api_endpoint,
            keep_promoted=cfg.teardown != "always",
            endpoint_name=cfg.endpoint.name,
        )
    for name in removed.undeployed + removed.deleted:
        log.info("removed %s", name)
    if not removed.undeployed and not removed.deleted:
        log.info("nothing to remove: the run left no resources behind")
    return outputs(abandoned.undeployed + abandoned.deleted + removed.undeployed + removed.deleted)
