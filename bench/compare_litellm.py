"""Compares openclawd's direct baseline with a LiteLLM proxy: scenarios 1, 2 and 4.

The optional comparison of docs/performance.md: the same fake upstream (``bench/upstream.py``) and
the same load client (``bench/client.py``) as ``bench/run``, with two paths:

* ``direct`` -- the client to the upstream, with the upstream key, as in ``bench/run``;
* ``litellm`` -- the client to a LiteLLM proxy (``litellm --config``, its defaults: uvicorn,
  one worker) on loopback, with LiteLLM's master key; LiteLLM relays to the upstream as
  the ``openai/bench`` model, with a key of its own (so the upstream counts what LiteLLM
  sent it apart from what the client sent it directly).

Both keys reach LiteLLM in its environment (``os.environ/...`` in its config), never on
disk. It runs offline (``LITELLM_LOCAL_MODEL_COST_MAP=True``), logging errors only.

Scenarios 1 (latency, non-streaming), 2 (time to first event, streaming) and 4
(throughput at each concurrency, with the proxy's CPU) alternate the paths round after
round, as ``bench/run`` does (in 2, as there, the upstream sends the first event and the
rest ``FIRST_EVENT_GAP_MS`` later); the proxy's CPU is that of its whole process tree
(LiteLLM may run worker processes). Before measuring, a check: the client's requests
through LiteLLM must succeed, streamed ones through ``[DONE]``, and ``bench_gap_ms`` must
reach the upstream through it.

LiteLLM lives in a venv of its own, outside the repo; ``bench/compare-litellm`` installs it
and passes its ``litellm`` executable. Usage: ``bench/compare-litellm [--quick]
[--output PATH] [--workers N] [--upstream-model PROVIDER/MODEL]``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import trio

from bench.runner import (
    AB,
    FIRST_EVENT_GAP_MS,
    REPO,
    BenchError,
    ClientProcess,
    child_environ,
    cpu_seconds,
    fake_upstream,
    fingerprint,
    git_commit,
    machine,
    new_key,
    rss_bytes,
    running,
    upstream_accepts,
    upstream_stats,
)
from bench.runner import (
    PLANS as RUNNER_PLANS,
)
from bench.runner import (
    Plan as RunnerPlan,
)

PATHS = ("direct", "litellm")
MODEL = "bench"  # what bench.client.request_body asks for
DEFAULT_UPSTREAM_MODEL = f"openai/{MODEL}"
LITELLM_READY_TIMEOUT_S = 180.0  # it imports a lot: 6 s on 2 cores
WARM_UP = 50  # requests per path before each sequential scenario
CHECK = 3  # requests per path and kind in the check
CHECK_GAP_MS = 100  # the check's gap after a stream's first event
LOG_TAIL_LINES = 30
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass(frozen=True)
class Plan:
    rounds: int  # A/B rounds of scenarios 1 and 2
    sequential: int  # (1) requests per path per round
    first_event: int  # (2) streamed requests per path per round
    stream_events: int  # (2) events in each of them
    throughput_rounds: int  # (4)
    throughput_s: float  # (4) seconds per path, per round, per concurrency
    concurrency: tuple[int, ...]  # (4)


def _plan(base: RunnerPlan, **changes: Any) -> Plan:
    """``base`` (one of bench/run's plans), cut to scenarios 1, 2 and 4, with ``changes``."""
    taken = {f.name: getattr(base, f.name) for f in fields(Plan)}
    return Plan(**(taken | changes))


PLANS = {
    # bench/run's quick plan, with more throughput rounds.
    "default": _plan(RUNNER_PLANS["quick"], throughput_rounds=2, throughput_s=3.0),
    # A few minutes at most, the install aside.
    "quick": _plan(RUNNER_PLANS["quick"], rounds=2, sequential=100, first_event=50),
}


def say(text: str) -> None:
    """Progress, on stderr (stdout is the summary)."""
    print(text, file=sys.stderr, flush=True)


# --- LiteLLM --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    tail = [_ANSI.sub("", line).rstrip() for line in text.splitlines()[-lines:]]
    return "\n".join(f"  | {line}" for line in tail) or "  | (empty)"


def litellm_config(upstream_port: int, upstream_model: str) -> dict[str, Any]:
    """LiteLLM's config (JSON is YAML): the keys are names of environment variables."""
    return {
        "model_list": [
            {
                "model_name": MODEL,
                "litellm_params": {
                    "model": upstream_model,
                    "api_base": f"http://127.0.0.1:{upstream_port}/v1",
                    "api_key": "os.environ/BENCH_UPSTREAM_KEY",
                },
            }
        ],
        "litellm_settings": {"set_verbose": False, "suppress_debug_info": True},
        "general_settings": {"master_key": "os.environ/BENCH_MASTER_KEY"},
    }


def litellm_environ(upstream_key: str, master_key: str) -> dict[str, str]:
    """The environment of the proxy: this one without anything that would change how
    LiteLLM runs (its own settings, a database, proxies, Vault), offline, quiet."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("LITELLM_", "VAULT_", "BAO_", "PYTHON"))
        and name.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
        and name
        not in ("DATABASE_URL", "DIRECT_URL", "REDIS_HOST", "REDIS_URL", "STORE_MODEL_IN_DB")
    }
    env.update(
        BENCH_UPSTREAM_KEY=upstream_key,
        BENCH_MASTER_KEY=master_key,
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_LOG="ERROR",
        LITELLM_DONT_SHOW_FEEDBACK_BOX="True",
        PYTHONUNBUFFERED="1",
    )
    return env


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it (from the parent pids in ``/proc``)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found = [pid]
    index = 0
    while index < len(found):
        found += children.get(found[index], [])
        index += 1
    return found


def _reaped_cpu_seconds(pid: int) -> float:
    """CPU time of the children ``pid`` has waited for (cutime + cstime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process tree: every live process's, and that of the ones reaped."""
    total = 0.0
    for member in descendants(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += cpu_seconds(member) + _reaped_cpu_seconds(member)
    return total


def tree_rss_bytes(pid: int) -> int:
    total = 0
    for member in descendants(pid):
        with contextlib.suppress(OSError, BenchError):
            total += rss_bytes(member)
    return total


class Proxy:
    """A running LiteLLM proxy: its process, port and log."""

    def __init__(self, process: trio.Process, port: int, log: Path, started_in_s: float):
        self.process = process
        self.port = port
        self.log = log
        self.started_in_s = started_in_s

    def cpu(self) -> float:
        return tree_cpu_seconds(self.process.pid)

    def rss(self) -> int:
        return tree_rss_bytes(self.process.pid)

    def processes(self) -> int:
        return len(descendants(self.process.pid))

    def tail(self) -> str:
        return log_tail(self.log)


@contextlib.asynccontextmanager
async def litellm_proxy(
    litellm: Path,
    root: Path,
    upstream_port: int,
    upstream_key: str,
    master_key: str,
    workers: int,
    upstream_model: str,
) -> AsyncIterator[Proxy]:
    """Start the proxy, wait until it answers; stop it, and whatever it started, after."""
    config = root / "litellm.yaml"
    config.write_text(json.dumps(litellm_config(upstream_port, upstream_model), indent=2) + "\n")
    port = free_port()
    argv = [str(litellm), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--num_workers", str(workers)]
    log_path = root / "litellm.log"
    spawned = time.monotonic()
    with log_path.open("ab") as log:
        async with running(
            argv,
            "the LiteLLM proxy",
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=litellm_environ(upstream_key, master_key),
            cwd=root,
        ) as process:
            seen: set[int] = set()
            try:
                await _wait_ready(process, port, log_path)
                proxy = Proxy(process, port, log_path, time.monotonic() - spawned)
                yield proxy
            finally:
                seen.update(descendants(process.pid)[1:])
        # The proxy has been stopped (SIGTERM, then SIGKILL); a worker it left behind is
        # killed here (only those seen in its tree, by pid).
        for pid in seen:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


async def _wait_ready(process: trio.Process, port: int, log: Path) -> None:
    url = f"http://127.0.0.1:{port}/health/liveliness"
    async with httpx.AsyncClient(trust_env=False, timeout=2.0) as http:
        with trio.move_on_after(LITELLM_READY_TIMEOUT_S):
            while process.returncode is None:
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(url)).status_code == 200:
                        return
                await trio.sleep(0.1)
            raise BenchError(
                f"the LiteLLM proxy exited (status {process.returncode}) before it answered; "
                f"the end of its log:\n{log_tail(log)}"
            )
    raise BenchError(
        f"the LiteLLM proxy did not answer {url} within {LITELLM_READY_TIMEOUT_S:g} s; "
        f"the end of its log:\n{log_tail(log)}"
    )


def litellm_versions(litellm: Path) -> dict[str, str]:
    """Versions in LiteLLM's venv (the python next to its executable)."""
    script = (
        "import importlib.metadata as m, json, platform\n"
        "found = {'python': platform.python_version()}\n"
        "for name in ('litellm', 'fastapi', 'starlette', 'uvicorn', 'uvloop', 'aiohttp',"
        " 'httpx', 'pydantic', 'openai'):\n"
        "    try:\n"
        "        found[name] = m.version(name)\n"
        "    except m.PackageNotFoundError:\n"
        "        pass\n"
        "print(json.dumps(found))\n"
    )
    python = litellm.parent / "python"
    try:
        done = subprocess.run(
            [str(python), "-c", script], capture_output=True, text=True, check=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise BenchError(f"cannot read the versions in LiteLLM's venv ({python}): {exc}") from None
    found: dict[str, str] = json.loads(done.stdout)
    if "litellm" not in found:
        raise BenchError(f"litellm is not installed in {litellm.parent.parent}")
    return found


def our_versions() -> dict[str, str]:
    found = {}
    for name in ("openclawd", "trio", "h11", "httpx"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    commit = git_commit(REPO)
    if commit is not None:
        found["commit"] = commit
    return found


# --- the scenarios --------------------------------------------------------------------


class Compare(AB):
    """Scenarios 1, 2 and 4 (``AB``), direct and through LiteLLM, and the check first."""

    def __init__(self, plan: Plan, client: ClientProcess, proxy: Proxy) -> None:
        super().__init__(
            client,
            PATHS,
            proxy.cpu,
            "proxy",
            rounds=plan.rounds,
            throughput_rounds=plan.throughput_rounds,
            throughput_s=plan.throughput_s,
            concurrency=plan.concurrency,
            warm_up=WARM_UP,
        )
        self.plan = plan
        self.proxy = proxy

    async def check(self) -> dict[str, Any]:
        """The client's requests, plain and streamed, must go through every path whole; and
        ``bench_gap_ms`` must reach the upstream (scenario 2 needs it): a stream with a long
        gap after its first event must take at least that long."""
        out: dict[str, Any] = {p: {} for p in PATHS}
        events = self.plan.stream_events
        for kind, stream, gap_ms in (
            ("plain", False, 0),
            ("stream", True, 0),
            ("gap", True, CHECK_GAP_MS),
        ):
            for path in PATHS:
                answer = await self.call_sequential(path, CHECK, stream, events, gap_ms)
                if answer["failures"]:
                    reasons = ", ".join(f"{n}× {why}" for why, n in answer["failures"].items())
                    raise BenchError(
                        f"the check failed: {kind} requests on the {path} path: {reasons}; "
                        f"the end of LiteLLM's log:\n{self.proxy.tail()}"
                    )
                if kind == "gap":
                    shortest_ms = min(answer["latency_ns"]) / 1e6
                    if shortest_ms < 0.9 * gap_ms:
                        raise BenchError(
                            f"the check failed: on the {path} path a stream took "
                            f"{shortest_ms:.1f} ms, less than the {gap_ms} ms gap asked of the "
                            "upstream (bench_gap_ms): it did not reach the upstream"
                        )
                    out[path]["gap_check"] = {
                        "gap_ms": gap_ms,
                        "first_event_ms": [round(ns / 1e6, 2) for ns in answer["first_event_ns"]],
                        "latency_ms": [round(ns / 1e6, 2) for ns in answer["latency_ns"]],
                    }
                else:
                    out[path][f"{kind}_events_per_response"] = answer["events"][0]
        return out


# --- the run --------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    mode: str
    litellm: Path
    workers: int
    upstream_model: str
    install_s: float | None
    requirement: str | None


async def run(options: Options) -> dict[str, Any]:
    plan = PLANS[options.mode]
    results: dict[str, Any] = {
        "tool": "bench/compare-litellm",
        "mode": options.mode,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        # Other work on the machine disturbs every figure; here is how much there was.
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "versions": our_versions(),
        "litellm_versions": litellm_versions(options.litellm),
        "plan": asdict(plan),
    }
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ocbench-litellm-") as tmp:
        root = Path(tmp)
        direct_key, litellm_key = new_key(), new_key()
        master_key = "sk-" + secrets.token_urlsafe(24)
        say("starting the fake upstream")
        async with fake_upstream() as (upstream, port):
            upstream_url = f"http://127.0.0.1:{port}"
            await upstream_accepts(upstream_url, [direct_key, litellm_key])
            say(f"starting the LiteLLM proxy {results['litellm_versions']['litellm']}")
            async with litellm_proxy(
                options.litellm,
                root,
                port,
                litellm_key,
                master_key,
                options.workers,
                options.upstream_model,
            ) as proxy:
                say(f"LiteLLM answers after {proxy.started_in_s:.1f} s")
                results["litellm"] = {
                    "install_s": options.install_s,
                    "requirement": options.requirement,
                    "executable": str(options.litellm),
                    "workers": options.workers,
                    "config": litellm_config(port, options.upstream_model),
                    "ready_s": round(proxy.started_in_s, 2),
                    "rss_mb_at_ready": round(proxy.rss() / 2**20, 1),
                }
                async with running(
                    [sys.executable, "-m", "bench.client"],
                    "the load client",
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    env=child_environ(),
                    cwd=REPO,
                    # Its own process group: the terminal's Ctrl-C is for this runner,
                    # which stops it (it also stops when its stdin closes).
                    start_new_session=True,
                ) as client_process:
                    client = ClientProcess(client_process)
                    await client.call(
                        op="targets",
                        targets={
                            "direct": {
                                "kind": "http",
                                "tcp": ["127.0.0.1", port],
                                "key": direct_key,
                            },
                            "litellm": {
                                "kind": "http",
                                "tcp": ["127.0.0.1", proxy.port],
                                "path": "/v1/chat/completions",
                                "key": master_key,
                            },
                        },
                    )
                    compare = Compare(plan, client, proxy)
                    keys = {"direct": direct_key, "litellm": litellm_key}
                    await _measure(compare, results, upstream_url, keys)
                    results["cpu_s_total"] = {
                        "litellm": round(proxy.cpu(), 1),
                        "upstream": round(cpu_seconds(upstream.pid), 1),
                        "client": round(cpu_seconds(client_process.pid), 1),
                    }
                results["litellm"]["rss_mb_after_load"] = round(proxy.rss() / 2**20, 1)
                results["litellm"]["processes"] = proxy.processes()
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["seconds"] = round(time.monotonic() - started, 1)
    return results


async def _upstream_counts(url: str, keys: dict[str, str]) -> dict[str, Any]:
    """Requests the upstream accepted with each path's key, and the 401s."""
    stats = await upstream_stats(url)
    received = {path: stats["requests"].get(fingerprint(key), 0) for path, key in keys.items()}
    return {"received": received, "refused": stats["refused"]}


async def _measure(
    compare: Compare, results: dict[str, Any], upstream_url: str, keys: dict[str, str]
) -> None:
    """The check, then the scenarios, into ``results``."""
    plan = compare.plan
    say("checking the client's requests through LiteLLM")
    results["check"] = await compare.check()
    before, at = compare.proxy.cpu(), time.monotonic()
    await trio.sleep(2.0)
    results["litellm"]["idle_cpu_percent"] = round(
        100 * (compare.proxy.cpu() - before) / (time.monotonic() - at), 1
    )
    scenarios: dict[str, Any] = {}
    results["scenarios"] = scenarios
    say("1 added latency, non-streaming")
    scenarios["latency"] = await compare.sequential(False, plan.sequential, 0)
    say("2 time to first event, streaming")
    scenarios["first_event"] = await compare.sequential(
        True, plan.first_event, plan.stream_events, FIRST_EVENT_GAP_MS
    )
    # Up to here every request the client sent is one it counted, so a difference from
    # what reached the upstream is LiteLLM's (a retry, or a request it did not relay).
    # Under load (4), the requests in flight when a run ends are not counted by the
    # client, but may reach the upstream: the totals differ by up to the concurrency.
    sequential_sent = dict(compare.sent)
    sequential_upstream = await _upstream_counts(upstream_url, keys)
    say("4 throughput")
    scenarios["throughput"] = await compare.throughput()
    total_upstream = await _upstream_counts(upstream_url, keys)
    results["requests"] = {
        "sequential": {
            "client_sent": sequential_sent,
            "upstream_received": sequential_upstream["received"],
        },
        "total": {
            "client_counted": dict(compare.sent),
            "upstream_received": total_upstream["received"],
        },
        "upstream_401s": total_upstream["refused"],
    }


# --- the summary ----------------------------------------------------------------------


def summary(results: dict[str, Any]) -> str:
    """The figures as Markdown tables: the A/B scenarios, then LiteLLM's own."""
    s = results["scenarios"]
    m = results["machine"]
    v = results["versions"]
    lv = results["litellm_versions"]
    ll = results["litellm"]
    lines = [
        f"LiteLLM {lv['litellm']} (uvicorn {lv.get('uvicorn', '?')}, {ll['workers']} worker"
        f"{'s' if ll['workers'] != 1 else ''}) vs direct; openclawd bench "
        f"{v.get('openclawd', '?')} ({v.get('commit', '?')}), {results['mode']} run, "
        f"{results['date']}: {m['cpu']}, {m['cpus']} CPUs, Python {m['python']}",
        "",
        "| scenario | direct | via LiteLLM |",
        "|---|---|---|",
    ]

    def row(name: str, direct: str, litellm: str) -> None:
        lines.append(f"| {name} | {direct} | {litellm} |")

    def p50_p99(figures: dict[str, Any]) -> str:
        return f"{figures['p50_us']:g} / {figures['p99_us']:g}"

    def added(figures: dict[str, Any]) -> str:
        return f"+{figures['added_p50_us']:g} / +{figures['added_p99_us']:g}"

    def failed(figures: dict[str, Any]) -> str:
        return f"; {figures['failures']:,} failed" if figures["failures"] else ""

    lat = s["latency"]
    row(
        "1 latency p50 / p99 (µs)",
        p50_p99(lat["direct"]) + failed(lat["direct"]),
        p50_p99(lat["litellm"]) + failed(lat["litellm"]),
    )
    row("1 added p50 / p99 (µs)", "", added(lat["litellm"]))
    row("1 proxy CPU per request (µs)", "", f"{lat['litellm']['proxy_cpu_us_per_request']:g}")
    fe = s["first_event"]
    row(
        f"2 first event p50 / p99 (µs), the rest {FIRST_EVENT_GAP_MS} ms later",
        p50_p99(fe["direct"]) + failed(fe["direct"]),
        p50_p99(fe["litellm"]) + failed(fe["litellm"]),
    )
    row("2 added p50 / p99 (µs)", "", added(fe["litellm"]))
    for clients, tp in s["throughput"].items():
        d, t = tp["direct"], tp["litellm"]
        row(
            f"4 requests/s, {clients} clients (proxy CPU)",
            f"{d['requests_per_s']:,}{failed(d)}",
            f"{t['requests_per_s']:,} (×{t['ratio']:g}, {t['proxy_cpu_percent']}%){failed(t)}",
        )
    requests = results["requests"]
    gap = results["check"]["litellm"]["gap_check"]
    held = statistics.median(gap["first_event_ms"])
    install = f"{ll['install_s']:g} s" if ll.get("install_s") is not None else "?"
    lines += [
        "",
        "| LiteLLM | figure |",
        "|---|---|",
        f"| install (pip, this run) | {install} |",
        f"| start to answering /health/liveliness | {ll['ready_s']:g} s |",
        f"| RSS at start / after the load | {ll['rss_mb_at_ready']:g} MB / "
        f"{ll['rss_mb_after_load']:g} MB ({ll['processes']} process"
        f"{'es' if ll['processes'] != 1 else ''}) |",
        f"| CPU idle | {ll['idle_cpu_percent']:g}% |",
        f"| requests sent to it / it sent upstream (check, 1, 2) | "
        f"{requests['sequential']['client_sent']['litellm']:,} / "
        f"{requests['sequential']['upstream_received']['litellm']:,} |",
        f"| first streamed event relayed before the rest (check: {gap['gap_ms']} ms gap) | "
        f"{'yes' if held < gap['gap_ms'] else 'no'}: {held:g} ms after the request (median) |",
        f"| streamed events per response, direct / via LiteLLM | "
        f"{fe['direct']['events_per_response']} / {fe['litellm']['events_per_response']} |",
    ]
    return "\n".join(lines)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM and SIGHUP stop the run as Ctrl-C does: trio raises KeyboardInterrupt where
    it is safe, and every process is stopped on the way out."""
    os.kill(os.getpid(), signal.SIGINT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/compare-litellm", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--quick", action="store_const", const="quick", dest="mode", default="default"
    )
    parser.add_argument("--output", type=Path, help="where the JSON goes")
    parser.add_argument(
        "--litellm", type=Path, required=True, help="the litellm executable (in its own venv)"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="LiteLLM's --num_workers (default: 1, its own)"
    )
    parser.add_argument(
        "--upstream-model",
        default=DEFAULT_UPSTREAM_MODEL,
        help="the model LiteLLM is told the upstream serves, as provider/model (default: "
        f"{DEFAULT_UPSTREAM_MODEL}; the fake upstream answers any)",
    )
    parser.add_argument("--install-seconds", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--requirement", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not os.access(args.litellm, os.X_OK):
        parser.error(f"--litellm: {args.litellm} is not an executable")
    if args.workers < 1:
        parser.error("--workers: at least 1")
    options = Options(
        mode=args.mode,
        litellm=args.litellm.absolute(),
        workers=args.workers,
        upstream_model=args.upstream_model,
        install_s=args.install_seconds,
        requirement=args.requirement,
    )
    output = args.output or REPO / "bench" / "results" / "litellm-latest.json"
    # trio turns SIGINT into KeyboardInterrupt only if its handler is Python's default,
    # which a shell leaves ignored in a background job.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    try:
        results = trio.run(run, options)
    except BenchError as exc:
        print(f"compare-litellm: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"compare-litellm: talking to the fake upstream: {exc}", file=sys.stderr)
        return 1
    except trio.TooSlowError:
        print("compare-litellm: the load client did not answer in time", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("compare-litellm: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(summary(results))
    print(f"\n{results['seconds']:g} s; every figure: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
