//! Measurement, not an asserted test: SET/GET GB/s of 4 MiB values through the Redis tier
//! versus `redis-benchmark -t set,get -d 4194304 -n 200 -c 1 -P 1 -r 16` on the same server.
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-redis cargo test --release -p kvtier --test redis_bench -- --ignored --nocapture
//! ```

#[path = "support/redis_server.rs"]
mod redis_server;

use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use kvtier::chunk::{checksum, now_ms, Chunk, ChunkInfo};
use kvtier::keys::{ChunkKey, ModelIdentity, Origin};
use kvtier::layout::{Dtype, KvLayout};
use kvtier::tier::{CpuTier, CpuTierOptions, RedisTier, Tier};
use redis_server::{find_bin, RedisServer};

const VALUE: usize = 4 << 20;
const OPS: usize = 200;
const KEYS: usize = 16;

fn redis_benchmark(port: u16) -> Option<(f64, f64)> {
    let out = Command::new(find_bin("redis-benchmark")?)
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args([
            "-t", "set,get", "-d", "4194304", "-n", "200", "-c", "1", "-P", "1",
        ])
        .args(["-r", "16", "-q"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
    let rps = |op: &str| -> Option<f64> {
        let tag = format!("{op}: ");
        text.lines()
            .map(str::trim_start)
            .rfind(|l| l.starts_with(&tag) && l.contains("requests per second"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((
        rps("SET")? * VALUE as f64 / 1e9,
        rps("GET")? * VALUE as f64 / 1e9,
    ))
}

#[test]
#[ignore = "measurement; run with --ignored --nocapture"]
fn measure_tier_vs_redis_benchmark() {
    let Some(srv) = RedisServer::start(&["--client-query-buffer-limit", "1gb"]) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_time()
        .build()
        .unwrap();
    let tier = RedisTier::from_url(&srv.url("?prefix=bench:"), 0).unwrap();
    let l1 = Arc::new(CpuTier::new(CpuTierOptions::with_bytes(256 << 20)).unwrap());
    let origin = Arc::new(Origin {
        identity: Arc::new(ModelIdentity::new(
            "bench",
            KvLayout::simple(1, 1, 2048, Dtype::F16),
        )),
        cache_salt: None,
    });
    let chunks: Vec<Chunk> = (0..KEYS)
        .map(|k| {
            let mut b = l1.allocate(VALUE).unwrap();
            for (i, x) in b.as_mut_slice().iter_mut().enumerate() {
                *x = (i * 31 + k) as u8;
            }
            let buf = b.seal();
            Chunk {
                info: ChunkInfo {
                    key: ChunkKey([k as u8; 32]),
                    num_tokens: 256,
                    len: VALUE as u64,
                    checksum: checksum(buf.as_slice()),
                    origin: origin.clone(),
                    created_ms: now_ms(),
                },
                buf,
            }
        })
        .collect();
    for run in 0..3 {
        let (set, get) = rt.block_on(async {
            let t = Instant::now();
            for i in 0..OPS {
                tier.put(chunks[i % KEYS].clone()).await.unwrap();
            }
            let set = (OPS * VALUE) as f64 / t.elapsed().as_secs_f64() / 1e9;
            let t = Instant::now();
            for i in 0..OPS {
                let c = tier
                    .get(ChunkKey([(i % KEYS) as u8; 32]), &*l1)
                    .await
                    .unwrap();
                assert_eq!(c.map(|c| c.buf.len()), Some(VALUE));
            }
            let get = (OPS * VALUE) as f64 / t.elapsed().as_secs_f64() / 1e9;
            (set, get)
        });
        let (bset, bget) = redis_benchmark(srv.port).unwrap_or((f64::NAN, f64::NAN));
        println!(
            "run {run}: tier SET {set:.2} GB/s GET {get:.2} GB/s | redis-benchmark SET {bset:.2} GET {bget:.2} | ratio SET {:.2} GET {:.2}",
            set / bset,
            get / bget
        );
    }
    let s = tier.stats();
    println!("tier stats: {s:?}");
}
