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
//!   [`RemoteStats::checksum_failures`]; no bytes that fail verification are returned.
//! * `put` writes the frame head, the record header, then the payload straight from the
//!   chunk's buffer (vectored write); the server verifies it and stores it through its normal
//!   store path (its L1, then its own lower tiers).
//! * Faults: connects (TCP + handshake) are bounded by `connect_timeout_ms`; after a failed
//!   connect the server is not retried before a backoff (100 ms doubling to `retry_max_ms`)
//!   and requests in that window fail at once, so the manager marks the tier down (C8). Every
//!   other wait is bounded by the manager's deadlines; a request cancelled midway discards
//!   its connection. A pooled connection that turns out dead (server restarted) is replaced
//!   once, transparently. Link state changes are logged once each.
//!
//! The tier is a [`RemoteTier`] over a [`PeerStore`]: counters, stats and the get/put
//! bookkeeping are the remote-tier scaffold's ([`crate::tier::remote`]). URL syntax and
//! options: [`url`].

pub mod url;

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use self::url::PeerUrl;
use super::remote::{default_name, RemoteStats, RemoteStore, RemoteTier};
use super::PutOutcome;
use crate::chunk::record::encode_header;
use crate::chunk::Chunk;
use crate::error::{Error, Result};
use crate::keys::ChunkKey;
use crate::memory::BufferSource;
use crate::transport::link::{ConnectError, Connector, Exchange, LinkCounters, LinkSettings, Pool};
use crate::transport::record::{read_record, RecordRead, Terminator};
use crate::transport::resp::Conn;
use crate::transport::stream::Stream;
use crate::transport::wire::{self, ErrorCode, PutResult, Request, Response};

/// Room for the frame header and meta of a put next to its record.
const FRAME_OVERHEAD: usize = 1024;

/// A tier backed by another node's `kvtier serve` (`kvtier://host:port`).
pub type PeerTier = RemoteTier<PeerStore>;

/// Snapshot of a kvtier server tier's counters: the remote-tier ones, then the probes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PeerTierStats {
    /// The counters every remote tier keeps (`stats.hits` reads through to them).
    #[serde(flatten)]
    pub remote: RemoteStats,
    /// `ContainsChunks` round trips: one per prefix probe, whatever its length.
    pub probes: u64,
}

impl std::ops::Deref for PeerTierStats {
    type Target = RemoteStats;
    fn deref(&self) -> &RemoteStats {
        &self.remote
    }
}

fn protocol(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
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

/// The kvtier-server side of a [`PeerTier`]: its connection pool and frames.
pub struct PeerStore {
    url: PeerUrl,
    connector: Arc<PeerConnector>,
    pool: Arc<Pool<PeerConnector>>,
    probes: AtomicU64,
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
        let name = url
            .name
            .clone()
            .unwrap_or_else(|| default_name("peer", index));
        tracing::info!(tier = %name, url = %url, "kvtier server tier configured");
        let connector = Arc::new(PeerConnector {
            link: LinkSettings::new(
                "kvtier server",
                &name,
                url.pool,
                url.connect_timeout,
                url.retry_max,
            ),
            token: url.token.clone(),
            max_frame: AtomicUsize::new(0),
        });
        let pool = Arc::new(Pool::new(url.addr.clone(), connector.clone()));
        pool.warm_up();
        Ok(Arc::new(RemoteTier::with_store(
            name,
            url.to_string(),
            PeerStore {
                url,
                connector,
                pool,
                probes: AtomicU64::new(0),
            },
        )))
    }

    /// The URL, token redacted.
    pub fn url(&self) -> &PeerUrl {
        &self.store().url
    }
}

impl Exchange<Conn> for Op<'_> {
    type Out = Reply<Out>;

    fn run<'a>(
        &'a self,
        conn: &'a mut Conn,
    ) -> impl std::future::Future<Output = io::Result<Reply<Out>>> + Send + 'a {
        exec_conn(conn, self)
    }
}

impl PeerStore {
    /// The tier's name.
    fn name(&self) -> &str {
        &self.connector.link.tier
    }

    fn err(&self, msg: impl std::fmt::Display) -> Error {
        self.pool.error(msg)
    }

    /// Runs one request on a pooled connection (every request here is idempotent); an
    /// error the server sent is a tier error.
    async fn exec(&self, op: &Op<'_>) -> Result<Out> {
        match self.pool.exec(op).await? {
            Reply::Done(v) => Ok(v),
            Reply::Refused(code, message) => Err(self.err(format_args!("{code:?}: {message}"))),
        }
    }

    /// The server's frame limit, or the protocol default before the first handshake.
    fn frame_limit(&self) -> usize {
        match self.connector.max_frame.load(Ordering::Relaxed) {
            0 => wire::DEFAULT_MAX_FRAME,
            n => n,
        }
    }

    async fn count_request(&self, req: Request) -> Result<u64> {
        match self.exec(&Op::Count(&req)).await? {
            Out::Count(n) => Ok(n),
            _ => Err(self.err("mismatched reply")),
        }
    }
}

impl RemoteStore for PeerStore {
    type Stats = PeerTierStats;

    async fn prefix_len(&self, keys: &[ChunkKey]) -> Result<usize> {
        // A prefix longer than one frame holds is asked in part: the answer is then at most
        // that part, which is still a correct (shorter) prefix.
        let max = self.frame_limit().saturating_sub(FRAME_OVERHEAD) / 32;
        let keys = &keys[..keys.len().min(max.max(1))];
        let blob = wire::keys_to_bytes(keys);
        self.probes.fetch_add(1, Ordering::Relaxed);
        match self.exec(&Op::Contains(&blob)).await? {
            Out::Count(n) => Ok((n as usize).min(keys.len())),
            _ => Err(self.err("mismatched reply")),
        }
    }

    async fn fetch(&self, key: ChunkKey, bufs: &dyn BufferSource) -> Result<Option<RecordRead>> {
        match self.exec(&Op::Get { key, bufs }).await? {
            Out::Get(out) => Ok(out),
            _ => Err(self.err("mismatched reply")),
        }
    }

    async fn discard(&self, key: ChunkKey, why: &str) {
        // Not removed from the server: the server verifies what its own tiers hold, so the
        // likeliest cause is the transfer, and its copy may well be good.
        tracing::warn!(tier = %self.name(), key = %key, reason = %why, "invalid chunk from the kvtier server: treated as a miss");
    }

    async fn store(&self, chunk: &Chunk) -> Result<PutOutcome> {
        let header = encode_header(&chunk.info)?;
        let payload = chunk.payload();
        if header.len() + payload.len() + FRAME_OVERHEAD > self.frame_limit() {
            return Ok(PutOutcome::Skipped("too_large"));
        }
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
            PutResult::Stored => PutOutcome::Stored,
            PutResult::AlreadyPresent => PutOutcome::AlreadyPresent,
            PutResult::Skipped(why) => {
                tracing::debug!(tier = %self.name(), key = %chunk.info.key, reason = %why, "kvtier server skipped a chunk");
                PutOutcome::Skipped(if why == "no_memory" {
                    "peer_no_memory"
                } else {
                    "peer_skipped"
                })
            }
        })
    }

    async fn remove(&self, key: ChunkKey) -> Result<bool> {
        Ok(self
            .count_request(Request::RemoveChunk { key: key.0 })
            .await?
            > 0)
    }

    async fn sweep(&self, salt: Option<&str>) -> Result<u64> {
        self.count_request(match salt {
            None => Request::Clear,
            Some(salt) => Request::RemoveSalt {
                salt: salt.to_string(),
            },
        })
        .await
    }

    fn links(&self) -> Option<&LinkCounters> {
        Some(&self.connector.link.counters)
    }

    fn stats(&self, remote: RemoteStats) -> PeerTierStats {
        PeerTierStats {
            remote,
            probes: self.probes.load(Ordering::Relaxed),
        }
    }

    fn details(&self, stats: &PeerTierStats) -> serde_json::Value {
        let mut v = serde_json::to_value(stats).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("url".into(), self.url.redacted().into());
        }
        v
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
    wire::frame::read_head(conn, wire::DEFAULT_MAX_FRAME).await
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
        version: wire::HELLO_VERSION,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tier::Tier;

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
