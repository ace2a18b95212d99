//! Micro phase: lookup latency of one long prompt, with and without hashing.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use kvtier::keys::{ChunkKey, ModelIdentity};
use kvtier::layout::{Dtype, KvLayout};
use kvtier::policy::PolicyKind;
use kvtier::{Engine, EngineConfig};
use rand::{rngs::StdRng, Rng, SeedableRng};

use super::buffers::{AlignedBuf, MIB};
use super::report::percentile;

/// Tokens per chunk in the micro phase (fixed so results compare across runs).
const CHUNK_TOKENS: usize = 256;
/// Chunks in the prompt: 512 × 256 = 128K tokens.
const CHUNKS: usize = 512;
/// Timed samples per measurement (≥ 200 so p99 is not just the maximum).
const SAMPLES: usize = 400;
/// Untimed calls first, so lazily built state does not land in the samples.
const WARMUP: usize = 20;

/// Latency percentiles of the micro phase, in µs.
#[derive(Clone, Copy, Debug, Default)]
pub struct MicroResults {
    /// `engine.lookup` of the 128K-token prompt, p50.
    pub lookup_p50_us: f64,
    /// Same, p99.
    pub lookup_p99_us: f64,
    /// `manager().lookup` on the 512 precomputed keys, p50.
    pub probe_p50_us: f64,
    /// Same, p99.
    pub probe_p99_us: f64,
}

/// Runs the micro phase on its own engine whose chunks are tiny (8 KiB), so the 512-chunk
/// prompt fits trivially and only index and hashing costs are measured.
pub fn measure(policy: PolicyKind, seed: u64) -> Result<MicroResults> {
    let engine = micro_engine(policy)?;
    let mut rng = StdRng::seed_from_u64(seed ^ 0x004D_4943_524F);
    let tokens: Vec<u32> = (0..CHUNK_TOKENS * CHUNKS)
        .map(|_| rng.random_range(0..128_256))
        .collect();
    let payload = AlignedBuf::new(engine.payload_bytes(tokens.len()));
    let stored = engine
        .store(&tokens, None, &payload)
        .context("micro phase: storing the 128K prompt")?;
    if stored.stored_tokens != tokens.len() {
        bail!(
            "micro phase: only {} of {} tokens were stored",
            stored.stored_tokens,
            tokens.len()
        );
    }
    let lookup = sample_us(|| {
        let r = engine.lookup(&tokens, None)?;
        check_full(r.hit_chunks)
    })?;
    let keys: Vec<ChunkKey> = engine
        .key_space()
        .chunk_spans(&tokens, None)?
        .iter()
        .map(|s| s.key)
        .collect();
    let probe = sample_us(|| {
        let r = engine.manager().lookup(&keys)?;
        check_full(r.hit_chunks)
    })?;
    Ok(MicroResults {
        lookup_p50_us: percentile(&lookup, 50.0),
        lookup_p99_us: percentile(&lookup, 99.0),
        probe_p50_us: percentile(&probe, 50.0),
        probe_p99_us: percentile(&probe, 99.0),
    })
}

fn micro_engine(policy: PolicyKind) -> Result<Engine> {
    let cfg = EngineConfig {
        chunk_size: CHUNK_TOKENS,
        max_local_cpu_size: 64 * MIB as u64,
        cache_policy: policy,
        // 64 MiB is too small for huge pages or prefaulting to matter.
        local_cpu_huge_pages: false,
        local_cpu_prefault: false,
        ..EngineConfig::default()
    };
    let layout = KvLayout::simple(1, 1, 8, Dtype::Bf16);
    Engine::new(cfg, ModelIdentity::new("kvtier-bench-micro", layout))
        .context("building the micro-phase engine")
}

/// A lookup that did not find the whole stored prompt means the engine lost chunks.
fn check_full(hit_chunks: usize) -> Result<()> {
    if hit_chunks != CHUNKS {
        bail!("micro phase: lookup found {hit_chunks} of {CHUNKS} stored chunks");
    }
    Ok(())
}

/// Calls `f` `WARMUP` times untimed, then `SAMPLES` times timed; returns µs per call.
fn sample_us(mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    for _ in 0..WARMUP {
        f()?;
    }
    let mut out = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let t0 = Instant::now();
        f()?;
        out.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    Ok(out)
}
