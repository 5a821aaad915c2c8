"""migrate-etcd's logic over two MemoryStores (the v2 side behind a small v2-like fake that
knows each key's remaining TTL), and its command line."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from flanneld_py import migrate as mig
from flanneld_py.cli import EarlyExit, UsageError
from flanneld_py.store import KV, StoredLease
from flanneld_py.store.etcdv2 import TtlKV
from flanneld_py.store.memory import MemoryStore
from tests.store_contract import FakeClock

PREFIX = "/coreos.com/network"
P = PREFIX + "/subnets/"
CONFIG = b'{"Network":"10.6.0.0/16","Backend":{"Type":"vxlan"}}'
LEASES = {
    P + "10.6.1.0-24": (b'{"PublicIP":"10.99.0.1"}', 86000),
    P + "10.6.2.0-24": (b'{"PublicIP":"10.99.0.2","PublicIPv6":null}', 500),
    P + "10.6.3.0-24": (b'{"PublicIP":"10.99.0.3","BackendType":"vxlan"}', 3),
}
RESERVED = P + "10.6.9.0-24"


class FakeV2:
    """The v2 keyspace: keys in a MemoryStore, their TTLs counted down on ``clock``."""

    def __init__(self, clock: FakeClock) -> None:
        self.store = MemoryStore(clock)
        self.clock = clock
        self.expires: dict[str, float] = {}

    def set(self, key: str, value: bytes, ttl: int | None = None) -> None:
        self.store.put(key, value)
        if ttl is not None:
            self.expires[key] = self.clock() + ttl

    def _ttl_kv(self, kv: KV) -> TtlKV:
        end = self.expires.get(kv.key)
        ttl = None if end is None else max(1, int(end - self.clock() + 0.999))
        return TtlKV(kv.key, kv.value, kv.mod_revision, ttl)

    async def get_ttl(self, key: str) -> TtlKV | None:
        kv = await self.store.get(key)
        return None if kv is None else self._ttl_kv(kv)

    async def list_ttl(self, prefix: str) -> tuple[list[TtlKV], int]:
        kvs, rev = await self.store.list(prefix)
        return [self._ttl_kv(kv) for kv in kvs], rev


class MemoryTarget:
    """``V3Target`` over a MemoryStore (its test control ``put`` writes without lease)."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self.race: tuple[str, bytes] | None = None

    async def get(self, key: str) -> KV | None:
        return await self.store.get(key)

    def _maybe_race(self) -> None:
        if self.race is not None:  # another writer gets there first
            key, value = self.race
            self.race = None
            self.store.put(key, value)

    async def create(self, key: str, value: bytes, ttl: int) -> StoredLease | None:
        self._maybe_race()
        return await self.store.create(key, value, ttl)

    async def replace(
        self, key: str, value: bytes, ttl: int, mod_revision: int
    ) -> StoredLease | None:
        self._maybe_race()
        return await self.store.replace(key, value, ttl, mod_revision)

    async def put_unleased(self, key: str, value: bytes, mod_revision: int | None) -> bool:
        self._maybe_race()
        kv = await self.store.get(key)
        if (
            (kv is not None)
            if mod_revision is None
            else (kv is None or kv.mod_revision != mod_revision)
        ):
            return False
        self.store.put(key, value)
        return True


class World:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.v2 = FakeV2(self.clock)
        self.v3 = MemoryStore(self.clock)
        self.target = MemoryTarget(self.v3)
        self.lines: list[str] = []
        self.v2.set(PREFIX + "/config", CONFIG)
        for key, (value, ttl) in LEASES.items():
            self.v2.set(key, value, ttl)
        self.v2.set(RESERVED, b'{"PublicIP":"10.99.0.9"}')  # a reservation: no TTL

    def run(self, **kwargs: Any) -> int:
        self.lines.clear()
        return asyncio.run(
            mig.migrate(self.v2, self.target, PREFIX, out=self.lines.append, **kwargs)
        )

    def v3_ttl(self, key: str) -> int | None:
        kv = asyncio.run(self.v3.get(key))
        assert kv is not None
        return None if kv.lease_id == 0 else self.v3._leases[kv.lease_id].ttl


@pytest.fixture
def world() -> Iterator[World]:
    yield World()


def all_keys() -> list[str]:
    return [PREFIX + "/config", *LEASES, RESERVED]


def test_dry_run_prints_one_line_per_key_and_writes_nothing(world: World) -> None:
    rev = world.v3.revision
    assert world.run(dry_run=True) == 0
    assert world.v3.revision == rev and world.v3.lease_ids() == []
    *per_key, summary = world.lines
    assert len(per_key) == 5 and all(line.startswith("would write ") for line in per_key)
    assert per_key[0] == (
        f"would write {PREFIX}/config without lease (no TTL in v2): {CONFIG.decode()}"
    )
    assert f"would write {P}10.6.1.0-24 with a v3 lease of 86000s: " in per_key[1]
    assert per_key[-1].startswith(f"would write {RESERVED} without lease (no TTL in v2)")
    assert summary == (
        f"dry run: would copy 5 keys from etcd's v2 to its v3 keyspace under {PREFIX} "
        "(3 with a lease, 2 without; 0 identical, skipped); nothing written"
    )


def test_migrate_copies_values_byte_for_byte_with_the_remaining_ttls(world: World) -> None:
    world.clock.advance(2)  # the v2 TTLs have run for 2 s
    assert world.run() == 0
    for key in all_keys():
        v2 = asyncio.run(world.v2.store.get(key))
        v3 = asyncio.run(world.v3.get(key))
        assert v2 is not None and v3 is not None and v3.value == v2.value
    for key, (_, ttl) in LEASES.items():
        assert world.v3_ttl(key) == max(ttl - 2, world.v3.min_ttl)
    assert world.v3_ttl(PREFIX + "/config") is None
    assert world.v3_ttl(RESERVED) is None
    assert len(world.v3.lease_ids()) == 3
    assert world.lines[-1] == (
        f"copied 5 keys from etcd's v2 to its v3 keyspace under {PREFIX} "
        "(3 with a lease, 2 without; 0 identical, skipped)"
    )
    assert sum(line.startswith("wrote ") for line in world.lines) == 5


def test_ttl_counts_the_time_since_the_listing(world: World) -> None:
    ticks = iter([0.0])  # the listing at 0 s, every write 7 s later

    def clock() -> float:
        return next(ticks, 7.0)

    world.lines.clear()
    code = asyncio.run(
        mig.migrate(world.v2, world.target, PREFIX, out=world.lines.append, clock=clock)
    )
    assert code == 0
    assert world.v3_ttl(P + "10.6.1.0-24") == 86000 - 7
    assert world.v3_ttl(P + "10.6.3.0-24") == 2  # 3 - 7 -> at least 1, raised by v3 to 2


def test_second_run_reports_everything_identical(world: World) -> None:
    assert world.run() == 0
    rev = world.v3.revision
    assert world.run() == 0
    assert world.v3.revision == rev
    assert world.lines[:-1] == [f"identical in v3, skipped: {key}" for key in all_keys()]
    assert world.lines[-1] == (
        f"nothing to copy: all 5 keys under {PREFIX} are already identical in etcd's v3 keyspace"
    )


def test_a_differing_v3_key_refuses_unless_forced(world: World) -> None:
    assert world.run() == 0
    world.v3.put(P + "10.6.2.0-24", b'{"PublicIP":"10.99.0.42"}')
    world.v3.put(PREFIX + "/config", b'{"Network":"10.7.0.0/16"}')
    rev = world.v3.revision
    for dry_run in (True, False):
        assert world.run(dry_run=dry_run) == 1
        assert world.v3.revision == rev  # nothing written
        assert world.lines[:-1] == [
            f"conflict: {PREFIX}/config exists in v3 with a different value: v3 has "
            f'{{"Network":"10.7.0.0/16"}}, v2 has {CONFIG.decode()}',
            f"conflict: {P}10.6.2.0-24 exists in v3 with a different value: v3 has "
            '{"PublicIP":"10.99.0.42"}, v2 has {"PublicIP":"10.99.0.2","PublicIPv6":null}',
        ]
        verb = "a dry run would refuse" if dry_run else "refused"
        assert world.lines[-1] == (
            f"{verb}: 2 keys under {PREFIX} already in etcd's v3 keyspace with a different "
            "value; nothing written (--force overwrites them)"
        )
    assert world.run(force=True, dry_run=True) == 0
    assert world.v3.revision == rev
    assert any(line.startswith(f"would overwrite {P}10.6.2.0-24 (v3 had ") for line in world.lines)
    assert world.run(force=True) == 0
    assert asyncio.run(world.v3.get(PREFIX + "/config")).value == CONFIG  # type: ignore[union-attr]
    kv = asyncio.run(world.v3.get(P + "10.6.2.0-24"))
    assert kv is not None and kv.value == LEASES[P + "10.6.2.0-24"][0] and kv.lease_id != 0
    assert world.lines[-1].endswith(
        "(1 with a lease, 1 without, 2 overwritten; 3 identical, skipped)"
    )


def test_keys_that_are_not_leases_are_skipped(world: World) -> None:
    world.v2.set(P + "garbage", b"x")
    assert world.run() == 0
    assert world.lines[0] == f"not a lease key, skipped: {P}garbage"
    assert asyncio.run(world.v3.get(P + "garbage")) is None


def test_nothing_in_v2_is_an_error(world: World) -> None:
    code = asyncio.run(
        mig.migrate(world.v2, world.target, "/atomic.io/network", out=world.lines.append)
    )
    assert code == 1
    assert world.lines[-1].startswith(
        "nothing found in etcd's v2 keyspace under /atomic.io/network"
    )


def test_a_key_written_in_v3_meanwhile(world: World) -> None:
    world.target.race = (P + "10.6.1.0-24", b"somebody else")
    assert world.run() == 1
    assert f"changed in v3 during the migration, not written: {P}10.6.1.0-24" in world.lines
    assert "changed in v3 meanwhile: run it again" in world.lines[-1]
    # the same value arriving meanwhile counts as written
    world2 = World()
    world2.target.race = (P + "10.6.1.0-24", LEASES[P + "10.6.1.0-24"][0])
    assert world2.run() == 0


# ------------------------------------------------------------------------------------------
# the command line


def parse(*argv: str, **env: str) -> mig.MigrateArgs:
    return mig.parse_migrate_args(list(argv), env)


def test_parse_flags_and_environment() -> None:
    args = parse("--from=v2", "-to", "v3", "--dry-run", "--etcd-endpoints=http://10.0.0.1:2379")
    assert (args.dry_run, args.force) == (True, False)
    assert args.options.etcd_endpoints == ("http://10.0.0.1:2379",)
    args = parse(
        "--from", "v2", "--to=v3", "--force",
        FLANNELD_ETCD_ENDPOINTS="http://10.0.0.2:2379,http://10.0.0.3:2379",
        FLANNEL_ETCD_PREFIX="/atomic.io/network",
        FLANNELD_ETCD_USERNAME="u", FLANNELD_ETCD_PASSWORD="p",
        FLANNELD_IFACE="this is not read",
    )  # fmt: skip
    assert args.force and not args.dry_run
    assert args.options.etcd_endpoints == ("http://10.0.0.2:2379", "http://10.0.0.3:2379")
    assert args.options.etcd_prefix == "/atomic.io/network"
    assert (args.options.etcd_username, args.options.etcd_password) == ("u", "p")


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        ([], "--from v2 and --to v3 are required"),
        (["--from=v2"], "--from v2 and --to v3 are required"),
        (["--from=v3", "--to=v2"], "only --from v2 --to v3 is supported"),
        (["--from=v2", "--to=v3", "--iface=eth0"], "flag provided but not defined: -iface"),
        (["--from=v2", "--to=v3", "extra"], "unexpected argument 'extra'"),
        (["--from=v2", "--to"], "flag needs an argument: --to"),
        (["--from=v2", "--to=v3", "--force=maybe"], "invalid value 'maybe' for --force"),
        (["--from=v2", "--to=v3", "--etcd-endpoints=ftp://x:1"], "invalid etcd endpoint"),
        (["--from=v2", "--to=v3", "--etcd-username=u"], "must be given together"),
        (["--from=v2", "--to=v3", "--etcd-cafile=/nonexistent"], "no such file"),
    ],
)
def test_usage_errors(argv: list[str], fragment: str) -> None:
    with pytest.raises(UsageError) as err:
        parse(*argv)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_help() -> None:
    with pytest.raises(EarlyExit) as e:
        parse("--help")
    assert e.value.text == mig.HELP
    assert mig.HELP.startswith("Usage: flanneld-py migrate-etcd --from v2 --to v3")
    for words in ("--dry-run", "--force", "identical", "has left", "--etcd-endpoints", "Exit"):
        assert words in mig.HELP, words


def test_main_usage_error_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert mig.main(["--to=v3"], {}) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "flanneld-py migrate-etcd: --from v2 and --to v3 are required "
        "(the direction is never implied)\n"
    )
    assert mig.main(["-h"], {}) == 0
    assert capsys.readouterr().out == mig.HELP
