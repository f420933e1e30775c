from ..bao import bao, shared_bao  # noqa: F401 - fixtures
