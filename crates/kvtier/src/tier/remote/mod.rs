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
use std::sync::Arc;

use parking_lot::Mutex;

use stats::RemoteCounters;
pub use stats::RemoteStats;

use super::{PutOutcome, Tier, TierCounters, TierFuture, TierUsage};
use crate::chunk::Chunk;
use crate::error::Result;
use crate::keys::{ChunkKey, KeyMap};
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
    store: Arc<S>,
    counters: RemoteCounters,
    /// Corrupt values being deleted: a read of one is a miss without a second fetch, so a bad
    /// value is counted once however many reads meet it.
    discarding: Arc<Mutex<KeyMap<()>>>,
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
            store: Arc::new(store),
            counters: RemoteCounters::default(),
            discarding: Arc::default(),
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
        if self.discarding.lock().contains_key(&key) {
            RemoteCounters::bump(&c.misses, 1);
            return Ok(None);
        }
        match self.store.fetch(key, bufs).await? {
            Some(RecordRead::Chunk(chunk)) => {
                RemoteCounters::bump(&c.hits, 1);
                RemoteCounters::bump(&c.get_bytes, chunk.buf.len() as u64);
                Ok(Some(chunk))
            }
            Some(RecordRead::Corrupt(why)) => {
                if self.discarding.lock().insert(key, ()).is_none() {
                    RemoteCounters::bump(&c.checksum_failures, 1);
                    self.discard(key, why).await;
                }
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

    /// Hands a corrupt value to the store to delete, in a task of its own: a caller that
    /// stops waiting (a retrieve that ended at an earlier miss drops its other reads) must
    /// not leave the value behind to be read and counted again. The get still waits for it.
    async fn discard(&self, key: ChunkKey, why: String) {
        let store = self.store.clone();
        let discarding = self.discarding.clone();
        let task = async move {
            store.discard(key, &why).await;
            discarding.lock().remove(&key);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let _ = rt.spawn(task).await;
            }
            Err(_) => task.await,
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use tokio::sync::Notify;

    use super::*;
    use crate::memory::WritableBuf;

    /// A store whose every value is corrupt and whose deletes wait for `release`.
    #[derive(Default)]
    struct CorruptStore {
        fetches: AtomicU64,
        discards_started: AtomicU64,
        discards_done: AtomicU64,
        release: Notify,
    }

    struct NoBuffers;

    impl BufferSource for NoBuffers {
        fn allocate(&self, _len: usize) -> Option<WritableBuf> {
            None
        }
    }

    impl RemoteStore for CorruptStore {
        type Stats = RemoteStats;

        async fn prefix_len(&self, _keys: &[ChunkKey]) -> Result<usize> {
            Ok(0)
        }

        async fn fetch(
            &self,
            _key: ChunkKey,
            _bufs: &dyn BufferSource,
        ) -> Result<Option<RecordRead>> {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            Ok(Some(RecordRead::Corrupt("checksum mismatch".into())))
        }

        async fn discard(&self, _key: ChunkKey, _why: &str) {
            self.discards_started.fetch_add(1, Ordering::SeqCst);
            self.release.notified().await;
            self.discards_done.fetch_add(1, Ordering::SeqCst);
        }

        async fn store(&self, _chunk: &Chunk) -> Result<PutOutcome> {
            Ok(PutOutcome::Stored)
        }

        async fn remove(&self, _key: ChunkKey) -> Result<bool> {
            Ok(false)
        }

        async fn sweep(&self, _salt: Option<&str>) -> Result<u64> {
            Ok(0)
        }

        fn stats(&self, common: RemoteStats) -> RemoteStats {
            common
        }
    }

    async fn until(what: impl Fn() -> bool) {
        for _ in 0..1000 {
            if what() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        panic!("timed out");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_corrupt_value_is_counted_once_and_deleted_even_when_the_reader_gives_up() {
        let tier = Arc::new(RemoteTier::with_store(
            "t".into(),
            "t://".into(),
            CorruptStore::default(),
        ));
        let key = ChunkKey([7; 32]);
        // A reader that stops waiting while the delete is under way (as a retrieve does with
        // its reads past the first miss).
        let reader = {
            let tier = tier.clone();
            tokio::spawn(async move { tier.get(key, &NoBuffers).await })
        };
        let store = tier.store();
        until(|| store.discards_started.load(Ordering::SeqCst) == 1).await;
        reader.abort();
        assert!(reader.await.unwrap_err().is_cancelled());
        // Read again before the delete finished: a miss, without fetching the value again.
        assert!(tier.get(key, &NoBuffers).await.unwrap().is_none());
        assert_eq!(store.fetches.load(Ordering::SeqCst), 1);
        assert_eq!(tier.stats().checksum_failures, 1);
        // The delete outlives its reader.
        store.release.notify_one();
        until(|| store.discards_done.load(Ordering::SeqCst) == 1).await;
        until(|| tier.discarding.lock().is_empty()).await;
        // Gone from the store's point of view: the next read asks the store again.
        store.release.notify_one();
        assert!(tier.get(key, &NoBuffers).await.unwrap().is_none());
        assert_eq!(store.fetches.load(Ordering::SeqCst), 2);
    }
}
