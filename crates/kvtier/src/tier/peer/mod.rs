//! The kvtier server tier (`kvtier://host:port`): another node's `kvtier serve` used as a
//! shared store, over TCP with the framed protocol of [`crate::transport::wire`].
//!
//! * A connection opens with `HelloPeer` (no model: chunk keys already include the model
//!   identity and tenant salt through their hash chain), then carries chunk frames.
//! * `contains_prefix` sends every key of the prefix in one `ContainsChunks` frame: one round
//!   trip whatever the prompt length. The server answers over all its tiers.
//! * `get` receives the whole record (header + payload): the header is checked against the
//!   key, the payload is read straight into an L1 pool buffer from [`BufferSource`], then its
//!   checksum is verified here. A mismatch is a miss counted in
//!   [`PeerTierStats::checksum_failures`]; no bytes that fail verification are returned.
//! * `put` writes the frame head, the record header, then the payload straight from the
//!   chunk's buffer (vectored write); the server verifies it and stores it through its normal
//!   store path (its L1, then its own lower tiers). Concurrent puts of a key are deduplicated.
//! * Faults: connects (TCP + handshake) are bounded by `connect_timeout_ms`; after a failed
//!   connect the server is not retried before a backoff (100 ms doubling to `retry_max_ms`)
//!   and requests in that window fail at once, so the manager marks the tier down (C8). Every
//!   other wait is bounded by the manager's deadlines; a request cancelled midway discards
//!   its connection. A pooled connection that turns out dead (server restarted) is replaced
//!   once, transparently. Link state changes are logged once each.
//!
//! URL syntax and options: [`url`].

pub mod url;

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use self::url::PeerUrl;
use super::{PutOutcome, Tier, TierCounters, TierFuture, TierUsage};
use crate::chunk::record::encode_header;
use crate::chunk::Chunk;
use crate::error::{Error, Result};
use crate::keys::{ChunkKey, KeyMap};
use crate::memory::BufferSource;
use crate::transport::link::{ConnectError, Connector, LinkCounters, LinkSettings, Pool};
use crate::transport::record::{read_record, RecordRead, Terminator};
use crate::transport::resp::Conn;
use crate::transport::stream::Stream;
use crate::transport::wire::{self, ErrorCode, PutResult, Request, Response};

/// Room for the frame header and meta of a put next to its record.
const FRAME_OVERHEAD: usize = 1024;

/// Snapshot of a kvtier server tier's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PeerTierStats {
    /// `ContainsChunks` round trips: one per prefix probe, whatever its length.
    pub probes: u64,
    /// `get` calls that reached the server.
    pub gets: u64,
    /// Gets that returned a verified chunk.
    pub hits: u64,
    /// Gets of keys the server does not hold.
    pub misses: u64,
    /// Chunks the server stored.
    pub puts: u64,
    /// Puts skipped because the same key was being written, or the server had it.
    pub puts_deduped: u64,
    /// Puts the server declined (no memory) or that exceed its frame limit.
    pub puts_skipped: u64,
    /// Payload bytes written.
    pub put_bytes: u64,
    /// Payload bytes read.
    pub get_bytes: u64,
    /// Records that failed validation (bad header, wrong key, checksum): treated as misses.
    pub checksum_failures: u64,
    /// Gets dropped because the L1 pool had no room for the payload.
    pub alloc_failures: u64,
    /// Connections opened.
    pub connects: u64,
    /// Failed connects (refused, timed out, handshake refused).
    pub connect_failures: u64,
    /// Handshakes refused for a missing or wrong token.
    pub auth_failures: u64,
    /// I/O errors on established connections.
    pub io_errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    probes: AtomicU64,
    gets: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    puts: AtomicU64,
    puts_deduped: AtomicU64,
    puts_skipped: AtomicU64,
    put_bytes: AtomicU64,
    get_bytes: AtomicU64,
    checksum_failures: AtomicU64,
    alloc_failures: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

fn protocol(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Removes a key from the in-flight set when dropped (also when the put is cancelled).
struct Inflight<'a>(&'a Mutex<KeyMap<()>>, ChunkKey);

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        self.0.lock().remove(&self.1);
    }
}

/// Opens connections to the server (TCP, then `HelloPeer`).
#[derive(Debug)]
struct PeerConnector {
    link: LinkSettings,
    token: Option<String>,
    /// Largest frame body the server accepts (from its last handshake; 0 until known).
    max_frame: AtomicUsize,
}

impl Connector for PeerConnector {
    type Conn = Conn;

    fn settings(&self) -> &LinkSettings {
        &self.link
    }

    async fn open(self: Arc<Self>, addr: String) -> std::result::Result<Conn, ConnectError> {
        let (conn, max_frame) = open(&addr, self.token.clone()).await?;
        self.max_frame.store(max_frame, Ordering::Relaxed);
        Ok(conn)
    }
}

/// A tier backed by another node's `kvtier serve` (`kvtier://host:port`).
pub struct PeerTier {
    name: String,
    url: PeerUrl,
    connector: Arc<PeerConnector>,
    pool: Arc<Pool<PeerConnector>>,
    inflight: Mutex<KeyMap<()>>,
    counters: Counters,
}

impl std::fmt::Debug for PeerTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTier")
            .field("name", &self.name)
            .field("url", &self.url)
            .finish()
    }
}

impl PeerTier {
    /// Builds the tier for the `index`-th entry of `remote_url` (default names: `peer`,
    /// `peer2`, ...). Does not wait for the server: an unreachable one makes operations
    /// fail (and the manager mark the tier down) rather than the engine fail to start.
    pub fn from_url(url: &str, index: usize) -> Result<Arc<PeerTier>> {
        PeerTier::new(PeerUrl::parse(url)?, index)
    }

    /// Builds the tier from a parsed URL and opens one connection in the background (which
    /// logs whether the server is reachable).
    pub fn new(url: PeerUrl, index: usize) -> Result<Arc<PeerTier>> {
        let name = url.name.clone().unwrap_or_else(|| match index {
            0 => "peer".to_string(),
            i => format!("peer{}", i + 1),
        });
        tracing::info!(tier = %name, url = %url, "kvtier server tier configured");
        let connector = Arc::new(PeerConnector {
            link: LinkSettings {
                kind: "kvtier server",
                tier: name.clone(),
                pool: url.pool,
                connect_timeout: url.connect_timeout,
                retry_max: url.retry_max,
                counters: LinkCounters::default(),
            },
            token: url.token.clone(),
            max_frame: AtomicUsize::new(0),
        });
        let pool = Arc::new(Pool::new(url.addr.clone(), connector.clone()));
        pool.warm_up();
        Ok(Arc::new(PeerTier {
            name,
            url,
            connector,
            pool,
            inflight: Mutex::default(),
            counters: Counters::default(),
        }))
    }

    /// The URL, token redacted.
    pub fn url(&self) -> &PeerUrl {
        &self.url
    }

    /// Counter snapshot.
    pub fn stats(&self) -> PeerTierStats {
        let c = &self.counters;
        let l = &self.connector.link.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PeerTierStats {
            probes: g(&c.probes),
            gets: g(&c.gets),
            hits: g(&c.hits),
            misses: g(&c.misses),
            puts: g(&c.puts),
            puts_deduped: g(&c.puts_deduped),
            puts_skipped: g(&c.puts_skipped),
            put_bytes: g(&c.put_bytes),
            get_bytes: g(&c.get_bytes),
            checksum_failures: g(&c.checksum_failures),
            alloc_failures: g(&c.alloc_failures),
            connects: g(&l.connects),
            connect_failures: g(&l.connect_failures),
            auth_failures: g(&l.auth_failures),
            io_errors: g(&l.io_errors),
        }
    }

    fn err(&self, msg: impl std::fmt::Display) -> Error {
        self.pool.error(msg)
    }

    /// Runs one request on a pooled connection. A pooled connection that fails with an I/O
    /// error (stale after a server restart) is retried once on a fresh connection; every
    /// request here is idempotent.
    async fn exec(&self, op: &Op<'_>) -> Result<Out> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut lease = self.pool.acquire().await?;
            let reused = lease.reused;
            match exec_conn(lease.conn(), op).await {
                Ok(Reply::Done(v)) => {
                    lease.done();
                    return Ok(v);
                }
                Ok(Reply::Refused(code, message)) => {
                    lease.done();
                    return Err(self.err(format_args!("{code:?}: {message}")));
                }
                Err(e) => {
                    drop(lease);
                    self.pool.io_failed(&e);
                    if !(reused && attempt == 1 && e.kind() != io::ErrorKind::InvalidData) {
                        return Err(self.err(e));
                    }
                }
            }
        }
    }

    // ----- operations -----

    async fn prefix_len(&self, keys: &[ChunkKey]) -> Result<usize> {
        if keys.is_empty() {
            return Ok(0);
        }
        // A prefix longer than one frame holds is asked in part: the answer is then at most
        // that part, which is still a correct (shorter) prefix.
        let max = self.frame_limit().saturating_sub(FRAME_OVERHEAD) / 32;
        let keys = &keys[..keys.len().min(max.max(1))];
        let mut blob = Vec::with_capacity(keys.len() * 32);
        for k in keys {
            blob.extend_from_slice(&k.0);
        }
        bump(&self.counters.probes, 1);
        match self.exec(&Op::Contains(&blob)).await? {
            Out::Count(n) => Ok((n as usize).min(keys.len())),
            _ => Err(self.err("mismatched reply")),
        }
    }

    async fn get_chunk(&self, key: ChunkKey, bufs: &dyn BufferSource) -> Result<Option<Chunk>> {
        bump(&self.counters.gets, 1);
        let Out::Get(out) = self.exec(&Op::Get { key, bufs }).await? else {
            return Err(self.err("mismatched reply"));
        };
        match out {
            Some(RecordRead::Chunk(c)) => {
                bump(&self.counters.hits, 1);
                bump(&self.counters.get_bytes, c.buf.len() as u64);
                Ok(Some(c))
            }
            Some(RecordRead::Corrupt(why)) => {
                // Not removed from the server: the server verifies what its own tiers hold,
                // so the likeliest cause is the transfer, and its copy may well be good.
                bump(&self.counters.checksum_failures, 1);
                tracing::warn!(tier = %self.name, key = %key, reason = %why, "invalid chunk from the kvtier server: treated as a miss");
                Ok(None)
            }
            Some(RecordRead::NoBuffer) => {
                bump(&self.counters.alloc_failures, 1);
                Ok(None)
            }
            None => {
                bump(&self.counters.misses, 1);
                Ok(None)
            }
        }
    }

    /// The server's frame limit, or the protocol default before the first handshake.
    fn frame_limit(&self) -> usize {
        match self.connector.max_frame.load(Ordering::Relaxed) {
            0 => wire::DEFAULT_MAX_FRAME,
            n => n,
        }
    }

    async fn put_chunk(&self, chunk: Chunk) -> Result<PutOutcome> {
        let key = chunk.info.key;
        let header = encode_header(&chunk.info)?;
        let payload = chunk.payload();
        if header.len() + payload.len() + FRAME_OVERHEAD > self.frame_limit() {
            bump(&self.counters.puts_skipped, 1);
            return Ok(PutOutcome::Skipped("too_large"));
        }
        if self.inflight.lock().insert(key, ()).is_some() {
            bump(&self.counters.puts_deduped, 1);
            return Ok(PutOutcome::AlreadyPresent);
        }
        let _inflight = Inflight(&self.inflight, key);
        let Out::Put(r) = self
            .exec(&Op::Put {
                header: &header,
                payload,
            })
            .await?
        else {
            return Err(self.err("mismatched reply"));
        };
        Ok(match r {
            PutResult::Stored => {
                bump(&self.counters.puts, 1);
                bump(&self.counters.put_bytes, payload.len() as u64);
                PutOutcome::Stored
            }
            PutResult::AlreadyPresent => {
                bump(&self.counters.puts_deduped, 1);
                PutOutcome::AlreadyPresent
            }
            PutResult::Skipped(why) => {
                bump(&self.counters.puts_skipped, 1);
                tracing::debug!(tier = %self.name, key = %key, reason = %why, "kvtier server skipped a chunk");
                PutOutcome::Skipped(if why == "no_memory" {
                    "peer_no_memory"
                } else {
                    "peer_skipped"
                })
            }
        })
    }

    async fn count_request(&self, req: Request) -> Result<u64> {
        match self.exec(&Op::Count(&req)).await? {
            Out::Count(n) => Ok(n),
            _ => Err(self.err("mismatched reply")),
        }
    }
}

/// A reply that leaves the connection usable: a value, or an error the server sent.
enum Reply<T> {
    Done(T),
    Refused(ErrorCode, String),
}

/// One request.
enum Op<'a> {
    /// `ContainsChunks` with this key blob.
    Contains(&'a [u8]),
    Get {
        key: ChunkKey,
        bufs: &'a dyn BufferSource,
    },
    Put {
        header: &'a [u8],
        payload: &'a [u8],
    },
    /// A request answered by `Count`.
    Count(&'a Request),
}

/// What a request produced.
enum Out {
    Count(u64),
    /// A record, or `None` for a key the server does not hold.
    Get(Option<RecordRead>),
    Put(PutResult),
}

async fn exec_conn(conn: &mut Conn, op: &Op<'_>) -> io::Result<Reply<Out>> {
    let (reply, blob) = match op {
        Op::Get { key, bufs } => {
            return Ok(match get_on(conn, *key, *bufs).await? {
                Reply::Done(g) => Reply::Done(Out::Get(g)),
                Reply::Refused(c, m) => Reply::Refused(c, m),
            })
        }
        Op::Contains(keys) => {
            send(conn, &Request::ContainsChunks, &[keys]).await?;
            recv_head(conn).await?
        }
        Op::Put { header, payload } => {
            send(conn, &Request::PutChunk, &[header, payload]).await?;
            recv_head(conn).await?
        }
        Op::Count(req) => {
            send(conn, req, &[]).await?;
            recv_head(conn).await?
        }
    };
    match (op, reply, blob) {
        (Op::Contains(_), Response::ContainsChunks { chunks }, 0) => {
            Ok(Reply::Done(Out::Count(u64::from(chunks))))
        }
        (Op::Put { .. }, Response::PutChunk(r), 0) => Ok(Reply::Done(Out::Put(r))),
        (Op::Count(_), Response::Count(n), 0) => Ok(Reply::Done(Out::Count(n))),
        (_, other, blob) => refused_or_unexpected(conn, other, blob).await,
    }
}

async fn send(conn: &mut Conn, req: &Request, blobs: &[&[u8]]) -> io::Result<()> {
    let len = blobs.iter().map(|b| b.len()).sum();
    let head = wire::encode_head(req, len).map_err(|e| protocol(e.to_string()))?;
    let mut parts: Vec<&[u8]> = Vec::with_capacity(1 + blobs.len());
    parts.push(&head);
    parts.extend_from_slice(blobs);
    conn.write_parts(&parts).await
}

/// Reads a reply's header and meta; returns the message and the blob length still unread.
async fn recv_head(conn: &mut Conn) -> io::Result<(Response, usize)> {
    let mut len = [0u8; 4];
    conn.read_exact_into(&mut len).await?;
    let body = wire::body_len(len, wire::DEFAULT_MAX_FRAME).map_err(|e| protocol(e.to_string()))?;
    let mut hdr = [0u8; 5];
    conn.read_exact_into(&mut hdr).await?;
    let meta_len = u32::from_le_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]) as usize;
    if meta_len > wire::MAX_META || 5 + meta_len > body {
        return Err(protocol("reply meta does not fit its frame"));
    }
    let mut buf = vec![0u8; 5 + meta_len];
    buf[..5].copy_from_slice(&hdr);
    conn.read_exact_into(&mut buf[5..]).await?;
    let (msg, _) = wire::decode::<Response>(&buf).map_err(|e| protocol(e.to_string()))?;
    Ok((msg, body - 5 - meta_len))
}

/// An error reply (connection still usable once its blob is skipped), or a protocol error.
async fn refused_or_unexpected<T>(
    conn: &mut Conn,
    got: Response,
    blob: usize,
) -> io::Result<Reply<T>> {
    conn.skip(blob).await?;
    match got {
        Response::Error { code, message } => Ok(Reply::Refused(code, message)),
        other => Err(protocol(format!("unexpected reply {other:?}"))),
    }
}

/// Connects and says HelloPeer; returns the connection and the server's frame limit.
async fn open(
    addr: &str,
    token: Option<String>,
) -> std::result::Result<(Conn, usize), ConnectError> {
    let other = |what: &str, e: &dyn std::fmt::Display| ConnectError::Other(format!("{what}: {e}"));
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| other("connect", &e))?;
    let stream = Stream::tcp(stream).map_err(|e| other("socket setup", &e))?;
    let mut conn = Conn::new(stream);
    let hello = Request::HelloPeer {
        magic: wire::MAGIC,
        version: wire::PROTOCOL_VERSION,
        client_name: format!("peer-tier-pid-{}", std::process::id()),
        auth_token: token,
    };
    send(&mut conn, &hello, &[])
        .await
        .map_err(|e| other("handshake", &e))?;
    let (reply, blob) = recv_head(&mut conn)
        .await
        .map_err(|e| other("handshake", &e))?;
    match reply {
        Response::HelloOk { max_frame, .. } if blob == 0 => {
            Ok((conn, usize::try_from(max_frame).unwrap_or(usize::MAX)))
        }
        // The server's message names no secret.
        Response::Error {
            code: ErrorCode::Unauthorized,
            message,
        } => Err(ConnectError::Auth(format!(
            "the server refused the auth token ({message}); put the server's KVTIER_AUTH_TOKEN in the URL (kvtier://TOKEN@host:port) or in KVTIER_AUTH_TOKEN"
        ))),
        Response::Error { code, message } => Err(ConnectError::Other(format!(
            "handshake refused ({code:?}: {message}); is the server a kvtier serve of protocol version {} or later?",
            wire::PEER_PROTOCOL_VERSION
        ))),
        other => Err(ConnectError::Other(format!(
            "unexpected handshake reply {other:?}"
        ))),
    }
}

async fn get_on(
    conn: &mut Conn,
    key: ChunkKey,
    bufs: &dyn BufferSource,
) -> io::Result<Reply<Option<RecordRead>>> {
    send(conn, &Request::GetChunk { key: key.0 }, &[]).await?;
    let n = match recv_head(conn).await? {
        (Response::Record, n) => n,
        (Response::NotFound, 0) => return Ok(Reply::Done(None)),
        (other, blob) => return refused_or_unexpected(conn, other, blob).await,
    };
    let rec = read_record(conn, n, key, bufs, Terminator::None).await?;
    Ok(Reply::Done(Some(rec)))
}

impl Tier for PeerTier {
    fn name(&self) -> &str {
        &self.name
    }

    fn counters(&self) -> TierCounters {
        TierCounters {
            evictions: 0,
            checksum_failures: self.stats().checksum_failures,
        }
    }

    fn details(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self.stats()).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("url".into(), self.url.redacted().into());
        }
        v
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
        Box::pin(async move {
            Ok(self
                .count_request(Request::RemoveChunk { key: key.0 })
                .await?
                > 0)
        })
    }

    fn clear(&self) -> TierFuture<'_, u64> {
        Box::pin(self.count_request(Request::Clear))
    }

    fn remove_salt<'a>(&'a self, salt: &'a str) -> TierFuture<'a, u64> {
        Box::pin(self.count_request(Request::RemoveSalt {
            salt: salt.to_string(),
        }))
    }

    fn usage(&self) -> TierUsage {
        // A shared store: what other nodes wrote (and the server evicted) is unknown here.
        // Report what this process wrote; capacity is the server's business.
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
    fn names_and_redaction() {
        let t = PeerTier::from_url("kvtier://127.0.0.1:1?connect_timeout_ms=10", 0).unwrap();
        assert_eq!(t.name(), "peer");
        let t2 = PeerTier::from_url("kvtier://127.0.0.1:1?name=n", 3).unwrap();
        assert_eq!(t2.name(), "n");
        let t3 = PeerTier::from_url("kvtier://sekrit@127.0.0.1:1", 1).unwrap();
        assert_eq!(t3.name(), "peer2");
        let dbg = format!("{t3:?} {}", t3.details());
        assert!(dbg.contains(":***@") && !dbg.contains("sekrit"), "{dbg}");
    }

    #[test]
    fn refused_connections_are_tier_errors() {
        // A port nothing listens on: every operation must fail fast with a tier error,
        // which the manager's health logic counts (and then skips the tier).
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let t = PeerTier::from_url(&format!("kvtier://127.0.0.1:{port}"), 0).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let e = rt
            .block_on(t.contains_prefix(&[ChunkKey([1; 32])]))
            .unwrap_err();
        assert!(matches!(e, Error::Tier { .. }), "{e}");
        assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
        assert!(t.stats().connect_failures >= 1);
    }
}
