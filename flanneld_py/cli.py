"""Command line: flannel's flags and ``FLANNELD_*`` variables -> :class:`Options`; ``main``.

Flag syntax follows Go's ``flag`` package, as flanneld does: ``-name`` and ``--name`` are the same,
values go as ``--name=value`` or ``--name value``, bool flags are ``--name`` or ``--name=false``.
Every flag that is not on the command line is read from ``FLANNELD_<NAME>`` (upper case, ``-`` ->
``_``) when that variable is non-empty. Two deliberate differences from Go, both stricter: a stray
argument (``--ip-masq false``) is an error instead of silently ending the flags, and an invalid
value in the environment is an error instead of a log line.

Errors are one line on stderr and exit code 2; ``--help`` and ``--version`` print to stdout and
exit 0. ``main`` then sets up logging, picks the event loop and runs ``flanneld_py.daemon.run``.
"""

from __future__ import annotations

import asyncio
import importlib
import ipaddress
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import urlsplit

from flanneld_py import __version__
from flanneld_py.options import Options
from flanneld_py.store import LeaseStore, StoreError
from flanneld_py.tlsfiles import TlsFileError, check_tls_files

__all__ = [
    "ENV_PREFIX",
    "FLAGS",
    "EarlyExit",
    "UsageError",
    "build_store",
    "entry",
    "env_var",
    "event_loop_factory",
    "main",
    "parse_args",
    "setup_logging",
    "usage_text",
]

PROG = "flanneld-py"
#: the subcommand that copies a v2 cluster's config and leases to v3 (flanneld_py.migrate)
MIGRATE_COMMAND = "migrate-etcd"
ENV_PREFIX = "FLANNELD_"

log = logging.getLogger("flanneld_py.cli")


class UsageError(Exception):
    """A bad flag or ``FLANNELD_*`` value. ``str(e)`` is a one-line message."""


class EarlyExit(Exception):
    """``--help`` or ``--version``: print ``text`` on stdout and exit 0."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


# -- the flag table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flag:
    """One command-line flag. ``kind`` picks the converter; ``field`` is the Options attribute."""

    name: str
    kind: str  # "str", "optstr", "file", "bool", "int", "float", "choice", "list"
    help: str
    metavar: str = "VALUE"
    #: what --help shows as the default; None = derived from Options' default
    default_text: str | None = None
    choices: tuple[str, ...] = ()
    #: (min, max) for int/float, inclusive; None = unbounded on that side
    bounds: tuple[float | None, float | None] = (None, None)
    hidden: bool = False
    #: list flags: split values from the environment on commas
    env_split: bool = True
    #: list flags: split values from the command line on commas too
    cli_split: bool = False

    @property
    def field(self) -> str:
        return self.name.replace("-", "_")


FLAGS: tuple[Flag, ...] = (
    Flag("etcd-endpoints", "list", "etcd client URLs http(s)://host:port, comma-separated", "URLS",
         default_text=",".join(Options.etcd_endpoints), cli_split=True),
    Flag("etcd-prefix", "str", "etcd key prefix of the network config and leases", "PATH"),
    Flag("etcd-keyfile", "file", "TLS client key for etcd (with --etcd-certfile)", "FILE"),
    Flag("etcd-certfile", "file", "TLS client certificate for etcd (with --etcd-keyfile)", "FILE"),
    Flag("etcd-cafile", "file", "CA bundle for etcd's server certificate", "FILE"),
    Flag("etcd-username", "optstr", "etcd user (with --etcd-password)", "NAME"),
    Flag("etcd-password", "optstr", "etcd password (with --etcd-username)", "PASSWORD"),
    Flag("etcd-api", "choice", "etcd API: v3 (flanneld >= v0.18), v2 (flanneld <= v0.17, etcd "
         "--enable-v2), auto = the keyspace holding <prefix>/config, v3 if both", "API",
         choices=("auto", "v3", "v2")),
    Flag("iface", "list", "interface (name or IPv4) for host-to-host traffic; repeatable, "
         "first match wins", "IFACE", default_text="interface of the default route",
         cli_split=True),
    Flag("iface-regex", "list", "regex for the interface name or IPv4, tried after --iface; "
         "repeatable", "REGEX", default_text="none", env_split=False),
    Flag("public-ip", "optstr", "IPv4 address peers send to (the lease's PublicIP)", "IP",
         default_text="address of the chosen interface"),
    Flag("ip-masq", "bool", "masquerade traffic leaving the overlay (docker: --ip-masq=false)"),
    Flag("subnet-file", "str", "where FLANNEL_NETWORK/SUBNET/MTU/IPMASQ are written", "FILE"),
    Flag("subnet-lease-renew-margin", "int", "renew the lease this many minutes before expiry, "
         "1-1439", "MINUTES", bounds=(1, 1439)),
    Flag("healthz-ip", "str", "address of the health server (/healthz liveness, /readyz "
         "readiness, /status JSON)", "IP"),
    Flag("healthz-port", "int", "port of the health server; 0 = no server", "PORT",
         bounds=(0, 65535)),
    Flag("iptables-resync", "int", "seconds between checks of our iptables rules", "SECONDS",
         bounds=(1, None)),
    Flag("iptables-forward-rules", "bool", "add FORWARD accept rules for the overlay network"),
    Flag("docker-opts-file", "str", "where docker's options are written (mk-docker-opts.sh "
         "format); \"\" = don't", "FILE"),
    Flag("event-loop", "choice", "event loop (uvloop falls back to asyncio if missing)", "LOOP",
         choices=("uvloop", "asyncio")),
    Flag("engine", "choice", "packet engine (auto = C extension if built, else Python)", "ENGINE",
         choices=("auto", "c", "python")),
    Flag("offload", "choice", "segmentation offloads of the C engine (TUN TSO, UDP GSO/GRO): "
         "auto = what the kernel accepts, off = none", "MODE", choices=("auto", "off")),
    Flag("engine-threads", "int", "threads of the C engine, each with its own TUN queue and UDP "
         "socket (flows spread over them); 0 = one per CPU", "N", bounds=(0, 64)),
    Flag("tun-name", "str", "name of the TUN device", "NAME"),
    Flag("control-socket", "str", "local unix socket (root only) for `flanneld-py status`: "
         "/healthz, /readyz, /status, /metrics; \"\" = none", "PATH"),
    Flag("log-level", "choice", "log threshold", "LEVEL",
         choices=("debug", "info", "warning", "error")),
    # hidden: for tests only
    Flag("subnet-lease-ttl", "int", "TTL of the subnet lease in seconds (tests only)", "SECONDS",
         bounds=(1, None), hidden=True),
    Flag("config-poll-interval", "float", "seconds between reads of the network config while "
         "waiting for it (tests only)", "SECONDS", bounds=(0.001, 3600), hidden=True),
)  # fmt: skip

_BY_NAME = {f.name: f for f in FLAGS}
_HELP_NAMES = ("h", "help")
_VERSION = "version"

# strconv.ParseBool
_TRUE = frozenset({"1", "t", "T", "true", "TRUE", "True"})
_FALSE = frozenset({"0", "f", "F", "false", "FALSE", "False"})
_INT_RE = re.compile(r"[+-]?[0-9]+")


#: the variables of CentOS/RHEL's flannel package (``/etc/sysconfig/flanneld``, read by its
#: ``flanneld-start``), used when neither the flag nor its ``FLANNELD_*`` variable is set
LEGACY_ENV: dict[str, tuple[str, ...]] = {
    "etcd-endpoints": ("FLANNEL_ETCD_ENDPOINTS", "FLANNEL_ETCD"),
    "etcd-prefix": ("FLANNEL_ETCD_PREFIX", "FLANNEL_ETCD_KEY"),
}


def env_var(flag_name: str) -> str:
    """``etcd-endpoints`` -> ``FLANNELD_ETCD_ENDPOINTS``."""
    return ENV_PREFIX + flag_name.upper().replace("-", "_")


# -- parsing -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str], environ: Mapping[str, str]) -> Options:
    """Flags in ``argv`` (without the program name), completed from ``environ``, validated.

    Raises :class:`UsageError` (one-line message) or :class:`EarlyExit` (``--help``/``--version``).
    Reads the file system only to check the TLS files given: that they exist and hold PEM
    certificates / an unencrypted PEM key matching the certificate (``flanneld_py.tlsfiles``).
    """
    given, want_version = _scan(argv)
    if want_version:
        raise EarlyExit(f"{PROG} {__version__}\n")

    values: dict[str, Any] = {}
    for flag in FLAGS:
        if flag.name in given:
            raws = given[flag.name]
            where = f"--{flag.name}"
            from_env = False
        else:
            where = env_var(flag.name)
            env = environ.get(where, "")
            for legacy in LEGACY_ENV.get(flag.name, ()) if env == "" else ():
                env = environ.get(legacy, "").strip()
                if env:
                    where = legacy
                    break
            if env == "":
                continue
            raws = [env]
            from_env = True
        values[flag.field] = _convert(flag, raws, where, from_env)

    options = Options(**values)
    _cross_check(options)
    return options


def _scan(argv: Sequence[str]) -> tuple[dict[str, list[str]], bool]:
    """Go-style flag syntax -> {flag name: raw values in order}, and whether --version was given."""
    given: dict[str, list[str]] = {}
    want_version = False
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            if i < len(args):
                raise UsageError(f"unexpected argument {args[i]!r}: {PROG} takes only flags")
            break
        if len(arg) < 2 or not arg.startswith("-"):
            raise UsageError(
                f"unexpected argument {arg!r}: {PROG} takes only flags like --name=value "
                "(see --help)"
            )
        body = arg[2:] if arg.startswith("--") else arg[1:]
        name, has_value, value = body.partition("=")
        if not name or name.startswith("-"):
            raise UsageError(f"bad flag syntax: {arg}")
        if name in _HELP_NAMES:
            raise EarlyExit(usage_text())
        if name == _VERSION:
            want_version = _bool_value(value, f"--{name}") if has_value else True
            continue
        flag = _BY_NAME.get(name)
        if flag is None:
            raise UsageError(f"flag provided but not defined: -{name} (see --help)")
        if flag.kind == "bool":
            if not has_value:
                if i < len(args) and (args[i] in _TRUE or args[i] in _FALSE):
                    raise UsageError(f"--{name} takes no separate value: write --{name}={args[i]}")
                value = "true"
        elif not has_value:
            if i >= len(args):
                raise UsageError(f"flag needs an argument: --{name}")
            value = args[i]
            i += 1
        if flag.kind == "list":
            given.setdefault(name, []).append(value)
        else:
            given[name] = [value]  # Go: the last one wins
    return given, want_version


def _bool_value(raw: str, where: str) -> bool:
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise UsageError(f"invalid value {raw!r} for {where}: use true or false")


def _convert(flag: Flag, raws: list[str], where: str, from_env: bool) -> Any:
    def bad(raw: str, why: str) -> UsageError:
        return UsageError(f"invalid value {raw!r} for {where}: {why}")

    raw = raws[-1]
    kind = flag.kind
    if kind == "bool":
        return _bool_value(raw.strip() if from_env else raw, where)
    if kind in ("int", "float"):
        text = raw.strip()
        number: float
        if kind == "int":
            if not _INT_RE.fullmatch(text):
                raise bad(raw, "not an integer")
            number = int(text)
        else:
            try:
                number = float(text)
            except ValueError:
                raise bad(raw, "not a number") from None
            if not math.isfinite(number):
                raise bad(raw, "not a finite number")
        low, high = flag.bounds
        if (low is not None and number < low) or (high is not None and number > high):
            if high is None:
                raise bad(raw, f"must be at least {_num(low)}")
            if low is None:
                raise bad(raw, f"must be at most {_num(high)}")
            raise bad(raw, f"must be in {_num(low)}..{_num(high)}")
        return number
    if kind == "choice":
        choice = raw.strip().lower()
        if choice not in flag.choices:
            raise bad(raw, "choose one of " + ", ".join(flag.choices))
        return choice
    if kind == "list":
        items: list[str] = []
        for one in raws:
            parts = one.split(",") if (flag.env_split if from_env else flag.cli_split) else [one]
            items.extend(p.strip() for p in parts if p.strip())
        return _check_list(flag, items, where)
    # strings
    if kind == "str":
        return _check_str(flag, raw, where)
    value = raw.strip()
    if value == "":
        return None
    if kind == "file":
        if not os.path.isfile(value):
            raise bad(raw, "no such file")
        if not os.access(value, os.R_OK):
            raise bad(raw, "file is not readable")
    elif flag.name == "public-ip":
        _check_public_ip(value, where)
    return value


def _num(x: float | None) -> str:
    return f"{x:g}"


def _check_list(flag: Flag, items: list[str], where: str) -> tuple[str, ...]:
    if flag.name == "etcd-endpoints":
        if not items:
            raise UsageError(f"{where} is empty: give at least one http(s)://host:port URL")
        return tuple(_check_endpoint(item, where) for item in items)
    if flag.name == "iface-regex":
        for item in items:
            try:
                re.compile(item)
            except re.error as e:
                raise UsageError(f"invalid value {item!r} for {where}: bad regex ({e})") from None
    return tuple(items)


def _check_endpoint(url: str, where: str) -> str:
    def bad(why: str) -> UsageError:
        return UsageError(f"invalid etcd endpoint {url!r} in {where}: {why}")

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise bad(f"{e}; expected http(s)://host:port") from None
    if parts.scheme not in ("http", "https"):
        raise bad("expected http(s)://host:port")
    if not parts.hostname:
        raise bad("no host; expected http(s)://host:port")
    if port is None:
        raise bad("no port; expected http(s)://host:port (etcd listens on 2379)")
    if parts.username is not None or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise bad("only http(s)://host:port is allowed (no user, path or query)")
    return f"{parts.scheme}://{parts.netloc}"


def _check_str(flag: Flag, raw: str, where: str) -> str:
    def bad(why: str) -> UsageError:
        return UsageError(f"invalid value {raw!r} for {where}: {why}")

    name = flag.name
    if name in ("docker-opts-file", "control-socket"):
        return raw.strip()
    value = raw.strip()
    if not value:
        raise bad("must not be empty")
    if name == "healthz-ip":
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise bad("not an IP address") from None
    elif name == "tun-name" and (
        # the kernel's dev_valid_name(): 1..15 bytes, not . or .., no '/', ':' or whitespace
        len(value.encode()) > 15
        or value in (".", "..")
        or any(c in "/:" or c.isspace() for c in value)
    ):
        raise bad("not a valid interface name (1-15 bytes, no '/', ':' or spaces)")
    return value


def _check_public_ip(value: str, where: str) -> None:
    try:
        ip = ipaddress.IPv4Address(value)
    except ValueError:
        raise UsageError(f"invalid value {value!r} for {where}: not an IPv4 address") from None
    if ip.is_unspecified or ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255"):
        raise UsageError(f"invalid value {value!r} for {where}: not a unicast address")


def _cross_check(o: Options) -> None:
    if (o.etcd_keyfile is None) != (o.etcd_certfile is None):
        raise UsageError("--etcd-keyfile and --etcd-certfile must be given together")
    if (o.etcd_username is None) != (o.etcd_password is None):
        raise UsageError("--etcd-username and --etcd-password must be given together")
    try:
        check_tls_files(o.etcd_cafile, o.etcd_certfile, o.etcd_keyfile)
    except TlsFileError as e:
        raise UsageError(str(e)) from None


# -- help ----------------------------------------------------------------------------------------


def usage_text() -> str:
    """The ``--help`` text: one line per (visible) flag with its default."""
    defaults = Options()
    rows: list[tuple[str, str]] = []
    for flag in FLAGS:
        if flag.hidden:
            continue
        left = f"--{flag.name}" if flag.kind == "bool" else f"--{flag.name}={flag.metavar}"
        if flag.default_text is not None:
            default = flag.default_text
        else:
            value = getattr(defaults, flag.field)
            if isinstance(value, bool):
                default = str(value).lower()
            elif value is None:
                default = "none"
            else:
                default = str(value) if value != "" else '""'
        extra = f" {{{'|'.join(flag.choices)}}}" if flag.choices else ""
        rows.append((left, f"{flag.help}{extra} (default: {default})"))
    width = max(len(left) for left, _ in rows) + 2
    lines = [
        f"Usage: {PROG} [--flag=value]...",
        "",
        "A flannel-compatible overlay network daemon for Docker hosts (backends udp, vxlan,",
        "host-gw; etcd v3, or v2 for flanneld <= v0.17 clusters: --etcd-api).",
        "Flags may be written -flag or --flag, with =value or a separate value; bool flags as",
        "--flag or --flag=false. A flag not on the command line is read from FLANNELD_<FLAG>",
        "(upper case, '-' -> '_', e.g. FLANNELD_ETCD_ENDPOINTS) when that is set; there",
        "--iface takes a comma list, --iface-regex one regex. Without either, --etcd-endpoints",
        "and --etcd-prefix also come from FLANNEL_ETCD_ENDPOINTS (or FLANNEL_ETCD) and",
        "FLANNEL_ETCD_PREFIX (or FLANNEL_ETCD_KEY), as in CentOS's /etc/sysconfig/flanneld.",
        "",
        *(f"  {left:<{width}}{right}" for left, right in rows),
        f"  {'--version':<{width}}print the version and exit",
        f"  {'--help':<{width}}print this help and exit",
        "",
        "Commands (each has its own --help):",
        f"  {PROG} status [--json]   what the running daemon holds: lease, backend, peers, drops",
        f"  {PROG} doctor [--json]   checks this host (docker options, docker0, FORWARD,",
        "                            MTU, rp_filter, peers through the overlay, etcd): what to fix",
        f"  {PROG} {MIGRATE_COMMAND} --from v2 --to v3 [--dry-run] [--force]",
        "                            copies a v2 cluster's config and leases to etcd's v3 keyspace",
        "",
    ]
    return "\n".join(lines)


# -- logging and event loop ----------------------------------------------------------------------

_SYSLOG_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class _LineFormatter(logging.Formatter):
    """``<ts> LEVEL module: message`` on exactly one line (tracebacks folded with `` | ``).

    Under journald (which timestamps by itself) the line starts with ``<priority>`` instead.
    """

    def __init__(self, journald: bool) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        name = record.name.removeprefix("flanneld_py.")
        text = f"{record.levelname} {name}: {record.getMessage()}"
        if record.exc_info:
            text += " | " + self.formatException(record.exc_info)
        if record.stack_info:
            text += " | " + self.formatStack(record.stack_info)
        text = " | ".join(line for line in text.splitlines() if line.strip())
        if self.journald:
            return f"<{_SYSLOG_PRIORITY.get(record.levelno, 6)}>{text}"
        ts = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        return f"{ts}.{int(record.msecs):03d} {text}"


def _stderr_is_journal(environ: Mapping[str, str]) -> bool:
    stream = environ.get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return bool(stream) and (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):
        return False


_HANDLER_NAME = "flanneld-py"


def setup_logging(level: str, environ: Mapping[str, str] | None = None) -> None:
    """One line per message on stderr; ``level`` applies to flanneld_py, others log warnings+."""
    env = os.environ if environ is None else environ
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LineFormatter(journald=_stderr_is_journal(env)))
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == _HANDLER_NAME:  # called again: replace ours, keep anyone else's
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("flanneld_py").setLevel(level.upper())
    logging.captureWarnings(True)


def event_loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None (= asyncio's default) for "asyncio" or missing uvloop."""
    if choice != "uvloop":
        return None
    try:
        import uvloop
    except ImportError as e:
        log.warning("uvloop is not importable (%s); using the asyncio event loop", e)
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


# -- entry points --------------------------------------------------------------------------------


def build_store(options: Options) -> LeaseStore:
    """The daemon's lease store at ``--etcd-endpoints``, by ``--etcd-api``: etcd's v3 API
    (``EtcdStore``), its v2 API (``EtcdV2Store``), or ``auto``: an ``AutoStore`` over both that
    uses the keyspace holding ``<prefix>/config``. Raises StoreError."""
    from flanneld_py.store.etcd import EtcdSettings, EtcdStore

    try:
        settings = EtcdSettings(
            endpoints=list(options.etcd_endpoints),
            username=options.etcd_username,
            password=options.etcd_password,
            keyfile=options.etcd_keyfile,
            certfile=options.etcd_certfile,
            cafile=options.etcd_cafile,
        )
    except ValueError as e:
        raise StoreError(str(e)) from None
    if options.etcd_api == "v3":
        return EtcdStore(settings)
    from flanneld_py.store.etcdv2 import EtcdV2Store

    if options.etcd_api == "v2":
        return EtcdV2Store(settings)
    from flanneld_py.lease import normalize_prefix
    from flanneld_py.store.select import AutoStore

    config_key = normalize_prefix(options.etcd_prefix) + "/config"
    return AutoStore(EtcdStore(settings), EtcdV2Store(settings), config_key)


def main(argv: list[str] | None = None) -> int:
    """Parse flags, set up logging, run the daemon; returns the process exit code."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == MIGRATE_COMMAND:
        from flanneld_py import migrate

        return migrate.main(args[1:], os.environ)
    if args and args[0] == "status":
        from flanneld_py import statuscmd

        return statuscmd.main(args[1:])
    if args and args[0] == "doctor":
        from flanneld_py import doctor

        return doctor.main(args[1:])
    try:
        options = parse_args(args, os.environ)
    except EarlyExit as e:
        sys.stdout.write(e.text)
        sys.stdout.flush()
        return 0
    except UsageError as e:
        sys.stderr.write(f"{PROG}: {e}\n")
        return 2

    setup_logging(options.log_level)
    try:
        daemon = importlib.import_module("flanneld_py.daemon")
    except ImportError as e:
        log.critical("cannot load the daemon (%s): reinstall flanneld-py", e)
        return 1
    try:
        store = build_store(options)
    except StoreError as e:
        log.error("%s", e)
        return 1
    try:
        # we own the loop (uvloop or asyncio); the daemon gets its store from us
        factory = event_loop_factory(options.event_loop)
        with asyncio.Runner(loop_factory=factory) as runner:
            code = runner.run(daemon.run(options, store))
    except KeyboardInterrupt:
        log.info("interrupted")
        return 130
    except Exception:
        log.critical("unexpected error (a bug; please report it)", exc_info=True)
        return 1
    return int(code or 0)


def entry() -> NoReturn:
    """Console script ``flanneld-py`` and ``python -m flanneld_py``."""
    sys.exit(main())
