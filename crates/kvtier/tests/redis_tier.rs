//! The Redis tier against real `redis-server` processes on loopback: sharing between two
//! engines, corrupt values, server kill/restart, clear and per-salt removal, TTL.

#[path = "support/redis_server.rs"]
mod redis_server;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvtier::keys::ModelIdentity;
use kvtier::layout::{Dtype, KvLayout};
use kvtier::manager::TierSpec;
use kvtier::tier::{PutOutcome, RedisTier};
use kvtier::{Engine, EngineConfig};
use redis_server::{raw_command, RedisServer};

const CHUNK: usize = 16;

fn identity() -> ModelIdentity {
    // 2 layers x 8 heads x 64 dims x f16 x K/V = 4 KiB per token, 64 KiB per chunk.
    ModelIdentity::new("test/redis", KvLayout::simple(2, 8, 64, Dtype::F16))
}

fn config(urls: Vec<String>, f: impl FnOnce(&mut EngineConfig)) -> EngineConfig {
    let mut cfg = EngineConfig {
        chunk_size: CHUNK,
        max_local_cpu_size: 16 << 20,
        local_cpu_huge_pages: false,
        remote_url: urls,
        ..EngineConfig::default()
    };
    f(&mut cfg);
    cfg
}

fn engine(url: &str) -> Engine {
    Engine::new(config(vec![url.to_string()], |_| {}), identity()).unwrap()
}

/// An engine over an explicit Redis tier (to read the tier's own counters).
fn engine_with_tier(url: &str, f: impl FnOnce(&mut EngineConfig)) -> (Engine, Arc<RedisTier>) {
    let tier = Arc::new(RedisTier::from_url(url, 0).unwrap());
    let e = Engine::with_lower_tiers(
        config(Vec::new(), f),
        identity(),
        vec![TierSpec::new(tier.clone())],
    )
    .unwrap();
    (e, tier)
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

/// Stores and waits until every lower-tier write finished; returns how many were stored.
fn store_and_wait(e: &Engine, tokens: &[u32], salt: Option<&str>, kv: &[u8]) -> usize {
    let r = e.store(tokens, salt, kv).unwrap();
    r.ticket
        .wait()
        .iter()
        .filter(|w| w.result == Ok(PutOutcome::Stored))
        .count()
}

#[test]
fn two_engines_share_prefixes_through_redis() {
    let Some(srv) = RedisServer::start(&[]) else {
        return;
    };
    let url = srv.url("/0?prefix=share:");
    let a = engine(&url);
    let b = engine(&url);
    let tokens = prompt(1, 100);
    let kv = kv_for(&a, &tokens);
    assert_eq!(store_and_wait(&a, &tokens, None, &kv), 6);
    assert_eq!(srv.cli(&["dbsize"]).trim(), "6");

    // B has an empty L1: the whole prefix is in Redis (tier 1).
    let l = b.lookup(&tokens, None).unwrap();
    assert_eq!((l.hit_tokens, l.tiers.clone()), (96, vec![1; 6]));
    let mut out = vec![0u8; kv.len()];
    let r = b.retrieve(&tokens, None, &mut out).unwrap();
    assert_eq!(r.hit_tokens, 96);
    assert_eq!(r.tiers, vec![1; 6]);
    let n = 96 * b.bytes_per_token();
    assert_eq!(&out[..n], &kv[..n]);

    // Written back into B's L1.
    let s = b.stats();
    assert_eq!(s.tiers[1].name, "redis");
    assert_eq!(s.tiers[1].hits, 6);
    assert_eq!(s.tiers[1].write_backs, 6);
    assert_eq!(s.l1.chunks, 6);
    assert_eq!(b.lookup(&tokens, None).unwrap().tiers, vec![0; 6]);

    // A longer prompt sharing the prefix: B finds the shared part only.
    let longer = [&tokens[..96], &prompt(2, 64)[..]].concat();
    assert_eq!(b.lookup(&longer, None).unwrap().hit_tokens, 96);
}

#[test]
fn prefix_lookup_stops_at_the_first_gap() {
    let Some(srv) = RedisServer::start(&[]) else {
        return;
    };
    let url = srv.url("?prefix=gap:");
    let a = engine(&url);
    let b = engine(&url);
    let tokens = prompt(3, 128);
    let kv = kv_for(&a, &tokens);
    assert_eq!(store_and_wait(&a, &tokens, None, &kv), 8);
    // Remove chunk 3 from Redis: B sees only the first three.
    let keys: Vec<_> = a.chunk_spans(&tokens, None).unwrap();
    let gone = format!("gap:{}", keys[3].key);
    assert_eq!(srv.cli(&["del", &gone]).trim(), "1");
    assert_eq!(b.lookup(&tokens, None).unwrap().hit_tokens, 48);
}

#[test]
fn corrupt_value_is_a_miss_deleted_and_counted() {
    let Some(srv) = RedisServer::start(&[]) else {
        return;
    };
    let url = srv.url("?prefix=bad:");
    let a = engine(&url);
    let (b, tier) = engine_with_tier(&url, |_| {});
    let tokens = prompt(4, 48);
    let kv = kv_for(&a, &tokens);
    assert_eq!(store_and_wait(&a, &tokens, None, &kv), 3);
    let keys = a.chunk_spans(&tokens, None).unwrap();
    let k1 = format!("bad:{}", keys[1].key);
    // Garbage, then a valid record whose payload has one flipped byte.
    assert_eq!(
        raw_command(srv.port, &format!("SET {k1} garbage")).unwrap(),
        "+OK\r\n"
    );
    let mut out = vec![0u8; kv.len()];
    let r = b.retrieve(&tokens, None, &mut out).unwrap();
    assert_eq!(r.hit_tokens, 16, "stops before the corrupt chunk");
    assert_eq!(tier.stats().checksum_failures, 1);
    assert_eq!(srv.cli(&["exists", &k1]).trim(), "0", "corrupt key deleted");

    // A bit flip in the payload of a real record.
    let k2 = format!("bad:{}", keys[2].key);
    let len: usize = srv.cli(&["strlen", &k2]).trim().parse().unwrap();
    srv.cli(&["setrange", &k2, &(len - 10).to_string(), "X"]);
    let c = b.manager().get(keys[2].key).unwrap();
    assert!(c.is_none());
    assert_eq!(tier.stats().checksum_failures, 2);
    assert_eq!(srv.cli(&["exists", &k2]).trim(), "0");
    // Neither counted as a tier error: the tier stays up.
    let s = b.stats();
    assert_eq!(s.tiers[1].errors, 0);
    assert!(!s.tiers[1].down);
}

#[test]
fn redis_down_at_start_then_killed_and_restarted() {
    let Some(mut srv) = RedisServer::start(&[]) else {
        return;
    };
    let url = srv.url("?prefix=kr:&connect_timeout_ms=300&retry_max_ms=500");
    srv.kill();
    // Down at start: the engine starts and works from L1.
    let deadline_ms = 500;
    let set = |c: &mut EngineConfig| {
        c.read_deadline_ms = deadline_ms;
        c.store_deadline_ms = deadline_ms;
    };
    let (a, tier) = engine_with_tier(&url, set);
    let bound = Duration::from_millis(deadline_ms * 3);
    let t = prompt(5, 64);
    let kv = kv_for(&a, &t);
    let t0 = Instant::now();
    let r = a.store(&t, None, &kv).unwrap();
    assert_eq!(r.stored_tokens, 64);
    let outs = r.ticket.wait();
    assert!(t0.elapsed() < bound, "store took {:?}", t0.elapsed());
    assert!(outs.iter().all(|w| w.result != Ok(PutOutcome::Stored)));
    assert_eq!(
        a.lookup(&t, None).unwrap().hit_tokens,
        64,
        "L1 still serves"
    );

    // Server comes up: the engine recovers without restart.
    srv.restart();
    let recovered = |e: &Engine, seed: u32| {
        let t0 = Instant::now();
        let mut i = 0;
        while t0.elapsed() < Duration::from_secs(30) {
            i += 1;
            // Fresh tokens each time: chunks already in L1 are not re-sent to lower tiers.
            let tokens = prompt(seed + i, 32);
            let kv = kv_for(e, &tokens);
            let s = Instant::now();
            let stored = store_and_wait(e, &tokens, None, &kv);
            assert!(s.elapsed() < bound, "store took {:?}", s.elapsed());
            if stored == 2 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    };
    assert!(recovered(&a, 100), "no recovery after the server started");
    let before_kill = tier.stats().connects;
    assert!(before_kill >= 1);

    // Killed mid-run: every call returns within the deadline, stores skipped, lookups miss.
    let t2 = prompt(6, 64);
    let kv2 = kv_for(&a, &t2);
    assert_eq!(store_and_wait(&a, &t2, None, &kv2), 4);
    srv.kill();
    let (b, _) = engine_with_tier(&url, set);
    for i in 0..5 {
        let s = Instant::now();
        let l = b.lookup(&t2, None).unwrap();
        assert_eq!(l.hit_tokens, 0);
        let mut out = vec![0u8; kv2.len()];
        assert_eq!(b.retrieve(&t2, None, &mut out).unwrap().hit_tokens, 0);
        let tokens = prompt(200 + i, 32);
        let kv = kv_for(&a, &tokens);
        assert_eq!(store_and_wait(&a, &tokens, None, &kv), 0);
        assert!(s.elapsed() < bound * 3, "calls took {:?}", s.elapsed());
    }
    assert!(a.stats().tiers[1].errors + a.stats().tiers[1].timeouts > 0);

    // Restart on the same port (data lost: no persistence): stores and hits work again.
    srv.restart();
    let t0 = Instant::now();
    let mut ok = false;
    while t0.elapsed() < Duration::from_secs(30) && !ok {
        // A fresh prompt (chunks already in A's L1 are not re-sent).
        let fresh = prompt(300 + t0.elapsed().as_millis() as u32, 48);
        let kvf = kv_for(&a, &fresh);
        if store_and_wait(&a, &fresh, None, &kvf) == 3 {
            let mut out = vec![0u8; kvf.len()];
            // B (fresh L1) reads it back through Redis once its own backoff has passed.
            let t1 = Instant::now();
            while t1.elapsed() < Duration::from_secs(30) {
                if b.retrieve(&fresh, None, &mut out).unwrap().hit_tokens == 48 {
                    assert_eq!(out, kvf);
                    ok = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        } else {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    assert!(ok, "no recovery after restart");
    assert!(tier.stats().connects > before_kill, "reconnected");
}

#[test]
fn clear_and_remove_salt_touch_only_this_prefix() {
    let Some(srv) = RedisServer::start(&[]) else {
        return;
    };
    let url = srv.url("?prefix=cl:");
    let e = engine(&url);
    srv.cli(&["set", "other:key", "keep"]);
    let t = prompt(7, 32);
    let kv = kv_for(&e, &t);
    assert_eq!(store_and_wait(&e, &t, Some("tenant-a"), &kv), 2);
    assert_eq!(store_and_wait(&e, &t, Some("tenant-b"), &kv), 2);
    assert_eq!(store_and_wait(&e, &t, None, &kv), 2);
    assert_eq!(srv.cli(&["dbsize"]).trim(), "7");
    let removed = e.remove_salt("tenant-a").unwrap();
    assert!(removed.contains(&("redis".to_string(), 2)), "{removed:?}");
    assert_eq!(srv.cli(&["dbsize"]).trim(), "5");
    let cleared = e.clear().unwrap();
    assert!(cleared.contains(&("redis".to_string(), 4)), "{cleared:?}");
    assert_eq!(srv.cli(&["dbsize"]).trim(), "1");
    assert_eq!(srv.cli(&["get", "other:key"]).trim(), "keep");
}

#[test]
fn ttl_and_database_options_apply() {
    let Some(srv) = RedisServer::start(&[]) else {
        return;
    };
    let url = srv.url("/3?prefix=ttl:&ttl_sec=120&pool=2");
    let e = engine(&url);
    let t = prompt(8, 16);
    let kv = kv_for(&e, &t);
    assert_eq!(store_and_wait(&e, &t, None, &kv), 1);
    let key = format!("ttl:{}", e.chunk_spans(&t, None).unwrap()[0].key);
    assert_eq!(srv.cli(&["-n", "3", "dbsize"]).trim(), "1");
    assert_eq!(srv.cli(&["-n", "0", "dbsize"]).trim(), "0");
    let ttl: i64 = srv.cli(&["-n", "3", "ttl", &key]).trim().parse().unwrap();
    assert!((100..=120).contains(&ttl), "ttl {ttl}");
}

#[test]
fn two_remotes_are_consulted_in_order() {
    let (Some(s1), Some(s2)) = (RedisServer::start(&[]), RedisServer::start(&[])) else {
        return;
    };
    let urls = vec![s1.url(""), s2.url("")];
    let a = Engine::new(config(urls.clone(), |_| {}), identity()).unwrap();
    let names: Vec<String> = a.stats().tiers.iter().map(|t| t.name.clone()).collect();
    assert_eq!(names, vec!["cpu", "redis", "redis2"]);
    let t = prompt(9, 32);
    let kv = kv_for(&a, &t);
    // Every lower tier gets the write.
    let r = a.store(&t, None, &kv).unwrap();
    let outs = r.ticket.wait();
    assert_eq!(
        outs.len(),
        4,
        "{:?}",
        outs.iter().map(|w| w.tier).collect::<Vec<_>>()
    );
    // Lose the first server's copy: the second serves.
    s1.cli(&["flushall"]);
    let b = Engine::new(config(urls, |_| {}), identity()).unwrap();
    assert_eq!(b.lookup(&t, None).unwrap().tiers, vec![2, 2]);
}
