//! Random and hostile input never panics the server or yields a 500: every refusal
//! is a Matrix error.

mod common;

use common::{TestServer, enc};
use proptest::{
    prelude::*,
    strategy::ValueTree,
    test_runner::{Config, TestRunner},
};
use reqwest::StatusCode;
use serde_json::{Value, json};

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,30}".prop_map(Value::String),
        Just(json!("@alice:localhost")),
        Just(json!("!room:localhost")),
        Just(json!("m.login.dummy")),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    ".{0,12}",
                    Just("type".to_owned()),
                    Just("auth".to_owned()),
                    Just("user_id".to_owned()),
                    Just("invite".to_owned()),
                    Just("membership".to_owned()),
                    Just("room_version".to_owned()),
                    Just("initial_state".to_owned()),
                    Just("identifier".to_owned()),
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bodies_and_ids_get_matrix_errors() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let room = alice.create_room(json!({ "preset": "public_chat" })).await;
    let r = enc(&room);
    let endpoints: Vec<(reqwest::Method, String)> = vec![
        (reqwest::Method::POST, "/_matrix/client/v3/register".into()),
        (reqwest::Method::POST, "/_matrix/client/v3/login".into()),
        (
            reqwest::Method::POST,
            "/_matrix/client/v3/createRoom".into(),
        ),
        (
            reqwest::Method::PUT,
            format!("/_matrix/client/v3/rooms/{r}/send/m.room.message/fuzz"),
        ),
        (
            reqwest::Method::PUT,
            format!(
                "/_matrix/client/v3/rooms/{r}/state/m.room.member/{}",
                enc("@alice:localhost")
            ),
        ),
        (
            reqwest::Method::PUT,
            format!("/_matrix/client/v3/rooms/{r}/state/m.room.power_levels/"),
        ),
        (
            reqwest::Method::PUT,
            format!("/_matrix/client/v3/rooms/{r}/state/m.room.join_rules/"),
        ),
        (
            reqwest::Method::POST,
            format!("/_matrix/client/v3/rooms/{r}/invite"),
        ),
        (
            reqwest::Method::POST,
            format!("/_matrix/client/v3/rooms/{r}/kick"),
        ),
        (
            reqwest::Method::POST,
            "/_matrix/client/v3/publicRooms".into(),
        ),
        (
            reqwest::Method::POST,
            "/_matrix/client/v3/user_directory/search".into(),
        ),
        (
            reqwest::Method::POST,
            format!("/_matrix/client/v3/user/{}/filter", enc(&alice.user_id)),
        ),
        (reqwest::Method::PUT, "/_matrix/client/v3/devices/X".into()),
        (reqwest::Method::POST, "/_synapse/admin/v1/register".into()),
        (
            reqwest::Method::POST,
            "/_matrix/client/v3/keys/upload".into(),
        ),
        (
            reqwest::Method::POST,
            "/_matrix/client/v3/keys/query".into(),
        ),
        (
            reqwest::Method::POST,
            "/_matrix/client/v3/keys/claim".into(),
        ),
        (
            reqwest::Method::POST,
            "/_matrix/client/v3/keys/device_signing/upload".into(),
        ),
        (
            reqwest::Method::POST,
            "/_matrix/client/v3/keys/signatures/upload".into(),
        ),
        (
            reqwest::Method::PUT,
            "/_matrix/client/v3/sendToDevice/m.test/fuzz".into(),
        ),
        (
            reqwest::Method::POST,
            "/_matrix/client/v3/room_keys/version".into(),
        ),
        (
            reqwest::Method::PUT,
            "/_matrix/client/v3/room_keys/keys?version=1".into(),
        ),
        (
            reqwest::Method::POST,
            "/_matrix/client/v3/pushers/set".into(),
        ),
        (reqwest::Method::POST, "/_matrix/media/v3/upload".into()),
    ];
    let mut runner = TestRunner::new(Config {
        cases: 600,
        ..Config::default()
    });
    let strategy = (0..endpoints.len(), arb_json());
    let mut txn = 0;
    for _ in 0..600 {
        let (i, body) = strategy.new_tree(&mut runner).expect("value").current();
        let (method, path) = &endpoints[i];
        let path = path.replace("/fuzz", &format!("/fuzz{txn}"));
        txn += 1;
        let (status, reply) = alice
            .request(method.clone(), &path, Some(body.clone()))
            .await;
        assert!(
            status != StatusCode::INTERNAL_SERVER_ERROR,
            "{method} {path} with {body} gave 500: {reply}"
        );
        if !status.is_success() && status != StatusCode::UNAUTHORIZED {
            assert!(
                reply["errcode"]
                    .as_str()
                    .is_some_and(|c| c.starts_with("M_")),
                "{method} {path} with {body}: {status} {reply}"
            );
        }
    }
    // Hostile identifiers in paths.
    for bad in [
        "%00",
        "..%2F..",
        "!",
        "%40",
        "@x",
        "%F0%28%8C%BC",
        &"a".repeat(5000),
    ] {
        let (status, reply) = alice
            .get(&format!("/_matrix/client/v3/rooms/{bad}/state"))
            .await;
        assert!(status.is_client_error(), "{bad}: {status} {reply}");
        let (status, _) = alice
            .get(&format!("/_matrix/client/v3/profile/{bad}"))
            .await;
        assert!(status.is_client_error(), "{bad}: {status}");
    }
    // And it still works (the fuzzing may well have made alice kick herself).
    let bob = server.user("bob").await;
    let room = bob.create_room(json!({})).await;
    bob.send_text(&room, "final", "alive").await;
}
