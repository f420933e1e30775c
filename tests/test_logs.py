"""Log lines: one per event, logfmt or JSON, connection ids, libraries kept quiet."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from openclawd import logs


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    yield out
    logs.configure()  # back to stderr
    root.handlers[:] = saved[1]
    root.setLevel(saved[0])


def test_logfmt_quotes_what_needs_quoting(stream: io.StringIO) -> None:
    logs.configure("info", "logfmt", stream)
    logs.get("openclawd.test").info(
        "thing.done", path="/a b", n=3, ok=True, none=None, evil='x" level=error'
    )
    line = stream.getvalue().strip()
    assert " level=info logger=openclawd.test event=thing.done " in line
    assert line.endswith('path="/a b" n=3 ok=true none=null evil="x\\" level=error"')


def test_a_newline_cannot_forge_a_second_line(stream: io.StringIO) -> None:
    logs.configure("info", "logfmt", stream)
    logs.get("openclawd.test").info("x", value="a\nts=forged level=error")
    assert stream.getvalue().count("\n") == 1


def test_json_lines_and_connection_id(stream: io.StringIO) -> None:
    logs.configure("debug", "json", stream)
    token = logs.connection_id.set("c42")
    try:
        logs.get("openclawd.test").debug("conn.thing", peer_uid=1000)
    finally:
        logs.connection_id.reset(token)
    record = json.loads(stream.getvalue())
    assert record["event"] == "conn.thing"
    assert record["conn"] == "c42"
    assert record["peer_uid"] == 1000
    assert record["level"] == "debug"


def test_libraries_stay_at_warning_when_we_debug(stream: io.StringIO) -> None:
    logs.configure("debug", "logfmt", stream)
    assert logging.getLogger("openclawd.anything").isEnabledFor(logging.DEBUG)
    for name in ("httpx", "httpcore", "hpack", "urllib3", "hvac", "hypercorn"):
        assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
    logging.getLogger("hpack").debug("header authorization: Bearer sk-secret")
    assert stream.getvalue() == ""


def test_level_applies_to_our_lines(stream: io.StringIO) -> None:
    logs.configure("warning", "logfmt", stream)
    log = logs.get("openclawd.test")
    log.info("hidden")
    log.warning("shown")
    assert "event=shown" in stream.getvalue()
    assert "hidden" not in stream.getvalue()
