//! `/sync`: contents for joins, leaves, invites, kicks, state inside and outside the
//! timeline, gaps, lazy loading; long-poll wake-ups; ephemeral data.

mod common;

use std::time::{Duration, Instant};

use common::{Client, TestServer, enc, errcode};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

async fn sync(c: &Client, since: Option<&str>, extra: &str) -> Value {
    let mut q = String::from("timeout=0");
    if let Some(s) = since {
        q.push_str(&format!("&since={s}"));
    }
    if !extra.is_empty() {
        q.push('&');
        q.push_str(extra);
    }
    c.ok(Method::GET, &format!("/_matrix/client/v3/sync?{q}"), None)
        .await
}

fn bodies(room: &Value) -> Vec<String> {
    room["timeline"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect()
}

fn state_types(room: &Value) -> Vec<String> {
    let mut t: Vec<String> = room["state"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect();
    t.sort();
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_and_incremental_sync_of_a_joined_room() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let room = alice
        .create_room(json!({ "preset": "public_chat", "name": "Sync room" }))
        .await;
    bob.join(&room).await;
    for i in 0..15 {
        alice
            .send_text(&room, &format!("m{i}"), &format!("message {i}"))
            .await;
    }

    let first = sync(&bob, None, "").await;
    let next = first["next_batch"].as_str().unwrap().to_owned();
    let r = &first["rooms"]["join"][&room];
    assert_eq!(
        r["timeline"]["limited"], true,
        "15 messages do not fit the default 10"
    );
    assert_eq!(
        bodies(r),
        (5..15).map(|i| format!("message {i}")).collect::<Vec<_>>()
    );
    let st = state_types(r);
    for t in [
        "m.room.create",
        "m.room.join_rules",
        "m.room.member",
        "m.room.name",
        "m.room.power_levels",
    ] {
        assert!(st.contains(&t.to_owned()), "initial state has {t}: {st:?}");
    }
    assert!(
        r["timeline"]["events"][0].get("room_id").is_none(),
        "sync events omit room_id"
    );
    assert_eq!(r["summary"]["m.joined_member_count"], 2);
    assert_eq!(r["summary"]["m.heroes"], json!([alice.user_id]));
    assert_eq!(r["unread_notifications"]["notification_count"], 15);

    // prev_batch continues into /messages exactly where the timeline starts.
    let prev = r["timeline"]["prev_batch"].as_str().unwrap();
    let page = bob
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=5&from={prev}",
                enc(&room)
            ),
            None,
        )
        .await;
    let older: Vec<&str> = page["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["content"]["body"].as_str())
        .collect();
    assert_eq!(
        older,
        [
            "message 4",
            "message 3",
            "message 2",
            "message 1",
            "message 0"
        ]
    );

    // Nothing new: empty incremental sync, same position.
    let idle = sync(&bob, Some(&next), "").await;
    assert!(
        idle["rooms"]["join"].as_object().unwrap().is_empty(),
        "{idle}"
    );

    // One new message and a state change: incremental sync carries just those, unlimited.
    alice.send_text(&room, "n1", "fresh").await;
    alice
        .ok(
            Method::PUT,
            &format!(
                "/_matrix/client/v3/rooms/{}/state/m.room.topic/",
                enc(&room)
            ),
            Some(json!({ "topic": "new topic" })),
        )
        .await;
    let inc = sync(&bob, Some(&next), "").await;
    let r = &inc["rooms"]["join"][&room];
    assert_eq!(r["timeline"]["limited"], false);
    let types: Vec<&str> = r["timeline"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["m.room.message", "m.room.topic"]);
    assert!(
        r["state"]["events"].as_array().unwrap().is_empty(),
        "state inside the timeline is not repeated"
    );
    assert_eq!(r["unread_notifications"]["notification_count"], 16);

    // A gap: more events than the limit, including a state change outside the window.
    let next = inc["next_batch"].as_str().unwrap().to_owned();
    alice
        .ok(
            Method::PUT,
            &format!("/_matrix/client/v3/rooms/{}/state/m.room.name/", enc(&room)),
            Some(json!({ "name": "Renamed" })),
        )
        .await;
    for i in 0..12 {
        alice
            .send_text(&room, &format!("g{i}"), &format!("gap {i}"))
            .await;
    }
    let gap = sync(
        &bob,
        Some(&next),
        &format!("filter={}", enc(r#"{"room":{"timeline":{"limit":5}}}"#)),
    )
    .await;
    let r = &gap["rooms"]["join"][&room];
    assert_eq!(r["timeline"]["limited"], true);
    assert_eq!(bodies(r), ["gap 7", "gap 8", "gap 9", "gap 10", "gap 11"]);
    assert_eq!(
        state_types(r),
        ["m.room.name"],
        "the name change fell in the gap: {r}"
    );
    assert_eq!(r["state"]["events"][0]["content"]["name"], "Renamed");

    // Reading clears the unread count.
    let last = r["timeline"]["events"][4]["event_id"].as_str().unwrap();
    bob.ok(
        Method::POST,
        &format!(
            "/_matrix/client/v3/rooms/{}/receipt/m.read/{}",
            enc(&room),
            enc(last)
        ),
        Some(json!({})),
    )
    .await;
    let after_read = sync(&bob, Some(gap["next_batch"].as_str().unwrap()), "").await;
    let r = &after_read["rooms"]["join"][&room];
    assert_eq!(r["unread_notifications"]["notification_count"], 0);
    let receipt = r["ephemeral"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "m.receipt")
        .expect("receipt in ephemeral");
    assert!(
        receipt["content"][last]["m.read"][&bob.user_id]["ts"]
            .as_u64()
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invites_joins_leaves_and_kicks() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let room = alice
        .create_room(json!({ "name": "Private", "preset": "private_chat" }))
        .await;
    let start = sync(&bob, None, "").await;
    let mut since = start["next_batch"].as_str().unwrap().to_owned();
    assert!(start["rooms"]["invite"].as_object().unwrap().is_empty());

    alice
        .ok(
            Method::POST,
            &format!("/_matrix/client/v3/rooms/{}/invite", enc(&room)),
            Some(json!({ "user_id": bob.user_id })),
        )
        .await;
    let s = sync(&bob, Some(&since), "").await;
    let inv = &s["rooms"]["invite"][&room]["invite_state"]["events"];
    let kinds: Vec<&str> = inv
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"m.room.name") && kinds.contains(&"m.room.join_rules"),
        "{inv}"
    );
    let me = inv
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["state_key"] == bob.user_id.as_str())
        .unwrap();
    assert_eq!(me["content"]["membership"], "invite");
    assert_eq!(me["sender"], alice.user_id.as_str());
    since = s["next_batch"].as_str().unwrap().to_owned();
    // Alice's view of the members follows every change (counts from the room's
    // members as the commits keep them).
    let counts = |s: &Value| {
        let summary = &s["rooms"]["join"][&room]["summary"];
        (
            summary["m.joined_member_count"].clone(),
            summary["m.invited_member_count"].clone(),
        )
    };
    assert_eq!(counts(&sync(&alice, None, "").await), (json!(1), json!(1)));

    alice
        .send_text(&room, "before", "said before bob joined")
        .await;
    bob.join(&room).await;
    let s = sync(&bob, Some(&since), "").await;
    let j = &s["rooms"]["join"][&room];
    assert!(
        state_types(j).contains(&"m.room.create".to_owned()),
        "a new join gets the full state: {j}"
    );
    assert!(s["rooms"]["invite"].get(&room).is_none());
    since = s["next_batch"].as_str().unwrap().to_owned();
    assert_eq!(counts(&sync(&alice, None, "").await), (json!(2), json!(0)));

    alice
        .ok(
            Method::POST,
            &format!("/_matrix/client/v3/rooms/{}/kick", enc(&room)),
            Some(json!({ "user_id": bob.user_id, "reason": "bye" })),
        )
        .await;
    alice.send_text(&room, "after", "said after the kick").await;
    assert_eq!(counts(&sync(&alice, None, "").await), (json!(1), json!(0)));
    let s = sync(&bob, Some(&since), "").await;
    let l = &s["rooms"]["leave"][&room];
    let last = l["timeline"]["events"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["type"], "m.room.member");
    assert_eq!(last["content"]["membership"], "leave");
    assert_eq!(last["content"]["reason"], "bye");
    assert!(
        !bodies(l).contains(&"said after the kick".to_owned()),
        "nothing after the kick leaks"
    );
    assert!(s["rooms"]["join"].get(&room).is_none());
    since = s["next_batch"].as_str().unwrap().to_owned();
    let s = sync(&bob, Some(&since), "").await;
    assert!(
        s["rooms"]["leave"].get(&room).is_none(),
        "a leave is reported once"
    );

    // Initial sync shows left rooms only with include_leave.
    let s = sync(&bob, None, "").await;
    assert!(s["rooms"]["leave"].get(&room).is_none());
    let s = sync(
        &bob,
        None,
        &format!("filter={}", enc(r#"{"room":{"include_leave":true}}"#)),
    )
    .await;
    assert!(s["rooms"]["leave"].get(&room).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_loading_and_filters() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let room = alice.create_room(json!({ "preset": "public_chat" })).await;
    let mut members = Vec::new();
    for i in 0..6 {
        let m = server.user(&format!("member{i}")).await;
        m.join(&room).await;
        members.push(m);
    }
    members[2].send_text(&room, "x", "from member2").await;
    let lazy = enc(r#"{"room":{"timeline":{"limit":1},"state":{"lazy_load_members":true}}}"#);
    let s = sync(&alice, None, &format!("filter={lazy}")).await;
    let r = &s["rooms"]["join"][&room];
    let member_keys: Vec<&str> = r["state"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.member")
        .map(|e| e["state_key"].as_str().unwrap())
        .collect();
    let mut member_keys = member_keys;
    member_keys.sort();
    let mut expected = vec![alice.user_id.as_str(), members[2].user_id.as_str()];
    expected.sort();
    assert_eq!(
        member_keys, expected,
        "only the sender's and own member events"
    );
    assert_eq!(r["summary"]["m.joined_member_count"], 7);

    // Uploaded filters, room lists and type filters.
    let other = alice.create_room(json!({})).await;
    let f = alice
        .ok(
            Method::POST,
            &format!("/_matrix/client/v3/user/{}/filter", enc(&alice.user_id)),
            Some(
                json!({ "room": { "rooms": [other], "timeline": { "types": ["m.room.create"] } } }),
            ),
        )
        .await;
    let s = sync(
        &alice,
        None,
        &format!("filter={}", f["filter_id"].as_str().unwrap()),
    )
    .await;
    let joined = s["rooms"]["join"].as_object().unwrap();
    assert_eq!(joined.keys().collect::<Vec<_>>(), vec![&other]);
    let types: Vec<&str> = joined[&other]["timeline"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["m.room.create"]);

    let (status, body) = alice
        .get("/_matrix/client/v3/sync?filter=%7Bnot%20json")
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_BAD_JSON"),
        "{body}"
    );
    let (status, body) = alice
        .get("/_matrix/client/v3/sync?filter=nosuchfilter")
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_INVALID_PARAM")
    );
    let (status, body) = alice.get("/_matrix/client/v3/sync?since=garbage").await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_INVALID_PARAM")
    );
    let (status, body) = alice.get("/_matrix/client/v3/sync?since=s999999999").await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_INVALID_PARAM")
    );
    let s = sync(
        &alice,
        None,
        &format!("filter={}", enc(r#"{"room":{"timeline":{"limit":-5}}}"#)),
    )
    .await;
    assert!(
        s["next_batch"].is_string(),
        "a negative limit is clamped, not fatal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_wakes_on_send() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let room = alice.create_room(json!({ "preset": "public_chat" })).await;
    bob.join(&room).await;
    let since = sync(&bob, None, "").await["next_batch"]
        .as_str()
        .unwrap()
        .to_owned();

    let waiter = {
        let bob = bob.clone();
        let since = since.clone();
        tokio::spawn(async move {
            let v = bob
                .ok(
                    Method::GET,
                    &format!("/_matrix/client/v3/sync?timeout=20000&since={since}"),
                    None,
                )
                .await;
            (Instant::now(), v)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiter.is_finished(),
        "the long-poll waits while nothing happens"
    );
    alice.send_text(&room, "wake", "wake up").await;
    let sent = Instant::now();
    let (returned, v) = waiter.await.unwrap();
    let latency = returned.saturating_duration_since(sent);
    assert!(
        latency < Duration::from_millis(500),
        "woke after {latency:?}"
    );
    assert_eq!(bodies(&v["rooms"]["join"][&room]), ["wake up"]);

    // A timeout with nothing to say returns an empty sync at the same position.
    let start = Instant::now();
    let v = bob
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/sync?timeout=300&since={}",
                v["next_batch"].as_str().unwrap()
            ),
            None,
        )
        .await;
    assert!(start.elapsed() >= Duration::from_millis(290));
    assert!(v["rooms"]["join"].as_object().unwrap().is_empty());
}

/// Long-polls woken by one commit share the answer only with identical requests: each
/// filter and each device still gets its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_long_polls_share_an_answer_and_different_ones_do_not() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let room = alice.create_room(json!({ "preset": "public_chat" })).await;
    bob.join(&room).await;
    let since = sync(&bob, None, "").await["next_batch"]
        .as_str()
        .unwrap()
        .to_owned();
    let no_messages =
        enc(&json!({ "room": { "timeline": { "not_types": ["m.room.message"] } } }).to_string());
    let poll = |query: String| {
        let bob = bob.clone();
        tokio::spawn(async move {
            bob.ok(
                Method::GET,
                &format!("/_matrix/client/v3/sync?timeout=20000&{query}"),
                None,
            )
            .await
        })
    };
    let same: Vec<_> = (0..40).map(|_| poll(format!("since={since}"))).collect();
    let filtered: Vec<_> = (0..5)
        .map(|_| poll(format!("since={since}&filter={no_messages}")))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    alice.send_text(&room, "wake", "wake up").await;
    let mut answers = Vec::new();
    for w in same {
        let v = w.await.unwrap();
        assert_eq!(bodies(&v["rooms"]["join"][&room]), ["wake up"]);
        answers.push(v);
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        filtered.iter().all(|w| !w.is_finished()),
        "a filter that leaves the message out keeps waiting"
    );
    alice
        .ok(
            Method::PUT,
            &format!(
                "/_matrix/client/v3/rooms/{}/state/m.room.topic/",
                enc(&room)
            ),
            Some(json!({ "topic": "news" })),
        )
        .await;
    for w in filtered {
        let v = w.await.unwrap();
        let events = v["rooms"]["join"][&room]["timeline"]["events"]
            .as_array()
            .unwrap()
            .clone();
        assert!(events.iter().all(|e| e["type"] != "m.room.message"));
        assert!(events.iter().any(|e| e["type"] == "m.room.topic"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_account_data_presence_and_markers() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let room = alice.create_room(json!({ "preset": "public_chat" })).await;
    bob.join(&room).await;
    let since = sync(&bob, None, "").await["next_batch"]
        .as_str()
        .unwrap()
        .to_owned();

    alice
        .ok(
            Method::PUT,
            &format!(
                "/_matrix/client/v3/rooms/{}/typing/{}",
                enc(&room),
                enc(&alice.user_id)
            ),
            Some(json!({ "typing": true, "timeout": 400 })),
        )
        .await;
    let s = sync(&bob, Some(&since), "").await;
    let typing = s["rooms"]["join"][&room]["ephemeral"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "m.typing")
        .cloned()
        .unwrap();
    assert_eq!(typing["content"]["user_ids"], json!([alice.user_id]));
    // Typing expires server-side; the expiry wakes a waiting sync.
    let next = s["next_batch"].as_str().unwrap();
    let v = bob
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/sync?timeout=5000&since={next}"),
            None,
        )
        .await;
    let typing = v["rooms"]["join"][&room]["ephemeral"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "m.typing")
        .cloned()
        .unwrap();
    assert_eq!(typing["content"]["user_ids"], json!([]));
    let (status, _) = bob
        .put(
            &format!(
                "/_matrix/client/v3/rooms/{}/typing/{}",
                enc(&room),
                enc(&alice.user_id)
            ),
            json!({ "typing": true, "timeout": 1000 }),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Account data arrives through sync, global and per room.
    let since = v["next_batch"].as_str().unwrap().to_owned();
    bob.ok(
        Method::PUT,
        &format!(
            "/_matrix/client/v3/user/{}/account_data/m.direct",
            enc(&bob.user_id)
        ),
        Some(json!({ "@alice:localhost": [room] })),
    )
    .await;
    bob.ok(
        Method::PUT,
        &format!(
            "/_matrix/client/v3/user/{}/rooms/{}/tags/m.favourite",
            enc(&bob.user_id),
            enc(&room)
        ),
        Some(json!({})),
    )
    .await;
    let msg = alice.send_text(&room, "r", "read me").await;
    bob.ok(
        Method::POST,
        &format!("/_matrix/client/v3/rooms/{}/read_markers", enc(&room)),
        Some(json!({ "m.fully_read": msg, "m.read.private": msg })),
    )
    .await;
    let s = sync(&bob, Some(&since), "").await;
    assert_eq!(s["account_data"]["events"][0]["type"], "m.direct");
    let room_ad: Vec<&str> = s["rooms"]["join"][&room]["account_data"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert!(
        room_ad.contains(&"m.tag") && room_ad.contains(&"m.fully_read"),
        "{room_ad:?}"
    );
    assert_eq!(
        s["rooms"]["join"][&room]["unread_notifications"]["notification_count"], 0,
        "a private receipt also marks as read"
    );
    let a = sync(&alice, None, "").await;
    let receipts = a["rooms"]["join"][&room]["ephemeral"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "m.receipt")
        .cloned();
    assert!(
        receipts.is_none_or(|r| r["content"][&msg].get("m.read.private").is_none()),
        "private receipts stay private"
    );

    // Presence.
    alice
        .ok(
            Method::PUT,
            &format!("/_matrix/client/v3/presence/{}/status", enc(&alice.user_id)),
            Some(json!({ "presence": "unavailable", "status_msg": "in a meeting" })),
        )
        .await;
    let p = bob
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/presence/{}/status", enc(&alice.user_id)),
            None,
        )
        .await;
    assert_eq!(p["presence"], "unavailable");
    assert_eq!(p["status_msg"], "in a meeting");
    let s = sync(&bob, Some(s["next_batch"].as_str().unwrap()), "").await;
    let ev = s["presence"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["sender"] == alice.user_id.as_str())
        .cloned()
        .expect("presence event");
    assert_eq!(ev["content"]["status_msg"], "in a meeting");
    let carol = server.user("carol").await;
    let (status, _) = carol
        .get(&format!(
            "/_matrix/client/v3/presence/{}/status",
            enc(&alice.user_id)
        ))
        .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "presence is shared with people in common rooms only"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn context_and_timestamp_lookup() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let room = alice.create_room(json!({})).await;
    let mut ids = Vec::new();
    for i in 0..9 {
        ids.push(
            alice
                .send_text(&room, &format!("c{i}"), &format!("ctx {i}"))
                .await,
        );
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let ctx = alice
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/rooms/{}/context/{}?limit=4",
                enc(&room),
                enc(&ids[4])
            ),
            None,
        )
        .await;
    assert_eq!(ctx["event"]["content"]["body"], "ctx 4");
    let before: Vec<&str> = ctx["events_before"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["content"]["body"].as_str().unwrap())
        .collect();
    let after: Vec<&str> = ctx["events_after"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["content"]["body"].as_str().unwrap())
        .collect();
    assert_eq!(before, ["ctx 3", "ctx 2"]);
    assert_eq!(after, ["ctx 5", "ctx 6"]);
    let page = alice
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/rooms/{}/messages?dir=f&limit=2&from={}",
                enc(&room),
                ctx["end"].as_str().unwrap()
            ),
            None,
        )
        .await;
    let next: Vec<&str> = page["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["content"]["body"].as_str().unwrap())
        .collect();
    assert_eq!(
        next,
        ["ctx 7", "ctx 8"],
        "the end token continues after the context"
    );

    let e6 = alice
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v3/rooms/{}/event/{}",
                enc(&room),
                enc(&ids[6])
            ),
            None,
        )
        .await;
    let ts = e6["origin_server_ts"].as_u64().unwrap();
    let found = alice
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v1/rooms/{}/timestamp_to_event?ts={ts}&dir=f",
                enc(&room)
            ),
            None,
        )
        .await;
    assert_eq!(found["event_id"], ids[6].as_str());
    let found = alice
        .ok(
            Method::GET,
            &format!(
                "/_matrix/client/v1/rooms/{}/timestamp_to_event?ts={}&dir=b",
                enc(&room),
                ts - 1
            ),
            None,
        )
        .await;
    assert_eq!(found["event_id"], ids[5].as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_paginate_back_exactly_once_in_order() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let room = alice.create_room(json!({ "preset": "public_chat" })).await;
    let writers: Vec<Client> = {
        let mut w = vec![alice.clone()];
        for i in 0..9 {
            let c = server.user(&format!("writer{i}")).await;
            c.join(&room).await;
            w.push(c);
        }
        w
    };
    // 10 writers × 1,000 messages, concurrently; each body names its writer and index.
    let mut tasks = Vec::new();
    for (w, c) in writers.iter().enumerate() {
        let (c, room) = (c.clone(), room.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..1000 {
                c.send_text(&room, &format!("t{w}-{i}"), &format!("{w}:{i}"))
                    .await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Page back through everything, 500 at a time.
    let mut seen: Vec<String> = Vec::new();
    let mut from: Option<String> = None;
    loop {
        let q = match &from {
            Some(f) => format!("dir=b&limit=500&from={f}"),
            None => "dir=b&limit=500".into(),
        };
        let page = alice
            .ok(
                Method::GET,
                &format!("/_matrix/client/v3/rooms/{}/messages?{q}", enc(&room)),
                None,
            )
            .await;
        for e in page["chunk"].as_array().unwrap() {
            if e["type"] == "m.room.message" {
                seen.push(e["content"]["body"].as_str().unwrap().to_owned());
            }
        }
        match page["end"].as_str() {
            Some(e) => from = Some(e.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 10_000, "every event exactly once");
    let unique: std::collections::HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), 10_000, "no event twice");
    // Newest first, and each writer's own messages in strictly decreasing order.
    for w in 0..10 {
        let mine: Vec<u32> = seen
            .iter()
            .filter_map(|b| b.strip_prefix(&format!("{w}:")))
            .map(|i| i.parse().unwrap())
            .collect();
        assert_eq!(mine.len(), 1000);
        assert!(
            mine.windows(2).all(|p| p[0] > p[1]),
            "writer {w} out of order"
        );
    }
}
