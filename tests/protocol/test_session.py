"""The per-connection session of /v1/ws: feed app messages, compare the actions (3.1, 3.4)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from openclawd.protocol.messages import Request
from openclawd.protocol.session import Abort, Ignore, Send, Session, Start

REFUSED = {"openai": frozenset({"authorization"}), "anthropic": frozenset({"x-api-key"})}


def make_session(max_inflight: int = 4) -> Session:
    return Session(refused_headers=REFUSED, max_inflight=max_inflight)


def request(rid: str = "r1", provider: str = "openai", **extra: Any) -> str:
    return json.dumps(
        {"type": "request", "id": rid, "provider": provider, "path": "/v1/x", **extra}
    )


def error_of(action: object) -> dict[str, Any]:
    """The error frame an action sends, parsed; fails if it is anything else."""
    assert isinstance(action, Send), action
    frame: dict[str, Any] = json.loads(action.text)
    assert frame["type"] == "error"
    assert set(frame) == {"type", "id", "code", "message", "retry_after"}
    assert frame["retry_after"] is None
    return frame


def start(session: Session, rid: str, provider: str = "openai") -> Request:
    action = session.receive(request(rid, provider))
    assert isinstance(action, Start), action
    return action.request


GARBAGE: list[str | bytes] = [
    b"",
    b"\xff\xfe",
    b'{"type":"request","id":"b","provider":"openai","path":"/"}',
    "",
    "null",
    "[]",
    "42",
    '"request"',
    "{",
    "[" * 50_000,
    "{}",
    '{"type":null}',
    '{"type":{"a":1}}',
    '{"type":"nope","id":"x"}',
    '{"type":"cancel"}',
    '{"type":"cancel","id":7}',
    '{"type":"request"}',
    '{"type":"request","id":""}',
    '{"type":"request","id":"x","provider":7}',
    '{"type":"request","id":"x","provider":"openai","path":"../etc"}',
    '{"type":"request","id":"x","provider":"openai","path":"/","headers":[1]}',
    '{"type":"request","id":"x","provider":"openai","path":"/","headers":{"a b":"c"}}',
    '{"type":"request","id":"x","provider":"openai","path":"/","method":"post"}',
    '{"type":"request","id":"x","provider":"nope","path":"/"}',
    '{"type":"request","id":"x","provider":"openai","path":"/","headers":{"Cookie":"c"}}',
    '{"type":"request","id":"' + "x" * 5000 + '","provider":"openai","path":"/"}',
    '{"type":"ping","id":1e999}',
    '{"type":"ping","id":' + "1" * 5000 + "}",
    "\x00\x01\x02",
    "\ud800",
]


def test_receive_never_raises_and_answers_garbage_with_bad_request() -> None:
    session = make_session()
    for message in GARBAGE:
        action = session.receive(message)
        assert isinstance(action, Send | Ignore), (message[:60], action)
        if isinstance(action, Send):
            frame = json.loads(action.text)
            assert frame["type"] in ("error", "pong")
            if frame["type"] == "error":
                assert frame["code"] in ("bad_request", "unknown_provider"), frame
    assert session.inflight == set()


@pytest.mark.parametrize(
    ("message", "code", "rid"),
    [
        (b'{"type":"ping"}', "bad_request", None),
        ("not json", "bad_request", None),
        ("[1]", "bad_request", None),
        ('{"id":"r1"}', "bad_request", "r1"),
        ('{"type":"resquest","id":"r1"}', "bad_request", "r1"),
        ('{"type":"resquest"}', "bad_request", None),
        ('{"type":"cancel","id":""}', "bad_request", None),
        ('{"type":"request","provider":"openai","path":"/"}', "bad_request", None),
        ('{"type":"request","id":"r1","path":"/"}', "bad_request", "r1"),
        ('{"type":"request","id":"r1","provider":"openai","path":"/a/../b"}', "bad_request", "r1"),
        (request("r1", method="TRACE"), "bad_request", "r1"),
        (request("r1", headers={"Authorization": "Bearer x"}), "bad_request", "r1"),
        (request("r1", provider="mistral"), "unknown_provider", "r1"),
    ],
    ids=[
        "binary",
        "not-json",
        "not-object",
        "no-type",
        "unknown-type",
        "unknown-type-no-id",
        "cancel-empty-id",
        "request-no-id",
        "no-provider",
        "dot-segment",
        "bad-method",
        "authorization",
        "unknown-provider",
    ],
)
def test_bad_frame_answered_with_error(message: str | bytes, code: str, rid: str | None) -> None:
    session = make_session()
    frame = error_of(session.receive(message))
    assert frame["code"] == code
    assert frame["id"] == rid
    assert frame["message"]
    assert session.inflight == set()


def test_good_request_starts_and_goes_in_flight() -> None:
    session = make_session()
    action = session.receive(
        request("r1", body={"model": "m"}, headers={"Content-Type": "application/json"})
    )
    assert action == Start(
        Request(
            id="r1",
            provider="openai",
            method="POST",
            path="/v1/x",
            headers=(("content-type", "application/json"),),
            body={"model": "m"},
            has_body=True,
        )
    )
    assert session.inflight == {"r1"}


def test_duplicate_in_flight_id_refused_with_null_id() -> None:
    session = make_session()
    start(session, "r1")
    frame = error_of(session.receive(request("r1", body={"other": True})))
    assert frame["code"] == "bad_request"
    # An error frame carrying "r1" would read as the end of the "r1" in flight.
    assert frame["id"] is None
    assert session.inflight == {"r1"}
    assert session.receive(json.dumps({"type": "cancel", "id": "r1"})) == Abort("r1")


def test_duplicate_check_applies_to_other_providers_too() -> None:
    session = make_session()
    start(session, "r1", "openai")
    frame = error_of(session.receive(request("r1", "anthropic")))
    assert frame["id"] is None
    assert session.inflight == {"r1"}


@pytest.mark.parametrize(
    "message",
    [
        '{"type":"request","id":"r1","path":"/"}',
        '{"type":"request","id":"r1","provider":"openai","path":"relative"}',
        '{"type":"request","id":"r1","provider":"openai","path":"/","method":"get"}',
        '{"type":"request","id":"r1","provider":"openai","path":"/","headers":{"Cookie":"c"}}',
        '{"type":"request","id":"r1","provider":"mistral","path":"/"}',
        '{"type":"resquest","id":"r1"}',
        '{"type":5,"id":"r1"}',
    ],
    ids=[
        "no-provider",
        "bad-path",
        "bad-method",
        "cookie",
        "unknown-provider",
        "unknown-type",
        "non-string-type",
    ],
)
def test_bad_frame_reusing_an_in_flight_id_does_not_end_it(message: str) -> None:
    """A bad frame never disturbs the app's other requests (CONTRACT.md 3.1): an error
    frame carrying the id of a request in flight would read as that request's end."""
    session = make_session()
    start(session, "r1")
    frame = error_of(session.receive(message))
    assert frame["id"] is None
    assert session.inflight == {"r1"}


def test_finished_id_can_be_reused() -> None:
    session = make_session()
    start(session, "r1")
    session.finish("r1")
    assert session.inflight == set()
    start(session, "r1")
    assert session.inflight == {"r1"}


def test_finish_unknown_id_is_harmless() -> None:
    session = make_session()
    start(session, "r1")
    session.finish("never-started")
    session.finish("never-started")
    assert session.inflight == {"r1"}


def test_unknown_provider() -> None:
    session = make_session()
    frame = error_of(session.receive(request("r9", "mistral")))
    assert frame["code"] == "unknown_provider"
    assert frame["id"] == "r9"
    assert session.inflight == set()


@pytest.mark.parametrize("name", ["x-api-key", "X-Api-Key", "X-API-KEY"])
def test_provider_specific_refused_header(name: str) -> None:
    session = make_session()
    headers = {name: "sk-ant-secret"}
    frame = error_of(session.receive(request("a1", "anthropic", headers=headers)))
    assert frame["code"] == "bad_request"
    assert frame["id"] == "a1"
    assert "sk-ant-secret" not in frame["message"]
    assert session.inflight == set()
    # The same header is only data for a provider that does not use it for its key.
    action = session.receive(request("o1", "openai", headers=headers))
    assert isinstance(action, Start)
    assert action.request.headers == (("x-api-key", "sk-ant-secret"),)


def test_common_credential_headers_refused_for_every_provider() -> None:
    session = make_session()
    for provider in ("openai", "anthropic"):
        frame = error_of(session.receive(request("c", provider, headers={"Cookie": "s=1"})))
        assert (frame["code"], frame["id"]) == ("bad_request", "c")
    assert session.inflight == set()


def test_max_inflight() -> None:
    session = make_session(max_inflight=3)
    for rid in ("a", "b", "c"):
        start(session, rid)
    frame = error_of(session.receive(request("d")))
    assert frame["code"] == "too_many_inflight"
    assert frame["id"] == "d"
    assert session.inflight == {"a", "b", "c"}
    session.finish("b")
    start(session, "d")
    assert session.inflight == {"a", "c", "d"}
    assert error_of(session.receive(request("e")))["code"] == "too_many_inflight"


def test_cancel_in_flight_request_aborts_it() -> None:
    session = make_session()
    start(session, "r1")
    assert session.receive(json.dumps({"type": "cancel", "id": "r1"})) == Abort("r1")
    # The id stays in flight until the driver reports the request's end.
    assert session.inflight == {"r1"}


@pytest.mark.parametrize("rid", ["unknown", "r1-finished"])
def test_cancel_of_unknown_id_is_ignored(rid: str) -> None:
    session = make_session()
    start(session, "r1-finished")
    session.finish("r1-finished")
    assert session.receive(json.dumps({"type": "cancel", "id": rid})) == Ignore()
    assert session.inflight == set()


@pytest.mark.parametrize("ping_id", ["p1", 42, None, [1, 2], {"a": "b"}, "é"])
def test_ping_answered_with_pong(ping_id: Any) -> None:
    session = make_session()
    start(session, "r1")
    action = session.receive(json.dumps({"type": "ping", "id": ping_id}))
    assert isinstance(action, Send)
    assert json.loads(action.text) == {"type": "pong", "id": ping_id}
    assert session.inflight == {"r1"}


def test_bad_frames_do_not_change_inflight() -> None:
    session = make_session(max_inflight=2)
    start(session, "r1")
    for message in GARBAGE:
        session.receive(message)
        assert session.inflight == {"r1"}
    start(session, "r2")
    assert session.inflight == {"r1", "r2"}


@pytest.mark.parametrize(
    "message",
    [
        '{"type":"ping","id":"\\ud800"}',
        '{"type":"\\ud800","id":"r1"}',
        '{"type":"request","id":"\\udc00","provider":"mistral","path":"/"}',
    ],
    ids=["ping-id", "type", "request-id"],
)
def test_replies_are_sendable_as_utf8_text(message: str) -> None:
    """JSON can spell a lone surrogate; a reply holding one has no UTF-8 form, so the
    driver could not send it as a text frame and the connection would break."""
    session = make_session()
    action = session.receive(message)
    assert isinstance(action, Send)
    action.text.encode("utf-8")
