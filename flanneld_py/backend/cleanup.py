"""Removal, at start, of what another backend type (or another VNI) left from an earlier run.

- vxlan devices named ``flannel.<n>`` other than the current backend's (all of them unless the
  current backend is vxlan): a VNI change or a switch to udp/host-gw leaves the old device, its
  address and its routes behind, and the kernel would keep using them;
- with the udp backend, our (proto 102) unicast routes inside Network: they can only be vxlan or
  host-gw peer routes, which would take precedence over the TUN's Network route. (vxlan and
  host-gw remove the routes they do not want in their first ``reconcile``.)

The guard route (type unreachable) and routes of other protos are never touched.
"""

from __future__ import annotations

import re
from ipaddress import IPv4Network

from flanneld_py.backend._netops import NetlinkError, NetOps
from flanneld_py.backend.vxlan import device_name
from flanneld_py.config import BackendConfig
from flanneld_py.netlink import RTN_UNICAST, RTPROT_FLANNELD_PY, ExternalInterface

__all__ = ["remove_other_backends"]

_FLANNEL_VXLAN = re.compile(r"flannel\.\d+")


async def remove_other_backends(
    current: str,
    cfg: BackendConfig,
    network: IPv4Network,
    ext: ExternalInterface,
    net: NetOps,
) -> list[str]:
    """Remove other backends' leftovers (see the module doc); one line per removal, for the
    daemon's log. Failures are returned as lines too: they never stop the daemon. (``ext`` is
    not needed by today's rules; it is part of the daemon's call.)"""
    lines: list[str] = []
    keep = device_name(cfg.vni) if current == "vxlan" else None
    try:
        links = await net.links("vxlan")
    except NetlinkError as exc:
        links = []
        lines.append(f"cannot list vxlan devices: {exc}")
    for lk in links:
        if not _FLANNEL_VXLAN.fullmatch(lk.name) or lk.name == keep:
            continue
        vni = lk.vxlan.vni if lk.vxlan is not None else "?"
        try:
            if await net.delete_link(lk.name):
                lines.append(
                    f"removed vxlan device {lk.name} (VNI {vni}) left by an earlier run "
                    f"(backend now {current}" + (f", VNI {cfg.vni})" if current == "vxlan" else ")")
                )
        except NetlinkError as exc:
            lines.append(f"cannot remove the old vxlan device {lk.name}: {exc}")
    if current == "udp":
        network = IPv4Network(network)
        try:
            routes = await net.routes()
        except NetlinkError as exc:
            routes = []
            lines.append(f"cannot list routes: {exc}")
        for r in routes:
            if (
                r.proto != RTPROT_FLANNELD_PY
                or r.type != RTN_UNICAST
                or not r.dst.subnet_of(network)
            ):
                continue
            via = f" via {r.gateway}" if r.gateway is not None else ""
            dev = f" dev {r.dev}" if r.dev is not None else ""
            try:
                if await net.delete_route(r.dst, gateway=r.gateway, dev=r.dev):
                    lines.append(
                        f"removed route {r.dst}{via}{dev} proto {r.proto} left by an earlier "
                        "vxlan/host-gw run"
                    )
            except NetlinkError as exc:
                lines.append(f"cannot remove the old route {r.dst}{via}{dev}: {exc}")
    return lines
