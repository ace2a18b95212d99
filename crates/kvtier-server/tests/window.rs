//! Windowed operations (chunks `first_chunk..` of a prompt) through a real `kvtier-server`:
//! a store from one client is looked up and retrieved from others (shared memory and TCP),
//! a bad window is refused with an error and the connection goes on, and a client facing a
//! server older than the windowed requests still works for whole prompts and says to
//! upgrade the server for windows.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use common::*;
use kvtier::KvCache;
use kvtier_client::proto::{self, ErrorCode, Request, Response};
use kvtier_client::{ClientOptions, KvClient};

fn tcp_client(srv: &Server) -> KvClient {
    let opts = ClientOptions {
        max_piece: 3000, // several frames per 2 KiB.. chunk
        ..ClientOptions::default()
    };
    KvClient::connect_with(&srv.tcp(), identity(), opts).unwrap()
}

#[test]
fn a_window_stored_by_one_client_is_found_and_read_by_others() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), &base_yaml(), &["--tcp", "127.0.0.1:0"], &[]);
    let a = KvClient::connect(&srv.unix(), identity()).unwrap();
    assert!(a.server_info().shared_memory);
    assert!(a.server_info().version >= proto::WINDOW_PROTOCOL_VERSION);
    let b = KvClient::connect(&srv.unix(), identity()).unwrap();
    let tcp = tcp_client(&srv);

    // 100 tokens: chunks 0..6 full, a 4-token tail; the window is chunks 3.. (token 48 on).
    let t = tokens(1, 100);
    let p = payload(1, 100);
    let s = a.store_from(&t, None, 3, &p[48 * BPT..]).unwrap();
    assert_eq!((s.stored_tokens, s.new_chunks), (96, 3));
    for c in [&b, &tcp] {
        assert_eq!(
            c.lookup(&t, None).unwrap().hit_tokens,
            0,
            "chunk 0 is absent"
        );
        let l = c.lookup_from(&t, None, 3).unwrap();
        assert_eq!((l.hit_tokens, l.hit_chunks, l.tiers), (96, 3, vec![0; 3]));
        let l = c.lookup_from(&t, None, 2).unwrap();
        assert_eq!((l.hit_tokens, l.hit_chunks), (32, 0), "before the window");
        let mut out = vec![0u8; 52 * BPT];
        let r = c.retrieve_from(&t, None, 3, &mut out).unwrap();
        assert_eq!(r.hit_tokens, 96);
        assert_eq!(out[..48 * BPT], p[48 * BPT..96 * BPT]);
        assert!(out[48 * BPT..].iter().all(|&x| x == 0));
        let mut later = vec![0u8; 16 * BPT];
        let r = c.retrieve_from(&t, None, 5, &mut later).unwrap();
        assert_eq!(r.hit_tokens, 96);
        assert_eq!(later[..], p[80 * BPT..96 * BPT]);
        let mut none = vec![0u8; 68 * BPT];
        assert_eq!(
            c.retrieve_from(&t, None, 2, &mut none).unwrap().hit_tokens,
            32
        );
        assert!(none.iter().all(|&x| x == 0));
    }

    // Over TCP (bytes in frames): a window from chunk 1 of another prompt, read back in
    // place through shared memory.
    let t2 = tokens(2, 64);
    let p2 = payload(2, 64);
    let s = tcp.store_from(&t2, None, 1, &p2[16 * BPT..]).unwrap();
    assert_eq!((s.stored_tokens, s.new_chunks), (64, 3));
    let again = b.store_from(&t2, None, 2, &p2[32 * BPT..]).unwrap();
    assert_eq!((again.stored_tokens, again.present_chunks), (64, 2));
    let mut out = vec![0u8; 48 * BPT];
    assert_eq!(
        a.retrieve_from(&t2, None, 1, &mut out).unwrap().hit_tokens,
        64
    );
    assert_eq!(out[..], p2[16 * BPT..]);

    // Windows out of range are refused by the client before anything is sent.
    let err = a.lookup_from(&t, None, 7).unwrap_err();
    assert!(matches!(err, kvtier::Error::InvalidInput(_)), "{err}");
    assert!(
        err.to_string()
            .contains("first_chunk 7 is past the 6 chunks"),
        "{err}"
    );
    assert!(tcp.store_from(&t, None, 7, &[]).is_err());
    assert!(b.retrieve_from(&t, None, 9, &mut []).is_err());
    let short = b
        .retrieve_from(&t, None, 3, &mut [0u8; 10])
        .unwrap_err()
        .to_string();
    assert!(short.contains("from chunk 3 (token 48) on"), "{short}");
    let stats = srv.stats();
    assert!(stats["lookups"].as_u64().unwrap() >= 6, "{stats}");
}

/// A model connection past its Hello, speaking raw frames.
fn greeted(srv: &Server) -> UnixStream {
    let mut s = UnixStream::connect(srv.bound["socket"].as_str().unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let hello = Request::Hello {
        magic: proto::MAGIC,
        version: proto::PROTOCOL_VERSION,
        client_name: "raw-window".into(),
        identity_json: serde_json::to_string(&identity()).unwrap(),
        chunk_size: Some(CHUNK as u32),
        auth_token: None,
        want_shm: false,
    };
    s.write_all(&proto::encode(&hello, &[]).unwrap()).unwrap();
    let r = recv(&mut s);
    assert!(
        matches!(r, Response::HelloOk { version, .. } if version == proto::PROTOCOL_VERSION),
        "{r:?}"
    );
    s
}

fn recv<S: Read>(s: &mut S) -> Response {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut body).unwrap();
    proto::decode::<Response>(&body).unwrap().0
}

fn call(s: &mut UnixStream, r: &Request, blob: &[u8]) -> Response {
    s.write_all(&proto::encode(r, blob).unwrap()).unwrap();
    recv(s)
}

fn invalid(r: &Response, what: &str) {
    match r {
        Response::Error {
            code: ErrorCode::InvalidInput,
            message,
        } => assert!(message.contains(what), "{message}"),
        other => panic!("expected an invalid-input error about {what:?}, got {other:?}"),
    }
}

#[test]
fn the_server_refuses_bad_windows_and_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mut srv = Server::start(dir.path(), &base_yaml(), &[], &[]);
    let c = KvClient::connect(&srv.unix(), identity()).unwrap();
    let t = tokens(3, 100);
    c.store(&t, None, &payload(3, 100)).unwrap();
    let keys = c.key_space().chunk_spans(&t, None).unwrap();
    let keys: Vec<_> = keys.iter().map(|s| s.key).collect();
    let tok_blob = proto::tokens_to_bytes(&t);
    let mut s = greeted(&srv);
    for first_chunk in [7, u64::MAX] {
        let lf = Request::LookupFrom {
            n_tokens: 100,
            first_chunk,
        };
        invalid(&call(&mut s, &lf, &[]), "is past the 6 chunks");
        let bs = Request::BeginStoreFrom {
            salt: None,
            first_chunk,
        };
        invalid(&call(&mut s, &bs, &tok_blob), "is past the 6 chunks");
        let ac = Request::AcquireFrom {
            salt: None,
            first_chunk,
        };
        invalid(&call(&mut s, &ac, &tok_blob), "is past the 6 chunks");
    }
    // Keys that are not the window's: too many, too few, for a huge prompt.
    let lf = |n_tokens, first_chunk| Request::LookupFrom {
        n_tokens,
        first_chunk,
    };
    let blob = proto::keys_to_bytes(&keys);
    invalid(&call(&mut s, &lf(100, 2), &blob), "6 keys sent");
    let blob = proto::keys_to_bytes(&keys[3..]);
    invalid(&call(&mut s, &lf(100, 2), &blob), "3 keys sent");
    invalid(&call(&mut s, &lf(u64::MAX, 2), &blob), "3 keys sent");
    // A key blob that is no whole number of keys is a protocol error.
    let r = call(&mut s, &lf(100, 2), &[1, 2, 3]);
    assert!(
        matches!(
            r,
            Response::Error {
                code: ErrorCode::Protocol,
                ..
            }
        ),
        "{r:?}"
    );
    // The right window is answered on the same connection, and the empty one too.
    let blob = proto::keys_to_bytes(&keys[2..]);
    let r = call(&mut s, &lf(100, 2), &blob);
    assert_eq!(
        r,
        Response::Lookup {
            hit_chunks: 4,
            tiers: vec![0; 4]
        }
    );
    let r = call(&mut s, &lf(100, 6), &[]);
    assert_eq!(
        r,
        Response::Lookup {
            hit_chunks: 0,
            tiers: vec![]
        }
    );
    let r = call(
        &mut s,
        &Request::AcquireFrom {
            salt: None,
            first_chunk: 4,
        },
        &tok_blob,
    );
    match r {
        Response::Acquired {
            lease,
            hit_tokens,
            chunks,
            ..
        } => {
            assert_eq!(hit_tokens, 96);
            let spans: Vec<(u64, u64)> = chunks.iter().map(|c| (c.start, c.end)).collect();
            assert_eq!(spans, [(64, 80), (80, 96)]);
            s.write_all(&proto::encode(&Request::Release { lease }, &[]).unwrap())
                .unwrap();
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(call(&mut s, &Request::Ping, &[]), Response::Pong);
    assert!(srv.alive());
}

/// A stand-in for a server of protocol version 2 (before the windowed requests): it
/// answers the Hello and whole-prompt lookups, and records every request it gets.
fn old_server(path: &std::path::Path) -> std::thread::JoinHandle<Vec<Request>> {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut seen = Vec::new();
        loop {
            let mut len = [0u8; 4];
            if s.read_exact(&mut len).is_err() {
                return seen;
            }
            let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
            s.read_exact(&mut body).unwrap();
            let (req, _) = proto::decode::<Request>(&body).unwrap();
            let reply = match &req {
                Request::Hello { .. } => Response::HelloOk {
                    version: 2,
                    server_name: "old".into(),
                    chunk_size: CHUNK as u32,
                    save_unfull_chunk: false,
                    bytes_per_token: BPT as u64,
                    shm_pool_bytes: None,
                    max_frame: proto::DEFAULT_MAX_FRAME as u64,
                },
                Request::Lookup { .. } => Response::Lookup {
                    hit_chunks: 1,
                    tiers: vec![0],
                },
                _ => Response::Error {
                    code: ErrorCode::Protocol,
                    message: "malformed frame: undecodable message".into(),
                },
            };
            seen.push(req);
            s.write_all(&proto::encode(&reply, &[]).unwrap()).unwrap();
        }
    })
}

#[test]
fn a_client_facing_a_version_2_server_works_for_prompts_and_says_to_upgrade_for_windows() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("old.sock");
    let server = old_server(&sock);
    let c = KvClient::connect(&format!("unix:{}", sock.display()), identity()).unwrap();
    assert_eq!(c.server_info().version, 2);
    let t = tokens(4, 64);
    assert_eq!(c.lookup(&t, None).unwrap().hit_tokens, 16);
    assert_eq!(c.lookup_from(&t, None, 0).unwrap().hit_tokens, 16);
    let upgrade = |e: kvtier::Error| {
        let m = e.to_string();
        assert!(
            m.contains("protocol version 2") && m.contains("upgrade the server"),
            "{m}"
        );
    };
    upgrade(c.lookup_from(&t, None, 1).unwrap_err());
    upgrade(
        c.store_from(&t, None, 1, &payload(4, 64)[16 * BPT..])
            .unwrap_err(),
    );
    upgrade(
        c.retrieve_from(&t, None, 2, &mut vec![0u8; 32 * BPT])
            .unwrap_err(),
    );
    drop(c);
    let seen = server.join().unwrap();
    // The Hello announced a version a version-2 server accepts, and no windowed request
    // was sent.
    assert!(
        matches!(&seen[0], Request::Hello { version, .. } if *version == proto::HELLO_VERSION && *version <= 2),
        "{:?}",
        seen[0]
    );
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen[1..]
        .iter()
        .all(|r| matches!(r, Request::Lookup { .. })));
}
