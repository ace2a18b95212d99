//! `kvtier bench --server ADDR | --spawn-server`: the same store/retrieve/lookup operations
//! through the server client (via the `KvCache` trait) and through an embedded engine in
//! the same run, reported as ratios.
//!
//! The server may be a live one: the bench stores under a cache salt unique to the run and
//! removes exactly that salt at the end (and on an error or Ctrl-C), never `Clear`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kvtier::{Engine, EngineConfig, KvCache};
use kvtier_client::{ClientOptions, KvClient};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Serialize;
use tracing::info;

use super::buffers::{AlignedBuf, SourceRing};
use super::report::{gbps, median, percentile, Report, Spread};
use super::scratch::{self, Scratch};
use super::{BenchArgs, ModelShape, Plan};

/// Server-path numbers next to the embedded path, measured in the same run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ServerSection {
    /// Server address used.
    pub addr: String,
    /// Whether the bench started the server itself.
    pub spawned: bool,
    /// Whether the client mapped the server pool (zero-copy local path).
    pub shared_memory: bool,
    /// Documents and tokens per document of this phase.
    pub docs: usize,
    /// Tokens per document.
    pub doc_tokens: usize,
    /// Bytes per chunk.
    pub chunk_bytes: usize,
    /// Alternating rounds (each: both sides store every document, retrieve it, remove it).
    pub rounds: usize,
    /// Embedded store throughput (GB/s), median of rounds.
    pub embedded_store_gbps: f64,
    /// Server store throughput (GB/s), median of rounds.
    pub server_store_gbps: f64,
    /// Embedded retrieve throughput (GB/s), median of rounds.
    pub embedded_retrieve_gbps: f64,
    /// Server retrieve throughput (GB/s), median of rounds.
    pub server_retrieve_gbps: f64,
    /// Per-round server / embedded store ratio: min / median / max.
    pub store_ratio: Spread,
    /// Per-round server / embedded retrieve ratio: min / median / max.
    pub retrieve_ratio: Spread,
    /// Per-round store ratios, in round order.
    pub store_ratio_rounds: Vec<f64>,
    /// Per-round retrieve ratios, in round order.
    pub retrieve_ratio_rounds: Vec<f64>,
    /// Lookup round trip for a 128K-token prompt (keys precomputed), p50 µs.
    pub server_lookup_rtt_p50_us: f64,
    /// Same, p99.
    pub server_lookup_rtt_p99_us: f64,
    /// Full client lookup of a 128K-token prompt (hashing included), p50 µs.
    pub server_lookup_128k_p50_us: f64,
    /// Embedded lookup of the same prompt, p50 µs.
    pub embedded_lookup_128k_p50_us: f64,
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

impl ServerSection {
    /// `server_retrieve_vs_embedded`, `server_store_vs_embedded`: medians of the per-round
    /// ratios (each round measures both sides back to back, in alternating order).
    pub fn ratios(&self) -> [(&'static str, f64); 2] {
        [
            ("server_retrieve_vs_embedded", self.retrieve_ratio.median),
            ("server_store_vs_embedded", self.store_ratio.median),
        ]
    }

    /// Table rows.
    pub fn print_table(&self) {
        println!("{:<30} {}", "server addr", self.addr);
        println!("{:<30} {}", "server shared memory", self.shared_memory);
        for (k, v) in [
            ("server store GB/s", self.server_store_gbps),
            ("embedded store GB/s", self.embedded_store_gbps),
            ("server retrieve GB/s", self.server_retrieve_gbps),
            ("embedded retrieve GB/s", self.embedded_retrieve_gbps),
            ("server lookup rtt p50 us", self.server_lookup_rtt_p50_us),
            ("server lookup 128k p50 us", self.server_lookup_128k_p50_us),
        ] {
            println!("{k:<30} {v:.2}");
        }
        for (k, v) in self.ratios() {
            println!("{k:<30} {v:.3}");
        }
        println!(
            "{:<30} {} (min / median / max of {} rounds)",
            "store ratio spread", self.store_ratio, self.rounds
        );
        println!(
            "{:<30} {} (min / median / max of {} rounds)",
            "retrieve ratio spread", self.retrieve_ratio, self.rounds
        );
    }
}

/// Prints the report with the server section merged into `ratios` and `results`.
pub fn print_json(report: &Report, s: &ServerSection) -> Result<()> {
    let mut v = serde_json::to_value(report)?;
    for (k, r) in s.ratios() {
        v["ratios"][k] = serde_json::json!(r);
    }
    v["results"]["server_lookup_rtt_p50_us"] = serde_json::json!(s.server_lookup_rtt_p50_us);
    v["results"]["server_lookup_rtt_p99_us"] = serde_json::json!(s.server_lookup_rtt_p99_us);
    v["results"]["server_lookup_128k_p50_us"] = serde_json::json!(s.server_lookup_128k_p50_us);
    v["server"] = serde_json::to_value(s)?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

/// Alternating (embedded, server) rounds of the store/retrieve phase.
const SERVER_ROUNDS: usize = 5;

struct Spawned {
    child: Child,
    socket: PathBuf,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn spawn_server(args: &BenchArgs, cfg: &EngineConfig) -> Result<Spawned> {
    let dir = std::env::temp_dir();
    let pid = std::process::id();
    let socket = dir.join(format!("kvtier-bench-{pid}.sock"));
    let ready = dir.join(format!("kvtier-bench-{pid}.ready"));
    let _ = std::fs::remove_file(&ready);
    let mut cmd = Command::new(std::env::current_exe().context("locating the kvtier binary")?);
    cmd.arg("serve")
        .arg("--socket")
        .arg(&socket)
        .arg("--ready-file")
        .arg(&ready)
        .env("KVTIER_CHUNK_SIZE", cfg.chunk_size.to_string())
        .env(
            "KVTIER_MAX_LOCAL_CPU_SIZE",
            format!("{}MiB", cfg.max_local_cpu_size >> 20),
        )
        .env("KVTIER_LOCAL_CPU_PREFAULT", "true")
        .stdout(Stdio::null());
    if let Some(c) = &args.config {
        cmd.arg("--config").arg(c);
    }
    let mut child = cmd.spawn().context("spawning `kvtier serve`")?;
    let t0 = Instant::now();
    while !ready.exists() {
        if let Some(st) = child.try_wait()? {
            bail!("`kvtier serve` exited early: {st}");
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(120),
            "`kvtier serve` not ready after 120 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(&ready);
    Ok(Spawned { child, socket })
}

pub(super) fn tokens(rng: &mut StdRng, n: usize) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(0..128_256)).collect()
}

/// Seconds and bytes of one side's timed calls in a round.
#[derive(Default)]
pub(super) struct Side {
    pub(super) store_secs: f64,
    pub(super) store_bytes: u64,
    pub(super) retrieve_secs: f64,
    pub(super) retrieve_bytes: u64,
}

/// One round: each document is stored through both sides back to back (then retrieved
/// `reps` times the same way, then removed, untimed), so both sides of a pair see the same
/// moment of a noisy machine; `first` picks which side of each pair goes first.
pub(super) fn paired_round(
    sides: [&dyn KvCache; 2],
    first: usize,
    salt: &str,
    docs: &[Vec<u32>],
    payloads: &[AlignedBuf],
    out: &mut AlignedBuf,
    reps: usize,
) -> Result<[Side; 2]> {
    let mut m: [Side; 2] = Default::default();
    let order = [first, 1 - first];
    for (t, p) in docs.iter().zip(payloads) {
        for &i in &order {
            let t0 = Instant::now();
            let s = sides[i].store(t, Some(salt), p)?;
            m[i].store_secs += t0.elapsed().as_secs_f64();
            ensure!(
                s.new_bytes as usize == p.len(),
                "the store took {} of {} bytes (a leftover of an earlier round, or no room)",
                s.new_bytes,
                p.len()
            );
            m[i].store_bytes += s.new_bytes;
        }
    }
    for _ in 0..reps {
        for (t, p) in docs.iter().zip(payloads) {
            for &i in &order {
                let t0 = Instant::now();
                let r = sides[i].retrieve(t, Some(salt), out)?;
                m[i].retrieve_secs += t0.elapsed().as_secs_f64();
                let n = r.hit_tokens * sides[i].bytes_per_token();
                ensure!(r.hit_tokens > 0, "retrieve missed a stored document");
                ensure!(
                    out[..n] == p[..n],
                    "retrieved bytes differ from the stored ones"
                );
                m[i].retrieve_bytes += n as u64;
            }
        }
    }
    for side in sides {
        for t in docs {
            side.remove(t, Some(salt))?;
        }
    }
    Ok(m)
}

/// Runs the server comparison when `--server` or `--spawn-server` is given.
pub fn maybe_run(
    args: &BenchArgs,
    shape: &ModelShape,
    cfg: &EngineConfig,
    plan: &Plan,
    ring: &SourceRing,
) -> Result<Option<ServerSection>> {
    if args.server.is_none() && !args.spawn_server {
        return Ok(None);
    }
    // Both sides get the same L1 budget, sized so the documents fit (no eviction).
    let mut cfg = cfg.clone();
    cfg.max_local_cpu_size = cfg.max_local_cpu_size.min(1 << 30);
    let doc_tokens = plan
        .doc_tokens
        .min(2048)
        .max(plan.chunk_size)
        .div_ceil(plan.chunk_size)
        * plan.chunk_size;
    let doc_bytes = doc_tokens * plan.bytes_per_token;
    let docs = ((cfg.max_local_cpu_size as f64 * 0.7) as usize / doc_bytes.max(1)).clamp(1, 4);
    ensure!(
        (docs * doc_bytes) as u64 <= cfg.max_local_cpu_size,
        "one {doc_tokens}-token document does not fit the server phase's L1"
    );
    let spawned = if args.spawn_server {
        Some(spawn_server(args, &cfg)?)
    } else {
        None
    };
    let addr = match (&args.server, &spawned) {
        (Some(a), _) => a.clone(),
        (None, Some(s)) => format!("unix:{}", s.socket.display()),
        (None, None) => unreachable!(),
    };
    let opts = ClientOptions {
        chunk_size: Some(cfg.chunk_size),
        ..ClientOptions::default()
    };
    let client = KvClient::connect_with(&addr, shape.identity(), opts)
        .with_context(|| format!("connecting to the kvtier server at {addr}"))?;
    // Everything this phase stores on the server is under this salt, and only it is removed.
    let salt = scratch::run_id();
    let scratch = {
        let (client, salt) = (client.clone(), salt.clone());
        Scratch::new(format!("cache salt `{salt}` on {addr}"), move || {
            Ok(client.remove_salt(&salt)?)
        })
    };
    let embedded = Engine::new(cfg.clone(), shape.identity()).context("embedded engine")?;
    info!(%addr, docs, doc_tokens, shm = client.server_info().shared_memory, "server phase");

    let mut rng = StdRng::seed_from_u64(plan.seed ^ 0x5e7e7);
    let toks: Vec<Vec<u32>> = (0..docs).map(|_| tokens(&mut rng, doc_tokens)).collect();
    let payloads: Vec<AlignedBuf> = (0..docs)
        .map(|d| {
            let mut b = AlignedBuf::new(doc_bytes);
            ring.compose(d as u64 + (1 << 50), &mut b);
            b
        })
        .collect();
    let mut out = AlignedBuf::new(doc_bytes);
    let reps = 2;
    // Each store and retrieve is timed on both sides back to back (per document), the side
    // going first alternating by round, so a neighbour's burst hits both sides of a pair;
    // every round stores afresh (its documents are removed at its end), and the figure is
    // the median of the per-round ratios.
    let (mut es, mut er, mut ss, mut sr) = (vec![], vec![], vec![], vec![]);
    for round in 0..SERVER_ROUNDS {
        let [e, v] = paired_round(
            [&embedded, &client],
            round % 2,
            &salt,
            &toks,
            &payloads,
            &mut out,
            reps,
        )?;
        es.push(gbps(e.store_bytes, e.store_secs));
        er.push(gbps(e.retrieve_bytes, e.retrieve_secs));
        ss.push(gbps(v.store_bytes, v.store_secs));
        sr.push(gbps(v.retrieve_bytes, v.retrieve_secs));
    }
    let per_round = |a: &[f64], b: &[f64]| -> Vec<f64> {
        a.iter().zip(b).map(|(x, y)| ratio(*x, *y)).collect()
    };
    let store_ratio_rounds = per_round(&ss, &es);
    let retrieve_ratio_rounds = per_round(&sr, &er);
    // The embedded side shares the configured lower tiers (maybe a shared Redis or disk):
    // let its queued writes land, then remove them.
    embedded.flush(Duration::from_secs(120));
    embedded
        .remove_salt(&salt)
        .context("removing the embedded side's bench data")?;
    drop(embedded);

    // Lookup of a 128K-token prompt whose first document's chunks hit.
    let mut long = toks[0].clone();
    long.extend(tokens(&mut rng, 131_072 - long.len().min(131_072)));
    long.truncate(131_072);
    let keys: Vec<_> = client
        .key_space()
        .chunk_spans(&long, Some(&salt))?
        .iter()
        .map(|s| s.key)
        .collect();
    let side = Engine::new(
        {
            let mut c = cfg.clone();
            c.max_local_cpu_size = 64 << 20;
            c.local_cpu_prefault = false;
            c
        },
        shape.identity(),
    )?;
    let mut rtt = Vec::new();
    let mut full = Vec::new();
    let mut emb = Vec::new();
    for i in 0..300 {
        let t0 = Instant::now();
        client.lookup_keys(&keys, long.len())?;
        let a = t0.elapsed().as_secs_f64() * 1e6;
        let t0 = Instant::now();
        client.lookup(&long, Some(&salt))?;
        let b = t0.elapsed().as_secs_f64() * 1e6;
        let t0 = Instant::now();
        side.lookup(&long, Some(&salt))?;
        let c = t0.elapsed().as_secs_f64() * 1e6;
        if i >= 20 {
            rtt.push(a);
            full.push(b);
            emb.push(c);
        }
    }
    scratch.finish()?;
    let s = ServerSection {
        addr,
        spawned: spawned.is_some(),
        shared_memory: client.server_info().shared_memory,
        docs,
        doc_tokens,
        chunk_bytes: plan.chunk_bytes,
        rounds: SERVER_ROUNDS,
        embedded_store_gbps: median(&es),
        server_store_gbps: median(&ss),
        embedded_retrieve_gbps: median(&er),
        server_retrieve_gbps: median(&sr),
        store_ratio: Spread::of(&store_ratio_rounds),
        retrieve_ratio: Spread::of(&retrieve_ratio_rounds),
        store_ratio_rounds,
        retrieve_ratio_rounds,
        server_lookup_rtt_p50_us: percentile(&rtt, 50.0),
        server_lookup_rtt_p99_us: percentile(&rtt, 99.0),
        server_lookup_128k_p50_us: percentile(&full, 50.0),
        embedded_lookup_128k_p50_us: percentile(&emb, 50.0),
    };
    info!(
        retrieve_ratio = format!("{:.3}", s.ratios()[0].1),
        store_ratio = format!("{:.3}", s.ratios()[1].1),
        lookup_rtt_p50_us = format!("{:.1}", s.server_lookup_rtt_p50_us),
        "server phase done"
    );
    drop(client);
    drop(spawned);
    Ok(Some(s))
}
