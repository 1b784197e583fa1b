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
}
