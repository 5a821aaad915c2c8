"""make_engine(): kinds, the missing-extension path, argument errors, the shared counter names,
the configuration (EngineConfig)."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import socket
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
from enginebench import LOCAL_ADDR, LOCAL_SUBNET, require_kind

from flanneld_py import engine, engine_types, pyengine
from flanneld_py.engine import EngineConfig, EngineError, EngineUnavailable, make_engine
from flanneld_py.engine_types import COUNTERS, DIAGNOSTIC_COUNTERS
from flanneld_py.pyengine import PyEngine


@pytest.fixture
def fds() -> Iterator[tuple[int, int]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", 0))
    for s in (a, u):
        s.setblocking(False)
    try:
        yield a.fileno(), u.fileno()
    finally:
        for s in (a, b, u):
            s.close()


def config(fds: tuple[int, int], **over: Any) -> EngineConfig:
    base = EngineConfig(
        tun_fd=fds[0],
        udp_fd=fds[1],
        local_subnet=LOCAL_SUBNET,
        local_addr=LOCAL_ADDR,
        port=8285,
        mtu=1472,
    )
    return dataclasses.replace(base, **over)


def test_kinds(fds: tuple[int, int]) -> None:
    e = make_engine("python", config(fds))
    assert e.kind == "python" and isinstance(e, PyEngine)
    auto = make_engine("auto", config(fds))
    assert auto.kind == ("c" if engine.c_engine_available() else "python")
    auto.stop()


def test_c_kind(fds: tuple[int, int]) -> None:
    require_kind("c")
    e = make_engine("c", config(fds))
    assert e.kind == "c" and not e.alive() and e.error() is None
    e.stop()


def test_missing_extension(fds: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "_ENGINE_IMPORT_ERROR", "No module named 'flanneld_py._engine'")
    with pytest.raises(EngineUnavailable) as info:
        make_engine("c", config(fds))
    msg = str(info.value)
    assert "\n" not in msg and "--engine python" in msg and "pip install" in msg
    assert isinstance(info.value, EngineError)
    assert make_engine("auto", config(fds)).kind == "python"
    assert not engine.c_engine_available()


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"port": 0}, "port"),
        ({"port": 70000}, "port"),
        ({"mtu": 67}, "MTU"),
        ({"mtu": 65536}, "MTU"),
    ],
)
def test_bad_arguments(fds: tuple[int, int], over: dict[str, object], match: str) -> None:
    with pytest.raises(EngineError, match=match):
        make_engine("python", config(fds, **over))


def test_bad_kind(fds: tuple[int, int]) -> None:
    with pytest.raises(EngineError, match="unknown engine 'rust'"):
        make_engine("rust", config(fds))


@pytest.mark.parametrize("kind", ["c", "python"])
def test_blocking_fd_refused(fds: tuple[int, int], kind: str) -> None:
    require_kind(kind)
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as blocking,
        pytest.raises(ValueError, match="must be non-blocking"),
    ):
        make_engine(kind, config(fds, udp_fd=blocking.fileno()))


def test_python_start_needs_running_loop(fds: tuple[int, int]) -> None:
    e = make_engine("python", config(fds))
    with pytest.raises(RuntimeError, match="running event loop"):
        e.start()

    async def main() -> None:
        e.start()
        assert e.alive()
        e.stop()
        assert not e.alive()

    asyncio.run(main())


def test_counter_names_identical() -> None:
    require_kind("c")
    c = importlib.import_module("flanneld_py._engine")
    assert c.COUNTERS == COUNTERS
    assert set(COUNTERS) >= DIAGNOSTIC_COUNTERS
    assert len(set(COUNTERS)) == len(COUNTERS)
    assert c.BATCH >= 16 and c.BUFFER_SIZE >= 65535


def test_stats_keys(fds: tuple[int, int]) -> None:
    for kind in ("c", "python") if engine.c_engine_available() else ("python",):
        e = make_engine(kind, config(fds))
        assert list(e.stats()) == list(COUNTERS) and not any(e.stats().values())
        e.set_route(IPv4Network("10.5.9.0/24"), IPv4Address("127.0.0.9"))
        assert e.routes() == {IPv4Network("10.5.9.0/24"): IPv4Address("127.0.0.9")}
        e.del_route(IPv4Network("10.5.9.0/24"))
        assert e.routes() == {} and e.stats()["route_commands"] == 2
        e.stop()


def test_shared_names_and_config() -> None:
    """One definition of the names (engine_types), re-exported by the facade and pyengine."""
    for mod in (engine, pyengine):
        assert mod.COUNTERS is engine_types.COUNTERS
        assert mod.DIAGNOSTIC_COUNTERS is engine_types.DIAGNOSTIC_COUNTERS
    assert engine.KINDS is engine_types.KINDS == ("auto", "c", "python")
    assert engine.OFFLOAD_MODES is engine_types.OFFLOAD_MODES == ("auto", "off")
    assert engine.EngineConfig is engine_types.EngineConfig
    cfg = config((3, 4))
    assert (cfg.offload, cfg.vnet_hdr, cfg.tun_offloads) == ("off", False, frozenset())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.port = 1  # type: ignore[misc]
    assert hash(cfg) == hash(config((3, 4)))
