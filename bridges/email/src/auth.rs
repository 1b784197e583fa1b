//! Who really sent a message: SPF for the connecting address and envelope sender, DKIM
//! signatures, and the From domain's DMARC policy over both (with Stalwart's
//! `mail-auth`). The outcome is written into the message as an `Authentication-Results`
//! header, and a message that fails a domain's `quarantine`/`reject` policy is refused,
//! quarantined or only tagged, as the bridge is configured.

use std::net::{IpAddr, SocketAddr};

use mail_auth::{
    AuthenticatedMessage, AuthenticationResults, DmarcResult, MessageAuthenticator, Parameters,
    common::headers::HeaderWriter,
    dmarc::{Policy, verify::DmarcParameters},
    hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts},
    spf::verify::SpfParameters,
};

use crate::config::OnDmarcFail;

/// The verdict on one message.
#[derive(Debug, PartialEq)]
pub struct Outcome {
    /// The `Authentication-Results: …` header to put on top of the message.
    pub header: String,
    /// DMARC failed and the From domain asks for quarantine or rejection.
    pub failed: bool,
    pub from_domain: String,
}

pub struct Checker {
    authenticator: MessageAuthenticator,
    hostname: String,
    pub on_fail: OnDmarcFail,
}

/// The organisational domain for DMARC's relaxed alignment: the registrable part of a
/// name (`mail.example.co.uk` → `example.co.uk`), by the common second-level rule.
pub fn organisational_domain(domain: &str) -> &str {
    let labels: Vec<&str> = domain.split('.').collect();
    if labels.len() <= 2 {
        return domain;
    }
    let second = labels[labels.len() - 2];
    let keep = if labels[labels.len() - 1].len() == 2
        && matches!(
            second,
            "co" | "com" | "org" | "net" | "ac" | "gov" | "edu" | "gv" | "or" | "ne"
        ) {
        3
    } else {
        2
    };
    let skip: usize = labels[..labels.len().saturating_sub(keep)]
        .iter()
        .map(|l| l.len() + 1)
        .sum();
    &domain[skip..]
}

impl Checker {
    /// A checker asking `dns` (a resolver on `ip:port`), or the system's resolvers.
    pub fn new(
        dns: Option<SocketAddr>,
        hostname: &str,
        on_fail: OnDmarcFail,
    ) -> anyhow::Result<Self> {
        let authenticator = match dns {
            Some(addr) => {
                let config = ResolverConfig::from_parts(
                    None,
                    vec![],
                    NameServerConfigGroup::from_ips_clear(&[addr.ip()], addr.port(), true),
                );
                let mut opts = ResolverOpts::default();
                opts.timeout = std::time::Duration::from_secs(5);
                opts.attempts = 2;
                MessageAuthenticator::new(config, opts)?
            }
            None => MessageAuthenticator::new_system_conf()?,
        };
        Ok(Self {
            authenticator,
            hostname: hostname.to_owned(),
            on_fail,
        })
    }

    pub async fn check(&self, raw: &[u8], ip: IpAddr, helo: &str, mail_from: &str) -> Outcome {
        let Some(message) = AuthenticatedMessage::parse(raw) else {
            return Outcome {
                header: format!(
                    "Authentication-Results: {}; none (unparsable message)\r\n",
                    self.hostname
                ),
                failed: false,
                from_domain: String::new(),
            };
        };
        let from_domain = message
            .from
            .first()
            .and_then(|f| f.rsplit_once('@'))
            .map(|(_, d)| d.to_ascii_lowercase())
            .unwrap_or_default();
        let dkim = self
            .authenticator
            .verify_dkim(Parameters::new(&message))
            .await;
        let spf_params = if mail_from.is_empty() {
            SpfParameters::verify_ehlo(ip, helo, &self.hostname)
        } else {
            SpfParameters::verify_mail_from(ip, helo, &self.hostname, mail_from)
        };
        let spf = self
            .authenticator
            .verify_spf(Parameters::new(spf_params))
            .await;
        let mail_from_domain = mail_from.rsplit_once('@').map(|(_, d)| d).unwrap_or(helo);
        let dmarc = self
            .authenticator
            .verify_dmarc(Parameters::new(
                DmarcParameters::new(&message, &dkim, mail_from_domain, &spf)
                    .with_domain_suffix_fn(organisational_domain),
            ))
            .await;
        // Fails when neither aligned identifier passes (an unsigned message has no DKIM
        // result at all); a DNS failure is not held against the sender.
        let results = [dmarc.dkim_result(), dmarc.spf_result()];
        let failed = !results.iter().any(|r| **r == DmarcResult::Pass)
            && !results
                .iter()
                .any(|r| matches!(r, DmarcResult::TempError(_)))
            && matches!(dmarc.policy(), Policy::Quarantine | Policy::Reject);
        tracing::debug!(dkim = ?dmarc.dkim_result(), spf = ?dmarc.spf_result(), policy = ?dmarc.policy(), spf_raw = ?spf.result(), "authentication checked");
        let header = AuthenticationResults::new(&self.hostname)
            .with_dkim_results(&dkim, &from_domain)
            .with_spf_mailfrom_result(&spf, ip, mail_from, helo)
            .with_dmarc_result(&dmarc)
            .to_header();
        Outcome {
            header,
            failed,
            from_domain,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn organisational_domains() {
        assert_eq!(organisational_domain("example.com"), "example.com");
        assert_eq!(organisational_domain("mail.example.com"), "example.com");
        assert_eq!(organisational_domain("a.b.example.co.uk"), "example.co.uk");
        assert_eq!(organisational_domain("localhost"), "localhost");
    }
}
