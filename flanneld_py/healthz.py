"""A tiny HTTP/1.1 health server on asyncio streams: ``/healthz``, ``/readyz`` and ``/status``.

``/healthz`` (liveness) answers 200 when ``check()`` says healthy, else 503; ``/readyz``
(readiness) the same with ``ready()``. The body is the check's one-line text (``ok`` when it has
none), so a healthy answer can still say what is degraded (e.g. etcd out of reach).
``/status`` answers 200 with ``status()`` as JSON (the daemon supplies lease, peers, counters).
One request per connection (``Connection: close``). A client gets ``timeout`` seconds in total to
send its request head and read the answer, heads are capped at 8 KiB, and at most ``max_clients``
connections are served at once (more are dropped), so slow or garbage clients cannot hurt the
daemon. flannel semantics: ``--healthz-port 0`` means no server at all; the daemon then does not
create one (port 0 here binds an ephemeral port, for tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

__all__ = ["HealthServer"]

log = logging.getLogger("flanneld_py.healthz")

MAX_HEAD = 8 * 1024
MAX_HEADER_LINES = 64

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


class _BadRequest(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class HealthServer:
    """``HealthServer(host, port, check, status, ready=...)``; ``await start()`` ...
    ``await close()``. Without ``ready``, ``/readyz`` is 404."""

    def __init__(
        self,
        host: str,
        port: int,
        check: Callable[[], tuple[bool, str]],
        status: Callable[[], dict[str, Any]] | None = None,
        *,
        ready: Callable[[], tuple[bool, str]] | None = None,
        timeout: float = 5.0,
        max_clients: int = 32,
    ) -> None:
        self.host = host
        self._port = port
        self.check = check
        self.ready = ready
        self.status = status
        self.timeout = timeout
        self.max_clients = max_clients
        self._server: asyncio.Server | None = None
        self._clients: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}

    @property
    def port(self) -> int:
        """The bound port once started (useful with port 0), else the configured one."""
        if self._server is not None and self._server.sockets:
            return int(self._server.sockets[0].getsockname()[1])
        return self._port

    async def start(self) -> None:
        """Listen. Raises ``OSError`` with a one-line message if the address cannot be bound."""
        if self._server is not None:
            return
        try:
            self._server = await asyncio.start_server(
                self._serve, self.host, self._port, limit=MAX_HEAD, reuse_address=True
            )
        except OSError as e:
            raise OSError(
                f"healthz: cannot listen on {self.host}:{self._port}: {e.strerror or e} "
                "(change --healthz-ip/--healthz-port, or --healthz-port=0 to disable)"
            ) from None
        log.info("healthz server listening on %s:%d", self.host, self.port)

    async def close(self) -> None:
        """Stop listening and drop the connections in progress. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        # Hang up on the clients rather than cancel their tasks: each handler then ends normally
        # (Python 3.11's streams log a cancelled handler task as an error).
        clients = list(self._clients.items())
        for _, writer in clients:
            writer.transport.abort()
        tasks = [task for task, _ in clients]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=1.0)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await server.wait_closed()

    # -- one connection --------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._clients) >= self.max_clients or self._server is None:
            writer.transport.abort()
            return
        self._clients[task] = writer
        graceful = False
        try:
            async with asyncio.timeout(self.timeout):
                try:
                    method, path = await self._read_head(reader)
                    code, ctype, body = self._route(method, path)
                except _BadRequest as e:
                    method, code, ctype, body = "GET", e.code, "text/plain", f"{e}\n"
                writer.write(_response(code, ctype, body, head_only=method == "HEAD"))
                await writer.drain()
                graceful = True
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass  # slow, vanished or half-spoken client: just drop it
        except asyncio.CancelledError:
            pass  # close() gave up waiting; end quietly (see close())
        except Exception:
            log.warning("healthz: error serving a request", exc_info=True)
        finally:
            self._clients.pop(task, None)
            if graceful:
                writer.close()
            else:
                writer.transport.abort()

    async def _read_head(self, reader: asyncio.StreamReader) -> tuple[str, str]:
        """Request line + headers (ignored) -> (method, path). Raises _BadRequest."""
        lines: list[bytes] = []
        size = 0
        while True:
            try:
                line = await reader.readline()
            except ValueError:  # one line longer than the stream limit
                raise _BadRequest(431, "request head too large") from None
            if not line.endswith(b"\n"):
                raise asyncio.IncompleteReadError(line, None)  # EOF before the end of the head
            size += len(line)
            if size > MAX_HEAD or len(lines) > MAX_HEADER_LINES:
                raise _BadRequest(431, "request head too large")
            if line in (b"\r\n", b"\n"):
                if lines:
                    break
                continue  # RFC 9112: ignore empty lines before the request line
            lines.append(line)

        parts = lines[0].decode("latin-1").rstrip("\r\n").split(" ")
        if len(parts) != 3:
            raise _BadRequest(400, "malformed request line")
        method, target, version = parts
        if not version.startswith("HTTP/1."):
            raise _BadRequest(505 if version.startswith("HTTP/") else 400, "use HTTP/1.1")
        if not method.isalpha() or not method.isupper():
            raise _BadRequest(400, "malformed method")
        if target.startswith("/"):
            path = target.split("?", 1)[0]
        elif target.startswith(("http://", "https://")):
            path = urlsplit(target).path or "/"
        else:
            raise _BadRequest(400, "malformed request target")
        return method, path

    def _route(self, method: str, path: str) -> tuple[int, str, str]:
        """(status code, content type, body) for a well-formed request."""
        checks = {"/healthz": self.check, "/readyz": self.ready}
        if (path not in checks and path != "/status") or (
            (checks.get(path) if path in checks else self.status) is None
        ):
            return 404, "text/plain", "not found\n"
        if method not in ("GET", "HEAD"):
            raise _BadRequest(405, "only GET and HEAD")
        check = checks.get(path)
        if check is not None:
            try:
                healthy, reason = check()
            except Exception as e:
                log.warning("%s: check failed: %s", path.lstrip("/"), e)
                return 500, "text/plain", f"health check failed: {_one_line(str(e))}\n"
            if healthy:
                return 200, "text/plain", f"{_one_line(reason) or 'ok'}\n"
            return 503, "text/plain", f"{_one_line(reason) or 'unhealthy'}\n"
        assert self.status is not None
        try:
            doc = json.dumps(self.status(), indent=2, sort_keys=True, default=str)
        except Exception as e:
            log.warning("healthz: status failed: %s", e)
            return 500, "text/plain", f"status failed: {_one_line(str(e))}\n"
        return 200, "application/json", doc + "\n"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _response(code: int, ctype: str, body: str, *, head_only: bool) -> bytes:
    data = body.encode("utf-8")
    head = [
        f"HTTP/1.1 {code} {_REASONS.get(code, 'Unknown')}",
        f"Content-Type: {ctype}; charset=utf-8",
        f"Content-Length: {len(data)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    if code == 405:
        head.append("Allow: GET, HEAD")
    raw = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
    return raw if head_only else raw + data
