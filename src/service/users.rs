//! Accounts, devices and access tokens, profiles, account data, filters, and the tokens
//! that gate registration and token login.

use std::{collections::HashMap, sync::Arc, time::Duration};

use argon2::{
    Argon2, PasswordHash, PasswordHasher, PasswordVerifier,
    password_hash::{SaltString, rand_core::OsRng},
};
use parking_lot::RwLock;
use ruma::{DeviceId, MilliSecondsSinceUnixEpoch, OwnedDeviceId, OwnedUserId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::Value as JsonValue;

use crate::{
    error::{Error, Result},
    service::{globals::random_string, notifier::Notifier},
    storage::{Batch, Db, IdKind, str_key, str_prefix, u64_key},
};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UserRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
    #[serde(default)]
    pub admin: bool,
    #[serde(default)]
    pub deactivated: bool,
    #[serde(default)]
    pub guest: bool,
    pub created_ts: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub displayname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar_url: Option<String>,
    /// The directory entry this account comes from (LDAP / Active Directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ldap_dn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Logged out and refused logins until the directory lists the user again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub locked: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub device_id: String,
    #[serde(default)]
    pub display_name: Option<String>,
    pub access_token: String,
    pub created_ts: u64,
    #[serde(default)]
    pub last_seen_ts: Option<u64>,
    #[serde(default)]
    pub last_seen_ip: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RegistrationToken {
    pub token: String,
    /// How many registrations the token allows; `None` means unlimited.
    pub uses_allowed: Option<u64>,
    pub pending: u64,
    pub completed: u64,
    /// Milliseconds since the epoch after which the token is void.
    pub expiry_time: Option<u64>,
}

impl RegistrationToken {
    pub fn is_valid(&self, now: u64) -> bool {
        self.expiry_time.is_none_or(|t| now < t)
            && self
                .uses_allowed
                .is_none_or(|n| self.pending + self.completed < n)
    }
}

/// A change on a user's own stream (beside room events), for incremental sync.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum UserStreamEntry {
    AccountData { room: Option<String>, kind: String },
}

#[derive(Serialize, Deserialize)]
struct LoginToken {
    user_id: OwnedUserId,
    expires: u64,
}

/// Who a request is from.
#[derive(Clone, Debug)]
pub struct Session {
    pub user_id: OwnedUserId,
    pub device_id: OwnedDeviceId,
    /// The client session the access token stands for: the scope of transaction ids.
    /// Logging in again with the same device id starts a new one.
    pub client_session: String,
}

pub struct Users {
    db: Arc<Db>,
    notifier: Arc<Notifier>,
    tokens: RwLock<HashMap<String, Session>>,
    /// Held by a change of a user's record from its read to its write.
    record_locks: super::locks::UserLocks,
    /// Held by a change of a user's devices from its read to its write.
    device_locks: super::locks::UserLocks,
    /// Held by an edit of a user's account data from its read to its write.
    account_data_locks: super::locks::UserLocks,
    /// Held by a change of a registration token, or the use of a login token, from its
    /// read to its write: a token allowed one more use, or a login token, is not used
    /// twice by requests at once.
    token_lock: parking_lot::Mutex<()>,
}

/// Appservices act without a device; their requests carry this device id, which keeps
/// their transaction ids apart from any real device's.
pub const APPSERVICE_DEVICE: &str = "APPSERVICE";

/// The user id for a new local account: lower-cased, and only the characters the spec
/// allows in new user ids (a-z, 0-9, `._=-/+`).
pub fn new_local_user_id(localpart: &str, server: &ruma::ServerName) -> Result<OwnedUserId> {
    let lower = localpart.to_lowercase();
    if lower.is_empty() || lower.len() > 200 {
        return Err(Error::invalid_username("Usernames are 1 to 200 characters"));
    }
    if !lower
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._=-/+".contains(c))
    {
        return Err(Error::invalid_username(
            "Usernames may only contain a-z, 0-9, and . _ = - / +",
        ));
    }
    UserId::parse_with_server_name(lower.as_str(), server)
        .map_err(|e| Error::invalid_username(format!("Invalid username: {e}")))
}

pub fn now_ms() -> u64 {
    MilliSecondsSinceUnixEpoch::now().get().into()
}

impl Users {
    pub fn new(db: Arc<Db>, notifier: Arc<Notifier>) -> Self {
        Self {
            db,
            notifier,
            tokens: RwLock::new(HashMap::new()),
            record_locks: Default::default(),
            device_locks: Default::default(),
            account_data_locks: Default::default(),
            token_lock: parking_lot::Mutex::new(()),
        }
    }

    pub fn get(&self, user: &UserId) -> Result<Option<UserRecord>> {
        match self.db.get("users", user.as_bytes())? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    pub fn exists(&self, user: &UserId) -> Result<bool> {
        self.db.exists("users", user.as_bytes())
    }

    /// An active (not deactivated) account, or `M_NOT_FOUND`.
    pub fn active(&self, user: &UserId) -> Result<UserRecord> {
        match self.get(user)? {
            Some(r) if !r.deactivated => Ok(r),
            _ => Err(Error::not_found("No such user")),
        }
    }

    fn put(&self, batch: &mut Batch, user: &UserId, record: &UserRecord) -> Result<()> {
        batch.put(
            &self.db,
            "users",
            user.as_bytes(),
            &serde_json::to_vec(record)?,
        );
        Ok(())
    }

    fn save(&self, user: &UserId, record: &UserRecord) -> Result<()> {
        let mut b = Batch::default();
        self.put(&mut b, user, record)?;
        self.db.commit(b)
    }

    /// Changes the user's record: `edit` is given it as stored, and what it leaves is
    /// saved unless it fails; `M_NOT_FOUND` for an unknown user. Changes to one user's
    /// record go one at a time, so that none undoes another (the directory locking an
    /// account while its owner renames it, a deactivation during a password change).
    pub fn update<T>(
        &self,
        user: &UserId,
        edit: impl FnOnce(&mut UserRecord) -> Result<T>,
    ) -> Result<T> {
        let _one_at_a_time = self.record_locks.lock(user);
        let mut record = self
            .get(user)?
            .ok_or_else(|| Error::not_found("No such user"))?;
        let out = edit(&mut record)?;
        self.save(user, &record)?;
        Ok(out)
    }

    /// Like [`Users::update`], for an active (not deactivated) account only.
    pub fn update_active<T>(
        &self,
        user: &UserId,
        edit: impl FnOnce(&mut UserRecord) -> Result<T>,
    ) -> Result<T> {
        self.update(user, |record| {
            if record.deactivated {
                return Err(Error::not_found("No such user"));
            }
            edit(record)
        })
    }

    /// Create an account whose id the caller has checked is allowed; `M_USER_IN_USE`
    /// when it exists, also when another request created it meanwhile.
    pub async fn create(
        &self,
        user: &UserId,
        password: Option<&str>,
        admin: bool,
        guest: bool,
    ) -> Result<()> {
        let password_hash = match password {
            Some(p) => Some(hash_password(p.to_owned()).await?),
            None => None,
        };
        let record = UserRecord {
            password_hash,
            admin,
            guest,
            deactivated: false,
            created_ts: now_ms(),
            displayname: Some(user.localpart().to_owned()),
            avatar_url: None,
            ldap_dn: None,
            email: None,
            locked: false,
        };
        let _one_at_a_time = self.record_locks.lock(user);
        if self.exists(user)? {
            return Err(Error::user_in_use("This username is taken"));
        }
        self.db
            .get_or_create_short_id(crate::storage::IdKind::User, user.as_str())?;
        self.save(user, &record)
    }

    pub async fn set_password(&self, user: &UserId, password: &str) -> Result<()> {
        self.active(user)?;
        let hash = hash_password(password.to_owned()).await?;
        self.update_active(user, |record| {
            record.password_hash = Some(hash);
            Ok(())
        })
    }

    /// Whether `password` is the account's password. Deactivated accounts and accounts
    /// without a password never match.
    pub async fn check_password(&self, user: &UserId, password: &str) -> Result<bool> {
        Ok(self.verified_password(user, password).await?.is_some())
    }

    /// The stored password hash `password` matched, or `None` when it did not (see
    /// [`Users::check_password`]). A login hands it to [`Users::create_login_device`],
    /// which refuses when the password changed meanwhile.
    pub async fn verified_password(&self, user: &UserId, password: &str) -> Result<Option<String>> {
        let Some(record) = self.get(user)? else {
            // Spend the same time as a real check, so timing does not tell which ids exist.
            let _ = hash_password(password.to_owned()).await;
            return Ok(None);
        };
        let Some(hash) = record.password_hash.filter(|_| !record.deactivated) else {
            return Ok(None);
        };
        let password = password.to_owned();
        let _permit = HASHING.acquire().await.map_err(Error::internal)?;
        tokio::task::spawn_blocking(move || {
            let matched = PasswordHash::new(&hash)
                .map(|h| {
                    Argon2::default()
                        .verify_password(password.as_bytes(), &h)
                        .is_ok()
                })
                .unwrap_or(false);
            matched.then_some(hash)
        })
        .await
        .map_err(Error::internal)
    }

    // --- devices and access tokens ---

    pub fn authenticate(&self, token: &str) -> Result<Option<Session>> {
        if let Some(s) = self.tokens.read().get(token) {
            return Ok(Some(s.clone()));
        }
        let Some(v) = self.db.get("access_tokens", token.as_bytes())? else {
            return Ok(None);
        };
        let text = String::from_utf8_lossy(&v);
        let mut parts = text.split('\u{1}');
        let (Some(user), Some(device)) = (parts.next(), parts.next()) else {
            return Err(Error::internal("corrupt token record"));
        };
        // Tokens issued before client sessions were recorded: the device is the scope.
        let client_session = parts.next().unwrap_or(device).to_owned();
        let session = Session {
            user_id: UserId::parse(user)?,
            device_id: device.into(),
            client_session,
        };
        self.tokens
            .write()
            .insert(token.to_owned(), session.clone());
        Ok(Some(session))
    }

    pub fn device(&self, user: &UserId, device: &DeviceId) -> Result<Option<DeviceRecord>> {
        match self
            .db
            .get("devices", &str_key(&[user.as_str(), device.as_str()]))?
        {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    /// The user's devices once any being made or changed now is written: for removing
    /// them all after a change that stops new ones (a deactivation, a lock, a new
    /// password).
    pub fn devices_settled(&self, user: &UserId) -> Result<Vec<DeviceRecord>> {
        let _settled = self.device_locks.lock(user);
        self.devices(user)
    }

    pub fn devices(&self, user: &UserId) -> Result<Vec<DeviceRecord>> {
        let prefix = str_prefix(&[user.as_str()]);
        self.db
            .scan_prefix("devices", &prefix)
            .map(|r| Ok(serde_json::from_slice(&r?.1)?))
            .collect()
    }

    /// Create (or replace the token of) a device and return its new access token.
    pub fn create_device(
        &self,
        user: &UserId,
        device_id: Option<&DeviceId>,
        display_name: Option<String>,
        ip: Option<String>,
    ) -> Result<(OwnedDeviceId, String)> {
        let _one_at_a_time = self.device_locks.lock(user);
        self.create_device_locked(user, device_id, display_name, ip)
    }

    /// A login's new device (or a new token for its device), made only if the account
    /// is still active and unlocked and, for a password login, its password is still
    /// the one `verified_hash` was checked against: a deactivation, lock or password
    /// change that comes while the password is being checked is not undone by the
    /// login. Those changes are written before the account's devices are removed,
    /// which waits for a device being made here ([`Users::devices_settled`]).
    pub fn create_login_device(
        &self,
        user: &UserId,
        device_id: Option<&DeviceId>,
        display_name: Option<String>,
        ip: Option<String>,
        verified_hash: Option<&str>,
    ) -> Result<(OwnedDeviceId, String)> {
        let _one_at_a_time = self.device_locks.lock(user);
        let record = self
            .get(user)?
            .ok_or_else(|| Error::forbidden("Invalid username or password"))?;
        if record.deactivated {
            return Err(Error::user_deactivated());
        }
        if record.locked {
            return Err(Error::user_locked());
        }
        if let Some(hash) = verified_hash
            && record.password_hash.as_deref() != Some(hash)
        {
            return Err(Error::forbidden("Invalid username or password"));
        }
        self.create_device_locked(user, device_id, display_name, ip)
    }

    /// Runs `f`, which writes something of the user's device (its keys, its pushers),
    /// only while the device exists, under the user's device lock: a request the device
    /// made just before it was removed either writes before the removal, whose clean-up
    /// then takes it away, or finds the device gone (`M_UNKNOWN_TOKEN`). An
    /// appservice's requests, which have no device ([`APPSERVICE_DEVICE`]), always run.
    pub fn with_device<T>(
        &self,
        user: &UserId,
        device: &str,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let _one_at_a_time = self.device_locks.lock(user);
        if device != APPSERVICE_DEVICE
            && !self
                .db
                .exists("devices", &str_key(&[user.as_str(), device]))?
        {
            return Err(Error::unknown_token(false));
        }
        f()
    }

    /// [`Users::create_device`], with the user's device lock held.
    fn create_device_locked(
        &self,
        user: &UserId,
        device_id: Option<&DeviceId>,
        display_name: Option<String>,
        ip: Option<String>,
    ) -> Result<(OwnedDeviceId, String)> {
        let device_id: OwnedDeviceId = match device_id {
            Some(d) => d.to_owned(),
            None => random_string(10).to_uppercase().into(),
        };
        let token = random_string(40);
        let mut batch = Batch::default();
        let record = match self.device(user, &device_id)? {
            Some(mut existing) => {
                self.forget_token(&mut batch, &existing.access_token);
                existing.access_token = token.clone();
                if display_name.is_some() {
                    existing.display_name = display_name;
                }
                existing
            }
            None => DeviceRecord {
                device_id: device_id.to_string(),
                display_name,
                access_token: token.clone(),
                created_ts: now_ms(),
                last_seen_ts: Some(now_ms()),
                last_seen_ip: ip,
            },
        };
        batch.put(
            &self.db,
            "devices",
            &str_key(&[user.as_str(), device_id.as_str()]),
            &serde_json::to_vec(&record)?,
        );
        let client_session = random_string(16);
        batch.put(
            &self.db,
            "access_tokens",
            token.as_bytes(),
            format!("{user}\u{1}{device_id}\u{1}{client_session}").as_bytes(),
        );
        self.db.commit(batch)?;
        Ok((device_id, token))
    }

    fn forget_token(&self, batch: &mut Batch, token: &str) {
        batch.delete(&self.db, "access_tokens", token.as_bytes());
        self.tokens.write().remove(token);
    }

    pub fn rename_device(
        &self,
        user: &UserId,
        device: &DeviceId,
        name: Option<String>,
    ) -> Result<()> {
        let _one_at_a_time = self.device_locks.lock(user);
        let mut record = self
            .device(user, device)?
            .ok_or_else(|| Error::not_found("No such device"))?;
        record.display_name = name;
        self.db.put_durable(
            "devices",
            &str_key(&[user.as_str(), device.as_str()]),
            &serde_json::to_vec(&record)?,
        )
    }

    pub fn remove_device(&self, user: &UserId, device: &DeviceId) -> Result<bool> {
        let _one_at_a_time = self.device_locks.lock(user);
        let Some(record) = self.device(user, device)? else {
            return Ok(false);
        };
        let mut batch = Batch::default();
        self.forget_token(&mut batch, &record.access_token);
        batch.delete(
            &self.db,
            "devices",
            &str_key(&[user.as_str(), device.as_str()]),
        );
        self.db.commit(batch)?;
        Ok(true)
    }

    /// Marks the account deactivated: no login succeeds from here on. The caller
    /// removes its devices after this, so that a login under way cannot leave one.
    pub fn deactivate(&self, user: &UserId) -> Result<()> {
        self.update(user, |record| {
            record.deactivated = true;
            record.password_hash = None;
            record.displayname = None;
            record.avatar_url = None;
            Ok(())
        })
    }

    // --- profile ---

    pub fn set_displayname(&self, user: &UserId, name: Option<String>) -> Result<()> {
        self.update_active(user, |record| {
            record.displayname = name;
            Ok(())
        })
    }

    pub fn set_avatar_url(&self, user: &UserId, url: Option<String>) -> Result<()> {
        self.update_active(user, |record| {
            record.avatar_url = url;
            Ok(())
        })
    }

    /// The account's email address (the email bridge reaches them there).
    pub fn set_email(&self, user: &UserId, email: Option<String>) -> Result<()> {
        self.update_active(user, |record| {
            record.email = email;
            Ok(())
        })
    }

    /// All accounts, for the user directory.
    pub fn all(&self) -> Result<Vec<(OwnedUserId, UserRecord)>> {
        self.db
            .scan_prefix("users", b"")
            .map(|r| {
                let (k, v) = r?;
                Ok((
                    UserId::parse(String::from_utf8_lossy(&k).as_ref())?,
                    serde_json::from_slice(&v)?,
                ))
            })
            .collect()
    }

    // --- account data ---

    pub fn account_data(
        &self,
        user: &UserId,
        room: Option<&str>,
        kind: &str,
    ) -> Result<Option<JsonValue>> {
        match self.db.get(
            "account_data",
            &str_key(&[user.as_str(), room.unwrap_or(""), kind]),
        )? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    /// Store account data and record the change on the user's stream for `/sync`. A
    /// whole value written while an edit of the same user's account data is under way
    /// waits for it ([`Users::edit_account_data`]), and the edit does not write back
    /// what it read before.
    pub fn set_account_data(
        &self,
        user: &UserId,
        room: Option<&str>,
        kind: &str,
        content: &JsonValue,
    ) -> Result<()> {
        let _one_at_a_time = self.account_data_locks.lock(user);
        self.write_account_data(user, room, kind, content)
    }

    /// [`Users::set_account_data`], with the user's account data lock held.
    fn write_account_data(
        &self,
        user: &UserId,
        room: Option<&str>,
        kind: &str,
        content: &JsonValue,
    ) -> Result<()> {
        let user_short = self
            .db
            .get_or_create_short_id(IdKind::User, user.as_str())?;
        let ticket = self.db.stream.reserve();
        let mut b = Batch::default();
        b.put(
            &self.db,
            "account_data",
            &str_key(&[user.as_str(), room.unwrap_or(""), kind]),
            &serde_json::to_vec(content)?,
        );
        let change = UserStreamEntry::AccountData {
            room: room.map(str::to_owned),
            kind: kind.to_owned(),
        };
        b.put(
            &self.db,
            "user_stream",
            &u64_key(&[user_short, ticket.position]),
            &serde_json::to_vec(&change)?,
        );
        self.db.commit(b)?;
        let pos = ticket.position;
        drop(ticket);
        self.notifier.notify(user, pos);
        Ok(())
    }

    /// Changes stored account data in place (a room's tags): `edit` is given the
    /// current content (`None` when there is none) and what it returns is written,
    /// unless it fails. Edits go one at a time, so that two made at once (from two
    /// devices) both take effect.
    pub fn edit_account_data(
        &self,
        user: &UserId,
        room: Option<&str>,
        kind: &str,
        edit: impl FnOnce(Option<JsonValue>) -> Result<JsonValue>,
    ) -> Result<()> {
        let _one_at_a_time = self.account_data_locks.lock(user);
        let content = edit(self.account_data(user, room, kind)?)?;
        self.write_account_data(user, room, kind, &content)
    }

    /// All account data of a user: global (room `None`) and per room.
    pub fn all_account_data(
        &self,
        user: &UserId,
    ) -> Result<Vec<(Option<String>, String, JsonValue)>> {
        let prefix = str_prefix(&[user.as_str()]);
        let mut out = Vec::new();
        for item in self.db.scan_prefix("account_data", &prefix) {
            let (k, v) = item?;
            let raw = &k[prefix.len()..];
            let sep = raw
                .iter()
                .position(|b| *b == crate::storage::SEP)
                .unwrap_or(raw.len());
            let room = String::from_utf8_lossy(&raw[..sep]).into_owned();
            let kind = String::from_utf8_lossy(raw.get(sep + 1..).unwrap_or_default()).into_owned();
            out.push((
                (!room.is_empty()).then_some(room),
                kind,
                serde_json::from_slice(&v)?,
            ));
        }
        Ok(out)
    }

    /// Changes on the user's stream in `(since, until]`.
    pub fn stream_changes(
        &self,
        user: &UserId,
        since: u64,
        until: u64,
    ) -> Result<Vec<(u64, UserStreamEntry)>> {
        let Some(user_short) = self.db.short_id(IdKind::User, user.as_str())? else {
            return Ok(Vec::new());
        };
        let prefix = user_short.to_be_bytes();
        let start = u64_key(&[user_short, since + 1]);
        let mut out = Vec::new();
        for item in self.db.scan_from("user_stream", &prefix, &start, true) {
            let (k, v) = item?;
            let pos = crate::storage::u64_at(&k, 1);
            if pos > until {
                break;
            }
            out.push((pos, serde_json::from_slice(&v)?));
        }
        Ok(out)
    }

    // --- filters ---

    pub fn create_filter(&self, user: &UserId, filter: &JsonValue) -> Result<String> {
        let id = random_string(12);
        self.db.put_durable(
            "filters",
            &str_key(&[user.as_str(), &id]),
            &serde_json::to_vec(filter)?,
        )?;
        Ok(id)
    }

    pub fn filter(&self, user: &UserId, id: &str) -> Result<Option<JsonValue>> {
        match self.db.get("filters", &str_key(&[user.as_str(), id]))? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    // --- registration tokens ---

    pub fn create_registration_token(
        &self,
        token: Option<String>,
        uses_allowed: Option<u64>,
        expiry_time: Option<u64>,
    ) -> Result<RegistrationToken> {
        let token = token.unwrap_or_else(|| random_string(16));
        if token.is_empty()
            || token.len() > 64
            || !token
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._~-".contains(c))
        {
            return Err(Error::invalid_param(
                "registration tokens are 1 to 64 characters from [A-Za-z0-9._~-]",
            ));
        }
        let _one_at_a_time = self.token_lock.lock();
        if self.registration_token(&token)?.is_some() {
            return Err(Error::invalid_param(
                "this registration token already exists",
            ));
        }
        let record = RegistrationToken {
            token: token.clone(),
            uses_allowed,
            pending: 0,
            completed: 0,
            expiry_time,
        };
        self.db.put_durable(
            "registration_tokens",
            token.as_bytes(),
            &serde_json::to_vec(&record)?,
        )?;
        Ok(record)
    }

    pub fn registration_token(&self, token: &str) -> Result<Option<RegistrationToken>> {
        match self.db.get("registration_tokens", token.as_bytes())? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    pub fn registration_tokens(&self) -> Result<Vec<RegistrationToken>> {
        self.db
            .scan_prefix("registration_tokens", b"")
            .map(|r| Ok(serde_json::from_slice(&r?.1)?))
            .collect()
    }

    pub fn delete_registration_token(&self, token: &str) -> Result<bool> {
        let _one_at_a_time = self.token_lock.lock();
        if self.registration_token(token)?.is_none() {
            return Ok(false);
        }
        let mut b = Batch::default();
        b.delete(&self.db, "registration_tokens", token.as_bytes());
        self.db.commit(b)?;
        Ok(true)
    }

    /// Count one completed registration against the token.
    pub fn use_registration_token(&self, token: &str) -> Result<()> {
        let _one_at_a_time = self.token_lock.lock();
        let mut record = self
            .registration_token(token)?
            .ok_or_else(|| Error::token_incorrect("Unknown registration token"))?;
        if !record.is_valid(now_ms()) {
            return Err(Error::token_incorrect(
                "This registration token is no longer valid",
            ));
        }
        record.completed += 1;
        self.db.put_durable(
            "registration_tokens",
            token.as_bytes(),
            &serde_json::to_vec(&record)?,
        )
    }

    /// Gives back a use counted by [`Users::use_registration_token`] for a registration
    /// that then failed (another request took the name meanwhile).
    pub fn return_registration_token(&self, token: &str) -> Result<()> {
        let _one_at_a_time = self.token_lock.lock();
        let Some(mut record) = self.registration_token(token)? else {
            return Ok(());
        };
        record.completed = record.completed.saturating_sub(1);
        self.db.put_durable(
            "registration_tokens",
            token.as_bytes(),
            &serde_json::to_vec(&record)?,
        )
    }

    // --- login tokens ---

    pub fn create_login_token(&self, user: &UserId, ttl: Duration) -> Result<String> {
        let token = random_string(32);
        let record = LoginToken {
            user_id: user.to_owned(),
            expires: now_ms() + ttl.as_millis() as u64,
        };
        self.db.put_durable(
            "login_tokens",
            token.as_bytes(),
            &serde_json::to_vec(&record)?,
        )?;
        Ok(token)
    }

    /// The user a login token was issued for; the token is used up.
    pub fn consume_login_token(&self, token: &str) -> Result<Option<OwnedUserId>> {
        let _one_at_a_time = self.token_lock.lock();
        let Some(v) = self.db.get("login_tokens", token.as_bytes())? else {
            return Ok(None);
        };
        let record: LoginToken = serde_json::from_slice(&v)?;
        let mut b = Batch::default();
        b.delete(&self.db, "login_tokens", token.as_bytes());
        self.db.commit(b)?;
        Ok((record.expires > now_ms()).then_some(record.user_id))
    }
}

/// Password hashing costs 19 MiB and tens of milliseconds each; a burst of logins must
/// not turn into gigabytes. At most two run at once, the rest queue.
static HASHING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

async fn hash_password(password: String) -> Result<String> {
    let _permit = HASHING.acquire().await.map_err(Error::internal)?;
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| Error::internal(format!("cannot hash password: {e}")))
    })
    .await
    .map_err(Error::internal)?
}
