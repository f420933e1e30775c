"""Credential files: the secrets the daemon reads from disk at its start (the Vault token or
AppRole ids, the control API's bearer token), as systemd's ``LoadCredential=`` hands them.

Owns reading one such file: an absolute path, or a bare name looked up in
``$CREDENTIALS_DIRECTORY``. An error names the file and what is wrong with it, never what
it holds. Provider keys are never read from disk: they come from Vault only.
"""

from __future__ import annotations

import os
import stat

from openclawd.errors import OpenclawdError


class CredentialError(OpenclawdError):
    """A credential file is missing, unreadable, not text, or empty.

    ``key`` is the config key that names the file, ``problem`` what is wrong with it (naming
    the file); ``str()`` is ``"key: problem"``, the form of a config problem.
    """

    code = "bad_credential"

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


def read_credential(path: str, *, what: str) -> str:
    """The content of a credential file, stripped of surrounding whitespace.

    ``what`` names the config key, for the error.

    Raises:
        CredentialError: the file is missing, unreadable or empty (its content never shows).
    """
    if not os.path.isabs(path):
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise CredentialError(
                what, f"{path!r} is a credential name but CREDENTIALS_DIRECTORY is not set"
            )
        path = os.path.join(directory, path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (nothing hangs); anything
        # but a regular file (a FIFO, /dev/zero) is refused before it is read.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise CredentialError(what, f"{path} is not a regular file")
            value = f.read().decode("utf-8").strip()
    except OSError as exc:
        raise CredentialError(what, f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CredentialError(what, f"{path} is not UTF-8 text") from None
    if not value:
        raise CredentialError(what, f"{path} is empty")
    return value
