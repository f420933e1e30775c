"""Vault's error texts: each names its cause and its place, and never a token.

Network failures against real loopback sockets (a closed port, a server that never answers,
a self-signed TLS server) and a ``.invalid`` host name, which fails to resolve at once with
no network; "not found" and "permission denied" against the real OpenBao dev server.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest
import trio

from openclawd.config import VaultConfig
from openclawd.errors import VaultError
from openclawd.keys.vault import (
    Vault,
    VaultAuthError,
    VaultSecretError,
    VaultUnreachableError,
)

from ..bao import KV_MOUNT, BaoServer, free_port, shared_bao  # noqa: F401 - a fixture
from ..conftest import server_tls

TOKEN = "hvs.TOKEN-never-shown-4711"


def vault(addr: str, **settings: object) -> Vault:
    return Vault(VaultConfig(addr=addr, auth="token", **settings))  # type: ignore[arg-type]


async def failure(vault: Vault, token: str = TOKEN) -> VaultError:
    """The error of logging in with ``token``; never the token in its text."""
    with pytest.raises(VaultError) as info:
        await vault.use_token(token)
    assert token not in str(info.value)
    return info.value


@contextmanager
def silent_server() -> Iterator[int]:
    """A loopback TCP port whose connections are accepted (by the kernel) and never answered."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


@asynccontextmanager
async def tls_server(certificate: tuple[Path, Path]) -> AsyncIterator[int]:
    """A loopback TLS server presenting the self-signed certificate; it answers nothing."""

    async def handle(stream: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError:
            pass  # the client refused our certificate, as it should
        finally:
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(
                trio.serve_ssl_over_tcp, handle, 0, server_tls(certificate), host="127.0.0.1"
            )
        )
        yield listeners[0].transport_listener.socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def test_connection_refused_names_the_address() -> None:
    addr = f"http://127.0.0.1:{free_port()}"
    with trio.fail_after(30):
        error = await failure(vault(addr))
    assert isinstance(error, VaultUnreachableError)
    assert str(error) == f"Vault at {addr} refused the connection"


async def test_a_name_that_does_not_resolve_is_named_at_once() -> None:
    # .invalid never resolves (RFC 6761): the resolver says so without the network. The
    # request timeout is long, so an answer proves the failure did not wait for it.
    with trio.fail_after(30):
        error = await failure(vault("http://vault.invalid:8200", request_timeout_s=600.0))
    assert isinstance(error, VaultUnreachableError)
    assert str(error) == "Vault address vault.invalid could not be resolved"


async def test_a_vault_that_never_answers_is_a_timeout_naming_the_address() -> None:
    with silent_server() as port, trio.fail_after(30):
        addr = f"http://127.0.0.1:{port}"
        error = await failure(vault(addr, request_timeout_s=0.5))
    assert isinstance(error, VaultUnreachableError)
    assert str(error) == f"Vault at {addr} did not answer within 0.5s"


async def test_a_certificate_not_trusted_names_the_certificate_problem(
    certificate: tuple[Path, Path],
) -> None:
    with trio.fail_after(30):
        async with tls_server(certificate) as port:
            addr = f"https://127.0.0.1:{port}"
            error = await failure(vault(addr))
    assert isinstance(error, VaultUnreachableError)
    assert str(error) == (f"Vault at {addr}: TLS certificate not accepted: self-signed certificate")


async def test_a_missing_ca_cert_file_is_named(
    certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    missing = tmp_path / "ca.pem"
    with trio.fail_after(30):
        async with tls_server(certificate) as port:
            error = await failure(vault(f"https://127.0.0.1:{port}", ca_cert=str(missing)))
    assert isinstance(error, VaultUnreachableError)
    assert str(error).startswith(f"vault.ca_cert {missing} cannot be used")


async def test_not_found_names_mount_and_path(shared_bao: BaoServer) -> None:  # noqa: F811
    client = vault(shared_bao.addr)
    with trio.fail_after(30):
        await client.use_token(shared_bao.root_token)
        with pytest.raises(VaultSecretError) as metadata:
            await client.read_metadata("errors/nowhere")
        with pytest.raises(VaultSecretError) as data:
            await client.read_secret("errors/nowhere")
    assert str(metadata.value) == f"{KV_MOUNT}/errors/nowhere not found in Vault"
    assert str(data.value) == f"{KV_MOUNT}/errors/nowhere not found in Vault"


async def test_a_deleted_version_is_named(shared_bao: BaoServer) -> None:  # noqa: F811
    await trio.to_thread.run_sync(functools.partial(shared_bao.write, "errors/gone", k="v"))
    await trio.to_thread.run_sync(shared_bao.soft_delete_latest, "errors/gone")
    client = vault(shared_bao.addr)
    with trio.fail_after(30):
        await client.use_token(shared_bao.root_token)
        with pytest.raises(VaultSecretError) as info:
            await client.read_secret("errors/gone")
    assert str(info.value) == f"{KV_MOUNT}/errors/gone version 1 is deleted in Vault"


async def test_permission_denied_names_path_and_capability(
    shared_bao: BaoServer,  # noqa: F811
) -> None:
    await trio.to_thread.run_sync(
        shared_bao.write_policy,
        "errors-none",
        f'path "{KV_MOUNT}/data/errors/other" {{ capabilities = ["read"] }}',
    )
    token = await trio.to_thread.run_sync(
        functools.partial(shared_bao.create_token, "1h", ["errors-none"])
    )
    client = vault(shared_bao.addr)
    with trio.fail_after(30):
        await client.use_token(token)
        with pytest.raises(VaultAuthError) as data:
            await client.read_secret("errors/refused")
        with pytest.raises(VaultAuthError) as metadata:
            await client.read_metadata("errors/refused")
        with pytest.raises(VaultAuthError) as write:
            await client.write_secret("errors/refused", {"k": "v"})
    needs = '(the token\'s policy needs "read" on it)'
    assert str(data.value) == (
        f"Vault refused read on {KV_MOUNT}/data/errors/refused: permission denied {needs}"
    )
    assert str(metadata.value) == (
        f"Vault refused read on {KV_MOUNT}/metadata/errors/refused: permission denied {needs}"
    )
    assert str(write.value) == (
        f"Vault refused write on {KV_MOUNT}/data/errors/refused: permission denied "
        '(the token\'s policy needs "create" or "update" on it)'
    )
    for error in (data.value, metadata.value, write.value):
        assert token not in str(error)
        assert "error occurred" not in str(error)


async def test_a_token_vault_does_not_know_is_refused_as_such(
    shared_bao: BaoServer,  # noqa: F811
) -> None:
    with trio.fail_after(30):
        error = await failure(vault(shared_bao.addr))
    assert isinstance(error, VaultAuthError)
    assert str(error) == (
        "Vault refused the token: permission denied (it is invalid, expired or revoked)"
    )


async def test_an_approle_login_refused_is_an_auth_error(
    shared_bao: BaoServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    await trio.to_thread.run_sync(
        functools.partial(
            shared_bao.enable_approle,
            "errors-role",
            token_ttl="1h",
            token_max_ttl="1h",
            policies=["default"],
        )
    )
    (tmp_path / "role").write_text("no-such-role\n")
    (tmp_path / "secret").write_text(f"{TOKEN}\n")
    client = Vault(
        VaultConfig(
            addr=shared_bao.addr,
            auth="approle",
            role_id_file=str(tmp_path / "role"),
            secret_id_file=str(tmp_path / "secret"),
        )
    )
    with trio.fail_after(30), pytest.raises(VaultAuthError) as info:
        await client.login()
    assert str(info.value) == "Vault refused the AppRole login: invalid role or secret ID"
    assert TOKEN not in str(info.value)


async def test_a_renewal_refused_says_so(shared_bao: BaoServer) -> None:  # noqa: F811
    # A policy that lets the token look itself up, without "default" (which allows renewal).
    await trio.to_thread.run_sync(
        shared_bao.write_policy,
        "errors-no-renew",
        'path "auth/token/lookup-self" { capabilities = ["read"] }',
    )
    created = await trio.to_thread.run_sync(
        functools.partial(
            shared_bao.client().auth.token.create,
            policies=["errors-no-renew"],
            no_default_policy=True,
            ttl="1h",
        )
    )
    token = created["auth"]["client_token"]
    client = vault(shared_bao.addr)
    with trio.fail_after(30):
        await client.use_token(token)
        with pytest.raises(VaultAuthError) as info:
            await client.renew()
    assert str(info.value) == "Vault refused to renew the token: permission denied"
    assert token not in str(info.value)
