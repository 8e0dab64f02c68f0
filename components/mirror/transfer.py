"""The mirror's transfer engine: per file, a memory-bounded window of parallel range reads from the Hub, fed
in order into one GCS resumable upload, hashed on the way and verified against the Hub's checksums."""

from __future__ import annotations

import base64
import collections
import hashlib
import json
import mimetypes
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from vlp.components.mirror.hub import (
    FILE_ATTEMPTS,
    HTTP_TIMEOUT,
    LOG_EVERY_S,
    MAX_ATTEMPTS,
    PROGRESS_EVERY_S,
    RETRY_STATUSES,
    STREAM_CHUNK,
    HubFile,
    MirrorError,
    MirrorIntegrityError,
    MirrorProgress,
    _backoff,
    _Cancelled,
    _finish,
    _Hub,
    _Retry,
    _transient,
    log,
)


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


CRC32C_KEY = "vlp-crc32c"  # object metadata: the crc32c of the bytes that were verified against the Hub


def _verified_in_gcs(f: HubFile, blob: Any) -> bool:
    """True when an object already holds exactly this file.

    The mirror's objects carry the Hub checksum they were streamed against, and exist only if the bytes
    matched it (the upload is not finished otherwise), plus the crc32c of those bytes (CRC32C_KEY); so size +
    that checksum equal to the Hub's current metadata, and that crc32c equal to the one GCS computes of the
    object's content, mean the object is this file. Anything else is transferred again.
    """
    if blob is None or blob.size != f.size or not blob.crc32c:
        return False
    md = blob.metadata or {}
    # The crc32c the mirror computed while it checked the bytes against the Hub, against the crc32c GCS computes
    # of what the object holds now: metadata alone can be copied onto other content (`gcloud storage cp` keeps it).
    if md.get(CRC32C_KEY) != blob.crc32c:
        return False
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
        # Vouch for exactly these bytes: a later run trusts this object only while GCS's crc32c still equals it.
        blob.metadata = {**hasher.metadata(), CRC32C_KEY: got_crc}
        blob.patch(retry=Retry(deadline=120))
        return {"crc32c": got_crc, "size": got_size}

    def _cancel_session(self, session: str) -> None:
        try:
            self.http.urlopen("DELETE", session, timeout=10)
        except Exception:  # noqa: BLE001 - best effort: GCS drops unfinished sessions after a week anyway
            pass
