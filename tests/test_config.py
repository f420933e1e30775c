"""Config parsing: every key path in every message, every problem at once, pure parsing."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from openclawd import config
from openclawd.errors import ConfigError

from .conftest import REPO

PROVIDER = {"base_url": "https://api.example.com", "vault_path": "openclawd/example"}
VAULT = {"addr": "https://vault.example:8200", "token_file": "/run/secrets/vault-token"}


def problems_of(mapping: dict[str, Any], environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.parse(mapping, source="/etc/oc.toml", environ=environ or {})
    assert info.value.source == "/etc/oc.toml"
    return [str(p) for p in info.value.problems]


def test_empty_mapping_gives_every_default() -> None:
    cfg = config.parse({})
    assert cfg.listen.socket == "/run/openclawd/openclawd.sock"
    assert cfg.listen.mode == 0o660
    assert cfg.listen.group == ""
    assert cfg.listen.allowed_uids == ()
    assert cfg.listen.allowed_gids == ()
    assert cfg.listen.max_connections == 1024
    assert cfg.listen.max_message_bytes == 1048576
    assert cfg.listen.max_inflight_per_connection == 64
    assert cfg.listen.ping_interval_s == 20.0
    assert cfg.listen.ping_timeout_s == 20.0
    assert cfg.control.socket == "/run/openclawd/control.sock"
    assert cfg.control.mode == 0o660
    assert cfg.control.tcp == ""
    assert cfg.control.token_file == ""
    assert cfg.limits.requests_per_minute == 0
    assert cfg.shutdown.drain_timeout_s == 30.0
    assert cfg.logging.level == "info"
    assert cfg.logging.format == "logfmt"
    assert cfg.vault.mount == "secret"
    assert cfg.vault.refresh_interval_s == 30
    assert dict(cfg.providers) == {}
    assert cfg.limits.default_completion_tokens == 1024
    assert (dict(cfg.clients), dict(cfg.routes)) == ({}, {})
    s = cfg.shared
    assert (s.url, s.cluster, s.password_file) == ("", False, "")
    assert (s.namespace, s.on_failure, s.expected_daemons) == ("openclawd", "local", 1)


def test_provider_defaults_match_the_contract() -> None:
    cfg = config.parse({"vault": VAULT, "providers": {"openai": PROVIDER}})
    p = cfg.providers["openai"]
    assert (p.auth_header, p.auth_scheme, p.key_field, p.required) == (
        "Authorization",
        "Bearer",
        "api_key",
        True,
    )
    assert (p.connect_timeout_s, p.read_timeout_s, p.total_timeout_s) == (10.0, 60.0, 600.0)
    assert (p.max_retries, p.max_connections, p.allow_insecure) == (2, 100, False)
    assert p.base_url == "https://api.example.com"
    assert p.ws_url == ""
    assert (p.limits.requests_per_minute, p.limits.tokens_per_minute) == (0, 0)


def uncommented(text: str) -> str:
    """The example with its commented-out tables and keys (``# [table]``, ``# key = ...``)
    uncommented; prose comments stay comments."""
    return re.sub(r"(?m)^# (\[.*\]|[a-z_]+ = .*)$", r"\1", text)


def test_the_shipped_example_parses_and_names_every_key() -> None:
    path = REPO / "etc" / "openclawd.toml"
    cfg = config.load(str(path), environ={})
    assert cfg.source == str(path)
    assert cfg.providers["openai"].vault_path == "openclawd/openai"
    # Token control is shown commented out: as shipped, it is off.
    assert (dict(cfg.clients), dict(cfg.routes)) == ({}, {})
    assert cfg.shared == config.SharedConfig()
    assert cfg.tracing == config.TracingConfig()  # tracing is off as shipped
    assert cfg.providers["openai"].limits == config.ProviderLimits()
    # The example shows every key of every table, the commented-out ones included, so it
    # documents the whole config; uncommented, it parses.
    mapping = tomllib.loads(uncommented(path.read_text()))
    full = config.parse(mapping, environ={})
    for section, cls in (
        ("listen", config.ListenConfig),
        ("control", config.ControlConfig),
        ("vault", config.VaultConfig),
        ("limits", config.LimitsConfig),
        ("shutdown", config.ShutdownConfig),
        ("logging", config.LoggingConfig),
        ("shared", config.SharedConfig),
        ("tracing", config.TracingConfig),
    ):
        assert set(mapping[section]) == set(cls.__dataclass_fields__), section
    assert set(mapping["providers"]["openai"]) == set(config.ProviderConfig.__dataclass_fields__)
    limits = mapping["providers"]["openai"]["limits"]
    assert set(limits) == set(config.ProviderLimits.__dataclass_fields__)
    named = {"name"}  # a table's name is its key, not a key in it
    assert set(mapping["routes"]["chat"]) | named == set(config.RouteConfig.__dataclass_fields__)
    for client in ("billing", "default"):
        keys = set(mapping["clients"][client]) | named
        if client == "default":
            keys |= {"uids", "gids", "units"}  # the default client takes none of them
        assert keys == set(config.ClientConfig.__dataclass_fields__), client
    assert list(full.clients) == ["billing", "default"]
    assert full.routes["chat"].providers == ("openai", "openai_eu")
    assert full.shared.url == "rediss://valkey.internal:6379"
    assert full.tracing.otlp_endpoint == "http://127.0.0.1:4318"


def test_config_is_frozen() -> None:
    cfg = config.parse({})
    with pytest.raises(AttributeError):
        cfg.listen.socket = "/tmp/x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("mapping", "expected"),
    [
        ({"lisen": {}}, "lisen: unknown key"),
        ({"listen": {"sockett": "/x"}}, "listen.sockett: unknown key"),
        (
            {"vault": VAULT, "providers": {"openai": {**PROVIDER, "base_ur": "x"}}},
            "providers.openai.base_ur: unknown key",
        ),
    ],
)
def test_unknown_keys_are_named_by_full_path(mapping: dict[str, Any], expected: str) -> None:
    assert expected in problems_of(mapping)


@pytest.mark.parametrize(
    ("mapping", "expected"),
    [
        (
            {"listen": {"max_connections": "10"}},
            "listen.max_connections: must be an integer, not a string",
        ),
        (
            {"listen": {"max_connections": True}},
            "listen.max_connections: must be an integer, not a boolean",
        ),
        ({"listen": {"socket": 5}}, "listen.socket: must be a string, not an integer"),
        (
            {"listen": {"allowed_uids": [1000, "x"]}},
            "listen.allowed_uids: must hold only numeric ids (integers >= 0), not 'x'",
        ),
        ({"listen": "x"}, "listen: must be a table, not a string"),
        (
            {"vault": VAULT, "providers": {"openai": {**PROVIDER, "required": "yes"}}},
            "providers.openai.required: must be true or false, not a string",
        ),
        (
            {"shutdown": {"drain_timeout_s": "30"}},
            "shutdown.drain_timeout_s: must be a number of seconds, not a string",
        ),
        (
            {"logging": {"level": "verbose"}},
            "logging.level: must be one of 'debug', 'info', 'warning', 'error', not 'verbose'",
        ),
    ],
)
def test_wrong_types_are_named(mapping: dict[str, Any], expected: str) -> None:
    assert expected in problems_of(mapping)


def test_missing_required_provider_keys() -> None:
    problems = problems_of({"vault": VAULT, "providers": {"openai": {}}})
    assert "providers.openai.base_url: required key is missing" in problems
    assert "providers.openai.vault_path: required key is missing" in problems


def test_provider_without_vault_path() -> None:
    problems = problems_of(
        {"vault": VAULT, "providers": {"openai": {"base_url": "https://api.example.com"}}}
    )
    assert problems == ["providers.openai.vault_path: required key is missing"]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("rw-rw----", "listen.mode: must be an octal file mode like \"0660\", not 'rw-rw----'"),
        ("0968", "listen.mode: must be an octal file mode like \"0660\", not '0968'"),
        ("04660", "listen.mode: must be an octal file mode like \"0660\", not '04660'"),
        (660, 'listen.mode: must be a string of octal digits like "0660", not an integer'),
        ("0060", "listen.mode: must let the owner read and write the socket, not '0060'"),
    ],
)
def test_socket_mode_must_be_octal(mode: object, expected: str) -> None:
    assert problems_of({"listen": {"mode": mode}}) == [expected]


@pytest.mark.parametrize(("text", "value"), [("0660", 0o660), ("600", 0o600), ("0666", 0o666)])
def test_socket_mode_parses_octal(text: str, value: int) -> None:
    assert config.parse({"control": {"mode": text}}).control.mode == value


@pytest.mark.parametrize(
    ("mapping", "expected"),
    [
        (
            {"listen": {"ping_interval_s": -1}},
            "listen.ping_interval_s: must be more than zero seconds, not -1",
        ),
        (
            {"listen": {"ping_timeout_s": 0}},
            "listen.ping_timeout_s: must be more than zero seconds, not 0",
        ),
        (
            {"vault": {"refresh_interval_s": -30}},
            "vault.refresh_interval_s: must be more than zero seconds, not -30",
        ),
        (
            {"shutdown": {"drain_timeout_s": -0.5}},
            "shutdown.drain_timeout_s: must be zero or more seconds, not -0.5",
        ),
        (
            {"shutdown": {"drain_timeout_s": float("inf")}},
            "shutdown.drain_timeout_s: must be a finite number of seconds",
        ),
        ({"listen": {"max_connections": 0}}, "listen.max_connections: must be at least 1, not 0"),
        (
            {"limits": {"requests_per_minute": -1}},
            "limits.requests_per_minute: must be at least 0, not -1",
        ),
    ],
)
def test_bad_numbers(mapping: dict[str, Any], expected: str) -> None:
    assert problems_of(mapping) == [expected]


def test_integer_seconds_are_accepted_as_floats() -> None:
    cfg = config.parse({"vault": {"refresh_interval_s": 30}, "shutdown": {"drain_timeout_s": 0}})
    assert cfg.vault.refresh_interval_s == 30.0
    assert isinstance(cfg.vault.refresh_interval_s, float)
    assert cfg.shutdown.drain_timeout_s == 0.0


@pytest.mark.parametrize(
    ("key", "url"),
    [
        ("base_url", "http://api.example.com"),
        ("base_url", "http://10.1.2.3:8080"),
        ("ws_url", "ws://realtime.example.com"),
    ],
)
def test_plaintext_remote_upstream_needs_allow_insecure(key: str, url: str) -> None:
    provider = {**PROVIDER, key: url}
    assert problems_of({"vault": VAULT, "providers": {"p": provider}}) == [
        f"providers.p.{key}: plain http:// or ws:// is allowed only to loopback hosts "
        "unless allow_insecure = true"
    ]
    insecure = {**provider, "allow_insecure": True}
    allowed = config.parse({"vault": VAULT, "providers": {"p": insecure}})
    assert getattr(allowed.providers["p"], key) == url


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8080", "http://localhost:9000/v1", "http://[::1]:80", "ws://127.0.0.5"],
)
def test_plaintext_loopback_upstream_is_fine(url: str) -> None:
    key = "ws_url" if url.startswith("ws") else "base_url"
    cfg = config.parse({"vault": VAULT, "providers": {"p": {**PROVIDER, key: url}}})
    assert getattr(cfg.providers["p"], key) == url.rstrip("/")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ftp://x", "must be a http:// or https:// URL"),
        ("https://", "must name a host"),
        (
            "https://user:pw@api.example.com",
            "must not carry credentials; keys and tokens belong in Vault",
        ),
        ("https://api.example.com/?key=abc", "must not have a query string or fragment"),
        ("https://api.example.com:99999", "is not a valid URL"),
    ],
)
def test_bad_urls(url: str, expected: str) -> None:
    problems = problems_of({"vault": VAULT, "providers": {"p": {**PROVIDER, "base_url": url}}})
    assert problems == [f"providers.p.base_url: {expected}"]


@pytest.mark.parametrize(
    "addr",
    [
        "https://root:s3cr3t@vault:8200",
        "https://admin:s3cr3t/x@vault:8200",  # "/" splits the password off as a port
        "https://root:s3cr3t#frag@vault:8200",
        "https://root:s3cr3t?q@vault:8200",
    ],
)
def test_user_info_in_a_url_is_never_echoed(addr: str) -> None:
    problems = problems_of({"vault": {**VAULT, "addr": addr}})
    assert problems == ["vault.addr: must not carry credentials; keys and tokens belong in Vault"]
    from_env = problems_of({"providers": {"p": PROVIDER}}, environ={"VAULT_ADDR": addr})
    assert from_env == [
        "vault.addr: from VAULT_ADDR: must not carry credentials; keys and tokens belong in Vault"
    ]
    assert not any("s3cr3t" in p for p in problems + from_env)


def test_a_broken_section_does_not_cause_false_cross_checks() -> None:
    vault = {**VAULT, "refresh_interval_s": -1}  # addr and token_file are set
    problems = problems_of({"vault": vault, "providers": {"p": PROVIDER}})
    assert problems == ["vault.refresh_interval_s: must be more than zero seconds, not -1"]


@pytest.mark.parametrize(
    ("mapping", "expected"),
    [
        (
            {"listen": {"max_connections": 2_000_000_000}},
            "listen.max_connections: must be at most 1000000, not 2000000000",
        ),
        (
            {"listen": {"max_message_bytes": 1 << 40}},
            "listen.max_message_bytes: must be at most 1073741824, not 1099511627776",
        ),
    ],
)
def test_numbers_have_upper_bounds(mapping: dict[str, Any], expected: str) -> None:
    assert problems_of(mapping) == [expected]


def test_provider_names_must_be_url_safe() -> None:
    problems = problems_of({"vault": VAULT, "providers": {"open ai": PROVIDER}})
    assert problems == [
        "providers.open ai: provider names are 1-64 of A-Z a-z 0-9 _ - (used in URLs)"
    ]


def test_control_tcp_rules() -> None:
    assert problems_of({"control": {"tcp": "0.0.0.0:9477", "token_file": "/t"}}) == [
        "control.tcp: must be a loopback address (127.0.0.0/8 or [::1]), not '0.0.0.0'"
    ]
    assert problems_of({"control": {"tcp": "127.0.0.1"}}) == [
        'control.tcp: must be "HOST:PORT" like "127.0.0.1:9477", not \'127.0.0.1\''
    ]
    assert problems_of({"control": {"tcp": "127.0.0.1:9477"}}) == [
        "control.token_file: required when control.tcp is set"
    ]
    ok = config.parse({"control": {"tcp": "[::1]:9477", "token_file": "control-token"}})
    assert ok.control.tcp == "[::1]:9477"
    assert ok.control.token_file == "control-token"


def test_sockets_must_differ() -> None:
    same = {"listen": {"socket": "/run/x.sock"}, "control": {"socket": "/run/x.sock"}}
    assert problems_of(same) == ["control.socket: must differ from listen.socket"]


def test_vault_is_required_once_there_are_providers() -> None:
    problems = problems_of({"providers": {"openai": PROVIDER}})
    assert problems == [
        "vault.addr: required key is missing (or set VAULT_ADDR)",
        'vault.token_file: required for auth = "token" (or set VAULT_TOKEN)',
    ]


def test_vault_environment_fallbacks() -> None:
    env = {"VAULT_ADDR": "http://127.0.0.1:8200", "VAULT_TOKEN": "hvs.not-kept"}
    cfg = config.parse({"providers": {"openai": PROVIDER}}, environ=env)
    assert cfg.vault.addr == "http://127.0.0.1:8200"
    assert cfg.vault.token_file == ""
    assert "hvs.not-kept" not in repr(cfg)
    assert "hvs.not-kept" not in config.dump(cfg)


def test_vault_rules() -> None:
    approle = {"addr": "https://vault:8200", "auth": "approle"}
    assert problems_of({"vault": approle, "providers": {"p": PROVIDER}}) == [
        'vault.role_id_file: required for auth = "approle"',
        'vault.secret_id_file: required for auth = "approle"',
    ]
    assert problems_of(
        {"vault": {**VAULT, "addr": "http://vault.example:8200"}, "providers": {"p": PROVIDER}}
    ) == [
        "vault.addr: plain http:// is allowed only to a loopback Vault "
        "unless vault.allow_insecure = true"
    ]
    assert problems_of({"vault": {**VAULT, "token_file": "secrets/token"}}) == [
        "vault.token_file: must be an absolute path or a bare credential name, not 'secrets/token'"
    ]


def test_every_problem_is_reported_at_once() -> None:
    mapping = {
        "listen": {"mode": "bad", "max_connections": -5, "extra": 1},
        "control": {"tcp": "8.8.8.8:1"},
        "shutdown": {"drain_timeout_s": -1},
        "providers": {"a": {"base_url": "http://10.0.0.1"}, "b": {"vault_path": "x"}},
        "surprise": {},
    }
    problems = problems_of(mapping)
    assert len(problems) == 11, problems
    keys = {p.split(":", 1)[0] for p in problems}
    assert keys == {
        "listen.mode",
        "listen.max_connections",
        "listen.extra",
        "control.tcp",
        "shutdown.drain_timeout_s",
        "providers.a.vault_path",
        "providers.a.base_url",
        "providers.b.base_url",
        "surprise",
        "vault.addr",
        "vault.token_file",
    }


def test_error_lines_name_key_and_file() -> None:
    with pytest.raises(ConfigError) as info:
        config.parse({"listen": {"bogus": 1}}, source="/etc/openclawd/openclawd.toml")
    assert info.value.lines() == ["listen.bogus: unknown key (in /etc/openclawd/openclawd.toml)"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"# caf\xe9\n", "not valid TOML: not UTF-8 (byte 5)"),
        (b"x = " + b"[" * 5000 + b"]" * 5000 + b"\n", "not valid TOML: nested too deeply"),
    ],
)
def test_undecodable_files_are_config_errors(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "odd.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        config.load(str(path))
    assert [str(p) for p in info.value.problems] == [f"(file): {expected}"]


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(str(tmp_path / "missing.toml"))
    assert info.value.lines() == [
        f"(file): cannot read: No such file or directory (in {tmp_path / 'missing.toml'})"
    ]
    bad = tmp_path / "bad.toml"
    bad.write_text("[listen\nsocket = 1\n")
    with pytest.raises(ConfigError) as info:
        config.load(str(bad))
    assert info.value.problems[0].key == "(file)"
    assert info.value.problems[0].message.startswith("not valid TOML: ")


def test_dump_round_trips() -> None:
    mapping = {
        "listen": {"socket": "/tmp/a.sock", "mode": "0600", "allowed_uids": [1, 2]},
        "control": {"tcp": "127.0.0.1:9477", "token_file": "/etc/t"},
        "vault": {
            "addr": "https://v:8200",
            "auth": "approle",
            "role_id_file": "role",
            "secret_id_file": "secret",
            "refresh_interval_s": 5,
        },
        "providers": {
            "openai": {**PROVIDER, "ws_url": "wss://rt.example.com"},
            "local": {
                "base_url": "http://127.0.0.1:1234",
                "vault_path": "l",
                "auth_scheme": "",
                "required": False,
            },
        },
        "logging": {"format": "json"},
    }
    cfg = config.parse(mapping, source="/x.toml")
    text = config.dump(cfg)
    assert 'mode = "0600"' in text
    assert config.parse(tomllib.loads(text), source="/x.toml") == cfg


def test_parse_is_pure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The process environment is not consulted: only the mapping and the given environ.
    monkeypatch.setenv("VAULT_ADDR", "https://from-process-env:8200")
    cfg = config.parse({}, environ={})
    assert cfg.vault.addr == ""


# --- token control: clients, limits, routes, a shared fleet (CONTRACT.md 5) ----------------

TWO = {"vault": VAULT, "providers": {"openai": PROVIDER, "openai_eu": PROVIDER}}
CHAT = {"providers": ["openai", "openai_eu"]}
BILLING = {"uids": [1001]}


def with_tables(**tables: Any) -> dict[str, Any]:
    """Two providers and a vault, plus ``tables``."""
    return {**TWO, **tables}


def test_token_control_tables_parse() -> None:
    cfg = config.parse(
        with_tables(
            providers={
                "openai": {**PROVIDER, "limits": {"requests_per_minute": 6000}},
                "openai_eu": PROVIDER,
            },
            limits={"default_completion_tokens": 256},
            routes={
                "chat": {**CHAT, "models": {"openai_eu": {"gpt-4o-mini": "gpt-4o-mini-eu"}}},
                "solo": {"providers": ["openai"]},
            },
            clients={
                "zeta": {"units": ["zeta.service"], "providers": ["chat", "openai"]},
                "billing": {
                    "uids": [1001],
                    "gids": [50],
                    "models": ["gpt-4o"],
                    "tokens_per_minute": 200000,
                    "tokens_per_day": 10**12,
                },
                "default": {"requests_per_minute": 60},
            },
            shared={
                "url": "valkey://[::1]:6379",
                "cluster": True,
                "password_file": "valkey-password",
                "namespace": "fleet:eu-1",
                "on_failure": "refuse",
                "expected_daemons": 50,
            },
        )
    )
    assert cfg.providers["openai"].limits == config.ProviderLimits(requests_per_minute=6000)
    assert cfg.providers["openai_eu"].limits == config.ProviderLimits()
    assert cfg.limits.default_completion_tokens == 256
    assert list(cfg.clients) == ["zeta", "billing", "default"]  # file order: match order
    assert cfg.clients["billing"] == config.ClientConfig(
        name="billing",
        uids=(1001,),
        gids=(50,),
        models=("gpt-4o",),
        tokens_per_minute=200000,
        tokens_per_day=10**12,
    )
    assert cfg.clients["zeta"].providers == ("chat", "openai")
    assert cfg.clients["zeta"].units == ("zeta.service",)
    chat = cfg.routes["chat"]
    assert (chat.name, chat.providers) == ("chat", ("openai", "openai_eu"))
    assert chat.models == {"openai_eu": {"gpt-4o-mini": "gpt-4o-mini-eu"}}
    assert cfg.routes["solo"].models == {}
    assert cfg.shared == config.SharedConfig(
        url="valkey://[::1]:6379",
        cluster=True,
        password_file="valkey-password",
        namespace="fleet:eu-1",
        on_failure="refuse",
        expected_daemons=50,
    )


def test_token_control_tables_are_read_only() -> None:
    cfg = config.parse(
        with_tables(
            routes={"chat": {**CHAT, "models": {"openai": {"a": "b"}}}},
            clients={"billing": BILLING},
        )
    )
    with pytest.raises(TypeError):
        cfg.clients["x"] = cfg.clients["billing"]  # type: ignore[index]
    with pytest.raises(TypeError):
        cfg.routes["chat"].models["openai"]["a"] = "c"  # type: ignore[index]
    with pytest.raises(AttributeError):
        cfg.shared.url = "redis://x:1"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("tables", "expected"),
    [
        ({"clients": {"billing": {**BILLING, "uid": 1}}}, "clients.billing.uid: unknown key"),
        # The name is the table's own key, not a key in it.
        ({"clients": {"billing": {**BILLING, "name": "x"}}}, "clients.billing.name: unknown key"),
        ({"routes": {"chat": {**CHAT, "model": {}}}}, "routes.chat.model: unknown key"),
        ({"routes": {"chat": {**CHAT, "name": "x"}}}, "routes.chat.name: unknown key"),
        ({"shared": {"urls": "redis://v:6379"}}, "shared.urls: unknown key"),
        (
            {"providers": {"openai": {**PROVIDER, "limits": {"rpm": 1}}}},
            "providers.openai.limits.rpm: unknown key",
        ),
        (
            {"providers": {"openai": {**PROVIDER, "limits": {"tokens_per_day": 1}}}},
            "providers.openai.limits.tokens_per_day: unknown key",
        ),
        ({"clients": "billing"}, "clients: must be a table, not a string"),
        ({"routes": []}, "routes: must be a table, not an array"),
        ({"clients": {"billing": 1}}, "clients.billing: must be a table, not an integer"),
        ({"routes": {"chat": "openai"}}, "routes.chat: must be a table, not a string"),
        (
            {"providers": {"openai": {**PROVIDER, "limits": 5}}},
            "providers.openai.limits: must be a table, not an integer",
        ),
        ({"shared": "redis://v:6379"}, "shared: must be a table, not a string"),
    ],
)
def test_token_control_unknown_keys_and_tables(tables: dict[str, Any], expected: str) -> None:
    assert expected in problems_of(with_tables(**tables))


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("billing", True),
        ("batch-jobs_2", True),
        ("x" * 64, True),
        ("default", True),
        ("Billing", False),  # lower case only
        ("x" * 65, False),
        ("bill ing", False),
        ("bill.ing", False),
    ],
)
def test_client_names(name: str, ok: bool) -> None:
    clients = {name: {} if name == "default" else BILLING}
    if ok:
        assert name in config.parse(with_tables(clients=clients)).clients
    else:
        assert problems_of(with_tables(clients=clients)) == [
            f"clients.{name}: client names are 1-64 of a-z 0-9 _ -"
        ]


@pytest.mark.parametrize("name", ["my route", "-chat", "x" * 65, "chat/eu"])
def test_route_names_are_url_safe(name: str) -> None:
    assert problems_of(with_tables(routes={name: CHAT})) == [
        f"routes.{name}: route names are 1-64 of A-Z a-z 0-9 _ - (used in URLs)"
    ]


LIMIT_KEYS = ("requests_per_minute", "tokens_per_minute", "tokens_per_day")


@pytest.mark.parametrize("key", LIMIT_KEYS)
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (-1, "must be at least 0, not -1"),
        ("100", "must be an integer, not a string"),
        (1.5, "must be an integer, not a float"),
        (True, "must be an integer, not a boolean"),
        (10**15 + 1, "must be at most 1000000000000000, not 1000000000000001"),
    ],
)
def test_client_limits_are_non_negative_integers(key: str, value: object, expected: str) -> None:
    tables = with_tables(clients={"billing": {**BILLING, key: value}})
    assert problems_of(tables) == [f"clients.billing.{key}: {expected}"]


@pytest.mark.parametrize("key", LIMIT_KEYS[:2])
@pytest.mark.parametrize(
    ("value", "expected"),
    [(-5, "must be at least 0, not -5"), ("x", "must be an integer, not a string")],
)
def test_provider_limits_are_non_negative_integers(key: str, value: object, expected: str) -> None:
    provider = {**PROVIDER, "limits": {key: value}}
    tables = with_tables(providers={"openai": provider})
    assert problems_of(tables) == [f"providers.openai.limits.{key}: {expected}"]


def test_limits_of_zero_are_no_limit_and_accepted() -> None:
    provider = {**PROVIDER, "limits": dict.fromkeys(LIMIT_KEYS[:2], 0)}
    client = {**BILLING, **dict.fromkeys(LIMIT_KEYS, 0)}
    cfg = config.parse(with_tables(providers={"openai": provider}, clients={"billing": client}))
    assert cfg.clients["billing"].tokens_per_day == 0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, "must be at least 1, not 0"),
        (-1, "must be at least 1, not -1"),
        ("1024", "must be an integer, not a string"),
    ],
)
def test_default_completion_tokens_is_positive(value: object, expected: str) -> None:
    assert problems_of({"limits": {"default_completion_tokens": value}}) == [
        f"limits.default_completion_tokens: {expected}"
    ]


@pytest.mark.parametrize(
    ("route", "expected"),
    [
        ({}, ["routes.chat.providers: required key is missing"]),
        ({"providers": []}, ["routes.chat.providers: must name at least one provider"]),
        (
            {"providers": ["openai", "openai_eu", "openai"]},
            ["routes.chat.providers: names 'openai' twice"],
        ),
        (
            {"providers": "openai"},
            ["routes.chat.providers: must be a list of strings, not a string"],
        ),
        (
            {"providers": ["openai", ""]},
            ["routes.chat.providers: must hold only non-empty strings, not ''"],
        ),
        (
            {"providers": ["openai", "azure"]},
            ["routes.chat.providers: 'azure' is no configured provider"],
        ),
        (
            {"providers": ["openai", "eu"]},  # "eu" is a route, below
            ["routes.chat.providers: 'eu' is a route, not a provider"],
        ),
        (
            {**CHAT, "models": {"azure": {"gpt-4o": "gpt-4o-az"}}},
            ["routes.chat.models.azure: is not one of this route's providers"],
        ),
        (
            {"providers": ["openai"], "models": {"openai_eu": {"gpt-4o": "gpt-4o-eu"}}},
            ["routes.chat.models.openai_eu: is not one of this route's providers"],
        ),
    ],
)
def test_route_rules(route: dict[str, Any], expected: list[str]) -> None:
    routes = {"chat": route, "eu": {"providers": ["openai_eu"]}}
    assert problems_of(with_tables(routes=routes)) == expected


@pytest.mark.parametrize(
    "models",
    [
        "gpt-4o",
        {"openai": "gpt-4o"},
        {"openai": {"gpt-4o": 4}},
        {"openai": {"gpt-4o": ""}},
        {"openai": {"": "gpt-4o"}},
    ],
)
def test_route_model_rewrites_are_tables_of_strings(models: object) -> None:
    problems = problems_of(with_tables(routes={"chat": {**CHAT, "models": models}}))
    assert len(problems) == 1
    assert problems[0].startswith(
        'routes.chat.models: must be a table of tables: { PROVIDER = { "MODEL" = '
    ), problems


def test_a_route_and_a_provider_may_not_share_a_name() -> None:
    tables = with_tables(routes={"openai": {"providers": ["openai_eu"]}})
    assert problems_of(tables) == ["routes.openai: a route and a provider may not share a name"]


def test_a_route_over_a_provider_with_a_problem_of_its_own_names_only_that_problem() -> None:
    broken = {"base_url": "https://api.example.com"}  # no vault_path
    tables = with_tables(providers={"openai": PROVIDER, "openai_eu": broken}, routes={"chat": CHAT})
    assert problems_of(tables) == ["providers.openai_eu.vault_path: required key is missing"]


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        (
            {**BILLING, "providers": ["openai", "azure"]},
            ["clients.billing.providers: 'azure' is no configured provider or route"],
        ),
        (
            {**BILLING, "models": ["gpt-4o", 4]},
            ["clients.billing.models: must hold only non-empty strings, not an integer"],
        ),
        (
            {"units": ["billing"]},
            [
                'clients.billing.units: must hold systemd unit names like "billing.service" '
                "(or .scope, .slice, .socket, .mount, .swap), not 'billing'"
            ],
        ),
        (
            {"units": ["../billing.service"]},
            [
                'clients.billing.units: must hold systemd unit names like "billing.service" '
                "(or .scope, .slice, .socket, .mount, .swap), not '../billing.service'"
            ],
        ),
        (
            {"gids": [-1]},
            ["clients.billing.gids: must hold only numeric ids (integers >= 0), not -1"],
        ),
        ({}, ["clients.billing: matches no peer: set uids, gids or units"]),
        (
            {"uids": [], "gids": [], "units": [], "requests_per_minute": 5},
            ["clients.billing: matches no peer: set uids, gids or units"],
        ),
    ],
)
def test_client_rules(client: dict[str, Any], expected: list[str]) -> None:
    assert problems_of(with_tables(clients={"billing": client})) == expected


def test_a_client_may_use_providers_and_routes() -> None:
    client = {**BILLING, "providers": ["openai", "chat"]}
    cfg = config.parse(with_tables(routes={"chat": CHAT}, clients={"billing": client}))
    assert cfg.clients["billing"].providers == ("openai", "chat")


@pytest.mark.parametrize(
    "units", [["billing.service"], ["app@1.service"], ["session-3.scope"], ["user-1000.slice"]]
)
def test_client_units(units: list[str]) -> None:
    cfg = config.parse(with_tables(clients={"billing": {"units": units}}))
    assert cfg.clients["billing"].units == tuple(units)


@pytest.mark.parametrize("key", ["uids", "gids", "units"])
def test_the_default_client_matches_no_peer_of_its_own(key: str) -> None:
    value = ["x.service"] if key == "units" else [1001]
    assert problems_of(with_tables(clients={"default": {key: value}})) == [
        f"clients.default.{key}: client default is every peer that matches no other client: "
        "it takes no uids, gids or units"
    ]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://valkey.internal:6379", "must be a redis://, rediss:// or valkey:// URL"),
        ("valkeys://valkey.internal:6379", "must be a redis://, rediss:// or valkey:// URL"),
        ("valkey.internal:6379", "must be a redis://, rediss:// or valkey:// URL"),
        ("redis://valkey.internal", "must name a host and a port: SCHEME://HOST:PORT"),
        ("redis://:6379", "must name a host and a port: SCHEME://HOST:PORT"),
        (
            "redis://valkey.internal:99999",
            "is not a valid URL (redis://, rediss:// or valkey:// HOST:PORT)",
        ),
        (
            "redis://valkey.internal:6379/2",
            "must be SCHEME://HOST:PORT alone: no database number, query or fragment",
        ),
        (
            "redis://valkey.internal:6379?db=2",
            "must be SCHEME://HOST:PORT alone: no database number, query or fragment",
        ),
        (5, "must be a string, not an integer"),
    ],
)
def test_shared_url_rules(url: object, expected: str) -> None:
    assert problems_of({"shared": {"url": url}}) == [f"shared.url: {expected}"]


@pytest.mark.parametrize(
    "url", ["redis://valkey.internal:6379", "rediss://10.0.0.5:6380/", "valkey://[::1]:6379"]
)
def test_shared_url_schemes(url: str) -> None:
    assert config.parse({"shared": {"url": url}}).shared.url == url.rstrip("/")


@pytest.mark.parametrize(
    "url",
    [
        "redis://:s3cr3t@valkey.internal:6379",
        "redis://default:s3cr3t@valkey.internal:6379",
        "rediss://s3cr3t@valkey.internal:6379",
        "valkey://admin:s3cr3t/x@valkey.internal:6379",  # "/" splits the password off
        "redis://admin:s3cr3t#x@valkey.internal:6379",
        "ftp://admin:s3cr3t@valkey.internal:6379",
    ],
)
def test_a_password_or_user_in_the_shared_url_is_refused_and_never_echoed(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse({"shared": {"url": url}}, source="/etc/oc.toml")
    assert [str(p) for p in info.value.problems] == [
        "shared.url: must not hold a user or password; the password goes in password_file"
    ]
    assert "s3cr3t" not in str(info.value)
    assert not any("s3cr3t" in line for line in info.value.lines())


@pytest.mark.parametrize(
    "url",
    [
        "redis://valkey.internal:6379?password=s3cr3t",
        "redis://valkey.internal:6379/s3cr3t",
        "redis://valkey.internal:s3cr3t",
        "s3cr3t://valkey.internal:6379",
    ],
)
def test_no_problem_with_the_shared_url_quotes_it(url: str) -> None:
    problems = problems_of({"shared": {"url": url}})
    assert len(problems) == 1
    assert "s3cr3t" not in problems[0]


@pytest.mark.parametrize(
    ("shared", "expected"),
    [
        (
            {"on_failure": "open"},
            "shared.on_failure: must be one of 'local', 'refuse', not 'open'",
        ),
        ({"expected_daemons": 0}, "shared.expected_daemons: must be at least 1, not 0"),
        ({"expected_daemons": "2"}, "shared.expected_daemons: must be an integer, not a string"),
        ({"cluster": "yes"}, "shared.cluster: must be true or false, not a string"),
        ({"namespace": ""}, "shared.namespace: must be 1-64 of A-Z a-z 0-9 _ . : -, not ''"),
        (
            {"namespace": "{fleet}"},
            "shared.namespace: must be 1-64 of A-Z a-z 0-9 _ . : -, not '{fleet}'",
        ),
        (
            {"url": "redis://v:6379", "password_file": "secrets/valkey"},
            "shared.password_file: must be an absolute path or a bare credential name, "
            "not 'secrets/valkey'",
        ),
        ({"password_file": "/etc/oc/valkey"}, "shared.password_file: is used only with shared.url"),
    ],
)
def test_shared_rules(shared: dict[str, Any], expected: str) -> None:
    assert problems_of({"shared": shared}) == [expected]


@pytest.mark.parametrize("password_file", ["/etc/oc/valkey-password", "valkey-password"])
def test_shared_password_file_with_a_url(password_file: str) -> None:
    shared = {"url": "rediss://v:6380", "password_file": password_file}
    assert config.parse({"shared": shared}).shared.password_file == password_file


def test_a_wrong_shared_url_does_not_also_report_the_password_file() -> None:
    shared = {"url": "redis://v", "password_file": "/etc/oc/valkey"}
    assert problems_of({"shared": shared}) == [
        "shared.url: must name a host and a port: SCHEME://HOST:PORT"
    ]


def test_token_control_problems_are_reported_at_once() -> None:
    tables = with_tables(
        providers={"openai": {**PROVIDER, "limits": {"tokens_per_minute": -1}}, "openai_eu": {}},
        routes={"openai_eu": {"providers": ["nope"]}},
        clients={"Bad": {}, "billing": {**BILLING, "providers": ["gone"]}},
        shared={"url": "redis://u:p@v:1", "on_failure": "x"},
        limits={"default_completion_tokens": 0},
    )
    keys = {p.split(":", 1)[0] for p in problems_of(tables)}
    assert keys == {
        "providers.openai.limits.tokens_per_minute",
        "providers.openai_eu.base_url",
        "providers.openai_eu.vault_path",
        "routes.openai_eu",
        "routes.openai_eu.providers",
        "clients.Bad",
        "clients.billing.providers",
        "shared.url",
        "shared.on_failure",
        "limits.default_completion_tokens",
    }


def test_dump_round_trips_token_control() -> None:
    cfg = config.parse(
        with_tables(
            providers={
                "openai": {**PROVIDER, "limits": {"tokens_per_minute": 90000}},
                "openai_eu": PROVIDER,
            },
            routes={
                "chat": {
                    **CHAT,
                    "models": {"openai_eu": {"gpt-4.1": "eu/gpt-4.1", 'a "b"': "c"}},
                }
            },
            clients={"zeta": {"units": ["z.service"]}, "billing": {**BILLING, "models": ["m"]}},
            shared={"url": "rediss://v:6380", "password_file": "valkey-password"},
            limits={"default_completion_tokens": 2048},
        ),
        source="/x.toml",
    )
    text = config.dump(cfg)
    assert "[providers.openai.limits]\nrequests_per_minute = 0\ntokens_per_minute = 90000\n" in text
    again = config.parse(tomllib.loads(text), source="/x.toml")
    assert again == cfg
    assert list(again.clients) == ["zeta", "billing"]


# --- what a reload sees of these tables (reload.py; the daemon's side is in tests/daemon) ---


def test_the_shared_engine_needs_a_restart_and_the_rest_reloads() -> None:
    from openclawd.reload import RESTART_ONLY, changed_keys, keep_restart_only

    assert {k for k in RESTART_ONLY if k.startswith("shared.")} == {
        f"shared.{f}" for f in config.SharedConfig.__dataclass_fields__
    }
    old = config.parse(
        with_tables(
            routes={"chat": CHAT},
            clients={"billing": BILLING, "gone": {"uids": [7]}},
            shared={"url": "redis://v:6379"},
        )
    )
    new = config.parse(
        with_tables(
            providers={
                "openai": {**PROVIDER, "limits": {"requests_per_minute": 10}},
                "openai_eu": PROVIDER,
            },
            routes={"chat": {**CHAT, "models": {"openai": {"a": "b"}}}, "solo": CHAT},
            clients={"billing": {**BILLING, "tokens_per_day": 5}, "added": {"gids": [3]}},
            limits={"default_completion_tokens": 10},
            shared={"url": "redis://w:6379", "namespace": "other"},
        )
    )
    changed = changed_keys(old, new)
    assert changed == [
        "clients.added",
        "clients.billing.tokens_per_day",
        "clients.gone",
        "limits.default_completion_tokens",
        "providers.openai.limits.requests_per_minute",
        "routes.chat.models",
        "routes.solo",
        "shared.namespace",
        "shared.url",
    ]
    kept = keep_restart_only(old, new)
    assert kept.shared == old.shared
    assert (kept.clients, kept.routes, kept.limits) == (new.clients, new.routes, new.limits)
    assert kept.providers == new.providers
