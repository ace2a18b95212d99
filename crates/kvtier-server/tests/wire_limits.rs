//! The wire port as a shared service sees it: what clients, authenticated or not, can make
//! the server hold (memory, connections, time), and what ends up in its log.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use common::*;
use kvtier::KvCache;
use kvtier_client::proto::{self, Request, Response};
use kvtier_client::{ClientOptions, KvClient};

fn connect(srv: &Server) -> KvClient {
    KvClient::connect(&srv.unix(), identity()).unwrap()
}

/// Stores, looks up and retrieves `doc` (64 tokens), checking the bytes.
fn roundtrip(c: &KvClient, doc: u64) {
    let t = tokens(doc, 64);
    let p = payload(doc, 64);
    assert_eq!(c.store(&t, None, &p).unwrap().stored_tokens, 64);
    let mut out = vec![0u8; p.len()];
    assert_eq!(c.retrieve(&t, None, &mut out).unwrap().hit_tokens, 64);
    assert_eq!(out, p);
}

fn hello(client_name: &str, identity_json: String) -> Vec<u8> {
    let h = Request::Hello {
        magic: proto::MAGIC,
        version: proto::PROTOCOL_VERSION,
        client_name: client_name.into(),
        identity_json,
        chunk_size: None,
        auth_token: None,
        want_shm: false,
    };
    proto::encode(&h, &[]).unwrap()
}

fn recv<S: Read>(s: &mut S) -> std::io::Result<Response> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut body)?;
    Ok(proto::decode::<Response>(&body).unwrap().0)
}

/// A Unix connection past its Hello.
fn greeted(srv: &Server) -> UnixStream {
    let mut s = UnixStream::connect(srv.bound["socket"].as_str().unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&hello("raw", serde_json::to_string(&identity()).unwrap()))
        .unwrap();
    let r = recv(&mut s).unwrap();
    assert!(matches!(r, Response::HelloOk { .. }), "{r:?}");
    s
}

/// The head of a frame whose body announces `len` bytes (the body is then sent or not).
fn frame_head(len: usize) -> Vec<u8> {
    let mut f = (len as u32).to_le_bytes().to_vec();
    f.push(proto::FRAME_MSG);
    f.extend_from_slice(&0u32.to_le_bytes());
    f
}

/// Writes `n` bytes of junk to `s`, giving up when the peer stops reading for a while.
fn push_junk<S: Write>(s: &mut S, n: usize) {
    let piece = vec![0x5au8; 1 << 20];
    let mut left = n;
    while left > 0 {
        let k = left.min(piece.len());
        if s.write_all(&piece[..k]).is_err() {
            return;
        }
        left -= k;
    }
}

/// Whether the server closed `s` within `limit` (whatever it answered first).
fn closed_within<S: Read>(s: &mut S, limit: Duration) -> bool {
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    while t0.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn max_frame_mib_that_overflows_is_refused() {
    for mib in ["17592186044416", "4096", "0"] {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("kv.sock");
        let args = ["--socket", sock.to_str().unwrap(), "--max-frame-mib", mib];
        let (status, stderr) = run_server_to_exit(&args, &[], Duration::from_secs(30))
            .unwrap_or_else(|| panic!("--max-frame-mib {mib} was accepted"));
        assert!(!status.success());
        assert!(stderr.contains("max-frame-mib"), "{stderr}");
    }
}

#[test]
fn partial_frames_cannot_grow_memory_past_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), &base_yaml(), &[], &[]);
    let c = connect(&srv);
    roundtrip(&c, 1);
    let base = rss_bytes(srv.pid());
    // 24 greeted connections each announce a 64 MiB frame, send 48 MiB of it and stall:
    // 1.1 GiB if every announced frame were buffered as it comes.
    let senders: Vec<_> = (0..24)
        .map(|_| {
            let mut s = greeted(&srv);
            s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
            std::thread::spawn(move || {
                let _ = s.write_all(&frame_head(64 << 20));
                push_junk(&mut s, 48 << 20);
                s
            })
        })
        .collect();
    let held: Vec<UnixStream> = senders.into_iter().map(|t| t.join().unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let grown = rss_bytes(srv.pid()).saturating_sub(base);
    // The default in-flight budget is 256 MiB; frames beyond it wait unread.
    assert!(grown < (256 + 32) << 20, "RSS grew {} MiB", grown >> 20);
    // The cache keeps serving its (small-frame) clients meanwhile.
    roundtrip(&c, 2);
    roundtrip(&connect(&srv), 3);
    drop(held);
    // Big frames go through again once the stalled ones are gone.
    let opts = ClientOptions {
        shared_memory: false,
        max_piece: 64 << 20,
        ..ClientOptions::default()
    };
    let big = KvClient::connect_with(&srv.unix(), identity(), opts).unwrap();
    let (t, p) = (tokens(4, 1024), payload(4, 1024));
    assert_eq!(big.store(&t, None, &p).unwrap().stored_tokens, 1024);
    let mut out = vec![0u8; p.len()];
    assert_eq!(big.retrieve(&t, None, &mut out).unwrap().hit_tokens, 1024);
    assert_eq!(out, p);
}

#[test]
fn hellos_before_auth_cannot_hold_memory() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(
        dir.path(),
        &base_yaml(),
        &["--tcp", "127.0.0.1:0"],
        &[("KVTIER_AUTH_TOKEN", "wire-token-for-the-test")],
    );
    let tcp = srv.bound["tcp"].as_str().unwrap().to_string();
    let base = rss_bytes(srv.pid());
    // 300 tokenless connections announce a 1 MiB Hello and send 900 KiB of it.
    let held: Vec<TcpStream> = (0..300)
        .map(|_| {
            let mut s = TcpStream::connect(&tcp).unwrap();
            s.set_write_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let _ = s.write_all(&frame_head(1 << 20));
            push_junk(&mut s, 900 << 10);
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let grown = rss_bytes(srv.pid()).saturating_sub(base);
    assert!(grown < 64 << 20, "RSS grew {} MiB", grown >> 20);
    roundtrip(&connect(&srv), 5);
    drop(held);
}

#[test]
fn stalled_frames_and_idle_connections_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(
        dir.path(),
        &base_yaml(),
        &["--frame-timeout-sec", "1", "--idle-timeout-sec", "2"],
        &[],
    );
    let c = connect(&srv);
    roundtrip(&c, 6);
    // A frame that stops half way is cut after the frame timeout, with an error.
    let mut s = greeted(&srv);
    s.write_all(&frame_head(1 << 20)).unwrap();
    s.write_all(&[0u8; 100]).unwrap();
    let t0 = Instant::now();
    let r = recv(&mut s).unwrap();
    assert!(
        matches!(&r, Response::Error { message, .. } if message.contains("1 s")),
        "{r:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(closed_within(&mut s, Duration::from_secs(5)));
    // A greeted connection that says nothing is closed after the idle timeout.
    let mut s = greeted(&srv);
    assert!(
        closed_within(&mut s, Duration::from_secs(6)),
        "idle kept open"
    );
    // The pooled client's idle connection was closed too: it notices and reconnects.
    roundtrip(&c, 7);
    // A connection holding a pin is not idle.
    let pins = c.pin(&tokens(7, 64), None, None).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    c.unpin(&pins).unwrap();
}

#[test]
fn connections_are_capped_before_and_after_the_hello() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(
        dir.path(),
        &base_yaml(),
        &[
            "--tcp",
            "127.0.0.1:0",
            "--max-connections",
            "40",
            "--max-handshakes",
            "8",
        ],
        &[("KVTIER_AUTH_TOKEN", "wire-token-for-the-test")],
    );
    let tcp = srv.bound["tcp"].as_str().unwrap().to_string();
    // Silent connections before their Hello: the oldest make room for new ones.
    let mut silent: Vec<TcpStream> = (0..20)
        .map(|_| {
            let s = TcpStream::connect(&tcp).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let c = connect(&srv);
    roundtrip(&c, 8);
    let evicted = silent
        .iter_mut()
        .map(|s| closed_within(s, Duration::from_millis(300)))
        .filter(|closed| *closed)
        .count();
    assert!(
        evicted >= 12,
        "only {evicted} of 20 waiting handshakes closed"
    );
    drop(silent);
    std::thread::sleep(Duration::from_millis(300));
    // Greeted connections up to the total cap; one more is refused with a reason.
    let held: Vec<UnixStream> = (0..39).map(|_| greeted(&srv)).collect();
    let mut s = UnixStream::connect(srv.bound["socket"].as_str().unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(&hello(
        "one-too-many",
        serde_json::to_string(&identity()).unwrap(),
    ));
    match recv(&mut s) {
        Ok(Response::Error { message, .. }) => {
            assert!(message.contains("--max-connections"), "{message}")
        }
        other => panic!("connection over the cap: {other:?}"),
    }
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    roundtrip(&connect(&srv), 9);
}

#[test]
fn accept_failures_are_logged_once_per_episode() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start_with(dir.path(), &base_yaml(), &[], &[], |cmd| {
        // SAFETY: setrlimit is async-signal-safe; the closure allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                let l = libc::rlimit {
                    rlim_cur: 64,
                    rlim_max: 64,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    let path = srv.bound["socket"].as_str().unwrap().to_string();
    // More connections than the server has descriptors, held for two seconds.
    let held: Vec<UnixStream> = (0..120)
        .filter_map(|_| UnixStream::connect(&path).ok())
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    drop(held);
    // It accepts again once descriptors are free.
    let t0 = Instant::now();
    loop {
        match KvClient::connect(&srv.unix(), identity()) {
            Ok(c) => {
                roundtrip(&c, 10);
                break;
            }
            Err(e) => assert!(t0.elapsed() < Duration::from_secs(10), "{e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = srv.log_text();
    // One line per episode: the two seconds of exhaustion are one episode, and the backlog
    // of closed connections drained afterwards may start a short second one. Logging per
    // failure (what this guards against) wrote about 20 lines a second, 40 here.
    let failed = log.matches("accept failed").count();
    let recovered = log.matches("accepting again").count();
    assert!((1..=3).contains(&failed), "{failed} episodes: {log}");
    assert!(recovered >= failed, "{log}");
}

#[test]
fn client_strings_cannot_forge_log_lines() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), &base_yaml(), &[], &[("KVTIER_LOG", "debug")]);
    let sock = srv.bound["socket"].as_str().unwrap().to_string();
    // A client name with a line break (logged at debug when it connects).
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let id = serde_json::to_string(&identity()).unwrap();
    s.write_all(&hello("evil\nFORGED client line\r", id.clone()))
        .unwrap();
    assert!(matches!(recv(&mut s).unwrap(), Response::HelloOk { .. }));
    drop(s);
    // An identity whose error message echoes a line break (logged when refused).
    let bad = id.replace("\"f16\"", "\"x\\nFORGED identity line\"");
    assert_ne!(bad, id);
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&hello("ok", bad)).unwrap();
    assert!(matches!(recv(&mut s).unwrap(), Response::Error { .. }));
    drop(s);
    std::thread::sleep(Duration::from_millis(300));
    let log = srv.log_text();
    assert!(log.contains("FORGED client line"), "{log}");
    assert!(log.contains("FORGED identity line"), "{log}");
    let forged: Vec<&str> = log.lines().filter(|l| l.starts_with("FORGED")).collect();
    assert!(forged.is_empty(), "forged log lines: {forged:?}\n{log}");
}
