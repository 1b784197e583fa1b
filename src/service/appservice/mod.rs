//! Application services: their registrations, which users, aliases and rooms they
//! claim, and the requests the homeserver makes to them ([`sender`] pushes events,
//! [`client`] asks about users and aliases).
//!
//! Registrations come from YAML files in `appservices.registration_dir`, from the
//! database (`salon admin appservice register`), and from the bundled appservices that
//! `salon serve` runs. All are validated together: ids and tokens must be unique and
//! every namespace regex must compile.

pub mod client;
pub mod sender;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use parking_lot::RwLock;
use regex::Regex;
use ruma::{OwnedUserId, RoomAliasId, RoomId, ServerName, UserId, api::appservice::Registration};

use crate::{
    error::{Error, Result},
    storage::Db,
};

/// A registration ready to match ids against.
pub struct Appservice {
    pub registration: Registration,
    /// The appservice's own user (`sender_localpart`).
    pub sender: OwnedUserId,
    users: Vec<(Regex, bool)>,
    aliases: Vec<(Regex, bool)>,
    rooms: Vec<(Regex, bool)>,
    /// Where the registration came from, for messages.
    pub origin: String,
}

/// Why a registration was refused, naming the source and the field.
fn invalid(origin: &str, field: &str, why: impl std::fmt::Display) -> Error {
    Error::internal(format!("{origin}: {field}: {why}"))
}

fn compile(
    origin: &str,
    field: &str,
    list: &[ruma::api::appservice::Namespace],
) -> Result<Vec<(Regex, bool)>> {
    list.iter()
        .enumerate()
        .map(|(i, ns)| {
            // Anchored at the start like the reference implementation's `re.match`; a
            // namespace is about whole ids, not substrings anywhere.
            Regex::new(&format!("^(?:{})", ns.regex))
                .map(|r| (r, ns.exclusive))
                .map_err(|e| invalid(origin, &format!("{field}[{i}].regex"), e))
        })
        .collect()
}

impl Appservice {
    pub fn new(registration: Registration, server: &ServerName, origin: &str) -> Result<Self> {
        if registration.id.is_empty() {
            return Err(invalid(origin, "id", "must not be empty"));
        }
        for (field, token) in [
            ("as_token", &registration.as_token),
            ("hs_token", &registration.hs_token),
        ] {
            if token.len() < 16 {
                return Err(invalid(origin, field, "must be at least 16 characters"));
            }
        }
        if registration.as_token == registration.hs_token {
            return Err(invalid(origin, "hs_token", "must differ from as_token"));
        }
        if let Some(url) = &registration.url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(invalid(origin, "url", "must be an http(s) URL or null"));
        }
        let sender = UserId::parse_with_server_name(registration.sender_localpart.as_str(), server)
            .map_err(|e| invalid(origin, "sender_localpart", e))?;
        let ns = &registration.namespaces;
        let users = compile(origin, "namespaces.users", &ns.users)?;
        let aliases = compile(origin, "namespaces.aliases", &ns.aliases)?;
        let rooms = compile(origin, "namespaces.rooms", &ns.rooms)?;
        Ok(Self {
            sender,
            users,
            aliases,
            rooms,
            origin: origin.to_owned(),
            registration,
        })
    }

    pub fn id(&self) -> &str {
        &self.registration.id
    }

    /// Whether the user is in this appservice's user namespace (or is its own user).
    pub fn claims_user(&self, user: &UserId) -> bool {
        user == self.sender || self.users.iter().any(|(r, _)| r.is_match(user.as_str()))
    }

    pub fn claims_user_exclusively(&self, user: &UserId) -> bool {
        user == self.sender
            || self
                .users
                .iter()
                .any(|(r, exclusive)| *exclusive && r.is_match(user.as_str()))
    }

    pub fn claims_alias(&self, alias: &RoomAliasId) -> bool {
        self.aliases.iter().any(|(r, _)| r.is_match(alias.as_str()))
    }

    pub fn claims_alias_exclusively(&self, alias: &RoomAliasId) -> bool {
        self.aliases
            .iter()
            .any(|(r, exclusive)| *exclusive && r.is_match(alias.as_str()))
    }

    pub fn claims_room(&self, room: &RoomId) -> bool {
        self.rooms.iter().any(|(r, _)| r.is_match(room.as_str()))
    }

    pub fn rate_limited(&self) -> bool {
        self.registration.rate_limited.unwrap_or(true)
    }
}

/// Every registered appservice.
pub struct Appservices {
    db: Arc<Db>,
    server: ruma::OwnedServerName,
    dir: Option<PathBuf>,
    list: RwLock<Vec<Arc<Appservice>>>,
    /// Registrations added at run time (the bundled appservices), kept across reloads.
    bundled: RwLock<Vec<Registration>>,
}

/// Parse a registration file (YAML, the format every bridge ships).
pub fn parse_registration(text: &str, origin: &str) -> Result<Registration> {
    serde_yaml::from_str(text).map_err(|e| {
        let at = e
            .location()
            .map(|l| format!(" (line {}, column {})", l.line(), l.column()))
            .unwrap_or_default();
        Error::internal(format!("{origin}{at}: {e}"))
    })
}

impl Appservices {
    /// Load the registrations in `dir` (every `*.yaml`/`*.yml` file) and the database.
    pub fn load(db: Arc<Db>, server: &ServerName, dir: Option<&Path>) -> Result<Self> {
        let this = Self {
            db,
            server: server.to_owned(),
            dir: dir.map(Path::to_owned),
            list: RwLock::new(Vec::new()),
            bundled: RwLock::new(Vec::new()),
        };
        this.reload()?;
        Ok(this)
    }

    fn collect(&self) -> Result<Vec<Arc<Appservice>>> {
        let mut all = Vec::new();
        if let Some(dir) = &self.dir {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| Error::internal(format!("{}: cannot read: {e}", dir.display())))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                .collect();
            files.sort();
            for path in files {
                let origin = path.display().to_string();
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| Error::internal(format!("{origin}: cannot read: {e}")))?;
                let reg = parse_registration(&text, &origin)?;
                all.push(Arc::new(Appservice::new(reg, &self.server, &origin)?));
            }
        }
        for item in self.db.scan_prefix("appservices", b"") {
            let (k, v) = item?;
            let origin = format!(
                "registration {:?} in the database",
                String::from_utf8_lossy(&k)
            );
            let reg: Registration = serde_json::from_slice(&v)
                .map_err(|e| Error::internal(format!("{origin}: {e}")))?;
            all.push(Arc::new(Appservice::new(reg, &self.server, &origin)?));
        }
        for reg in self.bundled.read().iter() {
            let origin = format!("bundled appservice {:?}", reg.id);
            all.push(Arc::new(Appservice::new(
                reg.clone(),
                &self.server,
                &origin,
            )?));
        }
        check_unique(&all)?;
        Ok(all)
    }

    pub fn reload(&self) -> Result<()> {
        let all = self.collect()?;
        *self.list.write() = all;
        Ok(())
    }

    /// Register an appservice that runs inside this process.
    pub fn add_bundled(&self, registration: Registration) -> Result<Arc<Appservice>> {
        self.bundled.write().push(registration.clone());
        if let Err(e) = self.reload() {
            self.bundled.write().retain(|r| r.id != registration.id);
            return Err(e);
        }
        self.get(&registration.id)
            .ok_or_else(|| Error::internal("bundled appservice vanished"))
    }

    pub fn all(&self) -> Vec<Arc<Appservice>> {
        self.list.read().clone()
    }

    pub fn get(&self, id: &str) -> Option<Arc<Appservice>> {
        self.list.read().iter().find(|a| a.id() == id).cloned()
    }

    pub fn by_as_token(&self, token: &str) -> Option<Arc<Appservice>> {
        self.list
            .read()
            .iter()
            .find(|a| constant_time_eq(a.registration.as_token.as_bytes(), token.as_bytes()))
            .cloned()
    }

    /// The appservice that claims this user exclusively, if any.
    pub fn exclusive_owner_of_user(&self, user: &UserId) -> Option<Arc<Appservice>> {
        self.list
            .read()
            .iter()
            .find(|a| a.claims_user_exclusively(user))
            .cloned()
    }

    pub fn exclusive_owner_of_alias(&self, alias: &RoomAliasId) -> Option<Arc<Appservice>> {
        self.list
            .read()
            .iter()
            .find(|a| a.claims_alias_exclusively(alias))
            .cloned()
    }

    /// Store a registration in the database (the admin command; the server is stopped).
    pub fn store(&self, registration: &Registration) -> Result<()> {
        let candidate =
            Appservice::new(registration.clone(), &self.server, "the new registration")?;
        let mut all: Vec<Arc<Appservice>> = self
            .all()
            .into_iter()
            .filter(|a| a.id() != registration.id)
            .collect();
        all.push(Arc::new(candidate));
        check_unique(&all)?;
        self.db.put_durable(
            "appservices",
            registration.id.as_bytes(),
            &serde_json::to_vec(registration)?,
        )?;
        self.reload()
    }

    pub fn remove(&self, id: &str) -> Result<bool> {
        if !self.db.exists("appservices", id.as_bytes())? {
            return Ok(false);
        }
        let mut batch = crate::storage::Batch::default();
        batch.delete(&self.db, "appservices", id.as_bytes());
        self.db.commit(batch)?;
        self.reload()?;
        Ok(true)
    }
}

fn check_unique(all: &[Arc<Appservice>]) -> Result<()> {
    for (i, a) in all.iter().enumerate() {
        for b in &all[..i] {
            if a.id() == b.id() {
                return Err(invalid(
                    &a.origin,
                    "id",
                    format!("{:?} is also used by {}", a.id(), b.origin),
                ));
            }
            let (ra, rb) = (&a.registration, &b.registration);
            for (field, token) in [("as_token", &ra.as_token), ("hs_token", &ra.hs_token)] {
                if *token == rb.as_token || *token == rb.hs_token {
                    return Err(invalid(
                        &a.origin,
                        field,
                        format!("is also a token of {}", b.origin),
                    ));
                }
            }
            if a.sender == b.sender {
                return Err(invalid(
                    &a.origin,
                    "sender_localpart",
                    format!("is also the sender of {}", b.origin),
                ));
            }
        }
    }
    Ok(())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
id: email
url: "http://127.0.0.1:9000"
as_token: "as_token_as_token_1234"
hs_token: "hs_token_hs_token_1234"
sender_localpart: emailbot
rate_limited: false
namespaces:
  users:
    - exclusive: true
      regex: "@_email_.*:example\\.org"
  aliases: []
  rooms: []
"#;

    fn server() -> ruma::OwnedServerName {
        "example.org".try_into().unwrap()
    }

    #[test]
    fn a_standard_registration_loads_and_matches() {
        let reg = parse_registration(GOOD, "email.yaml").unwrap();
        let a = Appservice::new(reg, &server(), "email.yaml").unwrap();
        assert!(
            a.claims_user_exclusively(UserId::parse("@_email_bob:example.org").unwrap().as_ref())
        );
        assert!(a.claims_user(UserId::parse("@emailbot:example.org").unwrap().as_ref()));
        assert!(!a.claims_user(UserId::parse("@alice:example.org").unwrap().as_ref()));
        // Anchored: the pattern does not match in the middle of an id.
        assert!(!a.claims_user(UserId::parse("@x_@_email_y:example.org").unwrap().as_ref()));
        assert!(!a.rate_limited());
    }

    #[test]
    fn bad_registrations_name_the_file_and_field() {
        let err = parse_registration("id: [unclosed", "broken.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("broken.yaml") && err.contains("line"), "{err}");
        let err = parse_registration("id: x\nurl: null\n", "short.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("short.yaml") && err.contains("as_token"),
            "{err}"
        );
        let bad_regex = GOOD.replace("@_email_.*", "@_email_(");
        let reg = parse_registration(&bad_regex, "re.yaml").unwrap();
        let err = Appservice::new(reg, &server(), "re.yaml")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("re.yaml: namespaces.users[0].regex"), "{err}");
    }

    #[test]
    fn duplicate_tokens_are_refused() {
        let a = Arc::new(
            Appservice::new(
                parse_registration(GOOD, "a.yaml").unwrap(),
                &server(),
                "a.yaml",
            )
            .unwrap(),
        );
        let other = GOOD
            .replace("id: email", "id: other")
            .replace("emailbot", "otherbot");
        let b = Arc::new(
            Appservice::new(
                parse_registration(&other, "b.yaml").unwrap(),
                &server(),
                "b.yaml",
            )
            .unwrap(),
        );
        let err = check_unique(&[a, b]).unwrap_err().to_string();
        assert!(
            err.contains("b.yaml: as_token") && err.contains("a.yaml"),
            "{err}"
        );
    }
}
