import json
from ipaddress import IPv4Network

import pytest

from flanneld_py.config import ConfigError, parse_config


def net(s: str) -> IPv4Network:
    return IPv4Network(s)


def test_defaults_for_a_16() -> None:
    cfg = parse_config('{"Network": "10.5.0.0/16"}')
    assert cfg.network == net("10.5.0.0/16")
    assert cfg.subnet_len == 24
    assert cfg.subnet_min == net("10.5.1.0/24")  # the first subnet is never handed out
    assert cfg.subnet_max == net("10.5.255.0/24")
    assert (cfg.backend_type, cfg.port) == ("udp", 8285)


@pytest.mark.parametrize(
    ("network", "expected_len"),
    [
        ("10.0.0.0/8", 24),
        ("10.5.0.0/22", 24),
        ("10.5.0.0/23", 25),
        ("10.5.0.0/26", 28),
        ("10.5.0.0/28", 30),
    ],
)
def test_default_subnet_len(network: str, expected_len: int) -> None:
    assert parse_config(json.dumps({"Network": network})).subnet_len == expected_len


def test_field_names_are_case_insensitive_and_unknown_fields_ignored() -> None:
    cfg = parse_config(
        '{"network": "10.5.0.0/16", "SUBNETLEN": 26, "backend": {"type": "UDP", "port": 9000},'
        ' "Whatever": [1, 2]}'
    )
    assert cfg.subnet_len == 26
    assert cfg.backend_type == "udp"
    assert cfg.port == 9000
    assert cfg.subnet_min == net("10.5.0.64/26")
    assert cfg.subnet_max == net("10.5.255.192/26")


def test_subnet_min_max_given() -> None:
    cfg = parse_config(
        '{"Network": "10.5.0.0/16", "SubnetMin": "10.5.10.0", "SubnetMax": "10.5.20.0"}'
    )
    assert cfg.subnet_min == net("10.5.10.0/24")
    assert cfg.subnet_max == net("10.5.20.0/24")
    assert cfg.contains_subnet(net("10.5.15.0/24"))
    assert not cfg.contains_subnet(net("10.5.21.0/24"))
    assert not cfg.contains_subnet(net("10.5.15.0/25"))


def test_backend_without_port_gets_8285() -> None:
    assert parse_config('{"Network":"10.5.0.0/16","Backend":{"Type":"udp"}}').port == 8285


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("not json", "not valid JSON"),
        ("[1]", "JSON object"),
        ("{}", "Network is missing"),
        ('{"Network": 5}', "CIDR"),
        ('{"Network": "10.5.0.0"}', "CIDR"),
        ('{"Network": "300.5.0.0/16"}', "not an IPv4 CIDR"),
        ('{"Network": "10.5.0.0/29"}', "Network 10.5.0.0/29 is too small"),
        ('{"Network": "10.5.0.0/16", "SubnetLen": 31}', "outside /18../30"),
        ('{"Network": "10.5.0.0/16", "SubnetLen": 17}', "outside /18../30"),
        ('{"Network": "10.5.0.0/16", "SubnetLen": "24"}', "SubnetLen must be an integer"),
        ('{"Network": "10.5.0.0/16", "SubnetMin": "10.6.0.0"}', "SubnetMin 10.6.0.0 is not inside"),
        (
            '{"Network": "10.5.0.0/16", "SubnetMax": "10.5.3.7"}',
            "SubnetMax 10.5.3.7 is not on a /24",
        ),
        ('{"Network": "10.5.0.0/16", "SubnetMin": "bogus"}', "SubnetMin 'bogus' is not an IPv4"),
        ('{"Network": "10.5.0.0/16", "SubnetMin": "10.5.9.0", "SubnetMax": "10.5.3.0"}', "above"),
        ('{"Network": "10.5.0.0/16", "Backend": {}}', "unknown backend type"),
        ('{"Network": "10.5.0.0/16", "Backend": {"Port": 1}}', "unknown backend type"),
        ('{"Network": "10.5.0.0/16", "Backend": {"Type": "gre"}}', "not supported"),
        ('{"Network": "10.5.0.0/16", "Backend": "udp"}', "Backend must be an object"),
        ('{"Network": "10.5.0.0/16", "Backend": {"Type": "udp", "Port": 70000}}', "Port 70000"),
        ('{"Network": "10.5.0.0/16", "EnableIPv4": false}', "EnableIPv4"),
        ('{"Network": "10.5.0.0/16", "EnableIPv6": true}', "EnableIPv6"),
    ],
)
def test_errors_are_one_line_and_name_the_field(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config(text)
    msg = str(ei.value)
    assert fragment in msg
    assert "\n" not in msg


# -- SubnetLen: one rule, [Network prefix + 2, 30], and every message derived from it -------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # the range is empty (prefix > 28): the Network is the problem, whatever SubnetLen says
        (
            '{"Network": "10.77.0.0/30", "SubnetLen": 24}',
            "Network 10.77.0.0/30 is too small: it needs a prefix of at most /28 to hold four "
            "subnets",
        ),
        (
            '{"Network": "10.77.0.0/29"}',
            "Network 10.77.0.0/29 is too small: it needs a prefix of at most /28 to hold four "
            "subnets",
        ),
        (
            '{"Network": "10.77.0.0/32", "SubnetLen": 30}',
            "Network 10.77.0.0/32 is too small: it needs a prefix of at most /28 to hold four "
            "subnets",
        ),
        # below the range: fewer than four subnets would fit
        (
            '{"Network": "10.77.0.0/16", "SubnetLen": 17}',
            "SubnetLen /17 is outside /18../30 for Network 10.77.0.0/16 (Network must hold at "
            "least four subnets)",
        ),
        (
            '{"Network": "10.77.0.0/16", "SubnetLen": 8}',
            "SubnetLen /8 is outside /18../30 for Network 10.77.0.0/16 (Network must hold at "
            "least four subnets)",
        ),
        # above the range
        (
            '{"Network": "10.77.0.0/16", "SubnetLen": 31}',
            "SubnetLen /31 is outside /18../30 for Network 10.77.0.0/16 (/30 is the smallest "
            "subnet)",
        ),
        (
            '{"Network": "10.77.0.0/28", "SubnetLen": 32}',
            "SubnetLen /32 is outside /30../30 for Network 10.77.0.0/28 (/30 is the smallest "
            "subnet)",
        ),
        # negative: just the range
        (
            '{"Network": "10.77.0.0/16", "SubnetLen": -1}',
            "SubnetLen -1 is outside /18../30 for Network 10.77.0.0/16",
        ),
        # the Network in the message is the masked one
        (
            '{"Network": "10.77.3.4/24", "SubnetLen": 25}',
            "SubnetLen /25 is outside /26../30 for Network 10.77.3.0/24 (Network must hold at "
            "least four subnets)",
        ),
    ],
)
def test_subnet_len_messages_exact(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config(text)
    assert str(ei.value) == message


@pytest.mark.parametrize(
    ("network", "subnet_len"),
    [("10.77.0.0/16", 18), ("10.77.0.0/16", 30), ("10.77.0.0/28", 30), ("10.0.0.0/8", 10)],
)
def test_subnet_len_range_ends_are_accepted(network: str, subnet_len: int) -> None:
    cfg = parse_config(json.dumps({"Network": network, "SubnetLen": subnet_len}))
    assert cfg.subnet_len == subnet_len


@pytest.mark.parametrize("prefix", range(0, 33))
def test_default_subnet_len_obeys_the_same_rule(prefix: int) -> None:
    """An absent SubnetLen picks a value the explicit rule accepts, or the Network is refused
    with the same "too small" message as with any explicit SubnetLen."""
    network = str(IPv4Network((0x0A000000 if prefix >= 8 else 0, prefix)))
    try:
        default = parse_config(json.dumps({"Network": network})).subnet_len
    except ConfigError as e:
        assert prefix > 28 and "is too small" in str(e)
        with pytest.raises(ConfigError, match="is too small"):
            parse_config(json.dumps({"Network": network, "SubnetLen": 30}))
        return
    assert prefix + 2 <= default <= 30
    assert parse_config(json.dumps({"Network": network, "SubnetLen": default})).subnet_len == (
        default
    )


def test_network_with_host_bits_is_masked() -> None:
    assert parse_config('{"Network": "10.5.3.4/16"}').network == net("10.5.0.0/16")
