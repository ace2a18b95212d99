//! The cache API shared by the embedded [`Engine`](crate::Engine) and the client of a
//! `kvtier serve` server, so callers (benchmarks, Python bindings, connectors) switch between
//! them by configuration.
//!
//! # Windowed operations
//!
//! The `*_from` operations (here and on [`Engine`](crate::Engine)) address only chunks
//! `first_chunk..` of a prompt: what a sliding-window attention layer group needs of a long
//! prompt. Keys stay the chained prefix keys (chunk `i`'s key commits to every token before
//! it), so the whole prompt is still passed; only the chunks addressed, and the payload,
//! change. A windowed payload (or output buffer) starts at chunk `first_chunk`'s first token,
//! the *window start* `w` ([`KeySpace::window_start`](crate::keys::KeySpace::window_start)):
//! chunk `i` occupies bytes `(start_i - w) * B .. (end_i - w) * B`, `B` the bytes per token.
//! Token counts in the results stay absolute prompt positions: `hit_tokens` /
//! `stored_tokens` are the token where the contiguous run of chunks starting at
//! `first_chunk` ends, and equal `w` when that run is empty (`hit_chunks` tells; the window
//! tokens found are `hit_tokens - w`). The whole-prompt operations are the
//! `first_chunk` 0 case (`w` = 0). `first_chunk` may equal the prompt's chunk count (an empty
//! window starting at the end of the chunked tokens); beyond that the call fails with
//! [`Error::InvalidInput`](crate::Error::InvalidInput) before anything is hashed or sent.

use std::time::Duration;

use crate::error::Result;
use crate::keys::ChunkKey;

/// Answer to a prefix lookup (or a windowed one), in tokens.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LookupResult {
    /// Leading tokens retrievable; for a windowed lookup, the absolute token where the run of
    /// stored chunks starting at `first_chunk` ends (the window start when it is empty).
    pub hit_tokens: usize,
    /// Chunks in that prefix (or run, counted from `first_chunk`).
    pub hit_chunks: usize,
    /// Tier index of each hit chunk (0 = L1).
    pub tiers: Vec<usize>,
}

/// What a retrieve loaded.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RetrieveReport {
    /// Leading tokens copied into the output; for a windowed retrieve, the absolute token
    /// where the copied run ends (the window start when nothing was copied).
    pub hit_tokens: usize,
    /// Tier index each chunk came from.
    pub tiers: Vec<usize>,
}

/// A pin on one L1 chunk (see [`KvCache::pin`]); give it back with [`KvCache::unpin`]. Pins
/// also expire on their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct PinToken {
    /// Pinned key.
    pub key: ChunkKey,
    /// Pin id (unique within the L1 tier).
    pub id: u64,
}

/// What a store did, in a form that crosses process boundaries.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoreSummary {
    /// Leading tokens now stored (or being stored by a concurrent call); for a windowed
    /// store, the absolute token where that run ends (the window start when it is empty).
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
    fn lookup(&self, tokens: &[u32], cache_salt: Option<&str>) -> Result<LookupResult> {
        self.lookup_from(tokens, cache_salt, 0)
    }
    /// How many contiguous chunks from chunk `first_chunk` on are stored, over all tiers
    /// (`hit_tokens` absolute: where that run ends).
    fn lookup_from(
        &self,
        tokens: &[u32],
        cache_salt: Option<&str>,
        first_chunk: usize,
    ) -> Result<LookupResult>;
    /// Stores a prompt's KV (chunk payloads back to back).
    fn store(
        &self,
        tokens: &[u32],
        cache_salt: Option<&str>,
        payload: &[u8],
    ) -> Result<StoreSummary> {
        self.store_from(tokens, cache_salt, 0, payload)
    }
    /// Stores chunks `first_chunk..` of a prompt's KV; `payload` starts at chunk
    /// `first_chunk`'s first token.
    fn store_from(
        &self,
        tokens: &[u32],
        cache_salt: Option<&str>,
        first_chunk: usize,
        payload: &[u8],
    ) -> Result<StoreSummary>;
    /// Copies the stored prefix into `out`.
    fn retrieve(
        &self,
        tokens: &[u32],
        cache_salt: Option<&str>,
        out: &mut [u8],
    ) -> Result<RetrieveReport> {
        self.retrieve_from(tokens, cache_salt, 0, out)
    }
    /// Copies the stored run of chunks starting at chunk `first_chunk` into `out` (chunk
    /// `first_chunk` at offset 0).
    fn retrieve_from(
        &self,
        tokens: &[u32],
        cache_salt: Option<&str>,
        first_chunk: usize,
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
