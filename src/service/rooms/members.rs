//! Each room's current members (joined, invited, knocking), kept in memory for the rooms
//! written to since start. Only a commit, under its room's lock, stores a list: it
//! applies its own membership changes, so no write to the membership table can slip in
//! between reading the list and keeping it. Everyone else reads the kept list when there
//! is one, else the table.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
};

use parking_lot::Mutex;
use ruma::{OwnedUserId, UserId};

use super::timeline::joined_room_shorts;
use crate::{
    error::Result,
    storage::{Db, u64_at},
};

/// A room's current members: each user joined, invited or knocking, with that
/// membership.
pub type Members = Vec<(OwnedUserId, &'static str)>;

/// The memberships that make a current member.
const CURRENT: [&str; 3] = ["join", "invite", "knock"];

/// How many members, all rooms together, are kept in memory (about 70 bytes each);
/// past that, the memory starts afresh.
const MEMBERS_KEPT: usize = 100_000;

/// `membership` when it makes a current member.
pub fn current_membership(membership: &str) -> Option<&'static str> {
    CURRENT.into_iter().find(|m| *m == membership)
}

/// The rooms' member lists.
pub struct MemberLists {
    db: Arc<Db>,
    kept: Mutex<KeptMembers>,
}

impl MemberLists {
    pub fn new(db: Arc<Db>) -> Self {
        Self {
            db,
            kept: Mutex::new(KeptMembers::default()),
        }
    }

    /// The room's current members: the kept list, else read from the membership table
    /// (and not kept).
    pub fn members(&self, room_short: u64) -> Result<Arc<Members>> {
        if let Some(m) = self.kept.lock().rooms.get(&room_short) {
            return Ok(m.clone());
        }
        Ok(Arc::new(read_members(&self.db, room_short)?))
    }

    /// The room's joined users.
    pub fn joined(&self, room_short: u64) -> Result<Vec<OwnedUserId>> {
        self.with(room_short, &["join"])
    }

    /// The room's users whose membership is one of `memberships` (of those kept:
    /// joined, invited, knocking).
    pub fn with(&self, room_short: u64, memberships: &[&str]) -> Result<Vec<OwnedUserId>> {
        Ok(self
            .members(room_short)?
            .iter()
            .filter(|(_, m)| memberships.contains(m))
            .map(|(u, _)| u.clone())
            .collect())
    }

    /// How many users have joined the room.
    pub fn joined_count(&self, room_short: u64) -> Result<usize> {
        Ok(self
            .members(room_short)?
            .iter()
            .filter(|(_, m)| *m == "join")
            .count())
    }

    /// Everyone who shares at least one joined room with the user (the user left out).
    pub fn joined_peers(&self, user: &UserId) -> Result<BTreeSet<OwnedUserId>> {
        let mut out = BTreeSet::new();
        for room in joined_room_shorts(&self.db, user)? {
            out.extend(self.joined(room)?);
        }
        out.remove(user);
        Ok(out)
    }

    /// The room's members once a commit's `changes` are written, kept for the next
    /// reader. Called by the commit under the room's lock, after its write.
    pub fn after_commit(
        &self,
        room_short: u64,
        new_room: bool,
        changes: Vec<(OwnedUserId, Option<&'static str>)>,
    ) -> Result<Arc<Members>> {
        let kept = self.kept.lock().rooms.get(&room_short).cloned();
        let members = match kept {
            Some(m) if changes.is_empty() => return Ok(m),
            Some(m) => {
                let mut members = Members::clone(&m);
                apply_member_changes(&mut members, changes);
                members
            }
            None if new_room => {
                let mut members = Members::new();
                apply_member_changes(&mut members, changes);
                members
            }
            // The table holds the changes already.
            None => read_members(&self.db, room_short)?,
        };
        let members = Arc::new(members);
        self.kept.lock().keep(room_short, members.clone());
        Ok(members)
    }
}

/// The room's current members, read from the membership table.
fn read_members(db: &Db, room_short: u64) -> Result<Members> {
    let prefix = room_short.to_be_bytes();
    let mut out = Vec::new();
    for item in db.scan_prefix("room_members", &prefix) {
        let (k, v) = item?;
        if let Some(m) = CURRENT.iter().find(|m| v.as_ref() == m.as_bytes())
            && let Some(id) = db.long_id(u64_at(&k, 1))?
        {
            out.push((UserId::parse(id)?, *m));
        }
    }
    Ok(out)
}

/// `members` after `changes`, applied in order.
fn apply_member_changes(members: &mut Members, changes: Vec<(OwnedUserId, Option<&'static str>)>) {
    for (user, membership) in changes {
        members.retain(|(u, _)| *u != user);
        if let Some(m) = membership {
            members.push((user, m));
        }
    }
}

/// The member lists kept.
#[derive(Default)]
struct KeptMembers {
    rooms: HashMap<u64, Arc<Members>>,
    /// Members in `rooms`, all rooms together.
    count: usize,
}

impl KeptMembers {
    fn keep(&mut self, room_short: u64, members: Arc<Members>) {
        if let Some(old) = self.rooms.remove(&room_short) {
            self.count -= old.len();
        }
        if self.count + members.len() > MEMBERS_KEPT {
            self.rooms.clear();
            self.count = 0;
        }
        self.count += members.len();
        self.rooms.insert(room_short, members);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> OwnedUserId {
        UserId::parse(format!("@{name}:x")).unwrap()
    }

    /// Changes apply in order: an invite then a join leaves one joined member; a
    /// leave or a ban removes the member; others stay as they were.
    #[test]
    fn member_changes_apply_in_order() {
        let mut members: Members = vec![(user("a"), "join"), (user("b"), "join")];
        apply_member_changes(
            &mut members,
            vec![
                (user("c"), current_membership("invite")),
                (user("c"), current_membership("join")),
                (user("b"), current_membership("ban")),
                (user("d"), current_membership("knock")),
                (user("e"), current_membership("leave")),
            ],
        );
        members.sort();
        assert_eq!(
            members,
            vec![
                (user("a"), "join"),
                (user("c"), "join"),
                (user("d"), "knock")
            ]
        );
    }

    /// The kept members stay within their bound: a room kept again replaces its
    /// count, and a room that would go past the bound starts the memory afresh.
    #[test]
    fn kept_members_start_afresh_past_their_bound() {
        let many = |n: usize| Arc::new(vec![(user("a"), "join"); n]);
        let mut kept = KeptMembers::default();
        kept.keep(1, many(MEMBERS_KEPT - 2));
        kept.keep(2, many(2));
        kept.keep(2, many(2));
        assert_eq!((kept.rooms.len(), kept.count), (2, MEMBERS_KEPT));
        kept.keep(3, many(1));
        assert_eq!((kept.rooms.len(), kept.count), (1, 1));
        assert!(kept.rooms.contains_key(&3));
    }
}
