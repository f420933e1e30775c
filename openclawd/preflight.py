"""Preflight: what can be found wrong before the daemon starts, rather than while it runs.

Owns two checks, used by ``openclawd check-config`` and (the first) by ``openclawd run``:
every file the config names that the daemon reads at its start (the Vault credentials of
the auth in use, the control TCP token, the shared engine's password, Vault's CA
certificate) exists, is readable and is not empty (a credential file must be a regular
file: a FIFO is never waited on); and, online, that Vault takes our credentials and lets
us read every provider's secret. Each problem is a ``ConfigProblem``
naming the config key and the file or Vault path, never what a file or secret holds. It
reads files and talks to Vault; it never writes.
"""

from __future__ import annotations

from collections.abc import Iterator

from openclawd.config import Config
from openclawd.credentials import CredentialError, read_credential
from openclawd.errors import ConfigProblem, VaultError


def credential_files(cfg: Config) -> Iterator[tuple[str, str]]:
    """(config key, file) of each file the daemon reads at its start under ``cfg``."""
    vault = cfg.vault
    if cfg.providers:  # without providers, the daemon never talks to Vault
        if vault.auth == "token" and vault.token_file:
            yield "vault.token_file", vault.token_file
        if vault.auth == "approle":
            yield "vault.role_id_file", vault.role_id_file
            yield "vault.secret_id_file", vault.secret_id_file
    if cfg.control.tcp:
        yield "control.token_file", cfg.control.token_file
    if cfg.shared.url and cfg.shared.password_file:
        yield "shared.password_file", cfg.shared.password_file
    if cfg.tracing.otlp_endpoint and cfg.tracing.headers_file:
        yield "tracing.headers_file", cfg.tracing.headers_file


def check_files(cfg: Config) -> list[ConfigProblem]:
    """One problem per file of ``credential_files`` that is missing, unreadable or empty,
    and for ``vault.ca_cert`` if it cannot be opened or is empty.

    A bare name is looked up in ``$CREDENTIALS_DIRECTORY``, as the daemon will.
    """
    problems = []
    for key, path in credential_files(cfg):
        if not path:
            continue  # a required one missing is config.load's problem, already reported
        try:
            read_credential(path, what=key)  # read, checked, and dropped at once
        except CredentialError as exc:
            problems.append(ConfigProblem(exc.key, exc.problem))
    if cfg.providers and cfg.vault.ca_cert:
        problem = _unusable_bundle(cfg.vault.ca_cert)
        if problem is not None:
            problems.append(ConfigProblem("vault.ca_cert", problem))
    return problems


def _unusable_bundle(path: str) -> str | None:
    """Why the CA bundle at ``path`` cannot be used, or None. Not a credential: its bytes
    are the TLS library's to parse (a comment need not be UTF-8), only its absence or
    emptiness is ours to find (requests would quietly fall back to the system store)."""
    try:
        with open(path, "rb") as f:
            empty = not f.read(1)
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    return f"{path} is empty" if empty else None


async def check_vault(cfg: Config) -> list[ConfigProblem]:
    """Log in to Vault as the daemon would and read every provider's secret.

    Reads each secret's metadata, then its current version (the daemon needs ``read`` on
    both); nothing read is kept or shown. Vault unreachable or the login refused is one
    problem, and the secrets are then not tried.
    """
    if not cfg.providers:
        return []
    # hvac: slow to import, and only --online needs it.
    from openclawd.keys.key import key_values
    from openclawd.keys.vault import Vault, VaultUnreachableError

    vault = Vault(cfg.vault)
    login_key = "vault.token_file" if cfg.vault.auth == "token" else "vault.auth"
    try:
        await vault.login()
    except VaultUnreachableError as exc:
        return [ConfigProblem("vault.addr", str(exc))]
    except VaultError as exc:
        return [ConfigProblem(login_key, str(exc))]
    problems: list[ConfigProblem] = []
    for name, provider in cfg.providers.items():
        key = f"providers.{name}.vault_path"
        try:
            metadata = await vault.read_metadata(provider.vault_path)
            secret = await vault.read_secret(provider.vault_path, metadata.current_version)
        except VaultUnreachableError as exc:
            return [*problems, ConfigProblem("vault.addr", str(exc))]
        except VaultError as exc:
            problems.append(ConfigProblem(key, str(exc)))
            continue
        try:
            key_values(provider.key_field, secret)  # as the daemon will take them
        except VaultError as exc:
            where = f"{cfg.vault.mount.strip('/')}/{provider.vault_path.strip('/')}"
            problems.append(ConfigProblem(f"providers.{name}.key_field", f"{where} {exc}"))
    return problems
