//! Registration, availability, whoami, password change, deactivation.

use std::sync::Arc;

use ruma::api::client::{
    account::{
        change_password, check_registration_token_validity, deactivate, get_username_availability,
        register::{self, RegistrationKind},
        whoami,
    },
    uiaa::{AuthFlow, AuthType},
};

use crate::{
    config::RegistrationMode,
    error::{Error, Result},
    http::Ruma,
    service::{Services, globals::random_string},
};

fn new_user_id(s: &Services, localpart: &str) -> Result<ruma::OwnedUserId> {
    let user_id = crate::service::users::new_local_user_id(localpart, s.globals.server_name())?;
    if user_id.localpart().starts_with('_') {
        return Err(Error::exclusive(
            "Usernames starting with '_' are reserved for bridges and services",
        ));
    }
    if let Some(a) = s.appservices.exclusive_owner_of_user(&user_id) {
        return Err(Error::exclusive(format!(
            "This username belongs to the appservice {:?}",
            a.id()
        )));
    }
    Ok(user_id)
}

/// Registration by an appservice (`m.login.application_service`) of a user in its
/// namespace: no password, no user-interactive auth.
async fn register_for_appservice(
    s: &Services,
    req: &Ruma<register::v3::Request>,
    appservice: &crate::service::appservice::Appservice,
) -> Result<register::v3::Response> {
    let name = req
        .username
        .as_deref()
        .ok_or_else(|| Error::missing_param("an appservice registers users by username"))?;
    let user_id = crate::service::users::new_local_user_id(name, s.globals.server_name())?;
    if !appservice.claims_user(&user_id) {
        return Err(Error::exclusive(format!(
            "{user_id} is not in the namespace of appservice {:?}",
            appservice.id()
        )));
    }
    if s.users.exists(&user_id)? {
        return Err(Error::user_in_use("This username is taken"));
    }
    s.users.create(&user_id, None, false, false).await?;
    tracing::info!(user_id = %user_id, appservice = %appservice.id(), "appservice user registered");
    let mut res = register::v3::Response::new(user_id.clone());
    if !req.inhibit_login {
        let (device_id, token) = s.users.create_device(
            &user_id,
            req.device_id.as_deref(),
            req.initial_device_display_name.clone(),
            req.ip.map(|i| i.to_string()),
        )?;
        res.access_token = Some(token);
        res.device_id = Some(device_id);
    }
    Ok(res)
}

pub async fn register(
    s: Arc<Services>,
    req: Ruma<register::v3::Request>,
) -> Result<register::v3::Response> {
    if let Some(appservice) = req.appservice.clone() {
        if req.login_type != Some(register::LoginType::ApplicationService) {
            return Err(Error::bad_json(
                "an appservice registers with \"type\": \"m.login.application_service\"",
            ));
        }
        return register_for_appservice(&s, &req, &appservice).await;
    }
    if req.login_type == Some(register::LoginType::ApplicationService) {
        return Err(Error::missing_token_msg(
            "m.login.application_service needs the appservice's as_token",
        ));
    }
    s.register_limit.check(&format!("ip:{}", req.ip_key()))?;
    let config = &s.globals.config.registration;
    if req.kind == RegistrationKind::Guest && !config.guest_access {
        return Err(Error::Matrix {
            status: http::StatusCode::FORBIDDEN,
            kind: ruma::api::error::ErrorKind::GuestAccessForbidden,
            message: "Guest access is disabled on this server".into(),
        });
    }
    let flows = match config.mode {
        RegistrationMode::Closed => {
            return Err(Error::forbidden("Registration is disabled on this server"));
        }
        RegistrationMode::Token => vec![AuthFlow::new(vec![AuthType::RegistrationToken])],
        RegistrationMode::Open => vec![
            AuthFlow::new(vec![AuthType::Dummy]),
            AuthFlow::new(vec![AuthType::RegistrationToken]),
        ],
    };
    let user_id = match &req.username {
        Some(name) => new_user_id(&s, name)?,
        None => new_user_id(&s, &random_string(12))?,
    };
    if s.users.exists(&user_id)? {
        return Err(Error::user_in_use("This username is taken"));
    }
    let password = req.password.clone();
    if req.kind != RegistrationKind::Guest {
        match &password {
            Some(p) if p.chars().count() >= config.min_password_length => {}
            _ => {
                return Err(Error::weak_password(format!(
                    "Passwords must be at least {} characters",
                    config.min_password_length
                )));
            }
        }
    }
    let done = s
        .uiaa
        .check(&s.users, flows, req.auth.as_ref(), None)
        .await?;
    // Two clients may have raced through UIA for the same name.
    if s.users.exists(&user_id)? {
        return Err(Error::user_in_use("This username is taken"));
    }
    if let Some(token) = &done.registration_token {
        s.users.use_registration_token(token)?;
    }
    let created = s
        .users
        .create(
            &user_id,
            password.as_deref(),
            false,
            req.kind == RegistrationKind::Guest,
        )
        .await;
    if let Err(e) = created {
        // The name was taken meanwhile: the token's use is given back.
        if let Some(token) = &done.registration_token {
            s.users.return_registration_token(token)?;
        }
        return Err(e);
    }
    tracing::info!(user_id = %user_id, "account registered");
    let mut res = register::v3::Response::new(user_id.clone());
    if !req.inhibit_login {
        let (device_id, token) = s.users.create_device(
            &user_id,
            req.device_id.as_deref(),
            req.initial_device_display_name.clone(),
            req.ip.map(|i| i.to_string()),
        )?;
        res.access_token = Some(token);
        res.device_id = Some(device_id);
    }
    Ok(res)
}

pub async fn available(
    s: Arc<Services>,
    req: Ruma<get_username_availability::v3::Request>,
) -> Result<get_username_availability::v3::Response> {
    s.register_limit.check(&format!("ip:{}", req.ip_key()))?;
    let user_id = new_user_id(&s, &req.username)?;
    if s.users.exists(&user_id)? {
        return Err(Error::user_in_use("This username is taken"));
    }
    Ok(get_username_availability::v3::Response::new(true))
}

pub async fn token_validity(
    s: Arc<Services>,
    req: Ruma<check_registration_token_validity::v1::Request>,
) -> Result<check_registration_token_validity::v1::Response> {
    s.register_limit.check(&format!("ip:{}", req.ip_key()))?;
    let valid = s
        .users
        .registration_token(&req.token)?
        .is_some_and(|t| t.is_valid(crate::service::users::now_ms()));
    Ok(check_registration_token_validity::v1::Response::new(valid))
}

pub async fn whoami(
    s: Arc<Services>,
    req: Ruma<whoami::v3::Request>,
) -> Result<whoami::v3::Response> {
    let guest = s.users.get(req.user())?.is_some_and(|r| r.guest);
    let mut res = whoami::v3::Response::new(req.user().to_owned(), guest);
    res.device_id = Some(req.device().to_owned());
    Ok(res)
}

pub async fn change_password(
    s: Arc<Services>,
    req: Ruma<change_password::v3::Request>,
) -> Result<change_password::v3::Response> {
    let flows = vec![AuthFlow::new(vec![AuthType::Password])];
    s.uiaa
        .check(&s.users, flows, req.auth.as_ref(), Some(req.user()))
        .await?;
    let min = s.globals.config.registration.min_password_length;
    if req.new_password.chars().count() < min {
        return Err(Error::weak_password(format!(
            "Passwords must be at least {min} characters"
        )));
    }
    if crate::service::ldap::is_directory_user(&s, req.user())?
        && !s.globals.config.ldap.allow_local_passwords
    {
        return Err(Error::forbidden(
            "This account's password is managed by the organisation's directory",
        ));
    }
    s.users.set_password(req.user(), &req.new_password).await?;
    if req.logout_devices {
        s.remove_devices_except(req.user(), Some(req.device()))?;
    }
    Ok(change_password::v3::Response::new())
}

pub async fn deactivate(
    s: Arc<Services>,
    req: Ruma<deactivate::v3::Request>,
) -> Result<deactivate::v3::Response> {
    let flows = vec![AuthFlow::new(vec![AuthType::Password])];
    s.uiaa
        .check(&s.users, flows, req.auth.as_ref(), Some(req.user()))
        .await?;
    let user = req.user().to_owned();
    s.deactivate_account(&user).await?;
    tracing::info!(user_id = %user, "account deactivated");
    Ok(deactivate::v3::Response::new(
        ruma::api::client::account::ThirdPartyIdRemovalStatus::NoSupport,
    ))
}

/// Salon keeps no third-party identifiers (email addresses come from the directory), so
/// the list is honestly empty.
pub async fn threepids(
    _: Arc<Services>,
    _: Ruma<ruma::api::client::account::get_3pids::v3::Request>,
) -> Result<ruma::api::client::account::get_3pids::v3::Response> {
    Ok(ruma::api::client::account::get_3pids::v3::Response::new(
        Vec::new(),
    ))
}
