"""The Docker-era flannel walkthrough (CentOS 7, flannel 0.7 on etcd's v2 API), word for word:

    etcdctl mk /atomic.io/network/config '{"Network":"192.168.0.0/16"}'       # v2 API
    /etc/sysconfig/flanneld: FLANNEL_ETCD_ENDPOINTS=..., FLANNEL_ETCD_PREFIX="/atomic.io/network"

then two hosts whose docker reads /run/flannel/docker, and a move of the same cluster to etcd's
v3 API with ``flanneld-py migrate-etcd`` in which every host keeps its subnet.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from ipaddress import IPv4Network

from lab.flanneld import ROOT, FlannelCluster, Flanneld
from lab.netns import Lab, Netns
from tests.conftest import require

PREFIX = "/atomic.io/network"
SEED_CONFIG = '{"Network":"192.168.0.0/16"}'


class SysconfigFlanneld(Flanneld):
    """flanneld-py started as the CentOS unit starts flanneld: endpoints and prefix from
    /etc/sysconfig/flanneld's variables, not from flags."""

    def __init__(self, lab: Lab, ns: Netns, endpoints: Sequence[str], **kw: object) -> None:
        super().__init__(lab, ns, endpoints, etcd_prefix=PREFIX, **kw)  # type: ignore[arg-type]

    def argv(self) -> list[str]:
        argv = super().argv()
        for flag in ("--etcd-endpoints", "--etcd-prefix"):
            i = argv.index(flag)
            del argv[i : i + 2]
        return argv

    def start(self, wait: bool = True, timeout: float | None = None) -> Flanneld:
        self.env.update(
            FLANNEL_ETCD_ENDPOINTS=",".join(self.etcd_endpoints), FLANNEL_ETCD_PREFIX=PREFIX
        )
        return super().start(wait, timeout)


def test_seed_walkthrough_on_etcd_v2_then_migrated_to_v3() -> None:
    require("netns", "etcd")
    with Lab() as lab:
        cl = FlannelCluster(lab, n_hosts=2, config=None)
        cl.etcd.enable_v2 = True
        cl.hosts = [SysconfigFlanneld(lab, ns, [cl.etcd.endpoint]) for ns in cl.topo.hosts]
        cl.start_etcd()
        cl.etcd.etcdctl_v2("mk", f"{PREFIX}/config", SEED_CONFIG)
        cl.start_daemons()
        h1 = cl.hosts[0]
        for h in cl.hosts:
            assert "--etcd-endpoints" not in h.argv() and "--etcd-prefix" not in h.argv()
            assert "network config found in the etcd v2 keyspace" in h.log_text(), h.log_tail()
            sn = h.subnet
            assert sn.subnet_of(IPv4Network("192.168.0.0/16"))
            assert h.docker_opts_file is not None
            # the seed's /run/flannel/docker, line for line
            assert h.docker_opts_file.read_text() == (
                f'DOCKER_OPT_BIP="--bip={sn.network_address + 1}/24"\n'
                'DOCKER_OPT_IPMASQ="--ip-masq=true"\n'
                'DOCKER_OPT_MTU="--mtu=1472"\n'
                f'DOCKER_NETWORK_OPTIONS=" --bip={sn.network_address + 1}/24 --ip-masq=true '
                '--mtu=1472"\n'
            )
            assert h.status()["etcd"]["api"] == "v2"
        # the leases live in the v2 keyspace only
        v2_keys = cl.etcd.etcdctl_v2("ls", f"{PREFIX}/subnets").split()
        assert sorted(v2_keys) == sorted(
            f"{PREFIX}/subnets/{h.subnet.network_address}-24" for h in cl.hosts
        )
        assert cl.etcdctl("get", "--prefix", "/") == ""
        cl.wait_peers(1)
        c1, c2 = cl.add_container(0), cl.add_container(1)
        assert c1.ping(c2.address, count=2, timeout=2)
        assert c2.ping(c1.address, count=2, timeout=2)

        # the way forward: copy config and leases into v3, then run the hosts on v3
        subnets = {h.ns.name: h.subnet for h in cl.hosts}
        argv = ["env", f"PYTHONPATH={ROOT}", sys.executable, "-m", "flanneld_py",
                "migrate-etcd", "--from", "v2", "--to", "v3",
                "--etcd-endpoints", cl.etcd.endpoint, "--etcd-prefix", PREFIX]  # fmt: skip
        dry = h1.ns.run([*argv, "--dry-run"])
        assert cl.etcdctl("get", "--prefix", "/") == ""  # --dry-run writes nothing
        assert f"{PREFIX}/config" in dry.stdout
        h1.ns.run(argv)
        v3 = cl.etcdctl("get", "--prefix", PREFIX).splitlines()
        v3_map = dict(zip(v3[0::2], v3[1::2], strict=True))
        assert v3_map[f"{PREFIX}/config"] == SEED_CONFIG
        for h in cl.hosts:
            value = json.loads(v3_map[f"{PREFIX}/subnets/{h.subnet.network_address}-24"])
            assert value["PublicIP"] == str(h.ns.address)
        for h in cl.hosts:
            h.stop()
            h.extra_args = ["--etcd-api", "v3"]
            h.subnet_file.unlink()  # only the migrated lease (same PublicIP) can give it back
        cl.start_daemons()
        for h in cl.hosts:
            assert h.subnet == subnets[h.ns.name]
            assert h.status()["etcd"]["api"] == "v3"
        cl.wait_peers(1)
        assert c1.ping(c2.address, count=2, timeout=2)
        assert c2.ping(c1.address, count=2, timeout=2)
