//! `kvtier bench l1`: L1 store and retrieve of one chunk per call, swept over chunk sizes,
//! each against single-thread `memcpy` of the same chunks in the same round.
//!
//! This is the per-chunk path a serving connector drives (one store or load per chunk, as
//! LMCache's `LocalCPUBackend` does), where a fixed per-call cost shows at small chunks and
//! memory behaviour at large ones. Each round runs the memcpy pass and the engine passes in
//! alternating order; the report gives min / median / max over rounds of the per-round
//! ratios, so a disturbed round moves the spread, not the median.

use std::time::Instant;

use anyhow::{ensure, Context, Result};
use kvtier::keys::ModelIdentity;
use kvtier::layout::{Dtype, KvLayout};
use kvtier::{Engine, KvCache};
use serde::Serialize;
use tracing::info;

use super::buffers::{AlignedBuf, SourceRing, MIB};
use super::report::{gbps, Spread};
use super::{engine_config, BenchArgs};

/// Chunk sizes swept when `--chunk-mib` is not given: a 1B-class model's chunk up to
/// Llama-3-70B's (80 layers × 8 KV heads × 128 × bf16 × 256 tokens).
pub const DEFAULT_CHUNK_MIB: [usize; 5] = [1, 4, 16, 32, 80];

/// Bytes moved per pass: enough that neither side runs from cache (L3 is 32 MiB here),
/// small enough that a 1 GiB pool holds a round without eviction.
const PASS_BYTES: usize = 512 * MIB;

/// One chunk size's figures.
#[derive(Clone, Debug, Serialize)]
pub struct SizePoint {
    /// Chunk payload in MiB.
    pub chunk_mib: usize,
    /// Chunks stored and retrieved per round.
    pub chunks_per_round: usize,
    /// memcpy GB/s per round.
    pub memcpy_gbps: Vec<f64>,
    /// Store GB/s per round (one `store` call per chunk).
    pub store_gbps: Vec<f64>,
    /// Retrieve GB/s per round (one `retrieve` call per chunk).
    pub retrieve_gbps: Vec<f64>,
    /// Per-round store / memcpy.
    pub store_vs_memcpy: Spread,
    /// Per-round retrieve / memcpy.
    pub retrieve_vs_memcpy: Spread,
    /// The same with the portable copy-and-checksum (no AVX2 fused path), measured in the
    /// same rounds: store / memcpy.
    pub portable_store_vs_memcpy: Spread,
    /// Portable path: retrieve / memcpy.
    pub portable_retrieve_vs_memcpy: Spread,
}

/// The report of `kvtier bench l1`.
#[derive(Debug, Serialize)]
struct L1Report {
    workload: &'static str,
    l1_bytes: u64,
    rounds: usize,
    points: Vec<SizePoint>,
    wall_secs: f64,
}

/// The layout whose 256-token bf16 chunk is `mib` MiB: `mib` layers of 8 KV heads × 128.
fn layout_of(mib: usize) -> Result<KvLayout> {
    let layers = u32::try_from(mib).context("chunk size")?;
    Ok(KvLayout::simple(layers, 8, 128, Dtype::Bf16))
}

/// Runs the sweep.
pub fn run(args: &BenchArgs) -> Result<()> {
    let t0 = Instant::now();
    let sizes = if args.chunk_mib.is_empty() {
        DEFAULT_CHUNK_MIB.to_vec()
    } else {
        args.chunk_mib.clone()
    };
    ensure!(
        sizes.iter().all(|&m| (1..=1024).contains(&m)),
        "--chunk-mib takes sizes from 1 to 1024"
    );
    let rounds = args.reps.max(1);
    let mut bench_args = args.clone();
    // 256-token chunks: the shapes below are sized for it.
    bench_args.chunk_size = Some(256);
    if bench_args.l1_gb.is_none() {
        bench_args.l1_gb = Some(1.0);
    }
    let cfg = engine_config(&bench_args)?;
    let mut points = Vec::new();
    for &mib in &sizes {
        let layout = layout_of(mib)?;
        let chunk = layout.chunk_bytes(256);
        ensure!(
            2 * chunk as u64 <= cfg.max_local_cpu_size,
            "{mib} MiB chunks need an L1 of at least two chunks; raise --l1-gb"
        );
        // Half the pool per round, so a round never evicts.
        let n = (PASS_BYTES.min(cfg.max_local_cpu_size as usize / 2) / chunk).max(2);
        let engine = Engine::new(
            cfg.clone(),
            ModelIdentity::new(format!("kvtier-bench-l1-{mib}mib"), layout),
        )
        .context("building the L1 bench engine")?;
        let ring = SourceRing::new(chunk, args.seed ^ mib as u64);
        // memcpy destination and retrieve output rotate over the same span (≥ one pass).
        let mut dst = AlignedBuf::new(n * chunk);
        let mut p = SizePoint {
            chunk_mib: mib,
            chunks_per_round: n,
            memcpy_gbps: Vec::new(),
            store_gbps: Vec::new(),
            retrieve_gbps: Vec::new(),
            store_vs_memcpy: Spread::default(),
            retrieve_vs_memcpy: Spread::default(),
            portable_store_vs_memcpy: Spread::default(),
            portable_retrieve_vs_memcpy: Spread::default(),
        };
        let (mut ps, mut pr) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let tokens: Vec<Vec<u32>> = (0..n)
                .map(|i| chunk_tokens(args.seed, mib, round, i))
                .collect();
            let memcpy = |dst: &mut AlignedBuf| {
                let t = Instant::now();
                for (i, d) in dst.chunks_exact_mut(chunk).enumerate() {
                    d.copy_from_slice(ring.slot(i));
                }
                std::hint::black_box(&dst[..]);
                gbps((n * chunk) as u64, t.elapsed().as_secs_f64())
            };
            // Three passes per round (memcpy, engine, engine with the portable checksum
            // path), their order rotated each round so none always follows another.
            let (mut mc, mut s, mut r, mut s2, mut r2) = (0.0, 0.0, 0.0, 0.0, 0.0);
            for pass in 0..3 {
                match (pass + round) % 3 {
                    0 => mc = memcpy(&mut dst),
                    1 => (s, r) = engine_passes(&engine, &tokens, &ring, &mut dst, chunk)?,
                    _ => {
                        kvtier::chunk::set_fused_checksum(false);
                        let out = engine_passes(&engine, &tokens, &ring, &mut dst, chunk);
                        kvtier::chunk::set_fused_checksum(true);
                        (s2, r2) = out?;
                    }
                }
            }
            p.memcpy_gbps.push(mc);
            p.store_gbps.push(s);
            p.retrieve_gbps.push(r);
            ps.push(s2);
            pr.push(r2);
        }
        let ratio = |v: &[f64]| -> Vec<f64> {
            v.iter()
                .zip(&p.memcpy_gbps)
                .map(|(a, m)| if *m > 0.0 { a / m } else { 0.0 })
                .collect()
        };
        p.store_vs_memcpy = Spread::of(&ratio(&p.store_gbps));
        p.retrieve_vs_memcpy = Spread::of(&ratio(&p.retrieve_gbps));
        p.portable_store_vs_memcpy = Spread::of(&ratio(&ps));
        p.portable_retrieve_vs_memcpy = Spread::of(&ratio(&pr));
        info!(
            chunk_mib = mib,
            store_vs_memcpy = %p.store_vs_memcpy,
            retrieve_vs_memcpy = %p.retrieve_vs_memcpy,
            portable_store_vs_memcpy = %p.portable_store_vs_memcpy,
            "l1 size done"
        );
        points.push(p);
    }
    let report = L1Report {
        workload: "l1",
        l1_bytes: cfg.max_local_cpu_size,
        rounds,
        points,
        wall_secs: t0.elapsed().as_secs_f64(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "ratios to same-run memcpy, min / median / max of {rounds} rounds (portable: no AVX2 fused checksum)"
        );
        println!(
            "{:>9} {:>7} {:>20} {:>20} {:>20} {:>20}",
            "chunk MiB", "chunks", "store", "retrieve", "portable store", "portable retrieve"
        );
        for p in &report.points {
            println!(
                "{:>9} {:>7} {:>20} {:>20} {:>20} {:>20}",
                p.chunk_mib,
                p.chunks_per_round,
                p.store_vs_memcpy.to_string(),
                p.retrieve_vs_memcpy.to_string(),
                p.portable_store_vs_memcpy.to_string(),
                p.portable_retrieve_vs_memcpy.to_string()
            );
        }
    }
    Ok(())
}

/// Stores chunk `i` of the ring under `tokens[i]`, one call per chunk, then retrieves each
/// into `out`; returns (store, retrieve) GB/s of the timed calls. Retrieved bytes are
/// compared with the source after the clock stops.
fn engine_passes(
    engine: &Engine,
    tokens: &[Vec<u32>],
    ring: &SourceRing,
    out: &mut AlignedBuf,
    chunk: usize,
) -> Result<(f64, f64)> {
    let mut st = 0f64;
    for (i, t) in tokens.iter().enumerate() {
        let t0 = Instant::now();
        let s = KvCache::store(engine, t, None, ring.slot(i))?;
        st += t0.elapsed().as_secs_f64();
        ensure!(
            s.new_bytes == chunk as u64,
            "L1 stored {} of a {chunk}-byte chunk (was the pool too small?)",
            s.new_bytes
        );
    }
    let mut rt = 0f64;
    for (i, (t, o)) in tokens.iter().zip(out.chunks_exact_mut(chunk)).enumerate() {
        let t0 = Instant::now();
        let r = engine.retrieve(t, None, o)?;
        rt += t0.elapsed().as_secs_f64();
        ensure!(r.hit_tokens == t.len(), "retrieve missed a stored chunk");
        ensure!(
            o == ring.slot(i),
            "retrieved bytes differ from the stored ones"
        );
    }
    engine.clear().context("clearing L1 after a pass")?;
    let bytes = (tokens.len() * chunk) as u64;
    Ok((gbps(bytes, st), gbps(bytes, rt)))
}

/// Tokens of chunk `i` in `round`: distinct for every (size, round, chunk).
fn chunk_tokens(seed: u64, mib: usize, round: usize, i: usize) -> Vec<u32> {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let mut rng =
        StdRng::seed_from_u64(seed ^ ((mib as u64) << 40) ^ ((round as u64) << 24) ^ i as u64);
    (0..256).map(|_| rng.random_range(0..128_256)).collect()
}
