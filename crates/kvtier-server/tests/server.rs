//! End-to-end tests: a real `kvtier-server` process, real sockets, several client
//! processes (this test binary re-executed with `KVTIER_TEST_CHILD`).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use kvtier::KvCache;
use kvtier_client::proto::{self, Request, Response};
use kvtier_client::{ClientOptions, KvClient};
use serde_json::json;

fn connect(addr: &str) -> KvClient {
    KvClient::connect(addr, identity()).unwrap()
}

fn connect_tcp(addr: &str, token: Option<&str>) -> kvtier::Result<KvClient> {
    let opts = ClientOptions {
        auth_token: token.map(str::to_string),
        max_piece: 3000, // force multi-frame transfers of the 2 KiB.. chunks
        ..ClientOptions::default()
    };
    KvClient::connect_with(addr, identity(), opts)
}

/// Stores, looks up and retrieves `doc`; checks the bytes of whatever hit.
fn roundtrip(c: &KvClient, doc: u64, n: usize, must_hit_all: bool) {
    let t = tokens(doc, n);
    let p = payload(doc, n);
    let s = c.store(&t, None, &p).unwrap();
    let covered = n / CHUNK * CHUNK;
    assert_eq!(s.stored_tokens, covered, "doc {doc}: {s:?}");
    let l = c.lookup(&t, None).unwrap();
    if must_hit_all {
        assert_eq!(l.hit_tokens, covered, "doc {doc}");
    }
    let mut out = vec![0u8; p.len()];
    let r = c.retrieve(&t, None, &mut out).unwrap();
    if must_hit_all {
        assert_eq!(r.hit_tokens, covered, "doc {doc}");
    }
    assert_eq!(
        &out[..r.hit_tokens * BPT],
        &p[..r.hit_tokens * BPT],
        "doc {doc} bytes"
    );
}

/// Entry point of the client processes the tests start (this binary run with
/// `--ignored --exact child_entry`). Ignored so it never counts as a passing test; it does
/// nothing when run by hand without the parent's environment.
#[test]
#[ignore = "child process of concurrent_client_processes_agree and killed_client_leaves_nothing_behind"]
fn child_entry() {
    let Ok(role) = std::env::var("KVTIER_TEST_CHILD") else {
        eprintln!("child_entry: only the tests that start client processes run it");
        return;
    };
    let addr = std::env::var("KVTIER_TEST_ADDR").unwrap();
    let idx: u64 = std::env::var("KVTIER_TEST_IDX").unwrap().parse().unwrap();
    match role.as_str() {
        "worker" => {
            let c = connect(&addr);
            for round in 0..15u64 {
                // Shared documents (every worker stores them: dedupe and in-flight
                // claims across processes) and private ones.
                roundtrip(&c, round % 5, 200, false);
                roundtrip(
                    &c,
                    1000 * (idx + 1) + round,
                    100 + (round as usize * 7),
                    true,
                );
            }
        }
        "holder" => {
            // Holds a retrieve lease, a store session and a pin, then waits to be killed.
            let c = connect(&addr);
            let t = tokens(7, 64);
            c.pin(&t, None, Some(Duration::from_secs(3600))).unwrap();
            let mut s = raw_hello(&addr, true);
            send(
                &mut s,
                &Request::Acquire { salt: None },
                &proto::tokens_to_bytes(&t),
            );
            let (r, _) = recv(&mut s);
            assert!(
                matches!(r, Response::Acquired { lease, .. } if lease != 0),
                "{r:?}"
            );
            let t2 = tokens(8, 64);
            send(
                &mut s,
                &Request::BeginStore { salt: None },
                &proto::tokens_to_bytes(&t2),
            );
            let (r, _) = recv(&mut s);
            assert!(matches!(r, Response::StoreLease { .. }), "{r:?}");
            println!("HELD");
            std::io::stdout().flush().unwrap();
            std::thread::sleep(Duration::from_secs(600));
        }
        other => panic!("unknown child role {other}"),
    }
}

/// Starts a client process in `role`; it is killed when the guard drops (a failing test too).
fn spawn_child(role: &str, addr: &str, idx: usize) -> process::ChildGuard {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--ignored",
        "--exact",
        "child_entry",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("KVTIER_TEST_CHILD", role)
    .env("KVTIER_TEST_ADDR", addr)
    .env("KVTIER_TEST_IDX", idx.to_string())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    process::ChildGuard::spawn(&mut cmd).unwrap()
}

fn raw_hello(addr: &str, _shm: bool) -> UnixStream {
    let path = addr.strip_prefix("unix:").unwrap();
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let hello = Request::Hello {
        magic: proto::MAGIC,
        version: proto::PROTOCOL_VERSION,
        client_name: "raw".into(),
        identity_json: serde_json::to_string(&identity()).unwrap(),
        chunk_size: Some(CHUNK as u32),
        auth_token: None,
        want_shm: false,
    };
    send(&mut s, &hello, &[]);
    let (r, _) = recv(&mut s);
    assert!(matches!(r, Response::HelloOk { .. }), "{r:?}");
    s
}

fn send(s: &mut UnixStream, r: &Request, blob: &[u8]) {
    s.write_all(&proto::encode(r, blob).unwrap()).unwrap();
}

fn recv(s: &mut UnixStream) -> (Response, Vec<u8>) {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut body).unwrap();
    let (m, blob) = proto::decode::<Response>(&body).unwrap();
    let b = body[blob].to_vec();
    (m, b)
}

fn l1(stats: &serde_json::Value, k: &str) -> u64 {
    stats["l1"][k].as_u64().unwrap()
}

#[test]
fn concurrent_client_processes_agree() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), &base_yaml(), &["--tcp", "127.0.0.1:0"], &[]);
    let mut kids: Vec<_> = (0..4)
        .map(|i| {
            // One of the workers goes over TCP (payload in frames), the others map the pool.
            let addr = if i == 3 { srv.tcp() } else { srv.unix() };
            spawn_child("worker", &addr, i)
        })
        .collect();
    for k in &mut kids {
        let st = k.wait().unwrap();
        assert!(st.success(), "worker failed: {st}");
    }
    // Everything every worker stored is there, byte for byte, from a fresh client.
    let c = connect(&srv.unix());
    for doc in 0..5 {
        let t = tokens(doc, 200);
        let p = payload(doc, 200);
        let mut out = vec![0u8; p.len()];
        let r = c.retrieve(&t, None, &mut out).unwrap();
        assert_eq!(r.hit_tokens, 192);
        assert_eq!(&out[..192 * BPT], &p[..192 * BPT]);
    }
    for i in 0..4u64 {
        for round in 0..15u64 {
            let doc = 1000 * (i + 1) + round;
            let n = 100 + round as usize * 7;
            let l = c.lookup(&tokens(doc, n), None).unwrap();
            assert_eq!(l.hit_tokens, n / CHUNK * CHUNK);
        }
    }
    let s = srv.stats();
    assert_eq!(l1(&s, "in_use"), 0, "{s}");
}

#[test]
fn killed_client_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), &base_yaml(), &["--lease-timeout-sec", "1"], &[]);
    let c = connect(&srv.unix());
    let t = tokens(7, 64);
    c.store(&t, None, &payload(7, 64)).unwrap();
    let base = srv.stats();
    assert_eq!((l1(&base, "in_use"), l1(&base, "pins")), (0, 0));

    // Killed while holding: released when the connection closes.
    let mut kid = spawn_child("holder", &srv.unix(), 0);
    let mut lines = BufReader::new(kid.stdout.take().unwrap()).lines();
    assert!(
        lines.any(|l| l.unwrap().contains("HELD")),
        "holder never held"
    );
    let held = srv.stats();
    assert!(l1(&held, "in_use") > 0, "{held}");
    assert_eq!(l1(&held, "pins"), 4, "{held}");
    assert!(l1(&held, "pool_used") > l1(&base, "pool_used"), "{held}");
    kid.kill().unwrap();
    kid.wait().unwrap();
    let t0 = Instant::now();
    loop {
        let s = srv.stats();
        let now = (l1(&s, "in_use"), l1(&s, "pins"), l1(&s, "pool_used"));
        if now == (0, 0, l1(&base, "pool_used")) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "still held: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // A live but silent client: its leases expire after the lease timeout.
    let mut s = raw_hello(&srv.unix(), false);
    send(
        &mut s,
        &Request::Acquire { salt: None },
        &proto::tokens_to_bytes(&t),
    );
    let (r, _) = recv(&mut s);
    let Response::Acquired { lease, .. } = r else {
        panic!("{r:?}")
    };
    assert!(l1(&srv.stats(), "in_use") > 0);
    let t0 = Instant::now();
    while l1(&srv.stats(), "in_use") > 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "lease never expired"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Reading through the expired lease is refused, the connection stays usable.
    send(
        &mut s,
        &Request::ReadSlot {
            lease,
            slot: 0,
            offset: 0,
            len: 16,
        },
        &[],
    );
    let (r, _) = recv(&mut s);
    assert!(
        matches!(
            r,
            Response::Error {
                code: proto::ErrorCode::NoLease,
                ..
            }
        ),
        "{r:?}"
    );
    send(&mut s, &Request::Ping, &[]);
    assert_eq!(recv(&mut s).0, Response::Pong);
    assert_eq!(l1(&srv.stats(), "pool_used"), l1(&base, "pool_used"));
}

mod frames {
    use super::*;
    use proptest::prelude::*;

    fn blast(addr: &str, greet: bool, bytes: &[u8]) {
        let path = addr.strip_prefix("unix:").unwrap();
        let mut s = if greet {
            raw_hello(addr, false)
        } else {
            UnixStream::connect(path).unwrap()
        };
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let _ = s.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }

    fn frame_strategy() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            // Pure garbage.
            proptest::collection::vec(any::<u8>(), 0..512),
            // A plausible header with a random kind and meta, maybe truncated.
            (
                any::<u8>(),
                proptest::collection::vec(any::<u8>(), 0..128),
                0usize..64
            )
                .prop_map(|(kind, meta, cut)| {
                    let mut f = Vec::new();
                    f.extend_from_slice(&((5 + meta.len()) as u32).to_le_bytes());
                    f.push(kind);
                    f.extend_from_slice(&(meta.len() as u32).to_le_bytes());
                    f.extend_from_slice(&meta);
                    let keep = f.len().saturating_sub(cut);
                    f.truncate(keep);
                    f
                }),
            // Valid requests with bogus fields, then truncated or oversized frames.
            (
                0u64..1000,
                proptest::collection::vec(any::<u8>(), 0..200),
                any::<bool>()
            )
                .prop_map(|(lease, blob, huge)| {
                    let mut f = proto::encode(&Request::Lookup { n_tokens: lease }, &blob).unwrap();
                    f.extend(
                        proto::encode(
                            &Request::CommitStore {
                                lease,
                                checksums: vec![Some(1)],
                                durable: true,
                            },
                            &[],
                        )
                        .unwrap(),
                    );
                    f.extend(
                        proto::encode(
                            &Request::ReadSlot {
                                lease,
                                slot: 3,
                                offset: u64::MAX,
                                len: u64::MAX,
                            },
                            &[],
                        )
                        .unwrap(),
                    );
                    f.extend(
                        proto::encode(
                            &Request::WriteSlot {
                                lease,
                                slot: 0,
                                offset: u64::MAX - 1,
                            },
                            &blob,
                        )
                        .unwrap(),
                    );
                    f.extend(
                        proto::encode(
                            &Request::Acquire {
                                salt: Some("\u{1}".into()),
                            },
                            &blob,
                        )
                        .unwrap(),
                    );
                    if huge {
                        f.extend_from_slice(&u32::MAX.to_le_bytes());
                        f.push(1);
                    } else {
                        f.extend_from_slice(&100u32.to_le_bytes());
                        f.extend_from_slice(&[1, 2, 0, 0, 0]);
                    }
                    f
                }),
        ]
    }

    /// One server for all cases, owned by the test (never a static: statics are not dropped,
    /// so a server kept in one would outlive the test run).
    #[test]
    fn arbitrary_frames_never_hurt_the_server() {
        let dir = tempfile::tempdir().unwrap();
        let srv = Server::start(dir.path(), &base_yaml(), &["--max-frame-mib", "1"], &[]);
        let addr = srv.unix();
        // The cases run in a `Fn` closure; `alive` needs the server mutably.
        let srv = std::cell::RefCell::new(srv);
        let config = ProptestConfig {
            cases: 64,
            failure_persistence: None,
            ..ProptestConfig::default()
        };
        proptest!(config, |(bytes in frame_strategy(), greet in any::<bool>())| {
            let good = connect(&addr);
            roundtrip(&good, 1, 48, true);
            blast(&addr, greet, &bytes);
            // The other client keeps working, and so does a new one.
            roundtrip(&good, 2, 48, true);
            roundtrip(&connect(&addr), 3, 48, true);
            prop_assert!(srv.borrow_mut().alive());
        });
    }
}

#[test]
fn metrics_match_operations_and_admin_endpoints_work() {
    let dir = tempfile::tempdir().unwrap();
    let token = [("KVTIER_ADMIN_TOKEN", "admin-token-for-the-test")];
    let srv = Server::start(dir.path(), &base_yaml(), &[], &token);
    let (code, body) = srv.http("GET", "/health", None);
    assert_eq!((code, body.contains("ok")), (200, true), "{body}");
    let c = connect(&srv.unix());
    // 3 documents of 64 tokens = 4 chunks each.
    for d in 0..3 {
        c.store(&tokens(d, 64), None, &payload(d, 64)).unwrap();
    }
    c.store(&tokens(9, 64), Some("tenant-a"), &payload(9, 64))
        .unwrap();
    // Lookups: two full hits (64 each), one miss (0), one half (a 64-token doc whose
    // second half differs: 32 hit).
    assert_eq!(c.lookup(&tokens(0, 64), None).unwrap().hit_tokens, 64);
    assert_eq!(c.lookup(&tokens(1, 64), None).unwrap().hit_tokens, 64);
    assert_eq!(c.lookup(&tokens(50, 64), None).unwrap().hit_tokens, 0);
    let mut half = tokens(2, 64);
    half[40] ^= 1;
    assert_eq!(c.lookup(&half, None).unwrap().hit_tokens, 32);

    let (code, text) = srv.http("GET", "/metrics", None);
    assert_eq!(code, 200);
    let m = |k: &str| metric(&text, k).unwrap_or_else(|| panic!("no {k} in\n{text}"));
    assert_eq!(m("kvtier_lookups_total"), 4.0);
    assert_eq!(m("kvtier_requested_tokens_total"), 256.0);
    assert_eq!(m("kvtier_hit_tokens_total"), 160.0);
    assert_eq!(m(r#"kvtier_stored_chunks_total{tier="cpu"}"#), 16.0);
    assert_eq!(m(r#"kvtier_stored_bytes_total{tier="cpu"}"#), 16.0 * 2048.0);
    assert_eq!(m(r#"kvtier_resident_chunks{tier="cpu"}"#), 16.0);

    // POST /lookup by registered model name and by identity.
    let body = json!({"model": "tiny-test", "tokens": tokens(0, 64), "cache_salt": null});
    let (code, r) = srv.http("POST", "/lookup", Some(&body));
    assert_eq!(code, 200, "{r}");
    let r: serde_json::Value = serde_json::from_str(&r).unwrap();
    assert_eq!(r["hit_tokens"], 64);
    assert_eq!(r["chunks_per_tier"]["cpu"], 4);
    let body = json!({"model": identity(), "tokens": tokens(9, 64), "cache_salt": "tenant-a"});
    let (_, r) = srv.http("POST", "/lookup", Some(&body));
    assert!(r.contains(r#""hit_tokens":64"#), "{r}");
    let (code, _) = srv.http(
        "POST",
        "/lookup",
        Some(&json!({"model": "nope", "tokens": [1]})),
    );
    assert_eq!(code, 400);

    // POST /pin with a TTL.
    let body = json!({"model": "tiny-test", "tokens": tokens(1, 64), "ttl_sec": 60});
    let (code, r) = srv.http("POST", "/pin", Some(&body));
    assert_eq!(code, 200, "{r}");
    assert!(r.contains(r#""pinned_chunks":4"#), "{r}");
    assert_eq!(l1(&srv.stats(), "pins"), 4);

    // DELETE /salt/{salt} forgets that tenant only.
    let (code, r) = srv.http("DELETE", "/salt/tenant-a", None);
    assert_eq!(code, 200, "{r}");
    assert!(r.contains(r#""total":4"#), "{r}");
    assert_eq!(
        c.lookup(&tokens(9, 64), Some("tenant-a"))
            .unwrap()
            .hit_tokens,
        0
    );
    assert_eq!(c.lookup(&tokens(0, 64), None).unwrap().hit_tokens, 64);

    // POST /clear.
    let (code, r) = srv.http("POST", "/clear", None);
    assert_eq!(code, 200, "{r}");
    assert_eq!(c.lookup(&tokens(0, 64), None).unwrap().hit_tokens, 0);
    let s = srv.stats();
    assert_eq!(s["models"][0]["model_name"], "tiny-test");
}

#[test]
fn sigterm_during_writes_loses_no_acknowledged_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    std::fs::create_dir_all(&disk).unwrap();
    let yaml = format!(
        "{}local_disk: {}\nmax_local_disk_size: 256MiB\nwrite_queue_chunks: 100000\n",
        base_yaml(),
        disk.display()
    );
    let mut srv = Server::start(dir.path(), &yaml, &[], &[]);
    let addr = srv.unix();
    let writers: Vec<_> = (0..3u64)
        .map(|w| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let c = connect(&addr);
                let mut acked = Vec::new();
                for i in 0..100_000u64 {
                    let doc = w * 1_000_000 + i;
                    // Half the writers ask for durable acknowledgements: only those
                    // promise survival; the others keep the write queue busy.
                    let r = if w % 2 == 0 {
                        c.store_durable(&tokens(doc, 128), None, &payload(doc, 128))
                    } else {
                        c.store(&tokens(doc, 128), None, &payload(doc, 128))
                            .map(|s| (s, false))
                    };
                    match r {
                        Ok((s, true)) if s.stored_tokens == 128 => acked.push(doc),
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                acked
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let st = srv.term();
    assert!(st.success(), "server exit: {st}\n{}", srv.log_text());
    let acked: Vec<u64> = writers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    // Durable acknowledgements wait for the disk (fsync), so there are few of them.
    assert!(
        acked.len() >= 2,
        "too few stores acknowledged: {}",
        acked.len()
    );
    assert!(!dir.path().join("kv.sock").exists(), "socket not removed");

    let srv2 = Server::start(dir.path(), &yaml, &[], &[]);
    let c = connect(&srv2.unix());
    let mut missing = 0;
    for &doc in &acked {
        let t = tokens(doc, 128);
        let p = payload(doc, 128);
        let mut out = vec![0u8; p.len()];
        let r = c.retrieve(&t, None, &mut out).unwrap();
        if r.hit_tokens != 128 || out != p {
            missing += 1;
        }
    }
    assert_eq!(
        missing,
        0,
        "{missing} of {} acknowledged docs lost",
        acked.len()
    );
}

#[test]
fn tcp_requires_the_token_and_never_logs_it() {
    let dir = tempfile::tempdir().unwrap();
    let token = "tok-7f3a9c-very-secret";
    let srv = Server::start(
        dir.path(),
        &base_yaml(),
        &["--tcp", "127.0.0.1:0"],
        &[("KVTIER_AUTH_TOKEN", token), ("KVTIER_LOG", "debug")],
    );
    let e = connect_tcp(&srv.tcp(), None).unwrap_err().to_string();
    assert!(e.contains("Unauthorized"), "{e}");
    let e = connect_tcp(&srv.tcp(), Some("wrong"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("Unauthorized"), "{e}");
    let c = connect_tcp(&srv.tcp(), Some(token)).unwrap();
    assert!(!c.server_info().shared_memory);
    roundtrip(&c, 5, 100, true);
    // Unix sockets do not need it.
    roundtrip(&connect(&srv.unix()), 6, 100, true);
    // Prefetch, pin/unpin, flush, stats through the client.
    let p = c.prefetch(&tokens(5, 100), None).unwrap();
    assert_eq!(p.wait(Some(Duration::from_secs(5))).unwrap(), 96);
    let pins = c.pin(&tokens(5, 100), None, None).unwrap();
    assert_eq!(pins.len(), 6);
    c.unpin(&pins).unwrap();
    assert!(c.flush(Duration::from_secs(5)).unwrap());
    assert_eq!(c.stats_json().unwrap()["l1"]["pins"], 0);
    assert_eq!(c.remove_salt("nobody").unwrap(), 0);
    // Remove one prompt's chunks through the protocol: 6 chunks held, then none.
    assert_eq!(c.remove(&tokens(5, 100), None).unwrap(), 6);
    assert_eq!(c.lookup(&tokens(5, 100), None).unwrap().hit_tokens, 0);
    assert_eq!(c.remove(&tokens(5, 100), None).unwrap(), 0);
    assert!(c.clear().unwrap() >= 6);
    drop(c);
    let log = srv.log_text();
    assert!(log.contains("handshake refused"), "{log}");
    assert!(!log.contains(token), "token leaked into the log");
}
