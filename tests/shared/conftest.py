"""Fixtures of the shared-fleet tests: real Valkey servers (tests/valkey.py), one namespace
per test, and ``target``: the session's standalone server or its cluster, for the tests that
must hold on both."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from openclawd.shared.engine import Engine, open_engine

# A daemon run in process here (test_daemon_fleet) leaves its signals blocked, as the
# daemon tests' does: the same fixture puts the mask back (else every process a later test
# starts inherits SIGTERM and SIGINT blocked, and cannot be stopped).
from ..daemon.conftest import restore_signal_mask  # noqa: F401 - an autouse fixture
from ..valkey import (  # noqa: F401 - fixtures
    ValkeyCluster,
    ValkeyServer,
    _valkey_cluster_session,
    namespace,
    shared_valkey,
    valkey,
    valkey_cluster,
)


@dataclass(frozen=True, slots=True)
class Target:
    """An engine to test against: how the daemon would reach it, and an admin's CLI."""

    server: ValkeyServer | ValkeyCluster
    cluster: bool

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def password(self) -> str:
        return self.server.password

    def cli(self, *args: str) -> str:
        return self.server.cli(*args)

    def time(self) -> float:
        """The engine's clock (``TIME``), in seconds."""
        seconds, micros = self.cli("TIME").split()
        return int(seconds) + int(micros) / 1e6


@pytest.fixture(params=["standalone", "cluster"])
def target(request: pytest.FixtureRequest) -> Target:
    if request.param == "standalone":
        return Target(request.getfixturevalue("shared_valkey"), cluster=False)
    return Target(request.getfixturevalue("valkey_cluster"), cluster=True)


@pytest.fixture
async def engine(target: Target, namespace: str) -> AsyncIterator[Engine]:  # noqa: F811
    """A client of ``target`` in the test's own namespace, with the right password."""
    async with open_engine(
        target.url, password=target.password, cluster=target.cluster, namespace=namespace
    ) as opened:
        yield opened
