"""What a config's token control means, in words (``openclawd check-config``): who is which
client, what each may use, each limit as a rate, how routes fall back, and whether the
limits are this daemon's alone or a fleet's (CONTRACT.md section 5).

Printed as ``#`` comments after the effective config, so the output stays a valid config.
Never an engine URL's credentials (the config refuses them) nor a file's content: only
names, figures and the engine's host and port.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from openclawd.config import ClientConfig, Config, ProviderLimits
from openclawd.shared.address import parse_url

__all__ = ["token_control"]

_PER_MINUTE = ("requests_per_minute", "tokens_per_minute")


def token_control(cfg: Config) -> str:
    """The explanation of ``cfg``'s token control, as comment lines ending in a newline."""
    lines = ["", "# token control (CONTRACT.md section 5), as this config has it:"]
    lines += [f"#   {line}" for line in _lines(cfg)]
    return "\n".join(lines) + "\n"


def _lines(cfg: Config) -> Iterator[str]:
    for client in cfg.clients.values():
        yield from _client(client)
    if "default" not in cfg.clients:
        yield "client default (a peer no client matches): may use everything; no limits"
    per_uid = cfg.limits.requests_per_minute
    if per_uid:
        yield (
            f"[limits] requests_per_minute {per_uid}: per peer uid, "
            "for clients without limits of their own"
        )
    for name, provider in cfg.providers.items():
        set_limits = _per_minute(provider.limits)
        if set_limits:
            yield f"provider {name}: " + "; ".join(set_limits)
    for route in cfg.routes.values():
        yield f"route {route.name}: tries {' then '.join(route.providers)}" + _rewrites(
            route.models
        )
    yield (
        "tokens are charged before a request is sent (body bytes / 4, plus max_completion_"
        "tokens, max_tokens or max_output_tokens, else "
        f"{cfg.limits.default_completion_tokens}), then corrected to the reported usage"
    )
    yield from _shared(cfg)


def _client(client: ClientConfig) -> Iterator[str]:
    matched = [
        f"{what} {', '.join(str(v) for v in values)}"
        for what, values in (("uid", client.uids), ("gid", client.gids), ("unit", client.units))
        if values
    ]
    who = " or ".join(matched) if matched else "nobody (no uids, gids or units)"
    uses = ", ".join(client.providers) if client.providers else "every provider and route"
    models = ", ".join(client.models) if client.models else "any model"
    yield f"client {client.name}: a peer with {who}; may use {uses}; {models}"
    set_limits = _per_minute(client)
    if client.tokens_per_day:
        set_limits.append(f"tokens_per_day {client.tokens_per_day} (a budget per UTC day)")
    yield f"  limits: {'; '.join(set_limits) if set_limits else 'none of its own'}"


def _per_minute(limits: ClientConfig | ProviderLimits) -> list[str]:
    """Each per-minute limit that is set, as a rate."""
    return [
        f"{key} {figure} (at most {figure} at once, refilled {figure / 60:.4g} a second)"
        for key in _PER_MINUTE
        if (figure := getattr(limits, key))
    ]


def _rewrites(models: Mapping[str, Mapping[str, str]]) -> str:
    if not models:
        return ""
    parts = [
        f"{provider}: {old} -> {new}"
        for provider, table in models.items()
        for old, new in table.items()
    ]
    return f"; model rewrites: {', '.join(parts)}"


def _shared(cfg: Config) -> Iterator[str]:
    shared = cfg.shared
    if not shared.url:
        yield "no [shared] url: every limit is this daemon's alone"
        return
    address = parse_url(shared.url)
    kind = "cluster (seed node)" if shared.cluster else "server"
    yield (
        f"shared: every limit above and the upstreams' headroom are shared by every daemon "
        f'using the {kind} {address} with namespace "{shared.namespace}"'
    )
    if shared.on_failure == "local":
        yield (
            "while it does not answer: each daemon keeps limit / "
            f"{shared.expected_daemons} (expected_daemons) alone"
        )
    else:
        yield "while it does not answer: requests under a shared limit are refused"
