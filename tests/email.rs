//! The email bridge inside `salon serve`: the SMTP and LMTP conversations with every
//! refusal RFC 5321 gives, a corpus of hostile and real-world messages bridged without a
//! crash, mailbox rooms with threads, the `!email` commands and bounces.

mod common;

use std::time::Duration;

use common::{Client, TestServer, enc};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};

const DOMAIN: &str = "salon.test";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Bridge {
    server: TestServer,
    smtp: u16,
    lmtp: u16,
}

async fn start() -> Bridge {
    start_in(tempfile::tempdir().unwrap()).await
}

async fn start_in(dir: tempfile::TempDir) -> Bridge {
    let (smtp, lmtp) = (free_port(), free_port());
    let smtp_listen = format!("127.0.0.1:{smtp}");
    let lmtp_listen = format!("127.0.0.1:{lmtp}");
    let server = TestServer::start_in(
        dir,
        &[
            ("SALON_BRIDGES__EMAIL__ENABLED", "true"),
            ("SALON_BRIDGES__EMAIL__DOMAIN", DOMAIN),
            ("SALON_BRIDGES__EMAIL__SMTP__LISTEN", &smtp_listen),
            ("SALON_BRIDGES__EMAIL__SMTP__MAX_MESSAGE_BYTES", "200000"),
            ("SALON_BRIDGES__EMAIL__SMTP__MAX_HEADER_BYTES", "8192"),
            ("SALON_BRIDGES__EMAIL__LMTP", &lmtp_listen),
            ("SALON_APPSERVICES__PING__ENABLED", "false"),
            // SPF/DKIM/DMARC have their own test, with a DNS server of their own.
            ("SALON_BRIDGES__EMAIL__AUTH__ENABLED", "false"),
        ],
    )
    .await;
    for _ in 0..200 {
        if TcpStream::connect(("127.0.0.1", smtp)).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Bridge { server, smtp, lmtp }
}

/// A line-by-line SMTP client, to say exactly what a test needs (and what no library
/// would send).
struct Smtp {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
}

impl Smtp {
    async fn connect(port: u16) -> (Self, u16) {
        let (r, w) = TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap()
            .into_split();
        let mut s = Self {
            r: BufReader::new(r),
            w,
        };
        let (code, _) = s.reply().await;
        (s, code)
    }

    async fn reply(&mut self) -> (u16, String) {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(20), self.r.read_line(&mut line))
                .await
                .expect("the server answers")
                .unwrap();
            assert!(n > 0, "connection closed; so far: {text}");
            text.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return (line[..3].parse().unwrap(), text);
            }
        }
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).await.unwrap();
    }

    async fn cmd(&mut self, line: &str) -> (u16, String) {
        self.send_raw(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// `DATA`, then the message (dot-stuffed) and the final dot.
    async fn data(&mut self, raw: &[u8]) -> (u16, String) {
        let (code, text) = self.cmd("DATA").await;
        assert_eq!(code, 354, "{text}");
        let mut out = Vec::new();
        for line in raw.split_inclusive(|b| *b == b'\n') {
            if line.starts_with(b".") {
                out.push(b'.');
            }
            out.extend_from_slice(line);
        }
        if !out.ends_with(b"\n") {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
        self.send_raw(&out).await;
        self.reply().await
    }
}

async fn deliver(port: u16, from: &str, to: &str, raw: &[u8]) -> (u16, String) {
    let (mut s, _) = Smtp::connect(port).await;
    assert_eq!(s.cmd("EHLO client.example").await.0, 250);
    assert_eq!(s.cmd(&format!("MAIL FROM:<{from}>")).await.0, 250);
    let (code, text) = s.cmd(&format!("RCPT TO:<{to}>")).await;
    assert_eq!(code, 250, "{text}");
    let r = s.data(raw).await;
    s.cmd("QUIT").await;
    r
}

/// Wait until `c` is invited to a room whose name satisfies `pred`; join it.
async fn joined_invite(c: &Client, pred: impl Fn(&str) -> bool) -> (String, String) {
    for _ in 0..300 {
        let v = c
            .ok(Method::GET, "/_matrix/client/v3/sync?timeout=0", None)
            .await;
        if let Some(invites) = v["rooms"]["invite"].as_object() {
            for (room, data) in invites {
                let name = data["invite_state"]["events"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|e| e["type"] == "m.room.name")
                    .and_then(|e| e["content"]["name"].as_str())
                    .unwrap_or_default()
                    .to_owned();
                if pred(&name) {
                    let (status, body) = c.join(room).await;
                    assert!(status.is_success(), "{body}");
                    return (room.clone(), name);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no matching invite arrived");
}

async fn messages(c: &Client, room: &str) -> Vec<Value> {
    let v = c
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=100",
                enc(room)
            ),
            None,
        )
        .await;
    let mut events: Vec<Value> = v["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .cloned()
        .collect();
    events.reverse();
    events
}

async fn wait_messages(c: &Client, room: &str, n: usize) -> Vec<Value> {
    for _ in 0..300 {
        let m = messages(c, room).await;
        if m.len() >= n {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("fewer than {n} messages: {:?}", messages(c, room).await);
}

#[tokio::test]
async fn the_smtp_conversation_refuses_what_it_must() {
    let b = start().await;
    let alice = b.server.user("alice").await;
    let _ = alice;
    let (mut s, greeting) = Smtp::connect(b.smtp).await;
    assert_eq!(greeting, 220);
    assert_eq!(
        s.cmd("MAIL FROM:<bob@example.com>").await.0,
        503,
        "hello first"
    );
    assert_eq!(s.cmd("HELO").await.0, 501);
    assert_eq!(
        s.cmd("LHLO client.example").await.0,
        500,
        "LMTP greeting on SMTP"
    );
    let (code, ehlo) = s.cmd("EHLO client.example").await;
    assert_eq!(code, 250);
    for ext in [
        "PIPELINING",
        "SIZE 200000",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
    ] {
        assert!(ehlo.contains(ext), "{ehlo}");
    }
    assert!(!ehlo.contains("STARTTLS"), "no certificate, no STARTTLS");
    assert_eq!(s.cmd("STARTTLS").await.0, 502);
    assert_eq!(
        s.cmd("RCPT TO:<alice@salon.test>").await.0,
        503,
        "MAIL first"
    );
    assert_eq!(s.cmd("DATA").await.0, 503);
    assert_eq!(s.cmd("MAIL FROM:<not an address>").await.0, 553);
    assert_eq!(s.cmd("MAIL FROM bob@example.com").await.0, 501);
    assert_eq!(
        s.cmd("MAIL FROM:<bob@example.com> SIZE=999999999").await.0,
        552
    );
    assert_eq!(
        s.cmd("MAIL FROM:<bob@example.com> X-UNKNOWN=1").await.0,
        555
    );
    assert_eq!(
        s.cmd("MAIL FROM:<>").await.0,
        250,
        "the null sender of bounces"
    );
    assert_eq!(
        s.cmd("MAIL FROM:<bob@example.com>").await.0,
        503,
        "nested MAIL"
    );
    let (code, text) = s.cmd("RCPT TO:<victim@elsewhere.example>").await;
    assert_eq!(code, 550, "never an open relay");
    assert!(text.contains("5.7.1"), "{text}");
    let (code, text) = s.cmd("RCPT TO:<nobody@salon.test>").await;
    assert_eq!(code, 550);
    assert!(text.contains("5.1.1"), "{text}");
    assert_eq!(
        s.cmd("RCPT TO:<_email_x=40y.z@salon.test>").await.0,
        550,
        "ghosts get no mail"
    );
    assert_eq!(
        s.cmd("RCPT TO:<reply+unknowntoken@salon.test>").await.0,
        550
    );
    assert_eq!(s.cmd("DATA").await.0, 503, "no valid recipient");
    assert_eq!(s.cmd("RCPT TO:<Alice@SALON.test>").await.0, 250);
    // Too big: refused, and the session stays in step.
    let big = format!(
        "From: bob@example.com\r\nSubject: big\r\n\r\n{}\r\n",
        "x".repeat(70).repeat(4000)
    );
    let (code, text) = s.data(big.as_bytes()).await;
    assert_eq!(code, 552, "{text}");
    assert_eq!(s.cmd("NOOP").await.0, 250);
    // A header block over the limit.
    assert_eq!(s.cmd("MAIL FROM:<bob@example.com>").await.0, 250);
    assert_eq!(s.cmd("RCPT TO:<alice@salon.test>").await.0, 250);
    let headers = format!(
        "From: bob@example.com\r\n{}Subject: long\r\n\r\nbody\r\n",
        "X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n"
            .repeat(200)
    );
    let (code, text) = s.data(headers.as_bytes()).await;
    assert_eq!(code, 552, "{text}");
    // A MIME bomb: nesting no real mail has.
    assert_eq!(s.cmd("MAIL FROM:<bob@example.com>").await.0, 250);
    assert_eq!(s.cmd("RCPT TO:<alice@salon.test>").await.0, 250);
    let mut bomb = String::from("From: bob@example.com\r\nSubject: bomb\r\n");
    for i in 0..60 {
        bomb.push_str(&format!(
            "Content-Type: multipart/mixed; boundary=\"b{i}\"\r\n\r\n--b{i}\r\n"
        ));
    }
    bomb.push_str("Content-Type: text/plain\r\n\r\nboom\r\n");
    let (code, text) = s.data(bomb.as_bytes()).await;
    assert_eq!(code, 554, "{text}");
    // An overlong command line and nonsense.
    assert_eq!(s.cmd(&format!("NOOP {}", "a".repeat(5000))).await.0, 500);
    assert_eq!(s.cmd("WHATEVER").await.0, 500);
    assert_eq!(s.cmd("VRFY alice").await.0, 252);
    assert_eq!(s.cmd("RSET").await.0, 250);
    assert_eq!(s.cmd("QUIT").await.0, 221);
    b.server.stop().await;
}

#[tokio::test]
async fn lmtp_answers_for_each_recipient() {
    let b = start().await;
    let _alice = b.server.user("alice").await;
    let _bob = b.server.user("bob").await;
    let (mut s, greeting) = Smtp::connect(b.lmtp).await;
    assert_eq!(greeting, 220);
    assert_eq!(s.cmd("EHLO mta.example").await.0, 500, "LMTP says LHLO");
    assert_eq!(s.cmd("LHLO mta.example").await.0, 250);
    assert_eq!(s.cmd("MAIL FROM:<carol@example.com>").await.0, 250);
    assert_eq!(s.cmd("RCPT TO:<alice@salon.test>").await.0, 250);
    assert_eq!(s.cmd("RCPT TO:<bob@salon.test>").await.0, 250);
    let (code, first) = s
        .data(b"From: carol@example.com\r\nSubject: Both of you\r\nMessage-ID: <lmtp-1@example.com>\r\n\r\nHello both.\r\n")
        .await;
    assert_eq!(code, 250, "{first}");
    // The second recipient's answer follows.
    let (code, second) = s.reply().await;
    assert_eq!(code, 250, "{second}");
    assert_eq!(s.cmd("QUIT").await.0, 221);
    b.server.stop().await;
}

#[tokio::test]
async fn hostile_and_real_world_mail_is_bridged_without_harm() {
    let b = start().await;
    let alice = b.server.user("alice").await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/email");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 7);
    for f in &files {
        let raw = std::fs::read(f).unwrap();
        let raw = String::from_utf8_lossy(&raw).replace("%RCPT%", "alice@salon.test");
        // Keep the 8-bit bytes as they are.
        let raw: Vec<u8> = if raw.contains('\u{FFFD}') {
            let bytes = std::fs::read(f).unwrap();
            let s = b"%RCPT%";
            let i = bytes.windows(s.len()).position(|w| w == s).unwrap();
            [
                &bytes[..i],
                b"alice@salon.test".as_slice(),
                &bytes[i + s.len()..],
            ]
            .concat()
        } else {
            raw.into_bytes()
        };
        let (code, text) = deliver(b.smtp, "sender@example.com", "alice@salon.test", &raw).await;
        assert_eq!(code, 250, "{}: {text}", f.display());
    }
    // Every message became a room Alice is invited to.
    let mut rooms = std::collections::HashMap::new();
    for _ in 0..files.len() {
        let (room, name) = joined_invite(&alice, |n| !n.is_empty() && n != "Email").await;
        rooms.insert(name, room);
    }
    assert_eq!(rooms.len(), files.len(), "{rooms:?}");
    // The HTML-only message: text made from the HTML, the HTML cut to what Matrix allows.
    let shop = wait_messages(&alice, &rooms["Your order"], 1).await;
    let content = &shop[0]["content"];
    assert_eq!(content["body"], "Order 42 shipped.\nclick");
    let html = content["formatted_body"].as_str().unwrap();
    assert!(html.contains("<b>42</b>"), "{html}");
    for bad in ["script", "onload", "javascript", "<img", "style"] {
        assert!(!html.contains(bad), "{bad} in {html}");
    }
    // Encoded words and a Latin-1 body arrive as proper text, the sender named.
    let munich = wait_messages(&alice, &rooms["Grüße aus München"], 1).await;
    assert_eq!(
        munich[0]["content"]["body"].as_str().unwrap().trim(),
        "Schöne Grüße."
    );
    let sender = munich[0]["sender"].as_str().unwrap();
    assert_eq!(sender, "@_email_jan=40example.de:localhost");
    let profile = alice
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/profile/{}", enc(sender)),
            None,
        )
        .await;
    assert_eq!(profile["displayname"], "Jan Müller");
    // The inline image of a Thunderbird message is an m.image in the room.
    let tb = wait_messages(&alice, &rooms["Minutes"], 2).await;
    assert_eq!(
        tb[0]["content"]["body"].as_str().unwrap().trim(),
        "The minutes are attached."
    );
    assert_eq!(tb[1]["content"]["msgtype"], "m.image");
    assert_eq!(tb[1]["content"]["info"]["mimetype"], "image/png");
    // A forwarded message travels as an .eml file.
    let fwd = wait_messages(&alice, &rooms["Fwd: original"], 2).await;
    assert_eq!(fwd[1]["content"]["msgtype"], "m.file");
    assert!(
        fwd[1]["content"]["body"]
            .as_str()
            .unwrap()
            .ends_with(".eml")
    );
    // The server is still well.
    assert_eq!(alice.get("/_matrix/client/versions").await.0, 200);
    b.server.stop().await;
}

#[tokio::test]
async fn a_mailbox_room_gets_threads_and_commands_answer() {
    let b = start().await;
    let alice = b.server.user("alice").await;
    let room = alice
        .create_room(json!({ "name": "Press office", "invite": ["@email:localhost"] }))
        .await;
    // The bridge bot joins on invite.
    for _ in 0..200 {
        let (_, m) = alice
            .get(&format!(
                "/_matrix/client/v3/rooms/{}/joined_members",
                enc(&room)
            ))
            .await;
        if m["joined"].get("@email:localhost").is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The bot must be able to invite (the ghosts) before the room takes mail.
    alice.send_text(&room, "t0", "!email address press").await;
    let m = wait_messages(&alice, &room, 2).await;
    assert!(
        m[1]["content"]["body"]
            .as_str()
            .unwrap()
            .contains("invite power level"),
        "{m:?}"
    );
    let (_, mut pl) = alice.state(&room, "m.room.power_levels", "").await;
    pl["users"]["@email:localhost"] = json!(50);
    let (status, _) = alice
        .put(
            &format!(
                "/_matrix/client/v3/rooms/{}/state/m.room.power_levels/",
                enc(&room)
            ),
            pl,
        )
        .await;
    assert!(status.is_success());
    alice.send_text(&room, "t1", "!email address press").await;
    let notices = wait_messages(&alice, &room, 4).await;
    assert!(
        notices[3]["content"]["body"]
            .as_str()
            .unwrap()
            .contains("press@salon.test"),
        "{notices:?}"
    );
    // A name that is a person's address is refused.
    alice.send_text(&room, "t2", "!email address alice").await;
    let m = wait_messages(&alice, &room, 6).await;
    assert!(
        m[5]["content"]["body"]
            .as_str()
            .unwrap()
            .contains("a person's address")
    );

    let first = b"From: Reporter <rep@news.example>\r\nTo: press@salon.test\r\nSubject: Interview request\r\nMessage-ID: <int-1@news.example>\r\n\r\nCould we talk on Monday?\r\n";
    assert_eq!(
        deliver(b.smtp, "rep@news.example", "press@salon.test", first)
            .await
            .0,
        250
    );
    let m = wait_messages(&alice, &room, 7).await;
    let root = &m[6];
    assert_eq!(root["sender"], "@_email_rep=40news.example:localhost");
    assert_eq!(
        root["content"]["body"],
        "Interview request\n\nCould we talk on Monday?"
    );
    let root_id = root["event_id"].as_str().unwrap().to_owned();
    // The reporter's follow-up joins the thread.
    let second = b"From: Reporter <rep@news.example>\r\nTo: press@salon.test\r\nSubject: Re: Interview request\r\nMessage-ID: <int-2@news.example>\r\nIn-Reply-To: <int-1@news.example>\r\n\r\nOr Tuesday.\r\n";
    assert_eq!(
        deliver(b.smtp, "rep@news.example", "press@salon.test", second)
            .await
            .0,
        250
    );
    let m = wait_messages(&alice, &room, 8).await;
    assert_eq!(m[7]["content"]["body"], "Or Tuesday.");
    assert_eq!(m[7]["content"]["m.relates_to"]["rel_type"], "m.thread");
    assert_eq!(m[7]["content"]["m.relates_to"]["event_id"], root_id);

    // In the thread, participants names the reporter and the reply address.
    let (_, sent) = alice
        .put(
            &format!(
                "/_matrix/client/v3/rooms/{}/send/m.room.message/t3",
                enc(&room)
            ),
            json!({
                "msgtype": "m.text",
                "body": "!email participants",
                "m.relates_to": { "rel_type": "m.thread", "event_id": root_id },
            }),
        )
        .await;
    assert!(sent["event_id"].is_string());
    let m = wait_messages(&alice, &room, 10).await;
    let answer = m[9]["content"]["body"].as_str().unwrap().to_owned();
    assert!(answer.contains("Reporter <rep@news.example>"), "{answer}");
    let reply_address = answer
        .split_whitespace()
        .find(|w| w.starts_with("reply+"))
        .unwrap()
        .trim_end_matches('.')
        .to_owned();

    // A bounce sent to the reply address becomes a notice naming who failed.
    let dsn = format!(
        "From: MAILER-DAEMON@news.example\r\nTo: {reply_address}\r\nSubject: Undelivered Mail Returned to Sender\r\nAuto-Submitted: auto-replied\r\n\
Content-Type: multipart/report; report-type=delivery-status; boundary=\"r\"\r\n\r\n\
--r\r\nContent-Type: text/plain\r\n\r\nDelivery failed.\r\n\
--r\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.news.example\r\n\r\nFinal-Recipient: rfc822; rep@news.example\r\nAction: failed\r\nStatus: 5.2.2\r\n\
--r--\r\n"
    );
    assert_eq!(
        deliver(b.smtp, "", &reply_address, dsn.as_bytes()).await.0,
        250
    );
    let m = wait_messages(&alice, &room, 11).await;
    assert_eq!(m[10]["sender"], "@email:localhost");
    assert_eq!(m[10]["content"]["msgtype"], "m.notice");
    assert!(
        m[10]["content"]["body"]
            .as_str()
            .unwrap()
            .contains("rep@news.example could not be delivered")
    );

    // `!email new` makes a room for a thread started from Matrix.
    alice
        .send_text(
            &room,
            "t4",
            "!email new partner@agency.example Joint statement",
        )
        .await;
    let (new_room, _) = joined_invite(&alice, |n| n == "Joint statement").await;
    let members = alice
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&new_room)),
            None,
        )
        .await;
    assert!(
        members["joined"]
            .get("@_email_partner=40agency.example:localhost")
            .is_some(),
        "{members}"
    );
    let bridge = alice
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/state", enc(&new_room)),
            None,
        )
        .await;
    assert!(
        bridge
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "m.bridge" && e["content"]["protocol"]["id"] == "email"),
        "{bridge}"
    );
    b.server.stop().await;
}

#[tokio::test]
async fn staff_are_reached_at_their_account_address_too() {
    // An account made by the administrator with the address of its mailbox elsewhere.
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_salon"))
        .args([
            "admin",
            "create-user",
            "nbenali",
            "--password",
            "correct horse battery",
            "--email",
            "Nadia.Benali@Ministry.example",
        ])
        .env("SALON_DATA_DIR", dir.path())
        .env("SALON_SERVER_NAME", "localhost")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let b = start_in(dir).await;
    let mut nadia = b.server.client();
    let (status, body) = nadia
        .post(
            "/_matrix/client/v3/login",
            json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "nbenali" }, "password": "correct horse battery" }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    nadia.token = Some(body["access_token"].as_str().unwrap().to_owned());
    let _carl = b.server.user("carl").await;
    // Mail to Carl that copies Nadia's own address: she is invited, not made a ghost,
    // and she is not among the people outside who get the room's messages by mail.
    let raw = b"From: Pat <pat@example.com>\r\nTo: carl@salon.test\r\nCc: Nadia Benali <nadia.benali@ministry.example>\r\nSubject: Visit planning\r\nMessage-ID: <visit-1@example.com>\r\n\r\nWhen do you both arrive?\r\n";
    assert_eq!(
        deliver(b.smtp, "pat@example.com", "carl@salon.test", raw)
            .await
            .0,
        250
    );
    let (room, _) = joined_invite(&nadia, |n| n == "Visit planning").await;
    let members = nadia
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&room)),
            None,
        )
        .await;
    let joined: Vec<&String> = members["joined"].as_object().unwrap().keys().collect();
    assert!(
        !joined.iter().any(|u| u.contains("nadia.benali")),
        "{joined:?}"
    );
    nadia.send_text(&room, "p1", "!email participants").await;
    let m = wait_messages(&nadia, &room, 3).await;
    let answer = m[2]["content"]["body"].as_str().unwrap();
    assert!(
        answer.contains("pat@example.com") && !answer.contains("ministry"),
        "{answer}"
    );
    b.server.stop().await;
}
