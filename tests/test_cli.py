"""The `vlp` CLI: help everywhere, exit codes CI can trust, errors without tracebacks, mirror/plan/render/bench."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vlp.pipelines.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent


def vlp(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-m", "vlp.pipelines.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_every_command_has_help() -> None:
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name in ["compile", "check", "plan", "render", "run", "mirror", "bench", "local", "schedule", "publish"]:
        assert name in commands
    for name in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0


@pytest.mark.slow
def test_check_passes_on_every_config_and_names_the_field_on_a_broken_one(tmp_path: Path) -> None:
    ok = vlp("check")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "27/27 configs and templates valid" in ok.stdout  # 14 configs, and the 13 templates' run forms
    broken = tmp_path / "broken.yaml"
    broken.write_text((ROOT / "configs" / "local-demo.yaml").read_text().replace("max_num_seqs", "max_num_seq"))
    bad = vlp("check", str(broken))
    assert bad.returncode == 1
    assert "serving.max_num_seq: unknown field" in bad.stdout
    assert "Traceback" not in bad.stdout + bad.stderr


def test_bad_input_exits_2_without_traceback() -> None:
    result = vlp("run", "configs/local-demo.yaml", "--local", "--inject", "meteor-strike")
    assert result.returncode == 2
    assert "unknown fault" in result.stderr and "quota-exhausted" in result.stderr
    assert "Traceback" not in result.stderr
    missing = vlp("plan", "configs/nope.yaml")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    bad_set = vlp("render", "configs/local-demo.yaml", "--set", "serving.engine=triton")
    assert bad_set.returncode == 2 and "serving.engine" in bad_set.stderr


def test_vertex_run_without_project_says_how_to_fix() -> None:
    result = vlp("run", "configs/llama-3.1-8b-vllm-l4.yaml")
    assert result.returncode == 2
    assert "--project" in result.stderr and "nothing deploys to a project by accident" in result.stderr


def test_plan_works_offline_from_the_local_hub_mirror_without_credentials(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`vlp plan CONFIG` with the Hub unreachable and no Google credentials: the model comes from the local stack's
    Hub mirror, quota is skipped with a line that says why, and every `--set` works on a `hardware: auto` config."""
    import shutil

    state = tmp_path / "state"
    shutil.copytree(tiny_model_dir, state / "hub-mirrors" / "models" / "vlp-test" / "tiny-llama")
    offline = {
        "HF_ENDPOINT": "http://127.0.0.1:9",  # nothing listens there: the Hub is unreachable
        "HF_HUB_OFFLINE": "0",
        "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "none.json"),
        "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"),
        "NO_GCE_CHECK": "True",
        "GCE_METADATA_HOST": "127.0.0.1:9",
    }
    result = vlp(
        "plan",
        "configs/local-demo.yaml",
        "--state-dir",
        str(state),
        "--set",
        "model.repo=vlp-test/tiny-llama",
        "--set",
        "serving.max_model_len=512",
        "--set",
        "hardware.objective=cost_per_hour",
        env=offline,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the Hub is unreachable: planned vlp-test/tiny-llama from the local Hub mirror's copy" in result.stdout
    assert "quota not checked: no Google credentials here" in result.stdout
    assert "why            cheapest fitting shape per hour" in result.stdout  # the --set reached the auto config


def test_plan_from_a_local_model_dir_prints_json(tiny_model_dir: Path) -> None:
    result = vlp("plan", "--model", str(tiny_model_dir), "--max-model-len", "512", "--max-num-seqs", "4", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    for key in (
        "weights_bytes",
        "params",
        "dtype",
        "fits",
        "machine_type",
        "accelerator_type",
        "accelerator_count",
        "node_count",
        "max_model_len",
        "max_num_seqs",
        "price_per_hour_usd",
        "quota",
        "warnings",
        "errors",
    ):
        assert key in plan
    assert plan["fits"] and plan["objective"] == "cost_per_token"
    assert set(plan["throughput"]) >= {
        "input_tokens",
        "output_tokens",
        "concurrency",
        "output_tokens_per_s",
        "ttft_s",
        "itl_s",
    }
    assert plan["cost_per_million_output_tokens_usd"] > 0
    for alt in plan["alternatives"]:
        assert alt["throughput"]["output_tokens_per_s"] > 0 and alt["cost_per_million_output_tokens_usd"] > 0
    hourly = vlp(
        "plan", "--model", str(tiny_model_dir), "--max-model-len", "512", "--objective", "cost_per_hour", "--json"
    )
    assert json.loads(hourly.stdout)["accelerator_type"] == "NVIDIA_L4"  # the cheapest machine per hour
    size = sum(p.stat().st_size for p in tiny_model_dir.glob("*.safetensors"))
    assert 0 < plan["weights_bytes"] <= size


def test_render_prints_the_requests_a_run_would_send() -> None:
    result = vlp("render", "configs/llama-3.1-8b-vllm-l4.yaml", "--json")
    assert result.returncode == 0, result.stderr
    requests = json.loads(result.stdout)
    assert set(requests) == {"upload_model", "deploy_model", "deploy_model_api", "redeploy"}
    assert requests["deploy_model_api"] == "v1"  # v1beta1 only for a multi-host replica
    machine = requests["deploy_model"]["deployedModel"]["dedicatedResources"]["machineSpec"]
    assert machine == {"machineType": "g2-standard-12", "acceleratorType": "NVIDIA_L4", "acceleratorCount": 1}
    # vLLM reads the mirror itself (Model Garden's recipe): no artifactUri copy.
    assert "artifactUri" not in requests["upload_model"]["model"]
    # vLLM's own image streams the weights from the mirror (`vllm serve gs://…`); the Model has no artifactUri.
    assert requests["upload_model"]["model"]["containerSpec"]["args"][0].startswith("gs://")
    assert requests["redeploy"]["smoke_test"].startswith("canary") and requests["redeploy"]["new_model_traffic"] == 5
    dedicated = vlp("render", "configs/llama-3.1-8b-vllm-l4.yaml", "--json", "--set", "endpoint.dedicated=true")
    assert json.loads(dedicated.stdout)["redeploy"]["smoke_test"].startswith("invoke")
    assert "HF_TOKEN" not in result.stdout


@pytest.mark.slow
def test_mirror_command_against_the_local_stack(tmp_path: Path, tiny_model_dir: Path) -> None:
    from vlp.pipelines.local.peers import LocalStack

    with LocalStack(tmp_path / "state") as stack:
        # A developer who owns the project runs `vlp mirror` with their own credentials; the bucket they create
        # gives the project's owners its objects (Cloud Storage's default bucket policy).
        owner = stack.bootstrap_owner("local-project")
        stack_env = stack.env(owner)
        from vlp.pipelines.local.models import publish_to_hub_mirror

        sha = publish_to_hub_mirror(tiny_model_dir, stack.mirrors_dir, "vlp-test/tiny-llama")
        from google.cloud import storage

        storage.Client(
            project="local-project",
            credentials=stack.credentials(owner),
            client_options={"api_endpoint": stack.storage_endpoint},
        ).create_bucket("mirror-bucket")
        args = [
            "--api-endpoint",
            stack.api_endpoint,
            "mirror",
            "configs/local-demo.yaml",
            "--set",
            "model.repo=vlp-test/tiny-llama",
            "--bucket",
            "mirror-bucket",
        ]
        first = vlp(*args, env=stack_env)
        assert first.returncode == 0, first.stderr
        assert f"mirrored: gs://mirror-bucket/models/vlp-test/tiny-llama/{sha}/" in first.stdout
        assert "MB/s" in first.stderr  # the progress bar
        again = vlp(*args, env=stack_env)
        assert again.returncode == 0 and "already mirrored" in again.stdout


def test_running_a_local_demo_without_local_says_to_add_it() -> None:
    result = vlp("run", "configs/local-demo.yaml", env={"GOOGLE_APPLICATION_CREDENTIALS": "/nonexistent.json"})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "run it with --local" in result.stderr and "credentials" not in result.stderr.lower()


def test_version_a_missing_model_dir_and_a_closed_pipe_say_what_they_are(tmp_path: Path) -> None:
    """Messages a newcomer meets first (issue 36): `vlp --version`; a model path that is not a directory, said as
    such (not huggingface_hub's repo-id error, and no table of zeros above it); `vlp render | head` ends quietly."""
    from importlib.metadata import version

    done = subprocess.run([sys.executable, "-m", "vlp.pipelines.cli", "--version"], capture_output=True, text=True)
    assert done.stdout.strip() == f"vlp {version('vertex-llm-pipelines')}"
    missing = subprocess.run(
        [sys.executable, "-m", "vlp.pipelines.cli", "plan", "--model", str(tmp_path / "no" / "such")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert missing.returncode == 1
    assert missing.stdout.startswith("Cannot plan ") and "is not a model directory (it does not exist)" in missing.stdout
    assert "Repo id" not in missing.stdout + missing.stderr and "0.00 GB" not in missing.stdout
    render = f"{sys.executable} -m vlp.pipelines.cli render {ROOT / 'configs' / 'llama-3.1-8b-vllm-l4.yaml'} --json"
    # `true` reads nothing and exits at once: vlp's write lands on a closed pipe (EPIPE) every time.
    piped = subprocess.run(["bash", "-c", f"set -o pipefail; {render} | true"], capture_output=True, text=True)
    assert piped.returncode == 0 and piped.stderr == "", piped.stderr


def test_the_state_dir_is_found_from_a_subdirectory_as_git_finds_its_repository(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 36: from a subdirectory, `vlp local status` means the stack of the project's root, not a second one;
    $VLP_STATE_DIR names one anywhere; with none above, ./.vlp/local as before."""
    from vlp.pipelines.cli import find_state_dir

    monkeypatch.delenv("VLP_STATE_DIR", raising=False)
    root = tmp_path / "project"
    deeper = root / "src" / "deeper"
    deeper.mkdir(parents=True)
    assert find_state_dir(deeper) == deeper / ".vlp" / "local"  # none yet: here, as before
    (root / ".vlp" / "local").mkdir(parents=True)
    assert find_state_dir(deeper) == root / ".vlp" / "local"
    assert find_state_dir(root) == root / ".vlp" / "local"
    (deeper / ".vlp" / "local").mkdir(parents=True)  # the nearest wins
    assert find_state_dir(deeper) == deeper / ".vlp" / "local"
    monkeypatch.setenv("VLP_STATE_DIR", str(tmp_path / "elsewhere"))
    assert find_state_dir(deeper) == tmp_path / "elsewhere"

    # The command from the subdirectory names the state dir it found (no stack runs there: it says so, and how).
    monkeypatch.delenv("VLP_STATE_DIR")
    monkeypatch.chdir(root / "src")
    assert main(["local", "status"]) == 2
    err = capsys.readouterr().err
    assert f"no local stack is running on {root / '.vlp' / 'local'}" in err, err
