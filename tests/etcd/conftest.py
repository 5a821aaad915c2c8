"""Fixtures for tests against real etcd servers (built on lab/etcd.py).

- ``etcd_server``: a fresh single-member etcd per test on 127.0.0.1 with free ports.
- ``etcd_cluster3``: a fresh 3-member cluster.
- ``tls_files``: a CA + server cert (127.0.0.1, localhost) + client cert in tmp_path.
- ``etcd_factory``: start more servers (TLS, extra args) that are stopped after the test.
- ``run``: run a coroutine in a fresh event loop with a deadline; fails the test if the loop
  reported an error (e.g. "Task was destroyed but it is pending").

When a test fails, the tail of each etcd log is attached to the report.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Coroutine, Generator, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from lab.etcd import EtcdCluster, EtcdServer, TlsFiles, make_tls

T = TypeVar("T")

_SERVERS = pytest.StashKey[list[EtcdServer]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    rep = yield
    if rep.failed:
        for server in item.stash.get(_SERVERS, []):
            rep.sections.append(
                (f"etcd {server.name} log ({server.log_path})", server.log_tail(30))
            )
    return rep


def _register(request: pytest.FixtureRequest, server: EtcdServer) -> None:
    request.node.stash.setdefault(_SERVERS, []).append(server)


@pytest.fixture
def etcd_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., EtcdServer]]:
    servers: list[EtcdServer] = []

    def make(name: str = "n0", **kwargs: Any) -> EtcdServer:
        server = EtcdServer(tmp_path / f"etcd-{name}-{len(servers)}", name=name, **kwargs)
        servers.append(server)
        _register(request, server)
        return server.start()

    try:
        yield make
    finally:
        for server in servers:
            server.close()


@pytest.fixture
def etcd_server(etcd_factory: Callable[..., EtcdServer]) -> EtcdServer:
    return etcd_factory()


@pytest.fixture
def etcd_cluster3(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(3, tmp_path / "cluster")
    for member in cluster.members:
        _register(request, member)
    try:
        yield cluster.start()
    finally:
        cluster.close()


@pytest.fixture
def tls_files(tmp_path: Path) -> TlsFiles:
    return make_tls(tmp_path / "tls")


@pytest.fixture
def run() -> Callable[..., Any]:
    def _run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        loop_errors: list[dict[str, Any]] = []

        async def main() -> T:
            asyncio.get_running_loop().set_exception_handler(
                lambda _loop, ctx: loop_errors.append(ctx)
            )
            return await asyncio.wait_for(coro, timeout)

        result = asyncio.run(main())
        gc.collect()
        assert not loop_errors, f"event loop reported errors: {loop_errors}"
        return result

    return _run
