//! The per-tier throttle (`tier_max_mbps`, `tier_max_iops`) around a real disk tier: it
//! delivers at the configured rate, and a tier throttled below what a read needs turns into
//! misses within the read deadline instead of hanging the caller (C8).

use std::time::{Duration, Instant};

use kvtier::keys::ModelIdentity;
use kvtier::layout::{Dtype, KvLayout};
use kvtier::{Engine, EngineConfig};

const CHUNK: usize = 16;

fn identity() -> ModelIdentity {
    // 2 layers x 8 heads x 64 dims x f16 x K/V = 4 KiB per token, 64 KiB per chunk.
    ModelIdentity::new("test/throttle", KvLayout::simple(2, 8, 64, Dtype::F16))
}

fn engine(dir: &std::path::Path, extra: &str) -> Engine {
    let yaml = format!(
        "chunk_size: {CHUNK}\nmax_local_cpu_size: 64MiB\nlocal_cpu_huge_pages: false\n\
         local_disk: {}\nmax_local_disk_size: 256MiB\nwrite_queue_chunks: 1000\n{extra}",
        dir.display()
    );
    Engine::new(EngineConfig::from_yaml_str(&yaml).unwrap(), identity()).unwrap()
}

fn tokens(n_chunks: usize, seed: u32) -> Vec<u32> {
    (0..(n_chunks * CHUNK) as u32)
        .map(|i| seed.wrapping_mul(7919).wrapping_add(i))
        .collect()
}

fn disk_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("throttle-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
}

/// Seconds to store `chunks` chunks and have every disk write land.
fn timed_store(e: &Engine, chunks: usize) -> f64 {
    let t = tokens(chunks, 1);
    let kv = vec![0x3Cu8; t.len() * e.bytes_per_token()];
    let t0 = Instant::now();
    let r = e.store(&t, None, &kv).unwrap();
    r.ticket.wait();
    assert!(e.flush(Duration::from_secs(60)));
    t0.elapsed().as_secs_f64()
}

#[test]
fn a_throttled_disk_writes_at_the_configured_rate() {
    // 48 chunks of 64 KiB = 3.1 MB at 4 MB/s: about 0.79 s (less the 0.1 s a bucket banks).
    let chunks = 48;
    let bytes = (chunks * 64 * 1024) as f64;
    let dir = disk_dir();
    let e = engine(&dir.path().join("a"), "tier_max_mbps: disk=4\n");
    let secs = timed_store(&e, chunks);
    let mbps = bytes / secs / 1e6;
    // Generous: a loaded machine may be slower, never faster than the limit allows.
    assert!(
        mbps <= 4.0 * 1.25,
        "throttled disk wrote at {mbps:.2} MB/s, limit 4"
    );
    assert!(
        mbps >= 4.0 * 0.25,
        "throttled disk wrote at only {mbps:.2} MB/s"
    );
    let d = &e.stats().tiers[1].details;
    assert!(d["throttle"]["waited_ms"].as_u64().unwrap() > 300, "{d}");

    // An IOPS limit alone: 48 writes at 60 per second, about 0.8 s.
    let e = engine(&dir.path().join("b"), "tier_max_iops: {disk: 60}\n");
    let secs = timed_store(&e, chunks);
    let iops = chunks as f64 / secs;
    assert!(iops <= 60.0 * 1.25, "{iops:.1} writes/s, limit 60");
    assert!(iops >= 60.0 * 0.25, "{iops:.1} writes/s");
}

#[test]
fn a_tier_throttled_below_a_read_misses_within_the_deadline() {
    let dir = disk_dir();
    let t = tokens(8, 2);
    {
        let e = engine(dir.path(), "");
        let kv = vec![0x5Au8; t.len() * e.bytes_per_token()];
        e.store(&t, None, &kv).unwrap().ticket.wait();
        assert!(e.flush(Duration::from_secs(60)));
    }
    // Reopened with an empty L1 and a disk that reads 0.05 MB/s: one 64 KiB chunk needs
    // more than a second, the read deadline is 300 ms.
    let e = engine(
        dir.path(),
        "tier_max_mbps: disk=0.05\nread_deadline_ms: 300\n",
    );
    assert_eq!(
        e.lookup(&t, None).unwrap().hit_tokens,
        t.len(),
        "the index still answers"
    );
    let mut out = vec![0u8; t.len() * e.bytes_per_token()];
    let t0 = Instant::now();
    let r = e.retrieve(&t, None, &mut out).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    assert!(
        r.hit_tokens < t.len(),
        "the throttled read was served in full"
    );
    assert!(
        secs < 2.0,
        "retrieve took {secs:.2} s with a 0.3 s read deadline"
    );
    let s = e.stats();
    assert!(s.tiers[1].timeouts >= 1, "no deadline expiry counted");
}

#[test]
fn throttle_keys_name_existing_tiers_and_sane_numbers() {
    let dir = disk_dir();
    let yaml = format!(
        "local_disk: {}\nmax_local_disk_size: 1\ntier_max_mbps: redis=5\n",
        dir.path().display()
    );
    let err = Engine::new(EngineConfig::from_yaml_str(&yaml).unwrap(), identity())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tier_max_mbps") && err.contains("disk"),
        "{err}"
    );
    for bad in ["disk", "disk=0", "disk=-1", "disk=fast", "=3"] {
        let e = EngineConfig::from_yaml_str(&format!("tier_max_iops: \"{bad}\"")).unwrap_err();
        assert!(e.to_string().contains("tier_max_iops"), "{bad}: {e}");
    }
    let ok = EngineConfig::from_yaml_str("tier_max_mbps: \"disk=200, redis=50.5\"").unwrap();
    assert_eq!(
        ok.tier_max_mbps,
        vec![("disk".to_string(), 200.0), ("redis".to_string(), 50.5)]
    );
}
