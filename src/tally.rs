//! A count of things under way (requests in flight, settlements still
//! running), each counted by a guard until it is dropped, and a bounded
//! wait for the count to reach zero: what shutdown waits on.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How many things are under way; clones share one count.
#[derive(Clone, Default)]
pub struct Tally(Arc<AtomicUsize>);

/// One thing under way, counted until dropped.
pub struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Tally {
    /// Counts one more thing until the returned guard is dropped.
    pub fn enter(&self) -> Counted {
        self.0.fetch_add(1, Ordering::SeqCst);
        Counted(self.0.clone())
    }

    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    /// Waits until nothing is under way, at most `within`, looking every
    /// `every`; whether nothing is.
    pub async fn wait_idle(&self, within: Duration, every: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while self.count() > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(every).await;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_until_the_guards_drop() {
        let tally = Tally::default();
        let a = tally.enter();
        let b = tally.clone().enter();
        assert_eq!(tally.count(), 2);
        drop(a);
        let short = Duration::from_millis(1);
        assert!(!tally.wait_idle(Duration::from_millis(20), short).await);
        drop(b);
        assert!(tally.wait_idle(Duration::ZERO, short).await);
    }
}
