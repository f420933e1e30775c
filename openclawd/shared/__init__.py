"""The shared fleet (CONTRACT.md 5.6): limits counted in one Valkey (or Redis OSS) engine by
every daemon with the same ``[shared] url`` and ``namespace``.

``address`` parses the engine's URL (pure, for the config's checks too); ``engine`` is the
one importer of ``valkey-glide``, behind a narrow API of its own.
"""
