//! The global stream position: one u64 that orders everything a client can sync.
//!
//! Positions are handed out before a write commits, and writes commit out of order.
//! Readers must never see position N+1 while N may still appear, or a sync token would
//! skip N forever. So the allocator tracks positions in flight and publishes the highest
//! position below which everything has committed (or been abandoned).

use std::collections::BTreeSet;

use parking_lot::Mutex;
use tokio::sync::watch;

pub struct StreamAllocator {
    inner: Mutex<Inner>,
    visible: watch::Sender<u64>,
}

struct Inner {
    next: u64,
    in_flight: BTreeSet<u64>,
}

/// A reserved position. Dropping it (committed or not) releases it.
pub struct StreamTicket<'a> {
    pub position: u64,
    allocator: &'a StreamAllocator,
}

impl StreamAllocator {
    pub fn new(last: u64) -> Self {
        let (visible, _) = watch::channel(last);
        Self {
            inner: Mutex::new(Inner {
                next: last + 1,
                in_flight: BTreeSet::new(),
            }),
            visible,
        }
    }

    pub(super) fn reset(&self, last: u64) {
        let mut inner = self.inner.lock();
        inner.next = last + 1;
        inner.in_flight.clear();
        self.visible.send_replace(last);
    }

    pub fn reserve(&self) -> StreamTicket<'_> {
        let mut inner = self.inner.lock();
        let position = inner.next;
        inner.next += 1;
        inner.in_flight.insert(position);
        StreamTicket {
            position,
            allocator: self,
        }
    }

    /// Everything at or below this position has committed.
    pub fn visible(&self) -> u64 {
        *self.visible.borrow()
    }

    /// Wakes whenever the visible position moves.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.visible.subscribe()
    }

    fn release(&self, position: u64) {
        let mut inner = self.inner.lock();
        inner.in_flight.remove(&position);
        let visible = match inner.in_flight.first() {
            Some(lowest) => lowest - 1,
            None => inner.next - 1,
        };
        if visible > *self.visible.borrow() {
            self.visible.send_replace(visible);
        }
    }
}

impl Drop for StreamTicket<'_> {
    fn drop(&mut self) {
        self.allocator.release(self.position);
    }
}

/// The newest stream position written under each room (of one kind of entry: events,
/// receipts), so that an incremental sync learns which rooms are quiet without an
/// iterator per room. A room is read from the database once, then kept up to date by
/// the writers, which note a position before it becomes visible: a reader that sees
/// position N also sees every room's news up to N. It may see news past its horizon
/// too (a write not yet visible), which only makes it look and find nothing.
#[derive(Default)]
pub struct NewestByRoom {
    rooms: Mutex<std::collections::HashMap<u64, u64>>,
}

impl NewestByRoom {
    /// A write at `pos` under `room`, before `pos` becomes visible.
    pub fn note(&self, room: u64, pos: u64) {
        let mut rooms = self.rooms.lock();
        let newest = rooms.entry(room).or_insert(pos);
        *newest = (*newest).max(pos);
    }

    /// The newest position under `room`; `load` reads it from the database the first
    /// time (a room with nothing is remembered as such too). A concurrent `note` is
    /// never lost: the larger position wins.
    pub fn newest<E>(
        &self,
        room: u64,
        load: impl FnOnce() -> Result<Option<u64>, E>,
    ) -> Result<Option<u64>, E> {
        if let Some(pos) = self.rooms.lock().get(&room) {
            return Ok((*pos > 0).then_some(*pos));
        }
        // Positions start at 1: 0 stands for "nothing yet".
        let loaded = load()?.unwrap_or(0);
        self.note(room, loaded);
        let pos = self.rooms.lock().get(&room).copied().unwrap_or(0);
        Ok((pos > 0).then_some(pos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visible_position_waits_for_earlier_writes() {
        let s = StreamAllocator::new(10);
        let a = s.reserve();
        let b = s.reserve();
        assert_eq!((a.position, b.position), (11, 12));
        drop(b);
        assert_eq!(s.visible(), 10, "12 committed but 11 is still in flight");
        drop(a);
        assert_eq!(s.visible(), 12);
    }

    #[test]
    fn newest_by_room_loads_once_and_keeps_the_larger_position() {
        let newest = NewestByRoom::default();
        let mut loads = 0;
        let mut load = |v: Option<u64>| {
            loads += 1;
            Ok::<_, ()>(v)
        };
        // A room with nothing is remembered as such: the database is read once.
        assert_eq!(newest.newest(1, || load(None)), Ok(None));
        assert_eq!(newest.newest(1, || load(Some(99))), Ok(None));
        newest.note(1, 5);
        assert_eq!(newest.newest(1, || load(None)), Ok(Some(5)));
        // A write noted while the database was read is not lost to an older load.
        newest.note(2, 40);
        assert_eq!(newest.newest(2, || load(Some(30))), Ok(Some(40)));
        assert_eq!(newest.newest(3, || load(Some(30))), Ok(Some(30)));
        newest.note(3, 20);
        assert_eq!(
            newest.newest(3, || load(None)),
            Ok(Some(30)),
            "never goes back"
        );
        assert_eq!(loads, 2);
    }
}
