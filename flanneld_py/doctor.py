"""``flanneld-py doctor``: check this host for what breaks a flannel overlay, one line each.

Every check is a pure decision function over facts collected separately (files, sysctls,
``ip -j``, ``iptables -S``, the docker API, etcd, ping), so each decision is unit-tested on crafted
facts. A :class:`Finding` is one line: what is wrong and how to fix it (or what is fine, or why a
check could not run). ``main`` prints one line per finding (``--json``: a list of ``{check, ok,
message, fix}``) and returns 0 when nothing failed, 1 otherwise. It never writes anything: etcd
is only read, and the only packets it sends are ICMP echoes to the peers' docker0 addresses.

Checks (``check`` ids):

- ``subnet-file``: ``/run/flannel/subnet.env`` exists and holds a lease.
- ``docker-config``: ``bip``/``mtu``/``ip-masq`` in ``/etc/docker/daemon.json`` while
  ``/run/flannel/docker`` passes ``--bip``/``--mtu``/``--ip-masq``: dockerd refuses to start.
- ``docker-bridge``: docker0's address is inside our lease.
- ``forward``: FORWARD policy DROP without flanneld-py's ``FLANNEL-FWD`` accepts (or equivalent).
- ``ip-forward``: ``net.ipv4.ip_forward`` is on.
- ``mtu``: docker0 and the running containers' interfaces are not larger than ``FLANNEL_MTU``.
- ``rp-filter``: strict reverse-path filtering on the device where overlay packets arrive,
  where a peer's route back leaves by another device (the kernel then drops its packets).
- ``etcd``: etcd answers and ``<prefix>/config`` is a valid network config.
- ``peers``: each peer answers an ICMP echo to its docker0 address (``<subnet>.1``) through the
  overlay within ``--probe-timeout``; peers of another backend type are reported.
- ``duplicate-public-ip``: two leases with one PublicIP.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import math
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any
from urllib.parse import quote

from flanneld_py.config import ConfigError, NetworkConfig, parse_config
from flanneld_py.files import read_subnet_env
from flanneld_py.firewall import FORWARD_CHAIN
from flanneld_py.lease import LeaseFormatError, decode_lease, parse_lease_key, subnets_prefix
from flanneld_py.lease import normalize_prefix as _normalize_prefix
from flanneld_py.options import (
    DEFAULT_DOCKER_OPTS_FILE,
    DEFAULT_ETCD_ENDPOINTS,
    DEFAULT_ETCD_PREFIX,
    DEFAULT_SUBNET_FILE,
)

__all__ = [
    "CHECKS",
    "ContainerMtu",
    "Finding",
    "LeaseInfo",
    "PeerProbe",
    "PeerRoute",
    "SubnetEnv",
    "check_docker_bridge",
    "check_docker_config",
    "check_duplicate_public_ips",
    "check_etcd",
    "check_forward",
    "check_ip_forward",
    "check_mtu",
    "check_peers",
    "check_rp_filter",
    "check_subnet_file",
    "docker_flags",
    "main",
    "parse_subnet_env",
    "ping_argv",
]

PROG = "flanneld-py doctor"
DEFAULT_DOCKER_CONFIG = "/etc/docker/daemon.json"
DEFAULT_DOCKER_BRIDGE = "docker0"
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
DEFAULT_TUN_NAME = "flannel0"
DEFAULT_PROBE_TIMEOUT = 2.0

SUBNET_FILE = "subnet-file"
DOCKER_CONFIG = "docker-config"
DOCKER_BRIDGE = "docker-bridge"
FORWARD = "forward"
IP_FORWARD = "ip-forward"
MTU = "mtu"
RP_FILTER = "rp-filter"
ETCD = "etcd"
PEERS = "peers"
DUPLICATE_PUBLIC_IP = "duplicate-public-ip"
#: every check id, in the order they are reported
CHECKS = (
    SUBNET_FILE,
    DOCKER_CONFIG,
    DOCKER_BRIDGE,
    FORWARD,
    IP_FORWARD,
    MTU,
    RP_FILTER,
    ETCD,
    PEERS,
    DUPLICATE_PUBLIC_IP,
)

#: daemon.json keys that dockerd refuses when the same flag is on its command line, and that
#: flanneld-py's docker options file passes
DOCKER_KEYS = ("bip", "mtu", "ip-masq")
#: what dockerd says when a directive is both a flag and in daemon.json
DOCKERD_CONFLICT = (
    "the following directives are specified both as a flag and in the configuration file"
)
#: rp_filter values and their names
_RP_MODES = {0: "off", 1: "strict", 2: "loose"}


# ---------------------------------------------------------------------------------------------
# findings


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


@dataclass(frozen=True)
class Finding:
    """One line of the report. ``skipped``: nothing could be checked (an info line, ok=True)."""

    check: str
    ok: bool
    message: str
    fix: str = ""
    skipped: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "message", _one_line(self.message))
        object.__setattr__(self, "fix", _one_line(self.fix))

    @property
    def tag(self) -> str:
        return "info" if self.skipped else ("ok" if self.ok else "FAIL")

    def line(self) -> str:
        text = f"[{self.tag}] {self.check}: {self.message}"
        return f"{text} -- fix: {self.fix}" if self.fix else text

    def as_json(self) -> dict[str, Any]:
        return {"check": self.check, "ok": self.ok, "message": self.message, "fix": self.fix}


def _ok(check: str, message: str) -> Finding:
    return Finding(check, True, message)


def _fail(check: str, message: str, fix: str) -> Finding:
    return Finding(check, False, message, fix)


def _skip(check: str, message: str) -> Finding:
    return Finding(check, True, message, skipped=True)


# ---------------------------------------------------------------------------------------------
# facts


@dataclass(frozen=True)
class SubnetEnv:
    """What ``subnet.env`` says: the Network, our lease, its MTU."""

    network: IPv4Network
    #: ``FLANNEL_SUBNET`` as written (``10.5.18.1/24``: docker0's address with the lease's length)
    address: IPv4Interface
    mtu: int

    @property
    def subnet(self) -> IPv4Network:
        return self.address.network


@dataclass(frozen=True)
class ContainerMtu:
    """A running container's interface on the docker bridge."""

    name: str
    ifname: str
    mtu: int


@dataclass(frozen=True)
class LeaseInfo:
    """One lease under ``<prefix>/subnets/``."""

    key: str
    subnet: IPv4Network
    public_ip: IPv4Address
    backend_type: str | None = None


@dataclass(frozen=True)
class PeerRoute:
    """Where this host's routes send a peer's traffic: ``via`` = the device of the route to the
    peer's subnet, ``public_via`` = the device of the route to its PublicIP (None = no route)."""

    subnet: IPv4Network
    public_ip: IPv4Address
    via: str | None
    public_via: str | None


@dataclass(frozen=True)
class PeerProbe:
    """An ICMP echo to a peer's docker0 address: ``answered`` None = not probed."""

    lease: LeaseInfo
    target: IPv4Address
    answered: bool | None


@dataclass
class _Env:
    """Facts shared between checks while they are collected."""

    subnet: SubnetEnv | None = None
    config: NetworkConfig | None = None
    etcd_error: str | None = None
    leases: list[LeaseInfo] | None = None
    local_addrs: dict[IPv4Address, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# decisions (pure)


def parse_subnet_env(env: Mapping[str, str]) -> SubnetEnv | str:
    """``subnet.env`` variables -> :class:`SubnetEnv`, or a one-line reason why they are not
    usable."""
    try:
        network = IPv4Network(env["FLANNEL_NETWORK"], strict=False)
        address = IPv4Interface(env["FLANNEL_SUBNET"])
        mtu = int(env["FLANNEL_MTU"])
    except KeyError as e:
        return f"{e.args[0]} is missing"
    except ValueError as e:
        return str(e)
    if "/" not in env["FLANNEL_SUBNET"]:
        return f"FLANNEL_SUBNET={env['FLANNEL_SUBNET']} has no prefix length"
    if not address.network.subnet_of(network):
        return f"FLANNEL_SUBNET={address} is not inside FLANNEL_NETWORK={network}"
    if mtu < 68:
        return f"FLANNEL_MTU={mtu} is not a usable MTU"
    return SubnetEnv(network, address, mtu)


def check_subnet_file(path: str, env: Mapping[str, str] | None) -> tuple[Finding, SubnetEnv | None]:
    """``env`` None: the file does not exist."""
    if env is None:
        return (
            _fail(
                SUBNET_FILE,
                f"{path} does not exist: flanneld-py is not running, has no lease yet, or writes "
                "another --subnet-file",
                "start flanneld-py and read its log (journalctl -u flanneld-py)",
            ),
            None,
        )
    parsed = parse_subnet_env(env)
    if isinstance(parsed, str):
        return (
            _fail(
                SUBNET_FILE,
                f"{path} holds no valid lease ({parsed})",
                "restart flanneld-py: it rewrites the file",
            ),
            None,
        )
    return (
        _ok(
            SUBNET_FILE,
            f"{path}: lease {parsed.subnet} in {parsed.network}, MTU {parsed.mtu}",
        ),
        parsed,
    )


def docker_flags(opts: Mapping[str, str]) -> dict[str, str]:
    """The ``--bip``/``--mtu``/``--ip-masq`` values in ``DOCKER_NETWORK_OPTIONS`` (what the docker
    drop-in passes to dockerd), by name without dashes."""
    try:
        tokens = shlex.split(opts.get("DOCKER_NETWORK_OPTIONS", ""))
    except ValueError:
        return {}
    flags: dict[str, str] = {}
    for i, tok in enumerate(tokens):
        if not tok.startswith("--"):
            continue
        name, eq, value = tok[2:].partition("=")
        if name not in DOCKER_KEYS:
            continue
        if not eq:
            value = tokens[i + 1] if i + 1 < len(tokens) else ""
        flags[name] = value
    return flags


def check_docker_config(
    config_path: str,
    config_text: str | None,
    opts_path: str,
    opts: Mapping[str, str] | None,
) -> list[Finding]:
    """daemon.json (``config_text`` None: missing) against the docker options file (``opts``
    None: missing; ``opts_path`` "": not written)."""
    if not opts_path:
        return [_skip(DOCKER_CONFIG, 'not checked: no docker options file (--docker-opts-file "")')]
    if opts is None:
        return [
            _skip(
                DOCKER_CONFIG,
                f"not checked: {opts_path} does not exist (flanneld-py writes it once it has a "
                "lease)",
            )
        ]
    flags = docker_flags(opts)
    if config_text is None:
        return [
            _ok(DOCKER_CONFIG, f"{config_path} does not exist: nothing conflicts with {opts_path}")
        ]
    try:
        doc = json.loads(config_text) if config_text.strip() else {}
    except ValueError as e:
        return [
            _fail(
                DOCKER_CONFIG,
                f"{config_path} is not valid JSON ({e}): dockerd refuses to start",
                f"correct {config_path} or remove it, then restart docker",
            )
        ]
    if not isinstance(doc, dict):
        return [
            _fail(
                DOCKER_CONFIG,
                f"{config_path} is not a JSON object: dockerd refuses to start",
                f"correct {config_path} or remove it, then restart docker",
            )
        ]
    out = []
    for key in DOCKER_KEYS:
        if key in flags and key in doc:
            out.append(
                _fail(
                    DOCKER_CONFIG,
                    f'{config_path} sets "{key}": {json.dumps(doc[key])} and {opts_path} passes '
                    f'--{key}={flags[key]}: dockerd refuses to start ("{DOCKERD_CONFLICT}")',
                    f'remove "{key}" from {config_path} (flanneld-py sets it through '
                    f"{opts_path}), then restart docker",
                )
            )
    if out:
        return out
    given = ", ".join(f"--{k}" for k in flags) or "no --bip/--mtu/--ip-masq"
    return [_ok(DOCKER_CONFIG, f"{config_path} repeats none of {opts_path}'s options ({given})")]


def check_docker_bridge(
    bridge: str,
    addresses: Sequence[IPv4Interface] | None,
    lease: SubnetEnv | None,
    opts_path: str,
) -> Finding:
    """docker0's IPv4 addresses (None: no such device) against the lease."""
    if lease is None:
        return _skip(DOCKER_BRIDGE, "not checked: no lease (see subnet-file)")
    if addresses is None:
        return _skip(
            DOCKER_BRIDGE,
            f"{bridge} does not exist (docker not started yet?): nothing to compare with "
            f"the lease {lease.subnet}",
        )
    inside = [a for a in addresses if a.network == lease.subnet]
    if inside:
        return _ok(DOCKER_BRIDGE, f"{bridge} has {inside[0]}, inside the lease {lease.subnet}")
    have = ", ".join(str(a) for a in addresses) or "no IPv4 address"
    how = f"from {opts_path}" if opts_path else "(flanneld-py's docker options)"
    return _fail(
        DOCKER_BRIDGE,
        f"{bridge} has {have}, outside the lease {lease.subnet} (FLANNEL_SUBNET={lease.address}): "
        "docker started before flanneld-py, or was not restarted after the lease changed; no "
        "other host routes its containers' addresses here",
        f"restart docker so that it starts with --bip={lease.address} {how}",
    )


def _strip_comment(tokens: Sequence[str]) -> list[str]:
    """A rule's tokens without ``-m comment --comment X``."""
    out: list[str] = []
    i = 0
    while i < len(tokens):
        if list(tokens[i : i + 3]) == ["-m", "comment", "--comment"]:
            i += 4
            continue
        out.append(tokens[i])
        i += 1
    return out


def check_forward(
    network: IPv4Network | None,
    policy: str | None,
    forward_rules: Sequence[Sequence[str]],
    chain_rules: Sequence[Sequence[str]] | None,
    error: str | None = None,
) -> Finding:
    """The filter table's FORWARD chain: ``policy``, its rules (tokens after ``-A FORWARD``) and
    ``FLANNEL-FWD``'s rules (None: the chain does not exist); ``error``: iptables failed."""
    if error is not None:
        return _skip(FORWARD, f"not checked: {error}")
    if policy is None:
        return _skip(FORWARD, "not checked: iptables -S FORWARD printed no policy")
    if policy == "ACCEPT":
        return _ok(FORWARD, "FORWARD policy is ACCEPT")
    if network is None:
        return _skip(FORWARD, f"FORWARD policy is {policy}; not checked further: no Network known")
    n = str(network)
    want = {"-s": ["-s", n, "-j", "ACCEPT"], "-d": ["-d", n, "-j", "ACCEPT"]}
    plain = [_strip_comment(r) for r in forward_rules]
    jump = ["-j", FORWARD_CHAIN] in plain
    accepted = {d for d, rule in want.items() if rule in plain}
    if jump and chain_rules is not None:
        chain = [_strip_comment(r) for r in chain_rules]
        accepted |= {d for d, rule in want.items() if rule in chain}
    if accepted == set(want):
        how = f"flanneld-py's {FORWARD_CHAIN} rules" if jump else "FORWARD rules"
        return _ok(FORWARD, f"FORWARD policy is {policy}; {how} accept the overlay {n}")
    if chain_rules is None and not jump:
        missing = f"flanneld-py's {FORWARD_CHAIN} chain and its jump are missing"
    elif not jump:
        missing = f"the jump FORWARD -> {FORWARD_CHAIN} is missing"
    elif chain_rules is None:
        missing = f"the chain {FORWARD_CHAIN} is missing"
    else:
        lacking = " and ".join(f"`{' '.join(want[d])}`" for d in want if d not in accepted)
        missing = f"{FORWARD_CHAIN} lacks {lacking}"
    return _fail(
        FORWARD,
        f"FORWARD policy is {policy} and no rule accepts the overlay {n} ({missing}): packets "
        "between other hosts' containers and this host's containers are dropped",
        "restart flanneld-py with --iptables-forward-rules=true (the default; it installs and "
        f"keeps {FORWARD_CHAIN}), or accept the overlay by hand: iptables -I FORWARD 1 -s {n} "
        f"-j ACCEPT && iptables -I FORWARD 1 -d {n} -j ACCEPT",
    )


def check_ip_forward(value: str | None) -> Finding:
    """``/proc/sys/net/ipv4/ip_forward`` (None: unreadable)."""
    if value is None:
        return _skip(IP_FORWARD, "not checked: cannot read /proc/sys/net/ipv4/ip_forward")
    if value.strip() == "0":
        return _fail(
            IP_FORWARD,
            "net.ipv4.ip_forward is 0: this host does not forward packets between the overlay "
            "and its containers",
            "sysctl -w net.ipv4.ip_forward=1 (and put net.ipv4.ip_forward=1 into a file in "
            "/etc/sysctl.d/ to keep it after a reboot)",
        )
    return _ok(IP_FORWARD, f"net.ipv4.ip_forward is {value.strip()}")


def check_mtu(
    bridge: str,
    lease: SubnetEnv | None,
    bridge_mtu: int | None,
    bridge_ports: int,
    containers: Sequence[ContainerMtu] | None,
    docker_error: str | None,
    opts_path: str,
) -> list[Finding]:
    """The bridge's MTU (None: no bridge) and its number of ports; the containers' interfaces on
    it (None: docker not reachable, ``docker_error`` says why)."""
    if lease is None:
        return [_skip(MTU, "not checked: no lease (see subnet-file)")]
    limit = lease.mtu
    how = f"--mtu={limit} from {opts_path}" if opts_path else f"--mtu={limit}"
    out: list[Finding] = []
    if bridge_mtu is None:
        out.append(_skip(MTU, f"{bridge} does not exist: no bridge MTU to compare with {limit}"))
    elif bridge_mtu > limit and bridge_ports:
        out.append(
            _fail(
                MTU,
                f"{bridge} MTU {bridge_mtu} is larger than the lease MTU {limit} (FLANNEL_MTU): "
                f"packets over {limit} bytes do not fit the overlay and are dropped",
                f"ip link set {bridge} mtu {limit}, and start docker with {how}",
            )
        )
    elif bridge_mtu > limit:
        out.append(
            _ok(
                MTU,
                f"{bridge} MTU {bridge_mtu} but no container on it yet (a bridge takes the MTU of "
                "its ports)",
            )
        )
    else:
        out.append(_ok(MTU, f"{bridge} MTU {bridge_mtu} fits the lease MTU {limit}"))
    if containers is None:
        out.append(_skip(MTU, f"container MTUs not checked: {docker_error or 'no docker'}"))
        return out
    big = [c for c in containers if c.mtu > limit]
    for c in big:
        out.append(
            _fail(
                MTU,
                f"container {c.name}: {c.ifname} MTU {c.mtu} is larger than the lease MTU {limit} "
                f"(FLANNEL_MTU): its packets over {limit} bytes do not fit the overlay (docker "
                "started without flanneld-py's --mtu?)",
                f"start docker with {how}, then recreate {c.name}",
            )
        )
    if not big:
        n = len(containers)
        what = "no running container" if n == 0 else f"{n} container{'s' * (n != 1)}"
        out.append(_ok(MTU, f"{what} on {bridge}: none above the lease MTU {limit}"))
    return out


def _rp_mode(value: int) -> str:
    return f"{_RP_MODES.get(value, 'unknown')} ({value})"


def check_rp_filter(
    conf: Mapping[str, int | None],
    overlay_dev: str | None,
    ext_dev: str | None,
    peers: Sequence[PeerRoute] | None,
    *,
    direct_routing: bool = False,
    backend: str = "udp",
) -> list[Finding]:
    """``conf``: ``net.ipv4.conf.<key>.rp_filter`` for ``all``, ``default`` and the devices (None:
    no such device). ``overlay_dev``: where peers' container packets arrive (flannel0,
    flannel.<VNI>; host-gw: the external interface); ``ext_dev``: where the encapsulated packets
    arrive (udp, vxlan). ``peers`` None: no peer list (etcd unreachable).

    The kernel uses max(all, <device>); a device that does not exist yet gets ``default`` when
    created. Strict mode (1) drops a packet unless the route back to its source leaves by the
    device it came in on.
    """
    if overlay_dev is None:
        return [_skip(RP_FILTER, "not checked: backend and overlay device unknown (see etcd)")]
    all_ = conf.get("all") or 0
    default = conf.get("default") or 0

    def effective(dev: str) -> tuple[int, list[str]]:
        own = conf.get(dev)
        why = [f"net.ipv4.conf.all.rp_filter={all_}"] if all_ == 1 else []
        if own is None:
            own = default
            if own == 1:
                why.append(f"net.ipv4.conf.default.rp_filter=1, which {dev} gets when created")
        elif own == 1:
            why.append(f"net.ipv4.conf.{dev}.rp_filter=1")
        return max(all_, own), why

    devices: list[tuple[str, str]] = [(overlay_dev, "inner")]
    if ext_dev is not None and ext_dev != overlay_dev and backend != "host-gw":
        devices.append((ext_dev, "outer"))
    fine: list[str] = []
    out: list[Finding] = []
    for dev, kind in devices:
        value, why = effective(dev)
        if value != 1:
            fine.append(f"{dev} {_rp_mode(value)}")
            continue
        if peers is None:
            out.append(
                _skip(
                    RP_FILTER,
                    f"rp_filter is strict on {dev}; not checked whether it drops overlay packets: "
                    "no peer list (see etcd)",
                )
            )
            continue
        if kind == "inner":
            allowed = {dev} | ({ext_dev} if direct_routing and ext_dev else set())
            bad = [
                (str(p.subnet), p.via) for p in peers if p.via is not None and p.via not in allowed
            ]
            what = "packets from"
        else:
            bad = [
                (str(p.public_ip), p.public_via)
                for p in peers
                if p.public_via is not None and p.public_via != dev
            ]
            what = "encapsulated packets from peers"
        if not bad:
            fine.append(f"{dev} strict (1), but every peer's route back leaves via {dev}")
            continue
        sources = ", ".join(s for s, _ in bad)
        vias = ", ".join(sorted({v for _, v in bad if v}))
        keys = (
            ["net.ipv4.conf.all.rp_filter=2"] if all_ == 1 else [f"net.ipv4.conf.{dev}.rp_filter=2"]
        )
        if all_ != 1 and default == 1:
            keys.append("net.ipv4.conf.default.rp_filter=2")
        out.append(
            _fail(
                RP_FILTER,
                f"rp_filter is strict on {dev} ({', '.join(why)}): {what} {sources} arriving on "
                f"{dev} are dropped, because the route back to them leaves via {vias}, not {dev}",
                f"sysctl -w {' '.join(keys)} (loose mode), or remove the route that sends "
                f"{sources} via {vias}",
            )
        )
    if fine:
        out.insert(0, _ok(RP_FILTER, "rp_filter: " + "; ".join(fine)))
    return out


def check_peers(
    backend: str,
    port: int,
    probes: Sequence[PeerProbe] | None,
    timeout: float,
    prefix: str,
    error: str | None = None,
) -> list[Finding]:
    """Probes of the peers (None: no peer list; ``error`` says why)."""
    if probes is None:
        return [_skip(PEERS, f"not checked: {error or 'no peer list'}")]
    if not probes:
        return [_ok(PEERS, "no peers in etcd (this is the only host)")]
    out: list[Finding] = []
    answered: list[str] = []
    for p in probes:
        lease = p.lease
        peer = f"peer {lease.subnet} (PublicIP {lease.public_ip})"
        ptype = lease.backend_type or "udp"
        if ptype != backend:
            out.append(
                _fail(
                    PEERS,
                    f"{peer} announces backend {ptype}, but the network's Backend.Type is "
                    f"{backend}: flanneld-py ignores it, so its containers are unreachable",
                    f"run every host with the network's backend: restart flanneld-py on "
                    f"{lease.public_ip} (it reads {prefix}/config at start)",
                )
            )
            continue
        if p.answered is None:
            out.append(_skip(PEERS, f"{peer} not probed: {error or 'no ping'}"))
            continue
        if p.answered:
            answered.append(str(p.target))
            continue
        if backend == "host-gw":
            path = f"that {lease.public_ip} is on this host's link (host-gw routes via it)"
        else:
            path = (
                f"that UDP {port} ({backend}) passes between this host and {lease.public_ip} "
                "(firewalls, security groups)"
            )
        out.append(
            _fail(
                PEERS,
                f"{peer} does not answer through the overlay: no echo reply from {p.target} "
                f"within {timeout:g}s",
                f"check that flanneld-py and docker run on {lease.public_ip} (the probe pings its "
                f"docker0 address {p.target}) and {path}",
            )
        )
    if answered:
        n = len(answered)
        verb = "answers" if n == 1 else "answer"
        out.insert(
            0,
            _ok(
                PEERS,
                f"{n} peer{'s' * (n != 1)} {verb} through the overlay ({', '.join(answered)})",
            ),
        )
    return out


def check_etcd(
    prefix: str,
    error: str | None,
    config_text: bytes | None,
    unreachable: bool = True,
) -> Finding:
    """etcd's answer: ``error`` (the store failed: ``unreachable`` = no member answered) or the
    value of ``<prefix>/config`` (None: missing)."""
    key = _normalize_prefix(prefix) + "/config"
    if error is not None:
        if unreachable:
            return _fail(
                ETCD,
                error,
                "start etcd, or point --etcd-endpoints (FLANNELD_ETCD_ENDPOINTS) at a running "
                "member",
            )
        return _fail(ETCD, error, "correct the etcd settings named in the message")
    example = '{"Network": "10.5.0.0/16", "Backend": {"Type": "udp"}}'
    if config_text is None:
        return _fail(
            ETCD,
            f"{key} is missing in etcd: flanneld-py waits for it and gets no lease",
            f"etcdctl put {key} '{example}' (with your Network and backend)",
        )
    try:
        cfg = parse_config(config_text)
    except ConfigError as e:
        return _fail(
            ETCD,
            f"{key} is invalid: {e}",
            f"correct it: etcdctl put {key} '{example}' (with your Network and backend)",
        )
    return _ok(ETCD, f"{key}: Network {cfg.network}, Backend.Type {cfg.backend_type}")


def check_duplicate_public_ips(
    prefix: str,
    leases: Sequence[LeaseInfo] | None,
    own_subnet: IPv4Network | None,
    error: str | None = None,
) -> list[Finding]:
    """Leases that share a PublicIP (peers send all those subnets to one host)."""
    if leases is None:
        return [_skip(DUPLICATE_PUBLIC_IP, f"not checked: {error or 'no lease list'}")]
    by_ip: dict[IPv4Address, list[LeaseInfo]] = {}
    for lease in leases:
        by_ip.setdefault(lease.public_ip, []).append(lease)
    out: list[Finding] = []
    for ip, group in sorted(by_ip.items()):
        if len(group) < 2:
            continue
        group = sorted(group, key=lambda x: x.subnet)
        subnets = ", ".join(str(x.subnet) for x in group)
        mine = [x for x in group if x.subnet == own_subnet]
        if mine:
            stale = " ".join(x.key for x in group if x.subnet != own_subnet)
            fix = f"delete the stale lease (this host holds {own_subnet}): etcdctl del {stale}"
        else:
            fix = (
                f"delete the stale one (etcdctl del {subnets_prefix(prefix)}<net>-<len>), or give "
                "each host its own address (--public-ip, --iface)"
            )
        out.append(
            _fail(
                DUPLICATE_PUBLIC_IP,
                f"PublicIP {ip} holds {len(group)} leases ({subnets}): one is stale (a host that "
                "lost its subnet file took a new subnet) or two hosts announce the same address",
                fix,
            )
        )
    if not out:
        n = len(leases)
        out.append(
            _ok(
                DUPLICATE_PUBLIC_IP, f"every lease has its own PublicIP ({n} lease{'s' * (n != 1)})"
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# collection (the host)


def ping_argv(*args: object) -> list[str] | None:
    """iputils ``ping`` + ``args``, or busybox's when it is missing; None when there is neither."""
    if shutil.which("ping"):
        cmd = ["ping"]
    elif shutil.which("busybox"):
        cmd = ["busybox", "ping"]
    else:
        return None
    return cmd + [str(a) for a in args]


def _run(argv: Sequence[str], timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    """Run a command; a missing binary or a timeout comes back as rc 127/124 with a message."""
    try:
        return subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        return subprocess.CompletedProcess(list(argv), 127, "", f"`{argv[0]}` not found")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(
            list(argv), 124, "", f"`{shlex.join(argv)}` did not finish in {timeout:g}s"
        )


def _err(proc: subprocess.CompletedProcess[str]) -> str:
    return _one_line(proc.stderr or proc.stdout) or f"exit status {proc.returncode}"


def _ip_json(*args: str) -> list[dict[str, Any]] | None:
    proc = _run(["ip", "-j", *args])
    if proc.returncode != 0:
        return None
    try:
        data = json.loads(proc.stdout) if proc.stdout.strip() else []
    except ValueError:
        return None
    return data if isinstance(data, list) else None


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _sysctl(key: str) -> str | None:
    try:
        return _read("/proc/sys/" + key.replace(".", "/"))
    except OSError:
        return None


def _sysctl_int(key: str) -> int | None:
    text = _sysctl(key)
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def _addresses(dev: str) -> list[IPv4Interface] | None:
    data = _ip_json("-4", "addr", "show", "dev", dev)
    if data is None:
        return None
    return [
        IPv4Interface(f"{a['local']}/{a['prefixlen']}")
        for link in data
        for a in link.get("addr_info", [])
        if a.get("family") == "inet"
    ]


def _local_addresses() -> dict[IPv4Address, str]:
    out: dict[IPv4Address, str] = {}
    for link in _ip_json("-4", "addr", "show") or []:
        for a in link.get("addr_info", []):
            with contextlib.suppress(KeyError, ValueError):
                out[IPv4Address(a["local"])] = str(link["ifname"])
    return out


def _route_dev(addr: IPv4Address) -> str | None:
    data = _ip_json("route", "get", str(addr))
    if not data:
        return None
    dev = data[0].get("dev")
    return str(dev) if dev else None


def _filter_table() -> tuple[dict[str, str], dict[str, list[list[str]]], str | None]:
    """``iptables -S`` of the filter table: (policies by chain, rules by chain as the tokens after
    ``-A <chain>``, error). One listing of the whole table: asking for a chain that does not exist
    fails with a misleading message on iptables-nft ("incompatible, use 'nft' tool")."""
    proc = _run(["iptables", "-w", "5", "-t", "filter", "-S"])
    if proc.returncode != 0:
        return {}, {}, f"iptables -S failed: {_err(proc)}"
    policies: dict[str, str] = {}
    rules: dict[str, list[list[str]]] = {}
    for line in proc.stdout.splitlines():
        try:
            tokens = shlex.split(line)
        except ValueError:
            continue
        if len(tokens) >= 3 and tokens[0] == "-P":
            policies[tokens[1]] = tokens[2]
            rules.setdefault(tokens[1], [])
        elif len(tokens) >= 2 and tokens[0] == "-N":
            rules.setdefault(tokens[1], [])
        elif len(tokens) >= 2 and tokens[0] == "-A":
            rules.setdefault(tokens[1], []).append(tokens[2:])
    return policies, rules, None


# --- docker API (HTTP over the unix socket) ---------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("docker", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _docker_get(sock_path: str, path: str, timeout: float) -> Any:
    conn = _UnixHTTPConnection(sock_path, timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise OSError(f"GET {path} -> {resp.status} {_one_line(body.decode(errors='replace'))}")
        return json.loads(body)
    finally:
        conn.close()


def _docker_containers(
    host: str, bridge_network: str, timeout: float
) -> tuple[list[ContainerMtu] | None, str | None]:
    """The interface on docker's default bridge network of every running container."""
    if not host.startswith("unix://"):
        return None, f"only unix:// docker hosts are supported, not {host}"
    path = host.removeprefix("unix://")
    if not os.path.exists(path):
        return None, f"no docker socket at {path}"
    try:
        listing = _docker_get(path, "/containers/json", timeout)
    except (OSError, ValueError) as e:
        return None, f"docker at {host} does not answer ({e})"
    out: list[ContainerMtu] = []
    for c in listing:
        nets = (c.get("NetworkSettings") or {}).get("Networks") or {}
        ip = (nets.get(bridge_network) or {}).get("IPAddress")
        if not ip:
            continue
        name = (c.get("Names") or ["/" + str(c.get("Id", "?"))[:12]])[0].lstrip("/")
        try:
            info = _docker_get(path, f"/containers/{quote(str(c['Id']))}/json", timeout)
            pid = int(info["State"]["Pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # gone meanwhile
        proc = _run(["nsenter", f"--net=/proc/{pid}/ns/net", "ip", "-j", "addr", "show"])
        if proc.returncode != 0:
            if not os.path.exists(f"/proc/{pid}"):
                continue  # it stopped meanwhile
            return None, f"cannot read the interfaces of container {name} ({_err(proc)})"
        with contextlib.suppress(ValueError):
            for link in json.loads(proc.stdout or "[]"):
                if any(a.get("local") == ip for a in link.get("addr_info", [])):
                    out.append(ContainerMtu(name, str(link["ifname"]), int(link["mtu"])))
    return out, None


# --- etcd -------------------------------------------------------------------------------------


@dataclass
class _EtcdAnswer:
    error: str | None = None
    unreachable: bool = True
    config: bytes | None = None
    leases: list[LeaseInfo] | None = None


async def _read_etcd(args: argparse.Namespace) -> _EtcdAnswer:
    from flanneld_py.store import StoreError, StoreUnavailable
    from flanneld_py.store.etcd import EtcdSettings, EtcdStore

    try:
        settings = EtcdSettings(
            endpoints=[e for e in args.etcd_endpoints.split(",") if e.strip()],
            username=args.etcd_username,
            password=args.etcd_password,
            keyfile=args.etcd_keyfile,
            certfile=args.etcd_certfile,
            cafile=args.etcd_cafile,
            timeout=args.probe_timeout,
        )
        store = EtcdStore(settings)
    except (ValueError, StoreError) as e:
        return _EtcdAnswer(error=str(e), unreachable=False)
    prefix = _normalize_prefix(args.etcd_prefix)
    try:
        kv = await store.get(prefix + "/config")
        kvs, _ = await store.list(subnets_prefix(prefix))
    except StoreUnavailable as e:
        return _EtcdAnswer(
            error=str(e).replace("; check --etcd-endpoints and that etcd is running", "")
        )
    except StoreError as e:
        return _EtcdAnswer(error=str(e), unreachable=False)
    finally:
        await store.close()
    leases: list[LeaseInfo] = []
    for item in kvs:
        try:
            subnet = parse_lease_key(item.key)
            value = decode_lease(item.value)
        except LeaseFormatError:
            continue
        leases.append(LeaseInfo(item.key, subnet, value.public_ip, value.backend_type))
    return _EtcdAnswer(config=kv.value if kv is not None else None, leases=leases)


# --- the run ----------------------------------------------------------------------------------


def _probe(targets: Sequence[IPv4Address], timeout: float) -> dict[IPv4Address, bool] | None:
    """One ICMP echo to every target at once, each bounded by ``timeout`` (whole seconds, at
    least 1, as ping's -W takes them); None when there is no ping."""
    wait = max(1, math.ceil(timeout))
    if ping_argv() is None:
        return None
    procs: dict[IPv4Address, subprocess.Popen[bytes]] = {}
    try:
        for t in targets:
            procs[t] = subprocess.Popen(
                ping_argv("-c", 1, "-W", wait, t) or [],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + wait + 2
        out: dict[IPv4Address, bool] = {}
        for t, proc in procs.items():
            try:
                out[t] = proc.wait(max(0.1, deadline - time.monotonic())) == 0
            except subprocess.TimeoutExpired:
                out[t] = False
        return out
    finally:
        for proc in procs.values():  # only ours, by PID
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _guarded(check: str, fn: Callable[[], list[Finding]]) -> list[Finding]:
    """Run one check; an unexpected error becomes one failed line instead of a traceback."""
    try:
        return fn()
    except Exception as e:  # a bug, or a host state nobody foresaw: still one line
        return [_fail(check, f"could not check: {type(e).__name__}: {e}", "report this as a bug")]


def run_checks(args: argparse.Namespace) -> list[Finding]:
    """Collect the facts of this host and decide every check."""
    env = _Env()
    findings: list[Finding] = []

    def subnet_file() -> list[Finding]:
        text = _read(args.subnet_file)
        values = read_subnet_env(args.subnet_file) if text is not None else None
        finding, env.subnet = check_subnet_file(args.subnet_file, values)
        return [finding]

    def docker_config() -> list[Finding]:
        opts = None
        if args.docker_opts_file and _read(args.docker_opts_file) is not None:
            opts = read_subnet_env(args.docker_opts_file)
        return check_docker_config(
            args.docker_config, _read(args.docker_config), args.docker_opts_file, opts
        )

    def docker_bridge() -> list[Finding]:
        addrs = _addresses(args.docker_bridge)
        return [check_docker_bridge(args.docker_bridge, addrs, env.subnet, args.docker_opts_file)]

    def forward() -> list[Finding]:
        network = env.subnet.network if env.subnet else (env.config.network if env.config else None)
        policies, chains, error = _filter_table()
        if error is None and "FORWARD" not in policies:
            error = "iptables -S lists no FORWARD chain"
        return [
            check_forward(
                network,
                policies.get("FORWARD"),
                chains.get("FORWARD", []),
                chains.get(FORWARD_CHAIN),
                error,
            )
        ]

    def ip_forward() -> list[Finding]:
        return [check_ip_forward(_sysctl("net.ipv4.ip_forward"))]

    def mtu() -> list[Finding]:
        link = _ip_json("link", "show", "dev", args.docker_bridge)
        bridge_mtu = int(link[0]["mtu"]) if link else None
        ports = len(_ip_json("link", "show", "master", args.docker_bridge) or []) if link else 0
        containers, why = _docker_containers(args.docker_host, "bridge", args.probe_timeout)
        return check_mtu(
            args.docker_bridge,
            env.subnet,
            bridge_mtu,
            ports,
            containers,
            why,
            args.docker_opts_file,
        )

    def etcd() -> list[Finding]:
        answer = asyncio.run(_read_etcd(args))
        finding = check_etcd(args.etcd_prefix, answer.error, answer.config, answer.unreachable)
        env.etcd_error = "etcd unreachable" if answer.error and answer.unreachable else answer.error
        if answer.error is None and answer.config is None:
            env.etcd_error = "no network config in etcd"
        if answer.config is not None:
            with contextlib.suppress(ConfigError):
                env.config = parse_config(answer.config)
            if env.config is None:
                env.etcd_error = "the network config in etcd is invalid"
        env.leases = answer.leases
        return [finding]

    env.local_addrs = _local_addresses()
    for check, fn in ((SUBNET_FILE, subnet_file), (ETCD, etcd)):
        findings += _guarded(check, fn)
    own, others = _split_leases(env)

    def rp_filter() -> list[Finding]:
        backend, overlay = _overlay_device(env, args.tun_name)
        ext = env.local_addrs.get(own.public_ip) if own is not None else None
        if ext is None and others:
            ext = _route_dev(others[0].public_ip)
        routes = None
        if others is not None:
            routes = [
                PeerRoute(
                    p.subnet,
                    p.public_ip,
                    _route_dev(p.subnet.network_address + 1),
                    _route_dev(p.public_ip),
                )
                for p in others
                if (p.backend_type or "udp") == backend
            ]
        if backend == "host-gw":
            overlay = ext
        devs = {d for d in (overlay, ext) if d}
        conf = {k: _sysctl_int(f"net.ipv4.conf.{k}.rp_filter") for k in ("all", "default", *devs)}
        direct = bool(env.config and env.config.backend.direct_routing)
        return check_rp_filter(conf, overlay, ext, routes, direct_routing=direct, backend=backend)

    def peers() -> list[Finding]:
        backend = env.config.backend_type if env.config else "udp"
        port = env.config.port if env.config else 8285
        if others is None:
            return check_peers(
                backend, port, None, args.probe_timeout, args.etcd_prefix, env.etcd_error
            )
        targets = [
            p.subnet.network_address + 1 for p in others if (p.backend_type or "udp") == backend
        ]
        answers = _probe(targets, args.probe_timeout) if targets else {}
        probes = [
            PeerProbe(
                p,
                p.subnet.network_address + 1,
                None if answers is None else answers.get(p.subnet.network_address + 1),
            )
            for p in others
        ]
        error = None if answers is not None else "no ping (apt-get install iputils-ping)"
        return check_peers(backend, port, probes, args.probe_timeout, args.etcd_prefix, error)

    def duplicates() -> list[Finding]:
        return check_duplicate_public_ips(
            args.etcd_prefix,
            env.leases,
            env.subnet.subnet if env.subnet else None,
            env.etcd_error,
        )

    ordered = (
        (DOCKER_CONFIG, docker_config),
        (DOCKER_BRIDGE, docker_bridge),
        (FORWARD, forward),
        (IP_FORWARD, ip_forward),
        (MTU, mtu),
        (RP_FILTER, rp_filter),
        (PEERS, peers),
        (DUPLICATE_PUBLIC_IP, duplicates),
    )
    for check, fn in ordered:
        findings += _guarded(check, fn)
    order = {c: i for i, c in enumerate(CHECKS)}
    return sorted(findings, key=lambda f: order.get(f.check, len(order)))


def _split_leases(env: _Env) -> tuple[LeaseInfo | None, list[LeaseInfo] | None]:
    """Our lease (the subnet file's, else one with a local PublicIP) and the peers' (leases with
    our PublicIP are not peers, as for the daemon)."""
    if env.leases is None:
        return None, None
    own_subnet = env.subnet.subnet if env.subnet else None
    own = next((x for x in env.leases if x.subnet == own_subnet), None)
    if own is None:
        own = next((x for x in env.leases if x.public_ip in env.local_addrs), None)
    own_ips = {own.public_ip} if own else set(env.local_addrs)
    others = [
        x
        for x in env.leases
        if x is not own
        and x.public_ip not in own_ips
        and (env.config is None or x.subnet.subnet_of(env.config.network))
    ]
    return own, others


def _overlay_device(env: _Env, tun_name: str) -> tuple[str, str | None]:
    """(backend type, the device where peers' container packets arrive)."""
    if env.config is not None:
        backend = env.config.backend_type
        if backend == "udp":
            return backend, tun_name
        if backend == "vxlan":
            return backend, f"flannel.{env.config.backend.vni}"
        return backend, None  # host-gw: the external interface
    if _ip_json("link", "show", "dev", tun_name):
        return "udp", tun_name
    for link in _ip_json("link", "show") or []:
        name = str(link.get("ifname", ""))
        if name.startswith("flannel.") and name[8:].isdigit():
            return "vxlan", name
    return "udp", None


# ---------------------------------------------------------------------------------------------
# command line


def _env_default(environ: Mapping[str, str], name: str, default: str | None) -> str | None:
    """``FLANNELD_<NAME>`` (then flannel's legacy names for the etcd flags), else ``default``."""
    var = "FLANNELD_" + name.upper().replace("-", "_")
    value = environ.get(var, "")
    if value == "":
        legacy = {
            "etcd-endpoints": ("FLANNEL_ETCD_ENDPOINTS", "FLANNEL_ETCD"),
            "etcd-prefix": ("FLANNEL_ETCD_PREFIX", "FLANNEL_ETCD_KEY"),
        }
        for old in legacy.get(name, ()):
            value = environ.get(old, "").strip()
            if value:
                break
    return value if value != "" else default


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 60:
        raise argparse.ArgumentTypeError(f"must be between 0 and 60 seconds, not {text}")
    return value


def parse_args(argv: Sequence[str], environ: Mapping[str, str]) -> argparse.Namespace:
    """Flags, completed from ``FLANNELD_*`` like the daemon's. Exits 2 on a usage error."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Check this host for what breaks the flannel overlay; one line per finding "
        "(what is wrong, how to fix it). Exit status 0 when all is well, 1 otherwise. Run it as "
        "root on the host. Flags not given are read from FLANNELD_<FLAG> as the daemon does.",
    )
    flags: list[tuple[str, str | None, str]] = [
        ("subnet-file", DEFAULT_SUBNET_FILE, "flanneld-py's subnet file"),
        ("docker-opts-file", DEFAULT_DOCKER_OPTS_FILE, 'flanneld-py\'s docker options ("" = none)'),
        ("etcd-endpoints", ",".join(DEFAULT_ETCD_ENDPOINTS), "etcd client URLs, comma separated"),
        ("etcd-prefix", DEFAULT_ETCD_PREFIX, "key prefix of the network config and leases"),
        ("etcd-keyfile", None, "TLS client key for etcd"),
        ("etcd-certfile", None, "TLS client certificate for etcd"),
        ("etcd-cafile", None, "CA bundle for etcd's certificate"),
        ("etcd-username", None, "etcd user"),
        ("etcd-password", None, "etcd password"),
        ("tun-name", DEFAULT_TUN_NAME, "the udp backend's TUN device"),
    ]
    for name, default, text in flags:
        value = _env_default(environ, name, default)
        shown = "" if "password" in name or value is None else f" (default: {value})"
        metavar = name.split("-")[-1].upper()
        p.add_argument(f"--{name}", default=value, metavar=metavar, help=text + shown)
    p.add_argument(
        "--docker-config",
        default=DEFAULT_DOCKER_CONFIG,
        help=f"dockerd's config file (default: {DEFAULT_DOCKER_CONFIG})",
    )
    p.add_argument(
        "--docker-bridge",
        default=DEFAULT_DOCKER_BRIDGE,
        help=f"docker's bridge (default: {DEFAULT_DOCKER_BRIDGE})",
    )
    p.add_argument(
        "--docker-host",
        default=environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST,
        help=f"docker's API socket (default: $DOCKER_HOST or {DEFAULT_DOCKER_HOST})",
    )
    p.add_argument(
        "--probe-timeout",
        type=_positive_seconds,
        default=DEFAULT_PROBE_TIMEOUT,
        metavar="SECONDS",
        help="seconds to wait for a peer's echo reply and for etcd "
        f"(default: {DEFAULT_PROBE_TIMEOUT:g})",
    )
    p.add_argument(
        "--json", action="store_true", help="print a JSON list of {check, ok, message, fix}"
    )
    return p.parse_args(list(argv))


def main(argv: list[str]) -> int:
    """``flanneld-py doctor [flags]``: 0 when every check passed, 1 otherwise (2: bad flags)."""
    args = parse_args(argv, os.environ)
    if os.geteuid() != 0:
        print(
            f"{PROG}: not running as root: the iptables, container and ping checks may fail",
            file=sys.stderr,
        )
    try:
        findings = run_checks(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # never a traceback
        print(f"{PROG}: internal error: {type(e).__name__}: {_one_line(str(e))}", file=sys.stderr)
        return 1
    failed = [f for f in findings if not f.ok]
    if args.json:
        print(json.dumps([f.as_json() for f in findings], indent=2))
    else:
        for f in findings:
            print(f.line())
        n = len(failed)
        print(f"{PROG}: " + (f"{n} problem{'s' * (n != 1)} found" if n else "all checks passed"))
    sys.stdout.flush()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
