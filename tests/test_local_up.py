"""`vlp local up | status | token | down`: the local stack kept up between runs, and the deployments it serves called
with the tutorials' own clients (aiplatform, openai, huggingface_hub, curl), pasted from `vlp local status`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.processes import processes_naming
from vlp.pipelines.local.emulator.serving import SERVING_THREADS_ENV, SHARED_FORK_SERVER_ENV
from vlp.pipelines.local.step_launch import SHARED_SERVERS_ENV

ROOT = Path(__file__).resolve().parent.parent
VLP = [sys.executable, "-m", "vlp.pipelines.cli"]

# Whole runs on the local stack (minutes each): left out of `make test-fast`.
pytestmark = pytest.mark.slow


def _clean_env() -> dict[str, str]:
    """A person's shell: none of the local stack's or a Google account's variables set. The suite's model-server
    thread count and shared fork servers stay (a person may set them too): they say how much CPU a model server or
    a step takes, not where anything is."""
    drop = ("GOOGLE_APPLICATION_CREDENTIALS", "GCE_METADATA", "STORAGE_EMULATOR_HOST", "HF_ENDPOINT", "VLP_")
    keep = (SERVING_THREADS_ENV, SHARED_FORK_SERVER_ENV, SHARED_SERVERS_ENV)
    return {k: v for k, v in os.environ.items() if not k.startswith(drop) or k in keep}


def vlp(*args: str, state: Path, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*VLP, *args, "--state-dir", str(state)],
        cwd=ROOT,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert done.returncode == 0, f"vlp {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


# A person's interactive python3: each line pushed as typed (code.InteractiveConsole, the stock REPL's own
# machinery), so a snippet that only runs as a script (an indented line, a block without its closing blank line)
# fails here as it would there; exit status 1 on any error it shows.
_REPL = (
    "import code, sys\n"
    "class Console(code.InteractiveConsole):\n"
    "    failed = False\n"
    "    def showtraceback(self):\n"
    "        Console.failed = True\n"
    "        super().showtraceback()\n"
    "    def showsyntaxerror(self, filename=None, **kwargs):\n"
    "        Console.failed = True\n"
    "        super().showsyntaxerror(filename)\n"
    "console = Console()\n"
    "for line in sys.stdin.read().split('\\n'):\n"
    "    console.push(line)\n"
    "console.push('')\n"
    "sys.exit(1 if Console.failed else 0)\n"
)


def paste(title: str, code: str) -> str:
    """Runs one snippet as a person would paste it, in another directory than the checkout: Python line by line into
    an interactive interpreter, curl in bash (`vlp` being this checkout's CLI). Returns what it printed; fails with
    its error output."""
    import tempfile

    if title.startswith("curl"):
        assert shutil.which("curl"), "curl is not installed: the curl snippets cannot be checked"
        argv, stdin = ["bash", "-c", code.replace("$(vlp ", f"$({' '.join(VLP)} ")], None
    else:
        argv, stdin = [sys.executable, "-c", _REPL], code
    with tempfile.TemporaryDirectory(prefix="vlp-paste-") as elsewhere:
        done = subprocess.run(
            argv, cwd=elsewhere, env=_clean_env(), input=stdin, capture_output=True, text=True, timeout=300
        )
    assert done.returncode == 0, f"snippet {title!r} failed:\n{code}\n--- stderr:\n{done.stderr[-3000:]}"
    return done.stdout


def status(state: Path) -> dict[str, Any]:
    return json.loads(vlp("local", "status", "--json", state=state).stdout)


def test_local_up_keeps_the_demo_serving_and_the_status_snippets_answer_paris(tmp_path: Path) -> None:
    """The issue's "done when": `vlp local up`, the demo run on it, each client snippet `vlp local status` prints
    answers "Paris", the benchmark right after the demo, `vlp local down` leaves no process, and the next `up` has
    the same address. (The Cloud Run demo is the next test, on a stack of its own, so the two run side by side.)"""
    state = (tmp_path / "state").resolve()
    up = vlp("local", "up", state=state)
    assert "local stack up" in up.stdout
    info = json.loads((state / "stack.json").read_text())
    assert "already up" in vlp("local", "up", state=state).stdout  # idempotent: the same stack
    # The stack holds the state dir: a reset is refused with the way out.
    reset = vlp("local", "reset", state=state, check=False)
    assert reset.returncode == 2 and "vlp local down" in reset.stderr, reset.stderr
    empty = vlp("local", "status", state=state).stdout
    assert info["emulator"] in empty and "nothing deployed yet" in empty
    # The local project has its owner from the start, as a new project has its creator: the printed token lists
    # (gcloud with that token and the printed CLOUDSDK_API_ENDPOINT_OVERRIDES_AIPLATFORM makes this call).
    owner_token = vlp("local", "token", state=state).stdout.strip()
    listed = requests.get(
        f"{info['emulator']}/v1/projects/local-project/locations/us-central1/endpoints?alt=json&pageSize=100",
        headers={"Authorization": f"Bearer {owner_token}"}, timeout=30,
    )  # fmt: skip
    assert listed.status_code == 200 and listed.json().get("endpoints", []) == [], listed.text
    assert f"CLOUDSDK_API_ENDPOINT_OVERRIDES_AIPLATFORM={info['emulator']}/ " in empty

    try:
        summary_path = tmp_path / "summary.json"
        run = vlp("run", "--local", "configs/local-demo.yaml", "--summary-json", str(summary_path), state=state)
        summary = json.loads(summary_path.read_text())
        assert summary["status"] == "succeeded", summary["error"]
        assert "keeps running" in run.stdout and info["emulator"] in summary["stack"]
        # The run used the stack that was up (same emulator process), and left it up and serving.
        assert json.loads((state / "stack.json").read_text())["emulator_pid"] == info["emulator_pid"]
        assert not (state / "run.lock").exists() or _lock_free(state / "run.lock")

        described = status(state)
        (endpoint,) = described["endpoints"]
        assert endpoint["display_name"] == "smollm2-demo"
        # Unchanged Google client code with only the printed environment and endpoint: google.auth.default() finds
        # credentials and the project on the metadata stand-in, and Cloud Storage answers with them (issue 35).
        assert described["api_endpoint"] == info["emulator"]
        default_auth = (
            "import google.auth\n"
            "from google.cloud import storage\n"
            "credentials, project = google.auth.default()\n"
            f"client = storage.Client(project=project, credentials=credentials, client_options={{'api_endpoint': {info['emulator']!r}}})\n"
            "print(project, [b.name for b in client.list_buckets()])\n"
            # And a gapic client on its default transport (gRPC, TLS): the printed endpoint, the stack's CA.
            "from google.cloud import aiplatform_v1\n"
            f"endpoints = aiplatform_v1.EndpointServiceClient(client_options={{'api_endpoint': {described['grpc_endpoint']!r}}})\n"
            "print([e.display_name for e in endpoints.list_endpoints(parent=f'projects/{project}/locations/us-central1')])\n"
        )
        found = subprocess.run(
            [sys.executable, "-c", default_auth], cwd=tmp_path, env={**_clean_env(), **described["env"]},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert found.returncode == 0, found.stderr[-2000:]
        assert found.stdout.split(" ", 1)[0] == "local-project" and "vlp-local" in found.stdout, found.stdout
        assert found.stdout.splitlines()[1] == "['smollm2-demo']", found.stdout
        assert described["env"]["GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"].endswith("ca.pem")
        assert described["env"]["CLOUDSDK_API_ENDPOINT_OVERRIDES_AIPLATFORM"] == info["emulator"] + "/"
        # vLLM's own image: its /v1/chat/completions through raw_predict, streamed through stream_raw_predict.
        titles = set(endpoint["snippets"])
        assert titles == {"aiplatform raw_predict", "aiplatform stream_raw_predict", "curl"}, titles
        for title, code in endpoint["snippets"].items():
            assert "Paris" in paste(title, code), title

        # `vlp bench` on the endpoint from a person's shell (no metadata server named): it calls as the local owner,
        # vLLM's own image through :streamRawPredict, and measures.
        bench = subprocess.run(
            [*VLP, "--api-endpoint", info["emulator"], "bench", endpoint["name"], "--requests", "2", "--concurrency", "1",
             "--max-tokens", "4", "--report", str(tmp_path / "bench.html"), "--json"],
            cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert bench.returncode == 0, bench.stdout + bench.stderr
        assert json.loads(bench.stdout)["levels"][0]["errors"] == 0

        # Right after the demo, the README's benchmark command: nothing changed, so nothing is redeployed, and the
        # benchmark step measures the deployment as it serves. Two requests a level, not 16: the model server
        # answers one request at a time on one thread, and 48 of them were a third of this test's CPU.
        bench = vlp(
            "run", "--local", "configs/local-demo.yaml", "--set", "smoke_test.benchmark=true",
            "--set", "smoke_test.benchmark_requests=2", "--summary-json", str(summary_path), state=state,
        )  # fmt: skip
        summary = json.loads(summary_path.read_text())
        assert summary["status"] == "noop", summary["error"]
        assert [s["name"] for s in summary["steps"]] == ["preflight", "benchmark", "cleanup"]
        assert not any(c.endswith(("/models:upload", ":deployModel")) for c in summary["api_calls"])
        levels = summary["smoke"]["benchmark"]
        assert [lv["concurrency"] for lv in levels] == [1, 4, 16]
        assert all(lv["errors"] == 0 and lv["output_tokens_per_s"] > 0 for lv in levels), levels
        report = Path(summary["report"])
        assert report.name == "benchmark-report.html" and "<table" in report.read_text()
        assert f"report:   {report}" in bench.stdout and "benchmark c=16:" in bench.stdout

        # A dedicated endpoint whose model takes invoke routes only: the snippets use invoke, on its own DNS.
        vlp(
            "run", "--local", "configs/local-demo.yaml", "--set", "name=ded", "--set", "endpoint.name=ded",
            "--set", "endpoint.dedicated=true", state=state,
        )  # fmt: skip
        dedicated = next(ep for ep in status(state)["endpoints"] if ep["display_name"] == "ded")
        assert dedicated["dedicated_dns"].endswith(".prediction.vertexai.goog")
        assert set(dedicated["snippets"]) == {"aiplatform invoke", "openai (invoke route)", "curl"}
        for title, code in dedicated["snippets"].items():
            assert "Paris" in paste(title, code), title

        # And the first endpoint still serves after the other run: the stack never stopped.
        first = described["endpoints"][0]["snippets"]["aiplatform raw_predict"]
        assert "Paris" in paste("aiplatform raw_predict", first)
    finally:
        down = vlp("local", "down", state=state)
    assert "local stack stopped" in down.stdout
    assert processes_naming(state) == []
    assert not (state / "stack.json").exists()
    assert "no local stack is running" in vlp("local", "status", state=state, check=False).stderr
    # Stable addresses: the next `up` answers where the last one did (the snippets above stay valid).
    try:
        vlp("local", "up", state=state)
        assert json.loads((state / "stack.json").read_text())["emulator"] == info["emulator"]
        # A garbled stack.json does not make the stack unstoppable: down finds it through the state dir's lock.
        (state / "stack.json").write_text("{ not json")
    finally:
        down = vlp("local", "down", state=state)
    assert "found from the state dir's lock" in down.stdout, down.stdout
    assert processes_naming(state) == []


def _lock_free(path: Path) -> bool:
    import fcntl

    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


def _streaming(openai_snippet: str) -> str:
    """The openai snippet with stream=True, printing the chunks as they come."""
    code = openai_snippet.replace("max_tokens=24)", "max_tokens=24, stream=True)")
    assert "stream=True" in code
    return code.replace(
        "print(reply.choices[0].message.content)",
        "print(''.join(chunk.choices[0].delta.content or '' for chunk in reply if chunk.choices))",
    )


def test_local_up_serves_cloud_run_and_tgi_and_their_snippets_answer_paris(tmp_path: Path) -> None:
    """The Cloud Run demo on a kept-up stack: huggingface_hub, openai and curl with an ID token answer "Paris"; no
    token, 403. Then TGI on both Vertex endpoint kinds, each snippet answering. `vlp local down` leaves no process."""
    state = (tmp_path / "state").resolve()
    vlp("local", "up", state=state)
    info = json.loads((state / "stack.json").read_text())
    try:
        summary_path = tmp_path / "summary.json"
        run = vlp("run", "--local", "configs/local-demo-cloud-run.yaml", "--summary-json", str(summary_path), state=state)
        summary = json.loads(summary_path.read_text())
        assert summary["status"] == "succeeded", summary["error"]
        assert json.loads((state / "stack.json").read_text())["emulator_pid"] == info["emulator_pid"]
        (service,) = status(state)["services"]
        assert service["url"] == summary["service_url"] and f"URL {service['url']}" in run.stdout
        # vLLM's own image answers only to its served model name, which the snippets send.
        assert set(service["snippets"]) == {"openai (Cloud Run URL)", "curl"}
        assert "SmolLM2-135M-Instruct" in service["snippets"]["curl"]
        for title, code in service["snippets"].items():
            assert "Paris" in paste(title, code), title
        streamed = paste("openai streaming", _streaming(service["snippets"]["openai (Cloud Run URL)"]))
        assert "Paris" in streamed
        # `vlp bench` on the private service from a person's shell: an ID token for the URL (--id-token), minted for
        # the local owner through the stack's metadata stand-in. A --config whose plan cannot be made (its model's
        # Hub is unreachable) fails after the load: the measurements are still printed and the report written.
        report = tmp_path / "bench.html"
        unplannable = tmp_path / "unplannable.yaml"
        unplannable.write_text((ROOT / "configs" / "local-demo-cloud-run.yaml").read_text())
        bench = subprocess.run(
            [*VLP, "--api-endpoint", info["emulator"], "bench", service["url"], "--id-token", "--requests", "2",
             "--concurrency", "1", "--max-tokens", "4", "--report", str(report), "--config", str(unplannable)],
            cwd=tmp_path, env={**_clean_env(), "HF_ENDPOINT": "http://127.0.0.1:9"}, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        assert bench.returncode == 1, bench.stdout + bench.stderr
        assert "the load ran, but pricing it failed" in bench.stderr and "Traceback" not in bench.stderr
        assert "c=1" in bench.stdout or "concurrency" in bench.stdout, bench.stdout
        assert report.is_file() and "<table" in report.read_text()
        # Without a token, the private service refuses (the snippets' ID token is what lets them in).
        refused = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{service['url']}/health"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert refused.stdout == "403", refused.stdout

        # TGI on Vertex, both endpoint kinds: TGI's own routes (predict's `messages` instance; invoke's
        # /v1/chat/completions, which openai reaches too), never Vertex's chat route (422 on TGI, contract C5).
        tgi = ("--set", "serving.engine=tgi", "--set", "serving.dtype=auto")
        for name, kind in (("tgi-shared", ()), ("tgi-dedicated", ("--set", "endpoint.dedicated=true"))):
            sets = ("--set", f"name={name}", "--set", f"endpoint.name={name}", *tgi, *kind)
            vlp("run", "--local", "configs/local-demo.yaml", *sets, state=state)
        endpoints = {ep["display_name"]: ep for ep in status(state)["endpoints"]}
        assert set(endpoints["tgi-shared"]["snippets"]) == {"aiplatform predict", "aiplatform raw_predict", "curl"}
        assert set(endpoints["tgi-dedicated"]["snippets"]) == {"aiplatform invoke", "openai (invoke route)", "curl"}
        for name in ("tgi-shared", "tgi-dedicated"):
            for title, code in endpoints[name]["snippets"].items():
                assert "Paris" in paste(title, code), (name, title)
    finally:
        # Deleted, stack.json cannot say what runs: down still stops the stack and every process naming the dir.
        (state / "stack.json").unlink(missing_ok=True)
        down = vlp("local", "down", state=state)
    assert "local stack stopped" in down.stdout, down.stdout
    assert processes_naming(state) == []
