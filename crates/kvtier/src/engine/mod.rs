//! The embedded engine: the user-facing API over tokens and KV bytes.
//!
//! A prompt's KV payload is passed as the concatenation of its chunk payloads: chunk `i`
//! (tokens `start..end`) occupies bytes `start * B .. end * B`, where `B` is
//! [`KvLayout::bytes_per_token`](crate::layout::KvLayout::bytes_per_token); inside a chunk the
//! payload is layer-major.
//!
//! Every operation over a prompt also has a *windowed* form (`lookup_from`, `store_from`,
//! `retrieve_from`, `begin_store_from`, `acquire_from`, `lookup_keys_from`) that addresses
//! only chunks `first_chunk..` of it; the whole-prompt operation is its `first_chunk` 0 case.
//! Payload layout and result semantics: [`crate::api`].
//!
//! ```
//! use kvtier::{Engine, EngineConfig};
//! use kvtier::layout::{Dtype, KvLayout};
//! use kvtier::keys::ModelIdentity;
//!
//! let mut cfg = EngineConfig::default();
//! cfg.chunk_size = 16;
//! cfg.max_local_cpu_size = 8 << 20;
//! let engine = Engine::new(cfg, ModelIdentity::new("tiny", KvLayout::simple(2, 2, 8, Dtype::F16))).unwrap();
//! let tokens: Vec<u32> = (0..40).collect();
//! let kv = vec![7u8; engine.payload_bytes(tokens.len())];
//! let stored = engine.store(&tokens, None, &kv).unwrap();
//! assert_eq!(stored.stored_tokens, 32); // two full chunks; the 8-token tail is not stored
//! assert_eq!(engine.lookup(&tokens, None).unwrap().hit_tokens, 32);
//! let mut out = vec![0u8; kv.len()];
//! assert_eq!(engine.retrieve(&tokens, None, &mut out).unwrap().hit_tokens, 32);
//! assert_eq!(&out[..32 * engine.bytes_per_token()], &kv[..32 * engine.bytes_per_token()]);
//! // Chunk 1 on only (a window starting at token 16): its bytes start at out_w[0].
//! let bpt = engine.bytes_per_token();
//! assert_eq!(engine.lookup_from(&tokens, None, 1).unwrap().hit_chunks, 1);
//! let mut out_w = vec![0u8; (40 - 16) * bpt];
//! assert_eq!(engine.retrieve_from(&tokens, None, 1, &mut out_w).unwrap().hit_tokens, 32);
//! assert_eq!(&out_w[..16 * bpt], &kv[16 * bpt..32 * bpt]);
//! ```

mod assembly;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::api::{LookupResult, PinToken, RetrieveReport};
use crate::chunk::{copy_with_checksum, now_ms, Chunk, ChunkInfo};
use crate::config::EngineConfig;
use crate::error::{Error, Result};
use crate::keys::{ChunkKey, ChunkSpan, KeySpace, ModelIdentity, Origin};
use crate::manager::{
    ClaimGuard, PrefetchHandle, StorageManager, StoreClaim, StoreTicket, TierSpec,
};
use crate::memory::{PoolBacking, WritableBuf};
use crate::metrics::Metrics;
use crate::policy::PromptReport;
use crate::tier::{CpuTier, CpuTierStats, TierUsage};

/// What a store did: the counts (a [`StoreSummary`](crate::api::StoreSummary), readable
/// directly through `Deref`, e.g. `report.stored_tokens`) plus the ticket of the lower-tier
/// writes it queued.
#[derive(Default)]
pub struct StoreReport {
    /// The counts.
    pub summary: crate::api::StoreSummary,
    /// Lower-tier writes started by this store; wait on it for durability.
    pub ticket: StoreTicket,
}

impl std::ops::Deref for StoreReport {
    type Target = crate::api::StoreSummary;
    fn deref(&self) -> &Self::Target {
        &self.summary
    }
}

impl std::ops::DerefMut for StoreReport {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.summary
    }
}

impl std::fmt::Debug for StoreReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreReport")
            .field("summary", &self.summary)
            .field("queued_writes", &self.ticket.len())
            .finish()
    }
}

impl StoreReport {
    /// The counts without the ticket, for crossing process boundaries.
    pub fn summary(&self) -> crate::api::StoreSummary {
        self.summary.clone()
    }
}

/// One chunk of a [`StoreSession`]: its span and the pool buffer to fill.
pub struct StoreSlot {
    /// Token range and key.
    pub span: ChunkSpan,
    /// The buffer to fill with the chunk's payload (its offset is valid in every process
    /// mapping the pool).
    pub buf: WritableBuf,
    /// Checksum, when the writer computed it while filling; else computed at commit.
    pub checksum: Option<u64>,
    claim: ClaimGuard,
}

/// A store in progress (see [`Engine::begin_store`] and [`Engine::begin_store_from`]).
pub struct StoreSession {
    origin: Arc<Origin>,
    /// Buffers to fill, in prompt order.
    pub slots: Vec<StoreSlot>,
    /// Where the run of chunks covered once the slots are committed ends (absolute token;
    /// for a whole-prompt store the leading tokens covered, for a windowed one the window
    /// start when none is).
    pub stored_tokens: usize,
    /// Chunks already present.
    pub present_chunks: usize,
    /// Chunks being stored by another call.
    pub inflight_chunks: usize,
    /// Chunks with no room in L1.
    pub dropped_chunks: usize,
}

/// A loaded, held prefix (see [`Engine::acquire`]), or run of chunks of a window (see
/// [`Engine::acquire_from`]).
pub struct Acquired {
    /// Where the held run ends (absolute token): the tokens of the contiguous prefix, or for
    /// a windowed acquire the window start when nothing is held.
    pub hit_tokens: usize,
    /// Span of each held chunk.
    pub spans: Vec<ChunkSpan>,
    /// The held chunks, in prompt order.
    pub chunks: Vec<Chunk>,
    /// Tier each chunk came from.
    pub tiers: Vec<usize>,
}

/// The chunks a windowed operation addresses (see [`crate::api`]).
struct Window {
    /// First token of the window: where its payload's byte 0 lies in the prompt.
    start: usize,
    /// Spans of chunks `first_chunk..` (absolute token ranges).
    spans: Vec<ChunkSpan>,
}

/// Per-tier numbers in [`EngineStats`].
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct TierStats {
    /// Tier name.
    pub name: String,
    /// Occupancy.
    pub usage: TierUsage,
    /// Chunks served by reads.
    pub hits: u64,
    /// Bytes read.
    pub loaded_bytes: u64,
    /// Bytes written.
    pub stored_bytes: u64,
    /// Chunks written.
    pub stored_chunks: u64,
    /// Chunk writes issued to this tier (lower tiers; a write may find the chunk there).
    pub writes: u64,
    /// Chunk writes not issued: the tier was known to hold the chunk already.
    pub writes_deduped: u64,
    /// Chunks promoted from this tier into L1.
    pub write_backs: u64,
    /// Checksum mismatches caught.
    pub checksum_failures: u64,
    /// Errors.
    pub errors: u64,
    /// Deadline expiries.
    pub timeouts: u64,
    /// Chunks evicted.
    pub evictions: u64,
    /// Whether the tier is marked down.
    pub down: bool,
    /// Tier-specific details (e.g. the disk tier's direct-I/O state and recovery numbers).
    pub details: serde_json::Value,
}

/// Engine-wide numbers.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct EngineStats {
    /// Lookups made.
    pub lookups: u64,
    /// Tokens asked for by lookups.
    pub requested_tokens: u64,
    /// Tokens found by lookups.
    pub hit_tokens: u64,
    /// L1 details.
    pub l1: CpuTierStats,
    /// Every tier, L1 first.
    pub tiers: Vec<TierStats>,
}

/// What every model served by one process (or one server) shares: configuration, the tiers
/// with their pool, and the metrics. Build it once; attach one [`Engine`] per model identity.
pub struct EngineCore {
    config: EngineConfig,
    manager: StorageManager,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for EngineCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineCore")
            .field("config", &self.config)
            .field("manager", &self.manager)
            .finish()
    }
}

impl EngineCore {
    /// Builds L1 (backed by `backing`) and the lower tiers the config names (disk, remote).
    /// `rank` picks the disk path under `by_rank` sharding.
    pub fn open(config: EngineConfig, rank: u32, backing: PoolBacking) -> Result<Arc<EngineCore>> {
        config.validate()?;
        let lower = assembly::lower_tiers(&config, rank)?;
        EngineCore::with_lower_tiers(config, backing, lower)
    }

    /// Builds L1 and uses the given lower tiers (tests, custom tiers).
    pub fn with_lower_tiers(
        config: EngineConfig,
        backing: PoolBacking,
        lower: Vec<TierSpec>,
    ) -> Result<Arc<EngineCore>> {
        config.validate()?;
        let l1 = Arc::new(CpuTier::new(assembly::l1_options(&config, backing))?);
        let metrics = Arc::new(Metrics::new());
        let opts = assembly::manager_options(&config);
        let manager = StorageManager::new(l1, config.local_cpu, lower, opts, metrics.clone())?;
        Ok(Arc::new(EngineCore {
            config,
            manager,
            metrics,
        }))
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The storage manager.
    pub fn manager(&self) -> &StorageManager {
        &self.manager
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }
}

/// The engine for one model identity: the API over tokens and KV bytes. Several engines
/// (models, ranks) can share one [`EngineCore`].
pub struct Engine {
    core: Arc<EngineCore>,
    keys: KeySpace,
    origins: Mutex<HashMap<Option<String>, Arc<Origin>>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.keys.identity().model_name)
            .field("core", &self.core)
            .finish()
    }
}

impl Engine {
    /// Builds an engine from config for one model identity (private anonymous pool).
    pub fn new(config: EngineConfig, identity: ModelIdentity) -> Result<Engine> {
        let core = EngineCore::open(config, identity.rank, PoolBacking::Anonymous)?;
        Engine::attach(core, identity)
    }

    /// Builds an engine with explicit tiers below L1 (tests, custom tiers).
    pub fn with_lower_tiers(
        config: EngineConfig,
        identity: ModelIdentity,
        lower: Vec<TierSpec>,
    ) -> Result<Engine> {
        let core = EngineCore::with_lower_tiers(config, PoolBacking::Anonymous, lower)?;
        Engine::attach(core, identity)
    }

    /// An engine for `identity` over an existing core (shared tiers and pool).
    pub fn attach(core: Arc<EngineCore>, identity: ModelIdentity) -> Result<Engine> {
        let config = &core.config;
        let keys = KeySpace::new(identity, config.chunk_size, config.save_unfull_chunk)?;
        let full_chunk = keys.identity().layout.chunk_bytes(config.chunk_size) as u64;
        if full_chunk > core.manager.pool().capacity() {
            return Err(Error::config(
                "max_local_cpu_size",
                format!(
                    "{} bytes cannot hold one chunk of {} tokens ({full_chunk} bytes for this model); raise it",
                    config.max_local_cpu_size, config.chunk_size
                ),
            ));
        }
        let on_disk = crate::tier::DiskTier::file_bytes(full_chunk);
        if !config.local_disk.is_empty() && on_disk > config.max_local_disk_size {
            return Err(Error::config(
                "max_local_disk_size",
                format!(
                    "{} bytes per disk path cannot hold one chunk of {} tokens ({on_disk} bytes on disk for this model): no chunk would ever be stored on disk; raise it",
                    config.max_local_disk_size, config.chunk_size
                ),
            ));
        }
        Ok(Engine {
            core,
            keys,
            origins: Mutex::default(),
        })
    }

    /// Another model (or rank) sharing this engine's tiers and pool.
    pub fn for_model(&self, identity: ModelIdentity) -> Result<Engine> {
        Engine::attach(self.core.clone(), identity)
    }

    /// The shared core.
    pub fn core(&self) -> &Arc<EngineCore> {
        &self.core
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.core.config
    }

    /// The key space (model identity and chunking).
    pub fn key_space(&self) -> &KeySpace {
        &self.keys
    }

    /// The storage manager (key-level operations).
    pub fn manager(&self) -> &StorageManager {
        &self.core.manager
    }

    /// KV bytes per token for this model.
    pub fn bytes_per_token(&self) -> usize {
        self.keys.identity().layout.bytes_per_token()
    }

    /// Payload bytes of a prompt of `n_tokens` tokens (all tokens, stored or not).
    pub fn payload_bytes(&self, n_tokens: usize) -> usize {
        n_tokens * self.bytes_per_token()
    }

    /// Chunk keys of a prompt.
    pub fn chunk_spans(&self, tokens: &[u32], cache_salt: Option<&str>) -> Result<Vec<ChunkSpan>> {
        self.keys.chunk_spans(tokens, cache_salt)
    }

    fn origin(&self, salt: Option<&str>) -> Result<Arc<Origin>> {
        let key = crate::keys::normalize_salt(salt)?.map(str::to_string);
        let mut map = self.origins.lock();
        if let Some(o) = map.get(&key) {
            return Ok(o.clone());
        }
        let o = Arc::new(self.keys.origin(key.as_deref())?);
        map.insert(key, o.clone());
        Ok(o)
    }

    /// How many leading tokens of the prompt are stored, over all tiers (C2).
    pub fn lookup(&self, tokens: &[u32], cache_salt: Option<&str>) -> Result<LookupResult> {
        self.lookup_from(tokens, cache_salt, 0)
    }

    /// How many contiguous chunks starting at chunk `first_chunk` of the prompt are stored,
    /// over all tiers. `hit_chunks` counts from `first_chunk`; `hit_tokens` is the absolute
    /// token where that run ends (the window start when it is empty; see [`crate::api`]).
    pub fn lookup_from(
        &self,
        tokens: &[u32],
        cache_salt: Option<&str>,
        first_chunk: usize,
    ) -> Result<LookupResult> {
        let t0 = Instant::now();
        let window = self.window(tokens, cache_salt, first_chunk)?;
        let keys: Vec<ChunkKey> = window.spans.iter().map(|s| s.key).collect();
        self.lookup_window(t0, &keys, tokens.len(), window.start)
    }

    /// [`Engine::lookup`] over chunk keys the caller derived itself (a server's clients hash
    /// their prompts locally and send only the keys). `keys` must be the chunk keys of a
    /// prompt of `n_tokens` tokens: their count is checked against that. Records the same
    /// metrics as [`Engine::lookup`].
    pub fn lookup_keys(&self, keys: &[ChunkKey], n_tokens: usize) -> Result<LookupResult> {
        self.lookup_keys_from(keys, n_tokens, 0)
    }

    /// [`Engine::lookup_from`] over chunk keys the caller derived itself: `keys` must be the
    /// keys of chunks `first_chunk..` of a prompt of `n_tokens` tokens (their count is
    /// checked against that).
    pub fn lookup_keys_from(
        &self,
        keys: &[ChunkKey],
        n_tokens: usize,
        first_chunk: usize,
    ) -> Result<LookupResult> {
        let t0 = Instant::now();
        let start = self.keys.window_start(n_tokens, first_chunk)?;
        let chunks = self.keys.num_chunks(n_tokens);
        if keys.len() != chunks - first_chunk {
            let from = if first_chunk == 0 {
                String::new()
            } else {
                format!(" from chunk {first_chunk} on")
            };
            return Err(Error::invalid(format!(
                "{} keys sent for a {n_tokens}-token prompt of {chunks} chunks{from}",
                keys.len()
            )));
        }
        self.lookup_window(t0, keys, n_tokens, start)
    }

    /// The lookup every entry shares: the manager's answer in tokens, and the metrics.
    /// `keys` are the keys of the chunks from the one starting at token `start` on.
    fn lookup_window(
        &self,
        t0: Instant,
        keys: &[ChunkKey],
        n_tokens: usize,
        start: usize,
    ) -> Result<LookupResult> {
        self.core.manager.observe_prompt(keys, PromptReport::Lookup);
        let r = self.core.manager.lookup(keys)?;
        // The window's chunks start on chunk boundaries and run to the prompt's end: a run
        // of h chunks ends h chunks later, or at the prompt's last token.
        // Saturating: `n_tokens` may come from a client (near `usize::MAX`).
        let hit_tokens = start
            .saturating_add(r.hit_chunks.saturating_mul(self.keys.chunk_size()))
            .min(n_tokens);
        let m = &self.core.metrics;
        m.lookups.inc();
        // Tokens addressed and found: a window counts only its own tokens.
        m.requested_tokens.inc_by((n_tokens - start) as u64);
        m.hit_tokens.inc_by((hit_tokens - start) as u64);
        m.lookup_seconds.observe(t0.elapsed().as_secs_f64());
        Ok(LookupResult {
            hit_tokens,
            hit_chunks: r.hit_chunks,
            tiers: r.tiers,
        })
    }

    /// The chunks of a windowed operation: chunk `first_chunk` of the prompt and every later
    /// one. The range is checked before any hashing.
    fn window(
        &self,
        tokens: &[u32],
        cache_salt: Option<&str>,
        first_chunk: usize,
    ) -> Result<Window> {
        let (start, spans) = self.keys.window_spans(tokens, cache_salt, first_chunk)?;
        Ok(Window { start, spans })
    }

    /// Pins the L1-resident chunks of the prompt's stored prefix for `ttl` (default: the pin
    /// timeout), so they stay until [`Engine::unpin`] or expiry.
    pub fn pin(
        &self,
        tokens: &[u32],
        cache_salt: Option<&str>,
        ttl: Option<Duration>,
    ) -> Result<Vec<PinToken>> {
        let keys: Vec<ChunkKey> = self
            .keys
            .chunk_spans(tokens, cache_salt)?
            .iter()
            .map(|s| s.key)
            .collect();
        Ok(self.core.manager.pin_prefix(&keys, ttl))
    }

    /// Releases pins from [`Engine::pin`].
    pub fn unpin(&self, pins: &[PinToken]) {
        self.core.manager.unpin(pins);
    }

    /// Stores a prompt's KV: every full chunk (and the tail with `save_unfull_chunk`).
    /// `payload` holds the prompt's chunk payloads back to back and must cover at least
    /// the chunked tokens. Never waits for memory: when L1 cannot make room it stops and
    /// reports how far it got.
    pub fn store(
        &self,
        tokens: &[u32],
        cache_salt: Option<&str>,
        payload: &[u8],
    ) -> Result<StoreReport> {
        self.store_from(tokens, cache_salt, 0, payload)
    }

    /// Stores chunks `first_chunk..` of a prompt's KV, with [`Engine::store`]'s claims,
    /// dedupe and no-memory rules. `payload` starts at chunk `first_chunk`'s first token
    /// (chunk `first_chunk`'s payload at offset 0) and covers at least the chunked tokens
    /// from there. `stored_tokens` is the absolute token where the stored run ends (the
    /// window start when nothing from it is stored; see [`crate::api`]).
    pub fn store_from(
        &self,
        tokens: &[u32],
        cache_salt: Option<&str>,
        first_chunk: usize,
        payload: &[u8],
    ) -> Result<StoreReport> {
        let t0 = Instant::now();
        let bpt = self.bytes_per_token();
        self.keys
            .check_window_payload_len(tokens.len(), first_chunk, bpt, payload.len())?;
        let base = self.keys.window_start(tokens.len(), first_chunk)?;
        let mut session = self.begin_store_from(tokens, cache_salt, first_chunk)?;
        for slot in &mut session.slots {
            let src = &payload[(slot.span.start - base) * bpt..(slot.span.end - base) * bpt];
            slot.checksum = Some(copy_with_checksum(slot.buf.as_mut_slice(), src));
        }
        let report = self.commit_store(session);
        let dt = t0.elapsed().as_secs_f64();
        self.core.metrics.store_seconds.observe(dt);
        if report.new_bytes > 0 && dt > 0.0 {
            self.core
                .metrics
                .store_gbps
                .observe(report.new_bytes as f64 / dt / 1e9);
        }
        Ok(report)
    }

    /// First half of a store for writers that fill pool buffers in place (a shared-memory
    /// client): claims every chunk not yet stored and allocates its buffer. Chunks present
    /// or in flight elsewhere are skipped; allocation stops at the first chunk L1 cannot
    /// make room for. Dropping the session releases claims and buffers.
    pub fn begin_store(&self, tokens: &[u32], cache_salt: Option<&str>) -> Result<StoreSession> {
        self.begin_store_from(tokens, cache_salt, 0)
    }

    /// [`Engine::begin_store`] over chunks `first_chunk..` of the prompt. The slots' spans
    /// are absolute token ranges, as always.
    pub fn begin_store_from(
        &self,
        tokens: &[u32],
        cache_salt: Option<&str>,
        first_chunk: usize,
    ) -> Result<StoreSession> {
        let Window { start, spans } = self.window(tokens, cache_salt, first_chunk)?;
        let bpt = self.bytes_per_token();
        let mut session = StoreSession {
            origin: self.origin(cache_salt)?,
            slots: Vec::new(),
            stored_tokens: start,
            present_chunks: 0,
            inflight_chunks: 0,
            dropped_chunks: 0,
        };
        let keys: Vec<ChunkKey> = spans.iter().map(|s| s.key).collect();
        self.core.manager.observe_prompt(&keys, PromptReport::Store);
        for (i, span) in spans.iter().enumerate() {
            match self.core.manager.claim(span.key) {
                // Present in L1: skipped (C5). Its lower-tier writes were queued when it was
                // first stored, or it came from a lower tier; re-sending every hot chunk to
                // every tier on each store would multiply remote traffic.
                StoreClaim::Present(_) | StoreClaim::Stored => session.present_chunks += 1,
                StoreClaim::InFlight => session.inflight_chunks += 1,
                StoreClaim::New(claim) => {
                    let Some(buf) = self
                        .core
                        .manager
                        .allocate_for_store(&span.key, span.len() * bpt)
                    else {
                        session.dropped_chunks = spans.len() - i;
                        self.core
                            .manager
                            .count_no_memory(session.dropped_chunks as u64);
                        break;
                    };
                    session.slots.push(StoreSlot {
                        span: *span,
                        buf,
                        claim,
                        checksum: None,
                    });
                }
            }
            session.stored_tokens = span.end;
        }
        Ok(session)
    }

    /// Second half of a store: seals the session's buffers (checksumming those the writer did
    /// not), inserts them into L1 and queues the lower-tier writes.
    pub fn commit_store(&self, session: StoreSession) -> StoreReport {
        let mut report = StoreReport {
            summary: crate::api::StoreSummary {
                stored_tokens: session.stored_tokens,
                present_chunks: session.present_chunks,
                inflight_chunks: session.inflight_chunks,
                dropped_chunks: session.dropped_chunks,
                ..Default::default()
            },
            ticket: StoreTicket::default(),
        };
        for slot in session.slots {
            let len = slot.buf.len() as u64;
            let checksum = slot
                .checksum
                .unwrap_or_else(|| crate::chunk::checksum(slot.buf.as_slice()));
            let chunk = Chunk {
                info: ChunkInfo {
                    key: slot.span.key,
                    num_tokens: slot.span.len() as u32,
                    len,
                    checksum,
                    origin: session.origin.clone(),
                    created_ms: now_ms(),
                },
                buf: slot.buf.seal(),
            };
            report
                .ticket
                .merge(self.core.manager.commit(slot.claim, chunk));
            report.new_chunks += 1;
            report.new_bytes += len;
        }
        report
    }

    /// Loads the prompt's stored prefix and holds it: the returned chunks stay valid (and
    /// unevictable) until the [`Acquired`] value drops. For readers that copy out of the
    /// pool themselves (shared-memory clients).
    pub fn acquire(&self, tokens: &[u32], cache_salt: Option<&str>) -> Result<Acquired> {
        self.acquire_from(tokens, cache_salt, 0)
    }

    /// [`Engine::acquire`] of the contiguous run of stored chunks starting at chunk
    /// `first_chunk`. Spans stay absolute; `hit_tokens` is where the run ends (the window
    /// start when nothing is held).
    pub fn acquire_from(
        &self,
        tokens: &[u32],
        cache_salt: Option<&str>,
        first_chunk: usize,
    ) -> Result<Acquired> {
        let Window { start, mut spans } = self.window(tokens, cache_salt, first_chunk)?;
        let keys = spans.iter().map(|s| s.key).collect();
        let loaded = self.core.manager.prefetch(keys).wait()?;
        spans.truncate(loaded.chunks.len());
        Ok(Acquired {
            hit_tokens: spans.last().map_or(start, |s| s.end),
            spans,
            chunks: loaded.chunks,
            tiers: loaded.tiers,
        })
    }

    /// Starts loading the prompt's stored prefix from wherever it is (non-blocking).
    pub fn prefetch(&self, tokens: &[u32], cache_salt: Option<&str>) -> Result<PrefetchHandle> {
        let keys = self
            .keys
            .chunk_spans(tokens, cache_salt)?
            .iter()
            .map(|s| s.key)
            .collect();
        Ok(self.core.manager.prefetch(keys))
    }

    /// Loads the prompt's stored prefix and copies it into `out` (laid out like `store`'s
    /// payload). Returns the tokens copied: always a contiguous prefix (C4).
    pub fn retrieve(
        &self,
        tokens: &[u32],
        cache_salt: Option<&str>,
        out: &mut [u8],
    ) -> Result<RetrieveReport> {
        self.retrieve_from(tokens, cache_salt, 0, out)
    }

    /// Loads the contiguous run of stored chunks starting at chunk `first_chunk` and copies
    /// it into `out`, laid out like [`Engine::store_from`]'s payload (chunk `first_chunk` at
    /// offset 0); `out` must hold the chunked tokens from there. The run stops at the first
    /// chunk missing or corrupt (C4). `hit_tokens` is the absolute token where the copied
    /// run ends (the window start when nothing was copied; see [`crate::api`]).
    pub fn retrieve_from(
        &self,
        tokens: &[u32],
        cache_salt: Option<&str>,
        first_chunk: usize,
        out: &mut [u8],
    ) -> Result<RetrieveReport> {
        let t0 = Instant::now();
        let Window { start, spans } = self.window(tokens, cache_salt, first_chunk)?;
        let bpt = self.bytes_per_token();
        let covered = spans.last().map_or(start, |s| s.end);
        if out.len() < (covered - start) * bpt {
            let from = if first_chunk == 0 {
                String::new()
            } else {
                format!(" from chunk {first_chunk} (token {start}) on")
            };
            return Err(Error::invalid(format!(
                "output buffer is {} bytes; the {} chunked tokens{from} need {}",
                out.len(),
                covered - start,
                (covered - start) * bpt
            )));
        }
        let keys: Vec<ChunkKey> = spans.iter().map(|s| s.key).collect();
        let (mut bytes, mut n) = (0u64, 0usize);
        let chunk_len_error = |key: ChunkKey, have: usize, want: usize| {
            Error::Corrupt(format!("chunk {key} holds {have} bytes, expected {want}"))
        };
        let tiers = if let Some(chunks) = self.core.manager.l1_read(&keys) {
            // Served by L1 alone: copied on this thread (L1 bytes were checked when they
            // were created), no hand-off to the runtime.
            for (span, chunk) in spans.iter().zip(&chunks) {
                let dst = &mut out[(span.start - start) * bpt..(span.end - start) * bpt];
                if chunk.payload().len() != dst.len() {
                    return Err(chunk_len_error(span.key, chunk.payload().len(), dst.len()));
                }
                crate::chunk::copy_payload(dst, chunk.payload());
                bytes += dst.len() as u64;
                n += 1;
            }
            vec![0; n]
        } else {
            // Copy each chunk out as soon as it arrives, while later chunks still load; the
            // copy is also where a disk read's checksum is checked (one pass over the bytes).
            let (handle, arriving) = self.core.manager.prefetch_streaming(keys);
            for (span, chunk) in spans.iter().zip(arriving.iter()) {
                let dst = &mut out[(span.start - start) * bpt..(span.end - start) * bpt];
                if chunk.len() != dst.len() {
                    return Err(chunk_len_error(span.key, chunk.len(), dst.len()));
                }
                if !chunk.copy_to(dst)? {
                    // Corrupt: a miss from here on (C4); the prefetch cuts the prefix there.
                    break;
                }
                bytes += dst.len() as u64;
                n += 1;
            }
            // Chunks still queued are dropped unread, so the prefetch need not wait for them.
            drop(arriving);
            let mut tiers = handle.wait()?.tiers;
            tiers.truncate(n);
            tiers
        };
        let dt = t0.elapsed().as_secs_f64();
        self.core.metrics.retrieve_seconds.observe(dt);
        if bytes > 0 && dt > 0.0 {
            self.core
                .metrics
                .retrieve_gbps
                .observe(bytes as f64 / dt / 1e9);
        }
        Ok(RetrieveReport {
            hit_tokens: if n == 0 { start } else { spans[n - 1].end },
            tiers,
        })
    }

    /// Waits until queued lower-tier writes are done, at most `timeout`.
    pub fn flush(&self, timeout: Duration) -> bool {
        self.core.manager.flush(timeout)
    }

    /// Removes the prompt's chunks from every tier; returns how many chunks were held
    /// somewhere. Readers holding them keep their bytes until they drop them.
    pub fn remove(&self, tokens: &[u32], cache_salt: Option<&str>) -> Result<u64> {
        let mut n = 0;
        for span in self.keys.chunk_spans(tokens, cache_salt)? {
            n += u64::from(self.core.manager.remove(span.key)? > 0);
        }
        Ok(n)
    }

    /// Empties every tier.
    pub fn clear(&self) -> Result<Vec<(String, u64)>> {
        self.core.manager.clear()
    }

    /// Forgets every chunk of one tenant, in every tier.
    pub fn remove_salt(&self, salt: &str) -> Result<Vec<(String, u64)>> {
        self.core.manager.remove_salt(salt)
    }

    /// Prometheus text exposition of every metric.
    pub fn metrics_text(&self) -> String {
        self.core.manager.refresh_metrics();
        self.core.metrics.render()
    }

    /// Snapshot of engine and tier numbers.
    pub fn stats(&self) -> EngineStats {
        self.core.manager.refresh_metrics();
        let m = &self.core.metrics;
        let sum_ops = |fam: &prometheus_client::metrics::family::Family<
            crate::metrics::TierOpLabel,
            prometheus_client::metrics::counter::Counter,
        >,
                       tier: &str| {
            ["contains", "get", "put"]
                .iter()
                .map(|op| fam.get_or_create(&Metrics::tier_op(tier, op)).get())
                .sum::<u64>()
        };
        let tiers = self
            .core
            .manager
            .usage()
            .into_iter()
            .enumerate()
            .map(|(i, (name, usage))| {
                let l = Metrics::tier(&name);
                TierStats {
                    hits: m.tier_hits.get_or_create(&l).get(),
                    loaded_bytes: m.loaded_bytes.get_or_create(&l).get(),
                    stored_bytes: m.stored_bytes.get_or_create(&l).get(),
                    stored_chunks: m.stored_chunks.get_or_create(&l).get(),
                    writes: m.tier_writes.get_or_create(&l).get(),
                    writes_deduped: m.writes_deduped.get_or_create(&l).get(),
                    write_backs: m.write_backs.get_or_create(&l).get(),
                    checksum_failures: m.checksum_failures.get_or_create(&l).get(),
                    errors: sum_ops(&m.tier_errors, &name),
                    timeouts: sum_ops(&m.tier_timeouts, &name),
                    evictions: m.evictions.get_or_create(&l).get(),
                    down: self.core.manager.tier_is_down(i),
                    details: self.core.manager.tier_details(i),
                    name,
                    usage,
                }
            })
            .collect();
        EngineStats {
            lookups: m.lookups.get(),
            requested_tokens: m.requested_tokens.get(),
            hit_tokens: m.hit_tokens.get(),
            l1: self.core.manager.l1_stats(),
            tiers,
        }
    }
}

struct EmbeddedLoad(PrefetchHandle);

impl crate::api::PendingLoad for EmbeddedLoad {
    fn wait(self: Box<Self>, timeout: Option<Duration>) -> Result<usize> {
        let r = match timeout {
            Some(t) => self.0.wait_timeout(t)?,
            None => self.0.wait()?,
        };
        Ok(r.tokens())
    }
}

impl crate::api::KvCache for Engine {
    fn chunk_size(&self) -> usize {
        self.keys.chunk_size()
    }

    fn bytes_per_token(&self) -> usize {
        Engine::bytes_per_token(self)
    }

    fn lookup_from(
        &self,
        tokens: &[u32],
        cache_salt: Option<&str>,
        first_chunk: usize,
    ) -> Result<LookupResult> {
        Engine::lookup_from(self, tokens, cache_salt, first_chunk)
    }

    fn store_from(
        &self,
        tokens: &[u32],
        cache_salt: Option<&str>,
        first_chunk: usize,
        payload: &[u8],
    ) -> Result<crate::api::StoreSummary> {
        Ok(Engine::store_from(self, tokens, cache_salt, first_chunk, payload)?.summary())
    }

    fn retrieve_from(
        &self,
        tokens: &[u32],
        cache_salt: Option<&str>,
        first_chunk: usize,
        out: &mut [u8],
    ) -> Result<RetrieveReport> {
        Engine::retrieve_from(self, tokens, cache_salt, first_chunk, out)
    }

    fn prefetch(
        &self,
        tokens: &[u32],
        cache_salt: Option<&str>,
    ) -> Result<Box<dyn crate::api::PendingLoad>> {
        Ok(Box::new(EmbeddedLoad(Engine::prefetch(
            self, tokens, cache_salt,
        )?)))
    }

    fn pin(
        &self,
        tokens: &[u32],
        cache_salt: Option<&str>,
        ttl: Option<Duration>,
    ) -> Result<Vec<PinToken>> {
        Engine::pin(self, tokens, cache_salt, ttl)
    }

    fn unpin(&self, pins: &[PinToken]) -> Result<()> {
        Engine::unpin(self, pins);
        Ok(())
    }

    fn remove(&self, tokens: &[u32], cache_salt: Option<&str>) -> Result<u64> {
        Engine::remove(self, tokens, cache_salt)
    }

    fn remove_salt(&self, salt: &str) -> Result<u64> {
        Ok(Engine::remove_salt(self, salt)?.iter().map(|x| x.1).sum())
    }

    fn clear(&self) -> Result<u64> {
        Ok(Engine::clear(self)?.iter().map(|x| x.1).sum())
    }

    fn flush(&self, timeout: Duration) -> Result<bool> {
        Ok(Engine::flush(self, timeout))
    }

    fn stats_json(&self) -> Result<serde_json::Value> {
        serde_json::to_value(self.stats())
            .map_err(|e| Error::invalid(format!("stats are not JSON: {e}")))
    }
}
