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

__all__ = ["DEFAULT_PORT", "ConfigError", "NetworkConfig", "parse_config"]

DEFAULT_PORT = 8285
SUPPORTED_BACKENDS = ("udp",)


class ConfigError(ValueError):
    """The network config is present but unusable; the message says which field and why."""


@dataclass(frozen=True)
class NetworkConfig:
    network: IPv4Network
    subnet_len: int
    #: first and last subnet that may be handed out (both included)
    subnet_min: IPv4Network
    subnet_max: IPv4Network
    backend_type: str
    port: int

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

    subnet_len = _int_field(f, "SubnetLen") or 0
    if subnet_len < 0:
        raise ConfigError(f"SubnetLen must be positive, got {subnet_len}")
    if subnet_len > 0:
        if subnet_len > 30:
            raise ConfigError(f"SubnetLen /{subnet_len} is too long: it must be at most 30")
        if subnet_len < network.prefixlen + 2:
            raise ConfigError(
                f"SubnetLen /{subnet_len} must be at least Network's prefix + 2 "
                f"(/{network.prefixlen + 2}) so Network holds at least four subnets"
            )
    else:
        if network.prefixlen > 28:
            raise ConfigError(f"Network {network} is too small: the minimum useful prefix is /28")
        subnet_len = 24 if network.prefixlen <= 22 else network.prefixlen + 2

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

    backend = f.get("backend")
    if backend is None:
        backend_type, port = "udp", DEFAULT_PORT
    else:
        if not isinstance(backend, dict):
            raise ConfigError(
                f'Backend must be an object like {{"Type": "udp"}}, got {json.dumps(backend)}'
            )
        bf = _fold(backend)
        btype = bf.get("type")
        if not isinstance(btype, str) or not btype:
            raise ConfigError('unknown backend type: Backend has no "Type" (use "udp")')
        backend_type = btype.lower()
        if backend_type not in SUPPORTED_BACKENDS:
            raise ConfigError(
                f'Backend Type {btype!r} is not supported by flanneld-py (only "udp")'
            )
        p = _int_field(bf, "Port")
        port = p or DEFAULT_PORT
        if not 1 <= port <= 65535:
            raise ConfigError(f"Backend Port {port} must be between 1 and 65535")

    return NetworkConfig(
        network=IPv4Network((first, network.prefixlen)),
        subnet_len=subnet_len,
        subnet_min=subnet_min,
        subnet_max=subnet_max,
        backend_type=backend_type,
        port=port,
    )
