"""The paths under test: each one is its own :class:`lab.netns.Lab` (two hosts on an underlay,
containers on docker0-like bridges) with one way of getting container A's packets to container B.

``build(name, ...)`` returns a :class:`BenchPath`; a path that cannot be built comes back with
``error`` set (its lab already closed), so the bench reports it and carries on with the others.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from lab.flanneld import (
    DEFAULT_CONFIG,
    FlannelCluster,
    Flanneld,
    FlanneldNotReady,
    network_config,
)
from lab.netns import Lab, LabError, Netns, Topology

__all__ = [
    "OFFLOAD_FEATURES",
    "PATHS",
    "PATH_TITLES",
    "REFERENCE",
    "BenchPath",
    "build",
]

PATHS = (
    "underlay",
    "host-gw",
    "vxlan",
    "flanneld-vxlan",
    "flanneld-host-gw",
    "flanneld-c",
    "flanneld-c-batched",
    "flanneld-c-1thread",
    "flanneld-python",
)
REFERENCE = "vxlan"
PATH_TITLES = {
    "underlay": "bare underlay, host to host, no overlay",
    "host-gw": "plain routes (host-gw)",
    "vxlan": "kernel VXLAN (the reference)",
    "flanneld-vxlan": "flanneld-py vxlan backend (the kernel's VXLAN, set up by flanneld-py)",
    "flanneld-host-gw": "flanneld-py host-gw backend (plain routes, set up by flanneld-py)",
    "flanneld-c": "flanneld-py UDP backend, C engine (segmentation offloads: --offload auto; "
    "--engine-threads 0: one thread per CPU)",
    "flanneld-c-batched": "flanneld-py UDP backend, C engine, batched only (--offload off)",
    "flanneld-c-1thread": "flanneld-py UDP backend, C engine, one thread (--engine-threads 1)",
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
    #: flanneld-py daemons, "A" (sender host) and "B" (receiver host)
    daemons: dict[str, Flanneld] = field(default_factory=dict)
    #: everything worth recording about the setup (addresses, MTUs, offload state, ...)
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def log_files(self) -> dict[str, str]:
        return {k: str(d.log_path) for k, d in self.daemons.items()}

    def daemon_pids(self) -> dict[str, int]:
        return {k: d.pid for k, d in self.daemons.items() if d.pid is not None}

    def dead_daemon(self) -> str | None:
        """A one-line reason if a flanneld-py process of this path has exited."""
        for host, d in self.daemons.items():
            if d.returncode is not None:
                return f"flanneld-py on host {host} exited (rc={d.returncode}): " + d.log_tail(
                    8
                ).replace("\n", " | ")
        return None


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


def _flanneld(
    lab: Lab,
    bp: BenchPath,
    mtu: int,
    offloads: str,
    engine: str,
    logs: Path,
    start_timeout: float,
    extra_args: tuple[str, ...] = (),
    config: str = DEFAULT_CONFIG,
) -> None:
    topo = _topology(lab, mtu, offloads, bp.info)
    cl: FlannelCluster | None = None
    etcd_log = logs / f"{bp.name}-etcd.log"

    def keep_etcd_log() -> None:  # runs after the cluster's etcd was closed (registered before)
        if cl is not None:
            with contextlib.suppress(OSError):
                shutil.copyfile(cl.etcd.log_path, etcd_log)

    lab.defer("etcd log", keep_etcd_log)
    cl = FlannelCluster(
        lab,
        topology=topo,
        config=config,
        engines=[engine, engine],
        extra_args=list(extra_args),
        healthz=False,  # ready = subnet file written; nothing polls the daemons while measuring
        docker_opts=False,
        log_paths=[logs / f"{bp.name}-host{tag}-flanneld.log" for tag in ("A", "B")],
    )
    cl.start_etcd()
    bp.info["etcd"] = cl.etcd.endpoint
    bp.info["flannel_config"] = config
    bp.daemons = dict(zip(("A", "B"), cl.hosts, strict=True))
    bp.info["daemon_argv"] = cl.hosts[0].argv()
    try:
        cl.start_daemons(start_timeout)
    except FlanneldNotReady as exc:
        raise LabError(f"flanneld-py failed to start: {exc}") from None
    envs = {tag: d.subnet_env() for tag, d in bp.daemons.items()}
    bp.info["subnet_env"] = envs
    nets = tuple(str(d.subnet) for d in cl.hosts)
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
        elif name in ("flanneld-vxlan", "flanneld-host-gw"):
            backend = name.split("-", 1)[1]
            _flanneld(lab, bp, mtu, offloads, "c", logs, start_timeout,
                      config=network_config(backend=backend))  # fmt: skip
        elif name == "flanneld-c-batched":
            _flanneld(lab, bp, mtu, offloads, "c", logs, start_timeout, ("--offload", "off"))
        elif name == "flanneld-c-1thread":
            _flanneld(lab, bp, mtu, offloads, "c", logs, start_timeout, ("--engine-threads", "1"))
        else:
            raise LabError(f"unknown path {name!r}")
        assert bp.client is not None
        if not _wait_reachable(bp.client, bp.target, reach_timeout):
            why = f"{bp.client.name} cannot ping {bp.target} after {reach_timeout:.0f}s"
            if bp.daemons:
                dead = bp.dead_daemon()
                tails = "\n".join(
                    f"--- host {t} ({d.log_path}):\n{d.log_tail(8)}" for t, d in bp.daemons.items()
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
