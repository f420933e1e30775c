"""Fixtures of the tracing tests: the Vault-compatible server."""

from ..bao import bao, shared_bao  # noqa: F401 - fixtures
