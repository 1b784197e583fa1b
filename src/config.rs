//! One typed configuration. Every key has a default, so Salon runs with no file at all.
//!
//! Sources, later ones winning: the built-in defaults, the TOML file given with
//! `--config`, then environment variables `SALON_<KEY>` where nested keys are joined
//! with a double underscore (`SALON_REGISTRATION__MODE=open`).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use ruma::{OwnedServerName, RoomVersionId};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The domain in every user id and room alias (`@alice:<server_name>`). Never change it
    /// once users exist.
    pub server_name: OwnedServerName,
    /// Address the client-server API listens on.
    pub listen: SocketAddr,
    /// Where the database, the signing key and media live.
    pub data_dir: PathBuf,
    /// The URL clients reach the server at, advertised in `.well-known`; derived from
    /// `listen` when unset.
    pub public_baseurl: Option<String>,
    pub log: LogConfig,
    pub registration: RegistrationConfig,
    pub rooms: RoomsConfig,
    pub limits: LimitsConfig,
    pub rate_limits: RateLimitsConfig,
    pub database: DatabaseConfig,
    pub media: MediaConfig,
    pub push: PushConfig,
    pub appservices: AppservicesConfig,
    pub ldap: LdapConfig,
    pub bridges: BridgesConfig,
    pub runtime: RuntimeConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server_name: "localhost".try_into().expect("valid default server name"),
            listen: SocketAddr::from(([127, 0, 0, 1], 8008)),
            data_dir: PathBuf::from("./data"),
            public_baseurl: None,
            log: LogConfig::default(),
            registration: RegistrationConfig::default(),
            rooms: RoomsConfig::default(),
            limits: LimitsConfig::default(),
            rate_limits: RateLimitsConfig::default(),
            database: DatabaseConfig::default(),
            media: MediaConfig::default(),
            push: PushConfig::default(),
            appservices: AppservicesConfig::default(),
            ldap: LdapConfig::default(),
            bridges: BridgesConfig::default(),
            runtime: RuntimeConfig::default(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Pretty,
    /// One JSON object per line, for log collectors.
    Json,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `salon=debug,tower_http=info`; `RUST_LOG` wins.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Pretty,
            level: "info".to_owned(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RegistrationMode {
    /// Nobody registers through the API; accounts come from the directory or an admin.
    Closed,
    /// Registration needs a token an admin created (`salon admin registration-token create`).
    #[default]
    Token,
    /// Anyone who can reach the server may register (`m.login.dummy`).
    Open,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistrationConfig {
    pub mode: RegistrationMode,
    /// Secret for Synapse-compatible `/_synapse/admin/v1/register`. When unset, one is
    /// generated on first start and kept in the data directory.
    pub shared_secret: Option<String>,
    /// Whether guests may register (`kind=guest`); not supported yet, so it must stay off.
    pub guest_access: bool,
    /// Shortest password accepted on registration and password change.
    pub min_password_length: usize,
}

impl Default for RegistrationConfig {
    fn default() -> Self {
        Self {
            mode: RegistrationMode::Token,
            shared_secret: None,
            guest_access: false,
            min_password_length: 8,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoomsConfig {
    /// Version of rooms created without an explicit `room_version`.
    pub default_version: RoomVersionId,
}

impl Default for RoomsConfig {
    fn default() -> Self {
        Self {
            default_version: RoomVersionId::V12,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest request body accepted by the client API, in bytes.
    pub max_request_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_request_bytes: 1024 * 1024,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitsConfig {
    /// Turn every limit below off (benchmarks, tests).
    pub enabled: bool,
    /// Login attempts: sustained rate per second and burst, per client address and per account.
    pub login: RateLimit,
    /// Registration attempts per client address.
    pub register: RateLimit,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

impl Default for RateLimitsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            login: RateLimit {
                per_second: 0.2,
                burst: 5,
            },
            register: RateLimit {
                per_second: 0.2,
                burst: 5,
            },
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// RocksDB block cache, in MiB.
    pub cache_mib: usize,
    /// The size of each of the two write-ahead log files prepared at each start for
    /// commits to overwrite in place (cheaper syncs than a growing file), in MiB; 0
    /// leaves the log as it is.
    pub prepared_log_mib: usize,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            cache_mib: 32,
            prepared_log_mib: 16,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// With one worker thread for each CPU the process may use, keep each worker on a
    /// CPU of its own, so that a burst of work (a message waking hundreds of `/sync`
    /// requests) runs on all of them at once even under a kernel that packs a lightly
    /// loaded machine's threads onto few CPUs. Off by default: elsewhere the kernel
    /// spreads them by itself, and a pinned worker cannot move away from a CPU that
    /// another process (a proxy in front of Salon) is using.
    pub pin_workers: bool,
    /// The same, only while a burst lasts: when a commit wakes many waiting requests
    /// at once, each worker is held to a CPU of its own until the burst no longer keeps
    /// it busy. On by default; it does nothing where workers and CPUs differ in number.
    pub spread_bursts: bool,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            pin_workers: false,
            spread_bursts: true,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MediaConfig {
    /// Largest file a user may upload, in bytes.
    pub max_upload_bytes: usize,
    /// Images with more pixels than this are not decoded for thumbnails (image bombs).
    pub max_thumbnail_pixels: u64,
    /// Serve media through the deprecated unauthenticated `/_matrix/media/v3/download`
    /// and `/thumbnail` routes too. Off by default, as the spec now advises ("frozen").
    pub legacy_unauthenticated: bool,
}

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            max_upload_bytes: 50 * 1024 * 1024,
            max_thumbnail_pixels: 40_000_000,
            legacy_unauthenticated: false,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PushConfig {
    /// Whether notifications are sent to push gateways at all.
    pub enabled: bool,
    /// How long one request to a push gateway may take, in seconds.
    pub timeout_secs: u64,
    /// Give up on a notification (and drop it) after this many hours of failures.
    pub max_retry_hours: u64,
    /// Push gateways must use https unless their host is listed here (tests, a gateway
    /// on the same machine).
    pub allow_http_hosts: Vec<String>,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            timeout_secs: 10,
            max_retry_hours: 24,
            allow_http_hosts: vec!["127.0.0.1".to_owned(), "localhost".to_owned()],
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AppservicesConfig {
    /// A directory of appservice registration files (`*.yaml`), loaded at start.
    pub registration_dir: Option<PathBuf>,
    /// The bundled ping bot (`@ping`): answers `!ping` in rooms it is invited to.
    pub ping: BundledAppservice,
}

/// The bundled bridges, run inside `salon serve` when enabled.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BridgesConfig {
    /// Email threads as rooms (docs/email.md).
    pub email: salon_email::EmailConfig,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BundledAppservice {
    /// Run it inside `salon serve`.
    pub enabled: bool,
    /// Where it listens for the homeserver's transactions (loopback; port 0 picks one).
    pub listen: SocketAddr,
}

impl Default for BundledAppservice {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LdapRemoved {
    /// Deactivate the account for good (its id is never reused).
    #[default]
    Deactivate,
    /// Log it out and refuse logins until the directory lists the user again.
    Lock,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LdapConfig {
    /// Check passwords against the directory and import its users.
    pub enabled: bool,
    /// `ldap://host:389` or `ldaps://host:636`.
    pub uri: String,
    /// Upgrade an `ldap://` connection with StartTLS.
    pub starttls: bool,
    /// PEM file of the CA that signed the directory's certificate (else the system's).
    pub ca_file: Option<PathBuf>,
    /// Seconds for connecting and for each operation.
    pub timeout_secs: u64,
    /// The service account that searches (search-then-bind); empty for anonymous search.
    pub bind_dn: Option<String>,
    pub bind_password: Option<String>,
    /// Where users are found.
    pub base_dn: String,
    /// Which entries are users: `(objectClass=inetOrgPerson)` for OpenLDAP,
    /// `(&(objectClass=user)(objectCategory=person))` for Active Directory.
    pub user_filter: String,
    /// The attribute a user logs in with: `uid` (OpenLDAP), `sAMAccountName` or
    /// `userPrincipalName` (Active Directory).
    pub login_attribute: String,
    /// The attribute that becomes the Matrix localpart (normalised).
    pub localpart_attribute: String,
    pub name_attribute: String,
    pub email_attribute: String,
    /// Bind directly as this DN instead of searching first, `{username}` replaced
    /// (e.g. `uid={username},ou=people,dc=example,dc=org`).
    pub bind_dn_template: Option<String>,
    /// Active Directory: refuse users whose `userAccountControl` marks them disabled.
    pub active_directory: bool,
    /// Whether directory users may also log in with a local password.
    pub allow_local_passwords: bool,
    /// Minutes between directory syncs (0: only `salon admin ldap sync`).
    pub sync_interval_minutes: u64,
    /// What happens to accounts that left the directory or were disabled there.
    pub on_removed: LdapRemoved,
    /// The local account that creates the group spaces and manages their members.
    pub groups_admin: String,
    /// Directory groups mapped to spaces and their rooms.
    pub groups: Vec<LdapGroup>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum GroupMembers {
    /// `groupOfNames` / AD groups: the group's `member` attribute lists user DNs.
    #[default]
    Member,
    /// `posixGroup`: the group's `memberUid` attribute lists login names.
    MemberUid,
    /// Active Directory with nested groups: users whose `memberOf` reaches the group
    /// through any chain of groups (LDAP_MATCHING_RULE_IN_CHAIN).
    NestedMemberOf,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LdapGroup {
    /// The group's DN.
    pub group: String,
    #[serde(default)]
    pub members: GroupMembers,
    /// Alias localpart of the space (`#<space>:<server_name>`), created when missing.
    pub space: String,
    /// The space's name (defaults to the alias localpart).
    #[serde(default)]
    pub name: Option<String>,
    /// Alias localparts of the rooms in the space, created when missing.
    #[serde(default)]
    pub rooms: Vec<String>,
    /// Join members directly (otherwise they are invited).
    #[serde(default = "yes")]
    pub auto_join: bool,
    /// A group whose members get `manager_power_level` in the space and its rooms.
    #[serde(default)]
    pub managers: Option<String>,
    #[serde(default = "fifty")]
    pub manager_power_level: i64,
}

fn yes() -> bool {
    true
}

fn fifty() -> i64 {
    50
}

impl Default for LdapConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            uri: "ldap://127.0.0.1:389".to_owned(),
            starttls: false,
            ca_file: None,
            timeout_secs: 5,
            bind_dn: None,
            bind_password: None,
            base_dn: String::new(),
            user_filter: "(objectClass=inetOrgPerson)".to_owned(),
            login_attribute: "uid".to_owned(),
            localpart_attribute: "uid".to_owned(),
            name_attribute: "cn".to_owned(),
            email_attribute: "mail".to_owned(),
            bind_dn_template: None,
            active_directory: false,
            allow_local_passwords: false,
            sync_interval_minutes: 60,
            on_removed: LdapRemoved::Deactivate,
            groups_admin: "directory".to_owned(),
            groups: Vec::new(),
        }
    }
}

/// A configuration problem, told with where it is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
}

const ENV_PREFIX: &str = "SALON_";

impl Config {
    /// Load defaults, then the file (if any), then `SALON_…` variables from `env`.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let (mut value, origin) = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                let value: toml::Table =
                    toml::from_str(&text).map_err(|e| ConfigError::Invalid {
                        origin: path.display().to_string(),
                        message: e.to_string(),
                    })?;
                (value, path.display().to_string())
            }
            None => (toml::Table::new(), "built-in defaults".to_owned()),
        };
        let mut overridden = Vec::new();
        for (key, raw) in env {
            let Some(rest) = key.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let segments: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
            if !TOP_LEVEL_KEYS.contains(&segments[0].as_str()) {
                // Other tools' variables that share the prefix are not ours to judge.
                continue;
            }
            set_path(&mut value, &segments, parse_env_value(&raw));
            overridden.push(key);
        }
        let origin = if overridden.is_empty() {
            origin
        } else {
            format!("{origin} with {}", overridden.join(", "))
        };
        let config: Config =
            toml::Value::Table(value)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Invalid {
                    origin: origin.clone(),
                    message: e.to_string().trim().to_owned(),
                })?;
        config
            .validate()
            .map_err(|message| ConfigError::Invalid { origin, message })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if self.rooms.default_version.rules().is_none() {
            return Err(format!(
                "rooms.default_version: room version {} is not supported",
                self.rooms.default_version
            ));
        }
        if !matches!(self.rooms.default_version.as_str(), "10" | "11" | "12") {
            return Err(
                "rooms.default_version: Salon creates rooms of version 10, 11 or 12".to_owned(),
            );
        }
        if self.registration.guest_access {
            // Guests would need their own restrictions (read-only rooms, no account data
            // from others…), which Salon does not enforce yet: refuse rather than pretend.
            return Err(
                "registration.guest_access: guest accounts are not supported yet".to_owned(),
            );
        }
        if self.limits.max_request_bytes < 65_536 {
            return Err(
                "limits.max_request_bytes: must be at least 65536 so that a full event fits"
                    .to_owned(),
            );
        }
        if self.database.prepared_log_mib > 1024 {
            return Err(
                "database.prepared_log_mib: at most 1024 (two files of this size are written at each start)"
                    .to_owned(),
            );
        }
        for (name, limit) in [
            ("login", self.rate_limits.login),
            ("register", self.rate_limits.register),
        ] {
            if !(limit.per_second > 0.0) || limit.burst == 0 {
                return Err(format!(
                    "rate_limits.{name}: per_second and burst must be positive"
                ));
            }
        }
        if self.ldap.enabled {
            let l = &self.ldap;
            if !(l.uri.starts_with("ldap://") || l.uri.starts_with("ldaps://")) {
                return Err("ldap.uri: must start with ldap:// or ldaps://".to_owned());
            }
            if l.starttls && l.uri.starts_with("ldaps://") {
                return Err("ldap.starttls: ldaps:// is already encrypted".to_owned());
            }
            if l.base_dn.is_empty() && l.bind_dn_template.is_none() {
                return Err(
                    "ldap.base_dn: needed to find users (or set bind_dn_template)".to_owned(),
                );
            }
            if l.bind_dn.is_some() != l.bind_password.is_some() {
                return Err(
                    "ldap.bind_password: give both bind_dn and bind_password, or neither"
                        .to_owned(),
                );
            }
            if let Some(t) = &l.bind_dn_template
                && !t.contains("{username}")
            {
                return Err("ldap.bind_dn_template: must contain {username}".to_owned());
            }
            if l.timeout_secs == 0 {
                return Err("ldap.timeout_secs: must be positive".to_owned());
            }
        }
        if self.media.max_upload_bytes == 0 {
            return Err("media.max_upload_bytes: must be positive".to_owned());
        }
        if self.push.timeout_secs == 0 {
            return Err("push.timeout_secs: must be positive".to_owned());
        }
        if let Some(url) = &self.public_baseurl
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err("public_baseurl: must start with http:// or https://".to_owned());
        }
        Ok(())
    }

    /// The base URL clients should use.
    pub fn base_url(&self) -> String {
        match &self.public_baseurl {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => format!("http://{}", self.listen),
        }
    }
}

const TOP_LEVEL_KEYS: &[&str] = &[
    "server_name",
    "listen",
    "data_dir",
    "public_baseurl",
    "log",
    "registration",
    "rooms",
    "limits",
    "rate_limits",
    "database",
    "media",
    "push",
    "appservices",
    "ldap",
    "bridges",
    "runtime",
];

/// An environment value is read as a TOML value when it parses as one (`true`, `42`),
/// otherwise as a plain string.
fn parse_env_value(raw: &str) -> toml::Value {
    let wrapped = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&wrapped) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_owned())),
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

fn set_path(table: &mut toml::Table, segments: &[String], value: toml::Value) {
    let (last, parents) = segments.split_last().expect("at least one segment");
    let mut current = table;
    for segment in parents {
        let entry = current
            .entry(segment.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        current = entry.as_table_mut().expect("just made a table");
    }
    current.insert(last.clone(), value);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_serve_localhost() {
        let c = Config::load(None, env(&[])).unwrap();
        assert_eq!(c.server_name.as_str(), "localhost");
        assert_eq!(c.listen.to_string(), "127.0.0.1:8008");
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert_eq!(c.registration.mode, RegistrationMode::Token);
        assert_eq!(c.base_url(), "http://127.0.0.1:8008");
    }

    #[test]
    fn environment_overrides_nested_keys() {
        let c = Config::load(
            None,
            env(&[
                ("SALON_REGISTRATION__MODE", "open"),
                ("SALON_LISTEN", "127.0.0.1:9999"),
                ("SALON_RATE_LIMITS__ENABLED", "false"),
                ("SALON_BIN", "/not/a/key"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(c.registration.mode, RegistrationMode::Open);
        assert_eq!(c.listen.port(), 9999);
        assert!(!c.rate_limits.enabled);
    }

    #[test]
    fn prepared_log_files_are_bounded() {
        let c = Config::load(None, env(&[("SALON_DATABASE__PREPARED_LOG_MIB", "0")])).unwrap();
        assert_eq!(c.database.prepared_log_mib, 0);
        assert_eq!(Config::default().database.prepared_log_mib, 16);
        let err = Config::load(None, env(&[("SALON_DATABASE__PREPARED_LOG_MIB", "4096")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("database.prepared_log_mib"), "{err}");
    }

    #[test]
    fn every_section_can_be_set_from_the_environment() {
        // A key missing from the list would be ignored without a word.
        let sections = toml::Value::try_from(Config::default()).unwrap();
        for key in sections.as_table().unwrap().keys() {
            assert!(TOP_LEVEL_KEYS.contains(&key.as_str()), "{key}");
        }
        let c = Config::load(None, env(&[("SALON_RUNTIME__PIN_WORKERS", "true")])).unwrap();
        assert!(c.runtime.pin_workers);
    }

    #[test]
    fn errors_name_the_key_and_origin() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("salon.toml");
        std::fs::write(
            &path,
            "server_name = \"example.org\"\n[registration]\nmode = \"sometimes\"\n",
        )
        .unwrap();
        let err = Config::load(Some(&path), env(&[])).unwrap_err().to_string();
        assert!(err.contains("salon.toml"), "{err}");
        assert!(err.contains("sometimes") || err.contains("mode"), "{err}");

        std::fs::write(&path, "sever_name = \"typo.org\"\n").unwrap();
        let err = Config::load(Some(&path), env(&[])).unwrap_err().to_string();
        assert!(err.contains("sever_name"), "{err}");

        let err = Config::load(None, env(&[("SALON_ROOMS__DEFAULT_VERSION", "\"1\"")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("SALON_ROOMS__DEFAULT_VERSION"), "{err}");

        let err = Config::load(None, env(&[("SALON_REGISTRATION__GUEST_ACCESS", "true")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("guest_access"), "{err}");
    }
}
