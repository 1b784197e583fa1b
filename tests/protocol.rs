//! Protocol-level guarantees: signed, hashed PDUs; errors for bad input.

mod common;

use std::collections::BTreeMap;

use common::{TestServer, enc, errcode};
use reqwest::{Method, StatusCode};
use ruma::{
    EventId, RoomVersionId,
    serde::Base64,
    signatures::{Verified, verify_event},
};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_is_a_signed_and_hashed_pdu() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let room = alice.create_room(json!({ "name": "Signed" })).await;
    let msg = alice.send_text(&room, "t", "hello").await;

    let keys = server
        .client()
        .ok(Method::GET, "/_matrix/key/v2/server", None)
        .await;
    assert_eq!(keys["server_name"], "localhost");
    let (key_id, key) = keys["verify_keys"]
        .as_object()
        .unwrap()
        .iter()
        .next()
        .map(|(k, v)| (k.clone(), v["key"].as_str().unwrap().to_owned()))
        .unwrap();
    assert!(key_id.starts_with("ed25519:"));
    assert!(
        keys["signatures"]["localhost"][&key_id].is_string(),
        "the key response is self-signed"
    );
    let state = alice
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/state", enc(&room)),
            None,
        )
        .await;
    let state_ids: Vec<String> = state
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect();

    let dir = server.dir.path().to_owned();
    let _dir = server.stop().await;
    let services = salon::services(common::test_config(&dir, &[])).unwrap();
    let mut public_keys = BTreeMap::new();
    public_keys.insert(key_id.clone(), Base64::parse(key).unwrap());
    let mut key_map = BTreeMap::new();
    key_map.insert("localhost".to_owned(), public_keys);
    let rules = RoomVersionId::V12.rules().unwrap();

    let mut ids = state_ids.clone();
    ids.push(msg.clone());
    for id in &ids {
        let event_id = EventId::parse(id).unwrap();
        let pdu = services
            .rooms
            .timeline
            .pdu_json(&event_id)
            .unwrap()
            .expect("stored PDU");
        assert_eq!(
            verify_event(&key_map, &pdu, &rules).unwrap(),
            Verified::All,
            "{id} verifies: signature and content hash"
        );
        let hash = ruma::signatures::reference_hash(&pdu, &rules).unwrap();
        assert_eq!(
            format!("${hash}"),
            *id,
            "the event id is the reference hash"
        );
        for field in [
            "auth_events",
            "prev_events",
            "depth",
            "hashes",
            "signatures",
            "origin_server_ts",
            "sender",
            "type",
            "content",
        ] {
            assert!(pdu.contains_key(field), "{id} has {field}");
        }
    }
    // The message's graph links: it follows the last state event and is authorised by
    // power levels and alice's membership (v12: not the create event, which is the room id).
    let pdu = services
        .rooms
        .timeline
        .pdu(&EventId::parse(&msg).unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(pdu.prev_events().len(), 1);
    assert!(state_ids.contains(&pdu.prev_events()[0].to_string()));
    assert_eq!(pdu.auth_events().len(), 2);
    let create = state
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "m.room.create")
        .unwrap();
    assert_eq!(
        room,
        format!("!{}", &create["event_id"].as_str().unwrap()[1..]),
        "v12 room ids are the create event's hash"
    );
    assert!(u64::from(pdu.depth) > 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_matrix_errors() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let room = alice.create_room(json!({})).await;
    let r = enc(&room);
    let raw = reqwest::Client::new();
    let url = |p: &str| format!("{}{}", server.base, p);
    let token = alice.token.clone().unwrap();

    let (status, body) = alice.get("/_matrix/client/v3/no/such/endpoint").await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::NOT_FOUND, "M_UNRECOGNIZED")
    );
    let (status, body) = alice
        .request(Method::PATCH, "/_matrix/client/v3/createRoom", None)
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::METHOD_NOT_ALLOWED, "M_UNRECOGNIZED")
    );

    let res = raw
        .post(url("/_matrix/client/v3/createRoom"))
        .bearer_auth(&token)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        res.json::<serde_json::Value>().await.unwrap()["errcode"],
        "M_NOT_JSON"
    );
    let (status, body) = alice
        .post(
            "/_matrix/client/v3/createRoom",
            json!({ "invite": "not a list" }),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_BAD_JSON")
    );
    let (status, body) = alice
        .put(
            &format!("/_matrix/client/v3/rooms/{r}/send/m.room.message/1"),
            json!([1, 2]),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_BAD_JSON"),
        "{body}"
    );
    let (status, body) = alice
        .put(
            &format!("/_matrix/client/v3/rooms/{r}/send/m.room.message/2"),
            json!({ "body": 1.5 }),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_BAD_JSON"),
        "floats are not canonical JSON: {body}"
    );
    let (status, body) = alice
        .get("/_matrix/client/v3/rooms/not-a-room-id/state")
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"),
        "{body}"
    );
    let (status, body) = alice
        .get(&format!(
            "/_matrix/client/v3/rooms/{}/state",
            enc("!unknown:localhost")
        ))
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::NOT_FOUND, "M_NOT_FOUND"),
        "{body}"
    );
    let (status, body) = alice
        .post(
            "/_matrix/client/v3/createRoom",
            json!({ "invite": ["@bad id"] }),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_BAD_JSON"),
        "{body}"
    );

    // An event over 65,536 bytes is refused; a request over the body limit too.
    let big = "x".repeat(70_000);
    let (status, body) = alice
        .put(
            &format!("/_matrix/client/v3/rooms/{r}/send/m.room.message/3"),
            json!({ "body": big }),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE"),
        "{body}"
    );
    let huge = "y".repeat(2 * 1024 * 1024);
    let (status, body) = alice
        .put(
            &format!("/_matrix/client/v3/rooms/{r}/send/m.room.message/4"),
            json!({ "body": huge }),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE"),
        "{body}"
    );

    // Outsiders get M_FORBIDDEN with a reason.
    let bob = server.user("bob").await;
    let (status, body) = bob
        .put(
            &format!("/_matrix/client/v3/rooms/{r}/send/m.room.message/5"),
            json!({ "body": "hi", "msgtype": "m.text" }),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::FORBIDDEN, "M_FORBIDDEN")
    );
    // The server is still healthy after all that.
    alice.send_text(&room, "6", "still here").await;
}

mod fuzz {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Arbitrary configuration text never panics the loader.
        #[test]
        fn config_loader_never_panics(text in ".{0,200}") {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("c.toml");
            std::fs::write(&path, &text).unwrap();
            let _ = salon::config::Config::load(Some(&path), Vec::<(String, String)>::new());
        }

        /// Arbitrary message content either becomes an event or a clean error.
        #[test]
        fn pagination_tokens_never_panic(token in ".{0,40}") {
            let _ = salon::service::rooms::read::parse_token(&token);
        }
    }
}
