"""Who is calling (clients.py, CONTRACT.md 5.1): a connection's client from its uid, gid
or systemd unit, first match in file order, else ``default``; what it may use."""

from __future__ import annotations

from pathlib import Path

import pytest

from openclawd.clients import identify, unit_of
from openclawd.config import ClientConfig
from openclawd.errors import ForbiddenError
from openclawd.local.unix import PeerCredentials
from openclawd.protocol.limits import check_allowed, has_limits

CGROUP_V2 = "0::/system.slice/billing.service\n"
USER_UNIT = "0::/user.slice/user-1000.slice/user@1000.service/app.slice/reports.service\n"
CGROUP_V1 = "12:pids:/system.slice/x.service\n1:name=systemd:/system.slice/cron.service\n"


def proc_with(tmp_path: Path, pid: int, text: str) -> Path:
    (tmp_path / str(pid)).mkdir()
    (tmp_path / str(pid) / "cgroup").write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("text", "unit"),
    [
        (CGROUP_V2, "billing.service"),
        (USER_UNIT, "reports.service"),  # the innermost unit, not user@1000.service
        ("0::/user.slice/user-1000.slice/session-3.scope\n", "session-3.scope"),
        (CGROUP_V1, "x.service"),
        ("0::/\n", None),
        ("", None),
    ],
)
def test_unit_of(tmp_path: Path, text: str, unit: str | None) -> None:
    assert unit_of(42, proc=proc_with(tmp_path, 42, text)) == unit


def test_a_gone_process_has_no_unit(tmp_path: Path) -> None:
    assert unit_of(42, proc=tmp_path) is None


def clients(*configs: ClientConfig) -> dict[str, ClientConfig]:
    return {c.name: c for c in configs}


def test_the_first_client_that_matches_in_file_order() -> None:
    both = clients(
        ClientConfig(name="ops", gids=(50,)),
        ClientConfig(name="billing", uids=(1001,)),
    )
    assert identify(PeerCredentials(pid=1, uid=1001, gid=50), both).name == "ops"
    assert identify(PeerCredentials(pid=1, uid=1001, gid=7), both).name == "billing"


def test_a_peer_that_matches_none_is_default() -> None:
    configured = clients(ClientConfig(name="billing", uids=(1001,)))
    assert identify(PeerCredentials(pid=1, uid=5, gid=5), configured).name == "default"
    with_default = clients(
        ClientConfig(name="billing", uids=(1001,)),
        ClientConfig(name="default", requests_per_minute=10),
    )
    found = identify(PeerCredentials(pid=1, uid=5, gid=5), with_default)
    assert (found.name, found.requests_per_minute) == ("default", 10)


def test_a_client_by_its_systemd_unit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import openclawd.clients as module

    proc = proc_with(tmp_path, 77, CGROUP_V2)
    monkeypatch.setattr(module, "unit_of", lambda pid: unit_of(pid, proc=proc))
    configured = clients(ClientConfig(name="billing", units=("billing.service",)))
    assert identify(PeerCredentials(pid=77, uid=5, gid=5), configured).name == "billing"
    assert identify(PeerCredentials(pid=78, uid=5, gid=5), configured).name == "default"


def test_allow_lists() -> None:
    client = ClientConfig(name="billing", providers=("openai", "chat"), models=("gpt-4o-mini",))
    check_allowed(client, "chat", "gpt-4o-mini")
    check_allowed(client, "openai", None)  # a request without a model
    with pytest.raises(ForbiddenError) as caught:
        check_allowed(client, "anthropic", "gpt-4o-mini")
    assert (caught.value.code, caught.value.http_status, caught.value.close_code) == (
        "forbidden",
        403,
        1008,
    )
    assert "anthropic" not in str(caught.value)
    with pytest.raises(ForbiddenError, match="may not use this model"):
        check_allowed(client, "openai", "sk-proj-not-a-model")
    check_allowed(ClientConfig(name="free"), "anything", "any-model")


def test_has_limits() -> None:
    assert not has_limits(ClientConfig(name="a"))
    assert has_limits(ClientConfig(name="a", tokens_per_day=1))
