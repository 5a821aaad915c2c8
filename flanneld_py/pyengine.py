"""The pure-Python data-plane engine: same behaviour and counters as the C engine (``_engine_c/``).

It runs inside the caller's asyncio event loop (``loop.add_reader`` on both fds) and is used when
the C extension is not built, or on request (``--engine python``). Everything below mirrors the C
engine rule for rule; ``tests/engine`` feeds both the same input and compares their output.

Pipeline, per direction, in batches of up to ``BATCH`` packets ("read what is there, never wait for
a batch to fill"); each readiness callback drains its fd until EAGAIN, but yields back to the event
loop after ``MAX_BATCHES_PER_WAKEUP`` batches so that a flood cannot starve the control plane:

* TUN -> UDP: read until EAGAIN; IPv4 only (IPv6 and malformed packets are dropped and counted);
  longest-prefix match of the destination; no route -> ICMP net unreachable into the TUN; TTL
  that would reach 0 -> ICMP time exceeded into the TUN; else TTL-1 (RFC 1624 checksum update) and
  send the bare packet to ``<peer>:<port>``.
* UDP -> TUN: receive until EAGAIN; validate (length, version, IHL, total length, header checksum,
  sender = PublicIP of the peer owning the inner source, destination inside ``local_subnet``);
  TTL that would reach 0 -> drop and ICMP time exceeded back to the sending peer; else TTL-1 and
  write into the TUN (counted as ``rx_oversize`` too when longer than ``mtu``).

Backpressure: when the UDP socket (or the TUN) returns EAGAIN on send, the unsent rest of the batch
is kept, the engine waits for writability, and stops reading the *other* fd (the TUN, or the UDP
socket) meanwhile, so packets are left in kernel queues rather than dropped here. ICMP errors are
best effort (an EAGAIN drops them and counts a tx error), and rate-limited like the kernel's: every
ICMP error (both directions) takes a token from one bucket of ``ICMP_MSGS_BURST`` tokens refilled at
``ICMP_MSGS_PER_SEC``; without a token it is not sent and counted as ``icmp_ratelimited`` (the
offending packet is dropped all the same).
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import time
from collections import deque
from ipaddress import IPv4Address, IPv4Network

from flanneld_py.engine_types import COUNTERS, DIAGNOSTIC_COUNTERS, PEER_COUNTERS, EngineConfig
from flanneld_py.packet import (
    ICMP_DEST_UNREACH,
    ICMP_NET_UNREACH,
    ICMP_TIME_EXCEEDED,
    ICMP_TTL_EXCEEDED,
    checksum,
    decrement_ttl,
    icmp_error,
    icmp_error_allowed,
)
from flanneld_py.routes import MASKS, RouteTable

__all__ = [
    "BATCH",
    "BUFFER_SIZE",
    "COUNTERS",
    "DIAGNOSTIC_COUNTERS",
    "ICMP_MSGS_BURST",
    "ICMP_MSGS_PER_SEC",
    "MAX_BATCHES_PER_WAKEUP",
    "PyEngine",
]

#: Packets per batch (the C engine uses the same number).
BATCH = 64
#: Receive buffer per packet: any IPv4 datagram fits.
BUFFER_SIZE = 65536
#: Batches per reader callback before yielding to the event loop (readiness is level-triggered, so
#: the callback runs again at once): a flood cannot starve the control plane sharing the loop.
MAX_BATCHES_PER_WAKEUP = 16
#: ICMP error rate limit, modelled on the kernel's global ICMP limiter (``icmp_global_allow``): a
#: token bucket of ``net.ipv4.icmp_msgs_burst`` tokens (it starts full) refilled at
#: ``net.ipv4.icmp_msgs_per_sec``, with their defaults (the C engine uses the same numbers).
ICMP_MSGS_BURST = 50  # net.ipv4.icmp_msgs_burst
ICMP_MSGS_PER_SEC = 1000  # net.ipv4.icmp_msgs_per_sec
_NS_PER_SEC = 1_000_000_000

_MSG_TRUNC = socket.MSG_TRUNC
#: a packet to send: (bytes, (peer address, port), the route's per-peer counters)
_Out = tuple[bytearray, tuple[str, int], list[int]]


def _hung_up(fd: int) -> bool:
    """Whether ``fd`` reports a hang-up (asyncio shows that only as "readable"; called when a
    readable callback found nothing to read, so a hung-up fd cannot make the loop spin)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return any(ev & (select.POLLHUP | select.POLLNVAL) for _fd, ev in poller.poll(0))


def _require_nonblocking(name: str, fd: int) -> None:
    if os.get_blocking(fd):
        raise ValueError(f"{name} {fd} must be non-blocking")


class PyEngine:
    """The asyncio engine. ``start()`` and ``stop()`` must run in the event loop's thread."""

    kind = "python"

    def __init__(self, cfg: EngineConfig) -> None:
        """``cfg.offload`` is ignored (no offloads here); a ``cfg.vnet_hdr`` TUN is refused."""
        if cfg.vnet_hdr:
            raise ValueError("the Python engine cannot use a TUN opened with vnet_hdr")
        _require_nonblocking("tun_fd", cfg.tun_fd)
        _require_nonblocking("udp_fd", cfg.udp_fd)
        self._tun_fd = cfg.tun_fd
        self._udp_fd = cfg.udp_fd
        self._local_net = int(cfg.local_subnet.network_address)
        self._local_mask = MASKS[cfg.local_subnet.prefixlen]
        self._local_addr = cfg.local_addr.packed
        self._port = cfg.port
        self._mtu = cfg.mtu
        self._table = RouteTable()
        self._c: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        # per route (net, prefixlen): [tx_packets, tx_bytes, rx_packets, rx_bytes] (PEER_COUNTERS);
        # set_route/del_route keep one entry for every route in the table
        self._peer_c: dict[tuple[int, int], list[int]] = {}
        self._state = "new"  # new -> running -> (failed) -> stopped
        self._error: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._udp: socket.socket | None = None
        self._rxbuf = bytearray(BUFFER_SIZE)
        self._tx_pending: deque[_Out] = deque()
        self._rx_pending: deque[bytearray] = deque()
        self._addr_cache: dict[int, tuple[str, int]] = {}
        self._ip_cache: dict[str, int] = {}
        self.set_icmp_ratelimit(ICMP_MSGS_BURST, ICMP_MSGS_PER_SEC)

    # --- control ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._state != "new":
            raise RuntimeError(f"engine cannot start: it is {self._state}")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "the Python engine must be started from inside the running event loop"
            ) from None
        # our own socket object on a duplicate: the caller keeps (and closes) udp_fd
        self._udp = socket.socket(fileno=os.dup(self._udp_fd))
        self._loop = loop
        self._state = "running"
        loop.add_reader(self._tun_fd, self._on_tun)
        loop.add_reader(self._udp_fd, self._on_udp)

    def stop(self) -> None:
        if self._state == "stopped":
            return
        self._unregister()
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        self._tx_pending.clear()
        self._rx_pending.clear()
        self._state = "stopped"

    def _unregister(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        for fd in (self._tun_fd, self._udp_fd):
            loop.remove_reader(fd)
            loop.remove_writer(fd)

    def _fail(self, error: str) -> None:
        self._error = error
        self._unregister()
        self._state = "failed"

    def alive(self) -> bool:
        return self._state == "running"

    def error(self) -> str | None:
        return self._error

    def set_route(
        self, subnet: IPv4Network, peer: IPv4Address, *, partial_csum: bool = False
    ) -> None:
        # this engine reads a plain TUN: its packets always carry complete checksums
        key = (int(subnet.network_address), subnet.prefixlen)
        if self._table.get(*key) != int(peer):  # new, or another host: count anew
            self._peer_c[key] = [0, 0, 0, 0]
        self._table.set_route(subnet, peer)
        self._c["route_commands"] += 1

    def del_route(self, subnet: IPv4Network) -> None:
        self._table.del_route(subnet)
        self._peer_c.pop((int(subnet.network_address), subnet.prefixlen), None)
        self._c["route_commands"] += 1

    def routes(self) -> dict[IPv4Network, IPv4Address]:
        return self._table.to_dict()

    def stats(self) -> dict[str, int]:
        return dict(self._c)

    def peer_stats(self) -> dict[IPv4Network, dict[str, int]]:
        return {
            IPv4Network(key): dict(zip(PEER_COUNTERS, c, strict=True))
            for key, c in self._peer_c.items()
        }

    def set_icmp_ratelimit(self, burst: int, per_sec: int) -> None:
        """Before ``start()``: replace the ICMP error token bucket (default ``ICMP_MSGS_BURST``,
        ``ICMP_MSGS_PER_SEC``; it starts full). ``per_sec`` 0: no refill (for tests)."""
        if not (0 <= burst <= 0x7FFFFFFF and 0 <= per_sec <= 0x7FFFFFFF):
            raise ValueError("ICMP burst and rate must be in 0..2147483647")
        if self._state != "new":
            raise RuntimeError("the ICMP rate limit can only be set before start()")
        # tokens in units of 1e-9 token: a refill of elapsed ns * per_sec is exact (as in C)
        self._icmp_cap = self._icmp_tokens = burst * _NS_PER_SEC
        self._icmp_rate = per_sec
        self._icmp_stamp = time.monotonic_ns()

    # --- helpers ------------------------------------------------------------------------------
    def _peer_addr(self, peer: int) -> tuple[str, int]:
        addr = self._addr_cache.get(peer)
        if addr is None:
            if len(self._addr_cache) > 4096:
                self._addr_cache.clear()
            addr = self._addr_cache[peer] = (str(IPv4Address(peer)), self._port)
        return addr

    def _ip_int(self, ip: str) -> int:
        value = self._ip_cache.get(ip)
        if value is None:
            if len(self._ip_cache) > 4096:  # senders may be anyone: keep it bounded
                self._ip_cache.clear()
            value = self._ip_cache[ip] = int.from_bytes(socket.inet_aton(ip), "big")
        return value

    def _icmp_token(self) -> bool:
        """Refill the ICMP bucket (lazily, by the time since the last call), then take a token."""
        now = time.monotonic_ns()
        tokens = min(self._icmp_cap, self._icmp_tokens + (now - self._icmp_stamp) * self._icmp_rate)
        self._icmp_stamp = now
        if tokens < _NS_PER_SEC:
            self._icmp_tokens = tokens
            return False
        self._icmp_tokens = tokens - _NS_PER_SEC
        return True

    def _icmp_may_send(self, pkt: bytes | bytearray, ihl: int) -> bool:
        """May an ICMP error about ``pkt`` be sent now? If not, counted as suppressed or limited."""
        if not icmp_error_allowed(pkt, ihl):
            self._c["icmp_suppressed"] += 1
            return False
        if not self._icmp_token():
            self._c["icmp_ratelimited"] += 1
            return False
        return True

    def _icmp_to_tun(self, pkt: bytes | bytearray, ihl: int, icmp_type: int, code: int) -> None:
        c = self._c
        if not self._icmp_may_send(pkt, ihl):
            return
        msg = icmp_error(pkt, ihl, icmp_type, code, self._local_addr)
        try:
            os.write(self._tun_fd, msg)
        except OSError:
            c["tun_tx_errors"] += 1
            return
        c["tun_tx_packets"] += 1
        c["tun_tx_bytes"] += len(msg)
        if icmp_type == ICMP_DEST_UNREACH:
            c["icmp_unreachable_sent"] += 1
        else:
            c["icmp_time_exceeded_sent"] += 1

    # --- TUN -> UDP ---------------------------------------------------------------------------
    def _on_tun(self) -> None:
        c = self._c
        tun_fd = self._tun_fd
        first = True
        for _round in range(MAX_BATCHES_PER_WAKEUP):
            if self._state != "running":
                return
            batch: list[bytes] = []
            drained = False
            for _ in range(BATCH):
                try:
                    pkt = os.read(tun_fd, BUFFER_SIZE)
                except BlockingIOError:
                    drained = True
                    break
                except OSError as exc:
                    c["tun_rx_errors"] += 1
                    self._fail(f"TUN read failed: {exc.strerror or exc}")
                    break
                if not pkt:  # a TUN never reads empty: this fd is at end of file
                    self._fail("TUN fd reached end of file")
                    break
                batch.append(pkt)
            if not batch:
                if first and drained and _hung_up(tun_fd):
                    self._fail("TUN device failed (error or hang-up on its fd)")
                return
            first = False
            c["tun_rx_batches"] += 1
            self._send(self._classify_tun(batch))
            if drained or self._tx_pending or self._state != "running":
                return

    def _classify_tun(self, batch: list[bytes]) -> list[_Out]:
        c = self._c
        table = self._table
        out: list[_Out] = []
        for pkt in batch:
            n = len(pkt)
            c["tun_rx_packets"] += 1
            c["tun_rx_bytes"] += n
            if n and pkt[0] >> 4 == 6:
                c["drop_tun_ipv6"] += 1
                continue
            ihl = (pkt[0] & 15) * 4 if n else 0
            if n < 20 or pkt[0] >> 4 != 4 or ihl < 20 or ihl > n or ((pkt[2] << 8) | pkt[3]) != n:
                c["drop_tun_malformed"] += 1
                continue
            route = table.lookup(int.from_bytes(pkt[16:20], "big"))
            if route is None:
                c["drop_no_route"] += 1
                self._icmp_to_tun(pkt, ihl, ICMP_DEST_UNREACH, ICMP_NET_UNREACH)
                continue
            if pkt[8] <= 1:
                c["drop_tun_ttl"] += 1
                self._icmp_to_tun(pkt, ihl, ICMP_TIME_EXCEEDED, ICMP_TTL_EXCEEDED)
                continue
            buf = bytearray(pkt)
            decrement_ttl(buf)
            out.append((buf, self._peer_addr(route[2]), self._peer_c[route[0], route[1]]))
        return out

    def _send(self, out: list[_Out]) -> None:
        if not out:
            return
        c = self._c
        sock = self._udp
        assert sock is not None
        c["udp_tx_batches"] += 1
        for i, (pkt, addr, pc) in enumerate(out):
            try:
                sent = sock.sendto(pkt, addr)
            except BlockingIOError:
                self._stall_tx(out[i:])
                return
            except OSError:
                c["udp_tx_errors"] += 1
                continue
            c["udp_tx_packets"] += 1
            c["udp_tx_bytes"] += sent
            pc[0] += 1
            pc[1] += sent

    def _stall_tx(self, rest: list[_Out]) -> None:
        assert self._loop is not None
        self._tx_pending.extend(rest)
        self._c["udp_tx_stalls"] += 1
        self._loop.remove_reader(self._tun_fd)
        self._loop.add_writer(self._udp_fd, self._on_udp_writable)

    def _on_udp_writable(self) -> None:
        c = self._c
        sock = self._udp
        assert sock is not None and self._loop is not None
        pending = self._tx_pending
        if pending:
            c["udp_tx_batches"] += 1
        while pending:
            pkt, addr, pc = pending[0]
            try:
                sent = sock.sendto(pkt, addr)
            except BlockingIOError:
                return
            except OSError:
                c["udp_tx_errors"] += 1
            else:
                c["udp_tx_packets"] += 1
                c["udp_tx_bytes"] += sent
                pc[0] += 1
                pc[1] += sent
            pending.popleft()
        self._loop.remove_writer(self._udp_fd)
        if self._state == "running":
            self._loop.add_reader(self._tun_fd, self._on_tun)

    # --- UDP -> TUN ---------------------------------------------------------------------------
    def _on_udp(self) -> None:
        c = self._c
        sock = self._udp
        assert sock is not None
        buf = self._rxbuf
        view = memoryview(buf)
        first = True
        try:
            for _round in range(MAX_BATCHES_PER_WAKEUP):
                if self._state != "running":
                    return
                batch: list[tuple[bytearray, int, str]] = []
                drained = False
                for _ in range(BATCH):
                    try:
                        n, _anc, flags, addr = sock.recvmsg_into([buf])
                    except BlockingIOError:
                        drained = True
                        break
                    except OSError:
                        c["udp_rx_errors"] += 1
                        drained = True
                        break
                    batch.append((bytearray(view[:n]), flags, addr[0]))
                if not batch:
                    if first and drained and _hung_up(self._udp_fd):
                        self._fail("UDP socket hung up")
                    return
                first = False
                c["udp_rx_batches"] += 1
                self._write_tun(self._classify_udp(batch))
                if drained or self._rx_pending:
                    return
        finally:
            view.release()

    def _classify_udp(self, batch: list[tuple[bytearray, int, str]]) -> list[bytearray]:
        c = self._c
        lookup = self._table.lookup
        local_net, local_mask, mtu = self._local_net, self._local_mask, self._mtu
        out: list[bytearray] = []
        for pkt, flags, sender in batch:
            n = len(pkt)
            c["udp_rx_packets"] += 1
            c["udp_rx_bytes"] += n
            if flags & _MSG_TRUNC:
                c["drop_udp_truncated"] += 1
                continue
            if n < 20:
                c["drop_udp_short"] += 1
                continue
            if pkt[0] >> 4 != 4:
                c["drop_udp_not_ipv4"] += 1
                continue
            ihl = (pkt[0] & 15) * 4
            if ihl < 20 or ihl > n:
                c["drop_udp_bad_header"] += 1
                continue
            if ((pkt[2] << 8) | pkt[3]) != n:
                c["drop_udp_bad_length"] += 1
                continue
            if checksum(pkt[:ihl]):
                c["drop_udp_bad_checksum"] += 1
                continue
            route = lookup(int.from_bytes(pkt[12:16], "big"))
            if route is None:
                c["drop_udp_unknown_src"] += 1
                continue
            if route[2] != self._ip_int(sender):
                c["drop_udp_wrong_peer"] += 1
                continue
            if int.from_bytes(pkt[16:20], "big") & local_mask != local_net:
                c["drop_udp_not_local"] += 1
                continue
            if pkt[8] <= 1:
                c["drop_udp_ttl"] += 1
                self._icmp_to_peer(pkt, ihl, sender)
                continue
            decrement_ttl(pkt)
            if n > mtu:
                c["rx_oversize"] += 1
            pc = self._peer_c[route[0], route[1]]
            pc[2] += 1
            pc[3] += n
            out.append(pkt)
        return out

    def _icmp_to_peer(self, pkt: bytearray, ihl: int, sender: str) -> None:
        """Time exceeded back to the (validated) peer that sent ``pkt``."""
        c = self._c
        if not self._icmp_may_send(pkt, ihl):
            return
        msg = icmp_error(pkt, ihl, ICMP_TIME_EXCEEDED, ICMP_TTL_EXCEEDED, self._local_addr)
        assert self._udp is not None
        try:
            sent = self._udp.sendto(msg, (sender, self._port))
        except OSError:
            c["udp_tx_errors"] += 1
            return
        c["udp_tx_packets"] += 1
        c["udp_tx_bytes"] += sent
        c["icmp_time_exceeded_sent"] += 1

    def _write_tun(self, out: list[bytearray]) -> None:
        c = self._c
        tun_fd = self._tun_fd
        for i, pkt in enumerate(out):
            try:
                os.write(tun_fd, pkt)
            except BlockingIOError:
                self._stall_rx(out[i:])
                return
            except OSError:
                c["tun_tx_errors"] += 1
                continue
            c["tun_tx_packets"] += 1
            c["tun_tx_bytes"] += len(pkt)

    def _stall_rx(self, rest: list[bytearray]) -> None:
        assert self._loop is not None
        self._rx_pending.extend(rest)
        self._c["tun_tx_stalls"] += 1
        self._loop.remove_reader(self._udp_fd)
        self._loop.add_writer(self._tun_fd, self._on_tun_writable)

    def _on_tun_writable(self) -> None:
        c = self._c
        assert self._loop is not None
        pending = self._rx_pending
        while pending:
            pkt = pending[0]
            try:
                os.write(self._tun_fd, pkt)
            except BlockingIOError:
                return
            except OSError:
                c["tun_tx_errors"] += 1
            else:
                c["tun_tx_packets"] += 1
                c["tun_tx_bytes"] += len(pkt)
            pending.popleft()
        self._loop.remove_writer(self._tun_fd)
        if self._state == "running":
            self._loop.add_reader(self._udp_fd, self._on_udp)
