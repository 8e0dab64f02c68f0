"""The emulator's prediction service: :predict, :rawPredict, chat completions and invoke, forwarded to the model servers."""

from __future__ import annotations

import json
import random
from typing import Any

from google.cloud import aiplatform_v1 as v1

import vlp.pipelines.local.emulator.contract as contract
from vlp.pipelines.local.emulator.core import (
    _LOC,
    _LOG,
    _engine,
    _parse_request,
    _Route,
    _weights_source,
)
from vlp.pipelines.local.emulator.errors import ApiError


class PredictionService:
    """Mixed into Emulator (server.py), whose state and helpers its handlers use."""

    # ------------------------------------------------------------------ prediction

    def _spec_of(self, dm: dict[str, Any]) -> dict[str, Any]:
        version = self._models.get(dm.get("model", ""), {"versions": {}})["versions"].get(
            dm.get("modelVersionId", ""), {}
        )
        return version.get("containerSpec", {})

    def _prediction_endpoint(self, p: dict[str, str], body: bytes) -> tuple[str, dict[str, Any]]:
        """The endpoint a prediction call names, after the host and size rules (contract V-HOST, V-SIZE)."""
        ep_name, ep = self._endpoint(p)
        contract.check_request_size(body, bool(ep.get("dedicatedEndpointEnabled")))
        regional = (
            f"{p['location']}-aiplatform.googleapis.com",
            f"{self.host}:{self.port}",
            f"localhost:{self.port}",
            "",
        )
        contract.check_host(ep, p.get("_host", ""), regional)
        return ep_name, ep

    def _pick_deployed_model(
        self, p: dict[str, str], body: bytes, kind: str
    ) -> tuple[str, dict[str, Any], dict[str, Any]]:
        with self._lock:
            ep_name, ep = self._prediction_endpoint(p, body)
            split = {k: v for k, v in ep.get("trafficSplit", {}).items() if v > 0}
            if not split:
                raise ApiError(
                    "FAILED_PRECONDITION",
                    f"Endpoint {ep_name} has no deployed model with traffic: deploy a model or set traffic_split.",
                )
            dm_id = random.choices(list(split), weights=list(split.values()))[0]
            dm = next(d for d in ep["deployedModels"] if d["id"] == dm_id)
            spec = self._spec_of(dm)
            if kind == "invoke":
                contract.check_invoke(ep, spec, dm_id, p.get("subpath") or "/", _engine(spec))
            else:
                contract.check_predict_route(spec, dm_id, kind)
            return ep_name, ep, dict(dm)

    def _forward(
        self, ep_name: str, dm: dict[str, Any], kind: str, body: bytes, subpath: str
    ) -> tuple[int, bytes, str, dict[str, str]]:
        dm_id = dm["id"]
        # Which deployed model answered, as the SDK reads it back from a raw answer (aiplatform models.py
        # _RAW_PREDICT_*_KEY: Endpoint.predict(use_raw_predict=True) indexes the first two, KeyError without them).
        headers = {
            "X-Vertex-AI-Deployed-Model-Id": dm_id,
            "X-Vertex-AI-Model": dm.get("model", ""),
            "X-Vertex-AI-Model-Version-Id": dm.get("modelVersionId", ""),
        }
        with self._lock:
            status = self._serving_status.get(dm_id, "ready")
            throttle = "predict-429" in self.faults and self._throttled.get(dm_id, 0) < 2
            if throttle:
                self._throttled[dm_id] = self._throttled.get(dm_id, 0) + 1
        if throttle:
            err = ApiError(
                "RESOURCE_EXHAUSTED",
                f"Too many requests for deployed model {dm_id} on {ep_name} (injected fault predict-429); retry later.",
            )
            return err.http_code, err.body(), "application/json", headers
        if status != "ready":
            what = "is still starting" if status == "starting" else f"is not serving: {status}"
            err = ApiError("UNAVAILABLE", f"Deployed model {dm_id} on {ep_name} {what}.")
            return err.http_code, err.body(), "application/json", headers
        try:
            code, out, ctype = self.serving.forward(dm_id, kind, body, subpath)
        except Exception as exc:  # noqa: BLE001 - a dead model server is a 503, as Vertex answers
            message = getattr(exc, "message", None) or str(exc) or repr(exc)
            err = ApiError("UNAVAILABLE", f"Deployed model {dm_id} on {ep_name} did not answer: {message}")
            return err.http_code, err.body(), "application/json", headers
        if kind == "predict" and code == 200:
            out = self._stamp_prediction(out, dm)
        return code, out, ctype, headers

    @staticmethod
    def _stamp_prediction(out: bytes, dm: dict[str, Any]) -> bytes:
        """Fill in which deployed model answered, as Vertex's PredictResponse does."""
        try:
            data = json.loads(out)
        except ValueError:
            return out
        if not isinstance(data, dict):
            return out
        data.setdefault("deployedModelId", dm["id"])
        data.setdefault("model", dm["model"])
        data.setdefault("modelVersionId", dm.get("modelVersionId", ""))
        return json.dumps(data).encode()

    def _predict(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        _parse_request(v1.PredictRequest, body)
        ep_name, _, dm = self._pick_deployed_model(p, body, "predict")
        return self._forward(ep_name, dm, "predict", body, "")

    def _raw_predict(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        # rawPredict carries the model server's own payload (an HttpBody), so there is no proto to parse.
        ep_name, _, dm = self._pick_deployed_model(p, body, "rawPredict")
        return self._forward(ep_name, dm, "rawPredict", body, "")

    def _server_streaming_predict(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        """PredictionService.ServerStreamingPredict is "for Vertex LLM streaming" (its REST reference): Tensors in and
        out, for Google's own models. Google documents no mapping onto a custom container's routes, so an endpoint of
        custom-container models (every model vlp deploys) refuses it here, naming the routes that do stream from one
        (unverified: what Google answers; strict, contract A38)."""
        _parse_request(v1.StreamingPredictRequest, body, query=query)
        with self._lock:
            ep_name, ep = self._prediction_endpoint(p, body)
            if not ep.get("deployedModels"):
                raise ApiError("FAILED_PRECONDITION", f"Endpoint {ep_name} has no deployed model: deploy a model.")
        raise ApiError(
            "FAILED_PRECONDITION",
            f"Endpoint {ep_name} serves models in custom containers: serverStreamingPredict streams Vertex AI's own "
            "LLMs (Tensor inputs and outputs). Stream from a custom container with :streamRawPredict (the container's "
            'predict route, its own payload) or chat completions with "stream": true (v1beta1 .../chat/completions, '
            "or the invoke route on a dedicated endpoint).",
        )

    def _chat(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        ep_name, _, dm = self._pick_deployed_model(p, body, "chat")
        return self._forward(ep_name, dm, "chat", body, "/chat/completions")

    def _invoke_endpoint(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        ep_name, _, dm = self._pick_deployed_model(p, body, "invoke")
        return self._forward(ep_name, dm, "invoke", body, p.get("subpath") or "/")

    def _invoke_deployed(self, p: dict[str, str], query: dict[str, list[str]], body: bytes) -> Any:
        with self._lock:
            ep_name, ep = self._prediction_endpoint(p, body)
            dm = next((dict(d) for d in ep.get("deployedModels", []) if d["id"] == p["dm"]), None)
            if dm is None:
                raise ApiError("NOT_FOUND", f"Deployed model {p['dm']} is not on {ep_name}.")
            spec = self._spec_of(dm)
            contract.check_invoke(ep, spec, dm["id"], p.get("subpath") or "/", _engine(spec))
        return self._forward(ep_name, dm, "invoke", body, p.get("subpath") or "/")

    def _restart_serving(self, dm: dict[str, Any]) -> None:
        """Bring a deployed model from a previous run back up; on failure it stays listed and answers 503."""
        model = self._models.get(dm.get("model", ""), {"versions": {}})
        version = model["versions"].get(dm.get("modelVersionId", ""), {})
        try:
            self.serving.start(
                dm["id"], _weights_source(version), version.get("containerSpec", {}), self.deploy_timeout_s
            )
            status = "ready"
        except Exception as exc:  # noqa: BLE001 - recorded and answered as 503 on predict
            status = f"restart failed: {getattr(exc, 'message', None) or exc}"
            _LOG.warning("restarting deployed model %s failed: %s", dm["id"], status)
        with self._lock:
            self._serving_status[dm["id"]] = status

    def _prediction_routes(self) -> list[_Route]:
        ep = _LOC + r"/endpoints/(?P<endpoint>[^/:]+)"
        r = _Route
        return [
            r("POST", ep + r":predict", self._predict),
            r("POST", ep + r":rawPredict", self._raw_predict),
            # PredictionService.StreamRawPredict: the same forwarding, the answer streamed as the model server sends
            # it (the SDK's Endpoint.stream_raw_predict reads it line by line; contract A30).
            r("POST", ep + r":streamRawPredict", self._raw_predict),
            r("POST", ep + r":serverStreamingPredict", self._server_streaming_predict),
            r("POST", ep + r"[:/]invoke(?P<subpath>/.*)?", self._invoke_endpoint),
            # PredictionService.ChatCompletions exists in v1beta1 only (prediction_service.proto).
            r("POST", ep.replace("/v1/", "/v1beta1/", 1) + r"/chat/completions", self._chat),
            # REST reference and the SDK's Endpoint.invoke use ".../deployedModels/ID/invoke/ROUTE";
            # the ":invoke" spelling is accepted too.
            r("POST", ep + r"/deployedModels/(?P<dm>[^/:]+)[:/]invoke(?P<subpath>/.*)?", self._invoke_deployed),
        ]
