//! Push rules: server defaults, edits, and their `m.push_rules` account data.

mod common;

use common::{TestServer, errcode};
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_rules_start_from_the_defaults_and_can_be_edited() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let all = alice
        .ok(Method::GET, "/_matrix/client/v3/pushrules/", None)
        .await;
    let overrides: Vec<&str> = all["global"]["override"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["rule_id"].as_str().unwrap())
        .collect();
    assert!(
        overrides.contains(&".m.rule.master") && overrides.contains(&".m.rule.suppress_notices"),
        "{overrides:?}"
    );
    let underride: Vec<&str> = all["global"]["underride"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["rule_id"].as_str().unwrap())
        .collect();
    assert!(underride.contains(&".m.rule.message"), "{underride:?}");

    // A keyword rule, before nothing in particular.
    alice
        .ok(
            Method::PUT,
            "/_matrix/client/v3/pushrules/global/content/budget",
            Some(
                json!({ "pattern": "budget", "actions": ["notify", { "set_tweak": "highlight" }] }),
            ),
        )
        .await;
    let rule = alice
        .ok(
            Method::GET,
            "/_matrix/client/v3/pushrules/global/content/budget",
            None,
        )
        .await;
    assert_eq!(rule["pattern"], "budget");
    assert_eq!(rule["enabled"], true);
    alice
        .ok(
            Method::PUT,
            "/_matrix/client/v3/pushrules/global/content/budget/enabled",
            Some(json!({ "enabled": false })),
        )
        .await;
    let enabled = alice
        .ok(
            Method::GET,
            "/_matrix/client/v3/pushrules/global/content/budget/enabled",
            None,
        )
        .await;
    assert_eq!(enabled["enabled"], false);
    alice
        .ok(
            Method::PUT,
            "/_matrix/client/v3/pushrules/global/content/budget/actions",
            Some(json!({ "actions": [] })),
        )
        .await;
    let actions = alice
        .ok(
            Method::GET,
            "/_matrix/client/v3/pushrules/global/content/budget/actions",
            None,
        )
        .await;
    assert_eq!(actions["actions"], json!([]));

    // Server-default rules can be switched off but not deleted or replaced.
    alice
        .ok(
            Method::PUT,
            "/_matrix/client/v3/pushrules/global/override/.m.rule.master/enabled",
            Some(json!({ "enabled": true })),
        )
        .await;
    let (status, body) = alice
        .delete("/_matrix/client/v3/pushrules/global/override/.m.rule.master")
        .await;
    assert!(status.is_client_error(), "{body}");
    let (status, body) = alice
        .put(
            "/_matrix/client/v3/pushrules/global/override/.m.rule.custom",
            json!({ "actions": [] }),
        )
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::BAD_REQUEST, "M_BAD_JSON"),
        "{body}"
    );
    let (status, body) = alice
        .get("/_matrix/client/v3/pushrules/global/content/nope")
        .await;
    assert_eq!(
        (status, errcode(&body)),
        (StatusCode::NOT_FOUND, "M_NOT_FOUND")
    );

    // The rules travel as account data through sync, edits included.
    let sync = alice
        .ok(Method::GET, "/_matrix/client/v3/sync?timeout=0", None)
        .await;
    let rules = sync["account_data"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "m.push_rules")
        .cloned()
        .expect("m.push_rules in sync");
    let content: Vec<&str> = rules["content"]["global"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["rule_id"].as_str().unwrap())
        .collect();
    assert!(content.contains(&"budget"));
    let master = rules["content"]["global"]["override"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rule_id"] == ".m.rule.master")
        .unwrap()
        .clone();
    assert_eq!(master["enabled"], true);

    alice
        .ok(
            Method::DELETE,
            "/_matrix/client/v3/pushrules/global/content/budget",
            None,
        )
        .await;
    let (status, _) = alice
        .get("/_matrix/client/v3/pushrules/global/content/budget")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // A new user gets the defaults in the initial sync without having stored anything.
    let bob = server.user("bob").await;
    let sync = bob
        .ok(Method::GET, "/_matrix/client/v3/sync?timeout=0", None)
        .await;
    assert!(
        sync["account_data"]["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "m.push_rules")
    );
}

/// Edits made at once, from several devices, all take effect: none is lost to
/// another's save, and each is read back from the cache the rules are kept in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_rule_edits_made_at_once_are_all_kept() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    for round in 0..3 {
        let edits = (0..12).map(|i| {
            let alice = alice.clone();
            tokio::spawn(async move {
                let word = format!("word{round}x{i}");
                let (status, body) = alice
                    .put(
                        &format!("/_matrix/client/v3/pushrules/global/content/{word}"),
                        json!({ "pattern": word, "actions": ["notify"] }),
                    )
                    .await;
                assert_eq!(status, StatusCode::OK, "{body}");
                // Read meanwhile, as a send evaluating the rules would.
                alice
                    .ok(Method::GET, "/_matrix/client/v3/pushrules/", None)
                    .await;
            })
        });
        for edit in futures::future::join_all(edits).await {
            edit.unwrap();
        }
        let all = alice
            .ok(Method::GET, "/_matrix/client/v3/pushrules/", None)
            .await;
        let content: Vec<&str> = all["global"]["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["rule_id"].as_str().unwrap())
            .collect();
        for r in 0..=round {
            for i in 0..12 {
                let word = format!("word{r}x{i}");
                assert!(content.contains(&word.as_str()), "{word} lost: {content:?}");
            }
        }
    }
}

// --- evaluation, counts, /notifications, pushers ---

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{Client, enc};
use serde_json::Value;

async fn sync_once(c: &Client, since: Option<&str>, filter: Option<&str>) -> Value {
    let mut path = "/_matrix/client/v3/sync?timeout=0".to_owned();
    if let Some(s) = since {
        path.push_str(&format!("&since={}", enc(s)));
    }
    if let Some(f) = filter {
        path.push_str(&format!("&filter={}", enc(f)));
    }
    c.ok(Method::GET, &path, None).await
}

async fn send(c: &Client, room: &str, txn: &str, content: Value) -> String {
    c.ok(
        Method::PUT,
        &format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}",
            enc(room)
        ),
        Some(content),
    )
    .await["event_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Alice and bob in a room; returns the room id.
async fn shared_room(alice: &Client, bob: &Client) -> String {
    let room = alice.create_room(json!({ "preset": "public_chat" })).await;
    let (status, _) = bob.join(&room).await;
    assert_eq!(status, StatusCode::OK);
    room
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_follow_the_push_rules_and_the_read_receipt() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let room = shared_room(&alice, &bob).await;

    send(
        &bob,
        &room,
        "1",
        json!({ "msgtype": "m.text", "body": "hello" }),
    )
    .await;
    let second = send(
        &bob,
        &room,
        "2",
        json!({ "msgtype": "m.text", "body": "alice, look", "m.mentions": { "user_ids": [alice.user_id] } }),
    )
    .await;
    // Notices do not notify (.m.rule.suppress_notices).
    send(
        &bob,
        &room,
        "3",
        json!({ "msgtype": "m.notice", "body": "bot noise" }),
    )
    .await;
    send(
        &bob,
        &room,
        "4",
        json!({ "msgtype": "m.text", "body": "and more" }),
    )
    .await;
    // Alice's own messages never count for her.
    send(
        &alice,
        &room,
        "5",
        json!({ "msgtype": "m.text", "body": "mine" }),
    )
    .await;

    let s = sync_once(&alice, None, None).await;
    let counts = &s["rooms"]["join"][&room]["unread_notifications"];
    assert_eq!(counts["notification_count"], 3, "{counts}");
    assert_eq!(counts["highlight_count"], 1, "{counts}");
    // Bob's counts: alice's one message.
    let b = sync_once(&bob, None, None).await;
    assert_eq!(
        b["rooms"]["join"][&room]["unread_notifications"]["notification_count"],
        1
    );

    // A read receipt on the mention leaves only the last message.
    alice
        .ok(
            Method::POST,
            &format!(
                "/_matrix/client/v3/rooms/{}/receipt/m.read/{}",
                enc(&room),
                enc(&second)
            ),
            Some(json!({})),
        )
        .await;
    let s2 = sync_once(&alice, Some(s["next_batch"].as_str().unwrap()), None).await;
    let counts = &s2["rooms"]["join"][&room]["unread_notifications"];
    assert_eq!(
        (
            counts["notification_count"].as_u64(),
            counts["highlight_count"].as_u64()
        ),
        (Some(1), Some(0)),
        "{counts}"
    );

    // A profile change re-issues alice's member event: her stay in the room, and her
    // unread count, go on.
    alice
        .ok(
            Method::PUT,
            &format!(
                "/_matrix/client/v3/profile/{}/displayname",
                enc(&alice.user_id)
            ),
            Some(json!({ "displayname": "Alice Renamed" })),
        )
        .await;
    let s2b = sync_once(&alice, None, None).await;
    assert_eq!(
        s2b["rooms"]["join"][&room]["unread_notifications"]["notification_count"],
        1
    );

    // /notifications: newest first, with what is read, and only highlights on request.
    let n = alice
        .ok(Method::GET, "/_matrix/client/v3/notifications", None)
        .await;
    let list = n["notifications"].as_array().unwrap();
    let bodies: Vec<&str> = list
        .iter()
        .map(|x| x["event"]["content"]["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, vec!["and more", "alice, look", "hello"]);
    let read: Vec<bool> = list.iter().map(|x| x["read"].as_bool().unwrap()).collect();
    assert_eq!(read, vec![false, true, true]);
    assert_eq!(list[0]["room_id"], room.as_str());
    let h = alice
        .ok(
            Method::GET,
            "/_matrix/client/v3/notifications?only=highlight",
            None,
        )
        .await;
    assert_eq!(h["notifications"].as_array().unwrap().len(), 1);
    // Paging with next_token.
    let p1 = alice
        .ok(
            Method::GET,
            "/_matrix/client/v3/notifications?limit=2",
            None,
        )
        .await;
    assert_eq!(p1["notifications"].as_array().unwrap().len(), 2);
    let token = p1["next_token"].as_str().expect("a next page");
    let p2 = alice
        .ok(
            Method::GET,
            &format!("/_matrix/client/v3/notifications?limit=2&from={token}"),
            None,
        )
        .await;
    assert_eq!(p2["notifications"][0]["event"]["content"]["body"], "hello");

    // A keyword rule of alice's makes a word a highlight from now on.
    alice
        .ok(
            Method::PUT,
            "/_matrix/client/v3/pushrules/global/content/budget",
            Some(
                json!({ "pattern": "budget", "actions": ["notify", { "set_tweak": "highlight" }] }),
            ),
        )
        .await;
    send(
        &bob,
        &room,
        "6",
        json!({ "msgtype": "m.text", "body": "the budget is due" }),
    )
    .await;
    let s3 = sync_once(&alice, Some(s2["next_batch"].as_str().unwrap()), None).await;
    assert_eq!(
        s3["rooms"]["join"][&room]["unread_notifications"]["highlight_count"],
        1
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thread_notifications_are_counted_apart_when_asked() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let room = shared_room(&alice, &bob).await;
    let root = send(
        &bob,
        &room,
        "r",
        json!({ "msgtype": "m.text", "body": "root" }),
    )
    .await;
    for i in 0..2 {
        send(
            &bob,
            &room,
            &format!("t{i}"),
            json!({ "msgtype": "m.text", "body": format!("in thread {i}"),
                    "m.relates_to": { "rel_type": "m.thread", "event_id": root } }),
        )
        .await;
    }
    let filter = r#"{"room":{"timeline":{"unread_thread_notifications":true}}}"#;
    let s = sync_once(&alice, None, Some(filter)).await;
    let joined = &s["rooms"]["join"][&room];
    assert_eq!(
        joined["unread_notifications"]["notification_count"], 1,
        "{joined}"
    );
    assert_eq!(
        joined["unread_thread_notifications"][&root]["notification_count"], 2,
        "{joined}"
    );
    // Without the flag everything counts together.
    let s = sync_once(&alice, None, None).await;
    assert_eq!(
        s["rooms"]["join"][&room]["unread_notifications"]["notification_count"],
        3
    );
    server.stop().await;
}

/// A push gateway on loopback that records what it gets and answers with the given
/// statuses in turn (then 200).
struct Gateway {
    url: String,
    got: Arc<Mutex<Vec<Value>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

async fn gateway(statuses: Vec<u16>, rejected: Vec<String>) -> Gateway {
    use axum::{Json, Router, extract::State, http::StatusCode as S, routing::post};
    type Shared = (Arc<Mutex<Vec<Value>>>, Arc<Mutex<Vec<u16>>>, Vec<String>);
    let got = Arc::new(Mutex::new(Vec::new()));
    let shared: Shared = (got.clone(), Arc::new(Mutex::new(statuses)), rejected);
    let app = Router::new()
        .route(
            "/_matrix/push/v1/notify",
            post(|State((got, statuses, rejected)): State<Shared>, Json(body): Json<Value>| async move {
                got.lock().unwrap().push(body);
                let mut st = statuses.lock().unwrap();
                let code = if st.is_empty() { 200 } else { st.remove(0) };
                (S::from_u16(code).unwrap(), Json(json!({ "rejected": rejected })))
            }),
        )
        .with_state(shared);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/_matrix/push/v1/notify",
        listener.local_addr().unwrap()
    );
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    Gateway {
        url,
        got,
        stop: Some(tx),
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

async fn set_pusher(c: &Client, url: &str, pushkey: &str) -> (StatusCode, Value) {
    c.post(
        "/_matrix/client/v3/pushers/set",
        json!({
            "kind": "http", "app_id": "org.salon.test", "pushkey": pushkey,
            "app_display_name": "Salon test", "device_display_name": "phone", "lang": "en",
            "data": { "url": url, "extra": "kept" },
        }),
    )
    .await
}

async fn wait_for(got: &Arc<Mutex<Vec<Value>>>, n: usize, within: Duration) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let v = got.lock().unwrap().clone();
        if v.len() >= n || tokio::time::Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mention_reaches_the_push_gateway_and_failures_are_retried() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let room = shared_room(&alice, &bob).await;
    // The gateway fails the first try.
    let gw = gateway(vec![503], vec![]).await;
    let (status, v) = set_pusher(&alice, &gw.url, "alice-phone").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let pushers = alice
        .ok(Method::GET, "/_matrix/client/v3/pushers", None)
        .await;
    assert_eq!(pushers["pushers"][0]["pushkey"], "alice-phone");
    assert_eq!(pushers["pushers"][0]["data"]["url"], gw.url.as_str());

    let event = send(
        &bob,
        &room,
        "m1",
        json!({ "msgtype": "m.text", "body": "@alice standup?", "m.mentions": { "user_ids": [alice.user_id] } }),
    )
    .await;
    let got = wait_for(&gw.got, 2, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 2, "one failed try, one retry: {got:?}");
    assert_eq!(got[0], got[1], "the retry carries the same notification");
    let n = &got[1]["notification"];
    assert_eq!(n["event_id"], event.as_str());
    assert_eq!(n["room_id"], room.as_str());
    assert_eq!(n["type"], "m.room.message");
    assert_eq!(n["sender"], bob.user_id.as_str());
    assert_eq!(n["content"]["body"], "@alice standup?");
    assert_eq!(n["counts"]["unread"], 1);
    assert_eq!(n["prio"], "high");
    let device = &n["devices"][0];
    assert_eq!(device["pushkey"], "alice-phone");
    assert_eq!(device["app_id"], "org.salon.test");
    assert_eq!(device["data"]["extra"], "kept");
    assert!(device["data"].get("url").is_none());
    assert_eq!(device["tweaks"]["highlight"], true);
    assert_eq!(device["tweaks"]["sound"], "default");

    // Bob sent it: nothing for bob (he has no pusher anyway); a plain message to alice
    // notifies without highlight.
    send(
        &bob,
        &room,
        "m2",
        json!({ "msgtype": "m.text", "body": "plain" }),
    )
    .await;
    let got = wait_for(&gw.got, 3, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 3);
    assert!(
        got[2]["notification"]["devices"][0]["tweaks"]
            .get("highlight")
            .is_none()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_push_keys_lose_their_pusher_and_logout_removes_pushers() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let room = shared_room(&alice, &bob).await;
    let gw = gateway(vec![], vec!["stale-key".to_owned()]).await;
    set_pusher(&alice, &gw.url, "stale-key").await;
    send(
        &bob,
        &room,
        "x",
        json!({ "msgtype": "m.text", "body": "hi" }),
    )
    .await;
    wait_for(&gw.got, 1, Duration::from_secs(10)).await;
    let mut gone = false;
    for _ in 0..100 {
        let p = alice
            .ok(Method::GET, "/_matrix/client/v3/pushers", None)
            .await;
        if p["pushers"].as_array().unwrap().is_empty() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "the rejected pusher was removed");

    // Bad gateway URLs are refused.
    for url in [
        "http://gateway.example.com/_matrix/push/v1/notify",
        "https://gateway.example.com/notify",
        "ftp://gateway.example.com/_matrix/push/v1/notify",
    ] {
        let (status, v) = set_pusher(&alice, url, "k").await;
        assert_eq!(
            (status, errcode(&v)),
            (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"),
            "{url}"
        );
    }

    // A device's pushers go when it logs out.
    set_pusher(&alice, &gw.url, "fresh-key").await;
    alice
        .ok(Method::POST, "/_matrix/client/v3/logout", Some(json!({})))
        .await;
    let mut relog = server.client();
    let v = relog
        .ok(
            Method::POST,
            "/_matrix/client/v3/login",
            Some(json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "alice" }, "password": "correct horse battery" })),
        )
        .await;
    relog.token = Some(v["access_token"].as_str().unwrap().to_owned());
    let p = relog
        .ok(Method::GET, "/_matrix/client/v3/pushers", None)
        .await;
    assert_eq!(p["pushers"], json!([]));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_pushes_survive_a_restart_while_the_gateway_is_down() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let room = shared_room(&alice, &bob).await;
    // A gateway address with nobody listening.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}/_matrix/push/v1/notify");
    set_pusher(&alice, &url, "k1").await;
    let event = send(
        &bob,
        &room,
        "d",
        json!({ "msgtype": "m.text", "body": "while you were out" }),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dir = server.stop().await;

    // The gateway comes up on that address, then Salon restarts.
    use axum::{Json, Router, routing::post};
    let got = Arc::new(Mutex::new(Vec::<Value>::new()));
    let g = got.clone();
    let app = Router::new().route(
        "/_matrix/push/v1/notify",
        post(move |Json(body): Json<Value>| {
            let g = g.clone();
            async move {
                g.lock().unwrap().push(body);
                Json(json!({ "rejected": [] }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let gw = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let server = TestServer::start_in(dir, &[]).await;
    let got = wait_for(&got, 1, Duration::from_secs(15)).await;
    assert_eq!(
        got.len(),
        1,
        "the notification queued before the restart arrives"
    );
    assert_eq!(got[0]["notification"]["event_id"], event.as_str());
    server.stop().await;
    gw.abort();
}

/// A pusher that a device sets while it logs out does not outlive it: either it was
/// set first and goes with the device, or it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pusher_set_while_its_device_logs_out_goes_with_it() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let url = "https://push.example.org/_matrix/push/v1/notify";
    for round in 0..10 {
        let mut phone = alice.clone();
        let (status, body) = server
            .client()
            .post(
                "/_matrix/client/v3/login",
                json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "alice" }, "password": "correct horse battery" }),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        phone.token = Some(body["access_token"].as_str().unwrap().to_owned());
        let pushkey = format!("key{round}");
        let (logout, set) = tokio::join!(
            phone.post("/_matrix/client/v3/logout", json!({})),
            set_pusher(&phone, url, &pushkey),
        );
        assert_eq!(logout.0, StatusCode::OK, "{}", logout.1);
        if set.0 != StatusCode::OK {
            assert_eq!(errcode(&set.1), "M_UNKNOWN_TOKEN", "{}", set.1);
        }
        let pushers = alice
            .ok(Method::GET, "/_matrix/client/v3/pushers", None)
            .await;
        assert!(
            !pushers["pushers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["pushkey"] == pushkey.as_str()),
            "round {round}: {pushers}"
        );
    }
}
