//! `kvtier bench sweep`: long-doc-qa as the document set grows from 0.5x to 4x the L1
//! budget, once with L1 only and once with a disk tier behind it. The hit-rate curve shows
//! where L1 stops holding the set and where the disk tier takes over.

use std::time::Instant;

use anyhow::{Context, Result};
use kvtier::Engine;
use serde::Serialize;
use tracing::info;

use super::buffers::SourceRing;
use super::{engine_config, plot, workload, BenchArgs, ModelShape, Plan, WorkloadKind};

/// Document-set sizes, as multiples of the L1 budget.
const FACTORS: [f64; 6] = [0.5, 1.0, 1.5, 2.0, 3.0, 4.0];

#[derive(Debug, Serialize)]
struct Point {
    factor: f64,
    disk: bool,
    docs: usize,
    hit_rate: f64,
    store_gbps: f64,
    retrieve_gbps: Option<f64>,
    tier_hits: std::collections::BTreeMap<String, u64>,
    writes_per_unique_chunk: super::report::WriteAmplification,
    secs: f64,
}

#[derive(Debug, Serialize)]
struct SweepReport {
    workload: &'static str,
    model: String,
    l1_bytes: u64,
    doc_tokens: usize,
    doc_bytes: usize,
    queries_per_doc: usize,
    points: Vec<Point>,
    wall_secs: f64,
}

/// Runs the sweep.
pub fn run(args: &BenchArgs) -> Result<()> {
    let t0 = Instant::now();
    let shape = ModelShape::resolve(args)?;
    let mut base_args = args.clone();
    // A smaller L1 and shorter documents than the single runs, so 12 runs stay quick.
    if base_args.l1_gb.is_none() {
        base_args.l1_gb = Some(0.5);
    }
    if args.doc_tokens == 8192 {
        base_args.doc_tokens = 1024;
    }
    let cfg = engine_config(&base_args)?;
    let layout = shape.layout();
    let ring = SourceRing::new(layout.chunk_bytes(cfg.chunk_size), args.seed);
    let disk_root = tempfile_dir()?;
    let mut points = Vec::new();
    for disk in [false, true] {
        for &factor in &FACTORS {
            let tp = Instant::now();
            let mut plan = Plan::new(&base_args, &layout, &cfg)?;
            plan.workload = WorkloadKind::LongDocQa;
            plan.docs = ((factor * cfg.max_local_cpu_size as f64) / plan.doc_bytes as f64)
                .ceil()
                .max(1.0) as usize;
            plan.sync_stores = disk;
            let mut c = cfg.clone();
            if disk {
                let dir = disk_root.join(format!("x{factor}"));
                let pairs = [
                    ("local_disk", dir.display().to_string()),
                    (
                        "max_local_disk_size",
                        format!("{}B", 5 * cfg.max_local_cpu_size),
                    ),
                ];
                c.apply_pairs(pairs.iter().map(|(k, v)| (*k, v.as_str())))?;
            }
            let engine = Engine::new(c, shape.identity()).context("building a sweep engine")?;
            let mut r = workload::long_doc_qa(&engine, &plan, &ring)?;
            workload::fill_engine_counters(&mut r, &engine.stats());
            drop(engine);
            let point = Point {
                factor,
                disk,
                docs: plan.docs,
                hit_rate: r.hit_rate,
                store_gbps: r.store_gbps,
                retrieve_gbps: r.retrieve_gbps,
                tier_hits: r.tier_hits,
                writes_per_unique_chunk: r.writes_per_unique_chunk,
                secs: tp.elapsed().as_secs_f64(),
            };
            info!(
                factor,
                disk,
                hit_rate = format!("{:.3}", point.hit_rate),
                "sweep point"
            );
            points.push(point);
        }
    }
    std::fs::remove_dir_all(&disk_root).ok();
    let report = SweepReport {
        workload: "sweep",
        model: shape.name.clone(),
        l1_bytes: cfg.max_local_cpu_size,
        doc_tokens: base_args.doc_tokens,
        doc_bytes: base_args.doc_tokens * layout.bytes_per_token(),
        queries_per_doc: args.queries,
        points,
        wall_secs: t0.elapsed().as_secs_f64(),
    };
    if let Some(dir) = &args.plot {
        write_plots(dir, &report)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{:<8} {:<6} {:>6} {:>9} {:>12} {:>14}",
            "set/L1", "disk", "docs", "hit rate", "store GB/s", "retrieve GB/s"
        );
        for p in &report.points {
            println!(
                "{:<8} {:<6} {:>6} {:>9.3} {:>12.2} {:>14.2}",
                p.factor,
                p.disk,
                p.docs,
                p.hit_rate,
                p.store_gbps,
                p.retrieve_gbps.unwrap_or(0.0)
            );
        }
    }
    Ok(())
}

fn series(r: &SweepReport, disk: bool, f: impl Fn(&Point) -> f64) -> plot::Series {
    plot::Series {
        name: if disk {
            "L1 + disk".into()
        } else {
            "L1 only".into()
        },
        points: r
            .points
            .iter()
            .filter(|p| p.disk == disk)
            .map(|p| (p.factor, f(p)))
            .collect(),
    }
}

fn write_plots(dir: &std::path::Path, r: &SweepReport) -> Result<()> {
    let hit = plot::LineChart {
        title: format!("long-doc-qa hit rate vs document set size ({})", r.model),
        x_label: "document set / L1 budget".into(),
        y_label: "hit rate".into(),
        series: vec![
            series(r, false, |p| p.hit_rate),
            series(r, true, |p| p.hit_rate),
        ],
        y_range: Some((0.0, 1.0)),
    };
    plot::write(dir, "sweep_hit_rate.svg", &hit.to_svg())?;
    let thr = plot::LineChart {
        title: "retrieve throughput vs document set size".into(),
        x_label: "document set / L1 budget".into(),
        y_label: "GB/s".into(),
        series: vec![
            series(r, false, |p| p.retrieve_gbps.unwrap_or(0.0)),
            series(r, true, |p| p.retrieve_gbps.unwrap_or(0.0)),
        ],
        y_range: None,
    };
    plot::write(dir, "sweep_throughput.svg", &thr.to_svg())
}

/// A fresh directory for the disk tiers of the sweep, on the working directory's device.
fn tempfile_dir() -> Result<std::path::PathBuf> {
    let d = std::env::current_dir()?.join(format!("kvtier-sweep-{}", std::process::id()));
    // Exclusive: the directory is removed at the end, so it must be this run's.
    std::fs::create_dir(&d).with_context(|| format!("creating {}", d.display()))?;
    Ok(d)
}
