//! Who may see what: history visibility and membership, checked on every read.

use ruma::{RoomId, UserId};

use super::{Rooms, pdu::StoredEvent};
use crate::error::{Error, Result};

fn field(event: Option<StoredEvent>, name: &str) -> Option<String> {
    event.and_then(|e| {
        e.pdu
            .content_json()
            .get(name)
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    })
}

impl Rooms {
    /// Whether `user` may see `event`, by the room's history visibility at the event
    /// and the user's membership then and now.
    pub fn can_see_event(&self, user: &UserId, event: &StoredEvent) -> Result<bool> {
        self.can_see_event_memo(user, event, &mut SeenMemo::default())
    }

    /// [`Self::can_see_event`] for many events of one room and one user: the answer
    /// depends only on the state after the event, so it is worked out once per state
    /// group (the user's own membership events aside, which they always see).
    pub fn can_see_event_memo(
        &self,
        user: &UserId,
        event: &StoredEvent,
        memo: &mut SeenMemo,
    ) -> Result<bool> {
        self.can_see_parts(
            user,
            &event.room_id,
            &event.pdu.kind.to_string(),
            event.pdu.state_key.as_deref(),
            event.meta.state_after,
            memo,
        )
    }

    /// [`Self::can_see_event_memo`] for an event of `room_id` known by its type, state
    /// key and the state group after it.
    pub fn can_see_parts(
        &self,
        user: &UserId,
        room_id: &RoomId,
        kind: &str,
        state_key: Option<&str>,
        state_after: u64,
        memo: &mut SeenMemo,
    ) -> Result<bool> {
        // Everyone sees the events that changed their own membership.
        if kind == "m.room.member" && state_key == Some(user.as_str()) {
            return Ok(true);
        }
        if let Some(seen) = memo.0.get(&state_after) {
            return Ok(*seen);
        }
        let seen = self.can_see_after(user, room_id, state_after)?;
        memo.0.insert(state_after, seen);
        Ok(seen)
    }

    fn can_see_after(&self, user: &UserId, room_id: &RoomId, group: u64) -> Result<bool> {
        let tl = &self.timeline;
        let visibility = field(
            tl.state_event_in_group(group, "m.room.history_visibility", "")?,
            "history_visibility",
        )
        .unwrap_or_else(|| "shared".to_owned());
        if visibility == "world_readable" {
            return Ok(true);
        }
        let then = field(
            tl.state_event_in_group(group, "m.room.member", user.as_str())?,
            "membership",
        );
        if then.as_deref() == Some("join") {
            return Ok(true);
        }
        match visibility.as_str() {
            "invited" => Ok(then.as_deref() == Some("invite")),
            "shared" => Ok(self.membership(room_id, user)?.as_deref() == Some("join")),
            _ => Ok(false),
        }
    }

    /// The state group a user may read the room's state at: the current state for
    /// members and world-readable rooms, the state when they left for former members.
    pub fn readable_state_group(&self, room_id: &RoomId, user: &UserId) -> Result<u64> {
        let (room_short, record) = self.timeline.room(room_id)?;
        match self.membership(room_id, user)?.as_deref() {
            Some("join") => return Ok(record.state_group),
            Some("leave") | Some("ban") => {
                if let Some(ev) =
                    self.timeline
                        .current_state_event(room_short, "m.room.member", user.as_str())?
                {
                    return Ok(ev.meta.state_after);
                }
            }
            _ => {}
        }
        let visibility = self
            .timeline
            .current_state_content(room_short, "m.room.history_visibility", "")?
            .and_then(|c| {
                c.get("history_visibility")
                    .and_then(|v| v.as_str())
                    .map(str::to_owned)
            });
        if visibility.as_deref() == Some("world_readable") {
            return Ok(record.state_group);
        }
        Err(Error::forbidden("You are not a member of this room"))
    }
}

/// Visibility answers of one user in one room, by state group.
#[derive(Default)]
pub struct SeenMemo(std::collections::HashMap<u64, bool>);
