//! Login (password, token), logout, login tokens.

use std::{sync::Arc, time::Duration};

use ruma::{
    OwnedUserId, UserId,
    api::client::{
        session::{get_login_token, get_login_types, login, logout, logout_all},
        uiaa::{AuthFlow, AuthType, UserIdentifier},
    },
};

use crate::{
    error::{Error, Result},
    http::Ruma,
    service::Services,
};

fn parse_login_user(
    s: &Services,
    identifier: Option<&UserIdentifier>,
    user: Option<&str>,
) -> Result<OwnedUserId> {
    let raw = match identifier {
        Some(UserIdentifier::Matrix(m)) => m.user.clone(),
        Some(_) => return Err(Error::forbidden("Only m.id.user identifiers are supported")),
        None => user
            .map(str::to_owned)
            .ok_or_else(|| Error::missing_param("identifier is required"))?,
    };
    let id = if raw.starts_with('@') {
        UserId::parse(raw.to_lowercase()).map_err(|_| Error::invalid_param("Invalid user id"))?
    } else {
        UserId::parse_with_server_name(raw.to_lowercase(), s.globals.server_name())
            .map_err(|_| Error::invalid_param("Invalid user id"))?
    };
    if id.server_name() != s.globals.server_name() {
        return Err(Error::forbidden("This account belongs to another server"));
    }
    Ok(id)
}

/// What the user typed to name themselves, as a directory login: a full user id of
/// this server counts by its localpart; anything else (`jdupont`, `jean@corp.example`)
/// as typed.
fn directory_login(
    s: &Services,
    identifier: Option<&UserIdentifier>,
    user: Option<&str>,
) -> Option<String> {
    let raw = match identifier {
        Some(UserIdentifier::Matrix(m)) => m.user.clone(),
        Some(_) => return None,
        None => user?.to_owned(),
    };
    match UserId::parse(raw.as_str()) {
        Ok(id) if id.server_name() == s.globals.server_name() => Some(id.localpart().to_owned()),
        Ok(_) => None,
        Err(_) => Some(raw),
    }
}

/// A password login: the directory first (when configured), then the local password
/// (local accounts always; directory accounts when `ldap.allow_local_passwords`). A
/// directory that cannot be asked does not stop local accounts from logging in.
async fn password_login(
    s: &Services,
    req: &Ruma<login::v3::Request>,
    identifier: Option<&UserIdentifier>,
    user: Option<&str>,
    password: &str,
) -> Result<(OwnedUserId, Option<String>)> {
    let local_id = parse_login_user(s, identifier, user);
    if let Ok(id) = &local_id {
        s.login_limit.check(&format!("user:{id}"))?;
    }
    let mut directory_error = None;
    if s.ldap.is_some()
        && let Some(login) = directory_login(s, identifier, user)
    {
        match crate::service::ldap::login(s, &login, password).await {
            Ok(Some(id)) => return Ok((id, None)),
            Ok(None) => {}
            Err(e) if e.errcode() == "M_USER_DEACTIVATED" => return Err(e),
            Err(e) => directory_error = Some(e),
        }
    }
    let user_id = match local_id {
        Ok(id) => id,
        Err(e) => return Err(directory_error.unwrap_or(e)),
    };
    let local_allowed = s
        .users
        .get(&user_id)?
        .is_none_or(|r| r.ldap_dn.is_none() || s.globals.config.ldap.allow_local_passwords);
    if local_allowed
        && !password.is_empty()
        && let Some(hash) = s.users.verified_password(&user_id, password).await?
    {
        return Ok((user_id, Some(hash)));
    }
    if let Some(e) = directory_error {
        tracing::warn!(user_id = %user_id, error = %e, "login failed: the directory is unavailable");
        return Err(e);
    }
    tracing::info!(user_id = %user_id, ip = %req.ip_key(), "failed password login");
    Err(Error::forbidden("Invalid username or password"))
}

pub async fn login_types(
    _: Arc<Services>,
    _: Ruma<get_login_types::v3::Request>,
) -> Result<get_login_types::v3::Response> {
    use get_login_types::v3::{LoginType, PasswordLoginType, TokenLoginType};
    let mut token = TokenLoginType::new();
    token.get_login_token = true;
    Ok(get_login_types::v3::Response::new(vec![
        LoginType::Password(PasswordLoginType::new()),
        LoginType::Token(token),
        LoginType::ApplicationService(get_login_types::v3::ApplicationServiceLoginType::new()),
    ]))
}

pub async fn login(s: Arc<Services>, req: Ruma<login::v3::Request>) -> Result<login::v3::Response> {
    if req.appservice.as_ref().is_none_or(|a| a.rate_limited()) {
        s.login_limit.check(&format!("ip:{}", req.ip_key()))?;
    }
    let (user_id, verified_hash) = match &req.login_info {
        login::v3::LoginInfo::ApplicationService(a) => {
            let appservice = req.appservice.as_ref().ok_or_else(|| {
                Error::missing_token_msg(
                    "m.login.application_service needs the appservice's as_token",
                )
            })?;
            #[allow(deprecated)]
            let user_id = parse_login_user(&s, a.identifier.as_ref(), a.user.as_deref())?;
            if !appservice.claims_user(&user_id) {
                return Err(Error::exclusive(format!(
                    "{user_id} is not in the namespace of appservice {:?}",
                    appservice.id()
                )));
            }
            (user_id, None)
        }
        _ if req.appservice.is_some() => {
            return Err(Error::unknown(
                "An appservice token only logs in with m.login.application_service",
            ));
        }
        login::v3::LoginInfo::Password(p) => {
            #[allow(deprecated)]
            let (identifier, user) = (p.identifier.as_ref(), p.user.as_deref());
            password_login(&s, &req, identifier, user, &p.password).await?
        }
        login::v3::LoginInfo::Token(t) => (
            s.users
                .consume_login_token(&t.token)?
                .ok_or_else(|| Error::forbidden("Invalid or expired login token"))?,
            None,
        ),
        _ => return Err(Error::unknown("Unsupported login type")),
    };
    let (device_id, token) = s.users.create_login_device(
        &user_id,
        req.device_id.as_deref(),
        req.initial_device_display_name.clone(),
        req.ip.map(|i| i.to_string()),
        verified_hash.as_deref(),
    )?;
    let mut res = login::v3::Response::new(user_id, token, device_id);
    #[allow(deprecated)]
    {
        res.home_server = Some(s.globals.owned_server_name());
    }
    Ok(res)
}

pub async fn get_token(
    s: Arc<Services>,
    req: Ruma<get_login_token::v1::Request>,
) -> Result<get_login_token::v1::Response> {
    let flows = vec![AuthFlow::new(vec![AuthType::Password])];
    s.uiaa
        .check(&s.users, flows, req.auth.as_ref(), Some(req.user()))
        .await?;
    let ttl = Duration::from_secs(120);
    let token = s.users.create_login_token(req.user(), ttl)?;
    Ok(get_login_token::v1::Response::new(ttl, token))
}

pub async fn logout(
    s: Arc<Services>,
    req: Ruma<logout::v3::Request>,
) -> Result<logout::v3::Response> {
    s.remove_device(req.user(), req.device())?;
    Ok(logout::v3::Response::new())
}

pub async fn logout_all(
    s: Arc<Services>,
    req: Ruma<logout_all::v3::Request>,
) -> Result<logout_all::v3::Response> {
    s.remove_devices_except(req.user(), None)?;
    Ok(logout_all::v3::Response::new())
}
