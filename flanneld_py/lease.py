"""Leases as flannel stores them in etcd: key and JSON codec, and the peer events (pure).

A lease maps a subnet to a host under ``<prefix>/subnets/<net>-<len>``, e.g.
``/coreos.com/network/subnets/10.5.18.0-24`` = ``{"PublicIP":"10.99.0.1","PublicIPv6":null}``
(udp backend). The vxlan and host-gw backends add ``BackendType`` and, for vxlan, ``BackendData``
(``{"VNI":1,"VtepMAC":"7a:21:bb:fd:37:49"}``), in that key order, as flanneld v0.20 writes them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

__all__ = [
    "Lease",
    "LeaseAdded",
    "LeaseEvent",
    "LeaseFormatError",
    "LeaseRemoved",
    "LeaseValue",
    "decode_lease",
    "decode_lease_value",
    "diff_leases",
    "encode_lease_value",
    "lease_key",
    "parse_lease_key",
    "subnets_prefix",
]

# flannel's own pattern (the optional `&...` part is the IPv6 subnet, which we do not lease).
_KEY_RE = re.compile(r"(\d+\.\d+\.\d+\.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?$")


class LeaseFormatError(ValueError):
    """A lease key or value in etcd that does not follow flannel's format."""


@dataclass(frozen=True)
class LeaseValue:
    """What a lease value says: the host's PublicIP and its backend's attributes."""

    public_ip: IPv4Address
    #: ``BackendType`` as written ("vxlan", "host-gw"); None when absent (the udp backend)
    backend_type: str | None = None
    #: ``BackendData`` (a JSON object) or None when absent/null
    backend_data: dict[str, Any] | None = None


@dataclass(frozen=True)
class Lease:
    subnet: IPv4Network
    public_ip: IPv4Address
    #: wall-clock (time.time()) expiry if known, else None
    expiration: float | None = field(default=None, compare=False)
    #: ``BackendType`` of the lease (None = absent, i.e. the udp backend)
    backend_type: str | None = None
    #: ``BackendData`` of the lease (vxlan: ``{"VNI": 1, "VtepMAC": "..."}``)
    backend_data: dict[str, Any] | None = None


@dataclass(frozen=True)
class LeaseAdded:
    """A peer's lease appeared or was renewed/changed (PUT)."""

    lease: Lease


@dataclass(frozen=True)
class LeaseRemoved:
    """A peer's lease was deleted or expired (DELETE)."""

    subnet: IPv4Network


LeaseEvent = LeaseAdded | LeaseRemoved


def normalize_prefix(prefix: str) -> str:
    return "/" + prefix.strip("/")


def subnets_prefix(prefix: str) -> str:
    """``/coreos.com/network`` -> ``/coreos.com/network/subnets/``."""
    return normalize_prefix(prefix) + "/subnets/"


def lease_key(prefix: str, subnet: IPv4Network) -> str:
    return f"{subnets_prefix(prefix)}{subnet.network_address}-{subnet.prefixlen}"


def parse_lease_key(key: str) -> IPv4Network:
    """The subnet named by a lease key (the full etcd key or just its last component)."""
    name = key.rsplit("/", 1)[-1]
    m = _KEY_RE.fullmatch(name)
    if m is None:
        raise LeaseFormatError(f"lease key {key!r} is not <a.b.c.d>-<len>")
    try:
        net = IPv4Network(f"{m.group(1)}/{m.group(2)}", strict=True)
    except ValueError as e:
        raise LeaseFormatError(f"lease key {key!r}: {e}") from None
    return net


def encode_lease_value(
    public_ip: IPv4Address,
    backend_type: str | None = None,
    backend_data: dict[str, Any] | None = None,
) -> bytes:
    """The value real flanneld (v0.15+) writes, byte for byte: udp ``{"PublicIP":…,
    "PublicIPv6":null}``; host-gw adds ``"BackendType":"host-gw"``; vxlan adds
    ``"BackendType":"vxlan","BackendData":{…}`` (``backend_data`` keeps its key order)."""
    doc: dict[str, Any] = {"PublicIP": str(public_ip), "PublicIPv6": None}
    if backend_type is not None:
        doc["BackendType"] = backend_type
    if backend_data is not None:
        doc["BackendData"] = backend_data
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_lease_value(value: bytes | str) -> IPv4Address:
    """PublicIP of a lease value; field names are case-insensitive as in Go's decoder."""
    return decode_lease(value).public_ip


def decode_lease(value: bytes | str) -> LeaseValue:
    """PublicIP, BackendType and BackendData of a lease value (case-insensitive field names,
    unknown fields ignored, as Go's decoder). Raises LeaseFormatError."""
    try:
        doc = json.loads(value)
    except (ValueError, UnicodeDecodeError) as e:
        raise LeaseFormatError(f"lease value is not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise LeaseFormatError("lease value is not a JSON object")
    fields = {str(k).lower(): v for k, v in doc.items()}
    ip = fields.get("publicip")
    if not isinstance(ip, str):
        raise LeaseFormatError("lease value has no PublicIP string")
    try:
        public_ip = IPv4Address(ip)
    except ValueError:
        raise LeaseFormatError(f"lease PublicIP {ip!r} is not an IPv4 address") from None
    btype = fields.get("backendtype")
    if btype is not None and not isinstance(btype, str):
        raise LeaseFormatError("lease BackendType is not a string")
    bdata = fields.get("backenddata")
    if bdata is not None and not isinstance(bdata, dict):
        raise LeaseFormatError("lease BackendData is not a JSON object")
    return LeaseValue(public_ip, btype or None, bdata)


def diff_leases(old: dict[IPv4Network, Lease], new: dict[IPv4Network, Lease]) -> list[LeaseEvent]:
    """Events that turn the view ``old`` into ``new``: removals first, then additions/changes."""
    events: list[LeaseEvent] = [LeaseRemoved(s) for s in old if s not in new]
    for subnet, lease in new.items():
        prev = old.get(subnet)
        if prev is None or prev != lease:  # expiry is not compared: a renewal is no change
            events.append(LeaseAdded(lease))
    return events
