"""sd_notify in pure Python: datagrams to ``$NOTIFY_SOCKET``.

Owns the conversation with systemd's service manager (``Type=notify``): READY, STATUS,
RELOADING + MONOTONIC_USEC, STOPPING and the watchdog. Without ``NOTIFY_SOCKET`` every call
is a no-op. A failure to notify is logged and never raised: the daemon's work matters more
than telling systemd about it. Every call is sync and never blocks (the socket is
non-blocking; a full queue drops the message with a log line).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

from openclawd import logs

log = logs.get(__name__)


class Notifier:
    """Sends sd_notify messages; build one per process with ``Notifier.from_environ()``."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self._sock: socket.socket | None = None
        self._address: str | bytes | None = None
        self.watchdog_usec = watchdog_usec
        if not address:
            return
        if address.startswith("@"):
            self._address = b"\0" + address[1:].encode()  # abstract namespace
        elif address.startswith("/"):
            self._address = address
        else:
            log.warning("notify.bad_socket", address=address)
            return
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Read ``NOTIFY_SOCKET`` and ``WATCHDOG_USEC``/``WATCHDOG_PID`` as systemd sets them."""
        env = os.environ if environ is None else environ
        watchdog: int | None = None
        pid = env.get("WATCHDOG_PID")
        if env.get("WATCHDOG_USEC", "").isdigit() and (pid is None or pid == str(os.getpid())):
            watchdog = int(env["WATCHDOG_USEC"]) or None
        return cls(env.get("NOTIFY_SOCKET"), watchdog)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send WATCHDOG=1: half of what systemd asked for, or None."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2_000_000

    def send(self, **fields: str | int) -> bool:
        """Send one message made of ``KEY=value`` lines; True if it was handed to the kernel."""
        if self._sock is None or self._address is None:
            return False
        payload = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            self._sock.sendto(payload, self._address)
        except OSError as exc:
            log.warning("notify.failed", error=exc.strerror or str(exc), message=payload.decode())
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send(READY=1, **({"STATUS": status} if status else {}))

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)

    def reloading(self) -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(RELOADING=1, MONOTONIC_USEC=usec)

    def stopping(self, status: str | None = None) -> bool:
        return self.send(STOPPING=1, **({"STATUS": status} if status else {}))

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
