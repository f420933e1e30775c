"""The ``openclawd`` command: argv, logging setup, config loading, ``trio.run``.

Exit codes: 0 success; 2 an invalid config (one line per problem on stderr) or bad usage;
1 any other startup failure (a socket already served by a live daemon, a credential file
that cannot be read). systemd's unit keeps 2 out of its restart loop: a bad config does not
get better by retrying (a credential file may yet appear).
"""

from __future__ import annotations

import argparse
import functools
import gc
import ipaddress
import math
import os
import signal
import sys
from collections.abc import Sequence

import trio

from openclawd import __version__, explain, logs, opctl, preflight
from openclawd import config as config_module
from openclawd.errors import ConfigError, ListenError
from openclawd.mock.content import DEFAULT_CHUNK_DELAY_S
from openclawd.notify import Notifier

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

log = logs.get("openclawd.cli")

# daemon.HANDLED_SIGNALS, spelled out here so that `run` can hold them before importing
# the daemon (trio, hypercorn, quart take a while to import). A test checks they agree.
_HELD_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


# Young objects a generation-0 pass waits for (CPython's default: 700).
GC_YOUNG_THRESHOLD = 10_000


def tune_gc() -> None:
    """Keep the garbage collector from stalling the event loop under load.

    Each request and event allocates objects; at a few thousand events a second CPython's
    default thresholds start a full collection about once a second, and each one walks the
    whole heap (~90k objects, mostly the imported modules) in 30-44 ms while every stream
    waits: that was /v1/ws's p99 cliff (docs/performance.md). So, once, before the loop
    starts: collect, freeze what is left (the modules, the config: never garbage, no longer
    scanned), and let young objects pile up 14x longer before a pass, so that far fewer
    survive into the older generations. Cycles made later are still collected.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)
    log.info("gc.tuned", frozen=gc.get_freeze_count(), threshold=GC_YOUNG_THRESHOLD)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openclawd",
        description="A local sidecar between apps and AI providers; keys come from Vault.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in (
        ("run", "run the daemon in the foreground (systemd runs this)"),
        ("check-config", "validate the config and print the effective config"),
    ):
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument(
            "--config",
            metavar="PATH",
            default=config_module.DEFAULT_CONFIG_PATH,
            help=f"config file (default: {config_module.DEFAULT_CONFIG_PATH})",
        )
        if name == "check-config":
            cmd.add_argument(
                "--online",
                action="store_true",
                help="also log in to Vault and read every provider's secret",
            )
    sub.add_parser("version", help="print the version")
    opctl.add_commands(sub)
    demo = sub.add_parser(
        "demo",
        help="run the daemon on a local Vault dev server and the built-in mock provider",
        description="Start a Vault dev server (bao, from the `demo` extra) with a demo key, "
        "the mock provider and the daemon, print how to use them, and stop them all on "
        "Ctrl-C.",
    )
    demo.add_argument(
        "--runtime-dir",
        metavar="DIR",
        help="where the sockets, config and logs go (default: a temporary directory, "
        "removed at the end)",
    )
    mock = sub.add_parser(
        "mock-provider",
        help="run the built-in OpenAI-shaped mock provider on loopback",
        description="An OpenAI-shaped provider on loopback: /v1/models, /v1/chat/completions "
        "(streaming or not) and the /v1/realtime WebSocket. With --vault-path it accepts "
        "only the key Vault holds there (VAULT_ADDR, VAULT_TOKEN); without, any key.",
    )
    mock.add_argument("--host", default="127.0.0.1", type=_loopback, help="default: 127.0.0.1")
    mock.add_argument("--port", default=0, type=_port, help="default: 0, a free port")
    mock.add_argument(
        "--chunk-delay-s",
        default=DEFAULT_CHUNK_DELAY_S,
        type=_non_negative,
        metavar="SECONDS",
        help=f"pause before each streamed word (default: {DEFAULT_CHUNK_DELAY_S})",
    )
    mock.add_argument("--vault-path", metavar="PATH", help="the KV v2 secret holding the key")
    mock.add_argument("--vault-mount", metavar="MOUNT", default="secret", help="default: secret")
    mock.add_argument("--key-field", metavar="FIELD", default="api_key", help="default: api_key")
    mock.add_argument(
        "--vault-addr", metavar="URL", help="default: $VAULT_ADDR; the token is $VAULT_TOKEN"
    )
    return parser


def _loopback(value: str) -> str:
    try:
        loopback = value == "localhost" or ipaddress.ip_address(value).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise argparse.ArgumentTypeError(f"{value!r} is not a loopback address")
    return value


def _port(value: str) -> int:
    if not value.isdigit() or int(value) > 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number (0-65535)")
    return int(value)


def _non_negative(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number < 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds")
    return number


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"openclawd {__version__}")
        return EXIT_OK
    if args.command == "check-config":
        return _check_config(args.config, online=args.online)
    if args.command == "demo":
        return _demo(args.runtime_dir)
    if args.command == "mock-provider":
        return _mock_provider(args)
    if args.command in opctl.COMMANDS:
        return opctl.main(args)
    return _run(args.config)


def _demo(runtime_dir: str | None) -> int:
    logs.configure()
    try:
        from openclawd import demo  # trio, quart, hvac: a Ctrl-C may come while they load

        return demo.run(runtime_dir)
    except KeyboardInterrupt:  # before the demo's own signal handling, nothing started
        return 130


def _mock_provider(args: argparse.Namespace) -> int:
    logs.configure()
    from openclawd.config import VaultConfig
    from openclawd.errors import VaultError
    from openclawd.keys.vault import Vault
    from openclawd.mock.keys import AnyKey, KeyCheck, VaultKeys
    from openclawd.mock.server import run_standalone

    vault: Vault | None = None
    keys: KeyCheck = AnyKey()
    if args.vault_path:
        addr = args.vault_addr or os.environ.get("VAULT_ADDR", "")
        if not addr.startswith(("http://", "https://")):
            print(
                "openclawd mock-provider: --vault-path needs a Vault address "
                "(--vault-addr or VAULT_ADDR, http:// or https://)",
                file=sys.stderr,
            )
            return EXIT_CONFIG
        vault = Vault(VaultConfig(addr=addr, auth="token", mount=args.vault_mount))
        keys = VaultKeys(vault, args.vault_path, args.key_field)
    else:
        log.warning("mock.any_key", note="no --vault-path: any non-empty key is accepted")
    failure: str | None = None
    try:
        trio.run(
            functools.partial(
                run_standalone,
                keys,
                host=args.host,
                port=args.port,
                chunk_delay_s=args.chunk_delay_s,
                login=vault,
            )
        )
    except* OSError as group:
        failure = f"cannot listen on {args.host}:{args.port}: {group.exceptions[0]}"
    except* VaultError as group:
        failure = f"cannot read the key from Vault: {group.exceptions[0]}"
    if failure is not None:
        print(f"openclawd mock-provider: {failure}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _check_config(path: str, *, online: bool) -> int:
    try:
        cfg = config_module.load(path)
        problems = preflight.check_files(cfg)
        if online and not problems:  # a file to fix first: Vault would only say the same
            problems = trio.run(preflight.check_vault, cfg)
        if problems:
            raise ConfigError(cfg.source, problems)
    except ConfigError as exc:
        for line in exc.lines():
            print(line, file=sys.stderr)
        return EXIT_CONFIG
    sys.stdout.write(config_module.dump(cfg) + explain.token_control(cfg))
    return EXIT_OK


def _too_late(signum: int, frame: object) -> None:
    """A stop or reload signal after the daemon's receiver closed: it is stopping."""


def _run(path: str) -> int:
    # Until the daemon's signal receiver is installed, a SIGTERM or SIGHUP would kill the
    # process with no drain and no cleanup: hold them, the daemon lets them through.
    signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)
    # And once its receiver is gone (trio puts these handlers back), a late one changes
    # nothing: the daemon is stopping already. Not SIG_IGN, which would drop the held ones.
    # Worker threads started while the receiver was there may still take a signal.
    for signum in _HELD_SIGNALS:
        signal.signal(signum, _too_late)
    logs.configure()
    notifier = Notifier.from_environ()
    try:
        cfg = config_module.load(path)
    except ConfigError as exc:
        for line in exc.lines():
            log.error("config.invalid", problem=line)
        notifier.status(f"invalid config: {exc.problems[0]}")
        return EXIT_CONFIG
    logs.configure(cfg.logging.level, cfg.logging.format)
    # A credential file that cannot be read now would have the daemon retry Vault forever
    # and never become ready: stop, naming the file (check-config reports the same).
    unreadable = preflight.check_files(cfg)
    if unreadable:
        for problem in unreadable:
            log.error("credential.unreadable", problem=str(problem))
        notifier.status(f"failed: {unreadable[0]}")
        return EXIT_FAILURE
    log.info(
        "daemon.starting",
        version=__version__,
        config=path,
        providers=",".join(cfg.providers) or "none",
    )

    from openclawd import daemon  # the daemon pulls in the servers; keep `version` light

    tune_gc()
    try:
        trio.run(daemon.run, cfg, notifier)
    except ListenError as exc:
        log.error("daemon.listen_failed", error=str(exc))
        notifier.status(f"failed: {exc}")
        return EXIT_FAILURE
    finally:
        notifier.close()
        # Python's exit puts SIG_DFL back for signals with a Python handler, and trio's
        # idle worker threads still accept them: a late SIGTERM would then kill the
        # process on its way out. Ignored, it cannot.
        for signum in _HELD_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
    return EXIT_OK
