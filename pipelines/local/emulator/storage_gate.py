"""Cloud Storage behind IAM: the emulator answers the JSON API's paths for the local stack's clients, checks the
caller's permission on the bucket (iam.py, with the bucket's policy and its project's), serves bucket IAM policies
itself (fake-gcs-server keeps none), and forwards the rest to fake-gcs-server, pointing the upload-session and media
URLs it returns back at the emulator so no later call goes around the check."""

from __future__ import annotations

import http.client
import json
import os
import re
import urllib.parse
from pathlib import Path
from typing import Any

from vlp.pipelines.local.emulator.errors import ApiError

GCS_PATH = re.compile(r"^/(?:upload/|download/)?storage/v1/")
_BUCKET_IAM = re.compile(r"^/storage/v1/b/(?P<bucket>[^/]+)/iam(?P<test>/testPermissions)?$")
# Request and response headers that carry meaning for uploads, ranges and preconditions.
_REQUEST_HEADERS = ("content-type", "content-range", "range", "x-upload-content-type", "x-upload-content-length")
_RESPONSE_HEADERS = ("location", "range", "etag", "content-range", "x-goog-generation", "x-goog-hash")


_CRC_CACHE: dict[tuple[str, int, int], str] = {}


def _content_crc32c(path: Path) -> str:
    """Base64 big-endian crc32c of a file (GCS's form), or "" when it is not a plain file under the root."""
    try:
        stat = path.stat()
    except OSError:
        return ""
    if not path.is_file():
        return ""
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _CRC_CACHE:
        import base64

        import google_crc32c

        checksum = google_crc32c.Checksum()
        with path.open("rb") as handle:
            while chunk := handle.read(8 << 20):
                checksum.update(chunk)
        _CRC_CACHE[key] = base64.b64encode(checksum.digest()).decode()
    return _CRC_CACHE[key]


def storage_denied(principal: str, permission: str, what: str) -> ApiError:
    """Cloud Storage's own wording of a missing permission (401 for an anonymous caller, as GCS answers)."""
    who = principal or "Anonymous caller"
    message = (
        f"{who} does not have {permission} access to the Google Cloud Storage {what}. "
        f"Permission '{permission}' denied on resource (or it may not exist)."
    )
    return ApiError(
        "UNAUTHENTICATED" if not principal else "PERMISSION_DENIED",
        message,
        details=[
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "IAM_PERMISSION_DENIED",
                "domain": "storage.googleapis.com",
                "metadata": {"permission": permission, "principal": principal},
            }
        ],
    )


class StorageGate:
    """Mixed into the Emulator (server.py): `storage_endpoint` is fake-gcs-server's URL, `url` the emulator's."""

    storage_endpoint: str | None
    url: str
    _lock: Any
    _iam_policies: dict[str, dict[str, Any]]
    _upload_sessions: dict[str, str]

    def storage(
        self, method: str, raw_path: str, query: dict[str, list[str]], body: bytes, headers: Any, principal: str
    ) -> tuple[int, bytes, str, dict[str, str]]:
        """Answer one Cloud Storage request the caller may make (authorize() has checked it)."""
        path = urllib.parse.unquote(raw_path)
        iam = _BUCKET_IAM.match(path)
        if iam:
            return self._gcs_bucket_iam(method, iam.group("bucket"), bool(iam.group("test")), query, body, principal)
        if method == "POST" and path == "/storage/v1/b":
            self._gcs_record_bucket(body, query)
        return self._gcs_forward(method, raw_path, query, body, headers, principal)

    def bucket_exists(self, bucket: str) -> bool:
        """Whether fake-gcs-server holds the bucket (asked directly: the gate's own plumbing)."""
        return self._backend_has(f"/storage/v1/b/{urllib.parse.quote(bucket, safe='')}")

    def object_exists(self, bucket: str, name: str) -> bool:
        """Whether fake-gcs-server holds the object (asked directly, as bucket_exists)."""
        quoted = f"{urllib.parse.quote(bucket, safe='')}/o/{urllib.parse.quote(name, safe='')}"
        return self._backend_has(f"/storage/v1/b/{quoted}")

    def _backend_has(self, path: str) -> bool:
        if not self.storage_endpoint:
            return False
        backend = urllib.parse.urlsplit(self.storage_endpoint)
        conn = http.client.HTTPConnection(backend.hostname or "127.0.0.1", backend.port, timeout=30)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            return response.status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def _gcs_record_bucket(self, body: bytes, query: dict[str, list[str]]) -> None:
        """A bucket belongs to the project it is created in: project-level roles reach it."""
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            return
        name, location = data.get("name", ""), data.get("location", "")
        project = (query.get("project") or [""])[0]
        if name and project:
            self.record_bucket(name, project, location)

    def _gcs_bucket_iam(
        self, method: str, bucket: str, test: bool, query: dict[str, list[str]], body: bytes, principal: str
    ) -> tuple[int, bytes, str, dict[str, str]]:
        resource = f"buckets/{bucket}"
        if test:
            project = self.bucket_project(bucket)
            scopes = [resource] + ([f"projects/{project}"] if project else [])
            held = [p for p in query.get("permissions", []) if self.allowed(principal, p, scopes)]
            answer: dict[str, Any] = {"kind": "storage#testIamPermissionsResponse", "permissions": held}
            return 200, json.dumps(answer).encode(), "application/json", {}
        if method == "PUT":
            stored = self.set_policy(resource, json.loads(body or b"{}"))
        else:
            stored = self.policy_of(resource)
        answer = {"kind": "storage#policy", "resourceId": f"projects/_/buckets/{bucket}"}
        answer.update({k: v for k, v in stored.items() if not k.startswith("_")})
        return 200, json.dumps(answer).encode(), "application/json", {}

    def _gcs_with_content_crc32c(self, data: bytes) -> bytes:
        """Object resources (one, or a listing) with the crc32c of the bytes fake-gcs-server holds now. GCS computes
        an object's crc32c from its content; fake-gcs-server stores the one it computed at upload, so bytes changed
        under it would keep a stale checksum and a check against it would vouch for them. Computed from its
        filesystem backend (VLP_GCS_DATA_DIR/BUCKET/NAME), cached per file size and mtime."""
        root = os.environ.get("VLP_GCS_DATA_DIR")
        if not root:
            return data
        try:
            parsed = json.loads(data)
        except ValueError:
            return data
        if not isinstance(parsed, dict):  # a DELETE's empty answer reads as null
            return data
        objects = parsed.get("items", []) if parsed.get("kind") == "storage#objects" else [parsed]
        changed = False
        for item in objects:
            if not isinstance(item, dict) or item.get("kind") != "storage#object":
                continue
            path = (Path(root) / str(item.get("bucket", "")) / str(item.get("name", ""))).resolve()
            crc = _content_crc32c(path) if path.is_relative_to(Path(root).resolve()) else ""
            if crc and crc != item.get("crc32c"):
                item["crc32c"] = crc
                changed = True
        return json.dumps(parsed).encode() if changed else data

    def _gcs_with_location(self, data: bytes) -> bytes:
        """A bucket resource (or a list of them) with the location it was created in, not fake-gcs-server's."""
        try:
            parsed = json.loads(data)
        except ValueError:
            return data
        if not isinstance(parsed, dict):  # a DELETE's empty answer reads as null
            return data
        buckets = parsed.get("items", []) if parsed.get("kind") == "storage#buckets" else [parsed]
        changed = False
        for bucket in buckets:
            if isinstance(bucket, dict) and bucket.get("kind") == "storage#bucket":
                location = self.bucket_location(bucket.get("name", ""))
                if location:
                    bucket["location"] = location
                    changed = True
        return json.dumps(parsed).encode() if changed else data

    def _gcs_forward(
        self, method: str, raw_path: str, query: dict[str, list[str]], body: bytes, headers: Any, principal: str
    ) -> tuple[int, bytes, str, dict[str, str]]:
        if not self.storage_endpoint:
            raise ApiError("UNAVAILABLE", "No Cloud Storage behind the emulator: start it with storage_endpoint.")
        backend = urllib.parse.urlsplit(self.storage_endpoint)
        url = raw_path + ("?" + urllib.parse.urlencode(query, doseq=True) if query else "")
        forward = {}
        for name in _REQUEST_HEADERS:
            value = headers.get(name) if headers is not None else None
            if value:
                forward[name] = value
        conn = http.client.HTTPConnection(backend.hostname or "127.0.0.1", backend.port, timeout=300)
        try:
            conn.request(
                method, url, body=body if body or method in ("POST", "PUT", "PATCH") else None, headers=forward
            )
            response = conn.getresponse()
            data = response.read()
            status = response.status
            reply = {name: value for name, value in response.getheaders() if name.lower() in _RESPONSE_HEADERS}
            content_type = response.getheader("content-type") or "application/octet-stream"
        except OSError as exc:
            raise ApiError("UNAVAILABLE", f"Cloud Storage (fake-gcs-server) did not answer: {exc}") from exc
        finally:
            conn.close()
        base = self.storage_endpoint.rstrip("/")
        for name, value in reply.items():
            upload_id = urllib.parse.parse_qs(urllib.parse.urlsplit(value).query).get("upload_id")
            if name.lower() == "location" and upload_id:
                with self._lock:
                    self._upload_sessions[upload_id[0]] = principal
            reply = {k: (v.replace(base, self.url) if k.lower() == "location" else v) for k, v in reply.items()}
        if content_type.startswith("application/json") and "media" not in query.get("alt", []):
            # selfLink / mediaLink name fake-gcs-server; the client downloads from mediaLink when it has one.
            data = data.replace(base.encode(), self.url.encode())
            data = self._gcs_with_location(data)
            data = self._gcs_with_content_crc32c(data)
        return status, data, content_type, reply
