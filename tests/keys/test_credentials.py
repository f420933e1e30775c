"""Credential files: absolute paths, systemd credential names, and errors that never
show what the file holds."""

from __future__ import annotations

from pathlib import Path

import pytest

from openclawd.keys.vault import VaultAuthError, read_credential


def test_absolute_path_is_read_and_stripped(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("  hvs.abc123\n")
    assert read_credential(str(tmp_path / "token"), what="vault.token_file") == "hvs.abc123"


def test_bare_name_is_read_from_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "vault-role-id").write_text("role-42\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert read_credential("vault-role-id", what="vault.role_id_file") == "role-42"


def test_bare_name_without_credentials_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(VaultAuthError) as info:
        read_credential("vault-role-id", what="vault.role_id_file")
    assert str(info.value) == (
        "vault.role_id_file: 'vault-role-id' is a credential name but CREDENTIALS_DIRECTORY "
        "is not set"
    )


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(VaultAuthError, match="^vault.token_file: cannot read .*No such file"):
        read_credential(str(tmp_path / "nope"), what="vault.token_file")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(VaultAuthError, match=r"^vault.token_file: .*/empty is empty"):
        read_credential(str(tmp_path / "empty"), what="vault.token_file")


def test_binary_content_is_refused_without_being_shown(tmp_path: Path) -> None:
    (tmp_path / "bin").write_bytes(b"\xffsecret-bytes")
    with pytest.raises(VaultAuthError) as info:
        read_credential(str(tmp_path / "bin"), what="vault.secret_id_file")
    assert "secret-bytes" not in str(info.value)
    assert str(info.value).endswith("is not UTF-8 text")
