//! Per-node connection pools with reconnect backoff and link-state logging.
//!
//! Each Redis node has a semaphore of `pool` permits (the concurrency per node) and a stack of
//! idle connections. A request leases a connection; the lease returns it to the pool only
//! when the request completed cleanly ([`Lease::done`]), so a request cancelled midway (its
//! future dropped by a deadline) or failed by an I/O error never leaves a half-read reply
//! in a pooled connection.
//!
//! Connects (TCP + TLS handshake for `rediss://` + `AUTH` + `SELECT`) run on a small runtime owned by this module, with a
//! timeout, so they never depend on the caller's runtime having an I/O driver or timer;
//! established connections are then driven directly by the caller's task. After a failed
//! connect the node is not retried before a backoff (100 ms doubling to `retry_max`);
//! requests in that window fail at once. One log line per link state change.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{Semaphore, SemaphorePermit};

use super::tls;
use super::url::Credentials;
use crate::error::{Error, Result};
use crate::transport::resp::{Conn, Reply, Stream};

const BACKOFF_INITIAL: Duration = Duration::from_millis(100);

/// The runtime that owns sockets' I/O registration and runs connects (and the cluster's
/// background slot refresh).
pub(crate) fn runtime() -> Result<&'static tokio::runtime::Runtime> {
    crate::transport::io_runtime()
}

/// Counters shared by a tier's nodes.
#[derive(Debug, Default)]
pub(crate) struct LinkCounters {
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
    pub io_errors: AtomicU64,
}

/// Settings shared by a tier's nodes.
#[derive(Debug)]
pub(crate) struct Shared {
    pub tier: String,
    pub credentials: Credentials,
    pub db: u32,
    pub pool: usize,
    pub connect_timeout: Duration,
    pub retry_max: Duration,
    /// TLS client configuration (`rediss://`), `None` for plain TCP.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub counters: LinkCounters,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Link {
    Unknown,
    Up,
    Down,
}

#[derive(Debug)]
struct NodeHealth {
    link: Link,
    next_attempt: Option<Instant>,
    backoff: Duration,
}

/// One Redis server: its pool and link state.
pub(crate) struct Node {
    pub addr: String,
    shared: Arc<Shared>,
    idle: Mutex<Vec<Conn>>,
    permits: Semaphore,
    health: Mutex<NodeHealth>,
    probing: AtomicBool,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("addr", &self.addr).finish()
    }
}

/// A leased connection. Returned to the pool only after [`Lease::done`].
pub(crate) struct Lease<'a> {
    node: &'a Node,
    conn: Option<Conn>,
    /// Whether the connection came from the pool (it may have gone stale).
    pub reused: bool,
    clean: bool,
    _permit: SemaphorePermit<'a>,
}

impl Lease<'_> {
    pub fn conn(&mut self) -> &mut Conn {
        self.conn
            .as_mut()
            .expect("a lease holds its connection until dropped")
    }

    /// The request completed and the connection is at a reply boundary: keep it.
    pub fn done(mut self) {
        self.clean = true;
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            if self.clean {
                let mut idle = self.node.idle.lock();
                if idle.len() < self.node.shared.pool {
                    idle.push(c);
                }
            }
        }
    }
}

/// Clears a flag when dropped.
struct FlagGuard<'a>(&'a AtomicBool);

impl Drop for FlagGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

async fn open(addr: &str, shared: &Shared) -> std::result::Result<Conn, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    // Requests are small writes followed by a wait for the reply: Nagle would add a delay.
    tcp.set_nodelay(true)
        .map_err(|e| format!("socket setup: {e}"))?;
    let stream = match &shared.tls {
        None => Stream::Tcp(tcp),
        Some(cfg) => {
            let name = tls::server_name(addr)?;
            let s = tokio_rustls::TlsConnector::from(cfg.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| tls::describe(&e))?;
            Stream::Tls(Box::new(s))
        }
    };
    let is_tls = shared.tls.is_some();
    // Errors of the first exchanges over TLS are usually TLS errors (TLS 1.3 servers reject
    // a missing client certificate only after the client's side of the handshake is done).
    let io_err = |what: &str, e: io::Error| {
        if is_tls {
            tls::describe(&e)
        } else {
            format!("{what}: {e}")
        }
    };
    let mut conn = Conn::new(stream);
    let creds = &shared.credentials;
    if let Some(pass) = &creds.password {
        let mut args: Vec<&[u8]> = vec![b"AUTH"];
        if let Some(user) = &creds.username {
            args.push(user.as_bytes());
        }
        args.push(pass.as_bytes());
        match conn.command(&args).await {
            Ok(Reply::Status(_)) => {}
            // The server's text names no secret (e.g. "WRONGPASS invalid username-password pair").
            Ok(Reply::Error(e)) => return Err(format!("authentication failed: {e}")),
            Ok(other) => return Err(format!("unexpected AUTH reply {other:?}")),
            Err(e) => return Err(io_err("AUTH", e)),
        }
    } else if is_tls {
        // One round trip so a server that refuses this client fails the connect, with a
        // TLS explanation, instead of the first request.
        match conn.command(&[b"PING"]).await {
            Ok(Reply::Status(_)) | Ok(Reply::Error(_)) => {}
            Ok(other) => return Err(format!("unexpected PING reply {other:?}")),
            Err(e) => return Err(io_err("PING", e)),
        }
    }
    if shared.db != 0 {
        let db = shared.db.to_string();
        match conn.command(&[b"SELECT", db.as_bytes()]).await {
            Ok(Reply::Status(_)) => {}
            Ok(Reply::Error(e)) => return Err(format!("SELECT {db} failed: {e}")),
            Ok(other) => return Err(format!("unexpected SELECT reply {other:?}")),
            Err(e) => return Err(io_err("SELECT", e)),
        }
    }
    Ok(conn)
}

impl Node {
    pub fn new(addr: String, shared: Arc<Shared>) -> Node {
        Node {
            addr,
            permits: Semaphore::new(shared.pool),
            shared,
            idle: Mutex::new(Vec::new()),
            health: Mutex::new(NodeHealth {
                link: Link::Unknown,
                next_attempt: None,
                backoff: BACKOFF_INITIAL,
            }),
            probing: AtomicBool::new(false),
        }
    }

    /// A tier error about this node.
    pub fn error(&self, msg: impl std::fmt::Display) -> Error {
        Error::tier(&self.shared.tier, format!("redis {}: {msg}", self.addr))
    }

    /// Leases a connection: an idle one, else a new one (unless in reconnect backoff).
    pub async fn acquire(&self) -> Result<Lease<'_>> {
        let permit = self.permits.acquire().await.map_err(|_| Error::Closed)?;
        if let Some(c) = self.idle.lock().pop() {
            return Ok(Lease {
                node: self,
                conn: Some(c),
                reused: true,
                clean: false,
                _permit: permit,
            });
        }
        let conn = self.connect().await?;
        Ok(Lease {
            node: self,
            conn: Some(conn),
            reused: false,
            clean: false,
            _permit: permit,
        })
    }

    async fn connect(&self) -> Result<Conn> {
        {
            let h = self.health.lock();
            if let Some(t) = h.next_attempt {
                let now = Instant::now();
                if now < t {
                    return Err(self.error(format_args!(
                        "unreachable; next reconnect attempt in {} ms",
                        (t - now).as_millis()
                    )));
                }
            }
            // While down, one probe at a time; the others fail fast instead of piling up.
            if h.link == Link::Down && self.probing.swap(true, Ordering::AcqRel) {
                return Err(self.error("unreachable; reconnect in progress"));
            }
        }
        let _probe = FlagGuard(&self.probing);
        let addr = self.addr.clone();
        let shared = self.shared.clone();
        let timeout = shared.connect_timeout;
        let task = runtime()?.spawn(async move {
            match tokio::time::timeout(timeout, open(&addr, &shared)).await {
                Ok(r) => r,
                Err(_) if shared.tls.is_some() => Err(format!(
                    "connect + TLS handshake timed out after {} ms (is this port serving TLS? a plaintext server can leave a TLS handshake hanging)",
                    timeout.as_millis()
                )),
                Err(_) => Err(format!(
                    "connect timed out after {} ms",
                    timeout.as_millis()
                )),
            }
        });
        let r = match task.await {
            Ok(r) => r,
            Err(e) => Err(format!("connect task failed: {e}")),
        };
        match r {
            Ok(c) => {
                self.shared
                    .counters
                    .connects
                    .fetch_add(1, Ordering::Relaxed);
                self.mark_up();
                Ok(c)
            }
            Err(msg) => {
                self.shared
                    .counters
                    .connect_failures
                    .fetch_add(1, Ordering::Relaxed);
                self.mark_connect_failed(&msg);
                Err(self.error(msg))
            }
        }
    }

    fn mark_up(&self) {
        let mut h = self.health.lock();
        match h.link {
            Link::Unknown => {
                tracing::info!(tier = %self.shared.tier, addr = %self.addr, "connected to redis")
            }
            Link::Down => {
                tracing::warn!(tier = %self.shared.tier, addr = %self.addr, "reconnected to redis")
            }
            Link::Up => {}
        }
        h.link = Link::Up;
        h.next_attempt = None;
        h.backoff = BACKOFF_INITIAL;
    }

    fn mark_connect_failed(&self, msg: &str) {
        let mut h = self.health.lock();
        let retry_ms = h.backoff.as_millis();
        match h.link {
            Link::Unknown => tracing::warn!(
                tier = %self.shared.tier, addr = %self.addr, error = %msg, retry_ms,
                "redis unreachable; will keep retrying with backoff"
            ),
            Link::Up => tracing::warn!(
                tier = %self.shared.tier, addr = %self.addr, error = %msg, retry_ms,
                "lost connection to redis; reconnecting with backoff"
            ),
            Link::Down => {
                tracing::debug!(tier = %self.shared.tier, addr = %self.addr, error = %msg, "reconnect failed")
            }
        }
        h.link = Link::Down;
        h.next_attempt = Some(Instant::now() + h.backoff);
        h.backoff = (h.backoff * 2).min(self.shared.retry_max);
    }

    /// An established connection failed: drop the idle ones too (they likely share the
    /// fate: server restarted or gone), so the next request reconnects.
    pub fn io_failed(&self, e: &io::Error) {
        self.shared
            .counters
            .io_errors
            .fetch_add(1, Ordering::Relaxed);
        self.idle.lock().clear();
        let mut h = self.health.lock();
        if h.link == Link::Up {
            tracing::warn!(
                tier = %self.shared.tier, addr = %self.addr, error = %e,
                "lost connection to redis; reconnecting"
            );
            h.link = Link::Down;
        }
    }

    /// Opens one connection in the background (startup probe, logs the link state).
    pub fn warm_up(self: &Arc<Self>) {
        let node = self.clone();
        if let Ok(rt) = runtime() {
            rt.spawn(async move {
                if let Ok(lease) = node.acquire().await {
                    lease.done();
                }
            });
        }
    }
}
