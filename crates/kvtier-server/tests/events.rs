//! KV events from a real `kvtier-server`: a subscriber built from real ZeroMQ sockets
//! (SUB for the stream, DEALER for replay) mirrors what L1 holds, through stores,
//! evictions, tenant deletion and clear; one that disconnects and replays ends with the same
//! index; and, when a Python with vLLM is at hand, vLLM's own msgspec types decode every
//! batch (`e2e/run_vllm_e2e.sh` sets `KVTIER_VLLM_PYTHON`, which makes that part required).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use kvtier::keys::{ChunkKey, KeySpace};
use kvtier::KvCache;
use kvtier_client::KvClient;
use parking_lot::Mutex;
use rmpv::Value as Mp;
use serde_json::{json, Value};
use zeromq::{DealerSocket, Socket, SocketRecv, SocketSend, SubSocket, ZmqMessage};

const TOKEN: &str = "events-test-token-not-a-secret";
const TOPIC: &str = "kv-events";

/// What a subscriber learnt: the index per medium and where it is in the sequence.
#[derive(Default)]
struct Mirror {
    by_medium: BTreeMap<String, BTreeSet<Vec<u8>>>,
    next_seq: u64,
    /// Every batch applied, in sequence order (for the vLLM decode).
    payloads: Vec<Vec<u8>>,
    replays: usize,
    media: BTreeSet<String>,
}

fn field<'a>(ev: &'a Mp, name: &str) -> Option<&'a Mp> {
    ev.as_map()?
        .iter()
        .find(|(k, _)| k.as_str() == Some(name))
        .map(|(_, v)| v)
}

fn hashes(ev: &Mp) -> Vec<Vec<u8>> {
    field(ev, "block_hashes")
        .and_then(Mp::as_array)
        .expect("block_hashes")
        .iter()
        .map(|h| h.as_slice().expect("a hash is bytes").to_vec())
        .collect()
}

impl Mirror {
    /// The blocks announced on any medium: what a load could read somewhere on this node.
    fn index(&self) -> BTreeSet<Vec<u8>> {
        self.by_medium.values().flatten().cloned().collect()
    }

    fn apply(&mut self, seq: u64, payload: &[u8]) {
        assert_eq!(seq, self.next_seq, "batches applied in order");
        let batch = rmpv::decode::read_value(&mut &payload[..]).expect("msgpack");
        let parts = batch.as_array().expect("[ts, events, dp_rank]");
        assert_eq!(parts.len(), 3);
        assert!(parts[0].as_f64().is_some_and(|t| t > 1e9), "ts is a float");
        for ev in parts[1].as_array().expect("events") {
            let medium = field(ev, "medium").and_then(Mp::as_str).map(str::to_string);
            if let Some(m) = &medium {
                self.media.insert(m.clone());
            }
            match field(ev, "type")
                .and_then(Mp::as_str)
                .expect("tagged event")
            {
                "BlockStored" => {
                    assert_eq!(ev.as_map().unwrap().len(), 8, "{ev}");
                    let m = medium.expect("a stored block has a medium");
                    self.by_medium.entry(m).or_default().extend(hashes(ev));
                }
                "BlockRemoved" => {
                    let m = medium.expect("a removal has a medium");
                    let set = self.by_medium.entry(m).or_default();
                    for h in hashes(ev) {
                        set.remove(&h);
                    }
                }
                "AllBlocksCleared" => self.by_medium.clear(),
                t => panic!("unknown event type {t}"),
            }
        }
        self.payloads.push(payload.to_vec());
        self.next_seq = seq + 1;
    }
}

fn seq_of(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().expect("8-byte sequence number"))
}

/// Asks the replay socket for every batch from `m.next_seq` on and applies them.
async fn replay(endpoint: &str, m: &Mutex<Mirror>) {
    let mut d = DealerSocket::new();
    d.connect(endpoint).await.expect("connecting to replay");
    let start = m.lock().next_seq;
    let req = ZmqMessage::try_from(vec![
        Bytes::new(),
        Bytes::copy_from_slice(&start.to_be_bytes()),
    ])
    .unwrap();
    d.send(req).await.unwrap();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), d.recv())
            .await
            .expect("replay answers")
            .unwrap();
        let f = msg.into_vec();
        assert_eq!(f.len(), 4, "[\"\", topic, seq, payload]");
        assert!(f[0].is_empty());
        if f[2][..] == [0xff; 8] {
            assert!(f[1].is_empty() && f[3].is_empty(), "end marker");
            break;
        }
        assert_eq!(&f[1][..], TOPIC.as_bytes());
        let seq = seq_of(&f[2]);
        let mut g = m.lock();
        if seq >= g.next_seq {
            g.apply(seq, &f[3]);
        }
    }
    m.lock().replays += 1;
}

/// A subscriber on its own thread until `stop`; gaps (joining late, reconnecting) are
/// filled from the replay socket.
fn subscribe(
    publish: String,
    replay_ep: String,
    m: Arc<Mutex<Mirror>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut sub = SubSocket::new();
            sub.connect(&publish).await.expect("connecting SUB");
            sub.subscribe(TOPIC).await.unwrap();
            while !stop.load(Ordering::Acquire) {
                let Ok(msg) = tokio::time::timeout(Duration::from_millis(20), sub.recv()).await
                else {
                    continue;
                };
                let f = msg.expect("SUB recv").into_vec();
                assert_eq!(f.len(), 3, "[topic, seq, payload]");
                assert_eq!(&f[0][..], TOPIC.as_bytes());
                let seq = seq_of(&f[1]);
                let next = m.lock().next_seq;
                if seq > next {
                    replay(&replay_ep, &m).await;
                }
                let mut g = m.lock();
                if seq == g.next_seq {
                    g.apply(seq, &f[2]);
                }
                assert!(g.next_seq > seq, "replay filled the gap up to {seq}");
            }
        });
    })
}

/// The keys among `keys` the server holds, from the batch form of `/lookup`.
fn held(srv: &Server, keys: &[ChunkKey]) -> BTreeSet<Vec<u8>> {
    let lists: Vec<Vec<String>> = keys.iter().map(|k| vec![k.to_hex()]).collect();
    let mut out = BTreeSet::new();
    for part in lists.chunks(200) {
        let (code, text) = srv.http("POST", "/lookup", Some(&json!({ "block_hashes": part })));
        assert_eq!(code, 200, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        for (r, l) in v["results"].as_array().unwrap().iter().zip(part) {
            if r["hit_chunks"] == 1 {
                out.insert(ChunkKey::from_hex(&l[0]).unwrap().0.to_vec());
            }
        }
    }
    out
}

/// Waits until `m`'s index equals what the server holds, asking the server again each time
/// (a disk write lands after its store returned); returns how long that took.
fn settles(srv: &Server, m: &Mutex<Mirror>, keys: &[ChunkKey], limit: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let truth = held(srv, keys);
        if m.lock().index() == truth {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < limit,
            "subscriber index ({} keys) differs from what the server holds ({} keys) after {limit:?}",
            m.lock().index().len(),
            truth.len()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A Python whose vLLM can decode the events: `KVTIER_VLLM_PYTHON` (then required), else
/// the e2e venv when it exists.
fn vllm_python() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("KVTIER_VLLM_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var_os("HOME")?;
    let cache = Path::new(&home).join(".cache/kvtier-e2e");
    let found = std::fs::read_dir(cache)
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin/python"))
        .find(|p| p.exists())?;
    let ok = Command::new(&found)
        .args(["-c", "import vllm.distributed.kv_events"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(found)
}

#[test]
fn a_subscriber_mirrors_l1_and_a_reconnecting_one_catches_up_by_replay() {
    let dir = tempfile::tempdir().unwrap();
    let events = json!({
        "enable_kv_cache_events": true,
        "publisher": "zmq",
        "endpoint": "tcp://127.0.0.1:0",
        "replay_endpoint": "tcp://127.0.0.1:0",
        "topic": TOPIC,
    })
    .to_string();
    // 128 KiB of L1: 32 chunks of 16 tokens (2 KiB each, one 4 KiB page): stores evict.
    let yaml =
        format!("chunk_size: {CHUNK}\nmax_local_cpu_size: 128KiB\nlocal_cpu_huge_pages: false\n");
    let srv = Server::start(
        dir.path(),
        &yaml,
        &["--kv-events-config", &events],
        &[("KVTIER_ADMIN_TOKEN", TOKEN)],
    );
    let publish = srv.bound["kv_events"]
        .as_str()
        .expect("PUB endpoint")
        .to_string();
    let replay_ep = srv.bound["kv_events_replay"]
        .as_str()
        .expect("replay endpoint")
        .to_string();
    let steady = Arc::new(Mutex::new(Mirror::default()));
    let dropping = Arc::new(Mutex::new(Mirror::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let stop_b = Arc::new(AtomicBool::new(false));
    let a = subscribe(
        publish.clone(),
        replay_ep.clone(),
        steady.clone(),
        stop.clone(),
    );
    let b = subscribe(
        publish.clone(),
        replay_ep.clone(),
        dropping.clone(),
        stop_b.clone(),
    );

    let ks = KeySpace::new(identity(), CHUNK, false).unwrap();
    let c = KvClient::connect(&srv.unix(), identity()).unwrap();
    let mut keys = Vec::new();
    let store = |keys: &mut Vec<ChunkKey>, doc: u64, salt: Option<&str>| {
        let t = tokens(doc, 64);
        keys.extend(ks.chunk_spans(&t, salt).unwrap().iter().map(|s| s.key));
        c.store(&t, salt, &payload(doc, 64)).unwrap();
    };
    // A SUB socket's subscription reaches the publisher some time after `subscribe`
    // returns (ZeroMQ's slow joiner): store until each subscriber has seen a live batch,
    // after which any gap is filled by replay.
    let t0 = Instant::now();
    for doc in 1000.. {
        store(&mut keys, doc, None);
        std::thread::sleep(Duration::from_millis(50));
        if steady.lock().next_seq > 0 && dropping.lock().next_seq > 0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no subscriber saw a batch"
        );
    }
    for doc in 0..6 {
        store(&mut keys, doc, None);
    }
    // Both saw the first stores; the second subscriber then goes away.
    let t = settles(&srv, &steady, &keys, Duration::from_secs(5));
    eprintln!("first stores reflected after {t:?}");
    settles(&srv, &dropping, &keys, Duration::from_secs(5));
    stop_b.store(true, Ordering::Release);
    b.join().unwrap();

    // More stores than L1 holds (evictions), a tenant's chunks, then its deletion.
    for doc in 6..20 {
        store(&mut keys, doc, None);
    }
    for doc in 20..24 {
        store(&mut keys, doc, Some("tenant-a"));
    }
    let t = settles(&srv, &steady, &keys, Duration::from_secs(1));
    eprintln!("evictions reflected after {t:?}");
    let (code, text) = srv.http("DELETE", "/salt/tenant-a", None);
    assert_eq!(code, 200, "{text}");
    let t = settles(&srv, &steady, &keys, Duration::from_secs(1));
    eprintln!("salt deletion reflected after {t:?}");
    let stats = srv.stats();
    assert!(
        stats["l1"]["evictions"].as_u64().unwrap_or(0) > 0,
        "the test must evict: {stats}"
    );

    // The dropped subscriber comes back, sees a gap and replays; a store after it wakes it.
    let stop_b = Arc::new(AtomicBool::new(false));
    let b = subscribe(publish, replay_ep, dropping.clone(), stop_b.clone());
    std::thread::sleep(Duration::from_millis(200));
    store(&mut keys, 99, None);
    settles(&srv, &steady, &keys, Duration::from_secs(1));
    settles(&srv, &dropping, &keys, Duration::from_secs(5));
    assert!(
        dropping.lock().replays >= 1,
        "the reconnecting subscriber replayed"
    );
    assert_eq!(steady.lock().index(), dropping.lock().index());
    assert!(!steady.lock().index().is_empty());

    // Clear empties both.
    let (code, text) = srv.http("POST", "/clear", None);
    assert_eq!(code, 200, "{text}");
    settles(&srv, &steady, &keys, Duration::from_secs(1));
    settles(&srv, &dropping, &keys, Duration::from_secs(1));
    assert!(steady.lock().index().is_empty());
    stop.store(true, Ordering::Release);
    stop_b.store(true, Ordering::Release);
    a.join().unwrap();
    b.join().unwrap();
    let m = steady.lock();
    assert_eq!(m.media, BTreeSet::from(["CPU".to_string()]));

    // vLLM's own decoder reads every batch and ends with the same (empty) index; replaying
    // up to before the clear must give the index the subscriber had then.
    let Some(py) = vllm_python() else {
        eprintln!("SKIPPED the vLLM decode: no Python with vLLM (set KVTIER_VLLM_PYTHON)");
        return;
    };
    let dump = dir.path().join("batches.bin");
    let mut bytes = Vec::new();
    for p in &m.payloads {
        bytes.extend_from_slice(&(p.len() as u32).to_be_bytes());
        bytes.extend_from_slice(p);
    }
    std::fs::write(&dump, bytes).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../e2e/decode_kv_events.py");
    let out = Command::new(&py)
        .arg(&script)
        .arg(&dump)
        .env("VLLM_LOGGING_LEVEL", "ERROR")
        .output()
        .expect("running the vLLM decoder");
    assert!(
        out.status.success(),
        "vLLM's decoder failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(
        out.stdout
            .split(|&b| b == b'\n')
            .rfind(|l| !l.is_empty())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(v["batches"], m.payloads.len(), "{v}");
    assert_eq!(v["index"], json!([]), "{v}");
    assert!(
        v["counts"]["BlockStored"].as_u64().unwrap() >= keys.len() as u64 - 4,
        "{v}"
    );
    assert!(v["counts"]["BlockRemoved"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["media"], json!(["CPU"]), "{v}");
    eprintln!(
        "vLLM decoded {} batches, {} events",
        v["batches"], v["events"]
    );
}

#[test]
fn the_disk_tier_is_announced_as_storage() {
    let dir = tempfile::tempdir().unwrap();
    let events = json!({
        "enable_kv_cache_events": true,
        "endpoint": "tcp://127.0.0.1:0",
        "replay_endpoint": "tcp://127.0.0.1:0",
        "topic": TOPIC,
    })
    .to_string();
    // 64 KiB of L1 (16 chunks) over a disk tier: most chunks end up on disk only.
    let yaml = format!(
        "chunk_size: {CHUNK}\nmax_local_cpu_size: 64KiB\nlocal_cpu_huge_pages: false\n\
         local_disk: \"file://{}/disk\"\nmax_local_disk_size: 0.01\n",
        dir.path().display()
    );
    let srv = Server::start(
        dir.path(),
        &yaml,
        &["--kv-events-config", &events],
        &[("KVTIER_ADMIN_TOKEN", TOKEN)],
    );
    let publish = srv.bound["kv_events"].as_str().unwrap().to_string();
    let replay_ep = srv.bound["kv_events_replay"].as_str().unwrap().to_string();
    let m = Arc::new(Mutex::new(Mirror::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let sub = subscribe(publish, replay_ep, m.clone(), stop.clone());
    let ks = KeySpace::new(identity(), CHUNK, false).unwrap();
    let c = KvClient::connect(&srv.unix(), identity()).unwrap();
    let warm = tokens(500, 64);
    let mut keys: Vec<ChunkKey> = ks
        .chunk_spans(&warm, None)
        .unwrap()
        .iter()
        .map(|s| s.key)
        .collect();
    let t0 = Instant::now();
    for doc in 0..24 {
        let t = tokens(doc, 64);
        keys.extend(ks.chunk_spans(&t, None).unwrap().iter().map(|s| s.key));
        c.store(&t, None, &payload(doc, 64)).unwrap();
        // The first stores may go out before the subscription reached the publisher: the
        // subscriber replays what it missed once it sees a later batch.
        while doc == 0 && m.lock().next_seq == 0 {
            assert!(t0.elapsed() < Duration::from_secs(10), "no batch seen");
            c.store(&warm, None, &payload(500, 64)).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    settles(&srv, &m, &keys, Duration::from_secs(5));
    {
        let g = m.lock();
        let cpu = g.by_medium.get("CPU").cloned().unwrap_or_default();
        let disk = g.by_medium.get("STORAGE").cloned().unwrap_or_default();
        assert!(
            disk.difference(&cpu).count() > 0,
            "chunks L1 evicted stay announced on STORAGE"
        );
        assert!(cpu.len() <= 16, "L1 holds at most 16 chunks: {}", cpu.len());
    }
    // Removal reaches both media.
    let (code, text) = srv.http("POST", "/clear", None);
    assert_eq!(code, 200, "{text}");
    settles(&srv, &m, &keys, Duration::from_secs(5));
    assert!(m.lock().index().is_empty());
    stop.store(true, Ordering::Release);
    sub.join().unwrap();
    assert_eq!(
        m.lock().media,
        BTreeSet::from(["CPU".to_string(), "STORAGE".to_string()])
    );
}

#[test]
fn events_off_by_default_and_bad_configs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), &base_yaml(), &[], &[]);
    assert!(srv.bound["kv_events"].is_null());
    drop(srv);
    let exit = |yaml: &str, events: &str| {
        let cfg = dir.path().join("bad.yaml");
        std::fs::write(&cfg, yaml).unwrap();
        let sock = dir.path().join("bad.sock");
        let (st, log) = run_server_to_exit(
            &[
                "--config",
                cfg.to_str().unwrap(),
                "--socket",
                sock.to_str().unwrap(),
                "--kv-events-config",
                events,
            ],
            &[],
            Duration::from_secs(30),
        )
        .expect("the server refuses to start");
        assert!(!st.success());
        log
    };
    // A typo is an error naming the keys; L1 off cannot be reported.
    let bad = exit(&base_yaml(), r#"{"enable_kv_events": true}"#);
    assert!(bad.contains("enable_kv_cache_events"), "{bad}");
    let no_l1 = format!(
        "{}local_cpu: false\nlocal_disk: \"file://{}/d\"\nmax_local_disk_size: 0.01\n",
        base_yaml(),
        dir.path().display()
    );
    let log = exit(
        &no_l1,
        r#"{"enable_kv_cache_events": true, "endpoint": "tcp://127.0.0.1:0"}"#,
    );
    assert!(log.contains("local_cpu: true"), "{log}");
}
