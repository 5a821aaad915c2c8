"""Flags (Go syntax, flannel's names and defaults), FLANNELD_* variables, validation, main()."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flanneld_py import __version__, cli
from flanneld_py.cli import FLAGS, EarlyExit, UsageError, env_var, main, parse_args, usage_text
from flanneld_py.options import Options
from lab.etcd import TlsFiles, make_tls

ROOT = Path(__file__).resolve().parents[2]


def parse(*argv: str, **env: str) -> Options:
    return parse_args(list(argv), env)


def usage_error(*argv: str, **env: str) -> str:
    with pytest.raises(UsageError) as err:
        parse(*argv, **env)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# -- defaults and syntax -------------------------------------------------------------------------


def test_defaults_are_flannels() -> None:
    o = parse()
    assert o == Options()
    assert o.etcd_endpoints == ("http://127.0.0.1:4001", "http://127.0.0.1:2379")
    assert o.etcd_prefix == "/coreos.com/network"
    assert (o.etcd_keyfile, o.etcd_certfile, o.etcd_cafile) == (None, None, None)
    assert (o.etcd_username, o.etcd_password) == (None, None)
    assert (o.iface, o.iface_regex, o.public_ip) == ((), (), None)
    assert o.ip_masq is False
    assert o.subnet_file == "/run/flannel/subnet.env"
    assert o.docker_opts_file == "/run/flannel/docker"
    assert o.subnet_lease_renew_margin == 60
    assert (o.healthz_ip, o.healthz_port) == ("0.0.0.0", 0)
    assert (o.iptables_resync, o.iptables_forward_rules) == (5, True)
    assert (o.event_loop, o.engine, o.tun_name, o.log_level) == (
        "uvloop",
        "auto",
        "flannel0",
        "info",
    )
    assert (o.subnet_lease_ttl, o.config_poll_interval) == (86400, 1.0)
    assert not o.etcd_tls and not o.healthz_enabled


def test_every_options_field_has_exactly_one_flag() -> None:
    assert sorted(f.field for f in FLAGS) == sorted(f.name for f in dataclasses.fields(Options))


@pytest.mark.parametrize(
    "argv",
    [
        ["--etcd-prefix=/atomic.io/network"],
        ["-etcd-prefix=/atomic.io/network"],
        ["--etcd-prefix", "/atomic.io/network"],
        ["-etcd-prefix", "/atomic.io/network"],
        ["--etcd-prefix=/x", "--etcd-prefix=/atomic.io/network"],  # last one wins
    ],
)
def test_go_flag_syntax(argv: list[str]) -> None:
    assert parse(*argv).etcd_prefix == "/atomic.io/network"


def test_value_may_start_with_a_dash_or_contain_equals() -> None:
    assert parse("--etcd-password", "-secret=", "--etcd-username=u").etcd_password == "-secret="
    assert parse("--etcd-password=a=b", "--etcd-username=u").etcd_password == "a=b"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--ip-masq"], True),
        (["-ip-masq"], True),
        (["--ip-masq=true"], True),
        (["--ip-masq=1"], True),
        (["--ip-masq=T"], True),
        (["--ip-masq=TRUE"], True),
        (["--ip-masq=false"], False),
        (["--ip-masq=0"], False),
        (["--ip-masq=F"], False),
        (["--ip-masq", "--ip-masq=False"], False),
    ],
)
def test_bool_flags(argv: list[str], expected: bool) -> None:
    assert parse(*argv).ip_masq is expected


def test_bool_flag_default_true_can_be_turned_off() -> None:
    assert parse("--iptables-forward-rules=false").iptables_forward_rules is False
    assert parse("-iptables-forward-rules").iptables_forward_rules is True


def test_bool_flag_rejects_bad_values_and_separate_values() -> None:
    assert "use true or false" in usage_error("--ip-masq=yes")
    assert usage_error("--ip-masq", "false") == (
        "--ip-masq takes no separate value: write --ip-masq=false"
    )


def test_repeatable_iface_and_regex() -> None:
    o = parse("--iface", "eth0", "-iface=10.0.0.1", "--iface=eth1,eth2", "--iface-regex=^en.*")
    assert o.iface == ("eth0", "10.0.0.1", "eth1", "eth2")
    o = parse("--iface-regex=eth[0-9]{1,2}", "--iface-regex", "^wl")
    assert o.iface_regex == ("eth[0-9]{1,2}", "^wl")  # a regex is never split on commas


def test_syntax_errors() -> None:
    assert usage_error("--nope") == "flag provided but not defined: -nope (see --help)"
    assert usage_error("--kube-subnet-mgr").startswith("flag provided but not defined")
    assert usage_error("--etcd-prefix") == "flag needs an argument: --etcd-prefix"
    assert "unexpected argument 'eth0'" in usage_error("eth0")
    assert "unexpected argument 'x'" in usage_error("--", "x")
    assert usage_error("---ip-masq") == "bad flag syntax: ---ip-masq"
    assert usage_error("--=x") == "bad flag syntax: --=x"
    assert "unexpected argument '-'" in usage_error("-")
    assert parse("--ip-masq", "--").ip_masq is True


def test_help_and_version() -> None:
    for argv in (["-h"], ["--help"], ["-help"], ["--ip-masq", "--help", "--bogus"]):
        with pytest.raises(EarlyExit) as err:
            parse(*argv)
        assert err.value.text == usage_text()
    for argv in (["--version"], ["-version"], ["--version=true"]):
        with pytest.raises(EarlyExit) as err:
            parse(*argv, FLANNELD_HEALTHZ_PORT="garbage")  # env is not even looked at
        assert err.value.text == f"flanneld-py {__version__}\n"
    assert parse("--version=false") == Options()


def test_help_text_lists_every_visible_flag_with_its_default() -> None:
    text = usage_text()
    lines = text.splitlines()
    for flag in FLAGS:
        matching = [
            h
            for h in lines
            if h.startswith("  ") and h.split()[0].split("=")[0] == f"--{flag.name}"
        ]
        if flag.hidden:
            assert not matching, flag.name
        else:
            assert len(matching) == 1, flag.name
            assert "(default: " in matching[0]
    assert "http://127.0.0.1:4001,http://127.0.0.1:2379" in text
    assert "/run/flannel/subnet.env" in text and "/run/flannel/docker" in text
    assert "FLANNELD_" in text


# -- environment ---------------------------------------------------------------------------------


def test_env_var_names() -> None:
    assert env_var("etcd-endpoints") == "FLANNELD_ETCD_ENDPOINTS"
    assert env_var("subnet-lease-renew-margin") == "FLANNELD_SUBNET_LEASE_RENEW_MARGIN"


def test_every_flag_is_read_from_the_environment() -> None:
    env = {
        "FLANNELD_ETCD_ENDPOINTS": "http://10.0.0.1:2379,https://etcd.example:2379",
        "FLANNELD_ETCD_PREFIX": "/atomic.io/network",
        "FLANNELD_ETCD_USERNAME": "root",
        "FLANNELD_ETCD_PASSWORD": "pw",
        "FLANNELD_IFACE": "eth0, eth1",
        "FLANNELD_IFACE_REGEX": "eth[0-9]{1,2}",
        "FLANNELD_PUBLIC_IP": "10.99.0.1",
        "FLANNELD_IP_MASQ": "true",
        "FLANNELD_SUBNET_FILE": "/tmp/s.env",
        "FLANNELD_SUBNET_LEASE_RENEW_MARGIN": "30",
        "FLANNELD_HEALTHZ_IP": "127.0.0.1",
        "FLANNELD_HEALTHZ_PORT": "8471",
        "FLANNELD_IPTABLES_RESYNC": "10",
        "FLANNELD_IPTABLES_FORWARD_RULES": "false",
        "FLANNELD_DOCKER_OPTS_FILE": "/tmp/docker",
        "FLANNELD_EVENT_LOOP": "asyncio",
        "FLANNELD_ENGINE": "python",
        "FLANNELD_TUN_NAME": "flannel7",
        "FLANNELD_LOG_LEVEL": "DEBUG",
        "FLANNELD_SUBNET_LEASE_TTL": "30",
        "FLANNELD_CONFIG_POLL_INTERVAL": "0.1",
    }
    assert parse(**env) == Options(
        etcd_endpoints=("http://10.0.0.1:2379", "https://etcd.example:2379"),
        etcd_prefix="/atomic.io/network",
        etcd_username="root",
        etcd_password="pw",
        iface=("eth0", "eth1"),
        iface_regex=("eth[0-9]{1,2}",),
        public_ip="10.99.0.1",
        ip_masq=True,
        subnet_file="/tmp/s.env",
        subnet_lease_renew_margin=30,
        healthz_ip="127.0.0.1",
        healthz_port=8471,
        iptables_resync=10,
        iptables_forward_rules=False,
        docker_opts_file="/tmp/docker",
        event_loop="asyncio",
        engine="python",
        tun_name="flannel7",
        log_level="debug",
        subnet_lease_ttl=30,
        config_poll_interval=0.1,
    )


def test_command_line_beats_environment_and_empty_env_is_ignored() -> None:
    env = {"FLANNELD_IP_MASQ": "true", "FLANNELD_ETCD_PREFIX": "", "FLANNELD_IFACE": "eth9"}
    o = parse("--ip-masq=false", "--iface=eth0", **env)
    assert o.ip_masq is False
    assert o.iface == ("eth0",)  # not merged with the variable
    assert o.etcd_prefix == "/coreos.com/network"


def test_unrelated_variables_are_ignored() -> None:
    assert parse(FLANNELD_KUBE_SUBNET_MGR="true", FLANNELD_VERSION="true") == Options()


def test_bad_environment_value_names_the_variable() -> None:
    assert usage_error(FLANNELD_HEALTHZ_PORT="80a") == (
        "invalid value '80a' for FLANNELD_HEALTHZ_PORT: not an integer"
    )
    assert "FLANNELD_IP_MASQ" in usage_error(FLANNELD_IP_MASQ="on")


def test_docker_opts_file_empty_means_do_not_write() -> None:
    assert parse("--docker-opts-file=").docker_opts_file == ""
    assert parse("--docker-opts-file", "").docker_opts_file == ""


# -- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--subnet-lease-renew-margin=0"], "must be in 1..1439"),
        (["--subnet-lease-renew-margin=1440"], "must be in 1..1439"),
        (["--subnet-lease-renew-margin=1.5"], "not an integer"),
        (["--healthz-port=-1"], "must be in 0..65535"),
        (["--healthz-port=65536"], "must be in 0..65535"),
        (["--healthz-port=0x10"], "not an integer"),
        (["--iptables-resync=0"], "must be at least 1"),
        (["--subnet-lease-ttl=0"], "must be at least 1"),
        (["--config-poll-interval=0"], "must be in 0.001..3600"),
        (["--config-poll-interval=nan"], "not a finite number"),
        (["--config-poll-interval=soon"], "not a number"),
        (["--etcd-endpoints=127.0.0.1:2379"], "expected http(s)://host:port"),
        (["--etcd-endpoints=unix:///run/etcd.sock"], "expected http(s)://host:port"),
        (["--etcd-endpoints=ftp://h:2379"], "expected http(s)://host:port"),
        (["--etcd-endpoints=http://h"], "no port"),
        (["--etcd-endpoints=http://:2379"], "no host"),
        (["--etcd-endpoints=http://h:99999"], "expected http(s)://host:port"),
        (["--etcd-endpoints=http://h:2379/v3"], "only http(s)://host:port"),
        (["--etcd-endpoints=http://u:p@h:2379"], "only http(s)://host:port"),
        (["--etcd-endpoints=,"], "is empty"),
        (["--etcd-keyfile=/nonexistent/key.pem"], "no such file"),
        (["--public-ip=10.99.0"], "not an IPv4 address"),
        (["--public-ip=fd00::1"], "not an IPv4 address"),
        (["--public-ip=0.0.0.0"], "not a unicast address"),
        (["--public-ip=224.0.0.1"], "not a unicast address"),
        (["--healthz-ip=localhost"], "not an IP address"),
        (["--tun-name=a-very-long-tun-name"], "not a valid interface name"),
        (["--tun-name=flan/0"], "not a valid interface name"),
        (["--tun-name="], "must not be empty"),
        (["--subnet-file="], "must not be empty"),
        (["--etcd-prefix="], "must not be empty"),
        (["--event-loop=trio"], "choose one of uvloop, asyncio"),
        (["--engine=rust"], "choose one of auto, c, python"),
        (["--log-level=trace"], "choose one of debug, info, warning, error"),
        (["--iface-regex=eth[0-"], "bad regex"),
        (["--etcd-username=root"], "--etcd-username and --etcd-password must be given together"),
        (["--etcd-password=pw"], "--etcd-username and --etcd-password must be given together"),
    ],
)
def test_validation_errors(argv: list[str], fragment: str) -> None:
    assert fragment in usage_error(*argv)


def test_validation_boundaries_accepted() -> None:
    o = parse(
        "--subnet-lease-renew-margin=1",
        "--healthz-port=65535",
        "--iptables-resync=1",
        "--public-ip=10.99.0.1",
        "--healthz-ip=::1",
        "--tun-name=flannel%d",
        "--log-level=WARNING",
        "--etcd-endpoints= https://[fd00::1]:2379/ ,http://etcd-0.example:2379,",
    )
    assert o.subnet_lease_renew_margin == 1 and o.healthz_port == 65535
    assert o.log_level == "warning" and o.healthz_enabled
    assert o.etcd_endpoints == ("https://[fd00::1]:2379", "http://etcd-0.example:2379")
    assert parse("--subnet-lease-renew-margin=1439").subnet_lease_renew_margin == 1439


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A CA and a client certificate + key signed by it (openssl)."""
    return make_tls(tmp_path_factory.mktemp("tls"))


def test_tls_files_must_exist_and_come_in_pairs(tmp_path: Path, tls: TlsFiles) -> None:
    key, cert, ca = tls.client_key, tls.client_cert, tls.ca
    msg = usage_error(f"--etcd-keyfile={key}")
    assert msg == "--etcd-keyfile and --etcd-certfile must be given together"
    assert "together" in usage_error(f"--etcd-certfile={cert}")
    o = parse(
        f"--etcd-keyfile={key}",
        f"--etcd-certfile={cert}",
        f"--etcd-cafile={ca}",
        "--etcd-endpoints=https://10.0.0.1:2379",
    )
    assert (o.etcd_keyfile, o.etcd_certfile, o.etcd_cafile) == (str(key), str(cert), str(ca))
    assert o.etcd_tls
    assert "no such file" in usage_error(f"--etcd-cafile={tmp_path / 'missing.pem'}")
    assert "no such file" in usage_error(f"--etcd-cafile={tmp_path}")  # a directory


def test_tls_files_are_checked_when_the_options_are_parsed(tmp_path: Path, tls: TlsFiles) -> None:
    key, cert, ca = str(tls.client_key), str(tls.client_cert), str(tls.ca)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    other = make_tls(tmp_path / "other")
    https = "--etcd-endpoints=https://10.0.0.1:2379"
    assert usage_error(https, f"--etcd-cafile={garbage}") == (
        f"--etcd-cafile {garbage}: not a PEM certificate bundle"
    )
    assert usage_error(https, f"--etcd-cafile={key}") == (
        f"--etcd-cafile {key}: not a PEM certificate bundle (it holds a private key)"
    )
    assert usage_error(https, f"--etcd-certfile={key}", f"--etcd-keyfile={cert}") == (
        f"--etcd-certfile/--etcd-keyfile are swapped: --etcd-certfile {key} holds a private key "
        f"and --etcd-keyfile {cert} a certificate (--etcd-certfile takes the certificate, "
        "--etcd-keyfile the key)"
    )
    other_key = str(other.client_key)
    assert usage_error(https, f"--etcd-certfile={cert}", f"--etcd-keyfile={other_key}") == (
        "--etcd-certfile/--etcd-keyfile: the key does not match the certificate "
        f"({other_key} is not the private key of {cert})"
    )
    # from the environment alike
    assert usage_error(FLANNELD_ETCD_CAFILE=str(garbage)) == (
        f"--etcd-cafile {garbage}: not a PEM certificate bundle"
    )
    # a valid CA alone, or a valid pair alone, is fine
    assert parse(f"--etcd-cafile={ca}").etcd_cafile == ca
    assert parse(f"--etcd-certfile={cert}", f"--etcd-keyfile={key}").etcd_tls


def test_main_bad_tls_file_is_one_line_and_exit_2(
    fake_daemon: dict[str, Any], capsys: pytest.CaptureFixture[str], tls: TlsFiles
) -> None:
    key, cert = tls.client_key, tls.client_cert
    assert main([f"--etcd-certfile={key}", f"--etcd-keyfile={cert}"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"flanneld-py: --etcd-certfile/--etcd-keyfile are swapped: --etcd-certfile {key} holds a "
        f"private key and --etcd-keyfile {cert} a certificate (--etcd-certfile takes the "
        "certificate, --etcd-keyfile the key)\n"
    )
    assert "options" not in fake_daemon  # the daemon never ran


# -- main ----------------------------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    ours = logging.getLogger("flanneld_py")
    saved = (list(root.handlers), root.level, ours.level)
    try:
        yield
    finally:
        for h in list(root.handlers):
            if h not in saved[0]:
                root.removeHandler(h)
        root.setLevel(saved[1])
        ours.setLevel(saved[2])
        logging.captureWarnings(False)


@pytest.fixture
def fake_daemon(monkeypatch: pytest.MonkeyPatch, restore_logging: None) -> dict[str, Any]:
    """A stand-in flanneld_py.daemon whose async run() records what it saw."""
    seen: dict[str, Any] = {"code": 0}
    module = types.ModuleType("flanneld_py.daemon")

    async def run(options: Options, store: Any) -> int:
        seen["options"] = options
        seen["store"] = type(store).__name__
        seen["loop"] = type(asyncio.get_running_loop()).__module__
        logging.getLogger("flanneld_py.daemon").info("daemon running\nsecond line")
        if "raise" in seen:
            raise seen["raise"]
        return int(seen["code"])

    module.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flanneld_py.daemon", module)
    for name in list(os.environ):
        if name.startswith("FLANNELD_"):
            monkeypatch.delenv(name)
    return seen


def test_main_runs_the_daemon_on_uvloop(
    fake_daemon: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("uvloop")
    fake_daemon["code"] = 3
    assert main(["--ip-masq", "--log-level=debug"]) == 3
    assert fake_daemon["options"] == Options(ip_masq=True, log_level="debug")
    assert fake_daemon["loop"].startswith("uvloop")
    assert fake_daemon["store"] == "AutoStore"  # built by the CLI (--etcd-api=auto), handed on
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "daemon running" in line]
    assert len(lines) == 1  # one line per message, even with a newline inside
    assert " INFO daemon: daemon running | second line" in lines[0]


def test_main_asyncio_loop_and_uvloop_fallback(
    fake_daemon: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--event-loop=asyncio"]) == 0
    assert fake_daemon["loop"].startswith("asyncio")
    assert "uvloop" not in capsys.readouterr().err

    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop -> ImportError
    assert main([]) == 0
    assert fake_daemon["loop"].startswith("asyncio")
    warning = [line for line in capsys.readouterr().err.splitlines() if "uvloop" in line]
    assert len(warning) == 1 and " WARNING cli: uvloop is not importable" in warning[0]


def test_main_turns_a_crash_into_exit_1_with_one_log_line(
    fake_daemon: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    fake_daemon["raise"] = RuntimeError("kaboom")
    assert main(["--event-loop=asyncio"]) == 1
    crit = [line for line in capsys.readouterr().err.splitlines() if "CRITICAL" in line]
    assert len(crit) == 1 and "kaboom" in crit[0] and "Traceback" in crit[0]


def test_main_usage_error_and_help(
    fake_daemon: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--healthz-port=x"]) == 2
    out, err = capsys.readouterr()
    assert (out, err) == ("", "flanneld-py: invalid value 'x' for --healthz-port: not an integer\n")
    assert main(["--help"]) == 0
    assert capsys.readouterr().out == usage_text()
    assert "options" not in fake_daemon  # the daemon never ran


def test_journald_format(restore_logging: None) -> None:
    formatter = cli._LineFormatter(journald=True)
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        record = logging.LogRecord(
            "flanneld_py.subnets", logging.ERROR, __file__, 1, "lost %s", ("lease",), sys.exc_info()
        )
    text = formatter.format(record)
    assert text.startswith("<3>ERROR subnets: lost lease | Traceback")
    assert "\n" not in text and "ValueError: bad | thing" in text


# -- the real entry point, as a process ----------------------------------------------------------


def run_module(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLANNELD_")}
    return subprocess.run(
        [sys.executable, "-m", "flanneld_py", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**clean, **env},
        timeout=60,
    )


def test_process_version() -> None:
    res = run_module("--version")
    assert (res.returncode, res.stdout, res.stderr) == (0, f"flanneld-py {__version__}\n", "")


def test_process_help() -> None:
    res = run_module("-help")
    assert res.returncode == 0 and res.stderr == ""
    assert res.stdout.startswith("Usage: flanneld-py")


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["--subnet-lease-renew-margin=2000"], {}),
        ([], {"FLANNELD_ETCD_ENDPOINTS": "localhost:2379"}),
        (["--iface"], {}),
        (["--etcd-certfile=/nonexistent"], {}),
        (["--etcd-cafile=/etc/hostname"], {}),  # exists, is not a certificate
    ],
)
def test_process_errors_are_one_line_exit_2(argv: list[str], env: dict[str, str]) -> None:
    res = run_module(*argv, **env)
    assert res.returncode == 2
    assert res.stdout == ""
    assert res.stderr.startswith("flanneld-py: ") and res.stderr.count("\n") == 1
    assert "Traceback" not in res.stderr


def test_centos_sysconfig_variables_are_read_when_nothing_else_is_set() -> None:
    seed = {
        "FLANNEL_ETCD_ENDPOINTS": "http://10.0.0.200:2379",
        "FLANNEL_ETCD_PREFIX": "/atomic.io/network",
    }
    o = parse_args([], seed)
    assert (o.etcd_endpoints, o.etcd_prefix) == (("http://10.0.0.200:2379",), "/atomic.io/network")
    old = {"FLANNEL_ETCD": "http://10.0.0.1:2379,http://10.0.0.2:2379", "FLANNEL_ETCD_KEY": "/a/b"}
    o = parse_args([], old)
    assert o.etcd_endpoints == ("http://10.0.0.1:2379", "http://10.0.0.2:2379")
    assert o.etcd_prefix == "/a/b"
    # FLANNELD_* and the flag win; the newer name wins over the older one
    both = {**seed, **old, "FLANNELD_ETCD_PREFIX": "/x"}
    o = parse_args(["--etcd-endpoints=http://10.0.0.9:2379"], both)
    assert (o.etcd_endpoints, o.etcd_prefix) == (("http://10.0.0.9:2379",), "/x")
    assert parse_args([], {**seed, **old}).etcd_endpoints == ("http://10.0.0.200:2379",)
    with pytest.raises(UsageError, match="in FLANNEL_ETCD_ENDPOINTS"):
        parse_args([], {"FLANNEL_ETCD_ENDPOINTS": "10.0.0.200"})


# -- --etcd-api and migrate-etcd (etcd v2 for Docker-era clusters) -------------------------------


def test_etcd_api_flag_and_environment() -> None:
    assert parse().etcd_api == "auto"
    assert parse("--etcd-api=v2").etcd_api == "v2"
    assert parse("-etcd-api", "V3").etcd_api == "v3"
    assert parse(FLANNELD_ETCD_API="v2").etcd_api == "v2"
    assert parse("--etcd-api=v3", FLANNELD_ETCD_API="v2").etcd_api == "v3"
    assert usage_error("--etcd-api=v4") == (
        "invalid value 'v4' for --etcd-api: choose one of auto, v3, v2"
    )
    assert usage_error(FLANNELD_ETCD_API="etcd2") == (
        "invalid value 'etcd2' for FLANNELD_ETCD_API: choose one of auto, v3, v2"
    )
    (line,) = [line for line in usage_text().splitlines() if "--etcd-api=" in line]
    assert "{auto|v3|v2}" in line and "(default: auto)" in line and "v2 (flanneld <= v0.17" in line
    assert "migrate-etcd --from v2 --to v3" in usage_text()


def test_build_store_follows_etcd_api() -> None:
    from flanneld_py.store.etcd import EtcdStore
    from flanneld_py.store.etcdv2 import EtcdV2Store
    from flanneld_py.store.select import AutoStore

    assert type(cli.build_store(Options(etcd_api="v3"))) is EtcdStore
    v2 = cli.build_store(Options(etcd_api="v2", etcd_endpoints=("http://127.0.0.1:2379",)))
    assert isinstance(v2, EtcdV2Store) and v2.endpoints == ["http://127.0.0.1:2379"]
    auto = cli.build_store(Options(etcd_prefix="/atomic.io/network/"))
    assert isinstance(auto, AutoStore) and auto.api is None
    assert auto.config_key == "/atomic.io/network/config"
    assert isinstance(auto.v3, EtcdStore) and isinstance(auto.v2, EtcdV2Store)


def test_main_builds_the_store_of_etcd_api(fake_daemon: dict[str, Any]) -> None:
    assert main(["--event-loop=asyncio"]) == 0
    assert fake_daemon["store"] == "AutoStore"  # the default: auto
    for api, name in (("v3", "EtcdStore"), ("v2", "EtcdV2Store")):
        assert main(["--event-loop=asyncio", f"--etcd-api={api}"]) == 0
        assert fake_daemon["store"] == name
        assert fake_daemon["options"].etcd_api == api


def test_main_migrate_etcd_usage(
    fake_daemon: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from flanneld_py import migrate

    assert main(["migrate-etcd", "--from=v2"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("flanneld-py migrate-etcd: --from v2 and --to v3 are")
    assert err.count("\n") == 1
    assert main(["migrate-etcd", "--from=v2", "--to=v3", "--ip-masq"]) == 2
    assert "flag provided but not defined: -ip-masq" in capsys.readouterr().err
    assert main(["migrate-etcd", "--help"]) == 0
    assert capsys.readouterr().out == migrate.HELP
    assert "options" not in fake_daemon  # the daemon never ran
    # "migrate-etcd" anywhere but first is not the subcommand
    assert main(["--ip-masq", "migrate-etcd"]) == 2
    assert "unexpected argument 'migrate-etcd'" in capsys.readouterr().err


def test_process_migrate_etcd_errors() -> None:
    res = run_module("migrate-etcd", "--from", "v2")
    assert (res.returncode, res.stdout) == (2, "")
    assert res.stderr.startswith("flanneld-py migrate-etcd: ") and res.stderr.count("\n") == 1
    res = run_module("migrate-etcd", "-help")
    assert res.returncode == 0 and res.stdout.startswith("Usage: flanneld-py migrate-etcd")
    # nobody listens there: one line, exit 1
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = run_module(
        "migrate-etcd", "--from=v2", "--to=v3", f"--etcd-endpoints=http://127.0.0.1:{port}"
    )
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr == (
        f"flanneld-py migrate-etcd: etcd unreachable at http://127.0.0.1:{port}: connection "
        "refused; check --etcd-endpoints and that etcd is running\n"
    )
