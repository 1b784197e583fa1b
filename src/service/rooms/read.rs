//! Reading rooms: state, members, and paginated history, filtered by what the reader
//! may see.

use std::collections::BTreeSet;

use ruma::{RoomId, UserId};
use serde_json::{Value as JsonValue, value::RawValue};

use super::{Rooms, pdu::StoredEvent, timeline::NextPage, visibility::SeenMemo};
use crate::error::{Error, Result};

/// A position between events in a room's timeline: `t<N>` is just after stream
/// position N.
pub fn parse_token(token: &str) -> Result<u64> {
    // Room tokens (`t`) and sync tokens (`s`, as `prev_batch` and `next_batch`) both
    // name a position on the one stream.
    token
        .strip_prefix('t')
        .or_else(|| token.strip_prefix('s'))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| Error::invalid_param(format!("'{token}' is not a valid pagination token")))
}

pub fn make_token(pos: u64) -> String {
    format!("t{pos}")
}

/// Which events a page should hold (the parts of a RoomEventFilter Salon applies).
#[derive(Debug, Default, Clone)]
pub struct EventFilter {
    pub types: Option<Vec<String>>,
    pub not_types: Vec<String>,
    pub senders: Option<Vec<String>>,
    pub not_senders: Vec<String>,
    pub contains_url: Option<bool>,
    pub lazy_load_members: bool,
}

fn type_matches(pattern: &str, kind: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => kind.starts_with(prefix),
        None => pattern == kind,
    }
}

impl EventFilter {
    pub fn allows(&self, e: &StoredEvent) -> bool {
        self.allows_parts(
            &e.pdu.kind.to_string(),
            e.pdu.sender.as_str(),
            &e.pdu.content,
        )
    }

    /// [`Self::allows`] for an event known by its type, sender and content.
    pub fn allows_parts(&self, kind: &str, sender: &str, content: &RawValue) -> bool {
        if self.not_types.iter().any(|p| type_matches(p, kind)) {
            return false;
        }
        if let Some(types) = &self.types
            && !types.iter().any(|p| type_matches(p, kind))
        {
            return false;
        }
        if self.not_senders.iter().any(|s| s == sender) {
            return false;
        }
        if let Some(senders) = &self.senders
            && !senders.iter().any(|s| s == sender)
        {
            return false;
        }
        if let Some(want) = self.contains_url {
            #[derive(serde::Deserialize)]
            struct Url<'a> {
                #[serde(default, borrow)]
                url: Option<&'a RawValue>,
            }
            let has = serde_json::from_str::<Url>(content.get())
                .ok()
                .and_then(|c| c.url)
                .is_some_and(|u| u.get().starts_with('"'));
            if has != want {
                return false;
            }
        }
        true
    }
}

/// One page of `/messages`.
pub struct MessagesPage {
    pub start: String,
    pub end: Option<String>,
    pub chunk: Vec<Box<RawValue>>,
    pub state: Vec<Box<RawValue>>,
    /// The page a client paging on asks for next, read ahead; `None` at the end.
    pub next: Option<NextPage>,
}

impl Rooms {
    /// Member events of the room as the user may see them, optionally at a token.
    pub fn member_events(
        &self,
        room_id: &RoomId,
        user: &UserId,
        at: Option<&str>,
    ) -> Result<Vec<StoredEvent>> {
        let mut group = self.readable_state_group(room_id, user)?;
        if let Some(at) = at {
            let pos = parse_token(at)?;
            let (room_short, _) = self.timeline.room(room_id)?;
            let at_group = match self
                .timeline
                .timeline_positions(room_short, pos.saturating_add(1), true, 1)?
                .first()
            {
                Some((_, ev)) => self
                    .timeline
                    .meta(*ev)?
                    .map(|m| m.state_after)
                    .unwrap_or(group),
                None => super::state::EMPTY_GROUP,
            };
            // Never further than what the reader may see.
            if at_group < group {
                group = at_group;
            }
        }
        Ok(self
            .timeline
            .state_events_in_group(group)?
            .into_iter()
            .filter(|e| e.pdu.kind == ruma::events::TimelineEventType::RoomMember)
            .collect())
    }

    /// All state events the user may read.
    pub fn state_events(&self, room_id: &RoomId, user: &UserId) -> Result<Vec<StoredEvent>> {
        let group = self.readable_state_group(room_id, user)?;
        self.timeline.state_events_in_group(group)
    }

    pub fn state_event(
        &self,
        room_id: &RoomId,
        user: &UserId,
        event_type: &str,
        state_key: &str,
    ) -> Result<StoredEvent> {
        let group = self.readable_state_group(room_id, user)?;
        self.timeline
            .state_event_in_group(group, event_type, state_key)?
            .ok_or_else(|| Error::not_found("This room has no such state event"))
    }

    /// A page of history. `backward` walks from newest to oldest.
    #[allow(clippy::too_many_arguments)]
    pub fn messages(
        &self,
        room_id: &RoomId,
        user: &UserId,
        client_session: Option<&str>,
        from: Option<&str>,
        to: Option<&str>,
        backward: bool,
        limit: usize,
        filter: &EventFilter,
    ) -> Result<MessagesPage> {
        let (room_short, _) = self.timeline.room(room_id)?;
        // Outsiders of rooms that are not world-readable learn nothing, not even emptiness.
        self.readable_state_group(room_id, user)?;
        let limit = limit.clamp(1, 1000);
        let mut cursor = match from {
            Some(t) => parse_token(t)?,
            None if backward => self.db.stream.visible(),
            None => 0,
        };
        let start = make_token(cursor);
        let to = to.map(parse_token).transpose()?;
        let mut chunk = Vec::with_capacity(limit);
        let mut senders: BTreeSet<String> = BTreeSet::new();
        let mut end = None;
        let mut exhausted = false;
        let mut seen = SeenMemo::default();
        // Each round reads as many events as the page still lacks, twice as many after
        // a round the filter thinned out: an unfiltered page reads no event it does not
        // return.
        let mut want = limit;
        while chunk.len() < limit && !exhausted {
            let batch = if backward {
                self.timeline.timeline_positions(
                    room_short,
                    cursor.saturating_add(1),
                    true,
                    want,
                )?
            } else {
                self.timeline
                    .timeline_positions(room_short, cursor, false, want)?
            };
            if batch.len() < want {
                exhausted = true;
            }
            if batch.is_empty() {
                break;
            }
            let shorts: Vec<u64> = batch.iter().map(|(_, short)| *short).collect();
            let events = self.timeline.history(&shorts)?;
            let before = chunk.len();
            for (i, (pos, _)) in batch.into_iter().enumerate() {
                if let Some(to) = to
                    && ((backward && pos <= to) || (!backward && pos > to))
                {
                    exhausted = true;
                    break;
                }
                cursor = if backward { pos - 1 } else { pos };
                end = Some(make_token(cursor));
                let Some(event) = events.get(i)? else {
                    continue;
                };
                if !filter.allows_parts(&event.kind, &event.sender, event.content)
                    || !self.can_see_parts(
                        user,
                        room_id,
                        &event.kind,
                        event.state_key.as_deref(),
                        event.meta.state_after,
                        &mut seen,
                    )?
                {
                    continue;
                }
                if filter.lazy_load_members && !senders.contains(&*event.sender) {
                    senders.insert(event.sender.to_string());
                }
                chunk.push(
                    self.timeline
                        .history_client_raw(room_id, &event, client_session)?,
                );
                if chunk.len() >= limit {
                    break;
                }
            }
            let missing = limit - chunk.len();
            want = if chunk.len() - before < shorts.len() {
                (missing * 2).min(1000)
            } else {
                missing
            };
        }
        if exhausted && chunk.len() < limit {
            end = None;
        }
        // A client that asks for a page is likely to ask for the next one.
        let next = (end.is_some() && !exhausted).then_some(NextPage {
            room: room_short,
            from: if backward {
                cursor.saturating_add(1)
            } else {
                cursor
            },
            backward,
            count: limit,
        });
        if let Some(next) = next {
            self.timeline.read_ahead(next);
        }
        let mut state = Vec::new();
        if filter.lazy_load_members && !senders.is_empty() {
            let group = self.readable_state_group(room_id, user)?;
            for sender in senders {
                if let Some(e) =
                    self.timeline
                        .state_event_in_group(group, "m.room.member", &sender)?
                {
                    state.push(self.timeline.to_client_raw(&e, client_session)?);
                }
            }
        }
        Ok(MessagesPage {
            start,
            end,
            chunk,
            state,
            next,
        })
    }
}

/// `/context`: an event with what surrounds it.
pub struct Context {
    pub start: String,
    pub end: String,
    pub event: JsonValue,
    pub before: Vec<JsonValue>,
    pub after: Vec<JsonValue>,
    pub state: Vec<JsonValue>,
}

impl Rooms {
    pub fn context(
        &self,
        room_id: &RoomId,
        user: &UserId,
        client_session: &str,
        event_id: &ruma::EventId,
        limit: usize,
        filter: &EventFilter,
    ) -> Result<Context> {
        let (room_short, _) = self.timeline.room(room_id)?;
        let event = self
            .timeline
            .stored_by_id(event_id)?
            .filter(|e| e.room_id == room_id)
            .ok_or_else(|| Error::not_found("Event not found"))?;
        if !self.can_see_event(user, &event)? {
            return Err(Error::not_found("Event not found"));
        }
        let half = limit / 2;
        let collect = |backward: bool, want: usize| -> Result<(Vec<StoredEvent>, u64)> {
            let mut out = Vec::new();
            let mut cursor = event.meta.pos;
            let mut edge = event.meta.pos;
            while out.len() < want {
                let batch = self
                    .timeline
                    .timeline_positions(room_short, cursor, backward, 64)?;
                if batch.is_empty() {
                    break;
                }
                for (pos, short) in &batch {
                    cursor = *pos;
                    edge = if backward { pos - 1 } else { *pos };
                    let Some(e) = self.timeline.stored(*short)? else {
                        continue;
                    };
                    if filter.allows(&e) && self.can_see_event(user, &e)? {
                        out.push(e);
                        if out.len() >= want {
                            break;
                        }
                    }
                }
                if batch.len() < 64 {
                    break;
                }
            }
            Ok((out, edge))
        };
        let (before, start_pos) = collect(true, half)?;
        let (after, end_pos) = collect(false, limit - half)?;
        let start_pos = if before.is_empty() {
            event.meta.pos - 1
        } else {
            start_pos
        };
        let end_pos = if after.is_empty() {
            event.meta.pos
        } else {
            end_pos
        };
        let mut senders: BTreeSet<String> = before
            .iter()
            .chain(after.iter())
            .map(|e| e.pdu.sender.to_string())
            .collect();
        senders.insert(event.pdu.sender.to_string());
        let mut state = Vec::new();
        for e in self
            .timeline
            .state_events_in_group(event.meta.state_before)?
        {
            let is_member = e.pdu.kind == ruma::events::TimelineEventType::RoomMember;
            if filter.lazy_load_members
                && is_member
                && !senders.contains(e.pdu.state_key.as_deref().unwrap_or_default())
            {
                continue;
            }
            state.push(self.timeline.to_client(&e, Some(client_session))?);
        }
        Ok(Context {
            start: make_token(start_pos),
            end: make_token(end_pos),
            event: self.timeline.to_client(&event, Some(client_session))?,
            before: before
                .iter()
                .map(|e| self.timeline.to_client(e, Some(client_session)))
                .collect::<Result<_>>()?,
            after: after
                .iter()
                .map(|e| self.timeline.to_client(e, Some(client_session)))
                .collect::<Result<_>>()?,
            state,
        })
    }

    /// The visible event closest to a timestamp, in the given direction.
    pub fn event_at_timestamp(
        &self,
        room_id: &RoomId,
        user: &UserId,
        ts: ruma::MilliSecondsSinceUnixEpoch,
        forward: bool,
    ) -> Result<(ruma::OwnedEventId, ruma::MilliSecondsSinceUnixEpoch)> {
        let (room_short, _) = self.timeline.room(room_id)?;
        self.readable_state_group(room_id, user)?;
        // Walk from the end the answer lies nearest to.
        let mut cursor = if forward {
            self.db.stream.visible() + 1
        } else {
            0
        };
        let mut best: Option<StoredEvent> = None;
        loop {
            let batch = if forward {
                self.timeline
                    .timeline_positions(room_short, cursor, true, 256)?
            } else {
                self.timeline
                    .timeline_positions(room_short, cursor, false, 256)?
            };
            if batch.is_empty() {
                break;
            }
            let mut done = false;
            for (pos, short) in &batch {
                cursor = *pos;
                let Some(e) = self.timeline.stored(*short)? else {
                    continue;
                };
                let ets = e.pdu.origin_server_ts;
                let beyond = if forward { ets < ts } else { ets > ts };
                if beyond {
                    done = true;
                    break;
                }
                if self.can_see_event(user, &e)? {
                    best = Some(e);
                }
            }
            if done || batch.len() < 256 {
                break;
            }
        }
        let e = best.ok_or_else(|| Error::not_found("No event found in that direction"))?;
        Ok((e.pdu.event_id.clone(), e.pdu.origin_server_ts))
    }
}
