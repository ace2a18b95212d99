//! Turns L1's residency reports into KV events for the publisher.
//!
//! The queue is the core's [`ResidencyLog`]: bounded and ordered. When the publisher falls
//! behind by more than its bound, the queue is dropped and the next batch starts with
//! `AllBlocksCleared`: subscribers then forget this node's blocks and relearn them from
//! later stores. They under-count for a while, but never believe in a block a load would
//! miss.

use std::sync::atomic::{AtomicU64, Ordering};

use kvtier::chunk::ChunkInfo;
use kvtier::keys::ChunkKey;
use kvtier::tier::{ResidencyChange, ResidencyLog, ResidencyObserver};

use super::wire::{KvEvent, MEDIUM_CPU};

/// L1's observer: queues changes until the publisher takes them.
pub struct Collector {
    log: ResidencyLog,
    taken: AtomicU64,
}

impl Collector {
    /// A collector holding at most `limit` changes (at least 1) between two batches.
    pub fn new(limit: usize) -> Collector {
        Collector {
            log: ResidencyLog::new(limit),
            taken: AtomicU64::new(0),
        }
    }

    /// Takes the changes queued so far as events, in order: a run of removals becomes one
    /// `BlockRemoved`, each store one `BlockStored`; after an overflow the first event is
    /// `AllBlocksCleared`. Also returns whether the queue overflowed.
    pub fn take(&self) -> (Vec<KvEvent>, bool) {
        let p = self.log.take();
        let mut out = Vec::with_capacity(p.changes.len() + 1);
        if p.overflowed {
            out.push(KvEvent::AllBlocksCleared);
        }
        for c in p.changes {
            match c {
                ResidencyChange::Stored(key, tokens) => out.push(KvEvent::BlockStored {
                    key,
                    tokens,
                    medium: MEDIUM_CPU,
                }),
                ResidencyChange::Removed(k) => match out.last_mut() {
                    Some(KvEvent::BlockRemoved { keys, .. }) => keys.push(k),
                    _ => out.push(KvEvent::BlockRemoved {
                        keys: vec![k],
                        medium: MEDIUM_CPU,
                    }),
                },
            }
        }
        self.taken.fetch_add(out.len() as u64, Ordering::Relaxed);
        (out, p.overflowed)
    }

    /// Events handed to the publisher so far.
    pub fn events_taken(&self) -> u64 {
        self.taken.load(Ordering::Relaxed)
    }
}

impl ResidencyObserver for Collector {
    fn stored(&self, info: &ChunkInfo) {
        self.log.stored(info);
    }

    fn removed(&self, keys: &[ChunkKey]) {
        self.log.removed(keys);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kvtier::keys::{ModelIdentity, Origin};
    use kvtier::layout::{Dtype, KvLayout};

    use super::*;

    fn info(i: u8) -> ChunkInfo {
        ChunkInfo {
            key: ChunkKey([i; 32]),
            num_tokens: 16,
            len: 1,
            checksum: 0,
            origin: Arc::new(Origin {
                identity: Arc::new(ModelIdentity::new(
                    "m",
                    KvLayout::simple(1, 1, 1, Dtype::U8),
                )),
                cache_salt: None,
            }),
            created_ms: 0,
        }
    }

    #[test]
    fn keeps_order_and_merges_runs_of_removals() {
        let c = Collector::new(100);
        c.stored(&info(1));
        c.stored(&info(2));
        c.removed(&[ChunkKey([1; 32])]);
        c.removed(&[ChunkKey([2; 32])]);
        c.stored(&info(1));
        let (ev, overflow) = c.take();
        assert!(!overflow);
        let stored = |i| KvEvent::BlockStored {
            key: ChunkKey([i; 32]),
            tokens: 16,
            medium: MEDIUM_CPU,
        };
        assert_eq!(
            ev,
            vec![
                stored(1),
                stored(2),
                KvEvent::BlockRemoved {
                    keys: vec![ChunkKey([1; 32]), ChunkKey([2; 32])],
                    medium: MEDIUM_CPU
                },
                stored(1),
            ]
        );
        assert_eq!(c.take(), (vec![], false));
    }

    #[test]
    fn overflow_starts_over_with_all_blocks_cleared() {
        let c = Collector::new(3);
        for i in 0..5 {
            c.stored(&info(i));
        }
        let (ev, overflow) = c.take();
        assert!(overflow);
        assert_eq!(ev[0], KvEvent::AllBlocksCleared);
        // Only what came after the overflow is kept.
        assert_eq!(ev.len(), 3);
        assert_eq!(c.take(), (vec![], false));
    }
}
