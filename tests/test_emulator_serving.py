"""Tests the emulator's serving stand-in and side APIs against real local peers: fake GCS, transformers serve, olah."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import google_crc32c
import pytest
from conftest import as_tester, plumbing_headers
from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from vlp.components.serving import images
from vlp.pipelines.local.emulator import Emulator, create_emulator
from vlp.pipelines.local.emulator.engine_routes import WRONG_ANSWER
from vlp.pipelines.local.emulator.serving import (
    SERVING_THREADS_ENV,
    SHARED_FORK_SERVER_ENV,
    ServingError,
    ServingManager,
    start_model_fork_server,
)
from vlp.pipelines.local.models import build_tiny_llama, publish_to_hub_mirror
from vlp.pipelines.local.peers import Peer, python_env, start_fake_gcs, start_hub_mirror

BUCKET = "vlp-serving-test"
GOOD_URI = f"gs://{BUCKET}/models/acme/tiny/rev1/"
BROKEN_URI = f"gs://{BUCKET}/models/acme/broken/rev1/"
QWEN3_URI = f"gs://{BUCKET}/models/acme/qwen3/rev1/"
MLLAMA_URI = f"gs://{BUCKET}/models/acme/mllama/rev1/"
VLLM_SPEC = {
    "imageUri": "us-docker.pkg.dev/vertex-ai/vertex-vision-model-garden-dockers/pytorch-vllm-serve:latest",
    "args": ["python", "-m", "vllm.entrypoints.api_server", "--model=gs://x", "--served-model-name=acme/tiny"],
    "predictRoute": "/generate",
    "healthRoute": "/ping",
}
TGI_SPEC = {
    "imageUri": "us-docker.pkg.dev/deeplearning-platform-release/gcr.io/huggingface-text-generation-inference-cu124.2-4"
    ".ubuntu2204.py311",
    "predictRoute": "/vertex",
}
PROJECT = "local-project"
# vLLM's own image, as the deploy step names it (through the project's Artifact Registry remote repository).
OPENAI_SPEC = {
    "imageUri": "us-docker.pkg.dev/local-project/vlp-docker-hub/vllm/vllm-openai:v0.34.0",
    "command": ["vllm", "serve"],
    "args": [GOOD_URI, "--load-format=runai_streamer", "--served-model-name=acme/tiny", "--max-model-len=2048"],
    "predictRoute": "/v1/chat/completions",
    "healthRoute": "/health",
}


# ----- peers -----


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serving")


@pytest.fixture(scope="module")
def tiny_model(work: Path) -> Path:
    return build_tiny_llama(work / "tiny-llama")


@pytest.fixture(scope="module")
def gcs(work: Path, tiny_model: Path) -> Iterator[Peer]:
    peer = start_fake_gcs(None, work / "logs")
    client = storage.Client(
        project="local", credentials=AnonymousCredentials(), client_options={"api_endpoint": peer.url}
    )
    bucket = client.create_bucket(BUCKET)
    for path in sorted(tiny_model.iterdir()):
        bucket.blob(f"models/acme/tiny/rev1/{path.name}").upload_from_filename(str(path))
        # Same model with an unreadable config: the server starts, then fails to load it.
        broken = b"{ this is not json" if path.name == "config.json" else path.read_bytes()
        bucket.blob(f"models/acme/broken/rev1/{path.name}").upload_from_string(broken)
    # The same weights under architectures the catalog's engines disagree on (only config.json is read before
    # the refusal).
    config = json.loads((tiny_model / "config.json").read_text())
    for name, arch, model_type in (
        ("qwen3", "Qwen3ForCausalLM", "qwen3"),
        ("mllama", "MllamaForConditionalGeneration", "mllama"),
    ):
        changed = json.dumps({**config, "architectures": [arch], "model_type": model_type})
        bucket.blob(f"models/acme/{name}/rev1/config.json").upload_from_string(changed)
    yield peer
    peer.stop()


@pytest.fixture(scope="module")
def manager(work: Path, gcs: Peer) -> Iterator[ServingManager]:
    faults: set[str] = set()
    serving = ServingManager(work / "state", gcs.url, faults)
    yield serving
    serving.stop_all()


@pytest.fixture(scope="module")
def vllm_model(manager: ServingManager) -> str:
    manager.start("dm-vllm", GOOD_URI, VLLM_SPEC, timeout_s=120)
    return "dm-vllm"


def _forward_json(manager: ServingManager, dm: str, kind: str, body: dict, subpath: str | None = None) -> dict:
    status, data, ctype = manager.forward(dm, kind, json.dumps(body).encode(), subpath)
    assert status == 200, data
    assert ctype.startswith("application/json")
    return json.loads(data)


# ----- ServingManager -----


def test_vllms_own_image_answers_its_openai_routes_only(manager: ServingManager) -> None:
    """vLLM's own image: :rawPredict reaches its predict route (/v1/chat/completions) with an OpenAI body; a
    PredictRequest there is a validation error; invoke names any route the image serves, and nothing else."""
    manager.start("dm-openai", GOOD_URI, OPENAI_SPEC, timeout_s=120)
    try:
        chat = {"model": "acme/tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
        answer = _forward_json(manager, "dm-openai", "rawPredict", chat)
        assert answer["choices"][0]["message"]["role"] == "assistant" and answer["model"] == "acme/tiny"
        status, data, _ = manager.forward("dm-openai", "predict", json.dumps({"instances": [chat]}).encode())
        assert status == 400 and "messages" in json.loads(data)["message"]
        status, data, _ = manager.forward("dm-openai", "rawPredict", json.dumps({**chat, "model": "other"}).encode())
        assert status == 404 and "does not exist" in json.loads(data)["message"]
        completion = _forward_json(manager, "dm-openai", "invoke", {"prompt": "Hi", "max_tokens": 2}, "/v1/completions")
        assert completion["choices"]
        status, data, _ = manager.forward("dm-openai", "invoke", b"", "/v1/models", method="GET")
        assert status == 200 and [m["id"] for m in json.loads(data)["data"]] == ["acme/tiny"]
        assert manager.forward("dm-openai", "invoke", b"{}", "/generate")[0] == 404  # Model Garden's route, not this
        assert manager.forward("dm-openai", "chat", json.dumps(chat).encode())[0] == 400  # Vertex's chat route
        # `stream`: the events come on as the model server sends them (issue 35: they came in one burst at the end),
        # each with the caller's model name, not the local path.
        streamed = {**chat, "max_tokens": 48, "stream": True}
        started = time.monotonic()
        status, lines, ctype = manager.forward("dm-openai", "rawPredict", json.dumps(streamed).encode())
        assert status == 200 and "text/event-stream" in ctype and not isinstance(lines, bytes)
        events = [(time.monotonic() - started, line) for line in lines if line.startswith(b"data: {")]
        assert len(events) >= 8, events
        assert all(json.loads(line[6:])["model"] == "acme/tiny" for _, line in events)
        first, last = events[0][0], events[-1][0]
        assert first < last / 2, (first, last)  # the first token long before the last
    finally:
        manager.stop("dm-openai")


def test_images_stop_at_start_on_flags_or_models_their_engine_version_lacks(manager: ServingManager) -> None:
    """The catalog image's own refusals, in its own words, before the server answers: a flag its parser lacks
    (argparse, exit 2), an architecture its registry lacks or removed (exit 1). No model server is started."""
    swap = {**OPENAI_SPEC, "args": [*OPENAI_SPEC["args"], "--swap-space=16"]}
    with pytest.raises(ServingError) as caught:
        manager.start("dm-swap", GOOD_URI, swap, timeout_s=30)
    assert caught.value.log_tail[-1] == "vllm: error: unrecognized arguments: --swap-space=16"
    assert "exited with code 2" in caught.value.message and "dm-swap" not in manager.known_ids()

    old = {**VLLM_SPEC, "imageUri": images.by_id("model-garden-vllm-20241001").image}
    with pytest.raises(ServingError) as caught:
        manager.start("dm-qwen3", QWEN3_URI, old, timeout_s=30)
    assert "Model architectures ['Qwen3ForCausalLM'] are not supported for now" in caught.value.log_tail[-1]
    with pytest.raises(ServingError) as caught:
        manager.start("dm-mllama", MLLAMA_URI, OPENAI_SPEC, timeout_s=30)
    assert "supported in vLLM until v0.10.2" in caught.value.log_tail[-1]
    tgi = {**TGI_SPEC, "imageUri": images.by_id("tgi-2.4.0-dlc").image}
    with pytest.raises(ServingError) as caught:
        manager.start("dm-qwen3-tgi", QWEN3_URI, tgi, timeout_s=30)
    assert caught.value.log_tail[-1] == "ValueError: Unsupported model type qwen3"
    # The log Cloud Logging would show keeps the line.
    assert "Unsupported model type qwen3" in manager.log_path("dm-qwen3-tgi").read_text()


def test_vllm_predict_follows_the_model_garden_format(manager: ServingManager, vllm_model: str, work: Path) -> None:
    assert manager.is_healthy(vllm_model)
    assert manager.known_ids() == [vllm_model]
    # The suite's setting (conftest) reached the server, forked from an interpreter that imported torch earlier.
    threads = f"[emulator] torch threads: {os.environ[SERVING_THREADS_ENV]}\n"
    assert threads in manager.log_path(vllm_model).read_text()
    assert (work / "state" / "serving" / vllm_model / "model" / "model.safetensors").is_file()

    answer = _forward_json(
        manager,
        vllm_model,
        "predict",
        {"instances": [{"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}]},
    )
    assert answer["deployedModelId"] == vllm_model
    [prediction] = answer["predictions"]
    assert prediction.startswith("Prompt:\nThe capital of France is\nOutput:\n")
    assert prediction.split("Output:\n", 1)[1].strip()

    raw = _forward_json(
        manager,
        vllm_model,
        "predict",
        {"instances": [{"prompt": "Hello", "raw_response": True, "top_k": 5}], "parameters": {"max_tokens": 4}},
    )
    assert raw["predictions"][0] and not raw["predictions"][0].startswith("Prompt:")

    chat = _forward_json(
        manager,
        vllm_model,
        "predict",
        {
            "instances": [
                {
                    "@requestFormat": "chatCompletions",
                    "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 5,
                }
            ]
        },
    )
    assert chat["predictions"][0]["object"] == "chat.completion"
    assert chat["predictions"][0]["choices"][0]["message"]["role"] == "assistant"


def test_chat_and_raw_routes(manager: ServingManager, vllm_model: str) -> None:
    body = {"model": "acme/tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6}
    chat = _forward_json(manager, vllm_model, "chat", body)
    assert chat["object"] == "chat.completion" and chat["model"] == "acme/tiny"
    assert chat["choices"][0]["message"]["content"]

    status, data, ctype = manager.forward(vllm_model, "chat", json.dumps({**body, "stream": True}).encode())
    assert status == 200 and ctype.startswith("text/event-stream")
    lines = b"".join(data).decode().splitlines()  # a stream: its lines as the model server sent them
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert chunks and "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)

    invoked = _forward_json(
        manager, vllm_model, "invoke", {"model": "acme/tiny", "prompt": "Hello", "max_tokens": 3}, "/v1/completions"
    )
    assert invoked["object"] == "text_completion"
    # vLLM answers only to its --served-model-name (serving_engine._check_model): another name is 404.
    status, data, _ = manager.forward(vllm_model, "chat", json.dumps({**body, "model": "gpt-4o"}).encode())
    assert status == 404 and json.loads(data)["message"] == "The model `gpt-4o` does not exist."
    # Image content for a text-only model is refused, not silently dropped.
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    with_image = {**body, "messages": [{"role": "user", "content": [{"type": "text", "text": "What?"}, image]}]}
    status, data, _ = manager.forward(vllm_model, "chat", json.dumps(with_image).encode())
    assert status == 400 and "is not a multimodal model" in json.loads(data)["message"]

    # vLLM's predict route (/generate, api_server): upstream's own shape answers {"text": [...]}; an OpenAI body
    # is an unexpected SamplingParams keyword there (500).
    native = _forward_json(manager, vllm_model, "rawPredict", {"prompt": "Hi", "max_tokens": 3})
    assert native["text"][0].startswith("Hi")
    openai_body = {"model": "acme/tiny", "prompt": "Hi", "max_tokens": 3}
    assert manager.forward(vllm_model, "rawPredict", json.dumps(openai_body).encode())[0] == 500
    raw = _forward_json(manager, vllm_model, "rawPredict", {"instances": [{"prompt": "Hi", "max_tokens": 3}]})
    assert raw["predictions"][0].startswith("Prompt:\nHi\n") and "deployedModelId" not in raw

    status, data, _ = manager.forward(vllm_model, "predict", b'{"instances": []}')
    assert status == 400 and json.loads(data)["error"]["status"] == "INVALID_ARGUMENT"


def test_smoke_fail_fault_makes_the_model_answer_wrongly(manager: ServingManager, vllm_model: str) -> None:
    manager.faults.add("smoke-fail")
    try:
        answer = _forward_json(manager, vllm_model, "predict", {"instances": [{"prompt": "Capital?", "max_tokens": 4}]})
        assert answer["predictions"][0].endswith("Output:\n" + WRONG_ANSWER)
        chat = _forward_json(
            manager,
            vllm_model,
            "chat",
            {"model": "acme/tiny", "messages": [{"role": "user", "content": "Capital?"}], "max_tokens": 4},
        )
        assert chat["choices"][0]["message"]["content"] == WRONG_ANSWER
    finally:
        manager.faults.discard("smoke-fail")
    assert manager.is_healthy(vllm_model)


@pytest.mark.slow
def test_tgi_container_speaks_the_hugging_face_dlc_format(manager: ServingManager) -> None:
    manager.start("dm-tgi", GOOD_URI, TGI_SPEC, timeout_s=120)
    try:
        answer = _forward_json(
            manager,
            "dm-tgi",
            "predict",
            {"instances": [{"inputs": "The capital of France is", "parameters": {"max_new_tokens": 6}}]},
        )
        assert answer["deployedModelId"] == "dm-tgi"
        # The `inputs` form samples (below), and a tiny random model may sample only whitespace or stop at once:
        # the shape is checked here, non-empty text on the greedy form further down.
        [text] = answer["predictions"]
        assert isinstance(text, str)

        # rawPredict reaches TGI's predict route (vertex_compatibility): `instances` only, as /generate- and
        # OpenAI-shaped bodies get axum's 422.
        for shape in ({"inputs": "Hello", "parameters": {"max_new_tokens": 4}}, {"messages": [], "model": "tgi"}):
            status, data, _ = manager.forward("dm-tgi", "rawPredict", json.dumps(shape).encode())
            assert status == 422 and b"missing field `instances`" in data, (status, data)
        raw = _forward_json(manager, "dm-tgi", "rawPredict", {"instances": [{"inputs": "Hello"}]})
        assert isinstance(raw["predictions"][0], str) and "deployedModelId" not in raw
        # TGI's own routes, as a Cloud Run URL or invoke reaches them: /generate answers a dict, / a list; an unknown
        # path is 404, a GET on a POST route 405, /health answers GET.
        generated = _forward_json(
            manager, "dm-tgi", "invoke", {"inputs": "Hello", "parameters": {"max_new_tokens": 4}}, "/generate"
        )
        assert isinstance(generated["generated_text"], str)
        assert isinstance(_forward_json(manager, "dm-tgi", "invoke", {"inputs": "Hi"}, "/")[0]["generated_text"], str)
        assert manager.forward("dm-tgi", "invoke", b"{}", "/chat/completions")[0] == 404  # no /v1: not a route
        assert manager.forward("dm-tgi", "invoke", b"", "/generate", method="GET")[0] == 405
        assert manager.forward("dm-tgi", "invoke", b"", "/health", method="GET")[0] == 200
        chat = {"model": "whatever-the-client-sent", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        answered = _forward_json(manager, "dm-tgi", "invoke", chat, "/v1/chat/completions")
        assert answered["model"] == "/tmp/model"  # TGI's own model id, not an echo of the request

        # TGI's /vertex route (router/src/vertex.rs, v2.4.0): the `inputs` form forces do_sample, so two seeds
        # sample differently even with do_sample: false; a chat-shaped instance at temperature 0 is greedy.
        def inputs_form(seed: int) -> str:
            params = {"max_new_tokens": 12, "do_sample": False, "seed": seed}
            body = {"instances": [{"inputs": "The capital of France is", "parameters": params}]}
            return _forward_json(manager, "dm-tgi", "predict", body)["predictions"][0]

        assert len({inputs_form(seed) for seed in range(4)}) > 1
        chat = {
            "messages": [{"role": "user", "content": "The capital of France is"}],
            "max_tokens": 8,
            "temperature": 0,
        }
        greedy = {
            _forward_json(manager, "dm-tgi", "predict", {"instances": [chat]})["predictions"][0] for _ in range(2)
        }
        assert len(greedy) == 1 and next(iter(greedy)).strip()
        # Vertex's chat-completions route lands on /vertex, which takes only `instances`.
        status, _, _ = manager.forward("dm-tgi", "chat", json.dumps(chat).encode())
        assert status == 422
    finally:
        manager.stop("dm-tgi")
    assert not manager.is_healthy("dm-tgi")
    status, _, _ = manager.forward("dm-tgi", "predict", b'{"instances": [{"inputs": "x"}]}')
    assert status == 404


@pytest.mark.slow
def test_server_crash_fault_kills_the_server_on_its_first_request(manager: ServingManager) -> None:
    manager.faults.add("server-crash")
    try:
        manager.start("dm-crash", GOOD_URI, VLLM_SPEC, timeout_s=120)
    finally:
        manager.faults.discard("server-crash")
    # Deployed and healthy: the crash waits for the first request, however fast it comes.
    assert manager.is_healthy("dm-crash")
    for _ in range(2):  # the request that meets the crash, then one to a server that stays dead
        status, data, ctype = manager.forward("dm-crash", "predict", b'{"instances": [{"prompt": "Hi"}]}')
        assert status == 503 and ctype == "application/json"
        error = json.loads(data)["error"]
        assert error["status"] == "UNAVAILABLE" and "exited with code" in error["message"], error
    assert not manager.is_healthy("dm-crash")
    assert any("server-crash" in line for line in manager.logs("dm-crash"))
    manager.stop("dm-crash")


def test_a_bad_thread_count_is_refused_naming_the_variable(
    manager: ServingManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SERVING_THREADS_ENV, "two")
    with pytest.raises(ServingError, match=f"{SERVING_THREADS_ENV}='two': set a whole number"):
        manager.start("dm-threads", GOOD_URI, VLLM_SPEC, timeout_s=120)
    assert "dm-threads" not in manager.known_ids()


@pytest.mark.slow
def test_broken_model_raises_serving_error_with_the_log_tail(manager: ServingManager) -> None:
    with pytest.raises(ServingError) as caught:
        manager.start("dm-broken", BROKEN_URI, VLLM_SPEC, timeout_s=120)
    assert any("not a valid JSON" in line for line in caught.value.log_tail), caught.value.log_tail
    assert "dm-broken" in caught.value.message
    assert "dm-broken" not in manager.known_ids()

    with pytest.raises(ServingError, match="no objects under"):
        manager.start("dm-empty", f"gs://{BUCKET}/models/nothing-here/", VLLM_SPEC)


def _gone(pid: int) -> bool:
    try:
        # A reparented child may linger as a zombie until init reaps it: that is dead too.
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        # The process exited between listing /proc and reading its stat (Linux answers ESRCH then): gone.
        return True


@pytest.mark.parametrize("fork_server", ["its own", "shared"])
def test_model_server_dies_with_the_emulator_process(work: Path, gcs: Peer, fork_server: str) -> None:
    """The emulator can be SIGKILLed (no atexit): its model servers must not outlive it, whether they were forked
    from the emulator's own fork server or from one the stacks share (the suite's, which outlives every emulator)."""
    state = work / f"orphan-{fork_server.replace(' ', '-')}"
    script = (
        "import sys, threading, time\n"
        "from pathlib import Path\n"
        "from vlp.pipelines.local.emulator.serving import ServingManager\n"
        f"m = ServingManager(Path({str(state)!r}), {gcs.url!r}, set())\n"
        f"threading.Thread(target=m.start, args=('dm-orphan', {GOOD_URI!r}, {{}}), daemon=True).start()\n"
        "time.sleep(600)\n"
    )
    repo_root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    env.pop(SHARED_FORK_SERVER_ENV, None)
    shared = None
    if fork_server == "shared":
        # One of the test's own (the session's is not started under -m "not slow"), outliving the emulator.
        shared = start_model_fork_server(python_env(env), label="model-servers:shared by one test")
        env[SHARED_FORK_SERVER_ENV] = shared.socket_path
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=repo_root, env=env)
    try:
        # Every process of it names the state dir: the model server (its command line says so), and its own fork
        # server when it has one. The emulator's script names it too: it is not counted.
        deadline = time.monotonic() + 120
        while not any(b"vlp model server dm-orphan" in line for line in _naming(state, parent.pid).values()):
            assert parent.poll() is None and time.monotonic() < deadline, "the model server never started"
            time.sleep(0.1)
        tree = set(_naming(state, parent.pid))
    finally:
        parent.kill()
        parent.wait()
    try:
        _assert_gone_with_the_emulator(state, tree, fork_server)
    finally:
        if shared is not None:
            shared.close()


def _assert_gone_with_the_emulator(state: Path, tree: set[int], fork_server: str) -> None:
    log = (state / "serving" / "dm-orphan.log").read_text()
    assert ("forked from the shared fork server" in log) == (fork_server == "shared"), log
    assert len(tree) == (2 if fork_server == "its own" else 1), tree
    deadline = time.monotonic() + 10
    while not all(_gone(pid) for pid in tree) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = [pid for pid in tree if not _gone(pid)]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)  # do not leak it into the rest of the run
    assert not survivors, "the model server (or its fork server) outlived the emulator that started it"


def _naming(state: Path, emulator_pid: int) -> dict[int, bytes]:
    """pid -> command line of the live processes whose command line names `state`, but the emulator's."""
    found = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != emulator_pid and not _gone(int(proc.name)):
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if str(state).encode() in cmdline:
                found[int(proc.name)] = cmdline
    return found


# ----- side APIs, through the emulator's HTTP server -----


@pytest.fixture(scope="module")
def hub(work: Path, tiny_model: Path) -> Iterator[tuple[Peer, str]]:
    mirrors = work / "mirrors"
    sha = publish_to_hub_mirror(tiny_model, mirrors, "acme/tiny")
    peer = start_hub_mirror(mirrors, work / "logs", state_dir=work / "olah")
    yield peer, sha
    peer.stop()


@pytest.fixture(scope="module")
def emu(work: Path, gcs: Peer, manager: ServingManager, hub: tuple[Peer, str]) -> Iterator[Emulator]:
    emulator = create_emulator(work / "emu-state", storage_endpoint=gcs.url, hub_upstream=hub[0].url, serving=manager)
    emulator.start()
    yield emulator
    emulator.stop()



def test_the_emulator_removes_serving_copies_nothing_uses_and_keeps_their_logs(tmp_path: Path, gcs: Peer) -> None:
    """Issue 37: a copy a crash left half-written, or whose deployed model went while the emulator was down, is the
    model's full size and nothing would ever remove it: the emulator removes it when it starts; the log stays."""
    state = tmp_path / "emu"
    manager = ServingManager(state, gcs.url, set())
    ghost = manager.serving_dir / "1000000999" / "model"
    ghost.mkdir(parents=True)
    (ghost / "model.safetensors").write_bytes(b"\0" * 4096)
    (manager.serving_dir / "1000000999.log").write_text("the model server's last words\n")
    emulator = create_emulator(state, storage_endpoint=gcs.url, serving=manager)
    emulator.start()
    try:
        assert not (manager.serving_dir / "1000000999").exists()
        assert (manager.serving_dir / "1000000999.log").read_text() == "the model server's last words\n"
    finally:
        emulator.stop()

def _post(url: str, body: dict, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_secret_manager_client_reads_and_writes_secrets(emu: Emulator) -> None:
    from google.cloud import secretmanager

    assert _post(emu.url + "/_emulator/secrets", {"name": "hf-token", "value": "hf_seeded"}, plumbing_headers(emu))[0] == 200
    client = secretmanager.SecretManagerServiceClient(
        transport="rest", client_options={"api_endpoint": emu.url}, credentials=as_tester(emu, PROJECT)
    )
    seeded = client.access_secret_version(name=f"projects/{PROJECT}/secrets/hf-token/versions/latest")
    assert seeded.payload.data == b"hf_seeded"
    assert seeded.payload.data_crc32c == google_crc32c.value(b"hf_seeded")
    assert seeded.name == f"projects/{PROJECT}/secrets/hf-token/versions/1"

    created = client.create_secret(
        parent=f"projects/{PROJECT}", secret_id="api-key", secret={"replication": {"automatic": {}}}
    )
    assert created.name == f"projects/{PROJECT}/secrets/api-key"
    version = client.add_secret_version(parent=created.name, payload={"data": b"v1"})
    assert version.name.endswith("/versions/1")
    client.add_secret_version(parent=created.name, payload={"data": b"v2", "data_crc32c": google_crc32c.value(b"v2")})
    assert client.access_secret_version(name=f"{created.name}/versions/latest").payload.data == b"v2"
    assert client.access_secret_version(name=f"{created.name}/versions/1").payload.data == b"v1"
    assert (emu.state_dir / "secrets.json").is_file()  # secrets survive an emulator restart
    assert (emu.state_dir / "secrets.json").stat().st_mode & 0o777 == 0o600  # the owner's only

    with pytest.raises(gexc.NotFound, match="missing"):
        client.access_secret_version(name=f"projects/{PROJECT}/secrets/missing/versions/latest")
    with pytest.raises(gexc.Conflict, match="already exists"):
        client.create_secret(parent=f"projects/{PROJECT}", secret_id="api-key", secret={})

    status, error = _post(
        f"{emu.url}/v1/projects/{PROJECT}/secrets/api-key:addVersion",
        {"payload": {"data": base64.b64encode(b"x").decode()}, "bogusField": 1},
        {"Authorization": f"Bearer {as_tester(emu, PROJECT).token}"},
    )
    assert (
        status == 400 and error["error"]["status"] == "INVALID_ARGUMENT" and "bogusField" in error["error"]["message"]
    )


def test_cloud_quotas_client_reads_limits_and_the_exhausted_fault(emu: Emulator) -> None:
    from google.cloud import cloudquotas_v1

    l4 = "CustomModelServingL4GPUsPerProjectPerRegion"
    quotas = {"quotas": {l4: {"us-central1": 4, "us-east4": 0}}, "default": 8}
    status, _ = _post(emu.url + "/_emulator/quotas", quotas, plumbing_headers(emu))
    assert status == 200
    client = cloudquotas_v1.CloudQuotasClient(
        transport="rest", client_options={"api_endpoint": emu.url}, credentials=as_tester(emu, PROJECT)
    )
    parent = f"projects/{PROJECT}/locations/global/services/aiplatform.googleapis.com"

    info = client.get_quota_info(name=f"{parent}/quotaInfos/{l4}")
    limits = {d.dimensions["region"]: d.details.value for d in info.dimensions_infos}
    assert limits["us-central1"] == 4 and limits["us-east4"] == 0 and limits["europe-west4"] == 8
    assert info.metric == "aiplatform.googleapis.com/custom_model_serving_nvidia_l4_gpus"
    assert all(d.applicable_locations == [d.dimensions["region"]] for d in info.dimensions_infos)

    unset = client.get_quota_info(name=f"{parent}/quotaInfos/CustomModelServingH200GPUsPerProjectPerRegion")
    assert {d.details.value for d in unset.dimensions_infos} == {8}
    # An id Google does not have (no source names it) is NOT_FOUND, as on Google; not a quota of 0 or of 8.
    with pytest.raises(gexc.NotFound):
        client.get_quota_info(name=f"{parent}/quotaInfos/SomethingNeverSetPerProjectPerRegion")
    # A fresh project has no Cloud Run GPU quota, with or without zonal redundancy (F10); CPU and memory it has.
    run = f"projects/{PROJECT}/locations/global/services/run.googleapis.com/quotaInfos"
    for gpu in ("NvidiaL4GpuAllocPerProjectRegion", "NvidiaL4GpuAllocNoZonalRedundancyPerProjectRegion"):
        assert {d.details.value for d in client.get_quota_info(name=f"{run}/{gpu}").dimensions_infos} == {0}
    assert {d.details.value for d in client.get_quota_info(name=f"{run}/CpuAllocPerProjectRegion").dimensions_infos} == {
        20000
    }

    listed = {q.quota_id: q for q in client.list_quota_infos(parent=parent)}
    assert l4 in listed and "CustomModelServingH100GPUsPerProjectPerRegion" in listed

    emu.faults.add("quota-exhausted")
    try:
        exhausted = client.get_quota_info(name=f"{parent}/quotaInfos/{l4}")
        assert {d.details.value for d in exhausted.dimensions_infos} == {0}
    finally:
        emu.faults.discard("quota-exhausted")


def test_cloud_logging_client_lists_model_server_logs(emu: Emulator, vllm_model: str) -> None:
    from google.cloud import logging as cloud_logging

    client = cloud_logging.Client(
        project=PROJECT,
        credentials=as_tester(emu, PROJECT),
        _use_grpc=False,
        client_options={"api_endpoint": emu.url},
    )
    entries = list(
        client.list_entries(
            filter_=f'resource.labels.deployed_model_id="{vllm_model}"',
            order_by=cloud_logging.DESCENDING,
            max_results=5,
        )
    )
    assert 0 < len(entries) <= 5
    assert all(e.resource.labels["deployed_model_id"] == vllm_model for e in entries)
    assert all(e.resource.type == "aiplatform.googleapis.com/Endpoint" for e in entries)
    assert entries[0].log_name == f"projects/{PROJECT}/logs/aiplatform.googleapis.com%2Fprediction_container"
    assert entries[0].timestamp >= entries[-1].timestamp
    assert entries[0].payload == emu.serving.logs(vllm_model, limit=1)[0]

    everything = list(client.list_entries(filter_='deployed_model_id="no-such-model"'))
    assert everything == []


def test_hub_gate_proxies_the_mirror_and_injects_gated_repos(emu: Emulator, hub: tuple[Peer, str], work: Path):
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import GatedRepoError

    endpoint = emu.url + "/hf"
    _, sha = hub
    api = HfApi(endpoint=endpoint)
    assert api.model_info("acme/tiny").sha == sha

    local = Path(snapshot_download("acme/tiny", endpoint=endpoint, cache_dir=work / "hf-cache"))
    assert sorted(p.name for p in local.iterdir()) == sorted(p.name for p in (work / "tiny-llama").iterdir())
    assert (local / "model.safetensors").read_bytes() == (work / "tiny-llama" / "model.safetensors").read_bytes()

    request = urllib.request.Request(f"{endpoint}/acme/tiny/resolve/{sha}/config.json", headers={"Range": "bytes=0-9"})
    with urllib.request.urlopen(request) as response:
        size = (work / "tiny-llama" / "config.json").stat().st_size
        assert response.status == 206 and response.headers["Content-Range"] == f"bytes 0-9/{size}"
        assert response.read() == (work / "tiny-llama" / "config.json").read_bytes()[:10]
    # Ranges anywhere in a file, as a mirror reads it in parts (served from the blob the gate extracted once).
    weights = (work / "tiny-llama" / "model.safetensors").read_bytes()
    n = len(weights)
    for asked, first, last in (("1000-1999", 1000, 1999), ("-7", n - 7, n - 1), (f"{n - 5}-", n - 5, n - 1)):
        request = urllib.request.Request(
            f"{endpoint}/acme/tiny/resolve/{sha}/model.safetensors", headers={"Range": f"bytes={asked}"}
        )
        with urllib.request.urlopen(request) as response:
            assert response.status == 206 and response.headers["Content-Range"] == f"bytes {first}-{last}/{n}"
            assert response.read() == weights[first : last + 1], asked
    request = urllib.request.Request(
        f"{endpoint}/acme/tiny/resolve/{sha}/model.safetensors", headers={"Range": f"bytes={n}-"}
    )
    with pytest.raises(urllib.error.HTTPError) as past_the_end:
        urllib.request.urlopen(request)
    assert past_the_end.value.code == 416 and past_the_end.value.headers["Content-Range"] == f"bytes */{n}"

    emu.faults.add("hub-gated")
    try:
        with pytest.raises(GatedRepoError, match="acme/tiny"):
            api.model_info("acme/tiny")
        with pytest.raises(GatedRepoError):
            hf_hub_download("acme/tiny", "config.json", endpoint=endpoint, cache_dir=work / "hf-cache-gated")
    finally:
        emu.faults.discard("hub-gated")


def test_a_model_garden_hub_id_model_downloads_from_the_stacks_hub_with_the_containers_token(
    emu: Emulator, manager: ServingManager
) -> None:
    """Issue 35: Model Garden's notebooks deploy `--model=ORG/NAME` by default; the image downloads the repo from the
    Hub itself. The stack could not deploy it though it has a Hub: now the model comes from its Hub gate, with the
    container's HF_TOKEN, and a gated repo without access fails the deploy naming the token."""
    from vlp.pipelines.local.emulator.core import _weights_source

    spec = {**VLLM_SPEC, "args": [a if not a.startswith("--model=") else "--model=acme/tiny" for a in VLLM_SPEC["args"]]}
    source = _weights_source({"containerSpec": spec})
    assert source == "hf://acme/tiny"
    manager.start("dm-hub-id", source, spec, timeout_s=120)
    try:
        answer = _forward_json(manager, "dm-hub-id", "rawPredict", {"prompt": "Hi", "max_tokens": 2})
        assert answer["text"][0].startswith("Hi")
    finally:
        manager.stop("dm-hub-id", remove_copy=True)
    emu.faults.add("hub-gated")
    try:
        with pytest.raises(ServingError, match="acme/tiny is gated: the container's HF_TOKEN"):
            manager.start("dm-hub-gated", source, spec, timeout_s=60)
    finally:
        emu.faults.discard("hub-gated")
        manager.stop("dm-hub-gated", remove_copy=True)
