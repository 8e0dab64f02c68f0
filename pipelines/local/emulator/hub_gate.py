"""The emulator's Hugging Face Hub gate: a proxy in front of the olah mirror that refuses gated repos without a token
with access, as the Hub does, and answers ranges from the mirrored blobs."""

from __future__ import annotations

import http.client
import json
import os
import re
import threading
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

_JSON = "application/json"
Answer = tuple[int, bytes, str, dict[str, str]]


# Headers huggingface_hub reads from the Hub; everything else the mirror sends is dropped.
_HUB_HEADERS = (
    "content-type",
    "content-length",
    "content-range",
    "content-disposition",
    "accept-ranges",
    "etag",
    "last-modified",
)


_HUB_REQUEST_HEADERS = ("range", "if-range", "if-none-match", "accept", "content-type", "user-agent")


def _header_map(headers: Any) -> dict[str, str]:
    if headers is None:
        return {}
    return {str(k).lower(): str(v) for k, v in headers.items()}


def _repo_of(path: str) -> tuple[str, str] | None:
    """(repo type, ORG/NAME) that a Hub path addresses, or None for account-level paths."""
    match = re.match(r"/api/(?:resolve-cache/)?(models|datasets|spaces)/([^/]+/[^/]+)", path)
    if match:
        return match.group(1)[:-1], match.group(2)
    match = re.match(r"/(?:(datasets|spaces)/)?([^/]+/[^/]+)/(?:resolve|tree|blob|raw)/", path)
    if match:
        return (match.group(1) or "models")[:-1], match.group(2)
    return None


def _gated(repo_type: str, repo_id: str, authorized: bool) -> Answer:
    # What huggingface.co answers for a gated repo: X-Error-Code makes huggingface_hub raise GatedRepoError.
    if authorized:
        message = (
            f"Access to {repo_type} {repo_id} is restricted and you are not in the authorized list. "
            f"Visit https://huggingface.co/{repo_id} to ask for access."
        )
        code = 403
    else:
        message = (
            f"Access to {repo_type} {repo_id} is restricted. You must have access to it and be authenticated "
            "to access it. Please log in."
        )
        code = 401
    headers = {"X-Error-Code": "GatedRepo", "X-Error-Message": message}
    return code, json.dumps({"error": message}).encode(), _JSON, headers


def hub_proxy(emu: Any, method: str, path: str, query: dict[str, list[str]], body: bytes, headers: Any) -> Answer:
    request_headers = _header_map(headers)
    repo = _repo_of(path)
    token = request_headers.get("authorization", "").removeprefix("Bearer ").strip()
    if repo and "hub-gated" in emu.faults and token not in getattr(emu, "hub_access", set()):
        return _gated(repo[0], repo[1], bool(token))
    upstream = getattr(emu, "hub_upstream", None)
    if not upstream:
        message = "No Hub mirror behind the emulator: start it with hub_upstream=<olah URL>."
        return 502, json.dumps({"error": message}).encode(), _JSON, {}
    if re.fullmatch(r"/api/(models|datasets)/[^/]+/[^/]+", path):
        # The Hub answers model_info without a revision for the default branch; an offline olah mirror
        # only knows the /revision/REV form, so ask for main explicitly.
        path += "/revision/main"
    target = urllib.parse.urlsplit(upstream)
    base_path = target.path.rstrip("/")
    url = base_path + path + ("?" + urllib.parse.urlencode(query, doseq=True) if query else "")
    forward = {name: request_headers[name] for name in _HUB_REQUEST_HEADERS if name in request_headers}
    # Identity encoding keeps Content-Length equal to the file size huggingface_hub checks against.
    forward["accept-encoding"] = "identity"
    conn_cls = http.client.HTTPSConnection if target.scheme == "https" else http.client.HTTPConnection
    conn = conn_cls(target.hostname or "127.0.0.1", target.port, timeout=300)
    try:
        conn.request(method, url, body=body or None, headers=forward)
        response = conn.getresponse()
        status = response.status
        total = response.getheader("content-length")
        wanted = re.fullmatch(r"\s*bytes=(\d+)-(\d+)\s*", request_headers.get("range", "") or "")
        local_blob = _local_mirror_blob(path) if status == 200 and method == "GET" else None
        blob: Path | None = None
        if method == "HEAD":
            data = b""
        elif local_blob is not None:
            # olah reads a whole git blob before it sends a byte (~15 s for SmolLM2's 270 MB); the same
            # bytes come straight from the mirror's git repo, while olah still answers headers and metadata.
            # Extracted once to a file, so that each range is a seek (a mirror reads a file in 32 MiB ranges).
            blob = _blob_file(Path(emu.state_dir), *local_blob)
            total = str(blob.stat().st_size)
            data = b"" if "range" in request_headers else blob.read_bytes()
        elif status == 200 and wanted and total:
            # olah ignores Range and would send a 270 MB file for a 100 KB safetensors header read:
            # stop reading at the end of the range instead of buffering the whole file.
            data = response.read(int(wanted.group(2)) + 1)
        else:
            data = response.read()
            total = None
        reply: dict[str, str] = {}
        for name, value in response.getheaders():
            lower = name.lower()
            if lower in _HUB_HEADERS or lower.startswith("x-"):
                reply[name] = value
            elif lower == "location":
                reply[name] = _rewrite_location(emu, upstream, value)
    except OSError as exc:
        message = f"The Hub mirror at {upstream} did not answer: {exc}"
        return 502, json.dumps({"error": message}).encode(), _JSON, {}
    finally:
        conn.close()
    content_type = next((v for k, v in reply.items() if k.lower() == "content-type"), "application/octet-stream")
    revision = _unknown_revision(path) if status in (401, 404) else ""
    if revision:
        # The Hub answers a revision a repo lacks with 404 X-Error-Code RevisionNotFound, which huggingface_hub raises
        # as RevisionNotFoundError (utils/_http.py hf_raise_for_status); an offline olah mirror answers as if the
        # repo were missing. Message text unverified.
        message = f"Invalid rev id: {revision}"
        return 404, json.dumps({"error": message}).encode(), _JSON, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": message}
    if status in (401, 404) and _missing_tree_path(path):
        # The Hub answers a folder a repo does not have with 404 EntryNotFound (huggingface_hub's list_repo_tree:
        # "RemoteEntryNotFoundError if the tree (folder) does not exist"); an offline olah mirror answers 401, which
        # huggingface_hub reads as a missing or private repo (transformers' tokenizer loading then fails).
        body = json.dumps({"error": "Entry not found"}).encode()
        return 404, body, _JSON, {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"}
    if status == 200 and "/resolve/" in path:
        reply.setdefault("Accept-Ranges", "bytes")
    if status == 200 and method == "GET" and "range" in request_headers:
        # An offline olah mirror ignores Range and sends the whole file; the Hub honours it, and
        # huggingface_hub resumes interrupted downloads with it, so the gate cuts the range itself.
        read = _file_range(blob) if blob is not None else lambda start, end: data[start : end + 1]
        size = int(total) if total else len(data)
        return _apply_range(request_headers["range"], read, size, content_type, reply)
    return status, data, content_type, reply


_RESOLVE_RE = re.compile(r"^/(?:models/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


def _mirrored(pattern: re.Pattern[str], path: str) -> tuple[Path, re.Match[str]] | None:
    """The local mirror's git repo that `path` (matched by `pattern`, naming `repo`) is about, when the gate's mirror
    is a local olah mirrors dir holding it."""
    mirrors = os.environ.get("VLP_HUB_MIRRORS_DIR", "")
    match = pattern.match(urllib.parse.unquote(path))
    if not mirrors or not match:
        return None
    repo = Path(mirrors) / "models" / match.group("repo")
    return (repo, match) if (repo / ".git").exists() else None


def _local_mirror_blob(path: str) -> tuple[Path, str] | None:
    """(git repo, "REV:FILE") when the gate's mirror is a local olah mirrors dir holding the repo."""
    found = _mirrored(_RESOLVE_RE, path)
    if found is None:
        return None
    repo, match = found
    return repo, f"{match.group('rev')}:{match.group('file')}"


_TREE_RE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)/(?P<path>.+)$")


def _missing_tree_path(path: str) -> bool:
    """True when `path` lists a folder of a repo (and revision) the local mirror holds, and the folder is not there."""
    import subprocess

    found = _mirrored(_TREE_RE, path)
    if found is None:
        return False
    repo, match = found
    rev, folder = match.group("rev"), match.group("path").strip("/")
    if not _has_revision(repo, rev):
        return False  # an unknown revision is the Hub's RevisionNotFound, not this
    listed = subprocess.run(["git", "-C", str(repo), "ls-tree", rev, "--", folder], capture_output=True, text=True)
    return listed.returncode == 0 and not listed.stdout.strip()


_REVISION_RE = re.compile(
    r"^/(?:api/models/|models/)?(?P<repo>[^/]+/[^/]+)/(?:revision|tree|resolve)/(?P<rev>[^/]+)(?:/.*)?$"
)


def _unknown_revision(path: str) -> str:
    """The revision `path` names when the local mirror holds the repo but not that branch, tag or commit ("" else)."""
    found = _mirrored(_REVISION_RE, path)
    if found is None:
        return ""
    repo, match = found
    return "" if _has_revision(repo, match.group("rev")) else match.group("rev")


def _has_revision(repo: Path, rev: str) -> bool:
    import subprocess

    known = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "-q", f"{rev}^{{commit}}"],
                           capture_output=True)  # fmt: skip
    return known.returncode == 0


def _blob_file(state_dir: Path, repo: Path, spec: str) -> Path:
    """The git blob `spec` ("REV:FILE") of `repo` as a file, extracted once per blob (named by its object id, so a
    new commit of the file is a new file) under the emulator's state dir."""
    import subprocess

    oid = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--verify", "-q", spec], capture_output=True, text=True, check=True
    ).stdout.strip()
    path = state_dir / "hub-blobs" / oid
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{oid}.{os.getpid()}.{threading.get_ident()}.partial")
        with partial.open("wb") as out:
            subprocess.run(["git", "-C", str(repo), "cat-file", "blob", oid], stdout=out, check=True)
        partial.replace(path)  # whole or absent: two requests extracting at once each write their own partial
    return path


def _file_range(path: Path) -> Callable[[int, int], bytes]:
    def read(start: int, end: int) -> bytes:
        with path.open("rb") as f:
            f.seek(start)
            return f.read(end - start + 1)

    return read


def _apply_range(
    range_header: str, read: Callable[[int, int], bytes], size: int, content_type: str, reply: dict[str, str]
) -> Answer:
    """A 206 for `range_header` of a file of `size` bytes, whose bytes start..end (inclusive) `read` gives."""
    headers = {k: v for k, v in reply.items() if k.lower() not in ("content-length", "content-range")}
    headers["Accept-Ranges"] = "bytes"
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", range_header)
    if not match or match.groups() == ("", ""):
        return 200, read(0, size - 1), content_type, headers  # multi-range or malformed: the full file, as servers may
    first, last = match.groups()
    if first == "":
        start, end = max(size - int(last), 0), size - 1
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        headers["Content-Range"] = f"bytes */{size}"
        return 416, b"", content_type, headers
    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return 206, read(start, end), content_type, headers


def _rewrite_location(emu: Any, upstream: str, location: str) -> str:
    """Keeps redirects inside the gate: absolute mirror URLs and root-relative paths get the /hf prefix."""
    upstream = upstream.rstrip("/")
    if location.startswith(upstream):
        return f"{str(emu.url).rstrip('/')}/hf{location[len(upstream) :]}"
    if location.startswith("/"):
        return "/hf" + location
    return location
