//! The admin HTTP port as a shared service sees it: who may probe or change the cache, and
//! what a careless or hostile caller can make it hold (a real `kvtier-server` process).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use kvtier::keys::ModelIdentity;
use kvtier::layout::{Dtype, KvLayout};
use kvtier::KvCache;
use kvtier_client::KvClient;
use serde_json::{json, Value};

const TOKEN: &str = "adm-4c1d9e-test-token-not-a-secret";

fn connect(srv: &Server) -> KvClient {
    KvClient::connect(&srv.unix(), identity()).unwrap()
}

/// The requests that probe or change cached content, with bodies that would succeed.
fn guarded_requests() -> Vec<(&'static str, &'static str, Option<Value>)> {
    vec![
        ("POST", "/clear", None),
        (
            "POST",
            "/lookup",
            Some(json!({"model": "tiny-test", "tokens": tokens(0, 64)})),
        ),
        (
            "POST",
            "/pin",
            Some(json!({"model": "tiny-test", "tokens": tokens(0, 64), "ttl_sec": 5})),
        ),
        ("DELETE", "/salt/tenant-a", None),
    ]
}

/// An admin request made by another local user (uid 65534, with `setpriv`, when the tests
/// run as root as in CI; as ourselves otherwise), with bash's /dev/tcp: its status code.
fn http_as_other_user(addr: &str, method: &str, path: &str) -> u16 {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let script = format!(
        "exec 3<>/dev/tcp/{host}/{port} || exit 2; \
         printf '{method} {path} HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\nContent-Length: 0\\r\\n\\r\\n' >&3; \
         head -c 12 <&3"
    );
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let out = if root {
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "bash",
                "-c",
            ])
            .arg(format!("test \"$(id -u)\" = 65534 || exit 3; {script}"))
            .output()
    } else {
        Command::new("bash").args(["-c", &script]).output()
    }
    .expect("running bash (and setpriv as root)");
    assert!(out.status.success(), "other user's request failed: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"))
}

#[test]
fn probing_and_mutating_endpoints_need_the_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(
        dir.path(),
        &base_yaml(),
        &[],
        &[("KVTIER_ADMIN_TOKEN", TOKEN), ("KVTIER_LOG", "debug")],
    );
    let c = connect(&srv);
    c.store(&tokens(0, 64), None, &payload(0, 64)).unwrap();
    let addr = srv.admin();
    for (method, path, body) in guarded_requests() {
        for token in [None, Some("wrong-token"), Some("")] {
            let (code, text) = http_with(&addr, method, path, body.as_ref(), token);
            assert_eq!(code, 401, "{method} {path} with {token:?}: {text}");
            assert!(text.contains("KVTIER_ADMIN_TOKEN"), "{text}");
        }
    }
    // Another local user, without the token, cannot wipe the cache either.
    assert_eq!(http_as_other_user(&addr, "POST", "/clear"), 401);
    assert_eq!(c.lookup(&tokens(0, 64), None).unwrap().hit_tokens, 64);
    // Health, metrics and stats stay open.
    for path in ["/health", "/metrics", "/stats"] {
        let (code, text) = http(&addr, "GET", path, None);
        assert_eq!(code, 200, "{path}: {text}");
    }
    // With the token, everything works.
    for (method, path, body) in guarded_requests().into_iter().rev() {
        let (code, text) = srv.http(method, path, body.as_ref());
        assert_eq!(code, 200, "{method} {path}: {text}");
    }
    assert_eq!(c.lookup(&tokens(0, 64), None).unwrap().hit_tokens, 0);
    let log = srv.log_text();
    assert!(!log.contains(TOKEN), "the admin token leaked into the log");
}

#[test]
fn without_a_token_the_admin_port_only_reads() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), &base_yaml(), &[], &[]);
    let c = connect(&srv);
    c.store(&tokens(0, 64), None, &payload(0, 64)).unwrap();
    for (method, path, body) in guarded_requests() {
        let (code, text) = srv.http(method, path, body.as_ref());
        assert_eq!(code, 403, "{method} {path}: {text}");
        // The refusal says what to change.
        assert!(
            text.contains("KVTIER_ADMIN_TOKEN") && text.contains("--admin-token-file"),
            "{text}"
        );
    }
    assert_eq!(c.lookup(&tokens(0, 64), None).unwrap().hit_tokens, 64);
    for path in ["/health", "/metrics", "/stats"] {
        assert_eq!(srv.http("GET", path, None).0, 200, "{path}");
    }
}

#[test]
fn a_non_loopback_admin_bind_without_a_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("kv.sock");
    let args = [
        "--socket",
        sock.to_str().unwrap(),
        "--admin-port",
        "0",
        "--admin-host",
        "0.0.0.0",
    ];
    let (status, stderr) = run_server_to_exit(&args, &[], Duration::from_secs(30))
        .expect("the server started on 0.0.0.0 without an admin token");
    assert!(!status.success());
    assert!(
        stderr.contains("KVTIER_ADMIN_TOKEN") && stderr.contains("--admin-insecure"),
        "{stderr}"
    );
}

#[test]
fn admin_pins_cannot_outlive_pin_timeout_sec() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!("{}pin_timeout_sec: 60\n", base_yaml());
    let srv = Server::start(dir.path(), &yaml, &[], &[("KVTIER_ADMIN_TOKEN", TOKEN)]);
    let c = connect(&srv);
    c.store(&tokens(1, 64), None, &payload(1, 64)).unwrap();
    let pin = |ttl: Value| {
        let body = json!({"model": "tiny-test", "tokens": tokens(1, 64), "ttl_sec": ttl});
        srv.http("POST", "/pin", Some(&body))
    };
    let (code, text) = pin(json!(3600));
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("pin_timeout_sec"), "{text}");
    assert_eq!(srv.stats()["l1"]["pins"], 0);
    let (code, text) = pin(json!(30));
    assert_eq!(
        (code, text.contains(r#""pinned_chunks":4"#)),
        (200, true),
        "{text}"
    );
    let (code, text) = pin(Value::Null);
    assert_eq!(code, 200, "{text}");
}

#[test]
fn model_identities_from_admin_calls_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(
        dir.path(),
        &base_yaml(),
        &[],
        &[("KVTIER_ADMIN_TOKEN", TOKEN)],
    );
    let c = connect(&srv);
    c.store(&tokens(2, 64), None, &payload(2, 64)).unwrap();
    let probe = |i: usize| {
        let id = ModelIdentity::new(format!("probe-{i}"), KvLayout::simple(2, 2, 8, Dtype::F16));
        let body = json!({"model": id, "tokens": tokens(2, 64)});
        let (code, text) = srv.http("POST", "/lookup", Some(&body));
        assert_eq!(code, 200, "{text}");
        assert!(text.contains(r#""hit_tokens":0"#), "{text}");
    };
    for i in 0..300 {
        probe(i);
    }
    // The registry keeps the clients' models and a bounded set of probed ones.
    let s = srv.stats();
    let models = s["models"].as_array().unwrap();
    assert_eq!(models.len(), 1, "{s}");
    assert_eq!(models[0]["model_name"], "tiny-test");
    let probed = s["admin_models"].as_u64().unwrap();
    assert!((1..=64).contains(&probed), "{s}");
    // A probed identity that was dropped is attached again when asked for.
    probe(0);
    // The client's model still answers by name and by identity.
    let body = json!({"model": "tiny-test", "tokens": tokens(2, 64)});
    let (_, text) = srv.http("POST", "/lookup", Some(&body));
    assert!(text.contains(r#""hit_tokens":64"#), "{text}");
}

/// Sends `head` and keeps the connection open.
fn half_open(addr: &str, head: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    let _ = s.write_all(head);
    s
}

/// Whether the server closed `s` (EOF or reset) within `limit`, whatever it answered first.
fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    while t0.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn half_open_admin_requests_are_capped_and_time_out() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(
        dir.path(),
        &base_yaml(),
        &[],
        &[("KVTIER_ADMIN_TOKEN", TOKEN)],
    );
    let addr = srv.admin();
    let base_fds = fd_count(srv.pid());
    // Requests whose head never ends, and one whose body never comes.
    let mut stalled: Vec<TcpStream> = (0..200)
        .map(|_| half_open(&addr, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: "))
        .collect();
    let mut no_body = half_open(
        &addr,
        format!(
            "POST /lookup HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{"
        )
        .as_bytes(),
    );
    std::thread::sleep(Duration::from_millis(500));
    // The admin port holds a bounded number of connections: descriptors stay for the
    // cache clients.
    let fds = fd_count(srv.pid());
    assert!(
        fds <= base_fds + 64 + 8,
        "{fds} descriptors (from {base_fds})"
    );
    let c = connect(&srv);
    c.store(&tokens(3, 64), None, &payload(3, 64)).unwrap();
    assert_eq!(c.lookup(&tokens(3, 64), None).unwrap().hit_tokens, 64);
    // An announced body larger than the limit is refused without being read.
    let big = format!(
        "POST /lookup HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        64 << 20
    );
    let mut s = half_open(&addr, big.as_bytes());
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = [0u8; 12];
    if s.read_exact(&mut head).is_ok() {
        // Refused at once when a slot was free; a full port answers 503 instead.
        let code = String::from_utf8_lossy(&head[9..12]).to_string();
        assert!(code == "413" || code == "503", "{code}");
    }
    // Stalled heads and bodies are cut by the server's timeouts.
    assert!(
        closed_within(&mut no_body, Duration::from_secs(15)),
        "a request whose body never came was kept open"
    );
    let open = stalled
        .iter_mut()
        .map(|s| closed_within(s, Duration::from_secs(15)))
        .filter(|closed| !closed)
        .count();
    assert_eq!(open, 0, "{open} half-open requests still open");
    let (code, text) = http(&addr, "GET", "/health", None);
    assert_eq!(code, 200, "{text}");
}
