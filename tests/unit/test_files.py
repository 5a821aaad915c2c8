"""subnet.env and the docker options file: exact texts, atomic writes, the previous lease."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from flanneld_py.files import (
    docker_opts_text,
    read_previous_network,
    read_previous_subnet,
    read_subnet_env,
    subnet_env_text,
    write_atomic,
)

NET = IPv4Network("10.5.0.0/16")
SUB = IPv4Network("10.5.18.0/24")


def test_subnet_env_text_is_flannels() -> None:
    assert subnet_env_text(NET, SUB, 1472, True) == (
        "FLANNEL_NETWORK=10.5.0.0/16\n"
        "FLANNEL_SUBNET=10.5.18.1/24\n"
        "FLANNEL_MTU=1472\n"
        "FLANNEL_IPMASQ=true\n"
    )


def test_subnet_env_text_other_values() -> None:
    text = subnet_env_text(IPv4Network("172.16.0.0/12"), IPv4Network("172.17.4.0/22"), 8972, False)
    assert text.splitlines() == [
        "FLANNEL_NETWORK=172.16.0.0/12",
        "FLANNEL_SUBNET=172.17.4.1/22",
        "FLANNEL_MTU=8972",
        "FLANNEL_IPMASQ=false",
    ]


def test_subnet_outside_network_is_refused() -> None:
    with pytest.raises(ValueError, match="not inside"):
        subnet_env_text(NET, IPv4Network("10.6.0.0/24"), 1472, True)
    with pytest.raises(ValueError, match="not inside"):
        docker_opts_text(NET, IPv4Network("10.6.0.0/24"), 1472, True)


def test_docker_opts_text_with_ip_masq_matches_mk_docker_opts() -> None:
    # mk-docker-opts.sh -k DOCKER_NETWORK_OPTIONS -d /run/flannel/docker, byte for byte
    assert docker_opts_text(NET, SUB, 1472, True) == (
        'DOCKER_OPT_BIP="--bip=10.5.18.1/24"\n'
        'DOCKER_OPT_IPMASQ="--ip-masq=false"\n'
        'DOCKER_OPT_MTU="--mtu=1472"\n'
        'DOCKER_NETWORK_OPTIONS=" --bip=10.5.18.1/24 --ip-masq=false --mtu=1472"\n'
    )


def test_docker_opts_text_without_ip_masq_lets_docker_masquerade() -> None:
    assert docker_opts_text(NET, SUB, 8972, False) == (
        'DOCKER_OPT_BIP="--bip=10.5.18.1/24"\n'
        'DOCKER_OPT_IPMASQ="--ip-masq=true"\n'
        'DOCKER_OPT_MTU="--mtu=8972"\n'
        'DOCKER_NETWORK_OPTIONS=" --bip=10.5.18.1/24 --ip-masq=true --mtu=8972"\n'
    )


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX shell")
def test_docker_opts_file_sources_into_separate_dockerd_arguments(tmp_path: Path) -> None:
    f = tmp_path / "docker"
    f.write_text(docker_opts_text(NET, SUB, 1472, True))
    out = subprocess.run(
        ["sh", "-c", f'. "{f}"; for a in $DOCKER_NETWORK_OPTIONS; do echo "$a"; done'],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    ).stdout
    assert out.splitlines() == ["--bip=10.5.18.1/24", "--ip-masq=false", "--mtu=1472"]


def test_write_atomic_creates_parent_and_sets_mode(tmp_path: Path) -> None:
    target = tmp_path / "run" / "flannel" / "subnet.env"
    old = os.umask(0o077)
    try:
        write_atomic(target, "A=1\n")
    finally:
        os.umask(old)
    assert target.read_text() == "A=1\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert target.parent.is_dir()
    assert os.listdir(target.parent) == ["subnet.env"]  # no temp file left


def test_write_atomic_replaces_and_honours_mode(tmp_path: Path) -> None:
    target = tmp_path / "docker"
    target.write_text("old contents that are longer\n")
    write_atomic(str(target), "new\n", mode=0o600)
    assert target.read_text() == "new\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["docker"]


def test_write_atomic_keeps_old_file_for_readers_holding_it(tmp_path: Path) -> None:
    target = tmp_path / "subnet.env"
    target.write_text("FLANNEL_SUBNET=10.5.1.1/24\n")
    with open(target) as held:
        write_atomic(target, "FLANNEL_SUBNET=10.5.2.1/24\n")
        assert held.read() == "FLANNEL_SUBNET=10.5.1.1/24\n"  # rename, not rewrite in place
    assert target.read_text() == "FLANNEL_SUBNET=10.5.2.1/24\n"


def test_write_atomic_failure_is_one_line_oserror(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(OSError) as err:
        write_atomic(blocker / "subnet.env", "x\n")
    msg = str(err.value)
    assert msg.startswith(f"cannot write {blocker / 'subnet.env'}: ")
    assert "\n" not in msg


def test_write_atomic_onto_a_directory_fails_cleanly(tmp_path: Path) -> None:
    target = tmp_path / "subnet.env"
    target.mkdir()
    with pytest.raises(OSError, match=r"cannot write .*subnet\.env: "):
        write_atomic(target, "x\n")
    assert sorted(os.listdir(tmp_path)) == ["subnet.env"]  # temp file removed


def test_read_previous_subnet_roundtrip(tmp_path: Path) -> None:
    f = tmp_path / "subnet.env"
    write_atomic(f, subnet_env_text(NET, SUB, 1472, True))
    assert read_previous_subnet(f) == SUB
    assert read_previous_network(f) == NET
    assert read_subnet_env(f) == {
        "FLANNEL_NETWORK": "10.5.0.0/16",
        "FLANNEL_SUBNET": "10.5.18.1/24",
        "FLANNEL_MTU": "1472",
        "FLANNEL_IPMASQ": "true",
    }


def test_read_previous_subnet_tolerates_hand_edits(tmp_path: Path) -> None:
    f = tmp_path / "subnet.env"
    f.write_text('# written by flanneld\n\nexport FLANNEL_SUBNET="10.5.7.1/24"\nJUNK\n')
    assert read_previous_subnet(f) == IPv4Network("10.5.7.0/24")
    f.write_text("FLANNEL_SUBNET='10.5.8.1/24'\r\n")
    assert read_previous_subnet(f) == IPv4Network("10.5.8.0/24")


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"FLANNEL_NETWORK=10.5.0.0/16\n",
        b"FLANNEL_SUBNET=\n",
        b"FLANNEL_SUBNET=10.5.18.1\n",
        b"FLANNEL_SUBNET=10.5.18.1/33\n",
        b"FLANNEL_SUBNET=fd00::1/64\n",
        b"FLANNEL_SUBNET=banana/24\n",
        b"\xff\xfe\x00garbage\x00",
        b"FLANNEL_SUBNET=10.5.18.1/24" + b"#" * 70000,
    ],
)
def test_read_previous_subnet_garbled_is_none(tmp_path: Path, content: bytes) -> None:
    f = tmp_path / "subnet.env"
    f.write_bytes(content)
    assert read_previous_subnet(f) is None


def test_read_previous_subnet_missing_or_unreadable_is_none(tmp_path: Path) -> None:
    assert read_previous_subnet(tmp_path / "nope") is None
    assert read_previous_subnet(tmp_path) is None  # a directory
    assert read_subnet_env(tmp_path / "nope") == {}
