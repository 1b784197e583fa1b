//! Join, invite, leave, forget, kick, ban, unban, knock; member lists.

use std::{collections::BTreeMap, sync::Arc};

use ruma::{
    OwnedMxcUri, OwnedRoomId, RoomOrAliasId,
    api::client::{
        knock::knock_room,
        membership::{
            ban_user, forget_room, get_member_events, invite_user, join_room_by_id,
            join_room_by_id_or_alias, joined_members, joined_rooms, kick_user, leave_room,
            unban_user,
        },
    },
    serde::Raw,
};

use crate::{
    error::{Error, Result},
    http::Ruma,
    service::Services,
};

async fn resolve(s: &Services, target: &RoomOrAliasId) -> Result<OwnedRoomId> {
    match <&ruma::RoomId>::try_from(target) {
        Ok(room) => Ok(room.to_owned()),
        Err(alias) => s
            .resolve_alias(alias)
            .await?
            .ok_or_else(|| Error::not_found("No room has this alias")),
    }
}

pub async fn join_by_id(
    s: Arc<Services>,
    req: Ruma<join_room_by_id::v3::Request>,
) -> Result<join_room_by_id::v3::Response> {
    s.rooms
        .set_membership(
            &req.room_id,
            req.user(),
            req.user(),
            "join",
            req.reason.as_deref(),
            None,
        )
        .await?;
    Ok(join_room_by_id::v3::Response::new(req.room_id.clone()))
}

pub async fn join(
    s: Arc<Services>,
    req: Ruma<join_room_by_id_or_alias::v3::Request>,
) -> Result<join_room_by_id_or_alias::v3::Response> {
    let room_id = resolve(&s, &req.room_id_or_alias).await?;
    s.rooms
        .set_membership(
            &room_id,
            req.user(),
            req.user(),
            "join",
            req.reason.as_deref(),
            None,
        )
        .await?;
    Ok(join_room_by_id_or_alias::v3::Response::new(room_id))
}

pub async fn knock(
    s: Arc<Services>,
    req: Ruma<knock_room::v3::Request>,
) -> Result<knock_room::v3::Response> {
    let room_id = resolve(&s, &req.room_id_or_alias).await?;
    s.rooms
        .set_membership(
            &room_id,
            req.user(),
            req.user(),
            "knock",
            req.reason.as_deref(),
            None,
        )
        .await?;
    Ok(knock_room::v3::Response::new(room_id))
}

pub async fn invite(
    s: Arc<Services>,
    req: Ruma<invite_user::v3::Request>,
) -> Result<invite_user::v3::Response> {
    let invite_user::v3::InvitationRecipient::UserId(target) = &req.recipient else {
        return Err(Error::unknown("Third-party invites are not supported"));
    };
    s.ask_appservices_about(&target.user_id).await?;
    s.rooms
        .set_membership(
            &req.room_id,
            req.user(),
            &target.user_id,
            "invite",
            target.reason.as_deref(),
            None,
        )
        .await?;
    Ok(invite_user::v3::Response::new())
}

pub async fn leave(
    s: Arc<Services>,
    req: Ruma<leave_room::v3::Request>,
) -> Result<leave_room::v3::Response> {
    s.rooms
        .set_membership(
            &req.room_id,
            req.user(),
            req.user(),
            "leave",
            req.reason.as_deref(),
            None,
        )
        .await?;
    Ok(leave_room::v3::Response::new())
}

pub async fn forget(
    s: Arc<Services>,
    req: Ruma<forget_room::v3::Request>,
) -> Result<forget_room::v3::Response> {
    s.rooms.forget(&req.room_id, req.user()).await?;
    Ok(forget_room::v3::Response::new())
}

pub async fn kick(
    s: Arc<Services>,
    req: Ruma<kick_user::v3::Request>,
) -> Result<kick_user::v3::Response> {
    s.rooms
        .kick(
            &req.room_id,
            req.user(),
            &req.user_id,
            req.reason.as_deref(),
        )
        .await?;
    Ok(kick_user::v3::Response::new())
}

pub async fn ban(
    s: Arc<Services>,
    req: Ruma<ban_user::v3::Request>,
) -> Result<ban_user::v3::Response> {
    s.rooms
        .set_membership(
            &req.room_id,
            req.user(),
            &req.user_id,
            "ban",
            req.reason.as_deref(),
            None,
        )
        .await?;
    Ok(ban_user::v3::Response::new())
}

pub async fn unban(
    s: Arc<Services>,
    req: Ruma<unban_user::v3::Request>,
) -> Result<unban_user::v3::Response> {
    s.rooms
        .unban(
            &req.room_id,
            req.user(),
            &req.user_id,
            req.reason.as_deref(),
        )
        .await?;
    Ok(unban_user::v3::Response::new())
}

pub async fn joined(
    s: Arc<Services>,
    req: Ruma<joined_rooms::v3::Request>,
) -> Result<joined_rooms::v3::Response> {
    Ok(joined_rooms::v3::Response::new(
        s.rooms.rooms_with_membership(req.user(), "join")?,
    ))
}

pub async fn members(
    s: Arc<Services>,
    req: Ruma<get_member_events::v3::Request>,
) -> Result<get_member_events::v3::Response> {
    let events = s
        .rooms
        .member_events(&req.room_id, req.user(), req.at.as_deref())?;
    let mut chunk = Vec::with_capacity(events.len());
    for e in events {
        let membership = e
            .pdu
            .content_json()
            .get("membership")
            .and_then(|m| m.as_str())
            .unwrap_or_default()
            .to_owned();
        if req
            .membership
            .as_ref()
            .is_some_and(|m| m.as_str() != membership)
        {
            continue;
        }
        if req
            .not_membership
            .as_ref()
            .is_some_and(|m| m.as_str() == membership)
        {
            continue;
        }
        let json = s.rooms.timeline.to_client(&e, Some(req.client_session()))?;
        chunk.push(Raw::from_json(serde_json::value::to_raw_value(&json)?));
    }
    Ok(get_member_events::v3::Response::new(chunk))
}

pub async fn joined_members_of(
    s: Arc<Services>,
    req: Ruma<joined_members::v3::Request>,
) -> Result<joined_members::v3::Response> {
    if s.rooms.membership(&req.room_id, req.user())?.as_deref() != Some("join") {
        return Err(Error::forbidden("You are not a member of this room"));
    }
    let mut joined = BTreeMap::new();
    for e in s.rooms.member_events(&req.room_id, req.user(), None)? {
        let content = e.pdu.content_json();
        if content.get("membership").and_then(|m| m.as_str()) != Some("join") {
            continue;
        }
        let Some(user) = e
            .pdu
            .state_key
            .as_deref()
            .and_then(|k| ruma::UserId::parse(k).ok())
        else {
            continue;
        };
        let mut member = joined_members::v3::RoomMember::new();
        member.display_name = content
            .get("displayname")
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        member.avatar_url = content
            .get("avatar_url")
            .and_then(|v| v.as_str())
            .map(OwnedMxcUri::from);
        joined.insert(user, member);
    }
    Ok(joined_members::v3::Response::new(joined))
}
