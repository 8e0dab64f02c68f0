"""The deployment struct preflight hands on: parsed back typed from what KFP delivers, and one rule for accounts."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from vlp.components.config import config_from_dict, load_config
from vlp.components.deployment import Deployment, build, run_account, serving_account

PRESETS = Path(__file__).resolve().parents[1] / "pipelines" / "presets"


def _built(**overrides: str) -> Deployment:
    cfg = load_config(PRESETS / "llama-3.1-8b-vllm-l4.yaml")
    args = {
        "project": "p",
        "region": "us-central1",
        "bucket": "b",
        "service_account": "",
        "run_name": "Run_1",
        "plan": {"max_num_seqs": 64.0, "node_count": 1.0},
        "revision_sha": "abc",
        "api_endpoint": "",
    }
    return build(cfg, **{**args, **overrides})


def test_the_struct_keeps_its_keys_and_comes_back_typed_from_floats() -> None:
    built = _built().to_dict()
    assert list(built) == [
        "config", "project", "region", "bucket", "service_account", "run_name", "labels", "plan", "revision_sha",
        "api_endpoint",
    ]  # fmt: skip
    assert built["labels"] == {"vlp-deployment": "llama-3-1-8b-vllm", "vlp-run": "run_1"}
    # KFP hands a struct over as JSON, every number a float.
    arrived = json.loads(json.dumps(built))
    arrived["config"]["endpoint"]["traffic_steps"] = [10.0, 100.0]
    typed = Deployment.parse(arrived)
    assert typed.config.endpoint.traffic_steps == [10, 100]
    assert all(isinstance(x, int) for x in typed.config.endpoint.traffic_steps)
    assert typed.config == config_from_dict(arrived["config"])
    assert Deployment.parse(typed) is typed
    assert Deployment.parse(typed.to_dict()) == typed


def test_the_account_rule_run_then_config() -> None:
    cfg = load_config(PRESETS / "llama-3.1-8b-vllm-l4.yaml", ["placement.service_account=cfg@p.iam.gserviceaccount.com"])
    assert run_account("run@p.iam.gserviceaccount.com", cfg) == "run@p.iam.gserviceaccount.com"
    assert run_account("", cfg) == "cfg@p.iam.gserviceaccount.com"
    decided = _built(service_account="decided@p.iam.gserviceaccount.com")
    assert serving_account(decided) == "decided@p.iam.gserviceaccount.com"
    undecided = replace(_built(), config=cfg)
    assert serving_account(undecided) == "cfg@p.iam.gserviceaccount.com"
