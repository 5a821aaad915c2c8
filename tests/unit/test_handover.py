"""flanneld_py.handover.Handover with real descriptors (pipes, socketpairs) and a real AF_UNIX
datagram socket standing in for systemd's notify socket."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flanneld_py import systemd
from flanneld_py.handover import Handover
from tests.unit.conftest import nothing_more, python_under_sh

ROOT = Path(__file__).resolve().parents[2]


# --- helpers -----------------------------------------------------------------------------------


@pytest.fixture
def fds() -> Iterator[list[int]]:
    """Descriptors the test opens; whatever is still open at the end is closed."""
    opened: list[int] = []
    yield opened
    for fd in opened:
        try:
            os.close(fd)
        except OSError as e:
            assert e.errno == errno.EBADF


def pipe(opened: list[int]) -> tuple[int, int]:
    r, w = os.pipe()
    opened += [r, w]
    return r, w


def pair(opened: list[int]) -> tuple[int, int]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    opened += [a.detach(), b.detach()]
    return opened[-2], opened[-1]


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as e:
        assert e.errno == errno.EBADF, e
        return False
    return True


def same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_ino, sa.st_dev) == (sb.st_ino, sb.st_dev)


def receive(sock: socket.socket, max_fds: int = 8) -> tuple[bytes, list[int]]:
    """One notify datagram and the descriptors passed with it (SCM_RIGHTS); the caller closes
    the descriptors."""
    msg, got, flags, _ = socket.recv_fds(sock, 4096, max_fds)
    assert not flags & socket.MSG_CTRUNC, "descriptors were truncated"
    return msg, got


# --- take / names / release_unclaimed ----------------------------------------------------------


def test_take_returns_the_stored_fds_once_and_records_the_name(fds: list[int]) -> None:
    r, w = pipe(fds)
    a, b = pair(fds)
    h = Handover({"udp-tun": [r, w], "udp-sock": [a]})
    assert h.taken == []
    assert h.names() == ["udp-sock", "udp-tun"]

    got = h.take("udp-tun")
    assert got == [r, w]
    assert h.taken == ["udp-tun"]
    assert h.names() == ["udp-sock"]
    # the very descriptors: still open and still the pipe
    os.write(w, b"x")
    assert os.read(r, 1) == b"x"

    assert h.take("udp-tun") == []  # already taken
    assert h.taken == ["udp-tun"]

    assert h.take("udp-sock") == [a]
    assert h.taken == ["udp-tun", "udp-sock"]
    assert h.names() == []
    assert is_open(b)


def test_take_of_an_unknown_name_returns_nothing_and_records_nothing(fds: list[int]) -> None:
    r, _ = pipe(fds)
    h = Handover({"udp-tun": [r]})
    assert h.take("udp-sock") == []
    assert h.take("") == []
    assert h.taken == []
    assert h.names() == ["udp-tun"]
    assert Handover().take("udp-tun") == [] and Handover().names() == []


def test_the_handover_keeps_its_own_copy_of_the_lists(fds: list[int]) -> None:
    r, w = pipe(fds)
    given = {"udp-tun": [r]}
    h = Handover(given)
    given["udp-tun"].append(w)
    given["udp-sock"] = [w]
    assert h.names() == ["udp-tun"]
    assert h.take("udp-tun") == [r]


def test_names_are_sorted() -> None:
    h = Handover({"zeta": [100], "alpha": [101], "mid": [102]})
    assert h.names() == ["alpha", "mid", "zeta"]
    assert Handover({}).names() == [] and Handover(None).names() == []


def test_release_unclaimed_closes_exactly_what_nobody_took(fds: list[int]) -> None:
    tun_r, tun_w = pipe(fds)
    s1, s2 = pair(fds)
    other_r, other_w = pipe(fds)
    h = Handover({"udp-tun": [tun_r, tun_w], "udp-sock": [s1, s2], "vxlan-x": [other_r]})

    taken = h.take("udp-tun")
    assert h.release_unclaimed() == ["udp-sock", "vxlan-x"]

    for fd in (s1, s2, other_r):
        assert not is_open(fd), fd
        with pytest.raises(OSError) as info:
            os.fstat(fd)
        assert info.value.errno == errno.EBADF
    for fd in [*taken, other_w]:  # taken ones, and ones never handed to it, stay open
        assert is_open(fd), fd
    os.write(tun_w, b"still")
    assert os.read(tun_r, 5) == b"still"

    assert h.names() == []
    assert h.taken == ["udp-tun"]
    assert h.release_unclaimed() == []  # nothing left
    assert is_open(tun_r) and is_open(tun_w)


def test_release_unclaimed_survives_an_fd_closed_already(fds: list[int]) -> None:
    r, w = pipe(fds)
    os.close(r)
    h = Handover({"a": [r, w]})
    assert h.release_unclaimed() == ["a"]
    assert not is_open(w)


# --- keep / forget -----------------------------------------------------------------------------


def test_without_store_keep_and_forget_do_nothing(
    fds: list[int], notify_socket: socket.socket
) -> None:
    r, w = pipe(fds)
    h = Handover({"udp-tun": [r]}, store=False)
    assert h.store is False
    h.keep("udp-tun", [r, w])
    h.keep("udp-sock", [])
    h.forget("udp-tun")
    h.forget("bad:name")
    assert h.release_unclaimed() == ["udp-tun"]  # closes, but does not tell systemd
    assert not is_open(r) and is_open(w)
    nothing_more(notify_socket)


def test_without_store_and_without_systemd_nothing_raises(
    fds: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    r, _ = pipe(fds)
    h = Handover(store=False)
    h.keep("udp-tun", [r])
    h.forget("udp-tun")
    # store=True but no notify socket: still no exception
    h2 = Handover(store=True)
    h2.keep("udp-tun", [r])
    h2.forget("udp-tun")
    assert is_open(r)


def test_keep_replaces_the_store_entry_with_copies(
    fds: list[int], notify_socket: socket.socket
) -> None:
    r, w = pipe(fds)
    s1, _ = pair(fds)
    h = Handover(store=True)
    h.keep("udp-tun", [r, w, s1])

    msg, got = receive(notify_socket)
    assert msg == b"FDSTOREREMOVE=1\nFDNAME=udp-tun" and got == []
    msg, got = receive(notify_socket)
    fds += got
    assert msg == b"FDSTORE=1\nFDNAME=udp-tun"
    assert len(got) == 3
    for mine, theirs in zip([r, w, s1], got, strict=True):
        assert theirs != mine
        assert same_file(mine, theirs)
    # a copy of the very same pipe: what is written on ours comes out of theirs
    os.write(w, b"pkt")
    assert os.read(got[0], 3) == b"pkt"
    nothing_more(notify_socket)
    # ours are still ours
    assert all(is_open(fd) for fd in (r, w, s1))


def test_keep_with_no_fds_only_empties_the_entry(notify_socket: socket.socket) -> None:
    h = Handover(store=True)
    h.keep("udp-sock", [])
    msg, got = receive(notify_socket)
    assert msg == b"FDSTOREREMOVE=1\nFDNAME=udp-sock" and got == []
    nothing_more(notify_socket)


def test_keep_and_forget_with_a_name_systemd_refuses_send_nothing(
    fds: list[int], notify_socket: socket.socket
) -> None:
    r, _ = pipe(fds)
    h = Handover(store=True)
    h.keep("bad:name", [r])
    h.forget("with space")
    h.forget("")
    nothing_more(notify_socket)


def test_forget_empties_the_entry(notify_socket: socket.socket) -> None:
    h = Handover(store=True)
    h.forget("udp-tun")
    h.forget("udp-sock")
    assert [receive(notify_socket) for _ in range(2)] == [
        (b"FDSTOREREMOVE=1\nFDNAME=udp-tun", []),
        (b"FDSTOREREMOVE=1\nFDNAME=udp-sock", []),
    ]
    nothing_more(notify_socket)


def test_release_unclaimed_with_store_removes_only_the_unclaimed_entries(
    fds: list[int], notify_socket: socket.socket
) -> None:
    a, _ = pipe(fds)
    b, _ = pipe(fds)
    c, _ = pipe(fds)
    h = Handover({"udp-tun": [a], "vxlan-x": [b], "old-sock": [c]}, store=True)
    assert h.take("udp-tun") == [a]
    assert h.release_unclaimed() == ["old-sock", "vxlan-x"]
    assert [receive(notify_socket) for _ in range(2)] == [
        (b"FDSTOREREMOVE=1\nFDNAME=old-sock", []),
        (b"FDSTOREREMOVE=1\nFDNAME=vxlan-x", []),
    ]
    nothing_more(notify_socket)
    assert is_open(a) and not is_open(b) and not is_open(c)


# --- from_systemd / listen_fds -----------------------------------------------------------------


def test_from_systemd_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET"):
        monkeypatch.delenv(key, raising=False)
    h = Handover.from_systemd()
    assert h.names() == [] and h.store is False and h.taken == []


def test_from_systemd_ignores_variables_meant_for_another_process(
    monkeypatch: pytest.MonkeyPatch, notify_socket: socket.socket
) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "2")
    monkeypatch.setenv("LISTEN_FDNAMES", "udp-tun:udp-sock")
    h = Handover.from_systemd()
    assert h.names() == []
    assert h.store is True  # NOTIFY_SOCKET is set
    # removed, so that no child of ours takes them for its own
    assert not [k for k in os.environ if k.startswith("LISTEN_")]


def test_from_systemd_with_no_descriptors_for_us(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "0")
    h = Handover.from_systemd()
    assert h.names() == [] and h.store is False
    assert "LISTEN_PID" not in os.environ and "LISTEN_FDS" not in os.environ


def test_listen_fds_with_an_environ_dict() -> None:
    other = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "3", "LISTEN_FDNAMES": "a:b:c"}
    assert systemd.listen_fds(other) == {} and other == {}
    mine = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}
    assert systemd.listen_fds(mine) == {} and mine == {}
    bad = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "two", "LISTEN_FDNAMES": "a"}
    assert systemd.listen_fds(bad) == {}
    assert systemd.listen_fds({}) == {}


CHILD = """
import fcntl, json, os
from flanneld_py.handover import Handover

h = Handover.from_systemd()
out = {"names": h.names(), "store": h.store,
       "env": sorted(k for k in os.environ if k.startswith("LISTEN_"))}
for name in h.names():
    got = h.take(name)
    out[name] = [[fd, os.pread(fd, 8, 0).decode(),
                  bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)] for fd in got]
out["taken"] = h.taken
print(json.dumps(out))
"""


def run_child(script: str, env: dict[str, str] | None = None) -> Any:
    """CHILD through ``sh -c script`` (which sets up the descriptors and execs python)."""
    return python_under_sh(script, CHILD, env)


def test_from_systemd_in_a_child_that_systemd_would_start(tmp_path: Path) -> None:
    """fds 3, 4, 5, 6 as systemd passes them (LISTEN_PID = the child's own PID: sh execs
    python): two share a name, one has an empty name ("unknown"), NOTIFY_SOCKET set."""
    for name in ("one", "two", "three", "four"):
        (tmp_path / name).write_text(name)
    script = (
        f"NOTIFY_SOCKET=/nonexistent/notify LISTEN_PID=$$ LISTEN_FDS=4 "
        f'LISTEN_FDNAMES=udp-tun:udp-tun:udp-sock: exec "$0" -c "$1" '
        f'3<"{tmp_path}/one" 4<"{tmp_path}/two" 5<"{tmp_path}/three" 6<"{tmp_path}/four"'
    )
    out = run_child(script)
    assert out == {
        "names": ["udp-sock", "udp-tun", "unknown"],
        "store": True,
        "env": [],
        "udp-sock": [[5, "three", True]],
        "udp-tun": [[3, "one", True], [4, "two", True]],
        "unknown": [[6, "four", True]],
        "taken": ["udp-sock", "udp-tun", "unknown"],
    }


def test_from_systemd_in_a_child_skips_a_descriptor_that_is_not_open(tmp_path: Path) -> None:
    (tmp_path / "one").write_text("one")
    # LISTEN_FDS=2 but only fd 3 is open (4 closed explicitly); no NOTIFY_SOCKET: no store
    script = (
        f'LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=udp-tun:udp-sock exec "$0" -c "$1" '
        f'3<"{tmp_path}/one" 4<&-'
    )
    out = run_child(script, env={k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"})
    assert out["names"] == ["udp-tun"] and out["store"] is False
    assert out["udp-tun"] == [[3, "one", True]]
    assert out["env"] == []
