"""The network config at ``<prefix>/config``, parsed and validated as flannel does (pure).

Example: ``{"Network": "10.5.0.0/16", "SubnetLen": 24, "Backend": {"Type": "udp", "Port": 8285}}``.
Field names are case-insensitive and unknown fields are ignored, as with Go's JSON decoder. Every
error is a ``ConfigError`` whose message names the field and the rule, on one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

__all__ = [
    "BACKEND_TYPES",
    "DEFAULT_PORT",
    "DEFAULT_VXLAN_PORT",
    "BackendConfig",
    "ConfigError",
    "NetworkConfig",
    "parse_config",
]

#: the udp backend's port (flannel's default)
DEFAULT_PORT = 8285
#: the vxlan backend's port when ``Port`` is 0 or absent: flannel sends no port attribute and the
#: kernel's default is 8472 (not IANA's 4789)
DEFAULT_VXLAN_PORT = 8472
BACKEND_TYPES = ("udp", "vxlan", "host-gw")


class ConfigError(ValueError):
    """The network config is present but unusable; the message says which field and why."""


@dataclass(frozen=True)
class BackendConfig:
    """``Backend`` of the network config; fields that do not apply to ``type`` keep defaults."""

    #: "udp", "vxlan" or "host-gw"
    type: str = "udp"
    #: UDP port: udp 8285 by default; vxlan ``Port`` (0/absent = the kernel's 8472)
    port: int = DEFAULT_PORT
    #: vxlan: VXLAN network identifier (device ``flannel.<VNI>``)
    vni: int = 1
    #: vxlan: Group Based Policy extension
    gbp: bool = False
    #: vxlan: let the device learn FDB entries (flannel: off, device is ``nolearning``)
    learning: bool = False
    #: vxlan: plain routes to peers on our link, vxlan only for the others
    direct_routing: bool = False
    #: vxlan: the *underlay* MTU (flannel v0.21.3+); None = the interface's. Device/env get -50
    mtu: int | None = None


@dataclass(frozen=True)
class NetworkConfig:
    network: IPv4Network
    subnet_len: int
    #: first and last subnet that may be handed out (both included)
    subnet_min: IPv4Network
    subnet_max: IPv4Network
    backend: BackendConfig = BackendConfig()

    @property
    def backend_type(self) -> str:
        return self.backend.type

    @property
    def port(self) -> int:
        return self.backend.port

    @property
    def subnet_size(self) -> int:
        return 1 << (32 - self.subnet_len)

    def contains_subnet(self, subnet: IPv4Network) -> bool:
        """True if ``subnet`` is one this network could hand out (length and range)."""
        return (
            subnet.prefixlen == self.subnet_len
            and subnet.subnet_of(self.network)
            and self.subnet_min.network_address
            <= subnet.network_address
            <= self.subnet_max.network_address
        )


def _fold(doc: dict[str, Any]) -> dict[str, Any]:
    """Case-insensitive field lookup, as Go's encoding/json does (exact spelling wins)."""
    out: dict[str, Any] = {}
    for k, v in doc.items():
        out.setdefault(str(k).lower(), v)
    for k, v in doc.items():
        if str(k) == str(k).lower():
            out[str(k)] = v
    return out


def _int_field(fields: dict[str, Any], name: str) -> int | None:
    v = fields.get(name.lower())
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or int(v) != v:
        raise ConfigError(f"{name} must be an integer, got {json.dumps(v)}")
    return int(v)


def _bool_field(fields: dict[str, Any], name: str, default: bool = False) -> bool:
    v = fields.get(name.lower())
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ConfigError(f"Backend {name} must be true or false, got {json.dumps(v)}")
    return v


def _ip_field(fields: dict[str, Any], name: str) -> IPv4Address | None:
    v = fields.get(name.lower())
    if v is None or v == "":
        return None
    if not isinstance(v, str):
        raise ConfigError(f"{name} must be an IPv4 address string, got {json.dumps(v)}")
    try:
        return IPv4Address(v)
    except ValueError:
        raise ConfigError(f"{name} {v!r} is not an IPv4 address") from None


def parse_config(text: str | bytes) -> NetworkConfig:
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"config is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError('config must be a JSON object like {"Network": "10.5.0.0/16"}')
    f = _fold(doc)

    enable_v4 = f.get("enableipv4", True)
    if enable_v4 is None:
        enable_v4 = True
    if not isinstance(enable_v4, bool):
        raise ConfigError(f"EnableIPv4 must be true or false, got {json.dumps(enable_v4)}")
    if not enable_v4:
        raise ConfigError("EnableIPv4 is false: flanneld-py only supports IPv4 networks")
    if f.get("enableipv6") is True:
        raise ConfigError("EnableIPv6 is true: flanneld-py (UDP backend) supports IPv4 only")

    raw_net = f.get("network")
    if raw_net is None or raw_net == "":
        raise ConfigError('Network is missing (e.g. "Network": "10.5.0.0/16")')
    if not isinstance(raw_net, str) or "/" not in raw_net:
        raise ConfigError(
            f'Network must be a CIDR string like "10.5.0.0/16", got {json.dumps(raw_net)}'
        )
    try:
        network = IPv4Network(raw_net, strict=False)
    except ValueError:
        raise ConfigError(f"Network {raw_net!r} is not an IPv4 CIDR like 10.5.0.0/16") from None

    # SubnetLen must lie in [Network prefix + 2, 30]: Network holds at least four subnets, and a
    # subnet is at most a /30. Absent (or 0), it is /24, or the prefix + 2 for a Network too
    # small for four /24s. Every message is derived from this one range.
    subnet_len = _int_field(f, "SubnetLen") or 0
    shortest, longest = network.prefixlen + 2, 30
    if shortest > longest:
        raise ConfigError(
            f"Network {network} is too small: it needs a prefix of at most /{longest - 2} "
            "to hold four subnets"
        )
    if subnet_len == 0:
        subnet_len = max(24, shortest)
    elif not shortest <= subnet_len <= longest:
        if subnet_len < 0:
            given, why = str(subnet_len), ""
        elif subnet_len > longest:
            given, why = f"/{subnet_len}", " (/30 is the smallest subnet)"
        else:
            given, why = f"/{subnet_len}", " (Network must hold at least four subnets)"
        raise ConfigError(
            f"SubnetLen {given} is outside /{shortest}../{longest} for Network {network}{why}"
        )

    size = 1 << (32 - subnet_len)
    first = int(network.network_address)
    last = int(network.broadcast_address)

    def bound(name: str, default: int) -> IPv4Network:
        ip = _ip_field(f, name)
        value = default if ip is None else int(ip)
        if ip is not None and ip not in network:
            raise ConfigError(f"{name} {ip} is not inside Network {network}")
        if value % size:
            raise ConfigError(f"{name} {IPv4Address(value)} is not on a /{subnet_len} boundary")
        return IPv4Network((value, subnet_len))

    subnet_min = bound("SubnetMin", first + size)
    subnet_max = bound("SubnetMax", last + 1 - size)
    if subnet_min.network_address > subnet_max.network_address:
        raise ConfigError(
            f"SubnetMin {subnet_min.network_address} is above SubnetMax "
            f"{subnet_max.network_address}"
        )

    backend = _parse_backend(f.get("backend"))
    return NetworkConfig(
        network=IPv4Network((first, network.prefixlen)),
        subnet_len=subnet_len,
        subnet_min=subnet_min,
        subnet_max=subnet_max,
        backend=backend,
    )


def _parse_backend(backend: Any) -> BackendConfig:
    """``Backend``: absent = udp; present without ``Type`` is flannel's "unknown backend type"."""
    if backend is None:
        return BackendConfig()
    if not isinstance(backend, dict):
        raise ConfigError(
            f'Backend must be an object like {{"Type": "vxlan"}}, got {json.dumps(backend)}'
        )
    bf = _fold(backend)
    btype = bf.get("type")
    choices = ", ".join(f'"{t}"' for t in BACKEND_TYPES)
    if not isinstance(btype, str) or not btype:
        raise ConfigError(f'unknown backend type: Backend has no "Type" (use one of {choices})')
    kind = btype.lower()
    if kind not in BACKEND_TYPES:
        raise ConfigError(
            f"Backend Type {btype!r} is not supported by flanneld-py (use one of {choices})"
        )
    if kind == "host-gw":
        return BackendConfig(type=kind, port=0)
    port = _int_field(bf, "Port") or 0
    if not 0 <= port <= 65535:
        raise ConfigError(f"Backend Port {port} must be between 1 and 65535")
    if kind == "udp":
        return BackendConfig(type=kind, port=port or DEFAULT_PORT)
    vni = _int_field(bf, "VNI")
    vni = 1 if vni is None else vni
    if not 0 <= vni <= 0xFFFFFF:
        raise ConfigError(f"Backend VNI {vni} must be between 0 and 16777215 (24 bits)")
    mtu = _int_field(bf, "MTU")
    if mtu is not None and mtu != 0 and not 118 <= mtu <= 65535:
        raise ConfigError(
            f"Backend MTU {mtu} must be between 118 and 65535 (the underlay MTU; vxlan uses "
            "50 bytes of it)"
        )
    return BackendConfig(
        type=kind,
        port=port or DEFAULT_VXLAN_PORT,
        vni=vni,
        gbp=_bool_field(bf, "GBP"),
        learning=_bool_field(bf, "Learning"),
        direct_routing=_bool_field(bf, "DirectRouting"),
        mtu=mtu or None,
    )
