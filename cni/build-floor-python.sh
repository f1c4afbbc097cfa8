#!/bin/bash
# A CPython 3.11 (with OpenSSL, zlib and libffi) whose every ELF file needs
# glibc <= FLOOR, and a virtualenv of it with PyInstaller: what
# `make cni-plugin` freezes the ambient-cni bundle with (issue 16, item 2).
#
#   cni/build-floor-python.sh OUT FLOOR       # e.g. build/glibc-floor 2.28
#
# Compiler: zig's `cc -target x86_64-linux-gnu.FLOOR` (PyPI `ziglang`), which
# links against glibc symbol versions no newer than FLOOR whatever glibc the
# build machine has. Sources: Debian's source archive (`apt-get source`,
# with a private sources list and lists directory under OUT: the machine's
# apt configuration is not touched). OpenSSL, zlib and libffi are static
# (linked into _ssl, _hashlib, zlib and _ctypes), so the bundle ships no
# libssl/libcrypto/libz of its own.
#
# Idempotent: OUT/venv/.floor-key holds a digest of this script, FLOOR and
# the PyInstaller version; when it matches, nothing is done. Takes about
# 4-5 minutes on 2 cores from nothing (OpenSSL is half of it); CI starts
# from a fresh clone, so it pays that once per run.
set -euo pipefail

OUT=$(realpath -m "${1:?usage: $0 OUT FLOOR}")
FLOOR=${2:?usage: $0 OUT FLOOR}
PYINSTALLER_VER=${PYINSTALLER_VER:-6.22.3}
ZIGLANG_VER=${ZIGLANG_VER:-0.17.1}
PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-$(nproc)}

KEY=$( (cat "$0"; echo "$FLOOR $PYINSTALLER_VER $ZIGLANG_VER") | sha256sum | cut -c1-16)
mkdir -p "$OUT"
# Two builds at once (two test runs calling `make cni-plugin`) would delete
# each other's work tree: one at a time, the second finds the first's result.
exec 9>"$OUT/.lock"
flock 9
if [ "$(cat "$OUT/venv/.floor-key" 2>/dev/null)" = "$KEY" ]; then
  exit 0
fi
stage() { echo "  $1 (${SECONDS}s)"; }
echo "building CPython for glibc <= $FLOOR in $OUT (a few minutes, once)"
rm -rf "$OUT/work" "$OUT/prefix" "$OUT/venv" "$OUT/bin"
mkdir -p "$OUT/src" "$OUT/work" "$OUT/bin" "$OUT/apt/lists/partial"
PREFIX=$OUT/prefix
BIN=$OUT/bin

# -- the toolchain --------------------------------------------------------------
[ -x "$OUT/tools/bin/python" ] || "$PYTHON" -m venv "$OUT/tools"
"$OUT/tools/bin/python" -c "import ziglang" 2>/dev/null \
  || "$OUT/tools/bin/pip" install -q "ziglang==$ZIGLANG_VER"
ZIG=$(ls -d "$OUT"/tools/lib/python3*/site-packages/ziglang)/zig
[ -x "$ZIG" ]
for tool in cc c++; do
  cat > "$BIN/$tool" <<EOF
#!/bin/bash
# zig $tool for glibc <= $FLOOR (written by cni/build-floor-python.sh).
args=()
for a in "\$@"; do
  case "\$a" in
    -Wl,-h*) args+=("-Wl,-soname,\${a#-Wl,-h}") ;;   # zig's linker has no -h
    *) args+=("\$a") ;;
  esac
  case "\$a" in *.c|*.o|*.a|*.s|*.S|*.cpp|*.cc) sources=1 ;; -shared) shared=1 ;; esac
done
# A link of shared libraries alone (CPython's libpython3.so) goes to clang's
# driver, which refuses the glibc-versioned triple: give it an empty source.
if [ -n "\${shared:-}" ] && [ -z "\${sources:-}" ]; then args+=("$BIN/empty.c"); fi
# -Wno-error=date-time: zig makes __DATE__ an error; CPython's getbuildinfo uses it.
exec "$ZIG" $tool -target x86_64-linux-gnu.$FLOOR -Wno-error=date-time "\${args[@]}"
EOF
  chmod +x "$BIN/$tool"
done
: > "$BIN/empty.c"
printf '#!/bin/sh\nexec "%s" ar "$@"\n' "$ZIG" > "$BIN/ar"
printf '#!/bin/sh\nexec "%s" ranlib "$@"\n' "$ZIG" > "$BIN/ranlib"
chmod +x "$BIN/ar" "$BIN/ranlib"
export CC=$BIN/cc CXX=$BIN/c++ AR=$BIN/ar RANLIB=$BIN/ranlib
# zig's caches (compiled libc stubs, dependency files) under OUT, not in $HOME.
export ZIG_GLOBAL_CACHE_DIR=$OUT/zig-cache ZIG_LOCAL_CACHE_DIR=$OUT/zig-cache

# -- sources ----------------------------------------------------------------------
APT=(-o "Dir::Etc::SourceList=$OUT/apt/sources.list" -o Dir::Etc::SourceParts=/nonexistent
     -o "Dir::State::Lists=$OUT/apt/lists")
need=()
for pkg in python3.11 openssl zlib libffi; do
  ls "$OUT"/src/${pkg}_*.orig.tar.* >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main" \
    > "$OUT/apt/sources.list"
  apt-get -qq "${APT[@]}" update
  (cd "$OUT/src" && apt-get -qq "${APT[@]}" source --download-only "${need[@]}" 2>&1 | grep -v unsandboxed || true)
fi
unpack() {   # unpack PKG: the orig tarball into work/, prints the directory
  local tarball
  tarball=$(ls "$OUT"/src/"$1"_*.orig.tar.* | grep -v '\.asc$' | head -n1)
  tar -C "$OUT/work" -xf "$tarball"
  ls -d "$OUT"/work/"$2"* | head -n1
}

# -- zlib, OpenSSL, libffi: static, position-independent ----------------------------
stage zlib
dir=$(unpack zlib zlib-)
(cd "$dir" && CFLAGS="-O2 -fPIC" ./configure --static --prefix="$PREFIX" >/dev/null \
   && make -j"$JOBS" libz.a >/dev/null && make install >/dev/null)

stage OpenSSL
dir=$(unpack openssl openssl-)
# Only what _ssl and _hashlib use (TLS 1.2/1.3 to the API server, the usual
# hashes): no engines, no loadable modules, no legacy or national ciphers.
# A third less to compile.
(cd "$dir" && ./Configure linux-x86_64 no-shared no-tests no-module no-engine no-dso no-legacy no-comp \
   no-idea no-seed no-camellia no-aria no-whirlpool no-mdc2 no-md4 no-rc2 no-rc4 no-rc5 no-bf no-cast \
   no-srp no-gost no-sm2 no-sm3 no-sm4 no-cms no-ts no-ct no-ssl3 no-siphash no-cmp no-ui-console \
   --prefix="$PREFIX" --libdir=lib --openssldir=/etc/ssl >/dev/null \
   && make -j"$JOBS" build_libs >/dev/null && make install_dev >/dev/null)

stage libffi
dir=$(unpack libffi libffi-)
# --disable-exec-static-tramp: libffi 3.4.4's trampoline code does not build with clang 16+.
(cd "$dir" && CFLAGS="-O2 -fPIC" ./configure --prefix="$PREFIX" --libdir="$PREFIX/lib" --disable-shared \
   --enable-static --with-pic --disable-docs --disable-multi-os-directory --disable-exec-static-tramp >/dev/null \
   && make -j"$JOBS" >/dev/null 2>&1 && make install >/dev/null 2>&1)

# -- CPython ------------------------------------------------------------------------
stage CPython
dir=$(unpack python3.11 Python-3.11)
# setup.py adds the build machine's /usr/include, /usr/include/<multiarch>
# and /usr/local to every extension's flags; their glibc headers clash with
# zig's. Only our prefix is searched.
"$PYTHON" - "$dir/setup.py" <<'EOF'
import sys
path = sys.argv[1]
text = open(path).read()
for old, new in [
    ("        if not CROSS_COMPILING:\n            add_dir_to_list(self.compiler.library_dirs, '/usr/local/lib')\n"
     "            add_dir_to_list(self.compiler.include_dirs, '/usr/local/include')\n", ""),
    ("        self.add_multiarch_paths()\n", ""),
    ("        system_lib_dirs = ['/lib64', '/usr/lib64', '/lib', '/usr/lib']\n", "        system_lib_dirs = []\n"),
    ("        system_include_dirs = ['/usr/include']\n", "        system_include_dirs = []\n"),
]:
    assert text.count(old) == 1, old
    text = text.replace(old, new)
open(path, "w").write(text)
EOF
# Modules the plugin and PyInstaller never use: not built.
cat > "$dir/Modules/Setup.local" <<'EOF'
*disabled*
_testcapi _testinternalcapi _testbuffer _testimportmultiple _testmultiphase _testclinic _xxtestfuzz
_ctypes_test xxlimited xxlimited_35 xxsubtype _xxsubinterpreters _tkinter _curses _curses_panel _dbm _gdbm
nis readline _sqlite3 _decimal
EOF
# The second make: zig 0.17 in a parallel build has now and then failed
# with "failed to parse 'tmp/<hash>-fileio.o.d'" (its dependency file);
# make resumes where it stopped. TESTSUBDIRS=: CPython's own test suite is
# neither installed nor byte-compiled (three times).
# OPT: CPython's default without -g (PyInstaller strips it anyway) and -O2: faster to build.
(cd "$dir" && PKG_CONFIG_LIBDIR="$PREFIX/lib/pkgconfig" CPPFLAGS="-I$PREFIX/include" LDFLAGS="-L$PREFIX/lib" \
   OPT="-DNDEBUG -fwrapv -O2 -Wall" \
   ./configure --prefix="$PREFIX/python" --enable-shared --with-openssl="$PREFIX" --with-ensurepip=no \
   >"$OUT/work/python-configure.log" 2>&1 \
   && { make -j"$JOBS" >"$OUT/work/python-make.log" 2>&1 \
        || make -j"$JOBS" >>"$OUT/work/python-make.log" 2>&1; } \
   && make install TESTSUBDIRS= >"$OUT/work/python-install.log" 2>&1) \
  || { tail -40 "$OUT"/work/python-*.log >&2; exit 1; }
export LD_LIBRARY_PATH=$PREFIX/python/lib
"$PREFIX/python/bin/python3.11" -c "import ssl, zlib, ctypes, hashlib, json, socket"

# -- the virtualenv PyInstaller runs in ---------------------------------------------
stage "PyInstaller virtualenv"
"$PREFIX/python/bin/python3.11" -m venv "$OUT/venv"
"$OUT/venv/bin/pip" install -q "pyinstaller==$PYINSTALLER_VER" "PyYAML>=6"
"$OUT/venv/bin/python" -c "import PyInstaller, yaml"
echo "$KEY" > "$OUT/venv/.floor-key"
echo "CPython for glibc <= $FLOOR ready after ${SECONDS}s: $OUT/venv (LD_LIBRARY_PATH=$PREFIX/python/lib)"
