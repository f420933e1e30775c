"""Provider presets (``preset = ...``) and the ``headers`` / ``query`` keys: what a preset
fills, what a table overrides, what is refused, and how check-config shows it."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest

from openclawd import config
from openclawd.errors import ConfigError

VAULT = {"addr": "https://vault.example:8200", "token_file": "/run/secrets/vault-token"}


def provider(**table: Any) -> config.ProviderConfig:
    parsed = config.parse(
        {"vault": VAULT, "providers": {"p": {"vault_path": "openclawd/p", **table}}}, environ={}
    )
    return parsed.providers["p"]


def problems_of(**table: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        provider(**table)
    return [str(p) for p in info.value.problems]


FILLED = ("base_url", "ws_url", "auth_header", "auth_scheme", "headers", "query")


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        (
            {"preset": "openai"},
            ("https://api.openai.com", "wss://api.openai.com", "Authorization", "Bearer", {}, {}),
        ),
        (
            {"preset": "anthropic"},
            (
                "https://api.anthropic.com",
                "",
                "x-api-key",
                "",
                {"anthropic-version": "2023-06-01"},
                {},
            ),
        ),
        (
            {"preset": "azure_openai", "base_url": "https://res.openai.azure.com"},
            (
                "https://res.openai.azure.com",
                "wss://res.openai.azure.com",
                "api-key",
                "",
                {},
                {"api-version": "2024-10-21"},
            ),
        ),
        (
            {"preset": "openai_compatible", "base_url": "http://127.0.0.1:8000"},
            ("http://127.0.0.1:8000", "", "Authorization", "Bearer", {}, {}),
        ),
    ],
)
def test_a_preset_fills_the_providers_values(table: dict[str, Any], expected: tuple[Any]) -> None:
    p = provider(**table)
    assert tuple(getattr(p, key) for key in FILLED) == expected
    assert p.preset == table["preset"]


def test_without_a_preset_nothing_is_filled() -> None:
    p = provider(base_url="https://api.example.com")
    assert (p.preset, p.ws_url, dict(p.headers), dict(p.query)) == ("", "", {}, {})
    assert (p.auth_header, p.auth_scheme) == ("Authorization", "Bearer")
    assert problems_of() == ["providers.p.base_url: required key is missing"]


def test_explicit_keys_override_the_preset() -> None:
    p = provider(
        preset="anthropic",
        base_url="https://anthropic.proxy.internal",
        ws_url="wss://anthropic.proxy.internal",
        auth_header="Authorization",
        auth_scheme="Bearer",
    )
    assert (p.base_url, p.ws_url) == (
        "https://anthropic.proxy.internal",
        "wss://anthropic.proxy.internal",
    )
    assert (p.auth_header, p.auth_scheme) == ("Authorization", "Bearer")
    assert dict(p.headers) == {"anthropic-version": "2023-06-01"}
    # azure_openai's ws_url follows base_url unless set.
    azure = provider(preset="azure_openai", base_url="https://r.openai.azure.com", ws_url="")
    assert azure.ws_url == ""


def test_headers_and_query_merge_over_the_presets_name_by_name() -> None:
    p = provider(
        preset="anthropic",
        headers={"Anthropic-Version": "2024-01-01", "anthropic-beta": "tools-2024"},
    )
    assert dict(p.headers) == {"anthropic-version": "2024-01-01", "anthropic-beta": "tools-2024"}
    dropped = provider(preset="anthropic", headers={"anthropic-version": ""})
    assert dict(dropped.headers) == {"anthropic-version": ""}  # kept, as "not sent"
    azure = provider(
        preset="azure_openai",
        base_url="https://r.openai.azure.com",
        query={"api-version": "2025-04-01-preview", "x": "1"},
    )
    assert dict(azure.query) == {"api-version": "2025-04-01-preview", "x": "1"}


@pytest.mark.parametrize(
    ("preset", "hint"),
    [
        ("azure_openai", "e.g. https://RESOURCE.openai.azure.com"),
        ("openai_compatible", "e.g. https://llm.internal:8000"),
    ],
)
def test_a_preset_without_a_universal_base_url_requires_it(preset: str, hint: str) -> None:
    [problem] = problems_of(preset=preset)
    assert problem.startswith(f'providers.p.base_url: required with preset = "{preset}": ')
    assert problem.endswith(hint)


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        (
            {"preset": "claude"},
            "providers.p.preset: must be one of '', 'openai', 'anthropic', 'azure_openai', "
            "'openai_compatible', not 'claude'",
        ),
        ({"preset": 1}, "providers.p.preset: must be a string, not an integer"),
        (
            {"preset": "openai", "headers": {"Authorization": "Bearer sk-x"}},
            "providers.p.headers: must not set 'Authorization': credentials come from Vault only",
        ),
        (
            {"preset": "openai", "headers": {"cookie": "a=b"}},
            "providers.p.headers: must not set 'cookie': credentials come from Vault only",
        ),
        (
            {"preset": "anthropic", "headers": {"X-Api-Key": "sk-x"}},
            "providers.p.headers: must not set 'x-api-key': the key goes there",
        ),
        (
            {"preset": "openai", "headers": {"bad name": "x"}},
            "providers.p.headers: 'bad name' is not a valid header name",
        ),
        (
            {"preset": "openai", "headers": {"x-a": "1\r\nx-b: 2"}},
            "providers.p.headers: the value of 'x-a' must not hold CR, LF or NUL",
        ),
        (
            {"preset": "openai", "headers": {"x-a": 1}},
            "providers.p.headers: the value of 'x-a' must be a string, not an integer",
        ),
        (
            {"preset": "openai", "query": ["api-version"]},
            'providers.p.query: must be a table of strings ({ "NAME" = "VALUE" }), not an array',
        ),
        (
            {"preset": "openai", "query": {"": "x"}},
            "providers.p.query: a query parameter name must not be empty",
        ),
    ],
)
def test_wrong_presets_headers_and_queries_are_named(table: dict[str, Any], expected: str) -> None:
    assert problems_of(**table) == [expected]


def test_no_problem_quotes_a_header_value() -> None:
    problems = problems_of(preset="openai", headers={"Authorization": "Bearer sk-secret-1"})
    assert all("sk-secret-1" not in p for p in problems)


def test_check_config_marks_what_a_preset_filled_and_round_trips() -> None:
    parsed = config.parse(
        {
            "vault": VAULT,
            "providers": {
                "claude": {"preset": "anthropic", "vault_path": "a", "auth_scheme": "Token"},
                "azure": {
                    "preset": "azure_openai",
                    "vault_path": "z",
                    "base_url": "https://r.openai.azure.com",
                },
            },
        },
        environ={},
    )
    text = config.dump(parsed)
    mark = '  # from preset "anthropic"'
    assert f'base_url = "https://api.anthropic.com"{mark}' in text
    assert f'auth_header = "x-api-key"{mark}' in text
    assert 'auth_scheme = "Token"\n' in text  # set by the table: no mark
    assert f'headers = {{ "anthropic-version" = "2023-06-01" }}{mark}' in text
    azure = '  # from preset "azure_openai"'
    assert 'base_url = "https://r.openai.azure.com"\n' in text
    assert f'ws_url = "wss://r.openai.azure.com"{azure}' in text
    assert f'query = {{ "api-version" = "2024-10-21" }}{azure}' in text
    assert config.parse(tomllib.loads(text), environ={}) == parsed
