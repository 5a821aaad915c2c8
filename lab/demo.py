"""flanneld-py end to end on one machine: hosts, etcd, flanneld-py, Docker, containers.

Run ``python -m lab.demo`` (root; ``make demo`` installs everything first). It builds N "hosts"
(network namespaces on a shared underlay switch), runs etcd on the underlay, starts flanneld-py on
every host, starts a Docker engine per host with the options flanneld-py wrote (exactly as
``EnvironmentFile=/run/flannel/docker`` + ``dockerd $DOCKER_NETWORK_OPTIONS`` would), starts one
container per host, and shows that the containers talk to each other across hosts. Everything is
torn down on exit, on Ctrl-C, and on failure. Exit status 0 only if the overlay worked.

The building blocks are shared with ``tests/docker/test_e2e.py``: :class:`Flanneld` (one
flanneld-py process in a host namespace), :func:`build_overlay` (the whole world) and the checks
(:func:`ping`, :func:`transfer`, :func:`iperf`, :func:`underlay_peer_server`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

from lab.docker import (
    PEER_PORT,
    Dockerd,
    DockerLabError,
    RunningContainer,
    build_test_image,
    docker_network_options,
    docker_unavailable_reason,
    image_tarball,
    read_env_file,
)
from lab.etcd import EtcdServer
from lab.netns import Lab, LabError, Netns, Topology, wait_for

__all__ = [
    "DEFAULT_NETWORK",
    "ETCD_PREFIX",
    "HEALTHZ_PORT",
    "Flanneld",
    "FlanneldNotReady",
    "Overlay",
    "OverlayHost",
    "build_overlay",
    "http_get_in",
    "iperf",
    "main",
    "ping",
    "transfer",
    "underlay_peer_server",
]

ROOT = Path(__file__).resolve().parent.parent
ETCD_PREFIX = "/coreos.com/network"
DEFAULT_NETWORK = "10.5.0.0/16"
HEALTHZ_PORT = 8471

# an HTTP GET run by the namespace's python (the root namespace cannot reach a host namespace's
# loopback); no proxies: the environment may name one that the namespace cannot reach
_HTTP_GET = """
import sys, urllib.error, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(sys.argv[1], timeout=float(sys.argv[2])) as r:
        code, body = r.status, r.read()
except urllib.error.HTTPError as e:
    code, body = e.code, e.read()
except Exception as e:
    code, body = 0, str(e).encode()
sys.stdout.write(f"{code}\\n")
sys.stdout.flush()
sys.stdout.buffer.write(body)
"""


def http_get_in(ns: Netns, url: str, timeout: float = 2.0) -> tuple[int, str]:
    """GET ``url`` from inside ``ns``: (status, body); status 0 when nothing answered."""
    proc = ns.run(
        [sys.executable, "-c", _HTTP_GET, url, str(timeout)], check=False, timeout=timeout + 10
    )
    head, _, body = proc.stdout.partition("\n")
    try:
        return int(head), body
    except ValueError:
        return 0, (proc.stderr or proc.stdout).strip()


# ---------------------------------------------------------------------------------------------
# flanneld-py in a host namespace


class FlanneldNotReady(DockerLabError):
    """flanneld-py exited or did not become healthy; the message ends with its log tail."""


class Flanneld:
    """One flanneld-py process in host namespace ``ns`` (``python -m flanneld_py``).

    Files go to ``workdir``: ``subnet.env``, ``docker`` (the ``/run/flannel/docker`` format) and
    ``flanneld.log``. Ready = ``GET /healthz`` answers 200 and the docker options file exists.
    The process is started with :meth:`Netns.popen`, so the lab stops it at close; :meth:`stop`
    does it earlier (SIGTERM to the PID's group, then SIGKILL).
    """

    def __init__(
        self,
        lab: Lab,
        ns: Netns,
        etcd_endpoints: Sequence[str],
        *,
        workdir: str | os.PathLike[str] | None = None,
        iface: str = "eth0",
        ip_masq: bool = True,
        healthz_port: int = HEALTHZ_PORT,
        etcd_prefix: str = ETCD_PREFIX,
        extra_args: Sequence[str] = (),
        ready_timeout: float = 30.0,
        python: str = sys.executable,
    ) -> None:
        self.lab = lab
        self.ns = ns
        self.etcd_endpoints = list(etcd_endpoints)
        short = ns.name[len(lab.prefix) + 1 :] if ns.name.startswith(lab.prefix + "-") else ns.name
        self.workdir = Path(workdir) if workdir is not None else lab.tmpdir / f"flannel-{short}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.subnet_file = self.workdir / "subnet.env"
        self.docker_opts_file = self.workdir / "docker"
        self.log_path = self.workdir / "flanneld.log"
        self.iface = iface
        self.ip_masq = ip_masq
        self.healthz_port = healthz_port
        self.etcd_prefix = etcd_prefix
        self.extra_args = list(extra_args)
        self.ready_timeout = ready_timeout
        self.python = python
        self.proc: Any = None  # subprocess.Popen[bytes] once started
        self.starts = 0

    def argv(self) -> list[str]:
        argv = [
            self.python, "-m", "flanneld_py",
            "--etcd-endpoints", ",".join(self.etcd_endpoints),
            "--etcd-prefix", self.etcd_prefix,
            "--iface", self.iface,
            "--subnet-file", str(self.subnet_file),
            "--docker-opts-file", str(self.docker_opts_file),
            "--healthz-ip", "127.0.0.1",
            "--healthz-port", str(self.healthz_port),
        ]  # fmt: skip
        if self.ip_masq:
            argv.append("--ip-masq")
        return argv + self.extra_args

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def start(self, wait: bool = True) -> Flanneld:
        if self.running:
            return self
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"==== {time.strftime('%H:%M:%S')} start #{self.starts}\n".encode())
        pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        self.proc = self.ns.popen(self.argv(), self.log_path, env={"PYTHONPATH": pythonpath})
        if wait:
            self.wait_ready()
        return self

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (then SIGKILL after ``timeout``); returns the exit status."""
        if self.proc is None:
            return None
        rc: int | None = self.lab.stop(self.proc, timeout)
        return rc

    def restart(self, wait: bool = True) -> Flanneld:
        self.stop()
        return self.start(wait=wait)

    def healthz(self) -> tuple[int, str]:
        return http_get_in(self.ns, f"http://127.0.0.1:{self.healthz_port}/healthz")

    def status(self) -> dict[str, Any]:
        code, body = http_get_in(self.ns, f"http://127.0.0.1:{self.healthz_port}/status")
        if code != 200:
            raise DockerLabError(f"flanneld-py on {self.ns.name}: GET /status -> {code} {body}")
        data: dict[str, Any] = json.loads(body)
        return data

    def wait_ready(self, timeout: float | None = None) -> None:
        """Until /healthz says 200 and the docker options file exists; raise
        :class:`FlanneldNotReady` with the log tail if the process exits or time runs out."""
        limit = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        last = "no answer yet"
        while True:
            if self.proc is None or self.proc.poll() is not None:
                rc = None if self.proc is None else self.proc.returncode
                raise FlanneldNotReady(
                    f"flanneld-py on {self.ns.name} exited with status {rc} before it was ready\n"
                    f"  command: {' '.join(self.argv())}\n"
                    f"  log {self.log_path}, last lines:\n{self.log_tail()}"
                )
            code, body = self.healthz()
            if code == 200 and self.docker_opts_file.exists():
                return
            if code == 200:
                last = f"/healthz ok but {self.docker_opts_file} not written"
            elif code:
                last = f"/healthz -> {code} {body.strip()[:200]}"
            if time.monotonic() > deadline:
                raise FlanneldNotReady(
                    f"flanneld-py on {self.ns.name} not ready after {limit:.0f}s ({last})\n"
                    f"  command: {' '.join(self.argv())}\n"
                    f"  log {self.log_path}, last lines:\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def subnet_env(self) -> dict[str, str]:
        return read_env_file(self.subnet_file)

    @property
    def lease(self) -> IPv4Network:
        """Our subnet (from FLANNEL_SUBNET, which holds the lease's first address)."""
        return IPv4Interface(self.subnet_env()["FLANNEL_SUBNET"]).network

    @property
    def mtu(self) -> int:
        return int(self.subnet_env()["FLANNEL_MTU"])

    def docker_options(self) -> list[str]:
        return docker_network_options(self.docker_opts_file)

    def log_tail(self, lines: int = 30, width: int = 300) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "    (no log)"
        return "\n".join("    " + line[:width] for line in text.splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------
# the whole world


@dataclass(eq=False)
class OverlayHost:
    ns: Netns
    flanneld: Flanneld
    dockerd: Dockerd | None = None
    containers: list[RunningContainer] = field(default_factory=list)

    @property
    def name(self) -> str:
        """Short name (``h1``); the namespace is ``<lab prefix>-h1``."""
        return self.ns.name.rsplit("-", 1)[-1]

    @property
    def address(self) -> IPv4Address:
        assert self.ns.address is not None
        return self.ns.address


@dataclass(eq=False)
class Overlay:
    lab: Lab
    topo: Topology
    etcd: EtcdServer
    network: IPv4Network
    hosts: list[OverlayHost]
    #: seconds per build step
    timings: dict[str, float] = field(default_factory=dict)

    def containers(self) -> list[RunningContainer]:
        return [c for h in self.hosts for c in h.containers]

    def host_of(self, c: RunningContainer) -> OverlayHost:
        return next(h for h in self.hosts if c in h.containers)

    def leases_in_etcd(self) -> dict[str, dict[str, Any]]:
        """``{subnet: lease JSON}`` as stored under ``<prefix>/subnets/``."""
        out = self.etcd.etcdctl("get", "--prefix", f"{ETCD_PREFIX}/subnets/")
        lines = out.splitlines()
        leases: dict[str, dict[str, Any]] = {}
        for key, value in zip(lines[::2], lines[1::2], strict=False):
            subnet = key.rsplit("/", 1)[-1].replace("-", "/")
            try:
                leases[subnet] = json.loads(value)
            except ValueError:
                leases[subnet] = {"raw": value}
        return leases


def build_overlay(
    lab: Lab,
    n_hosts: int = 2,
    *,
    network: str = DEFAULT_NETWORK,
    containers_per_host: int = 1,
    ip_masq: bool = True,
    flanneld_args: Sequence[str] = (),
    tarball: Path | None = None,
    say: Callable[[str], None] = lambda _msg: None,
) -> Overlay:
    """Underlay + etcd + flanneld-py and dockerd on every host + containers (busybox httpd
    serving the peer CGI); ``tarball`` is the test image (default: built once per process).

    Raises :class:`FlanneldNotReady` (with the daemon's log tail) when flanneld-py does not come
    up, :class:`DockerLabError` when a Docker engine does not."""
    t = time.monotonic()
    timings: dict[str, float] = {}

    def step(name: str) -> None:
        nonlocal t
        now = time.monotonic()
        timings[name] = round(now - t, 3)
        t = now

    topo = lab.flannel_topology(n_hosts=n_hosts)
    say(f"underlay {topo.underlay_net}: bridge br0 ({topo.gateway}) in namespace "
        f"{topo.underlay.name}")  # fmt: skip
    for ns in topo.hosts:
        say(f"host {ns.name.rsplit('-', 1)[-1]}: namespace {ns.name}, eth0 {ns.address}")
    step("topology")
    etcd = EtcdServer(lab.tmpdir / "etcd", ip=str(topo.etcd_address), netns=topo.underlay.name)
    lab.defer("etcd", etcd.close)
    etcd.start()
    config = {"Network": network, "Backend": {"Type": "udp"}}
    etcd.etcdctl("put", f"{ETCD_PREFIX}/config", json.dumps(config))
    say(f"etcd at {etcd.endpoint}; {ETCD_PREFIX}/config = {json.dumps(config)}")
    step("etcd")
    hosts = [
        OverlayHost(
            ns, Flanneld(lab, ns, [etcd.endpoint], ip_masq=ip_masq, extra_args=flanneld_args)
        )
        for ns in topo.hosts
    ]
    for h in hosts:
        h.flanneld.start(wait=False)
    for h in hosts:
        h.flanneld.wait_ready()
        say(f"flanneld-py on {h.name}: lease {h.flanneld.lease}, MTU {h.flanneld.mtu}; "
            f"docker options: {' '.join(h.flanneld.docker_options())}")  # fmt: skip
    step("flanneld")
    tarball = tarball or image_tarball()
    for h in hosts:
        h.dockerd = Dockerd(lab, h.ns, options_file=h.flanneld.docker_opts_file).start()
        build_test_image(h.dockerd, tarball=tarball)
        say(f"dockerd on {h.name} ready in {h.dockerd.timings['total']:.2f}s; docker0 = "
            + ", ".join(h.dockerd.bridge_addresses()))  # fmt: skip
    step("dockerd")
    for i, h in enumerate(hosts, 1):
        assert h.dockerd is not None
        for j in range(containers_per_host):
            suffix = "" if containers_per_host == 1 else chr(ord("a") + j)
            c = h.dockerd.run_container(f"c{i}{suffix}")
            h.containers.append(c)
            say(f"container {c.name} on {h.name}: {c.ip}")
    step("containers")
    return Overlay(lab, topo, etcd, IPv4Network(network), hosts, timings)


# ---------------------------------------------------------------------------------------------
# checks


def ping(src: RunningContainer, dst: RunningContainer | str | IPv4Address, tries: int = 3) -> bool:
    """True if ``src`` gets an echo reply from ``dst`` (a few tries: the first packets may wait
    for ARP and a fresh route)."""
    addr = dst.ip if isinstance(dst, RunningContainer) else dst
    return any(src.ping(addr, count=1, timeout=2) for _ in range(tries))


def transfer(src: RunningContainer, dst: RunningContainer, size_kib: int = 4096) -> tuple[str, str]:
    """``dst`` fetches a random file of ``size_kib`` KiB from ``src``'s httpd over TCP;
    returns (sha256 at the source, sha256 of what arrived)."""
    made = src.sh(
        f"dd if=/dev/urandom of=/www/blob bs=1024 count={size_kib} 2>/dev/null"
        " && sha256sum /www/blob",
        check=True,
    )
    sent = made.stdout.split()[0]
    got = dst.sh(
        f"set -o pipefail; timeout 60 wget -q -O - http://{src.ip}:{PEER_PORT}/blob | sha256sum",
        timeout=90,
    )
    if got.returncode != 0:
        raise DockerLabError(f"transfer {src.name} -> {dst.name} failed: {got.stderr.strip()}")
    return sent, got.stdout.split()[0]


def iperf(client: RunningContainer, server: RunningContainer, seconds: int = 3) -> dict[str, float]:
    """A TCP iperf3 run from ``client`` to ``server``: {"mbps": received Mbit/s, "retransmits"}."""
    server.dockerd.docker("exec", "-d", server.id, "iperf3", "-s", "-1", "-p", "5201")
    wait_for(lambda: ":5201" in server.exec(["netstat", "-ltn"]).stdout, 10, 0.1, "iperf3 server")
    proc = client.exec(
        ["iperf3", "-c", str(server.ip), "-p", "5201", "-t", str(seconds), "-J"],
        timeout=seconds + 30,
    )
    try:
        end = json.loads(proc.stdout)["end"]
        return {
            "mbps": end["sum_received"]["bits_per_second"] / 1e6,
            "retransmits": float(end["sum_sent"].get("retransmits", 0)),
        }
    except (ValueError, KeyError) as exc:
        raise DockerLabError(
            f"iperf3 {client.name} -> {server.name} failed ({exc}): "
            f"{(proc.stdout + proc.stderr)[-500:]}"
        ) from None


def underlay_peer_server(lab: Lab, ns: Netns, ip: str | IPv4Address, port: int = PEER_PORT) -> str:
    """Serve the peer CGI (the caller's address) with busybox httpd on ``ip:port`` in ``ns``;
    returns the base URL once it listens."""
    www = lab.tmpdir / f"www-{ns.name}"
    (www / "cgi-bin").mkdir(parents=True, exist_ok=True)
    cgi = www / "cgi-bin" / "peer"
    cgi.write_text('#!/bin/sh\necho "Content-Type: text/plain"\necho\necho "$REMOTE_ADDR"\n')
    cgi.chmod(0o755)
    ns.popen(["busybox", "httpd", "-f", "-p", f"{ip}:{port}", "-h", str(www)])
    wait_for(lambda: ns.run(["ss", "-Hltn", f"sport = :{port}"]).stdout.strip(), 10, 0.05, "httpd")
    return f"http://{ip}:{port}"


# ---------------------------------------------------------------------------------------------
# the demo


class _Out:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.failures: list[str] = []

    def head(self, text: str) -> None:
        print(f"\n== {text}", flush=True)

    def say(self, text: str) -> None:
        print(textwrap.indent(text, "   "), flush=True)

    def check(self, ok: bool, text: str) -> bool:
        print(f"   [{'ok' if ok else 'FAIL'}] {text}", flush=True)
        if not ok:
            self.failures.append(text)
        return ok


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def _run_demo(
    lab: Lab, n_hosts: int, iperf_seconds: int, flanneld_args: Sequence[str], out: _Out
) -> None:
    out.head(f"building {n_hosts} hosts: underlay, etcd, flanneld-py, Docker, one container each")
    ov = build_overlay(lab, n_hosts=n_hosts, flanneld_args=flanneld_args, say=out.say)
    out.say("build times (s): " + ", ".join(f"{k} {v}" for k, v in ov.timings.items()))

    out.head("leases and peers (GET /status on each flanneld-py)")
    rows = []
    for h in ov.hosts:
        st = h.flanneld.status()
        lease = st.get("lease") or {}
        peers = st.get("peers") or {}
        rows.append(
            [
                h.name,
                str(h.address),
                str(lease.get("subnet", "-")),
                str(h.flanneld.mtu),
                ", ".join(f"{s} via {ip}" for s, ip in sorted(peers.items())) or "-",
            ]
        )
    out.say(_table(rows, ["host", "underlay IP", "lease", "MTU", "peers"]))
    out.say("etcd " + ETCD_PREFIX + "/subnets/: " + ", ".join(sorted(ov.leases_in_etcd())))

    out.head("containers: address inside the host's lease, MTU from the lease")
    for h in ov.hosts:
        for c in h.containers:
            mtu = c.mtu()
            out.check(
                c.ip in h.flanneld.lease and mtu == h.flanneld.mtu,
                f"{c.name} on {h.name}: {c.ip} in {h.flanneld.lease}, eth0 MTU {mtu}",
            )
        fwd = h.ns.run(["iptables", "-S", "FORWARD"]).stdout.splitlines()
        out.say(f"{h.name}: {fwd[0] if fwd else '?'} (set by dockerd; flanneld-py's rules let "
                "overlay traffic through)")  # fmt: skip

    cs = ov.containers()
    out.head("ping between containers on different hosts (through flanneld-py's UDP tunnel)")
    for a in cs:
        for b in cs:
            if ov.host_of(a) is not ov.host_of(b):
                out.check(ping(a, b), f"{a.name} ({a.ip}) -> {b.name} ({b.ip})")

    out.head("who does the far side see? (each container runs busybox httpd; its CGI script")
    out.say("prints the caller's address, REMOTE_ADDR)")
    for a in cs:
        for b in cs:
            if ov.host_of(a) is not ov.host_of(b):
                seen = _safe(a.peer_address, b.ip)
                out.check(seen == str(a.ip), f"{b.name} sees {a.name} as {seen} (want {a.ip}, "
                          "its own address: no NAT inside the overlay)")  # fmt: skip
    url = underlay_peer_server(lab, ov.topo.underlay, ov.topo.gateway)
    for a in cs:
        h = ov.host_of(a)
        seen = _safe(a.peer_address, ov.topo.gateway)
        out.check(seen == str(h.address), f"{url} (outside the overlay) sees {a.name} as {seen} "
                  f"(want {h.address}, {h.name}'s address: flanneld-py masquerades)")  # fmt: skip

    out.head("TCP: 4 MiB file, SHA-256 compared")
    a, b = cs[0], cs[-1]
    try:
        sent, got = transfer(a, b)
        out.check(sent == got, f"{a.name} -> {b.name}: sent {sent[:16]}…, received {got[:16]}…")
    except DockerLabError as exc:
        out.check(False, str(exc))

    if iperf_seconds > 0:
        out.head(f"iperf3 {b.name} -> {a.name}, {iperf_seconds} s (userspace UDP encapsulation)")
        try:
            r = iperf(b, a, iperf_seconds)
            out.check(r["mbps"] > 0, f"{r['mbps']:.0f} Mbit/s, {r['retransmits']:.0f} retransmits")
        except (DockerLabError, LabError) as exc:
            out.check(False, str(exc))


def _safe(fn: Callable[[IPv4Address], str], arg: IPv4Address) -> str:
    try:
        return fn(arg)
    except (DockerLabError, LabError) as exc:
        return f"error: {exc}"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lab.demo",
        description="flanneld-py + Docker on N simulated hosts (network namespaces); needs root.",
    )
    parser.add_argument("--hosts", type=int, default=2, help="number of hosts (default 2)")
    parser.add_argument(
        "--iperf-seconds", type=int, default=3, help="iperf3 duration, 0 = skip (default 3)"
    )
    parser.add_argument(
        "--flanneld-args",
        default="",
        metavar="ARGS",
        help="extra flanneld-py flags, e.g. '--event-loop=asyncio --engine=python'",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the logs (in the lab's tmp dir); still tears down"
    )
    args = parser.parse_args(argv)
    why = docker_unavailable_reason()
    if why is not None:
        print(f"demo: cannot run here: {why}", file=sys.stderr)
        return 2
    if args.keep:
        os.environ["FLANNELD_LAB_KEEP"] = "1"
    signal.signal(signal.SIGTERM, _interrupt)  # like Ctrl-C: unwind through the finally below
    out = _Out()
    print("flanneld-py demo: hosts are network namespaces joined by a bridge (the 'underlay');")
    print("each runs flanneld-py (UDP backend) and its own dockerd configured from the file")
    print("flanneld-py writes. Everything is removed at the end.")
    lab = Lab()
    rc = 0
    try:
        _run_demo(lab, args.hosts, args.iperf_seconds, shlex.split(args.flanneld_args), out)
    except KeyboardInterrupt:
        print("\ninterrupted", flush=True)
        rc = 130
    except (DockerLabError, LabError) as exc:
        out.failures.append(str(exc))
        hint = "" if args.keep else "\n(logs are removed at teardown; run with --keep to keep them)"
        print(f"\nFAILED while building the overlay:\n{exc}{hint}", flush=True)
    finally:
        # a second Ctrl-C must not cut the teardown short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        logs = lab.tmpdir if args.keep else None
        print("\n== tearing down", flush=True)
        t = time.monotonic()
        lab.close()
        kept = f"; logs kept in {logs}" if logs else ""
        print(f"   done in {time.monotonic() - t:.1f}s{kept}")
    if rc:
        return rc
    if out.failures:
        print(f"\nRESULT: the overlay did NOT work ({len(out.failures)} failed)")
        return 1
    print(f"\nRESULT: the overlay works ({time.monotonic() - out.t0:.0f}s in total)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
