//! `kvtier bench`: synthetic serving workloads against an embedded engine, reported next to
//! a memcpy baseline measured in the same run.
//!
//! Phases: build the synthetic source ring, measure memcpy, run the lookup micro phase on
//! a small side engine, build the bench engine (prefaulted, so page faults are not timed),
//! run the workload, report.

mod baseline;
mod buffers;
mod chunk_size;
mod disk;
mod events_ab;
mod l1;
mod micro;
mod plot;
mod remote;
mod report;
mod scratch;
mod server;
mod stream;
mod sweep;
mod trace;
mod workload;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use clap::{Args, ValueEnum};
use kvtier::keys::ModelIdentity;
use kvtier::layout::{Dtype, KvLayout};
use kvtier::{Engine, EngineConfig};
use tracing::{info, warn};

use buffers::{SourceRing, GIB};
use report::{ConfigSection, Report, ResultsSection};
use scratch::Scratch;

/// Which synthetic workload to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WorkloadKind {
    /// Long documents stored once, then queried repeatedly in shuffled order.
    LongDocQa,
    /// Fresh random prompts, never reused: measures store overhead against memcpy.
    Random,
    /// The disk tier against same-run O_DIRECT I/O: durable writes, then reads after a
    /// restart (see `--disk-dir`, `--disk-only`).
    Disk,
    /// long-doc-qa as the document set grows from 0.5x to 4x the L1 budget, with and
    /// without a disk tier: where each tier takes over.
    Sweep,
    /// The Redis/Valkey tier (local tiers off) against redis-benchmark on the same server
    /// (see `--remote-url`; default: a redis-server started for the run).
    Remote,
    /// Replays a request trace (`--file`, Mooncake JSONL or the simple format) with budgets
    /// in blocks: prefix hit rate per tier against offline LRU and Belady-OPT.
    Trace,
    /// L1 store and retrieve, one chunk per call, swept over chunk sizes (`--chunk-mib`)
    /// against same-run single-thread memcpy in alternating rounds (`--reps`).
    L1,
    /// Lookup, store and retrieve cost and the recompute lost per hit, swept over chunk
    /// sizes in tokens (`--chunk-sizes`; store/retrieve on a `--l1-gb` working set, default
    /// 1 GiB) in alternating rounds (`--reps`).
    ChunkSize,
}

impl WorkloadKind {
    fn name(self) -> &'static str {
        match self {
            WorkloadKind::LongDocQa => "long-doc-qa",
            WorkloadKind::Random => "random",
            WorkloadKind::Disk => "disk",
            WorkloadKind::Sweep => "sweep",
            WorkloadKind::Remote => "remote",
            WorkloadKind::Trace => "trace",
            WorkloadKind::L1 => "l1",
            WorkloadKind::ChunkSize => "chunk-size",
        }
    }
}

/// Model shape presets (bf16, separate K and V planes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModelPreset {
    /// 32 layers, 8 KV heads, head dim 128: 32 MiB per 256-token chunk.
    #[value(name = "llama3-8b")]
    Llama3_8b,
    /// 36 layers, 8 KV heads, head dim 128.
    #[value(name = "qwen3-8b")]
    Qwen3_8b,
    /// 80 layers, 8 KV heads, head dim 128.
    #[value(name = "llama3-70b")]
    Llama3_70b,
    /// 4 layers, 2 KV heads, head dim 64: for quick tests.
    #[value(name = "tiny")]
    Tiny,
}

impl ModelPreset {
    /// `(layers, kv_heads, head_dim)` of the full (unsharded) model.
    pub fn dims(self) -> (u32, u32, u32) {
        match self {
            ModelPreset::Llama3_8b => (32, 8, 128),
            ModelPreset::Qwen3_8b => (36, 8, 128),
            ModelPreset::Llama3_70b => (80, 8, 128),
            ModelPreset::Tiny => (4, 2, 64),
        }
    }

    /// Name used in reports and as the model identity.
    pub fn name(self) -> &'static str {
        match self {
            ModelPreset::Llama3_8b => "llama3-8b",
            ModelPreset::Qwen3_8b => "qwen3-8b",
            ModelPreset::Llama3_70b => "llama3-70b",
            ModelPreset::Tiny => "tiny",
        }
    }
}

/// Options of `kvtier bench`.
#[derive(Clone, Debug, Args)]
pub struct BenchArgs {
    /// Workload to run.
    #[arg(value_enum)]
    pub workload: WorkloadKind,
    /// Model shape preset.
    #[arg(long, value_enum, default_value_t = ModelPreset::Llama3_8b)]
    pub model: ModelPreset,
    /// Override the preset's layer count.
    #[arg(long)]
    pub layers: Option<u32>,
    /// Override the preset's KV head count (before `--tp` division).
    #[arg(long)]
    pub kv_heads: Option<u32>,
    /// Override the preset's head dimension.
    #[arg(long)]
    pub head_dim: Option<u32>,
    /// Override the dtype (default bf16).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Tensor-parallel degree: each rank holds kv_heads / tp heads (this bench is rank 0)
    /// [default: 1; remote: 8 for the 8-KV-head presets, i.e. 4 MiB chunks].
    #[arg(long)]
    pub tp: Option<u32>,
    /// Engine config file (YAML); `KVTIER_<KEY>` environment overrides apply too.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// L1 (CPU tier) budget in GiB, prefaulted before the run [default: 4 (--model tiny:
    /// 1/16), or the config file's max_local_cpu_size].
    #[arg(long)]
    pub l1_gb: Option<f64>,
    /// Tokens per chunk [default: 256, or the config file's chunk_size].
    #[arg(long)]
    pub chunk_size: Option<usize>,
    /// Documents (long-doc-qa) or requests (random) [default: enough for ~1.5x the L1 budget].
    #[arg(long)]
    pub docs: Option<usize>,
    /// Tokens per document / request.
    #[arg(long, default_value_t = 8192)]
    pub doc_tokens: usize,
    /// Queries per document (long-doc-qa).
    #[arg(long, default_value_t = 2)]
    pub queries: usize,
    /// Seed for tokens, payload bytes and query order.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Disk workload: directory on the device to measure; the bench writes only in a new
    /// subdirectory of it, removed afterwards [default: ./kvtier-bench-disk, removed
    /// afterwards].
    #[arg(long)]
    pub disk_dir: Option<PathBuf>,
    /// Disk workload: no CPU cache at all (L1 only stages I/O).
    #[arg(long)]
    pub disk_only: bool,
    /// Disk and l1 workloads (and long-doc-qa with `--kv-events-ab`): rounds of (baseline,
    /// engine) measured in alternating order; the report gives min/median/max.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// l1 workload: chunk sizes to sweep, in MiB (256-token bf16 chunks of N layers × 8 KV
    /// heads × 128) [default: 1,4,16,32,80].
    #[arg(long, value_delimiter = ',')]
    pub chunk_mib: Vec<usize>,
    /// chunk-size workload: chunk sizes to sweep, in tokens [default:
    /// 16,32,64,128,256,512,1024].
    #[arg(long, value_delimiter = ',')]
    pub chunk_sizes: Vec<usize>,
    /// Write SVG plots (throughput against baselines, lookup latency, hit rate) here
    /// (long-doc-qa, random and sweep; refused by disk and remote).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Remote workload: the Redis/Valkey or kvtier:// URL to measure [default: start a
    /// redis-server].
    #[arg(long)]
    pub remote_url: Option<String>,
    /// Also run the store/retrieve/lookup phase through a `kvtier serve` server at this
    /// address (unix:/path or tcp:host:port) and report it against the embedded engine.
    #[arg(long, conflicts_with = "spawn_server")]
    pub server: Option<String>,
    /// Like `--server`, with a server this bench starts (`kvtier serve`) and stops.
    #[arg(long)]
    pub spawn_server: bool,
    /// long-doc-qa: measure what `kvtier serve`'s KV-event stream costs instead of the
    /// usual report: `--reps` rounds, each running the workload on a fresh engine with the
    /// stream on and off in alternating order; prints the on/off throughput ratios.
    #[arg(long, conflicts_with_all = ["server", "spawn_server", "plot"])]
    pub kv_events_ab: bool,
    /// Options of the trace workload.
    #[command(flatten)]
    pub trace: trace::TraceArgs,
}

/// The resolved per-rank model shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelShape {
    /// Name for reports.
    pub name: String,
    /// Layers.
    pub layers: u32,
    /// KV heads per rank (already divided by `tp`).
    pub kv_heads: u32,
    /// Head dimension.
    pub head_dim: u32,
    /// Element type.
    pub dtype: Dtype,
    /// Tensor-parallel degree.
    pub tp: u32,
}

impl ModelShape {
    /// Applies the preset, the explicit overrides and the TP division.
    pub fn resolve(args: &BenchArgs) -> Result<ModelShape> {
        let (layers, heads, dim) = args.model.dims();
        let kv_heads = args.kv_heads.unwrap_or(heads);
        let tp = args.tp.unwrap_or(1);
        ensure!(tp >= 1, "--tp must be at least 1");
        ensure!(
            kv_heads % tp == 0,
            "--tp {tp} does not divide the {kv_heads} KV heads; pick a TP degree that does"
        );
        let dtype = match &args.dtype {
            Some(d) => Dtype::parse(d)?,
            None => Dtype::Bf16,
        };
        Ok(ModelShape {
            name: args.model.name().to_string(),
            layers: args.layers.unwrap_or(layers),
            kv_heads: kv_heads / tp,
            head_dim: args.head_dim.unwrap_or(dim),
            dtype,
            tp,
        })
    }

    /// Per-rank KV layout.
    pub fn layout(&self) -> KvLayout {
        KvLayout::simple(self.layers, self.kv_heads, self.head_dim, self.dtype)
    }

    /// Identity of rank 0 of `tp`.
    pub fn identity(&self) -> ModelIdentity {
        let mut id = ModelIdentity::new(self.name.clone(), self.layout());
        id.world_size = self.tp;
        id.rank = 0;
        id
    }
}

/// Builds the bench engine's config: file and environment first, then CLI flags.
fn engine_config(args: &BenchArgs) -> Result<EngineConfig> {
    let mut cfg =
        EngineConfig::load(args.config.as_deref()).context("loading the engine config")?;
    let mut pairs: Vec<(&str, String)> = Vec::new();
    if let Some(cs) = args.chunk_size {
        pairs.push(("chunk_size", cs.to_string()));
    }
    match args.l1_gb {
        Some(gb) => {
            ensure!(gb > 0.0, "--l1-gb must be positive");
            pairs.push(("max_local_cpu_size", gb.to_string()));
        }
        // The engine's own default (5 GiB) is not the bench's; only a value the user set
        // in the file or environment wins over the bench default.
        None if cfg.max_local_cpu_size == EngineConfig::default().max_local_cpu_size => {
            pairs.push(("max_local_cpu_size", default_l1_gb(args.model).to_string()));
        }
        None => {}
    }
    // Page faults on first touch of the pool would otherwise be timed as store cost.
    pairs.push(("local_cpu_prefault", "true".into()));
    cfg.apply_pairs(pairs.iter().map(|(k, v)| (*k, v.as_str())))?;
    Ok(cfg)
}

/// The bench's L1 budget in GiB when neither `--l1-gb` nor the config sets one: 4 GiB for
/// the real model shapes, 64 MiB for `tiny` (a quick run: the pool is prefaulted).
fn default_l1_gb(model: ModelPreset) -> f64 {
    match model {
        ModelPreset::Tiny => 1.0 / 16.0,
        _ => 4.0,
    }
}

/// Sizes of the run derived from arguments, shape and config.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Workload.
    pub workload: WorkloadKind,
    /// Tokens per chunk.
    pub chunk_size: usize,
    /// Bytes per full chunk.
    pub chunk_bytes: usize,
    /// KV bytes per token.
    pub bytes_per_token: usize,
    /// Tokens per document.
    pub doc_tokens: usize,
    /// Payload bytes per document.
    pub doc_bytes: usize,
    /// Documents / requests.
    pub docs: usize,
    /// Queries per document.
    pub queries_per_doc: usize,
    /// L1 budget.
    pub l1_bytes: u64,
    /// Seed.
    pub seed: u64,
    /// Wait for lower-tier writes after each store.
    pub sync_stores: bool,
    /// Cache salt of every request (the run's private namespace in shared tiers).
    pub salt: Option<String>,
}

impl Plan {
    /// Derives the plan; the default document count makes the set ~1.5x the L1 budget so
    /// that the workload exercises eviction.
    pub fn new(args: &BenchArgs, layout: &KvLayout, cfg: &EngineConfig) -> Result<Plan> {
        ensure!(
            args.doc_tokens >= cfg.chunk_size,
            "--doc-tokens {} is shorter than one chunk ({} tokens): nothing would be stored",
            args.doc_tokens,
            cfg.chunk_size
        );
        ensure!(args.queries >= 1, "--queries must be at least 1");
        let bytes_per_token = layout.bytes_per_token();
        let doc_bytes = args.doc_tokens * bytes_per_token;
        let docs = match args.docs {
            Some(0) => bail!("--docs must be at least 1"),
            Some(n) => n,
            None => default_docs(cfg.max_local_cpu_size, doc_bytes),
        };
        Ok(Plan {
            workload: args.workload,
            chunk_size: cfg.chunk_size,
            chunk_bytes: layout.chunk_bytes(cfg.chunk_size),
            bytes_per_token,
            doc_tokens: args.doc_tokens,
            doc_bytes,
            docs,
            queries_per_doc: args.queries,
            l1_bytes: cfg.max_local_cpu_size,
            seed: args.seed,
            sync_stores: false,
            salt: None,
        })
    }

    /// Total queries (long-doc-qa) or requests (random).
    pub fn total_queries(&self) -> usize {
        match self.workload {
            WorkloadKind::LongDocQa => self.docs * self.queries_per_doc,
            _ => self.docs,
        }
    }

    /// Peak resident bytes: L1 pool, payload and output buffers, source ring.
    pub fn peak_bytes(&self) -> u64 {
        let ring = SourceRing::slot_count(self.chunk_bytes) * self.chunk_bytes;
        self.l1_bytes + 2 * self.doc_bytes as u64 + ring as u64
    }
}

/// Documents needed for a set of ~1.5x the L1 budget (at least 2).
fn default_docs(l1_bytes: u64, doc_bytes: usize) -> usize {
    let want = (1.5 * l1_bytes as f64 / doc_bytes.max(1) as f64).ceil() as usize;
    want.max(2)
}

/// Runs `kvtier bench`.
pub fn run(args: &BenchArgs) -> Result<()> {
    if let (
        Some(_),
        WorkloadKind::Disk | WorkloadKind::Remote | WorkloadKind::L1 | WorkloadKind::ChunkSize,
    ) = (&args.plot, args.workload)
    {
        bail!(
            "--plot is not supported by the {} workload: only long-doc-qa, random and sweep \
             write plots; drop --plot (--json gives every figure of this workload)",
            args.workload.name()
        );
    }
    match args.workload {
        WorkloadKind::Disk => return disk::run(args),
        WorkloadKind::Sweep => return sweep::run(args),
        WorkloadKind::Remote => return remote::run(args),
        WorkloadKind::Trace => return trace::run(args),
        WorkloadKind::L1 => return l1::run(args),
        WorkloadKind::ChunkSize => return chunk_size::run(args),
        _ => {}
    }
    let t0 = Instant::now();
    let shape = ModelShape::resolve(args)?;
    let cfg = engine_config(args)?;
    let mut plan = Plan::new(args, &shape.layout(), &cfg)?;
    // Lower tiers from the config may be shared (a Redis, a disk directory): the bench's
    // data goes under a salt of its own there, removed at the end.
    let shared_tiers = !cfg.remote_url.is_empty() || !cfg.local_disk.is_empty();
    if shared_tiers {
        plan.salt = Some(scratch::run_id());
    }
    log_plan(&shape, &plan);

    let t_ring = Instant::now();
    let ring = SourceRing::new(plan.chunk_bytes, plan.seed);
    info!(
        bytes = %report::human_bytes(ring.bytes() as u64),
        secs = format!("{:.2}", t_ring.elapsed().as_secs_f64()),
        "source ring ready"
    );
    let baseline = baseline::measure(&ring, plan.chunk_bytes);
    info!(
        memcpy_gbps = format!("{:.2}", baseline.memcpy_gbps),
        "memcpy baseline"
    );
    if args.kv_events_ab {
        ensure!(
            plan.workload == WorkloadKind::LongDocQa,
            "--kv-events-ab measures the long-doc-qa workload; run `kvtier bench long-doc-qa \
             --kv-events-ab`"
        );
        ensure!(
            !shared_tiers,
            "--kv-events-ab measures L1 (the stream reports L1's changes): use a config \
             without local_disk or remote_url"
        );
        let rep = events_ab::run(&cfg, &shape, &plan, &ring, args.reps)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&rep)?);
        } else {
            rep.print_table();
        }
        return Ok(());
    }
    let micro = micro::measure(cfg.cache_policy, plan.seed)?;
    info!(
        lookup_128k_p50_us = format!("{:.1}", micro.lookup_p50_us),
        probe_512_p50_us = format!("{:.1}", micro.probe_p50_us),
        "lookup micro phase"
    );

    let t_engine = Instant::now();
    let engine = std::sync::Arc::new(
        Engine::new(cfg.clone(), shape.identity()).context("building the bench engine")?,
    );
    info!(
        secs = format!("{:.2}", t_engine.elapsed().as_secs_f64()),
        "engine ready (L1 prefaulted)"
    );
    let scratch = plan.salt.clone().map(|salt| {
        let engine = engine.clone();
        Scratch::new(
            format!("cache salt `{salt}` in the configured lower tiers"),
            move || {
                // Writes still queued for the lower tiers would land after the removal.
                engine.flush(std::time::Duration::from_secs(120));
                Ok(engine.remove_salt(&salt)?.iter().map(|(_, n)| n).sum())
            },
        )
    });
    // `admin_port` in the config: the embedded engine serves the admin endpoints while the
    // workload runs (watch /metrics during a long bench).
    let _admin = match cfg.admin_port {
        Some(port) => Some(
            kvtier_server::admin::spawn_embedded_admin(
                engine.core().clone(),
                std::slice::from_ref(&engine),
                port,
            )
            .with_context(|| format!("starting the admin endpoint on port {port}"))?,
        ),
        None => None,
    };
    let mut results = match plan.workload {
        WorkloadKind::LongDocQa => workload::long_doc_qa(&engine, &plan, &ring)?,
        WorkloadKind::Random => workload::random(&engine, &plan, &ring)?,
        WorkloadKind::Disk
        | WorkloadKind::Sweep
        | WorkloadKind::Remote
        | WorkloadKind::Trace
        | WorkloadKind::L1
        | WorkloadKind::ChunkSize => {
            unreachable!("these workloads return early")
        }
    };
    // The report counts lower-tier writes as done: queued ones (Redis, disk) would otherwise
    // land after the snapshot, and a loaded machine reported a Redis tier with 8 writes and
    // 0 stored chunks.
    engine.flush(std::time::Duration::from_secs(120));
    let stats = engine.stats();
    workload::fill_engine_counters(&mut results, &stats);
    fill_micro(&mut results, &micro);

    let report = Report {
        workload: plan.workload.name().to_string(),
        config: config_section(&shape, &cfg, &plan, ring.bytes()),
        ratios: Report::ratios(&results, &baseline),
        baseline,
        results,
        wall_secs: t0.elapsed().as_secs_f64(),
        engine: stats,
    };
    if let Some(dir) = &args.plot {
        write_plots(dir, &report)?;
    }
    if let Some(s) = scratch {
        s.finish()?;
    }
    drop(engine);
    let server = server::maybe_run(args, &shape, &cfg, &plan, &ring)?;
    match (args.json, &server) {
        (true, Some(sv)) => server::print_json(&report, sv),
        (true, None) => report.print_json(),
        (false, sv) => {
            report.print_table();
            if let Some(sv) = sv {
                sv.print_table();
            }
            Ok(())
        }
    }
}

/// The three plots of a workload run.
fn write_plots(dir: &std::path::Path, r: &Report) -> Result<()> {
    let mut bars = vec![("memcpy (baseline)".to_string(), r.baseline.memcpy_gbps, 0)];
    bars.push(("L1 store".into(), r.results.store_gbps, 1));
    if let Some(g) = r.results.retrieve_gbps {
        bars.push(("L1 retrieve".into(), g, 2));
    }
    let svg = plot::BarChart {
        title: format!(
            "{}: throughput against the same-run memcpy baseline",
            r.workload
        ),
        y_label: "GB/s".into(),
        bars,
    };
    plot::write(dir, "throughput.svg", &svg.to_svg())?;
    let lat = plot::LineChart {
        title: "lookup latency (hashing included), CDF".into(),
        x_label: format!("µs (prompts of {} tokens)", r.config.doc_tokens),
        y_label: "fraction of lookups".into(),
        series: vec![plot::Series {
            name: "workload lookups".into(),
            points: plot::cdf(&r.results.lookup_us_samples),
        }],
        y_range: Some((0.0, 1.0)),
    };
    plot::write(dir, "lookup_latency.svg", &lat.to_svg())?;
    let hits = plot::LineChart {
        title: "cumulative hit rate over the run".into(),
        x_label: "lookup".into(),
        y_label: "hit tokens / requested tokens".into(),
        series: vec![plot::Series {
            name: r.workload.clone(),
            points: r
                .results
                .hit_rate_series
                .iter()
                .enumerate()
                .map(|(i, &h)| ((i + 1) as f64, h))
                .collect(),
        }],
        y_range: Some((0.0, 1.0)),
    };
    plot::write(dir, "hit_rate.svg", &hits.to_svg())?;
    info!(dir = %dir.display(), "plots written");
    Ok(())
}

fn log_plan(shape: &ModelShape, plan: &Plan) {
    info!(
        model = %shape.name,
        layout = %shape.layout().describe(),
        chunk_bytes = plan.chunk_bytes,
        docs = plan.docs,
        doc_tokens = plan.doc_tokens,
        l1 = %report::human_bytes(plan.l1_bytes),
        "bench plan"
    );
    let peak = plan.peak_bytes();
    info!(
        peak = %report::human_bytes(peak),
        "memory the run holds (L1 pool, payload buffers, source ring)"
    );
    if peak > 12 * GIB as u64 {
        warn!(
            peak = %report::human_bytes(peak),
            "the run will hold more than 12 GiB; lower --l1-gb or --doc-tokens if memory is tight"
        );
    }
}

fn fill_micro(r: &mut ResultsSection, m: &micro::MicroResults) {
    r.lookup_128k_p50_us = m.lookup_p50_us;
    r.lookup_128k_p99_us = m.lookup_p99_us;
    r.probe_512_p50_us = m.probe_p50_us;
    r.probe_512_p99_us = m.probe_p99_us;
}

fn config_section(
    shape: &ModelShape,
    cfg: &EngineConfig,
    plan: &Plan,
    ring_bytes: usize,
) -> ConfigSection {
    ConfigSection {
        model: shape.name.clone(),
        layout: shape.layout().describe(),
        tp: shape.tp,
        bytes_per_token: plan.bytes_per_token,
        chunk_size: plan.chunk_size,
        chunk_bytes: plan.chunk_bytes,
        l1_bytes: plan.l1_bytes,
        cache_policy: cfg.cache_policy.to_string(),
        huge_pages: cfg.local_cpu_huge_pages,
        prefault: cfg.local_cpu_prefault,
        docs: plan.docs,
        doc_tokens: plan.doc_tokens,
        doc_bytes: plan.doc_bytes,
        queries_per_doc: plan.queries_per_doc,
        queries: plan.total_queries(),
        seed: plan.seed,
        source_ring_bytes: ring_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct TestCli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn args(extra: &[&str]) -> BenchArgs {
        let mut argv = vec!["kvtier", "long-doc-qa"];
        argv.extend_from_slice(extra);
        TestCli::parse_from(argv).bench
    }

    fn chunk_mib(extra: &[&str]) -> f64 {
        let layout = ModelShape::resolve(&args(extra)).unwrap().layout();
        layout.chunk_bytes(256) as f64 / (1 << 20) as f64
    }

    #[test]
    fn preset_chunk_sizes() {
        assert_eq!(chunk_mib(&[]), 32.0);
        assert_eq!(chunk_mib(&["--model", "qwen3-8b"]), 36.0);
        assert_eq!(chunk_mib(&["--model", "llama3-70b"]), 80.0);
        assert_eq!(chunk_mib(&["--model", "tiny"]), 0.5);
        assert_eq!(chunk_mib(&["--tp", "2"]), 16.0);
        assert_eq!(chunk_mib(&["--tp", "1"]), 32.0);
        assert_eq!(chunk_mib(&["--layers", "16", "--dtype", "fp8"]), 8.0);
    }

    #[test]
    fn tp_must_divide_kv_heads() {
        let e = ModelShape::resolve(&args(&["--tp", "3"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not divide"), "{e}");
        let shape = ModelShape::resolve(&args(&["--tp", "4"])).unwrap();
        assert_eq!((shape.kv_heads, shape.identity().world_size), (2, 4));
    }

    #[test]
    fn tiny_runs_on_a_small_l1_by_default() {
        assert_eq!(
            (default_l1_gb(ModelPreset::Tiny) * GIB as f64) as u64,
            64 << 20
        );
        assert_eq!(default_l1_gb(ModelPreset::Llama3_8b), 4.0);
    }

    #[test]
    fn remote_defaults_to_tp_8_only_when_tp_is_not_given() {
        let tp = |extra: &[&str]| remote::default_tp(&args(extra));
        assert_eq!(tp(&[]), Some(8));
        assert_eq!(tp(&["--tp", "1"]), Some(1));
        assert_eq!(tp(&["--tp", "2"]), Some(2));
        // tiny has 2 KV heads: TP 8 would not divide them.
        assert_eq!(tp(&["--model", "tiny"]), None);
        assert_eq!(tp(&["--kv-heads", "4"]), None);
    }

    #[test]
    fn default_docs_cover_one_and_a_half_l1() {
        assert_eq!(default_docs(4 << 30, 1 << 30), 6);
        assert_eq!(default_docs(1 << 30, 4 << 30), 2);
        assert_eq!(default_docs(50 << 20, 4 << 20), 19);
    }
}
