//! Bridge info state (MSC2346): tells clients a room is bridged, to what and by whom.

use ruma::UserId;
use serde_json::{Value as JsonValue, json};

/// The state event types clients look for (stable name and the widely read unstable one).
pub const BRIDGE_EVENT_TYPES: [&str; 2] = ["m.bridge", "uk.half-shot.bridge"];

pub struct BridgeInfo<'a> {
    pub bot: &'a UserId,
    pub creator: Option<&'a UserId>,
    /// The protocol (`email`, `sms`) and its display name.
    pub protocol: (&'a str, &'a str),
    /// The remote channel this room is (an email thread, a phone number).
    pub channel: (&'a str, &'a str),
}

impl BridgeInfo<'_> {
    /// `(state_key, content)`; the state key is unique per bridge and channel.
    pub fn state(&self) -> (String, JsonValue) {
        let mut content = json!({
            "bridgebot": self.bot,
            "protocol": { "id": self.protocol.0, "displayname": self.protocol.1 },
            "channel": { "id": self.channel.0, "displayname": self.channel.1 },
        });
        if let Some(creator) = self.creator {
            content["creator"] = json!(creator);
        }
        (format!("{}/{}", self.protocol.0, self.channel.0), content)
    }
}
