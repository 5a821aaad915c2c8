"""The paths under test: each one is its own :class:`lab.netns.Lab` (two hosts on an underlay,
containers on docker0-like bridges) with one way of getting container A's packets to container B.

``build(name, ...)`` returns a :class:`BenchPath`; a path that cannot be built comes back with
``error`` set (its lab already closed), so the bench reports it and carries on with the others.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path
from subprocess import Popen
from typing import Any

from lab.etcd import EtcdLabError, EtcdServer
from lab.netns import Lab, LabError, Netns, Topology

__all__ = [
    "OFFLOAD_FEATURES",
    "PATHS",
    "PATH_TITLES",
    "REFERENCE",
    "BenchPath",
    "build",
]

REPO = Path(__file__).resolve().parent.parent

PATHS = ("underlay", "host-gw", "vxlan", "flanneld-c", "flanneld-python")
REFERENCE = "vxlan"
PATH_TITLES = {
    "underlay": "bare underlay, host to host, no overlay",
    "host-gw": "plain routes (host-gw)",
    "vxlan": "kernel VXLAN (the reference)",
    "flanneld-c": "flanneld-py UDP backend, C engine",
    "flanneld-python": "flanneld-py UDP backend, pure-Python engine",
}

#: what `--underlay-offloads off` switches off on every underlay veth end (one ethtool call per
#: feature, so a name this kernel does not know only fails itself)
OFFLOAD_FEATURES = (
    "tso",
    "gso",
    "gro",
    "tx-udp-segmentation",
    "tx-udp_tnl-segmentation",
    "tx-udp_tnl-csum-segmentation",
    "tx-gso-list",
    "rx-gro-list",
    "rx-udp-gro-forwarding",
)

FLANNEL_CONFIG = '{"Network":"10.5.0.0/16","Backend":{"Type":"udp"}}'
ETCD_PREFIX = "/coreos.com/network"
#: fixed container subnets of the kernel paths (the flanneld paths use their leases)
KERNEL_SUBNETS = ("10.5.1.0/24", "10.5.2.0/24")
VXLAN_ID = 1
VXLAN_PORT = 8472
VXLAN_OVERHEAD = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
UDP_OVERHEAD = 28  # flannel UDP backend: outer IPv4 20 + UDP 8


@dataclass
class BenchPath:
    """A built path: where the iperf3 client and server run and what to send to."""

    name: str
    lab: Lab | None = None
    client: Netns | None = None
    server: Netns | None = None
    target: str = ""
    #: flanneld-py processes, "A" (sender host) and "B" (receiver host)
    daemons: dict[str, Popen[bytes]] = field(default_factory=dict)
    #: everything worth recording about the setup (addresses, MTUs, offload state, ...)
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    log_files: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    def daemon_pids(self) -> dict[str, int]:
        return {k: p.pid for k, p in self.daemons.items() if p.poll() is None}

    def dead_daemon(self) -> str | None:
        """A one-line reason if a flanneld-py process of this path has exited."""
        for host, proc in self.daemons.items():
            if proc.poll() is not None:
                log = self.log_files.get(host, "")
                return f"flanneld-py on host {host} exited (rc={proc.returncode}): " + _tail(
                    Path(log), 8
                ).replace("\n", " | ")
        return None


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.rstrip().splitlines()[-lines:]) or "(empty log)"


# ---------------------------------------------------------------------------------------------
# common pieces


def _topology(lab: Lab, mtu: int, offloads: str, info: dict[str, Any]) -> Topology:
    topo = lab.flannel_topology(n_hosts=2, mtu=mtu)
    info["lab_prefix"] = lab.prefix
    info["underlay_mtu"] = mtu
    info["hosts"] = {"A": str(topo.hosts[0].address), "B": str(topo.hosts[1].address)}
    info["underlay_offloads"] = offloads
    if offloads == "off":
        ends = [(h, "eth0") for h in topo.hosts] + [(topo.underlay, f"h{i}") for i in (1, 2)]
        failed: list[str] = []
        for ns, dev in ends:
            for feat in OFFLOAD_FEATURES:
                proc = ns.run(["ethtool", "-K", dev, feat, "off"], check=False)
                if proc.returncode != 0:
                    failed.append(f"{ns.name}/{dev} {feat}: {proc.stderr.strip()}")
        info["offloads_not_switched_off"] = failed
    # record what the sender's underlay NIC really does now
    k = topo.hosts[0].run(["ethtool", "-k", "eth0"], check=False).stdout
    wanted = {
        "tcp-segmentation-offload",
        "generic-segmentation-offload",
        "generic-receive-offload",
        "tx-udp-segmentation",
        "tx-udp_tnl-segmentation",
        "tx-checksumming",
    }
    info["host_A_eth0_features"] = {
        line.split(":")[0].strip(): line.split(":", 1)[1].strip()
        for line in k.splitlines()
        if ":" in line and line.split(":")[0].strip() in wanted
    }
    return topo


def _containers(
    lab: Lab, topo: Topology, subnets: tuple[str, str], mtu: int, info: dict[str, Any]
) -> tuple[Netns, Netns]:
    h1, h2 = topo.hosts
    c1 = lab.add_container_bridge(h1, subnets[0], mtu=mtu)
    c2 = lab.add_container_bridge(h2, subnets[1], mtu=mtu)
    info["containers"] = {"A": str(c1.address), "B": str(c2.address)}
    info["container_subnets"] = {"A": subnets[0], "B": subnets[1]}
    info["container_mtu"] = mtu
    return c1, c2


def _wait_reachable(client: Netns, target: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.ping(target, count=1, timeout=1.0):
            return True
        time.sleep(0.2)
    return False


# ---------------------------------------------------------------------------------------------
# the paths


def _underlay(lab: Lab, bp: BenchPath, mtu: int, offloads: str) -> None:
    topo = _topology(lab, mtu, offloads, bp.info)
    h1, h2 = topo.hosts
    bp.client, bp.server, bp.target = h1, h2, str(h2.address)


def _host_gw(lab: Lab, bp: BenchPath, mtu: int, offloads: str) -> None:
    topo = _topology(lab, mtu, offloads, bp.info)
    h1, h2 = topo.hosts
    c1, c2 = _containers(lab, topo, KERNEL_SUBNETS, mtu, bp.info)
    h1.add_route(KERNEL_SUBNETS[1], via=h2.address, dev="eth0")
    h2.add_route(KERNEL_SUBNETS[0], via=h1.address, dev="eth0")
    bp.client, bp.server, bp.target = c1, c2, str(c2.address)


def _vxlan(lab: Lab, bp: BenchPath, mtu: int, offloads: str) -> None:
    """Flannel's own vxlan scheme: vxlan0 holds the subnet's .0/32; per peer a route
    ``subnet via subnet.0 dev vxlan0 onlink``, a permanent neighbour entry for subnet.0 with the
    peer's vxlan0 MAC and an FDB entry MAC -> peer underlay address. No learning, no flooding."""
    topo = _topology(lab, mtu, offloads, bp.info)
    h1, h2 = topo.hosts
    vmtu = mtu - VXLAN_OVERHEAD
    c1, c2 = _containers(lab, topo, KERNEL_SUBNETS, vmtu, bp.info)
    nets = [IPv4Network(s) for s in KERNEL_SUBNETS]
    macs: list[str] = []
    for h, net in zip((h1, h2), nets, strict=True):
        h.ip(
            "link", "add", "vxlan0", "mtu", str(vmtu), "type", "vxlan", "id", str(VXLAN_ID),
            "dstport", str(VXLAN_PORT), "local", str(h.address), "dev", "eth0", "nolearning",
        )  # fmt: skip
        h.add_addr("vxlan0", f"{net.network_address}/32")
        h.link_up("vxlan0")
        macs.append(h.ip_json("link", "show", "vxlan0")[0]["address"])
    for i, h in enumerate((h1, h2)):
        j = 1 - i
        peer, peer_net, peer_mac = (h1, h2)[j], nets[j], macs[j]
        h.ip("neigh", "replace", str(peer_net.network_address), "lladdr", peer_mac,
             "dev", "vxlan0", "nud", "permanent")  # fmt: skip
        h.run(["bridge", "fdb", "append", peer_mac, "dev", "vxlan0", "dst", str(peer.address)])
        h.add_route(peer_net, peer_net.network_address, "vxlan0", "onlink")
    bp.info["vxlan"] = {"id": VXLAN_ID, "dstport": VXLAN_PORT, "mtu": vmtu, "macs": macs}
    bp.client, bp.server, bp.target = c1, c2, str(c2.address)


def _read_subnet_env(path: Path) -> dict[str, str] | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    env = {}
    for line in text.splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            env[k.strip()] = v.strip().strip('"')
    return env if "FLANNEL_SUBNET" in env else None


def _flanneld(
    lab: Lab,
    bp: BenchPath,
    mtu: int,
    offloads: str,
    engine: str,
    logs: Path,
    start_timeout: float,
) -> None:
    topo = _topology(lab, mtu, offloads, bp.info)
    h1, h2 = topo.hosts
    if shutil.which("etcd") is None:
        raise LabError("etcd not found: apt-get install etcd-server etcd-client (or make setup)")
    etcd = EtcdServer(lab.tmpdir / "etcd", ip=str(topo.etcd_address), netns=topo.underlay.name)
    etcd_log = logs / f"{bp.name}-etcd.log"

    def close_etcd() -> None:
        etcd.close()
        with contextlib.suppress(OSError):
            shutil.copyfile(etcd.log_path, etcd_log)

    lab.defer("etcd", close_etcd)
    try:
        etcd.start()
        etcd.etcdctl("put", f"{ETCD_PREFIX}/config", FLANNEL_CONFIG)
    except EtcdLabError as exc:
        raise LabError(f"etcd for {bp.name} failed: {exc}") from None
    bp.info["etcd"] = etcd.endpoint
    bp.info["flannel_config"] = FLANNEL_CONFIG
    subnet_files: dict[str, Path] = {}
    for tag, h in (("A", h1), ("B", h2)):
        sfile = lab.tmpdir / f"subnet-{tag}.env"
        argv = [
            sys.executable, "-m", "flanneld_py",
            "--etcd-endpoints", etcd.endpoint,
            "--engine", engine,
            "--subnet-file", str(sfile),
            "--docker-opts-file", "",
            "--iface", "eth0",
            "--healthz-port", "0",
        ]  # fmt: skip
        log = logs / f"{bp.name}-host{tag}-flanneld.log"
        # `-m flanneld_py` must find this checkout whatever the cwd
        pypath = os.environ.get("PYTHONPATH")
        env = {"PYTHONPATH": str(REPO) + (f":{pypath}" if pypath else "")}
        bp.daemons[tag] = h.popen(argv, log_path=log, env=env, stop_timeout=5.0)
        bp.log_files[tag] = str(log)
        subnet_files[tag] = sfile
        bp.info.setdefault("daemon_argv", argv)
    envs: dict[str, dict[str, str]] = {}
    deadline = time.monotonic() + start_timeout
    while len(envs) < 2:
        for tag, sfile in subnet_files.items():
            proc = bp.daemons[tag]
            if tag not in envs and (env_ := _read_subnet_env(sfile)) is not None:
                envs[tag] = env_
            elif tag not in envs and proc.poll() is not None:
                raise LabError(
                    f"flanneld-py failed to start: host {tag} exited (rc={proc.returncode}); "
                    f"log {bp.log_files[tag]}:\n" + _tail(Path(bp.log_files[tag]))
                )
        if len(envs) < 2 and time.monotonic() > deadline:
            missing = sorted(set(subnet_files) - set(envs))[0]
            raise LabError(
                f"flanneld-py failed to start: no FLANNEL_SUBNET in {subnet_files[missing]} "
                f"after {start_timeout:.0f}s (host {missing}); log {bp.log_files[missing]}:\n"
                + _tail(Path(bp.log_files[missing]))
            )
        time.sleep(0.1)
    bp.info["subnet_env"] = envs
    nets = tuple(str(IPv4Interface(envs[t]["FLANNEL_SUBNET"]).network) for t in ("A", "B"))
    cmtu = int(envs["A"].get("FLANNEL_MTU") or mtu - UDP_OVERHEAD)
    c1, c2 = _containers(lab, topo, (nets[0], nets[1]), cmtu, bp.info)
    bp.client, bp.server, bp.target = c1, c2, str(c2.address)


def build(
    name: str,
    *,
    mtu: int,
    offloads: str,
    logs: Path,
    start_timeout: float = 30.0,
    reach_timeout: float = 15.0,
) -> BenchPath:
    """Build path ``name`` in a lab of its own and check container A reaches container B."""
    bp = BenchPath(name=name)
    lab: Lab | None = None
    try:
        lab = Lab()
        bp.lab = lab
        if name == "underlay":
            _underlay(lab, bp, mtu, offloads)
        elif name == "host-gw":
            _host_gw(lab, bp, mtu, offloads)
        elif name == "vxlan":
            _vxlan(lab, bp, mtu, offloads)
        elif name in ("flanneld-c", "flanneld-python"):
            engine = name.split("-", 1)[1]
            _flanneld(lab, bp, mtu, offloads, engine, logs, start_timeout)
        else:
            raise LabError(f"unknown path {name!r}")
        assert bp.client is not None
        if not _wait_reachable(bp.client, bp.target, reach_timeout):
            why = f"{bp.client.name} cannot ping {bp.target} after {reach_timeout:.0f}s"
            if bp.daemons:
                dead = bp.dead_daemon()
                tails = "\n".join(
                    f"--- host {t} ({f}):\n{_tail(Path(f), 8)}" for t, f in bp.log_files.items()
                )
                why = f"flanneld-py started but {why}" + (f"; {dead}" if dead else "")
                why += "\n" + tails
            raise LabError(why)
    except Exception as exc:  # any failure only costs this path: report it, measure the rest
        known = isinstance(exc, LabError | OSError)
        bp.error = str(exc) if known else f"{type(exc).__name__}: {exc}"
        if lab is not None:
            lab.close()
    except BaseException:
        if lab is not None:
            lab.close()
        raise
    return bp
