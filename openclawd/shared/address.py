"""The shared engine's address, parsed from ``[shared] url`` (CONTRACT.md 5.6). Pure: no
I/O and no engine client, so the config's checks can use it.

A URL never carries the password (it comes from ``password_file``): one with credentials is
refused, and no message here repeats any part of a URL that could hold them.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

DEFAULT_PORT = 6379
# Scheme -> TLS. redis:// and rediss:// are Redis's own; valkey:// and valkeys:// Valkey's.
SCHEMES = {"redis": False, "valkey": False, "rediss": True, "valkeys": True}


@dataclass(frozen=True, slots=True)
class EngineAddress:
    """One engine node: a standalone server, or a cluster's seed node."""

    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_url(url: str) -> EngineAddress:
    """``redis://``, ``rediss://``, ``valkey://`` or ``valkeys://`` HOST[:PORT], nothing more.

    Raises:
        ValueError: the URL is not one of those; the message names what is wrong and never
            repeats the URL (it may hold credentials).
    """
    parts = urllib.parse.urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError("the url's scheme must be one of " + ", ".join(f"{s}://" for s in SCHEMES))
    if "@" in parts.netloc:
        raise ValueError("the url may not hold credentials: put the password in password_file")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("the url is HOST:PORT only (no database, path, query or fragment)")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("the url's port is not a number from 1 to 65535") from None
    if not parts.hostname:
        raise ValueError("the url names no host")
    if port == 0:
        raise ValueError("the url's port is not a number from 1 to 65535")
    return EngineAddress(parts.hostname, port or DEFAULT_PORT, SCHEMES[scheme])
