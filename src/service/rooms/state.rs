//! Room state without copying it per event: state groups are a parent plus a delta,
//! with a full snapshot every few links, and the current state of each room is kept
//! as its own table for point lookups.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::{
    error::{Error, Result},
    storage::{Batch, Db, IdKind, u64_key},
};

/// State-key short id → event short id.
pub type StateMap = BTreeMap<u64, u64>;

/// Group 0 is the empty state, before a room's create event.
pub const EMPTY_GROUP: u64 = 0;

/// A snapshot is stored instead of a delta once a chain has this many links.
const MAX_CHAIN: u32 = 32;

/// What each generation of the group cache may hold, counted in state entries plus a
/// few for each group's own overhead: about 5 MiB. A group's map is a full copy of its
/// state, so a room of 800 members makes groups of 800 entries, one per state change;
/// counted in groups alone (4,096 of them), 800 members renaming themselves three
/// times took the server from 46 to 148 MiB.
const CACHE_GENERATION_ENTRIES: usize = 128 * 1024;

/// Counted for each cached group besides its entries (the map's node, the table's slot).
const GROUP_OVERHEAD_ENTRIES: usize = 8;

#[derive(Serialize, Deserialize)]
struct GroupRecord {
    parent: Option<u64>,
    chain: u32,
    entries: Vec<(u64, u64)>,
}

pub struct StateService {
    db: Arc<Db>,
    cache: Mutex<GroupCache>,
}

/// Loaded groups (full map and chain length) in two generations bounded by their
/// entries: the older is dropped when the younger fills, and a hit in the older moves
/// the group to the younger, so the groups in use (each room's latest) stay.
#[derive(Default)]
struct GroupCache {
    young: HashMap<u64, (Arc<StateMap>, u32)>,
    young_entries: usize,
    old: HashMap<u64, (Arc<StateMap>, u32)>,
}

impl GroupCache {
    fn get(&mut self, group: u64) -> Option<(Arc<StateMap>, u32)> {
        if let Some(hit) = self.young.get(&group) {
            return Some(hit.clone());
        }
        let hit = self.old.remove(&group)?;
        self.insert(group, hit.clone());
        Some(hit)
    }

    fn insert(&mut self, group: u64, value: (Arc<StateMap>, u32)) {
        let weight = value.0.len() + GROUP_OVERHEAD_ENTRIES;
        if self.young_entries + weight > CACHE_GENERATION_ENTRIES && !self.young.is_empty() {
            self.old = std::mem::take(&mut self.young);
            self.young_entries = 0;
        }
        if let Some((previous, _)) = self.young.insert(group, value) {
            self.young_entries -= previous.len() + GROUP_OVERHEAD_ENTRIES;
        }
        self.young_entries += weight;
    }
}

/// `type` and `state_key` joined into the long form of a state-key short id.
pub fn state_key_long(event_type: &str, state_key: &str) -> String {
    let mut s = String::with_capacity(event_type.len() + state_key.len() + 1);
    s.push_str(event_type);
    s.push('\0');
    s.push_str(state_key);
    s
}

impl StateService {
    pub fn new(db: Arc<Db>) -> Self {
        Self {
            db,
            cache: Mutex::new(GroupCache::default()),
        }
    }

    pub fn key_short(&self, event_type: &str, state_key: &str) -> Result<Option<u64>> {
        self.db
            .short_id(IdKind::StateKey, &state_key_long(event_type, state_key))
    }

    pub fn key_short_or_create(&self, event_type: &str, state_key: &str) -> Result<u64> {
        self.db
            .get_or_create_short_id(IdKind::StateKey, &state_key_long(event_type, state_key))
    }

    /// The full state of a group.
    pub fn load(&self, group: u64) -> Result<Arc<StateMap>> {
        Ok(self.load_with_chain(group)?.0)
    }

    /// The full state of a group if it is in the cache, without reading storage.
    pub fn cached(&self, group: u64) -> Option<Arc<StateMap>> {
        if group == EMPTY_GROUP {
            return Some(Arc::new(StateMap::new()));
        }
        self.cache.lock().get(group).map(|(map, _)| map)
    }

    fn load_with_chain(&self, group: u64) -> Result<(Arc<StateMap>, u32)> {
        if group == EMPTY_GROUP {
            return Ok((Arc::new(StateMap::new()), 0));
        }
        if let Some(hit) = self.cache.lock().get(group) {
            return Ok(hit);
        }
        let bytes = self
            .db
            .get("state_groups", &group.to_be_bytes())?
            .ok_or_else(|| Error::internal(format!("state group {group} is missing")))?;
        let record: GroupRecord = serde_json::from_slice(&bytes)?;
        let mut map = match record.parent {
            Some(parent) => (*self.load(parent)?).clone(),
            None => StateMap::new(),
        };
        map.extend(record.entries.iter().copied());
        let loaded = (Arc::new(map), record.chain);
        self.remember(group, loaded.clone());
        Ok(loaded)
    }

    fn remember(&self, group: u64, value: (Arc<StateMap>, u32)) {
        self.cache.lock().insert(group, value);
    }

    /// Write a new group: `parent` changed by `delta`. Returns its id.
    pub fn new_group(&self, batch: &mut Batch, parent: u64, delta: &[(u64, u64)]) -> Result<u64> {
        let (parent_map, parent_chain) = self.load_with_chain(parent)?;
        let mut full = (*parent_map).clone();
        full.extend(delta.iter().copied());
        let id = self.db.next_sequence();
        let record = if parent == EMPTY_GROUP || parent_chain + 1 >= MAX_CHAIN {
            GroupRecord {
                parent: None,
                chain: 0,
                entries: full.iter().map(|(k, v)| (*k, *v)).collect(),
            }
        } else {
            GroupRecord {
                parent: Some(parent),
                chain: parent_chain + 1,
                entries: delta.to_vec(),
            }
        };
        batch.put(
            &self.db,
            "state_groups",
            &id.to_be_bytes(),
            &serde_json::to_vec(&record)?,
        );
        self.remember(id, (Arc::new(full), record.chain));
        Ok(id)
    }

    /// The event currently holding `(type, state_key)` in a room.
    pub fn current(&self, room: u64, key: u64) -> Result<Option<u64>> {
        Ok(self
            .db
            .get("room_state", &u64_key(&[room, key]))?
            .map(|v| crate::storage::decode_u64(&v)))
    }

    pub fn set_current(&self, batch: &mut Batch, room: u64, key: u64, event: u64) {
        batch.put(
            &self.db,
            "room_state",
            &u64_key(&[room, key]),
            &event.to_be_bytes(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_resolve_through_deltas_and_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), 8).unwrap();
        let state = StateService::new(db.clone());
        let mut group = EMPTY_GROUP;
        let mut groups = Vec::new();
        for i in 0..100u64 {
            let mut batch = Batch::default();
            group = state
                .new_group(&mut batch, group, &[(i % 7, 1000 + i)])
                .unwrap();
            db.commit(batch).unwrap();
            groups.push(group);
        }
        // A fresh service has no cache: everything comes from disk.
        let cold = StateService::new(db.clone());
        let last = cold.load(group).unwrap();
        assert_eq!(last.len(), 7);
        assert_eq!(last[&(99 % 7)], 1099);
        let early = cold.load(groups[3]).unwrap();
        assert_eq!(early.len(), 4);
        assert_eq!(early[&3], 1003);
    }

    /// The groups of a big room are full copies of its state: the cache holds them up
    /// to its entry budget, keeps the one in use, and drops the others.
    #[test]
    fn the_group_cache_is_bounded_by_entries() {
        let mut cache = GroupCache::default();
        let big: Arc<StateMap> = Arc::new((0..800).map(|k| (k, k)).collect());
        let weight = big.len() + GROUP_OVERHEAD_ENTRIES;
        cache.insert(1, (big.clone(), 0));
        // Three generations' worth of new groups, the first used all along.
        for group in 2..(3 * CACHE_GENERATION_ENTRIES / weight) as u64 {
            cache.insert(group, (big.clone(), 0));
            assert!(cache.get(1).is_some(), "a group in use stays");
            let held: usize = cache
                .young
                .values()
                .chain(cache.old.values())
                .map(|(m, _)| m.len() + GROUP_OVERHEAD_ENTRIES)
                .sum();
            assert!(held <= 2 * CACHE_GENERATION_ENTRIES, "{held} entries held");
        }
        assert!(cache.get(2).is_none(), "an unused old group is gone");
        // Replacing a group does not count it twice.
        let before = cache.young_entries;
        cache.insert(1, (big.clone(), 0));
        assert_eq!(cache.young_entries, before);
        // A group bigger than a generation is still kept while it is the newest.
        let huge: Arc<StateMap> = Arc::new(
            (0..2 * CACHE_GENERATION_ENTRIES as u64)
                .map(|k| (k, k))
                .collect(),
        );
        cache.insert(99_999, (huge, 0));
        assert!(cache.get(99_999).is_some());
    }
}
