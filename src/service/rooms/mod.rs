//! Rooms: creation, membership, aliases and the directory, visibility of history.
//! Every event goes through [`timeline::Draft`], the one pipeline.

pub mod alias;
pub mod members;
pub mod pdu;
pub mod power;
pub mod read;
pub mod signing;
pub mod state;
pub mod timeline;
pub mod upgrade;
pub mod visibility;

use std::sync::Arc;

use ruma::{
    OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, RoomVersionId, UserId,
    events::TimelineEventType,
};
use serde_json::{Value as JsonValue, json};

use self::timeline::{Draft, NewEvent, Timeline};
use crate::{
    error::{Error, Result},
    service::{globals::Globals, users::Users},
    storage::{Db, IdKind, u64_at, u64_key},
};

/// Room versions Salon creates and serves.
pub const SUPPORTED_VERSIONS: &[RoomVersionId] =
    &[RoomVersionId::V10, RoomVersionId::V11, RoomVersionId::V12];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    PrivateChat,
    TrustedPrivateChat,
    PublicChat,
}

/// A `createRoom` request, as the service sees it.
#[derive(Debug, Default)]
pub struct CreateRoom {
    pub version: Option<RoomVersionId>,
    pub preset: Option<Preset>,
    pub public: bool,
    pub name: Option<String>,
    pub topic: Option<String>,
    pub alias_localpart: Option<String>,
    pub invite: Vec<OwnedUserId>,
    pub is_direct: bool,
    pub creation_content: Option<JsonValue>,
    pub initial_state: Vec<JsonValue>,
    pub power_level_override: Option<JsonValue>,
}

/// The memberships a change applies to (checked under the room's lock), and what the
/// sender is told otherwise.
struct MembershipFrom {
    allowed: &'static [&'static str],
    otherwise: &'static str,
}

pub struct Rooms {
    pub db: Arc<Db>,
    pub globals: Arc<Globals>,
    pub users: Arc<Users>,
    pub timeline: Timeline,
    /// Aliases held by requests that will write them ([`Rooms::reserve_alias`]).
    aliases_reserved: crate::service::locks::Holding<ruma::OwnedRoomAliasId>,
    /// Rooms being upgraded ([`Rooms::upgrade_room`]).
    upgrading: crate::service::locks::Holding<OwnedRoomId>,
}

impl Rooms {
    pub fn new(db: Arc<Db>, globals: Arc<Globals>, users: Arc<Users>, timeline: Timeline) -> Self {
        Self {
            db,
            globals,
            users,
            timeline,
            aliases_reserved: Default::default(),
            upgrading: Default::default(),
        }
    }

    fn member_content(
        &self,
        user: &UserId,
        membership: &str,
        reason: Option<&str>,
    ) -> Result<JsonValue> {
        let mut content = json!({ "membership": membership });
        if membership == "join" || membership == "invite" || membership == "knock" {
            // Invites carry the invitee's profile so that clients can show who it is.
            if let Some(record) = self.users.get(user)? {
                if let Some(name) = record.displayname {
                    content["displayname"] = JsonValue::String(name);
                }
                if let Some(url) = record.avatar_url {
                    content["avatar_url"] = JsonValue::String(url);
                }
            }
        }
        if let Some(r) = reason {
            content["reason"] = JsonValue::String(r.to_owned());
        }
        Ok(content)
    }

    pub async fn create_room(&self, creator: &UserId, req: CreateRoom) -> Result<OwnedRoomId> {
        let version = req
            .version
            .clone()
            .unwrap_or_else(|| self.globals.config.rooms.default_version.clone());
        if !SUPPORTED_VERSIONS.contains(&version) {
            return Err(Error::unsupported_room_version(format!(
                "room version {version} is not supported; use one of 10, 11, 12"
            )));
        }
        let rules = version
            .rules()
            .ok_or_else(|| Error::unsupported_room_version("unknown room version"))?;
        // The alias is held from here until it is written, so that no other request
        // takes it meanwhile.
        let alias = match &req.alias_localpart {
            Some(local) => {
                let alias = alias::parse_local_alias(local, self.globals.server_name())?;
                match self.reserve_alias(&alias)? {
                    Some(reserved) => Some(reserved),
                    None => return Err(Error::room_in_use("This room alias is already taken")),
                }
            }
            None => None,
        };
        for invitee in &req.invite {
            if invitee.server_name() == self.globals.server_name()
                && self.users.get(invitee)?.is_none_or(|r| r.deactivated)
            {
                return Err(Error::not_found(format!(
                    "cannot invite {invitee}: no such user"
                )));
            }
        }
        let preset = req.preset.unwrap_or(if req.public {
            Preset::PublicChat
        } else {
            Preset::PrivateChat
        });

        // m.room.create
        let mut create = match req.creation_content.clone() {
            Some(JsonValue::Object(o)) => JsonValue::Object(o),
            Some(_) => return Err(Error::bad_json("creation_content must be an object")),
            None => json!({}),
        };
        create["room_version"] = JsonValue::String(version.to_string());
        if !rules.authorization.use_room_create_sender {
            create["creator"] = JsonValue::String(creator.to_string());
        }
        let mut additional_creators: Vec<OwnedUserId> = Vec::new();
        if rules.authorization.additional_room_creators {
            if let Some(list) = create.get("additional_creators") {
                let list: Vec<OwnedUserId> =
                    serde_json::from_value(list.clone()).map_err(|_| {
                        Error::bad_json("additional_creators must be a list of user ids")
                    })?;
                additional_creators.extend(list);
            }
            if preset == Preset::TrustedPrivateChat {
                for i in &req.invite {
                    if !additional_creators.contains(i) && i != creator {
                        additional_creators.push(i.clone());
                    }
                }
            }
            if !additional_creators.is_empty() {
                create["additional_creators"] = serde_json::to_value(&additional_creators)?;
            }
        }
        let mut draft = self
            .timeline
            .begin_new_room(version.clone(), creator, create)
            .await?;
        let room_id = draft.room_id().to_owned();

        // The creator joins.
        let content = self.member_content(creator, "join", None)?;
        draft.append(
            creator,
            NewEvent::state(TimelineEventType::RoomMember, creator.as_str(), content),
        )?;

        // m.room.power_levels
        let mut users = serde_json::Map::new();
        if !rules.authorization.explicitly_privilege_room_creators {
            users.insert(creator.to_string(), json!(100));
            if preset == Preset::TrustedPrivateChat {
                for i in &req.invite {
                    users.insert(i.to_string(), json!(100));
                }
            }
        }
        let mut power = json!({
            "users": users,
            "users_default": 0,
            "events": {
                "m.room.name": 50,
                "m.room.power_levels": 100,
                "m.room.history_visibility": 100,
                "m.room.canonical_alias": 50,
                "m.room.avatar": 50,
                "m.room.tombstone": 100,
                "m.room.server_acl": 100,
                "m.room.encryption": 100,
            },
            "events_default": 0,
            "state_default": 50,
            "ban": 50,
            "kick": 50,
            "redact": 50,
            "invite": if preset == Preset::PublicChat { 0 } else { 50 },
        });
        if rules.authorization.explicitly_privilege_room_creators {
            power["events"]["m.room.tombstone"] = json!(150);
        }
        if let Some(over) = req.power_level_override {
            let JsonValue::Object(over) = over else {
                return Err(Error::bad_json(
                    "power_level_content_override must be an object",
                ));
            };
            for (k, v) in over {
                power[k] = v;
            }
        }
        if rules.authorization.explicitly_privilege_room_creators
            && let Some(users) = power.get("users").and_then(|u| u.as_object())
        {
            let all_creators: Vec<&UserId> = std::iter::once(creator)
                .chain(additional_creators.iter().map(|u| &**u))
                .collect();
            if users
                .keys()
                .any(|u| all_creators.iter().any(|c| c.as_str() == u))
            {
                return Err(Error::bad_json(
                    "room creators may not be listed in power levels users from room version 12",
                ));
            }
        }
        draft.append(
            creator,
            NewEvent::state(TimelineEventType::RoomPowerLevels, "", power),
        )?;

        if let Some(alias) = &alias {
            draft.append(
                creator,
                NewEvent::state(
                    TimelineEventType::RoomCanonicalAlias,
                    "",
                    json!({ "alias": alias.key() }),
                ),
            )?;
        }
        let join_rule = if preset == Preset::PublicChat {
            "public"
        } else {
            "invite"
        };
        draft.append(
            creator,
            NewEvent::state(
                TimelineEventType::RoomJoinRules,
                "",
                json!({ "join_rule": join_rule }),
            ),
        )?;
        draft.append(
            creator,
            NewEvent::state(
                TimelineEventType::RoomHistoryVisibility,
                "",
                json!({ "history_visibility": "shared" }),
            ),
        )?;
        if preset != Preset::PublicChat {
            draft.append(
                creator,
                NewEvent::state(
                    TimelineEventType::RoomGuestAccess,
                    "",
                    json!({ "guest_access": "can_join" }),
                ),
            )?;
        }
        for event in &req.initial_state {
            let kind = event
                .get("type")
                .and_then(|t| t.as_str())
                .ok_or_else(|| Error::bad_json("initial_state events need a type"))?;
            if kind == "m.room.create" || kind == "m.room.member" {
                return Err(Error::bad_json(format!(
                    "{kind} cannot be part of initial_state"
                )));
            }
            let state_key = event
                .get("state_key")
                .and_then(|k| k.as_str())
                .unwrap_or("");
            let content = event.get("content").cloned().unwrap_or_else(|| json!({}));
            draft.append(creator, NewEvent::state(kind, state_key, content))?;
        }
        if let Some(name) = &req.name {
            draft.append(
                creator,
                NewEvent::state(TimelineEventType::RoomName, "", json!({ "name": name })),
            )?;
        }
        if let Some(topic) = &req.topic {
            draft.append(
                creator,
                NewEvent::state(TimelineEventType::RoomTopic, "", json!({ "topic": topic, "m.topic": [{ "body": topic, "mimetype": "text/plain" }] })),
            )?;
        }
        for invitee in &req.invite {
            let mut content = self.member_content(invitee, "invite", None)?;
            if req.is_direct {
                content["is_direct"] = JsonValue::Bool(true);
            }
            draft.append(
                creator,
                NewEvent::state(TimelineEventType::RoomMember, invitee.as_str(), content),
            )?;
        }
        let room_short = draft.room_short;
        draft.commit().await?;

        if let Some(alias) = &alias {
            self.put_alias(alias.key(), &room_id, creator)?;
        }
        if req.public {
            self.db
                .put_durable("public_rooms", &room_short.to_be_bytes(), b"")?;
        }
        tracing::info!(room_id = %room_id, creator = %creator, version = %version, "room created");
        Ok(room_id)
    }

    /// Send an event into a room on behalf of `sender` (messages and state alike).
    pub async fn send(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        event: NewEvent,
    ) -> Result<OwnedEventId> {
        let mut draft = self.timeline.begin(room_id).await?;
        // A retried transaction (checked under the room lock, so two identical retries
        // cannot both pass) gets the original event, once that is on disk.
        if let Some(txn) = &event.txn
            && let Some(existing) = self.timeline.txn_event(sender, room_id, txn)?
        {
            drop(draft);
            self.db.sync_all()?;
            return Ok(existing);
        }
        let pdu = draft.append(sender, event)?;
        draft.commit().await?;
        Ok(pdu.event_id.clone())
    }

    /// Change a membership: `sender` acts on `target` (equal for join and leave).
    pub async fn set_membership(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        target: &UserId,
        membership: &str,
        reason: Option<&str>,
        extra: Option<JsonValue>,
    ) -> Result<OwnedEventId> {
        self.change_membership(room_id, sender, target, membership, reason, extra, None)
            .await
    }

    /// A kick: the target leaves, if they are in the room (joined, invited or
    /// knocking) when the room's lock is taken; a kick that comes after a ban does not
    /// undo it.
    pub async fn kick(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        target: &UserId,
        reason: Option<&str>,
    ) -> Result<OwnedEventId> {
        let from = Some(MembershipFrom {
            allowed: &["join", "invite", "knock"],
            otherwise: "This user is not in the room",
        });
        self.change_membership(room_id, sender, target, "leave", reason, None, from)
            .await
    }

    /// An unban: the target leaves the ban, if they are banned when the room's lock is
    /// taken.
    pub async fn unban(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        target: &UserId,
        reason: Option<&str>,
    ) -> Result<OwnedEventId> {
        let from = Some(MembershipFrom {
            allowed: &["ban"],
            otherwise: "This user is not banned",
        });
        self.change_membership(room_id, sender, target, "leave", reason, None, from)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn change_membership(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        target: &UserId,
        membership: &str,
        reason: Option<&str>,
        extra: Option<JsonValue>,
        from: Option<MembershipFrom>,
    ) -> Result<OwnedEventId> {
        if membership == "invite"
            && target.server_name() == self.globals.server_name()
            && self.users.get(target)?.is_none_or(|r| r.deactivated)
        {
            return Err(Error::not_found(format!(
                "cannot invite {target}: no such user"
            )));
        }
        let mut draft = self.timeline.begin(room_id).await?;
        let current = draft.membership(target)?;
        if let Some(from) = from
            && !current
                .as_deref()
                .is_some_and(|c| from.allowed.contains(&c))
        {
            return Err(Error::forbidden(from.otherwise));
        }
        // Repeating a join that changes nothing (profile included) returns the existing event.
        if membership == "join"
            && sender == target
            && extra.is_none()
            && current.as_deref() == Some("join")
            && let Some(p) = draft.state_pdu("m.room.member", target.as_str())?
        {
            let wanted = self.member_content(target, "join", None)?;
            let existing = p.content_json();
            if existing.get("displayname") == wanted.get("displayname")
                && existing.get("avatar_url") == wanted.get("avatar_url")
            {
                return Ok(p.event_id.clone());
            }
        }
        if membership == "join" && current.as_deref() == Some("ban") {
            return Err(Error::forbidden("You are banned from this room"));
        }
        if membership == "leave" && sender == target && current.is_none() {
            return Err(Error::forbidden("You are not a member of this room"));
        }
        let mut content = self.member_content(target, membership, reason)?;
        if membership == "join"
            && current.as_deref() != Some("invite")
            && current.as_deref() != Some("join")
        {
            self.authorise_restricted_join(&draft, target, &mut content)?;
        }
        if let (Some(JsonValue::Object(extra)), Some(obj)) = (extra, content.as_object_mut()) {
            for (k, v) in extra {
                obj.insert(k, v);
            }
        }
        let pdu = draft.append(
            sender,
            NewEvent::state(TimelineEventType::RoomMember, target.as_str(), content),
        )?;
        draft.commit().await?;
        Ok(pdu.event_id.clone())
    }

    /// For `restricted` rooms: a join by someone not invited is allowed when they are in
    /// one of the rooms the join rule names, vouched for by a member who may invite.
    fn authorise_restricted_join(
        &self,
        draft: &Draft<'_>,
        user: &UserId,
        content: &mut JsonValue,
    ) -> Result<()> {
        let Some(rules) = draft.state_content("m.room.join_rules", "")? else {
            return Ok(());
        };
        let rule = rules
            .get("join_rule")
            .and_then(|r| r.as_str())
            .unwrap_or("invite");
        if rule != "restricted" && rule != "knock_restricted" {
            return Ok(());
        }
        let allowed = rules
            .get("allow")
            .and_then(|a| a.as_array())
            .cloned()
            .unwrap_or_default();
        let mut eligible = false;
        for entry in allowed {
            if entry.get("type").and_then(|t| t.as_str()) != Some("m.room_membership") {
                continue;
            }
            let Some(other) = entry
                .get("room_id")
                .and_then(|r| r.as_str())
                .and_then(|r| RoomId::parse(r).ok())
            else {
                continue;
            };
            if self.membership(&other, user)?.as_deref() == Some("join") {
                eligible = true;
                break;
            }
        }
        if !eligible {
            return Ok(()); // The authorisation rules will refuse the join.
        }
        let power = draft.power_levels()?;
        for member in self.timeline.member_lists().joined(draft.room_short)? {
            if member.server_name() == self.globals.server_name()
                && power.levels.user_can_invite(&member)
            {
                content["join_authorised_via_users_server"] = JsonValue::String(member.to_string());
                return Ok(());
            }
        }
        Err(Error::forbidden(
            "no member of this room can authorise your join",
        ))
    }

    /// A user's current membership in a room, from the membership table.
    pub fn membership(&self, room_id: &RoomId, user: &UserId) -> Result<Option<String>> {
        let (Some(room), Some(u)) = (
            self.timeline.room_short(room_id)?,
            self.db.short_id(IdKind::User, user.as_str())?,
        ) else {
            return Ok(None);
        };
        Ok(self
            .db
            .get("user_rooms", &u64_key(&[u, room]))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Rooms where the user's membership is `membership`.
    pub fn rooms_with_membership(
        &self,
        user: &UserId,
        membership: &str,
    ) -> Result<Vec<OwnedRoomId>> {
        let Some(u) = self.db.short_id(IdKind::User, user.as_str())? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for item in self.db.scan_prefix("user_rooms", &u.to_be_bytes()) {
            let (k, v) = item?;
            if v.as_ref() == membership.as_bytes()
                && let Some(id) = self.db.long_id(u64_at(&k, 1))?
            {
                out.push(RoomId::parse(id)?);
            }
        }
        Ok(out)
    }

    /// Forget a room the user has left: it disappears from their views. Done under the
    /// room's lock, so that an invite or a join committed meanwhile is not hidden.
    pub async fn forget(&self, room_id: &RoomId, user: &UserId) -> Result<()> {
        let _room = self.timeline.lock(room_id).await;
        match self.membership(room_id, user)?.as_deref() {
            Some("join") | Some("invite") | Some("knock") => {
                Err(Error::unknown("Leave the room before forgetting it"))
            }
            Some("forgotten") => Ok(()),
            None => Err(Error::not_found("You have never been in this room")),
            Some(_) => {
                let room = self
                    .timeline
                    .room_short(room_id)?
                    .ok_or_else(|| Error::not_found("Unknown room"))?;
                let u = self
                    .db
                    .get_or_create_short_id(IdKind::User, user.as_str())?;
                self.db
                    .put_durable("user_rooms", &u64_key(&[u, room]), b"forgotten")
            }
        }
    }

    /// After a profile change, refresh the user's member event in every joined room.
    pub async fn propagate_profile(&self, user: &UserId) -> Result<()> {
        for room in self.rooms_with_membership(user, "join")? {
            let result = self
                .set_membership(&room, user, user, "join", None, None)
                .await;
            if let Err(e) = result {
                tracing::warn!(room_id = %room, user_id = %user, error = %e, "could not update member event after profile change");
            }
        }
        Ok(())
    }
}
