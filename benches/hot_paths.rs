//! Criterion benches of the homeserver's hot paths, on a real database in a temporary
//! directory: building, hashing and signing an event; authorising it against the
//! room's state; canonical JSON; creating a room; assembling an initial and an
//! incremental sync; a page of history in a small and in a big room.
//!
//! `cargo bench --bench hot_paths` measures; the test suite runs each once
//! (`cargo test --benches`) so that they keep working.

use std::{sync::Arc, time::Duration};

use criterion::{Criterion, criterion_group, criterion_main};
use ruma::{CanonicalJsonValue, OwnedRoomId, OwnedUserId, UserId};
use salon::{
    config::Config,
    service::{
        Services,
        rooms::{
            CreateRoom,
            pdu::{Pdu, to_json_checked},
            read::EventFilter,
            timeline::NewEvent,
        },
        sync::{SyncFilter, SyncRequest, parse_since, sync},
    },
};
use serde_json::json;

struct World {
    rt: tokio::runtime::Runtime,
    s: Arc<Services>,
    alice: OwnedUserId,
    bob: OwnedUserId,
    bob_device: String,
    rooms: Vec<OwnedRoomId>,
    _dir: tempfile::TempDir,
}

/// Alice and Bob share 50 rooms of 20 messages each.
fn world() -> World {
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = Config {
        data_dir: dir.path().to_owned(),
        ..Config::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let s = Services::build(config).expect("services");
    let alice = UserId::parse("@alice:localhost").unwrap();
    let bob = UserId::parse("@bob:localhost").unwrap();
    let (bob_device, rooms) = rt.block_on(async {
        s.users.create(&alice, None, false, false).await.unwrap();
        s.users.create(&bob, None, false, false).await.unwrap();
        let (device, _) = s.users.create_device(&bob, None, None, None).unwrap();
        let mut rooms = Vec::new();
        for r in 0..50 {
            let room = s
                .rooms
                .create_room(
                    &alice,
                    CreateRoom {
                        name: Some(format!("Room {r}")),
                        invite: vec![bob.clone()],
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            s.rooms
                .set_membership(&room, &bob, &bob, "join", None, None)
                .await
                .unwrap();
            for m in 0..20 {
                s.rooms
                    .send(&room, &alice, message(&format!("message {m} in room {r}")))
                    .await
                    .unwrap();
            }
            rooms.push(room);
        }
        (device.to_string(), rooms)
    });
    World {
        rt,
        s,
        alice,
        bob,
        bob_device,
        rooms,
        _dir: dir,
    }
}

fn message(body: &str) -> NewEvent {
    NewEvent::message(
        "m.room.message",
        json!({ "msgtype": "m.text", "body": body, "m.mentions": {} }),
    )
}

fn events(c: &mut Criterion) {
    let w = world();
    let room = &w.rooms[0];
    let draft = w.rt.block_on(w.s.rooms.timeline.begin(room)).unwrap();
    c.bench_function("event: build, hash and sign a message", |b| {
        b.iter(|| draft.build(&w.alice, message("hello there")).unwrap())
    });
    let built = draft.build(&w.alice, message("hello there")).unwrap();
    c.bench_function("event: authorise a message against the room state", |b| {
        b.iter(|| draft.authorise(&built.pdu).unwrap())
    });
    let member = draft
        .build(
            &w.alice,
            NewEvent::state(
                "m.room.member",
                w.bob.as_str(),
                json!({ "membership": "join", "displayname": "Bob" }),
            ),
        )
        .unwrap();
    c.bench_function("event: authorise a membership change", |b| {
        b.iter(|| {
            // Alice may not set Bob's membership to join: the rules find out why.
            assert!(draft.authorise(&member.pdu).is_err());
        })
    });
    drop(draft);

    let pdu_json = built.json().to_vec();
    let value: serde_json::Value = serde_json::from_slice(&pdu_json).unwrap();
    c.bench_function("canonical JSON: an event to its signed bytes", |b| {
        b.iter(|| {
            let CanonicalJsonValue::Object(o) =
                CanonicalJsonValue::try_from(value.clone()).unwrap()
            else {
                unreachable!()
            };
            to_json_checked(&o).unwrap()
        })
    });
    let id = built.pdu.event_id.clone();
    c.bench_function("canonical JSON: parse a stored event", |b| {
        b.iter(|| Pdu::from_json(id.clone(), &pdu_json).unwrap())
    });
}

fn sync_request(since: Option<(u64, u64)>, timeline_limit: usize) -> SyncRequest {
    SyncRequest {
        identity: String::new(),
        client_session: String::new(),
        since: since.map(|(pos, _)| pos),
        to_device_acked: since.map(|(_, to_device)| to_device),
        full_state: false,
        timeout: Duration::ZERO,
        filter: SyncFilter {
            timeline_limit,
            ..SyncFilter::default()
        },
        set_presence: None,
    }
}

fn create_room(c: &mut Criterion) {
    let w = world();
    let mut n = 0;
    c.bench_function("room: create (seven events, durable)", |b| {
        b.iter(|| {
            n += 1;
            w.rt.block_on(w.s.rooms.create_room(
                &w.alice,
                CreateRoom {
                    name: Some(format!("Bench room {n}")),
                    ..Default::default()
                },
            ))
            .unwrap()
        })
    });
}

fn initial_sync(c: &mut Criterion) {
    let w = world();
    c.bench_function("sync: initial, 50 rooms of 20 messages", |b| {
        b.iter(|| {
            let answer =
                w.rt.block_on(sync(&w.s, &w.bob, &w.bob_device, sync_request(None, 20)))
                    .unwrap();
            assert!(answer.len() > 100_000);
            answer
        })
    });
}

fn incremental_sync(c: &mut Criterion) {
    let w = world();
    let since = w.s.db.stream.visible();
    w.rt.block_on(w.s.rooms.send(&w.rooms[7], &w.alice, message("news")))
        .unwrap();
    let token = parse_since(&format!("s{since}"), w.s.db.stream.visible()).unwrap();
    c.bench_function("sync: incremental, 50 rooms, one new message", |b| {
        b.iter(|| {
            let answer =
                w.rt.block_on(sync(
                    &w.s,
                    &w.bob,
                    &w.bob_device,
                    sync_request(Some((token.pos, token.to_device)), 10),
                ))
                .unwrap();
            assert!(answer.len() > 100);
            answer
        })
    });
}

/// Pages of 100 events read backwards through a room of `size` messages, from the
/// newest to the oldest and round again: in a big room every page is read from the
/// table files, as a client scrolling far back reads it, not from the caches.
fn history(c: &mut Criterion) {
    // A real measurement pages through 100,000 events; the test suite's single pass
    // only checks that the bench works.
    let measuring = std::env::args().any(|a| a == "--bench");
    let big = if measuring { 100_000 } else { 2_000 };
    let w = world();
    for size in [1_000, big] {
        let room =
            w.rt.block_on(w.s.rooms.create_room(&w.alice, CreateRoom::default()))
                .unwrap();
        // Ten senders at once, as a busy room fills: their commits are grouped.
        w.rt.block_on(async {
            let senders = (0..10).map(|t| {
                let (s, room, alice) = (w.s.clone(), room.clone(), w.alice.clone());
                tokio::spawn(async move {
                    for m in 0..size / 10 {
                        s.rooms
                            .send(&room, &alice, message(&format!("message {m} from {t}")))
                            .await
                            .unwrap();
                    }
                })
            });
            for t in senders {
                t.await.unwrap();
            }
        });
        let filter = EventFilter::default();
        let mut from: Option<String> = None;
        let label = format!("history: a page of 100 in a room of {size} messages");
        c.bench_function(&label, |b| {
            b.iter(|| {
                let page =
                    w.s.rooms
                        .messages(
                            &room,
                            &w.alice,
                            None,
                            from.as_deref(),
                            None,
                            true,
                            100,
                            &filter,
                        )
                        .unwrap();
                from = page.end.clone();
                let answer = serde_json::to_vec(&page.chunk).unwrap();
                assert!(!page.chunk.is_empty() || from.is_none());
                answer
            })
        });
    }
}

criterion_group! {
    name = hot_paths;
    config = Criterion::default().sample_size(30).measurement_time(Duration::from_secs(3));
    targets = events, create_room, initial_sync, incremental_sync, history
}
criterion_main!(hot_paths);
