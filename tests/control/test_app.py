"""The control API (``openclawd.control``) through Quart's test client, over a fake daemon.

``FakeOps`` plays the daemon's side of ``Operations``: a real ``Lifecycle``, one fixed
statistics snapshot (whose ``state`` follows the lifecycle), and drain/resume done as
``Daemon.drain``/``Daemon.resume`` do them. Drain times run on trio's autojump clock. The
TCP listener's ``BearerAuth`` wrapper is driven with hand-made ASGI events.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, cast

import pytest
import trio
import trio.lowlevel
from hypercorn import typing as asgi
from prometheus_client.parser import text_string_to_metric_families
from quart.testing import QuartClient
from trio.testing import MockClock

from openclawd import config
from openclawd.control import MAX_BODY_BYTES, BearerAuth, create_app
from openclawd.errors import StoppingError, UnknownProviderError
from openclawd.keys.manager import TRIGGERS, KeySnapshot, KeyStatistics, fingerprint
from openclawd.keys.manager import ProviderKeyStatistics as Keyed
from openclawd.keys.vault import VaultAuthError, VaultSecretError, VaultUnreachableError
from openclawd.lifecycle import Lifecycle
from openclawd.local.server import LocalStatistics
from openclawd.metrics import CONTENT_TYPE
from openclawd.statistics import Statistics
from openclawd.upstream.http import LATENCY_BUCKETS_S, LatencySnapshot, UpstreamStatistics

SECRET = "sk-test-control-0123456789abcdef0123"
SECRET_FP = fingerprint(SECRET)
TOKEN = "s3cret-token"
NOW = "2026-11-21T10:00:00Z"
# Not cumulative (as LatencySnapshot is): 1 request within 0.05 s, 2 within 0.25 s, 1 over 60 s.
OPENAI_COUNTS = (0, 0, 0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1)
OPENAI_LATENCY = LatencySnapshot(LATENCY_BUCKETS_S, OPENAI_COUNTS, 61.5)
NO_LATENCY = LatencySnapshot(LATENCY_BUCKETS_S, (0,) * (len(LATENCY_BUCKETS_S) + 1), 0.0)
Rotation = Mapping[str, tuple[int | None, int | None, bool]]


# The daemon's config as the control API reads it (the providers' Vault paths).
CONFIG = config.parse(
    {
        "vault": {
            "addr": "https://vault.internal:8200",
            "auth": "approle",
            "mount": "kv",
            "role_id_file": "/nonexistent/role",
            "secret_id_file": "/nonexistent/secret",
        },
        "providers": {
            "openai": {"base_url": "https://api.openai.com", "vault_path": "openclawd/openai"},
            "anthropic": {
                "base_url": "https://api.anthropic.com",
                "vault_path": "openclawd/anthropic",
            },
        },
    }
)


class FakeOps:
    """The daemon as the control API sees it; records ``rotate_keys`` calls."""

    def __init__(self, *, listening: bool = True) -> None:
        self.config = CONFIG
        self.lifecycle = Lifecycle()
        if listening:
            self.lifecycle.set_listening()
        self.rotations: list[str | None] = []
        self.rotate_answer: Rotation | Exception = {"openai": (4, 5, True)}
        self.broken = False  # statistics() raises

    def statistics(self) -> Statistics:
        if self.broken:
            raise RuntimeError("statistics broke at /srv/secret/path")
        keys = KeyStatistics(
            "https://vault.internal:8200", "approle", reachable=True, token_ttl_s=3100.0,
            last_refresh=NOW, last_error=None, vault_errors=7,
            providers={"openai": Keyed(KeySnapshot(4, "sha256:1a2b3c4d5e6f", NOW, 1), None),
                       "anthropic": Keyed(None, "secret openclawd/anthropic not found")},
            rotations={("openai", "vault"): 2, ("openai", "operator"): 1},
        )  # fmt: skip
        openai = UpstreamStatistics(
            "closed", f"401 from upstream for key {SECRET}", 499, 90000,
            requests={"200": 3, "429": 1, "upstream_timeout": 1}, retries=2,
            tokens={"prompt": 10, "completion": 5}, latency=OPENAI_LATENCY,
        )  # fmt: skip
        anthropic = UpstreamStatistics(
            "open", "no_key", None, None, {"no_key": 2}, retries=1, tokens={}, latency=NO_LATENCY
        )
        kinds = {"ws": 1, "realtime": 1, "http": 1, "pending": 0}
        local = LocalStatistics(clients=3, connections=kinds, closes={1000: 4, 1001: 2})
        return Statistics(
            state=self.lifecycle.state.value, version="0.1.0", uptime_s=12.46,
            requests_inflight=1, realtime_sessions=1, local=local, keys=keys,
            upstreams={"openai": openai, "anthropic": anthropic},
        )  # fmt: skip

    def redact(self, text: str) -> str:
        return text.replace(SECRET, SECRET_FP)

    async def rotate_keys(self, provider: str | None) -> Rotation:
        await trio.lowlevel.checkpoint()
        self.rotations.append(provider)
        if isinstance(self.rotate_answer, Exception):
            raise self.rotate_answer
        return self.rotate_answer

    def drain(self, deadline_s: float | None) -> float:
        if self.lifecycle.stopping:
            raise StoppingError("openclawd is shutting down: its own drain is running")
        if deadline_s is None:
            deadline_s = 30.0
        self.lifecycle.set_draining(trio.current_time() + deadline_s)
        return deadline_s

    def resume(self) -> None:
        if self.lifecycle.stopping:
            raise StoppingError("openclawd is shutting down: a shutdown cannot be resumed")
        if self.lifecycle.draining:
            self.lifecycle.set_draining(None)


def make_client(ops: FakeOps) -> QuartClient:
    client = create_app(ops).test_client()
    assert isinstance(client, QuartClient)
    return client


@pytest.fixture
def ops() -> FakeOps:
    return FakeOps()


@pytest.fixture
def client(ops: FakeOps) -> QuartClient:
    return make_client(ops)


async def call(
    client: QuartClient, method: str, path: str, data: bytes | None = None
) -> tuple[int, Any]:
    """One request; its status and its body, which must be JSON."""
    response = await client.open(path, method=method, data=data)
    assert response.mimetype == "application/json"
    return response.status_code, json.loads(await response.get_data())


def bad_request(message: str) -> tuple[int, dict[str, str]]:
    return 400, {"error": "bad_request", "message": message}


# --- health and readiness -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("situation", "reasons"),
    [("ready", None), ("degraded", None), ("starting", ["starting"]),
     ("blocked", ["no key for openai"]), ("draining", ["draining"]), ("stopping", ["draining"])],
)  # fmt: skip
async def test_healthz_and_readyz(situation: str, reasons: list[str] | None) -> None:
    ops = FakeOps(listening=situation != "starting")
    if situation == "degraded":  # serving, so still ready
        ops.lifecycle.degrade("vault", "vault unreachable")
    elif situation == "blocked":
        ops.lifecycle.block("key:openai", "no key for openai")
    elif situation == "draining":
        ops.drain(None)
    elif situation == "stopping":
        ops.lifecycle.set_stopping(trio.current_time() + 5)
    client = make_client(ops)
    assert await call(client, "GET", "/healthz") == (200, {"status": "ok"})
    ready = (
        (200, {"ready": True}) if reasons is None else (503, {"ready": False, "reasons": reasons})
    )
    assert await call(client, "GET", "/readyz") == ready


# --- status -------------------------------------------------------------------------------


async def test_status_has_the_contract_shape_and_is_redacted(client: QuartClient) -> None:
    response = await client.get("/v1/status")
    text = await response.get_data(as_text=True)
    assert SECRET not in text  # the upstream's last_error quoted the key
    key = {"version": 4, "fingerprint": "sha256:1a2b3c4d5e6f", "fetched_at": NOW, "pool_size": 1}
    redacted = f"401 from upstream for key {SECRET_FP}"
    vault = {"addr": "https://vault.internal:8200", "auth": "approle", "reachable": True}
    vault |= {"token_ttl_s": 3100.0, "last_refresh": NOW, "last_error": None}
    assert (response.status_code, response.mimetype) == (200, "application/json")
    assert json.loads(text) == {
        "state": "ready",
        "version": "0.1.0",
        "uptime_s": 12.5,
        "connections": {"clients": 3, "inflight": 1, "realtime": 1},
        "providers": {
            "openai": {
                "key": key,
                "upstream": {"circuit": "closed", "last_error": redacted},
                "ratelimit": {"remaining_requests": 499, "remaining_tokens": 90000},
                "vault": {"path": "kv/openclawd/openai", "last_error": None},
            },
            "anthropic": {
                "key": None,
                "upstream": {"circuit": "open", "last_error": "no_key"},
                "ratelimit": {"remaining_requests": None, "remaining_tokens": None},
                # Its secret is missing in Vault: the key manager's reason is shown.
                "vault": {
                    "path": "kv/openclawd/anthropic",
                    "last_error": "secret openclawd/anthropic not found",
                },
            },
        },
        "shared": {"mode": "local", "reachable": None},  # 5.7
        "vault": vault,
    }


# --- key rotation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "provider"),
    [(None, None), (b" \n", None), (b"{}", None), (b'{"provider":null}', None),
     (b'{"provider":"openai"}', "openai")],
)  # fmt: skip
async def test_rotate(
    client: QuartClient, ops: FakeOps, body: bytes | None, provider: str | None
) -> None:
    ops.rotate_answer = {"openai": (4, 5, True), "anthropic": (None, None, False)}
    assert await call(client, "POST", "/v1/keys/rotate", body) == (
        200,
        {
            "providers": {
                "openai": {"from_version": 4, "to_version": 5, "changed": True},
                "anthropic": {"from_version": None, "to_version": None, "changed": False},
            }
        },
    )
    assert ops.rotations == [provider]


async def test_rotate_unknown_provider(client: QuartClient, ops: FakeOps) -> None:
    # Not configured: refused without asking the daemon, and not named (tests/control/
    # test_no_echo.py); one the daemon refuses all the same (a reload) answers alike.
    expected = (404, {"error": "unknown_provider", "message": "unknown provider"})
    assert await call(client, "POST", "/v1/keys/rotate", b'{"provider":"mistral"}') == expected
    assert ops.rotations == []
    ops.rotate_answer = UnknownProviderError("no provider named 'openai'")
    assert await call(client, "POST", "/v1/keys/rotate", b'{"provider":"openai"}') == expected
    assert ops.rotations == ["openai"]


@pytest.mark.parametrize("cls", [VaultUnreachableError, VaultAuthError, VaultSecretError])
async def test_rotate_with_vault_failing_is_503_and_redacted(
    client: QuartClient, ops: FakeOps, cls: type[Exception]
) -> None:
    ops.rotate_answer = cls(f"refused while holding {SECRET}")
    message = f"the keys in force are kept: refused while holding {SECRET_FP}"
    expected = {"error": "vault_unreachable", "message": message}
    assert await call(client, "POST", "/v1/keys/rotate") == (503, expected)


async def test_rotate_when_vault_does_not_answer_in_time_is_503(
    client: QuartClient, ops: FakeOps, autojump_clock: MockClock
) -> None:
    # The key manager bounds each Vault request (vault.request_timeout_s) and raises
    # VaultUnreachableError once it has waited that long; the control API adds no deadline.
    async def slow_vault(provider: str | None) -> Rotation:
        await trio.sleep(10)
        raise VaultUnreachableError(
            "Vault at https://vault.internal:8200 did not answer within 10s"
        )

    ops.rotate_keys = slow_vault  # type: ignore[method-assign]
    status, body = await call(client, "POST", "/v1/keys/rotate", b'{"provider":"openai"}')
    assert trio.current_time() == 10
    assert (status, body["error"]) == (503, "vault_unreachable")
    assert body["message"].endswith("did not answer within 10s")


NOT_JSON = "the body is not JSON"
NOT_OBJECT = "the body must be a JSON object"
NOT_STRING = "provider must be a string"


@pytest.mark.parametrize(
    ("body", "message"),
    [(b"provider=openai", NOT_JSON), (b'{"provider":', NOT_JSON), (b"\xff\xfe\xfa", NOT_JSON),
     pytest.param(b"[" * 50_000, NOT_JSON, id="nested-deeper-than-the-recursion-limit"),
     (b"null", NOT_OBJECT), (b'["openai"]', NOT_OBJECT), (b'"openai"', NOT_OBJECT),
     (b'{"provider":"openai","force":1}', "unknown field; this route takes provider"),
     (b'{"provider":5}', NOT_STRING), (b'{"provider":["openai"]}', NOT_STRING)],
)  # fmt: skip
async def test_rotate_bad_request(
    client: QuartClient, ops: FakeOps, body: bytes, message: str
) -> None:
    assert await call(client, "POST", "/v1/keys/rotate", body) == bad_request(message)
    assert ops.rotations == []


async def test_body_over_64_kib_is_413(client: QuartClient, ops: FakeOps) -> None:
    expected = {"error": "too_large", "message": "the body is larger than 65536 bytes"}
    for path in ("/v1/keys/rotate", "/v1/drain"):
        assert await call(client, "POST", path, b"{}".ljust(MAX_BODY_BYTES + 1)) == (413, expected)
    assert not ops.lifecycle.draining
    body = b'{"provider":"openai"}'.ljust(MAX_BODY_BYTES)  # exactly 64 KiB is taken
    assert (await call(client, "POST", "/v1/keys/rotate", body))[0] == 200
    assert ops.rotations == ["openai"]


# --- drain and resume ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "deadline_s"),
    [(None, 30.0), (b"{}", 30.0), (b'{"deadline_s":null}', 30.0), (b'{"deadline_s":5}', 5.0),
     (b'{"deadline_s":2.5}', 2.5), (b'{"deadline_s":0}', 0.0)],
)  # fmt: skip
async def test_drain(
    client: QuartClient,
    ops: FakeOps,
    autojump_clock: MockClock,
    body: bytes | None,
    deadline_s: float,
) -> None:
    with ops.lifecycle.work.track():
        response = await client.post("/v1/drain", data=body)
    assert response.status_code == 202
    text = await response.get_data(as_text=True)
    assert json.loads(text) == {"state": "draining", "inflight": 1, "deadline_s": deadline_s}
    assert f'"deadline_s":{deadline_s!r}' in text  # a float, whatever number the body had
    assert ops.lifecycle.drain_deadline == trio.current_time() + deadline_s


BAD_DEADLINES = ["-1", "-0.5", '"5"', "true", "false", "[5]", "{}", "NaN", "Infinity", "-Infinity"]


@pytest.mark.parametrize(
    "value",
    [*BAD_DEADLINES, pytest.param("1e400", id="float-1e400-is-inf"),
     pytest.param("1" + "0" * 400, id="int-10**400-too-big-for-a-float")],
)  # fmt: skip
async def test_drain_bad_deadline(client: QuartClient, ops: FakeOps, value: str) -> None:
    body = b'{"deadline_s":%s}' % value.encode()
    message = "deadline_s must be a number of seconds, 0 or more"
    assert await call(client, "POST", "/v1/drain", body) == bad_request(message)
    assert not ops.lifecycle.draining


async def test_drain_unknown_field(client: QuartClient, ops: FakeOps) -> None:
    message = "unknown field; this route takes deadline_s"
    assert await call(client, "POST", "/v1/drain", b'{"deadline":5}') == bad_request(message)
    assert not ops.lifecycle.draining


async def test_drain_progress_and_resume(
    client: QuartClient, ops: FakeOps, autojump_clock: MockClock
) -> None:
    def progress(state: str, inflight: int, remaining_s: float | None) -> tuple[int, Any]:
        return 200, {"state": state, "inflight": inflight, "remaining_s": remaining_s}

    assert await call(client, "POST", "/v1/resume") == (200, {"state": "ready"})  # no drain: no-op
    assert await call(client, "GET", "/v1/drain") == progress("ready", 0, None)
    expected = {"state": "draining", "inflight": 0, "deadline_s": 10.0}
    assert await call(client, "POST", "/v1/drain", b'{"deadline_s":10}') == (202, expected)
    await trio.sleep(4)
    with ops.lifecycle.work.track(), ops.lifecycle.work.track():
        assert await call(client, "GET", "/v1/drain") == progress("draining", 2, 6.0)
    assert (await call(client, "GET", "/v1/status"))[1]["state"] == "draining"
    # Draining again moves the deadline.
    expected = {"state": "draining", "inflight": 0, "deadline_s": 3.0}
    assert await call(client, "POST", "/v1/drain", b'{"deadline_s":3}') == (202, expected)
    assert await call(client, "GET", "/v1/drain") == progress("draining", 0, 3.0)
    await trio.sleep(7)
    assert await call(client, "GET", "/v1/drain") == progress("draining", 0, 0.0)
    assert await call(client, "POST", "/v1/resume") == (200, {"state": "ready"})
    assert await call(client, "GET", "/v1/drain") == progress("ready", 0, None)
    assert await call(client, "GET", "/readyz") == (200, {"ready": True})


async def test_drain_and_resume_while_stopping(
    client: QuartClient, ops: FakeOps, autojump_clock: MockClock
) -> None:
    ops.lifecycle.set_stopping(trio.current_time() + 5)
    message = "openclawd is shutting down: its own drain is running"
    expected = (409, {"error": "stopping", "message": message})
    assert await call(client, "POST", "/v1/drain", b'{"deadline_s":60}') == expected
    message = "openclawd is shutting down: a shutdown cannot be resumed"
    expected = (409, {"error": "stopping", "message": message})
    assert await call(client, "POST", "/v1/resume") == expected
    state = {"state": "stopping", "inflight": 0, "remaining_s": 5.0}
    assert await call(client, "GET", "/v1/drain") == (200, state)


@pytest.mark.parametrize(
    ("body", "message"),
    [(b"garbage", NOT_JSON), (b"\xff\xfe", NOT_JSON), (b"[1]", NOT_OBJECT), (b"null", NOT_OBJECT),
     (b'"ready"', NOT_OBJECT), (b'{"x":1}', "unknown field; this route takes no field")],
)  # fmt: skip
async def test_resume_bad_request(
    client: QuartClient, ops: FakeOps, autojump_clock: MockClock, body: bytes, message: str
) -> None:
    ops.drain(10)
    assert await call(client, "POST", "/v1/resume", body) == bad_request(message)
    assert ops.lifecycle.draining  # a refused resume leaves the drain running


@pytest.mark.parametrize("body", [None, b"", b" \n", b"{}"])
async def test_resume_takes_no_body_or_an_empty_object(
    client: QuartClient, ops: FakeOps, autojump_clock: MockClock, body: bytes | None
) -> None:
    ops.drain(10)
    assert await call(client, "POST", "/v1/resume", body) == (200, {"state": "ready"})
    assert not ops.lifecycle.draining


# --- metrics ------------------------------------------------------------------------------


async def test_metrics(client: QuartClient) -> None:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE
    families = list(text_string_to_metric_families(await response.get_data(as_text=True)))
    # CONTRACT.md 4's names (a counter's family drops its _total); more are welcome.
    contract = {
        "openclawd_connections": "gauge", "openclawd_requests": "counter",
        "openclawd_upstream_seconds": "histogram", "openclawd_upstream_retries": "counter",
        "openclawd_closes": "counter", "openclawd_key_version": "gauge",
        "openclawd_key_rotations": "counter", "openclawd_vault_errors": "counter",
        "openclawd_tokens": "counter",
    }  # fmt: skip
    assert contract.items() <= {family.name: family.type for family in families}.items()
    samples: dict[str, dict[tuple[str, ...], float]] = {}
    for sample in (sample for family in families for sample in family.samples):
        labels = tuple(value for _, value in sorted(sample.labels.items()))
        samples.setdefault(sample.name, {})[labels] = sample.value

    kinds = {("http",): 1, ("pending",): 0, ("realtime",): 1, ("ws",): 1}
    assert samples["openclawd_connections"] == kinds
    assert samples["openclawd_requests_total"] == {
        ("anthropic", "no_key"): 2, ("openai", "200"): 3, ("openai", "429"): 1,
        ("openai", "upstream_timeout"): 1,
    }  # fmt: skip
    bounds = [*(f"{b:g}" for b in LATENCY_BUCKETS_S), "+Inf"]  # labels: le, provider
    cumulative = (0, 0, 0, 1, 1, 3, 3, 3, 3, 3, 3, 3, 3, 4)
    assert samples["openclawd_upstream_seconds_bucket"] == {
        **{(le, "openai"): n for le, n in zip(bounds, cumulative, strict=True)},
        **{(le, "anthropic"): 0 for le in bounds},
    }
    assert samples["openclawd_upstream_seconds_count"] == {("openai",): 4, ("anthropic",): 0}
    assert samples["openclawd_upstream_seconds_sum"] == {("openai",): 61.5, ("anthropic",): 0}
    assert samples["openclawd_upstream_retries_total"] == {(): 3}  # 2 (openai) + 1
    assert samples["openclawd_closes_total"] == {("1000",): 4, ("1001",): 2}
    assert samples["openclawd_key_version"] == {("openai",): 4}  # none for a keyless provider
    # The anthropic secret in Vault cannot be used (its last read failed).
    assert samples["openclawd_key_invalid"] == {("anthropic",): 1, ("openai",): 0}
    rotated = {("openai", "vault"): 2, ("openai", "operator"): 1}
    assert samples["openclawd_key_rotations_total"] == {
        (p, t): rotated.get((p, t), 0) for p in ("anthropic", "openai") for t in TRIGGERS
    }
    assert set(TRIGGERS) == {"vault", "operator", "auth_failure", "reload"}
    assert samples["openclawd_vault_errors_total"] == {(): 7}
    assert samples["openclawd_tokens_total"] == {  # labels: kind, provider
        ("completion", "anthropic"): 0, ("prompt", "anthropic"): 0,
        ("completion", "openai"): 5, ("prompt", "openai"): 10,
    }  # fmt: skip


# --- methods, routes, internal errors -----------------------------------------------------

NOT_POST = ("GET", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS")
WRONG_METHODS = [
    *((m, path, "POST") for path in ("/v1/keys/rotate", "/v1/resume") for m in NOT_POST),
    *((m, "/v1/drain", "GET, HEAD, POST") for m in ("PUT", "DELETE", "PATCH", "OPTIONS")),
    *((m, path, "GET, HEAD") for path in ("/healthz", "/readyz", "/v1/status", "/metrics")
      for m in ("POST", "PUT", "DELETE", "OPTIONS")),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "allow"), WRONG_METHODS)
async def test_wrong_method_is_405(
    client: QuartClient, ops: FakeOps, method: str, path: str, allow: str
) -> None:
    response = await client.open(path, method=method, data=b"{}")
    assert response.status_code == 405
    assert sorted(response.headers["allow"].split(", ")) == allow.split(", ")
    message = f"{path} does not take {method}"
    assert await response.get_json() == {"error": "method_not_allowed", "message": message}
    assert ops.rotations == []
    assert not ops.lifecycle.draining


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/"), ("GET", "/v1/nope"), ("POST", "/v1/keys"), ("GET", "/v1/status/")],
)
async def test_unknown_route_is_404(client: QuartClient, method: str, path: str) -> None:
    expected = {"error": "not_found", "message": "no such route"}  # the path is not repeated
    assert await call(client, method, path) == (404, expected)


@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/v1/keys/rotate"), ("GET", "/v1/status"), ("GET", "/metrics")]
)
async def test_a_bug_in_the_daemon_is_500_without_details(
    client: QuartClient, ops: FakeOps, method: str, path: str
) -> None:
    ops.rotate_answer = RuntimeError("rotation broke at /srv/secret/path")
    ops.broken = True
    response = await client.open(path, method=method)
    assert response.status_code == 500
    text = await response.get_data(as_text=True)
    expected = {"error": "internal", "message": "internal error; see the daemon's log"}
    assert json.loads(text) == expected
    assert "Traceback" not in text
    assert "/srv/secret/path" not in text


# --- BearerAuth (the TCP listener) --------------------------------------------------------

REQUEST: list[asgi.ASGIReceiveEvent] = [{"type": "http.request", "body": b"", "more_body": False}]


def http_scope(*authorization: bytes, path: str = "/healthz") -> asgi.Scope:
    headers = [(b"host", b"127.0.0.1:8765"), *((b"authorization", a) for a in authorization)]
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": headers, "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8765), "state": asgi.ConnectionState({}), "extensions": {},
    }  # fmt: skip


async def run_asgi(
    app: asgi.ASGIFramework, scope: asgi.Scope, events: list[asgi.ASGIReceiveEvent]
) -> list[dict[str, Any]]:
    """Call ``app`` with ``events`` to receive (then nothing more); return what it sent."""
    sent: list[dict[str, Any]] = []

    async def receive() -> asgi.ASGIReceiveEvent:
        if events:
            return events.pop(0)
        await trio.sleep_forever()

    async def send(event: asgi.ASGISendEvent) -> None:
        sent.append(cast(dict[str, Any], event))

    with trio.fail_after(5):
        await app(scope, receive, send)
    return sent


class InnerApp:
    """What BearerAuth lets requests through to: answers 200 ``inner``."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def __call__(
        self, scope: asgi.Scope, receive: asgi.ASGIReceiveCallable, send: asgi.ASGISendCallable
    ) -> None:
        assert scope["type"] == "http"
        self.paths.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"inner", "more_body": False})


@pytest.mark.parametrize(
    "authorization",
    [(), (b"Bearer wrong-token",), (b"Bearer s3cret-tokenX",), (b"Bearer",), (b"Bearer ",),
     (b"s3cret-token",), (b"Basic czNjcmV0LXRva2Vu",), (b"Basic s3cret-token",),
     (b"Bearer s3cret-token", b"Bearer s3cret-token"), (b"Bearer s3cret-token", b"Bearer x")],
)  # fmt: skip
async def test_bearer_auth_refuses(authorization: tuple[bytes, ...]) -> None:
    inner = InnerApp()
    sent = await run_asgi(BearerAuth(inner, TOKEN), http_scope(*authorization), list(REQUEST))
    assert [event["type"] for event in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 401
    headers = dict(sent[0]["headers"])
    assert headers[b"www-authenticate"] == b'Bearer realm="openclawd"'
    assert headers[b"content-type"] == b"application/json"
    assert int(headers[b"content-length"]) == len(sent[1]["body"])
    message = "Authorization: Bearer <token> required"
    assert json.loads(sent[1]["body"]) == {"error": "unauthorized", "message": message}
    assert inner.paths == []


@pytest.mark.parametrize("scheme", [b"Bearer", b"bearer", b"BEARER"])
async def test_bearer_auth_lets_the_token_through(scheme: bytes) -> None:
    inner = InnerApp()
    scope = http_scope(scheme + b" s3cret-token")
    sent = await run_asgi(BearerAuth(inner, TOKEN), scope, list(REQUEST))
    assert (sent[0]["status"], sent[1]["body"]) == (200, b"inner")
    assert inner.paths == ["/healthz"]


async def test_bearer_auth_in_front_of_the_control_app(ops: FakeOps) -> None:
    guarded = BearerAuth(create_app(ops), TOKEN)
    sent = await run_asgi(guarded, http_scope(b"Bearer s3cret-token"), list(REQUEST))
    assert sent[0]["status"] == 200
    assert json.loads(b"".join(event.get("body", b"") for event in sent)) == {"status": "ok"}
    sent = await run_asgi(guarded, http_scope(path="/v1/status"), list(REQUEST))
    assert sent[0]["status"] == 401


async def test_bearer_auth_answers_the_lifespan_itself() -> None:
    inner = InnerApp()
    scope: asgi.Scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    events: list[asgi.ASGIReceiveEvent] = [{"type": "lifespan.startup"}]
    events.append({"type": "lifespan.shutdown"})
    sent = await run_asgi(BearerAuth(inner, TOKEN), scope, events)
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]
    assert inner.paths == []
