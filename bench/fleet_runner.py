"""The fleet benchmark (issue 19, CONTRACT.md 5.6): N daemons sharing limits through one
Valkey, under twice the offered load, measured at the upstream.

What runs, each in its own process, on loopback and unix sockets only:

* one ``valkey-server`` (``bench/valkey.py``), its password in a file; or, with
  ``--cluster``, a cluster of three masters with one replica each (``[shared] cluster =
  true``, the first node the seed);
* a real Vault-compatible server (``bao server -dev``) holding three keys, one per
  provider, so that the upstream can tell the providers' requests apart by key;
* the fast fake upstream (``bench/upstream.py``), noting the arrival time
  (CLOCK_MONOTONIC) of every request it accepts, per key (``/_bench/arrivals``);
* N fleet daemons (``openclawd run``, each its own runtime directory, sockets and config,
  started under a ``NOTIFY_SOCKET``), all with the same ``[shared]`` url and namespace and
  three providers pointing at the upstream:
  ``rpm`` (``requests_per_minute = L``, and ``tokens_per_minute`` 100 times what L requests
  use: set, never the binding one), ``tpm`` (``tokens_per_minute = T = 17 L``: the fake
  reports 17 tokens per completion, so T is also L requests a minute) and ``roomy``
  (``requests_per_minute`` = 10,000,000: a shared limit that always has room);
* one more daemon with no ``[shared]`` and no limits, ``roomy`` only: the reference for the
  added latency.

Phases:

1. **Load.** On each of ``rpm`` and ``tpm``, this process sends non-streamed requests
   (``/v1/http/NAME/v1/chat/completions``, keep-alive connections, as many as are in
   flight) at a fixed rate: 2 L a minute spread evenly over the N daemons' data sockets,
   for ``warmup`` + D seconds. A per-minute limit is a bucket of L refilled L/60 a second,
   full at the start: at twice the limit it is spent after about 60 s, so the first 60 s
   (the warm-up) let up to 2 L through by design, and are reported apart. The figures are
   over every 60-s window (sliding, 1-s steps) that lies inside the D seconds after it:
   requests (``rpm``) or tokens (``tpm``, 17 per request by the fake's usage) the upstream
   received, max and min, as a fraction of the limit.
2. **Latency.** One request at a time, alternately (rounds, rotated order) on fleet
   daemon 0's ``roomy`` (under a shared limit, with room) and on the unlimited daemon's
   ``roomy``: p50 of each, and the difference.
3. **Outage** (``--outage-s``, 0 = skip). Load as in 1 on ``rpm`` (each daemon at twice
   its local share, L / N a minute; ``on_failure = "local"``, ``expected_daemons = N``).
   Standalone: Valkey killed for ``outage_s`` seconds, then started again (empty).
   Cluster: the master serving the slot of ``rpm``'s ``requests_per_minute`` killed
   (SIGKILL), its replica taking over. Every daemon's ``/v1/limits`` "shared" is polled
   throughout: requests ok, refused (429, per daemon) and failed otherwise from the fault
   until every daemon counts shared again, and the time from Valkey's return (standalone)
   or from the new master serving the slot (cluster) until the last daemon is back to
   ``shared`` and reachable for good.

Usage: ``bench/fleet [--daemons 10] [--limit 600] [--minutes 2] [--warmup-s 60]
[--outage-s 20] [--cluster] [--output PATH]``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from bench.client import HttpPeer, PeerFailure, Target, request_body
from bench.runner import (
    REPO,
    BenchError,
    Daemon,
    Setup,
    control_client,
    cpu_seconds,
    daemon,
    fake_upstream,
    fingerprint,
    load_average,
    machine,
    machine_busy_seconds,
    new_key,
    say,
    upstream_accepts,
    versions,
)
from bench.valkey import Valkey, ValkeyCluster, ValkeyError
from openclawd.config import VaultConfig
from openclawd.demo.layout import DemoError, Layout, find_bao
from openclawd.demo.supervise import start_vault, stop_process
from openclawd.keys.vault import Vault

LIMITED = ("rpm", "tpm")  # the providers under load
NAMESPACE = "fleet-bench"
# The engine key of rpm's requests_per_minute (openclawd/shared/engine.py Engine.key, the
# name from openclawd/protocol/limits.py Limit.key): the slot whose master the cluster's
# outage kills.
RPM_KEY = "{" + NAMESPACE + ":provider:rpm:requests_per_minute}:minute"
SHARED = "shared"  # a daemon's /v1/limits "shared": mode shared and reachable
MODES_POLL_S = 0.1
ROOMY = "roomy"
TOKENS_PER_REQUEST = 17  # the fake's usage for a non-streamed completion
WINDOW_S = 60.0
STEP_S = 1.0
REQUEST_TIMEOUT_S = 30.0
SHARED_AGAIN_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class FleetPlan:
    daemons: int
    limit: int  # L: requests a minute (rpm); T = 17 L tokens a minute (tpm)
    seconds: float  # D: measured, after the warm-up
    warmup_s: float
    latency_rounds: int
    latency_per_round: int
    outage_s: float
    cluster: bool = False  # three masters with one replica each; the outage kills one
    daemon_commit: str = "HEAD"  # the daemons run this commit's openclawd; "": the work tree

    @property
    def local_share(self) -> int:
        """What each daemon keeps alone while the engine is unreachable (a minute)."""
        return max(1, self.limit // self.daemons)

    @property
    def tokens_limit(self) -> int:
        return TOKENS_PER_REQUEST * self.limit

    @property
    def rate_per_daemon_s(self) -> float:
        """Requests a second each daemon is sent on each loaded provider: 2 L over N."""
        return 2 * self.limit / 60.0 / self.daemons


# --- configs --------------------------------------------------------------------------


def _provider(name: str, upstream_url: str, limits: dict[str, int]) -> str:
    lines = [
        f"[providers.{name}]",
        f"base_url = {json.dumps(upstream_url)}",
        f'vault_path = "openclawd/{name}"',
        "max_retries = 0",
    ]
    if limits:
        lines.append(f"[providers.{name}.limits]")
        lines += [f"{key} = {value}" for key, value in limits.items()]
    return "\n".join(lines) + "\n"


Engine = Valkey | ValkeyCluster


def write_config(setup: Setup, plan: FleetPlan, valkey: Engine | None) -> None:
    """A fleet daemon's config (``valkey`` given), or the unlimited one's."""
    text = f"""\
# Written by bench/fleet_runner.py.
[listen]
socket = {json.dumps(str(setup.data_socket))}
mode = "0600"

[control]
socket = {json.dumps(str(setup.control_socket))}
mode = "0600"

[vault]
addr = {json.dumps(setup.vault_addr)}
auth = "token"
mount = "secret"

"""
    if valkey is None:
        setup.config.write_text(text + _provider(ROOMY, setup.upstream_url, {}))
        return
    text += f"""\
[shared]
url = {json.dumps(valkey.url)}
cluster = {"true" if isinstance(valkey, ValkeyCluster) else "false"}
password_file = {json.dumps(str(valkey.password_file))}
namespace = "{NAMESPACE}"
on_failure = "local"
expected_daemons = {plan.daemons}

"""
    tokens = plan.tokens_limit
    text += _provider(
        "rpm",
        setup.upstream_url,
        {"requests_per_minute": plan.limit, "tokens_per_minute": 100 * tokens},
    )
    text += _provider("tpm", setup.upstream_url, {"tokens_per_minute": tokens})
    text += _provider(ROOMY, setup.upstream_url, {"requests_per_minute": 10_000_000})
    setup.config.write_text(text)


# --- the load -------------------------------------------------------------------------


@dataclass
class Tally:
    """What the load saw, per provider."""

    ok: Counter[str] = field(default_factory=Counter)
    limited: Counter[str] = field(default_factory=Counter)  # 429: over a limit
    failed: Counter[str] = field(default_factory=Counter)  # anything else
    reasons: Counter[str] = field(default_factory=Counter)
    ok_by_daemon: Counter[int] = field(default_factory=Counter)
    limited_by_daemon: Counter[int] = field(default_factory=Counter)
    limited_at: list[tuple[float, int]] = field(default_factory=list)  # (when, daemon)

    def copy(self) -> Tally:
        return Tally(
            Counter(self.ok),
            Counter(self.limited),
            Counter(self.failed),
            Counter(self.reasons),
            Counter(self.ok_by_daemon),
            Counter(self.limited_by_daemon),
            list(self.limited_at),
        )

    def summary(self, *, by_daemon: bool = False) -> dict[str, Any]:
        figures: dict[str, Any] = {
            "ok": dict(self.ok),
            "limited_429": dict(self.limited),
            "failed": dict(self.failed),
            "failure_reasons": dict(self.reasons.most_common(10)),
        }
        if by_daemon:
            figures["ok_by_daemon"] = dict(sorted(self.ok_by_daemon.items()))
            figures["limited_429_by_daemon"] = dict(sorted(self.limited_by_daemon.items()))
        return figures


_BODY = json.dumps({**request_body(stream=False, events=0), "max_tokens": 8}).encode()


class Sender:
    """Requests to one provider on one daemon, on keep-alive connections (one per request
    in flight)."""

    def __init__(self, data_socket: Path, provider: str, tally: Tally, index: int = 0) -> None:
        self.target = Target(
            kind="http", unix=str(data_socket), path=f"/v1/http/{provider}/v1/chat/completions"
        )
        self.provider = provider
        self.index = index  # the daemon's
        self.tally = tally
        self.idle: list[HttpPeer] = []

    async def one(self) -> None:
        peer = self.idle.pop() if self.idle else None
        try:
            with trio.fail_after(REQUEST_TIMEOUT_S):
                if peer is None:
                    peer = await HttpPeer.open(self.target)
                await peer.request(_BODY)
            self.tally.ok[self.provider] += 1
            self.tally.ok_by_daemon[self.index] += 1
        except (PeerFailure, OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            reason = str(exc) or type(exc).__name__
            if reason == "status 429":
                self.tally.limited[self.provider] += 1
                self.tally.limited_by_daemon[self.index] += 1
                self.tally.limited_at.append((time.monotonic(), self.index))
            else:
                self.tally.failed[self.provider] += 1
                self.tally.reasons[f"{self.provider}: {reason}"] += 1
        if peer is not None and peer.usable:
            self.idle.append(peer)
        elif peer is not None:
            await peer.aclose()

    async def aclose(self) -> None:
        for peer in self.idle:
            await peer.aclose()
        self.idle.clear()


class Load:
    """The fixed-rate load on ``providers`` of every fleet daemon."""

    def __init__(self, setups: Sequence[Setup], providers: Sequence[str], tally: Tally) -> None:
        self.senders = [
            Sender(setup.data_socket, provider, tally, index)
            for index, setup in enumerate(setups)
            for provider in providers
        ]

    async def run(self, rate_s: float, seconds: float) -> None:
        """Each sender at ``rate_s`` a second for ``seconds``, their ticks spread evenly
        over each interval; a late request does not hold back the next."""
        interval = 1.0 / rate_s
        start = trio.current_time()
        end = start + seconds
        count = len(self.senders)
        async with trio.open_nursery() as requests, trio.open_nursery() as tickers:
            for index, sender in enumerate(self.senders):
                first = start + index * interval / count
                tickers.start_soon(self._ticks, requests, sender, first, interval, end)

    @staticmethod
    async def _ticks(
        requests: trio.Nursery, sender: Sender, first: float, interval: float, end: float
    ) -> None:
        at = first
        while at < end:
            await trio.sleep_until(at)
            requests.start_soon(sender.one)
            at += interval

    async def aclose(self) -> None:
        for sender in self.senders:
            await sender.aclose()


# --- figures --------------------------------------------------------------------------


def window_counts(times: Sequence[float], start: float, end: float) -> list[int]:
    """Arrivals in every ``WINDOW_S`` window ``[s, s + WINDOW_S)`` with ``start <= s`` and
    ``s + WINDOW_S <= end``, ``s`` in ``STEP_S`` steps; ``times`` sorted."""
    counts = []
    at = start
    while at + WINDOW_S <= end + 1e-9:
        counts.append(bisect_left(times, at + WINDOW_S) - bisect_left(times, at))
        at += STEP_S
    return counts


def windows_figures(times: Sequence[float], per: int, limit: int, spans: Spans) -> dict[str, Any]:
    """Max and min over the measured windows of ``per`` times the arrivals, against
    ``limit``; and the first window (from the load's start: the bucket's initial burst)."""
    measured = [per * n for n in window_counts(times, spans.measured_from, spans.end)]
    first = per * window_counts(times, spans.start, spans.start + WINDOW_S)[0]
    if not measured:
        raise BenchError("no whole 60-s window after the warm-up: run longer")
    return {
        "limit": limit,
        "windows": len(measured),
        "max": max(measured),
        "min": min(measured),
        "max_of_limit": round(max(measured) / limit, 4),
        "min_of_limit": round(min(measured) / limit, 4),
        "first_window": first,
        "first_window_of_limit": round(first / limit, 4),
        "total": per * len(times),
    }


@dataclass(frozen=True)
class Spans:
    start: float  # the load's start (time.monotonic())
    measured_from: float  # the end of the warm-up
    end: float  # the load's end


# --- the pieces -----------------------------------------------------------------------


@dataclass
class Fleet:
    valkey: Engine
    vault_addr: str
    root_token: str
    upstream_url: str
    keys: dict[str, str]  # provider: its key
    setups: list[Setup]
    free: Setup
    daemons: list[Daemon] = field(default_factory=list)
    free_daemon: Daemon | None = None
    upstream_pid: int = 0


async def write_keys(vault_addr: str, token: str) -> dict[str, str]:
    vault = Vault(VaultConfig(addr=vault_addr, auth="token", mount="secret", request_timeout_s=5))
    await vault.use_token(token)
    keys = {}
    for provider in (*LIMITED, ROOMY):
        keys[provider] = new_key()
        await vault.write_secret(f"openclawd/{provider}", {"api_key": keys[provider]})
    return keys


def snapshot(commit: str, into: Path) -> tuple[Path, str]:
    """``commit``'s ``openclawd`` package written under ``into`` (``git archive``), so that
    the daemons run one commit, whatever is edited in the work tree meanwhile; and the
    commit's hash. ``commit`` "": the work tree itself.

    Raises:
        BenchError: git cannot tell the commit or write it.
    """
    if not commit:
        return REPO, "work tree"
    into.mkdir(parents=True)
    try:
        full = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--verify", f"{commit}^{{commit}}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", full, "openclawd"], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise BenchError(f"cannot write commit {commit!r}'s openclawd: {exc}") from None
    return into, full[:12]


@contextlib.asynccontextmanager
async def fleet(plan: FleetPlan, bao: str, source: Path = REPO) -> AsyncIterator[Fleet]:
    """Everything running: Valkey, bao with the keys, the upstream accepting them, the N
    fleet daemons and the unlimited one (READY=1 each)."""
    with tempfile.TemporaryDirectory(prefix="ocfleet-") as tmp:
        root = Path(tmp)
        (root / "bao-home").mkdir()
        valkey: Engine = ValkeyCluster(root / "valkey") if plan.cluster else Valkey(root / "valkey")
        what = "a Valkey cluster (3 masters, 1 replica each)" if plan.cluster else "Valkey"
        say(f"starting {what}, bao and the fake upstream in {root}")
        await trio.to_thread.run_sync(valkey.start)
        token = secrets.token_urlsafe(24)
        vault_process, vault_addr = await start_vault(bao, Layout(root), token)
        try:
            keys = await write_keys(vault_addr, token)
            async with fake_upstream() as (upstream, port):
                made = _setups(root, plan, vault_addr, token, port, valkey, source)
                found = Fleet(valkey, vault_addr, token, f"http://127.0.0.1:{port}", keys, *made)
                found.upstream_pid = upstream.pid
                await upstream_accepts(found.upstream_url, list(keys.values()))
                async with _daemons(found):
                    yield found
        finally:
            await stop_process(vault_process, STOP_TIMEOUT_S)
            valkey.stop()


def _setups(
    root: Path,
    plan: FleetPlan,
    vault_addr: str,
    token: str,
    port: int,
    valkey: Engine,
    source: Path = REPO,
) -> tuple[list[Setup], Setup]:
    setups = []
    for index in range(plan.daemons + 1):
        directory = root / f"d{index}"
        directory.mkdir()
        setup = Setup(directory, vault_addr, token, port, daemon_source=source)
        fleet_member = index < plan.daemons
        write_config(setup, plan, valkey if fleet_member else None)
        setups.append(setup)
    return setups[:-1], setups[-1]


@contextlib.asynccontextmanager
async def _daemons(found: Fleet) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        for index, setup in enumerate(found.setups):
            found.daemons.append(await stack.enter_async_context(daemon(setup)))
            if (index + 1) % 10 == 0:
                say(f"  {index + 1} fleet daemons ready")
        found.free_daemon = await stack.enter_async_context(daemon(found.free))
        say(f"{len(found.daemons)} fleet daemons and the unlimited one are ready")
        yield


async def upstream_call(url: str, method: str, path: str, body: Any = None) -> Any:
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=30.0) as http:
        response = await http.request(method, path, json=body)
        response.raise_for_status()
        return response.json()


# --- the phases -----------------------------------------------------------------------


async def load_phase(found: Fleet, plan: FleetPlan) -> dict[str, Any]:
    """Phase 1: 2 L a minute on each of ``rpm`` and ``tpm``, warm-up + D seconds."""
    tally = Tally()
    load = Load(found.setups, LIMITED, tally)
    await upstream_call(found.upstream_url, "POST", "/_bench/arrivals", {"record": True})
    seconds = plan.warmup_s + plan.seconds
    say(
        f"load: {2 * plan.limit}/min on each of {', '.join(LIMITED)} over {plan.daemons} "
        f"daemons for {seconds:g} s (the first {plan.warmup_s:g} s a warm-up)"
    )
    busy, cpu = machine_busy_seconds(), _cpu(found)
    start = time.monotonic()
    try:
        await load.run(plan.rate_per_daemon_s, seconds)
    finally:
        await load.aclose()
    spans = Spans(start, start + plan.warmup_s, start + seconds)
    probes = {provider: await probe(found.setups[0], provider) for provider in LIMITED}
    arrivals = (await upstream_call(found.upstream_url, "GET", "/_bench/arrivals"))["arrivals"]
    await upstream_call(found.upstream_url, "POST", "/_bench/arrivals", {"record": False})
    elapsed = time.monotonic() - start
    by_provider = {p: sorted(arrivals.get(fingerprint(found.keys[p]), [])) for p in LIMITED}
    return {
        "seconds": round(elapsed, 1),
        "client": tally.summary(),
        "requests_per_minute": windows_figures(by_provider["rpm"], 1, plan.limit, spans),
        "tokens_per_minute": windows_figures(
            by_provider["tpm"], TOKENS_PER_REQUEST, plan.tokens_limit, spans
        ),
        "cpu": _cpu_figures(found, busy, cpu, elapsed),
        "probes_after": probes,
    }


async def probe(setup: Setup, provider: str) -> dict[str, Any]:
    """One request to ``provider`` on a daemon, its status and (the start of) its body,
    and the daemon's ``/v1/limits``: what a refusal says, and what the daemon counts."""
    transport = httpx.AsyncHTTPTransport(uds=str(setup.data_socket))
    async with httpx.AsyncClient(transport=transport, base_url="http://openclawd") as http:
        response = await http.post(
            f"/v1/http/{provider}/v1/chat/completions",
            content=_BODY,
            headers={"content-type": "application/json"},
        )
    async with control_client(setup) as control:
        limits = (await control.get("/v1/limits")).json()
    return {
        "status": response.status_code,
        "body": response.text[:300],
        "retry_after": response.headers.get("retry-after"),
        "limits": limits,
    }


def _cpu(found: Fleet) -> dict[str, float]:
    figures = {
        "fleet": sum(d.cpu() for d in found.daemons),
        "upstream": cpu_seconds(found.upstream_pid),
        "runner": cpu_seconds(os.getpid()),
    }
    if found.valkey.pids:
        figures["valkey"] = sum(cpu_seconds(pid) for pid in found.valkey.pids)
    return figures


def _cpu_figures(
    found: Fleet, busy_before: float, cpu_before: dict[str, float], elapsed: float
) -> dict[str, Any]:
    """CPU used meanwhile, in % of one core: the fleet's daemons together, Valkey, the
    upstream, this runner, and the whole machine (``cores`` = its cores)."""
    now = _cpu(found)
    figures = {
        f"{name}_pct": round(100 * (now[name] - cpu_before.get(name, 0.0)) / elapsed, 1)
        for name in now
    }
    figures["machine_pct"] = round(100 * (machine_busy_seconds() - busy_before) / elapsed, 1)
    figures["cores"] = os.cpu_count() or 0
    return figures


async def latency_phase(found: Fleet, plan: FleetPlan) -> dict[str, Any]:
    """Phase 2: one request at a time on ``roomy``, shared (fleet daemon 0) and unlimited
    (the free daemon) alternately, round after round in a rotated order."""
    targets = {
        "shared": found.setups[0].data_socket,
        "unlimited": found.free.data_socket,
    }
    samples: dict[str, list[int]] = {name: [] for name in targets}
    failures: Counter[str] = Counter()
    say(f"latency: {plan.latency_rounds} rounds of {plan.latency_per_round} requests per path")
    for round_ in range(plan.latency_rounds):
        order = list(targets) if round_ % 2 == 0 else list(reversed(targets))
        for name in order:
            target = Target(
                kind="http", unix=str(targets[name]), path=f"/v1/http/{ROOMY}/v1/chat/completions"
            )
            await _sequential(target, plan.latency_per_round, samples[name], failures, name)
    p50 = {name: statistics.median(values) / 1000 for name, values in samples.items()}
    return {
        "requests_per_path": {name: len(values) for name, values in samples.items()},
        "failures": dict(failures),
        "shared_p50_us": round(p50["shared"], 1),
        "unlimited_p50_us": round(p50["unlimited"], 1),
        "added_p50_us": round(p50["shared"] - p50["unlimited"], 1),
    }


async def _sequential(
    target: Target, n: int, into: list[int], failures: Counter[str], name: str
) -> None:
    peer = await HttpPeer.open(target)
    try:
        for index in range(n + 10):  # the first 10 of a round warm the connection
            if not peer.usable:  # the daemon closed it after a failure
                await peer.aclose()
                peer = await HttpPeer.open(target)
            try:
                outcome = await peer.request(_BODY)
            except PeerFailure as exc:
                failures[f"{name}: {exc}"] += 1
                continue
            if index >= 10:
                into.append(outcome.latency_ns)
    finally:
        await peer.aclose()


class Modes:
    """Every fleet daemon's ``/v1/limits`` "shared", polled over and over (one daemon after
    the other, then ``MODES_POLL_S``), each change noted with its time (time.monotonic()):
    ``SHARED`` (mode shared and reachable), else what it said."""

    def __init__(self, setups: Sequence[Setup]) -> None:
        self.setups = list(setups)
        self.changes: list[list[tuple[float, str]]] = [[] for _ in self.setups]
        self._all_shared = trio.Event()  # set while the last pass saw every one shared

    def all_shared(self) -> bool:
        return all(changes and changes[-1][1] == SHARED for changes in self.changes)

    async def wait_all_shared(self) -> None:
        await self._all_shared.wait()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Until cancelled; started once every daemon has been asked once."""
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(control_client(setup)) for setup in self.setups
            ]
            started = False
            while True:
                for index, client in enumerate(clients):
                    try:
                        shared = (await client.get("/v1/limits")).json().get("shared", {})
                        mode, reachable = shared.get("mode"), shared.get("reachable")
                        state = (
                            SHARED
                            if (mode, reachable) == ("shared", True)
                            else (f"{mode}, reachable {reachable}")
                        )
                    except (httpx.HTTPError, ValueError) as exc:
                        state = f"no answer: {type(exc).__name__}"
                    changes = self.changes[index]
                    if not changes or changes[-1][1] != state:
                        changes.append((time.monotonic(), state))
                if self.all_shared():
                    self._all_shared.set()
                elif self._all_shared.is_set():
                    self._all_shared = trio.Event()
                if not started:
                    task_status.started()
                    started = True
                await trio.sleep(MODES_POLL_S)


@dataclass(frozen=True)
class Timeline:
    """One daemon's modes around a fault (``Modes.changes``)."""

    left_at: float | None  # when first seen not shared after the fault (the fault's time
    # if not shared then)
    shared_for_good_at: float | None  # its last change to shared, if it left and ends shared
    settled: bool  # shared at the end
    flaps: int  # changes from shared to not shared after ``back``


def timeline(changes: Sequence[tuple[float, str]], fault: float, back: float) -> Timeline:
    previous = SHARED
    for at, state in changes:
        if at <= fault:
            previous = state
    left_at = fault if previous != SHARED else None
    flaps = 0
    for at, state in changes:
        if at <= fault:
            continue
        if state != SHARED and left_at is None:
            left_at = at
        if at > back and previous == SHARED and state != SHARED:
            flaps += 1
        previous = state
    settled = bool(changes) and changes[-1][1] == SHARED
    again = changes[-1][0] if settled and left_at is not None else None
    return Timeline(left_at, again, settled, flaps)


def refusals_by_mode(
    changes: Sequence[Sequence[tuple[float, str]]],
    limited_at: Sequence[tuple[float, int]],
    since: float,
    until: float,
) -> dict[str, Any]:
    """The 429s between ``since`` and ``until`` (``Tally.limited_at``), each by what its
    daemon's mode was then as last polled (``Modes.changes``): refused while counting
    shared (the fleet's limit), or while not (its local share); and the latter's times
    (from ``since``) and daemons. Near a change of mode, a refusal is put by the poll seen
    before it (``MODES_POLL_S`` and a pass over the daemons apart)."""
    shared = 0
    local: list[list[float | int]] = []
    for at, index in sorted(limited_at):
        if not since <= at <= until:
            continue
        mode = SHARED
        for changed, state in changes[index]:
            if changed > at:
                break
            mode = state
        if mode == SHARED:
            shared += 1
        else:
            local.append([round(at - since, 2), index])
    return {"while_shared": shared, "while_not_shared": len(local), "not_shared_at": local[:50]}


def settling(
    changes: Sequence[Sequence[tuple[float, str]]], fault: float, back: float
) -> dict[str, Any]:
    """What the daemons' modes did around a fault of the engine (at ``fault``; ``back``:
    Valkey answering again, or the new master serving the slot), from ``Modes.changes``.

    ``shared_again_s``: from ``back`` until the last daemon's last change to shared (so
    every daemon counts shared from then on, to the end of the polling); 0.0 if no daemon
    left shared counting; None if one was not shared at the end. ``left_shared``: daemons
    seen not shared after ``fault``; ``first_left_s``: from ``fault`` to the first such
    sighting; ``flaps_after_back``: changes from shared to not shared after ``back``."""
    lines = [timeline(one, fault, back) for one in changes]
    left = [line.left_at for line in lines if line.left_at is not None]
    again = [line.shared_for_good_at for line in lines if line.shared_for_good_at is not None]
    shared_again: float | None = None
    if all(line.settled for line in lines):
        shared_again = round(max(again) - back, 2) if again else 0.0
    return {
        "daemons": len(lines),
        "left_shared": len(left),
        "first_left_s": round(min(left) - fault, 2) if left else None,
        "not_shared_at_end": sum(not line.settled for line in lines),
        "shared_again_s": shared_again,
        "flaps_after_back": sum(line.flaps for line in lines),
    }


async def outage_phase(found: Fleet, plan: FleetPlan) -> dict[str, Any]:
    """Phase 3: load on ``rpm``; after 10 s, the engine fails: standalone, Valkey killed
    for ``outage_s`` then started again (empty); cluster, the master serving rpm's slot
    killed, its replica taking over. The load runs on until every daemon counts shared
    again, plus 10 s; the daemons' modes are polled throughout."""
    tally = Tally()
    load = Load(found.setups, ("rpm",), tally)
    modes = Modes(found.setups)
    figures: dict[str, Any] = {"outage_s": plan.outage_s, "local_share": plan.local_share}
    if isinstance(found.valkey, ValkeyCluster):
        say("outage: the master serving rpm's slot killed under load on rpm")
    else:
        say(f"outage: Valkey killed for {plan.outage_s:g} s under load on rpm")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(modes.run)
            nursery.start_soon(load.run, plan.rate_per_daemon_s, 10 * 60.0)
            await trio.sleep(10.0)
            before = tally.copy()
            if isinstance(found.valkey, ValkeyCluster):
                fault, back = await _kill_master(found, found.valkey, figures)
            else:
                fault, back = await _restart_valkey(found, found.valkey, plan, figures)
            down = tally.copy()
            await trio.sleep(1.0)
            with trio.move_on_after(SHARED_AGAIN_TIMEOUT_S):
                await modes.wait_all_shared()
            during = tally.copy()
            await trio.sleep(10.0)
            nursery.cancel_scope.cancel()
    finally:
        await load.aclose()
    figures.update(settling(modes.changes, fault, back))
    figures["refusals_from_fault"] = refusals_by_mode(
        modes.changes, tally.limited_at, fault, time.monotonic()
    )
    figures["modes"] = [
        [[round(at - fault, 2), state] for at, state in timeline] for timeline in modes.changes
    ]
    figures["before"] = before.summary()
    figures["while_down"] = _minus(down, before).summary(by_daemon=True)
    figures["until_shared_again"] = _minus(during, down).summary(by_daemon=True)
    figures["through_return"] = _minus(during, before).summary(by_daemon=True)
    figures["after_return_10s"] = _minus(tally, during).summary()
    return figures


async def _restart_valkey(
    found: Fleet, valkey: Valkey, plan: FleetPlan, figures: dict[str, Any]
) -> tuple[float, float]:
    """Valkey killed for ``outage_s``, then started again: (killed at, answering at)."""
    fault = time.monotonic()
    valkey.stop()
    await trio.sleep(plan.outage_s / 2)
    figures["probe_mid_outage"] = await probe(found.setups[0], "rpm")
    await trio.sleep(fault + plan.outage_s - time.monotonic())
    await trio.to_thread.run_sync(valkey.start)
    return fault, time.monotonic()


async def _kill_master(
    found: Fleet, cluster: ValkeyCluster, figures: dict[str, Any]
) -> tuple[float, float]:
    """The master serving ``RPM_KEY``'s slot killed (SIGKILL); waits until its replica
    says it serves the slot: (killed at, new master serving at). Then until the cluster is
    stable again (every live node ``cluster_state:ok``), noted as ``cluster_stable_s``."""
    slot = await trio.to_thread.run_sync(cluster.keyslot, RPM_KEY)
    victim = await trio.to_thread.run_sync(cluster.master_of, slot)
    replica = await trio.to_thread.run_sync(cluster.replica_of, victim)
    seed = "yes" if victim.url == cluster.url else "no"
    say(f"  slot {slot}: killing the master at {victim.url} (the seed: {seed})")
    figures.update({"key": RPM_KEY, "slot": slot, "killed": victim.url, "new_master": replica.url})
    fault = time.monotonic()
    victim.stop()

    async def probe_soon() -> None:
        await trio.sleep(1.0)
        figures["probe_mid_outage"] = await probe(found.setups[0], "rpm")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe_soon)
        await trio.to_thread.run_sync(cluster.wait_serves, replica, slot)
        back = time.monotonic()
    figures["failover_s"] = round(back - fault, 2)
    say(f"  {replica.url} serves slot {slot} {back - fault:.2f} s after the kill")
    await trio.to_thread.run_sync(cluster.wait_stable)
    figures["cluster_stable_s"] = round(time.monotonic() - fault, 2)
    return fault, back


def _minus(later: Tally, earlier: Tally) -> Tally:
    return Tally(
        ok=later.ok - earlier.ok,
        limited=later.limited - earlier.limited,
        failed=later.failed - earlier.failed,
        reasons=later.reasons - earlier.reasons,
        ok_by_daemon=later.ok_by_daemon - earlier.ok_by_daemon,
        limited_by_daemon=later.limited_by_daemon - earlier.limited_by_daemon,
        limited_at=later.limited_at[len(earlier.limited_at) :],
    )


# --- the run --------------------------------------------------------------------------


async def run(plan: FleetPlan) -> dict[str, Any]:
    bao = find_bao()
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "load_average_before": load_average(),
        "versions": versions(bao),
        "plan": asdict(plan),
    }
    with tempfile.TemporaryDirectory(prefix="ocfleet-src-") as tmp:
        source, commit = snapshot(plan.daemon_commit, Path(tmp) / "src")
        results["versions"]["daemon_commit"] = commit
        say(f"the daemons run {commit}'s openclawd")
        await _run_fleet(plan, bao, source, results)
    results["load_average_after"] = load_average()
    return results


async def _run_fleet(plan: FleetPlan, bao: str, source: Path, results: dict[str, Any]) -> None:
    async with fleet(plan, bao, source) as found:
        results["fleet_rss_mb"] = round(sum(d.rss() for d in found.daemons) / 2**20)
        results["load"] = await load_phase(found, plan)
        results["latency"] = await latency_phase(found, plan)
        if plan.outage_s > 0:
            results["outage"] = await outage_phase(found, plan)


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.1f} %"


def summary(results: dict[str, Any]) -> str:
    plan = results["plan"]
    load = results["load"]
    rpm, tpm = load["requests_per_minute"], load["tokens_per_minute"]
    lat = results["latency"]
    rows = [
        "| figure | measured | goal |",
        "|---|---|---|",
        f"| requests per 60-s window, max ({rpm['windows']} windows) | {rpm['max']} = "
        f"{_pct(rpm['max_of_limit'])} of {rpm['limit']} | <= 101 % |",
        f"| requests per 60-s window, min | {rpm['min']} = {_pct(rpm['min_of_limit'])} | >= 90 % |",
        f"| requests in the first 60 s (bucket full at start) | {rpm['first_window']} = "
        f"{_pct(rpm['first_window_of_limit'])} | (by design up to 200 %) |",
        f"| tokens per 60-s window, max | {tpm['max']} = {_pct(tpm['max_of_limit'])} of "
        f"{tpm['limit']} | <= 105 % |",
        f"| tokens per 60-s window, min | {tpm['min']} = {_pct(tpm['min_of_limit'])} | - |",
        f"| latency p50, shared limit / no limit | {lat['shared_p50_us'] / 1000:.3f} ms / "
        f"{lat['unlimited_p50_us'] / 1000:.3f} ms | - |",
        f"| added latency p50 | {lat['added_p50_us'] / 1000:+.3f} ms | <= +0.1 ms |",
    ]
    outage = results.get("outage")
    if outage:
        through = outage["through_return"]
        if plan.get("cluster"):
            fault = f"master killed (failover {outage['failover_s']} s)"
            back = "the new master serving the slot"
        else:
            fault, back = f"Valkey down {outage['outage_s']:g} s", "Valkey's return"
        rows += [
            f"| {fault}: requests ok / 429 / failed otherwise | "
            f"{sum(through['ok'].values())} / {sum(through['limited_429'].values())} / "
            f"{sum(through['failed'].values())} | no refusal under the local share |",
            f"| of the 429s, while the daemon counted shared / not | "
            f"{outage['refusals_from_fault']['while_shared']} / "
            f"{outage['refusals_from_fault']['while_not_shared']} | - / 0 |",
            f"| daemons that left shared counting | {outage['left_shared']} of "
            f"{outage['daemons']} (flaps after: {outage['flaps_after_back']}) | - |",
            f"| from {back} until every daemon counts shared | {outage['shared_again_s']} s "
            "| <= 5 s |",
        ]
    head = (
        f"{'cluster' if plan.get('cluster') else 'standalone'}, "
        f"N = {plan['daemons']} daemons, L = {plan['limit']} requests/min, "
        f"D = {plan['seconds']:g} s after a {plan['warmup_s']:g} s warm-up; "
        f"load average before {results['load_average_before']}, "
        f"after {results['load_average_after']}, "
        f"machine CPU during the load {load['cpu']['machine_pct']} % of one core "
        f"({load['cpu']['cores']} cores)"
    )
    return head + "\n\n" + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--daemons", type=int, default=10)
    parser.add_argument("--limit", type=int, default=600, help="L, requests a minute")
    parser.add_argument("--minutes", type=float, default=2.0, help="D, measured")
    parser.add_argument("--warmup-s", type=float, default=60.0)
    parser.add_argument("--latency-rounds", type=int, default=6)
    parser.add_argument("--latency-per-round", type=int, default=200)
    parser.add_argument("--outage-s", type=float, default=20.0, help="0: no outage phase")
    parser.add_argument(
        "--cluster", action="store_true", help="a 3-master cluster; the outage kills a master"
    )
    parser.add_argument(
        "--daemon-commit",
        default="HEAD",
        help="the commit whose openclawd the daemons run ('': the work tree as it is)",
    )
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    plan = FleetPlan(
        daemons=args.daemons,
        limit=args.limit,
        seconds=args.minutes * 60.0,
        warmup_s=args.warmup_s,
        latency_rounds=args.latency_rounds,
        latency_per_round=args.latency_per_round,
        outage_s=args.outage_s,
        cluster=args.cluster,
        daemon_commit=args.daemon_commit,
    )
    try:
        results = trio.run(run, plan)
    except (BenchError, DemoError, ValkeyError) as exc:
        print(f"bench/fleet: {exc}", file=sys.stderr)
        return 1
    print(summary(results))
    day = results["date"][:10]
    name = f"{day}-fleet-n{plan.daemons}{'-cluster' if plan.cluster else ''}.json"
    output = args.output or REPO / "bench" / "results" / name
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    say(f"figures written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
