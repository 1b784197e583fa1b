//! The persistent data unit: an event as the room graph holds it, and its client form.

use std::sync::{Arc, OnceLock};

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
        #[derive(Deserialize)]
        struct C {
            redacts: Option<OwnedEventId>,
        }
        serde_json::from_str::<C>(self.content.get())
            .ok()
            .and_then(|c| c.redacts)
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

impl Serialize for ClientEvent {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;

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

        let pdu = &self.event.pdu;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("type", &pdu.kind)?;
        map.serialize_entry("content", &pdu.content)?;
        map.serialize_entry("event_id", &pdu.event_id)?;
        map.serialize_entry("sender", &pdu.sender)?;
        map.serialize_entry("origin_server_ts", &pdu.origin_server_ts)?;
        if self.with_room_id {
            map.serialize_entry("room_id", &self.event.room_id)?;
        }
        if let Some(sk) = &pdu.state_key {
            map.serialize_entry("state_key", sk)?;
        }
        if pdu.kind == TimelineEventType::RoomRedaction
            && let Some(r) = pdu.redacted_event()
        {
            map.serialize_entry("redacts", &r)?;
        }
        map.serialize_entry(
            "unsigned",
            &Unsigned {
                age: self.age,
                transaction_id: self.transaction_id.as_deref(),
                prev_content: self.prev_content.as_deref().map(|p| &*p.content),
                redacted_because: self.redacted_because.as_deref(),
            },
        )?;
        map.end()
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
        let now = u64::from(MilliSecondsSinceUnixEpoch::now().get());
        let transaction_id = match (&self.meta.txn, viewer) {
            (Some((session, txn)), Some(viewer)) if session == viewer => Some(txn.clone()),
            _ => None,
        };
        ClientEvent {
            event: self.clone(),
            with_room_id: true,
            age: now.saturating_sub(u64::from(self.pdu.origin_server_ts.get())),
            transaction_id,
            prev_content,
            redacted_because: redacted_because.map(Box::new),
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
}
