# Every target creates or reuses the local virtual environment .venv, so a fresh clone needs
# only Python 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
DEMO_STAMP := $(VENV)/.installed-demo
TORCH_STAMP := $(VENV)/.installed-torch
# CI runs the PyTorch adapter's tests too: `make test` adds the torch extra (the CPU build,
# ~17 s and ~870 MB on the reference machine, docs/agent.md) when CI=true. Elsewhere those
# tests skip unless torch is installed (`make install-torch`).
# The TLS scan test runs sslyze from its own environment: sslyze pins an older cryptography
# than fedge's (constraints-scan.txt; tests/support/tls_scan.py).
SCAN_VENV := .venv-scan
SCAN_STAMP := $(SCAN_VENV)/.installed
ifeq ($(CI),true)
TEST_STAMPS := $(STAMP) $(TORCH_STAMP) $(SCAN_STAMP)
else
TEST_STAMPS := $(STAMP) $(SCAN_STAMP)
endif
# Tested versions of every dependency (see the file's header).
CONSTRAINTS := constraints.txt

.PHONY: install install-torch test lint mutation bench bench-full demo clean docker-test k8s-test constraints dist

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e '.[dev]'
	touch $(STAMP) $(DEMO_STAMP)

$(TORCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e '.[dev,torch]'
	touch $(TORCH_STAMP)

$(SCAN_STAMP): constraints-scan.txt
	$(PYTHON) -m venv $(SCAN_VENV)
	$(SCAN_VENV)/bin/pip install --quiet -c constraints-scan.txt sslyze
	touch $(SCAN_STAMP)

$(DEMO_STAMP): pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e '.[demo]'
	touch $(DEMO_STAMP)

# Re-resolve the newest versions pyproject.toml allows into constraints.txt (then: make test).
constraints:
	rm -rf .venv-constraints
	$(PYTHON) -m venv .venv-constraints
	.venv-constraints/bin/pip install --quiet --upgrade pip
	.venv-constraints/bin/pip install --quiet '.[dev,torch]'
	{ sed -n '/^#/p' $(CONSTRAINTS); .venv-constraints/bin/pip freeze --exclude-editable \
	  | grep -v '^fedge'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf .venv-constraints

install: $(STAMP)

install-torch: $(TORCH_STAMP)

# The suite runs in PYTEST_WORKERS processes (pytest-xdist; default: one more than the cores,
# at least 3: most tests wait on HTTPS round trips and child coordinator processes), each with
# its own SQLite files and its own PostgreSQL database (tests/support/databases.py); a worker
# that runs out of tests takes some from the others (worksteal). PYTEST_WORKERS=0 runs the
# suite in this process (for -x, --pdb and the like).
PYTEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); n=$$((n + 1)); [ $$n -lt 3 ] && n=3; echo $$n)
test: $(TEST_STAMPS)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) $$([ "$(PYTEST_WORKERS)" != 0 ] && echo --dist worksteal) $(PYTEST_ARGS)

# Mutation testing of the security- and aggregation-critical modules (tests/mutation/, docs/testing.md):
# slow (minutes per module), so not part of `make test`. MUTATION_ARGS narrows it, e.g.
# MUTATION_ARGS="--module shared/topk.py" or "--changed-since origin/main --budget 120".
mutation: $(STAMP)
	$(BIN)/python tests/mutation/run.py $(MUTATION_ARGS)

# mypy checks the installed names (fedge.shared, ...): it cannot follow the package-dir mapping
# of the editable install, so it reads the folders through links in build/mypy/fedge/
# (pyproject.toml's mypy_path).
# bandit checks the four packages ([tool.bandit] in pyproject.toml; tests/test_nosec_reasons.py
# checks that each suppression says why).
MYPY_TREE := build/mypy/fedge

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/bandit -c pyproject.toml -q -r shared coordinator edge_agent migrations
	mkdir -p $(MYPY_TREE)
	for p in shared coordinator edge_agent migrations; do ln -sfn ../../../$$p $(MYPY_TREE)/$$p; done
	$(BIN)/mypy

# Benchmarks measure, they never assert; no test calls them. `bench` runs the codec benchmark
# (half a minute; bench/results/codec.json) and the quick version of every other one (a few
# minutes; bench/results/*.quick.json, git-ignored); `bench-full` runs the full ones (the
# figures the README quotes: bench/results/*.json and *.png; and the ingest benchmark below
# saturation, bench/results/ingest_open_loop.json), then rewrites the README's Results section
# from them.
BENCHES := codec compression_accuracy async_vs_sync flower_setting aggregate ingest upload_path \
	fleet_traffic selection dp_accuracy byzantine secagg

bench: $(STAMP)
	$(BIN)/python bench/codec.py
	set -e; for b in $(filter-out codec,$(BENCHES)); do $(BIN)/python bench/$$b.py --quick; done

bench-full: $(STAMP)
	set -e; for b in $(BENCHES); do $(BIN)/python bench/$$b.py; done
	$(BIN)/python bench/ingest.py --quick --backends sqlite,postgresql --no-ceiling --no-longpoll \
		--measure-s 10 --rates 0,10,20,30,40 --rate-repeats 2 \
		--output bench/results/ingest_open_loop.json
	$(BIN)/python bench/report.py --readme README.md

demo: $(DEMO_STAMP)
	$(BIN)/fedge demo $(DEMO_ARGS)

# Build the coordinator image with podman and run a short federated task against it
# (installs podman, buildah, runc, debootstrap and hadolint when missing; see docker/test.sh).
docker-test: $(STAMP)
	VENV_BIN=$(BIN) bash docker/test.sh

# The rendered deploy/kubernetes dev overlay run with podman on the image docker-test built: two
# coordinator pods on one PostgreSQL, a fleet training through them while one is killed and the
# other restarted (tests/e2e/test_kubernetes_live.py; docs/deploy-kubernetes.md).
K8S_TEST_IMAGE ?= $(or $(FEDGE_TEST_IMAGE),localhost/fedge-coordinator:test)
k8s-test: $(STAMP)
	FEDGE_K8S_TEST_IMAGE=$(K8S_TEST_IMAGE) \
	FEDGE_TEST_POSTGRES_URL=$${FEDGE_TEST_POSTGRES_URL:-postgresql+psycopg://postgres@127.0.0.1:5432/test} \
	$(BIN)/python -m pytest -q -p no:randomly --durations=3 tests/e2e/test_kubernetes_live.py

# The wheel and the sdist in dist/ (python -m build; the build backend is fetched into an
# isolated environment: DIST_ARGS=--no-isolation builds with what .venv has, offline). The wheel
# is what goes on a device: docs/install.md.
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist $(DIST_ARGS) .
	@ls -l dist

clean:
	rm -rf $(VENV) $(SCAN_VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
