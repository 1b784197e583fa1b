//! Room state: read all, read one, send.

use std::sync::Arc;

use ruma::{
    api::client::state::{get_state_event_for_key, get_state_events, send_state_event},
    events::TimelineEventType,
    serde::Raw,
};

use super::message::content_of;
use crate::{
    error::{Error, Result},
    http::Ruma,
    service::{Services, rooms::timeline::NewEvent},
};

pub async fn all(
    s: Arc<Services>,
    req: Ruma<get_state_events::v3::Request>,
) -> Result<get_state_events::v3::Response> {
    let events = s.rooms.state_events(&req.room_id, req.user())?;
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        out.push(Raw::from_json(serde_json::value::to_raw_value(
            &s.rooms.timeline.to_client(&e, Some(req.client_session()))?,
        )?));
    }
    Ok(get_state_events::v3::Response::new(out))
}

pub async fn one(
    s: Arc<Services>,
    req: Ruma<get_state_event_for_key::v3::Request>,
) -> Result<get_state_event_for_key::v3::Response> {
    let event = s.rooms.state_event(
        &req.room_id,
        req.user(),
        &req.event_type.to_string(),
        &req.state_key,
    )?;
    let json = match req.format {
        get_state_event_for_key::v3::StateEventFormat::Event => s
            .rooms
            .timeline
            .to_client(&event, Some(req.client_session()))?,
        _ => event.pdu.content_json(),
    };
    Ok(get_state_event_for_key::v3::Response::new(
        serde_json::value::to_raw_value(&json)?,
    ))
}

pub async fn send(
    s: Arc<Services>,
    req: Ruma<send_state_event::v3::Request>,
) -> Result<send_state_event::v3::Response> {
    let kind = TimelineEventType::from(req.event_type.to_string());
    if kind == TimelineEventType::RoomCreate {
        return Err(Error::forbidden("m.room.create cannot be sent"));
    }
    let content = content_of(&req.body)?;
    if kind == TimelineEventType::RoomMember {
        // Membership goes through the membership rules (profiles, restricted joins).
        let target = ruma::UserId::parse(req.state_key.as_str()).map_err(|_| {
            Error::invalid_param("the state key of m.room.member must be a user id")
        })?;
        let membership = content
            .get("membership")
            .and_then(|m| m.as_str())
            .ok_or_else(|| Error::bad_json("membership is required"))?
            .to_owned();
        let event_id = s
            .rooms
            .set_membership(
                &req.room_id,
                req.user(),
                &target,
                &membership,
                None,
                Some(content),
            )
            .await?;
        return Ok(send_state_event::v3::Response::new(event_id));
    }
    if kind == TimelineEventType::RoomCanonicalAlias {
        for alias in content.get("alias").into_iter().chain(
            content
                .get("alt_aliases")
                .and_then(|a| a.as_array())
                .into_iter()
                .flatten(),
        ) {
            let alias = alias
                .as_str()
                .and_then(|a| ruma::RoomAliasId::parse(a).ok())
                .ok_or_else(|| Error::bad_json("invalid alias in m.room.canonical_alias"))?;
            if s.rooms.alias_target(&alias)?.as_deref() != Some(&*req.room_id) {
                return Err(Error::Matrix {
                    status: http::StatusCode::BAD_REQUEST,
                    kind: ruma::api::error::ErrorKind::BadAlias,
                    message: format!("{alias} does not point to this room"),
                });
            }
        }
    }
    let mut event = NewEvent::state(kind, req.state_key.clone(), content);
    event.timestamp = req.massaged_ts;
    let event_id = s.rooms.send(&req.room_id, req.user(), event).await?;
    Ok(send_state_event::v3::Response::new(event_id))
}
