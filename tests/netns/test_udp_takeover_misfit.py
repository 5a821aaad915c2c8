"""The udp backend taking over the previous run's TUN queues and UDP sockets (systemd's fd
store, handover.py), and refusing them when they do not fit this run (``UdpBackend._unfit``).

Every case runs one Python child in a fresh host namespace (``ip netns exec``). The child opens
"the previous run's" descriptors itself (flanneld_py.tun.open_tun, and UDP sockets bound by
bind_udp) and builds a :class:`Handover` of them, store on. Its notify socket stands in for
systemd, as systemd behaves: it holds its own copies of the stored descriptors (so the old
device and sockets live on while it does), keeps the copies ``FDSTORE=1`` hands it, and closes
what it holds under a name ``SYSTEMD_DELAY`` seconds after ``FDSTOREREMOVE=1`` for it (systemd
takes a moment: the backend must wait for the old device to go before it creates the new one).

The child then runs the backend as the daemon does: ``prepare()``, ``start(lease)``, ``apply()``
of one peer, ``activate()``, ``close(restarting=True)``, and reports as one JSON line: the fd
numbers and open files the backend holds, compared with the old ones (sockets by inode,
``/proc/net/udp`` tells whether one still exists; TUN queues by fd number and kcmp(2), since every
TUN fd has the inode of /dev/net/tun), the device's ifindex before and after, what was sent to
"systemd", and whether a packet really goes through the data path (an inner UDP datagram sent
into flannel0 must come out encapsulated at the peer's address).

The TUN device lives as long as some descriptor of it: when the child exits, it is gone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flanneld_py import engine as engine_mod
from lab.netns import Lab, Netns

ROOT = Path(__file__).resolve().parents[2]
PRELUDE = f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
PORT = 8285
#: a second address on the host's eth0, where the one peer "lives" (a plain UDP listener)
PEER_IP = "10.99.0.50"
#: another address of the host, for a socket bound elsewhere
OTHER_IP = "10.99.0.60"
#: seconds "systemd" takes to close its copies after FDSTOREREMOVE
SYSTEMD_DELAY = 0.3
IFF_MULTI_QUEUE = 0x0100
IFF_VNET_HDR = 0x4000

CHILD = r"""
import asyncio, ctypes, errno, json, logging, os, platform, socket, sys, time
from ipaddress import IPv4Address, IPv4Network
from flanneld_py import netlink
from flanneld_py.backend.udp import FD_SOCK, FD_TUN, UdpBackend, bind_udp
from flanneld_py.config import BackendConfig
from flanneld_py.handover import Handover
from flanneld_py.lease import Lease, LeaseAdded
from flanneld_py.tun import open_tun, tun_info

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
args = json.loads(sys.argv[1])
old, run = args["old"], args["run"]
ext = netlink.find_external_interface(["eth0"])
libc = ctypes.CDLL(None, use_errno=True)
SYS_KCMP = {"x86_64": 312, "aarch64": 272}.get(platform.machine())
KCMP_FILE = 0


def ident(fd):
    st = os.fstat(fd)
    return [st.st_dev, st.st_ino]


def same_file(a, b):
    # kcmp(2): the same open file description
    r = -1 if SYS_KCMP is None else libc.syscall(SYS_KCMP, os.getpid(), os.getpid(),
                                                 KCMP_FILE, a, b)
    if r >= 0:
        return r == 0
    return ident(a) == ident(b)  # no kcmp here: the inode (exact for sockets only)


def closed(fd):
    try:
        os.fstat(fd)
    except OSError as e:
        return e.errno == errno.EBADF
    return False


def ifindex(name):
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def udp_inodes():
    # inodes of every UDP socket of this namespace
    with open("/proc/net/udp") as f:
        return {int(line.split()[9]) for line in f.readlines()[1:]}


class Systemd:
    # the fd store: copies by name; FDSTORE keeps, FDSTOREREMOVE closes after a delay
    def __init__(self, path, copies):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setblocking(False)
        self.copies = copies
        self.messages = []  # [text, [fds]]
        self.reported = 0
        self.closed_at = {}

    def drain(self):
        while True:
            try:
                msg, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_LEN(64 * 4))
            except BlockingIOError:
                return
            fds = []
            for level, kind, data in anc:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                    fds += [int.from_bytes(data[i:i + 4], sys.byteorder)
                            for i in range(0, len(data) - len(data) % 4, 4)]
            text = msg.decode()
            fields = dict(line.split("=", 1) for line in text.splitlines())
            name = fields.get("FDNAME")
            if fields.get("FDSTORE") == "1":
                self.copies.setdefault(name, []).extend(fds)
            elif fields.get("FDSTOREREMOVE") == "1":
                held = self.copies.pop(name, [])
                loop = asyncio.get_running_loop()
                loop.call_later(DELAY, self.close, name, held)
            self.messages.append([text, fds])

    def close(self, name, fds):
        for fd in fds:
            os.close(fd)
        self.closed_at.setdefault(name, []).append(len(fds))

    def report(self, candidates=()):
        # messages since the last report; for each fd passed, the index in candidates of the
        # descriptor it is a copy of (-1: none)
        self.drain()
        out = []
        for text, fds in self.messages[self.reported:]:
            out.append([text, [next((i for i, c in enumerate(candidates) if same_file(fd, c)),
                                    -1) for fd in fds]])
        self.reported = len(self.messages)
        return out

    def close_all(self):
        for fds in self.copies.values():
            for fd in fds:
                os.close(fd)
        self.copies = {}
        self.sock.close()


DELAY = args["delay"]

# --- the previous run's descriptors, and systemd's copies of them -------------------------------
n_old = old["threads"]
tun_fds = []
fd, old_name = open_tun(old["name"], vnet_hdr=old["vnet"], multi_queue=n_old > 1)
tun_fds.append(fd)
while len(tun_fds) < n_old:
    tun_fds.append(open_tun(old_name, vnet_hdr=old["vnet"], multi_queue=True)[0])
sock_fds = []
old_addr = old.get("address", str(ext.address))
if old.get("sock") == "pipe":  # something else than a socket stored as FD_SOCK
    r, w = os.pipe()
    os.close(w)
    sock_fds = [r]
else:
    for _ in range(old.get("socks", n_old)):
        reuse = old.get("reuseport", n_old > 1)
        sock_fds.append(bind_udp(IPv4Address(old_addr), old["port"], reuseport=reuse).detach())
old_idents = {"tun": [ident(fd) for fd in tun_fds], "sock": [ident(fd) for fd in sock_fds]}
old_numbers = {"tun": list(tun_fds), "sock": list(sock_fds)}
old_sock_inodes = [i for _, i in old_idents["sock"]] if old.get("sock") != "pipe" else []
old_index = ifindex(old_name)
systemd = Systemd(args["notify"], {FD_TUN: [os.dup(fd) for fd in tun_fds],
                                   FD_SOCK: [os.dup(fd) for fd in sock_fds]})
os.environ["NOTIFY_SOCKET"] = args["notify"]

# a datagram the previous run did not read yet: with a takeover it waits in the same socket
if old.get("sock") != "pipe":
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"queued-while-restarting", (old_addr, old["port"]))

handover = Handover({FD_TUN: list(tun_fds), FD_SOCK: list(sock_fds)}, store=True)
b = UdpBackend(BackendConfig(type="udp", port=run["port"]), IPv4Network("10.5.0.0/16"), ext,
               tun_name=run["name"], engine=run["engine"], offload=run["offload"],
               engine_threads=run["threads"], handover=handover)
peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
peer.bind((args["peer"], run["port"]))
peer.settimeout(0.2)


async def until(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def main():
    loop = asyncio.get_running_loop()
    loop.add_reader(systemd.sock.fileno(), systemd.drain)
    out = {"old_name": old_name, "old_index": old_index, "old_idents": old_idents,
           "old_numbers": old_numbers}
    t0 = time.monotonic()
    await b.prepare()
    out["prepare_seconds"] = time.monotonic() - t0
    out["taken"] = list(handover.taken)
    out["left_in_handover"] = handover.names()
    out["taken_over"] = b.taken_over
    out["released"] = b._released
    # the fd numbers of the old descriptors: closed unless the backend holds them now
    out["old_closed_after_prepare"] = [closed(fd) for fd in tun_fds + sock_fds]
    out["notify_prepare"] = systemd.report()
    out["held_after_prepare"] = {"tun": list(b.tun_fds), "sock": [s.fileno() for s in b.socks]}
    peek = []
    for s in b.socks:
        try:
            peek.append(s.recv(100, socket.MSG_PEEK | socket.MSG_DONTWAIT).decode())
        except BlockingIOError:
            pass
    out["queued_seen"] = peek
    # the daemon takes its lease between prepare() and start() (etcd round trips)
    await asyncio.sleep(args["gap"])

    lease = Lease(IPv4Network(args["subnet"]), ext.address)
    await b.start(lease)
    await b.apply([LeaseAdded(Lease(IPv4Network("10.5.2.0/24"), IPv4Address(args["peer"])))])
    await b.activate()
    ours = b.tun_fds + [s.fileno() for s in b.socks]
    out["notify_start"] = systemd.report(ours)
    out["taken_over_after_start"] = b.taken_over
    out["index"] = ifindex(run["name"])
    out["tun"] = [[fd, *tun_info(fd)] for fd in b.tun_fds]
    out["socks"] = [[s.fileno(), ident(s.fileno())[1], list(s.getsockname()),
                     s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)] for s in b.socks]
    out["addrs"] = [str(a) for a in await asyncio.to_thread(netlink.addresses, run["name"])]
    out["alive"] = b.alive()
    out["engine"] = b.engine.kind
    # once systemd has closed what it was told to: does anything of the old run live on?
    await asyncio.sleep(DELAY + 0.2)
    out["systemd_closed"] = systemd.closed_at
    out["old_device_lives"] = ifindex(old_name) == old_index
    out["old_socks_live"] = [i in udp_inodes() for i in old_sock_inodes]

    # the data path: an inner datagram into flannel0 comes out at the peer, encapsulated
    inner = b"through-the-overlay"
    got = None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        deadline = time.monotonic() + 10
        while got is None and time.monotonic() < deadline:
            s.sendto(inner, ("10.5.2.7", 4242))
            try:
                data, src = await asyncio.to_thread(peer.recvfrom, 65535)
            except TimeoutError:
                continue
            if inner in data:
                got = [data.hex(), list(src)]
    out["encapsulated"] = got

    # a restart: our descriptors closed, systemd's copies keep the device for the next run
    await b.close(restarting=True)
    out["notify_close"] = systemd.report()
    out["index_after_close"] = ifindex(run["name"])
    loop.remove_reader(systemd.sock.fileno())
    systemd.close_all()
    out["gone_without_copies"] = await until(lambda: ifindex(run["name"]) is None)
    return out


result = asyncio.run(main())
peer.close()
print(json.dumps(result))
"""


def have_c_engine() -> None:
    if not engine_mod.c_engine_available():
        pytest.skip("C engine not built: pip install -e . --no-build-isolation --no-deps")


@pytest.fixture
def host() -> Iterator[Netns]:
    with Lab() as lab:  # the namespace, and with it any device left behind, goes at close
        h = lab.flannel_topology(n_hosts=1).hosts[0]
        h.add_addr("eth0", f"{PEER_IP}/24")
        h.add_addr("eth0", f"{OTHER_IP}/24")
        yield h


def child(
    host: Netns, old: dict[str, Any], run: dict[str, Any], gap: float = 0.0
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any], dict[str, Any]]:
    """Run the child; returns the process and the full ``old`` and ``run`` arguments."""
    old = {"name": "flannel0", "threads": 1, "port": PORT, "vnet": False, **old}
    run = {"name": "flannel0", "threads": 1, "port": PORT, "engine": "c", "offload": "off", **run}
    args = {
        "old": old,
        "run": run,
        "notify": str(host.lab.tmpdir / "notify"),
        "peer": PEER_IP,
        "subnet": "10.5.1.0/24",
        "delay": SYSTEMD_DELAY,
        "gap": gap,
    }
    code = PRELUDE + textwrap.dedent(CHILD)
    # ResourceWarning shown: a descriptor the backend drops without closing it is an error here
    argv = [sys.executable, "-W", "default::ResourceWarning", "-c", code, json.dumps(args)]
    proc = host.run(argv, timeout=90, check=False)
    # whatever happened, the devices went with the child's descriptors
    assert host.ip("link", "show", run["name"], check=False).returncode != 0
    assert host.ip("link", "show", old["name"], check=False).returncode != 0
    return proc, old, run


def run_child(
    host: Netns, old: dict[str, Any], run: dict[str, Any], gap: float = 0.0
) -> dict[str, Any]:
    proc, old, run = child(host, old, run, gap)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ResourceWarning" not in proc.stderr, proc.stderr[-4000:]
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["log"] = proc.stderr
    assert out["gone_without_copies"] is True
    return out


def check_working(out: dict[str, Any], run: dict[str, Any]) -> None:
    """The data plane of this run: the device, its queues, its sockets, a packet through it;
    and after close(restarting=True) the device lives on in systemd's copies."""
    n = run.get("threads", 1)
    name = run.get("name", "flannel0")
    assert out["alive"] is None, out["alive"]
    assert out["index"] is not None
    assert out["addrs"] == ["10.5.1.0/32"]
    assert len(out["tun"]) == n and len(out["socks"]) == n
    for _, dev, flags in out["tun"]:
        assert dev == name
        assert bool(flags & IFF_MULTI_QUEUE) == (n > 1)
        assert bool(flags & IFF_VNET_HDR) == (run.get("offload") == "auto")
    for _, _, addr, reuse in out["socks"]:
        assert addr == ["10.99.0.11", run.get("port", PORT)]
        assert bool(reuse) == (n > 1)
    assert out["encapsulated"] is not None, out["log"][-3000:]
    data, src = out["encapsulated"]
    pkt = bytes.fromhex(data)
    assert src == ["10.99.0.11", run.get("port", PORT)]
    assert pkt[0] >> 4 == 4 and pkt[9] == 17  # an IPv4/UDP inner packet, as the kernel sent it
    assert pkt[12:16] == bytes([10, 5, 1, 0]) and pkt[16:20] == bytes([10, 5, 2, 7])
    assert out["notify_close"] == []  # a restart: the store keeps its copies
    assert out["index_after_close"] == out["index"]


def check_taken_over(out: dict[str, Any], n: int) -> None:
    assert out["taken"] == ["udp-tun", "udp-sock"] and out["left_in_handover"] == []
    assert out["taken_over"] is True and out["taken_over_after_start"] is True
    assert out["released"] is False
    # the very same descriptors: same fd numbers, never closed, same socket inodes
    numbers = out["old_numbers"]
    assert out["old_closed_after_prepare"] == [False] * (2 * n)
    assert out["held_after_prepare"] == numbers
    assert [fd for fd, *_ in out["tun"]] == numbers["tun"]
    assert [fd for fd, *_ in out["socks"]] == numbers["sock"]
    assert [ino for _, ino, *_ in out["socks"]] == [ino for _, ino in out["old_idents"]["sock"]]
    # and the same device
    assert out["index"] == out["old_index"] is not None
    assert out["old_device_lives"] is True and out["old_socks_live"] == [True] * n
    # the datagram queued before the takeover waits in the socket the backend now holds
    assert out["queued_seen"] == ["queued-while-restarting"]
    # nothing removed from or added to systemd's store: its copies are of the very same files
    assert out["notify_prepare"] == [] and out["notify_start"] == []
    assert out["systemd_closed"] == {}
    assert f"took over flannel0 ({n} queues) and {n} UDP sockets" in out["log"]


def check_refused(out: dict[str, Any], run: dict[str, Any], why: str) -> None:
    n = run.get("threads", 1)
    assert out["taken"] == ["udp-tun", "udp-sock"] and out["left_in_handover"] == []
    assert out["taken_over"] is False and out["taken_over_after_start"] is False
    assert out["released"] is True
    assert f"not taking over the previous run's TUN and sockets ({why}" in out["log"], out["log"]
    # the backend closed every old descriptor of its own at once
    assert all(out["old_closed_after_prepare"]), out["old_closed_after_prepare"]
    assert out["held_after_prepare"] == {"tun": [], "sock": []}
    assert out["queued_seen"] == []
    # and told systemd to drop its copies of them; then gave it copies of the new ones
    assert out["notify_prepare"] == [
        ["FDSTOREREMOVE=1\nFDNAME=udp-tun", []],
        ["FDSTOREREMOVE=1\nFDNAME=udp-sock", []],
    ]
    assert out["notify_start"] == [
        ["FDSTOREREMOVE=1\nFDNAME=udp-tun", []],
        ["FDSTORE=1\nFDNAME=udp-tun", list(range(n))],  # copies of our queues, in order
        ["FDSTOREREMOVE=1\nFDNAME=udp-sock", []],
        ["FDSTORE=1\nFDNAME=udp-sock", list(range(n, 2 * n))],  # and of our sockets
    ]
    old_n = len(out["old_numbers"]["tun"])
    assert out["systemd_closed"]["udp-tun"][0] == old_n
    # once systemd closed its copies, nothing of the old run is left: not the device (a new
    # one, with another ifindex, even under the same name), not a socket
    assert out["old_device_lives"] is False
    assert out["old_socks_live"] == [False] * len(out["old_socks_live"])
    assert out["index"] is not None and out["index"] != out["old_index"]
    old_inodes = [ino for _, ino in out["old_idents"]["sock"]]
    assert not [ino for _, ino, *_ in out["socks"] if ino in old_inodes]
    if out["old_name"] == run.get("name", "flannel0"):
        # the same device name: the backend had to wait for systemd to let the old one go
        assert out["prepare_seconds"] >= SYSTEMD_DELAY
    check_working(out, run)


# ---------------------------------------------------------------------------------------------


def test_fitting_descriptors_are_taken_over(host: Netns) -> None:
    have_c_engine()
    run: dict[str, Any] = {}
    out = run_child(host, {}, run)
    check_taken_over(out, 1)
    check_working(out, run)


def test_fitting_descriptors_are_taken_over_with_two_threads(host: Netns) -> None:
    have_c_engine()
    run = {"threads": 2}
    out = run_child(host, {"threads": 2}, run)
    check_taken_over(out, 2)
    check_working(out, run)


def test_fitting_descriptors_with_vnet_header_are_taken_over(host: Netns) -> None:
    have_c_engine()
    from flanneld_py.tun import vnet_hdr_supported

    if not vnet_hdr_supported():  # pragma: no cover - every kernel we run on has it
        pytest.skip("this kernel's TUN has no IFF_VNET_HDR")
    run = {"offload": "auto"}
    out = run_child(host, {"vnet": True}, run)
    check_taken_over(out, 1)
    check_working(out, run)


def test_fitting_descriptors_python_engine(host: Netns) -> None:
    run = {"engine": "python"}
    out = run_child(host, {}, run)
    check_taken_over(out, 1)
    check_working(out, run)
    assert out["engine"] == "python"


@pytest.mark.parametrize(("old_n", "run_n"), [(1, 2), (2, 1)])
def test_other_thread_count_is_refused(host: Netns, old_n: int, run_n: int) -> None:
    have_c_engine()
    run = {"threads": run_n}
    out = run_child(host, {"threads": old_n}, run)
    check_refused(out, run, f"{old_n} TUN queues and {old_n} sockets, this run needs {run_n}")


def test_other_device_name_is_refused(host: Netns) -> None:
    """(--tun-name changed.) With the pause the daemon's lease request gives systemd between
    prepare() and start(); the next test has none."""
    have_c_engine()
    run: dict[str, Any] = {}
    out = run_child(host, {"name": "flannel9"}, run, gap=SYSTEMD_DELAY + 0.2)
    assert out["old_name"] == "flannel9"
    check_refused(out, run, "the device is flannel9, this run uses flannel0")


def test_other_device_name_is_refused_while_systemd_still_holds_the_old_socket(
    host: Netns,
) -> None:
    """The same as the test before, with start() right after prepare(): after refusing the
    previous run's descriptors, the backend must wait while systemd still holds its copy of the
    old socket on the same address and port (bind gives EADDRINUSE until then), as it waits for
    the old device."""
    have_c_engine()
    proc, _, run = child(host, {"name": "flannel9"}, {}, gap=0.0)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["log"] = proc.stderr
    check_refused(out, run, "the device is flannel9, this run uses flannel0")


def test_socket_bound_to_another_port_is_refused(host: Netns) -> None:
    have_c_engine()
    run: dict[str, Any] = {}
    out = run_child(host, {"port": PORT + 1}, run)
    check_refused(
        out, run, f"socket bound to 10.99.0.11:{PORT + 1}, this run uses 10.99.0.11:{PORT}"
    )


def test_socket_bound_to_another_address_is_refused(host: Netns) -> None:
    have_c_engine()
    run: dict[str, Any] = {}
    out = run_child(host, {"address": OTHER_IP}, run)
    check_refused(out, run, f"socket bound to {OTHER_IP}:{PORT}, this run uses 10.99.0.11:{PORT}")


def test_socket_opened_for_several_threads_is_refused(host: Netns) -> None:
    have_c_engine()
    run: dict[str, Any] = {}
    out = run_child(host, {"reuseport": True}, run)  # SO_REUSEPORT, as for several threads
    check_refused(out, run, "socket opened for another number of engine threads")


def test_tun_opened_with_other_flags_is_refused(host: Netns) -> None:
    have_c_engine()
    run = {"offload": "off"}  # the previous run had offloads (a virtio header) on
    out = run_child(host, {"vnet": True}, run)
    check_refused(out, run, "the device was opened with other flags")


def test_a_non_socket_stored_as_the_sockets_is_refused(host: Netns) -> None:
    have_c_engine()
    run: dict[str, Any] = {}
    out = run_child(host, {"sock": "pipe"}, run)
    check_refused(out, run, "1 TUN queues and 0 sockets, this run needs 1")


def test_fewer_sockets_than_queues_is_refused(host: Netns) -> None:
    have_c_engine()
    run = {"threads": 2}
    out = run_child(host, {"threads": 2, "socks": 1}, run)
    check_refused(out, run, "2 TUN queues and 1 sockets, this run needs 2")
