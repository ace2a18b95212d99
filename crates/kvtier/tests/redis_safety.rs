//! Shared-store safety of the Redis tier against real `redis-server` processes.

#[path = "support/redis_server.rs"]
mod redis_server;

use std::sync::Arc;
use std::time::Duration;

use kvtier::keys::ModelIdentity;
use kvtier::layout::{Dtype, KvLayout};
use kvtier::manager::TierSpec;
use kvtier::tier::{PutOutcome, RedisTier};
use kvtier::{Engine, EngineConfig};
use redis_server::RedisServer;

const CHUNK: usize = 16;

fn identity() -> ModelIdentity {
    ModelIdentity::new("test/redis-safety", KvLayout::simple(2, 8, 64, Dtype::F16))
}

fn config() -> EngineConfig {
    EngineConfig {
        chunk_size: CHUNK,
        max_local_cpu_size: 16 << 20,
        local_cpu_huge_pages: false,
        ..EngineConfig::default()
    }
}

fn prompt(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| seed.wrapping_mul(1_000_003).wrapping_add(i * 17))
        .collect()
}

#[test]
fn first_write_after_a_restart_is_retried_on_a_fresh_connection() {
    let Some(mut srv) = RedisServer::start(&[]) else {
        return;
    };
    let tier = Arc::new(RedisTier::from_url(&srv.url("?prefix=rs:&pool=1"), 0).unwrap());
    let e = Engine::with_lower_tiers(config(), identity(), vec![TierSpec::new(tier.clone())]).unwrap();
    let t = prompt(1, 16);
    let kv = vec![7u8; 16 * e.bytes_per_token()];
    let r = e.store(&t, None, &kv).unwrap();
    let w = r.ticket.wait();
    eprintln!("{:?}", w.iter().map(|w| w.result.clone()).collect::<Vec<_>>());
    srv.restart();
    std::thread::sleep(Duration::from_millis(100));
    let t = prompt(2, 16);
    let r = e.store(&t, None, &kv).unwrap();
    let w = r.ticket.wait();
    eprintln!("{:?}", w.iter().map(|w| w.result.clone()).collect::<Vec<_>>());
    eprintln!("{:?}", tier.stats());
    assert!(w.iter().all(|w| w.result == Ok(PutOutcome::Stored)));
}
