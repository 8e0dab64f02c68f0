"""Tests for the Hub -> GCS mirror against real local servers: olah, a range-capable Hub stand-in, fake-gcs-server."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.hub_server import HubServer
from vlp.components.clients import storage_client
from vlp.components.mirror.weights import (
    MANIFEST_NAME,
    GatedRepoAccessError,
    MirrorError,
    MirrorIntegrityError,
    MirrorProgress,
    mirror_from_config,
    mirror_weights,
    mirror_weights_op,
    select_files,
)
from vlp.components.planning.catalog import mirror_machine_for
from vlp.pipelines.local.peers import LocalStack

REPO_ROOT = Path(__file__).resolve().parents[1]
KiB = 1 << 10
MiB = 1 << 20

SYNTH = "acme/synth-8b"
SLOW = "acme/slow-70b"
SYNTH_SELECTED = [
    "config.json",
    "model-00001-of-00004.safetensors",
    "model-00002-of-00004.safetensors",
    "model-00003-of-00004.safetensors",
    "model-00004-of-00004.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
]


def _write_repo(d: Path, shards: int, shard_bytes: int, seed: int) -> None:
    d.mkdir(parents=True, exist_ok=True)
    rng = __import__("random").Random(seed)
    for i in range(shards):
        # Sizes that are not multiples of the part size or of GCS's 256 KiB chunk: tails get exercised.
        size = shard_bytes + 4099 * i
        (d / f"model-{i + 1:05d}-of-{shards:05d}.safetensors").write_bytes(rng.randbytes(size))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (d / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}}))
    (d / "tokenizer_config.json").write_text("{}")
    # What the defaults must leave out: duplicates and formats serving engines do not read.
    (d / "original").mkdir(exist_ok=True)
    (d / "original" / "consolidated.00.pth").write_bytes(b"p" * 5000)
    (d / "pytorch_model.bin").write_bytes(b"b" * 5000)
    (d / "model.gguf").write_bytes(b"g" * 5000)
    (d / "README.md").write_text("# synthetic\n")


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hub")
    _write_repo(root / SYNTH, shards=4, shard_bytes=1 * MiB + 12345, seed=1)
    _write_repo(root / SLOW, shards=4, shard_bytes=2 * MiB, seed=2)
    return root


@pytest.fixture
def hub(hub_root: Path) -> Iterator[HubServer]:
    with HubServer(hub_root) as server:
        yield server


@pytest.fixture
def bucket(fake_gcs, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", fake_gcs.url)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    name = f"mirror-{uuid.uuid4().hex[:10]}"
    storage_client().create_bucket(name)
    return name


def _objects(bucket: str, prefix: str = "") -> dict[str, object]:
    return {b.name: b for b in storage_client().list_blobs(bucket, prefix=prefix)}


def _object_bytes(bucket: str, name: str) -> bytes:
    return storage_client().bucket(bucket).blob(name).download_as_bytes()


def _vouched(blob: object) -> bool:
    return (getattr(blob, "metadata", None) or {}).get("vlp-crc32c") == getattr(blob, "crc32c", None)


def _prefix(result_uri: str, bucket: str) -> str:
    return result_uri.removeprefix(f"gs://{bucket}/")


def _assert_mirrored(bucket: str, uri: str, src: Path, expected: list[str]) -> dict:
    prefix = _prefix(uri, bucket)
    objects = _objects(bucket, prefix)
    names = sorted(n[len(prefix) :] for n in objects if not n.endswith(MANIFEST_NAME))
    assert names == sorted(expected)
    for rel in expected:
        assert _object_bytes(bucket, prefix + rel) == (src / rel).read_bytes(), rel
    manifest = json.loads(_object_bytes(bucket, prefix + MANIFEST_NAME))
    assert sorted(e["path"] for e in manifest["files"]) == sorted(expected)
    for e in manifest["files"]:
        assert e["size"] == (src / e["path"]).stat().st_size
        assert e["crc32c"] == objects[prefix + e["path"]].crc32c
    return manifest


# --------------------------------------------------------------------------------------------------


def test_select_files_takes_what_engines_load() -> None:
    paths = [
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "special_tokens_map.json",
        "chat_template.jinja",
        "preprocessor_config.json",
        "original/consolidated.00.pth",
        "original/params.json",
        "original/tokenizer.model",
        "pytorch_model.bin",
        "model.gguf",
        "README.md",
        ".gitattributes",
    ]
    assert select_files(paths) == sorted(
        [
            "chat_template.jinja",
            "config.json",
            "generation_config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "preprocessor_config.json",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer.model",
            "tokenizer_config.json",
        ]
    )
    # A repo without safetensors: the engines load the PyTorch shards, so they are taken.
    assert "pytorch_model.bin" in select_files(["config.json", "pytorch_model.bin"])
    # Overrides replace the defaults.
    assert select_files(paths, allow_patterns=["original/"], ignore_patterns=["*.pth"]) == [
        "original/params.json",
        "original/tokenizer.model",
    ]


def test_mirror_machine_for_scales_network_with_size() -> None:
    assert mirror_machine_for(16 * 10**9)["machine_type"] == "e2-standard-4"
    assert mirror_machine_for(140 * 10**9)["machine_type"] == "n2-standard-8"
    big = mirror_machine_for(410 * 10**9)
    assert big["machine_type"] == "n2-standard-16"
    assert big["boot_disk_size_gb"] == 100  # nothing is staged on disk, whatever the model's size
    assert int(big["timeout"].removesuffix("s")) >= 3600


def test_mirror_from_olah_then_rerun_is_a_noop(hub_mirror, tiny_model_dir: Path, bucket: str) -> None:
    sha = hub_mirror.publish(tiny_model_dir, "acme/tiny-llama")
    result = mirror_weights("acme/tiny-llama", "main", bucket, hf_endpoint=hub_mirror.url)

    assert result.revision_sha == sha
    assert result.weights_uri == f"gs://{bucket}/models/acme/tiny-llama/{sha}/"
    assert not result.skipped and result.kept_files == 0
    files = sorted(p.name for p in tiny_model_dir.iterdir() if p.is_file())
    assert result.files == len(files)
    manifest = _assert_mirrored(bucket, result.weights_uri, tiny_model_dir, files)
    assert manifest["revision_sha"] == sha and manifest["revision"] == "main"
    # olah serves plain git blobs: each file was checked against its git blob sha1.
    for e in manifest["files"]:
        data = (tiny_model_dir / e["path"]).read_bytes()
        assert e["git_sha1"] == hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    t = time.monotonic()
    again = mirror_weights("acme/tiny-llama", "main", bucket, hf_endpoint=hub_mirror.url)
    assert again.skipped and again.weights_uri == result.weights_uri
    assert time.monotonic() - t < 5
    # Pinned to the sha, a complete mirror needs no Hub at all (a redeploy while the Hub is down).
    offline = mirror_weights("acme/tiny-llama", sha, bucket, hf_endpoint="http://127.0.0.1:9")
    assert offline.skipped and offline.transferred_bytes == 0


def test_parallel_ranges_via_cdn_redirect_with_bounded_memory(hub_root: Path, bucket: str) -> None:
    snapshots: list[MirrorProgress] = []
    with HubServer(hub_root, gated_tokens={"hf_testtoken"}) as hub:
        result = mirror_weights(
            SYNTH,
            "main",
            bucket,
            hf_endpoint=hub.url,
            token="hf_testtoken",
            max_workers=4,
            part_size=256 * KiB,
            max_memory_bytes=1 * MiB,
            upload_streams=2,
            progress=snapshots.append,
        )
        stats = hub.stats()
    _assert_mirrored(bucket, result.weights_uri, hub_root / SYNTH, SYNTH_SELECTED)
    shard_bytes = sum((hub_root / SYNTH / p).stat().st_size for p in SYNTH_SELECTED if p.endswith(".safetensors"))
    assert stats["range_requests"] >= shard_bytes // (256 * KiB)  # parts, not whole files
    assert stats["cdn_auth_headers"] == 0  # the token goes to the Hub, never to the CDN host
    assert result.transferred_bytes == result.bytes
    last = snapshots[-1]
    assert last.bytes_done == last.bytes_total == result.bytes and last.files_done == len(SYNTH_SELECTED)


_KILLABLE = """
import sys
sys.path.insert(0, {root!r})
from vlp.components.mirror.weights import mirror_weights
mirror_weights({repo!r}, "main", {bucket!r}, hf_endpoint={hub!r}, max_workers=2, part_size=256 * 1024,
               max_memory_bytes=1 << 20, upload_streams=2)
"""


def test_resume_after_kill_mid_file_transfers_only_what_is_missing(hub_root: Path, bucket: str) -> None:
    src = hub_root / SLOW
    with HubServer(hub_root, cap_bytes_per_s=1.5e6) as hub:
        code = _KILLABLE.format(root=str(REPO_ROOT), repo=SLOW, bucket=bucket, hub=hub.url)
        proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ))
        try:
            deadline = time.monotonic() + 30
            done: dict[str, object] = {}
            while time.monotonic() < deadline and proc.poll() is None:
                done = {n: b for n, b in _objects(bucket).items() if n.endswith(".safetensors") and _vouched(b)}
                if done:
                    break
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
        assert done, "the mirror finished no file within 30 s"
        fetched_before_kill = hub.stats()["body_bytes"]

        # What the mirror vouched for (its crc32c mark written after the checked upload) is kept; an object killed
        # between its upload and that mark is sent again.
        kept = {n.rsplit("/", 1)[1] for n, b in _objects(bucket).items() if n.endswith(".safetensors") and _vouched(b)}
        sizes = {p: (src / p).stat().st_size for p in SYNTH_SELECTED}
        kept_bytes = sum(sizes[p] for p in kept)
        assert 1 <= len(kept) < 4, kept
        assert fetched_before_kill > kept_bytes  # it was killed with a file half-way through
        assert not any(n.endswith(MANIFEST_NAME) for n in _objects(bucket))

        hub.reset_stats()
        result = mirror_weights(SLOW, "main", bucket, hf_endpoint=hub.url, max_workers=4, part_size=256 * KiB)
        assert result.kept_files == len(kept)
        assert result.transferred_bytes == sum(sizes.values()) - kept_bytes
        # Nothing kept was fetched again: beyond the missing bytes only a 1-byte range probe (and what the
        # server was still sending to the killed process) reached the wire, far less than one shard.
        assert hub.stats()["body_bytes"] - result.transferred_bytes < 512 * KiB
    _assert_mirrored(bucket, result.weights_uri, src, SYNTH_SELECTED)


def test_wrong_hub_checksum_is_an_error_naming_the_file(hub_root: Path, bucket: str) -> None:
    bad = "model-00002-of-00004.safetensors"
    with HubServer(hub_root, wrong_sha256={bad}) as hub:
        with pytest.raises(MirrorIntegrityError, match=bad) as err:
            mirror_weights(SYNTH, "main", bucket, hf_endpoint=hub.url, part_size=256 * KiB, max_workers=4)
    assert "sha256" in str(err.value)
    names = _objects(bucket)
    assert not any(n.endswith(bad) for n in names)  # a file that failed verification never becomes an object
    assert not any(n.endswith(MANIFEST_NAME) for n in names)


def test_object_changed_in_gcs_is_transferred_again(hub: HubServer, hub_root: Path, bucket: str) -> None:
    first = mirror_weights(SYNTH, "main", bucket, hf_endpoint=hub.url, part_size=256 * KiB)
    prefix = _prefix(first.weights_uri, bucket)
    victim = "model-00003-of-00004.safetensors"
    size = (hub_root / SYNTH / victim).stat().st_size
    storage_client().bucket(bucket).blob(prefix + victim).upload_from_string(b"\0" * size)

    second = mirror_weights(SYNTH, "main", bucket, hf_endpoint=hub.url, part_size=256 * KiB)
    assert not second.skipped
    assert second.kept_files == len(SYNTH_SELECTED) - 1
    assert second.transferred_bytes == size
    _assert_mirrored(bucket, second.weights_uri, hub_root / SYNTH, SYNTH_SELECTED)


def test_other_bytes_under_the_mirrors_metadata_are_transferred_again(
    hub: HubServer, hub_root: Path, bucket: str
) -> None:
    """Metadata can be copied onto other content (`gcloud storage cp` keeps it): the mirror's own mark says which
    bytes it verified (their crc32c), and GCS's crc32c of what the object holds now must still equal it."""
    first = mirror_weights(SYNTH, "main", bucket, hf_endpoint=hub.url, part_size=256 * KiB)
    prefix = _prefix(first.weights_uri, bucket)
    victim = "model-00002-of-00004.safetensors"
    blob = storage_client().bucket(bucket).get_blob(prefix + victim)
    assert blob is not None and blob.metadata["vlp-crc32c"] == blob.crc32c
    size = blob.size
    forged = storage_client().bucket(bucket).blob(prefix + victim)
    forged.metadata = dict(blob.metadata)  # every vlp-* key as the mirror wrote it
    forged.upload_from_string(b"\1" * size)
    storage_client().bucket(bucket).blob(prefix + MANIFEST_NAME).delete()  # as after a crash mid-mirror

    second = mirror_weights(SYNTH, "main", bucket, hf_endpoint=hub.url, part_size=256 * KiB)
    assert second.kept_files == len(SYNTH_SELECTED) - 1
    assert second.transferred_bytes == size
    _assert_mirrored(bucket, second.weights_uri, hub_root / SYNTH, SYNTH_SELECTED)


def test_gated_repo_needs_a_token_with_access(hub_root: Path, bucket: str) -> None:
    with HubServer(hub_root, gated_tokens={"hf_granted"}) as hub:
        with pytest.raises(GatedRepoAccessError) as no_token:
            mirror_weights(SYNTH, "main", bucket, hf_endpoint=hub.url)
        assert "model.hf_token_secret" in str(no_token.value) and "no Hub token" in str(no_token.value)

        with pytest.raises(GatedRepoAccessError) as wrong:
            mirror_weights(SYNTH, "main", bucket, hf_endpoint=hub.url, token="hf_revokedSECRETvalue")
        message = str(wrong.value)
        assert f"{SYNTH} is gated and the token has no access" in message
        assert "accept the licence" in message and "model.hf_token_secret" in message
        assert "hf_revokedSECRETvalue" not in message
        assert not _objects(bucket)  # refused before anything was written

        ok = mirror_weights(SYNTH, "main", bucket, hf_endpoint=hub.url, token="hf_granted")
        assert ok.files == len(SYNTH_SELECTED)


def test_gated_repo_through_the_emulator_hub_gate(local_stack, tiny_model_dir: Path, monkeypatch) -> None:
    from vlp.components.config import config_from_dict
    from vlp.pipelines.local.models import publish_to_hub_mirror
    from vlp.pipelines.local.runner import setup_local

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", local_stack.storage_endpoint)
    bucket = f"gated-{uuid.uuid4().hex[:8]}"
    gated = config_from_dict(
        {
            "name": "gated",
            "model": {"repo": "meta-llama/Tiny-Gated", "hf_token_secret": "hf-token"},
            "endpoint": {"name": "gated"},
        }
    )
    # `vlp setup` (the bucket, the secret's grant), then the mirror runs as the pipeline's account.
    _, account = setup_local(local_stack, gated, project="local-project", bucket=bucket, region="us-central1")
    for key, value in local_stack.env(account).items():
        if key.startswith("GCE_METADATA"):
            monkeypatch.setenv(key, value)

    publish_to_hub_mirror(tiny_model_dir, local_stack.mirrors_dir, "meta-llama/Tiny-Gated")
    api = local_stack.api_endpoint

    def post(path: str, body: dict) -> None:
        headers = {"Content-Type": "application/json", **local_stack.plumbing_headers}
        req = urllib.request.Request(api + path, data=json.dumps(body).encode(), headers=headers, method="POST")
        urllib.request.urlopen(req, timeout=10).read()

    post("/_emulator/secrets", {"name": "hf-token", "value": "hf_NOACCESStoken"})
    post("/_emulator/faults", {"faults": ["hub-gated"]})
    try:
        with pytest.raises(GatedRepoAccessError, match="no Hub token"):
            mirror_weights("meta-llama/Tiny-Gated", "main", bucket, hf_endpoint=local_stack.hf_endpoint)
        cfg = config_from_dict(
            {
                "name": "gated",
                "model": {"repo": "meta-llama/Tiny-Gated", "hf_token_secret": "hf-token"},
                "endpoint": {"name": "gated"},
            }
        )
        monkeypatch.setenv("HF_ENDPOINT", local_stack.hf_endpoint)
        with pytest.raises(GatedRepoAccessError, match="the token has no access") as err:
            mirror_from_config(cfg, bucket=bucket, project="local-project", api_endpoint=api)
        assert "hf_NOACCESStoken" not in str(err.value)
    finally:
        post("/_emulator/faults", {"faults": []})
    # With the gate open the same config mirrors through the emulator's Hub proxy (which honours Range).
    result = mirror_from_config(cfg, bucket=bucket, project="local-project", api_endpoint=api)
    assert result.files == len([p for p in tiny_model_dir.iterdir() if p.is_file()])


def test_429_storm_completes_with_backoff(hub_root: Path, bucket: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vlp.mirror")
    # Every third request to the Hub (API calls, probes, range GETs) is answered 429 with Retry-After: 0.
    with HubServer(hub_root, fail_429_every=3, retry_after_s=0) as hub:
        result = mirror_weights(SYNTH, "main", bucket, hf_endpoint=hub.url, part_size=256 * KiB, max_workers=4)
        stats = hub.stats()
    assert stats["status_429"] >= 10
    assert any("retrying" in r.getMessage() and "429" in r.getMessage() for r in caplog.records)
    _assert_mirrored(bucket, result.weights_uri, hub_root / SYNTH, SYNTH_SELECTED)


def test_missing_bucket_is_named(hub: HubServer, fake_gcs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", fake_gcs.url)
    with pytest.raises(MirrorError, match="gs://no-such-bucket-xyz does not exist"):
        mirror_weights(SYNTH, "main", "no-such-bucket-xyz", hf_endpoint=hub.url)


def test_kfp_op_mirrors_the_deployment(hub: HubServer, hub_root: Path, bucket: str, monkeypatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    cfg = {
        "name": "synth",
        "model": {"repo": SYNTH, "allow_patterns": ["*.safetensors", "config.json"]},
        "endpoint": {"name": "synth"},
        "placement": {"project": "local-project", "bucket": bucket},
    }
    sha = hub.repos[SYNTH].sha
    deployment = {"config": json.dumps(cfg), "project": "local-project", "bucket": bucket, "revision_sha": sha}
    outputs = mirror_weights_op(deployment, "")
    assert outputs.revision_sha == sha
    assert outputs.weights_uri == f"gs://{bucket}/models/{SYNTH}/{sha}/"
    expected = [p for p in SYNTH_SELECTED if p.endswith(".safetensors")] + ["config.json"]
    _assert_mirrored(bucket, outputs.weights_uri, hub_root / SYNTH, expected)


def test_bytes_changed_under_the_local_gcs_are_found_and_sent_again(
    local_stack, tiny_model_dir: Path, monkeypatch
) -> None:
    """GCS computes crc32c from an object's content; so does the local stack's storage gate (fake-gcs-server keeps
    the upload-time value): a complete manifest over changed bytes is not a no-op, and the object is sent again."""
    from vlp.components.config import config_from_dict
    from vlp.pipelines.local.models import publish_to_hub_mirror
    from vlp.pipelines.local.runner import setup_local

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", local_stack.storage_endpoint)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    bucket = f"rot-{uuid.uuid4().hex[:8]}"
    cfg = config_from_dict({"name": "rot", "model": {"repo": "acme/rot-tiny"}, "endpoint": {"name": "rot"}})
    _, account = setup_local(local_stack, cfg, project="local-project", bucket=bucket, region="us-central1")
    for key, value in local_stack.env(account).items():
        if key.startswith("GCE_METADATA"):
            monkeypatch.setenv(key, value)
    publish_to_hub_mirror(tiny_model_dir, local_stack.mirrors_dir, "acme/rot-tiny")
    first = mirror_weights("acme/rot-tiny", "main", bucket, hf_endpoint=local_stack.hf_endpoint)
    prefix = _prefix(first.weights_uri, bucket)
    on_disk = local_stack.state_dir / "gcs" / bucket / prefix / "model.safetensors"
    original = on_disk.read_bytes()
    on_disk.write_bytes(bytes(len(original)))  # the same size, other bytes: only a checksum of the content sees it

    second = mirror_weights("acme/rot-tiny", "main", bucket, hf_endpoint=local_stack.hf_endpoint)
    assert not second.skipped
    assert second.transferred_bytes == len(original)
    assert second.kept_files == first.files - 1
    assert on_disk.read_bytes() == original


@pytest.mark.slow
def test_transformers_loads_a_tokenizer_from_the_local_hub_mirror(
    local_stack: LocalStack, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """`AutoTokenizer.from_pretrained(repo)` with HF_ENDPOINT at the stack's Hub, as a person would: transformers
    lists the repo's `additional_chat_templates/` folder, which the repo lacks. The Hub answers 404 EntryNotFound
    (transformers goes on); the offline olah mirror answered 401, read as a missing or private repo."""
    from vlp.pipelines.local.models import publish_to_hub_mirror

    publish_to_hub_mirror(tiny_model_dir, local_stack.mirrors_dir, "acme/tok-tiny")
    code = (
        "from huggingface_hub import HfApi\n"
        "from huggingface_hub.errors import RemoteEntryNotFoundError\n"
        "from transformers import AutoTokenizer\n"
        "tok = AutoTokenizer.from_pretrained('acme/tok-tiny')\n"
        "print('vocab', len(tok))\n"
        "try:\n"
        "    list(HfApi().list_repo_tree('acme/tok-tiny', path_in_repo='no-such-folder'))\n"
        "except RemoteEntryNotFoundError:\n"
        "    print('entry not found')\n"
        "print(sorted(e.path for e in HfApi().list_repo_tree('acme/tok-tiny'))[:3])\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env.update(HF_ENDPOINT=local_stack.hf_endpoint, HF_HUB_CACHE=str(tmp_path / "hf-cache"))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("vocab ") and int(lines[0].split()[1]) > 0
    assert lines[1] == "entry not found"
    assert "config.json" in lines[2]
