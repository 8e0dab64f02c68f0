"""The serving image catalog (images.yaml): which image serves a model, what its engine accepts, how it is called.

Images are data: each entry names its engine version and the source that says so, and points at a fixture extracted
from that version's own source (components/contract/, by scripts/contract_fixtures.py) with the flags its server
accepts and the architectures it serves. Preflight chooses an image with `choose_image`; rendering checks every flag
against the chosen image's fixture (`unknown_flags`)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
_CONTRACT = _HERE.parent / "contract"  # components/contract

# The Artifact Registry remote repository (upstream: Docker Hub) `vlp setup` creates in each multi-region the config's
# regions fall in: Vertex pulls serving images only from Artifact Registry ("imageUri (Required): The Artifact
# Registry URI of the container image", vertex-ai/docs/predictions/use-custom-container).
REMOTE_REPOSITORY_NAME = "vlp-docker-hub"
_MULTI_REGIONS = (("europe-", "europe"), ("asia-", "asia"), ("australia-", "asia"), ("me-", "asia"))
STATUS_ORDER = ("current", "kept", "frozen")


class ImageChoiceError(ValueError):
    """No catalog image of the engine serves the model; the message names the architecture, the image, its engine
    version, and an image that serves it (if any)."""


@dataclass(frozen=True)
class ServingImage:
    """One catalog entry (see images.yaml for the meaning of each field)."""

    id: str
    engine: str
    engine_version: str
    image: str
    registry: str
    version_source: str
    why: str
    api: str
    command: tuple[str, ...]
    port: int
    health_route: str
    predict_route: str
    routes: tuple[str, ...]
    routes_source: str
    weights: str
    multi_host: bool
    targets: tuple[str, ...]
    status: str
    fixture: str

    @property
    def label(self) -> str:
        """How people name it: "vLLM 0.34.0 (docker.io/vllm/vllm-openai:v0.34.0)"."""
        return f"{engine_name(self.engine)} {self.engine_version} ({self.image})"

    def contract(self) -> dict[str, Any]:
        """The version's fixture: flags, architectures (vLLM) or model types (TGI), quantization methods..."""
        return _fixture(self.fixture)

    def flags(self) -> set[str]:
        """Every --flag the image's server accepts."""
        return set(self.contract()["flags"])

    def unknown_flags(self, args: list[str]) -> list[str]:
        """The --flags in `args` the image's argument parser does not know. vLLM's own image parses with
        FlexibleArgumentParser, which also takes --snake_case spellings and --json-arg.key (vllm/utils/
        argparse_utils.py at v0.34.0); argparse's unambiguous prefixes are not accepted here (strict)."""
        accepted = self.flags()
        bad = []
        for arg in args:
            if not arg.startswith("--"):
                continue
            name = arg.split("=", 1)[0]
            if self.api == "openai":
                name = "--" + name[2:].split(".", 1)[0].replace("_", "-")
            if name not in accepted:
                bad.append(arg.split("=", 1)[0])
        return list(dict.fromkeys(bad))

    def env_names(self) -> set[str]:
        """Every env name the image reads (TGI: the launcher's env-backed options; vLLM: the image's own)."""
        data = self.contract()
        return set(data.get("env", [])) | set(data.get("image_env", []))

    def serves(self, architecture: str, model_type: str) -> bool | None:
        """Whether the engine serves the model: vLLM looks up config.json's architectures[0] in its model registry,
        TGI dispatches on model_type (server/text_generation_server/models/__init__.py get_model). None when the
        model names neither (nothing to check)."""
        data = self.contract()
        if self.engine == "tgi":
            # A model type without a branch of its own is still served through transformers when transformers maps
            # it (model_types_fallback; slower: see fallback_note).
            known = set(data.get("model_types", [])) | set(data.get("model_types_fallback", []))
            return model_type in known if model_type else None
        return architecture in set(data.get("architectures", [])) if architecture else None

    def fallback_note(self, model_type: str) -> str:
        """Why serving this model type is slower on this image (TGI's transformers fallback), or ""."""
        data = self.contract()
        if self.engine != "tgi" or model_type not in set(data.get("model_types_fallback", [])):
            return ""
        return (
            f"{self.label} has no implementation of its own for model type {model_type!r}: it serves it through "
            "transformers (one GPU, no sharding, no Flash Attention, and no --quantize gptq/awq/bitsandbytes/eetq/exl2)"
        )

    def removed_in(self, architecture: str) -> str:
        """The last engine version that served `architecture`, when this version removed it (else "")."""
        return str(self.contract().get("removed_architectures", {}).get(architecture, ""))

    def uri(self, project: str, region: str) -> str:
        """The URI a deployment names: the image itself, or its path through the Artifact Registry remote repository
        for an image hosted on Docker Hub (region's multi-region: us, europe or asia)."""
        if self.registry != "docker-hub":
            return self.image
        path = self.image.removeprefix("docker.io/")
        return f"{multi_region(region)}-docker.pkg.dev/{project or 'PROJECT'}/{REMOTE_REPOSITORY_NAME}/{path}"


def engine_name(engine: str) -> str:
    return {"vllm": "vLLM", "tgi": "TGI"}.get(engine, engine)


def multi_region(region: str) -> str:
    """The Artifact Registry multi-region a region belongs to."""
    for prefix, name in _MULTI_REGIONS:
        if region.startswith(prefix):
            return name
    return "us"


@cache
def _fixture(name: str) -> dict[str, Any]:
    import json

    return json.loads((_CONTRACT / name).read_text())


@cache
def catalog() -> tuple[ServingImage, ...]:
    """Every catalog image, in file order (newest first within an engine)."""
    import yaml

    data = yaml.safe_load((_HERE / "images.yaml").read_text())
    out = []
    for entry in data["images"]:
        entry = dict(entry)
        for key in ("command", "routes", "targets"):
            entry[key] = tuple(entry.get(key) or ())
        out.append(ServingImage(**entry))
    return tuple(out)


def by_id(image_id: str) -> ServingImage:
    return next(i for i in catalog() if i.id == image_id)


def find(uri: str) -> ServingImage | None:
    """The catalog entry for an image URI: the image itself or its Artifact Registry remote path; None if unknown."""
    uri = uri.strip()
    for image in catalog():
        if uri == image.image:
            return image
        if image.registry == "docker-hub":
            path = image.image.removeprefix("docker.io/")
            if uri == path or uri.endswith(f"/{REMOTE_REPOSITORY_NAME}/{path}"):
                return image
    return None


def default_image(engine: str, target: str = "vertex", multi_host: bool = False) -> ServingImage:
    """The engine's newest image for the target, current before kept before frozen (no model to check); with
    multi_host, among the images with a multi-host launcher only (ImageChoiceError if the engine has none)."""
    candidates = [i for i in catalog() if i.engine == engine and target in i.targets and i.multi_host == multi_host]
    if not candidates:
        kind = "multi-host " if multi_host else ""
        raise ImageChoiceError(f"no {kind}{engine_name(engine)} image in the catalog serves target {target}")
    return sorted(candidates, key=lambda i: STATUS_ORDER.index(i.status))[0]


def _serving(
    architecture: str, model_type: str, target: str, engine: str = "", multi_host: bool = False
) -> list[ServingImage]:
    found = [
        i
        for i in catalog()
        if target in i.targets
        and (not engine or i.engine == engine)
        and i.multi_host == multi_host
        and i.serves(architecture, model_type)
    ]
    return sorted(found, key=lambda i: STATUS_ORDER.index(i.status))


def choose_image(
    engine: str, target: str, architecture: str, model_type: str, explicit: str = "", multi_host: bool = False
) -> ServingImage | None:
    """The image a deployment serves with: `explicit` (serving.image) if given, else the newest image of the engine
    for the target that serves the model's architecture, among the images for one node or, with `multi_host`, among
    those with a multi-host launcher (a single-node shape never gets a multi-host image). Raises ImageChoiceError
    when the named (or every) image of the engine does not serve it. None: an explicit image the catalog does not
    know (nothing to check it against)."""
    what = f"model type {model_type!r}" if engine == "tgi" else f"architecture {architecture!r}"
    if explicit:
        image = find(explicit)
        if image is None or image.serves(architecture, model_type) is not False:
            return image
        raise ImageChoiceError(_refusal(image, what, architecture, model_type, target, multi_host))
    candidates = [i for i in catalog() if i.engine == engine and target in i.targets and i.multi_host == multi_host]
    if not candidates:
        kind = "multi-host " if multi_host else ""
        raise ImageChoiceError(f"no {kind}{engine_name(engine)} image in the catalog serves target {target}")
    serving = _serving(architecture, model_type, target, engine, multi_host)
    if serving:
        return serving[0]
    newest = sorted(candidates, key=lambda i: STATUS_ORDER.index(i.status))[0]
    if newest.serves(architecture, model_type) is None:
        return newest  # the model names no architecture: nothing to check
    raise ImageChoiceError(_refusal(newest, what, architecture, model_type, target, multi_host))


def _refusal(
    image: ServingImage, what: str, architecture: str, model_type: str, target: str, multi_host: bool = False
) -> str:
    removed = image.removed_in(architecture)
    since = f" (removed after {engine_name(image.engine)} {removed})" if removed else ""
    others = [i for i in _serving(architecture, model_type, target, multi_host=multi_host) if i.id != image.id]
    if others:
        fix = f"set serving.image: {others[0].image} ({engine_name(others[0].engine)} {others[0].engine_version}"
        fix += f", serving.engine: {others[0].engine})" if others[0].engine != image.engine else ")"
        fix += ", or leave serving.image empty to let preflight choose"
    else:
        fix = (
            "no image in the catalog serves it: pick a model with a supported architecture, or name an image whose "
            "engine serves it in serving.image (its flags are then not checked)"
        )
    return f"{image.label} does not serve {what}{since}: {fix}"
