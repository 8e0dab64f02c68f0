"""The emulator's endpoint service: endpoints, and deploying and undeploying models on them."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from typing import Any

from google.cloud import aiplatform_v1 as v1
from google.protobuf import empty_pb2, json_format

import vlp.pipelines.local.emulator.artifact_registry as artifact_registry
import vlp.pipelines.local.emulator.contract as contract
from vlp.pipelines.local.emulator.core import (
    _LOC,
    _apply_mask,
    _check_mask,
    _conform,
    _filter_items,
    _generic_meta,
    _machine_memory_gb,
    _now,
    _pack_op,
    _paginate,
    _parse_request,
    _Route,
    _to_dict,
    _weights_source,
)
from vlp.pipelines.local.emulator.errors import _CODES, ApiError


class EndpointsService:
    """Mixed into Emulator (server.py), whose state and helpers its handlers use."""

    # ------------------------------------------------------------------ endpoints

    def _endpoint(self, p: dict[str, str]) -> tuple[str, dict[str, Any]]:
        name = f"projects/{p['project']}/locations/{p['location']}/endpoints/{p['endpoint']}"
        ep = self._endpoints.get(name)
        if ep is None:
            raise ApiError("NOT_FOUND", f"Endpoint {name} is not found.")
        return name, ep

    def _create_endpoint(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        parent = f"projects/{p['project']}/locations/{p['location']}"
        req = _parse_request(v1.CreateEndpointRequest, body, body_field="endpoint", query=query)
        if not req.endpoint.display_name:
            raise ApiError("INVALID_ARGUMENT", "endpoint.display_name is required.")
        with self._lock:
            endpoint_id = req.endpoint_id or self._new_id()
            if not re.match(r"^[a-z0-9][a-z0-9-]{0,62}$", endpoint_id):
                raise ApiError("INVALID_ARGUMENT", f"endpoint_id {endpoint_id!r} is invalid: use [a-z0-9-], up to 63.")
            name = f"{parent}/endpoints/{endpoint_id}"
            if name in self._endpoints:
                raise ApiError("ALREADY_EXISTS", f"Endpoint {name} already exists.")
            now = _now()
            ep = _to_dict(req.endpoint)
            ep.update({"name": name, "createTime": now, "updateTime": now, "etag": now})
            ep.pop("deployedModels", None)
            ep.pop("trafficSplit", None)
            if ep.get("dedicatedEndpointEnabled"):
                # The DNS name Vertex gives a dedicated endpoint; local clients keep using the emulator URL.
                ep["dedicatedEndpointDns"] = (
                    f"{endpoint_id}.{p['location']}-{p['project']}{contract.DEDICATED_DNS_SUFFIX}"
                )
            self._endpoints[name] = ep
            self._audit("created", "EndpointService.CreateEndpoint", name)
            response = json_format.ParseDict(ep, v1.Endpoint.pb()())
            return self._done_op(name, v1.CreateEndpointOperationMetadata, response)

    def _get_endpoint(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        with self._lock:
            _, ep = self._endpoint(p)
            return self._proto(v1.Endpoint, ep)

    def _beta_endpoint(self, ep: dict[str, Any]) -> dict[str, Any]:
        """An endpoint as v1beta1 shows it: the same, plus MachineSpec.multihost_gpu_node_count (v1beta1 only)."""
        from google.cloud import aiplatform_v1beta1 as v1beta1

        out = _conform(v1beta1.Endpoint, _conform(v1.Endpoint, ep))
        for dm in out.get("deployedModels", []):
            nodes = self._multihost.get(dm["id"])
            if nodes and "dedicatedResources" in dm:
                dm["dedicatedResources"].setdefault("machineSpec", {})["multihostGpuNodeCount"] = nodes
        return out

    def _list_endpoints_beta(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        return self._list_endpoints(p, query, body, view=self._beta_endpoint)

    def _list_endpoints(
        self, p: dict[str, str], query: dict[str, list[str]], body: bytes, view: Callable[..., Any] | None = None
    ) -> Any:
        parent = f"projects/{p['project']}/locations/{p['location']}/"
        req = _parse_request(v1.ListEndpointsRequest, b"", body_field=None, query=query)
        show = view or (lambda ep: _conform(v1.Endpoint, ep))
        with self._lock:
            items = [show(ep) for name, ep in self._endpoints.items() if name.startswith(parent)]
        page, token = _paginate(_filter_items(items, req.filter), req.page_size, req.page_token)
        return self._json({"endpoints": page, **({"nextPageToken": token} if token else {})})

    @staticmethod
    def _check_split(split: dict[str, int], allowed: set[str], what: str) -> None:
        unknown = sorted(set(split) - allowed)
        if unknown:
            raise ApiError("INVALID_ARGUMENT", f"{what} names deployed model(s) not on this endpoint: {unknown}.")
        if any(v < 0 or v > 100 for v in split.values()):
            raise ApiError("INVALID_ARGUMENT", f"{what} percentages must be between 0 and 100: {split}.")
        if split and sum(split.values()) != 100:
            raise ApiError("INVALID_ARGUMENT", f"{what} must add up to 100, got {sum(split.values())}: {split}.")

    def _update_endpoint(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        req = _parse_request(v1.UpdateEndpointRequest, body, body_field="endpoint", query=query)
        paths = _check_mask(req.update_mask, v1.Endpoint.pb().DESCRIPTOR)
        with self._lock:
            _, ep = self._endpoint(p)
            src = _to_dict(req.endpoint)
            if "traffic_split" in paths:
                ids = {dm["id"] for dm in ep.get("deployedModels", [])}
                split = {k: int(v) for k, v in src.get("trafficSplit", {}).items()}
                self._check_split(split, ids, "traffic_split")
                if ids and not split:
                    raise ApiError("INVALID_ARGUMENT", "traffic_split must add up to 100 while models are deployed.")
            forbidden = {"deployed_models", "name", "create_time", "dedicated_endpoint_dns"} & set(paths)
            if forbidden:
                raise ApiError("INVALID_ARGUMENT", f"Fields {sorted(forbidden)} cannot be updated.")
            _apply_mask(ep, src, paths)
            ep["updateTime"] = ep["etag"] = _now()
            self._save()
            return self._proto(v1.Endpoint, ep)

    def _delete_endpoint(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        with self._lock:
            name, ep = self._endpoint(p)
            if ep.get("deployedModels") or self._pending_deploys.get(name):
                ids = [dm["id"] for dm in ep.get("deployedModels", [])] + sorted(self._pending_deploys.get(name, ()))
                raise ApiError(
                    "FAILED_PRECONDITION",
                    f"Endpoint {name} has deployed or being deployed DeployedModel(s): {ids}. "
                    "Undeploy them first (the SDK: endpoint.delete(force=True)).",
                )
            del self._endpoints[name]
            self._audit("deleted", "EndpointService.DeleteEndpoint", name)
            return self._done_op(name, v1.DeleteOperationMetadata, empty_pb2.Empty())

    def _deploy_model_beta(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        # v1beta1 DeployModel: the only API with MachineSpec.multihost_gpu_node_count. Container logging is off
        # there unless asked for ("On the v1beta1 service endpoint, container logging is disabled by default",
        # docs predictions/online-prediction-logging).
        from google.cloud import aiplatform_v1beta1 as v1beta1

        req = _parse_request(v1beta1.DeployModelRequest, body, query=query)
        dm = req.deployed_model
        nodes = dm.dedicated_resources.machine_spec.multihost_gpu_node_count
        if nodes < 0:
            spec = dm.dedicated_resources.machine_spec
            accelerator = v1beta1.AcceleratorType(spec.accelerator_type).name
            contract.check_multihost_machine(spec.machine_type, accelerator, spec.accelerator_count, nodes)
        logging_on = dm.enable_container_logging
        dm.dedicated_resources.machine_spec.multihost_gpu_node_count = 0
        dm.enable_container_logging = False  # v1beta1 only; the v1 parse below would refuse it
        v1_body = json_format.MessageToJson(req)
        return self._deploy_model(
            p, query, v1_body.encode(), nodes=nodes or 1, container_logging=logging_on, api=v1beta1
        )

    def _deploy_model(
        self,
        p: dict[str, str],
        query: dict[str, list[str]],
        body: bytes,
        *,
        nodes: int = 1,
        container_logging: bool = True,
        api: Any = v1,
    ) -> Any:
        if api is v1:
            contract.check_multihost_v1(body)
        req = _parse_request(v1.DeployModelRequest, body, query=query)
        with self._lock:
            ep_name, ep = self._endpoint(p)
            if not req.deployed_model.model:
                raise ApiError("INVALID_ARGUMENT", "deployed_model.model is required.")
            model_name, ref = self._name_to_model_ref(req.deployed_model.model)
            entry = self._model_entry(model_name)
            vid = self._resolve_version(entry, model_name, ref)
            existing = {dm["id"] for dm in ep.get("deployedModels", [])}
            pending = self._pending_deploys.setdefault(ep_name, set())
            dm_id = req.deployed_model.id or self._new_small_id()
            if not re.match(r"^[0-9]{1,10}$", dm_id):
                raise ApiError("INVALID_ARGUMENT", f"deployed_model.id {dm_id!r} is invalid: use 1-10 digits.")
            if dm_id in existing or dm_id in pending:
                raise ApiError("ALREADY_EXISTS", f"Deployed model {dm_id} already exists on {ep_name}.")
            split = dict(req.traffic_split)
            self._check_split(split, existing | {"0"}, "traffic_split")
            spec = entry["versions"][vid].get("containerSpec", {})
            contract.check_deploy_target(spec, ep, model_name)
            machine_spec = req.deployed_model.dedicated_resources.machine_spec
            machine = machine_spec.machine_type
            contract.check_shared_memory(spec, _machine_memory_gb(machine), machine)
            if nodes > 1:
                # Multi-host only in the documented form (v1beta1 reaches here; v1 has no such field).
                contract.check_multihost_machine(
                    machine,
                    v1.AcceleratorType(machine_spec.accelerator_type).name,
                    machine_spec.accelerator_count,
                    nodes,
                )
                contract.check_multihost_launcher(spec, model_name)
                contract.check_multihost_endpoint(ep)
            if not container_logging:
                self._logging_off.add(dm_id)
            if nodes > 1:
                self._multihost[dm_id] = nodes
            dm = _to_dict(req.deployed_model)
            dm.update({"id": dm_id, "model": model_name, "modelVersionId": vid, "createTime": _now()})
            dm.setdefault("displayName", entry["versions"][vid].get("displayName", ""))
            version = entry["versions"][vid]
            op_name = self._op_name(ep_name)
            # The operation carries the calling API version's types: a v1beta1 client unpacks v1beta1 messages.
            meta = _generic_meta(api.DeployModelOperationMetadata, _now())
            op = self._record_op(op_name, _pack_op(op_name, meta))
            op["_model"] = model_name  # private marker: blocks model deletion while deploying
            pending.add(dm_id)
            self._save()
        job = {
            "op": op_name,
            "endpoint": ep_name,
            "dm": dm,
            "split": split,
            "artifact_uri": _weights_source(version),
            # Vertex copied artifactUri at upload (as its service agent) and serves it from AIP_STORAGE_URI.
            "copied": bool(version.get("artifactUri")),
            "container_spec": version.get("containerSpec", {}),
            "meta": meta,
            "api": api,
        }
        worker = threading.Thread(target=self._run_deploy, args=(job,), daemon=True)
        self._workers = [w for w in self._workers if w.is_alive()] + [worker]
        worker.start()
        # A fast deploy answers done at once, so clients skip the SDK's first one-second poll.
        worker.join(timeout=0.2)
        with self._lock:
            return self._json(self._public_op(self._operations[op_name.rsplit("/", 1)[1]]))

    def _check_serving_reads(self, job: dict[str, Any]) -> None:
        """The model server reads its weights as the deployed model's service account; without one, as a
        Vertex-managed identity that "has permission to read model artifacts ... at AIP_STORAGE_URI. Do not rely on
        the service account having any other permissions" (Vertex AI docs, "Use a custom service account")."""
        uri = job["artifact_uri"]
        if not uri.startswith("gs://"):
            return
        account = job["dm"].get("serviceAccount", "")
        copied = job.get("copied", False)
        if account and self.can_read_objects(account, uri):
            return
        if not account and copied:
            return
        who = account or "the Vertex-managed serving identity (no DeployedModel.service_account)"
        fix = (
            f"grant roles/storage.objectViewer on gs://{uri[5:].split('/', 1)[0]} to serviceAccount:{account}"
            if account
            else "deploy with a service account that can read the bucket (DeployedModel.service_account), or "
            "upload the Model with artifactUri so Vertex copies the weights to AIP_STORAGE_URI"
        )
        raise ApiError(
            "FAILED_PRECONDITION",
            f"Model server never became ready: it runs as {who}, which cannot read {uri}.\n"
            f"Model server log (last lines):\nERROR: 403 GET {uri}: {account or 'The caller'} does not have "
            "storage.objects.list access to the Google Cloud Storage bucket. Permission 'storage.objects.list' "
            f"denied on resource (or it may not exist).\nFix: {fix}.",
        )

    def _run_deploy(self, job: dict[str, Any]) -> None:
        dm_id = job["dm"]["id"]
        error: ApiError | None = None
        started = False
        try:
            if "deploy-error" in self.faults:
                time.sleep(0.1)
                raise ApiError(
                    "FAILED_PRECONDITION",
                    f"Model server never became ready: deployed model {dm_id} did not answer its health route "
                    "(injected fault deploy-error). Check the serving container's arguments and logs.",
                )
            if "deploy-timeout" in self.faults:
                waited = 2
                self._stopping.wait(waited)
                raise ApiError("DEADLINE_EXCEEDED", f"Deployment of {dm_id} timed out after {waited} s.")
            artifact_registry.check_vertex_pull(
                self, job["container_spec"].get("imageUri", ""), job["endpoint"].split("/")[1]
            )
            self._check_serving_reads(job)
            try:
                self.serving.start(dm_id, job["artifact_uri"], job["container_spec"], self.deploy_timeout_s)
                started = True
            except Exception as exc:  # noqa: BLE001 - any serving failure ends the operation with its reason
                message = getattr(exc, "message", None) or str(exc) or repr(exc)
                tail = list(getattr(exc, "log_tail", []) or [])
                if tail:
                    message += "\nModel server log (last lines):\n" + "\n".join(tail)
                code = getattr(exc, "status", None)
                raise ApiError(code if code in _CODES else "FAILED_PRECONDITION", message) from exc
        except ApiError as err:
            error = err
        with self._lock:
            self._pending_deploys.get(job["endpoint"], set()).discard(dm_id)
            op_key = job["op"].rsplit("/", 1)[1]
            ep = self._endpoints.get(job["endpoint"])
            if error is None and op_key in self._cancelled_ops:
                error = ApiError("CANCELLED", f"Deployment of {dm_id} was cancelled.")
            if error is None and ep is None:
                error = ApiError("NOT_FOUND", f"Endpoint {job['endpoint']} was deleted during deployment.")
            if error is None and ep is not None:
                ep.setdefault("deployedModels", []).append(job["dm"])
                self._audit("created", "EndpointService.DeployModel", f"{job['endpoint']}/deployedModels/{dm_id}")
                ids = {dm["id"] for dm in ep["deployedModels"]}
                if job["split"]:
                    split = {(dm_id if k == "0" else k): v for k, v in job["split"].items()}
                    ep["trafficSplit"] = {k: v for k, v in split.items() if k in ids}
                elif not any(ep.get("trafficSplit", {}).values()):
                    ep["trafficSplit"] = {dm_id: 100}
                ep["updateTime"] = ep["etag"] = _now()
                self._serving_status[dm_id] = "ready"
                self._throttled[dm_id] = 0
                response = job["api"].DeployModelResponse.pb()()
                json_format.ParseDict({"deployedModel": job["dm"]}, response)
                self._operations[op_key] = _pack_op(job["op"], job["meta"], response=response)
            else:
                self._operations[op_key] = _pack_op(job["op"], job["meta"], error=error)
            self._save()
        if error is not None and started:
            self.serving.stop(dm_id, remove_copy=True)

    def _undeploy_model(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        req = _parse_request(v1.UndeployModelRequest, body, query=query)
        with self._lock:
            ep_name, ep = self._endpoint(p)
            dms = ep.get("deployedModels", [])
            if req.deployed_model_id not in {dm["id"] for dm in dms}:
                raise ApiError("NOT_FOUND", f"Deployed model {req.deployed_model_id} is not on {ep_name}.")
            remaining = {dm["id"] for dm in dms} - {req.deployed_model_id}
            split = dict(req.traffic_split)
            if split:
                self._check_split(split, remaining, "traffic_split")
            else:
                split = {k: v for k, v in ep.get("trafficSplit", {}).items() if k != req.deployed_model_id}
                if remaining and ep.get("trafficSplit", {}).get(req.deployed_model_id) and sum(split.values()) != 100:
                    raise ApiError(
                        "FAILED_PRECONDITION",
                        f"Deployed model {req.deployed_model_id} still receives traffic; undeploying it would leave "
                        f"the endpoint's traffic at {sum(split.values())}%. Pass traffic_split for the remaining "
                        f"deployed models {sorted(remaining)}.",
                    )
        # Stopping a server can take seconds; do it outside the lock so predictions keep flowing.
        if self.serving is not None:
            self.serving.stop(req.deployed_model_id, remove_copy=True)
        with self._lock:
            ep_name, ep = self._endpoint(p)
            ep["deployedModels"] = [dm for dm in ep.get("deployedModels", []) if dm["id"] != req.deployed_model_id]
            self._audit("deleted", "EndpointService.UndeployModel", f"{ep_name}/deployedModels/{req.deployed_model_id}")
            ep["trafficSplit"] = split if ep["deployedModels"] else {}
            ep["updateTime"] = ep["etag"] = _now()
            self._serving_status.pop(req.deployed_model_id, None)
            self._multihost.pop(req.deployed_model_id, None)
            return self._done_op(ep_name, v1.UndeployModelOperationMetadata, v1.UndeployModelResponse.pb()())

    def _mutate_deployed_model(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        req = _parse_request(v1.MutateDeployedModelRequest, body, query=query)
        paths = _check_mask(req.update_mask, v1.DeployedModel.pb().DESCRIPTOR)
        with self._lock:
            ep_name, ep = self._endpoint(p)
            target = next((dm for dm in ep.get("deployedModels", []) if dm["id"] == req.deployed_model.id), None)
            if target is None:
                raise ApiError("NOT_FOUND", f"Deployed model {req.deployed_model.id!r} is not on {ep_name}.")
            forbidden = {"id", "model", "model_version_id", "create_time"} & set(paths)
            if forbidden:
                raise ApiError("INVALID_ARGUMENT", f"Fields {sorted(forbidden)} of a deployed model cannot change.")
            _apply_mask(target, _to_dict(req.deployed_model), paths)
            ep["updateTime"] = ep["etag"] = _now()
            response = v1.MutateDeployedModelResponse.pb()()
            json_format.ParseDict({"deployedModel": target}, response)
            return self._done_op(ep_name, v1.MutateDeployedModelOperationMetadata, response)

    def _endpoint_routes(self) -> list[_Route]:
        ep = _LOC + r"/endpoints/(?P<endpoint>[^/:]+)"
        r = _Route
        return [
            r("POST", _LOC + r"/endpoints", self._create_endpoint),
            r("GET", _LOC + r"/endpoints", self._list_endpoints),
            r("GET", _LOC.replace("/v1/", "/v1beta1/", 1) + r"/endpoints", self._list_endpoints_beta),
            r("GET", ep, self._get_endpoint),
            r("PATCH", ep, self._update_endpoint),
            r("DELETE", ep, self._delete_endpoint),
            r("POST", ep + r":deployModel", self._deploy_model),
            r("POST", ep.replace("/v1/", "/v1beta1/", 1) + r":deployModel", self._deploy_model_beta),
            r("POST", ep + r":undeployModel", self._undeploy_model),
            r("POST", ep + r":mutateDeployedModel", self._mutate_deployed_model),
        ]
