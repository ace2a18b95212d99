//! The embedded engine: the user-facing API over tokens and KV bytes.
//!
//! A prompt's KV payload is passed as the concatenation of its chunk payloads: chunk `i`
//! (tokens `start..end`) occupies bytes `start * B .. end * B`, where `B` is
//! [`KvLayout::bytes_per_token`](crate::chunk::KvLayout::bytes_per_token); inside a chunk the
//! payload is layer-major.
//!
//! ```
//! use kvtier::{Engine, EngineConfig};
//! use kvtier::chunk::{Dtype, KvLayout};
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
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::chunk::{copy_payload, copy_with_checksum, now_ms, Chunk, ChunkInfo};
use crate::config::EngineConfig;
use crate::error::{Error, Result};
use crate::keys::{ChunkKey, ChunkSpan, KeySpace, ModelIdentity, Origin};
use crate::manager::{
    ManagerOptions, PrefetchHandle, PrefixLookup, StorageManager, StoreClaim, StoreTicket, TierSpec,
};
use crate::memory::{PoolBacking, PoolOptions};
use crate::metrics::Metrics;
use crate::tier::{CpuTier, CpuTierOptions, CpuTierStats, DiskTier, TierUsage};

/// Answer to a prefix lookup, in tokens.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LookupResult {
    /// Leading tokens retrievable.
    pub hit_tokens: usize,
    /// Chunks in that prefix.
    pub hit_chunks: usize,
    /// Tier index of each hit chunk (0 = L1).
    pub tiers: Vec<usize>,
}

/// What a store did.
#[derive(Default)]
pub struct StoreReport {
    /// Leading tokens now held by L1 or on their way to it: the prefix the store got to (C5).
    pub stored_tokens: usize,
    /// Chunks newly written.
    pub new_chunks: usize,
    /// Chunks already present (skipped).
    pub present_chunks: usize,
    /// Chunks another store is writing right now (skipped).
    pub inflight_chunks: usize,
    /// Chunks not stored because L1 had no room for them (the store stopped there).
    pub dropped_chunks: usize,
    /// Payload bytes copied into the engine by this store.
    pub new_bytes: u64,
    /// Lower-tier writes started by this store; wait on it for durability.
    pub ticket: StoreTicket,
}

impl std::fmt::Debug for StoreReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreReport")
            .field("stored_tokens", &self.stored_tokens)
            .field("new_chunks", &self.new_chunks)
            .field("present_chunks", &self.present_chunks)
            .field("inflight_chunks", &self.inflight_chunks)
            .field("dropped_chunks", &self.dropped_chunks)
            .field("new_bytes", &self.new_bytes)
            .field("queued_writes", &self.ticket.len())
            .finish()
    }
}

/// What a retrieve loaded.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RetrieveReport {
    /// Leading tokens copied into the output.
    pub hit_tokens: usize,
    /// Tier index each chunk came from.
    pub tiers: Vec<usize>,
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
    /// Chunks promoted from this tier into L1.
    pub write_backs: u64,
    /// Checksum mismatches caught.
    pub checksum_failures: u64,
    /// Errors.
    pub errors: u64,
    /// Deadline expiries.
    pub timeouts: u64,
    /// Whether the tier is marked down.
    pub down: bool,
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

/// The embedded engine.
pub struct Engine {
    config: EngineConfig,
    keys: KeySpace,
    manager: StorageManager,
    metrics: Arc<Metrics>,
    origins: Mutex<HashMap<Option<String>, Arc<Origin>>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.config)
            .field("manager", &self.manager)
            .finish()
    }
}

impl Engine {
    /// Builds an engine from config for one model identity.
    pub fn new(config: EngineConfig, identity: ModelIdentity) -> Result<Engine> {
        if !config.remote_url.is_empty() {
            return Err(Error::config(
                "remote_url",
                "remote tiers are not available in this build yet; remove remote_url",
            ));
        }
        config.validate()?;
        let mut lower = Vec::new();
        if let Some(disk) = DiskTier::from_config(&config, identity.rank)? {
            lower.push(TierSpec::new(Arc::new(disk)));
        }
        Engine::with_lower_tiers(config, identity, lower)
    }

    /// Builds an engine with explicit tiers below L1 (tests, custom tiers).
    pub fn with_lower_tiers(
        config: EngineConfig,
        identity: ModelIdentity,
        lower: Vec<TierSpec>,
    ) -> Result<Engine> {
        config.validate()?;
        let keys = KeySpace::new(identity, config.chunk_size, config.save_unfull_chunk)?;
        let full_chunk = keys.identity().layout.chunk_bytes(config.chunk_size) as u64;
        if full_chunk > config.max_local_cpu_size {
            return Err(Error::config(
                "max_local_cpu_size",
                format!(
                    "{} bytes cannot hold one chunk of {} tokens ({full_chunk} bytes for this model); raise it",
                    config.max_local_cpu_size, config.chunk_size
                ),
            ));
        }
        let l1 = Arc::new(CpuTier::new(CpuTierOptions {
            name: "cpu".into(),
            pool: PoolOptions {
                bytes: config.max_local_cpu_size,
                backing: PoolBacking::Anonymous,
                huge_pages: config.local_cpu_huge_pages,
                prefault: config.local_cpu_prefault,
            },
            policy: config.cache_policy,
            pin_timeout: Duration::from_secs_f64(config.pin_timeout_sec),
        })?);
        let metrics = Arc::new(Metrics::new());
        let opts = ManagerOptions {
            read_deadline: Duration::from_millis(config.read_deadline_ms),
            store_deadline: Duration::from_millis(config.store_deadline_ms),
            write_queue_chunks: config.write_queue_chunks,
            // Queued writes hold pool memory; never let them take more than half of it.
            write_queue_bytes: config.max_local_cpu_size / 2,
            prefetch_concurrency: config.prefetch_concurrency,
            ..ManagerOptions::default()
        };
        let manager = StorageManager::new(l1, config.local_cpu, lower, opts, metrics.clone())?;
        Ok(Engine {
            config,
            keys,
            manager,
            metrics,
            origins: Mutex::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The key space (model identity and chunking).
    pub fn key_space(&self) -> &KeySpace {
        &self.keys
    }

    /// The storage manager (key-level operations).
    pub fn manager(&self) -> &StorageManager {
        &self.manager
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
        let t0 = Instant::now();
        let spans = self.keys.chunk_spans(tokens, cache_salt)?;
        let keys: Vec<ChunkKey> = spans.iter().map(|s| s.key).collect();
        let r = self.manager.lookup(&keys)?;
        let res = self.lookup_result(&spans, r);
        self.metrics.lookups.inc();
        self.metrics.requested_tokens.inc_by(tokens.len() as u64);
        self.metrics.hit_tokens.inc_by(res.hit_tokens as u64);
        self.metrics
            .lookup_seconds
            .observe(t0.elapsed().as_secs_f64());
        Ok(res)
    }

    fn lookup_result(&self, spans: &[ChunkSpan], r: PrefixLookup) -> LookupResult {
        LookupResult {
            hit_tokens: if r.hit_chunks == 0 {
                0
            } else {
                spans[r.hit_chunks - 1].end
            },
            hit_chunks: r.hit_chunks,
            tiers: r.tiers,
        }
    }

    /// Pins the L1-resident chunks of the prompt's stored prefix for `ttl` (default: the pin
    /// timeout), so they stay until [`Engine::unpin`] or expiry.
    pub fn pin(
        &self,
        tokens: &[u32],
        cache_salt: Option<&str>,
        ttl: Option<Duration>,
    ) -> Result<Vec<crate::tier::PinToken>> {
        let keys: Vec<ChunkKey> = self
            .keys
            .chunk_spans(tokens, cache_salt)?
            .iter()
            .map(|s| s.key)
            .collect();
        let n = self.manager.l1().prefix_len(&keys);
        Ok(self.manager.l1().pin(&keys[..n], ttl))
    }

    /// Releases pins from [`Engine::pin`].
    pub fn unpin(&self, pins: &[crate::tier::PinToken]) {
        self.manager.l1().unpin(pins);
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
        let t0 = Instant::now();
        let spans = self.keys.chunk_spans(tokens, cache_salt)?;
        let bpt = self.bytes_per_token();
        let covered = spans.last().map_or(0, |s| s.end);
        if payload.len() != covered * bpt && payload.len() != tokens.len() * bpt {
            return Err(Error::invalid(format!(
                "KV payload is {} bytes; {} tokens of this model need {} bytes ({} bytes per token; {} if only the {covered} chunked tokens are passed)",
                payload.len(),
                tokens.len(),
                tokens.len() * bpt,
                bpt,
                covered * bpt
            )));
        }
        let origin = self.origin(cache_salt)?;
        let mut report = StoreReport::default();
        for (i, span) in spans.iter().enumerate() {
            let bytes = &payload[span.start * bpt..span.end * bpt];
            match self.manager.claim(span.key) {
                // Present in L1: skipped (C5). Its lower-tier writes were queued when it was
                // first stored, or it came from a lower tier; re-sending every hot chunk to
                // every tier on each store would multiply remote traffic.
                StoreClaim::Present(_) => report.present_chunks += 1,
                StoreClaim::InFlight => report.inflight_chunks += 1,
                StoreClaim::New(claim) => {
                    let Some(mut buf) = self.manager.allocate(bytes.len()) else {
                        report.dropped_chunks = spans.len() - i;
                        self.metrics
                            .store_skipped
                            .get_or_create(&Metrics::tier_reason(
                                self.manager.l1().name(),
                                "no_memory",
                            ))
                            .inc_by(report.dropped_chunks as u64);
                        break;
                    };
                    let checksum = copy_with_checksum(buf.as_mut_slice(), bytes);
                    let chunk = Chunk {
                        info: ChunkInfo {
                            key: span.key,
                            num_tokens: span.len() as u32,
                            len: bytes.len() as u64,
                            checksum,
                            origin: origin.clone(),
                            created_ms: now_ms(),
                        },
                        buf: buf.seal(),
                    };
                    report.ticket.merge(self.manager.commit(claim, chunk));
                    report.new_chunks += 1;
                    report.new_bytes += bytes.len() as u64;
                }
            }
            report.stored_tokens = span.end;
        }
        let dt = t0.elapsed().as_secs_f64();
        self.metrics.store_seconds.observe(dt);
        if report.new_bytes > 0 && dt > 0.0 {
            self.metrics
                .store_gbps
                .observe(report.new_bytes as f64 / dt / 1e9);
        }
        Ok(report)
    }

    /// Starts loading the prompt's stored prefix from wherever it is (non-blocking).
    pub fn prefetch(&self, tokens: &[u32], cache_salt: Option<&str>) -> Result<PrefetchHandle> {
        let keys = self
            .keys
            .chunk_spans(tokens, cache_salt)?
            .iter()
            .map(|s| s.key)
            .collect();
        Ok(self.manager.prefetch(keys))
    }

    /// Loads the prompt's stored prefix and copies it into `out` (laid out like `store`'s
    /// payload). Returns the tokens copied: always a contiguous prefix (C4).
    pub fn retrieve(
        &self,
        tokens: &[u32],
        cache_salt: Option<&str>,
        out: &mut [u8],
    ) -> Result<RetrieveReport> {
        let t0 = Instant::now();
        let spans = self.keys.chunk_spans(tokens, cache_salt)?;
        let bpt = self.bytes_per_token();
        let covered = spans.last().map_or(0, |s| s.end);
        if out.len() < covered * bpt {
            return Err(Error::invalid(format!(
                "output buffer is {} bytes; the {covered} chunked tokens need {}",
                out.len(),
                covered * bpt
            )));
        }
        let keys = spans.iter().map(|s| s.key).collect();
        let loaded = self.manager.prefetch(keys).wait()?;
        let mut bytes = 0u64;
        for (span, chunk) in spans.iter().zip(&loaded.chunks) {
            let dst = &mut out[span.start * bpt..span.end * bpt];
            if chunk.payload().len() != dst.len() {
                return Err(Error::Corrupt(format!(
                    "chunk {} holds {} bytes, expected {}",
                    span.key,
                    chunk.payload().len(),
                    dst.len()
                )));
            }
            copy_payload(dst, chunk.payload());
            bytes += dst.len() as u64;
        }
        let n = loaded.chunks.len();
        let dt = t0.elapsed().as_secs_f64();
        self.metrics.retrieve_seconds.observe(dt);
        if bytes > 0 && dt > 0.0 {
            self.metrics.retrieve_gbps.observe(bytes as f64 / dt / 1e9);
        }
        Ok(RetrieveReport {
            hit_tokens: if n == 0 { 0 } else { spans[n - 1].end },
            tiers: loaded.tiers,
        })
    }

    /// Waits until queued lower-tier writes are done, at most `timeout`.
    pub fn flush(&self, timeout: Duration) -> bool {
        self.manager.flush(timeout)
    }

    /// Empties every tier.
    pub fn clear(&self) -> Result<Vec<(String, u64)>> {
        self.manager.clear()
    }

    /// Forgets every chunk of one tenant, in every tier.
    pub fn remove_salt(&self, salt: &str) -> Result<Vec<(String, u64)>> {
        self.manager.remove_salt(salt)
    }

    /// Prometheus text exposition of every metric.
    pub fn metrics_text(&self) -> String {
        self.manager.refresh_metrics();
        self.metrics.render()
    }

    /// Snapshot of engine and tier numbers.
    pub fn stats(&self) -> EngineStats {
        self.manager.refresh_metrics();
        let m = &self.metrics;
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
                    write_backs: m.write_backs.get_or_create(&l).get(),
                    checksum_failures: m.checksum_failures.get_or_create(&l).get(),
                    errors: sum_ops(&m.tier_errors, &name),
                    timeouts: sum_ops(&m.tier_timeouts, &name),
                    down: self.manager.tier_is_down(i),
                    name,
                    usage,
                }
            })
            .collect();
        EngineStats {
            lookups: m.lookups.get(),
            requested_tokens: m.requested_tokens.get(),
            hit_tokens: m.hit_tokens.get(),
            l1: self.manager.l1().stats(),
            tiers,
        }
    }
}
