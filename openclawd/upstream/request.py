"""What is sent to a provider: the app's request, with the key, as httpx's request.

``UpstreamRequest`` is what a driver asks for; ``build`` makes it the request one attempt
sends: the target joined to the provider's ``base_url`` (with the provider's ``query``),
the key in the provider's auth header (any the app sent is dropped again, whatever a
reload changed), the request's span's ``traceparent`` (tracing on), the provider's
``headers`` and those httpx.AsyncClient would have added (each unless the app sent its
own), and the timeouts as the transport takes them.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode

import httpx

from openclawd.config import ProviderConfig
from openclawd.keys.manager import Key
from openclawd.tracing import OFF, Trace

# What httpx.AsyncClient would have added to every request, unless the app sent its own.
DEFAULT_HEADERS = (
    ("accept", "*/*"),
    ("accept-encoding", "gzip, deflate"),
    ("user-agent", f"python-httpx/{httpx.__version__}"),
)


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """What to send: ``target`` is the path (and query) under the provider's ``base_url``.
    ``headers`` come from the app, already cleared of credential and hop-by-hop headers;
    ``trace`` is the app request's span (its traceparent goes upstream, its retries and
    key re-reads are its events)."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...] = ()
    content: bytes | AsyncIterable[bytes] | None = None
    trace: Trace = OFF

    @property
    def replayable(self) -> bool:
        """Can it be sent again? A streamed body is read once: never retried."""
        return self.content is None or isinstance(self.content, bytes)

    def build(
        self, config: ProviderConfig, key: Key, base: UrlBase, timeout: dict[str, float | None]
    ) -> httpx.Request:
        """The request one attempt sends, with ``key``."""
        auth = config.auth_header.lower()
        # Refused earlier; dropped here too, whatever a reload changed in between.
        headers = [(k, v) for k, v in self.headers if k.lower() != auth]
        self.trace.propagate(headers)
        secret = f"{config.auth_scheme} {key.secret}" if config.auth_scheme else key.secret
        headers.append((config.auth_header, secret))
        add_missing(headers, (*config.headers.items(), *DEFAULT_HEADERS))
        return httpx.Request(
            self.method,
            base.join(self.target),
            headers=headers,
            content=self.content,
            extensions={"timeout": timeout},
        )


def timeouts(config: ProviderConfig) -> dict[str, float | None]:
    """connect, read gap (and write), and the wait for a pooled connection, as the
    transport takes them (a request's ``timeout`` extension)."""
    return httpx.Timeout(
        connect=config.connect_timeout_s,
        read=config.read_timeout_s,
        write=config.read_timeout_s,
        pool=config.connect_timeout_s,
    ).as_dict()


class UrlBase:
    """``base_url`` joined with request targets as httpx.AsyncClient joins them (the
    target's path appended to the base's), the provider's ``query`` parameters added
    where the target has none of that name, with the parsed URLs of recent targets kept:
    parsing one costs more than the rest of building a request."""

    _CACHED = 256

    def __init__(self, base_url: str, query: Mapping[str, str] | None = None) -> None:
        base = httpx.URL(base_url)
        self.host = base.host  # server.address, for traces
        self._base = base.copy_with(raw_path=base.raw_path.rstrip(b"/") + b"/")
        self._query = query or {}
        self._cache: dict[str, httpx.URL] = {}

    def join(self, target: str) -> httpx.URL:
        url = self._cache.get(target)
        if url is None:
            relative = httpx.URL(with_query(target, self._query))
            url = self._base.copy_with(
                raw_path=self._base.raw_path + relative.raw_path.lstrip(b"/")
            )
            if len(self._cache) >= self._CACHED:
                self._cache.clear()
            self._cache[target] = url
        return url


def add_missing(headers: list[tuple[str, str]], defaults: Iterable[tuple[str, str]]) -> None:
    """Add each of ``defaults`` (lower-case names) that ``headers`` lacks: the app's own
    wins; a default of "" is not sent."""
    for name, value in defaults:
        if value and not any(k.lower() == name for k, _ in headers):
            headers.append((name, value))


def with_query(target: str, defaults: Mapping[str, str]) -> str:
    """``target`` (a path and maybe a query) with each of ``defaults`` added whose name
    its query does not have: the app's own value wins; a default of "" is not sent."""
    path, mark, query = target.partition("?")
    given = {name for name, _ in parse_qsl(query, keep_blank_values=True)}
    added = urlencode([(k, v) for k, v in defaults.items() if v and k not in given])
    if not added:
        return target
    return f"{path}?{query}&{added}" if mark and query else f"{path}?{added}"
