//! Rooms, membership, messages, state, redaction, aliases, directories, upgrades.

mod common;

use common::{TestServer, enc, errcode};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

async fn messages(c: &common::Client, room: &str, query: &str) -> Value {
    c.ok(
        Method::GET,
        &format!("/_matrix/client/v3/rooms/{}/messages?{query}", enc(room)),
        None,
    )
    .await
}

fn types(chunk: &Value) -> Vec<String> {
    chunk
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_room_applies_every_option() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let room = alice
        .create_room(json!({
            "name": "Cabinet", "topic": "Weekly cabinet meeting", "room_alias_name": "cabinet",
            "visibility": "public", "preset": "public_chat", "invite": [bob.user_id],
            "initial_state": [{ "type": "m.room.history_visibility", "state_key": "", "content": { "history_visibility": "joined" } }],
            "power_level_content_override": { "events_default": 10 },
            "creation_content": { "type": "org.example.workspace" },
        }))
        .await;
    assert!(room.starts_with('!'));
    let state = alice
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/state", enc(&room)),
            None,
        )
        .await;
    let find = |t: &str| {
        state
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["type"] == t)
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(find("m.room.create")["content"]["room_version"], "12");
    assert_eq!(
        find("m.room.create")["content"]["type"],
        "org.example.workspace"
    );
    assert_eq!(find("m.room.name")["content"]["name"], "Cabinet");
    assert_eq!(
        find("m.room.topic")["content"]["topic"],
        "Weekly cabinet meeting"
    );
    assert_eq!(find("m.room.join_rules")["content"]["join_rule"], "public");
    assert_eq!(
        find("m.room.history_visibility")["content"]["history_visibility"],
        "joined",
        "initial_state overrides the preset"
    );
    assert_eq!(
        find("m.room.canonical_alias")["content"]["alias"],
        "#cabinet:localhost"
    );
    let pl = find("m.room.power_levels");
    assert_eq!(pl["content"]["events_default"], 10);
    assert!(
        pl["content"]["users"].get(&alice.user_id).is_none(),
        "v12 creators are implicit: {pl}"
    );
    for e in state.as_array().unwrap() {
        assert_eq!(e["room_id"], room.as_str());
        assert!(e["event_id"].as_str().unwrap().starts_with('$'));
    }
    let (_, inv) = alice.state(&room, "m.room.member", &bob.user_id).await;
    assert_eq!(inv["membership"], "invite");
    let alias = bob
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/directory/room/{}",
                enc("#cabinet:localhost")
            ),
            None,
        )
        .await;
    assert_eq!(alias["room_id"], room.as_str());
    assert_eq!(alias["servers"], json!(["localhost"]));
    let public = bob
        .ok(Method::GET, "/_matrix/client/v3/publicRooms", None)
        .await;
    assert_eq!(public["chunk"][0]["room_id"], room.as_str());
    assert_eq!(public["chunk"][0]["name"], "Cabinet");
    assert_eq!(
        public["chunk"][0]["num_joined_members"], 1,
        "an invited member is not counted"
    );
    assert_ne!(
        public["chunk"][0]["join_rule"], "invite",
        "public is the default and may be omitted"
    );
    let (status, _) = bob.join(&room).await;
    assert_eq!(status, StatusCode::OK);
    let public = bob
        .ok(Method::GET, "/_matrix/client/v3/publicRooms", None)
        .await;
    assert_eq!(public["chunk"][0]["num_joined_members"], 2);

    // Older room versions work too, with the creator in the power levels.
    let v10 = alice.create_room(json!({ "room_version": "10" })).await;
    assert!(
        v10.ends_with(":localhost"),
        "pre-v12 room ids carry the server name"
    );
    let (_, pl) = alice.state(&v10, "m.room.power_levels", "").await;
    assert_eq!(pl["users"][&alice.user_id], 100);
    let (status, body) = alice
        .post(
            "/_matrix/client/v3/createRoom",
            json!({ "room_version": "1" }),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_UNSUPPORTED_ROOM_VERSION")
    );
    let (status, body) = alice
        .post(
            "/_matrix/client/v3/createRoom",
            json!({ "room_alias_name": "cabinet" }),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_ROOM_IN_USE")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_lifecycle() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let carol = server.user("carol").await;
    let room = alice.create_room(json!({ "preset": "private_chat" })).await;
    let r = enc(&room);

    let (status, body) = bob.join(&room).await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::FORBIDDEN, "M_FORBIDDEN"),
        "invite-only: {body}"
    );
    let (status, body) = bob
        .post(
            &format!("/_matrix/client/v3/rooms/{r}/invite"),
            json!({ "user_id": carol.user_id }),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::FORBIDDEN, "M_FORBIDDEN"),
        "outsiders cannot invite"
    );
    let (status, body) = alice
        .post(
            &format!("/_matrix/client/v3/rooms/{r}/invite"),
            json!({ "user_id": "@ghost:localhost" }),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::NOT_FOUND, "M_NOT_FOUND")
    );

    alice
        .ok(
            Method::POST,
            &format!("/_matrix/client/v3/rooms/{r}/invite"),
            Some(json!({ "user_id": bob.user_id, "reason": "welcome" })),
        )
        .await;
    let body = bob
        .ok(
            Method::POST,
            &format!("/_matrix/client/v3/rooms/{r}/join"),
            Some(json!({})),
        )
        .await;
    assert_eq!(body["room_id"], room.as_str());
    let joined = bob
        .ok(Method::GET, "/_matrix/client/v3/joined_rooms", None)
        .await;
    assert_eq!(joined["joined_rooms"], json!([room]));
    let members = alice
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{r}/joined_members"),
            None,
        )
        .await;
    assert_eq!(members["joined"].as_object().unwrap().len(), 2);
    assert_eq!(members["joined"][&bob.user_id]["display_name"], "bob");

    // Kick, re-invite, ban, unban.
    let (status, _) = bob
        .post(
            &format!("/_matrix/client/v3/rooms/{r}/kick"),
            json!({ "user_id": alice.user_id }),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "members cannot kick the creator"
    );
    alice
        .ok(
            Method::POST,
            &format!("/_matrix/client/v3/rooms/{r}/kick"),
            Some(json!({ "user_id": bob.user_id, "reason": "noise" })),
        )
        .await;
    let (_, m) = alice.state(&room, "m.room.member", &bob.user_id).await;
    assert_eq!(
        (m["membership"].as_str(), m["reason"].as_str()),
        (Some("leave"), Some("noise"))
    );
    alice
        .ok(
            Method::POST,
            &format!("/_matrix/client/v3/rooms/{r}/ban"),
            Some(json!({ "user_id": bob.user_id })),
        )
        .await;
    alice
        .ok(
            Method::POST,
            &format!("/_matrix/client/v3/rooms/{r}/invite"),
            Some(json!({ "user_id": carol.user_id })),
        )
        .await;
    let (status, _) = alice
        .post(
            &format!("/_matrix/client/v3/rooms/{r}/invite"),
            json!({ "user_id": bob.user_id }),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "banned users cannot be invited"
    );
    let (status, _) = bob.join(&room).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    alice
        .ok(
            Method::POST,
            &format!("/_matrix/client/v3/rooms/{r}/unban"),
            Some(json!({ "user_id": bob.user_id })),
        )
        .await;
    let (_, m) = alice.state(&room, "m.room.member", &bob.user_id).await;
    assert_eq!(m["membership"], "leave");

    // Members list filters.
    let all = alice
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{r}/members"),
            None,
        )
        .await;
    assert_eq!(all["chunk"].as_array().unwrap().len(), 3);
    let invited = alice
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{r}/members?membership=invite"),
            None,
        )
        .await;
    assert_eq!(invited["chunk"][0]["state_key"], carol.user_id.as_str());
    let not_leave = alice
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{r}/members?not_membership=leave"),
            None,
        )
        .await;
    assert_eq!(not_leave["chunk"].as_array().unwrap().len(), 2);
    // `at` a token from before bob's invite: only alice.
    let early = alice
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{r}/messages?dir=f&limit=1"),
            None,
        )
        .await;
    let at = early["end"].as_str().unwrap();
    let then = alice
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{r}/members?at={at}"),
            None,
        )
        .await;
    assert_eq!(
        then["chunk"].as_array().unwrap().len(),
        0,
        "after the create event nobody had joined yet: {then}"
    );

    // Carol rejects her invite; leaving and forgetting.
    carol
        .ok(
            Method::POST,
            &format!("/_matrix/client/v3/rooms/{r}/leave"),
            Some(json!({})),
        )
        .await;
    let (status, body) = carol
        .post(&format!("/_matrix/client/v3/rooms/{r}/leave"), json!({}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, _) = alice
        .post(&format!("/_matrix/client/v3/rooms/{r}/forget"), json!({}))
        .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "joined rooms cannot be forgotten"
    );
    carol
        .ok(
            Method::POST,
            &format!("/_matrix/client/v3/rooms/{r}/forget"),
            Some(json!({})),
        )
        .await;
    let (status, _) = carol
        .get(&format!("/_matrix/client/v3/rooms/{r}/members"))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "forgotten rooms are closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn knocking_and_public_joins() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let room = alice
        .create_room(json!({ "preset": "public_chat", "room_alias_name": "lobby" }))
        .await;
    let body = bob
        .ok(
            Method::POST,
            &format!("/_matrix/client/v3/join/{}", enc("#lobby:localhost")),
            Some(json!({})),
        )
        .await;
    assert_eq!(body["room_id"], room.as_str());

    let knock_room = alice.create_room(json!({ "initial_state": [{ "type": "m.room.join_rules", "state_key": "", "content": { "join_rule": "knock" } }] })).await;
    let carol = server.user("carol").await;
    let body = carol
        .ok(
            Method::POST,
            &format!("/_matrix/client/v3/knock/{}", enc(&knock_room)),
            Some(json!({ "reason": "let me in" })),
        )
        .await;
    assert_eq!(body["room_id"], knock_room.as_str());
    let (_, m) = alice
        .state(&knock_room, "m.room.member", &carol.user_id)
        .await;
    assert_eq!(m["membership"], "knock");
    alice
        .ok(
            Method::POST,
            &format!("/_matrix/client/v3/rooms/{}/invite", enc(&knock_room)),
            Some(json!({ "user_id": carol.user_id })),
        )
        .await;
    carol
        .ok(
            Method::POST,
            &format!("/_matrix/client/v3/rooms/{}/join", enc(&knock_room)),
            Some(json!({})),
        )
        .await;
    let (status, _) = server
        .user("dave")
        .await
        .post(
            &format!("/_matrix/client/v3/knock/{}", enc(&room)),
            json!({}),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "public rooms are joined, not knocked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restricted_rooms_admit_members_of_allowed_rooms() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let space = alice.create_room(json!({ "preset": "public_chat" })).await;
    let room = alice
        .create_room(json!({ "initial_state": [{ "type": "m.room.join_rules", "state_key": "", "content": {
            "join_rule": "restricted", "allow": [{ "type": "m.room_membership", "room_id": space }] } }] }))
        .await;
    let (status, _) = bob.join(&room).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "not yet in the space");
    bob.join(&space).await;
    let (status, body) = bob.join(&room).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, m) = alice.state(&room, "m.room.member", &bob.user_id).await;
    assert_eq!(
        m["join_authorised_via_users_server"],
        alice.user_id.as_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sending_is_idempotent_and_pagination_is_exact() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let room = alice.create_room(json!({ "name": "History" })).await;
    let mut ids = Vec::new();
    for i in 0..45 {
        ids.push(
            alice
                .send_text(&room, &format!("txn{i}"), &format!("message {i}"))
                .await,
        );
    }
    // Retrying a transaction returns the same event and sends nothing new.
    assert_eq!(
        alice.send_text(&room, "txn7", "message 7 again").await,
        ids[7]
    );

    // Backwards from the end, 10 at a time: every message exactly once, newest first.
    let mut seen = Vec::new();
    let mut from: Option<String> = None;
    loop {
        let q = match &from {
            Some(f) => format!("dir=b&limit=10&from={f}"),
            None => "dir=b&limit=10".into(),
        };
        let page = messages(&alice, &room, &q).await;
        for e in page["chunk"].as_array().unwrap() {
            if e["type"] == "m.room.message" {
                seen.push(e["content"]["body"].as_str().unwrap().to_owned());
                if e["content"]["body"] == "message 3" {
                    assert_eq!(
                        e["unsigned"]["transaction_id"], "txn3",
                        "the sending device sees its txn id"
                    );
                }
            }
        }
        match page["end"].as_str() {
            Some(e) => from = Some(e.to_owned()),
            None => break,
        }
    }
    let expected: Vec<String> = (0..45).rev().map(|i| format!("message {i}")).collect();
    assert_eq!(seen, expected);

    // Forwards from the start, with a type filter.
    let page = messages(
        &alice,
        &room,
        &format!(
            "dir=f&limit=5&filter={}",
            enc(r#"{"types":["m.room.message"]}"#)
        ),
    )
    .await;
    let bodies: Vec<&str> = page["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["content"]["body"].as_str().unwrap())
        .collect();
    assert_eq!(
        bodies,
        [
            "message 0",
            "message 1",
            "message 2",
            "message 3",
            "message 4"
        ]
    );
    let page = messages(
        &alice,
        &room,
        &format!(
            "dir=f&limit=100&filter={}",
            enc(r#"{"not_types":["m.room.message"]}"#)
        ),
    )
    .await;
    assert_eq!(types(&page["chunk"])[0], "m.room.create");
    assert!(!types(&page["chunk"]).contains(&"m.room.message".to_owned()));
    let state_types = types(&page["chunk"]);
    // Backwards in small pages through the 45 messages the filter leaves out: the walk
    // reaches the room's first events and returns each of them once.
    let mut walked = Vec::new();
    let mut from: Option<String> = None;
    let filter = enc(r#"{"not_types":["m.room.message"]}"#);
    loop {
        let q = match &from {
            Some(f) => format!("dir=b&limit=3&filter={filter}&from={f}"),
            None => format!("dir=b&limit=3&filter={filter}"),
        };
        let page = messages(&alice, &room, &q).await;
        walked.extend(types(&page["chunk"]));
        match page["end"].as_str() {
            Some(e) => from = Some(e.to_owned()),
            None => break,
        }
    }
    walked.reverse();
    assert_eq!(walked, state_types);
    // `to` bounds a page.
    let first = messages(&alice, &room, "dir=b&limit=3").await;
    let to = first["end"].as_str().unwrap();
    let bounded = messages(
        &alice,
        &room,
        &format!(
            "dir=f&limit=100&from={to}&to={}",
            first["start"].as_str().unwrap()
        ),
    )
    .await;
    assert_eq!(bounded["chunk"].as_array().unwrap().len(), 3);
    // Other users' view has no transaction ids; outsiders see nothing.
    let bob = server.user("bob").await;
    let (status, body) = bob
        .get(&format!(
            "/_matrix/client/v3/rooms/{}/messages?dir=b",
            enc(&room)
        ))
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::FORBIDDEN, "M_FORBIDDEN")
    );
    let (status, body) = alice
        .get(&format!(
            "/_matrix/client/v3/rooms/{}/messages?dir=b&from=garbage",
            enc(&room)
        ))
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_INVALID_PARAM")
    );
    // Lazy loading returns the senders' member events.
    let page = messages(
        &alice,
        &room,
        &format!(
            "dir=b&limit=2&filter={}",
            enc(r#"{"lazy_load_members":true}"#)
        ),
    )
    .await;
    assert_eq!(page["state"][0]["state_key"], alice.user_id.as_str());
}

/// After a page of history the server reads ahead the page a client paging on is
/// given next, in both directions, and nothing after the last page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_read_ahead_a_page_at_a_time() {
    use salon::service::rooms::{
        CreateRoom,
        read::EventFilter,
        timeline::{NewEvent, read_history},
    };
    let dir = tempfile::tempdir().unwrap();
    let s = salon::services(common::test_config(dir.path(), &[])).unwrap();
    let alice = ruma::UserId::parse("@alice:localhost").unwrap();
    s.users.create(&alice, None, false, false).await.unwrap();
    let room = s
        .rooms
        .create_room(&alice, CreateRoom::default())
        .await
        .unwrap();
    for m in 0..250 {
        let content = json!({ "msgtype": "m.text", "body": format!("message {m}") });
        s.rooms
            .send(&room, &alice, NewEvent::message("m.room.message", content))
            .await
            .unwrap();
    }
    let filter = EventFilter::default();
    let page = |from: Option<&str>, backward: bool| {
        s.rooms
            .messages(&room, &alice, None, from, None, backward, 100, &filter)
            .unwrap()
    };
    for backward in [true, false] {
        let mut current = page(None, backward);
        let mut pages = 1;
        while let Some(next) = current.next {
            let read = read_history(&s.rooms.db, next).unwrap();
            let following = page(current.end.as_deref(), backward);
            let given: Vec<u64> = following
                .chunk
                .iter()
                .map(|e| {
                    let e: Value = serde_json::from_str(e.get()).unwrap();
                    let id = ruma::EventId::parse(e["event_id"].as_str().unwrap()).unwrap();
                    s.rooms.timeline.event_short(&id).unwrap().unwrap()
                })
                .collect();
            assert!(!given.is_empty());
            assert_eq!(read, given, "page {pages}, backward: {backward}");
            current = following;
            pages += 1;
        }
        // 250 messages and the room's first events: the third page is the last.
        assert_eq!(pages, 3, "backward: {backward}");
        assert!(current.chunk.len() < 100 && current.end.is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_visibility_is_enforced() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let room = alice
        .create_room(json!({ "preset": "public_chat", "initial_state": [{ "type": "m.room.history_visibility", "state_key": "", "content": { "history_visibility": "joined" } }] }))
        .await;
    let before = alice.send_text(&room, "t1", "before bob").await;
    bob.join(&room).await;
    let during = alice.send_text(&room, "t2", "while bob is here").await;
    let (status, _) = bob
        .get(&format!(
            "/_matrix/client/v3/rooms/{}/event/{}",
            enc(&room),
            enc(&before)
        ))
        .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "joined visibility hides earlier events"
    );
    let (status, e) = bob
        .get(&format!(
            "/_matrix/client/v3/rooms/{}/event/{}",
            enc(&room),
            enc(&during)
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(e["content"]["body"], "while bob is here");
    bob.ok(
        Method::POST,
        &format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)),
        Some(json!({})),
    )
    .await;
    let after = alice.send_text(&room, "t3", "after bob left").await;
    alice
        .ok(
            Method::PUT,
            &format!(
                "/_matrix/client/v3/rooms/{}/state/m.room.topic/",
                enc(&room)
            ),
            Some(json!({ "topic": "changed later" })),
        )
        .await;
    let page = messages(&bob, &room, "dir=b&limit=50").await;
    let bodies: Vec<&str> = page["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["content"]["body"].as_str())
        .collect();
    assert_eq!(bodies, ["while bob is here"], "bob sees only his own stay");
    let (status, _) = bob
        .get(&format!(
            "/_matrix/client/v3/rooms/{}/event/{}",
            enc(&room),
            enc(&after)
        ))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = bob.state(&room, "m.room.topic", "").await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "state is frozen at the moment bob left"
    );

    // world_readable rooms can be read by anyone.
    alice
        .ok(
            Method::PUT,
            &format!(
                "/_matrix/client/v3/rooms/{}/state/m.room.history_visibility/",
                enc(&room)
            ),
            Some(json!({ "history_visibility": "world_readable" })),
        )
        .await;
    let carol = server.user("carol").await;
    let (status, _) = carol
        .get(&format!("/_matrix/client/v3/rooms/{}/state", enc(&room)))
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_and_power_levels() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let room = alice.create_room(json!({ "preset": "public_chat" })).await;
    let r = enc(&room);
    bob.join(&room).await;
    alice
        .ok(
            Method::PUT,
            &format!("/_matrix/client/v3/rooms/{r}/state/org.example.config/k1"),
            Some(json!({ "a": 1 })),
        )
        .await;
    let (_, v) = alice.state(&room, "org.example.config", "k1").await;
    assert_eq!(v, json!({ "a": 1 }));
    let e = alice
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{r}/state/org.example.config/k1?format=event"),
            None,
        )
        .await;
    assert_eq!(e["sender"], alice.user_id.as_str());
    alice
        .ok(
            Method::PUT,
            &format!("/_matrix/client/v3/rooms/{r}/state/org.example.config/k1"),
            Some(json!({ "a": 2 })),
        )
        .await;
    let e = alice
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{r}/state/org.example.config/k1?format=event"),
            None,
        )
        .await;
    assert_eq!(e["unsigned"]["prev_content"], json!({ "a": 1 }));

    let (status, body) = bob
        .put(
            &format!("/_matrix/client/v3/rooms/{r}/state/m.room.name/"),
            json!({ "name": "Bob's room" }),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::FORBIDDEN, "M_FORBIDDEN")
    );
    assert!(
        body["error"].as_str().unwrap().len() > 10,
        "a reason is given: {body}"
    );
    let (status, _) = alice.state(&room, "m.room.name", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = alice
        .put(
            &format!("/_matrix/client/v3/rooms/{r}/state/m.room.canonical_alias/"),
            json!({ "alias": "#nowhere:localhost" }),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_BAD_ALIAS")
    );

    // Promote bob, then he may.
    let (_, mut pl) = alice.state(&room, "m.room.power_levels", "").await;
    pl["users"][&bob.user_id] = json!(50);
    alice
        .ok(
            Method::PUT,
            &format!("/_matrix/client/v3/rooms/{r}/state/m.room.power_levels/"),
            Some(pl),
        )
        .await;
    bob.ok(
        Method::PUT,
        &format!("/_matrix/client/v3/rooms/{r}/state/m.room.name/"),
        Some(json!({ "name": "Bob's room" })),
    )
    .await;
    let (_, name) = alice.state(&room, "m.room.name", "").await;
    assert_eq!(name["name"], "Bob's room");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redaction_strips_content_by_the_room_version() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let room = alice.create_room(json!({ "preset": "public_chat" })).await;
    let r = enc(&room);
    bob.join(&room).await;
    let mine = bob.send_text(&room, "b1", "oops, a secret").await;
    let theirs = alice.send_text(&room, "a1", "alice's words").await;
    // Read before the redaction (parsed events are cached): the redaction must win.
    let before = alice
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{r}/event/{}", enc(&mine)),
            None,
        )
        .await;
    assert_eq!(before["content"]["body"], "oops, a secret");
    let (status, body) = bob
        .put(
            &format!("/_matrix/client/v3/rooms/{r}/redact/{}/r1", enc(&theirs)),
            json!({}),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::FORBIDDEN, "M_FORBIDDEN"),
        "{body}"
    );
    let red = bob
        .ok(
            Method::PUT,
            &format!("/_matrix/client/v3/rooms/{r}/redact/{}/r2", enc(&mine)),
            Some(json!({ "reason": "typo" })),
        )
        .await;
    let redaction_id = red["event_id"].as_str().unwrap();
    let again = bob
        .ok(
            Method::PUT,
            &format!("/_matrix/client/v3/rooms/{r}/redact/{}/r2", enc(&mine)),
            Some(json!({ "reason": "typo" })),
        )
        .await;
    assert_eq!(
        again["event_id"], redaction_id,
        "redactions are idempotent per transaction"
    );
    let e = alice
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{r}/event/{}", enc(&mine)),
            None,
        )
        .await;
    assert_eq!(e["content"], json!({}));
    assert_eq!(e["unsigned"]["redacted_because"]["event_id"], redaction_id);
    assert_eq!(
        e["unsigned"]["redacted_because"]["content"]["reason"],
        "typo"
    );
    let redaction = alice
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{r}/event/{}", enc(redaction_id)),
            None,
        )
        .await;
    assert_eq!(redaction["redacts"], mine.as_str());
    assert_eq!(
        redaction["content"]["redacts"],
        mine.as_str(),
        "room v11+ keeps redacts in the content"
    );
    // History pages show the redacted event and the redaction as the event endpoint
    // does: the redacted one is read from its redacted PDU from now on.
    let page = alice
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{r}/messages?dir=b&limit=5"),
            None,
        )
        .await;
    let chunk = page["chunk"].as_array().unwrap();
    for (id, single) in [(mine.as_str(), &e), (redaction_id, &redaction)] {
        let mut paged = chunk
            .iter()
            .find(|c| c["event_id"] == id)
            .unwrap_or_else(|| panic!("{id} is not in {page}"))
            .clone();
        let mut single = single.clone();
        for v in [&mut paged, &mut single] {
            v["unsigned"].as_object_mut().unwrap().remove("age");
            if let Some(because) = v["unsigned"].get_mut("redacted_because") {
                because["unsigned"].as_object_mut().unwrap().remove("age");
            }
        }
        assert_eq!(paged, single);
    }
    // A moderator may redact anyone's events.
    alice
        .ok(
            Method::PUT,
            &format!("/_matrix/client/v3/rooms/{r}/redact/{}/r3", enc(&theirs)),
            Some(json!({})),
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aliases_directory_and_user_search() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let room = alice.create_room(json!({ "name": "Press office" })).await;
    let a = enc("#press:localhost");
    let (status, _) = bob
        .put(
            &format!("/_matrix/client/v3/directory/room/{a}"),
            json!({ "room_id": room }),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "only members may alias a room"
    );
    alice
        .ok(
            Method::PUT,
            &format!("/_matrix/client/v3/directory/room/{a}"),
            Some(json!({ "room_id": room })),
        )
        .await;
    let (status, _) = alice
        .put(
            &format!("/_matrix/client/v3/directory/room/{a}"),
            json!({ "room_id": room }),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, body) = alice
        .put(
            &format!(
                "/_matrix/client/v3/directory/room/{}",
                enc("#x:elsewhere.org")
            ),
            json!({ "room_id": room }),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_INVALID_PARAM")
    );
    let aliases = alice
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{}/aliases", enc(&room)),
            None,
        )
        .await;
    assert_eq!(aliases["aliases"], json!(["#press:localhost"]));
    let (status, _) = bob
        .delete(&format!("/_matrix/client/v3/directory/room/{a}"))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    alice
        .ok(
            Method::DELETE,
            &format!("/_matrix/client/v3/directory/room/{a}"),
            None,
        )
        .await;
    let (status, body) = bob
        .get(&format!("/_matrix/client/v3/directory/room/{a}"))
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::NOT_FOUND, "M_NOT_FOUND")
    );

    // Publishing to the directory, searching it, paginating it.
    let v = alice
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/directory/list/room/{}", enc(&room)),
            None,
        )
        .await;
    assert_eq!(v["visibility"], "private");
    alice
        .ok(
            Method::PUT,
            &format!("/_matrix/client/v3/directory/list/room/{}", enc(&room)),
            Some(json!({ "visibility": "public" })),
        )
        .await;
    for i in 0..3 {
        alice
            .create_room(json!({ "visibility": "public", "name": format!("Team {i}") }))
            .await;
    }
    let found = bob
        .ok(
            Method::POST,
            "/_matrix/client/v3/publicRooms",
            Some(json!({ "filter": { "generic_search_term": "press" } })),
        )
        .await;
    assert_eq!(found["chunk"].as_array().unwrap().len(), 1);
    assert_eq!(found["chunk"][0]["name"], "Press office");
    let page1 = bob
        .ok(Method::GET, "/_matrix/client/v3/publicRooms?limit=3", None)
        .await;
    assert_eq!(page1["total_room_count_estimate"], 4);
    let next = page1["next_batch"].as_str().unwrap();
    let page2 = bob
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/publicRooms?limit=3&since={next}"),
            None,
        )
        .await;
    assert_eq!(page2["chunk"].as_array().unwrap().len(), 1);
    assert!(page2.get("next_batch").is_none_or(Value::is_null));

    // The user directory: people who share a room or sit in public rooms.
    let carol = server.user("carol").await;
    let found = carol
        .ok(
            Method::POST,
            "/_matrix/client/v3/user_directory/search",
            Some(json!({ "search_term": "ali" })),
        )
        .await;
    assert_eq!(found["results"][0]["user_id"], alice.user_id.as_str());
    let found = carol
        .ok(
            Method::POST,
            "/_matrix/client/v3/user_directory/search",
            Some(json!({ "search_term": "bob" })),
        )
        .await;
    assert_eq!(
        found["results"],
        json!([]),
        "bob shares no room with carol and is in no public room"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_upgrade_moves_the_room_on() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let old = alice.create_room(json!({ "room_version": "11", "preset": "public_chat", "name": "Legacy", "room_alias_name": "legacy" })).await;
    bob.join(&old).await;
    let (status, _) = bob
        .post(
            &format!("/_matrix/client/v3/rooms/{}/upgrade", enc(&old)),
            json!({ "new_version": "12" }),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let body = alice
        .ok(
            Method::POST,
            &format!("/_matrix/client/v3/rooms/{}/upgrade", enc(&old)),
            Some(json!({ "new_version": "12" })),
        )
        .await;
    let new = body["replacement_room"].as_str().unwrap();
    let (_, tomb) = alice.state(&old, "m.room.tombstone", "").await;
    assert_eq!(tomb["replacement_room"], new);
    let (_, create) = alice.state(new, "m.room.create", "").await;
    assert_eq!(create["room_version"], "12");
    assert_eq!(create["predecessor"]["room_id"], old.as_str());
    let (_, name) = alice.state(new, "m.room.name", "").await;
    assert_eq!(name["name"], "Legacy");
    let alias = bob
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/directory/room/{}",
                enc("#legacy:localhost")
            ),
            None,
        )
        .await;
    assert_eq!(alias["room_id"], new);
    // The alias moved: it is listed for the new room and no longer for the old one.
    for (room, listed) in [
        (old.as_str(), json!([])),
        (new, json!(["#legacy:localhost"])),
    ] {
        let aliases = alice
            .ok(
                Method::GET,
                &format!("/_matrix/client/v3/rooms/{}/aliases", enc(room)),
                None,
            )
            .await;
        assert_eq!(aliases["aliases"], listed, "{room}");
    }
    let (status, _) = bob
        .put(
            &format!(
                "/_matrix/client/v3/rooms/{}/send/m.room.message/x",
                enc(&old)
            ),
            json!({ "msgtype": "m.text", "body": "hi" }),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "the old room is closed to talk"
    );
    let (status, body) = bob.join(new).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_rooms_created_at_once_get_distinct_ids() {
    // Version 12 room ids are the hash of the create event; identical requests in the
    // same millisecond must still make distinct rooms.
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let alice = alice.clone();
        tasks.push(tokio::spawn(
            async move { alice.create_room(json!({})).await },
        ));
    }
    let mut ids = std::collections::BTreeSet::new();
    for t in tasks {
        ids.insert(t.await.unwrap());
    }
    assert_eq!(ids.len(), 8);
}

/// A transaction id makes a retry idempotent within one room and endpoint; the same id
/// in another room, or on `/redact`, is a new request, and the local echo carries the
/// id the client chose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_ids_are_scoped_to_room_and_endpoint() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let first = alice.create_room(json!({})).await;
    let second = alice.create_room(json!({})).await;
    let a = alice.send_text(&first, "abc", "first").await;
    assert_eq!(alice.send_text(&first, "abc", "first").await, a);
    assert_eq!(
        alice.send_text(&first, "abc", "changed content").await,
        a,
        "a retry returns the original event even if its content changed"
    );
    let b = alice.send_text(&second, "abc", "first").await;
    assert_ne!(b, a, "the same id in another room is another event");

    let redaction = alice
        .ok(
            Method::PUT,
            &format!(
                "/_matrix/client/v3/rooms/{}/redact/{}/abc",
                enc(&first),
                enc(&a)
            ),
            Some(json!({})),
        )
        .await["event_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(redaction, a, "/redact and /send keep separate ids");
    let echo = alice
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/rooms/{}/event/{}",
                enc(&first),
                enc(&redaction)
            ),
            None,
        )
        .await;
    assert_eq!(echo["unsigned"]["transaction_id"], "abc");
}

/// Transaction ids belong to one client session: logging in again with the same device
/// id starts a new scope (the same id sends a new event), and only the session that
/// sent an event sees its transaction id in the local echo (Complement's
/// TestTxnIdempotencyScopedToClientSession and TestTxnScopeOnLocalEcho).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_ids_are_scoped_to_the_client_session() {
    let server = TestServer::start().await;
    let first = server.user("alice").await;
    let room = first.create_room(json!({})).await;
    let a = first
        .send_text(&room, "same-id", "from the first login")
        .await;

    let mut second = server.client();
    let (status, body) = second
        .post(
            "/_matrix/client/v3/login",
            json!({
                "type": "m.login.password",
                "identifier": { "type": "m.id.user", "user": "alice" },
                "password": "correct horse battery",
                "device_id": first.device_id,
            }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["device_id"], first.device_id.as_str(), "same device");
    second.token = Some(body["access_token"].as_str().unwrap().to_owned());
    second.user_id = first.user_id.clone();
    second.device_id = first.device_id.clone();

    let b = second
        .send_text(&room, "same-id", "from the second login")
        .await;
    assert_ne!(b, a, "a new login is a new scope: the id sends a new event");
    assert_eq!(
        second.send_text(&room, "same-id", "retry").await,
        b,
        "within the session the id still makes retries idempotent"
    );

    // The local echo: the sending session sees its transaction id, the other does not.
    let event = |id: &str| format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(id));
    let seen = second.ok(Method::GET, &event(&b), None).await;
    assert_eq!(seen["unsigned"]["transaction_id"], "same-id");
    let other = second.ok(Method::GET, &event(&a), None).await;
    assert!(
        other["unsigned"].get("transaction_id").is_none(),
        "another session's transaction id is not shown: {other}"
    );
    let (_, sync) = second.get("/_matrix/client/v3/sync").await;
    let timeline = sync["rooms"]["join"][&room]["timeline"]["events"]
        .as_array()
        .unwrap();
    let txn_of = |id: &str| {
        timeline
            .iter()
            .find(|e| e["event_id"] == id)
            .map(|e| e["unsigned"]["transaction_id"].clone())
    };
    assert_eq!(txn_of(&b), Some(json!("same-id")));
    assert_eq!(txn_of(&a), Some(serde_json::Value::Null));
}

/// Of rooms created at once with the same alias name, one gets the alias and the others
/// are told it is taken; the same for an alias given to two rooms at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alias_asked_for_at_once_goes_to_one_room() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let creations = (0..4).map(|_| {
        let alice = alice.clone();
        async move {
            alice
                .post(
                    "/_matrix/client/v3/createRoom",
                    json!({ "room_alias_name": "contested" }),
                )
                .await
        }
    });
    let created: Vec<String> = common::race(creations, "M_ROOM_IN_USE")
        .await
        .into_iter()
        .flatten()
        .map(|body| body["room_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(created.len(), 1, "{created:?}");
    let resolved = alice
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/directory/room/{}",
                enc("#contested:localhost")
            ),
            None,
        )
        .await;
    assert_eq!(resolved["room_id"], created[0].as_str());

    let rooms = [
        alice.create_room(json!({})).await,
        alice.create_room(json!({})).await,
    ];
    let path = format!(
        "/_matrix/client/v3/directory/room/{}",
        enc("#shared:localhost")
    );
    let puts = rooms.iter().map(|room| {
        let (alice, path, room) = (alice.clone(), path.clone(), room.clone());
        tokio::spawn(async move { alice.put(&path, json!({ "room_id": room })).await })
    });
    let mut given = Vec::new();
    for (room, put) in rooms.iter().zip(futures::future::join_all(puts).await) {
        let (status, body) = put.unwrap();
        if status == StatusCode::OK {
            given.push(room.clone());
        } else {
            assert_eq!(status, StatusCode::CONFLICT, "{body}");
        }
    }
    assert_eq!(given.len(), 1, "{given:?}");
    let resolved = alice.ok(Method::GET, &path, None).await;
    assert_eq!(resolved["room_id"], given[0].as_str());
}

/// A kick and a ban of the same member at once: when both succeed the ban came first
/// or last, and either way the member ends up banned; a kick never lifts a ban.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kick_at_the_same_time_as_a_ban_does_not_lift_it() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let room = alice.create_room(json!({ "preset": "public_chat" })).await;
    let r = enc(&room);
    let target = json!({ "user_id": bob.user_id, "reason": "spam" });
    for round in 0..12 {
        if round > 0 {
            alice
                .ok(
                    Method::POST,
                    &format!("/_matrix/client/v3/rooms/{r}/unban"),
                    Some(json!({ "user_id": bob.user_id })),
                )
                .await;
        }
        let (status, body) = bob.join(&room).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let (kick_path, ban_path) = (
            format!("/_matrix/client/v3/rooms/{r}/kick"),
            format!("/_matrix/client/v3/rooms/{r}/ban"),
        );
        let (kick, ban) = tokio::join!(
            alice.post(&kick_path, target.clone()),
            alice.post(&ban_path, target.clone()),
        );
        assert_eq!(ban.0, StatusCode::OK, "{}", ban.1);
        if kick.0 != StatusCode::OK {
            assert_eq!(errcode(&kick.1), "M_FORBIDDEN", "{}", kick.1);
        }
        let (status, member) = alice.state(&room, "m.room.member", &bob.user_id).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(member["membership"], "ban", "round {round}");
    }
}

/// Two upgrades of one room asked for at once (a second click) make one replacement:
/// the other is refused, and the tombstone names the room that was made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_upgrades_at_once_make_one_replacement() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let old = alice.create_room(json!({ "room_version": "10" })).await;
    let path = format!("/_matrix/client/v3/rooms/{}/upgrade", enc(&old));
    let upgrades = (0..2).map(|_| {
        let (alice, path) = (alice.clone(), path.clone());
        async move { alice.post(&path, json!({ "new_version": "11" })).await }
    });
    let made: Vec<String> = common::race(upgrades, "M_UNKNOWN")
        .await
        .into_iter()
        .flatten()
        .map(|body| body["replacement_room"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(made.len(), 1, "{made:?}");
    let (status, tombstone) = alice.state(&old, "m.room.tombstone", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(tombstone["replacement_room"], made[0].as_str());
}
