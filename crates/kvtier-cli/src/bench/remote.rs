//! `kvtier bench remote`: the Redis/Valkey tier against `redis-benchmark` on the same server
//! with the same value size, in the same run; or, for an `s3://`, `gs://` or `az://` URL, the
//! object-store tier against a raw PUT/GET loop of the same object size and concurrency with
//! the same client (`object_store`, built with the tier's settings) against the same store,
//! in alternating rounds (`--reps`).
//!
//! Local tiers are off (`local_cpu: false`: L1 only stages I/O), so every store goes to the
//! remote tier and every retrieve comes from it. Without `--remote-url` the bench starts its
//! own `redis-server` on a free loopback port and stops it afterwards. With a
//! `--remote-url kvtier://host:port` (another node's `kvtier serve --tcp`) it measures that
//! tier instead; `redis-benchmark` speaks only RESP, so there is no baseline (0) then.
//!
//! The server may be someone's live Redis or kvtier node: everything the bench writes is in
//! a namespace private to the run, and only that is removed at the end (and on an error or
//! Ctrl-C). On Redis that is a key prefix nested in the URL's own (`<prefix>bench-<run>:`,
//! with a one-day TTL unless the URL sets one, so even a killed bench leaves nothing for
//! long), for the tier's chunks and redis-benchmark's keys alike (redis-benchmark's
//! built-in `SET`/`GET` tests would overwrite any `key:<n>` of the database); on a kvtier
//! node it is a cache salt.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kvtier::tier::{PeerTier, RedisTier, RedisUrl, Tier};
use kvtier::{Engine, EngineConfig};
use serde::Serialize;
use tracing::info;

use super::buffers::{SourceRing, MIB};
use super::report::{gbps, WriteAmplification};
use super::scratch::{self, Scratch};
use super::{stream, BenchArgs, ModelShape};

/// Keys redis-benchmark writes (`<prefix>redis-benchmark:<12 digits>`, 0 to this - 1).
const BASELINE_KEYS: usize = 16;
/// Expiry of the bench's Redis keys when the URL sets none: a safety net for a killed run.
const SCRATCH_TTL_SEC: u64 = 86_400;

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
    /// A `kvtier://` node: the same bytes sent over one loopback TCP connection to a reader
    /// thread, payloads of the chunk size: GB/s (0 for Redis).
    tcp_loopback_gbps: f64,
    value_bytes: usize,
}

#[derive(Debug, Serialize)]
struct RemoteResults {
    /// Chunks stored through the engine / time until all acknowledged, GB/s.
    remote_store_gbps: f64,
    /// Chunks retrieved by a second engine (empty L1) / retrieve time, GB/s.
    remote_retrieve_gbps: f64,
    chunks: usize,
    /// Chunk writes that stored the chunk (the bytes counted as stored).
    chunks_acknowledged: usize,
    /// Chunk writes the server answered "already there" (nothing stored, not counted).
    chunks_already_present: usize,
    hit_chunks: usize,
    verified_chunks: usize,
    /// The writer's remote writes per distinct chunk stored.
    writes_per_unique_chunk: WriteAmplification,
}

#[derive(Debug, Serialize)]
struct RemoteRatios {
    remote_store: f64,
    remote_retrieve: f64,
}

/// The baseline of a `kvtier://` tier: `n` payloads of `bytes` written over one loopback
/// TCP connection to a thread that reads them all and answers one byte: GB/s.
fn tcp_loopback_gbps(bytes: usize, n: usize) -> Result<f64> {
    use std::io::Read;
    let listener = TcpListener::bind("127.0.0.1:0").context("loopback TCP baseline: bind")?;
    let addr = listener.local_addr()?;
    let total = bytes * n;
    let reader = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut left = total;
        while left > 0 {
            let k = s.read(&mut buf)?;
            if k == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            left = left.saturating_sub(k);
        }
        s.write_all(&[1])
    });
    let mut s = TcpStream::connect(addr).context("loopback TCP baseline: connect")?;
    s.set_nodelay(true)?;
    let payload = vec![0xA5u8; bytes];
    let t0 = Instant::now();
    for _ in 0..n {
        s.write_all(&payload)?;
    }
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack)?;
    let secs = t0.elapsed().as_secs_f64();
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("loopback TCP baseline: the reader thread panicked"))?
        .context("loopback TCP baseline: reading")?;
    Ok(gbps(total as u64, secs))
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

/// Where redis-benchmark runs: the server, its database, and the key pattern it may write
/// (`__rand_int__` is replaced by 12 digits, 0 to [`BASELINE_KEYS`] - 1).
struct BaselineTarget {
    host: String,
    port: u16,
    db: u32,
    /// The run's private key prefix.
    prefix: String,
    key_pattern: String,
}

impl BaselineTarget {
    /// The keys redis-benchmark may have written.
    fn keys(&self) -> Vec<Vec<u8>> {
        (0..BASELINE_KEYS)
            .map(|i| {
                self.key_pattern
                    .replace("__rand_int__", &format!("{i:012}"))
                    .into_bytes()
            })
            .collect()
    }
}

/// redis-benchmark `SET` then `GET` of `value`-byte values, one client, no pipelining, on
/// the target's keys only (custom commands: the built-in tests write `key:<n>` keys, which
/// may be another application's); returns (SET, GET) GB/s.
fn redis_benchmark(t: &BaselineTarget, value: usize) -> Result<(f64, f64)> {
    let n = (BASELINE_KEYS * 4).max(48);
    let run = |cmd: &str, stdin: Option<&[u8]>| -> Result<f64> {
        let mut child = Command::new("redis-benchmark")
            .args(["-h", &t.host, "-p", &t.port.to_string()])
            .args(["--dbnum", &t.db.to_string()])
            .args(["-n", &n.to_string(), "-c", "1", "-P", "1"])
            .args(["-r", &BASELINE_KEYS.to_string(), "-q"])
            .args(stdin.map(|_| "-x"))
            .args([cmd, &t.key_pattern])
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("running redis-benchmark (install redis-tools)")?;
        if let (Some(bytes), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(bytes)
                .context("writing the value to redis-benchmark")?;
        }
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
        let tag = format!("{cmd} ");
        text.lines()
            .map(str::trim_start)
            .rfind(|l| l.starts_with(&tag) && l.contains("requests per second"))
            .and_then(|l| l.rsplit_once(": ").map(|x| x.1))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {cmd} figure in redis-benchmark output: {text}"))
    };
    // `-x` reads the last argument from stdin up to the first NUL: no NUL bytes then.
    let set = run("SET", Some(&vec![b'x'; value]))?;
    let get = run("GET", None)?;
    Ok((set * value as f64 / 1e9, get * value as f64 / 1e9))
}

/// Deletes `keys` (plain TCP, like redis-benchmark); returns how many existed.
fn delete_keys(host: &str, port: u16, db: u32, keys: &[Vec<u8>]) -> Result<u64> {
    let mut s = TcpStream::connect((host, port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = Vec::new();
    let db = db.to_string();
    kvtier::transport::resp::encode_command(&mut req, &[b"SELECT", db.as_bytes()]);
    let mut del: Vec<&[u8]> = vec![b"DEL"];
    del.extend(keys.iter().map(Vec::as_slice));
    kvtier::transport::resp::encode_command(&mut req, &del);
    s.write_all(&req)?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    for _ in 0..2 {
        line.clear();
        r.read_line(&mut line)?;
    }
    line.trim_end()
        .strip_prefix(':')
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("unexpected DEL reply `{}`", line.trim_end()))
}

/// `url` (a Redis URL) with the key prefix `<its prefix>bench-<run>:` and, unless it sets
/// one, a TTL of [`SCRATCH_TTL_SEC`].
fn private_redis_url(url: &str, run: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut prefix = "kvtier:".to_string();
    let mut ttl = false;
    let mut opts: Vec<String> = Vec::new();
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        match kv.split_once('=') {
            // Still percent-encoded: appending plain characters keeps it valid.
            Some(("prefix", p)) if !p.is_empty() => prefix = p.to_string(),
            Some(("prefix", _)) => {}
            Some(("ttl_sec", _)) => {
                ttl = true;
                opts.push(kv.to_string());
            }
            _ => opts.push(kv.to_string()),
        }
    }
    opts.push(format!("prefix={prefix}bench-{run}:"));
    if !ttl {
        opts.push(format!("ttl_sec={SCRATCH_TTL_SEC}"));
    }
    format!("{base}?{}", opts.join("&"))
}

/// Runs `f` (a tier call) to completion.
fn block_on<T>(f: impl std::future::Future<Output = T>) -> Result<T> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f))
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
    if let Some(url) = &args.remote_url {
        if kvtier::tier::ObjectUrl::is_object_url(url) {
            return object::run(args, url);
        }
    }
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
    let given = match (&args.remote_url, &server) {
        (Some(u), _) => u.clone(),
        (None, Some(s)) => format!("redis://127.0.0.1:{}/0", s.port),
        (None, None) => unreachable!("a server was spawned"),
    };
    let (host, port) = host_port(&given)?;
    let peer = given.to_ascii_lowercase().starts_with("kvtier://");
    // The run's private namespace: a cache salt everywhere, and on Redis a key prefix too.
    let run = scratch::run_id();
    let salt = run.clone();
    let url = if peer {
        given.clone()
    } else {
        private_redis_url(&given, &run)
    };
    let baseline = if peer {
        None
    } else {
        let u = RedisUrl::parse(&url).context("the remote URL")?;
        Some(BaselineTarget {
            host: host.clone(),
            port,
            db: u.db,
            key_pattern: format!("{}redis-benchmark:__rand_int__", u.prefix),
            prefix: u.prefix,
        })
    };
    let shown = kvtier::tier::remote::url::redact(&url);
    let scratch = {
        let (url, salt) = (url.clone(), salt.clone());
        let keys = baseline
            .as_ref()
            .map(|b| (b.host.clone(), b.port, b.db, b.keys()));
        let what = match &baseline {
            Some(b) => format!("keys `{}*` on {shown}", b.prefix),
            None => format!("cache salt `{salt}` on {shown}"),
        };
        Scratch::new(what, move || {
            Ok(match keys {
                // Only keys under the private prefix: the tier's chunks, then the baseline's.
                Some((host, port, db, keys)) => {
                    block_on(RedisTier::from_url(&url, 0)?.clear())??
                        + delete_keys(&host, port, db, &keys)?
                }
                None => block_on(PeerTier::from_url(&url, 0)?.remove_salt(&salt))??,
            })
        })
    };
    let (set_gbps, get_gbps) = match &baseline {
        None => (0.0, 0.0),
        Some(b) => redis_benchmark(b, chunk_bytes)?,
    };
    let tcp_gbps = if peer {
        let g = tcp_loopback_gbps(chunk_bytes, chunks)?;
        info!(gbps = format!("{g:.2}"), "loopback TCP baseline");
        g
    } else {
        0.0
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
    let doc_tokens = |d: usize| -> Vec<u32> {
        (0..args.doc_tokens as u32)
            .map(|i| (d as u32).wrapping_mul(2_654_435_761) ^ i)
            .collect()
    };
    let (s, stats_w) = {
        let engine =
            Engine::new(cfg.clone(), shape.identity()).context("building the writer engine")?;
        let s = stream::store_documents(
            &engine,
            &ring,
            Some(&salt),
            docs,
            args.doc_tokens,
            doc_tokens,
            WINDOW,
        )?;
        (s, engine.stats())
    };
    let (acked, store_secs) = (s.acked, s.secs);
    let engine = Engine::new(cfg, shape.identity()).context("building the reader engine")?;
    let stream::Retrieved {
        hits,
        verified,
        secs,
    } = stream::retrieve_documents(
        &engine,
        &ring,
        Some(&salt),
        docs,
        args.doc_tokens,
        doc_tokens,
        "the remote tier",
    )?;
    let stats_r = engine.stats();
    drop(engine);
    scratch.finish()?;
    drop(server);
    let store_gbps = gbps((acked * chunk_bytes) as u64, store_secs);
    let retrieve_gbps = gbps((hits * chunk_bytes) as u64, secs);
    let rel = |x: f64, b: f64| if b > 0.0 { x / b } else { 0.0 };
    let report = RemoteReport {
        workload: "remote",
        config: serde_json::json!({
            "model": shape.name, "layout": layout.describe(), "tp": shape.tp, "chunk_bytes": chunk_bytes,
            "chunks": chunks, "docs": docs, "doc_tokens": args.doc_tokens,
            "remote": shown, "window_chunks": WINDOW,
        }),
        baseline: RemoteBaseline {
            redis_set_gbps: set_gbps,
            redis_get_gbps: get_gbps,
            tcp_loopback_gbps: tcp_gbps,
            value_bytes: chunk_bytes,
        },
        results: RemoteResults {
            remote_store_gbps: store_gbps,
            remote_retrieve_gbps: retrieve_gbps,
            chunks,
            chunks_acknowledged: acked,
            chunks_already_present: s.already,
            hit_chunks: hits,
            verified_chunks: verified,
            writes_per_unique_chunk: WriteAmplification::of(&stats_w, s.unique_chunks),
        },
        ratios: if peer {
            // Another node's server: against moving the same bytes over loopback TCP.
            RemoteRatios {
                remote_store: rel(store_gbps, tcp_gbps),
                remote_retrieve: rel(retrieve_gbps, tcp_gbps),
            }
        } else {
            RemoteRatios {
                remote_store: rel(store_gbps, set_gbps),
                remote_retrieve: rel(retrieve_gbps, get_gbps),
            }
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
                "{:<34} {:.3} GB/s ({} B payloads, one connection)",
                "loopback TCP", r.baseline.tcp_loopback_gbps, chunk_bytes
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
        println!(
            "{:<34} {:.3} ({} unique chunks)",
            "remote writes per unique chunk",
            r.results.writes_per_unique_chunk.remote.unwrap_or(0.0),
            s.unique_chunks
        );
    }
    Ok(())
}

/// The object-store scenario.
mod object;

#[cfg(test)]
mod tests {
    #[test]
    fn the_loopback_tcp_baseline_moves_every_byte() {
        // 8 payloads of 1 MiB: the reader answers only after all of them arrived.
        let g = super::tcp_loopback_gbps(1 << 20, 8).unwrap();
        assert!(g > 0.0 && g.is_finite(), "{g}");
    }

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
