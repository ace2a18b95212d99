//! Write once per tier: a growing prompt (every store repeats the chunks of the one before,
//! as a serving engine stores a conversation turn by turn) writes each chunk to the disk
//! and to every remote tier once, with L1 on or off, against real `redis-server` processes
//! (the object store's own test is `object_tier.rs::a_growing_prompt_writes_each_object_once`). What the manager remembers of a remote store stays correct when
//! another writer removes chunks behind its back: the next lookup finds them absent and
//! the next store writes them again.

#[path = "support/redis_server.rs"]
mod redis_server;

use kvtier::keys::ModelIdentity;
use kvtier::layout::{Dtype, KvLayout};
use kvtier::{Engine, EngineConfig, EngineStats};
use redis_server::RedisServer;

const CHUNK: usize = 16;
/// Chunks in the full prompt.
const N: usize = 12;

fn identity() -> ModelIdentity {
    // 2 layers x 4 heads x 32 dims x f16 x K/V = 1 KiB per token, 16 KiB per chunk.
    ModelIdentity::new("test/write-once", KvLayout::simple(2, 4, 32, Dtype::F16))
}

fn engine(local_cpu: bool, f: impl FnOnce(&mut EngineConfig)) -> Engine {
    let mut cfg = EngineConfig {
        chunk_size: CHUNK,
        local_cpu,
        max_local_cpu_size: 16 << 20,
        local_cpu_huge_pages: false,
        ..EngineConfig::default()
    };
    f(&mut cfg);
    Engine::new(cfg, identity()).unwrap()
}

fn prompt(seed: u32) -> Vec<u32> {
    (0..(N * CHUNK) as u32)
        .map(|i| seed.wrapping_mul(1_000_003).wrapping_add(i * 13))
        .collect()
}

fn kv(e: &Engine, tokens: &[u32]) -> Vec<u8> {
    let bpt = e.bytes_per_token();
    (0..tokens.len() * bpt).map(|i| (i % 251) as u8).collect()
}

/// Stores the prompt one chunk longer each time (1, 2, ..., N chunks), waiting for the
/// lower-tier writes after each store as the bench's streaming store does at its window.
fn store_growing(e: &Engine, tokens: &[u32], salt: Option<&str>) {
    let data = kv(e, tokens);
    let bpt = e.bytes_per_token();
    for c in 1..=N {
        let n = c * CHUNK;
        let r = e.store(&tokens[..n], salt, &data[..n * bpt]).unwrap();
        r.ticket.wait();
    }
}

fn tier<'a>(s: &'a EngineStats, name: &str) -> &'a kvtier::TierStats {
    s.tiers
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no tier {name}"))
}

fn writes(e: &Engine, name: &str) -> u64 {
    tier(&e.stats(), name).writes
}

/// The remote tier `name` of an engine built by `mk` (L1 on, then off) is written each
/// chunk of a growing prompt once, and again after L1 lost them.
fn growing_prompt_writes_once(name: &str, mk: &dyn Fn(bool) -> Engine) {
    for local_cpu in [false, true] {
        let e = mk(local_cpu);
        let tokens = prompt(u32::from(local_cpu) + 7);
        store_growing(&e, &tokens, None);
        let w = writes(&e, name);
        assert_eq!(
            w, N as u64,
            "{name}, local_cpu {local_cpu}: {w} writes for {N} unique chunks"
        );
        // L1 forgets (eviction); storing the prompt again writes nothing below it.
        e.manager().clear_l1();
        store_growing(&e, &tokens, None);
        assert_eq!(
            writes(&e, name),
            N as u64,
            "{name}: re-stored after L1 lost it"
        );
        if local_cpu {
            // With L1 on, the chunks are claimed again and their writes skipped (counted);
            // with L1 off, the claim itself finds every tier holds them.
            assert!(tier(&e.stats(), name).writes_deduped > 0);
        }
        // Everything stored is there: a fresh engine reads the whole prompt back.
        let reader = mk(false);
        assert_eq!(reader.lookup(&tokens, None).unwrap().hit_tokens, N * CHUNK);
    }
}

#[test]
fn redis_is_written_each_chunk_once() {
    let Some(srv) = RedisServer::start(&[]) else {
        return;
    };
    let url = srv.url("");
    growing_prompt_writes_once("redis", &|local_cpu| {
        engine(local_cpu, |c| c.remote_url = vec![url.clone()])
    });
}

#[test]
fn disk_and_redis_behind_it_are_each_written_once() {
    let Some(srv) = RedisServer::start(&[]) else {
        return;
    };
    let url = srv.url("");
    let disk = tempfile::Builder::new()
        .prefix("write-once-disk-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let dir = disk.path().to_path_buf();
    for local_cpu in [false, true] {
        let sub = dir.join(format!("l1-{local_cpu}"));
        let e = engine(local_cpu, |c| {
            c.local_disk = vec![sub.clone()];
            c.max_local_disk_size = 64 << 20;
            c.remote_url = vec![url.clone()];
        });
        let tokens = prompt(100 + u32::from(local_cpu));
        store_growing(&e, &tokens, None);
        e.manager().clear_l1();
        store_growing(&e, &tokens, None);
        assert_eq!(writes(&e, "disk"), N as u64, "disk, local_cpu {local_cpu}");
        assert_eq!(
            writes(&e, "redis"),
            N as u64,
            "redis, local_cpu {local_cpu}"
        );
    }
}

#[test]
fn a_lookup_teaches_what_other_writers_stored_and_what_they_removed() {
    let Some(srv) = RedisServer::start(&[]) else {
        return;
    };
    let url = srv.url("");
    let mk = || engine(false, |c| c.remote_url = vec![url.clone()]);
    let (a, b) = (mk(), mk());
    let tokens = prompt(42);
    store_growing(&a, &tokens, None);
    assert_eq!(writes(&a, "redis"), N as u64);

    // B looks the prompt up before storing it (as a serving engine does): it learns the
    // store holds it and writes nothing.
    assert_eq!(b.lookup(&tokens, None).unwrap().hit_tokens, N * CHUNK);
    store_growing(&b, &tokens, None);
    assert_eq!(writes(&b, "redis"), 0, "B re-sent what A had stored");

    // Another writer wipes the store behind A's back. A's next lookup finds the prompt
    // gone (and A forgets it); its next store writes it again, and it hits once more.
    srv.cli(&["FLUSHALL"]);
    assert_eq!(a.lookup(&tokens, None).unwrap().hit_tokens, 0);
    store_growing(&a, &tokens, None);
    assert_eq!(
        writes(&a, "redis"),
        2 * N as u64,
        "the wiped prompt is written again, once"
    );
    assert_eq!(a.lookup(&tokens, None).unwrap().hit_tokens, N * CHUNK);
}

#[test]
fn dedupe_off_resends_as_before() {
    let Some(srv) = RedisServer::start(&[]) else {
        return;
    };
    let url = srv.url("");
    let e = engine(false, |c| {
        c.remote_url = vec![url.clone()];
        c.write_dedupe_chunks = 0;
    });
    store_growing(&e, &prompt(9), None);
    // Without memory of what it wrote, every store re-sends its earlier chunks.
    assert_eq!(writes(&e, "redis"), (N * (N + 1) / 2) as u64);
}
