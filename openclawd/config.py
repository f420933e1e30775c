"""The configuration: frozen dataclasses mirroring the TOML tables of CONTRACT.md.

``parse(mapping, source=..., environ=...)`` is a pure function of the TOML mapping and the
environment it is given: it never touches files, sockets or the clock, and it reports every
problem at once, each naming the full key path. ``load(path)`` reads and parses a file.
The config holds Vault paths and file names, never a secret (a URL carrying a user or
password is refused, and the refusal never quotes it): there is nothing to redact, and
``dump()`` prints the effective config as TOML.

Each field's metadata carries the converter that checks and converts its TOML value, so the
dataclasses below are the single description of what is accepted.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import os
import re
import tomllib
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

from openclawd.errors import ConfigError, ConfigProblem

DEFAULT_CONFIG_PATH = "/etc/openclawd/openclawd.toml"

_T = TypeVar("_T")


class _Invalid(Exception):
    """Raised by a converter: the value is unusable; the message says why."""


# --- converters: each takes the raw TOML value and returns the typed value -----------------


def _string(raw: object) -> str:
    if not isinstance(raw, str):
        raise _Invalid(f"must be a string, not {_toml_type(raw)}")
    return raw


def _path(*, may_be_empty: bool, credential: bool = False) -> Callable[[object], str]:
    def convert(raw: object) -> str:
        value = _string(raw)
        if not value:
            if may_be_empty:
                return value
            raise _Invalid("must not be empty")
        if os.path.isabs(value):
            return value
        if credential and "/" not in value:
            return value  # a systemd credential name, read from $CREDENTIALS_DIRECTORY
        hint = " or a bare credential name" if credential else ""
        raise _Invalid(f"must be an absolute path{hint}, not {value!r}")

    return convert


def _choice(*choices: str) -> Callable[[object], str]:
    def convert(raw: object) -> str:
        value = _string(raw)
        if value not in choices:
            raise _Invalid(f"must be one of {', '.join(map(repr, choices))}, not {value!r}")
        return value

    return convert


def _integer(*, minimum: int, maximum: int) -> Callable[[object], int]:
    def convert(raw: object) -> int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise _Invalid(f"must be an integer, not {_toml_type(raw)}")
        if raw < minimum:
            raise _Invalid(f"must be at least {minimum}, not {raw}")
        if raw > maximum:
            raise _Invalid(f"must be at most {maximum}, not {raw}")
        return raw

    return convert


def _seconds(*, zero_ok: bool = False) -> Callable[[object], float]:
    def convert(raw: object) -> float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise _Invalid(f"must be a number of seconds, not {_toml_type(raw)}")
        value = float(raw)
        if not math.isfinite(value):
            raise _Invalid("must be a finite number of seconds")
        if value < 0 or (value == 0 and not zero_ok):
            bound = "zero or more" if zero_ok else "more than zero"
            raise _Invalid(f"must be {bound} seconds, not {raw}")
        return value

    return convert


def _boolean(raw: object) -> bool:
    if not isinstance(raw, bool):
        raise _Invalid(f"must be true or false, not {_toml_type(raw)}")
    return raw


_MODE_RE = re.compile(r"0?[0-7]{3}")


def _mode(raw: object) -> int:
    if not isinstance(raw, str):
        # A TOML integer 660 is decimal 660, not the octal mode the operator meant.
        raise _Invalid(f'must be a string of octal digits like "0660", not {_toml_type(raw)}')
    if not _MODE_RE.fullmatch(raw):
        raise _Invalid(f'must be an octal file mode like "0660", not {raw!r}')
    mode = int(raw, 8)
    if not mode & 0o600 == 0o600:
        raise _Invalid(f"must let the owner read and write the socket, not {raw!r}")
    return mode


def _dump_mode(value: object) -> str:
    assert isinstance(value, int)
    return json.dumps(f"0{value:03o}")


def _ids(raw: object) -> tuple[int, ...]:
    if not isinstance(raw, list):
        raise _Invalid(f"must be a list of numeric ids, not {_toml_type(raw)}")
    for item in raw:
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise _Invalid(f"must hold only numeric ids (integers >= 0), not {item!r}")
    return tuple(raw)


_KEY_FIELD_LAYOUTS = (
    'a field name ("api_key": its value is one key, or a list of strings = a pool) '
    'or a non-empty list of distinct field names (["key1", "key2"]: one key per field, '
    "a pool in that order)"
)


def _key_field(raw: object) -> str | tuple[str, ...]:
    """``key_field``: the secret's field that holds the key (or a list of keys), or a
    list of fields that each hold one key. Either way more than one key is a pool."""
    if isinstance(raw, str):
        if not raw:
            raise _Invalid(f"must be {_KEY_FIELD_LAYOUTS}, not an empty string")
        return raw
    if not isinstance(raw, list):
        raise _Invalid(f"must be {_KEY_FIELD_LAYOUTS}, not {_toml_type(raw)}")
    if not raw:
        raise _Invalid(f"must be {_KEY_FIELD_LAYOUTS}, not an empty list")
    for item in raw:
        if not isinstance(item, str) or not item:
            shown = repr(item) if isinstance(item, str) else _toml_type(item)
            raise _Invalid(f"must be {_KEY_FIELD_LAYOUTS}; the list holds {shown}")
    if len(set(raw)) != len(raw):
        twice = next(item for item in raw if raw.count(item) > 1)
        raise _Invalid(f"must be {_KEY_FIELD_LAYOUTS}; the list names {twice!r} twice")
    return tuple(raw)


def _loopback_tcp(raw: object) -> str:
    value = _string(raw)
    if not value:
        return value
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise _Invalid(f'must be "HOST:PORT" like "127.0.0.1:9477", not {value!r}')
    if not _is_loopback(host):
        raise _Invalid(f"must be a loopback address (127.0.0.0/8 or [::1]), not {host!r}")
    return value


def _url(*schemes: str) -> Callable[[object], str]:
    def convert(raw: object) -> str:
        value = _string(raw)
        if not value:
            return value
        if "@" in value:
            # Checked before parsing: a password holding / ? or # would otherwise be split
            # off as a "port" and quoted back in the parser's error message.
            raise _Invalid("must not carry credentials; keys and tokens belong in Vault")
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise _Invalid("is not a valid URL") from None
        if parts.scheme not in schemes:
            raise _Invalid(f"must be a {' or '.join(s + '://' for s in schemes)} URL")
        if not parts.hostname:
            raise _Invalid("must name a host")
        if parts.query or parts.fragment:
            raise _Invalid("must not have a query string or fragment")
        return value.rstrip("/")

    return convert


# Limits are counted in engine scripts whose numbers are doubles: 10**15 stays exact.
_MAX_LIMIT = 10**15
_limit = _integer(minimum=0, maximum=_MAX_LIMIT)


def _strings(raw: object) -> tuple[str, ...]:
    if not isinstance(raw, list):
        raise _Invalid(f"must be a list of strings, not {_toml_type(raw)}")
    for item in raw:
        if not isinstance(item, str) or not item:
            shown = repr(item) if isinstance(item, str) else _toml_type(item)
            raise _Invalid(f"must hold only non-empty strings, not {shown}")
    return tuple(raw)


# The unit types whose processes /proc/PID/cgroup can name.
_UNIT_RE = re.compile(r"[A-Za-z0-9:_.\\@-]{1,240}\.(service|scope|slice|socket|mount|swap)")


def _units(raw: object) -> tuple[str, ...]:
    units = _strings(raw)
    for unit in units:
        if not _UNIT_RE.fullmatch(unit):
            raise _Invalid(
                f'must hold systemd unit names like "billing.service" (or .scope, .slice, '
                f".socket, .mount, .swap), not {unit!r}"
            )
    return units


def _route_providers(raw: object) -> tuple[str, ...]:
    providers = _strings(raw)
    if not providers:
        raise _Invalid("must name at least one provider")
    twice = [name for name in providers if providers.count(name) > 1]
    if twice:
        raise _Invalid(f"names {twice[0]!r} twice")
    return providers


_REWRITES_LAYOUT = 'a table of tables: { PROVIDER = { "MODEL" = "REWRITTEN MODEL" } }'


def _model_rewrites(raw: object) -> Mapping[str, Mapping[str, str]]:
    if not isinstance(raw, dict):
        raise _Invalid(f"must be {_REWRITES_LAYOUT}, not {_toml_type(raw)}")
    rewrites: dict[str, Mapping[str, str]] = {}
    for provider, table in raw.items():
        if not isinstance(table, dict):
            raise _Invalid(f"must be {_REWRITES_LAYOUT}; {provider} is {_toml_type(table)}")
        for model, rewritten in table.items():
            if not model or not isinstance(rewritten, str) or not rewritten:
                raise _Invalid(
                    f"must be {_REWRITES_LAYOUT}; {provider} rewrites {model!r} "
                    "to something other than a non-empty string"
                )
        rewrites[provider] = types.MappingProxyType(dict(table))
    return types.MappingProxyType(rewrites)


def _dump_rewrites(value: object) -> str:
    assert isinstance(value, Mapping)
    tables = (
        json.dumps(provider)
        + " = { "
        + ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in models.items())
        + " }"
        for provider, models in value.items()
    )
    return "{ " + ", ".join(tables) + " }" if value else "{}"


# An HTTP header name (RFC 9110 token), and the headers that carry credentials: those come
# from Vault only, never from the config.
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})


def _headers(raw: object) -> Mapping[str, str]:
    """``[providers.NAME] headers``: names lower-cased; "" = not sent."""
    table = _string_table(raw, "header")
    for name, value in table.items():
        if not _HEADER_NAME_RE.fullmatch(name):
            raise _Invalid(f"{name!r} is not a valid header name")
        if name.lower() in _CREDENTIAL_HEADERS:
            raise _Invalid(f"must not set {name!r}: credentials come from Vault only")
        if any(c in value for c in "\r\n\0"):
            raise _Invalid(f"the value of {name!r} must not hold CR, LF or NUL")
    return types.MappingProxyType({name.lower(): value for name, value in table.items()})


def _query(raw: object) -> Mapping[str, str]:
    """``[providers.NAME] query``: parameter names and values; "" = not sent."""
    return types.MappingProxyType(_string_table(raw, "query parameter"))


def _string_table(raw: object, what: str) -> dict[str, str]:
    if not isinstance(raw, dict):
        layout = '{ "NAME" = "VALUE" }'
        raise _Invalid(f"must be a table of strings ({layout}), not {_toml_type(raw)}")
    for name, value in raw.items():
        if not name:
            raise _Invalid(f"a {what} name must not be empty")
        if not isinstance(value, str):
            raise _Invalid(f"the value of {name!r} must be a string, not {_toml_type(value)}")
    return dict(raw)


def _dump_strings(value: object) -> str:
    assert isinstance(value, Mapping)
    pairs = (f"{json.dumps(k)} = {json.dumps(v)}" for k, v in value.items())
    return "{ " + ", ".join(pairs) + " }" if value else "{}"


_ENGINE_SCHEMES = ("redis", "rediss", "valkey")


def _engine_url(raw: object) -> str:
    """``[shared] url``. No message quotes the value: a user's mistake may hold a password."""
    value = _string(raw)
    if not value:
        return value
    if "@" in value:
        raise _Invalid("must not hold a user or password; the password goes in password_file")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise _Invalid("is not a valid URL (redis://, rediss:// or valkey:// HOST:PORT)") from None
    if parts.scheme not in _ENGINE_SCHEMES:
        raise _Invalid("must be a redis://, rediss:// or valkey:// URL")
    if not parts.hostname or port is None:
        raise _Invalid("must name a host and a port: SCHEME://HOST:PORT")
    if parts.path.strip("/") or parts.query or parts.fragment:
        raise _Invalid("must be SCHEME://HOST:PORT alone: no database number, query or fragment")
    return value.rstrip("/")


# A key prefix: no braces, which would break the cluster's {hash tags}, nor spaces.
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def _namespace(raw: object) -> str:
    value = _string(raw)
    if not _NAMESPACE_RE.fullmatch(value):
        raise _Invalid(f"must be 1-64 of A-Z a-z 0-9 _ . : -, not {value!r}")
    return value


def _collector_url(raw: object) -> str:
    """``[tracing] otlp_endpoint``: the collector's base URL (spans go to its /v1/traces)."""
    value: str = _url("http", "https")(raw)
    if value.endswith("/v1/traces"):
        raise _Invalid("is the collector's base URL: leave out /v1/traces, which is added")
    return value


def _service_name(raw: object) -> str:
    value = _string(raw)
    if not value.strip() or len(value) > 255:
        raise _Invalid("must be 1-255 characters")
    return value


def _ratio(raw: object) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise _Invalid(f"must be a number from 0 to 1, not {_toml_type(raw)}")
    if not 0 <= raw <= 1:
        raise _Invalid(f"must be from 0 to 1, not {raw}")
    return float(raw)


def _opt(
    default: _T, convert: Callable[[object], Any], dump: Callable[[object], str] | None = None
) -> _T:
    """A config field with a default, its converter and (rarely) its TOML writer."""
    return field(default=default, metadata={"convert": convert, "dump": dump})


def _required(convert: Callable[[object], Any]) -> Any:
    return field(metadata={"convert": convert, "dump": None})


def _given() -> Any:
    """A field that is no TOML key: the table's name, given by the parser."""
    return field(metadata={})


def _subtable(cls: type[Any]) -> Any:
    """A field that is a TOML table of its own (``[providers.NAME.limits]``)."""
    return field(default_factory=cls, metadata={"table": cls})


def _empty_mapping() -> Mapping[str, Any]:
    return types.MappingProxyType({})


# --- provider presets ---------------------------------------------------------------------

# What ``preset = NAME`` fills in a [providers.X] table; a key the table sets wins, and
# the table's headers and query are merged over the preset's, name by name.
PRESETS: Mapping[str, Mapping[str, Any]] = types.MappingProxyType(
    {
        "openai": {
            "base_url": "https://api.openai.com",
            "ws_url": "wss://api.openai.com",
            "auth_header": "Authorization",
            "auth_scheme": "Bearer",
        },
        "anthropic": {
            "base_url": "https://api.anthropic.com",
            "auth_header": "x-api-key",
            "auth_scheme": "",
            "headers": {"anthropic-version": "2023-06-01"},
        },
        # No universal base_url: each resource has its own host. ws_url is base_url's
        # host over wss:// (derived in _with_preset), where Azure serves realtime.
        "azure_openai": {
            "auth_header": "api-key",
            "auth_scheme": "",
            "query": {"api-version": "2024-10-21"},
        },
        "openai_compatible": {"auth_header": "Authorization", "auth_scheme": "Bearer"},
    }
)
# What a preset without a base_url asks for instead.
_PRESET_BASE_URLS = {
    "azure_openai": "your resource's endpoint, e.g. https://RESOURCE.openai.azure.com",
    "openai_compatible": "the server's URL, e.g. https://llm.internal:8000",
}


def _with_preset(table: object) -> object:
    """A provider's table with its preset's keys filled in (unchanged without a valid one:
    the ``preset`` key's converter reports a wrong one)."""
    if not isinstance(table, dict) or table.get("preset") not in PRESETS:
        return table
    name = table["preset"]
    preset = PRESETS[name]
    merged = {**preset, **table}
    for key in ("headers", "query"):
        if key in preset and isinstance(table.get(key), dict):
            given = table[key]
            if key == "headers":
                given = {str(k).lower(): v for k, v in given.items()}
            merged[key] = {**preset[key], **given}
    base_url = table.get("base_url")
    if "ws_url" not in table and isinstance(base_url, str):
        merged.update(_derived_from_base_url(name, base_url))
    return merged


def _derived_from_base_url(preset: str, base_url: str) -> dict[str, str]:
    """What preset ``preset`` fills from the provider's own ``base_url``: Azure serves
    realtime at its host over wss://."""
    return {"ws_url": re.sub(r"^http", "ws", base_url)} if preset == "azure_openai" else {}


# --- the configuration ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListenConfig:
    socket: str = _opt("/run/openclawd/openclawd.sock", _path(may_be_empty=False))
    mode: int = _opt(0o660, _mode, _dump_mode)
    group: str = _opt("", _string)
    allowed_uids: tuple[int, ...] = _opt((), _ids)
    allowed_gids: tuple[int, ...] = _opt((), _ids)
    max_connections: int = _opt(1024, _integer(minimum=1, maximum=1_000_000))
    max_message_bytes: int = _opt(1048576, _integer(minimum=1024, maximum=1 << 30))
    max_inflight_per_connection: int = _opt(64, _integer(minimum=1, maximum=100_000))
    ping_interval_s: float = _opt(20.0, _seconds())
    ping_timeout_s: float = _opt(20.0, _seconds())
    handshake_timeout_s: float = _opt(10.0, _seconds())
    message_timeout_s: float = _opt(30.0, _seconds())


@dataclass(frozen=True, slots=True)
class ControlConfig:
    socket: str = _opt("/run/openclawd/control.sock", _path(may_be_empty=False))
    mode: int = _opt(0o660, _mode, _dump_mode)
    group: str = _opt("", _string)
    tcp: str = _opt("", _loopback_tcp)
    token_file: str = _opt("", _path(may_be_empty=True, credential=True))


@dataclass(frozen=True, slots=True)
class VaultConfig:
    addr: str = _opt("", _url("http", "https"))
    auth: str = _opt("token", _choice("token", "approle"))
    token_file: str = _opt("", _path(may_be_empty=True, credential=True))
    role_id_file: str = _opt("", _path(may_be_empty=True, credential=True))
    secret_id_file: str = _opt("", _path(may_be_empty=True, credential=True))
    mount: str = _opt("secret", _string)
    refresh_interval_s: float = _opt(30.0, _seconds())
    request_timeout_s: float = _opt(10.0, _seconds())
    ca_cert: str = _opt("", _path(may_be_empty=True))
    allow_insecure: bool = _opt(False, _boolean)


@dataclass(frozen=True, slots=True)
class ProviderLimits:
    requests_per_minute: int = _opt(0, _limit)
    tokens_per_minute: int = _opt(0, _limit)


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    base_url: str = _required(_url("http", "https"))
    vault_path: str = _required(_string)
    preset: str = _opt("", _choice("", *PRESETS))
    ws_url: str = _opt("", _url("ws", "wss"))
    auth_header: str = _opt("Authorization", _string)
    auth_scheme: str = _opt("Bearer", _string)
    key_field: str | tuple[str, ...] = _opt("api_key", _key_field)
    required: bool = _opt(True, _boolean)
    connect_timeout_s: float = _opt(10.0, _seconds())
    read_timeout_s: float = _opt(60.0, _seconds())
    total_timeout_s: float = _opt(600.0, _seconds())
    max_retries: int = _opt(2, _integer(minimum=0, maximum=100))
    max_connections: int = _opt(100, _integer(minimum=1, maximum=100_000))
    allow_insecure: bool = _opt(False, _boolean)
    retry_backoff_s: float = _opt(0.5, _seconds())
    retry_backoff_max_s: float = _opt(8.0, _seconds())
    circuit_failure_threshold: int = _opt(5, _integer(minimum=1, maximum=10_000))
    circuit_reset_s: float = _opt(30.0, _seconds())
    # Sent with every request (HTTP and realtime handshake) unless the app sent its own.
    headers: Mapping[str, str] = field(
        default_factory=_empty_mapping, metadata={"convert": _headers, "dump": _dump_strings}
    )
    query: Mapping[str, str] = field(
        default_factory=_empty_mapping, metadata={"convert": _query, "dump": _dump_strings}
    )
    limits: ProviderLimits = _subtable(ProviderLimits)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    requests_per_minute: int = _opt(0, _integer(minimum=0, maximum=1_000_000_000))
    default_completion_tokens: int = _opt(1024, _integer(minimum=1, maximum=_MAX_LIMIT))


@dataclass(frozen=True, slots=True)
class ClientConfig:
    name: str = _given()
    uids: tuple[int, ...] = _opt((), _ids)
    gids: tuple[int, ...] = _opt((), _ids)
    units: tuple[str, ...] = _opt((), _units)
    providers: tuple[str, ...] = _opt((), _strings)
    models: tuple[str, ...] = _opt((), _strings)
    requests_per_minute: int = _opt(0, _limit)
    tokens_per_minute: int = _opt(0, _limit)
    tokens_per_day: int = _opt(0, _limit)


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str = _given()
    providers: tuple[str, ...] = _required(_route_providers)
    models: Mapping[str, Mapping[str, str]] = field(
        default_factory=_empty_mapping,
        metadata={"convert": _model_rewrites, "dump": _dump_rewrites},
    )


@dataclass(frozen=True, slots=True)
class SharedConfig:
    url: str = _opt("", _engine_url)
    cluster: bool = _opt(False, _boolean)
    password_file: str = _opt("", _path(may_be_empty=True, credential=True))
    namespace: str = _opt("openclawd", _namespace)
    on_failure: str = _opt("local", _choice("local", "refuse"))
    expected_daemons: int = _opt(1, _integer(minimum=1, maximum=100_000))


@dataclass(frozen=True, slots=True)
class TracingConfig:
    otlp_endpoint: str = _opt("", _collector_url)
    service_name: str = _opt("openclawd", _service_name)
    sample_ratio: float = _opt(1.0, _ratio)
    headers_file: str = _opt("", _path(may_be_empty=True, credential=True))
    max_queue_spans: int = _opt(2048, _integer(minimum=1, maximum=1_000_000))
    export_timeout_s: float = _opt(10.0, _seconds())


@dataclass(frozen=True, slots=True)
class ShutdownConfig:
    drain_timeout_s: float = _opt(30.0, _seconds(zero_ok=True))


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = _opt("info", _choice("debug", "info", "warning", "error"))
    format: str = _opt("logfmt", _choice("logfmt", "json"))


_SECTIONS: dict[str, type[Any]] = {
    "listen": ListenConfig,
    "control": ControlConfig,
    "vault": VaultConfig,
    "limits": LimitsConfig,
    "shutdown": ShutdownConfig,
    "logging": LoggingConfig,
    "shared": SharedConfig,
    "tracing": TracingConfig,
}
# The tables of named tables: [providers.NAME], [clients.NAME], [routes.NAME].
_NAMED = ("providers", "clients", "routes")

_PROVIDER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_CLIENT_NAME_RE = re.compile(r"[a-z0-9_-]{1,64}")


@dataclass(frozen=True, slots=True)
class Config:
    """The whole effective configuration. ``source`` is the file it came from."""

    listen: ListenConfig = field(default_factory=ListenConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    vault: VaultConfig = field(default_factory=VaultConfig)
    providers: Mapping[str, ProviderConfig] = field(default_factory=_empty_mapping)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    clients: Mapping[str, ClientConfig] = field(default_factory=_empty_mapping)  # file order
    routes: Mapping[str, RouteConfig] = field(default_factory=_empty_mapping)
    shared: SharedConfig = field(default_factory=SharedConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    source: str = "<memory>"


# --- parsing -------------------------------------------------------------------------------


def load(path: str, *, environ: Mapping[str, str] | None = None) -> Config:
    """Read and parse the config file at ``path``.

    Raises:
        ConfigError: the file cannot be read, is not TOML, or its content is wrong; the
            error lists every problem.
    """
    try:
        with open(path, "rb") as f:
            mapping = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(path, [ConfigProblem("(file)", f"cannot read: {exc.strerror}")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, [ConfigProblem("(file)", f"not valid TOML: {exc}")]) from None
    except UnicodeDecodeError as exc:
        problem = ConfigProblem("(file)", f"not valid TOML: not UTF-8 (byte {exc.start})")
        raise ConfigError(path, [problem]) from None
    except RecursionError:
        problem = ConfigProblem("(file)", "not valid TOML: nested too deeply")
        raise ConfigError(path, [problem]) from None
    return parse(mapping, source=path, environ=os.environ if environ is None else environ)


def parse(
    mapping: Mapping[str, Any],
    *,
    source: str = "<memory>",
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build a Config from a TOML mapping; pure: no I/O, no clock.

    ``environ`` supplies the fallbacks the contract names (``VAULT_ADDR``, ``VAULT_TOKEN``);
    only their presence is looked at, and the token's value is never kept.

    Raises:
        ConfigError: with every problem found, each naming the full key path.
    """
    env = {} if environ is None else environ
    problems: list[ConfigProblem] = []
    sections: dict[str, Any] = {}
    for name, value in mapping.items():
        if name in _SECTIONS:
            sections[name] = _section(_SECTIONS[name], value, name, problems)
        elif name not in _NAMED:
            problems.append(ConfigProblem(name, "unknown key"))
    named = _named_tables(mapping, problems)

    vault = sections.get("vault", VaultConfig())
    if vault is not None and not vault.addr and env.get("VAULT_ADDR"):
        try:
            vault = dataclasses.replace(vault, addr=_url("http", "https")(env["VAULT_ADDR"]))
        except _Invalid as exc:
            problems.append(ConfigProblem("vault.addr", f"from VAULT_ADDR: {exc}"))
            vault = None
    sections["vault"] = vault

    config = Config(
        **{k: v for k, v in sections.items() if v is not None},
        **named,
        source=source,
    )
    raw_providers = mapping.get("providers")
    has_providers = isinstance(raw_providers, dict) and bool(raw_providers)
    # A section with a problem was replaced by its defaults above: checks that span
    # sections skip it, rather than report keys that the file does set.
    broken = {name for name, section in sections.items() if section is None}
    problems.extend(_cross_checks(config, env, has_providers=has_providers, broken=broken))
    if problems:
        raise ConfigError(source, problems)
    return config


def _section(cls: type[_T], raw: object, path: str, problems: list[ConfigProblem]) -> _T | None:
    """Convert one TOML table into ``cls``; appends problems, returns None if any."""
    instance, _ = _convert_table(cls, raw, path, problems)
    return instance


def _convert_table(
    cls: type[_T],
    raw: object,
    path: str,
    problems: list[ConfigProblem],
    given: Mapping[str, Any] | None = None,
) -> tuple[_T | None, dict[str, Any]]:
    """Convert a table; returns the instance (None on any problem) and the keys that
    converted, so that checks spanning keys can still run on a partly wrong table.
    ``given`` holds the fields that are no TOML key (a named table's name)."""
    if not isinstance(raw, dict):
        problems.append(ConfigProblem(path, f"must be a table, not {_toml_type(raw)}"))
        return None, {}
    known = {f.name: f for f in dataclasses.fields(cls) if f.metadata}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    ok = True
    for key, value in raw.items():
        try:
            values[key] = _convert_key(known.get(key), value, f"{path}.{key}", problems)
        except _Invalid as exc:
            problems.append(ConfigProblem(f"{path}.{key}", str(exc)))
            ok = False
    for name, f in known.items():
        missing = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if missing and name not in raw:
            problems.append(ConfigProblem(f"{path}.{name}", "required key is missing"))
            ok = False
    ok = ok and not any(value is _BROKEN for value in values.values())
    return (cls(**(given or {}), **values) if ok else None), values


_BROKEN = object()  # a sub-table whose problems are already reported


def _convert_key(
    f: dataclasses.Field[Any] | None, value: object, path: str, problems: list[ConfigProblem]
) -> Any:
    """One key's value; raises _Invalid for a problem with the key itself."""
    if f is None:
        raise _Invalid("unknown key")
    if "table" in f.metadata:
        table, _ = _convert_table(f.metadata["table"], value, path, problems)
        return _BROKEN if table is None else table
    return f.metadata["convert"](value)


def _named_tables(mapping: Mapping[str, Any], problems: list[ConfigProblem]) -> dict[str, Any]:
    """[providers.NAME], [routes.NAME] and [clients.NAME], each in file order, read-only.

    The names a route or a client refers to are checked against the names in the file,
    so that an entry with a problem of its own is not also reported as missing."""
    raw = {name: mapping.get(name, {}) for name in _NAMED}
    for name, value in raw.items():
        if not isinstance(value, dict):
            problems.append(ConfigProblem(name, f"must be a table, not {_toml_type(value)}"))
            raw[name] = {}
    provider_names, route_names = set(raw["providers"]), set(raw["routes"])
    named: dict[str, dict[str, Any]] = {
        "providers": _providers(raw["providers"], problems),
        "routes": _routes(raw["routes"], provider_names, problems),
        "clients": _clients(raw["clients"], provider_names | route_names, problems),
    }
    return {name: types.MappingProxyType(tables) for name, tables in named.items()}


def _providers(raw: dict[str, Any], problems: list[ConfigProblem]) -> dict[str, ProviderConfig]:
    providers: dict[str, ProviderConfig] = {}
    for name, table in raw.items():
        path = f"providers.{name}"
        if not _PROVIDER_NAME_RE.fullmatch(name):
            problems.append(
                ConfigProblem(path, "provider names are 1-64 of A-Z a-z 0-9 _ - (used in URLs)")
            )
        before = len(problems)
        provider, values = _convert_table(ProviderConfig, _with_preset(table), path, problems)
        problems.extend(_provider_checks(path, values))
        problems[before:] = _explain_base_url(path, table, problems[before:])
        if provider is not None:
            providers[name] = provider
    return providers


def _explain_base_url(path: str, table: object, found: list[ConfigProblem]) -> list[ConfigProblem]:
    """A missing base_url, said in terms of the provider's preset: not reported when the
    preset itself is wrong (it may have been meant to fill it)."""
    missing = ConfigProblem(f"{path}.base_url", "required key is missing")
    preset = table.get("preset", "") if isinstance(table, dict) else ""
    if missing not in found or preset == "":
        return found
    if preset not in PRESETS:
        return [p for p in found if p != missing]
    hint = _PRESET_BASE_URLS[preset]
    why = ConfigProblem(missing.key, f"required with preset = {json.dumps(preset)}: {hint}")
    return [why if p == missing else p for p in found]


def _routes(
    raw: dict[str, Any], provider_names: set[str], problems: list[ConfigProblem]
) -> dict[str, RouteConfig]:
    routes: dict[str, RouteConfig] = {}
    for name, table in raw.items():
        path = f"routes.{name}"
        if not _PROVIDER_NAME_RE.fullmatch(name):
            problems.append(
                ConfigProblem(path, "route names are 1-64 of A-Z a-z 0-9 _ - (used in URLs)")
            )
        if name in provider_names:
            problems.append(ConfigProblem(path, "a route and a provider may not share a name"))
        route, values = _convert_table(RouteConfig, table, path, problems, {"name": name})
        problems.extend(_route_checks(path, values, provider_names, set(raw)))
        if route is not None:
            routes[name] = route
    return routes


def _route_checks(
    path: str, values: Mapping[str, Any], provider_names: set[str], route_names: set[str]
) -> list[ConfigProblem]:
    """A route's providers are configured providers; its rewrites are for them."""
    if "providers" not in values:
        return []  # missing or wrong: already reported
    problems = []
    members = values["providers"]
    for member in members:
        if member in provider_names:
            continue
        what = "a route, not a provider" if member in route_names else "no configured provider"
        problems.append(ConfigProblem(f"{path}.providers", f"{member!r} is {what}"))
    for provider in values.get("models", {}):
        if provider not in members:
            problems.append(
                ConfigProblem(f"{path}.models.{provider}", "is not one of this route's providers")
            )
    return problems


def _clients(
    raw: dict[str, Any], targets: set[str], problems: list[ConfigProblem]
) -> dict[str, ClientConfig]:
    clients: dict[str, ClientConfig] = {}
    for name, table in raw.items():
        path = f"clients.{name}"
        if not _CLIENT_NAME_RE.fullmatch(name):
            problems.append(ConfigProblem(path, "client names are 1-64 of a-z 0-9 _ -"))
        client, values = _convert_table(ClientConfig, table, path, problems, {"name": name})
        if isinstance(table, dict):
            problems.extend(_client_checks(path, name, table, values, targets))
        if client is not None:
            clients[name] = client
    return clients


_MATCH_KEYS = ("uids", "gids", "units")


def _client_checks(
    path: str, name: str, raw: Mapping[str, Any], values: Mapping[str, Any], targets: set[str]
) -> list[ConfigProblem]:
    """A client matches some peer (``default`` matches the rest); it may use only
    providers and routes that exist."""
    problems = [
        ConfigProblem(f"{path}.providers", f"{target!r} is no configured provider or route")
        for target in values.get("providers", ())
        if target not in targets
    ]
    matches = [key for key in _MATCH_KEYS if raw.get(key)]
    if name == "default":
        problems += [
            ConfigProblem(
                f"{path}.{key}",
                "client default is every peer that matches no other client: "
                "it takes no uids, gids or units",
            )
            for key in matches
        ]
    elif not matches:
        problems.append(ConfigProblem(path, "matches no peer: set uids, gids or units"))
    return problems


def _provider_checks(path: str, values: Mapping[str, Any]) -> list[ConfigProblem]:
    """Rules spanning a provider's keys, run on the keys that converted."""
    problems = []
    for key in ("base_url", "ws_url"):
        url = values.get(key)
        if url and not values.get("allow_insecure", False) and _is_plaintext_remote(url):
            problems.append(
                ConfigProblem(
                    f"{path}.{key}",
                    "plain http:// or ws:// is allowed only to loopback hosts "
                    "unless allow_insecure = true",
                )
            )
    for key in ("vault_path", "auth_header"):
        if key in values and not values[key].strip("/"):
            problems.append(ConfigProblem(f"{path}.{key}", "must not be empty"))
    auth = values.get("auth_header", "authorization").lower()
    if auth in values.get("headers", {}):
        problems.append(
            ConfigProblem(f"{path}.headers", f"must not set {auth!r}: the key goes there")
        )
    return problems


def _cross_checks(
    config: Config, env: Mapping[str, str], *, has_providers: bool, broken: set[str]
) -> list[ConfigProblem]:
    """Rules that span keys; run only over the sections that parsed."""
    problems: list[ConfigProblem] = []
    if {"listen", "control"}.isdisjoint(broken) and config.listen.socket == config.control.socket:
        problems.append(ConfigProblem("control.socket", "must differ from listen.socket"))
    if config.control.tcp and not config.control.token_file:
        problems.append(ConfigProblem("control.token_file", "required when control.tcp is set"))
    if "shared" not in broken and config.shared.password_file and not config.shared.url:
        problems.append(ConfigProblem("shared.password_file", "is used only with shared.url"))
    tracing = config.tracing
    if "tracing" not in broken and tracing.headers_file and not tracing.otlp_endpoint:
        problems.append(
            ConfigProblem("tracing.headers_file", "is used only with tracing.otlp_endpoint")
        )
    if "vault" in broken or not has_providers:
        return problems
    return problems + _vault_checks(config.vault, env)


def _vault_checks(vault: VaultConfig, env: Mapping[str, str]) -> list[ConfigProblem]:
    """What ``[vault]`` needs once there is a provider to read keys for."""
    problems: list[ConfigProblem] = []
    if not vault.addr:
        problems.append(ConfigProblem("vault.addr", "required key is missing (or set VAULT_ADDR)"))
    elif not vault.allow_insecure and _is_plaintext_remote(vault.addr):
        problems.append(
            ConfigProblem(
                "vault.addr",
                "plain http:// is allowed only to a loopback Vault "
                "unless vault.allow_insecure = true",
            )
        )
    if vault.auth == "token" and not vault.token_file and not env.get("VAULT_TOKEN"):
        problems.append(
            ConfigProblem("vault.token_file", 'required for auth = "token" (or set VAULT_TOKEN)')
        )
    if vault.auth == "approle":
        for key in ("role_id_file", "secret_id_file"):
            if not getattr(vault, key):
                problems.append(ConfigProblem(f"vault.{key}", 'required for auth = "approle"'))
    if not vault.mount.strip("/"):
        problems.append(ConfigProblem("vault.mount", "must not be empty"))
    return problems


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_plaintext_remote(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "ws") and not _is_loopback(parts.hostname or "")


def _toml_type(value: object) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }
    return names.get(type(value), type(value).__name__)


# --- writing -------------------------------------------------------------------------------


def dump(config: Config) -> str:
    """The effective config as TOML, every key with its value, defaults included.

    The config holds no secret (only file names and Vault paths), so nothing is hidden; the
    Vault token from the environment is never part of it.
    """
    out: list[str] = [f"# effective configuration of {config.source}"]
    for name in _SECTIONS:
        out += ["", f"[{name}]", *_dump_fields(getattr(config, name))]
    for name, provider in config.providers.items():
        out += ["", f"[providers.{name}]", *_dump_provider(provider)]
        out += ["", f"[providers.{name}.limits]", *_dump_fields(provider.limits)]
    for name, route in config.routes.items():
        out += ["", f"[routes.{name}]", *_dump_fields(route)]
    for name, client in config.clients.items():
        out += ["", f"[clients.{name}]", *_dump_fields(client)]
    return "\n".join(out) + "\n"


def _dump_provider(provider: ProviderConfig) -> list[str]:
    """A provider's keys, each value its preset filled in marked as such."""
    lines = _dump_fields(provider)
    if not provider.preset:
        return lines
    filled = {
        **PRESETS[provider.preset],
        **_derived_from_base_url(provider.preset, provider.base_url),
    }
    note = f"  # from preset {json.dumps(provider.preset)}"
    return [
        line + note
        if filled.get(key := line.split(" = ", 1)[0], ...) == getattr(provider, key)
        else line
        for line in lines
    ]


def _dump_fields(obj: object) -> list[str]:
    """The keys of one table; a name (the table's own) and a sub-table are not keys."""
    lines = []
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        if "convert" not in f.metadata:
            continue
        value = getattr(obj, f.name)
        writer = f.metadata.get("dump") or _toml_value
        lines.append(f"{f.name} = {writer(value)}")
    return lines


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")
