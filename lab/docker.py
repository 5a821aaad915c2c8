"""Docker engines inside lab namespaces: one ``dockerd`` per host, offline test image, helpers.

A :class:`Dockerd` is one Docker engine living in one host namespace of a :class:`lab.netns.Lab`,
as it would on a real flannel host: it reads its network options (``--bip``, ``--mtu``,
``--ip-masq``) from a ``/run/flannel/docker``-format file, runs with ``--iptables=true`` and
finds ``net.ipv4.ip_forward=0`` like on a fresh host, so it switches the FORWARD policy to DROP.

Each engine is private: its own data root, exec root, pidfile, API socket, cgroup parent, daemon
config file (which also moves the trust key out of ``/etc/docker``) and its own containerd, which
we start ourselves and pass with ``--containerd`` (left alone, dockerd 20.10 would use a system
containerd whenever ``/run/containerd/containerd.sock`` exists, and its own one makes dockerd's
shutdown poll once per second). Start to ready takes ~0.35-0.5 s; stop 0.05-0.2 s.

Teardown (:meth:`Dockerd.close`, registered on the lab's cleanup stack when the engine is created,
so it runs before the namespaces go): ``docker rm -f`` every container, SIGTERM dockerd by PID (then
SIGKILL), the same for containerd, then sweep what a crash could leave: container shims talking to
our containerd socket, processes in our cgroup parent, mounts under our directories, our cgroup
directories. :meth:`Dockerd.leftovers` lists anything still there (tests assert it is empty).

The test image (:data:`TEST_IMAGE`) is built offline (no registry is reachable): static busybox
with its applet links, iperf3 with the libraries ``ldd`` lists, and a CGI script that echoes the
caller's address (``http://<container>:8080/cgi-bin/peer``, served by busybox httpd, the default
command of :meth:`Dockerd.run_container`). The tarball is built once per process
(:func:`image_tarball`) and imported into each engine (~0.25 s).

Typical use::

    with Lab() as lab:
        h1, h2 = lab.flannel_topology(n_hosts=2).hosts
        d1 = Dockerd(lab, h1, options_file="/run/flannel/docker").start()
        build_test_image(d1)
        c = d1.run_container("web")
        print(c.ip, c.mtu(), c.exec(["ip", "-o", "addr"]).stdout)
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from lab.netns import Lab, LabError, Netns, lab_namespaces

__all__ = [
    "PEER_PORT",
    "TEST_IMAGE",
    "DockerLabError",
    "Dockerd",
    "RunningContainer",
    "build_image_tarball",
    "build_test_image",
    "docker_available",
    "docker_cli",
    "docker_network_options",
    "docker_unavailable_reason",
    "image_tarball",
    "leftovers",
    "normalize_peer",
    "parse_env_file",
    "read_env_file",
]

TEST_IMAGE = "flanneld-test:1"
#: port of the busybox httpd that containers started by run_container() serve;
#: GET /cgi-bin/peer answers with the caller's address as this container sees it
PEER_PORT = 8080
PEER_SERVER_CMD = ("httpd", "-f", "-p", f"0.0.0.0:{PEER_PORT}", "-h", "/www")

_PEER_CGI = """#!/bin/sh
echo "Content-Type: text/plain"
echo
echo "$REMOTE_ADDR"
"""


class DockerLabError(LabError):
    """A Docker engine of the lab failed to start, or a docker command failed."""


# ---------------------------------------------------------------------------------------------
# /run/flannel/docker: read like systemd's EnvironmentFile=, split like the shell

_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _parse_value(raw: str) -> str:
    """One assignment value: quotes removed, backslash escapes resolved, unquoted trailing blanks
    dropped. Double quotes honour ``\\"``, ``\\\\``, ``\\$`` and ``\\``` escapes; single quotes
    are literal; outside quotes a backslash takes the next character literally."""
    out: list[str] = []
    keep = 0  # length of out that must survive the final strip (ends of quoted parts)
    i, n = 0, len(raw)
    while i < n:
        ch = raw[i]
        if ch == "'":
            end = raw.find("'", i + 1)
            if end < 0:
                raise ValueError("unterminated single quote")
            out.append(raw[i + 1 : end])
            keep = len("".join(out))
            i = end + 1
        elif ch == '"':
            i += 1
            while True:
                if i >= n:
                    raise ValueError("unterminated double quote")
                c = raw[i]
                if c == '"':
                    i += 1
                    break
                if c == "\\" and i + 1 < n and raw[i + 1] in '"\\$`':
                    out.append(raw[i + 1])
                    i += 2
                    continue
                out.append(c)
                i += 1
            keep = len("".join(out))
        elif ch == "\\" and i + 1 < n:
            out.append(raw[i + 1])
            i += 2
            keep = len("".join(out))
        else:
            out.append(ch)
            i += 1
    text = "".join(out)
    return text[:keep] + text[keep:].rstrip()


def parse_env_file(text: str) -> dict[str, str]:
    """Assignments of an environment file as systemd's ``EnvironmentFile=`` reads it.

    ``KEY=VALUE`` per line; blank lines and lines starting with ``#`` or ``;`` are skipped; a line
    ending in a backslash continues on the next one; whitespace around the key and before the value
    is ignored; quotes around (parts of) the value are removed. Lines that are not assignments are
    skipped, as systemd does (it only warns).
    """
    env: dict[str, str] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        while line.endswith("\\") and not line.endswith("\\\\") and i < len(lines):
            line = line[:-1] + lines[i]
            i += 1
        stripped = line.strip()
        if not stripped or stripped[0] in "#;" or "=" not in stripped:
            continue
        key, _, raw = stripped.partition("=")
        key = key.strip()
        if not _KEY_RE.match(key):
            continue
        env[key] = _parse_value(raw.lstrip())
    return env


def read_env_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """:func:`parse_env_file` of the file at ``path``."""
    return parse_env_file(Path(path).read_text())


def docker_network_options(
    path: str | os.PathLike[str], key: str = "DOCKER_NETWORK_OPTIONS"
) -> list[str]:
    """dockerd arguments from a ``/run/flannel/docker``-format file, as a unit with
    ``EnvironmentFile=-/run/flannel/docker`` and ``ExecStart=/usr/bin/dockerd
    $DOCKER_NETWORK_OPTIONS`` would pass them: the variable read like systemd does, then split
    like the shell does."""
    try:
        env = read_env_file(path)
    except (OSError, ValueError) as exc:
        raise DockerLabError(f"cannot read docker options file {path}: {exc}") from None
    if key not in env:
        raise DockerLabError(f"{path} has no {key}= line (have: {', '.join(env) or 'nothing'})")
    return shlex.split(env[key])


# ---------------------------------------------------------------------------------------------
# availability

_DOCKER_CLI_CANDIDATES = ("/usr/bin/docker",)


def docker_cli() -> str | None:
    """The docker CLI to use: ``$FLANNELD_DOCKER_CLI``, else Debian's ``/usr/bin/docker`` (the
    client of the same docker.io package as dockerd; a newer client may be first in PATH), else
    whatever ``docker`` PATH finds."""
    env = os.environ.get("FLANNELD_DOCKER_CLI")
    if env:
        return env
    for cand in _DOCKER_CLI_CANDIDATES:
        if os.access(cand, os.X_OK):
            return cand
    return shutil.which("docker")


def docker_unavailable_reason() -> str | None:
    """Why a lab Docker engine cannot run here, or None when everything needed is present.

    Checks privileges and binaries only; a start failure is reported by :meth:`Dockerd.start`
    with the engine's log tail.
    """
    if os.geteuid() != 0:
        return "Docker labs need root"
    need = {
        "dockerd": "docker.io",
        "containerd": "containerd",
        "runc": "runc",
        "docker-init": "tini",
        "nsenter": "util-linux",
        "iptables": "iptables",
        "ip": "iproute2",
    }
    for tool, pkg in need.items():
        if shutil.which(tool) is None:
            return f"`{tool}` not found (apt-get install {pkg}, or `make setup`)"
    if docker_cli() is None:
        return "no docker CLI (apt-get install docker.io)"
    if not any(shutil.which(s) for s in ("containerd-shim-runc-v2",)):
        return "containerd-shim-runc-v2 not found (apt-get install containerd)"
    if _static_busybox() is None:
        return "static busybox not found (apt-get install busybox-static)"
    if shutil.which("iperf3") is None:
        return "`iperf3` not found (apt-get install iperf3)"
    if not _cgroup_mounts():
        return "no cgroup file system mounted under /sys/fs/cgroup"
    return None


def docker_available() -> bool:
    return docker_unavailable_reason() is None


# ---------------------------------------------------------------------------------------------
# the offline test image


def _static_busybox() -> str | None:
    """A statically linked busybox (Debian's busybox-static), or None."""
    for cand in ("/bin/busybox", "/usr/bin/busybox"):
        if not os.access(cand, os.X_OK):
            continue
        ldd = subprocess.run(["ldd", cand], capture_output=True, text=True, check=False)
        out = ldd.stdout + ldd.stderr
        if "not a dynamic executable" in out or "statically linked" in out:
            return cand
    return None


def _ldd_paths(binary: str) -> list[str]:
    proc = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise DockerLabError(f"ldd {binary} failed: {(proc.stderr or proc.stdout).strip()}")
    paths: list[str] = []
    for line in proc.stdout.splitlines():
        # "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux….so.2 (0x…)"
        for word in line.split():
            if word.startswith("/"):
                paths.append(word)
                break
    return paths


def build_image_tarball(dest_dir: str | os.PathLike[str]) -> Path:
    """Write ``dest_dir/image.tar``: a root file system with static busybox (and a link per
    applet), iperf3 plus the libraries and loader ``ldd`` lists, ``/tmp``, a minimal
    ``/etc/passwd`` and the peer CGI script under ``/www``. Returns the tarball's path."""
    dest = Path(dest_dir)
    busybox = _static_busybox()
    if busybox is None:
        raise DockerLabError("static busybox not found (apt-get install busybox-static)")
    iperf3 = shutil.which("iperf3")
    if iperf3 is None:
        raise DockerLabError("`iperf3` not found (apt-get install iperf3)")
    root = dest / "rootfs"
    if root.exists():
        shutil.rmtree(root)
    for d in ("bin", "etc", "tmp", "proc", "sys", "dev", "www/cgi-bin", "root"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    shutil.copy2(busybox, root / "bin/busybox")
    applets = subprocess.run(
        [busybox, "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in applets:
        link = root / "bin" / applet
        if applet != "busybox" and not link.exists():
            link.symlink_to("busybox")
    for src in [iperf3, *_ldd_paths(iperf3)]:
        target = root / src.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(src), target)  # the file, not a host symlink
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")
    cgi = root / "www/cgi-bin/peer"
    cgi.write_text(_PEER_CGI)
    cgi.chmod(0o755)
    tarball = dest / "image.tar"
    proc = subprocess.run(
        ["tar", "-C", str(root), "--numeric-owner", "-cf", str(tarball), "."],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise DockerLabError(f"tar of the test image failed: {proc.stderr.strip()}")
    shutil.rmtree(root)
    return tarball


_tarball_lock = threading.Lock()
_tarball: Path | None = None


def image_tarball() -> Path:
    """The test image tarball, built on first use in a temporary directory removed at exit."""
    global _tarball
    with _tarball_lock:
        if _tarball is None or not _tarball.exists():
            tmp = tempfile.mkdtemp(prefix="flanneld-py-image-")
            atexit.register(shutil.rmtree, tmp, True)
            _tarball = build_image_tarball(tmp)
        return _tarball


def build_test_image(
    dockerd: Dockerd, name: str = TEST_IMAGE, *, tarball: str | os.PathLike[str] | None = None
) -> str:
    """Import the offline test image into ``dockerd`` as ``name`` (no-op if it is there already);
    returns ``name``. ``tarball`` defaults to :func:`image_tarball`."""
    if dockerd.docker("image", "inspect", name, check=False).returncode == 0:
        return name
    path = Path(tarball) if tarball is not None else image_tarball()
    dockerd.docker("import", "-c", 'CMD ["/bin/sh"]', str(path), name, timeout=120)
    return name


# ---------------------------------------------------------------------------------------------
# process / mount / cgroup plumbing


def _cgroup_mounts() -> list[Path]:
    """Mount points of the cgroup (v1) and cgroup2 file systems."""
    out: list[Path] = []
    with contextlib.suppress(OSError), open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] in ("cgroup", "cgroup2"):
                out.append(Path(parts[1].replace("\\040", " ")))
    return out


def _mounts_under(root: Path) -> list[str]:
    """Mount points at or below ``root`` (deepest first)."""
    prefix = str(root).rstrip("/")
    found: list[str] = []
    with contextlib.suppress(OSError), open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 2:
                continue
            mnt = parts[1].encode().decode("unicode_escape")
            if mnt == prefix or mnt.startswith(prefix + "/"):
                found.append(mnt)
    return sorted(set(found), key=len, reverse=True)


def _pids_with_arg(*needles: str) -> list[int]:
    """PIDs of processes (not zombies) with one of ``needles`` as a whole command-line argument.

    The needles are paths unique to one engine (its containerd socket, which the shims get as
    ``-address``; its ``--data-root=`` and containerd ``--config`` arguments), so this finds only
    that engine's processes, including ones whose Popen object we never got (Ctrl-C at the
    wrong moment) and shims that outlived a killed containerd."""
    wanted = {n.encode() for n in needles}
    me = os.getpid()
    pids: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if wanted.intersection(argv) and _alive(int(entry)):
            pids.append(int(entry))
    return pids


def _shim_socket(pid: int) -> Path | None:
    """The socket a containerd-shim-runc-v2 listens on, from its command line: containerd 1.6
    names it ``/run/containerd/s/<sha256 of "<containerd address>/<namespace>/<id>">``."""
    try:
        argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    except (OSError, UnicodeDecodeError):
        return None
    if not argv or not os.path.basename(argv[0]).startswith("containerd-shim"):
        return None
    opts = dict(itertools.pairwise(argv[1:]))  # "-flag value" pairs (and some noise)
    try:
        key = os.path.join(opts["-address"], opts["-namespace"], opts["-id"])
    except KeyError:
        return None
    return Path("/run/containerd/s") / hashlib.sha256(key.encode()).hexdigest()


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _kill_pids(pids: Iterable[int], sig: signal.Signals = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    path = env.get("PATH", "")
    for d in ("/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"):
        if d not in path.split(":"):
            path = f"{path}:{d}" if path else d
    env["PATH"] = path
    if extra:
        env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------
# containers


@dataclass(eq=False)
class RunningContainer:
    """A container started by :meth:`Dockerd.run_container` (on the default bridge network)."""

    dockerd: Dockerd = field(repr=False)
    id: str
    name: str
    ip: IPv4Address

    def exec(
        self,
        argv: Sequence[str],
        *,
        check: bool = False,
        timeout: float = 60.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return self.dockerd.exec(self.id, argv, check=check, timeout=timeout, input=input)

    def sh(
        self, script: str, *, check: bool = False, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a shell snippet in the container (busybox sh)."""
        return self.exec(["sh", "-c", script], check=check, timeout=timeout)

    def mtu(self, ifname: str = "eth0") -> int:
        return self.dockerd.container_mtu(self.id, ifname)

    def ping(self, dst: str | IPv4Address, count: int = 1, timeout: float = 2.0) -> bool:
        argv = ["ping", "-c", str(count), "-W", str(max(1, round(timeout))), str(dst)]
        return self.exec(argv, timeout=timeout * count + 10).returncode == 0

    def peer_address(self, server: str | IPv4Address, port: int = PEER_PORT) -> str:
        """The address a peer server (another container's httpd, or any host running the same
        CGI) sees this container connect from."""
        url = f"http://{server}:{port}/cgi-bin/peer"
        # not `wget -T`: Debian's static busybox 1.35 segfaults with it
        proc = self.exec(["timeout", "10", "wget", "-q", "-O", "-", url], timeout=20)
        if proc.returncode != 0:
            raise DockerLabError(
                f"{self.name}: wget {url} failed (rc={proc.returncode}): {proc.stderr.strip()}"
            )
        return normalize_peer(proc.stdout)

    def __str__(self) -> str:
        return self.name


def normalize_peer(text: str) -> str:
    """``[::ffff:10.5.1.2]:1234``, ``10.5.1.2`` ... -> ``10.5.1.2``."""
    addr = text.strip().splitlines()[-1].strip() if text.strip() else ""
    if addr.startswith("["):
        addr = addr[1:].split("]", 1)[0]
    if addr.startswith("::ffff:"):
        addr = addr[len("::ffff:") :]
    return addr


# ---------------------------------------------------------------------------------------------
# the engine


class Dockerd:
    """One Docker engine (dockerd + its own containerd) inside host namespace ``ns``.

    ``network_options`` are extra dockerd arguments (``--bip=…``); ``options_file`` names a
    ``/run/flannel/docker``-format file whose ``DOCKER_NETWORK_OPTIONS`` is read at every
    :meth:`start` (both may be given; the file's options come last). ``fresh_host`` sets
    ``net.ipv4.ip_forward=0`` in the namespace before dockerd starts, so dockerd turns it on and
    sets the FORWARD policy to DROP as on a freshly booted host. Files live in ``workdir``
    (default: a directory in the lab's tmpdir): ``dockerd.log``, ``containerd.log``, ``data/``,
    ``exec/``, ``docker.sock``, ``daemon.json`` (:attr:`daemon_json_path`).

    ``daemon_json`` holds extra keys of the daemon config file (what ``/etc/docker/daemon.json``
    holds on a real host, e.g. ``{"bip": "192.168.100.1/24"}``); the file is rewritten from
    :attr:`daemon_json` at every :meth:`start`, so a test may change it between starts.

    Creating the object registers :meth:`close` on the lab's cleanup stack; it is idempotent.
    """

    def __init__(
        self,
        lab: Lab,
        ns: Netns,
        *,
        network_options: Sequence[str] = (),
        options_file: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        fresh_host: bool = True,
        workdir: str | os.PathLike[str] | None = None,
        start_timeout: float = 30.0,
        stop_timeout: float = 10.0,
        daemon_json: Mapping[str, Any] | None = None,
    ) -> None:
        reason = docker_unavailable_reason()
        if reason is not None:
            raise DockerLabError(reason)
        self.lab = lab
        self.ns = ns
        self.network_options = list(network_options)
        self.options_file = Path(options_file) if options_file is not None else None
        self.extra_args = list(extra_args)
        #: extra keys written into the daemon config file at every start
        self.daemon_json: dict[str, Any] = dict(daemon_json or {})
        self.fresh_host = fresh_host
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        short = ns.name[len(lab.prefix) + 1 :] if ns.name.startswith(lab.prefix + "-") else ns.name
        self.workdir = Path(workdir) if workdir is not None else lab.tmpdir / f"docker-{short}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_root = self.workdir / "data"
        self.exec_root = self.workdir / "exec"
        self.socket_path = self.workdir / "docker.sock"
        self.containerd_socket = self.exec_root / "containerd" / "containerd.sock"
        self.pidfile = self.workdir / "dockerd.pid"
        #: the daemon config file (``--config-file``), rewritten at every start
        self.daemon_json_path = self.workdir / "daemon.json"
        self.log_path = self.workdir / "dockerd.log"
        self.containerd_log_path = self.workdir / "containerd.log"
        #: absolute cgroup path under every cgroup hierarchy; unique per lab and host
        self.cgroup_parent = f"/{ns.name}-docker"
        self.cli = docker_cli() or "docker"
        self._dockerd: subprocess.Popen[bytes] | None = None
        self._containerd: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._closed = False
        #: seconds taken by the last start ("containerd", "dockerd", "total") and stop ("stop")
        self.timings: dict[str, float] = {}
        #: the dockerd arguments of the last start (for messages)
        self.args: list[str] = []
        lab.defer(f"dockerd in {ns.name}", self.close)

    # -- paths and state -------------------------------------------------------------------
    @property
    def host(self) -> str:
        """The ``-H`` value for docker CLI calls."""
        return f"unix://{self.socket_path}"

    @property
    def pid(self) -> int | None:
        p = self._dockerd
        return p.pid if p is not None and p.poll() is None else None

    @property
    def containerd_pid(self) -> int | None:
        p = self._containerd
        return p.pid if p is not None and p.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def log_tail(self, lines: int = 25, width: int = 300) -> str:
        """The last lines of dockerd's log (each cut to ``width`` characters)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(line[:width] for line in text.splitlines()[-lines:])

    # -- start -----------------------------------------------------------------------------
    def dockerd_args(self) -> list[str]:
        """The dockerd command line (without ``nsenter``)."""
        opts = list(self.network_options)
        if self.options_file is not None:
            opts += docker_network_options(self.options_file)
        return [
            "dockerd",
            f"--data-root={self.data_root}",
            f"--exec-root={self.exec_root}",
            f"--pidfile={self.pidfile}",
            f"--host={self.host}",
            f"--config-file={self.daemon_json_path}",
            f"--containerd={self.containerd_socket}",
            f"--cgroup-parent={self.cgroup_parent}",
            "--iptables=true",
            "--shutdown-timeout=2",
            *self.extra_args,
            *opts,
        ]

    def _spawn(self, argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
        """Start ``argv`` in the namespace with nsenter (``ip netns exec`` remounts /sys, which
        dockerd cannot live with: "Devices cgroup isn't mounted")."""
        full = ["nsenter", f"--net=/run/netns/{self.ns.name}", "--", *argv]
        with open(log_path, "ab") as log:
            log.write(f"==== {time.strftime('%H:%M:%S')} {shlex.join(full)}\n".encode())
            log.flush()
            return subprocess.Popen(
                full,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_clean_env(),
                start_new_session=True,
            )

    def _write_configs(self) -> Path:
        self.data_root.mkdir(parents=True, exist_ok=True, mode=0o710)
        (self.exec_root / "containerd").mkdir(parents=True, exist_ok=True, mode=0o700)
        # dockerd 20.10 writes its trust key to /etc/docker/key.json unless told otherwise, and
        # only the config file can tell it (the flag is gone)
        daemon_json = {"deprecated-key-path": str(self.workdir / "key.json"), **self.daemon_json}
        self.daemon_json_path.write_text(json.dumps(daemon_json) + "\n")
        cfg = self.workdir / "containerd.toml"
        cfg.write_text(
            "version = 2\n"
            f'root = "{self.data_root / "containerd"}"\n'
            f'state = "{self.exec_root / "containerd" / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            "[grpc]\n"
            f'  address = "{self.containerd_socket}"\n'
            "[debug]\n"
            '  address = ""\n'
            "[metrics]\n"
            '  address = ""\n'
        )
        return cfg

    def start(self) -> Dockerd:
        """Start containerd, then dockerd, and return once the API answers. Raises
        :class:`DockerLabError` with the log tail if dockerd exits or is not ready in time."""
        with self._lock:
            if self._closed:
                raise DockerLabError("engine is closed")
            if self.running:
                return self
            self.args = self.dockerd_args()  # reads the options file: fail before starting
            t0 = time.monotonic()
            if self.fresh_host:
                self.ns.sysctl("net.ipv4.ip_forward", 0)
            cfg = self._write_configs()
            for stale in (self.socket_path, self.containerd_socket, self.pidfile):
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()
            self._containerd = self._spawn(
                ["containerd", "--config", str(cfg)], self.containerd_log_path
            )
            self._wait_socket(self.containerd_socket, self._containerd, "containerd")
            t1 = time.monotonic()
            self._dockerd = self._spawn(self.args, self.log_path)
        self._wait_ready()
        t2 = time.monotonic()
        self.timings.update(containerd=t1 - t0, dockerd=t2 - t1, total=t2 - t0)
        return self

    def _wait_socket(self, path: Path, proc: subprocess.Popen[bytes], what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            if proc.poll() is not None:
                log = self.containerd_log_path if what == "containerd" else self.log_path
                raise DockerLabError(
                    f"{what} in {self.ns.name} exited (rc={proc.returncode}) while starting; "
                    f"log {log}:\n{_tail(log)}"
                )
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1.0)
                try:
                    s.connect(str(path))
                    return
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise DockerLabError(f"{what} in {self.ns.name}: no socket {path} in time")
            time.sleep(0.01)

    def _ping(self) -> bool:
        """GET /_ping on the API socket (the API is served only once the daemon is initialised)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            try:
                s.connect(str(self.socket_path))
                s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
            except OSError:
                return False
        return data.startswith(b"HTTP/1.") and b" 200 " in data.split(b"\r\n", 1)[0]

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        proc = self._dockerd
        assert proc is not None
        while not self._ping():
            if proc.poll() is not None:
                raise DockerLabError(
                    f"dockerd in {self.ns.name} exited (rc={proc.returncode}) while starting; "
                    f"args: {shlex.join(self.args)}; log {self.log_path}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise DockerLabError(
                    f"dockerd in {self.ns.name} not ready after {self.start_timeout:.0f}s; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.02)
        # the CLI agrees (API version negotiation, server info)
        self.docker("info", "--format", "{{.ServerVersion}}", timeout=30)

    # -- stop ------------------------------------------------------------------------------
    def stop(self) -> None:
        """Remove all containers, stop dockerd and containerd (by PID: SIGTERM, then SIGKILL),
        then sweep anything a crash left (shims, container processes, mounts). The data root is
        kept, so :meth:`start` brings the same images back."""
        t0 = time.monotonic()
        if self.running:
            ids = self.docker("ps", "-aq", check=False, timeout=30).stdout.split()
            if ids:
                self.docker("rm", "-f", *ids, check=False, timeout=60)
        _terminate(self._dockerd, self.stop_timeout)
        _terminate(self._containerd, 5.0)
        self._sweep()
        self.timings["stop"] = time.monotonic() - t0

    def _own_args(self) -> tuple[str, ...]:
        """Command-line arguments that only this engine's processes carry."""
        return (
            str(self.containerd_socket),  # shims: -address <socket>
            f"--data-root={self.data_root}",  # dockerd
            str(self.workdir / "containerd.toml"),  # containerd --config <file>
        )

    def _sweep(self) -> None:
        strays = _pids_with_arg(*self._own_args())
        sockets = [s for s in map(_shim_socket, strays) if s is not None]
        _kill_pids(strays)
        for cg in self._cgroup_dirs():
            procs = cg / "cgroup.procs"
            with contextlib.suppress(OSError):
                _kill_pids(int(p) for p in procs.read_text().split())
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in strays) and time.monotonic() < deadline:
            time.sleep(0.02)
        for sock in sockets:  # a killed shim leaves its socket in /run/containerd/s
            with contextlib.suppress(OSError):
                sock.unlink()
        for mnt in _mounts_under(self.workdir):
            if subprocess.run(["umount", mnt], capture_output=True, check=False).returncode:
                subprocess.run(["umount", "-l", mnt], capture_output=True, check=False)
        for cg in self._cgroup_dirs():
            for _ in range(50):  # a killed process leaves its cgroup a moment later
                try:
                    cg.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)

    def _cgroup_dirs(self) -> list[Path]:
        """Our cgroup-parent directories (and their children, deepest first) in every hierarchy."""
        found: list[Path] = []
        rel = self.cgroup_parent.strip("/")
        for mnt in _cgroup_mounts():
            top = mnt / rel
            if top.is_dir():
                found += [Path(d) for d, _, _ in os.walk(top)]
        return sorted(found, key=lambda p: len(p.parts), reverse=True)

    def close(self) -> None:
        """Stop the engine and remove its files (kept with FLANNELD_LAB_KEEP=1). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.stop()
        if os.environ.get("FLANNELD_LAB_KEEP") != "1" and not _mounts_under(self.workdir):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def leftovers(self) -> list[str]:
        """Anything of this engine still present: processes, mounts, cgroups (empty = clean)."""
        left: list[str] = []
        for what, proc in (("dockerd", self._dockerd), ("containerd", self._containerd)):
            if proc is not None and proc.poll() is None:
                left.append(f"{what} pid {proc.pid}")
        left += [f"process {p}" for p in _pids_with_arg(*self._own_args())]
        left += [f"mount {m}" for m in _mounts_under(self.workdir)]
        left += [f"cgroup {c}" for c in self._cgroup_dirs()]
        return left

    # -- docker CLI ------------------------------------------------------------------------
    def docker(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 60.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``docker -H unix://<our socket> args...`` (output captured as text)."""
        argv = [self.cli, "-H", self.host, *args]
        env = _clean_env({"DOCKER_CONFIG": str(self.workdir / "cli")})
        try:
            proc = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=timeout,
                input=input,
                env=env,
                check=False,
            )
        except subprocess.TimeoutExpired:
            what = f"`docker {shlex.join(args)}` ({self.ns.name})"
            raise DockerLabError(f"{what} timed out after {timeout}s") from None
        if check and proc.returncode != 0:
            err = (proc.stderr or proc.stdout).strip().replace("\n", " | ")
            raise DockerLabError(
                f"`docker {shlex.join(args)}` ({self.ns.name}) exited {proc.returncode}: {err}"
            )
        return proc

    def inspect(self, container: str) -> dict[str, Any]:
        data: list[dict[str, Any]] = json.loads(self.docker("inspect", container).stdout)
        return data[0]

    def container_ip(self, container: str) -> IPv4Address:
        """The container's address on the default bridge network."""
        info = self.inspect(container)
        ip = info["NetworkSettings"].get("IPAddress") or ""
        if not ip:
            nets = info["NetworkSettings"].get("Networks") or {}
            ip = next((n.get("IPAddress") for n in nets.values() if n.get("IPAddress")), "")
        if not ip:
            raise DockerLabError(f"container {container} has no IPv4 address")
        return IPv4Address(ip)

    def run_container(
        self,
        name: str,
        image: str = TEST_IMAGE,
        cmd: Sequence[str] | None = None,
        *,
        extra: Sequence[str] = (),
    ) -> RunningContainer:
        """``docker run -d --init --name name extra... image cmd...``; ``cmd`` defaults to the
        peer server (busybox httpd on :data:`PEER_PORT`). Returns id, name and IP address."""
        argv = ["run", "-d", "--init", "--name", name, "--hostname", name, *extra, image]
        argv += list(PEER_SERVER_CMD if cmd is None else cmd)
        cid = self.docker(*argv, timeout=60).stdout.strip()
        info = self.inspect(cid)
        if not info["State"].get("Running"):
            logs = self.docker("logs", cid, check=False).stdout[-2000:]
            raise DockerLabError(f"container {name} is not running: {info['State']}; logs: {logs}")
        return RunningContainer(self, cid, name, self.container_ip(cid))

    def exec(
        self,
        container: str,
        argv: Sequence[str],
        *,
        check: bool = False,
        timeout: float = 60.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``docker exec [-i] container argv...``."""
        flags = ["-i"] if input is not None else []
        return self.docker(
            "exec", *flags, container, *argv, check=check, timeout=timeout, input=input
        )

    def container_mtu(self, container: str, ifname: str = "eth0") -> int:
        proc = self.exec(container, ["cat", f"/sys/class/net/{ifname}/mtu"], check=True)
        return int(proc.stdout.strip())

    def containers(self) -> list[str]:
        """IDs of all containers (running or not)."""
        return self.docker("ps", "-aq", "--no-trunc").stdout.split()

    def bridge_addresses(self, bridge: str = "docker0") -> list[str]:
        """CIDRs on the docker bridge in the host namespace."""
        return [str(a) for a in self.ns.addresses(bridge)]

    def __repr__(self) -> str:
        return f"Dockerd({self.ns.name}, pid={self.pid}, socket={self.socket_path})"


def leftovers(lab: Lab, engines: Iterable[Dockerd]) -> list[str]:
    """What ``lab`` and ``engines`` left behind after closing: namespaces with the lab's prefix,
    engine processes, shims, mounts, cgroups (empty = clean)."""
    left = [f"namespace {n}" for n in lab_namespaces(lab.prefix + "-")]
    for d in engines:
        left += [f"{d.ns.name}: {x}" for x in d.leftovers()]
    return left


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _terminate(proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """SIGTERM by PID, wait, SIGKILL; then collect."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue
    print(f"lab.docker: pid {proc.pid} survived SIGKILL", file=sys.stderr)
