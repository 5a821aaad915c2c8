"""flanneld-py in lab host namespaces: one daemon (:class:`Flanneld`) and a whole cluster
(:class:`FlannelCluster`: etcd on the underlay, the network config, one daemon per host).

The one place that knows how to run ``python -m flanneld_py`` inside a :class:`lab.netns.Lab`;
used by the netns tests, the docker tests and the demo (:mod:`lab.demo`) and the bench::

    with Lab() as lab:
        cl = FlannelCluster(lab, n_hosts=3).start()   # etcd + config + a ready daemon per host
        h = cl.hosts[0]                                # a Flanneld
        h.subnet, h.mtu, h.status()["peers"], h.docker_options()
        c = cl.add_container(0)                        # a container namespace on h's lease
        h.stop(); h.start()                            # by PID, through the lab

Ready means: the daemon rewrote its subnet file (and its docker options file, when it writes
one) since this start -- it does that right before READY=1 -- and, when its health server is on,
``GET /healthz`` asked from inside the host namespace answers 200. When the process exits or time
runs out first, :class:`FlanneldNotReady` says so with the command line and the log tail.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import sys
import textwrap
import time
from collections.abc import Sequence
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path
from subprocess import Popen
from typing import Any

from lab.docker import docker_network_options, read_env_file
from lab.etcd import EtcdLabError, EtcdServer
from lab.netns import Container, Lab, LabError, Netns, Topology

__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_NETWORK",
    "ETCD_PREFIX",
    "HEALTHZ_PORT",
    "FlannelCluster",
    "Flanneld",
    "FlanneldError",
    "FlanneldNotReady",
    "http_get_in",
    "network_config",
]

ROOT = Path(__file__).resolve().parent.parent
ETCD_PREFIX = "/coreos.com/network"
DEFAULT_NETWORK = "10.5.0.0/16"
#: where the health server listens inside each host namespace (own port space: no clash)
HEALTHZ_PORT = 8471


def network_config(network: str = DEFAULT_NETWORK, backend: str = "udp") -> str:
    """The flannel network config JSON stored at ``<prefix>/config``."""
    return json.dumps({"Network": network, "Backend": {"Type": backend}}, separators=(",", ":"))


DEFAULT_CONFIG = network_config()


class FlanneldError(LabError):
    """A flanneld-py of the lab misbehaved (e.g. ``/status`` did not answer 200)."""


class FlanneldNotReady(FlanneldError):
    """flanneld-py exited or did not become ready; the message ends with its log tail."""


# an HTTP GET run by the namespace's python (the root namespace cannot reach a host namespace's
# loopback); no proxies: the environment may name one that the namespace cannot reach
_HTTP_GET = """
import sys, urllib.error, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(sys.argv[1], timeout=float(sys.argv[2])) as r:
        code, body = r.status, r.read()
except urllib.error.HTTPError as e:
    code, body = e.code, e.read()
except Exception as e:
    code, body = 0, str(e).encode()
sys.stdout.write(f"{code}\\n")
sys.stdout.flush()
sys.stdout.buffer.write(body)
"""


def http_get_in(ns: Netns, url: str, timeout: float = 2.0) -> tuple[int, str]:
    """GET ``url`` from inside ``ns``: (status, body); status 0 when nothing answered."""
    proc = ns.run(
        [sys.executable, "-c", _HTTP_GET, url, str(timeout)], check=False, timeout=timeout + 10
    )
    head, _, body = proc.stdout.partition("\n")
    try:
        return int(head), body
    except ValueError:
        return 0, (proc.stderr or proc.stdout).strip()


def _signature(path: Path) -> tuple[int, int] | None:
    """What tells one version of a file from the next (the daemon replaces it by rename)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


# ---------------------------------------------------------------------------------------------
# one daemon


class Flanneld:
    """One flanneld-py (``python -m flanneld_py``) in host namespace ``ns``.

    Files go to ``workdir`` (default ``<lab tmpdir>/flannel-<host>``): ``subnet.env``, ``docker``
    (the ``/run/flannel/docker`` format; ``docker_opts=False`` passes ``--docker-opts-file ""``)
    and ``flanneld.log`` (or ``log_path``), which every start appends to. ``healthz_port=0``
    runs the daemon without its health server (then :meth:`status` is not available).
    ``engine=None`` leaves ``--engine`` to the daemon's default; ``extra_args`` come last, so
    they override any flag set here (the last one wins).

    The process is started with :meth:`Netns.popen`, so the lab stops it at close; :meth:`stop`
    does it earlier (SIGTERM to the PID's process group, then SIGKILL).
    """

    def __init__(
        self,
        lab: Lab,
        ns: Netns,
        etcd_endpoints: Sequence[str],
        *,
        workdir: str | os.PathLike[str] | None = None,
        iface: str = "eth0",
        engine: str | None = None,
        ip_masq: bool = False,
        healthz_port: int = HEALTHZ_PORT,
        docker_opts: bool = True,
        etcd_prefix: str = ETCD_PREFIX,
        extra_args: Sequence[str] = (),
        log_path: str | os.PathLike[str] | None = None,
        ready_timeout: float = 30.0,
        stop_timeout: float = 5.0,
        python: str = sys.executable,
    ) -> None:
        self.lab = lab
        self.ns = ns
        self.etcd_endpoints = list(etcd_endpoints)
        host = ns.name.removeprefix(lab.prefix + "-")
        self.workdir = Path(workdir) if workdir is not None else lab.tmpdir / f"flannel-{host}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.subnet_file = self.workdir / "subnet.env"
        #: the daemon's control socket: every lab host shares the filesystem, so each daemon gets
        #: its own (the default /run/flannel/flanneld-py.sock would be shared)
        self.control_socket = self.workdir / "flanneld-py.sock"
        self.docker_opts_file: Path | None = self.workdir / "docker" if docker_opts else None
        self.log_path = Path(log_path) if log_path is not None else self.workdir / "flanneld.log"
        self.iface = iface
        self.engine = engine
        self.ip_masq = ip_masq
        self.healthz_port = healthz_port
        self.etcd_prefix = etcd_prefix
        self.extra_args = list(extra_args)
        self.ready_timeout = ready_timeout
        #: how long the lab's teardown waits after SIGTERM before SIGKILL
        self.stop_timeout = stop_timeout
        self.python = python
        #: extra environment of the daemon (e.g. NOTIFY_SOCKET), set before :meth:`start`
        self.env: dict[str, str] = {}
        self.proc: Popen[bytes] | None = None
        #: how many times :meth:`start` ran
        self.starts = 0
        self._log_start = 0  # offset in the log where the current run begins
        self._files_before: dict[Path, tuple[int, int] | None] = {}

    # -- command line and state --------------------------------------------------------------
    def argv(self) -> list[str]:
        docker_file = "" if self.docker_opts_file is None else str(self.docker_opts_file)
        argv = [
            self.python, "-m", "flanneld_py",
            "--etcd-endpoints", ",".join(self.etcd_endpoints),
            "--etcd-prefix", self.etcd_prefix,
            "--iface", self.iface,
            "--subnet-file", str(self.subnet_file),
            "--docker-opts-file", docker_file,
            "--healthz-ip", "127.0.0.1",
            "--healthz-port", str(self.healthz_port),
            "--control-socket", str(self.control_socket),
        ]  # fmt: skip
        if self.engine is not None:
            argv += ["--engine", self.engine]
        if self.ip_masq:
            argv.append("--ip-masq")
        return argv + self.extra_args

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        """PID of the running daemon (None when it is not running)."""
        return self.proc.pid if self.running and self.proc is not None else None

    @property
    def returncode(self) -> int | None:
        """Exit status of the last run (None while running or never started)."""
        return None if self.proc is None else self.proc.poll()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, wait: bool = True, timeout: float | None = None) -> Flanneld:
        """Start the daemon; with ``wait``, return once it is ready (see :meth:`wait_ready`)."""
        if self.running:
            raise FlanneldError(f"flanneld-py already running in {self.ns.name} (pid {self.pid})")
        self.starts += 1
        files = [self.subnet_file] + ([self.docker_opts_file] if self.docker_opts_file else [])
        self._files_before = {f: _signature(f) for f in files}
        with open(self.log_path, "ab") as log:
            log.write(f"==== {time.strftime('%H:%M:%S')} start #{self.starts}\n".encode())
            self._log_start = log.tell()
        pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        self.proc = self.ns.popen(
            self.argv(),
            self.log_path,
            # `-m flanneld_py` finds this checkout from any cwd
            env={**self.env, "PYTHONPATH": pythonpath},
            stop_timeout=self.stop_timeout,
        )
        if wait:
            self.wait_ready(timeout)
        return self

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (then SIGKILL after ``timeout``); returns the exit status (None if never
        started)."""
        if self.proc is None:
            return None
        return self.lab.stop(self.proc, timeout)

    def restart(self, wait: bool = True) -> Flanneld:
        self.stop()
        return self.start(wait=wait)

    def _files_written(self) -> bool:
        """True once this run replaced every file it writes."""
        return all(_signature(f) not in (None, old) for f, old in self._files_before.items())

    def wait_ready(self, timeout: float | None = None) -> None:
        """Until this run wrote its files and (health server on) ``/healthz`` says 200; raise
        :class:`FlanneldNotReady` with the log tail if the process exits or time runs out."""
        limit = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        last = "files not written yet"
        while True:
            if not self.running:
                if self.proc is None:
                    raise FlanneldNotReady(f"flanneld-py in {self.ns.name} was never started")
                raise self._not_ready(f"exited with status {self.returncode} before it was ready")
            if self._files_written():
                if not self.healthz_port:
                    return
                code, body = self.healthz()
                if code == 200:
                    return
                last = f"/healthz -> {code} {body.strip()[:200]}"
            if time.monotonic() > deadline:
                if self.healthz_port and last.startswith("files"):
                    code, body = self.healthz()
                    last += f"; /healthz -> {code} {body.strip()[:200]}"
                raise self._not_ready(f"not ready after {limit:.0f}s ({last})")
            time.sleep(0.1)

    def _not_ready(self, what: str) -> FlanneldNotReady:
        return FlanneldNotReady(
            f"flanneld-py in {self.ns.name} {what}\n"
            f"  command: {shlex.join(self.argv())}\n"
            f"  log {self.log_path}, last lines:\n" + textwrap.indent(self.log_tail(), "    ")
        )

    # -- health server -----------------------------------------------------------------------
    def _get(self, path: str) -> tuple[int, str]:
        if not self.healthz_port:
            raise FlanneldError(f"flanneld-py in {self.ns.name} runs without a health server")
        return http_get_in(self.ns, f"http://127.0.0.1:{self.healthz_port}{path}")

    def healthz(self) -> tuple[int, str]:
        """``GET /healthz`` from inside the host namespace: (status, body), 0 = no answer."""
        return self._get("/healthz")

    def readyz(self) -> tuple[int, str]:
        """``GET /readyz`` (readiness: lease held and the etcd watch live)."""
        return self._get("/readyz")

    def status(self) -> dict[str, Any]:
        """``GET /status`` parsed (lease, peers, engine counters, ...)."""
        code, body = self._get("/status")
        if code != 200:
            raise FlanneldError(f"flanneld-py in {self.ns.name}: GET /status -> {code} {body}")
        doc: dict[str, Any] = json.loads(body)
        return doc

    # -- control socket ----------------------------------------------------------------------
    def control_get(self, path: str, timeout: float = 5.0) -> tuple[int, dict[str, str], str]:
        """``GET path`` on the control socket (a unix socket: reachable from the root namespace):
        (status, headers with lower-case names, body); status 0 when nothing answers."""
        request = f"GET {path} HTTP/1.1\r\nHost: flanneld-py\r\nConnection: close\r\n\r\n"
        data = b""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect(str(self.control_socket))
                sock.sendall(request.encode())
                while chunk := sock.recv(65536):
                    data += chunk
        except OSError as e:
            return 0, {}, str(e)
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        try:
            code = int(lines[0].split()[1])
        except (IndexError, ValueError):
            return 0, {}, data.decode(errors="replace")
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])
        }
        return code, headers, body.decode(errors="replace")

    def metrics(self) -> str:
        """``GET /metrics`` over the control socket (the Prometheus text format)."""
        code, _, body = self.control_get("/metrics")
        if code != 200:
            raise FlanneldError(f"flanneld-py in {self.ns.name}: GET /metrics -> {code} {body}")
        return body

    # -- what it wrote -----------------------------------------------------------------------
    def subnet_env(self) -> dict[str, str]:
        """The subnet file (FLANNEL_NETWORK, FLANNEL_SUBNET, FLANNEL_MTU, FLANNEL_IPMASQ)."""
        return read_env_file(self.subnet_file)

    @property
    def subnet(self) -> IPv4Network:
        """The leased subnet (FLANNEL_SUBNET holds its first address)."""
        return IPv4Interface(self.subnet_env()["FLANNEL_SUBNET"]).network

    @property
    def mtu(self) -> int:
        return int(self.subnet_env()["FLANNEL_MTU"])

    def docker_options(self) -> list[str]:
        """dockerd's arguments from the docker options file (as systemd + the shell read it)."""
        if self.docker_opts_file is None:
            raise FlanneldError(f"flanneld-py in {self.ns.name} writes no docker options file")
        return docker_network_options(self.docker_opts_file)

    # -- log ---------------------------------------------------------------------------------
    def log_text(self) -> str:
        """What the current (or last) run wrote to the log."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30, width: int = 300) -> str:
        """The last ``lines`` lines of the current run's log, each cut to ``width``."""
        tail = [line[:width] for line in self.log_text().splitlines()[-lines:]]
        return "\n".join(tail) if tail else "(empty log)"


# ---------------------------------------------------------------------------------------------
# a cluster


class FlannelCluster:
    """etcd in the underlay namespace holding ``config`` + one :class:`Flanneld` per host.

    The topology is ``lab.flannel_topology(n_hosts, mtu=mtu)`` unless ``topology`` is given.
    ``engines`` (one per host), ``log_paths`` (one per host) and the other keywords are passed
    to each :class:`Flanneld`. :meth:`start` = :meth:`start_etcd` + :meth:`start_daemons`.
    """

    def __init__(
        self,
        lab: Lab,
        n_hosts: int = 2,
        *,
        config: str | None = DEFAULT_CONFIG,
        engines: Sequence[str | None] | None = None,
        ip_masq: bool = False,
        healthz: bool = True,
        docker_opts: bool = True,
        extra_args: Sequence[str] = (),
        log_paths: Sequence[str | os.PathLike[str]] | None = None,
        mtu: int = 1500,
        topology: Topology | None = None,
    ) -> None:
        self.lab = lab
        self.topo = topology or lab.flannel_topology(n_hosts=n_hosts, mtu=mtu)
        self.config = config
        self.etcd = EtcdServer(
            lab.tmpdir / "etcd", ip=str(self.topo.etcd_address), netns=self.topo.underlay.name
        )
        lab.defer("etcd", self.etcd.close)
        n = len(self.topo.hosts)
        engine_list = list(engines) if engines is not None else [None] * n
        logs: list[str | os.PathLike[str] | None] = (
            list(log_paths) if log_paths is not None else [None] * n
        )
        if len(engine_list) != n or len(logs) != n:
            raise LabError(f"engines and log_paths need one entry per host ({n})")
        self.hosts = [
            Flanneld(
                lab,
                ns,
                [self.etcd.endpoint],
                engine=engine,
                ip_masq=ip_masq,
                healthz_port=HEALTHZ_PORT if healthz else 0,
                docker_opts=docker_opts,
                extra_args=extra_args,
                log_path=log,
            )
            for ns, engine, log in zip(self.topo.hosts, engine_list, logs, strict=True)
        ]

    def start(self, timeout: float = 30.0) -> FlannelCluster:
        self.start_etcd()
        self.start_daemons(timeout)
        return self

    def start_etcd(self) -> None:
        """Start etcd on the underlay and store the network config (unless ``config`` is empty)."""
        if shutil.which("etcd") is None:
            raise LabError(
                "etcd not found: apt-get install etcd-server etcd-client (or make setup)"
            )
        try:
            self.etcd.start()
            if self.config:
                self.etcdctl("put", f"{ETCD_PREFIX}/config", self.config)
        except EtcdLabError as exc:
            raise LabError(f"etcd on the underlay failed: {exc}") from None

    def start_daemons(self, timeout: float = 30.0) -> None:
        """Start every daemon, then wait until all are ready (``timeout`` for them all)."""
        for h in self.hosts:
            h.start(wait=False)
        deadline = time.monotonic() + timeout
        for h in self.hosts:
            h.wait_ready(max(0.0, deadline - time.monotonic()))

    def etcdctl(self, *args: str) -> str:
        return self.etcd.etcdctl(*args)

    def leases(self) -> dict[str, dict[str, Any]]:
        """``{key: value}`` of everything under ``<prefix>/subnets/`` (a value that is not JSON
        comes back as ``{"raw": value}``)."""
        out = self.etcdctl("get", "--prefix", f"{ETCD_PREFIX}/subnets/")
        lines = out.splitlines()
        leases: dict[str, dict[str, Any]] = {}
        for key, value in zip(lines[0::2], lines[1::2], strict=True):
            try:
                leases[key] = json.loads(value)
            except ValueError:
                leases[key] = {"raw": value}
        return leases

    def leases_by_subnet(self) -> dict[str, dict[str, Any]]:
        """:meth:`leases` keyed by subnet (``10.5.3.0/24``) instead of etcd key."""
        return {k.rsplit("/", 1)[-1].replace("-", "/"): v for k, v in self.leases().items()}

    def add_container(self, i: int, address: str | None = None) -> Container:
        """A container namespace on a bridge holding host ``i``'s leased subnet (like docker0)."""
        h = self.hosts[i]
        return self.lab.add_container_bridge(h.ns, h.subnet, address=address)

    def wait_peers(self, expected: int, timeout: float = 20.0) -> None:
        """Until every running daemon's ``/status`` lists ``expected`` peers."""
        deadline = time.monotonic() + timeout
        while True:
            counts = [len(h.status()["peers"]) for h in self.hosts if h.running]
            if all(c == expected for c in counts):
                return
            if time.monotonic() > deadline:
                raise FlanneldError(f"peers {counts}, expected {expected} each")
            time.sleep(0.1)
