//! The persistent data unit: an event as the room graph holds it, and its client form.

use std::{
    borrow::Cow,
    sync::{Arc, OnceLock},
};

use ruma::{
    CanonicalJsonObject, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedUserId,
    RoomId, UInt, UserId, events::TimelineEventType,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value as JsonValue, value::RawValue};

use crate::error::{Error, Result};

/// A PDU as stored: the signed canonical JSON, plus the parsed fields the rules need.
#[derive(Clone, Debug)]
pub struct Pdu {
    pub event_id: OwnedEventId,
    /// Absent only on the create event of room versions whose room id is its hash.
    pub room_id: Option<OwnedRoomId>,
    pub sender: OwnedUserId,
    pub origin_server_ts: MilliSecondsSinceUnixEpoch,
    pub kind: TimelineEventType,
    pub content: Box<RawValue>,
    pub state_key: Option<String>,
    prev_events: Edges,
    auth_events: Edges,
    pub depth: UInt,
    pub redacts: Option<OwnedEventId>,
    pub rejected: bool,
}

/// The fields of [`Pdu`] that its JSON holds (the event id is not part of it in modern
/// room versions), read straight into it without a stand-in id.
#[derive(Deserialize)]
struct StoredFields {
    #[serde(default)]
    room_id: Option<OwnedRoomId>,
    sender: OwnedUserId,
    origin_server_ts: MilliSecondsSinceUnixEpoch,
    #[serde(rename = "type")]
    kind: TimelineEventType,
    content: Box<RawValue>,
    #[serde(default)]
    state_key: Option<String>,
    #[serde(default)]
    prev_events: Edges,
    #[serde(default)]
    auth_events: Edges,
    depth: UInt,
    #[serde(default)]
    redacts: Option<OwnedEventId>,
}

impl Pdu {
    /// Parse a stored PDU; `event_id` is not part of the JSON in modern room versions.
    pub fn from_json(event_id: OwnedEventId, json: &[u8]) -> Result<Self> {
        let f: StoredFields = serde_json::from_slice(json)?;
        Ok(Self {
            event_id,
            room_id: f.room_id,
            sender: f.sender,
            origin_server_ts: f.origin_server_ts,
            kind: f.kind,
            content: f.content,
            state_key: f.state_key,
            prev_events: f.prev_events,
            auth_events: f.auth_events,
            depth: f.depth,
            redacts: f.redacts,
            rejected: false,
        })
    }

    pub fn content_json(&self) -> JsonValue {
        serde_json::from_str(self.content.get()).unwrap_or(JsonValue::Object(Default::default()))
    }

    /// The event this one redacts: the top-level key in old room versions, inside the
    /// content since room version 11.
    pub fn redacted_event(&self) -> Option<OwnedEventId> {
        if let Some(r) = &self.redacts {
            return Some(r.clone());
        }
        redacts_in_content(&self.content).and_then(|r| OwnedEventId::try_from(&*r).ok())
    }

    pub fn is_state(&self) -> bool {
        self.state_key.is_some()
    }

    /// The events this one follows in the room graph.
    pub fn prev_events(&self) -> &[OwnedEventId] {
        self.prev_events.ids()
    }

    /// The events that authorise this one.
    pub fn auth_events(&self) -> &[OwnedEventId] {
        self.auth_events.ids()
    }
}

/// A PDU's list of event ids (`prev_events`, `auth_events`), kept as the JSON text it
/// was stored as and parsed the first time it is asked for. Most reads of a stored
/// event (history pages, sync timelines) never look at the room graph; parsing the
/// lists cost them an allocation and a validation per id.
#[derive(Clone, Debug)]
struct Edges {
    raw: Box<RawValue>,
    ids: OnceLock<Vec<OwnedEventId>>,
}

impl Edges {
    fn ids(&self) -> &[OwnedEventId] {
        // The list was checked to be a JSON array of event ids when the event was
        // accepted, so a parse failure here would mean a damaged store: such an event
        // has no graph edges rather than bringing the read down.
        self.ids
            .get_or_init(|| serde_json::from_str(self.raw.get()).unwrap_or_default())
    }
}

impl Default for Edges {
    fn default() -> Self {
        Self {
            raw: RawValue::from_string("[]".to_owned()).expect("an empty JSON array"),
            ids: OnceLock::from(Vec::new()),
        }
    }
}

impl<'de> Deserialize<'de> for Edges {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(d)?;
        // Anything but a list is refused here, as it was when the lists were parsed
        // with the rest of the event.
        if !raw.get().starts_with('[') {
            return Err(serde::de::Error::custom("expected a list of event ids"));
        }
        Ok(Self {
            raw,
            ids: OnceLock::new(),
        })
    }
}

impl ruma::state_res::Event for Pdu {
    type Id = OwnedEventId;

    fn event_id(&self) -> &Self::Id {
        &self.event_id
    }
    fn room_id(&self) -> Option<&RoomId> {
        self.room_id.as_deref()
    }
    fn sender(&self) -> &UserId {
        &self.sender
    }
    fn origin_server_ts(&self) -> MilliSecondsSinceUnixEpoch {
        self.origin_server_ts
    }
    fn event_type(&self) -> &TimelineEventType {
        &self.kind
    }
    fn content(&self) -> &RawValue {
        &self.content
    }
    fn state_key(&self) -> Option<&str> {
        self.state_key.as_deref()
    }
    fn prev_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.prev_events.ids().iter())
    }
    fn auth_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.auth_events.ids().iter())
    }
    fn redacts(&self) -> Option<&Self::Id> {
        self.redacts.as_ref()
    }
    fn rejected(&self) -> bool {
        self.rejected
    }
}

/// What the server keeps about an event beside the PDU itself.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EventMeta {
    /// Short id of the room.
    pub room: u64,
    /// Position on the global stream (orders the room's timeline too).
    pub pos: u64,
    /// State group the event was authorised against.
    pub state_before: u64,
    /// State group after the event (equal to `state_before` unless it is a state event).
    pub state_after: u64,
    /// Short id of the state event this one replaced, for `unsigned.prev_content`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<u64>,
    /// Client session and transaction id it was sent with, for `unsigned.transaction_id`
    /// (events sent before client sessions were recorded carry the device id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub txn: Option<(String, String)>,
    /// The redaction event that redacted this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redacted_by: Option<String>,
}

/// The first byte of [`EventMeta`] as stored in its binary layout; metadata stored as
/// JSON before it existed starts with `{`.
const EVENT_META_V1: u8 = 1;

impl EventMeta {
    /// The stored form: version byte, room, position, state before and after (u64
    /// each), the replaced event (a byte saying whether, then a u64), then the
    /// transaction's client session and id and the redacting event as texts.
    /// Every event's metadata is read with it, for syncs and history pages alike, so it
    /// is not JSON.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(48);
        out.push(EVENT_META_V1);
        for n in [self.room, self.pos, self.state_before, self.state_after] {
            out.extend_from_slice(&n.to_be_bytes());
        }
        match self.replaces {
            Some(r) => {
                out.push(1);
                out.extend_from_slice(&r.to_be_bytes());
            }
            None => out.push(0),
        }
        let (session, id) = match &self.txn {
            Some((session, id)) => (Some(session.as_str()), Some(id.as_str())),
            None => (None, None),
        };
        put_text(&mut out, session);
        put_text(&mut out, id);
        put_text(&mut out, self.redacted_by.as_deref());
        out
    }

    /// Read the stored form, binary or the JSON of older databases.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        if bytes.first() == Some(&b'{') {
            return Ok(serde_json::from_slice(bytes)?);
        }
        let mut f = Fields::new(bytes, "event's metadata");
        if f.byte()? != EVENT_META_V1 {
            return Err(f.damaged());
        }
        let (room, pos, state_before, state_after) = (f.u64()?, f.u64()?, f.u64()?, f.u64()?);
        let replaces = match f.byte()? {
            0 => None,
            1 => Some(f.u64()?),
            _ => return Err(f.damaged()),
        };
        let txn = match (f.text()?, f.text()?) {
            (Some(session), Some(id)) => Some((session.to_owned(), id.to_owned())),
            (None, None) => None,
            _ => return Err(f.damaged()),
        };
        let redacted_by = f.text()?.map(str::to_owned);
        if !f.rest().is_empty() {
            return Err(f.damaged());
        }
        Ok(Self {
            room,
            pos,
            state_before,
            state_after,
            replaces,
            txn,
            redacted_by,
        })
    }
}

/// Append a text field of a binary record: its length as a u32 (`u32::MAX` for none),
/// then its UTF-8 bytes.
fn put_text(out: &mut Vec<u8>, text: Option<&str>) {
    match text {
        Some(t) => {
            out.extend_from_slice(&(t.len() as u32).to_be_bytes());
            out.extend_from_slice(t.as_bytes());
        }
        None => out.extend_from_slice(&u32::MAX.to_be_bytes()),
    }
}

/// Reads the fields of a stored binary record in order; anything cut short or out of
/// place is an error naming the record, never a panic.
struct Fields<'a> {
    bytes: &'a [u8],
    at: usize,
    what: &'static str,
}

impl<'a> Fields<'a> {
    fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Self { bytes, at: 0, what }
    }

    fn damaged(&self) -> Error {
        Error::internal(format!("a stored {} is damaged", self.what))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).ok_or_else(|| self.damaged())?;
        let bytes = self.bytes.get(self.at..end).ok_or_else(|| self.damaged())?;
        self.at = end;
        Ok(bytes)
    }

    fn byte(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64> {
        let mut n = [0; 8];
        n.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(n))
    }

    fn text(&mut self) -> Result<Option<&'a str>> {
        let len = self.u32()?;
        if len == u32::MAX {
            return Ok(None);
        }
        let bytes = self.take(len as usize)?;
        std::str::from_utf8(bytes)
            .map(Some)
            .map_err(|_| self.damaged())
    }

    fn rest(&self) -> &'a [u8] {
        self.bytes.get(self.at..).unwrap_or_default()
    }
}

/// An event with everything needed to show it to a client.
#[derive(Clone, Debug)]
pub struct StoredEvent {
    pub short: u64,
    pub pdu: Arc<Pdu>,
    pub meta: EventMeta,
    pub room_id: OwnedRoomId,
}

/// An event in the client-server format ("ClientEvent"), ready to serialise: the
/// content is written as stored, never parsed into a tree and written again.
#[derive(Clone, Debug)]
pub struct ClientEvent {
    event: StoredEvent,
    with_room_id: bool,
    age: u64,
    transaction_id: Option<String>,
    prev_content: Option<Arc<Pdu>>,
    redacted_because: Option<Box<ClientEvent>>,
}

impl ClientEvent {
    /// The sync format leaves `room_id` out: the room is the key the event sits under.
    pub fn without_room_id(mut self) -> Self {
        self.with_room_id = false;
        self
    }

    pub fn to_value(&self) -> JsonValue {
        serde_json::to_value(self).unwrap_or_default()
    }
}

/// What an event's client form carries in `unsigned`.
#[derive(Serialize)]
struct Unsigned<'a> {
    age: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    transaction_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prev_content: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    redacted_because: Option<&'a ClientEvent>,
}

/// An event's client form, however the event was read (a parsed [`Pdu`] or a
/// [`HistoryEvent`]): the one place its keys are written.
struct ClientForm<'a, K: ?Sized> {
    kind: &'a K,
    content: &'a RawValue,
    event_id: &'a str,
    sender: &'a str,
    origin_server_ts: u64,
    room_id: Option<&'a str>,
    state_key: Option<&'a str>,
    redacts: Option<&'a str>,
    unsigned: Unsigned<'a>,
}

impl<K: Serialize + ?Sized> Serialize for ClientForm<'_, K> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;

        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("type", self.kind)?;
        map.serialize_entry("content", self.content)?;
        map.serialize_entry("event_id", self.event_id)?;
        map.serialize_entry("sender", self.sender)?;
        map.serialize_entry("origin_server_ts", &self.origin_server_ts)?;
        if let Some(room_id) = self.room_id {
            map.serialize_entry("room_id", room_id)?;
        }
        if let Some(sk) = self.state_key {
            map.serialize_entry("state_key", sk)?;
        }
        if let Some(r) = self.redacts {
            map.serialize_entry("redacts", r)?;
        }
        map.serialize_entry("unsigned", &self.unsigned)?;
        map.end()
    }
}

impl Serialize for ClientEvent {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let pdu = &self.event.pdu;
        let redacts = match pdu.kind {
            TimelineEventType::RoomRedaction => pdu.redacted_event(),
            _ => None,
        };
        ClientForm {
            kind: &pdu.kind,
            content: &pdu.content,
            event_id: pdu.event_id.as_str(),
            sender: pdu.sender.as_str(),
            origin_server_ts: pdu.origin_server_ts.get().into(),
            room_id: self.with_room_id.then(|| self.event.room_id.as_str()),
            state_key: pdu.state_key.as_deref(),
            redacts: redacts.as_ref().map(|r| r.as_str()),
            unsigned: Unsigned {
                age: self.age,
                transaction_id: self.transaction_id.as_deref(),
                prev_content: self.prev_content.as_deref().map(|p| &*p.content),
                redacted_because: self.redacted_because.as_deref(),
            },
        }
        .serialize(serializer)
    }
}

/// Milliseconds from `ts` until now (zero for timestamps ahead of the clock).
fn age_of(ts: u64) -> u64 {
    u64::from(MilliSecondsSinceUnixEpoch::now().get()).saturating_sub(ts)
}

/// The transaction id an event was sent with, shown only to the client session that
/// sent it.
fn transaction_id_for<'a>(meta: &'a EventMeta, viewer: Option<&str>) -> Option<&'a str> {
    match (&meta.txn, viewer) {
        (Some((session, txn)), Some(viewer)) if session == viewer => Some(txn),
        _ => None,
    }
}

/// A text field of a stored event: borrowed from the stored JSON, copied only when it
/// had escapes to undo.
#[derive(Debug)]
struct Text<'a>(Cow<'a, str>);

impl std::ops::Deref for Text<'_> {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Text<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(Visit)
    }
}

/// The fields of a stored PDU that its client form shows, borrowed from the stored
/// JSON: what history pages read of an event stored before its client part was.
#[derive(Debug, Deserialize)]
struct PduView<'a> {
    #[serde(rename = "type", borrow)]
    kind: Text<'a>,
    #[serde(borrow)]
    content: &'a RawValue,
    #[serde(borrow)]
    sender: Text<'a>,
    origin_server_ts: u64,
    #[serde(default, borrow)]
    state_key: Option<Text<'a>>,
    #[serde(default, borrow)]
    redacts: Option<Text<'a>>,
}

/// The event a redaction of room version 11 or later redacts: `redacts` moved from the
/// top level into the content.
fn redacts_in_content(content: &RawValue) -> Option<Cow<'_, str>> {
    #[derive(Deserialize)]
    struct C<'c> {
        #[serde(borrow)]
        redacts: Option<Text<'c>>,
    }
    serde_json::from_str::<C>(content.get())
        .ok()
        .and_then(|c| c.redacts)
        .map(|r| r.0)
}

/// Version byte of the stored client part's layout.
const CLIENT_PART_V1: u8 = 1;

/// A stored event as a history page reads it: what its client form shows, borrowed
/// from the stored bytes, and what the server keeps beside it.
///
/// A history page passes each event on once. Parsing the signed PDU for it (hashes,
/// signatures and graph edges scanned, identifiers validated and copied) cost more
/// than the rest of the page, so each event's client part is stored beside its PDU
/// ([`client_part`]) and read by slicing.
#[derive(Debug)]
pub struct HistoryEvent<'a> {
    pub event_id: &'a str,
    pub kind: Cow<'a, str>,
    pub sender: Cow<'a, str>,
    pub state_key: Option<Cow<'a, str>>,
    pub content: &'a RawValue,
    pub origin_server_ts: u64,
    /// The redacted event, for redactions.
    redacts: Option<Cow<'a, str>>,
    pub meta: &'a EventMeta,
}

/// The client part of an event for storing: version byte, `origin_server_ts` (u64),
/// then event id, type, sender, state key and redacted event, each as a u32 length
/// (`u32::MAX` for none) and UTF-8 text, and the content's JSON text to the end.
pub fn client_part(pdu: &Pdu) -> Vec<u8> {
    let kind = pdu.kind.to_string();
    let redacts = match pdu.kind {
        TimelineEventType::RoomRedaction => pdu.redacted_event(),
        _ => None,
    };
    let content = pdu.content.get();
    let mut out = Vec::with_capacity(64 + kind.len() + content.len());
    out.push(CLIENT_PART_V1);
    out.extend_from_slice(&u64::from(pdu.origin_server_ts.get()).to_be_bytes());
    put_text(&mut out, Some(pdu.event_id.as_str()));
    put_text(&mut out, Some(&kind));
    put_text(&mut out, Some(pdu.sender.as_str()));
    put_text(&mut out, pdu.state_key.as_deref());
    put_text(&mut out, redacts.as_ref().map(|r| r.as_str()));
    out.extend_from_slice(content.as_bytes());
    out
}

impl<'a> HistoryEvent<'a> {
    /// Read from a stored client part.
    pub fn from_part(part: &'a [u8], meta: &'a EventMeta) -> Result<Self> {
        let mut f = Fields::new(part, "client part");
        if f.byte()? != CLIENT_PART_V1 {
            return Err(f.damaged());
        }
        let origin_server_ts = f.u64()?;
        let event_id = f.text()?.ok_or_else(|| f.damaged())?;
        let kind = f.text()?.ok_or_else(|| f.damaged())?;
        let sender = f.text()?.ok_or_else(|| f.damaged())?;
        let state_key = f.text()?;
        let redacts = f.text()?;
        let content: &RawValue = serde_json::from_slice(f.rest())?;
        Ok(Self {
            event_id,
            kind: Cow::Borrowed(kind),
            sender: Cow::Borrowed(sender),
            state_key: state_key.map(Cow::Borrowed),
            content,
            origin_server_ts,
            redacts: redacts.map(Cow::Borrowed),
            meta,
        })
    }

    /// Read from the stored PDU, for events stored without a client part.
    pub fn from_pdu(json: &'a [u8], event_id: &'a str, meta: &'a EventMeta) -> Result<Self> {
        let view: PduView<'a> = serde_json::from_slice(json)?;
        let redacts = match &*view.kind {
            "m.room.redaction" => match view.redacts {
                Some(r) => Some(r.0),
                None => redacts_in_content(view.content),
            },
            _ => None,
        };
        Ok(Self {
            event_id,
            kind: view.kind.0,
            sender: view.sender.0,
            state_key: view.state_key.map(|s| s.0),
            content: view.content,
            origin_server_ts: view.origin_server_ts,
            redacts,
            meta,
        })
    }

    /// The client form, as [`StoredEvent::to_client`] gives it, written straight to
    /// JSON text; `prev_content` and `redacted_because` are read by the caller when
    /// the metadata names them.
    pub fn to_client_raw(
        &self,
        room_id: &RoomId,
        viewer: Option<&str>,
        prev_content: Option<&RawValue>,
        redacted_because: Option<&ClientEvent>,
    ) -> Result<Box<RawValue>> {
        let form = ClientForm {
            kind: &*self.kind,
            content: self.content,
            event_id: self.event_id,
            sender: &self.sender,
            origin_server_ts: self.origin_server_ts,
            room_id: Some(room_id.as_str()),
            state_key: self.state_key.as_deref(),
            redacts: self.redacts.as_deref(),
            unsigned: Unsigned {
                age: age_of(self.origin_server_ts),
                transaction_id: transaction_id_for(self.meta, viewer),
                prev_content,
                redacted_because,
            },
        };
        Ok(serde_json::value::to_raw_value(&form)?)
    }
}

impl StoredEvent {
    /// The client-server format of the event, as seen from the client session
    /// `viewer` (which sees the transaction id it sent the event with).
    pub fn to_client(
        &self,
        viewer: Option<&str>,
        prev_content: Option<Arc<Pdu>>,
        redacted_because: Option<ClientEvent>,
    ) -> ClientEvent {
        self.clone()
            .into_client(viewer, prev_content, redacted_because)
    }

    /// [`StoredEvent::to_client`], for an event the caller has no further use for.
    pub fn into_client(
        self,
        viewer: Option<&str>,
        prev_content: Option<Arc<Pdu>>,
        redacted_because: Option<ClientEvent>,
    ) -> ClientEvent {
        ClientEvent {
            with_room_id: true,
            age: age_of(self.pdu.origin_server_ts.get().into()),
            transaction_id: transaction_id_for(&self.meta, viewer).map(str::to_owned),
            prev_content,
            redacted_because: redacted_because.map(Box::new),
            event: self,
        }
    }
}

/// Maximum size of a PDU in bytes, as the spec sets it.
pub const MAX_PDU_BYTES: usize = 65_536;

/// The PDU serialised as stored; refused when over the size limit.
pub fn to_json_checked(object: &CanonicalJsonObject) -> Result<Vec<u8>> {
    let json = serde_json::to_vec(object)?;
    if json.len() > MAX_PDU_BYTES {
        return Err(Error::too_large(format!(
            "the event is {} bytes; events may be at most {MAX_PDU_BYTES} bytes",
            json.len()
        )));
    }
    Ok(json)
}

#[cfg(test)]
mod tests {
    use ruma::state_res::Event;

    use super::*;

    #[test]
    fn event_metadata_reads_back_as_written_and_from_older_json() {
        let plain = EventMeta {
            room: 7,
            pos: 1 << 40,
            state_before: 3,
            state_after: 3,
            ..Default::default()
        };
        let full = EventMeta {
            room: u64::MAX,
            pos: 12,
            state_before: 4,
            state_after: 9,
            replaces: Some(0),
            txn: Some(("sessión 1".into(), String::new())),
            redacted_by: Some("$redaction:x".into()),
        };
        for meta in [&plain, &full] {
            let bytes = meta.encode();
            assert_eq!(bytes[0], EVENT_META_V1);
            let back = EventMeta::decode(&bytes).unwrap();
            assert_eq!(
                serde_json::to_value(&back).unwrap(),
                serde_json::to_value(meta).unwrap()
            );
            // Databases written before the binary layout hold JSON.
            let json = serde_json::to_vec(meta).unwrap();
            let old = EventMeta::decode(&json).unwrap();
            assert_eq!(
                serde_json::to_value(&old).unwrap(),
                serde_json::to_value(meta).unwrap()
            );
            // Anything cut short, or with bytes after the end, is refused.
            for cut in 0..bytes.len() {
                assert!(EventMeta::decode(&bytes[..cut]).is_err(), "cut at {cut}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(EventMeta::decode(&longer).is_err());
        }
        // A transaction id without its session, and an unknown version, are damage.
        let mut half = plain.encode();
        let at = 1 + 4 * 8 + 1;
        half.splice(at..at + 4, 1u32.to_be_bytes().into_iter().chain(*b"s"));
        assert!(EventMeta::decode(&half).is_err());
        let mut future = plain.encode();
        future[0] = 2;
        assert!(EventMeta::decode(&future).is_err());
    }

    #[test]
    fn a_stored_pdu_reads_its_graph_edges_when_asked() {
        let json = br#"{"auth_events":["$create","$power"],"content":{"body":"hi"},"depth":3,"hashes":{"sha256":"x"},"origin_server_ts":7,"prev_events":["$prev"],"room_id":"!r:example.org","sender":"@a:example.org","signatures":{},"type":"m.room.message"}"#;
        let id = ruma::EventId::parse("$this").unwrap();
        let pdu = Pdu::from_json(id.clone(), json).unwrap();
        assert_eq!(pdu.event_id, id);
        assert_eq!(pdu.content.get(), r#"{"body":"hi"}"#);
        assert_eq!(pdu.prev_events(), ["$prev"]);
        let auth: Vec<&str> = Event::auth_events(&pdu).map(|e| e.as_str()).collect();
        assert_eq!(auth, ["$create", "$power"]);
        assert_eq!(pdu.clone().auth_events().len(), 2);
        // Anything but a list is refused with the rest of the event.
        let bad = br#"{"auth_events":5,"content":{},"depth":3,"origin_server_ts":7,"prev_events":[],"room_id":"!r:example.org","sender":"@a:example.org","type":"m.room.message"}"#;
        assert!(Pdu::from_json(id.clone(), bad).is_err());

        // Lists left out (the create event has no predecessors) are empty.
        let create = br#"{"content":{},"depth":1,"origin_server_ts":1,"room_id":"!r:example.org","sender":"@a:example.org","state_key":"","type":"m.room.create"}"#;
        let pdu = Pdu::from_json(id, create).unwrap();
        assert!(pdu.prev_events().is_empty() && pdu.auth_events().is_empty());
    }

    /// The client form of a view of the stored JSON (history pages) and of the parsed
    /// PDU (syncs) must be the same text, whatever the event holds.
    #[test]
    fn a_viewed_event_has_the_client_form_of_the_parsed_one() {
        let room = RoomId::parse("!r:example.org").unwrap();
        let events: [&[u8]; 5] = [
            br#"{"auth_events":[],"content":{"body":"caf\u00e9 \"quoted\" \n","msgtype":"m.text"},"depth":4,"hashes":{"sha256":"x"},"origin_server_ts":1700000000000,"prev_events":["$p"],"room_id":"!r:example.org","sender":"@a:example.org","signatures":{"example.org":{"ed25519:k":"s"}},"type":"m.room.message"}"#,
            br#"{"auth_events":[],"content":{"membership":"join"},"depth":5,"origin_server_ts":1700000000001,"prev_events":[],"room_id":"!r:example.org","sender":"@b:example.org","state_key":"@b:example.org","type":"m.room.member"}"#,
            br#"{"auth_events":[],"content":{"reason":"spam","redacts":"$gone"},"depth":6,"origin_server_ts":1700000000002,"prev_events":[],"room_id":"!r:example.org","sender":"@a:example.org","type":"m.room.redaction"}"#,
            br#"{"auth_events":[],"content":{},"depth":7,"origin_server_ts":1700000000003,"prev_events":[],"redacts":"$old","room_id":"!r:example.org","sender":"@a:example.org","type":"m.room.redaction"}"#,
            br#"{"auth_events":[],"content":{"x":1},"depth":8,"origin_server_ts":1700000000004,"prev_events":[],"room_id":"!r:example.org","sender":"@a:example.org","state_key":"tab\tkey","type":"org.example.custom"}"#,
        ];
        let prev = Pdu::from_json(
            ruma::EventId::parse("$prev").unwrap(),
            br#"{"content":{"membership":"invite"},"depth":2,"origin_server_ts":1,"room_id":"!r:example.org","sender":"@a:example.org","state_key":"@b:example.org","type":"m.room.member"}"#,
        )
        .unwrap();
        for (n, json) in events.into_iter().enumerate() {
            let meta = EventMeta {
                txn: Some(("session".to_owned(), format!("txn{n}"))),
                ..Default::default()
            };
            let id = format!("$event{n}");
            let pdu = Arc::new(Pdu::from_json(ruma::EventId::parse(&id).unwrap(), json).unwrap());
            assert_eq!(pdu.state_key.is_some(), n == 1 || n == 4);
            let stored = StoredEvent {
                short: 1,
                pdu,
                meta: meta.clone(),
                room_id: room.clone(),
            };
            let part = client_part(&stored.pdu);
            let from_part = HistoryEvent::from_part(&part, &meta).unwrap();
            let from_pdu = HistoryEvent::from_pdu(json, &id, &meta).unwrap();
            for viewer in [Some("session"), Some("another"), None] {
                let with_prev = (n == 1).then(|| Arc::new(prev.clone()));
                let parsed = stored.to_client(viewer, with_prev.clone(), None).to_value();
                for event in [&from_part, &from_pdu] {
                    let prev_content = with_prev.as_deref().map(|p| &*p.content);
                    let viewed = event.to_client_raw(&room, viewer, prev_content, None);
                    let mut viewed: JsonValue =
                        serde_json::from_str(viewed.unwrap().get()).unwrap();
                    // The ages were taken a moment apart.
                    let age = viewed["unsigned"]["age"].take();
                    assert!(age.as_u64().is_some(), "{age}");
                    viewed["unsigned"]["age"] = parsed["unsigned"]["age"].clone();
                    assert_eq!(viewed, parsed, "event {n}, viewer {viewer:?}: {event:?}");
                }
            }
            // Plain text is borrowed from the stored bytes, escaped text unescaped.
            assert!(matches!(from_part.sender, Cow::Borrowed(_)));
            assert!(matches!(from_pdu.sender, Cow::Borrowed(_)));
            if n == 4 {
                assert_eq!(from_pdu.state_key.as_deref(), Some("tab\tkey"));
                assert_eq!(from_part.state_key.as_deref(), Some("tab\tkey"));
            }
            // The redactions name what they redact, wherever their room version puts it.
            let redacts = [None, None, Some("$gone"), Some("$old"), None][n];
            assert_eq!(from_part.redacts.as_deref(), redacts);
            assert_eq!(from_pdu.redacts.as_deref(), redacts);
            // A damaged (here: cut short) client part is an error, not a panic.
            for cut in 0..part.len() {
                assert!(
                    HistoryEvent::from_part(&part[..cut], &meta).is_err(),
                    "{cut}"
                );
            }
        }
        let meta = EventMeta::default();
        assert!(HistoryEvent::from_pdu(br#"{"type":5}"#, "$x", &meta).is_err());
        assert!(HistoryEvent::from_part(&[2, 0, 0], &meta).is_err());
    }
}
