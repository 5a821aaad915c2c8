"""The daemon's settings, as parsed from flags and ``FLANNELD_*`` variables by :mod:`cli`.

The defaults below are flannel's (its flags and defaults, as flanneld documents them) plus our own
flags.
``Options()`` with no arguments is a valid configuration, which keeps tests short.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "DEFAULT_CONTROL_SOCKET",
    "DEFAULT_DOCKER_OPTS_FILE",
    "DEFAULT_ETCD_ENDPOINTS",
    "DEFAULT_ETCD_PREFIX",
    "DEFAULT_SUBNET_FILE",
    "Engine",
    "EtcdApi",
    "EventLoop",
    "LogLevel",
    "Offload",
    "Options",
]

EventLoop = Literal["uvloop", "asyncio"]
Engine = Literal["auto", "c", "python"]
Offload = Literal["auto", "off"]
EtcdApi = Literal["auto", "v3", "v2"]
LogLevel = Literal["debug", "info", "warning", "error"]

DEFAULT_ETCD_ENDPOINTS = ("http://127.0.0.1:4001", "http://127.0.0.1:2379")
DEFAULT_ETCD_PREFIX = "/coreos.com/network"
DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"
DEFAULT_DOCKER_OPTS_FILE = "/run/flannel/docker"
DEFAULT_CONTROL_SOCKET = "/run/flannel/flanneld-py.sock"


@dataclass(frozen=True)
class Options:
    """Everything the daemon is told from outside. Values are already validated by the CLI."""

    # -- etcd -------------------------------------------------------------------------------
    #: etcd client URLs, ``http(s)://host:port``, tried in any order.
    etcd_endpoints: tuple[str, ...] = DEFAULT_ETCD_ENDPOINTS
    #: key prefix of the network; config at ``<prefix>/config``, leases under ``<prefix>/subnets/``.
    etcd_prefix: str = DEFAULT_ETCD_PREFIX
    #: client TLS key and certificate (always both or neither) and the CA bundle for the server.
    etcd_keyfile: str | None = None
    etcd_certfile: str | None = None
    etcd_cafile: str | None = None
    #: etcd authentication (always both or neither).
    etcd_username: str | None = None
    etcd_password: str | None = field(default=None, repr=False)  # kept out of logs
    #: etcd API: "v3" (flanneld >= v0.18), "v2" (flanneld <= v0.17; etcd --enable-v2), or "auto"
    #: = the keyspace that holds ``<prefix>/config`` (v3 if both do).
    etcd_api: EtcdApi = "auto"

    # -- external interface -----------------------------------------------------------------
    #: interfaces (name or IPv4 address) to try in order; empty = the default route's interface.
    iface: tuple[str, ...] = ()
    #: regular expressions (Python ``re``) matched against interface names and addresses, tried
    #: after ``iface``.
    iface_regex: tuple[str, ...] = ()
    #: address announced to peers as the lease's PublicIP; None = the chosen interface's address.
    public_ip: str | None = None

    # -- host integration -------------------------------------------------------------------
    #: install flannel's MASQUERADE rules for traffic leaving the overlay.
    ip_masq: bool = False
    #: where FLANNEL_NETWORK/SUBNET/MTU/IPMASQ are written (also read at start to reuse a subnet).
    subnet_file: str = DEFAULT_SUBNET_FILE
    #: where the docker options (mk-docker-opts.sh format) are written; "" = don't write.
    docker_opts_file: str = DEFAULT_DOCKER_OPTS_FILE
    #: renew the lease this many minutes before it expires (1..1439).
    subnet_lease_renew_margin: int = 60
    #: healthz/status HTTP server address and port; port 0 = no server (flannel semantics).
    healthz_ip: str = "0.0.0.0"
    healthz_port: int = 0
    #: seconds between checks that our iptables rules are still present (>= 1).
    iptables_resync: int = 5
    #: add ACCEPT rules for the overlay network to FORWARD (docker sets its policy to DROP).
    iptables_forward_rules: bool = True
    #: local control socket (mode 0600): /healthz, /readyz, /status, /metrics over AF_UNIX, read
    #: by ``flanneld-py status``; "" = none.
    control_socket: str = DEFAULT_CONTROL_SOCKET

    # -- ours -------------------------------------------------------------------------------
    #: "uvloop" (falls back to asyncio with a warning when uvloop is not importable) or "asyncio".
    event_loop: EventLoop = "uvloop"
    #: packet engine: "c" = the C extension, "python" = the pure-Python path, "auto" = C if built.
    engine: Engine = "auto"
    #: segmentation offloads of the C engine (TUN TSO/checksum, UDP GSO/GRO, coalesced TUN
    #: writes): "auto" = whatever the kernel accepts, "off" = none. The Python engine has none.
    offload: Offload = "auto"
    #: threads of the C engine, each with its own TUN queue and UDP socket (flows spread over
    #: them); 0 = one per CPU. The Python engine has one.
    engine_threads: int = 0
    #: name of the TUN device (at most 15 bytes).
    tun_name: str = "flannel0"
    #: log threshold.
    log_level: LogLevel = "info"

    # -- hidden, for tests ------------------------------------------------------------------
    #: TTL of the etcd lease behind our subnet key, in seconds (flannel: 86400, fixed).
    subnet_lease_ttl: int = 86400
    #: seconds between reads of ``<prefix>/config`` while waiting for it to appear.
    config_poll_interval: float = 1.0

    @property
    def etcd_tls(self) -> bool:
        """True when a client certificate is configured."""
        return self.etcd_keyfile is not None and self.etcd_certfile is not None

    @property
    def healthz_enabled(self) -> bool:
        """False when ``--healthz-port`` is 0 (flannel: no health server at all)."""
        return self.healthz_port != 0
