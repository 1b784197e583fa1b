//! Sending events, `/messages`, redaction.

use std::sync::Arc;

use ruma::{
    api::Direction,
    api::client::{
        context::get_context,
        filter::RoomEventFilter,
        message::{get_message_events, send_message_event},
        redact::redact_event,
        room::get_event_by_timestamp,
    },
    events::TimelineEventType,
    serde::Raw,
};
use serde_json::Value as JsonValue;

use crate::{
    error::{Error, Result},
    http::Ruma,
    service::{
        Services,
        rooms::{
            read::EventFilter,
            timeline::{NewEvent, Txn},
        },
    },
};

pub(super) fn content_of<T>(raw: &Raw<T>) -> Result<JsonValue> {
    let v: JsonValue =
        serde_json::from_str(raw.json().get()).map_err(|e| Error::bad_json(e.to_string()))?;
    if !v.is_object() {
        return Err(Error::bad_json("event content must be a JSON object"));
    }
    Ok(v)
}

pub async fn send(
    s: Arc<Services>,
    req: Ruma<send_message_event::v3::Request>,
) -> Result<send_message_event::v3::Response> {
    let kind = TimelineEventType::from(req.event_type.to_string());
    if matches!(kind, TimelineEventType::RoomRedaction) {
        return Err(Error::bad_json("use the /redact endpoint to redact events"));
    }
    let mut event = NewEvent::message(kind, content_of(&req.body)?);
    event.txn = Some(Txn {
        client_session: req.client_session().to_owned(),
        id: req.txn_id.to_string(),
        endpoint: "send",
    });
    event.timestamp = req.massaged_ts;
    let event_id = s.rooms.send(&req.room_id, req.user(), event).await?;
    Ok(send_message_event::v3::Response::new(event_id))
}

pub async fn redact(
    s: Arc<Services>,
    req: Ruma<redact_event::v3::Request>,
) -> Result<redact_event::v3::Response> {
    let mut content = serde_json::json!({});
    if let Some(reason) = &req.reason {
        content["reason"] = JsonValue::String(reason.clone());
    }
    let mut event = NewEvent::message(TimelineEventType::RoomRedaction, content);
    event.redacts = Some(req.event_id.clone());
    event.txn = Some(Txn {
        client_session: req.client_session().to_owned(),
        id: req.txn_id.to_string(),
        endpoint: "redact",
    });
    let event_id = s.rooms.send(&req.room_id, req.user(), event).await?;
    Ok(redact_event::v3::Response::new(event_id))
}

/// The parts of a RoomEventFilter that Salon applies.
pub fn event_filter(f: &RoomEventFilter) -> EventFilter {
    EventFilter {
        types: f.types.clone(),
        not_types: f.not_types.clone(),
        senders: f
            .senders
            .as_ref()
            .map(|v| v.iter().map(|u| u.to_string()).collect()),
        not_senders: f.not_senders.iter().map(|u| u.to_string()).collect(),
        contains_url: match f.url_filter {
            Some(ruma::api::client::filter::UrlFilter::EventsWithUrl) => Some(true),
            Some(ruma::api::client::filter::UrlFilter::EventsWithoutUrl) => Some(false),
            _ => None,
        },
        lazy_load_members: !f.lazy_load_options.is_disabled(),
    }
}

pub async fn messages(
    s: Arc<Services>,
    req: Ruma<get_message_events::v3::Request>,
) -> Result<get_message_events::v3::Response> {
    let f = &req.filter;
    let filter = event_filter(f);
    let limit = usize::try_from(u64::from(req.limit))
        .unwrap_or(1000)
        .min(f.limit.map(|l| u64::from(l) as usize).unwrap_or(usize::MAX));
    let page = s.rooms.messages(
        &req.room_id,
        req.user(),
        Some(req.client_session()),
        req.from.as_deref(),
        req.to.as_deref(),
        req.dir == Direction::Backward,
        limit,
        &filter,
    )?;
    let mut res = get_message_events::v3::Response::new();
    res.start = page.start;
    res.end = page.end;
    res.chunk = page.chunk.into_iter().map(Raw::from_json).collect();
    res.state = page.state.into_iter().map(Raw::from_json).collect();
    Ok(res)
}

pub async fn context(
    s: Arc<Services>,
    req: Ruma<get_context::v3::Request>,
) -> Result<get_context::v3::Response> {
    let filter = event_filter(&req.filter);
    let limit = usize::try_from(u64::from(req.limit))
        .unwrap_or(100)
        .min(100);
    let ctx = s.rooms.context(
        &req.room_id,
        req.user(),
        req.client_session(),
        &req.event_id,
        limit,
        &filter,
    )?;
    let raw =
        |v: &JsonValue| -> Result<_> { Ok(Raw::from_json(serde_json::value::to_raw_value(v)?)) };
    let mut res = get_context::v3::Response::new();
    res.start = Some(ctx.start);
    res.end = Some(ctx.end);
    res.event = Some(raw(&ctx.event)?);
    res.events_before = ctx.before.iter().map(raw).collect::<Result<_>>()?;
    res.events_after = ctx.after.iter().map(raw).collect::<Result<_>>()?;
    res.state = ctx
        .state
        .iter()
        .map(|v| Ok(Raw::from_json(serde_json::value::to_raw_value(v)?)))
        .collect::<Result<_>>()?;
    Ok(res)
}

pub async fn timestamp_to_event(
    s: Arc<Services>,
    req: Ruma<get_event_by_timestamp::v1::Request>,
) -> Result<get_event_by_timestamp::v1::Response> {
    let (event_id, ts) = s.rooms.event_at_timestamp(
        &req.room_id,
        req.user(),
        req.ts,
        req.dir == Direction::Forward,
    )?;
    Ok(get_event_by_timestamp::v1::Response::new(event_id, ts))
}
