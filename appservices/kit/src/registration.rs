//! Appservice registrations: the standard YAML file every homeserver reads.

use std::path::Path;

use anyhow::Context;
pub use ruma::api::appservice::{Namespace, Namespaces, Registration, RegistrationInit};

/// Parse a registration; errors name the file, and the line and column when known.
pub fn parse(text: &str, origin: &str) -> anyhow::Result<Registration> {
    serde_yaml::from_str(text).map_err(|e| {
        let at = e
            .location()
            .map(|l| format!(" (line {}, column {})", l.line(), l.column()))
            .unwrap_or_default();
        anyhow::anyhow!("{origin}{at}: {e}")
    })
}

pub fn load(path: &Path) -> anyhow::Result<Registration> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {origin}"))?;
    parse(&text, &origin)
}

pub fn random_token() -> String {
    use rand::{Rng, distributions::Alphanumeric};
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(40)
        .map(char::from)
        .collect()
}

/// What an appservice claims, to generate its registration from.
pub struct Template<'a> {
    pub id: &'a str,
    pub url: Option<String>,
    pub sender_localpart: &'a str,
    /// Regexes of the user ids it owns exclusively (ghosts), e.g. `@_email_.*:example.org`.
    pub users: Vec<String>,
    pub aliases: Vec<String>,
    pub protocols: Vec<String>,
    pub receive_ephemeral: bool,
}

pub fn generate(t: &Template<'_>) -> Registration {
    let mut namespaces = Namespaces::new();
    namespaces.users = t
        .users
        .iter()
        .map(|r| Namespace::new(true, r.clone()))
        .collect();
    namespaces.aliases = t
        .aliases
        .iter()
        .map(|r| Namespace::new(true, r.clone()))
        .collect();
    let mut reg: Registration = RegistrationInit {
        id: t.id.to_owned(),
        url: t.url.clone(),
        as_token: random_token(),
        hs_token: random_token(),
        sender_localpart: t.sender_localpart.to_owned(),
        namespaces,
        rate_limited: Some(false),
        protocols: (!t.protocols.is_empty()).then(|| t.protocols.clone()),
    }
    .into();
    reg.receive_ephemeral = t.receive_ephemeral;
    reg
}

/// Read the registration at `path`, or generate one from `template`, write it there
/// (for the homeserver's administrator to install) and return it.
pub fn load_or_generate(path: &Path, template: &Template<'_>) -> anyhow::Result<Registration> {
    if path.exists() {
        return load(path);
    }
    let reg = generate(template);
    let yaml = serde_yaml::to_string(&reg)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(path, yaml).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(reg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_registrations_round_trip_through_yaml() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reg.yaml");
        let t = Template {
            id: "ping",
            url: Some("http://127.0.0.1:9000".into()),
            sender_localpart: "ping",
            users: vec!["@_ping_.*:example\\.org".into()],
            aliases: vec![],
            protocols: vec![],
            receive_ephemeral: false,
        };
        let a = load_or_generate(&path, &t).unwrap();
        let b = load_or_generate(&path, &t).unwrap();
        assert_eq!(a.as_token, b.as_token, "a second start reads the same file");
        assert_ne!(a.as_token, a.hs_token);
        assert_eq!(b.namespaces.users[0].regex, "@_ping_.*:example\\.org");
        let err = parse("id: [", "bad.yaml").unwrap_err().to_string();
        assert!(err.starts_with("bad.yaml"), "{err}");
    }
}
