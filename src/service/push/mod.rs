//! Push: each user's rules, their evaluation for every event and every member (which
//! feeds exact unread counts, `/notifications` and pushers), the pushers themselves, and
//! the persistent queue of notifications for push gateways ([`sender`] delivers it).
//!
//! Evaluation happens in the event pipeline, right after the room's events are written
//! (outside the room lock) and made durable by the same log sync: an event that was
//! acknowledged has its notifications recorded, and a notification for a push gateway
//! is queued on disk before anyone is told the event exists.

pub mod rules;
pub mod sender;

use std::{borrow::Cow, collections::HashMap, sync::Arc};

use parking_lot::Mutex;
use ruma::{
    CanonicalJsonObject, OwnedRoomId, OwnedUserId, RoomId, UInt, UserId,
    api::client::push::{Pusher, PusherKind},
    push::{
        Action, AnyPushRuleRef, FlattenedJson, PushCondition, PushConditionPowerLevelsCtx,
        PushConditionRoomCtx, Ruleset,
    },
    serde::Raw,
};
use serde::{Deserialize, Serialize};

pub use self::rules::{ACCOUNT_DATA_TYPE, account_data_content};
use super::users::{Users, now_ms};
use crate::{
    config::PushConfig,
    error::{Error, Result},
    storage::{Batch, Db, IdKind, str_key, str_prefix, u64_at, u64_key},
};

/// What the rules said about one event for one user, as stored in `push_actions`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PushAction {
    pub event: u64,
    pub highlight: bool,
    /// The thread the event belongs to, for per-thread counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread: Option<String>,
    pub actions: Vec<Action>,
}

/// The part of a stored [`PushAction`] that counting needs; the actions themselves
/// are skipped unparsed.
#[derive(Deserialize)]
struct CountedAction<'a> {
    highlight: bool,
    #[serde(default, borrow)]
    thread: Option<Cow<'a, str>>,
}

/// A pusher as stored: the client's definition and the device that set it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PusherRecord {
    pub pusher: serde_json::Value,
    pub device_id: String,
    pub created_ts: u64,
}

impl PusherRecord {
    pub fn parsed(&self) -> Result<Pusher> {
        serde_json::from_value(self.pusher.clone())
            .map_err(|e| Error::internal(format!("stored pusher unreadable: {e}")))
    }
}

/// What the event pipeline needs of a pusher that goes to a push gateway.
struct GatewayPusher {
    app_id: String,
    pushkey: String,
}

/// One notification waiting for a push gateway.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QueuedPush {
    pub user: OwnedUserId,
    pub app_id: String,
    pub pushkey: String,
    pub room_id: OwnedRoomId,
    pub event_short: u64,
    pub actions: Vec<Action>,
    pub attempts: u32,
    pub first_try_ms: u64,
    pub next_try_ms: u64,
}

/// Unread counts of one room (or thread).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub notifications: u64,
    pub highlights: u64,
}

/// The room as push rules see it when an event is evaluated.
pub struct RoomContext<'a> {
    pub room_id: &'a RoomId,
    pub room_short: u64,
    pub member_count: u64,
    pub power_levels: Option<PushConditionPowerLevelsCtx>,
}

pub struct Push {
    db: Arc<Db>,
    users: Arc<Users>,
    pub config: PushConfig,
    /// Each user's rules, and whether they are the server's defaults.
    rules: Mutex<HashMap<OwnedUserId, (Arc<Ruleset>, bool)>>,
    /// Counts saves of rules, so that a read that raced a save is not cached.
    rules_generation: std::sync::atomic::AtomicU64,
    /// Held by an edit of rules from its read to its save: edits go one at a time, and
    /// none is lost to another's save.
    rules_edit: Mutex<()>,
    /// Each user's push gateway pushers, read and parsed once for the event pipeline;
    /// dropped on every change.
    pusher_cache: Mutex<HashMap<OwnedUserId, Arc<Vec<GatewayPusher>>>>,
    /// Counts pusher changes, so that a read that raced a change is not cached.
    pusher_generation: std::sync::atomic::AtomicU64,
    /// Wakes the sender when something was queued.
    pub queued: tokio::sync::Notify,
}

/// What the rules decided for a recipient: the actions, and the stored push action
/// when they notify.
struct Decision {
    actions: Vec<Action>,
    stored: Option<Vec<u8>>,
}

impl Decision {
    fn new(actions: &[Action], event: u64, thread: Option<&str>) -> Result<Self> {
        let stored = if actions.iter().any(Action::should_notify) {
            Some(serde_json::to_vec(&PushAction {
                event,
                highlight: actions.iter().any(Action::is_highlight),
                thread: thread.map(str::to_owned),
                actions: actions.to_vec(),
            })?)
        } else {
            None
        };
        Ok(Self {
            actions: actions.to_vec(),
            stored,
        })
    }
}

/// Whether an event names a user where a push rule of the server's defaults could look
/// for them: their user name (and so their id) anywhere in the event, their display
/// name in its body. Both sides are lowercased, as the rules match; an id with a
/// character JSON escapes is always taken as named.
fn names(event_lower: &str, body_lower: Option<&str>, user: &UserId, name_lower: &str) -> bool {
    user.as_str().contains(['"', '\\'])
        || event_lower.contains(&user.localpart().to_ascii_lowercase())
        || (!name_lower.is_empty() && body_lower.is_some_and(|b| b.contains(name_lower)))
}

/// A cheap test of what word matching on `content.body` needs: a pattern without
/// wildcards must appear in the body. ruma compiles a regex for every word match, for
/// every recipient; most rules are ruled out by this test first.
fn word_may_match(body_lower: Option<&str>, pattern: &str) -> bool {
    if pattern.contains(['*', '?']) {
        return true;
    }
    body_lower.is_some_and(|b| b.contains(&pattern.to_lowercase()))
}

/// `event_match` on any key but `content.body` compares the whole value with a glob,
/// ignoring case; ruma lowercases both sides and builds a matcher each time, for each
/// of the rules a message goes through before one matches, for each recipient. A
/// pattern without wildcards is an equality, decided here without allocating when both
/// sides are ASCII. A missing (or not string) value never matches, as in ruma.
fn value_may_match(value: Option<&str>, pattern: &str) -> bool {
    let Some(value) = value else {
        return false;
    };
    if pattern.contains(['*', '?']) || !value.is_ascii() || !pattern.is_ascii() {
        return true;
    }
    value.eq_ignore_ascii_case(pattern)
}

/// What the cheap tests read of the event being evaluated.
struct EventView<'a> {
    flat: &'a FlattenedJson,
    room_id: &'a RoomId,
    body_lower: Option<&'a str>,
}

impl EventView<'_> {
    /// The string an `event_match` condition on `key` looks at (as ruma finds it).
    fn value(&self, key: &str) -> Option<&str> {
        match key {
            "room_id" => Some(self.room_id.as_str()),
            _ => self.flat.get_str(key),
        }
    }
}

/// `false` only when the rule cannot apply (so ruma's evaluation can be skipped).
fn may_apply(rule: &AnyPushRuleRef<'_>, event: &EventView<'_>, name_lower: &str) -> bool {
    if !rule.enabled() {
        return false;
    }
    match rule {
        AnyPushRuleRef::Content(r) => word_may_match(event.body_lower, &r.pattern),
        AnyPushRuleRef::Override(r) | AnyPushRuleRef::Underride(r) => {
            r.conditions.iter().all(|c| match c {
                PushCondition::EventMatch(m) if m.key == "content.body" => {
                    word_may_match(event.body_lower, &m.pattern)
                }
                PushCondition::EventMatch(m) => value_may_match(event.value(&m.key), &m.pattern),
                #[allow(deprecated)]
                PushCondition::ContainsDisplayName => {
                    !name_lower.is_empty()
                        && event.body_lower.is_some_and(|b| b.contains(name_lower))
                }
                _ => true,
            })
        }
        _ => true,
    }
}

/// The fields of a PDU that only servers read. Push rules are written against events as
/// clients see them; writing out each message whole (hashes, signatures and the event
/// graph's ids included) to flatten it for the rules was a fifth of their cost.
const SERVER_ONLY_FIELDS: [&str; 5] = [
    "auth_events",
    "prev_events",
    "depth",
    "hashes",
    "signatures",
];

/// The event as push rules see it: the PDU without its server-only fields.
pub fn event_for_rules(
    pdu: &CanonicalJsonObject,
) -> Result<Raw<ruma::events::AnySyncTimelineEvent>> {
    struct ClientFields<'a>(&'a CanonicalJsonObject);
    impl Serialize for ClientFields<'_> {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.collect_map(
                self.0
                    .iter()
                    .filter(|(k, _)| !SERVER_ONLY_FIELDS.contains(&k.as_str())),
            )
        }
    }
    Ok(Raw::from_json(serde_json::value::to_raw_value(
        &ClientFields(pdu),
    )?))
}

/// Counting stops here: clients show "99+" long before.
const MAX_COUNT: u64 = 999;

impl Push {
    pub fn new(db: Arc<Db>, users: Arc<Users>, config: PushConfig) -> Self {
        Self {
            db,
            users,
            config,
            rules: Mutex::new(HashMap::new()),
            rules_generation: std::sync::atomic::AtomicU64::new(0),
            rules_edit: Mutex::new(()),
            pusher_cache: Mutex::new(HashMap::new()),
            pusher_generation: std::sync::atomic::AtomicU64::new(0),
            queued: tokio::sync::Notify::new(),
        }
    }

    // --- rules ---

    /// The user's ruleset (cached; a user's entry is dropped whenever their rules are
    /// saved).
    pub fn ruleset(&self, user: &UserId) -> Result<Arc<Ruleset>> {
        Ok(self.ruleset_and_origin(user)?.0)
    }

    /// The user's ruleset, and whether it is the server's default one.
    fn ruleset_and_origin(&self, user: &UserId) -> Result<(Arc<Ruleset>, bool)> {
        use std::sync::atomic::Ordering;
        if let Some(r) = self.rules.lock().get(user) {
            return Ok(r.clone());
        }
        let generation = self.rules_generation.load(Ordering::SeqCst);
        let (rules, default) = rules::ruleset_and_origin(&self.users, user)?;
        let entry = (Arc::new(rules), default);
        let mut cache = self.rules.lock();
        // Rules read before a save that has since dropped its entry are not kept.
        if self.rules_generation.load(Ordering::SeqCst) == generation {
            if cache.len() > 10_000 {
                cache.clear();
            }
            cache.insert(user.to_owned(), entry.clone());
        }
        Ok(entry)
    }

    /// Changes the user's rules: `edit` is given the current ones, and what it leaves
    /// is saved unless it fails. Edits go one at a time, so that each starts from the
    /// one before: two made at once (from two devices) both take effect.
    pub fn edit_rules<T>(
        &self,
        user: &UserId,
        edit: impl FnOnce(&mut Ruleset) -> Result<T>,
    ) -> Result<T> {
        let _one_at_a_time = self.rules_edit.lock();
        let mut rules = (*self.ruleset(user)?).clone();
        let out = edit(&mut rules)?;
        rules::save(&self.users, user, &rules)?;
        let mut cache = self.rules.lock();
        self.rules_generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        cache.remove(user);
        Ok(out)
    }

    // --- evaluation, in the event pipeline ---

    /// Evaluate an event for each recipient and stage what notifies: the action for
    /// counts and `/notifications`, and a queued push per pusher of the recipient.
    /// `recipients` are `(user, display name in the room)`. Returns how many pushes
    /// were queued for gateways.
    pub async fn stage_event(
        &self,
        batch: &mut Batch,
        room: &RoomContext<'_>,
        event: &Raw<ruma::events::AnySyncTimelineEvent>,
        event_short: u64,
        pos: u64,
        thread: Option<&str>,
        recipients: &[(OwnedUserId, String)],
    ) -> Result<usize> {
        // Flatten the event once for every recipient (ruma's `get_actions` would do it
        // per call); the loop below is `Ruleset::get_match` over that one flattening.
        let flat = FlattenedJson::from_raw(event);
        let body_lower = flat.get_str("content.body").map(str::to_lowercase);
        let view = EventView {
            flat: &flat,
            room_id: room.room_id,
            body_lower: body_lower.as_deref(),
        };
        // One room context for the event; only the recipient changes in it.
        let Some((first, _)) = recipients.first() else {
            return Ok(0);
        };
        let mut ctx = PushConditionRoomCtx::new(
            room.room_id.to_owned(),
            UInt::new_saturating(room.member_count),
            first.clone(),
            String::new(),
        );
        if let Some(pl) = &room.power_levels {
            ctx = ctx.with_power_levels(pl.clone());
        }
        // The server's default rules differ from one member to the next only where they
        // name the member (an invite's target, a mention, a display name or user name
        // in the body): for every member on the defaults whom the event does not name,
        // they decide the same, so that decision is taken once an event.
        let event_lower = event.json().get().to_lowercase();
        let mut unnamed: Option<Decision> = None;
        let mut queued = 0;
        for (user, display_name) in recipients {
            let (rules, default) = self.ruleset_and_origin(user)?;
            let name_lower = display_name.to_lowercase();
            let shared = default && !names(&event_lower, view.body_lower, user, &name_lower);
            let own;
            let decision = match &unnamed {
                Some(d) if shared => d,
                _ => {
                    ctx.user_id.clone_from(user);
                    ctx.user_display_name.clone_from(display_name);
                    let mut actions: &[Action] = &[];
                    for rule in rules.iter() {
                        if !may_apply(&rule, &view, &name_lower) {
                            continue;
                        }
                        if rule.applies(&flat, &ctx).await {
                            actions = rule.actions();
                            break;
                        }
                    }
                    let d = Decision::new(actions, event_short, thread)?;
                    if shared {
                        unnamed.insert(d)
                    } else {
                        own = d;
                        &own
                    }
                }
            };
            let Some(stored) = &decision.stored else {
                continue;
            };
            let user_short = self
                .db
                .get_or_create_short_id(IdKind::User, user.as_str())?;
            batch.put(
                &self.db,
                "push_actions",
                &u64_key(&[user_short, room.room_short, pos]),
                stored,
            );
            batch.put(
                &self.db,
                "user_notifications",
                &u64_key(&[user_short, pos]),
                &room.room_short.to_be_bytes(),
            );
            if !self.config.enabled {
                continue;
            }
            for pusher in self.gateway_pushers(user)?.iter() {
                let item = QueuedPush {
                    user: user.clone(),
                    app_id: pusher.app_id.clone(),
                    pushkey: pusher.pushkey.clone(),
                    room_id: room.room_id.to_owned(),
                    event_short,
                    actions: decision.actions.clone(),
                    attempts: 0,
                    first_try_ms: 0,
                    next_try_ms: 0,
                };
                let mut key = u64_key(&[pos, user_short]);
                key.extend_from_slice(pusher.pushkey.as_bytes());
                batch.put(&self.db, "push_queue", &key, &serde_json::to_vec(&item)?);
                queued += 1;
            }
        }
        Ok(queued)
    }

    /// Wake the sender (after a commit that queued pushes).
    pub fn wake_sender(&self) {
        self.queued.notify_one();
    }

    // --- counts and notifications ---

    /// Notifications of a room up to `until` that are unread: main-timeline events after
    /// `main_read`; with `thread_reads`, each thread's events after that thread's own
    /// read position (counted apart), otherwise those too after `main_read`. The scan
    /// starts after `scan_from`, below which everything is read.
    pub fn counts(
        &self,
        user: &UserId,
        room_short: u64,
        scan_from: u64,
        main_read: u64,
        until: u64,
        thread_reads: Option<&dyn Fn(&str) -> u64>,
    ) -> Result<(Counts, HashMap<String, Counts>)> {
        let mut main = Counts::default();
        let mut threads: HashMap<String, Counts> = HashMap::new();
        let Some(user_short) = self.db.short_id(IdKind::User, user.as_str())? else {
            return Ok((main, threads));
        };
        let mut thread_read_cache: HashMap<String, u64> = HashMap::new();
        let prefix = u64_key(&[user_short, room_short]);
        // Without per-thread reads, nothing at or before the main read position counts.
        let below = match thread_reads {
            Some(_) => scan_from,
            None => scan_from.max(main_read),
        };
        let start = u64_key(&[user_short, room_short, below.saturating_add(1)]);
        let mut failed = None;
        self.db
            .visit_from("push_actions", &prefix, &start, true, |k, v| {
                let pos = u64_at(k, 2);
                if pos > until {
                    return false;
                }
                let action: CountedAction = match serde_json::from_slice(v) {
                    Ok(a) => a,
                    Err(e) => {
                        failed = Some(e);
                        return false;
                    }
                };
                let bucket = match (&action.thread, thread_reads) {
                    (Some(thread), Some(read_of)) => {
                        let read = match thread_read_cache.get(thread.as_ref()) {
                            Some(read) => *read,
                            None => *thread_read_cache
                                .entry(thread.to_string())
                                .or_insert_with(|| read_of(thread)),
                        };
                        if pos <= read {
                            return true;
                        }
                        threads.entry(thread.to_string()).or_default()
                    }
                    _ => {
                        if pos <= main_read {
                            return true;
                        }
                        &mut main
                    }
                };
                if bucket.notifications < MAX_COUNT {
                    bucket.notifications += 1;
                    if action.highlight {
                        bucket.highlights += 1;
                    }
                }
                true
            })?;
        if let Some(e) = failed {
            return Err(e.into());
        }
        Ok((main, threads))
    }

    /// The user's notifications, newest first, before position `before`: `(position,
    /// room short id, action)`.
    pub fn notifications(
        &self,
        user: &UserId,
        before: Option<u64>,
        limit: usize,
        only_highlight: bool,
    ) -> Result<Vec<(u64, u64, PushAction)>> {
        let Some(user_short) = self.db.short_id(IdKind::User, user.as_str())? else {
            return Ok(Vec::new());
        };
        let prefix = user_short.to_be_bytes();
        let from = u64_key(&[user_short, before.unwrap_or(u64::MAX).saturating_sub(1)]);
        let mut out = Vec::new();
        for item in self
            .db
            .scan_from("user_notifications", &prefix, &from, false)
        {
            let (k, v) = item?;
            let pos = u64_at(&k, 1);
            let room_short = u64_at(&v, 0);
            let Some(action) = self
                .db
                .get("push_actions", &u64_key(&[user_short, room_short, pos]))?
            else {
                continue;
            };
            let action: PushAction = serde_json::from_slice(&action)?;
            if only_highlight && !action.highlight {
                continue;
            }
            out.push((pos, room_short, action));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    // --- pushers ---

    /// The user's pushers that go to a push gateway (HTTP pushers that parse), from
    /// memory after the first read.
    fn gateway_pushers(&self, user: &UserId) -> Result<Arc<Vec<GatewayPusher>>> {
        if let Some(p) = self.pusher_cache.lock().get(user) {
            return Ok(p.clone());
        }
        use std::sync::atomic::Ordering;
        let generation = self.pusher_generation.load(Ordering::SeqCst);
        let pushers = Arc::new(
            self.pushers(user)?
                .iter()
                .filter_map(|record| {
                    let pusher = record.parsed().ok()?;
                    matches!(pusher.kind, PusherKind::Http(_)).then(|| GatewayPusher {
                        app_id: pusher.ids.app_id,
                        pushkey: pusher.ids.pushkey,
                    })
                })
                .collect::<Vec<_>>(),
        );
        let mut cache = self.pusher_cache.lock();
        if self.pusher_generation.load(Ordering::SeqCst) == generation {
            if cache.len() > 10_000 {
                cache.clear();
            }
            cache.insert(user.to_owned(), pushers.clone());
        }
        Ok(pushers)
    }

    /// Write a change of pushers and forget the cached ones (a change can touch other
    /// users' pushers too).
    fn commit_pushers(&self, batch: Batch) -> Result<()> {
        let result = self.db.commit(batch);
        let mut cache = self.pusher_cache.lock();
        self.pusher_generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        cache.clear();
        result
    }

    pub fn pushers(&self, user: &UserId) -> Result<Vec<PusherRecord>> {
        self.db
            .scan_prefix("pushers", &str_prefix(&[user.as_str()]))
            .map(|r| Ok(serde_json::from_slice(&r?.1)?))
            .collect()
    }

    pub fn pusher(
        &self,
        user: &UserId,
        app_id: &str,
        pushkey: &str,
    ) -> Result<Option<PusherRecord>> {
        match self
            .db
            .get("pushers", &str_key(&[user.as_str(), app_id, pushkey]))?
        {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    /// `/pushers/set` with a pusher: check it, then add or replace it. Without
    /// `append`, other users' pushers with the same app id and push key are removed
    /// (the device changed hands).
    /// Nothing is set for a device removed meanwhile
    /// ([`crate::service::users::Users::with_device`]).
    pub fn set_pusher(
        &self,
        user: &UserId,
        device: &str,
        pusher: &Pusher,
        append: bool,
    ) -> Result<()> {
        self.users.with_device(user, device, || {
            self.add_pusher(user, device, pusher, append)
        })
    }

    fn add_pusher(&self, user: &UserId, device: &str, pusher: &Pusher, append: bool) -> Result<()> {
        match &pusher.kind {
            PusherKind::Http(data) => self.check_gateway_url(&data.url)?,
            PusherKind::Email(_) => {
                return Err(Error::invalid_param(
                    "email pushers are not supported by this server",
                ));
            }
            _ => return Err(Error::invalid_param("unknown pusher kind")),
        }
        if pusher.ids.app_id.is_empty() || pusher.ids.app_id.len() > 64 {
            return Err(Error::invalid_param("app_id must be 1 to 64 characters"));
        }
        if pusher.ids.pushkey.is_empty() || pusher.ids.pushkey.len() > 512 {
            return Err(Error::invalid_param("pushkey must be 1 to 512 bytes"));
        }
        let mut batch = Batch::default();
        if !append {
            for item in self.db.scan_prefix("pushers", b"") {
                let (k, v) = item?;
                let record: PusherRecord = serde_json::from_slice(&v)?;
                let Ok(other) = record.parsed() else { continue };
                if other.ids == pusher.ids && !k.starts_with(&str_prefix(&[user.as_str()])) {
                    batch.delete(&self.db, "pushers", &k);
                }
            }
        }
        let record = PusherRecord {
            pusher: serde_json::to_value(pusher)?,
            device_id: device.to_owned(),
            created_ts: now_ms(),
        };
        batch.put(
            &self.db,
            "pushers",
            &str_key(&[user.as_str(), &pusher.ids.app_id, &pusher.ids.pushkey]),
            &serde_json::to_vec(&record)?,
        );
        self.commit_pushers(batch)
    }

    pub fn delete_pusher(&self, user: &UserId, app_id: &str, pushkey: &str) -> Result<()> {
        let mut batch = Batch::default();
        batch.delete(
            &self.db,
            "pushers",
            &str_key(&[user.as_str(), app_id, pushkey]),
        );
        self.commit_pushers(batch)
    }

    /// Remove the pushers a device set (when it logs out).
    pub fn delete_pushers_of_device(&self, user: &UserId, device: &str) -> Result<()> {
        let mut batch = Batch::default();
        for item in self
            .db
            .scan_prefix("pushers", &str_prefix(&[user.as_str()]))
        {
            let (k, v) = item?;
            let record: PusherRecord = serde_json::from_slice(&v)?;
            if record.device_id == device {
                batch.delete(&self.db, "pushers", &k);
            }
        }
        self.commit_pushers(batch)
    }

    /// Push gateways are reached at `/_matrix/push/v1/notify`, over https unless the
    /// host is one the configuration allows plain http for.
    fn check_gateway_url(&self, url: &str) -> Result<()> {
        let bad = |why: &str| Error::invalid_param(format!("pusher url {url:?}: {why}"));
        let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("not a URL"))?;
        let host_port = rest.split('/').next().unwrap_or_default();
        let host = if let Some(v6) = host_port.strip_prefix('[') {
            v6.split(']').next().unwrap_or_default()
        } else {
            host_port.rsplit_once(':').map_or(host_port, |(h, _)| h)
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        match scheme {
            "https" => {}
            "http" if self.config.allow_http_hosts.iter().any(|h| h == host) => {}
            "http" => return Err(bad("push gateways must use https")),
            _ => return Err(bad("only http(s) URLs can be push gateways")),
        }
        if !rest.ends_with("/_matrix/push/v1/notify") {
            return Err(bad("the path must be /_matrix/push/v1/notify"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn word_rules_are_ruled_out_only_when_they_cannot_match() {
        let body = Some("the budget is due");
        assert!(word_may_match(body, "Budget"));
        assert!(!word_may_match(body, "invoice"));
        assert!(word_may_match(body, "inv*ce"), "wildcards are left to ruma");
        assert!(!word_may_match(None, "budget"));
    }

    #[test]
    fn literal_values_are_ruled_out_only_when_they_cannot_match() {
        assert!(value_may_match(Some("m.room.message"), "m.room.message"));
        assert!(value_may_match(Some("M.Room.Message"), "m.room.MESSAGE"));
        assert!(!value_may_match(Some("m.room.message"), "m.room.member"));
        assert!(!value_may_match(Some("m.room.message.x"), "m.room.message"));
        assert!(!value_may_match(None, "m.notice"));
        assert!(
            value_may_match(Some("m.room.anything"), "m.room.*"),
            "globs are left to ruma"
        );
        assert!(
            value_may_match(Some("Ünïcode"), "ünïcode"),
            "non-ASCII is left to ruma"
        );
    }

    /// For members on the server's default rules whom an event does not name, ruma's
    /// own evaluation decides alike: the decision taken once for the first of them
    /// holds for the others. Those it names are told apart.
    #[tokio::test]
    async fn default_rules_decide_alike_for_members_an_event_does_not_name() {
        let room_id = ruma::room_id!("!room:example.org");
        let members = [
            (ruma::user_id!("@alice:example.org"), "Alice"),
            (ruma::user_id!("@carol:example.org"), "Carol Chef"),
            (ruma::user_id!("@dave:example.org"), ""),
            (ruma::user_id!("@erin:example.org"), "Erin"),
        ];
        let bob = ruma::owned_user_id!("@bob:example.org");
        let events = [
            (
                json!({"type": "m.room.message", "sender": bob, "content": {"msgtype": "m.text", "body": "hello all"}}),
                None,
            ),
            (
                json!({"type": "m.room.message", "sender": bob, "content": {"msgtype": "m.text", "body": "look", "m.mentions": {"user_ids": ["@alice:example.org"]}}}),
                Some(0),
            ),
            (
                json!({"type": "m.room.message", "sender": bob, "content": {"msgtype": "m.text", "body": "Carol Chef, lunch?"}}),
                Some(1),
            ),
            (
                json!({"type": "m.room.member", "sender": bob, "state_key": "@dave:example.org", "content": {"membership": "invite"}}),
                Some(2),
            ),
            (
                json!({"type": "m.room.message", "sender": bob, "content": {"msgtype": "m.notice", "body": "bot says hi"}}),
                None,
            ),
            (
                json!({"type": "m.room.message", "sender": bob, "content": {"msgtype": "m.text", "body": "@room fire drill", "m.mentions": {"room": true}}}),
                None,
            ),
            (
                json!({"type": "m.reaction", "sender": bob, "content": {"m.relates_to": {"rel_type": "m.annotation", "event_id": "$e", "key": "+1"}}}),
                None,
            ),
            (
                json!({"type": "m.room.encrypted", "sender": bob, "content": {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "x"}}),
                None,
            ),
        ];
        for count in [2u32, 5] {
            for (event, named) in &events {
                let pdu: CanonicalJsonObject = serde_json::from_value(event.clone()).unwrap();
                let raw = event_for_rules(&pdu).unwrap();
                let flat = FlattenedJson::from_raw(&raw);
                let body_lower = flat.get_str("content.body").map(str::to_lowercase);
                let event_lower = raw.json().get().to_lowercase();
                let mut unnamed: Option<serde_json::Value> = None;
                for (i, (user, name)) in members.iter().enumerate() {
                    let is_named = names(
                        &event_lower,
                        body_lower.as_deref(),
                        user,
                        &name.to_lowercase(),
                    );
                    assert_eq!(is_named, *named == Some(i), "{user} in {event}");
                    let ctx = PushConditionRoomCtx::new(
                        room_id.to_owned(),
                        UInt::from(count),
                        (*user).to_owned(),
                        (*name).to_owned(),
                    )
                    .with_power_levels(PushConditionPowerLevelsCtx::new(
                        [(bob.clone(), ruma::int!(50))].into(),
                        ruma::int!(0),
                        Default::default(),
                        ruma::room_version_rules::RoomPowerLevelsRules::new(
                            &ruma::room_version_rules::AuthorizationRules::V1,
                            [],
                        ),
                    ));
                    let rules = Ruleset::server_default(user);
                    let actions =
                        serde_json::to_value(rules.get_actions(&raw, &ctx).await).unwrap();
                    if is_named {
                        continue;
                    }
                    match &unnamed {
                        Some(first) => assert_eq!(&actions, first, "{user}: {event}, {count}"),
                        None => unnamed = Some(actions),
                    }
                }
            }
        }
    }

    /// The cheap tests never rule out a rule that ruma finds to apply, for the server's
    /// default rules and a few events of each kind they treat apart.
    #[tokio::test]
    async fn default_rules_give_the_same_actions_with_the_cheap_tests() {
        let alice = ruma::user_id!("@alice:example.org");
        let rules = Ruleset::server_default(alice);
        let room_id = ruma::room_id!("!room:example.org");
        let events = [
            json!({"type": "m.room.message", "sender": "@bob:example.org", "content": {"msgtype": "m.text", "body": "hello"}}),
            json!({"type": "m.room.message", "sender": "@bob:example.org", "content": {"msgtype": "m.notice", "body": "bot says hi"}}),
            json!({"type": "m.room.message", "sender": "@bob:example.org", "content": {"msgtype": "m.text", "body": "Alice, look"}}),
            json!({"type": "m.room.message", "sender": "@bob:example.org", "content": {"msgtype": "m.text", "body": "@room lunch"}}),
            json!({"type": "m.room.member", "sender": "@bob:example.org", "state_key": "@alice:example.org", "content": {"membership": "invite"}}),
            json!({"type": "m.room.member", "sender": "@bob:example.org", "state_key": "@carol:example.org", "content": {"membership": "join"}}),
            json!({"type": "m.room.tombstone", "sender": "@bob:example.org", "state_key": "", "content": {"body": "moved", "replacement_room": "!new:example.org"}}),
            json!({"type": "m.room.encrypted", "sender": "@bob:example.org", "content": {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "x"}}),
            json!({"type": "m.reaction", "sender": "@bob:example.org", "content": {"m.relates_to": {"rel_type": "m.annotation", "event_id": "$e", "key": "+1"}}}),
        ];
        for members in [2u32, 5] {
            for event in &events {
                let pdu: CanonicalJsonObject = serde_json::from_value(event.clone()).unwrap();
                let raw = event_for_rules(&pdu).unwrap();
                let flat = FlattenedJson::from_raw(&raw);
                let body_lower = flat.get_str("content.body").map(str::to_lowercase);
                let view = EventView {
                    flat: &flat,
                    room_id,
                    body_lower: body_lower.as_deref(),
                };
                let mut ctx = PushConditionRoomCtx::new(
                    room_id.to_owned(),
                    UInt::from(members),
                    alice.to_owned(),
                    "Alice".to_owned(),
                );
                // Bob may notify the room (50, the default requirement).
                ctx = ctx.with_power_levels(PushConditionPowerLevelsCtx::new(
                    [(ruma::owned_user_id!("@bob:example.org"), ruma::int!(50))].into(),
                    ruma::int!(0),
                    Default::default(),
                    ruma::room_version_rules::RoomPowerLevelsRules::new(
                        &ruma::room_version_rules::AuthorizationRules::V1,
                        [],
                    ),
                ));
                let expected = serde_json::to_value(rules.get_actions(&raw, &ctx).await).unwrap();
                let mut got: &[Action] = &[];
                for rule in rules.iter() {
                    if may_apply(&rule, &view, "alice") && rule.applies(&flat, &ctx).await {
                        got = rule.actions();
                        break;
                    }
                }
                assert_eq!(
                    serde_json::to_value(got).unwrap(),
                    expected,
                    "{event} in a room of {members}"
                );
            }
        }
    }
}
