//! Server-side key backup (`/room_keys`).

use std::{collections::BTreeMap, sync::Arc};

use ruma::{
    UInt,
    api::client::backup::{
        RoomKeyBackup, add_backup_keys, add_backup_keys_for_room, add_backup_keys_for_session,
        create_backup_version, delete_backup_keys, delete_backup_keys_for_room,
        delete_backup_keys_for_session, delete_backup_version, get_backup_info, get_backup_keys,
        get_backup_keys_for_room, get_backup_keys_for_session, get_latest_backup_info,
        update_backup_version,
    },
    serde::Raw,
};

use crate::{
    error::{Error, Result},
    http::Ruma,
    service::{Services, e2ee::backup::BackedUpKeys},
};

fn count(n: u64) -> UInt {
    UInt::new_saturating(n)
}

pub async fn create_version(
    s: Arc<Services>,
    req: Ruma<create_backup_version::v3::Request>,
) -> Result<create_backup_version::v3::Response> {
    let version = s
        .e2ee
        .create_backup_version(req.user(), req.algorithm.json())?;
    Ok(create_backup_version::v3::Response::new(version))
}

pub async fn latest_version(
    s: Arc<Services>,
    req: Ruma<get_latest_backup_info::v3::Request>,
) -> Result<get_latest_backup_info::v3::Response> {
    let v = s.e2ee.backup_version(req.user(), None)?;
    Ok(get_latest_backup_info::v3::Response::new(
        Raw::from_json(v.algorithm),
        count(v.count),
        v.etag,
        v.version,
    ))
}

pub async fn get_version(
    s: Arc<Services>,
    req: Ruma<get_backup_info::v3::Request>,
) -> Result<get_backup_info::v3::Response> {
    let v = s.e2ee.backup_version(req.user(), Some(&req.version))?;
    Ok(get_backup_info::v3::Response::new(
        Raw::from_json(v.algorithm),
        count(v.count),
        v.etag,
        v.version,
    ))
}

pub async fn update_version(
    s: Arc<Services>,
    req: Ruma<update_backup_version::v3::Request>,
) -> Result<update_backup_version::v3::Response> {
    s.e2ee
        .update_backup_version(req.user(), &req.version, req.algorithm.json())?;
    Ok(update_backup_version::v3::Response::new())
}

pub async fn delete_version(
    s: Arc<Services>,
    req: Ruma<delete_backup_version::v3::Request>,
) -> Result<delete_backup_version::v3::Response> {
    s.e2ee.delete_backup_version(req.user(), &req.version)?;
    Ok(delete_backup_version::v3::Response::new())
}

fn sessions_json(
    sessions: &BTreeMap<String, Raw<ruma::api::client::backup::KeyBackupData>>,
) -> BTreeMap<String, Box<serde_json::value::RawValue>> {
    sessions
        .iter()
        .map(|(id, data)| (id.clone(), data.json().to_owned()))
        .collect()
}

fn to_room_backup(sessions: BTreeMap<String, Box<serde_json::value::RawValue>>) -> RoomKeyBackup {
    RoomKeyBackup::new(
        sessions
            .into_iter()
            .map(|(id, data)| (id, Raw::from_json(data)))
            .collect(),
    )
}

pub async fn put_keys(
    s: Arc<Services>,
    req: Ruma<add_backup_keys::v3::Request>,
) -> Result<add_backup_keys::v3::Response> {
    let keys: BackedUpKeys = req
        .rooms
        .iter()
        .map(|(room, backup)| (room.clone(), sessions_json(&backup.sessions)))
        .collect();
    let (n, etag) = s.e2ee.put_backup_keys(req.user(), &req.version, &keys)?;
    Ok(add_backup_keys::v3::Response::new(etag, count(n)))
}

pub async fn put_room_keys(
    s: Arc<Services>,
    req: Ruma<add_backup_keys_for_room::v3::Request>,
) -> Result<add_backup_keys_for_room::v3::Response> {
    let keys = BackedUpKeys::from([(req.room_id.clone(), sessions_json(&req.sessions))]);
    let (n, etag) = s.e2ee.put_backup_keys(req.user(), &req.version, &keys)?;
    Ok(add_backup_keys_for_room::v3::Response::new(etag, count(n)))
}

pub async fn put_session_key(
    s: Arc<Services>,
    req: Ruma<add_backup_keys_for_session::v3::Request>,
) -> Result<add_backup_keys_for_session::v3::Response> {
    let keys = BackedUpKeys::from([(
        req.room_id.clone(),
        BTreeMap::from([(req.session_id.clone(), req.session_data.json().to_owned())]),
    )]);
    let (n, etag) = s.e2ee.put_backup_keys(req.user(), &req.version, &keys)?;
    Ok(add_backup_keys_for_session::v3::Response::new(
        etag,
        count(n),
    ))
}

pub async fn get_keys(
    s: Arc<Services>,
    req: Ruma<get_backup_keys::v3::Request>,
) -> Result<get_backup_keys::v3::Response> {
    let keys = s.e2ee.backup_keys(req.user(), &req.version, None, None)?;
    Ok(get_backup_keys::v3::Response::new(
        keys.into_iter()
            .map(|(room, sessions)| (room, to_room_backup(sessions)))
            .collect(),
    ))
}

pub async fn get_room_keys(
    s: Arc<Services>,
    req: Ruma<get_backup_keys_for_room::v3::Request>,
) -> Result<get_backup_keys_for_room::v3::Response> {
    let mut keys =
        s.e2ee
            .backup_keys(req.user(), &req.version, Some(req.room_id.as_str()), None)?;
    let sessions = keys.remove(&req.room_id).unwrap_or_default();
    Ok(get_backup_keys_for_room::v3::Response::new(
        to_room_backup(sessions).sessions,
    ))
}

pub async fn get_session_key(
    s: Arc<Services>,
    req: Ruma<get_backup_keys_for_session::v3::Request>,
) -> Result<get_backup_keys_for_session::v3::Response> {
    let mut keys = s.e2ee.backup_keys(
        req.user(),
        &req.version,
        Some(req.room_id.as_str()),
        Some(&req.session_id),
    )?;
    let data = keys
        .remove(&req.room_id)
        .and_then(|mut sessions| sessions.remove(&req.session_id))
        .ok_or_else(|| Error::not_found("No backed-up key for this session"))?;
    Ok(get_backup_keys_for_session::v3::Response::new(
        Raw::from_json(data),
    ))
}

pub async fn delete_keys(
    s: Arc<Services>,
    req: Ruma<delete_backup_keys::v3::Request>,
) -> Result<delete_backup_keys::v3::Response> {
    let (n, etag) = s
        .e2ee
        .delete_backup_keys(req.user(), &req.version, None, None)?;
    Ok(delete_backup_keys::v3::Response::new(etag, count(n)))
}

pub async fn delete_room_keys(
    s: Arc<Services>,
    req: Ruma<delete_backup_keys_for_room::v3::Request>,
) -> Result<delete_backup_keys_for_room::v3::Response> {
    let (n, etag) =
        s.e2ee
            .delete_backup_keys(req.user(), &req.version, Some(req.room_id.as_str()), None)?;
    Ok(delete_backup_keys_for_room::v3::Response::new(
        etag,
        count(n),
    ))
}

pub async fn delete_session_key(
    s: Arc<Services>,
    req: Ruma<delete_backup_keys_for_session::v3::Request>,
) -> Result<delete_backup_keys_for_session::v3::Response> {
    let (n, etag) = s.e2ee.delete_backup_keys(
        req.user(),
        &req.version,
        Some(req.room_id.as_str()),
        Some(&req.session_id),
    )?;
    Ok(delete_backup_keys_for_session::v3::Response::new(
        etag,
        count(n),
    ))
}
