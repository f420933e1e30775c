"""Who is calling: an app connection's client, from its peer credentials (CONTRACT.md 5.1).

Each ``[clients.NAME]`` lists peer uids, primary gids and systemd units (the unit is read
from ``/proc/PID/cgroup``: the innermost ``*.service``, ``*.scope`` or ``*.socket``
component of the peer's cgroup); the first client, in file order, that any of them
matches is the connection's. A peer that matches none is client ``default``. What a
client may use, and how much, is ``protocol/limits.py``'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from openclawd.config import ClientConfig
from openclawd.local.unix import PeerCredentials

__all__ = ["DEFAULT", "identify", "unit_of"]

DEFAULT = "default"
_UNIT_SUFFIXES = (".service", ".scope", ".socket")


def unit_of(pid: int, *, proc: Path = Path("/proc")) -> str | None:
    """The systemd unit process ``pid`` runs in, or None (not under systemd, gone, or
    not readable)."""
    try:
        text = (proc / str(pid) / "cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        _, _, path = line.partition("::")  # cgroup v2: "0::/system.slice/x.service"
        if not path and line.count(":") >= 2:
            path = line.split(":", 2)[2]  # v1, the name=systemd hierarchy
        for part in reversed(path.split("/")):
            if part.endswith(_UNIT_SUFFIXES):
                return part
    return None


def identify(peer: PeerCredentials, clients: Mapping[str, ClientConfig]) -> ClientConfig:
    """The client of a connection from ``peer``: the first in file order that matches its
    uid, gid or unit; else ``[clients.default]``, or an unlimited ``default``."""
    unit: str | None = None
    units_read = False
    for client in clients.values():
        if peer.uid in client.uids or peer.gid in client.gids:
            return client
        if client.units:
            if not units_read:
                unit, units_read = unit_of(peer.pid), True
            if unit is not None and unit in client.units:
                return client
    return clients.get(DEFAULT) or ClientConfig(name=DEFAULT)
