//! Reading an inbound message (with `mail-parser`) into what the bridge needs: who wrote
//! to whom, how it threads, its text, and its files.

use mail_parser::{Address, HeaderValue, MessageParser, MimeHeaders, PartType};

use crate::address;

/// More parts than this and the message is refused (a "MIME bomb").
pub const MAX_PARTS: usize = 500;
/// Deeper multipart nesting than this and the message is refused.
pub const MAX_DEPTH: usize = 20;

#[derive(Clone, Debug, PartialEq)]
pub struct Person {
    pub address: String,
    pub name: Option<String>,
}

impl Person {
    /// `Bob Smith` or, without a name, the address.
    pub fn display(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.address.clone())
    }
}

#[derive(Clone, Debug)]
pub struct Attachment {
    pub filename: String,
    pub mime: String,
    pub bytes: Vec<u8>,
    /// Referenced from the HTML (`cid:`): an inline image.
    pub inline: bool,
}

/// What kind of message it is, for loops and bounces.
#[derive(Clone, Debug, PartialEq)]
pub enum Kind {
    /// Written by a person.
    Normal,
    /// An auto-reply (RFC 3834 `Auto-Submitted`, or the usual vacation markers).
    AutoReply,
    /// A delivery status notification; the addresses that failed.
    Bounce { failed: Vec<String> },
}

#[derive(Clone, Debug)]
pub struct Mail {
    /// Without angle brackets; generated from the content when the message has none.
    pub message_id: String,
    pub in_reply_to: Vec<String>,
    pub references: Vec<String>,
    pub subject: String,
    pub from: Option<Person>,
    pub to: Vec<Person>,
    pub cc: Vec<Person>,
    pub text: String,
    pub html: Option<String>,
    pub attachments: Vec<Attachment>,
    pub kind: Kind,
}

fn people(a: Option<&Address<'_>>) -> Vec<Person> {
    let Some(a) = a else { return Vec::new() };
    a.iter()
        .filter_map(|addr| {
            let address = address::normalise(addr.address()?)?;
            let name = addr
                .name()
                .map(|n| n.trim().trim_matches('"').trim().to_owned())
                .filter(|n| !n.is_empty() && !n.eq_ignore_ascii_case(&address));
            Some(Person { address, name })
        })
        .collect()
}

fn ids(v: &HeaderValue<'_>) -> Vec<String> {
    let list: Vec<String> = match v {
        HeaderValue::Text(t) => vec![t.to_string()],
        HeaderValue::TextList(l) => l.iter().map(|t| t.to_string()).collect(),
        _ => Vec::new(),
    };
    list.into_iter()
        .map(|s| s.trim().trim_matches(['<', '>']).to_owned())
        .filter(|s| !s.is_empty() && s.len() <= 998)
        .collect()
}

/// Refuse structures no real mail has: too many parts or too deep a nesting.
pub fn check_structure(raw: &[u8]) -> Result<(), &'static str> {
    let Some(message) = MessageParser::default().parse(raw) else {
        return Ok(());
    };
    if message.parts.len() > MAX_PARTS {
        return Err("554 5.6.0 Too many MIME parts");
    }
    // Depth by walking sub-parts from the root, without recursion.
    let mut stack = vec![(0usize, 1usize)];
    let mut visited = 0;
    while let Some((id, depth)) = stack.pop() {
        visited += 1;
        if depth > MAX_DEPTH || visited > MAX_PARTS {
            return Err("554 5.6.0 MIME structure nested too deeply");
        }
        if let Some(PartType::Multipart(children)) = message.parts.get(id).map(|p| &p.body) {
            for c in children {
                stack.push((*c as usize, depth + 1));
            }
        }
    }
    Ok(())
}

fn header_text<'a>(m: &'a mail_parser::Message<'a>, name: &'a str) -> Option<&'a str> {
    m.header_raw(name).map(str::trim)
}

fn classify(m: &mail_parser::Message<'_>) -> Kind {
    let ctype = m.content_type();
    let is_report = ctype.is_some_and(|c| {
        c.ctype().eq_ignore_ascii_case("multipart")
            && c.subtype()
                .is_some_and(|s| s.eq_ignore_ascii_case("report"))
            && c.attribute("report-type")
                .is_some_and(|t| t.eq_ignore_ascii_case("delivery-status"))
    });
    if is_report {
        let mut failed = Vec::new();
        for part in &m.parts {
            let is_status = part.content_type().is_some_and(|c| {
                c.subtype().is_some_and(|s| {
                    s.eq_ignore_ascii_case("delivery-status")
                        || s.eq_ignore_ascii_case("global-delivery-status")
                })
            });
            if !is_status {
                continue;
            }
            let text = String::from_utf8_lossy(part.contents()).into_owned();
            let mut recipient = None;
            for line in text.lines() {
                let lower = line.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("final-recipient:") {
                    recipient = v.rsplit(';').next().and_then(address::normalise);
                } else if let Some(v) = lower.strip_prefix("action:")
                    && v.trim() == "failed"
                    && let Some(r) = recipient.take()
                    && !failed.contains(&r)
                {
                    failed.push(r);
                }
            }
        }
        return Kind::Bounce { failed };
    }
    let auto = header_text(m, "Auto-Submitted").is_some_and(|v| !v.eq_ignore_ascii_case("no"))
        || header_text(m, "X-Autoreply").is_some()
        || header_text(m, "X-Autorespond").is_some()
        || header_text(m, "Precedence").is_some_and(|v| {
            let v = v.to_ascii_lowercase();
            v == "auto_reply" || v == "bulk" || v == "junk"
        });
    if auto { Kind::AutoReply } else { Kind::Normal }
}

/// A stable id for a message that has no Message-ID: the same bytes give the same id,
/// so a redelivered copy is still recognised.
fn synthetic_id(raw: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!(
        "{}@no-message-id.invalid",
        hex::encode(&Sha256::digest(raw)[..16])
    )
}

pub fn parse(raw: &[u8]) -> Mail {
    let Some(m) = MessageParser::default().parse(raw) else {
        return unreadable(raw);
    };
    let message_id = m
        .message_id()
        .map(|s| s.trim().trim_matches(['<', '>']).to_owned())
        .filter(|s| !s.is_empty() && s.len() <= 998)
        .unwrap_or_else(|| synthetic_id(raw));
    let subject = m
        .subject()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "(no subject)".to_owned());
    // Only a real text/plain part: for HTML-only mail the text is made from the
    // sanitised HTML later, never from the raw markup (scripts and styles included).
    let text = m
        .text_part(0)
        .filter(|p| !p.is_text_html())
        .and_then(|_| m.body_text(0))
        .map(|t| t.into_owned())
        .unwrap_or_default();
    let html = (m.html_body_count() > 0)
        .then(|| m.html_part(0))
        .flatten()
        .filter(|p| p.is_text_html())
        .and_then(|p| p.text_contents().map(str::to_owned));
    let mut attachments = Vec::new();
    for (i, part) in m.attachments().enumerate() {
        let mime = part
            .content_type()
            .map(|c| match c.subtype() {
                Some(s) => format!("{}/{}", c.ctype(), s),
                None => c.ctype().to_owned(),
            })
            .unwrap_or_else(|| "application/octet-stream".to_owned())
            .to_ascii_lowercase();
        let bytes = match &part.body {
            PartType::Message(inner) => inner.raw_message().to_vec(),
            _ => part.contents().to_vec(),
        };
        if bytes.is_empty() {
            continue;
        }
        let filename = part
            .attachment_name()
            .map(sanitise_filename)
            .filter(|f| !f.is_empty())
            .unwrap_or_else(|| {
                let ext = if mime == "message/rfc822" {
                    "eml"
                } else {
                    mime.split('/').nth(1).unwrap_or("bin")
                };
                format!("attachment-{}.{ext}", i + 1)
            });
        let inline = part.content_id().is_some() && !part.is_attachment_disposition();
        attachments.push(Attachment {
            filename,
            mime,
            bytes,
            inline,
        });
    }
    Mail {
        message_id,
        in_reply_to: ids(m.in_reply_to()),
        references: ids(m.references()),
        subject,
        from: people(m.from()).into_iter().next(),
        to: people(m.to()),
        cc: people(m.cc()),
        text,
        html,
        attachments,
        kind: classify(&m),
    }
}

trait Disposition {
    fn is_attachment_disposition(&self) -> bool;
}

impl Disposition for mail_parser::MessagePart<'_> {
    fn is_attachment_disposition(&self) -> bool {
        self.content_disposition()
            .is_some_and(|d| d.ctype().eq_ignore_ascii_case("attachment"))
    }
}

/// A message `mail-parser` cannot read at all: kept whole as a file.
fn unreadable(raw: &[u8]) -> Mail {
    Mail {
        message_id: synthetic_id(raw),
        in_reply_to: Vec::new(),
        references: Vec::new(),
        subject: "(unreadable message)".to_owned(),
        from: None,
        to: Vec::new(),
        cc: Vec::new(),
        text: "This message could not be read; it is attached as it arrived.".to_owned(),
        html: None,
        attachments: vec![Attachment {
            filename: "message.eml".to_owned(),
            mime: "message/rfc822".to_owned(),
            bytes: raw.to_vec(),
            inline: false,
        }],
        kind: Kind::Normal,
    }
}

/// A file name without directories or control characters.
pub fn sanitise_filename(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    base.chars()
        .filter(|c| !c.is_control())
        .collect::<String>()
        .trim()
        .trim_start_matches('.')
        .chars()
        .take(200)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const THREAD_REPLY: &[u8] = b"From: \"Bob Smith\" <Bob@Example.com>\r\n\
To: alice@salon.test, Carol <carol@partner.example>\r\n\
Cc: dave@salon.test\r\n\
Subject: Re: Budget 2027\r\n\
Message-ID: <reply-1@example.com>\r\n\
In-Reply-To: <root@example.com>\r\n\
References: <root@example.com> <mid@example.com>\r\n\
Content-Type: multipart/mixed; boundary=\"b\"\r\n\
\r\n\
--b\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
\r\n\
Agreed.\r\n\
--b\r\n\
Content-Type: application/pdf; name=\"../../etc/plan.pdf\"\r\n\
Content-Disposition: attachment; filename=\"../../etc/plan.pdf\"\r\n\
Content-Transfer-Encoding: base64\r\n\
\r\n\
JVBERi0xLjQK\r\n\
--b--\r\n";

    #[test]
    fn headers_people_and_attachments_are_read() {
        let m = parse(THREAD_REPLY);
        assert_eq!(m.message_id, "reply-1@example.com");
        assert_eq!(m.in_reply_to, vec!["root@example.com"]);
        assert_eq!(m.references, vec!["root@example.com", "mid@example.com"]);
        assert_eq!(m.subject, "Re: Budget 2027");
        let from = m.from.unwrap();
        assert_eq!(from.address, "bob@example.com");
        assert_eq!(from.name.as_deref(), Some("Bob Smith"));
        assert_eq!(m.to.len(), 2);
        assert_eq!(m.cc[0].address, "dave@salon.test");
        assert_eq!(m.text.trim(), "Agreed.");
        assert_eq!(m.attachments.len(), 1);
        assert_eq!(m.attachments[0].filename, "plan.pdf");
        assert_eq!(m.attachments[0].mime, "application/pdf");
        assert_eq!(m.attachments[0].bytes, b"%PDF-1.4\n");
        assert_eq!(m.kind, Kind::Normal);
    }

    #[test]
    fn messages_without_an_id_get_a_stable_one() {
        let raw = b"From: x@example.com\r\nSubject: hi\r\n\r\nbody\r\n";
        assert_eq!(parse(raw).message_id, parse(raw).message_id);
        assert!(parse(raw).message_id.ends_with("@no-message-id.invalid"));
    }

    #[test]
    fn bounces_and_auto_replies_are_recognised() {
        let dsn = b"From: MAILER-DAEMON@example.com\r\n\
Subject: Undelivered Mail\r\n\
Content-Type: multipart/report; report-type=delivery-status; boundary=\"x\"\r\n\
\r\n\
--x\r\nContent-Type: text/plain\r\n\r\nSorry.\r\n\
--x\r\nContent-Type: message/delivery-status\r\n\r\n\
Reporting-MTA: dns; mx.example.com\r\n\r\n\
Final-Recipient: rfc822; Gone@Example.com\r\nAction: failed\r\nStatus: 5.1.1\r\n\
--x--\r\n";
        assert_eq!(
            parse(dsn).kind,
            Kind::Bounce {
                failed: vec!["gone@example.com".into()]
            }
        );
        let auto = b"From: x@example.com\r\nAuto-Submitted: auto-replied\r\nSubject: Away\r\n\r\nOut of office\r\n";
        assert_eq!(parse(auto).kind, Kind::AutoReply);
    }

    #[test]
    fn hostile_structures_are_refused() {
        let mut deep = String::from("From: x@example.com\r\nSubject: deep\r\n");
        for i in 0..40 {
            deep.push_str(&format!(
                "Content-Type: multipart/mixed; boundary=\"b{i}\"\r\n\r\n--b{i}\r\n"
            ));
        }
        deep.push_str("Content-Type: text/plain\r\n\r\nx\r\n");
        assert!(check_structure(deep.as_bytes()).is_err());
        let mut wide = String::from(
            "From: x@example.com\r\nContent-Type: multipart/mixed; boundary=\"w\"\r\n\r\n",
        );
        for _ in 0..(MAX_PARTS + 10) {
            wide.push_str("--w\r\nContent-Type: text/plain\r\n\r\nx\r\n");
        }
        wide.push_str("--w--\r\n");
        assert!(check_structure(wide.as_bytes()).is_err());
        assert!(check_structure(THREAD_REPLY).is_ok());
        assert_eq!(sanitise_filename("..\\..\\x\u{7}.exe"), "x.exe");
    }
}
