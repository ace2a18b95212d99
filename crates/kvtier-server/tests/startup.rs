//! Server start-up and the shared pool's memory: a default server commits its pool lazily,
//! a first client connects without faulting the pool in, and what is committed shows in
//! `/stats` and `/metrics`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kvtier::KvCache;
use kvtier_client::KvClient;
use serde_json::Value;

const GIB: u64 = 1 << 30;

/// The tests look at this process's mappings and the pool's committed memory: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn l1(stats: &Value, field: &str) -> u64 {
    stats["l1"][field]
        .as_u64()
        .unwrap_or_else(|| panic!("no l1.{field} in {stats}"))
}

/// `kvtier_pool_committed_bytes{tier="cpu"}` as `/metrics` serves it.
fn committed_metric(srv: &Server) -> u64 {
    let (code, text) = srv.http("GET", "/metrics", None);
    assert_eq!(code, 200, "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix("kvtier_pool_committed_bytes{tier=\"cpu\"} "))
        .unwrap_or_else(|| panic!("no committed-bytes metric in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// The default pool (5 GiB memfd, `local_cpu_prefault` off): nothing is committed at start,
/// connecting commits nothing either (the client used to map it with `MAP_POPULATE`,
/// committing all 5 GiB for seconds on its first connect), and stores commit about what they
/// write.
#[test]
fn a_first_client_connects_without_committing_the_default_pool() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    // Only the chunk size of the tiny test model is set: the pool is at its defaults.
    let srv = Server::start(dir.path(), &format!("chunk_size: {CHUNK}\n"), &[], &[]);
    let base = srv.stats();
    let capacity = l1(&base, "pool_capacity");
    assert!(capacity >= 4 * GIB, "default pool of {capacity} bytes");
    assert_eq!(l1(&base, "pool_committed"), 0, "committed at start: {base}");

    let t0 = Instant::now();
    let c = KvClient::connect(&srv.unix(), identity()).unwrap();
    let connect = t0.elapsed();
    eprintln!("first connect to a {capacity}-byte pool: {connect:?}");
    assert!(c.server_info().shared_memory, "the client maps the pool");
    let after_connect = l1(&srv.stats(), "pool_committed");
    assert!(
        after_connect < capacity / 100,
        "connecting committed {after_connect} of {capacity} bytes"
    );

    // 64 chunks of 2 KiB, stored and read back through the mapping.
    let t = tokens(1, 64 * CHUNK);
    let p = payload(1, t.len());
    assert_eq!(c.store(&t, None, &p).unwrap().stored_tokens, t.len());
    let mut out = vec![0u8; p.len()];
    assert_eq!(c.retrieve(&t, None, &mut out).unwrap().hit_tokens, t.len());
    assert_eq!(out, p);
    let stats = srv.stats();
    let committed = l1(&stats, "pool_committed");
    assert!(
        committed >= p.len() as u64,
        "a store of {} bytes committed only {committed}",
        p.len()
    );
    // The client commits 2 MiB regions as it first touches them; the store touched one or
    // two.
    assert!(
        committed <= 8 << 20,
        "a {}-byte store committed {committed} bytes",
        p.len()
    );
    assert_eq!(committed_metric(&srv), committed);
    // A generous bound: populating the whole pool took seconds per GiB.
    assert!(
        connect < Duration::from_secs(1),
        "the first connect took {connect:?}"
    );
}

/// `local_cpu_prefault: true` commits the whole pool at start, says so in the log, and a
/// client then finds every page there.
#[test]
fn a_prefaulted_pool_is_committed_at_start() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let yaml =
        format!("chunk_size: {CHUNK}\nmax_local_cpu_size: 64MiB\nlocal_cpu_prefault: true\n");
    let srv = Server::start(dir.path(), &yaml, &[], &[]);
    let stats = srv.stats();
    assert_eq!(l1(&stats, "pool_committed"), 64 << 20, "{stats}");
    assert_eq!(committed_metric(&srv), 64 << 20);
    assert!(
        srv.log_text().contains("L1 pool prefaulted"),
        "{}",
        srv.log_text()
    );
    let c = KvClient::connect(&srv.unix(), identity()).unwrap();
    let t = tokens(2, 4 * CHUNK);
    let p = payload(2, t.len());
    c.store(&t, None, &p).unwrap();
    let mut out = vec![0u8; p.len()];
    assert_eq!(c.retrieve(&t, None, &mut out).unwrap().hit_tokens, t.len());
    assert_eq!(out, p);
    assert_eq!(l1(&srv.stats(), "pool_committed"), 64 << 20);
}

/// Mappings of the server's pool in this process (`/proc/self/maps` names a memfd
/// `/memfd:kvtier-pool`).
fn pool_mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| l.contains("memfd:kvtier-pool"))
        .count()
}

/// Concurrent calls open more connections; each receives the pool's descriptor, but all of
/// them share one mapping (one set of page tables, each region populated once), and a
/// restarted server's new pool replaces it.
#[test]
fn connections_of_one_client_share_one_pool_mapping() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!("chunk_size: {CHUNK}\nmax_local_cpu_size: 256MiB\n");
    let mut srv = Server::start(dir.path(), &yaml, &[], &[]);
    let c = KvClient::connect(&srv.unix(), identity()).unwrap();
    assert_eq!(pool_mappings(), 1);
    let threads = 8;
    let go = std::sync::Barrier::new(threads);
    std::thread::scope(|s| {
        for i in 0..threads as u64 {
            let (c, go) = (c.clone(), &go);
            s.spawn(move || {
                go.wait();
                for round in 0..10 {
                    let doc = 100 + i * 10 + round;
                    let t = tokens(doc, 64 * CHUNK);
                    let p = payload(doc, t.len());
                    c.store(&t, None, &p).unwrap();
                    let mut out = vec![0u8; p.len()];
                    assert_eq!(c.retrieve(&t, None, &mut out).unwrap().hit_tokens, t.len());
                    assert_eq!(out, p);
                }
            });
        }
    });
    assert_eq!(pool_mappings(), 1, "every connection maps the pool anew");

    // A new server (new pool) at the same socket: the client maps the new pool.
    srv.term();
    drop(srv);
    let srv = Server::start(dir.path(), &yaml, &[], &[]);
    let t = tokens(1, 4 * CHUNK);
    let p = payload(1, t.len());
    c.store(&t, None, &p).unwrap();
    let mut out = vec![0u8; p.len()];
    assert_eq!(c.retrieve(&t, None, &mut out).unwrap().hit_tokens, t.len());
    assert_eq!(out, p);
    assert!(
        l1(&srv.stats(), "chunks") >= 4,
        "stored into the new server"
    );
    assert_eq!(pool_mappings(), 1, "the old pool's mapping is gone");
}
