//! To-device messages: a queue per device, in stream order. A message is delivered by
//! `/sync` and deleted only once the client acknowledges it by syncing with a later
//! token, so a response lost on the way is delivered again and nothing twice.

use std::collections::BTreeMap;

use ruma::{DeviceId, OwnedUserId, UserId, to_device::DeviceIdOrAllDevices};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue as RawJsonValue;

use super::E2ee;
use crate::{
    error::{Error, Result},
    storage::{Batch, str_key, str_prefix, u64_at},
};

/// At most this many messages per `/sync` response; the rest follow at once.
pub const MAX_PER_SYNC: usize = 100;

#[derive(Serialize, Deserialize)]
struct Stored {
    sender: String,
    #[serde(rename = "type")]
    kind: String,
    content: Box<RawJsonValue>,
}

/// Messages for one device, oldest first, and the position up to which they reach.
pub struct Pending {
    pub events: Vec<Box<RawJsonValue>>,
    /// Every message at or below this position is in `events`.
    pub through: u64,
    /// Whether messages remain below the sync's horizon.
    pub more: bool,
}

impl E2ee {
    /// `PUT /sendToDevice/{type}/{txnId}`. Messages to unknown users or devices are
    /// dropped without error; a repeated transaction id does nothing.
    pub fn send_to_device(
        &self,
        sender: &UserId,
        sender_device: &DeviceId,
        event_type: &str,
        txn_id: &str,
        messages: &BTreeMap<OwnedUserId, BTreeMap<DeviceIdOrAllDevices, Box<RawJsonValue>>>,
    ) -> Result<()> {
        let txn_key = str_key(&[sender.as_str(), sender_device.as_str(), txn_id, "to_device"]);
        let _one_at_a_time = self.to_device_locks.lock(sender);
        if self.db.exists("txn_ids", &txn_key)? {
            return Ok(());
        }
        let ticket = self.db.stream.reserve();
        let mut batch = Batch::default();
        let mut recipients = Vec::new();
        let mut index: u32 = 0;
        for (user, targets) in messages {
            if user.server_name() != self.server_name || !self.users.exists(user)? {
                continue;
            }
            for (target, content) in targets {
                if !content.get().trim_start().starts_with('{') {
                    return Err(Error::bad_json(format!(
                        "the message for {user} is not a JSON object"
                    )));
                }
                let devices: Vec<String> = match target {
                    DeviceIdOrAllDevices::AllDevices => self
                        .users
                        .devices(user)?
                        .into_iter()
                        .map(|d| d.device_id)
                        .collect(),
                    DeviceIdOrAllDevices::DeviceId(d) => {
                        if self.users.device(user, d)?.is_none() {
                            continue;
                        }
                        vec![d.to_string()]
                    }
                };
                let message = serde_json::to_vec(&Stored {
                    sender: sender.to_string(),
                    kind: event_type.to_owned(),
                    content: content.clone(),
                })?;
                for device in devices {
                    let mut key = str_prefix(&[user.as_str(), &device]);
                    key.extend_from_slice(&ticket.position.to_be_bytes());
                    key.extend_from_slice(&index.to_be_bytes());
                    index = index.wrapping_add(1);
                    batch.put(&self.db, "to_device", &key, &message);
                }
                recipients.push(user.clone());
            }
        }
        batch.put(&self.db, "txn_ids", &txn_key, b"");
        self.db.commit(batch)?;
        let pos = ticket.position;
        drop(ticket);
        self.notifier
            .notify_all(recipients.iter().map(|u| &**u), pos);
        Ok(())
    }

    /// Messages waiting for a device at or below position `until`, oldest first; never
    /// splits the messages of one position across responses.
    pub fn pending_to_device(
        &self,
        user: &UserId,
        device: &DeviceId,
        until: u64,
    ) -> Result<Pending> {
        let prefix = str_prefix(&[user.as_str(), device.as_str()]);
        let mut out = Pending {
            events: Vec::new(),
            through: until,
            more: false,
        };
        let mut last_pos = None;
        for item in self.db.scan_prefix("to_device", &prefix) {
            let (k, v) = item?;
            let pos = u64_at(&k[prefix.len()..], 0);
            if pos > until {
                break;
            }
            if out.events.len() >= MAX_PER_SYNC && last_pos != Some(pos) {
                out.more = true;
                out.through = last_pos.unwrap_or(0);
                break;
            }
            let stored: Stored = serde_json::from_slice(&v)?;
            let event = serde_json::json!({
                "sender": stored.sender,
                "type": stored.kind,
                "content": stored.content,
            });
            out.events.push(serde_json::value::to_raw_value(&event)?);
            last_pos = Some(pos);
        }
        Ok(out)
    }

    /// The client has what was delivered up to `through`: delete it.
    pub fn ack_to_device(&self, user: &UserId, device: &DeviceId, through: u64) -> Result<()> {
        let prefix = str_prefix(&[user.as_str(), device.as_str()]);
        let mut batch = Batch::default();
        let mut any = false;
        for item in self.db.scan_prefix("to_device", &prefix) {
            let (k, _) = item?;
            if u64_at(&k[prefix.len()..], 0) > through {
                break;
            }
            batch.delete(&self.db, "to_device", &k);
            any = true;
        }
        if any {
            self.db.commit(batch)?;
        }
        Ok(())
    }
}
