//! Ephemeral and per-user data around rooms: typing (in memory, expiring), read
//! receipts (durable), presence (in memory). Each change takes a position on the global
//! stream so that sync tokens cover it, and wakes the users concerned.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{Value as JsonValue, json};

use super::{notifier::Notifier, users::now_ms};
use crate::{
    error::{Error, Result},
    storage::{Batch, Db, IdKind, NewestByRoom, SEP, u64_at, u64_key},
};

/// Longest typing notification a client may ask for.
const MAX_TYPING: Duration = Duration::from_secs(120);

#[derive(Default)]
struct RoomTyping {
    users: HashMap<OwnedUserId, Instant>,
    pos: u64,
}

#[derive(Clone, Debug)]
pub struct Presence {
    pub state: String,
    pub status_msg: Option<String>,
    pub last_active_ms: u64,
    pub pos: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Receipt {
    pub user: OwnedUserId,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread: Option<String>,
    pub event_id: OwnedEventId,
    pub ts: u64,
}

impl Receipt {
    pub fn is_private(&self) -> bool {
        self.kind == "m.read.private"
    }
}

/// Build the content of an `m.receipt` event from receipts.
pub fn receipt_content(receipts: &[Receipt]) -> JsonValue {
    let mut content = serde_json::Map::new();
    for r in receipts {
        let mut data = json!({ "ts": r.ts });
        if let Some(t) = &r.thread {
            data["thread_id"] = JsonValue::String(t.clone());
        }
        let by_event = content
            .entry(r.event_id.to_string())
            .or_insert_with(|| json!({}));
        by_event[&r.kind][r.user.as_str()] = data;
    }
    JsonValue::Object(content)
}

pub struct Ephemeral {
    db: Arc<Db>,
    notifier: Arc<Notifier>,
    typing: Arc<Mutex<HashMap<OwnedRoomId, RoomTyping>>>,
    presence: Mutex<HashMap<OwnedUserId, Presence>>,
    /// Each room's newest receipt position, for syncs to skip rooms without new ones.
    newest_receipts: NewestByRoom,
}

impl Ephemeral {
    pub fn new(db: Arc<Db>, notifier: Arc<Notifier>) -> Self {
        Self {
            db,
            notifier,
            typing: Arc::default(),
            presence: Mutex::default(),
            newest_receipts: NewestByRoom::default(),
        }
    }

    // --- typing ---

    /// Start or stop typing. `members` are told; a start expires by itself after `timeout`.
    pub fn set_typing(
        &self,
        room: &RoomId,
        user: &UserId,
        typing: Option<Duration>,
        members: Vec<OwnedUserId>,
    ) {
        // The position is held until the change is in place: no sync's token moves
        // past it before the change can be seen.
        let ticket = self.db.stream.reserve();
        let pos = ticket.position;
        {
            let mut rooms = self.typing.lock();
            let entry = rooms.entry(room.to_owned()).or_default();
            match typing {
                Some(t) => {
                    entry
                        .users
                        .insert(user.to_owned(), Instant::now() + t.min(MAX_TYPING));
                }
                None => {
                    entry.users.remove(user);
                }
            }
            entry.pos = entry.pos.max(pos);
        }
        drop(ticket);
        self.notifier.notify_all(members.iter().map(|u| &**u), pos);
        if let Some(t) = typing {
            // Expire server-side: clients that vanish must not type forever.
            let typing_map = self.typing.clone();
            let notifier = self.notifier.clone();
            let db = self.db.clone();
            let (room, user) = (room.to_owned(), user.to_owned());
            tokio::spawn(async move {
                tokio::time::sleep(t.min(MAX_TYPING) + Duration::from_millis(10)).await;
                let expired = {
                    let mut rooms = typing_map.lock();
                    let Some(entry) = rooms.get_mut(&room) else {
                        return;
                    };
                    match entry.users.get(&user) {
                        Some(until) if *until <= Instant::now() => {
                            entry.users.remove(&user);
                            let ticket = db.stream.reserve();
                            entry.pos = ticket.position;
                            Some(ticket.position)
                        }
                        _ => None,
                    }
                };
                if let Some(pos) = expired {
                    notifier.notify_all(members.iter().map(|u| &**u), pos);
                }
            });
        }
    }

    /// Rooms whose typing changed in `(since, until]`, with who types there now.
    pub fn typing_changed(&self, since: u64, until: u64) -> Vec<(OwnedRoomId, Vec<OwnedUserId>)> {
        let rooms: Vec<OwnedRoomId> = self
            .typing
            .lock()
            .iter()
            .filter(|(_, e)| e.pos > since && e.pos <= until)
            .map(|(r, _)| r.clone())
            .collect();
        rooms
            .into_iter()
            .map(|r| {
                let (users, _) = self.typing(&r);
                (r, users)
            })
            .collect()
    }

    /// Rooms with a receipt change in `(since, until]`, across all rooms.
    pub fn receipt_rooms_since(&self, since: u64, until: u64) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        for item in self
            .db
            .scan_from("receipt_rooms", b"", &(since + 1).to_be_bytes(), true)
        {
            let (k, v) = item?;
            if crate::storage::u64_at(&k, 0) > until {
                break;
            }
            let room = crate::storage::decode_u64(&v);
            if !out.contains(&room) {
                out.push(room);
            }
        }
        Ok(out)
    }

    /// Users typing in a room now, and the position of the last change.
    pub fn typing(&self, room: &RoomId) -> (Vec<OwnedUserId>, u64) {
        let rooms = self.typing.lock();
        match rooms.get(room) {
            Some(entry) => {
                let now = Instant::now();
                let mut users: Vec<OwnedUserId> = entry
                    .users
                    .iter()
                    .filter(|(_, until)| **until > now)
                    .map(|(u, _)| u.clone())
                    .collect();
                users.sort();
                (users, entry.pos)
            }
            None => (Vec::new(), 0),
        }
    }

    // --- receipts ---

    fn receipt_key(room_short: u64, user_short: u64, kind: &str, thread: Option<&str>) -> Vec<u8> {
        let mut k = u64_key(&[room_short, user_short]);
        k.extend_from_slice(kind.as_bytes());
        k.push(SEP);
        k.extend_from_slice(thread.unwrap_or("").as_bytes());
        k
    }

    /// Record a receipt; `members` are told (only the user, for private receipts).
    pub fn set_receipt(
        &self,
        room_short: u64,
        receipt: Receipt,
        members: Vec<OwnedUserId>,
    ) -> Result<()> {
        let user_short = self
            .db
            .get_or_create_short_id(IdKind::User, receipt.user.as_str())?;
        let ticket = self.db.stream.reserve();
        let mut b = Batch::default();
        let key = Self::receipt_key(
            room_short,
            user_short,
            &receipt.kind,
            receipt.thread.as_deref(),
        );
        b.put(&self.db, "receipts", &key, &serde_json::to_vec(&receipt)?);
        b.put(
            &self.db,
            "receipt_stream",
            &u64_key(&[room_short, ticket.position]),
            &serde_json::to_vec(&receipt)?,
        );
        b.put(
            &self.db,
            "receipt_rooms",
            &ticket.position.to_be_bytes(),
            &room_short.to_be_bytes(),
        );
        self.db.commit(b)?;
        let pos = ticket.position;
        self.newest_receipts.note(room_short, pos);
        drop(ticket);
        if receipt.is_private() {
            self.notifier.notify(&receipt.user, pos);
        } else {
            self.notifier.notify_all(members.iter().map(|u| &**u), pos);
        }
        Ok(())
    }

    /// A user's latest receipt of a kind in a room (unthreaded or `main`).
    pub fn receipt_of(
        &self,
        room_short: u64,
        user: &UserId,
        kind: &str,
    ) -> Result<Option<Receipt>> {
        let Some(user_short) = self.db.short_id(IdKind::User, user.as_str())? else {
            return Ok(None);
        };
        let mut best: Option<Receipt> = None;
        for thread in [None, Some("main")] {
            if let Some(v) = self.db.get(
                "receipts",
                &Self::receipt_key(room_short, user_short, kind, thread),
            )? {
                let r: Receipt = serde_json::from_slice(&v)?;
                if best.as_ref().is_none_or(|b| r.ts >= b.ts) {
                    best = Some(r);
                }
            }
        }
        Ok(best)
    }

    /// A user's receipt of a kind in one thread exactly (`None`: unthreaded).
    pub fn receipt_in_thread(
        &self,
        room_short: u64,
        user: &UserId,
        kind: &str,
        thread: Option<&str>,
    ) -> Result<Option<Receipt>> {
        let Some(user_short) = self.db.short_id(IdKind::User, user.as_str())? else {
            return Ok(None);
        };
        match self.db.get(
            "receipts",
            &Self::receipt_key(room_short, user_short, kind, thread),
        )? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    /// Every current receipt of a room.
    pub fn receipts(&self, room_short: u64) -> Result<Vec<Receipt>> {
        let prefix = room_short.to_be_bytes();
        self.db
            .scan_prefix("receipts", &prefix)
            .map(|r| Ok(serde_json::from_slice(&r?.1)?))
            .collect()
    }

    /// Whether a receipt in the room changed after `since` (possibly one not visible
    /// yet). No database read once the room is known.
    pub fn has_receipts_after(&self, room_short: u64, since: u64) -> Result<bool> {
        let newest = self.newest_receipts.newest(room_short, || {
            let prefix = room_short.to_be_bytes();
            let end = u64_key(&[room_short, u64::MAX]);
            match self
                .db
                .scan_from("receipt_stream", &prefix, &end, false)
                .next()
            {
                Some(item) => Ok::<_, Error>(Some(u64_at(&item?.0, 1))),
                None => Ok(None),
            }
        })?;
        Ok(newest.is_some_and(|pos| pos > since))
    }

    /// Receipts that changed in `(since, until]`.
    pub fn receipts_since(&self, room_short: u64, since: u64, until: u64) -> Result<Vec<Receipt>> {
        let prefix = room_short.to_be_bytes();
        let start = u64_key(&[room_short, since + 1]);
        let mut out = Vec::new();
        for item in self.db.scan_from("receipt_stream", &prefix, &start, true) {
            let (k, v) = item?;
            if u64_at(&k, 1) > until {
                break;
            }
            out.push(serde_json::from_slice(&v)?);
        }
        Ok(out)
    }

    // --- presence ---

    pub fn set_presence(
        &self,
        user: &UserId,
        state: &str,
        status_msg: Option<Option<String>>,
        observers: Vec<OwnedUserId>,
    ) {
        // Held until the change is in place, as for typing.
        let ticket = self.db.stream.reserve();
        let pos = ticket.position;
        {
            let mut all = self.presence.lock();
            let entry = all.entry(user.to_owned()).or_insert_with(|| Presence {
                state: "offline".into(),
                status_msg: None,
                last_active_ms: now_ms(),
                pos,
            });
            let changed =
                entry.state != state || status_msg.as_ref().is_some_and(|m| *m != entry.status_msg);
            if state == "online" {
                entry.last_active_ms = now_ms();
            }
            if !changed {
                return;
            }
            entry.state = state.to_owned();
            if let Some(m) = status_msg {
                entry.status_msg = m;
            }
            entry.pos = entry.pos.max(pos);
        }
        drop(ticket);
        self.notifier.notify_all(
            observers.iter().map(|u| &**u).chain(std::iter::once(user)),
            pos,
        );
    }

    /// Note activity without changing the presence state.
    pub fn touch(&self, user: &UserId) {
        if let Some(p) = self.presence.lock().get_mut(user)
            && p.state == "online"
        {
            p.last_active_ms = now_ms();
        }
    }

    /// Whether anyone's presence changed after `since`.
    pub fn presence_changed_since(&self, since: u64) -> bool {
        self.presence.lock().values().any(|p| p.pos > since)
    }

    pub fn presence(&self, user: &UserId) -> Option<Presence> {
        self.presence.lock().get(user).cloned()
    }

    /// The `m.presence` event of a user.
    pub fn presence_event(user: &UserId, p: &Presence) -> JsonValue {
        let ago = now_ms().saturating_sub(p.last_active_ms);
        let mut content = json!({
            "presence": p.state,
            "last_active_ago": ago,
            "currently_active": p.state == "online" && ago < 5 * 60 * 1000,
        });
        if let Some(m) = &p.status_msg {
            content["status_msg"] = JsonValue::String(m.clone());
        }
        json!({ "type": "m.presence", "sender": user, "content": content })
    }
}
