//! `GET /sync`.

use std::{sync::Arc, time::Duration};

use axum::response::{IntoResponse, Response};
use ruma::api::client::{
    filter::{FilterDefinition, RoomEventFilter},
    sync::sync_events::{self, v3::Filter},
};
use serde_json::Value as JsonValue;

use super::message::event_filter;
use crate::{
    error::{Error, Result},
    http::Ruma,
    service::{
        Services,
        sync::{SyncFilter, SyncRequest, parse_since, sync},
    },
};

fn limit_of(f: &RoomEventFilter, default: usize) -> usize {
    f.limit
        .map(|l| u64::from(l).clamp(1, 1000) as usize)
        .unwrap_or(default)
}

pub fn sync_filter(def: &FilterDefinition) -> SyncFilter {
    let room = &def.room;
    SyncFilter {
        rooms: room.rooms.as_ref().map(|r| r.iter().cloned().collect()),
        not_rooms: room.not_rooms.iter().cloned().collect(),
        include_leave: room.include_leave,
        timeline: event_filter(&room.timeline),
        timeline_limit: limit_of(&room.timeline, 10),
        thread_counts: room.timeline.unread_thread_notifications,
        state: event_filter(&room.state),
        ephemeral: event_filter(&room.ephemeral),
        room_account_data: event_filter(&room.account_data),
        account_data: crate::service::rooms::read::EventFilter {
            types: def.account_data.types.clone(),
            not_types: def.account_data.not_types.clone(),
            ..Default::default()
        },
        presence: crate::service::rooms::read::EventFilter {
            types: def.presence.types.clone(),
            not_types: def.presence.not_types.clone(),
            ..Default::default()
        },
    }
}

/// Negative or absurd `limit`s are clamped into 1..=1000 rather than refused.
fn clamp_limits(value: &mut JsonValue) {
    match value {
        JsonValue::Object(map) => {
            for (k, v) in map.iter_mut() {
                if k == "limit" && v.is_number() {
                    let n = v.as_i64().unwrap_or(i64::MAX).clamp(1, 1000);
                    *v = JsonValue::from(n);
                } else {
                    clamp_limits(v);
                }
            }
        }
        JsonValue::Array(items) => items.iter_mut().for_each(clamp_limits),
        _ => {}
    }
}

pub async fn sync_events(
    s: Arc<Services>,
    req: Ruma<sync_events::v3::Request>,
) -> Result<Response> {
    let filter = match &req.filter {
        None => SyncFilter::default(),
        Some(Filter::FilterDefinition(def)) => sync_filter(def),
        Some(Filter::FilterId(id)) if id.trim_start().starts_with('{') => {
            // Inline JSON that ruma refused, typically for a negative limit: clamp the
            // limits and try again; anything else is bad JSON.
            let mut value: JsonValue = serde_json::from_str(id)
                .map_err(|_| Error::bad_json("the filter is not valid JSON"))?;
            clamp_limits(&mut value);
            let def: FilterDefinition = serde_json::from_value(value)
                .map_err(|e| Error::bad_json(format!("invalid filter: {e}")))?;
            sync_filter(&def)
        }
        Some(Filter::FilterId(id)) => {
            let stored = s
                .users
                .filter(req.user(), id)?
                .ok_or_else(|| Error::invalid_param(format!("no filter with id {id}")))?;
            let def: FilterDefinition = serde_json::from_value(stored)
                .map_err(|e| Error::bad_json(format!("stored filter is invalid: {e}")))?;
            sync_filter(&def)
        }
        Some(_) => return Err(Error::bad_json("unsupported filter")),
    };
    let since = req
        .since
        .as_deref()
        .map(|t| parse_since(t, s.db.stream.visible()))
        .transpose()?;
    let identity = format!(
        "{:?}|{}|{}|{:?}",
        req.since,
        req.full_state,
        req.set_presence.as_str(),
        req.filter
    );
    let request = SyncRequest {
        identity,
        client_session: req.client_session().to_owned(),
        since: since.map(|t| t.pos),
        to_device_acked: since.map(|t| t.to_device),
        full_state: req.full_state,
        timeout: req.timeout.unwrap_or(Duration::ZERO),
        filter,
        set_presence: Some(req.set_presence.as_str().to_owned()),
    };
    let answer = sync(&s, req.user(), req.device().as_str(), request).await?;
    Ok(([(http::header::CONTENT_TYPE, "application/json")], answer).into_response())
}
