//! The persistent data unit: an event as the room graph holds it, and its client form.

use std::sync::Arc;

use ruma::{
    CanonicalJsonObject, EventId, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId,
    OwnedUserId, RoomId, UInt, UserId, events::TimelineEventType,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value as JsonValue, value::RawValue};

use crate::error::{Error, Result};

/// A PDU as stored: the signed canonical JSON, plus the parsed fields the rules need.
#[derive(Clone, Debug, Deserialize)]
pub struct Pdu {
    #[serde(skip_deserializing, default = "placeholder_event_id")]
    pub event_id: OwnedEventId,
    /// Absent only on the create event of room versions whose room id is its hash.
    #[serde(default)]
    pub room_id: Option<OwnedRoomId>,
    pub sender: OwnedUserId,
    pub origin_server_ts: MilliSecondsSinceUnixEpoch,
    #[serde(rename = "type")]
    pub kind: TimelineEventType,
    pub content: Box<RawValue>,
    #[serde(default)]
    pub state_key: Option<String>,
    #[serde(default)]
    pub prev_events: Vec<OwnedEventId>,
    #[serde(default)]
    pub auth_events: Vec<OwnedEventId>,
    pub depth: UInt,
    #[serde(default)]
    pub redacts: Option<OwnedEventId>,
    #[serde(skip)]
    pub rejected: bool,
}

fn placeholder_event_id() -> OwnedEventId {
    EventId::parse("$placeholder")
        .expect("valid placeholder")
        .to_owned()
}

impl Pdu {
    /// Parse a stored PDU; `event_id` is not part of the JSON in modern room versions.
    pub fn from_json(event_id: OwnedEventId, json: &[u8]) -> Result<Self> {
        let mut pdu: Pdu = serde_json::from_slice(json)?;
        pdu.event_id = event_id;
        Ok(pdu)
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
        Box::new(self.prev_events.iter())
    }
    fn auth_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.auth_events.iter())
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
