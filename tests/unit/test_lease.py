from ipaddress import IPv4Address, IPv4Network

import pytest

from flanneld_py.lease import (
    LeaseFormatError,
    decode_lease_value,
    encode_lease_value,
    lease_key,
    parse_lease_key,
    subnets_prefix,
)


def test_key_roundtrip() -> None:
    key = lease_key("/coreos.com/network", IPv4Network("10.5.18.0/24"))
    assert key == "/coreos.com/network/subnets/10.5.18.0-24"
    assert parse_lease_key(key) == IPv4Network("10.5.18.0/24")
    assert subnets_prefix("atomic.io/network/") == "/atomic.io/network/subnets/"


def test_key_with_ipv6_part_parses_v4() -> None:
    assert parse_lease_key("/p/subnets/10.5.18.0-24&fc00::-64") == IPv4Network("10.5.18.0/24")


@pytest.mark.parametrize(
    "key",
    [
        "/p/subnets/garbage",
        "/p/subnets/10.5.18.0-",
        "/p/subnets/10.5.18.1-24",
        "/p/subnets/10.5.18.0-40",
        "/p/subnets/999.1.1.0-24",
        "/p/subnets/10.5.18.0-24x",
    ],
)
def test_bad_keys(key: str) -> None:
    with pytest.raises(LeaseFormatError):
        parse_lease_key(key)


def test_value_format_is_flannels() -> None:
    assert (
        encode_lease_value(IPv4Address("10.99.0.1"))
        == b'{"PublicIP":"10.99.0.1","PublicIPv6":null}'
    )


@pytest.mark.parametrize(
    "value",
    [
        b'{"PublicIP":"10.99.0.1"}',
        b'{"publicip":"10.99.0.1","BackendType":"udp"}',
        b'{"PublicIP":"10.99.0.1","PublicIPv6":null,"BackendData":null}',
    ],
)
def test_value_variants(value: bytes) -> None:
    assert decode_lease_value(value) == IPv4Address("10.99.0.1")


@pytest.mark.parametrize(
    "value", [b"", b"{", b"[]", b"{}", b'{"PublicIP": 5}', b'{"PublicIP": "x"}', b"\xff\xfe"]
)
def test_bad_values(value: bytes) -> None:
    with pytest.raises(LeaseFormatError):
        decode_lease_value(value)
