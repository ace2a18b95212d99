//! Serving one client connection: the handshake, then either a model connection's request
//! loop (here) or a chunk-level connection ([`crate::peer`]).
//!
//! A model connection reads frames on its own task, so lease expiry, the idle timeout and
//! shutdown are seen while the client is silent. Frames are read under the server's limits
//! ([`crate::limits`]). Each request is handled by [`crate::handlers`]; the leases it takes
//! belong to the connection ([`crate::lease`]) and are released when it closes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvtier::transport::wire::frame::ReadError;
use kvtier::transport::wire::{ErrorCode, Response};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::handlers::{dispatch, Reply, Session};
use crate::handshake::{handshake, Greeting, Hello, Transport};
use crate::io::{decode_request, err, read_frame, write_msg};
use crate::lease::Leases;
use crate::limits::{Admitted, FrameHold};
use crate::state::ServerState;

/// Serves one Unix-socket connection (holding `_slot` under the connection cap).
pub(crate) async fn serve_unix(
    mut stream: tokio::net::UnixStream,
    state: Arc<ServerState>,
    _slot: Admitted,
) {
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

/// Serves one TCP connection (holding `_slot` under the connection cap).
pub(crate) async fn serve_tcp(
    mut stream: tokio::net::TcpStream,
    state: Arc<ServerState>,
    _slot: Admitted,
) {
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

/// What the reader task passes on.
enum Incoming {
    /// A frame body and its reservation (returned once the request is handled).
    Frame(Vec<u8>, FrameHold),
    /// A frame that cannot be read past (oversized, truncated, too slow): reply and close.
    Fatal(ReadError),
}

/// Reads frames off `rd` until the stream ends, fails, or the receiver is gone; `started`
/// counts the frames whose length arrived (the request loop compares it with the frames it
/// received to tell an idle connection from one in the middle of a frame).
fn spawn_reader<R: AsyncRead + Unpin + Send + 'static>(
    mut rd: R,
    state: Arc<ServerState>,
    started: Arc<AtomicU64>,
) -> (tokio::task::JoinHandle<()>, mpsc::Receiver<Incoming>) {
    let (tx, rx) = mpsc::channel::<Incoming>(2);
    let reader = tokio::spawn(async move {
        let share = state.gates.conn_share();
        loop {
            let begun = || {
                started.fetch_add(1, Ordering::AcqRel);
            };
            let next = match read_frame(&mut rd, &state.gates, &share, state.max_frame, begun).await
            {
                Ok(Some((b, hold))) => Incoming::Frame(b, hold),
                Ok(None) => break,
                Err(e) => Incoming::Fatal(e),
            };
            let fatal = matches!(next, Incoming::Fatal(_));
            if tx.send(next).await.is_err() || fatal {
                break;
            }
        }
    });
    (reader, rx)
}

/// The request loop of a model connection.
async fn run<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    state: Arc<ServerState>,
    hello: Hello,
    transport: Transport,
) {
    let client = hello.client;
    debug!(%client, ?transport, shm = hello.shm, "client connected");
    let (rd, mut wr) = tokio::io::split(stream);
    let started = Arc::new(AtomicU64::new(0));
    let mut received = 0u64;
    let (reader, mut rx) = spawn_reader(rd, state.clone(), started.clone());
    let idle_timeout = state.gates.limits().idle_timeout;
    let mut last_seen = Instant::now();
    let mut session = Session {
        state: state.clone(),
        leases: Leases::new(hello.engine.clone(), state.lease_timeout),
        engine: hello.engine,
        shm: hello.shm,
    };
    let tick = (state.lease_timeout.min(idle_timeout) / 4)
        .clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut ticker = tokio::time::interval(tick);
    let mut shutdown = state.shutdown.clone();
    loop {
        tokio::select! {
            m = rx.recv() => match m {
                Some(Incoming::Frame(body, hold)) => {
                    received += 1;
                    let r = handle(&mut session, &body, &mut wr).await;
                    drop((body, hold));
                    last_seen = Instant::now();
                    if let Err(e) = r {
                        debug!(%client, error = %e, "connection write failed");
                        break;
                    }
                }
                Some(Incoming::Fatal(e)) => {
                    debug!(%client, error = %e, "closing connection after a bad frame");
                    let _ = write_msg(&mut wr, &err(ErrorCode::Protocol, e.to_string()), &[]).await;
                    break;
                }
                None => break,
            },
            _ = ticker.tick() => {
                expire(&mut session);
                let idle = started.load(Ordering::Acquire) == received
                    && session.leases.holds_nothing();
                if idle && last_seen.elapsed() >= idle_timeout {
                    debug!(%client, ?idle_timeout, "closing an idle connection");
                    break;
                }
            }
            _ = shutdown.changed() => break,
        }
    }
    reader.abort();
    let held = session.leases.len();
    // Dropping the leases releases every claim, buffer, hold and pin this client had.
    drop(session);
    debug!(%client, leases_released = held, "client disconnected");
}

/// Handles one frame; returns Err only when the connection cannot go on.
async fn handle<W: AsyncWrite + Unpin>(
    session: &mut Session,
    body: &[u8],
    wr: &mut W,
) -> std::io::Result<()> {
    let Some((req, blob)) = decode_request(body, wr).await? else {
        return Ok(());
    };
    match dispatch(session, req, blob) {
        Reply::Msg(r) => write_msg(wr, &r, &[]).await,
        // Bytes of a held chunk, written straight from the pool.
        Reply::Data(bytes) => write_msg(wr, &Response::Data, bytes).await,
        Reply::None => Ok(()),
    }
}

/// Drops the leases whose deadline passed.
fn expire(session: &mut Session) {
    let gone = session.leases.expire(Instant::now());
    if gone > 0 {
        info!(expired = gone, "leases expired; their chunks are released");
        session
            .state
            .expired_leases
            .fetch_add(gone as u64, Ordering::Relaxed);
    }
}
