//! The Redis/Valkey tier: a store shared by every node pointing at the same server or cluster.
//!
//! * Values are exactly the record encoding ([`crate::chunk::record`]): header then payload,
//!   under the key `<prefix><64 hex chars of the chunk key>`, optionally with a TTL.
//! * `put` writes the RESP prefix and record header, then the payload straight from the
//!   chunk's buffer (vectored write), one value per round trip.
//! * `get` reads the bulk reply's record header, allocates the payload buffer from the L1
//!   pool and reads the payload straight into it, then verifies the checksum (a mismatch is a
//!   miss: the key is deleted and counted in [`RemoteStats::checksum_failures`]).
//! * `contains_prefix` is one pipelined batch of `EXISTS` per node (one round trip; in a
//!   cluster, one per involved node, in parallel).
//! * Cluster mode (`cluster.rs`) discovers slots with `CLUSTER SLOTS`, routes by CRC16 key
//!   slot, follows `MOVED` (and refreshes the map) and `ASK` (with `ASKING`), and reloads the
//!   slot map in the background.
//! * TLS (`rediss://`): rustls, configured by the `remote_tls_*` keys ([`tls`]).
//! * Faults: connects are bounded by a timeout and retried with backoff; every other wait is
//!   bounded by the manager's deadlines; cancelled requests discard their connection. The
//!   per-node pool and its link handling are shared with the kvtier server tier
//!   (`transport::link`); opening a Redis connection is in `pool`.
//!
//! The tier is a [`RemoteTier`] over a [`RedisStore`]: counters, stats and the get/put
//! bookkeeping are the remote-tier scaffold's ([`crate::tier::remote`]). URL syntax and
//! options: [`url`].

pub(crate) mod cluster;
pub(crate) mod pool;
pub(crate) mod slots;
pub mod tls;
pub mod url;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use self::cluster::Topology;
use self::pool::{Node, Shared};
use self::slots::{parse_redirect, Redirect};
use self::tls::TlsSettings;
use self::url::{Mode, RedisUrl};
use super::remote::{default_name, RemoteStats, RemoteStore, RemoteTier};
use super::PutOutcome;
use crate::chunk::record::{decode_header, encode_header, MAX_HEADER_LEN};
use crate::chunk::Chunk;
use crate::error::{Error, Result};
use crate::keys::ChunkKey;
use crate::memory::BufferSource;
use crate::transport::link::{Exchange, LinkCounters, LinkSettings};
use crate::transport::record::{read_record, RecordRead, Terminator};
use crate::transport::resp::{encode_bulk_header, encode_command, Conn, Reply};

/// Most redirects followed for one request.
const MAX_REDIRECTS: usize = 5;
/// Keys per `SCAN` page and per delete batch.
const SCAN_COUNT: &[u8] = b"1000";

/// A Redis/Valkey tier (standalone or cluster).
pub type RedisTier = RemoteTier<RedisStore>;

/// Snapshot of a Redis tier's counters: the remote-tier ones, then Redis Cluster's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RedisTierStats {
    /// The counters every remote tier keeps (`stats.hits` reads through to them).
    #[serde(flatten)]
    pub remote: RemoteStats,
    /// `MOVED`/`ASK` redirects followed.
    pub redirects: u64,
    /// Cluster slot maps loaded (at start, periodically, after redirects and node failures).
    pub slot_map_refreshes: u64,
    /// Slot-map reloads where no known node answered (the previous map was kept).
    pub slot_map_refresh_failures: u64,
}

impl std::ops::Deref for RedisTierStats {
    type Target = RemoteStats;
    fn deref(&self) -> &RemoteStats {
        &self.remote
    }
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

/// The Redis side of a [`RedisTier`]: routing, commands and the cluster's topology.
pub struct RedisStore {
    url: RedisUrl,
    shared: Arc<Shared>,
    topo: Topology,
    redirects: AtomicU64,
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
        let name = url
            .name
            .clone()
            .unwrap_or_else(|| default_name("redis", index));
        let shared = Arc::new(Shared {
            link: LinkSettings::new("redis", &name, url.pool, url.connect_timeout, url.retry_max),
            credentials: url.credentials.clone(),
            db: url.db,
            tls: if url.tls {
                Some(tls::client_config(tls)?)
            } else {
                None
            },
        });
        let topo = match url.mode {
            Mode::Standalone => {
                let addr =
                    url.hosts.first().cloned().ok_or_else(|| {
                        Error::config("remote_url", format!("`{url}` names no host"))
                    })?;
                Topology::single(addr, shared.clone())
            }
            Mode::Cluster => {
                Topology::cluster(&name, shared.clone(), url.hosts.clone(), url.slot_refresh)
            }
        };
        tracing::info!(tier = %name, url = %url, tls = url.tls, "redis tier configured");
        Ok(RemoteTier::with_store(
            name,
            url.to_string(),
            RedisStore {
                url,
                shared,
                topo,
                redirects: AtomicU64::new(0),
            },
        ))
    }

    /// The URL, credentials redacted.
    pub fn url(&self) -> &RedisUrl {
        &self.store().url
    }

    /// The Redis key of a chunk.
    pub fn redis_key(&self, key: &ChunkKey) -> Vec<u8> {
        self.store().redis_key(key)
    }
}

/// `op` for `rkey` on one connection of a node (after `ASKING` when `asking`).
struct OnNode<'a> {
    store: &'a RedisStore,
    asking: bool,
    rkey: &'a [u8],
    op: &'a Op<'a>,
}

impl Exchange<Conn> for OnNode<'_> {
    type Out = Step<Out>;

    fn run<'a>(
        &'a self,
        conn: &'a mut Conn,
    ) -> impl std::future::Future<Output = io::Result<Step<Out>>> + Send + 'a {
        self.store.exec_conn(conn, self.asking, self.rkey, self.op)
    }
}

/// Deleting a tier's chunks on one node ([`RedisStore::sweep_keys`]); idempotent, so a
/// stale pooled connection can be replaced and the sweep run again.
struct Sweep<'a> {
    store: &'a RedisStore,
    pattern: &'a [u8],
    salt: Option<&'a str>,
}

impl Exchange<Conn> for Sweep<'_> {
    type Out = std::result::Result<u64, String>;

    fn run<'a>(
        &'a self,
        conn: &'a mut Conn,
    ) -> impl std::future::Future<Output = io::Result<Self::Out>> + Send + 'a {
        self.store.sweep_on(conn, self.pattern, self.salt)
    }
}

/// Pipelined commands on one connection.
struct Pipeline<'a>(&'a [Vec<&'a [u8]>]);

impl Exchange<Conn> for Pipeline<'_> {
    type Out = Vec<Reply>;

    fn run<'a>(
        &'a self,
        conn: &'a mut Conn,
    ) -> impl std::future::Future<Output = io::Result<Vec<Reply>>> + Send + 'a {
        conn.pipeline(self.0)
    }
}

impl RedisStore {
    /// The Redis key of a chunk.
    fn redis_key(&self, key: &ChunkKey) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.url.prefix.len() + 64);
        k.extend_from_slice(self.url.prefix.as_bytes());
        k.extend_from_slice(key.to_hex().as_bytes());
        k
    }

    /// The tier's name.
    fn name(&self) -> &str {
        &self.shared.link.tier
    }

    fn err(&self, msg: impl Into<String>) -> Error {
        Error::tier(self.name(), msg)
    }

    // ----- request execution -----

    /// Runs `op` for `rkey` on its node, following redirects.
    async fn exec(&self, rkey: &[u8], op: &Op<'_>) -> Result<Out> {
        let mut target: Option<(Arc<Node>, bool)> = None;
        for _ in 0..=MAX_REDIRECTS {
            let (node, asking) = match target.take() {
                Some(t) => t,
                None => (self.topo.route(rkey).await?, false),
            };
            let req = OnNode {
                store: self,
                asking,
                rkey,
                op,
            };
            let step = node
                .exec(&req)
                .await
                .inspect_err(|_| self.topo.node_failed())?;
            match step {
                Step::Done(out) => return Ok(out),
                Step::ServerError(e) => {
                    if e.starts_with("CLUSTERDOWN") || e.starts_with("TRYAGAIN") {
                        self.topo.mark_stale();
                    }
                    return Err(node.error(e));
                }
                Step::Redirect(r) => {
                    self.redirects.fetch_add(1, Ordering::Relaxed);
                    target = Some(match r {
                        Redirect::Moved(_, addr) => {
                            self.topo.mark_stale();
                            (self.topo.redirect_node(self.name(), &addr)?, false)
                        }
                        Redirect::Ask(_, addr) => {
                            (self.topo.redirect_node(self.name(), &addr)?, true)
                        }
                    });
                }
            }
        }
        Err(self.err(format!("more than {MAX_REDIRECTS} cluster redirects")))
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
        let replies = node
            .exec(&Pipeline(&cmds))
            .await
            .inspect_err(|_| self.topo.node_failed())?;
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

    /// Deletes this tier's chunks on every master; with `salt`, only that tenant's.
    /// Returns how many.
    ///
    /// Only kvtier's own keys are ever touched, even in a database other applications use:
    /// the `SCAN` pattern is the prefix (glob characters escaped) followed by exactly 64
    /// lower-case hex digits, and a key is deleted only if its value starts with a valid
    /// record header naming that same chunk key (and, with `salt`, that tenant).
    async fn sweep_keys(&self, salt: Option<&str>) -> Result<u64> {
        let pattern = chunk_key_pattern(&self.url.prefix);
        let started = Instant::now();
        let mut removed = 0u64;
        for node in self.topo.masters().await? {
            let req = Sweep {
                store: self,
                pattern: &pattern,
                salt,
            };
            removed += node.exec(&req).await?.map_err(|e| node.error(e))?;
        }
        tracing::info!(tier = %self.name(), removed, salt = salt.is_some(), elapsed_ms = started.elapsed().as_millis() as u64, "redis keys removed");
        Ok(removed)
    }

    /// [`RedisStore::sweep_keys`] on one node: how many keys it deleted, or the server's
    /// error.
    async fn sweep_on(
        &self,
        conn: &mut Conn,
        pattern: &[u8],
        salt: Option<&str>,
    ) -> io::Result<std::result::Result<u64, String>> {
        let end = (MAX_HEADER_LEN - 1).to_string();
        let mut removed = 0u64;
        let mut cursor = b"0".to_vec();
        loop {
            let scan = [
                &b"SCAN"[..],
                &cursor,
                b"MATCH",
                pattern,
                b"COUNT",
                SCAN_COUNT,
            ];
            let (next, keys) = match conn.command(&scan).await? {
                Reply::Array(mut v) if v.len() == 2 => match (v.pop(), v.pop()) {
                    (Some(Reply::Array(keys)), Some(Reply::Bulk(c))) => (c, keys),
                    _ => return Err(protocol("malformed SCAN reply")),
                },
                Reply::Error(e) => return Ok(Err(e)),
                _ => return Err(protocol("malformed SCAN reply")),
            };
            let keys: Vec<Vec<u8>> = keys
                .into_iter()
                .filter_map(|k| match k {
                    Reply::Bulk(b) => Some(b),
                    _ => None,
                })
                .collect();
            if !keys.is_empty() {
                let cmds: Vec<Vec<&[u8]>> = keys
                    .iter()
                    .map(|k| vec![&b"GETRANGE"[..], k, b"0", end.as_bytes()])
                    .collect();
                let heads = conn.pipeline(&cmds).await?;
                let doomed: Vec<Vec<&[u8]>> = keys
                    .iter()
                    .zip(heads)
                    .filter(|(k, h)| match h {
                        Reply::Bulk(b) => self.is_own_record(k, b, salt),
                        _ => false,
                    })
                    .map(|(k, _)| vec![&b"UNLINK"[..], k.as_slice()])
                    .collect();
                if !doomed.is_empty() {
                    let replies = conn.pipeline(&doomed).await?;
                    removed += replies
                        .iter()
                        .filter(|r| matches!(r, Reply::Int(1..)))
                        .count() as u64;
                }
            }
            if next == b"0" {
                return Ok(Ok(removed));
            }
            cursor = next;
        }
    }

    /// Whether `rkey`, whose value starts with `head`, is a chunk this tier wrote (its name
    /// is the prefix and the hex of the chunk key its record header names) and, with `salt`,
    /// belongs to that tenant.
    fn is_own_record(&self, rkey: &[u8], head: &[u8], salt: Option<&str>) -> bool {
        let Some(hex) = rkey.strip_prefix(self.url.prefix.as_bytes()) else {
            return false;
        };
        decode_header(head).is_ok_and(|(info, _)| {
            info.key.to_hex().as_bytes() == hex
                && salt.is_none_or(|s| info.origin.cache_salt.as_deref() == Some(s))
        })
    }
}

/// The `SCAN MATCH` pattern of the chunk keys under `prefix`: the prefix with Redis glob
/// characters escaped, then 64 lower-case hex digits (so another application's key that
/// merely starts with the prefix never matches).
fn chunk_key_pattern(prefix: &str) -> Vec<u8> {
    let mut pattern = Vec::with_capacity(prefix.len() * 2 + 64 * 5);
    for b in prefix.bytes() {
        if matches!(b, b'*' | b'?' | b'[' | b']' | b'\\') {
            pattern.push(b'\\');
        }
        pattern.push(b);
    }
    for _ in 0..64 {
        pattern.extend_from_slice(b"[0-9a-f]");
    }
    pattern
}

impl RemoteStore for RedisStore {
    type Stats = RedisTierStats;

    async fn prefix_len(&self, keys: &[ChunkKey]) -> Result<usize> {
        let rkeys: Vec<Vec<u8>> = keys.iter().map(|k| self.redis_key(k)).collect();
        // Group by node (one group when standalone), keeping each key's index.
        let mut groups: Vec<(Arc<Node>, Vec<usize>)> = Vec::new();
        for (i, rk) in rkeys.iter().enumerate() {
            let node = self.topo.route(rk).await?;
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

    async fn fetch(&self, key: ChunkKey, bufs: &dyn BufferSource) -> Result<Option<RecordRead>> {
        let rkey = self.redis_key(&key);
        Ok(match self.exec(&rkey, &Op::Get { key, bufs }).await? {
            Out::Record(r) => Some(r),
            _ => None,
        })
    }

    async fn discard(&self, key: ChunkKey, why: &str) {
        tracing::warn!(tier = %self.name(), key = %key, reason = %why, "invalid value in redis: treated as a miss and deleted");
        if let Err(e) = self.exec(&self.redis_key(&key), &Op::Del).await {
            tracing::debug!(tier = %self.name(), key = %key, error = %e, "could not delete the invalid value");
        }
    }

    async fn store(&self, chunk: &Chunk) -> Result<PutOutcome> {
        let header = encode_header(&chunk.info)?;
        let rkey = self.redis_key(&chunk.info.key);
        self.exec(
            &rkey,
            &Op::Put {
                chunk,
                header: &header,
            },
        )
        .await?;
        Ok(PutOutcome::Stored)
    }

    async fn remove(&self, key: ChunkKey) -> Result<bool> {
        let rkey = self.redis_key(&key);
        Ok(matches!(self.exec(&rkey, &Op::Del).await?, Out::Int(1..)))
    }

    async fn sweep(&self, salt: Option<&str>) -> Result<u64> {
        self.sweep_keys(salt).await
    }

    fn retention(&self) -> Option<std::time::Duration> {
        self.url.ttl
    }

    fn links(&self) -> Option<&LinkCounters> {
        Some(&self.shared.link.counters)
    }

    fn stats(&self, remote: RemoteStats) -> RedisTierStats {
        let (slot_map_refreshes, slot_map_refresh_failures) = self.topo.refresh_counts();
        RedisTierStats {
            remote,
            redirects: self.redirects.load(Ordering::Relaxed),
            slot_map_refreshes,
            slot_map_refresh_failures,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::tier::Tier;

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
    fn a_refused_connect_keeps_its_cause() {
        // A port nothing listens on.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let t = RedisTier::from_url(&format!("redis://127.0.0.1:{port}"), 0).unwrap();
        // Calls in a reconnect backoff (after the background warm-up failed) fail without
        // trying; wait for one that tries.
        let t0 = Instant::now();
        let (e, msg) = loop {
            let e =
                futures::executor::block_on(t.contains_prefix(&[ChunkKey([1; 32])])).unwrap_err();
            let msg = e.to_string();
            if !msg.contains("unreachable;") {
                break (e, msg);
            }
            assert!(t0.elapsed() < Duration::from_secs(5), "{msg}");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            msg.starts_with(&format!("tier `redis`: redis 127.0.0.1:{port}: connect: ")),
            "{msg}"
        );
        let cause = std::error::Error::source(&e).expect("the I/O error is kept as the source");
        let io = cause.downcast_ref::<io::Error>().expect("an io::Error");
        assert_eq!(io.kind(), io::ErrorKind::ConnectionRefused);
        assert!(msg.ends_with(&io.to_string()), "{msg}");
    }

    #[test]
    fn dropping_a_cluster_tier_stops_its_refresher() {
        let t = RedisTier::from_url(
            "redis+cluster://127.0.0.1:1?slot_refresh_sec=1&connect_timeout_ms=10",
            0,
        )
        .unwrap();
        let Topology::Cluster(c) = &t.store().topo else {
            panic!("cluster expected")
        };
        let weak = Arc::downgrade(&c.state);
        let handle = c.refresher.clone().expect("refresher started");
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
