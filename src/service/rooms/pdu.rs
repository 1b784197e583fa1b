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
    /// Device and transaction id it was sent with, for `unsigned.transaction_id`.
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

impl StoredEvent {
    /// The client-server format of the event ("ClientEvent").
    pub fn to_client(
        &self,
        viewer_device: Option<&str>,
        prev_content: Option<JsonValue>,
        redacted_because: Option<JsonValue>,
    ) -> JsonValue {
        let pdu = &self.pdu;
        let mut obj = serde_json::Map::new();
        obj.insert("type".into(), JsonValue::String(pdu.kind.to_string()));
        obj.insert("content".into(), pdu.content_json());
        obj.insert(
            "event_id".into(),
            JsonValue::String(pdu.event_id.to_string()),
        );
        obj.insert("sender".into(), JsonValue::String(pdu.sender.to_string()));
        obj.insert(
            "origin_server_ts".into(),
            serde_json::to_value(pdu.origin_server_ts).unwrap_or_default(),
        );
        obj.insert(
            "room_id".into(),
            JsonValue::String(self.room_id.to_string()),
        );
        if let Some(sk) = &pdu.state_key {
            obj.insert("state_key".into(), JsonValue::String(sk.clone()));
        }
        if pdu.kind == TimelineEventType::RoomRedaction
            && let Some(r) = pdu.redacted_event()
        {
            obj.insert("redacts".into(), JsonValue::String(r.to_string()));
        }
        let mut unsigned = serde_json::Map::new();
        let now = MilliSecondsSinceUnixEpoch::now().get();
        unsigned.insert(
            "age".into(),
            JsonValue::from(u64::from(now).saturating_sub(u64::from(pdu.origin_server_ts.get()))),
        );
        if let (Some((device, txn)), Some(viewer)) = (&self.meta.txn, viewer_device)
            && device == viewer
        {
            unsigned.insert("transaction_id".into(), JsonValue::String(txn.clone()));
        }
        if let Some(prev) = prev_content {
            unsigned.insert("prev_content".into(), prev);
        }
        if let Some(because) = redacted_because {
            unsigned.insert("redacted_because".into(), because);
        }
        obj.insert("unsigned".into(), JsonValue::Object(unsigned));
        JsonValue::Object(obj)
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
