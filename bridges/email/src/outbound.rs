//! Mail to people outside: composed from a Matrix message (threaded, plain text and HTML,
//! attachments), put in a persistent queue in the same write that records it, and
//! delivered through the configured relay with `lettre`. Temporary failures are retried
//! with exponential backoff until `give_up_hours`; permanent ones (and giving up) are
//! reported in the room.

use std::{sync::Arc, time::Duration};

use lettre::{
    AsyncSmtpTransport, AsyncTransport, Tokio1Executor,
    message::{Attachment, Mailbox, MultiPart, SinglePart, header::ContentType},
    transport::smtp::{
        authentication::Credentials,
        client::{Tls, TlsParameters},
    },
};
use salon_appservice_kit::{Kit, Store, ruma::RoomId, store::Batch};
use serde::{Deserialize, Serialize};

use crate::config::{RelayConfig, RelayTls};

/// Signs outbound mail: returns the `DKIM-Signature: …` header for a message.
pub type Signer = Box<dyn Fn(&[u8]) -> anyhow::Result<String> + Send + Sync>;

/// A DKIM signer (RSA-SHA256, relaxed) for `domain` from a PEM private key.
pub fn dkim_signer(key: &std::path::Path, domain: &str, selector: &str) -> anyhow::Result<Signer> {
    use mail_auth::{
        common::{
            crypto::{RsaKey, Sha256},
            headers::HeaderWriter,
        },
        dkim::DkimSigner,
    };
    use rustls::pki_types::{PrivateKeyDer, pem::PemObject};
    let der =
        PrivateKeyDer::from_pem_file(key).map_err(|e| anyhow::anyhow!("{}: {e}", key.display()))?;
    let key = RsaKey::<Sha256>::from_key_der(der)
        .map_err(|e| anyhow::anyhow!("{}: {e}", key.display()))?;
    let signer = DkimSigner::from_key(key)
        .domain(domain)
        .selector(selector)
        .headers([
            "From",
            "To",
            "Cc",
            "Subject",
            "Date",
            "Message-ID",
            "In-Reply-To",
            "References",
            "Reply-To",
            "MIME-Version",
            "Content-Type",
        ]);
    Ok(Box::new(move |raw| {
        Ok(signer
            .sign(raw)
            .map_err(|e| anyhow::anyhow!("DKIM signing: {e}"))?
            .to_header())
    }))
}

const OUT: &str = "out:";
const OUT_RAW: &str = "outraw:";

/// What a composed mail needs.
pub struct Draft<'a> {
    pub from_name: &'a str,
    pub from_address: &'a str,
    pub to: Vec<(Option<String>, String)>,
    pub subject: &'a str,
    pub message_id: &'a str,
    pub references: &'a [String],
    pub text: &'a str,
    pub html: Option<&'a str>,
    pub files: Vec<(String, String, Vec<u8>)>,
}

fn mailbox(name: Option<String>, address: &str) -> anyhow::Result<Mailbox> {
    Ok(Mailbox::new(name, address.parse()?))
}

/// The RFC 5322 message for a draft.
pub fn compose(d: &Draft<'_>) -> anyhow::Result<Vec<u8>> {
    let from = mailbox(Some(d.from_name.to_owned()), d.from_address)?;
    let mut b = lettre::Message::builder()
        .from(from.clone())
        .reply_to(from)
        .subject(d.subject)
        .message_id(Some(format!("<{}>", d.message_id)))
        .date_now();
    for (name, address) in &d.to {
        b = b.to(mailbox(name.clone(), address)?);
    }
    if let Some(last) = d.references.last() {
        b = b.in_reply_to(format!("<{last}>"));
        let refs: Vec<String> = d.references.iter().map(|r| format!("<{r}>")).collect();
        b = b.references(refs.join(" "));
    }
    let message = match (d.html, d.files.is_empty()) {
        (None, true) => b.singlepart(SinglePart::plain(d.text.to_owned()))?,
        (Some(html), true) => b.multipart(MultiPart::alternative_plain_html(
            d.text.to_owned(),
            html.to_owned(),
        ))?,
        (html, false) => {
            let mut mixed = match html {
                Some(html) => MultiPart::mixed().multipart(MultiPart::alternative_plain_html(
                    d.text.to_owned(),
                    html.to_owned(),
                )),
                None => MultiPart::mixed().singlepart(SinglePart::plain(d.text.to_owned())),
            };
            for (name, mime, bytes) in &d.files {
                let ct = ContentType::parse(mime)
                    .unwrap_or_else(|_| ContentType::parse("application/octet-stream").unwrap());
                mixed = mixed.singlepart(Attachment::new(name.clone()).body(bytes.clone(), ct));
            }
            b.multipart(mixed)?
        }
    };
    Ok(message.formatted())
}

/// One queued mail.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Outgoing {
    pub room_id: String,
    pub event_id: String,
    pub from: String,
    pub rcpts: Vec<String>,
    pub attempts: u32,
    pub first_attempt_ms: u64,
    pub next_attempt_ms: u64,
}

#[derive(Clone)]
pub struct Queue {
    store: Store,
    pub wake: Arc<tokio::sync::Notify>,
}

impl Queue {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            wake: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Add a mail to the batch that records its event as sent; the key is the event's,
    /// so one event is never queued twice.
    pub fn enqueue(&self, batch: &mut Batch, o: &Outgoing, raw: &[u8]) -> anyhow::Result<()> {
        batch.put(format!("{OUT}{}", o.event_id), serde_json::to_vec(o)?);
        batch.put(format!("{OUT_RAW}{}", o.event_id), raw);
        Ok(())
    }

    pub fn contains(&self, event_id: &str) -> anyhow::Result<bool> {
        Ok(self.store.get(format!("{OUT}{event_id}"))?.is_some()
            || self.store.get(format!("sent:{event_id}"))?.is_some())
    }

    fn pending(&self) -> anyhow::Result<Vec<Outgoing>> {
        self.store
            .scan_prefix(OUT.as_bytes())?
            .into_iter()
            .map(|(_, v)| Ok(serde_json::from_slice(&v)?))
            .collect()
    }

    pub fn waiting(&self) -> anyhow::Result<usize> {
        Ok(self.pending()?.len())
    }

    fn finish(&self, o: &Outgoing) -> anyhow::Result<()> {
        let mut batch = Batch::default();
        batch.delete(format!("{OUT}{}", o.event_id));
        batch.delete(format!("{OUT_RAW}{}", o.event_id));
        batch.put(format!("sent:{}", o.event_id), b"1");
        self.store.commit(batch)
    }
}

fn transport(c: &RelayConfig, host: &str) -> anyhow::Result<AsyncSmtpTransport<Tokio1Executor>> {
    let mut b = match c.tls {
        RelayTls::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host),
        RelayTls::Starttls => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
            .tls(Tls::Required(TlsParameters::new(host.to_owned())?)),
        RelayTls::Tls => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
            .tls(Tls::Wrapper(TlsParameters::new(host.to_owned())?)),
    }
    .port(c.port)
    .timeout(Some(Duration::from_secs(c.timeout_secs.max(1))));
    if let (Some(u), Some(p)) = (&c.username, &c.password) {
        b = b.credentials(Credentials::new(u.clone(), p.clone()));
    }
    Ok(b.build())
}

/// Seconds before attempt `n + 1` (30 s doubling, at most an hour).
fn backoff(attempts: u32, base_secs: u64) -> u64 {
    (base_secs.max(1) << attempts.min(12)).min(3600)
}

/// Deliver queued mail until told to stop.
pub async fn run(
    kit: Arc<Kit>,
    queue: Queue,
    relay: RelayConfig,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let transport = match &relay.host {
        Some(host) => match transport(&relay, host) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::error!(error = %e, "the mail relay settings are unusable; outbound mail waits");
                None
            }
        },
        None => {
            tracing::info!("no mail relay configured; outbound mail waits in the queue");
            None
        }
    };
    loop {
        let notified = queue.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let mut next_due: Option<u64> = None;
        if let Some(transport) = &transport {
            let pending = match queue.pending() {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "the outbound queue is unreadable");
                    Vec::new()
                }
            };
            for mut o in pending {
                if *stop.borrow() {
                    return;
                }
                let now = crate::smtp::now_ms();
                if o.next_attempt_ms > now {
                    next_due =
                        Some(next_due.map_or(o.next_attempt_ms, |n| n.min(o.next_attempt_ms)));
                    continue;
                }
                if let Some(due) = attempt(&kit, &queue, transport, &relay, &mut o).await {
                    next_due = Some(next_due.map_or(due, |n| n.min(due)));
                }
            }
        }
        let wait = next_due
            .map(|due| Duration::from_millis(due.saturating_sub(crate::smtp::now_ms()).max(10)))
            .unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
    }
}

/// One delivery attempt; returns when to try again, if the mail is still queued.
async fn attempt(
    kit: &Kit,
    queue: &Queue,
    transport: &AsyncSmtpTransport<Tokio1Executor>,
    relay: &RelayConfig,
    o: &mut Outgoing,
) -> Option<u64> {
    let raw = match queue.store.get(format!("{OUT_RAW}{}", o.event_id)) {
        Ok(Some(r)) => r,
        Ok(None) => {
            tracing::error!(event_id = %o.event_id, "a queued mail has lost its content");
            let _ = queue.finish(o);
            return None;
        }
        Err(e) => {
            tracing::error!(error = %e, "the outbound queue is unreadable");
            return Some(crate::smtp::now_ms() + 1000);
        }
    };
    let envelope = match (|| -> anyhow::Result<lettre::address::Envelope> {
        let to = o
            .rcpts
            .iter()
            .map(|r| r.parse())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(lettre::address::Envelope::new(Some(o.from.parse()?), to)?)
    })() {
        Ok(e) => e,
        Err(e) => {
            report(kit, o, &format!("it could not be addressed ({e})")).await;
            let _ = queue.finish(o);
            return None;
        }
    };
    match transport.send_raw(&envelope, &raw).await {
        Ok(_) => {
            tracing::info!(event_id = %o.event_id, rcpts = o.rcpts.len(), "mail delivered to the relay");
            if let Err(e) = queue.finish(o) {
                tracing::error!(error = %e, "cannot record a delivered mail");
            }
            None
        }
        Err(e) if e.is_permanent() => {
            tracing::warn!(event_id = %o.event_id, error = %e, "the relay refused a mail");
            report(kit, o, &format!("the mail server refused it: {e}")).await;
            let _ = queue.finish(o);
            None
        }
        Err(e) => {
            let now = crate::smtp::now_ms();
            if o.first_attempt_ms == 0 {
                o.first_attempt_ms = now;
            }
            o.attempts += 1;
            let elapsed_h = (now - o.first_attempt_ms) / 3_600_000;
            if elapsed_h >= relay.give_up_hours {
                report(
                    kit,
                    o,
                    &format!("it could not be sent for {elapsed_h} hours: {e}"),
                )
                .await;
                let _ = queue.finish(o);
                return None;
            }
            o.next_attempt_ms = now + backoff(o.attempts - 1, relay.retry_secs) * 1000;
            tracing::info!(event_id = %o.event_id, attempts = o.attempts, error = %e, "mail delivery failed for now; will retry");
            let mut batch = Batch::default();
            if let Ok(v) = serde_json::to_vec(o) {
                batch.put(format!("{OUT}{}", o.event_id), v);
                if let Err(e) = queue.store.commit(batch) {
                    tracing::error!(error = %e, "cannot record a delivery attempt");
                }
            }
            Some(o.next_attempt_ms)
        }
    }
}

async fn report(kit: &Kit, o: &Outgoing, why: &str) {
    let Ok(room) = RoomId::parse(&o.room_id) else {
        return;
    };
    let text = format!(
        "Your message to {} was not delivered: {why}.",
        o.rcpts.join(", ")
    );
    if let Err(e) = kit.bot.send_notice(&room, &text, None).await {
        tracing::warn!(error = %e, "cannot report a failed mail in its room");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composed_mail_threads_and_carries_both_bodies_and_files() {
        let refs = vec![
            "root@example.com".to_owned(),
            "reply-1@example.com".to_owned(),
        ];
        let raw = compose(&Draft {
            from_name: "Alice Martin (Salon)",
            from_address: "reply+abc@salon.test",
            to: vec![(Some("Bob Smith".into()), "bob@example.com".into())],
            subject: "Re: Budget",
            message_id: "x1.salon@salon.test",
            references: &refs,
            text: "Yes, agreed.",
            html: Some("<p>Yes, <b>agreed</b>.</p>"),
            files: vec![(
                "plan.pdf".into(),
                "application/pdf".into(),
                b"%PDF-1.4".to_vec(),
            )],
        })
        .unwrap();
        let m = mail_parser::MessageParser::default().parse(&raw).unwrap();
        assert_eq!(m.message_id(), Some("x1.salon@salon.test"));
        assert_eq!(m.in_reply_to().as_text(), Some("reply-1@example.com"));
        assert_eq!(
            m.references().as_text_list().map(|l| l.len()),
            Some(2),
            "{}",
            String::from_utf8_lossy(&raw)
        );
        let from = m.from().unwrap().first().unwrap();
        assert_eq!(from.name(), Some("Alice Martin (Salon)"));
        assert_eq!(from.address(), Some("reply+abc@salon.test"));
        assert_eq!(
            m.reply_to().unwrap().first().unwrap().address(),
            Some("reply+abc@salon.test")
        );
        assert_eq!(m.body_text(0).unwrap().trim(), "Yes, agreed.");
        assert!(m.body_html(0).unwrap().contains("<b>agreed</b>"));
        assert_eq!(m.attachment_count(), 1);
        assert_eq!(m.attachment(0).unwrap().contents(), b"%PDF-1.4");
    }

    #[test]
    fn backoff_doubles_to_an_hour() {
        assert_eq!(backoff(0, 30), 30);
        assert_eq!(backoff(1, 30), 60);
        assert_eq!(backoff(20, 30), 3600);
    }
}
