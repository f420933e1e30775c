"""openclawd: a local sidecar between apps and AI providers."""

__version__ = "0.1.0"
