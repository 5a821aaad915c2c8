"""flannel's iptables rules: masquerade (nat) and forward accept (filter), kept in place.

With ``ip_masq`` (n = the overlay Network, sn = our lease), chain ``FLANNEL-POSTRTG`` in the nat
table, jumped to from POSTROUTING::

    -s n -d n -j RETURN                              overlay-internal traffic keeps its source
    -s n ! -d 224.0.0.0/4 -j MASQUERADE --random-fully   containers going out: host's address
    ! -s n -d sn -j RETURN                           outside -> our containers: untouched
    ! -s n -d n -j MASQUERADE --random-fully         host -> remote containers: host's address

With ``forward_rules``, chain ``FLANNEL-FWD`` in the filter table, jumped to from FORWARD::

    -s n -j ACCEPT
    -d n -j ACCEPT

(docker sets the FORWARD policy to DROP when it switches ip_forward on; without these, cross-host
container traffic dies silently). Every rule carries a ``-m comment`` tag; the jumps are inserted
at position 1. Unlike flannel, :meth:`Firewall.setup` first removes chains and jumps left by an
earlier run (ours or real flanneld's), and :meth:`Firewall.teardown` removes ours on exit.

All commands run as asyncio subprocesses of ``<iptables> -w ...``; ``iptables`` is a command
prefix so that tests can run it as ``ip netns exec NS iptables``. Use the same iptables as docker
(on Debian 12 ``iptables`` is the nf_tables backend).
"""

from __future__ import annotations

import asyncio
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network

__all__ = [
    "COMMENT_FORWARD",
    "COMMENT_MASQ",
    "FORWARD_CHAIN",
    "MASQ_CHAIN",
    "Firewall",
    "FirewallError",
]

MASQ_CHAIN = "FLANNEL-POSTRTG"
FORWARD_CHAIN = "FLANNEL-FWD"
COMMENT_MASQ = "flanneld-py masq"
COMMENT_FORWARD = "flanneld-py forward"
#: comments of real flanneld's rules; old versions put them straight into POSTROUTING/FORWARD
LEGACY_COMMENTS = frozenset({"flanneld masq", "flanneld forward"})
MULTICAST = "224.0.0.0/4"
#: seconds ``-w`` waits for the xtables lock (legacy backend; nf_tables ignores it)
LOCK_WAIT = "10"


class FirewallError(Exception):
    """iptables is missing or failed; ``str(e)`` is one line."""


class FirewallUnavailable(FirewallError):
    """iptables cannot be run at all (missing binary, no permission): retrying will not help."""


@dataclass(frozen=True)
class _Chain:
    table: str
    name: str
    #: built-in chain that jumps to ``name``
    parent: str
    comment: str
    #: rule specs (without ``-A chain``), in the order ``iptables -S`` prints them
    rules: tuple[tuple[str, ...], ...]

    def jump(self) -> tuple[str, ...]:
        return ("-m", "comment", "--comment", self.comment, "-j", self.name)


class Firewall:
    """Install, check/repair and remove flanneld's rules for one (network, subnet)."""

    def __init__(
        self,
        network: IPv4Network,
        subnet: IPv4Network,
        ip_masq: bool,
        forward_rules: bool,
        iptables: Sequence[str] = ("iptables",),
        *,
        timeout: float = 30.0,
    ) -> None:
        if not iptables:
            raise ValueError("iptables command must not be empty")
        self.network = IPv4Network(network)
        self.subnet = IPv4Network(subnet)
        self.ip_masq = ip_masq
        self.forward_rules = forward_rules
        self.iptables = list(iptables)
        self.timeout = timeout
        #: does MASQUERADE accept --random-fully here? (probed once, on first use)
        self.random_fully: bool | None = None
        self._lock = asyncio.Lock()

    # --- the rules ------------------------------------------------------------------------
    def _masq_chain(self) -> _Chain:
        n, sn, c = str(self.network), str(self.subnet), COMMENT_MASQ
        tag = ("-m", "comment", "--comment", c)
        masq = ("-j", "MASQUERADE", *(("--random-fully",) if self.random_fully else ()))
        return _Chain(
            "nat",
            MASQ_CHAIN,
            "POSTROUTING",
            c,
            (
                ("-s", n, "-d", n, *tag, "-j", "RETURN"),
                ("-s", n, "!", "-d", MULTICAST, *tag, *masq),
                ("!", "-s", n, "-d", sn, *tag, "-j", "RETURN"),
                ("!", "-s", n, "-d", n, *tag, *masq),
            ),
        )

    def _forward_chain(self) -> _Chain:
        n = str(self.network)
        tag = ("-m", "comment", "--comment", COMMENT_FORWARD)
        return _Chain(
            "filter",
            FORWARD_CHAIN,
            "FORWARD",
            COMMENT_FORWARD,
            (("-s", n, *tag, "-j", "ACCEPT"), ("-d", n, *tag, "-j", "ACCEPT")),
        )

    def _wanted(self) -> list[_Chain]:
        out = []
        if self.ip_masq:
            out.append(self._masq_chain())
        if self.forward_rules:
            out.append(self._forward_chain())
        return out

    def expected_rules(self) -> list[str]:
        """The rules as ``iptables-save`` lines prefixed by the table, e.g. for logs."""
        lines = []
        for ch in self._wanted():
            lines.append(f"-t {ch.table} -A {ch.parent} {_save_join(ch.jump())}")
            lines += [f"-t {ch.table} -A {ch.name} {_save_join(r)}" for r in ch.rules]
        return lines

    # --- public API -----------------------------------------------------------------------
    async def setup(self) -> bool:
        """Install the rules: kept as they are when exactly ours are in place already (a restart
        that kept them: no moment without them), else stale chains and jumps of an earlier run
        are removed and the rules installed afresh. Returns True when the rules were kept."""
        async with self._lock:
            await self._probe()
            if await self._in_place():
                return True
            await self._remove_all(legacy=True)
            for ch in self._wanted():
                await self._ipt(ch.table, "-N", ch.name)
                await self._fill(ch)
                await self._ipt(ch.table, "-I", ch.parent, "1", *ch.jump())
            return False

    async def check_and_repair(self) -> list[str]:
        """Re-create what is missing or altered; return what was fixed (empty when all is well)."""
        async with self._lock:
            await self._probe()
            fixed: list[str] = []
            for ch in self._wanted():
                rc, out, _ = await self._ipt(ch.table, "-S", ch.name, check=False)
                created = False
                if rc != 0:
                    # missing, or a transient nf_tables failure: -N tells which
                    rc, _, err = await self._ipt(ch.table, "-N", ch.name, check=False)
                    if rc == 0:
                        await self._fill(ch)
                        fixed.append(f"{ch.table} chain {ch.name} was missing: recreated")
                        created = True
                    elif "exists" in err:
                        out = (await self._ipt(ch.table, "-S", ch.name))[1]
                    else:
                        raise self._error(ch.table, ("-N", ch.name), err, rc)
                if not created and self._chain_rules(out, ch.name) != [list(r) for r in ch.rules]:
                    await self._ipt(ch.table, "-F", ch.name)
                    await self._fill(ch)
                    fixed.append(f"{ch.table} chain {ch.name} had missing/altered rules: rewritten")
                rc, _, _ = await self._ipt(ch.table, "-C", ch.parent, *ch.jump(), check=False)
                if rc != 0:
                    await self._ipt(ch.table, "-I", ch.parent, "1", *ch.jump())
                    fixed.append(f"{ch.table} jump {ch.parent} -> {ch.name} was missing: restored")
            return fixed

    async def teardown(self) -> None:
        """Remove our jumps and chains (whatever the configuration); absent ones are fine."""
        async with self._lock:
            await self._remove_all(legacy=False)

    # --- helpers --------------------------------------------------------------------------
    async def _in_place(self) -> bool:
        """Whether the tables hold exactly our wanted chains, each with its rules and one jump,
        none of the chains we do not want, and no legacy flanneld rule."""
        wanted = {ch.name: ch for ch in self._wanted()}
        for table, chain in (("nat", MASQ_CHAIN), ("filter", FORWARD_CHAIN)):
            _, listing, _ = await self._ipt(table, "-S")
            lines = [shlex.split(line) for line in listing.splitlines()]
            exists = any(t[:2] == ["-N", chain] for t in lines)
            jumps = [t for t in lines if t[:1] == ["-A"] and t[1:2] != [chain]
                     and _target(t) == chain]  # fmt: skip
            if any(t[:1] == ["-A"] and _comment(t) in LEGACY_COMMENTS for t in lines):
                return False
            ch = wanted.get(chain)
            if ch is None:
                if exists or jumps:
                    return False
                continue
            if not exists or self._chain_rules(listing, chain) != [list(r) for r in ch.rules]:
                return False
            if len(jumps) != 1 or jumps[0][1:] != [ch.parent, *ch.jump()]:
                return False
        return True

    async def _fill(self, ch: _Chain) -> None:
        for rule in ch.rules:
            rc, _, err = await self._ipt(ch.table, "-A", ch.name, *rule, check=False)
            if rc != 0 and "--random-fully" in rule:
                # the binary knew the option but the kernel refused it: fall back once
                self.random_fully = False
                await self._ipt(ch.table, "-F", ch.name)
                await self._fill(self._masq_chain())
                return
            if rc != 0:
                raise self._error(ch.table, ("-A", ch.name, *rule), err)

    @staticmethod
    def _chain_rules(listing: str, chain: str) -> list[list[str]]:
        rules = []
        for line in listing.splitlines():
            tokens = shlex.split(line)
            if tokens[:2] == ["-A", chain]:
                rules.append(tokens[2:])
        return rules

    async def _remove_all(self, *, legacy: bool) -> None:
        """Delete every rule jumping to our chains (and real flanneld's legacy rules), then the
        chains."""
        for table, chain in (("nat", MASQ_CHAIN), ("filter", FORWARD_CHAIN)):
            _, listing, _ = await self._ipt(table, "-S")
            for line in listing.splitlines():
                tokens = shlex.split(line)
                if len(tokens) < 2 or tokens[0] != "-A" or tokens[1] == chain:
                    continue
                jumps_to_ours = _target(tokens) == chain
                old_flannel = legacy and _comment(tokens) in LEGACY_COMMENTS
                if jumps_to_ours or old_flannel:
                    rc, _, err = await self._ipt(table, "-D", *tokens[1:], check=False)
                    if rc not in (0, 1):  # 1: gone meanwhile
                        raise self._error(table, ("-D", *tokens[1:]), err)
            if any(shlex.split(line)[:2] == ["-N", chain] for line in listing.splitlines()):
                await self._ipt(table, "-F", chain, check=False)
                rc, _, err = await self._ipt(table, "-X", chain, check=False)
                if rc != 0:
                    raise self._error(table, ("-X", chain), err)

    async def _probe(self) -> None:
        if self.random_fully is not None or not self.ip_masq:
            return
        rc, out, _ = await self._run("-j", "MASQUERADE", "--help", check=False)
        self.random_fully = rc == 0 and "--random-fully" in out

    async def _ipt(self, table: str, *args: str, check: bool = True) -> tuple[int, str, str]:
        rc, out, err = await self._run("-t", table, *args, check=False)
        if check and rc != 0:
            # nf_tables can fail transiently (rc 4, no message) when many rulesets change at
            # once; a command that must succeed gets two more tries before it is an error
            for delay in (0.2, 1.0):
                await asyncio.sleep(delay)
                rc, out, err = await self._run("-t", table, *args, check=False)
                if rc == 0:
                    break
            else:
                raise self._error(table, args, err, rc)
        return rc, out, err

    def _error(self, table: str, args: Sequence[str], err: str, rc: int = 1) -> FirewallError:
        lines = [ln.strip() for ln in err.splitlines() if ln.strip() and not ln.startswith("Try ")]
        why = lines[-1] if lines else f"exit status {rc}"
        cmd = shlex.join([*self.iptables, "-t", table, *args])
        return FirewallError(f"`{cmd}` failed: {why}")

    async def _run(self, *args: str, check: bool = True) -> tuple[int, str, str]:
        # subprocess.run in a worker thread, not the event loop's subprocess support: children
        # spawned by uvloop's spawn path were seen to crash (SIGSEGV) or fail silently here
        argv = [*self.iptables, "-w", LOCK_WAIT, *args]
        try:
            proc = await asyncio.to_thread(
                subprocess.run,
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=self.timeout,
                check=False,
            )
        except FileNotFoundError:
            raise FirewallUnavailable(
                f"`{self.iptables[0]}` not found: install iptables (apt-get install iptables)"
            ) from None
        except PermissionError:
            raise FirewallUnavailable(
                f"cannot run `{self.iptables[0]}`: permission denied"
            ) from None
        except subprocess.TimeoutExpired:
            raise FirewallError(
                f"`{shlex.join(argv)}` did not finish in {self.timeout:.0f}s "
                "(xtables lock held by another program?)"
            ) from None
        rc = proc.returncode
        out, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
        if check and rc != 0:
            raise FirewallError(f"`{shlex.join(argv)}` failed: {err.strip() or rc}")
        return rc, out, err


def _target(tokens: list[str]) -> str | None:
    for i, tok in enumerate(tokens[:-1]):
        if tok in ("-j", "-g", "--jump", "--goto"):
            return tokens[i + 1]
    return None


def _comment(tokens: list[str]) -> str | None:
    for i, tok in enumerate(tokens[:-1]):
        if tok == "--comment":
            return tokens[i + 1]
    return None


def _save_join(tokens: Sequence[str]) -> str:
    """Tokens joined the way iptables-save prints them (double quotes around spaces)."""
    return " ".join(f'"{t}"' if " " in t else t for t in tokens)
