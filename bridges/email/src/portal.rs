//! Conversations: an email thread bridged to a room (or to a Matrix thread inside a room
//! that has a mailbox address), with its outside participants, its reply address and the
//! Message-IDs that thread it. Kept in the bridge's store; storage knows only keys.

use salon_appservice_kit::{Store, store::Batch};
use serde::{Deserialize, Serialize};

use crate::parse::Person;

const CONV: &str = "conv:";
const REPLY: &str = "reply:";
const MAILBOX: &str = "mailbox:";
const MSGID: &str = "msgid:";
/// How many Message-IDs a conversation remembers for `References`.
const KEEP_REFERENCES: usize = 20;

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct Conversation {
    pub room_id: String,
    /// The root event of the Matrix thread, for a conversation inside a mailbox room.
    pub thread_root: Option<String>,
    pub subject: String,
    /// The people outside, who get what staff write here.
    pub externals: Vec<Stored>,
    /// The local part of the reply address (`reply+<token>@domain`).
    pub reply_token: String,
    /// Message-IDs of the thread, oldest first.
    pub references: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct Stored {
    pub address: String,
    pub name: Option<String>,
}

impl From<&Person> for Stored {
    fn from(p: &Person) -> Self {
        Self {
            address: p.address.clone(),
            name: p.name.clone(),
        }
    }
}

impl Conversation {
    pub fn key(&self) -> String {
        key(&self.room_id, self.thread_root.as_deref())
    }

    /// Add an outside participant; `true` when they are new.
    pub fn add_external(&mut self, person: &Person) -> bool {
        if let Some(e) = self
            .externals
            .iter_mut()
            .find(|e| e.address == person.address)
        {
            if e.name.is_none() {
                e.name = person.name.clone();
            }
            return false;
        }
        self.externals.push(person.into());
        true
    }

    pub fn remember(&mut self, message_id: &str) {
        if !self.references.iter().any(|r| r == message_id) {
            self.references.push(message_id.to_owned());
        }
        if self.references.len() > KEEP_REFERENCES {
            // The root stays: it is what most clients thread on.
            let excess = self.references.len() - KEEP_REFERENCES;
            self.references.drain(1..=excess);
        }
    }
}

pub fn key(room_id: &str, thread_root: Option<&str>) -> String {
    format!("{CONV}{room_id}|{}", thread_root.unwrap_or("-"))
}

/// Where an email thread's messages were bridged.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Bridged {
    pub conversation: String,
    pub event_id: String,
}

#[derive(Clone)]
pub struct Portals {
    store: Store,
}

impl Portals {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn get(&self, key: &str) -> anyhow::Result<Option<Conversation>> {
        self.store.get_json(key)
    }

    pub fn by_reply_token(&self, token: &str) -> anyhow::Result<Option<Conversation>> {
        match self.store.get(format!("{REPLY}{token}"))? {
            Some(k) => self.get(&String::from_utf8_lossy(&k)),
            None => Ok(None),
        }
    }

    pub fn bridged(&self, message_id: &str) -> anyhow::Result<Option<Bridged>> {
        self.store.get_json(format!("{MSGID}{message_id}"))
    }

    pub fn mailbox_room(&self, localpart: &str) -> anyhow::Result<Option<String>> {
        Ok(self
            .store
            .get(format!("{MAILBOX}{localpart}"))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    pub fn mailbox_of_room(&self, room_id: &str) -> anyhow::Result<Option<String>> {
        Ok(self
            .store
            .scan_prefix(MAILBOX.as_bytes())?
            .into_iter()
            .find(|(_, v)| v == room_id.as_bytes())
            .map(|(k, _)| String::from_utf8_lossy(&k[MAILBOX.len()..]).into_owned()))
    }

    /// Give a room a mailbox address (replacing the one it had).
    pub fn set_mailbox(&self, localpart: &str, room_id: &str) -> anyhow::Result<()> {
        let mut batch = Batch::default();
        if let Some(old) = self.mailbox_of_room(room_id)? {
            batch.delete(format!("{MAILBOX}{old}"));
        }
        batch.put(format!("{MAILBOX}{localpart}"), room_id);
        self.store.commit(batch)
    }

    /// Write a conversation (and its reply address) into a batch.
    pub fn put(&self, batch: &mut Batch, c: &Conversation) -> anyhow::Result<()> {
        batch.put(c.key(), serde_json::to_vec(c)?);
        batch.put(format!("{REPLY}{}", c.reply_token), c.key());
        Ok(())
    }

    pub fn save(&self, c: &Conversation) -> anyhow::Result<()> {
        let mut batch = Batch::default();
        self.put(&mut batch, c)?;
        self.store.commit(batch)
    }

    /// Record a Message-ID as bridged into a conversation.
    pub fn mark(&self, batch: &mut Batch, message_id: &str, b: &Bridged) -> anyhow::Result<()> {
        batch.put(format!("{MSGID}{message_id}"), serde_json::to_vec(b)?);
        Ok(())
    }

    /// The conversations of a room: the room's own and its threads'.
    pub fn in_room(&self, room_id: &str) -> anyhow::Result<Vec<Conversation>> {
        let prefix = format!("{CONV}{room_id}|");
        self.store
            .scan_prefix(prefix.as_bytes())?
            .into_iter()
            .map(|(_, v)| Ok(serde_json::from_slice(&v)?))
            .collect()
    }
}

pub fn new_reply_token() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    (0..20)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_keep_the_root_and_the_latest() {
        let mut c = Conversation::default();
        for i in 0..30 {
            c.remember(&format!("m{i}@x"));
        }
        c.remember("m29@x");
        assert_eq!(c.references.len(), KEEP_REFERENCES);
        assert_eq!(c.references[0], "m0@x");
        assert_eq!(c.references.last().unwrap(), "m29@x");
        assert_eq!(c.references[1], "m11@x");
        let bob = Person {
            address: "bob@example.com".into(),
            name: None,
        };
        assert!(c.add_external(&bob));
        assert!(!c.add_external(&Person {
            name: Some("Bob".into()),
            ..bob
        }));
        assert_eq!(c.externals[0].name.as_deref(), Some("Bob"));
    }
}
