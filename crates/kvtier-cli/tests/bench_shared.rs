//! A bench pointed at someone else's store (a live `kvtier serve`, a Redis other
//! applications use, a directory that holds files) leaves what it did not write untouched
//! and removes what it wrote. Real servers: `kvtier serve` (this binary) and `redis-server`.

// `redis_server.rs` includes `process.rs` too, privately: this test needs its own handle.
#![allow(clippy::duplicate_mod)]

#[path = "../../kvtier/tests/support/process.rs"]
mod process;
#[path = "../../kvtier/tests/support/redis_server.rs"]
mod redis_server;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvtier::keys::ModelIdentity;
use kvtier::layout::{Dtype, KvLayout};
use kvtier::manager::TierSpec;
use kvtier::tier::{PutOutcome, RedisTier};
use kvtier::{Engine, EngineConfig, KvCache};
use kvtier_client::KvClient;
use redis_server::RedisServer;
use serde_json::Value;

/// A model of the user's own (not the bench's): 2 KiB per token.
fn user_identity() -> ModelIdentity {
    ModelIdentity::new("user/model", KvLayout::simple(4, 2, 64, Dtype::Bf16))
}

fn prompt(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| seed.wrapping_mul(7919) ^ i).collect()
}

fn bench(args: &[&str]) -> Value {
    bench_env(args, &[])
}

/// `kvtier bench args... --json` with `env` set (and no other kvtier config).
fn bench_env(args: &[&str], env: &[(&str, &str)]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_kvtier"))
        .arg("bench")
        .args(args)
        .arg("--json")
        .env_remove("KVTIER_CONFIG_FILE")
        .env_remove("KVTIER_REMOTE_URL")
        .env_remove("KVTIER_LOCAL_DISK")
        .envs(env.iter().copied())
        .output()
        .expect("running kvtier bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kvtier bench failed: {stderr}");
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

/// `kvtier serve` on a socket in `dir`, killed when dropped.
fn serve(dir: &Path) -> (process::ChildGuard, String) {
    let sock = dir.join("kv.sock");
    let ready = dir.join("ready.json");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvtier"));
    cmd.arg("serve")
        .arg("--socket")
        .arg(&sock)
        .arg("--ready-file")
        .arg(&ready)
        .env_remove("KVTIER_CONFIG_FILE")
        .env("KVTIER_MAX_LOCAL_CPU_SIZE", "256MiB")
        .env("KVTIER_LOCAL_CPU_USE_HUGEPAGES", "false")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = process::ChildGuard::spawn(&mut cmd).expect("spawning kvtier serve");
    let t0 = Instant::now();
    while !ready.exists() {
        assert!(t0.elapsed() < Duration::from_secs(60), "server not ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, format!("unix:{}", sock.display()))
}

#[test]
fn bench_against_a_live_server_removes_only_its_own_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, addr) = serve(dir.path());
    // The server's users: one prompt without a salt, one with a tenant salt.
    let user = KvClient::connect(&addr, user_identity()).unwrap();
    let t = prompt(1, 1024);
    let kv = vec![7u8; t.len() * user.bytes_per_token()];
    user.store(&t, None, &kv).unwrap();
    user.store(&t, Some("tenant-a"), &kv).unwrap();
    assert_eq!(user.lookup(&t, None).unwrap().hit_tokens, 1024);
    let chunks_before = user.stats_json().unwrap()["l1"]["chunks"].as_u64().unwrap();
    assert_eq!(chunks_before, 8);

    let json = bench(&[
        "long-doc-qa",
        "--model",
        "tiny",
        "--l1-gb",
        "0.05",
        "--docs",
        "2",
        "--doc-tokens",
        "1024",
        "--server",
        &addr,
    ]);
    assert!(json["server"]["server_store_gbps"].as_f64().unwrap() > 0.0);
    // Paired rounds: a ratio per round for store and retrieve, summarised as the median.
    let s = &json["server"];
    for key in ["store_ratio_rounds", "retrieve_ratio_rounds"] {
        let rounds = s[key].as_array().unwrap_or_else(|| panic!("{key}: {s}"));
        assert_eq!(rounds.len(), 5, "{key}: {s}");
        assert!(
            rounds.iter().all(|r| r.as_f64().unwrap() > 0.0),
            "{key}: {s}"
        );
    }
    assert_eq!(
        json["ratios"]["server_store_vs_embedded"], s["store_ratio"]["median"],
        "{json}"
    );

    // The users' data is all there, and nothing of the bench's is left.
    assert_eq!(user.lookup(&t, None).unwrap().hit_tokens, 1024);
    assert_eq!(user.lookup(&t, Some("tenant-a")).unwrap().hit_tokens, 1024);
    let stats = user.stats_json().unwrap();
    assert_eq!(
        stats["l1"]["chunks"].as_u64(),
        Some(chunks_before),
        "{stats}"
    );
}

/// Every key of the database (a few hundred at most here).
fn all_keys(srv: &RedisServer) -> BTreeSet<String> {
    srv.cli(&["--scan"])
        .lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn bench_remote_against_a_users_redis_removes_only_its_own_keys() {
    if redis_server::find_bin("redis-benchmark").is_none() {
        if std::env::var_os("KVTIER_REQUIRE_TEST_SERVERS")
            .is_some_and(|v| !v.is_empty() && v != "0")
        {
            panic!("redis-benchmark not found: install redis-tools");
        }
        eprintln!("SKIPPED: redis-benchmark not found; install redis-tools");
        return;
    }
    let Some(srv) = RedisServer::start(&[]) else {
        return;
    };
    // Another application's keys, named like redis-benchmark's, and a kvtier deployment's
    // chunks under the default prefix.
    srv.cli(&["set", "key:000000000001", "other-app"]);
    srv.cli(&["set", "app:config", "keep"]);
    let tier = Arc::new(RedisTier::from_url(&srv.url(""), 0).unwrap());
    let cfg = EngineConfig {
        chunk_size: 256,
        max_local_cpu_size: 64 << 20,
        local_cpu_huge_pages: false,
        ..EngineConfig::default()
    };
    let e = Engine::with_lower_tiers(cfg, user_identity(), vec![TierSpec::new(tier)]).unwrap();
    let t = prompt(2, 512);
    let kv = vec![9u8; t.len() * e.bytes_per_token()];
    let outs = e.store(&t, None, &kv).unwrap().ticket.wait();
    assert!(outs.iter().all(|w| w.result == Ok(PutOutcome::Stored)));
    let before = all_keys(&srv);
    assert_eq!(before.len(), 4, "{before:?}");

    let json = bench(&[
        "remote",
        "--model",
        "tiny",
        "--kv-heads",
        "2",
        "--docs",
        "1",
        "--doc-tokens",
        "1024",
        "--remote-url",
        &srv.url(""),
    ]);
    // It did measure this server...
    assert_eq!(json["results"]["hit_chunks"].as_u64(), Some(4), "{json}");
    assert!(json["baseline"]["redis_set_gbps"].as_f64().unwrap() > 0.0);
    // ...and left exactly what was there.
    assert_eq!(all_keys(&srv), before);
    assert_eq!(srv.cli(&["get", "key:000000000001"]).trim(), "other-app");
    assert_eq!(srv.cli(&["get", "app:config"]).trim(), "keep");
}

#[test]
fn disk_bench_in_a_directory_with_files_leaves_them() {
    let dir = tempfile::tempdir().unwrap();
    // Files the bench did not write, named like its own rounds.
    std::fs::create_dir(dir.path().join("round-0")).unwrap();
    std::fs::write(dir.path().join("round-0/keep.txt"), "mine").unwrap();
    std::fs::write(dir.path().join("notes.txt"), "mine too").unwrap();
    let json = bench(&[
        "disk",
        "--model",
        "tiny",
        "--docs",
        "1",
        "--doc-tokens",
        "512",
        "--reps",
        "1",
        "--disk-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(json["workload"], "disk");
    let left: BTreeSet<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        left,
        BTreeSet::from(["notes.txt".to_string(), "round-0".to_string()])
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("round-0/keep.txt")).unwrap(),
        "mine"
    );
}

#[test]
fn workload_bench_with_a_shared_redis_in_its_config_leaves_nothing_there() {
    let Some(srv) = RedisServer::start(&[]) else {
        return;
    };
    srv.cli(&["set", "app:config", "keep"]);
    let url = srv.url("/0?prefix=shared:");
    let json = bench_env(
        &[
            "long-doc-qa",
            "--model",
            "tiny",
            "--l1-gb",
            "0.05",
            "--docs",
            "2",
            "--doc-tokens",
            "1024",
        ],
        &[("KVTIER_REMOTE_URL", &url)],
    );
    // The bench wrote through the shared tier...
    let tiers = json["engine"]["tiers"].as_array().expect("engine tiers");
    let redis = tiers
        .iter()
        .find(|t| t["name"] == "redis")
        .unwrap_or_else(|| panic!("no redis tier: {json}"));
    assert!(redis["stored_chunks"].as_u64().unwrap_or(0) > 0, "{redis}");
    // ...and removed what it wrote, nothing else.
    assert_eq!(all_keys(&srv), BTreeSet::from(["app:config".to_string()]));
}
