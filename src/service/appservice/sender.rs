//! Pushes events to each appservice with `PUT /_matrix/app/v1/transactions/{txnId}`.
//!
//! Each appservice has its own task and its own cursor on the global stream. Events it
//! is interested in are gathered into a transaction that is written to disk *before* it
//! is sent; until the appservice accepts it, the same transaction (same id, same events)
//! is retried with exponential backoff, across restarts of either side. Only when it is
//! accepted does the cursor move past it. So nothing is lost and nothing is sent twice
//! under a new transaction id, and a slow or dead appservice holds up only itself.

use std::{collections::HashMap, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use serde_json::{Value as JsonValue, json};

use super::{Appservice, client};
use crate::{
    error::Result,
    service::Services,
    storage::{decode_u64, u64_at},
};

/// At most this many events per transaction.
const MAX_EVENTS: usize = 100;
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How long a woken sender waits for more commits before it looks.
const GATHER_DELAY: Duration = Duration::from_millis(20);
/// The cursor past uninteresting events is saved at most this often (losing it only
/// means looking at those events again after a restart).
const CURSOR_SAVE_INTERVAL: Duration = Duration::from_secs(5);

/// What a sender remembers between rounds.
struct Scan {
    /// Whether the appservice is interested in everything in a room; dropped for a
    /// room whenever a membership event of it goes by.
    rooms: HashMap<u64, bool>,
    cursor_saved: std::time::Instant,
}

impl Default for Scan {
    fn default() -> Self {
        Self {
            rooms: HashMap::new(),
            cursor_saved: std::time::Instant::now(),
        }
    }
}

#[derive(Default, Serialize, Deserialize)]
struct State {
    /// Every event at or below this stream position was delivered or was of no interest.
    cursor: u64,
    next_txn: u64,
    pending: Option<Pending>,
}

#[derive(Clone, Serialize, Deserialize)]
struct Pending {
    txn_id: String,
    events: Vec<u64>,
    /// Typing and receipts (for appservices with `receive_ephemeral`), kept as sent:
    /// typing lives in memory and could not be read again after a restart.
    #[serde(default)]
    ephemeral: Vec<JsonValue>,
    /// The cursor once this transaction is accepted.
    up_to: u64,
}

fn load_state(s: &Services, id: &str) -> Result<Option<State>> {
    match s.db.get("appservice_state", id.as_bytes())? {
        Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
        None => Ok(None),
    }
}

fn save_state(s: &Services, id: &str, state: &State, durable: bool) -> Result<()> {
    let bytes = serde_json::to_vec(state)?;
    if durable {
        s.db.put_durable("appservice_state", id.as_bytes(), &bytes)
    } else {
        let mut b = crate::storage::Batch::default();
        b.put(&s.db, "appservice_state", id.as_bytes(), &bytes);
        s.db.write(b).map(|_| ())
    }
}

/// Start one delivery task per appservice that has a URL; they stop with `stop`. An
/// appservice seen for the first time starts from the current position, recorded here
/// before the homeserver serves anything.
pub fn spawn_all(
    s: Arc<Services>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::new();
    for a in s.appservices.all() {
        if a.registration.url.is_none() {
            continue;
        }
        let state = match load_state(&s, a.id())? {
            Some(state) => state,
            None => {
                let state = State {
                    cursor: s.db.stream.visible(),
                    next_txn: 1,
                    pending: None,
                };
                save_state(&s, a.id(), &state, true)?;
                state
            }
        };
        tasks.push(tokio::spawn(run(s.clone(), a, state, stop.clone())));
    }
    Ok(tasks)
}

async fn run(
    s: Arc<Services>,
    a: Arc<Appservice>,
    mut state: State,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let http = client::http_client();
    let id = a.id().to_owned();
    let mut visible = s.db.stream.subscribe();
    let mut attempts: u32 = 0;
    let mut scan = Scan::default();
    loop {
        if *stop.borrow() {
            return;
        }
        let result = step(&s, &a, &http, &mut state, &mut scan).await;
        let wait = match result {
            Ok(Step::Delivered) => {
                attempts = 0;
                continue;
            }
            Ok(Step::Idle) => None,
            Ok(Step::Failed(why)) | Err(crate::error::Error::Internal(why)) => {
                attempts += 1;
                let backoff = Duration::from_secs(1u64 << (attempts - 1).min(9)).min(MAX_BACKOFF);
                tracing::warn!(appservice = %id, reason = %why, retry_in_s = backoff.as_secs(), "appservice transaction failed");
                Some(backoff)
            }
            Err(e) => {
                tracing::warn!(appservice = %id, error = %e, "appservice delivery error");
                Some(Duration::from_secs(5))
            }
        };
        match wait {
            Some(d) => {
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(d) => {}
                }
            }
            None => {
                let cursor = state.cursor;
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = visible.wait_for(|v| *v > cursor) => {}
                }
                // Let a burst of commits gather into one round (and one transaction).
                tokio::time::sleep(GATHER_DELAY).await;
            }
        }
    }
}

enum Step {
    /// A transaction was accepted (there may be more to send at once).
    Delivered,
    /// Nothing new for this appservice.
    Idle,
    Failed(String),
}

async fn step(
    s: &Services,
    a: &Appservice,
    http: &reqwest::Client,
    state: &mut State,
    scan: &mut Scan,
) -> Result<Step> {
    if state.pending.is_none() {
        let (events, up_to) = gather(s, a, state.cursor, &mut scan.rooms)?;
        let ephemeral = if a.registration.receive_ephemeral {
            gather_ephemeral(s, a, state.cursor, up_to, &mut scan.rooms)?
        } else {
            Vec::new()
        };
        if events.is_empty() && ephemeral.is_empty() {
            if up_to > state.cursor {
                state.cursor = up_to;
                if scan.cursor_saved.elapsed() >= CURSOR_SAVE_INTERVAL {
                    save_state(s, a.id(), state, false)?;
                    scan.cursor_saved = std::time::Instant::now();
                }
            }
            return Ok(Step::Idle);
        }
        state.pending = Some(Pending {
            txn_id: format!("{}", state.next_txn),
            events,
            ephemeral,
            up_to,
        });
        state.next_txn += 1;
        // On disk before it leaves: a restart retries this very transaction.
        save_state(s, a.id(), state, true)?;
    }
    let pending = state.pending.clone().expect("set above");
    let body = transaction_body(s, &pending)?;
    match client::push_transaction(http, a, &pending.txn_id, &body).await {
        client::Reply::Ok(_) => {
            state.cursor = pending.up_to;
            state.pending = None;
            save_state(s, a.id(), state, true)?;
            Ok(Step::Delivered)
        }
        client::Reply::Status(code) => Ok(Step::Failed(format!("answered {code}"))),
        client::Reply::Unreachable(why) => Ok(Step::Failed(why)),
        client::Reply::NoUrl => Ok(Step::Idle),
    }
}

fn transaction_body(s: &Services, pending: &Pending) -> Result<JsonValue> {
    let mut events = Vec::with_capacity(pending.events.len());
    for short in &pending.events {
        if let Some(e) = s.rooms.timeline.stored(*short)? {
            events.push(s.rooms.timeline.to_client(&e, None)?);
        }
    }
    let mut body = json!({ "events": events });
    if !pending.ephemeral.is_empty() {
        // The spec's field, and MSC2409's unstable one that older appservices read.
        body["ephemeral"] = JsonValue::Array(pending.ephemeral.clone());
        body["de.sorunome.msc2409.ephemeral"] = JsonValue::Array(pending.ephemeral.clone());
    }
    Ok(body)
}

/// Events after `cursor` that the appservice is interested in (at most
/// [`MAX_EVENTS`]), and the position up to which the stream was read.
fn gather(
    s: &Services,
    a: &Appservice,
    cursor: u64,
    rooms: &mut HashMap<u64, bool>,
) -> Result<(Vec<u64>, u64)> {
    let visible = s.db.stream.visible();
    let mut out = Vec::new();
    let mut up_to = cursor;
    let start = (cursor + 1).to_be_bytes();
    for item in s.db.scan_from("stream", b"", &start, true) {
        let (k, v) = item?;
        let pos = u64_at(&k, 0);
        if pos > visible {
            break;
        }
        up_to = pos;
        let short = decode_u64(&v);
        if interested(s, a, short, rooms)? {
            out.push(short);
            if out.len() >= MAX_EVENTS {
                break;
            }
        }
    }
    if out.len() < MAX_EVENTS {
        // Everything up to the visible position was looked at.
        up_to = up_to.max(visible.max(cursor));
    }
    Ok((out, up_to))
}

/// Typing and public receipts in `(since, until]` of rooms the appservice is interested
/// in, as `m.typing` and `m.receipt` events with their `room_id`.
fn gather_ephemeral(
    s: &Services,
    a: &Appservice,
    since: u64,
    until: u64,
    rooms: &mut HashMap<u64, bool>,
) -> Result<Vec<JsonValue>> {
    let mut out = Vec::new();
    for (room_id, users) in s.ephemeral.typing_changed(since, until) {
        let Some(room_short) = s.rooms.timeline.room_short(&room_id)? else {
            continue;
        };
        if room_interest(s, a, room_short, &room_id, rooms)? {
            out.push(
                json!({ "type": "m.typing", "room_id": room_id, "content": { "user_ids": users } }),
            );
        }
    }
    for room_short in s.ephemeral.receipt_rooms_since(since, until)? {
        let Some(room_id) =
            s.db.long_id(room_short)?
                .and_then(|r| ruma::RoomId::parse(r).ok())
        else {
            continue;
        };
        if !room_interest(s, a, room_short, &room_id, rooms)? {
            continue;
        }
        let receipts: Vec<_> = s
            .ephemeral
            .receipts_since(room_short, since, until)?
            .into_iter()
            .filter(|r| !r.is_private())
            .collect();
        if !receipts.is_empty() {
            out.push(json!({
                "type": "m.receipt",
                "room_id": room_id,
                "content": crate::service::ephemeral::receipt_content(&receipts),
            }));
        }
    }
    Ok(out)
}

/// Whether the appservice is interested in everything that happens in a room.
fn room_interest(
    s: &Services,
    a: &Appservice,
    room_short: u64,
    room_id: &ruma::RoomId,
    rooms: &mut HashMap<u64, bool>,
) -> Result<bool> {
    if let Some(known) = rooms.get(&room_short) {
        return Ok(*known);
    }
    let interest = a.claims_room(room_id)
        || room_aliases(s, room_short)?
            .iter()
            .filter_map(|alias| ruma::RoomAliasId::parse(alias).ok())
            .any(|alias| a.claims_alias(&alias))
        || s.members
            .members(room_short)?
            .iter()
            .any(|(u, m)| *m == "join" && a.claims_user(u));
    rooms.insert(room_short, interest);
    Ok(interest)
}

/// The spec's interest: the sender or the target of a membership is one of the
/// appservice's users, the room is in its room namespace or has an alias in its alias
/// namespace, or one of its users is joined to the room.
fn interested(
    s: &Services,
    a: &Appservice,
    short: u64,
    rooms: &mut HashMap<u64, bool>,
) -> Result<bool> {
    let Some(e) = s.rooms.timeline.stored(short)? else {
        return Ok(false);
    };
    if e.pdu.kind == ruma::events::TimelineEventType::RoomMember {
        // Membership changes who is in the room: decide afresh for later events.
        rooms.remove(&e.meta.room);
    }
    if a.claims_user(&e.pdu.sender) {
        return Ok(true);
    }
    if e.pdu.kind == ruma::events::TimelineEventType::RoomMember
        && let Some(target) = e
            .pdu
            .state_key
            .as_deref()
            .and_then(|k| ruma::UserId::parse(k).ok())
        && a.claims_user(&target)
    {
        return Ok(true);
    }
    room_interest(s, a, e.meta.room, &e.room_id, rooms)
}

fn room_aliases(s: &Services, room_short: u64) -> Result<Vec<String>> {
    let mut prefix = room_short.to_be_bytes().to_vec();
    prefix.push(crate::storage::SEP);
    let mut out = Vec::new();
    for item in s.db.scan_prefix("room_aliases", &prefix) {
        let (k, _) = item?;
        out.push(String::from_utf8_lossy(&k[prefix.len()..]).into_owned());
    }
    Ok(out)
}
