//! `createRoom`, `/event/{eventId}`, `/aliases`, room upgrades.

use std::sync::Arc;

use ruma::{
    api::client::room::{aliases, create_room, get_room_event, upgrade_room},
    serde::Raw,
};
use serde_json::Value as JsonValue;

use crate::{
    error::{Error, Result},
    http::Ruma,
    service::{
        Services,
        rooms::{CreateRoom, Preset},
    },
};

fn json_of<T>(raw: &Raw<T>) -> Result<JsonValue> {
    serde_json::from_str(raw.json().get()).map_err(|e| Error::bad_json(e.to_string()))
}

pub async fn create(
    s: Arc<Services>,
    req: Ruma<create_room::v3::Request>,
) -> Result<create_room::v3::Response> {
    use create_room::v3::RoomPreset;
    let preset = match &req.preset {
        Some(RoomPreset::PrivateChat) => Some(Preset::PrivateChat),
        Some(RoomPreset::TrustedPrivateChat) => Some(Preset::TrustedPrivateChat),
        Some(RoomPreset::PublicChat) => Some(Preset::PublicChat),
        Some(other) => {
            return Err(Error::bad_json(format!(
                "unknown preset {}",
                other.as_str()
            )));
        }
        None => None,
    };
    let mut initial_state = Vec::with_capacity(req.initial_state.len());
    for e in &req.initial_state {
        initial_state.push(json_of(e)?);
    }
    if let Some(local) = &req.room_alias_name {
        let alias =
            crate::service::rooms::alias::parse_local_alias(local, s.globals.server_name())?;
        s.check_alias_namespace(&alias, req.appservice.as_deref())?;
    }
    for invitee in &req.invite {
        s.ask_appservices_about(invitee).await?;
    }
    let create = CreateRoom {
        version: req.room_version.clone(),
        preset,
        public: req.visibility == ruma::api::client::room::Visibility::Public,
        name: req.name.clone(),
        topic: req.topic.clone(),
        alias_localpart: req.room_alias_name.clone(),
        invite: req.invite.clone(),
        is_direct: req.is_direct,
        creation_content: req.creation_content.as_ref().map(json_of).transpose()?,
        initial_state,
        power_level_override: req
            .power_level_content_override
            .as_ref()
            .map(json_of)
            .transpose()?,
    };
    let room_id = s.rooms.create_room(req.user(), create).await?;
    Ok(create_room::v3::Response::new(room_id))
}

pub async fn event(
    s: Arc<Services>,
    req: Ruma<get_room_event::v3::Request>,
) -> Result<get_room_event::v3::Response> {
    let event = s
        .rooms
        .timeline
        .stored_by_id(&req.event_id)?
        .filter(|e| e.room_id == req.room_id)
        .ok_or_else(|| Error::not_found("Event not found"))?;
    if !s.rooms.can_see_event(req.user(), &event)? {
        return Err(Error::not_found("Event not found"));
    }
    let json = s
        .rooms
        .timeline
        .to_client(&event, Some(req.client_session()))?;
    Ok(get_room_event::v3::Response::new(Raw::from_json(
        serde_json::value::to_raw_value(&json)?,
    )))
}

pub async fn room_aliases(
    s: Arc<Services>,
    req: Ruma<aliases::v3::Request>,
) -> Result<aliases::v3::Response> {
    s.rooms.readable_state_group(&req.room_id, req.user())?;
    Ok(aliases::v3::Response::new(
        s.rooms.local_aliases(&req.room_id)?,
    ))
}

pub async fn upgrade(
    s: Arc<Services>,
    req: Ruma<upgrade_room::v3::Request>,
) -> Result<upgrade_room::v3::Response> {
    let new_room = s
        .rooms
        .upgrade_room(
            req.user(),
            &req.room_id,
            req.new_version.clone(),
            req.additional_creators.clone(),
        )
        .await?;
    Ok(upgrade_room::v3::Response::new(new_room))
}
