//! Typing, receipts, read markers and presence.

use std::sync::Arc;

use ruma::{
    RoomId, UserId,
    api::client::{
        presence::{get_presence, set_presence},
        read_marker::set_read_marker,
        receipt::create_receipt::{self, v3::ReceiptType},
        typing::create_typing_event::{self, v3::Typing},
    },
    events::receipt::ReceiptThread,
    presence::PresenceState,
};
use serde_json::json;

use crate::{
    error::{Error, Result},
    http::Ruma,
    service::{Services, ephemeral::Receipt, sync::peers, users::now_ms},
};

fn joined_room(s: &Services, room: &RoomId, user: &UserId) -> Result<u64> {
    let short = s
        .rooms
        .timeline
        .room_short(room)?
        .ok_or_else(|| Error::not_found("Unknown room"))?;
    if s.rooms.membership(room, user)?.as_deref() != Some("join") {
        return Err(Error::forbidden("You are not a member of this room"));
    }
    Ok(short)
}

pub async fn typing(
    s: Arc<Services>,
    req: Ruma<create_typing_event::v3::Request>,
) -> Result<create_typing_event::v3::Response> {
    if req.user_id != req.user() {
        return Err(Error::forbidden("You can only set your own typing state"));
    }
    let short = joined_room(&s, &req.room_id, req.user())?;
    let timeout = match &req.state {
        Typing::Yes(info) => Some(info.timeout),
        _ => None,
    };
    s.ephemeral
        .set_typing(&req.room_id, req.user(), timeout, s.members.joined(short)?);
    Ok(create_typing_event::v3::Response::new())
}

/// Record a receipt (or the fully-read marker) on an event of the room.
fn mark(
    s: &Services,
    room: &RoomId,
    user: &UserId,
    kind: &str,
    thread: Option<String>,
    event: &ruma::EventId,
) -> Result<()> {
    let short = joined_room(s, room, user)?;
    let stored = s
        .rooms
        .timeline
        .stored_by_id(event)?
        .filter(|e| e.room_id == room)
        .ok_or_else(|| Error::not_found("Unknown event"))?;
    if !s.rooms.can_see_event(user, &stored)? {
        return Err(Error::not_found("Unknown event"));
    }
    if kind == "m.fully_read" {
        return s.users.set_account_data(
            user,
            Some(room.as_str()),
            "m.fully_read",
            &json!({ "event_id": event }),
        );
    }
    let receipt = Receipt {
        user: user.to_owned(),
        kind: kind.to_owned(),
        thread,
        event_id: event.to_owned(),
        ts: now_ms(),
    };
    s.ephemeral
        .set_receipt(short, receipt, s.members.joined(short)?)
}

pub async fn receipt(
    s: Arc<Services>,
    req: Ruma<create_receipt::v3::Request>,
) -> Result<create_receipt::v3::Response> {
    let kind = match &req.receipt_type {
        ReceiptType::Read => "m.read".to_owned(),
        ReceiptType::ReadPrivate => "m.read.private".to_owned(),
        other if other.as_str() == "m.fully_read" => "m.fully_read".to_owned(),
        other => {
            return Err(Error::invalid_param(format!(
                "unknown receipt type {}",
                other.as_str()
            )));
        }
    };
    let thread = match &req.thread {
        ReceiptThread::Unthreaded => None,
        ReceiptThread::Main => Some("main".to_owned()),
        ReceiptThread::Thread(id) => Some(id.to_string()),
        _ => return Err(Error::invalid_param("unknown thread_id")),
    };
    if kind == "m.fully_read" && thread.is_some() {
        return Err(Error::invalid_param("m.fully_read cannot be threaded"));
    }
    mark(&s, &req.room_id, req.user(), &kind, thread, &req.event_id)?;
    Ok(create_receipt::v3::Response::new())
}

pub async fn read_markers(
    s: Arc<Services>,
    req: Ruma<set_read_marker::v3::Request>,
) -> Result<set_read_marker::v3::Response> {
    if let Some(e) = &req.fully_read {
        mark(&s, &req.room_id, req.user(), "m.fully_read", None, e)?;
    }
    if let Some(e) = &req.read_receipt {
        mark(&s, &req.room_id, req.user(), "m.read", None, e)?;
    }
    if let Some(e) = &req.private_read_receipt {
        mark(&s, &req.room_id, req.user(), "m.read.private", None, e)?;
    }
    Ok(set_read_marker::v3::Response::new())
}

pub async fn get_status(
    s: Arc<Services>,
    req: Ruma<get_presence::v3::Request>,
) -> Result<get_presence::v3::Response> {
    if req.user_id != req.user() && !peers(&s, req.user())?.contains(&req.user_id) {
        return Err(Error::forbidden("You do not share a room with this user"));
    }
    if s.users.get(&req.user_id)?.is_none_or(|r| r.deactivated) {
        return Err(Error::not_found("No such user"));
    }
    let mut res = get_presence::v3::Response::new(PresenceState::Offline);
    if let Some(p) = s.ephemeral.presence(&req.user_id) {
        res.presence = PresenceState::from(p.state.as_str());
        res.status_msg = p.status_msg.clone();
        let ago = now_ms().saturating_sub(p.last_active_ms);
        res.last_active_ago = Some(std::time::Duration::from_millis(ago));
        res.currently_active = Some(p.state == "online" && ago < 5 * 60 * 1000);
    }
    Ok(res)
}

pub async fn set_status(
    s: Arc<Services>,
    req: Ruma<set_presence::v3::Request>,
) -> Result<set_presence::v3::Response> {
    if req.user_id != req.user() {
        return Err(Error::forbidden("You can only set your own presence"));
    }
    let state = match req.presence {
        PresenceState::Online => "online",
        PresenceState::Unavailable => "unavailable",
        PresenceState::Offline => "offline",
        _ => {
            return Err(Error::invalid_param(
                "presence must be online, unavailable or offline",
            ));
        }
    };
    if req.status_msg.as_ref().is_some_and(|m| m.len() > 1024) {
        return Err(Error::invalid_param(
            "status messages may be at most 1024 bytes",
        ));
    }
    s.ephemeral.set_presence(
        req.user(),
        state,
        Some(req.status_msg.clone()),
        peers(&s, req.user())?,
    );
    Ok(set_presence::v3::Response::new())
}
