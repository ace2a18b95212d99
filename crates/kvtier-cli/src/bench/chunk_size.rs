//! `kvtier bench chunk-size`: what the chunk size costs and what it loses, per chunk size.
//!
//! Three figures per size, so the trade-off is visible side by side:
//! - lookup of a 128K-token prompt, hashing included, and of its precomputed keys (the index
//!   alone), on a side engine with 32-byte tokens (lookups never touch payloads); ratios to
//!   the 256-token chunk (the engine's default) in the same round;
//! - L1 store and retrieve of a ~1 GiB working set at the model's real KV size, one call per
//!   prompt as the vLLM connector makes them; ratios to the same round's single-thread
//!   memcpy of the same bytes, one copy per prompt (the same baseline for every size:
//!   glibc's memcpy takes its large-copy path between 32 and 64 MiB, 1.3x faster on the
//!   development VM, so chunk-sized pieces would move the baseline with the size);
//! - what a hit loses to granularity: a hit is whole chunks, so on average half a chunk of
//!   each hit is recomputed (arithmetic, not measured).
//!
//! Each round visits every size in a different order (rotated, reversed every other round),
//! and within a size the memcpy and engine passes alternate which goes first; the report
//! gives min / median / max over rounds of the per-round figures.

use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use kvtier::keys::{ChunkKey, ModelIdentity};
use kvtier::layout::{Dtype, KvLayout};
use kvtier::{Engine, EngineConfig};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Serialize;
use tracing::info;

use super::buffers::{fill_pseudo_random, AlignedBuf, GIB, MIB};
use super::report::{gbps, human_bytes, median, Spread};
use super::{engine_config, BenchArgs, ModelShape};

/// Chunk sizes (tokens) swept when `--chunk-sizes` is not given: one GPU vLLM block (16)
/// up to 64 of them.
pub const DEFAULT_CHUNK_TOKENS: [usize; 7] = [16, 32, 64, 128, 256, 512, 1024];

/// Tokens of the looked-up prompt: 128K, the long-context case the issue names.
const LOOKUP_TOKENS: usize = 128 * 1024;
/// The chunk size lookup times are compared with: the engine's default (the first swept
/// size when this one is not swept).
const REFERENCE_TOKENS: usize = 256;
/// Timed lookups (and key probes) per size and round; the round's figure is their median.
const LOOKUP_SAMPLES: usize = 20;
/// Untimed lookups first, so lazily built state does not land in the samples.
const LOOKUP_WARMUP: usize = 3;
/// A short prompt, for the granularity column next to `--doc-tokens`.
const SHORT_PROMPT: usize = 1024;

/// One chunk size's figures.
#[derive(Clone, Debug, Serialize)]
pub struct SizePoint {
    /// Tokens per chunk.
    pub chunk_tokens: usize,
    /// Payload bytes of one chunk at the model's KV size.
    pub chunk_bytes: usize,
    /// Chunks of the 128K-token lookup prompt.
    pub chunks_per_lookup: usize,
    /// Per round: median µs of `lookup` (hashing included) of the 128K-token prompt.
    pub lookup_us: Vec<f64>,
    /// Per round: median µs of the index lookup of the prompt's precomputed keys.
    pub keys_us: Vec<f64>,
    /// Spread over rounds of `lookup_us`.
    pub lookup_us_spread: Spread,
    /// Spread over rounds of `keys_us`.
    pub keys_us_spread: Spread,
    /// Per-round lookup time / the reference size's in the same round.
    pub lookup_vs_reference: Spread,
    /// Per-round key lookup time / the reference size's in the same round.
    pub keys_vs_reference: Spread,
    /// memcpy GB/s per round (the same bytes, one copy per prompt).
    pub memcpy_gbps: Vec<f64>,
    /// Store GB/s per round.
    pub store_gbps: Vec<f64>,
    /// Retrieve GB/s per round.
    pub retrieve_gbps: Vec<f64>,
    /// Per-round store / memcpy.
    pub store_vs_memcpy: Spread,
    /// Per-round retrieve / memcpy.
    pub retrieve_vs_memcpy: Spread,
    /// Expected tokens recomputed per hit because hits are whole chunks: half a chunk.
    pub lost_tokens_per_hit: f64,
    /// `lost_tokens_per_hit` as a fraction of a 1024-token prompt.
    pub lost_fraction_short: f64,
    /// `lost_tokens_per_hit` as a fraction of a `--doc-tokens` prompt.
    pub lost_fraction_typical: f64,
}

/// The report of `kvtier bench chunk-size`.
#[derive(Debug, Serialize)]
struct ChunkSizeReport {
    workload: &'static str,
    model: String,
    layout: String,
    bytes_per_token: usize,
    rounds: usize,
    lookup_tokens: usize,
    reference_chunk_tokens: usize,
    working_set_bytes: usize,
    call_tokens: usize,
    calls: usize,
    short_prompt_tokens: usize,
    typical_prompt_tokens: usize,
    points: Vec<SizePoint>,
    wall_secs: f64,
}

/// The store/retrieve plan: `calls` prompts of `call_tokens` tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CopyPlan {
    call_tokens: usize,
    calls: usize,
}

impl CopyPlan {
    /// Prompts of `doc_tokens` (at most the working set, a whole number of the largest
    /// chunk) filling `working_set` bytes of `bytes_per_token`-byte tokens.
    fn new(
        working_set: usize,
        bytes_per_token: usize,
        doc_tokens: usize,
        largest_chunk: usize,
    ) -> Result<CopyPlan> {
        let ws_tokens = working_set / bytes_per_token.max(1);
        let call_tokens = doc_tokens.min(ws_tokens) / largest_chunk * largest_chunk;
        ensure!(
            call_tokens > 0,
            "a {}-token chunk does not fit in a prompt of {} tokens within the {} working set; \
             raise --doc-tokens or --l1-gb, or sweep smaller --chunk-sizes",
            largest_chunk,
            doc_tokens.min(ws_tokens),
            human_bytes(working_set as u64)
        );
        Ok(CopyPlan {
            call_tokens,
            calls: (ws_tokens / call_tokens).max(1),
        })
    }
}

/// The order sizes are visited in round `round`: rotated by the round, reversed every
/// other round, so no size always runs first or right after another.
fn round_order(n: usize, round: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).map(|i| (i + round) % n.max(1)).collect();
    if round % 2 == 1 {
        order.reverse();
    }
    order
}

/// Runs the sweep.
pub fn run(args: &BenchArgs) -> Result<()> {
    let t0 = Instant::now();
    let sizes = if args.chunk_sizes.is_empty() {
        DEFAULT_CHUNK_TOKENS.to_vec()
    } else {
        args.chunk_sizes.clone()
    };
    ensure!(
        sizes.iter().all(|&c| (1..=LOOKUP_TOKENS).contains(&c)),
        "--chunk-sizes takes sizes from 1 to {LOOKUP_TOKENS} tokens"
    );
    let rounds = args.reps.max(1);
    let shape = ModelShape::resolve(args)?;
    let layout = shape.layout();
    let bpt = layout.bytes_per_token();
    let working_set = match args.l1_gb {
        Some(gb) if gb > 0.0 => (gb * GIB as f64) as usize,
        Some(_) => bail!("--l1-gb must be positive"),
        None => GIB,
    };
    let largest = sizes.iter().copied().max().unwrap_or(REFERENCE_TOKENS);
    let plan = CopyPlan::new(working_set, bpt, args.doc_tokens, largest)?;
    let set_bytes = plan.calls * plan.call_tokens * bpt;
    // The pool holds the whole set plus a margin for allocator slack; prefaulted (untimed).
    let mut copy_args = args.clone();
    copy_args.l1_gb = Some((set_bytes + set_bytes / 8 + 64 * MIB) as f64 / GIB as f64);
    let base_cfg = engine_config(&copy_args)?;
    info!(
        model = %shape.name,
        layout = %layout.describe(),
        working_set = %human_bytes(set_bytes as u64),
        prompts = plan.calls,
        prompt_tokens = plan.call_tokens,
        "chunk-size plan"
    );

    let mut rng = StdRng::seed_from_u64(args.seed ^ 0x4348_554E_4B53);
    let lookup_prompt: Vec<u32> = (0..LOOKUP_TOKENS)
        .map(|_| rng.random_range(0..128_256))
        .collect();
    let prompts: Vec<Vec<u32>> = (0..plan.calls)
        .map(|_| {
            (0..plan.call_tokens)
                .map(|_| rng.random_range(0..128_256))
                .collect()
        })
        .collect();
    let mut src = AlignedBuf::new(set_bytes);
    fill_pseudo_random(&mut src, args.seed);
    let mut dst = AlignedBuf::new(set_bytes);

    let n = sizes.len();
    let mut lookup_us = vec![Vec::new(); n];
    let mut keys_us = vec![Vec::new(); n];
    let mut memcpy = vec![Vec::new(); n];
    let mut store = vec![Vec::new(); n];
    let mut retrieve = vec![Vec::new(); n];
    for round in 0..rounds {
        for (step, i) in round_order(n, round).into_iter().enumerate() {
            let cs = sizes[i];
            let (l, k) = lookup_pass(&base_cfg, cs, &lookup_prompt)?;
            lookup_us[i].push(l);
            keys_us[i].push(k);
            let mut cfg = base_cfg.clone();
            cfg.chunk_size = cs;
            let engine = Engine::new(cfg, shape.identity())
                .with_context(|| format!("building the {cs}-token-chunk engine"))?;
            let call_bytes = plan.call_tokens * bpt;
            let (mut mc, mut s, mut r) = (0.0, 0.0, 0.0);
            for pass in 0..2 {
                if (pass + round + step) % 2 == 0 {
                    mc = memcpy_pass(&src, &mut dst, call_bytes);
                } else {
                    (s, r) = engine_passes(&engine, &prompts, &src, &mut dst, call_bytes)?;
                }
            }
            memcpy[i].push(mc);
            store[i].push(s);
            retrieve[i].push(r);
            info!(
                round,
                chunk_tokens = cs,
                lookup_us = format!("{l:.0}"),
                store_vs_memcpy = format!("{:.2}", ratio(s, mc)),
                retrieve_vs_memcpy = format!("{:.2}", ratio(r, mc)),
                "chunk size measured"
            );
        }
    }

    let reference = sizes
        .iter()
        .position(|&c| c == REFERENCE_TOKENS)
        .unwrap_or(0);
    let typical = args.doc_tokens.max(1);
    let points = (0..n)
        .map(|i| {
            let cs = sizes[i];
            let lost = cs as f64 / 2.0;
            SizePoint {
                chunk_tokens: cs,
                chunk_bytes: layout.chunk_bytes(cs),
                chunks_per_lookup: LOOKUP_TOKENS / cs,
                lookup_us_spread: Spread::of(&lookup_us[i]),
                keys_us_spread: Spread::of(&keys_us[i]),
                lookup_vs_reference: Spread::of(&ratios(&lookup_us[i], &lookup_us[reference])),
                keys_vs_reference: Spread::of(&ratios(&keys_us[i], &keys_us[reference])),
                store_vs_memcpy: Spread::of(&ratios(&store[i], &memcpy[i])),
                retrieve_vs_memcpy: Spread::of(&ratios(&retrieve[i], &memcpy[i])),
                lookup_us: lookup_us[i].clone(),
                keys_us: keys_us[i].clone(),
                memcpy_gbps: memcpy[i].clone(),
                store_gbps: store[i].clone(),
                retrieve_gbps: retrieve[i].clone(),
                lost_tokens_per_hit: lost,
                lost_fraction_short: lost / SHORT_PROMPT as f64,
                lost_fraction_typical: lost / typical as f64,
            }
        })
        .collect();
    let report = ChunkSizeReport {
        workload: "chunk-size",
        model: shape.name.clone(),
        layout: layout.describe(),
        bytes_per_token: bpt,
        rounds,
        lookup_tokens: LOOKUP_TOKENS,
        reference_chunk_tokens: sizes[reference],
        working_set_bytes: set_bytes,
        call_tokens: plan.call_tokens,
        calls: plan.calls,
        short_prompt_tokens: SHORT_PROMPT,
        typical_prompt_tokens: typical,
        points,
        wall_secs: t0.elapsed().as_secs_f64(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

/// `a / b` per round (0 where `b` is not positive).
fn ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| ratio(*x, *y)).collect()
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// Stores the 128K-token prompt in a fresh side engine of `chunk_size`-token chunks (one
/// 8-dim head of one layer: 32 bytes a token) and returns the median µs of `lookup` and of
/// the index lookup of the precomputed keys.
fn lookup_pass(base: &EngineConfig, chunk_size: usize, tokens: &[u32]) -> Result<(f64, f64)> {
    let cfg = EngineConfig {
        chunk_size,
        max_local_cpu_size: 64 * MIB as u64,
        cache_policy: base.cache_policy,
        local_cpu_huge_pages: false,
        local_cpu_prefault: false,
        ..EngineConfig::default()
    };
    let layout = KvLayout::simple(1, 1, 8, Dtype::Bf16);
    let engine = Engine::new(cfg, ModelIdentity::new("kvtier-bench-chunk-size", layout))
        .context("building the lookup engine")?;
    let payload = AlignedBuf::new(engine.payload_bytes(tokens.len()));
    let stored = engine
        .store(tokens, None, &payload)
        .context("storing the 128K-token prompt")?
        .stored_tokens;
    let chunks = stored / chunk_size;
    ensure!(
        chunks == tokens.len() / chunk_size,
        "only {stored} of {} tokens were stored",
        tokens.len()
    );
    let lookup = sample_median_us(|| {
        let r = engine.lookup(tokens, None)?;
        check_hit(r.hit_chunks, chunks)
    })?;
    let keys: Vec<ChunkKey> = engine
        .key_space()
        .chunk_spans(tokens, None)?
        .iter()
        .map(|s| s.key)
        .collect();
    let probe = sample_median_us(|| {
        let r = engine.manager().lookup(&keys)?;
        check_hit(r.hit_chunks, chunks)
    })?;
    Ok((lookup, probe))
}

fn check_hit(got: usize, want: usize) -> Result<()> {
    ensure!(got == want, "lookup found {got} of {want} stored chunks");
    Ok(())
}

/// Median µs of `LOOKUP_SAMPLES` timed calls after `LOOKUP_WARMUP` untimed ones.
fn sample_median_us(mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..LOOKUP_WARMUP {
        f()?;
    }
    let mut us = Vec::with_capacity(LOOKUP_SAMPLES);
    for _ in 0..LOOKUP_SAMPLES {
        let t = Instant::now();
        f()?;
        us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(median(&us))
}

/// Single-thread `copy_from_slice` of `src` into `dst` in `piece`-byte pieces (one per
/// prompt); GB/s.
fn memcpy_pass(src: &AlignedBuf, dst: &mut AlignedBuf, piece: usize) -> f64 {
    let t = Instant::now();
    for (d, s) in dst.chunks_mut(piece.max(1)).zip(src.chunks(piece.max(1))) {
        d.copy_from_slice(s);
    }
    std::hint::black_box(&dst[..]);
    gbps(src.len() as u64, t.elapsed().as_secs_f64())
}

/// Stores prompt `i` from its `call_bytes` of `src` (one call per prompt), then retrieves
/// each into `dst`; returns (store, retrieve) GB/s of the timed calls. The retrieved bytes
/// are compared with the source after the clock stops.
fn engine_passes(
    engine: &Engine,
    prompts: &[Vec<u32>],
    src: &AlignedBuf,
    dst: &mut AlignedBuf,
    call_bytes: usize,
) -> Result<(f64, f64)> {
    let mut st = 0f64;
    for (t, s) in prompts.iter().zip(src.chunks_exact(call_bytes)) {
        let t0 = Instant::now();
        let r = engine.store(t, None, s)?;
        st += t0.elapsed().as_secs_f64();
        ensure!(
            r.stored_tokens == t.len(),
            "L1 stored {} of {} tokens (was the pool too small?)",
            r.stored_tokens,
            t.len()
        );
    }
    let mut rt = 0f64;
    for (t, d) in prompts.iter().zip(dst.chunks_exact_mut(call_bytes)) {
        let t0 = Instant::now();
        let r = engine.retrieve(t, None, d)?;
        rt += t0.elapsed().as_secs_f64();
        ensure!(r.hit_tokens == t.len(), "retrieve missed stored chunks");
    }
    ensure!(
        dst[..] == src[..],
        "retrieved bytes differ from the stored ones"
    );
    engine.clear().context("clearing L1 after a pass")?;
    let bytes = src.len() as u64;
    Ok((gbps(bytes, st), gbps(bytes, rt)))
}

/// `median [min–max]` with two decimals.
fn bracketed(s: &Spread, decimals: usize) -> String {
    format!(
        "{:.d$} [{:.d$}–{:.d$}]",
        s.median,
        s.min,
        s.max,
        d = decimals
    )
}

fn print_table(r: &ChunkSizeReport) {
    println!(
        "chunk-size: {} ({} a token, {}), {} rounds; median [min–max] over rounds",
        r.model,
        human_bytes(r.bytes_per_token as u64),
        r.layout,
        r.rounds
    );
    println!(
        "{:>6} {:>10} {:>8} {:>20} {:>20} {:>20} {:>20} {:>20} {:>8} {:>8} {:>8}",
        "chunk",
        "chunk",
        "chunks",
        "lookup µs",
        "lookup / ref",
        "keys / ref",
        "store / memcpy",
        "retrieve / memcpy",
        "lost/hit",
        format!("% of {}", short_tokens(r.short_prompt_tokens)),
        format!("% of {}", short_tokens(r.typical_prompt_tokens)),
    );
    println!(
        "{:>6} {:>10} {:>8}",
        "tokens",
        "payload",
        format!("/{}", short_tokens(r.lookup_tokens))
    );
    for p in &r.points {
        println!(
            "{:>6} {:>10} {:>8} {:>20} {:>20} {:>20} {:>20} {:>20} {:>8.0} {:>8.1} {:>8.2}",
            p.chunk_tokens,
            human_bytes(p.chunk_bytes as u64),
            p.chunks_per_lookup,
            bracketed(&p.lookup_us_spread, 0),
            bracketed(&p.lookup_vs_reference, 2),
            bracketed(&p.keys_vs_reference, 2),
            bracketed(&p.store_vs_memcpy, 2),
            bracketed(&p.retrieve_vs_memcpy, 2),
            p.lost_tokens_per_hit,
            100.0 * p.lost_fraction_short,
            100.0 * p.lost_fraction_typical,
        );
    }
    println!();
    println!(
        "lookup: engine.lookup of a {}-token prompt, hashing included (median of {LOOKUP_SAMPLES} \
         calls a round); keys: the index lookup of its precomputed keys; / ref: per-round \
         ratio to the {}-token chunk",
        r.lookup_tokens, r.reference_chunk_tokens
    );
    println!(
        "store, retrieve: {} prompts of {} tokens ({} in all), one call each, per-round ratio \
         to single-thread memcpy of the same bytes, one copy per prompt (above 1: the engine \
         copies chunks of ≥ 4 MiB on several threads)",
        r.calls,
        r.call_tokens,
        human_bytes(r.working_set_bytes as u64)
    );
    println!(
        "lost/hit: tokens recomputed per hit because a hit is whole chunks (half a chunk on \
         average), and that as a share of prompts of {} and {} tokens (--doc-tokens)",
        r.short_prompt_tokens, r.typical_prompt_tokens
    );
}

/// `1024` → `1K`, `131072` → `128K`; other counts as they are.
fn short_tokens(n: usize) -> String {
    if n >= 1024 && n % 1024 == 0 {
        format!("{}K", n / 1024)
    } else {
        n.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_round_visits_every_size_once_in_a_new_order() {
        let orders: Vec<Vec<usize>> = (0..3).map(|r| round_order(4, r)).collect();
        for o in &orders {
            let mut s = o.clone();
            s.sort_unstable();
            assert_eq!(s, [0, 1, 2, 3]);
        }
        assert_eq!(orders[0], [0, 1, 2, 3]);
        assert_eq!(orders[1], [0, 3, 2, 1]);
        assert_eq!(orders[2], [2, 3, 0, 1]);
        assert_eq!(round_order(0, 1), Vec::<usize>::new());
    }

    #[test]
    fn copy_plan_fills_the_working_set_with_whole_largest_chunks() {
        // Llama-3-8B: 128 KiB a token, 1 GiB = 8192 tokens.
        let p = CopyPlan::new(GIB, 128 << 10, 8192, 1024).unwrap();
        assert_eq!(
            p,
            CopyPlan {
                call_tokens: 8192,
                calls: 1
            }
        );
        let p = CopyPlan::new(GIB, 128 << 10, 2048, 1024).unwrap();
        assert_eq!(
            p,
            CopyPlan {
                call_tokens: 2048,
                calls: 4
            }
        );
        // Llama-3-70B: 320 KiB a token; the prompt is cut to what the set holds.
        let p = CopyPlan::new(GIB, 320 << 10, 8192, 1024).unwrap();
        assert_eq!(
            p,
            CopyPlan {
                call_tokens: 3072,
                calls: 1
            }
        );
        let e = CopyPlan::new(MIB, 128 << 10, 8192, 1024).unwrap_err();
        assert!(e.to_string().contains("does not fit"), "{e}");
    }

    #[test]
    fn short_token_counts() {
        assert_eq!(short_tokens(131072), "128K");
        assert_eq!(short_tokens(1000), "1000");
        assert_eq!(short_tokens(8192), "8K");
    }
}
