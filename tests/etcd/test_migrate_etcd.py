"""``flanneld-py migrate-etcd`` end to end, as a process, against a real etcd with both keyspaces:
a v2 cluster's config, three leases with TTLs and a reservation, copied to v3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from lab.etcd import EtcdServer, make_tls

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "/coreos.com/network"
P = PREFIX + "/subnets/"
CONFIG = '{"Network": "10.6.0.0/16", "Backend": {"Type": "vxlan"}}'
LEASES = {
    P + "10.6.1.0-24": ('{"PublicIP":"10.99.0.1"}', 86400),
    P + "10.6.2.0-24": ('{"PublicIP":"10.99.0.2","PublicIPv6":null}', 600),
    P + "10.6.3.0-24": (
        '{"PublicIP":"10.99.0.3","BackendType":"vxlan","BackendData":{"VNI":1,'
        '"VtepMAC":"aa:bb:cc:dd:ee:03"}}',
        300,
    ),
}
RESERVED = P + "10.6.9.0-24"
RESERVED_VALUE = '{"PublicIP":"10.99.0.9"}'
KEYS = [PREFIX + "/config", *LEASES, RESERVED]


def migrate(server: EtcdServer, *flags: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLANNELD_", "FLANNEL_"))}
    return subprocess.run(
        [
            sys.executable, "-m", "flanneld_py", "migrate-etcd", "--from", "v2", "--to=v3",
            f"--etcd-endpoints={server.endpoint}", *flags,
        ],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=60,
    )  # fmt: skip


def v3_value(server: EtcdServer, key: str) -> str:
    return server.etcdctl("get", key, "--print-value-only").removesuffix("\n")


def v3_lease_ttl(server: EtcdServer, key: str) -> int | None:
    """The remaining TTL of the v3 lease the key is attached to (None: no lease)."""
    kvs = json.loads(server.etcdctl("get", key, "-w", "json"))["kvs"]
    lease = int(kvs[0].get("lease", 0))
    if not lease:
        return None
    out = json.loads(server.etcdctl("lease", "timetolive", f"{lease:x}", "-w", "json"))
    return int(out["ttl"])


@pytest.fixture
def v2_cluster(etcd_factory: Callable[..., EtcdServer]) -> EtcdServer:
    server = etcd_factory(enable_v2=True)
    server.etcdctl_v2("set", PREFIX + "/config", CONFIG)
    for key, (value, ttl) in LEASES.items():
        server.etcdctl_v2("set", "--ttl", str(ttl), key, value)
    server.etcdctl_v2("set", RESERVED, RESERVED_VALUE)  # a reservation: no TTL
    return server


def test_migrate_v2_cluster_to_v3(v2_cluster: EtcdServer) -> None:
    server = v2_cluster
    # dry run: one line per key, nothing written
    res = migrate(server, "--dry-run")
    assert (res.returncode, res.stderr) == (0, ""), res
    lines = res.stdout.splitlines()
    assert len(lines) == 6 and all(line.startswith("would write ") for line in lines[:5])
    assert lines[-1].startswith("dry run: would copy 5 keys") and "nothing written" in lines[-1]
    assert server.etcdctl("get", "--prefix", "/") == ""
    # the migration
    res = migrate(server)
    assert (res.returncode, res.stderr) == (0, ""), res
    assert res.stdout.splitlines()[-1] == (
        f"copied 5 keys from etcd's v2 to its v3 keyspace under {PREFIX} "
        "(3 with a lease, 2 without; 0 identical, skipped)"
    )
    for key in KEYS:
        assert v3_value(server, key) == server.etcdctl_v2("get", key).removesuffix("\n"), key
    assert v3_value(server, PREFIX + "/config") == CONFIG
    for key in LEASES:
        node = server.v2_node(key)
        assert node is not None
        v2_ttl = int(node["ttl"])  # type: ignore[call-overload]
        v3_ttl = v3_lease_ttl(server, key)
        assert v3_ttl is not None and abs(v3_ttl - v2_ttl) <= 3, (key, v2_ttl, v3_ttl)
    assert v3_lease_ttl(server, RESERVED) is None
    assert v3_lease_ttl(server, PREFIX + "/config") is None
    # again: all identical, nothing written
    rev = server.revision()
    res = migrate(server)
    assert res.returncode == 0, res
    assert res.stdout.splitlines()[:-1] == [f"identical in v3, skipped: {k}" for k in KEYS]
    assert "nothing to copy: all 5 keys" in res.stdout.splitlines()[-1]
    assert server.revision() == rev
    # a v3 key with another value: refused, unless --force
    key2 = P + "10.6.2.0-24"
    server.etcdctl("put", key2, '{"PublicIP":"10.99.0.42"}')
    rev = server.revision()
    res = migrate(server)
    assert res.returncode == 1, res
    out = res.stdout.splitlines()
    assert out[0].startswith(f"conflict: {key2} exists in v3 with a different value")
    assert out[1].startswith("refused: 1 key under") and "--force" in out[1] and len(out) == 2
    assert server.revision() == rev and v3_value(server, key2) == '{"PublicIP":"10.99.0.42"}'
    res = migrate(server, "--force")
    assert res.returncode == 0, res
    assert any(line.startswith(f"overwrote {key2} (v3 had ") for line in res.stdout.splitlines())
    assert v3_value(server, key2) == LEASES[key2][0]
    assert v3_lease_ttl(server, key2) is not None
    # the v2 keyspace is left as it was
    assert server.etcdctl_v2("get", key2).strip() == LEASES[key2][0]


def test_migrate_over_tls_and_errors(
    etcd_factory: Callable[..., EtcdServer], tmp_path: Path
) -> None:
    tls = make_tls(tmp_path / "tls")
    server = etcd_factory(tls=tls, enable_v2=True)
    server.etcdctl_v2("set", PREFIX + "/config", CONFIG)
    certs = [
        f"--etcd-cafile={tls.ca}",
        f"--etcd-certfile={tls.client_cert}",
        f"--etcd-keyfile={tls.client_key}",
    ]
    res = migrate(server, *certs)
    assert res.returncode == 0, res
    assert v3_value(server, PREFIX + "/config") == CONFIG
    # without the client certificate: one line on stderr, exit 1
    res = migrate(server, f"--etcd-cafile={tls.ca}")
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.startswith("flanneld-py migrate-etcd: TLS: ") and res.stderr.count("\n") == 1


def test_migrate_from_a_server_without_v2(etcd_server: EtcdServer) -> None:
    res = migrate(etcd_server)
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr == (
        f"flanneld-py migrate-etcd: etcd at {etcd_server.endpoint} does not serve the v2 API "
        "(etcd 3.4 needs --enable-v2=true; 3.6 has no v2): use --etcd-api=v3, or enable v2\n"
    )
