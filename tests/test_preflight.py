"""Preflight: `check-config` finds unusable credential files (and, with `--online`, Vault
paths missing or refused) before `run` would retry forever; `run` stops at once on them."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .bao import KV_MOUNT, BaoServer, free_port, shared_bao  # noqa: F401 - a fixture

WriteConfig = Callable[..., Path]
SECRET = "hvs.CONTENT-never-shown-0815"
PROVIDER = {"base_url": "https://api.example.com", "vault_path": "oc/preflight"}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The command, with no VAULT_* or CREDENTIALS_DIRECTORY from the test's environment."""
    return subprocess.run(
        [sys.executable, "-m", "openclawd", *args],
        capture_output=True,
        text=True,
        timeout=60,  # a safety net: `run` retrying forever must fail the test, not hang it
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )


def check(path: Path, *options: str, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    result = run_cli("check-config", "--config", str(path), *options, env=env)
    if result.returncode:
        assert result.stdout == ""
    assert SECRET not in result.stdout + result.stderr
    return result.returncode, result.stderr.splitlines()


def vault_config(addr: str = "http://127.0.0.1:8200", **keys: Any) -> dict[str, Any]:
    return {"vault": {"addr": addr, **keys}, "providers.openai": PROVIDER}


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "present"
    path.write_text(f"{SECRET}\n")
    return path


def test_readable_credential_files_pass(
    write_config: WriteConfig, secret_file: Path, tmp_path: Path
) -> None:
    path = write_config(
        control={"tcp": "127.0.0.1:9477", "token_file": str(secret_file)},
        **vault_config(token_file=str(secret_file)),
    )
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert tomllib.loads(result.stdout)["vault"]["token_file"] == str(secret_file)
    assert SECRET not in result.stdout + result.stderr


def test_missing_vault_token_file(write_config: WriteConfig, tmp_path: Path) -> None:
    missing = tmp_path / "vault-token"
    path = write_config(**vault_config(token_file=str(missing)))
    assert check(path) == (
        2,
        [f"vault.token_file: cannot read {missing}: No such file or directory (in {path})"],
    )


def test_missing_approle_files(write_config: WriteConfig, tmp_path: Path) -> None:
    role, secret = tmp_path / "role-id", tmp_path / "secret-id"
    path = write_config(
        **vault_config(auth="approle", role_id_file=str(role), secret_id_file=str(secret))
    )
    assert check(path) == (
        2,
        [
            f"vault.role_id_file: cannot read {role}: No such file or directory (in {path})",
            f"vault.secret_id_file: cannot read {secret}: No such file or directory (in {path})",
        ],
    )


def test_missing_control_token_file(write_config: WriteConfig, tmp_path: Path) -> None:
    missing = tmp_path / "control-token"
    path = write_config(control={"tcp": "127.0.0.1:9477", "token_file": str(missing)})
    assert check(path) == (
        2,
        [f"control.token_file: cannot read {missing}: No such file or directory (in {path})"],
    )


def test_missing_shared_password_file(write_config: WriteConfig, tmp_path: Path) -> None:
    missing = tmp_path / "valkey-password"
    shared = {"url": "rediss://valkey.internal:6380", "password_file": str(missing)}
    path = write_config(shared=shared)
    assert check(path) == (
        2,
        [f"shared.password_file: cannot read {missing}: No such file or directory (in {path})"],
    )


def test_shared_password_file_as_a_credential_name(
    write_config: WriteConfig, tmp_path: Path
) -> None:
    shared = {"url": "redis://127.0.0.1:6379", "password_file": "valkey-password"}
    path = write_config(shared=shared)
    assert check(path) == (
        2,
        [
            "shared.password_file: 'valkey-password' is a credential name but "
            f"CREDENTIALS_DIRECTORY is not set (in {path})"
        ],
    )
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "valkey-password").write_text("\n")
    env = {"CREDENTIALS_DIRECTORY": str(credentials)}
    assert check(path, env=env) == (
        2,
        [f"shared.password_file: {credentials / 'valkey-password'} is empty (in {path})"],
    )


def test_a_readable_shared_password_file_passes_unshown(
    write_config: WriteConfig, secret_file: Path
) -> None:
    shared = {"url": "rediss://valkey.internal:6380", "password_file": str(secret_file)}
    path = write_config(shared=shared)
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    effective = tomllib.loads(result.stdout)["shared"]
    assert effective["password_file"] == str(secret_file)
    assert effective["url"] == "rediss://valkey.internal:6380"
    assert SECRET not in result.stdout + result.stderr


def test_run_exits_1_naming_an_unreadable_shared_password_file(
    write_config: WriteConfig, runtime_dir: Path
) -> None:
    missing = runtime_dir / "valkey-password"
    path = write_config(shared={"url": "redis://127.0.0.1:6379", "password_file": str(missing)})
    result = run_cli("run", "--config", str(path))
    assert result.returncode == 1, result.stderr
    assert f"shared.password_file: cannot read {missing}: No such file" in result.stderr
    assert list(runtime_dir.glob("*.sock")) == []  # stopped before listening


def test_files_of_an_auth_not_in_use_are_not_checked(
    write_config: WriteConfig, secret_file: Path, tmp_path: Path
) -> None:
    # token_file is ignored with auth = "approle", and control.token_file without control.tcp.
    path = write_config(
        control={"token_file": str(tmp_path / "nope")},
        **vault_config(
            auth="approle",
            token_file=str(tmp_path / "nope"),
            role_id_file=str(secret_file),
            secret_id_file=str(secret_file),
        ),
    )
    assert check(path) == (0, [])


def test_bare_name_without_credentials_directory(write_config: WriteConfig) -> None:
    path = write_config(**vault_config(token_file="vault-token"))
    assert check(path) == (
        2,
        [
            "vault.token_file: 'vault-token' is a credential name but CREDENTIALS_DIRECTORY "
            f"is not set (in {path})"
        ],
    )


def test_bare_name_in_credentials_directory(write_config: WriteConfig, tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    path = write_config(**vault_config(token_file="vault-token"))
    env = {"CREDENTIALS_DIRECTORY": str(credentials)}
    missing = credentials / "vault-token"
    assert check(path, env=env) == (
        2,
        [f"vault.token_file: cannot read {missing}: No such file or directory (in {path})"],
    )
    missing.write_text(SECRET)
    assert check(path, env=env)[0] == 0


def test_a_directory_and_an_empty_file_are_unusable(
    write_config: WriteConfig, tmp_path: Path
) -> None:
    # chmod 000 does not stop root: a directory in place of the file cannot be read by anyone.
    directory, empty = tmp_path / "a-directory", tmp_path / "empty"
    directory.mkdir()
    empty.write_text("\n")
    path = write_config(
        **vault_config(auth="approle", role_id_file=str(directory), secret_id_file=str(empty))
    )
    assert check(path) == (
        2,
        [
            f"vault.role_id_file: cannot read {directory}: Is a directory (in {path})",
            f"vault.secret_id_file: {empty} is empty (in {path})",
        ],
    )


def test_missing_ca_cert(write_config: WriteConfig, secret_file: Path, tmp_path: Path) -> None:
    missing = tmp_path / "ca.pem"
    path = write_config(
        **vault_config(
            "https://vault.example:8200", token_file=str(secret_file), ca_cert=str(missing)
        )
    )
    assert check(path) == (
        2,
        [f"vault.ca_cert: cannot read {missing}: No such file or directory (in {path})"],
    )


def test_a_ca_cert_that_is_not_utf8_text_passes(
    write_config: WriteConfig, secret_file: Path, tmp_path: Path
) -> None:
    """A CA bundle is not a credential: bytes that are not UTF-8 (a Latin-1 comment, say)
    do not make it unusable (the TLS library reads it), only a missing or empty file."""
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(b"# Autorit\xe9 de certification\n-----BEGIN CERTIFICATE-----\n")
    path = write_config(
        **vault_config(
            "https://vault.example:8200", token_file=str(secret_file), ca_cert=str(bundle)
        )
    )
    assert check(path) == (0, [])
    bundle.write_bytes(b"")
    assert check(path) == (2, [f"vault.ca_cert: {bundle} is empty (in {path})"])


def test_run_exits_1_naming_an_unreadable_credential_file(
    write_config: WriteConfig, runtime_dir: Path
) -> None:
    missing = runtime_dir / "vault-token"
    path = write_config(**vault_config(token_file=str(missing)))
    result = run_cli("run", "--config", str(path))
    assert result.returncode == 1, result.stderr
    assert f"vault.token_file: cannot read {missing}: No such file or directory" in result.stderr
    assert list(runtime_dir.glob("*.sock")) == []  # stopped before listening


# --- --online, against the real dev server --------------------------------------------------


def online_config(
    write_config: WriteConfig, bao: BaoServer, token_file: Path, paths: dict[str, str]
) -> Path:
    providers = {
        f"providers.{name}": {"base_url": "https://api.example.com", "vault_path": vault_path}
        for name, vault_path in paths.items()
    }
    return write_config(vault={"addr": bao.addr, "token_file": str(token_file)}, **providers)


def token_with_policy(bao: BaoServer, name: str, hcl: str) -> str:
    bao.write_policy(name, hcl)
    return bao.create_token("1h", [name])


def test_online_names_missing_and_refused_paths(
    write_config: WriteConfig,
    shared_bao: BaoServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    shared_bao.write("preflight/present", api_key="sk-present")
    policy = "\n".join(
        f'path "{KV_MOUNT}/{kind}/preflight/{name}" {{ capabilities = ["read"] }}'
        for kind in ("data", "metadata")
        for name in ("present", "missing")
    )
    token = token_with_policy(shared_bao, "preflight-online", policy)
    token_file = tmp_path / "token"
    token_file.write_text(token)
    paths = {
        "present": "preflight/present",
        "missing": "preflight/missing",
        "refused": "preflight/refused",
    }
    path = online_config(write_config, shared_bao, token_file, paths)

    assert check(path)[0] == 0  # offline, all is well
    code, lines = check(path, "--online")
    assert code == 2
    assert lines == [
        f"providers.missing.vault_path: {KV_MOUNT}/preflight/missing not found in Vault"
        f" (in {path})",
        f"providers.refused.vault_path: Vault refused read on {KV_MOUNT}/metadata/preflight/"
        'refused: permission denied (the token\'s policy needs "read" on it)'
        f" (in {path})",
    ]
    assert not any(token in line for line in lines)


def test_online_passes_when_every_path_is_readable(
    write_config: WriteConfig,
    shared_bao: BaoServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    shared_bao.write("preflight/fine", api_key="sk-fine")
    token_file = tmp_path / "token"
    token_file.write_text(shared_bao.root_token)
    path = online_config(write_config, shared_bao, token_file, {"fine": "preflight/fine"})
    result = run_cli("check-config", "--config", str(path), "--online")
    assert result.returncode == 0, result.stderr
    assert tomllib.loads(result.stdout)["providers"]["fine"]["vault_path"] == "preflight/fine"
    assert "sk-fine" not in result.stdout + result.stderr


def test_online_names_a_secret_without_the_key_field(
    write_config: WriteConfig,
    shared_bao: BaoServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    version = shared_bao.write("preflight/nofield", other="sk-other")
    token_file = tmp_path / "token"
    token_file.write_text(shared_bao.root_token)
    path = online_config(write_config, shared_bao, token_file, {"nf": "preflight/nofield"})
    code, lines = check(path, "--online")
    assert (code, lines) == (
        2,
        [
            f"providers.nf.key_field: {KV_MOUNT}/preflight/nofield version {version} field "
            f"'api_key' is missing (in {path})"
        ],
    )
    assert not any("sk-other" in line for line in lines)


def test_online_checks_every_field_of_a_key_field_list(
    write_config: WriteConfig,
    shared_bao: BaoServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """``key_field = ["key1", "key2"]``: each field must hold a key; the one missing is named,
    and a secret holding both passes."""
    both = shared_bao.write("preflight/two", key1="sk-one", key2="sk-two")
    version = shared_bao.write("preflight/half", key1="sk-one")
    token_file = tmp_path / "token"
    token_file.write_text(shared_bao.root_token)
    fields = ["key1", "key2"]
    path = write_config(
        vault={"addr": shared_bao.addr, "token_file": str(token_file)},
        **{
            f"providers.{name}": {
                "base_url": "https://api.example.com",
                "vault_path": f"preflight/{name}",
                "key_field": fields,
            }
            for name in ("two", "half")
        },
    )
    code, lines = check(path, "--online")
    assert both >= 1
    assert (code, lines) == (
        2,
        [
            f"providers.half.key_field: {KV_MOUNT}/preflight/half version {version} field "
            f"'key2' is missing (key_field lists 2 fields) (in {path})"
        ],
    )
    assert not any("sk-one" in line or "sk-two" in line for line in lines)


def test_online_names_a_refused_login(
    write_config: WriteConfig,
    shared_bao: BaoServer,  # noqa: F811
    secret_file: Path,
) -> None:
    path = online_config(write_config, shared_bao, secret_file, {"x": "preflight/x"})
    assert check(path, "--online") == (
        2,
        [
            "vault.token_file: Vault refused the token: permission denied "
            f"(it is invalid, expired or revoked) (in {path})"
        ],
    )


def test_online_names_an_unreachable_vault(write_config: WriteConfig, secret_file: Path) -> None:
    addr = f"http://127.0.0.1:{free_port()}"
    path = write_config(
        vault={"addr": addr, "token_file": str(secret_file)}, **{"providers.x": PROVIDER}
    )
    assert check(path, "--online") == (
        2,
        [f"vault.addr: Vault at {addr} refused the connection (in {path})"],
    )


def test_online_does_not_log_in_when_a_file_is_unusable(
    write_config: WriteConfig, tmp_path: Path
) -> None:
    # The file problem is the one to fix; Vault (here unreachable) is not tried.
    missing = tmp_path / "vault-token"
    path = write_config(**vault_config(f"http://127.0.0.1:{free_port()}", token_file=str(missing)))
    assert check(path, "--online") == (
        2,
        [f"vault.token_file: cannot read {missing}: No such file or directory (in {path})"],
    )


def test_a_fifo_or_device_is_named_not_waited_on(
    write_config: WriteConfig, tmp_path: Path, runtime_dir: Path
) -> None:
    """Opening a FIFO for reading waits for a writer, and /dev/zero never ends: neither
    may hang check-config or run (nothing hangs); each is named as not a regular file."""
    fifo = tmp_path / "role-id"
    os.mkfifo(fifo)
    path = write_config(
        **vault_config(auth="approle", role_id_file=str(fifo), secret_id_file="/dev/zero")
    )
    assert check(path) == (
        2,
        [
            f"vault.role_id_file: {fifo} is not a regular file (in {path})",
            f"vault.secret_id_file: /dev/zero is not a regular file (in {path})",
        ],
    )
    result = run_cli("run", "--config", str(path))
    assert result.returncode == 1, result.stderr
    assert f"vault.role_id_file: {fifo} is not a regular file" in result.stderr
