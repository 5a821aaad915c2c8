"""``flanneld-py migrate-etcd --from v2 --to v3``: a v2 cluster's config and leases, copied to v3.

etcd keeps its v2 and v3 keyspaces apart (flannel-compat §11): hosts that move from flanneld
≤ v0.17 (v2) to a v3 flanneld (flanneld-py ``--etcd-api=v3``, flanneld ≥ v0.18) would find no
config and no leases, and take new subnets. This command copies ``<prefix>/config`` and every live
lease ``<prefix>/subnets/<a.b.c.d>-<len>`` into the v3 keyspace first, so each host finds its own
lease (by PublicIP) and keeps its subnet.

``migrate()`` is the logic, over a v2 source and a v3 target (``V2Source``/``V3Target``: the real
stores or fakes); ``main()`` is the subcommand (``cli.main`` hands it ``argv[1:]``).
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from flanneld_py.lease import LeaseFormatError, normalize_prefix, parse_lease_key, subnets_prefix
from flanneld_py.options import Options
from flanneld_py.store import KV, StoredLease, StoreError

__all__ = [
    "HELP",
    "EtcdV3Target",
    "MigrateArgs",
    "SourceKV",
    "V2Source",
    "V3Target",
    "main",
    "migrate",
    "parse_migrate_args",
]

COMMAND = "flanneld-py migrate-etcd"

HELP = f"""\
Usage: {COMMAND} --from v2 --to v3 [--dry-run] [--force] [--etcd-FLAG=value]...

Copies a Docker-era flannel network from etcd's v2 keyspace (flanneld <= v0.17; etcd 3.4 with
--enable-v2=true) into etcd's v3 keyspace (flanneld >= v0.18, flanneld-py --etcd-api=v3), which
v3 clients use and which cannot see v2 keys:

  - <prefix>/config and every lease <prefix>/subnets/<a.b.c.d>-<len> that is still live,
    their values byte for byte;
  - a lease with a TTL gets a fresh v3 etcd lease with the TTL the v2 key has left; a key
    without TTL in v2 (the config, or a reservation made with `etcdctl set -ttl 0`) gets none;
  - a v3 key that already holds the same value is skipped and reported as identical, so
    running it again is harmless;
  - a v3 key that holds a different value makes it refuse (one line per such key, nothing
    written, exit 1) unless --force, which overwrites those keys.

The v2 keys stay as they are. Hosts on v2 and hosts on v3 do not see each other's leases: run
this, then switch every host to v3 (flanneld-py --etcd-api=v3 reuses the lease that holds its
PublicIP, so it keeps its subnet) before the copied leases' TTLs run out; a v2 host that renews
afterwards changes only its v2 key (run this again with --force to copy such changes).

  --from=v2, --to=v3    the direction (the only one there is); both required
  --dry-run             print what would be written, one line per key, and write nothing
  --force               overwrite v3 keys that hold a different value
  --etcd-endpoints, --etcd-prefix, --etcd-keyfile, --etcd-certfile, --etcd-cafile,
  --etcd-username, --etcd-password
                        as for the daemon (also read from FLANNELD_ETCD_* and CentOS's
                        FLANNEL_ETCD_ENDPOINTS/FLANNEL_ETCD_PREFIX); v2 and v3 share them
                        (note that etcd's v2 users are not its v3 users)
  --help                print this help and exit

Exit status: 0 copied (or everything was already identical), 1 refused or failed, 2 bad usage.
"""

_ETCD_FLAGS = (
    "etcd-endpoints",
    "etcd-prefix",
    "etcd-keyfile",
    "etcd-certfile",
    "etcd-cafile",
    "etcd-username",
    "etcd-password",
)


# ------------------------------------------------------------------------------------------
# the two sides


class SourceKV(Protocol):
    """A v2 key with the TTL it has left (None: no TTL), as ``EtcdV2Store``'s ``TtlKV``."""

    @property
    def key(self) -> str: ...
    @property
    def value(self) -> bytes: ...
    @property
    def ttl(self) -> int | None: ...


class V2Source(Protocol):
    """What is read from the v2 keyspace (``EtcdV2Store`` has these)."""

    async def get_ttl(self, key: str) -> SourceKV | None: ...

    async def list_ttl(self, prefix: str) -> tuple[Sequence[SourceKV], int]: ...


class V3Target(Protocol):
    """What is written to the v3 keyspace: ``LeaseStore``'s get/create/replace, plus a put without
    etcd lease (``mod_revision`` None: only if the key is absent; else only if the key's mod
    revision is still that), True if written."""

    async def get(self, key: str) -> KV | None: ...

    async def create(self, key: str, value: bytes, ttl: int) -> StoredLease | None: ...

    async def replace(
        self, key: str, value: bytes, ttl: int, mod_revision: int
    ) -> StoredLease | None: ...

    async def put_unleased(self, key: str, value: bytes, mod_revision: int | None) -> bool: ...


class EtcdV3Target:
    """``V3Target`` over an ``EtcdStore``.

    ``LeaseStore`` has no write without an etcd lease, so ``put_unleased`` runs its own
    transaction through the store's (private) call machinery: failover, auth, error mapping
    as every other call. (A public ``EtcdStore`` method for it would be cleaner.)"""

    def __init__(self, store: Any) -> None:
        self.store = store

    async def get(self, key: str) -> KV | None:
        kv: KV | None = await self.store.get(key)
        return kv

    async def create(self, key: str, value: bytes, ttl: int) -> StoredLease | None:
        res: StoredLease | None = await self.store.create(key, value, ttl)
        return res

    async def replace(
        self, key: str, value: bytes, ttl: int, mod_revision: int
    ) -> StoredLease | None:
        res: StoredLease | None = await self.store.replace(key, value, ttl, mod_revision)
        return res

    async def put_unleased(self, key: str, value: bytes, mod_revision: int | None) -> bool:
        # etcd.py is the module that imports aetcd: its protobuf messages are taken from there
        from flanneld_py.store import etcd as v3

        rpc: Any = v3.rpc  # type: ignore[attr-defined]
        k = key.encode()
        if mod_revision is None:
            compare = rpc.Compare(
                key=k,
                target=rpc.Compare.CompareTarget.VERSION,
                result=rpc.Compare.CompareResult.EQUAL,
                version=0,
            )
        else:
            compare = rpc.Compare(
                key=k,
                target=rpc.Compare.CompareTarget.MOD,
                result=rpc.Compare.CompareResult.EQUAL,
                mod_revision=mod_revision,
            )
        txn = rpc.TxnRequest(
            compare=[compare],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(key=k, value=value))],
        )
        resp = await self.store._call(lambda c, t, md: c.kv.Txn(txn, timeout=t, metadata=md))
        return bool(resp.succeeded)


# ------------------------------------------------------------------------------------------
# the migration


Action = Literal["write", "overwrite", "identical", "conflict"]


@dataclass
class _Step:
    key: str
    value: bytes
    ttl: int | None
    action: Action
    current: KV | None


@dataclass
class _Counts:
    leased: int = 0
    unleased: int = 0
    overwritten: int = 0
    identical: int = 0
    conflicts: int = 0
    raced: list[str] = field(default_factory=list)


def _show(value: bytes, limit: int = 300) -> str:
    """A value on one line (control characters escaped, long values cut)."""
    text = value.decode("utf-8", "backslashreplace")
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[:limit] + f"... ({len(value)} bytes)"


def _how(ttl: int | None) -> str:
    return f"with a v3 lease of {ttl}s" if ttl is not None else "without lease (no TTL in v2)"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


async def _plan(
    source: V2Source, target: V3Target, prefix: str, out: Callable[[str], None]
) -> list[_Step]:
    config_key = f"{prefix}/config"
    found: list[SourceKV] = []
    config = await source.get_ttl(config_key)
    if config is not None:
        found.append(config)
    leases, _ = await source.list_ttl(subnets_prefix(prefix))
    for kv in leases:
        try:
            parse_lease_key(kv.key)
        except LeaseFormatError:
            out(f"not a lease key, skipped: {kv.key}")
            continue
        found.append(kv)
    steps: list[_Step] = []
    for kv in found:
        current = await target.get(kv.key)
        if current is None:
            action: Action = "write"
        elif current.value == kv.value:
            action = "identical"
        else:
            action = "conflict"
        steps.append(_Step(kv.key, bytes(kv.value), kv.ttl, action, current))
    return steps


async def migrate(
    source: V2Source,
    target: V3Target,
    prefix: str,
    *,
    dry_run: bool = False,
    force: bool = False,
    out: Callable[[str], None] = print,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Copy ``<prefix>/config`` and the leases from ``source`` (v2) to ``target`` (v3); print one
    line per key and a summary with ``out``. Returns the exit status: 0 done, 1 refused (a v3
    key holds a different value and not ``force``), nothing found in v2, or a key changed in v3
    meanwhile. Raises StoreError when etcd fails."""
    prefix = normalize_prefix(prefix)
    listed_at = clock()
    steps = await _plan(source, target, prefix, out)
    if not steps:
        out(
            f"nothing found in etcd's v2 keyspace under {prefix} (no {prefix}/config and no "
            "leases): check --etcd-prefix and --etcd-endpoints"
        )
        return 1
    conflicts = [s for s in steps if s.action == "conflict"]
    if conflicts and not force:
        for s in conflicts:
            assert s.current is not None
            out(
                f"conflict: {s.key} exists in v3 with a different value: v3 has "
                f"{_show(s.current.value)}, v2 has {_show(s.value)}"
            )
        verb = "a dry run would refuse" if dry_run else "refused"
        out(
            f"{verb}: {_plural(len(conflicts), 'key')} under {prefix} already in etcd's v3 "
            "keyspace with a different value; nothing written (--force overwrites them)"
        )
        return 1
    counts = _Counts()
    for s in steps:
        if s.action == "identical":
            counts.identical += 1
            out(f"identical in v3, skipped: {s.key}")
            continue
        ttl = s.ttl
        if ttl is not None:  # what is left of it now
            ttl = max(1, math.ceil(ttl - (clock() - listed_at)))
        overwrite = s.action == "conflict"
        if dry_run:
            verb = "would overwrite" if overwrite else "would write"
        else:
            ok = await _write(target, s, ttl)
            if not ok:
                counts.raced.append(s.key)
                out(f"changed in v3 during the migration, not written: {s.key}")
                continue
            verb = "overwrote" if overwrite else "wrote"
        was = f" (v3 had {_show(s.current.value)})" if overwrite and s.current else ""
        out(f"{verb} {s.key}{was} {_how(ttl)}: {_show(s.value)}")
        if ttl is None:
            counts.unleased += 1
        else:
            counts.leased += 1
        counts.overwritten += overwrite
    written = counts.leased + counts.unleased
    detail = (
        f"{counts.leased} with a lease, {counts.unleased} without"
        + (f", {counts.overwritten} overwritten" if counts.overwritten else "")
        + f"; {counts.identical} identical, skipped"
    )
    if dry_run:
        out(
            f"dry run: would copy {_plural(written, 'key')} from etcd's v2 to its v3 keyspace "
            f"under {prefix} ({detail}); nothing written"
        )
        return 0
    if counts.raced:
        out(
            f"copied {_plural(written, 'key')} ({detail}), but "
            f"{_plural(len(counts.raced), 'key')} changed in v3 meanwhile: run it again"
        )
        return 1
    if written == 0:
        out(
            f"nothing to copy: all {_plural(counts.identical, 'key')} under {prefix} are "
            "already identical in etcd's v3 keyspace"
        )
        return 0
    out(
        f"copied {_plural(written, 'key')} from etcd's v2 to its v3 keyspace under {prefix} "
        f"({detail})"
    )
    return 0


async def _write(target: V3Target, s: _Step, ttl: int | None) -> bool:
    """Write one key; False if the v3 key changed since it was read (a key that meanwhile
    got exactly our value counts as written)."""
    mod = s.current.mod_revision if s.action == "conflict" and s.current else None
    if ttl is None:
        ok = await target.put_unleased(s.key, s.value, mod)
    elif mod is None:
        ok = await target.create(s.key, s.value, ttl) is not None
    else:
        ok = await target.replace(s.key, s.value, ttl, mod) is not None
    if ok:
        return True
    now = await target.get(s.key)
    return now is not None and now.value == s.value


# ------------------------------------------------------------------------------------------
# the command


@dataclass(frozen=True)
class MigrateArgs:
    options: Options
    dry_run: bool = False
    force: bool = False


def parse_migrate_args(argv: Sequence[str], environ: Mapping[str, str]) -> MigrateArgs:
    """The subcommand's flags (Go syntax, as the daemon's); the ``--etcd-*`` flags are the
    daemon's, with the same ``FLANNELD_*``/CentOS variables. Raises ``cli.UsageError`` or
    ``cli.EarlyExit`` (``--help``)."""
    from flanneld_py import cli

    given: dict[str, list[str]] = {}
    flags: dict[str, bool] = {"dry-run": False, "force": False}
    direction: dict[str, str] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if len(arg) < 2 or not arg.startswith("-") or arg == "--":
            raise cli.UsageError(
                f"unexpected argument {arg!r}: migrate-etcd takes only flags like --name=value "
                "(see --help)"
            )
        body = arg[2:] if arg.startswith("--") else arg[1:]
        name, has_value, value = body.partition("=")
        if name in ("h", "help"):
            raise cli.EarlyExit(HELP)
        if name in flags:
            flags[name] = cli._bool_value(value, f"--{name}") if has_value else True
            continue
        if name not in ("from", "to") and name not in _ETCD_FLAGS:
            raise cli.UsageError(
                f"flag provided but not defined: -{name} (migrate-etcd takes --from, --to, "
                "--dry-run, --force and the --etcd-* flags; see --help)"
            )
        if not has_value:
            if i >= len(args):
                raise cli.UsageError(f"flag needs an argument: --{name}")
            value = args[i]
            i += 1
        if name in ("from", "to"):
            direction[name] = value.strip().lower()
        elif name == "etcd-endpoints":
            given.setdefault(name, []).append(value)
        else:
            given[name] = [value]
    src, dst = direction.get("from"), direction.get("to")
    if src is None or dst is None:
        raise cli.UsageError("--from v2 and --to v3 are required (the direction is never implied)")
    if (src, dst) != ("v2", "v3"):
        raise cli.UsageError(
            f"cannot migrate --from {src} --to {dst}: only --from v2 --to v3 is supported"
        )
    values: dict[str, Any] = {}
    for name in _ETCD_FLAGS:
        flag = cli._BY_NAME[name]
        if name in given:
            values[flag.field] = cli._convert(flag, given[name], f"--{name}", False)
            continue
        where = cli.env_var(name)
        env = environ.get(where, "")
        for legacy in cli.LEGACY_ENV.get(name, ()) if env == "" else ():
            env = environ.get(legacy, "").strip()
            if env:
                where = legacy
                break
        if env:
            values[flag.field] = cli._convert(flag, [env], where, True)
    options = Options(**values)
    cli._cross_check(options)
    return MigrateArgs(options, dry_run=flags["dry-run"], force=flags["force"])


async def _run(args: MigrateArgs) -> int:
    from dataclasses import replace

    from flanneld_py import cli
    from flanneld_py.store.etcdv2 import EtcdV2Store

    v2 = cli.build_store(replace(args.options, etcd_api="v2"))
    v3 = cli.build_store(replace(args.options, etcd_api="v3"))
    assert isinstance(v2, EtcdV2Store)
    try:
        return await migrate(
            v2,
            EtcdV3Target(v3),
            args.options.etcd_prefix,
            dry_run=args.dry_run,
            force=args.force,
            out=lambda line: print(line, flush=True),
        )
    finally:
        await v2.close()
        await v3.close()


def main(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> int:
    """``flanneld-py migrate-etcd ARGS``; returns the exit status."""
    from flanneld_py import cli

    env = os.environ if environ is None else environ
    try:
        args = parse_migrate_args(argv, env)
    except cli.EarlyExit as e:
        sys.stdout.write(e.text)
        sys.stdout.flush()
        return 0
    except cli.UsageError as e:
        sys.stderr.write(f"{COMMAND}: {e}\n")
        return 2
    cli.setup_logging("warning", env)
    try:
        return asyncio.run(_run(args))
    except StoreError as e:
        sys.stderr.write(f"{COMMAND}: {e}\n")
        return 1
    except KeyboardInterrupt:
        return 130
