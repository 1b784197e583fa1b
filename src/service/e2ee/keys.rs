//! Device keys, one-time and fallback keys, cross-signing keys and key signatures.
//!
//! Key objects are stored as uploaded (canonical JSON, `unsigned` dropped) after their
//! shape and signatures are checked. Signatures that users add later to each other's
//! keys (`/keys/signatures/upload`) are kept apart, in `key_signatures`, and merged into
//! the objects when they are queried.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, DeviceId, OneTimeKeyAlgorithm, OwnedDeviceId,
    OwnedOneTimeKeyId, OwnedUserId, UserId,
    encryption::{CrossSigningKey, DeviceKeys, KeyUsage, OneTimeKey},
    serde::Raw,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value as JsonValue, value::RawValue as RawJsonValue};

use super::{E2ee, verify_signature};
use crate::{
    error::{Error, Result},
    storage::{Batch, SEP, str_key, str_prefix},
};

/// What a sync reports of a device's keys.
#[derive(Debug, Default)]
pub struct KeySummary {
    /// Unclaimed one-time keys per algorithm (`signed_curve25519` always present).
    pub one_time: BTreeMap<OneTimeKeyAlgorithm, u64>,
    /// Algorithms of the fallback keys not used yet.
    pub unused_fallback: Vec<String>,
}

/// Devices' key summaries, kept between their syncs.
#[derive(Default)]
pub(super) struct KeySummaries {
    devices: HashMap<OwnedUserId, HashMap<OwnedDeviceId, Arc<KeySummary>>>,
    entries: usize,
    /// Counts every change of anyone's keys, so that a summary counted while one was
    /// written is not kept.
    generation: u64,
}

/// At most this many devices' summaries are kept (about 200 bytes each); past it the
/// whole set starts again.
const MAX_KEPT_SUMMARIES: usize = 16_384;

/// The three cross-signing keys, as stored under `user SEP <name>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrossSigningKind {
    Master,
    SelfSigning,
    UserSigning,
}

impl CrossSigningKind {
    fn name(self) -> &'static str {
        match self {
            Self::Master => "master",
            Self::SelfSigning => "self_signing",
            Self::UserSigning => "user_signing",
        }
    }
    fn usage(self) -> KeyUsage {
        match self {
            Self::Master => KeyUsage::Master,
            Self::SelfSigning => KeyUsage::SelfSigning,
            Self::UserSigning => KeyUsage::UserSigning,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct FallbackKey {
    key_id: String,
    key: Box<RawJsonValue>,
    used: bool,
}

/// Keys of the users asked for in a `/keys/query`, as raw JSON objects.
#[derive(Default)]
pub struct QueriedKeys {
    pub device_keys: BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, Raw<DeviceKeys>>>,
    pub master_keys: BTreeMap<OwnedUserId, Raw<CrossSigningKey>>,
    pub self_signing_keys: BTreeMap<OwnedUserId, Raw<CrossSigningKey>>,
    pub user_signing_keys: BTreeMap<OwnedUserId, Raw<CrossSigningKey>>,
}

/// One-time keys handed out by `/keys/claim`, per user and device.
pub type ClaimedKeys =
    BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, BTreeMap<OwnedOneTimeKeyId, Raw<OneTimeKey>>>>;

/// Why a signature in a `/keys/signatures/upload` was not accepted, per user and key.
pub type SignatureFailures = BTreeMap<OwnedUserId, BTreeMap<String, String>>;

fn parse_object(raw: &RawJsonValue, what: &str) -> Result<CanonicalJsonObject> {
    serde_json::from_str(raw.get())
        .map_err(|e| Error::bad_json(format!("{what} is not a valid signed JSON object: {e}")))
}

fn to_raw<T>(object: &CanonicalJsonObject) -> Result<Raw<T>> {
    Ok(Raw::from_json(serde_json::value::to_raw_value(object)?))
}

/// The object as it is signed: without `signatures` and `unsigned`.
fn signed_part(object: &CanonicalJsonObject) -> Result<String> {
    ruma::signatures::to_canonical_json_string_for_signing(object)
        .map_err(|e| Error::bad_json(format!("cannot canonicalise a key object: {e}")))
}

/// The single public key of a cross-signing key, checked: `ed25519:<key>` → `<key>`.
fn cross_signing_public_key(key: &CrossSigningKey) -> Result<String> {
    let mut keys = key.keys.iter();
    let (Some((id, value)), None) = (keys.next(), keys.next()) else {
        return Err(Error::invalid_param(
            "a cross-signing key must hold exactly one public key",
        ));
    };
    let id = id.as_str();
    if id != format!("ed25519:{value}") {
        return Err(Error::invalid_param(format!(
            "the key id {id} does not name its public key"
        )));
    }
    Ok(value.clone())
}

/// Add `signature` by `signer`/`key_id` to an object's `signatures`.
fn add_signature(object: &mut CanonicalJsonObject, signer: &str, key_id: &str, signature: &str) {
    let signatures = object
        .entry("signatures".to_owned())
        .or_insert_with(|| CanonicalJsonValue::Object(CanonicalJsonObject::new()));
    if let CanonicalJsonValue::Object(signatures) = signatures {
        let by = signatures
            .entry(signer.to_owned())
            .or_insert_with(|| CanonicalJsonValue::Object(CanonicalJsonObject::new()));
        if let CanonicalJsonValue::Object(by) = by {
            by.insert(
                key_id.to_owned(),
                CanonicalJsonValue::String(signature.to_owned()),
            );
        }
    }
}

impl E2ee {
    // --- device keys, one-time keys, fallback keys ---

    fn stored_object(&self, cf: &str, key: &[u8]) -> Result<Option<CanonicalJsonObject>> {
        match self.db.get(cf, key)? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    pub fn device_keys(
        &self,
        user: &UserId,
        device: &DeviceId,
    ) -> Result<Option<CanonicalJsonObject>> {
        self.stored_object("device_keys", &str_key(&[user.as_str(), device.as_str()]))
    }

    /// The device's ed25519 identity key, if it uploaded its keys.
    fn device_ed25519(&self, user: &UserId, device: &DeviceId) -> Result<Option<String>> {
        Ok(self.device_keys(user, device)?.and_then(|o| {
            o.get("keys")
                .and_then(|k| k.as_object())
                .and_then(|k| k.get(&format!("ed25519:{device}")))
                .and_then(|k| k.as_str())
                .map(str::to_owned)
        }))
    }

    /// `/keys/upload`: check and store the device's keys; answer the one-time key counts.
    /// Nothing is stored for a device removed meanwhile
    /// ([`crate::service::users::Users::with_device`]).
    pub fn upload_keys(
        &self,
        user: &UserId,
        device: &DeviceId,
        device_keys: Option<&RawJsonValue>,
        one_time_keys: &BTreeMap<OwnedOneTimeKeyId, Raw<OneTimeKey>>,
        fallback_keys: &BTreeMap<OwnedOneTimeKeyId, Raw<OneTimeKey>>,
    ) -> Result<BTreeMap<OneTimeKeyAlgorithm, u64>> {
        self.users.with_device(user, device.as_str(), || {
            self.store_uploaded_keys(user, device, device_keys, one_time_keys, fallback_keys)
        })
    }

    fn store_uploaded_keys(
        &self,
        user: &UserId,
        device: &DeviceId,
        device_keys: Option<&RawJsonValue>,
        one_time_keys: &BTreeMap<OwnedOneTimeKeyId, Raw<OneTimeKey>>,
        fallback_keys: &BTreeMap<OwnedOneTimeKeyId, Raw<OneTimeKey>>,
    ) -> Result<BTreeMap<OneTimeKeyAlgorithm, u64>> {
        let mut batch = Batch::default();
        let mut changed = false;
        let mut ed25519 = self.device_ed25519(user, device)?;

        if let Some(raw) = device_keys {
            let mut object = parse_object(raw, "device_keys")?;
            object.remove("unsigned");
            let typed: DeviceKeys = serde_json::from_str(raw.get())
                .map_err(|e| Error::bad_json(format!("device_keys: {e}")))?;
            if typed.user_id != user || typed.device_id != device {
                return Err(Error::invalid_param(
                    "device_keys must name the user and device of the access token",
                ));
            }
            let key_id = format!("ed25519:{device}");
            let key = typed
                .keys
                .iter()
                .find(|(id, _)| id.as_str() == key_id)
                .map(|(_, k)| k.clone())
                .ok_or_else(|| Error::invalid_param(format!("device_keys lacks {key_id}")))?;
            verify_signature(&object, user, &key_id, &key)?;
            let stored = self.device_keys(user, device)?;
            if stored.as_ref() != Some(&object) {
                if let Some(stored_key) = &ed25519
                    && *stored_key != key
                {
                    // A device's identity never changes; a new one is a new device.
                    return Err(Error::invalid_param(
                        "this device already has other identity keys: log in as a new device",
                    ));
                }
                batch.put(
                    &self.db,
                    "device_keys",
                    &str_key(&[user.as_str(), device.as_str()]),
                    &serde_json::to_vec(&object)?,
                );
                changed = true;
            }
            ed25519 = Some(key);
        }

        for (id, raw) in one_time_keys {
            let key = self.checked_one_time_key(user, device, id, raw, ed25519.as_deref())?;
            let db_key = str_key(&[
                user.as_str(),
                device.as_str(),
                id.algorithm().as_str(),
                id.key_name().as_str(),
            ]);
            match self.db.get("one_time_keys", &db_key)? {
                Some(existing) if existing.as_slice() == key.as_bytes() => {}
                Some(_) => {
                    return Err(Error::invalid_param(format!(
                        "one-time key {id} already exists with other content"
                    )));
                }
                None => batch.put(&self.db, "one_time_keys", &db_key, key.as_bytes()),
            }
        }

        for (id, raw) in fallback_keys {
            let key = self.checked_one_time_key(user, device, id, raw, ed25519.as_deref())?;
            let db_key = str_key(&[user.as_str(), device.as_str(), id.algorithm().as_str()]);
            let used = match self.db.get("fallback_keys", &db_key)? {
                Some(v) => {
                    let old: FallbackKey = serde_json::from_slice(&v)?;
                    // Re-uploading the same key keeps its state.
                    old.used && old.key_id == id.as_str() && old.key.get() == key
                }
                None => false,
            };
            let record = FallbackKey {
                key_id: id.to_string(),
                key: RawJsonValue::from_string(key)?,
                used,
            };
            batch.put(
                &self.db,
                "fallback_keys",
                &db_key,
                &serde_json::to_vec(&record)?,
            );
        }

        if changed {
            let ticket = self.db.stream.reserve();
            self.stage_change(&mut batch, user, &ticket);
            self.commit_change(batch, user, ticket)?;
        } else {
            self.db.commit(batch)?;
        }
        self.forget_key_summary(user, device);
        self.one_time_key_counts(user, device)
    }

    /// A one-time or fallback key in canonical form; signed keys must carry a valid
    /// signature of the device (when its identity key is known).
    fn checked_one_time_key(
        &self,
        user: &UserId,
        device: &DeviceId,
        id: &OwnedOneTimeKeyId,
        raw: &Raw<OneTimeKey>,
        ed25519: Option<&str>,
    ) -> Result<String> {
        let value: CanonicalJsonValue = serde_json::from_str(raw.json().get())
            .map_err(|e| Error::bad_json(format!("one-time key {id}: {e}")))?;
        match &value {
            CanonicalJsonValue::String(_) => {}
            CanonicalJsonValue::Object(object) => {
                serde_json::from_str::<ruma::encryption::SignedKey>(raw.json().get())
                    .map_err(|e| Error::bad_json(format!("one-time key {id}: {e}")))?;
                if let Some(ed25519) = ed25519 {
                    verify_signature(object, user, &format!("ed25519:{device}"), ed25519)?;
                }
            }
            _ => {
                return Err(Error::bad_json(format!(
                    "one-time key {id} must be a string or a signed key object"
                )));
            }
        }
        Ok(serde_json::to_string(&value)?)
    }

    /// What a sync tells the device of its keys. Counted from storage at the device's
    /// first sync, then kept until its keys change: every sync of every device asks,
    /// and a client keeps some fifty one-time keys uploaded.
    pub fn key_summary(&self, user: &UserId, device: &DeviceId) -> Result<Arc<KeySummary>> {
        let generation = {
            let kept = self.key_summaries.lock();
            if let Some(summary) = kept.devices.get(user).and_then(|d| d.get(device)) {
                return Ok(summary.clone());
            }
            kept.generation
        };
        let summary = Arc::new(KeySummary {
            one_time: self.one_time_key_counts(user, device)?,
            unused_fallback: self.unused_fallback_key_types(user, device)?,
        });
        let mut kept = self.key_summaries.lock();
        // A change since the count began may not be in it: keep nothing then.
        if kept.generation == generation {
            if kept.entries >= MAX_KEPT_SUMMARIES {
                kept.devices.clear();
                kept.entries = 0;
            }
            let previous = kept
                .devices
                .entry(user.to_owned())
                .or_default()
                .insert(device.to_owned(), summary.clone());
            if previous.is_none() {
                kept.entries += 1;
            }
        }
        Ok(summary)
    }

    /// The device's keys changed (after the write): its kept summary goes, and so does
    /// any being counted meanwhile.
    pub(super) fn forget_key_summary(&self, user: &UserId, device: &DeviceId) {
        let mut kept = self.key_summaries.lock();
        kept.generation += 1;
        let removed = kept.devices.get_mut(user).and_then(|d| d.remove(device));
        if removed.is_some() {
            kept.entries -= 1;
        }
    }

    /// How many unclaimed one-time keys the device has, per algorithm.
    pub fn one_time_key_counts(
        &self,
        user: &UserId,
        device: &DeviceId,
    ) -> Result<BTreeMap<OneTimeKeyAlgorithm, u64>> {
        let prefix = str_prefix(&[user.as_str(), device.as_str()]);
        let mut counts: BTreeMap<OneTimeKeyAlgorithm, u64> = BTreeMap::new();
        for item in self.db.scan_prefix("one_time_keys", &prefix) {
            let (k, _) = item?;
            let rest = &k[prefix.len()..];
            let end = rest.iter().position(|b| *b == SEP).unwrap_or(rest.len());
            let algorithm =
                OneTimeKeyAlgorithm::from(String::from_utf8_lossy(&rest[..end]).as_ref());
            *counts.entry(algorithm).or_default() += 1;
        }
        // Clients upload more keys when they see a low count; say 0 rather than nothing.
        counts
            .entry(OneTimeKeyAlgorithm::SignedCurve25519)
            .or_insert(0);
        Ok(counts)
    }

    /// The algorithms for which the device has a fallback key that was not used yet.
    pub fn unused_fallback_key_types(
        &self,
        user: &UserId,
        device: &DeviceId,
    ) -> Result<Vec<String>> {
        let prefix = str_prefix(&[user.as_str(), device.as_str()]);
        let mut out = Vec::new();
        for item in self.db.scan_prefix("fallback_keys", &prefix) {
            let (k, v) = item?;
            let record: FallbackKey = serde_json::from_slice(&v)?;
            if !record.used {
                out.push(String::from_utf8_lossy(&k[prefix.len()..]).into_owned());
            }
        }
        Ok(out)
    }

    /// `/keys/claim`: one one-time key per requested device (the oldest uploaded), or
    /// its fallback key when none is left. Claimed one-time keys are gone for good.
    pub fn claim_keys(
        &self,
        wanted: &BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, OneTimeKeyAlgorithm>>,
    ) -> Result<ClaimedKeys> {
        let _guard = self.claim_lock.lock();
        let mut out = ClaimedKeys::new();
        let mut batch = Batch::default();
        for (user, devices) in wanted {
            for (device, algorithm) in devices {
                let prefix = str_prefix(&[user.as_str(), device.as_str(), algorithm.as_str()]);
                let claimed = match self.db.scan_prefix("one_time_keys", &prefix).next() {
                    Some(item) => {
                        let (k, v) = item?;
                        batch.delete(&self.db, "one_time_keys", &k);
                        let name = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                        Some((
                            format!("{algorithm}:{name}"),
                            String::from_utf8(v.to_vec())
                                .map_err(|_| Error::internal("stored one-time key is not UTF-8"))?,
                        ))
                    }
                    None => {
                        let fb_key = str_key(&[user.as_str(), device.as_str(), algorithm.as_str()]);
                        match self.db.get("fallback_keys", &fb_key)? {
                            Some(v) => {
                                let mut record: FallbackKey = serde_json::from_slice(&v)?;
                                if !record.used {
                                    record.used = true;
                                    batch.put(
                                        &self.db,
                                        "fallback_keys",
                                        &fb_key,
                                        &serde_json::to_vec(&record)?,
                                    );
                                }
                                Some((record.key_id, record.key.get().to_owned()))
                            }
                            None => None,
                        }
                    }
                };
                if let Some((id, key)) = claimed {
                    let Ok(id) = OwnedOneTimeKeyId::try_from(id.as_str()) else {
                        continue;
                    };
                    out.entry(user.clone())
                        .or_default()
                        .entry(device.clone())
                        .or_default()
                        .insert(id, Raw::from_json(RawJsonValue::from_string(key)?));
                }
            }
        }
        self.db.commit(batch)?;
        for (user, devices) in wanted {
            for device in devices.keys() {
                self.forget_key_summary(user, device);
            }
        }
        Ok(out)
    }

    // --- cross-signing ---

    pub fn cross_signing_key(
        &self,
        user: &UserId,
        kind: CrossSigningKind,
    ) -> Result<Option<CanonicalJsonObject>> {
        self.stored_object(
            "cross_signing_keys",
            &str_key(&[user.as_str(), kind.name()]),
        )
    }

    fn cross_signing_public(
        &self,
        user: &UserId,
        kind: CrossSigningKind,
    ) -> Result<Option<String>> {
        match self.cross_signing_key(user, kind)? {
            Some(o) => {
                let typed: CrossSigningKey = serde_json::from_value(serde_json::to_value(&o)?)?;
                Ok(Some(cross_signing_public_key(&typed)?))
            }
            None => Ok(None),
        }
    }

    /// Check uploaded cross-signing keys: shape, owner, usage, and that the self-signing
    /// and user-signing keys are signed by the master key. Returns them canonicalised.
    pub fn check_cross_signing_keys(
        &self,
        user: &UserId,
        master: Option<&RawJsonValue>,
        self_signing: Option<&RawJsonValue>,
        user_signing: Option<&RawJsonValue>,
    ) -> Result<Vec<(CrossSigningKind, CanonicalJsonObject)>> {
        let mut out = Vec::new();
        let mut master_public = None;
        for (kind, raw) in [
            (CrossSigningKind::Master, master),
            (CrossSigningKind::SelfSigning, self_signing),
            (CrossSigningKind::UserSigning, user_signing),
        ] {
            let Some(raw) = raw else { continue };
            let what = format!("{}_key", kind.name());
            let mut object = parse_object(raw, &what)?;
            object.remove("unsigned");
            let typed: CrossSigningKey = serde_json::from_str(raw.get())
                .map_err(|e| Error::bad_json(format!("{what}: {e}")))?;
            if typed.user_id != user {
                return Err(Error::invalid_param(format!(
                    "{what} belongs to another user"
                )));
            }
            if !typed.usage.contains(&kind.usage()) {
                return Err(Error::invalid_param(format!(
                    "{what} must have the usage {:?}",
                    kind.name()
                )));
            }
            let public = cross_signing_public_key(&typed)?;
            match kind {
                CrossSigningKind::Master => master_public = Some(public),
                _ => {
                    let master = match &master_public {
                        Some(m) => m.clone(),
                        None => self
                            .cross_signing_public(user, CrossSigningKind::Master)?
                            .ok_or_else(|| {
                                Error::invalid_param(format!(
                                    "{what} needs a master key to be signed by"
                                ))
                            })?,
                    };
                    verify_signature(&object, user, &format!("ed25519:{master}"), &master)?;
                }
            }
            out.push((kind, object));
        }
        Ok(out)
    }

    /// Whether replacing the user's cross-signing keys with these needs the user to
    /// authenticate: not for the first upload, nor for the same keys again.
    pub fn cross_signing_upload_needs_auth(
        &self,
        user: &UserId,
        keys: &[(CrossSigningKind, CanonicalJsonObject)],
    ) -> Result<bool> {
        let Some(_) = self.cross_signing_key(user, CrossSigningKind::Master)? else {
            return Ok(false);
        };
        for (kind, object) in keys {
            if self.cross_signing_key(user, *kind)?.as_ref() != Some(object) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Store checked cross-signing keys (see [`Self::check_cross_signing_keys`]);
    /// `authenticated` says whether the user proved who they are for this upload.
    /// Without that, keys that would replace others are not stored, also when the
    /// others were stored by another request since the caller looked
    /// ([`Self::cross_signing_upload_needs_auth`]): `Ok(false)` then.
    pub fn store_cross_signing_keys(
        &self,
        user: &UserId,
        keys: &[(CrossSigningKind, CanonicalJsonObject)],
        authenticated: bool,
    ) -> Result<bool> {
        if keys.is_empty() {
            return Ok(true);
        }
        let _one_at_a_time = self.signing_keys_lock.lock();
        if !authenticated && self.cross_signing_upload_needs_auth(user, keys)? {
            return Ok(false);
        }
        let ticket = self.db.stream.reserve();
        let mut batch = Batch::default();
        for (kind, object) in keys {
            batch.put(
                &self.db,
                "cross_signing_keys",
                &str_key(&[user.as_str(), kind.name()]),
                &serde_json::to_vec(object)?,
            );
        }
        self.stage_change(&mut batch, user, &ticket);
        self.commit_change(batch, user, ticket)?;
        Ok(true)
    }

    // --- signatures ---

    /// `/keys/signatures/upload`: keep each signature the uploader made with a key of
    /// theirs that verifies over the object as the server knows it.
    pub fn upload_signatures(
        &self,
        uploader: &UserId,
        signed: &BTreeMap<OwnedUserId, BTreeMap<String, Box<RawJsonValue>>>,
    ) -> Result<SignatureFailures> {
        let mut failures = SignatureFailures::new();
        let mut batch = Batch::default();
        let mut changed = BTreeSet::new();
        for (target, objects) in signed {
            for (key_id, raw) in objects {
                match self.accept_signatures(uploader, target, key_id, raw, &mut batch) {
                    Ok(true) => {
                        // Signatures on another user's master key are visible only to
                        // the signer: only the signer's view changes.
                        changed.insert(if target == uploader {
                            target.clone()
                        } else {
                            uploader.to_owned()
                        });
                    }
                    Ok(false) => {}
                    Err(e) => {
                        failures
                            .entry(target.clone())
                            .or_default()
                            .insert(key_id.clone(), e.to_string());
                    }
                }
            }
        }
        self.db.commit(batch)?;
        for user in changed {
            self.device_list_changed(&user)?;
        }
        Ok(failures)
    }

    /// Stage the valid signatures on one object; whether there were any.
    fn accept_signatures(
        &self,
        uploader: &UserId,
        target: &UserId,
        key_id: &str,
        raw: &RawJsonValue,
        batch: &mut Batch,
    ) -> Result<bool> {
        let object = parse_object(raw, "a signed key")?;
        // The key being signed, as stored.
        let (stored, signer_keys): (CanonicalJsonObject, Vec<(String, String)>) =
            if target == uploader {
                let master = self.cross_signing_public(target, CrossSigningKind::Master)?;
                if master.as_deref() == Some(key_id) {
                    // The user's own master key, signed by their devices.
                    let stored = self
                        .cross_signing_key(target, CrossSigningKind::Master)?
                        .ok_or_else(|| Error::not_found("no master key"))?;
                    let mut signers = Vec::new();
                    for d in self.users.devices(target)? {
                        let device: &DeviceId = d.device_id.as_str().into();
                        if let Some(k) = self.device_ed25519(target, device)? {
                            signers.push((format!("ed25519:{device}"), k));
                        }
                    }
                    (stored, signers)
                } else {
                    // One of the user's devices, signed by their self-signing key.
                    let device: &DeviceId = key_id.into();
                    let stored = self
                        .device_keys(target, device)?
                        .ok_or_else(|| Error::not_found(format!("unknown key {key_id}")))?;
                    let ssk = self
                        .cross_signing_public(target, CrossSigningKind::SelfSigning)?
                        .ok_or_else(|| Error::invalid_param("no self-signing key to sign with"))?;
                    (stored, vec![(format!("ed25519:{ssk}"), ssk)])
                }
            } else {
                // Another user's master key, signed by the uploader's user-signing key.
                let master = self.cross_signing_public(target, CrossSigningKind::Master)?;
                if master.as_deref() != Some(key_id) {
                    return Err(Error::invalid_param(format!(
                        "{key_id} is not {target}'s master key"
                    )));
                }
                let stored = self
                    .cross_signing_key(target, CrossSigningKind::Master)?
                    .ok_or_else(|| Error::not_found("no master key"))?;
                let usk = self
                    .cross_signing_public(uploader, CrossSigningKind::UserSigning)?
                    .ok_or_else(|| Error::invalid_param("no user-signing key to sign with"))?;
                (stored, vec![(format!("ed25519:{usk}"), usk)])
            };
        if signed_part(&stored)? != signed_part(&object)? {
            return Err(Error::invalid_param(
                "the signed object differs from the key the server holds",
            ));
        }
        let mut accepted = false;
        let by_uploader = object
            .get("signatures")
            .and_then(|s| s.as_object())
            .and_then(|s| s.get(uploader.as_str()))
            .and_then(|s| s.as_object());
        for (signer_key_id, public) in &signer_keys {
            let Some(signature) = by_uploader
                .and_then(|s| s.get(signer_key_id))
                .and_then(|s| s.as_str())
            else {
                continue;
            };
            verify_signature(&object, uploader, signer_key_id, public)?;
            batch.put(
                &self.db,
                "key_signatures",
                &str_key(&[target.as_str(), key_id, uploader.as_str(), signer_key_id]),
                signature.as_bytes(),
            );
            accepted = true;
        }
        if !accepted {
            return Err(Error::invalid_param(
                "no signature by a key of the uploader that can sign this object",
            ));
        }
        Ok(accepted)
    }

    /// Merge the stored signatures on `target`'s key `key_id` into `object`, keeping those
    /// made by a signer `visible_to` allows.
    fn merge_signatures(
        &self,
        object: &mut CanonicalJsonObject,
        target: &UserId,
        key_id: &str,
        visible: impl Fn(&str) -> bool,
    ) -> Result<()> {
        let prefix = str_prefix(&[target.as_str(), key_id]);
        for item in self.db.scan_prefix("key_signatures", &prefix) {
            let (k, v) = item?;
            let rest = &k[prefix.len()..];
            let Some(split) = rest.iter().position(|b| *b == SEP) else {
                continue;
            };
            let signer = String::from_utf8_lossy(&rest[..split]);
            let signer_key = String::from_utf8_lossy(&rest[split + 1..]);
            if visible(&signer) {
                add_signature(object, &signer, &signer_key, &String::from_utf8_lossy(&v));
            }
        }
        Ok(())
    }

    /// `/keys/query`: the device keys (all devices when the list is empty) and
    /// cross-signing keys of local users, with the signatures the requester may see.
    pub fn query_keys(
        &self,
        requester: &UserId,
        wanted: &BTreeMap<OwnedUserId, Vec<OwnedDeviceId>>,
    ) -> Result<QueriedKeys> {
        let mut out = QueriedKeys::default();
        for (user, devices) in wanted {
            if !self.users.exists(user)? {
                continue;
            }
            let records = self.users.devices(user)?;
            let mut user_devices = BTreeMap::new();
            for record in records {
                let device: OwnedDeviceId = record.device_id.as_str().into();
                if !devices.is_empty() && !devices.contains(&device) {
                    continue;
                }
                let Some(mut object) = self.device_keys(user, &device)? else {
                    continue;
                };
                self.merge_signatures(&mut object, user, device.as_str(), |signer| {
                    signer == user.as_str()
                })?;
                let mut unsigned = CanonicalJsonObject::new();
                if let Some(name) = record.display_name {
                    unsigned.insert(
                        "device_display_name".to_owned(),
                        CanonicalJsonValue::String(name),
                    );
                }
                object.insert("unsigned".to_owned(), CanonicalJsonValue::Object(unsigned));
                user_devices.insert(device, to_raw(&object)?);
            }
            out.device_keys.insert(user.clone(), user_devices);

            if let Some(mut master) = self.cross_signing_key(user, CrossSigningKind::Master)? {
                if let Some(public) = self.cross_signing_public(user, CrossSigningKind::Master)? {
                    self.merge_signatures(&mut master, user, &public, |signer| {
                        signer == user.as_str() || signer == requester.as_str()
                    })?;
                }
                out.master_keys.insert(user.clone(), to_raw(&master)?);
            }
            if let Some(ssk) = self.cross_signing_key(user, CrossSigningKind::SelfSigning)? {
                out.self_signing_keys.insert(user.clone(), to_raw(&ssk)?);
            }
            if user == requester
                && let Some(usk) = self.cross_signing_key(user, CrossSigningKind::UserSigning)?
            {
                out.user_signing_keys.insert(user.clone(), to_raw(&usk)?);
            }
        }
        Ok(out)
    }
}

/// A failure entry of `/keys/signatures/upload`, in the spec's shape.
pub fn signature_failure_json(message: &str) -> JsonValue {
    serde_json::json!({ "errcode": "M_INVALID_SIGNATURE", "error": message })
}
