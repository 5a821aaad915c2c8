"""EtcdV2Store and AutoStore against a real etcd serving its v2 API (``--enable-v2``).

The wire: a small TCP proxy on 127.0.0.1 in front of etcd records the bytes each request carries,
and the requests of a SubnetManager's whole life (config, acquire, peer watch, renew) are checked
against the table of flannel-compat §11 (flanneld v0.13.0 seen with tcpdump). Then v2's own
troubles: a stray key under subnets/, the 1000-event history (errorCode 401 after 1100 writes and a
restart), etcd down and back, TLS, basic auth, a server without v2, and the choice of AutoStore.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import pytest

from flanneld_py.cli import build_store
from flanneld_py.lease import LeaseEvent, lease_key
from flanneld_py.options import Options
from flanneld_py.store import Compacted, StoreError, StoreUnavailable, WatchEvent
from flanneld_py.store.etcd import EtcdSettings
from flanneld_py.store.etcdv2 import (
    ApiNotServed,
    DirectoryRemoved,
    EtcdV2Store,
    HistoryCleared,
)
from flanneld_py.store.memory import MemoryStore
from flanneld_py.store.select import AutoStore
from flanneld_py.subnets import SubnetManager
from lab.etcd import EtcdServer, free_port, make_tls

PREFIX = "/coreos.com/network"
SUBNETS = PREFIX + "/subnets"
P = SUBNETS + "/"
CONFIG = '{"Network": "10.6.0.0/16", "Backend": {"Type": "udp"}}'
HINT = "check --etcd-endpoints and that etcd is running"
NOT_SERVED = (
    "does not serve the v2 API (etcd 3.4 needs --enable-v2=true; 3.6 has no v2): use "
    "--etcd-api=v3, or enable v2"
)

Run = Callable[..., Any]


def ip(i: int) -> IPv4Address:
    return IPv4Address(f"10.99.0.{i}")


def v2store(*endpoints: str, **kwargs: Any) -> EtcdV2Store:
    watch_poll = kwargs.pop("watch_poll", 20.0)
    kwargs.setdefault("timeout", 3.0)
    return EtcdV2Store(EtcdSettings(list(endpoints), **kwargs), watch_poll=watch_poll)


@pytest.fixture
def etcd_v2(etcd_factory: Callable[..., EtcdServer]) -> EtcdServer:
    return etcd_factory(enable_v2=True)


async def until(cond: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.05)


async def sh(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A blocking lab call (etcdctl, restart) off the event loop."""
    return await asyncio.to_thread(fn, *args, **kwargs)


class Peers:
    """The peer routes a manager publishes."""

    def __init__(self) -> None:
        self.routes: dict[IPv4Network, IPv4Address] = {}

    def __call__(self, events: list[LeaseEvent]) -> None:
        for ev in events:
            if hasattr(ev, "lease"):
                self.routes[ev.lease.subnet] = ev.lease.public_ip
            else:
                self.routes.pop(ev.subnet, None)


@contextlib.asynccontextmanager
async def watching(mgr: SubnetManager, peers: Peers, **kwargs: Any) -> Any:
    task = asyncio.ensure_future(mgr.watch_peers(peers, **kwargs))
    try:
        await asyncio.wait_for(mgr.synced.wait(), 10)
        await until(lambda: mgr.watch_live, 10, "the watch to be established")
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# ------------------------------------------------------------------------------------------
# a recording proxy


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes

    @property
    def line(self) -> str:
        return f"{self.method} {self.target}" + (
            f"  body {self.body.decode()}" if self.body else ""
        )


def _take_request(buf: bytearray) -> Request | None:
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).decode("latin-1").split("\r\n")
    method, target, _ = head[0].split(" ", 2)
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
    size = int(headers.get("content-length", "0"))
    if len(buf) < end + 4 + size:
        return None
    body = bytes(buf[end + 4 : end + 4 + size])
    del buf[: end + 4 + size]
    return Request(method, target, headers, body)


class Proxy:
    """TCP proxy 127.0.0.1:<port> -> etcd: records each HTTP request as it went over the wire;
    ``drop`` (a predicate) makes it forward a matching request and close the client's connection
    instead of relaying the reply (a reply lost on the way)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.requests: list[Request] = []
        self.drop: Callable[[Request], bool] | None = None
        self.dropped: list[Request] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            self._tasks.discard(task)
            return
        cut = asyncio.Event()

        async def down() -> None:
            while data := await up_r.read(65536):
                if cut.is_set():
                    break
                writer.write(data)
                await writer.drain()
            writer.close()

        async def up() -> None:
            buf = bytearray()
            while data := await reader.read(65536):
                buf += data
                up_w.write(data)
                await up_w.drain()
                while (req := _take_request(buf)) is not None:
                    self.requests.append(req)
                    if self.drop is not None and self.drop(req):
                        self.drop = None
                        self.dropped.append(req)
                        cut.set()
                        await asyncio.sleep(0.3)  # etcd carries it out; the reply goes nowhere
                        writer.transport.abort()
                        return
            up_w.close()

        pumps = [asyncio.ensure_future(down()), asyncio.ensure_future(up())]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pass  # the proxy closes: end normally (asyncio reports a cancelled handler)
        finally:
            for p in pumps:
                p.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*pumps, return_exceptions=True)
            writer.close()
            up_w.close()
            self._tasks.discard(task)


# ------------------------------------------------------------------------------------------
# the wire, next to flannel-compat §11


def test_wire_matches_flannel_v013(etcd_v2: EtcdServer, run: Run, tmp_path: Path) -> None:
    """A SubnetManager on v2 (wait for config, acquire, watch peers, see a peer, renew, drop a
    lease): every request as §11's table shows flanneld v0.13.0's, except that our renewal is a
    compare-and-swap (``?prevIndex=``) where v0.13.0 PUTs unconditionally."""
    etcd_v2.etcdctl_v2("set", f"{PREFIX}/config", CONFIG)

    async def main() -> list[Request]:
        async with Proxy(etcd_v2.client_port) as proxy:
            store = v2store(proxy.endpoint)
            other = v2store(etcd_v2.endpoint)
            try:
                me = SubnetManager(store, PREFIX, ip(1), rng=random.Random(1))
                cfg = await me.wait_config(0.1)
                mine = await me.acquire(cfg)
                mine_key = lease_key(PREFIX, mine.subnet)
                created = (await sh(etcd_v2.v2_node, mine_key)) or {}
                peers = Peers()
                async with watching(me, peers):
                    peer = await SubnetManager(other, PREFIX, ip(2)).acquire(cfg)
                    await until(lambda: peer.subnet in peers.routes, 10, "the peer")
                    peer_node = (await sh(etcd_v2.v2_node, lease_key(PREFIX, peer.subnet))) or {}
                    await me.renew()
                    await store.delete(lease_key(PREFIX, peer.subnet))
                    await until(lambda: peer.subnet not in peers.routes, 10, "the peer to go")
                    await asyncio.sleep(0.2)
                reqs = list(proxy.requests)
            finally:
                await store.close()
                await other.close()
        (tmp_path / "wire.txt").write_text("\n".join(r.line for r in reqs) + "\n")
        print("\n".join(r.line for r in reqs))  # shown with pytest -s
        form = "application/x-www-form-urlencoded"
        mine_path = "/v2/keys" + mine_key
        value = '{"PublicIP":"10.99.0.1","PublicIPv6":null}'
        body = f"ttl=86400&value={value}"
        lines = [(r.method, r.target, unquote_plus(r.body.decode())) for r in reqs]
        # read config, then list, then create with prevExist=false
        assert lines[0] == (
            "GET",
            "/v2/keys/coreos.com/network/config?quorum=true&recursive=false&sorted=false",
            "",
        )
        assert lines[1] == (
            "GET",
            "/v2/keys/coreos.com/network/subnets?quorum=true&recursive=true&sorted=false",
            "",
        )
        assert lines[2] == ("PUT", mine_path + "?prevExist=false", body)
        assert reqs[2].headers["content-type"] == form
        # the exact bytes of the form: sorted fields, the JSON url-encoded as Go's client does
        assert reqs[2].body == (
            b"ttl=86400&value=%7B%22PublicIP%22%3A%2210.99.0.1%22%2C%22PublicIPv6%22%3Anull%7D"
        )
        # the peer watch: list, then waitIndex = list index + 1, then event modifiedIndex + 1
        assert lines[3] == lines[1]
        watches = [r.target for r in reqs if "wait=true" in r.target]
        base = "/v2/keys/coreos.com/network/subnets?recursive=true&wait=true&waitIndex="
        assert watches[0] == base + str(int(created["modifiedIndex"]) + 1)
        assert watches[1] == base + str(int(peer_node["modifiedIndex"]) + 1)
        assert all(w.startswith(base) for w in watches)
        # renewal: read the own lease, then PUT it back (ours: only if unchanged)
        get_own = ("GET", mine_path + "?quorum=true&recursive=false&sorted=false", "")
        i = lines.index(get_own)
        assert lines[i + 1][0] == "PUT" and lines[i + 1][1].startswith(mine_path + "?prevIndex=")
        assert lines[i + 1][2] == body and reqs[i + 1].headers["content-type"] == form
        # dropping a lease: a plain DELETE
        assert ("DELETE", "/v2/keys" + lease_key(PREFIX, peer.subnet), "") in lines
        # every read but the watches is a quorum read; watches are not
        for r in reqs:
            if r.method == "GET":
                assert ("quorum=true" in r.target) != ("wait=true" in r.target), r.target
        return reqs

    reqs = run(main())
    assert len(reqs) >= 8
    # the v3 keyspace saw nothing
    assert etcd_v2.etcdctl("get", "--prefix", "/") == ""


def test_values_in_v2_are_the_v3_form_and_v013_leases_are_peers(
    etcd_v2: EtcdServer, run: Run
) -> None:
    """Ours writes {"PublicIP":…,"PublicIPv6":null} (v0.13.0 parses it); a lease written the
    v0.13 way ({"PublicIP":…} only, TTL 86400) is a peer."""
    etcd_v2.etcdctl_v2("set", f"{PREFIX}/config", CONFIG)
    etcd_v2.etcdctl_v2("set", "--ttl", "86400", P + "10.6.200.0-24", '{"PublicIP":"10.99.0.9"}')

    async def main() -> None:
        async with v2store(etcd_v2.endpoint) as store:
            me = SubnetManager(store, PREFIX, ip(1))
            lease = await me.acquire(await me.wait_config(0.1))
            node = await sh(etcd_v2.v2_node, lease_key(PREFIX, lease.subnet))
            assert node is not None
            assert node["value"] == '{"PublicIP":"10.99.0.1","PublicIPv6":null}'
            assert 86390 <= int(node["ttl"]) <= 86400
            peers = Peers()
            async with watching(me, peers):
                assert peers.routes == {IPv4Network("10.6.200.0/24"): ip(9)}

    run(main())


# ------------------------------------------------------------------------------------------
# watch robustness


def test_stray_key_under_subnets_does_not_stall_the_watch(
    etcd_v2: EtcdServer, run: Run, caplog: pytest.LogCaptureFixture
) -> None:
    """flanneld v0.13.0 re-asks the same index forever after `set …/subnets/garbage x`; ours
    skips it and programs the next lease."""
    etcd_v2.etcdctl_v2("set", f"{PREFIX}/config", CONFIG)

    async def main() -> None:
        async with v2store(etcd_v2.endpoint) as store, v2store(etcd_v2.endpoint) as other:
            me = SubnetManager(store, PREFIX, ip(1))
            cfg = await me.wait_config(0.1)
            await me.acquire(cfg)
            peers = Peers()
            async with watching(me, peers):
                await sh(etcd_v2.etcdctl_v2, "set", P + "garbage", "x")
                await sh(etcd_v2.etcdctl_v2, "set", P + "10.6.77.0-24", "not json")
                peer = await SubnetManager(other, PREFIX, ip(2)).acquire(cfg)
                await until(lambda: peer.subnet in peers.routes, 10, "the lease after garbage")
                assert set(peers.routes) == {peer.subnet}
                assert me.watch_live

    with caplog.at_level(logging.INFO):
        run(main())
    assert any("10.6.77.0-24" in r.message and "malformed" in r.message for r in caplog.records)


def test_history_cleared_after_1100_writes_and_a_restart_relists(
    etcd_v2: EtcdServer, run: Run, caplog: pytest.LogCaptureFixture
) -> None:
    """§11's lab check: 1100 unrelated writes, then an etcd restart: the re-watch from the old
    index gets errorCode 401 → Compacted → the manager re-lists and sees a lease created after."""
    etcd_v2.etcdctl_v2("set", f"{PREFIX}/config", CONFIG)

    async def main() -> None:
        async with v2store(etcd_v2.endpoint) as store, v2store(etcd_v2.endpoint) as other:
            me = SubnetManager(store, PREFIX, ip(1))
            cfg = await me.wait_config(0.1)
            await me.acquire(cfg)
            a = await SubnetManager(other, PREFIX, ip(2)).acquire(cfg)
            _, old = await other.list(P)
            peers = Peers()
            async with watching(me, peers, max_backoff=0.5):
                assert set(peers.routes) == {a.subnet}
                for first in range(0, 1100, 100):
                    await asyncio.gather(
                        *(
                            other.create(f"/other/k{i}", b"x", 3600)
                            for i in range(first, first + 100)
                        )
                    )
                await sh(etcd_v2.restart)
                b = await SubnetManager(other, PREFIX, ip(3)).acquire(cfg)
                await other.delete(lease_key(PREFIX, a.subnet))
                await until(lambda: set(peers.routes) == {b.subnet}, 20, "resync after 401")
            # the store's own view of it
            it = other.watch(P, old + 1)
            with pytest.raises(HistoryCleared) as err:
                await asyncio.wait_for(anext(it), 5)
            assert isinstance(err.value, Compacted) and err.value.compact_revision > old + 1
            assert "\n" not in str(err.value) and "last 1000 events" in str(err.value)

    with caplog.at_level(logging.INFO):
        run(main(), timeout=90)
    relisted = [r.message for r in caplog.records if "re-listing leases" in r.message]
    assert relisted and "v2 event history" in relisted[0]


def test_watch_events_expire_delete_and_directory_removal(etcd_v2: EtcdServer, run: Run) -> None:
    async def main() -> None:
        async with v2store(etcd_v2.endpoint) as store:
            _, rev = await store.list(P)
            it = store.watch(P, rev + 1)
            assert await anext(it) == []
            short = await store.create(P + "10.6.1.0-24", b"a", 1)
            assert short is not None
            assert await asyncio.wait_for(anext(it), 5) == [
                WatchEvent("put", P + "10.6.1.0-24", b"a", short.revision)
            ]
            (expired,) = await asyncio.wait_for(anext(it), 5)  # action "expire"
            assert (expired.kind, expired.key) == ("delete", P + "10.6.1.0-24")
            await sh(etcd_v2.etcdctl_v2, "set", P + "10.6.2.0-24", "b")
            await sh(etcd_v2.etcdctl_v2, "rm", P + "10.6.2.0-24", "--with-value", "b")
            kinds = [(await asyncio.wait_for(anext(it), 5))[0].kind for _ in range(2)]
            assert kinds == ["put", "delete"]  # compareAndDelete is a delete
            await sh(etcd_v2.etcdctl_v2, "mkdir", P + "sub")  # a directory: not an event
            await sh(etcd_v2.etcdctl_v2, "rm", "--recursive", SUBNETS)
            with pytest.raises(DirectoryRemoved) as err:
                await asyncio.wait_for(anext(it), 5)
            assert isinstance(err.value, Compacted) and SUBNETS in str(err.value)

    run(main())


def test_close_ends_a_waiting_watch_and_repolls_keep_the_index(
    etcd_v2: EtcdServer, run: Run
) -> None:
    async def main() -> None:
        store = v2store(etcd_v2.endpoint, watch_poll=0.3)
        _, rev = await store.list(P)
        it = store.watch(P, rev + 1)
        assert await anext(it) == []
        await asyncio.sleep(1.0)  # a few long polls ran out and were sent again
        kv = await store.create(P + "10.6.3.0-24", b"c", 60)
        assert kv is not None
        assert await asyncio.wait_for(anext(it), 5) == [
            WatchEvent("put", P + "10.6.3.0-24", b"c", kv.revision)
        ]
        waiting = asyncio.ensure_future(anext(it))
        await asyncio.sleep(0.1)
        await store.close()
        with pytest.raises(StoreError, match="closed") as err:
            await waiting
        assert not isinstance(err.value, StoreUnavailable)
        with pytest.raises(StoreError, match="closed"):
            await store.get(P)
        await store.close()

    run(main())


def test_frozen_member_is_noticed_by_the_watch(etcd_v2: EtcdServer, run: Run) -> None:
    """SIGSTOP: the connection stays open and silent; the next long poll gets no headers."""

    async def main() -> None:
        async with v2store(etcd_v2.endpoint, watch_poll=0.5, timeout=1.0) as store:
            it = store.watch(P, 0)
            assert await anext(it) == []
            etcd_v2.pause()
            try:
                t0 = time.monotonic()
                with pytest.raises(StoreUnavailable, match="no answer within 1s"):
                    await asyncio.wait_for(anext(it), 10)
                assert time.monotonic() - t0 < 4
            finally:
                etcd_v2.resume()

    run(main())


# ------------------------------------------------------------------------------------------
# etcd down, failover, lost replies


def test_etcd_down_then_back(etcd_v2: EtcdServer, run: Run) -> None:
    async def main() -> None:
        async with v2store(etcd_v2.endpoint) as store:
            a = await store.create(P + "10.6.4.0-24", b"a", 60)
            assert a is not None
            it = store.watch(P, a.revision + 1)
            assert await anext(it) == []
            waiting = asyncio.ensure_future(anext(it))
            await asyncio.sleep(0.1)
            await sh(etcd_v2.kill)
            with pytest.raises(StoreUnavailable) as err:
                await asyncio.wait_for(waiting, 5)
            assert "lost the watch" in str(err.value) and etcd_v2.endpoint in str(err.value)
            await it.aclose()  # type: ignore[attr-defined]
            for call in (store.get(P + "x"), store.list(P), store.create(P + "y", b"y", 5)):
                t0 = time.monotonic()
                with pytest.raises(StoreUnavailable) as err:
                    await call
                msg = str(err.value)
                assert time.monotonic() - t0 < 1.0  # refused: no timeout to wait for
                assert msg == (
                    f"etcd unreachable at {etcd_v2.endpoint}: connection refused; {HINT}"
                )
            with pytest.raises(StoreUnavailable):
                await anext(store.watch(P, 1))
            await sh(etcd_v2.start)
            kv = await store.get(P + "10.6.4.0-24")
            assert kv is not None and kv.value == b"a"
            it = store.watch(P, a.revision + 1)
            assert await anext(it) == []
            await store.delete(P + "10.6.4.0-24")
            assert [e.kind for e in await asyncio.wait_for(anext(it), 5)] == ["delete"]
            await it.aclose()  # type: ignore[attr-defined]

    run(main())


def test_dead_first_endpoint_fails_over_at_once(etcd_v2: EtcdServer, run: Run) -> None:
    dead = f"http://127.0.0.1:{free_port()}"

    async def main() -> None:
        async with v2store(dead, etcd_v2.endpoint) as store:
            t0 = time.monotonic()
            assert await store.get(P + "x") is None
            assert time.monotonic() - t0 < 1.0
            assert store.current_endpoint == etcd_v2.endpoint
        async with v2store(dead, f"http://127.0.0.1:{free_port()}") as store:
            with pytest.raises(StoreUnavailable) as err:
                await store.get(P + "x")
            assert str(err.value).count("connection refused") == 2 and HINT in str(err.value)

    run(main())


def test_create_and_replace_whose_reply_was_lost(etcd_v2: EtcdServer, run: Run) -> None:
    """The write reached etcd, its reply did not reach us: the retry meets "exists" / "compare
    failed", and the key holding exactly our value makes it our own write."""

    async def main() -> None:
        async with Proxy(etcd_v2.client_port) as proxy, v2store(proxy.endpoint) as store:
            key = P + "10.6.5.0-24"
            proxy.drop = lambda r: r.method == "PUT" and "prevExist=false" in r.target
            res = await store.create(key, b"mine", 60)
            assert proxy.dropped and res is not None
            kv = await store.get(key)
            assert kv is not None and (kv.value, kv.mod_revision) == (b"mine", res.revision)
            proxy.drop = lambda r: r.method == "PUT" and "prevIndex=" in r.target
            renewed = await store.replace(key, b"mine2", 60, kv.mod_revision)
            assert len(proxy.dropped) == 2 and renewed is not None
            assert renewed.revision == kv.mod_revision + 1
            # somebody else's value is not ours
            assert await store.create(key, b"other", 60) is None

    run(main())


# ------------------------------------------------------------------------------------------
# TLS and authentication


def test_tls_client_certificates(
    etcd_factory: Callable[..., EtcdServer], tmp_path: Path, run: Run
) -> None:
    # the server certificate names 127.0.0.1 and etcd.test, not localhost
    tls = make_tls(tmp_path / "tls", ips=["127.0.0.1"], dns_names=["etcd.test"])
    other = make_tls(tmp_path / "other-ca")
    server = etcd_factory(tls=tls, enable_v2=True)
    plain = etcd_factory("plain", enable_v2=True)
    ca, cert, key = str(tls.ca), str(tls.client_cert), str(tls.client_key)
    port = server.client_port

    async def main() -> None:
        for url in (server.endpoint, f"http://127.0.0.1:{port}", f"127.0.0.1:{port}"):
            # key + cert given: TLS even for an http:// URL (as the v3 store)
            async with v2store(url, cafile=ca, certfile=cert, keyfile=key) as store:
                await store.delete(P + "10.6.6.0-24")
                assert await store.create(P + "10.6.6.0-24", b"tls", 60) is not None
                kv = await store.get(P + "10.6.6.0-24")
                assert kv is not None and kv.value == b"tls"
                it = store.watch(P, kv.mod_revision)
                assert await anext(it) == []
                assert (await asyncio.wait_for(anext(it), 5))[0].kind == "put"
                await it.aclose()  # type: ignore[attr-defined]
        failures = {
            "no client cert": v2store(server.endpoint, cafile=ca),
            "wrong CA": v2store(server.endpoint, cafile=str(other.ca), certfile=cert, keyfile=key),
            "unknown client cert": v2store(
                server.endpoint,
                cafile=ca,
                certfile=str(other.client_cert),
                keyfile=str(other.client_key),
            ),
            "plain http": v2store(f"http://127.0.0.1:{port}"),
            "wrong host name": v2store(
                f"https://localhost:{port}", cafile=ca, certfile=cert, keyfile=key
            ),
            "https to plain": v2store(plain.endpoint.replace("http://", "https://"), cafile=ca),
        }
        messages: dict[str, str] = {}
        for name, store in failures.items():
            async with store:
                t0 = time.monotonic()
                with pytest.raises(StoreError) as err:
                    await store.get("/k")
                assert time.monotonic() - t0 < 2
                # a closed connection may be a dying etcd too: retried later (as v3)
                unavailable = name == "plain http"
                assert isinstance(err.value, StoreUnavailable) == unavailable, name
                messages[name] = str(err.value)
        print(messages)
        assert all("\n" not in m for m in messages.values())
        for name in ("no client cert", "unknown client cert", "wrong CA", "wrong host name"):
            assert messages[name].startswith("TLS: "), name
        for name in ("no client cert", "unknown client cert"):
            assert "rejected our client certificate" in messages[name]
            assert "--etcd-certfile" in messages[name]
        assert "cannot verify the certificate" in messages["wrong CA"]
        assert "--etcd-cafile" in messages["wrong CA"]
        assert "not valid for host 'localhost'" in messages["wrong host name"]
        assert "a TLS-only etcd? then use https://" in messages["plain http"]
        assert "the server closed the connection" in messages["https to plain"]
        assert "use http://" in messages["https to plain"]

    run(main())
    assert server.etcdctl_v2("get", P + "10.6.6.0-24").strip() == "tls"


def test_basic_auth(etcd_v2: EtcdServer, run: Run) -> None:
    etcd_v2.enable_v2_auth("rootpw")
    etcd_v2.add_v2_user("flannel", "flannelpw", PREFIX)

    async def main() -> None:
        async with v2store(etcd_v2.endpoint, username="flannel", password="flannelpw") as store:
            assert await store.create(P + "10.6.7.0-24", b"auth", 60) is not None
            assert [kv.value for kv in (await store.list(P))[0]] == [b"auth"]
            it = store.watch(P, 0)
            assert await anext(it) == []
            await it.aclose()  # type: ignore[attr-defined]
            with pytest.raises(StoreError, match="refused our credentials"):
                await store.get("/elsewhere")  # outside the role's path
        async with v2store(etcd_v2.endpoint, username="flannel", password="wrong") as store:
            with pytest.raises(StoreError) as err:
                await store.get(P + "10.6.7.0-24")
            msg = str(err.value)
            assert "refused our credentials" in msg and "--etcd-password" in msg
            assert "\n" not in msg and not isinstance(err.value, StoreUnavailable)
        async with v2store(etcd_v2.endpoint) as store:
            with pytest.raises(StoreError, match=r"requires authentication.*--etcd-username"):
                await store.list(P)

    run(main())


# ------------------------------------------------------------------------------------------
# a server without v2


def test_server_without_v2_says_so_in_one_line(etcd_server: EtcdServer, run: Run) -> None:
    async def main() -> None:
        async with v2store(etcd_server.endpoint) as store:
            calls: list[Awaitable[Any]] = [
                store.get(f"{PREFIX}/config"),
                store.list(P),
                store.create(P + "x", b"x", 5),
                anext(store.watch(P, 0)),
            ]
            for call in calls:
                with pytest.raises(ApiNotServed) as err:
                    await call
                assert str(err.value) == f"etcd at {etcd_server.endpoint} {NOT_SERVED}"

    run(main())


# ------------------------------------------------------------------------------------------
# AutoStore


def auto_store(server: EtcdServer) -> AutoStore:
    store = build_store(Options(etcd_endpoints=(server.endpoint,), etcd_api="auto"))
    assert isinstance(store, AutoStore)
    return store


def config_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [
        (r.levelno, r.message)
        for r in caplog.records
        if r.name == "flanneld_py.store.select" and "network config" in r.message
    ]


@pytest.mark.parametrize("where", ["v2", "v3", "both"])
def test_auto_picks_the_keyspace_holding_the_config(
    where: str, etcd_v2: EtcdServer, run: Run, caplog: pytest.LogCaptureFixture
) -> None:
    if where in ("v2", "both"):
        etcd_v2.etcdctl_v2("set", f"{PREFIX}/config", CONFIG)
    if where in ("v3", "both"):
        etcd_v2.etcdctl("put", f"{PREFIX}/config", CONFIG)

    async def main() -> None:
        async with auto_store(etcd_v2) as store:
            assert store.api is None
            with pytest.raises(StoreError, match="no etcd keyspace chosen yet"):
                await store.list(P)
            me = SubnetManager(store, PREFIX, ip(1))
            cfg = await me.wait_config(0.1)
            assert str(cfg.network) == "10.6.0.0/16"
            expected = "v2" if where == "v2" else "v3"
            assert store.api == expected
            lease = await me.acquire(cfg)
            key = lease_key(PREFIX, lease.subnet)
            v2_has = await sh(etcd_v2.v2_node, key) is not None
            v3_has = bool(await sh(etcd_v2.etcdctl, "get", key))
            assert (v2_has, v3_has) == (expected == "v2", expected == "v3")
            await me.wait_config(0.1)  # asked again: no second line

    with caplog.at_level(logging.INFO, logger="flanneld_py"):
        run(main())
    lines = config_lines(caplog)
    assert len(lines) == 1
    level, text = lines[0]
    if where == "v2":
        assert (level, text) == (
            logging.INFO,
            "network config found in the etcd v2 keyspace: using etcd's v2 API",
        )
    elif where == "v3":
        assert (level, text) == (
            logging.INFO,
            "network config found in the etcd v3 keyspace: using etcd's v3 API",
        )
    else:
        assert level == logging.WARNING
        assert "found in both etcd keyspaces (the same value): using etcd's v3 API" in text


def test_auto_waits_while_neither_has_it_then_takes_where_it_appears(
    etcd_v2: EtcdServer, run: Run, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with auto_store(etcd_v2) as store:
            for _ in range(3):
                assert await store.get(f"{PREFIX}/config") is None
                assert store.api is None
            await sh(etcd_v2.etcdctl_v2, "set", f"{PREFIX}/config", CONFIG)
            kv = await store.get(f"{PREFIX}/config")
            assert kv is not None and kv.value == CONFIG.encode() and store.api == "v2"
            # from now on v2 only: a v3 config written later changes nothing
            await sh(etcd_v2.etcdctl, "put", f"{PREFIX}/config", '{"Network":"10.7.0.0/16"}')
            kv = await store.get(f"{PREFIX}/config")
            assert kv is not None and kv.value == CONFIG.encode()

    with caplog.at_level(logging.INFO, logger="flanneld_py"):
        run(main())
    searching = [r for r in caplog.records if "looking for" in r.message]
    assert len(searching) == 1 and "v3 and v2 keyspaces" in searching[0].message


def test_auto_on_a_server_without_v2_uses_v3(
    etcd_server: EtcdServer, run: Run, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with auto_store(etcd_server) as store:
            assert await store.get(f"{PREFIX}/config") is None
            assert store.api == "v3"
            await sh(etcd_server.etcdctl, "put", f"{PREFIX}/config", CONFIG)
            kv = await store.get(f"{PREFIX}/config")
            assert kv is not None and kv.value == CONFIG.encode()

    with caplog.at_level(logging.INFO, logger="flanneld_py"):
        run(main())
    lines = [r.message for r in caplog.records if "does not serve the v2 API" in r.message]
    assert lines == [f"etcd at {etcd_server.endpoint} {NOT_SERVED}; using etcd's v3 API only"]


def test_auto_down_raises_unavailable_until_etcd_answers(etcd_v2: EtcdServer, run: Run) -> None:
    etcd_v2.etcdctl_v2("set", f"{PREFIX}/config", CONFIG)

    async def main() -> None:
        async with auto_store(etcd_v2) as store:
            await sh(etcd_v2.stop)
            with pytest.raises(StoreUnavailable):
                await store.get(f"{PREFIX}/config")
            assert store.api is None
            await sh(etcd_v2.start)
            kv = await store.get(f"{PREFIX}/config")
            assert kv is not None and store.api == "v2"

    run(main())


# ------------------------------------------------------------------------------------------
# the subnet manager on v2, end to end


def test_subnet_manager_acquire_renew_reuse_and_peers_on_v2(etcd_v2: EtcdServer, run: Run) -> None:
    etcd_v2.etcdctl_v2("set", f"{PREFIX}/config", CONFIG)
    # a reservation (no TTL) for host 3, as flannel's reservations.md makes them
    etcd_v2.etcdctl_v2("set", P + "10.6.33.0-24", '{"PublicIP":"10.99.0.3"}')

    async def main() -> None:
        async with v2store(etcd_v2.endpoint) as s1, v2store(etcd_v2.endpoint) as s2:
            m1 = SubnetManager(s1, PREFIX, ip(1), ttl=30)
            cfg = await m1.wait_config(0.1)
            l1 = await m1.acquire(cfg)
            peers = Peers()
            async with watching(m1, peers):
                m2 = SubnetManager(s2, PREFIX, ip(2), ttl=30)
                l2 = await m2.acquire(cfg)
                await until(lambda: l2.subnet in peers.routes, 10, "peer 2")
                assert peers.routes[IPv4Network("10.6.33.0/24")] == ip(3)
                # renewal: the v2 TTL starts again
                await asyncio.sleep(1.5)
                before = await sh(etcd_v2.v2_node, lease_key(PREFIX, l1.subnet))
                await m1.renew()
                after = await sh(etcd_v2.v2_node, lease_key(PREFIX, l1.subnet))
                assert before and after
                assert int(after["ttl"]) > int(before["ttl"])
                assert m1.lease is not None and m1.lease.subnet == l1.subnet
                # a restart of host 2 reuses its lease (by PublicIP)
                again = await SubnetManager(s2, PREFIX, ip(2), ttl=30).acquire(cfg)
                assert again.subnet == l2.subnet
                # host 3 takes its reservation
                l3 = await SubnetManager(s2, PREFIX, ip(3), ttl=30).acquire(cfg)
                assert l3.subnet == IPv4Network("10.6.33.0/24")
                # host 2's lease deleted by hand: the peer goes
                await s2.delete(lease_key(PREFIX, l2.subnet))
                await until(lambda: l2.subnet not in peers.routes, 10, "peer 2 to go")
            raw = await sh(etcd_v2.etcdctl_v2, "get", lease_key(PREFIX, l1.subnet))
            assert json.loads(raw) == {"PublicIP": "10.99.0.1", "PublicIPv6": None}

    run(main())
    assert etcd_v2.etcdctl("get", "--prefix", "/") == ""
    assert re.fullmatch(r"\d+", str(etcd_v2.revision()))


# ------------------------------------------------------------------------------------------
# AutoStore's decision table, with in-memory keyspaces (no etcd needed)


class Keyspace(MemoryStore):
    """A MemoryStore whose get() can be made to fail."""

    def __init__(self) -> None:
        super().__init__()
        self.fail: StoreError | None = None
        self.closed = False

    async def get(self, key: str) -> Any:
        if self.fail is not None:
            raise self.fail
        return await super().get(key)

    async def close(self) -> None:
        self.closed = True
        await super().close()


KEY = PREFIX + "/config"
DOWN = StoreUnavailable("etcd unreachable at http://x:1: connection refused; " + HINT)
AUTH = StoreError("etcd at http://x:1 refused our credentials for its v2 API")


def auto_world() -> tuple[AutoStore, Keyspace, Keyspace]:
    v3, v2 = Keyspace(), Keyspace()
    return AutoStore(v3, v2, KEY), v3, v2


def test_auto_decisions_when_a_keyspace_fails(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        # nothing chosen yet: everything but the config read refuses
        auto, v3, v2 = auto_world()
        for call in (auto.list(P), auto.create(P + "k", b"v", 5), auto.get(P + "k")):
            with pytest.raises(StoreError, match="no etcd keyspace chosen yet"):
                await call
        with pytest.raises(StoreError, match="no etcd keyspace chosen yet"):
            auto.watch(P, 0)
        # v2 credentials refused, v3 empty: None, one warning; then the config shows up in v3
        v2.fail = AUTH
        assert await auto.get(KEY) is None and await auto.get(KEY) is None
        assert auto.api is None
        v3.put(KEY, b"{}")
        assert (await auto.get(KEY)) is not None and auto.api == "v3"
        assert v2.closed and not v3.closed
        # v3 down, v2 has it: v3 could still win, so wait
        auto, v3, v2 = auto_world()
        v2.put(KEY, b"{}")
        v3.fail = DOWN
        with pytest.raises(StoreUnavailable):
            await auto.get(KEY)
        assert auto.api is None
        v3.fail = None
        assert await auto.get(KEY) is not None and auto.api == "v2" and v3.closed
        # v3 refuses definitively, v2 has it: v2 (with a warning about v3)
        auto, v3, v2 = auto_world()
        v2.put(KEY, b"{}")
        v3.fail = StoreError("etcd rejected username/password")
        assert await auto.get(KEY) is not None and auto.api == "v2"
        # v3 refuses definitively, v2 has nothing: v3's error is the one to see
        auto, v3, v2 = auto_world()
        v3.fail = StoreError("etcd rejected username/password")
        with pytest.raises(StoreError, match="rejected username/password"):
            await auto.get(KEY)
        # v2 down, v3 has it: v3; v2 down, v3 empty: unavailable
        auto, v3, v2 = auto_world()
        v3.put(KEY, b"{}")
        v2.fail = DOWN
        assert await auto.get(KEY) is not None and auto.api == "v3"
        auto, v3, v2 = auto_world()
        v2.fail = DOWN
        with pytest.raises(StoreUnavailable):
            await auto.get(KEY)
        # v2 not served: v3 at once
        auto, v3, v2 = auto_world()
        v2.fail = ApiNotServed("etcd at http://x:1 " + NOT_SERVED)
        assert await auto.get(KEY) is None and auto.api == "v3" and v2.closed
        # once chosen, everything goes to the chosen store
        lease = await auto.create(P + "10.6.1.0-24", b"v", 60)
        assert lease is not None and (await v3.get(P + "10.6.1.0-24")) is not None
        assert (await auto.list(P))[0][0].value == b"v"
        it = auto.watch(P, lease.revision)
        assert await anext(it) == []
        assert [e.key for e in await anext(it)] == [P + "10.6.1.0-24"]
        await it.aclose()  # type: ignore[attr-defined]
        await auto.close()

    with caplog.at_level(logging.INFO, logger="flanneld_py"):
        asyncio.run(main())
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("v2 keyspace cannot be read" in w for w in warnings) == 1  # once, not per read
    assert sum("v3 keyspace cannot be read" in w for w in warnings) == 1
