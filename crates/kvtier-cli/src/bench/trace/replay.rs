//! Replays a trace through the real embedded engine.
//!
//! Each trace block is one chunk of `block_tokens` tokens whose payload is a single page
//! (a 1-layer, 1-head layout of `2 * head_dim = 4096 / block_tokens` bytes per token), so
//! a budget of N blocks is a pool of N pages and a disk budget of N record files: the
//! tiers make the decisions they would make at full size, on bytes that fit here. The
//! tokens of block `b` are `b` followed by `1, 2, ..`, so the engine's chained keys are
//! distinct exactly when the trace's blocks are.
//!
//! Per request, as vLLM's connector does: `lookup`, `retrieve` (the prefix hit, from
//! whichever tiers hold it; lower-tier hits are written back into L1), then `store` of the
//! prompt. With a lower tier, the store goes in slices of at most half the L1 budget (its
//! write queue's limit), the way chunked prefill saves a long prompt, so a prompt longer
//! than the queue still reaches the disk. Without `--speed`, the lower-tier writes finish
//! before the next slice or request, so a run is deterministic; with it, requests start at
//! their timestamp divided by the speed (or as soon as the previous one is done, when
//! behind) and writes queue as in a live server.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kvtier::keys::ModelIdentity;
use kvtier::layout::{Dtype, KvLayout};
use kvtier::{Engine, EngineConfig};

use super::format::{Request, Trace};
use crate::bench::report::percentile;

/// Page size: the payload of one block, and the disk record header.
pub const PAGE: u64 = 4096;

/// Bytes per token of the replay layout for `block_tokens`-token blocks (a page a block).
pub fn layout(block_tokens: usize) -> KvLayout {
    let head_dim = (PAGE as usize / 2 / block_tokens).max(1) as u32;
    KvLayout::simple(1, 1, head_dim, Dtype::U8)
}

/// Pool bytes one block takes in L1.
pub fn l1_bytes_per_block(block_tokens: usize) -> u64 {
    (layout(block_tokens).chunk_bytes(block_tokens) as u64).div_ceil(PAGE) * PAGE
}

/// Disk bytes one block's record file takes (payload pages plus the header page).
pub fn disk_bytes_per_block(block_tokens: usize) -> u64 {
    l1_bytes_per_block(block_tokens) + PAGE
}

/// What one replay measured.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Replay {
    /// Blocks referenced.
    pub references: u64,
    /// Prefix blocks that hit, per tier (L1 first).
    pub hits_per_tier: Vec<u64>,
    /// Tier names (L1 first).
    pub tiers: Vec<String>,
    /// Chunks written per tier (L1: new chunks stored; not counting write-backs).
    pub written_chunks: Vec<u64>,
    /// Payload bytes written per tier.
    pub written_bytes: Vec<u64>,
    /// Chunks promoted from each tier into L1.
    pub write_backs: Vec<u64>,
    /// Lower-tier writes per distinct chunk stored (a chunk evicted from a tier and
    /// stored again is written again: that is the tier's budget, not amplification).
    pub writes_per_unique_chunk: crate::bench::report::WriteAmplification,
    /// Chunk stores a tier skipped, by `tier/reason` (e.g. `disk/not admitted`: its policy
    /// kept what it held; `cpu/no_memory`: L1 declined or could not make room).
    pub store_skipped: BTreeMap<String, u64>,
    /// With `--speed`: how late requests started, milliseconds (p50, p99).
    pub late_ms: Option<(f64, f64)>,
    /// Wall time of the replay.
    pub secs: f64,
}

impl Replay {
    /// Prefix hit rate over all tiers.
    pub fn hit_rate(&self) -> f64 {
        self.tier_rate(None)
    }

    /// Hit rate served by tier `t` (`None`: all).
    pub fn tier_rate(&self, t: Option<usize>) -> f64 {
        let h: u64 = match t {
            Some(t) => self.hits_per_tier.get(t).copied().unwrap_or(0),
            None => self.hits_per_tier.iter().sum(),
        };
        if self.references == 0 {
            0.0
        } else {
            h as f64 / self.references as f64
        }
    }
}

/// Tiers and budgets of one replay.
#[derive(Clone, Debug)]
pub struct Setup {
    /// Engine config (file and environment), adjusted here.
    pub base: EngineConfig,
    /// L1 budget in blocks.
    pub l1_blocks: u64,
    /// Disk budget in blocks and the directory to use (must be empty or absent).
    pub disk: Option<(u64, PathBuf)>,
    /// Honour timestamps at this speed.
    pub speed: Option<f64>,
}

impl Setup {
    /// The engine config of this replay.
    pub fn config(&self, block_tokens: usize) -> Result<EngineConfig> {
        let mut cfg = self.base.clone();
        cfg.chunk_size = block_tokens;
        cfg.local_cpu = true;
        cfg.max_local_cpu_size = self.l1_blocks * l1_bytes_per_block(block_tokens);
        cfg.local_cpu_huge_pages = false;
        cfg.local_cpu_prefault = false;
        match &self.disk {
            Some((blocks, dir)) => {
                cfg.local_disk = vec![dir.clone()];
                cfg.max_local_disk_size = blocks * disk_bytes_per_block(block_tokens);
            }
            None => cfg.local_disk.clear(),
        }
        if self.speed.is_none() {
            // Writes drain after every request: a long prompt must not overflow the
            // queue, or the run would measure the queue instead of the policy.
            cfg.write_queue_chunks = cfg.write_queue_chunks.max(1 << 20);
        }
        cfg.validate().context("the replay's engine config")?;
        Ok(cfg)
    }
}

/// The tokens of a request: block `b` is `b, 1, 2, ..`.
fn tokens(req: &Request, block_tokens: usize, out: &mut Vec<u32>) {
    out.clear();
    for &b in &req.blocks {
        let n = (req.tokens - out.len()).min(block_tokens);
        out.push(b);
        out.extend(1..n as u32);
    }
}

/// Replays `trace` with `setup`.
pub fn replay(trace: &Trace, setup: &Setup) -> Result<Replay> {
    let bt = trace.block_tokens;
    let cfg = setup.config(bt)?;
    let engine = Engine::new(cfg, ModelIdentity::new("trace-replay", layout(bt)))
        .context("building the replay engine")?;
    let bpt = engine.bytes_per_token();
    let max_tokens = trace.requests.iter().map(|r| r.tokens).max().unwrap_or(0);
    let payload = vec![0x5Au8; max_tokens * bpt];
    let mut out = vec![0u8; max_tokens * bpt];
    let tiers = engine.manager().tier_names();
    let mut r = Replay {
        hits_per_tier: vec![0; tiers.len()],
        tiers,
        ..Replay::default()
    };
    let mut late = Vec::new();
    let mut unique = crate::bench::report::UniqueChunks::default();
    let mut toks = Vec::new();
    // Tokens per store call: everything, or half the L1 budget with a lower tier.
    let slice = match &setup.disk {
        Some(_) => (setup.l1_blocks as usize / 2).max(1) * bt,
        None => usize::MAX,
    };
    let t0 = Instant::now();
    for (i, req) in trace.requests.iter().enumerate() {
        if let Some(speed) = setup.speed {
            let due = t0 + Duration::from_secs_f64(req.at_ms as f64 / 1000.0 / speed);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            } else {
                late.push((now - due).as_secs_f64() * 1000.0);
            }
        }
        tokens(req, bt, &mut toks);
        let n = toks.len() * bpt;
        engine
            .lookup(&toks, None)
            .with_context(|| format!("looking up request {}", i + 1))?;
        let got = engine
            .retrieve(&toks, None, &mut out[..n])
            .with_context(|| format!("retrieving request {}", i + 1))?;
        for &t in &got.tiers {
            if let Some(h) = r.hits_per_tier.get_mut(t) {
                *h += 1;
            }
        }
        r.references += req.blocks.len() as u64;
        unique.note(&engine, &toks, None)?;
        let mut end = 0;
        while end < toks.len() {
            end = (end + slice).min(toks.len());
            engine
                .store(&toks[..end], None, &payload[..end * bpt])
                .with_context(|| format!("storing request {}", i + 1))?;
            if setup.speed.is_none() {
                engine.flush(Duration::from_secs(600));
            }
        }
    }
    engine.flush(Duration::from_secs(600));
    r.secs = t0.elapsed().as_secs_f64();
    if setup.speed.is_some() {
        late.resize(trace.requests.len(), 0.0);
        r.late_ms = Some((percentile(&late, 50.0), percentile(&late, 99.0)));
    }
    let stats = engine.stats();
    r.writes_per_unique_chunk =
        crate::bench::report::WriteAmplification::of(&stats, unique.count());
    for t in &stats.tiers {
        r.written_chunks.push(t.stored_chunks);
        r.written_bytes.push(t.stored_bytes);
        r.write_backs.push(t.write_backs);
    }
    r.store_skipped = skipped(&engine.metrics_text());
    Ok(r)
}

/// `kvtier_store_skipped_total` by `tier/reason`, from the metrics text.
fn skipped(metrics: &str) -> BTreeMap<String, u64> {
    let label = |l: &str, name: &str| -> Option<String> {
        let v = l.split(&format!("{name}=\"")).nth(1)?;
        Some(v.split('"').next()?.to_string())
    };
    let mut out = BTreeMap::new();
    for l in metrics
        .lines()
        .filter(|l| l.starts_with("kvtier_store_skipped_total{"))
    {
        let (Some(tier), Some(reason)) = (label(l, "tier"), label(l, "reason")) else {
            continue;
        };
        let n = l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        *out.entry(format!("{tier}/{reason}")).or_insert(0) += n.unwrap_or(0.0) as u64;
    }
    out
}
