"""The daemon: orchestration of lease, backend, firewall, files and systemd in one event loop.

The daemon is handed its ``LeaseStore`` (etcd, built by the CLI) and a :class:`Platform`: the
host operations it needs (the lock, the external interface, the guard route, the firewall, the
backend factory). The real platform talks to the kernel; tests hand in fakes and run the whole
startup, readiness, peer wiring and shutdown without root.

Startup order (what systemd and docker rely on):
  lock -> control socket -> external interface -> etcd config -> guard route -> backend chosen by
  Backend.Type, leftovers of other backends removed -> backend prepared (device, or the previous
  run's taken over; what the lease publishes) -> lease -> backend started for the lease -> peer
  snapshot applied -> backend activated (udp: the engine starts) -> reconciled -> firewall ->
  subnet.env + docker opts -> READY=1 -> renew / watch / apply / reconcile / resync / watchdog.
Shutdown (SIGTERM/SIGINT): STOPPING=1, cancel the tasks, remove our firewall rules, close the
backend (udp: the TUN and its routes go; vxlan/host-gw: the kernel's state stays), remove the
control socket, release the lock. The lease and the guard route are kept: a restart gets the
same subnet, and meanwhile nothing for the network leaves by the default route. When systemd is
restarting us (a ``restart`` job is queued), the rules stay too, and the udp backend's TUN and
sockets live on in systemd's fd store: the next run takes them over (handover.py), so packets
queue instead of being refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Any, Protocol

from flanneld_py import __version__, files, hostlock, netlink, systemd
from flanneld_py.backend import Backend, BackendError, make_backend, remove_other_backends
from flanneld_py.config import NetworkConfig
from flanneld_py.engine import EngineError
from flanneld_py.firewall import Firewall, FirewallError, FirewallUnavailable
from flanneld_py.handover import Handover
from flanneld_py.healthz import HealthServer
from flanneld_py.lease import Lease, LeaseAdded, LeaseEvent, LeaseRemoved
from flanneld_py.metrics import Metrics, etcd_state
from flanneld_py.netlink import ExternalInterface, NetlinkError
from flanneld_py.options import Options
from flanneld_py.store import LeaseStore, StoreError, StoreUnavailable
from flanneld_py.subnets import SubnetManager
from flanneld_py.tun import TunError

__all__ = ["FATAL", "Daemon", "FirewallLike", "Platform", "run"]

log = logging.getLogger("flanneld_py")

#: errors that end the daemon with a one-line message and exit status 1
FATAL = (
    hostlock.LockHeld,
    StoreError,
    NetlinkError,
    TunError,
    FirewallError,
    EngineError,
    BackendError,
    OSError,
)


class FirewallLike(Protocol):
    async def setup(self) -> bool | None: ...
    async def check_and_repair(self) -> list[str]: ...
    async def teardown(self) -> None: ...


class Closeable(Protocol):
    def close(self) -> None: ...


async def _find_interface(opts: Options) -> ExternalInterface:
    return await asyncio.to_thread(
        netlink.find_external_interface, list(opts.iface), list(opts.iface_regex), opts.public_ip
    )


async def _ensure_guard(network: IPv4Network) -> list[IPv4Network]:
    return await asyncio.to_thread(netlink.ensure_guard_route, network)


def _firewall(network: IPv4Network, subnet: IPv4Network, opts: Options) -> FirewallLike:
    return Firewall(network, subnet, opts.ip_masq, opts.iptables_forward_rules)


@dataclass
class Platform:
    """What the daemon does to the host, as replaceable calls (the real kernel by default)."""

    #: one daemon per network namespace (hostlock); raises hostlock.LockHeld
    lock: Callable[[], Closeable] = hostlock.acquire
    find_interface: Callable[[Options], Awaitable[ExternalInterface]] = _find_interface
    #: install the guard route for the network; returns the stale guards removed
    ensure_guard: Callable[[IPv4Network], Awaitable[list[IPv4Network]]] = _ensure_guard
    make_backend: Callable[[NetworkConfig, ExternalInterface, Options, Handover], Backend] = (
        make_backend
    )
    #: remove what other backend types left behind; one line per removal
    cleanup: Callable[[NetworkConfig, ExternalInterface], Awaitable[list[str]]] = (
        remove_other_backends
    )
    make_firewall: Callable[[IPv4Network, IPv4Network, Options], FirewallLike] = _firewall


class Daemon:
    def __init__(
        self,
        opts: Options,
        store: LeaseStore,
        platform: Platform | None = None,
        handover: Handover | None = None,
    ) -> None:
        self.opts = opts
        self.store = store
        self.platform = platform or Platform()
        #: what a previous run left in systemd's fd store (the udp backend takes it over)
        self.handover = handover or Handover()
        self.mgr: SubnetManager | None = None
        self.cfg: NetworkConfig | None = None
        self.ext: ExternalInterface | None = None
        self.backend: Backend | None = None
        self.fw: FirewallLike | None = None
        self.health: HealthServer | None = None
        #: the control socket (``--control-socket``): the health server's endpoints over AF_UNIX
        self.control: HealthServer | None = None
        self.lock: Closeable | None = None
        self.started = time.monotonic()
        self.started_at = time.time()
        #: ``/metrics`` (read from this daemon's state at each scrape)
        self.metrics = Metrics(self)
        #: True once the firewall is set up and the files are written (READY=1 was sent)
        self.ready = False
        #: the peers handed to the backend (leases it accepts), by subnet
        self.accepted: dict[IPv4Network, Lease] = {}
        #: leases of another backend type, warned about once (subnet -> their BackendType)
        self._foreign: dict[IPv4Network, str | None] = {}
        self._events: asyncio.Queue[list[LeaseEvent]] = asyncio.Queue()
        #: the peer watch and the event applier (their tasks' wrappers run them)
        self._inner: list[asyncio.Future[None]] = []

    # ---------------------------------------------------------------- startup

    async def start(self) -> list[Coroutine[Any, Any, None]]:
        """Everything up to READY=1; returns the long-running tasks to run."""
        opts, plat = self.opts, self.platform
        # before anything is touched: a second daemon must not take over the first one's lease,
        # routes and rules (whatever its --tun-name)
        self.lock = plat.lock()
        if opts.control_socket:  # from now on `flanneld-py status` can say what we wait for
            self.control = HealthServer.unix(
                opts.control_socket,
                self.check,
                self.status,
                ready=self.readiness,
                metrics=self.metrics.render,
            )
            await self.control.start()
        ext = self.ext = await plat.find_interface(opts)
        log.info(
            "flanneld-py %s: interface %s (%s, mtu %d), PublicIP %s, etcd %s prefix %s",
            __version__,
            ext.name,
            ext.address,
            ext.mtu,
            ext.public_ip,
            ",".join(opts.etcd_endpoints),
            opts.etcd_prefix,
        )
        if opts.healthz_port:
            self.health = HealthServer(
                opts.healthz_ip,
                opts.healthz_port,
                self.check,
                self.status,
                ready=self.readiness,
                metrics=self.metrics.render,
            )
            await self.health.start()
        mgr = self.mgr = SubnetManager(
            self.store,
            opts.etcd_prefix,
            ext.public_ip,
            ttl=opts.subnet_lease_ttl,
            renew_margin=opts.subnet_lease_renew_margin * 60.0,
        )
        systemd.status("waiting for the network config in etcd")
        self.cfg = cfg = await mgr.wait_config(opts.config_poll_interval)
        log.info(
            "network %s, subnets /%d from %s to %s, backend %s",
            cfg.network,
            cfg.subnet_len,
            cfg.subnet_min.network_address,
            cfg.subnet_max.network_address,
            _describe_backend(cfg),
        )
        for old in await plat.ensure_guard(cfg.network):
            log.info("removed the guard route of an earlier network %s", old)
        log.info(
            "guard route unreachable %s metric %d: while no route of ours covers a destination "
            "in the network (daemon stopped, unknown peer), packets for it are refused instead of "
            "leaving by the default route",
            cfg.network,
            netlink.GUARD_METRIC,
        )
        backend = self.backend = plat.make_backend(cfg, ext, opts, self.handover)
        for line in await plat.cleanup(cfg, ext):
            log.warning("%s", line)
        attrs = await backend.prepare()
        for name in self.handover.release_unclaimed():
            log.info("closed descriptors %s of the previous run: this run does not use them", name)
        mgr.set_lease_attrs(attrs.backend_type, attrs.backend_data)
        previous = files.read_previous_subnet(opts.subnet_file)
        lease = await self._acquire(cfg, previous)
        await backend.start(lease)

        applier = asyncio.ensure_future(self._apply_events())
        watch = asyncio.ensure_future(mgr.watch_peers(self._on_peers))
        self._inner = [watch, applier]
        try:
            await self._wait_synced(watch)
            await self._wait_applied(applier)
            await backend.activate()
            # entries of peers that vanished while we were down go now, not at the next tick
            for line in await backend.reconcile(dict(self.accepted)):
                log.info("%s", line)
            self.fw = plat.make_firewall(cfg.network, lease.subnet, opts)
            await self._firewall_setup()
            self._write_files(lease)
        except BaseException:
            watch.cancel()
            applier.cancel()
            raise
        self.ready = True
        systemd.ready(f"lease {lease.subnet}, {len(self.accepted)} peers, backend {backend.name}")
        log.info(
            "ready: lease %s, %d peers, backend %s", lease.subnet, len(self.accepted), backend.name
        )

        async def wait(task: asyncio.Future[None]) -> None:
            await task

        tasks = [
            wait(watch),
            wait(applier),
            mgr.maintain(self._on_lease_change),
            self._resync(),
            self._reconcile(),
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
                if await self.fw.setup():
                    log.info("iptables rules of the previous run are in place: kept as they are")
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
        await asyncio.wait([synced, watch], return_when=asyncio.FIRST_COMPLETED)
        if not synced.done():
            synced.cancel()
            await watch  # raises what ended the watch

    async def _wait_applied(self, applier: asyncio.Future[None]) -> None:
        """Until the backend has applied every peer event queued so far."""
        joined: asyncio.Future[Any] = asyncio.ensure_future(self._events.join())
        await asyncio.wait([joined, applier], return_when=asyncio.FIRST_COMPLETED)
        if not joined.done():
            joined.cancel()
            await applier

    def _write_files(self, lease: Lease) -> None:
        assert self.cfg is not None and self.backend is not None
        opts = self.opts
        mtu = self.backend.mtu
        files.write_atomic(
            opts.subnet_file,
            files.subnet_env_text(self.cfg.network, lease.subnet, mtu, opts.ip_masq),
        )
        if opts.docker_opts_file:
            files.write_atomic(
                opts.docker_opts_file,
                files.docker_opts_text(self.cfg.network, lease.subnet, mtu, opts.ip_masq),
            )
        log.info(
            "wrote %s%s",
            opts.subnet_file,
            f" and {opts.docker_opts_file}" if opts.docker_opts_file else "",
        )

    # ---------------------------------------------------------------- runtime

    def _on_peers(self, events: list[LeaseEvent]) -> None:
        """The subnet manager's peer changes -> the backend's, minus leases of other types."""
        assert self.backend is not None
        out: list[LeaseEvent] = []
        for ev in events:
            if isinstance(ev, LeaseAdded):
                subnet = ev.lease.subnet
                if not self.backend.accepts(ev.lease):
                    btype = ev.lease.backend_type
                    if self._foreign.get(subnet, "\0") != btype:
                        self._foreign[subnet] = btype
                        log.warning(
                            "ignoring peer %s via %s: its backend is %s, this network runs %s",
                            subnet,
                            ev.lease.public_ip,
                            btype or "udp (no BackendType)",
                            self.backend.name,
                        )
                    if self.accepted.pop(subnet, None) is not None:
                        out.append(LeaseRemoved(subnet))
                    continue
                self._foreign.pop(subnet, None)
                self.accepted[subnet] = ev.lease
                out.append(ev)
            else:
                self._foreign.pop(ev.subnet, None)
                if self.accepted.pop(ev.subnet, None) is not None:
                    out.append(ev)
        if out:
            self._events.put_nowait(out)

    async def _apply_events(self) -> None:
        assert self.backend is not None
        while True:
            events = await self._events.get()
            try:
                await self.backend.apply(events)
            finally:
                self._events.task_done()

    async def _on_lease_change(self, old: Lease, new: Lease) -> None:
        """Our subnet changed (it was taken while we were away): rebuild what depends on it."""
        assert self.backend is not None and self.cfg is not None
        log.error(
            "our subnet changed from %s to %s: docker must be restarted to use the new --bip",
            old.subnet,
            new.subnet,
        )
        await self.backend.start(new)
        await self.backend.apply([LeaseAdded(lease) for lease in self.accepted.values()])
        await self.backend.activate()
        if self.fw is not None:
            with contextlib.suppress(FirewallError):
                await self.fw.teardown()
            self.fw = self.platform.make_firewall(self.cfg.network, new.subnet, self.opts)
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

    async def _reconcile(self) -> None:
        """Let the backend repair the kernel's state; a BackendError ends the daemon (exit 1)."""
        assert self.backend is not None
        while True:
            await asyncio.sleep(self.backend.reconcile_interval)
            try:
                repairs = await self.backend.reconcile(dict(self.accepted))
            except NetlinkError as e:
                log.warning("%s backend: reconcile failed: %s", self.backend.name, e)
                continue
            for line in repairs:
                log.warning("%s", line)

    async def _watchdog(self, interval: float) -> None:
        """Keep systemd's watchdog fed while the daemon is alive (liveness, not readiness: an
        etcd outage must not get a working data path restarted)."""
        warned = False
        while True:
            healthy, why = self.check()
            if healthy:
                systemd.watchdog()
                warned = False
            elif not warned:
                log.error("not alive (%s): no longer feeding the systemd watchdog", why)
                warned = True
            await asyncio.sleep(interval)

    def check(self) -> tuple[bool, str]:
        """Liveness (``/healthz``, the watchdog): the process runs its data path and holds an
        unexpired lease. An etcd outage does not fail it; the text then says so."""
        mgr = self.mgr
        if mgr is None or mgr.lease is None:
            return False, "starting: no subnet lease held yet"
        if not self.ready:
            return False, "starting: firewall rules and files not written yet"
        if self.backend is None:
            return False, "no backend"
        down = self.backend.alive()
        if down is not None:
            return False, down
        lease = mgr.lease
        if lease.expiration is not None and lease.expiration <= time.time():
            return False, f"lease {lease.subnet} expired (etcd unreachable for its whole TTL?)"
        if not mgr.watch_live:
            return True, f"ok; degraded: {self._watch_down()}"
        return True, "ok"

    def readiness(self) -> tuple[bool, str]:
        """Readiness (``/readyz``): alive, and the lease watch on etcd is live (peers current)."""
        healthy, why = self.check()
        if not healthy:
            return False, why
        if self.mgr is None or not self.mgr.watch_live:
            return False, self._watch_down()
        return True, "ok"

    def _watch_down(self) -> str:
        since = getattr(self.mgr, "watch_down_since", None)
        if since is None:
            return "lease watch on etcd is not live (etcd unreachable?)"
        return (
            f"lease watch on etcd down for {time.monotonic() - since:.0f}s (etcd unreachable?); "
            "packets keep flowing to the known peers"
        )

    @property
    def ignored_peers(self) -> dict[IPv4Network, str]:
        """Leases of another backend type (subnet -> their backend), not programmed."""
        return {s: t or "udp" for s, t in self._foreign.items()}

    def status(self) -> dict[str, Any]:
        mgr = self.mgr
        lease = mgr.lease if mgr else None
        backend = self.backend.status() if self.backend is not None else None
        alive, alive_text = self.check()
        ready, ready_text = self.readiness()
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
                #: seconds since the epoch
                "expires_at": None if lease.expiration is None else round(lease.expiration, 3),
                "renewals": mgr.renewals if mgr else 0,
                "renewal_failures": mgr.renewal_failures if mgr else 0,
            },
            "watch_live": bool(mgr and mgr.watch_live),
            "watch_resyncs": dict(mgr.watch_resyncs) if mgr else {},
            # the member in use, the API (v3/v2) and its counters (None: not known/kept)
            "etcd": etcd_state(self.store),
            "alive": alive_text,
            "ready": ready_text,
            "is_alive": alive,
            "is_ready": ready,
            "peers": {str(s): str(p.public_ip) for s, p in self.accepted.items()},
            "ignored_peers": {str(s): t for s, t in self.ignored_peers.items()},
            "backend": backend,
            # the udp backend's engine and offloads, also at the top level (as before backends)
            "engine": backend.get("engine") if backend else None,
            "offloads": backend.get("offloads") if backend else None,
        }

    # ---------------------------------------------------------------- shutdown

    async def close(self) -> None:
        systemd.stopping()
        for task in self._inner:
            task.cancel()
        await asyncio.gather(*self._inner, return_exceptions=True)
        # a restart by systemd keeps the data path: the rules stay and the next run takes the
        # TUN and the sockets over (packets wait meanwhile); a stop removes both
        restarting = self.ready and await asyncio.to_thread(systemd.restart_pending)
        if restarting:
            log.info(
                "systemd is restarting us: iptables rules and the data path stay for the next run"
            )
        elif self.fw is not None:
            try:
                await self.fw.teardown()
            except FirewallError as e:
                log.warning("could not remove iptables rules: %s", e)
        if self.backend is not None:
            try:
                await self.backend.close(restarting=restarting)
            except FATAL as e:
                log.warning("could not close the %s backend: %s", self.backend.name, e)
        if self.health is not None:
            await self.health.close()
        if self.control is not None:
            await self.control.close()
        await self.store.close()
        if self.mgr is not None and self.mgr.lease is not None:
            log.info("stopped; lease %s kept until it expires", self.mgr.lease.subnet)
        if self.lock is not None:
            self.lock.close()
            self.lock = None


def _describe_backend(cfg: NetworkConfig) -> str:
    b = cfg.backend
    if b.type == "udp":
        return f"udp port {b.port}"
    if b.type == "vxlan":
        extra = [f"vni {b.vni}", f"port {b.port}"]
        extra += [name for name, on in (("gbp", b.gbp), ("learning", b.learning),
                                        ("DirectRouting", b.direct_routing)) if on]  # fmt: skip
        return "vxlan " + ", ".join(extra)
    return b.type


async def run(
    opts: Options,
    store: LeaseStore,
    platform: Platform | None = None,
    handover: Handover | None = None,
) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the process exit status.

    The CLI builds the store and runs this coroutine on the chosen event loop (uvloop or asyncio).
    ``handover``: what a previous run left in systemd's fd store (default: read from
    ``$LISTEN_FDS``).
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    daemon = Daemon(opts, store, platform, handover or Handover.from_systemd())
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
