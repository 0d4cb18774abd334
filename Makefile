# Everything goes through a project virtualenv so a fresh machine needs only Python 3.11+ and Go.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DIR    ?= .cache/cluster
# KubeVirt's real CRD schemas, when the shared folder is beside the checkout (CI has it).
export KUBEVIRT_CRDS_DIR ?= $(if $(wildcard ../shared/kubevirt-crds),$(abspath ../shared/kubevirt-crds),)

.PHONY: demo test lint unit e2e cluster cluster-down crds binaries clean

$(BIN)/virtshift: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

binaries: $(BIN)/virtshift
	$(BIN)/virtshift binaries etcd kube-apiserver kubectl

lint: $(BIN)/virtshift
	$(BIN)/ruff check operator tests
	$(BIN)/lint-imports
	$(BIN)/virtshift crds --check

unit: $(BIN)/virtshift
	$(BIN)/pytest tests/unit

test: lint binaries
	$(BIN)/pytest

demo: binaries
	$(BIN)/virtshift demo

cluster: binaries
	$(BIN)/virtshift cluster up --dir $(DIR)

cluster-down: $(BIN)/virtshift
	$(BIN)/virtshift cluster down --dir $(DIR)

crds: $(BIN)/virtshift
	$(BIN)/virtshift crds

bench: binaries
	$(BIN)/python benchmarks/bench_sim.py

clean: cluster-down
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
