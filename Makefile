# One command per task. `make demo` and `make test` set everything up first
# (Debian packages when run as root, the virtualenv, the npm toolchain) and are
# safe to run again.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# every package pinned, dependencies' dependencies too (python -m deploy.generated_files)
PIP_INSTALL := $(BIN)/python -m pip install --quiet --disable-pip-version-check \
	--constraint deploy/dev-constraints.txt
STATE_DIR ?= .demo
NODES ?= 5
THRESHOLD ?= 3

.PHONY: setup system-deps test-system-deps venv npm test test-fast test-multihost demo lint proto contracts clean

# What every host needs (a node, a coordinator, an app, a developer's machine).
setup: system-deps venv npm

system-deps:
	@deploy/install-system-deps.sh

# And what only the tests use: network namespaces, promtool, a headless Chromium.
test-system-deps:
	@deploy/install-system-deps.sh --tests

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml deploy/dev-constraints.txt
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e '.[dev]'
	@touch $@

npm: node_modules/.installed
node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

test: setup test-system-deps
	$(BIN)/pytest

# The tests that need no HSM, chain or cluster (markers in pyproject.toml): under a minute.
test-fast: venv
	$(BIN)/pytest -m "not softhsm and not anvil and not cluster and not multihost"

# The cluster across separate network hosts (Linux network namespaces; needs root).
# Where namespaces cannot be made it says why and fails: it never passes by doing nothing.
test-multihost: setup test-system-deps
	$(BIN)/python -m deploy.netns check
	$(BIN)/pytest -m multihost tests/multihost

# Chains that mine on an interval (issue 12): the end-to-end read, grant, revocation,
# expiry and emergency tests on anvil mining every 2 s and every 12 s, then revocation
# latency on each (benchmarks/block_times.py). About 20 minutes, most of it the 12 s
# cluster's set-up.
BLOCK_TIME_TESTS := \
  tests/integration/test_end_to_end.py::test_patient_to_doctor_3_of_5 \
  tests/integration/test_end_to_end.py::test_refused_without_a_grant \
  tests/integration/test_end_to_end.py::test_refused_after_expiry_by_chain_time \
  tests/integration/test_end_to_end.py::test_refused_after_revocation \
  tests/integration/test_attacks.py::test_emergency_access_is_served_only_inside_its_window

.PHONY: test-block-times
test-block-times: setup test-system-deps
	MEDKMS_TEST_BLOCK_TIME=2 $(BIN)/pytest $(BLOCK_TIME_TESTS)
	MEDKMS_TEST_BLOCK_TIME=12 $(BIN)/pytest $(BLOCK_TIME_TESTS)
	$(BIN)/python -m benchmarks.block_times --trials 5 --out benchmarks/results/block_times.json

demo: setup
	$(BIN)/kmsctl cluster up --reset --detach --nodes $(NODES) --threshold $(THRESHOLD) --state-dir $(STATE_DIR)
	@$(BIN)/kmsctl demo --state-dir $(STATE_DIR); rc=$$?; \
	  $(BIN)/kmsctl cluster down --state-dir $(STATE_DIR); exit $$rc

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy -p core -p proto -p kms_node -p coordinator -p clients -p contracts -p deploy -p cli -p benchmarks -p tests
	$(BIN)/python -m proto.generate --check
	$(BIN)/python -m contracts.build --check

# Regenerate derived files after editing their sources.
proto: venv
	$(BIN)/python -m proto.generate

contracts: setup
	$(BIN)/python -m contracts.build

clean:
	rm -rf $(VENV) node_modules $(STATE_DIR) .pytest_cache .ruff_cache

# Benchmarks (issue 5): baseline, one node, the 3-of-5 cluster, scaling and
# revocation in one run; writes benchmarks/results/ and the README's results.
.PHONY: bench bench-quick bench-flood bench-hung-node bench-coordinator-restart chaos bench-audit-large bench-index-scale
bench: setup
	$(PIP_INSTALL) -e '.[dev,bench]'
	$(BIN)/python -m benchmarks.harness

bench-quick: setup
	$(PIP_INSTALL) -e '.[dev,bench]'
	$(BIN)/python -m benchmarks.harness --quick

# Flood resistance (issue 10): a granted doctor's p50 idle and under two floods.
bench-flood: setup
	$(BIN)/python -m benchmarks.flood --out benchmarks/results/flood.json

# One node of 3-of-5 SIGSTOPped under load, then recovered (issue 13).
bench-hung-node: setup
	$(BIN)/python -m benchmarks.hung_node --out benchmarks/results/hung_node.json

# Faults injected into a 3-of-5 cluster under load; fails on a lost read or entry (issue 13).
# As root: one fault puts a node's data directory on a small tmpfs.
chaos: setup
	$(BIN)/python -m benchmarks.chaos --out benchmarks/results/chaos.json

# `kmsctl audit verify` of 5 nodes with 100,000 entries each, against streaming alone
# (issue 13). ENTRIES=N for fewer per node.
bench-audit-large: setup
	$(BIN)/python -m benchmarks.audit_large --entries $(or $(ENTRIES),100000) --out benchmarks/results/audit_large.json

# The coordinator relaying fragments unverified vs verifying every one (ADR 14), in one run.
.PHONY: bench-verify-once
bench-verify-once: setup
	$(BIN)/python -m benchmarks.verify_once --out benchmarks/results/verify_once.json

# The app's CPU per read split by step, as ratios to the bare umbral work it must do (issue 14).
.PHONY: bench-sdk-share
bench-sdk-share: setup
	$(BIN)/python -m benchmarks.sdk_share --out benchmarks/results/sdk_share.json

# The coordinator's own Python per read, without gRPC or node work (issue 14).
.PHONY: bench-coordinator-share
bench-coordinator-share: setup
	$(BIN)/python -m benchmarks.coordinator_share --out benchmarks/results/coordinator_share.json

# One node's CPU per single request and per capsule in batches of 32, over the bare
# re-encryption from bytes, alone on a 1-of-1 cluster (issue 14): medians of 3 rounds.
.PHONY: bench-node-cost
bench-node-cost: setup
	$(BIN)/python -m benchmarks.node_cost --out benchmarks/results/node_cost.json

# An app's reads across a 30 s coordinator outage (issue 13).
bench-coordinator-restart: setup
	$(BIN)/python -m benchmarks.coordinator_restart --out benchmarks/results/coordinator_restart.json

# The grant index with 10 000 and 100 000 patients (issue 14): memory per patient, restart
# from a snapshot and by full replay, lookup p50, extrapolated to a million; adds
# index_kb_per_patient and restart_s_100k_patients to latest.json. The filled chains are
# cached in benchmarks/cache/ (the first run fills them: about 15 minutes in all).
bench-index-scale: setup
	$(BIN)/python -m benchmarks.index_scale --out benchmarks/results/index_scale.json \
	  --latest benchmarks/results/latest.json
