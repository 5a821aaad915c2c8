from ipaddress import IPv4Address, IPv4Network

from flanneld_py.lease import Lease, LeaseAdded, LeaseRemoved, diff_leases
from flanneld_py.subnets import effective_margin, renew_delay

DAY = 86400


def test_renew_at_expiry_minus_margin() -> None:
    now = 1_000_000.0
    assert renew_delay(now + DAY, now, DAY, 3600) == DAY - 3600
    assert renew_delay(now + 100, now, DAY, 3600) == 0  # already inside the margin: renew now
    assert renew_delay(now - 5, now, DAY, 3600) == 0  # expired: renew (re-acquire) now


def test_margin_is_capped_for_short_ttls() -> None:
    assert effective_margin(DAY, 60 * 60) == 3600
    assert effective_margin(6, 60) == 3
    assert renew_delay(106.0, 100.0, 6, 60) == 3.0


def L(net: str, ip: str) -> Lease:
    return Lease(IPv4Network(net), IPv4Address(ip))


def test_diff_leases() -> None:
    a, b, b2, c = (
        L("10.5.1.0/24", "1.1.1.1"),
        L("10.5.2.0/24", "2.2.2.2"),
        L("10.5.2.0/24", "2.2.2.3"),
        L("10.5.3.0/24", "3.3.3.3"),
    )
    old = {a.subnet: a, b.subnet: b}
    new = {b2.subnet: b2, c.subnet: c}
    assert diff_leases(old, new) == [LeaseRemoved(a.subnet), LeaseAdded(b2), LeaseAdded(c)]
    assert diff_leases(new, new) == []
    # expiration changes (renewals) are not route changes
    assert diff_leases({a.subnet: a}, {a.subnet: Lease(a.subnet, a.public_ip, 5.0)}) == []
