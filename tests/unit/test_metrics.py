"""``/metrics`` and the control socket, on the daemon built from fakes (test_daemon_fakes.py).

The exposition is parsed back with prometheus-client's own parser; counters must move when the
fake state moves (engine counters, renewals, watch resyncs, etcd failovers).
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from flanneld_py.backend import LeaseAttrs
from flanneld_py.daemon import Daemon
from flanneld_py.engine import COUNTERS
from flanneld_py.lease import Lease
from flanneld_py.metrics import etcd_state
from flanneld_py.store import StoreUnavailable
from flanneld_py.store.etcd import EtcdSettings, EtcdStore
from flanneld_py.store.memory import MemoryStore
from tests.unit.test_daemon_fakes import (
    CONFIG,
    PREFIX,
    FakeBackend,
    Recorder,
    options,
    peer_value,
    platform,
    until,
)

UDP_CONFIG = b'{"Network":"10.5.0.0/16","SubnetMin":"10.5.100.0","Backend":{"Type":"udp"}}'
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class FakeUdpBackend(FakeBackend):
    """The udp backend as the daemon sees it: engine counters and offloads in ``status()``."""

    name = "udp"

    def __init__(self, rec: Recorder) -> None:
        super().__init__(rec)
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.active = ["tun_tso4", "udp_gso"]
        self.peers: dict[str, dict[str, Any]] = {}

    async def prepare(self) -> LeaseAttrs:
        return LeaseAttrs()

    def accepts(self, lease: Lease) -> bool:
        return lease.backend_type in (None, "udp")

    def status(self) -> dict[str, Any]:
        return {
            "type": "udp",
            "device": "flannel0",
            "port": 8285,
            "engine": {"kind": "c", **self.counters},
            "offloads": {"active": list(self.active), "vnet_hdr": True, "counters": {}},
            "peers": dict(self.peers),
        }


class CountingStore(MemoryStore):
    """A MemoryStore that reports etcd-like counters (as EtcdStore does)."""

    current_endpoint = "http://127.0.0.1:2379"
    errors = 0
    endpoint_switches = 0


def scrape(daemon: Daemon) -> Samples:
    text = daemon.metrics.render().decode()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def families(daemon: Daemon) -> dict[str, str]:
    """name -> type, as the parser reads them."""
    text = daemon.metrics.render().decode()
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def drive(
    tmp_path: Path,
    body: Callable[[Daemon, Any, MemoryStore], Awaitable[None]],
    *,
    udp: bool = False,
    store: MemoryStore | None = None,
    **opts: Any,
) -> None:
    async def main() -> None:
        rec = Recorder()
        backend = FakeUdpBackend(rec) if udp else FakeBackend(rec)
        st = store if store is not None else MemoryStore()
        st.put(f"{PREFIX}/config", UDP_CONFIG if udp else CONFIG)
        daemon = Daemon(options(tmp_path, **opts), st, platform(rec, backend))
        tasks: list[asyncio.Task[None]] = []
        try:
            tasks = [asyncio.ensure_future(c) for c in await daemon.start()]
            await body(daemon, backend, st)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await daemon.close()

    asyncio.run(main())


def test_metrics_of_a_vxlan_daemon_parse_back(tmp_path: Path) -> None:
    async def body(d: Daemon, backend: FakeBackend, store: MemoryStore) -> None:
        store.put(f"{PREFIX}/subnets/10.5.7.0-24", peer_value("10.99.0.12"))
        store.put(f"{PREFIX}/subnets/10.5.8.0-24", peer_value("10.99.0.13", btype="host-gw"))
        await until(lambda: len(d.accepted) == 1 and len(d.ignored_peers) == 1)
        s = scrape(d)
        assert d.mgr is not None and d.mgr.lease is not None
        lease = d.mgr.lease
        assert value(s, "flanneld_build_info", version="0.1.0") == 1
        assert value(s, "flanneld_up") == 1
        assert value(s, "flanneld_alive") == 1
        assert value(s, "flanneld_ready") == 1
        assert value(s, "flanneld_watch_live") == 1
        assert value(s, "flanneld_peers") == 1
        assert value(s, "flanneld_ignored_peers") == 1
        peer = {"subnet": "10.5.7.0/24", "public_ip": "10.99.0.12", "backend": "vxlan"}
        assert value(s, "flanneld_peer_info", **peer) == 1
        assert value(s, "flanneld_backend_info", type="vxlan") == 1
        assert (
            value(
                s,
                "flanneld_lease_info",
                subnet=str(lease.subnet),
                public_ip="10.99.0.11",
                network="10.5.0.0/16",
            )
            == 1
        )
        assert lease.expiration is not None
        assert value(s, "flanneld_lease_expiry_timestamp_seconds") == pytest.approx(
            lease.expiration
        )
        assert value(s, "flanneld_lease_renewals_total") == 0
        assert value(s, "flanneld_lease_renewal_failures_total") == 0
        assert value(s, "flanneld_watch_resyncs_total", reason="compaction") == 0
        assert value(s, "flanneld_watch_resyncs_total", reason="reconnect") == 0
        # no engine on this backend: its families are simply absent; the memory store keeps
        # no etcd counters
        names = {name for name, _ in s}
        assert not any(
            n.startswith(("flanneld_tun_", "flanneld_udp_", "flanneld_drops")) for n in names
        )
        assert "flanneld_engine_info" not in names and "flanneld_offload_active" not in names
        assert "flanneld_etcd_errors_total" not in names
        types = families(d)
        assert types["flanneld_lease_renewals"] == "counter"
        assert types["flanneld_peers"] == "gauge"
        # a peer that goes away leaves the info series
        await store.delete(f"{PREFIX}/subnets/10.5.7.0-24")
        await until(lambda: not d.accepted)
        s = scrape(d)
        assert value(s, "flanneld_peers") == 0
        assert not [k for k in s if k[0] == "flanneld_peer_info"]

    drive(tmp_path, body)


def test_udp_engine_counters_and_drops_by_reason_move(tmp_path: Path) -> None:
    async def body(d: Daemon, backend: FakeUdpBackend, store: MemoryStore) -> None:
        s = scrape(d)
        assert value(s, "flanneld_engine_info", kind="c") == 1
        assert value(s, "flanneld_backend_info", type="udp") == 1
        assert value(s, "flanneld_offload_active", offload="udp_gso") == 1
        assert value(s, "flanneld_offload_active", offload="tun_tso4") == 1
        assert value(s, "flanneld_offload_active", offload="udp_gro") == 0
        reasons = {dict(k[1])["reason"] for k in s if k[0] == "flanneld_drops_total"}
        expected = {c.removeprefix("drop_") for c in COUNTERS if c.startswith("drop_")}
        assert reasons == expected | {"icmp_ratelimited"}
        for name in ("tun_rx", "tun_tx", "udp_rx", "udp_tx"):
            assert value(s, f"flanneld_{name}_packets_total") == 0
            assert value(s, f"flanneld_{name}_bytes_total") == 0

        backend.counters.update(
            tun_rx_packets=5,
            tun_rx_bytes=420,
            udp_tx_packets=5,
            udp_tx_bytes=420,
            udp_rx_packets=3,
            udp_rx_bytes=252,
            tun_tx_packets=2,
            tun_tx_bytes=168,
            drop_udp_wrong_peer=1,
            icmp_ratelimited=7,
            udp_tx_errors=4,
            icmp_unreachable_sent=2,
        )
        backend.active = []
        s = scrape(d)
        assert value(s, "flanneld_tun_rx_packets_total") == 5
        assert value(s, "flanneld_tun_rx_bytes_total") == 420
        assert value(s, "flanneld_udp_tx_packets_total") == 5
        assert value(s, "flanneld_udp_rx_bytes_total") == 252
        assert value(s, "flanneld_tun_tx_packets_total") == 2
        assert value(s, "flanneld_drops_total", reason="udp_wrong_peer") == 1
        assert value(s, "flanneld_drops_total", reason="icmp_ratelimited") == 7
        assert value(s, "flanneld_drops_total", reason="no_route") == 0
        assert value(s, "flanneld_io_errors_total", op="udp_tx") == 4
        assert value(s, "flanneld_icmp_sent_total", type="unreachable") == 2
        assert value(s, "flanneld_offload_active", offload="udp_gso") == 0
        # liveness follows the backend
        backend.down = "packet engine stopped: boom"
        s = scrape(d)
        assert value(s, "flanneld_alive") == 0
        assert value(s, "flanneld_ready") == 0

    drive(tmp_path, body, udp=True)


def test_per_peer_traffic(tmp_path: Path) -> None:
    async def body(d: Daemon, backend: FakeUdpBackend, store: MemoryStore) -> None:
        assert not [k for k in scrape(d) if k[0].startswith("flanneld_peer_tx")]
        backend.peers = {
            "10.5.7.0/24": {"public_ip": "10.99.0.12", "tx_packets": 5, "tx_bytes": 420,
                            "rx_packets": 3, "rx_bytes": 252},
            "10.5.8.0/24": {"public_ip": "10.99.0.13", "tx_packets": 0, "tx_bytes": 0,
                            "rx_packets": 1, "rx_bytes": 84},
            "10.5.9.0/24": {"public_ip": "10.99.0.14"},  # not counted: no series
        }  # fmt: skip
        s = scrape(d)
        one = {"subnet": "10.5.7.0/24", "public_ip": "10.99.0.12"}
        two = {"subnet": "10.5.8.0/24", "public_ip": "10.99.0.13"}
        assert value(s, "flanneld_peer_tx_packets_total", **one) == 5
        assert value(s, "flanneld_peer_tx_bytes_total", **one) == 420
        assert value(s, "flanneld_peer_rx_packets_total", **one) == 3
        assert value(s, "flanneld_peer_rx_bytes_total", **one) == 252
        assert value(s, "flanneld_peer_tx_packets_total", **two) == 0
        assert value(s, "flanneld_peer_rx_bytes_total", **two) == 84
        series = {dict(k[1])["subnet"] for k in s if k[0] == "flanneld_peer_rx_packets_total"}
        assert series == {"10.5.7.0/24", "10.5.8.0/24"}

    drive(tmp_path, body, udp=True)


def test_renewals_and_failures_are_counted(tmp_path: Path) -> None:
    async def body(d: Daemon, backend: FakeBackend, store: MemoryStore) -> None:
        assert d.mgr is not None
        d.mgr.retry_interval = 0.05
        await until(lambda: d.mgr is not None and d.mgr.renewals >= 1, timeout=10)
        assert value(scrape(d), "flanneld_lease_renewals_total") >= 1
        store.set_down(True)
        await until(lambda: d.mgr is not None and d.mgr.renewal_failures >= 2, timeout=10)
        s = scrape(d)
        assert value(s, "flanneld_lease_renewal_failures_total") >= 2
        assert value(s, "flanneld_watch_live") == 0
        assert value(s, "flanneld_ready") == 0
        assert value(s, "flanneld_alive") == 1  # an etcd outage is not a liveness failure
        before = d.mgr.renewals
        store.set_down(False)
        await until(lambda: d.mgr is not None and d.mgr.renewals > before, timeout=10)

    drive(tmp_path, body, subnet_lease_ttl=2, subnet_lease_renew_margin=1)


def test_watch_resyncs_count_reconnects_and_compaction_relists(tmp_path: Path) -> None:
    async def body(d: Daemon, backend: FakeBackend, store: MemoryStore) -> None:
        mgr = d.mgr
        assert mgr is not None
        store.set_down(True)
        await until(lambda: not mgr.watch_live)
        assert value(scrape(d), "flanneld_watch_live") == 0
        store.set_down(False)
        await until(lambda: mgr.watch_live, timeout=10)
        s = scrape(d)
        assert value(s, "flanneld_watch_resyncs_total", reason="reconnect") == 1
        assert value(s, "flanneld_watch_resyncs_total", reason="compaction") == 0
        assert value(s, "flanneld_watch_live") == 1
        # an outage during which the revision to resume from is compacted: a re-list
        store.set_down(True)
        await until(lambda: not mgr.watch_live)
        store.put(f"{PREFIX}/subnets/10.5.7.0-24", peer_value("10.99.0.12"))
        store.put(f"{PREFIX}/subnets/10.5.7.0-24", peer_value("10.99.0.14"))
        store.compact()  # past the revision the watch resumes from
        store.set_down(False)
        await until(lambda: mgr.watch_resyncs["compaction"] == 1 and mgr.watch_live, timeout=10)
        await until(lambda: IPv4Network("10.5.7.0/24") in d.accepted)
        assert value(scrape(d), "flanneld_watch_resyncs_total", reason="compaction") == 1

    drive(tmp_path, body)


def test_etcd_counters_and_endpoint_from_the_store(tmp_path: Path) -> None:
    store = CountingStore()

    async def body(d: Daemon, backend: FakeBackend, st: MemoryStore) -> None:
        s = scrape(d)
        assert (
            value(s, "flanneld_etcd_endpoint_info", endpoint="http://127.0.0.1:2379", api="") == 1
        )
        assert value(s, "flanneld_etcd_errors_total") == 0
        store.errors, store.endpoint_switches = 3, 2
        s = scrape(d)
        assert value(s, "flanneld_etcd_errors_total") == 3
        assert value(s, "flanneld_etcd_endpoint_switches_total") == 2
        assert d.status()["etcd"] == {
            "endpoint": "http://127.0.0.1:2379",
            "api": None,
            "errors": 3,
            "endpoint_switches": 2,
        }

    drive(tmp_path, body, store=store)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_etcd_store_counts_errors_and_endpoint_switches() -> None:
    """Two members that refuse connections: every failed attempt is an error, every failover a
    switch of the endpoint in use (loopback only)."""
    a, b = f"http://127.0.0.1:{closed_port()}", f"http://127.0.0.1:{closed_port()}"

    async def main() -> None:
        store = EtcdStore(EtcdSettings([a, b], timeout=3.0))
        try:
            assert etcd_state(store) == {
                "endpoint": a,
                "api": "v3",
                "errors": 0,
                "endpoint_switches": 0,
            }
            with pytest.raises(StoreUnavailable):
                await store.get("/x")
            assert store.errors == 2
            assert store.endpoint_switches == 2
            assert store.current_endpoint == a
        finally:
            await store.close()

    asyncio.run(main())


def test_etcd_state_looks_through_the_auto_store() -> None:
    class Auto:
        def __init__(self, api: str | None) -> None:
            self.api = api
            self.v3 = CountingStore()
            self.v2 = object()

    assert etcd_state(Auto(None)) == {
        "endpoint": None,
        "api": None,
        "errors": None,
        "endpoint_switches": None,
    }
    assert etcd_state(Auto("v3"))["endpoint"] == "http://127.0.0.1:2379"
    assert etcd_state(Auto("v3"))["api"] == "v3"
    assert etcd_state(Auto("v2")) == {
        "endpoint": None,
        "api": "v2",
        "errors": None,
        "endpoint_switches": None,
    }


# -- over the sockets -------------------------------------------------------------------------


def raw_get(path: str, target: str) -> tuple[int, dict[str, str], bytes]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def sock_path(tmp_path: Path) -> str:
    path = str(tmp_path / "ctl.sock")
    assert len(path) < 100, path  # AF_UNIX paths are at most 107 bytes
    return path


def test_control_socket_serves_every_endpoint_with_mode_0600(tmp_path: Path) -> None:
    path = sock_path(tmp_path)

    async def body(d: Daemon, backend: FakeBackend, store: MemoryStore) -> None:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == os.getuid()
        res = await asyncio.to_thread(raw_get, path, "/metrics")
        code, headers, data = res
        assert code == 200
        assert headers["content-type"] == CONTENT_TYPE
        names = {f.name for f in text_string_to_metric_families(data.decode())}
        assert {"flanneld_build_info", "flanneld_up", "flanneld_peers"} <= names
        for target, expected in (("/healthz", b"ok\n"), ("/readyz", b"ok\n")):
            code, _, data = await asyncio.to_thread(raw_get, path, target)
            assert (code, data) == (200, expected)
        code, headers, data = await asyncio.to_thread(raw_get, path, "/status")
        assert code == 200 and headers["content-type"].startswith("application/json")

    drive(tmp_path, body, control_socket=path)
    assert not os.path.exists(path)  # removed at clean shutdown


def test_tcp_health_server_serves_metrics_too(tmp_path: Path) -> None:
    async def body(d: Daemon, backend: FakeBackend, store: MemoryStore) -> None:
        assert d.health is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", d.health.port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        data = await reader.read()
        writer.close()
        head, _, payload = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert f"Content-Type: {CONTENT_TYPE}".encode() in head
        assert any(
            f.name == "flanneld_up" for f in text_string_to_metric_families(payload.decode())
        )

    drive(tmp_path, body, healthz_ip="127.0.0.1", healthz_port=closed_port())


def test_a_stale_control_socket_is_replaced(tmp_path: Path) -> None:
    path = sock_path(tmp_path)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # the file stays, nobody listens: a daemon that was killed

    async def body(d: Daemon, backend: FakeBackend, store: MemoryStore) -> None:
        code, _, data = await asyncio.to_thread(raw_get, path, "/healthz")
        assert (code, data) == (200, b"ok\n")

    drive(tmp_path, body, control_socket=path)
    assert not os.path.exists(path)


@pytest.mark.parametrize("what", ["live socket", "regular file"])
def test_a_live_socket_or_another_file_is_not_taken_over(tmp_path: Path, what: str) -> None:
    path = sock_path(tmp_path)
    other: socket.socket | None = None
    if what == "live socket":
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other.bind(path)
        other.listen(1)
    else:
        Path(path).write_text("not a socket\n")

    async def body(d: Daemon, backend: FakeBackend, store: MemoryStore) -> None:
        raise AssertionError("must not start")

    try:
        with pytest.raises(OSError, match=r"^control socket: cannot listen on .*ctl\.sock: ") as e:
            drive(tmp_path, body, control_socket=path)
        assert "\n" not in str(e.value)
        assert os.path.exists(path)  # left alone
    finally:
        if other is not None:
            other.close()


def test_metrics_is_404_without_a_renderer_and_500_when_it_fails(tmp_path: Path) -> None:
    from flanneld_py.healthz import HealthServer

    def broken() -> bytes:
        raise RuntimeError("collector\nfailed")

    async def main() -> None:
        for metrics, expected in ((None, (404, b"not found\n")), (broken, None)):
            server = HealthServer.unix(sock_path(tmp_path), lambda: (True, "ok"), metrics=metrics)
            await server.start()
            try:
                code, _, data = await asyncio.to_thread(raw_get, sock_path(tmp_path), "/metrics")
            finally:
                await server.close()
            if expected is not None:
                assert (code, data) == expected
            else:
                assert (code, data) == (500, b"metrics failed: collector failed\n")

    asyncio.run(main())
