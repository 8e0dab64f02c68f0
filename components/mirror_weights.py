"""Mirrors a pinned Hugging Face Hub revision into GCS: streamed, parallel, resumable, verified and idempotent."""

from __future__ import annotations

import base64
import collections
import email.utils
import fnmatch
import hashlib
import json
import logging
import mimetypes
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urljoin, urlsplit

if TYPE_CHECKING:
    from components.config import DeploymentConfig

log = logging.getLogger("vlp.mirror")

MiB = 1 << 20
GiB = 1 << 30
MANIFEST_NAME = "_vlp_manifest.json"
MANIFEST_FORMAT = 1

# What vLLM and TGI load. Everything else in a repo (original/ checkpoints, .pth/.bin duplicates of the
# safetensors, GGUF/ONNX exports) would double or triple the bytes for nothing: 405B FP8's repo with
# `original/` is ~2x the weights the engines read.
DEFAULT_ALLOW_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.tiktoken",
    "chat_template.*",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "*.py",  # configuration_/modeling_ code that trust_remote_code models need
]
# Only when a repo has no safetensors at all do the engines fall back to PyTorch .bin shards.
BIN_FALLBACK_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
DEFAULT_IGNORE_PATTERNS = [
    "original/*",
    "*/original/*",
    "consolidated*",
    "*.pth",
    "*.pt",
    "*.gguf",
    "*.onnx",
    "*.onnx_data",
    "*.msgpack",
    "*.h5",
    "*.ckpt",
    "*.ot",
    ".gitattributes",
    "*.md",
]

# Recommended resources for the step as a plain pipeline task (the lead applies them with
# .set_cpu_limit / .set_memory_limit). 4 vCPU / 16 GB is an e2-standard-4: enough for the default
# 512 MiB transfer buffer plus Python, and ~8 Gbps of network. Models above ~20 GB should run as a
# custom job on the machine planning.mirror_machine_for() picks instead.
STEP_RESOURCES = {"cpu_limit": "4", "memory_limit": "16G"}

# Retries: bounded exponential backoff with full jitter (AWS architecture blog's "full jitter"), and a
# server's Retry-After honoured up to a cap, on 408/429/5xx and connection errors from either side.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MAX_ATTEMPTS = 8
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
RETRY_AFTER_CAP_S = 60.0
FILE_ATTEMPTS = 3  # whole-file restarts after an upload failed mid-stream

GCS_ALIGN = 256 << 10  # GCS resumable uploads take chunks in multiples of 256 KiB
STREAM_CHUNK = 1 * MiB  # read size from the Hub sockets: few Python calls per byte, small transient copies
LOG_EVERY_S = 5.0
PROGRESS_EVERY_S = 0.5
HTTP_TIMEOUT = (15.0, 120.0)  # (connect, read) seconds


class MirrorError(RuntimeError):
    """The mirror could not finish; the message names the repo or file and the fix."""


class GatedRepoAccessError(MirrorError):
    """The repo is gated and the token (if any) has no access."""


class MirrorIntegrityError(MirrorError):
    """Bytes that reached GCS do not match the Hub's metadata (size, sha256, git sha1) or GCS's crc32c."""


class _Cancelled(Exception):
    """Another part of the mirror failed; this worker stops quietly."""


class _Retry(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


@dataclass
class MirrorResult:
    """What a mirror run produced: where the weights are and what it cost."""

    weights_uri: str
    revision_sha: str
    files: int
    bytes: int
    seconds: float
    skipped: bool
    transferred_bytes: int = 0  # bytes fetched from the Hub in this run (0 when skipped)
    kept_files: int = 0  # files already verified in GCS and not transferred again
    manifest_uri: str = ""


@dataclass
class MirrorProgress:
    """A progress snapshot, as handed to the `progress` callback (about twice a second and at the end)."""

    bytes_done: int
    bytes_total: int
    files_done: int
    files_total: int
    bytes_per_s: float
    eta_s: float | None
    active: dict[str, float] = field(default_factory=dict)  # file -> fraction uploaded


@dataclass(frozen=True)
class HubFile:
    """One file of the pinned revision, with the checksums the Hub publishes for it."""

    path: str
    size: int
    sha256: str | None = None  # LFS files: sha256 of the content
    git_sha1: str | None = None  # plain git blobs: sha1 of "blob SIZE\\0" + content


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
# Retries


def _retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _backoff(attempt: int, retry_after: float | None = None) -> float:
    if retry_after is not None:
        return min(retry_after, RETRY_AFTER_CAP_S) + random.uniform(0, 0.1)
    return random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * (2**attempt)))


def _transient(exc: BaseException) -> bool:
    """Connection-level failures worth retrying, from requests/urllib3 (Hub, GCS) or httpx (huggingface_hub)."""
    import requests
    import urllib3

    if isinstance(exc, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)):
        return True
    if isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)):
        return True
    # huggingface_hub's transport (httpx or its fork) raises its own TransportError family.
    return any(c.__name__ in ("TransportError", "TimeoutException", "NetworkError") for c in type(exc).__mro__)


# --------------------------------------------------------------------------------------------------
# Hub side


def _gated_message(repo: str, token: str | None) -> str:
    if token:
        return (
            f"{repo} is gated and the token has no access: accept the licence on the model page "
            f"(https://huggingface.co/{repo}), then set model.hf_token_secret to a secret holding a token of "
            "that account"
        )
    return (
        f"{repo} is gated and no Hub token was given: accept the licence on the model page "
        f"(https://huggingface.co/{repo}), store a token of that account in Secret Manager "
        "(gcloud secrets create hf-token --data-file=-), then set model.hf_token_secret"
    )


class _Hub:
    """Hub metadata through huggingface_hub, file bytes through pooled requests sessions."""

    def __init__(self, repo: str, endpoint: str, token: str | None, pool: int) -> None:
        import requests
        from requests.adapters import HTTPAdapter

        self.repo = repo
        self.endpoint = endpoint.rstrip("/")
        self.token = token
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max(8, pool), max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.bytes_fetched = 0
        self.retries = 0
        self._lock = threading.Lock()

    def _count(self, n: int) -> None:
        with self._lock:
            self.bytes_fetched += n

    def _sleep_retry(self, what: str, attempt: int, exc: BaseException) -> None:
        retry_after = exc.retry_after if isinstance(exc, _Retry) else None
        delay = _backoff(attempt, retry_after)
        with self._lock:
            self.retries += 1
        log.info("retrying %s in %.1fs (attempt %d/%d): %s", what, delay, attempt + 1, MAX_ATTEMPTS, exc)
        time.sleep(delay)

    def with_retries(self, what: str, fn: Callable[[], Any]) -> Any:
        for attempt in range(MAX_ATTEMPTS):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001
                if not (isinstance(exc, _Retry) or _transient(exc)) or attempt == MAX_ATTEMPTS - 1:
                    if isinstance(exc, _Retry) or _transient(exc):
                        raise MirrorError(
                            f"{what} from {self.repo} failed after {MAX_ATTEMPTS} attempts: {exc}"
                        ) from None
                    raise
                self._sleep_retry(what, attempt, exc)
        raise AssertionError("unreachable")

    # -- metadata -------------------------------------------------------------------------------
    def _api_call(self, what: str, fn: Callable[[], Any]) -> Any:
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        for attempt in range(MAX_ATTEMPTS):
            try:
                return fn()
            except GatedRepoError:
                raise GatedRepoAccessError(_gated_message(self.repo, self.token)) from None
            except RevisionNotFoundError:
                raise
            except RepositoryNotFoundError:
                raise MirrorError(
                    f"{self.repo} was not found on the Hub at {self.endpoint} (or it is private and the token cannot "
                    "see it): check model.repo, and model.hf_token_secret for private repos"
                ) from None
            except HfHubHTTPError as exc:
                resp = getattr(exc, "response", None)
                status = getattr(resp, "status_code", None)
                if status in (401, 403):
                    code = resp.headers.get("X-Error-Code", "") if resp is not None else ""
                    if code == "GatedRepo" or status == 403:
                        raise GatedRepoAccessError(_gated_message(self.repo, self.token)) from None
                if status not in RETRY_STATUSES or attempt == MAX_ATTEMPTS - 1:
                    raise MirrorError(
                        f"the Hub at {self.endpoint} answered {status} for {what} of {self.repo}"
                    ) from None
                ra = _retry_after_seconds(resp.headers.get("Retry-After")) if resp is not None else None
                self._sleep_retry(what, attempt, _Retry(f"HTTP {status}", ra))
            except Exception as exc:  # noqa: BLE001 - only transport errors are retried, the rest re-raised
                if not _transient(exc) or attempt == MAX_ATTEMPTS - 1:
                    if _transient(exc):
                        raise MirrorError(f"cannot reach the Hub at {self.endpoint} for {what}: {exc}") from None
                    raise
                self._sleep_retry(what, attempt, exc)
        raise AssertionError("unreachable")

    def pin(self, revision: str) -> tuple[str, bool]:
        """The commit sha `revision` points to, and whether the repo is gated."""
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RevisionNotFoundError

        api = HfApi(endpoint=self.endpoint, token=self.token or False)
        try:
            info = self._api_call("model_info", lambda: api.model_info(self.repo, revision=revision))
        except RevisionNotFoundError:
            raise MirrorError(
                f"revision {revision!r} does not exist in {self.repo}: set model.revision to a branch, tag or commit"
            ) from None
        if not info.sha:
            raise MirrorError(f"the Hub at {self.endpoint} returned no commit sha for {self.repo}@{revision}")
        return info.sha, bool(info.gated)

    def list_files(self, sha: str) -> list[HubFile]:
        """Every file of the revision with size and checksums (the tree listing snapshot_download uses)."""
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import RepoFile

        api = HfApi(endpoint=self.endpoint, token=self.token or False)
        entries = self._api_call(
            "list_repo_tree", lambda: list(api.list_repo_tree(self.repo, revision=sha, recursive=True))
        )
        files = []
        for e in entries:
            if not isinstance(e, RepoFile):
                continue
            lfs_sha = e.lfs.sha256 if e.lfs is not None else None
            files.append(HubFile(e.path, int(e.size), lfs_sha, None if lfs_sha else e.blob_id))
        return files

    # -- bytes ----------------------------------------------------------------------------------
    def file_url(self, sha: str, path: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo, path, revision=sha, endpoint=self.endpoint)

    def _headers(self, auth: bool, rng: str | None = None) -> dict[str, str]:
        h = {"Accept-Encoding": "identity", "User-Agent": "vlp-mirror/1"}
        if auth and self.token:
            h["Authorization"] = f"Bearer {self.token}"
        if rng:
            h["Range"] = rng
        return h

    def _raise_for(self, resp: Any, path: str) -> None:
        status = resp.status_code
        if status in RETRY_STATUSES:
            raise _Retry(f"HTTP {status} for {path}", _retry_after_seconds(resp.headers.get("Retry-After")))
        code = resp.headers.get("X-Error-Code", "")
        if status in (401, 403) and (code == "GatedRepo" or not code):
            raise GatedRepoAccessError(_gated_message(self.repo, self.token))
        if status == 404:
            raise MirrorError(f"{path} is listed in {self.repo} but the Hub answers 404 for it ({code or 'not found'})")
        raise MirrorError(f"the Hub answered {status} ({code or resp.reason}) for {self.repo}/{path}")

    def open(self, url: str, path: str, rng: str | None) -> tuple[Any, str, bool]:
        """GET `url` following redirects by hand: auth only to the Hub's own host, never to the CDN.

        Returns (response, final url, final url is on the Hub host).
        """
        hub_host = urlsplit(self.endpoint).netloc
        on_hub = urlsplit(url).netloc == hub_host
        for _ in range(10):
            resp = self.session.get(
                url, headers=self._headers(on_hub, rng), stream=True, allow_redirects=False, timeout=HTTP_TIMEOUT
            )
            if resp.is_redirect:
                url = urljoin(url, resp.headers["Location"])
                on_hub = on_hub and urlsplit(url).netloc == hub_host
                resp.close()
                continue
            if resp.status_code >= 400:
                try:
                    self._raise_for(resp, path)
                finally:
                    resp.close()
            return resp, url, on_hub
        raise MirrorError(f"too many redirects fetching {self.repo}/{path}")

    def read_into(self, resp: Any, mv: memoryview, on_bytes: Callable[[int], None] | None = None) -> int:
        """Fills `mv` from a streamed response; returns the bytes read (short only if the stream ended)."""
        # http.client's readinto fills our buffer straight from the socket; urllib3's read() would make a
        # bytes object per call and copy it (an allocation + copy per MiB, a third of the mirror's CPU).
        fp = getattr(resp.raw, "_fp", None)
        readinto = fp.readinto if fp is not None and hasattr(fp, "readinto") else resp.raw.readinto
        pos = 0
        while pos < len(mv):
            n = readinto(mv[pos : pos + STREAM_CHUNK])
            if not n:
                break
            pos += n
            self._count(n)
            if on_bytes:
                on_bytes(n)
        return pos


def _finish(resp: Any, consumed: bool) -> None:
    """Return a fully read connection to the pool (kept alive, no new TLS handshake); close any other."""
    if consumed:
        resp.raw.release_conn()
    else:
        resp.close()


@dataclass
class _Part:
    job: _Job
    index: int
    start: int
    end: int  # exclusive
    buf: bytearray | None = None  # a pooled block of part_size bytes; the part uses its first end-start
    error: BaseException | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    token: bool = False  # holds one unit of the memory budget

    def release(self, transfer: _Transfer) -> None:
        with self.job.lock:
            buf, self.buf = self.buf, None
            held, self.token = self.token, False
        if buf is not None:
            transfer.give_block(buf)
        if held:
            transfer.budget.release()


@dataclass
class _Job:
    file: HubFile
    url: str
    parts: list[_Part] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    final_url: str | None = None
    final_on_hub: bool = True
    aborted: bool = False
    sent: int = 0
    crc32c: str = ""


class _Hasher:
    """crc32c (what GCS computes) plus the Hub's own checksum of the file, fed in order."""

    def __init__(self, f: HubFile) -> None:
        import google_crc32c

        self.file = f
        self.crc = google_crc32c.Checksum()
        self.sha256 = hashlib.sha256() if f.sha256 else None
        self.sha1 = hashlib.sha1(b"blob %d\0" % f.size) if (f.git_sha1 and not f.sha256) else None
        self.size = 0

    def update(self, data: memoryview) -> None:
        # google-crc32c's C extension accepts only buffers without a release hook (bytes), not memoryviews:
        # copy in 1 MiB slices, which keeps the transient copy small and costs far less than the hashing.
        for i in range(0, len(data), STREAM_CHUNK):
            self.crc.update(bytes(data[i : i + STREAM_CHUNK]))
        if self.sha256 is not None:
            self.sha256.update(data)
        if self.sha1 is not None:
            self.sha1.update(data)
        self.size += len(data)

    def crc32c_b64(self) -> str:
        return base64.b64encode(self.crc.digest()).decode()

    def check(self, repo: str) -> None:
        """Raises naming the file when the streamed bytes are not what the Hub says the file is."""
        f = self.file
        if self.size != f.size:
            raise MirrorIntegrityError(
                f"{repo}/{f.path}: the Hub sent {self.size} bytes but lists the file as {f.size} bytes; run again"
            )
        if self.sha256 is not None and self.sha256.hexdigest() != f.sha256:
            raise MirrorIntegrityError(
                f"{repo}/{f.path}: sha256 of the downloaded bytes is {self.sha256.hexdigest()} but the Hub's LFS "
                f"metadata says {f.sha256}; nothing was written for this file. Run again; if it persists the Hub "
                "(or a proxy in between) serves corrupt data"
            )
        if self.sha1 is not None and self.sha1.hexdigest() != f.git_sha1:
            raise MirrorIntegrityError(
                f"{repo}/{f.path}: git blob sha1 of the downloaded bytes is {self.sha1.hexdigest()} but the Hub lists "
                f"{f.git_sha1}; nothing was written for this file. Run again; if it persists the Hub serves "
                "corrupt data"
            )

    def metadata(self) -> dict[str, str]:
        """Object metadata recording what the object was verified against (known before the first byte)."""
        md = {"vlp-size": str(self.file.size)}
        if self.file.sha256:
            md["vlp-sha256"] = self.file.sha256
        if self.file.git_sha1 and not self.file.sha256:
            md["vlp-git-sha1"] = self.file.git_sha1
        return md


def _verified_in_gcs(f: HubFile, blob: Any) -> bool:
    """True when an object already holds exactly this file.

    The mirror's objects carry the Hub checksum they were streamed against, and exist only if the bytes
    matched it (the upload is not finished otherwise); so size + that checksum equal to the Hub's
    current metadata means the object is this file. Objects written by anything else are transferred again.
    """
    if blob is None or blob.size != f.size or not blob.crc32c:
        return False
    md = blob.metadata or {}
    if f.sha256:
        return md.get("vlp-sha256") == f.sha256
    if f.git_sha1:
        return md.get("vlp-git-sha1") == f.git_sha1
    return md.get("vlp-size") == str(f.size)


# --------------------------------------------------------------------------------------------------
# The transfer engine


class _Progress:
    def __init__(self, label: str, total: int, files_total: int, callback: Callable[[MirrorProgress], None] | None):
        self.label = label
        self.total = total
        self.files_total = files_total
        self.callback = callback
        self.done = 0
        self.files_done = 0
        self.active: dict[str, tuple[int, int]] = {}
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self._samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=64)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, path: str, n: int) -> None:
        with self.lock:
            self.done += n
            sent, size = self.active.get(path, (0, 0))
            if path in self.active:
                self.active[path] = (sent + n, size)

    def start_file(self, path: str, size: int) -> None:
        with self.lock:
            self.active[path] = (0, size)

    def end_file(self, path: str, ok: bool) -> None:
        with self.lock:
            sent, _ = self.active.pop(path, (0, 0))
            if ok:
                self.files_done += 1
            else:
                self.done -= sent

    def snapshot(self) -> MirrorProgress:
        now = time.monotonic()
        with self.lock:
            done, files_done = self.done, self.files_done
            active = {p: (s / z if z else 1.0) for p, (s, z) in self.active.items()}
        self._samples.append((now, done))
        # Rate over the last ~10 s: a person wants the current speed, not the average since start.
        t_old, b_old = self._samples[0]
        for t, b in self._samples:
            if now - t <= 10:
                t_old, b_old = t, b
                break
        rate = (done - b_old) / (now - t_old) if now - t_old > 0.2 else done / max(now - self.t0, 1e-6)
        eta = (self.total - done) / rate if rate > 0 else None
        return MirrorProgress(done, self.total, files_done, self.files_total, rate, eta, active)

    def log_line(self, snap: MirrorProgress) -> None:
        active = sorted(snap.active.items(), key=lambda kv: -kv[1])
        shown = ", ".join(f"{p} {frac:.0%}" for p, frac in active[:4])
        more = f" (+{len(active) - 4} more)" if len(active) > 4 else ""
        eta = f"{snap.eta_s:.0f}s" if snap.eta_s is not None else "?"
        log.info(
            "%s: %.2f/%.2f GB (%.0f%%), %.1f MB/s, ETA %s; files %d/%d done, %d active%s",
            self.label,
            snap.bytes_done / 1e9,
            snap.bytes_total / 1e9,
            100 * snap.bytes_done / snap.bytes_total if snap.bytes_total else 100,
            snap.bytes_per_s / 1e6,
            eta,
            snap.files_done,
            snap.files_total,
            len(active),
            f": {shown}{more}" if shown else "",
        )

    def _run(self) -> None:
        last_log = time.monotonic()
        while not self._stop.wait(PROGRESS_EVERY_S):
            snap = self.snapshot()
            if self.callback:
                self.callback(snap)
            if time.monotonic() - last_log >= LOG_EVERY_S:
                last_log = time.monotonic()
                self.log_line(snap)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mirror-progress", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        snap = self.snapshot()
        if self.callback:
            self.callback(snap)


class _Transfer:
    """Moves files Hub -> GCS.

    Why this shape (measured, see benchmarks/mirror.py): each file is ONE resumable upload sent as a single
    streaming PUT, fed in order from a bounded window of parallel ranged GETs. The alternative (each part
    its own object, then `compose`) costs an extra server-side copy: on fake-gcs-server compose ran at
    ~60 MB/s, and chunked resumable PUTs get slower with every chunk there, while one streaming PUT per
    file ran at the sink's full rate. On GCS a single long PUT per file also avoids a round trip per chunk,
    and in-order feeding lets the sha256 the Hub publishes be checked before the last byte is sent, so a
    corrupt file never becomes an object. The price: a file interrupted mid-way restarts (finished files
    are kept), at most `upload_streams` files' worth.

    Memory: every part buffer in flight or waiting holds a unit of a semaphore of
    max_memory_bytes // part_size units, whatever the model's size. Downloads take parts in the order
    the upload streams consume files, so the earliest unfinished file can always progress (no deadlock).
    """

    def __init__(
        self,
        hub: _Hub,
        bucket: Any,
        prefix: str,
        sha: str,
        jobs: list[_Job],
        *,
        max_workers: int,
        part_size: int,
        max_memory_bytes: int,
        upload_streams: int,
        ranges: bool,
        progress: _Progress,
    ) -> None:
        import certifi
        import urllib3

        self.hub = hub
        self.bucket = bucket
        self.prefix = prefix
        self.sha = sha
        self.jobs = jobs
        self.part_size = part_size
        self.ranges = ranges
        self.progress = progress
        budget_parts = max(2, max_memory_bytes // part_size)
        self.budget = threading.Semaphore(budget_parts)
        self.blocks: list[bytearray] = []
        self.blocks_lock = threading.Lock()
        self.download_workers = max(1, max_workers)
        self.upload_streams = max(1, min(upload_streams, len(jobs)))
        self.failed: BaseException | None = None
        self.fail_lock = threading.Lock()
        self.queue: collections.deque[_Part] = collections.deque()
        self.queue_lock = threading.Lock()
        self.files: collections.deque[_Job] = collections.deque(jobs)
        self.results: dict[str, dict[str, Any]] = {}
        # The session URI authorises the PUTs by itself (GCS docs: it acts as the credential), so a plain
        # pool works against GCS and fake-gcs-server alike; urllib3 rather than requests because it can
        # send an iterable body with a Content-Length instead of chunked encoding.
        self.http = urllib3.PoolManager(maxsize=self.upload_streams + 2, ca_certs=certifi.where(), retries=False)
        if ranges:
            for job in jobs:
                job.parts = [
                    _Part(job, i, start, min(start + part_size, job.file.size))
                    for i, start in enumerate(range(0, job.file.size, part_size))
                ]
                self.queue.extend(job.parts)
            # A fixed pool, allocated up front: the process's footprint is the setting from the first
            # second (a 410 GB model and a 1 GB one use the same), and no allocator churn can grow it.
            full_parts = sum(1 for p in self.queue if p.end - p.start == part_size)
            self.blocks = [bytearray(part_size) for _ in range(min(budget_parts, full_parts))]

    # -- orchestration --------------------------------------------------------------------------
    def run(self) -> dict[str, dict[str, Any]]:
        threads = []
        if self.ranges:
            n = min(self.download_workers, len(self.queue)) or 1
            threads += [
                threading.Thread(target=self._download_loop, name=f"mirror-get-{i}", daemon=True) for i in range(n)
            ]
        threads += [
            threading.Thread(target=self._upload_loop, name=f"mirror-put-{i}", daemon=True)
            for i in range(self.upload_streams)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self.failed is not None:
            raise self.failed
        return self.results

    def take_block(self, length: int) -> bytearray:
        """A part_size buffer: reused, so RSS stays at the budget instead of drifting with allocator churn."""
        if length < self.part_size:
            return bytearray(length)  # a file's tail or a small file: exact size, not pooled
        with self.blocks_lock:
            if self.blocks:
                return self.blocks.pop()
        return bytearray(self.part_size)

    def give_block(self, buf: bytearray) -> None:
        if len(buf) != self.part_size:
            return
        with self.blocks_lock:
            self.blocks.append(buf)

    def _fail(self, exc: BaseException) -> None:
        with self.fail_lock:
            if self.failed is None:
                self.failed = exc
        # Wake the downloaders blocked on the memory budget so they see the failure and exit.
        for _ in range(self.download_workers):
            self.budget.release()

    # -- downloads ------------------------------------------------------------------------------
    def _download_loop(self) -> None:
        while self.failed is None:
            self.budget.acquire()
            if self.failed is not None:
                return
            with self.queue_lock:
                part = self.queue.popleft() if self.queue else None
            if part is None:
                self.budget.release()
                return
            with part.job.lock:
                part.token = True
            if part.job.aborted:
                part.release(self)
                part.ready.set()
                continue
            buf = self.take_block(part.end - part.start)
            try:
                self._fetch_range(part.job, part.start, memoryview(buf)[: part.end - part.start])
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer of this part
                self.give_block(buf)
                with part.job.lock:
                    part.error = exc
                    part.ready.set()
                continue
            with part.job.lock:
                part.buf = buf
                part.ready.set()
                aborted = part.job.aborted
            if aborted:
                part.release(self)

    def _fetch_range(self, job: _Job, start: int, mv: memoryview) -> None:
        path = job.file.path
        pos, attempt = 0, 0
        while pos < len(mv):
            if self.failed is not None:
                raise _Cancelled()
            resp = None
            try:
                lo, hi = start + pos, start + len(mv) - 1
                with job.lock:
                    url, on_hub = job.final_url, job.final_on_hub
                if url is None:
                    # First range of this file: follow the Hub's redirect (to the CDN) once, keep the target.
                    resp, url, on_hub = self.hub.open(job.url, path, f"bytes={lo}-{hi}")
                    with job.lock:
                        job.final_url, job.final_on_hub = url, on_hub
                else:
                    resp = self.hub.session.get(
                        url,
                        headers=self.hub._headers(on_hub, f"bytes={lo}-{hi}"),
                        stream=True,
                        allow_redirects=False,
                        timeout=HTTP_TIMEOUT,
                    )
                if resp.is_redirect or (resp.status_code in (401, 403) and not on_hub):
                    # A signed CDN URL expired (or moved): resolve the file again.
                    with job.lock:
                        job.final_url = None
                    raise _Retry(f"CDN answered {resp.status_code} for {path}", 0.0)
                if resp.status_code >= 400:
                    self.hub._raise_for(resp, path)
                if resp.status_code != 206 or not resp.headers.get("Content-Range", "").startswith(f"bytes {lo}-"):
                    raise MirrorError(
                        f"the Hub answered a range request for {path} with {resp.status_code} "
                        f"{resp.headers.get('Content-Range', '')!r} instead of bytes {lo}-{hi}"
                    )
                got = self.hub.read_into(resp, mv[pos:])
                if got:
                    attempt = 0  # progress made: a flaky stream is not a dead one
                pos += got
                if pos < len(mv):
                    raise _Retry(f"stream of {path} ended at byte {start + pos}")
            except (MirrorError, _Cancelled):
                raise
            except Exception as exc:  # noqa: BLE001 - retried when transient, else re-raised
                if not (isinstance(exc, _Retry) or _transient(exc)):
                    raise
                attempt += 1
                if attempt >= MAX_ATTEMPTS:
                    raise MirrorError(
                        f"could not download {self.hub.repo}/{path} (bytes from {start + pos}) after {MAX_ATTEMPTS} "
                        f"attempts: {exc}"
                    ) from None
                self.hub._sleep_retry(f"GET {path}", attempt - 1, exc)
            finally:
                if resp is not None:
                    _finish(resp, pos == len(mv))

    # -- uploads --------------------------------------------------------------------------------
    def _upload_loop(self) -> None:
        while self.failed is None:
            with self.queue_lock:
                job = self.files.popleft() if self.files else None
            if job is None:
                return
            try:
                self._transfer_job(job)
            except _Cancelled:
                return
            except BaseException as exc:  # noqa: BLE001 - the first failure stops the mirror
                self._abort(job)
                self._fail(exc)
                return

    def _abort(self, job: _Job) -> None:
        with job.lock:
            job.aborted = True
            done = [p for p in job.parts if p.ready.is_set()]
        for p in done:
            p.release(self)

    def _transfer_job(self, job: _Job) -> None:
        f = job.file
        self.progress.start_file(f.path, f.size)
        ok = False
        try:
            for attempt in range(FILE_ATTEMPTS):
                try:
                    if self.ranges and attempt == 0:
                        result = self._upload(job, self._ranged_body(job))
                    else:
                        if attempt == 1 and self.ranges:
                            self._abort(job)  # free what the first attempt had buffered
                        result = self._upload(job, self._streamed_body(job))
                    break
                except _Retry as exc:
                    if attempt == FILE_ATTEMPTS - 1:
                        raise MirrorError(
                            f"uploading {f.path} to gs://{self.bucket.name}/{self._object(f)} failed {FILE_ATTEMPTS} "
                            f"times: {exc}; run again (finished files are kept)"
                        ) from None
                    log.warning("restarting %s after an interrupted upload: %s", f.path, exc)
                    self.progress.end_file(f.path, ok=False)
                    self.progress.start_file(f.path, f.size)
                    time.sleep(_backoff(attempt + 1))
            self.results[f.path] = result
            ok = True
        finally:
            self.progress.end_file(f.path, ok)

    def _object(self, f: HubFile) -> str:
        return f"{self.prefix}{f.path}"

    def _ranged_body(self, job: _Job) -> tuple[_Hasher, Iterator[memoryview]]:
        hasher = _Hasher(job.file)

        def body() -> Iterator[memoryview]:
            for part in job.parts:
                while not part.ready.wait(0.5):
                    if self.failed is not None:
                        raise _Cancelled()
                if part.error is not None:
                    raise part.error
                assert part.buf is not None
                mv = memoryview(part.buf)[: part.end - part.start]
                hasher.update(mv)
                if part is job.parts[-1]:
                    hasher.check(self.hub.repo)  # before the last byte: a bad file never becomes an object
                yield mv
                self.progress.add(job.file.path, len(mv))
                del mv
                part.release(self)

        return hasher, body()

    def _streamed_body(self, job: _Job) -> tuple[_Hasher, Iterator[memoryview]]:
        """One GET for the whole file (a Hub that ignores Range, like olah's local mirror, or a retry)."""
        hasher = _Hasher(job.file)

        def body() -> Iterator[memoryview]:
            resp, _, _ = self.hub.with_retries(
                f"GET {job.file.path}", lambda: self.hub.open(job.url, job.file.path, None)
            )
            try:
                buf = bytearray(min(STREAM_CHUNK * 8, max(job.file.size, 1)))
                remaining = job.file.size
                while remaining > 0:
                    if self.failed is not None:
                        raise _Cancelled()
                    want = memoryview(buf)[: min(len(buf), remaining)]
                    try:
                        n = self.hub.read_into(resp, want)
                    except Exception as exc:  # noqa: BLE001
                        if _transient(exc):
                            raise _Retry(f"Hub stream of {job.file.path} broke: {exc}") from None
                        raise
                    if n == 0:
                        raise _Retry(f"Hub stream of {job.file.path} ended {remaining} bytes early")
                    chunk = want[:n]
                    hasher.update(chunk)
                    remaining -= n
                    if remaining == 0:
                        hasher.check(self.hub.repo)
                    yield chunk
                    self.progress.add(job.file.path, n)
            finally:
                resp.close()

        return hasher, body()

    def _upload(self, job: _Job, hasher_body: tuple[_Hasher, Iterator[memoryview]]) -> dict[str, Any]:
        from google.api_core.retry import Retry

        f = job.file
        hasher, body = hasher_body
        name = self._object(f)
        blob = self.bucket.blob(name)
        # The Hub checksum goes in at session start: the object only comes into existence if the streamed
        # bytes matched it (the last part is withheld otherwise), so a later run can trust an object that
        # carries it. One request less per file than tagging afterwards.
        blob.metadata = hasher.metadata()
        content_type = mimetypes.guess_type(f.path)[0] or "application/octet-stream"
        session = blob.create_resumable_upload_session(
            content_type=content_type, size=f.size, checksum=None, timeout=60, retry=Retry(deadline=120)
        )
        headers = {"Content-Length": str(f.size), "Content-Type": content_type}
        headers["Content-Range"] = f"bytes 0-{f.size - 1}/{f.size}" if f.size else "bytes */0"
        try:
            resp = self.http.urlopen(
                "PUT", session, body=body if f.size else b"", headers=headers, chunked=False, preload_content=True
            )
        except (MirrorError, _Cancelled):
            self._cancel_session(session)
            raise
        except Exception as exc:  # noqa: BLE001
            self._cancel_session(session)
            if _transient(exc):
                raise _Retry(f"connection to GCS broke: {exc}") from None
            raise
        finally:
            body.close()
        if resp.status in RETRY_STATUSES:
            raise _Retry(f"GCS answered {resp.status}")
        if resp.status not in (200, 201):
            raise MirrorError(
                f"GCS refused the upload of {f.path} to gs://{self.bucket.name}/{name}: HTTP {resp.status} "
                f"{resp.data[:300]!r}"
            )
        if f.size == 0:
            hasher.check(self.hub.repo)
        obj = json.loads(resp.data or b"{}")
        got_crc, got_size = obj.get("crc32c"), int(obj.get("size", -1))
        if got_size != f.size or got_crc != hasher.crc32c_b64():
            raise MirrorIntegrityError(
                f"gs://{self.bucket.name}/{name} ({f.path}) does not match the bytes streamed from the Hub: GCS has "
                f"size {got_size} crc32c {got_crc}, the stream had size {hasher.size} crc32c {hasher.crc32c_b64()}; "
                "run again to re-transfer it"
            )
        return {"crc32c": got_crc, "size": got_size}

    def _cancel_session(self, session: str) -> None:
        try:
            self.http.urlopen("DELETE", session, timeout=10)
        except Exception:  # noqa: BLE001 - best effort: GCS drops unfinished sessions after a week anyway
            pass


# --------------------------------------------------------------------------------------------------
# Public API


def _weights_prefix(prefix: str, repo: str, sha: str) -> str:
    return f"{prefix.strip('/')}/{repo}/{sha}/" if prefix.strip("/") else f"{repo}/{sha}/"


def _read_manifest(bucket: Any, name: str) -> dict[str, Any] | None:
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
    from components.clients import storage_client

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
    from components.clients import read_secret

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

    from components.config import config_from_dict
    from components.mirror_weights import mirror_from_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg_raw = deployment["config"]
    cfg = config_from_dict(json.loads(cfg_raw) if isinstance(cfg_raw, str) else dict(cfg_raw))
    result = mirror_from_config(
        cfg,
        bucket=deployment.get("bucket") or cfg.placement.bucket,
        project=deployment.get("project") or cfg.placement.project,
        api_endpoint=api_endpoint or deployment.get("api_endpoint", ""),
        revision=deployment.get("revision_sha") or None,
    )
    from components.runtime import checkpoint

    checkpoint("mirror-weights")
    outputs = namedtuple("MirrorOutputs", ["weights_uri", "revision_sha"])
    return outputs(result.weights_uri, result.revision_sha)
