"""``openclawd demo``: the daemon on an embedded default, with nothing to set up.

A real OpenBao dev server (the ``bao`` binary of the ``demo`` extra) holding a generated
demo key in KV v2, the built-in mock provider (in this process) that accepts only the key
Vault holds now, and ``openclawd run`` on a config written for them, all in one runtime
directory (``layout``); started, watched and stopped in order (``supervise``); the guide
printed once the daemon is ready (``guide``).
"""

from __future__ import annotations

import sys
from typing import TextIO

import trio

from openclawd.demo.guide import guide
from openclawd.demo.layout import (
    VAULT_MOUNT,
    VAULT_PATH,
    DemoError,
    Layout,
    find_bao,
    runtime_directory,
)
from openclawd.demo.supervise import Output, demo

__all__ = ["VAULT_MOUNT", "VAULT_PATH", "DemoError", "Layout", "find_bao", "guide", "run"]


def run(runtime_dir: str | None, *, out: TextIO = sys.stdout) -> int:
    """``openclawd demo``: 0 after a stop by signal; 1 when something failed or died (said
    on stderr)."""
    failure: list[str] = []
    try:
        bao = find_bao()
        with runtime_directory(runtime_dir) as layout:
            try:
                return trio.run(demo, layout, bao, Output(out))
            except* DemoError as group:
                failure.extend(str(exc) for exc in _leaves(group))
    except DemoError as exc:
        failure.append(str(exc))
    for text in failure:
        print(f"openclawd demo: {text}", file=sys.stderr)
    return 1


def _leaves(group: BaseExceptionGroup[DemoError]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        leaves.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return leaves
