//! Disk tier through the `Tier` trait and through the `Engine`: round trips, restart,
//! admission, sharding, start-up errors, budget.

#[path = "support/disk_util.rs"]
mod util;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvtier::config::PathSharding;
use kvtier::tier::{DiskTier, DiskTierOptions, PutOutcome, Tier};
use kvtier::{Engine, EngineConfig};
use util::*;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn tier_trait_put_get_contains_remove_clear_salt() {
    let d = tempdir();
    let root = d.path().join("cache");
    let tier = DiskTier::open(DiskTierOptions::new(&root, 64 << 20)).unwrap();
    let l1 = l1(32 << 20);
    let rt = rt();
    rt.block_on(async {
        let lens: Vec<usize> = (0..12).map(|i| len_of(i, 300_000)).collect();
        for i in 0..12u64 {
            let salt = if i % 3 == 0 { Some("tenant-a") } else { None };
            let c = chunk(&l1, i, lens[i as usize], salt);
            assert_eq!(tier.put(c.clone()).await.unwrap(), PutOutcome::Stored);
            assert_eq!(tier.put(c).await.unwrap(), PutOutcome::AlreadyPresent);
        }
        let keys: Vec<_> = (0..12).map(key).collect();
        assert_eq!(tier.contains_prefix(&keys).await.unwrap(), 12);
        let expect_bytes: u64 = lens
            .iter()
            .map(|&l| 4096 + (l as u64).div_ceil(4096) * 4096)
            .sum();
        assert_eq!(tier.usage().used_bytes, expect_bytes);
        assert_eq!(disk_bytes(&root), expect_bytes);
        for i in 0..12u64 {
            let c = tier.get(key(i), &l1).await.unwrap().expect("hit");
            assert_eq!(c.payload(), &expected(i, lens[i as usize])[..], "chunk {i}");
            assert_eq!(c.info.key, key(i));
        }
        assert!(tier.remove(key(5)).await.unwrap());
        assert!(!tier.remove(key(5)).await.unwrap());
        assert!(file_of(&root, &key(5)).is_none());
        assert_eq!(tier.contains_prefix(&keys).await.unwrap(), 5);
        assert!(tier.get(key(5), &l1).await.unwrap().is_none());
        // tenant-a holds 0, 3, 6, 9
        assert_eq!(tier.remove_salt("tenant-a").await.unwrap(), 4);
        assert_eq!(tier.remove_salt("tenant-a").await.unwrap(), 0);
        assert_eq!(tier.usage().chunks, 7);
        assert_eq!(tier.clear().await.unwrap(), 7);
        assert_eq!(
            tier.usage(),
            kvtier::tier::TierUsage {
                used_bytes: 0,
                capacity_bytes: 64 << 20,
                chunks: 0
            }
        );
        assert_eq!(disk_bytes(&root), 0);
    });
    let s = tier.stats();
    assert!(s.direct_io, "ext4 should take O_DIRECT: {s:?}");
    assert_eq!(s.checksum_failures, 0);
}

#[test]
fn concurrent_puts_and_gets() {
    let d = tempdir();
    let tier =
        Arc::new(DiskTier::open(DiskTierOptions::new(d.path().join("c"), 256 << 20)).unwrap());
    let l1 = Arc::new(l1(64 << 20));
    let rt = rt();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..32u64 {
            let (tier, l1) = (tier.clone(), l1.clone());
            tasks.push(tokio::spawn(async move {
                let c = chunk(&l1, i, len_of(i, 200_000), None);
                tier.put(c).await.unwrap()
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), PutOutcome::Stored);
        }
        let mut tasks = Vec::new();
        for i in 0..32u64 {
            let (tier, l1) = (tier.clone(), l1.clone());
            tasks.push(tokio::spawn(async move {
                let c = tier.get(key(i), &*l1).await.unwrap().unwrap();
                assert_eq!(c.payload(), &expected(i, len_of(i, 200_000))[..]);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

#[test]
fn admission_gate_stores_on_the_nth_put() {
    let d = tempdir();
    let mut o = DiskTierOptions::new(d.path().join("c"), 16 << 20);
    o.admit_after = 2;
    let tier = DiskTier::open(o).unwrap();
    let l1 = l1(8 << 20);
    let c = chunk(&l1, 1, 5000, None);
    assert_eq!(tier.put_blocking(&c), PutOutcome::Skipped("not admitted"));
    assert!(!tier.contains(&key(1)));
    assert_eq!(tier.put_blocking(&c), PutOutcome::Stored);
    assert_eq!(tier.put_blocking(&c), PutOutcome::AlreadyPresent);
    assert_eq!(tier.stats().skipped_not_admitted, 1);
}

#[test]
fn budget_evicts_in_lru_order_and_never_overflows() {
    let d = tempdir();
    let root = d.path().join("c");
    // 10 files of 4096 + 65536 bytes fit in 700 KiB, not 11.
    let cap = 700 << 10;
    let tier = DiskTier::open(DiskTierOptions::new(&root, cap)).unwrap();
    let l1 = l1(16 << 20);
    for i in 0..10 {
        assert_eq!(
            tier.put_blocking(&chunk(&l1, i, 65536, None)),
            PutOutcome::Stored
        );
    }
    // Touch 0 so 1 is the LRU victim.
    assert!(tier.get_blocking(key(0), &l1).unwrap().is_some());
    assert_eq!(
        tier.put_blocking(&chunk(&l1, 10, 65536, None)),
        PutOutcome::Stored
    );
    assert!(tier.contains(&key(0)) && !tier.contains(&key(1)) && tier.contains(&key(10)));
    assert!(disk_bytes(&root) <= cap);
    assert_eq!(disk_bytes(&root), tier.stats().bytes);
    assert_eq!(tier.stats().evictions, 1);
    // Larger than the whole budget: skipped, nothing evicted.
    assert_eq!(
        tier.put_blocking(&chunk(&l1, 11, 800 << 10, None)),
        PutOutcome::Skipped("disk full")
    );
    assert_eq!(tier.stats().chunks, 10);
}

#[test]
fn smaller_budget_on_restart_evicts_down() {
    let d = tempdir();
    let root = d.path().join("c");
    let l1 = l1(16 << 20);
    {
        let tier = DiskTier::open(DiskTierOptions::new(&root, 4 << 20)).unwrap();
        for i in 0..20 {
            assert_eq!(
                tier.put_blocking(&chunk(&l1, i, 65536, None)),
                PutOutcome::Stored
            );
        }
    }
    let tier = DiskTier::open(DiskTierOptions::new(&root, 10 * 69632)).unwrap();
    assert_eq!(tier.stats().chunks, 10);
    assert_eq!(disk_bytes(&root), 10 * 69632);
}

#[test]
fn missing_parent_or_unwritable_path_fails_naming_it() {
    let d = tempdir();
    let missing = d.path().join("no-such-parent").join("cache");
    let e = DiskTier::open(DiskTierOptions::new(&missing, 1 << 20))
        .unwrap_err()
        .to_string();
    assert!(e.contains(&missing.display().to_string()), "{e}");
    let file = d.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let under_file = file.join("cache");
    let e = DiskTier::open(DiskTierOptions::new(&under_file, 1 << 20))
        .unwrap_err()
        .to_string();
    assert!(e.contains(&under_file.display().to_string()), "{e}");
    let proc_path = PathBuf::from("/proc/kvtier-disk-test");
    let e = DiskTier::open(DiskTierOptions::new(&proc_path, 1 << 20))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/proc/kvtier-disk-test"), "{e}");
    // Through the engine config too.
    let mut cfg = engine_config(&missing);
    cfg.max_local_cpu_size = 4 << 20;
    let e = Engine::new(cfg, identity()).unwrap_err().to_string();
    assert!(e.contains(&missing.display().to_string()), "{e}");
}

fn engine_config(path: &std::path::Path) -> EngineConfig {
    EngineConfig {
        chunk_size: 16, // 64 KiB chunks for the test model
        max_local_cpu_size: 16 << 20,
        local_disk: vec![path.to_path_buf()],
        max_local_disk_size: 256 << 20,
        ..EngineConfig::default()
    }
}

fn prompt(p: u64, chunks: usize) -> Vec<u32> {
    (0..chunks * 16)
        .map(|t| (p as u32).wrapping_mul(7919).wrapping_add(t as u32 * 31))
        .collect()
}

fn kv(engine: &Engine, p: u64, n_tokens: usize) -> Vec<u8> {
    expected(p, engine.payload_bytes(n_tokens))
}

#[test]
fn engine_round_trip_from_disk_with_write_back() {
    let d = tempdir();
    let engine = Engine::new(engine_config(&d.path().join("c")), identity()).unwrap();
    assert_eq!(engine.manager().tier_names(), vec!["cpu", "disk"]);
    let tokens = prompt(1, 8);
    let payload = kv(&engine, 1, tokens.len());
    let r = engine.store(&tokens, None, &payload).unwrap();
    assert_eq!(r.new_chunks, 8);
    let outs = r.ticket.wait();
    assert_eq!(outs.len(), 8);
    assert!(
        outs.iter().all(|o| o.result == Ok(PutOutcome::Stored)),
        "{outs:?}"
    );
    // Empty L1: everything must come from disk.
    engine.manager().clear_l1();
    let l = engine.lookup(&tokens, None).unwrap();
    assert_eq!(l.hit_tokens, tokens.len());
    assert_eq!(l.tiers, vec![1; 8]);
    let mut out = vec![0u8; payload.len()];
    let rr = engine.retrieve(&tokens, None, &mut out).unwrap();
    assert_eq!(rr.hit_tokens, tokens.len());
    assert_eq!(rr.tiers, vec![1; 8]);
    assert_eq!(out, payload);
    let st = engine.stats();
    let disk = st.tiers.iter().find(|t| t.name == "disk").unwrap();
    assert_eq!(disk.hits, 8);
    assert_eq!(disk.write_backs, 8);
    assert_eq!(disk.usage.chunks, 8);
    // Written back: the next retrieve is served by L1.
    let rr = engine.retrieve(&tokens, None, &mut out).unwrap();
    assert_eq!(rr.tiers, vec![0; 8]);
    assert_eq!(out, payload);
}

#[test]
fn restart_three_times_hits_every_acknowledged_chunk() {
    let d = tempdir();
    let path = d.path().join("c");
    let mut acked: Vec<u64> = Vec::new();
    for gen in 0..3u64 {
        let engine = Engine::new(engine_config(&path), identity()).unwrap();
        // Everything acknowledged by earlier engines is found, bytes intact, L1 empty.
        for &p in &acked {
            let tokens = prompt(p, 3);
            let payload = kv(&engine, p, tokens.len());
            let mut out = vec![0u8; payload.len()];
            let rr = engine.retrieve(&tokens, None, &mut out).unwrap();
            assert_eq!(rr.hit_tokens, tokens.len(), "gen {gen} prompt {p}");
            assert_eq!(out, payload, "gen {gen} prompt {p}");
        }
        for p in gen * 10..gen * 10 + 10 {
            let tokens = prompt(p, 3);
            let r = engine
                .store(&tokens, None, &kv(&engine, p, tokens.len()))
                .unwrap();
            let outs = r.ticket.wait();
            if outs.len() == 3 && outs.iter().all(|o| o.result == Ok(PutOutcome::Stored)) {
                acked.push(p);
            }
        }
        assert!(engine.flush(Duration::from_secs(30)));
        drop(engine);
    }
    assert_eq!(acked.len(), 30);
    let engine = Engine::new(engine_config(&path), identity()).unwrap();
    let disk = engine.stats().tiers[1].clone();
    assert_eq!(disk.usage.chunks, 90);
}

/// The disk-only acceptance: L1 off (it only stages I/O), three processes' worth of
/// engines in sequence over one directory. Prompts grow a chunk per store, as a serving
/// engine stores them: earlier chunks are recognised from the disk index (not copied or
/// queued again, so the bounded write queue never drops the new one), and the second and
/// third engines hit every chunk the first stored.
#[test]
fn disk_only_restarted_twice_hits_every_chunk_the_first_run_stored() {
    let d = tempdir();
    let path = d.path().join("c");
    let config = EngineConfig {
        local_cpu: false,
        write_queue_chunks: 2,
        ..engine_config(&path)
    };
    {
        let engine = Engine::new(config.clone(), identity()).unwrap();
        for p in 0..4u64 {
            let tokens = prompt(p, 6);
            let payload = kv(&engine, p, tokens.len());
            for c in 1..=6 {
                let n = c * 16;
                let r = engine
                    .store(&tokens[..n], None, &payload[..payload.len() / 6 * c])
                    .unwrap();
                assert_eq!(
                    (r.new_chunks, r.present_chunks),
                    (1, c - 1),
                    "prompt {p}, {c} chunks"
                );
                let outs = r.ticket.wait();
                assert_eq!(outs.len(), 1);
                assert_eq!(
                    outs[0].result,
                    Ok(PutOutcome::Stored),
                    "prompt {p}, chunk {c}"
                );
            }
        }
        assert!(engine.flush(Duration::from_secs(30)));
    }
    for run in 2..=3 {
        let engine = Engine::new(config.clone(), identity()).unwrap();
        for p in 0..4u64 {
            let tokens = prompt(p, 6);
            let payload = kv(&engine, p, tokens.len());
            let mut out = vec![0u8; payload.len()];
            let rr = engine.retrieve(&tokens, None, &mut out).unwrap();
            assert_eq!(rr.hit_tokens, tokens.len(), "run {run}, prompt {p}");
            assert_eq!(out, payload, "run {run}, prompt {p}");
        }
        // A store of what is there already is recognised, not written again.
        let r = engine
            .store(&prompt(0, 6), None, &kv(&engine, 0, 6 * 16))
            .unwrap();
        assert_eq!((r.new_chunks, r.present_chunks), (0, 6));
    }
}

#[test]
fn engine_striped_and_by_rank_sharding() {
    let d = tempdir();
    let paths: Vec<PathBuf> = (0..2).map(|i| d.path().join(format!("p{i}"))).collect();
    let mut cfg = engine_config(&paths[0]);
    cfg.local_disk = paths.clone();
    cfg.local_disk_path_sharding = PathSharding::Striped;
    {
        let engine = Engine::new(cfg.clone(), identity()).unwrap();
        for p in 0..8 {
            let tokens = prompt(p, 2);
            let r = engine
                .store(&tokens, None, &kv(&engine, p, tokens.len()))
                .unwrap();
            r.ticket.wait();
        }
        assert!(engine.flush(Duration::from_secs(30)));
    }
    let a = disk_bytes(&paths[0]);
    let b = disk_bytes(&paths[1]);
    assert!(a > 0 && b > 0, "striped writes go to both paths: {a} {b}");
    assert_eq!(a + b, 16 * (4096 + 65536));
    // by_rank: rank 1 of 2 uses only path 1.
    let d2 = tempdir();
    let paths: Vec<PathBuf> = (0..2).map(|i| d2.path().join(format!("p{i}"))).collect();
    cfg.local_disk = paths.clone();
    cfg.local_disk_path_sharding = PathSharding::ByRank;
    let mut id = identity();
    id.world_size = 2;
    id.rank = 1;
    let engine = Engine::new(cfg, id).unwrap();
    let tokens = prompt(1, 2);
    engine
        .store(&tokens, None, &kv(&engine, 1, tokens.len()))
        .unwrap()
        .ticket
        .wait();
    assert!(!paths[0].exists());
    assert_eq!(disk_bytes(&paths[1]), 2 * (4096 + 65536));
}

#[test]
fn recovery_of_many_chunks_is_fast() {
    // Files are created directly (valid names, right sizes) to test the scan alone.
    let n: u64 = std::env::var("KVTIER_RECOVERY_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let d = tempdir();
    let root = d.path().join("c");
    drop(DiskTier::open(DiskTierOptions::new(&root, 1 << 40)).unwrap());
    // Sparse files of the right size: the scan reads names and sizes only.
    for i in 0..n {
        let k = key(i).to_hex();
        let f = std::fs::File::create(root.join(&k[..2]).join(format!("{k}.none.kvr"))).unwrap();
        f.set_len(8192).unwrap();
    }
    // Best of three opens: other tests of this binary write to the same disk meanwhile.
    let mut dt = Duration::MAX;
    for _ in 0..3 {
        let t0 = Instant::now();
        let tier = DiskTier::open(DiskTierOptions::new(&root, 1 << 40)).unwrap();
        dt = dt.min(t0.elapsed());
        assert_eq!(tier.stats().chunks, n);
    }
    eprintln!(
        "recovery of {n} chunks: {dt:?} ({:.2} s per 100K)",
        dt.as_secs_f64() * 100_000.0 / n as f64
    );
    assert!(
        dt.as_secs_f64() * 100_000.0 / n as f64 <= 1.5,
        "recovery too slow: {dt:?} for {n}"
    );
}
