"""``/metrics``: the daemon's state in the Prometheus text format (the only importer of
prometheus_client).

Nothing is counted here: at each scrape a custom collector reads the daemon's own state (the
subnet manager's lease and counters, the etcd store's counters, the backend's ``status()`` with the
udp engine's counters) and yields metric families from it, on a private ``CollectorRegistry``
rendered with ``generate_latest``. No global registry, no background thread, no state of our own.

Families (``_total`` = counter; every counter starts at 0 with the process):

- ``flanneld_build_info{version}``, ``flanneld_up`` (startup finished, READY=1 sent),
  ``flanneld_alive`` / ``flanneld_ready`` (``/healthz`` / ``/readyz`` as 1/0),
  ``flanneld_start_time_seconds``
- ``flanneld_lease_info{subnet,public_ip,network}``, ``flanneld_lease_expiry_timestamp_seconds``,
  ``flanneld_lease_renewals_total``, ``flanneld_lease_renewal_failures_total``
- ``flanneld_watch_live``, ``flanneld_watch_resyncs_total{reason="compaction"|"reconnect"}``
- ``flanneld_etcd_endpoint_info{endpoint,api}``, ``flanneld_etcd_errors_total``,
  ``flanneld_etcd_endpoint_switches_total`` (when the store keeps them: the v3 store does)
- ``flanneld_peers``, ``flanneld_ignored_peers``, ``flanneld_peer_info{subnet,public_ip,backend}``
- ``flanneld_backend_info{type}``; udp with its engine running: ``flanneld_engine_info{kind}``,
  ``flanneld_offload_active{offload}``, ``flanneld_{tun,udp}_{rx,tx}_{packets,bytes}_total``,
  ``flanneld_drops_total{reason}`` (every ``drop_*`` engine counter, without the prefix, and
  ``icmp_ratelimited``), ``flanneld_io_errors_total{op}``, ``flanneld_icmp_sent_total{type}``,
  and per route ``flanneld_peer_{tx,rx}_{packets,bytes}_total{subnet,public_ip}`` (counted since
  the route was set or its peer changed, so a series restarts at 0 when a peer's host changes)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from flanneld_py import __version__

if TYPE_CHECKING:
    from flanneld_py.daemon import Daemon

__all__ = ["OFFLOADS", "DaemonCollector", "Metrics", "etcd_state"]

#: every offload the C engine can report as active (``engine.offload_status()["active"]``)
OFFLOADS = ("tun_csum", "tun_tso4", "tun_tso6", "tun_tso_ecn", "udp_gso", "udp_gro", "tun_gso")

#: engine counters -> (family, help)
_TRAFFIC = {
    "tun_rx_packets": ("flanneld_tun_rx_packets", "Packets read from the TUN device"),
    "tun_rx_bytes": ("flanneld_tun_rx_bytes", "Bytes read from the TUN device"),
    "tun_tx_packets": ("flanneld_tun_tx_packets", "Packets written into the TUN device"),
    "tun_tx_bytes": ("flanneld_tun_tx_bytes", "Bytes written into the TUN device"),
    "udp_rx_packets": ("flanneld_udp_rx_packets", "Datagrams received from peers"),
    "udp_rx_bytes": ("flanneld_udp_rx_bytes", "Bytes received from peers (UDP payload)"),
    "udp_tx_packets": ("flanneld_udp_tx_packets", "Datagrams sent to peers"),
    "udp_tx_bytes": ("flanneld_udp_tx_bytes", "Bytes sent to peers (UDP payload)"),
}
_IO_ERRORS = {"tun_rx": "tun_rx_errors", "tun_tx": "tun_tx_errors",
              "udp_rx": "udp_rx_errors", "udp_tx": "udp_tx_errors"}  # fmt: skip
_ICMP_SENT = {"unreachable": "icmp_unreachable_sent", "time_exceeded": "icmp_time_exceeded_sent"}


def etcd_state(store: Any) -> dict[str, Any]:
    """What the store in use tells about etcd: ``endpoint`` (the member in use), ``api`` ("v3",
    "v2", None), ``errors`` and ``endpoint_switches`` (None where the store does not count them,
    e.g. the in-memory store of the tests). ``AutoStore`` is looked through to the store it
    chose."""
    api = getattr(store, "api", None)
    if api in ("v3", "v2") and hasattr(store, api):
        store = getattr(store, api)
    elif api is None and hasattr(store, "v3"):  # AutoStore before its choice
        return {"endpoint": None, "api": None, "errors": None, "endpoint_switches": None}
    else:
        api = {"EtcdStore": "v3", "EtcdV2Store": "v2"}.get(type(store).__name__)
    endpoint = getattr(store, "current_endpoint", None)
    errors = getattr(store, "errors", None)
    switches = getattr(store, "endpoint_switches", None)
    return {
        "endpoint": endpoint if isinstance(endpoint, str) else None,
        "api": api,
        "errors": errors if isinstance(errors, int) else None,
        "endpoint_switches": switches if isinstance(switches, int) else None,
    }


class DaemonCollector(Collector):
    """Yields the daemon's metric families at scrape time (see the module docstring)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        d = self.daemon
        yield InfoMetricFamily(
            "flanneld_build", "flanneld-py build", value={"version": __version__}
        )
        yield _gauge("flanneld_up", "1 once startup finished (READY=1 sent)", d.ready)
        yield _gauge("flanneld_alive", "Liveness, as /healthz: 1 = alive", d.check()[0])
        yield _gauge("flanneld_ready", "Readiness, as /readyz: 1 = ready", d.readiness()[0])
        yield _gauge(
            "flanneld_start_time_seconds",
            "When the daemon started, seconds since the epoch",
            d.started_at,
        )
        yield from self._lease()
        yield from self._etcd()
        yield from self._peers()
        yield from self._backend()

    def _lease(self) -> Iterator[Metric]:
        d, mgr = self.daemon, self.daemon.mgr
        lease = mgr.lease if mgr is not None else None
        if lease is not None:
            info = InfoMetricFamily(
                "flanneld_lease", "Our subnet lease", labels=["subnet", "public_ip", "network"]
            )
            network = str(d.cfg.network) if d.cfg is not None else ""
            info.add_metric([str(lease.subnet), str(lease.public_ip), network], {})
            yield info
            if lease.expiration is not None:
                yield _gauge(
                    "flanneld_lease_expiry_timestamp_seconds",
                    "When our lease expires unless renewed, seconds since the epoch",
                    lease.expiration,
                )
        yield _counter(
            "flanneld_lease_renewals",
            "Lease renewals that succeeded (re-acquisitions included)",
            mgr.renewals if mgr else 0,
        )
        yield _counter(
            "flanneld_lease_renewal_failures",
            "Lease renewal attempts that failed (retried every minute)",
            mgr.renewal_failures if mgr else 0,
        )
        yield _gauge(
            "flanneld_watch_live",
            "1 while the lease watch on etcd is live",
            bool(mgr and mgr.watch_live),
        )
        resyncs = CounterMetricFamily(
            "flanneld_watch_resyncs",
            "Lease watch recoveries: reconnect = re-established after a lost connection, "
            "compaction = the revision to resume from was compacted, leases re-listed",
            labels=["reason"],
        )
        counts: Mapping[str, int] = mgr.watch_resyncs if mgr else {}
        for reason in ("compaction", "reconnect"):
            resyncs.add_metric([reason], counts.get(reason, 0))
        yield resyncs

    def _etcd(self) -> Iterator[Metric]:
        st = etcd_state(self.daemon.store)
        if st["endpoint"] is not None:
            info = InfoMetricFamily(
                "flanneld_etcd_endpoint", "The etcd endpoint in use", labels=["endpoint", "api"]
            )
            info.add_metric([st["endpoint"], st["api"] or ""], {})
            yield info
        if st["errors"] is not None:
            yield _counter(
                "flanneld_etcd_errors",
                "Failed requests to an etcd member (each failover attempt) and lost watches",
                st["errors"],
            )
        if st["endpoint_switches"] is not None:
            yield _counter(
                "flanneld_etcd_endpoint_switches",
                "Times the etcd member in use changed (failover)",
                st["endpoint_switches"],
            )

    def _peers(self) -> Iterator[Metric]:
        d = self.daemon
        yield _gauge("flanneld_peers", "Peers the backend routes to", len(d.accepted))
        yield _gauge(
            "flanneld_ignored_peers",
            "Leases ignored because their backend type differs from this network's",
            len(d.ignored_peers),
        )
        info = InfoMetricFamily(
            "flanneld_peer",
            "One series per peer the backend routes to",
            labels=["subnet", "public_ip", "backend"],
        )
        name = d.backend.name if d.backend is not None else ""
        for subnet, lease in sorted(d.accepted.items()):
            info.add_metric([str(subnet), str(lease.public_ip), name], {})
        yield info

    def _backend(self) -> Iterator[Metric]:
        backend = self.daemon.backend
        if backend is None:
            return
        yield InfoMetricFamily("flanneld_backend", "The backend", value={"type": backend.name})
        status = backend.status()
        engine = status.get("engine")
        if not isinstance(engine, dict):
            return  # vxlan, host-gw (the kernel's data path), or udp before its engine runs
        yield InfoMetricFamily(
            "flanneld_engine", "The packet engine", value={"kind": str(engine.get("kind"))}
        )
        offloads = status.get("offloads")
        active = set(offloads.get("active", ())) if isinstance(offloads, dict) else set()
        ofam = GaugeMetricFamily(
            "flanneld_offload_active",
            "Segmentation offloads in use (1) or not (0)",
            labels=["offload"],
        )
        for name in (*OFFLOADS, *sorted(active - set(OFFLOADS))):
            ofam.add_metric([name], 1 if name in active else 0)
        yield ofam
        counters = {k: v for k, v in engine.items() if isinstance(v, int) and k != "kind"}
        for key, (family, text) in _TRAFFIC.items():
            if key in counters:
                yield _counter(family, text, counters[key])
        drops = CounterMetricFamily(
            "flanneld_drops", "Packets dropped by the engine, by reason", labels=["reason"]
        )
        for key in sorted(counters):
            if key.startswith("drop_"):
                drops.add_metric([key.removeprefix("drop_")], counters[key])
        if "icmp_ratelimited" in counters:
            drops.add_metric(["icmp_ratelimited"], counters["icmp_ratelimited"])
        yield drops
        yield _labelled(
            "flanneld_io_errors", "Failed reads and writes on the TUN and the UDP socket", "op",
            _IO_ERRORS, counters,
        )  # fmt: skip
        yield _labelled(
            "flanneld_icmp_sent", "ICMP errors the engine sent", "type", _ICMP_SENT, counters
        )
        peers = status.get("peers")
        if isinstance(peers, dict):
            yield from _peer_traffic(peers)


#: per-peer counter -> (family, help)
_PEER_TRAFFIC = {
    "tx_packets": ("flanneld_peer_tx_packets", "Datagrams sent to the peer of this route"),
    "tx_bytes": ("flanneld_peer_tx_bytes", "Bytes sent to the peer of this route (UDP payload)"),
    "rx_packets": ("flanneld_peer_rx_packets", "Datagrams accepted from the peer of this route"),
    "rx_bytes": ("flanneld_peer_rx_bytes", "Bytes accepted from the peer of this route"),
}


def _peer_traffic(peers: Mapping[str, Any]) -> Iterator[Metric]:
    for key, (name, text) in _PEER_TRAFFIC.items():
        fam = CounterMetricFamily(name, text, labels=["subnet", "public_ip"])
        for subnet, row in sorted(peers.items()):
            if isinstance(row, dict) and isinstance(row.get(key), int):
                fam.add_metric([subnet, str(row.get("public_ip", ""))], row[key])
        yield fam


class Metrics:
    """A private registry holding one :class:`DaemonCollector`; :meth:`render` is ``/metrics``."""

    def __init__(self, daemon: Daemon) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(DaemonCollector(daemon))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, text, value=float(value))


def _counter(name: str, text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, text, value=float(value))


def _labelled(
    name: str, text: str, label: str, keys: Mapping[str, str], counters: Mapping[str, int]
) -> CounterMetricFamily:
    fam = CounterMetricFamily(name, text, labels=[label])
    for value, key in keys.items():
        if key in counters:
            fam.add_metric([value], counters[key])
    return fam
