//! `kvtier bench disk`: the disk tier against the device, measured in the same run.
//!
//! 1. Baseline on the same directory with the same I/O size: one file per chunk, written
//!    sequentially with `O_DIRECT` (fio-like `direct=1`), then read back with `O_DIRECT`;
//!    also the durable variant (`fdatasync` per file), which is what an acknowledged disk
//!    store costs at minimum.
//! 2. Engine A stores the documents with the disk tier (L1 smaller than the working set, or
//!    `--disk-only`: L1 only stages I/O); write throughput counts until every chunk is
//!    acknowledged durable.
//! 3. Engine B opens the same directory (a restart: empty L1, index rebuilt from disk) and
//!    retrieves every document; every chunk comes from disk.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kvtier::{Engine, EngineConfig};
use serde::Serialize;
use tracing::{info, warn};

use super::buffers::{AlignedBuf, SourceRing, GIB};
use super::report::{gbps, human_bytes};
use super::{stream, BenchArgs, ModelShape};

/// Chunks a store may have in flight to disk before the bench waits for acknowledgements.
const WINDOW: usize = 8;

/// The JSON report of the disk scenario.
#[derive(Debug, Serialize)]
struct DiskReport {
    workload: &'static str,
    config: DiskConfig,
    baseline: DiskBaseline,
    results: DiskResults,
    ratios: DiskRatios,
    wall_secs: f64,
    engine_write: kvtier::EngineStats,
    engine_read: kvtier::EngineStats,
}

#[derive(Debug, Serialize)]
struct DiskConfig {
    model: String,
    layout: String,
    chunk_bytes: usize,
    chunks: usize,
    docs: usize,
    doc_tokens: usize,
    disk_dir: PathBuf,
    disk_only: bool,
    l1_bytes: u64,
    window_chunks: usize,
}

#[derive(Debug, Serialize)]
struct DiskBaseline {
    /// Sequential O_DIRECT writes, one file per chunk, GB/s.
    disk_write_gbps: f64,
    /// Same with fdatasync after each file, GB/s.
    disk_write_durable_gbps: f64,
    /// Sequential O_DIRECT reads of those files, GB/s.
    disk_read_gbps: f64,
    /// Whether the filesystem accepted O_DIRECT (else buffered I/O was measured).
    direct_io: bool,
    io_bytes: usize,
}

#[derive(Debug, Serialize)]
struct DiskResults {
    /// Stored bytes / time until every chunk was acknowledged durable, GB/s.
    disk_write_gbps: f64,
    /// Bytes retrieved from disk after a restart / retrieve time, GB/s.
    disk_read_gbps: f64,
    chunks_acknowledged: usize,
    chunks_skipped: usize,
    restart_hit_chunks: usize,
    restart_hit_rate: f64,
    restart_open_ms: f64,
    tier_hits: std::collections::BTreeMap<String, u64>,
    verified_chunks: usize,
}

#[derive(Debug, Serialize)]
struct DiskRatios {
    /// Engine durable writes / O_DIRECT sequential writes.
    disk_write: f64,
    /// Engine durable writes / O_DIRECT + fdatasync writes.
    disk_write_vs_durable: f64,
    /// Engine reads / O_DIRECT sequential reads.
    disk_read: f64,
}

fn open_direct(path: &Path, write: bool) -> std::io::Result<(File, bool)> {
    let mut o = OpenOptions::new();
    if write {
        o.write(true).create(true).truncate(true);
    } else {
        o.read(true);
    }
    match o.clone().custom_flags(libc::O_DIRECT).open(path) {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok((o.open(path)?, false)),
        Err(e) => Err(e),
    }
}

/// fio-like baseline: `n` files of `buf.len()` bytes, one I/O each.
fn baseline(dir: &Path, buf: &mut AlignedBuf, n: usize) -> Result<DiskBaseline> {
    let base = dir.join("baseline");
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    let len = buf.len();
    let mut direct = true;
    let mut pass = |durable: bool, tag: &str| -> Result<f64> {
        let t0 = Instant::now();
        for i in 0..n {
            let (f, d) = open_direct(&base.join(format!("{tag}.{i}")), true)?;
            direct &= d;
            f.write_all_at(&buf[..], 0)?;
            if durable {
                f.sync_data()?;
            }
        }
        Ok(gbps((n * len) as u64, t0.elapsed().as_secs_f64()))
    };
    let write = pass(false, "w")?;
    let durable = pass(true, "d")?;
    let t0 = Instant::now();
    for i in 0..n {
        let (f, _) = open_direct(&base.join(format!("w.{i}")), false)?;
        f.read_exact_at(&mut buf[..], 0)?;
    }
    let read = gbps((n * len) as u64, t0.elapsed().as_secs_f64());
    // The files stay until the run ends: deleting them now (with `discard` mounts) would
    // put their discard work inside the engine's timed writes.
    Ok(DiskBaseline {
        disk_write_gbps: write,
        disk_write_durable_gbps: durable,
        disk_read_gbps: read,
        direct_io: direct,
        io_bytes: len,
    })
}

fn doc_tokens(doc: usize, n: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (doc as u32).wrapping_mul(7_919_993) ^ i)
        .collect()
}

fn engine_config(
    args: &BenchArgs,
    dir: &Path,
    data_bytes: u64,
    chunk_bytes: usize,
) -> Result<EngineConfig> {
    let mut cfg =
        EngineConfig::load(args.config.as_deref()).context("loading the engine config")?;
    // L1 smaller than the working set (a quarter of it, at least the write window twice).
    let l1 = match args.l1_gb {
        Some(gb) => (gb * GIB as f64) as u64,
        None => (data_bytes / 4).max((4 * WINDOW * chunk_bytes) as u64),
    };
    let pairs = [
        ("local_disk", dir.display().to_string()),
        (
            "max_local_disk_size",
            format!("{}B", 2 * data_bytes + (64 << 20)),
        ),
        ("max_local_cpu_size", format!("{l1}B")),
        ("local_cpu", (!args.disk_only).to_string()),
        ("local_cpu_prefault", "true".into()),
    ];
    cfg.apply_pairs(pairs.iter().map(|(k, v)| (*k, v.as_str())))?;
    Ok(cfg)
}

/// Runs the disk scenario.
pub fn run(args: &BenchArgs) -> Result<()> {
    let t_all = Instant::now();
    let shape = ModelShape::resolve(args)?;
    let layout = shape.layout();
    let chunk_size = args.chunk_size.unwrap_or(256);
    let chunk_bytes = layout.chunk_bytes(chunk_size);
    ensure!(
        args.doc_tokens >= chunk_size,
        "--doc-tokens must be at least one chunk"
    );
    let chunks_per_doc = args.doc_tokens / chunk_size;
    let docs = args.docs.unwrap_or_else(|| (64 / chunks_per_doc).max(1));
    let chunks = docs * chunks_per_doc;
    let data_bytes = (chunks * chunk_bytes) as u64;
    let dir = match &args.disk_dir {
        Some(d) => d.clone(),
        None => std::env::current_dir()?.join("kvtier-bench-disk"),
    };
    if dir.exists() && std::fs::read_dir(&dir)?.next().is_some() && args.disk_dir.is_none() {
        bail!(
            "{} exists and is not empty; remove it or pass --disk-dir",
            dir.display()
        );
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    info!(dir = %dir.display(), chunks, bytes = %human_bytes(data_bytes), "disk scenario");

    let ring = SourceRing::new(chunk_bytes, args.seed);
    let mut io = AlignedBuf::new(chunk_bytes);
    io.copy_from_slice(ring.slot(0));
    let baseline = baseline(&dir, &mut io, chunks.min(64))?;
    info!(
        write = format!("{:.2}", baseline.disk_write_gbps),
        durable = format!("{:.2}", baseline.disk_write_durable_gbps),
        read = format!("{:.2}", baseline.disk_read_gbps),
        "O_DIRECT baseline (GB/s)"
    );

    let tier_dir = dir.join("tier");
    let cfg = engine_config(args, &tier_dir, data_bytes, chunk_bytes)?;
    let doc_len = args.doc_tokens;

    // Engine A: store everything, a window of chunks in flight, until all are durable.
    let (streamed, stats_w) = {
        let engine =
            Engine::new(cfg.clone(), shape.identity()).context("building the writer engine")?;
        let streamed = stream::store_documents(
            &engine,
            &ring,
            docs,
            doc_len,
            |d| doc_tokens(d, doc_len),
            WINDOW,
        )?;
        if !engine.flush(Duration::from_secs(120)) {
            warn!("disk writes still queued after 120 s");
        }
        (streamed, engine.stats())
    };
    let (acked, skipped, write_secs) = (streamed.acked, streamed.skipped, streamed.secs);
    let write_gbps = gbps((acked * chunk_bytes) as u64, write_secs);

    // Engine B: restart over the same directory; every read comes from disk.
    let t_open = Instant::now();
    let engine = Engine::new(cfg, shape.identity()).context("reopening the disk tier")?;
    let open_ms = t_open.elapsed().as_secs_f64() * 1e3;
    let mut out = AlignedBuf::new(doc_len * layout.bytes_per_token());
    let (mut hit_chunks, mut verified, mut bytes, mut secs) = (0usize, 0usize, 0u64, 0f64);
    for d in 0..docs {
        let tokens = doc_tokens(d, doc_len);
        let t0 = Instant::now();
        let got = engine.retrieve(&tokens, None, &mut out)?;
        secs += t0.elapsed().as_secs_f64();
        let n = got.hit_tokens / chunk_size;
        hit_chunks += n;
        bytes += (n * chunk_bytes) as u64;
        for i in 0..n {
            if !ring.chunk_matches(d as u64, i, &out[i * chunk_bytes..(i + 1) * chunk_bytes]) {
                bail!("chunk {i} of document {d} read back from disk differs from what was stored");
            }
            verified += 1;
        }
    }
    let stats_r = engine.stats();
    drop(engine);
    if args.disk_dir.is_none() {
        std::fs::remove_dir_all(&dir).ok();
    } else {
        std::fs::remove_dir_all(dir.join("baseline")).ok();
    }
    let read_gbps = gbps(bytes, secs);
    let rel = |x: f64, b: f64| if b > 0.0 { x / b } else { 0.0 };
    let report = DiskReport {
        workload: "disk",
        config: DiskConfig {
            model: shape.name.clone(),
            layout: layout.describe(),
            chunk_bytes,
            chunks,
            docs,
            doc_tokens: doc_len,
            disk_dir: dir,
            disk_only: args.disk_only,
            l1_bytes: stats_w.l1.pool_capacity,
            window_chunks: WINDOW,
        },
        ratios: DiskRatios {
            disk_write: rel(write_gbps, baseline.disk_write_gbps),
            disk_write_vs_durable: rel(write_gbps, baseline.disk_write_durable_gbps),
            disk_read: rel(read_gbps, baseline.disk_read_gbps),
        },
        baseline,
        results: DiskResults {
            disk_write_gbps: write_gbps,
            disk_read_gbps: read_gbps,
            chunks_acknowledged: acked,
            chunks_skipped: skipped,
            restart_hit_chunks: hit_chunks,
            restart_hit_rate: rel(hit_chunks as f64, chunks as f64),
            restart_open_ms: open_ms,
            tier_hits: stats_r
                .tiers
                .iter()
                .map(|t| (t.name.clone(), t.hits))
                .collect(),
            verified_chunks: verified,
        },
        wall_secs: t_all.elapsed().as_secs_f64(),
        engine_write: stats_w,
        engine_read: stats_r,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let r = &report;
        println!(
            "{:<34} {:.3} GB/s (durable: {:.3}, read {:.3})",
            "baseline O_DIRECT write",
            r.baseline.disk_write_gbps,
            r.baseline.disk_write_durable_gbps,
            r.baseline.disk_read_gbps
        );
        println!(
            "{:<34} {:.3} GB/s  ratio {:.2} (vs durable {:.2})",
            "disk tier durable write",
            r.results.disk_write_gbps,
            r.ratios.disk_write,
            r.ratios.disk_write_vs_durable
        );
        println!(
            "{:<34} {:.3} GB/s  ratio {:.2}",
            "disk tier read after restart", r.results.disk_read_gbps, r.ratios.disk_read
        );
        println!(
            "{:<34} {}/{} chunks ({} verified)",
            "restart hits",
            r.results.restart_hit_chunks,
            r.config.chunks,
            r.results.verified_chunks
        );
    }
    Ok(())
}
