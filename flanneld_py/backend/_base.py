"""The contract between the daemon and a backend (flannel's ``backend.Backend`` +
``backend.Network``, in one asyncio interface).

A backend is how packets for a peer's subnet reach that peer: ``udp`` (our TUN + C engine),
``vxlan`` (the kernel's VXLAN device, per-peer neighbour/FDB/route) or ``host-gw`` (plain routes
via the peer's PublicIP). The daemon drives every backend through the same calls, in this order::

    attrs = await backend.prepare()        # before the lease: device and what the lease publishes
    ... the daemon acquires the lease with attrs.backend_type / attrs.backend_data ...
    await backend.start(lease)             # configure for our subnet (address, engine, ...)
    await backend.apply(events)            # peer leases added/changed/removed, in order
    await backend.activate()               # the known peers are applied: start moving packets
    await backend.reconcile(peers)         # every ``reconcile_interval`` s: put back what vanished
    await backend.close(restarting=...)    # clean stop; what stays after exit is the backend's call

``accepts(lease)`` filters peers: a lease of another backend type is not programmed (the daemon
warns once per lease). ``mtu`` is what subnet.env and docker get. ``alive()`` is for liveness
(``/healthz``, the systemd watchdog) and ``status()`` for ``/status``.

Every failure a user can cause or fix is a ``BackendError`` with a one-line message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Any, Protocol

from flanneld_py.lease import Lease, LeaseEvent

__all__ = ["Backend", "BackendError", "LeaseAttrs"]


class BackendError(Exception):
    """A backend cannot be set up or cannot go on; ``str(e)`` is one line: what, how to fix."""


@dataclass(frozen=True)
class LeaseAttrs:
    """What our lease publishes for the backend (flannel's ``LeaseAttrs`` minus PublicIP)."""

    #: ``BackendType`` (None = absent: the udp backend, as real flanneld writes it)
    backend_type: str | None = None
    #: ``BackendData`` (None = absent), key order kept
    backend_data: dict[str, Any] | None = None


class Backend(Protocol):
    #: "udp", "vxlan" or "host-gw" (the config's ``Backend.Type``)
    name: str
    #: seconds between ``reconcile`` calls (flannel's host-gw: 10)
    reconcile_interval: float

    @property
    def mtu(self) -> int:
        """FLANNEL_MTU: the MTU containers must use on this backend."""
        ...

    async def prepare(self) -> LeaseAttrs:
        """Check the host and create or reuse the backend's device before the lease is taken
        (vxlan needs its VtepMAC for the lease). Raises BackendError."""
        ...

    async def start(self, lease: Lease) -> None:
        """Configure for our ``lease`` (called again with the new lease if our subnet changes).
        Raises BackendError."""
        ...

    def accepts(self, lease: Lease) -> bool:
        """True if a peer ``lease`` belongs to this backend (its BackendType matches)."""
        ...

    async def apply(self, events: Sequence[LeaseEvent]) -> None:
        """Program peer changes, in order. A peer that cannot be programmed is logged and
        reported in ``status()``; it does not raise (the next ``reconcile`` tries again)."""
        ...

    async def reconcile(self, peers: Mapping[IPv4Network, Lease]) -> list[str]:
        """Make the kernel state match ``peers`` (the accepted peer view): put back deleted
        entries, drop stale ones. Returns one line per repair made, for the log."""
        ...

    async def activate(self) -> None:
        """The peers known at start (or after a new lease) are applied: start moving packets.
        (udp: the engine starts only now, so that what queued in a taken-over TUN is routed.)"""
        ...

    def alive(self) -> str | None:
        """None if the data path is up, else one line saying what is down."""
        ...

    def status(self) -> dict[str, Any]:
        """Backend state for ``/status`` (device, peers programmed, problems, counters)."""
        ...

    async def close(self, *, restarting: bool = False) -> None:
        """Clean stop (idempotent). ``restarting``: systemd starts us again right away (keep
        what the next run takes over)."""
        ...
