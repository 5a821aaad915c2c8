"""A tiny HTTP/1.1 health server on asyncio streams: ``/healthz``, ``/readyz``, ``/status`` and
``/metrics``, on TCP (``--healthz-ip``/``--healthz-port``) or on a unix socket (the control socket,
``--control-socket``).

``/healthz`` (liveness) answers 200 when ``check()`` says healthy, else 503; ``/readyz``
(readiness) the same with ``ready()``. The body is the check's one-line text (``ok`` when it has
none), so a healthy answer can still say what is degraded (e.g. etcd out of reach).
``/status`` answers 200 with ``status()`` as JSON (the daemon supplies lease, peers, counters);
``/metrics`` answers 200 with what ``metrics()`` renders (the Prometheus text format, see
:mod:`flanneld_py.metrics`).
One request per connection (``Connection: close``). A client gets ``timeout`` seconds in total to
send its request head and read the answer, heads are capped at 8 KiB, and at most ``max_clients``
connections are served at once (more are dropped), so slow or garbage clients cannot hurt the
daemon. flannel semantics: ``--healthz-port 0`` means no server at all; the daemon then does not
create one (port 0 here binds an ephemeral port, for tests).

On a unix socket (``HealthServer.unix(path, ...)``) the socket file is created with mode 0600, so
only its owner (root, for the daemon) can connect; a stale socket file left by a dead process is
replaced, a live one (another daemon answering there) or a file that is not a socket is an error;
``close()`` removes the file if it is still ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import stat
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

__all__ = ["METRICS_CONTENT_TYPE", "HealthServer"]

log = logging.getLogger("flanneld_py.healthz")

MAX_HEAD = 8 * 1024
MAX_HEADER_LINES = 64
#: the Prometheus text exposition format 0.0.4 (``; charset=utf-8`` is added to every type)
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4"

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
    """``HealthServer(host, port, check, status, ready=..., metrics=...)`` (TCP) or
    ``HealthServer.unix(path, check, ...)``; ``await start()`` ... ``await close()``. Without
    ``ready``, ``/readyz`` is 404; without ``metrics``, ``/metrics`` is 404."""

    def __init__(
        self,
        host: str,
        port: int,
        check: Callable[[], tuple[bool, str]],
        status: Callable[[], dict[str, Any]] | None = None,
        *,
        ready: Callable[[], tuple[bool, str]] | None = None,
        metrics: Callable[[], bytes] | None = None,
        path: str | None = None,
        timeout: float = 5.0,
        max_clients: int = 32,
    ) -> None:
        self.host = host
        self._port = port
        #: unix socket path (then ``host``/``port`` are unused)
        self.path = path
        self.check = check
        self.ready = ready
        self.status = status
        self.metrics = metrics
        self.timeout = timeout
        self.max_clients = max_clients
        self._server: asyncio.Server | None = None
        self._clients: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        #: (st_dev, st_ino) of the socket file we created, so close() removes only ours
        self._inode: tuple[int, int] | None = None

    @classmethod
    def unix(
        cls,
        path: str,
        check: Callable[[], tuple[bool, str]],
        status: Callable[[], dict[str, Any]] | None = None,
        **kw: Any,
    ) -> HealthServer:
        """The same server on the unix socket ``path`` (mode 0600)."""
        return cls("", 0, check, status, path=path, **kw)

    @property
    def port(self) -> int:
        """The bound port once started (useful with port 0), else the configured one."""
        if self.path is None and self._server is not None and self._server.sockets:
            return int(self._server.sockets[0].getsockname()[1])
        return self._port

    async def start(self) -> None:
        """Listen. Raises ``OSError`` with a one-line message if the address cannot be bound."""
        if self._server is not None:
            return
        if self.path is not None:
            sock = _bind_unix(self.path)
            st = os.stat(self.path)
            try:
                self._server = await asyncio.start_unix_server(
                    self._serve, sock=sock, limit=MAX_HEAD
                )
            except BaseException:
                sock.close()
                _unlink_if(self.path, (st.st_dev, st.st_ino))
                raise
            self._inode = (st.st_dev, st.st_ino)
            log.info("control socket listening on %s", self.path)
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
        """Stop listening and drop the connections in progress (a unix socket file of ours is
        removed). Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        if self.path is not None and self._inode is not None:
            _unlink_if(self.path, self._inode)
            self._inode = None
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

    def _route(self, method: str, path: str) -> tuple[int, str, str | bytes]:
        """(status code, content type, body) for a well-formed request."""
        checks = {"/healthz": self.check, "/readyz": self.ready}
        handlers: dict[str, object] = {**checks, "/status": self.status, "/metrics": self.metrics}
        if handlers.get(path) is None:
            return 404, "text/plain", "not found\n"
        if method not in ("GET", "HEAD"):
            raise _BadRequest(405, "only GET and HEAD")
        if path == "/metrics":
            assert self.metrics is not None
            try:
                return 200, METRICS_CONTENT_TYPE, self.metrics()
            except Exception as e:
                log.warning("healthz: metrics failed: %s", e)
                return 500, "text/plain", f"metrics failed: {_one_line(str(e))}\n"
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


def _response(code: int, ctype: str, body: str | bytes, *, head_only: bool) -> bytes:
    data = body.encode("utf-8") if isinstance(body, str) else body
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


def _bind_unix(path: str) -> socket.socket:
    """A listening-ready AF_UNIX socket bound at ``path`` with mode 0600. A stale socket file
    (nobody accepts on it: its daemon died) is replaced; raises ``OSError`` with one line when
    another process answers there, when ``path`` is not a socket, or when it cannot be created."""
    hint = '(change --control-socket, or --control-socket "" for none)'
    parent = os.path.dirname(path)
    try:
        if parent:
            os.makedirs(parent, mode=0o755, exist_ok=True)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(errno.EEXIST, "it exists and is not a socket")
            if _answers(path):
                raise OSError(errno.EADDRINUSE, "another process is listening on it")
            os.unlink(path)  # stale: left by a daemon that did not shut down cleanly
            log.info("removed the stale control socket %s", path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound = False
        try:
            old = os.umask(0o177)  # no moment with a looser mode than 0600
            try:
                sock.bind(path)
                bound = True
            finally:
                os.umask(old)
            os.chmod(path, 0o600)
            sock.listen(16)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            if bound:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise
    except OSError as e:
        why = e.strerror or str(e)
        raise OSError(f"control socket: cannot listen on {path}: {why} {hint}") from None
    return sock


def _answers(path: str) -> bool:
    """Whether some process accepts connections on the unix socket ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True  # e.g. a full backlog: somebody is there
    finally:
        probe.close()
    return True


def _unlink_if(path: str, inode: tuple[int, int]) -> None:
    """Remove ``path`` if it is still the file ``inode`` (not a successor's socket)."""
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == inode:
            os.unlink(path)
