"""check-config explains token control (openclawd/explain.py, CONTRACT.md section 5): each
client's match, allow-lists and limits as rates, provider limits, routes and their model
rewrites, how tokens are charged, and whether limits are shared; as comments, so the
effective config it follows still parses as the same config."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from openclawd import config, explain

from .conftest import daemon_tables, render_toml
from .test_cli import run_cli

TABLES: dict[str, Any] = {
    "vault": {"addr": "http://127.0.0.1:8200", "token_file": "/run/credentials/vault-token"},
    "providers": {
        "openai": {
            "base_url": "https://api.openai.com",
            "vault_path": "openclawd/openai",
            "limits": {"requests_per_minute": 6000},
        },
        "openai_eu": {"base_url": "https://eu.example", "vault_path": "openclawd/eu"},
    },
    "clients": {
        "billing": {
            "uids": [1001],
            "units": ["billing.service"],
            "providers": ["chat"],
            "models": ["gpt-4o-mini"],
            "tokens_per_minute": 2000,
            "tokens_per_day": 1_000_000,
        },
        "batch": {"gids": [2000]},
    },
    "routes": {
        "chat": {
            "providers": ["openai", "openai_eu"],
            "models": {"openai_eu": {"gpt-4o-mini": "gpt-4o-mini-eu"}},
        }
    },
    "limits": {"requests_per_minute": 120, "default_completion_tokens": 512},
}


def explained(**tables: Any) -> list[str]:
    text = explain.token_control(config.parse({**TABLES, **tables}))
    assert all(line.startswith("#") for line in text.splitlines() if line)
    return [line.removeprefix("#").strip() for line in text.splitlines()]


def test_clients_limits_and_routes_are_explained() -> None:
    lines = explained()
    assert (
        "client billing: a peer with uid 1001 or unit billing.service; may use chat; gpt-4o-mini"
    ) in lines
    assert (
        "limits: tokens_per_minute 2000 (at most 2000 at once, refilled 33.33 a second); "
        "tokens_per_day 1000000 (a budget per UTC day)"
    ) in lines
    assert (
        "client batch: a peer with gid 2000; may use every provider and route; any model" in lines
    )
    assert "limits: none of its own" in lines
    assert "client default (a peer no client matches): may use everything; no limits" in lines
    assert (
        "[limits] requests_per_minute 120: per peer uid, for clients without limits of their own"
    ) in lines
    assert (
        "provider openai: requests_per_minute 6000 (at most 6000 at once, refilled 100 a second)"
    ) in lines
    assert not any(line.startswith("provider openai_eu") for line in lines)  # no limits set
    assert (
        "route chat: tries openai then openai_eu; "
        "model rewrites: openai_eu: gpt-4o-mini -> gpt-4o-mini-eu"
    ) in lines
    assert any("else 512), then corrected to the reported usage" in line for line in lines)
    assert "no [shared] url: every limit is this daemon's alone" in lines


def test_a_default_client_of_the_config_is_not_explained_twice() -> None:
    lines = explained(clients={"default": {"requests_per_minute": 60}})
    assert not any(line.startswith("client default (a peer") for line in lines)
    assert (
        "client default: a peer with nobody (no uids, gids or units); "
        "may use every provider and route; any model"
    ) in lines
    assert ("limits: requests_per_minute 60 (at most 60 at once, refilled 1 a second)") in lines


def test_a_fleet_and_its_failure_policy_are_explained() -> None:
    shared = {"url": "valkey://valkey.internal:6380", "cluster": True, "expected_daemons": 50}
    lines = explained(shared=shared)
    assert (
        "shared: every limit above and the upstreams' headroom are shared by every daemon "
        'using the cluster (seed node) valkey.internal:6380 with namespace "openclawd"'
    ) in lines
    assert (
        "while it does not answer: each daemon keeps limit / 50 (expected_daemons) alone" in lines
    )
    refusing = explained(shared={"url": "redis://127.0.0.1:6379", "on_failure": "refuse"})
    assert "while it does not answer: requests under a shared limit are refused" in refusing


def test_check_config_prints_the_explanation_after_a_config_that_still_parses(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    password = tmp_path / "engine-password"
    password.write_text("hunter2-engine-password\n")
    path = write_config(
        render_toml(
            daemon_tables(
                tmp_path,
                shared={"url": "redis://127.0.0.1:6379", "password_file": str(password)},
            )
        )
        + "[clients.billing]\nuids = [1001]\ntokens_per_minute = 2000\n"
    )
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "#   client billing: a peer with uid 1001;" in result.stdout
    assert "#   shared: every limit above" in result.stdout
    assert "hunter2-engine-password" not in result.stdout + result.stderr
    reparsed = config.parse(tomllib.loads(result.stdout), source=str(path))
    assert reparsed.clients["billing"].tokens_per_minute == 2000
