//! The storage manager: one ordered list of tiers behind the [`Tier`] trait, with L1 (the CPU
//! tier) first.
//!
//! - **lookup** (C2): how many leading chunks are stored, and in which tier each one is;
//!   each tier continues from the first chunk the tiers before it lacked.
//! - **store** (C5): write-through; L1 synchronously, lower tiers asynchronously through a
//!   bounded queue per tier; present or in-flight keys are skipped; never waits for memory.
//!   Each lower tier is written a chunk once: keys it is known to hold (its own index, or
//!   what the manager learnt from it, [`presence`]) are not written again.
//! - **reads** (C3): blocking get, batched get, non-blocking get and prefetch; hits from a
//!   lower tier are written back into L1 unless that tier is marked `write_back: false`.
//! - **prefetch** (C4): loads a prefix spread over tiers concurrently, then keeps only the
//!   contiguous prefix; chunks after the first failure are released, never written back.
//! - **deadlines** (C8): every tier call has one; failures and timeouts mark a tier down for
//!   a backoff period, during which it is skipped.

mod handles;
mod health;
mod presence;
mod read;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use tokio::runtime::{Handle, Runtime};

pub use handles::{
    GetHandle, PrefetchHandle, PrefetchResult, StoreTicket, StreamedChunk, WriteOutcome,
};
pub use health::{Health, HealthPolicy};

use crate::api::PinToken;
use crate::chunk::Chunk;
use crate::error::{Error, Result};
use crate::keys::{ChunkKey, KeyMap};
use crate::memory::{Pool, WritableBuf};
use crate::metrics::Metrics;
use crate::tier::{CpuTier, CpuTierStats, PutOutcome, Tier, TierUsage};

/// Manager settings.
#[derive(Clone, Debug)]
pub struct ManagerOptions {
    /// Deadline of one lookup or read call on a tier.
    pub read_deadline: Duration,
    /// Deadline of one store call on a tier.
    pub store_deadline: Duration,
    /// Chunks queued for writing per lower tier before further stores to it are skipped.
    pub write_queue_chunks: usize,
    /// Bytes queued for writing per lower tier before further stores to it are skipped.
    pub write_queue_bytes: u64,
    /// Chunk loads a prefetch runs at once.
    pub prefetch_concurrency: usize,
    /// Backoff of failing tiers.
    pub health: HealthPolicy,
    /// Worker threads of the manager's async runtime.
    pub runtime_threads: usize,
    /// Per lower tier without its own index: chunk keys remembered as held there, so
    /// stores do not write them again (0: none, every store re-sends).
    pub write_dedupe_chunks: usize,
}

impl Default for ManagerOptions {
    fn default() -> Self {
        ManagerOptions {
            read_deadline: Duration::from_secs(2),
            store_deadline: Duration::from_secs(30),
            write_queue_chunks: 64,
            write_queue_bytes: 4 << 30,
            prefetch_concurrency: 8,
            health: HealthPolicy::default(),
            runtime_threads: 2,
            write_dedupe_chunks: 1 << 18,
        }
    }
}

/// A tier below L1 with its manager-side settings.
#[derive(Clone)]
pub struct TierSpec {
    /// The tier.
    pub tier: Arc<dyn Tier>,
    /// Whether hits from this tier are promoted into L1 (false for e.g. a peer's transfer
    /// buffer).
    pub write_back: bool,
}

impl TierSpec {
    /// A tier whose hits are written back into L1.
    pub fn new(tier: Arc<dyn Tier>) -> TierSpec {
        TierSpec {
            tier,
            write_back: true,
        }
    }
}

/// Result of a prefix lookup.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrefixLookup {
    /// Number of leading chunks stored.
    pub hit_chunks: usize,
    /// Tier index of each hit chunk (0 = L1, then lower tiers in order).
    pub tiers: Vec<usize>,
}

impl PrefixLookup {
    /// Chunks served by tier `t`.
    pub fn chunks_in(&self, t: usize) -> usize {
        self.tiers.iter().filter(|&&x| x == t).count()
    }
}

pub(crate) struct Slot {
    pub(crate) tier: Arc<dyn Tier>,
    pub(crate) name: String,
    pub(crate) write_back: bool,
    pub(crate) health: Health,
    queued_chunks: AtomicUsize,
    queued_bytes: AtomicU64,
    /// Whether the write queue overflowed since the last write it accepted: stores skip
    /// this tier rather than wait (C5), and the operator hears it once per episode.
    saturated: AtomicBool,
    inflight: Mutex<KeyMap<()>>,
    /// Keys the tier is known to hold (for tiers without their own index).
    pub(crate) presence: presence::Presence,
}

impl Slot {
    /// Whether the tier is known, without I/O, to hold `key`: its own index when it has
    /// one, else what the manager learnt from it.
    fn knows(&self, key: &ChunkKey) -> bool {
        match self.tier.holds(key) {
            Some(held) => held,
            None => self.presence.knows(key),
        }
    }

    /// The tier said it holds these keys.
    pub(crate) fn learn<'a>(&self, keys: impl IntoIterator<Item = &'a ChunkKey>) {
        self.presence
            .learn(keys.into_iter().filter(|k| self.tier.holds(k).is_none()));
    }
}

#[derive(Default)]
struct Pending {
    count: Mutex<usize>,
    idle: Condvar,
}

pub(crate) struct Inner {
    pub(crate) l1: Arc<CpuTier>,
    pub(crate) l1_enabled: bool,
    pub(crate) lower: Vec<Slot>,
    pub(crate) opts: ManagerOptions,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) handle: Handle,
    storing: Mutex<KeyMap<()>>,
    pending: Pending,
}

struct RuntimeHolder(Option<Runtime>);

impl Drop for RuntimeHolder {
    fn drop(&mut self) {
        // Tasks hold only `Inner`, so the runtime can be dropped from anywhere; do it without
        // blocking so dropping an engine inside another async runtime is fine.
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// The storage manager. Cheap to clone; thread-safe.
#[derive(Clone)]
pub struct StorageManager {
    pub(crate) inner: Arc<Inner>,
    _rt: Arc<RuntimeHolder>,
}

impl std::fmt::Debug for StorageManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageManager")
            .field("tiers", &self.tier_names())
            .finish()
    }
}

/// Outcome of [`StorageManager::claim`].
pub enum StoreClaim {
    /// L1 already holds the key (its chunk is returned; nothing needs storing).
    Present(Chunk),
    /// L1 is off and every lower tier taking writes is known, without I/O, to hold the key
    /// or be writing it (a disk tier's index, or what the manager learnt from a remote
    /// tier): nothing needs storing.
    Stored,
    /// Another store of the key is under way.
    InFlight,
    /// The caller owns the store of this key until the guard drops.
    New(ClaimGuard),
}

/// Exclusive right to store one key; dropping it releases the key.
pub struct ClaimGuard {
    inner: Arc<Inner>,
    key: ChunkKey,
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        self.inner.storing.lock().remove(&self.key);
    }
}

impl StorageManager {
    /// Builds a manager over `l1` (enabled or used only as the staging allocator) and the
    /// lower tiers in order.
    pub fn new(
        l1: Arc<CpuTier>,
        l1_enabled: bool,
        lower: Vec<TierSpec>,
        opts: ManagerOptions,
        metrics: Arc<Metrics>,
    ) -> Result<StorageManager> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(opts.runtime_threads.max(1))
            .thread_name("kvtier-io")
            .enable_time()
            .build()
            .map_err(|e| Error::io("starting the engine's I/O runtime", e))?;
        let mut names: Vec<String> = vec![l1.name().to_string()];
        let slots = lower
            .into_iter()
            .map(|s| {
                let name = s.tier.name().to_string();
                if names.contains(&name) {
                    return Err(Error::invalid(format!(
                        "two tiers are named `{name}`; tier names must be unique"
                    )));
                }
                names.push(name.clone());
                let retention = s.tier.retention();
                Ok(Slot {
                    health: Health::new(&name, opts.health),
                    tier: s.tier,
                    name,
                    write_back: s.write_back,
                    queued_chunks: AtomicUsize::new(0),
                    queued_bytes: AtomicU64::new(0),
                    saturated: AtomicBool::new(false),
                    inflight: Mutex::default(),
                    presence: presence::Presence::new(opts.write_dedupe_chunks, retention),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let inner = Arc::new(Inner {
            l1,
            l1_enabled,
            lower: slots,
            opts,
            metrics,
            handle: rt.handle().clone(),
            storing: Mutex::default(),
            pending: Pending::default(),
        });
        Ok(StorageManager {
            inner,
            _rt: Arc::new(RuntimeHolder(Some(rt))),
        })
    }

    /// The memory pool every chunk lives in (L1's): its size, and its file descriptor for
    /// processes that map it.
    pub fn pool(&self) -> &Pool {
        self.inner.l1.pool()
    }

    /// L1's own numbers (pool, pins, evictions).
    pub fn l1_stats(&self) -> CpuTierStats {
        self.inner.l1.stats()
    }

    /// Whether L1 holds `key`.
    pub fn l1_holds(&self, key: &ChunkKey) -> bool {
        self.inner.l1.contains(key)
    }

    /// Reports every key L1 starts or stops holding to `observer` (the server's KV-event
    /// stream). Returns false when L1 does not cache (it is only a staging pool) or an
    /// observer is already set.
    pub fn set_l1_observer(&self, observer: Arc<dyn crate::tier::ResidencyObserver>) -> bool {
        self.inner.l1_enabled && self.inner.l1.set_observer(observer)
    }

    /// Reports every key the lower tier named `tier` (`disk`: the local-disk tier) starts
    /// or stops holding to `observer`. Returns false when there is no such tier, it keeps
    /// no index of its own to report from (remote stores), or an observer is already set.
    pub fn set_tier_observer(
        &self,
        tier: &str,
        observer: Arc<dyn crate::tier::ResidencyObserver>,
    ) -> bool {
        self.inner
            .lower
            .iter()
            .find(|s| s.name == tier)
            .is_some_and(|s| s.tier.set_residency_observer(observer))
    }

    /// Drops every chunk L1 holds (lower tiers keep theirs); returns how many.
    pub fn clear_l1(&self) -> u64 {
        self.inner.l1.clear_all()
    }

    /// Pins the leading chunks of `keys` that L1 holds, up to the first it lacks, for `ttl`
    /// (default: the pin timeout), so they stay until [`StorageManager::unpin`] or expiry.
    pub fn pin_prefix(&self, keys: &[ChunkKey], ttl: Option<Duration>) -> Vec<PinToken> {
        let n = self.inner.l1.prefix_len(keys);
        self.inner.l1.pin(&keys[..n], ttl)
    }

    /// Releases pins from [`StorageManager::pin_prefix`].
    pub fn unpin(&self, pins: &[PinToken]) {
        self.inner.l1.unpin(pins);
    }

    /// Counts `chunks` a store dropped because L1 could not make room for them
    /// (`kvtier_store_skipped_total`, reason `no_memory`).
    pub fn count_no_memory(&self, chunks: u64) {
        self.inner
            .metrics
            .store_skipped
            .get_or_create(&Metrics::tier_reason(self.inner.l1.name(), "no_memory"))
            .inc_by(chunks);
    }

    /// Whether L1 caches chunks (false: it is only a staging pool).
    pub fn l1_enabled(&self) -> bool {
        self.inner.l1_enabled
    }

    /// Names of all tiers, L1 first.
    pub fn tier_names(&self) -> Vec<String> {
        std::iter::once(self.inner.l1.name().to_string())
            .chain(self.inner.lower.iter().map(|s| s.name.clone()))
            .collect()
    }

    /// The lower tier at index `i` (1-based: 1 is the tier after L1).
    pub fn tier(&self, i: usize) -> Option<&Arc<dyn Tier>> {
        i.checked_sub(1)
            .and_then(|j| self.inner.lower.get(j))
            .map(|s| &s.tier)
    }

    /// Whether lower tier `i` (1-based) is currently marked down.
    pub fn tier_is_down(&self, i: usize) -> bool {
        i.checked_sub(1)
            .and_then(|j| self.inner.lower.get(j))
            .is_some_and(|s| s.health.is_down())
    }

    /// Tier-specific details of tier `i` (0 = L1).
    pub fn tier_details(&self, i: usize) -> serde_json::Value {
        match i {
            0 => Tier::details(&*self.inner.l1),
            _ => self
                .tier(i)
                .map_or(serde_json::Value::Null, |t| t.details()),
        }
    }

    /// Usage of every tier, L1 first.
    pub fn usage(&self) -> Vec<(String, TierUsage)> {
        std::iter::once((
            self.inner.l1.name().to_string(),
            Tier::usage(&*self.inner.l1),
        ))
        .chain(
            self.inner
                .lower
                .iter()
                .map(|s| (s.name.clone(), s.tier.usage())),
        )
        .collect()
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Runs `fut` on the manager's runtime and waits for it from a synchronous caller.
    pub(crate) fn run_sync<T: Send + 'static>(
        &self,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.inner.handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().map_err(|_| Error::Closed)
    }

    /// Prefix lookup over all tiers (C2).
    pub fn lookup(&self, keys: &[ChunkKey]) -> Result<PrefixLookup> {
        let inner = &self.inner;
        let l1_hits = if inner.l1_enabled {
            inner.l1.prefix_len(keys)
        } else {
            0
        };
        if l1_hits == keys.len() || inner.lower.is_empty() {
            return Ok(PrefixLookup {
                hit_chunks: l1_hits,
                tiers: vec![0; l1_hits],
            });
        }
        let inner = self.inner.clone();
        let keys = keys.to_vec();
        self.run_sync(async move { inner.lookup_lower(&keys).await })
    }

    /// Async form of [`StorageManager::lookup`].
    pub async fn lookup_async(&self, keys: Vec<ChunkKey>) -> Result<PrefixLookup> {
        let inner = self.inner.clone();
        self.inner
            .handle
            .spawn(async move { inner.lookup_lower(&keys).await })
            .await
            .map_err(|_| Error::Closed)
    }

    /// Tells every tier's eviction policy that a request referenced this prompt's chunk keys,
    /// in order (the engine reports each lookup and each store, before new chunks go in).
    pub fn observe_prompt(&self, keys: &[ChunkKey], report: crate::policy::PromptReport) {
        if self.inner.l1_enabled {
            self.inner.l1.observe_prompt(keys, report);
        }
        for s in &self.inner.lower {
            s.tier.observe_prompt(keys, report);
        }
    }

    /// Decides whether a key needs storing, claiming it when it does (dedupe, C5).
    pub fn claim(&self, key: ChunkKey) -> StoreClaim {
        if self.inner.l1_enabled {
            if let Some(c) = self.inner.l1.lookup(&key) {
                return StoreClaim::Present(c);
            }
        } else if self.inner.lower_holds(&key) {
            // Without L1 this is where a re-stored prefix is recognised; otherwise every
            // store of a growing prompt would copy and queue all its earlier chunks again.
            return StoreClaim::Stored;
        }
        let mut storing = self.inner.storing.lock();
        if storing.contains_key(&key) {
            return StoreClaim::InFlight;
        }
        storing.insert(key, ());
        StoreClaim::New(ClaimGuard {
            inner: self.inner.clone(),
            key,
        })
    }

    /// Allocates the pool buffer of the new chunk `key` of a store, like
    /// [`allocate`](Self::allocate); when L1 is the only tier, its policy may also decline a
    /// chunk worth less than everything it would evict (the store stops there). With tiers
    /// below, L1 stages their writes too, so it takes every chunk.
    pub fn allocate_for_store(
        &self,
        key: &ChunkKey,
        len: usize,
    ) -> Option<crate::memory::WritableBuf> {
        if self.inner.l1_enabled && self.inner.lower.is_empty() {
            self.inner.l1.allocate_for(key, len)
        } else {
            self.inner.l1.allocate(len)
        }
    }

    /// Allocates a pool buffer for a new chunk (evicting as needed); `None` when L1 cannot
    /// make room, in which case a store stops there (it never waits for memory).
    pub fn allocate(&self, len: usize) -> Option<WritableBuf> {
        self.inner.l1.allocate(len)
    }

    /// Commits a new chunk: inserts it into L1 (when enabled) and queues writes to every
    /// lower tier. The ticket reports when those writes are done.
    pub fn commit(&self, claim: ClaimGuard, chunk: Chunk) -> StoreTicket {
        let mut ticket = StoreTicket::default();
        if self.inner.l1_enabled {
            let len = chunk.buf.len() as u64;
            if self.inner.l1.insert(chunk.clone()) == PutOutcome::Stored {
                let l = Metrics::tier(self.inner.l1.name());
                self.inner
                    .metrics
                    .stored_bytes
                    .get_or_create(&l)
                    .inc_by(len);
                self.inner.metrics.stored_chunks.get_or_create(&l).inc();
            }
        }
        self.write_through(&chunk, &mut ticket);
        drop(claim);
        ticket
    }

    /// Queues writes of `chunk` to every lower tier that is up and not already writing it.
    pub fn write_through(&self, chunk: &Chunk, ticket: &mut StoreTicket) {
        for i in 0..self.inner.lower.len() {
            if let Some(rx) = self.inner.enqueue_put(i, chunk.clone()) {
                ticket.push(rx);
            }
        }
    }

    /// Waits until no write to a lower tier is queued or running, at most `timeout`.
    /// Returns whether everything finished.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut count = self.inner.pending.count.lock();
        while *count > 0 {
            if self
                .inner
                .pending
                .idle
                .wait_until(&mut count, deadline)
                .timed_out()
            {
                return *count == 0;
            }
        }
        true
    }

    /// Removes a key from every tier; returns how many tiers held it.
    pub fn remove(&self, key: ChunkKey) -> Result<usize> {
        let mut n = usize::from(self.inner.l1.remove_key(&key));
        if !self.inner.lower.is_empty() {
            let inner = self.inner.clone();
            n += self.run_sync(async move {
                let mut n = 0;
                for s in &inner.lower {
                    s.presence.forget(&key);
                    if let Ok(Ok(true)) =
                        tokio::time::timeout(inner.opts.store_deadline, s.tier.remove(key)).await
                    {
                        n += 1;
                    }
                }
                n
            })?;
        }
        Ok(n)
    }

    /// Empties every tier; returns chunks dropped per tier.
    pub fn clear(&self) -> Result<Vec<(String, u64)>> {
        let mut out = vec![(self.inner.l1.name().to_string(), self.inner.l1.clear_all())];
        let inner = self.inner.clone();
        out.extend(self.run_sync(async move {
            let mut v = Vec::new();
            for s in &inner.lower {
                s.presence.forget_all();
                let n = match tokio::time::timeout(inner.opts.store_deadline, s.tier.clear()).await
                {
                    Ok(Ok(n)) => n,
                    _ => 0,
                };
                v.push((s.name.clone(), n));
            }
            v
        })?);
        Ok(out)
    }

    /// Forgets one tenant's chunks in every tier; returns chunks dropped per tier.
    pub fn remove_salt(&self, salt: &str) -> Result<Vec<(String, u64)>> {
        let inner = self.inner.clone();
        let salt = salt.to_string();
        self.run_sync(async move {
            let mut v = Vec::new();
            let n = Tier::remove_salt(&*inner.l1, &salt).await.unwrap_or(0);
            v.push((inner.l1.name().to_string(), n));
            for s in &inner.lower {
                s.presence.forget_all();
                let n = match tokio::time::timeout(
                    inner.opts.store_deadline,
                    s.tier.remove_salt(&salt),
                )
                .await
                {
                    Ok(Ok(n)) => n,
                    _ => 0,
                };
                v.push((s.name.clone(), n));
            }
            v
        })
    }

    /// Updates usage gauges and eviction counters from the tiers (call before rendering).
    pub fn refresh_metrics(&self) {
        let m = &self.inner.metrics;
        for (name, u) in self.usage() {
            let l = Metrics::tier(&name);
            m.used_bytes.get_or_create(&l).set(u.used_bytes);
            m.capacity_bytes.get_or_create(&l).set(u.capacity_bytes);
            m.resident_chunks.get_or_create(&l).set(u.chunks);
        }
        if let Some(c) = self.pool().committed_bytes() {
            m.pool_committed_bytes
                .get_or_create(&Metrics::tier(self.inner.l1.name()))
                .set(c);
        }
        let l1 = Tier::counters(&*self.inner.l1);
        m.observe_tier_counters(self.inner.l1.name(), l1.evictions, l1.checksum_failures);
        for s in &self.inner.lower {
            let c = s.tier.counters();
            m.observe_tier_counters(&s.name, c.evictions, c.checksum_failures);
        }
    }
}

impl Inner {
    /// Walks the tiers for the longest stored prefix of `keys` (C2): tiers are asked in
    /// order, each continuing from the first chunk the ones before it lacked; when a lower
    /// tier makes progress, earlier tiers are asked again from the new position (a chunk in
    /// L1 right after a disk segment still counts), until a full pass adds nothing. A tier
    /// is never asked twice at the same position. Returns the tier index of each chunk and,
    /// when `take_l1` is set, handles on the L1 chunks (which keeps them from eviction).
    pub(crate) async fn plan_prefix(
        &self,
        keys: &[ChunkKey],
        take_l1: bool,
    ) -> (Vec<usize>, Vec<Option<Chunk>>) {
        let mut tiers: Vec<usize> = Vec::with_capacity(keys.len());
        let mut handles: Vec<Option<Chunk>> = Vec::new();
        let mut asked_at = vec![usize::MAX; self.lower.len() + 1];
        loop {
            let start = tiers.len();
            #[allow(clippy::needless_range_loop)] // t also names the tier (0 = L1)
            for t in 0..=self.lower.len() {
                let n = tiers.len();
                if n == keys.len() {
                    break;
                }
                if asked_at[t] == n {
                    continue;
                }
                asked_at[t] = n;
                let m = if t == 0 {
                    if !self.l1_enabled {
                        continue;
                    }
                    if take_l1 {
                        let got = self.l1.lookup_prefix(&keys[n..]);
                        let m = got.len();
                        handles.resize(n, None);
                        handles.extend(got.into_iter().map(Some));
                        m
                    } else {
                        self.l1.prefix_len(&keys[n..])
                    }
                } else {
                    let slot = &self.lower[t - 1];
                    if !slot.health.available() {
                        continue;
                    }
                    let r = tokio::time::timeout(
                        self.opts.read_deadline,
                        slot.tier.contains_prefix(&keys[n..]),
                    )
                    .await;
                    let m = self
                        .settle(slot, "contains", r)
                        .unwrap_or(0)
                        .min(keys.len() - n);
                    // What the probe counted is there. Where it stopped is not, and what
                    // follows is useless until it is back (a prefix ends at a gap): stores
                    // write all of it again rather than trust older knowledge of it.
                    slot.learn(&keys[n..n + m]);
                    for absent in &keys[n + m..] {
                        slot.presence.forget(absent);
                    }
                    m
                };
                tiers.extend(std::iter::repeat_n(t, m));
            }
            if tiers.len() == start || tiers.len() == keys.len() {
                break;
            }
        }
        handles.resize(tiers.len(), None);
        (tiers, handles)
    }

    async fn lookup_lower(&self, keys: &[ChunkKey]) -> PrefixLookup {
        let (tiers, _) = self.plan_prefix(keys, false).await;
        PrefixLookup {
            hit_chunks: tiers.len(),
            tiers,
        }
    }

    /// Records the outcome of a tier call in metrics and health; `Some` on success.
    pub(crate) fn settle<T>(
        &self,
        slot: &Slot,
        op: &'static str,
        r: std::result::Result<Result<T>, tokio::time::error::Elapsed>,
    ) -> Option<T> {
        self.settle_why(slot, op, r).ok()
    }

    /// Like [`Inner::settle`], keeping the reason of a failure.
    pub(crate) fn settle_why<T>(
        &self,
        slot: &Slot,
        op: &'static str,
        r: std::result::Result<Result<T>, tokio::time::error::Elapsed>,
    ) -> std::result::Result<T, String> {
        match r {
            Ok(Ok(v)) => {
                slot.health.success();
                Ok(v)
            }
            Ok(Err(e)) => {
                // A failing server may have restarted empty: nothing it held is known now.
                slot.presence.forget_all();
                tracing::debug!(tier = %slot.name, op, error = %e, "tier operation failed");
                self.metrics
                    .tier_errors
                    .get_or_create(&Metrics::tier_op(&slot.name, op))
                    .inc();
                let why = e.to_string();
                slot.health.failure(false, &why);
                Err(why)
            }
            Err(_) => {
                slot.presence.forget_all();
                self.metrics
                    .tier_timeouts
                    .get_or_create(&Metrics::tier_op(&slot.name, op))
                    .inc();
                let why = format!(
                    "tier `{}`: {op} exceeded its {:?} deadline",
                    slot.name,
                    self.deadline_of(op)
                );
                slot.health.failure(true, &why);
                Err(why)
            }
        }
    }

    fn deadline_of(&self, op: &str) -> Duration {
        if op == "put" {
            self.opts.store_deadline
        } else {
            self.opts.read_deadline
        }
    }

    /// Whether every lower tier that takes writes now is known, without I/O, to hold or be
    /// writing `key` (and there is at least one): then a store has nothing to write.
    fn lower_holds(&self, key: &ChunkKey) -> bool {
        let mut held = false;
        for slot in self.lower.iter().filter(|s| s.health.available()) {
            if !(slot.inflight.lock().contains_key(key) || slot.knows(key)) {
                return false;
            }
            held = true;
        }
        held
    }

    fn skip_store(&self, slot: &Slot, reason: &str) {
        self.metrics
            .store_skipped
            .get_or_create(&Metrics::tier_reason(&slot.name, reason))
            .inc();
    }

    fn enqueue_put(
        self: &Arc<Self>,
        i: usize,
        chunk: Chunk,
    ) -> Option<tokio::sync::oneshot::Receiver<WriteOutcome>> {
        let slot = &self.lower[i];
        if !slot.health.available() {
            self.skip_store(slot, "tier_down");
            return None;
        }
        let key = chunk.info.key;
        let len = chunk.buf.len() as u64;
        {
            let mut inflight = slot.inflight.lock();
            if inflight.contains_key(&key) {
                return None;
            }
            if slot.knows(&key) {
                // Written once already (C5): a growing prompt's earlier chunks stay put.
                self.metrics
                    .writes_deduped
                    .get_or_create(&Metrics::tier(&slot.name))
                    .inc();
                return None;
            }
            let queued = slot.queued_chunks.load(Ordering::Relaxed);
            let bytes = slot.queued_bytes.load(Ordering::Relaxed);
            if queued >= self.opts.write_queue_chunks || bytes + len > self.opts.write_queue_bytes {
                drop(inflight);
                if !slot.saturated.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        tier = %slot.name,
                        queued_chunks = queued,
                        queued_bytes = bytes,
                        "write queue full: stores skip this tier until it drains (counted in kvtier_store_skipped_total, reason queue_full); raise write_queue_chunks or max_local_cpu_size, or use a faster device"
                    );
                }
                self.skip_store(slot, "queue_full");
                return None;
            }
            if slot.saturated.swap(false, Ordering::Relaxed) {
                tracing::info!(tier = %slot.name, "write queue drained: stores reach this tier again");
            }
            inflight.insert(key, ());
            slot.queued_chunks.fetch_add(1, Ordering::Relaxed);
            slot.queued_bytes.fetch_add(len, Ordering::Relaxed);
        }
        *self.pending.count.lock() += 1;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let inner = self.clone();
        self.handle.spawn(async move {
            let slot = &inner.lower[i];
            inner
                .metrics
                .tier_writes
                .get_or_create(&Metrics::tier(&slot.name))
                .inc();
            let r = tokio::time::timeout(inner.opts.store_deadline, slot.tier.put(chunk)).await;
            let result = inner.settle_why(slot, "put", r);
            if matches!(result, Ok(PutOutcome::Stored | PutOutcome::AlreadyPresent)) {
                // Learnt before the key leaves `inflight`: a store never sees neither.
                slot.learn([&key]);
            }
            let result = match result {
                Ok(PutOutcome::Stored) => {
                    let l = Metrics::tier(&slot.name);
                    inner.metrics.stored_bytes.get_or_create(&l).inc_by(len);
                    inner.metrics.stored_chunks.get_or_create(&l).inc();
                    Ok(PutOutcome::Stored)
                }
                Ok(PutOutcome::Skipped(reason)) => {
                    inner.skip_store(slot, reason);
                    Ok(PutOutcome::Skipped(reason))
                }
                other => other,
            };
            slot.inflight.lock().remove(&key);
            slot.queued_chunks.fetch_sub(1, Ordering::Relaxed);
            slot.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            let _ = tx.send(WriteOutcome {
                key,
                tier: i + 1,
                result,
            });
            let mut count = inner.pending.count.lock();
            *count -= 1;
            if *count == 0 {
                inner.pending.idle.notify_all();
            }
        });
        Some(rx)
    }
}

#[cfg(test)]
mod tests;
