"""A daemon in a fleet ([shared], CONTRACT.md 5.6-5.7), in process against a real Valkey:
its limits leased from the engine, ``/v1/limits`` and status saying so, ``degraded`` while
the engine does not answer, and back by itself."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import trio

from openclawd import config
from openclawd.daemon import Daemon
from openclawd.lifecycle import State
from openclawd.notify import Notifier

from ..conftest import daemon_tables, unix_request
from ..daemon.test_daemon import start_ready
from ..valkey import ValkeyCluster, ValkeyServer


async def limits_of(runtime: Path) -> dict[str, object]:
    status, _, body = await trio.to_thread.run_sync(
        unix_request, runtime / "control.sock", "GET", "/v1/limits"
    )
    assert status == 200
    assert isinstance(body, dict)
    return body


async def test_a_daemon_leases_its_limits_and_degrades_while_the_engine_is_gone(
    runtime_dir: Path, valkey: ValkeyServer, namespace: str, log_text: io.StringIO
) -> None:
    tables = daemon_tables(
        runtime_dir,
        shared={
            "url": valkey.url,
            "password_file": str(valkey.password_file),
            "namespace": namespace,
            "on_failure": "local",
            "expected_daemons": 2,
        },
        clients={"billing": {"uids": [1001], "requests_per_minute": 600}},
    )
    daemon = Daemon(config.parse(tables, source=str(runtime_dir / "x.toml")), Notifier(None))
    lifecycle = daemon.lifecycle
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await start_ready(nursery, daemon)
            while lifecycle.state is not State.READY:  # degraded until the engine answers
                await lifecycle.wait_changed()
            body = await limits_of(runtime_dir)
            assert body["shared"] == {"mode": "shared", "reachable": True}
            assert lifecycle.state is State.READY

            valkey.stop()
            while lifecycle.state is not State.DEGRADED:
                await lifecycle.wait_changed()
            assert "shared limits' engine unreachable" in lifecycle.degradations()
            body = await limits_of(runtime_dir)
            assert body["shared"] == {"mode": "local", "reachable": False}

            valkey.start()
            while lifecycle.state is not State.READY:
                await lifecycle.wait_changed()
            body = await limits_of(runtime_dir)
            assert body["shared"] == {"mode": "shared", "reachable": True}
            shown = [json.dumps(body)]
            for target in ("/v1/status", "/metrics"):
                _, _, answer = await trio.to_thread.run_sync(
                    unix_request, runtime_dir / "control.sock", "GET", target
                )
                shown.append(answer.decode() if isinstance(answer, bytes) else json.dumps(answer))
            nursery.cancel_scope.cancel()
    shown.append(log_text.getvalue())
    assert "event=shared.unreachable" in log_text.getvalue()
    for text in shown:  # the engine's password, nowhere
        assert valkey.password not in text


async def test_a_daemon_on_a_cluster_is_degraded_while_a_master_fails_over_then_shared(
    runtime_dir: Path, valkey_cluster: ValkeyCluster, namespace: str, log_text: io.StringIO
) -> None:
    """``[shared] cluster = true`` (CONTRACT.md 5.6): the daemon leases from the cluster;
    the master serving its limit's slot is killed: it is ``degraded`` and counts locally
    until the replica serves the slot, then shared again, by itself."""
    tables = daemon_tables(
        runtime_dir,
        shared={
            "url": valkey_cluster.url,
            "cluster": True,
            "password_file": str(valkey_cluster.password_file),
            "namespace": namespace,
            "expected_daemons": 2,
        },
        clients={"billing": {"uids": [1001], "requests_per_minute": 600}},
    )
    daemon = Daemon(config.parse(tables, source=str(runtime_dir / "x.toml")), Notifier(None))
    lifecycle = daemon.lifecycle
    key = f"{{{namespace}:client:billing:requests_per_minute}}:minute"
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            await start_ready(nursery, daemon)
            while lifecycle.state is not State.READY:
                await lifecycle.wait_changed()
            assert (await limits_of(runtime_dir))["shared"] == {"mode": "shared", "reachable": True}

            async def kill() -> None:
                await trio.to_thread.run_sync(valkey_cluster.kill_master_of, key)

            nursery.start_soon(kill)
            while lifecycle.state is not State.DEGRADED:
                await lifecycle.wait_changed()
            assert (await limits_of(runtime_dir))["shared"]["mode"] == "local"
            while lifecycle.state is not State.READY:
                await lifecycle.wait_changed()
            body = await limits_of(runtime_dir)
            assert body["shared"] == {"mode": "shared", "reachable": True}
            nursery.cancel_scope.cancel()
    assert "event=shared.unreachable" in log_text.getvalue()
    assert "event=shared.reachable" in log_text.getvalue()
    assert valkey_cluster.password not in log_text.getvalue() + json.dumps(body)


def test_a_daemon_without_a_fleet_never_imports_the_engines_client() -> None:
    """valkey-glide costs a quarter of a second to import (and starts machinery of its
    own): only a daemon with ``[shared] url`` loads it."""
    code = "import sys, openclawd.cli, openclawd.daemon; assert 'glide' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
