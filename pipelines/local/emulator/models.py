"""The emulator's Model Registry service: uploads, versions, aliases, updates and deletes."""

from __future__ import annotations

import re
from typing import Any

from google.cloud import aiplatform_v1 as v1
from google.protobuf import empty_pb2

import vlp.pipelines.local.emulator.artifact_registry as artifact_registry
import vlp.pipelines.local.emulator.contract as contract
from vlp.pipelines.local.emulator.core import (
    _ALIAS_RE,
    _LOC,
    _RESOURCE_ID_RE,
    _apply_mask,
    _check_mask,
    _conform,
    _filter_items,
    _generic_meta,
    _now,
    _pack_op,
    _paginate,
    _parse_request,
    _Route,
    _to_dict,
)
from vlp.pipelines.local.emulator.errors import ApiError
from vlp.pipelines.local.emulator.iam import vertex_service_agent


class ModelsService:
    """Mixed into Emulator (server.py), whose state and helpers its handlers use."""

    # ------------------------------------------------------------------ models

    def _model_entry(self, name: str) -> dict[str, Any]:
        entry = self._models.get(name)
        if entry is None:
            raise ApiError("NOT_FOUND", f"Model {name} is not found.")
        return entry

    def _resolve_version(self, entry: dict[str, Any], name: str, ref: str | None) -> str:
        versions = entry["versions"]
        ref = ref or "default"
        if ref in versions:
            return ref
        for vid, version in versions.items():
            if ref in version.get("versionAliases", []):
                return vid
        raise ApiError("NOT_FOUND", f"Model {name}@{ref} is not found: no such version or alias.")

    def _split_model_ref(self, p: dict[str, str]) -> tuple[str, str | None]:
        model_id, _, ref = p["model"].partition("@")
        name = f"projects/{p['project']}/locations/{p['location']}/models/{model_id}"
        return name, ref or None

    def _name_to_model_ref(self, full: str) -> tuple[str, str | None]:
        name, _, ref = full.partition("@")
        if not re.match(r"^projects/[^/]+/locations/[^/]+/models/[^/@]+$", name):
            raise ApiError("INVALID_ARGUMENT", f"{full!r} is not a model resource name.")
        return name, ref or None

    def _deployments_of(self, model_name: str, vid: str | None = None) -> list[dict[str, str]]:
        refs = []
        for ep_name, ep in self._endpoints.items():
            for dm in ep.get("deployedModels", []):
                if dm.get("model") == model_name and (vid is None or dm.get("modelVersionId") == vid):
                    refs.append({"endpoint": ep_name, "deployedModelId": dm["id"]})
        return refs

    def _pending_deploys_of(self, model_name: str) -> list[str]:
        return [op["name"] for op in self._operations.values() if not op.get("done") and op.get("_model") == model_name]

    def _model_view(self, name: str, vid: str) -> dict[str, Any]:
        version = dict(self._models[name]["versions"][vid])
        deployed = self._deployments_of(name, vid)
        if deployed:
            version["deployedModels"] = deployed
        return _conform(v1.Model, version)

    def _move_aliases(self, entry: dict[str, Any], vid: str, aliases: list[str]) -> None:
        """Give `aliases` to version `vid`, taking them off any other version (an alias names one version)."""
        for alias in aliases:
            if not _ALIAS_RE.match(alias) or alias.isdigit():
                raise ApiError(
                    "INVALID_ARGUMENT",
                    f"Version alias {alias!r} is invalid: use [a-z][a-zA-Z0-9-]{{0,126}}[a-z0-9], not only digits.",
                )
        now = _now()
        for other_vid, version in entry["versions"].items():
            if other_vid == vid:
                continue
            kept = [a for a in version.get("versionAliases", []) if a not in aliases]
            if kept != version.get("versionAliases", []):
                version["versionAliases"] = kept
                version["versionUpdateTime"] = now
        mine = entry["versions"][vid].setdefault("versionAliases", [])
        for alias in aliases:
            if alias not in mine:
                mine.append(alias)

    def _upload_model(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        parent = f"projects/{p['project']}/locations/{p['location']}"
        req = _parse_request(v1.UploadModelRequest, body, query=query, path_fields={"parent": parent})
        if not req.model.display_name:
            raise ApiError("INVALID_ARGUMENT", "model.display_name is required.")
        contract.check_container_spec(_to_dict(req.model).get("containerSpec", {}))
        artifact_registry.check_upload_image(req.model.container_spec.image_uri, p["location"])
        if req.model.artifact_uri:
            location = self._bucket_location(req.model.artifact_uri)
            contract.check_artifact_region(req.model.artifact_uri, location, p["location"])
        with self._lock:
            if req.parent_model:
                name, _ = self._name_to_model_ref(req.parent_model)
                entry = self._model_entry(name)
                if req.model_id and req.model_id != name.rsplit("/", 1)[1]:
                    raise ApiError("INVALID_ARGUMENT", "model_id and parent_model name different models.")
            else:
                model_id = req.model_id or self._new_id()
                if not _RESOURCE_ID_RE.match(model_id):
                    raise ApiError("INVALID_ARGUMENT", f"model_id {model_id!r} is invalid: use [a-z0-9_-], up to 63.")
                name = f"{parent}/models/{model_id}"
                if name in self._models:
                    raise ApiError(
                        "ALREADY_EXISTS", f"Model {name} already exists; pass parent_model to add a version."
                    )
                entry = None
            op_name = self._op_name(name)
            meta = _generic_meta(v1.UploadModelOperationMetadata, _now())
            if "upload-error" in self.faults:
                err = ApiError(
                    "INTERNAL",
                    f"Upload of model {req.model.display_name!r} ({name}) failed: internal error "
                    "(injected fault upload-error).",
                )
                op = self._record_op(op_name, _pack_op(op_name, meta, error=err))
                self._save()
                return self._json(op)
            agent = vertex_service_agent(p["project"])
            if req.model.artifact_uri and not self.can_read_objects(agent, req.model.artifact_uri):
                # Vertex copies artifactUri as its service agent while the upload runs; the operation fails.
                err = ApiError(
                    "FAILED_PRECONDITION",
                    f"Vertex AI Service Agent {agent} does not have permission to read {req.model.artifact_uri}: "
                    f"storage.objects.list and storage.objects.get are needed on the bucket. Grant "
                    f"roles/storage.objectViewer on it to serviceAccount:{agent}.",
                )
                op = self._record_op(op_name, _pack_op(op_name, meta, error=err))
                self._save()
                return self._json(op)
            now = _now()
            if entry is None:
                entry = {"versions": {}, "nextVersion": 1, "createTime": now}
                self._models[name] = entry
            vid = str(entry["nextVersion"])
            entry["nextVersion"] += 1
            version = _to_dict(req.model)
            version.update(
                {
                    "name": name,
                    "versionId": vid,
                    "versionAliases": [],
                    "createTime": entry["createTime"],
                    "updateTime": now,
                    "versionCreateTime": now,
                    "versionUpdateTime": now,
                }
            )
            version.pop("deployedModels", None)
            if "containerSpec" in version:
                # What Vertex reports for custom-container models; the SDK's deploy() reads it.
                version["supportedDeploymentResourcesTypes"] = ["DEDICATED_RESOURCES", "SHARED_RESOURCES"]
            entry["versions"][vid] = version
            self._audit("created", "ModelService.UploadModel", f"{name}@{vid}")
            aliases = list(dict.fromkeys(req.model.version_aliases))
            # The first version is always the default; later ones only when asked, as on Vertex.
            if vid == "1" and "default" not in aliases:
                aliases.insert(0, "default")
            self._move_aliases(entry, vid, aliases)
            response = v1.UploadModelResponse.pb()(model=name, model_version_id=vid)
            op = self._record_op(op_name, _pack_op(op_name, meta, response=response))
            self._save()
            return self._json(op)

    def _bucket_location(self, uri: str) -> str:
        """The location of a gs:// URI's bucket in fake GCS ("" when there is no GCS peer or no such bucket)."""
        if not self.storage_endpoint or not uri.startswith("gs://"):
            return ""
        if self.bucket_location(uri[5:].split("/", 1)[0]):
            return self.bucket_location(uri[5:].split("/", 1)[0])
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        client = storage.Client(
            project="local", credentials=AnonymousCredentials(), client_options={"api_endpoint": self.storage_endpoint}
        )
        try:
            bucket = client.lookup_bucket(uri[5:].split("/", 1)[0])
        except Exception:  # noqa: BLE001 - an unreachable GCS is the serving step's error to report
            return ""
        return (bucket.location or "") if bucket is not None else ""

    def _get_model(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        name, ref = self._split_model_ref(p)
        with self._lock:
            entry = self._model_entry(name)
            return self._json(self._model_view(name, self._resolve_version(entry, name, ref)))

    def _list_models(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        parent = f"projects/{p['project']}/locations/{p['location']}"
        req = _parse_request(v1.ListModelsRequest, b"", body_field=None, query=query)
        with self._lock:
            items = [
                self._model_view(name, self._resolve_version(entry, name, None))
                for name, entry in self._models.items()
                if name.startswith(parent + "/")
            ]
        page, token = _paginate(_filter_items(items, req.filter), req.page_size, req.page_token)
        return self._json({"models": page, **({"nextPageToken": token} if token else {})})

    def _list_model_versions(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        name, _ = self._split_model_ref(p)
        req = _parse_request(v1.ListModelVersionsRequest, b"", body_field=None, query=query)
        with self._lock:
            entry = self._model_entry(name)
            items = [self._model_view(name, vid) for vid in entry["versions"]]
        page, token = _paginate(_filter_items(items, req.filter), req.page_size, req.page_token)
        return self._json({"models": page, **({"nextPageToken": token} if token else {})})

    def _update_model(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        name, ref = self._split_model_ref(p)
        req = _parse_request(v1.UpdateModelRequest, body, body_field="model", query=query)
        paths = _check_mask(req.update_mask, v1.Model.pb().DESCRIPTOR)
        with self._lock:
            entry = self._model_entry(name)
            vid = self._resolve_version(entry, name, ref)
            version = entry["versions"][vid]
            src = _to_dict(req.model)
            aliases = [p_ for p_ in paths if p_ == "version_aliases"]
            _apply_mask(version, src, [p_ for p_ in paths if p_ != "version_aliases"])
            if aliases:
                self._move_aliases(entry, vid, list(src.get("versionAliases", [])))
            version["updateTime"] = version["versionUpdateTime"] = _now()
            self._save()
            return self._json(self._model_view(name, vid))

    def _delete_model(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        name, ref = self._split_model_ref(p)
        if ref:
            return self._delete_model_version(p, query, body)
        _parse_request(v1.DeleteModelRequest, b"", body_field=None, query=query)
        with self._lock:
            self._model_entry(name)
            deployed = self._deployments_of(name)
            if deployed or self._pending_deploys_of(name):
                where = ", ".join(f"{d['endpoint']} (deployed model {d['deployedModelId']})" for d in deployed)
                raise ApiError(
                    "FAILED_PRECONDITION",
                    f"Model {name} has deployed or being deployed version(s): {where or 'deploy in progress'}. "
                    "Undeploy them before deleting the model.",
                )
            for vid in self._models[name]["versions"]:
                self._audit("deleted", "ModelService.DeleteModel", f"{name}@{vid}")
            del self._models[name]
            return self._done_op(name, v1.DeleteOperationMetadata, empty_pb2.Empty())

    def _delete_model_version(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        name, ref = self._split_model_ref(p)
        if not ref:
            raise ApiError("INVALID_ARGUMENT", f"DeleteModelVersion needs a versioned name such as {name}@2.")
        with self._lock:
            entry = self._model_entry(name)
            vid = self._resolve_version(entry, name, ref)
            if len(entry["versions"]) == 1:
                raise ApiError("FAILED_PRECONDITION", f"{name}@{vid} is the only version: delete the model instead.")
            if "default" in entry["versions"][vid].get("versionAliases", []):
                raise ApiError(
                    "FAILED_PRECONDITION",
                    f"{name}@{vid} is the default version: move the 'default' alias to another version first.",
                )
            if self._deployments_of(name, vid):
                raise ApiError("FAILED_PRECONDITION", f"{name}@{vid} is deployed: undeploy it first.")
            del entry["versions"][vid]
            self._audit("deleted", "ModelService.DeleteModelVersion", f"{name}@{vid}")
            return self._done_op(name, v1.DeleteOperationMetadata, empty_pb2.Empty())

    def _merge_version_aliases(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        name, ref = self._split_model_ref(p)
        req = _parse_request(v1.MergeVersionAliasesRequest, body, query=query)
        with self._lock:
            entry = self._model_entry(name)
            vid = self._resolve_version(entry, name, ref)
            add = [a for a in req.version_aliases if not a.startswith("-")]
            remove = [a[1:] for a in req.version_aliases if a.startswith("-")]
            if "default" in remove:
                raise ApiError(
                    "INVALID_ARGUMENT", "The 'default' alias cannot be removed, only moved to another version."
                )
            self._move_aliases(entry, vid, add)
            version = entry["versions"][vid]
            version["versionAliases"] = [a for a in version.get("versionAliases", []) if a not in remove]
            version["versionUpdateTime"] = _now()
            self._save()
            return self._json(self._model_view(name, vid))

    def _model_routes(self) -> list[_Route]:
        model = _LOC + r"/models/(?P<model>[^/:]+)"
        r = _Route
        return [
            r("POST", _LOC + r"/models:upload", self._upload_model),
            r("GET", _LOC + r"/models", self._list_models),
            r("GET", model + r":listVersions", self._list_model_versions),
            r("GET", model, self._get_model),
            r("PATCH", model, self._update_model),
            r("DELETE", model + r":deleteVersion", self._delete_model_version),
            r("DELETE", model, self._delete_model),
            r("POST", model + r":mergeVersionAliases", self._merge_version_aliases),
        ]
