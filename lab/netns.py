"""Multi-host test topologies built from network namespaces (root only).

A :class:`Lab` owns everything it creates: namespaces, the links inside them, and the long-running
processes started in them. Every creation registers its undo on a cleanup stack *before* the
creation runs, so :meth:`Lab.close` (idempotent, also run by ``with`` and at interpreter exit)
removes all of it even when a build step failed half way.

Nothing here touches the root namespace: every ``ip`` command carries ``-n <ns>`` or runs under
``ip netns exec``, and veth pairs are created with both ends directly inside their namespaces.

Names: each lab has a unique prefix ``fp<pid % 10000><3 random chars>`` and its namespaces are
``<prefix>-<suffix>``. Interface names only need to be unique inside their namespace, so the
topology builders use fixed, readable ones (``eth0``, ``br0``, ``cbr0``).

A lab whose process died without closing it (SIGKILL) leaves an owner file in
``/run/flanneld-py-lab``; the next :class:`Lab` removes such namespaces once the owner process is
gone (checked by PID, process start time and PID namespace).

Typical use::

    with Lab() as lab:
        topo = lab.flannel_topology(n_hosts=2)
        h1, h2 = topo.hosts
        c1 = lab.add_container_bridge(h1, "10.5.1.0/24")
        h1.run(["ping", "-c1", "-W2", str(h2.address)])
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import random
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

__all__ = [
    "Container",
    "Lab",
    "LabCommandError",
    "LabError",
    "Netns",
    "Topology",
    "lab_namespaces",
    "ping_argv",
    "reap_stale_labs",
    "wait_for",
]

OWNER_DIR = Path("/run/flanneld-py-lab")
NETNS_DIR = Path("/run/netns")
#: every lab prefix starts with this
PREFIX_HEAD = "fp"


class LabError(RuntimeError):
    """A lab build step failed (one line: what, and the command's error output)."""


class LabCommandError(subprocess.CalledProcessError, LabError):
    """A command run by the lab exited non-zero. ``str()`` includes the command's stderr."""

    def __str__(self) -> str:
        cmd = " ".join(self.cmd) if isinstance(self.cmd, list | tuple) else str(self.cmd)
        err = (self.stderr or self.stdout or "").strip().replace("\n", " | ")
        return f"`{cmd}` exited {self.returncode}: {err or '(no output)'}"


def _run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 60.0,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    argv = [str(a) for a in argv]
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, input=input, check=False
        )
    except FileNotFoundError as exc:
        raise LabError(f"`{argv[0]}` not found: {exc}") from None
    if check and proc.returncode != 0:
        raise LabCommandError(proc.returncode, argv, proc.stdout, proc.stderr)
    return proc


def ping_argv(*args: object) -> list[str]:
    """The ping command followed by ``args`` (as strings): iputils ``ping``, or busybox's when
    it is missing (Debian often lacks iputils); :class:`LabError` if there is neither."""
    if shutil.which("ping"):
        cmd = ["ping"]
    elif shutil.which("busybox"):
        cmd = ["busybox", "ping"]
    else:
        raise LabError("no ping: apt-get install iputils-ping or busybox-static")
    return cmd + [str(a) for a in args]


def lab_namespaces(prefix: str = PREFIX_HEAD) -> list[str]:
    """Names of existing network namespaces starting with ``prefix``."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


# ---------------------------------------------------------------------------------------------
# processes


def _stop_process(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """SIGTERM the process group of ``proc`` (we started it in its own session), then SIGKILL."""
    if proc.poll() is not None:
        return
    pgid = proc.pid  # start_new_session=True: the child leads its own process group
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        # the leader is gone; make sure no child of its group lingers
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        return


# ---------------------------------------------------------------------------------------------
# namespaces


class Netns:
    """One network namespace of a lab. Commands run in it via ``ip netns exec``."""

    def __init__(self, name: str, lab: Lab, address: IPv4Address | None = None) -> None:
        self.name = name
        self.lab = lab
        self._address = address

    @property
    def address(self) -> IPv4Address:
        """The main address a topology builder gave it (underlay address of a host, address of
        a container); :class:`LabError` for a bare namespace until one is assigned."""
        if self._address is None:
            raise LabError(f"namespace {self.name} has no main address")
        return self._address

    @address.setter
    def address(self, value: IPv4Address | str | None) -> None:
        self._address = None if value is None else IPv4Address(value)

    @property
    def has_address(self) -> bool:
        return self._address is not None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, address={self._address})"

    # --- commands ---------------------------------------------------------------------------
    def run(
        self,
        argv: Sequence[str],
        check: bool = True,
        *,
        timeout: float = 60.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the namespace; output captured as text."""
        return _run(
            ["ip", "netns", "exec", self.name, *argv], check=check, timeout=timeout, input=input
        )

    def popen(
        self,
        argv: Sequence[str],
        log_path: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        *,
        stop_timeout: float = 5.0,
    ) -> subprocess.Popen[bytes]:
        """Start a long-running process in the namespace; stdout+stderr go to ``log_path``.

        ``env`` entries are added to the inherited environment. The process runs in its own
        session and is stopped (SIGTERM to its group, then SIGKILL) when the lab closes, or earlier
        with :meth:`Lab.stop`. ``log_path`` defaults to a file in the lab's temporary directory
        (``proc.log_path`` tells which).
        """
        return self.lab._popen(
            ["ip", "netns", "exec", self.name, *argv], log_path, env, stop_timeout
        )

    def sysctl(self, key: str, val: str | int) -> None:
        """Set a sysctl of this namespace (``net.*`` keys are per namespace)."""
        path = "/proc/sys/" + key.replace(".", "/")
        self.run(["sh", "-c", 'echo "$1" > "$2"', "sh", str(val), path])

    def ping(self, dst: str | IPv4Address, count: int = 1, timeout: float = 2.0) -> bool:
        """True if ``dst`` answers an ICMP echo from this namespace.

        Debian's iputils ``ping`` is often not installed; busybox's is used when it is missing.
        """
        argv = ping_argv("-c", count, "-W", max(1, round(timeout)), dst)
        return self.run(argv, check=False, timeout=timeout * count + 10).returncode == 0

    def read_sysctl(self, key: str) -> str:
        path = "/proc/sys/" + key.replace(".", "/")
        return self.run(["cat", path]).stdout.strip()

    # --- ip(8) ------------------------------------------------------------------------------
    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``ip -n <ns> args...``"""
        return _run(["ip", "-n", self.name, *args], check=check)

    def ip_json(self, *args: str) -> list[dict[str, Any]]:
        """``ip -n <ns> -j args...`` parsed (``[]`` for empty output)."""
        out = self.ip("-j", *args).stdout.strip()
        data: list[dict[str, Any]] = json.loads(out) if out else []
        return data

    def link_up(self, ifname: str) -> None:
        self.ip("link", "set", "dev", ifname, "up")

    def set_mtu(self, ifname: str, mtu: int) -> None:
        self.ip("link", "set", "dev", ifname, "mtu", str(mtu))

    def add_addr(self, ifname: str, cidr: str | IPv4Interface) -> None:
        """Add an address in CIDR form (``10.99.0.11/24``)."""
        self.ip("addr", "add", str(cidr), "dev", ifname)

    def add_route(
        self,
        dst: str | IPv4Network,
        via: str | IPv4Address | None = None,
        dev: str | None = None,
        *extra: str,
    ) -> None:
        """``ip route replace dst [via X] [dev D] extra...`` (``dst`` may be ``default``)."""
        argv = ["route", "replace", str(dst)]
        if via is not None:
            argv += ["via", str(via)]
        if dev is not None:
            argv += ["dev", dev]
        self.ip(*argv, *extra)

    def add_bridge(self, ifname: str, mtu: int | None = None) -> None:
        """Create a bridge (no STP, no forward delay) and bring it up."""
        argv = ["link", "add", ifname]
        if mtu is not None:
            argv += ["mtu", str(mtu)]
        self.ip(*argv, "type", "bridge", "stp_state", "0", "forward_delay", "0")
        self.link_up(ifname)

    def attach(self, ifname: str, bridge: str) -> None:
        """Enslave ``ifname`` to ``bridge`` and bring it up."""
        self.ip("link", "set", "dev", ifname, "master", bridge)
        self.link_up(ifname)

    def addresses(self, ifname: str) -> list[IPv4Interface]:
        """IPv4 addresses of ``ifname``."""
        out: list[IPv4Interface] = []
        for link in self.ip_json("-4", "addr", "show", "dev", ifname):
            for a in link.get("addr_info", []):
                if a.get("family") == "inet":
                    out.append(IPv4Interface(f"{a['local']}/{a['prefixlen']}"))
        return out

    def __str__(self) -> str:
        return self.name


class Container(Netns):
    """A "container" namespace on a host's docker0-like bridge."""

    def __init__(
        self,
        name: str,
        lab: Lab,
        address: IPv4Address,
        *,
        host: Netns,
        gateway: IPv4Address,
        subnet: IPv4Network,
        bridge: str,
        host_veth: str,
    ) -> None:
        super().__init__(name, lab, address)
        self.host = host
        #: the bridge's address (the container's default gateway)
        self.gateway = gateway
        self.subnet = subnet
        #: bridge name in the host
        self.bridge = bridge
        #: name of the host-side veth end
        self.host_veth = host_veth


@dataclass
class Topology:
    """What :meth:`Lab.flannel_topology` built."""

    underlay: Netns
    hosts: list[Netns]
    underlay_net: IPv4Network
    #: address of the underlay bridge inside ``underlay``; every host's default gateway, and the
    #: address etcd can listen on (run it in ``underlay``)
    gateway: IPv4Address
    mtu: int

    @property
    def etcd_address(self) -> IPv4Address:
        return self.gateway


# ---------------------------------------------------------------------------------------------
# the lab

_open_labs: weakref.WeakSet[Lab] = weakref.WeakSet()


@atexit.register
def _close_open_labs() -> None:  # pragma: no cover - interpreter exit
    for lab in list(_open_labs):
        lab.close()


def _proc_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # field 22 (starttime); the command name (field 2) may contain spaces, so split after ')'
    return stat.rsplit(")", 1)[1].split()[19]


def _pidns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return "?"


def reap_stale_labs() -> list[str]:
    """Delete namespaces of labs whose owner process is gone; return their names.

    Only labs recorded in ``/run/flanneld-py-lab`` by a process of this PID namespace are
    considered, so a lab that is still running (here or in another PID namespace) is never touched.
    """
    removed: list[str] = []
    try:
        entries = list(OWNER_DIR.iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        try:
            pid_s, start, pidns = entry.read_text().split()[:3]
        except (OSError, ValueError):
            continue
        if pidns != _pidns() or _proc_start_time(int(pid_s)) == start:
            continue  # not ours to judge, or the owner is alive
        for name in lab_namespaces(entry.name + "-"):
            if _run(["ip", "netns", "del", name], check=False).returncode == 0:
                removed.append(name)
        with contextlib.suppress(OSError):
            entry.unlink()
    return removed


class Lab:
    """Owner of a set of namespaces and processes; a context manager. See the module doc."""

    def __init__(self, prefix: str | None = None, *, reap_stale: bool = True) -> None:
        if os.geteuid() != 0:
            raise LabError("network namespace labs need root")
        for tool in ("ip", "sh"):
            if shutil.which(tool) is None:
                raise LabError(f"`{tool}` not found (apt-get install iproute2)")
        if reap_stale:
            reap_stale_labs()
        if prefix is None:
            rnd = "".join(random.choices(string.ascii_lowercase + string.digits, k=3))
            prefix = f"{PREFIX_HEAD}{os.getpid() % 10000}{rnd}"
        self.prefix = prefix
        self._cleanups: list[tuple[str, Callable[[], None]]] = []
        self._lock = threading.Lock()
        self._closed = False
        self._tmpdir: Path | None = None
        self._counters: dict[str, int] = {}
        self.namespaces: dict[str, Netns] = {}
        self.processes: list[subprocess.Popen[bytes]] = []
        #: errors met while closing (also printed to stderr)
        self.cleanup_errors: list[str] = []
        self._write_owner()
        _open_labs.add(self)

    # --- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def defer(self, what: str, fn: Callable[[], None]) -> None:
        """Register ``fn`` to run at :meth:`close` (last registered runs first)."""
        with self._lock:
            if self._closed:
                raise LabError("lab is closed")
            self._cleanups.append((what, fn))

    def close(self) -> None:
        """Undo everything, newest first. Idempotent; never raises (errors go to stderr)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            cleanups, self._cleanups = self._cleanups, []
        for what, fn in reversed(cleanups):
            try:
                fn()
            except Exception as exc:  # keep going: the rest must still be torn down
                msg = f"lab {self.prefix}: cleanup of {what} failed: {exc}"
                self.cleanup_errors.append(msg)
                print(msg, file=sys.stderr)
        # belt and braces: any namespace with our prefix that slipped through
        for name in lab_namespaces(self.prefix + "-"):
            _run(["ip", "netns", "del", name], check=False)
        if self._tmpdir is not None and os.environ.get("FLANNELD_LAB_KEEP") != "1":
            shutil.rmtree(self._tmpdir, ignore_errors=True)
        with contextlib.suppress(OSError):
            (OWNER_DIR / self.prefix).unlink()
        _open_labs.discard(self)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def tmpdir(self) -> Path:
        """A private temporary directory, removed at close (kept with FLANNELD_LAB_KEEP=1)."""
        if self._tmpdir is None:
            self._tmpdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        return self._tmpdir

    def _write_owner(self) -> None:
        try:
            OWNER_DIR.mkdir(parents=True, exist_ok=True)
            start = _proc_start_time(os.getpid())
            (OWNER_DIR / self.prefix).write_text(f"{os.getpid()} {start} {_pidns()}\n")
        except OSError:
            pass  # only needed to reap after a crash

    # --- namespaces -------------------------------------------------------------------------
    def netns(self, suffix: str, *, lo_up: bool = True) -> Netns:
        """Create namespace ``<prefix>-<suffix>`` (loopback up)."""
        return self._add_netns(Netns(name=f"{self.prefix}-{suffix}", lab=self), lo_up=lo_up)

    def _add_netns(self, ns: Netns, *, lo_up: bool = True) -> Netns:
        if ns.name in self.namespaces:
            raise LabError(f"namespace {ns.name} already exists in this lab")
        # register the undo first: if `ip netns add` fails half way, close still cleans up
        self.defer(f"namespace {ns.name}", lambda: self._del_netns(ns.name))
        _run(["ip", "netns", "add", ns.name])
        self.namespaces[ns.name] = ns
        if lo_up:
            ns.link_up("lo")
        return ns

    def _del_netns(self, name: str) -> None:
        self.namespaces.pop(name, None)
        if not (NETNS_DIR / name).exists():
            return
        proc = _run(["ip", "netns", "del", name], check=False)
        if proc.returncode != 0 and (NETNS_DIR / name).exists():
            raise LabCommandError(proc.returncode, proc.args, proc.stdout, proc.stderr)

    def _unique(self, kind: str) -> int:
        self._counters[kind] = self._counters.get(kind, 0) + 1
        return self._counters[kind]

    # --- links ------------------------------------------------------------------------------
    def veth(
        self,
        ns_a: Netns,
        name_a: str,
        ns_b: Netns,
        name_b: str,
        *,
        mtu: int | None = None,
        up: bool = True,
    ) -> None:
        """A veth pair with ``name_a`` in ``ns_a`` and ``name_b`` in ``ns_b`` (created in place).

        Removed with its namespaces (deleting either end deletes both).
        """
        for n in (name_a, name_b):
            if not 0 < len(n) <= 15:
                raise LabError(f"interface name {n!r} must be 1-15 characters")
        argv = ["link", "add", name_a]
        if mtu is not None:
            argv += ["mtu", str(mtu)]
        argv += ["type", "veth", "peer", "name", name_b, "netns", ns_b.name]
        if mtu is not None:
            argv += ["mtu", str(mtu)]
        ns_a.ip(*argv)
        if up:
            ns_a.link_up(name_a)
            ns_b.link_up(name_b)

    # --- processes --------------------------------------------------------------------------
    def _popen(
        self,
        argv: Sequence[str],
        log_path: str | os.PathLike[str] | None,
        env: Mapping[str, str] | None,
        stop_timeout: float,
    ) -> subprocess.Popen[bytes]:
        if log_path is None:
            log_path = self.tmpdir / f"{Path(argv[4]).name}-{self._unique('log')}.log"
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        # hold the lock so that close() cannot run between the start and the registration
        with open(log_path, "ab") as log, self._lock:
            if self._closed:
                raise LabError("lab is closed")
            proc = subprocess.Popen(
                [str(a) for a in argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
                start_new_session=True,
            )
            self._cleanups.append(
                (f"process {proc.pid} ({argv[4]})", lambda: _stop_process(proc, stop_timeout))
            )
        proc.log_path = Path(log_path)  # type: ignore[attr-defined]
        self.processes.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 5.0) -> int:
        """Stop a process started by :meth:`Netns.popen` now; returns its exit status."""
        _stop_process(proc, timeout)
        return proc.returncode

    # --- topologies -------------------------------------------------------------------------
    def flannel_topology(
        self, n_hosts: int = 3, underlay_net: str = "10.99.0.0/24", mtu: int = 1500
    ) -> Topology:
        """Underlay namespace ``<p>-ul`` with bridge ``br0`` holding the network's .1, and hosts
        ``<p>-h1..hN`` each with ``eth0`` (.10+i) on that bridge and a default route via .1.

        etcd can run in the underlay namespace on the .1 address (``topology.etcd_address``).
        """
        net = IPv4Network(underlay_net)
        if n_hosts < 1 or net.num_addresses < 16 + n_hosts:
            raise LabError(f"{underlay_net} is too small for {n_hosts} hosts")
        gw = net.network_address + 1
        ul = self.netns("ul")
        ul.address = gw
        # the underlay is a plain switch: keep the bridge out of iptables
        for key in ("net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables"):
            if Path("/proc/sys/" + key.replace(".", "/")).exists():
                ul.sysctl(key, 0)
        ul.add_bridge("br0", mtu=mtu)
        ul.add_addr("br0", f"{gw}/{net.prefixlen}")
        hosts: list[Netns] = []
        for i in range(1, n_hosts + 1):
            h = self.netns(f"h{i}")
            h.address = net.network_address + 10 + i
            self.veth(h, "eth0", ul, f"h{i}", mtu=mtu)
            ul.attach(f"h{i}", "br0")
            h.add_addr("eth0", f"{h.address}/{net.prefixlen}")
            h.add_route("default", via=gw, dev="eth0")
            hosts.append(h)
        return Topology(underlay=ul, hosts=hosts, underlay_net=net, gateway=gw, mtu=mtu)

    def add_container_bridge(
        self,
        host: Netns,
        subnet: str | IPv4Network,
        *,
        bridge: str = "cbr0",
        address: str | IPv4Address | None = None,
        mtu: int | None = None,
        ip_forward: bool = True,
    ) -> Container:
        """A docker0-like bridge in ``host`` holding ``subnet``'s .1, and one container namespace
        ``<p>-c<i>`` with ``eth0`` at ``address`` (default .2) and a default route via .1.

        Calling it again for the same host and bridge adds another container to that bridge
        (give another ``address``). Sets ``net.ipv4.ip_forward=1`` in the host unless told not to.
        """
        net = IPv4Network(subnet)
        gw = net.network_address + 1
        addr = IPv4Address(address) if address is not None else net.network_address + 2
        if addr not in net or addr in (gw, net.network_address, net.broadcast_address):
            raise LabError(f"container address {addr} is not a usable host address of {net}")
        existing = {link["ifname"] for link in host.ip_json("link", "show")}
        if bridge not in existing:
            host.add_bridge(bridge, mtu=mtu)
            host.add_addr(bridge, f"{gw}/{net.prefixlen}")
        if ip_forward:
            host.sysctl("net.ipv4.ip_forward", 1)
        i = self._unique("container")
        c = Container(
            name=f"{self.prefix}-c{i}",
            lab=self,
            address=addr,
            host=host,
            gateway=gw,
            subnet=net,
            bridge=bridge,
            host_veth=f"vc{i}",
        )
        self._add_netns(c)
        self.veth(c, "eth0", host, c.host_veth, mtu=mtu)
        host.attach(c.host_veth, bridge)
        c.add_addr("eth0", f"{addr}/{net.prefixlen}")
        c.add_route("default", via=gw, dev="eth0")
        return c


def wait_for(
    cond: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = "condition"
) -> Any:
    """Poll ``cond`` until it returns something truthy; raise :class:`LabError` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        val = cond()
        if val:
            return val
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
