//! The object-store tier against real servers on loopback: SeaweedFS (S3), Azurite (Azure
//! Blob). GCS is unit-tested only: gcp-storage-emulator answers HEAD, DELETE and LIST with 501
//! and a PUT without the ETag the client requires, so it cannot serve the tier. Sharing between two engines with their own L1 and
//! disk, restarts, a server killed mid-run, corrupt and truncated objects, multipart and
//! ranged transfers, sweeps that touch only the tier's own objects.

#[path = "support/object_server.rs"]
mod object_server;

use std::time::{Duration, Instant};

use kvtier::keys::ModelIdentity;
use kvtier::layout::{Dtype, KvLayout};
use kvtier::tier::PutOutcome;
use kvtier::{Engine, EngineConfig};
use object_server::{Kind, ObjectServer};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

const CHUNK: usize = 16;
/// Tier index of the object store: L1, disk, then the store.
const OBJ: usize = 2;

fn identity() -> ModelIdentity {
    // 2 layers x 8 heads x 64 dims x f16 x K/V = 4 KiB per token, 64 KiB per chunk.
    ModelIdentity::new("test/object", KvLayout::simple(2, 8, 64, Dtype::F16))
}

/// An engine with its own L1 and disk over the store at `url`.
struct Node {
    engine: Engine,
    _disk: tempfile::TempDir,
}

fn node(url: &str, f: impl FnOnce(&mut EngineConfig)) -> Node {
    let disk = tempfile::Builder::new()
        .prefix("objtier-disk-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let mut cfg = EngineConfig {
        chunk_size: CHUNK,
        max_local_cpu_size: 32 << 20,
        local_cpu_huge_pages: false,
        local_disk: vec![disk.path().to_path_buf()],
        max_local_disk_size: 64 << 20,
        remote_url: vec![url.to_string()],
        ..EngineConfig::default()
    };
    f(&mut cfg);
    Node {
        engine: Engine::new(cfg, identity()).unwrap(),
        _disk: disk,
    }
}

fn kv_for(e: &Engine, tokens: &[u32]) -> Vec<u8> {
    let bpt = e.bytes_per_token();
    let mut out = vec![0u8; tokens.len() * bpt];
    for (i, t) in tokens.iter().enumerate() {
        for (j, b) in out[i * bpt..(i + 1) * bpt].iter_mut().enumerate() {
            *b = (t.wrapping_mul(31) as usize + i * 7 + j) as u8;
        }
    }
    out
}

fn prompt(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| seed.wrapping_mul(1_000_003).wrapping_add(i * 17))
        .collect()
}

/// Stores and waits for every lower-tier write; returns how many chunks the object store
/// acknowledged.
fn store_and_wait(e: &Engine, tokens: &[u32], salt: Option<&str>, kv: &[u8]) -> usize {
    let r = e.store(tokens, salt, kv).unwrap();
    r.ticket
        .wait()
        .iter()
        .filter(|w| w.tier == OBJ && w.result == Ok(PutOutcome::Stored))
        .count()
}

/// The object tier's own counters (its `details`).
fn obj_stats(e: &Engine) -> serde_json::Value {
    e.stats().tiers[OBJ].details.clone()
}

fn counter(e: &Engine, name: &str) -> u64 {
    obj_stats(e)[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name} in {}", obj_stats(e)))
}

/// A raw client of the same store (same credentials), to plant or inspect objects.
fn raw(url: &str) -> std::sync::Arc<dyn ObjectStore> {
    kvtier::tier::ObjectTier::from_url(url, 0, &Default::default())
        .unwrap()
        .client()
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn object_name(prefix: &str, e: &Engine, tokens: &[u32], i: usize) -> Path {
    let key = e.chunk_spans(tokens, None).unwrap()[i].key;
    Path::from(format!("{prefix}/{key}"))
}

fn share(kind: Kind) {
    let Some(srv) = ObjectServer::start(kind) else {
        return;
    };
    let url = srv.url("share", "");
    let a = node(&url, |_| {});
    let b = node(&url, |_| {});
    let tokens = prompt(1, 100);
    let kv = kv_for(&a.engine, &tokens);
    assert_eq!(store_and_wait(&a.engine, &tokens, None, &kv), 6);
    assert_eq!(counter(&a.engine, "put_requests"), 6);

    // B has an empty L1 and disk: the whole prefix is in the object store.
    let l = b.engine.lookup(&tokens, None).unwrap();
    assert_eq!((l.hit_tokens, l.tiers.clone()), (96, vec![OBJ; 6]));
    let mut out = vec![0u8; kv.len()];
    let r = b.engine.retrieve(&tokens, None, &mut out).unwrap();
    assert_eq!((r.hit_tokens, r.tiers.clone()), (96, vec![OBJ; 6]));
    let n = 96 * b.engine.bytes_per_token();
    assert_eq!(&out[..n], &kv[..n]);

    // Written back into B's L1: the next lookup is served there.
    let s = b.engine.stats();
    assert_eq!(s.tiers[OBJ].name, kind_name(kind));
    assert_eq!((s.tiers[OBJ].hits, s.tiers[OBJ].write_backs), (6, 6));
    assert_eq!(s.l1.chunks, 6);
    assert_eq!(b.engine.lookup(&tokens, None).unwrap().tiers, vec![0; 6]);
    assert_eq!(counter(&b.engine, "checksum_failures"), 0);

    // A longer prompt sharing the prefix: B finds the shared part only.
    let longer = [&tokens[..96], &prompt(2, 64)[..]].concat();
    assert_eq!(b.engine.lookup(&longer, None).unwrap().hit_tokens, 96);
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::S3 => "s3",
        Kind::Azure => "az",
        Kind::Gcs => "gs",
    }
}

#[test]
fn two_engines_share_prefixes_through_s3() {
    share(Kind::S3);
}

#[test]
fn two_engines_share_prefixes_through_azurite() {
    share(Kind::Azure);
}

fn survive_restart(kind: Kind) {
    let Some(mut srv) = ObjectServer::start(kind) else {
        return;
    };
    let url = srv.url("restart", "");
    let prompts: Vec<Vec<u32>> = (0..6).map(|i| prompt(10 + i, 64)).collect();
    let mut acked = 0;
    {
        let a = node(&url, |_| {});
        for t in &prompts {
            let kv = kv_for(&a.engine, t);
            acked += store_and_wait(&a.engine, t, None, &kv);
        }
    }
    assert_eq!(acked, 24);
    srv.restart();
    // Fresh L1 and disk: every acknowledged chunk comes back from the store, intact.
    let b = node(&url, |_| {});
    let mut hits = 0;
    for t in &prompts {
        let kv = kv_for(&b.engine, t);
        let mut out = vec![0u8; kv.len()];
        let r = b.engine.retrieve(t, None, &mut out).unwrap();
        assert_eq!(
            out[..r.hit_tokens * b.engine.bytes_per_token()],
            kv[..r.hit_tokens * b.engine.bytes_per_token()]
        );
        hits += r.hit_tokens / CHUNK;
    }
    assert_eq!(
        hits, acked,
        "every acknowledged chunk hits after the restart"
    );
}

#[test]
fn acknowledged_chunks_survive_engine_and_s3_server_restarts() {
    survive_restart(Kind::S3);
}

#[test]
fn acknowledged_chunks_survive_engine_and_azurite_restarts() {
    survive_restart(Kind::Azure);
}

#[test]
fn s3_killed_mid_run_calls_stay_within_deadlines_and_recover() {
    let Some(mut srv) = ObjectServer::start(Kind::S3) else {
        return;
    };
    let url = srv.url("kill", "connect_timeout_ms=300&retry_max_ms=500");
    let deadline_ms = 1000;
    let set = |c: &mut EngineConfig| {
        c.read_deadline_ms = deadline_ms;
        c.store_deadline_ms = deadline_ms;
    };
    // Slack for a loaded 2-core machine; a call bounded by nothing would take 30 s (the
    // request timeout) or hang.
    let bound = Duration::from_millis(deadline_ms * 3);
    let t = prompt(20, 64);
    let kv = {
        // Stored before the kill with the default deadlines (a loaded machine can be slow).
        let w = node(&url, |_| {});
        let kv = kv_for(&w.engine, &t);
        assert_eq!(store_and_wait(&w.engine, &t, None, &kv), 4);
        kv
    };
    let a = node(&url, set);

    srv.kill();
    let b = node(&url, set);
    for i in 0..5 {
        let s = Instant::now();
        assert_eq!(b.engine.lookup(&t, None).unwrap().hit_tokens, 0);
        let mut out = vec![0u8; kv.len()];
        assert_eq!(b.engine.retrieve(&t, None, &mut out).unwrap().hit_tokens, 0);
        assert!(s.elapsed() < bound * 2, "reads took {:?}", s.elapsed());
        let tokens = prompt(200 + i, 32);
        let kv = kv_for(&a.engine, &tokens);
        let s = Instant::now();
        assert_eq!(store_and_wait(&a.engine, &tokens, None, &kv), 0);
        assert!(s.elapsed() < bound, "store took {:?}", s.elapsed());
    }
    let sa = a.engine.stats();
    assert!(sa.tiers[OBJ].errors + sa.tiers[OBJ].timeouts > 0);
    assert!(counter(&a.engine, "outages") >= 1);
    assert!(counter(&a.engine, "fast_failures") + counter(&b.engine, "fast_failures") > 0);

    // Back on the same port and data: both engines recover without a restart, and what was
    // stored before the kill is still there.
    srv.restart();
    let t0 = Instant::now();
    let mut ok = false;
    let mut i = 0;
    while t0.elapsed() < Duration::from_secs(30) && !ok {
        i += 1;
        let fresh = prompt(300 + i, 48);
        let kvf = kv_for(&a.engine, &fresh);
        if store_and_wait(&a.engine, &fresh, None, &kvf) == 3 {
            let mut out = vec![0u8; kvf.len()];
            let t1 = Instant::now();
            while t1.elapsed() < Duration::from_secs(30) {
                if b.engine
                    .retrieve(&fresh, None, &mut out)
                    .unwrap()
                    .hit_tokens
                    == 48
                {
                    assert_eq!(out, kvf);
                    ok = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        } else {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    assert!(ok, "no recovery after the server came back");
    let mut out = vec![0u8; kv.len()];
    assert_eq!(
        b.engine.retrieve(&t, None, &mut out).unwrap().hit_tokens,
        64
    );
    assert_eq!(out, kv);
    assert!(obj_stats(&a.engine)["reachable"].as_bool().unwrap());
}

#[test]
fn corrupt_and_truncated_objects_are_misses_counted_and_deleted() {
    let Some(srv) = ObjectServer::start(Kind::S3) else {
        return;
    };
    let url = srv.url("bad", "");
    let a = node(&url, |_| {});
    let b = node(&url, |_| {});
    let tokens = prompt(4, 64);
    let kv = kv_for(&a.engine, &tokens);
    assert_eq!(store_and_wait(&a.engine, &tokens, None, &kv), 4);
    let store = raw(&url);
    let name = |i| object_name("bad", &a.engine, &tokens, i);
    let original = block_on(async { store.get(&name(3)).await.unwrap().bytes().await.unwrap() });
    block_on(async {
        // Chunk 1: garbage. Chunk 2: one payload byte flipped. Chunk 3: truncated.
        store
            .put(&name(1), PutPayload::from_static(b"garbage"))
            .await
            .unwrap();
        let mut flipped = store
            .get(&name(2))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec();
        let n = flipped.len();
        flipped[n - 10] ^= 0x40;
        store.put(&name(2), flipped.into()).await.unwrap();
        store
            .put(&name(3), original.slice(..original.len() - 100).into())
            .await
            .unwrap();
    });
    let mut out = vec![0u8; kv.len()];
    let r = b.engine.retrieve(&tokens, None, &mut out).unwrap();
    assert_eq!(r.hit_tokens, 16, "stops before the corrupt chunk");
    // The retrieve reads chunks in parallel: it met at least the first corrupt one.
    assert!(counter(&b.engine, "checksum_failures") >= 1);
    // All of them, read one by one: each a miss, counted once (then deleted).
    for i in [1, 2, 3] {
        let key = b.engine.chunk_spans(&tokens, None).unwrap()[i].key;
        assert!(b.engine.manager().get(key).unwrap().is_none());
    }
    assert_eq!(counter(&b.engine, "checksum_failures"), 3);
    assert_eq!(b.engine.stats().tiers[OBJ].checksum_failures, 3);
    // A delete started by a read the retrieve gave up on finishes in the background.
    block_on(async {
        for i in 1..4 {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match store.head(&name(i)).await {
                    Err(object_store::Error::NotFound { .. }) => break,
                    _ if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                    other => panic!("corrupt object {i} not deleted: {other:?}"),
                }
            }
        }
    });
    // Not tier errors: the tier stays up.
    let s = b.engine.stats();
    assert_eq!(s.tiers[OBJ].errors, 0);
    assert!(!s.tiers[OBJ].down);
}

#[test]
fn prefix_lookup_stops_at_the_first_gap() {
    let Some(srv) = ObjectServer::start(Kind::S3) else {
        return;
    };
    let url = srv.url("gap", "concurrency=4");
    let a = node(&url, |_| {});
    let b = node(&url, |_| {});
    let tokens = prompt(3, 160);
    let kv = kv_for(&a.engine, &tokens);
    assert_eq!(store_and_wait(&a.engine, &tokens, None, &kv), 10);
    let store = raw(&url);
    block_on(async {
        store
            .delete(&object_name("gap", &a.engine, &tokens, 6))
            .await
            .unwrap();
    });
    assert_eq!(b.engine.lookup(&tokens, None).unwrap().hit_tokens, 96);
}

#[test]
fn large_chunks_go_as_parallel_parts_and_ranged_reads() {
    let Some(srv) = ObjectServer::start(Kind::S3) else {
        return;
    };
    // 8 MiB chunks (512 tokens of 16 KiB) in 5 MiB parts: 2 parts each way.
    let url = srv.url("parts", "part_size_mb=5");
    let big = |c: &mut EngineConfig| {
        c.chunk_size = 512;
        c.max_local_cpu_size = 96 << 20;
        c.max_local_disk_size = 96 << 20;
    };
    let id = || ModelIdentity::new("test/object-big", KvLayout::simple(4, 8, 128, Dtype::F16));
    let mk = || {
        let disk = tempfile::Builder::new()
            .prefix("objtier-disk-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap();
        let mut cfg = EngineConfig {
            local_cpu_huge_pages: false,
            local_disk: vec![disk.path().to_path_buf()],
            remote_url: vec![url.clone()],
            ..EngineConfig::default()
        };
        big(&mut cfg);
        (Engine::new(cfg, id()).unwrap(), disk)
    };
    let (a, _da) = mk();
    let (b, _db) = mk();
    assert_eq!(a.bytes_per_token() * 512, 8 << 20);
    let tokens = prompt(9, 1024);
    let kv = kv_for(&a, &tokens);
    assert_eq!(store_and_wait(&a, &tokens, None, &kv), 2);
    // Per chunk: start, 2 parts, complete.
    assert_eq!(counter(&a, "put_requests"), 8);
    let mut out = vec![0u8; kv.len()];
    let r = b.retrieve(&tokens, None, &mut out).unwrap();
    assert_eq!(r.hit_tokens, 1024);
    assert_eq!(out, kv);
    // Per chunk: the first part (with the header), then one ranged read.
    assert_eq!(counter(&b, "get_requests"), 4);
}

#[test]
fn clear_and_remove_salt_touch_only_this_tiers_objects() {
    let Some(srv) = ObjectServer::start(Kind::S3) else {
        return;
    };
    let url = srv.url("cl", "");
    let e = node(&url, |_| {});
    let store = raw(&url);
    let keep = [
        Path::from("cl/notes.txt"),
        Path::from("other/".to_string() + &"ab".repeat(32)),
    ];
    block_on(async {
        for p in &keep {
            store
                .put(p, PutPayload::from_static(b"not ours"))
                .await
                .unwrap();
        }
    });
    let t = prompt(7, 32);
    let kv = kv_for(&e.engine, &t);
    assert_eq!(store_and_wait(&e.engine, &t, Some("tenant-a"), &kv), 2);
    assert_eq!(store_and_wait(&e.engine, &t, Some("tenant-b"), &kv), 2);
    assert_eq!(store_and_wait(&e.engine, &t, None, &kv), 2);
    let removed = e.engine.remove_salt("tenant-a").unwrap();
    assert!(removed.contains(&("s3".to_string(), 2)), "{removed:?}");
    let cleared = e.engine.clear().unwrap();
    assert!(cleared.contains(&("s3".to_string(), 4)), "{cleared:?}");
    block_on(async {
        for p in &keep {
            assert!(store.head(p).await.is_ok(), "{p} kept");
        }
    });
}

#[test]
fn credentials_never_reach_debug_or_stats() {
    let Some(srv) = ObjectServer::start(Kind::S3) else {
        return;
    };
    let url = srv.url("cred", "");
    let e = node(&url, |_| {});
    let t = prompt(8, 32);
    let kv = kv_for(&e.engine, &t);
    assert_eq!(store_and_wait(&e.engine, &t, None, &kv), 2);
    let tier = kvtier::tier::ObjectTier::from_url(&url, 0, &Default::default()).unwrap();
    let shown = format!(
        "{tier:?} {} {:?}",
        serde_json::to_string(&e.engine.stats()).unwrap(),
        e.engine.stats()
    );
    for secret in [object_server::S3_SECRET, object_server::AZ_KEY] {
        assert!(!shown.contains(secret), "secret shown: {shown}");
    }
}

/// Write once (issue 21): a growing prompt stored one chunk longer each time, with L1 on and
/// off, PUTs each chunk's object once; storing it again after L1 lost it PUTs nothing.
#[test]
fn a_growing_prompt_writes_each_object_once() {
    let Some(srv) = ObjectServer::start(Kind::S3) else {
        return;
    };
    let url = srv.url("once", "");
    for local_cpu in [false, true] {
        let mut cfg = EngineConfig {
            chunk_size: CHUNK,
            local_cpu,
            max_local_cpu_size: 32 << 20,
            local_cpu_huge_pages: false,
            remote_url: vec![url.clone()],
            ..EngineConfig::default()
        };
        cfg.write_queue_chunks = 256;
        let e = Engine::new(cfg, identity()).unwrap();
        let tokens = prompt(70 + u32::from(local_cpu), 8 * CHUNK);
        let kv = kv_for(&e, &tokens);
        let bpt = e.bytes_per_token();
        let grow = || {
            for c in 1..=8 {
                let n = c * CHUNK;
                e.store(&tokens[..n], None, &kv[..n * bpt])
                    .unwrap()
                    .ticket
                    .wait();
            }
        };
        grow();
        e.manager().clear_l1();
        grow();
        let s = e.stats();
        let t = s.tiers.iter().find(|t| t.name == "s3").unwrap();
        assert_eq!(
            t.writes, 8,
            "local_cpu {local_cpu}: {} writes for 8 chunks",
            t.writes
        );
        assert_eq!(t.details["put_requests"].as_u64(), Some(8));
    }
}
