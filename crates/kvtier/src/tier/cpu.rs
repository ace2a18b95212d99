//! The CPU tier (L1): chunks held in the memory pool, an index, an eviction policy, pins.
//!
//! It is also the allocator for every other tier: reads from disk or a remote store land in
//! buffers of this pool, so writing them back into L1 is an index insert, not a copy.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures::future::ready;
use parking_lot::Mutex;

use super::{PutOutcome, ResidencyObserver, Tier, TierCounters, TierFuture, TierUsage};
use crate::api::PinToken;
use crate::chunk::Chunk;
use crate::error::Result;
use crate::keys::{ChunkKey, KeyMap};
use crate::memory::{round_up, BufferSource, ChunkBuf, Pool, PoolOptions, PoolStats, WritableBuf};
use crate::policy::{Eviction, EvictionPolicy, PolicyKind, PromptReport};

/// How to build a CPU tier.
#[derive(Clone, Debug)]
pub struct CpuTierOptions {
    /// Tier name (`cpu` for L1).
    pub name: String,
    /// The pool (its size is the tier's byte budget).
    pub pool: PoolOptions,
    /// Eviction policy.
    pub policy: PolicyKind,
    /// Pins older than this expire (abandoned pins never hold memory forever).
    pub pin_timeout: Duration,
}

impl CpuTierOptions {
    /// An anonymous pool of `bytes`, LRU, 300 s pin timeout.
    pub fn with_bytes(bytes: u64) -> CpuTierOptions {
        CpuTierOptions {
            name: "cpu".into(),
            pool: PoolOptions::anonymous(bytes),
            policy: PolicyKind::Lru,
            pin_timeout: Duration::from_secs(300),
        }
    }
}

struct Entry {
    chunk: Chunk,
    pins: Vec<(u64, Instant)>,
}

impl Entry {
    fn live_pins(&self, now: Instant) -> usize {
        self.pins.iter().filter(|p| p.1 > now).count()
    }

    fn evictable(&self, now: Instant) -> bool {
        // Only the index holds the buffer (no reader) and no live pin protects it.
        self.chunk.buf.handle_count() == 1 && self.live_pins(now) == 0
    }
}

struct State {
    index: KeyMap<Entry>,
    policy: Box<dyn EvictionPolicy>,
    bytes: u64,
    next_pin: u64,
}

/// Counters of the CPU tier.
#[derive(Debug, Default)]
struct Counters {
    evictions: AtomicU64,
    evicted_bytes: AtomicU64,
    compactions: AtomicU64,
    alloc_failures: AtomicU64,
}

/// Snapshot of CPU tier counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CpuTierStats {
    /// Chunks resident.
    pub chunks: u64,
    /// Bytes reserved by resident chunks.
    pub bytes: u64,
    /// Pool usage, staging buffers included.
    pub pool_used: u64,
    /// Pool capacity.
    pub pool_capacity: u64,
    /// Shared memory the pool has committed so far (a shared pool's resident pages, whichever
    /// process faulted them in); `None` for an anonymous pool (it is in the process's RSS).
    pub pool_committed: Option<u64>,
    /// Chunks evicted so far.
    pub evictions: u64,
    /// Bytes evicted so far.
    pub evicted_bytes: u64,
    /// Compactions run.
    pub compactions: u64,
    /// Allocations that failed even after eviction.
    pub alloc_failures: u64,
    /// Live pins.
    pub pins: u64,
    /// Resident chunks held by at least one reader.
    pub in_use: u64,
}

/// The L1 tier.
pub struct CpuTier {
    name: String,
    pool: Pool,
    state: Mutex<State>,
    pin_timeout: Duration,
    counters: Counters,
    /// Told of every index change once set (the server's KV events); unset: no work.
    observer: OnceLock<Arc<dyn ResidencyObserver>>,
}

impl std::fmt::Debug for CpuTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuTier")
            .field("name", &self.name)
            .field("pool", &self.pool)
            .finish()
    }
}

impl CpuTier {
    /// Builds the tier and maps its pool.
    pub fn new(opts: CpuTierOptions) -> Result<CpuTier> {
        let pool = Pool::new(&opts.pool)?;
        let policy = opts.policy.build(pool.capacity());
        Ok(CpuTier {
            name: opts.name,
            pool,
            state: Mutex::new(State {
                index: KeyMap::default(),
                policy,
                bytes: 0,
                next_pin: 1,
            }),
            pin_timeout: opts.pin_timeout,
            counters: Counters::default(),
            observer: OnceLock::new(),
        })
    }

    /// Sets the observer told of every key this tier starts or stops holding; only the
    /// first call takes effect (returns whether this one did).
    pub fn set_observer(&self, observer: Arc<dyn ResidencyObserver>) -> bool {
        self.observer.set(observer).is_ok()
    }

    fn report_removed(&self, keys: &[ChunkKey]) {
        if let Some(o) = self.observer.get() {
            if !keys.is_empty() {
                o.removed(keys);
            }
        }
    }

    /// Tier name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Pool usage.
    pub fn pool_stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// Evicts the policy's next victim; for `incoming` (a store), the policy may decline.
    fn evict_one(&self, st: &mut State, incoming: Option<&ChunkKey>) -> Option<u64> {
        let now = Instant::now();
        let State {
            index,
            policy,
            bytes,
            ..
        } = st;
        let mut evictable = |k: &ChunkKey| index.get(k).is_none_or(|e| e.evictable(now));
        let victim = match incoming {
            None => policy.evict(&mut evictable)?,
            Some(key) => match policy.evict_for(key, &mut evictable) {
                Eviction::Victim(v) => v,
                Eviction::Declined | Eviction::Nothing => return None,
            },
        };
        let freed = index.remove(&victim).map_or(0, |e| e.chunk.buf.capacity());
        *bytes -= freed;
        self.report_removed(&[victim]);
        self.counters.evictions.fetch_add(1, Ordering::Relaxed);
        self.counters
            .evicted_bytes
            .fetch_add(freed, Ordering::Relaxed);
        Some(freed)
    }

    fn compact_locked(&self, st: &State) {
        // Resident chunks nobody reads can move; pins protect from eviction, not from moving.
        let movable: Vec<&ChunkBuf> = st
            .index
            .values()
            .filter(|e| e.chunk.buf.handle_count() == 1)
            .map(|e| &e.chunk.buf)
            .collect();
        self.pool.compact(&movable);
        self.counters.compactions.fetch_add(1, Ordering::Relaxed);
    }

    /// Allocates a pool buffer of `len` bytes, evicting (and compacting, when free space is
    /// fragmented) as needed. Never waits: `None` when the bytes are held by readers or pins.
    pub fn allocate(&self, len: usize) -> Option<WritableBuf> {
        self.allocate_inner(len, None)
    }

    /// Like [`CpuTier::allocate`], for the new chunk `key` of a store: also `None` when the
    /// policy declines to evict anything worth more than `key` (counted in
    /// `alloc_failures`).
    pub fn allocate_for(&self, key: &ChunkKey, len: usize) -> Option<WritableBuf> {
        self.allocate_inner(len, Some(key))
    }

    fn allocate_inner(&self, len: usize, incoming: Option<&ChunkKey>) -> Option<WritableBuf> {
        if let Some(b) = self.pool.try_alloc(len) {
            return Some(b);
        }
        let cap = round_up(len as u64);
        if cap > self.pool.capacity() {
            self.counters.alloc_failures.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let mut st = self.state.lock();
        let mut freed_since_compaction = 0u64;
        loop {
            if let Some(b) = self.pool.try_alloc(len) {
                return Some(b);
            }
            let ps = self.pool.stats();
            let free = ps.capacity - ps.used;
            // Enough bytes are free but not contiguous: evict a little more in policy order
            // (cheap), and once that has freed twice the request, compact (moves bytes).
            if free >= cap && freed_since_compaction >= 2 * cap {
                self.compact_locked(&st);
                freed_since_compaction = 0;
                if let Some(b) = self.pool.try_alloc(len) {
                    return Some(b);
                }
            }
            match self.evict_one(&mut st, incoming) {
                Some(freed) => freed_since_compaction += freed.max(1),
                None => {
                    if free >= cap {
                        self.compact_locked(&st);
                        if let Some(b) = self.pool.try_alloc(len) {
                            return Some(b);
                        }
                    }
                    self.counters.alloc_failures.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            }
        }
    }

    /// Inserts a chunk whose buffer belongs to this tier's pool. A key already present keeps
    /// its first copy.
    pub fn insert(&self, chunk: Chunk) -> PutOutcome {
        if !chunk.buf.is_from(&self.pool) {
            return self.copy_in(&chunk);
        }
        let mut st = self.state.lock();
        if st.index.contains_key(&chunk.info.key) {
            return PutOutcome::AlreadyPresent;
        }
        let key = chunk.info.key;
        let cap = chunk.buf.capacity();
        st.policy.insert(key, cap);
        st.bytes += cap;
        if let Some(o) = self.observer.get() {
            o.stored(&chunk.info);
        }
        st.index.insert(
            key,
            Entry {
                chunk,
                pins: Vec::new(),
            },
        );
        PutOutcome::Stored
    }

    fn copy_in(&self, chunk: &Chunk) -> PutOutcome {
        if self.contains(&chunk.info.key) {
            return PutOutcome::AlreadyPresent;
        }
        let Some(mut buf) = self.allocate(chunk.buf.len()) else {
            return PutOutcome::Skipped("cpu tier full");
        };
        buf.as_mut_slice().copy_from_slice(chunk.payload());
        self.insert(Chunk {
            info: chunk.info.clone(),
            buf: buf.seal(),
        })
    }

    /// Whether `key` is resident.
    pub fn contains(&self, key: &ChunkKey) -> bool {
        self.state.lock().index.contains_key(key)
    }

    /// Leading keys resident.
    pub fn prefix_len(&self, keys: &[ChunkKey]) -> usize {
        let st = self.state.lock();
        keys.iter().take_while(|k| st.index.contains_key(k)).count()
    }

    /// A reader's handle on a resident chunk (does not change recency: see [`CpuTier::touch_reverse`]).
    pub fn lookup(&self, key: &ChunkKey) -> Option<Chunk> {
        self.state.lock().index.get(key).map(|e| e.chunk.clone())
    }

    /// Handles on the leading resident chunks of `keys`.
    pub fn lookup_prefix(&self, keys: &[ChunkKey]) -> Vec<Chunk> {
        let st = self.state.lock();
        keys.iter()
            .map_while(|k| st.index.get(k).map(|e| e.chunk.clone()))
            .collect()
    }

    /// Marks `keys` used, last key first, so a prompt's head ends up most recent and its tail
    /// is evicted first (a tail without its head is useless, C6).
    pub fn touch_reverse(&self, keys: &[ChunkKey]) {
        let mut st = self.state.lock();
        for k in keys.iter().rev() {
            st.policy.touch(k);
        }
    }

    /// Tells the eviction policy a request referenced this prompt's keys, in order.
    pub fn observe_prompt(&self, keys: &[ChunkKey], report: PromptReport) {
        self.state.lock().policy.observe_prompt(keys, report);
    }

    /// Pins the resident keys among `keys` for `ttl` (default: the tier's pin timeout).
    pub fn pin(&self, keys: &[ChunkKey], ttl: Option<Duration>) -> Vec<PinToken> {
        let expiry = Instant::now() + ttl.unwrap_or(self.pin_timeout);
        let mut st = self.state.lock();
        let mut out = Vec::new();
        for k in keys {
            let id = st.next_pin;
            if let Some(e) = st.index.get_mut(k) {
                e.pins.push((id, expiry));
                out.push(PinToken { key: *k, id });
                st.next_pin += 1;
            }
        }
        out
    }

    /// Releases pins; unknown or expired tokens are ignored.
    pub fn unpin(&self, tokens: &[PinToken]) {
        let mut st = self.state.lock();
        for t in tokens {
            if let Some(e) = st.index.get_mut(&t.key) {
                e.pins.retain(|p| p.0 != t.id);
            }
        }
    }

    /// Removes a key. Readers holding it keep their bytes until they drop them.
    pub fn remove_key(&self, key: &ChunkKey) -> bool {
        let mut st = self.state.lock();
        match st.index.remove(key) {
            Some(e) => {
                st.bytes -= e.chunk.buf.capacity();
                st.policy.remove(key);
                self.report_removed(&[*key]);
                true
            }
            None => false,
        }
    }

    fn remove_where(&self, mut pred: impl FnMut(&Entry) -> bool) -> u64 {
        let mut st = self.state.lock();
        let keys: Vec<ChunkKey> = st
            .index
            .iter()
            .filter(|(_, e)| pred(e))
            .map(|(k, _)| *k)
            .collect();
        for k in &keys {
            if let Some(e) = st.index.remove(k) {
                st.bytes -= e.chunk.buf.capacity();
                st.policy.remove(k);
            }
        }
        self.report_removed(&keys);
        keys.len() as u64
    }

    /// Removes everything.
    pub fn clear_all(&self) -> u64 {
        self.remove_where(|_| true)
    }

    /// Counter and occupancy snapshot; also drops expired pins.
    pub fn stats(&self) -> CpuTierStats {
        let now = Instant::now();
        let mut st = self.state.lock();
        let mut pins = 0u64;
        let mut in_use = 0u64;
        for e in st.index.values_mut() {
            e.pins.retain(|p| p.1 > now);
            pins += e.pins.len() as u64;
            in_use += u64::from(e.chunk.buf.handle_count() > 1);
        }
        let ps = self.pool.stats();
        CpuTierStats {
            chunks: st.index.len() as u64,
            bytes: st.bytes,
            pool_used: ps.used,
            pool_capacity: ps.capacity,
            pool_committed: self.pool.committed_bytes(),
            evictions: self.counters.evictions.load(Ordering::Relaxed),
            evicted_bytes: self.counters.evicted_bytes.load(Ordering::Relaxed),
            compactions: self.counters.compactions.load(Ordering::Relaxed),
            alloc_failures: self.counters.alloc_failures.load(Ordering::Relaxed),
            pins,
            in_use,
        }
    }
}

impl BufferSource for CpuTier {
    fn allocate(&self, len: usize) -> Option<WritableBuf> {
        CpuTier::allocate(self, len)
    }
}

impl Tier for CpuTier {
    fn name(&self) -> &str {
        CpuTier::name(self)
    }

    fn verifies_reads(&self) -> bool {
        // Bytes never leave process memory; they were checksummed when created.
        true
    }

    fn contains_prefix<'a>(&'a self, keys: &'a [ChunkKey]) -> TierFuture<'a, usize> {
        Box::pin(ready(Ok(self.prefix_len(keys))))
    }

    fn get<'a>(
        &'a self,
        key: ChunkKey,
        _bufs: &'a dyn BufferSource,
    ) -> TierFuture<'a, Option<Chunk>> {
        Box::pin(ready(Ok(self.lookup(&key))))
    }

    fn put(&self, chunk: Chunk) -> TierFuture<'_, PutOutcome> {
        Box::pin(ready(Ok(self.insert(chunk))))
    }

    fn remove(&self, key: ChunkKey) -> TierFuture<'_, bool> {
        Box::pin(ready(Ok(self.remove_key(&key))))
    }

    fn clear(&self) -> TierFuture<'_, u64> {
        Box::pin(ready(Ok(self.clear_all())))
    }

    fn remove_salt<'a>(&'a self, salt: &'a str) -> TierFuture<'a, u64> {
        Box::pin(ready(Ok(self.remove_where(|e| {
            e.chunk.info.origin.cache_salt.as_deref() == Some(salt)
        }))))
    }

    fn counters(&self) -> TierCounters {
        TierCounters {
            evictions: self.counters.evictions.load(Ordering::Relaxed),
            checksum_failures: 0,
        }
    }

    fn details(&self) -> serde_json::Value {
        serde_json::to_value(self.stats()).unwrap_or_default()
    }

    fn usage(&self) -> TierUsage {
        let st = self.state.lock();
        TierUsage {
            used_bytes: st.bytes,
            capacity_bytes: self.pool.capacity(),
            chunks: st.index.len() as u64,
        }
    }
}

#[cfg(test)]
mod tests;
