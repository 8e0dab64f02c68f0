"""Mirrors a pinned Hugging Face Hub revision into GCS: streamed, parallel, resumable, verified and idempotent.

This module holds what to mirror (file selection), the manifest that makes a repeat a no-op, the public entry
points and the pipeline step; the Hub side is hub.py, the transfer engine transfer.py."""

from __future__ import annotations

import fnmatch
import json
import os
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from vlp.components.config import DeploymentConfig


from vlp.components.mirror.hub import (
    BIN_FALLBACK_PATTERNS,
    DEFAULT_ALLOW_PATTERNS,
    DEFAULT_IGNORE_PATTERNS,
    GCS_ALIGN,
    GatedRepoAccessError,
    GiB,
    HubFile,
    MiB,
    MirrorError,
    MirrorIntegrityError,
    MirrorProgress,
    MirrorResult,
    _gated_message,
    _Hub,
    log,
)
from vlp.components.mirror.manifest import MANIFEST_FORMAT, MANIFEST_NAME, read_manifest, weights_prefix
from vlp.components.mirror.transfer import (
    _Job,
    _Progress,
    _Transfer,
    _verified_in_gcs,
)

# --------------------------------------------------------------------------------------------------
# File selection and machine sizing


def _matches(path: str, patterns: Iterable[str]) -> bool:
    for pat in patterns:
        if pat.endswith("/"):
            pat += "*"
        if fnmatch.fnmatchcase(path, pat) or fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pat):
            return True
    return False


def select_files(
    paths: Iterable[str], allow_patterns: list[str] | None = None, ignore_patterns: list[str] | None = None
) -> list[str]:
    """The repo files to mirror: `allow_patterns` minus `ignore_patterns` (defaults: what serving engines load).

    A pattern matches the whole path or the file name (fnmatch); `dir/` means everything under dir.
    """
    paths = list(paths)
    allow = list(allow_patterns) if allow_patterns else list(DEFAULT_ALLOW_PATTERNS)
    ignore = list(ignore_patterns) if ignore_patterns else list(DEFAULT_IGNORE_PATTERNS)
    if not allow_patterns and not any(p.endswith(".safetensors") for p in paths):
        allow += BIN_FALLBACK_PATTERNS
    return sorted(p for p in paths if _matches(p, allow) and not _matches(p, ignore))


def mirror_tuning_for(cpus: int | None = None, memory_bytes: int | None = None) -> dict[str, int]:
    """max_workers / max_memory_bytes for the machine the step runs on (more connections on more cores)."""
    cpus = cpus or os.cpu_count() or 2
    if memory_bytes is None:
        try:
            memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            memory_bytes = 4 * GiB
    workers = max(8, min(64, 4 * cpus))
    budget = max(512 * MiB, min(8 * GiB, memory_bytes // 4))
    return {"max_workers": workers, "max_memory_bytes": int(budget)}


# --------------------------------------------------------------------------------------------------
# Public API


_weights_prefix = weights_prefix
_read_manifest = read_manifest


def _list_objects(client: Any, bucket: Any, prefix: str) -> dict[str, Any]:
    from google.api_core.exceptions import NotFound

    try:
        return {b.name: b for b in client.list_blobs(bucket, prefix=prefix)}
    except NotFound:
        raise MirrorError(
            f"bucket gs://{bucket.name} does not exist: create it (gcloud storage buckets create gs://{bucket.name} "
            "--location=REGION) or set placement.bucket"
        ) from None


def _manifest_complete(
    manifest: dict[str, Any] | None, objects: dict[str, Any], prefix: str, files: list[HubFile] | None
) -> bool:
    if not manifest:
        return False
    entries = manifest.get("files") or []
    if files is not None:
        want = {(f.path, f.size) for f in files}
        if want != {(e.get("path"), e.get("size")) for e in entries}:
            return False
    for e in entries:
        blob = objects.get(prefix + str(e.get("path")))
        if blob is None or blob.size != e.get("size") or blob.crc32c != e.get("crc32c"):
            return False
    return True


def mirror_weights(
    repo: str,
    revision: str,
    bucket: str,
    *,
    prefix: str = "models",
    allow_patterns: list[str] | None = None,
    ignore_patterns: list[str] | None = None,
    token: str | None = None,
    hf_endpoint: str | None = None,
    project: str | None = None,
    max_workers: int = 8,
    part_size: int = 32 * MiB,
    max_memory_bytes: int = 512 * MiB,
    upload_streams: int | None = None,
    progress: Callable[[MirrorProgress], None] | None = None,
) -> MirrorResult:
    """Copy `repo`@`revision` from the Hub to gs://BUCKET/PREFIX/ORG/NAME/SHA/ and return where it is.

    Streams every selected file with `max_workers` parallel range requests straight into one resumable
    upload per file (`upload_streams` files at once, default max_workers // 2), holding at most
    `max_memory_bytes` of file data in memory. Each file is checked against the Hub's sha256 (LFS) or
    git sha1 and against GCS's crc32c; a manifest written last marks the revision complete, and a run
    that finds a complete manifest returns at once (skipped=True). An interrupted run keeps the files
    it verified. `token` is a Hub token (only needed for gated/private repos); it is never logged.
    """
    from vlp.components.clients import storage_client

    t0 = time.monotonic()
    endpoint = (hf_endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    bucket_name = bucket.removeprefix("gs://").strip("/")
    if not bucket_name:
        raise MirrorError("no bucket given: set placement.bucket (the weights go to gs://BUCKET/models/...)")
    part_size = max(GCS_ALIGN, (part_size + GCS_ALIGN - 1) // GCS_ALIGN * GCS_ALIGN)
    max_memory_bytes = max(max_memory_bytes, 2 * part_size)
    allow = list(allow_patterns or [])
    ignore = list(ignore_patterns or [])

    hub = _Hub(repo, endpoint, token, pool=max_workers + 4)
    client = storage_client(project)
    gcs_bucket = client.bucket(bucket_name)

    # A revision that is already a full commit sha needs no Hub call when its manifest is complete:
    # redeploys work even while the Hub is down or rate-limiting.
    is_sha = len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)
    if is_sha:
        early_prefix = _weights_prefix(prefix, repo, revision)
        manifest = _read_manifest(gcs_bucket, early_prefix + MANIFEST_NAME)
        if (
            manifest
            and manifest.get("revision_sha") == revision
            and manifest.get("allow_patterns") == allow
            and (manifest.get("ignore_patterns") == ignore)
        ):
            objects = _list_objects(client, gcs_bucket, early_prefix)
            if _manifest_complete(manifest, objects, early_prefix, None):
                return _skipped(manifest, bucket_name, early_prefix, t0)

    sha, gated = hub.pin(revision)
    if gated and not token:
        raise GatedRepoAccessError(_gated_message(repo, None))
    listing = hub.list_files(sha)
    by_path = {f.path: f for f in listing}
    selected = [by_path[p] for p in select_files(by_path, allow or None, ignore or None)]
    if not selected:
        raise MirrorError(
            f"no file of {repo}@{sha[:12]} matches model.allow_patterns {allow or DEFAULT_ALLOW_PATTERNS} "
            f"minus model.ignore_patterns {ignore or DEFAULT_IGNORE_PATTERNS}: the repo has "
            f"{sorted(by_path)[:10]}...; adjust the patterns"
        )
    dest = _weights_prefix(prefix, repo, sha)
    weights_uri = f"gs://{bucket_name}/{dest}"
    total = sum(f.size for f in selected)

    objects = _list_objects(client, gcs_bucket, dest)
    manifest = _read_manifest(gcs_bucket, dest + MANIFEST_NAME) if dest + MANIFEST_NAME in objects else None
    if _manifest_complete(manifest, objects, dest, selected):
        return _skipped(manifest, bucket_name, dest, t0)  # type: ignore[arg-type]
    if dest + MANIFEST_NAME in objects:
        # A stale or partial manifest must not outlive this run's changes if we crash half-way.
        gcs_bucket.blob(dest + MANIFEST_NAME).delete()

    kept = {f.path: objects[dest + f.path] for f in selected if _verified_in_gcs(f, objects.get(dest + f.path))}
    todo = [f for f in selected if f.path not in kept]
    # Largest first: the longest transfers start early, small files fill the gaps at the end.
    todo.sort(key=lambda f: (-f.size, f.path))
    kept_bytes = sum(f.size for f in selected if f.path in kept)
    log.info(
        "mirroring %s@%s (%s) to %s: %d files, %.2f GB; %d files (%.2f GB) already verified in GCS",
        repo,
        sha[:12],
        revision,
        weights_uri,
        len(selected),
        total / 1e9,
        len(kept),
        kept_bytes / 1e9,
    )

    results: dict[str, dict[str, Any]] = {}
    if todo:
        jobs = [_Job(f, hub.file_url(sha, f.path)) for f in todo]
        # Probe once whether the Hub honours Range (the real Hub and its CDN do; olah's local mirror does
        # not): this also surfaces a gated repo before anything is written.
        probe_job = jobs[0]
        resp, final_url, on_hub = hub.with_retries(
            f"GET {probe_job.file.path}", lambda: hub.open(probe_job.url, probe_job.file.path, "bytes=0-0")
        )
        ranges = resp.status_code == 206
        resp.close()
        probe_job.final_url, probe_job.final_on_hub = final_url, on_hub
        if not ranges:
            log.info("the Hub at %s ignores range requests: streaming each file over one connection", endpoint)
        prog = _Progress(f"mirror {repo}@{sha[:12]}", total, len(selected), progress)
        prog.done, prog.files_done = kept_bytes, len(kept)
        streams = upload_streams or max(1, max_workers // 2)
        transfer = _Transfer(
            hub,
            gcs_bucket,
            dest,
            sha,
            jobs,
            max_workers=max_workers,
            part_size=part_size,
            max_memory_bytes=max_memory_bytes,
            upload_streams=streams,
            ranges=ranges,
            progress=prog,
        )
        prog.start()
        try:
            results = transfer.run()
        finally:
            prog.stop()
            prog.log_line(prog.snapshot())

    # Verify every object once more from a fresh listing before declaring the revision complete.
    objects = _list_objects(client, gcs_bucket, dest)
    entries = []
    for f in selected:
        blob = objects.get(dest + f.path)
        expected_crc = results[f.path]["crc32c"] if f.path in results else kept[f.path].crc32c
        if blob is None or blob.size != f.size or blob.crc32c != expected_crc:
            raise MirrorIntegrityError(
                f"gs://{bucket_name}/{dest}{f.path} ({f.path}) changed or vanished while mirroring: expected size "
                f"{f.size} crc32c {expected_crc}, found {getattr(blob, 'size', None)} {getattr(blob, 'crc32c', None)}; "
                "run again"
            )
        entries.append(
            {"path": f.path, "size": f.size, "sha256": f.sha256, "git_sha1": f.git_sha1, "crc32c": blob.crc32c}
        )
    seconds = time.monotonic() - t0
    manifest = {
        "format": MANIFEST_FORMAT,
        "repo": repo,
        "revision": revision,
        "revision_sha": sha,
        "hub_endpoint": endpoint,
        "allow_patterns": allow,
        "ignore_patterns": ignore,
        "files": entries,
        "bytes": total,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(seconds, 3),
    }
    gcs_bucket.blob(dest + MANIFEST_NAME).upload_from_string(
        json.dumps(manifest, indent=1), content_type="application/json"
    )
    transferred = hub.bytes_fetched
    log.info(
        "mirrored %s@%s to %s: %d files, %.2f GB in %.1fs (%.1f MB/s); %d kept, %.2f GB fetched, %d retries",
        repo,
        sha[:12],
        weights_uri,
        len(selected),
        total / 1e9,
        seconds,
        (total - kept_bytes) / 1e6 / max(seconds, 1e-6),
        len(kept),
        transferred / 1e9,
        hub.retries,
    )
    return MirrorResult(
        weights_uri=weights_uri,
        revision_sha=sha,
        files=len(selected),
        bytes=total,
        seconds=seconds,
        skipped=False,
        transferred_bytes=transferred,
        kept_files=len(kept),
        manifest_uri=weights_uri + MANIFEST_NAME,
    )


def _skipped(manifest: dict[str, Any], bucket: str, dest: str, t0: float) -> MirrorResult:
    weights_uri = f"gs://{bucket}/{dest}"
    log.info("%s already holds a complete mirror (%s): nothing to do", weights_uri, MANIFEST_NAME)
    return MirrorResult(
        weights_uri=weights_uri,
        revision_sha=str(manifest["revision_sha"]),
        files=len(manifest.get("files") or []),
        bytes=int(manifest.get("bytes") or 0),
        seconds=time.monotonic() - t0,
        skipped=True,
        kept_files=len(manifest.get("files") or []),
        manifest_uri=weights_uri + MANIFEST_NAME,
    )


def mirror_from_config(
    cfg: DeploymentConfig,
    bucket: str,
    project: str,
    api_endpoint: str = "",
    progress: Callable[[MirrorProgress], None] | None = None,
    revision: str | None = None,
) -> MirrorResult:
    """Mirror the config's model (what `vlp mirror CONFIG` runs); the token comes from Secret Manager."""
    from vlp.components.clients import read_secret

    token = None
    if cfg.model.hf_token_secret:
        try:
            token = read_secret(project, cfg.model.hf_token_secret, api_endpoint) or None
        except Exception as exc:  # noqa: BLE001 - the client's message never contains the secret's value
            raise MirrorError(
                f"cannot read the Hub token secret {cfg.model.hf_token_secret!r} in project {project}: "
                f"{type(exc).__name__}: {exc}. Check the secret exists and the step's service account has "
                "roles/secretmanager.secretAccessor on it"
            ) from None
    return mirror_weights(
        cfg.model.repo,
        revision or cfg.model.revision,
        bucket,
        allow_patterns=list(cfg.model.allow_patterns) or None,
        ignore_patterns=list(cfg.model.ignore_patterns) or None,
        token=token,
        project=project,
        progress=progress,
        **mirror_tuning_for(),
    )


def mirror_weights_op(deployment: dict, api_endpoint: str) -> NamedTuple(
    "MirrorOutputs", [("weights_uri", str), ("revision_sha", str)]
):  # noqa: UP014 - KFP reads this form
    """Mirror the deployment's model from the Hub to gs://BUCKET/models/ORG/NAME/SHA/ (skips a complete mirror)."""
    import json
    import logging
    from collections import namedtuple

    from vlp.components.deployment import Deployment
    from vlp.components.mirror.weights import mirror_from_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg_raw = deployment["config"]
    # The config may also come as JSON text (this step has always taken that form too): decoded before the one parse.
    d = Deployment.parse({**deployment, "config": json.loads(cfg_raw) if isinstance(cfg_raw, str) else cfg_raw})
    cfg = d.config
    result = mirror_from_config(
        cfg,
        bucket=d.bucket or cfg.placement.bucket,
        project=d.project or cfg.placement.project,
        api_endpoint=api_endpoint or d.api_endpoint,
        revision=d.revision_sha or None,
    )
    from vlp.components.runtime import checkpoint

    checkpoint("mirror-weights")
    outputs = namedtuple("MirrorOutputs", ["weights_uri", "revision_sha"])
    return outputs(result.weights_uri, result.revision_sha)
