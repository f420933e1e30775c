"""Fixtures of the mock provider's tests: the Vault-compatible server and the log lines."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from openclawd import logs

from ..bao import bao, shared_bao  # noqa: F401 - fixtures


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """Every log line (ours at debug, the libraries' at warning), as the CLI formats them."""
    out = io.StringIO()
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), logging.getLogger("openclawd").level)
    logs.configure("debug", "logfmt", out)
    yield out
    logs.configure()
    root.handlers[:] = saved[1]
    root.setLevel(saved[0])
    logging.getLogger("openclawd").setLevel(saved[2])
