"""Contract rules the code keeps on its own side (docs/vertex-contract.md): splits, quota ids, regions, waits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.cloud import aiplatform_v1
from test_serving import deployment_for_tests

from vlp.components.config import load_config
from vlp.components.planning import catalog
from vlp.components.serving import engines as serving
from vlp.components.vertex import quota, serving_spec
from vlp.components.vertex.deploy_model import redeploy_split
from vlp.components.vertex.register_model import upload_wait_s
from vlp.components.vertex.teardown import _reassigned_split

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _endpoint(split: dict[str, int], ids: list[str]) -> aiplatform_v1.Endpoint:
    return aiplatform_v1.Endpoint(deployed_models=[aiplatform_v1.DeployedModel(id=i) for i in ids], traffic_split=split)


def test_teardown_reassigns_the_traffic_of_what_it_removes() -> None:
    # A crash between promote and retiring the old model: ours holds 100%, the old one 0%. Undeploying ours
    # with an empty split would be refused (UndeployModelRequest.traffic_split): the old one gets it all.
    assert _reassigned_split(_endpoint({"ours": 100, "old": 0}, ["ours", "old"]), {"ours"}) == {"old": 100}
    assert _reassigned_split(_endpoint({"ours": 10, "a": 60, "b": 30}, ["ours", "a", "b"]), {"ours"}) == {
        "a": 67,
        "b": 33,
    }
    assert _reassigned_split(_endpoint({"ours": 100}, ["ours"]), {"ours"}) == {}  # the last model: no split


def test_redeploy_starts_at_zero_with_invoke_and_as_a_canary_without() -> None:
    shared = load_config(CONFIGS / "local-demo.yaml")
    assert redeploy_split(shared, {"old": 100}) == {"0": 5, "old": 95}
    dedicated = load_config(CONFIGS / "local-demo.yaml", ["endpoint.dedicated=true"])
    assert redeploy_split(dedicated, {"old": 100}) == {"0": 0, "old": 100}
    with pytest.raises(Exception, match="redeploy_test: invoke needs a dedicated endpoint"):
        load_config(CONFIGS / "local-demo.yaml", ["endpoint.redeploy_test=invoke"])


def test_quota_ids_as_googles_check_builds_them() -> None:
    assert quota.gpu_quota("NVIDIA_H100_MEGA_80GB")[0] == "CustomModelServingH100MEGAGPUsPerProjectPerRegion"
    assert quota.gpu_quota("NVIDIA_H100_MEGA_80GB", spot=True)[0] == (
        "CustomModelServingPreemptibleH100MEGAGPUsPerProjectPerRegion"
    )
    with pytest.raises(quota.QuotaError, match="not offered as Spot"):
        quota.gpu_quota("NVIDIA_H200_141GB", spot=True)


def test_a3_highgpu_2g_and_4g_only_where_model_garden_lists_them() -> None:
    offered = catalog.offered_regions("a3-highgpu-2g", "NVIDIA_H100_80GB") or ()
    assert offered and set(offered) <= {"us-west1", "asia-southeast1", "europe-west4"}
    assert "us-central1" not in (catalog.offered_regions("a3-highgpu-4g", "NVIDIA_H100_80GB") or ())
    assert "us-central1" in (catalog.offered_regions("a3-highgpu-8g", "NVIDIA_H100_80GB") or ())


def test_waits_cover_what_vertex_may_still_be_doing() -> None:
    from vlp.components.vertex.deploy_model import DEPLOY_WAIT_S

    assert DEPLOY_WAIT_S > serving_spec.DEPLOYMENT_TIMEOUT_S == 7200
    tgi, vllm = (
        deployment_for_tests(
            load_config(CONFIGS / "local-demo.yaml", [f"serving.engine={e}"]), {"weights_bytes": 410e9}
        )
        for e in ("tgi", "vllm")
    )
    assert upload_wait_s(vllm) == 1800 and upload_wait_s(tgi) > 1800 + 410e9 / 100e6


def test_paused_ends_the_wait() -> None:
    from vlp.pipelines.submit import _TERMINAL

    assert "PIPELINE_STATE_PAUSED" in _TERMINAL


def test_fixtures_record_their_upstream_source() -> None:
    contract = Path(serving.__file__).parent.parent / "contract"
    vllm = json.loads((contract / "vllm-0.6.2.json").read_text())
    tgi = json.loads((contract / "tgi-2.4.0.json").read_text())
    assert vllm["sha256"] == "2fffd856a25d3defa38a539150fccf9126959ce4c6781c1c5a76d5da7216af59"
    assert tgi["commit"] == "0a655a0ab5db15f08e45d8c535e263044b944190"
    assert "--swap-space" in vllm["flags"] and "--max-concurrent-requests" in tgi["flags"]
    assert {"MAX_INPUT_TOKENS", "MAX_TOTAL_TOKENS", "MAX_BATCH_PREFILL_TOKENS", "NUM_SHARD"} <= set(tgi["env"])
