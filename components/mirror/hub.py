"""The Hub side of the mirror: the pinned revision's files and checksums, and streamed range requests with
bounded, jittered retries (plus the errors and constants the mirror modules share)."""

from __future__ import annotations

import email.utils
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

log = logging.getLogger("vlp.mirror")

MiB = 1 << 20
GiB = 1 << 30

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
                f"{self.repo} has no revision {revision!r} (the repo exists; that branch, tag or commit does not): set "
                "model.revision to one it has (huggingface_hub's list_repo_refs lists its branches and tags)"
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
