"""A flanneld-py cluster in network namespaces: etcd on the underlay, one daemon per host.

Used by the netns tests, the docker tests, bench/ and the demo::

    with Lab() as lab:
        cl = FlannelCluster(lab, n_hosts=3)
        cl.start()                      # etcd + config + one flanneld-py per host, all ready
        c1 = cl.add_container(0)         # a container namespace on host 0's lease
        cl.hosts[0].status()             # GET /status of that daemon
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path
from subprocess import Popen
from typing import Any

from lab.etcd import EtcdServer
from lab.netns import Container, Lab, LabError, Netns, Topology

__all__ = ["DEFAULT_CONFIG", "HEALTHZ_PORT", "PREFIX", "FlannelCluster", "FlannelHost"]

PREFIX = "/coreos.com/network"
DEFAULT_CONFIG = '{"Network": "10.5.0.0/16", "Backend": {"Type": "udp"}}'
HEALTHZ_PORT = 8471


def read_env_file(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            out[k] = v.strip('"')
    return out


@dataclass
class FlannelHost:
    """One host namespace running (or ready to run) flanneld-py."""

    ns: Netns
    dir: Path
    etcd_endpoint: str
    engine: str = "auto"
    extra_args: list[str] = field(default_factory=list)
    proc: Popen[bytes] | None = None
    runs: int = 0

    @property
    def subnet_file(self) -> Path:
        return self.dir / "subnet.env"

    @property
    def docker_file(self) -> Path:
        return self.dir / "docker"

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "flanneld_py",
            "--etcd-endpoints",
            self.etcd_endpoint,
            "--iface",
            "eth0",
            "--subnet-file",
            str(self.subnet_file),
            "--docker-opts-file",
            str(self.docker_file),
            "--healthz-ip",
            "127.0.0.1",
            "--healthz-port",
            str(HEALTHZ_PORT),
            "--engine",
            self.engine,
            *self.extra_args,
        ]

    def start(self, wait: bool = True, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise LabError(f"flanneld-py already running in {self.ns.name}")
        self.runs += 1
        log = self.dir / f"flanneld-{self.runs}.log"
        self.proc = self.ns.popen(self.argv(), log_path=log)
        if wait:
            self.wait_ready(timeout)

    @property
    def log_path(self) -> Path:
        return self.dir / f"flanneld-{self.runs}.log"

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise LabError(
                    f"flanneld-py in {self.ns.name} exited with {self.proc.returncode}:\n"
                    + self.log_tail()
                )
            if self.healthz()[0] == 200:
                return
            time.sleep(0.1)
        raise LabError(
            f"flanneld-py in {self.ns.name} not ready after {timeout}s:\n" + self.log_tail()
        )

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM (then SIGKILL) by PID; returns the exit status."""
        assert self.proc is not None
        self.ns.lab.stop(self.proc, timeout)
        return self.proc.returncode

    def _get(self, path: str) -> tuple[int, str]:
        # the daemon lives in the host namespace: ask from inside it
        code = (
            "import sys,urllib.request,urllib.error\n"
            f"u='http://127.0.0.1:{HEALTHZ_PORT}{path}'\n"
            "try:\n r=urllib.request.urlopen(u,timeout=2)\n"
            " print(r.status); sys.stdout.write(r.read().decode())\n"
            "except urllib.error.HTTPError as e: print(e.code); sys.stdout.write(e.read().decode())\n"
            "except OSError as e: print(0); print(e)\n"
        )
        out = self.ns.run([sys.executable, "-c", code], check=False, timeout=15).stdout
        status, _, body = out.partition("\n")
        return int(status or 0), body

    def healthz(self) -> tuple[int, str]:
        return self._get("/healthz")

    def status(self) -> dict[str, Any]:
        code, body = self._get("/status")
        if code != 200:
            raise LabError(f"/status of {self.ns.name} answered {code}: {body}")
        doc: dict[str, Any] = json.loads(body)
        return doc

    @property
    def subnet(self) -> IPv4Network:
        """The leased subnet, from the subnet file the daemon wrote."""
        env = read_env_file(self.subnet_file)
        return IPv4Interface(env["FLANNEL_SUBNET"]).network


class FlannelCluster:
    """etcd in the underlay namespace + ``n_hosts`` host namespaces running flanneld-py."""

    def __init__(
        self,
        lab: Lab,
        n_hosts: int = 2,
        *,
        engines: Sequence[str] | None = None,
        config: str = DEFAULT_CONFIG,
        extra_args: Sequence[str] = (),
        mtu: int = 1500,
        topology: Topology | None = None,
    ) -> None:
        self.lab = lab
        self.topo = topology or lab.flannel_topology(n_hosts=n_hosts, mtu=mtu)
        self.etcd = EtcdServer(ip=str(self.topo.etcd_address), netns=self.topo.underlay.name)
        lab.defer("etcd", self.etcd.close)
        self.config = config
        engines = list(engines or ["auto"] * len(self.topo.hosts))
        self.hosts: list[FlannelHost] = []
        for i, ns in enumerate(self.topo.hosts):
            d = lab.tmpdir / f"host{i}"
            d.mkdir(parents=True, exist_ok=True)
            self.hosts.append(FlannelHost(ns, d, self.etcd.endpoint, engines[i], list(extra_args)))

    def start(self, timeout: float = 30.0) -> FlannelCluster:
        self.etcd.start()
        if self.config:
            self.etcdctl("put", f"{PREFIX}/config", self.config)
        for h in self.hosts:
            h.start(wait=False)
        for h in self.hosts:
            h.wait_ready(timeout)
        return self

    def etcdctl(self, *args: str) -> str:
        return self.etcd.etcdctl(*args)

    def leases(self) -> dict[str, dict[str, Any]]:
        """``{key: value}`` of everything under ``<prefix>/subnets/``."""
        out = self.etcdctl("get", "--prefix", f"{PREFIX}/subnets/")
        lines = out.splitlines()
        return {k: json.loads(v) for k, v in zip(lines[0::2], lines[1::2], strict=True)}

    def add_container(self, i: int, address: str | None = None) -> Container:
        """A container namespace on a bridge holding host ``i``'s leased subnet (like docker0)."""
        h = self.hosts[i]
        return self.lab.add_container_bridge(h.ns, h.subnet, address=address)

    def wait_peers(self, expected: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            counts = [
                len(h.status()["peers"]) for h in self.hosts if h.proc and h.proc.poll() is None
            ]
            if all(c == expected for c in counts):
                return
            if time.monotonic() > deadline:
                raise LabError(f"peers {counts}, expected {expected} each")
            time.sleep(0.1)
