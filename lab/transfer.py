"""TCP transfers between test containers: the receiving end, as a script for ``python -c``.

The script listens on ``0.0.0.0:<port>``, prints ``listening`` once it does, takes one connection
and reads it to the end, then prints ``<sender address> <byte count> <SHA-256 hex>`` and exits.
Tests start it in the destination container, wait for ``listening`` in its log, run their own
sender in the source container and compare what the receiver printed with what was sent.
"""

from __future__ import annotations

__all__ = ["tcp_receiver"]

_RECEIVER = r"""
import hashlib, socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", @PORT@)); s.listen(1); s.settimeout(@TIMEOUT@)
print("listening", flush=True)
c, peer = s.accept(); c.settimeout(@TIMEOUT@); h = hashlib.sha256(); n = 0
buf = bytearray(1 << 20)
while True:
    k = c.recv_into(buf)
    if not k: break
    h.update(memoryview(buf)[:k]); n += k
print(peer[0], n, h.hexdigest(), flush=True)
"""


def tcp_receiver(port: int, timeout: float = 60) -> str:
    """The receiver script for ``port``; ``timeout``: seconds to wait for the connection and,
    then, for each read."""
    return _RECEIVER.replace("@PORT@", str(port)).replace("@TIMEOUT@", repr(float(timeout)))
