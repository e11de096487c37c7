# tlops: `make run` runs the demo pipeline end to end, `make test` runs the test suite.
# Both create .venv on first use (torch from the pinned release, then the locked dependencies).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tlops-installed
DATA   := .tlops/data/digits
PYTEST_ARGS ?=

.PHONY: setup run test test-slow lint typecheck compile scenario clean test-containers test-compress test-monitor

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/tlops demo-data $(DATA)
	$(BIN)/tlops run --config configs/demo.yaml

test: setup lint
	$(BIN)/python -m pytest -m "not slow and not gpu and not containers" --durations=30 $(PYTEST_ARGS)

# The tests marked `slow` (whole pipeline runs the default suite covers more cheaply elsewhere, the retraining
# scenario, fault runs); about half an hour on 2 cores.
test-slow: setup
	$(BIN)/python -m pytest -m "slow and not gpu and not containers" --durations=30 $(PYTEST_ARGS)

# The project image and the stores in real containers (rootful podman, infra/containers/): sets podman up, builds
# the base image from Debian packages (once) and the project image (cached layers: a source change rebuilds the
# last one only), then runs the tests marked `containers`. Where this machine cannot run containers
# (setup-podman.sh exits 3: not root, no apt-get, a runtime that refuses) it says so and succeeds.
test-containers: setup
	@rc=0; infra/containers/setup-podman.sh || rc=$$?; \
	if [ $$rc -eq 3 ]; then echo "test-containers: skipped, this machine cannot run containers (reason above)"; exit 0; fi; \
	[ $$rc -eq 0 ] || exit $$rc; \
	export TLOPS_IMAGE=$${TLOPS_IMAGE:-localhost/tlops:0.1.0}; \
	infra/containers/base-image.sh && infra/containers/build-image.sh && TLOPS_TARGET=serve infra/containers/build-image.sh && \
	$(BIN)/python -m pytest -m containers tests/containers $(PYTEST_ARGS)

# The compress step in whole pipeline runs (deploy.variants: onnx, int8, an unreachable pruning target) and
# `tlops serve` on the ONNX variant; a slow test, several minutes.
test-compress: setup
	$(BIN)/python -m pytest tests/pipelines/test_compress_run.py tests/unit/test_compress.py $(PYTEST_ARGS)

# Watching the champion end to end, the loop closed: a pipeline run on the digits (demo settings), `tlops serve`
# logging held-out and shifted traffic, `tlops monitor` on both, the labelling queue labelled, merged and the
# pipeline run again; a slow test, about 15 minutes.
test-monitor: setup
	$(BIN)/python -m pytest -m slow tests/pipelines/test_monitor_scenario.py $(PYTEST_ARGS)

# ruff, then the layering contracts of pyproject.toml [tool.importlinter] (imports inside functions count).
lint: setup
	$(BIN)/ruff check src components pipelines tests scenarios bench
	$(BIN)/lint-imports

typecheck: setup
	$(BIN)/mypy src/tlops

# The retraining story: four scheduled cycles (first data, more data, a poisoned delivery, a parity-breaking
# config), then audit, history and the served champion. About 5-10 minutes; also a slow test.
scenario: setup
	$(BIN)/python -m scenarios.retraining --workdir .tlops/scenario

compile: setup
	$(BIN)/tlops compile --output .tlops/tlops-pipeline.yaml

clean:
	rm -rf .tlops build *.egg-info
