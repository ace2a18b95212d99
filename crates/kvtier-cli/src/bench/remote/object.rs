//! The object-store scenario of `kvtier bench remote`: the tier against a raw PUT/GET loop
//! of the same object size and concurrency with the same client against the same store.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use futures::{StreamExt, TryStreamExt};
use kvtier::tier::redis::tls::TlsSettings;
use kvtier::tier::{ObjectTier, ObjectUrl};
use kvtier::{Engine, EngineConfig};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::Serialize;
use tracing::info;

use super::super::buffers::{SourceRing, MIB};
use super::super::report::{gbps, median, Spread, WriteAmplification};
use super::super::{stream, BenchArgs, ModelShape};
use super::WINDOW;

#[derive(Debug, Serialize)]
struct Report {
    workload: &'static str,
    config: serde_json::Value,
    /// Medians over the rounds.
    baseline: Baseline,
    results: Results,
    ratios: Ratios,
    /// Min/median/max over the rounds.
    spread: SpreadSection,
    rounds: Vec<Round>,
    wall_secs: f64,
    engine_write: kvtier::EngineStats,
    engine_read: kvtier::EngineStats,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
struct Baseline {
    /// Raw PUTs of `object_bytes` objects, `concurrency` in flight: GB/s.
    object_put_gbps: f64,
    /// Raw GETs of the same objects: GB/s.
    object_get_gbps: f64,
    /// One HEAD, one at a time: ms (a lookup of n chunks by sequential probes costs n
    /// of these).
    object_head_ms: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
struct Results {
    /// Chunks stored through the engine until all acknowledged: GB/s.
    remote_store_gbps: f64,
    /// Chunks retrieved by a second engine (empty L1): GB/s.
    remote_retrieve_gbps: f64,
    /// A document's prefix lookup through the store (concurrent probes): ms.
    remote_lookup_ms: f64,
    chunks: usize,
    /// Chunk writes that stored an object (the bytes counted as stored).
    chunks_acknowledged: usize,
    /// Chunk writes that found the chunk there already: nothing stored, not counted.
    chunks_already_present: usize,
    hit_chunks: usize,
    verified_chunks: usize,
    /// The writer's object writes per distinct chunk stored.
    writes_per_unique_chunk: WriteAmplification,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
struct Ratios {
    remote_store: f64,
    remote_retrieve: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
struct Round {
    baseline: Baseline,
    results: Results,
    ratios: Ratios,
}

#[derive(Debug, Serialize)]
struct SpreadSection {
    object_put_gbps: Spread,
    object_get_gbps: Spread,
    remote_store_gbps: Spread,
    remote_retrieve_gbps: Spread,
    ratio_remote_store: Spread,
    ratio_remote_retrieve: Spread,
    remote_lookup_ms: Spread,
}

/// The raw loop: `n` PUTs of `data`, then `n` GETs, `conc` in flight; then one HEAD at a
/// time; the objects are deleted afterwards.
async fn raw_round(
    store: &Arc<dyn ObjectStore>,
    prefix: &str,
    data: &bytes::Bytes,
    n: usize,
    conc: usize,
) -> Result<Baseline> {
    let names: Vec<Path> = (0..n)
        .map(|i| Path::from(format!("{prefix}/{i}")))
        .collect();
    let total = (n * data.len()) as u64;
    let t0 = Instant::now();
    futures::stream::iter(&names)
        .map(|p| store.put(p, PutPayload::from(data.clone())))
        .buffer_unordered(conc)
        .try_collect::<Vec<_>>()
        .await
        .context("raw PUT loop")?;
    let put_secs = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let lens: Vec<usize> = futures::stream::iter(&names)
        .map(|p| async move {
            let b = store.get(p).await?.bytes().await?;
            Ok::<usize, object_store::Error>(b.len())
        })
        .buffer_unordered(conc)
        .try_collect()
        .await
        .context("raw GET loop")?;
    let get_secs = t0.elapsed().as_secs_f64();
    ensure!(
        lens.iter().all(|&l| l == data.len()),
        "raw GET returned short objects"
    );
    let mut heads = Vec::new();
    for p in names.iter().take(16) {
        let t = Instant::now();
        store.head(p).await.context("raw HEAD")?;
        heads.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let locations = futures::stream::iter(names.into_iter().map(Ok)).boxed();
    store
        .delete_stream(locations)
        .try_collect::<Vec<_>>()
        .await
        .context("deleting the raw loop's objects")?;
    Ok(Baseline {
        object_put_gbps: gbps(total, put_secs),
        object_get_gbps: gbps(total, get_secs),
        object_head_ms: median(&heads),
    })
}

/// One round of the engine: store `docs` documents, look them up and retrieve them from
/// a second engine, then remove them. Everything goes under a salt private to the round,
/// and only that salt is removed: a bucket prefix other nodes share keeps their objects.
#[allow(clippy::too_many_arguments)]
fn engine_round(
    cfg: &EngineConfig,
    shape: &ModelShape,
    args: &BenchArgs,
    ring: &SourceRing,
    docs: usize,
    first_doc: usize,
    chunk_size: usize,
    chunk_bytes: usize,
) -> Result<(Results, kvtier::EngineStats, kvtier::EngineStats)> {
    let per_doc = args.doc_tokens / chunk_size;
    let doc_tokens = |d: usize| -> Vec<u32> {
        (0..args.doc_tokens as u32)
            .map(|i| ((first_doc + d) as u32).wrapping_mul(2_654_435_761) ^ i)
            .collect()
    };
    let salt = crate::bench::scratch::run_id();
    let salt = Some(salt.as_str());
    let (s, stats_w) = {
        let engine =
            Engine::new(cfg.clone(), shape.identity()).context("building the writer engine")?;
        let s = stream::store_documents(
            &engine,
            ring,
            salt,
            docs,
            args.doc_tokens,
            doc_tokens,
            WINDOW,
        )?;
        (s, engine.stats())
    };
    let (acked, store_secs) = (s.acked, s.secs);
    let engine =
        Engine::new(cfg.clone(), shape.identity()).context("building the reader engine")?;
    let mut lookups = Vec::with_capacity(docs);
    for d in 0..docs {
        let t0 = Instant::now();
        let l = engine.lookup(&doc_tokens(d), salt)?;
        lookups.push(t0.elapsed().as_secs_f64() * 1e3);
        ensure!(l.hit_tokens <= args.doc_tokens, "lookup over the document");
    }
    let stream::Retrieved {
        hits,
        verified,
        secs,
    } = stream::retrieve_documents(
        &engine,
        ring,
        salt,
        docs,
        args.doc_tokens,
        doc_tokens,
        "the object store",
    )?;
    let stats_r = engine.stats();
    if let Some(salt) = salt {
        engine
            .remove_salt(salt)
            .context("removing the round's objects")?;
    }
    Ok((
        Results {
            remote_store_gbps: gbps((acked * chunk_bytes) as u64, store_secs),
            remote_retrieve_gbps: gbps((hits * chunk_bytes) as u64, secs),
            remote_lookup_ms: median(&lookups),
            chunks: docs * per_doc,
            chunks_acknowledged: acked,
            chunks_already_present: s.already,
            hit_chunks: hits,
            verified_chunks: verified,
            writes_per_unique_chunk: WriteAmplification::of(&stats_w, s.unique_chunks),
        },
        stats_w,
        stats_r,
    ))
}

/// Runs the object-store scenario against `url`.
pub fn run(args: &BenchArgs, url: &str) -> Result<()> {
    let t_all = Instant::now();
    let mut args = args.clone();
    // 4 MiB chunks by default (Llama-3-8B's chunk per rank at TP 8); `--tp 1`: 32 MiB.
    args.tp = super::default_tp(&args);
    ensure!(args.reps >= 1, "--reps must be at least 1");
    let shape = ModelShape::resolve(&args)?;
    let layout = shape.layout();
    let chunk_size = args.chunk_size.unwrap_or(256);
    let chunk_bytes = layout.chunk_bytes(chunk_size);
    ensure!(
        args.doc_tokens >= chunk_size,
        "--doc-tokens must be at least one chunk"
    );
    let per_doc = args.doc_tokens / chunk_size;
    let docs = args.docs.unwrap_or_else(|| (64 / per_doc).max(1));
    let parsed = ObjectUrl::parse(url)?;

    let mut cfg =
        EngineConfig::load(args.config.as_deref()).context("loading the engine config")?;
    let staging = (4 * WINDOW * chunk_bytes).max(256 * MIB);
    let pairs = [
        ("remote_url", url.to_string()),
        ("local_cpu", "false".to_string()),
        ("max_local_cpu_size", format!("{staging}B")),
        ("local_cpu_prefault", "true".into()),
    ];
    cfg.apply_pairs(pairs.iter().map(|(k, v)| (*k, v.as_str())))?;
    let tls = TlsSettings {
        ca_file: cfg.remote_tls_ca_file.clone(),
        cert_file: cfg.remote_tls_cert_file.clone(),
        key_file: cfg.remote_tls_key_file.clone(),
        insecure_skip_verify: cfg.remote_tls_insecure_skip_verify,
    };
    // The tier's own client: same library, endpoint, credentials and connection settings.
    let client = ObjectTier::from_url(url, 0, &tls)?.client();
    let ring = SourceRing::new(chunk_bytes, args.seed);
    let data = bytes::Bytes::copy_from_slice(ring.slot(0));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    info!(url = %parsed, chunk_bytes, chunks = docs * per_doc, reps = args.reps, "object-store scenario");

    let mut rounds = Vec::with_capacity(args.reps);
    let mut last = None;
    for r in 0..args.reps {
        let raw_prefix = format!("{}/bench-raw-{}-{r}", parsed.prefix, std::process::id());
        let raw = || {
            rt.block_on(raw_round(
                &client,
                &raw_prefix,
                &data,
                docs * per_doc,
                WINDOW,
            ))
        };
        // Alternate which runs first, so neither always meets the warmer store.
        let engine = || {
            engine_round(
                &cfg,
                &shape,
                &args,
                &ring,
                docs,
                r * docs,
                chunk_size,
                chunk_bytes,
            )
        };
        let (baseline, (results, w, rd)) = if r % 2 == 0 {
            let b = raw()?;
            (b, engine()?)
        } else {
            let e = engine()?;
            (raw()?, e)
        };
        let rel = |x: f64, b: f64| if b > 0.0 { x / b } else { 0.0 };
        let ratios = Ratios {
            remote_store: rel(results.remote_store_gbps, baseline.object_put_gbps),
            remote_retrieve: rel(results.remote_retrieve_gbps, baseline.object_get_gbps),
        };
        let round = Round {
            baseline,
            results,
            ratios,
        };
        info!(
            round = r,
            put = baseline.object_put_gbps,
            get = baseline.object_get_gbps,
            store = round.results.remote_store_gbps,
            retrieve = round.results.remote_retrieve_gbps,
            "round"
        );
        rounds.push(round);
        last = Some((w, rd));
    }
    let (engine_write, engine_read) = last.context("no round ran")?;
    let col = |f: &dyn Fn(&Round) -> f64| -> Vec<f64> { rounds.iter().map(f).collect() };
    let spread = SpreadSection {
        object_put_gbps: Spread::of(&col(&|r| r.baseline.object_put_gbps)),
        object_get_gbps: Spread::of(&col(&|r| r.baseline.object_get_gbps)),
        remote_store_gbps: Spread::of(&col(&|r| r.results.remote_store_gbps)),
        remote_retrieve_gbps: Spread::of(&col(&|r| r.results.remote_retrieve_gbps)),
        ratio_remote_store: Spread::of(&col(&|r| r.ratios.remote_store)),
        ratio_remote_retrieve: Spread::of(&col(&|r| r.ratios.remote_retrieve)),
        remote_lookup_ms: Spread::of(&col(&|r| r.results.remote_lookup_ms)),
    };
    let last_round = rounds[rounds.len() - 1].results.clone();
    let report = Report {
        workload: "remote",
        config: serde_json::json!({
            "model": shape.name, "layout": layout.describe(), "tp": shape.tp,
            "chunk_bytes": chunk_bytes, "object_bytes": data.len(), "chunks": docs * per_doc,
            "docs": docs, "doc_tokens": args.doc_tokens, "remote": parsed.redacted(),
            "concurrency": WINDOW, "tier_concurrency": parsed.concurrency,
            "part_size": parsed.part_size, "reps": args.reps, "library": "object_store 0.14",
        }),
        baseline: Baseline {
            object_put_gbps: spread.object_put_gbps.median,
            object_get_gbps: spread.object_get_gbps.median,
            object_head_ms: median(&col(&|r| r.baseline.object_head_ms)),
        },
        results: Results {
            remote_store_gbps: spread.remote_store_gbps.median,
            remote_retrieve_gbps: spread.remote_retrieve_gbps.median,
            remote_lookup_ms: spread.remote_lookup_ms.median,
            ..last_round.clone()
        },
        ratios: Ratios {
            remote_store: spread.ratio_remote_store.median,
            remote_retrieve: spread.ratio_remote_retrieve.median,
        },
        spread,
        rounds,
        wall_secs: t_all.elapsed().as_secs_f64(),
        engine_write,
        engine_read,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let s = &report.spread;
    println!(
        "object store {} — {} B objects, {} in flight, {} rounds (min / median / max)",
        parsed.redacted(),
        chunk_bytes,
        WINDOW,
        args.reps
    );
    println!(
        "{:<34} {} GB/s",
        "raw PUT loop (object_store)", s.object_put_gbps
    );
    println!(
        "{:<34} {} GB/s",
        "raw GET loop (object_store)", s.object_get_gbps
    );
    println!(
        "{:<34} {} GB/s  ratio {}",
        "tier store (acknowledged)", s.remote_store_gbps, s.ratio_remote_store
    );
    println!(
        "{:<34} {} GB/s  ratio {}",
        "tier retrieve", s.remote_retrieve_gbps, s.ratio_remote_retrieve
    );
    println!(
        "{:<34} {} ms for {per_doc} chunks (one HEAD: {:.2} ms)",
        "tier prefix lookup", s.remote_lookup_ms, report.baseline.object_head_ms
    );
    println!(
        "{:<34} {}/{} chunks ({} verified)",
        "hits from the store (last round)",
        last_round.hit_chunks,
        last_round.chunks,
        last_round.verified_chunks
    );
    Ok(())
}
