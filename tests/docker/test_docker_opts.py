"""The ``/run/flannel/docker`` reader of lab/docker.py: systemd EnvironmentFile= rules, then shell
word splitting (pure; no dockerd needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.docker import DockerLabError, docker_network_options, normalize_peer, parse_env_file

MK_DOCKER_OPTS = (
    'DOCKER_OPT_BIP="--bip=10.5.18.1/24"\n'
    'DOCKER_OPT_IPMASQ="--ip-masq=false"\n'
    'DOCKER_OPT_MTU="--mtu=1472"\n'
    'DOCKER_NETWORK_OPTIONS=" --bip=10.5.18.1/24 --ip-masq=false --mtu=1472"\n'
)


def test_mk_docker_opts_file(tmp_path: Path) -> None:
    env = parse_env_file(MK_DOCKER_OPTS)
    assert env == {
        "DOCKER_OPT_BIP": "--bip=10.5.18.1/24",
        "DOCKER_OPT_IPMASQ": "--ip-masq=false",
        "DOCKER_OPT_MTU": "--mtu=1472",
        "DOCKER_NETWORK_OPTIONS": " --bip=10.5.18.1/24 --ip-masq=false --mtu=1472",
    }
    f = tmp_path / "docker"
    f.write_text(MK_DOCKER_OPTS)
    assert docker_network_options(f) == ["--bip=10.5.18.1/24", "--ip-masq=false", "--mtu=1472"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A=1\n", {"A": "1"}),
        ("  A = 1  \n", {"A": "1"}),  # blanks around key and value dropped
        ("# c\n; c\n\nA=x\n", {"A": "x"}),  # comments and blank lines
        ("A='  a b '\n", {"A": "  a b "}),  # single quotes: literal, blanks kept
        ('A="a \\"b\\" \\\\ \\$x"\n', {"A": 'a "b" \\ $x'}),  # double-quote escapes
        ('A=pre"mid"post\n', {"A": "premidpost"}),  # quoted part inside a word
        ("A=a\\ b\n", {"A": "a b"}),  # backslash outside quotes
        ("A=a \\\n b\n", {"A": "a  b"}),  # continuation line
        ("not an assignment\n1X=2\nB=3\n", {"B": "3"}),  # invalid lines skipped
        ("A=1\nA=2\n", {"A": "2"}),  # last one wins
        ("A=\n", {"A": ""}),
    ],
)
def test_environment_file_rules(text: str, expected: dict[str, str]) -> None:
    assert parse_env_file(text) == expected


def test_shell_splitting_and_errors(tmp_path: Path) -> None:
    f = tmp_path / "docker"
    f.write_text("DOCKER_NETWORK_OPTIONS='--bip=10.5.1.1/24  --label \"a b\"'\n")
    assert docker_network_options(f) == ["--bip=10.5.1.1/24", "--label", "a b"]
    f.write_text("DOCKER_OPT_BIP=x\n")
    with pytest.raises(DockerLabError, match="has no DOCKER_NETWORK_OPTIONS= line"):
        docker_network_options(f)
    with pytest.raises(DockerLabError, match="cannot read"):
        docker_network_options(tmp_path / "missing")
    f.write_text('DOCKER_NETWORK_OPTIONS="--bip\n')
    with pytest.raises(DockerLabError, match="unterminated"):
        docker_network_options(f)


@pytest.mark.parametrize(
    "text", ["10.5.1.2\n", "[::ffff:10.5.1.2]\n", "::ffff:10.5.1.2", "x\n10.5.1.2\n"]
)
def test_normalize_peer(text: str) -> None:
    assert normalize_peer(text) == "10.5.1.2"
