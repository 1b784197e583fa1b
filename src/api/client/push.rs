//! `/pushrules`: read and edit the user's push rules.

use std::sync::Arc;

use ruma::{
    api::client::push::{
        PushRule, delete_pushrule, get_pushrule, get_pushrule_actions, get_pushrule_enabled,
        get_pushrules_all, get_pushrules_global_scope, set_pushrule, set_pushrule_actions,
        set_pushrule_enabled,
    },
    push::{RemovePushRuleError, RuleKind},
};

use crate::{
    error::{Error, Result},
    http::Ruma,
    service::{Services, push},
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
    let rules = push::ruleset(&s.users, req_user)?;
    rules
        .get(kind.clone(), rule_id)
        .map(PushRule::from)
        .ok_or_else(not_found)
}

pub async fn all(
    s: Arc<Services>,
    req: Ruma<get_pushrules_all::v3::Request>,
) -> Result<get_pushrules_all::v3::Response> {
    Ok(get_pushrules_all::v3::Response::new(push::ruleset(
        &s.users,
        req.user(),
    )?))
}

pub async fn global(
    s: Arc<Services>,
    req: Ruma<get_pushrules_global_scope::v3::Request>,
) -> Result<get_pushrules_global_scope::v3::Response> {
    Ok(get_pushrules_global_scope::v3::Response::new(
        push::ruleset(&s.users, req.user())?,
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
    let mut rules = push::ruleset(&s.users, req.user())?;
    rules
        .insert(
            req.rule.clone(),
            req.after.as_deref(),
            req.before.as_deref(),
        )
        .map_err(|e| Error::bad_json(format!("cannot add this push rule: {e}")))?;
    push::save(&s.users, req.user(), &rules)?;
    Ok(set_pushrule::v3::Response::new())
}

pub async fn delete(
    s: Arc<Services>,
    req: Ruma<delete_pushrule::v3::Request>,
) -> Result<delete_pushrule::v3::Response> {
    let mut rules = push::ruleset(&s.users, req.user())?;
    rules
        .remove(req.kind.clone(), &req.rule_id)
        .map_err(|e| match e {
            RemovePushRuleError::NotFound => not_found(),
            other => Error::bad_json(format!("cannot remove this push rule: {other}")),
        })?;
    push::save(&s.users, req.user(), &rules)?;
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
    let mut rules = push::ruleset(&s.users, req.user())?;
    rules
        .set_enabled(req.kind.clone(), &req.rule_id, req.enabled)
        .map_err(|_| not_found())?;
    push::save(&s.users, req.user(), &rules)?;
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
    let mut rules = push::ruleset(&s.users, req.user())?;
    rules
        .set_actions(req.kind.clone(), &req.rule_id, req.actions.clone())
        .map_err(|_| not_found())?;
    push::save(&s.users, req.user(), &rules)?;
    Ok(set_pushrule_actions::v3::Response::new())
}
