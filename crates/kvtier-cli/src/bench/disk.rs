//! `kvtier bench disk`: the disk tier against the device, measured in the same run.
//!
//! Each round has two passes over the same directory, with the same bytes and I/O size:
//! - **baseline**: one file per chunk written sequentially with `O_DIRECT` (fio-like
//!   `direct=1`), the same with `fdatasync` per file (the least an acknowledged store
//!   costs), and `O_DIRECT` reads of the first set;
//! - **engine**: engine A stores the documents with the disk tier (L1 smaller than the
//!   working set, or `--disk-only`: L1 only stages I/O), timed until every chunk is
//!   acknowledged durable; engine B opens the same directory (a restart: empty L1, index
//!   rebuilt from disk) and retrieves every document from disk.
//!
//! Why rounds in alternating order: on a virtual disk the host's write cache absorbs the
//! first gigabytes after an idle period and then throttles, so whichever pass runs first
//! looks faster. Rounds alternate baseline-first and engine-first, ratios are taken per
//! round (both passes saw the same device state) and the report gives min/median/max.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kvtier::{Engine, EngineConfig, EngineStats};
use serde::Serialize;
use tracing::{info, warn};

use super::buffers::{AlignedBuf, SourceRing, GIB};
use super::report::{gbps, human_bytes, median, Spread, WriteAmplification};
use super::{scratch, stream, BenchArgs, ModelShape};

/// Chunks a store may have in flight to disk before the bench waits for acknowledgements.
const WINDOW: usize = 8;

/// The JSON report of the disk scenario.
#[derive(Debug, Serialize)]
struct DiskReport {
    workload: &'static str,
    config: DiskConfig,
    /// Medians over the rounds.
    baseline: DiskBaseline,
    /// Medians over the rounds (counts from the last round).
    results: DiskResults,
    /// Medians of the per-round ratios.
    ratios: DiskRatios,
    /// Min/median/max over the rounds of every number above.
    spread: DiskSpread,
    rounds: Vec<DiskRound>,
    wall_secs: f64,
    engine_write: EngineStats,
    engine_read: EngineStats,
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
    reps: usize,
    /// What an acknowledged store survives (`local_disk_durability`).
    durability: kvtier::tier::DiskDurability,
}

#[derive(Clone, Debug, Serialize)]
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

#[derive(Clone, Debug, Serialize)]
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
    /// The writer's lower-tier writes per distinct chunk stored.
    writes_per_unique_chunk: WriteAmplification,
}

#[derive(Clone, Debug, Serialize)]
struct DiskRatios {
    /// Engine durable writes / O_DIRECT sequential writes.
    disk_write: f64,
    /// Engine durable writes / O_DIRECT + fdatasync writes.
    disk_write_vs_durable: f64,
    /// Engine reads / O_DIRECT sequential reads.
    disk_read: f64,
}

/// One round: which pass ran first and what both measured.
#[derive(Debug, Serialize)]
struct DiskRound {
    baseline_first: bool,
    baseline: DiskBaseline,
    results: DiskResults,
    ratios: DiskRatios,
}

#[derive(Debug, Serialize)]
struct DiskSpread {
    baseline_write_gbps: Spread,
    baseline_write_durable_gbps: Spread,
    baseline_read_gbps: Spread,
    disk_write_gbps: Spread,
    disk_read_gbps: Spread,
    ratio_disk_write: Spread,
    ratio_disk_write_vs_durable: Spread,
    ratio_disk_read: Spread,
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

/// fio-like baseline in `base`: `n` files of `buf.len()` bytes, one I/O each.
fn baseline(base: &Path, buf: &mut AlignedBuf, n: usize) -> Result<DiskBaseline> {
    std::fs::create_dir_all(base).with_context(|| format!("creating {}", base.display()))?;
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

/// What the engine pass of one round measured.
struct EnginePass {
    results: DiskResults,
    stats_w: EngineStats,
    stats_r: EngineStats,
}

/// The workload's fixed parameters.
struct Workload<'a> {
    args: &'a BenchArgs,
    shape: ModelShape,
    ring: SourceRing,
    docs: usize,
    doc_len: usize,
    chunk_size: usize,
    chunk_bytes: usize,
    chunks: usize,
    data_bytes: u64,
}

impl Workload<'_> {
    /// Engine A stores everything into `tier_dir` (a window of chunks in flight) until all
    /// are durable; engine B reopens the directory and reads everything back.
    fn engine_pass(&self, tier_dir: &Path) -> Result<EnginePass> {
        let cfg = engine_config(self.args, tier_dir, self.data_bytes, self.chunk_bytes)?;
        let doc_len = self.doc_len;
        let (streamed, stats_w) = {
            let engine = Engine::new(cfg.clone(), self.shape.identity())
                .context("building the writer engine")?;
            let streamed = stream::store_documents(
                &engine,
                &self.ring,
                None,
                self.docs,
                doc_len,
                |d| doc_tokens(d, doc_len),
                WINDOW,
            )?;
            if !engine.flush(Duration::from_secs(120)) {
                warn!("disk writes still queued after 120 s");
            }
            (streamed, engine.stats())
        };
        let (acked, skipped) = (streamed.acked, streamed.skipped);
        let write_gbps = gbps((acked * self.chunk_bytes) as u64, streamed.secs);

        let t_open = Instant::now();
        let engine = Engine::new(cfg, self.shape.identity()).context("reopening the disk tier")?;
        let open_ms = t_open.elapsed().as_secs_f64() * 1e3;
        let layout = self.shape.layout();
        let mut out = AlignedBuf::new(doc_len * layout.bytes_per_token());
        let (mut hit_chunks, mut verified, mut bytes, mut secs) = (0usize, 0usize, 0u64, 0f64);
        let cb = self.chunk_bytes;
        for d in 0..self.docs {
            let tokens = doc_tokens(d, doc_len);
            let t0 = Instant::now();
            let got = engine.retrieve(&tokens, None, &mut out)?;
            secs += t0.elapsed().as_secs_f64();
            let n = got.hit_tokens / self.chunk_size;
            hit_chunks += n;
            bytes += (n * cb) as u64;
            for i in 0..n {
                if !self
                    .ring
                    .chunk_matches(d as u64, i, &out[i * cb..(i + 1) * cb])
                {
                    bail!("chunk {i} of document {d} read back from disk differs from what was stored");
                }
                verified += 1;
            }
        }
        let stats_r = engine.stats();
        let results = DiskResults {
            disk_write_gbps: write_gbps,
            disk_read_gbps: gbps(bytes, secs),
            chunks_acknowledged: acked,
            chunks_skipped: skipped,
            restart_hit_chunks: hit_chunks,
            restart_hit_rate: hit_chunks as f64 / self.chunks.max(1) as f64,
            restart_open_ms: open_ms,
            tier_hits: stats_r
                .tiers
                .iter()
                .map(|t| (t.name.clone(), t.hits))
                .collect(),
            verified_chunks: verified,
            writes_per_unique_chunk: WriteAmplification::of(&stats_w, streamed.unique_chunks),
        };
        Ok(EnginePass {
            results,
            stats_w,
            stats_r,
        })
    }
}

/// Removes a round's files and waits until the filesystem has settled, so that neither
/// the deletion nor its discards land inside the next round's timed passes.
fn clean_round(dir: &Path) {
    std::fs::remove_dir_all(dir).ok();
    if let Ok(f) = File::open(dir.parent().unwrap_or(dir)) {
        // SAFETY: syncfs only reads the descriptor, which `f` keeps open.
        unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f)) };
    }
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
    ensure!(args.reps >= 1, "--reps must be at least 1");
    let chunks_per_doc = args.doc_tokens / chunk_size;
    let docs = args.docs.unwrap_or_else(|| (64 / chunks_per_doc).max(1));
    let chunks = docs * chunks_per_doc;
    let data_bytes = (chunks * chunk_bytes) as u64;
    // Everything the bench writes is in `dir` and removed with it: under `--disk-dir`, a
    // directory of its own (the given one may hold anything, `round-0/` included).
    let dir = match &args.disk_dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            let own = d.join(scratch::run_id());
            std::fs::create_dir(&own).with_context(|| format!("creating {}", own.display()))?;
            own
        }
        None => std::env::current_dir()?.join("kvtier-bench-disk"),
    };
    if dir.exists() && std::fs::read_dir(&dir)?.next().is_some() && args.disk_dir.is_none() {
        bail!(
            "{} exists and is not empty; remove it or pass --disk-dir",
            dir.display()
        );
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    info!(dir = %dir.display(), chunks, bytes = %human_bytes(data_bytes), reps = args.reps, "disk scenario");

    let w = Workload {
        args,
        ring: SourceRing::new(chunk_bytes, args.seed),
        shape,
        docs,
        doc_len: args.doc_tokens,
        chunk_size,
        chunk_bytes,
        chunks,
        data_bytes,
    };
    let durability = engine_config(args, &dir, data_bytes, chunk_bytes)?.local_disk_durability;
    let mut io = AlignedBuf::new(chunk_bytes);
    io.copy_from_slice(w.ring.slot(0));
    let rel = |x: f64, b: f64| if b > 0.0 { x / b } else { 0.0 };
    let mut rounds = Vec::new();
    let mut last = None;
    for r in 0..args.reps {
        let round_dir = dir.join(format!("round-{r}"));
        let baseline_first = r % 2 == 0;
        std::fs::create_dir_all(&round_dir)
            .with_context(|| format!("creating {}", round_dir.display()))?;
        let mut base = None;
        let mut pass = None;
        for step in 0..2 {
            if (step == 0) == baseline_first {
                base = Some(baseline(&round_dir.join("baseline"), &mut io, chunks)?);
            } else {
                pass = Some(w.engine_pass(&round_dir.join("tier"))?);
            }
        }
        let (Some(base), Some(pass)) = (base, pass) else {
            bail!("round {r} did not run both passes");
        };
        let ratios = DiskRatios {
            disk_write: rel(pass.results.disk_write_gbps, base.disk_write_gbps),
            disk_write_vs_durable: rel(pass.results.disk_write_gbps, base.disk_write_durable_gbps),
            disk_read: rel(pass.results.disk_read_gbps, base.disk_read_gbps),
        };
        info!(
            round = r,
            baseline_first,
            baseline_write = format!("{:.2}", base.disk_write_gbps),
            baseline_durable = format!("{:.2}", base.disk_write_durable_gbps),
            baseline_read = format!("{:.2}", base.disk_read_gbps),
            tier_write = format!("{:.2}", pass.results.disk_write_gbps),
            tier_read = format!("{:.2}", pass.results.disk_read_gbps),
            "round done (GB/s)"
        );
        rounds.push(DiskRound {
            baseline_first,
            baseline: base,
            results: pass.results.clone(),
            ratios,
        });
        last = Some(pass);
        clean_round(&round_dir);
    }
    std::fs::remove_dir_all(&dir).ok();
    let Some(last) = last else {
        bail!("no round ran");
    };
    let col = |f: fn(&DiskRound) -> f64| rounds.iter().map(f).collect::<Vec<_>>();
    let spread = DiskSpread {
        baseline_write_gbps: Spread::of(&col(|r| r.baseline.disk_write_gbps)),
        baseline_write_durable_gbps: Spread::of(&col(|r| r.baseline.disk_write_durable_gbps)),
        baseline_read_gbps: Spread::of(&col(|r| r.baseline.disk_read_gbps)),
        disk_write_gbps: Spread::of(&col(|r| r.results.disk_write_gbps)),
        disk_read_gbps: Spread::of(&col(|r| r.results.disk_read_gbps)),
        ratio_disk_write: Spread::of(&col(|r| r.ratios.disk_write)),
        ratio_disk_write_vs_durable: Spread::of(&col(|r| r.ratios.disk_write_vs_durable)),
        ratio_disk_read: Spread::of(&col(|r| r.ratios.disk_read)),
    };
    let direct_io = rounds.iter().all(|r| r.baseline.direct_io);
    let report = DiskReport {
        workload: "disk",
        config: DiskConfig {
            model: w.shape.name.clone(),
            layout: layout.describe(),
            chunk_bytes,
            chunks,
            docs,
            doc_tokens: w.doc_len,
            disk_dir: dir,
            disk_only: args.disk_only,
            l1_bytes: last.stats_w.l1.pool_capacity,
            window_chunks: WINDOW,
            reps: args.reps,
            durability,
        },
        baseline: DiskBaseline {
            disk_write_gbps: spread.baseline_write_gbps.median,
            disk_write_durable_gbps: spread.baseline_write_durable_gbps.median,
            disk_read_gbps: spread.baseline_read_gbps.median,
            direct_io,
            io_bytes: chunk_bytes,
        },
        results: DiskResults {
            disk_write_gbps: spread.disk_write_gbps.median,
            disk_read_gbps: spread.disk_read_gbps.median,
            restart_open_ms: median(&col(|r| r.results.restart_open_ms)),
            ..last.results.clone()
        },
        ratios: DiskRatios {
            disk_write: spread.ratio_disk_write.median,
            disk_write_vs_durable: spread.ratio_disk_write_vs_durable.median,
            disk_read: spread.ratio_disk_read.median,
        },
        spread,
        rounds,
        wall_secs: t_all.elapsed().as_secs_f64(),
        engine_write: last.stats_w,
        engine_read: last.stats_r,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let r = &report;
        let s = &r.spread;
        println!(
            "{} rounds of {} x {} chunks, acknowledged stores survive {:?}; GB/s and ratios as min / median / max",
            r.config.reps,
            r.config.chunks,
            human_bytes(r.config.chunk_bytes as u64),
            r.config.durability
        );
        println!(
            "{:<34} {}",
            "baseline O_DIRECT write", s.baseline_write_gbps
        );
        println!(
            "{:<34} {}",
            "baseline O_DIRECT write+fdatasync", s.baseline_write_durable_gbps
        );
        println!("{:<34} {}", "baseline O_DIRECT read", s.baseline_read_gbps);
        println!(
            "{:<34} {}  ratio {} (vs durable {})",
            "disk tier write (until acknowledged)",
            s.disk_write_gbps,
            s.ratio_disk_write,
            s.ratio_disk_write_vs_durable
        );
        println!(
            "{:<34} {}  ratio {}",
            "disk tier read after restart", s.disk_read_gbps, s.ratio_disk_read
        );
        println!(
            "{:<34} {}/{} chunks ({} verified, last round)",
            "restart hits",
            r.results.restart_hit_chunks,
            r.config.chunks,
            r.results.verified_chunks
        );
    }
    Ok(())
}
