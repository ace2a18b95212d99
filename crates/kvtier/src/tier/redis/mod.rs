//! The Redis/Valkey tier: a store shared by every node pointing at the same server or cluster.
//!
//! * Values are exactly the record encoding ([`crate::chunk::record`]): header then payload,
//!   under the key `<prefix><64 hex chars of the chunk key>`, optionally with a TTL.
//! * `put` writes the RESP prefix and record header, then the payload straight from the
//!   chunk's buffer (vectored write), one value per round trip; concurrent puts of one key
//!   are deduplicated.
//! * `get` reads the bulk reply's record header, allocates the payload buffer from the L1
//!   pool and reads the payload straight into it, then verifies the checksum (a mismatch is a
//!   miss: the key is deleted and counted in [`RedisTierStats::checksum_failures`]).
//! * `contains_prefix` is one pipelined batch of `EXISTS` per node (one round trip; in a
//!   cluster, one per involved node, in parallel).
//! * Cluster mode discovers slots with `CLUSTER SLOTS`, routes by CRC16 key slot, follows
//!   `MOVED` (and refreshes the map) and `ASK` (with `ASKING`). A background task reloads the
//!   slot map periodically (`slot_refresh_sec`) and soon after a node fails, so slot
//!   migrations and failovers are followed before requests run into them; it asks every
//!   known node in turn (seeds first) and keeps the old map when none answers.
//! * TLS (`rediss://`): rustls, configured by the `remote_tls_*` keys ([`tls`]).
//! * Faults: connects are bounded by a timeout and retried with backoff; every other wait is
//!   bounded by the manager's deadlines; cancelled requests discard their connection. The
//!   per-node pool and its link handling are shared with the kvtier server tier
//!   (`transport::link`); opening a Redis connection is in `pool`.
//!
//! URL syntax and options: [`url`].

pub(crate) mod cluster;
pub(crate) mod pool;
pub mod tls;
pub mod url;

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;

use self::cluster::{host_of, key_slot, parse_redirect, parse_slots, Redirect, SlotRange, SLOTS};
use self::pool::{Node, Shared};
use self::tls::TlsSettings;
use self::url::{Mode, RedisUrl};
use super::{PutOutcome, Tier, TierFuture, TierUsage};
use crate::chunk::record::{decode_header, encode_header, MAX_HEADER_LEN};
use crate::chunk::Chunk;
use crate::error::{Error, Result};
use crate::keys::{ChunkKey, KeyMap};
use crate::memory::BufferSource;
use crate::transport::link::{LinkCounters, LinkSettings};
use crate::transport::record::{read_record, RecordRead, Terminator};
use crate::transport::resp::{encode_bulk_header, encode_command, Conn, Reply};

/// Most redirects followed for one request.
const MAX_REDIRECTS: usize = 5;
/// Keys per `SCAN` page and per delete batch.
const SCAN_COUNT: &[u8] = b"1000";
/// Least time between two background slot-map refreshes: node failures wake the refresher,
/// and a burst of failing requests must not turn into a burst of `CLUSTER SLOTS`.
const MIN_REFRESH_GAP: Duration = Duration::from_millis(200);

/// Snapshot of a Redis tier's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RedisTierStats {
    /// `get` calls that reached a server.
    pub gets: u64,
    /// Gets that returned a verified chunk.
    pub hits: u64,
    /// Gets of absent keys.
    pub misses: u64,
    /// Chunks written.
    pub puts: u64,
    /// Puts skipped because the same key was being written.
    pub puts_deduped: u64,
    /// Payload bytes written.
    pub put_bytes: u64,
    /// Payload bytes read.
    pub get_bytes: u64,
    /// Values that failed validation (bad record or checksum): treated as misses and deleted.
    pub checksum_failures: u64,
    /// Gets dropped because the L1 pool had no room for the payload.
    pub alloc_failures: u64,
    /// Connections opened.
    pub connects: u64,
    /// Failed connects (refused, timed out, authentication failed).
    pub connect_failures: u64,
    /// I/O errors on established connections.
    pub io_errors: u64,
    /// `MOVED`/`ASK` redirects followed.
    pub redirects: u64,
    /// Cluster slot maps loaded (at start, periodically, after redirects and node failures).
    pub slot_map_refreshes: u64,
    /// Slot-map reloads where no known node answered (the previous map was kept).
    pub slot_map_refresh_failures: u64,
}

#[derive(Debug, Default)]
struct Counters {
    gets: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    puts: AtomicU64,
    puts_deduped: AtomicU64,
    put_bytes: AtomicU64,
    get_bytes: AtomicU64,
    checksum_failures: AtomicU64,
    alloc_failures: AtomicU64,
    redirects: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// A request sent to the node owning one key.
enum Op<'a> {
    Get {
        key: ChunkKey,
        bufs: &'a dyn BufferSource,
    },
    Put {
        chunk: &'a Chunk,
        header: &'a [u8],
    },
    Del,
    Exists,
}

/// What a request produced.
enum Out {
    Record(RecordRead),
    Miss,
    Stored,
    Int(i64),
}

/// One attempt's result on one connection (the connection is reusable in every case).
enum Step<T> {
    Done(T),
    Redirect(Redirect),
    ServerError(String),
}

fn protocol(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn error_step<T>(e: String) -> Step<T> {
    match parse_redirect(&e, "") {
        Some(r) => Step::Redirect(r),
        None => Step::ServerError(e),
    }
}

/// Slot owners of a cluster.
struct SlotMap {
    owner: Vec<Option<Arc<Node>>>,
}

/// A cluster's nodes and slot map; shared (weakly) with the background refresher.
struct ClusterState {
    tier: String,
    shared: Arc<Shared>,
    seeds: Vec<String>,
    nodes: Mutex<HashMap<String, Arc<Node>>>,
    map: RwLock<Option<Arc<SlotMap>>>,
    stale: AtomicBool,
    generation: AtomicU64,
    refresh_lock: tokio::sync::Mutex<()>,
    refreshes: AtomicU64,
    refresh_failures: AtomicU64,
    /// Whether the last refresh failed (log the first failure and the recovery only).
    failing: AtomicBool,
    /// Wakes the background refresher ahead of its period.
    wake: Arc<Notify>,
}

impl ClusterState {
    fn err(&self, msg: impl Into<String>) -> Error {
        Error::tier(&self.tier, msg)
    }

    fn node(&self, addr: &str) -> Arc<Node> {
        self.nodes
            .lock()
            .entry(addr.to_string())
            .or_insert_with(|| Arc::new(Node::new(addr.to_string(), self.shared.clone())))
            .clone()
    }

    /// Asks one node for the slot ranges.
    async fn ask_slots(&self, node: &Node, addr: &str) -> Result<Vec<SlotRange>> {
        let mut lease = node.acquire().await?;
        let reply = match lease.conn().command(&[b"CLUSTER", b"SLOTS"]).await {
            Ok(r) => r,
            Err(e) => {
                drop(lease);
                node.io_failed(&e);
                return Err(node.error(e));
            }
        };
        lease.done();
        match parse_slots(&reply, host_of(addr)) {
            Some(r) if !r.is_empty() => Ok(r),
            _ => Err(node.error(format_args!(
                "CLUSTER SLOTS gave no usable slot map ({})",
                match &reply {
                    Reply::Error(e) => e.as_str(),
                    _ => "malformed or empty reply",
                }
            ))),
        }
    }

    /// Reloads the slot map from the first node that answers `CLUSTER SLOTS`: the seeds,
    /// then every node discovered so far. When none answers, the old map stays.
    /// `per_node` bounds each node's turn (the background task; requests have deadlines).
    async fn refresh(&self, per_node: Option<Duration>) -> Result<()> {
        let seen = self.generation.load(Ordering::Acquire);
        let _g = self.refresh_lock.lock().await;
        if self.generation.load(Ordering::Acquire) != seen {
            return Ok(()); // refreshed while we waited
        }
        let mut candidates = self.seeds.clone();
        let mut known: Vec<String> = self.nodes.lock().keys().cloned().collect();
        known.sort();
        for k in known {
            if !candidates.contains(&k) {
                candidates.push(k);
            }
        }
        let mut last = self.err("no cluster node to ask for slots");
        for addr in candidates {
            let node = self.node(&addr);
            let asked = match per_node {
                Some(t) => tokio::time::timeout(t, self.ask_slots(&node, &addr))
                    .await
                    .unwrap_or_else(|_| {
                        Err(node.error(format_args!(
                            "CLUSTER SLOTS took longer than {} ms",
                            t.as_millis()
                        )))
                    }),
                None => self.ask_slots(&node, &addr).await,
            };
            let ranges = match asked {
                Ok(r) => r,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            let mut owner: Vec<Option<Arc<Node>>> = vec![None; SLOTS];
            for r in &ranges {
                let n = self.node(&r.addr);
                for slot in owner[r.start as usize..=r.end as usize].iter_mut() {
                    *slot = Some(n.clone());
                }
            }
            let served = owner.iter().filter(|o| o.is_some()).count();
            let old = self.map.read().clone();
            let moved = old.as_ref().map_or(0, |m| {
                m.owner
                    .iter()
                    .zip(&owner)
                    .filter(|(a, b)| match (a, b) {
                        (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
                        (None, None) => false,
                        _ => true,
                    })
                    .count()
            });
            if moved > 0 {
                tracing::info!(tier = %self.tier, moved, served, "cluster slot map changed");
            } else {
                tracing::debug!(tier = %self.tier, ranges = ranges.len(), served, "cluster slot map loaded");
            }
            if self.failing.swap(false, Ordering::AcqRel) {
                tracing::info!(tier = %self.tier, from = %addr, "cluster slot map reloaded again");
            }
            *self.map.write() = Some(Arc::new(SlotMap { owner }));
            self.stale.store(false, Ordering::Release);
            self.refreshes.fetch_add(1, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::AcqRel);
            return Ok(());
        }
        self.refresh_failures.fetch_add(1, Ordering::Relaxed);
        if !self.failing.swap(true, Ordering::AcqRel) {
            tracing::warn!(tier = %self.tier, error = %last, "no cluster node answered CLUSTER SLOTS; keeping the previous slot map");
        }
        Err(last)
    }

    async fn slot_map(&self) -> Result<Arc<SlotMap>> {
        if self.stale.load(Ordering::Acquire) {
            let r = self.refresh(None).await;
            let have = self.map.read().clone();
            match (r, have) {
                (_, Some(m)) => return Ok(m), // a failed refresh keeps the old map
                (Err(e), None) => return Err(e),
                (Ok(()), None) => {}
            }
        }
        self.map
            .read()
            .clone()
            .ok_or_else(|| self.err("cluster slot map unavailable"))
    }
}

/// Starts the background slot-map refresher of a cluster: every `every` (if any), and when
/// woken (startup, node failures). It holds the state weakly and is aborted when the tier is
/// dropped, so no task outlives the tier.
fn spawn_refresher(
    cs: &Arc<ClusterState>,
    every: Option<Duration>,
) -> Option<tokio::task::AbortHandle> {
    let weak: Weak<ClusterState> = Arc::downgrade(cs);
    let wake = cs.wake.clone();
    let per_node = (cs.shared.link.connect_timeout * 2).max(Duration::from_secs(1));
    let rt = pool::runtime().ok()?;
    // Load the map at startup instead of on the first request.
    wake.notify_one();
    let task = rt.spawn(async move {
        loop {
            match every {
                Some(period) => {
                    tokio::select! {
                        _ = tokio::time::sleep(period) => {}
                        _ = wake.notified() => {}
                    }
                }
                None => wake.notified().await,
            }
            let Some(cs) = weak.upgrade() else { return };
            // Failures are logged (once) and counted inside.
            let _ = cs.refresh(Some(per_node)).await;
            drop(cs);
            tokio::time::sleep(MIN_REFRESH_GAP).await;
        }
    });
    Some(task.abort_handle())
}

enum Topology {
    Single(Arc<Node>),
    Cluster(Arc<ClusterState>),
}

/// Removes a key from the in-flight set when dropped (also when the put is cancelled).
struct Inflight<'a>(&'a Mutex<KeyMap<()>>, ChunkKey);

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        self.0.lock().remove(&self.1);
    }
}

/// A Redis/Valkey tier (standalone or cluster).
pub struct RedisTier {
    name: String,
    url: RedisUrl,
    shared: Arc<Shared>,
    topo: Topology,
    inflight: Mutex<KeyMap<()>>,
    counters: Counters,
    refresher: Option<tokio::task::AbortHandle>,
}

impl Drop for RedisTier {
    fn drop(&mut self) {
        if let Some(t) = self.refresher.take() {
            t.abort();
        }
    }
}

impl std::fmt::Debug for RedisTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTier")
            .field("name", &self.name)
            .field("url", &self.url)
            .finish()
    }
}

impl RedisTier {
    /// Builds the tier for the `index`-th entry of `remote_url` (default names: `redis`,
    /// `redis2`, ...). Does not connect: an unreachable server makes operations fail (and
    /// the manager mark the tier down) rather than the engine fail to start.
    /// `rediss://` URLs verify servers against the system trust store; see
    /// [`RedisTier::from_url_with_tls`] for other TLS settings.
    pub fn from_url(url: &str, index: usize) -> Result<RedisTier> {
        RedisTier::new(RedisUrl::parse(url)?, index, &TlsSettings::default())
    }

    /// Like [`RedisTier::from_url`], with TLS settings for `rediss://` URLs (ignored by
    /// plaintext ones).
    pub fn from_url_with_tls(url: &str, index: usize, tls: &TlsSettings) -> Result<RedisTier> {
        RedisTier::new(RedisUrl::parse(url)?, index, tls)
    }

    /// Builds the tier from a parsed URL; reads the TLS files now when the URL is TLS.
    pub fn new(url: RedisUrl, index: usize, tls: &TlsSettings) -> Result<RedisTier> {
        let name = url.name.clone().unwrap_or_else(|| match index {
            0 => "redis".to_string(),
            i => format!("redis{}", i + 1),
        });
        let shared = Arc::new(Shared {
            link: LinkSettings {
                kind: "redis",
                tier: name.clone(),
                pool: url.pool,
                connect_timeout: url.connect_timeout,
                retry_max: url.retry_max,
                counters: LinkCounters::default(),
            },
            credentials: url.credentials.clone(),
            db: url.db,
            tls: if url.tls {
                Some(tls::client_config(tls)?)
            } else {
                None
            },
        });
        let mut refresher = None;
        let topo = match url.mode {
            Mode::Standalone => {
                let addr =
                    url.hosts.first().cloned().ok_or_else(|| {
                        Error::config("remote_url", format!("`{url}` names no host"))
                    })?;
                let node = Arc::new(Node::new(addr, shared.clone()));
                node.warm_up();
                Topology::Single(node)
            }
            Mode::Cluster => {
                let cs = Arc::new(ClusterState {
                    tier: name.clone(),
                    shared: shared.clone(),
                    seeds: url.hosts.clone(),
                    nodes: Mutex::default(),
                    map: RwLock::new(None),
                    stale: AtomicBool::new(true),
                    generation: AtomicU64::new(0),
                    refresh_lock: tokio::sync::Mutex::new(()),
                    refreshes: AtomicU64::new(0),
                    refresh_failures: AtomicU64::new(0),
                    failing: AtomicBool::new(false),
                    wake: Arc::new(Notify::new()),
                });
                refresher = spawn_refresher(&cs, url.slot_refresh);
                Topology::Cluster(cs)
            }
        };
        tracing::info!(tier = %name, url = %url, tls = url.tls, "redis tier configured");
        Ok(RedisTier {
            name,
            url,
            shared,
            topo,
            inflight: Mutex::default(),
            counters: Counters::default(),
            refresher,
        })
    }

    /// The URL, credentials redacted.
    pub fn url(&self) -> &RedisUrl {
        &self.url
    }

    /// Counter snapshot.
    pub fn stats(&self) -> RedisTierStats {
        let c = &self.counters;
        let l = &self.shared.link.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (refreshes, refresh_failures) = match &self.topo {
            Topology::Cluster(cs) => (g(&cs.refreshes), g(&cs.refresh_failures)),
            Topology::Single(_) => (0, 0),
        };
        RedisTierStats {
            gets: g(&c.gets),
            hits: g(&c.hits),
            misses: g(&c.misses),
            puts: g(&c.puts),
            puts_deduped: g(&c.puts_deduped),
            put_bytes: g(&c.put_bytes),
            get_bytes: g(&c.get_bytes),
            checksum_failures: g(&c.checksum_failures),
            alloc_failures: g(&c.alloc_failures),
            connects: g(&l.connects),
            connect_failures: g(&l.connect_failures),
            io_errors: g(&l.io_errors),
            redirects: g(&c.redirects),
            slot_map_refreshes: refreshes,
            slot_map_refresh_failures: refresh_failures,
        }
    }

    /// The Redis key of a chunk.
    pub fn redis_key(&self, key: &ChunkKey) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.url.prefix.len() + 64);
        k.extend_from_slice(self.url.prefix.as_bytes());
        k.extend_from_slice(key.to_hex().as_bytes());
        k
    }

    fn err(&self, msg: impl Into<String>) -> Error {
        Error::tier(&self.name, msg)
    }

    // ----- routing -----

    /// A node failed (connect or I/O error): in a cluster, wake the refresher, since a failed
    /// node is often a failover or a topology change in progress.
    fn node_failed(&self) {
        if let Topology::Cluster(cs) = &self.topo {
            cs.wake.notify_one();
        }
    }

    /// The node owning `rkey`.
    async fn route(&self, rkey: &[u8]) -> Result<Arc<Node>> {
        match &self.topo {
            Topology::Single(n) => Ok(n.clone()),
            Topology::Cluster(cs) => {
                let map = cs.slot_map().await?;
                let slot = key_slot(rkey) as usize;
                match map.owner.get(slot).cloned().flatten() {
                    Some(n) => Ok(n),
                    None => {
                        cs.stale.store(true, Ordering::Release);
                        Err(self.err(format!("cluster slot {slot} has no master")))
                    }
                }
            }
        }
    }

    fn redirect_node(&self, addr: &str) -> Result<Arc<Node>> {
        match &self.topo {
            Topology::Cluster(cs) => Ok(cs.node(addr)),
            Topology::Single(_) => Err(self.err(format!(
                "server redirected to {addr}: it is a cluster node; use redis+cluster://"
            ))),
        }
    }

    fn mark_stale(&self) {
        if let Topology::Cluster(cs) = &self.topo {
            cs.stale.store(true, Ordering::Release);
        }
    }

    // ----- request execution -----

    /// Runs `op` for `rkey` on its node, following redirects.
    async fn exec(&self, rkey: &[u8], op: &Op<'_>) -> Result<Out> {
        let mut target: Option<(Arc<Node>, bool)> = None;
        for _ in 0..=MAX_REDIRECTS {
            let (node, asking) = match target.take() {
                Some(t) => t,
                None => (self.route(rkey).await?, false),
            };
            match self.exec_node(&node, asking, rkey, op).await? {
                Step::Done(out) => return Ok(out),
                Step::ServerError(e) => {
                    if e.starts_with("CLUSTERDOWN") || e.starts_with("TRYAGAIN") {
                        self.mark_stale();
                    }
                    return Err(node.error(e));
                }
                Step::Redirect(r) => {
                    bump(&self.counters.redirects, 1);
                    target = Some(match r {
                        Redirect::Moved(_, addr) => {
                            self.mark_stale();
                            (self.redirect_node(&addr)?, false)
                        }
                        Redirect::Ask(_, addr) => (self.redirect_node(&addr)?, true),
                    });
                }
            }
        }
        Err(self.err(format!("more than {MAX_REDIRECTS} cluster redirects")))
    }

    /// Runs `op` on a connection of `node`. A pooled connection that fails with an I/O error
    /// (stale after a server restart) is retried once on a fresh connection.
    async fn exec_node(
        &self,
        node: &Node,
        asking: bool,
        rkey: &[u8],
        op: &Op<'_>,
    ) -> Result<Step<Out>> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut lease = node.acquire().await.inspect_err(|_| self.node_failed())?;
            let reused = lease.reused;
            match self.exec_conn(lease.conn(), asking, rkey, op).await {
                Ok(step) => {
                    lease.done();
                    return Ok(step);
                }
                Err(e) => {
                    drop(lease);
                    node.io_failed(&e);
                    if !(reused && attempt == 1 && e.kind() != io::ErrorKind::InvalidData) {
                        self.node_failed();
                        return Err(node.error(e));
                    }
                }
            }
        }
    }

    async fn exec_conn(
        &self,
        conn: &mut Conn,
        asking: bool,
        rkey: &[u8],
        op: &Op<'_>,
    ) -> io::Result<Step<Out>> {
        if asking {
            if let Reply::Error(e) = conn.command(&[b"ASKING"]).await? {
                return Ok(Step::ServerError(e));
            }
        }
        match op {
            Op::Get { key, bufs } => self.get_on(conn, rkey, *key, *bufs).await,
            Op::Put { chunk, header } => self.put_on(conn, rkey, chunk, header).await,
            Op::Del | Op::Exists => {
                let cmd: &[u8] = if matches!(op, Op::Del) {
                    b"DEL"
                } else {
                    b"EXISTS"
                };
                Ok(match conn.command(&[cmd, rkey]).await? {
                    Reply::Int(n) => Step::Done(Out::Int(n)),
                    Reply::Error(e) => error_step(e),
                    other => return Err(protocol(format!("unexpected reply {other:?}"))),
                })
            }
        }
    }

    async fn put_on(
        &self,
        conn: &mut Conn,
        rkey: &[u8],
        chunk: &Chunk,
        header: &[u8],
    ) -> io::Result<Step<Out>> {
        let payload = chunk.payload();
        let ttl = self.url.ttl.map(|t| t.as_secs().to_string());
        let mut prefix = Vec::with_capacity(64 + rkey.len() + header.len());
        prefix.extend_from_slice(if ttl.is_some() { b"*5\r\n" } else { b"*3\r\n" });
        encode_bulk_header(&mut prefix, 3);
        prefix.extend_from_slice(b"SET\r\n");
        encode_bulk_header(&mut prefix, rkey.len());
        prefix.extend_from_slice(rkey);
        prefix.extend_from_slice(b"\r\n");
        encode_bulk_header(&mut prefix, header.len() + payload.len());
        prefix.extend_from_slice(header);
        let mut tail = b"\r\n".to_vec();
        if let Some(t) = &ttl {
            tail.extend_from_slice(b"$2\r\nEX\r\n");
            encode_bulk_header(&mut tail, t.len());
            tail.extend_from_slice(t.as_bytes());
            tail.extend_from_slice(b"\r\n");
        }
        conn.write_parts(&[&prefix, payload, &tail]).await?;
        Ok(match conn.read_reply().await? {
            Reply::Status(_) => Step::Done(Out::Stored),
            Reply::Error(e) => error_step(e),
            other => return Err(protocol(format!("unexpected SET reply {other:?}"))),
        })
    }

    async fn get_on(
        &self,
        conn: &mut Conn,
        rkey: &[u8],
        key: ChunkKey,
        bufs: &dyn BufferSource,
    ) -> io::Result<Step<Out>> {
        let mut cmd = Vec::with_capacity(32 + rkey.len());
        encode_command(&mut cmd, &[b"GET", rkey]);
        conn.write_all(&cmd).await?;
        let line = conn.read_line().await?;
        let n = match line.split_first() {
            Some((b'$', digits)) => crate::transport::resp::parse_int(digits)?,
            Some((b'-', e)) => return Ok(error_step(String::from_utf8_lossy(e).into_owned())),
            Some((b'_', _)) => -1,
            _ => return Err(protocol("unexpected GET reply")),
        };
        if n < 0 {
            return Ok(Step::Done(Out::Miss));
        }
        let rec = read_record(conn, n as usize, key, bufs, Terminator::Crlf).await?;
        Ok(Step::Done(Out::Record(rec)))
    }

    /// Pipelined `EXISTS` of `keys` on one node (one round trip); `None` for keys that
    /// need a redirect.
    async fn exists_on(&self, node: &Node, rkeys: &[&[u8]]) -> Result<Vec<Option<bool>>> {
        let cmds: Vec<Vec<&[u8]>> = rkeys.iter().map(|k| vec![&b"EXISTS"[..], k]).collect();
        let mut attempt = 0;
        let replies = loop {
            attempt += 1;
            let mut lease = node.acquire().await.inspect_err(|_| self.node_failed())?;
            let reused = lease.reused;
            match lease.conn().pipeline(&cmds).await {
                Ok(r) => {
                    lease.done();
                    break r;
                }
                Err(e) => {
                    drop(lease);
                    node.io_failed(&e);
                    if !(reused && attempt == 1 && e.kind() != io::ErrorKind::InvalidData) {
                        self.node_failed();
                        return Err(node.error(e));
                    }
                }
            }
        };
        replies
            .into_iter()
            .map(|r| match r {
                Reply::Int(n) => Ok(Some(n > 0)),
                Reply::Error(e) if parse_redirect(&e, "").is_some() => Ok(None),
                Reply::Error(e) => Err(node.error(e)),
                other => Err(node.error(format_args!("unexpected EXISTS reply {other:?}"))),
            })
            .collect()
    }

    async fn prefix_len(&self, keys: &[ChunkKey]) -> Result<usize> {
        if keys.is_empty() {
            return Ok(0);
        }
        let rkeys: Vec<Vec<u8>> = keys.iter().map(|k| self.redis_key(k)).collect();
        // Group by node (one group when standalone), keeping each key's index.
        let mut groups: Vec<(Arc<Node>, Vec<usize>)> = Vec::new();
        for (i, rk) in rkeys.iter().enumerate() {
            let node = self.route(rk).await?;
            match groups.iter_mut().find(|(n, _)| Arc::ptr_eq(n, &node)) {
                Some((_, idx)) => idx.push(i),
                None => groups.push((node, vec![i])),
            }
        }
        let answers = futures::future::join_all(groups.iter().map(|(node, idx)| {
            let ks: Vec<&[u8]> = idx.iter().map(|&i| rkeys[i].as_slice()).collect();
            async move { self.exists_on(node, &ks).await }
        }))
        .await;
        let mut present = vec![Some(false); keys.len()];
        for ((_, idx), ans) in groups.iter().zip(answers) {
            for (&i, a) in idx.iter().zip(ans?) {
                present[i] = a;
            }
        }
        let mut n = 0;
        for (i, p) in present.iter().enumerate() {
            let here = match p {
                Some(b) => *b,
                // Redirected (slot moving): ask the right node for this key alone.
                None => matches!(self.exec(&rkeys[i], &Op::Exists).await?, Out::Int(1..)),
            };
            if !here {
                break;
            }
            n += 1;
        }
        Ok(n)
    }

    async fn get_chunk(&self, key: ChunkKey, bufs: &dyn BufferSource) -> Result<Option<Chunk>> {
        let rkey = self.redis_key(&key);
        bump(&self.counters.gets, 1);
        match self.exec(&rkey, &Op::Get { key, bufs }).await? {
            Out::Record(RecordRead::Chunk(c)) => {
                bump(&self.counters.hits, 1);
                bump(&self.counters.get_bytes, c.buf.len() as u64);
                Ok(Some(c))
            }
            Out::Record(RecordRead::Corrupt(why)) => {
                bump(&self.counters.checksum_failures, 1);
                tracing::warn!(tier = %self.name, key = %key, reason = %why, "invalid value in redis: treated as a miss and deleted");
                if let Err(e) = self.exec(&rkey, &Op::Del).await {
                    tracing::debug!(tier = %self.name, key = %key, error = %e, "could not delete the invalid value");
                }
                Ok(None)
            }
            Out::Record(RecordRead::NoBuffer) => {
                bump(&self.counters.alloc_failures, 1);
                Ok(None)
            }
            _ => {
                bump(&self.counters.misses, 1);
                Ok(None)
            }
        }
    }

    async fn put_chunk(&self, chunk: Chunk) -> Result<PutOutcome> {
        let key = chunk.info.key;
        if self.inflight.lock().insert(key, ()).is_some() {
            bump(&self.counters.puts_deduped, 1);
            return Ok(PutOutcome::AlreadyPresent);
        }
        let _inflight = Inflight(&self.inflight, key);
        let header = encode_header(&chunk.info)?;
        let rkey = self.redis_key(&key);
        self.exec(
            &rkey,
            &Op::Put {
                chunk: &chunk,
                header: &header,
            },
        )
        .await?;
        bump(&self.counters.puts, 1);
        bump(&self.counters.put_bytes, chunk.buf.len() as u64);
        Ok(PutOutcome::Stored)
    }

    async fn remove_key(&self, key: ChunkKey) -> Result<bool> {
        let rkey = self.redis_key(&key);
        Ok(matches!(self.exec(&rkey, &Op::Del).await?, Out::Int(1..)))
    }

    /// Every master: the standalone node, or the cluster's slot owners.
    async fn masters(&self) -> Result<Vec<Arc<Node>>> {
        match &self.topo {
            Topology::Single(n) => Ok(vec![n.clone()]),
            Topology::Cluster(cs) => {
                cs.stale.store(true, Ordering::Release);
                let map = cs.slot_map().await?;
                let mut out: Vec<Arc<Node>> = Vec::new();
                for n in map.owner.iter().flatten() {
                    if !out.iter().any(|o| Arc::ptr_eq(o, n)) {
                        out.push(n.clone());
                    }
                }
                Ok(out)
            }
        }
    }

    /// Deletes this tier's keys (those under its prefix) on every master; with `salt`, only
    /// those whose record header names that tenant salt. Returns how many.
    async fn sweep(&self, salt: Option<&str>) -> Result<u64> {
        let mut pattern = Vec::with_capacity(self.url.prefix.len() + 1);
        for b in self.url.prefix.bytes() {
            if matches!(b, b'*' | b'?' | b'[' | b']' | b'\\') {
                pattern.push(b'\\');
            }
            pattern.push(b);
        }
        pattern.push(b'*');
        let started = Instant::now();
        let mut removed = 0u64;
        for node in self.masters().await? {
            let mut lease = node.acquire().await?;
            let mut cursor = b"0".to_vec();
            loop {
                let r = lease
                    .conn()
                    .command(&[b"SCAN", &cursor, b"MATCH", &pattern, b"COUNT", SCAN_COUNT])
                    .await;
                let reply = match r {
                    Ok(r) => r,
                    Err(e) => {
                        node.io_failed(&e);
                        return Err(node.error(e));
                    }
                };
                let (next, keys) = match reply {
                    Reply::Array(mut v) if v.len() == 2 => match (v.pop(), v.pop()) {
                        (Some(Reply::Array(keys)), Some(Reply::Bulk(c))) => (c, keys),
                        _ => return Err(node.error("malformed SCAN reply")),
                    },
                    Reply::Error(e) => return Err(node.error(e)),
                    _ => return Err(node.error("malformed SCAN reply")),
                };
                let keys: Vec<Vec<u8>> = keys
                    .into_iter()
                    .filter_map(|k| match k {
                        Reply::Bulk(b) => Some(b),
                        _ => None,
                    })
                    .collect();
                let doomed: Vec<&[u8]> = match salt {
                    None => keys.iter().map(Vec::as_slice).collect(),
                    Some(salt) => {
                        let end = (MAX_HEADER_LEN - 1).to_string();
                        let cmds: Vec<Vec<&[u8]>> = keys
                            .iter()
                            .map(|k| vec![&b"GETRANGE"[..], k, b"0", end.as_bytes()])
                            .collect();
                        let heads = lease.conn().pipeline(&cmds).await.map_err(|e| {
                            node.io_failed(&e);
                            node.error(e)
                        })?;
                        keys.iter()
                            .zip(heads)
                            .filter(|(_, h)| match h {
                                Reply::Bulk(b) => decode_header(b).is_ok_and(|(info, _)| {
                                    info.origin.cache_salt.as_deref() == Some(salt)
                                }),
                                _ => false,
                            })
                            .map(|(k, _)| k.as_slice())
                            .collect()
                    }
                };
                if !doomed.is_empty() {
                    let cmds: Vec<Vec<&[u8]>> =
                        doomed.iter().map(|k| vec![&b"UNLINK"[..], k]).collect();
                    let replies = lease.conn().pipeline(&cmds).await.map_err(|e| {
                        node.io_failed(&e);
                        node.error(e)
                    })?;
                    removed += replies
                        .iter()
                        .filter(|r| matches!(r, Reply::Int(1..)))
                        .count() as u64;
                }
                if next == b"0" {
                    break;
                }
                cursor = next;
            }
            lease.done();
        }
        tracing::info!(tier = %self.name, removed, salt = salt.is_some(), elapsed_ms = started.elapsed().as_millis() as u64, "redis keys removed");
        Ok(removed)
    }
}

impl Tier for RedisTier {
    fn name(&self) -> &str {
        &self.name
    }

    fn counters(&self) -> super::TierCounters {
        super::TierCounters {
            evictions: 0,
            checksum_failures: self.stats().checksum_failures,
        }
    }

    fn details(&self) -> serde_json::Value {
        serde_json::to_value(self.stats()).unwrap_or_default()
    }

    fn verifies_reads(&self) -> bool {
        true
    }

    fn contains_prefix<'a>(&'a self, keys: &'a [ChunkKey]) -> TierFuture<'a, usize> {
        Box::pin(self.prefix_len(keys))
    }

    fn get<'a>(
        &'a self,
        key: ChunkKey,
        bufs: &'a dyn BufferSource,
    ) -> TierFuture<'a, Option<Chunk>> {
        Box::pin(self.get_chunk(key, bufs))
    }

    fn put(&self, chunk: Chunk) -> TierFuture<'_, PutOutcome> {
        Box::pin(self.put_chunk(chunk))
    }

    fn remove(&self, key: ChunkKey) -> TierFuture<'_, bool> {
        Box::pin(self.remove_key(key))
    }

    fn clear(&self) -> TierFuture<'_, u64> {
        Box::pin(self.sweep(None))
    }

    fn remove_salt<'a>(&'a self, salt: &'a str) -> TierFuture<'a, u64> {
        Box::pin(self.sweep(Some(salt)))
    }

    fn usage(&self) -> TierUsage {
        // A shared store: what other nodes wrote (and evicted) is unknown here. Report what
        // this process wrote; capacity is the server's business (maxmemory).
        TierUsage {
            used_bytes: self.counters.put_bytes.load(Ordering::Relaxed),
            capacity_bytes: 0,
            chunks: self.counters.puts.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_keys() {
        let t =
            RedisTier::from_url("redis://127.0.0.1:1?prefix=p:&connect_timeout_ms=10", 0).unwrap();
        assert_eq!(t.name(), "redis");
        assert_eq!(t.redis_key(&ChunkKey([0xab; 32])), {
            let mut v = b"p:".to_vec();
            v.extend(std::iter::repeat_n(b"ab"[..].iter().copied(), 32).flatten());
            v
        });
        let t2 = RedisTier::from_url("redis://127.0.0.1:1", 1).unwrap();
        assert_eq!(t2.name(), "redis2");
        let t3 = RedisTier::from_url("redis+cluster://127.0.0.1:1?name=shared", 2).unwrap();
        assert_eq!(t3.name(), "shared");
        let dbg = format!(
            "{:?}",
            RedisTier::from_url("redis://u:sekrit@127.0.0.1:1", 0).unwrap()
        );
        assert!(dbg.contains("u:***@") && !dbg.contains("sekrit"), "{dbg}");
    }

    #[test]
    fn dropping_a_cluster_tier_stops_its_refresher() {
        let t = RedisTier::from_url(
            "redis+cluster://127.0.0.1:1?slot_refresh_sec=1&connect_timeout_ms=10",
            0,
        )
        .unwrap();
        let Topology::Cluster(cs) = &t.topo else {
            panic!("cluster expected")
        };
        let weak = Arc::downgrade(cs);
        let handle = t.refresher.clone().expect("refresher started");
        // The startup refresh runs (and fails: nothing listens on port 1).
        let t0 = Instant::now();
        while t.stats().slot_map_refresh_failures == 0 {
            assert!(t0.elapsed() < Duration::from_secs(5), "no startup refresh");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!handle.is_finished());
        drop(t);
        let t0 = Instant::now();
        while !(handle.is_finished() && weak.upgrade().is_none()) {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "refresher outlived the tier"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
