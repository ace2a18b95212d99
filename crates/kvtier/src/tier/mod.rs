//! Tiers: the `Tier` trait every storage level implements, and the built-in tiers.
//!
//! Order is the manager's business (L1 CPU first, then disk, then remote stores); a tier
//! only answers for itself. Every method returns a boxed future so slow tiers (disk, network)
//! run concurrently and the manager can put a deadline on each call (C8).

mod cpu;
mod disk;
mod fault;
pub mod object;
pub mod peer;
pub mod redis;
pub mod remote;
mod residency;
mod throttle;

use std::future::Future;
use std::pin::Pin;

pub use cpu::{CpuTier, CpuTierOptions, CpuTierStats};
pub use disk::{
    inspect as inspect_disk, BadRecord, DiskDurability, DiskTier, DiskTierOptions, DiskTierStats,
    GroupCount, InspectReport, DISK_TIER_NAME, MARKER as DISK_MARKER,
};
pub use fault::{Fault, FaultOp, FaultRule, FaultTier};
pub use object::url::ObjectUrl;
pub use object::{ObjectTier, ObjectTierStats};
pub use peer::url::PeerUrl;
pub use peer::{PeerTier, PeerTierStats};
pub use redis::url::RedisUrl;
pub use redis::{RedisTier, RedisTierStats};
pub use residency::{ResidencyChange, ResidencyChanges, ResidencyLog, ResidencyObserver};
pub use throttle::{ThrottleLimits, ThrottledTier};

use crate::chunk::Chunk;
use crate::error::Result;
use crate::keys::ChunkKey;
use crate::memory::BufferSource;

/// Boxed future returned by tier methods.
pub type TierFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// Result of a put.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// Stored (durably, for durable tiers).
    Stored,
    /// The key was already present or in flight; nothing written.
    AlreadyPresent,
    /// Not stored, for the given reason (full, not admitted, ...); not an error.
    Skipped(&'static str),
}

/// Capacity and occupancy of a tier.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TierUsage {
    /// Bytes held.
    pub used_bytes: u64,
    /// Byte budget (0 = unknown).
    pub capacity_bytes: u64,
    /// Chunks held.
    pub chunks: u64,
}

/// Monotonic counters a tier keeps itself; the manager exports them as metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TierCounters {
    /// Chunks evicted.
    pub evictions: u64,
    /// Corrupt records caught by the tier's own read verification.
    pub checksum_failures: u64,
}

/// One storage level.
pub trait Tier: Send + Sync {
    /// Name used in stats, metrics and logs.
    fn name(&self) -> &str;

    /// Whether `get` already verifies payload checksums itself (then the manager does not).
    fn verifies_reads(&self) -> bool {
        false
    }

    /// Whether the tier holds `key` (or is writing it), when it can tell at once from
    /// memory (a disk tier's index); `None` when it cannot without I/O (a remote store).
    /// With L1 off, a store skips a chunk that a tier answering yes already has.
    fn holds(&self, _key: &ChunkKey) -> Option<bool> {
        None
    }

    /// Reports every key this tier starts or stops holding to `observer` (KV events), under
    /// the tier's index lock; for tiers that keep an index in memory (the disk tier).
    /// False when the tier cannot (the default) or an observer is already set.
    fn set_residency_observer(&self, _observer: std::sync::Arc<dyn ResidencyObserver>) -> bool {
        false
    }

    /// How long the tier keeps a chunk after it was written, when it expires chunks by age
    /// (a Redis `ttl_sec`); `None` when it keeps them until evicted or removed. The manager
    /// writes a chunk again before that, rather than trust it is still there.
    fn retention(&self) -> Option<std::time::Duration> {
        None
    }

    /// A request referenced this prompt's chunk keys, in order (reported on lookup and on
    /// store); tiers whose eviction policy learns from requests pass it on. Default: ignored.
    fn observe_prompt(&self, _keys: &[ChunkKey], _report: crate::policy::PromptReport) {}

    /// How many leading keys of `keys` this tier holds.
    fn contains_prefix<'a>(&'a self, keys: &'a [ChunkKey]) -> TierFuture<'a, usize>;

    /// Reads a chunk; buffers come from `bufs`. `Ok(None)` is a miss.
    fn get<'a>(
        &'a self,
        key: ChunkKey,
        bufs: &'a dyn BufferSource,
    ) -> TierFuture<'a, Option<Chunk>>;

    /// Like [`get`](Tier::get), but a tier may leave the payload checksum to the caller
    /// (`false` in the pair: not verified yet), which then checks it while it copies the
    /// bytes anyway: one pass over memory instead of two. A caller that finds the payload
    /// corrupt calls [`discard_corrupt`](Tier::discard_corrupt). By default: `get`.
    fn get_deferred<'a>(
        &'a self,
        key: ChunkKey,
        bufs: &'a dyn BufferSource,
    ) -> TierFuture<'a, Option<(Chunk, bool)>> {
        let verified = self.verifies_reads();
        Box::pin(async move { Ok(self.get(key, bufs).await?.map(|c| (c, verified))) })
    }

    /// A chunk this tier returned failed verification: drop the copy (and count it, when
    /// the tier counts its own checksum failures). By default: `remove`.
    fn discard_corrupt(&self, key: ChunkKey) -> TierFuture<'_, bool> {
        self.remove(key)
    }

    /// Stores a chunk; completes once the chunk is as durable as the tier makes it.
    fn put(&self, chunk: Chunk) -> TierFuture<'_, PutOutcome>;

    /// Forgets a key. Returns whether it was present.
    fn remove(&self, key: ChunkKey) -> TierFuture<'_, bool>;

    /// Forgets everything; returns the number of chunks dropped.
    fn clear(&self) -> TierFuture<'_, u64>;

    /// Forgets every chunk stored under a tenant salt; returns how many.
    fn remove_salt<'a>(&'a self, salt: &'a str) -> TierFuture<'a, u64>;

    /// Current usage.
    fn usage(&self) -> TierUsage;

    /// Counters the tier keeps itself (eviction, its own checksum verification).
    fn counters(&self) -> TierCounters {
        TierCounters::default()
    }

    /// Tier-specific details for `stats()` (JSON object; empty by default).
    fn details(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}
