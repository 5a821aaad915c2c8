"""Open the TUN device and probe its offloads (Linux, stdlib only).

The fd returned by :func:`open_tun` is non-blocking and close-on-exec. The device lives as long as
the fd (it is not persistent): when the process exits, ``flannel0`` and its routes disappear, as
with real flanneld.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

__all__ = [
    "DEFAULT_OFFLOADS",
    "ENGINE_OFFLOADS",
    "IFF_MULTI_QUEUE",
    "IFF_NO_PI",
    "IFF_TUN",
    "IFF_VNET_HDR",
    "OFFLOAD_FLAGS",
    "VNET_HDR_LEN",
    "TunError",
    "link_is_up",
    "open_tun",
    "probe_offloads",
    "set_offloads",
    "tun_features",
    "tun_flags",
    "tun_info",
    "vnet_hdr_supported",
]

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
TUNGETFEATURES = 0x800454CF  # _IOR('T', 207, unsigned int)
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int)
TUNGETIFF = 0x800454D2  # _IOR('T', 210, unsigned int)
SIOCGIFFLAGS = 0x8913
IFF_UP = 0x1

IFF_TUN = 0x0001
IFF_MULTI_QUEUE = 0x0100
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40

#: offload name -> TUN_F_* bit
OFFLOAD_FLAGS: dict[str, int] = {
    "csum": TUN_F_CSUM,
    "tso4": TUN_F_TSO4,
    "tso6": TUN_F_TSO6,
    "tso_ecn": TUN_F_TSO_ECN,
    "uso4": TUN_F_USO4,
    "uso6": TUN_F_USO6,
}

#: what :func:`probe_offloads` tries when not told
DEFAULT_OFFLOADS = frozenset({"csum", "tso4", "tso6", "uso4", "uso6"})
#: what the C engine handles: checksum completion, TCP super-packets (also with CWR) and UDP
#: super-packets (USO: the kernel takes uso4 and uso6 only together)
ENGINE_OFFLOADS = frozenset({"csum", "tso4", "tso6", "tso_ecn", "uso4", "uso6"})

#: size of struct virtio_net_hdr in front of every packet when IFF_VNET_HDR is on
VNET_HDR_LEN = 10

IFNAMSIZ = 16
_IFREQ = struct.Struct(f"{IFNAMSIZ}sH22x")  # struct ifreq: name + ifr_flags, 40 bytes
_UINT = struct.Struct("I")

TUN_PATH = "/dev/net/tun"


class TunError(Exception):
    """Opening or configuring the TUN failed. ``str(e)`` is one line: what and how to fix."""


def _check_name(name: str) -> bytes:
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ or "/" in name or any(c.isspace() for c in name):
        raise TunError(f"invalid TUN device name {name!r}: 1-15 characters, no '/' or spaces")
    return raw


def open_tun(
    name: str = "flannel0", *, vnet_hdr: bool = False, multi_queue: bool = False
) -> tuple[int, str]:
    """Open (creating if needed) TUN device ``name`` (``%d`` lets the kernel pick a number).

    Flags: ``IFF_TUN | IFF_NO_PI``, plus ``IFF_VNET_HDR`` (every read/write then starts with a
    10-byte virtio_net_hdr) and ``IFF_MULTI_QUEUE`` (call again with the same name for more
    queues). Returns ``(fd, name the kernel gave the device)``.
    """
    raw = _check_name(name)
    flags = IFF_TUN | IFF_NO_PI
    if vnet_hdr:
        flags |= IFF_VNET_HDR
    if multi_queue:
        flags |= IFF_MULTI_QUEUE
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TunError(
            f"{TUN_PATH} is missing: load the tun module (`modprobe tun`) or create the node "
            f"(`mkdir -p {os.path.dirname(TUN_PATH)} && mknod {TUN_PATH} c 10 200`); in a "
            f"container, pass --device {TUN_PATH}"
        ) from None
    except PermissionError:
        raise TunError(f"cannot open {TUN_PATH}: needs CAP_NET_ADMIN (run as root)") from None
    except OSError as exc:
        raise TunError(f"cannot open {TUN_PATH}: {exc.strerror}") from None
    try:
        res = fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(raw, flags))
    except OSError as exc:
        os.close(fd)
        raise TunError(_setiff_error(name, exc)) from None
    kname = _IFREQ.unpack(res)[0].split(b"\0", 1)[0].decode()
    return fd, kname


def _setiff_error(name: str, exc: OSError) -> str:
    if exc.errno == errno.EPERM:
        return f"cannot create TUN device {name}: needs CAP_NET_ADMIN (run as root)"
    if exc.errno == errno.EBUSY:
        return (
            f"TUN device {name} is already in use (another flanneld running?); stop it or "
            f"choose another name"
        )
    if exc.errno == errno.EINVAL:
        return (
            f"cannot attach to device {name}: it exists and is not a TUN device, or one opened "
            f"with other flags (vnet_hdr/multi_queue); delete it: `ip link del {name}`"
        )
    return f"cannot create TUN device {name}: {exc.strerror}"


def tun_info(fd: int) -> tuple[str, int]:
    """The device name and IFF_* flags of an open TUN fd (TUNGETIFF). Raises OSError (EBADFD
    for an fd of /dev/net/tun not attached to a device, ENOTTY/EINVAL for another file)."""
    res = fcntl.ioctl(fd, TUNGETIFF, _IFREQ.pack(b"", 0))
    raw, flags = _IFREQ.unpack(res)
    return raw.split(b"\0", 1)[0].decode(errors="replace"), int(flags)


def tun_flags(fd: int) -> int:
    """The IFF_* flags of an open TUN fd (TUNGETIFF)."""
    return tun_info(fd)[1]


def set_offloads(fd: int, flags: int) -> None:
    """TUNSETOFFLOAD with raw ``TUN_F_*`` bits (0 turns all off). Raises OSError."""
    fcntl.ioctl(fd, TUNSETOFFLOAD, flags)


def probe_offloads(fd: int, want: frozenset[str] | set[str] = DEFAULT_OFFLOADS) -> frozenset[str]:
    """Enable as many of the wanted offloads as the kernel accepts; return the enabled names.

    Only meaningful on an fd opened with ``vnet_hdr=True`` (the kernel hands over unsegmented
    super-packets described by the virtio header); without it nothing is enabled. Tries, from
    richest to poorest: csum+tso4+tso6(+tso_ecn)+uso4+uso6, csum+tso4+tso6(+tso_ecn),
    csum+tso4+tso6, csum, none. ``uso4``/``uso6`` only work together (the kernel rejects one
    alone), ``tso*`` and ``uso*`` need ``csum``; ``tso_ecn`` only with some ``tso*``.
    Never raises: any failure means "fewer offloads".
    """
    try:
        if not tun_flags(fd) & IFF_VNET_HDR:
            return frozenset()
    except OSError:
        return frozenset()
    want = frozenset(want) & frozenset(OFFLOAD_FLAGS)
    tso = want & {"tso4", "tso6"}
    ecn = want & {"tso_ecn"} if tso else set()
    uso = {"uso4", "uso6"} if {"uso4", "uso6"} <= want else set()
    candidates: list[frozenset[str]] = []
    if "csum" in want:
        candidates += [frozenset({"csum"} | tso | ecn | uso), frozenset({"csum"} | tso | ecn)]
        candidates += [frozenset({"csum"} | tso), frozenset({"csum"})]
    candidates.append(frozenset())
    seen: set[frozenset[str]] = set()
    for names in candidates:
        if names in seen:
            continue
        seen.add(names)
        bits = 0
        for n in names:
            bits |= OFFLOAD_FLAGS[n]
        try:
            set_offloads(fd, bits)
        except OSError:
            continue
        return names
    return frozenset()


def vnet_hdr_supported() -> bool:
    """Whether this kernel's TUN driver offers ``IFF_VNET_HDR`` (TUNGETFEATURES on a fresh fd of
    ``TUN_PATH``). Never raises: False when it cannot tell (then open the TUN without it)."""
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return bool(tun_features(fd) & IFF_VNET_HDR)
    except OSError:
        return False
    finally:
        os.close(fd)


def tun_features(fd: int) -> int:
    """TUNGETFEATURES: the IFF_* flags this kernel's TUN driver supports."""
    res = fcntl.ioctl(fd, TUNGETFEATURES, _UINT.pack(0))
    feats: int = _UINT.unpack(res)[0]
    return feats


def link_is_up(name: str) -> bool | None:
    """Whether interface ``name`` of this network namespace is administratively up (SIOCGIFFLAGS:
    one ioctl, cheap enough for every health probe); None if there is no such interface."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            res = fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, _IFREQ.pack(_check_name(name), 0))
    except (OSError, TunError):
        return None
    return bool(_IFREQ.unpack(res)[1] & IFF_UP)
