# Crescent: the README's commands. `make train` and `make test` each set up .venv when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.crescent-installed
CONFIG ?= app/configs/tiny-cpu.yaml
PYTEST_ARGS ?=

.PHONY: setup train sft test test-fast lint bench bench-gpu images k8s-render mlflow-ui clean

setup: $(STAMP)

# torch==2.13.0 first (a looser pin would pull a multi-GB CUDA build), then the project pinned by constraints.txt.
# uv installs the ~170 pinned packages in parallel (about 40 s instead of several minutes with pip); it keeps the
# torch that is already installed, since 2.13.0 satisfies the pin. --compile-bytecode writes every package's .pyc
# once: uv does not by default, and where PYTHONDONTWRITEBYTECODE is set (as on CI) each process would otherwise
# compile lightning, mlflow, ... again (importing app.run: 22 s instead of 10 s on 2 cores).
UV_VERSION := 0.13.9
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0 uv==$(UV_VERSION)
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -c constraints.txt -e '.[dev]'
	touch $(STAMP)

train: setup
	$(BIN)/crescent train --config $(CONFIG)

# `make sft` fine-tunes `make train`'s final export on the demo chat set; it runs `make train` first when that
# export is missing (the path is the one app/configs/sft-tiny-cpu.yaml's model.init_from names).
PRETRAIN_EXPORT := runs/tiny-cpu/exports/step-00000160
SFT_CONFIG ?= app/configs/sft-tiny-cpu.yaml

sft: setup $(PRETRAIN_EXPORT)/crescent.json
	$(BIN)/crescent data demo --quiet
	$(BIN)/crescent train --config $(SFT_CONFIG)

$(PRETRAIN_EXPORT)/crescent.json: | setup
	$(MAKE) train CONFIG=app/configs/tiny-cpu.yaml

# One pytest worker per core (pytest-xdist): most tests wait on one-thread subprocesses (training runs, servers,
# builds), so two workers keep two cores busy. A file runs whole on one worker (--dist loadfile): module fixtures
# (built images, trained references) are made once. Files are handed out in tests/conftest.py's order
# (--no-loadscope-reorder): the long serial `chain` files first, then most tests first, which pairs long end-to-end
# files with short ones. The 25 slowest tests are listed.
# The tests' temporary files go to RAM (/dev/shm, when it has 8 GB free): the training runs fsync every checkpoint
# and MLflow store, and on the disk the image builds write to, each fsync waited behind the builds' writes.
TEST_WORKERS ?= 2
TEST_TMP ?= $(shell df -k --output=avail /dev/shm 2>/dev/null | awk 'NR==2 && $$1 > 8000000 {print "/dev/shm/crescent-tests"}')
test: setup
	$(BIN)/python -m compileall -q app components eval
	@rc=0; $(BIN)/python -m pytest tests -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25 \
		$(if $(TEST_TMP),--basetemp=$(TEST_TMP)) $(PYTEST_ARGS) || rc=$$?; \
	$(if $(TEST_TMP),rm -rf $(TEST_TMP);) exit $$rc

test-fast: setup
	$(BIN)/python -m pytest tests -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check app components eval tests bench

bench: setup
	@set -e; for b in bench/[!_]*.py; do name=$$(basename $$b .py); echo "== bench.$$name"; $(BIN)/python -m bench.$$name; done

# The GPU suite (issue 18, bench/gpu_suite.sh) into $(GPU_OUT): on a CUDA machine it needs no .venv (its python3 holds
# torch); `make bench-gpu GPU_SUITE_ARGS=--dry-run` checks it on a CPU, as `make test` does.
GPU_OUT ?= $(or $(OUT),runs/gpu-suite)
GPU_SUITE_ARGS ?=

bench-gpu:
	bash bench/gpu_suite.sh --out $(GPU_OUT) --python $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) $(GPU_SUITE_ARGS)

images: setup
	$(BIN)/python -m app.images build

k8s-render: setup
	$(BIN)/crescent k8s render --overlay dev

mlflow-ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns.db --default-artifact-root ./mlartifacts --host 127.0.0.1 --port 5000

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
