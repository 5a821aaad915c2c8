"""Backends: how packets for a peer's subnet reach the peer (``Backend.Type`` of the config).

- ``udp`` (:mod:`flanneld_py.backend.udp`): our TUN + the packet engine, flannel's udp wire.
- ``vxlan`` (:mod:`flanneld_py.backend.vxlan`): the kernel's VXLAN device ``flannel.<VNI>``.
- ``host-gw`` (:mod:`flanneld_py.backend.hostgw`): plain routes via each peer's PublicIP.

:func:`make_backend` picks one for the config; the contract is :class:`Backend`.
"""

from __future__ import annotations

from flanneld_py.backend._base import Backend, BackendError, LeaseAttrs
from flanneld_py.config import NetworkConfig
from flanneld_py.handover import Handover
from flanneld_py.netlink import ExternalInterface
from flanneld_py.options import Options

__all__ = ["Backend", "BackendError", "LeaseAttrs", "make_backend", "remove_other_backends"]


def make_backend(
    cfg: NetworkConfig, ext: ExternalInterface, opts: Options, handover: Handover | None = None
) -> Backend:
    """The backend of ``cfg.backend.type`` for this host, talking to the real kernel;
    ``handover``: what a previous run left in systemd's fd store (the udp backend takes it)."""
    b = cfg.backend
    if b.type == "udp":
        from flanneld_py.backend.udp import UdpBackend

        return UdpBackend(
            b,
            cfg.network,
            ext,
            tun_name=opts.tun_name,
            engine=opts.engine,
            offload=opts.offload,
            engine_threads=opts.engine_threads,
            handover=handover,
        )
    from flanneld_py.backend._netops import RealNetOps

    if b.type == "vxlan":
        from flanneld_py.backend.vxlan import VxlanBackend

        return VxlanBackend(b, cfg.network, ext, RealNetOps())
    if b.type == "host-gw":
        from flanneld_py.backend.hostgw import HostGwBackend

        return HostGwBackend(b, cfg.network, ext, RealNetOps())
    raise BackendError(f"unknown backend type {b.type!r}")


async def remove_other_backends(cfg: NetworkConfig, ext: ExternalInterface) -> list[str]:
    """Remove what another backend type (or another VNI) left on this host from an earlier run;
    one line per removal."""
    from flanneld_py.backend._netops import RealNetOps
    from flanneld_py.backend.cleanup import remove_other_backends as remove

    return await remove(cfg.backend.type, cfg.backend, cfg.network, ext, RealNetOps())
