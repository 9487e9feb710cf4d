# Two commands on a fresh machine:  `make demo` (set up + run the whole pipeline locally + a served
# fast-adapt answer) and `make test` (set up + lint + the test suite). Everything else is optional.

PYTHON    ?= python3
VENV      ?= .venv
BIN       := $(VENV)/bin
# METAREC_REGISTRY is also what `metarec compile` writes into the pipelines: one variable for both.
REGISTRY  ?= $(or $(METAREC_REGISTRY),ghcr.io/metarec)
# CUDA builds (tag suffix -cuda, metarec.images) carry CUDA wheels of the pinned torch; CPU builds the CPU wheels.
CUDA_TORCH_INDEX ?= https://download.pytorch.org/whl/cu128
VERSION   := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' src/metarec/__init__.py)
DEMO_DIR  ?= runs/demo
STAMP     := $(VENV)/.metarec-installed

.PHONY: setup demo test test-fast fidelity lint format compile images push bench clean

setup: $(STAMP)

# torch first, pinned: the CPU build lies on disk; resolving it through the extras could pull CUDA wheels.
$(STAMP): pyproject.toml setup.py requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e ".[pipelines,serving,dev,bench]"
	touch $@

demo: setup
	$(BIN)/metarec run-local --output $(DEMO_DIR)
	$(BIN)/metarec serve --model-dir $(DEMO_DIR) --workdir $(DEMO_DIR)/torchserve
	$(BIN)/metarec demo-request --workdir $(DEMO_DIR)/torchserve; status=$$?; \
	  $(BIN)/metarec serve --stop --workdir $(DEMO_DIR)/torchserve; exit $$status

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint fidelity
	$(BIN)/python -m pytest -q

# The quick inner loop: everything but the tests marked slow (CI runs `make test`, i.e. all of them).
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# Each image's install spec (images/*.extras) replayed in a clean venv, then every component's compiled
# container command run in it on tiny data, and the serving pod's commands on the deployed model (see
# images/fidelity.py). Last line: one JSON summary.
fidelity: setup
	$(BIN)/python images/fidelity.py --workdir build/fidelity

compile: setup
	METAREC_REGISTRY=$(REGISTRY) $(BIN)/metarec compile --output build/pipelines

images:
	for image in components serving; do \
	  docker build -f images/$$image.Dockerfile -t $(REGISTRY)/metarec-$$image:$(VERSION) . && \
	  docker build -f images/$$image.Dockerfile --build-arg TORCH_INDEX_URL=$(CUDA_TORCH_INDEX) \
	    -t $(REGISTRY)/metarec-$$image:$(VERSION)-cuda . || exit 1; \
	done

# Tags are never overwritten: a compiled pipeline names its image by tag, KFP's cache keys on that name and
# nodes pull IfNotPresent, so new code under an old tag would run old code and reuse stale cached steps.
# Bump __version__ (src/metarec/__init__.py) for every release; ALLOW_OVERWRITE=1 for a scratch registry.
push: images
	for tag in $(VERSION) $(VERSION)-cuda; do for image in components serving; do \
	  ref=$(REGISTRY)/metarec-$$image:$$tag; \
	  if [ -z "$(ALLOW_OVERWRITE)" ] && docker manifest inspect $$ref >/dev/null 2>&1; then \
	    echo "$$ref already exists: bump __version__ in src/metarec/__init__.py (tags are never overwritten)" >&2; \
	    exit 1; \
	  fi; \
	done; done
	for tag in $(VERSION) $(VERSION)-cuda; do \
	  docker push $(REGISTRY)/metarec-components:$$tag && docker push $(REGISTRY)/metarec-serving:$$tag || exit 1; \
	done

bench: setup
	$(BIN)/python bench/meta_train_speed.py
	$(BIN)/python bench/serving_latency.py
	$(BIN)/python bench/coldstart_quality.py --seeds 0 1 2

clean:
	rm -rf build runs .pytest_cache .ruff_cache
