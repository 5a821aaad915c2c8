"""Keeping the data path's descriptors across a restart (systemd's file-descriptor store).

Under systemd (``FileDescriptorStoreMax=`` in the unit) the udp backend leaves copies of its TUN
queues and UDP sockets with systemd. When the daemon stops for a restart, those copies keep
``flannel0`` (with its address and routes) and the sockets alive: the kernel queues what arrives
meanwhile, and the next run takes the very same descriptors over instead of creating new ones,
so packets wait instead of being refused. When the daemon stops for good (``systemctl stop``),
it empties the store and the device goes as before.

A :class:`Handover` holds what systemd passed back at start (:func:`systemd.listen_fds`). A
backend :meth:`Handover.take` s the descriptors it knows by name and checks they are what it
would create now (same device, flags, address); whatever no backend took is closed and removed
from the store (:meth:`Handover.release_unclaimed`), e.g. after a switch to vxlan.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence

from flanneld_py import systemd

__all__ = ["Handover"]

log = logging.getLogger("flanneld_py.handover")


class Handover:
    """Descriptors from a previous run, by fd-store name; and the way to store new ones."""

    def __init__(self, fds: dict[str, list[int]] | None = None, *, store: bool = False) -> None:
        self._fds = {name: list(v) for name, v in (fds or {}).items()}
        #: whether to hand descriptors to systemd (we run under it, with a notify socket)
        self.store = store
        #: names whose descriptors a backend took over (for the log and /status)
        self.taken: list[str] = []

    @classmethod
    def from_systemd(cls) -> Handover:
        """What systemd passed us (nothing outside systemd)."""
        return cls(systemd.listen_fds(), store=bool(os.environ.get("NOTIFY_SOCKET")))

    def names(self) -> list[str]:
        return sorted(self._fds)

    def take(self, name: str) -> list[int]:
        """The descriptors stored as ``name`` (now the caller's to close), or []."""
        fds = self._fds.pop(name, [])
        if fds:
            self.taken.append(name)
        return fds

    def keep(self, name: str, fds: Sequence[int]) -> None:
        """Replace what the store holds as ``name`` by copies of ``fds``."""
        if not self.store:
            return
        systemd.fdstore_remove(name)
        if fds and not systemd.fdstore(fds, name):
            log.debug("could not store descriptors %s in systemd's fd store", name)

    def forget(self, name: str) -> None:
        """Empty the store's ``name`` (a stop for good: the device must go with us)."""
        if self.store:
            systemd.fdstore_remove(name)

    def release_unclaimed(self) -> list[str]:
        """Close what nobody took and remove it from the store; returns those names."""
        names = sorted(self._fds)
        for name in names:
            for fd in self._fds.pop(name):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.forget(name)
        return names
