//! Hashing and signing the events this server creates.
//!
//! An event's id (its reference hash), its content hash and the size limit do not
//! depend on its signature, and the authorization rules never read it. So the bytes
//! to sign are taken first, with a placeholder of the signature's exact length in the
//! event, and the ed25519 signature itself — most of an event's build time — may wait
//! for the commit: a draft of many events (a new room's) has them signed on an
//! idle-priority thread while it writes them and syncs the log (see
//! [`sign_in_background`]).

use std::{
    cell::RefCell,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicUsize, Ordering},
        mpsc::SyncSender,
    },
};

use parking_lot::Mutex;

use ruma::{
    AnyKeyName, CanonicalJsonObject, CanonicalJsonValue, OwnedSigningKeyId, SigningKeyAlgorithm,
    SigningKeyId,
    room_version_rules::{RedactionRules, RoomVersionRules},
    signatures::{JsonError, KeyPair, Signature, hash_and_sign_event, sign_event},
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
/// [`sign_in_background`] computes it and [`finish`] puts it in.
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

/// Owed signatures being computed by the idle signer thread; whoever waits for them
/// signs those it has not finished itself.
pub struct Signer<K> {
    keys: Vec<K>,
    job: Arc<SignJob>,
}

/// Messages to sign, taken in order by the signer thread.
struct SignJob {
    globals: Arc<Globals>,
    messages: Vec<Vec<u8>>,
    /// The next message the signer thread has not taken.
    next: AtomicUsize,
    signed: Mutex<Vec<Option<Signature>>>,
}

impl SignJob {
    /// Sign messages until none is left to take.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(message) = self.messages.get(i) else {
                return;
            };
            let signature = self.globals.keypair.sign(message);
            self.signed.lock()[i] = Some(signature);
        }
    }
}

/// The threads that sign owed signatures: one for each CPU, held to it, started when
/// first wanted.
/// They run at idle priority (`SCHED_IDLE`): on a CPU nobody else wants, or on the
/// committing thread's own while that one waits for the log sync, but never in its
/// way. Woken right away, a thread of normal priority on these virtual machines (which
/// keep a lightly loaded machine's threads on one CPU) took the committing thread's CPU
/// from it and delayed the commit by about as much as the signatures it saved. A
/// commit hands its job to the signer of the CPU it runs on: waking a thread on the
/// same CPU is a local enqueue, where one elsewhere costs an interrupt to that CPU
/// (and, on a virtual machine, an exit to the hypervisor).
fn signer_thread() -> Option<&'static SyncSender<Arc<SignJob>>> {
    /// CPUs beyond this share the last signer.
    const MAX_SIGNERS: usize = 64;
    static SIGNERS: [OnceLock<Option<SyncSender<Arc<SignJob>>>>; MAX_SIGNERS] =
        [const { OnceLock::new() }; MAX_SIGNERS];
    let cpu = crate::runtime::current_cpu();
    let slot = cpu.map_or(0, |c| c.min(MAX_SIGNERS - 1));
    SIGNERS[slot]
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Arc<SignJob>>(SIGNER_QUEUE);
            std::thread::Builder::new()
                .name("salon-signer".into())
                .spawn(move || {
                    let param = libc::sched_param { sched_priority: 0 };
                    // SAFETY: changes the calling thread's own policy; `param` is valid.
                    let idle = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
                    if idle != 0 {
                        tracing::debug!("a signer thread runs at normal priority");
                    }
                    if let Some(cpu) = cpu.filter(|&c| c < MAX_SIGNERS - 1)
                        && crate::runtime::set_affinity(0, &[cpu]).is_err()
                    {
                        tracing::debug!("a signer thread runs on every CPU");
                    }
                    for job in rx {
                        job.work();
                    }
                })
                .ok()
                .map(|_| tx)
        })
        .as_ref()
}

/// Jobs that may wait for the signer thread. One that finds the queue full (the
/// machine busy long enough for an idle thread to get no CPU) is left to its caller.
const SIGNER_QUEUE: usize = 64;

/// Start computing the owed signatures of `messages`, each with its key, on the idle
/// signer thread: [`Signer::wait`] collects them, signing any not finished itself.
pub fn sign_in_background<K>(globals: &Arc<Globals>, messages: Vec<(K, Vec<u8>)>) -> Signer<K> {
    let (keys, messages): (Vec<K>, Vec<Vec<u8>>) = messages.into_iter().unzip();
    let job = Arc::new(SignJob {
        globals: globals.clone(),
        next: AtomicUsize::new(0),
        signed: Mutex::new(vec![None; messages.len()]),
        messages,
    });
    if let Some(signer) = signer_thread() {
        // A full queue or a signer that is gone leaves the work to the waiting caller.
        let _ = signer.try_send(job.clone());
    }
    Signer { keys, job }
}

impl<K> Signer<K> {
    /// The signatures, in the order of the messages. What the signer thread has not
    /// finished is signed here rather than waited for: on a busy machine a thread of
    /// idle priority may wait long for a CPU.
    pub fn wait(self) -> Vec<(K, Signature)> {
        let job = &self.job;
        job.next.fetch_max(job.messages.len(), Ordering::Relaxed);
        let signed = job.signed.lock().clone();
        self.keys
            .into_iter()
            .zip(job.messages.iter().zip(signed))
            .map(|(k, (message, signature))| {
                (
                    k,
                    signature.unwrap_or_else(|| job.globals.keypair.sign(message)),
                )
            })
            .collect()
    }
}

/// Sign a stored event again, as it is (its hashes are not recomputed: a redacted
/// event's content hash is the one of its original content): the signature
/// [`hash_and_sign`] gave or owed it, since ed25519 signatures are deterministic.
pub fn sign_stored(
    globals: &Globals,
    redaction: &RedactionRules,
    object: &mut CanonicalJsonObject,
) -> Result<()> {
    sign_event(
        globals.server_name().as_str(),
        &globals.keypair,
        object,
        redaction,
    )
    .map_err(|e| json_error("sign", e))
}

/// Put the server's signature in place of the placeholder in `json`, the canonical
/// JSON of `object` as [`hash_and_sign`] left it: the bytes [`finish`] and serialising
/// again would give, for less. The placeholder is looked for from the end: in
/// canonical JSON only `state_key`, `type` and `unsigned` follow `signatures`, and only
/// `unsigned` could hold the same pattern, so an event with `unsigned` is left as it
/// is (`false`: the caller serialises it again).
pub fn finish_json(
    globals: &Globals,
    object: &CanonicalJsonObject,
    json: &mut [u8],
    signature: &Signature,
) -> bool {
    use base64::Engine;
    if object.contains_key("unsigned") {
        return false;
    }
    let placeholder =
        base64::engine::general_purpose::STANDARD_NO_PAD.encode([0u8; SIGNATURE_BYTES]);
    let real = signature.base64();
    if real.len() != placeholder.len() {
        return false;
    }
    let pattern = format!(
        "\"{}\":{{\"{}\":\"{placeholder}\"",
        globals.server_name(),
        signature.id()
    );
    let pattern = pattern.as_bytes();
    let Some(at) = (0..json.len().saturating_sub(pattern.len() - 1))
        .rev()
        .find(|&i| json[i] == b'"' && json[i..].starts_with(pattern))
    else {
        return false;
    };
    let start = at + pattern.len() - placeholder.len() - 1;
    json[start..start + real.len()].copy_from_slice(real.as_bytes());
    true
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

    #[test]
    fn owed_signatures_are_the_ones_computed_at_once() {
        let (_dir, globals) = globals();
        let rules = RoomVersionId::V11.rules().unwrap();
        let mut now = Vec::new();
        let mut later = Vec::new();
        let mut messages = Vec::new();
        // Enough for the signer thread to leave some to the waiting caller.
        let count = 40u32;
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
        let signatures = sign_in_background(&globals, messages).wait();
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

    /// The signature put into the serialised event is the one serialising the finished
    /// event gives, also when the content holds the very pattern it looks for.
    #[test]
    fn a_signature_goes_into_the_serialised_event_in_place() {
        let (_dir, globals) = globals();
        let rules = RoomVersionId::V12.rules().unwrap();
        let mut tricky = event(globals.server_name().as_str());
        let placeholder = "A".repeat(86);
        let key_id = format!("ed25519:{}", globals.keypair.version());
        tricky.insert(
            "content".into(),
            serde_json::from_value(json!({
                globals.server_name().as_str(): { key_id.clone(): placeholder },
                "body": "hello",
            }))
            .unwrap(),
        );
        for template in [event(globals.server_name().as_str()), tricky] {
            let mut signed = template.clone();
            hash_and_sign(&globals, &rules.redaction, &mut signed, false).unwrap();
            let mut owed = template.clone();
            let Signing::Owed(message) =
                hash_and_sign(&globals, &rules.redaction, &mut owed, true).unwrap()
            else {
                panic!("asked to sign later");
            };
            let mut json = serde_json::to_vec(&owed).unwrap();
            let signature = globals.keypair.sign(&message);
            assert!(finish_json(&globals, &owed, &mut json, &signature));
            assert_eq!(json, serde_json::to_vec(&signed).unwrap());

            // With `unsigned`, the caller serialises the finished event again.
            owed.insert(
                "unsigned".into(),
                CanonicalJsonValue::Object(Default::default()),
            );
            let mut json = serde_json::to_vec(&owed).unwrap();
            assert!(!finish_json(&globals, &owed, &mut json, &signature));
            assert_eq!(json, serde_json::to_vec(&owed).unwrap(), "left as it was");
        }
    }

    /// A stored event whose owed signature was lost is signed again to the same bytes,
    /// its hashes kept: also once redacted, when its content no longer matches them.
    #[test]
    fn a_stored_event_is_signed_again_to_the_same_signature() {
        let (_dir, globals) = globals();
        for version in [RoomVersionId::V11, RoomVersionId::V12] {
            let rules = version.rules().unwrap();
            let mut signed = event(globals.server_name().as_str());
            hash_and_sign(&globals, &rules.redaction, &mut signed, false).unwrap();
            let mut owed = event(globals.server_name().as_str());
            hash_and_sign(&globals, &rules.redaction, &mut owed, true).unwrap();
            assert_ne!(owed, signed, "the placeholder is not the signature");
            sign_stored(&globals, &rules.redaction, &mut owed).unwrap();
            assert_eq!(owed, signed);
            verify(&globals, &owed, &rules);

            let redact = |object: &CanonicalJsonObject| {
                ruma::canonical_json::redact(object.clone(), &rules.redaction, None).unwrap()
            };
            let mut redacted = redact(&owed);
            assert_ne!(redacted["content"], signed["content"]);
            sign_stored(&globals, &rules.redaction, &mut redacted).unwrap();
            assert_eq!(redacted, redact(&signed), "hashes and signature kept");
            verify(&globals, &redacted, &rules);
        }
    }
}
