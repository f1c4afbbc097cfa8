"""``ambient-agent install-cni``: put ambient-cni on the node and keep it there.

The shell around ``cni.install`` (which decides): it copies the plugin into
the host's CNI bin dir, writes the plugin's kubeconfig, chains the plugin
into the primary CNI configuration, and then checks all three once per
``--poll-interval`` (1 s by default) so that a primary CNI rewriting its
file (flannel, calico and cilium do on every restart) gets ambient-cni
chained again within a second. Polling rather than inotify: the standard
library has no inotify, the directory holds a handful of small files, and a
second of delay is well within what a pod start tolerates (a pod started in
that window runs without ambient-cni; the agent's reconciler still finds
it from /proc, see docs/ARCHITECTURE.md).

On SIGTERM/SIGINT with ``--uninstall-on-exit`` it restores the configs (byte
for byte when untouched since), deletes the plugin and the kubeconfig.

During an upgrade two installers run on a node (the chart surges the
DaemonSet: the new pod starts beside the old one). ``NodeClaim`` keeps them
from fighting: the newest one started manages the node, the other stands by,
and only the last one to exit uninstalls. Otherwise the old pod's exit would
unchain ambient-cni for up to a second, and pods started in that second
would run uncaptured until the agent's reconciler found them.

Every file is written atomically: a temporary file in the same directory,
fsync, rename, fsync of the directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import threading

from agent.fileio import atomic_write, fsync_dir
from cni import install

log = logging.getLogger("ambient-agent.install-cni")

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_PLUGIN_SOURCE = "/opt/ambient-cni"
BUNDLE_PREFIX = "ambient-cni-bundle-"


class InstallError(Exception):
    """Something install-cni cannot do; the message says what and where."""


# -- files ----------------------------------------------------------------------------------

def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None


# -- the plugin binary -----------------------------------------------------------------------

def bundle_digest(source: str) -> str:
    """A digest of a bundle directory's paths, modes and contents."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(source):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, source)
            st = os.lstat(path)
            h.update(f"{rel}\0{st.st_mode & 0o777}\0".encode())
            if os.path.islink(path):
                h.update(os.readlink(path).encode())
            else:
                with open(path, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
            h.update(b"\0")
    return h.hexdigest()


class PluginFiles:
    """The plugin in the CNI bin dir.

    A directory source is a PyInstaller onedir bundle (an ``ambient-cni``
    executable beside ``_internal/``): it is copied to
    ``<bin>/ambient-cni-bundle-<digest>/`` and ``<bin>/ambient-cni`` becomes a
    relative symlink to the executable in it; the bootloader resolves the
    link and finds its libraries. A new version is a new directory and an
    atomic swap of the link; old directories are removed after the swap.
    A file source (a single executable) is copied to ``<bin>/ambient-cni``.
    """

    def __init__(self, source: str, bin_dir: str) -> None:
        self.source = source
        self.bin_dir = bin_dir
        self.target = os.path.join(bin_dir, install.PLUGIN_TYPE)
        if os.path.isdir(source):
            if not os.access(os.path.join(source, install.PLUGIN_TYPE), os.X_OK):
                raise InstallError(f"plugin bundle {source} has no executable {install.PLUGIN_TYPE}")
            self.digest = bundle_digest(source)
            self.bundle_name: str | None = BUNDLE_PREFIX + self.digest[:16]
            self.link = f"{self.bundle_name}/{install.PLUGIN_TYPE}"
            self.data: bytes | None = None
        elif os.path.isfile(source):
            with open(source, "rb") as fh:
                self.data = fh.read()
            self.bundle_name = None
        else:
            raise InstallError(f"plugin source {source} does not exist (build it with `make cni-plugin`)")

    def ensure(self) -> bool:
        """Install or repair; True if something was written."""
        if not os.path.isdir(self.bin_dir):
            raise InstallError(f"CNI bin dir {self.bin_dir} does not exist")
        if self.bundle_name is None:
            assert self.data is not None        # a file source, read in __init__
            if _read(self.target) == self.data and os.access(self.target, os.X_OK):
                return False
            atomic_write(self.target, self.data, 0o755)
            return True
        changed = False
        bundle = os.path.join(self.bin_dir, self.bundle_name)
        if not os.access(os.path.join(bundle, install.PLUGIN_TYPE), os.X_OK):
            tmp = os.path.join(self.bin_dir, f".{self.bundle_name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(bundle, ignore_errors=True)
            shutil.copytree(self.source, tmp, symlinks=True)
            _fsync_tree(tmp)
            os.rename(tmp, bundle)
            changed = True
        try:
            current = os.readlink(self.target)
        except FileNotFoundError:
            current = None
        except OSError:                 # a regular file from an older install
            current = None
        if current != self.link:
            tmp = os.path.join(self.bin_dir, f".{install.PLUGIN_TYPE}.link-{os.getpid()}")
            _unlink(tmp)
            os.symlink(self.link, tmp)
            os.replace(tmp, self.target)
            changed = True
        if changed:
            fsync_dir(self.bin_dir)
            self._remove_bundles(keep=self.bundle_name)
        return changed

    def _remove_bundles(self, keep: str | None) -> None:
        for name in os.listdir(self.bin_dir):
            if name.startswith(BUNDLE_PREFIX) and name != keep:
                shutil.rmtree(os.path.join(self.bin_dir, name), ignore_errors=True)

    def remove(self) -> None:
        _unlink(self.target)
        self._remove_bundles(keep=None)


def _fsync_tree(top: str) -> None:
    for root, _dirs, files in os.walk(top):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(root)


# -- the plugin's kubeconfig ----------------------------------------------------------------------

class KubeconfigSource:
    """Renders the plugin's kubeconfig from the service account (re-read on
    every check: projected tokens are rotated by the kubelet)."""

    def __init__(self, server: str, token_file: str, ca_file: str) -> None:
        self.server, self.token_file, self.ca_file = server, token_file, ca_file

    def render(self) -> bytes:
        try:
            with open(self.token_file) as fh:
                token = fh.read().strip()
            with open(self.ca_file, "rb") as fh:
                ca = fh.read()
        except OSError as exc:
            raise InstallError(f"service account credentials: {exc.filename}: {exc.strerror}") from None
        if not token:
            raise InstallError(f"service account token {self.token_file} is empty")
        return install.render(install.kubeconfig(self.server, ca, token))


# -- the config directory --------------------------------------------------------------------------

class ConfDir:
    def __init__(self, path: str) -> None:
        self.path = path
        self.record_path = os.path.join(path, install.RECORD_NAME)

    def files(self) -> dict[str, bytes]:
        out = {}
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            raise InstallError(f"CNI config dir {self.path} does not exist") from None
        for name in names:
            if install.is_candidate(name) and os.path.isfile(os.path.join(self.path, name)):
                data = _read(os.path.join(self.path, name))
                if data is not None:
                    out[name] = data
        return out

    def records(self) -> list[install.Restore]:
        data = _read(self.record_path)
        if data is None:
            return []
        try:
            return install.decode_records(data)
        except ValueError as exc:
            raise InstallError(f"{self.record_path}: {exc}") from None

    def apply(self, plan: install.Plan, seen: dict[str, bytes]) -> bool:
        """Carry out ``plan``; False (nothing done) if a file changed since it was read."""
        for name in list(plan.writes) + plan.removes:
            if _read(os.path.join(self.path, name)) != seen.get(name):
                return False            # the primary CNI is writing right now: next round
        if plan.records:                # None: records unchanged; []: removed below
            atomic_write(self.record_path, install.encode_records(plan.records), 0o600)
        for name, data in plan.writes.items():
            old = os.path.join(self.path, name)
            mode = os.stat(old).st_mode & 0o777 if os.path.exists(old) else 0o644
            atomic_write(old, data, mode)
        for name in plan.removes:
            _unlink(os.path.join(self.path, name))
        if plan.records == []:
            _unlink(self.record_path)
        if plan.removes or plan.records == []:
            fsync_dir(self.path)
        return True


# -- several installers on one node (upgrades) ----------------------------------------------------

LOCK_NAME = ".ambient-cni.lock"     # hidden: never a CNI config candidate (install.is_candidate)
OWNER_NAME = ".ambient-cni.owner"


class NodeClaim:
    """Which of the installers running on a node manages it.

    ``.ambient-cni.lock`` in the config dir: every running installer holds a
    shared flock on it, so an exiting one learns whether it is the last (only
    then is an exclusive lock granted, and only then may it uninstall).
    ``.ambient-cni.owner``: the token of the installer that manages the node,
    the one started last (the new version during an upgrade); the others
    stand by. An owner that exits while others run removes its token, and the
    next installer to look claims the node. Both files go with the last
    installer. flock works across containers: they share the host's kernel
    and the hostPath.
    """

    def __init__(self, conf_dir: str, token: str | None = None) -> None:
        self.lock_path = os.path.join(conf_dir, LOCK_NAME)
        self.owner_path = os.path.join(conf_dir, OWNER_NAME)
        # Unique across containers, whose pids may be equal (each has its own pid namespace).
        self.token = (token or f"{os.getpid()}-{secrets.token_hex(8)}").encode()
        self._fd: int | None = None

    def join(self) -> None:
        """Count this installer in (shared lock) and make it the owner: it is the newest."""
        self._fd = self._open_locked(fcntl.LOCK_SH)
        atomic_write(self.owner_path, self.token, 0o600)

    def _open_locked(self, op: int) -> int:
        # The last installer unlinks the lock file; one that opened it just
        # before must not keep a lock on the unlinked file, which the next
        # installer could not see: lock, then check the path still names it.
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, op)
            try:
                st = os.stat(self.lock_path)
            except FileNotFoundError:
                st = None
            mine = os.fstat(fd)
            if st is not None and (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                return fd
            os.close(fd)

    def owns(self) -> bool:
        """Is this installer the one that manages the node (claiming it if nobody does)?"""
        current = _read(self.owner_path)
        if current is None:
            atomic_write(self.owner_path, self.token, 0o600)
            current = _read(self.owner_path)
            if current == self.token:
                log.info("the installer that managed this node has left: this one takes over")
        return current == self.token

    def leave(self) -> bool:
        """Stop taking part; True if this was the last installer (it may uninstall; call ``finish``)."""
        assert self._fd is not None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if _read(self.owner_path) == self.token:
                _unlink(self.owner_path)       # another installer takes over at its next round
            os.close(self._fd)
            self._fd = None
            return False
        return True

    def finish(self) -> None:
        """The last installer's files go (under the exclusive lock)."""
        _unlink(self.owner_path)
        _unlink(self.lock_path)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# -- the installer ---------------------------------------------------------------------------------

class Installer:
    def __init__(self, plugin: PluginFiles, conf_dir: str, entry: dict,
                 kubeconfig_out: str | None, kubeconfig_source: KubeconfigSource | None,
                 claim: NodeClaim | None = None) -> None:
        self.plugin = plugin
        self.conf = ConfDir(conf_dir)
        self.entry = entry
        self.kubeconfig_out = kubeconfig_out
        self.kubeconfig_source = kubeconfig_source
        # None: the only installer (--once, --uninstall); else it acts only while it owns the node.
        self.claim = claim
        self._last_report: str | None = None

    def _report(self, level: int, message: str) -> None:
        """Log a state once, not once a second."""
        if message != self._last_report:
            log.log(level, "%s", message)
            self._last_report = message

    def check(self) -> str:
        """One round: plugin, kubeconfig, config. Returns the config's status."""
        if self.claim is not None and not self.claim.owns():
            # A newer installer (an upgrade in progress) manages the node:
            # two would swap the plugin link back and forth every round.
            self._report(logging.INFO, "a newer install-cni manages this node; standing by")
            return "standby"
        if self.plugin.ensure():
            log.info("plugin installed: %s", self.plugin.target)
        if self.kubeconfig_source is not None and self.kubeconfig_out:
            data = self.kubeconfig_source.render()
            if _read(self.kubeconfig_out) != data:
                atomic_write(self.kubeconfig_out, data, 0o600)
                log.info("plugin kubeconfig written: %s", self.kubeconfig_out)
        files = self.conf.files()
        try:
            records = self.conf.records()
        except InstallError as exc:
            # Without records uninstall falls back to removing our entry.
            self._report(logging.ERROR, f"{exc}; restore records ignored")
            records = []
        plan = install.plan_install(files, self.entry, records)
        if plan.changes:
            if not self.conf.apply(plan, files):
                log.info("%s changed while being read: checking again", plan.primary)
                return "retry"
            log.info("%s", plan.message)
            self._last_report = None
        elif plan.status == "refused":
            self._report(logging.ERROR, f"primary CNI config {plan.message}")
        elif plan.status == "waiting":
            self._report(logging.WARNING, plan.message)
        else:
            self._report(logging.INFO, plan.message)
        return plan.status

    def uninstall(self) -> str:
        files = self.conf.files()
        try:
            records = self.conf.records()
        except InstallError as exc:
            log.error("%s: removing our entries without the original bytes", exc)
            records = []
        plan = install.plan_uninstall(files, records)
        if plan.changes and not self.conf.apply(plan, files):
            files = self.conf.files()        # raced with the primary CNI: once more
            plan = install.plan_uninstall(files, records)
            self.conf.apply(plan, files)
        if plan.records == [] and os.path.exists(self.conf.record_path):
            _unlink(self.conf.record_path)
        self.plugin.remove()
        if self.kubeconfig_out:
            _unlink(self.kubeconfig_out)
        log.info("uninstalled: %s; plugin and kubeconfig removed", plan.message)
        return plan.status


def run_loop(installer: Installer, interval: float, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            installer.check()
        except (InstallError, OSError) as exc:
            # Keep running: the next round may succeed (a dir mounted late,
            # a token not yet projected); the state is logged once.
            installer._report(logging.ERROR, f"install-cni: {exc}")
        except Exception:                  # a bug: say so, keep the node's CNI config watched
            log.exception("install-cni: unexpected error (retrying)")
        stop.wait(interval)


# -- command line ----------------------------------------------------------------------------------

def add_parser(sub) -> None:
    p = sub.add_parser("install-cni", help="install the ambient-cni plugin on this node and keep it chained",
                       description=__doc__.splitlines()[0])
    p.add_argument("--cni-bin-dir", default="/opt/cni/bin", help="host CNI plugin dir (as mounted here)")
    p.add_argument("--cni-conf-dir", default="/etc/cni/net.d", help="host CNI config dir (as mounted here)")
    p.add_argument("--plugin-source", default=DEFAULT_PLUGIN_SOURCE,
                   help="the self-contained plugin: a PyInstaller onedir bundle dir or one executable")
    p.add_argument("--agent-socket", default="/var/run/ambient-agent/agent.sock",
                   help="the node agent's socket, as the plugin sees it on the host")
    p.add_argument("--state", default="kube",
                   help="where the plugin reads pods: kube (the API, through --kubeconfig-out) or file:PATH")
    p.add_argument("--kubeconfig-out", default=None,
                   help="where to write the plugin's kubeconfig (default: <cni-conf-dir>/ambient-cni-kubeconfig)")
    p.add_argument("--kubeconfig-host-path", default=None,
                   help="that kubeconfig's path on the host, written into the plugin's config "
                        "(default: /etc/cni/net.d/ambient-cni-kubeconfig when --cni-conf-dir is under /host, "
                        "else --kubeconfig-out)")
    p.add_argument("--kube-server", default=None,
                   help="API server URL for the plugin (default: https://$KUBERNETES_SERVICE_HOST:PORT)")
    p.add_argument("--token-file", default=f"{SA_DIR}/token")
    p.add_argument("--ca-file", default=f"{SA_DIR}/ca.crt")
    p.add_argument("--exclude-namespace", action="append", dest="exclude_namespaces", default=None,
                   help="namespace never enrolled (repeatable; default kube-system)")
    p.add_argument("--agent-timeout", type=float, default=None, help="plugin's agent_timeout_seconds")
    p.add_argument("--plugin-log-file", default=None, help="host path of the plugin's log file")
    p.add_argument("--poll-interval", type=float, default=1.0, help="seconds between checks (default 1)")
    p.add_argument("--once", action="store_true", help="install, then exit (for an init container)")
    p.add_argument("--uninstall-on-exit", action="store_true",
                   help="on SIGTERM/SIGINT restore the CNI configs and delete the plugin and kubeconfig")
    p.add_argument("--uninstall", action="store_true", help="uninstall now, then exit")
    p.set_defaults(func=main)


def _host_kubeconfig_path(args) -> str:
    if args.kubeconfig_host_path:
        return args.kubeconfig_host_path
    conf_dir = os.path.normpath(args.cni_conf_dir)
    if conf_dir.startswith("/host/"):
        # The chart mounts the host's dirs under /host: the host sees them without it.
        return os.path.join(conf_dir[len("/host"):], install.KUBECONFIG_NAME)
    return args.kubeconfig_out


def build(args) -> Installer:
    args.kubeconfig_out = args.kubeconfig_out or os.path.join(args.cni_conf_dir, install.KUBECONFIG_NAME)
    source = None
    host_kubeconfig = None
    if args.state == "kube":
        server = args.kube_server
        if not server:
            try:
                server = install.api_server_url(os.environ.get("KUBERNETES_SERVICE_HOST", ""),
                                                os.environ.get("KUBERNETES_SERVICE_PORT", ""))
            except ValueError as exc:
                raise InstallError(str(exc)) from None
        source = KubeconfigSource(server, args.token_file, args.ca_file)
        host_kubeconfig = _host_kubeconfig_path(args)
    elif not args.state.startswith("file:"):
        raise InstallError(f"--state {args.state!r}: expected kube or file:PATH")
    else:
        args.kubeconfig_out = None
    entry = install.plugin_entry(args.agent_socket, args.state, host_kubeconfig,
                                 args.exclude_namespaces if args.exclude_namespaces is not None
                                 else ("kube-system",),
                                 args.agent_timeout, args.plugin_log_file)
    # The entry must be one the plugin accepts: check it with the plugin's own parser.
    from cni.config import CniError, parse_config
    try:
        parse_config(json.dumps(dict(entry, cniVersion="1.0.0", name="check")).encode(), "DEL")
    except CniError as exc:
        raise InstallError(f"the plugin would refuse this entry: {exc}") from None
    return Installer(PluginFiles(args.plugin_source, args.cni_bin_dir), args.cni_conf_dir, entry,
                     args.kubeconfig_out, source)


def main(args) -> int:
    try:
        installer = build(args)
    except InstallError as exc:
        log.error("%s", exc)
        return 2
    if args.uninstall:
        installer.uninstall()
        return 0
    if args.once:
        try:
            status = installer.check()
        except (InstallError, OSError) as exc:
            log.error("%s", exc)
            return 1
        return 0 if status in ("installed", "updated", "unchanged") else 1

    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("%s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    installer.claim = NodeClaim(args.cni_conf_dir)
    try:
        installer.claim.join()
    except OSError as exc:
        log.error("cannot take part in %s: %s", installer.claim.lock_path, exc)
        return 1
    log.info("watching %s every %g s (plugin %s, agent socket %s, state %s)", args.cni_conf_dir,
             args.poll_interval, installer.plugin.target, args.agent_socket, args.state)
    run_loop(installer, args.poll_interval, stop)
    if not installer.claim.leave():
        log.info("another install-cni runs on this node (an upgrade): ambient-cni stays installed")
        return 0
    if args.uninstall_on_exit:
        installer.uninstall()
    installer.claim.finish()
    return 0
