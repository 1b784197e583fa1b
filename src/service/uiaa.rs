//! User-interactive authentication: sessions, stages, and what each stage proves.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use ruma::{
    OwnedUserId, UserId,
    api::{
        client::uiaa::{AuthData, AuthFlow, AuthType, UiaaInfo, UserIdentifier},
        error::{ErrorKind, StandardErrorBody},
    },
};

use super::{
    globals::random_string,
    users::{Users, now_ms},
};
use crate::error::{Error, Result};

const SESSION_TTL: Duration = Duration::from_secs(15 * 60);

#[derive(Default)]
struct UiaaSession {
    completed: Vec<AuthType>,
    registration_token: Option<String>,
    created: Option<Instant>,
}

/// What a finished flow proved, for the caller to act on.
#[derive(Debug, Default)]
pub struct Completed {
    /// The registration token a registration flow used; count it once the account exists.
    pub registration_token: Option<String>,
}

#[derive(Default)]
pub struct Uiaa {
    sessions: Mutex<HashMap<String, UiaaSession>>,
    /// Checks the passwords of accounts that come from the directory.
    directory: Option<std::sync::Arc<super::ldap::LdapService>>,
}

impl Uiaa {
    pub fn new(directory: Option<std::sync::Arc<super::ldap::LdapService>>) -> Self {
        Self {
            sessions: Mutex::default(),
            directory,
        }
    }

    /// Run one step of user-interactive authentication. Returns `Ok` once one of `flows`
    /// is complete; otherwise an [`Error::Uiaa`] that tells the client what is left.
    /// `who` is the account the client must prove to be (for password stages).
    pub async fn check(
        &self,
        users: &Users,
        flows: Vec<AuthFlow>,
        auth: Option<&AuthData>,
        who: Option<&UserId>,
    ) -> Result<Completed> {
        let session_id = auth.and_then(|a| a.session()).map(str::to_owned);
        let mut auth_error = None;
        let session_id = match session_id {
            Some(id) if self.sessions.lock().contains_key(&id) => id,
            Some(_) => {
                return Err(Error::forbidden(
                    "Unknown or expired authentication session",
                ));
            }
            None => {
                let id = random_string(24);
                self.sessions.lock().insert(
                    id.clone(),
                    UiaaSession {
                        created: Some(Instant::now()),
                        ..Default::default()
                    },
                );
                id
            }
        };
        if let Some(auth) = auth {
            match self.verify_stage(users, auth, who).await {
                Ok((stage, token)) => {
                    let mut sessions = self.sessions.lock();
                    if let Some(s) = sessions.get_mut(&session_id) {
                        if !s.completed.contains(&stage) {
                            s.completed.push(stage);
                        }
                        if token.is_some() {
                            s.registration_token = token;
                        }
                    }
                }
                Err(Error::Matrix { kind, message, .. }) => {
                    auth_error = Some(StandardErrorBody::new(kind, message))
                }
                Err(other) => return Err(other),
            }
        }
        let mut sessions = self.sessions.lock();
        sessions.retain(|_, s| s.created.is_some_and(|c| c.elapsed() < SESSION_TTL));
        let session = sessions.entry(session_id.clone()).or_default();
        let done = flows
            .iter()
            .any(|f| f.stages.iter().all(|s| session.completed.contains(s)));
        if done {
            let s = sessions.remove(&session_id).unwrap_or_default();
            return Ok(Completed {
                registration_token: s.registration_token,
            });
        }
        let mut info = UiaaInfo::new(flows);
        info.completed = session.completed.clone();
        info.session = Some(session_id);
        info.auth_error = auth_error.map(Box::new);
        Err(Error::Uiaa(Box::new(info)))
    }

    async fn verify_stage(
        &self,
        users: &Users,
        auth: &AuthData,
        who: Option<&UserId>,
    ) -> Result<(AuthType, Option<String>)> {
        match auth {
            AuthData::Dummy(_) => Ok((AuthType::Dummy, None)),
            AuthData::RegistrationToken(t) => {
                let valid = users
                    .registration_token(&t.token)?
                    .is_some_and(|r| r.is_valid(now_ms()));
                if !valid {
                    return Err(Error::forbidden("Invalid registration token"));
                }
                Ok((AuthType::RegistrationToken, Some(t.token.clone())))
            }
            AuthData::Password(p) => {
                let Some(who) = who else {
                    return Err(Error::forbidden("Password authentication needs an account"));
                };
                let claimed = match &p.identifier {
                    UserIdentifier::Matrix(m) => m.user.clone(),
                    _ => return Err(Error::forbidden("Only user identifiers are supported")),
                };
                let claimed_user: Option<OwnedUserId> = if claimed.starts_with('@') {
                    UserId::parse(claimed.as_str()).ok()
                } else {
                    UserId::parse_with_server_name(claimed.as_str(), who.server_name()).ok()
                };
                if claimed_user.as_deref() != Some(who) {
                    return Err(Error::forbidden("You can only authenticate as yourself"));
                }
                let directory_dn = match &self.directory {
                    Some(_) => users.get(who)?.and_then(|r| r.ldap_dn),
                    None => None,
                };
                let ok = match (&self.directory, directory_dn) {
                    // Directory accounts prove themselves with their directory password.
                    (Some(ldap), Some(dn)) => {
                        ldap.verify_password(&dn, &p.password).await?
                            || (ldap.config.allow_local_passwords
                                && users.check_password(who, &p.password).await?)
                    }
                    _ => users.check_password(who, &p.password).await?,
                };
                if ok {
                    Ok((AuthType::Password, None))
                } else {
                    Err(Error::Matrix {
                        status: http::StatusCode::FORBIDDEN,
                        kind: ErrorKind::Forbidden,
                        message: "Invalid password".into(),
                    })
                }
            }
            _ => Err(Error::forbidden(
                "This authentication type is not supported",
            )),
        }
    }
}
