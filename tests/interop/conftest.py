"""Fixtures for the matrix-nio interop suite.

A real Salon server is started once per test session from ``$SALON_BIN`` and
configured only through environment variables. Its stdout/stderr go to a log
file whose tail is attached to every failing test's report.

Set ``SALON_INTEROP_LOG=/some/path`` to keep the server log after the run
(by default it lives in the temporary directory, which is removed).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import pytest
from nio import AsyncClient, ProfileSetDisplayNameResponse, RegisterResponse

from helpers import expect_ok, new_client, unique_localpart

SERVER_NAME = "localhost"
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
LOG_TAIL_LINES = 80

# The running server, for the failure hook below.
_SERVER: "SalonServer | None" = None


@dataclasses.dataclass
class Appservice:
    """The appservice registration the session server loads (see test_mautrix_appservice)."""

    id: str
    as_token: str
    hs_token: str
    sender_localpart: str
    user_prefix: str
    port: int


@dataclasses.dataclass
class SalonServer:
    process: subprocess.Popen
    base_url: str
    server_name: str
    data_dir: Path
    log_path: Path
    appservice: Appservice

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            with open(self.log_path, "r", encoding="utf-8", errors="replace") as f:
                return "".join(deque(f, maxlen=lines))
        except OSError as e:
            return f"<cannot read {self.log_path}: {e}>"


def _salon_bin() -> str:
    path = os.environ.get("SALON_BIN")
    if not path:
        pytest.fail(
            "SALON_BIN is not set: point it at the salon server binary, "
            "e.g. SALON_BIN=target/debug/salon",
            pytrace=False,
        )
    if not os.path.isfile(path):
        pytest.fail(f"SALON_BIN={path!r} does not exist (build the server first)", pytrace=False)
    if not os.access(path, os.X_OK):
        pytest.fail(f"SALON_BIN={path!r} is not executable", pytrace=False)
    return os.path.abspath(path)


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _versions_ok(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/_matrix/client/versions", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _wait_until_ready(server: SalonServer) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        code = server.process.poll()
        if code is not None:
            raise RuntimeError(f"salon exited with status {code} during startup")
        if _versions_ok(server.base_url):
            return
        time.sleep(0.1)
    raise RuntimeError(
        f"GET {server.base_url}/_matrix/client/versions did not answer 200 "
        f"within {STARTUP_TIMEOUT:.0f}s"
    )


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT)


@pytest.fixture(scope="session")
def salon_server() -> "SalonServer":
    """Start ``$SALON_BIN serve`` on a free loopback port; stop it afterwards."""
    global _SERVER
    binary = _salon_bin()
    tmp = Path(tempfile.mkdtemp(prefix="salon-interop-"))
    data_dir = tmp / "data"
    data_dir.mkdir()
    log_path = Path(os.environ.get("SALON_INTEROP_LOG") or tmp / "server.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    port = _free_loopback_port()

    # One appservice registration, for the mautrix-python test; its process is
    # started by that test on the port reserved here.
    appservice = Appservice(
        id="mautrix-interop",
        as_token=f"as_{uuid.uuid4().hex}",
        hs_token=f"hs_{uuid.uuid4().hex}",
        sender_localpart="mxbot",
        user_prefix="_mx_",
        port=_free_loopback_port(),
    )
    registrations = tmp / "appservices"
    registrations.mkdir()
    (registrations / "mautrix.yaml").write_text(
        f"""id: {appservice.id}
url: "http://127.0.0.1:{appservice.port}"
as_token: "{appservice.as_token}"
hs_token: "{appservice.hs_token}"
sender_localpart: {appservice.sender_localpart}
rate_limited: false
namespaces:
  users:
    - exclusive: true
      regex: "@{appservice.user_prefix}.*:{SERVER_NAME}"
  aliases: []
  rooms: []
"""
    )

    env = dict(os.environ)
    env.update(
        SALON_SERVER_NAME=SERVER_NAME,
        SALON_LISTEN=f"127.0.0.1:{port}",
        SALON_DATA_DIR=str(data_dir),
        SALON_REGISTRATION__MODE="open",
        SALON_RATE_LIMITS__ENABLED="false",
        SALON_APPSERVICES__REGISTRATION_DIR=str(registrations),
    )
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [binary, "serve"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp,
    )
    server = SalonServer(
        process, f"http://127.0.0.1:{port}", SERVER_NAME, data_dir, log_path, appservice
    )
    try:
        problem = None
        try:
            _wait_until_ready(server)
        except RuntimeError as e:
            problem = str(e)
        if problem is not None:
            pytest.fail(
                f"{problem}\n--- last lines of {log_path} ---\n{server.log_tail()}",
                pytrace=False,
            )
        _SERVER = server
        yield server
    finally:
        _SERVER = None
        _stop(process)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach the tail of the server log to every failing test."""
    report = yield
    if report.failed and _SERVER is not None:
        state = "running" if _SERVER.process.poll() is None else f"exited ({_SERVER.process.returncode})"
        report.sections.append(
            (
                f"salon server log, last {LOG_TAIL_LINES} lines of {_SERVER.log_path} [{state}]",
                _SERVER.log_tail(),
            )
        )
    return report


@pytest.fixture
def homeserver(salon_server: SalonServer) -> str:
    return salon_server.base_url


@pytest.fixture
def server_name(salon_server: SalonServer) -> str:
    return salon_server.server_name


@pytest.fixture
async def client_factory(homeserver: str) -> AsyncIterator[Callable[..., AsyncClient]]:
    """Make fresh nio clients for this test; all are closed afterwards."""
    clients: list[AsyncClient] = []

    def make(user: str = "") -> AsyncClient:
        client = new_client(homeserver, user)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@dataclasses.dataclass
class RegisteredUser:
    client: AsyncClient  # logged in with the registration's token and device
    localpart: str
    password: str
    registration: RegisterResponse

    @property
    def user_id(self) -> str:
        return self.registration.user_id


@pytest.fixture
def register_user(
    client_factory: Callable[..., AsyncClient],
) -> Callable[..., Awaitable[RegisteredUser]]:
    """``await register_user("alice", displayname="Alice")`` -> a fresh, logged-in user.

    Uses nio's AsyncClient.register (UIA with m.login.dummy); the localpart is
    made unique so tests never collide on a shared server.
    """

    async def register(
        prefix: str, *, displayname: str | None = None, device_name: str = "interop-register"
    ) -> RegisteredUser:
        localpart = unique_localpart(prefix)
        password = f"pw-{unique_localpart(prefix)}"
        client = client_factory(localpart)
        resp = await expect_ok(
            client.register(localpart, password, device_name=device_name), RegisterResponse
        )
        if displayname is not None:
            await expect_ok(client.set_displayname(displayname), ProfileSetDisplayNameResponse)
        return RegisteredUser(client, localpart, password, resp)

    return register
