//! Residency reports: a tier tells an observer which chunk keys it started or stopped
//! holding, so a publisher (the server's KV-event stream, the vLLM connector's events) can
//! announce what a node serves.
//!
//! An observer is called while the tier holds its own index lock, so reports about one key
//! arrive in the order the index changed; it must only record the change (push to a queue)
//! and never call back into the tier. [`ResidencyLog`] is that queue.

use parking_lot::Mutex;

use crate::chunk::ChunkInfo;
use crate::keys::ChunkKey;

/// Receives a tier's index changes.
pub trait ResidencyObserver: Send + Sync {
    /// The tier now holds this chunk: a read of its key hits from now on.
    fn stored(&self, info: &ChunkInfo);
    /// The tier no longer holds these keys (eviction, removal, tenant deletion, clear).
    fn removed(&self, keys: &[ChunkKey]);
}

/// One index change, in the order the tier made them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResidencyChange {
    /// The tier now holds this chunk, of this many tokens.
    Stored(ChunkKey, u32),
    /// The tier no longer holds this chunk.
    Removed(ChunkKey),
}

/// What a [`ResidencyLog`] held when it was taken.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResidencyChanges {
    /// The changes since the last take, oldest first (only those after an overflow).
    pub changes: Vec<ResidencyChange>,
    /// The log overflowed since the last take and dropped what it held: a consumer must
    /// forget everything it learnt and relearn from `changes` on.
    pub overflowed: bool,
}

/// A bounded, ordered queue of residency changes between two takes.
///
/// The reports arrive under the tier's index lock, so recording one is a push into a
/// vector. A consumer that falls behind by more than the bound loses the queue and is told
/// so ([`ResidencyChanges::overflowed`]): it under-counts for a while, but never believes in
/// a chunk a load would miss.
#[derive(Debug)]
pub struct ResidencyLog {
    pending: Mutex<ResidencyChanges>,
    limit: usize,
}

impl ResidencyLog {
    /// A log holding at most `limit` changes (at least 1) between two takes.
    pub fn new(limit: usize) -> ResidencyLog {
        ResidencyLog {
            pending: Mutex::default(),
            limit: limit.max(1),
        }
    }

    fn push(&self, p: &mut ResidencyChanges, c: ResidencyChange) {
        if p.changes.len() >= self.limit {
            p.changes = Vec::new();
            p.overflowed = true;
        }
        p.changes.push(c);
    }

    /// Takes the changes queued so far.
    pub fn take(&self) -> ResidencyChanges {
        std::mem::take(&mut *self.pending.lock())
    }
}

impl ResidencyObserver for ResidencyLog {
    fn stored(&self, info: &ChunkInfo) {
        let mut p = self.pending.lock();
        self.push(&mut p, ResidencyChange::Stored(info.key, info.num_tokens));
    }

    fn removed(&self, keys: &[ChunkKey]) {
        let mut p = self.pending.lock();
        for k in keys {
            self.push(&mut p, ResidencyChange::Removed(*k));
        }
    }
}

/// A test observer that mirrors a tier's index from its reports, and fails on a report that
/// contradicts the mirror (a store twice without a removal, a removal never stored).
#[cfg(test)]
#[derive(Default)]
pub(crate) struct Mirror(pub(crate) Mutex<std::collections::BTreeSet<ChunkKey>>);

#[cfg(test)]
impl ResidencyObserver for Mirror {
    fn stored(&self, info: &ChunkInfo) {
        assert!(
            self.0.lock().insert(info.key),
            "stored twice without a removal"
        );
    }
    fn removed(&self, keys: &[ChunkKey]) {
        let mut m = self.0.lock();
        for k in keys {
            assert!(m.remove(k), "removed a key never reported stored");
        }
    }
}
