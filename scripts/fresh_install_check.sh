#!/usr/bin/env bash
# The newcomer's path exactly as README gives it, from a fresh virtualenv outside the checkout (issue 36): the built
# wheel installed with the [local] extra, `vlp local sync`, then the demo, which must answer "Paris". `make test-install`
# runs it, and CI after `make test` (it needs the package registry: the wheel's dependencies are resolved afresh, not
# from the checkout's lock).
#
#   scripts/fresh_install_check.sh [PYTHON]     # PYTHON: the interpreter the new virtualenv is made from
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${1:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

"$python" -m venv "$work/venv"
"$work/venv/bin/pip" install -q --upgrade pip
# Built as a release is (the wheel, not the checkout), then installed with the extra README names.
"$work/venv/bin/pip" wheel -q --no-deps -w "$work/dist" "$repo"
wheel="$(ls "$work"/dist/vertex_llm_pipelines-*.whl)"
"$work/venv/bin/pip" install -q "${wheel}[local]"
mkdir "$work/elsewhere" && cd "$work/elsewhere"   # nothing of the checkout on the path or in the directory
"$work/venv/bin/vlp" local sync
"$work/venv/bin/vlp" run --local configs/local-demo.yaml --summary-json summary.json
"$work/venv/bin/python" - <<'PY'
import json
import sys

summary = json.load(open("summary.json"))
answer = (summary.get("smoke") or {}).get("answer") or ""
if summary.get("status") != "succeeded" or "paris" not in answer.lower():
    sys.exit(f"fresh install: the demo did not answer Paris (status {summary.get('status')}, answer {answer!r}, error {summary.get('error')!r})")
print(f"fresh install: the demo answered {answer!r}")
PY
