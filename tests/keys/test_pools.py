"""Key pools in both layouts (CONTRACT.md 2): one field holding a list of keys, or
``key_field`` a list of fields of one secret, each holding one key. From the config's
parsing and ``check-config``'s effective config to the manager's pool and its status."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest
import trio
import trio.testing

from openclawd import config
from openclawd.errors import ConfigError
from openclawd.keys.manager import KeyManager
from openclawd.lifecycle import Lifecycle

from .test_manager import PATH, FakeVault, manager_for


def provider_table(**keys: Any) -> dict[str, Any]:
    return {
        "vault": {"addr": "http://127.0.0.1:8200", "token_file": "/nonexistent/token"},
        "providers": {"openai": {"base_url": "https://api.openai.com", "vault_path": PATH, **keys}},
    }


def test_key_field_takes_a_string_or_a_list_of_fields() -> None:
    one = config.parse(provider_table(key_field="api_key"))
    assert one.providers["openai"].key_field == "api_key"
    two = config.parse(provider_table(key_field=["key1", "key2"]))
    assert two.providers["openai"].key_field == ("key1", "key2")
    # check-config prints the effective config: the list, as written, and it parses back.
    dumped = config.dump(two)
    assert 'key_field = ["key1", "key2"]' in dumped
    again = config.parse(tomllib.loads(dumped))
    assert again.providers["openai"].key_field == ("key1", "key2")


@pytest.mark.parametrize(
    "value",
    [[], ["key1", "key1"], ["key1", 2], ["key1", ""], "", 42, {"a": "b"}],
)
def test_a_wrong_key_field_explains_both_layouts(value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        config.parse(provider_table(key_field=value))
    [problem] = caught.value.problems
    assert problem.key == "providers.openai.key_field"
    # Both layouts are named, whatever was wrong.
    assert "a list of strings" in problem.message
    assert "one key per field" in problem.message


def make(vault: FakeVault, key_field: str | list[str]) -> tuple[KeyManager, Lifecycle]:
    return manager_for(vault, config.parse(provider_table(key_field=key_field)))


@pytest.mark.parametrize(
    ("key_field", "data"),
    [
        ("api_key", {"api_key": ["sk-a", "sk-b", "sk-c"]}),  # one field, a list of keys
        (["key1", "key2", "key3"], {"key1": "sk-a", "key2": "sk-b", "key3": "sk-c", "x": "y"}),
    ],
    ids=["list-valued-field", "list-of-fields"],
)
async def test_both_layouts_make_a_pool_in_order(
    autojump_clock: trio.testing.MockClock, key_field: str | list[str], data: dict[str, Any]
) -> None:
    vault = FakeVault()
    vault.write(PATH, **data)
    manager, lifecycle = make(vault, key_field)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)
        assert lifecycle.ready
        stats = manager.statistics().providers["openai"]
        assert stats.key is not None
        assert stats.key.pool_size == 3
        assert stats.last_error is None
        first = manager.current("openai")
        assert first is not None
        assert first.secret == "sk-a"
        # The pool is walked in order on refusals (nothing newer in Vault).
        second = await manager.auth_failure("openai", first)
        assert second is not None
        assert (second.secret, second.index) == ("sk-b", 1)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({"key1": "sk-a"}, "version 1 field 'key2' is missing"),
        ({"key1": "sk-a", "key2": ["sk-b"]}, "version 1 field 'key2' must be a string"),
        ({"key1": "sk-a", "key2": " "}, "version 1 field 'key2' holds an empty key"),
    ],
)
async def test_a_list_of_fields_names_the_field_that_is_wrong(
    autojump_clock: trio.testing.MockClock, data: dict[str, Any], error: str
) -> None:
    vault = FakeVault()
    vault.write(PATH, **data)
    manager, lifecycle = make(vault, ["key1", "key2"])
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)
        assert manager.current("openai") is None
        last_error = manager.statistics().providers["openai"].last_error
        assert last_error is not None
        assert last_error.startswith(error)
        assert "sk-a" not in last_error
        assert "sk-b" not in last_error
        assert lifecycle.not_ready_reasons() == ["no key for openai"]
        nursery.cancel_scope.cancel()
