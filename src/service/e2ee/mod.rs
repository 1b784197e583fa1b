//! End-to-end encryption support. The server stores and routes; it never decrypts.
//!
//! - [`keys`]: device identity keys, one-time and fallback keys, cross-signing keys and
//!   the signatures users make over each other's keys;
//! - [`to_device`]: the per-device message queues that carry key exchanges;
//! - [`backup`]: server-side room key backup;
//! - here: the device-list stream, which tells every user whose devices or keys changed
//!   among the people they share rooms with, so clients know when to query keys again.

pub mod backup;
pub mod keys;
pub mod to_device;

use std::{collections::BTreeSet, sync::Arc};

use parking_lot::Mutex;
use ruma::{CanonicalJsonObject, DeviceId, OwnedServerName, OwnedUserId, UserId, serde::Base64};

use super::{
    notifier::Notifier,
    rooms::{members::MemberLists, timeline::joined_room_shorts},
    users::Users,
};
use crate::{
    error::{Error, Result},
    storage::{Batch, Db, StreamTicket, str_prefix, u64_at},
};

pub struct E2ee {
    db: Arc<Db>,
    server_name: OwnedServerName,
    users: Arc<Users>,
    notifier: Arc<Notifier>,
    members: Arc<MemberLists>,
    /// Serialises claims of one-time keys, so that no key is handed out twice.
    claim_lock: Mutex<()>,
    /// Serialises changes to a backup's keys, which keep a count and an etag.
    backup_lock: Mutex<()>,
    /// Serialises stores of cross-signing keys, so that an upload allowed without a
    /// password (the first) cannot replace keys another request stored meanwhile.
    signing_keys_lock: Mutex<()>,
    /// Held by a sender's to-device transaction from the check that its id is new to
    /// its write, so that a retry sent while the first try is under way does nothing.
    to_device_locks: crate::service::locks::UserLocks,
    /// Devices' one-time and fallback key summaries, for their syncs.
    key_summaries: Mutex<keys::KeySummaries>,
}

/// Who a user must (re)query keys for, and whose devices they no longer need to track.
#[derive(Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeviceListChanges {
    pub changed: BTreeSet<OwnedUserId>,
    pub left: BTreeSet<OwnedUserId>,
}

impl DeviceListChanges {
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.left.is_empty()
    }
}

impl E2ee {
    pub fn new(
        db: Arc<Db>,
        server_name: OwnedServerName,
        users: Arc<Users>,
        notifier: Arc<Notifier>,
        members: Arc<MemberLists>,
    ) -> Self {
        Self {
            db,
            server_name,
            users,
            notifier,
            members,
            claim_lock: Mutex::new(()),
            backup_lock: Mutex::new(()),
            signing_keys_lock: Mutex::new(()),
            to_device_locks: Default::default(),
            key_summaries: Mutex::default(),
        }
    }

    /// Stage a device-list change of `user` at the ticket's position.
    fn stage_change(&self, batch: &mut Batch, user: &UserId, ticket: &StreamTicket<'_>) {
        batch.put(
            &self.db,
            "device_list_stream",
            &ticket.position.to_be_bytes(),
            user.as_bytes(),
        );
    }

    /// Commit a batch holding a device-list change of `user`, then wake the user and
    /// everyone who shares a room with them.
    fn commit_change(&self, batch: Batch, user: &UserId, ticket: StreamTicket<'_>) -> Result<()> {
        self.db.commit(batch)?;
        let pos = ticket.position;
        drop(ticket);
        self.notifier.notify(user, pos);
        self.notifier
            .notify_all(self.members.joined_peers(user)?.iter().map(|u| &**u), pos);
        Ok(())
    }

    /// Record that `user`'s devices or keys changed (alone, in its own write).
    pub fn device_list_changed(&self, user: &UserId) -> Result<()> {
        let ticket = self.db.stream.reserve();
        let mut batch = Batch::default();
        self.stage_change(&mut batch, user, &ticket);
        self.commit_change(batch, user, ticket)
    }

    /// Remove a device's session and its keys, one-time keys and pending messages; the
    /// people who share rooms with its owner learn that the device list changed.
    pub fn remove_device(&self, user: &UserId, device: &DeviceId) -> Result<bool> {
        if !self.users.remove_device(user, device)? {
            return Ok(false);
        }
        self.forget_device_data(user, device)?;
        Ok(true)
    }

    fn forget_device_data(&self, user: &UserId, device: &DeviceId) -> Result<()> {
        let ticket = self.db.stream.reserve();
        let mut batch = Batch::default();
        let prefix = str_prefix(&[user.as_str(), device.as_str()]);
        for cf in ["one_time_keys", "fallback_keys", "to_device"] {
            for item in self.db.scan_prefix(cf, &prefix) {
                batch.delete(&self.db, cf, &item?.0);
            }
        }
        batch.delete(
            &self.db,
            "device_keys",
            &crate::storage::str_key(&[user.as_str(), device.as_str()]),
        );
        self.stage_change(&mut batch, user, &ticket);
        self.commit_change(batch, user, ticket)?;
        self.forget_key_summary(user, device);
        Ok(())
    }

    /// What changed in `(since, until]` for `user`'s view of device lists:
    /// - `changed`: users who share a room with `user` (or `user` themself) and whose
    ///   devices or keys changed, and users who started sharing a room with `user`;
    /// - `left`: users who no longer share any room with `user`.
    pub fn device_list_changes(
        &self,
        user: &UserId,
        since: u64,
        until: u64,
    ) -> Result<DeviceListChanges> {
        let mut out = DeviceListChanges::default();
        let start = (since + 1).to_be_bytes();
        let mut key_changes = BTreeSet::new();
        for item in self.db.scan_from("device_list_stream", b"", &start, true) {
            let (k, v) = item?;
            if u64_at(&k, 0) > until {
                break;
            }
            if let Ok(u) = UserId::parse(String::from_utf8_lossy(&v).as_ref()) {
                key_changes.insert(u);
            }
        }
        let mut joins = Vec::new();
        let mut leaves = Vec::new();
        for item in self.db.scan_from("membership_stream", b"", &start, true) {
            let (k, v) = item?;
            if u64_at(&k, 0) > until || v.len() < 17 {
                if u64_at(&k, 0) > until {
                    break;
                }
                continue;
            }
            let (room, member) = (u64_at(&v, 0), u64_at(&v, 1));
            if v[16] == 1 {
                joins.push((room, member));
            } else {
                leaves.push((room, member));
            }
        }
        if key_changes.is_empty() && joins.is_empty() && leaves.is_empty() {
            return Ok(out);
        }
        let peers = self.members.joined_peers(user)?;
        let my_rooms: BTreeSet<u64> = joined_room_shorts(&self.db, user)?.into_iter().collect();
        let me = self
            .db
            .short_id(crate::storage::IdKind::User, user.as_str())?;
        let mut joined_peers_changed = BTreeSet::new();
        for (room, member) in joins {
            if !my_rooms.contains(&room) {
                continue;
            }
            if Some(member) == me {
                // The user joined: everyone in the room may be new to them.
                joined_peers_changed.extend(self.members.joined(room)?);
            } else if let Some(id) = self.db.long_id(member)? {
                joined_peers_changed.insert(UserId::parse(id)?);
            }
        }
        for u in joined_peers_changed {
            if u != user && peers.contains(&u) {
                out.changed.insert(u);
            }
        }
        for u in key_changes {
            if u == user || peers.contains(&u) {
                out.changed.insert(u);
            }
        }
        for (room, member) in leaves {
            let gone: Vec<OwnedUserId> = if Some(member) == me {
                self.members.joined(room)?
            } else if my_rooms.contains(&room) {
                // Someone left a room of the user's: if it was the last room they
                // shared, the user need not track their devices any more.
                self.db
                    .long_id(member)?
                    .map(UserId::parse)
                    .transpose()?
                    .into_iter()
                    .collect()
            } else {
                Vec::new()
            };
            for u in gone {
                if u != user && !peers.contains(&u) && !out.changed.contains(&u) {
                    out.left.insert(u);
                }
            }
        }
        Ok(out)
    }
}

/// Check the ed25519 signature that `signer`'s key `key_id` (e.g. `ed25519:DEVICE`)
/// made over a signed JSON object (its `signatures` and `unsigned` left out).
pub fn verify_signature(
    object: &CanonicalJsonObject,
    signer: &UserId,
    key_id: &str,
    public_key: &str,
) -> Result<()> {
    let signature = object
        .get("signatures")
        .and_then(|s| s.as_object())
        .and_then(|s| s.get(signer.as_str()))
        .and_then(|s| s.as_object())
        .and_then(|s| s.get(key_id))
        .and_then(|s| s.as_str())
        .ok_or_else(|| {
            Error::invalid_param(format!(
                "the object carries no signature by {signer} {key_id}"
            ))
        })?;
    let key = Base64::<ruma::serde::base64::Standard>::parse(public_key)
        .map_err(|_| Error::invalid_param(format!("{key_id} is not a base64 public key")))?;
    let sig = Base64::<ruma::serde::base64::Standard>::parse(signature)
        .map_err(|_| Error::invalid_param(format!("the signature by {key_id} is not base64")))?;
    let canonical = ruma::signatures::to_canonical_json_string_for_signing(object)
        .map_err(|e| Error::bad_json(format!("cannot canonicalise the signed object: {e}")))?;
    ruma::signatures::verify_canonical_json_bytes(
        &ruma::SigningKeyAlgorithm::Ed25519,
        key.as_bytes(),
        sig.as_bytes(),
        canonical.as_bytes(),
    )
    .map_err(|_| {
        Error::invalid_param(format!(
            "the signature by {signer} {key_id} does not verify"
        ))
    })
}
