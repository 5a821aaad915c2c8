"""A lab host booted under a real systemd: Debian bookworm in systemd-nspawn (root only).

:func:`build_rootfs` makes (once, cached) a bookworm root file system with ``mmdebstrap
--variant=apt``: systemd, dbus, iproute2, iptables, Debian's docker.io (dockerd, containerd, runc)
and the shared libraries the host's Python links against, so that the repository's virtualenv runs
inside unchanged. The tree lives in ``<cache_dir>/bookworm-<hash of the recipe>``; it is built in a
temporary directory next to it and renamed at the end, so a half-built tree is never used.

:class:`SystemdHost` boots that tree as one host of a :class:`lab.netns.Lab`: the container joins an
existing lab namespace (``--network-namespace-path``), so it has exactly that namespace's links,
addresses and firewall, and nothing of the root namespace. The cached tree is the lower layer of an
overlay whose upper layer is a per-boot directory in the lab's temporary directory, so every boot
starts from the same clean tree (files written with :meth:`SystemdHost.write_file` before the boot
land in the upper layer). :func:`python_binds` gives the read-only bind mounts of the host's Python
prefix and of the repository at the same paths, so ``<repo>/.venv/bin/flanneld-py`` runs inside.

What the container needs beyond a plain ``systemd-nspawn --boot``, each one met on this machine
(Debian 12 host without systemd as PID 1, cgroup v1 with a unified ``systemd`` hierarchy):

* No system bus and no machined: ``--register=no --keep-unit``.
* ``/run`` is not a tmpfs and nspawn refuses to clean its propagation directory on it: nspawn runs
  in a private mount namespace (``unshare --mount``) with a tmpfs on ``/run/systemd``; the overlay
  root is mounted there too, so every mount of the container vanishes with it.
* Without a dedicated cgroup nspawn puts ``payload``/``supervisor`` cgroups (and docker its
  ``docker`` cgroups) at the root of the host's hierarchies and leaves them behind: the launcher
  first moves itself into ``<own cgroup>/flanneld-py-nspawn-<machine>`` in every hierarchy (this
  is the container's cgroup-namespace root), removed again by :meth:`SystemdHost.stop`.
* nspawn mounts the cgroup v1 controllers read-only (runc: ``mkdir /sys/fs/cgroup/cpuset/docker:
  read-only file system``; ``SYSTEMD_NSPAWN_API_VFS_WRITABLE`` does not change that, and
  ``SYSTEMD_NSPAWN_USE_CGNS=0`` fails here with "Failed to read link /sys/fs/cgroup/net_prio"),
  and systemd picks the controllers it may use once, at startup, skipping read-only ones (then
  ``DeviceAllow=`` is silently not enforced and ``Delegate=`` units get no controller cgroups).
  So PID 1 is first a small shell (:data:`_INIT`) that remounts them ``remount,bind,rw`` (a plain
  ``remount,rw`` of ``memory`` fails: "mount point is busy") and then execs systemd; that is
  nspawn without ``--boot`` but with ``--boot``'s ``--kill-signal=SIGRTMIN+3``.
* nspawn drops ``CAP_NET_ADMIN`` unless it made the network namespace itself (iptables: "Could not
  fetch rule set generation id: Permission denied"): ``--capability=CAP_NET_ADMIN``.
* ``/proc/sys`` is read-only (dockerd cannot switch on ``ip_forward``):
  ``SYSTEMD_NSPAWN_API_VFS_WRITABLE=network`` makes ``/proc/sys/net`` writable, nothing else.
* nspawn's seccomp filter answers ``keyctl`` with EPERM (runc: "unable to join session keyring"):
  ``--system-call-filter=add_key keyctl request_key``.
* overlay2 cannot use the container's overlayfs root ("failed to mount overlay: invalid argument"):
  ``/var/lib/docker`` is a bind mount of a directory on the host's file system, so dockerd keeps its
  default configuration (overlay2, cgroupfs driver, no ``daemon.json``).

Processes are ended by PID only: SIGTERM to nspawn (it halts the container's systemd), then SIGKILL
of the container's PID 1 (which kills its whole PID namespace) and of nspawn.

Typical use::

    with Lab() as lab:
        ns = lab.netns("h1")
        host = SystemdHost(lab, ns, build_rootfs(), binds=python_binds())
        host.write_file("/etc/systemd/system/flanneld-py.service", UNIT)
        host.start()
        host.run(["systemctl", "start", "docker"])
        print(host.journal("docker"))
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lab.netns import Lab, LabError, Netns

__all__ = [
    "DEFAULT_CACHE_DIR",
    "MASKED_UNITS",
    "PACKAGES",
    "Bind",
    "NspawnError",
    "SystemdHost",
    "build_rootfs",
    "ensure_tools",
    "missing_libraries",
    "python_binds",
    "python_files",
    "rootfs_path",
]

DEFAULT_CACHE_DIR = Path("/var/cache/flanneld-py-test")
SUITE = "bookworm"
#: Debian packages of the root file system (mmdebstrap --variant=apt adds the essential set)
PACKAGES: tuple[str, ...] = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "iproute2",
    "iptables",
    "procps",
    "iputils-ping",  # flanneld-py doctor probes each peer with ping
    "docker.io",  # pulls containerd, runc, tini (docker-init)
    # what `ldd` lists for the host's Python, its lib-dynload modules and the virtualenv's
    # extensions (libc6, zlib1g, libgcc-s1, libcrypt1, liblzma5, libtinfo6 are essential anyway)
    "libssl3",
    "libffi8",
    "zlib1g",
    "libbz2-1.0",
    "liblzma5",
    "libsqlite3-0",
    "libreadline8",
    "libncursesw6",
    "libuuid1",
    "libexpat1",
    "libstdc++6",
    "libnsl2",
    "libtirpc3",
    "libcrypt1",
)
#: units masked in the tree: timers that would reach for the network or write in the background
#: during a test, and the login prompt on the container's console
MASKED_UNITS: tuple[str, ...] = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "console-getty.service",
)
#: bump when the customisation in _customize_rootfs changes (part of the cache key)
_RECIPE_VERSION = "1"

#: environment of commands run inside the container
_INNER_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "TERM": "dumb",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}

#: the container's PID 1 until it becomes systemd: nspawn mounts the cgroup v1 controllers
#: read-only, and systemd decides once, at startup, which controllers it can use (a controller it
#: cannot write is never used: no DeviceAllow=, no Delegate= cgroups for dockerd), so they are
#: remounted read-write first (``remount,bind``: a plain ``remount`` of ``memory`` is "busy")
_INIT = r"""
while read -r _ mnt fstype _; do
    [ "$fstype" = cgroup ] && mount -o remount,bind,rw "$mnt"
done < /proc/self/mounts
exec /lib/systemd/systemd
"""

#: runs in the private mount namespace made by unshare, then becomes systemd-nspawn:
#: $1 merged root, $2 lower, $3 upper, $4 work, then cgroup.procs files, "--", nspawn argv
_LAUNCHER = r"""
set -e
root=$1 lower=$2 upper=$3 work=$4
shift 4
while [ "$1" != "--" ]; do echo $$ > "$1"; shift; done
shift
mount --make-rprivate /
mount -t tmpfs -o mode=0755 tmpfs /run/systemd
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work" "$root"
exec "$@"
"""


class NspawnError(LabError):
    """Building the root file system, or booting / driving / stopping the container, failed."""


# ---------------------------------------------------------------------------------------------
# tools and the root file system


def ensure_tools() -> None:
    """Install mmdebstrap and systemd-container with apt-get if their commands are missing."""
    need = [
        pkg
        for tool, pkg in (("mmdebstrap", "mmdebstrap"), ("systemd-nspawn", "systemd-container"))
        if shutil.which(tool) is None
    ]
    for tool in ("unshare", "nsenter", "findmnt"):
        if shutil.which(tool) is None:
            raise NspawnError(f"`{tool}` not found (apt-get install util-linux)")
    if not need:
        return
    if os.geteuid() != 0:
        raise NspawnError(f"need root to apt-get install {' '.join(need)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *need],
    ):
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            err = (proc.stderr or proc.stdout).strip()[-2000:]
            raise NspawnError(f"`{shlex.join(argv)}` exited {proc.returncode}: {err}")


def _recipe_key(packages: Sequence[str]) -> str:
    recipe = [_RECIPE_VERSION, SUITE, "apt", *sorted(set(packages)), "mask:", *MASKED_UNITS]
    return hashlib.sha256("\n".join(recipe).encode()).hexdigest()[:16]


def rootfs_path(cache_dir: Path = DEFAULT_CACHE_DIR, packages: Sequence[str] = PACKAGES) -> Path:
    """Where :func:`build_rootfs` keeps the tree for this package list (built or not)."""
    return Path(cache_dir) / f"{SUITE}-{_recipe_key(packages)}"


def build_rootfs(
    cache_dir: Path = DEFAULT_CACHE_DIR,
    packages: Sequence[str] = PACKAGES,
    *,
    timeout: float = 1800.0,
) -> Path:
    """The cached bookworm tree for ``packages``, built first if missing; returns its path.

    Concurrent callers serialize on ``<cache_dir>/.lock``; leftovers of an interrupted build
    (``.build-*``) are removed under that lock. mmdebstrap runs in a private mount namespace, so
    the ``/proc``, ``/sys`` and ``/dev`` mounts it makes in the tree cannot outlive it. Takes
    ~25 s here (network: deb.debian.org); the tree is ~460 MB.
    """
    final = rootfs_path(cache_dir, packages)
    if final.is_dir():
        return final
    ensure_tools()
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():
            return final
        for stale in cache.glob(".build-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
        try:
            root = tmp / "root"
            argv = [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "mmdebstrap",
                "--variant=apt",
                "--include=" + ",".join(packages),
                SUITE,
                str(root),
            ]
            t0 = time.monotonic()
            log = tmp / "mmdebstrap.log"
            with open(log, "wb") as out:
                try:
                    proc = subprocess.run(
                        argv, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False
                    )
                except subprocess.TimeoutExpired:
                    raise NspawnError(f"mmdebstrap took longer than {timeout:.0f}s") from None
            if proc.returncode != 0:
                tail = log.read_text(errors="replace")[-3000:]
                raise NspawnError(f"mmdebstrap exited {proc.returncode}:\n{tail}")
            _customize_rootfs(root)
            info = {
                "suite": SUITE,
                "packages": sorted(set(packages)),
                "masked": list(MASKED_UNITS),
                "build_seconds": round(time.monotonic() - t0, 1),
            }
            (root / "etc/flanneld-py-rootfs.json").write_text(json.dumps(info, indent=1) + "\n")
            os.rename(root, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        # trees of earlier recipes (another package list) are not used any more: ~460 MB each
        for old in cache.glob(f"{SUITE}-*"):
            if old != final and old.is_dir() and not _host_mounts_under(old):
                shutil.rmtree(old, ignore_errors=True)
    return final


def _customize_rootfs(root: Path) -> None:
    """Container-neutral changes to the fresh tree: mask :data:`MASKED_UNITS` and drop the
    hostname mmdebstrap copied from this machine (each :class:`SystemdHost` writes its own).

    docker.service and containerd.service stay enabled, as Debian's packages leave them on a real
    host: the boot order etcd -> flanneld-py -> dockerd is only a real test if dockerd starts at
    boot. A boot that must not start it uses :meth:`SystemdHost.disable`."""
    system = root / "etc/systemd/system"
    for unit in MASKED_UNITS:
        link = system / unit
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to("/dev/null")
    with contextlib.suppress(FileNotFoundError):
        (root / "etc/hostname").unlink()


# ---------------------------------------------------------------------------------------------
# the host's Python inside the container


@dataclass(frozen=True)
class Bind:
    """A bind mount into the container: ``source`` on the host at ``target`` (default: the same
    path) inside, read-only unless ``readonly=False``."""

    source: Path
    target: Path | None = None
    readonly: bool = True

    def nspawn_arg(self) -> str:
        src, dst = str(self.source), str(self.target or self.source)
        if ":" in src + dst:
            raise NspawnError(f"bind paths must not contain ':' ({src} -> {dst})")
        return f"--bind{'-ro' if self.readonly else ''}={src}:{dst}"


_SYSTEM_DIRS = {"/", "/usr", "/bin", "/lib", "/lib64", "/etc", "/var", "/opt"}


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def python_binds() -> list[Bind]:
    """Read-only binds at the same paths of the host's Python prefix (``sys.base_prefix``), of
    the virtualenv (``sys.prefix``) when it is outside the repository, and of the repository, so
    that ``<repo>/.venv/bin/python`` and its console scripts run inside unchanged.

    :class:`NspawnError` if the prefix is a system directory (a Debian ``/usr`` Python): binding
    it would replace the container's own ``/usr``."""
    repo = _repo_root()
    paths = [Path(sys.base_prefix).resolve()]
    venv = Path(sys.prefix).resolve()
    if venv != paths[0] and not venv.is_relative_to(repo):
        paths.append(venv)
    for p in paths:
        if str(p) in _SYSTEM_DIRS:
            raise NspawnError(
                f"the host's Python lives in {p}; it cannot be bound into a container"
            )
    paths.append(repo)
    return [Bind(p) for p in paths]


def python_files() -> list[Path]:
    """The host's Python interpreter, its lib-dynload modules (without ``_tkinter``, which
    needs X11) and the compiled extensions of the virtualenv: what :func:`missing_libraries`
    checks."""
    files = [Path(os.path.realpath(sys.executable))]
    dynload = Path(sys.base_prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    files += sorted(p for p in (dynload / "lib-dynload").glob("*.so") if "_tkinter" not in p.name)
    site = Path(sys.prefix) / "lib"
    files += sorted(site.glob("python*/site-packages/**/*.so"))
    files += sorted(_repo_root().glob("flanneld_py/*.so"))
    return files


def missing_libraries(rootfs: Path, files: Sequence[Path] | None = None) -> list[str]:
    """Shared libraries that ``files`` (default :func:`python_files`) load on this machine,
    outside the bound prefixes, and that ``rootfs`` lacks (``"libfoo.so.1 (needed by x.so)"``)."""
    if files is None:
        files = python_files()
    bound = [str(b.source) for b in python_binds()]
    missing: dict[str, str] = {}
    for f in files:
        proc = subprocess.run(["ldd", str(f)], capture_output=True, text=True, check=False)
        for line in proc.stdout.splitlines():
            parts = line.split()
            # "libssl.so.3 => /lib/x86_64-linux-gnu/libssl.so.3 (0x...)"
            if len(parts) < 3 or parts[1] != "=>" or not parts[2].startswith("/"):
                continue
            lib = parts[2]
            if any(lib.startswith(b + "/") for b in bound):
                continue
            if not (rootfs / lib.lstrip("/")).exists():
                missing.setdefault(parts[0], f.name)
    return [f"{lib} (needed by {who})" for lib, who in sorted(missing.items())]


# ---------------------------------------------------------------------------------------------
# cgroups


def _cgroup_homes() -> list[Path]:
    """This process's cgroup directory in every mounted hierarchy (v1 controllers, the named
    ``systemd`` hierarchy, cgroup2)."""
    mounts: list[tuple[str, str, set[str]]] = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 4 and parts[2] in ("cgroup", "cgroup2"):
                mounts.append((parts[2], parts[1], set(parts[3].split(","))))
    homes: list[Path] = []
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            for fstype, mnt, opts in mounts:
                if (not ctrls and fstype == "cgroup2") or (
                    ctrls and fstype == "cgroup" and set(ctrls.split(",")) <= opts
                ):
                    homes.append(Path(mnt) / path.lstrip("/"))
                    break
    return homes


def _kill_cgroup_tree(top: Path) -> None:
    """SIGKILL every process in ``top`` and below, then remove the directories (deepest first)."""
    if not top.is_dir():
        return
    dirs = sorted((Path(d) for d, _, _ in os.walk(top)), key=lambda p: len(p.parts), reverse=True)
    for d in dirs:
        with contextlib.suppress(OSError):
            for pid in (d / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
    for d in dirs:
        for _ in range(100):  # a killed process leaves its cgroup a moment later
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.02)


# ---------------------------------------------------------------------------------------------
# the container


def _host_mounts_under(root: Path) -> list[str]:
    prefix = str(root).rstrip("/")
    found: list[str] = []
    with open("/proc/self/mounts") as f:
        for line in f:
            mnt = line.split()[1].encode().decode("unicode_escape")
            if mnt == prefix or mnt.startswith(prefix + "/"):
                found.append(mnt)
    return found


class SystemdHost:
    """A bookworm system booted by systemd-nspawn inside the lab namespace ``ns``.

    ``binds`` are extra bind mounts (see :func:`python_binds`). With ``docker_root`` (default)
    ``/var/lib/docker`` is a directory on the host's file system, so dockerd's default overlay2
    driver works. ``name`` (default: the namespace's name) is the machine name and hostname.
    The stop is registered on the lab's cleanup stack at construction, so it runs before the
    namespace is deleted.
    """

    def __init__(
        self,
        lab: Lab,
        ns: Netns,
        rootfs: Path | None = None,
        *,
        binds: Sequence[Bind] = (),
        name: str | None = None,
        docker_root: bool = True,
    ) -> None:
        if os.geteuid() != 0:
            raise NspawnError("systemd-nspawn needs root")
        self.lab = lab
        self.ns = ns
        self.rootfs = Path(rootfs) if rootfs is not None else build_rootfs()
        self.name = name or ns.name
        if len(self.name) > 64 or not self.name.replace("-", "").isalnum():
            raise NspawnError(f"bad machine name {self.name!r}")
        self.binds = list(binds)
        self.workdir = lab.tmpdir / f"nspawn-{self.name}"
        for sub in ("upper", "work", "merged"):
            (self.workdir / sub).mkdir(parents=True)
        if docker_root:
            (self.workdir / "var-lib-docker").mkdir(mode=0o710)
            self.binds.append(Bind(self.workdir / "var-lib-docker", Path("/var/lib/docker"), False))
        self.upper = self.workdir / "upper"
        self.console_log = self.workdir / "console.log"
        self.cgroups: list[Path] = []
        self.timings: dict[str, float] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid1: int | None = None
        self._stopped = False
        lab.defer(f"nspawn container {self.name}", self.stop)
        self.write_file("/etc/hostname", self.name + "\n")

    def __repr__(self) -> str:
        return f"SystemdHost({self.name!r}, ns={self.ns.name}, pid1={self._pid1})"

    # --- files -----------------------------------------------------------------------------
    def _upper_path(self, path: str | Path) -> Path:
        p = Path(path)
        if not p.is_absolute() or ".." in p.parts:
            raise NspawnError(f"container path must be absolute and plain: {path}")
        target = self.upper / p.relative_to("/")
        # directories the lower tree lacks are created with the usual mode
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        return target

    def write_file(self, path: str | Path, text: str, mode: int = 0o644) -> None:
        """Write ``text`` to ``path`` in the container: into the writable layer before the boot,
        through the running container after it (then ``systemctl daemon-reload`` is yours)."""
        if self.running:
            script = 'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1"'
            self.run(["sh", "-c", script, "sh", str(path), f"{mode:o}"], input=text)
            return
        target = self._upper_path(path)
        if target.is_symlink() or _is_whiteout(target):
            target.unlink()
        target.write_text(text)
        target.chmod(mode)

    def symlink(self, path: str | Path, target: str) -> None:
        """Make ``path`` a symlink to ``target`` in the container (``target`` as written)."""
        if self.running:
            self.run(["ln", "-sfn", target, str(path)])
            return
        link = self._upper_path(path)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)

    def remove(self, path: str | Path) -> None:
        """Delete ``path`` (a file or symlink) in the container; before the boot an overlay
        whiteout hides the lower tree's copy."""
        if self.running:
            self.run(["rm", "-f", str(path)])
            return
        target = self._upper_path(path)
        if target.is_symlink() or target.exists():
            target.unlink()
        if (self.rootfs / Path(path).relative_to("/")).is_symlink() or (
            self.rootfs / Path(path).relative_to("/")
        ).exists():
            os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0))

    def mask(self, unit: str) -> None:
        """``systemctl mask unit`` (a link to /dev/null in /etc/systemd/system)."""
        if self.running:
            self.systemctl("mask", unit)
            return
        self.symlink(f"/etc/systemd/system/{unit}", "/dev/null")

    def disable(self, unit: str) -> None:
        """``systemctl disable unit``: before the boot, remove every ``*.wants/<unit>`` link of
        the tree's /etc/systemd/system (e.g. ``docker.service`` and ``docker.socket``, so that
        dockerd starts only when told)."""
        if self.running:
            self.systemctl("disable", unit)
            return
        system = self.rootfs / "etc/systemd/system"
        for link in system.glob(f"*.wants/{unit}"):
            self.remove(Path("/") / link.relative_to(self.rootfs))
        for link in (self.upper / "etc/systemd/system").glob(f"*.wants/{unit}"):
            if link.is_symlink():
                link.unlink()

    # --- lifecycle -------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and self._pid1 is not None

    @property
    def pid1(self) -> int:
        """Host PID of the container's systemd."""
        if self._pid1 is None:
            raise NspawnError(f"container {self.name} is not running")
        return self._pid1

    @property
    def nspawn_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def nspawn_argv(self) -> list[str]:
        """The systemd-nspawn command line (run by :meth:`start` in the prepared mount
        namespace, with ``SYSTEMD_NSPAWN_API_VFS_WRITABLE=network`` in its environment)."""
        argv = [
            "systemd-nspawn",
            f"--directory={self.workdir / 'merged'}",
            f"--machine={self.name}",
            "--register=no",
            "--keep-unit",
            f"--network-namespace-path=/run/netns/{self.ns.name}",
            "--console=read-only",
            "--link-journal=no",
            "--capability=CAP_NET_ADMIN",
            "--system-call-filter=add_key keyctl request_key",
        ]
        argv += [b.nspawn_arg() for b in self.binds]
        # what --boot would do (halt on SIGTERM, systemd as PID 1), with the cgroups made
        # writable before systemd starts (see _INIT)
        return [*argv, "--kill-signal=SIGRTMIN+3", "/bin/sh", "-c", _INIT]

    def _make_cgroups(self) -> list[Path]:
        made: list[Path] = []
        for home in _cgroup_homes():
            d = home / f"flanneld-py-nspawn-{self.name}"
            d.mkdir(exist_ok=True)
            made.append(d)
            for knob in ("cpuset.cpus", "cpuset.mems"):  # v1 cpuset: empty until copied
                if (d / knob).exists() and not (d / knob).read_text().strip():
                    (d / knob).write_text((home / knob).read_text())
        return made

    def start(
        self, timeout: float = 60.0, *, until: Sequence[str] = ("running", "degraded")
    ) -> SystemdHost:
        """Boot; return once ``systemctl is-system-running`` says one of ``until`` (``starting``
        too: a boot whose start jobs wait, e.g. for etcd, never settles).

        :class:`NspawnError` (with the console's tail) if nspawn exits or the boot does not
        settle in ``timeout`` seconds."""
        if self._proc is not None:
            raise NspawnError(f"container {self.name} was started already")
        if not (Path("/run/netns") / self.ns.name).exists():
            raise NspawnError(f"namespace {self.ns.name} does not exist")
        ensure_tools()
        Path("/run/systemd").mkdir(exist_ok=True)  # the launcher mounts a tmpfs there
        lower = str(self.rootfs)
        for p in (lower, str(self.workdir)):
            if any(c in p for c in ",:\\ "):
                raise NspawnError(f"overlay paths must not contain , : \\ or blanks: {p}")
        t0 = time.monotonic()
        self.cgroups = self._make_cgroups()
        argv = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            _LAUNCHER,
            "sh",
            str(self.workdir / "merged"),
            lower,
            str(self.upper),
            str(self.workdir / "work"),
            *(str(d / "cgroup.procs") for d in self.cgroups),
            "--",
            *self.nspawn_argv(),
        ]
        env = dict(os.environ, SYSTEMD_NSPAWN_API_VFS_WRITABLE="network")
        with open(self.console_log, "ab") as log:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = t0 + timeout
        self._pid1 = self._wait(self._find_pid1, deadline, "the container's PID 1")
        state = ""

        def settled() -> bool:
            nonlocal state
            state = self.system_state()
            return state in until

        try:
            self._wait(settled, deadline, "systemctl is-system-running")
        except NspawnError as exc:
            raise NspawnError(f"{exc} (last state {state!r})") from None
        self.timings["boot"] = time.monotonic() - t0
        return self

    def _wait(self, cond: Callable[[], object], deadline: float, what: str) -> int:
        assert self._proc is not None
        while True:
            val = cond()
            if val:
                return int(val) if isinstance(val, int) else 1
            if self._proc.poll() is not None:
                raise NspawnError(
                    f"systemd-nspawn for {self.name} exited {self._proc.returncode} waiting for "
                    f"{what}; console {self.console_log}:\n{self.console_tail()}"
                )
            if time.monotonic() > deadline:
                raise NspawnError(
                    f"container {self.name}: no {what} in time; console:\n{self.console_tail()}"
                )
            time.sleep(0.05)

    def _find_pid1(self) -> int | None:
        """The child of nspawn that is PID 1 of a new PID namespace (nspawn's short-lived outer
        child is a child too, so the PID-namespace test matters)."""
        assert self._proc is not None
        pid = self._proc.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return None
        for child in children:
            try:
                status = Path(f"/proc/{child}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("NSpid:") and line.split()[1:] == [child, "1"]:
                    return int(child)
        return None

    def system_state(self) -> str:
        """``systemctl is-system-running`` (``""`` while systemd does not answer yet)."""
        proc = self.run(["systemctl", "is-system-running"], check=False, timeout=10)
        return proc.stdout.strip()

    def stop(self, timeout: float = 20.0) -> None:
        """Halt the container (SIGTERM to nspawn, which tells systemd to halt), wait up to
        ``timeout`` s, else SIGKILL its PID 1 and nspawn; then remove its cgroups and, unless
        FLANNELD_LAB_KEEP=1, its working directory. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        t0 = time.monotonic()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"lab.nspawn: {self.name} did not halt in {timeout:.0f}s", file=sys.stderr)
                for pid in (self._pid1, proc.pid):
                    if pid is not None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                proc.wait(10)
        # nspawn gone: anything left in our cgroups (only possible after a SIGKILL) goes too
        for d in self.cgroups:
            _kill_cgroup_tree(d)
        self._pid1 = None
        if proc is not None:
            self.timings["stop"] = time.monotonic() - t0
        if os.environ.get("FLANNELD_LAB_KEEP") != "1" and not _host_mounts_under(self.workdir):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def leftovers(self) -> list[str]:
        """What of this container is still present: processes, cgroups, host mounts under the
        working directory or the tree, the working directory (empty = clean)."""
        left: list[str] = []
        if self._proc is not None and self._proc.poll() is None:
            left.append(f"systemd-nspawn pid {self._proc.pid}")
        if self._pid1 is not None and Path(f"/proc/{self._pid1}").exists():
            left.append(f"container pid1 {self._pid1}")
        left += [f"cgroup {d}" for d in self.cgroups if d.exists()]
        left += [f"mount {m}" for m in _host_mounts_under(self.workdir)]
        left += [f"mount {m}" for m in _host_mounts_under(self.rootfs)]
        if self.workdir.exists() and os.environ.get("FLANNELD_LAB_KEEP") != "1":
            left.append(f"directory {self.workdir}")
        return left

    # --- inside ----------------------------------------------------------------------------
    def run(
        self,
        argv: Sequence[str],
        check: bool = True,
        *,
        timeout: float = 60.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the container (nsenter into every namespace of its PID 1, with a
        clean environment); output captured as text. On timeout the command's process group is
        killed and :class:`NspawnError` raised."""
        full = ["nsenter", "-t", str(self.pid1), "-a", "-r", "-w", *[str(a) for a in argv]]
        proc = subprocess.Popen(
            full,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_INNER_ENV,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise NspawnError(
                f"`{shlex.join(argv)}` in {self.name} timed out ({timeout}s)"
            ) from None
        result = subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
        if check and proc.returncode != 0:
            msg = (err or out).strip().replace("\n", " | ")
            raise NspawnError(
                f"`{shlex.join(argv)}` in {self.name} exited {proc.returncode}: {msg}"
            )
        return result

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(["systemctl", "--no-pager", *args], check=check)

    def show(self, unit: str, prop: str) -> str:
        """One property of a unit (``systemctl show -p prop --value unit``)."""
        return self.systemctl("show", "-p", prop, "--value", unit).stdout.strip()

    def journal(self, unit: str | None = None, lines: int | None = None) -> str:
        """``journalctl -u unit`` inside (the whole journal without ``unit``)."""
        argv = ["journalctl", "--no-pager", "-o", "short-precise"]
        if unit is not None:
            argv += ["-u", unit]
        if lines is not None:
            argv += ["-n", str(lines)]
        return self.run(argv, check=False).stdout

    def console_tail(self, lines: int = 30) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except OSError:
            return "(no console log)"
        return "\n".join(text.splitlines()[-lines:])


def _is_whiteout(p: Path) -> bool:
    try:
        st = p.lstat()
    except OSError:
        return False
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
