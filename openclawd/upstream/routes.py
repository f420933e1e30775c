"""Routes: one name for several providers, tried in order (CONTRACT.md 5.4).

An app names a route wherever it names a provider. ``open_route`` picks the first provider
of the route whose circuit is not open and whose upstream has headroom, and sends the
request there; when that provider answers 429 or 5xx, or cannot be reached, before any
byte was relayed, the request goes to the next one at once. Only the last provider of a
route retries as its config says (the others give way at the first failure). A plain
provider's name is a route of one. The body's ``model`` may be rewritten per provider.
Each move to the next provider is counted (``Upstreams.fallbacks``) and logged.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import trio

from openclawd import logs
from openclawd.errors import OpenclawdError, RateLimitedError, UnknownProviderError, UpstreamError
from openclawd.upstream.http import ProviderPool, UpstreamRequest, UpstreamResponse, Upstreams

__all__ = ["Candidate", "candidates", "open_route", "rewrite_model"]

log = logs.get(__name__)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One provider a request may go to, and its rewrites of the body's ``model``."""

    pool: ProviderPool
    models: Mapping[str, str]
    last: bool


def candidates(upstreams: Upstreams, name: str) -> list[Candidate]:
    """The providers ``name`` (a route or a provider) sends to, in order.

    Raises:
        UnknownProviderError: ``name`` is neither.
    """
    route = upstreams.routes.get(name)
    if route is None:
        return [Candidate(upstreams[name], {}, last=True)]
    names = list(route.providers)
    return [
        Candidate(upstreams[p], route.models.get(p, {}), last=i == len(names) - 1)
        for i, p in enumerate(names)
    ]


def rewrite_model(body: Any, models: Mapping[str, str]) -> Any:
    """``body`` with its ``model`` rewritten as ``models`` says (a copy; else ``body``)."""
    if models and isinstance(body, dict) and body.get("model") in models:
        return {**body, "model": models[body["model"]]}
    return body


def rewrite_model_bytes(content: bytes, models: Mapping[str, str]) -> bytes:
    """``rewrite_model`` over a JSON body's bytes (unchanged unless it is rewritten)."""
    if not models or not content.lstrip().startswith(b"{"):
        return content
    try:
        body = json.loads(content)
    except (ValueError, RecursionError):
        return content
    rewritten = rewrite_model(body, models)
    return content if rewritten is body else json.dumps(rewritten).encode()


def _gives_way(response: UpstreamResponse) -> str | None:
    """Why a route's provider gives way to the next after this answer, if it does."""
    if response.status == 429:
        return "429"
    if response.status >= 500:
        return str(response.status)
    return None


# A route's provider's limits: take them for the provider about to be tried, and return a
# function that gives them back (when the route moves on). Raises the refusal.
TakeLimits = Callable[[str], Awaitable[Callable[[], None]]]


@contextlib.asynccontextmanager
async def open_route(
    upstreams: Upstreams,
    name: str,
    request_for: Callable[[Candidate], UpstreamRequest],
    take_limits: TakeLimits | None = None,
) -> AsyncIterator[tuple[str, UpstreamResponse]]:
    """Send the request (``request_for`` builds it for each provider tried) to the first
    provider of ``name`` that takes it; yields that provider's name and its response. For
    a route, ``take_limits`` charges each provider's own limits as it is tried (a provider
    named directly was charged at admission).

    Raises:
        OpenclawdError: as ``ProviderPool.open``, from the last provider tried; a limit's
            refusal of the last provider.
    """
    tried = candidates(upstreams, name)
    routed = name in upstreams.routes
    for index, candidate in enumerate(tried):
        pool = candidate.pool
        if not candidate.last and not pool.has_room(trio.current_time()):
            _fell_back(upstreams, name, pool.name, tried[index + 1].pool.name, "no room")
            continue
        give_back: Callable[[], None] = lambda: None  # noqa: E731
        if routed and take_limits is not None:
            try:
                give_back = await take_limits(pool.name)
            except RateLimitedError as refused:
                if candidate.last:
                    raise
                _fell_back(upstreams, name, pool.name, tried[index + 1].pool.name, refused.code)
                continue
        request = request_for(candidate)
        # A body streamed from the app is read once: it goes to this provider or nowhere.
        last = candidate.last or not request.replayable
        async with contextlib.AsyncExitStack() as stack:
            try:
                opened = pool.open(request, retry=last)
                response = await stack.enter_async_context(opened)
            except (UpstreamError, UnknownProviderError) as exc:
                if last:
                    raise
                give_back()
                _fell_back(upstreams, name, pool.name, tried[index + 1].pool.name, exc.code)
                continue
            reason = None if last else _gives_way(response)
            if reason is None:
                yield pool.name, response
                return
            give_back()
            _fell_back(upstreams, name, pool.name, tried[index + 1].pool.name, reason)
    raise OpenclawdError(f"route {name} has no provider")  # the config forbids it


def _fell_back(upstreams: Upstreams, route: str, gone: str, to: str, reason: str) -> None:
    upstreams.fallbacks[(route, gone, to, reason)] += 1
    log.info("route.fallback", route=route, provider=gone, to=to, reason=reason)
