# Everything goes through a project virtualenv so a fresh machine needs only Python 3.11+ and Go.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DIR    ?= .cache/cluster
# KubeVirt's real CRD schemas, when the shared folder is beside the checkout (CI has it).
export KUBEVIRT_CRDS_DIR ?= $(if $(wildcard ../shared/kubevirt-crds),$(abspath ../shared/kubevirt-crds),)

.PHONY: demo test lint unit e2e cluster cluster-down crds binaries chart-test image image-test clean \
	visual-test reliability bench bench-sim

$(BIN)/virtshift: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

# KubeVirt's own virt-controller and virt-api (and the program printing KubeVirt's manifests),
# built once into the same cache when KubeVirt's source is there: KUBEVIRT_SRC, else the shared
# archive beside the checkout (CI has it). Without it they are skipped, and so are their tests.
KUBEVIRT_SOURCE := $(or $(KUBEVIRT_SRC),$(wildcard ../shared/kubevirt-src/kubevirt-v1.9.0.tar.xz))

binaries: $(BIN)/virtshift
	$(BIN)/virtshift binaries etcd kube-apiserver kubectl
ifneq ($(KUBEVIRT_SOURCE),)
	$(BIN)/virtshift binaries virt-controller virt-api kubevirt-manifests
else
	@echo "KubeVirt's source not found (KUBEVIRT_SRC, ../shared/kubevirt-src): virt-controller and virt-api not built"
endif

lint: $(BIN)/virtshift
	$(BIN)/ruff check operator tests
	$(BIN)/lint-imports
	$(BIN)/virtshift crds --check

unit: $(BIN)/virtshift
	$(BIN)/pytest tests/unit

# The Helm chart: hadolint on the Dockerfile, helm lint --strict and template (default and
# every toggle on), the values schema, kubeconform -strict, helm install into the local
# control plane, and the chart's RBAC as its ServiceAccount (about a minute).
chart-test: binaries
	$(BIN)/virtshift binaries helm kubeconform
	$(BIN)/hadolint Dockerfile
	$(BIN)/pytest tests/e2e/test_chart.py tests/e2e/test_chart_rbac.py

# The rest of the suite (test_nodedrain.py and test_replicas.py run the operator as the
# chart's ServiceAccount too).
test: lint binaries chart-test
	$(BIN)/pytest --deselect tests/e2e/test_chart.py --deselect tests/e2e/test_chart_rbac.py \
	    --ignore=tests/visual

# What needs tmux and Chromium (not on CI): `virtshift status` under tmux during a drain, and
# the drain's HTML report rendered to .cache/observe/report.png (apt-get install tmux chromium).
visual-test: binaries
	$(BIN)/pytest tests/visual

# The fault-injection suite in full (tests/reliability; `make test` runs its bounded form: 3
# SIGKILL seeds, a small fuzz budget, each other fault once): 20 SIGKILL seeds, a larger fuzz
# budget, and docs/reliability.md written from the runs. RELIABILITY_SEEDS / RELIABILITY_FUZZ
# override the budgets.
reliability: binaries
	RELIABILITY_FULL=1 RELIABILITY_REPORT=docs/reliability.md $(BIN)/pytest tests/reliability

# The operator image without a Docker engine: buildah on a base of Debian packages (root,
# buildah and mmdebstrap needed); then run it against the local control plane.
image:
	sh hack/build-image.sh

image-test: image binaries
	VIRTSHIFT_IMAGE_TEST=1 $(BIN)/pytest tests/e2e/test_image.py

demo: binaries
	$(BIN)/virtshift demo

cluster: binaries
	$(BIN)/virtshift cluster up --dir $(DIR)

cluster-down: $(BIN)/virtshift
	$(BIN)/virtshift cluster down --dir $(DIR)

crds: $(BIN)/virtshift
	$(BIN)/virtshift crds

# Issue 12's targets, each compared with KubeVirt's own drain (kubectl drain) in the same run,
# twice; then docs/benchmarks.md is written from the results (never by hand). Long: most of
# an hour on 2 cores.
RESULTS := benchmarks/results
BENCH   := $(BIN)/virtshift bench drain --baseline native --repeat 2
bench: binaries
	$(BENCH) --scenario examples/scenarios/medium.yaml --nodes node-1 --exclude-vms 'prod/gpu-*' \
	  --time-scale 10 --label 'medium without GPUs, node-1, 10x' --json $(RESULTS)/medium-10x.json
	$(BENCH) --scenario examples/scenarios/medium.yaml --nodes node-1 --exclude-vms 'prod/gpu-*' \
	  --time-scale 60 --label 'medium without GPUs, node-1, 60x' --json $(RESULTS)/medium-60x.json
	$(BENCH) --scenario examples/scenarios/postcopy.yaml --nodes node-1 \
	  --policy benchmarks/policies/postcopy.yaml --timeout 3600 \
	  --label 'dirty rate above the NIC, post-copy allowed, node-1' --json $(RESULTS)/postcopy.json
	$(BENCH) --scenario examples/scenarios/postcopy.yaml --nodes node-1 \
	  --policy benchmarks/policies/postcopy-fast.yaml --timeout 3600 \
	  --label 'dirty rate above the NIC, post-copy, virtshift policy at 1 s/GiB, node-1' \
	  --json $(RESULTS)/postcopy-fast.json
	$(BENCH) --scenario examples/scenarios/large.yaml --nodes node-1,node-2,node-3 \
	  --max-unavailable 1 --time-scale 20 --timeout 7200 \
	  --label 'large, rolling wave node-1..3, 20x' --json $(RESULTS)/large-wave-20x.json
	$(BIN)/virtshift bench scale --vmis 5000 --nodes 100 --json $(RESULTS)/scale-5000.json
	$(BIN)/virtshift bench report $(RESULTS)/medium-10x.json $(RESULTS)/medium-60x.json \
	  $(RESULTS)/postcopy.json $(RESULTS)/postcopy-fast.json $(RESULTS)/large-wave-20x.json $(RESULTS)/scale-5000.json \
	  --out docs/benchmarks.md

# The simulator alone: 2,000 VMs, 200 migrations at once.
bench-sim: binaries
	$(BIN)/python benchmarks/bench_sim.py

clean: cluster-down
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
