"""`vlp local status` and `vlp local token`: what the background stack serves, where, and how to call it with the
tutorials' own clients (the aiplatform SDK, openai, huggingface_hub, curl), changing only host and credentials.

Every snippet calls as the local project's owner (the person who ran `vlp setup`), who holds what calling needs
(aiplatform.endpoints.predict, run.routes.invoke), and gets its token the way Google's clients do on a VM: from the
metadata server, here the emulator's stand-in."""

from __future__ import annotations

import json
import shlex
import urllib.request
from pathlib import Path
from typing import Any

from vlp.pipelines.local.peers import owner_of

DEMO_QUESTION = "What is the capital of France?"


def metadata_host(api: str, principal: str) -> str:
    """GCE_METADATA_HOST for google-auth: the emulator's metadata stand-in, answering as `principal`."""
    return f"{api.removeprefix('http://')}/_md/{principal}"


def token(api: str, principal: str, audience: str = "") -> str:
    """What the metadata server hands `principal`: an access token, or an ID token for `audience` (what
    `gcloud auth print-access-token` / `print-identity-token --audiences` print)."""
    base = f"{api}/_md/{principal}/computeMetadata/v1/instance/service-accounts/default"
    from urllib.parse import quote

    url = f"{base}/identity?audience={quote(audience, safe='')}" if audience else f"{base}/token"
    request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
    with urllib.request.urlopen(request, timeout=10) as response:
        data = response.read().decode()
    return data if audience else json.loads(data)["access_token"]


def _emulator_state(api: str, plumbing: dict[str, str]) -> dict[str, Any]:
    request = urllib.request.Request(f"{api}/_emulator/state", headers=plumbing)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _served_name(model: dict[str, Any] | None) -> str:
    """The name vLLM answers to (--served-model-name); TGI ignores the field (it answers with its own model id)."""
    for arg in ((model or {}).get("containerSpec") or {}).get("args") or []:
        if str(arg).startswith("--served-model-name="):
            return str(arg).split("=", 1)[1]
    return "tgi"


def _engine(model: dict[str, Any] | None) -> str:
    """How the model's image is called: "vllm-openai" (vLLM's own image), "vllm" (Model Garden's) or "tgi"."""
    from vlp.components.serving.images import find

    image = str(((model or {}).get("containerSpec") or {}).get("imageUri") or "")
    known = find(image)
    if known is not None:
        return {"openai": "vllm-openai", "model-garden": "vllm", "tgi": "tgi"}[known.api]
    return "tgi" if "tgi" in image or "text-generation-inference" in image else "vllm"


def describe(api: str, plumbing: dict[str, str], token_command: str = "vlp local token") -> dict[str, Any]:
    """Every endpoint with a deployed model and every Cloud Run service the stack holds, with how to call each
    (`plumbing`: the stack's key header, plumbing.py; `token_command`: how the shell snippets get a token, with the
    state dir's absolute path)."""
    state = _emulator_state(api, plumbing)
    models = {f"{m['name']}@{m.get('versionId')}": m for m in state["models"]}
    endpoints = []
    for ep in state["endpoints"]:
        split = {k: v for k, v in (ep.get("trafficSplit") or {}).items() if v}
        serving = [dm for dm in ep.get("deployedModels") or [] if dm["id"] in split]
        if not serving:
            continue
        dm = max(serving, key=lambda d: split[d["id"]])
        model = models.get(f"{dm['model']}@{dm.get('modelVersionId')}")
        project, region = ep["name"].split("/")[1], ep["name"].split("/")[3]
        entry = {
            "name": ep["name"],
            "display_name": ep.get("displayName", ""),
            "deployed_models": [{"id": d["id"], "traffic_percent": split[d["id"]]} for d in serving],
            "dedicated_dns": ep.get("dedicatedEndpointDns", "") if ep.get("dedicatedEndpointEnabled") else "",
            "served_model_name": _served_name(model),
            "engine": _engine(model),
            "invoke": bool(((model or {}).get("containerSpec") or {}).get("invokeRoutePrefix")),
            "project": project,
            "region": region,
            "deployed_model_id": dm["id"],
        }
        entry["predict_url"] = f"{api}/v1/{ep['name']}:predict"
        entry["raw_predict_url"] = f"{api}/v1/{ep['name']}:rawPredict"
        entry["chat_url"] = f"{api}/v1beta1/{ep['name']}/chat/completions"
        entry["snippets"] = vertex_snippets(api, entry, token_command)
        endpoints.append(entry)
    services = []
    for svc in state.get("runServices") or []:
        project = svc["name"].split("/")[1]
        tags = {t["tag"]: t.get("uri", "") for t in svc.get("trafficStatuses") or [] if t.get("tag")}
        entry = {"name": svc["name"], "url": svc.get("uri", ""), "tag_urls": tags, "project": project}
        container = ((svc.get("template") or {}).get("containers") or [{}])[0]
        entry["served_model_name"] = next(
            (str(a).split("=", 1)[1] for a in container.get("args") or [] if str(a).startswith("--served-model-name=")),
            "",
        )
        entry["snippets"] = run_snippets(api, entry, token_command)
        services.append(entry)
    return {"endpoints": endpoints, "services": services}


def _python_auth(api: str, project: str) -> str:
    return (
        "import os\n"
        "# google-auth finds the local metadata server as it finds Google's on a VM (set before importing it):\n"
        "# every call is made as the local project's owner.\n"
        f'os.environ["GCE_METADATA_HOST"] = os.environ["GCE_METADATA_IP"] = "{metadata_host(api, owner_of(project))}"\n'
        "from google.auth import compute_engine\n"
        "credentials = compute_engine.Credentials()\n"
    )


def _messages() -> str:
    return f'[{{"role": "user", "content": "{DEMO_QUESTION}"}}]'


def vertex_snippets(api: str, ep: dict[str, Any], token_command: str) -> dict[str, str]:
    """Client code for one Vertex endpoint, as Google's tutorials write it, host and credentials changed: the
    routes its model takes (invoke only, with invoke_route_prefix; else predict and, for vLLM, chat completions)."""
    project, region, name = ep["project"], ep["region"], ep["served_model_name"]
    auth = _python_auth(api, project)
    dedicated = ep["dedicated_dns"]
    init = (
        "from google.cloud import aiplatform\n"
        f'aiplatform.init(project="{project}", location="{region}", credentials=credentials,\n'
        f'                api_endpoint="{api}", api_transport="rest")\n'
        f'endpoint = aiplatform.Endpoint("{ep["name"]}")\n'
    )
    route = (
        "# raw_predict, invoke and a dedicated endpoint's predict build https://HOST URLs (the region's, or the\n"
        "# dedicated DNS): send them to the emulator, which still checks the host each names, as Vertex does.\n"
        "from vlp.pipelines.local.status import routed_session\n"
        f'endpoint.authorized_session = routed_session("{api}", credentials)\n'
    )
    messages = [{"role": "user", "content": DEMO_QUESTION}]
    chat_body = {"model": name, "messages": messages, "max_tokens": 24}
    if ep["engine"] == "tgi":
        instance: dict[str, Any] = {"messages": messages, "max_tokens": 24}
        read = "[0]"  # TGI's Vertex route answers the generated text itself
    else:
        instance = {"@requestFormat": "chatCompletions", "messages": messages, "max_tokens": 24}
        read = '[0]["choices"][0]["message"]["content"]'
    host = f' -H "Host: {dedicated}"' if dedicated else ""
    curl = f'curl -s{host} -H "Authorization: Bearer $({token_command})" -H "Content-Type: application/json" \\\n'
    snippets: dict[str, str] = {}
    openai_routes = ep["engine"] in ("tgi", "vllm-openai")  # the container serves /v1/chat/completions itself
    if ep["invoke"]:
        # invoke_route_prefix: the container's own routes through .../invoke/ROUTE, and nothing else.
        if openai_routes:
            path, body, read_invoke = "/v1/chat/completions", chat_body, '["choices"][0]["message"]["content"]'
        else:
            path, body, read_invoke = "/generate", {"instances": [instance]}, f'["predictions"]{read}'
        snippets["aiplatform invoke"] = (
            auth + init + route + "import json\n"
            f"body = json.dumps({json.dumps(body)}).encode()\n"
            f'answer = endpoint.invoke(request_path="{path}", body=body, headers={{"Content-Type": "application/json"}})\n'
            f"print(answer.json(){read_invoke})\n"
        )
        if openai_routes:
            snippets["openai (invoke route)"] = _openai_snippet(auth, f"{api}/v1/{ep['name']}/invoke/v1", dedicated, name)
        snippets["curl"] = curl + f"  {api}/v1/{ep['name']}/invoke{path} \\\n  -d '{json.dumps(body)}'\n"
        return snippets
    if ep["engine"] == "vllm-openai":
        # vLLM's own image: its predict route is /v1/chat/completions, reached with the OpenAI body by raw_predict
        # (:predict would send it a PredictRequest, which it refuses).
        snippets["aiplatform raw_predict"] = (
            auth + init + route + "import json\n"
            f"body = json.dumps({json.dumps(chat_body)}).encode()\n"
            'answer = endpoint.raw_predict(body=body, headers={"Content-Type": "application/json"})\n'
            'print(answer.json()["choices"][0]["message"]["content"])\n'
        )
        stream_body = {**chat_body, "stream": True}
        snippets["aiplatform stream_raw_predict"] = (
            auth + init + route + "import json\n"
            f"body = json.dumps({stream_body!r}).encode()\n"
            "# Server-sent events, one line each, as vLLM writes them (locally they arrive at once).\n"
            'for line in endpoint.stream_raw_predict(body=body, headers={"Content-Type": "application/json"}):\n'
            '    if line.startswith(b"data: {"):\n'
            '        print(json.loads(line[6:])["choices"][0]["delta"].get("content") or "", end="")\n'
            "\n"  # ends the block in an interactive shell, which needs a blank line before the next statement
            "print()\n"
        )
        snippets["curl"] = curl + f"  {ep['raw_predict_url']} \\\n  -d '{json.dumps(chat_body)}'\n"
        return snippets
    snippets["aiplatform predict"] = (
        auth + init + (route if dedicated else "")
        + f"prediction = endpoint.predict(instances=[{json.dumps(instance)}])\n"
        + f"print(prediction.predictions{read})\n"
    )
    snippets["aiplatform raw_predict"] = (
        auth + init + route + "import json\n"
        f"body = json.dumps({json.dumps({'instances': [instance]})}).encode()\n"
        'answer = endpoint.raw_predict(body=body, headers={"Content-Type": "application/json"})\n'
        f'print(answer.json()["predictions"]{read})\n'
    )
    if ep["engine"] == "tgi":
        # Vertex's chat-completions route reaches TGI's /vertex route, which takes only `instances` (422).
        snippets["curl"] = curl + f"  {ep['predict_url']} \\\n  -d '{json.dumps({'instances': [instance]})}'\n"
        return snippets
    snippets["openai (Vertex chat completions)"] = _openai_snippet(
        auth, ep["chat_url"].removesuffix("/chat/completions"), dedicated, name
    )
    snippets["curl"] = curl + f"  {ep['chat_url']} \\\n  -d '{json.dumps(chat_body)}'\n"
    return snippets


def _openai_snippet(auth: str, base_url: str, dedicated: str, model: str) -> str:
    host_header = f', default_headers={{"Host": "{dedicated}"}}' if dedicated else ""
    return (
        auth + "import google.auth.transport.requests\n"
        "import openai\n"
        "credentials.refresh(google.auth.transport.requests.Request())\n"
        f'client = openai.OpenAI(base_url="{base_url}",\n'
        f"                       api_key=credentials.token{host_header})\n"
        f'reply = client.chat.completions.create(model="{model}", messages={_messages()},\n'
        "                                       max_tokens=24)\n"
        "print(reply.choices[0].message.content)\n"
        "# streaming: stream=True, then for chunk in reply: print(chunk.choices[0].delta.content or '', end='')\n"
    )


def run_snippets(api: str, svc: dict[str, Any], token_command: str) -> dict[str, str]:
    """Client code for one private Cloud Run service: an ID token for its URL, then the container's own OpenAI routes
    (TGI answers to any model name; vLLM only to its --served-model-name)."""
    url = svc["url"]
    model = svc.get("served_model_name") or "tgi"
    auth = (
        _python_auth(api, svc["project"])
        + "import google.auth.transport.requests\n"
        + "from google.oauth2 import id_token\n"
        + "# A private service takes an ID token whose audience is its URL (fetch_id_token asks the metadata server).\n"
        + f'token = id_token.fetch_id_token(google.auth.transport.requests.Request(), "{url}")\n'
    )
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": DEMO_QUESTION}], "max_tokens": 24})
    snippets = {}
    if model == "tgi":
        snippets["huggingface_hub InferenceClient"] = (
            auth
            + "from huggingface_hub import InferenceClient\n"
            + f'client = InferenceClient(base_url="{url}", api_key=token)\n'
            + f"reply = client.chat_completion(messages={_messages()}, max_tokens=24)\n"
            + "print(reply.choices[0].message.content)\n"
        )
    snippets["openai (Cloud Run URL)"] = (
        auth
        + "import openai\n"
        + f'client = openai.OpenAI(base_url="{url}/v1", api_key=token)\n'
        + f'reply = client.chat.completions.create(model="{model}", messages={_messages()}, max_tokens=24)\n'
        + "print(reply.choices[0].message.content)\n"
    )
    snippets["curl"] = (
        f'curl -s -H "Authorization: Bearer $({token_command} --audience {url})" '
        f'-H "Content-Type: application/json" \\\n  {url}/v1/chat/completions \\\n  -d \'{body}\'\n'
    )
    return snippets


def routed_session(api: str, credentials: Any) -> Any:
    """An AuthorizedSession that sends https://HOST/PATH to the local emulator, keeping HOST in the Host header: what
    the aiplatform SDK's raw_predict, stream_raw_predict and invoke need locally (they build Google's URLs)."""
    from google.auth.transport.requests import AuthorizedSession

    from vlp.components.serving.calls import loopback_adapter

    session = AuthorizedSession(credentials)
    session.mount("https://", loopback_adapter(api))
    return session


def render(info: dict[str, Any], state_dir: Path, described: dict[str, Any]) -> str:
    """`vlp local status` for people: the stack's addresses, then each deployment with its snippets."""
    api = info["emulator"]
    lines = [
        f"local stack up (pid {info['pid']}, since {info['started']}), state dir {state_dir}",
        f"  Vertex AI, Cloud Run, IAM APIs: {api}   (api_endpoint / --api-endpoint)",
        f"  Cloud Storage:                  {api}   (storage.Client(client_options={{\"api_endpoint\": ...}}, "
        "credentials=...); not STORAGE_EMULATOR_HOST, with which the client sends no credentials and every call "
        "gets 401, as anonymous calls do on Google)",
        f"  Hugging Face Hub mirror:        {api}/hf   (HF_ENDPOINT)",
        *(
            [
                f"  gRPC (TLS), the same APIs:      {info['grpc']['endpoint']}   (api_endpoint for Google's clients on their "
                f"default transport; trust GRPC_DEFAULT_SSL_ROOTS_FILE_PATH={info['grpc']['ca']})",
                f"  REST over HTTPS, the same APIs: {info['grpc']['https_endpoint']}   (api_endpoint for the aiplatform SDK "
                f"and REST transports; trust REQUESTS_CA_BUNDLE={info['grpc']['bundle']})",
            ]
            if info.get("grpc")
            else []
        ),
        f"  metadata server:                {metadata_host(api, 'EMAIL')}   (GCE_METADATA_HOST, as EMAIL)",
        f"  gcloud ai:                      vlp local token --state-dir {shlex.quote(str(Path(state_dir).resolve()))} "
        f"> /tmp/vlp-token && CLOUDSDK_API_ENDPOINT_OVERRIDES_AIPLATFORM={api}/ "
        "CLOUDSDK_AUTH_ACCESS_TOKEN_FILE=/tmp/vlp-token gcloud ai endpoints list --region=us-central1 "
        "--project=local-project",
        "  stop it with `vlp local down`; these addresses stay the same at the next `vlp local up` when free",
    ]
    if not described["endpoints"] and not described["services"]:
        lines += ["", "nothing deployed yet: `vlp run --local configs/local-demo.yaml` deploys the demo here"]
    for ep in described["endpoints"]:
        lines += ["", f"endpoint {ep['display_name']}: {ep['name']}"]
        for dm in ep["deployed_models"]:
            lines.append(f"  deployed model {dm['id']} at {dm['traffic_percent']}%")
        if ep["engine"] == "vllm-openai":
            lines.append(f"  raw predict:      {ep['raw_predict_url']}   (OpenAI chat body, vLLM's /v1/chat/completions)")
        else:
            lines.append(f"  predict:          {ep['predict_url']}")
            lines.append(f"  chat completions: {ep['chat_url']}")
        if ep["dedicated_dns"]:
            lines.append(f"  dedicated DNS:    {ep['dedicated_dns']} (locally: the address above, Host: that DNS)")
        lines += _snippet_lines(ep["snippets"])
    for svc in described["services"]:
        lines += ["", f"Cloud Run service {svc['name']}", f"  URL: {svc['url']}"]
        for tag, url in svc["tag_urls"].items():
            lines.append(f"  tag {tag}: {url}")
        lines += _snippet_lines(svc["snippets"])
    return "\n".join(lines)


def _snippet_lines(snippets: dict[str, str]) -> list[str]:
    """Each snippet flush left between marker lines, so it pastes as printed (an indented block is an
    IndentationError in the stock Python REPL, and a stray prompt in bash)."""
    out: list[str] = []
    for title, code in snippets.items():
        where = "bash" if title.startswith("curl") else "python3"
        out += ["", f"# --- {title} (paste into {where}) ---", *code.rstrip("\n").split("\n"), "# --- end ---"]
    return out


def client_env(api: str, project: str = "local-project") -> dict[str, str]:
    """The environment that points unchanged Google and Hugging Face client code at the stack, calling as the
    project's owner (`vlp local status --json` carries it as `env`; the API endpoint goes in client options)."""
    host = metadata_host(api, owner_of(project))
    return {
        "GCE_METADATA_HOST": host,
        "GCE_METADATA_IP": host,
        "HF_ENDPOINT": f"{api}/hf",
        # gcloud's own override (property api_endpoint_overrides/aiplatform, with its trailing slash); gcloud takes
        # its credentials from CLOUDSDK_AUTH_ACCESS_TOKEN_FILE, not from a metadata server it is pointed at.
        "CLOUDSDK_API_ENDPOINT_OVERRIDES_AIPLATFORM": f"{api}/",
    }


def grpc_info(emulator_state_dir: Path) -> dict[str, str]:
    """The stack's gRPC endpoint and the CA that signs it (grpc.json, written by the emulator), or {} without one."""
    try:
        info = json.loads((Path(emulator_state_dir) / "grpc.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(info, dict) or "endpoint" not in info:
        return {}
    return {k: str(info.get(k, "")) for k in ("endpoint", "https_endpoint", "ca", "bundle")}
