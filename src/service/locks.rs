//! Keeping requests that read, check and then write the same thing apart.

use std::{collections::HashSet, hash::Hash};

use parking_lot::{Mutex, MutexGuard};
use ruma::UserId;

use crate::error::Result;

/// Locks for changes that read one of a user's records, change it and write it back:
/// changes to one user's records go one at a time, so that none undoes another, while
/// other users' go alongside (users share one of 64 locks, by a hash of their id).
pub struct UserLocks([Mutex<()>; 64]);

impl UserLocks {
    pub fn new() -> Self {
        Self(std::array::from_fn(|_| Mutex::new(())))
    }

    pub fn lock(&self, user: &UserId) -> MutexGuard<'_, ()> {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(user.as_str());
        self.0[(hash % self.0.len() as u64) as usize].lock()
    }
}

impl Default for UserLocks {
    fn default() -> Self {
        Self::new()
    }
}

/// Things held by requests under way (an alias being given, a media id whose upload is
/// being stored, a room being upgraded): one request at a time holds each.
pub struct Holding<K>(Mutex<HashSet<K>>);

impl<K> Default for Holding<K> {
    fn default() -> Self {
        Self(Mutex::new(HashSet::new()))
    }
}

impl<K: Eq + Hash + Clone> Holding<K> {
    /// Holds `key` until the returned hold is dropped; `None` when another request
    /// holds it.
    pub fn hold(&self, key: K) -> Option<Held<'_, K>> {
        self.hold_if(key, || Ok(true)).ok().flatten()
    }

    /// Like [`Holding::hold`], and only when `free` says so, asked while no other
    /// request can take or let go of a hold: what a request writes before letting go
    /// is seen by the next one's `free`.
    pub fn hold_if(
        &self,
        key: K,
        free: impl FnOnce() -> Result<bool>,
    ) -> Result<Option<Held<'_, K>>> {
        let mut held = self.0.lock();
        if held.contains(&key) || !free()? {
            return Ok(None);
        }
        held.insert(key.clone());
        Ok(Some(Held { holding: self, key }))
    }
}

/// A thing of a [`Holding`], let go when dropped.
pub struct Held<'a, K: Eq + Hash> {
    holding: &'a Holding<K>,
    key: K,
}

impl<K: Eq + Hash> Held<'_, K> {
    pub fn key(&self) -> &K {
        &self.key
    }
}

impl<K: Eq + Hash> Drop for Held<'_, K> {
    fn drop(&mut self) {
        self.holding.0.lock().remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thing is held by one at a time, let go on drop, and not held when `free`
    /// says no.
    #[test]
    fn one_holds_a_thing_at_a_time() {
        let holding = Holding::default();
        let first = holding.hold("a").expect("free");
        assert!(holding.hold("a").is_none());
        assert!(holding.hold("b").is_some());
        assert!(holding.hold_if("c", || Ok(false)).unwrap().is_none());
        drop(first);
        assert!(holding.hold("a").is_some());
    }
}
