//! Room upgrades: a tombstone in the old room, a new room carrying its state over.

use ruma::{OwnedRoomId, OwnedUserId, RoomId, RoomVersionId, UserId, events::TimelineEventType};
use serde_json::{Value as JsonValue, json};

use super::{Rooms, SUPPORTED_VERSIONS, timeline::NewEvent};
use crate::error::{Error, Result};

/// State carried over to the replacement room.
const CARRIED_STATE: &[&str] = &[
    "m.room.server_acl",
    "m.room.encryption",
    "m.room.name",
    "m.room.avatar",
    "m.room.topic",
    "m.room.guest_access",
    "m.room.history_visibility",
    "m.room.join_rules",
];

impl Rooms {
    /// Replaces a room with a new one of `version`. One upgrade of a room runs at a
    /// time: another asked for meanwhile (a second click) is refused rather than
    /// making a second replacement.
    pub async fn upgrade_room(
        &self,
        user: &UserId,
        old_room: &RoomId,
        version: RoomVersionId,
        additional_creators: Vec<OwnedUserId>,
    ) -> Result<OwnedRoomId> {
        if !SUPPORTED_VERSIONS.contains(&version) {
            return Err(Error::unsupported_room_version(format!(
                "room version {version} is not supported"
            )));
        }
        let (old_short, old_record) = self.timeline.room(old_room)?;
        let Some(_upgrading) = self.upgrading.hold(old_room.to_owned()) else {
            return Err(Error::unknown(
                "An upgrade of this room is already under way",
            ));
        };
        if self.membership(old_room, user)?.as_deref() != Some("join") {
            return Err(Error::forbidden("You are not a member of this room"));
        }
        let power = self.timeline.power_levels(old_short, &old_record)?;
        if !power
            .levels
            .user_can_send_state(user, ruma::events::StateEventType::RoomTombstone)
        {
            return Err(Error::forbidden("You may not upgrade this room"));
        }
        let rules = version
            .rules()
            .ok_or_else(|| Error::unsupported_room_version("unknown room version"))?;
        let last_event = old_record.extremities.first().cloned();

        let old_create = self
            .timeline
            .current_state_content(old_short, "m.room.create", "")?
            .unwrap_or_else(|| json!({}));
        let mut create = json!({ "room_version": version.to_string() });
        for key in ["type", "m.federate"] {
            if let Some(v) = old_create.get(key) {
                create[key] = v.clone();
            }
        }
        let mut predecessor = json!({ "room_id": old_room });
        if let Some(ev) = &last_event
            && !rules.authorization.room_create_event_id_as_room_id
        {
            predecessor["event_id"] = JsonValue::String(ev.to_string());
        }
        create["predecessor"] = predecessor;
        if !rules.authorization.use_room_create_sender {
            create["creator"] = JsonValue::String(user.to_string());
        }
        if rules.authorization.additional_room_creators && !additional_creators.is_empty() {
            create["additional_creators"] = serde_json::to_value(&additional_creators)?;
        }

        let mut draft = self.timeline.begin_new_room(version, user, create).await?;
        let new_room = draft.room_id().to_owned();
        let member = json!({ "membership": "join" });
        draft.append(
            user,
            NewEvent::state(TimelineEventType::RoomMember, user.as_str(), member),
        )?;

        // Power levels: the old ones, with creators removed where they are implicit.
        let mut levels = self
            .timeline
            .current_state_content(old_short, "m.room.power_levels", "")?
            .unwrap_or_else(|| json!({}));
        if rules.authorization.explicitly_privilege_room_creators {
            if let Some(users) = levels.get_mut("users").and_then(|u| u.as_object_mut()) {
                users.remove(user.as_str());
                for c in &additional_creators {
                    users.remove(c.as_str());
                }
            }
        } else {
            levels["users"][user.as_str()] = json!(100);
        }
        draft.append(
            user,
            NewEvent::state(TimelineEventType::RoomPowerLevels, "", levels),
        )?;
        for kind in CARRIED_STATE {
            if let Some(content) = self.timeline.current_state_content(old_short, kind, "")? {
                draft.append(user, NewEvent::state(*kind, "", content))?;
            }
        }
        let aliases = self.local_aliases(old_room)?;
        if let Some(alias) =
            self.timeline
                .current_state_content(old_short, "m.room.canonical_alias", "")?
        {
            draft.append(
                user,
                NewEvent::state(TimelineEventType::RoomCanonicalAlias, "", alias),
            )?;
        }
        draft.commit().await?;

        // The tombstone, and the old room restricted so that talk moves on.
        let mut old = self.timeline.begin(old_room).await?;
        old.append(
            user,
            NewEvent::state(
                TimelineEventType::RoomTombstone,
                "",
                json!({
                    "body": "This room has been replaced",
                    "replacement_room": new_room,
                }),
            ),
        )?;
        let mut old_levels = old
            .state_content("m.room.power_levels", "")?
            .unwrap_or_else(|| json!({}));
        let users_default = old_levels
            .get("users_default")
            .and_then(|v| v.as_i64())
            .unwrap_or(0);
        let restricted = (users_default + 1).max(50);
        old_levels["events_default"] = json!(restricted);
        old_levels["invite"] = json!(restricted);
        old.append(
            user,
            NewEvent::state(TimelineEventType::RoomPowerLevels, "", old_levels),
        )?;
        old.commit().await?;

        for alias in aliases {
            self.put_alias(&alias, &new_room, user)?;
        }
        if self.is_public(old_room)? {
            self.set_public(old_room, false)?;
            self.set_public(&new_room, true)?;
        }
        Ok(new_room)
    }
}
