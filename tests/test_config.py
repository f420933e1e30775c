"""Config parsing: every key path in every message, every problem at once, pure parsing."""

from __future__ import annotations

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


def test_the_shipped_example_parses_and_names_every_key() -> None:
    path = REPO / "etc" / "openclawd.toml"
    cfg = config.load(str(path), environ={})
    assert cfg.source == str(path)
    assert cfg.providers["openai"].vault_path == "openclawd/openai"
    # The example shows every key of every table, so it documents the whole config.
    mapping = tomllib.loads(path.read_text())
    for section, cls in (
        ("listen", config.ListenConfig),
        ("control", config.ControlConfig),
        ("vault", config.VaultConfig),
        ("limits", config.LimitsConfig),
        ("shutdown", config.ShutdownConfig),
        ("logging", config.LoggingConfig),
    ):
        assert set(mapping[section]) == set(cls.__dataclass_fields__), section
    assert set(mapping["providers"]["openai"]) == set(config.ProviderConfig.__dataclass_fields__)


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
