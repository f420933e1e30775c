"""Nothing an operator sends to the control API is echoed where a key could hide (issue 17).

A key pasted where a provider name, a body field, a path or a method goes must come back
neither in the answer nor in the daemon's log: a name that is not a configured provider
(or does not look like a name at all) is "unknown provider", an unknown field "unknown
field", an unknown path a bare 404. A configured provider's name is still shown and logged.
Driven through Quart's test client over ``FakeOps`` (tests/control/test_app.py), with every
log line (ours at debug, the libraries' at warning) captured as the CLI formats them.
"""

from __future__ import annotations

import dataclasses
import io
import json
import secrets
from typing import Any

import pytest
from quart.testing import QuartClient

from openclawd.errors import UnknownProviderError

from .test_app import FakeOps, make_client


def pasted_key() -> str:
    """A fresh key-like string, shaped like a provider name (``[A-Za-z0-9_.-]``)."""
    return "sk-proj-" + secrets.token_urlsafe(30).replace("_", "x")


class RefusingOps(FakeOps):
    """Refuses an unconfigured provider as the daemon's key manager does: by its name."""

    async def rotate_keys(self, provider: str | None) -> Any:
        if provider is not None and provider not in self.config.providers:
            raise UnknownProviderError(f"no provider named {provider!r}")
        return await super().rotate_keys(provider)


@pytest.fixture
def ops() -> FakeOps:
    return RefusingOps()


@pytest.fixture
def client(ops: FakeOps) -> QuartClient:
    return make_client(ops)


async def answer(
    client: QuartClient, method: str, path: str, body: object = None
) -> tuple[int, dict[str, Any], str]:
    """Status, JSON body and raw text of one request; ``body`` is sent as JSON."""
    data = None if body is None else json.dumps(body).encode()
    response = await client.open(path, method=method, data=data)
    text = await response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    return response.status_code, json.loads(text), text


def assert_absent(key: str, text: str, log_text: io.StringIO) -> None:
    assert key not in text
    assert key not in log_text.getvalue()
    assert key.lower() not in text.lower()


# --- the provider of a rotation -----------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param(lambda k: k, id="name-shaped"),
        pytest.param(lambda k: f"{k} extra words", id="with-spaces"),
        pytest.param(lambda k: k * 3, id="longer-than-a-name"),
        pytest.param(lambda k: f"{k}\n", id="with-a-newline"),
    ],
)
async def test_a_key_as_the_provider_is_not_echoed_nor_logged(
    client: QuartClient, ops: FakeOps, log_text: io.StringIO, shape: Any
) -> None:
    key = pasted_key()
    status, body, text = await answer(client, "POST", "/v1/keys/rotate", {"provider": shape(key)})
    assert (status, body) == (404, {"error": "unknown_provider", "message": "unknown provider"})
    assert_absent(key, text, log_text)
    assert "event=control.rotate_refused" in log_text.getvalue()  # the attempt is logged
    assert ops.rotations == []  # not a configured provider: the daemon is not asked


async def test_an_unknown_provider_the_daemon_refuses_is_not_echoed(
    client: QuartClient, ops: FakeOps
) -> None:
    # The daemon's own refusal (a reload removed the provider meanwhile) quotes the name.
    key = pasted_key()
    ops.rotate_answer = UnknownProviderError(f"no provider named {key!r}")
    providers = {**ops.config.providers, key: ops.config.providers["openai"]}
    ops.config = dataclasses.replace(ops.config, providers=providers)
    status, body, text = await answer(client, "POST", "/v1/keys/rotate", {"provider": key})
    assert (status, body) == (404, {"error": "unknown_provider", "message": "unknown provider"})
    assert key not in text  # (the log named it: it was a configured provider when asked)


async def test_a_configured_provider_is_still_named(
    client: QuartClient, ops: FakeOps, log_text: io.StringIO
) -> None:
    status, body, _ = await answer(client, "POST", "/v1/keys/rotate", {"provider": "openai"})
    assert status == 200
    assert body["providers"]["openai"] == {"from_version": 4, "to_version": 5, "changed": True}
    assert ops.rotations == ["openai"]
    assert "event=control.rotate provider=openai" in log_text.getvalue()


# --- unknown body fields ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "takes"),
    [("/v1/keys/rotate", "provider"), ("/v1/drain", "deadline_s"), ("/v1/resume", "no field")],
)
async def test_a_key_as_a_field_name_is_not_echoed(
    client: QuartClient, ops: FakeOps, log_text: io.StringIO, path: str, takes: str
) -> None:
    key = pasted_key()
    status, body, text = await answer(client, "POST", path, {key: 1})
    message = f"unknown field; this route takes {takes}"
    assert (status, body) == (400, {"error": "bad_request", "message": message})
    assert_absent(key, text, log_text)
    assert ops.rotations == []
    assert not ops.lifecycle.draining


# --- unknown paths and methods ------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "template"),
    [("GET", "/{}"), ("GET", "/v1/{}"), ("POST", "/v1/keys/{}"), ("GET", "/v1/status/{}"),
     ("GET", "/nope?token={}"), ("DELETE", "/v1/{}/rotate"),
     pytest.param("GET", "//v1//status?token={}", id="slashes-to-merge")],
)  # fmt: skip
async def test_a_key_in_an_unknown_path_is_not_echoed(
    client: QuartClient, log_text: io.StringIO, method: str, template: str
) -> None:
    key = pasted_key()
    status, body, text = await answer(client, method, template.format(key))
    assert (status, body["error"]) == (404, "not_found")
    assert_absent(key, text, log_text)


async def test_a_key_as_the_method_is_not_echoed(
    client: QuartClient, log_text: io.StringIO
) -> None:
    key = pasted_key().upper()
    status, body, text = await answer(client, key, "/v1/status")
    assert (status, body["error"]) == (405, "method_not_allowed")
    assert_absent(key, text, log_text)
