//! Application services: registrations, masquerading, exclusive namespaces, queries,
//! transactions that survive restarts, the kit and the bundled ping bot.

mod common;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode as S},
    routing::{get, post, put},
};
use common::{Client, TestServer, enc, errcode};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tempfile::TempDir;

const AS_TOKEN: &str = "as-token-for-the-test-appservice";
const HS_TOKEN: &str = "hs-token-for-the-test-appservice";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A registration directory holding one registration whose URL is `port`.
fn registration_dir(port: u16) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bridge.yaml"),
        format!(
            r##"id: testbridge
url: "http://127.0.0.1:{port}"
as_token: "{AS_TOKEN}"
hs_token: "{HS_TOKEN}"
sender_localpart: bridgebot
rate_limited: false
receive_ephemeral: true
protocols: ["testproto"]
namespaces:
  users:
    - exclusive: true
      regex: "@_test_.*:localhost"
  aliases:
    - exclusive: true
      regex: "#_test_.*:localhost"
  rooms: []
"##
        ),
    )
    .unwrap();
    dir
}

/// What the recording appservice saw.
#[derive(Default)]
struct Seen {
    /// `(txn_id, events)` in arrival order, retries included.
    transactions: Vec<(String, Vec<Value>)>,
    ephemeral: Vec<Value>,
    user_queries: Vec<String>,
    pings: usize,
    bad_tokens: usize,
}

#[derive(Clone)]
struct Recorder {
    seen: Arc<Mutex<Seen>>,
    /// Answer this many transactions with 500 first.
    fail: Arc<Mutex<usize>>,
    homeserver: Arc<Mutex<String>>,
}

fn token_ok(headers: &HeaderMap, seen: &Mutex<Seen>) -> bool {
    let ok = headers.get("authorization").and_then(|h| h.to_str().ok())
        == Some(&format!("Bearer {HS_TOKEN}"));
    if !ok {
        seen.lock().unwrap().bad_tokens += 1;
    }
    ok
}

async fn start_recorder(port: u16, recorder: Recorder) -> tokio::task::JoinHandle<()> {
    let app = Router::new()
        .route(
            "/_matrix/app/v1/transactions/{txn}",
            put(
                |State(r): State<Recorder>, Path(txn): Path<String>, headers: HeaderMap, Json(body): Json<Value>| async move {
                    if !token_ok(&headers, &r.seen) {
                        return (S::FORBIDDEN, Json(json!({ "errcode": "M_FORBIDDEN" })));
                    }
                    let events = body["events"].as_array().cloned().unwrap_or_default();
                    let ephemeral = body["ephemeral"].as_array().cloned().unwrap_or_default();
                    let mut seen = r.seen.lock().unwrap();
                    seen.transactions.push((txn, events));
                    seen.ephemeral.extend(ephemeral);
                    drop(seen);
                    let mut fail = r.fail.lock().unwrap();
                    if *fail > 0 {
                        *fail -= 1;
                        return (S::INTERNAL_SERVER_ERROR, Json(json!({})));
                    }
                    (S::OK, Json(json!({})))
                },
            ),
        )
        .route(
            "/_matrix/app/v1/users/{user}",
            get(|State(r): State<Recorder>, Path(user): Path<String>, headers: HeaderMap| async move {
                if !token_ok(&headers, &r.seen) {
                    return (S::FORBIDDEN, Json(json!({})));
                }
                r.seen.lock().unwrap().user_queries.push(user);
                (S::NOT_FOUND, Json(json!({ "errcode": "M_NOT_FOUND" })))
            }),
        )
        .route(
            "/_matrix/app/v1/rooms/{alias}",
            get(|State(r): State<Recorder>, Path(alias): Path<String>, headers: HeaderMap| async move {
                if !token_ok(&headers, &r.seen) {
                    return (S::FORBIDDEN, Json(json!({})));
                }
                // Create the room the alias asks for, as the bridge bot, then say yes.
                let local = alias.trim_start_matches('#').split(':').next().unwrap_or_default().to_owned();
                let hs = r.homeserver.lock().unwrap().clone();
                let res = reqwest::Client::new()
                    .post(format!("{hs}/_matrix/client/v3/createRoom"))
                    .bearer_auth(AS_TOKEN)
                    .json(&json!({ "room_alias_name": local, "preset": "public_chat", "name": "portal" }))
                    .send()
                    .await;
                match res {
                    Ok(r) if r.status().is_success() => (S::OK, Json(json!({}))),
                    _ => (S::NOT_FOUND, Json(json!({}))),
                }
            }),
        )
        .route(
            "/_matrix/app/v1/ping",
            post(|State(r): State<Recorder>, headers: HeaderMap| async move {
                if !token_ok(&headers, &r.seen) {
                    return (S::FORBIDDEN, Json(json!({})));
                }
                r.seen.lock().unwrap().pings += 1;
                (S::OK, Json(json!({})))
            }),
        )
        .with_state(recorder);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    })
}

fn recorder() -> Recorder {
    Recorder {
        seen: Arc::default(),
        fail: Arc::default(),
        homeserver: Arc::default(),
    }
}

fn as_client(server: &TestServer) -> Client {
    let mut c = server.client();
    c.token = Some(AS_TOKEN.to_owned());
    c.user_id = "@bridgebot:localhost".to_owned();
    c
}

async fn start_with_registrations(dir: &TempDir) -> TestServer {
    let path = dir.path().display().to_string();
    TestServer::start_with(&[("SALON_APPSERVICES__REGISTRATION_DIR", &path)]).await
}

async fn wait_until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    for _ in 0..200 {
        if let Some(v) = f() {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

fn bodies_by(seen: &Seen, sender: &str) -> Vec<String> {
    seen.transactions
        .iter()
        .flat_map(|(_, events)| events.iter())
        .filter(|e| e["sender"] == sender && e["type"] == "m.room.message")
        .map(|e| e["content"]["body"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_appservice_registers_ghosts_masquerades_and_gets_transactions() {
    let port = free_port();
    let dir = registration_dir(port);
    let server = start_with_registrations(&dir).await;
    let rec = recorder();
    *rec.homeserver.lock().unwrap() = server.base.clone();
    let _as = start_recorder(port, rec.clone()).await;
    let bridge = as_client(&server);
    let alice = server.user("alice").await;

    // Registration of a ghost with the appservice's token; the namespace is exclusive.
    let (status, v) = bridge
        .post(
            "/_matrix/client/v3/register",
            json!({ "type": "m.login.application_service", "username": "_test_bob", "inhibit_login": true }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["user_id"], "@_test_bob:localhost");
    assert!(v.get("access_token").is_none());
    let (status, v) = bridge
        .post(
            "/_matrix/client/v3/register",
            json!({ "type": "m.login.application_service", "username": "outsider" }),
        )
        .await;
    assert_eq!(
        (status, errcode(&v)),
        (StatusCode::BAD_REQUEST, "M_EXCLUSIVE")
    );
    let (status, v) = server
        .client()
        .post(
            "/_matrix/client/v3/register",
            json!({ "username": "_test_squatter", "password": "long enough password", "auth": { "type": "m.login.dummy" } }),
        )
        .await;
    assert_eq!(
        (status, errcode(&v)),
        (StatusCode::BAD_REQUEST, "M_EXCLUSIVE")
    );
    // A registration type without the token, and the token without the type, are refused.
    let (status, _) = server
        .client()
        .post(
            "/_matrix/client/v3/register",
            json!({ "type": "m.login.application_service", "username": "_test_x" }),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Masquerading as the ghost; ?ts= sets the timestamp.
    let room = alice.create_room(json!({ "preset": "public_chat" })).await;
    let ghost = "@_test_bob:localhost";
    let (status, v) = bridge
        .post(
            &format!(
                "/_matrix/client/v3/join/{}?user_id={}",
                enc(&room),
                enc(ghost)
            ),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let sent = bridge
        .ok(
            Method::PUT,
            &format!(
                "/_matrix/client/v3/rooms/{}/send/m.room.message/t1?user_id={}&ts=1000000000000",
                enc(&room),
                enc(ghost)
            ),
            Some(json!({ "msgtype": "m.text", "body": "from the ghost" })),
        )
        .await;
    let event = alice
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/rooms/{}/event/{}",
                enc(&room),
                enc(sent["event_id"].as_str().unwrap())
            ),
            None,
        )
        .await;
    assert_eq!(event["sender"], ghost);
    assert_eq!(event["origin_server_ts"], 1_000_000_000_000u64);
    // Not in the namespace, or not registered: refused.
    let (status, v) = bridge
        .get(&format!(
            "/_matrix/client/v3/account/whoami?user_id={}",
            enc(&alice.user_id)
        ))
        .await;
    assert_eq!(
        (status, errcode(&v)),
        (StatusCode::BAD_REQUEST, "M_EXCLUSIVE")
    );
    let (status, v) = bridge
        .get(&format!(
            "/_matrix/client/v3/account/whoami?user_id={}",
            enc("@_test_nobody:localhost")
        ))
        .await;
    assert_eq!(
        (status, errcode(&v)),
        (StatusCode::FORBIDDEN, "M_FORBIDDEN")
    );
    let who = bridge
        .ok(Method::GET, "/_matrix/client/v3/account/whoami", None)
        .await;
    assert_eq!(who["user_id"], "@bridgebot:localhost");

    // Alice's message in the ghost's room reaches the appservice, with the hs_token.
    alice.send_text(&room, "a1", "hello bridge").await;
    let seen = rec.seen.clone();
    wait_until("alice's message in a transaction", || {
        let s = seen.lock().unwrap();
        bodies_by(&s, &alice.user_id)
            .contains(&"hello bridge".to_owned())
            .then_some(())
    })
    .await;
    assert_eq!(seen.lock().unwrap().bad_tokens, 0);

    // Typing and receipts in the ghost's room come as ephemeral data.
    alice
        .ok(
            Method::PUT,
            &format!(
                "/_matrix/client/v3/rooms/{}/typing/{}",
                enc(&room),
                enc(&alice.user_id)
            ),
            Some(json!({ "typing": true, "timeout": 10000 })),
        )
        .await;
    let first = sent["event_id"].as_str().unwrap().to_owned();
    alice
        .ok(
            Method::POST,
            &format!(
                "/_matrix/client/v3/rooms/{}/receipt/m.read/{}",
                enc(&room),
                enc(&first)
            ),
            Some(json!({})),
        )
        .await;
    wait_until("typing and a receipt", || {
        let s = seen.lock().unwrap();
        let typing = s.ephemeral.iter().any(|e| {
            e["type"] == "m.typing"
                && e["room_id"] == room.as_str()
                && e["content"]["user_ids"]
                    .as_array()
                    .is_some_and(|u| u.contains(&json!(alice.user_id)))
        });
        let receipt = s.ephemeral.iter().any(|e| {
            e["type"] == "m.receipt" && e["content"][&first]["m.read"].get(&alice.user_id).is_some()
        });
        (typing && receipt).then_some(())
    })
    .await;

    // A room nobody of the appservice is in stays private to its members.
    let other = alice.create_room(json!({ "preset": "private_chat" })).await;
    alice.send_text(&other, "a2", "not for the bridge").await;
    alice.send_text(&room, "a3", "second").await;
    wait_until("the second message", || {
        let s = seen.lock().unwrap();
        bodies_by(&s, &alice.user_id)
            .contains(&"second".to_owned())
            .then_some(())
    })
    .await;
    assert!(
        !bodies_by(&seen.lock().unwrap(), &alice.user_id)
            .contains(&"not for the bridge".to_owned())
    );

    // Queries: an unknown user of the namespace is asked about; an alias is created by
    // the appservice on demand and then resolves.
    let (status, _) = alice
        .get(&format!(
            "/_matrix/client/v3/profile/{}",
            enc("@_test_unknown:localhost")
        ))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        seen.lock().unwrap().user_queries,
        vec!["@_test_unknown:localhost".to_owned()]
    );
    let resolved = alice
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/directory/room/{}",
                enc("#_test_portal:localhost")
            ),
            None,
        )
        .await;
    assert!(resolved["room_id"].as_str().unwrap().starts_with('!'));
    // Nobody else may take an alias of the namespace.
    let (status, v) = alice
        .put(
            &format!(
                "/_matrix/client/v3/directory/room/{}",
                enc("#_test_mine:localhost")
            ),
            json!({ "room_id": room }),
        )
        .await;
    assert_eq!(
        (status, errcode(&v)),
        (StatusCode::BAD_REQUEST, "M_EXCLUSIVE")
    );

    // Ping through the homeserver.
    let ping = bridge
        .ok(
            Method::POST,
            "/_matrix/client/v1/appservice/testbridge/ping",
            Some(json!({})),
        )
        .await;
    assert!(ping["duration_ms"].is_u64());
    assert_eq!(seen.lock().unwrap().pings, 1);
    let (status, _) = bridge
        .post("/_matrix/client/v1/appservice/otherbridge/ping", json!({}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Login as a namespace user with the appservice's token.
    let login = bridge
        .ok(
            Method::POST,
            "/_matrix/client/v3/login",
            Some(json!({ "type": "m.login.application_service", "identifier": { "type": "m.id.user", "user": ghost } })),
        )
        .await;
    assert_eq!(login["user_id"], ghost);
    assert!(login["access_token"].is_string());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_wait_for_a_down_appservice_and_arrive_exactly_once() {
    let port = free_port();
    let dir = registration_dir(port);
    let server = start_with_registrations(&dir).await;
    let bridge = as_client(&server);
    let alice = server.user("alice").await;
    let room = alice.create_room(json!({ "preset": "public_chat" })).await;
    bridge
        .ok(
            Method::POST,
            "/_matrix/client/v3/register",
            Some(json!({ "type": "m.login.application_service", "username": "_test_carol", "inhibit_login": true })),
        )
        .await;
    bridge
        .ok(
            Method::POST,
            &format!(
                "/_matrix/client/v3/join/{}?user_id={}",
                enc(&room),
                enc("@_test_carol:localhost")
            ),
            Some(json!({})),
        )
        .await;
    // The appservice is down: messages pile up.
    for i in 0..20 {
        alice
            .send_text(&room, &format!("m{i}"), &format!("message {i}"))
            .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let data = server.stop().await;

    // Salon restarts first, then the appservice comes up failing its first answer.
    let server = TestServer::start_in(
        data,
        &[(
            "SALON_APPSERVICES__REGISTRATION_DIR",
            &dir.path().display().to_string(),
        )],
    )
    .await;
    let rec = recorder();
    *rec.fail.lock().unwrap() = 1;
    let _as = start_recorder(port, rec.clone()).await;
    let seen = rec.seen.clone();
    let want: Vec<String> = (0..20).map(|i| format!("message {i}")).collect();
    wait_until("all twenty messages", || {
        let s = seen.lock().unwrap();
        let accepted: Vec<String> = s
            .transactions
            .iter()
            .skip(1) // the refused first try
            .flat_map(|(_, events)| events.iter())
            .filter(|e| e["sender"] == alice.user_id.as_str() && e["type"] == "m.room.message")
            .map(|e| e["content"]["body"].as_str().unwrap_or_default().to_owned())
            .collect();
        (accepted.len() >= 20).then_some(())
    })
    .await;
    let s = seen.lock().unwrap();
    // The refused transaction came again with the same id and the same events.
    let (first_id, first_events) = &s.transactions[0];
    let (second_id, second_events) = &s.transactions[1];
    let ids = |events: &Vec<Value>| -> Vec<String> {
        events
            .iter()
            .map(|e| e["event_id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(first_id, second_id);
    assert_eq!(ids(first_events), ids(second_events));
    // Every message once, in order, and no event under two transaction ids.
    let accepted: Vec<String> = s.transactions[1..]
        .iter()
        .flat_map(|(_, events)| events.iter())
        .filter(|e| e["sender"] == alice.user_id.as_str() && e["type"] == "m.room.message")
        .map(|e| e["content"]["body"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(accepted, want);
    let mut txn_of: HashMap<String, String> = HashMap::new();
    for (txn, events) in &s.transactions {
        for e in events {
            let id = e["event_id"].as_str().unwrap().to_owned();
            if let Some(previous) = txn_of.insert(id.clone(), txn.clone()) {
                assert_eq!(&previous, txn, "{id} was sent under two transaction ids");
            }
        }
    }
    drop(s);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_registration_stops_startup_naming_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("broken.yaml"),
        format!(
            "id: broken\nurl: null\nas_token: \"{AS_TOKEN}\"\nhs_token: \"{HS_TOKEN}\"\nsender_localpart: b\nnamespaces:\n  users:\n    - exclusive: true\n      regex: \"@_b_(\"\n"
        ),
    )
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    let config = common::test_config(
        data.path(),
        &[(
            "SALON_APPSERVICES__REGISTRATION_DIR",
            &dir.path().display().to_string(),
        )],
    );
    let err = salon::services(config)
        .err()
        .expect("start-up refused")
        .to_string();
    assert!(
        err.contains("broken.yaml") && err.contains("namespaces.users[0].regex"),
        "{err}"
    );

    // Two registrations sharing a token.
    std::fs::write(dir.path().join("broken.yaml"), "").unwrap();
    std::fs::remove_file(dir.path().join("broken.yaml")).unwrap();
    for (name, id) in [("a.yaml", "a"), ("b.yaml", "b")] {
        std::fs::write(
            dir.path().join(name),
            format!("id: {id}\nurl: null\nas_token: \"{AS_TOKEN}\"\nhs_token: \"hs-{id}-token-long-enough\"\nsender_localpart: bot_{id}\nnamespaces: {{}}\n"),
        )
        .unwrap();
    }
    let config = common::test_config(
        data.path(),
        &[(
            "SALON_APPSERVICES__REGISTRATION_DIR",
            &dir.path().display().to_string(),
        )],
    );
    let err = salon::services(config)
        .err()
        .expect("start-up refused")
        .to_string();
    assert!(
        err.contains("b.yaml: as_token") && err.contains("a.yaml"),
        "{err}"
    );
}

async fn wait_for_notice(c: &Client, room: &str, from: &str, containing: &str) -> Value {
    for _ in 0..200 {
        let v = c
            .ok(
                Method::GET,
                &format!(
                    "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=20",
                    enc(room)
                ),
                None,
            )
            .await;
        if let Some(e) = v["chunk"].as_array().unwrap().iter().find(|e| {
            e["sender"] == from
                && e["content"]["body"]
                    .as_str()
                    .is_some_and(|b| b.contains(containing))
        }) {
            return e.clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no message from {from} containing {containing:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bundled_ping_bot_answers_in_rooms_it_is_invited_to() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let room = alice
        .create_room(json!({
            "invite": ["@ping:localhost"],
            "preset": "private_chat",
            "power_level_content_override": { "users": { "@ping:localhost": 50 } },
        }))
        .await;
    // It joins on its own.
    for _ in 0..200 {
        let (_, members) = alice
            .get(&format!(
                "/_matrix/client/v3/rooms/{}/joined_members",
                enc(&room)
            ))
            .await;
        if members["joined"].get("@ping:localhost").is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    alice.send_text(&room, "p1", "!ping").await;
    let pong = wait_for_notice(&alice, &room, "@ping:localhost", "pong").await;
    assert_eq!(pong["content"]["msgtype"], "m.notice");
    alice.send_text(&room, "p2", "!help").await;
    let help = wait_for_notice(&alice, &room, "@ping:localhost", "!ping").await;
    assert!(
        help["content"]["formatted_body"]
            .as_str()
            .unwrap()
            .contains("<code>!ping</code>")
    );
    // Its command descriptions (MSC4391) are in the room state (it may set state here).
    let state = alice
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/state", enc(&room)),
            None,
        )
        .await;
    let commands: Vec<&str> = state
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["type"] == "org.matrix.msc4391.command_description"
                && e["sender"] == "@ping:localhost"
        })
        .map(|e| e["content"]["command"].as_str().unwrap())
        .collect();
    assert_eq!(commands.len(), 2, "{commands:?}");
    assert!(commands.contains(&"ping") && commands.contains(&"help"));
    server.stop().await;
}

/// A kit-based appservice with a handler that records what it handles.
#[derive(Clone, Default)]
struct Collect(Arc<Mutex<Vec<Value>>>);

impl salon_appservice_kit::Handler for Collect {
    async fn on_event(
        &self,
        _kit: &salon_appservice_kit::Kit,
        event: &salon_appservice_kit::Event,
    ) -> anyhow::Result<()> {
        self.0.lock().unwrap().push(event.0.clone());
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kit_checks_the_hs_token_and_handles_each_transaction_once() {
    let store = tempfile::tempdir().unwrap();
    let registration = salon_appservice_kit::registration::generate(
        &salon_appservice_kit::registration::Template {
            id: "kit-test",
            url: None,
            sender_localpart: "kitbot",
            users: vec![],
            aliases: vec![],
            protocols: vec![],
            receive_ephemeral: false,
        },
    );
    let hs_token = registration.hs_token.clone();
    let collect = Collect::default();
    let running = salon_appservice_kit::start(
        salon_appservice_kit::Settings {
            registration,
            homeserver_url: "http://127.0.0.1:9".into(),
            server_name: "localhost".try_into().unwrap(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            store_dir: store.path().to_owned(),
            auto_join: false,
            commands: None,
        },
        collect.clone(),
    )
    .await
    .unwrap();
    let http = reqwest::Client::new();
    let url = |txn: &str| format!("http://{}/_matrix/app/v1/transactions/{txn}", running.addr);
    let body = json!({ "events": [
        { "type": "m.room.message", "event_id": "$1", "room_id": "!r:localhost", "sender": "@a:localhost", "content": { "body": "one" } },
        { "type": "m.room.message", "event_id": "$2", "room_id": "!r:localhost", "sender": "@a:localhost", "content": { "body": "two" } },
    ] });
    let r = http
        .put(url("1"))
        .bearer_auth("wrong")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = http.put(url("1")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    for _ in 0..3 {
        let r = http
            .put(url("1"))
            .bearer_auth(&hs_token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    let got = wait_until("two events", || {
        let v = collect.0.lock().unwrap().clone();
        (v.len() >= 2).then_some(v)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got_now = collect.0.lock().unwrap().clone();
    assert_eq!(
        got_now.len(),
        2,
        "the repeated transaction was handled once: {got:?}"
    );
    assert_eq!(got_now[0]["content"]["body"], "one");
    assert_eq!(got_now[1]["content"]["body"], "two");
    running.stop().await;

    // After a restart the kit still knows the transaction.
    let registration2 = salon_appservice_kit::registration::Template {
        id: "kit-test",
        url: None,
        sender_localpart: "kitbot",
        users: vec![],
        aliases: vec![],
        protocols: vec![],
        receive_ephemeral: false,
    };
    let mut reg = salon_appservice_kit::registration::generate(&registration2);
    reg.hs_token = hs_token.clone();
    let collect2 = Collect::default();
    let running = salon_appservice_kit::start(
        salon_appservice_kit::Settings {
            registration: reg,
            homeserver_url: "http://127.0.0.1:9".into(),
            server_name: "localhost".try_into().unwrap(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            store_dir: store.path().to_owned(),
            auto_join: false,
            commands: None,
        },
        collect2.clone(),
    )
    .await
    .unwrap();
    let r = http
        .put(format!(
            "http://{}/_matrix/app/v1/transactions/1",
            running.addr
        ))
        .bearer_auth(&hs_token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(collect2.0.lock().unwrap().is_empty(), "nothing replayed");
    running.stop().await;
}
