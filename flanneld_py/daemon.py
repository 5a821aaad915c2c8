"""The daemon: orchestration of lease, data plane, firewall, files and systemd in one event loop.

Startup order (what systemd and docker rely on):
  external interface -> etcd config -> lease -> TUN + routes -> engine -> peer snapshot ->
  firewall -> subnet.env + docker opts -> READY=1 -> renew / watch / resync / watchdog tasks.
Shutdown (SIGTERM/SIGINT): STOPPING=1, cancel tasks, stop the engine, remove our firewall rules,
close the TUN; the lease is kept so a restart gets the same subnet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from flanneld_py import __version__, files, netlink, systemd
from flanneld_py.config import NetworkConfig
from flanneld_py.engine import Engine, EngineError, make_engine, offload_status, wants_vnet_hdr
from flanneld_py.firewall import Firewall, FirewallError, FirewallUnavailable
from flanneld_py.healthz import HealthServer
from flanneld_py.lease import Lease, LeaseAdded, LeaseEvent
from flanneld_py.netlink import ExternalInterface, NetlinkError
from flanneld_py.options import Options
from flanneld_py.store import StoreError, StoreUnavailable
from flanneld_py.store.etcd import EtcdSettings, EtcdStore
from flanneld_py.subnets import SubnetManager
from flanneld_py.tun import (
    ENGINE_OFFLOADS,
    TunError,
    open_tun,
    probe_offloads,
    vnet_hdr_supported,
)

__all__ = ["DataPlane", "run"]

log = logging.getLogger("flanneld_py")

#: outer IPv4 header + UDP header
ENCAP_OVERHEAD = 28

#: errors that end the daemon with a one-line message and exit status 1
FATAL = (StoreError, NetlinkError, TunError, FirewallError, EngineError, OSError)


@dataclass
class DataPlane:
    """TUN device + UDP socket + engine for one lease."""

    opts: Options
    cfg: NetworkConfig
    ext: ExternalInterface
    lease: Lease
    tun_fd: int = -1
    sock: socket.socket | None = None
    engine: Engine | None = None
    #: offloads whose runtime shutdown has been logged already
    offload_warned: set[str] = field(default_factory=set)

    @property
    def mtu(self) -> int:
        return self.ext.mtu - ENCAP_OVERHEAD

    async def start(self) -> None:
        subnet = self.lease.subnet
        # offloads: only the C engine reads/writes the TUN with a virtio header (TSO super-packets
        # in, coalesced GSO packets out); without kernel support the TUN is a plain one
        vnet = wants_vnet_hdr(self.opts.engine, self.opts.offload) and vnet_hdr_supported()
        self.tun_fd, name = open_tun(self.opts.tun_name, vnet_hdr=vnet)
        try:
            tun_offloads = probe_offloads(self.tun_fd, ENGINE_OFFLOADS) if vnet else frozenset()
            await asyncio.to_thread(
                netlink.configure_tun, name, subnet.network_address, self.cfg.network, self.mtu
            )
            self.sock = bind_udp(self.ext.address, self.cfg.port)
            self.engine = make_engine(
                self.opts.engine,
                tun_fd=self.tun_fd,
                udp_fd=self.sock.fileno(),
                local_subnet=subnet,
                local_addr=subnet.network_address,
                port=self.cfg.port,
                mtu=self.mtu,
                offload=self.opts.offload,
                vnet_hdr=vnet,
                tun_offloads=tun_offloads,
            )
            self.engine.start()
        except BaseException:
            self.close()
            raise
        log.info(
            "data plane up: %s %s/32 mtu %d, route %s, UDP %s:%d, %s engine, offloads: %s",
            name,
            subnet.network_address,
            self.mtu,
            self.cfg.network,
            self.ext.address,
            self.cfg.port,
            self.engine.kind,
            ", ".join(offload_status(self.engine)["active"]) or "none",
        )

    def check_offloads(self) -> None:
        """Log (once per offload) that the engine turned an offload off at runtime."""
        if self.engine is None:
            return
        counters = offload_status(self.engine)["counters"]
        for name, what in (
            ("gso", "UDP GSO: the kernel refused a segmented send"),
            ("tun_gso", "coalesced TUN writes: the TUN refused a GSO packet"),
        ):
            if counters.get(f"{name}_errors") and name not in self.offload_warned:
                self.offload_warned.add(name)
                err = counters.get(f"{name}_errno", 0)
                log.warning(
                    "turned off %s (%s); sending one packet per syscall from now on",
                    what,
                    os.strerror(err) if err else "unknown error",
                )

    def apply(self, events: list[LeaseEvent]) -> None:
        assert self.engine is not None
        for ev in events:
            if isinstance(ev, LeaseAdded):
                self.engine.set_route(ev.lease.subnet, ev.lease.public_ip)
            else:
                self.engine.del_route(ev.subnet)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.stop()
            self.engine = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.tun_fd >= 0:
            os.close(self.tun_fd)  # the kernel removes flannel0 with its addresses and routes
            self.tun_fd = -1


def bind_udp(address: IPv4Address, port: int) -> socket.socket:
    """The encapsulation socket, bound like flanneld's to <interface address>:<port>."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        sock.bind((str(address), port))
    except OSError as e:
        sock.close()
        raise OSError(
            f"cannot bind UDP {address}:{port}: {e.strerror}; is another flanneld running?"
        ) from None
    sock.setblocking(False)
    return sock


class Daemon:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.store = EtcdStore(
            EtcdSettings(
                endpoints=list(opts.etcd_endpoints),
                username=opts.etcd_username,
                password=opts.etcd_password,
                keyfile=opts.etcd_keyfile,
                certfile=opts.etcd_certfile,
                cafile=opts.etcd_cafile,
            )
        )
        self.mgr: SubnetManager | None = None
        self.cfg: NetworkConfig | None = None
        self.dp: DataPlane | None = None
        self.fw: Firewall | None = None
        self.health: HealthServer | None = None
        self.started = time.monotonic()
        #: True once the firewall is set up and the files are written (READY=1 was sent)
        self.ready = False

    # ---------------------------------------------------------------- startup

    async def start(self) -> list[Coroutine[Any, Any, None]]:
        """Everything up to READY=1; returns the long-running tasks to run."""
        opts = self.opts
        ext = await asyncio.to_thread(
            netlink.find_external_interface,
            list(opts.iface),
            list(opts.iface_regex),
            opts.public_ip,
        )
        public_ip = ext.public_ip
        # fail now, not after a lease is taken, when we may not create the TUN device
        fd, _ = open_tun(opts.tun_name)
        os.close(fd)
        log.info(
            "flanneld-py %s: interface %s (%s, mtu %d), PublicIP %s, etcd %s prefix %s",
            __version__,
            ext.name,
            ext.address,
            ext.mtu,
            public_ip,
            ",".join(opts.etcd_endpoints),
            opts.etcd_prefix,
        )
        if opts.healthz_port:
            self.health = HealthServer(opts.healthz_ip, opts.healthz_port, self.check, self.status)
            await self.health.start()
        mgr = self.mgr = SubnetManager(
            self.store,
            opts.etcd_prefix,
            public_ip,
            ttl=opts.subnet_lease_ttl,
            renew_margin=opts.subnet_lease_renew_margin * 60.0,
        )
        systemd.status("waiting for the network config in etcd")
        self.cfg = cfg = await mgr.wait_config(opts.config_poll_interval)
        log.info(
            "network %s, subnets /%d from %s to %s, backend %s port %d",
            cfg.network,
            cfg.subnet_len,
            cfg.subnet_min.network_address,
            cfg.subnet_max.network_address,
            cfg.backend_type,
            cfg.port,
        )
        previous = files.read_previous_subnet(opts.subnet_file)
        lease = await self._acquire(cfg, previous)
        self.dp = DataPlane(opts, cfg, ext, lease)
        await self.dp.start()

        watch = asyncio.ensure_future(mgr.watch_peers(self._on_peers))
        try:
            await self._wait_synced(watch)
            self.fw = Firewall(cfg.network, lease.subnet, opts.ip_masq, opts.iptables_forward_rules)
            await self._firewall_setup()
            self._write_files(lease)
        except BaseException:
            watch.cancel()
            raise
        self.ready = True
        systemd.ready(f"lease {lease.subnet}, {len(mgr.peers())} peers")
        log.info("ready: lease %s, %d peers", lease.subnet, len(mgr.peers()))

        async def wait_watch() -> None:
            await watch

        tasks = [
            wait_watch(),
            mgr.maintain(self._on_lease_change),
            self._resync(),
            self._monitor_engine(),
        ]
        interval = systemd.watchdog_interval()
        if interval:
            tasks.append(self._watchdog(interval))
        return tasks

    async def _firewall_setup(self, attempts: int = 3) -> None:
        """Install the rules before READY (docker needs the FORWARD accepts); a failure that
        persists is left to the resync loop rather than stopping the overlay."""
        assert self.fw is not None
        for attempt in range(1, attempts + 1):
            try:
                await self.fw.setup()
                return
            except FirewallUnavailable:
                raise
            except FirewallError as e:
                if attempt == attempts:
                    log.error("%s; retrying every %ds", e, self.opts.iptables_resync)
                else:
                    log.warning("%s; retrying", e)
                    await asyncio.sleep(attempt)

    async def _acquire(self, cfg: NetworkConfig, previous: IPv4Network | None) -> Lease:
        assert self.mgr is not None
        delay = 1.0
        while True:
            try:
                return await self.mgr.acquire(cfg, previous)
            except StoreUnavailable as e:
                log.warning("cannot acquire a lease yet: %s; retrying in %.0fs", e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _wait_synced(self, watch: asyncio.Future[None]) -> None:
        assert self.mgr is not None
        synced: asyncio.Future[Any] = asyncio.ensure_future(self.mgr.synced.wait())
        pending: list[asyncio.Future[Any]] = [synced, watch]
        await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        if not synced.done():
            synced.cancel()
            await watch  # raises what ended the watch

    def _write_files(self, lease: Lease) -> None:
        assert self.cfg is not None and self.dp is not None
        opts = self.opts
        files.write_atomic(
            opts.subnet_file,
            files.subnet_env_text(self.cfg.network, lease.subnet, self.dp.mtu, opts.ip_masq),
        )
        if opts.docker_opts_file:
            files.write_atomic(
                opts.docker_opts_file,
                files.docker_opts_text(self.cfg.network, lease.subnet, self.dp.mtu, opts.ip_masq),
            )
        log.info(
            "wrote %s%s",
            opts.subnet_file,
            f" and {opts.docker_opts_file}" if opts.docker_opts_file else "",
        )

    # ---------------------------------------------------------------- runtime

    def _on_peers(self, events: list[LeaseEvent]) -> None:
        if self.dp is not None and self.dp.engine is not None:
            self.dp.apply(events)

    async def _on_lease_change(self, old: Lease, new: Lease) -> None:
        """Our subnet changed (it was taken while we were away): rebuild what depends on it."""
        assert self.dp is not None and self.mgr is not None and self.cfg is not None
        log.error(
            "our subnet changed from %s to %s: docker must be restarted to use the new --bip",
            old.subnet,
            new.subnet,
        )
        self.dp.close()
        self.dp = DataPlane(self.opts, self.cfg, self.dp.ext, new)
        await self.dp.start()
        self.dp.apply([LeaseAdded(lease) for lease in self.mgr.peers().values()])
        if self.fw is not None:
            with contextlib.suppress(FirewallError):
                await self.fw.teardown()
            self.fw = Firewall(
                self.cfg.network, new.subnet, self.opts.ip_masq, self.opts.iptables_forward_rules
            )
            await self._firewall_setup()
        self._write_files(new)

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.opts.iptables_resync)
            if self.fw is None:
                continue
            try:
                fixed = await self.fw.check_and_repair()
            except FirewallError as e:
                log.warning("iptables resync failed: %s", e)
                continue
            for what in fixed:
                log.warning("iptables rule was missing and has been restored: %s", what)

    async def _monitor_engine(self, interval: float = 1.0) -> None:
        """End the daemon (exit 1, so systemd restarts it) if the engine stopped on its own."""
        while True:
            await asyncio.sleep(interval)
            engine = self.dp.engine if self.dp is not None else None
            if engine is not None and not engine.alive():
                raise EngineError(f"packet engine stopped: {engine.error()}")
            if self.dp is not None:
                self.dp.check_offloads()

    async def _watchdog(self, interval: float) -> None:
        while True:
            systemd.watchdog()
            await asyncio.sleep(interval)

    def check(self) -> tuple[bool, str]:
        mgr = self.mgr
        if mgr is None or mgr.lease is None:
            return False, "no subnet lease held yet"
        if not self.ready:
            return False, "starting: firewall rules and files not written yet"
        if not mgr.watch_live:
            return False, "lease watch on etcd is not live"
        if self.dp is None or self.dp.engine is None:
            return False, "data plane not running"
        if not self.dp.engine.alive():
            return False, f"data plane stopped: {self.dp.engine.error()}"
        return True, "ok"

    def status(self) -> dict[str, Any]:
        mgr = self.mgr
        lease = mgr.lease if mgr else None
        return {
            "version": __version__,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "network": str(self.cfg.network) if self.cfg else None,
            "lease": None
            if lease is None
            else {
                "subnet": str(lease.subnet),
                "public_ip": str(lease.public_ip),
                "expires_in_s": None
                if lease.expiration is None
                else round(lease.expiration - time.time()),
            },
            "watch_live": bool(mgr and mgr.watch_live),
            "peers": {str(s): str(p.public_ip) for s, p in (mgr.peers() if mgr else {}).items()},
            "engine": None
            if self.dp is None or self.dp.engine is None
            else {"kind": self.dp.engine.kind, **self.dp.engine.stats()},
            "offloads": None
            if self.dp is None or self.dp.engine is None
            else offload_status(self.dp.engine),
        }

    # ---------------------------------------------------------------- shutdown

    async def close(self) -> None:
        systemd.stopping()
        if self.fw is not None:
            try:
                await self.fw.teardown()
            except FirewallError as e:
                log.warning("could not remove iptables rules: %s", e)
        if self.dp is not None:
            stats = self.dp.engine.stats() if self.dp.engine else {}
            offl = offload_status(self.dp.engine)["counters"] if self.dp.engine else {}
            self.dp.close()
            if stats:
                log.info(
                    "engine counters at exit: %s",
                    " ".join(f"{k}={v}" for k, v in stats.items() if v),
                )
            if any(offl.values()):
                log.info(
                    "offload counters at exit: %s",
                    " ".join(f"{k}={v}" for k, v in offl.items() if v),
                )
        if self.health is not None:
            await self.health.close()
        await self.store.close()
        if self.mgr is not None and self.mgr.lease is not None:
            log.info("stopped; lease %s kept until it expires", self.mgr.lease.subnet)


async def run(opts: Options) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the process exit status.

    The CLI runs this coroutine on the chosen event loop (uvloop or asyncio).
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    daemon = Daemon(opts)
    stopper = asyncio.ensure_future(stop.wait())
    running: list[asyncio.Future[Any]] = []
    status = 0
    try:
        starting = asyncio.ensure_future(daemon.start())
        await asyncio.wait([starting, stopper], return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            running = [asyncio.ensure_future(c) for c in starting.result()]
            done, _ = await asyncio.wait([*running, stopper], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stopper:
                    t.result()  # raises what ended it
                    log.error("internal task ended unexpectedly")
                    status = 1
        else:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
    except FATAL as e:
        log.error("%s", e)
        status = 1
    finally:
        if received:
            log.info("received %s, shutting down", received[0])
        for t in [*running, stopper]:
            t.cancel()
        await asyncio.gather(*running, stopper, return_exceptions=True)
        await daemon.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return status
