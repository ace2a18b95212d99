//! The scaffold every remote tier (a store shared over the network) is built on.
//!
//! A remote tier is a [`RemoteTier`] over a [`RemoteStore`]. The store makes the requests only
//! it knows (Redis commands, kvtier frames, object-store calls); the scaffold does the rest,
//! the same way for every store:
//!
//! * the [`Tier`] implementation, with reads verified by the store as it reads (a record's
//!   header is checked against the key, its payload against the checksum);
//! * a get's outcome: a verified chunk is a hit; a value that fails verification is a miss,
//!   counted and handed back to the store to delete or keep ([`RemoteStore::discard`]);
//!   no room in L1 for the payload is a miss, counted;
//! * a put's outcome (stored, already there, skipped), counted;
//! * one stats shape ([`RemoteStats`]), the usage (what this process wrote: a shared store's
//!   own occupancy is the server's business) and the counters the manager exports;
//! * default tier names and the URL syntax and connection options of [`url`].
//!
//! Stores that lease connections from a `transport::link::Pool` also share its `exec`:
//! a pooled connection found stale (the server restarted) is replaced once, transparently.
//!
//! There is no in-flight dedupe of puts here: the manager never runs two puts of one key on
//! one tier at once. Its per-tier write queue skips a key already queued or being written
//! there, and releases it only once the put has returned or its deadline has dropped it
//! (`manager::Inner::enqueue_put`, the only caller of `Tier::put` on lower tiers), so a
//! tier-level map could never see a duplicate.

mod stats;
pub mod url;

use std::future::Future;

use stats::RemoteCounters;
pub use stats::RemoteStats;

use super::{PutOutcome, Tier, TierCounters, TierFuture, TierUsage};
use crate::chunk::Chunk;
use crate::error::Result;
use crate::keys::ChunkKey;
use crate::memory::BufferSource;
use crate::transport::link::LinkCounters;
use crate::transport::record::RecordRead;

/// The store side of a remote tier: the requests only it knows how to make. Implemented by
/// the built-in remote stores ([`RedisStore`](super::redis::RedisStore),
/// [`PeerStore`](super::peer::PeerStore)); [`RemoteTier`] adds everything else.
pub trait RemoteStore: Send + Sync + 'static {
    /// The stats of the tier: [`RemoteStats`] plus what only this store counts.
    type Stats: serde::Serialize;

    /// How many leading keys of `keys` the store holds (`keys` is never empty).
    fn prefix_len<'a>(
        &'a self,
        keys: &'a [ChunkKey],
    ) -> impl Future<Output = Result<usize>> + Send + 'a;

    /// Reads the record of `key`, its payload into a buffer from `bufs`, verifying it;
    /// `None` when the store does not hold the key.
    fn fetch<'a>(
        &'a self,
        key: ChunkKey,
        bufs: &'a dyn BufferSource,
    ) -> impl Future<Output = Result<Option<RecordRead>>> + Send + 'a;

    /// The value of `key` failed verification (`why`): log it, and delete it or keep it
    /// (already counted).
    fn discard<'a>(&'a self, key: ChunkKey, why: &'a str) -> impl Future<Output = ()> + Send + 'a;

    /// Writes a chunk (its record: header, then payload).
    fn store<'a>(
        &'a self,
        chunk: &'a Chunk,
    ) -> impl Future<Output = Result<PutOutcome>> + Send + 'a;

    /// Deletes a key; returns whether it was there.
    fn remove(&self, key: ChunkKey) -> impl Future<Output = Result<bool>> + Send + '_;

    /// Deletes this tier's chunks, or with `salt` only that tenant's; returns how many.
    fn sweep<'a>(&'a self, salt: Option<&'a str>) -> impl Future<Output = Result<u64>> + Send + 'a;

    /// How long the store keeps a written chunk, when it expires them ([`Tier::retention`]).
    fn retention(&self) -> Option<std::time::Duration> {
        None
    }

    /// The counters of the store's connection pools, if it has any.
    fn links(&self) -> Option<&LinkCounters> {
        None
    }

    /// The tier's stats from the scaffold's `common` part.
    fn stats(&self, common: RemoteStats) -> Self::Stats;

    /// The tier's details for `stats()` (by default: the stats).
    fn details(&self, stats: &Self::Stats) -> serde_json::Value {
        serde_json::to_value(stats).unwrap_or_default()
    }
}

/// The default name of the `index`-th `remote_url` entry of a kind: `base`, then `base2`, ...
pub(crate) fn default_name(base: &str, index: usize) -> String {
    match index {
        0 => base.to_string(),
        i => format!("{base}{}", i + 1),
    }
}

/// A remote tier: a [`RemoteStore`] with the scaffold's counters and [`Tier`] implementation.
pub struct RemoteTier<S> {
    name: String,
    /// The store's URL, secrets redacted.
    shown_url: String,
    store: S,
    counters: RemoteCounters,
}

impl<S: RemoteStore> std::fmt::Debug for RemoteTier<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteTier")
            .field("name", &self.name)
            .field("url", &format_args!("{}", self.shown_url))
            .finish()
    }
}

impl<S: RemoteStore> RemoteTier<S> {
    /// The tier `name` over `store`; `shown_url` is the store's URL with secrets redacted
    /// (for `Debug`).
    pub(crate) fn with_store(name: String, shown_url: String, store: S) -> RemoteTier<S> {
        RemoteTier {
            name,
            shown_url,
            store,
            counters: RemoteCounters::default(),
        }
    }

    /// The store.
    pub(crate) fn store(&self) -> &S {
        &self.store
    }

    /// Counter snapshot.
    pub fn stats(&self) -> S::Stats {
        self.store.stats(self.counters.snapshot(self.store.links()))
    }

    async fn get_chunk(&self, key: ChunkKey, bufs: &dyn BufferSource) -> Result<Option<Chunk>> {
        let c = &self.counters;
        RemoteCounters::bump(&c.gets, 1);
        match self.store.fetch(key, bufs).await? {
            Some(RecordRead::Chunk(chunk)) => {
                RemoteCounters::bump(&c.hits, 1);
                RemoteCounters::bump(&c.get_bytes, chunk.buf.len() as u64);
                Ok(Some(chunk))
            }
            Some(RecordRead::Corrupt(why)) => {
                RemoteCounters::bump(&c.checksum_failures, 1);
                self.store.discard(key, &why).await;
                Ok(None)
            }
            Some(RecordRead::NoBuffer) => {
                RemoteCounters::bump(&c.alloc_failures, 1);
                Ok(None)
            }
            None => {
                RemoteCounters::bump(&c.misses, 1);
                Ok(None)
            }
        }
    }

    async fn put_chunk(&self, chunk: Chunk) -> Result<PutOutcome> {
        let c = &self.counters;
        let outcome = self.store.store(&chunk).await?;
        match outcome {
            PutOutcome::Stored => {
                RemoteCounters::bump(&c.puts, 1);
                RemoteCounters::bump(&c.put_bytes, chunk.buf.len() as u64);
            }
            PutOutcome::AlreadyPresent => RemoteCounters::bump(&c.puts_deduped, 1),
            PutOutcome::Skipped(_) => RemoteCounters::bump(&c.puts_skipped, 1),
        }
        Ok(outcome)
    }
}

impl<S: RemoteStore> Tier for RemoteTier<S> {
    fn name(&self) -> &str {
        &self.name
    }

    fn verifies_reads(&self) -> bool {
        true
    }

    fn retention(&self) -> Option<std::time::Duration> {
        self.store.retention()
    }

    fn contains_prefix<'a>(&'a self, keys: &'a [ChunkKey]) -> TierFuture<'a, usize> {
        if keys.is_empty() {
            return Box::pin(std::future::ready(Ok(0)));
        }
        Box::pin(self.store.prefix_len(keys))
    }

    fn get<'a>(
        &'a self,
        key: ChunkKey,
        bufs: &'a dyn BufferSource,
    ) -> TierFuture<'a, Option<Chunk>> {
        Box::pin(self.get_chunk(key, bufs))
    }

    fn put(&self, chunk: Chunk) -> TierFuture<'_, PutOutcome> {
        Box::pin(self.put_chunk(chunk))
    }

    fn remove(&self, key: ChunkKey) -> TierFuture<'_, bool> {
        Box::pin(self.store.remove(key))
    }

    fn clear(&self) -> TierFuture<'_, u64> {
        Box::pin(self.store.sweep(None))
    }

    fn remove_salt<'a>(&'a self, salt: &'a str) -> TierFuture<'a, u64> {
        Box::pin(self.store.sweep(Some(salt)))
    }

    fn usage(&self) -> TierUsage {
        // A shared store: what other nodes wrote (and the server evicted) is unknown here.
        // Report what this process wrote; capacity is the server's business.
        let s = self.counters.snapshot(None);
        TierUsage {
            used_bytes: s.put_bytes,
            capacity_bytes: 0,
            chunks: s.puts,
        }
    }

    fn counters(&self) -> TierCounters {
        TierCounters {
            evictions: 0,
            checksum_failures: self.counters.snapshot(None).checksum_failures,
        }
    }

    fn details(&self) -> serde_json::Value {
        self.store.details(&self.stats())
    }
}
