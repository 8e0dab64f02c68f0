"""The local peers behave like the cloud for our clients: models load, the mirror serves revisions, GCS stores."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from transformers import AutoModelForCausalLM, AutoTokenizer

from vlp.pipelines.local.models import MODEL_FILES, build_tiny_llama, publish_to_hub_mirror
from vlp.pipelines.local.peers import LocalStack, Peer, start_fake_gcs

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _greedy_answer(model_dir: Path, max_new_tokens: int) -> tuple[str, int]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    inputs = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    new_tokens = out[0][inputs["input_ids"].shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True), len(new_tokens)


def test_tiny_llama_loads_generates_and_is_deterministic(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert all((tiny_model_dir / name).is_file() for name in MODEL_FILES)
    size = sum(p.stat().st_size for p in tiny_model_dir.iterdir())
    assert size < 1_000_000, f"tiny model grew to {size} bytes"

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    answer, n_tokens = _greedy_answer(tiny_model_dir, max_new_tokens=8)
    assert 0 < n_tokens <= 8 and answer.strip(), "a random model should still emit visible text"

    # Same seed, same bytes: revisions published from a rebuild do not churn.
    again = build_tiny_llama(tmp_path / "again")
    for name in MODEL_FILES:
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    # Idempotent: a complete directory is left as it is.
    mtime = (again / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_llama(again) == again
    assert (again / "model.safetensors").stat().st_mtime_ns == mtime


def test_smollm2_answers_paris(smollm2_model_dir: Path) -> None:
    config = json.loads((smollm2_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    answer, _ = _greedy_answer(smollm2_model_dir, max_new_tokens=20)
    assert "Paris" in answer, answer


def test_hub_mirror_serves_published_revisions(hub_mirror, tiny_model_dir: Path, tmp_path: Path) -> None:
    repo_id = "vlp-test/tiny-llama"
    sha = hub_mirror.publish(tiny_model_dir, repo_id)
    assert len(sha) == 40
    assert hub_mirror.publish(tiny_model_dir, repo_id) == sha, "same content, same revision"
    assert publish_to_hub_mirror(tiny_model_dir, tmp_path / "fresh-mirror", repo_id) == sha, "history is content"

    api = HfApi(endpoint=hub_mirror.url)
    # olah offline resolves metadata only through the revision route: model_info needs a revision.
    assert api.model_info(repo_id, revision="main").sha == sha
    assert sorted(api.list_repo_files(repo_id, revision=sha)) == sorted(MODEL_FILES)
    infos = {info.path: info.size for info in api.get_paths_info(repo_id, list(MODEL_FILES), revision=sha)}
    assert infos == {name: (tiny_model_dir / name).stat().st_size for name in MODEL_FILES}

    local = Path(snapshot_download(repo_id, endpoint=hub_mirror.url, revision=sha, local_dir=tmp_path / "snap"))
    match, mismatch, errors = filecmp.cmpfiles(tiny_model_dir, local, MODEL_FILES, shallow=False)
    assert (mismatch, errors) == ([], [])
    config = hf_hub_download(repo_id, "config.json", endpoint=hub_mirror.url, cache_dir=tmp_path / "cache")
    assert Path(config).read_bytes() == (tiny_model_dir / "config.json").read_bytes()
    assert f"/snapshots/{sha}/" in config

    # A changed model is a new revision; the old sha still serves the old bytes.
    changed = tmp_path / "changed"
    shutil.copytree(tiny_model_dir, changed)
    (changed / "generation_config.json").write_text(json.dumps({"max_new_tokens": 7}))
    sha2 = hub_mirror.publish(changed, repo_id)
    assert sha2 != sha
    assert api.model_info(repo_id, revision="main").sha == sha2
    old = hf_hub_download(
        repo_id, "generation_config.json", endpoint=hub_mirror.url, revision=sha, cache_dir=tmp_path / "c2"
    )
    new = hf_hub_download(
        repo_id, "generation_config.json", endpoint=hub_mirror.url, revision=sha2, cache_dir=tmp_path / "c2"
    )
    assert Path(old).read_bytes() == (tiny_model_dir / "generation_config.json").read_bytes()
    assert json.loads(Path(new).read_text()) == {"max_new_tokens": 7}


@pytest.fixture
def gcs_client(fake_gcs: Peer) -> Iterator[storage.Client]:
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = fake_gcs.url
    try:
        yield storage.Client(project="vlp-local", credentials=AnonymousCredentials())
    finally:
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous


def test_fake_gcs_round_trip_with_resumable_upload(gcs_client: storage.Client, fake_gcs: Peer) -> None:
    bucket = gcs_client.create_bucket("vlp-round-trip")
    payload = os.urandom(9 * 1024 * 1024 + 17)  # > 8 MB: the client uploads it in resumable chunks
    blob = bucket.blob("models/org/name/sha/model.safetensors", chunk_size=4 * 1024 * 1024)
    blob.upload_from_string(payload)
    stored = bucket.get_blob("models/org/name/sha/model.safetensors")
    assert stored is not None and stored.size == len(payload)
    assert stored.download_as_bytes() == payload
    assert stored.download_as_bytes(start=1000, end=1999) == payload[1000:2000]

    # A resumable session's Location must point back at this server's port, or follow-up chunks go astray.
    session = bucket.blob("session.bin").create_resumable_upload_session(size=5)
    assert session.startswith(fake_gcs.url + "/"), session
    req = urllib.request.Request(session, data=b"hello", method="PUT")
    with urllib.request.urlopen(req) as resp:
        assert resp.status == 200
    assert bucket.blob("session.bin").download_as_bytes() == b"hello"
    assert sorted(b.name for b in gcs_client.list_blobs("vlp-round-trip")) == [
        "models/org/name/sha/model.safetensors",
        "session.bin",
    ]


def test_fake_gcs_filesystem_backend_persists_across_restarts(tmp_path: Path) -> None:
    data_dir = tmp_path / "gcs"
    for round_ in range(2):
        peer = start_fake_gcs(data_dir, tmp_path / "logs")
        try:
            os.environ["STORAGE_EMULATOR_HOST"] = peer.url
            client = storage.Client(project="vlp-local", credentials=AnonymousCredentials())
            if round_ == 0:
                client.create_bucket("persisted").blob("a.txt").upload_from_string(b"kept")
            else:
                assert client.bucket("persisted").blob("a.txt").download_as_bytes() == b"kept"
        finally:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
            peer.stop()
        assert not peer.alive()


def test_local_stack_starts_and_stops(tmp_path: Path) -> None:
    with LocalStack(tmp_path / "state") as stack:
        peers = [stack.gcs, stack.hub, stack.emulator]
        assert all(p is not None and p.alive() for p in peers)
        account = "vlp-pipeline@local-project.iam.gserviceaccount.com"
        env = stack.env(account)
        # Cloud Storage is reached through the emulator, which checks IAM before fake-gcs-server sees a request.
        assert env["STORAGE_EMULATOR_HOST"] == stack.storage_endpoint == stack.emulator.url != stack.gcs_backend
        assert env["HF_ENDPOINT"] == stack.emulator.url + "/hf"
        assert env["VLP_API_ENDPOINT"] == stack.api_endpoint == stack.emulator.url
        assert env["GCE_METADATA_HOST"] == stack.emulator.url.removeprefix("http://") + f"/_md/{account}"
        assert "HF_HUB_OFFLINE" not in env
        listing = f"{stack.storage_endpoint}/storage/v1/b?project=local-project"
        with pytest.raises(urllib.error.HTTPError) as anonymous:
            urllib.request.urlopen(listing)
        assert anonymous.value.code == 401
        owner = stack.bootstrap_owner("local-project")
        request = urllib.request.Request(listing, headers={"Authorization": f"Bearer {stack.token(owner)}"})
        with urllib.request.urlopen(request) as resp:
            assert resp.status == 200
    assert not any(p.alive() for p in peers)
    assert all(p.log_path.is_file() for p in peers)
