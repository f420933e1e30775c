"""Seeing token control (CONTRACT.md 5.7): ``GET /v1/limits``, the status's ``shared``,
and the metrics, from the daemon's own counting (a ``Daemon`` built, not run: its limits
are spent directly)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import trio
import trio.testing

from openclawd import config
from openclawd.control import create_app
from openclawd.daemon import Daemon
from openclawd.errors import RateLimitedError
from openclawd.notify import Notifier
from openclawd.protocol.exchange import Ask, Exchange
from openclawd.protocol.limits import utc_day

from ..conftest import daemon_tables

CLIENTS = {
    "billing": {"uids": [1001], "tokens_per_minute": 1000, "tokens_per_day": 50000},
    "ops": {"gids": [50], "providers": ["openai"]},
}


def make_daemon(runtime: Path) -> Daemon:
    tables = daemon_tables(
        runtime,
        vault={"addr": "http://127.0.0.1:1", "auth": "token", "token_file": str(runtime / "t")},
        providers={
            "openai": {
                "base_url": "https://api.openai.test",
                "vault_path": "openclawd/openai",
                "limits": {"requests_per_minute": 100},
            }
        },
        clients=CLIENTS,
    )
    (runtime / "t").write_text("token\n")
    cfg = config.parse(tables, source=str(runtime / "x.toml"))
    return Daemon(cfg, Notifier(None))


async def test_limits_show_what_each_set_limit_used_and_metrics_count_it(
    runtime_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    daemon = make_daemon(runtime_dir)
    billing = daemon.config.clients["billing"]
    admission = daemon.channels.admission
    today = utc_day(time.time())[0]
    ended = Exchange(answers_after_head=True)
    ended.charge = admission.admit_request(Ask(1001, billing, "openai", tokens=300, day=today), 0.0)
    ended.responded(200)
    ended.usage = {"prompt_tokens": 120, "completion_tokens": 30}
    ended.finished()
    ended.settle(0.0, today)
    try:
        admission.admit_request(Ask(1001, billing, "openai", tokens=5000, day=today), 0.0)
    except RateLimitedError:
        pass
    else:
        raise AssertionError("5,000 tokens passed a limit of 1,000")

    app = create_app(daemon)
    client = app.test_client()
    answer = await client.get("/v1/limits")
    assert answer.status_code == 200
    body = json.loads(await answer.get_data())
    assert body["shared"] == {"mode": "local", "reachable": None}
    assert body["clients"] == {
        "billing": {
            "tokens_per_minute": {"limit": 1000, "used": 150},
            "tokens_per_day": {
                "limit": 50000,
                "used": body["clients"]["billing"]["tokens_per_day"]["used"],
            },
        },
        "ops": {},
    }
    assert body["providers"]["openai"]["requests_per_minute"] == {"limit": 100, "used": 1}
    assert body["providers"]["openai"]["upstream"] == {
        "remaining_requests": None,
        "remaining_tokens": None,
        "reset_s": None,
    }

    status = json.loads(await (await client.get("/v1/status")).get_data())
    assert status["shared"] == {"mode": "local", "reachable": None}

    text = (await (await client.get("/metrics")).get_data()).decode()
    refusal = '{limit="tokens_per_minute",name="billing",scope="client"} 1.0'
    assert f"openclawd_limit_refusals_total{refusal}" in text
    assert (
        'openclawd_client_requests_total{client="billing",provider="openai",status="200"} 1.0'
        in text
    )
    assert (
        'openclawd_client_tokens_total{client="billing",kind="prompt",provider="openai"} 120.0'
        in text
    )
    assert (
        "openclawd_route_fallbacks_total" not in text or "# TYPE openclawd_route_fallbacks" in text
    )
    assert "openclawd_shared_reachable" not in text  # no engine configured
