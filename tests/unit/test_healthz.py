"""The health server over real sockets on 127.0.0.1 (ephemeral ports)."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import time
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Network
from typing import Any

import pytest

from flanneld_py.healthz import HealthServer

HOST = "127.0.0.1"


def run(
    body: Callable[[HealthServer], Awaitable[None]],
    check: Callable[[], tuple[bool, str]] = lambda: (True, "ok"),
    status: Callable[[], dict[str, Any]] | None = None,
    **kw: Any,
) -> None:
    async def main() -> None:
        server = HealthServer(HOST, 0, check, status, **kw)
        await server.start()
        try:
            await asyncio.wait_for(body(server), 10)
        finally:
            await server.close()

    asyncio.run(main())


async def exchange(port: int, raw: bytes, timeout: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def split(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    version, code, _ = lines[0].split(" ", 2)
    assert version == "HTTP/1.1"
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(code), headers, body


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\nUser-Agent: test\r\n\r\n".encode()


def test_healthz_ok() -> None:
    async def body(server: HealthServer) -> None:
        code, headers, data = split(await exchange(server.port, get("/healthz")))
        assert (code, data) == (200, b"ok\n")
        assert headers["content-length"] == "3"
        assert headers["connection"] == "close"
        assert headers["content-type"].startswith("text/plain")

    run(body)


def test_healthz_unhealthy_gives_503_with_one_line_reason() -> None:
    async def body(server: HealthServer) -> None:
        code, _, data = split(await exchange(server.port, get("/healthz")))
        assert (code, data) == (503, b"lease watch on etcd is not live\n")

    run(body, check=lambda: (False, "lease watch on etcd\nis not live"))


def test_status_is_json_of_the_daemon_dict() -> None:
    doc = {"lease": {"subnet": IPv4Network("10.5.18.0/24")}, "peers": 2, "engine": {"rx": 10}}

    async def body(server: HealthServer) -> None:
        code, headers, data = split(await exchange(server.port, get("/status")))
        assert code == 200
        assert headers["content-type"].startswith("application/json")
        assert int(headers["content-length"]) == len(data)
        assert json.loads(data) == {
            "lease": {"subnet": "10.5.18.0/24"},
            "peers": 2,
            "engine": {"rx": 10},
        }

    run(body, status=lambda: doc)


def test_a_standard_http_client_understands_us() -> None:
    async def body(server: HealthServer) -> None:
        def fetch(path: str) -> tuple[int, bytes]:
            conn = http.client.HTTPConnection(HOST, server.port, timeout=5)
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                return resp.status, resp.read()
            finally:
                conn.close()

        assert await asyncio.to_thread(fetch, "/healthz") == (200, b"ok\n")
        assert await asyncio.to_thread(fetch, "/healthz?verbose=1") == (200, b"ok\n")
        status, data = await asyncio.to_thread(fetch, "/status")
        assert status == 200 and json.loads(data) == {"peers": 0}

    run(body, status=lambda: {"peers": 0})


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (get("/"), 404),
        (get("/healthz/extra"), 404),
        (get("/status"), 404),  # no status callback
        (get("/healthz", "POST"), 405),
        (get("/healthz", "DELETE"), 405),
        (b"hello\r\n\r\n", 400),
        (b"GET /healthz\r\n\r\n", 400),
        (b"GET healthz HTTP/1.1\r\n\r\n", 400),
        (b"get /healthz HTTP/1.1\r\n\r\n", 400),
        (b"GET /healthz HTTP/2.0\r\n\r\n", 505),
        (b"GET /healthz SPDY/3\r\n\r\n", 400),
        (b"\r\nGET /healthz HTTP/1.0\n\n", 200),  # leading empty line and bare LF are fine
        (b"GET http://h:1/healthz HTTP/1.1\r\n\r\n", 200),  # absolute form
        (b"GET /healthz HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 9000 + b"\r\n\r\n", 431),
        (b"GET /healthz HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n", 431),
    ],
)
def test_bad_and_unknown_requests(raw: bytes, code: int) -> None:
    async def body(server: HealthServer) -> None:
        got, headers, data = split(await exchange(server.port, raw))
        assert got == code
        assert int(headers["content-length"]) == len(data)
        assert data.endswith(b"\n") and data.count(b"\n") == 1
        if code == 405:
            assert headers["allow"] == "GET, HEAD"

    run(body)


def test_head_has_headers_but_no_body() -> None:
    async def body(server: HealthServer) -> None:
        code, headers, data = split(await exchange(server.port, get("/healthz", "HEAD")))
        assert (code, headers["content-length"], data) == (200, "3", b"")

    run(body)


def test_failing_callbacks_give_500_and_the_server_lives_on() -> None:
    def check() -> tuple[bool, str]:
        raise RuntimeError("boom")

    def status() -> dict[str, Any]:
        raise KeyError("lease")

    async def body(server: HealthServer) -> None:
        code, _, data = split(await exchange(server.port, get("/healthz")))
        assert code == 500 and b"boom" in data
        code, _, data = split(await exchange(server.port, get("/status")))
        assert code == 500 and b"lease" in data

    run(body, check=check, status=status)


def test_slow_client_is_dropped_and_does_not_block_others() -> None:
    async def body(server: HealthServer) -> None:
        t0 = time.monotonic()
        reader, writer = await asyncio.open_connection(HOST, server.port)
        writer.write(b"GET /heal")  # ... and nothing more
        await writer.drain()
        code, _, _ = split(await exchange(server.port, get("/healthz")))
        assert code == 200
        assert time.monotonic() - t0 < 0.45  # served while the slow one hangs
        assert await asyncio.wait_for(reader.read(), 3) == b""  # dropped after the timeout
        assert time.monotonic() - t0 >= 0.45
        writer.close()

    run(body, timeout=0.5)


def test_client_that_vanishes_mid_request_does_no_harm() -> None:
    async def body(server: HealthServer) -> None:
        for _ in range(5):
            _, writer = await asyncio.open_connection(HOST, server.port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHo")
            await writer.drain()
            writer.transport.abort()
        # a client that sends a request and never reads the answer
        sock = socket.create_connection((HOST, server.port))
        sock.sendall(get("/status"))
        sock.close()
        code, _, _ = split(await exchange(server.port, get("/healthz")))
        assert code == 200

    run(body, status=lambda: {"big": "x" * 100_000})


def test_too_many_connections_are_refused_then_service_resumes() -> None:
    async def body(server: HealthServer) -> None:
        idle = [await asyncio.open_connection(HOST, server.port) for _ in range(3)]
        await asyncio.sleep(0.05)  # let the server accept them
        reader, writer = await asyncio.open_connection(HOST, server.port)
        writer.write(get("/healthz"))
        try:  # over the limit: dropped at once (EOF, or a reset since our request is unread)
            assert await asyncio.wait_for(reader.read(), 3) == b""
        except ConnectionResetError:
            pass
        writer.close()
        for _, w in idle:
            w.close()
        await asyncio.sleep(0.05)
        code, _, _ = split(await exchange(server.port, get("/healthz")))
        assert code == 200

    run(body, max_clients=3)


def test_port_zero_binds_an_ephemeral_port_and_close_releases_it() -> None:
    async def main() -> None:
        server = HealthServer(HOST, 0, lambda: (True, "ok"))
        assert server.port == 0
        await server.start()
        port = server.port
        assert port > 0
        idle = await asyncio.open_connection(HOST, port)  # close() must not wait for it
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        await server.close()
        await server.close()  # idempotent
        assert time.monotonic() - t0 < 1.0
        with pytest.raises(OSError):
            await asyncio.open_connection(HOST, port)
        idle[1].close()

    asyncio.run(main())


def test_address_in_use_is_a_one_line_oserror() -> None:
    async def main() -> None:
        with socket.socket() as taken:
            taken.bind((HOST, 0))
            taken.listen()
            port = taken.getsockname()[1]
            server = HealthServer(HOST, port, lambda: (True, "ok"))
            with pytest.raises(OSError) as err:
                await server.start()
            msg = str(err.value)
            assert msg.startswith(f"healthz: cannot listen on {HOST}:{port}: ")
            assert "--healthz-port" in msg and "\n" not in msg
            await server.close()  # never started: no-op

    asyncio.run(main())


def test_readyz_and_a_healthy_answer_that_says_what_is_degraded() -> None:
    state = {"live": (True, "ok; degraded: lease watch on etcd down for 12s"), "ready": (False, "")}

    async def body(server: HealthServer) -> None:
        code, _, data = split(await exchange(server.port, get("/healthz")))
        assert (code, data) == (200, b"ok; degraded: lease watch on etcd down for 12s\n")
        code, _, data = split(await exchange(server.port, get("/readyz")))
        assert (code, data) == (503, b"unhealthy\n")
        state["ready"] = (True, "")
        code, _, data = split(await exchange(server.port, get("/readyz")))
        assert (code, data) == (200, b"ok\n")

    run(body, check=lambda: state["live"], ready=lambda: state["ready"])


def test_readyz_is_404_without_a_readiness_check() -> None:
    async def body(server: HealthServer) -> None:
        code, _, _ = split(await exchange(server.port, get("/readyz")))
        assert code == 404

    run(body)
