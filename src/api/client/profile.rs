//! Profiles: display name and avatar, propagated to the user's member events.

use std::sync::Arc;

use ruma::{
    OwnedMxcUri, UserId,
    api::client::profile::{
        get_avatar_url, get_display_name, get_profile, set_avatar_url, set_display_name,
    },
};
use serde_json::Value as JsonValue;

use crate::{
    error::{Error, Result},
    http::Ruma,
    service::{Services, users::UserRecord},
};

fn profile_of(s: &Services, user: &UserId) -> Result<UserRecord> {
    s.users
        .get(user)?
        .filter(|r| !r.deactivated)
        .ok_or_else(|| Error::not_found("This user has no profile"))
}

fn ensure_self(req_user: &UserId, target: &UserId) -> Result<()> {
    if req_user != target {
        return Err(Error::forbidden("You can only change your own profile"));
    }
    Ok(())
}

pub async fn get(
    s: Arc<Services>,
    req: Ruma<get_profile::v3::Request>,
) -> Result<get_profile::v3::Response> {
    s.ask_appservices_about(&req.user_id).await?;
    let p = profile_of(&s, &req.user_id)?;
    let mut res = get_profile::v3::Response::new();
    if let Some(n) = p.displayname {
        res.set("displayname".into(), JsonValue::String(n));
    }
    if let Some(a) = p.avatar_url {
        res.set("avatar_url".into(), JsonValue::String(a));
    }
    Ok(res)
}

pub async fn get_displayname(
    s: Arc<Services>,
    req: Ruma<get_display_name::v3::Request>,
) -> Result<get_display_name::v3::Response> {
    Ok(get_display_name::v3::Response::new(
        profile_of(&s, &req.user_id)?.displayname,
    ))
}

pub async fn set_displayname(
    s: Arc<Services>,
    req: Ruma<set_display_name::v3::Request>,
) -> Result<set_display_name::v3::Response> {
    ensure_self(req.user(), &req.user_id)?;
    if req.displayname.as_ref().is_some_and(|n| n.len() > 256) {
        return Err(Error::bad_json("Display names may be at most 256 bytes"));
    }
    s.users
        .set_displayname(req.user(), req.displayname.clone())?;
    s.rooms.propagate_profile(req.user()).await?;
    Ok(set_display_name::v3::Response::new())
}

pub async fn get_avatar(
    s: Arc<Services>,
    req: Ruma<get_avatar_url::v3::Request>,
) -> Result<get_avatar_url::v3::Response> {
    let url = profile_of(&s, &req.user_id)?
        .avatar_url
        .map(OwnedMxcUri::from);
    Ok(get_avatar_url::v3::Response::new(url))
}

pub async fn set_avatar(
    s: Arc<Services>,
    req: Ruma<set_avatar_url::v3::Request>,
) -> Result<set_avatar_url::v3::Response> {
    ensure_self(req.user(), &req.user_id)?;
    if let Some(url) = &req.avatar_url
        && !url.is_valid()
    {
        return Err(Error::invalid_param("avatar_url must be an mxc:// URI"));
    }
    s.users
        .set_avatar_url(req.user(), req.avatar_url.as_ref().map(|u| u.to_string()))?;
    s.rooms.propagate_profile(req.user()).await?;
    Ok(set_avatar_url::v3::Response::new())
}
