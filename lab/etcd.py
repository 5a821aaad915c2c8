"""Real etcd servers for the tests, the bench and the demo.

``EtcdServer`` runs one etcd member (optionally inside a network namespace, optionally with TLS and
client certificates); ``EtcdCluster`` runs several members forming one cluster. Both are context
managers; processes are ended by PID only (SIGTERM, then SIGKILL) and a ``weakref.finalize`` kills
a server that was never stopped. Each member logs to ``<data_dir>/etcd.log``; ``log_tail()`` gives
the end of it, and a failed ``start()`` raises ``EtcdLabError`` with that tail in the message.

Helpers: ``make_tls()`` writes a CA, a server and a client certificate with ``openssl``;
``EtcdServer.enable_auth()`` / ``add_user()`` switch on etcd's username/password authentication.
With ``enable_v2`` a member serves etcd's v2 API too; ``etcdctl_v2()``, ``v2_node()``,
``enable_v2_auth()`` and ``add_v2_user()`` work on its v2 keyspace.
Only the ``etcd``, ``etcdctl``, ``ip`` and ``openssl`` binaries are needed (scripts/setup.sh).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

__all__ = [
    "EtcdCluster",
    "EtcdLabError",
    "EtcdServer",
    "TlsFiles",
    "free_port",
    "make_tls",
]


class EtcdLabError(RuntimeError):
    """An etcd server of the lab failed to start or an etcdctl command failed."""


def free_port(ip: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``ip`` right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((ip, 0))
        port: int = s.getsockname()[1]
        return port


def _clean_env() -> dict[str, str]:
    # etcd and etcdctl read ETCD_* / ETCDCTL_* variables: keep the lab hermetic.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ETCD_", "ETCDCTL_"))}
    env["ETCDCTL_API"] = "3"
    return env


# --------------------------------------------------------------------------------------------
# TLS material


@dataclass(frozen=True)
class TlsFiles:
    """PEM files written by ``make_tls``."""

    directory: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    if shutil.which("openssl") is None:
        raise EtcdLabError("make_tls needs the openssl binary (apt-get install openssl)")
    proc = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False
    )
    if proc.returncode != 0:
        raise EtcdLabError(f"openssl {args[0]} failed: {proc.stderr.strip()}")


def make_tls(
    directory: str | Path,
    *,
    ips: Sequence[str] = ("127.0.0.1",),
    dns_names: Sequence[str] = ("localhost",),
    client_cn: str = "flanneld-py-client",
) -> TlsFiles:
    """Create a CA plus a server certificate (for ``ips`` and ``dns_names``) and a client
    certificate signed by it, as PEM files in ``directory`` (EC P-256 keys, valid 2 days)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "ca-key.pem", "-out", "ca.pem", "-days", "2", "-subj", "/CN=flanneld-py test CA",
        cwd=d,
    )  # fmt: skip
    san = ",".join([f"IP:{ip}" for ip in ips] + [f"DNS:{n}" for n in dns_names])
    for name, cn, ext in (
        ("server", "etcd", f"subjectAltName={san}\nextendedKeyUsage=serverAuth,clientAuth\n"),
        ("client", client_cn, "extendedKeyUsage=clientAuth\n"),
    ):
        (d / f"{name}.ext").write_text("basicConstraints=CA:FALSE\n" + ext)
        _openssl(
            "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", "-subj", f"/CN={cn}",
            cwd=d,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
            cwd=d,
        )  # fmt: skip
    return TlsFiles(
        directory=d,
        ca=d / "ca.pem",
        server_cert=d / "server.pem",
        server_key=d / "server-key.pem",
        client_cert=d / "client.pem",
        client_key=d / "client-key.pem",
    )


# --------------------------------------------------------------------------------------------
# One member


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Finalizer: SIGKILL a still-running server by its PID and collect it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


class EtcdServer:
    """One etcd member.

    ``data_dir`` is created if missing (a temporary directory when None, removed on ``close``).
    Ports are picked free on ``ip`` when not given (inside a fresh ``netns`` the defaults
    2379/2380 are used, since that namespace has its own port space). With ``tls`` the client URL
    is https and client certificates are required (``client_cert_auth``). ``initial_cluster``
    (``name=peer_url,...``) and ``cluster_token`` are for members of an ``EtcdCluster``.
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        *,
        name: str = "n0",
        ip: str = "127.0.0.1",
        client_port: int | None = None,
        peer_port: int | None = None,
        peer_ip: str | None = None,
        netns: str | None = None,
        tls: TlsFiles | None = None,
        client_cert_auth: bool = True,
        initial_cluster: str | None = None,
        cluster_token: str | None = None,
        extra_args: Sequence[str] = (),
        start_timeout: float = 20.0,
        enable_v2: bool = False,
    ) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="flanneld-py-etcd-")
            data_dir = Path(self._tmp.name) / name
        self.data_dir = Path(data_dir)
        self.name = name
        self.ip = ip
        self.peer_ip = peer_ip or ip
        self.netns = netns
        self.tls = tls
        self.client_cert_auth = client_cert_auth
        if client_port is None:
            client_port = 2379 if netns else free_port(ip)
        if peer_port is None:
            peer_port = 2380 if netns else free_port(self.peer_ip)
        self.client_port = client_port
        self.peer_port = peer_port
        self.initial_cluster = initial_cluster or f"{name}={self.peer_url}"
        self.cluster_token = cluster_token or f"flanneld-py-{os.getpid()}-{self.peer_port}"
        self.extra_args = list(extra_args)
        self.start_timeout = start_timeout
        #: serve etcd's v2 API too (``--enable-v2=true``; etcd 3.4 has it off by default)
        self.enable_v2 = enable_v2
        #: (user, password) that etcdctl uses once ``enable_auth`` ran
        self.auth: tuple[str, str] | None = None
        #: (user, password) that ``etcdctl_v2`` uses once ``enable_v2_auth`` ran (v2's users are
        #: not v3's)
        self.auth_v2: tuple[str, str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[[subprocess.Popen[bytes]], EtcdServer] | None = None

    # -- addresses -------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        """The client URL, e.g. ``http://127.0.0.1:40123``."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.ip}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.peer_ip}:{self.peer_port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "etcd.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def _prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    def command(self) -> list[str]:
        """The etcd command line (without the netns prefix)."""
        cmd = [
            "etcd",
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.endpoint,
            "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster,
            "--initial-cluster-token", self.cluster_token,
            "--initial-cluster-state", "new",
            "--logger=zap",
            "--log-outputs=stderr",
        ]  # fmt: skip
        if self.tls:
            cmd += [
                "--cert-file", str(self.tls.server_cert),
                "--key-file", str(self.tls.server_key),
                "--trusted-ca-file", str(self.tls.ca),
            ]  # fmt: skip
            if self.client_cert_auth:
                cmd.append("--client-cert-auth")
        if self.enable_v2:
            cmd.append("--enable-v2=true")
        return cmd + self.extra_args

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, wait: bool = True) -> EtcdServer:
        """Start etcd (same data dir on a restart); with ``wait``, return once it is healthy."""
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.data_dir, 0o700)
        with open(self.log_path, "ab") as log:
            log.write(f"==== {time.strftime('%H:%M:%S')} start {self.name}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self._prefix() + self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=_clean_env(),
                start_new_session=True,
            )
        if self._finalizer is not None:
            self._finalizer()  # the previous process (already stopped): nothing left to reap
        self._finalizer = weakref.finalize(self, _reap, self._proc)
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float | None = None) -> None:
        """Poll ``etcdctl endpoint health`` until it succeeds; raise with the log tail if etcd
        exits or does not become healthy in time."""
        deadline = time.monotonic() + (self.start_timeout if timeout is None else timeout)
        last = ""
        while True:
            if self._proc is None or self._proc.poll() is not None:
                rc = None if self._proc is None else self._proc.returncode
                raise EtcdLabError(
                    f"etcd {self.name} exited (rc={rc}) while starting; log {self.log_path}:\n"
                    + self.log_tail()
                )
            proc = self._run_etcdctl(["endpoint", "health"], timeout=5, command_timeout=1.0)
            if proc.returncode == 0:
                return
            last = ((proc.stderr or proc.stdout).strip().splitlines() or [""])[-1]
            if time.monotonic() > deadline:
                raise EtcdLabError(
                    f"etcd {self.name} at {self.endpoint} not healthy after "
                    f"{self.start_timeout:.0f}s ({last}); log {self.log_path}:\n" + self.log_tail()
                )
            time.sleep(0.1)

    def _signal(self, sig: signal.Signals) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, sig)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; always by PID."""
        if self._proc is None:
            return
        self._signal(signal.SIGTERM)
        self._signal(signal.SIGCONT)  # in case it was paused
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self._proc.wait(timeout=5)

    def kill(self) -> None:
        """SIGKILL (a crash: no clean shutdown, peers and clients see the connection drop)."""
        if self._proc is None:
            return
        self._signal(signal.SIGKILL)
        self._proc.wait(timeout=5)

    def pause(self) -> None:
        """SIGSTOP: the member stops answering but its connections stay open (like a network
        that silently drops everything); ``resume()`` undoes it."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def restart(self, wait: bool = True) -> EtcdServer:
        """Stop if running, then start again on the same data dir and ports."""
        self.stop()
        return self.start(wait=wait)

    def close(self) -> None:
        """Stop the server and remove a temporary data dir."""
        self.stop()
        if self._finalizer is not None:
            self._finalizer()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> EtcdServer:
        if not self.running:
            try:
                self.start()
            except BaseException:
                self.close()
                raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def log_tail(self, lines: int = 25, width: int = 400) -> str:
        """The last ``lines`` lines of the log, each cut to ``width`` characters."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(line[:width] for line in text.splitlines()[-lines:])

    # -- etcdctl ---------------------------------------------------------------------------
    def _etcdctl_flags(self, command_timeout: float) -> list[str]:
        flags = [f"--endpoints={self.endpoint}", f"--command-timeout={command_timeout}s"]
        if self.tls:
            flags += [
                f"--cacert={self.tls.ca}",
                f"--cert={self.tls.client_cert}",
                f"--key={self.tls.client_key}",
            ]
        if self.auth:
            flags.append(f"--user={self.auth[0]}:{self.auth[1]}")
        return flags

    def _run_etcdctl(
        self, args: Sequence[str], timeout: float = 15.0, command_timeout: float = 5.0
    ) -> subprocess.CompletedProcess[str]:
        cmd = [*self._prefix(), "etcdctl", *self._etcdctl_flags(command_timeout), *args]
        try:
            return subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout, env=_clean_env(), check=False
            )
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(cmd, 124, "", f"etcdctl timed out after {timeout}s")

    def etcdctl(self, *args: str, check: bool = True, timeout: float = 15.0) -> str:
        """Run etcdctl against this member (TLS and auth flags added); return stdout."""
        proc = self._run_etcdctl(args, timeout=timeout)
        if check and proc.returncode != 0:
            raise EtcdLabError(
                f"etcdctl {' '.join(args)} failed (rc={proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()}"
            )
        return proc.stdout

    def revision(self) -> int:
        """The current store revision."""
        out = json.loads(self.etcdctl("endpoint", "status", "-w", "json"))
        return int(out[0]["Status"]["header"]["revision"])

    def compact(self, revision: int | None = None) -> int:
        """Compact the history up to ``revision`` (default: the current revision)."""
        rev = self.revision() if revision is None else revision
        self.etcdctl("compact", str(rev))
        return rev

    def metric(self, name: str) -> float:
        """A Prometheus gauge/counter of this (plain http) member's ``/metrics``, e.g.
        ``etcd_debugging_mvcc_watcher_total`` (watchers open on this member)."""
        if self.tls:
            raise EtcdLabError("metric() needs a plain http member")
        url = f"{self.endpoint}/metrics"
        fetch = (
            "import sys, urllib.request; "
            "print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"
        )
        proc = subprocess.run(
            [*self._prefix(), sys.executable, "-c", fetch, url],
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
        for line in proc.stdout.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise EtcdLabError(f"etcd metric {name} not found at {url}: {proc.stderr.strip()[-200:]}")

    def lease_ids(self) -> list[int]:
        """IDs of all etcd leases granted and not yet expired/revoked."""
        out = json.loads(self.etcdctl("lease", "list", "-w", "json"))
        return [int(lease["id"]) for lease in out.get("leases") or []]

    def enable_auth(self, root_password: str = "rootpw") -> None:
        """Create the root user (with the root role) and switch authentication on. Afterwards
        this object's etcdctl calls log in as root."""
        self.etcdctl("user", "add", f"root:{root_password}")
        self.etcdctl("role", "add", "root", check=False)
        self.etcdctl("user", "grant-role", "root", "root")
        self.etcdctl("auth", "enable")
        self.auth = ("root", root_password)

    def add_user(self, name: str, password: str, prefix: str = "/") -> None:
        """A user (and role of the same name) allowed to read and write keys under ``prefix``."""
        self.etcdctl("user", "add", f"{name}:{password}")
        self.etcdctl("role", "add", name)
        self.etcdctl("role", "grant-permission", name, "--prefix=true", "readwrite", prefix)
        self.etcdctl("user", "grant-role", name, name)

    # -- etcd's v2 API (members started with enable_v2) ----------------------------------
    def _run_etcdctl_v2(
        self, args: Sequence[str], timeout: float = 15.0, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        flags = [f"--endpoints={self.endpoint}", "--no-sync", "--total-timeout=5s"]
        if self.tls:
            flags += [
                f"--ca-file={self.tls.ca}",
                f"--cert-file={self.tls.client_cert}",
                f"--key-file={self.tls.client_key}",
            ]
        if self.auth_v2:
            flags.append(f"--username={self.auth_v2[0]}:{self.auth_v2[1]}")
        cmd = [*self._prefix(), "etcdctl", *flags, *args]
        env = {**_clean_env(), "ETCDCTL_API": "2"}
        try:
            return subprocess.run(
                cmd,
                input=stdin,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(cmd, 124, "", f"etcdctl timed out after {timeout}s")

    def etcdctl_v2(
        self, *args: str, check: bool = True, timeout: float = 15.0, stdin: str | None = None
    ) -> str:
        """``ETCDCTL_API=2 etcdctl`` against this member (``set``, ``mk``, ``get``, ``ls``,
        ``rm``, ``user``, ``role``, ``auth`` ...; TLS and v2 auth flags added); returns stdout."""
        proc = self._run_etcdctl_v2(args, timeout=timeout, stdin=stdin)
        if check and proc.returncode != 0:
            raise EtcdLabError(
                f"etcdctl (v2) {' '.join(args)} failed (rc={proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()}"
            )
        return proc.stdout

    def v2_node(self, key: str) -> dict[str, object] | None:
        """The v2 node of ``key`` as etcd reports it (``value``, ``ttl``, ``modifiedIndex``,
        ...), or None if it does not exist."""
        proc = self._run_etcdctl_v2(["-o", "json", "get", key])
        if proc.returncode != 0:
            if "Key not found" in proc.stderr or "Key not found" in proc.stdout:
                return None
            raise EtcdLabError(f"etcdctl (v2) get {key} failed: {proc.stderr.strip()}")
        node: dict[str, object] = json.loads(proc.stdout)["node"]
        return node

    def _v2_user_add(self, name: str, password: str) -> None:
        # etcdctl v2 asks for the password (twice for a new user) on stdin
        self.etcdctl_v2("user", "add", name, stdin=f"{password}\n{password}\n")

    def enable_v2_auth(self, root_password: str = "rootpw") -> None:
        """Switch on etcd's v2 authentication: user root, ``auth enable``, and the ``guest``
        role (which v2 lets do everything by default) stripped of its rights. Afterwards this
        object's ``etcdctl_v2`` calls log in as root."""
        self._v2_user_add("root", root_password)
        self.etcdctl_v2("auth", "enable")
        self.auth_v2 = ("root", root_password)
        self.etcdctl_v2("role", "revoke", "guest", "--path", "/*", "--readwrite")

    def add_v2_user(self, name: str, password: str, prefix: str = "/") -> None:
        """A v2 user (and role of the same name) that may read and write the keys under
        ``prefix``."""
        path = prefix.rstrip("/") + "/*"
        self.etcdctl_v2("role", "add", name)
        self.etcdctl_v2("role", "grant", name, "--path", path, "--readwrite")
        self._v2_user_add(name, password)
        self.etcdctl_v2("user", "grant", name, "--roles", name)


# --------------------------------------------------------------------------------------------
# A cluster


class EtcdCluster:
    """``n`` etcd members on ``ip`` (free ports; inside ``netns`` ports 2379+10i / 2380+10i),
    forming one cluster. ``start()`` launches them all and waits until each is healthy (~2.5 s
    for 3 members)."""

    def __init__(
        self,
        n: int = 3,
        base_dir: str | Path | None = None,
        *,
        ip: str = "127.0.0.1",
        netns: str | None = None,
        tls: TlsFiles | None = None,
        extra_args: Sequence[str] = (),
        start_timeout: float = 30.0,
    ) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if base_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="flanneld-py-etcd-cluster-")
            base_dir = self._tmp.name
        base = Path(base_dir)
        if netns:
            ports = [(2379 + 10 * i, 2380 + 10 * i) for i in range(n)]
        else:
            ports = [(free_port(ip), free_port(ip)) for _ in range(n)]
        initial = ",".join(f"n{i}=http://{ip}:{peer}" for i, (_, peer) in enumerate(ports))
        self.members = [
            EtcdServer(
                base / f"n{i}",
                name=f"n{i}",
                ip=ip,
                client_port=client,
                peer_port=peer,
                netns=netns,
                tls=tls,
                initial_cluster=initial,
                cluster_token=f"flanneld-py-{os.getpid()}-{ports[0][1]}",
                extra_args=extra_args,
                start_timeout=start_timeout,
            )
            for i, (client, peer) in enumerate(ports)
        ]

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def __getitem__(self, i: int) -> EtcdServer:
        return self.members[i]

    def start(self) -> EtcdCluster:
        """Start every member and wait until all are healthy; on failure stop them all."""
        try:
            for m in self.members:
                m.start(wait=False)
            for m in self.members:
                m.wait_healthy()
        except BaseException:
            for m in self.members:
                m.stop()
            raise
        return self

    def kill(self, i: int) -> None:
        self.members[i].kill()

    def stop(self, i: int) -> None:
        self.members[i].stop()

    def restart(self, i: int) -> None:
        self.members[i].restart()

    def running(self) -> list[EtcdServer]:
        return [m for m in self.members if m.running]

    def leader(self) -> int:
        """Index of the current leader (asked of a running member)."""
        for m in self.running():
            try:
                status = json.loads(m.etcdctl("endpoint", "status", "-w", "json"))[0]["Status"]
            except (EtcdLabError, ValueError, LookupError):
                continue
            leader_id = int(status["leader"])
            members = json.loads(m.etcdctl("member", "list", "-w", "json"))["members"]
            names = {int(x["ID"]): x["name"] for x in members}
            return int(names[leader_id].lstrip("n"))
        raise EtcdLabError("no running member knows a leader")

    def etcdctl(self, *args: str, check: bool = True) -> str:
        """etcdctl against the first running member."""
        running = self.running()
        if not running:
            raise EtcdLabError("no etcd member is running")
        return running[0].etcdctl(*args, check=check)

    def enable_auth(self, root_password: str = "rootpw") -> None:
        self.running()[0].enable_auth(root_password)
        for m in self.members:
            m.auth = ("root", root_password)

    def close(self) -> None:
        for m in self.members:
            m.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> EtcdCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
