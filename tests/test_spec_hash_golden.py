"""Each preset's serving spec hash, labels and version alias, pinned as values.

A deployed model's `vlp-spec` label (a Cloud Run revision's too) is how the next run spots a no-op: a hash that
drifts, because code moved or a default changed shape, redeploys every live deployment once after an upgrade.
These values change only on purpose, with the reason in the commit. Changed on purpose: the vLLM presets moved to
vLLM's own image (issue 31: llama-3.1-8b-vllm-l4, llama-3.1-70b-vllm-8xl4, local-demo, local-demo-cloud-run), so
each of those deployments redeploys once after the upgrade; llama-3.2-11b-vision-vllm-a100 and the TGI presets kept
their values.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_serving import SHA, deployment_for_tests

from vlp.components.config import load_config
from vlp.components.deployment import Deployment

PRESETS = Path(__file__).resolve().parents[1] / "pipelines" / "presets"
# The plan an `auto` preset is given here: what it is does not matter, only that it stays the same.
L4_PLAN = {
    "node_count": 1,
    "machine_type": "g2-standard-12",
    "accelerator_type": "NVIDIA_L4",
    "accelerator_count": 1,
    "tensor_parallel_size": 1,
    "pipeline_parallel_size": 1,
}

GOLDEN: dict[str, tuple[str, str]] = {
    'gemma-3-27b-vllm-a100': (
        'vlp-deployment=gemma-3-27b-vllm,vlp-revision=0123456789ab,vlp-run=run-1,vlp-spec=4040ecac4650',
        'rev-0123456789ab-4040ecac',
    ),
    'gpt-oss-20b-vllm-l4': (
        'vlp-deployment=gpt-oss-20b-vllm,vlp-revision=0123456789ab,vlp-run=run-1,vlp-spec=58de7f1eebd1',
        'rev-0123456789ab-58de7f1e',
    ),
    'llama-3.1-405b-bf16-vllm-2xa3': (
        'vlp-deployment=llama-3-1-405b-bf16-vllm,vlp-revision=0123456789ab,vlp-run=run-1,vlp-spec=816ff334ec40',
        'rev-0123456789ab-816ff334',
    ),
    'llama-3.1-405b-fp8-tgi-a3': (
        'vlp-deployment=llama-3-1-405b-fp8-tgi,vlp-revision=0123456789ab,vlp-run=run-1,vlp-spec=704d464d604c',
        'rev-0123456789ab-704d464d',
    ),
    'llama-3.1-70b-vllm-8xl4': (
        'vlp-deployment=llama-3-1-70b-vllm,vlp-revision=0123456789ab,vlp-run=run-1,vlp-spec=2f450e350ae9',
        'rev-0123456789ab-2f450e35',
    ),
    'llama-3.1-8b-awq-int4-tgi': (
        'vlp-deployment=llama-3-1-8b-awq-tgi,vlp-revision=0123456789ab,vlp-run=run-1,vlp-spec=019cd7406568',
        'rev-0123456789ab-019cd740',
    ),
    'llama-3.1-8b-awq-int4-tgi-cloud-run': (
        'vlp-deployment=llama-3-1-8b-awq-run,vlp-revision=0123456789ab,vlp-run=run-1,vlp-spec=ba3d1466f6ee',
        '',
    ),
    'llama-3.1-8b-awq-int4-vllm-cloud-run': (
        'vlp-deployment=llama-3-1-8b-awq-vllm-run,vlp-revision=0123456789ab,vlp-run=run-1,vlp-spec=1d30f54112db',
        '',
    ),
    'llama-3.1-8b-vllm-l4': (
        'vlp-deployment=llama-3-1-8b-vllm,vlp-revision=0123456789ab,vlp-run=run-1,vlp-spec=8bfda08e60f9',
        'rev-0123456789ab-8bfda08e',
    ),
    'llama-3.2-11b-vision-vllm-a100': (
        'vlp-deployment=llama-3-2-11b-vision-vllm,vlp-revision=0123456789ab,vlp-run=run-1,vlp-spec=02870f59efd6',
        'rev-0123456789ab-02870f59',
    ),
    'llama-3.3-70b-vllm-2xa100': (
        'vlp-deployment=llama-3-3-70b-vllm,vlp-revision=0123456789ab,vlp-run=run-1,vlp-spec=cdd98b3b8f2e',
        'rev-0123456789ab-cdd98b3b',
    ),
    'local-demo': (
        'vlp-deployment=smollm2-demo,vlp-revision=0123456789ab,vlp-run=run-1,vlp-spec=48ac82bb0041',
        'rev-0123456789ab-48ac82bb',
    ),
    'local-demo-cloud-run': (
        'vlp-deployment=smollm2-demo-run,vlp-revision=0123456789ab,vlp-run=run-1,vlp-spec=41d5db0f09f5',
        '',
    ),
    'qwen3-30b-a3b-vllm-a100': (
        'vlp-deployment=qwen3-30b-a3b-vllm,vlp-revision=0123456789ab,vlp-run=run-1,vlp-spec=7c93ce874558',
        'rev-0123456789ab-7c93ce87',
    ),
}


def _deployment(name: str) -> Deployment:
    cfg = load_config(PRESETS / f"{name}.yaml")
    # An explicit shape becomes the plan (deployment_for_tests); an `auto` preset gets the fixed L4 plan.
    return deployment_for_tests(cfg, L4_PLAN if cfg.hardware.is_auto else None)


def labels_and_alias(name: str) -> tuple[str, str]:
    """The labels a deployment of this preset carries, and (Vertex) its version alias, as one line each."""
    deployment = _deployment(name)
    if deployment.config.target == "cloud_run":
        from vlp.components.cloud_run.service_spec import revision_labels

        labels = revision_labels(deployment)
        alias = ""
    else:
        from vlp.components.vertex.serving_spec import model_labels, serving_spec_hash, version_alias

        labels = model_labels(deployment, SHA)
        alias = version_alias(SHA, serving_spec_hash(deployment))
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())), alias


PRESET_NAMES = sorted(p.stem for p in PRESETS.glob("*.yaml"))


def test_every_preset_has_a_golden_value() -> None:
    assert sorted(GOLDEN) == PRESET_NAMES


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_the_spec_hash_labels_and_alias_of_each_preset_are_unchanged(name: str) -> None:
    assert labels_and_alias(name) == GOLDEN[name]
