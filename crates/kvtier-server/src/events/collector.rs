//! Turns the tiers' residency reports into KV events for the publisher: L1's as medium
//! `CPU`, the disk tier's as `STORAGE`.
//!
//! Each tier's queue is a core [`ResidencyLog`]: bounded and ordered. When the publisher
//! falls behind by more than its bound, the queue is dropped and the next batch starts with
//! `AllBlocksCleared` (vLLM's clear names no medium: it clears every medium of this node):
//! subscribers then forget this node's blocks and relearn them from later stores. They
//! under-count for a while, but never believe in a block a load would miss.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kvtier::tier::{ResidencyChange, ResidencyLog};

use super::wire::{KvEvent, MEDIUM_CPU, MEDIUM_STORAGE};

/// The tiers' observers: queue changes until the publisher takes them.
pub struct Collector {
    /// L1's observer.
    pub l1: Arc<ResidencyLog>,
    /// The disk tier's observer (installed when the server has one).
    pub disk: Arc<ResidencyLog>,
    taken: AtomicU64,
}

impl Collector {
    /// A collector holding at most `limit` changes (at least 1) per tier between two batches.
    pub fn new(limit: usize) -> Collector {
        Collector {
            l1: Arc::new(ResidencyLog::new(limit)),
            disk: Arc::new(ResidencyLog::new(limit)),
            taken: AtomicU64::new(0),
        }
    }

    /// Takes the changes queued so far as events, in each tier's order: a run of removals
    /// becomes one `BlockRemoved`, each store one `BlockStored`; after an overflow the first
    /// event is `AllBlocksCleared`. Also returns whether a queue overflowed.
    pub fn take(&self) -> (Vec<KvEvent>, bool) {
        let (l1, disk) = (self.l1.take(), self.disk.take());
        let overflowed = l1.overflowed || disk.overflowed;
        let mut out = Vec::with_capacity(l1.changes.len() + disk.changes.len() + 1);
        if overflowed {
            out.push(KvEvent::AllBlocksCleared);
        }
        for (changes, medium) in [(l1.changes, MEDIUM_CPU), (disk.changes, MEDIUM_STORAGE)] {
            let first = out.len();
            for c in changes {
                match c {
                    ResidencyChange::Stored(key, tokens) => out.push(KvEvent::BlockStored {
                        key,
                        tokens,
                        medium,
                    }),
                    ResidencyChange::Removed(k) => {
                        let same_run = out.len() > first;
                        match out.last_mut() {
                            Some(KvEvent::BlockRemoved { keys, .. }) if same_run => keys.push(k),
                            _ => out.push(KvEvent::BlockRemoved {
                                keys: vec![k],
                                medium,
                            }),
                        }
                    }
                }
            }
        }
        self.taken.fetch_add(out.len() as u64, Ordering::Relaxed);
        (out, overflowed)
    }

    /// Events handed to the publisher so far.
    pub fn events_taken(&self) -> u64 {
        self.taken.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kvtier::chunk::ChunkInfo;
    use kvtier::keys::{ChunkKey, ModelIdentity, Origin};
    use kvtier::layout::{Dtype, KvLayout};
    use kvtier::tier::ResidencyObserver;

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
        c.l1.stored(&info(1));
        c.l1.stored(&info(2));
        c.l1.removed(&[ChunkKey([1; 32])]);
        c.l1.removed(&[ChunkKey([2; 32])]);
        c.l1.stored(&info(1));
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
    fn each_tier_has_its_medium_and_its_own_runs() {
        let c = Collector::new(100);
        c.l1.stored(&info(1));
        c.disk.stored(&info(1));
        c.l1.removed(&[ChunkKey([1; 32])]);
        c.disk.removed(&[ChunkKey([1; 32])]);
        let (ev, _) = c.take();
        let key = ChunkKey([1; 32]);
        assert_eq!(
            ev,
            vec![
                KvEvent::BlockStored {
                    key,
                    tokens: 16,
                    medium: MEDIUM_CPU
                },
                KvEvent::BlockRemoved {
                    keys: vec![key],
                    medium: MEDIUM_CPU
                },
                KvEvent::BlockStored {
                    key,
                    tokens: 16,
                    medium: MEDIUM_STORAGE
                },
                KvEvent::BlockRemoved {
                    keys: vec![key],
                    medium: MEDIUM_STORAGE
                },
            ]
        );
    }

    #[test]
    fn overflow_starts_over_with_all_blocks_cleared() {
        let c = Collector::new(3);
        for i in 0..5 {
            c.l1.stored(&info(i));
        }
        let (ev, overflow) = c.take();
        assert!(overflow);
        assert_eq!(ev[0], KvEvent::AllBlocksCleared);
        // Only what came after the overflow is kept.
        assert_eq!(ev.len(), 3);
        assert_eq!(c.take(), (vec![], false));
    }
}
