//! Server-side room key backup: versions (one current per user) holding encrypted
//! session keys per room and session. The server cannot read them; it keeps the best
//! copy of each session key and a count and etag so clients see when to fetch.

use std::collections::BTreeMap;

use ruma::{OwnedRoomId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue as RawJsonValue;

use super::E2ee;
use crate::{
    error::{Error, Result},
    storage::{Batch, SEP, str_prefix},
};

#[derive(Serialize, Deserialize)]
struct VersionRecord {
    /// `{"algorithm": …, "auth_data": …}` as the client sent it.
    algorithm: Box<RawJsonValue>,
    etag: u64,
    count: u64,
    #[serde(default)]
    deleted: bool,
}

/// A backup version as `GET /room_keys/version` shows it.
pub struct VersionInfo {
    pub algorithm: Box<RawJsonValue>,
    pub count: u64,
    pub etag: String,
    pub version: String,
}

/// What a backup holds: room → session → key data.
pub type BackedUpKeys = BTreeMap<OwnedRoomId, BTreeMap<String, Box<RawJsonValue>>>;

#[derive(Deserialize)]
struct KeyRank {
    first_message_index: u64,
    forwarded_count: u64,
    is_verified: bool,
}

/// Whether `new` should replace `old`, by the spec's order: verified beats unverified,
/// then the lower first message index, then the fewer forwards.
fn better(new: &KeyRank, old: &KeyRank) -> bool {
    if new.is_verified != old.is_verified {
        return new.is_verified;
    }
    if new.first_message_index != old.first_message_index {
        return new.first_message_index < old.first_message_index;
    }
    new.forwarded_count < old.forwarded_count
}

fn algorithm_name(raw: &RawJsonValue) -> Result<String> {
    #[derive(Deserialize)]
    struct Shape {
        algorithm: String,
        /// Only checked to be an object; the server cannot read it.
        #[serde(rename = "auth_data")]
        _auth_data: serde_json::Map<String, serde_json::Value>,
    }
    let shape: Shape = serde_json::from_str(raw.get()).map_err(|e| {
        Error::bad_json(format!(
            "a backup needs an 'algorithm' string and an 'auth_data' object: {e}"
        ))
    })?;
    Ok(shape.algorithm)
}

fn version_key(user: &UserId, version: u64) -> Vec<u8> {
    let mut k = str_prefix(&[user.as_str()]);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

fn keys_prefix(user: &UserId, version: u64, room: Option<&str>) -> Vec<u8> {
    let mut k = version_key(user, version);
    k.push(SEP);
    if let Some(room) = room {
        k.extend_from_slice(room.as_bytes());
        k.push(SEP);
    }
    k
}

impl E2ee {
    fn version_record(&self, user: &UserId, version: u64) -> Result<Option<VersionRecord>> {
        match self
            .db
            .get("backup_versions", &version_key(user, version))?
        {
            Some(v) => {
                let r: VersionRecord = serde_json::from_slice(&v)?;
                Ok((!r.deleted).then_some(r))
            }
            None => Ok(None),
        }
    }

    /// The current (newest, not deleted) version and its record.
    fn current_version(&self, user: &UserId) -> Result<Option<(u64, VersionRecord)>> {
        let prefix = str_prefix(&[user.as_str()]);
        let mut newest = None;
        for item in self.db.scan_prefix("backup_versions", &prefix) {
            let (k, v) = item?;
            let r: VersionRecord = serde_json::from_slice(&v)?;
            if !r.deleted {
                newest = Some((crate::storage::decode_u64(&k[prefix.len()..]), r));
            }
        }
        Ok(newest)
    }

    fn last_version_number(&self, user: &UserId) -> Result<u64> {
        let prefix = str_prefix(&[user.as_str()]);
        let mut last = 0;
        for item in self.db.scan_prefix("backup_versions", &prefix) {
            last = crate::storage::decode_u64(&item?.0[prefix.len()..]);
        }
        Ok(last)
    }

    pub fn create_backup_version(&self, user: &UserId, algorithm: &RawJsonValue) -> Result<String> {
        algorithm_name(algorithm)?;
        let _guard = self.backup_lock.lock();
        let version = self.last_version_number(user)? + 1;
        let record = VersionRecord {
            algorithm: algorithm.to_owned(),
            etag: 0,
            count: 0,
            deleted: false,
        };
        self.db.put_durable(
            "backup_versions",
            &version_key(user, version),
            &serde_json::to_vec(&record)?,
        )?;
        Ok(version.to_string())
    }

    /// A version's information; `None` asks for the current one.
    pub fn backup_version(&self, user: &UserId, version: Option<&str>) -> Result<VersionInfo> {
        let found = match version {
            None => self.current_version(user)?,
            Some(v) => match v.parse::<u64>() {
                Ok(n) => self.version_record(user, n)?.map(|r| (n, r)),
                Err(_) => None,
            },
        };
        let (n, r) = found.ok_or_else(|| Error::not_found("Unknown backup version"))?;
        Ok(VersionInfo {
            algorithm: r.algorithm,
            count: r.count,
            etag: r.etag.to_string(),
            version: n.to_string(),
        })
    }

    pub fn update_backup_version(
        &self,
        user: &UserId,
        version: &str,
        algorithm: &RawJsonValue,
    ) -> Result<()> {
        let name = algorithm_name(algorithm)?;
        let _guard = self.backup_lock.lock();
        let n = version
            .parse::<u64>()
            .map_err(|_| Error::not_found("Unknown backup version"))?;
        let mut record = self
            .version_record(user, n)?
            .ok_or_else(|| Error::not_found("Unknown backup version"))?;
        if algorithm_name(&record.algorithm)? != name {
            return Err(Error::invalid_param(
                "the algorithm of a backup version cannot change",
            ));
        }
        record.algorithm = algorithm.to_owned();
        self.db.put_durable(
            "backup_versions",
            &version_key(user, n),
            &serde_json::to_vec(&record)?,
        )
    }

    pub fn delete_backup_version(&self, user: &UserId, version: &str) -> Result<()> {
        let _guard = self.backup_lock.lock();
        let n = version
            .parse::<u64>()
            .map_err(|_| Error::not_found("Unknown backup version"))?;
        let mut record = self
            .version_record(user, n)?
            .ok_or_else(|| Error::not_found("Unknown backup version"))?;
        record.deleted = true;
        record.count = 0;
        let mut batch = Batch::default();
        for item in self
            .db
            .scan_prefix("backup_keys", &keys_prefix(user, n, None))
        {
            batch.delete(&self.db, "backup_keys", &item?.0);
        }
        batch.put(
            &self.db,
            "backup_versions",
            &version_key(user, n),
            &serde_json::to_vec(&record)?,
        );
        self.db.commit(batch)
    }

    /// Writes go only to the current version; anything else is refused with the
    /// current version named, so the client can switch.
    fn writable_version(&self, user: &UserId, version: &str) -> Result<(u64, VersionRecord)> {
        let current = self.current_version(user)?;
        match current {
            Some((n, r)) if version.parse::<u64>().ok() == Some(n) => Ok((n, r)),
            Some((n, _)) => Err(Error::wrong_room_keys_version(Some(n.to_string()))),
            None => Err(Error::wrong_room_keys_version(None)),
        }
    }

    /// Store session keys, keeping the better of an existing and a new copy. Returns
    /// the version's key count and etag afterwards.
    pub fn put_backup_keys(
        &self,
        user: &UserId,
        version: &str,
        keys: &BackedUpKeys,
    ) -> Result<(u64, String)> {
        let _guard = self.backup_lock.lock();
        let (n, mut record) = self.writable_version(user, version)?;
        let mut batch = Batch::default();
        let mut changed = false;
        for (room, sessions) in keys {
            for (session, data) in sessions {
                let rank: KeyRank = serde_json::from_str(data.get()).map_err(|e| {
                    Error::bad_json(format!("the key of session {session} is malformed: {e}"))
                })?;
                let mut key = keys_prefix(user, n, Some(room.as_str()));
                key.extend_from_slice(session.as_bytes());
                let replace = match self.db.get("backup_keys", &key)? {
                    Some(old) => {
                        let old: KeyRank = serde_json::from_slice(&old)?;
                        better(&rank, &old)
                    }
                    None => {
                        record.count += 1;
                        true
                    }
                };
                if replace {
                    batch.put(&self.db, "backup_keys", &key, data.get().as_bytes());
                    changed = true;
                }
            }
        }
        if changed {
            record.etag += 1;
            batch.put(
                &self.db,
                "backup_versions",
                &version_key(user, n),
                &serde_json::to_vec(&record)?,
            );
            self.db.commit(batch)?;
        }
        Ok((record.count, record.etag.to_string()))
    }

    /// The keys of a version: all, one room's, or one session's.
    pub fn backup_keys(
        &self,
        user: &UserId,
        version: &str,
        room: Option<&str>,
        session: Option<&str>,
    ) -> Result<BackedUpKeys> {
        let n = version
            .parse::<u64>()
            .ok()
            .filter(|n| matches!(self.version_record(user, *n), Ok(Some(_))))
            .ok_or_else(|| Error::not_found("Unknown backup version"))?;
        let mut prefix = keys_prefix(user, n, room);
        if let Some(session) = session {
            prefix.extend_from_slice(session.as_bytes());
        }
        let base = keys_prefix(user, n, None).len();
        let mut out = BackedUpKeys::new();
        for item in self.db.scan_prefix("backup_keys", &prefix) {
            let (k, v) = item?;
            let rest = &k[base..];
            let Some(split) = rest.iter().position(|b| *b == SEP) else {
                continue;
            };
            let session_id = String::from_utf8_lossy(&rest[split + 1..]).into_owned();
            if session.is_some_and(|s| s != session_id) {
                continue;
            }
            let Ok(room_id) =
                OwnedRoomId::try_from(String::from_utf8_lossy(&rest[..split]).as_ref())
            else {
                continue;
            };
            let data = RawJsonValue::from_string(String::from_utf8_lossy(&v).into_owned())?;
            out.entry(room_id).or_default().insert(session_id, data);
        }
        Ok(out)
    }

    /// Delete keys of the current version: all, one room's, or one session's.
    pub fn delete_backup_keys(
        &self,
        user: &UserId,
        version: &str,
        room: Option<&str>,
        session: Option<&str>,
    ) -> Result<(u64, String)> {
        let _guard = self.backup_lock.lock();
        let (n, mut record) = self.writable_version(user, version)?;
        let mut prefix = keys_prefix(user, n, room);
        if let Some(session) = session {
            prefix.extend_from_slice(session.as_bytes());
        }
        let mut batch = Batch::default();
        let mut removed = 0;
        for item in self.db.scan_prefix("backup_keys", &prefix) {
            let (k, _) = item?;
            if session.is_some() && k.len() != prefix.len() {
                continue; // a longer session id that merely starts with this one
            }
            batch.delete(&self.db, "backup_keys", &k);
            removed += 1;
        }
        if removed > 0 {
            record.count = record.count.saturating_sub(removed);
            record.etag += 1;
            batch.put(
                &self.db,
                "backup_versions",
                &version_key(user, n),
                &serde_json::to_vec(&record)?,
            );
            self.db.commit(batch)?;
        }
        Ok((record.count, record.etag.to_string()))
    }
}
