//! The Redis tier against a real 3-master Redis Cluster on loopback: sharing, MOVED, and the
//! background slot-map refresh (after resharding, after node failures, all nodes down).

#[path = "support/redis_server.rs"]
mod redis_server;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvtier::keys::{ChunkKey, ModelIdentity};
use kvtier::layout::{Dtype, KvLayout};
use kvtier::manager::TierSpec;
use kvtier::tier::{PutOutcome, RedisTier, Tier};
use kvtier::{Engine, EngineConfig};
use redis_server::{RedisCluster, RedisServer};

/// An engine whose only lower tier is `tier` (no tier built from the config).
fn engine_over(tier: &Arc<RedisTier>) -> Engine {
    Engine::with_lower_tiers(
        config(Vec::new()),
        identity(),
        vec![TierSpec::new(tier.clone())],
    )
    .unwrap()
}

fn config(urls: Vec<String>) -> EngineConfig {
    EngineConfig {
        chunk_size: 16,
        max_local_cpu_size: 16 << 20,
        local_cpu_huge_pages: false,
        remote_url: urls,
        ..EngineConfig::default()
    }
}

fn identity() -> ModelIdentity {
    ModelIdentity::new("test/cluster", KvLayout::simple(2, 4, 64, Dtype::F16))
}

fn kv(e: &Engine, tokens: &[u32]) -> Vec<u8> {
    (0..e.payload_bytes(tokens.len()))
        .map(|i| (i * 13 % 251) as u8)
        .collect()
}

#[test]
fn two_engines_share_prefixes_through_a_cluster() {
    let Some(cluster) = RedisCluster::start(3) else {
        return;
    };
    let url = cluster.url("?prefix=c:");
    let a = Engine::new(config(vec![url.clone()]), identity()).unwrap();
    let tier = Arc::new(RedisTier::from_url(&url, 0).unwrap());
    let b = engine_over(&tier);
    let tokens: Vec<u32> = (0..320).collect(); // 20 chunks: spread over the 3 masters
    let payload = kv(&a, &tokens);
    let r = a.store(&tokens, None, &payload).unwrap();
    let outs = r.ticket.wait();
    assert_eq!(outs.len(), 20);
    assert!(
        outs.iter().all(|w| w.result == Ok(PutOutcome::Stored)),
        "{:?}",
        outs.iter().find(|w| w.result.is_err()).map(|w| &w.result)
    );
    // Keys really are spread over the masters.
    let per_node: Vec<usize> = cluster
        .nodes
        .iter()
        .map(|n| n.cli(&["dbsize"]).trim().parse().unwrap())
        .collect();
    assert_eq!(per_node.iter().sum::<usize>(), 20);
    assert!(
        per_node.iter().filter(|&&n| n > 0).count() >= 2,
        "{per_node:?}"
    );

    let l = b.lookup(&tokens, None).unwrap();
    assert_eq!((l.hit_tokens, l.tiers), (320, vec![1; 20]));
    let mut out = vec![0u8; payload.len()];
    let r = b.retrieve(&tokens, None, &mut out).unwrap();
    assert_eq!(r.hit_tokens, 320);
    assert_eq!(out, payload);
    let s = b.stats();
    assert_eq!(s.tiers[1].write_backs, 20);
    assert_eq!(s.l1.chunks, 20);
    assert_eq!(tier.stats().hits, 20);

    // A seed that is not the first node works too, and clear reaches every master.
    let url2 = format!(
        "redis+cluster://127.0.0.1:{}?prefix=c:",
        cluster.nodes[2].port
    );
    let c = Engine::new(config(vec![url2]), identity()).unwrap();
    assert_eq!(c.lookup(&tokens, None).unwrap().hit_tokens, 320);
    let cleared = c.clear().unwrap();
    assert!(cleared.contains(&("redis".to_string(), 20)), "{cleared:?}");
}

#[test]
fn moved_slots_are_followed() {
    let Some(cluster) = RedisCluster::start(3) else {
        return;
    };
    let url = cluster.url("?prefix=m:");
    let tier = Arc::new(RedisTier::from_url(&url, 0).unwrap());
    let a = engine_over(&tier);
    let tokens: Vec<u32> = (1000..1160).collect(); // 10 chunks
    let payload = kv(&a, &tokens);
    assert!(a
        .store(&tokens, None, &payload)
        .unwrap()
        .ticket
        .wait()
        .iter()
        .all(|w| w.result == Ok(PutOutcome::Stored)));

    // Move the slot of chunk 0's key from its owner to another master, behind the tier's back.
    let key = format!("m:{}", a.chunk_spans(&tokens, None).unwrap()[0].key);
    let slot: u16 = cluster.nodes[0]
        .cli(&["cluster", "keyslot", &key])
        .trim()
        .parse()
        .unwrap();
    let ids: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| n.cli(&["cluster", "myid"]).trim().to_string())
        .collect();
    let owner = cluster
        .nodes
        .iter()
        .position(|n| {
            n.cli(&["cluster", "countkeysinslot", &slot.to_string()])
                .trim()
                != "0"
        })
        .expect("owner");
    let dest = (owner + 1) % 3;
    let (src_n, dst_n) = (&cluster.nodes[owner], &cluster.nodes[dest]);
    let s = slot.to_string();
    assert!(dst_n
        .cli(&["cluster", "setslot", &s, "importing", &ids[owner]])
        .contains("OK"));
    assert!(src_n
        .cli(&["cluster", "setslot", &s, "migrating", &ids[dest]])
        .contains("OK"));
    let mig = src_n.cli(&[
        "migrate",
        "127.0.0.1",
        &dst_n.port.to_string(),
        &key,
        "0",
        "5000",
    ]);
    assert!(mig.contains("OK"), "{mig}");
    for n in &cluster.nodes {
        n.cli(&["cluster", "setslot", &s, "node", &ids[dest]]);
    }
    // The tier still routes chunk 0 to the old owner: MOVED is followed and the map refreshed.
    let b = engine_over(&tier);
    let mut out = vec![0u8; payload.len()];
    assert_eq!(b.retrieve(&tokens, None, &mut out).unwrap().hit_tokens, 160);
    assert_eq!(out, payload);
    assert!(tier.stats().redirects >= 1);
}

/// Moves `slot` (and its keys) from `src` to `dst` the way `redis-cli --cluster reshard` does:
/// IMPORTING/MIGRATING, MIGRATE of every key, then SETSLOT NODE on every master.
fn move_slot(nodes: &[RedisServer], ids: &[String], slot: u16, src: usize, dst: usize) {
    let s = slot.to_string();
    assert!(nodes[dst]
        .cli(&["cluster", "setslot", &s, "importing", &ids[src]])
        .contains("OK"));
    assert!(nodes[src]
        .cli(&["cluster", "setslot", &s, "migrating", &ids[dst]])
        .contains("OK"));
    let keys = nodes[src].cli(&["cluster", "getkeysinslot", &s, "1000"]);
    for key in keys.lines().filter(|k| !k.is_empty()) {
        let r = nodes[src].cli(&[
            "migrate",
            "127.0.0.1",
            &nodes[dst].port.to_string(),
            key,
            "0",
            "5000",
        ]);
        assert!(r.contains("OK"), "{r}");
    }
    for n in nodes {
        n.cli(&["cluster", "setslot", &s, "node", &ids[dst]]);
    }
}

/// Waits until `f` holds, up to `limit`.
fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn background_refresh_follows_resharding_and_node_failures() {
    let Some(mut cluster) = RedisCluster::start(3) else {
        return;
    };
    let tier =
        Arc::new(RedisTier::from_url(&cluster.url("?prefix=r:&slot_refresh_sec=1"), 0).unwrap());
    // The map is loaded at startup, before any request.
    wait_for(Duration::from_secs(5), "the startup slot map", || {
        tier.stats().slot_map_refreshes >= 1
    });
    let a = engine_over(&tier);
    let tokens: Vec<u32> = (5000..5480).collect(); // 30 chunks over the 3 masters
    let payload = kv(&a, &tokens);
    let outs = a.store(&tokens, None, &payload).unwrap().ticket.wait();
    assert!(outs.iter().all(|w| w.result == Ok(PutOutcome::Stored)));
    assert_eq!(tier.stats().redirects, 0);

    // Reshard behind the tier's back: every slot of node 0 that holds one of our keys moves
    // to node 1 (and every such slot of node 1 to node 2).
    let ids: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| n.cli(&["cluster", "myid"]).trim().to_string())
        .collect();
    let mut moved = 0;
    for (src, dst) in [(0, 1), (1, 2)] {
        let keys = cluster.nodes[src].cli(&["keys", "r:*"]);
        let mut slots: Vec<u16> = keys
            .lines()
            .filter(|k| !k.is_empty())
            .map(|k| {
                cluster.nodes[src]
                    .cli(&["cluster", "keyslot", k])
                    .trim()
                    .parse()
                    .unwrap()
            })
            .collect();
        slots.sort_unstable();
        slots.dedup();
        for slot in slots {
            move_slot(&cluster.nodes, &ids, slot, src, dst);
            moved += 1;
        }
    }
    assert!(moved >= 2, "moved {moved} slots");
    // The periodic refresh picks the new owners up without any request running into MOVED.
    // Two more loads: the first may have started before the last SETSLOT.
    let after_move = tier.stats().slot_map_refreshes;
    wait_for(Duration::from_secs(6), "periodic refreshes", || {
        tier.stats().slot_map_refreshes >= after_move + 2
    });
    let b = engine_over(&tier);
    let mut out = vec![0u8; payload.len()];
    assert_eq!(b.retrieve(&tokens, None, &mut out).unwrap().hit_tokens, 480);
    assert_eq!(out, payload);
    let st = tier.stats();
    assert_eq!(
        st.redirects, 0,
        "requests hit MOVED: the map was not refreshed"
    );
    assert_eq!(st.hits, 30);

    // Without a period, a failing node wakes the refresher.
    let quiet = RedisTier::from_url(
        &cluster.url("?prefix=r:&slot_refresh_sec=0&connect_timeout_ms=300"),
        0,
    )
    .unwrap();
    wait_for(Duration::from_secs(5), "the startup slot map", || {
        quiet.stats().slot_map_refreshes == 1
    });
    let keys: Vec<ChunkKey> = a
        .chunk_spans(&tokens, None)
        .unwrap()
        .iter()
        .map(|s| s.key)
        .collect();
    assert_eq!(
        futures::executor::block_on(quiet.contains_prefix(&keys)).unwrap(),
        30
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        quiet.stats().slot_map_refreshes,
        1,
        "no refresh without a cause"
    );
    cluster.nodes[2].kill();
    assert!(futures::executor::block_on(quiet.contains_prefix(&keys)).is_err());
    wait_for(
        Duration::from_secs(3),
        "a refresh after the node failed",
        || quiet.stats().slot_map_refreshes >= 2,
    );

    // Every node down: refreshes fail, the old map stays (errors name a node, not a missing
    // map), and nothing hangs.
    cluster.nodes[0].kill();
    cluster.nodes[1].kill();
    let t0 = Instant::now();
    let e = futures::executor::block_on(quiet.contains_prefix(&keys))
        .unwrap_err()
        .to_string();
    assert!(e.contains("redis 127.0.0.1:"), "{e}");
    wait_for(Duration::from_secs(5), "a failed refresh", || {
        quiet.stats().slot_map_refresh_failures >= 1
    });
    let e = futures::executor::block_on(quiet.contains_prefix(&keys))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("redis 127.0.0.1:") && !e.contains("slot map unavailable"),
        "{e}"
    );
    assert!(t0.elapsed() < Duration::from_secs(10));
}
