"""Extract what the pinned serving engines accept (flags, env names, the models they serve) from upstream source, as
JSON fixtures.

Run by a developer when a pinned image changes (CI never runs it: it needs the network):

    python scripts/contract_fixtures.py --tgi-repo PATH/TO/text-generation-inference [--cache DIR] [--only FIXTURE]

`--tgi-repo` is a git clone of text-generation-inference, or a bare git directory of it (the script only runs
`git rev-parse` and `git show` against it). `--cache` holds the downloaded sdists (each checked against its pinned
sha256) and the throwaway venv vLLM 0.34.0's own argument parser runs in.

- vLLM 0.6.2 (the Model Garden image pytorch-vllm-serve:20241001_0916_RC00 carries it): its PyPI sdist; flags from
  `vllm/engine/arg_utils.py` and `vllm/entrypoints/api_server.py`, quantization methods from
  `model_executor/layers/quantization/__init__.py`, architectures from `model_executor/models/__init__.py`.
- vLLM 0.7.3 (the nearest release to Model Garden's multi-host image pytorch-vllm-serve:20250312_0916_RC01, "vLLM
  past v0.7.3": a later dev commit, unverified beyond that): its PyPI sdist; flags from the add_argument calls of
  `vllm/engine/arg_utils.py` and `vllm/entrypoints/api_server.py` (every option string a literal, checked; argparse's
  --no-x for a BooleanOptionalAction), quantization methods from the `QUANTIZATION_METHODS` list, LoRA ranks from
  `vllm/config.py`, architectures from `vllm/model_executor/models/registry.py`.
- vLLM 0.34.0 (docker.io/vllm/vllm-openai:v0.34.0): its PyPI sdist; flags from vLLM's own `vllm serve` parser, built
  in a venv under --cache (the sdist's python files, a CPU torch==2.13.0 and the light deps the parser imports) and
  checked against a static reading of the same source (AST: the add_argument literals, config dataclass fields,
  BooleanOptionalAction's --no-x and the --enable-x/--disable-x pairs); quantization methods, LoRA ranks and the model
  registry likewise both ways.
- TGI 2.4.0: `launcher/src/main.rs` at the tag, read with `git show`; every `#[clap(long, env)]` field is a `--flag`
  and an `ENV_NAME`; the `Quantization` enum gives --quantize values. The model types `get_model` dispatches on come
  from `server/text_generation_server/models/__init__.py`, plus those its transformers fallback serves (the
  transformers version TGI's poetry.lock pins, read from that version's PyPI sdist).
The fixtures land in components/contract/ and record where they came from.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "components" / "contract"
VLLM_VERSION = "0.6.2"
VLLM_SDIST = (
    "https://files.pythonhosted.org/packages/0c/26/3f0ad89fc748475a02c5b3d1a6cb2e64153c5eb7595afadf468905929a03/"
    "vllm-0.6.2.tar.gz"
)
VLLM_SHA256 = "2fffd856a25d3defa38a539150fccf9126959ce4c6781c1c5a76d5da7216af59"
VLLM_073 = "0.7.3"
VLLM_073_SDIST = (
    "https://files.pythonhosted.org/packages/f5/73/87825ee293f0e721eb8aadbd0cf9c3436d4e3b3458322878f1f6e7398a0d/"
    "vllm-0.7.3.tar.gz"
)
VLLM_073_SHA256 = "841cc30bd4ffbc037e8b8bf6dbacbedc60cc0b2abb60366873b185159a1204e6"
VLLM_034 = "0.34.0"
VLLM_034_SDIST = (
    "https://files.pythonhosted.org/packages/92/21/6e0b077dc4a0b28f5a8ce8bb352a38d7196650d681fd4faa87f8dc622eff/"
    "vllm-0.34.0.tar.gz"
)
VLLM_034_SHA256 = "fcad848b246a9d8652b47e6425af92334dc02492f9802720f54e27b823cf0113"
# What `vllm.entrypoints.cli.serve` imports to build its parser (vLLM itself comes from the sdist, on sys.path).
# torch: the CPU wheel where pip finds one (never an unpinned torch: that pulls CUDA); the parser needs no GPU.
VLLM_034_PARSER_REQUIREMENTS = (
    "torch==2.13.0",
    "numpy==2.4.6",
    "transformers==5.22.2",
    "tokenizers==0.23.3",
    "huggingface_hub==2.4.0",
    "pydantic==2.14.4",
    "fastapi==0.136.3",
    "starlette==1.10.0",
    "uvicorn==0.55.0",
    "uvloop==0.23.0",
    "watchfiles==1.3.0",
    "aiohttp==3.14.5",
    "openai==3.63.0",
    "openai-harmony==0.0.8",
    "regex==2026.12.2",
    "cachetools==8.0.3",
    "psutil==7.2.2",
    "requests==2.34.2",
    "tqdm==4.70.1",
    "PyYAML==6.0.4",
    "msgspec==0.23.0",
    "pyzmq==27.3.0",
    "cloudpickle==3.1.3",
    "pillow==13.0.0",
    "pybase64==1.5.1",
    "prometheus_client==0.26.0",
    "cbor2==6.3.0",
    "py-cpuinfo==9.0.0",
    "partial-json-parser==0.2.1.1.post7",
    "llguidance==1.7.6",
    "xgrammar==0.2.8",
    "orjson==3.13.0",
    "einops==0.8.2",
)
TGI_TAG = "v2.4.0"
TGI_VERSION = "2.4.0"
# TGI's server/poetry.lock at v2.4.0 pins transformers 4.45.2: its AutoModel mappings are TGI's fallback.
TRANSFORMERS_VERSION = "4.45.2"
TRANSFORMERS_SDIST = (
    "https://files.pythonhosted.org/packages/4b/4c/3862b2dd6cdf83b187897bd351da0f7fb74d0df642b03c6f5d06353a3ca0/"
    "transformers-4.45.2.tar.gz"
)
TRANSFORMERS_SHA256 = "72bc390f6b203892561f05f86bbfaa0e234aab8e927a83e62b9d92ea7e3ae101"
_FLAG = re.compile(r"""['"](--[a-z0-9][a-z0-9-]*)['"]""")
# The registry dicts whose architectures serve text generation (text-only and multimodal); the pooling dicts
# (embedding, classification, reward...), the speculative-decoding drafts and the bare Transformers-backend class names
# are left out.
VLLM_062_GENERATION_DICTS = ("_GENERATION_MODELS", "_MULTIMODAL_MODELS", "_CONDITIONAL_GENERATION_MODELS")
VLLM_073_GENERATION_DICTS = ("_TEXT_GENERATION_MODELS", "_MULTIMODAL_MODELS")
VLLM_034_GENERATION_DICTS = ("_TEXT_GENERATION_MODELS", "_MULTIMODAL_MODELS", "_TRANSFORMERS_SUPPORTED_MODELS")

# Run by the venv's python with the extracted sdist on sys.path: vLLM's own `vllm serve` parser, built as
# vllm/entrypoints/cli/main.py builds it, and every option string it registers (`_option_string_actions` also holds
# the hidden --no-enable-x / --no-disable-x forms EnableDisableAction keeps out of help).
_VLLM_PARSER_DUMP = """
import json, sys
from typing import get_args
root, out, dicts = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
sys.path.insert(0, root)
sys.argv = ["vllm"]
import vllm
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
from vllm.config.lora import MaxLoRARanks
from vllm.model_executor.models import registry
top = FlexibleArgumentParser(description="vLLM CLI")
serve = ServeSubcommand().subparser_init(top.add_subparsers(required=False, dest="subparser"))
with open(out, "w") as f:
    json.dump({
        "vllm_file": vllm.__file__,
        "prog": serve.prog,
        "options": sorted(serve._option_string_actions),
        "quantization_methods": list(QUANTIZATION_METHODS),
        "lora_ranks": list(get_args(MaxLoRARanks)),
        "lora_rank_choices": sorted(serve._option_string_actions["--max-lora-rank"].choices),
        "architectures": sorted({a for name in dicts for a in getattr(registry, name)}),
        "removed_architectures": dict(registry._PREVIOUSLY_SUPPORTED_MODELS),
    }, f)
"""


def _camel_to_kebab(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


def _previous(name: str) -> dict:
    path = OUT / name
    return json.loads(path.read_text()) if path.exists() else {}


def _download(url: str, sha256: str, cache: Path) -> bytes:
    """The pinned file, from the cache if there, else downloaded into it; refused unless its sha256 is the pin."""
    path = cache / url.rsplit("/", 1)[1]
    data = path.read_bytes() if path.exists() else urllib.request.urlopen(url).read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise SystemExit(f"{path.name} sha256 {digest} != pinned {sha256}")
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return data


def _assignments(source: str) -> dict[str, ast.expr]:
    """Module-level `NAME = value` and `NAME: T = value`, by name."""
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            out[node.targets[0].id] = node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            out[node.target.id] = node.value
    return out


def _dict_literal(source: str, name: str) -> dict:
    """A module-level dict of literal keys (values literal too, or left as source text)."""
    node = _assignments(source)[name]
    if not isinstance(node, ast.Dict) or any(k is None for k in node.keys):
        raise SystemExit(f"{name} is not a plain dict literal: this script cannot read it")
    out = {}
    for key, value in zip(node.keys, node.values, strict=True):
        try:
            out[ast.literal_eval(key)] = ast.literal_eval(value)
        except ValueError:
            out[ast.literal_eval(key)] = ast.unparse(value)
    return out


def _literal_args(source: str, name: str) -> list:
    """The members of a module-level `NAME = Literal[...]`, in source order."""
    node = _assignments(source)[name]
    if not (isinstance(node, ast.Subscript) and ast.unparse(node.value) == "Literal"):
        raise SystemExit(f"{name} is not a Literal[...]")
    elts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
    return [ast.literal_eval(e) for e in elts]


def _architectures(source: str, dicts: tuple[str, ...]) -> list[str]:
    return sorted({arch for name in dicts for arch in _dict_literal(source, name)})


def vllm_fixture(sdist: bytes) -> dict:
    digest = hashlib.sha256(sdist).hexdigest()
    if digest != VLLM_SHA256:
        raise SystemExit(f"vllm sdist sha256 {digest} != pinned {VLLM_SHA256}")
    files = {}
    with tarfile.open(fileobj=io.BytesIO(sdist), mode="r:gz") as tar:
        for member in tar.getmembers():
            for wanted in (
                "vllm/engine/arg_utils.py",
                "vllm/entrypoints/api_server.py",
                "vllm/model_executor/layers/quantization/__init__.py",
                "vllm/model_executor/models/__init__.py",
                "vllm/config.py",
            ):
                if member.name.endswith("/" + wanted):
                    files[wanted] = tar.extractfile(member).read().decode()
    flags = sorted(
        set(_FLAG.findall(files["vllm/engine/arg_utils.py"]))
        | set(_FLAG.findall(files["vllm/entrypoints/api_server.py"]))
    )
    block = re.search(
        r"QUANTIZATION_METHODS[^=]*=\s*\{(.*?)\n\}", files["vllm/model_executor/layers/quantization/__init__.py"], re.S
    )
    methods = sorted(re.findall(r'^\s*"([a-z0-9_-]+)"\s*:', block.group(1), re.M))
    ranks = re.search(r"possible_max_ranks\s*=\s*\(([^)]*)\)", files["vllm/config.py"])
    registry = files["vllm/model_executor/models/__init__.py"]
    if "_PREVIOUSLY_SUPPORTED_MODELS" in registry:
        raise SystemExit("vllm 0.6.2's registry names previously supported models: read them")
    return {
        "source": f"vllm {VLLM_VERSION} sdist from PyPI",
        "url": VLLM_SDIST,
        "sha256": digest,
        "version": VLLM_VERSION,
        "method": "regex: every '--flag' string literal in vllm/engine/arg_utils.py and vllm/entrypoints/api_server.py",
        "flags": flags,
        "quantization_methods": methods,
        "lora_ranks": [int(x) for x in re.findall(r"\d+", ranks.group(1))],
        "architectures": _architectures(registry, VLLM_062_GENERATION_DICTS),
        "architectures_source": "vllm/model_executor/models/__init__.py: " + ", ".join(VLLM_062_GENERATION_DICTS),
        "removed_architectures": {},
        "env": [],
        # Read by the Model Garden image, not by upstream vLLM: kept from the previous fixture (see image_env_source).
        **{k: v for k, v in _previous("vllm-0.6.2.json").items() if k.startswith("image_env")},
    }


def _add_argument_options(source: str, where: str) -> set[str]:
    """The --flags of every add_argument call in `source`, each option string a literal (refused otherwise: this
    reading could not see it), plus argparse's --no-x for an action=BooleanOptionalAction."""
    flags: set[str] = set()
    for call in ast.walk(ast.parse(source)):
        if not (isinstance(call, ast.Call) and getattr(call.func, "attr", "") == "add_argument"):
            continue
        if not all(isinstance(a, ast.Constant) and isinstance(a.value, str) for a in call.args):
            raise SystemExit(f"{where}: an add_argument without literal option strings: {ast.unparse(call)[:120]}")
        options = [a.value for a in call.args if a.value.startswith("--")]
        flags.update(options)
        action = next((ast.unparse(kw.value) for kw in call.keywords if kw.arg == "action"), "")
        if "BooleanOptionalAction" in action:
            flags.update("--no-" + o[2:] for o in options)
    return flags


def vllm_073_fixture(sdist: bytes) -> dict:
    digest = hashlib.sha256(sdist).hexdigest()
    if digest != VLLM_073_SHA256:
        raise SystemExit(f"vllm {VLLM_073} sdist sha256 {digest} != pinned {VLLM_073_SHA256}")
    wanted = (
        "vllm/engine/arg_utils.py",
        "vllm/entrypoints/api_server.py",
        "vllm/model_executor/layers/quantization/__init__.py",
        "vllm/model_executor/models/registry.py",
        "vllm/config.py",
    )
    files = {}
    with tarfile.open(fileobj=io.BytesIO(sdist), mode="r:gz") as tar:
        for path in wanted:
            files[path] = tar.extractfile(f"vllm-{VLLM_073}/{path}").read().decode()
    flags = _add_argument_options(files["vllm/engine/arg_utils.py"], "arg_utils.py") | _add_argument_options(
        files["vllm/entrypoints/api_server.py"], "api_server.py"
    )
    # The add_argument reading and 0.6.2's regex over the same files must agree, less the --no-x forms argparse makes.
    regex = set(_FLAG.findall(files["vllm/engine/arg_utils.py"])) | set(
        _FLAG.findall(files["vllm/entrypoints/api_server.py"])
    )
    made = {f for f in flags if f.startswith("--no-") and f not in regex}
    if flags - made != regex:
        raise SystemExit(
            f"vllm {VLLM_073} flags: the add_argument and regex readings disagree: {sorted(flags ^ regex)}"
        )
    quant = files["vllm/model_executor/layers/quantization/__init__.py"]
    methods = ast.literal_eval(_assignments(quant)["QUANTIZATION_METHODS"])
    ranks = re.search(r"possible_max_ranks\s*=\s*\(([^)]*)\)", files["vllm/config.py"])
    registry = files["vllm/model_executor/models/registry.py"]
    if "_PREVIOUSLY_SUPPORTED_MODELS" in registry:
        raise SystemExit(f"vllm {VLLM_073}'s registry names previously supported models: read them")
    return {
        "source": f"vllm {VLLM_073} sdist from PyPI",
        "url": VLLM_073_SDIST,
        "sha256": digest,
        "version": VLLM_073,
        "version_note": (
            "the nearest release to Model Garden's pytorch-vllm-serve:20250312_0916_RC01, which Google's DeepSeek "
            "notebook calls 'vLLM past v0.7.3' (vllm-project/vllm commit f6bb18fd9a19e5e4fb1991339638fc666d06b27a, a "
            "later dev commit): flags or models added after 0.7.3 are not here; Google's own changes are unverified"
        ),
        "method": (
            "AST: the option strings of every add_argument call in vllm/engine/arg_utils.py and "
            "vllm/entrypoints/api_server.py (each a literal, checked), plus argparse's --no-x for "
            "action=BooleanOptionalAction; checked equal to the 0.6.2 method (every '--flag' string literal)"
        ),
        "flags": sorted(flags),
        "quantization_methods": sorted(methods),
        "lora_ranks": [int(x) for x in re.findall(r"\d+", ranks.group(1))],
        "architectures": _architectures(registry, VLLM_073_GENERATION_DICTS),
        "architectures_source": "vllm/model_executor/models/registry.py: " + ", ".join(VLLM_073_GENERATION_DICTS),
        "removed_architectures": {},
        "env": [],
        # Read by the Model Garden image, not by upstream vLLM (recorded by hand, as for 0.6.2's image).
        "image_env": ["MODEL_ID", "DEPLOY_SOURCE"],
        "image_env_source": (
            "vertex-ai/docs/predictions/use-multihost-gpu (gcloud ai models upload --container-env-vars=MODEL_ID=…) "
            "and GoogleCloudPlatform/vertex-ai-samples@cc0d791 model_garden_pytorch_deepseek_deployment.ipynb "
            "(env MODEL_ID and DEPLOY_SOURCE); recorded by hand, not extracted"
        ),
    }


def _vllm_static_flags(root: Path) -> set[str]:
    """Every option string `vllm serve` registers, read from the source alone: the literal option strings of each
    add_argument in EngineArgs/AsyncEngineArgs.add_cli_args and make_arg_parser, one --kebab-case flag per
    FrontendArgs field (plus its "flags" aliases), and for each boolean one (action=BooleanOptionalAction, or a
    config dataclass field typed bool that get_kwargs turns into one) argparse's --no-x, plus the --disable-x for an
    --enable-x and the reverse that vLLM's EnableDisableAction adds."""
    sources = {path: path.read_text() for path in sorted((root / "vllm" / "config").rglob("*.py"))}
    arg_utils = (root / "vllm" / "engine" / "arg_utils.py").read_text()
    cli_args = (root / "vllm" / "entrypoints" / "common" / "cli_args.py").read_text()
    classes: dict[str, tuple[list[str], dict[str, str]]] = {}
    aliases: dict[str, str] = {}
    for source in (*sources.values(), arg_utils, cli_args):
        for node in ast.parse(source).body:
            if isinstance(node, ast.ClassDef):
                fields = {
                    st.target.id: ast.unparse(st.annotation)
                    for st in node.body
                    if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name)
                }
                classes[node.name] = ([ast.unparse(b) for b in node.bases], fields)
        aliases.update({name: ast.unparse(value) for name, value in _assignments(source).items()})

    def fields_of(cls: str) -> dict[str, str]:
        bases, own = classes[cls]
        out = {}
        for base in bases:
            if base in classes:
                out.update(fields_of(base))
        return out | own

    def is_bool(annotation: str) -> bool:
        for _ in range(3):  # type aliases (e.g. `X = bool | Literal[...]`) spelled out
            annotation = re.sub(
                r"\b[A-Z]\w*\b", lambda m: f"({aliases[m[0]]})" if m[0] in aliases else m[0], annotation
            )
        # get_kwargs: bool | str | None is an optional-valued flag (nargs="?"), any other bool a BooleanOptionalAction
        return "bool" in re.findall(r"\w+", annotation) and {p.strip() for p in annotation.split("|")} != {
            "bool",
            "str",
            "None",
        }

    flags: set[str] = set()

    def add(options: list[str], boolean: bool) -> None:
        flags.update(options)
        for option in options if boolean else ():
            if option.startswith("--"):
                flags.add("--no-" + option[2:])
                for prefix, inverse in (("--enable-", "--disable-"), ("--disable-", "--enable-")):
                    if option.startswith(prefix):
                        flags.add(inverse + option[len(prefix) :])

    for source in (arg_utils, cli_args):
        for fn in ast.walk(ast.parse(source)):
            if not (isinstance(fn, ast.FunctionDef) and fn.name in ("add_cli_args", "make_arg_parser")):
                continue
            kwargs_of: dict[str, tuple[str, str | None]] = {}  # x_kwargs = get_kwargs(Config)[...] -> (Config, field)
            for st in ast.walk(fn):
                if isinstance(st, ast.Assign) and isinstance(st.targets[0], ast.Name):
                    value, field = st.value, None
                    if isinstance(value, ast.Subscript) and isinstance(value.slice, ast.Constant):
                        value, field = value.value, value.slice.value
                    if isinstance(value, ast.Call) and ast.unparse(value.func) == "get_kwargs":
                        kwargs_of[st.targets[0].id] = (ast.unparse(value.args[0]), field)
                    elif isinstance(value, ast.Name) and value.id in kwargs_of and field is not None:
                        kwargs_of[st.targets[0].id] = (kwargs_of[value.id][0], field)
            for call in ast.walk(fn):
                if not (isinstance(call, ast.Call) and getattr(call.func, "attr", "") == "add_argument"):
                    continue
                options = [a.value for a in call.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")]
                if not options:
                    continue  # a positional (model_tag), or BaseFrontendArgs' loop over its fields (below)
                boolean = False
                for kw in call.keywords:
                    if kw.arg == "action":
                        boolean = "BooleanOptionalAction" in ast.unparse(kw.value)
                    elif kw.arg is None:  # **x_kwargs["field"], **x_kwargs, or **{**x_kwargs["field"], ...}
                        value = kw.value
                        while isinstance(value, ast.Dict) and None in value.keys:
                            value = value.values[value.keys.index(None)]
                        if isinstance(value, ast.Subscript) and isinstance(value.value, ast.Name):
                            cls, field = kwargs_of[value.value.id][0], value.slice.value
                        elif isinstance(value, ast.Name) and kwargs_of.get(value.id, ("", None))[1]:
                            cls, field = kwargs_of[value.id]
                        else:
                            raise SystemExit(f"cannot read {ast.unparse(call)[:120]}")
                        boolean = is_bool(fields_of(cls)[field])
                add(options, boolean)
    extra = {}
    for st in ast.walk(ast.parse(cli_args)):
        if isinstance(st, ast.Assign) and isinstance(st.targets[0], ast.Subscript):
            m = re.fullmatch(r"frontend_kwargs\['(\w+)'\]\['flags'\]", ast.unparse(st.targets[0]))
            if m:
                extra[m[1]] = ast.literal_eval(st.value)
    for field, annotation in fields_of("FrontendArgs").items():
        add([*extra.get(field, []), "--" + field.replace("_", "-")], is_bool(annotation))
    return flags


def _parser_venv(cache: Path) -> Path:
    """A throwaway venv (under the cache, never the project's .venv) with what vLLM's parser imports."""
    venv = cache / f"venv-vllm-{VLLM_034}"
    python, stamp = venv / "bin" / "python", venv / "vlp-requirements.txt"
    wanted = "\n".join(VLLM_034_PARSER_REQUIREMENTS) + "\n"
    if not (python.exists() and stamp.exists() and stamp.read_text() == wanted):
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *VLLM_034_PARSER_REQUIREMENTS], check=True)
        stamp.write_text(wanted)
    return python


def _dockerfile_entrypoint(dockerfile: str, stage: str) -> list[str]:
    section = dockerfile[dockerfile.index(f" AS {stage}\n") :]
    return json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", section, re.M)[1])


def vllm_034_fixture(sdist: bytes, cache: Path) -> dict:
    digest = hashlib.sha256(sdist).hexdigest()
    if digest != VLLM_034_SHA256:
        raise SystemExit(f"vllm {VLLM_034} sdist sha256 {digest} != pinned {VLLM_034_SHA256}")
    python = _parser_venv(cache)
    with tempfile.TemporaryDirectory() as tmp:
        top = f"vllm-{VLLM_034}/"
        with tarfile.open(fileobj=io.BytesIO(sdist), mode="r:gz") as tar:
            members = [m for m in tar.getmembers() if m.name.startswith((top + "vllm/", top + "docker/Dockerfile"))]
            tar.extractall(tmp, members=members, filter="data")
        root = Path(tmp) / top
        dumped = Path(tmp) / "parser.json"
        env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"}
        run = subprocess.run(
            [str(python), "-c", _VLLM_PARSER_DUMP, str(root), str(dumped), ",".join(VLLM_034_GENERATION_DICTS)],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
        )
        if run.returncode:
            raise SystemExit(f"vLLM {VLLM_034}'s parser did not build:\n{run.stderr[-3000:]}")
        parsed = json.loads(dumped.read_text())
        if not parsed["vllm_file"].startswith(str(root)):
            raise SystemExit(f"the parser imported vllm from {parsed['vllm_file']}, not the sdist")
        static = _vllm_static_flags(root) | {"-h", "--help"}
        quant = (root / "vllm/model_executor/layers/quantization/__init__.py").read_text()
        lora = (root / "vllm/config/lora.py").read_text()
        registry = (root / "vllm/model_executor/models/registry.py").read_text()
        dockerfile = (root / "docker/Dockerfile").read_text()
        vertex_env = sorted(
            {m for path in (root / "vllm").rglob("*.py") for m in re.findall(r"\bAIP_[A-Z_]+", path.read_text())}
        )
    # Both ways must agree: vLLM's own parser (what the container runs) and the static reading of its source.
    checks = {
        "flags": (set(parsed["options"]), static),
        "quantization_methods": (parsed["quantization_methods"], _literal_args(quant, "QuantizationMethods")),
        "lora_ranks": (parsed["lora_ranks"], _literal_args(lora, "MaxLoRARanks")),
        "lora_rank choices": (parsed["lora_rank_choices"], sorted(_literal_args(lora, "MaxLoRARanks"))),
        "architectures": (parsed["architectures"], _architectures(registry, VLLM_034_GENERATION_DICTS)),
        "removed_architectures": (
            parsed["removed_architectures"],
            _dict_literal(registry, "_PREVIOUSLY_SUPPORTED_MODELS"),
        ),
    }
    for what, (ran, read) in checks.items():
        if ran != read:
            diff = sorted(set(ran) ^ set(read)) if isinstance(ran, set) else (ran, read)
            raise SystemExit(f"vllm {VLLM_034} {what}: the parser and the static reading disagree: {diff}")
    if vertex_env:
        raise SystemExit(f"vllm {VLLM_034} reads Vertex env names {vertex_env}: record them in image_env")
    options = sorted(set(parsed["options"]) - {"-h", "--help"})
    return {
        "source": f"vllm {VLLM_034} sdist from PyPI",
        "url": VLLM_034_SDIST,
        "sha256": digest,
        "version": VLLM_034,
        "method": (
            f"vLLM's own parser: `{parsed['prog']}` as vllm/entrypoints/cli/main.py builds it "
            "(ServeSubcommand.subparser_init -> make_arg_parser: FrontendArgs + AsyncEngineArgs), run from the sdist "
            f"in a venv with {VLLM_034_PARSER_REQUIREMENTS[0]} and VLLM_TARGET_DEVICE=cpu; every option string "
            "it registers (hidden --no-enable-x/--no-disable-x included) less -h/--help; checked equal to a static "
            "AST reading of the same source"
        ),
        "flags": [o for o in options if o.startswith("--")],
        "short_flags": [o for o in options if not o.startswith("--")],
        "flags_note": (
            "FlexibleArgumentParser (vllm/utils/argparse_utils.py) also takes --snake_case spellings of these, "
            "--json-arg.key value for JSON-valued flags, -O<n> for --optimization-level, and argparse's unambiguous "
            "prefixes; an unknown flag exits with 'vllm: error: unrecognized arguments: ...'"
        ),
        "quantization_methods": sorted(parsed["quantization_methods"]),
        "lora_ranks": parsed["lora_ranks"],
        "architectures": parsed["architectures"],
        "architectures_source": "vllm/model_executor/models/registry.py: " + ", ".join(VLLM_034_GENERATION_DICTS),
        "architectures_note": (
            "with the default --model-impl auto, an architecture in no registry dict may still load through the "
            "Transformers backend (registry.py inspect_model_cls -> _try_resolve_transformers); else vLLM refuses it"
        ),
        "removed_architectures": parsed["removed_architectures"],
        "env": [],
        "image_env": [],
        "image_env_source": (
            f"docker/Dockerfile in the sdist: target vllm-openai, ENTRYPOINT {_dockerfile_entrypoint(dockerfile, 'vllm-openai')}; "
            "no AIP_* name anywhere in vllm/ (the upstream image reads no Vertex env)"
        ),
    }


def _git_show(repo: Path, spec: str) -> str:
    return subprocess.check_output(["git", "-C", str(repo), "show", spec], text=True)


def _tgi_model_types(init: str) -> tuple[list[str], list[str]]:
    """The model_type values get_model has a branch for, and the transformers mappings its fallback looks up."""
    tree = ast.parse(init)
    enum = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ModelType")
    types = {
        st.targets[0].id: ast.literal_eval(st.value)["type"]
        for st in enum.body
        if isinstance(st, ast.Assign) and isinstance(st.targets[0], ast.Name)
    }
    get_model = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "get_model")
    native, mappings = set(), []
    for node in ast.walk(get_model):
        if not (isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and node.left.id == "model_type"):
            continue
        for op, comparator in zip(node.ops, node.comparators, strict=True):
            if not isinstance(op, (ast.Eq, ast.In)):
                continue
            if isinstance(comparator, ast.Attribute):  # model_type in modeling_auto.MODEL_FOR_..._MAPPING_NAMES
                mappings.append(comparator.attr)
                continue
            for element in comparator.elts if isinstance(comparator, (ast.List, ast.Tuple)) else [comparator]:
                native.add(types[element.id] if isinstance(element, ast.Name) else ast.literal_eval(element))
    # A speculator's config: get_model reloads model_type from its base model's config.
    native.discard("mlp_speculator")
    return sorted(native), mappings


def tgi_fixture(repo: Path, transformers_sdist: bytes) -> dict:
    commit = subprocess.check_output(["git", "-C", str(repo), "rev-parse", f"{TGI_TAG}^{{commit}}"], text=True).strip()
    main = _git_show(repo, f"{TGI_TAG}:launcher/src/main.rs")
    args_block = main[main.index("struct Args {") : main.index("\n}\n", main.index("struct Args {"))]
    flags, env = [], []
    for attr, field in re.findall(r"#\[clap\(([^\]]*)\)\]\s*(?:///[^\n]*\n\s*)*([a-z_0-9]+):", args_block):
        if "long" in attr:
            flags.append("--" + field.replace("_", "-"))
        if re.search(r"\benv\b", attr):
            env.append(field.upper())
    enum = main[main.index("enum Quantization {") : main.index("\n}", main.index("enum Quantization {"))]
    quantize = [_camel_to_kebab(v) for v in re.findall(r"^\s{4}([A-Z][A-Za-z0-9]*),", enum, re.M)]

    init_path = "server/text_generation_server/models/__init__.py"
    init = _git_show(repo, f"{TGI_TAG}:{init_path}")
    native, mappings = _tgi_model_types(init)
    lock = _git_show(repo, f"{TGI_TAG}:server/poetry.lock")
    pinned = re.search(r'^name = "transformers"\nversion = "([^"]+)"', lock, re.M)[1]
    if pinned != TRANSFORMERS_VERSION:
        raise SystemExit(f"TGI {TGI_TAG} pins transformers {pinned}, this script reads {TRANSFORMERS_VERSION}")
    digest = hashlib.sha256(transformers_sdist).hexdigest()
    if digest != TRANSFORMERS_SHA256:
        raise SystemExit(f"transformers sdist sha256 {digest} != pinned {TRANSFORMERS_SHA256}")
    with tarfile.open(fileobj=io.BytesIO(transformers_sdist), mode="r:gz") as tar:
        auto = tar.extractfile(f"transformers-{pinned}/src/transformers/models/auto/modeling_auto.py").read().decode()
    assigned = _assignments(auto)
    fallback = set()
    for name in mappings:  # OrderedDict([("model_type", "Class"), ...])
        fallback |= {model_type for model_type, _ in ast.literal_eval(assigned[name].args[0])}
    if 'raise ValueError(f"Unsupported model type {model_type}")' not in init:
        raise SystemExit(f"{init_path} at {TGI_TAG} no longer ends get_model as model_types_note says")
    return {
        "source": f"huggingface/text-generation-inference {TGI_TAG} launcher/src/main.rs",
        "commit": commit,
        "version": TGI_VERSION,
        "flags": sorted(flags),
        "env": sorted(env),
        "quantize": quantize,
        "model_types": sorted(set(native) | fallback),
        "model_types_fallback": sorted(fallback - set(native)),
        "model_types_source": (
            f"{init_path} get_model at {TGI_TAG}: the model_type values it has a branch for (ModelType enum values "
            f"and literals); model_types_fallback: the keys of transformers {pinned}'s {' and '.join(mappings)} "
            "(models/auto/modeling_auto.py; TGI's server/poetry.lock pins that version) without a branch of their own"
        ),
        "model_types_note": (
            "get_model dispatches on config.json's model_type. One without a branch of its own is served by "
            "transformers' AutoModel (CausalLM.fallback / Seq2SeqLM.fallback: unsharded, no Flash Attention, and "
            "refused with --quantize gptq, awq, bitsandbytes-fp4/nf4, eetq or exl2) when transformers maps it, or, "
            "with --trust-remote-code, when config.json's auto_map names AutoModelForCausalLM/AutoModelForSeq2SeqLM "
            "(those custom types are not listed); any other model_type ends in "
            "ValueError('Unsupported model type <model_type>'). mlp_speculator configs are speculators: get_model "
            "reloads the model_type of their base model."
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tgi-repo",
        type=Path,
        help="a git clone of text-generation-inference, or a bare git directory of it (only git show/rev-parse run); "
        "needed for tgi-2.4.0.json",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "vlp-contract-fixtures",
        help="where the pinned sdists are kept (downloaded if absent) and vLLM 0.34.0's parser venv is built",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="FIXTURE",
        help="write only this fixture (e.g. vllm-0.7.3.json); repeatable; default: all of them",
    )
    args = parser.parse_args()
    cache = args.cache.resolve()

    def tgi() -> dict:
        if args.tgi_repo is None:
            raise SystemExit("tgi-2.4.0.json needs --tgi-repo")
        return tgi_fixture(args.tgi_repo, _download(TRANSFORMERS_SDIST, TRANSFORMERS_SHA256, cache))

    fixtures = (
        ("vllm-0.6.2.json", lambda: vllm_fixture(_download(VLLM_SDIST, VLLM_SHA256, cache))),
        ("vllm-0.7.3.json", lambda: vllm_073_fixture(_download(VLLM_073_SDIST, VLLM_073_SHA256, cache))),
        ("vllm-0.34.0.json", lambda: vllm_034_fixture(_download(VLLM_034_SDIST, VLLM_034_SHA256, cache), cache)),
        ("tgi-2.4.0.json", tgi),
    )
    unknown = set(args.only) - {name for name, _ in fixtures}
    if unknown:
        raise SystemExit(f"no fixture named {sorted(unknown)}: choose from {[name for name, _ in fixtures]}")
    OUT.mkdir(parents=True, exist_ok=True)
    for name, build in fixtures:
        if args.only and name not in args.only:
            continue
        data = build()
        (OUT / name).write_text(json.dumps(data, indent=1) + "\n")
        served = data.get("architectures", data.get("model_types", []))
        print(f"wrote {OUT / name}: {len(data['flags'])} flags, {len(data['env'])} env names, {len(served)} served")


if __name__ == "__main__":
    main()
