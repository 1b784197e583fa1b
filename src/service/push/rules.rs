//! Push rules: each user's ruleset, stored as the `m.push_rules` account data the spec
//! defines, starting from the server-default rules.

use ruma::{UserId, push::Ruleset};
use serde_json::{Value as JsonValue, json};

use crate::error::Result;
use crate::service::users::Users;

pub const ACCOUNT_DATA_TYPE: &str = "m.push_rules";

/// The user's ruleset: what they stored, with server-default rules added by newer
/// versions of the spec merged in; the server defaults for new users.
pub fn ruleset(users: &Users, user: &UserId) -> Result<Ruleset> {
    Ok(ruleset_and_origin(users, user)?.0)
}

/// The user's rules, and whether they are the server's defaults (nothing stored, or
/// nothing readable).
pub fn ruleset_and_origin(users: &Users, user: &UserId) -> Result<(Ruleset, bool)> {
    let defaults = Ruleset::server_default(user);
    let Some(stored) = users.account_data(user, None, ACCOUNT_DATA_TYPE)? else {
        return Ok((defaults, true));
    };
    match serde_json::from_value::<Ruleset>(stored.get("global").cloned().unwrap_or_default()) {
        Ok(mut rules) => {
            rules.update_with_server_default(defaults);
            Ok((rules, false))
        }
        Err(e) => {
            tracing::warn!(user_id = %user, error = %e, "stored push rules are unreadable; using the defaults");
            Ok((defaults, true))
        }
    }
}

pub fn save(users: &Users, user: &UserId, rules: &Ruleset) -> Result<()> {
    users.set_account_data(user, None, ACCOUNT_DATA_TYPE, &json!({ "global": rules }))
}

/// The `m.push_rules` account data content for sync.
pub fn account_data_content(users: &Users, user: &UserId) -> Result<JsonValue> {
    Ok(json!({ "global": ruleset(users, user)? }))
}
