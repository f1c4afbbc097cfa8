"""Entry point of the self-contained ambient-cni bundle.

PyInstaller (``make cni-plugin``) freezes this script with the interpreter
and the few modules the plugin imports into ``build/cni/ambient-cni/``: an
``ambient-cni`` executable beside ``_internal/``. kubelet's runtime runs the
plugin in the host's mount namespace, where no Python needs to exist.
"""

import sys

from cni.plugin import main

if __name__ == "__main__":
    sys.exit(main())
