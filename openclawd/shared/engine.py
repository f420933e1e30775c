"""The one importer of ``valkey-glide``: the fleet's shared limits in a Valkey (or Redis OSS)
engine, standalone or cluster (CONTRACT.md 5.6).

It owns the engine's client, the key layout and two server-side scripts; it does not know
what a limit is for (clients, providers, leases: the limits logic decides), and it never
reads the password file: the caller reads it and passes the password in. Every error of the
client is translated here, once, into ``SharedUnavailableError``, whose message names the
engine's host and port and never its password.

Time is the engine's: each script reads ``redis.call('TIME')``, so the hosts' clock skew does
not matter. A limit's keys are ``{NAMESPACE:NAME}:minute`` and ``{NAMESPACE:NAME}:day``: the
hash tag is per limit, so one limit's keys share a cluster slot, and limits spread over the
masters.

glide under trio: its async client runs under trio through anyio (sniffio finds trio);
answers come back through a pipe that a trio system task of glide's reads, started in the
current ``trio.run`` by the first client. Clients are made with ``lazy_connect``: glide's
eager connect is a blocking call into its core (seconds, against a dead host), which would
stall the event loop; a lazy client connects on its first command, and a client made while
the engine is down works once the engine is back (glide reconnects by itself).
"""

from __future__ import annotations

import contextlib
import enum
import math
import sys
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from glide import (
    AdvancedGlideClientConfiguration,
    AdvancedGlideClusterClientConfiguration,
    GlideClient,
    GlideClientConfiguration,
    GlideClusterClient,
    GlideClusterClientConfiguration,
    GlideError,
    Logger,
    LogLevel,
    NodeAddress,
    Script,
    ServerCredentials,
)

from openclawd.errors import SharedUnavailableError
from openclawd.shared.address import EngineAddress, parse_url
from openclawd.shared.scripts import BUCKET, DAY, WORD
from openclawd.upstream.headroom import Word

# glide puts deprecated alias modules (``glide.config``, ...) in sys.modules, each warning
# (DeprecationWarning) at its first attribute read; whatever walks sys.modules reading
# ``__file__`` (hypothesis, pytest's warning filters as errors) would trip on them. Each
# warns once: spend that once here, silenced.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    for _name, _module in list(sys.modules.items()):
        if _name.startswith("glide."):
            getattr(_module, "__file__", None)

MAX_ERROR_TEXT = 300  # characters of the client's own text kept in our message

_KINDS = ("requests", "tokens")


class Period(enum.Enum):
    """How a limit refills: a bucket refilled continuously, or a total per UTC day."""

    MINUTE = "minute"  # N at most at once, refilled N/60 a second
    DAY = "day"  # at most N per UTC day of the engine's clock


@dataclass(frozen=True, slots=True)
class Limit:
    """One shared limit: ``name`` (unique in the namespace, e.g.
    ``provider:openai:requests_per_minute``) and its capacity N per ``period``."""

    name: str
    capacity: int
    period: Period = Period.MINUTE

    def __post_init__(self) -> None:
        _check_name("limit name", self.name)
        if self.capacity <= 0:
            raise ValueError(f"limit {self.name}: capacity must be positive")


@dataclass(frozen=True, slots=True)
class Take:
    """The engine's answer to a take.

    ``used``: what the limit has spent (after this take, if it fitted); for a bucket, what
    is not refilled yet (over the capacity while in debt after an ``adjust``), for a day,
    the day's total. ``retry_after_s``: 0 when it fitted, else the seconds until ``amount``
    would fit by the engine's clock, ``math.inf`` if never (more than the capacity).
    """

    fitted: bool
    used: float
    retry_after_s: float


def _check_name(what: str, name: str) -> None:
    # A brace would end or move the hash tag; blanks make keys hard to read in a CLI.
    if not name or any(c in name for c in "{} \t\r\n"):
        raise ValueError(f"{what} must be non-empty, without braces or blanks")


class Engine:
    """A connected engine: takes, adjusts and reads shared limits. Made by ``open_engine``."""

    def __init__(
        self,
        client: GlideClient | GlideClusterClient,
        address: EngineAddress,
        *,
        namespace: str,
        cluster: bool,
        password: str | None,
    ) -> None:
        self._client = client
        self._secret = password  # only to scrub it from the client's error texts
        # (glide's Script wrapper has no annotations; the rest of glide's API does)
        self._scripts = {
            Period.MINUTE: Script(BUCKET),  # type: ignore[no-untyped-call]
            Period.DAY: Script(DAY),  # type: ignore[no-untyped-call]
        }
        self._word = Script(WORD)  # type: ignore[no-untyped-call]
        self.address = address
        self.namespace = namespace
        self.cluster = cluster

    def __repr__(self) -> str:
        kind = "cluster" if self.cluster else "standalone"
        return f"<Engine {kind} {self.address} namespace={self.namespace}>"

    def key(self, limit: Limit) -> str:
        """The engine key of ``limit``: hash-tagged by namespace and name."""
        return f"{{{self.namespace}:{limit.name}}}:{limit.period.value}"

    async def take(self, limit: Limit, amount: int) -> Take:
        """Take ``amount`` out of ``limit`` if it fits (atomically, one script call).

        Raises:
            SharedUnavailableError: the engine failed or timed out; the take may or may not
                have been made (it refills, or ``adjust`` gives it back).

        Cancellation: a take cancelled while it waits for its answer may or may not be
        made (whole, if at all), perhaps after calls made later: glide keeps no order
        between calls in flight together. Shield the call to know; a per-minute take left
        unknown refills within the minute.
        """
        if amount < 0:
            raise ValueError("a take is not negative: use adjust() to give back")
        return await self._run(limit, "take", amount)

    async def adjust(self, limit: Limit, delta: int) -> float:
        """Charge ``delta`` more to ``limit`` whatever its room (a correction up: a bucket
        may go into debt), or give ``-delta`` back (a refund: never below nothing used).
        Returns ``used`` after it.

        Raises:
            SharedUnavailableError: the engine failed; the adjustment may or may not be made.
        """
        return (await self._run(limit, "adjust", delta)).used

    async def used(self, limit: Limit) -> float:
        """What ``limit`` has spent now, fleet-wide (see ``Take.used``).

        Raises:
            SharedUnavailableError: the engine failed.
        """
        return (await self._run(limit, "used", 0)).used

    async def upstream_word(self, provider: str, mine: Word | None) -> Word | None:
        """Pass ``mine`` (this daemon's latest word from ``provider``'s upstream, if new) to
        the fleet, and return the fleet's latest (perhaps ``mine``); None if none yet. One
        script call; the key is ``{NAMESPACE:provider:NAME:upstream}:word``.

        Raises:
            SharedUnavailableError: the engine failed.
        """
        _check_name("provider", provider)
        args = ["", "", "", "", ""]
        if mine is not None:
            args = [_number(mine.age_s)]
            for kind in _KINDS:
                args += [_number(mine.remaining[kind]), _number(mine.reset_in_s[kind])]
        key = f"{{{self.namespace}:provider:{provider}:upstream}}:word"
        try:
            reply = await self._client.invoke_script(self._word, keys=[key], args=args)
        except (GlideError, OSError) as exc:
            raise self._error(f"upstream word of {provider}", exc) from None
        return _parse_word(reply)

    async def ping(self) -> None:
        """One round trip to the engine (a cluster: to one of its nodes).

        Raises:
            SharedUnavailableError: the engine did not answer.
        """
        try:
            await self._client.custom_command(["PING"])
        except (GlideError, OSError) as exc:
            raise self._error("ping", exc) from None

    async def aclose(self) -> None:
        """Close the client; idempotent. Calls in flight fail with our error."""
        await self._client.close()

    async def _run(self, limit: Limit, op: str, amount: int) -> Take:
        args = [op, str(limit.capacity), str(amount)]
        try:
            reply = await self._client.invoke_script(
                self._scripts[limit.period], keys=[self.key(limit)], args=args
            )
        except (GlideError, OSError) as exc:
            raise self._error(f"{op} {limit.name}", exc) from None
        take = _parse_reply(reply)
        if take is None:
            raise SharedUnavailableError(
                f"shared engine {self.address}: {op} {limit.name}: unexpected answer"
            )
        return take

    def _error(self, what: str, exc: Exception) -> SharedUnavailableError:
        return _translate(self.address, what, exc, self._secret)


def _translate(
    address: EngineAddress, what: str, exc: Exception, secret: str | None
) -> SharedUnavailableError:
    """The one translation of the client's errors: the address, what failed, the client's
    error class and text (cut, the password scrubbed: glide's texts do not hold it, and
    this keeps it so)."""
    text = " ".join(str(exc).split())[:MAX_ERROR_TEXT]
    if secret:
        text = text.replace(secret, "***")
    return SharedUnavailableError(f"shared engine {address}: {what}: {type(exc).__name__}: {text}")


def _parse_reply(reply: Any) -> Take | None:
    """A script's ``{fitted, used, retry_after}``, or None if the answer is not that."""
    if not isinstance(reply, list) or len(reply) != 3:
        return None
    fitted, used, wait = reply
    try:
        used_f, wait_f = float(used), float(wait)
    except (TypeError, ValueError):
        return None
    return Take(fitted=fitted == 1, used=used_f, retry_after_s=math.inf if wait_f < 0 else wait_f)


def _number(value: float | None) -> str:
    return "" if value is None else repr(value)


def _parse_word(reply: Any) -> Word | None:
    """A stored word's ``{age, requests, requests_reset_in, tokens, tokens_reset_in}``."""
    if not isinstance(reply, list) or len(reply) != 5:
        return None

    def read(value: Any, kind: type[float] | type[int]) -> Any:
        text = value.decode() if isinstance(value, bytes) else str(value)
        if not text:
            return None
        try:
            return kind(float(text))
        except ValueError:
            return None

    age = read(reply[0], float)
    if age is None:
        return None
    remaining = {"requests": read(reply[1], int), "tokens": read(reply[3], int)}
    reset_in = {"requests": read(reply[2], float), "tokens": read(reply[4], float)}
    return Word(max(0.0, age), remaining, reset_in)


@contextlib.asynccontextmanager
async def open_engine(
    url: str,
    *,
    password: str | None,
    cluster: bool = False,
    namespace: str = "openclawd",
    timeout_s: float = 0.5,
    connect_timeout_s: float = 1.0,
) -> AsyncIterator[Engine]:
    """A client of the engine at ``url`` (a cluster's seed node if ``cluster``), closed on
    exit. It connects on its first command: an engine that is down does not fail this, its
    calls do (``SharedUnavailableError``) until the engine is back.

    Args:
        url: ``redis://``, ``rediss://``, ``valkey://`` or ``valkeys://`` HOST[:PORT],
            without credentials.
        password: the engine's password (read by the caller from its file), or None.
        timeout_s: a command's bound, reconnects and retries included.
        connect_timeout_s: a connection attempt's bound.

    Raises:
        ValueError: a bad ``url`` or ``namespace`` (the message never repeats the url).
        SharedUnavailableError: the client could not be made.
    """
    address = parse_url(url)
    _check_name("namespace", namespace)
    # glide's core logs to stdout, in a format of its own; what matters reaches our log
    # as our error, from whoever called.
    Logger.set_logger_config(LogLevel.OFF)
    credentials = ServerCredentials(password=password) if password else None
    common: dict[str, Any] = {
        "addresses": [NodeAddress(address.host, address.port)],
        "use_tls": address.tls,
        "credentials": credentials,
        "request_timeout": max(1, round(timeout_s * 1000)),
        "client_name": "openclawd",
        "lazy_connect": True,
    }
    connect_ms = max(1, round(connect_timeout_s * 1000))
    client: GlideClient | GlideClusterClient
    try:
        if cluster:
            client = await GlideClusterClient.create(
                GlideClusterClientConfiguration(
                    **common,
                    advanced_config=AdvancedGlideClusterClientConfiguration(connect_ms),
                )
            )
        else:
            client = await GlideClient.create(
                GlideClientConfiguration(
                    **common, advanced_config=AdvancedGlideClientConfiguration(connect_ms)
                )
            )
    except (GlideError, OSError) as exc:
        raise _translate(address, "connect", exc, password) from None
    engine = Engine(client, address, namespace=namespace, cluster=cluster, password=password)
    try:
        yield engine
    finally:
        await engine.aclose()
