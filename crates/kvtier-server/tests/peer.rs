//! The `kvtier://` tier end to end: a real `kvtier-server` process on a loopback TCP port,
//! engines standing for other nodes (this test binary re-executed with `KVTIER_PEER_CHILD`
//! where a separate process matters), real sockets throughout.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use kvtier::tier::PutOutcome;
use kvtier::{Engine, EngineConfig, EngineStats};
use serde_json::Value;

const DOC_TOKENS: usize = 160; // 10 chunks of 16 tokens
const READ_DEADLINE_MS: u64 = 500;

/// A node's engine config: its own L1, optionally its own disk tier, then `remote`.
fn node_config(disk: Option<&Path>, remote: &str) -> EngineConfig {
    EngineConfig {
        chunk_size: CHUNK,
        max_local_cpu_size: 16 << 20,
        local_cpu_huge_pages: false,
        local_disk: disk.map(|d| vec![d.to_path_buf()]).unwrap_or_default(),
        max_local_disk_size: 64 << 20,
        remote_url: vec![remote.to_string()],
        read_deadline_ms: READ_DEADLINE_MS,
        store_deadline_ms: 2000,
        ..EngineConfig::default()
    }
}

fn tcp_addr(srv: &Server) -> String {
    srv.bound["tcp"].as_str().unwrap().to_string()
}

fn peer_stats(stats: &EngineStats) -> &kvtier::TierStats {
    stats
        .tiers
        .iter()
        .find(|t| t.name == "peer")
        .expect("a tier named peer")
}

/// Stores `doc` and waits for every lower-tier write; returns whether the peer tier stored
/// every chunk.
fn store_doc(e: &Engine, doc: u64) -> bool {
    let r = e
        .store(&tokens(doc, DOC_TOKENS), None, &payload(doc, DOC_TOKENS))
        .unwrap();
    assert_eq!(r.stored_tokens, DOC_TOKENS, "doc {doc}");
    let names = e.manager().tier_names();
    let stored = r
        .ticket
        .wait()
        .into_iter()
        .filter(|o| names[o.tier] == "peer" && matches!(o.result, Ok(PutOutcome::Stored)))
        .count();
    stored == DOC_TOKENS / CHUNK
}

/// Re-executes this binary as another node; returns its stdout and stderr.
fn run_child(role: &str, envs: &[(&str, String)]) -> (String, String) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--ignored",
        "--exact",
        "peer_child_entry",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("KVTIER_PEER_CHILD", role)
    .env_remove("KVTIER_AUTH_TOKEN")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = process::die_with_parent(&mut cmd)
        .output()
        .expect("spawning the child node");
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "child {role} failed:\n{so}\n{se}");
    (so, se)
}

/// What follows `tag` in the child's output (the test harness may print on the same line).
fn child_line<'a>(stdout: &'a str, tag: &str) -> &'a str {
    stdout
        .lines()
        .find_map(|l| l.split_once(tag).map(|x| x.1))
        .unwrap_or_else(|| panic!("no {tag} line in:\n{stdout}"))
}

/// Entry point of the child nodes the tests start (this binary run with
/// `--ignored --exact peer_child_entry`). Ignored so it never counts as a passing test; it
/// does nothing when run by hand without the parent's environment.
#[test]
#[ignore = "child process of two_nodes_share_prefixes_through_a_kvtier_server and a_wrong_token_is_a_clear_error_logged_once_and_misses"]
fn peer_child_entry() {
    let Ok(role) = std::env::var("KVTIER_PEER_CHILD") else {
        eprintln!("peer_child_entry: only the tests that start other nodes run it");
        return;
    };
    let url = std::env::var("KVTIER_PEER_URL").unwrap();
    match role.as_str() {
        // Node A: stores documents through its own L1 and disk, and the kvtier server.
        "writer" => {
            let disk = std::env::var("KVTIER_PEER_DISK").unwrap();
            let e = Engine::new(node_config(Some(Path::new(&disk)), &url), identity()).unwrap();
            for doc in 1..=3 {
                let r = e
                    .store(&tokens(doc, DOC_TOKENS), None, &payload(doc, DOC_TOKENS))
                    .unwrap();
                assert_eq!(r.stored_tokens, DOC_TOKENS);
                let outcomes = r.ticket.wait();
                // Ten chunks, each to the disk and to the server.
                assert_eq!(outcomes.len(), 20, "{outcomes:?}");
                for o in outcomes {
                    assert!(
                        matches!(o.result, Ok(PutOutcome::Stored)),
                        "tier {}: {:?}",
                        o.tier,
                        o.result
                    );
                }
            }
            let s = e.stats();
            println!(
                "PEER_STATS {}",
                serde_json::to_string(&peer_stats(&s).details).unwrap()
            );
        }
        // A node with the wrong token: everything still works locally, the tier misses.
        "bad_token" => {
            let _ = tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_env_filter("info")
                .with_ansi(false)
                .try_init();
            let e = Engine::new(node_config(None, &url), identity()).unwrap();
            let t0 = Instant::now();
            let mut calls: u64 = 0;
            // At least 3 s of calls, and until the tier has retried (the manager's and the
            // link's backoffs decide when; a loaded machine makes fewer calls in 3 s).
            let retried =
                |e: &Engine| peer_stats(&e.stats()).details["auth_failures"].as_u64() >= Some(2);
            while t0.elapsed() < Duration::from_secs(3)
                || (!retried(&e) && t0.elapsed() < Duration::from_secs(20))
            {
                let t = Instant::now();
                assert_eq!(
                    e.lookup(&tokens(77, DOC_TOKENS), None).unwrap().hit_tokens,
                    0
                );
                store_doc(&e, 100 + calls);
                let l = e.lookup(&tokens(100 + calls, DOC_TOKENS), None).unwrap();
                assert_eq!(l.hit_tokens, DOC_TOKENS, "served from L1");
                assert!(
                    t.elapsed() < Duration::from_millis(READ_DEADLINE_MS * 3),
                    "calls took {:?}",
                    t.elapsed()
                );
                calls += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            let s = e.stats();
            println!(
                "PEER_STATS {}",
                serde_json::to_string(&peer_stats(&s).details).unwrap()
            );
        }
        other => panic!("unknown child role {other}"),
    }
}

#[test]
fn two_nodes_share_prefixes_through_a_kvtier_server() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), &base_yaml(), &["--tcp", "127.0.0.1:0"], &[]);
    let url = format!("kvtier://{}", tcp_addr(&srv));

    // Node A (another process, its own L1 and disk) stores three documents.
    let disk_a = dir.path().join("disk-a");
    let (out, _) = run_child(
        "writer",
        &[
            ("KVTIER_PEER_URL", url.clone()),
            ("KVTIER_PEER_DISK", disk_a.display().to_string()),
        ],
    );
    let a: Value = serde_json::from_str(child_line(&out, "PEER_STATS ")).unwrap();
    assert_eq!(a["puts"], 30, "{a}");

    // Node B (this process, its own L1 and disk) hits what A stored.
    let disk_b = dir.path().join("disk-b");
    let b = Engine::new(node_config(Some(&disk_b), &url), identity()).unwrap();
    let peer_tier = b.manager().tier_names().iter().position(|n| n == "peer");
    assert_eq!(peer_tier, Some(2), "cpu, disk, then the kvtier server");
    for doc in 1..=3 {
        let t = tokens(doc, DOC_TOKENS);
        let before = peer_stats(&b.stats()).details["probes"].as_u64().unwrap();
        let l = b.lookup(&t, None).unwrap();
        assert_eq!(l.hit_tokens, DOC_TOKENS, "doc {doc}");
        assert_eq!(
            l.tiers,
            vec![2; 10],
            "doc {doc}: every chunk from the server"
        );
        let after = peer_stats(&b.stats()).details["probes"].as_u64().unwrap();
        assert_eq!(after - before, 1, "a 10-chunk prefix is one round trip");

        let mut got = vec![0u8; DOC_TOKENS * BPT];
        let r = b.retrieve(&t, None, &mut got).unwrap();
        assert_eq!(r.hit_tokens, DOC_TOKENS);
        assert_eq!(r.tiers, vec![2; 10]);
        assert_eq!(got, payload(doc, DOC_TOKENS), "doc {doc} bytes");

        // Write-back (C3) put them in B's L1: the next lookup and read are local.
        let l = b.lookup(&t, None).unwrap();
        assert_eq!(l.tiers, vec![0; 10], "doc {doc} now in B's L1");
        let r = b.retrieve(&t, None, &mut got).unwrap();
        assert_eq!(r.tiers, vec![0; 10]);
    }
    let s = b.stats();
    let p = peer_stats(&s);
    assert_eq!((p.hits, p.write_backs, p.checksum_failures), (30, 30, 0));
    assert_eq!(
        s.tiers[0].usage.chunks, 30,
        "B's L1 holds the promoted chunks"
    );
    assert_eq!(p.details["url"], url.as_str());

    // And the other way: what B stores reaches the server too (through its store path).
    assert!(store_doc(&b, 9));
    let c = Engine::new(node_config(None, &url), identity()).unwrap();
    assert_eq!(
        c.lookup(&tokens(9, DOC_TOKENS), None).unwrap().hit_tokens,
        DOC_TOKENS
    );
    // The server counted the stores on its own tiers.
    let (code, metrics) = srv.http("GET", "/metrics", None);
    assert_eq!(code, 200);
    assert_eq!(
        metric(&metrics, "kvtier_stored_chunks_total{tier=\"cpu\"}"),
        Some(40.0),
        "{metrics}"
    );
}

/// A TCP relay that flips the last byte of every large server-to-client frame (a chunk
/// record's payload) while `corrupt` is set: corruption in transit, between a real engine
/// and a real server.
fn corrupting_relay(upstream: String, corrupt: Arc<AtomicBool>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for down in l.incoming() {
            let Ok(mut down) = down else { continue };
            let Ok(mut up) = TcpStream::connect(&upstream) else {
                continue;
            };
            let (mut up_r, mut down_w) = (up.try_clone().unwrap(), down.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut down, &mut up);
            });
            let corrupt = corrupt.clone();
            std::thread::spawn(move || loop {
                let mut len = [0u8; 4];
                if up_r.read_exact(&mut len).is_err() {
                    return;
                }
                let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
                if up_r.read_exact(&mut body).is_err() {
                    return;
                }
                if corrupt.load(Ordering::Relaxed) && body.len() > 1024 {
                    *body.last_mut().unwrap() ^= 0x40;
                }
                if down_w.write_all(&len).is_err() || down_w.write_all(&body).is_err() {
                    return;
                }
            });
        }
    });
    addr
}

#[test]
fn a_corrupt_record_from_the_server_is_a_miss_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), &base_yaml(), &["--tcp", "127.0.0.1:0"], &[]);
    let writer = Engine::new(
        node_config(None, &format!("kvtier://{}", tcp_addr(&srv))),
        identity(),
    )
    .unwrap();
    assert!(store_doc(&writer, 5));

    let corrupt = Arc::new(AtomicBool::new(true));
    let relay = corrupting_relay(tcp_addr(&srv), corrupt.clone());
    let reader = Engine::new(node_config(None, &format!("kvtier://{relay}")), identity()).unwrap();
    let t = tokens(5, DOC_TOKENS);
    assert_eq!(reader.lookup(&t, None).unwrap().hit_tokens, DOC_TOKENS);
    let mut got = vec![0u8; DOC_TOKENS * BPT];
    let r = reader.retrieve(&t, None, &mut got).unwrap();
    assert_eq!(r.hit_tokens, 0, "corrupt chunks are misses, never bytes");
    assert!(got.iter().all(|&b| b == 0), "nothing copied out");
    let s = reader.stats();
    let p = peer_stats(&s);
    assert!(p.checksum_failures >= 1, "{p:?}");
    assert_eq!(p.details["checksum_failures"], p.checksum_failures);
    assert_eq!(p.write_backs, 0, "nothing corrupt reached L1");
    assert!(!p.down, "corruption is not a tier fault");
    let m = reader.metrics_text();
    assert!(
        metric(&m, "kvtier_checksum_failures_total{tier=\"peer\"}").unwrap_or(0.0) >= 1.0,
        "{m}"
    );

    // The server's copy was good all along: with a clean link the same read succeeds.
    corrupt.store(false, Ordering::Relaxed);
    let r = reader.retrieve(&t, None, &mut got).unwrap();
    assert_eq!(r.hit_tokens, DOC_TOKENS);
    assert_eq!(got, payload(5, DOC_TOKENS));
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn server_killed_mid_run_then_restarted_the_tier_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut srv = Server::start(dir.path(), &base_yaml(), &["--tcp", &listen], &[]);
    let url = format!("kvtier://{listen}?retry_max_ms=200&connect_timeout_ms=300");
    let disk = dir.path().join("disk");
    let e = Engine::new(node_config(Some(&disk), &url), identity()).unwrap();
    assert!(store_doc(&e, 1));

    srv.child.kill().unwrap();
    srv.child.wait().unwrap();

    // The engine keeps serving from its local tiers, and every call returns within the
    // deadline (a dead peer is a miss or a skipped store, never a hang).
    let bound = Duration::from_millis(READ_DEADLINE_MS * 2);
    let mut got = vec![0u8; DOC_TOKENS * BPT];
    for doc in 2..8 {
        let t0 = Instant::now();
        let r = e
            .store(&tokens(doc, DOC_TOKENS), None, &payload(doc, DOC_TOKENS))
            .unwrap();
        assert_eq!(r.stored_tokens, DOC_TOKENS, "L1 takes the store");
        let l = e.lookup(&tokens(doc, DOC_TOKENS), None).unwrap();
        assert_eq!(l.hit_tokens, DOC_TOKENS);
        let r = e.retrieve(&tokens(1, DOC_TOKENS), None, &mut got).unwrap();
        assert_eq!(r.hit_tokens, DOC_TOKENS, "doc 1 from L1");
        assert_eq!(got, payload(1, DOC_TOKENS));
        let miss = e.lookup(&tokens(1000 + doc, DOC_TOKENS), None).unwrap();
        assert_eq!(miss.hit_tokens, 0);
        assert!(t0.elapsed() < bound, "calls took {:?}", t0.elapsed());
    }
    assert!(e.flush(Duration::from_secs(10)), "queued writes end");
    let s = e.stats();
    let p = peer_stats(&s);
    assert!(p.errors + p.timeouts > 0, "{p:?}");

    // Restart on the same port: the tier comes back without restarting the engine.
    let srv2 = Server::start(dir.path(), &base_yaml(), &["--tcp", &listen], &[]);
    let t0 = Instant::now();
    let mut doc = 50;
    loop {
        doc += 1;
        if store_doc(&e, doc) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "tier did not recover"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let other = Engine::new(
        node_config(None, &format!("kvtier://{}", tcp_addr(&srv2))),
        identity(),
    )
    .unwrap();
    assert_eq!(
        other
            .lookup(&tokens(doc, DOC_TOKENS), None)
            .unwrap()
            .hit_tokens,
        DOC_TOKENS,
        "the restarted server holds what the engine stored after recovering"
    );
    let s = e.stats();
    let p = peer_stats(&s);
    assert!(!p.down, "{p:?}");
    assert!(p.details["connects"].as_u64().unwrap() >= 2, "{p:?}");
}

#[test]
fn a_wrong_token_is_a_clear_error_logged_once_and_misses() {
    let dir = tempfile::tempdir().unwrap();
    let token = "right-token-91c2";
    let srv = Server::start(
        dir.path(),
        &base_yaml(),
        &["--tcp", "127.0.0.1:0"],
        &[("KVTIER_AUTH_TOKEN", token)],
    );
    let wrong = "wrong-token-5e1f";
    let url = format!("kvtier://{wrong}@{}?retry_max_ms=100", tcp_addr(&srv));
    let (out, err) = run_child("bad_token", &[("KVTIER_PEER_URL", url)]);
    let st: Value = serde_json::from_str(child_line(&out, "PEER_STATS ")).unwrap();
    // Retried (with the manager's and the tier's backoff), yet logged once below.
    assert!(st["auth_failures"].as_u64().unwrap() >= 2, "{st}");
    assert_eq!(st["connects"], 0, "{st}");
    assert_eq!(st["hits"], 0, "{st}");
    let warns: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("refused the auth token"))
        .collect();
    // The tier's own line, plus the manager's one "tier marked down" line quoting it.
    assert!((1..=2).contains(&warns.len()), "{err}");
    assert_eq!(
        err.lines()
            .filter(|l| l.contains("kvtier server unreachable"))
            .count(),
        1,
        "{err}"
    );
    assert!(
        warns[0].contains("kvtier://TOKEN@host:port") && warns[0].contains("KVTIER_AUTH_TOKEN"),
        "the message says what to do: {}",
        warns[0]
    );
    assert!(!err.contains(wrong) && !out.contains(wrong), "token leaked");
    assert!(err.contains(":***@"), "the URL is shown redacted: {err}");
    // With the right token, the same node works.
    let ok = Engine::new(
        node_config(None, &format!("kvtier://{token}@{}", tcp_addr(&srv))),
        identity(),
    )
    .unwrap();
    assert!(store_doc(&ok, 3));
    assert!(!srv.log_text().contains(token), "token in the server log");
}
