//! Synapse-compatible shared-secret registration, so existing tooling can create users.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{Json, extract::State};
use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::{Value as JsonValue, json};
use sha1::Sha1;

use crate::{
    error::{Error, Result},
    service::{Services, globals::random_string},
};

static NONCES: Mutex<Option<HashMap<String, Instant>>> = Mutex::new(None);
const NONCE_TTL: Duration = Duration::from_secs(60);

pub async fn nonce(State(_): State<Arc<Services>>) -> Json<JsonValue> {
    let nonce = random_string(32);
    let mut guard = NONCES.lock();
    let map = guard.get_or_insert_with(HashMap::new);
    map.retain(|_, t| t.elapsed() < NONCE_TTL);
    map.insert(nonce.clone(), Instant::now());
    Json(json!({ "nonce": nonce }))
}

#[derive(Deserialize)]
pub struct SharedSecretRegistration {
    nonce: String,
    username: String,
    password: String,
    #[serde(default)]
    displayname: Option<String>,
    #[serde(default)]
    admin: bool,
    mac: String,
}

/// The MAC Synapse defines: HMAC-SHA1 over `nonce NUL username NUL password NUL admin|notadmin`.
pub fn registration_mac(
    secret: &str,
    nonce: &str,
    username: &str,
    password: &str,
    admin: bool,
) -> String {
    hex::encode(
        registration_hmac(secret, nonce, username, password, admin)
            .finalize()
            .into_bytes(),
    )
}

fn registration_hmac(
    secret: &str,
    nonce: &str,
    username: &str,
    password: &str,
    admin: bool,
) -> Hmac<Sha1> {
    let mut mac =
        Hmac::<Sha1>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(nonce.as_bytes());
    mac.update(b"\0");
    mac.update(username.as_bytes());
    mac.update(b"\0");
    mac.update(password.as_bytes());
    mac.update(b"\0");
    mac.update(if admin { b"admin" } else { b"notadmin" });
    mac
}

pub async fn register(
    State(s): State<Arc<Services>>,
    body: axum::body::Bytes,
) -> Result<Json<JsonValue>> {
    let req: SharedSecretRegistration =
        serde_json::from_slice(&body).map_err(|e| Error::bad_json(e.to_string()))?;
    let known = NONCES
        .lock()
        .as_mut()
        .and_then(|m| m.remove(&req.nonce))
        .is_some_and(|t| t.elapsed() < NONCE_TTL);
    if !known {
        return Err(Error::forbidden("Unknown or expired nonce"));
    }
    let given = hex::decode(req.mac.as_bytes()).unwrap_or_default();
    // verify_slice compares in constant time.
    registration_hmac(
        &s.globals.shared_secret,
        &req.nonce,
        &req.username,
        &req.password,
        req.admin,
    )
    .verify_slice(&given)
    .map_err(|_| Error::forbidden("HMAC incorrect"))?;
    let user_id = crate::service::users::new_local_user_id(&req.username, s.globals.server_name())?;
    if s.users.exists(&user_id)? {
        return Err(Error::user_in_use("This username is taken"));
    }
    s.users
        .create(&user_id, Some(&req.password), req.admin, false)
        .await?;
    if let Some(name) = req.displayname {
        s.users.set_displayname(&user_id, Some(name))?;
    }
    let (device_id, token) = s.users.create_device(
        &user_id,
        None,
        Some("shared-secret registration".into()),
        None,
    )?;
    Ok(Json(json!({
        "user_id": user_id,
        "access_token": token,
        "device_id": device_id,
        "home_server": s.globals.server_name(),
    })))
}
