"""The mirror's manifest, and the check a no-op makes with it. Its own small module: preflight imports it, and a
step embeds only the code it can import (pipelines/packaging.py), within one command-line argument's 128 KiB."""

from __future__ import annotations

import json
from typing import Any

MANIFEST_NAME = "_vlp_manifest.json"
MANIFEST_FORMAT = 1


def weights_prefix(prefix: str, repo: str, sha: str) -> str:
    """Where a revision's weights live in the bucket: PREFIX/ORG/NAME/SHA/."""
    return f"{prefix.strip('/')}/{repo}/{sha}/" if prefix.strip("/") else f"{repo}/{sha}/"


def read_manifest(bucket: Any, name: str) -> dict[str, Any] | None:
    """A manifest object's content, or None when it is missing, unreadable or of another format."""
    from google.api_core.exceptions import NotFound

    try:
        data = bucket.blob(name).download_as_bytes()
    except NotFound:
        return None
    try:
        manifest = json.loads(data)
    except ValueError:
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT else None


def weights_intact(repo: str, revision_sha: str, bucket: str, *, project: str = "", prefix: str = "models") -> str:
    """"" when the mirror of repo@sha in the bucket is complete and unchanged: its manifest lists every object, and
    each is there with the recorded size and crc32c (one listing, nothing downloaded). Else what is wrong, for the
    log: a no-op must not vouch for weights that are gone (a redeploy's container would fail to load them)."""
    from vlp.components.clients import storage_client

    client = storage_client(project or None)
    gcs_bucket = client.bucket(bucket)
    dest = weights_prefix(prefix, repo, revision_sha)
    manifest = read_manifest(gcs_bucket, dest + MANIFEST_NAME)
    if manifest is None:
        return f"no mirror manifest at gs://{bucket}/{dest}{MANIFEST_NAME}"
    objects = {b.name: b for b in client.list_blobs(gcs_bucket, prefix=dest)}
    for e in manifest.get("files") or []:
        blob = objects.get(dest + str(e.get("path")))
        if blob is None:
            return f"gs://{bucket}/{dest}{e.get('path')} is missing"
        if blob.size != e.get("size") or blob.crc32c != e.get("crc32c"):
            return f"gs://{bucket}/{dest}{e.get('path')} differs from what was mirrored (size or crc32c)"
    return ""
