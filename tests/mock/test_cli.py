"""``openclawd mock-provider`` as a subprocess: usage errors, listening, the key source
(any key, or the one Vault holds), and a clean exit on SIGINT and SIGTERM."""

from __future__ import annotations

import functools
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from ..bao import BaoServer, free_port

Bao = BaoServer

KEY = "sk-mock-cli-0001"
OTHER_KEY = "sk-mock-cli-0002"
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0


def environ(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A run expected to end by itself (usage and startup errors)."""
    return subprocess.run(
        [sys.executable, "-m", "openclawd", "mock-provider", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env if env is not None else environ(),
    )


class MockProcess:
    """``openclawd mock-provider`` running, its stderr in a file."""

    def __init__(self, args: list[str], stderr_path: Path, env: dict[str, str]) -> None:
        self.stderr_path = stderr_path
        self._stderr = open(stderr_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "openclawd", "mock-provider", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            env=env,
        )

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait_listening(self) -> str:
        """The URL it logs once it listens."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            found = re.search(r"event=mock\.listening url=(\S+)", self.stderr)
            if found:
                return found.group(1)
            code = self.proc.poll()
            assert code is None, f"exited with {code} before listening:\n{self.stderr}"
            assert time.monotonic() < deadline, f"not listening:\n{self.stderr}"
            time.sleep(0.02)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


@pytest.fixture
def start_mock(tmp_path: Path) -> Iterator[Callable[..., MockProcess]]:
    started: list[MockProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> MockProcess:
        process = MockProcess(
            list(args),
            tmp_path / f"stderr-{len(started)}.log",
            env if env is not None else environ(),
        )
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            process.close()


def get_models(url: str, key: str | None) -> httpx.Response:
    headers = {} if key is None else {"authorization": f"Bearer {key}"}
    return httpx.get(f"{url}/v1/models", headers=headers, timeout=5.0, trust_env=False)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_without_vault_any_key_is_accepted_and_a_signal_stops_it(
    start_mock: Callable[..., MockProcess], signum: signal.Signals
) -> None:
    port = free_port()
    mock = start_mock("--port", str(port), "--chunk-delay-s", "0")
    url = mock.wait_listening()
    assert url == f"http://127.0.0.1:{port}"
    ok = get_models(url, "anything-at-all")
    refused = get_models(url, None)
    assert ok.status_code == 200
    assert ok.json()["object"] == "list"
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "missing_api_key"
    assert re.search(r"level=warning .*event=mock\.any_key", mock.stderr)

    mock.proc.send_signal(signum)
    assert mock.proc.wait(timeout=STOP_TIMEOUT_S) == 0, mock.stderr
    assert f"event=mock.stopping signal={signum.name}" in mock.stderr
    with pytest.raises(httpx.ConnectError):
        get_models(url, "anything-at-all")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--host", "0.0.0.0"], "'0.0.0.0' is not a loopback address"),
        (["--host", "192.0.2.1"], "is not a loopback address"),
        (["--host", "example.com"], "is not a loopback address"),
        (["--port", "70000"], "'70000' is not a port number"),
        (["--port", "-1"], "is not a port number"),
        (["--port", "http"], "is not a port number"),
        (["--chunk-delay-s", "-1"], "'-1' is not a number of seconds"),
        (["--chunk-delay-s", "nan"], "is not a number of seconds"),
        (["--chunk-delay-s", "inf"], "is not a number of seconds"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_usage_exits_2_with_a_message(args: list[str], message: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "mock.listening" not in result.stderr


def test_a_taken_port_exits_1(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run_cli("--port", str(port))
    assert result.returncode == 1, result.stderr
    assert f"openclawd mock-provider: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("addr", [None, "", "127.0.0.1:8200"], ids=["unset", "empty", "no-scheme"])
def test_vault_path_without_a_vault_address_exits_2(addr: str | None) -> None:
    env = environ(VAULT_TOKEN="root") if addr is None else environ(VAULT_ADDR=addr)
    result = run_cli("--vault-path", "mock/key", env=env)
    assert result.returncode == 2, result.stderr
    assert "--vault-path needs a Vault address" in result.stderr
    assert "mock.listening" not in result.stderr


def test_with_vault_only_the_vault_key_is_accepted(
    shared_bao: Bao, start_mock: Callable[..., MockProcess]
) -> None:
    path = "mock-cli/accepted"
    shared_bao.write(path, api_key=OTHER_KEY, token=KEY)
    env = environ(VAULT_ADDR=shared_bao.addr, VAULT_TOKEN=shared_bao.root_token)
    mock = start_mock("--vault-path", path, "--key-field", "token", env=env)
    url = mock.wait_listening()
    chat = functools.partial(
        httpx.post,
        f"{url}/v1/chat/completions",
        json={"model": "mock-1", "messages": [{"role": "user", "content": "hi"}]},
        timeout=5.0,
        trust_env=False,
    )
    accepted = chat(headers={"authorization": f"Bearer {KEY}"})
    other_field = chat(headers={"authorization": f"Bearer {OTHER_KEY}"})
    made_up = get_models(url, "anything-at-all")
    assert accepted.status_code == 200
    assert "key version 1 from Vault" in accepted.json()["choices"][0]["message"]["content"]
    assert other_field.status_code == 401
    assert other_field.json()["error"]["code"] == "invalid_api_key"
    assert made_up.status_code == 401
    assert "mock.any_key" not in mock.stderr

    shared_bao.write(path, token=OTHER_KEY)
    assert get_models(url, KEY).status_code == 401
    assert get_models(url, OTHER_KEY).status_code == 200

    mock.proc.send_signal(signal.SIGTERM)
    assert mock.proc.wait(timeout=STOP_TIMEOUT_S) == 0, mock.stderr
    for key in (KEY, OTHER_KEY, shared_bao.root_token + "\n"):
        assert key not in mock.stderr


@pytest.mark.parametrize("token", ["not-a-valid-token", None], ids=["wrong", "unset"])
def test_a_token_vault_refuses_exits_1_naming_vault(shared_bao: Bao, token: str | None) -> None:
    env = environ() if token is None else environ(VAULT_TOKEN=token)
    result = run_cli("--vault-path", "mock-cli/any", "--vault-addr", shared_bao.addr, env=env)
    assert result.returncode == 1, result.stderr
    assert "openclawd mock-provider: cannot read the key from Vault" in result.stderr
    assert "mock.listening" not in result.stderr
    assert "Traceback" not in result.stderr
    if token is not None:
        assert token not in result.stderr
