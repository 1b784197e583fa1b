//! `/sync` (v3): what changed for a user since a stream position, assembled from the
//! room timelines, state groups, the user's own stream and the ephemeral data; long-polls
//! wait on the notifier and wake the moment a commit concerns the user.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use parking_lot::Mutex;

use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde::Serialize;
use serde_json::{Value as JsonValue, json};

use super::{
    Services,
    e2ee::DeviceListChanges,
    ephemeral::{Ephemeral, receipt_content},
    rooms::{
        pdu::{ClientEvent, StoredEvent},
        read::{EventFilter, make_token},
        state::EMPTY_GROUP,
        visibility::SeenMemo,
    },
    users::UserStreamEntry,
};
use crate::{
    error::{Error, Result},
    storage::{IdKind, u64_at},
};

/// The parts of a sync filter Salon applies.
#[derive(Clone, Debug)]
pub struct SyncFilter {
    pub rooms: Option<HashSet<OwnedRoomId>>,
    pub not_rooms: HashSet<OwnedRoomId>,
    pub include_leave: bool,
    pub timeline: EventFilter,
    pub timeline_limit: usize,
    /// Count thread notifications apart (`unread_thread_notifications`).
    pub thread_counts: bool,
    pub state: EventFilter,
    pub ephemeral: EventFilter,
    pub room_account_data: EventFilter,
    pub account_data: EventFilter,
    pub presence: EventFilter,
}

impl Default for SyncFilter {
    fn default() -> Self {
        Self {
            rooms: None,
            not_rooms: HashSet::new(),
            include_leave: false,
            timeline: EventFilter::default(),
            timeline_limit: 10,
            thread_counts: false,
            state: EventFilter::default(),
            ephemeral: EventFilter::default(),
            room_account_data: EventFilter::default(),
            account_data: EventFilter::default(),
            presence: EventFilter::default(),
        }
    }
}

impl SyncFilter {
    fn wants_room(&self, room: &RoomId) -> bool {
        !self.not_rooms.contains(room) && self.rooms.as_ref().is_none_or(|r| r.contains(room))
    }
}

pub struct SyncRequest {
    /// Everything of the request that shapes the answer, as text (`since`, the filter
    /// or its id, `full_state`, …): identical long-polls woken together share one answer.
    pub identity: String,
    /// The client session syncing: it sees the transaction ids it sent events with.
    pub client_session: String,
    pub since: Option<u64>,
    /// To-device messages at or below this position were delivered: delete them.
    pub to_device_acked: Option<u64>,
    pub full_state: bool,
    pub timeout: Duration,
    pub filter: SyncFilter,
    pub set_presence: Option<String>,
}

/// Longest a long-poll may hang.
const MAX_TIMEOUT: Duration = Duration::from_secs(300);

/// A sync token: `s<position>`, or `s<position>_<to-device position>` when the
/// response left to-device messages for the next one (it delivered those at or below
/// the second position).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncToken {
    pub pos: u64,
    pub to_device: u64,
}

impl SyncToken {
    fn format(pos: u64, to_device: u64) -> String {
        if to_device < pos {
            format!("s{pos}_{to_device}")
        } else {
            format!("s{pos}")
        }
    }
}

/// Parse a `since` token.
pub fn parse_since(token: &str, visible: u64) -> Result<SyncToken> {
    let invalid =
        || Error::invalid_param(format!("'{token}' is not a sync token from this server"));
    let rest = token.strip_prefix('s').ok_or_else(invalid)?;
    let (pos, to_device) = match rest.split_once('_') {
        Some((p, t)) => (
            p.parse::<u64>().map_err(|_| invalid())?,
            t.parse::<u64>().map_err(|_| invalid())?,
        ),
        None => {
            let p = rest.parse::<u64>().map_err(|_| invalid())?;
            (p, p)
        }
    };
    if pos > visible {
        return Err(Error::invalid_param(
            "this sync token is from the future: it was not issued by this server",
        ));
    }
    Ok(SyncToken {
        pos,
        to_device: to_device.min(pos),
    })
}

fn type_allowed(filter: &EventFilter, kind: &str) -> bool {
    let matches = |p: &String| match p.strip_suffix('*') {
        Some(prefix) => kind.starts_with(prefix),
        None => p == kind,
    };
    !filter.not_types.iter().any(matches)
        && filter.types.as_ref().is_none_or(|t| t.iter().any(matches))
}

/// A client event in the sync format (no `room_id`), as `req`'s client session sees it.
fn sync_format(s: &Services, e: StoredEvent, req: &SyncRequest) -> Result<ClientEvent> {
    Ok(s.rooms
        .timeline
        .into_client_event(e, Some(&req.client_session))?
        .without_room_id())
}

/// The answer's shape. Events are written straight from their stored form; only the
/// small parts (summaries, counts, receipts) are built as JSON trees.
#[derive(Serialize)]
struct Response {
    next_batch: String,
    rooms: Rooms,
    account_data: Events<JsonValue>,
    presence: Events<JsonValue>,
    to_device: Events<Box<serde_json::value::RawValue>>,
    device_lists: DeviceListChanges,
    device_one_time_keys_count: BTreeMap<ruma::OneTimeKeyAlgorithm, u64>,
    device_unused_fallback_key_types: Vec<String>,
}

#[derive(Default, Serialize)]
struct Rooms {
    join: BTreeMap<OwnedRoomId, JoinedRoom>,
    invite: BTreeMap<OwnedRoomId, JsonValue>,
    knock: BTreeMap<OwnedRoomId, JsonValue>,
    leave: BTreeMap<OwnedRoomId, LeftRoom>,
}

impl Rooms {
    fn is_empty(&self) -> bool {
        self.join.is_empty()
            && self.invite.is_empty()
            && self.knock.is_empty()
            && self.leave.is_empty()
    }
}

#[derive(Serialize)]
struct Events<T> {
    events: Vec<T>,
}

#[derive(Serialize)]
struct Timeline {
    events: Vec<ClientEvent>,
    limited: bool,
    prev_batch: String,
}

#[derive(Serialize)]
struct JoinedRoom {
    timeline: Timeline,
    state: Events<ClientEvent>,
    ephemeral: Events<JsonValue>,
    account_data: Events<JsonValue>,
    unread_notifications: JsonValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    unread_thread_notifications: Option<JsonValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    summary: Option<JsonValue>,
}

#[derive(Serialize)]
struct LeftRoom {
    timeline: Timeline,
    state: Events<ClientEvent>,
    account_data: Events<JsonValue>,
}

fn stripped(e: &StoredEvent) -> JsonValue {
    json!({
        "type": e.pdu.kind.to_string(),
        "state_key": e.pdu.state_key,
        "content": e.pdu.content_json(),
        "sender": e.pdu.sender,
    })
}

/// A sync answer, serialised once: the long-polls that one commit wakes with identical
/// requests are all sent the same bytes.
pub type Answer = Bytes;

/// Answers being built for woken long-polls, by user, device, request and position.
/// A thousand identical long-polls (a client retrying, several tabs of one session)
/// woken by the same message cost one sync, not a thousand.
#[derive(Default)]
pub struct SharedAnswers {
    slots: Mutex<HashMap<AnswerKey, Slot>>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct AnswerKey {
    user: OwnedUserId,
    device: String,
    client_session: String,
    identity: String,
    now: u64,
}

struct Slot {
    cell: Arc<tokio::sync::OnceCell<(Answer, bool)>>,
    born: Instant,
}

/// How long a shared answer serves latecomers of the same wake-up.
const SHARE_FOR: Duration = Duration::from_millis(500);

impl SharedAnswers {
    fn slot(&self, key: AnswerKey) -> Arc<tokio::sync::OnceCell<(Answer, bool)>> {
        let mut slots = self.slots.lock();
        if slots.len() >= 64 {
            slots.retain(|_, s| s.born.elapsed() < SHARE_FOR);
        }
        let slot = slots.entry(key).or_insert_with(|| Slot {
            cell: Arc::new(tokio::sync::OnceCell::new()),
            born: Instant::now(),
        });
        if slot.born.elapsed() >= SHARE_FOR {
            *slot = Slot {
                cell: Arc::new(tokio::sync::OnceCell::new()),
                born: Instant::now(),
            };
        }
        slot.cell.clone()
    }
}

fn build_answer(
    s: &Services,
    user: &UserId,
    device: &str,
    req: &SyncRequest,
    now: u64,
) -> Result<(Answer, bool)> {
    let (response, has_content) = build(s, user, device, req, now)?;
    // Answers run from a few hundred bytes to hundreds of kilobytes (an initial sync of
    // 50 rooms): start at 64 KiB rather than growing from nothing.
    let mut bytes = Vec::with_capacity(64 * 1024);
    serde_json::to_writer(&mut bytes, &response)
        .map_err(|e| Error::internal(format!("cannot serialise the sync answer: {e}")))?;
    // A long-poll keeps its first, usually empty, answer for its whole wait: give the
    // unused space back (in place), or a thousand waiters hold 64 MiB of nothing.
    bytes.shrink_to_fit();
    Ok((Bytes::from(bytes), has_content))
}

/// The answer of a woken long-poll: built once for all identical requests at `now`.
async fn shared_answer(
    s: &Services,
    user: &UserId,
    device: &str,
    req: &SyncRequest,
    now: u64,
) -> Result<(Answer, bool)> {
    let cell = s.sync_answers.slot(AnswerKey {
        user: user.to_owned(),
        device: device.to_owned(),
        client_session: req.client_session.clone(),
        identity: req.identity.clone(),
        now,
    });
    let answer = cell
        .get_or_try_init(|| async { build_answer(s, user, device, req, now) })
        .await?;
    Ok(answer.clone())
}

/// The answer as things stand, for a long-poll whose wait ended without a wake-up.
fn answer_now(s: &Services, user: &UserId, device: &str, req: &SyncRequest) -> Result<Answer> {
    Ok(build_answer(s, user, device, req, s.db.stream.visible())?.0)
}

pub async fn sync(s: &Services, user: &UserId, device: &str, req: SyncRequest) -> Result<Answer> {
    let mut user_rx = s.notifier.subscribe(user);
    let mut visible_rx = s.db.stream.subscribe();
    if let Some(p) = &req.set_presence {
        set_presence_from_sync(s, user, p)?;
    }
    if let Some(acked) = req.to_device_acked {
        s.e2ee.ack_to_device(user, device.into(), acked)?;
    }
    let timeout = req.timeout.min(MAX_TIMEOUT);
    let deadline = tokio::time::Instant::now() + timeout;
    // The first look is this request's own; after a wake-up, the answer is shared with
    // every identical request the same commit woke.
    let mut woken = false;
    loop {
        let now = s.db.stream.visible();
        if let Some(since) = req.since
            && since > now
        {
            return Err(Error::invalid_param(
                "this sync token is from the future: it was not issued by this server",
            ));
        }
        let (answer, has_content) = if woken {
            shared_answer(s, user, device, &req, now).await?
        } else {
            build_answer(s, user, device, &req, now)?
        };
        if req.since.is_none() || has_content || req.full_state || timeout.is_zero() {
            return Ok(answer);
        }
        // An empty answer is cheaper to build again at the deadline than to keep through
        // a long wait (and to free in the middle of a wake-up).
        drop(answer);
        // Something for this user may have been announced but not be readable yet,
        // because a write with an earlier position is still committing: wait for it to
        // become visible and look again, rather than for a further announcement.
        let announced = *user_rx.borrow_and_update();
        if announced > now {
            let wait = visible_rx.wait_for(|v| *v >= announced);
            if tokio::time::timeout_at(deadline, wait).await.is_err() {
                return answer_now(s, user, device, &req);
            }
            woken = true;
            continue;
        }
        // Nothing yet: wait for a commit that concerns this user.
        let timed_out = tokio::select! {
            changed = user_rx.changed() => changed.is_err(),
            _ = tokio::time::sleep_until(deadline) => true,
        };
        if timed_out {
            return answer_now(s, user, device, &req);
        }
        // The change may sit behind a write still in flight; wait until it is visible.
        let wanted = *user_rx.borrow_and_update();
        let wait = visible_rx.wait_for(|v| *v >= wanted);
        if tokio::time::timeout_at(deadline, wait).await.is_err() {
            return answer_now(s, user, device, &req);
        }
        woken = true;
    }
}

fn set_presence_from_sync(s: &Services, user: &UserId, state: &str) -> Result<()> {
    let state = match state {
        "online" | "unavailable" | "offline" => state,
        _ => return Ok(()),
    };
    let current = s.ephemeral.presence(user).map(|p| p.state);
    if current.as_deref() == Some(state) {
        // No change to tell anyone; only the activity time moves.
        s.ephemeral.touch(user);
    } else {
        s.ephemeral.set_presence(user, state, None, peers(s, user)?);
    }
    Ok(())
}

/// Everyone who shares a joined room with the user.
pub fn peers(s: &Services, user: &UserId) -> Result<Vec<OwnedUserId>> {
    Ok(s.members.joined_peers(user)?.into_iter().collect())
}

/// Whether anything happened in a room after `since`: an event (membership changes
/// included), typing, a receipt, or room account data. Answered from memory, so that
/// an incremental sync skips quiet rooms without reading anything.
fn room_has_news(
    s: &Services,
    room_short: u64,
    room_id: &RoomId,
    since: u64,
    account_data: &AccountDataByRoom,
) -> Result<bool> {
    // Events and receipts are answered from memory once the room is known. A write
    // past the sync's horizon may make a quiet room look busy: it is then looked at and
    // found to have nothing.
    if s.rooms.timeline.has_events_after(room_short, since)? {
        return Ok(true);
    }
    let (_, typing_pos) = s.ephemeral.typing(room_id);
    if typing_pos > since {
        return Ok(true);
    }
    if s.ephemeral.has_receipts_after(room_short, since)? {
        return Ok(true);
    }
    Ok(account_data.contains_key(&Some(room_id.to_string())))
}

/// Account data to send, by room (`None` for global): `(type, content)` pairs.
type AccountDataByRoom = HashMap<Option<String>, Vec<(String, JsonValue)>>;

/// All of the user's account data on an initial sync; on an incremental one, the
/// current content of what changed in `(since, now]`. Read once per sync.
fn account_data_to_send(
    s: &Services,
    user: &UserId,
    since: Option<u64>,
    now: u64,
) -> Result<AccountDataByRoom> {
    let mut out: AccountDataByRoom = HashMap::new();
    match since {
        None => {
            for (room, kind, content) in s.users.all_account_data(user)? {
                out.entry(room).or_default().push((kind, content));
            }
        }
        Some(since) => {
            let mut seen = HashSet::new();
            for (_, change) in s.users.stream_changes(user, since, now)?.into_iter().rev() {
                let UserStreamEntry::AccountData { room, kind } = change;
                if seen.insert((room.clone(), kind.clone()))
                    && let Some(content) = s.users.account_data(user, room.as_deref(), &kind)?
                {
                    out.entry(room).or_default().push((kind, content));
                }
            }
        }
    }
    Ok(out)
}

fn account_data_events(
    entries: Option<&Vec<(String, JsonValue)>>,
    filter: &EventFilter,
) -> Vec<JsonValue> {
    entries
        .into_iter()
        .flatten()
        .filter(|(kind, _)| type_allowed(filter, kind))
        .map(|(kind, content)| json!({ "type": kind, "content": content }))
        .collect()
}

/// The user's rooms and their current membership (forgotten rooms left out).
fn memberships(s: &Services, user: &UserId) -> Result<Vec<(u64, OwnedRoomId, String)>> {
    let Some(u) = s.db.short_id(IdKind::User, user.as_str())? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for item in s.db.scan_prefix("user_rooms", &u.to_be_bytes()) {
        let (k, v) = item?;
        let membership = String::from_utf8_lossy(&v).into_owned();
        if membership == "forgotten" {
            continue;
        }
        let room_short = u64_at(&k, 1);
        if let Some(id) = s.db.long_id(room_short)? {
            out.push((room_short, RoomId::parse(id)?, membership));
        }
    }
    Ok(out)
}

fn build(
    s: &Services,
    user: &UserId,
    device: &str,
    req: &SyncRequest,
    now: u64,
) -> Result<(Response, bool)> {
    let mut rooms = Rooms::default();
    let all_account_data = account_data_to_send(s, user, req.since, now)?;
    let tl = &s.rooms.timeline;

    for (room_short, room_id, membership) in memberships(s, user)? {
        if !req.filter.wants_room(&room_id) {
            continue;
        }
        if let Some(since) = req.since
            && !req.full_state
            && !room_has_news(s, room_short, &room_id, since, &all_account_data)?
        {
            continue;
        }
        let Some(member) = tl.current_state_event(room_short, "m.room.member", user.as_str())?
        else {
            continue;
        };
        let member_pos = member.meta.pos;
        if member_pos > now {
            continue; // Committed after this sync's horizon; the next sync has it.
        }
        let changed_since = req.since.is_none_or(|since| member_pos > since);
        match membership.as_str() {
            "join" => {
                let room_account_data = all_account_data.get(&Some(room_id.to_string()));
                if let Some(room) =
                    joined_room(s, user, req, now, room_short, &member, room_account_data)?
                {
                    rooms.join.insert(room_id, room);
                }
            }
            "invite" | "knock" if changed_since => {
                let mut events = Vec::new();
                for kind in [
                    "m.room.create",
                    "m.room.join_rules",
                    "m.room.name",
                    "m.room.avatar",
                    "m.room.canonical_alias",
                    "m.room.encryption",
                    "m.room.topic",
                ] {
                    if let Some(e) = tl.state_event_in_group(member.meta.state_after, kind, "")? {
                        events.push(stripped(&e));
                    }
                }
                if let Some(sender_member) = tl.state_event_in_group(
                    member.meta.state_after,
                    "m.room.member",
                    member.pdu.sender.as_str(),
                )? {
                    events.push(stripped(&sender_member));
                }
                events.push(stripped(&member));
                if membership == "invite" {
                    let room = json!({ "invite_state": { "events": events } });
                    rooms.invite.insert(room_id, room);
                } else {
                    let room = json!({ "knock_state": { "events": events } });
                    rooms.knock.insert(room_id, room);
                }
            }
            "leave" | "ban"
                if (req.since.is_some() && changed_since)
                    || (req.since.is_none() && req.filter.include_leave) =>
            {
                let room = left_room(s, user, req, room_short, &member)?;
                rooms.leave.insert(room_id, room);
            }
            _ => {}
        }
    }

    // Global account data.
    let mut account_data =
        account_data_events(all_account_data.get(&None), &req.filter.account_data);
    // Every user has push rules, if only the server defaults.
    let has_push_rules = account_data
        .iter()
        .any(|e| e["type"] == super::push::ACCOUNT_DATA_TYPE);
    if req.since.is_none()
        && !has_push_rules
        && type_allowed(&req.filter.account_data, super::push::ACCOUNT_DATA_TYPE)
    {
        account_data.push(json!({ "type": super::push::ACCOUNT_DATA_TYPE, "content": super::push::account_data_content(&s.users, user)? }));
    }

    // Presence of the people the user shares rooms with.
    let mut presence = Vec::new();
    if type_allowed(&req.filter.presence, "m.presence")
        && req
            .since
            .is_none_or(|since| s.ephemeral.presence_changed_since(since))
    {
        for peer in peers(s, user)? {
            if let Some(p) = s.ephemeral.presence(&peer)
                && req.since.is_none_or(|since| p.pos > since)
                && p.pos <= now
            {
                presence.push(Ephemeral::presence_event(&peer, &p));
            }
        }
    }

    // End-to-end encryption: messages for this device, whose keys to re-query, and
    // how many one-time keys the device has left.
    let device_id: &ruma::DeviceId = device.into();
    let to_device = s.e2ee.pending_to_device(user, device_id, now)?;
    let device_lists = match req.since {
        Some(since) => s.e2ee.device_list_changes(user, since, now)?,
        None => Default::default(),
    };
    let keys = s.e2ee.key_summary(user, device_id)?;

    let has_content = !(rooms.is_empty()
        && account_data.is_empty()
        && presence.is_empty()
        && to_device.events.is_empty()
        && device_lists.is_empty());
    let response = Response {
        next_batch: SyncToken::format(now, to_device.through),
        rooms,
        account_data: Events {
            events: account_data,
        },
        presence: Events { events: presence },
        to_device: Events {
            events: to_device.events,
        },
        device_lists,
        device_one_time_keys_count: keys.one_time.clone(),
        device_unused_fallback_key_types: keys.unused_fallback.clone(),
    };
    Ok((response, has_content))
}

/// Events of a room in `(after, until]` that the user may see and the filter wants,
/// newest `limit` of them, oldest first; and whether older ones were left out.
fn timeline_window(
    s: &Services,
    user: &UserId,
    room_short: u64,
    after: u64,
    until: u64,
    limit: usize,
    filter: &EventFilter,
) -> Result<(Vec<StoredEvent>, bool)> {
    let mut out = Vec::new();
    let mut cursor = until;
    let mut limited = false;
    let mut seen = SeenMemo::default();
    // One more than the limit tells whether older events were left out.
    let want = (limit + 1).clamp(1, 64);
    'scan: loop {
        let batch = s
            .rooms
            .timeline
            .timeline_positions(room_short, cursor + 1, true, want)?;
        if batch.is_empty() {
            break;
        }
        let newer = batch.iter().take_while(|(pos, _)| *pos > after).count();
        let shorts: Vec<u64> = batch[..newer].iter().map(|(_, short)| *short).collect();
        let events = s.rooms.timeline.stored_many(&shorts)?;
        for ((pos, _), e) in batch[..newer].iter().zip(events) {
            cursor = pos - 1;
            let Some(e) = e else {
                continue;
            };
            if !filter.allows(&e) || !s.rooms.can_see_event_memo(user, &e, &mut seen)? {
                continue;
            }
            if out.len() == limit {
                limited = true;
                break 'scan;
            }
            out.push(e);
        }
        if newer < batch.len() || batch.len() < want || cursor <= after {
            break;
        }
    }
    out.reverse();
    Ok((out, limited))
}

/// The room's state group just after stream position `pos`.
fn group_at(s: &Services, room_short: u64, pos: u64) -> Result<u64> {
    match s
        .rooms
        .timeline
        .timeline_positions(room_short, pos + 1, true, 1)?
        .first()
    {
        Some((_, short)) => Ok(s
            .rooms
            .timeline
            .meta(*short)?
            .map(|m| m.state_after)
            .unwrap_or(EMPTY_GROUP)),
        None => Ok(EMPTY_GROUP),
    }
}

/// State events for the `state` section: the whole state at `group`, or only what
/// differs from `from_group`; lazy loading keeps only the members the timeline needs.
fn state_section(
    s: &Services,
    user: &UserId,
    req: &SyncRequest,
    group: u64,
    from_group: Option<u64>,
    timeline: &[StoredEvent],
) -> Result<Vec<ClientEvent>> {
    let map = s.rooms.timeline.state.load(group)?;
    let before = match from_group {
        Some(g) => Some(s.rooms.timeline.state.load(g)?),
        None => None,
    };
    let in_timeline: HashSet<u64> = timeline.iter().map(|e| e.short).collect();
    let lazy = req.filter.state.lazy_load_members;
    let needed: HashSet<String> = timeline
        .iter()
        .map(|e| e.pdu.sender.to_string())
        .chain(std::iter::once(user.to_string()))
        .collect();
    let wanted: Vec<u64> = map
        .iter()
        .filter(|&(key, event)| {
            !in_timeline.contains(event)
                && before
                    .as_ref()
                    .is_none_or(|before| before.get(key) != Some(event))
        })
        .map(|(_, event)| *event)
        .collect();
    let mut out = Vec::new();
    for e in s.rooms.timeline.stored_many(&wanted)? {
        let Some(e) = e else {
            continue;
        };
        if !req.filter.state.allows(&e) {
            continue;
        }
        if lazy
            && e.pdu.kind == ruma::events::TimelineEventType::RoomMember
            && !needed.contains(e.pdu.state_key.as_deref().unwrap_or_default())
        {
            continue;
        }
        out.push(sync_format(s, e, req)?);
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn joined_room(
    s: &Services,
    user: &UserId,
    req: &SyncRequest,
    now: u64,
    room_short: u64,
    member: &StoredEvent,
    room_account_data: Option<&Vec<(String, JsonValue)>>,
) -> Result<Option<JoinedRoom>> {
    let tl = &s.rooms.timeline;
    let room_id = member.room_id.clone();
    let since = req.since;
    let was_joined_before = member
        .meta
        .replaces
        .and_then(|prev| tl.pdu_by_short(prev).ok().flatten())
        .is_some_and(|p| {
            p.content_json().get("membership").and_then(|m| m.as_str()) == Some("join")
        });
    let newly_joined = since.is_some_and(|since| member.meta.pos > since && !was_joined_before);
    let full = since.is_none() || newly_joined || req.full_state;
    let after = since.unwrap_or(0);
    let (timeline, limited) = timeline_window(
        s,
        user,
        room_short,
        after,
        now,
        req.filter.timeline_limit,
        &req.filter.timeline,
    )?;

    // Ephemeral events.
    let mut ephemeral = Vec::new();
    let (typing, typing_pos) = s.ephemeral.typing(&room_id);
    if type_allowed(&req.filter.ephemeral, "m.typing")
        && ((since.is_none() && !typing.is_empty())
            || since.is_some_and(|since| typing_pos > since && typing_pos <= now))
    {
        ephemeral.push(json!({ "type": "m.typing", "content": { "user_ids": typing } }));
    }
    if type_allowed(&req.filter.ephemeral, "m.receipt") {
        let receipts = match since {
            None => s.ephemeral.receipts(room_short)?,
            Some(since) => s.ephemeral.receipts_since(room_short, since, now)?,
        };
        let visible: Vec<_> = receipts
            .into_iter()
            .filter(|r| !r.is_private() || r.user == user)
            .collect();
        if !visible.is_empty() {
            ephemeral.push(json!({ "type": "m.receipt", "content": receipt_content(&visible) }));
        }
    }

    let account_data = account_data_events(room_account_data, &req.filter.room_account_data);

    if !full && timeline.is_empty() && ephemeral.is_empty() && account_data.is_empty() {
        return Ok(None);
    }

    // State: everything before the timeline when the client has nothing; otherwise only
    // what changed in a gap the timeline does not cover.
    let start_group = match timeline.first() {
        Some(first) => first.meta.state_before,
        None => s
            .rooms
            .timeline
            .room_record(room_short)?
            .map(|r| r.state_group)
            .unwrap_or(EMPTY_GROUP),
    };
    let state = if full {
        state_section(s, user, req, start_group, None, &timeline)?
    } else if limited {
        let since_group = group_at(s, room_short, after)?;
        state_section(s, user, req, start_group, Some(since_group), &timeline)?
    } else {
        Vec::new()
    };
    let prev_batch = match timeline.first() {
        Some(first) => make_token(first.meta.pos - 1),
        None => make_token(now),
    };
    let membership_changed = timeline
        .iter()
        .any(|e| e.pdu.kind == ruma::events::TimelineEventType::RoomMember);
    let mut events = Vec::with_capacity(timeline.len());
    for e in timeline {
        events.push(sync_format(s, e, req)?);
    }

    let (unread, unread_threads) = unread_counts(
        s,
        user,
        room_short,
        now,
        req.filter.thread_counts,
        joined_at(s, member)?,
    )?;
    let summary = if full || membership_changed || limited {
        Some(summary(s, user, room_short)?)
    } else {
        None
    };
    Ok(Some(JoinedRoom {
        timeline: Timeline {
            events,
            limited,
            prev_batch,
        },
        state: Events { events: state },
        ephemeral: Events { events: ephemeral },
        account_data: Events {
            events: account_data,
        },
        unread_notifications: unread,
        unread_thread_notifications: unread_threads
            .filter(|t| t.as_object().is_some_and(|t| !t.is_empty())),
        summary,
    }))
}

/// Heroes and member counts, for clients to name rooms without a name.
fn summary(s: &Services, user: &UserId, room_short: u64) -> Result<JsonValue> {
    let members = s.members.members(room_short)?;
    let with = |membership: &str| -> Vec<&OwnedUserId> {
        members
            .iter()
            .filter(|(_, m)| *m == membership)
            .map(|(u, _)| u)
            .collect()
    };
    let (joined, invited) = (with("join"), with("invite"));
    let mut heroes: Vec<&OwnedUserId> = joined
        .iter()
        .chain(invited.iter())
        .copied()
        .filter(|u| u.as_str() != user.as_str())
        .collect();
    heroes.sort();
    heroes.truncate(5);
    Ok(json!({
        "m.heroes": heroes,
        "m.joined_member_count": joined.len(),
        "m.invited_member_count": invited.len(),
    }))
}

/// Which read receipts a read position is taken from.
#[derive(Clone, Copy)]
pub enum ReadScope<'a> {
    /// Unthreaded receipts only: everything before them is read.
    Unthreaded,
    /// Unthreaded receipts and those for the main timeline.
    Main,
    /// Unthreaded receipts and those for one thread.
    Thread(&'a str),
}

/// The stream position up to which the user has read (their latest public or private
/// read receipt within `scope`).
pub fn read_position(
    s: &Services,
    user: &UserId,
    room_short: u64,
    scope: ReadScope<'_>,
) -> Result<u64> {
    let tl = &s.rooms.timeline;
    let mut read_pos = 0;
    let threads: &[Option<&str>] = match scope {
        ReadScope::Unthreaded => &[None],
        ReadScope::Main => &[None, Some("main")],
        ReadScope::Thread(t) => &[None, Some(t)],
    };
    for kind in ["m.read", "m.read.private"] {
        for thread in threads {
            if let Some(r) = s
                .ephemeral
                .receipt_in_thread(room_short, user, kind, *thread)?
                && let Some(e) = tl.event_short(&r.event_id)?
                && let Some(m) = tl.meta(e)?
            {
                read_pos = read_pos.max(m.pos);
            }
        }
    }
    Ok(read_pos)
}

/// Notifications the push rules gave the user after their read receipts: for the room,
/// or (when the filter asks) for the main timeline and each thread apart.
/// The position of the join that began the user's current stay in the room (member
/// events that only change the profile keep it).
fn joined_at(s: &Services, member: &StoredEvent) -> Result<u64> {
    let tl = &s.rooms.timeline;
    let mut pos = member.meta.pos;
    let mut replaces = member.meta.replaces;
    for _ in 0..64 {
        let Some(prev) = replaces else { break };
        let (Some(pdu), Some(meta)) = (tl.pdu_by_short(prev)?, tl.meta(prev)?) else {
            break;
        };
        if pdu
            .content_json()
            .get("membership")
            .and_then(|m| m.as_str())
            != Some("join")
        {
            break;
        }
        pos = meta.pos;
        replaces = meta.replaces;
    }
    Ok(pos)
}

/// Counting starts after the user's join (`joined_at`): what came before, their own
/// invitation included, is not unread in the room they are now in.
fn unread_counts(
    s: &Services,
    user: &UserId,
    room_short: u64,
    now: u64,
    by_thread: bool,
    joined_at: u64,
) -> Result<(JsonValue, Option<JsonValue>)> {
    let main_read = read_position(s, user, room_short, ReadScope::Main)?.max(joined_at);
    let (main, threads) = if by_thread {
        let unthreaded = read_position(s, user, room_short, ReadScope::Unthreaded)?.max(joined_at);
        let thread_read = |t: &str| {
            read_position(s, user, room_short, ReadScope::Thread(t))
                .unwrap_or(unthreaded)
                .max(joined_at)
        };
        s.push.counts(
            user,
            room_short,
            unthreaded,
            main_read,
            now,
            Some(&thread_read),
        )?
    } else {
        s.push
            .counts(user, room_short, main_read, main_read, now, None)?
    };
    let counts = |c: &super::push::Counts| json!({ "notification_count": c.notifications, "highlight_count": c.highlights });
    let threads = by_thread.then(|| {
        JsonValue::Object(
            threads
                .iter()
                .filter(|(_, c)| c.notifications > 0)
                .map(|(t, c)| (t.clone(), counts(c)))
                .collect(),
        )
    });
    Ok((counts(&main), threads))
}

fn left_room(
    s: &Services,
    user: &UserId,
    req: &SyncRequest,
    room_short: u64,
    member: &StoredEvent,
) -> Result<LeftRoom> {
    let after = req.since.unwrap_or(0);
    let (timeline, limited) = timeline_window(
        s,
        user,
        room_short,
        after,
        member.meta.pos,
        req.filter.timeline_limit,
        &req.filter.timeline,
    )?;
    let start_group = timeline
        .first()
        .map(|e| e.meta.state_before)
        .unwrap_or(member.meta.state_after);
    let state = state_section(s, user, req, start_group, None, &timeline)?;
    let prev_batch = timeline
        .first()
        .map(|f| make_token(f.meta.pos - 1))
        .unwrap_or_else(|| make_token(member.meta.pos));
    let mut events = Vec::with_capacity(timeline.len());
    for e in timeline {
        events.push(sync_format(s, e, req)?);
    }
    Ok(LeftRoom {
        timeline: Timeline {
            events,
            limited,
            prev_batch,
        },
        state: Events { events: state },
        account_data: Events { events: Vec::new() },
    })
}
