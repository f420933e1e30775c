"""In-process daemon tests send real signals to this process: keep pytest safe from them."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from openclawd.daemon import HANDLED_SIGNALS


@pytest.fixture(autouse=True)
def restore_signal_mask() -> Iterator[None]:
    """The daemon leaves its signals blocked as it exits (the process would be exiting);
    here the process is pytest, so put the mask back, after consuming any stray signal a
    test left pending (it would otherwise kill pytest) and failing that test for it."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    yield
    stray = signal.sigpending() & HANDLED_SIGNALS
    for signum in stray:
        signal.sigwait({signum})
    signal.pthread_sigmask(signal.SIG_SETMASK, before)
    assert not stray, f"signals left pending by the test: {stray}"
