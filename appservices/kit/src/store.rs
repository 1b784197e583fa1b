//! The appservice's own small store (RocksDB), apart from the homeserver's: processed
//! transaction ids, the inbox of events not yet handled, and whatever the appservice
//! keeps (portals, ghosts, message ids…) under its own key prefixes.

use std::{path::Path, sync::Arc};

use anyhow::Context;
use rust_rocksdb::{DB, Direction, IteratorMode, Options, WriteBatch, WriteOptions};

#[derive(Clone)]
pub struct Store {
    db: Arc<DB>,
}

/// Writes applied together, atomically.
#[derive(Default)]
pub struct Batch {
    inner: WriteBatch,
}

impl Batch {
    pub fn put(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.inner.put(key, value);
    }
    pub fn delete(&mut self, key: impl AsRef<[u8]>) {
        self.inner.delete(key);
    }
}

impl Store {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.set_write_buffer_size(2 * 1024 * 1024);
        opts.set_max_background_jobs(1);
        opts.set_keep_log_file_num(2);
        let db = DB::open(&opts, path).map_err(|e| {
            if e.to_string().contains("lock") {
                anyhow::anyhow!(
                    "the store at {} is in use by another process",
                    path.display()
                )
            } else {
                anyhow::anyhow!("cannot open the store at {}: {e}", path.display())
            }
        })?;
        Ok(Self { db: Arc::new(db) })
    }

    pub fn get(&self, key: impl AsRef<[u8]>) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self.db.get(key)?)
    }

    pub fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        key: impl AsRef<[u8]>,
    ) -> anyhow::Result<Option<T>> {
        match self.get(key)? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    /// Apply a batch and make it durable before returning.
    pub fn commit(&self, batch: Batch) -> anyhow::Result<()> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(&batch.inner, &opts)?;
        Ok(())
    }

    pub fn put(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> anyhow::Result<()> {
        let mut b = Batch::default();
        b.put(key, value);
        self.commit(b)
    }

    pub fn put_json<T: serde::Serialize>(
        &self,
        key: impl AsRef<[u8]>,
        value: &T,
    ) -> anyhow::Result<()> {
        self.put(key, serde_json::to_vec(value)?)
    }

    pub fn delete(&self, key: impl AsRef<[u8]>) -> anyhow::Result<()> {
        let mut b = Batch::default();
        b.delete(key);
        self.commit(b)
    }

    /// Entries whose key starts with `prefix`, in key order.
    pub fn scan_prefix(&self, prefix: &[u8]) -> anyhow::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator(IteratorMode::From(prefix, Direction::Forward))
        {
            let (k, v) = item?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// The first entry under `prefix`, if any.
    pub fn first(&self, prefix: &[u8]) -> anyhow::Result<Option<(Vec<u8>, Vec<u8>)>> {
        if let Some(item) = self
            .db
            .iterator(IteratorMode::From(prefix, Direction::Forward))
            .next()
        {
            let (k, v) = item?;
            if k.starts_with(prefix) {
                return Ok(Some((k.to_vec(), v.to_vec())));
            }
        }
        Ok(None)
    }

    /// The last entry under `prefix`, if any.
    pub fn last(&self, prefix: &[u8]) -> anyhow::Result<Option<(Vec<u8>, Vec<u8>)>> {
        let mut end = prefix.to_vec();
        end.push(0xff);
        for item in self
            .db
            .iterator(IteratorMode::From(&end, Direction::Reverse))
        {
            let (k, v) = item?;
            if k.starts_with(prefix) {
                return Ok(Some((k.to_vec(), v.to_vec())));
            }
            if k.as_ref() < prefix {
                break;
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_survive_reopening_and_prefixes_stay_apart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            s.put("a:1", "x").unwrap();
            s.put("a:2", "y").unwrap();
            s.put("b:1", "z").unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        let a: Vec<_> = s
            .scan_prefix(b"a:")
            .unwrap()
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        assert_eq!(a, vec![b"x".to_vec(), b"y".to_vec()]);
        assert_eq!(s.last(b"a:").unwrap().unwrap().1, b"y");
        assert_eq!(s.first(b"b:").unwrap().unwrap().1, b"z");
        assert!(s.first(b"c:").unwrap().is_none());
    }
}
