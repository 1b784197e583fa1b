//! Room aliases and the public room directory.

use ruma::{OwnedRoomAliasId, OwnedRoomId, RoomAliasId, RoomId, ServerName, UserId};
use serde::{Deserialize, Serialize};
use serde_json::Value as JsonValue;

use super::Rooms;
use crate::{
    error::{Error, Result},
    storage::{Batch, str_key, str_prefix},
};

#[derive(Serialize, Deserialize)]
struct AliasRecord {
    room_id: OwnedRoomId,
    creator: String,
}

pub fn parse_local_alias(localpart: &str, server: &ServerName) -> Result<OwnedRoomAliasId> {
    if localpart.is_empty()
        || localpart.contains(':')
        || localpart.contains('#')
        || localpart.chars().any(char::is_whitespace)
    {
        return Err(Error::invalid_param(
            "room_alias_name must be a bare localpart, without '#', ':' or spaces",
        ));
    }
    RoomAliasId::parse(format!("#{localpart}:{server}"))
        .map_err(|e| Error::invalid_param(format!("invalid room alias: {e}")))
}

/// One entry of the public room directory.
#[derive(Debug, Serialize)]
pub struct PublicRoom {
    pub room_id: OwnedRoomId,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canonical_alias: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub avatar_url: Option<String>,
    pub num_joined_members: u64,
    pub world_readable: bool,
    pub guest_can_join: bool,
    pub join_rule: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room_type: Option<String>,
}

/// An alias held for one request until it is written ([`Rooms::reserve_alias`]).
pub type AliasReservation<'a> = crate::service::locks::Held<'a, OwnedRoomAliasId>;

fn str_field(content: Option<JsonValue>, field: &str) -> Option<String> {
    content.and_then(|c| c.get(field).and_then(|v| v.as_str()).map(str::to_owned))
}

impl Rooms {
    pub fn alias_target(&self, alias: &RoomAliasId) -> Result<Option<OwnedRoomId>> {
        match self.db.get("aliases", alias.as_bytes())? {
            Some(v) => Ok(Some(serde_json::from_slice::<AliasRecord>(&v)?.room_id)),
            None => Ok(None),
        }
    }

    /// Holds `alias` for the caller until the reservation is dropped, or `None` when it
    /// is taken or held by another request: of two requests for one alias (two rooms
    /// created with the same alias name), one gets it and the other is told it is taken.
    pub(super) fn reserve_alias(
        &self,
        alias: &RoomAliasId,
    ) -> Result<Option<AliasReservation<'_>>> {
        self.aliases_reserved
            .hold_if(alias.to_owned(), || Ok(self.alias_target(alias)?.is_none()))
    }

    /// Points `alias` at `room_id`; an alias that pointed at another room (moved by an
    /// upgrade) leaves that room's list of aliases.
    pub(super) fn put_alias(
        &self,
        alias: &RoomAliasId,
        room_id: &RoomId,
        creator: &UserId,
    ) -> Result<()> {
        let room = self
            .timeline
            .room_short(room_id)?
            .ok_or_else(|| Error::not_found("Unknown room"))?;
        let mut b = Batch::default();
        if let Some(previous) = self.alias_target(alias)?
            && previous != room_id
            && let Some(short) = self.timeline.room_short(&previous)?
        {
            let mut key = short.to_be_bytes().to_vec();
            key.extend_from_slice(&str_key(&["", alias.as_str()]));
            b.delete(&self.db, "room_aliases", &key);
        }
        let record = AliasRecord {
            room_id: room_id.to_owned(),
            creator: creator.to_string(),
        };
        b.put(
            &self.db,
            "aliases",
            alias.as_bytes(),
            &serde_json::to_vec(&record)?,
        );
        let mut key = room.to_be_bytes().to_vec();
        key.extend_from_slice(&str_key(&["", alias.as_str()]));
        b.put(&self.db, "room_aliases", &key, b"");
        self.db.commit(b)
    }

    pub fn create_alias(
        &self,
        alias: &RoomAliasId,
        room_id: &RoomId,
        creator: &UserId,
    ) -> Result<()> {
        if alias.server_name() != self.globals.server_name() {
            return Err(Error::invalid_param(
                "aliases can only be created on this server's domain",
            ));
        }
        let Some(_reserved) = self.reserve_alias(alias)? else {
            return Err(Error::Matrix {
                status: http::StatusCode::CONFLICT,
                kind: ruma::api::error::ErrorKind::Unknown,
                message: "This alias already exists".into(),
            });
        };
        if self.membership(room_id, creator)?.as_deref() != Some("join") {
            return Err(Error::forbidden(
                "You must be in the room to give it an alias",
            ));
        }
        self.put_alias(alias, room_id, creator)
    }

    /// Delete an alias; allowed to its creator, server admins and room moderators. The
    /// alias is held meanwhile, so that what is deleted is what was allowed: not an
    /// alias deleted and given again to another room since it was read.
    pub fn delete_alias(&self, alias: &RoomAliasId, user: &UserId) -> Result<()> {
        let Some(_held) = self.aliases_reserved.hold(alias.to_owned()) else {
            return Err(Error::unknown(
                "This alias is being changed by another request; try again",
            ));
        };
        let v = self
            .db
            .get("aliases", alias.as_bytes())?
            .ok_or_else(|| Error::not_found("No such alias"))?;
        let record: AliasRecord = serde_json::from_slice(&v)?;
        let admin = self.users.get(user)?.is_some_and(|r| r.admin);
        let allowed = admin || record.creator == user.as_str() || {
            match self.timeline.room(&record.room_id) {
                Ok((short, room)) => self
                    .timeline
                    .power_levels(short, &room)?
                    .levels
                    .user_can_send_state(user, ruma::events::StateEventType::RoomCanonicalAlias),
                Err(_) => false,
            }
        };
        if !allowed {
            return Err(Error::forbidden(
                "Only the alias creator or a room moderator can delete it",
            ));
        }
        let mut b = Batch::default();
        b.delete(&self.db, "aliases", alias.as_bytes());
        if let Some(room) = self.timeline.room_short(&record.room_id)? {
            let mut key = room.to_be_bytes().to_vec();
            key.extend_from_slice(&str_key(&["", alias.as_str()]));
            b.delete(&self.db, "room_aliases", &key);
        }
        self.db.commit(b)
    }

    /// Local aliases of a room.
    pub fn local_aliases(&self, room_id: &RoomId) -> Result<Vec<OwnedRoomAliasId>> {
        let Some(room) = self.timeline.room_short(room_id)? else {
            return Ok(Vec::new());
        };
        let mut prefix = room.to_be_bytes().to_vec();
        prefix.extend_from_slice(&str_prefix(&[""]));
        let mut out = Vec::new();
        for item in self.db.scan_prefix("room_aliases", &prefix) {
            let (k, _) = item?;
            out.push(RoomAliasId::parse(
                String::from_utf8_lossy(&k[prefix.len()..]).as_ref(),
            )?);
        }
        Ok(out)
    }

    pub fn is_public(&self, room_id: &RoomId) -> Result<bool> {
        match self.timeline.room_short(room_id)? {
            Some(room) => self.db.exists("public_rooms", &room.to_be_bytes()),
            None => Ok(false),
        }
    }

    pub fn set_public(&self, room_id: &RoomId, public: bool) -> Result<()> {
        let room = self
            .timeline
            .room_short(room_id)?
            .ok_or_else(|| Error::not_found("Unknown room"))?;
        if public {
            self.db
                .put_durable("public_rooms", &room.to_be_bytes(), b"")
        } else {
            let mut b = Batch::default();
            b.delete(&self.db, "public_rooms", &room.to_be_bytes());
            self.db.commit(b)
        }
    }

    pub fn public_room_summary(&self, room_short: u64) -> Result<Option<PublicRoom>> {
        let Some(record) = self.timeline.room_record(room_short)? else {
            return Ok(None);
        };
        let tl = &self.timeline;
        let hv = str_field(
            tl.current_state_content(room_short, "m.room.history_visibility", "")?,
            "history_visibility",
        );
        let guest = str_field(
            tl.current_state_content(room_short, "m.room.guest_access", "")?,
            "guest_access",
        );
        Ok(Some(PublicRoom {
            room_id: record.room_id.clone(),
            name: str_field(
                tl.current_state_content(room_short, "m.room.name", "")?,
                "name",
            ),
            topic: str_field(
                tl.current_state_content(room_short, "m.room.topic", "")?,
                "topic",
            ),
            canonical_alias: str_field(
                tl.current_state_content(room_short, "m.room.canonical_alias", "")?,
                "alias",
            ),
            avatar_url: str_field(
                tl.current_state_content(room_short, "m.room.avatar", "")?,
                "url",
            ),
            num_joined_members: self.timeline.member_lists().joined_count(room_short)? as u64,
            world_readable: hv.as_deref() == Some("world_readable"),
            guest_can_join: guest.as_deref() == Some("can_join"),
            join_rule: str_field(
                tl.current_state_content(room_short, "m.room.join_rules", "")?,
                "join_rule",
            )
            .unwrap_or_else(|| "invite".into()),
            room_type: str_field(
                tl.current_state_content(room_short, "m.room.create", "")?,
                "type",
            ),
        }))
    }

    /// The public directory, largest rooms first, filtered by a search term.
    /// Returns the page, the total count, and offsets for the next and previous pages.
    pub fn public_rooms(
        &self,
        search: Option<&str>,
        since: Option<&str>,
        limit: Option<usize>,
    ) -> Result<(Vec<PublicRoom>, usize, Option<String>, Option<String>)> {
        let offset = match since {
            Some(s) => s
                .strip_prefix('o')
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| Error::invalid_param("invalid pagination token"))?,
            None => 0,
        };
        let term = search.map(str::to_lowercase).filter(|t| !t.is_empty());
        let mut rooms = Vec::new();
        for item in self.db.scan_prefix("public_rooms", b"") {
            let (k, _) = item?;
            if let Some(room) = self.public_room_summary(crate::storage::decode_u64(&k))? {
                let matches = term.as_deref().is_none_or(|t| {
                    [&room.name, &room.topic, &room.canonical_alias]
                        .iter()
                        .any(|f| f.as_deref().is_some_and(|v| v.to_lowercase().contains(t)))
                        || room.room_id.as_str().to_lowercase().contains(t)
                });
                if matches {
                    rooms.push(room);
                }
            }
        }
        rooms.sort_by(|a, b| {
            b.num_joined_members
                .cmp(&a.num_joined_members)
                .then_with(|| a.room_id.cmp(&b.room_id))
        });
        let total = rooms.len();
        let limit = limit.unwrap_or(100).clamp(1, 500);
        let page: Vec<PublicRoom> = rooms.into_iter().skip(offset).take(limit).collect();
        let next = (offset + page.len() < total).then(|| format!("o{}", offset + page.len()));
        let prev = (offset > 0).then(|| format!("o{}", offset.saturating_sub(limit)));
        Ok((page, total, next, prev))
    }
}

impl Rooms {
    /// Users whose id or display name contains `term`, among those who share a room with
    /// `searcher` or are in a public room.
    pub fn search_users(
        &self,
        searcher: &UserId,
        term: &str,
        limit: usize,
    ) -> Result<(
        Vec<(ruma::OwnedUserId, Option<String>, Option<String>)>,
        bool,
    )> {
        use std::collections::BTreeSet;
        let term = term.to_lowercase();
        let mut visible: BTreeSet<ruma::OwnedUserId> = BTreeSet::new();
        for room in self.rooms_with_membership(searcher, "join")? {
            if let Some(short) = self.timeline.room_short(&room)? {
                visible.extend(self.timeline.member_lists().joined(short)?);
            }
        }
        // Staff from the directory can be found by everyone, before they ever log in.
        for (user, record) in self.users.all()? {
            if record.ldap_dn.is_some() {
                visible.insert(user);
            }
        }
        for item in self.db.scan_prefix("public_rooms", b"") {
            let (k, _) = item?;
            visible.extend(
                self.timeline
                    .member_lists()
                    .joined(crate::storage::decode_u64(&k))?,
            );
        }
        let mut out = Vec::new();
        let mut limited = false;
        for user in visible {
            let Some(record) = self.users.get(&user)? else {
                continue;
            };
            if record.deactivated {
                continue;
            }
            let hit = user.as_str().to_lowercase().contains(&term)
                || record
                    .displayname
                    .as_deref()
                    .is_some_and(|n| n.to_lowercase().contains(&term));
            if hit {
                if out.len() == limit {
                    limited = true;
                    break;
                }
                out.push((user, record.displayname, record.avatar_url));
            }
        }
        Ok((out, limited))
    }
}
