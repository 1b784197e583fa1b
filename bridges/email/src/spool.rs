//! The inbound spool: every message the listener accepts is written here, synced, before
//! the client hears `250`. The bridging worker takes messages out in order and removes
//! each in the same synced write that records its Message-ID as bridged, so a crash at
//! any point leaves the message either waiting (and bridged again with the same
//! transaction ids, which the homeserver deduplicates) or done — never lost.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use salon_appservice_kit::{Store, store::Batch};
use serde::{Deserialize, Serialize};

const SPOOL: &str = "spool:";
const DEAD: &str = "dead:";

/// What the SMTP conversation said about a message.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct Envelope {
    /// `MAIL FROM` (empty for the null sender of bounces).
    pub mail_from: String,
    /// Accepted `RCPT TO` addresses, normalised.
    pub rcpts: Vec<String>,
    pub helo: String,
    pub peer: String,
    pub tls: bool,
    pub received_at: u64,
    /// Failed DMARC where the domain asks for quarantine: goes to the review room.
    #[serde(default)]
    pub quarantine: bool,
}

/// A message waiting to be bridged.
pub struct Spooled {
    pub key: Vec<u8>,
    pub id: String,
    pub envelope: Envelope,
    pub raw: Vec<u8>,
}

#[derive(Clone)]
pub struct Spool {
    store: Store,
    next: Arc<AtomicU64>,
    pub wake: Arc<tokio::sync::Notify>,
}

fn encode(envelope: &Envelope, raw: &[u8]) -> anyhow::Result<Vec<u8>> {
    let head = serde_json::to_vec(envelope)?;
    let mut out = Vec::with_capacity(4 + head.len() + raw.len());
    out.extend_from_slice(&(head.len() as u32).to_be_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(raw);
    Ok(out)
}

fn decode(value: &[u8]) -> anyhow::Result<(Envelope, Vec<u8>)> {
    anyhow::ensure!(value.len() >= 4, "short spool entry");
    let n = u32::from_be_bytes([value[0], value[1], value[2], value[3]]) as usize;
    anyhow::ensure!(value.len() >= 4 + n, "truncated spool entry");
    let envelope = serde_json::from_slice(&value[4..4 + n])?;
    Ok((envelope, value[4 + n..].to_vec()))
}

impl Spool {
    pub fn open(store: Store) -> anyhow::Result<Self> {
        let mut next = 0;
        for prefix in [SPOOL, DEAD] {
            if let Some((k, _)) = store.last(prefix.as_bytes())? {
                let hex = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                next = next.max(u64::from_str_radix(&hex, 16).unwrap_or(0) + 1);
            }
        }
        Ok(Self {
            store,
            next: Arc::new(AtomicU64::new(next.max(1))),
            wake: Arc::new(tokio::sync::Notify::new()),
        })
    }

    /// Store a message durably; returns its queue id.
    pub fn accept(&self, envelope: &Envelope, raw: &[u8]) -> anyhow::Result<String> {
        let seq = self.next.fetch_add(1, Ordering::SeqCst);
        let id = format!("{seq:016x}");
        let mut batch = Batch::default();
        batch.put(format!("{SPOOL}{id}"), encode(envelope, raw)?);
        self.store.commit(batch)?;
        self.wake.notify_one();
        Ok(id)
    }

    /// The oldest waiting message.
    pub fn oldest(&self) -> anyhow::Result<Option<Spooled>> {
        let Some((key, value)) = self.store.first(SPOOL.as_bytes())? else {
            return Ok(None);
        };
        let id = String::from_utf8_lossy(&key[SPOOL.len()..]).into_owned();
        let (envelope, raw) = decode(&value)?;
        Ok(Some(Spooled {
            key,
            id,
            envelope,
            raw,
        }))
    }

    /// Remove a bridged message, together with the writes that record it.
    pub fn done(&self, key: &[u8], mut batch: Batch) -> anyhow::Result<()> {
        batch.delete(key);
        self.store.commit(batch)
    }

    /// Set aside a message the bridge cannot place, for an operator to look at; it stays
    /// in the store.
    pub fn set_aside(&self, m: &Spooled) -> anyhow::Result<()> {
        let mut batch = Batch::default();
        batch.put(format!("{DEAD}{}", m.id), encode(&m.envelope, &m.raw)?);
        batch.delete(&m.key);
        self.store.commit(batch)
    }

    pub fn waiting(&self) -> anyhow::Result<usize> {
        Ok(self.store.scan_prefix(SPOOL.as_bytes())?.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_survive_reopening_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let env = Envelope {
            mail_from: "bob@example.com".into(),
            rcpts: vec!["alice@salon.test".into()],
            ..Default::default()
        };
        {
            let spool = Spool::open(Store::open(dir.path()).unwrap()).unwrap();
            spool.accept(&env, b"first").unwrap();
            spool.accept(&env, b"second").unwrap();
        }
        let spool = Spool::open(Store::open(dir.path()).unwrap()).unwrap();
        let m = spool.oldest().unwrap().unwrap();
        assert_eq!(m.raw, b"first");
        assert_eq!(m.envelope, env);
        spool.done(&m.key, Batch::default()).unwrap();
        let third = spool.accept(&env, b"third").unwrap();
        let m2 = spool.oldest().unwrap().unwrap();
        assert_eq!(m2.raw, b"second");
        assert!(third > m2.id, "ids keep increasing after a restart");
        spool.set_aside(&m2).unwrap();
        assert_eq!(spool.oldest().unwrap().unwrap().raw, b"third");
        assert_eq!(spool.waiting().unwrap(), 1);
    }
}
