"""Fixtures of the mock provider's tests: the Vault-compatible server and the log lines."""

from __future__ import annotations

from ..bao import bao, shared_bao  # noqa: F401 - fixtures
