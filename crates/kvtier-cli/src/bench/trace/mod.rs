//! `kvtier bench trace`: replays a request trace through the embedded engine and reports
//! the prefix hit rate per tier and the bytes written per tier, next to offline
//! simulations on the same trace and budget: every kvtier policy, the engine's policy
//! given a perfect reuse predictor (what predicting reuse could add), and prefix-aware
//! Belady-OPT (the optimum), so every run says how far the engine is from it.
//!
//! Budgets are in blocks: each block is one chunk with a one-page payload (see
//! [`replay`]); written bytes are also given scaled to the `--model` preset's real chunk
//! size, for SSD wear.

mod format;
mod offline;
mod replay;

use std::path::PathBuf;

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use kvtier::policy::PolicyKind;
use kvtier::EngineConfig;
use tracing::info;

pub use format::{Trace, TraceFormat};
use offline::Outcome;
use replay::{Replay, Setup};

use super::report::human_bytes;
use super::{BenchArgs, ModelShape};

/// Options of `kvtier bench trace`.
#[derive(Clone, Debug, Args)]
pub struct TraceArgs {
    /// Trace workload: the request trace (Mooncake JSONL or kvtier's simple format).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Trace workload: format of `--file`.
    #[arg(long, value_enum, default_value_t = TraceFormat::Auto)]
    pub format: TraceFormat,
    /// Trace workload: tokens per trace block (one chunk per block).
    #[arg(long, default_value_t = 512)]
    pub block_tokens: usize,
    /// Trace workload: cache budget(s) in blocks, comma-separated; one replay each.
    #[arg(long, value_delimiter = ',', default_value = "4000")]
    pub blocks: Vec<u64>,
    /// Trace workload: add a disk tier of `--blocks` blocks under an L1 of
    /// `--l1-share` of that (in `--disk-dir`, default ./kvtier-bench-trace).
    #[arg(long)]
    pub disk: bool,
    /// Trace workload: L1 budget as a share of `--blocks` when `--disk` is on.
    #[arg(long, default_value_t = 0.25)]
    pub l1_share: f64,
    /// Trace workload: honour the trace's timestamps, sped up this many times (default:
    /// as fast as possible, each request's writes finished before the next one).
    #[arg(long)]
    pub speed: Option<f64>,
    /// Trace workload: eviction policy of every tier [default: the config's cache_policy].
    #[arg(long)]
    pub policy: Option<PolicyKind>,
}

/// One budget's results.
#[derive(Clone, Debug, serde::Serialize)]
struct Run {
    blocks: u64,
    l1_blocks: u64,
    disk_blocks: Option<u64>,
    policy: String,
    engine: Replay,
    /// Offline simulations on a single cache of `blocks` blocks: each policy, the engine's
    /// policy with a reuse oracle (`<policy>+oracle`), then `opt`.
    offline: Vec<(String, Outcome)>,
}

#[derive(serde::Serialize)]
struct TraceInfo {
    file: String,
    format: String,
    requests: usize,
    references: u64,
    unique_blocks: usize,
    ceiling: f64,
    block_tokens: usize,
    replay_block_bytes: u64,
    scaled_block_bytes: u64,
    scaled_model: String,
    speed: Option<f64>,
}

#[derive(serde::Serialize)]
struct TraceReport {
    trace: TraceInfo,
    runs: Vec<Run>,
}

/// Runs `kvtier bench trace`.
pub fn run(args: &BenchArgs) -> Result<()> {
    let t = &args.trace;
    let Some(file) = &t.file else {
        bail!("the trace workload needs --file <trace.jsonl> (Mooncake JSONL or kvtier's simple format)");
    };
    ensure!(
        !t.blocks.is_empty() && t.blocks.iter().all(|&b| b > 0),
        "--blocks must be positive"
    );
    ensure!(
        t.l1_share > 0.0 && t.l1_share <= 1.0,
        "--l1-share must be in (0, 1]"
    );
    if let Some(s) = t.speed {
        ensure!(
            s > 0.0 && s.is_finite(),
            "--speed must be a positive number"
        );
    }
    let mut base =
        EngineConfig::load(args.config.as_deref()).context("loading the engine config")?;
    if let Some(p) = t.policy {
        base.cache_policy = p;
    }
    let trace = Trace::read(file, t.format, t.block_tokens)?;
    let shape = ModelShape::resolve(args)?;
    let info = TraceInfo {
        file: file.display().to_string(),
        format: format!("{:?}", trace.format).to_lowercase(),
        requests: trace.requests.len(),
        references: trace.references(),
        unique_blocks: trace.unique_blocks,
        ceiling: trace.ceiling(),
        block_tokens: trace.block_tokens,
        replay_block_bytes: replay::l1_bytes_per_block(trace.block_tokens),
        scaled_block_bytes: shape.layout().chunk_bytes(trace.block_tokens) as u64,
        scaled_model: shape.name.clone(),
        speed: t.speed,
    };
    info!(
        requests = info.requests,
        references = info.references,
        unique_blocks = info.unique_blocks,
        ceiling = format!("{:.1}%", 100.0 * info.ceiling),
        "trace loaded"
    );
    let disk_root = match (&args.disk_dir, t.disk) {
        (_, false) => None,
        (Some(d), true) => Some((d.clone(), false)),
        (None, true) => {
            let d = std::env::current_dir()?.join("kvtier-bench-trace");
            if d.exists() && std::fs::read_dir(&d)?.next().is_some() {
                bail!(
                    "{} exists and is not empty; remove it or pass --disk-dir",
                    d.display()
                );
            }
            Some((d, true))
        }
    };
    if let Some((d, _)) = &disk_root {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut runs = Vec::new();
    for &blocks in &t.blocks {
        runs.push(run_one(
            &trace,
            &base,
            t,
            blocks,
            disk_root.as_ref().map(|d| &d.0),
        )?);
    }
    if let Some((d, true)) = &disk_root {
        std::fs::remove_dir_all(d).ok();
    }
    let report = TraceReport { trace: info, runs };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn run_one(
    trace: &Trace,
    base: &EngineConfig,
    t: &TraceArgs,
    blocks: u64,
    disk_root: Option<&PathBuf>,
) -> Result<Run> {
    let unfull = base.save_unfull_chunk;
    let (l1_blocks, disk) = match disk_root {
        None => (blocks, None),
        Some(root) => {
            let dir = root.join(format!("blocks-{blocks}"));
            ensure!(
                !dir.exists(),
                "{} exists; the replay needs an empty disk tier",
                dir.display()
            );
            let l1 = ((blocks as f64 * t.l1_share).round() as u64).max(1);
            (l1, Some((blocks, dir)))
        }
    };
    let setup = Setup {
        base: base.clone(),
        l1_blocks,
        disk: disk.clone(),
        speed: t.speed,
    };
    info!(blocks, l1_blocks, disk = disk.is_some(), policy = %base.cache_policy, "replaying");
    let engine = replay::replay(trace, &setup);
    if let Some((_, dir)) = &disk {
        std::fs::remove_dir_all(dir).ok();
    }
    let engine = engine?;
    let cap = blocks as usize;
    let mut offline: Vec<(String, Outcome)> = PolicyKind::ALL
        .iter()
        .map(|k| (k.to_string(), offline::simulate(trace, cap, *k, unfull)))
        .collect();
    offline.push((
        format!("{}+oracle", base.cache_policy),
        offline::simulate_with_reuse_oracle(trace, cap, base.cache_policy, unfull),
    ));
    offline.push(("opt".into(), offline::belady(trace, cap, unfull)));
    info!(
        blocks,
        hit = format!("{:.2}%", 100.0 * engine.hit_rate()),
        secs = format!("{:.1}", engine.secs),
        "replayed"
    );
    Ok(Run {
        blocks,
        l1_blocks,
        disk_blocks: disk.map(|d| d.0),
        policy: base.cache_policy.to_string(),
        engine,
        offline,
    })
}

/// Width of an offline column: its name, at least 11.
fn column_width(name: &str) -> usize {
    name.len().max(11)
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

fn print_table(r: &TraceReport) {
    let i = &r.trace;
    println!(
        "trace    {} ({}): {} requests, {} block references, {} distinct blocks; every repeat hitting: {}",
        i.file,
        i.format,
        i.requests,
        i.references,
        i.unique_blocks,
        pct(i.ceiling)
    );
    println!(
        "replay   one chunk of {} tokens per block, {} payload (budgets in blocks; bytes scaled to {}: {} per block); {}",
        i.block_tokens,
        human_bytes(i.replay_block_bytes),
        i.scaled_model,
        human_bytes(i.scaled_block_bytes),
        match i.speed {
            Some(s) => format!("timestamps honoured at {s}x"),
            None => "each request's writes finished before the next".into(),
        }
    );
    let names: Vec<&str> = r
        .runs
        .first()
        .map(|run| run.offline.iter().map(|o| o.0.as_str()).collect())
        .unwrap_or_default();
    println!();
    println!(
        "{:>7} {:>16} {:>12} | {:>7} {:>7} {:>7} | {} | written per tier, scaled",
        "blocks",
        "tiers",
        "policy",
        "hit L1",
        "disk",
        "total",
        names
            .iter()
            .map(|n| format!("{n:>w$}", w = column_width(n)))
            .collect::<Vec<_>>()
            .join(" ")
    );
    for run in &r.runs {
        let e = &run.engine;
        let tiers = match run.disk_blocks {
            Some(d) => format!("L1 {} + disk {d}", run.l1_blocks),
            None => format!("L1 {}", run.l1_blocks),
        };
        let lower: f64 = (1..e.hits_per_tier.len())
            .map(|t| e.tier_rate(Some(t)))
            .sum();
        let written = e
            .tiers
            .iter()
            .zip(&e.written_chunks)
            .map(|(n, &c)| format!("{n} {}", human_bytes(c * i.scaled_block_bytes)))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "{:>7} {:>16} {:>12} | {:>7} {:>7} {:>7} | {} | {}",
            run.blocks,
            tiers,
            run.policy,
            pct(e.tier_rate(Some(0))),
            if e.hits_per_tier.len() > 1 {
                pct(lower)
            } else {
                "-".into()
            },
            pct(e.hit_rate()),
            run.offline
                .iter()
                .map(|o| format!("{:>w$}", pct(o.1.rate()), w = column_width(&o.0)))
                .collect::<Vec<_>>()
                .join(" "),
            written
        );
    }
    println!();
    println!("offline columns: one cache of `blocks` blocks fed the same requests (prefix hits only); <policy>+oracle = stores only blocks the trace references again; opt = prefix-aware Belady-OPT");
    for run in &r.runs {
        let e = &run.engine;
        let mut notes = vec![format!("{:.1} s", e.secs)];
        for (why, n) in &e.store_skipped {
            notes.push(format!("{n} chunk stores skipped ({why})"));
        }
        if let Some((p50, p99)) = e.late_ms {
            notes.push(format!(
                "requests started late by p50 {p50:.0} ms, p99 {p99:.0} ms"
            ));
        }
        println!("{:>7}: {}", run.blocks, notes.join("; "));
    }
}

#[cfg(test)]
mod tests;
