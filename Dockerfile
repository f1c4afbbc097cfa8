# ambient-agent image: the node agent (`ambient-agent run`), the CA
# (`ambient-agent ca`) and the CNI plugin (`ambient-cni`) in one image.
#
#   make image            # or: docker build -t ambient-agent:dev .
#
# BCC and kernel headers
# ----------------------
# BCC (Debian's python3-bpfcc over libbpfcc, with its own clang/LLVM) compiles
# bpf/*.c on the node at agent start, against the headers of the kernel that
# runs there, which the image cannot know in advance. BCC looks for them in
# /lib/modules/$(uname -r)/build (and .../source), usually symlinks into
# /usr/src/linux-headers-*. A real node needs one of:
#   1. (what the Helm chart does) mount the host's /lib/modules and /usr/src
#      read-only at the same paths, with the node's headers package installed
#      on the host (Debian/Ubuntu: linux-headers-$(uname -r));
#   2. build a per-kernel image with the matching headers package:
#        docker build --build-arg LINUX_HEADERS=linux-headers-6.1.0-28-amd64 .
#      (only works when every node runs exactly that kernel);
#   3. kernels built with CONFIG_IKHEADERS: BCC extracts
#      /sys/kernel/kheaders.tar.xz itself (after `modprobe kheaders` on the
#      host), no mount needed.
# Nothing in the image is compiled at build time, except the CNI plugin bundle.
#
# The ambient-cni plugin bundle
# -----------------------------
# kubelet's runtime executes CNI plugins on the host, where no Python may
# exist. The first stage freezes the plugin with PyInstaller (onedir: an
# `ambient-cni` executable beside `_internal/` holding libpython and the few
# modules it imports; see `make cni-plugin`) into /opt/ambient-cni, which
# `ambient-agent install-cni` copies into the host's CNI bin dir. PyInstaller
# needs a shared libpython: Debian's python3 has one in libpython3.11.
# The bundle needs the host's glibc to be at least the build stage's
# (bookworm: 2.36); older node distributions need an older build stage.
FROM debian:bookworm-slim AS cni-plugin

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv libpython3.11 binutils \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /build/venv && /build/venv/bin/pip install "pyinstaller==6.22.3" "PyYAML>=6"
WORKDIR /src
COPY agent ./agent
COPY cni ./cni
RUN /build/venv/bin/python -m PyInstaller --noconfirm --log-level WARN --distpath /out --workpath /build/work \
      cni/ambient-cni.spec \
 && CNI_COMMAND=VERSION /out/ambient-cni/ambient-cni

FROM debian:bookworm-slim

ARG LINUX_HEADERS=""

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# python3-bpfcc pulls libbpfcc (BCC with its embedded clang). iproute2 and
# bpftool are for debugging on a node (`kubectl exec ... bpftool prog`).
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-venv python3-bpfcc \
      iproute2 bpftool ca-certificates \
      ${LINUX_HEADERS} \
 && rm -rf /var/lib/apt/lists/*

# A virtualenv for the project's dependencies; Debian's bcc package (pure
# Python over libbcc) is exposed to it alone, as the Makefile does for .venv.
RUN python3 -m venv /opt/ambient-agent \
 && mkdir -p /opt/ambient-agent/debian-bcc \
 && ln -s /usr/lib/python3/dist-packages/bcc /opt/ambient-agent/debian-bcc/bcc \
 && echo /opt/ambient-agent/debian-bcc \
      > "$(/opt/ambient-agent/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/debian-bcc.pth"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY agent ./agent
COPY cni ./cni
COPY bpf ./bpf
RUN /opt/ambient-agent/bin/pip install . \
 && /opt/ambient-agent/bin/python -c 'import agent.cli, cni.plugin, bcc' \
 && cd / && rm -rf /src

# The self-contained plugin, for `ambient-agent install-cni --plugin-source /opt/ambient-cni`.
COPY --from=cni-plugin /out/ambient-cni /opt/ambient-cni

ENV PATH=/opt/ambient-agent/bin:$PATH
WORKDIR /
# The node agent runs as root with explicit capabilities (see the chart's
# values.yaml); the CA runs as uid 1337 (set by the chart).
ENTRYPOINT ["ambient-agent"]
CMD ["--help"]
