"""A range-capable stand-in for the Hugging Face Hub with a per-connection bandwidth cap and fault injection."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

# The real Hub stores weights (and anything big or binary) in LFS and answers /resolve/ for them with a
# redirect to a CDN host; small text files are plain git blobs served directly. Same split here.
LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".gguf", ".model", ".tiktoken")
LFS_MIN_BYTES = 1 << 20
SEND_CHUNK = 256 << 10
META_SIDECAR = ".hub-meta.json"

_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass
class HubFile:
    """One file of a served repo with the metadata the Hub publishes for it."""

    path: str
    abs_path: Path
    size: int
    git_sha1: str
    sha256: str | None  # set for LFS files only, as on the Hub

    @property
    def lfs(self) -> bool:
        return self.sha256 is not None


@dataclass
class HubRepo:
    """A repo at one revision: every file under ROOT/ORG/NAME."""

    repo_id: str
    sha: str
    files: dict[str, HubFile]


def _git_blob_sha1(path: Path, size: int) -> str:
    h = hashlib.sha1(b"blob %d\0" % size)
    with path.open("rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def load_repo(repo_dir: Path, repo_id: str) -> HubRepo:
    """Reads (and caches beside the files) the sizes and hashes of every file in `repo_dir`."""
    sidecar = repo_dir / META_SIDECAR
    try:
        cached = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        cached = {}
    files: dict[str, HubFile] = {}
    fresh: dict[str, Any] = {}
    for p in sorted(repo_dir.rglob("*")):
        if not p.is_file() or p.name == META_SIDECAR:
            continue
        rel = p.relative_to(repo_dir).as_posix()
        st = p.stat()
        key = f"{st.st_size}:{st.st_mtime_ns}"
        entry = cached.get(rel)
        if not entry or entry.get("key") != key:
            lfs = rel.endswith(LFS_SUFFIXES) or st.st_size >= LFS_MIN_BYTES
            entry = {"key": key, "git_sha1": _git_blob_sha1(p, st.st_size), "sha256": _sha256(p) if lfs else None}
        fresh[rel] = entry
        files[rel] = HubFile(rel, p, st.st_size, entry["git_sha1"], entry["sha256"])
    if fresh != cached:
        try:
            sidecar.write_text(json.dumps(fresh))
        except OSError:
            pass  # a read-only model dir only costs re-hashing next start
    # The revision sha is a digest of the listing, so new content means a new revision, as on the Hub.
    digest = hashlib.sha1(json.dumps({k: v["git_sha1"] for k, v in fresh.items()}, sort_keys=True).encode())
    return HubRepo(repo_id, digest.hexdigest(), files)


class HubServer:
    """Serves every ROOT/ORG/NAME directory as the Hub model repo ORG/NAME.

    cap_bytes_per_s limits each connection (one response at a time), which is what makes parallel
    range requests pay off, as with the real Hub/CDN. Faults: every `fail_429_every`-th request is
    answered 429 with Retry-After; `gated_tokens` (a set, possibly empty) makes downloads need one of
    those bearer tokens (401/403 with X-Error-Code: GatedRepo); `wrong_sha256` names files whose
    published sha256 is wrong; `ranges=False` ignores Range headers (like olah's local mirror).
    """

    def __init__(
        self,
        root: Path,
        *,
        cap_bytes_per_s: float = 0.0,
        fail_429_every: int = 0,
        retry_after_s: int = 1,
        gated_tokens: set[str] | None = None,
        wrong_sha256: set[str] | None = None,
        redirect_lfs: bool = True,
        ranges: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.root = Path(root)
        self.cap_bytes_per_s = cap_bytes_per_s
        self.fail_429_every = fail_429_every
        self.retry_after_s = retry_after_s
        self.gated_tokens = gated_tokens
        self.wrong_sha256 = set(wrong_sha256 or ())
        self.redirect_lfs = redirect_lfs
        self.ranges = ranges
        self.repos: dict[str, HubRepo] = {}
        self._by_sha256: dict[str, HubFile] = {}
        self._lock = threading.Lock()
        self._stats: dict[str, int] = {}
        self.reset_stats()
        self.reload()
        self._httpd = _Server((host, port), _Handler)
        self._httpd.hub = self
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def cdn_url(self) -> str:
        """The same server under another host name: clients treat it as a foreign host (no auth sent)."""
        return f"http://localhost:{self._httpd.server_address[1]}"

    def reload(self) -> None:
        """Re-reads the repos under root (after a test adds or changes files)."""
        repos = {}
        for org in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for name in sorted(p for p in org.iterdir() if p.is_dir()):
                repo_id = f"{org.name}/{name.name}"
                repos[repo_id] = load_repo(name, repo_id)
        self.repos = repos
        self._by_sha256 = {f.sha256: f for r in repos.values() for f in r.files.values() if f.sha256}

    def published_sha256(self, f: HubFile) -> str | None:
        if f.sha256 and f.path in self.wrong_sha256:
            return ("0" if f.sha256[0] != "0" else "1") + f.sha256[1:]
        return f.sha256

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._stats[key] = self._stats.get(key, 0) + n

    def stats(self) -> dict[str, int]:
        """Counters: requests, body_bytes, status_429, gated_denials, range_requests, cdn_auth_headers."""
        with self._lock:
            return dict(self._stats)

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = {
                "requests": 0,
                "body_bytes": 0,
                "status_429": 0,
                "gated_denials": 0,
                "range_requests": 0,
                "cdn_auth_headers": 0,
            }

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    hub: HubServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients closing a connection mid-response (a probe, a killed mirror) are normal here.
        exc = sys.exc_info()[1]
        if not isinstance(exc, (ConnectionResetError, BrokenPipeError, TimeoutError)):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        pass

    # -- plumbing -------------------------------------------------------------------------------
    def _json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, code: str, message: str, extra: dict[str, str] | None = None) -> None:
        self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message, **(extra or {})})

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        if self.path == "/_reset":
            self.server.hub.reset_stats()
            return self._json(200, {"ok": True})
        self._error(404, "EntryNotFound", "no such route")

    def _dispatch(self) -> None:
        hub = self.server.hub
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        query = parse_qs(parts.query)
        if path == "/_stats":
            return self._json(200, hub.stats())
        hub.count("requests")
        if hub.fail_429_every:
            with hub._lock:
                n = hub._stats["requests"]
            if n % hub.fail_429_every == 0:
                hub.count("status_429")
                return self._error(429, "RateLimited", "rate limited", {"Retry-After": str(hub.retry_after_s)})
        try:
            if path.startswith("/api/models/"):
                return self._api(path[len("/api/models/") :], query)
            if path.startswith("/cdn/"):
                if self.headers.get("Authorization"):
                    hub.count("cdn_auth_headers")  # a client leaking its Hub token to the CDN host
                f = hub._by_sha256.get(path[len("/cdn/") :])
                if f is None:
                    return self._error(404, "EntryNotFound", "no such object")
                return self._send_file(f, None)
            m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
            if m:
                return self._resolve(m.group(1), m.group(2), m.group(3))
            if path == "/api/whoami-v2":
                return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        self._error(404, "EntryNotFound", f"no route {path}")

    def _repo(self, repo_id: str) -> HubRepo | None:
        repo = self.server.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository Not Found for url: {self.path}.")
        return repo

    def _check_revision(self, repo: HubRepo, rev: str) -> bool:
        if rev not in ("main", repo.sha):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return False
        return True

    # -- API ------------------------------------------------------------------------------------
    def _api(self, rest: str, query: dict[str, list[str]]) -> None:
        hub = self.server.hub
        segs = rest.split("/")
        repo = self._repo("/".join(segs[:2]))
        if repo is None:
            return
        tail = segs[2:]
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        if not tail or tail[0] == "revision":
            if tail and not self._check_revision(repo, "/".join(tail[1:])):
                return
            siblings = []
            for f in repo.files.values():
                s: dict[str, Any] = {"rfilename": f.path}
                if blobs:
                    s.update(size=f.size, blobId=f.git_sha1)
                    if f.lfs:
                        s["lfs"] = {"sha256": hub.published_sha256(f), "size": f.size, "pointerSize": 134}
                siblings.append(s)
            info = {
                "_id": repo.sha[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "sha": repo.sha,
                "private": False,
                "disabled": False,
                "gated": "manual" if hub.gated_tokens is not None else False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "lastModified": "2026-01-01T00:00:00.000Z",
                "createdAt": "2026-01-01T00:00:00.000Z",
                "siblings": siblings,
            }
            return self._json(200, info)
        if tail[0] == "tree" and len(tail) >= 2:
            if not self._check_revision(repo, tail[1]):
                return
            under = "/".join(tail[2:]).strip("/")
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            entries: list[dict[str, Any]] = []
            dirs: set[str] = set()
            for f in repo.files.values():
                if under and not f.path.startswith(under + "/"):
                    continue
                rel = f.path[len(under) + 1 :] if under else f.path
                if "/" in rel and not recursive:
                    dirs.add((under + "/" if under else "") + rel.split("/")[0])
                    continue
                if recursive:
                    parents = f.path.split("/")[:-1]
                    for i in range(len(under.split("/")) if under else 0, len(parents)):
                        dirs.add("/".join(parents[: i + 1]))
                e: dict[str, Any] = {"type": "file", "oid": f.git_sha1, "size": f.size, "path": f.path}
                if f.lfs:
                    e["lfs"] = {"oid": hub.published_sha256(f), "size": f.size, "pointerSize": 134}
                entries.append(e)
            entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(dirs)]
            return self._json(200, entries)
        self._error(404, "EntryNotFound", f"no API route {rest}")

    # -- files ----------------------------------------------------------------------------------
    def _resolve(self, repo_id: str, rev: str, path: str) -> None:
        hub = self.server.hub
        repo = self._repo(repo_id)
        if repo is None or not self._check_revision(repo, rev):
            return
        if hub.gated_tokens is not None:
            auth = self.headers.get("Authorization", "")
            token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else ""
            if token not in hub.gated_tokens:
                hub.count("gated_denials")
                status = 401 if not token else 403
                msg = f"Access to model {repo_id} is restricted. You must have access to it and be authenticated."
                return self._error(status, "GatedRepo", msg)
        f = repo.files.get(path)
        if f is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist at {rev}")
        common = {"X-Repo-Commit": repo.sha, "ETag": f'"{f.git_sha1}"'}
        if f.lfs and hub.redirect_lfs:
            # Like the Hub: an absolute redirect to another host (the CDN), with the LFS facts in headers.
            published = hub.published_sha256(f) or ""
            headers = {
                **common,
                "Location": f"{hub.cdn_url}/cdn/{f.sha256}",
                "X-Linked-Size": str(f.size),
                "X-Linked-Etag": f'"{published}"',
                "Content-Length": "0",
            }
            self.send_response(302)
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            return
        if f.lfs:
            common["ETag"] = f'"{hub.published_sha256(f)}"'
        self._send_file(f, common)

    def _send_file(self, f: HubFile, headers: dict[str, str] | None) -> None:
        hub = self.server.hub
        start, end = 0, f.size - 1
        status = 200
        rng = self.headers.get("Range")
        if rng and hub.ranges:
            m = _RANGE_RE.match(rng.strip())
            if not m or (m.group(1) == "" and m.group(2) == ""):
                return self._error(416, "RangeNotSatisfiable", f"bad range {rng}")
            if m.group(1) == "":
                start = max(0, f.size - int(m.group(2)))
            else:
                start = int(m.group(1))
                if m.group(2):
                    end = min(end, int(m.group(2)))
            if start > end:
                return self._error(416, "RangeNotSatisfiable", f"range {rng} outside 0-{f.size - 1}")
            status = 206
            hub.count("range_requests")
        length = end - start + 1
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes" if hub.ranges else "none")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{f.size}")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        cap = hub.cap_bytes_per_s
        t0 = time.monotonic()
        sent = 0
        with f.abs_path.open("rb") as fh:
            while sent < length:
                n = min(SEND_CHUNK, length - sent)
                # sendfile keeps this server's CPU cost low, so on a 2-core machine the cap, not
                # Python, is what limits each connection.
                n = self.connection.sendfile(fh, offset=start + sent, count=n)
                if n <= 0:
                    break
                sent += n
                hub.count("body_bytes", n)
                if cap:
                    ahead = sent / cap - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)


def main(argv: list[str] | None = None) -> None:
    """`python benchmarks/hub_server.py --root DIR [--cap-mb-s N]`: serve until killed; prints READY URL."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--root", required=True, type=Path, help="directory holding ORG/NAME/<files>")
    ap.add_argument("--cap-mb-s", type=float, default=0.0, help="per-connection cap in MB/s (0 = none)")
    ap.add_argument("--fail-429-every", type=int, default=0)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)
    server = HubServer(
        args.root, cap_bytes_per_s=args.cap_mb_s * 1e6, fail_429_every=args.fail_429_every, port=args.port
    )
    print(f"READY {server.url}", flush=True)
    try:
        server._httpd.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    socket.setdefaulttimeout(None)
    sys.exit(main())
