//! Aliases, the public room directory, the user directory.

use std::sync::Arc;

use ruma::{
    UInt,
    api::client::{
        alias::{create_alias, delete_alias, get_alias},
        directory::{
            get_public_rooms, get_public_rooms_filtered, get_room_visibility, set_room_visibility,
        },
        room::Visibility,
        user_directory::search_users,
    },
    directory::PublicRoomsChunk,
};

use crate::{
    error::{Error, Result},
    http::Ruma,
    service::{Services, rooms::alias::PublicRoom},
};

pub async fn put_alias(
    s: Arc<Services>,
    req: Ruma<create_alias::v3::Request>,
) -> Result<create_alias::v3::Response> {
    s.check_alias_namespace(&req.room_alias, req.appservice.as_deref())?;
    s.rooms
        .create_alias(&req.room_alias, &req.room_id, req.user())?;
    Ok(create_alias::v3::Response::new())
}

pub async fn get_alias(
    s: Arc<Services>,
    req: Ruma<get_alias::v3::Request>,
) -> Result<get_alias::v3::Response> {
    let room = s
        .resolve_alias(&req.room_alias)
        .await?
        .ok_or_else(|| Error::not_found("No room has this alias"))?;
    Ok(get_alias::v3::Response::new(
        room,
        vec![s.globals.owned_server_name()],
    ))
}

pub async fn remove_alias(
    s: Arc<Services>,
    req: Ruma<delete_alias::v3::Request>,
) -> Result<delete_alias::v3::Response> {
    s.rooms.delete_alias(&req.room_alias, req.user())?;
    Ok(delete_alias::v3::Response::new())
}

fn chunks(rooms: Vec<PublicRoom>) -> Result<Vec<PublicRoomsChunk>> {
    rooms
        .into_iter()
        .map(|r| Ok(serde_json::from_value(serde_json::to_value(r)?)?))
        .collect()
}

pub async fn public_rooms(
    s: Arc<Services>,
    req: Ruma<get_public_rooms::v3::Request>,
) -> Result<get_public_rooms::v3::Response> {
    let limit = req.limit.map(|l| u64::from(l) as usize);
    let (page, total, next, prev) = s.rooms.public_rooms(None, req.since.as_deref(), limit)?;
    let mut res = get_public_rooms::v3::Response::new(chunks(page)?);
    res.next_batch = next;
    res.prev_batch = prev;
    res.total_room_count_estimate = UInt::new(total as u64);
    Ok(res)
}

pub async fn public_rooms_filtered(
    s: Arc<Services>,
    req: Ruma<get_public_rooms_filtered::v3::Request>,
) -> Result<get_public_rooms_filtered::v3::Response> {
    let limit = req.limit.map(|l| u64::from(l) as usize);
    let (page, total, next, prev) = s.rooms.public_rooms(
        req.filter.generic_search_term.as_deref(),
        req.since.as_deref(),
        limit,
    )?;
    let mut res = get_public_rooms_filtered::v3::Response::new();
    res.chunk = chunks(page)?;
    res.next_batch = next;
    res.prev_batch = prev;
    res.total_room_count_estimate = UInt::new(total as u64);
    Ok(res)
}

pub async fn visibility(
    s: Arc<Services>,
    req: Ruma<get_room_visibility::v3::Request>,
) -> Result<get_room_visibility::v3::Response> {
    s.rooms.timeline.room(&req.room_id)?;
    let v = if s.rooms.is_public(&req.room_id)? {
        Visibility::Public
    } else {
        Visibility::Private
    };
    Ok(get_room_visibility::v3::Response::new(v))
}

pub async fn set_visibility(
    s: Arc<Services>,
    req: Ruma<set_room_visibility::v3::Request>,
) -> Result<set_room_visibility::v3::Response> {
    let (short, record) = s.rooms.timeline.room(&req.room_id)?;
    let power = s.rooms.timeline.power_levels(short, &record)?;
    let admin = s.users.get(req.user())?.is_some_and(|r| r.admin);
    if !admin
        && !power
            .levels
            .user_can_send_state(req.user(), ruma::events::StateEventType::RoomCanonicalAlias)
    {
        return Err(Error::forbidden("Only room moderators can publish a room"));
    }
    s.rooms
        .set_public(&req.room_id, req.visibility == Visibility::Public)?;
    Ok(set_room_visibility::v3::Response::new())
}

pub async fn search(
    s: Arc<Services>,
    req: Ruma<search_users::v3::Request>,
) -> Result<search_users::v3::Response> {
    let limit = u64::from(req.limit).clamp(1, 100) as usize;
    let (found, limited) = s.rooms.search_users(req.user(), &req.search_term, limit)?;
    let results = found
        .into_iter()
        .map(|(id, name, avatar)| {
            let mut u = search_users::v3::User::new(id);
            u.display_name = name;
            u.avatar_url = avatar.map(Into::into);
            u
        })
        .collect();
    Ok(search_users::v3::Response::new(results, limited))
}
