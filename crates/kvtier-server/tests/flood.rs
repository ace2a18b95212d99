//! Flood test (issue 12 acceptance): the wire port and the admin port are flooded at once,
//! on loopback and for a bounded time, while real clients keep storing and retrieving.
//! Every client call must succeed, their p99 must stay within the client's deadline, and the
//! server's RSS must stay under pool + in-flight budget + [`OVERHEAD`] (the bound the README
//! documents).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use kvtier::keys::ModelIdentity;
use kvtier::layout::{Dtype, KvLayout};
use kvtier::KvCache;
use kvtier_client::proto::{self, Request};
use kvtier_client::{ClientOptions, KvClient};
use serde_json::json;

const WIRE_TOKEN: &str = "flood-wire-token";
const ADMIN_TOKEN: &str = "flood-admin-token";
/// How long the flood lasts.
const FLOOD: Duration = Duration::from_secs(15);
/// The clients' call deadline (`ClientOptions::timeout`).
const DEADLINE: Duration = Duration::from_secs(2);
const POOL_MIB: u64 = 64;
const INFLIGHT_MIB: u64 = 64;
const MAX_FRAME_MIB: u64 = 16;
/// What the server may hold besides its pool and its frame budget under the flood:
/// runtime, connection tasks and buffers, admin state (README, "Security").
const OVERHEAD_MIB: u64 = 96;

fn frame_head(len: usize) -> Vec<u8> {
    let mut f = (len as u32).to_le_bytes().to_vec();
    f.push(proto::FRAME_MSG);
    f.extend_from_slice(&0u32.to_le_bytes());
    f
}

fn hello_frame() -> Vec<u8> {
    let h = Request::Hello {
        magic: proto::MAGIC,
        version: proto::PROTOCOL_VERSION,
        client_name: "flood".into(),
        identity_json: serde_json::to_string(&identity()).unwrap(),
        chunk_size: None,
        auth_token: None,
        want_shm: false,
    };
    proto::encode(&h, &[]).unwrap()
}

/// Runs `f` in a loop on its own thread until `stop`.
fn attacker(
    stop: &Arc<AtomicBool>,
    mut f: impl FnMut(&AtomicBool) + Send + 'static,
) -> JoinHandle<()> {
    let stop = stop.clone();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            f(&stop);
        }
    })
}

fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let t0 = Instant::now();
    while t0.elapsed() < d && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A real client's loop: store, look up and retrieve distinct prompts; every call timed.
fn client_loop(c: KvClient, base_doc: u64, stop: Arc<AtomicBool>) -> (Vec<Duration>, Vec<String>) {
    let mut lat = Vec::new();
    let mut errors = Vec::new();
    let mut doc = base_doc;
    while !stop.load(Ordering::Relaxed) {
        let (t, p) = (tokens(doc, 256), payload(doc, 256));
        let t0 = Instant::now();
        match c.store(&t, None, &p) {
            Ok(_) => lat.push(t0.elapsed()),
            Err(e) => errors.push(format!("store: {e}")),
        }
        let t0 = Instant::now();
        match c.lookup(&t, None) {
            Ok(_) => lat.push(t0.elapsed()),
            Err(e) => errors.push(format!("lookup: {e}")),
        }
        let mut out = vec![0u8; p.len()];
        let t0 = Instant::now();
        match c.retrieve(&t, None, &mut out) {
            Ok(r) => {
                lat.push(t0.elapsed());
                let n = r.hit_tokens * BPT;
                if out[..n] != p[..n] {
                    errors.push(format!("doc {doc}: wrong bytes"));
                }
            }
            Err(e) => errors.push(format!("retrieve: {e}")),
        }
        doc += 1;
    }
    (lat, errors)
}

#[test]
fn clients_keep_their_deadline_while_both_ports_are_flooded() {
    raise_fd_limit();
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "chunk_size: {CHUNK}\nmax_local_cpu_size: {POOL_MIB}MiB\nlocal_cpu_huge_pages: false\n"
    );
    let srv = Server::start(
        dir.path(),
        &yaml,
        &[
            "--tcp",
            "127.0.0.1:0",
            "--max-frame-mib",
            &MAX_FRAME_MIB.to_string(),
            "--max-inflight-mib",
            &INFLIGHT_MIB.to_string(),
        ],
        &[
            ("KVTIER_AUTH_TOKEN", WIRE_TOKEN),
            ("KVTIER_ADMIN_TOKEN", ADMIN_TOKEN),
        ],
    );
    let pid = srv.pid();
    let tcp = srv.bound["tcp"].as_str().unwrap().to_string();
    let sock = srv.bound["socket"].as_str().unwrap().to_string();
    let admin = srv.admin();
    let opts = |shm: bool, token: Option<&str>| ClientOptions {
        timeout: DEADLINE,
        shared_memory: shm,
        auth_token: token.map(str::to_string),
        ..ClientOptions::default()
    };
    let unix_client = KvClient::connect_with(&srv.unix(), identity(), opts(true, None)).unwrap();
    let tcp_client =
        KvClient::connect_with(&srv.tcp(), identity(), opts(false, Some(WIRE_TOKEN))).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let mut attackers = Vec::new();
    // Wire, before auth: tokenless TCP connections opened continuously, 300 kept open.
    let t = tcp.clone();
    let mut kept = std::collections::VecDeque::new();
    attackers.push(attacker(&stop, move |_| {
        if let Ok(s) = TcpStream::connect(&t) {
            kept.push_back(s);
        }
        if kept.len() > 300 {
            kept.pop_front();
        }
        std::thread::sleep(Duration::from_millis(2));
    }));
    // Wire, before auth: Hellos sent one byte every 100 ms, on 50 TCP and 50 Unix
    // connections (reopened when the server drops them).
    let (t, u) = (tcp.clone(), sock.clone());
    attackers.push(attacker(&stop, move |stop| {
        let hello = hello_frame();
        let mut conns: Vec<Box<dyn Write + Send>> = Vec::new();
        for _ in 0..50 {
            if let Ok(s) = TcpStream::connect(&t) {
                conns.push(Box::new(s));
            }
            if let Ok(s) = UnixStream::connect(&u) {
                conns.push(Box::new(s));
            }
        }
        for b in &hello {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            conns.retain_mut(|s| s.write_all(&[*b]).is_ok());
            std::thread::sleep(Duration::from_millis(100));
        }
    }));
    // Wire, after the Hello (the Unix socket needs no token): 12 connections announce
    // 16 MiB frames, send 12 MiB of them and stall.
    let u = sock.clone();
    attackers.push(attacker(&stop, move |stop| {
        let senders: Vec<_> = (0..12)
            .filter_map(|_| {
                let mut s = UnixStream::connect(&u).ok()?;
                s.write_all(&hello_frame()).ok()?;
                s.set_write_timeout(Some(Duration::from_secs(1))).ok()?;
                Some(std::thread::spawn(move || {
                    let junk = vec![0x33u8; 1 << 20];
                    let _ = s.write_all(&frame_head((MAX_FRAME_MIB as usize) << 20));
                    for _ in 0..12 {
                        if s.write_all(&junk).is_err() {
                            break;
                        }
                    }
                    s
                }))
            })
            .collect();
        let held: Vec<_> = senders.into_iter().map(|t| t.join().unwrap()).collect();
        sleep_unless(stop, Duration::from_secs(60));
        drop(held);
    }));
    // Admin: half-open requests, 300 kept open, reopened as the server cuts them.
    let a = admin.clone();
    let mut half = std::collections::VecDeque::new();
    attackers.push(attacker(&stop, move |_| {
        if let Ok(mut s) = TcpStream::connect(&a) {
            let _ = s.write_all(b"GET /stats HTTP/1.1\r\nHost: x\r\nX-Slow: ");
            half.push_back(s);
        }
        if half.len() > 300 {
            half.pop_front();
        }
        std::thread::sleep(Duration::from_millis(5));
    }));
    // Admin: a stream of lookups, each naming a new model identity.
    let a = admin.clone();
    let probes = Arc::new(AtomicU64::new(0));
    let n = probes.clone();
    attackers.push(attacker(&stop, move |_| {
        let i = n.fetch_add(1, Ordering::Relaxed);
        let id = ModelIdentity::new(format!("probe-{i}"), KvLayout::simple(2, 2, 8, Dtype::F16));
        let body = json!({"model": id, "tokens": tokens(i, 64)}).to_string();
        if let Ok(mut s) = TcpStream::connect(&a) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let req = format!(
                "POST /lookup HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\
                 Connection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(req.as_bytes());
            let _ = s.read_to_end(&mut Vec::new());
        }
    }));

    // The server's RSS, sampled through the flood.
    let max_rss = Arc::new(AtomicU64::new(0));
    let m = max_rss.clone();
    attackers.push(attacker(&stop, move |_| {
        m.fetch_max(rss_bytes(pid), Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50));
    }));

    // Real clients, one mapping the pool over the Unix socket, one over TCP with the token.
    let client_stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = [(unix_client, 0u64), (tcp_client, 1_000_000)]
        .into_iter()
        .map(|(c, base)| {
            let s = client_stop.clone();
            std::thread::spawn(move || client_loop(c, base, s))
        })
        .collect();
    std::thread::sleep(FLOOD);
    client_stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    let mut errors = Vec::new();
    for c in clients {
        let (l, e) = c.join().unwrap();
        lat.extend(l);
        errors.extend(e);
    }
    // The admin port kept answering, and its model registry stayed bounded.
    let (code, stats) = http_with(&admin, "GET", "/stats", None, None);
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        a.join().unwrap();
    }

    lat.sort();
    let p = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize];
    let rss = max_rss.load(Ordering::Relaxed);
    eprintln!(
        "flood: {} client calls, p50 {:?}, p99 {:?}, max {:?}; {} admin probes; \
         server RSS max {} MiB (bound {} MiB)",
        lat.len(),
        p(0.5),
        p(0.99),
        lat.last().unwrap(),
        probes.load(Ordering::Relaxed),
        rss >> 20,
        POOL_MIB + INFLIGHT_MIB + OVERHEAD_MIB
    );
    assert!(
        errors.is_empty(),
        "client errors under the flood: {errors:?}"
    );
    assert!(lat.len() >= 100, "only {} client calls", lat.len());
    assert!(p(0.99) < DEADLINE, "p99 {:?} past the deadline", p(0.99));
    assert!(
        rss < (POOL_MIB + INFLIGHT_MIB + OVERHEAD_MIB) << 20,
        "server RSS reached {} MiB",
        rss >> 20
    );
    assert_eq!(code, 200, "{stats}");
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert!(stats["admin_models"].as_u64().unwrap() <= 64, "{stats}");
    assert!(stats["models"].as_array().unwrap().len() <= 100, "{stats}");
}
