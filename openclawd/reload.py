"""What a reload (SIGHUP) can change: the keys it cannot, and the keys that changed.

``RESTART_ONLY`` is the one table of keys that need a restart; ``changed_keys`` names what
a new config changes, and ``keep_restart_only`` keeps the values in force for the keys a
reload cannot apply. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses

from openclawd.config import Config

# The keys a reload cannot change, and why: the sockets are bound once, at start; the Vault
# client (address, credentials, mount, TLS, request timeout) is built once, at start. A
# reload that changes one logs ``config.needs_restart`` and keeps the value in force; every
# other key applies on SIGHUP (tests/daemon/test_reload.py proves each one).
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
    }
)


def _flat(config: Config) -> dict[str, object]:
    """Every key of ``config`` by its dotted path (``providers.NAME.KEY`` for providers)."""
    keys: dict[str, object] = {}
    for section in dataclasses.fields(config):
        if section.name in ("providers", "source"):
            continue
        table = getattr(config, section.name)
        for f in dataclasses.fields(table):
            keys[f"{section.name}.{f.name}"] = getattr(table, f.name)
    for name, provider in config.providers.items():
        for f in dataclasses.fields(provider):
            keys[f"providers.{name}.{f.name}"] = getattr(provider, f.name)
    return keys


def changed_keys(old: Config, new: Config) -> list[str]:
    """The dotted keys whose values differ, sorted; a provider added or removed is one
    entry, ``providers.NAME``."""
    before, after = _flat(old), _flat(new)
    both = old.providers.keys() & new.providers.keys()
    changed = set()
    for key in before.keys() | after.keys():
        if before.get(key, _MISSING) == after.get(key, _MISSING):
            continue
        if key.startswith("providers.") and key.split(".")[1] not in both:
            key = ".".join(key.split(".")[:2])
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
