# ambient-agent image: the node agent (`ambient-agent run`), the CA
# (`ambient-agent ca`) and the CNI plugin (`ambient-cni`) in one image.
#
#   make image            # or: docker build -t ambient-agent:dev .
#
# BCC and kernel headers
# ----------------------
# BCC (Debian's python3-bpfcc over libbpfcc, with its own clang/LLVM) compiles
# bpf/*.c once at each agent start, with -D__KERNEL__, against a kernel header
# tree. The programs use only UAPI types, whose layouts do not change between
# kernels, so the image carries one tree for every node: Debian 12's 6.1
# linux-headers, trimmed to the UAPI and arch directories and merged into the
# single-tree layout BCC expects (agent/capture/kernel_headers.py; `make
# kernel-headers` runs the same script), at /usr/share/ambient-agent/kernel-headers.
# The loader points BCC_KERNEL_SOURCE at it: the node needs no headers package,
# and nothing of the host's /lib/modules or /usr/src is mounted. It is made in
# its own stage because linux-headers-* pulls gcc and kbuild, which the final
# image does not need. To compile against the host's headers instead (mounted
# /lib/modules and /usr/src, or CONFIG_IKHEADERS), set
# AMBIENT_AGENT_KERNEL_HEADERS=host; see docs/CAPTURE.md, "Kernel headers".
# Nothing in the image is compiled at build time, except the CNI plugin bundle.
#
# The ambient-cni plugin bundle
# -----------------------------
# kubelet's runtime executes CNI plugins on the host, where no Python may
# exist. The first stage freezes the plugin with PyInstaller (onedir: an
# `ambient-cni` executable beside `_internal/` holding libpython and the few
# modules it imports; see `make cni-plugin`) into /opt/ambient-cni, which
# `ambient-agent install-cni` copies into the host's CNI bin dir. The bundle
# must load on nodes with glibc >= cni/glibc_floor.py's floor (2.28, RHEL 8),
# lower than bookworm's 2.36: PyInstaller runs on a CPython, OpenSSL, zlib
# and libffi built for that floor with zig cc (cni/build-floor-python.sh,
# as `make cni-plugin` does; several minutes, in a layer of its own).
FROM debian:bookworm-slim AS cni-plugin

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv binutils make perl bzip2 xz-utils \
      pkg-config ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY cni/build-floor-python.sh cni/glibc_floor.py ./cni/
RUN floor=$(sed -n 's/^GLIBC_FLOOR = "\([0-9.]*\)".*/\1/p' cni/glibc_floor.py) \
 && PYINSTALLER_VER=6.22.3 bash cni/build-floor-python.sh /build/glibc-floor "$floor" \
 && rm -rf /build/glibc-floor/work /build/glibc-floor/src
COPY agent ./agent
COPY cni ./cni
RUN LD_LIBRARY_PATH=/build/glibc-floor/prefix/python/lib /build/glibc-floor/venv/bin/python -m PyInstaller \
      --noconfirm --log-level WARN --distpath /out --workpath /build/work cni/ambient-cni.spec \
 && CNI_COMMAND=VERSION /out/ambient-cni/ambient-cni

FROM debian:bookworm-slim AS kernel-headers

ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 "linux-headers-$(dpkg --print-architecture)" \
 && rm -rf /var/lib/apt/lists/*
COPY agent/capture/kernel_headers.py /kernel_headers.py
RUN python3 /kernel_headers.py bundle --to /out/kernel-headers

FROM debian:bookworm-slim

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
 && rm -rf /var/lib/apt/lists/*

# A virtualenv for the project's dependencies; Debian's bcc package (pure
# Python over libbcc) is exposed to it alone, as the Makefile does for .venv.
RUN python3 -m venv /opt/ambient-agent \
 && mkdir -p /opt/ambient-agent/debian-bcc \
 && ln -s /usr/lib/python3/dist-packages/bcc /opt/ambient-agent/debian-bcc/bcc \
 && echo /opt/ambient-agent/debian-bcc \
      > "$(/opt/ambient-agent/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/debian-bcc.pth"

# The kernel headers BCC compiles against (see "BCC and kernel headers" above).
COPY --from=kernel-headers /out/kernel-headers /usr/share/ambient-agent/kernel-headers

WORKDIR /src
COPY pyproject.toml README.md ./
COPY agent ./agent
COPY cni ./cni
COPY bpf ./bpf
RUN /opt/ambient-agent/bin/pip install . \
 && /opt/ambient-agent/bin/python -c 'import agent.cli, cni.plugin, bcc' \
 && /opt/ambient-agent/bin/python -c 'from agent.capture import kernel_headers as k; assert k.usable(k.BUNDLED_DIR)' \
 && cd / && rm -rf /src

# The self-contained plugin, for `ambient-agent install-cni --plugin-source /opt/ambient-cni`.
COPY --from=cni-plugin /out/ambient-cni /opt/ambient-cni

ENV PATH=/opt/ambient-agent/bin:$PATH
WORKDIR /
# The node agent runs as root with explicit capabilities (see the chart's
# values.yaml); the CA runs as uid 1337 (set by the chart).
ENTRYPOINT ["ambient-agent"]
CMD ["--help"]
