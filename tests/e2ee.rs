//! End-to-end encryption support: device keys, one-time keys, to-device messages,
//! device-list changes in /sync, cross-signing and key backup. Keys are real ed25519
//! keys signed with ruma's signing code, so the server's checks run on real signatures.

mod common;

use std::time::Duration;

use common::{Client, TestServer, enc, errcode};
use reqwest::{Method, StatusCode};
use ruma::{
    CanonicalJsonObject,
    serde::{Base64, base64::Standard},
    signatures::{Ed25519KeyPair, sign_json},
};
use serde_json::{Value, json};

struct Key {
    pair: Ed25519KeyPair,
    public: String,
}

impl Key {
    /// A fresh key whose key id is `ed25519:<name>`, or `ed25519:<public key>` when
    /// `name` is `None` (as cross-signing keys are named).
    fn new(name: Option<&str>) -> Self {
        let der = Ed25519KeyPair::generate();
        let probe = Ed25519KeyPair::from_der(&der, "x".into()).unwrap();
        let public = Base64::<Standard>::new(probe.public_key().to_vec()).encode();
        let version = name.map(str::to_owned).unwrap_or_else(|| public.clone());
        Self {
            pair: Ed25519KeyPair::from_der(&der, version).unwrap(),
            public,
        }
    }

    fn sign(&self, signer: &str, value: Value) -> Value {
        let mut object: CanonicalJsonObject = serde_json::from_value(value).unwrap();
        sign_json(signer, &self.pair, &mut object).unwrap();
        serde_json::to_value(object).unwrap()
    }
}

fn device_keys(c: &Client, key: &Key) -> Value {
    key.sign(
        &c.user_id,
        json!({
            "user_id": c.user_id,
            "device_id": c.device_id,
            "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
            "keys": {
                format!("curve25519:{}", c.device_id): "Y3VydmUyNTUxOWtleWN1cnZlMjU1MTlrZXljdXJ2ZQ",
                format!("ed25519:{}", c.device_id): key.public,
            },
        }),
    )
}

fn signed_otk(c: &Client, key: &Key, n: u32) -> Value {
    let public = Base64::<Standard>::new(vec![n as u8; 32]).encode();
    key.sign(&c.user_id, json!({ "key": public }))
}

/// Signed one-time keys `signed_curve25519:AAAA<n>` for each `n` of `range`.
fn signed_otks(c: &Client, key: &Key, range: std::ops::Range<u32>) -> Value {
    range
        .map(|n| (format!("signed_curve25519:AAAA{n}"), signed_otk(c, key, n)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

async fn upload(c: &Client, body: Value) -> (StatusCode, Value) {
    c.post("/_matrix/client/v3/keys/upload", body).await
}

async fn sync(c: &Client, since: Option<&str>, timeout_ms: u64) -> Value {
    let path = match since {
        Some(s) => format!(
            "/_matrix/client/v3/sync?since={}&timeout={timeout_ms}",
            enc(s)
        ),
        None => "/_matrix/client/v3/sync".to_owned(),
    };
    c.ok(Method::GET, &path, None).await
}

async fn login_again(server: &TestServer, c: &Client) -> Client {
    let mut other = server.client();
    let v = other
        .ok(
            Method::POST,
            "/_matrix/client/v3/login",
            Some(json!({
                "type": "m.login.password",
                "identifier": { "type": "m.id.user", "user": c.user_id },
                "password": "correct horse battery",
                "initial_device_display_name": "second phone",
            })),
        )
        .await;
    other.token = Some(v["access_token"].as_str().unwrap().to_owned());
    other.user_id = c.user_id.clone();
    other.device_id = v["device_id"].as_str().unwrap().to_owned();
    other
}

#[tokio::test]
async fn device_and_one_time_keys_upload_query_claim() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let key = Key::new(Some(&alice.device_id));

    let otks = signed_otks(&alice, &key, 0..3);
    let (status, v) = upload(
        &alice,
        json!({
            "device_keys": device_keys(&alice, &key),
            "one_time_keys": otks,
            "fallback_keys": { "signed_curve25519:FB1": key.sign(&alice.user_id, json!({"key": "ZmFsbGJhY2s", "fallback": true})) },
        }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["one_time_key_counts"]["signed_curve25519"], 3);

    // The counts and the unused fallback key show up in /sync.
    let s = sync(&alice, None, 0).await;
    assert_eq!(s["device_one_time_keys_count"]["signed_curve25519"], 3);
    assert_eq!(
        s["device_unused_fallback_key_types"],
        json!(["signed_curve25519"])
    );

    // Bob sees alice's device with its keys, her signature and its display name.
    alice
        .ok(
            Method::PUT,
            &format!("/_matrix/client/v3/devices/{}", alice.device_id),
            Some(json!({ "display_name": "laptop" })),
        )
        .await;
    let q = bob
        .ok(
            Method::POST,
            "/_matrix/client/v3/keys/query",
            Some(json!({ "device_keys": { alice.user_id.clone(): [] } })),
        )
        .await;
    let dk = &q["device_keys"][&alice.user_id][&alice.device_id];
    assert_eq!(
        dk["keys"][format!("ed25519:{}", alice.device_id)],
        key.public
    );
    assert!(dk["signatures"][&alice.user_id][format!("ed25519:{}", alice.device_id)].is_string());
    assert_eq!(dk["unsigned"]["device_display_name"], "laptop", "{dk}");

    // Claims hand out each one-time key once, oldest first, then the fallback key.
    let mut claimed = Vec::new();
    for _ in 0..4 {
        let c = bob
            .ok(
                Method::POST,
                "/_matrix/client/v3/keys/claim",
                Some(json!({ "one_time_keys": { alice.user_id.clone(): { alice.device_id.clone(): "signed_curve25519" } } })),
            )
            .await;
        let keys = c["one_time_keys"][&alice.user_id][&alice.device_id]
            .as_object()
            .unwrap()
            .clone();
        assert_eq!(keys.len(), 1, "{c}");
        claimed.push(keys.keys().next().unwrap().clone());
    }
    assert_eq!(
        claimed,
        vec![
            "signed_curve25519:AAAA0",
            "signed_curve25519:AAAA1",
            "signed_curve25519:AAAA2",
            "signed_curve25519:FB1"
        ]
    );
    let s = sync(&alice, None, 0).await;
    assert_eq!(s["device_one_time_keys_count"]["signed_curve25519"], 0);
    assert_eq!(s["device_unused_fallback_key_types"], json!([]));

    // Keys uploaded after a sync counted them show in the next one (the counts are
    // kept between syncs and must follow every change).
    let otks = signed_otks(&alice, &key, 10..12);
    let (status, v) = upload(
        &alice,
        json!({
            "one_time_keys": otks,
            "fallback_keys": { "signed_curve25519:FB2": key.sign(&alice.user_id, json!({"key": "YW5vdGhlcg", "fallback": true})) },
        }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let s = sync(&alice, None, 0).await;
    assert_eq!(s["device_one_time_keys_count"]["signed_curve25519"], 2);
    assert_eq!(
        s["device_unused_fallback_key_types"],
        json!(["signed_curve25519"])
    );
    server.stop().await;
}

#[tokio::test]
async fn forged_and_malformed_keys_are_refused() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let key = Key::new(Some(&alice.device_id));

    // Signed by another key than the one it names.
    let impostor = Key::new(Some(&alice.device_id));
    let mut forged = device_keys(&alice, &impostor);
    forged["keys"][format!("ed25519:{}", alice.device_id)] = json!(key.public);
    let (status, v) = upload(&alice, json!({ "device_keys": forged })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(errcode(&v), "M_INVALID_PARAM");

    // Content changed after signing.
    let mut tampered = device_keys(&alice, &key);
    tampered["algorithms"] = json!(["m.olm.v1.curve25519-aes-sha2"]);
    let (status, v) = upload(&alice, json!({ "device_keys": tampered })).await;
    assert_eq!(
        (status, errcode(&v)),
        (StatusCode::BAD_REQUEST, "M_INVALID_PARAM")
    );

    // Keys for someone else's device.
    let bobs = Key::new(Some(&bob.device_id));
    let (status, v) = upload(&alice, json!({ "device_keys": device_keys(&bob, &bobs) })).await;
    assert_eq!(
        (status, errcode(&v)),
        (StatusCode::BAD_REQUEST, "M_INVALID_PARAM")
    );

    // Not a device key object at all.
    let (status, v) = upload(&alice, json!({ "device_keys": { "user_id": 5 } })).await;
    assert_eq!(
        (status, errcode(&v)),
        (StatusCode::BAD_REQUEST, "M_BAD_JSON"),
        "{v}"
    );

    // A one-time key signed by another key is refused once the device key is known.
    let (status, _) = upload(&alice, json!({ "device_keys": device_keys(&alice, &key) })).await;
    assert_eq!(status, StatusCode::OK);
    let (status, v) = upload(
        &alice,
        json!({ "one_time_keys": { "signed_curve25519:X": signed_otk(&alice, &impostor, 1) } }),
    )
    .await;
    assert_eq!(
        (status, errcode(&v)),
        (StatusCode::BAD_REQUEST, "M_INVALID_PARAM")
    );
    // The same key id with other content is refused too.
    upload(
        &alice,
        json!({ "one_time_keys": { "signed_curve25519:Y": signed_otk(&alice, &key, 1) } }),
    )
    .await;
    let (status, v) = upload(
        &alice,
        json!({ "one_time_keys": { "signed_curve25519:Y": signed_otk(&alice, &key, 2) } }),
    )
    .await;
    assert_eq!(
        (status, errcode(&v)),
        (StatusCode::BAD_REQUEST, "M_INVALID_PARAM")
    );
    // The stored keys are untouched by the refusals.
    let q = bob
        .ok(
            Method::POST,
            "/_matrix/client/v3/keys/query",
            Some(json!({ "device_keys": { alice.user_id.clone(): [alice.device_id.clone()] } })),
        )
        .await;
    assert_eq!(
        q["device_keys"][&alice.user_id][&alice.device_id]["keys"]
            [format!("ed25519:{}", alice.device_id)],
        key.public
    );
    server.stop().await;
}

#[tokio::test]
async fn to_device_messages_arrive_once_in_order_and_survive_a_lost_response() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let bob2 = login_again(&server, &bob).await;
    let first = sync(&bob, None, 0).await;
    let since = first["next_batch"].as_str().unwrap().to_owned();
    assert_eq!(first["to_device"]["events"], json!([]));

    // A long-poll wakes for a to-device message.
    let waiter = {
        let bob = bob.clone();
        let since = since.clone();
        tokio::spawn(async move { sync(&bob, Some(&since), 10_000).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let send = |txn: &str, body: Value| {
        let alice = alice.clone();
        let path = format!("/_matrix/client/v3/sendToDevice/m.test/{txn}");
        async move { alice.ok(Method::PUT, &path, Some(body)).await }
    };
    send(
        "t1",
        json!({ "messages": { bob.user_id.clone(): { bob.device_id.clone(): { "n": 1 } } } }),
    )
    .await;
    let woke = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("long-poll woke")
        .unwrap();
    assert_eq!(
        woke["to_device"]["events"],
        json!([{ "sender": alice.user_id, "type": "m.test", "content": { "n": 1 } }])
    );

    // The same transaction again does nothing; unknown devices and users are dropped.
    send(
        "t1",
        json!({ "messages": { bob.user_id.clone(): { bob.device_id.clone(): { "n": 1 } } } }),
    )
    .await;
    send(
        "t2",
        json!({ "messages": {
            bob.user_id.clone(): { "*": { "n": 2 }, "NOSUCHDEVICE": { "n": 99 } },
            "@nobody:localhost": { "*": { "n": 98 } },
        } }),
    )
    .await;
    send(
        "t3",
        json!({ "messages": { bob.user_id.clone(): { bob.device_id.clone(): { "n": 3 } } } }),
    )
    .await;

    // Bob's next sync (acknowledging the first) has 2 and 3, in order.
    let token = woke["next_batch"].as_str().unwrap().to_owned();
    let next = sync(&bob, Some(&token), 0).await;
    let ns: Vec<i64> = next["to_device"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["content"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(ns, vec![2, 3]);
    // The response was "lost": syncing again from the same token delivers them again.
    let again = sync(&bob, Some(&token), 0).await;
    assert_eq!(again["to_device"]["events"], next["to_device"]["events"]);
    // Acknowledged by the next token: never again.
    let after = sync(&bob, Some(again["next_batch"].as_str().unwrap()), 0).await;
    assert_eq!(after["to_device"]["events"], json!([]));

    // The second device got only the message sent to all devices.
    let other = sync(&bob2, None, 0).await;
    let ns: Vec<i64> = other["to_device"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["content"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(ns, vec![2]);

    // A message that is not an object is refused.
    let (status, v) = alice
        .put(
            "/_matrix/client/v3/sendToDevice/m.test/t4",
            json!({ "messages": { bob.user_id.clone(): { "*": [1, 2] } } }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    server.stop().await;
}

#[tokio::test]
async fn more_to_device_messages_than_one_response_holds_all_arrive() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    for i in 0..130 {
        alice
            .ok(
                Method::PUT,
                &format!("/_matrix/client/v3/sendToDevice/m.test/b{i}"),
                Some(json!({ "messages": { bob.user_id.clone(): { bob.device_id.clone(): { "i": i } } } })),
            )
            .await;
    }
    let mut seen = Vec::new();
    let mut since: Option<String> = None;
    for _ in 0..4 {
        let s = sync(&bob, since.as_deref(), 0).await;
        for e in s["to_device"]["events"].as_array().unwrap() {
            seen.push(e["content"]["i"].as_i64().unwrap());
        }
        since = Some(s["next_batch"].as_str().unwrap().to_owned());
    }
    assert_eq!(seen, (0..130).collect::<Vec<i64>>());
    server.stop().await;
}

#[tokio::test]
async fn device_list_changes_follow_shared_rooms() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let carol = server.user("carol").await;
    let room = alice.create_room(json!({ "preset": "public_chat" })).await;
    let start = sync(&alice, None, 0).await["next_batch"]
        .as_str()
        .unwrap()
        .to_owned();

    // Bob joins: alice must start tracking him.
    bob.join(&room).await;
    let s = sync(&alice, Some(&start), 0).await;
    assert_eq!(s["device_lists"]["changed"], json!([bob.user_id]));
    let t1 = s["next_batch"].as_str().unwrap().to_owned();

    // Bob logs in on a new device, which uploads keys: alice's long-poll wakes with it.
    let waiter = {
        let alice = alice.clone();
        let t1 = t1.clone();
        tokio::spawn(async move { sync(&alice, Some(&t1), 10_000).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let bob2 = login_again(&server, &bob).await;
    let k = Key::new(Some(&bob2.device_id));
    let (status, _) = upload(&bob2, json!({ "device_keys": device_keys(&bob2, &k) })).await;
    assert_eq!(status, StatusCode::OK);
    let woke = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("woke")
        .unwrap();
    assert_eq!(woke["device_lists"]["changed"], json!([bob.user_id]));
    // Carol shares no room with bob: nothing for her.
    let cs = sync(&carol, None, 0).await["next_batch"]
        .as_str()
        .unwrap()
        .to_owned();
    let k2 = Key::new(Some(&bob.device_id));
    upload(&bob, json!({ "device_keys": device_keys(&bob, &k2) })).await;
    let c = sync(&carol, Some(&cs), 0).await;
    assert_eq!(c["device_lists"]["changed"], json!([]));

    // /keys/changes answers the same question for a token range.
    let t2 = woke["next_batch"].as_str().unwrap().to_owned();
    let ch = alice
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/keys/changes?from={}&to={}",
                enc(&t1),
                enc(&t2)
            ),
            None,
        )
        .await;
    assert_eq!(ch["changed"], json!([bob.user_id]));

    // Deleting a device is a change too; leaving the last shared room puts bob in `left`.
    let t3 = sync(&alice, Some(&t2), 0).await["next_batch"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, _) = bob2.post("/_matrix/client/v3/logout", json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let s = sync(&alice, Some(&t3), 0).await;
    assert_eq!(s["device_lists"]["changed"], json!([bob.user_id]));
    let t4 = s["next_batch"].as_str().unwrap().to_owned();
    bob.post(
        &format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)),
        json!({}),
    )
    .await;
    let s = sync(&alice, Some(&t4), 0).await;
    assert_eq!(s["device_lists"]["left"], json!([bob.user_id]));
    assert_eq!(s["device_lists"]["changed"], json!([]));
    server.stop().await;
}

fn cross_signing_key(user: &str, usage: &str, key: &Key, master: Option<&Key>) -> Value {
    let object = json!({
        "user_id": user,
        "usage": [usage],
        "keys": { format!("ed25519:{}", key.public): key.public },
    });
    match master {
        Some(m) => m.sign(user, object),
        None => object,
    }
}

#[tokio::test]
async fn cross_signing_and_signatures() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let carol = server.user("carol").await;
    let device = Key::new(Some(&alice.device_id));
    upload(
        &alice,
        json!({ "device_keys": device_keys(&alice, &device) }),
    )
    .await;

    let master = Key::new(None);
    let ssk = Key::new(None);
    let usk = Key::new(None);
    // A self-signing key not signed by the master key is refused.
    let (status, v) = alice
        .post(
            "/_matrix/client/v3/keys/device_signing/upload",
            json!({
                "master_key": cross_signing_key(&alice.user_id, "master", &master, None),
                "self_signing_key": cross_signing_key(&alice.user_id, "self_signing", &ssk, None),
            }),
        )
        .await;
    assert_eq!(
        (status, errcode(&v)),
        (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"),
        "{v}"
    );

    // The first upload needs no password.
    let keys = json!({
        "master_key": cross_signing_key(&alice.user_id, "master", &master, None),
        "self_signing_key": cross_signing_key(&alice.user_id, "self_signing", &ssk, Some(&master)),
        "user_signing_key": cross_signing_key(&alice.user_id, "user_signing", &usk, Some(&master)),
    });
    let (status, v) = alice
        .post(
            "/_matrix/client/v3/keys/device_signing/upload",
            keys.clone(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    // The same keys again: still no password; new keys: the password is asked for.
    let (status, _) = alice
        .post("/_matrix/client/v3/keys/device_signing/upload", keys)
        .await;
    assert_eq!(status, StatusCode::OK);
    let master2 = Key::new(None);
    let replace =
        json!({ "master_key": cross_signing_key(&alice.user_id, "master", &master2, None) });
    let (status, v) = alice
        .post(
            "/_matrix/client/v3/keys/device_signing/upload",
            replace.clone(),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{v}");
    assert!(v["flows"].is_array(), "{v}");

    // The self-signing key signs alice's device.
    let mut signed_device = device_keys(&alice, &device);
    signed_device = ssk.sign(&alice.user_id, signed_device);
    let v = alice
        .ok(
            Method::POST,
            "/_matrix/client/v3/keys/signatures/upload",
            Some(json!({ alice.user_id.clone(): { alice.device_id.clone(): signed_device } })),
        )
        .await;
    assert!(v.get("failures").is_none_or(|f| f == &json!({})), "{v}");

    // A signature by a key alice does not hold fails, and is reported, not stored.
    let stranger = Key::new(None);
    let bad = stranger.sign(&alice.user_id, device_keys(&alice, &device));
    let v = alice
        .ok(
            Method::POST,
            "/_matrix/client/v3/keys/signatures/upload",
            Some(json!({ alice.user_id.clone(): { alice.device_id.clone(): bad } })),
        )
        .await;
    assert!(
        v["failures"][&alice.user_id][&alice.device_id]["errcode"].is_string(),
        "{v}"
    );

    // Bob uploads cross-signing keys; alice's user-signing key signs his master key.
    let bob_master = Key::new(None);
    bob.ok(
        Method::POST,
        "/_matrix/client/v3/keys/device_signing/upload",
        Some(json!({ "master_key": cross_signing_key(&bob.user_id, "master", &bob_master, None) })),
    )
    .await;
    let signed_master = usk.sign(
        &alice.user_id,
        cross_signing_key(&bob.user_id, "master", &bob_master, None),
    );
    let v = alice
        .ok(
            Method::POST,
            "/_matrix/client/v3/keys/signatures/upload",
            Some(json!({ bob.user_id.clone(): { bob_master.public.clone(): signed_master } })),
        )
        .await;
    assert!(v.get("failures").is_none_or(|f| f == &json!({})), "{v}");

    let query = |c: &Client| {
        let c = c.clone();
        let users =
            json!({ "device_keys": { alice.user_id.clone(): [], bob.user_id.clone(): [] } });
        async move {
            c.ok(Method::POST, "/_matrix/client/v3/keys/query", Some(users))
                .await
        }
    };
    let by_alice = query(&alice).await;
    let by_carol = query(&carol).await;
    // Everyone sees alice's master and self-signing keys and the device's signature.
    for q in [&by_alice, &by_carol] {
        assert_eq!(
            q["master_keys"][&alice.user_id]["keys"][format!("ed25519:{}", master.public)],
            master.public
        );
        assert!(q["self_signing_keys"][&alice.user_id].is_object());
        assert!(
            q["device_keys"][&alice.user_id][&alice.device_id]["signatures"][&alice.user_id]
                [format!("ed25519:{}", ssk.public)]
            .is_string(),
            "{q}"
        );
    }
    // Only alice sees her user-signing key and her signature on bob's master key.
    assert!(by_alice["user_signing_keys"][&alice.user_id].is_object());
    assert!(by_carol["user_signing_keys"].get(&alice.user_id).is_none());
    let sig_path = |q: &Value| {
        q["master_keys"][&bob.user_id]["signatures"][&alice.user_id]
            [format!("ed25519:{}", usk.public)]
        .clone()
    };
    assert!(sig_path(&by_alice).is_string(), "{by_alice}");
    assert!(sig_path(&by_carol).is_null());
    server.stop().await;
}

#[tokio::test]
async fn key_backup_versions_and_keys() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let (status, v) = alice.get("/_matrix/client/v3/room_keys/version").await;
    assert_eq!(
        (status, errcode(&v)),
        (StatusCode::NOT_FOUND, "M_NOT_FOUND")
    );

    let algorithm = json!({
        "algorithm": "m.megolm_backup.v1.curve25519-aes-sha2",
        "auth_data": { "public_key": "cHVibGlja2V5", "signatures": {} },
    });
    let v1 = alice
        .ok(
            Method::POST,
            "/_matrix/client/v3/room_keys/version",
            Some(algorithm.clone()),
        )
        .await["version"]
        .as_str()
        .unwrap()
        .to_owned();
    let key = |index: u64, forwarded: u64, verified: bool, data: &str| {
        json!({
            "first_message_index": index,
            "forwarded_count": forwarded,
            "is_verified": verified,
            "session_data": { "ephemeral": "ZXBo", "ciphertext": data, "mac": "bWFj" },
        })
    };
    let room = "!room:localhost";
    let put = alice
        .ok(
            Method::PUT,
            &format!("/_matrix/client/v3/room_keys/keys?version={v1}"),
            Some(json!({ "rooms": { room: { "sessions": {
                "s1": key(5, 0, false, "first"),
                "s2": key(0, 0, true, "second"),
            } } } })),
        )
        .await;
    assert_eq!(put["count"], 2);
    let etag1 = put["etag"].as_str().unwrap().to_owned();

    // A worse copy (higher index) is ignored; a better one (lower index) replaces.
    let session_path = format!(
        "/_matrix/client/v3/room_keys/keys/{}/s1?version={v1}",
        enc(room)
    );
    let worse = alice
        .ok(Method::PUT, &session_path, Some(key(9, 0, false, "worse")))
        .await;
    assert_eq!(
        (worse["count"].as_u64(), worse["etag"].as_str()),
        (Some(2), Some(etag1.as_str()))
    );
    let better = alice
        .ok(Method::PUT, &session_path, Some(key(1, 0, false, "better")))
        .await;
    assert_ne!(better["etag"].as_str(), Some(etag1.as_str()));
    let got = alice.ok(Method::GET, &session_path, None).await;
    assert_eq!(got["session_data"]["ciphertext"], "better");
    let all = alice
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/room_keys/keys?version={v1}"),
            None,
        )
        .await;
    assert_eq!(all["rooms"][room]["sessions"].as_object().unwrap().len(), 2);

    let info = alice
        .ok(Method::GET, "/_matrix/client/v3/room_keys/version", None)
        .await;
    assert_eq!(info["version"], v1.as_str());
    assert_eq!(info["count"], 2);
    assert_eq!(info["algorithm"], algorithm["algorithm"]);
    assert_eq!(info["auth_data"], algorithm["auth_data"]);

    // A new version becomes current; writes to the old one are refused with its name.
    let v2 = alice
        .ok(
            Method::POST,
            "/_matrix/client/v3/room_keys/version",
            Some(algorithm.clone()),
        )
        .await["version"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, v) = alice.put(&session_path, key(0, 0, true, "late")).await;
    assert_eq!(
        (status, errcode(&v)),
        (StatusCode::FORBIDDEN, "M_WRONG_ROOM_KEYS_VERSION")
    );
    assert_eq!(v["current_version"], v2.as_str());
    // The algorithm of a version cannot change.
    let (status, _) = alice
        .put(
            &format!("/_matrix/client/v3/room_keys/version/{v2}"),
            json!({ "algorithm": "m.other", "auth_data": {} }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Deleting the current version makes the previous one current again.
    alice
        .ok(
            Method::DELETE,
            &format!("/_matrix/client/v3/room_keys/version/{v2}"),
            None,
        )
        .await;
    let info = alice
        .ok(Method::GET, "/_matrix/client/v3/room_keys/version", None)
        .await;
    assert_eq!(info["version"], v1.as_str());
    let del = alice.ok(Method::DELETE, &session_path, None).await;
    assert_eq!(del["count"], 1);
    let (status, _) = alice.get(&session_path).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    server.stop().await;
}

/// A device deleted and logged in again under the same id starts without keys, also
/// when a sync had counted the old ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_device_comes_back_without_its_keys() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let login = json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "alice" },
        "password": "correct horse battery", "device_id": "PHONE" });
    let mut phone = server.client();
    let body = phone
        .ok(
            Method::POST,
            "/_matrix/client/v3/login",
            Some(login.clone()),
        )
        .await;
    phone.token = Some(body["access_token"].as_str().unwrap().into());
    phone.user_id = alice.user_id.clone();
    phone.device_id = "PHONE".into();
    let (status, v) = upload(
        &phone,
        json!({ "one_time_keys": { "curve25519:AAAA0": "b25l", "curve25519:AAAA1": "dHdv" } }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let s = sync(&phone, None, 0).await;
    assert_eq!(s["device_one_time_keys_count"]["curve25519"], 2);

    let (status, body) = alice.delete("/_matrix/client/v3/devices/PHONE").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    alice
        .ok(Method::DELETE, "/_matrix/client/v3/devices/PHONE", Some(json!({ "auth": {
            "type": "m.login.password", "session": body["session"], "identifier": { "type": "m.id.user", "user": "alice" }, "password": "correct horse battery" } })))
        .await;
    phone.token = None;
    let body = phone
        .ok(Method::POST, "/_matrix/client/v3/login", Some(login))
        .await;
    phone.token = Some(body["access_token"].as_str().unwrap().into());
    let s = sync(&phone, None, 0).await;
    assert!(
        s["device_one_time_keys_count"]["curve25519"].is_null(),
        "{}",
        s["device_one_time_keys_count"]
    );
    assert_eq!(s["device_one_time_keys_count"]["signed_curve25519"], 0);
    server.stop().await;
}

/// Two first uploads of cross-signing keys at once, neither with a password: one is
/// stored, and the other, which would now replace keys, is asked for the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_cross_signing_uploads_at_once_do_not_replace_each_other() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let uploads = (0..2).map(|_| {
        let alice = alice.clone();
        let master = Key::new(None);
        let ssk = Key::new(None);
        let keys = json!({
            "master_key": cross_signing_key(&alice.user_id, "master", &master, None),
            "self_signing_key": cross_signing_key(&alice.user_id, "self_signing", &ssk, Some(&master)),
        });
        tokio::spawn(async move {
            let answer = alice
                .post("/_matrix/client/v3/keys/device_signing/upload", keys.clone())
                .await;
            (answer, keys)
        })
    });
    let mut stored = Vec::new();
    for upload in futures::future::join_all(uploads).await {
        let ((status, body), keys) = upload.unwrap();
        if status == StatusCode::OK {
            stored.push(keys);
        } else {
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
            assert!(body["flows"].is_array(), "{body}");
        }
    }
    assert_eq!(stored.len(), 1);
    let query = alice
        .ok(
            Method::POST,
            "/_matrix/client/v3/keys/query",
            Some(json!({ "device_keys": { alice.user_id.clone(): [] } })),
        )
        .await;
    assert_eq!(
        query["master_keys"][&alice.user_id]["keys"],
        stored[0]["master_key"]["keys"]
    );
}

/// A to-device transaction sent again while the first try is still under way (a
/// client retrying after a timeout) is delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_to_device_retry_during_the_first_try_is_delivered_once() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let since = sync(&bob, None, 0).await["next_batch"]
        .as_str()
        .unwrap()
        .to_owned();
    for round in 0..5 {
        let path = format!("/_matrix/client/v3/sendToDevice/m.test/retry{round}");
        let body = json!({ "messages": { bob.user_id.clone(): { bob.device_id.clone(): { "n": round } } } });
        let tries = (0..3).map(|_| {
            let (alice, path, body) = (alice.clone(), path.clone(), body.clone());
            tokio::spawn(async move { alice.ok(Method::PUT, &path, Some(body)).await })
        });
        for t in futures::future::join_all(tries).await {
            t.unwrap();
        }
    }
    let got = sync(&bob, Some(&since), 0).await;
    let rounds: Vec<Value> = got["to_device"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["content"]["n"].clone())
        .collect();
    assert_eq!(rounds, [0, 1, 2, 3, 4].map(|n| json!(n)));
}
