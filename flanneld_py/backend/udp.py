"""The udp backend: our TUN device (``flannel0``), one UDP socket and the packet engine.

Wire-compatible with flannel's udp backend: every inner IPv4 packet travels as one UDP datagram
to ``<peer PublicIP>:<Backend.Port>`` (8285). The lease carries no BackendType, as real flanneld
writes it. A host whose C engine completes partial TCP/UDP checksums (offload auto, TUN with a
virtio header) says so in its lease's BackendData, ``{"Capabilities":["partial-csum"]}``; its
peers' C engines then leave those checksums partial when they send to it (no pass over the
payload on either side). Real flanneld's udp backend reads only PublicIP from a lease, so the key
is safe in a mixed network; to a host that does not advertise it (real flanneld, --offload off,
the Python engine) every packet goes out with complete checksums.

The TUN gets the lease's network address as /32 and a route for the whole Network; the engine
owns the per-peer routes (set/del commands). The TUN lives as long as the process: when the
daemon stops, the kernel removes flannel0 with its route (the daemon's guard route then refuses
the network's traffic until it is back).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import Any, TypeVar, cast

from flanneld_py import netlink
from flanneld_py.backend._base import BackendError, LeaseAttrs
from flanneld_py.config import BackendConfig
from flanneld_py.engine import (
    CEngine,
    Engine,
    EngineConfig,
    EngineGroup,
    make_engine,
    offload_status,
    resolve_kind,
    sum_counters,
    wants_vnet_hdr,
)
from flanneld_py.handover import Handover
from flanneld_py.lease import Lease, LeaseAdded, LeaseEvent
from flanneld_py.netlink import ExternalInterface
from flanneld_py.reuseport import attach_inner_flow_steering
from flanneld_py.tun import (
    ENGINE_OFFLOADS,
    IFF_MULTI_QUEUE,
    IFF_NO_PI,
    IFF_TUN,
    IFF_VNET_HDR,
    TunError,
    link_is_up,
    open_tun,
    probe_offloads,
    tun_info,
    vnet_hdr_supported,
)

__all__ = [
    "CAPABILITIES",
    "ENCAP_OVERHEAD",
    "FD_SOCK",
    "FD_TUN",
    "PARTIAL_CSUM",
    "UdpBackend",
    "bind_udp",
    "peer_traffic",
    "takes_partial_csum",
]

#: the most engine threads --engine-threads 0 starts (the flag's own limit)
MAX_AUTO_THREADS = 64

#: systemd fd-store names of the TUN queues and of the UDP sockets (handover.py)
FD_TUN = "udp-tun"
FD_SOCK = "udp-sock"
#: the TUN flags that must match for a takeover
TUN_FLAG_MASK = IFF_TUN | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE

#: BackendData key of a udp lease listing what its host's engine can take
CAPABILITIES = "Capabilities"
#: capability: the host completes TCP/UDP checksums that a sender left partial
PARTIAL_CSUM = "partial-csum"


def takes_partial_csum(lease: Lease) -> bool:
    """Whether the lease's host completes partial checksums (its BackendData lists it).

    The key is matched case-insensitively, as Go's decoder matches the lease's other fields (the
    exact spelling wins if both are there); the capability names in the list are exact."""
    data = lease.backend_data or {}
    caps = data.get(CAPABILITIES)
    if CAPABILITIES not in data:
        want = CAPABILITIES.lower()
        caps = next((v for k, v in data.items() if str(k).lower() == want), None)
    return isinstance(caps, list) and PARTIAL_CSUM in caps


def peer_traffic(engine: Engine) -> dict[str, dict[str, Any]]:
    """Per route of ``engine``: ``{"public_ip": …, <PEER_COUNTERS>…}``, keyed by subnet (str). The
    counters are absent for a route the engine does not count (not applied yet, or beyond the C
    engine's ``PEER_SLOTS``)."""
    counts = engine.peer_stats()
    return {
        str(subnet): {"public_ip": str(ip), **counts.get(subnet, {})}
        for subnet, ip in sorted(engine.routes().items())
    }


log = logging.getLogger("flanneld_py.backend.udp")
_T = TypeVar("_T")

#: outer IPv4 header + UDP header
ENCAP_OVERHEAD = 28


def bind_udp(address: IPv4Address, port: int, *, reuseport: bool = False) -> socket.socket:
    """The encapsulation socket, bound like flanneld's to <interface address>:<port>.

    No SO_REUSEADDR: with it, any other socket that sets the option, of any user, could bind the
    same address and port and be handed our peers' datagrams. ``reuseport`` (several engine
    threads: one socket each) sets SO_REUSEPORT, whose group the kernel opens only to sockets of
    the same user (root); its steering program (``reuseport.py``) picks only among ours.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((str(address), port))
    except OSError as e:
        sock.close()
        hint = (
            f"another process holds it (see `ss -ulpn sport = :{port}`); stop it, or give the "
            "network another Backend.Port"
            if e.errno == errno.EADDRINUSE
            else "check --iface/--public-ip"
        )
        err = OSError(f"cannot bind UDP {address}:{port}: {e.strerror}; {hint}")
        err.errno = e.errno  # for a caller that retries on EADDRINUSE; the message stays one line
        raise err from None
    sock.setblocking(False)
    return sock


class UdpBackend:
    """``Backend`` "udp": TUN ``tun_name`` + UDP socket + ``engine`` ("auto", "c", "python")."""

    name = "udp"
    #: the engine is watched every second: a dead engine ends the daemon (systemd restarts it)
    reconcile_interval = 1.0

    def __init__(
        self,
        cfg: BackendConfig,
        network: IPv4Network,
        ext: ExternalInterface,
        *,
        tun_name: str = "flannel0",
        engine: str = "auto",
        offload: str = "auto",
        engine_threads: int = 1,
        handover: Handover | None = None,
    ) -> None:
        self.cfg = cfg
        self.network = network
        self.ext = ext
        self.tun_name = tun_name
        self.engine_kind = engine
        self.offload = offload
        #: engine threads asked for (0 = one per CPU); the Python engine always has one
        self.engine_threads = engine_threads
        self.lease: Lease | None = None
        #: one TUN queue fd and one UDP socket per engine thread
        self.tun_fds: list[int] = []
        self.socks: list[socket.socket] = []
        self.engine: Engine | None = None
        #: offloads whose runtime shutdown has been logged already
        self._offload_warned: set[str] = set()
        #: descriptors of the previous run (systemd's fd store), and where ours are kept
        self.handover = handover or Handover()
        #: whether this run took over the previous run's TUN and sockets
        self.taken_over = False
        #: whether we just closed the previous run's descriptors (systemd closes its copies)
        self._released = False
        self._engine_started = False

    @property
    def mtu(self) -> int:
        return self.ext.mtu - ENCAP_OVERHEAD

    async def prepare(self) -> LeaseAttrs:
        # the descriptors a previous run left in systemd's fd store, if they fit; else fail now,
        # not after a lease is taken, when we may not create the TUN device
        self._take_over()
        if not self.tun_fds:
            fd, _ = await self._open_tun(self.tun_name)
            os.close(fd)
        if self._vnet_hdr():  # our engine will complete partial checksums: tell the peers
            return LeaseAttrs(backend_data={CAPABILITIES: [PARTIAL_CSUM]})
        return LeaseAttrs()

    def _vnet_hdr(self) -> bool:
        """Whether our TUN carries a virtio header (C engine, offload auto, kernel support)."""
        return wants_vnet_hdr(self.engine_kind, self.offload) and vnet_hdr_supported()

    def _tun_flags(self, n: int) -> int:
        flags = IFF_TUN | IFF_NO_PI
        if self._vnet_hdr():
            flags |= IFF_VNET_HDR
        if n > 1:
            flags |= IFF_MULTI_QUEUE
        return flags

    def _take_over(self) -> None:
        """Adopt the TUN queues and UDP sockets of the previous run (systemd's fd store) when
        they are exactly what this run would create; otherwise close them (the old device goes
        with the last copy)."""
        tun_fds = self.handover.take(FD_TUN)
        sock_fds = self.handover.take(FD_SOCK)
        if not tun_fds and not sock_fds:
            return
        socks: list[socket.socket] = []
        for fd in sock_fds:
            try:
                socks.append(socket.socket(fileno=fd))
            except OSError:
                os.close(fd)
        why = self._unfit(tun_fds, socks)
        if why is None:
            for fd in tun_fds:
                os.set_blocking(fd, False)
            for sock in socks:
                sock.setblocking(False)
            self.tun_fds, self.socks = tun_fds, socks
            self.taken_over = True
            log.info(
                "took over %s (%d queues) and %d UDP sockets from the previous run: packets "
                "queued meanwhile are delivered now",
                self.tun_name,
                len(tun_fds),
                len(socks),
            )
            return
        log.info("not taking over the previous run's TUN and sockets (%s): creating new ones", why)
        for fd in tun_fds:
            os.close(fd)
        for sock in socks:
            sock.close()
        self.handover.forget(FD_TUN)
        self.handover.forget(FD_SOCK)
        self._released = True

    def _unfit(self, tun_fds: list[int], socks: list[socket.socket]) -> str | None:
        """Why the inherited descriptors do not fit this run (None: they do)."""
        n = self.threads()
        if len(tun_fds) != n or len(socks) != n:
            return f"{len(tun_fds)} TUN queues and {len(socks)} sockets, this run needs {n} of each"
        want = self._tun_flags(n)
        for fd in tun_fds:
            try:
                name, flags = tun_info(fd)
            except OSError as e:
                return f"not a TUN descriptor: {e.strerror}"
            if name != self.tun_name:
                return f"the device is {name}, this run uses {self.tun_name}"
            if flags & TUN_FLAG_MASK != want:
                return "the device was opened with other flags (offloads or engine threads changed)"
        for sock in socks:
            try:
                addr = sock.getsockname()
                reuse = sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
            except OSError as e:
                return f"not a socket: {e.strerror}"
            if sock.family != socket.AF_INET or sock.type != socket.SOCK_DGRAM:
                return "not a UDP socket"
            if addr != (str(self.ext.address), self.cfg.port):
                return f"socket bound to {addr[0]}:{addr[1]}, this run uses " + (
                    f"{self.ext.address}:{self.cfg.port}"
                )
            if bool(reuse) != (n > 1):
                return "socket opened for another number of engine threads"
        return None

    async def _while_released(
        self, make: Callable[[], _T], held: Callable[[Exception], bool]
    ) -> _T:
        """make(); right after we released the previous run's copies, systemd may take a
        moment to close its own: retry for up to 2 s while the error says they still hold what
        we need (the device, the address)."""
        deadline = asyncio.get_running_loop().time() + (2.0 if self._released else 0.0)
        while True:
            try:
                return make()
            except Exception as e:
                if not held(e) or asyncio.get_running_loop().time() >= deadline:
                    raise
                await asyncio.sleep(0.05)

    async def _open_tun(self, name: str, **kw: bool) -> tuple[int, str]:
        return await self._while_released(
            lambda: open_tun(name, **kw), lambda e: isinstance(e, TunError)
        )

    async def _bind_udp(self, *, reuseport: bool) -> socket.socket:
        return await self._while_released(
            lambda: bind_udp(self.ext.address, self.cfg.port, reuseport=reuseport),
            lambda e: isinstance(e, OSError) and e.errno == errno.EADDRINUSE,
        )

    async def _open_dataplane(self) -> None:
        """The TUN queues and UDP sockets (once: a new lease keeps them), handed to systemd's
        fd store so that a restart can take them over."""
        if self.tun_fds:
            return
        vnet = self._vnet_hdr()
        n = self.threads()
        try:
            fd, name = await self._open_tun(self.tun_name, vnet_hdr=vnet, multi_queue=n > 1)
            self.tun_fds.append(fd)
            while len(self.tun_fds) < n:  # the other queues of the same device
                self.tun_fds.append(open_tun(name, vnet_hdr=vnet, multi_queue=True)[0])
            self.socks = [await self._bind_udp(reuseport=n > 1)]
            while len(self.socks) < n:
                self.socks.append(await self._bind_udp(reuseport=True))
        except BaseException:
            self._close_fds()
            raise
        self.handover.keep(FD_TUN, self.tun_fds)
        self.handover.keep(FD_SOCK, [s.fileno() for s in self.socks])

    async def start(self, lease: Lease) -> None:
        if self.engine is not None:  # our subnet changed: a new engine for the new lease
            self.engine.stop()
            self.engine = None
        self._engine_started = False
        self.lease = lease
        subnet = lease.subnet
        # offloads: only the C engine reads/writes the TUN with a virtio header (TSO super-packets
        # in, coalesced GSO packets out); without kernel support the TUN is a plain one
        vnet = self._vnet_hdr()
        n = self.threads()
        await self._open_dataplane()
        try:
            tun_offloads = probe_offloads(self.tun_fds[0], ENGINE_OFFLOADS) if vnet else frozenset()
            await asyncio.to_thread(
                netlink.configure_tun, self.tun_name, subnet.network_address, self.network, self.mtu
            )
            if n > 1:
                attach_inner_flow_steering(self.socks[0], n)
            engines = [
                make_engine(
                    self.engine_kind,
                    EngineConfig(
                        tun_fd=tfd,
                        udp_fd=sock.fileno(),
                        local_subnet=subnet,
                        local_addr=subnet.network_address,
                        port=self.cfg.port,
                        mtu=self.mtu,
                        offload=self.offload,
                        vnet_hdr=vnet,
                        tun_offloads=tun_offloads,
                    ),
                )
                for tfd, sock in zip(self.tun_fds, self.socks, strict=True)
            ]
        except BaseException:
            self._close_fds()
            raise
        # n > 1 only for the C engine (threads())
        self.engine = engines[0] if n == 1 else EngineGroup(cast(list[CEngine], engines))
        log.info(
            "data plane up: %s %s/32 mtu %d, route %s, UDP %s:%d, %s engine%s, offloads: %s",
            self.tun_name,
            subnet.network_address,
            self.mtu,
            self.network,
            self.ext.address,
            self.cfg.port,
            self.engine.kind,
            f" x {n} threads" if n > 1 else "",
            ", ".join(offload_status(self.engine)["active"]) or "none",
        )

    async def activate(self) -> None:
        """Start moving packets, now that the known peers' routes are in the engine (what the
        TUN and the sockets queued meanwhile finds its way instead of "no route")."""
        if self.engine is not None and not self._engine_started:
            self.engine.start()
            self._engine_started = True

    def threads(self) -> int:
        """Engine threads to run: as asked (0 = one per CPU this process may use, at most
        MAX_AUTO_THREADS), but one for the Python engine."""
        if resolve_kind(self.engine_kind) == "python":
            if self.engine_threads > 1:
                log.info("the Python engine runs one thread: --engine-threads ignored")
            return 1
        if self.engine_threads > 0:
            return self.engine_threads
        return max(1, min(MAX_AUTO_THREADS, len(os.sched_getaffinity(0))))

    def accepts(self, lease: Lease) -> bool:
        # real flanneld writes no BackendType for udp leases; "udp" is accepted too
        return lease.backend_type in (None, "udp")

    async def apply(self, events: Sequence[LeaseEvent]) -> None:
        if self.engine is None:
            return
        for ev in events:
            if isinstance(ev, LeaseAdded):
                self.engine.set_route(
                    ev.lease.subnet, ev.lease.public_ip, partial_csum=takes_partial_csum(ev.lease)
                )
            else:
                self.engine.del_route(ev.subnet)

    async def reconcile(self, peers: Mapping[IPv4Network, Lease]) -> list[str]:
        """A dead engine is fatal (BackendError); offloads the engine turned off are logged."""
        if self.engine is not None and not self.engine.alive():
            raise BackendError(f"packet engine stopped: {self.engine.error()}")
        self._check_offloads()
        return []

    def _check_offloads(self) -> None:
        if self.engine is None:
            return
        counters = offload_status(self.engine)["counters"]
        for name, what in (
            ("gso", "UDP GSO: the kernel refused a segmented send"),
            ("tun_gso", "coalesced TUN writes: the TUN refused a GSO packet"),
        ):
            if counters.get(f"{name}_errors") and name not in self._offload_warned:
                self._offload_warned.add(name)
                err = counters.get(f"{name}_errno", 0)
                log.warning(
                    "turned off %s (%s); sending one packet per syscall from now on",
                    what,
                    os.strerror(err) if err else "unknown error",
                )

    def alive(self) -> str | None:
        if self.engine is None:
            return "data plane not running"
        if not self.engine.alive():
            return f"packet engine stopped: {self.engine.error()}"
        up = link_is_up(self.tun_name)
        if up is None:
            return f"TUN device {self.tun_name} is gone"
        if not up:
            return f"TUN device {self.tun_name} is down"
        return None

    def status(self) -> dict[str, Any]:
        if self.engine is None:
            return {"type": self.name, "device": self.tun_name, "engine": None, "offloads": None}
        threads = self.engine.thread_stats() if isinstance(self.engine, EngineGroup) else None
        # with threads: the sums of this one snapshot, so that the document adds up
        stats = sum_counters(threads) if threads is not None else self.engine.stats()
        out: dict[str, Any] = {
            "type": self.name,
            "device": self.tun_name,
            "port": self.cfg.port,
            "engine": {"kind": self.engine.kind, **stats},
            "offloads": offload_status(self.engine),
        }
        if threads is not None:  # the same counters, per thread
            out["engine"]["threads"] = threads
        out["peers"] = peer_traffic(self.engine)
        return out

    def _close_fds(self) -> None:
        if self.engine is not None:
            self.engine.stop()
            self.engine = None
        for sock in self.socks:
            sock.close()
        self.socks = []
        for fd in self.tun_fds:  # the last copy closed: the kernel removes flannel0 and its routes
            os.close(fd)
        self.tun_fds = []

    async def close(self, *, restarting: bool = False) -> None:
        """Stop the engine and close our descriptors. ``restarting``: systemd is restarting
        us, so its copies stay (flannel0 lives on for the next run); otherwise they go too."""
        engine = self.engine
        stats = engine.stats() if engine else {}
        offl = offload_status(engine)["counters"] if engine else {}
        self._close_fds()
        if not restarting:
            self.handover.forget(FD_TUN)
            self.handover.forget(FD_SOCK)
        if stats:
            log.info(
                "engine counters at exit: %s", " ".join(f"{k}={v}" for k, v in stats.items() if v)
            )
        if any(offl.values()):
            log.info(
                "offload counters at exit: %s", " ".join(f"{k}={v}" for k, v in offl.items() if v)
            )
