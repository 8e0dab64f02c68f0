"""How long each pipeline step spends installing its packages before it runs, and how much it installs.

For every step, a fresh virtualenv gets exactly what the step's launcher installs on Vertex AI (the step's
locked set with --no-deps, then kfp --no-deps, as in the compiled spec), with no pip cache; then the step's
own modules are imported there, with the embedded code on the path, to show the set is enough. The same is
done for the shared set every step installed before (all-in-one). The last line printed is one JSON object:

    {"steps": {STEP: {"seconds": S, "bytes": B}}, "all_in_one_seconds": S0, "all_in_one_bytes": B0, ...}

Run: .venv/bin/python benchmarks/step_startup.py   (needs the package index pip uses; about 5 minutes)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vlp.pipelines.packaging import MODULE_OF_OP, STEP_NEEDS, STEP_OF_OP, embedded_code_dir, step_packages  # noqa: E402

KFP = "kfp==2.17.0"
# A frozen baseline: what every step installed before per-step sets (components/packaging.py RUNTIME_PACKAGES at
# commit 13d336b, where packaging.py lived then).
ALL_IN_ONE = [
    "google-cloud-aiplatform==1.165.1",
    "google-cloud-pipeline-components==2.22.0",
    "google-cloud-storage==3.17.1",
    "google-cloud-secret-manager==2.32.0",
    "google-cloud-quotas==0.6.3",
    "google-cloud-logging==3.17.0",
    "google-crc32c==1.9.0",
    "huggingface_hub==2.4.0",
    "transformers==5.23.0",
    "pydantic==2.14.3",
    "PyYAML==6.0.3",
    "requests==2.33.0",
]
# The modules a step's code imports from each distribution it needs (not the high-level aiplatform SDK,
# which the steps never touch and which would need bigquery).
IMPORTS = {
    "google-cloud-aiplatform": ["google.cloud.aiplatform_v1", "google.cloud.aiplatform_v1beta1"],
    "google-cloud-pipeline-components": ["google_cloud_pipeline_components.types.artifact_types"],
    "google-cloud-quotas": ["google.cloud.cloudquotas_v1"],
    "google-cloud-run": ["google.cloud.run_v2", "google.iam.v1.iam_policy_pb2"],
    "google-cloud-storage": ["google.cloud.storage"],
    "google-cloud-logging": ["google.cloud.logging"],
    "google-crc32c": ["google_crc32c", "google.auth.transport.requests"],
    "huggingface_hub": ["huggingface_hub", "huggingface_hub.errors", "huggingface_hub.hf_api"],
    "Jinja2": ["jinja2.sandbox"],
    "requests": ["requests", "google.auth.transport.requests"],
    "pydantic": ["pydantic"],
    "PyYAML": ["yaml"],
}
OP_OF_STEP = {step: op for op, step in STEP_OF_OP.items()}


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def install(packages: list[str]) -> tuple[float, int, Path]:
    """(seconds, bytes installed, venv) for the launcher's two pip commands in a fresh venv, no cache."""
    venv = Path(tempfile.mkdtemp(prefix="vlp-startup-")) / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [
        str(venv / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-cache-dir",
        "--no-warn-script-location",
    ]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    before = _tree_bytes(_site_packages(venv))
    started = time.monotonic()
    for command in ([*pip, *packages], [*pip, KFP, "--no-deps"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    seconds = time.monotonic() - started
    return seconds, _tree_bytes(_site_packages(venv)) - before, venv


def imports_work(step: str, venv: Path) -> str:
    """Import the step's module (embedded copy) and the modules it uses, as the launcher would; '' = fine."""
    op = OP_OF_STEP[step]
    module = MODULE_OF_OP[op]
    modules = ["kfp.dsl.executor_main", module, *(m for dist in STEP_NEEDS[step] for m in IMPORTS.get(dist, []))]
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    env = {"PATH": os.environ.get("PATH", ""), "_KFP_RUNTIME": "true", "PYTHONPATH": str(embedded_code_dir(module))}
    done = subprocess.run([str(venv / "bin" / "python"), "-c", code], env=env, capture_output=True, text=True)
    return "" if done.returncode == 0 else done.stderr.strip().splitlines()[-1]


def main() -> int:
    steps: dict[str, dict[str, float | int]] = {}
    failures = {}
    for step in STEP_NEEDS:
        seconds, size, venv = install(step_packages(step))
        problem = imports_work(step, venv)
        if problem:
            failures[step] = problem
        steps[step] = {"seconds": round(seconds, 1), "bytes": size}
        print(
            f"{step:16} {seconds:6.1f} s {size / 1e6:7.1f} MB  imports {'ok' if not problem else problem}", flush=True
        )
    all_seconds, all_bytes, _ = install(ALL_IN_ONE)
    print(f"{'all-in-one':16} {all_seconds:6.1f} s {all_bytes / 1e6:7.1f} MB", flush=True)
    slowest = max(steps, key=lambda s: steps[s]["seconds"])
    result = {
        "steps": steps,
        "all_in_one_seconds": round(all_seconds, 1),
        "all_in_one_bytes": all_bytes,
        "slowest_step": slowest,
        "slowest_vs_all_in_one": round(steps[slowest]["seconds"] / all_seconds, 2),
        "mirror_vs_all_in_one": round(steps["mirror-weights"]["seconds"] / all_seconds, 2),
        "import_failures": failures,
    }
    print(json.dumps(result))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
