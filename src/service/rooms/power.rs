//! Power levels as the room version defines them (creators are all-powerful from v12).

use ruma::{
    OwnedUserId, UserId,
    events::room::power_levels::{
        RoomPowerLevels, RoomPowerLevelsEventContent, RoomPowerLevelsSource,
    },
    room_version_rules::RoomVersionRules,
};
use serde_json::Value as JsonValue;

use super::pdu::Pdu;
use crate::error::{Error, Result};

pub struct PowerLevels {
    pub levels: RoomPowerLevels,
    pub creators: Vec<OwnedUserId>,
}

impl PowerLevels {
    pub fn new(rules: &RoomVersionRules, create: &Pdu, content: Option<JsonValue>) -> Result<Self> {
        let creators = creators_of(rules, create);
        let content: Option<RoomPowerLevelsEventContent> =
            match content {
                Some(c) => Some(serde_json::from_value(c).map_err(|e| {
                    Error::internal(format!("stored power levels are invalid: {e}"))
                })?),
                None => None,
            };
        let levels = RoomPowerLevels::new(
            RoomPowerLevelsSource::from(content),
            &rules.authorization,
            creators.clone(),
        );
        Ok(Self { levels, creators })
    }

    pub fn is_creator(&self, user: &UserId) -> bool {
        self.creators.iter().any(|c| c == user)
    }
}

/// The room's creators: the create event's sender, and from room version 12 the
/// `additional_creators` of its content.
pub fn creators_of(rules: &RoomVersionRules, create: &Pdu) -> Vec<OwnedUserId> {
    let mut creators = vec![create.sender.clone()];
    if rules.authorization.additional_room_creators
        && let Some(extra) = create
            .content_json()
            .get("additional_creators")
            .and_then(|v| v.as_array())
    {
        for u in extra {
            if let Some(id) = u.as_str().and_then(|s| UserId::parse(s).ok())
                && !creators.contains(&id)
            {
                creators.push(id);
            }
        }
    }
    creators
}
