//! Push, do not poll: a watch channel per user carries the newest stream position that
//! concerns them. `/sync` long-polls wait on it and wake the moment a commit touches
//! the user.

use std::collections::HashMap;

use parking_lot::Mutex;
use ruma::{OwnedUserId, UserId};
use tokio::sync::watch;

#[derive(Default)]
pub struct Notifier {
    users: Mutex<HashMap<OwnedUserId, watch::Sender<u64>>>,
}

impl Notifier {
    /// A receiver that changes whenever something for `user` commits.
    pub fn subscribe(&self, user: &UserId) -> watch::Receiver<u64> {
        let mut users = self.users.lock();
        if users.len() >= 4096 && users.len().is_power_of_two() {
            users.retain(|_, tx| tx.receiver_count() > 0);
        }
        users
            .entry(user.to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Tell `user`'s waiters that position `pos` concerns them.
    pub fn notify(&self, user: &UserId, pos: u64) {
        self.notify_all([user], pos);
    }

    pub fn notify_all<'a>(&self, users: impl IntoIterator<Item = &'a UserId>, pos: u64) {
        let mut woken = 0;
        {
            let waiting = self.users.lock();
            for u in users {
                let Some(tx) = waiting.get(u) else { continue };
                let moved = tx.send_if_modified(|current| {
                    if pos > *current {
                        *current = pos;
                        true
                    } else {
                        false
                    }
                });
                if moved {
                    woken += tx.receiver_count();
                }
            }
        }
        // Hundreds of long-polls woken at once are a burst for every CPU.
        crate::runtime::burst(woken);
    }
}
