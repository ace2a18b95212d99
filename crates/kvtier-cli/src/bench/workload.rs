//! The workloads: long-doc-qa (reuse under eviction) and random (no reuse, store overhead).

use std::time::Instant;

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use kvtier::{Engine, EngineStats};
use rand::seq::SliceRandom;
use rand::{rngs::StdRng, Rng, SeedableRng};
use tracing::warn;

use super::buffers::{AlignedBuf, SourceRing};
use super::report::{
    gbps, percentile, ResultsSection, Throughput, UniqueChunks, WriteAmplification,
};
use super::Plan;

/// Vocabulary the synthetic token ids are drawn from (Llama 3's size).
const VOCAB: u32 = 128_256;

/// Document ids of the random workload start here so they never collide with long-doc-qa's.
const RANDOM_DOC_BASE: u64 = 1 << 40;

/// Raw measurements while a workload runs.
#[derive(Default)]
struct Tally {
    store: Throughput,
    retrieve: Throughput,
    memcpy: Throughput,
    lookup_us: Vec<f64>,
    hit_rate_series: Vec<f64>,
    requested_tokens: u64,
    hit_tokens: u64,
    dropped_chunks: u64,
    restores: u64,
    verified_chunks: u64,
    unique: UniqueChunks,
}

impl Tally {
    fn into_results(self) -> ResultsSection {
        ResultsSection {
            store_gbps: self.store.gbps(),
            store_bytes: self.store.bytes,
            store_secs: self.store.secs,
            store_calls: self.store.calls,
            retrieve_bytes: self.retrieve.bytes,
            retrieve_secs: self.retrieve.secs,
            retrieve_calls: self.retrieve.calls,
            lookup_p50_us: percentile(&self.lookup_us, 50.0),
            lookup_p99_us: percentile(&self.lookup_us, 99.0),
            lookup_samples: self.lookup_us.len(),
            hit_rate: if self.requested_tokens == 0 {
                0.0
            } else {
                self.hit_tokens as f64 / self.requested_tokens as f64
            },
            requested_tokens: self.requested_tokens,
            hit_tokens: self.hit_tokens,
            dropped_chunks: self.dropped_chunks,
            restores: self.restores,
            unique_chunks: self.unique.count(),
            verified_chunks: self.verified_chunks,
            lookup_us_samples: self.lookup_us,
            hit_rate_series: self.hit_rate_series,
            ..ResultsSection::default()
        }
    }
}

/// Buffers and engine shared by every request of a workload.
struct Ctx<'a> {
    engine: &'a Engine,
    plan: &'a Plan,
    ring: &'a SourceRing,
    payload: AlignedBuf,
    out: AlignedBuf,
    rng: StdRng,
    tally: Tally,
}

impl<'a> Ctx<'a> {
    fn new(engine: &'a Engine, plan: &'a Plan, ring: &'a SourceRing) -> Ctx<'a> {
        Ctx {
            engine,
            plan,
            ring,
            payload: AlignedBuf::new(plan.doc_bytes),
            out: AlignedBuf::new(plan.doc_bytes),
            rng: StdRng::seed_from_u64(plan.seed),
            tally: Tally::default(),
        }
    }

    fn random_tokens(&mut self) -> Vec<u32> {
        (0..self.plan.doc_tokens)
            .map(|_| self.rng.random_range(0..VOCAB))
            .collect()
    }

    /// Bytes L1 has taken in so far (engine counter): what a store actually wrote, which
    /// excludes chunks already present and chunks dropped for lack of room.
    fn l1_stored_bytes(&self) -> u64 {
        self.engine
            .stats()
            .tiers
            .first()
            .map_or(0, |t| t.stored_bytes)
    }

    /// Composes document `doc`'s payload (untimed), then times `engine.store` alone.
    /// Returns the bytes newly stored.
    fn store_doc(&mut self, doc: u64, tokens: &[u32]) -> Result<u64> {
        self.ring.compose(doc, &mut self.payload);
        let before = self.l1_stored_bytes();
        let t0 = Instant::now();
        let rep = self
            .engine
            .store(tokens, self.plan.salt.as_deref(), &self.payload)?;
        let dt = t0.elapsed();
        self.tally
            .unique
            .note(self.engine, tokens, self.plan.salt.as_deref())?;
        if self.plan.sync_stores {
            // Let lower-tier writes land before the next request (sweeps with a disk tier).
            self.engine.flush(std::time::Duration::from_secs(120));
        }
        let bytes = self.l1_stored_bytes() - before;
        self.tally.store.add(bytes, dt);
        if rep.dropped_chunks > 0 {
            warn!(
                doc,
                dropped = rep.dropped_chunks,
                "L1 had no room for part of a store"
            );
            self.tally.dropped_chunks += rep.dropped_chunks as u64;
        }
        Ok(bytes)
    }

    /// Times one lookup; returns the hit tokens.
    fn timed_lookup(&mut self, tokens: &[u32]) -> Result<usize> {
        let t0 = Instant::now();
        let hit = self
            .engine
            .lookup(tokens, self.plan.salt.as_deref())?
            .hit_tokens;
        self.tally.lookup_us.push(t0.elapsed().as_secs_f64() * 1e6);
        self.tally.requested_tokens += tokens.len() as u64;
        self.tally.hit_tokens += hit as u64;
        let rate = self.tally.hit_tokens as f64 / self.tally.requested_tokens.max(1) as f64;
        self.tally.hit_rate_series.push(rate);
        Ok(hit)
    }

    /// One long-doc-qa query: lookup, retrieve what hit, store again when the hit was
    /// partial (a serving engine recomputes the missing KV and stores it).
    fn query(&mut self, doc: u64, tokens: &[u32], chunked_tokens: usize) -> Result<()> {
        let hit = self.timed_lookup(tokens)?;
        if hit > 0 {
            let t0 = Instant::now();
            let got = self
                .engine
                .retrieve(tokens, self.plan.salt.as_deref(), &mut self.out)?;
            let dt = t0.elapsed();
            self.tally
                .retrieve
                .add((got.hit_tokens * self.plan.bytes_per_token) as u64, dt);
            if got.hit_tokens < hit {
                warn!(
                    doc,
                    lookup = hit,
                    retrieved = got.hit_tokens,
                    "retrieve found less than lookup"
                );
            }
            self.verify(doc, got.hit_tokens)?;
        }
        if hit < chunked_tokens {
            self.store_doc(doc, tokens)?;
            self.tally.restores += 1;
        }
        Ok(())
    }

    /// Checks the first, the last and one random retrieved chunk byte for byte (untimed).
    fn verify(&mut self, doc: u64, hit_tokens: usize) -> Result<()> {
        let cb = self.plan.chunk_bytes;
        let hit_bytes = hit_tokens * self.plan.bytes_per_token;
        let chunks = hit_bytes.div_ceil(cb);
        if chunks == 0 {
            return Ok(());
        }
        let mut picks = vec![0, chunks - 1, self.rng.random_range(0..chunks)];
        picks.dedup();
        for i in picks {
            let got = &self.out[i * cb..((i + 1) * cb).min(hit_bytes)];
            if !self.ring.chunk_matches(doc, i, got) {
                bail!("retrieved bytes differ from what was stored: document {doc}, chunk {i}");
            }
            self.tally.verified_chunks += 1;
        }
        Ok(())
    }

    /// Times a memcpy of the first `bytes` of the payload into the output buffer, one
    /// chunk per copy like the engine, for the random workload's overhead figure.
    fn timed_memcpy(&mut self, bytes: usize) {
        let cb = self.plan.chunk_bytes;
        let t0 = Instant::now();
        for (d, s) in self.out[..bytes]
            .chunks_mut(cb)
            .zip(self.payload[..bytes].chunks(cb))
        {
            d.copy_from_slice(s);
        }
        let dt = t0.elapsed();
        std::hint::black_box(&self.out[..]);
        self.tally.memcpy.add(bytes as u64, dt);
    }
}

fn progress(len: usize, prefix: &'static str) -> ProgressBar {
    let pb = ProgressBar::new(len as u64).with_prefix(prefix);
    if let Ok(style) =
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg} ({elapsed})")
    {
        pb.set_style(style.progress_chars("=> "));
    }
    pb
}

/// long-doc-qa: store every document, then query each `queries_per_doc` times in a
/// shuffled order. The set is larger than L1 by default, so queries mix full hits, misses
/// after eviction and re-stores.
pub fn long_doc_qa(engine: &Engine, plan: &Plan, ring: &SourceRing) -> Result<ResultsSection> {
    let mut ctx = Ctx::new(engine, plan, ring);
    let docs: Vec<Vec<u32>> = (0..plan.docs).map(|_| ctx.random_tokens()).collect();
    let chunked_tokens = engine
        .key_space()
        .chunk_spans(&docs[0], plan.salt.as_deref())?
        .last()
        .map_or(0, |s| s.end);
    let pb = progress(plan.docs + plan.total_queries(), "long-doc-qa");
    pb.set_message("storing");
    for (d, tokens) in docs.iter().enumerate() {
        ctx.store_doc(d as u64, tokens)?;
        pb.inc(1);
    }
    let mut order: Vec<usize> = (0..plan.docs)
        .flat_map(|d| std::iter::repeat_n(d, plan.queries_per_doc))
        .collect();
    order.shuffle(&mut ctx.rng);
    pb.set_message("querying");
    for d in order {
        ctx.query(d as u64, &docs[d], chunked_tokens)?;
        pb.inc(1);
    }
    pb.finish_and_clear();
    let mut r = ctx.tally.into_results();
    r.retrieve_gbps = Some(gbps(r.retrieve_bytes, r.retrieve_secs));
    Ok(r)
}

/// random: fresh prompts that never repeat. Each is looked up (a miss) and stored; the
/// same bytes are then memcpy'd so the store's overhead over a plain copy can be reported.
pub fn random(engine: &Engine, plan: &Plan, ring: &SourceRing) -> Result<ResultsSection> {
    let mut ctx = Ctx::new(engine, plan, ring);
    let pb = progress(plan.docs, "random");
    for i in 0..plan.docs {
        let tokens = ctx.random_tokens();
        ctx.timed_lookup(&tokens)?;
        let stored = ctx.store_doc(RANDOM_DOC_BASE + i as u64, &tokens)?;
        ctx.timed_memcpy(stored as usize);
        pb.inc(1);
    }
    pb.finish_and_clear();
    let memcpy = ctx.tally.memcpy;
    let store = ctx.tally.store;
    let mut r = ctx.tally.into_results();
    if store.bytes > 0 {
        r.overhead_ms_per_gb = Some((store.secs - memcpy.secs) * 1e3 / (store.bytes as f64 / 1e9));
    }
    r.memcpy_same_bytes_gbps = Some(memcpy.gbps());
    Ok(r)
}

/// Copies the engine's tier counters into the results.
pub fn fill_engine_counters(r: &mut ResultsSection, stats: &EngineStats) {
    r.tier_hits = stats
        .tiers
        .iter()
        .map(|t| (t.name.clone(), t.hits))
        .collect();
    r.write_backs = stats.tiers.iter().map(|t| t.write_backs).sum();
    r.evictions = stats.l1.evictions;
    r.writes_per_unique_chunk = WriteAmplification::of(stats, r.unique_chunks);
}
