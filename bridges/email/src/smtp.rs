//! The SMTP (RFC 5321) and LMTP (RFC 2033) listener.
//!
//! It speaks ESMTP with PIPELINING, SIZE, 8BITMIME, SMTPUTF8, ENHANCEDSTATUSCODES and
//! STARTTLS (when a certificate is configured). Recipients are checked at `RCPT TO`:
//! only the bridge's own domain is accepted (never an open relay) and only addresses the
//! bridge can deliver. A message is answered `250` only once the spool has it on disk.
//! Every limit (line and message sizes, header block, recipients, silence, connections,
//! messages per sender per minute) gets the reply RFC 5321 gives it, never a crash.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader},
    net::TcpListener,
};

use crate::{
    address,
    config::{OnDmarcFail, SmtpListenConfig},
    spool::{Envelope, Spool},
};

/// The longest command line accepted (RFC 5321 allows 512 with extensions' parameters).
const MAX_COMMAND_LINE: usize = 4096;
/// The longest text line inside a message; longer ones make the message refused.
const MAX_DATA_LINE: usize = 1024 * 1024;
/// Errors after which the client is disconnected.
const MAX_ERRORS: u32 = 20;

/// What the bridge says about a `RCPT TO` address.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    Accept,
    /// Our domain, but nobody and nothing by that name.
    Unknown,
    /// Not our domain: we do not relay.
    NotOurs,
    /// Cannot tell now (the homeserver is unreachable): the sender should retry.
    Later,
}

pub trait Recipients: Send + Sync + 'static {
    fn check(&self, address: &str) -> impl Future<Output = Verdict> + Send;
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Protocol {
    Smtp,
    Lmtp,
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Messages per sender in the last minute.
#[derive(Default)]
struct SenderLimiter {
    seen: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl SenderLimiter {
    fn allowed(&self, sender: &str, per_minute: u32) -> bool {
        if per_minute == 0 {
            return true;
        }
        let mut seen = self.seen.lock();
        let now = Instant::now();
        if seen.len() > 10_000 {
            seen.retain(|_, q| q.back().is_some_and(|t| now - *t < Duration::from_secs(60)));
        }
        let q = seen.entry(sender.to_owned()).or_default();
        while q
            .front()
            .is_some_and(|t| now - *t >= Duration::from_secs(60))
        {
            q.pop_front();
        }
        (q.len() as u32) < per_minute
    }

    fn record(&self, sender: &str) {
        self.seen
            .lock()
            .entry(sender.to_owned())
            .or_default()
            .push_back(Instant::now());
    }
}

/// Everything a session needs, shared by all connections of a listener.
pub struct Server<R> {
    pub protocol: Protocol,
    pub hostname: String,
    pub domain: String,
    pub config: SmtpListenConfig,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub spool: Spool,
    pub recipients: Arc<R>,
    pub auth: Option<Arc<crate::auth::Checker>>,
    limiter: SenderLimiter,
}

impl<R: Recipients> Server<R> {
    pub fn new(
        protocol: Protocol,
        hostname: String,
        domain: String,
        config: SmtpListenConfig,
        tls: Option<tokio_rustls::TlsAcceptor>,
        spool: Spool,
        recipients: Arc<R>,
        auth: Option<Arc<crate::auth::Checker>>,
    ) -> Self {
        Self {
            protocol,
            hostname,
            domain,
            config,
            tls,
            spool,
            recipients,
            auth,
            limiter: SenderLimiter::default(),
        }
    }
}

/// A TLS acceptor from PEM files.
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| anyhow::anyhow!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("{}: {e}", cert.display()))?;
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| anyhow::anyhow!("{}: {e}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Accept connections until `stop` turns true.
pub async fn serve<R: Recipients>(
    server: Arc<Server<R>>,
    listener: TcpListener,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(
        server.config.max_connections.max(1),
    ));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stop.changed() => return,
        };
        let (socket, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept a mail connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let _ = socket.set_nodelay(true);
        let server = server.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = session(&server, Box::new(socket), peer).await {
                tracing::debug!(peer = %peer, error = %e, "mail session ended");
            }
        });
    }
}

struct Session {
    helo: Option<String>,
    mail_from: Option<String>,
    rcpts: Vec<String>,
    tls: bool,
    errors: u32,
}

impl Session {
    fn reset(&mut self) {
        self.mail_from = None;
        self.rcpts.clear();
    }
}

enum Line {
    Ok(Vec<u8>),
    /// Longer than allowed; the rest of it was read and dropped.
    TooLong,
    Eof,
}

/// Read one line (with its ending) of at most `limit` bytes.
async fn read_line(
    r: &mut BufReader<Box<dyn Stream>>,
    limit: usize,
    timeout: Duration,
) -> anyhow::Result<Line> {
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        let buf = tokio::time::timeout(timeout, r.fill_buf())
            .await
            .map_err(|_| anyhow::anyhow!("timeout"))??;
        if buf.is_empty() {
            return Ok(if line.is_empty() && !too_long {
                Line::Eof
            } else if too_long {
                Line::TooLong
            } else {
                Line::Ok(line)
            });
        }
        let (chunk, done) = match memchr(buf) {
            Some(i) => (&buf[..=i], true),
            None => (buf, false),
        };
        let n = chunk.len();
        if !too_long {
            if line.len() + n > limit {
                too_long = true;
                line.clear();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        r.consume(n);
        if done {
            return Ok(if too_long {
                Line::TooLong
            } else {
                Line::Ok(line)
            });
        }
    }
}

fn memchr(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b == b'\n')
}

async fn reply(r: &mut BufReader<Box<dyn Stream>>, text: &str) -> anyhow::Result<()> {
    let w = r.get_mut();
    w.write_all(text.as_bytes()).await?;
    w.write_all(b"\r\n").await?;
    w.flush().await?;
    Ok(())
}

/// `<addr> PARAM=…` after `FROM:`/`TO:`: the address (empty for `<>`) and parameters.
fn parse_path(arg: &str) -> Option<(String, Vec<String>)> {
    let arg = arg.trim_start();
    let rest = arg.strip_prefix('<')?;
    let end = rest.find('>')?;
    let mut path = &rest[..end];
    // A source route (`@a,@b:user@d`) is ignored, as RFC 5321 asks.
    if path.starts_with('@')
        && let Some((_, p)) = path.split_once(':')
    {
        path = p;
    }
    let params = rest[end + 1..]
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    Some((path.to_owned(), params))
}

async fn session<R: Recipients>(
    server: &Server<R>,
    stream: Box<dyn Stream>,
    peer: SocketAddr,
) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(server.config.command_timeout_secs.max(1));
    let mut r = BufReader::with_capacity(16 * 1024, stream);
    let mut s = Session {
        helo: None,
        mail_from: None,
        rcpts: Vec::new(),
        tls: false,
        errors: 0,
    };
    let greeting_proto = match server.protocol {
        Protocol::Smtp => "ESMTP",
        Protocol::Lmtp => "LMTP",
    };
    reply(
        &mut r,
        &format!("220 {} {greeting_proto} Salon mail bridge", server.hostname),
    )
    .await?;
    loop {
        if s.errors >= MAX_ERRORS {
            reply(&mut r, "421 4.7.0 Too many errors, closing").await?;
            return Ok(());
        }
        let line = match read_line(&mut r, MAX_COMMAND_LINE, timeout).await {
            Ok(Line::Ok(l)) => l,
            Ok(Line::TooLong) => {
                s.errors += 1;
                reply(&mut r, "500 5.5.6 Command line too long").await?;
                continue;
            }
            Ok(Line::Eof) => return Ok(()),
            Err(e) => {
                let _ = reply(&mut r, "421 4.4.2 Timeout, closing").await;
                return Err(e);
            }
        };
        let line = String::from_utf8_lossy(&line);
        let line = line.trim_end_matches(['\r', '\n']);
        let (verb, arg) = match line.split_once(' ') {
            Some((v, a)) => (v.to_ascii_uppercase(), a.trim()),
            None => (line.to_ascii_uppercase(), ""),
        };
        match verb.as_str() {
            "EHLO" | "HELO" | "LHLO" => {
                let allowed = match server.protocol {
                    Protocol::Smtp => verb != "LHLO",
                    Protocol::Lmtp => verb == "LHLO",
                };
                if !allowed {
                    s.errors += 1;
                    reply(&mut r, "500 5.5.1 Wrong greeting for this protocol").await?;
                    continue;
                }
                if arg.is_empty() {
                    s.errors += 1;
                    reply(&mut r, "501 5.5.4 A domain or address literal is required").await?;
                    continue;
                }
                s.helo = Some(arg.to_owned());
                s.reset();
                if verb == "HELO" {
                    reply(&mut r, &format!("250 {}", server.hostname)).await?;
                    continue;
                }
                let mut lines = vec![
                    server.hostname.clone(),
                    "PIPELINING".to_owned(),
                    format!("SIZE {}", server.config.max_message_bytes),
                    "8BITMIME".to_owned(),
                    "SMTPUTF8".to_owned(),
                    "ENHANCEDSTATUSCODES".to_owned(),
                ];
                if server.tls.is_some() && !s.tls {
                    lines.push("STARTTLS".to_owned());
                }
                let last = lines.len() - 1;
                let text: Vec<String> = lines
                    .iter()
                    .enumerate()
                    .map(|(i, l)| format!("250{}{l}", if i == last { ' ' } else { '-' }))
                    .collect();
                reply(&mut r, &text.join("\r\n")).await?;
            }
            "STARTTLS" => {
                let Some(acceptor) = server.tls.clone().filter(|_| !s.tls) else {
                    s.errors += 1;
                    reply(&mut r, "502 5.5.1 STARTTLS not available").await?;
                    continue;
                };
                if !arg.is_empty() {
                    reply(&mut r, "501 5.5.4 STARTTLS takes no parameters").await?;
                    continue;
                }
                // Commands pipelined after STARTTLS would be read as if they came
                // through TLS (command injection): refuse to go on.
                if !r.buffer().is_empty() {
                    reply(&mut r, "421 4.7.0 Data after STARTTLS, closing").await?;
                    return Ok(());
                }
                reply(&mut r, "220 2.0.0 Ready to start TLS").await?;
                let plain = r.into_inner();
                let tls = tokio::time::timeout(timeout, acceptor.accept(plain))
                    .await
                    .map_err(|_| anyhow::anyhow!("TLS handshake timeout"))??;
                r = BufReader::with_capacity(16 * 1024, Box::new(tls));
                s.tls = true;
                s.helo = None;
                s.reset();
            }
            "MAIL" => {
                if s.helo.is_none() {
                    s.errors += 1;
                    reply(&mut r, "503 5.5.1 Say hello first").await?;
                    continue;
                }
                if s.mail_from.is_some() {
                    s.errors += 1;
                    reply(&mut r, "503 5.5.1 Nested MAIL command").await?;
                    continue;
                }
                let Some((from, params)) = arg
                    .get(..5)
                    .filter(|p| p.eq_ignore_ascii_case("FROM:"))
                    .and_then(|_| parse_path(&arg[5..]))
                else {
                    s.errors += 1;
                    reply(&mut r, "501 5.5.4 Syntax: MAIL FROM:<address>").await?;
                    continue;
                };
                let from = if from.is_empty() {
                    String::new()
                } else {
                    match address::normalise(&from) {
                        Some(a) => a,
                        None => {
                            s.errors += 1;
                            reply(&mut r, "553 5.1.7 Malformed sender address").await?;
                            continue;
                        }
                    }
                };
                let mut refused = None;
                for p in &params {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    match k.to_ascii_uppercase().as_str() {
                        "SIZE" => match v.parse::<u64>() {
                            Ok(n) if n > server.config.max_message_bytes as u64 => {
                                refused = Some("552 5.3.4 Message too big for this system");
                            }
                            Ok(_) => {}
                            Err(_) => refused = Some("501 5.5.4 Bad SIZE parameter"),
                        },
                        "BODY" | "SMTPUTF8" | "AUTH" => {}
                        _ => refused = Some("555 5.5.4 Unsupported MAIL parameter"),
                    }
                }
                if refused.is_none() && !from.is_empty() {
                    let c = &server.config;
                    if address::listed(&from, &c.deny_senders)
                        || (!c.allow_senders.is_empty()
                            && !address::listed(&from, &c.allow_senders))
                    {
                        refused = Some("550 5.7.1 Sender refused by policy");
                    } else if !server.limiter.allowed(&from, c.per_sender_per_minute) {
                        refused =
                            Some("451 4.7.1 Too many messages from this sender, try again later");
                    }
                }
                if let Some(text) = refused {
                    s.errors += 1;
                    reply(&mut r, text).await?;
                    continue;
                }
                s.mail_from = Some(from);
                reply(&mut r, "250 2.1.0 Sender OK").await?;
            }
            "RCPT" => {
                if s.mail_from.is_none() {
                    s.errors += 1;
                    reply(&mut r, "503 5.5.1 MAIL first").await?;
                    continue;
                }
                let Some((to, _params)) = arg
                    .get(..3)
                    .filter(|p| p.eq_ignore_ascii_case("TO:"))
                    .and_then(|_| parse_path(&arg[3..]))
                else {
                    s.errors += 1;
                    reply(&mut r, "501 5.5.4 Syntax: RCPT TO:<address>").await?;
                    continue;
                };
                let Some(to) = address::normalise(&to) else {
                    s.errors += 1;
                    reply(&mut r, "553 5.1.3 Malformed recipient address").await?;
                    continue;
                };
                if s.rcpts.len() >= server.config.max_recipients {
                    reply(&mut r, "452 4.5.3 Too many recipients").await?;
                    continue;
                }
                let verdict = if address::domain_of(&to) != server.domain {
                    Verdict::NotOurs
                } else {
                    server.recipients.check(&to).await
                };
                let text = match verdict {
                    Verdict::Accept => {
                        if !s.rcpts.contains(&to) {
                            s.rcpts.push(to);
                        }
                        "250 2.1.5 Recipient OK"
                    }
                    Verdict::Unknown => {
                        s.errors += 1;
                        "550 5.1.1 No such recipient here"
                    }
                    Verdict::NotOurs => {
                        s.errors += 1;
                        "550 5.7.1 Relaying denied"
                    }
                    Verdict::Later => "451 4.4.3 Cannot check this recipient now, try again later",
                };
                reply(&mut r, text).await?;
            }
            "DATA" => {
                if s.mail_from.is_none() || s.rcpts.is_empty() {
                    s.errors += 1;
                    reply(&mut r, "503 5.5.1 No valid recipients").await?;
                    continue;
                }
                reply(&mut r, "354 End data with <CR><LF>.<CR><LF>").await?;
                let outcome = read_data(&mut r, server, timeout).await?;
                let text = match outcome {
                    Data::Eof => return Ok(()),
                    Data::Refused(text) => text.to_owned(),
                    Data::Message(raw) => 'accept: {
                        let (raw, verdict) = tokio::task::spawn_blocking(move || {
                            let v = crate::parse::check_structure(&raw);
                            (raw, v)
                        })
                        .await?;
                        if let Err(text) = verdict {
                            tracing::info!(peer = %peer, reason = text, "mail refused");
                            break 'accept text.to_owned();
                        }
                        let from = s.mail_from.clone().unwrap_or_default();
                        let helo = s.helo.clone().unwrap_or_default();
                        let mut raw = raw;
                        let mut quarantine = false;
                        if let Some(checker) = &server.auth {
                            let outcome = checker.check(&raw, peer.ip(), &helo, &from).await;
                            if outcome.failed {
                                tracing::info!(peer = %peer, from = %from, domain = %outcome.from_domain, action = ?checker.on_fail, "mail fails DMARC");
                                match checker.on_fail {
                                    OnDmarcFail::Reject => {
                                        break 'accept format!(
                                            "550 5.7.1 Rejected by the DMARC policy of {}",
                                            outcome.from_domain
                                        );
                                    }
                                    OnDmarcFail::Quarantine => quarantine = true,
                                    OnDmarcFail::Tag => {}
                                }
                            }
                            raw = [outcome.header.as_bytes(), &raw].concat();
                        }
                        let envelope = Envelope {
                            mail_from: from.clone(),
                            rcpts: s.rcpts.clone(),
                            helo,
                            peer: peer.to_string(),
                            tls: s.tls,
                            received_at: now_ms(),
                            quarantine,
                        };
                        let spool = server.spool.clone();
                        let stored =
                            tokio::task::spawn_blocking(move || spool.accept(&envelope, &raw))
                                .await
                                .map_err(anyhow::Error::from)
                                .and_then(|r| r);
                        match stored {
                            Ok(id) => {
                                if !from.is_empty() {
                                    server.limiter.record(&from);
                                }
                                tracing::info!(queue_id = %id, from = %from, rcpts = s.rcpts.len(), "mail accepted");
                                format!("250 2.0.0 Queued as {id}")
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "cannot spool a message");
                                "451 4.3.0 Cannot store the message now, try again later".to_owned()
                            }
                        }
                    }
                };
                match server.protocol {
                    Protocol::Smtp => reply(&mut r, &text).await?,
                    Protocol::Lmtp => {
                        // One answer per accepted recipient (RFC 2033).
                        let all = vec![text; s.rcpts.len()].join("\r\n");
                        reply(&mut r, &all).await?;
                    }
                }
                s.reset();
            }
            "RSET" => {
                s.reset();
                reply(&mut r, "250 2.0.0 OK").await?;
            }
            "NOOP" => reply(&mut r, "250 2.0.0 OK").await?,
            "VRFY" => reply(&mut r, "252 2.5.2 Cannot verify, but will try").await?,
            "HELP" => reply(&mut r, "214 2.0.0 See RFC 5321").await?,
            "QUIT" => {
                reply(&mut r, "221 2.0.0 Bye").await?;
                return Ok(());
            }
            "" => {
                s.errors += 1;
                reply(&mut r, "500 5.5.2 Empty command").await?;
            }
            _ => {
                s.errors += 1;
                reply(&mut r, "500 5.5.2 Command not recognised").await?;
            }
        }
    }
}

enum Data {
    Message(Vec<u8>),
    Refused(&'static str),
    Eof,
}

/// Read the message after `354` up to the lone dot, undoing dot-stuffing, and check
/// the size limits. Always reads to the end so the session stays in step.
async fn read_data<R>(
    r: &mut BufReader<Box<dyn Stream>>,
    server: &Server<R>,
    timeout: Duration,
) -> anyhow::Result<Data> {
    let max = server.config.max_message_bytes;
    let mut raw = Vec::new();
    let mut refused: Option<&'static str> = None;
    loop {
        let line = match read_line(r, MAX_DATA_LINE, timeout).await? {
            Line::Eof => return Ok(Data::Eof),
            Line::TooLong => {
                refused.get_or_insert("552 5.3.4 A line of the message is too long");
                continue;
            }
            Line::Ok(l) => l,
        };
        if line == b".\r\n" || line == b".\n" {
            break;
        }
        if refused.is_some() {
            continue;
        }
        let line = if line.starts_with(b".") {
            &line[1..]
        } else {
            &line[..]
        };
        if raw.len() + line.len() > max {
            refused = Some("552 5.3.4 Message too big for this system");
            raw = Vec::new();
            continue;
        }
        // Bare LF line endings are stored as CRLF, as a message on the wire has them.
        if line.ends_with(b"\n") && !line.ends_with(b"\r\n") {
            raw.extend_from_slice(&line[..line.len() - 1]);
            raw.extend_from_slice(b"\r\n");
        } else {
            raw.extend_from_slice(line);
        }
    }
    if let Some(text) = refused {
        return Ok(Data::Refused(text));
    }
    if header_block_len(&raw) > server.config.max_header_bytes {
        return Ok(Data::Refused("552 5.3.4 Header block too large"));
    }
    if raw.is_empty() {
        return Ok(Data::Refused("554 5.6.0 Empty message"));
    }
    Ok(Data::Message(raw))
}

/// The length of the header block (all of the message when it has no body).
fn header_block_len(raw: &[u8]) -> usize {
    raw.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(raw.len())
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_parse_with_parameters_and_source_routes() {
        assert_eq!(
            parse_path("<bob@example.com> SIZE=100 BODY=8BITMIME"),
            Some((
                "bob@example.com".into(),
                vec!["SIZE=100".into(), "BODY=8BITMIME".into()]
            ))
        );
        assert_eq!(parse_path("<>"), Some((String::new(), vec![])));
        assert_eq!(
            parse_path(" <@relay.example:bob@example.com>").unwrap().0,
            "bob@example.com"
        );
        assert_eq!(parse_path("bob@example.com"), None);
    }

    #[test]
    fn the_sender_limit_counts_a_minute() {
        let l = SenderLimiter::default();
        for _ in 0..3 {
            assert!(l.allowed("bob@example.com", 3));
            l.record("bob@example.com");
        }
        assert!(!l.allowed("bob@example.com", 3));
        assert!(l.allowed("carol@example.com", 3));
        assert!(l.allowed("bob@example.com", 0));
    }
}
