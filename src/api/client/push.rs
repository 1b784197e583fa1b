//! Push: the user's rules (`/pushrules`), pushers (`/pushers`) and `/notifications`.

use std::sync::Arc;

use ruma::{
    api::client::push::{
        PushRule, delete_pushrule, get_notifications, get_pushers, get_pushrule,
        get_pushrule_actions, get_pushrule_enabled, get_pushrules_all, get_pushrules_global_scope,
        set_pusher::{self, v3::PusherAction},
        set_pushrule, set_pushrule_actions, set_pushrule_enabled,
    },
    push::{RemovePushRuleError, RuleKind},
    serde::Raw,
};

use crate::{
    error::{Error, Result},
    http::Ruma,
    service::{Services, sync::ReadScope},
};

fn not_found() -> Error {
    Error::not_found("No push rule with this kind and id")
}

fn get_rule(
    s: &Services,
    req_user: &ruma::UserId,
    kind: &RuleKind,
    rule_id: &str,
) -> Result<PushRule> {
    let rules = (*s.push.ruleset(req_user)?).clone();
    rules
        .get(kind.clone(), rule_id)
        .map(PushRule::from)
        .ok_or_else(not_found)
}

pub async fn all(
    s: Arc<Services>,
    req: Ruma<get_pushrules_all::v3::Request>,
) -> Result<get_pushrules_all::v3::Response> {
    Ok(get_pushrules_all::v3::Response::new(
        (*s.push.ruleset(req.user())?).clone(),
    ))
}

pub async fn global(
    s: Arc<Services>,
    req: Ruma<get_pushrules_global_scope::v3::Request>,
) -> Result<get_pushrules_global_scope::v3::Response> {
    Ok(get_pushrules_global_scope::v3::Response::new(
        (*s.push.ruleset(req.user())?).clone(),
    ))
}

pub async fn get(
    s: Arc<Services>,
    req: Ruma<get_pushrule::v3::Request>,
) -> Result<get_pushrule::v3::Response> {
    Ok(get_pushrule::v3::Response::new(get_rule(
        &s,
        req.user(),
        &req.kind,
        &req.rule_id,
    )?))
}

pub async fn set(
    s: Arc<Services>,
    req: Ruma<set_pushrule::v3::Request>,
) -> Result<set_pushrule::v3::Response> {
    s.push.edit_rules(req.user(), |rules| {
        rules
            .insert(
                req.rule.clone(),
                req.after.as_deref(),
                req.before.as_deref(),
            )
            .map_err(|e| Error::bad_json(format!("cannot add this push rule: {e}")))
    })?;
    Ok(set_pushrule::v3::Response::new())
}

pub async fn delete(
    s: Arc<Services>,
    req: Ruma<delete_pushrule::v3::Request>,
) -> Result<delete_pushrule::v3::Response> {
    s.push.edit_rules(req.user(), |rules| {
        rules
            .remove(req.kind.clone(), &req.rule_id)
            .map_err(|e| match e {
                RemovePushRuleError::NotFound => not_found(),
                other => Error::bad_json(format!("cannot remove this push rule: {other}")),
            })
    })?;
    Ok(delete_pushrule::v3::Response::new())
}

pub async fn get_enabled(
    s: Arc<Services>,
    req: Ruma<get_pushrule_enabled::v3::Request>,
) -> Result<get_pushrule_enabled::v3::Response> {
    Ok(get_pushrule_enabled::v3::Response::new(
        get_rule(&s, req.user(), &req.kind, &req.rule_id)?.enabled,
    ))
}

pub async fn set_enabled(
    s: Arc<Services>,
    req: Ruma<set_pushrule_enabled::v3::Request>,
) -> Result<set_pushrule_enabled::v3::Response> {
    s.push.edit_rules(req.user(), |rules| {
        rules
            .set_enabled(req.kind.clone(), &req.rule_id, req.enabled)
            .map_err(|_| not_found())
    })?;
    Ok(set_pushrule_enabled::v3::Response::new())
}

pub async fn get_actions(
    s: Arc<Services>,
    req: Ruma<get_pushrule_actions::v3::Request>,
) -> Result<get_pushrule_actions::v3::Response> {
    Ok(get_pushrule_actions::v3::Response::new(
        get_rule(&s, req.user(), &req.kind, &req.rule_id)?.actions,
    ))
}

pub async fn set_actions(
    s: Arc<Services>,
    req: Ruma<set_pushrule_actions::v3::Request>,
) -> Result<set_pushrule_actions::v3::Response> {
    s.push.edit_rules(req.user(), |rules| {
        rules
            .set_actions(req.kind.clone(), &req.rule_id, req.actions.clone())
            .map_err(|_| not_found())
    })?;
    Ok(set_pushrule_actions::v3::Response::new())
}

// --- pushers and notifications ---

pub async fn pushers(
    s: Arc<Services>,
    req: Ruma<get_pushers::v3::Request>,
) -> Result<get_pushers::v3::Response> {
    let mut out = Vec::new();
    for record in s.push.pushers(req.user())? {
        out.push(record.parsed()?);
    }
    Ok(get_pushers::v3::Response::new(out))
}

pub async fn set_pusher(
    s: Arc<Services>,
    req: Ruma<set_pusher::v3::Request>,
) -> Result<set_pusher::v3::Response> {
    match &req.action {
        PusherAction::Post(data) => {
            s.push
                .set_pusher(req.user(), req.device().as_str(), &data.pusher, data.append)?;
        }
        PusherAction::Delete(ids) => {
            s.push
                .delete_pusher(req.user(), &ids.app_id, &ids.pushkey)?;
        }
        _ => return Err(Error::bad_json("unknown pusher action")),
    }
    Ok(set_pusher::v3::Response::new())
}

pub async fn notifications(
    s: Arc<Services>,
    req: Ruma<get_notifications::v3::Request>,
) -> Result<get_notifications::v3::Response> {
    let before = match &req.from {
        Some(from) => Some(
            from.parse::<u64>()
                .map_err(|_| Error::invalid_param("'from' is not a token from this server"))?,
        ),
        None => None,
    };
    let limit = req
        .limit
        .map(|l| u64::from(l).clamp(1, 100) as usize)
        .unwrap_or(20);
    let only_highlight = req.only.as_deref() == Some("highlight");
    let user = req.user();
    let tl = &s.rooms.timeline;
    let found = s.push.notifications(user, before, limit, only_highlight)?;
    let mut out = Vec::with_capacity(found.len());
    let mut last = None;
    for (pos, room_short, action) in found {
        last = Some(pos);
        let Some(event) = tl.stored(action.event)? else {
            continue;
        };
        let read_pos = crate::service::sync::read_position(&s, user, room_short, ReadScope::Main)?;
        let mut json = tl.to_client(&event, Some(req.client_session()))?;
        if let Some(o) = json.as_object_mut() {
            o.remove("room_id");
        }
        out.push(get_notifications::v3::Notification::new(
            action.actions,
            Raw::from_json(serde_json::value::to_raw_value(&json)?),
            pos <= read_pos,
            event.room_id.clone(),
            event.pdu.origin_server_ts,
        ));
    }
    let mut res = get_notifications::v3::Response::new(out);
    if res.notifications.len() >= limit {
        res.next_token = last.map(|p| p.to_string());
    }
    Ok(res)
}
