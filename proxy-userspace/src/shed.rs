//! Shedding under descriptor pressure: connections still waiting for their hello are the
//! cheapest to refuse (nothing was forwarded, no backend was contacted), so when the process
//! nears its descriptor limit the oldest of them are closed first, and new clients find a
//! descriptor instead of waiting in the kernel's accept queue.
use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::Notify;

/// The connections waiting for their hello, oldest first.
#[derive(Default)]
pub struct PreHello {
    next: AtomicU64,
    waiting: Mutex<BTreeMap<u64, Arc<Notify>>>,
}

/// One connection's place in [`PreHello`]; leaving it (dropping the ticket) takes the
/// connection off the list.
pub struct Ticket<'a> {
    owner: &'a PreHello,
    id: u64,
    notify: Arc<Notify>,
}

impl PreHello {
    /// Puts a connection that is about to read its hello at the end of the list.
    pub fn enter(&self) -> Ticket<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let notify = Arc::new(Notify::new());
        if let Ok(mut waiting) = self.waiting.lock() {
            waiting.insert(id, Arc::clone(&notify));
        }
        Ticket {
            owner: self,
            id,
            notify,
        }
    }

    /// Tells the `n` oldest waiting connections to close; returns how many were told.
    pub fn shed_oldest(&self, n: usize) -> usize {
        let Ok(mut waiting) = self.waiting.lock() else {
            return 0;
        };
        let mut shed = 0;
        while shed < n {
            let Some((_, notify)) = waiting.pop_first() else {
                break;
            };
            // Stores a permit if the connection is not waiting on it yet.
            notify.notify_one();
            shed += 1;
        }
        shed
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.waiting.lock().map_or(0, |w| w.len())
    }
}

impl Ticket<'_> {
    /// Resolves once this connection was chosen to be shed.
    pub async fn shed(&self) {
        self.notify.notified().await;
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if let Ok(mut waiting) = self.owner.waiting.lock() {
            waiting.remove(&self.id);
        }
    }
}

/// How many descriptors to keep free for connections that are served (their backend socket,
/// pipes) and for the metrics endpoint, given the process's descriptor limit.
pub fn reserve_for(limit: u64) -> u64 {
    (limit / 8).clamp(16, 512)
}

/// How many waiting connections to shed at once when a descriptor is needed.
pub fn batch_for(reserve: u64) -> usize {
    usize::try_from(reserve / 4).unwrap_or(1).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sheds_the_oldest_first_and_forgets_those_that_left() {
        let list = PreHello::default();
        let first = list.enter();
        let second = list.enter();
        let third = list.enter();
        drop(second);
        assert_eq!(list.len(), 2);
        assert_eq!(list.shed_oldest(1), 1);
        // The permit is kept until the connection waits for it.
        first.shed().await;
        assert_eq!(list.len(), 1);
        let pending = tokio::time::timeout(std::time::Duration::from_millis(20), third.shed());
        assert!(pending.await.is_err(), "the third was not shed");
        assert_eq!(list.shed_oldest(5), 1);
        third.shed().await;
        assert_eq!(list.len(), 0);
    }

    #[test]
    fn reserve_grows_with_the_limit_within_bounds() {
        assert_eq!(reserve_for(64), 16);
        assert_eq!(reserve_for(1024), 128);
        assert_eq!(reserve_for(1 << 20), 512);
        assert_eq!(batch_for(16), 4);
    }
}
