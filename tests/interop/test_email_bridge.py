"""The email bridge with real mail software on both sides.

Python's ``smtplib`` delivers into the bridge's SMTP listener, ``aiosmtpd`` plays the
organisation's relay and captures what the bridge sends out, and a matrix-nio client is
the member of staff. The first test runs the bridge inside ``salon serve``; the second
runs ``salon-email`` as its own process, takes the homeserver down while mail arrives
and kills the bridge with SIGKILL in the middle of a stream of mail.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import io
import os
import shutil
import signal
import smtplib
import subprocess
import tempfile
import threading
import time
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from nio import (
    AsyncClient,
    JoinResponse,
    RegisterResponse,
    RoomMessagesResponse,
    RoomSendResponse,
    UploadResponse,
)

from conftest import _free_loopback_port, _salon_bin, _stop, _versions_ok
from helpers import CLIENT_CONFIG, bounded, unique_localpart

DOMAIN = "salon.test"
SERVER = "localhost"


class Relay:
    """An SMTP relay on loopback that keeps every message it is given."""

    def __init__(self) -> None:
        self.refuse = set()
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.port = _free_loopback_port()
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)

    # Recipients refused for good, and how many more times to answer 451 before 250.
    refuse: set[str] = set()
    defer = 0

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        if address in self.refuse:
            return "550 5.1.1 No such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd's name)
        if self.defer > 0:
            self.defer -= 1
            return "451 4.3.0 Try again later"
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 2.0.0 OK"

    def parsed(self) -> list[email.message.EmailMessage]:
        return [email.message_from_bytes(m[2], policy=email.policy.default) for m in self.messages]


def _start_salon(tmp: Path, extra: dict[str, str]) -> tuple[subprocess.Popen, str, object]:
    port = _free_loopback_port()
    env = dict(os.environ)
    env.update(
        SALON_SERVER_NAME=SERVER,
        SALON_LISTEN=f"127.0.0.1:{port}",
        SALON_DATA_DIR=str(tmp / "data"),
        SALON_REGISTRATION__MODE="open",
        SALON_RATE_LIMITS__ENABLED="false",
        SALON_APPSERVICES__PING__ENABLED="false",
    )
    env.update(extra)
    log = open(tmp / "server.log", "ab")
    proc = subprocess.Popen([_salon_bin(), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not _versions_ok(base):
        if proc.poll() is not None or time.monotonic() > deadline:
            log.close()
            pytest.fail(f"salon did not start:\n{(tmp / 'server.log').read_text()}", pytrace=False)
        time.sleep(0.1)
    return proc, base, log


def _wait_port(port: int, timeout: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on port {port}")


def _mail(
    sender: str,
    to: list[str],
    subject: str,
    body: str,
    cc: list[str] | None = None,
    message_id: str | None = None,
    in_reply_to: str | None = None,
    references: list[str] | None = None,
) -> EmailMessage:
    m = EmailMessage()
    m["From"] = sender
    m["To"] = ", ".join(to)
    if cc:
        m["Cc"] = ", ".join(cc)
    m["Subject"] = subject
    m["Message-ID"] = message_id or make_msgid(domain="example.com")
    if in_reply_to:
        m["In-Reply-To"] = in_reply_to
    if references:
        m["References"] = " ".join(references)
    m.set_content(body)
    return m


def _send(port: int, msg: EmailMessage, rcpts: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as s:
        s.send_message(msg, to_addrs=rcpts)


async def _register(base: str, name: str) -> AsyncClient:
    client = AsyncClient(base, config=CLIENT_CONFIG)
    resp = await bounded(client.register(name, "correct horse battery"))
    assert isinstance(resp, RegisterResponse), resp
    return client


async def _wait_invite(client: AsyncClient, name: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await bounded(client.sync(timeout=1000))
        for room_id, room in client.invited_rooms.items():
            if room.name == name or room.display_name == name:
                joined = await bounded(client.join(room_id))
                assert isinstance(joined, JoinResponse), joined
                return room_id
    raise AssertionError(f"no invite to a room named {name!r}; invites: {list(client.invited_rooms)}")


async def _messages(client: AsyncClient, room_id: str) -> list:
    """Every m.room.message of a room, oldest first."""
    await bounded(client.sync(timeout=0))
    resp = await bounded(client.room_messages(room_id, start=client.next_batch, limit=200))
    assert isinstance(resp, RoomMessagesResponse), resp
    return [e for e in reversed(resp.chunk) if e.source.get("type") == "m.room.message"]


async def _wait_messages(client: AsyncClient, room_id: str, count: int, timeout: float = 30) -> list:
    deadline = time.monotonic() + timeout
    msgs: list = []
    while time.monotonic() < deadline:
        msgs = await _messages(client, room_id)
        if len(msgs) >= count:
            return msgs
        await asyncio.sleep(0.3)
    raise AssertionError(f"expected {count} messages, have {[m.source['content'].get('body') for m in msgs]}")


@pytest.fixture
def bundled_bridge():
    tmp = Path(tempfile.mkdtemp(prefix="salon-email-"))
    relay = Relay()
    relay.controller.start()
    smtp_port = _free_loopback_port()
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    dkim_key = tmp / "dkim.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(dkim_key), "2048"], check=True, capture_output=True, timeout=60)
    proc, base, log = _start_salon(
        tmp,
        {
            "SALON_BRIDGES__EMAIL__DKIM__KEY": str(dkim_key),
            "SALON_BRIDGES__EMAIL__DKIM__SELECTOR": "mail",
            "SALON_BRIDGES__EMAIL__SMTP__TLS_CERT": str(cert),
            "SALON_BRIDGES__EMAIL__SMTP__TLS_KEY": str(key),
            "SALON_BRIDGES__EMAIL__ENABLED": "true",
            "SALON_BRIDGES__EMAIL__DOMAIN": DOMAIN,
            "SALON_BRIDGES__EMAIL__SMTP__LISTEN": f"127.0.0.1:{smtp_port}",
            "SALON_BRIDGES__EMAIL__RELAY__HOST": "127.0.0.1",
            "SALON_BRIDGES__EMAIL__RELAY__PORT": str(relay.port),
            "SALON_BRIDGES__EMAIL__RELAY__RETRY_SECS": "1",
            "SALON_BRIDGES__EMAIL__AUTH__ENABLED": "false",
        },
    )
    try:
        _wait_port(smtp_port)
        yield base, smtp_port, relay, tmp
    finally:
        _stop(proc)
        log.close()
        relay.controller.stop()
        shutil.rmtree(tmp, ignore_errors=True)


async def test_a_thread_becomes_a_room_and_staff_answer_by_mail(bundled_bridge):
    base, smtp_port, relay, _tmp = bundled_bridge
    name = unique_localpart("alice")
    alice = await _register(base, name)
    try:
        await bounded(alice.set_displayname("Alice Martin"))
        staff = f"{name}@{DOMAIN}"
        bob, carol = "bob@example.com", "carol@partner.example"
        m1 = _mail(f"Bob Smith <{bob}>", [staff], "Budget 2027", "Here is the draft budget.", cc=[f"Carol Jones <{carol}>"])
        _send(smtp_port, m1, [staff])
        room = await _wait_invite(alice, "Budget 2027")
        m2 = _mail(
            f"Carol Jones <{carol}>", [bob, staff], "Re: Budget 2027", "Looks fine to me.",
            in_reply_to=m1["Message-ID"], references=[m1["Message-ID"]],
        )
        _send(smtp_port, m2, [staff])
        quoted = "Agreed, let us go ahead.\n\nOn Mon, 30 Nov 2026, Carol Jones wrote:\n> Looks fine to me.\n"
        m3 = _mail(
            f"Bob Smith <{bob}>", [carol, staff], "Re: Budget 2027", quoted,
            in_reply_to=m2["Message-ID"], references=[m1["Message-ID"], m2["Message-ID"]],
        )
        _send(smtp_port, m3, [staff])

        msgs = await _wait_messages(alice, room, 3)
        ghost_bob = f"@_email_bob=40example.com:{SERVER}"
        ghost_carol = f"@_email_carol=40partner.example:{SERVER}"
        assert [(m.sender, m.source["content"]["body"].strip()) for m in msgs] == [
            (ghost_bob, "Here is the draft budget."),
            (ghost_carol, "Looks fine to me."),
            (ghost_bob, "Agreed, let us go ahead."),
        ]
        r = alice.rooms[room]
        assert r.users[ghost_bob].display_name == "Bob Smith"
        assert r.users[ghost_carol].display_name == "Carol Jones"

        # Alice answers with text and then a file; both go to Bob and Carol, threaded.
        sent = await bounded(alice.room_send(room, "m.room.message", {
            "msgtype": "m.text", "body": "Thanks, approved.",
            "format": "org.matrix.custom.html", "formatted_body": "Thanks, <b>approved</b>.",
        }))
        assert isinstance(sent, RoomSendResponse), sent
        pdf = b"%PDF-1.4 budget figures"
        up, _ = await bounded(alice.upload(io.BytesIO(pdf), content_type="application/pdf", filename="budget.pdf", filesize=len(pdf)))
        assert isinstance(up, UploadResponse), up
        sent = await bounded(alice.room_send(room, "m.room.message", {
            "msgtype": "m.file", "body": "budget.pdf", "url": up.content_uri,
            "info": {"mimetype": "application/pdf", "size": len(pdf)},
        }))
        assert isinstance(sent, RoomSendResponse), sent

        deadline = time.monotonic() + 30
        while len(relay.messages) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert len(relay.messages) == 2, relay.messages
        text_mail, file_mail = relay.parsed()
        # Both are DKIM-signed for the mail domain; dkimpy checks them against the key
        # the domain would publish at mail._domainkey.salon.test.
        import base64

        import dkim

        der = subprocess.run(
            ["openssl", "rsa", "-in", str(_tmp / "dkim.pem"), "-pubout", "-outform", "DER"],
            check=True, capture_output=True, timeout=60,
        ).stdout
        record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)

        def dns(name, timeout=5):
            return record if name == b"mail._domainkey.salon.test." else None

        for _, _, raw in relay.messages:
            assert raw.startswith(b"DKIM-Signature:"), raw[:200]
            assert dkim.verify(raw, dnsfunc=dns), raw[:600]
        tampered = relay.messages[0][2].replace(b"Thanks, approved.", b"Thanks, rejected.")
        assert not dkim.verify(tampered, dnsfunc=dns)
        assert sorted(relay.messages[0][1]) == [bob, carol]
        assert text_mail["Subject"] == "Re: Budget 2027"
        assert text_mail["From"].addresses[0].display_name == "Alice Martin (Salon)"
        reply_address = text_mail["From"].addresses[0].addr_spec
        assert reply_address.startswith("reply+") and reply_address.endswith("@" + DOMAIN)
        assert text_mail["Reply-To"].addresses[0].addr_spec == reply_address
        assert text_mail["In-Reply-To"] == m3["Message-ID"]
        refs = text_mail["References"].split()
        assert refs == [m1["Message-ID"], m2["Message-ID"], m3["Message-ID"]]
        assert text_mail.get_body(("plain",)).get_content().strip() == "Thanks, approved."
        assert "<b>approved</b>" in text_mail.get_body(("html",)).get_content()
        # The file mail threads after the text mail and carries the bytes.
        assert file_mail["In-Reply-To"] == text_mail["Message-ID"]
        attachments = list(file_mail.iter_attachments())
        assert [(a.get_filename(), a.get_content()) for a in attachments] == [("budget.pdf", pdf)]

        # Bob answers from a client that drops the threading headers: the reply address
        # alone brings it to the room.
        m4 = _mail(f"Bob Smith <{bob}>", [reply_address], "new subject, no headers", "Thanks Alice!")
        _send(smtp_port, m4, [reply_address])
        msgs = await _wait_messages(alice, room, 6)
        assert msgs[-1].sender == ghost_bob
        assert msgs[-1].source["content"]["body"].strip() == "Thanks Alice!"
        # Replies sent by the bridge are not mailed back (no loops): still two mails.
        await asyncio.sleep(1)
        assert len(relay.messages) == 2
    finally:
        await alice.close()


async def test_relay_failures_are_retried_or_reported(bundled_bridge):
    base, smtp_port, relay, _tmp = bundled_bridge
    name = unique_localpart("omar")
    omar = await _register(base, name)
    try:
        staff = f"{name}@{DOMAIN}"
        first = _mail("Zoe <zoe@example.net>", [staff], "Quarterly figures", "Figures attached soon.")
        _send(smtp_port, first, [staff])
        room = await _wait_invite(omar, "Quarterly figures")
        await _wait_messages(omar, room, 1)
        # The relay is busy twice, then takes the mail: it arrives once.
        relay.defer = 2
        sent = await bounded(omar.room_send(room, "m.room.message", {"msgtype": "m.text", "body": "Thank you Zoe."}))
        assert isinstance(sent, RoomSendResponse), sent
        deadline = time.monotonic() + 30
        while not relay.messages and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert relay.defer == 0 and len(relay.messages) == 1
        assert relay.messages[0][1] == ["zoe@example.net"]
        # The relay refuses the recipient for good: the room is told.
        relay.refuse.add("zoe@example.net")
        sent = await bounded(omar.room_send(room, "m.room.message", {"msgtype": "m.text", "body": "One more thing."}))
        assert isinstance(sent, RoomSendResponse), sent
        msgs = await _wait_messages(omar, room, 4)
        notice = msgs[-1].source
        assert notice["sender"] == f"@email:{SERVER}"
        assert notice["content"]["msgtype"] == "m.notice"
        assert "zoe@example.net was not delivered" in notice["content"]["body"]
        assert len(relay.messages) == 1
    finally:
        await omar.close()


def test_relaying_and_unknown_recipients_are_refused(bundled_bridge):
    _base, smtp_port, _relay, _tmp = bundled_bridge
    with smtplib.SMTP("127.0.0.1", smtp_port, timeout=15) as s:
        s.ehlo("client.example")
        assert s.has_extn("size") and s.has_extn("pipelining") and s.has_extn("8bitmime")
        s.mail("bob@example.com")
        code, _ = s.rcpt("someone@elsewhere.example")
        assert code == 550
        code, _ = s.rcpt(f"nobody-{os.getpid()}@{DOMAIN}")
        assert code == 550
        code, _ = s.rcpt(f"_email_x=40y.z@{DOMAIN}")
        assert code == 550
        code, _ = s.docmd("DATA")
        assert code == 503


def test_starttls_protects_the_conversation(bundled_bridge):
    import socket
    import ssl

    base, smtp_port, _relay, tmp = bundled_bridge
    ctx = ssl.create_default_context(cafile=str(tmp / "cert.pem"))
    with smtplib.SMTP("127.0.0.1", smtp_port, timeout=15) as s:
        s.ehlo("client.example")
        assert s.has_extn("starttls")
        code, _ = s.starttls(context=ctx)
        assert code == 220
        s.ehlo("client.example")
        assert not s.has_extn("starttls"), "no second STARTTLS inside TLS"
        assert s.sock.version() in ("TLSv1.2", "TLSv1.3")
        s.mail("bob@example.com")
        code, _ = s.rcpt("someone@elsewhere.example")
        assert code == 550
    # Commands pipelined behind STARTTLS in clear text are never obeyed (CVE-2011-0411).
    with socket.create_connection(("127.0.0.1", smtp_port), timeout=15) as raw:
        f = raw.makefile("rb")
        assert f.readline().startswith(b"220")
        raw.sendall(b"EHLO x.example\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        raw.sendall(b"STARTTLS\r\nMAIL FROM:<evil@example.com>\r\n")
        assert f.readline().startswith(b"421")


def _email_config(tmp: Path, smtp_port: int, as_port: int) -> Path:
    conf = tmp / "email.toml"
    conf.write_text(
        f'domain = "{DOMAIN}"\n'
        f'appservice_listen = "127.0.0.1:{as_port}"\n'
        f"[smtp]\nlisten = \"127.0.0.1:{smtp_port}\"\nper_sender_per_minute = 0\n"
        "[auth]\nenabled = false\n"
    )
    return conf


def _start_bridge(tmp: Path, base: str, conf: Path, reg: Path) -> tuple[subprocess.Popen, object]:
    binary = Path(_salon_bin()).parent / "salon-email"
    log = open(tmp / "bridge.log", "ab")
    proc = subprocess.Popen(
        [str(binary), "--config", str(conf), "--registration", str(reg), "--homeserver", base,
         "--server-name", SERVER, "--data", str(tmp / "bridge-data")],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RUST_LOG": "info"},
    )
    return proc, log


async def test_no_accepted_mail_is_lost_or_doubled(tmp_path):
    binary = Path(_salon_bin()).parent / "salon-email"
    assert binary.exists(), f"{binary} is not built"
    smtp_port, as_port = _free_loopback_port(), _free_loopback_port()
    conf = _email_config(tmp_path, smtp_port, as_port)
    regdir = tmp_path / "registrations"
    regdir.mkdir()
    reg = regdir / "email.yaml"
    # The first run writes the registration for the homeserver and stops.
    subprocess.run(
        [str(binary), "--config", str(conf), "--registration", str(reg), "--server-name", SERVER],
        check=True, timeout=30, capture_output=True,
    )
    extra = {"SALON_APPSERVICES__REGISTRATION_DIR": str(regdir)}
    salon, base, salon_log = _start_salon(tmp_path, extra)
    bridge, bridge_log = _start_bridge(tmp_path, base, conf, reg)
    name = unique_localpart("dora")
    staff = f"{name}@{DOMAIN}"
    dora = await _register(base, name)
    try:
        _wait_port(smtp_port)
        first = _mail("Eve Field <eve@example.com>", [staff], "Site visit", "token-0")
        _send(smtp_port, first, [staff])
        room = await _wait_invite(dora, "Site visit")
        await _wait_messages(dora, room, 1)

        # The homeserver goes down; mail keeps arriving and is accepted.
        _stop(salon)
        accepted = ["token-0"]
        for i in range(1, 6):
            m = _mail("Eve Field <eve@example.com>", [staff], "Re: Site visit", f"token-{i}",
                      in_reply_to=first["Message-ID"], references=[first["Message-ID"]])
            _send(smtp_port, m, [staff])
            accepted.append(f"token-{i}")

        # A stream of mail, and the bridge killed in the middle of it.
        stop_sending = threading.Event()

        def stream() -> None:
            i = 6
            while not stop_sending.is_set():
                m = _mail("Eve Field <eve@example.com>", [staff], "Re: Site visit", f"token-{i}",
                          in_reply_to=first["Message-ID"], references=[first["Message-ID"]])
                try:
                    _send(smtp_port, m, [staff])
                except (OSError, smtplib.SMTPException):
                    # Not acknowledged: the sender keeps it (and would retry).
                    return
                accepted.append(f"token-{i}")
                i += 1

        sender = threading.Thread(target=stream)
        sender.start()
        deadline = time.monotonic() + 20
        while len(accepted) < 12 and time.monotonic() < deadline:
            time.sleep(0.01)
        bridge.send_signal(signal.SIGKILL)
        bridge.wait()
        stop_sending.set()
        sender.join(timeout=20)
        assert len(accepted) >= 12

        # Everything comes back; every accepted mail appears exactly once.
        salon, base2, salon_log2 = _start_salon(tmp_path, extra)
        assert base2
        bridge, bridge_log2 = _start_bridge(tmp_path, base2, conf, reg)
        client = AsyncClient(base2, config=CLIENT_CONFIG)
        client.access_token, client.user_id, client.device_id = dora.access_token, dora.user_id, dora.device_id
        try:
            msgs = await _wait_messages(client, room, len(accepted), timeout=60)
            bodies = [m.source["content"]["body"].strip() for m in msgs]
            assert len(set(bodies)) == len(bodies), f"a mail was bridged twice: {bodies}"
            assert set(accepted) <= set(bodies), f"accepted mail is missing: {set(accepted) - set(bodies)}"
            # The one mail whose 250 the killed bridge wrote but the client never read
            # may be there too (its sender would retry, and its Message-ID dedupes it).
            assert len(bodies) - len(accepted) <= 1, bodies
            # And a second restart of the bridge bridges nothing again.
            bridge.send_signal(signal.SIGKILL)
            bridge.wait()
            bridge, bridge_log3 = _start_bridge(tmp_path, base2, conf, reg)
            await asyncio.sleep(2)
            # Nothing new: the same messages as before, the possible extra included.
            assert len(await _messages(client, room)) == len(bodies)
        finally:
            await client.close()
    finally:
        await dora.close()
        bridge.kill()
        bridge.wait()
        _stop(salon)
        salon_log.close()
        bridge_log.close()


def _dnsmasq(tmp: Path, records: dict[str, list[str]]) -> tuple[subprocess.Popen, int]:
    """A DNS server on a loopback port serving only the given TXT records."""
    if not os.path.exists("/usr/sbin/dnsmasq"):
        pytest.fail("dnsmasq is not installed: scripts/test installs dnsmasq-base", pytrace=False)
    port = _free_loopback_port()
    args = [
        "/usr/sbin/dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll",
        "--listen-address=127.0.0.1", "--bind-interfaces", f"--port={port}", "--user=root",
        f"--pid-file={tmp / 'dnsmasq.pid'}", "--log-facility=-", "--log-queries",
    ]
    for name, strings in records.items():
        # Each TXT string at most 255 bytes, as DNS wants.
        chunks = [c[i:i + 250] for c in strings for i in range(0, len(c), 250)]
        # No shell here: commas separate the strings, and quotes would be kept.
        args.append(f"--txt-record={name}," + ",".join(chunks))
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(tmp / "dnsmasq.log", "wb"))
    time.sleep(0.3)
    if proc.poll() is not None:
        pytest.fail(f"dnsmasq did not start: {(tmp / 'dnsmasq.log').read_text()}", pytrace=False)
    return proc, port


@pytest.mark.parametrize("action", ["quarantine", "reject"])
async def test_spf_dkim_and_dmarc_decide_what_gets_in(tmp_path, action):
    import base64

    import dkim

    key = tmp_path / "dkim.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True, timeout=60)
    der = subprocess.run(
        ["openssl", "rsa", "-in", str(key), "-pubout", "-outform", "DER"],
        check=True, capture_output=True, timeout=60,
    ).stdout
    dns, dns_port = _dnsmasq(tmp_path, {
        # good.example sends from loopback and signs; bank.example sends only from elsewhere.
        "good.example": ["v=spf1 ip4:127.0.0.1 -all"],
        "sel._domainkey.good.example": ["v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()],
        "_dmarc.good.example": ["v=DMARC1; p=reject"],
        "bank.example": ["v=spf1 ip4:192.0.2.1 -all"],
        "_dmarc.bank.example": ["v=DMARC1; p=reject"],
    })
    smtp_port = _free_loopback_port()
    salon, base, log = _start_salon(tmp_path, {
        "SALON_BRIDGES__EMAIL__ENABLED": "true",
        "SALON_BRIDGES__EMAIL__DOMAIN": DOMAIN,
        "SALON_BRIDGES__EMAIL__SMTP__LISTEN": f"127.0.0.1:{smtp_port}",
        "SALON_BRIDGES__EMAIL__AUTH__DNS": f"127.0.0.1:{dns_port}",
        "SALON_BRIDGES__EMAIL__AUTH__ON_DMARC_FAIL": action,
        "SALON_BRIDGES__EMAIL__AUTH__REVIEWERS": '["@' + "reviewer_" + action + ':localhost"]',
    })
    staff_name = unique_localpart("ines")
    staff = await _register(base, staff_name)
    reviewer = await _register(base, "reviewer_" + action)
    try:
        _wait_port(smtp_port)
        rcpt = f"{staff_name}@{DOMAIN}"
        # A message signed by good.example, sent from an address its SPF allows.
        good = _mail("Gina <gina@good.example>", [rcpt], "Signed and sound", "All checks pass.")
        raw = good.as_bytes()
        sig = dkim.sign(raw, b"sel", b"good.example", key.read_bytes(), include_headers=[b"from", b"to", b"subject", b"message-id"])
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as s:
            s.ehlo("mx.good.example")
            s.sendmail("gina@good.example", [rcpt], sig + raw)
        room = await _wait_invite(staff, "Signed and sound")
        msgs = await _wait_messages(staff, room, 1)
        assert msgs[0].source["content"]["body"].strip() == "All checks pass."

        # A forgery: From bank.example, no signature, sent from where its SPF forbids.
        forged = _mail("Bank <security@bank.example>", [rcpt], "Verify your account", "Click here.")
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as s:
            s.ehlo("mx.attacker.example")
            if action == "reject":
                with pytest.raises(smtplib.SMTPDataError) as refused:
                    s.sendmail("security@bank.example", [rcpt], forged.as_bytes())
                assert refused.value.smtp_code == 550
                assert b"DMARC" in refused.value.smtp_error
            else:
                s.sendmail("security@bank.example", [rcpt], forged.as_bytes())
        if action == "quarantine":
            review = await _wait_invite(reviewer, "Email review")
            msgs = await _wait_messages(reviewer, review, 2)
            assert "security@bank.example" in msgs[0].source["content"]["body"]
            assert "failed DMARC" in msgs[0].source["content"]["body"]
            assert msgs[1].source["content"]["msgtype"] == "m.file"
        # The staff member never sees the forgery: no room for it.
        await asyncio.sleep(1)
        await bounded(staff.sync(timeout=0))
        names = [r.name for r in list(staff.rooms.values()) + list(staff.invited_rooms.values())]
        assert "Verify your account" not in names, names
    finally:
        await staff.close()
        await reviewer.close()
        _stop(salon)
        log.close()
        dns.kill()
        dns.wait()
