//! The bridge's settings. `salon serve` reads them from its `[bridges.email]` section;
//! the standalone `salon-email` from its own TOML file. Every key has a default.

use std::{net::SocketAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmailConfig {
    /// Run the bridge inside `salon serve`.
    pub enabled: bool,
    /// The mail domain the bridge receives for (`alice@<domain>` reaches `@alice`); the
    /// homeserver's server name when unset.
    pub domain: Option<String>,
    /// The name the listener gives itself in its greeting and `EHLO` answer.
    pub hostname: Option<String>,
    /// Where the homeserver's transactions arrive (loopback; port 0 picks one).
    pub appservice_listen: SocketAddr,
    pub smtp: SmtpListenConfig,
    /// An LMTP listener, for a Postfix or Exim in front (`lmtp:inet:127.0.0.1:2424`).
    pub lmtp: Option<SocketAddr>,
    pub relay: RelayConfig,
    pub inbound: InboundConfig,
    pub auth: AuthConfig,
    pub dkim: DkimConfig,
}

impl Default for EmailConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            domain: None,
            hostname: None,
            appservice_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            smtp: SmtpListenConfig::default(),
            lmtp: None,
            relay: RelayConfig::default(),
            inbound: InboundConfig::default(),
            auth: AuthConfig::default(),
            dkim: DkimConfig::default(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmtpListenConfig {
    /// The SMTP listener (`0.0.0.0:25` when it is the organisation's MX).
    pub listen: Option<SocketAddr>,
    /// PEM certificate chain and key for STARTTLS; without them STARTTLS is not offered.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// The largest message accepted, in bytes (announced with `SIZE`).
    pub max_message_bytes: usize,
    /// The largest header block accepted, in bytes.
    pub max_header_bytes: usize,
    pub max_recipients: usize,
    /// Connections served at once; more wait to be accepted.
    pub max_connections: usize,
    /// Seconds a client may stay silent between commands.
    pub command_timeout_secs: u64,
    /// Messages one sender address may deliver per minute (0: unlimited).
    pub per_sender_per_minute: u32,
    /// Sender addresses or `@domain`s always refused.
    pub deny_senders: Vec<String>,
    /// When not empty, only these sender addresses or `@domain`s are accepted.
    pub allow_senders: Vec<String>,
}

impl Default for SmtpListenConfig {
    fn default() -> Self {
        Self {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 2525))),
            tls_cert: None,
            tls_key: None,
            max_message_bytes: 25 * 1024 * 1024,
            max_header_bytes: 256 * 1024,
            max_recipients: 100,
            max_connections: 200,
            command_timeout_secs: 300,
            per_sender_per_minute: 60,
            deny_senders: Vec::new(),
            allow_senders: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RelayTls {
    /// Plain SMTP (a relay on loopback).
    None,
    /// STARTTLS, required.
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// The SMTP relay outbound mail goes through; without it mail to people outside waits
    /// in the queue.
    pub host: Option<String>,
    pub port: u16,
    pub tls: RelayTls,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Seconds for one delivery attempt.
    pub timeout_secs: u64,
    /// Seconds before the first retry after a temporary failure; doubles each time, up
    /// to an hour.
    pub retry_secs: u64,
    /// Give up (and say so in the room) after this many hours of temporary failures.
    pub give_up_hours: u64,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            host: None,
            port: 25,
            tls: RelayTls::None,
            username: None,
            password: None,
            timeout_secs: 60,
            retry_secs: 30,
            give_up_hours: 48,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct InboundConfig {
    /// Leave out the quoted history of replies (the room already holds it).
    pub trim_quotes: bool,
    /// The name of the space new email rooms are put in.
    pub space_name: String,
}

impl Default for InboundConfig {
    fn default() -> Self {
        Self {
            trim_quotes: true,
            space_name: "Email".to_owned(),
        }
    }
}

/// What happens to mail that fails DMARC when its domain asks for quarantine or
/// rejection.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnDmarcFail {
    /// Bridge it as usual; the `Authentication-Results` header records the failure.
    Tag,
    /// Put it in the review room instead of its recipients' rooms.
    Quarantine,
    /// Refuse it at the end of `DATA` (`550 5.7.1`).
    Reject,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Check SPF, DKIM and DMARC on every inbound message.
    pub enabled: bool,
    /// The DNS resolver to ask (`127.0.0.1:53`); the system's when unset.
    pub dns: Option<SocketAddr>,
    pub on_dmarc_fail: OnDmarcFail,
    /// Who is invited to the review room where quarantined mail goes.
    pub reviewers: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            dns: None,
            on_dmarc_fail: OnDmarcFail::Quarantine,
            reviewers: Vec::new(),
        }
    }
}

/// DKIM signing of outbound mail (publish the public key at
/// `<selector>._domainkey.<domain>`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DkimConfig {
    /// PEM file of the RSA private key (PKCS#1 or PKCS#8); no signing without it.
    pub key: Option<PathBuf>,
    pub selector: String,
}

impl Default for DkimConfig {
    fn default() -> Self {
        Self {
            key: None,
            selector: "salon".to_owned(),
        }
    }
}
