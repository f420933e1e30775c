"""The install guide is a test, and so are the release's sdist and wheel.

The shell blocks of docs/operations.md's Install section marked ``<!-- install-test: STEP
-->`` are run, as written, by bash (``set -euo pipefail``) in a copy of the repository,
with four substitutions of the host's paths by the test's (``/opt/openclawd``,
``/etc/openclawd``, ``/etc/systemd/system``, ``/run/openclawd``), ``VAULT_ADDR`` and an
admin token for a real ``bao`` dev server, and the provider's key in ``OPENAI_API_KEY``.
Only what needs root and a running systemd is not run: ``useradd``, ``groupadd``,
``usermod`` and ``systemctl`` are shell functions that record their arguments, and the test
checks them. For ``systemctl enable --now`` and ``restart`` the test plays systemd: it binds
the socket units' sockets, copies the ``LoadCredential=`` files and starts the installed
unit's ``ExecStart=`` with its ``PATH`` (so the daemon is the one in the guide's venv).

The guide's first step builds the sdist and the wheel (``python -m build``) and its third
installs the wheel in a clean venv: the module does that once, and the tests below check
the sdist's files and the wheel's venv. About 40 s on two cores.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import openclawd

from ..bao import BaoServer, bao, find_bao  # noqa: F401 - a fixture
from ..conftest import REPO, NotifyReceiver
from ..fake_upstream import open_fake_upstream
from ..test_systemd_unit import unit_settings
from .test_socket_activation import SYSTEMD

KEY = "sk-install-guide-0001-aaaaaaaaaaaaaaaa"
STEPS = [
    "build",
    "users",
    "venv",
    "vault",
    "config",
    "units",
    "start",
    "check",
    "upgrade",
    "rollback",
]
STUBBED = ("useradd", "groupadd", "usermod", "systemctl")
HOST_PATHS = ("/opt/openclawd", "/etc/openclawd", "/etc/systemd/system", "/run/openclawd")
UNITS = ("openclawd.service", "openclawd.socket", "openclawd-control.socket")
STEP_TIMEOUT_S = 300.0  # pip and build, on a loaded machine
MARKED = re.compile(r"<!-- install-test: (\w+) -->\n```sh\n(.*?)```", re.S)


def install_section() -> str:
    text = (REPO / "docs" / "operations.md").read_text()
    return text.split("\n## Install\n", 1)[1].split("\n## ", 1)[0]


def guide_steps() -> dict[str, str]:
    """The marked blocks of the Install section, by step, in the document's order."""
    return {step: block for step, block in MARKED.findall(install_section())}


def tree_files(repo: Path) -> list[str]:
    """The repository's files as a clone has them (tracked, or new and not ignored); from
    an unpacked sdist, which has no ``.git``, its files but what building and testing add."""
    if not (repo / ".git").exists():
        made = {".venv", "dist", "build", "__pycache__", ".pytest_cache", ".mypy_cache"}
        return sorted(
            str(p.relative_to(repo))
            for p in repo.rglob("*")
            if p.is_file()
            and not made & set(p.relative_to(repo).parts)
            and ".egg-info" not in str(p)
            and ".ruff_cache" not in str(p)
        )
    listed = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.decode()
    return [name for name in listed.split("\0") if name and (repo / name).is_file()]


def copy_tree(destination: Path) -> None:
    for name in tree_files(REPO):
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)


class Guide:
    """The guide's steps run in a temporary root that stands for the host."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.clone = root / "clone"
        self.calls_path = root / "calls.log"
        self.outputs: list[str] = []
        self.steps = guide_steps()
        (root / "bin").mkdir()
        (root / "etc" / "systemd" / "system").mkdir(parents=True)  # what any host has
        (root / "bin" / "bao").symlink_to(find_bao())  # the operator's bao CLI
        venv_bin = str(Path(sys.prefix) / "bin")  # not the test's venv: the guide's own
        path = [p for p in os.environ["PATH"].split(os.pathsep) if p != venv_bin]
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("VAULT_", "BAO_", "NOTIFY_", "LISTEN_", "CREDENTIALS_"))
            and k not in ("VIRTUAL_ENV", "PYTHONPATH")
        }
        self.env["PATH"] = os.pathsep.join([str(root / "bin"), *path])
        self.env["GUIDE_CALLS"] = str(self.calls_path)

    def local(self, text: str) -> str:
        """``text`` with the host's paths as the test's."""
        for path in HOST_PATHS:
            text = text.replace(path, f"{self.root}{path}")
        return text

    def run(self, step: str, cwd: Path | None = None, **env: str) -> str:
        """Run ``step``'s block; its stdout and stderr, together. Fails on a non-zero exit."""
        stubs = "".join(f'{c}() {{ echo "{c} $*" >> "$GUIDE_CALLS"; }}\n' for c in STUBBED)
        script = "set -euo pipefail\n" + stubs + self.local(self.steps[step])
        result = subprocess.run(
            ["bash", "-c", script],
            cwd=cwd or self.clone,
            env={**self.env, **env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=STEP_TIMEOUT_S,
        )
        self.outputs.append(result.stdout)
        assert result.returncode == 0, f"step {step} exited {result.returncode}:\n{result.stdout}"
        return result.stdout

    def calls(self) -> list[str]:
        """What the stubbed commands were asked, since the last call of this."""
        if not self.calls_path.exists():
            return []
        lines = self.calls_path.read_text().splitlines()
        self.calls_path.unlink()
        return lines

    def wheels(self, clone: Path | None = None) -> list[Path]:
        return sorted(((clone or self.clone) / "dist").glob("*.whl"))


@pytest.fixture(scope="module")
def guide() -> Iterator[Guide]:
    """The guide's build, users and venv steps, run once for the module."""
    root = Path(tempfile.mkdtemp(prefix="oci-", dir="/tmp"))  # short: socket paths
    try:
        g = Guide(root)
        copy_tree(g.clone)
        for step in ("build", "users", "venv"):
            g.run(step)
        yield g
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_every_block_of_the_install_section_is_a_step_of_the_test() -> None:
    assert list(guide_steps()) == STEPS
    # No shell block escapes the test: each is marked.
    assert len(re.findall(r"```sh\n", install_section())) == len(STEPS)
    for step, block in guide_steps().items():
        lines = [ln for ln in block.splitlines() if ln.strip()]
        for i, line in enumerate(lines):
            # The test plays systemd after the block: an action on the units ends its block.
            if re.match(r"systemctl (enable --now|start|restart) ", line):
                assert i == len(lines) - 1, (step, line)


def test_the_build_is_clean(guide: Guide) -> None:
    # setuptools warns of what it will refuse (a TOML-table license: from 2027-02-18).
    build_output = guide.outputs[0]
    assert "Successfully built" in build_output
    assert "deprecated" not in build_output.lower(), build_output


def test_the_sdist_holds_what_a_release_needs(guide: Guide) -> None:
    (sdist,) = sorted((guide.clone / "dist").glob("*.tar.gz"))
    assert sdist.name == f"openclawd-{openclawd.__version__}.tar.gz"
    with tarfile.open(sdist) as tar:
        prefix = f"openclawd-{openclawd.__version__}/"
        names = {m.name.removeprefix(prefix) for m in tar.getmembers() if m.isfile()}
    files = tree_files(REPO)
    needed = ["README.md", "pyproject.toml", "etc/openclawd.toml", "docs/operations.md"]
    needed += [f"systemd/{unit}" for unit in UNITS]
    needed += [f for f in files if f.startswith("openclawd/") and f.endswith(".py")]
    needed += [f for f in files if f.split("/")[0] in ("tests", "bench") and f.endswith(".py")]
    needed += [f for f in files if re.fullmatch(r"(LICEN[CS]E|COPYING|NOTICE)(\.\w+)?", f)]
    assert sorted(set(needed) - names) == []


def test_the_wheel_installs_into_a_clean_venv_and_runs(guide: Guide) -> None:
    (wheel,) = guide.wheels()
    assert wheel.name == f"openclawd-{openclawd.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
    package = {f for f in tree_files(REPO) if f.startswith("openclawd/") and f.endswith(".py")}
    assert package <= names
    venv = guide.root / "opt" / "openclawd"
    assert (venv / "wheels" / wheel.name).is_file()  # kept for a rollback
    version = subprocess.run(
        [venv / "bin" / "openclawd", "version"], capture_output=True, text=True, timeout=60
    )
    assert (version.returncode, version.stdout) == (0, f"openclawd {openclawd.__version__}\n")
    # The venv's own copy, not this checkout (no editable install, no path trick).
    where = subprocess.run(
        [venv / "bin" / "python", "-c", "import openclawd; print(openclawd.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=guide.root,
    ).stdout
    assert where.startswith(f"{venv}/lib/")


class Systemd:
    """What systemd does for the installed units, played by the test: the socket units'
    sockets, the service's credentials, its command and PATH, its notify socket."""

    def __init__(self, g: Guide) -> None:
        self.guide = g
        units = g.root / "etc" / "systemd" / "system"
        self.service = unit_settings(units / "openclawd.service")
        self.sockets: list[socket.socket] = []
        names = []
        for unit in self.service["Sockets"][0].split():
            settings = unit_settings(units / unit)
            path = g.local(settings["ListenStream"][0])
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(path)
            os.chmod(path, int(settings["SocketMode"][0], 8))
            sock.listen(int(settings.get("Backlog", ["128"])[0]))
            self.sockets.append(sock)
            names.append(settings["FileDescriptorName"][0])
        self.fdnames = ":".join(names)
        self.credentials = g.root / "run" / "credentials" / "openclawd.service"
        self.daemon: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []

    def start(self) -> NotifyReceiver:
        """Start the service (its credentials copied again, as each start does)."""
        shutil.rmtree(self.credentials, ignore_errors=True)
        self.credentials.mkdir(parents=True, mode=0o700)
        for line in self.service["LoadCredential"]:
            name, source = line.split(":", 1)
            shutil.copy(self.guide.local(source), self.credentials / name)
        env = dict(line.split("=", 1) for line in self.service["Environment"])
        fds = [s.fileno() for s in self.sockets]
        launcher = [sys.executable, "-c", SYSTEMD, ",".join(map(str, fds))]  # systemd's exec
        notify = NotifyReceiver(self.guide.root / f"notify-{len(self.logs)}")
        log = self.guide.root / f"daemon-{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "wb") as out:
            self.daemon = subprocess.Popen(
                [*launcher, *shlex.split(self.guide.local(self.service["ExecStart"][0]))],
                pass_fds=fds,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env={
                    "PATH": self.guide.local(env["PATH"]),
                    "NOTIFY_SOCKET": str(notify.path),
                    "LISTEN_FDS": str(len(fds)),
                    "LISTEN_FDNAMES": self.fdnames,
                    "CREDENTIALS_DIRECTORY": str(self.credentials),
                },
            )
        return notify

    def stop(self) -> int:
        assert self.daemon is not None
        self.daemon.send_signal(signal.SIGTERM)
        return self.daemon.wait(timeout=60)

    def close(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.kill()
            self.daemon.wait()
        for sock in self.sockets:
            sock.close()

    def log_text(self) -> str:
        return "".join(log.read_text(errors="replace") for log in self.logs)


async def started(systemd: Systemd) -> None:
    notify = systemd.start()
    try:
        await trio.to_thread.run_sync(lambda: notify.wait_for("READY", "1", timeout=60))
    finally:
        notify.close()


def queued_request(data_socket: str) -> socket.socket:
    """An app's request sent to the data socket, left for whoever accepts it."""
    app = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    app.settimeout(60)
    app.connect(data_socket)  # completes in the backlog: the kernel holds the socket
    app.sendall(
        b"GET /v1/http/openai/v1/models HTTP/1.1\r\nHost: openclawd\r\nConnection: close\r\n\r\n"
    )
    return app


def answer(app: socket.socket) -> bytes:
    with app:
        chunks = []
        while chunk := app.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


async def test_the_install_guide_runs(guide: Guide, bao: BaoServer) -> None:  # noqa: F811
    fingerprint = "sha256:" + hashlib.sha256(KEY.encode()).hexdigest()[:12]
    vault_env = {"VAULT_ADDR": bao.addr, "VAULT_TOKEN": bao.root_token, "OPENAI_API_KEY": KEY}
    assert guide.calls() == [
        "useradd --system --user-group --no-create-home --home-dir /nonexistent "
        "--shell /usr/sbin/nologin openclawd",
        "groupadd --system openclawd-apps",
        "usermod --append --groups openclawd-apps myapp",
    ]
    config = guide.root / "etc" / "openclawd" / "openclawd.toml"
    with trio.fail_after(600), contextlib.ExitStack() as cleanup:
        async with open_fake_upstream(expected_key=KEY) as upstream:

            async def step(name: str, cwd: Path | None = None, **env: str) -> str:
                return await trio.to_thread.run_sync(
                    lambda: guide.run(name, cwd, **vault_env, **env)
                )

            async def check() -> str:
                out = await step("check")
                assert guide.calls() == [
                    "systemctl status --no-pager "
                    "openclawd.socket openclawd-control.socket openclawd"
                ]
                return out

            await step("vault")
            await step("config")
            credentials = guide.root / "etc" / "openclawd" / "credentials"
            names = sorted(p.name for p in credentials.iterdir())
            assert names == ["vault-role-id", "vault-secret-id"]
            for path in (credentials, *credentials.iterdir()):
                assert path.stat().st_mode & 0o077 == 0, path  # root's alone
            secret_id = (credentials / "vault-secret-id").read_text().strip()
            # What the host has and the test does not: /run (systemd's) and the internet.
            config.write_text(
                guide.local(config.read_text()).replace("https://api.openai.com", upstream.url)
            )

            assert await step("units") == ""  # systemd-analyze verify is silent
            for unit in UNITS:
                installed = guide.root / "etc" / "systemd" / "system" / unit
                assert installed.read_bytes() == (REPO / "systemd" / unit).read_bytes()

            await step("start")
            assert guide.calls() == [
                "systemctl daemon-reload",
                "systemctl enable --now openclawd.socket openclawd-control.socket openclawd",
            ]
            systemd = Systemd(guide)
            cleanup.callback(systemd.close)
            await started(systemd)

            out = await check()
            assert re.search(r"^state +ready$", out, re.M), out
            assert re.search(rf"^version +{re.escape(openclawd.__version__)},", out, re.M), out
            assert re.search(rf"^openai +v1 +{fingerprint} ", out, re.M), out
            # The provider's answer, through the socket, with the key from Vault:
            assert out.endswith('{"object":"list","data":[{"id":"gpt-fake","object":"model"}]}\n')
            assert upstream.requests[-1].headers["authorization"] == f"Bearer {KEY}"

            # Upgrade: a newer release, built in its own clone by step 1.
            new_clone = guide.root / "new"
            copy_tree(new_clone)
            init = new_clone / "openclawd" / "__init__.py"
            release = [int(n) for n in re.findall(r"\d+", openclawd.__version__)[:3]]
            new_version = f"{release[0]}.{release[1]}.{release[2] + 1}"
            init.write_text(
                init.read_text().replace(
                    f'__version__ = "{openclawd.__version__}"', f'__version__ = "{new_version}"'
                )
            )
            await step("build", new_clone)
            out = await step("upgrade", new_clone)
            assert out.startswith(f"openclawd {openclawd.__version__}\n")  # the one you leave
            assert guide.calls() == ["systemctl restart openclawd"]
            data_socket = guide.local("/run/openclawd/openclawd.sock")
            await restart_with_an_app_waiting(systemd, data_socket)
            out = await check()
            assert re.search(rf"^version +{re.escape(new_version)},", out, re.M), out
            wheels = sorted(p.name for p in (guide.root / "opt/openclawd/wheels").iterdir())
            assert wheels == sorted(
                f"openclawd-{v}-py3-none-any.whl" for v in (openclawd.__version__, new_version)
            )

            await step("rollback", PREVIOUS=openclawd.__version__)
            assert guide.calls() == ["systemctl restart openclawd"]
            await restart_with_an_app_waiting(systemd, data_socket)
            out = await check()
            assert re.search(rf"^version +{re.escape(openclawd.__version__)},", out, re.M), out

            assert await trio.to_thread.run_sync(systemd.stop) == 0
            # The socket files are the socket units': left in place for the next start.
            assert stat.S_ISSOCK(os.stat(data_socket).st_mode)
            log = systemd.log_text()
            assert "event=socket.inherited name=data" in log
            everything = "\n".join([*guide.outputs, log])
            for secret in (KEY, secret_id):
                assert secret not in everything


async def restart_with_an_app_waiting(systemd: Systemd, data_socket: str) -> None:
    """``systemctl restart openclawd``: the old daemon drains and exits; an app connects
    while none runs; the new daemon serves it."""
    assert await trio.to_thread.run_sync(systemd.stop) == 0
    app = queued_request(data_socket)
    await started(systemd)
    reply = await trio.to_thread.run_sync(answer, app)
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:300]
