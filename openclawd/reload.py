"""What a reload (SIGHUP) can change: the keys it cannot, and the keys that changed.

``RESTART_ONLY`` is the one table of keys that need a restart; ``changed_keys`` names what
a new config changes, and ``keep_restart_only`` keeps the values in force for the keys a
reload cannot apply. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses

from openclawd.config import Config

# The keys a reload cannot change, and why: the sockets are bound once, at start; the Vault
# client (address, credentials, mount, TLS, request timeout) is built once, at start; so is
# the connection to the shared engine of [shared] (its address, password, key namespace and
# the policy and share it falls back to); so is the tracer of [tracing] (its collector,
# headers, sampler and queue). A reload that changes one logs
# ``config.needs_restart`` and keeps the value in force; every other key applies on SIGHUP
# (tests/daemon/test_reload.py proves each one), clients, routes and limits included.
RESTART_ONLY = frozenset(
    {
        "listen.socket",
        "listen.mode",
        "listen.group",
        "control.socket",
        "control.mode",
        "control.group",
        "control.tcp",
        "control.token_file",
        "vault.addr",
        "vault.auth",
        "vault.token_file",
        "vault.role_id_file",
        "vault.secret_id_file",
        "vault.mount",
        "vault.request_timeout_s",
        "vault.ca_cert",
        "vault.allow_insecure",
        "shared.url",
        "shared.cluster",
        "shared.password_file",
        "shared.namespace",
        "shared.on_failure",
        "shared.expected_daemons",
        "tracing.otlp_endpoint",
        "tracing.service_name",
        "tracing.sample_ratio",
        "tracing.headers_file",
        "tracing.max_queue_spans",
        "tracing.export_timeout_s",
    }
)
# Tables of named tables: an entry added or removed is one change, ``SECTION.NAME``.
_NAMED = ("providers", "clients", "routes")


def _flat(config: Config) -> dict[str, object]:
    """Every key of ``config`` by its dotted path: ``SECTION.KEY``, ``providers.NAME.KEY``
    (``providers.NAME.limits.KEY`` for a sub-table), ``clients.NAME.KEY``, ``routes.NAME.KEY``."""
    keys: dict[str, object] = {}
    for section in dataclasses.fields(config):
        if section.name == "source":
            continue
        value = getattr(config, section.name)
        if section.name in _NAMED:
            for name, table in value.items():
                _flatten(f"{section.name}.{name}", table, keys)
        else:
            _flatten(section.name, value, keys)
    return keys


def _flatten(prefix: str, table: object, keys: dict[str, object]) -> None:
    for f in dataclasses.fields(table):  # type: ignore[arg-type]
        value = getattr(table, f.name)
        if dataclasses.is_dataclass(value):
            _flatten(f"{prefix}.{f.name}", value, keys)
        else:
            keys[f"{prefix}.{f.name}"] = value


def changed_keys(old: Config, new: Config) -> list[str]:
    """The dotted keys whose values differ, sorted; a provider, client or route added or
    removed is one entry, ``providers.NAME`` (``clients.NAME``, ``routes.NAME``)."""
    before, after = _flat(old), _flat(new)
    both = {
        section: getattr(old, section).keys() & getattr(new, section).keys() for section in _NAMED
    }
    changed = set()
    for key in before.keys() | after.keys():
        if before.get(key, _MISSING) == after.get(key, _MISSING):
            continue
        section, name, *_ = key.split(".")
        if section in both and name not in both[section]:
            key = f"{section}.{name}"
        changed.add(key)
    return sorted(changed)


_MISSING = object()


def keep_restart_only(old: Config, new: Config) -> Config:
    """``new`` with the values of ``old`` for every key in ``RESTART_ONLY``."""
    sections: dict[str, object] = {}
    for key in RESTART_ONLY:
        section, name = key.split(".")
        table = sections.get(section, getattr(new, section))
        sections[section] = dataclasses.replace(
            table,  # type: ignore[type-var]
            **{name: getattr(getattr(old, section), name)},
        )
    return dataclasses.replace(new, **sections)  # type: ignore[arg-type]
