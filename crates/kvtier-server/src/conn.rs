//! One client connection: handshake, then a request loop with per-connection leases.
//!
//! Every lease (a store session or a held retrieve) belongs to the connection that took
//! it: it ends on commit/release, when it expires, or when the connection closes — the
//! values are dropped, which releases claims, buffers and holds (RAII). A client that dies
//! therefore leaves nothing behind.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvtier::keys::{ChunkKey, ModelIdentity};
use kvtier::manager::PrefetchHandle;
use kvtier::transport::wire::{self as proto, ErrorCode, Request, Response, Slot};
use kvtier::PinToken;
use kvtier::{Acquired, Engine, StoreSession};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::ServerState;

/// Which listener a connection came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Local Unix socket (may map the pool).
    Unix,
    /// TCP (payload in frames, token required when configured).
    Tcp,
}

/// Most leases and prefetches one connection may hold at once.
const MAX_LEASES: usize = 4096;
/// Time a new connection has to send its Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

enum Incoming {
    Frame(Vec<u8>),
    /// A frame that cannot be read past (oversized, truncated header): reply and close.
    Fatal(String),
}

pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> std::result::Result<Option<Vec<u8>>, String> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(format!("read error: {e}")),
    }
    let n = proto::body_len(len, max).map_err(|e| e.to_string())?;
    let mut body = vec![0u8; n];
    r.read_exact(&mut body)
        .await
        .map_err(|e| format!("truncated frame: {e}"))?;
    Ok(Some(body))
}

pub(crate) async fn write_msg<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &Response,
    blob: &[u8],
) -> std::io::Result<()> {
    let head = proto::encode_head(msg, blob.len())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    if blob.is_empty() {
        w.write_all(&head).await
    } else {
        w.write_all(&head).await?;
        w.write_all(blob).await
    }
}

/// Decodes a request frame and its blob; a malformed one is answered with a protocol error
/// (the connection stays usable) and gives `None`.
pub(crate) async fn decode_request<'a, W: AsyncWrite + Unpin>(
    body: &'a [u8],
    wr: &mut W,
) -> std::io::Result<Option<(Request, &'a [u8])>> {
    match proto::decode::<Request>(body) {
        Ok((req, blob)) => Ok(Some((req, &body[blob]))),
        Err(e) => {
            write_msg(wr, &err(ErrorCode::Protocol, e.to_string()), &[]).await?;
            Ok(None)
        }
    }
}

pub(crate) fn err(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error {
        code,
        message: message.into(),
    }
}

fn tokens_eq_ct(a: &str, b: &str) -> bool {
    // Compare digests: constant time whatever the lengths (blake3::Hash's == is).
    blake3::hash(a.as_bytes()) == blake3::hash(b.as_bytes())
}

struct Hello {
    engine: Arc<Engine>,
    shm: bool,
    client: String,
}

/// What the first frame opened.
enum Greeting {
    /// A model connection ([`Request::Hello`]).
    Model(Hello),
    /// A chunk-level connection of another engine using this server as a tier
    /// ([`Request::HelloPeer`]).
    Peer {
        /// Client name for logs.
        client: String,
    },
}

fn check_version(version: u16, min: u16) -> std::result::Result<(), Response> {
    if (min..=proto::PROTOCOL_VERSION).contains(&version) {
        return Ok(());
    }
    Err(err(
        ErrorCode::Protocol,
        format!(
            "protocol version {version} is not supported here (this server speaks {min} to {}); upgrade the older side",
            proto::PROTOCOL_VERSION
        ),
    ))
}

fn check_token(
    state: &ServerState,
    transport: Transport,
    token: Option<&str>,
) -> std::result::Result<(), Response> {
    if transport == Transport::Tcp {
        if let Some(want) = &state.auth_token {
            if !token.is_some_and(|t| tokens_eq_ct(t, want)) {
                return Err(err(
                    ErrorCode::Unauthorized,
                    "missing or wrong auth token (set KVTIER_AUTH_TOKEN)",
                ));
            }
        }
    }
    Ok(())
}

/// Reads and checks the Hello (or HelloPeer); replies HelloOk or an error.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    state: &ServerState,
    transport: Transport,
) -> Option<Greeting> {
    let body = match tokio::time::timeout(HELLO_TIMEOUT, read_frame(stream, 1 << 20)).await {
        Ok(Ok(Some(b))) => b,
        Ok(Ok(None)) => return None,
        Ok(Err(e)) => {
            let _ = write_msg(stream, &err(ErrorCode::Protocol, e), &[]).await;
            return None;
        }
        Err(_) => {
            let _ = write_msg(stream, &err(ErrorCode::Protocol, "no Hello in time"), &[]).await;
            return None;
        }
    };
    let reply_err = |code, m: String| err(code, m);
    let result: std::result::Result<Greeting, Response> = (|| {
        let (req, _) = proto::decode::<Request>(&body)
            .map_err(|e| reply_err(ErrorCode::Protocol, e.to_string()))?;
        if let Request::HelloPeer {
            magic,
            version,
            client_name,
            auth_token,
        } = req
        {
            if magic != proto::MAGIC {
                return Err(reply_err(ErrorCode::Protocol, "bad magic".into()));
            }
            check_version(version, proto::PEER_PROTOCOL_VERSION)?;
            check_token(state, transport, auth_token.as_deref())?;
            return Ok(Greeting::Peer {
                client: client_name.chars().take(128).collect(),
            });
        }
        let Request::Hello {
            magic,
            version,
            client_name,
            identity_json,
            chunk_size,
            auth_token,
            want_shm,
        } = req
        else {
            return Err(reply_err(
                ErrorCode::Protocol,
                "the first frame must be Hello".into(),
            ));
        };
        if magic != proto::MAGIC {
            return Err(reply_err(ErrorCode::Protocol, "bad magic".into()));
        }
        check_version(version, proto::MIN_PROTOCOL_VERSION)?;
        check_token(state, transport, auth_token.as_deref())?;
        let identity: ModelIdentity = serde_json::from_str(&identity_json).map_err(|e| {
            reply_err(
                ErrorCode::InvalidInput,
                format!("model identity is not valid JSON: {e}"),
            )
        })?;
        let cs = state.models.core().config().chunk_size;
        if let Some(c) = chunk_size {
            if c as usize != cs {
                return Err(reply_err(
                    ErrorCode::InvalidInput,
                    format!("client expects chunk_size {c}; this server uses {cs}"),
                ));
            }
        }
        let engine = state
            .models
            .get_or_attach(identity)
            .map_err(|e| proto::error_reply(&e))?;
        let shm = want_shm && transport == Transport::Unix && state.pool_fd.is_some();
        Ok(Greeting::Model(Hello {
            engine,
            shm,
            client: client_name.chars().take(128).collect(),
        }))
    })();
    match result {
        Ok(g) => {
            let cfg = state.models.core().config();
            let (bytes_per_token, shm) = match &g {
                Greeting::Model(h) => (h.engine.bytes_per_token() as u64, h.shm),
                Greeting::Peer { .. } => (0, false),
            };
            let ok = Response::HelloOk {
                version: proto::PROTOCOL_VERSION,
                server_name: state.name.clone(),
                chunk_size: cfg.chunk_size as u32,
                save_unfull_chunk: cfg.save_unfull_chunk,
                bytes_per_token,
                shm_pool_bytes: shm.then(|| state.models.core().manager().pool().capacity()),
                max_frame: state.max_frame as u64,
            };
            write_msg(stream, &ok, &[]).await.ok()?;
            Some(g)
        }
        Err(reply) => {
            if let Response::Error { message, .. } = &reply {
                warn!(?transport, %message, "handshake refused");
            }
            let _ = write_msg(stream, &reply, &[]).await;
            None
        }
    }
}

/// Serves one Unix-socket connection.
pub async fn serve_unix(mut stream: tokio::net::UnixStream, state: Arc<ServerState>) {
    let _guard = state.track();
    let h = match handshake(&mut stream, &state, Transport::Unix).await {
        Some(Greeting::Model(h)) => h,
        Some(Greeting::Peer { client }) => {
            return crate::peer::run(stream, state.clone(), client, Transport::Unix).await
        }
        None => return,
    };
    if h.shm {
        if let Some(fd) = state.pool_fd {
            if let Err(e) = crate::fdpass::send_fd(&stream, fd).await {
                warn!(error = %e, "could not pass the pool descriptor");
                return;
            }
        }
    }
    run(stream, state.clone(), h, Transport::Unix).await;
}

/// Serves one TCP connection.
pub async fn serve_tcp(mut stream: tokio::net::TcpStream, state: Arc<ServerState>) {
    let _guard = state.track();
    let _ = stream.set_nodelay(true);
    match handshake(&mut stream, &state, Transport::Tcp).await {
        Some(Greeting::Model(h)) => run(stream, state.clone(), h, Transport::Tcp).await,
        Some(Greeting::Peer { client }) => {
            crate::peer::run(stream, state.clone(), client, Transport::Tcp).await
        }
        None => {}
    }
}

enum LeaseKind {
    Store {
        session: StoreSession,
        t0: Instant,
    },
    Read {
        acquired: Acquired,
        t0: Instant,
        bytes: u64,
    },
}

struct Lease {
    kind: LeaseKind,
    deadline: Instant,
}

struct Conn {
    state: Arc<ServerState>,
    engine: Arc<Engine>,
    shm: bool,
    leases: HashMap<u64, Lease>,
    prefetches: HashMap<u64, PrefetchHandle>,
    /// Pins taken on this connection: released when it closes, so a dead client leaves
    /// none behind (pins also expire by their TTL).
    pins: HashMap<(ChunkKey, u64), ()>,
    next_id: u64,
}

impl Drop for Conn {
    fn drop(&mut self) {
        if !self.pins.is_empty() {
            let pins: Vec<PinToken> = self
                .pins
                .keys()
                .map(|&(key, id)| PinToken { key, id })
                .collect();
            self.engine.unpin(&pins);
        }
    }
}

async fn run<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    state: Arc<ServerState>,
    hello: Hello,
    transport: Transport,
) {
    let client = hello.client.clone();
    debug!(%client, ?transport, shm = hello.shm, "client connected");
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<Incoming>(2);
    let max = state.max_frame;
    let reader = tokio::spawn(async move {
        loop {
            match read_frame(&mut rd, max).await {
                Ok(Some(b)) => {
                    if tx.send(Incoming::Frame(b)).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Incoming::Fatal(e)).await;
                    break;
                }
            }
        }
    });
    let mut conn = Conn {
        state: state.clone(),
        engine: hello.engine,
        shm: hello.shm,
        leases: HashMap::new(),
        prefetches: HashMap::new(),
        pins: HashMap::new(),
        next_id: 1,
    };
    let tick = (state.lease_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut ticker = tokio::time::interval(tick);
    let mut shutdown = state.shutdown.clone();
    loop {
        tokio::select! {
            m = rx.recv() => match m {
                Some(Incoming::Frame(body)) => {
                    if let Err(e) = conn.handle(&body, &mut wr).await {
                        debug!(%client, error = %e, "connection write failed");
                        break;
                    }
                }
                Some(Incoming::Fatal(e)) => {
                    debug!(%client, error = %e, "closing connection after a bad frame");
                    let _ = write_msg(&mut wr, &err(ErrorCode::Protocol, e), &[]).await;
                    break;
                }
                None => break,
            },
            _ = ticker.tick() => conn.expire(),
            _ = shutdown.changed() => break,
        }
    }
    reader.abort();
    let held = conn.leases.len();
    // Dropping the leases releases every claim, buffer and hold this client had.
    drop(conn);
    debug!(%client, leases_released = held, "client disconnected");
}

fn n_id(next: &mut u64) -> u64 {
    let id = *next;
    *next += 1;
    id
}

impl Conn {
    fn expire(&mut self) {
        let now = Instant::now();
        let before = self.leases.len();
        self.leases.retain(|_, l| l.deadline > now);
        let gone = before - self.leases.len();
        if gone > 0 {
            info!(expired = gone, "leases expired; their chunks are released");
            self.state
                .expired_leases
                .fetch_add(gone as u64, Ordering::Relaxed);
        }
    }

    fn add_lease(&mut self, kind: LeaseKind) -> std::result::Result<u64, Response> {
        if self.leases.len() >= MAX_LEASES {
            return Err(err(
                ErrorCode::InvalidInput,
                format!("connection holds {MAX_LEASES} leases; commit or release some"),
            ));
        }
        let id = n_id(&mut self.next_id);
        self.leases.insert(
            id,
            Lease {
                kind,
                deadline: Instant::now() + self.state.lease_timeout,
            },
        );
        Ok(id)
    }

    /// Handles one frame; returns Err only when the connection cannot go on.
    async fn handle<W: AsyncWrite + Unpin>(
        &mut self,
        body: &[u8],
        wr: &mut W,
    ) -> std::io::Result<()> {
        let Some((req, blob)) = decode_request(body, wr).await? else {
            return Ok(());
        };
        // ReadSlot answers with pool bytes written straight from the held chunk.
        if let Request::ReadSlot {
            lease,
            slot,
            offset,
            len,
        } = req
        {
            return self.read_slot(lease, slot, offset, len, wr).await;
        }
        let reply = match self.dispatch(req, blob) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(r) => r,
        };
        write_msg(wr, &reply, &[]).await
    }

    async fn read_slot<W: AsyncWrite + Unpin>(
        &mut self,
        lease: u64,
        slot: u32,
        offset: u64,
        len: u64,
        wr: &mut W,
    ) -> std::io::Result<()> {
        let Some(Lease {
            kind: LeaseKind::Read { acquired, .. },
            deadline,
        }) = self.leases.get_mut(&lease)
        else {
            return write_msg(wr, &err(ErrorCode::NoLease, "unknown retrieve lease"), &[]).await;
        };
        let Some(chunk) = acquired.chunks.get(slot as usize) else {
            return write_msg(wr, &err(ErrorCode::InvalidInput, "no such slot"), &[]).await;
        };
        let p = chunk.payload();
        let (o, l) = (offset as usize, len as usize);
        if o.checked_add(l).is_none_or(|e| e > p.len()) || l > self.state.max_frame {
            return write_msg(
                wr,
                &err(ErrorCode::InvalidInput, "range outside the slot"),
                &[],
            )
            .await;
        }
        *deadline = Instant::now() + self.state.lease_timeout;
        write_msg(wr, &Response::Data, &p[o..o + l]).await
    }

    /// Handles a request; `Ok(None)` for one-way messages.
    fn dispatch(
        &mut self,
        req: Request,
        blob: &[u8],
    ) -> std::result::Result<Option<Response>, Response> {
        let eng = self.engine.clone();
        let perr = |e: proto::ProtoError| err(ErrorCode::Protocol, e.to_string());
        let kerr = |e: kvtier::Error| proto::error_reply(&e);
        Ok(Some(match req {
            Request::Hello { .. } | Request::HelloPeer { .. } => {
                return Err(err(ErrorCode::Protocol, "already greeted"))
            }
            Request::ContainsChunks
            | Request::GetChunk { .. }
            | Request::PutChunk
            | Request::RemoveChunk { .. } => {
                return Err(err(
                    ErrorCode::Protocol,
                    "chunk frames need a connection opened with HelloPeer (the kvtier:// tier does this)",
                ))
            }
            Request::Ping => Response::Pong,
            Request::Lookup { n_tokens } => {
                let keys = proto::keys_from_bytes(blob).map_err(perr)?;
                self.lookup(&eng, &keys, n_tokens)?
            }
            Request::BeginStore { salt } => {
                let tokens = proto::tokens_from_bytes(blob).map_err(perr)?;
                let t0 = Instant::now();
                let session = block(|| eng.begin_store(&tokens, salt.as_deref())).map_err(kerr)?;
                if session.slots.is_empty() {
                    let report = block(|| eng.commit_store(session));
                    return Ok(Some(Response::Stored(report.summary())));
                }
                let slots = session
                    .slots
                    .iter()
                    .map(|s| Slot {
                        start: s.span.start as u64,
                        end: s.span.end as u64,
                        offset: s.buf.offset(),
                        len: s.buf.len() as u64,
                    })
                    .collect();
                let (stored_tokens, present, inflight, dropped) = (
                    session.stored_tokens as u64,
                    session.present_chunks as u32,
                    session.inflight_chunks as u32,
                    session.dropped_chunks as u32,
                );
                let lease = self.add_lease(LeaseKind::Store { session, t0 })?;
                Response::StoreLease {
                    lease,
                    slots,
                    stored_tokens,
                    present_chunks: present,
                    inflight_chunks: inflight,
                    dropped_chunks: dropped,
                }
            }
            Request::WriteSlot {
                lease,
                slot,
                offset,
            } => {
                let timeout = self.state.lease_timeout;
                let Some(Lease {
                    kind: LeaseKind::Store { session, .. },
                    deadline,
                }) = self.leases.get_mut(&lease)
                else {
                    return Err(err(ErrorCode::NoLease, "unknown or expired store lease"));
                };
                let Some(s) = session.slots.get_mut(slot as usize) else {
                    return Err(err(ErrorCode::InvalidInput, "no such slot"));
                };
                let buf = s.buf.as_mut_slice();
                let o = offset as usize;
                match o.checked_add(blob.len()) {
                    Some(end) if end <= buf.len() => buf[o..end].copy_from_slice(blob),
                    _ => return Err(err(ErrorCode::InvalidInput, "write outside the slot")),
                }
                *deadline = Instant::now() + timeout;
                Response::Written
            }
            Request::CommitStore {
                lease,
                checksums,
                durable,
            } => {
                let Some(Lease {
                    kind: LeaseKind::Store { mut session, t0 },
                    ..
                }) = self.take_lease(lease, true)
                else {
                    return Err(err(ErrorCode::NoLease, "unknown or expired store lease"));
                };
                // Checksums computed by a local writer while copying are trusted (the
                // socket is the trust boundary); remote writers' bytes are checksummed here.
                if self.shm && checksums.len() == session.slots.len() {
                    for (s, c) in session.slots.iter_mut().zip(checksums) {
                        s.checksum = c;
                    }
                }
                let report = block(|| eng.commit_store(session));
                let m = self.state.models.core().metrics();
                let dt = t0.elapsed().as_secs_f64();
                m.store_seconds.observe(dt);
                if report.new_bytes > 0 && dt > 0.0 {
                    m.store_gbps.observe(report.new_bytes as f64 / dt / 1e9);
                }
                if durable {
                    let summary = report.summary();
                    let lower = self
                        .state
                        .models
                        .core()
                        .manager()
                        .tier_names()
                        .len()
                        .saturating_sub(1);
                    let want = report.new_chunks * lower;
                    let outcomes = block(|| report.ticket.wait());
                    let ok = outcomes
                        .iter()
                        .filter(|o| {
                            matches!(
                                o.result,
                                Ok(kvtier::tier::PutOutcome::Stored
                                    | kvtier::tier::PutOutcome::AlreadyPresent)
                            )
                        })
                        .count();
                    return Ok(Some(Response::StoredDurable {
                        summary,
                        durable: ok == want,
                    }));
                }
                Response::Stored(report.summary())
            }
            Request::AbortStore { lease } => {
                drop(self.take_lease(lease, true));
                return Ok(None);
            }
            Request::Acquire { salt } => {
                let tokens = proto::tokens_from_bytes(blob).map_err(perr)?;
                let t0 = Instant::now();
                let acquired = block(|| eng.acquire(&tokens, salt.as_deref())).map_err(kerr)?;
                let bpt = eng.bytes_per_token();
                let mut chunks = Vec::with_capacity(acquired.chunks.len());
                let mut bytes = 0u64;
                for (span, c) in acquired.spans.iter().zip(&acquired.chunks) {
                    let len = c.payload().len();
                    if len != span.len() * bpt {
                        return Err(err(
                            ErrorCode::Corrupt,
                            format!(
                                "chunk {} holds {len} bytes, expected {}",
                                span.key,
                                span.len() * bpt
                            ),
                        ));
                    }
                    bytes += len as u64;
                    chunks.push(Slot {
                        start: span.start as u64,
                        end: span.end as u64,
                        offset: c.buf.offset(),
                        len: len as u64,
                    });
                }
                let hit_tokens = acquired.hit_tokens as u64;
                let tiers = acquired.tiers.iter().map(|&t| t as u8).collect();
                let lease = if chunks.is_empty() {
                    0
                } else {
                    self.add_lease(LeaseKind::Read {
                        acquired,
                        t0,
                        bytes,
                    })?
                };
                Response::Acquired {
                    lease,
                    hit_tokens,
                    chunks,
                    tiers,
                }
            }
            Request::ReadSlot { .. } => unreachable_read_slot(),
            Request::Release { lease } => {
                if let Some(Lease {
                    kind: LeaseKind::Read { t0, bytes, .. },
                    ..
                }) = self.take_lease(lease, false)
                {
                    let m = self.state.models.core().metrics();
                    let dt = t0.elapsed().as_secs_f64();
                    m.retrieve_seconds.observe(dt);
                    if dt > 0.0 {
                        m.retrieve_gbps.observe(bytes as f64 / dt / 1e9);
                    }
                }
                return Ok(None);
            }
            Request::Prefetch { salt } => {
                let tokens = proto::tokens_from_bytes(blob).map_err(perr)?;
                if self.prefetches.len() >= MAX_LEASES {
                    return Err(err(
                        ErrorCode::InvalidInput,
                        "too many prefetches in flight",
                    ));
                }
                let h = eng.prefetch(&tokens, salt.as_deref()).map_err(kerr)?;
                let id = n_id(&mut self.next_id);
                self.prefetches.insert(id, h);
                Response::PrefetchStarted { id }
            }
            Request::WaitPrefetch { id, timeout_ms } => {
                let Some(h) = self.prefetches.remove(&id) else {
                    return Err(err(ErrorCode::NoLease, "unknown prefetch id"));
                };
                let r = block(|| match timeout_ms {
                    Some(t) => h.wait_timeout(Duration::from_millis(t)),
                    None => h.wait_timeout(Duration::from_secs(3600)),
                })
                .map_err(kerr)?;
                Response::Prefetched {
                    tokens: r.tokens() as u64,
                }
            }
            Request::Pin { salt, ttl_ms } => {
                let tokens = proto::tokens_from_bytes(blob).map_err(perr)?;
                let pins = eng
                    .pin(&tokens, salt.as_deref(), ttl_ms.map(Duration::from_millis))
                    .map_err(kerr)?;
                if self.pins.len() + pins.len() > 1 << 20 {
                    eng.unpin(&pins);
                    return Err(err(
                        ErrorCode::InvalidInput,
                        "too many pins on one connection",
                    ));
                }
                for p in &pins {
                    self.pins.insert((p.key, p.id), ());
                }
                Response::Pins {
                    pins: pins.into_iter().map(|p| (p.key.0, p.id)).collect(),
                }
            }
            Request::Unpin { pins } => {
                let pins: Vec<PinToken> = pins
                    .into_iter()
                    .map(|(k, id)| PinToken {
                        key: ChunkKey(k),
                        id,
                    })
                    .collect();
                for p in &pins {
                    self.pins.remove(&(p.key, p.id));
                }
                eng.unpin(&pins);
                Response::Ok
            }
            Request::Remove { salt } => {
                let tokens = proto::tokens_from_bytes(blob).map_err(perr)?;
                Response::Count(block(|| eng.remove(&tokens, salt.as_deref())).map_err(kerr)?)
            }
            Request::RemoveSalt { salt } => {
                let r = block(|| eng.remove_salt(&salt)).map_err(kerr)?;
                Response::Count(r.iter().map(|x| x.1).sum())
            }
            Request::Clear => {
                let r = block(|| eng.clear()).map_err(kerr)?;
                Response::Count(r.iter().map(|x| x.1).sum())
            }
            Request::Flush { timeout_ms } => {
                let t = Duration::from_millis(timeout_ms.min(600_000));
                Response::Flushed(block(|| eng.flush(t)))
            }
            Request::Stats => {
                let s = block(|| eng.stats());
                Response::Stats(
                    serde_json::to_string(&s)
                        .map_err(|e| err(ErrorCode::Engine, format!("stats are not JSON: {e}")))?,
                )
            }
        }))
    }

    fn take_lease(&mut self, id: u64, store: bool) -> Option<Lease> {
        let is_store = matches!(self.leases.get(&id)?.kind, LeaseKind::Store { .. });
        if is_store == store {
            self.leases.remove(&id)
        } else {
            None
        }
    }

    fn lookup(
        &self,
        eng: &Engine,
        keys: &[ChunkKey],
        n_tokens: u64,
    ) -> std::result::Result<Response, Response> {
        let t0 = Instant::now();
        let ks = eng.key_space();
        let n = usize::try_from(n_tokens).unwrap_or(usize::MAX);
        if keys.len() != ks.num_chunks(n) {
            return Err(err(
                ErrorCode::InvalidInput,
                format!(
                    "{} keys sent for a {n}-token prompt of {} chunks",
                    keys.len(),
                    ks.num_chunks(n)
                ),
            ));
        }
        let r = tokio::task::block_in_place(|| eng.manager().lookup(keys))
            .map_err(|e| proto::error_reply(&e))?;
        let hit_tokens = if r.hit_chunks == 0 {
            0
        } else {
            (r.hit_chunks * ks.chunk_size()).min(n)
        };
        let m = self.state.models.core().metrics();
        m.lookups.inc();
        m.requested_tokens.inc_by(n as u64);
        m.hit_tokens.inc_by(hit_tokens as u64);
        m.lookup_seconds.observe(t0.elapsed().as_secs_f64());
        Ok(Response::Lookup {
            hit_chunks: r.hit_chunks as u32,
            tiers: r.tiers.iter().map(|&t| t as u8).collect(),
        })
    }
}

/// Runs blocking engine work without stalling the runtime's other tasks.
pub(crate) fn block<R>(f: impl FnOnce() -> R) -> R {
    tokio::task::block_in_place(f)
}

fn unreachable_read_slot() -> Response {
    // ReadSlot is answered by `Conn::read_slot` before dispatch; never reached.
    err(ErrorCode::Protocol, "ReadSlot handled elsewhere")
}
