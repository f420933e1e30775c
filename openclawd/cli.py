"""The ``openclawd`` command: argv, logging setup, config loading, ``trio.run``.

Exit codes: 0 success; 2 an invalid config (one line per problem on stderr) or bad usage;
1 any other startup failure (a socket already served by a live daemon, say). systemd's
unit keeps 2 out of its restart loop: a bad config does not get better by retrying.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

import trio

from openclawd import __version__, logs
from openclawd import config as config_module
from openclawd.errors import ConfigError, ListenError
from openclawd.notify import Notifier

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

log = logs.get("openclawd.cli")

# daemon.HANDLED_SIGNALS, spelled out here so that `run` can hold them before importing
# the daemon (trio, hypercorn, quart take a while to import). A test checks they agree.
_HELD_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


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
    sub.add_parser("version", help="print the version")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"openclawd {__version__}")
        return EXIT_OK
    if args.command == "check-config":
        return _check_config(args.config)
    return _run(args.config)


def _check_config(path: str) -> int:
    try:
        cfg = config_module.load(path)
    except ConfigError as exc:
        for line in exc.lines():
            print(line, file=sys.stderr)
        return EXIT_CONFIG
    sys.stdout.write(config_module.dump(cfg))
    return EXIT_OK


def _run(path: str) -> int:
    # Until the daemon's signal receiver is installed, a SIGTERM or SIGHUP would kill the
    # process with no drain and no cleanup: hold them, the daemon lets them through.
    signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)
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
    log.info(
        "daemon.starting",
        version=__version__,
        config=path,
        providers=",".join(cfg.providers) or "none",
    )

    from openclawd import daemon  # the daemon pulls in the servers; keep `version` light

    try:
        trio.run(daemon.run, cfg, notifier)
    except ListenError as exc:
        log.error("daemon.listen_failed", error=str(exc))
        notifier.status(f"failed: {exc}")
        return EXIT_FAILURE
    finally:
        notifier.close()
    return EXIT_OK
