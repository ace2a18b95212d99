//! Redis authentication: `requirepass` and ACL users, credentials from the URL and from the
//! environment; a wrong password makes the tier fail while the engine keeps serving from L1.
//!
//! One test function on purpose: it sets process environment variables.

#[path = "support/redis_server.rs"]
mod redis_server;

use kvtier::keys::{ChunkKey, ModelIdentity};
use kvtier::layout::{Dtype, KvLayout};
use kvtier::tier::{PutOutcome, RedisTier, Tier};
use kvtier::{Engine, EngineConfig};
use redis_server::RedisServer;

fn engine(url: &str) -> Engine {
    let cfg = EngineConfig {
        chunk_size: 16,
        max_local_cpu_size: 8 << 20,
        local_cpu_huge_pages: false,
        read_deadline_ms: 1000,
        store_deadline_ms: 1000,
        remote_url: vec![url.to_string()],
        ..EngineConfig::default()
    };
    Engine::new(
        cfg,
        ModelIdentity::new("test/auth", KvLayout::simple(2, 2, 16, Dtype::F16)),
    )
    .unwrap()
}

fn prompt(seed: u32) -> Vec<u32> {
    (0..32u32).map(|i| seed * 1000 + i).collect()
}

/// Stores a fresh prompt; returns (chunks stored in Redis, the error texts of failed writes).
fn store(e: &Engine, seed: u32) -> (usize, Vec<String>) {
    let t = prompt(seed);
    let kv = vec![seed as u8; e.payload_bytes(t.len())];
    let r = e.store(&t, None, &kv).unwrap();
    assert_eq!(r.stored_tokens, 32, "L1 always takes the store");
    let outs = r.ticket.wait();
    let ok = outs
        .iter()
        .filter(|w| w.result == Ok(PutOutcome::Stored))
        .count();
    let errs = outs.iter().filter_map(|w| w.result.clone().err()).collect();
    (ok, errs)
}

fn fresh_reader_hits(url: &str, seed: u32) -> usize {
    engine(url).lookup(&prompt(seed), None).unwrap().hit_tokens
}

#[test]
fn requirepass_and_acl_users_from_url_and_env() {
    // --- requirepass (the default user) ---
    let Some(srv) = RedisServer::start(&["--requirepass", "s3cret-pw"]) else {
        return;
    };
    let port = srv.port;
    // Wrong password: writes fail, the secret never appears in errors, L1 keeps working.
    let bad = engine(&format!("redis://:wrong-pw@127.0.0.1:{port}"));
    let (ok, errs) = store(&bad, 1);
    assert_eq!(ok, 0);
    assert!(!errs.is_empty());
    for e in &errs {
        assert!(!e.contains("wrong-pw"), "secret leaked: {e}");
    }
    // The tier's own error names the cause, not the secret (and needs no caller runtime).
    let tier =
        RedisTier::from_url(&format!("redis://:wrong-pw@127.0.0.1:{port}?name=t"), 0).unwrap();
    let e = futures::executor::block_on(tier.contains_prefix(&[ChunkKey([1; 32])]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("authentication failed") || e.contains("unreachable"),
        "{e}"
    );
    assert!(!e.contains("wrong-pw"), "secret leaked: {e}");
    assert!(!format!("{tier:?}").contains("wrong-pw"));
    assert_eq!(bad.lookup(&prompt(1), None).unwrap().hit_tokens, 32);
    // No password at all: NOAUTH errors, same behaviour.
    let none = engine(&format!("redis://127.0.0.1:{port}"));
    assert_eq!(store(&none, 2).0, 0);
    // Right password in the URL.
    let good_url = format!("redis://:s3cret-pw@127.0.0.1:{port}");
    assert_eq!(store(&engine(&good_url), 3).0, 2);
    assert_eq!(fresh_reader_hits(&good_url, 3), 32);
    // Right password from the environment; the URL wins when it has one.
    let plain = format!("redis://127.0.0.1:{port}");
    std::env::set_var("KVTIER_REDIS_PASSWORD", "s3cret-pw");
    assert_eq!(store(&engine(&plain), 4).0, 2);
    assert_eq!(fresh_reader_hits(&plain, 4), 32);
    assert_eq!(
        store(&engine(&format!("redis://:wrong-pw@127.0.0.1:{port}")), 5).0,
        0
    );
    std::env::remove_var("KVTIER_REDIS_PASSWORD");
    drop(srv);

    // --- ACL user ---
    let Some(srv) = RedisServer::start(&[
        "--user",
        "default",
        "off",
        "--user",
        "kv",
        "on",
        ">acl-pw",
        "~kvtier:*",
        "+@all",
    ]) else {
        return;
    };
    let port = srv.port;
    let good = format!("redis://kv:acl-pw@127.0.0.1:{port}");
    assert_eq!(store(&engine(&good), 6).0, 2);
    assert_eq!(fresh_reader_hits(&good, 6), 32);
    let (ok, errs) = store(&engine(&format!("redis://kv:nope-pw@127.0.0.1:{port}")), 7);
    assert_eq!(ok, 0);
    assert!(errs.iter().all(|e| !e.contains("nope-pw")), "{errs:?}");
    // Username and password from the environment.
    std::env::set_var("KVTIER_REDIS_USERNAME", "kv");
    std::env::set_var("KVTIER_REDIS_PASSWORD", "acl-pw");
    let plain = format!("redis://127.0.0.1:{port}");
    assert_eq!(store(&engine(&plain), 8).0, 2);
    assert_eq!(fresh_reader_hits(&plain, 8), 32);
    std::env::remove_var("KVTIER_REDIS_USERNAME");
    std::env::remove_var("KVTIER_REDIS_PASSWORD");
}
