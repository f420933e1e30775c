"""A built-in mock AI provider: OpenAI-shaped HTTP (SSE streaming included) and a realtime
WebSocket on loopback, checking each request's key against the one held in Vault.

``openclawd demo`` runs it as the demo's provider; ``openclawd mock-provider`` runs it on
its own. It is a test double with realistic shapes and pacing, not a model: its answers are
canned, and say which key version reached it.
"""
