"""Runs the benchmarks: every scenario, direct and through openclawd, in one run.

What runs, each in its own process, on loopback and unix sockets only:

* a real Vault-compatible server (``bao server -dev``, the ``bench`` extra) holding the
  key, written there by this runner;
* the fast fake upstream (``bench/upstream.py``), which accepts only the keys the runner
  tells it to (so a rotation can revoke the old key at once);
* the daemon (``openclawd run``), configured like a production one (info-level logging to
  a file, default limits) but for ``max_connections``, raised for the idle-connection
  scenario, and the provider's ``max_connections`` (upstream connections), raised to the
  largest number of concurrent streams, and started under a ``NOTIFY_SOCKET`` this runner
  reads;
* the load client (``bench/client.py``), one process for every path, so that the
  difference between paths is openclawd and not a difference between clients; and, for
  the concurrent streams, several more of it (``STREAMS_PER_CLIENT`` streams each).

Scenarios 1-4 alternate the paths (direct, /v1/ws, /v1/http) round after round, each
round in a rotated order, so a drift of the machine (another process, frequency scaling)
is spread over all of them; figures are medians over all samples of a path. The summary
is printed as a Markdown table, and every figure, with the machine, its load average and
the versions, is written as JSON.

Scenario 8, **concurrent streams** (``streams``), for each N of the plan and each path in
the same rotated A/B order: N connections are opened first (spread over
``ceil(N / STREAMS_PER_CLIENT)`` load client processes), then every one sends its request
at once: a timed stream of ``streams_events`` events, one every ``STREAM_INTERVAL_MS``,
all on one schedule that begins ``STREAMS_LEAD_S`` (plus 2 ms per stream) after the
requests are sent, so that every stream is set up before the first event is due, and the
N streams' events spread evenly over each interval. The upstream stamps each event
with CLOCK_MONOTONIC as it writes it; the client takes the same clock when it reads it
(the clock is shared by every process on the host). Reported over all events of a path:
the delay's p50 and p99, the added p50/p99 (a path through openclawd minus direct, same
N), the daemon's CPU seconds per 1,000 events, and the streams that did not complete.

That the load generators are not the limit is checked, not assumed: the direct path
runs the same N streams through the same client processes and upstream, so a direct
p99 that stays low at that N shows they keep up with N streams (what a path through
openclawd adds is then openclawd's, or the CPU it takes from them: the machine's cores
are shared). Besides, each row reports the client processes' CPU (the busiest one's,
100 = a core) and the upstream's, how late the upstream wrote its events against their
schedule (p99), and the CPU every other process on the machine used meanwhile: a client
process near 100%, a late upstream or a busy machine marks a row whose figures are not
openclawd's alone.

Usage: ``bench/run [--quick | --smoke] [--scenarios A,B] [--output PATH]
[--profile PATH | --cprofile PATH] [--daemon-from CHECKOUT] [--tracing]``. With
``--tracing`` the daemon exports a span per request (``sample_ratio`` 1.0) to a local OTLP
sink (``bench/otlp_sink.py``); the figures then include what tracing costs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from bench.otlp_sink import otlp_sink
from openclawd.config import VaultConfig
from openclawd.demo.layout import DemoError, Layout, find_bao
from openclawd.demo.supervise import start_vault, stop_process
from openclawd.keys.vault import Vault

REPO = Path(__file__).resolve().parent.parent
PROVIDER = "bench"
VAULT_PATH = "openclawd/bench"
PATHS = ("direct", "ws", "http")
READY_TIMEOUT_S = 30.0
# (2): the upstream sends the first event, and the others this long after it.
FIRST_EVENT_GAP_MS = 5
STREAM_INTERVAL_MS = 20  # (8) one event every this long, on each stream
STREAMS_PER_CLIENT = 200  # (8) concurrent streams per load client process
# (8) From the go to the streams' first events: time for every request to reach the
# upstream first (the daemon takes ~1 ms of CPU per request), so that what is measured is
# N streams running, not N requests being set up while the first streams already run.
STREAMS_LEAD_S = 0.3
STREAMS_LEAD_PER_STREAM_S = 0.002
STOP_TIMEOUT_S = 10.0
CLIENT_TIMEOUT_S = 600.0
_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Plan:
    """How much of each scenario a mode runs."""

    rounds: int  # A/B rounds of scenarios 1-3
    sequential: int  # (1) requests per path per round
    first_event: int  # (2) streamed requests per path per round
    stream_events: int  # (2) events in each of them
    relay_events: int  # (3) events in the one long stream
    throughput_rounds: int  # (4)
    throughput_s: float  # (4) seconds per path, per round, per concurrency
    concurrency: tuple[int, ...]  # (4)
    idle: tuple[int, ...]  # (5) idle app connections, cumulative steps
    starts: int  # (6) daemon starts
    rotation_s: float  # (7) length of the load
    rotate_every_s: float  # (7)
    rotation_clients: int  # (7) half on /v1/ws, half on /v1/http
    streams: tuple[int, ...]  # (8) numbers of concurrent streams
    streams_events: int  # (8) events per stream, one every STREAM_INTERVAL_MS
    streams_rounds: int  # (8) A/B rounds at each number


PLANS = {
    "full": Plan(
        rounds=6,
        sequential=1000,
        first_event=500,
        stream_events=16,
        relay_events=20_000,
        throughput_rounds=3,
        throughput_s=5.0,
        concurrency=(1, 16, 64),
        idle=(1000, 10_000),
        starts=10,
        rotation_s=30.0,
        rotate_every_s=5.0,
        rotation_clients=64,
        streams=(50, 100, 250, 500, 1000),
        streams_events=50,
        streams_rounds=2,
    ),
    "quick": Plan(
        rounds=3,
        sequential=300,
        first_event=150,
        stream_events=16,
        relay_events=20_000,
        throughput_rounds=1,
        throughput_s=2.0,
        concurrency=(1, 16, 64),
        idle=(1000, 10_000),
        starts=3,
        rotation_s=10.0,
        rotate_every_s=2.5,
        rotation_clients=64,
        streams=(50, 100, 250),
        streams_events=50,
        streams_rounds=1,
    ),
    # Every scenario, tiny: for the test suite, which checks the runner works, not speed.
    "smoke": Plan(
        rounds=2,
        sequential=10,
        first_event=5,
        stream_events=4,
        relay_events=500,
        throughput_rounds=1,
        throughput_s=0.3,
        concurrency=(1, 4),
        idle=(20, 50),
        starts=1,
        rotation_s=2.0,
        rotate_every_s=0.6,
        rotation_clients=8,
        streams=(5,),
        streams_events=5,
        streams_rounds=1,
    ),
}


def say(text: str) -> None:
    """Progress, on stderr (stdout is the summary)."""
    print(text, file=sys.stderr, flush=True)


class BenchError(Exception):
    """The benchmark cannot go on; the message says why."""


# --- processes ------------------------------------------------------------------------


def child_environ(source: Path = REPO, **extra: str) -> dict[str, str]:
    """Our environment for a child, minus Vault's and systemd's variables; ``source`` (a
    checkout) first on its path, so its ``openclawd`` and ``bench`` are the ones run."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("VAULT_", "BAO_"))
        and name not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def machine_busy_seconds() -> float:
    """CPU time every process on the machine has used so far, all cores together
    (``/proc/stat``: all but idle and iowait)."""
    ticks = [int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / _TICK


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for {pid}")


class Lines:
    """JSON lines read from a process's stdout."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._pending = b""

    async def next(self) -> dict[str, Any]:
        while b"\n" not in self._pending:
            data = await self._stream.receive_some(1 << 16)
            if not data:
                raise BenchError("the process closed its output")
            self._pending += data
        line, self._pending = self._pending.split(b"\n", 1)
        value = json.loads(line)
        if not isinstance(value, dict):
            raise BenchError(f"expected an object, got {line[:80]!r}")
        return value


class ClientProcess:
    """The load client (``bench/client.py``) and its command line protocol."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        assert process.stdout is not None
        self._lines = Lines(process.stdout)

    async def call(self, timeout_s: float = CLIENT_TIMEOUT_S, **command: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(json.dumps(command).encode() + b"\n")
        with trio.fail_after(timeout_s):
            answer = await self._lines.next()
        if "error" in answer:
            raise BenchError(f"the load client failed: {answer['error']}")
        return answer


@contextlib.asynccontextmanager
async def running(argv: Sequence[str], what: str, **options: Any) -> AsyncIterator[trio.Process]:
    try:
        process = await trio.lowlevel.open_process(list(argv), **options)
    except OSError as exc:
        raise BenchError(f"cannot start {what}: {exc}") from None
    try:
        yield process
    finally:
        await stop_process(process, STOP_TIMEOUT_S)


# --- the daemon -----------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """Profile the daemon (the main one, scenarios 1-5, 7 and 8) with ``tool``: ``py-spy``
    (sampling, collapsed stacks) or ``cprofile`` (every call, a pstats file)."""

    tool: str
    output: Path


@dataclass(frozen=True, slots=True)
class Setup(Layout):
    """Where a run lives (the demo's layout: sockets, config, bao's home and log), and
    what it runs against."""

    vault_addr: str
    root_token: str
    upstream_port: int
    daemon_source: Path = REPO  # the checkout whose openclawd runs as the daemon

    @property
    def upstream_url(self) -> str:
        return f"http://127.0.0.1:{self.upstream_port}"


# ``--tracing``: the daemon's [tracing] otlp_endpoint (a local sink, ratio 1.0), else None.
TRACING_ENDPOINT: str | None = None


def write_config(setup: Setup, max_connections: int, upstream_connections: int = 100) -> None:
    tracing = ""
    if TRACING_ENDPOINT is not None:
        tracing = (
            f"\n[tracing]\notlp_endpoint = {json.dumps(TRACING_ENDPOINT)}\nsample_ratio = 1.0\n"
        )
    setup.config.write_text(
        f"""\
# Written by bench/runner.py: production defaults, but for the max_connections.
[listen]
socket = {json.dumps(str(setup.data_socket))}
mode = "0600"
max_connections = {max_connections}

[control]
socket = {json.dumps(str(setup.control_socket))}
mode = "0600"

[vault]
addr = {json.dumps(setup.vault_addr)}
auth = "token"
mount = "secret"

[providers.{PROVIDER}]
base_url = {json.dumps(setup.upstream_url)}
vault_path = {json.dumps(VAULT_PATH)}
max_connections = {upstream_connections}
{tracing}"""
    )


class Daemon:
    """A running ``openclawd run``; ``started_in_s``: from spawning it to READY=1."""

    def __init__(self, process: trio.Process, started_in_s: float) -> None:
        self.process = process
        self.started_in_s = started_in_s

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss(self) -> int:
        return rss_bytes(self.pid)


@contextlib.asynccontextmanager
async def daemon(
    setup: Setup,
    *,
    log_name: str = "daemon.log",
    profile: Profile | None = None,
) -> AsyncIterator[Daemon]:
    """Start the daemon and wait for READY=1; stop it (SIGTERM, drain) on the way out."""
    notify_path = setup.notify_socket
    notify_path.unlink(missing_ok=True)
    notify = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await notify.bind(str(notify_path))
    argv = [sys.executable, "-m", "openclawd", "run", "--config", str(setup.config)]
    if profile is not None and profile.tool == "cprofile":
        # In-process: the daemon's pid is still the one measured; written as it exits.
        argv[1:1] = ["-m", "cProfile", "-o", str(profile.output)]
    log = (setup.root / log_name).open("ab")
    env = child_environ(
        setup.daemon_source, VAULT_TOKEN=setup.root_token, NOTIFY_SOCKET=str(notify_path)
    )
    try:
        spawned = time.monotonic()
        # Run where the daemon has no code (as under systemd, in /): its openclawd then
        # comes from PYTHONPATH (--daemon-from), not from the directory it started in.
        async with running(
            argv,
            "the daemon",
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            cwd=setup.root,
        ) as process:
            with trio.move_on_after(READY_TIMEOUT_S) as waited:
                while True:
                    message = await notify.recv(4096)
                    if b"READY=1" in message.split(b"\n"):
                        break
            if waited.cancelled_caught:
                raise BenchError(f"no READY=1 within {READY_TIMEOUT_S:g} s; see {log.name}")
            ready = Daemon(process, time.monotonic() - spawned)
            if profile is None or profile.tool != "py-spy":
                yield ready
            else:
                async with py_spy(process.pid, profile.output):
                    yield ready
    finally:
        log.close()
        notify.close()


@contextlib.asynccontextmanager
async def py_spy(pid: int, output: Path) -> AsyncIterator[None]:
    """py-spy samples ``pid`` (collapsed stacks into ``output``) while the block runs."""
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if py_spy is None:
        raise BenchError("--profile needs py-spy: .venv/bin/pip install py-spy")
    argv = [py_spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "200"]
    argv += ["--nonblocking", "--output", str(output)]
    process = await trio.lowlevel.open_process(argv, stdin=subprocess.DEVNULL)
    try:
        yield
    finally:
        with trio.CancelScope(shield=True):
            process.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            with trio.move_on_after(STOP_TIMEOUT_S):
                await process.wait()
            await stop_process(process, 1.0)


def control_client(setup: Setup) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(uds=str(setup.control_socket))
    return httpx.AsyncClient(transport=transport, base_url="http://openclawd", timeout=10.0)


# --- figures --------------------------------------------------------------------------


def quantile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank quantile; NaN for no samples."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    return float(ordered[max(1, math.ceil(q * len(ordered))) - 1])


def us(ns: float) -> float:
    return round(ns / 1000.0, 1)


def new_key() -> str:
    return "sk-bench-" + secrets.token_urlsafe(32)


def fingerprint(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:12]


def rotated(order: Sequence[str], by: int) -> list[str]:
    by %= len(order)
    return [*order[by:], *order[:by]]


# --- the scenarios --------------------------------------------------------------------


class AB:
    """Scenarios 1, 2 and 4: the same workload on every path in turn, round after round,
    in a rotated order. ``paths[0]`` is the direct path, every other one is compared with
    it; ``cpu()`` is the CPU time of the process under test, named ``name`` in the figures
    (``daemon_cpu_us_per_request``, ...). Also used by ``bench/compare_litellm.py``."""

    def __init__(
        self,
        client: ClientProcess,
        paths: Sequence[str],
        cpu: Callable[[], float],
        name: str,
        *,
        rounds: int,
        throughput_rounds: int,
        throughput_s: float,
        concurrency: Sequence[int],
        warm_up: int = 20,
    ) -> None:
        self.client = client
        self.paths = tuple(paths)
        self.cpu = cpu
        self.name = name
        self.rounds = rounds
        self.throughput_rounds = throughput_rounds
        self.throughput_s = throughput_s
        self.concurrency = tuple(concurrency)
        self.warm_up = warm_up
        self.sent: Counter[str] = Counter()  # requests the client sent (or tried), per path

    @property
    def through(self) -> tuple[str, ...]:
        return self.paths[1:]

    async def call_sequential(
        self,
        path: str,
        n: int,
        stream: bool,
        events: int,
        gap_ms: float = 0,
        pause_ms: float = 0,
    ) -> dict[str, Any]:
        """The client's ``sequential`` command, counted in ``sent``."""
        answer = await self.client.call(
            op="sequential",
            target=path,
            n=n,
            stream=stream,
            events=events,
            gap_ms=gap_ms,
            pause_ms=pause_ms,
        )
        self.sent[path] += len(answer["latency_ns"]) + sum(answer["failures"].values())
        return answer

    async def sequential(
        self, stream: bool, n: int, events: int, gap_ms: float = 0, pause_ms: float = 0
    ) -> dict[str, Any]:
        """Scenarios 1 and 2: one request at a time (``pause_ms`` apart); latency, or time
        to first event."""
        paths = self.paths
        samples: dict[str, list[int]] = {p: [] for p in paths}
        firsts: dict[str, list[int]] = {p: [] for p in paths}
        seen: dict[str, list[int]] = {p: [] for p in paths}
        cpu: dict[str, float] = dict.fromkeys(paths, 0.0)
        failures: dict[str, Counter[str]] = {p: Counter() for p in paths}
        for path in paths:  # warm-up: connections, caches, the pool
            await self.call_sequential(path, self.warm_up, stream, events, gap_ms)
        for round_ in range(self.rounds):
            for path in rotated(paths, round_):
                before = self.cpu()
                answer = await self.call_sequential(path, n, stream, events, gap_ms, pause_ms)
                cpu[path] += self.cpu() - before
                samples[path] += answer["latency_ns"][1:]  # the first opens the connection
                firsts[path] += answer["first_event_ns"][1:]
                seen[path] += answer["events"]
                failures[path].update(answer["failures"])
        measure = firsts if stream else samples
        out: dict[str, Any] = {}
        for path in paths:
            values = measure[path]
            out[path] = {
                "requests": len(samples[path]),
                "failures": sum(failures[path].values()),
                "failure_reasons": dict(failures[path].most_common(10)),
                "p50_us": us(quantile(values, 0.5)),
                "p99_us": us(quantile(values, 0.99)),
            }
            if path in self.through:
                out[path][f"{self.name}_cpu_us_per_request"] = round(
                    cpu[path] * 1e6 / max(1, len(samples[path])), 1
                )
                out[path]["added_p50_us"] = round(out[path]["p50_us"] - out[paths[0]]["p50_us"], 1)
                out[path]["added_p99_us"] = round(out[path]["p99_us"] - out[paths[0]]["p99_us"], 1)
            if stream:
                out[path]["events_per_response"] = (
                    statistics.median(seen[path]) if seen[path] else None
                )
        return out

    async def throughput(self) -> dict[str, Any]:
        """Scenario 4: closed-loop load at each concurrency; requests/s, and the CPU of the
        process under test (100 = one core)."""
        paths = self.paths
        out: dict[str, Any] = {}
        for clients in self.concurrency:
            rates: dict[str, list[float]] = {p: [] for p in paths}
            p50: dict[str, list[float]] = {p: [] for p in paths}
            p99: dict[str, list[float]] = {p: [] for p in paths}
            cpu_share: dict[str, list[float]] = {p: [] for p in paths}
            failures: dict[str, Counter[str]] = {p: Counter() for p in paths}
            for round_ in range(self.throughput_rounds):
                for path in rotated(paths, round_):
                    before = self.cpu()
                    answer = await self.client.call(
                        op="load", clients={path: clients}, duration_s=self.throughput_s
                    )
                    used = self.cpu() - before
                    tally = answer["targets"][path]
                    self.sent[path] += tally["requests"] + tally["failures"]
                    rates[path].append(tally["requests"] / answer["seconds"])
                    p50[path].append(tally["p50_ns"])
                    p99[path].append(tally["p99_ns"])
                    cpu_share[path].append(used / answer["seconds"])
                    failures[path].update(tally["failure_reasons"])
            row: dict[str, Any] = {}
            for path in paths:
                row[path] = {
                    "requests_per_s": round(statistics.median(rates[path])),
                    "p50_us": us(statistics.median(p50[path])),
                    "p99_us": us(statistics.median(p99[path])),
                    "failures": sum(failures[path].values()),
                    "failure_reasons": dict(failures[path].most_common(10)),
                }
                if path in self.through:
                    row[path][f"{self.name}_cpu_percent"] = round(
                        100 * statistics.median(cpu_share[path])
                    )
                    row[path]["ratio"] = round(
                        row[path]["requests_per_s"] / max(1, row[paths[0]]["requests_per_s"]), 3
                    )
            out[str(clients)] = row
        return out


class Bench(AB):
    """Every scenario but 6, against the main daemon."""

    def __init__(self, plan: Plan, setup: Setup, client: ClientProcess, main: Daemon) -> None:
        super().__init__(
            client,
            PATHS,
            main.cpu,
            "daemon",
            rounds=plan.rounds,
            throughput_rounds=plan.throughput_rounds,
            throughput_s=plan.throughput_s,
            concurrency=plan.concurrency,
        )
        self.plan = plan
        self.setup = setup
        self.daemon = main

    async def relay(self) -> dict[str, Any]:
        """Scenario 3: one stream of many small events; events/s end to end."""
        events = self.plan.relay_events
        rates: dict[str, list[float]] = {p: [] for p in PATHS}
        cpu: dict[str, float] = dict.fromkeys(PATHS, 0.0)
        failures: dict[str, int] = dict.fromkeys(PATHS, 0)
        for round_ in range(self.plan.rounds):
            for path in rotated(PATHS, round_):
                before = self.daemon.cpu()
                answer = await self.client.call(
                    op="sequential", target=path, n=2, stream=True, events=events
                )
                cpu[path] += self.daemon.cpu() - before
                failures[path] += sum(answer["failures"].values())
                for seen, latency in zip(answer["events"], answer["latency_ns"], strict=True):
                    if seen < events:
                        raise BenchError(f"{path}: {seen} events of {events}")
                    rates[path].append(seen / (latency / 1e9))
        out: dict[str, Any] = {}
        for path in PATHS:
            out[path] = {
                "streams": len(rates[path]),
                "failures": failures[path],
                "events_per_s": round(statistics.median(rates[path])) if rates[path] else None,
            }
            if path != "direct":
                out[path]["daemon_cpu_us_per_event"] = round(
                    cpu[path] * 1e6 / max(1, len(rates[path]) * events), 2
                )
        for path in ("ws", "http"):
            out[path]["ratio"] = round(out[path]["events_per_s"] / out["direct"]["events_per_s"], 3)
        return out

    async def memory(self, idle_rss: int) -> dict[str, Any]:
        """Scenario 5: the daemon's RSS idle, and with idle app connections open."""
        await trio.sleep(1.0)
        out: dict[str, Any] = {
            "idle_rss_mb_at_ready": round(idle_rss / 2**20, 1),
            "idle_rss_mb_after_load": round(self.daemon.rss() / 2**20, 1),
        }
        base = self.daemon.rss()
        opened = 0
        steps = []
        async with control_client(self.setup) as control:
            for total in self.plan.idle:
                answer = await self.client.call(op="idle", target="ws", n=total - opened)
                if answer["failures"] or answer["open"] != total:
                    raise BenchError(f"idle connections: {answer}")
                opened = total
                await trio.sleep(1.0)  # let the daemon's side settle
                status = (await control.get("/v1/status")).json()
                clients = status["connections"]["clients"]
                if clients < total:
                    raise BenchError(f"the daemon counts {clients} clients, {total} are open")
                rss = self.daemon.rss()
                steps.append(
                    {
                        "connections": total,
                        "rss_mb": round(rss / 2**20, 1),
                        "kb_per_connection": round((rss - base) / total / 1024, 1),
                        "opened_in_s": round(answer["seconds"], 2),
                    }
                )
            await self.client.call(op="release")
            # The next scenario starts once the daemon has closed them all (10k closes
            # take it a while), not during.
            await wait_no_clients(control)
            await trio.sleep(1.0)
        out["idle_connections"] = steps
        return out

    async def rotation(self, vault: Vault, first_key: str) -> dict[str, Any]:
        """Scenario 7: load on both app paths while the key is rotated in Vault, the old
        one revoked at the upstream as soon as Vault holds the new one."""
        plan = self.plan
        half = plan.rotation_clients // 2
        rotations: list[dict[str, Any]] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                rotate_keys,
                self.setup,
                vault,
                first_key,
                plan.rotate_every_s,
                plan.rotation_s - plan.rotate_every_s / 2,
                rotations,
            )
            answer = await self.client.call(
                op="load", clients={"ws": half, "http": half}, duration_s=plan.rotation_s
            )
            nursery.cancel_scope.cancel()
        stats = await upstream_stats(self.setup.upstream_url)
        delays = []
        for rotation in rotations:
            seen = stats["first_seen"].get(fingerprint(rotation["key"]))
            delays.append(None if seen is None else round((seen - rotation["written_at"]) * 1e3, 1))
        async with control_client(self.setup) as control:
            metrics = (await control.get("/metrics")).text
        triggers = {
            line.split('trigger="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("openclawd_key_rotations_total{")
        }
        return {
            "seconds": round(answer["seconds"], 1),
            "rotations": len(rotations),
            "ws": answer["targets"]["ws"],
            "http": answer["targets"]["http"],
            "failures": answer["targets"]["ws"]["failures"] + answer["targets"]["http"]["failures"],
            "new_key_first_used_after_ms": delays,
            "upstream_401s": stats["refused"],
            "daemon_key_rotations": triggers,
        }


def shares(n: int, parts: int) -> list[int]:
    """``n`` split into ``parts`` shares as even as can be, the larger ones first."""
    base, extra = divmod(n, parts)
    return [base + (index < extra) for index in range(parts)]


@dataclass
class StreamsTally:
    """What one path saw at one number of streams, over its rounds (scenario 8)."""

    delays_ns: list[int] = field(default_factory=list)
    upstream_late_ns: list[int] = field(default_factory=list)
    streams: int = 0  # complete
    failures: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0  # from the first event due to the last stream's end, all rounds
    daemon_cpu_s: float = 0.0
    upstream_cpu_percent: float = 0.0  # the highest of any round
    client_cpu_percent: float = 0.0  # the busiest client process in any round
    clients_cpu_percent: float = 0.0  # every client process together, the worst round
    others_cpu_percent: float = 0.0  # every other process on the machine, the worst round

    def note(
        self,
        answers: Sequence[dict[str, Any]],
        seconds: float,
        daemon_cpu_s: float,
        upstream_cpu_s: float,
        client_cpu_s: Sequence[float],
        machine_busy_s: float = 0.0,
        window_s: float = 0.0,
    ) -> None:
        """One round: the client processes' ``streams_go`` answers, how long the streams
        ran (from the first event due to the last stream's end), and the CPU seconds each
        process used from the go to that end (the requests sent before the first event
        included: a share of the cost per event, as the CPU per 1,000 events counts it),
        and ``machine_busy_s``, what every process used over the same ``window_s`` (from
        the go to the end): the rest is the other processes' (this runner's and bao's few
        included), the machine's other load, a share of that whole window."""
        for answer in answers:
            self.delays_ns += answer["delays_ns"]
            self.upstream_late_ns += answer["upstream_late_ns"]
            self.streams += answer["streams"]
            self.failures.update(answer["failures"])
        self.seconds += seconds
        self.daemon_cpu_s += daemon_cpu_s
        self.upstream_cpu_percent = max(self.upstream_cpu_percent, 100 * upstream_cpu_s / seconds)
        busiest = max(client_cpu_s, default=0.0)
        self.client_cpu_percent = max(self.client_cpu_percent, 100 * busiest / seconds)
        together = 100 * sum(client_cpu_s) / seconds
        self.clients_cpu_percent = max(self.clients_cpu_percent, together)
        if machine_busy_s:
            others = machine_busy_s - daemon_cpu_s - upstream_cpu_s - sum(client_cpu_s)
            self.others_cpu_percent = max(self.others_cpu_percent, 100 * others / window_s)


def streams_row(tallies: dict[str, StreamsTally], client_processes: int) -> dict[str, Any]:
    """Scenario 8's figures at one number of streams: per path, the events' delay (p50,
    p99, max), the upstream's lateness, the load generators' CPU; on a path through
    openclawd, what it adds to direct's delay and the daemon's CPU per 1,000 events.
    ``tallies``: the direct path first."""
    paths = list(tallies)
    row: dict[str, Any] = {}
    for path, tally in tallies.items():
        figures: dict[str, Any] = {
            "streams": tally.streams,
            "failures": sum(tally.failures.values()),
            "failure_reasons": dict(tally.failures.most_common(10)),
            "events": len(tally.delays_ns),
            "p50_us": us(quantile(tally.delays_ns, 0.5)),
            "p99_us": us(quantile(tally.delays_ns, 0.99)),
            "max_us": us(max(tally.delays_ns, default=math.nan)),
            "upstream_late_p99_us": us(quantile(tally.upstream_late_ns, 0.99)),
            "upstream_cpu_percent": round(tally.upstream_cpu_percent),
            "client_processes": client_processes,
            "client_cpu_percent_busiest": round(tally.client_cpu_percent),
            "client_cpu_percent_total": round(tally.clients_cpu_percent),
            "others_cpu_percent": round(tally.others_cpu_percent),
        }
        if path != paths[0]:
            direct = row[paths[0]]
            figures["added_p50_us"] = round(figures["p50_us"] - direct["p50_us"], 1)
            figures["added_p99_us"] = round(figures["p99_us"] - direct["p99_us"], 1)
            figures["daemon_cpu_s_per_1k_events"] = round(
                tally.daemon_cpu_s * 1000 / max(1, len(tally.delays_ns)), 3
            )
            figures["daemon_cpu_percent"] = round(100 * tally.daemon_cpu_s / tally.seconds)
        row[path] = figures
    return row


async def call_all(calls: Sequence[tuple[ClientProcess, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each client process's command, all at once; their answers, in order."""
    answers: list[dict[str, Any]] = [{} for _ in calls]

    async def one(index: int, client: ClientProcess, command: dict[str, Any]) -> None:
        answers[index] = await client.call(**command)

    async with trio.open_nursery() as nursery:
        for index, (client, command) in enumerate(calls):
            nursery.start_soon(one, index, client, command)
    return answers


async def concurrent_streams(
    plan: Plan, setup: Setup, key: str, main: Daemon, upstream: trio.Process
) -> dict[str, Any]:
    """Scenario 8: N concurrent timed streams on each path, for each N of the plan (see the
    module's docstring). Per N, the paths' figures (``streams_row``) and the machine's
    load average as that N began."""
    most = math.ceil(max(plan.streams) / STREAMS_PER_CLIENT)
    out: dict[str, Any] = {}
    async with contextlib.AsyncExitStack() as stack, control_client(setup) as control:
        clients = [await stack.enter_async_context(load_client(setup, key)) for _ in range(most)]
        for n in plan.streams:
            used = clients[: math.ceil(n / STREAMS_PER_CLIENT)]
            counts = shares(n, len(used))
            firsts = [sum(counts[:index]) for index in range(len(counts))]
            tallies = {path: StreamsTally() for path in PATHS}
            load = load_average()
            for round_ in range(plan.streams_rounds):
                for path in rotated(PATHS, round_):
                    opened = await call_all(
                        [
                            (client, {"op": "streams_open", "target": path, "n": count})
                            for client, count in zip(used, counts, strict=True)
                        ]
                    )
                    say(f"  {n} streams, {path}: {sum(a['open'] for a in opened)} open")
                    cpu_before = [cpu_seconds(c.process.pid) for c in used]
                    daemon_before, upstream_before = main.cpu(), cpu_seconds(upstream.pid)
                    machine_before = machine_busy_seconds()
                    begun = time.monotonic()
                    lead_s = STREAMS_LEAD_S + n * STREAMS_LEAD_PER_STREAM_S
                    start_ns = time.monotonic_ns() + round(lead_s * 1e9)
                    answers = await call_all(
                        [
                            (
                                client,
                                {
                                    "op": "streams_go",
                                    "events": plan.streams_events,
                                    "interval_ms": STREAM_INTERVAL_MS,
                                    "first": first,
                                    "total": n,
                                    "start_ns": start_ns,
                                },
                            )
                            for client, first in zip(used, firsts, strict=True)
                        ]
                    )
                    window_s = time.monotonic() - begun
                    seconds = max(1e-3, window_s - lead_s)
                    tallies[path].note(
                        answers,
                        seconds,
                        main.cpu() - daemon_before,
                        cpu_seconds(upstream.pid) - upstream_before,
                        [
                            cpu_seconds(c.process.pid) - before
                            for c, before in zip(used, cpu_before, strict=True)
                        ],
                        machine_busy_seconds() - machine_before,
                        window_s,
                    )
                    await wait_no_clients(control)
            out[str(n)] = streams_row(tallies, len(used)) | {"load_average": load}
    return out


async def wait_no_clients(control: httpx.AsyncClient, timeout_s: float = 120.0) -> None:
    """Until the daemon counts no app connection (``/v1/status``): the next measurement
    starts once it has closed the last one's, not during."""
    with trio.fail_after(timeout_s):
        while True:  # polled: another process's state, no event to wait on
            status = (await control.get("/v1/status")).json()
            if not status["connections"]["clients"]:
                return
            await trio.sleep(0.1)


async def rotate_keys(
    setup: Setup,
    vault: Vault,
    first_key: str,
    every_s: float,
    for_s: float,
    rotations: list[dict[str, Any]],
) -> None:
    """Every ``every_s`` for ``for_s``: write a new key to Vault, the upstream taking both
    keys during the write and only the new one as soon as it returns (the old one revoked
    at once, as an operator answering a leak would). Each rotation is appended to
    ``rotations``: its KV version, the key, and when the write began (``time.monotonic``)."""
    current = first_key
    deadline = trio.current_time() + for_s
    while True:
        await trio.sleep(every_s)
        if trio.current_time() > deadline:
            return
        key = new_key()
        await upstream_accepts(setup.upstream_url, [current, key])
        written_at = time.monotonic()
        version = await vault.write_secret(VAULT_PATH, {"api_key": key})
        await upstream_accepts(setup.upstream_url, [key])
        rotations.append({"version": version, "key": key, "written_at": written_at})
        current = key


async def upstream_accepts(url: str, keys: list[str]) -> None:
    """Tell the fake upstream which keys it accepts from now on."""
    async with httpx.AsyncClient(base_url=url, trust_env=False) as http:
        response = await http.post("/_bench/keys", json={"accept": keys})
        response.raise_for_status()


async def upstream_stats(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, trust_env=False) as http:
        response = await http.get("/_bench/stats")
        response.raise_for_status()
        stats: dict[str, Any] = response.json()
        return stats


async def startup(setup: Setup, starts: int) -> dict[str, Any]:
    """Scenario 6: from spawning ``openclawd run`` to READY=1, keys read from Vault; and,
    for scale, how long the interpreter takes to import the daemon and to do nothing."""
    times = []
    for _ in range(starts):
        async with daemon(setup, log_name="startup.log") as started:
            times.append(started.started_in_s)
    imports: list[float] = []
    bare: list[float] = []
    for _ in range(starts):
        for argv, into in (
            ([sys.executable, "-c", "import openclawd.daemon"], imports),
            ([sys.executable, "-c", "pass"], bare),
        ):
            begun = time.monotonic()
            await trio.run_process(argv, env=child_environ(setup.daemon_source), cwd=setup.root)
            into.append(time.monotonic() - begun)
    return {
        "starts": starts,
        "ready_ms_p50": round(statistics.median(times) * 1e3),
        "ready_ms_max": round(max(times) * 1e3),
        "python_import_daemon_ms_p50": round(statistics.median(imports) * 1e3),
        "python_bare_ms_p50": round(statistics.median(bare) * 1e3),
    }


# --- the run --------------------------------------------------------------------------


def load_average() -> list[float]:
    """The machine's load average over 1, 5 and 15 minutes (``os.getloadavg``)."""
    return [round(value, 2) for value in os.getloadavg()]


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gb": round(memory / 2**30, 1),
        "python": platform.python_version(),
    }


def versions(bao: str, daemon_source: Path = REPO) -> dict[str, str]:
    found = {}
    for name in (
        "openclawd",
        "trio",
        "trio-websocket",
        "wsproto",
        "h11",
        "httpx",
        "httpcore",
        "hypercorn",
        "quart-trio",
        "hvac",
        "prometheus-client",
    ):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        found["bao"] = subprocess.run(
            [bao, "version"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    for name, checkout in (("commit", REPO), ("daemon_commit", daemon_source)):
        commit = git_commit(checkout)
        if commit is not None:
            found[name] = commit
    return found


def git_commit(checkout: Path) -> str | None:
    """``git describe --always --dirty`` in ``checkout``; None if git cannot tell."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(
            ["git", "-C", str(checkout), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    return None


async def run(
    mode: str, only: frozenset[str], profile: Profile | None, daemon_source: Path = REPO
) -> dict[str, Any]:
    plan = PLANS[mode]
    bao = find_bao()
    results: dict[str, Any] = {
        "mode": mode,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "versions": versions(bao, daemon_source),
        "plan": asdict(plan),
        "scenarios_run": sorted(only),
        "daemon_from": str(daemon_source),
    }
    started = time.monotonic()
    results["load_average_at_start"] = load_average()
    upstream_connections = max(100, *plan.streams)
    async with environment(bao, daemon_source, max(plan.idle) + 1000, upstream_connections) as (
        setup,
        vault,
        key,
        up,
    ):
        results["scenarios"] = await _scenarios(plan, setup, vault, key, up, only, profile)
    results["load_average_at_end"] = load_average()
    results["seconds"] = round(time.monotonic() - started, 1)
    return results


@contextlib.asynccontextmanager
async def environment(
    bao: str, daemon_source: Path, max_connections: int, upstream_connections: int = 100
) -> AsyncIterator[tuple[Setup, Vault, str, trio.Process]]:
    """What every run starts from, in a temporary directory removed afterwards: ``bao``
    holding a first key, the fake upstream accepting it, and the daemon's config written.
    Yields the setup, a Vault client with the root token, the key, the upstream process."""
    with tempfile.TemporaryDirectory(prefix="ocbench-") as tmp:
        root = Path(tmp)
        (root / "bao-home").mkdir()
        token = secrets.token_urlsafe(24)
        say("starting Vault (bao dev server) and the fake upstream")
        vault_process, vault_addr = await start_vault(bao, Layout(root), token)
        try:
            vault = Vault(
                VaultConfig(addr=vault_addr, auth="token", mount="secret", request_timeout_s=5.0)
            )
            await vault.use_token(token)
            key = new_key()
            await vault.write_secret(VAULT_PATH, {"api_key": key})
            async with fake_upstream() as (upstream, port):
                setup = Setup(root, vault_addr, token, port, daemon_source)
                write_config(setup, max_connections, upstream_connections)
                await upstream_accepts(setup.upstream_url, [key])
                yield setup, vault, key, upstream
        finally:
            await stop_process(vault_process, STOP_TIMEOUT_S)


@contextlib.asynccontextmanager
async def fake_upstream() -> AsyncIterator[tuple[trio.Process, int]]:
    """``bench/upstream.py`` running, and the loopback port it listens on."""
    async with running(
        [sys.executable, "-m", "bench.upstream"],
        "the fake upstream",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        env=child_environ(),
        cwd=REPO,
    ) as upstream:
        assert upstream.stdout is not None
        port = 0
        with trio.move_on_after(READY_TIMEOUT_S):
            port = int((await Lines(upstream.stdout).next())["port"])
        if not port:
            raise BenchError(f"the fake upstream did not say its port in {READY_TIMEOUT_S:g} s")
        yield upstream, port


@contextlib.asynccontextmanager
async def load_client(setup: Setup, key: str) -> AsyncIterator[ClientProcess]:
    """The load client, its targets set: ``direct`` (the upstream, with ``key``), ``http``
    and ``ws`` (through the daemon)."""
    async with running(
        [sys.executable, "-m", "bench.client"],
        "the load client",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=child_environ(),
        cwd=REPO,
    ) as process:
        client = ClientProcess(process)
        await client.call(
            op="targets",
            targets={
                "direct": {"kind": "http", "tcp": ["127.0.0.1", setup.upstream_port], "key": key},
                "http": {
                    "kind": "http",
                    "unix": str(setup.data_socket),
                    "path": f"/v1/http/{PROVIDER}/v1/chat/completions",
                },
                "ws": {"kind": "ws", "unix": str(setup.data_socket), "provider": PROVIDER},
            },
        )
        yield client


SCENARIOS = (
    "latency",
    "first_event",
    "relay",
    "throughput",
    "memory",
    "startup",
    "rotation",
    "streams",
)


async def _scenarios(
    plan: Plan,
    setup: Setup,
    vault: Vault,
    key: str,
    upstream: trio.Process,
    only: frozenset[str],
    profile: Profile | None,
) -> dict[str, Any]:
    scenarios: dict[str, Any] = {}
    if "startup" in only:
        say("6/8 start to READY=1")
        scenarios["startup"] = await startup(setup, plan.starts)
    if not only - {"startup"}:
        return scenarios
    async with daemon(setup, profile=profile) as main:
        idle_rss = main.rss()  # before the load client's first connection
        async with load_client(setup, key) as client:
            scenarios.update(
                await _measured(plan, setup, vault, key, only, main, client, idle_rss, upstream)
            )
            scenarios["cpu_s_total"] = {
                "daemon": round(main.cpu(), 1),
                "upstream": round(cpu_seconds(upstream.pid), 1),
                "client": round(cpu_seconds(client.process.pid), 1),
            }
    return scenarios


async def _measured(
    plan: Plan,
    setup: Setup,
    vault: Vault,
    key: str,
    only: frozenset[str],
    main: Daemon,
    client: ClientProcess,
    idle_rss: int,
    upstream: trio.Process,
) -> dict[str, Any]:
    """Scenarios 1-5, 8 and 7 (last: it replaces ``key``), against the one daemon
    ``main``."""
    scenarios: dict[str, Any] = {}
    bench = Bench(plan, setup, client, main)
    if "latency" in only:
        say("1/8 added latency, non-streaming")
        scenarios["latency"] = await bench.sequential(False, plan.sequential, 0)
        # The same after as much quiet as scenario 2's gap: a CPU that waited is slower
        # (caches, clock), and scenario 2's first events all come after such a wait.
        scenarios["latency_after_idle"] = await bench.sequential(
            False, plan.first_event, 0, pause_ms=FIRST_EVENT_GAP_MS
        )
    if "first_event" in only:
        say("2/8 time to first event, streaming")
        scenarios["first_event"] = await bench.sequential(
            True, plan.first_event, plan.stream_events, FIRST_EVENT_GAP_MS
        )
    if "relay" in only:
        say(f"3/8 SSE relay, {plan.relay_events} events")
        scenarios["relay"] = await bench.relay()
    if "throughput" in only:
        say("4/8 throughput")
        scenarios["throughput"] = await bench.throughput()
    if "memory" in only:
        say("5/8 memory, idle connections")
        scenarios["memory"] = await bench.memory(idle_rss)
    if "streams" in only:
        say(f"8/8 concurrent streams: {', '.join(map(str, plan.streams))}")
        scenarios["streams"] = await concurrent_streams(plan, setup, key, main, upstream)
    if "rotation" in only:
        say("7/8 rotation under load")
        scenarios["rotation"] = await bench.rotation(vault, key)
    return scenarios


# --- the summary ----------------------------------------------------------------------


def summary(results: dict[str, Any]) -> str:
    """The figures as two Markdown tables: the A/B scenarios, then the daemon's own."""
    s = results["scenarios"]
    m = results["machine"]
    v = results["versions"]
    lines = [
        f"openclawd {v.get('openclawd', '?')} (daemon {v.get('daemon_commit', '?')}, bench "
        f"{v.get('commit', '?')}), {results['mode']} run, "
        f"{results['date']}: {m['cpu']}, {m['cpus']} CPUs, Python {m['python']}; "
        f"load average {results['load_average_at_start'][0]:g} at the start, "
        f"{results['load_average_at_end'][0]:g} at the end",
        "",
        "| scenario | direct | via /v1/ws | via /v1/http |",
        "|---|---|---|---|",
        *_latency_rows(s),
        *_load_rows(s, results),
    ]
    own = _own_rows(s)
    if own:
        lines += ["", "| scenario | figure |", "|---|---|", *own]
    return "\n".join(lines)


def _row(name: str, direct: str, ws: str, http: str) -> str:
    return f"| {name} | {direct} | {ws} | {http} |"


def _p50_p99(figures: dict[str, Any]) -> str:
    return f"{figures['p50_us']:g} / {figures['p99_us']:g}"


def _added(figures: dict[str, Any]) -> str:
    return f"+{figures['added_p50_us']:g} / +{figures['added_p99_us']:g}"


def _ms(us_: float) -> str:
    return f"{us_ / 1000:,.2f}"


def _latency_rows(s: dict[str, Any]) -> list[str]:
    """Scenarios 1 and 2: one request's latency, after idle too, and the first event's."""
    rows = []
    if "latency" in s:
        lat = s["latency"]
        rows.append(_row("1 latency p50 / p99 (µs)", *(_p50_p99(lat[p]) for p in PATHS)))
        rows.append(_row("1 added p50 / p99 (µs)", "", _added(lat["ws"]), _added(lat["http"])))
        rows.append(
            _row(
                "1 daemon CPU per request (µs)",
                "",
                f"{lat['ws']['daemon_cpu_us_per_request']:g}",
                f"{lat['http']['daemon_cpu_us_per_request']:g}",
            )
        )
    if "latency_after_idle" in s:
        idle = s["latency_after_idle"]
        rows.append(
            _row(
                f"1 after {FIRST_EVENT_GAP_MS} ms idle: latency p50 / p99 (µs)",
                *(_p50_p99(idle[p]) for p in PATHS),
            )
        )
        rows.append(
            _row(
                f"1 after {FIRST_EVENT_GAP_MS} ms idle: added (µs)",
                "",
                _added(idle["ws"]),
                _added(idle["http"]),
            )
        )
    if "first_event" in s:
        fe = s["first_event"]
        rows.append(_row("2 first event p50 / p99 (µs)", *(_p50_p99(fe[p]) for p in PATHS)))
        rows.append(_row("2 added p50 / p99 (µs)", "", _added(fe["ws"]), _added(fe["http"])))
    return rows


def _load_rows(s: dict[str, Any], results: dict[str, Any]) -> list[str]:
    """Scenarios 3, 4 and 8: the SSE relay, requests/s, and concurrent streams."""
    rows = []
    if "relay" in s:
        relay = s["relay"]
        rows.append(
            _row(
                f"3 relay, events/s ({results['plan']['relay_events']:,} events)",
                f"{relay['direct']['events_per_s']:,}",
                f"{relay['ws']['events_per_s']:,} (×{relay['ws']['ratio']:g})",
                f"{relay['http']['events_per_s']:,} (×{relay['http']['ratio']:g})",
            )
        )
    for clients, tp in s.get("throughput", {}).items():
        rows.append(
            _row(
                f"4 requests/s, {clients} clients (daemon CPU)",
                f"{tp['direct']['requests_per_s']:,}",
                f"{tp['ws']['requests_per_s']:,} (×{tp['ws']['ratio']:g}, "
                f"{tp['ws']['daemon_cpu_percent']}%)",
                f"{tp['http']['requests_per_s']:,} (×{tp['http']['ratio']:g}, "
                f"{tp['http']['daemon_cpu_percent']}%)",
            )
        )
    for n, streams in s.get("streams", {}).items():
        rows += _streams_rows(int(n), streams)
    return rows


def _streams_rows(n: int, streams: dict[str, Any]) -> list[str]:
    """Scenario 8 at ``n`` streams: each event's delay, and what the daemon adds to it."""
    direct, ws, http = (streams[p] for p in PATHS)

    def via(figures: dict[str, Any]) -> str:
        return (
            f"+{_ms(figures['added_p50_us'])} / +{_ms(figures['added_p99_us'])} "
            f"({figures['daemon_cpu_s_per_1k_events']:g} s, "
            f"{figures['failures']} failed)"
        )

    return [
        _row(
            f"8 {n:,} streams: event delay p50 / p99 (ms)",
            *(f"{_ms(streams[p]['p50_us'])} / {_ms(streams[p]['p99_us'])}" for p in PATHS),
        ),
        _row(
            f"8 {n:,} streams: added p50 / p99 (ms) (daemon CPU per 1k events)",
            f"{direct['failures']} failed; clients {direct['client_cpu_percent_total']}% "
            f"(busiest {direct['client_cpu_percent_busiest']}%), upstream "
            f"{direct['upstream_cpu_percent']}% (p99 late "
            f"{_ms(direct['upstream_late_p99_us'])} ms), others "
            f"{max(streams[p]['others_cpu_percent'] for p in PATHS)}%",
            via(ws),
            via(http),
        ),
    ]


def _own_rows(s: dict[str, Any]) -> list[str]:
    """Scenarios 5, 6 and 7, which have no direct path to compare with."""
    rows = []
    if "memory" in s:
        mem = s["memory"]
        rows.append(
            f"| 5 idle RSS at READY / after the load | {mem['idle_rss_mb_at_ready']:g} MB / "
            f"{mem['idle_rss_mb_after_load']:g} MB |"
        )
        for step in mem["idle_connections"]:
            rows.append(
                f"| 5 RSS with {step['connections']:,} idle /v1/ws connections | "
                f"{step['rss_mb']:g} MB ({step['kb_per_connection']:g} KB each) |"
            )
    if "startup" in s:
        st = s["startup"]
        rows.append(
            f"| 6 start to READY=1, keys from bao (median of {st['starts']}) | "
            f"{st['ready_ms_p50']} ms (max {st['ready_ms_max']} ms; importing the daemon: "
            f"{st['python_import_daemon_ms_p50']} ms, bare interpreter "
            f"{st['python_bare_ms_p50']} ms) |"
        )
    if "rotation" in s:
        rot = s["rotation"]
        delays = [d for d in rot["new_key_first_used_after_ms"] if d is not None]
        rows.append(
            f"| 7 rotation under load: {rot['rotations']} rotations in {rot['seconds']:g} s, "
            f"{rot['ws']['requests'] + rot['http']['requests']:,} requests | "
            f"{rot['failures']} failed; new key first used at most {max(delays, default=0):g} ms "
            f"after the Vault write; upstream 401s: {rot['upstream_401s']} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_const", const="quick", dest="mode")
    group.add_argument("--smoke", action="store_const", const="smoke", dest="mode")
    parser.add_argument("--output", type=Path, help="where the JSON goes")
    parser.add_argument(
        "--profile", type=Path, help="sample the daemon with py-spy (collapsed stacks) into this"
    )
    parser.add_argument(
        "--cprofile", type=Path, help="run the daemon under cProfile (a pstats file) into this"
    )
    parser.add_argument(
        "--daemon-from",
        type=Path,
        metavar="CHECKOUT",
        help="run the daemon from another checkout (a git worktree of an older commit): "
        "the same benchmark, before and after a change",
    )
    parser.add_argument(
        "--tracing",
        action="store_true",
        help="the daemon exports a span per request (sample_ratio 1.0) to a local OTLP sink",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"a comma-separated subset of: {', '.join(SCENARIOS)} (default: all)",
    )
    args = parser.parse_args(argv)
    mode = args.mode or "full"
    only = frozenset(name.strip() for name in args.scenarios.split(",") if name.strip())
    if not only or only - set(SCENARIOS):
        parser.error(f"--scenarios: choose from {', '.join(SCENARIOS)}")
    daemon_source = (args.daemon_from or REPO).resolve()
    if not (daemon_source / "openclawd" / "__init__.py").is_file():
        parser.error(f"--daemon-from: no openclawd package in {daemon_source}")
    if args.profile and args.cprofile:
        parser.error("--profile and --cprofile: one at a time")
    profile = None
    if args.profile or args.cprofile:
        profile = (
            Profile("py-spy", args.profile) if args.profile else Profile("cprofile", args.cprofile)
        )
    output = args.output or REPO / "bench" / "results" / f"{mode}-latest.json"
    global TRACING_ENDPOINT
    try:
        with otlp_sink() as (url, sink):
            TRACING_ENDPOINT = url if args.tracing else None
            results = trio.run(run, mode, only, profile, daemon_source)
            results["tracing"] = (
                {"sample_ratio": 1.0, "exports": sink.requests, "export_bytes": sink.bytes}
                if args.tracing
                else None
            )
    except (BenchError, DemoError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(summary(results))
    print(f"\n{results['seconds']:g} s; every figure: {output}")
    failed = results["scenarios"].get("rotation", {}).get("failures", 0)
    return 0 if not failed else 3


if __name__ == "__main__":
    sys.exit(main())
