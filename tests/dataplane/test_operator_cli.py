"""The operators' commands against the real daemon process (CONTRACT.md 6): `openclawd
status | drain | resume | rotate | limits` as an operator types them, their human summary
and `--json`, the exit codes, and no key in anything they print."""

from __future__ import annotations

import hashlib
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import trio

from ..bao import BaoServer, free_port
from ..conftest import DaemonProcess, daemon_tables, leak_forms, render_toml
from .daemon_process import running_daemon

KEY = "sk-opctl-0001-aaaaaaaaaaaaaaaaaaaa"
NEW_KEY = "sk-opctl-0002-bbbbbbbbbbbbbbbbbbbb"
StartDaemon = Callable[..., DaemonProcess]


def fingerprint(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:12]


async def openclawd(*argv: str) -> tuple[int, str, str]:
    """The command as an operator runs it: exit code, stdout, stderr."""
    result = await trio.run_process(
        [sys.executable, "-m", "openclawd", *argv],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_an_operator_session_with_the_commands(
    shared_bao: BaoServer, runtime_dir: Path, start_daemon: StartDaemon
) -> None:
    printed: list[str] = []

    async def ok(*argv: str) -> str:
        code, out, err = await openclawd(*argv)
        printed.append(out + err)
        assert (code, err) == (0, ""), out + err
        return out

    limits = {"providers.openai.limits": {"requests_per_minute": 600}}
    with trio.fail_after(90):
        async with running_daemon(shared_bao, runtime_dir, start_daemon, KEY, **limits) as (
            daemon,
            up,
            vault_path,
        ):
            config = ("--config", str(daemon.config))  # the control socket is read from it
            lines = (await ok("status", *config)).splitlines()
            assert lines[0] == "state        ready"
            assert lines[2] == "connections  0 clients, 0 in flight, 0 realtime"
            assert lines[3].startswith(f"vault        reachable, {shared_bao.addr} (token)")
            assert lines[-1].split() == ["openai", "v1", fingerprint(KEY), "1", "closed", "-"]
            body = json.loads(await ok("status", *config, "--json"))
            assert body["providers"]["openai"]["key"]["fingerprint"] == fingerprint(KEY)

            await trio.to_thread.run_sync(lambda: shared_bao.write(vault_path, api_key=NEW_KEY))
            out = await ok("rotate", "--provider", "openai", *config)
            assert out.splitlines()[1].split() == ["openai", "1", "2", "yes"]
            rotated = json.loads(await ok("rotate", *config, "--json"))
            assert rotated == {
                "providers": {"openai": {"from_version": 2, "to_version": 2, "changed": False}}
            }
            assert fingerprint(NEW_KEY) in await ok("status", *config)

            limits_out = await ok("limits", *config)
            assert "provider  openai  requests_per_minute  0/600" in limits_out
            assert json.loads(await ok("limits", *config, "--json"))["shared"] == {
                "mode": "local",
                "reachable": None,
            }

            control = str(runtime_dir / "control.sock")
            out = await ok("drain", "--deadline-s", "30", "--control", control)
            assert out == "state      draining\nin flight  0\ndeadline   30 s\n"
            assert (await ok("status", *config)).startswith("state        draining\n")
            assert await ok("resume", "--control", control) == "state  ready\n"
            assert (await ok("status", *config)).startswith("state        ready\n")

            code, out, err = await openclawd("rotate", "--provider", "nope", *config)
            assert (code, out) == (1, "")
            assert err == (
                "openclawd: rotate: the daemon answered 404 unknown_provider: unknown provider\n"
            )
            daemon.signal(signal.SIGTERM)
            assert await trio.to_thread.run_sync(daemon.wait) == 0

    code, out, err = await openclawd("status", "--config", str(daemon.config))
    assert (code, out) == (1, "")
    control = runtime_dir / "control.sock"
    assert err == f"openclawd: no daemon answers on {control} (no such socket)\n"
    for key in (KEY, NEW_KEY):
        for form in leak_forms(key):
            assert not any(form in text for text in printed)


async def test_rotate_with_vault_unreachable_exits_1_with_the_daemons_message(
    runtime_dir: Path, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    token = tmp_path / "vault-token"
    token.write_text("hvs.SECRET-opctl-token\n")
    addr = f"http://127.0.0.1:{free_port()}"
    config = runtime_dir / "openclawd.toml"
    tables = daemon_tables(
        runtime_dir,
        vault={"addr": addr, "auth": "token", "token_file": str(token)},
        **{
            "providers.openai": {
                "base_url": "http://127.0.0.1:1",
                "vault_path": "oc/openai",
                "required": False,
            }
        },
    )
    config.write_text(render_toml(tables))
    with trio.fail_after(60):
        daemon = start_daemon(config)
        await trio.to_thread.run_sync(daemon.wait_ready)
        code, out, err = await openclawd("rotate", "--config", str(config))
        assert (code, out) == (1, "")
        assert err.startswith(
            "openclawd: rotate: the daemon answered 503 vault_unreachable: "
            "the keys in force are kept: "
        )
        assert addr in err
        code, out, err = await openclawd("status", "--config", str(config))
        assert code == 0, err
        assert "vault        UNREACHABLE, " in out
        assert out.splitlines()[-1].split() == ["openai", "-", "no", "key", "-", "closed", "-"]
        assert "hvs.SECRET" not in out + err
        daemon.signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(daemon.wait) == 0
