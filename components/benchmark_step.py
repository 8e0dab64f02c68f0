"""The benchmark step, both targets: the load benchmark against the deployment as it serves, for a run that changed
nothing but asked for smoke_test.benchmark."""

from typing import NamedTuple

from kfp import dsl

from vlp.components.deployment import Deployment


def serving_benchmark_target(deployment: Deployment, api_endpoint: str) -> tuple[str | None, dict[str, str], str]:
    """What a benchmark of the deployment as it serves (a run that changed nothing) times: (target, headers, "")
    or (None, {}, why not). On Vertex, the deployed model holding all the endpoint's traffic (the no-op check
    found it); on Cloud Run, the service URL, with an ID token."""
    cfg = deployment.config
    if cfg.target == "cloud_run":
        from vlp.components.cloud_run.probe import get_service, id_token_headers
        from vlp.components.cloud_run.service_spec import service_name, services_client

        service = get_service(services_client(api_endpoint or deployment.api_endpoint), service_name(deployment))
        if service is None or not service.uri:
            return None, {}, f"service {service_name(deployment)} is gone since preflight: run again to redeploy it"
        return service.uri, id_token_headers(service.uri), ""
    from vlp.components.vertex.endpoints import find_endpoint
    from vlp.components.vertex.prediction import benchmark_target, describe_endpoint

    endpoint = find_endpoint(deployment)
    if endpoint is None:
        return None, {}, f"endpoint {cfg.endpoint.name} is gone since preflight: run again to redeploy it"
    info = describe_endpoint(endpoint.name, api_endpoint)
    serving = [dm for dm, share in info.traffic.items() if share == 100]
    if not serving:
        return None, {}, f"no deployed model holds all of {endpoint.name}'s traffic now: run again to redeploy"
    target, reason = benchmark_target(deployment, info, serving[0])
    return target, {}, reason


def benchmark_op(
    deployment: dict,
    api_endpoint: str,
    metrics: dsl.Output[dsl.Metrics],
    report: dsl.Output[dsl.HTML],
) -> NamedTuple("BenchmarkOutputs", [("benchmark", list), ("benchmark_skipped", str)]):
    """Benchmark: the load benchmark against the deployment as it serves, for a run that changed nothing but asked
    for smoke_test.benchmark (nothing is redeployed to measure it)."""
    from collections import namedtuple
    from logging import getLogger

    from vlp.components.benchmark_step import serving_benchmark_target
    from vlp.components.deployment import Deployment
    from vlp.components.runtime import checkpoint, setup_logging
    from vlp.components.smoke.benchmark import render_html
    from vlp.components.smoke.checks import benchmark_deployment
    from vlp.components.vertex.load_target import chat_target

    setup_logging()
    d = Deployment.parse(deployment)
    cfg = d.config
    target, headers, skipped = serving_benchmark_target(d, api_endpoint)
    checkpoint("benchmark")
    levels: list = []
    if target is None:
        getLogger("vlp.smoke").warning("benchmark skipped: %s", skipped)
        page = f"<p>Benchmark skipped: {skipped}</p>"
    else:
        # A Vertex endpoint is resolved to its chat route by its own module; a Cloud Run URL goes as it is.
        resolve = None if cfg.target == "cloud_run" else chat_target
        bench = benchmark_deployment(
            d, target, metrics, api_endpoint=api_endpoint, headers=headers or None, resolve=resolve
        )
        levels = bench.levels
        page = render_html(bench)
    with open(report.path, "w") as f:
        f.write(page)
    return namedtuple("BenchmarkOutputs", ["benchmark", "benchmark_skipped"])(levels, skipped)
