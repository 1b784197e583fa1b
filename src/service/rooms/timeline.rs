//! The one event pipeline. Every PDU Salon creates — createRoom's events, messages,
//! membership changes, redactions — is built, authorised, hashed, signed and stored
//! here, in a [`Draft`] that commits all of its events in one atomic, durable batch.

use std::{collections::HashMap, sync::Arc};

use parking_lot::Mutex;
use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, EventId, MilliSecondsSinceUnixEpoch, OwnedEventId,
    OwnedRoomId, OwnedUserId, RoomId, RoomVersionId, UserId,
    canonical_json::{RedactedBecause, redact},
    events::{StateEventType, TimelineEventType},
    room_version_rules::RoomVersionRules,
    state_res,
};
use serde::{Deserialize, Serialize};
use serde_json::Value as JsonValue;
use tokio::sync::OwnedMutexGuard;

use super::{
    members::{MemberLists, current_membership},
    pdu::{ClientEvent, EventMeta, HistoryEvent, Pdu, StoredEvent, client_part, to_json_checked},
    power::PowerLevels,
    signing::{self, Signing, hash_and_sign, reference_hash},
    state::{EMPTY_GROUP, StateService},
};
use crate::{
    error::{Error, Result},
    service::{
        globals::{Globals, random_string},
        notifier::Notifier,
        push::{Push, RoomContext, event_for_rules},
    },
    storage::{
        Batch, Db, IdKind, NewestByRoom, Pinned, StreamTicket, decode_u64, str_key, timeline_key,
        timeline_key_pos, u64_at, u64_key,
    },
};

/// What the server keeps per room.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoomRecord {
    pub room_id: OwnedRoomId,
    pub version: RoomVersionId,
    pub extremities: Vec<OwnedEventId>,
    pub depth: u64,
    pub state_group: u64,
}

impl RoomRecord {
    pub fn rules(&self) -> Result<RoomVersionRules> {
        self.version
            .rules()
            .ok_or_else(|| Error::internal(format!("room version {} has no rules", self.version)))
    }
}

/// An event to be built by the pipeline.
#[derive(Clone, Debug)]
pub struct NewEvent {
    pub kind: TimelineEventType,
    pub content: JsonValue,
    pub state_key: Option<String>,
    pub redacts: Option<OwnedEventId>,
    pub timestamp: Option<MilliSecondsSinceUnixEpoch>,
    /// The request's transaction, for idempotency and `unsigned.transaction_id`.
    pub txn: Option<Txn>,
}

/// A client's transaction id. Its scope is the client session (one login: logging in
/// again with the same device id starts another), the endpoint and the room: the same
/// id sent to another room, or to `/redact` rather than `/send`, is a new request.
#[derive(Clone, Debug)]
pub struct Txn {
    pub client_session: String,
    pub id: String,
    /// `"send"` or `"redact"`.
    pub endpoint: &'static str,
}

impl Txn {
    fn key(&self, user: &UserId, room: &RoomId) -> Vec<u8> {
        str_key(&[
            user.as_str(),
            &self.client_session,
            self.endpoint,
            room.as_str(),
            &self.id,
        ])
    }
}

impl NewEvent {
    pub fn message(kind: impl Into<TimelineEventType>, content: JsonValue) -> Self {
        Self {
            kind: kind.into(),
            content,
            state_key: None,
            redacts: None,
            timestamp: None,
            txn: None,
        }
    }
    pub fn state(
        kind: impl Into<TimelineEventType>,
        state_key: impl Into<String>,
        content: JsonValue,
    ) -> Self {
        Self {
            kind: kind.into(),
            content,
            state_key: Some(state_key.into()),
            redacts: None,
            timestamp: None,
            txn: None,
        }
    }
}

pub struct Timeline {
    db: Arc<Db>,
    globals: Arc<Globals>,
    pub state: Arc<StateService>,
    notifier: Arc<Notifier>,
    push: Arc<Push>,
    locks: Mutex<RoomLocks>,
    /// Drafts under way, waiting for their room's lock included: with none but its
    /// own, a commit syncs the log on its own thread (see [`Draft::commit`]).
    writers: std::sync::atomic::AtomicUsize,
    /// What push evaluation needs of a room's state, per room, for its latest state
    /// group: read once instead of for every event and member.
    push_rooms: Mutex<HashMap<u64, Arc<PushRoomState>>>,
    /// The rooms' member lists, kept up to date by each commit under the room's lock:
    /// a message need not read the membership table.
    members: Arc<MemberLists>,
    /// Parsed PDUs recently read (the state events every new event is authorised
    /// against, the events syncs return).
    pdus: Mutex<PduCache>,
    /// Each room's newest event position, for syncs to skip quiet rooms.
    newest: NewestByRoom,
    /// The timestamp of the last create event built here, in milliseconds.
    last_create: std::sync::atomic::AtomicU64,
    /// History read-aheads running ([`Timeline::read_ahead`]).
    read_aheads: Arc<std::sync::atomic::AtomicUsize>,
}

/// Rooms whose locks are kept before the ones nobody holds or waits for are let go
/// (each written room would otherwise keep one for as long as the server runs).
const ROOM_LOCKS_KEPT: usize = 1024;

type RoomLocks = HashMap<OwnedRoomId, Arc<tokio::sync::Mutex<()>>>;

/// Lets go of the room locks nobody holds or waits for: only the map has them. Anyone
/// who holds a lock, or waits for it, has a clone of it (taken under the map's lock).
fn forget_idle_locks(locks: &mut RoomLocks) {
    locks.retain(|_, lock| Arc::strong_count(lock) > 1);
}

/// At most this many history read-aheads ([`Timeline::read_ahead`]) run at once.
pub const READ_AHEADS: usize = 4;

/// Up to `limit` of a room's timeline positions with their events' short ids, from
/// `from` on (see [`Timeline::timeline_positions`]).
fn positions(
    db: &Db,
    room_short: u64,
    from: u64,
    backward: bool,
    limit: usize,
) -> Result<Vec<(u64, u64)>> {
    let prefix = room_short.to_be_bytes();
    let mut out = Vec::with_capacity(limit.min(1024));
    // Keys run newest first (see `timeline_key`): backward is a forward scan.
    let (start, forward) = if backward {
        if from == 0 {
            return Ok(out);
        }
        (timeline_key(room_short, from - 1), true)
    } else {
        (timeline_key(room_short, from.saturating_add(1)), false)
    };
    if limit == 0 {
        return Ok(out);
    }
    db.visit_from("timeline", &prefix, &start, forward, |k, v| {
        out.push((timeline_key_pos(k), decode_u64(v)));
        out.len() < limit
    })?;
    Ok(out)
}

/// Where the next page of a room's history starts, as the next request of a client
/// paging on will ask [`Timeline::timeline_positions`] for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextPage {
    pub room: u64,
    pub from: u64,
    pub backward: bool,
    pub count: usize,
}

/// Reads what a history page reads (positions, metadata, client parts) and lets it
/// go: the blocks stay in the block cache. Returns the short ids of the page's events.
pub fn read_history(db: &Db, page: NextPage) -> Result<Vec<u64>> {
    let shorts: Vec<u64> = positions(db, page.room, page.from, page.backward, page.count)?
        .into_iter()
        .map(|(_, short)| short)
        .collect();
    let keys: Vec<[u8; 8]> = shorts.iter().map(|s| s.to_be_bytes()).collect();
    db.get_many_pinned("event_meta", &keys)?;
    db.get_many_pinned("client_parts", &keys)?;
    Ok(shorts)
}

/// A small cache of parsed PDUs by short id, each with its metadata once something
/// read that too: two generations, the older dropped when the younger fills, so what
/// is used often stays. Stored PDUs and their metadata change only when redacted; a
/// redaction's commit bumps `generation` and forgets them, and a read that raced it is
/// not cached. Events are also found by id (authorization asks for its auth events so):
/// `by_id` maps a hash of the id to the short id, checked against the cached event.
#[derive(Default)]
struct PduCache {
    young: HashMap<u64, Cached, ShortIds>,
    old: HashMap<u64, Cached, ShortIds>,
    by_id: HashMap<u64, u64, ShortIds>,
    generation: u64,
}

/// An event in the [`PduCache`].
struct Cached {
    pdu: Arc<Pdu>,
    meta: Option<EventMeta>,
}

/// PDUs in each generation of the cache.
const PDU_CACHE_GENERATION: usize = 1536;

impl PduCache {
    /// The event, moved to the young generation if it was in the old one.
    fn entry(&mut self, short: u64) -> Option<&Cached> {
        if !self.young.contains_key(&short) {
            let cached = self.old.remove(&short)?;
            self.put(short, cached);
        }
        self.young.get(&short)
    }

    fn get(&mut self, short: u64) -> Option<Arc<Pdu>> {
        self.entry(short).map(|c| c.pdu.clone())
    }

    /// The cached event with this id, with its short id.
    fn get_by_id(&mut self, id: &EventId) -> Option<(u64, Arc<Pdu>)> {
        let short = *self.by_id.get(&id_hash(id))?;
        self.entry(short)
            .filter(|c| c.pdu.event_id == id)
            .map(|c| (short, c.pdu.clone()))
    }

    /// The event's metadata, if cached (without moving it between generations).
    fn meta(&self, short: u64) -> Option<EventMeta> {
        self.young
            .get(&short)
            .or_else(|| self.old.get(&short))
            .and_then(|c| c.meta.clone())
    }

    fn insert(&mut self, short: u64, pdu: Arc<Pdu>, meta: Option<EventMeta>) {
        self.put(short, Cached { pdu, meta });
    }

    fn put(&mut self, short: u64, cached: Cached) {
        if self.young.len() >= PDU_CACHE_GENERATION && !self.young.contains_key(&short) {
            // The young generation becomes the old one; the new young one reuses the
            // old one's table instead of growing a fresh one insert by insert.
            std::mem::swap(&mut self.old, &mut self.young);
            self.young.clear();
            let old = &self.old;
            self.by_id.retain(|_, s| old.contains_key(s));
        }
        self.by_id.insert(id_hash(&cached.pdu.event_id), short);
        self.young.insert(short, cached);
    }

    fn forget(&mut self, shorts: &[u64]) {
        self.generation += 1;
        for s in shorts {
            self.young.remove(s);
            self.old.remove(s);
        }
    }
}

/// An event id folded to a key of [`PduCache::by_id`]. Ids are hashes already; a
/// collision only costs a lookup in storage, as the cached event's id is compared.
fn id_hash(id: &EventId) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = ShortIds.build_hasher();
    h.write(id.as_bytes());
    h.finish()
}

/// Hashing for maps keyed by short ids: they are distinct integers handed out in
/// sequence, not chosen by anyone, so one multiplication spreads them well enough and
/// costs a fraction of SipHash.
#[derive(Clone, Copy, Default)]
struct ShortIds;

impl std::hash::BuildHasher for ShortIds {
    type Hasher = ShortIdHasher;
    fn build_hasher(&self) -> ShortIdHasher {
        ShortIdHasher(0)
    }
}

struct ShortIdHasher(u64);

impl std::hash::Hasher for ShortIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        // An odd multiplier: distinct in the low bits (the bucket), mixed in the high
        // ones (the tag hashbrown compares first).
        self.0 = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// The events of one read of history ([`Timeline::history`]), held as the database
/// stores them.
pub struct HistoryBatch<'db> {
    metas: Vec<Option<EventMeta>>,
    parts: Vec<Option<Pinned<'db>>>,
    /// For the events without a client part: their ids and PDUs, by index.
    pdus: HashMap<usize, (Pinned<'db>, Pinned<'db>)>,
}

impl HistoryBatch<'_> {
    /// The `i`th event asked for; `None` when it is not (or not wholly) stored.
    pub fn get(&self, i: usize) -> Result<Option<HistoryEvent<'_>>> {
        let Some(Some(meta)) = self.metas.get(i) else {
            return Ok(None);
        };
        if let Some(Some(part)) = self.parts.get(i) {
            return Ok(Some(HistoryEvent::from_part(part, meta)?));
        }
        let Some((id, json)) = self.pdus.get(&i) else {
            return Ok(None);
        };
        // Long ids are stored behind a byte that says what kind of id they are.
        let event_id = std::str::from_utf8(id.get(1..).unwrap_or_default())
            .map_err(|_| Error::internal("stored event id is not UTF-8"))?;
        Ok(Some(HistoryEvent::from_pdu(json, event_id, meta)?))
    }
}

/// A room's power levels and members' display names as of one state group.
struct PushRoomState {
    group: u64,
    power_levels: Option<ruma::push::PushConditionPowerLevelsCtx>,
    names: HashMap<OwnedUserId, String>,
}

impl Timeline {
    /// The rooms' current members, kept in memory.
    pub fn member_lists(&self) -> &MemberLists {
        &self.members
    }

    pub fn new(
        db: Arc<Db>,
        globals: Arc<Globals>,
        state: Arc<StateService>,
        notifier: Arc<Notifier>,
        push: Arc<Push>,
        members: Arc<MemberLists>,
    ) -> Self {
        Self {
            db,
            globals,
            state,
            notifier,
            push,
            locks: Mutex::new(HashMap::new()),
            writers: std::sync::atomic::AtomicUsize::new(0),
            push_rooms: Mutex::new(HashMap::new()),
            members,
            pdus: Mutex::new(PduCache::default()),
            newest: NewestByRoom::default(),
            last_create: std::sync::atomic::AtomicU64::new(0),
            read_aheads: Arc::default(),
        }
    }

    /// The room's lock, which every change of its events holds.
    pub(super) async fn lock(&self, room_id: &RoomId) -> RoomGuard<'_> {
        let writer = Writer::enter(&self.writers);
        let mutex = {
            let mut locks = self.locks.lock();
            if locks.len() >= ROOM_LOCKS_KEPT && !locks.contains_key(room_id) {
                forget_idle_locks(&mut locks);
            }
            locks.entry(room_id.to_owned()).or_default().clone()
        };
        RoomGuard {
            lock: mutex.lock_owned().await,
            writer,
        }
    }

    pub fn room_short(&self, room_id: &RoomId) -> Result<Option<u64>> {
        self.db.short_id(IdKind::Room, room_id.as_str())
    }

    pub fn room_record(&self, room_short: u64) -> Result<Option<RoomRecord>> {
        match self.db.get("rooms", &room_short.to_be_bytes())? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    /// Sign the events stored before their signatures whose signed form was lost (a
    /// crash right after their commit, before the log's next sync); at start, before
    /// anything reads them. Returns how many there were.
    pub fn sign_unsigned(&self) -> Result<usize> {
        let db = &self.db;
        let mut batch = Batch::default();
        let (mut marked, mut signed) = (0, 0);
        for item in db.scan_prefix("unsigned_events", &[]) {
            let (key, _) = item?;
            marked += 1;
            batch.delete(db, "unsigned_events", &key);
            let short = u64_at(&key, 0);
            let (Some(json), Some(meta)) = (db.get("pdus", &key)?, self.meta(short)?) else {
                continue;
            };
            let rules = self
                .room_record(meta.room)?
                .ok_or_else(|| Error::internal(format!("event {short} has no room")))?
                .rules()?;
            let mut object: CanonicalJsonObject = serde_json::from_slice(&json)?;
            signing::sign_stored(&self.globals, &rules.redaction, &mut object)?;
            batch.put(db, "pdus", &key, &to_json_checked(&object)?);
            signed += 1;
        }
        if marked > 0 {
            db.commit(batch)?;
        }
        Ok(signed)
    }

    /// The room's short id and record, or `M_NOT_FOUND`.
    pub fn room(&self, room_id: &RoomId) -> Result<(u64, RoomRecord)> {
        let short = self
            .room_short(room_id)?
            .ok_or_else(|| Error::not_found("Unknown room"))?;
        let record = self
            .room_record(short)?
            .ok_or_else(|| Error::not_found("Unknown room"))?;
        Ok((short, record))
    }

    /// Start adding events to an existing room; holds the room's lock until commit.
    pub async fn begin(&self, room_id: &RoomId) -> Result<Draft<'_>> {
        let guard = self.lock(room_id).await;
        let (room_short, record) = self.room(room_id)?;
        let rules = record.rules()?;
        Ok(Draft::new(self, guard, room_short, record, rules))
    }

    /// Create a room: builds and stores its `m.room.create` event and returns the draft
    /// for the rest of the initial events.
    pub async fn begin_new_room(
        &self,
        version: RoomVersionId,
        creator: &UserId,
        create_content: JsonValue,
    ) -> Result<Draft<'_>> {
        let rules = version.rules().ok_or_else(|| {
            Error::unsupported_room_version(format!("room version {version} is not supported"))
        })?;
        // From room version 12 the room id is the create event's hash, so two identical
        // create events (same creator, same content, same millisecond) would name the
        // same room: each create event built here gets a later timestamp than the one
        // before, and one whose id is taken all the same (the clock went back since a
        // restart) tries the next.
        for _ in 0..64 {
            let ts = self.next_create_timestamp();
            let mut object = base_object(
                &TimelineEventType::RoomCreate,
                creator,
                Some(""),
                create_content.clone(),
                ts,
                1,
                Vec::new(),
                Vec::new(),
            )?;
            let room_id = if rules.authorization.room_create_event_id_as_room_id {
                None
            } else {
                let id: OwnedRoomId = RoomId::parse(format!(
                    "!{}:{}",
                    random_string(18),
                    self.globals.server_name()
                ))?;
                object.insert("room_id".into(), CanonicalJsonValue::String(id.to_string()));
                Some(id)
            };
            // A new room's first events come many at once: they are signed together
            // at the commit (on two threads when there are many).
            let signing = hash_and_sign(&self.globals, &rules.redaction, &mut object, true)?;
            let hash = reference_hash(&object, &rules)?;
            let event_id: OwnedEventId = EventId::parse(format!("${hash}"))?;
            let room_id = match room_id {
                Some(id) => id,
                None => RoomId::parse(format!("!{hash}"))?,
            };
            let json = to_json_checked(&object)?;
            let pdu = Pdu::from_json(event_id.clone(), &json)?;
            state_res::check_state_independent_auth_rules(
                &rules.authorization,
                &pdu,
                |_: &EventId| None::<Arc<Pdu>>,
            )
            .map_err(|e| Error::bad_json(format!("invalid create event: {e}")))?;

            let guard = self.lock(&room_id).await;
            if self.room_short(&room_id)?.is_some() {
                continue;
            }
            // Free, as just seen under the room's lock.
            let mut batch = Batch::default();
            let room_short = self
                .db
                .create_short_id(&mut batch, IdKind::Room, room_id.as_str());
            let record = RoomRecord {
                room_id,
                version,
                extremities: Vec::new(),
                depth: 0,
                state_group: EMPTY_GROUP,
            };
            let mut draft = Draft::new(self, guard, room_short, record, rules);
            draft.batch = batch;
            draft.sign_later = true;
            draft.new_room = true;
            draft.store(
                Built {
                    object,
                    json,
                    pdu: Arc::new(pdu),
                    signing,
                },
                None,
            )?;
            return Ok(draft);
        }
        Err(Error::room_in_use(
            "could not find a free room id; try again",
        ))
    }

    /// Now, or one millisecond after the last create event's timestamp if that is not
    /// earlier.
    fn next_create_timestamp(&self) -> MilliSecondsSinceUnixEpoch {
        use std::sync::atomic::Ordering;
        let now = u64::from(MilliSecondsSinceUnixEpoch::now().get());
        let next = |last: u64| now.max(last + 1);
        let previous = self
            .last_create
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| Some(next(last)))
            .unwrap_or_else(|last| last);
        let ts = next(previous);
        MilliSecondsSinceUnixEpoch(ruma::UInt::new_saturating(ts))
    }

    pub fn event_short(&self, event_id: &EventId) -> Result<Option<u64>> {
        self.db.short_id(IdKind::Event, event_id.as_str())
    }

    pub fn pdu_by_short(&self, short: u64) -> Result<Option<Arc<Pdu>>> {
        let generation = {
            let mut cache = self.pdus.lock();
            if let Some(p) = cache.get(short) {
                return Ok(Some(p));
            }
            cache.generation
        };
        let Some(json) = self.db.get("pdus", &short.to_be_bytes())? else {
            return Ok(None);
        };
        let id = self
            .db
            .long_id(short)?
            .ok_or_else(|| Error::internal("event without id"))?;
        let pdu = Arc::new(Pdu::from_json(EventId::parse(&id)?, &json)?);
        let mut cache = self.pdus.lock();
        if cache.generation == generation {
            cache.insert(short, pdu.clone(), None);
        }
        Ok(Some(pdu))
    }

    pub fn pdu(&self, event_id: &EventId) -> Result<Option<Arc<Pdu>>> {
        if let Some((_, pdu)) = self.pdus.lock().get_by_id(event_id) {
            return Ok(Some(pdu));
        }
        match self.event_short(event_id)? {
            Some(short) => self.pdu_by_short(short),
            None => Ok(None),
        }
    }

    /// The stored PDU JSON, signatures and hashes included (for federation and tests).
    pub fn pdu_json(&self, event_id: &EventId) -> Result<Option<CanonicalJsonObject>> {
        let Some(short) = self.event_short(event_id)? else {
            return Ok(None);
        };
        match self.db.get("pdus", &short.to_be_bytes())? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    pub fn meta(&self, short: u64) -> Result<Option<EventMeta>> {
        if let Some(meta) = self.pdus.lock().meta(short) {
            return Ok(Some(meta));
        }
        match self.db.get("event_meta", &short.to_be_bytes())? {
            Some(v) => Ok(Some(EventMeta::decode(&v)?)),
            None => Ok(None),
        }
    }

    pub fn stored(&self, short: u64) -> Result<Option<StoredEvent>> {
        let (Some(pdu), Some(meta)) = (self.pdu_by_short(short)?, self.meta(short)?) else {
            return Ok(None);
        };
        Ok(Some(self.assemble(short, pdu, meta)?))
    }

    /// A stored event from its parts; the room id comes from the PDU, or (for create
    /// events whose room id is their hash) from the room's short id.
    fn assemble(&self, short: u64, pdu: Arc<Pdu>, meta: EventMeta) -> Result<StoredEvent> {
        let room_id = match &pdu.room_id {
            Some(r) => r.clone(),
            None => RoomId::parse(self.db.long_id(meta.room)?.unwrap_or_default())?,
        };
        Ok(StoredEvent {
            short,
            pdu,
            meta,
            room_id,
        })
    }

    /// Events for a history page (a client scrolling back): their client parts, read
    /// from the database and looked into in place ([`HistoryBatch::get`]), neither
    /// parsed into PDUs nor kept in the cache. A page costs about the same whether its
    /// events were used lately or years ago, and a walk through old history does not
    /// push out the state and recent events every send and sync reads.
    pub fn history(&self, shorts: &[u64]) -> Result<HistoryBatch<'_>> {
        let keys: Vec<[u8; 8]> = shorts.iter().map(|s| s.to_be_bytes()).collect();
        let metas = self
            .db
            .get_many_map("event_meta", &keys, |_, v| EventMeta::decode(v))?;
        let parts = self.db.get_many_pinned("client_parts", &keys)?;
        // Events stored before client parts were, and redacted ones, are read from
        // their PDUs.
        let missing: Vec<usize> = (0..keys.len())
            .filter(|i| parts[*i].is_none() && metas[*i].is_some())
            .collect();
        let mut pdus = HashMap::new();
        if !missing.is_empty() {
            let keys: Vec<[u8; 8]> = missing.iter().map(|i| keys[*i]).collect();
            let found = self
                .db
                .get_many_pinned("longids", &keys)?
                .into_iter()
                .zip(self.db.get_many_pinned("pdus", &keys)?);
            for (i, (id, pdu)) in missing.into_iter().zip(found) {
                if let (Some(id), Some(pdu)) = (id, pdu) {
                    pdus.insert(i, (id, pdu));
                }
            }
        }
        Ok(HistoryBatch { metas, parts, pdus })
    }

    /// The client form of an event of a history page, with what its `unsigned` needs.
    pub fn history_client_raw(
        &self,
        room_id: &RoomId,
        event: &HistoryEvent<'_>,
        viewer: Option<&str>,
    ) -> Result<Box<serde_json::value::RawValue>> {
        let (prev, redacted_because) = self.unsigned_events(event.meta)?;
        event.to_client_raw(
            room_id,
            viewer,
            prev.as_deref().map(|p| &*p.content),
            redacted_because.as_ref(),
        )
    }

    /// Many events at once, in the order of `shorts`: the ones not cached are read
    /// with one batched lookup per column family rather than three reads each, and
    /// kept in the cache.
    pub fn stored_many(&self, shorts: &[u64]) -> Result<Vec<Option<StoredEvent>>> {
        // The generation is read with the lookups: a redaction committed after them
        // keeps what is read next out of the cache.
        type Found = (Option<Arc<Pdu>>, Option<EventMeta>);
        let (mut found, generation): (Vec<Found>, u64) = {
            let mut cache = self.pdus.lock();
            let found = shorts
                .iter()
                .map(|s| match cache.entry(*s) {
                    Some(c) => (Some(c.pdu.clone()), c.meta.clone()),
                    None => (None, None),
                })
                .collect();
            (found, cache.generation)
        };
        // Whatever lacks its metadata is read; the PDU too where that is missing.
        let unread: Vec<usize> = (0..shorts.len())
            .filter(|i| found[*i].1.is_none())
            .collect();
        if !unread.is_empty() {
            let keys: Vec<[u8; 8]> = unread.iter().map(|i| shorts[*i].to_be_bytes()).collect();
            let metas = self
                .db
                .get_many_map("event_meta", &keys, |_, v| EventMeta::decode(v))?;
            let no_pdu: Vec<usize> = (0..unread.len())
                .filter(|j| found[unread[*j]].0.is_none())
                .collect();
            if !no_pdu.is_empty() {
                let keys: Vec<[u8; 8]> = no_pdu.iter().map(|j| keys[*j]).collect();
                let mut ids = self.db.get_many_map("longids", &keys, |_, id| {
                    let id = std::str::from_utf8(id.get(1..).unwrap_or_default())
                        .map_err(|_| Error::internal("stored event id is not UTF-8"))?;
                    Ok(EventId::parse(id)?)
                })?;
                let parsed = self.db.get_many_map("pdus", &keys, |i, json| {
                    Ok(match ids[i].take() {
                        Some(id) => Some(Pdu::from_json(id, json)?),
                        None => None,
                    })
                })?;
                for (j, pdu) in no_pdu.into_iter().zip(parsed) {
                    found[unread[j]].0 = pdu.flatten().map(Arc::new);
                }
            }
            let mut cache = self.pdus.lock();
            for (i, meta) in unread.into_iter().zip(metas) {
                let (pdu, slot) = &mut found[i];
                if let (Some(pdu), Some(meta)) = (pdu, meta) {
                    if cache.generation == generation {
                        cache.insert(shorts[i], pdu.clone(), Some(meta.clone()));
                    }
                    *slot = Some(meta);
                }
            }
        }
        let mut out = Vec::with_capacity(shorts.len());
        for (short, (pdu, meta)) in shorts.iter().zip(found) {
            out.push(match (pdu, meta) {
                (Some(pdu), Some(meta)) => Some(self.assemble(*short, pdu, meta)?),
                _ => None,
            });
        }
        Ok(out)
    }

    pub fn stored_by_id(&self, event_id: &EventId) -> Result<Option<StoredEvent>> {
        match self.event_short(event_id)? {
            Some(short) => self.stored(short),
            None => Ok(None),
        }
    }

    /// The client form of an event as a JSON value, as the client session `viewer`
    /// sees it.
    pub fn to_client(&self, event: &StoredEvent, viewer: Option<&str>) -> Result<JsonValue> {
        Ok(self.client_event(event, viewer)?.to_value())
    }

    /// The client form written straight to JSON text, with no tree in between: for
    /// answers that only pass events on.
    pub fn to_client_raw(
        &self,
        event: &StoredEvent,
        viewer: Option<&str>,
    ) -> Result<Box<serde_json::value::RawValue>> {
        Ok(serde_json::value::to_raw_value(
            &self.client_event(event, viewer)?,
        )?)
    }

    /// The client form of an event, with what its `unsigned` needs: the content of the
    /// state event it replaced, the redaction that redacted it.
    pub fn client_event(&self, event: &StoredEvent, viewer: Option<&str>) -> Result<ClientEvent> {
        self.into_client_event(event.clone(), viewer)
    }

    /// [`Timeline::client_event`], for an event the caller has no further use for.
    pub fn into_client_event(
        &self,
        event: StoredEvent,
        viewer: Option<&str>,
    ) -> Result<ClientEvent> {
        let (prev_content, redacted_because) = self.unsigned_events(&event.meta)?;
        Ok(event.into_client(viewer, prev_content, redacted_because))
    }

    /// The events an event's `unsigned` shows: the state event it replaced (for
    /// `prev_content`) and the redaction that redacted it, in its client form.
    fn unsigned_events(&self, meta: &EventMeta) -> Result<(Option<Arc<Pdu>>, Option<ClientEvent>)> {
        let replaced = match meta.replaces {
            Some(prev) => self.pdu_by_short(prev)?,
            None => None,
        };
        let redacted_because = match &meta.redacted_by {
            Some(id) => match self.stored_by_id(&EventId::parse(id)?)? {
                Some(r) => Some(self.client_event(&r, None)?),
                None => None,
            },
            None => None,
        };
        Ok((replaced, redacted_because))
    }

    /// The current state event for `(type, state_key)`.
    pub fn current_state_event(
        &self,
        room_short: u64,
        event_type: &str,
        state_key: &str,
    ) -> Result<Option<StoredEvent>> {
        let Some(key) = self.state.key_short(event_type, state_key)? else {
            return Ok(None);
        };
        match self.state.current(room_short, key)? {
            Some(ev) => self.stored(ev),
            None => Ok(None),
        }
    }

    pub fn current_state_content(
        &self,
        room_short: u64,
        event_type: &str,
        state_key: &str,
    ) -> Result<Option<JsonValue>> {
        Ok(self
            .current_state_event(room_short, event_type, state_key)?
            .map(|e| e.pdu.content_json()))
    }

    /// The state event for `(type, state_key)` in a state group.
    pub fn state_event_in_group(
        &self,
        group: u64,
        event_type: &str,
        state_key: &str,
    ) -> Result<Option<StoredEvent>> {
        let Some(key) = self.state.key_short(event_type, state_key)? else {
            return Ok(None);
        };
        match self.state.load(group)?.get(&key) {
            Some(ev) => self.stored(*ev),
            None => Ok(None),
        }
    }

    /// All events of a state group.
    pub fn state_events_in_group(&self, group: u64) -> Result<Vec<StoredEvent>> {
        let map = self.state.load(group)?;
        let mut out = Vec::with_capacity(map.len());
        for ev in map.values() {
            if let Some(e) = self.stored(*ev)? {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// Timeline entries of a room from stream position `from` (exclusive), newest first
    /// when `backward`. Returns `(position, event short id)` pairs.
    pub fn timeline_positions(
        &self,
        room_short: u64,
        from: u64,
        backward: bool,
        limit: usize,
    ) -> Result<Vec<(u64, u64)>> {
        positions(&self.db, room_short, from, backward, limit)
    }

    /// Reads the next page of history a client will ask for ([`NextPage`]) in the
    /// background, so that it finds that page's blocks in the block cache: deep in a
    /// big room they are otherwise read from the table files and decompressed while
    /// the client waits. At most [`READ_AHEADS`] run at once; more are not started.
    pub fn read_ahead(&self, next: NextPage) {
        use std::sync::atomic::Ordering;
        /// One read-ahead counted as running, until dropped (a task dropped unrun by
        /// a runtime shutting down included).
        struct Running(Arc<std::sync::atomic::AtomicUsize>);
        impl Drop for Running {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let running = Running(self.read_aheads.clone());
        if running.0.fetch_add(1, Ordering::Relaxed) >= READ_AHEADS {
            return;
        }
        let db = self.db.clone();
        // Spawned from a request's task onto the same worker, it normally runs once
        // that task has written its answer.
        runtime.spawn(async move {
            let _running = running;
            if let Err(e) = read_history(&db, next) {
                tracing::debug!("history read-ahead failed: {e}");
            }
        });
    }

    /// Whether the room has an event after position `since` (possibly one not visible
    /// yet: the caller looks and finds nothing). No database read once the room is known.
    pub fn has_events_after(&self, room_short: u64, since: u64) -> Result<bool> {
        let newest = self.newest.newest(room_short, || {
            Ok::<_, Error>(
                self.timeline_positions(room_short, u64::MAX, true, 1)?
                    .first()
                    .map(|(pos, _)| *pos),
            )
        })?;
        Ok(newest.is_some_and(|pos| pos > since))
    }

    /// A previous request with the same transaction id, client session, endpoint and
    /// room.
    pub fn txn_event(
        &self,
        user: &UserId,
        room: &RoomId,
        txn: &Txn,
    ) -> Result<Option<OwnedEventId>> {
        match self.db.get("txn_ids", &txn.key(user, room))? {
            Some(v) => Ok(Some(EventId::parse(String::from_utf8_lossy(&v).as_ref())?)),
            None => Ok(None),
        }
    }

    /// Power levels of a room in its current state.
    pub fn power_levels(&self, room_short: u64, record: &RoomRecord) -> Result<PowerLevels> {
        let rules = record.rules()?;
        let create = self
            .current_state_event(room_short, "m.room.create", "")?
            .ok_or_else(|| Error::internal("room without create event"))?;
        let content = self.current_state_content(room_short, "m.room.power_levels", "")?;
        PowerLevels::new(&rules, &create.pdu, content)
    }
}

/// An event built and signed (or being signed), not yet authorised nor stored.
pub struct Built {
    object: CanonicalJsonObject,
    json: Vec<u8>,
    pub pdu: Arc<Pdu>,
    signing: Signing,
}

impl Built {
    /// The event in canonical JSON, as it will be stored; the signature is a
    /// placeholder of the same length while it is being computed.
    pub fn json(&self) -> &[u8] {
        &self.json
    }
}

/// A room's lock, held by a counted writer.
pub(super) struct RoomGuard<'a> {
    lock: OwnedMutexGuard<()>,
    writer: Writer<'a>,
}

/// One draft under way, counted in [`Timeline`]'s writers while it lives.
struct Writer<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Writer<'a> {
    fn enter(count: &'a std::sync::atomic::AtomicUsize) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Writer<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Owed signatures being computed, each with its event's short id and unsigned JSON.
type OwedSignatures = signing::Signer<(u64, Vec<u8>)>;

/// A set of events being added to one room under its lock; nothing is visible until
/// [`Draft::commit`] writes them all at once.
pub struct Draft<'a> {
    tl: &'a Timeline,
    /// The room's lock, released once the events are applied.
    guard: Option<OwnedMutexGuard<()>>,
    /// Counted among the writers until the draft is done.
    _writer: Writer<'a>,
    pub room_short: u64,
    pub record: RoomRecord,
    pub rules: RoomVersionRules,
    batch: Batch,
    tickets: Vec<StreamTicket<'a>>,
    /// This draft's events by id, with their short ids (staged in the batch, so not
    /// yet known to the database).
    pending: HashMap<OwnedEventId, (u64, Arc<Pdu>)>,
    pending_state: HashMap<u64, u64>,
    pending_short: HashMap<u64, Arc<Pdu>>,
    pending_json: HashMap<u64, CanonicalJsonObject>,
    pending_meta: HashMap<u64, EventMeta>,
    /// Users whose membership an event of this draft changed: they hear of it even
    /// when they are no longer in the room.
    affected: Vec<OwnedUserId>,
    /// The membership changes of this draft, in order: who is now a member, and how
    /// (`None`: no longer joined, invited or knocking).
    member_changes: Vec<(OwnedUserId, Option<&'static str>)>,
    /// The room is new with this draft: it has no members before it.
    new_room: bool,
    touched: bool,
    /// Stored events this draft redacts: their cached parsed form goes at the commit.
    redacted: Vec<u64>,
    /// Sign this draft's events together at the commit.
    sign_later: bool,
    /// Events whose signatures are owed, with the bytes each must cover.
    owed: Vec<(u64, Vec<u8>)>,
}

#[allow(clippy::too_many_arguments)]
fn base_object(
    kind: &TimelineEventType,
    sender: &UserId,
    state_key: Option<&str>,
    content: JsonValue,
    ts: MilliSecondsSinceUnixEpoch,
    depth: u64,
    prev_events: Vec<OwnedEventId>,
    auth_events: Vec<OwnedEventId>,
) -> Result<CanonicalJsonObject> {
    if !content.is_object() {
        return Err(Error::bad_json("event content must be a JSON object"));
    }
    let content = CanonicalJsonValue::try_from(content).map_err(|e| {
        Error::bad_json(format!(
            "content is not canonical JSON (floats and integers beyond 2^53 are not allowed): {e}"
        ))
    })?;
    let mut o = CanonicalJsonObject::new();
    o.insert("type".into(), CanonicalJsonValue::String(kind.to_string()));
    o.insert(
        "sender".into(),
        CanonicalJsonValue::String(sender.to_string()),
    );
    o.insert("content".into(), content);
    o.insert(
        "origin_server_ts".into(),
        CanonicalJsonValue::Integer(ts.get().into()),
    );
    o.insert(
        "depth".into(),
        CanonicalJsonValue::Integer(ruma::Int::try_from(depth).unwrap_or(ruma::Int::MAX)),
    );
    o.insert(
        "prev_events".into(),
        CanonicalJsonValue::Array(
            prev_events
                .into_iter()
                .map(|e| CanonicalJsonValue::String(e.to_string()))
                .collect(),
        ),
    );
    o.insert(
        "auth_events".into(),
        CanonicalJsonValue::Array(
            auth_events
                .into_iter()
                .map(|e| CanonicalJsonValue::String(e.to_string()))
                .collect(),
        ),
    );
    if let Some(sk) = state_key {
        o.insert(
            "state_key".into(),
            CanonicalJsonValue::String(sk.to_owned()),
        );
    }
    Ok(o)
}

impl<'a> Draft<'a> {
    fn new(
        tl: &'a Timeline,
        guard: RoomGuard<'a>,
        room_short: u64,
        record: RoomRecord,
        rules: RoomVersionRules,
    ) -> Self {
        Self {
            tl,
            guard: Some(guard.lock),
            _writer: guard.writer,
            room_short,
            record,
            rules,
            batch: Batch::default(),
            tickets: Vec::new(),
            pending: HashMap::new(),
            pending_state: HashMap::new(),
            pending_short: HashMap::new(),
            redacted: Vec::new(),
            pending_json: HashMap::new(),
            pending_meta: HashMap::new(),
            affected: Vec::new(),
            member_changes: Vec::new(),
            new_room: false,
            touched: false,
            sign_later: false,
            owed: Vec::new(),
        }
    }

    pub fn room_id(&self) -> &RoomId {
        &self.record.room_id
    }

    fn fetch_event(&self, id: &EventId) -> Option<Arc<Pdu>> {
        if let Some((_, p)) = self.pending.get(id) {
            return Some(p.clone());
        }
        self.tl.pdu(id).ok().flatten()
    }

    /// The event currently holding a state key, counting this draft's events.
    pub fn state_short(&self, event_type: &str, state_key: &str) -> Result<Option<u64>> {
        let Some(key) = self.tl.state.key_short(event_type, state_key)? else {
            return Ok(None);
        };
        self.state_at_key(key)
    }

    /// The event holding a state-key short id in the draft's state. That state is the
    /// draft's latest state group, whose map is nearly always in the cache (each new
    /// group goes there as it is made, and every event of the room reads it): a lookup
    /// in memory instead of one in storage for each of the few an event needs.
    fn state_at_key(&self, key: u64) -> Result<Option<u64>> {
        if let Some(map) = self.tl.state.cached(self.record.state_group) {
            return Ok(map.get(&key).copied());
        }
        if let Some(ev) = self.pending_state.get(&key) {
            return Ok(Some(*ev));
        }
        self.tl.state.current(self.room_short, key)
    }

    pub fn state_pdu(&self, event_type: &str, state_key: &str) -> Result<Option<Arc<Pdu>>> {
        match self.state_short(event_type, state_key)? {
            Some(short) => match self.pending_short.get(&short) {
                Some(p) => Ok(Some(p.clone())),
                None => self.tl.pdu_by_short(short),
            },
            None => Ok(None),
        }
    }

    pub fn state_content(&self, event_type: &str, state_key: &str) -> Result<Option<JsonValue>> {
        Ok(self
            .state_pdu(event_type, state_key)?
            .map(|p| p.content_json()))
    }

    /// A member's display name in the room (their localpart without one), as push
    /// rules match it.
    fn display_name(&self, user: &UserId) -> Result<String> {
        Ok(self
            .state_content("m.room.member", user.as_str())?
            .and_then(|c| c.get("displayname")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| user.localpart().to_owned()))
    }

    /// The membership of a user in the draft's current state.
    pub fn membership(&self, user: &UserId) -> Result<Option<String>> {
        Ok(self
            .state_content("m.room.member", user.as_str())?
            .and_then(|c| {
                c.get("membership")
                    .and_then(|m| m.as_str())
                    .map(str::to_owned)
            }))
    }

    pub fn power_levels(&self) -> Result<PowerLevels> {
        let create = self
            .state_pdu("m.room.create", "")?
            .ok_or_else(|| Error::internal("room without create event"))?;
        PowerLevels::new(
            &self.rules,
            &create,
            self.state_content("m.room.power_levels", "")?,
        )
    }

    /// Build, authorise, hash and sign one event, and stage it for the commit.
    /// Build, sign and authorise an event and stage it; it is written by [`Self::commit`].
    pub fn append(&mut self, sender: &UserId, new: NewEvent) -> Result<Arc<Pdu>> {
        let txn = new.txn.clone();
        let built = self.build(sender, new)?;
        self.authorise(&built.pdu)?;
        let pdu = built.pdu.clone();
        self.store(built, txn)?;
        Ok(pdu)
    }

    /// The event `sender` asks for, complete: prev and auth events, hashes, signature
    /// and id. Nothing is checked against the room's state yet.
    pub fn build(&self, sender: &UserId, new: NewEvent) -> Result<Built> {
        if new.kind == TimelineEventType::RoomCreate {
            return Err(Error::forbidden(
                "a room has exactly one m.room.create event",
            ));
        }
        if new.kind.to_string().contains('\0')
            || new.state_key.as_deref().is_some_and(|k| k.contains('\0'))
        {
            return Err(Error::invalid_param(
                "event types and state keys may not contain NUL",
            ));
        }
        let mut content = new.content;
        // Since room version 11 `redacts` lives in the content; before, at the top level.
        let redacts_in_content = self.rules.redaction.content_field_redacts;
        if new.kind == TimelineEventType::RoomRedaction
            && let Some(target) = &new.redacts
            && redacts_in_content
            && let Some(obj) = content.as_object_mut()
        {
            obj.insert("redacts".into(), JsonValue::String(target.to_string()));
        }
        let raw_content = serde_json::value::to_raw_value(&content)?;
        let auth_types = state_res::auth_types_for_event(
            &new.kind,
            sender,
            new.state_key.as_deref(),
            &raw_content,
            &self.rules.authorization,
        )
        .map_err(|e| Error::bad_json(format!("invalid event content: {e}")))?;
        let mut auth_events = Vec::new();
        for (ty, sk) in &auth_types {
            if let Some(p) = self.state_pdu(&ty.to_string(), sk)? {
                auth_events.push(p.event_id.clone());
            }
        }
        let depth = self.record.depth + 1;
        let ts = new
            .timestamp
            .unwrap_or_else(MilliSecondsSinceUnixEpoch::now);
        let mut object = base_object(
            &new.kind,
            sender,
            new.state_key.as_deref(),
            content,
            ts,
            depth,
            self.record.extremities.clone(),
            auth_events,
        )?;
        object.insert(
            "room_id".into(),
            CanonicalJsonValue::String(self.record.room_id.to_string()),
        );
        if new.kind == TimelineEventType::RoomRedaction
            && let Some(target) = &new.redacts
            && !redacts_in_content
        {
            object.insert(
                "redacts".into(),
                CanonicalJsonValue::String(target.to_string()),
            );
        }
        let signing = hash_and_sign(
            &self.tl.globals,
            &self.rules.redaction,
            &mut object,
            self.sign_later,
        )?;
        let hash = reference_hash(&object, &self.rules)?;
        let event_id: OwnedEventId = EventId::parse(format!("${hash}"))?;
        let json = to_json_checked(&object)?;
        let pdu = Arc::new(Pdu::from_json(event_id, &json)?);
        Ok(Built {
            object,
            json,
            pdu,
            signing,
        })
    }

    /// Check a built event against the authorization rules and the room's state.
    pub fn authorise(&self, pdu: &Pdu) -> Result<()> {
        state_res::check_state_independent_auth_rules(
            &self.rules.authorization,
            pdu,
            |id: &EventId| self.fetch_event(id),
        )
        .map_err(Error::forbidden)?;
        state_res::check_state_dependent_auth_rules(
            &self.rules.authorization,
            pdu,
            |ty: &StateEventType, sk: &str| self.state_pdu(&ty.to_string(), sk).ok().flatten(),
        )
        .map_err(Error::forbidden)?;
        if pdu.kind == TimelineEventType::RoomRedaction {
            self.check_redaction(pdu)?;
        }
        Ok(())
    }

    /// A user may redact their own events when their power allows redacting at all,
    /// and others' events only with the `redact` power level.
    fn check_redaction(&self, redaction: &Pdu) -> Result<()> {
        let Some(target_id) = redaction.redacted_event() else {
            return Err(Error::bad_json(
                "a redaction must name the event it redacts",
            ));
        };
        let Some(target) = self.fetch_event(&target_id) else {
            return Ok(());
        };
        if target
            .room_id
            .as_deref()
            .is_some_and(|r| r != self.record.room_id)
        {
            return Err(Error::bad_json("the redacted event is in another room"));
        }
        let power = self.power_levels()?;
        if target.sender != redaction.sender
            && !power
                .levels
                .user_can_redact_event_of_other(&redaction.sender)
        {
            return Err(Error::forbidden("you may only redact your own events"));
        }
        Ok(())
    }

    /// Stage an authorised event: PDU, metadata, timeline and stream entries, state.
    fn store(&mut self, built: Built, txn: Option<Txn>) -> Result<()> {
        let Built {
            object,
            json,
            pdu,
            signing,
        } = built;
        let db = &self.tl.db;
        // Every event stored here was just built and hashed here.
        let short = db.create_short_id(&mut self.batch, IdKind::Event, pdu.event_id.as_str());
        let ticket = db.stream.reserve();
        let pos = ticket.position;
        self.tickets.push(ticket);

        let state_before = self.record.state_group;
        let mut meta = EventMeta {
            room: self.room_short,
            pos,
            state_before,
            state_after: state_before,
            txn: txn
                .as_ref()
                .map(|t| (t.client_session.clone(), t.id.clone())),
            ..Default::default()
        };
        if let Some(sk) = &pdu.state_key {
            let key = self
                .tl
                .state
                .key_short_or_create(&pdu.kind.to_string(), sk)?;
            meta.replaces = self.state_at_key(key)?;
            let group = self
                .tl
                .state
                .new_group(&mut self.batch, state_before, &[(key, short)])?;
            meta.state_after = group;
            self.record.state_group = group;
            self.tl
                .state
                .set_current(&mut self.batch, self.room_short, key, short);
            self.pending_state.insert(key, short);
            if pdu.kind == TimelineEventType::RoomMember {
                let membership = pdu
                    .content_json()
                    .get("membership")
                    .and_then(|m| m.as_str())
                    .unwrap_or("leave")
                    .to_owned();
                let user_short = db.get_or_create_short_id(IdKind::User, sk)?;
                if let Ok(target) = UserId::parse(sk.as_str()) {
                    self.member_changes
                        .push((target.clone(), current_membership(&membership)));
                    self.affected.push(target);
                }
                let was_joined = match meta.replaces {
                    Some(prev) => {
                        let prev = match self.pending_short.get(&prev) {
                            Some(p) => Some(p.clone()),
                            None => self.tl.pdu_by_short(prev)?,
                        };
                        prev.is_some_and(|p| {
                            p.content_json().get("membership").and_then(|m| m.as_str())
                                == Some("join")
                        })
                    }
                    None => false,
                };
                let joined = membership == "join";
                if was_joined != joined {
                    // Who starts or stops sharing the room: device lists follow this.
                    let mut value = u64_key(&[self.room_short, user_short]);
                    value.push(u8::from(joined));
                    self.batch
                        .put(db, "membership_stream", &pos.to_be_bytes(), &value);
                }
                self.batch.put(
                    db,
                    "user_rooms",
                    &u64_key(&[user_short, self.room_short]),
                    membership.as_bytes(),
                );
                self.batch.put(
                    db,
                    "room_members",
                    &u64_key(&[self.room_short, user_short]),
                    membership.as_bytes(),
                );
            }
        }
        if pdu.kind == TimelineEventType::RoomRedaction
            && let Some(target) = pdu.redacted_event()
        {
            self.apply_redaction(&target, &pdu.event_id, &object)?;
        }
        if let Some(txn) = &txn {
            self.batch.put(
                db,
                "txn_ids",
                &txn.key(&pdu.sender, &self.record.room_id),
                pdu.event_id.as_bytes(),
            );
        }
        match signing {
            Signing::Done => self.batch.put(db, "pdus", &short.to_be_bytes(), &json),
            // Written by the commit, once signed.
            Signing::Owed(message) => self.owed.push((short, message)),
        }
        self.batch
            .put(db, "client_parts", &short.to_be_bytes(), &client_part(&pdu));
        self.batch.put(
            db,
            "timeline",
            &timeline_key(self.room_short, pos),
            &short.to_be_bytes(),
        );
        self.batch
            .put(db, "stream", &pos.to_be_bytes(), &short.to_be_bytes());
        self.batch
            .put(db, "event_meta", &short.to_be_bytes(), &meta.encode());
        self.record.extremities = vec![pdu.event_id.clone()];
        self.record.depth = u64::from(pdu.depth);
        self.pending
            .insert(pdu.event_id.clone(), (short, pdu.clone()));
        self.pending_short.insert(short, pdu);
        self.pending_json.insert(short, object);
        self.pending_meta.insert(short, meta);
        self.touched = true;
        Ok(())
    }

    /// Replace the stored target with its redacted form; the reference hash and
    /// signatures stay valid because they cover the redacted form.
    fn apply_redaction(
        &mut self,
        target: &EventId,
        redaction_id: &EventId,
        redaction: &CanonicalJsonObject,
    ) -> Result<()> {
        let db = &self.tl.db;
        let short = match self.pending.get(target) {
            Some((short, _)) => *short,
            None => match self.tl.event_short(target)? {
                Some(short) => short,
                None => return Ok(()),
            },
        };
        let json = match self.pending_json.get(&short) {
            Some(j) => j.clone(),
            None => match db.get("pdus", &short.to_be_bytes())? {
                Some(v) => serde_json::from_slice(&v)?,
                None => return Ok(()),
            },
        };
        let mut meta = match self.pending_meta.get(&short) {
            Some(m) => m.clone(),
            None => match self.tl.meta(short)? {
                Some(m) => m,
                None => return Ok(()),
            },
        };
        if meta.room != self.room_short {
            return Ok(());
        }
        let mut because = redaction.clone();
        because.remove("signatures");
        let redacted = redact(
            json,
            &self.rules.redaction,
            Some(RedactedBecause::from_json(because)),
        )
        .map_err(|e| Error::internal(format!("cannot redact: {e}")))?;
        meta.redacted_by = Some(redaction_id.to_string());
        self.redacted.push(short);
        if self.pending_json.contains_key(&short) {
            // An event of this draft: if it is still being signed, the commit writes
            // this redacted form with its signature.
            self.pending_json.insert(short, redacted.clone());
        }
        self.batch.put(
            db,
            "pdus",
            &short.to_be_bytes(),
            &serde_json::to_vec(&redacted)?,
        );
        // History pages read the redacted event from its PDU from now on.
        self.batch.delete(db, "client_parts", &short.to_be_bytes());
        self.batch
            .put(db, "event_meta", &short.to_be_bytes(), &meta.encode());
        Ok(())
    }

    /// Evaluate the push rules of every recipient for each event of this draft, and
    /// stage what notifies in the same batch as the events; `true` when pushes for
    /// gateways were queued. `joined`: who is joined once this draft is applied.
    async fn stage_push(
        &mut self,
        joined: std::collections::BTreeSet<OwnedUserId>,
    ) -> Result<bool> {
        let mut events: Vec<(u64, u64)> = self
            .pending_meta
            .iter()
            .map(|(short, meta)| (meta.pos, *short))
            .collect();
        events.sort_unstable();
        let someone_to_tell = events.iter().any(|(_, short)| {
            let pdu = &self.pending_short[short];
            joined.iter().any(|u| *u != pdu.sender)
                || (pdu.kind == TimelineEventType::RoomMember && membership_of(pdu) == "invite")
        });
        if !someone_to_tell {
            return Ok(false);
        }
        // A state group names one state for good, so what was read for it stays true.
        let group = self.record.state_group;
        let cached = self
            .tl
            .push_rooms
            .lock()
            .get(&self.room_short)
            .filter(|c| c.group == group)
            .cloned();
        let room_state = match cached {
            Some(c) => c,
            None => {
                let mut names = HashMap::new();
                for user in &joined {
                    names.insert(user.clone(), self.display_name(user)?);
                }
                let c = Arc::new(PushRoomState {
                    group,
                    power_levels: self
                        .power_levels()
                        .ok()
                        .map(|pl| ruma::push::PushConditionPowerLevelsCtx::from(pl.levels)),
                    names,
                });
                let mut rooms = self.tl.push_rooms.lock();
                if rooms.len() > 10_000 {
                    rooms.clear();
                }
                rooms.insert(self.room_short, c.clone());
                c
            }
        };
        let room_id = self.record.room_id.clone();
        let ctx = RoomContext {
            room_id: &room_id,
            room_short: self.room_short,
            member_count: joined.len() as u64,
            power_levels: room_state.power_levels.clone(),
        };
        let mut names: HashMap<OwnedUserId, String> = HashMap::new();
        let mut queued = 0;
        for (pos, short) in events {
            let pdu = self.pending_short[&short].clone();
            let mut recipients = Vec::new();
            let mut targets: Vec<OwnedUserId> = joined.iter().cloned().collect();
            if pdu.kind == TimelineEventType::RoomMember
                && membership_of(&pdu) == "invite"
                && let Some(target) = pdu.state_key.as_deref().and_then(|k| UserId::parse(k).ok())
            {
                targets.push(target);
            }
            for user in targets {
                if user == pdu.sender {
                    continue;
                }
                let name = match room_state.names.get(&user).or_else(|| names.get(&user)) {
                    Some(n) => n.clone(),
                    None => {
                        // An invitee, not among the members read for the cache.
                        let n = self.display_name(&user)?;
                        names.insert(user.clone(), n.clone());
                        n
                    }
                };
                recipients.push((user, name));
            }
            if recipients.is_empty() {
                continue;
            }
            let raw = event_for_rules(&self.pending_json[&short])?;
            let content = pdu.content_json();
            let thread = content
                .get("m.relates_to")
                .filter(|r| r.get("rel_type").and_then(|t| t.as_str()) == Some("m.thread"))
                .and_then(|r| r.get("event_id")?.as_str().map(str::to_owned));
            let push = self.tl.push.clone();
            queued += push
                .stage_event(
                    &mut self.batch,
                    &ctx,
                    &raw,
                    short,
                    pos,
                    thread.as_deref(),
                    &recipients,
                )
                .await?;
        }
        Ok(queued > 0)
    }

    /// Stage the events whose signatures are owed as they are (a placeholder where the
    /// signature goes), each marked as waiting for it, and start computing the
    /// signatures on an idle signer thread: [`SignedWrite::run`] puts them in.
    fn stage_unsigned(&mut self) -> Result<Option<OwedSignatures>> {
        if self.owed.is_empty() {
            return Ok(None);
        }
        let owed = std::mem::take(&mut self.owed);
        let db = &self.tl.db;
        let mut messages = Vec::with_capacity(owed.len());
        for (short, message) in owed {
            let object = self
                .pending_json
                .get(&short)
                .ok_or_else(|| Error::internal("a pending event lost its JSON"))?;
            let json = to_json_checked(object)?;
            let key = short.to_be_bytes();
            self.batch.put(db, "pdus", &key, &json);
            self.batch.put(db, "unsigned_events", &key, b"");
            messages.push(((short, json), message));
        }
        Ok(Some(signing::sign_in_background(
            &self.tl.globals,
            messages,
        )))
    }

    /// Write everything staged, atomically and durably, then make it visible.
    pub async fn commit(mut self) -> Result<RoomRecord> {
        if !self.touched {
            return Ok(self.record);
        }
        let db = self.tl.db.clone();
        // Owed signatures are computed while this thread writes the events and syncs
        // the log (a new room's seven events: about 0.1 ms of the 0.25 ms the sync takes).
        let signer = self.stage_unsigned()?;
        self.batch.put(
            &db,
            "rooms",
            &self.room_short.to_be_bytes(),
            &serde_json::to_vec(&self.record)?,
        );
        let batch = std::mem::take(&mut self.batch);
        // Apply under the room lock, so the next event of the room builds on this one;
        // then let the next writer in.
        let seq = db.write(batch)?;
        // Whoever is woken next reads these events: syncs, the push and appservice
        // senders. Events this draft redacted are left out (and forgotten below, in
        // case an earlier read cached them).
        {
            let mut cache = self.tl.pdus.lock();
            for (short, pdu) in &self.pending_short {
                if self.redacted.contains(short) {
                    continue;
                }
                let meta = self.pending_meta.get(short).cloned();
                cache.insert(*short, pdu.clone(), meta);
            }
        }
        // Syncs learn of the room's news before the positions become visible.
        if let Some(last) = self.tickets.iter().map(|t| t.position).max() {
            self.tl.newest.note(self.room_short, last);
        }
        if !self.redacted.is_empty() {
            self.tl.pdus.lock().forget(&self.redacted);
        }
        // The room's members as this draft left them: for the push rules, then for
        // whom to wake. Kept up to date here, under the lock, as nobody else changes
        // them meanwhile.
        let members = self.tl.members.after_commit(
            self.room_short,
            self.new_room,
            std::mem::take(&mut self.member_changes),
        )?;
        // Events waiting for their signatures keep the room locked until the signed
        // form is written, so that no later write (a redaction) comes before it.
        if signer.is_none() {
            self.guard.take();
        }
        // Push rules are evaluated outside the lock, and what they decide is written
        // right behind the events; one log sync makes both durable before anyone is
        // told, so an acknowledged event always has its notifications.
        let joined = members
            .iter()
            .filter(|(_, m)| *m == "join")
            .map(|(u, _)| u.clone())
            .collect();
        let pushes_queued = self.stage_push(joined).await?;
        let push_batch = std::mem::take(&mut self.batch);
        let seq = db.write(push_batch)?.max(seq);
        // A writer alone syncs the log on its own thread: handing the wait to a blocking
        // thread and being woken again took about 55 µs of a new room's 0.68 ms here,
        // and no other write waits for this thread. With other writers about, the wait
        // is handed over and this thread goes on building their events (always syncing
        // here halved the send scenario's throughput).
        if self.tl.writers.load(std::sync::atomic::Ordering::Relaxed) == 1 {
            db.sync_to(seq)?;
        } else {
            db.sync_to_async(seq).await?;
        }
        // The signed forms are written after the answer, still under the room's lock:
        // clients never see an event's signatures, and the write was a sixteenth of a
        // new room's time before its answer.
        if let Some(signer) = signer {
            let write = SignedWrite {
                db: db.clone(),
                globals: self.tl.globals.clone(),
                room_id: self.record.room_id.clone(),
                events: std::mem::take(&mut self.pending_json),
                signer,
                _guard: self.guard.take(),
            };
            tokio::spawn(async move { write.run() });
        }
        // Dropping the tickets publishes the new stream position; then wake the
        // long-polls of everyone concerned.
        let last = self.tickets.iter().map(|t| t.position).max().unwrap_or(0);
        self.tickets.clear();
        let users = self.affected.iter().chain(members.iter().map(|(u, _)| u));
        self.tl.notifier.notify_all(users.map(|u| &**u), last);
        // The push sender reads its queue only when there is something new in it.
        if pushes_queued {
            self.tl.push.wake_sender();
        }
        Ok(self.record)
    }
}

/// A new room's events, written again once their owed signatures are in, under the
/// room's lock so that no later write (a redaction) comes before it.
struct SignedWrite {
    db: Arc<Db>,
    globals: Arc<Globals>,
    room_id: OwnedRoomId,
    /// The events as they were written unsigned, by short id.
    events: HashMap<u64, CanonicalJsonObject>,
    signer: OwedSignatures,
    _guard: Option<OwnedMutexGuard<()>>,
}

impl SignedWrite {
    /// Put the owed signatures into their events and write the signed events over the
    /// unsigned ones. Not synced: the next log sync, anyone's, covers the write, and
    /// should it be lost in a crash, the events' marks have them signed again at the
    /// next start ([`Timeline::sign_unsigned`]) to the same bytes. The events are
    /// stored either way, so a failure here is logged and left to that.
    fn run(mut self) {
        let result = (|| {
            let (db, globals) = (&self.db, &self.globals);
            let mut batch = Batch::default();
            for ((short, mut json), signature) in self.signer.wait() {
                let object = self
                    .events
                    .get_mut(&short)
                    .ok_or_else(|| Error::internal("a pending event lost its JSON"))?;
                if !signing::finish_json(globals, object, &mut json, &signature) {
                    signing::finish(globals, object, &signature)?;
                    json = to_json_checked(object)?;
                }
                let key = short.to_be_bytes();
                batch.put(db, "pdus", &key, &json);
                batch.delete(db, "unsigned_events", &key);
            }
            db.write(batch)
        })();
        if let Err(e) = result {
            tracing::error!(
                room = %self.room_id,
                error = %e,
                "events stored without their signatures; they are signed at the next start"
            );
        }
    }
}

fn membership_of(pdu: &Pdu) -> String {
    pdu.content_json()
        .get("membership")
        .and_then(|m| m.as_str())
        .unwrap_or("leave")
        .to_owned()
}

/// The short ids of the rooms the user has joined.
pub fn joined_room_shorts(db: &Db, user: &UserId) -> Result<Vec<u64>> {
    let Some(u) = db.short_id(IdKind::User, user.as_str())? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for item in db.scan_prefix("user_rooms", &u.to_be_bytes()) {
        let (k, v) = item?;
        if v.as_ref() == b"join" {
            out.push(u64_at(&k, 1));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pdu(n: u64) -> Arc<Pdu> {
        let json = format!(
            r#"{{"room_id":"!r:x","sender":"@a:x","origin_server_ts":{n},"type":"m.room.message","content":{{}},"depth":1}}"#
        );
        Arc::new(
            Pdu::from_json(EventId::parse(format!("$e{n}")).unwrap(), json.as_bytes()).unwrap(),
        )
    }

    /// Idle room locks are let go; held ones, and ones waited for, stay.
    #[tokio::test]
    async fn idle_room_locks_are_let_go() {
        let mut locks = RoomLocks::new();
        let room = |n: usize| RoomId::parse(format!("!r{n}:x")).unwrap();
        for n in 0..3 {
            locks.insert(room(n), Arc::default());
        }
        let held = locks[&room(0)].clone().lock_owned().await;
        let waiting = locks[&room(1)].clone();
        forget_idle_locks(&mut locks);
        assert!(locks.contains_key(&room(0)) && locks.contains_key(&room(1)));
        assert!(!locks.contains_key(&room(2)));
        drop((held, waiting));
        forget_idle_locks(&mut locks);
        assert!(locks.is_empty());
    }

    /// What was used in the last two generations stays; what was not is dropped when
    /// the younger generation fills; a hit in the old generation moves it to the young.
    #[test]
    fn the_pdu_cache_keeps_what_is_used() {
        let mut cache = PduCache::default();
        let size = PDU_CACHE_GENERATION as u64;
        for n in 0..size {
            cache.insert(n, pdu(n), None);
        }
        // A second generation: the first becomes the old one.
        for n in size..2 * size {
            cache.insert(n, pdu(n), None);
        }
        assert!(cache.get(0).is_some(), "still in the old generation");
        for n in 2 * size..3 * size {
            cache.insert(n, pdu(n), None);
        }
        assert!(
            cache.get(1).is_none(),
            "two generations on, unused, dropped"
        );
        assert!(
            cache.get(0).is_some(),
            "used, so moved on with the young ones"
        );
        assert_eq!(
            cache.get(2 * size).unwrap().event_id.as_str(),
            format!("$e{}", 2 * size)
        );
        cache.forget(&[2 * size]);
        assert!(cache.get(2 * size).is_none());
        assert_eq!(cache.generation, 1);
    }

    /// An event is found by its id for as long as it is cached, in either generation,
    /// and never as another event.
    #[test]
    fn the_pdu_cache_finds_events_by_id() {
        let mut cache = PduCache::default();
        let id = |n: u64| EventId::parse(format!("$e{n}")).unwrap();
        cache.insert(5, pdu(5), None);
        let (short, found) = cache.get_by_id(&id(5)).expect("cached by id");
        assert_eq!((short, found.event_id.as_str()), (5, "$e5"));
        assert!(cache.get_by_id(&id(6)).is_none());
        // A stale entry of the index (the short id now holds another event) is no hit.
        cache.by_id.insert(id_hash(&id(6)), 5);
        assert!(cache.get_by_id(&id(6)).is_none());
        let size = PDU_CACHE_GENERATION as u64;
        for n in 100..100 + size {
            cache.insert(n, pdu(n), None);
        }
        assert!(
            cache.get_by_id(&id(5)).is_some(),
            "found in the old generation"
        );
        for n in 10_000..10_000 + 2 * size {
            cache.insert(n, pdu(n), None);
        }
        assert!(
            cache.get_by_id(&id(100)).is_none(),
            "dropped with its generation"
        );
        assert!(
            cache.by_id.len() <= 2 * PDU_CACHE_GENERATION + 1,
            "the index does not outgrow the cache"
        );
        cache.forget(&[10_000 + 2 * size - 1]);
        assert!(cache.get_by_id(&id(10_000 + 2 * size - 1)).is_none());
    }

    /// Metadata is kept with its PDU, follows it between generations, and goes when a
    /// redaction forgets the event.
    #[test]
    fn the_pdu_cache_keeps_metadata_with_the_pdu() {
        let mut cache = PduCache::default();
        let meta = |pos| EventMeta {
            room: 7,
            pos,
            redacted_by: None,
            ..Default::default()
        };
        cache.insert(1, pdu(1), Some(meta(10)));
        cache.insert(2, pdu(2), None);
        assert_eq!(cache.meta(1).map(|m| (m.room, m.pos)), Some((7, 10)));
        assert!(cache.meta(2).is_none(), "a PDU read alone has no metadata");
        // Fill a generation: the two move to the old one and keep what they had.
        let size = PDU_CACHE_GENERATION as u64;
        for n in 100..100 + size {
            cache.insert(n, pdu(n), None);
        }
        assert!(!cache.young.contains_key(&1));
        assert_eq!(cache.meta(1).map(|m| m.pos), Some(10));
        assert_eq!(
            cache.entry(1).and_then(|c| c.meta.as_ref()).map(|m| m.pos),
            Some(10)
        );
        assert!(
            cache.young.contains_key(&1),
            "a hit moves it to the young generation"
        );
        // Replacing an entry replaces it in place.
        let young = cache.young.len();
        cache.insert(1, pdu(1), Some(meta(11)));
        assert_eq!(cache.young.len(), young);
        assert_eq!(cache.meta(1).map(|m| m.pos), Some(11));
        cache.forget(&[1]);
        assert!(cache.meta(1).is_none() && cache.get(1).is_none());
    }
}
