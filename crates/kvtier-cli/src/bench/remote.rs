//! `kvtier bench remote`: the Redis/Valkey tier against `redis-benchmark` on the same server
//! with the same value size, in the same run.
//!
//! Local tiers are off (`local_cpu: false`: L1 only stages I/O), so every store goes to the
//! remote tier and every retrieve comes from it. Without `--remote-url` the bench starts its
//! own `redis-server` on a free loopback port and stops it afterwards. With a
//! `--remote-url kvtier://host:port` (another node's `kvtier serve --tcp`) it measures that
//! tier instead; `redis-benchmark` speaks only RESP, so there is no baseline (0) then.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kvtier::{Engine, EngineConfig};
use serde::Serialize;
use tracing::info;

use super::buffers::{AlignedBuf, SourceRing, MIB};
use super::report::gbps;
use super::{stream, BenchArgs, ModelShape};

/// Stores in flight before the bench waits for acknowledgements.
const WINDOW: usize = 8;

#[derive(Debug, Serialize)]
struct RemoteReport {
    workload: &'static str,
    config: serde_json::Value,
    baseline: RemoteBaseline,
    results: RemoteResults,
    ratios: RemoteRatios,
    wall_secs: f64,
    engine_write: kvtier::EngineStats,
    engine_read: kvtier::EngineStats,
}

#[derive(Debug, Serialize)]
struct RemoteBaseline {
    /// redis-benchmark SET, one client, no pipelining, same value size: GB/s.
    redis_set_gbps: f64,
    /// redis-benchmark GET, same settings: GB/s.
    redis_get_gbps: f64,
    value_bytes: usize,
}

#[derive(Debug, Serialize)]
struct RemoteResults {
    /// Chunks stored through the engine / time until all acknowledged, GB/s.
    remote_store_gbps: f64,
    /// Chunks retrieved by a second engine (empty L1) / retrieve time, GB/s.
    remote_retrieve_gbps: f64,
    chunks: usize,
    chunks_acknowledged: usize,
    hit_chunks: usize,
    verified_chunks: usize,
}

#[derive(Debug, Serialize)]
struct RemoteRatios {
    remote_store: f64,
    remote_retrieve: f64,
}

/// A redis-server child on a free loopback port, killed on drop.
struct Server {
    child: Child,
    port: u16,
    _dir: std::path::PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

fn spawn_redis() -> Result<Server> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let dir = std::env::temp_dir().join(format!("kvtier-bench-redis-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--client-query-buffer-limit", "1gb", "--proto-max-bulk-len", "512mb"])
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting redis-server (install it, e.g. `apt-get install redis-server`, or pass --remote-url)")?;
    let server = Server {
        child,
        port,
        _dir: dir,
    };
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(server);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("redis-server did not start listening on port {port}")
}

fn redis_benchmark(host: &str, port: u16, value: usize, keys: usize) -> Result<(f64, f64)> {
    let n = (keys * 4).max(48);
    let out = Command::new("redis-benchmark")
        .args([
            "-h",
            host,
            "-p",
            &port.to_string(),
            "-t",
            "set,get",
            "-d",
            &value.to_string(),
        ])
        .args([
            "-n",
            &n.to_string(),
            "-c",
            "1",
            "-P",
            "1",
            "-r",
            &keys.to_string(),
            "-q",
        ])
        .output()
        .context("running redis-benchmark (install redis-tools)")?;
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
    let rps = |op: &str| -> Result<f64> {
        let tag = format!("{op}: ");
        text.lines()
            .map(str::trim_start)
            .rfind(|l| l.starts_with(&tag) && l.contains("requests per second"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {op} figure in redis-benchmark output: {text}"))
    };
    Ok((
        rps("SET")? * value as f64 / 1e9,
        rps("GET")? * value as f64 / 1e9,
    ))
}

fn host_port(url: &str) -> Result<(String, u16)> {
    let rest = url.split_once("://").map_or(url, |x| x.1);
    let rest = rest.rsplit_once('@').map_or(rest, |x| x.1);
    let hp = rest.split(['/', '?', ',']).next().unwrap_or_default();
    let (h, p) = hp.rsplit_once(':').context("remote URL has no port")?;
    Ok((h.to_string(), p.parse().context("remote URL port")?))
}

/// The TP degree of the remote run: the one given, else 8 for the real presets with their
/// own shape (the acceptance figure is for 4 MiB values: Llama-3-8B's chunk per rank at
/// TP 8), else none (1).
pub(super) fn default_tp(args: &BenchArgs) -> Option<u32> {
    let own_shape = args.kv_heads.is_none() && args.layers.is_none();
    match args.tp {
        Some(tp) => Some(tp),
        None if own_shape && args.model != super::ModelPreset::Tiny => Some(8),
        None => None,
    }
}

/// Runs the remote scenario.
pub fn run(args: &BenchArgs) -> Result<()> {
    let t_all = Instant::now();
    let mut args = args.clone();
    args.tp = default_tp(&args);
    let shape = ModelShape::resolve(&args)?;
    let layout = shape.layout();
    let chunk_size = args.chunk_size.unwrap_or(256);
    let chunk_bytes = layout.chunk_bytes(chunk_size);
    ensure!(
        args.doc_tokens >= chunk_size,
        "--doc-tokens must be at least one chunk"
    );
    let per_doc = args.doc_tokens / chunk_size;
    let docs = args.docs.unwrap_or_else(|| (256 / per_doc).max(1));
    let chunks = docs * per_doc;
    let server = match &args.remote_url {
        Some(_) => None,
        None => Some(spawn_redis()?),
    };
    let url = match (&args.remote_url, &server) {
        (Some(u), _) => u.clone(),
        (None, Some(s)) => format!("redis://127.0.0.1:{}/0?prefix=kvtier-bench:", s.port),
        (None, None) => unreachable!("a server was spawned"),
    };
    let (host, port) = host_port(&url)?;
    let peer = url.to_ascii_lowercase().starts_with("kvtier://");
    let (set_gbps, get_gbps) = if peer {
        (0.0, 0.0)
    } else {
        redis_benchmark(&host, port, chunk_bytes, 16)?
    };
    if !peer {
        info!(
            set = format!("{set_gbps:.2}"),
            get = format!("{get_gbps:.2}"),
            "redis-benchmark (GB/s)"
        );
    }

    let mut cfg =
        EngineConfig::load(args.config.as_deref()).context("loading the engine config")?;
    let staging = (4 * WINDOW * chunk_bytes).max(256 * MIB);
    let pairs = [
        ("remote_url", url.clone()),
        ("local_cpu", "false".to_string()),
        ("max_local_cpu_size", format!("{staging}B")),
        ("local_cpu_prefault", "true".into()),
    ];
    cfg.apply_pairs(pairs.iter().map(|(k, v)| (*k, v.as_str())))?;
    let ring = SourceRing::new(chunk_bytes, args.seed);
    let bpt = layout.bytes_per_token();
    let doc_tokens = |d: usize| -> Vec<u32> {
        (0..args.doc_tokens as u32)
            .map(|i| (d as u32).wrapping_mul(2_654_435_761) ^ i)
            .collect()
    };
    let (acked, store_secs, stats_w) = {
        let engine =
            Engine::new(cfg.clone(), shape.identity()).context("building the writer engine")?;
        let s = stream::store_documents(&engine, &ring, docs, args.doc_tokens, doc_tokens, WINDOW)?;
        (s.acked, s.secs, engine.stats())
    };
    let engine = Engine::new(cfg, shape.identity()).context("building the reader engine")?;
    let mut out = AlignedBuf::new(args.doc_tokens * bpt);
    let (mut hits, mut verified, mut secs) = (0usize, 0usize, 0f64);
    for d in 0..docs {
        let t0 = Instant::now();
        let got = engine.retrieve(&doc_tokens(d), None, &mut out)?;
        secs += t0.elapsed().as_secs_f64();
        let n = got.hit_tokens / chunk_size;
        hits += n;
        for i in 0..n {
            if !ring.chunk_matches(d as u64, i, &out[i * chunk_bytes..(i + 1) * chunk_bytes]) {
                bail!("chunk {i} of document {d} read back from the remote tier differs");
            }
            verified += 1;
        }
    }
    let stats_r = engine.stats();
    drop(engine);
    drop(server);
    let store_gbps = gbps((acked * chunk_bytes) as u64, store_secs);
    let retrieve_gbps = gbps((hits * chunk_bytes) as u64, secs);
    let rel = |x: f64, b: f64| if b > 0.0 { x / b } else { 0.0 };
    let report = RemoteReport {
        workload: "remote",
        config: serde_json::json!({
            "model": shape.name, "layout": layout.describe(), "tp": shape.tp, "chunk_bytes": chunk_bytes,
            "chunks": chunks, "docs": docs, "doc_tokens": args.doc_tokens,
            "remote": kvtier::tier::remote::url::redact(&url), "window_chunks": WINDOW,
        }),
        baseline: RemoteBaseline {
            redis_set_gbps: set_gbps,
            redis_get_gbps: get_gbps,
            value_bytes: chunk_bytes,
        },
        results: RemoteResults {
            remote_store_gbps: store_gbps,
            remote_retrieve_gbps: retrieve_gbps,
            chunks,
            chunks_acknowledged: acked,
            hit_chunks: hits,
            verified_chunks: verified,
        },
        ratios: RemoteRatios {
            remote_store: rel(store_gbps, set_gbps),
            remote_retrieve: rel(retrieve_gbps, get_gbps),
        },
        wall_secs: t_all.elapsed().as_secs_f64(),
        engine_write: stats_w,
        engine_read: stats_r,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let r = &report;
        if peer {
            println!(
                "{:<34} none (redis-benchmark speaks only RESP; {} B values)",
                "baseline", chunk_bytes
            );
        } else {
            println!(
                "{:<34} SET {:.3} / GET {:.3} GB/s ({} B values)",
                "redis-benchmark (c=1, P=1)",
                r.baseline.redis_set_gbps,
                r.baseline.redis_get_gbps,
                chunk_bytes
            );
        }
        println!(
            "{:<34} {:.3} GB/s  ratio {:.2}",
            "remote tier store (acknowledged)", r.results.remote_store_gbps, r.ratios.remote_store
        );
        println!(
            "{:<34} {:.3} GB/s  ratio {:.2}",
            "remote tier retrieve", r.results.remote_retrieve_gbps, r.ratios.remote_retrieve
        );
        println!(
            "{:<34} {}/{} chunks ({} verified)",
            "hits from the remote tier", hits, chunks, verified
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_and_port_come_out_of_redis_urls() {
        assert_eq!(
            super::host_port("redis://u:p@h:6379/0?x=1").unwrap(),
            ("h".into(), 6379)
        );
        assert_eq!(
            super::host_port("redis+cluster://a:1,b:2").unwrap(),
            ("a".into(), 1)
        );
        assert!(super::host_port("redis://nohost").is_err());
        assert_eq!(
            super::host_port("kvtier://tok@h:7070").unwrap(),
            ("h".into(), 7070)
        );
    }
}
