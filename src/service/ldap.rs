//! The organisation's directory (OpenLDAP, Active Directory): password checks for
//! logins, and the users it lists, for provisioning and the directory sync.
//!
//! Logins search for the user with the service account and then bind as the entry found
//! (search-then-bind), or bind directly with a DN template. Every value put into a filter
//! is escaped (RFC 4515) and every value put into a DN is escaped (RFC 4514); an empty
//! password never reaches the directory, because an unauthenticated bind "succeeds".
//! Searches reuse a small pool of connections bound as the service account; the binds
//! that check a user's password use a connection of their own.

use std::{collections::HashMap, sync::Arc, time::Duration};

use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, Scope, SearchEntry, adapters::PagedResults};

use crate::{
    config::LdapConfig,
    error::{Error, Result},
};

/// A user as the directory describes them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectoryUser {
    pub dn: String,
    /// The Matrix localpart derived from the configured attribute.
    pub localpart: String,
    pub display_name: Option<String>,
    pub email: Option<String>,
    /// The value of the login attribute (what `memberUid` lists).
    pub login: Option<String>,
    /// Disabled in Active Directory (`userAccountControl`).
    pub disabled: bool,
}

/// Why a login was not confirmed by the directory.
#[derive(Debug)]
pub enum LdapAuth {
    Ok(DirectoryUser),
    /// Unknown user, wrong password, or a refused value: the directory says no.
    Refused,
}

pub struct LdapService {
    pub config: LdapConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Idle connections bound as the service account, reused for searches.
    pool: tokio::sync::Mutex<Vec<Ldap>>,
    /// Held while the groups' owner account, spaces and rooms are looked up and made
    /// when missing ([`group_rooms`]): two logins or a login and a sync at once make
    /// each of them once.
    group_rooms: tokio::sync::Mutex<()>,
}

/// At most this many idle service connections are kept.
const POOL_SIZE: usize = 4;

/// ADS_UF_ACCOUNTDISABLE.
const AD_ACCOUNT_DISABLED: u64 = 0x2;

/// The localpart for a directory name: lower case, the domain of a
/// `user@domain` (userPrincipalName) dropped, characters Matrix ids do not allow
/// replaced by `_`, and no leading `_` (those ids belong to bridges).
pub fn normalise_localpart(raw: &str) -> Option<String> {
    let base = raw.split('@').next().unwrap_or(raw).trim().to_lowercase();
    let mapped: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || "._=-/+".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let trimmed = mapped.trim_start_matches('_').to_owned();
    (!trimmed.is_empty() && trimmed.len() <= 200).then_some(trimmed)
}

fn first(attrs: &HashMap<String, Vec<String>>, name: &str) -> Option<String> {
    attrs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .and_then(|(_, v)| v.first().cloned())
        .filter(|v| !v.is_empty())
}

fn unavailable(e: impl std::fmt::Display) -> Error {
    Error::unknown(format!("The directory (LDAP) is unavailable: {e}"))
}

impl LdapService {
    pub fn new(config: LdapConfig) -> Result<Self> {
        let tls = match &config.ca_file {
            Some(path) => {
                use rustls::pki_types::{CertificateDer, pem::PemObject};
                let mut roots = rustls::RootCertStore::empty();
                let certs = CertificateDer::pem_file_iter(path).map_err(|e| {
                    Error::internal(format!("ldap.ca_file {}: {e}", path.display()))
                })?;
                for cert in certs {
                    let cert = cert.map_err(|e| {
                        Error::internal(format!("ldap.ca_file {}: {e}", path.display()))
                    })?;
                    roots.add(cert).map_err(|e| {
                        Error::internal(format!("ldap.ca_file {}: {e}", path.display()))
                    })?;
                }
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| Error::internal(format!("TLS setup: {e}")))?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                Some(Arc::new(config))
            }
            None => None,
        };
        Ok(Self {
            config,
            tls,
            pool: tokio::sync::Mutex::new(Vec::new()),
            group_rooms: tokio::sync::Mutex::new(()),
        })
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.config.timeout_secs)
    }

    async fn connect(&self) -> Result<Ldap> {
        let mut settings = LdapConnSettings::new()
            .set_conn_timeout(self.timeout())
            .set_starttls(self.config.starttls);
        if let Some(tls) = &self.tls {
            settings = settings.set_config(tls.clone());
        }
        let (conn, ldap) = tokio::time::timeout(
            self.timeout(),
            LdapConnAsync::with_settings(settings, &self.config.uri),
        )
        .await
        .map_err(|_| unavailable("connection timed out"))?
        .map_err(unavailable)?;
        ldap3::drive!(conn);
        Ok(ldap)
    }

    /// A connection bound as the service account (or anonymous).
    async fn service_connection(&self) -> Result<Ldap> {
        let mut ldap = self.connect().await?;
        if let (Some(dn), Some(pw)) = (&self.config.bind_dn, &self.config.bind_password) {
            ldap.with_timeout(self.timeout())
                .simple_bind(dn, pw)
                .await
                .map_err(unavailable)?
                .success()
                .map_err(|e| unavailable(format!("the service account cannot bind: {e}")))?;
        }
        Ok(ldap)
    }

    /// A search with a service connection from the pool (or a new one). A pooled
    /// connection that fails (the directory closed it) is dropped and the search is
    /// tried once more on a fresh connection.
    async fn search(
        &self,
        base: &str,
        scope: Scope,
        filter: &str,
        attrs: Vec<String>,
    ) -> Result<Vec<SearchEntry>> {
        let pooled = self.pool.lock().await.pop();
        let from_pool = pooled.is_some();
        let mut ldap = match pooled {
            Some(l) => l,
            None => self.service_connection().await?,
        };
        let mut result = ldap
            .with_timeout(self.timeout())
            .search(base, scope, filter, attrs.clone())
            .await;
        if from_pool && result.is_err() {
            ldap = self.service_connection().await?;
            result = ldap
                .with_timeout(self.timeout())
                .search(base, scope, filter, attrs)
                .await;
        }
        let (entries, _) = result
            .map_err(unavailable)?
            .success()
            .map_err(unavailable)?;
        let mut pool = self.pool.lock().await;
        if pool.len() < POOL_SIZE {
            pool.push(ldap);
        }
        Ok(entries.into_iter().map(SearchEntry::construct).collect())
    }

    fn attributes(&self) -> Vec<String> {
        let mut attrs = vec![
            self.config.localpart_attribute.clone(),
            self.config.name_attribute.clone(),
            self.config.email_attribute.clone(),
            self.config.login_attribute.clone(),
        ];
        if self.config.active_directory {
            attrs.push("userAccountControl".to_owned());
        }
        attrs
    }

    fn to_user(&self, entry: SearchEntry) -> Option<DirectoryUser> {
        let localpart =
            normalise_localpart(&first(&entry.attrs, &self.config.localpart_attribute)?)?;
        let disabled = self.config.active_directory
            && first(&entry.attrs, "userAccountControl")
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|uac| uac & AD_ACCOUNT_DISABLED != 0);
        Some(DirectoryUser {
            localpart,
            display_name: first(&entry.attrs, &self.config.name_attribute),
            email: first(&entry.attrs, &self.config.email_attribute),
            login: first(&entry.attrs, &self.config.login_attribute),
            disabled,
            dn: entry.dn,
        })
    }

    /// Check a login against the directory. The login is what the user typed (a
    /// `uid`, a `sAMAccountName`, a `user@domain`).
    pub async fn authenticate(&self, login: &str, password: &str) -> Result<LdapAuth> {
        if password.is_empty() || login.is_empty() || login.len() > 256 {
            // An empty password is an anonymous bind, which servers accept: never send it.
            return Ok(LdapAuth::Refused);
        }
        let attrs = self.attributes();
        let entry = if let Some(template) = &self.config.bind_dn_template {
            let dn = template.replace("{username}", &ldap3::dn_escape(login));
            let mut ldap = self.connect().await?;
            let bound = ldap
                .with_timeout(self.timeout())
                .simple_bind(&dn, password)
                .await
                .map_err(unavailable)?;
            if bound.rc != 0 {
                return Ok(LdapAuth::Refused);
            }
            let (entries, _) = ldap
                .with_timeout(self.timeout())
                .search(&dn, Scope::Base, "(objectClass=*)", &attrs)
                .await
                .map_err(unavailable)?
                .success()
                .map_err(unavailable)?;
            let _ = ldap.unbind().await;
            match entries.into_iter().next() {
                Some(e) => SearchEntry::construct(e),
                None => return Ok(LdapAuth::Refused),
            }
        } else {
            let filter = format!(
                "(&{}({}={}))",
                self.config.user_filter,
                self.config.login_attribute,
                ldap3::ldap_escape(login)
            );
            let entries = self
                .search(&self.config.base_dn, Scope::Subtree, &filter, attrs)
                .await?;
            let mut entries = entries.into_iter();
            let (Some(found), None) = (entries.next(), entries.next()) else {
                // Nobody, or an ambiguous login: refuse.
                return Ok(LdapAuth::Refused);
            };
            let mut user_conn = self.connect().await?;
            let bound = user_conn
                .with_timeout(self.timeout())
                .simple_bind(&found.dn, password)
                .await
                .map_err(unavailable)?;
            let _ = user_conn.unbind().await;
            if bound.rc != 0 {
                return Ok(LdapAuth::Refused);
            }
            found
        };
        match self.to_user(entry) {
            Some(user) => Ok(LdapAuth::Ok(user)),
            None => Ok(LdapAuth::Refused),
        }
    }

    /// Whether `password` binds as the entry `dn` (user-interactive auth of an account
    /// that came from the directory).
    pub async fn verify_password(&self, dn: &str, password: &str) -> Result<bool> {
        if password.is_empty() {
            return Ok(false);
        }
        let mut ldap = self.connect().await?;
        let bound = ldap
            .with_timeout(self.timeout())
            .simple_bind(dn, password)
            .await
            .map_err(unavailable)?;
        let _ = ldap.unbind().await;
        Ok(bound.rc == 0)
    }

    /// The members of a group, among the directory's users `all`.
    pub async fn group_members(
        &self,
        group_dn: &str,
        kind: crate::config::GroupMembers,
        all: &[DirectoryUser],
    ) -> Result<Vec<DirectoryUser>> {
        use crate::config::GroupMembers;
        let norm = |dn: &str| dn.replace(' ', "").to_lowercase();
        Ok(match kind {
            GroupMembers::NestedMemberOf => {
                let filter = format!(
                    "(&{}(memberOf:1.2.840.113556.1.4.1941:={}))",
                    self.config.user_filter,
                    ldap3::ldap_escape(group_dn)
                );
                let entries = self
                    .search(
                        &self.config.base_dn,
                        Scope::Subtree,
                        &filter,
                        self.attributes(),
                    )
                    .await?;
                let dns: Vec<String> = entries.into_iter().map(|e| norm(&e.dn)).collect();
                all.iter()
                    .filter(|u| dns.contains(&norm(&u.dn)))
                    .cloned()
                    .collect()
            }
            GroupMembers::Member | GroupMembers::MemberUid => {
                let attr = if kind == GroupMembers::Member {
                    "member"
                } else {
                    "memberUid"
                };
                let entries = self
                    .search(
                        group_dn,
                        Scope::Base,
                        "(objectClass=*)",
                        vec![attr.to_owned()],
                    )
                    .await?;
                let values: Vec<String> = entries
                    .into_iter()
                    .flat_map(|e| {
                        e.attrs
                            .into_iter()
                            .filter(|(k, _)| k.eq_ignore_ascii_case(attr))
                            .flat_map(|(_, v)| v)
                    })
                    .map(|v| norm(&v))
                    .collect();
                all.iter()
                    .filter(|u| {
                        if kind == GroupMembers::Member {
                            values.contains(&norm(&u.dn))
                        } else {
                            u.login
                                .as_deref()
                                .is_some_and(|l| values.contains(&norm(l)))
                        }
                    })
                    .cloned()
                    .collect()
            }
        })
    }

    /// Every user the directory lists (paged, for Active Directory's size limits).
    pub async fn all_users(&self) -> Result<Vec<DirectoryUser>> {
        if self.config.base_dn.is_empty() {
            return Err(Error::unknown(
                "ldap.base_dn is needed to list the directory",
            ));
        }
        let mut ldap = self.service_connection().await?;
        let attrs = self.attributes();
        let mut stream = ldap
            .streaming_search_with(
                PagedResults::new(500),
                &self.config.base_dn,
                Scope::Subtree,
                &self.config.user_filter,
                attrs,
            )
            .await
            .map_err(unavailable)?;
        let mut out = Vec::new();
        while let Some(entry) = tokio::time::timeout(self.timeout() * 4, stream.next())
            .await
            .map_err(|_| unavailable("the directory stopped answering"))?
            .map_err(unavailable)?
        {
            if let Some(user) = self.to_user(SearchEntry::construct(entry)) {
                out.push(user);
            }
        }
        stream.finish().await.success().map_err(unavailable)?;
        let _ = ldap.unbind().await;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(attrs: &[(&str, &str)]) -> SearchEntry {
        SearchEntry {
            dn: "CN=Jean Dupont,OU=Staff,DC=corp,DC=example".to_owned(),
            attrs: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
                .collect(),
            bin_attrs: HashMap::new(),
        }
    }

    #[test]
    fn active_directory_accounts_marked_disabled_are_recognised() {
        let mut config = LdapConfig {
            active_directory: true,
            localpart_attribute: "sAMAccountName".into(),
            name_attribute: "displayName".into(),
            ..LdapConfig::default()
        };
        let service = LdapService::new(config.clone()).unwrap();
        // 512 = NORMAL_ACCOUNT; 514 = NORMAL_ACCOUNT | ACCOUNTDISABLE.
        let enabled = service
            .to_user(entry(&[
                ("sAMAccountName", "JDupont"),
                ("displayName", "Jean Dupont"),
                ("userAccountControl", "512"),
            ]))
            .unwrap();
        assert!(!enabled.disabled);
        assert_eq!(enabled.localpart, "jdupont");
        assert_eq!(enabled.display_name.as_deref(), Some("Jean Dupont"));
        let disabled = service
            .to_user(entry(&[
                ("sAMAccountName", "JDupont"),
                ("userAccountControl", "514"),
            ]))
            .unwrap();
        assert!(disabled.disabled);
        // Without active_directory the attribute means nothing.
        config.active_directory = false;
        let plain = LdapService::new(config).unwrap();
        let user = plain
            .to_user(entry(&[
                ("sAMAccountName", "JDupont"),
                ("userAccountControl", "514"),
            ]))
            .unwrap();
        assert!(!user.disabled);
    }

    #[test]
    fn directory_names_become_valid_localparts() {
        assert_eq!(normalise_localpart("JDupont").as_deref(), Some("jdupont"));
        assert_eq!(
            normalise_localpart("jean.dupont@corp.example").as_deref(),
            Some("jean.dupont")
        );
        assert_eq!(
            normalise_localpart("Jean Dupont").as_deref(),
            Some("jean_dupont")
        );
        assert_eq!(normalise_localpart("_svc").as_deref(), Some("svc"));
        assert_eq!(normalise_localpart("___"), None);
        assert_eq!(normalise_localpart(""), None);
    }
}

// --- logins, provisioning and the directory sync, on top of the services ---

use ruma::{OwnedUserId, UserId};

use super::Services;
use crate::config::LdapRemoved;

/// What a directory sync changed (or would change, for a dry run).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub listed: usize,
    pub created: Vec<OwnedUserId>,
    pub renamed: Vec<OwnedUserId>,
    pub removed: Vec<OwnedUserId>,
    pub unlocked: Vec<OwnedUserId>,
    /// What the group mappings changed, one line per change (`space: joined @bob`).
    pub groups: Vec<String>,
}

impl std::fmt::Display for SyncReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} in the directory: {} created, {} renamed, {} removed, {} unlocked",
            self.listed,
            self.created.len(),
            self.renamed.len(),
            self.removed.len(),
            self.unlocked.len()
        )
    }
}

fn user_id_of(s: &Services, user: &DirectoryUser) -> Result<OwnedUserId> {
    super::users::new_local_user_id(&user.localpart, s.globals.server_name())
}

/// Create or update the account of a directory user; returns its id. A deactivated
/// account stays deactivated.
pub async fn provision(s: &Services, user: &DirectoryUser) -> Result<OwnedUserId> {
    let id = user_id_of(s, user)?;
    match s.users.get(&id)? {
        None => {
            match s.users.create(&id, None, false, false).await {
                Ok(()) => {}
                // Provisioned meanwhile (a login during a directory sync): the same
                // fields are set again below.
                Err(e) if e.errcode() == "M_USER_IN_USE" => {}
                Err(e) => return Err(e),
            }
            s.users.update_active(&id, |record| {
                record.ldap_dn = Some(user.dn.clone());
                record.email = user.email.clone();
                record.displayname = user.display_name.clone().or(record.displayname.take());
                Ok(())
            })?;
            tracing::info!(user_id = %id, dn = %user.dn, "account created from the directory");
        }
        Some(record) if record.deactivated => return Err(Error::user_deactivated()),
        Some(record) => {
            let differs = |record: &super::users::UserRecord| {
                let renamed =
                    user.display_name.is_some() && record.displayname != user.display_name;
                let changed = renamed
                    || record.ldap_dn.as_deref() != Some(user.dn.as_str())
                    || record.email != user.email
                    || record.locked;
                (changed, renamed)
            };
            let mut renamed = false;
            if differs(&record).0 {
                // Looked at again under the record's lock: another change may have
                // come between.
                renamed = s.users.update_active(&id, |record| {
                    let (_, renamed) = differs(record);
                    record.ldap_dn = Some(user.dn.clone());
                    record.email = user.email.clone();
                    record.locked = false;
                    if renamed {
                        record.displayname = user.display_name.clone();
                    }
                    Ok(renamed)
                })?;
            }
            if renamed {
                s.rooms.propagate_profile(&id).await?;
            }
        }
    }
    Ok(id)
}

/// Check a password login against the directory: `Ok(Some(id))` when the directory
/// accepts it (the account is created or updated), `Ok(None)` when it refuses, an
/// error when the directory cannot be asked or the user is disabled there.
pub async fn login(s: &Services, login: &str, password: &str) -> Result<Option<OwnedUserId>> {
    let Some(ldap) = &s.ldap else {
        return Ok(None);
    };
    match ldap.authenticate(login, password).await? {
        LdapAuth::Refused => Ok(None),
        LdapAuth::Ok(user) if user.disabled => {
            tracing::info!(dn = %user.dn, "login of a user disabled in the directory refused");
            Err(Error::user_deactivated())
        }
        LdapAuth::Ok(user) => {
            let id = provision(s, &user).await?;
            if !ldap.config.groups.is_empty()
                && let Err(e) = join_own_groups(s, ldap, &user, &id).await
            {
                tracing::warn!(user_id = %id, error = %e, "could not apply the user's directory groups at login");
            }
            Ok(Some(id))
        }
    }
}

/// At login: put the user into the spaces and rooms of the groups they belong to
/// (the periodic sync also removes those who left).
async fn join_own_groups(
    s: &Services,
    ldap: &LdapService,
    user: &DirectoryUser,
    id: &OwnedUserId,
) -> Result<()> {
    let me = std::slice::from_ref(user);
    for group in &ldap.config.groups {
        if ldap
            .group_members(&group.group, group.members, me)
            .await?
            .is_empty()
        {
            continue;
        }
        let (admin, rooms) = group_rooms(s, group).await?;
        for (room, _) in rooms {
            let membership = s
                .rooms
                .timeline
                .room_short(&room)?
                .map(|short| s.members.with(short, &["join", "invite"]))
                .transpose()?
                .unwrap_or_default();
            if membership.contains(id) {
                continue;
            }
            s.rooms
                .set_membership(
                    &room,
                    &admin,
                    id,
                    "invite",
                    Some("Member of the directory group"),
                    None,
                )
                .await?;
            if group.auto_join {
                s.rooms
                    .set_membership(&room, id, id, "join", None, None)
                    .await?;
            }
        }
    }
    Ok(())
}

/// Import every directory user, update names and emails, and deactivate or lock the
/// accounts that left the directory or are disabled there. `progress(done, total)` is
/// called as users are handled.
pub async fn sync(
    s: &Services,
    dry_run: bool,
    mut progress: impl FnMut(usize, usize),
) -> Result<SyncReport> {
    let ldap = s
        .ldap
        .as_ref()
        .ok_or_else(|| Error::unknown("LDAP is not enabled (ldap.enabled)"))?;
    let listed_at = super::users::now_ms();
    let listed = ldap.all_users().await?;
    let mut report = SyncReport {
        listed: listed.len(),
        ..Default::default()
    };
    let mut present = std::collections::HashSet::new();
    let total = listed.len();
    for (i, user) in listed.iter().enumerate() {
        progress(i + 1, total);
        let Ok(id) = user_id_of(s, user) else {
            continue;
        };
        if user.disabled {
            continue;
        }
        present.insert(id.clone());
        match s.users.get(&id)? {
            None => report.created.push(id.clone()),
            Some(r) if r.deactivated => continue,
            Some(r) => {
                if user.display_name.is_some() && r.displayname != user.display_name {
                    report.renamed.push(id.clone());
                }
                if r.locked {
                    report.unlocked.push(id.clone());
                }
            }
        }
        if !dry_run {
            provision(s, user).await?;
        }
    }
    for (id, record) in s.users.all()? {
        if record.ldap_dn.is_none() || record.deactivated || present.contains(&id) {
            continue;
        }
        // An account created since the directory was read (someone added to it who
        // logged in during this sync) is missing from the listing, not from the
        // directory.
        if record.created_ts >= listed_at {
            continue;
        }
        if record.locked && ldap.config.on_removed == LdapRemoved::Lock {
            continue;
        }
        report.removed.push(id.clone());
        if dry_run {
            continue;
        }
        match ldap.config.on_removed {
            LdapRemoved::Deactivate => {
                s.deactivate_account(&id).await?;
                tracing::info!(user_id = %id, "account deactivated: no longer in the directory");
            }
            LdapRemoved::Lock => {
                // Locked first, so that a login under way leaves no device behind.
                s.users.update_active(&id, |r| {
                    r.locked = true;
                    Ok(())
                })?;
                s.remove_devices_except(&id, None)?;
                tracing::info!(user_id = %id, "account locked: no longer in the directory");
            }
        }
    }
    if !ldap.config.groups.is_empty() {
        sync_groups(s, ldap, &listed, dry_run, &mut report).await?;
    }
    Ok(report)
}

/// The account that owns the group spaces.
async fn groups_admin(s: &Services) -> Result<OwnedUserId> {
    let id = super::users::new_local_user_id(
        &s.globals.config.ldap.groups_admin,
        s.globals.server_name(),
    )?;
    if !s.users.exists(&id)? {
        s.users.create(&id, None, false, false).await?;
        s.users.update_active(&id, |r| {
            r.displayname = Some("Directory".to_owned());
            Ok(())
        })?;
    }
    Ok(id)
}

/// The room behind a local alias, created (a space when `space_of` is `None`, else a
/// room of that space, joinable by its members) when it does not exist.
async fn ensure_room(
    s: &Services,
    admin: &UserId,
    alias_local: &str,
    name: &str,
    space_of: Option<&ruma::RoomId>,
) -> Result<ruma::OwnedRoomId> {
    let alias = super::rooms::alias::parse_local_alias(alias_local, s.globals.server_name())?;
    if let Some(room) = s.rooms.alias_target(&alias)? {
        return Ok(room);
    }
    let server = s.globals.server_name().to_string();
    let (creation_content, initial_state) = match space_of {
        None => (Some(serde_json::json!({ "type": "m.space" })), Vec::new()),
        Some(space) => (
            None,
            vec![
                serde_json::json!({ "type": "m.space.parent", "state_key": space, "content": { "via": [server], "canonical": true } }),
                serde_json::json!({ "type": "m.room.join_rules", "state_key": "", "content": {
                    "join_rule": "restricted",
                    "allow": [{ "type": "m.room_membership", "room_id": space }],
                } }),
            ],
        ),
    };
    let room = s
        .rooms
        .create_room(
            admin,
            super::rooms::CreateRoom {
                version: None,
                preset: Some(super::rooms::Preset::PrivateChat),
                public: false,
                name: Some(name.to_owned()),
                topic: None,
                alias_localpart: Some(alias_local.to_owned()),
                invite: Vec::new(),
                is_direct: false,
                creation_content,
                initial_state,
                power_level_override: None,
            },
        )
        .await?;
    if let Some(space) = space_of {
        let child = super::rooms::timeline::NewEvent::state(
            "m.space.child",
            room.as_str(),
            serde_json::json!({ "via": [s.globals.server_name()] }),
        );
        s.rooms.send(space, admin, child).await?;
    }
    Ok(room)
}

/// Make a room's members (joined or invited) the group's: invite (and join, with
/// `auto_join`) who is missing, remove directory users who left the group, and give
/// managers their power level.
#[allow(clippy::too_many_arguments)]
async fn reconcile(
    s: &Services,
    admin: &UserId,
    room: &ruma::RoomId,
    label: &str,
    members: &[OwnedUserId],
    managers: &[OwnedUserId],
    group: &crate::config::LdapGroup,
    report: &mut SyncReport,
) -> Result<()> {
    let room_short = s
        .rooms
        .timeline
        .room_short(room)?
        .ok_or_else(|| Error::internal("group room vanished"))?;
    let current = s.members.with(room_short, &["join", "invite"])?;
    for user in members {
        if current.contains(user) {
            continue;
        }
        s.rooms
            .set_membership(
                room,
                admin,
                user,
                "invite",
                Some("Member of the directory group"),
                None,
            )
            .await?;
        if group.auto_join {
            s.rooms
                .set_membership(room, user, user, "join", None, None)
                .await?;
            report.groups.push(format!("{label}: joined {user}"));
        } else {
            report.groups.push(format!("{label}: invited {user}"));
        }
    }
    for user in &current {
        if user == admin || members.contains(user) || !is_directory_user(s, user)? {
            continue;
        }
        s.rooms
            .set_membership(
                room,
                admin,
                user,
                "leave",
                Some("No longer in the directory group"),
                None,
            )
            .await?;
        report.groups.push(format!("{label}: removed {user}"));
    }
    let mut levels = s
        .rooms
        .timeline
        .current_state_content(room_short, "m.room.power_levels", "")?
        .unwrap_or_else(|| serde_json::json!({}));
    let users = levels
        .as_object_mut()
        .ok_or_else(|| Error::internal("power levels are not an object"))?
        .entry("users")
        .or_insert_with(|| serde_json::json!({}));
    let Some(users) = users.as_object_mut() else {
        return Ok(());
    };
    let mut changed = false;
    for m in managers {
        if members.contains(m)
            && users.get(m.as_str()).and_then(|v| v.as_i64()) != Some(group.manager_power_level)
        {
            users.insert(m.to_string(), serde_json::json!(group.manager_power_level));
            report.groups.push(format!("{label}: {m} is a manager"));
            changed = true;
        }
    }
    let stale: Vec<String> = users
        .iter()
        .filter(|(u, level)| {
            level.as_i64() == Some(group.manager_power_level)
                && !managers.iter().any(|m| m.as_str() == u.as_str())
        })
        .map(|(u, _)| u.clone())
        .collect();
    for u in stale {
        if let Ok(id) = UserId::parse(u.as_str())
            && is_directory_user(s, &id)?
        {
            users.remove(&u);
            report
                .groups
                .push(format!("{label}: {u} is no longer a manager"));
            changed = true;
        }
    }
    if changed {
        let event = super::rooms::timeline::NewEvent::state("m.room.power_levels", "", levels);
        s.rooms.send(room, admin, event).await?;
    }
    Ok(())
}

/// Directory groups → spaces: each mapped group gets its space and rooms, with the
/// group's members in them and its managers empowered.
async fn sync_groups(
    s: &Services,
    ldap: &LdapService,
    all: &[DirectoryUser],
    dry_run: bool,
    report: &mut SyncReport,
) -> Result<()> {
    let active: Vec<DirectoryUser> = all.iter().filter(|u| !u.disabled).cloned().collect();
    for group in &ldap.config.groups {
        let members: Vec<OwnedUserId> = ldap
            .group_members(&group.group, group.members, &active)
            .await?
            .iter()
            .filter_map(|u| user_id_of(s, u).ok())
            .collect();
        let managers: Vec<OwnedUserId> = match &group.managers {
            Some(dn) => ldap
                .group_members(dn, group.members, &active)
                .await?
                .iter()
                .filter_map(|u| user_id_of(s, u).ok())
                .collect(),
            None => Vec::new(),
        };
        if dry_run {
            report.groups.push(format!(
                "{}: {} members, {} managers",
                group.space,
                members.len(),
                managers.len()
            ));
            continue;
        }
        let (admin, rooms) = group_rooms(s, group).await?;
        for (room, label) in rooms {
            reconcile(s, &admin, &room, label, &members, &managers, group, report).await?;
        }
    }
    Ok(())
}

/// A group's space and rooms (created when missing), the space first, each with its
/// alias localpart; and the account that owns them.
async fn group_rooms<'g>(
    s: &Services,
    group: &'g crate::config::LdapGroup,
) -> Result<(OwnedUserId, Vec<(ruma::OwnedRoomId, &'g str)>)> {
    let _one_at_a_time = match &s.ldap {
        Some(ldap) => Some(ldap.group_rooms.lock().await),
        None => None,
    };
    let admin = groups_admin(s).await?;
    let name = group.name.clone().unwrap_or_else(|| group.space.clone());
    let space = ensure_room(s, &admin, &group.space, &name, None).await?;
    let mut rooms = vec![(space.clone(), group.space.as_str())];
    for alias in &group.rooms {
        rooms.push((
            ensure_room(s, &admin, alias, alias, Some(&space)).await?,
            alias.as_str(),
        ));
    }
    Ok((admin, rooms))
}

/// Run the directory sync every `ldap.sync_interval_minutes` until `stop`.
pub async fn run_periodic(s: Arc<Services>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let Some(minutes) = s
        .ldap
        .as_ref()
        .map(|l| l.config.sync_interval_minutes)
        .filter(|m| *m > 0)
    else {
        return;
    };
    loop {
        match sync(&s, false, |_, _| {}).await {
            Ok(report) => tracing::info!(%report, "directory sync"),
            Err(e) => tracing::warn!(error = %e, "directory sync failed"),
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(Duration::from_secs(minutes * 60)) => {}
        }
    }
}

/// Whether a user id names an account that came from the directory.
pub fn is_directory_user(s: &Services, user: &UserId) -> Result<bool> {
    Ok(s.users.get(user)?.is_some_and(|r| r.ldap_dn.is_some()))
}
