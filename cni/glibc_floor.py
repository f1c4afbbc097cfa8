"""The oldest glibc the ambient-cni bundle may need on a node (issue 16, item 2).

The one place this number lives: ``make cni-plugin`` builds the Python that
PyInstaller freezes for this floor (``cni/build-floor-python.sh`` with
``zig cc -target x86_64-linux-gnu.<floor>``), and
``tests/cni/test_python_free.py`` checks every ELF file of the bundle with
``objdump -T`` against it, so the floor cannot creep up unnoticed.

2.28 is RHEL 8's glibc, the oldest of the node OSes people use (Amazon
Linux 2023 has 2.34, Ubuntu 20.04 2.31, Debian 11 2.31). Nothing in this
package imports this module at run time.
"""

GLIBC_FLOOR = "2.28"
