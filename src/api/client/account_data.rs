//! Global and per-room account data, room tags, filters.

use std::sync::Arc;

use ruma::{
    RoomId, UserId,
    api::client::{
        config::{
            get_global_account_data, get_room_account_data, set_global_account_data,
            set_room_account_data,
        },
        filter::{create_filter, get_filter},
        tag::{create_tag, delete_tag, get_tags},
    },
    events::tag::Tags,
    serde::Raw,
};
use serde_json::{Value as JsonValue, json};

use crate::{
    error::{Error, Result},
    http::Ruma,
    service::Services,
};

fn ensure_self(req_user: &UserId, target: &UserId) -> Result<()> {
    if req_user != target {
        return Err(Error::forbidden(
            "You can only access your own account data",
        ));
    }
    Ok(())
}

fn ensure_room(s: &Services, room: &RoomId) -> Result<()> {
    if s.rooms.timeline.room_short(room)?.is_none() {
        return Err(Error::not_found("Unknown room"));
    }
    Ok(())
}

fn raw<T>(v: &JsonValue) -> Result<Raw<T>> {
    Ok(Raw::from_json(serde_json::value::to_raw_value(v)?))
}

fn object(raw: &Raw<impl Sized>) -> Result<JsonValue> {
    let v: JsonValue = serde_json::from_str(raw.json().get())
        .map_err(|_| Error::bad_json("account data must be JSON"))?;
    if !v.is_object() {
        return Err(Error::bad_json(
            "account data content must be a JSON object",
        ));
    }
    Ok(v)
}

pub async fn set_global(
    s: Arc<Services>,
    req: Ruma<set_global_account_data::v3::Request>,
) -> Result<set_global_account_data::v3::Response> {
    ensure_self(req.user(), &req.user_id)?;
    let kind = req.event_type.to_string();
    if kind == "m.fully_read" || kind == "m.push_rules" {
        return Err(Error::bad_json(format!(
            "{kind} cannot be set through account data"
        )));
    }
    s.users
        .set_account_data(req.user(), None, &kind, &object(&req.data)?)?;
    Ok(set_global_account_data::v3::Response::new())
}

pub async fn get_global(
    s: Arc<Services>,
    req: Ruma<get_global_account_data::v3::Request>,
) -> Result<get_global_account_data::v3::Response> {
    ensure_self(req.user(), &req.user_id)?;
    let v = s
        .users
        .account_data(req.user(), None, &req.event_type.to_string())?
        .ok_or_else(|| Error::not_found("No account data of this type"))?;
    Ok(get_global_account_data::v3::Response::new(raw(&v)?))
}

pub async fn set_room(
    s: Arc<Services>,
    req: Ruma<set_room_account_data::v3::Request>,
) -> Result<set_room_account_data::v3::Response> {
    ensure_self(req.user(), &req.user_id)?;
    ensure_room(&s, &req.room_id)?;
    let kind = req.event_type.to_string();
    if kind == "m.fully_read" {
        return Err(Error::bad_json("m.fully_read is set through /read_markers"));
    }
    s.users.set_account_data(
        req.user(),
        Some(req.room_id.as_str()),
        &kind,
        &object(&req.data)?,
    )?;
    Ok(set_room_account_data::v3::Response::new())
}

pub async fn get_room(
    s: Arc<Services>,
    req: Ruma<get_room_account_data::v3::Request>,
) -> Result<get_room_account_data::v3::Response> {
    ensure_self(req.user(), &req.user_id)?;
    let v = s
        .users
        .account_data(
            req.user(),
            Some(req.room_id.as_str()),
            &req.event_type.to_string(),
        )?
        .ok_or_else(|| Error::not_found("No account data of this type"))?;
    Ok(get_room_account_data::v3::Response::new(raw(&v)?))
}

/// A room's `m.tag` content as stored, with a `tags` object (an empty one when none
/// is stored, or when what a client stored through the generic endpoint has none).
fn tags_content(stored: Option<JsonValue>) -> JsonValue {
    let mut content = match stored {
        Some(JsonValue::Object(o)) => JsonValue::Object(o),
        _ => json!({}),
    };
    if !content["tags"].is_object() {
        content["tags"] = json!({});
    }
    content
}

fn load_tags(s: &Services, user: &UserId, room: &RoomId) -> Result<JsonValue> {
    Ok(tags_content(s.users.account_data(
        user,
        Some(room.as_str()),
        "m.tag",
    )?))
}

pub async fn tags(
    s: Arc<Services>,
    req: Ruma<get_tags::v3::Request>,
) -> Result<get_tags::v3::Response> {
    ensure_self(req.user(), &req.user_id)?;
    let content = load_tags(&s, req.user(), &req.room_id)?;
    let tags: Tags =
        serde_json::from_value(content.get("tags").cloned().unwrap_or_else(|| json!({})))
            .unwrap_or_default();
    Ok(get_tags::v3::Response::new(tags))
}

pub async fn put_tag(
    s: Arc<Services>,
    req: Ruma<create_tag::v3::Request>,
) -> Result<create_tag::v3::Response> {
    ensure_self(req.user(), &req.user_id)?;
    ensure_room(&s, &req.room_id)?;
    if req.tag.len() > 255 {
        return Err(Error::bad_json("Tags may be at most 255 bytes"));
    }
    let info = serde_json::to_value(&req.tag_info)?;
    s.users
        .edit_account_data(req.user(), Some(req.room_id.as_str()), "m.tag", |stored| {
            let mut content = tags_content(stored);
            content["tags"][&req.tag] = info;
            Ok(content)
        })?;
    Ok(create_tag::v3::Response::new())
}

pub async fn remove_tag(
    s: Arc<Services>,
    req: Ruma<delete_tag::v3::Request>,
) -> Result<delete_tag::v3::Response> {
    ensure_self(req.user(), &req.user_id)?;
    s.users
        .edit_account_data(req.user(), Some(req.room_id.as_str()), "m.tag", |stored| {
            let mut content = tags_content(stored);
            if let Some(tags) = content.get_mut("tags").and_then(|t| t.as_object_mut()) {
                tags.remove(&req.tag);
            }
            Ok(content)
        })?;
    Ok(delete_tag::v3::Response::new())
}

pub async fn create(
    s: Arc<Services>,
    req: Ruma<create_filter::v3::Request>,
) -> Result<create_filter::v3::Response> {
    ensure_self(req.user(), &req.user_id)?;
    let id = s
        .users
        .create_filter(req.user(), &serde_json::to_value(&req.filter)?)?;
    Ok(create_filter::v3::Response::new(id))
}

pub async fn get(
    s: Arc<Services>,
    req: Ruma<get_filter::v3::Request>,
) -> Result<get_filter::v3::Response> {
    ensure_self(req.user(), &req.user_id)?;
    let v = s
        .users
        .filter(req.user(), &req.filter_id)?
        .ok_or_else(|| Error::not_found("No such filter"))?;
    Ok(get_filter::v3::Response::new(serde_json::from_value(v)?))
}
