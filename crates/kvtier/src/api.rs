//! The cache API shared by the embedded [`Engine`](crate::Engine) and the client of a
//! `kvtier serve` server, so callers (benchmarks, Python bindings, connectors) switch between
//! them by configuration.

use std::time::Duration;

use crate::error::Result;
use crate::tier::PinToken;
use crate::transport::wire::StoreCounts;
use crate::{LookupResult, RetrieveReport};

/// What a store did, in a form that crosses process boundaries.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoreSummary {
    /// Leading tokens now stored (or being stored by a concurrent call).
    pub stored_tokens: usize,
    /// Chunks newly written.
    pub new_chunks: usize,
    /// Chunks already present.
    pub present_chunks: usize,
    /// Chunks another store was writing.
    pub inflight_chunks: usize,
    /// Chunks dropped because L1 had no room.
    pub dropped_chunks: usize,
    /// Payload bytes copied in.
    pub new_bytes: u64,
}

impl From<&StoreSummary> for StoreCounts {
    fn from(s: &StoreSummary) -> StoreCounts {
        StoreCounts {
            stored_tokens: s.stored_tokens as u64,
            new_chunks: s.new_chunks as u64,
            present_chunks: s.present_chunks as u64,
            inflight_chunks: s.inflight_chunks as u64,
            dropped_chunks: s.dropped_chunks as u64,
            new_bytes: s.new_bytes,
        }
    }
}

impl From<StoreCounts> for StoreSummary {
    fn from(c: StoreCounts) -> StoreSummary {
        let n = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        StoreSummary {
            stored_tokens: n(c.stored_tokens),
            new_chunks: n(c.new_chunks),
            present_chunks: n(c.present_chunks),
            inflight_chunks: n(c.inflight_chunks),
            dropped_chunks: n(c.dropped_chunks),
            new_bytes: c.new_bytes,
        }
    }
}

/// A load started by [`KvCache::prefetch`].
pub trait PendingLoad: Send {
    /// Waits (at most `timeout`, if given) and returns the tokens of the contiguous prefix
    /// now loaded into L1.
    fn wait(self: Box<Self>, timeout: Option<Duration>) -> Result<usize>;
}

/// Operations every kvtier cache offers, embedded or remote.
pub trait KvCache: Send + Sync {
    /// Tokens per chunk.
    fn chunk_size(&self) -> usize;
    /// KV bytes per token of the model this handle serves.
    fn bytes_per_token(&self) -> usize;
    /// How many leading tokens are stored, over all tiers.
    fn lookup(&self, tokens: &[u32], cache_salt: Option<&str>) -> Result<LookupResult>;
    /// Stores a prompt's KV (chunk payloads back to back).
    fn store(
        &self,
        tokens: &[u32],
        cache_salt: Option<&str>,
        payload: &[u8],
    ) -> Result<StoreSummary>;
    /// Copies the stored prefix into `out`.
    fn retrieve(
        &self,
        tokens: &[u32],
        cache_salt: Option<&str>,
        out: &mut [u8],
    ) -> Result<RetrieveReport>;
    /// Starts loading the stored prefix into L1.
    fn prefetch(&self, tokens: &[u32], cache_salt: Option<&str>) -> Result<Box<dyn PendingLoad>>;
    /// Pins the L1-resident chunks of the stored prefix.
    fn pin(
        &self,
        tokens: &[u32],
        cache_salt: Option<&str>,
        ttl: Option<Duration>,
    ) -> Result<Vec<PinToken>>;
    /// Releases pins.
    fn unpin(&self, pins: &[PinToken]) -> Result<()>;
    /// Removes the prompt's chunks from every tier; returns how many were held somewhere.
    fn remove(&self, tokens: &[u32], cache_salt: Option<&str>) -> Result<u64>;
    /// Forgets a tenant's chunks in every tier; returns how many chunks were dropped.
    fn remove_salt(&self, salt: &str) -> Result<u64>;
    /// Empties every tier; returns how many chunks were dropped.
    fn clear(&self) -> Result<u64>;
    /// Waits for queued lower-tier writes, at most `timeout`; true when all finished.
    fn flush(&self, timeout: Duration) -> Result<bool>;
    /// Engine and tier numbers as JSON.
    fn stats_json(&self) -> Result<serde_json::Value>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_summary_crosses_the_wire_unchanged() {
        let s = StoreSummary {
            stored_tokens: 4096,
            new_chunks: 16,
            present_chunks: 1,
            inflight_chunks: 2,
            dropped_chunks: 3,
            new_bytes: 1 << 33,
        };
        let c = StoreCounts::from(&s);
        // Same bytes as the summary itself had on the wire before it got a wire form.
        assert_eq!(
            postcard::to_stdvec(&c).unwrap(),
            postcard::to_stdvec(&s).unwrap()
        );
        assert_eq!(StoreSummary::from(c), s);
    }
}
