//! A Redis database shared with other applications (issue 12): kvtier refuses to run without
//! a key namespace, `clear` deletes only kvtier's own chunks (standalone and cluster), a
//! cluster seed list can be given as one string, and the first write after a server
//! restart survives the stale pooled connections. Real `redis-server` processes.

#[path = "support/redis_server.rs"]
mod redis_server;

use std::collections::BTreeMap;
use std::sync::Arc;

use kvtier::keys::ModelIdentity;
use kvtier::layout::{Dtype, KvLayout};
use kvtier::manager::TierSpec;
use kvtier::tier::{PutOutcome, RedisTier};
use kvtier::{Engine, EngineConfig};
use redis_server::{RedisCluster, RedisServer};

const CHUNK: usize = 16;

fn identity() -> ModelIdentity {
    ModelIdentity::new("test/redis-safety", KvLayout::simple(2, 8, 64, Dtype::F16))
}

fn config(remote_url: Vec<String>) -> EngineConfig {
    EngineConfig {
        chunk_size: CHUNK,
        max_local_cpu_size: 16 << 20,
        local_cpu_huge_pages: false,
        remote_url,
        ..EngineConfig::default()
    }
}

fn prompt(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| seed.wrapping_mul(1_000_003).wrapping_add(i * 17))
        .collect()
}

/// Stores `tokens` and waits for the lower tiers; returns how many chunk writes stored.
fn store_and_wait(e: &Engine, tokens: &[u32], salt: Option<&str>) -> usize {
    let kv = vec![7u8; tokens.len() * e.bytes_per_token()];
    let r = e.store(tokens, salt, &kv).unwrap();
    r.ticket
        .wait()
        .iter()
        .filter(|w| w.result == Ok(PutOutcome::Stored))
        .count()
}

/// Keys another application keeps in the same database: some under kvtier's prefix, one
/// even named like a chunk key.
fn foreign_keys() -> Vec<(String, String)> {
    vec![
        ("app:config".into(), "keep".into()),
        ("kvtier:session:42".into(), "not kvtier's".into()),
        ("kvtier:".into(), "bare prefix".into()),
        (
            format!("kvtier:{}", "ab".repeat(32)),
            "named like a chunk".into(),
        ),
        (format!("kvtier:{}x", "cd".repeat(32)), "longer".into()),
    ]
}

/// Every key and its (text) value, over all `nodes`.
fn contents(nodes: &[&RedisServer]) -> BTreeMap<String, String> {
    let mut all = BTreeMap::new();
    for n in nodes {
        for k in n.cli(&["--scan"]).lines().filter(|l| !l.is_empty()) {
            let v = n.cli(&["getrange", k, "0", "31"]);
            all.insert(k.to_string(), v.trim_end().to_string());
        }
    }
    all
}

#[test]
fn an_empty_prefix_is_refused_with_a_clear_error() {
    let Some(srv) = RedisServer::start(&[]) else {
        return;
    };
    srv.cli(&["set", "app:config", "keep"]);
    for url in [srv.url("?prefix="), srv.url("/0?pool=2&prefix=")] {
        let Err(e) = RedisTier::from_url(&url, 0) else {
            panic!("empty prefix accepted: {url}");
        };
        let msg = e.to_string();
        assert!(msg.contains("`prefix` must not be empty"), "{msg}");
        assert!(msg.contains("kvtier:"), "says what to use instead: {msg}");
        let Err(e) = Engine::new(config(vec![url]), identity()) else {
            panic!("the engine accepted an empty prefix");
        };
        let e = e.to_string();
        assert!(e.contains("`prefix` must not be empty"), "{e}");
    }
    assert_eq!(srv.cli(&["get", "app:config"]).trim(), "keep");
}

#[test]
fn clear_deletes_only_kvtiers_own_chunks() {
    let Some(srv) = RedisServer::start(&[]) else {
        return;
    };
    for (k, v) in foreign_keys() {
        srv.cli(&["set", &k, &v]);
    }
    let foreign = contents(&[&srv]);
    let e = Engine::new(config(vec![srv.url("")]), identity()).unwrap();
    assert_eq!(store_and_wait(&e, &prompt(1, 64), None), 4);
    assert_eq!(store_and_wait(&e, &prompt(2, 32), Some("tenant")), 2);
    assert_eq!(contents(&[&srv]).len(), foreign.len() + 6);

    let removed = e.remove_salt("tenant").unwrap();
    assert!(removed.contains(&("redis".to_string(), 2)), "{removed:?}");
    let cleared = e.clear().unwrap();
    assert!(cleared.contains(&("redis".to_string(), 4)), "{cleared:?}");
    assert_eq!(
        contents(&[&srv]),
        foreign,
        "exactly the other keys are left"
    );
}

#[test]
fn cluster_clear_deletes_only_kvtiers_own_chunks() {
    let Some(cluster) = RedisCluster::start(3) else {
        return;
    };
    let nodes: Vec<&RedisServer> = cluster.nodes.iter().collect();
    // `-c` follows redirects: each key lands on the master owning its slot.
    for (k, v) in foreign_keys() {
        nodes[0].cli(&["-c", "set", &k, &v]);
    }
    let foreign = contents(&nodes);
    assert_eq!(foreign.len(), foreign_keys().len());
    let e = Engine::new(config(vec![cluster.url("")]), identity()).unwrap();
    assert_eq!(store_and_wait(&e, &prompt(3, 128), None), 8);
    assert_eq!(contents(&nodes).len(), foreign.len() + 8);

    let cleared = e.clear().unwrap();
    assert!(cleared.contains(&("redis".to_string(), 8)), "{cleared:?}");
    assert_eq!(contents(&nodes), foreign, "exactly the other keys are left");
}

#[test]
fn a_cluster_seed_list_in_one_string_is_one_tier() {
    let Some(cluster) = RedisCluster::start(3) else {
        return;
    };
    let seeds: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let url = format!("redis+cluster://{}/?prefix=seeds:", seeds.join(","));
    // A YAML string, and the environment variable: neither is cut at the seed commas.
    let yaml = format!("chunk_size: {CHUNK}\nlocal_cpu_huge_pages: false\nremote_url: \"{url}\"\n");
    let mut from_yaml = EngineConfig::from_yaml_str(&yaml).unwrap();
    from_yaml.max_local_cpu_size = 16 << 20;
    let mut from_env = config(Vec::new());
    from_env
        .apply_env([("KVTIER_REMOTE_URL".to_string(), url.clone())])
        .unwrap();
    for cfg in [from_yaml, from_env] {
        assert_eq!(cfg.remote_url, vec![url.clone()]);
        let e = Engine::new(cfg, identity()).unwrap();
        let names: Vec<String> = e.stats().tiers.iter().map(|t| t.name.clone()).collect();
        assert_eq!(names, ["cpu", "redis"]);
        assert_eq!(store_and_wait(&e, &prompt(4, 64), None), 4);
        let cleared = e.clear().unwrap();
        assert!(cleared.contains(&("redis".to_string(), 4)), "{cleared:?}");
    }
}

#[test]
fn first_write_after_a_restart_is_retried_on_a_fresh_connection() {
    let Some(mut srv) = RedisServer::start(&[]) else {
        return;
    };
    let tier = Arc::new(RedisTier::from_url(&srv.url("?prefix=rs:&pool=4"), 0).unwrap());
    let e = Engine::with_lower_tiers(
        config(Vec::new()),
        identity(),
        vec![TierSpec::new(tier.clone())],
    )
    .unwrap();
    // 8 chunks written concurrently: the pool ends up holding several idle connections.
    assert_eq!(store_and_wait(&e, &prompt(10, 128), None), 8);
    for round in 0..3 {
        let connects = tier.stats().connects;
        srv.restart();
        // Every pooled connection is now stale; the writes find that out one by one, each
        // at once retried on a fresh connection.
        let t = prompt(20 + round, 128);
        assert_eq!(
            store_and_wait(&e, &t, None),
            8,
            "round {round}: {:?}",
            tier.stats()
        );
        assert!(tier.stats().connects > connects, "reconnected");
        assert_eq!(
            srv.cli(&["dbsize"]).trim(),
            "8",
            "the restart lost the old keys"
        );
    }
}
