"""Helpers for tests that run the real daemon process over a real bao: its config, curl
against its sockets (the operator's tool), and reading its Prometheus metrics."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from prometheus_client.parser import text_string_to_metric_families

from ..bao import BaoServer
from ..conftest import DaemonProcess, daemon_tables, render_toml
from ..fake_upstream import FakeUpstream, open_fake_upstream
from .harness import unique_vault_path


def write_config(
    runtime: Path,
    bao: BaoServer,
    upstream_url: str,
    vault_path: str,
    ws_url: str = "",
    **tables: dict[str, Any],
) -> Path:
    """A daemon config over ``bao`` (root token) with one provider, ``openai``."""
    token_file = runtime / "vault-token"
    token_file.write_text(bao.root_token + "\n")
    config = daemon_tables(
        runtime,
        vault={"addr": bao.addr, "auth": "token", "token_file": str(token_file)},
        shutdown={"drain_timeout_s": 10.0},
        logging={"level": "info"},
    )
    for name, table in tables.items():
        config[name] = {**config.get(name, {}), **table}
    config["providers.openai"] = {
        "base_url": upstream_url,
        "vault_path": vault_path,
        "ws_url": ws_url,
    }
    path = runtime / "openclawd.toml"
    path.write_text(render_toml(config))
    return path


@asynccontextmanager
async def running_daemon(
    bao: BaoServer,
    runtime: Path,
    start_daemon: Callable[..., DaemonProcess],
    key: str,
    **tables: dict[str, Any],
) -> AsyncIterator[tuple[DaemonProcess, FakeUpstream, str]]:
    """The daemon process, READY, with ``key`` in Vault (at the path it yields) for its
    provider ``openai``, whose fake upstream takes that key only."""
    vault_path = unique_vault_path()
    await trio.to_thread.run_sync(lambda: bao.write(vault_path, api_key=key))
    async with open_fake_upstream(expected_key=key) as upstream:
        config = write_config(runtime, bao, upstream.url, vault_path, **tables)
        daemon = start_daemon(config)
        await trio.to_thread.run_sync(daemon.wait_ready)
        yield daemon, upstream, vault_path


async def curl(
    target: str,
    *,
    unix_socket: str | Path | None = None,
    base: str = "http://openclawd",
    method: str = "GET",
    data: str | None = None,
    headers: tuple[str, ...] = (),
) -> tuple[int, str]:
    """Run curl as an operator would; returns the status and the body."""
    command = ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", "-X", method]
    if unix_socket is not None:
        command += ["--unix-socket", str(unix_socket)]
    if data is not None:
        command += ["--data", data]
    for header in headers:
        command += ["-H", header]
    result = await trio.run_process(
        [*command, f"{base}{target}"], capture_stdout=True, capture_stderr=True, check=False
    )
    assert result.returncode == 0, result.stderr.decode()
    body, _, status = result.stdout.decode().rpartition("\n")
    return int(status), body


async def curl_json(control: str | Path, target: str, **kwargs: Any) -> tuple[int, Any]:
    status, body = await curl(target, unix_socket=control, **kwargs)
    return status, json.loads(body)


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name`` with exactly ``labels`` in Prometheus ``text``,
    or None if there is no such sample."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None
