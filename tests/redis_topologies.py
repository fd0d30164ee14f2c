"""Redis set-ups beyond one plain server, for tests of redis_connect and the backend: a password-protected
server, a TLS server with a certificate made here, a 3-master Redis Cluster, and Sentinel with a
primary and a replica. All on free loopback ports, without persistence, always stopped, bounded waits.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.redis_fixture import stop_process

T = TypeVar("T")
LOOPBACK = "127.0.0.1"


def _binary(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH: install Debian's {package} (scripts/test.sh does)")
    return path


def free_port(with_bus: bool = False) -> int:
    """A free loopback port; with_bus: port + 10000 (a cluster node's bus) is free too."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind((LOOPBACK, 0))
            port = int(sock.getsockname()[1])
        if not with_bus:
            return port
        if port + 10000 < 65536:
            with socket.socket() as bus:
                try:
                    bus.bind((LOOPBACK, port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair found")


def poll(predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll a process we do not control (no event to wait on) until `predicate` is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except (redis.RedisError, OSError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class RedisProc:
    """One redis-server (or redis-sentinel) child; stop() then start() again keeps port and config."""

    def __init__(self, args: list[str], port: int, binary: str = "redis-server", package: str = "redis-server",
                 ping: Callable[[], Any] | None = None) -> None:
        self.args = args
        self.port = port
        self._binary = _binary(binary, package)
        self._ping = ping or (lambda: self.client().ping())
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self, timeout: float = 10.0) -> None:
        # cwd: a replica's full sync writes dump.rdb into its working directory; keep it out of the checkout.
        self.proc = subprocess.Popen([self._binary, *self.args], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     cwd=tempfile.gettempdir())

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self._binary} {self.args} exited with {self.proc.returncode}")
            return bool(self._ping())

        try:
            poll(up, timeout, f"{self._binary} on port {self.port}", interval=0.02)
        except BaseException:
            self.stop()
            raise

    def stop(self, kill: bool = False) -> None:
        """SIGTERM (or SIGKILL: a crash) and wait."""
        stop_process(self.proc, kill)
        self.proc = None

    def client(self, **kw: Any) -> redis.Redis:
        return redis.Redis(LOOPBACK, self.port, socket_timeout=2, socket_connect_timeout=2, **kw)


def plain_args(port: int, *extra: str) -> list[str]:
    # shutdown-timeout 0: a primary stopped after a failover must not wait for its replicas to catch up.
    return ["--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no", "--shutdown-timeout", "0",
            *extra]


# ---- password ----------------------------------------------------------------------------------------


class PasswordRedis(RedisProc):
    password = "correct-horse-battery"

    def __init__(self) -> None:
        port = free_port()
        super().__init__(plain_args(port, "--requirepass", self.password), port,
                         ping=lambda: self.client(password=self.password).ping())

    def url(self, password: str | None = None) -> str:
        auth = "" if password is None else f":{password}@"
        return f"redis://{auth}{LOOPBACK}:{self.port}/0"


# ---- TLS ---------------------------------------------------------------------------------------------


class TlsRedis(RedisProc):
    """redis-server with a TLS port only; its certificate (for 127.0.0.1 and localhost) is signed by a
    CA made here, found in `ca_file`; nothing on the machine trusts that CA."""

    def __init__(self, directory: Path) -> None:
        self.ca_file, cert, key = _make_certificates(directory)
        port = free_port()
        args = plain_args(0, "--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                          "--tls-ca-cert-file", str(self.ca_file), "--tls-auth-clients", "no")
        super().__init__(args, port, ping=lambda: self.client(ssl=True, ssl_ca_certs=str(self.ca_file)).ping())
        self.url = f"rediss://{LOOPBACK}:{port}/0"


def _make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wsapp test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address(LOOPBACK))]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


# ---- Redis Cluster -----------------------------------------------------------------------------------


class RedisClusterProcs:
    """`masters` masters, each with `replicas` replicas, created with `redis-cli --cluster create`.
    `stop_node(i)` / `kill_node(i)` take one node away (a master without a replica: its slots fail),
    `start_node(i)` brings it back with its slots (and no data: nothing is persisted).
    `full_coverage=False` is `cluster-require-full-coverage no`: the other shards keep serving their
    slots while one is down (with the default, every node refuses). With replicas, `replica_of(port)`,
    `kill_primary(port)` / `manual_failover(port)` and `replication_cut(port)` act out failovers."""

    def __init__(self, directory: Path, masters: int = 3, node_timeout_ms: int = 1000,
                 full_coverage: bool = True, replicas: int = 0) -> None:
        self.nodes: list[RedisProc] = []
        self._frozen: dict[int, RedisProc] = {}  # master port -> its replica, SIGSTOPped by replication_cut
        try:
            for _ in range(masters * (1 + replicas)):
                port = free_port(with_bus=True)
                args = plain_args(port, "--cluster-enabled", "yes", "--cluster-config-file",
                                  str(directory / f"nodes-{port}.conf"), "--cluster-node-timeout", str(node_timeout_ms),
                                  "--dir", str(directory), "--cluster-require-full-coverage",
                                  "yes" if full_coverage else "no",
                                  # a replica's first sync starts at once (Redis waits 5 s for more replicas)
                                  "--repl-diskless-sync-delay", "0")
                self.nodes.append(RedisProc(args, port))
            subprocess.run(
                [_binary("redis-cli", "redis-tools"), "--cluster", "create",
                 *(f"{LOOPBACK}:{node.port}" for node in self.nodes), "--cluster-replicas", str(replicas),
                 "--cluster-yes"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30,
            )
            self.wait_ok()
            self.wait_replicas_in_sync()
        except BaseException:
            self.stop()
            raise
        self.url = f"redis://{LOOPBACK}:{self.nodes[0].port}"

    def wait_ok(self, timeout: float = 15.0) -> None:
        """Until every running node says cluster_state:ok and knows all nodes."""
        def ok() -> bool:
            for node in self.nodes:
                if node.proc is None:
                    continue
                info = node.client().execute_command("CLUSTER", "INFO").decode()
                if "cluster_state:ok" not in info or f"cluster_known_nodes:{len(self.nodes)}" not in info:
                    return False
            return True

        poll(ok, timeout, "cluster_state:ok on every node")

    def wait_replicas_in_sync(self, timeout: float = 15.0) -> None:
        """Until every running replica has finished its sync with its master (master_link_status:up)."""
        def synced() -> bool:
            for node in self.nodes:
                if node.proc is not None:
                    info = node.client().info("replication")
                    if info["role"] == "slave" and info.get("master_link_status") != "up":
                        return False
            return True

        poll(synced, timeout, "every replica in sync with its master")

    def node_at(self, port: int) -> RedisProc:
        return next(node for node in self.nodes if node.port == port)

    def replica_of(self, port: int) -> RedisProc:
        """The replica of the master on `port` (the frozen one inside `replication_cut`)."""
        if port in self._frozen:
            return self._frozen[port]
        for node in self.nodes:
            if node.proc is not None and node.port != port and node not in self._frozen.values():
                info = node.client().info("replication")
                if info["role"] == "slave" and int(info["master_port"]) == port:
                    return node
        raise LookupError(f"no replica of the master on port {port}")

    def kill_primary(self, port: int) -> tuple[RedisProc, int]:
        """The master on `port` crashes (SIGKILL). Returns its replica and one of its slots, for
        `wait_promoted`: the replica is elected in its place once the other masters agree it failed
        (cluster-node-timeout, then an election)."""
        replica = self.replica_of(port)
        slot = self._first_slot(port)
        self.node_at(port).stop(kill=True)
        return replica, slot

    def manual_failover(self, port: int, timeout: float = 20.0) -> int:
        """`CLUSTER FAILOVER` on the replica of the master on `port`: the graceful hand-over (the master
        stops taking writes, the replica catches up, then takes over). Returns the new master's port
        once every node maps the slots to it and the old master has become its replica."""
        replica = self.replica_of(port)
        slot = self._first_slot(port)
        replica.client().execute_command("CLUSTER", "FAILOVER")
        new = self.wait_promoted(replica, slot, timeout)
        poll(lambda: self.node_at(port).client().info("replication")["role"] == "slave", timeout,
             "the old master to become a replica")
        return new

    @contextlib.contextmanager
    def replication_cut(self, port: int) -> Iterator[RedisProc]:
        """Within the block the master on `port` takes writes its replica will never get: the replica is
        frozen (SIGSTOP) and the master drops its link to it (`CLIENT KILL TYPE replica`), so what the
        master acknowledges now is lost if the replica takes over. The replica resumes (SIGCONT) after
        the block (which may kill the master first)."""
        replica = self.replica_of(port)
        assert replica.proc is not None
        master = self.node_at(port).client()
        os.kill(replica.proc.pid, signal.SIGSTOP)
        self._frozen[port] = replica
        try:
            master.execute_command("CLIENT", "KILL", "TYPE", "replica")
            # The frozen replica cannot connect again, so once the master lists none it gets nothing more.
            poll(lambda: int(master.info("replication")["connected_slaves"]) == 0, 5, "the link cut")
            yield replica
        finally:
            del self._frozen[port]
            os.kill(replica.proc.pid, signal.SIGCONT)

    def _first_slot(self, port: int) -> int:
        for start, _end, (_, owner, *_rest), *_ in self.node_at(port).client().execute_command("CLUSTER", "SLOTS"):
            if int(owner) == port:
                return int(start)
        raise LookupError(f"the node on port {port} is not a master")

    def wait_promoted(self, replica: RedisProc, slot: int, timeout: float = 20.0) -> int:
        """Until `replica` is a master and every running node maps `slot` to it; returns its port."""
        def promoted() -> bool:
            if replica.client().info("replication")["role"] != "master":
                return False
            return all(self._owner_port(node, slot) == replica.port for node in self.nodes if node.proc is not None)

        poll(promoted, timeout, f"the replica on port {replica.port} to take over slot {slot}")
        return replica.port

    def wait_failed(self, timeout: float = 10.0) -> None:
        """Until the running nodes have noticed a missing shard (cluster_state:fail)."""
        poll(lambda: all("cluster_state:fail" in n.client().execute_command("CLUSTER", "INFO").decode()
                         for n in self.nodes if n.proc is not None), timeout, "cluster_state:fail")

    def stop_node(self, index: int, kill: bool = False) -> None:
        self.nodes[index].stop(kill=kill)

    def start_node(self, index: int) -> None:
        self.nodes[index].start()
        self.wait_ok()

    def move_slot(self, slot: int, source: int, target: int) -> None:
        """Reshard one slot, keys included, from node `source` to node `target` (what `redis-cli
        --cluster reshard` does for each slot), and wait until every node agrees."""
        src, dst = self.nodes[source].client(), self.nodes[target].client()
        src_id, dst_id = (c.execute_command("CLUSTER", "MYID").decode() for c in (src, dst))
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            src.execute_command("MIGRATE", LOOPBACK, self.nodes[target].port, "", 0, 5000, "KEYS", *keys)
        for client in (dst, src, *(n.client() for i, n in enumerate(self.nodes) if i not in (source, target))):
            client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        poll(lambda: all(n.client().execute_command("CLUSTER", "KEYSLOT", "x") is not None
                         and self._owner_port(n, slot) == self.nodes[target].port for n in self.nodes),
             10, f"slot {slot} on node {target} everywhere")

    @staticmethod
    def _owner_port(node: RedisProc, slot: int) -> int | None:
        for start, end, (_, port, *_rest), *_ in node.client().execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(port)
        return None

    def port_of_key(self, key: str) -> int:
        slot = int(self.nodes[0].client().execute_command("CLUSTER", "KEYSLOT", key))
        for start, end, (_, port, *_rest), *_ in self.nodes[0].client().execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(port)
        raise LookupError(key)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


# ---- Sentinel ----------------------------------------------------------------------------------------


class SentinelProcs:
    """A primary, one replica and one Sentinel (quorum 1) watching them as `master_name`.
    `failover()` promotes the replica (SENTINEL FAILOVER) and waits until it is the primary;
    `kill_primary()` crashes the primary and waits for the Sentinel to promote the replica (faster)."""

    master_name = "wsapp-primary"

    def __init__(self, directory: Path) -> None:
        self.primary: RedisProc | None = None
        self.replica: RedisProc | None = None
        self.sentinel: RedisProc | None = None
        try:
            port = free_port()
            self.primary = RedisProc(plain_args(port), port)
            port = free_port()
            self.replica = RedisProc(plain_args(port, "--replicaof", LOOPBACK, str(self.primary.port)), port)
            replica = self.replica
            poll(lambda: replica.client().info("replication").get("master_link_status") == "up", 10,
                 "the replica in sync")
            port = free_port()
            conf = directory / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind {LOOPBACK}\ndir {directory}\n"
                f"sentinel monitor {self.master_name} {LOOPBACK} {self.primary.port} 1\n"
                f"sentinel down-after-milliseconds {self.master_name} 1000\n"
                f"sentinel failover-timeout {self.master_name} 10000\n"
            )
            self.sentinel = RedisProc([str(conf)], port, binary="redis-sentinel", package="redis-sentinel")
            self.wait_replica_known()
        except BaseException:
            self.stop()
            raise
        self.url = f"redis://{LOOPBACK}:{self.sentinel.port}"

    def primary_port(self) -> int:
        assert self.sentinel is not None
        host_port = self.sentinel.client().execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
        return int(host_port[1])

    def wait_replica_known(self, timeout: float = 15.0) -> None:
        """Until the Sentinel lists a healthy replica (SENTINEL FAILOVER needs one)."""
        assert self.sentinel is not None

        def known() -> bool:
            replicas = self.sentinel.client().execute_command("SENTINEL", "REPLICAS", self.master_name)
            for fields in replicas:
                entry = dict(zip(fields[::2], fields[1::2], strict=True)) if isinstance(fields, list) else fields
                flags = entry.get(b"flags", b"")
                healthy = b"s_down" not in flags and b"disconnected" not in flags
                if healthy and entry.get(b"master-link-status") == b"ok":
                    return True
            return False

        poll(known, timeout, "the Sentinel to know a healthy replica", interval=0.1)

    def failover(self, timeout: float = 20.0) -> int:
        """Promote the replica; return the new primary's port once the Sentinel and it agree and the old
        primary has been made a replica (the Sentinel does that on its next INFO round: up to ~10 s)."""
        assert self.sentinel is not None
        old = self.primary_port()
        sentinel = self.sentinel.client()
        # NOGOODSLAVE while the Sentinel's view of the replica is not fresh yet: ask again.
        poll(lambda: sentinel.execute_command("SENTINEL", "FAILOVER", self.master_name), timeout, "SENTINEL FAILOVER",
             interval=0.2)

        new = poll(lambda: self._promoted_instead_of(old), timeout, "the new primary", interval=0.1)
        # Until then the old primary still takes writes that its demotion will throw away.
        poll(lambda: redis.Redis(LOOPBACK, old, socket_timeout=2).execute_command("ROLE")[0] == b"slave", timeout,
             "the old primary to become a replica", interval=0.1)
        return new

    def kill_primary(self, timeout: float = 20.0) -> int:
        """The primary crashes (SIGKILL): the Sentinel notices within a second and promotes the replica;
        return the new primary's port once it answers as one."""
        old = self.primary_port()
        crashed = next(proc for proc in (self.primary, self.replica) if proc is not None and proc.port == old)
        crashed.stop(kill=True)

        return poll(lambda: self._promoted_instead_of(old), timeout, "the Sentinel to promote the replica",
                    interval=0.1)

    def _promoted_instead_of(self, old: int) -> int | None:
        """The new primary's port once the Sentinel names another one and it answers as a primary."""
        port = self.primary_port()
        if port == old:
            return None
        role = redis.Redis(LOOPBACK, port, socket_timeout=2).execute_command("ROLE")[0]
        return port if role == b"master" else None

    def stop(self) -> None:
        for proc in (self.sentinel, self.replica, self.primary):
            if proc is not None:
                proc.stop()


# ---- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def password_redis() -> Iterator[PasswordRedis]:
    server = PasswordRedis()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    server = TlsRedis(tmp_path_factory.mktemp("tls"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcs]:
    """One cluster for the run; tests that stop a shard must start it again (or use make_redis_cluster)."""
    cluster = RedisClusterProcs(tmp_path_factory.mktemp("cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture
def make_redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RedisClusterProcs]]:
    """Private clusters a test may break (keyword arguments as RedisClusterProcs'); all stopped after it."""
    started: list[RedisClusterProcs] = []

    def start(**options: Any) -> RedisClusterProcs:
        cluster = RedisClusterProcs(tmp_path_factory.mktemp("cluster"), **options)
        started.append(cluster)
        return cluster

    yield start
    for cluster in started:
        cluster.stop()


@pytest.fixture
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelProcs]:
    """A fresh primary/replica/Sentinel per test: a failover changes who is primary."""
    procs = SentinelProcs(tmp_path_factory.mktemp("sentinel"))
    yield procs
    procs.stop()
