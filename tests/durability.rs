//! An acknowledged send survives `kill -9` of the server the next instant.

mod common;

use std::{
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{Client, enc};
use reqwest::{Method, StatusCode};
use serde_json::json;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the server; `prepared_log_mib` as `database.prepared_log_mib`.
fn spawn(dir: &std::path::Path, port: u16, prepared_log_mib: u32) -> Child {
    Command::new(env!("CARGO_BIN_EXE_salon"))
        .arg("serve")
        .env(
            "SALON_DATABASE__PREPARED_LOG_MIB",
            prepared_log_mib.to_string(),
        )
        .env("SALON_LISTEN", format!("127.0.0.1:{port}"))
        .env("SALON_DATA_DIR", dir)
        .env("SALON_SERVER_NAME", "localhost")
        .env("SALON_REGISTRATION__MODE", "open")
        .env("SALON_RATE_LIMITS__ENABLED", "false")
        .env("SALON_LOG__LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("salon binary starts")
}

async fn wait_ready(base: &str) {
    let http = reqwest::Client::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if let Ok(r) = http
            .get(format!("{base}/_matrix/client/versions"))
            .send()
            .await
            && r.status().is_success()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("server did not come up at {base}");
}

/// Which write-ahead log file the burst is written into.
#[derive(Clone, Copy, PartialEq)]
enum Log {
    /// A new file, growing with every write (no log prepared at start).
    Growing,
    /// A file reused after flushes of the memtables.
    ReusedAfterFlushes,
    /// The file prepared at start, full of filler records past the last write.
    Prepared,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_survive_kill_9() {
    burst_then_kill_9(Log::Growing).await;
}

/// The same, once the write-ahead log files are reused: after flushes, RocksDB
/// overwrites old log files in place, and a restart must replay only what the last
/// writes put there, never the old contents past them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_survive_kill_9_in_a_reused_log() {
    burst_then_kill_9(Log::ReusedAfterFlushes).await;
}

/// The same in the log file prepared at start (`database.prepared_log_mib`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_survive_kill_9_in_the_prepared_log() {
    burst_then_kill_9(Log::Prepared).await;
}

/// Whether RocksDB has started writing into a reused log file.
fn reusing_a_log(dir: &std::path::Path) -> bool {
    std::fs::read_to_string(dir.join("db").join("LOG")).is_ok_and(|log| log.contains("reusing log"))
}

/// Large messages until a log file is reused (tens of MiB: enough for every column
/// family to flush the oldest log).
async fn fill_until_a_log_is_reused(c: &Client, room: &str, dir: &std::path::Path) {
    let filler = "x".repeat(48 * 1024);
    for round in 0..30 {
        let mut tasks = Vec::new();
        for w in 0..10 {
            let (c, room, filler) = (c.clone(), room.to_owned(), filler.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..10 {
                    c.send_text(&room, &format!("fill-{round}-{w}-{i}"), &filler)
                        .await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        if reusing_a_log(dir) {
            return;
        }
    }
    panic!("no write-ahead log file was reused after 3,000 large messages");
}

async fn burst_then_kill_9(log: Log) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let prepared_log_mib = if log == Log::Prepared { 16 } else { 0 };
    let mut child = spawn(dir.path(), port, prepared_log_mib);
    wait_ready(&base).await;
    if log == Log::Prepared {
        let start = Instant::now();
        while !reusing_a_log(dir.path()) {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the prepared log was not taken up"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    let mut alice = Client {
        base: base.clone(),
        http: reqwest::Client::new(),
        token: None,
        user_id: String::new(),
        device_id: String::new(),
    };
    let body = alice
        .ok(Method::POST, "/_matrix/client/v3/register", Some(json!({ "username": "alice", "password": "correct horse battery", "auth": { "type": "m.login.dummy" } })))
        .await;
    alice.token = Some(body["access_token"].as_str().unwrap().to_owned());
    let room = alice.create_room(json!({ "name": "Durable" })).await;
    if log == Log::ReusedAfterFlushes {
        fill_until_a_log_is_reused(&alice, &room, dir.path()).await;
    }

    // Ten concurrent senders; the server is killed while they are sending.
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let mut tasks = Vec::new();
    for w in 0..10 {
        let (c, room, acked) = (alice.clone(), room.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..10_000 {
                let text = format!("worker {w} message {i}");
                let res = c
                    .http
                    .put(format!(
                        "{}/_matrix/client/v3/rooms/{}/send/m.room.message/w{w}-{i}",
                        c.base,
                        enc(&room)
                    ))
                    .bearer_auth(c.token.as_deref().unwrap())
                    .json(&json!({ "msgtype": "m.text", "body": text }))
                    .send()
                    .await;
                let Ok(res) = res else { break };
                if res.status() != StatusCode::OK {
                    break;
                }
                let Ok(body) = res.json::<serde_json::Value>().await else {
                    break;
                };
                acked
                    .lock()
                    .unwrap()
                    .push((body["event_id"].as_str().unwrap().to_owned(), text));
            }
        }));
    }
    // Let a burst build up, then kill without warning.
    let start = Instant::now();
    while acked.lock().unwrap().len() < 300 && start.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().expect("SIGKILL");
    child.wait().unwrap();
    for t in tasks {
        let _ = t.await;
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 300,
        "the burst was sent ({} acknowledged)",
        acked.len()
    );

    // Restart on the same data: every acknowledged event is there, with its content.
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut child = spawn(dir.path(), port, prepared_log_mib);
    wait_ready(&base).await;
    alice.base = base;
    for (event_id, text) in &acked {
        let (status, e) = alice
            .get(&format!(
                "/_matrix/client/v3/rooms/{}/event/{}",
                enc(&room),
                enc(event_id)
            ))
            .await;
        assert_eq!(
            status,
            StatusCode::OK,
            "acknowledged event {event_id} was lost"
        );
        assert_eq!(e["content"]["body"], text.as_str());
    }
    // The room still accepts events after the crash, on top of what survived.
    alice
        .send_text(&room, "after-restart", "after the crash")
        .await;
    let _ = child.kill();
    let _ = child.wait();
}

/// A new room's events are written before their signatures, which follow right after
/// the log sync in a write of their own. Should that write be lost (a crash before the
/// log's next sync), the events' marks have them signed again at the next start, to the
/// very bytes they would have had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_lost_in_a_crash_are_computed_again_at_start() {
    use ruma::{
        CanonicalJsonObject,
        signatures::{PublicKeyMap, PublicKeySet, verify_event},
    };
    use salon::storage::{Batch, Db};

    let server = common::TestServer::start().await;
    let alice = server.user("alice").await;
    alice
        .create_room(json!({ "name": "signed", "topic": "by this server" }))
        .await;
    let keys = server.client().get("/_matrix/key/v2/server").await.1;
    let dir = server.stop().await;

    let mut public = PublicKeySet::new();
    for (id, key) in keys["verify_keys"].as_object().unwrap() {
        let key = key["key"].as_str().unwrap();
        public.insert(id.clone(), ruma::serde::Base64::parse(key).unwrap());
    }
    let mut map = PublicKeyMap::new();
    map.insert("localhost".to_owned(), public);
    let rules = salon::config::Config::default()
        .rooms
        .default_version
        .rules()
        .unwrap();
    let placeholder = format!("\"{}\"", "A".repeat(86));

    // Every event is signed, and none waits for its signature.
    let db_path = dir.path().join("db");
    let originals: Vec<_> = {
        let db = Db::open(&db_path, 8).unwrap();
        assert_eq!(db.scan_prefix("unsigned_events", &[]).count(), 0);
        let pdus: Vec<_> = db.scan_prefix("pdus", &[]).map(Result::unwrap).collect();
        assert!(pdus.len() >= 8, "the room's events are stored");
        for (_, json) in &pdus {
            let object: CanonicalJsonObject = serde_json::from_slice(json).unwrap();
            verify_event(&map, &object, &rules).expect("signed by the server");
        }
        // The crash: the signed forms never reached the disk.
        let mut batch = Batch::default();
        for (key, json) in &pdus {
            let text = String::from_utf8(json.to_vec()).unwrap();
            let (before, rest) = text.split_once("\"signatures\":").unwrap();
            let (_, after) = rest.split_once('}').unwrap();
            let key_id = keys["verify_keys"]
                .as_object()
                .unwrap()
                .keys()
                .next()
                .unwrap();
            let unsigned = format!(
                "{before}\"signatures\":{{\"localhost\":{{\"{key_id}\":{placeholder}}}{after}"
            );
            assert_eq!(
                unsigned.len(),
                json.len(),
                "the placeholder fills the signature's place"
            );
            batch.put(&db, "pdus", key, unsigned.as_bytes());
            batch.put(&db, "unsigned_events", key, b"");
        }
        db.commit(batch).unwrap();
        pdus
    };

    // The next start signs them again, to the same bytes, and forgets the marks.
    let server = common::TestServer::start_in(dir, &[]).await;
    let bob = server.user("bob").await;
    bob.create_room(json!({ "name": "after the restart" }))
        .await;
    let dir = server.stop().await;
    let db = Db::open(&db_path, 8).unwrap();
    assert_eq!(db.scan_prefix("unsigned_events", &[]).count(), 0);
    for (key, json) in &originals {
        let now = db.get("pdus", key).unwrap().expect("still stored");
        assert_eq!(&*now, &**json, "signed again to the same bytes");
    }
    drop(db);
    drop(dir);
}
