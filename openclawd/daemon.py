"""The daemon: wiring, signals, readiness, reload and drain. The only long-lived nurseries.

Shaped like hypercorn's ``worker_serve``: a root nursery for what lives as long as the
process (signals, the watchdog, state reports, the key manager, an operator's drain);
inside it a connection nursery that holds every app connection; inside that a front
nursery for the listeners (data socket, control API on its socket and optional loopback
TCP port). It is also what the control API operates (``control.Operations``): statistics,
key rotation, drain and resume.

A drain refuses new work on every entry point and lets work in flight (requests, realtime
sessions) run until done or a deadline. The operator's drain (``POST /v1/drain``) then
cuts what is left with 1001 and stays draining until ``POST /v1/resume``. Shutdown (first
SIGTERM or SIGINT) is the same drain with ``[shutdown] drain_timeout_s``, after which the
connections are cancelled (their handlers close with 1012) with the listeners, and the
daemon returns: exit 0. A second signal cancels everything at once. SIGHUP reloads the
config file; an invalid file is logged and the old config stays. The socket files the
daemon made are removed on every way out; those systemd passed stay, still listening.
"""

from __future__ import annotations

import functools
import math
import signal
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING

import trio

from openclawd import __version__, logs, tokencontrol, tracing
from openclawd import config as config_module
from openclawd.asgi import serve_asgi
from openclawd.config import Config
from openclawd.control import BearerAuth, create_app
from openclawd.errors import ConfigError, StoppingError
from openclawd.keys.manager import KeyManager, VaultAPI
from openclawd.keys.vault import Vault
from openclawd.lifecycle import Lifecycle
from openclawd.listeners import (
    control_token,
    files_needed,
    listen_tcp,
    open_listeners,
    raise_file_limit,
    serve_data,
)
from openclawd.local import passthrough, realtime
from openclawd.local.channel import Channels
from openclawd.local.cutter import Close
from openclawd.local.passthrough import Passthrough
from openclawd.local.realtime import Realtime
from openclawd.local.server import LocalServer
from openclawd.local.unix import listen_backlog
from openclawd.notify import Notifier
from openclawd.protocol.closecodes import CloseCode
from openclawd.protocol.exchange import Admission
from openclawd.protocol.limits import Limits
from openclawd.protocol.ratelimit import RateLimiter
from openclawd.reload import RESTART_ONLY, changed_keys, keep_restart_only
from openclawd.statistics import Statistics, TokenControlStatistics
from openclawd.upstream.headroom import Headroom
from openclawd.upstream.http import Upstreams

if TYPE_CHECKING:  # valkey-glide is imported only by a fleet's daemon (tokencontrol)
    from openclawd.shared.leases import LeaseKeeper

log = logs.get(__name__)

# How the daemon's cuts close a WebSocket (CONTRACT.md 3.2, 4).
# How often a daemon tops its share of the fleet's limits up from the engine.
LEASE_TICK_S = 0.1
SHUTDOWN_CLOSE = Close(CloseCode.SHUTDOWN, "openclawd is shutting down")
DRAIN_DEADLINE_CLOSE = Close(CloseCode.DRAIN_DEADLINE, "drain deadline reached")
_CONTROL_LOG = "openclawd.control.server"

_SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)
HANDLED_SIGNALS = frozenset({*_SHUTDOWN_SIGNALS, signal.SIGHUP})


class Daemon:
    """One run of the daemon over one config file."""

    def __init__(
        self, config: Config, notifier: Notifier, *, vault: VaultAPI | None = None
    ) -> None:
        """``vault`` replaces the Vault client built from ``[vault]`` (tests)."""
        self.config = config
        self.notifier = notifier
        self.lifecycle = Lifecycle()
        self.local = LocalServer(config.listen, self.lifecycle)
        self.keys = KeyManager(
            config, vault if vault is not None else Vault(config.vault), self.lifecycle
        )
        self.upstreams = Upstreams(config, self.keys)
        # One request rate per peer uid, whichever entry point its requests come in by.
        self.limiter = RateLimiter(config.limits.requests_per_minute)
        # Every entry point admits new work through the same gate: the drain, the limits.
        # With [shared] url, the limits are the fleet's: leases a keeper fills (run()).
        tick = LEASE_TICK_S if config.shared.url else None
        self.limits = Limits.of(config, now=trio.current_time(), lease_tick_s=tick)
        self.keeper: LeaseKeeper | None = None
        self.admission = admission = Admission(self.lifecycle, [self.limiter], self.limits)
        # [tracing]: a span per request, exported from a thread; else no-op traces.
        self.tracer = tracer = tracing.open_tracer(config.tracing)
        self.channels = Channels(config, self.upstreams, self.lifecycle, admission, tracer)
        self.realtime = Realtime(config, self.keys, self.lifecycle, admission, tracer=tracer)
        self.passthrough = Passthrough(config, self.upstreams, self.lifecycle, admission, tracer)
        self.local.websocket_routes["/v1/ws"] = self.channels.serve
        self.local.websocket_routes[realtime.PREFIX] = self.realtime.serve
        self.local.routes[passthrough.PREFIX] = self.passthrough.serve
        self._stop_requested = trio.Event()
        self._root: trio.Nursery | None = None
        self._reload_lock = trio.Lock()
        self._announced_ready = False

    async def run(self) -> None:
        """Serve until a shutdown signal; return once everything is closed.

        Raises:
            ListenError: a socket could not be created (e.g. a live daemon holds the path).
        """
        cfg = self.config
        raise_file_limit(files_needed(cfg))
        token = control_token(cfg.control)
        with (
            trio.open_signal_receiver(*HANDLED_SIGNALS) as signals,
            _signals_let_through(),
            ExitStack() as sockets,
        ):
            backlog = listen_backlog(cfg.listen.max_connections)
            data, control = open_listeners(cfg, backlog, sockets)
            tcp = sockets.enter_context(listen_tcp(cfg.control.tcp)) if token else None
            control_app = create_app(self)
            # The TCP listener serves the same app, behind the token; its lifespan runs
            # once, on the unix socket's server.
            protected = BearerAuth(control_app, token) if token else None

            async with trio.open_nursery() as root:
                self._root = root
                root.start_soon(self._handle_signals, signals)
                root.start_soon(self._feed_watchdog)
                root.start_soon(self._follow_drains)
                if cfg.shared.url:
                    root.start_soon(self._keep_leases)
                # Not awaited: the sockets listen meanwhile, and /readyz says what we wait for.
                root.start_soon(self.keys.serve)
                async with trio.open_nursery() as connections, trio.open_nursery() as front:
                    await front.start(serve_data, self.local, self.lifecycle, data, connections)
                    await front.start(
                        functools.partial(
                            serve_asgi,
                            control_app,
                            control.sock,
                            backlog=backlog,
                            log_name=_CONTROL_LOG,
                        )
                    )
                    if tcp is not None and protected is not None:
                        await front.start(
                            functools.partial(
                                serve_asgi, protected, tcp, backlog=backlog, log_name=_CONTROL_LOG
                            )
                        )
                    log.info(
                        "daemon.listening",
                        socket=data.path,
                        control=control.path,
                        control_tcp=cfg.control.tcp or None,
                        backlog=backlog,
                    )
                    self.lifecycle.set_listening()
                    root.start_soon(self._report_state)

                    await self._stop_requested.wait()
                    if await self._drain():
                        log.info("daemon.drained")
                    else:
                        log.warning("daemon.drain_deadline", inflight=self.lifecycle.work.count)
                    # Nothing new is taken; what is left (idle channels, kept-alive HTTP
                    # connections, work past the deadline) is cut now, with 1012.
                    front.cancel_scope.cancel()
                    self.local.cutter.cut_at(trio.current_time(), SHUTDOWN_CLOSE)
                root.cancel_scope.cancel()
            with trio.move_on_after(2.0) as closing:
                closing.shield = True
                await self.upstreams.aclose()
            # The spans still queued go out (a dead collector: one export timeout).
            with trio.move_on_after(cfg.tracing.export_timeout_s + 1.0) as closing:
                closing.shield = True
                await self.tracer.aclose()
        log.info("daemon.stopped")

    async def _handle_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            assert self._root is not None
            if signum == signal.SIGHUP:
                # In its own task: a slow config read must not hold up a stop signal.
                self._root.start_soon(self.reload)
            elif not self._stop_requested.is_set():
                timeout_s = self.config.shutdown.drain_timeout_s
                log.info(
                    "daemon.stopping",
                    signal=name,
                    drain_timeout_s=timeout_s,
                    inflight=self.lifecycle.work.count,
                )
                deadline = trio.current_time() + timeout_s
                self.lifecycle.set_stopping(deadline)
                self.local.cutter.cut_at(deadline, SHUTDOWN_CLOSE)
                self.notifier.stopping(self.lifecycle.describe())
                self._stop_requested.set()
            else:
                log.warning("daemon.forced_stop", signal=name, inflight=self.lifecycle.work.count)
                self._root.cancel_scope.cancel()

    # --- what the control API operates -----------------------------------------------------

    def statistics(self) -> Statistics:
        return Statistics(
            state=self.lifecycle.state.value,
            version=__version__,
            uptime_s=self.lifecycle.uptime_s,
            requests_inflight=self.channels.inflight + self.passthrough.inflight,
            realtime_sessions=self.realtime.sessions,
            local=self.local.statistics(),
            keys=self.keys.statistics(),
            upstreams=self.upstreams.statistics(),
            token_control=self._token_control(),
            trace_spans_dropped=self.tracer.dropped,
        )

    def _token_control(self) -> TokenControlStatistics:
        return tokencontrol.statistics(self.config, self.limits, self.upstreams, self.keeper)

    def redact(self, text: str) -> str:
        return self.keys.redact(text)

    async def rotate_keys(
        self, provider: str | None
    ) -> Mapping[str, tuple[int | None, int | None, bool]]:
        return await self.keys.rotate_now(provider)

    def drain(self, deadline_s: float | None) -> float:
        """The operator's drain: new work is refused from now on; work in flight has
        ``deadline_s`` (default ``[shutdown] drain_timeout_s``), then its connections are
        closed with 1001. Draining again moves the deadline. Returns ``deadline_s``.

        Raises:
            StoppingError: the daemon is shutting down (its own drain runs).
        """
        if self.lifecycle.stopping:
            raise StoppingError("openclawd is shutting down: its own drain is running")
        if deadline_s is None:
            deadline_s = self.config.shutdown.drain_timeout_s
        deadline = trio.current_time() + deadline_s
        self.lifecycle.set_draining(deadline)
        self.local.cutter.cut_at(deadline, DRAIN_DEADLINE_CLOSE)
        log.info("daemon.draining", deadline_s=deadline_s, inflight=self.lifecycle.work.count)
        return deadline_s

    def resume(self) -> None:
        """Undo the operator's drain: new work is taken again.

        Raises:
            StoppingError: the daemon is shutting down; that cannot be undone.
        """
        if self.lifecycle.stopping:
            raise StoppingError("openclawd is shutting down: a shutdown cannot be resumed")
        if self.lifecycle.draining:
            self.lifecycle.set_draining(None)
            self.local.cutter.cut_at(math.inf, None)
            log.info("daemon.resumed")

    async def _keep_leases(self) -> None:
        """Feed the fleet's limits from the engine until the daemon stops."""

        def started(keeper: LeaseKeeper) -> None:
            self.keeper = keeper
            self.admission.top_up = keeper.top_up

        def headrooms() -> dict[str, Headroom]:
            return {name: pool.headroom for name, pool in self.upstreams.pools.items()}

        await tokencontrol.keep_leases(
            self.config.shared, self.limits, self.lifecycle, started, headrooms
        )

    async def _follow_drains(self) -> None:
        """Follow each operator's drain (``drain`` only changes the state: this task, of
        the daemon's own, sees it), until the daemon stops."""
        lifecycle = self.lifecycle
        followed: float | None = None  # the deadline already followed to its end
        while True:
            if lifecycle.draining and not lifecycle.stopping:
                if lifecycle.drain_deadline != followed:
                    await self._operator_drain()
                    followed = lifecycle.drain_deadline
                    continue
            else:
                followed = None
            await lifecycle.wait_changed()

    async def _operator_drain(self) -> None:
        """Follow the operator's drain to its deadline: log and report when nothing is in
        flight any more, and when the deadline cuts what is left (the cut itself is the
        connections' own: ``Cutter``). Ends early on a resume or a shutdown (which drains
        on its own)."""
        lifecycle = self.lifecycle
        if await self._drain() and lifecycle.draining and not lifecycle.stopping:
            log.info("daemon.drained")
        while lifecycle.draining and not lifecycle.stopping:
            remaining = lifecycle.drain_remaining_s()
            assert remaining is not None
            if remaining <= 0:
                open_ = self.local.cutter.open
                log.warning(
                    "daemon.drain_deadline", inflight=lifecycle.work.count, connections=open_
                )
                self.notifier.status(f"draining: deadline reached, {open_} connections cut")
                return
            with trio.move_on_at(lifecycle.drain_deadline or math.inf):
                await lifecycle.wait_changed()

    async def _drain(self) -> bool:
        """The one drain (the operator's, or shutdown's): wait until no work is in flight
        (True), or until its deadline (False), which a new drain may move. Wakes only when
        something changes (work ends, the drain moves), never to poll; the STATUS line is
        ``_report_state``'s. Returns early (True) when the drain is undone (a resume)."""
        lifecycle = self.lifecycle
        work = lifecycle.work
        while work.count and (lifecycle.draining or lifecycle.stopping):
            remaining = lifecycle.drain_remaining_s()
            if remaining is None or remaining <= 0:
                return False
            with trio.move_on_at(lifecycle.drain_deadline or math.inf):
                await lifecycle.wait_changed()
        return not work.count or not (lifecycle.draining or lifecycle.stopping)

    async def reload(self) -> None:
        """Re-read the config file (SIGHUP). An invalid file leaves the old config in force.

        systemd hears RELOADING=1 ... READY=1 around it, but only once the daemon has
        announced READY=1: before that, READY=1 would claim a startup that has not finished,
        and while stopping the reload is skipped.
        """
        if self.lifecycle.stopping:
            log.info("config.reload_skipped", reason="stopping")
            return
        async with self._reload_lock:
            tell_systemd = self._announced_ready
            if tell_systemd:
                self.notifier.reloading()
            source = self.config.source
            log.info("config.reloading", path=source)
            changed: list[str] | None = None  # the keys applied, once applied
            try:
                new = await trio.to_thread.run_sync(
                    config_module.load, source, abandon_on_cancel=True
                )
            except ConfigError as exc:
                for line in exc.lines():
                    log.error("config.reload_rejected", problem=line)
                status = f"reload rejected, old config kept: {exc.problems[0]}"
            except Exception:
                # A reload must never take down a daemon that is serving.
                log.exception("config.reload_failed", path=source)
                status = "reload failed, old config kept: see the log"
            else:
                if self.lifecycle.stopping:  # a stop signal came in during the read
                    log.info("config.reload_skipped", reason="stopping")
                    return
                changed = self._apply(new)
                status = ""
            # CONTRACT.md 1: SIGHUP also re-reads every key, under the config in force.
            await self.keys.reload(self.config)
            if changed is not None:  # logged once the keys, too, follow the new config
                log.info("config.reloaded", path=source, changed=",".join(changed))
            status = status or self.lifecycle.describe()
            if tell_systemd:
                self.notifier.ready(status)
            else:
                self.notifier.status(status)

    def _apply(self, new: Config) -> list[str]:
        """Put ``new`` in force, but for the keys in ``RESTART_ONLY`` (each one that
        changed is logged as ``config.needs_restart`` and keeps its value). Returns the
        keys that changed and were applied (a provider added or removed as a whole is
        named ``providers.NAME``)."""
        old = self.config
        changed = changed_keys(old, new)
        for key in changed:
            if key in RESTART_ONLY:
                log.warning("config.needs_restart", key=key)
        new = keep_restart_only(old, new)
        logs.configure(new.logging.level, new.logging.format)
        self.local.config = new.listen
        self.limiter.requests_per_minute = new.limits.requests_per_minute
        self.limits.configure_from(new, now=trio.current_time())
        self.channels.configure(new)
        self.realtime.configure(new)
        self.passthrough.configure(new)
        for pool in self.upstreams.reload(new):
            assert self._root is not None
            self._root.start_soon(pool.aclose_when_idle)  # in-flight requests run on
        self.config = new
        raise_file_limit(files_needed(new))  # more connections or pools may need more
        return [key for key in changed if key not in RESTART_ONLY]

    async def _report_state(self) -> None:
        """READY=1 once ready, then a STATUS= line at every change of state."""
        while True:
            if not self._announced_ready and self.lifecycle.ready:
                self._announced_ready = True
                log.info("daemon.ready")
                self.notifier.ready(self.lifecycle.describe())
            else:
                self.notifier.status(self.lifecycle.describe())
            await self.lifecycle.wait_changed()

    async def _feed_watchdog(self) -> None:
        """WATCHDOG=1 at half of WATCHDOG_USEC: proof that the event loop is turning."""
        interval = self.notifier.watchdog_interval_s
        if interval is None:
            return
        while True:
            self.notifier.watchdog()
            await trio.sleep(interval)


@contextmanager
def _signals_let_through() -> Iterator[None]:
    """Unblock the handled signals while trio's receiver is there to take them.

    The CLI blocks them from its first line, so none can kill the process before the
    receiver exists; they wait and come through here. On the way out they are blocked
    again before the receiver closes: trio would re-raise any it still holds under the
    default handlers, and a SIGHUP racing a stop would then kill us instead of exit 0.
    """
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)


async def run(config: Config, notifier: Notifier) -> None:
    """Run the daemon for ``config`` until a shutdown signal."""
    await Daemon(config, notifier).run()
