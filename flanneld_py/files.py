"""The files flanneld leaves for docker: ``subnet.env`` and the docker options file.

Texts are built by pure functions, byte for byte what flannel writes (``subnet.env``) and what
flannel's ``mk-docker-opts.sh -k DOCKER_NETWORK_OPTIONS -d /run/flannel/docker`` derives from it.
:func:`write_atomic` puts them in place with temp file + fsync + rename, so a reader (systemd's
``EnvironmentFile=``, ``source``) never sees half a file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from ipaddress import IPv4Interface, IPv4Network

__all__ = [
    "docker_opts_text",
    "read_previous_network",
    "read_previous_subnet",
    "read_subnet_env",
    "subnet_env_text",
    "write_atomic",
]

#: a subnet.env is a few dozen bytes; anything bigger is not ours
_MAX_READ = 64 * 1024


def _bip(subnet: IPv4Network) -> str:
    """The address docker's ``--bip`` wants: the lease's first host, with the lease's prefix."""
    return f"{subnet.network_address + 1}/{subnet.prefixlen}"


def subnet_env_text(network: IPv4Network, subnet: IPv4Network, mtu: int, ip_masq: bool) -> str:
    """``/run/flannel/subnet.env`` as flanneld writes it (no quotes, trailing newline)::

    FLANNEL_NETWORK=10.5.0.0/16
    FLANNEL_SUBNET=10.5.18.1/24
    FLANNEL_MTU=1472
    FLANNEL_IPMASQ=true
    """
    if not subnet.subnet_of(network):
        raise ValueError(f"subnet {subnet} is not inside network {network}")
    return (
        f"FLANNEL_NETWORK={network}\n"
        f"FLANNEL_SUBNET={_bip(subnet)}\n"
        f"FLANNEL_MTU={mtu}\n"
        f"FLANNEL_IPMASQ={'true' if ip_masq else 'false'}\n"
    )


def docker_opts_text(network: IPv4Network, subnet: IPv4Network, mtu: int, ip_masq: bool) -> str:
    """What ``mk-docker-opts.sh -k DOCKER_NETWORK_OPTIONS`` writes for our subnet.env::

    DOCKER_OPT_BIP="--bip=10.5.18.1/24"
    DOCKER_OPT_IPMASQ="--ip-masq=false"
    DOCKER_OPT_MTU="--mtu=1472"
    DOCKER_NETWORK_OPTIONS=" --bip=10.5.18.1/24 --ip-masq=false --mtu=1472"

    ``--ip-masq`` is inverted: when flanneld masquerades docker must not, and vice versa. The
    individual options come in the script's (alphabetical) order; the combined value starts with a
    space. ``network`` is unused (the script ignores FLANNEL_NETWORK) but kept for symmetry with
    :func:`subnet_env_text`.
    """
    if not subnet.subnet_of(network):
        raise ValueError(f"subnet {subnet} is not inside network {network}")
    opts = [
        ("DOCKER_OPT_BIP", f"--bip={_bip(subnet)}"),
        ("DOCKER_OPT_IPMASQ", f"--ip-masq={'false' if ip_masq else 'true'}"),
        ("DOCKER_OPT_MTU", f"--mtu={mtu}"),
    ]
    lines = [f'{name}="{value}"' for name, value in opts]
    combined = "".join(f" {value}" for _, value in opts)
    lines.append(f'DOCKER_NETWORK_OPTIONS="{combined}"')
    return "\n".join(lines) + "\n"


def write_atomic(path: str | os.PathLike[str], text: str, mode: int = 0o644) -> None:
    """Replace ``path`` with ``text`` atomically (temp file in the same directory, fsync, rename).

    Creates the parent directory (0755) if missing. The file gets exactly ``mode``, whatever the
    umask. On failure raises ``OSError`` whose ``str()`` is one line naming the file and the cause,
    and leaves no temp file behind.
    """
    target = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(target))
    tmp: str | None = None
    try:
        os.makedirs(parent, mode=0o755, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=parent, prefix=f".{os.path.basename(target)}.", suffix=".tmp"
        )
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, target)
        tmp = None
        _fsync_dir(parent)
    except OSError as e:
        why = e.strerror or str(e)
        hint = " (run as root or choose another path)" if isinstance(e, PermissionError) else ""
        raise OSError(f"cannot write {target}: {why}{hint}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _fsync_dir(path: str) -> None:
    """Make the rename durable; some file systems refuse to fsync a directory, which is fine."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def read_subnet_env(path: str | os.PathLike[str]) -> dict[str, str]:
    """``KEY=value`` pairs of a subnet.env-like file; {} if it is missing or unreadable.

    Tolerates what a hand-edited file may contain: comments, blank lines, ``export``, quotes.
    Never raises.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_READ + 1)
        if len(data) > _MAX_READ:
            return {}
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    env: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").lstrip()
        key, eq, value = line.partition("=")
        if not eq:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def _read_net(path: str | os.PathLike[str], key: str) -> IPv4Network | None:
    value = read_subnet_env(path).get(key)
    if not value or "/" not in value:
        return None
    try:
        return IPv4Interface(value).network
    except ValueError:
        return None


def read_previous_subnet(path: str | os.PathLike[str]) -> IPv4Network | None:
    """The lease a previous run held: ``FLANNEL_SUBNET=10.5.18.1/24`` -> ``10.5.18.0/24``.

    None if the file is missing, unreadable or garbled. Never raises.
    """
    return _read_net(path, "FLANNEL_SUBNET")


def read_previous_network(path: str | os.PathLike[str]) -> IPv4Network | None:
    """``FLANNEL_NETWORK`` of a previous run (e.g. to remove stale firewall rules). Never raises."""
    return _read_net(path, "FLANNEL_NETWORK")
