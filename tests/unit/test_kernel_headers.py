"""Which kernel headers the loader gives BCC, and how the bundle is made.

The choice is pure (table below). Bundling runs on a small fake Debian
header tree in a temporary directory; tests/lab/test_no_host_headers.py
compiles the real programs against the real bundle.
"""

from __future__ import annotations

import os

import pytest

from agent.capture import kernel_headers as kh
from agent.capture.kernel_headers import BUNDLED_DIR, HeaderChoice, HeadersError

BUNDLE_OK = {BUNDLED_DIR, "/opt/headers"}


@pytest.mark.parametrize("setting,bcc_env,present,expected", [
    # auto: an operator's BCC_KERNEL_SOURCE, then the bundle, then the host.
    ("auto", None, BUNDLE_OK, HeaderChoice(BUNDLED_DIR, "bundled")),
    ("", None, BUNDLE_OK, HeaderChoice(BUNDLED_DIR, "bundled")),
    ("auto", "/srv/k", BUNDLE_OK, HeaderChoice("/srv/k", "BCC_KERNEL_SOURCE")),
    ("auto", None, set(), HeaderChoice(None, "host")),
    ("auto", "", set(), HeaderChoice(None, "host")),
    # host: BCC's own search, even with a bundle and an inherited BCC_KERNEL_SOURCE.
    ("host", "/srv/k", BUNDLE_OK, HeaderChoice(None, "host")),
    # a path: used as given when it holds a tree.
    ("/opt/headers", "/srv/k", BUNDLE_OK, HeaderChoice("/opt/headers", "flag")),
])
def test_choice(setting, bcc_env, present, expected):
    assert kh.choose(setting, bcc_env, lambda path: path in present) == expected


@pytest.mark.parametrize("setting,message", [
    ("/opt/empty", "not a kernel header tree"),
    ("relative/dir", "expected 'auto', 'host' or an absolute path"),
])
def test_a_setting_that_cannot_work_is_refused_before_bcc_sees_it(setting, message):
    # BCC itself would fall back to `modprobe kheaders` and a compile error much later.
    with pytest.raises(HeadersError, match=message):
        kh.choose(setting, None, lambda path: False)


def test_host_choice_says_where_bcc_looks():
    assert "/lib/modules/$(uname -r)/build" in HeaderChoice(None, "host").describe()
    assert HeaderChoice(BUNDLED_DIR, "bundled").describe() == f"{BUNDLED_DIR} (bundled)"


@pytest.mark.parametrize("makefile,flavour,common", [
    ("include /usr/src/linux-headers-6.1.0-57-common/Makefile\n", "/usr/src/linux-headers-6.1.0-57-amd64",
     "/usr/src/linux-headers-6.1.0-57-common"),
    ("# no include line\n", "/x/linux-headers-6.1.0-9-cloud-amd64", "/x/linux-headers-6.1.0-9-cloud-common"),
])
def test_common_tree_of_a_flavour(makefile, flavour, common):
    assert kh.common_dir_of(makefile, flavour) == common


def test_origin_line_names_package_and_debian_version():
    assert kh.origin_line("/usr/src/linux-headers-6.1.0-57-amd64/",
                          '#define LINUX_PACKAGE_ID " Debian 6.1.192-3"\n') == \
        "linux-headers-6.1.0-57-amd64 (Debian 6.1.192-3)"
    assert kh.origin_line("/usr/src/linux-headers-x", "") == "linux-headers-x"


def test_plan_merges_common_and_generated_into_one_tree():
    plan = dict((dst, src) for src, dst in kh.bundle_plan("/C", "/F", ["x86"]))
    assert plan == {
        "include/linux": "/C/include/linux", "include/uapi": "/C/include/uapi",
        "include/asm-generic": "/C/include/asm-generic", "include/vdso": "/C/include/vdso",
        "include/generated": "/F/include/generated",
        "arch/x86/include/asm": "/C/arch/x86/include/asm", "arch/x86/include/uapi": "/C/arch/x86/include/uapi",
        "arch/x86/include/generated": "/F/arch/x86/include/generated",
    }


def _write(path, text="x\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _fake_debian(root):
    common, flavour = root / "linux-headers-6.1.0-9-common", root / "linux-headers-6.1.0-9-amd64"
    _write(flavour / "Makefile", f"include {common}/Makefile\n")
    _write(flavour / "include/generated/autoconf.h", "#define CONFIG_X86_64 1\n")
    _write(flavour / "include/generated/package.h", '#define LINUX_PACKAGE_ID " Debian 6.1.99-1"\n')
    _write(flavour / "arch/x86/include/generated/asm/foo.h")
    for d in ("include/linux/kconfig.h", "include/uapi/linux/bpf.h", "include/asm-generic/a.h",
              "include/vdso/v.h", "include/net/sock.h", "include/dt-bindings/d.h",
              "arch/x86/include/asm/page.h", "arch/x86/include/uapi/asm/b.h", "arch/x86/Makefile"):
        _write(common / d)
    return flavour


def test_bundle_is_trimmed_merged_and_idempotent(tmp_path):
    flavour = _fake_debian(tmp_path / "src")
    dest = tmp_path / "out" / "kernel-headers"
    assert kh.find_flavour(str(tmp_path / "src")) == str(flavour)
    assert kh.bundle(str(dest), str(flavour)) is True
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert files == ["ORIGIN", "arch/x86/include/asm/page.h", "arch/x86/include/generated/asm/foo.h",
                     "arch/x86/include/uapi/asm/b.h", "include/asm-generic/a.h",
                     "include/generated/autoconf.h", "include/generated/package.h",
                     "include/linux/kconfig.h", "include/uapi/linux/bpf.h", "include/vdso/v.h"]
    assert kh.usable(str(dest)) and kh.origin(str(dest)) == "linux-headers-6.1.0-9-amd64 (Debian 6.1.99-1)"
    inode = dest.stat().st_ino
    assert kh.bundle(str(dest), str(flavour)) is False          # up to date: untouched
    assert dest.stat().st_ino == inode
    # A new package version remakes it (renamed into place, no leftovers beside it).
    _write(flavour / "include/generated/package.h", '#define LINUX_PACKAGE_ID " Debian 6.1.100-1"\n')
    assert kh.bundle(str(dest), str(flavour)) is True
    assert kh.origin(str(dest)).endswith("(Debian 6.1.100-1)")
    assert os.listdir(dest.parent) == ["kernel-headers"]


def test_bundle_of_an_incomplete_package_fails_and_leaves_nothing(tmp_path):
    flavour = _fake_debian(tmp_path / "src")
    (tmp_path / "src/linux-headers-6.1.0-9-common/include/vdso/v.h").unlink()
    (tmp_path / "src/linux-headers-6.1.0-9-common/include/vdso").rmdir()
    dest = tmp_path / "out" / "kernel-headers"
    with pytest.raises(HeadersError, match="include/vdso: missing"):
        kh.bundle(str(dest), str(flavour))
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_no_headers_package_is_a_clear_error(tmp_path):
    with pytest.raises(HeadersError, match="apt-get install linux-headers"):
        kh.find_flavour(str(tmp_path))
