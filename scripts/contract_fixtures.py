"""Extract the flags and env names the pinned serving images accept from upstream source, as JSON fixtures.

Run by a developer when a pinned image changes (CI never runs it: it needs the network):

    python scripts/contract_fixtures.py --tgi-repo PATH/TO/text-generation-inference

- vLLM: the PyPI sdist of the vLLM version inside the pinned Model Garden image (pytorch-vllm-serve:20241001_0916_RC00
  carries vLLM 0.6.2), checked against its sha256; flags from `vllm/engine/arg_utils.py` and
  `vllm/entrypoints/api_server.py`, quantization methods from `model_executor/layers/quantization/__init__.py`.
- TGI: `launcher/src/main.rs` at the tag of the pinned DLC's TGI version (2.4.0), read with `git show`; every
  `#[clap(long, env)]` field is a `--flag` and an `ENV_NAME`; the `Quantization` enum gives --quantize values.
The fixtures land in components/contract/ and record where they came from.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import subprocess
import tarfile
import urllib.request
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "components" / "contract"
VLLM_VERSION = "0.6.2"
VLLM_SDIST = (
    "https://files.pythonhosted.org/packages/0c/26/3f0ad89fc748475a02c5b3d1a6cb2e64153c5eb7595afadf468905929a03/"
    "vllm-0.6.2.tar.gz"
)
VLLM_SHA256 = "2fffd856a25d3defa38a539150fccf9126959ce4c6781c1c5a76d5da7216af59"
TGI_TAG = "v2.4.0"
_FLAG = re.compile(r"""['"](--[a-z0-9][a-z0-9-]*)['"]""")


def _camel_to_kebab(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


def _previous(name: str) -> dict:
    path = OUT / name
    return json.loads(path.read_text()) if path.exists() else {}


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
    return {
        "source": f"vllm {VLLM_VERSION} sdist from PyPI",
        "url": VLLM_SDIST,
        "sha256": digest,
        "flags": flags,
        "quantization_methods": methods,
        "lora_ranks": [int(x) for x in re.findall(r"\d+", ranks.group(1))],
        "env": [],
        # Read by the Model Garden image, not by upstream vLLM: kept from the previous fixture (see image_env_source).
        **{k: v for k, v in _previous("vllm-0.6.2.json").items() if k.startswith("image_env")},
    }


def tgi_fixture(repo: Path) -> dict:
    commit = subprocess.check_output(["git", "-C", str(repo), "rev-parse", f"{TGI_TAG}^{{commit}}"], text=True).strip()
    main = subprocess.check_output(["git", "-C", str(repo), "show", f"{TGI_TAG}:launcher/src/main.rs"], text=True)
    args_block = main[main.index("struct Args {") : main.index("\n}\n", main.index("struct Args {"))]
    flags, env = [], []
    for attr, field in re.findall(r"#\[clap\(([^\]]*)\)\]\s*(?:///[^\n]*\n\s*)*([a-z_0-9]+):", args_block):
        if "long" in attr:
            flags.append("--" + field.replace("_", "-"))
        if re.search(r"\benv\b", attr):
            env.append(field.upper())
    enum = main[main.index("enum Quantization {") : main.index("\n}", main.index("enum Quantization {"))]
    quantize = [_camel_to_kebab(v) for v in re.findall(r"^\s{4}([A-Z][A-Za-z0-9]*),", enum, re.M)]
    return {
        "source": f"huggingface/text-generation-inference {TGI_TAG} launcher/src/main.rs",
        "commit": commit,
        "flags": sorted(flags),
        "env": sorted(env),
        "quantize": quantize,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tgi-repo", type=Path, required=True, help="a git clone of text-generation-inference")
    parser.add_argument("--vllm-sdist", type=Path, help="vllm-0.6.2.tar.gz already downloaded (else fetched)")
    args = parser.parse_args()
    sdist = args.vllm_sdist.read_bytes() if args.vllm_sdist else urllib.request.urlopen(VLLM_SDIST).read()
    OUT.mkdir(parents=True, exist_ok=True)
    for name, data in (("vllm-0.6.2.json", vllm_fixture(sdist)), ("tgi-2.4.0.json", tgi_fixture(args.tgi_repo))):
        (OUT / name).write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {OUT / name}: {len(data['flags'])} flags, {len(data['env'])} env names")


if __name__ == "__main__":
    main()
