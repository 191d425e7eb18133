# The two commands a newcomer runs:  make demo   and   make test
SHELL := /bin/bash
PY ?= python3
VENV := .venv
RUNTIME_VENV := .venv-runtime
BIN := $(VENV)/bin

.PHONY: demo test lint lint-runtime unit integration e2e test-runtime binaries sysdeps venv runtime-venv crds clean \
	realnode-prereqs images e2e-realnode

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, etcd and kwok, plus helm and kubeconform
# for the install tests, built from Go modules once and cached in ~/.cache/kaito-py (hack/build-*.sh).
binaries:
	@bash hack/build-binaries.sh >/dev/null
	@bash hack/build-tools.sh >/dev/null

# Debian packages used as real peers by some tests (an OCI registry, promtool).
sysdeps:
	@bash hack/install-system-deps.sh

# The real node's prerequisites (root only; the real-node e2e tests skip, saying why, when not root):
# containerd, runc, CNI plugins, buildah, mmdebstrap (hack/install-node-deps.sh); kubelet, kube-proxy and
# crictl from Go modules (hack/build-node-binaries.sh); the images from a Debian rootfs (hack/images.py).
# All cached in ~/.cache/kaito-py; an unchanged tree rebuilds nothing.
# The image builds (mostly downloads) run while Go compiles the binaries (CPU): a cold CI run overlaps them.
realnode-prereqs: venv
	@if [ "$$(id -u)" = 0 ]; then \
	  bash hack/install-node-deps.sh || exit 1; \
	  { $(BIN)/python hack/images.py build pause base controller provisioner >/dev/null && \
	    $(BIN)/python hack/seed_images.py tiny-preset curl >/dev/null; } & images=$$!; \
	  bash hack/build-binaries.sh >/dev/null && bash hack/build-node-binaries.sh >/dev/null; rc=$$?; \
	  wait $$images && exit $$rc; \
	else echo "realnode-prereqs: not root, the real-node e2e tests will be skipped"; fi

images: venv
	$(BIN)/python hack/images.py build pause base controller provisioner

# Only the real-node suite (images, a real node, the Helm chart installed on it).
e2e-realnode: venv binaries sysdeps realnode-prereqs
	$(BIN)/python -m pytest test/e2e/realnode

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: venv
	$(BIN)/python -m pytest test/unit

integration: venv binaries
	$(BIN)/python -m pytest test/integration

e2e: venv binaries sysdeps realnode-prereqs
	$(BIN)/python -m pytest test/e2e

# The model runtime (presets/) has its own dependencies (torch, transformers) in its own venv.
$(RUNTIME_VENV)/.installed: $(wildcard presets/requirements*.txt)
	$(PY) -m venv $(RUNTIME_VENV)
	$(RUNTIME_VENV)/bin/pip install -q --disable-pip-version-check --upgrade pip
	$(RUNTIME_VENV)/bin/pip install -q --disable-pip-version-check -r presets/requirements-test.txt \
	  $(if $(wildcard presets/requirements-tuning.txt),-r presets/requirements-tuning.txt)
	touch $@

runtime-venv: $(RUNTIME_VENV)/.installed

# mypy --strict over the runtime's packages, resolved against the runtime venv (torch, transformers).
RUNTIME_MYPY = $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml \
	--python-executable $(CURDIR)/$(RUNTIME_VENV)/bin/python --strict

lint-runtime: venv runtime-venv
	cd presets/inference && $(RUNTIME_MYPY) kaito_inference inference_api.py
	cd presets/tuning && $(RUNTIME_MYPY) kaito_tuning fine_tuning.py
	$(RUNTIME_MYPY) -p presets.oci

test-runtime: lint-runtime
	$(RUNTIME_VENV)/bin/python -m pytest test/runtime -p no:cacheprovider

# Everything: lint + types, then unit, integration (real apiserver) and e2e (full local cluster) suites,
# then the model runtime's suite.
test: venv realnode-prereqs binaries sysdeps lint
	$(BIN)/python -m pytest test/unit test/integration test/e2e
	$(MAKE) --no-print-directory test-runtime

# Brings up the full local cluster, runs the operator on the seed's phi-3 Workspace, prints the result.
# As root (CI, a dev VM) the CPU half runs on a real node; otherwise only the kwok GPU half runs.
demo: venv binaries realnode-prereqs
	$(BIN)/python hack/localcluster.py run --profile full $$([ "$$(id -u)" = 0 ] && echo --real-node) -- bash hack/demo.sh

clean:
	rm -rf $(VENV) $(RUNTIME_VENV) .pytest_cache .mypy_cache .ruff_cache
