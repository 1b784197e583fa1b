//! Hashing and signing the events this server creates.
//!
//! An event's id (its reference hash), its content hash and the size limit do not
//! depend on its signature, and the authorization rules never read it. So the bytes
//! to sign are taken first, with a placeholder of the signature's exact length in the
//! event, and the ed25519 signature itself — most of an event's build time — may be
//! computed on a blocking thread while the draft goes on with its next events; the
//! commit puts it in before anything is written.

use std::{cell::RefCell, sync::Arc};

use ruma::{
    AnyKeyName, CanonicalJsonObject, CanonicalJsonValue, OwnedSigningKeyId, SigningKeyAlgorithm,
    SigningKeyId,
    room_version_rules::RedactionRules,
    signatures::{JsonError, KeyPair, Signature, hash_and_sign_event},
};

use crate::{
    error::{Error, Result},
    service::globals::Globals,
};

/// Length in bytes of an ed25519 signature.
const SIGNATURE_BYTES: usize = 64;

/// The server's signature of an event: in place already, or still being computed.
pub enum Signing {
    Done,
    Later(tokio::task::JoinHandle<Signature>),
}

/// Stands in for the server's key: keeps what would be signed and answers a
/// placeholder signature of the real length.
struct Capture {
    key_id: OwnedSigningKeyId<AnyKeyName>,
    message: RefCell<Vec<u8>>,
}

impl KeyPair for Capture {
    fn sign(&self, message: &[u8]) -> Signature {
        *self.message.borrow_mut() = message.to_vec();
        Signature::new(self.key_id.clone(), vec![0; SIGNATURE_BYTES])
    }
}

/// Add the content hash and this server's signature to a new event. With `later`
/// (and a runtime to run it on), the signature is computed on a blocking thread and
/// `object` holds a placeholder of the same length until [`finish`] puts it in.
pub fn hash_and_sign(
    globals: &Arc<Globals>,
    redaction: &RedactionRules,
    object: &mut CanonicalJsonObject,
    later: bool,
) -> Result<Signing> {
    let capture = Capture {
        key_id: SigningKeyId::from_parts(
            SigningKeyAlgorithm::Ed25519,
            globals.keypair.version().into(),
        ),
        message: RefCell::new(Vec::new()),
    };
    hash_and_sign_event(globals.server_name().as_str(), &capture, object, redaction).map_err(
        |e| match e {
            JsonError::PduTooLarge => Error::too_large("the event is larger than 65536 bytes"),
            other => Error::internal(format!("cannot sign event: {other}")),
        },
    )?;
    let message = capture.message.into_inner();
    if later && let Ok(runtime) = tokio::runtime::Handle::try_current() {
        let globals = globals.clone();
        return Ok(Signing::Later(
            runtime.spawn_blocking(move || globals.keypair.sign(&message)),
        ));
    }
    let signature = globals.keypair.sign(&message);
    finish(globals, object, &signature)?;
    Ok(Signing::Done)
}

/// Put the server's signature in place of the placeholder.
pub fn finish(
    globals: &Globals,
    object: &mut CanonicalJsonObject,
    signature: &Signature,
) -> Result<()> {
    let ours = object
        .get_mut("signatures")
        .and_then(|s| match s {
            CanonicalJsonValue::Object(o) => o.get_mut(globals.server_name().as_str()),
            _ => None,
        })
        .and_then(|s| match s {
            CanonicalJsonValue::Object(o) => Some(o),
            _ => None,
        })
        .ok_or_else(|| Error::internal("a signed event lost its signatures"))?;
    ours.insert(
        signature.id(),
        CanonicalJsonValue::String(signature.base64()),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use ruma::{
        RoomVersionId,
        room_version_rules::RoomVersionRules,
        signatures::{PublicKeyMap, PublicKeySet, verify_event},
    };
    use serde_json::json;

    use super::*;
    use crate::{config::Config, storage::Db};

    fn globals() -> (tempfile::TempDir, Arc<Globals>) {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().to_owned(),
            ..Config::default()
        };
        let db = Db::open(&config.data_dir, 8).unwrap();
        (dir, Arc::new(Globals::load(config, &db).unwrap()))
    }

    fn event(server: &str) -> CanonicalJsonObject {
        let v = json!({
            "type": "m.room.message",
            "room_id": format!("!room:{server}"),
            "sender": format!("@alice:{server}"),
            "content": { "msgtype": "m.text", "body": "hello" },
            "origin_server_ts": 1_700_000_000_000u64,
            "depth": 3,
            "prev_events": ["$prev"],
            "auth_events": ["$create"],
        });
        serde_json::from_value(v).unwrap()
    }

    fn verify(globals: &Globals, object: &CanonicalJsonObject, rules: &RoomVersionRules) {
        let server = globals.server_name().to_string();
        let mut keys = PublicKeySet::new();
        keys.insert(
            format!("ed25519:{}", globals.keypair.version()),
            ruma::serde::Base64::new(globals.keypair.public_key().to_vec()),
        );
        let mut map = PublicKeyMap::new();
        map.insert(server, keys);
        verify_event(&map, object, rules).expect("the signature verifies");
    }

    #[tokio::test]
    async fn a_signature_computed_later_is_the_one_computed_at_once() {
        let (_dir, globals) = globals();
        let rules = RoomVersionId::V11.rules().unwrap();
        let mut now = event(globals.server_name().as_str());
        let mut later = now.clone();
        assert!(matches!(
            hash_and_sign(&globals, &rules.redaction, &mut now, false).unwrap(),
            Signing::Done
        ));
        let Signing::Later(handle) =
            hash_and_sign(&globals, &rules.redaction, &mut later, true).unwrap()
        else {
            panic!("asked to sign later inside a runtime");
        };
        // The placeholder has the real signature's length: the size check before the
        // commit sees the final size.
        assert_eq!(
            serde_json::to_vec(&later).unwrap().len(),
            serde_json::to_vec(&now).unwrap().len()
        );
        assert_ne!(later, now);
        finish(&globals, &mut later, &handle.await.unwrap()).unwrap();
        assert_eq!(later, now);
        verify(&globals, &now, &rules);
    }

    #[test]
    fn without_a_runtime_the_signature_is_computed_at_once() {
        let (_dir, globals) = globals();
        let rules = RoomVersionId::V12.rules().unwrap();
        let mut object = event(globals.server_name().as_str());
        assert!(matches!(
            hash_and_sign(&globals, &rules.redaction, &mut object, true).unwrap(),
            Signing::Done
        ));
        verify(&globals, &object, &rules);
    }
}
