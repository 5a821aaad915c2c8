"""``flanneld-py status``: what the running daemon says about itself, at a glance.

Asks the daemon's control socket (``--control-socket``, default
``/run/flannel/flanneld-py.sock``; mode 0600, so it needs root) for ``/status`` and prints: our
lease and when it expires, backend and engine (with offloads), the etcd endpoint in use and
whether the lease watch is live, the liveness and readiness texts, the peers with their PublicIP,
the ignored peers, the udp engine's traffic counters and its drops by reason (non-zero only).
``--json`` prints the JSON as the daemon sent it.

Exit status: 0 when the daemon answered, 1 with one line on stderr when it is not running (no
socket, or nobody listening on it), when the socket cannot be read (not root), or when the answer
is not what it should be; 2 for bad arguments. With the udp backend each peer's line also gives
what was sent to it and received from it (since its route was set).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from typing import Any, TextIO

from flanneld_py.options import DEFAULT_CONTROL_SOCKET

__all__ = ["StatusError", "fetch", "format_status", "main"]

PROG = "flanneld-py status"


class StatusError(Exception):
    """The daemon could not be asked; ``str(e)`` is the one line to print."""


def not_running(path: str) -> str:
    return (
        f"flanneld-py is not running (no control socket at {path}); "
        "start it: systemctl start flanneld-py"
    )


def fetch(path: str, target: str = "/status", timeout: float = 5.0) -> tuple[int, bytes]:
    """``GET target`` on the unix socket ``path``: (HTTP status, body). Raises StatusError."""
    request = f"GET {target} HTTP/1.1\r\nHost: flanneld-py\r\nConnection: close\r\n\r\n"
    chunks: list[bytes] = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(request.encode("ascii"))
            while data := sock.recv(65536):
                chunks.append(data)
    except (FileNotFoundError, ConnectionRefusedError):
        raise StatusError(not_running(path)) from None
    except PermissionError:
        raise StatusError(
            f"{PROG} needs root to read {path}: run it as root (sudo {PROG})"
        ) from None
    except TimeoutError:
        raise StatusError(f"flanneld-py did not answer on {path} within {timeout:g}s") from None
    except OSError as e:
        raise StatusError(f"cannot talk to flanneld-py at {path}: {e.strerror or e}") from None
    raw = b"".join(chunks)
    head, sep, body = raw.partition(b"\r\n\r\n")
    parts = head.split(b"\r\n", 1)[0].split(b" ", 2)
    if not sep or len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise StatusError(f"unexpected answer on {path} (is it flanneld-py's control socket?)")
    return int(parts[1]), body


def get_status(path: str, timeout: float = 5.0) -> tuple[dict[str, Any], str]:
    """``/status`` from the daemon: (parsed, raw text). Raises StatusError."""
    code, body = fetch(path, "/status", timeout)
    text = body.decode("utf-8", "replace")
    if code != 200:
        raise StatusError(f"flanneld-py answered {code} on {path}: {' '.join(text.split())[:200]}")
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise StatusError(f"flanneld-py sent a /status that is not a JSON object on {path}")
    return doc, text


# -- formatting ----------------------------------------------------------------------------------


def duration(seconds: float, *, days: bool = True) -> str:
    """``23h 59m``, ``5m``, ``40s``; ``2d 03h`` from a day on (with ``days``)."""
    s = max(0, int(seconds))  # floor: never says more time is left than there is
    ndays, rest = divmod(s, 86400) if days else (0, s)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if ndays:
        return f"{ndays}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m"
    return f"{secs}s"


def size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _expiry(lease: dict[str, Any], now: float) -> str:
    at = lease.get("expires_at")
    left = at - now if isinstance(at, int | float) else lease.get("expires_in_s")
    if not isinstance(left, int | float):
        return "no expiry known"
    if left <= 0:
        return f"EXPIRED {duration(-left, days=False)} ago"
    when = time.strftime(" (%Y-%m-%d %H:%M)", time.localtime(at)) if at else ""
    return f"expires in {duration(left, days=False)}{when}"


def _backend_line(backend: dict[str, Any] | None) -> str:
    if not backend:
        return "not set up yet"
    btype = backend.get("type") or backend.get("backend") or "?"
    bits = [str(btype)]
    device = backend.get("device") or backend.get("interface")
    if device:
        bits.append(f"on {device}")
    if backend.get("vni") is not None:
        bits.append(f"vni {backend['vni']}")
    if backend.get("port"):
        bits.append(f"port {backend['port']}")
    if backend.get("up") is False:
        bits.append("(DOWN)")
    line = " ".join(bits)
    engine = backend.get("engine")
    if isinstance(engine, dict):
        offloads = backend.get("offloads")
        active = offloads.get("active") if isinstance(offloads, dict) else None
        threads = engine.get("threads")
        nthreads = f" x {len(threads)} threads" if isinstance(threads, list) else ""
        line += (
            f", engine {engine.get('kind', '?')}{nthreads}"
            f" (offloads: {', '.join(active or []) or 'none'})"
        )
    elif btype == "udp":
        line += ", engine not running"
    return line


def _pair(counters: dict[str, Any], prefix: str) -> str:
    pkts, nbytes = counters.get(f"{prefix}_packets", 0), counters.get(f"{prefix}_bytes", 0)
    return f"{pkts} pkts / {size(nbytes)}"


def _traffic(engine: dict[str, Any]) -> tuple[str, str]:
    """(sent, received): UDP to/from the peers, and the TUN side of each."""
    return (
        f"{_pair(engine, 'udp_tx')} to peers (TUN rx {_pair(engine, 'tun_rx')})",
        f"{_pair(engine, 'udp_rx')} from peers (TUN tx {_pair(engine, 'tun_tx')})",
    )


def _drops(engine: dict[str, Any]) -> str:
    drops = {
        k.removeprefix("drop_"): v
        for k, v in engine.items()
        if (k.startswith("drop_") or k == "icmp_ratelimited") and isinstance(v, int) and v
    }
    return ", ".join(f"{k} {v}" for k, v in sorted(drops.items(), key=lambda kv: -kv[1])) or "none"


def _obj(doc: dict[str, Any], key: str) -> dict[str, Any]:
    value = doc.get(key)
    return value if isinstance(value, dict) else {}


def format_status(doc: dict[str, Any], now: float | None = None) -> str:
    """The at-a-glance text for a ``/status`` document."""
    now = time.time() if now is None else now
    out: list[str] = []

    def row(label: str, text: str) -> None:
        out.append(f"{label:<10} {text}")

    head = f"flanneld-py {doc.get('version', '?')}"
    if isinstance(doc.get("uptime_s"), int | float):
        head += f", up {duration(doc['uptime_s'])}"
    if doc.get("network"):
        head += f", network {doc['network']}"
    out.append(head)
    lease = _obj(doc, "lease")
    if lease:
        text = f"{lease.get('subnet')} (PublicIP {lease.get('public_ip')}), {_expiry(lease, now)}"
        if lease.get("renewal_failures"):
            text += f"; {lease['renewal_failures']} renewal failures"
        row("lease", text)
    else:
        row("lease", "none yet")
    backend = _obj(doc, "backend")
    row("backend", _backend_line(backend or None))
    etcd = _obj(doc, "etcd")
    where = str(etcd.get("endpoint") or "endpoint not known yet")
    if etcd.get("api"):
        where += f" ({etcd['api']})"
    watch = "watch live" if doc.get("watch_live") else "WATCH NOT LIVE"
    extra = [f"{etcd['errors']} errors"] if etcd.get("errors") else []
    if etcd.get("endpoint_switches"):
        extra.append(f"{etcd['endpoint_switches']} endpoint switches")
    row("etcd", f"{where}, {watch}" + (f" ({', '.join(extra)})" if extra else ""))
    row("alive", str(doc.get("alive", "?")))
    row("ready", str(doc.get("ready", "?")))

    peers = _obj(doc, "peers")
    detail = _obj(backend, "peers")
    row("peers", str(len(peers)) if peers else "none")
    for subnet, ip in sorted(peers.items()):
        line = f"  {subnet:<18} via {ip}"
        info = detail.get(subnet)
        if isinstance(info, dict) and info.get("path"):
            mac = f", {info['vtep_mac']}" if info.get("vtep_mac") else ""
            line += f" ({info['path']}{mac})"
        elif isinstance(info, dict) and isinstance(info.get("tx_packets"), int):
            line += f" (sent {_pair(info, 'tx')}, received {_pair(info, 'rx')})"
        out.append(line)
    ignored = _obj(doc, "ignored_peers")
    if ignored:
        row("ignored", f"{len(ignored)} (a lease of another backend type is not routed)")
        for subnet, btype in sorted(ignored.items()):
            out.append(f"  {subnet:<18} {btype}")

    engine = _obj(backend, "engine")
    if engine:
        sent, received = _traffic(engine)
        row("sent", sent)
        row("received", received)
        row("drops", _drops(engine))
    problems = backend.get("problems")
    for problem in problems if isinstance(problems, list) else []:
        row("problem", str(problem))
    return "\n".join(out) + "\n"


# -- command -------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Show what the running flanneld-py says about itself (needs root).",
    )
    p.add_argument(
        "--control-socket",
        "-control-socket",
        metavar="PATH",
        default=os.environ.get("FLANNELD_CONTROL_SOCKET") or DEFAULT_CONTROL_SOCKET,
        help="the daemon's control socket (default: %(default)s)",
    )
    p.add_argument("--json", "-json", action="store_true", help="print the raw /status JSON")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help=argparse.SUPPRESS)
    return p


def main(argv: list[str], stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """``flanneld-py status [--control-socket PATH] [--json]``; returns the exit status."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else 2
    try:
        doc, raw = get_status(args.control_socket, args.timeout)
    except StatusError as e:
        err.write(f"{e}\n")
        err.flush()
        return 1
    out.write((raw if raw.endswith("\n") else raw + "\n") if args.json else format_status(doc))
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
