"""flanneld-py end to end on one machine: hosts, etcd, flanneld-py, Docker, containers.

Run ``python -m lab.demo`` (root; ``make demo`` installs everything first). It builds N "hosts"
(network namespaces on a shared underlay switch), runs etcd on the underlay, starts flanneld-py on
every host, starts a Docker engine per host with the options flanneld-py wrote (exactly as
``EnvironmentFile=/run/flannel/docker`` + ``dockerd $DOCKER_NETWORK_OPTIONS`` would), starts one
container per host, and shows that the containers talk to each other across hosts. Everything is
torn down on exit, on Ctrl-C, and on failure. Exit status 0 only if the overlay worked.

The building blocks are shared with ``tests/docker/test_e2e.py``: :func:`build_overlay` (the
whole world: a :class:`lab.flanneld.FlannelCluster` plus a Docker engine and containers per host)
and the checks (:func:`ping`, :func:`transfer`, :func:`iperf`, :func:`underlay_peer_server`).
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
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from lab.docker import (
    PEER_PORT,
    Dockerd,
    DockerLabError,
    RunningContainer,
    build_test_image,
    docker_unavailable_reason,
    image_tarball,
)
from lab.etcd import EtcdServer
from lab.flanneld import DEFAULT_NETWORK, ETCD_PREFIX, FlannelCluster, Flanneld, network_config
from lab.netns import Lab, LabError, Netns, Topology, wait_for

__all__ = [
    "Overlay",
    "OverlayHost",
    "build_overlay",
    "iperf",
    "main",
    "ping",
    "transfer",
    "underlay_peer_server",
]

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
        return self.ns.address


@dataclass(eq=False)
class Overlay:
    cluster: FlannelCluster
    network: IPv4Network
    hosts: list[OverlayHost]
    #: seconds per build step
    timings: dict[str, float] = field(default_factory=dict)
    #: the network's Backend.Type
    backend: str = "udp"

    @property
    def lab(self) -> Lab:
        return self.cluster.lab

    @property
    def topo(self) -> Topology:
        return self.cluster.topo

    @property
    def etcd(self) -> EtcdServer:
        return self.cluster.etcd

    def containers(self) -> list[RunningContainer]:
        return [c for h in self.hosts for c in h.containers]

    def host_of(self, c: RunningContainer) -> OverlayHost:
        return next(h for h in self.hosts if c in h.containers)


def build_overlay(
    lab: Lab,
    n_hosts: int = 2,
    *,
    network: str = DEFAULT_NETWORK,
    containers_per_host: int = 1,
    ip_masq: bool = True,
    flanneld_args: Sequence[str] = (),
    tarball: Path | None = None,
    backend: str = "udp",
    say: Callable[[str], None] = lambda _msg: None,
) -> Overlay:
    """Underlay + etcd + flanneld-py and dockerd on every host + containers (busybox httpd
    serving the peer CGI); ``tarball`` is the test image (default: built once per process).

    Raises :class:`lab.flanneld.FlanneldNotReady` (with the daemon's log tail) when flanneld-py
    does not come up, :class:`DockerLabError` when a Docker engine does not."""
    t = time.monotonic()
    timings: dict[str, float] = {}

    def step(name: str) -> None:
        nonlocal t
        now = time.monotonic()
        timings[name] = round(now - t, 3)
        t = now

    config = network_config(network, backend)
    cl = FlannelCluster(lab, n_hosts, config=config, ip_masq=ip_masq, extra_args=flanneld_args)
    topo = cl.topo
    say(f"underlay {topo.underlay_net}: bridge br0 ({topo.gateway}) in namespace "
        f"{topo.underlay.name}")  # fmt: skip
    for ns in topo.hosts:
        say(f"host {ns.name.rsplit('-', 1)[-1]}: namespace {ns.name}, eth0 {ns.address}")
    step("topology")
    cl.start_etcd()
    say(f"etcd at {cl.etcd.endpoint}; {ETCD_PREFIX}/config = {config}")
    step("etcd")
    hosts = [OverlayHost(f.ns, f) for f in cl.hosts]
    cl.start_daemons()
    for h in hosts:
        say(f"flanneld-py on {h.name}: lease {h.flanneld.subnet}, MTU {h.flanneld.mtu}; "
            f"docker options: {' '.join(h.flanneld.docker_options())}")  # fmt: skip
    step("flanneld")
    tarball = tarball or image_tarball()
    for h in hosts:
        assert h.flanneld.docker_opts_file is not None
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
    return Overlay(cl, IPv4Network(network), hosts, timings, backend)


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
    lab: Lab,
    n_hosts: int,
    iperf_seconds: int,
    flanneld_args: Sequence[str],
    out: _Out,
    backend: str = "udp",
) -> None:
    out.head(
        f"building {n_hosts} hosts: underlay, etcd, flanneld-py ({backend} backend), Docker, "
        "one container each"
    )
    ov = build_overlay(
        lab, n_hosts=n_hosts, flanneld_args=flanneld_args, backend=backend, say=out.say
    )
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
    out.say(
        "etcd " + ETCD_PREFIX + "/subnets/: " + ", ".join(sorted(ov.cluster.leases_by_subnet()))
    )

    out.head("containers: address inside the host's lease, MTU from the lease")
    for h in ov.hosts:
        for c in h.containers:
            mtu = c.mtu()
            out.check(
                c.ip in h.flanneld.subnet and mtu == h.flanneld.mtu,
                f"{c.name} on {h.name}: {c.ip} in {h.flanneld.subnet}, eth0 MTU {mtu}",
            )
        fwd = h.ns.run(["iptables", "-S", "FORWARD"]).stdout.splitlines()
        out.say(f"{h.name}: {fwd[0] if fwd else '?'} (set by dockerd; flanneld-py's rules let "
                "overlay traffic through)")  # fmt: skip

    cs = ov.containers()
    out.head("ping between containers on different hosts (through the overlay)")
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
        out.head(f"iperf3 {b.name} -> {a.name}, {iperf_seconds} s ({backend} backend)")
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
        "--backend",
        choices=("udp", "vxlan", "host-gw"),
        default="udp",
        help="the network's Backend.Type (default udp)",
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
    print(f"each runs flanneld-py ({args.backend} backend) and its own dockerd configured from")
    print("the file flanneld-py writes. Everything is removed at the end.")
    lab = Lab()
    rc = 0
    try:
        _run_demo(
            lab,
            args.hosts,
            args.iperf_seconds,
            shlex.split(args.flanneld_args),
            out,
            args.backend,
        )
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
