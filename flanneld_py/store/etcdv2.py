"""``LeaseStore`` on etcd's v2 HTTP API (``/v2/keys``), for Docker-era flannel clusters.

flanneld v0.7 … v0.17 keep their config and leases in etcd's v2 keyspace, which v3 clients cannot
see (and etcd 3.4 serves only with ``--enable-v2=true``; 3.6 has no v2). This store speaks that API
the way flanneld v0.13.0 does on the wire (docs: flannel-compat §11), and is the only module of
flanneld_py that imports httpx.

The contract of ``LeaseStore`` mapped onto v2:

- revisions are v2 indexes: ``KV.mod_revision`` is the node's ``modifiedIndex``; the revision of
  ``list`` is the ``X-Etcd-Index`` of the reply (errorCode 100 on the prefix: an empty list at the
  error's ``index``). Indexes count v2 writes only (etcd's own membership keys included).
- v2 has no leases: a key carries its TTL itself. ``create`` is ``PUT …?prevExist=false`` with the
  form body ``ttl=<ttl>&value=<value>``; ``replace`` is ``PUT …?prevIndex=<mod_revision>`` with the
  same body; both return ``StoredLease(lease_id=0, ttl, modifiedIndex)``. ``KV.lease_id`` is 0 and
  ``revoke`` is a no-op. There is no minimum TTL (v3 raises TTLs below 2 s to 2 s).
- values are text: etcd's JSON replies carry strings, so a value must be UTF-8 (else StoreError).
- prefixes: v2 lists and watches directories, so ``list(prefix)``/``watch(prefix)`` ask for the
  directory that holds ``prefix`` (``…/subnets/`` → ``…/subnets``) and keep the keys that start
  with ``prefix``. Directories are not keys: they are never listed, ``get`` of one is None.
- reads use ``quorum=true`` (as flanneld): ``get`` sends
  ``?quorum=true&recursive=false&sorted=false``, ``list``
  ``?quorum=true&recursive=true&sorted=false`` (and sorts by key itself).
- ``watch`` long-polls ``GET <dir>?recursive=true&wait=true&waitIndex=N`` (etcd answers one event
  per request; the next N is the event's ``modifiedIndex`` + 1). etcd sends the reply headers as
  soon as the watch is registered, before any event: that is the confirmation, and the first
  batch ``[]`` is yielded then. Actions ``delete``, ``expire`` and ``compareAndDelete`` are delete
  events, every other action a put. A key under the prefix that is not a lease
  (``…/subnets/garbage``) is yielded like any other (the subnet manager skips it): unlike flanneld
  v0.13 the watch never re-asks the same index. Events outside ``prefix`` (possible only when it
  does not end at a ``/``) are dropped, as the contract says. The deletion or expiry of a
  directory that holds the prefix (``etcdctl rm -r …/subnets``) cannot be told key by key, so it
  ends the watch with ``DirectoryRemoved`` (a ``Compacted``: the caller re-lists). etcd keeps only
  its last 1000 v2 events: a waitIndex older than that is errorCode 401 (HTTP 400) and raises
  ``HistoryCleared`` (a ``Compacted``).
  Each long poll lasts at most ``watch_poll`` seconds and is then re-sent with the same index, so
  a member that died silently is noticed (the re-sent request gets no headers in time).
- endpoints: every call goes to the current endpoint; a refused connection moves on to the next at
  once, a lost connection or a missing reply too (a stale keep-alive connection is retried once);
  errorCode 300/301 (raft trouble, leader election) is retried shortly; everything within
  ``EtcdSettings.timeout`` seconds per call. A create/replace whose reply was lost and that then
  meets "exists"/"compare failed" counts as our own write when the key holds exactly our value.
- TLS (https endpoints, or any endpoint once ``--etcd-certfile``/``--etcd-keyfile`` are given, as
  the v3 store) and HTTP Basic authentication (v2's users are not etcd's v3 users).
- errors: ``StoreUnavailable`` when no endpoint answers; ``ApiNotServed`` (a ``StoreError``) when
  etcd answers ``404 page not found`` (v2 disabled); ``StoreError`` for the rest, always one line.

The store belongs to the event loop that first uses it.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import re
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote, quote_plus

import httpx

from flanneld_py import __version__
from flanneld_py.store._base import (
    KV,
    Compacted,
    StoredLease,
    StoreError,
    StoreUnavailable,
    WatchEvent,
)
from flanneld_py.store._endpoints import HINT_DOWN as _HINT_DOWN
from flanneld_py.store._endpoints import HINT_TLS as _HINT_TLS
from flanneld_py.store._endpoints import Endpoint as _Endpoint
from flanneld_py.store._endpoints import parse_endpoint as _parse_endpoint
from flanneld_py.store._endpoints import unavailable as _unavailable
from flanneld_py.store.etcd import EtcdSettings
from flanneld_py.tlsfiles import TlsFileError, check_tls_files

__all__ = [
    "V2_HISTORY",
    "ApiNotServed",
    "DirectoryRemoved",
    "EtcdV2Store",
    "HistoryCleared",
    "TtlKV",
]

#: events etcd's v2 store remembers (a watch from an older index gets errorCode 401)
V2_HISTORY: Final = 1000

_NOT_SERVED = (
    "does not serve the v2 API (etcd 3.4 needs --enable-v2=true; 3.6 has no v2): "
    "use --etcd-api=v3, or enable v2"
)

# etcd v2 error codes (etcd/server/etcdserver/api/v2error)
_KEY_NOT_FOUND = 100
_COMPARE_FAILED = 101
_NOT_A_FILE = 102
_NOT_A_DIR = 104
_NODE_EXISTS = 105
_UNAUTHORIZED = 110
_RAFT_INTERNAL = 300
_LEADER_ELECT = 301
_WATCHER_CLEARED = 400
_INDEX_CLEARED = 401

#: Go's url.URL path escaping keeps these (and letters, digits, -._~) as they are
_PATH_SAFE = "/$&+,:;=@"
_CLEARED = re.compile(r"\[(\d+)/(\d+)\]")


class ApiNotServed(StoreError):
    """etcd answered, but does not serve the v2 API (etcd 3.4 without ``--enable-v2``, 3.6)."""


class HistoryCleared(Compacted):
    """A watch asked for an index that left etcd's v2 event history (its last 1000 events)."""

    def __init__(self, start_index: int, requested: int) -> None:
        super().__init__(start_index)
        self.requested = requested
        self.args = (
            f"etcd's v2 event history (its last {V2_HISTORY} events) starts at index "
            f"{start_index}, after the watch's index {requested}",
        )


class DirectoryRemoved(Compacted):
    """A directory holding the watched keys was deleted or expired: re-list."""

    def __init__(self, directory: str, index: int) -> None:
        super().__init__(index)
        self.directory = directory
        self.args = (f"etcd v2 directory {directory} was removed at index {index}",)


@dataclass(frozen=True)
class TtlKV:
    """A v2 key with its remaining TTL (for migrations): ``ttl`` None = the key has no TTL."""

    key: str
    value: bytes
    mod_revision: int
    ttl: int | None


@dataclass
class _Reply:
    ep: _Endpoint
    status: int
    #: the X-Etcd-Index header (0 if absent)
    index: int
    body: dict[str, Any]
    #: an earlier attempt of this call may have reached etcd (its reply was lost)
    after_loss: bool = False
    #: a watch's long poll that etcd accepted (HTTP 200), its body not read yet
    stream: httpx.Response | None = None

    @property
    def code(self) -> int | None:
        code = self.body.get("errorCode")
        return int(code) if isinstance(code, int) else None

    @property
    def node(self) -> dict[str, Any]:
        node = self.body.get("node")
        return node if isinstance(node, dict) else {}


#: how an attempt failed: unreachable (next endpoint), lost (maybe sent: next endpoint, the same
#: one may be tried once more), config (TLS, v2 off: next endpoint, reported if none works),
#: transient (etcd answered it cannot serve now: retry shortly), fatal (stop)
_CONNECT, _LOST, _CONFIG, _TRANSIENT, _FATAL = "connect", "lost", "config", "transient", "fatal"


class _Failure(Exception):
    def __init__(self, kind: str, text: str, error: StoreError | None = None) -> None:
        super().__init__(text)
        self.kind = kind
        self.text = text
        self.error = error


def _one_line(s: str) -> str:
    return " ".join(s.split())


def _causes(e: BaseException) -> builtins.list[BaseException]:
    seen: builtins.list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def _tls_failure(err: ssl.SSLError, ep: _Endpoint) -> _Failure:
    low = str(err).lower()
    if isinstance(err, ssl.SSLCertVerificationError):
        why = err.verify_message or "verification failed"
        if "hostname" in low or "ip address mismatch" in low:
            return _Failure(
                _CONFIG,
                f"TLS: the certificate of etcd at {ep.url} is not valid for host {ep.host!r} "
                f"({why}); use the name or address the certificate was issued for",
            )
        return _Failure(
            _CONFIG, f"TLS: cannot verify the certificate of etcd at {ep.url} ({why}); {_HINT_TLS}"
        )
    plain = "wrong version number" in low or "record layer failure" in low
    closed = "unexpected_eof" in low or "unexpected eof" in low  # etcd on plain http hangs up
    if plain or closed:
        what = "answered without TLS" if plain else "closed the connection"
        return _Failure(
            _CONFIG,
            f"TLS handshake with etcd at {ep.url} failed: the server {what}; {ep.plain_http_hint}",
        )
    if "certificate required" in low or "bad certificate" in low or "unknown ca" in low:
        return _Failure(
            _CONFIG,
            f"TLS: etcd at {ep.url} rejected our client certificate (or none was given); "
            f"{_HINT_TLS}",
        )
    reason = getattr(err, "reason", None) or _one_line(str(err))[:200]
    return _Failure(_CONFIG, f"TLS handshake with etcd at {ep.url} failed ({reason}); {_HINT_TLS}")


def _transport_failure(e: Exception, ep: _Endpoint, timeout: float) -> _Failure:
    """An httpx (or timeout) error of one attempt, in a few words."""
    chain = _causes(e)
    for c in chain:
        if isinstance(c, ssl.SSLError):
            return _tls_failure(c, ep)
    for c in chain:
        if isinstance(c, ConnectionRefusedError):
            return _Failure(_CONNECT, "connection refused")
        if isinstance(c, socket.gaierror):
            return _Failure(_CONNECT, f"cannot resolve host {ep.host!r}")
        if isinstance(c, ConnectionResetError):
            return _Failure(
                _CONNECT if isinstance(e, httpx.ConnectError) else _LOST, "connection reset"
            )
    if isinstance(e, TimeoutError | httpx.TimeoutException):
        kind = _CONNECT if isinstance(e, httpx.ConnectTimeout) else _LOST
        return _Failure(kind, f"no answer within {timeout:g}s")
    low = _one_line(str(e)).lower()
    for text, short in (
        ("no route to host", "no route to host"),
        ("network is unreachable", "network is unreachable"),
        ("connection reset", "connection reset"),
    ):
        if text in low:
            return _Failure(_CONNECT if isinstance(e, httpx.ConnectError) else _LOST, short)
    if isinstance(e, httpx.ConnectError):
        return _Failure(_CONNECT, f"connection failed ({_one_line(str(e))[:200] or 'no details'})")
    if isinstance(e, httpx.RemoteProtocolError):
        if not ep.tls:
            return _Failure(
                _LOST, "connection closed without a reply (a TLS-only etcd? then use https://)"
            )
        return _Failure(_LOST, "connection closed without a reply")
    return _Failure(_LOST, f"connection lost ({type(e).__name__})")


def _error_text(body: dict[str, Any]) -> str:
    msg = str(body.get("message") or "no message")
    cause = body.get("cause")
    return f"{msg} ({cause})" if cause else msg


def _decode_value(node: dict[str, Any]) -> bytes:
    value = node.get("value")
    return value.encode("utf-8", "surrogatepass") if isinstance(value, str) else b""


def _kv(node: dict[str, Any]) -> KV:
    return KV(str(node["key"]), _decode_value(node), int(node["modifiedIndex"]), 0)


def _ttl_kv(node: dict[str, Any]) -> TtlKV:
    ttl = node.get("ttl")
    return TtlKV(
        str(node["key"]),
        _decode_value(node),
        int(node["modifiedIndex"]),
        int(ttl) if isinstance(ttl, int) and node.get("expiration") else None,
    )


def _files(node: dict[str, Any]) -> builtins.list[dict[str, Any]]:
    """Every non-directory node of a (recursive) reply, depth first."""
    out: builtins.list[dict[str, Any]] = []
    stack = [node]
    while stack:
        n = stack.pop()
        if n.get("dir"):
            stack.extend(c for c in n.get("nodes") or [] if isinstance(c, dict))
        elif "key" in n:
            out.append(n)
    return out


def _watch_event(body: bytes, ep: _Endpoint) -> dict[str, Any]:
    """The event of a long poll's body: ``{"action": …, "node": {"key", "modifiedIndex", …}}``."""
    try:
        event = json.loads(body)
    except ValueError:
        event = None
    node = event.get("node") if isinstance(event, dict) else None
    if not isinstance(node, dict) or "key" not in node or "modifiedIndex" not in node:
        if not body.strip():  # etcd ended the long poll without an event (it shuts down)
            raise StoreUnavailable(
                f"lost the watch on etcd at {ep.url}: etcd ended it without an event; {_HINT_DOWN}"
            )
        raise StoreError(f"etcd at {ep.url} sent an unreadable watch event: {body[:200]!r}")
    assert isinstance(event, dict)
    return event


def _directory(prefix: str) -> str:
    """The v2 directory that holds every key starting with ``prefix``."""
    head = prefix[: prefix.rfind("/") + 1].rstrip("/")
    return head if head.startswith("/") else "/" + head


def _path(key: str) -> str:
    if not key.startswith("/"):
        key = "/" + key
    return "/v2/keys" + quote(key, safe=_PATH_SAFE)


def _form(value: bytes, ttl: int, key: str) -> bytes:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        raise StoreError(
            f"cannot store {key} through etcd's v2 API: the value is not UTF-8 text"
        ) from None
    # the fields in sorted order, escaped as Go's url.Values.Encode (flanneld's client) does
    return f"ttl={int(ttl)}&value={quote_plus(value, safe='')}".encode()


class EtcdV2Store:
    """``LeaseStore`` over etcd's v2 HTTP API; see the module docstring.

    Takes the same ``EtcdSettings`` as ``EtcdStore``. Raises ``StoreError`` at construction if the
    TLS files cannot be used. ``watch_poll`` bounds one long poll of a watch (seconds).
    """

    api: Final = "v2"

    def __init__(self, settings: EtcdSettings, *, watch_poll: float = 20.0) -> None:
        self.settings = settings
        self.watch_poll = watch_poll
        self._endpoints = [_parse_endpoint(u, settings.client_cert) for u in settings.endpoints]
        self._ssl: ssl.SSLContext | None = None
        if any(ep.tls for ep in self._endpoints):
            try:
                check_tls_files(settings.cafile, settings.certfile, settings.keyfile)
                ctx = ssl.create_default_context(cafile=settings.cafile)
                if settings.client_cert:
                    ctx.load_cert_chain(str(settings.certfile), str(settings.keyfile))
            except TlsFileError as e:
                raise StoreError(str(e)) from None
            except (OSError, ssl.SSLError) as e:
                raise StoreError(f"cannot load the etcd TLS files: {_one_line(str(e))}") from None
            self._ssl = ctx
        self._auth = (
            httpx.BasicAuth(settings.username, settings.password or "")
            if settings.username
            else None
        )
        self._client: httpx.AsyncClient | None = None
        self._current = 0
        self._reads: set[asyncio.Future[bytes]] = set()
        self._closed = False

    # -- public helpers -----------------------------------------------------------------------
    @property
    def endpoints(self) -> builtins.list[str]:
        return [ep.url for ep in self._endpoints]

    @property
    def current_endpoint(self) -> str:
        """The endpoint the next call goes to first."""
        return self._endpoints[self._current].url

    async def __aenter__(self) -> EtcdV2Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """End open watches (with StoreError) and close the connections (idempotent)."""
        self._closed = True
        for read in list(self._reads):
            read.cancel()
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    # -- LeaseStore -------------------------------------------------------------------------
    async def get(self, key: str) -> KV | None:
        reply = await self._call("GET", _path(key) + "?quorum=true&recursive=false&sorted=false")
        if reply.code in (_KEY_NOT_FOUND, _NOT_A_DIR):
            return None
        self._expect_ok(reply, f"get {key}")
        node = reply.node
        return None if node.get("dir") else _kv(node)

    async def list(self, prefix: str) -> tuple[builtins.list[KV], int]:
        nodes, index = await self._list_nodes(prefix)
        return [_kv(n) for n in nodes], index

    async def create(self, key: str, value: bytes, ttl: int) -> StoredLease | None:
        reply = await self._call(
            "PUT", _path(key) + "?prevExist=false", form=_form(value, ttl, key), write=True
        )
        if reply.code == _NODE_EXISTS:
            if reply.after_loss:  # perhaps our own create, whose reply was lost
                kv = await self.get(key)
                if kv is not None and kv.value == value:
                    return StoredLease(0, ttl, kv.mod_revision)
            return None
        self._expect_ok(reply, f"create {key}")
        return StoredLease(0, ttl, int(reply.node["modifiedIndex"]))

    async def replace(
        self, key: str, value: bytes, ttl: int, mod_revision: int
    ) -> StoredLease | None:
        if mod_revision <= 0:  # etcd ignores prevIndex=0 (an unconditional write)
            return None
        reply = await self._call(
            "PUT",
            _path(key) + f"?prevIndex={int(mod_revision)}",
            form=_form(value, ttl, key),
            write=True,
        )
        if reply.code == _COMPARE_FAILED:
            if reply.after_loss:  # perhaps our own write, whose reply was lost
                kv = await self.get(key)
                if kv is not None and kv.value == value and kv.mod_revision > mod_revision:
                    return StoredLease(0, ttl, kv.mod_revision)
            return None
        if reply.code in (_KEY_NOT_FOUND, _NOT_A_DIR):
            return None
        self._expect_ok(reply, f"replace {key}")
        return StoredLease(0, ttl, int(reply.node["modifiedIndex"]))

    async def revoke(self, lease_id: int) -> None:
        """v2 has no leases (every lease id is 0 or unknown): nothing to do."""
        self._check_open()

    async def delete(self, key: str) -> None:
        reply = await self._call("DELETE", _path(key), write=True)
        if reply.code in (_KEY_NOT_FOUND, _NOT_A_FILE, _NOT_A_DIR):
            return  # no such key (a directory is not a key)
        self._expect_ok(reply, f"delete {key}")

    async def watch(
        self, prefix: str, start_revision: int
    ) -> AsyncIterator[builtins.list[WatchEvent]]:
        directory = _directory(prefix)
        base = _path(directory) + "?recursive=true&wait=true"
        index = max(0, start_revision)
        confirmed = False
        while True:
            target = base + (f"&waitIndex={index}" if index else "")
            resp, ep = await self._open_watch(target, index)
            try:
                if not confirmed:
                    confirmed = True
                    yield []  # etcd registered the watch: events from ``index`` on will follow
                body = await self._read_watch(resp, ep)
            finally:
                await resp.aclose()
            if body is None:  # the long poll ran out: ask again from the same index
                continue
            event = _watch_event(body, ep)
            node = event["node"]
            key, mod = str(node["key"]), int(node["modifiedIndex"])
            index = mod + 1
            prev = event.get("prevNode")
            was_dir = bool(node.get("dir")) or (isinstance(prev, dict) and bool(prev.get("dir")))
            if event.get("action") in ("delete", "expire", "compareAndDelete"):
                if was_dir:
                    raise DirectoryRemoved(key, mod)
                batch = [WatchEvent("delete", key, b"", mod)]
            elif node.get("dir"):
                continue  # a directory was made or changed: not a key
            else:
                batch = [WatchEvent("put", key, _decode_value(node), mod)]
            if key.startswith(prefix):
                yield batch

    # -- for migrations -----------------------------------------------------------------------
    async def get_ttl(self, key: str) -> TtlKV | None:
        """The key with its remaining TTL, or None."""
        reply = await self._call("GET", _path(key) + "?quorum=true&recursive=false&sorted=false")
        if reply.code in (_KEY_NOT_FOUND, _NOT_A_DIR):
            return None
        self._expect_ok(reply, f"get {key}")
        return None if reply.node.get("dir") else _ttl_kv(reply.node)

    async def list_ttl(self, prefix: str) -> tuple[builtins.list[TtlKV], int]:
        """``list`` with each key's remaining TTL."""
        nodes, index = await self._list_nodes(prefix)
        return [_ttl_kv(n) for n in nodes], index

    # -- internals ------------------------------------------------------------------------
    async def _list_nodes(self, prefix: str) -> tuple[builtins.list[dict[str, Any]], int]:
        directory = _directory(prefix)
        reply = await self._call(
            "GET", _path(directory) + "?quorum=true&recursive=true&sorted=false"
        )
        if reply.code in (_KEY_NOT_FOUND, _NOT_A_DIR):
            return [], int(reply.body.get("index") or reply.index)
        self._expect_ok(reply, f"list {prefix}")
        nodes = [n for n in _files(reply.node) if str(n["key"]).startswith(prefix)]
        nodes.sort(key=lambda n: str(n["key"]).encode("utf-8", "surrogatepass"))
        return nodes, reply.index

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("etcd store is closed")

    def _http(self) -> httpx.AsyncClient:
        self._check_open()
        if self._client is None:
            self._client = httpx.AsyncClient(
                verify=self._ssl if self._ssl is not None else False,
                auth=self._auth,
                timeout=None,  # every call is bounded by asyncio timeouts (EtcdSettings.timeout)
                trust_env=False,  # no HTTP(S)_PROXY for etcd
                headers={"User-Agent": f"flanneld-py/{__version__}", "Accept-Encoding": "gzip"},
                limits=httpx.Limits(max_connections=200, max_keepalive_connections=20),
            )
        return self._client

    def _expect_ok(self, reply: _Reply, what: str) -> None:
        if reply.code is not None or not 200 <= reply.status < 300:
            raise StoreError(
                f"etcd at {reply.ep.url} refused to {what}: {_error_text(reply.body)} "
                f"(HTTP {reply.status})"
            )

    def _parse(self, data: bytes, ep: _Endpoint, *, status: int) -> Any:
        """The JSON of a reply; ApiNotServed for etcd's plain "404 page not found"."""
        try:
            return json.loads(data)
        except ValueError:
            pass
        text = _one_line(data.decode("utf-8", "replace"))[:120]
        if status == 404:
            raise _Failure(_CONFIG, "", ApiNotServed(f"etcd at {ep.url} {_NOT_SERVED}"))
        if "http request to an https server" in text.lower():
            raise _Failure(
                _CONFIG,
                "",
                StoreError(
                    f"etcd at {ep.url} serves TLS only: use https:// (with --etcd-cafile, and "
                    "--etcd-certfile/--etcd-keyfile if it wants client certificates)"
                ),
            )
        raise _Failure(
            _CONFIG,
            "",
            StoreError(
                f"etcd at {ep.url} answered a v2 request with HTTP {status} and no JSON "
                f"({text!r}): is it etcd's client URL?"
            ),
        )

    def _classify(self, ep: _Endpoint, status: int, body: Any) -> None:
        """Raise _Failure for replies that are not an answer to the request itself."""
        if not isinstance(body, dict):
            raise _Failure(
                _CONFIG, "", StoreError(f"etcd at {ep.url} sent an unexpected reply: {body!r:.120}")
            )
        code = body.get("errorCode")
        if code == _UNAUTHORIZED or status == 401:
            if self.settings.username:
                text = (
                    f"etcd at {ep.url} refused our credentials for its v2 API "
                    f"({_error_text(body)}); check --etcd-username and --etcd-password (etcd's "
                    "v2 users are not its v3 users) and that the user's role may read and write "
                    "the --etcd-prefix keys"
                )
            else:
                text = (
                    f"etcd at {ep.url} requires authentication for its v2 API "
                    f"({_error_text(body)}); set --etcd-username and --etcd-password"
                )
            raise _Failure(_FATAL, text)
        if code in (_RAFT_INTERNAL, _LEADER_ELECT, _WATCHER_CLEARED) or (
            code is None and status >= 500
        ):
            raise _Failure(_TRANSIENT, f"etcd at {ep.url} cannot serve now: {_error_text(body)}")

    async def _attempt(
        self, ep: _Endpoint, method: str, target: str, form: bytes | None, stream: bool
    ) -> tuple[httpx.Response, dict[str, Any] | None]:
        """One request: the response and its JSON object, or (``stream`` and HTTP 200) the
        response still open, and None."""
        headers = {}
        if form is not None or method == "DELETE":  # as flanneld's client
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        client = self._http()
        request = client.build_request(method, ep.base + target, content=form, headers=headers)
        resp = await client.send(request, stream=stream)
        if stream and resp.status_code == 200:
            return resp, None
        try:
            data = await resp.aread()
        finally:
            await resp.aclose()
        body = self._parse(data, ep, status=resp.status_code)
        self._classify(ep, resp.status_code, body)
        return resp, body

    async def _call(
        self, method: str, target: str, *, form: bytes | None = None, write: bool = False
    ) -> _Reply:
        """``method target`` on the current endpoint, failing over (see ``_failover``)."""
        return await self._failover(method, target, form, write=write)

    async def _failover(
        self,
        method: str,
        target: str,
        form: bytes | None,
        *,
        write: bool = False,
        stream: bool = False,
    ) -> _Reply:
        """Send the request to the current endpoint, failing over to the others within
        ``settings.timeout``; map every failure to StoreError/StoreUnavailable. With ``stream``,
        a 200 reply comes back open (``_Reply.stream``), its body unread."""
        loop = asyncio.get_running_loop()
        timeout = self.settings.timeout
        deadline = loop.time() + timeout
        failures: dict[str, str] = {}
        tries: dict[int, int] = {}
        unreachable: set[int] = set()
        config_error: StoreError | None = None
        after_loss = False
        pause = 0.05
        while True:
            idx = self._current
            ep = self._endpoints[idx]
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise _unavailable(failures or {ep.url: f"no answer within {timeout:g}s"})
            tries[idx] = tries.get(idx, 0) + 1
            try:
                async with asyncio.timeout(remaining):
                    resp, body = await self._attempt(ep, method, target, form, stream)
            except _Failure as e:
                f = e
            except (httpx.HTTPError, TimeoutError, OSError) as e:
                f = _transport_failure(e, ep, timeout)
            else:
                index = resp.headers.get("X-Etcd-Index", "")
                return _Reply(
                    ep,
                    resp.status_code,
                    int(index) if index.isdigit() else 0,
                    body or {},
                    after_loss,
                    resp if body is None else None,
                )
            if self._closed:
                raise StoreError("etcd store is closed")
            if f.kind == _FATAL:
                raise f.error or StoreError(f.text)
            failures[ep.url] = f.text or str(f.error)
            if f.kind == _LOST and write:
                after_loss = True
            if f.kind == _TRANSIENT:
                self._advance(idx)
                unreachable.discard(idx)
                await asyncio.sleep(min(pause, max(0.0, deadline - loop.time())))
                pause = min(pause * 2, 0.5)
                continue
            reset = f.kind == _LOST and f.text == "connection reset" and tries[idx] >= 2
            if reset and ep.tls and self.settings.client_cert:
                # TLS 1.3: a server that rejects our client certificate resets the connection
                # after the handshake, with no alert we could read
                f = _Failure(
                    _CONFIG,
                    f"TLS: etcd at {ep.url} reset the connection twice right after the TLS "
                    f"handshake: it most likely rejected our client certificate; {_HINT_TLS}",
                )
                failures[ep.url] = f.text
            if f.kind == _CONFIG and config_error is None:
                config_error = f.error or StoreError(f.text)
            # a lost reply may come from a stale keep-alive connection: one more try there
            if f.kind != _LOST or tries[idx] >= 2:
                unreachable.add(idx)
                self._advance(idx)
            if len(unreachable) == len(self._endpoints):
                if config_error is not None:
                    raise config_error
                raise _unavailable(failures)

    async def _open_watch(self, target: str, index: int) -> tuple[httpx.Response, _Endpoint]:
        """Start one long poll; returns once etcd sent the reply headers (watch registered)."""
        reply = await self._failover("GET", target, None, stream=True)
        if reply.stream is not None:
            return reply.stream, reply.ep
        if reply.code == _INDEX_CLEARED:
            m = _CLEARED.search(str(reply.body.get("cause") or ""))
            start = int(m.group(1)) if m else int(reply.body.get("index") or 0)
            raise HistoryCleared(start, index)
        self._expect_ok(reply, "watch")
        raise StoreError(f"etcd at {reply.ep.url} answered a watch with HTTP {reply.status}")

    async def _read_watch(self, resp: httpx.Response, ep: _Endpoint) -> bytes | None:
        """The body of a long poll (one event), or None when ``watch_poll`` ran out first."""
        read: asyncio.Future[bytes] = asyncio.ensure_future(resp.aread())
        self._reads.add(read)
        try:
            done, _ = await asyncio.wait({read}, timeout=self.watch_poll)
            if not done:
                read.cancel()
                await asyncio.wait({read})
                return None
            return read.result()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and task is not None and not task.cancelling():
                raise StoreError("etcd store is closed") from None
            raise
        except (httpx.HTTPError, OSError) as e:
            f = _transport_failure(e, ep, self.settings.timeout)
            self._advance(self._endpoints.index(ep))  # the next watch tries another member first
            if self._closed:
                raise StoreError("etcd store is closed") from None
            raise StoreUnavailable(
                f"lost the watch on etcd at {ep.url}: {f.text or f.error}; {_HINT_DOWN}"
            ) from None
        finally:
            if not read.done():
                read.cancel()
                with contextlib.suppress(BaseException):
                    await asyncio.wait({read})
            elif not read.cancelled():
                read.exception()  # retrieved: no "exception was never retrieved" warning
            self._reads.discard(read)

    def _advance(self, idx: int) -> None:
        if self._current == idx:
            self._current = (idx + 1) % len(self._endpoints)
