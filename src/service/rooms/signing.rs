//! Hashing and signing the events this server creates.
//!
//! An event's id (its reference hash), its content hash and the size limit do not
//! depend on its signature, and the authorization rules never read it. So the bytes
//! to sign are taken first, with a placeholder of the signature's exact length in the
//! event, and the ed25519 signature itself — most of an event's build time — may wait
//! for the commit: a draft of many events (a new room's) then signs them all at once,
//! half on a blocking thread and half on its own, before anything is written.

use std::{cell::RefCell, sync::Arc};

use ruma::{
    AnyKeyName, CanonicalJsonObject, CanonicalJsonValue, OwnedSigningKeyId, SigningKeyAlgorithm,
    SigningKeyId,
    room_version_rules::{RedactionRules, RoomVersionRules},
    signatures::{JsonError, KeyPair, Signature, hash_and_sign_event},
};

use crate::{
    error::{Error, Result},
    service::globals::Globals,
};

/// Length in bytes of an ed25519 signature.
const SIGNATURE_BYTES: usize = 64;

/// The server's signature of an event: in place already, or owed, with the bytes it
/// must cover.
pub enum Signing {
    Done,
    Owed(Vec<u8>),
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

/// Add the content hash and this server's signature to a new event. With `later`,
/// `object` holds a placeholder of the signature's length and the signature is owed:
/// [`sign_all`] computes it and [`finish`] puts it in.
pub fn hash_and_sign(
    globals: &Globals,
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
    hash_and_sign_event(globals.server_name().as_str(), &capture, object, redaction)
        .map_err(|e| json_error("sign", e))?;
    let message = capture.message.into_inner();
    if later {
        return Ok(Signing::Owed(message));
    }
    let signature = globals.keypair.sign(&message);
    finish(globals, object, &signature)?;
    Ok(Signing::Done)
}

/// An event's reference hash, which its id is made of (signatures not covered).
pub fn reference_hash(object: &CanonicalJsonObject, rules: &RoomVersionRules) -> Result<String> {
    ruma::signatures::reference_hash(object, rules).map_err(|e| json_error("hash", e))
}

/// Oversized events are the client's doing; anything else is ours.
fn json_error(what: &str, e: JsonError) -> Error {
    match e {
        JsonError::PduTooLarge => Error::too_large("the event is larger than 65536 bytes"),
        other => Error::internal(format!("cannot {what} event: {other}")),
    }
}

/// From this many messages a blocking thread signs the later half while the caller
/// signs the rest. A signature takes about 15 µs here, and handing work to another
/// thread and being woken when it is done cost about as much as four: a new room's
/// seven events were signed in 105 µs with a helper and without one.
const SIGN_ON_TWO_THREADS: usize = 12;

/// The owed signatures of `messages`, each with its key; many are signed on two
/// threads.
pub async fn sign_all<K: Send + 'static>(
    globals: &Arc<Globals>,
    mut messages: Vec<(K, Vec<u8>)>,
) -> Result<Vec<(K, Signature)>> {
    let sign = |globals: &Globals, messages: Vec<(K, Vec<u8>)>| {
        messages
            .into_iter()
            .map(|(k, m)| (k, globals.keypair.sign(&m)))
            .collect::<Vec<_>>()
    };
    let runtime = tokio::runtime::Handle::try_current();
    let (Ok(runtime), true) = (runtime, messages.len() >= SIGN_ON_TWO_THREADS) else {
        return Ok(sign(globals, messages));
    };
    // The helper starts a little later: it takes the smaller half.
    let theirs = messages.split_off(messages.len().div_ceil(2));
    let helper = {
        let globals = globals.clone();
        runtime.spawn_blocking(move || sign(&globals, theirs))
    };
    let mut out = sign(globals, messages);
    out.extend(
        helper
            .await
            .map_err(|e| Error::internal(format!("signing task failed: {e}")))?,
    );
    Ok(out)
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn owed_signatures_are_the_ones_computed_at_once() {
        let (_dir, globals) = globals();
        let rules = RoomVersionId::V11.rules().unwrap();
        let mut now = Vec::new();
        let mut later = Vec::new();
        let mut messages = Vec::new();
        // Enough to be shared with a helper thread.
        let count = SIGN_ON_TWO_THREADS as u32 + 1;
        for n in 0..count {
            let mut object = event(globals.server_name().as_str());
            object.insert("depth".into(), CanonicalJsonValue::Integer(n.into()));
            let mut signed = object.clone();
            assert!(matches!(
                hash_and_sign(&globals, &rules.redaction, &mut signed, false).unwrap(),
                Signing::Done
            ));
            let Signing::Owed(message) =
                hash_and_sign(&globals, &rules.redaction, &mut object, true).unwrap()
            else {
                panic!("asked to sign later");
            };
            // The placeholder has the real signature's length: the size check before
            // the commit sees the final size.
            assert_eq!(
                serde_json::to_vec(&object).unwrap().len(),
                serde_json::to_vec(&signed).unwrap().len()
            );
            assert_ne!(object, signed);
            messages.push((n, message));
            now.push(signed);
            later.push(object);
        }
        let signatures = sign_all(&globals, messages).await.unwrap();
        assert_eq!(
            signatures.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            (0..count).collect::<Vec<_>>(),
            "every owed signature comes back once, in order"
        );
        for (n, signature) in signatures {
            let object = &mut later[n as usize];
            finish(&globals, object, &signature).unwrap();
            assert_eq!(*object, now[n as usize]);
            verify(&globals, object, &rules);
        }
    }

    #[test]
    fn without_a_runtime_owed_signatures_are_signed_in_place() {
        let (_dir, globals) = globals();
        let rules = RoomVersionId::V12.rules().unwrap();
        let mut object = event(globals.server_name().as_str());
        let Signing::Owed(message) =
            hash_and_sign(&globals, &rules.redaction, &mut object, true).unwrap()
        else {
            panic!("asked to sign later");
        };
        let signatures = futures::executor::block_on(sign_all(
            &globals,
            vec![((), message.clone()), ((), message)],
        ))
        .unwrap();
        assert_eq!(signatures.len(), 2);
        finish(&globals, &mut object, &signatures[0].1).unwrap();
        verify(&globals, &object, &rules);
    }
}
