//! The server-server API; for now the server's published signing keys.

use std::sync::Arc;

use axum::{Json, extract::State};
use base64::Engine;
use ruma::{CanonicalJsonObject, CanonicalJsonValue, signatures::sign_json};
use serde_json::{Value as JsonValue, json};

use crate::{
    error::{Error, Result},
    service::{Services, users::now_ms},
};

/// `GET /_matrix/key/v2/server`: the verify key, self-signed.
pub async fn server_keys(State(s): State<Arc<Services>>) -> Result<Json<JsonValue>> {
    let g = &s.globals;
    let public = base64::engine::general_purpose::STANDARD_NO_PAD.encode(g.keypair.public_key());
    let body = json!({
        "server_name": g.server_name(),
        "valid_until_ts": now_ms() + 7 * 24 * 3600 * 1000,
        "verify_keys": { g.key_id(): { "key": public } },
        "old_verify_keys": {},
    });
    let mut object: CanonicalJsonObject =
        match CanonicalJsonValue::try_from(body).map_err(Error::internal)? {
            CanonicalJsonValue::Object(o) => o,
            _ => return Err(Error::internal("key response is not an object")),
        };
    sign_json(g.server_name().as_str(), &g.keypair, &mut object).map_err(Error::internal)?;
    Ok(Json(serde_json::to_value(&object)?))
}
