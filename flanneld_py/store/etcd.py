"""``LeaseStore`` on etcd's v3 API (the only module of flanneld_py that imports aetcd and grpc).

We use aetcd for its generated etcd v3 protobuf messages and gRPC stubs (``aetcd.rpc``), not its
``Client``: that one has one endpoint, no TLS, no re-authentication and a callback watcher. Here:

- One ``grpc.aio`` channel per endpoint, created lazily on first use (``connect()`` is optional:
  it authenticates and checks that a member answers, so startup can fail early with a clear
  message). All calls go to one "current" member; on a connection failure the call moves on to
  the next endpoint at once, so a dead member costs a refused connection (~1 ms), not a timeout.
  Hostnames are resolved by gRPC (``localhost`` included), and a TLS certificate is checked
  against the endpoint's own host.
- Every unary call has a deadline of ``EtcdSettings.timeout`` seconds overall (all retries
  included). Cluster-side hiccups ("no leader", "leader changed", "request timed out") are
  retried within that deadline; "every endpoint refused the connection" fails at once.
- ``create``/``replace`` are safe to retry after a lost reply: the lease id is chosen here, and a
  failed compare whose key already carries that lease is our own earlier write.
- Watches: one gRPC stream per ``watch()`` call, with etcd's ``hasleader`` guard (a member that
  loses its leader ends the stream) and HTTP/2 keepalive (6 s ping, 4 s timeout: etcd answers
  pings sent more often than every 5 s with GOAWAY "too_many_pings"). The iterator yields ``[]``
  once etcd confirmed the watch, then the event batches. A dead member ends the iterator with
  ``StoreUnavailable`` immediately (RST) or within ~10 s (silent network loss).
- With username/password, the token is fetched on first use and fetched again when etcd says it
  is invalid (tokens expire after ``--auth-token-ttl``, 300 s by default, and die with a restart).
- The store belongs to the event loop that first uses it.
- grpc's C core logs to stderr by default; we set ``GRPC_VERBOSITY=NONE`` unless the user set it
  (every failure is reported through our exceptions instead).
"""

from __future__ import annotations

import asyncio
import builtins
import os
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc  # type: ignore[import-untyped,unused-ignore]
from aetcd import rpc

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
from flanneld_py.tlsfiles import TlsFileError, check_tls_files

__all__ = ["EtcdSettings", "EtcdStore"]

T = TypeVar("T")

#: grpc failures that are not a status from the server (AioRpcError is handled apart)
_GRPC_MISC_ERRORS = (grpc.RpcError, grpc.aio.BaseError, asyncio.InvalidStateError)


_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 6000),
    ("grpc.keepalive_timeout_ms", 4000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.ping_timeout_ms", 4000),
    # reconnect to a member that comes back within 1 s, not after grpc's default of up to 120 s
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


# ------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class EtcdSettings:
    """How to reach etcd; the fields mirror flannel's ``--etcd-*`` flags.

    ``endpoints`` are URLs (``http://10.0.0.1:2379``, ``https://etcd.example:2379``; a bare
    ``host:port`` is taken as http). TLS is used for https endpoints and whenever ``keyfile`` and
    ``certfile`` are given; ``cafile`` replaces the system CAs. ``timeout`` (seconds) bounds
    every call. Invalid values raise ``ValueError`` with a one-line message.
    """

    endpoints: list[str]
    username: str | None = None
    password: str | None = None
    keyfile: str | None = None
    certfile: str | None = None
    cafile: str | None = None
    timeout: float = 5.0

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError("no etcd endpoint given (--etcd-endpoints)")
        for url in self.endpoints:
            _parse_endpoint(url, tls=False)
        if bool(self.keyfile) != bool(self.certfile):
            raise ValueError("--etcd-keyfile and --etcd-certfile must be given together")
        if self.password is not None and not self.username:
            raise ValueError("--etcd-password given without --etcd-username")
        if not self.timeout > 0:
            raise ValueError(f"etcd timeout must be positive, not {self.timeout}")

    @property
    def client_cert(self) -> bool:
        return bool(self.keyfile and self.certfile)


def _prefix_end(prefix: bytes) -> bytes:
    """The range_end that selects every key starting with ``prefix``."""
    b = bytearray(prefix)
    while b:
        if b[-1] < 0xFF:
            b[-1] += 1
            return bytes(b)
        b.pop()
    return b"\0"  # empty prefix (or all 0xff): to the end of the keyspace


# ------------------------------------------------------------------------------------------
# error classification

#: the member is out of reach: try the next one at once
_CONNECT = "connect"
#: the connection to the member fails for a reason of configuration (TLS): try the next one, and
#: if none answers, report this (as StoreError, not StoreUnavailable)
_CONFIG = "config"
#: the cluster answered but cannot serve now (no leader, leader changed, ...): retry shortly
_TRANSIENT = "transient"
#: the auth token is missing or no longer valid: authenticate again
_TOKEN = "token"
#: a definitive answer from etcd (bad password, permission denied, ...): stop
_FATAL = "fatal"


class _Failure(Exception):
    """One attempt failed: ``kind`` says whether to move on, retry, re-authenticate or stop."""

    def __init__(self, kind: str, text: str) -> None:
        super().__init__(text)
        self.kind = kind
        self.text = text


def _one_line(s: str) -> str:
    return " ".join(s.split())


def _classify(code: Any, details: str | None, ep: _Endpoint, timeout: float) -> _Failure:
    """Map a grpc status to a ``_Failure``. Errors that do not come from etcd itself (no
    "etcdserver:" prefix) are connection trouble, retryable, except TLS misconfiguration."""
    details = _one_line(details or "")
    msg = details.removeprefix("etcdserver: ")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return _Failure(_CONNECT, f"no answer within {timeout:g}s")
    if msg == details:  # not an answer of etcd: grpc or the connection failed
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return _Failure(
                _FATAL, f"{ep.url} does not speak etcd's v3 API ({details or 'unimplemented'})"
            )
        return _connection_failure(details, ep)
    if code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
    ):
        if "space exceeded" in msg:
            msg += " (etcd is full: compact, defragment and disarm the NOSPACE alarm)"
        return _Failure(_TRANSIENT, msg)
    if "authentication failed" in msg:
        return _Failure(
            _FATAL,
            f"etcd rejected username/password: {msg}; check --etcd-username and --etcd-password",
        )
    if "user name is empty" in msg:
        return _Failure(
            _TOKEN,
            f"etcd at {ep.url} requires authentication ({msg}); "
            "set --etcd-username and --etcd-password",
        )
    if code == grpc.StatusCode.UNAUTHENTICATED or "auth token" in msg:
        return _Failure(_TOKEN, f"etcd at {ep.url} rejected our auth token: {msg}")
    if code == grpc.StatusCode.PERMISSION_DENIED or "permission denied" in msg:
        return _Failure(
            _FATAL,
            f"etcd denied access: {msg}; grant the etcd user readwrite on the --etcd-prefix keys",
        )
    return _Failure(_FATAL, f"etcd at {ep.url} failed: {code.name}: {msg or 'no details'}")


#: the status word grpc puts before each address's error ("UNKNOWN: ", "UNAVAILABLE: ", ...)
_STATUS_WORD = re.compile("(?:" + "|".join(c.name for c in grpc.StatusCode) + "): ")
#: the address grpc tried: "ipv4:10.0.0.1:2379: ", "ipv6:%5B::1%5D:2379: ", "ipv6:[::1]:2379: "
_TARGET = re.compile(r"(?:ipv4|ipv6|unix|unix-abstract):\S+?: ")
#: grpc's wrappers around the OS error; they stack, e.g. "Failed to connect to remote host:
#: getsockopt(SO_ERROR): No route to host", "connect failed: addr: ipv4:...:2379 error: ..."
_SYSCALL = re.compile(
    r"(?:Failed to connect to remote host|connect failed: addr: \S+ error|"
    r"(?:getsockopt|setsockopt)\([A-Z_]*\)|connect\(\)|recvmsg|sendmsg|writev|readv|socket) ?: ?",
    re.IGNORECASE,
)
#: " (104)" after an OS error (recvmsg:Connection reset by peer (104))
_ERRNO = re.compile(r" \(\d+\)$")
#: OS errors (strerror, lower case) and what we call them
_OS_REASONS = (
    ("connection refused", "connection refused"),
    ("no route to host", "no route to host"),
    ("network is unreachable", "network is unreachable"),
    ("timed out", "connection timed out"),
    ("connection reset", "connection reset"),
)


def _grpc_reason(details: str) -> str:
    """The cause in a grpc connection error, without grpc's wrapping: the text after the last
    "last error: ", less the status word, the address and the syscall names."""
    why = details.rpartition("last error: ")[2].strip()
    if m := _STATUS_WORD.match(why):
        why = why[m.end() :]
    if m := _TARGET.match(why):
        why = why[m.end() :]
    while m := _SYSCALL.match(why):
        why = why[m.end() :]
    return _ERRNO.sub("", why).strip()


def _os_reason(why: str) -> str | None:
    low = why.lower()
    return next((short for text, short in _OS_REASONS if text in low), None)


def _connection_failure(details: str, ep: _Endpoint) -> _Failure:
    """grpc could not reach the member or lost it: say why in a few words (no grpc internals);
    TLS problems are ``_CONFIG`` and name the flags to check."""
    low = details.lower()
    why = _grpc_reason(details)
    if "connection refused" in low:
        return _Failure(_CONNECT, "connection refused")
    if "errors resolving" in low or "domain name not found" in low or "dns" in low:
        return _Failure(_CONNECT, f"cannot resolve host {ep.host!r}")
    if "hostname verification" in low:
        return _Failure(
            _CONFIG,
            f"TLS: the certificate of etcd at {ep.url} is not valid for host {ep.host!r}; "
            "use the name or address the certificate was issued for",
        )
    if "certificate_verify_failed" in low or "certificate verify failed" in low:
        m = re.search(r"CERTIFICATE_VERIFY_FAILED: ([^:]+)", details)
        reason = m.group(1).strip() if m else "verification failed"
        return _Failure(
            _CONFIG,
            f"TLS: cannot verify the certificate of etcd at {ep.url} ({reason}); {_HINT_TLS}",
        )
    if "tsi_data_corrupted" in low or "bad_certificate" in low or "certificate_required" in low:
        return _Failure(
            _CONFIG,
            f"TLS: etcd at {ep.url} rejected our client certificate (or none was given); "
            f"{_HINT_TLS}",
        )
    if "failed to create security handshaker" in low:  # our TLS files: see flanneld_py.tlsfiles
        return _Failure(
            _CONFIG,
            f"TLS: cannot set up TLS for etcd at {ep.url} (grpc could not create the TLS "
            f"handshaker from the certificates and key given); {_HINT_TLS}",
        )
    # a server that does not speak TLS answers the ClientHello with plain bytes (OpenSSL:
    # "wrong version number"; BoringSSL, in grpc: WRONG_VERSION_NUMBER) or, as etcd on plain
    # http does, closes the connection ("Handshake read failed (Socket closed)")
    answered_plain = any(
        s in low for s in ("wrong_version_number", "wrong version number", "record layer failure")
    )
    closed = "handshake read failed (socket closed)" in low
    if ep.tls and (answered_plain or closed):
        what = "answered without TLS" if answered_plain else "closed the connection"
        return _Failure(
            _CONFIG,
            f"TLS handshake with etcd at {ep.url} failed: the server {what}; {ep.plain_http_hint}",
        )
    if "handshake" in low or "tls" in low or "ssl" in low:
        m = re.search(r"OPENSSL_internal:([A-Z0-9_]+)", details)
        inner = re.search(r"[Hh]andshake (?:read|write) failed \((.*)\)$", why)
        if m:  # e.g. SSLV3_ALERT_HANDSHAKE_FAILURE -> "sslv3 alert handshake failure"
            reason = m.group(1).lower().replace("_", " ")
        elif inner:  # the connection broke during the handshake
            short = _os_reason(inner.group(1))
            if short == "connection reset" and ep.tls:
                # etcd on plain http may reset rather than close (unread ClientHello bytes): say
                # so, but stay retryable, as a reset can also be the network's
                return _Failure(
                    _CONNECT, f"connection reset during the TLS handshake ({ep.plain_http_hint})"
                )
            if short:
                return _Failure(_CONNECT, f"{short} during the TLS handshake")
            reason = _grpc_reason(inner.group(1))
        else:
            reason = why
        reason = f" ({reason[:200]})" if reason else ""
        return _Failure(_CONFIG, f"TLS handshake with etcd at {ep.url} failed{reason}; {_HINT_TLS}")
    if "failed to connect" in low and low.endswith("socket closed") and not ep.tls:
        return _Failure(
            _CONNECT, "connection closed by the server (a TLS-only etcd? then use https://)"
        )
    short = _os_reason(why)
    if short:
        return _Failure(_CONNECT, short)
    if "http1.x server" in low:
        return _Failure(
            _CONNECT, "the server answered HTTP/1.x, not gRPC (is it etcd's client URL, port 2379?)"
        )
    if "socket closed" in low or "stream removed" in low or "goaway" in low or "reset" in low:
        return _Failure(_CONNECT, "connection lost")
    return _Failure(_CONNECT, f"connection failed ({why[:200]})" if why else "connection failed")


def _leased_kv(kv: Any) -> KV:
    return KV(
        key=kv.key.decode(errors="surrogateescape"),
        value=bytes(kv.value),
        mod_revision=int(kv.mod_revision),
        lease_id=int(kv.lease),
    )


# ------------------------------------------------------------------------------------------
# the store


@dataclass
class _Conn:
    idx: int
    ep: _Endpoint
    channel: Any
    kv: Any
    lease: Any
    watch: Any
    auth: Any
    maintenance: Any


class EtcdStore:
    """``LeaseStore`` over etcd v3; see the module docstring for the failover rules.

    Raises ``StoreError`` at construction if TLS files cannot be read or used (checked by
    ``flanneld_py.tlsfiles``: PEM certificates, a matching unencrypted key). Use as
    ``async with EtcdStore(settings) as store:`` or call ``await store.close()``.
    """

    def __init__(self, settings: EtcdSettings) -> None:
        self.settings = settings
        tls = settings.client_cert
        self._endpoints = [_parse_endpoint(u, tls) for u in settings.endpoints]
        self._credentials: Any = None
        if any(ep.tls for ep in self._endpoints):
            try:  # what grpc would only report as "Failed to create security handshaker"
                check_tls_files(settings.cafile, settings.certfile, settings.keyfile)
            except TlsFileError as e:
                raise StoreError(str(e)) from None
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(settings.cafile, "--etcd-cafile"),
                private_key=_read(settings.keyfile, "--etcd-keyfile"),
                certificate_chain=_read(settings.certfile, "--etcd-certfile"),
            )
        self._conns: dict[int, _Conn] = {}
        self._current = 0
        self._token: str | None = None
        self._token_gen = 0
        self._auth_done = settings.username is None
        self._auth_lock = asyncio.Lock()
        self._watch_calls: set[Any] = set()
        self._closed = False
        #: failed requests to a member (each failed attempt, a failover included) and watches
        #: lost; and how often the member in use changed (for /metrics)
        self.errors = 0
        self.endpoint_switches = 0

    # -- public helpers -----------------------------------------------------------------------
    @property
    def endpoints(self) -> builtins.list[str]:
        return [ep.url for ep in self._endpoints]

    @property
    def current_endpoint(self) -> str:
        """The endpoint the next call goes to first (the member in use)."""
        return self._endpoints[self._current].url

    async def connect(self) -> None:
        """Authenticate (if configured) and check that a member answers; optional."""
        await self._call(lambda c, t, md: c.maintenance.Status(rpc.StatusRequest(), timeout=t))

    async def __aenter__(self) -> EtcdStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Cancel open watches and close every channel (idempotent)."""
        self._closed = True
        for call in list(self._watch_calls):
            call.cancel()
        self._watch_calls.clear()
        conns, self._conns = self._conns, {}
        for conn in conns.values():
            await conn.channel.close()

    # -- LeaseStore -------------------------------------------------------------------------
    async def get(self, key: str) -> KV | None:
        req = rpc.RangeRequest(key=key.encode())
        resp = await self._call(lambda c, t, md: c.kv.Range(req, timeout=t, metadata=md))
        return _leased_kv(resp.kvs[0]) if resp.kvs else None

    async def list(self, prefix: str) -> tuple[builtins.list[KV], int]:
        p = prefix.encode()
        req = rpc.RangeRequest(key=p or b"\0", range_end=_prefix_end(p))
        resp = await self._call(lambda c, t, md: c.kv.Range(req, timeout=t, metadata=md))
        return [_leased_kv(kv) for kv in resp.kvs], int(resp.header.revision)

    async def create(self, key: str, value: bytes, ttl: int) -> StoredLease | None:
        compare = rpc.Compare(
            key=key.encode(),
            target=rpc.Compare.CompareTarget.VERSION,
            result=rpc.Compare.CompareResult.EQUAL,
            version=0,
        )
        return await self._put_with_new_lease(key, value, ttl, compare)

    async def replace(
        self, key: str, value: bytes, ttl: int, mod_revision: int
    ) -> StoredLease | None:
        compare = rpc.Compare(
            key=key.encode(),
            target=rpc.Compare.CompareTarget.MOD,
            result=rpc.Compare.CompareResult.EQUAL,
            mod_revision=mod_revision,
        )
        return await self._put_with_new_lease(key, value, ttl, compare)

    async def revoke(self, lease_id: int) -> None:
        req = rpc.LeaseRevokeRequest(ID=lease_id)
        try:
            await self._call(lambda c, t, md: c.lease.LeaseRevoke(req, timeout=t, metadata=md))
        except StoreError as e:
            if "lease not found" not in str(e):
                raise

    async def delete(self, key: str) -> None:
        req = rpc.DeleteRangeRequest(key=key.encode())
        await self._call(lambda c, t, md: c.kv.DeleteRange(req, timeout=t, metadata=md))

    async def watch(
        self, prefix: str, start_revision: int
    ) -> AsyncIterator[builtins.list[WatchEvent]]:
        p = prefix.encode()
        create = rpc.WatchRequest(
            create_request=rpc.WatchCreateRequest(
                key=p or b"\0", range_end=_prefix_end(p), start_revision=start_revision
            )
        )
        call, conn = await self._open_watch(create)
        ep = conn.ep
        try:
            yield []  # etcd confirmed the watch: events from start_revision on will follow
            while True:
                try:
                    resp = await call.read()
                except grpc.aio.AioRpcError as e:
                    failure = _classify(e.code(), e.details(), ep, self.settings.timeout)
                    raise self._watch_lost(conn, failure) from None
                except _GRPC_MISC_ERRORS as e:
                    failure = _Failure(_CONNECT, f"connection lost ({type(e).__name__})")
                    raise self._watch_lost(conn, failure) from None
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if self._closed and task is not None and not task.cancelling():
                        raise StoreError("etcd store is closed") from None
                    raise
                if resp is grpc.aio.EOF:
                    raise self._watch_lost(conn, _Failure(_CONNECT, "etcd ended the watch stream"))
                if resp.compact_revision:
                    raise Compacted(int(resp.compact_revision))
                if resp.canceled:
                    raise self._watch_lost(conn, _watch_cancelled(resp.cancel_reason))
                if resp.events:
                    yield [
                        WatchEvent(
                            kind="delete" if ev.type == rpc.Event.EventType.DELETE else "put",
                            key=ev.kv.key.decode(errors="surrogateescape"),
                            value=bytes(ev.kv.value),
                            revision=int(ev.kv.mod_revision),
                        )
                        for ev in resp.events
                    ]
        finally:
            call.cancel()
            self._watch_calls.discard(call)

    # -- internals ------------------------------------------------------------------------
    async def _put_with_new_lease(
        self, key: str, value: bytes, ttl: int, compare: Any
    ) -> StoredLease | None:
        lease_id = secrets.randbits(62) + 1  # chosen here so that a retried grant/put is idempotent
        grant = rpc.LeaseGrantRequest(TTL=ttl, ID=lease_id)
        granted_ttl = ttl
        try:
            resp = await self._call(
                lambda c, t, md: c.lease.LeaseGrant(grant, timeout=t, metadata=md)
            )
            granted_ttl = int(resp.TTL)
        except StoreError as e:
            if "lease already exists" not in str(e):  # our own grant whose reply was lost
                raise
        k = key.encode()
        txn = rpc.TxnRequest(
            compare=[compare],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(key=k, value=value, lease=lease_id))],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=k))],
        )
        try:
            resp = await self._call(lambda c, t, md: c.kv.Txn(txn, timeout=t, metadata=md))
        except BaseException:
            await self._revoke_quietly(lease_id)
            raise
        if resp.succeeded:
            return StoredLease(lease_id, granted_ttl, int(resp.header.revision))
        kvs = resp.responses[0].response_range.kvs if resp.responses else []
        if kvs and int(kvs[0].lease) == lease_id:  # our put landed on an earlier attempt
            return StoredLease(lease_id, granted_ttl, int(kvs[0].mod_revision))
        await self._revoke_quietly(lease_id)
        return None

    async def _revoke_quietly(self, lease_id: int) -> None:
        """Best effort: a lease we fail to revoke still expires after its TTL."""
        try:
            await asyncio.wait_for(self.revoke(lease_id), self.settings.timeout)
        except (TimeoutError, StoreError):
            pass

    def _conn(self, idx: int) -> _Conn:
        if self._closed:
            raise StoreError("etcd store is closed")
        conn = self._conns.get(idx)
        if conn is None:
            ep = self._endpoints[idx]
            if ep.tls:
                channel = grpc.aio.secure_channel(ep.target, self._credentials, _CHANNEL_OPTIONS)
            else:
                channel = grpc.aio.insecure_channel(ep.target, _CHANNEL_OPTIONS)
            conn = _Conn(
                idx=idx,
                ep=ep,
                channel=channel,
                kv=rpc.KVStub(channel),
                lease=rpc.LeaseStub(channel),
                watch=rpc.WatchStub(channel),
                auth=rpc.AuthStub(channel),
                maintenance=rpc.MaintenanceStub(channel),
            )
            self._conns[idx] = conn
        return conn

    def _metadata(self) -> tuple[tuple[str, str], ...] | None:
        return (("token", self._token),) if self._token else None

    def _advance(self, idx: int) -> None:
        if self._current == idx:
            self._current = (idx + 1) % len(self._endpoints)
            if self._current != idx:
                self.endpoint_switches += 1

    async def _call(
        self,
        attempt: Callable[[_Conn, float, Any], Awaitable[T]],
        *,
        authenticate: bool = True,
        deadline: float | None = None,
    ) -> T:
        """Run ``attempt(conn, timeout, metadata)`` on the current member, failing over to the
        others until ``deadline`` (default: now + timeout); map every grpc error to
        StoreError/StoreUnavailable. ``attempt`` may raise ``_Failure`` itself."""
        loop = asyncio.get_running_loop()
        timeout = self.settings.timeout
        if deadline is None:
            deadline = loop.time() + timeout
        failures: dict[str, str] = {}
        unreachable: set[int] = set()
        config_error: str | None = None
        reauthed = False
        pause = 0.05
        while True:
            if authenticate and not self._auth_done:
                await self._authenticate(deadline)
            conn = self._conn(self._current)
            gen = self._token_gen
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise _unavailable(failures or {conn.ep.url: f"no answer within {timeout:g}s"})
            try:
                return await attempt(conn, remaining, self._metadata() if authenticate else None)
            except grpc.aio.AioRpcError as e:
                f = _classify(e.code(), e.details(), conn.ep, timeout)
            except _Failure as e:
                f = e
            except _GRPC_MISC_ERRORS as e:  # e.g. a write on a stream that already ended
                f = _Failure(_CONNECT, f"connection lost ({type(e).__name__})")
            if self._closed:
                raise StoreError("etcd store is closed")
            if f.kind == _TOKEN:
                if authenticate and self.settings.username and not reauthed:
                    reauthed = True  # an expired token (etcd's --auth-token-ttl): not an error
                    await self._reauthenticate(gen, deadline)
                    continue
                self.errors += 1
                raise StoreError(f.text)
            self.errors += 1
            if f.kind == _FATAL:
                raise StoreError(f.text)
            failures[conn.ep.url] = f.text
            self._advance(conn.idx)
            if f.kind in (_CONNECT, _CONFIG):
                if f.kind == _CONFIG:
                    config_error = config_error or f.text
                unreachable.add(conn.idx)
                if len(unreachable) == len(self._endpoints):  # no member within reach
                    if config_error:
                        raise StoreError(config_error)
                    raise _unavailable(failures)
            else:  # the cluster answered but cannot serve right now: wait a little, retry
                unreachable.discard(conn.idx)
                await asyncio.sleep(min(pause, max(0.0, deadline - loop.time())))
                pause = min(pause * 2, 0.5)

    async def _authenticate(self, deadline: float) -> None:
        async with self._auth_lock:
            if self._auth_done:
                return
            await self._fetch_token(deadline)

    async def _reauthenticate(self, gen: int, deadline: float) -> None:
        async with self._auth_lock:
            if self._token_gen != gen:  # someone else already fetched a new token
                return
            await self._fetch_token(deadline)

    async def _fetch_token(self, deadline: float) -> None:
        req = rpc.AuthenticateRequest(
            name=self.settings.username or "", password=self.settings.password or ""
        )
        try:
            resp = await self._call(
                lambda c, t, md: c.auth.Authenticate(req, timeout=t),
                authenticate=False,
                deadline=deadline,
            )
            self._token = str(resp.token)
        except StoreError as e:
            if "authentication is not enabled" not in str(e):
                raise
            self._token = None  # etcd without auth: go on without a token (as etcd's client)
        self._token_gen += 1
        self._auth_done = True

    async def _open_watch(self, create: Any) -> tuple[Any, _Conn]:
        """Open a watch stream on the current member (failing over like ``_call``) and wait for
        etcd to confirm the watch."""

        async def attempt(conn: _Conn, timeout: float, md: Any) -> tuple[Any, _Conn]:
            call = conn.watch.Watch(metadata=(md or ()) + (("hasleader", "true"),))
            self._watch_calls.add(call)
            try:
                await asyncio.wait_for(call.write(create), timeout)
                resp = await asyncio.wait_for(call.read(), timeout)
                if resp is grpc.aio.EOF:
                    raise _Failure(_CONNECT, "etcd ended the watch stream")
                if resp.compact_revision:
                    raise Compacted(int(resp.compact_revision))
                if resp.canceled:
                    raise _watch_cancelled(resp.cancel_reason)
            except TimeoutError:
                call.cancel()
                self._watch_calls.discard(call)
                raise _Failure(_CONNECT, f"no answer within {self.settings.timeout:g}s") from None
            except BaseException:
                call.cancel()
                self._watch_calls.discard(call)
                raise
            return call, conn

        return await self._call(attempt)

    def _watch_lost(self, conn: _Conn, f: _Failure) -> StoreError:
        """A watch that was running broke: always StoreUnavailable (the caller re-watches, and
        a lasting problem such as a revoked permission then shows up from ``_open_watch``)."""
        self._advance(conn.idx)  # the next watch (or call) tries another member first
        if self._closed:
            return StoreError("etcd store is closed")
        self.errors += 1
        return StoreUnavailable(f"lost the watch on etcd at {conn.ep.url}: {f.text}; {_HINT_DOWN}")


def _watch_cancelled(reason: str) -> _Failure:
    msg = _one_line(reason).removeprefix("etcdserver: ") or "cancelled by etcd"
    if "permission denied" in msg:
        return _Failure(
            _FATAL,
            f"etcd denied the watch: {msg}; grant the etcd user read on the --etcd-prefix keys",
        )
    if "auth token" in msg:
        return _Failure(_TOKEN, f"etcd rejected our auth token: {msg}")
    return _Failure(_TRANSIENT, msg)


def _read(path: str | None, flag: str) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise StoreError(f"cannot read {flag} {path}: {e.strerror}") from None
