//! Residency reports: a tier tells an observer which chunk keys it started or stopped
//! holding, so a publisher (the server's KV-event stream) can announce what a node serves.
//!
//! An observer is called while the tier holds its own index lock, so reports about one key
//! arrive in the order the index changed; it must only record the change (push to a queue)
//! and never call back into the tier.

use crate::chunk::ChunkInfo;
use crate::keys::ChunkKey;

/// Receives a tier's index changes.
pub trait ResidencyObserver: Send + Sync {
    /// The tier now holds this chunk: a read of its key hits from now on.
    fn stored(&self, info: &ChunkInfo);
    /// The tier no longer holds these keys (eviction, removal, tenant deletion, clear).
    fn removed(&self, keys: &[ChunkKey]);
}
