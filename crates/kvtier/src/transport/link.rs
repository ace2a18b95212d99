//! A connection pool to one remote endpoint, with reconnect backoff and link-state logging:
//! used by each node of a Redis tier and by the kvtier server tier.
//!
//! A pool has a semaphore of `pool` permits (the concurrency to the endpoint) and a stack of
//! idle connections. A request leases a connection; the lease returns it to the pool only
//! when the request completed cleanly ([`Lease::done`]), so a request cancelled midway (its
//! future dropped by a deadline) or failed by an I/O error never leaves a half-read reply
//! in a pooled connection.
//!
//! Connects run on the I/O runtime ([`super::io_runtime`]) with a timeout, so they never
//! depend on the caller's runtime having an I/O driver or timer; established connections
//! are then driven directly by the caller's task. After a failed connect the endpoint is
//! not retried before a backoff (100 ms doubling to `retry_max`); requests in that window
//! fail at once, and while the link is down only one connect is tried at a time. One log
//! line per link state change.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::error::{Error, Result};

const BACKOFF_INITIAL: Duration = Duration::from_millis(100);

/// Counters of a tier's links (shared by its pools).
#[derive(Debug, Default)]
pub struct LinkCounters {
    /// Connections opened.
    pub connects: AtomicU64,
    /// Failed connects (refused, timed out, handshake refused).
    pub connect_failures: AtomicU64,
    /// Connects refused for bad credentials.
    pub auth_failures: AtomicU64,
    /// I/O errors on established connections.
    pub io_errors: AtomicU64,
}

/// Settings a tier applies to all its pools.
#[derive(Debug)]
pub(crate) struct LinkSettings {
    /// What the endpoint is, in logs and errors (`redis`, `kvtier server`).
    pub kind: &'static str,
    /// Tier name, in logs and errors.
    pub tier: String,
    /// Connections per endpoint.
    pub pool: usize,
    /// Bound on one connect (including handshakes).
    pub connect_timeout: Duration,
    /// Longest reconnect backoff.
    pub retry_max: Duration,
    /// Counters of all the tier's pools.
    pub counters: LinkCounters,
}

impl LinkSettings {
    /// Settings for the pools of tier `tier` to endpoints of `kind`, counters at zero.
    pub fn new(
        kind: &'static str,
        tier: &str,
        pool: usize,
        connect_timeout: Duration,
        retry_max: Duration,
    ) -> LinkSettings {
        LinkSettings {
            kind,
            tier: tier.to_string(),
            pool,
            connect_timeout,
            retry_max,
            counters: LinkCounters::default(),
        }
    }
}

/// Why a connect failed (the message is final: it reaches logs and errors as is).
pub(crate) enum ConnectError {
    /// The endpoint refused the credentials: retrying will not help until the config changes.
    Auth(String),
    /// Anything else.
    Other(String),
    /// Anything else, caused by `source` (whose text `message` already includes).
    Caused {
        /// What failed, with the cause's text.
        message: String,
        /// The cause.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl ConnectError {
    /// `what: {source}`, keeping `source` as the cause.
    pub fn caused(
        what: &str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> ConnectError {
        ConnectError::described(format!("{what}: {source}"), source)
    }

    /// `message` (which already describes `source`), keeping `source` as the cause.
    pub fn described(
        message: String,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> ConnectError {
        ConnectError::Caused {
            message,
            source: Box::new(source),
        }
    }
}

/// Opens connections for a tier's pools.
pub(crate) trait Connector: Send + Sync + 'static {
    /// An open connection.
    type Conn: Send + 'static;

    /// The settings of the tier's pools.
    fn settings(&self) -> &LinkSettings;

    /// Connects to `addr` and completes any handshake; the pool bounds it in time.
    fn open(
        self: Arc<Self>,
        addr: String,
    ) -> impl Future<Output = std::result::Result<Self::Conn, ConnectError>> + Send + 'static;

    /// The error for a connect that did not complete within `timeout`.
    fn timed_out(&self, timeout: Duration) -> String {
        format!("connect timed out after {} ms", timeout.as_millis())
    }
}

/// One request on a leased connection, for [`Pool::exec`]. It must be idempotent: when a
/// pooled connection turns out stale, the request runs again on a fresh one.
pub(crate) trait Exchange<C>: Sync {
    /// What the request produces.
    type Out: Send;

    /// Runs the request on `conn`. An I/O error leaves the connection unusable; any `Ok`
    /// leaves it at a reply boundary.
    fn run<'a>(
        &'a self,
        conn: &'a mut C,
    ) -> impl Future<Output = io::Result<Self::Out>> + Send + 'a;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Link {
    Unknown,
    Up,
    Down,
}

#[derive(Debug)]
struct Health {
    link: Link,
    next_attempt: Option<Instant>,
    backoff: Duration,
}

/// The connections to one endpoint and its link state.
pub(crate) struct Pool<K: Connector> {
    /// `host:port` of the endpoint.
    pub addr: String,
    connector: Arc<K>,
    idle: Mutex<Vec<K::Conn>>,
    permits: Semaphore,
    health: Mutex<Health>,
    probing: AtomicBool,
}

impl<K: Connector> std::fmt::Debug for Pool<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("addr", &self.addr).finish()
    }
}

/// A leased connection. Returned to the pool only after [`Lease::done`].
pub(crate) struct Lease<'a, K: Connector> {
    pool: &'a Pool<K>,
    conn: Option<K::Conn>,
    /// Whether the connection came from the pool (it may have gone stale).
    pub reused: bool,
    clean: bool,
    _permit: SemaphorePermit<'a>,
}

impl<K: Connector> Lease<'_, K> {
    /// The connection.
    pub fn conn(&mut self) -> &mut K::Conn {
        self.conn
            .as_mut()
            .expect("a lease holds its connection until dropped")
    }

    /// The request completed and the connection is at a reply boundary: keep it.
    pub fn done(mut self) {
        self.clean = true;
    }
}

impl<K: Connector> Drop for Lease<'_, K> {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            if self.clean {
                let mut idle = self.pool.idle.lock();
                if idle.len() < self.pool.settings().pool {
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

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl<K: Connector> Pool<K> {
    /// A pool to `addr`; connects nothing yet.
    pub fn new(addr: String, connector: Arc<K>) -> Pool<K> {
        Pool {
            addr,
            permits: Semaphore::new(connector.settings().pool),
            connector,
            idle: Mutex::new(Vec::new()),
            health: Mutex::new(Health {
                link: Link::Unknown,
                next_attempt: None,
                backoff: BACKOFF_INITIAL,
            }),
            probing: AtomicBool::new(false),
        }
    }

    fn settings(&self) -> &LinkSettings {
        self.connector.settings()
    }

    /// A tier error about this endpoint.
    pub fn error(&self, msg: impl std::fmt::Display) -> Error {
        let s = self.settings();
        Error::tier(&s.tier, format!("{} {}: {msg}", s.kind, self.addr))
    }

    /// A tier error about this endpoint caused by `source` (described in the message too).
    pub fn error_caused(
        &self,
        msg: impl std::fmt::Display,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Error {
        let s = self.settings();
        Error::tier_caused(&s.tier, format!("{} {}: {msg}", s.kind, self.addr), source)
    }

    /// A tier error for an I/O error on a connection to this endpoint.
    pub fn io_error(&self, e: io::Error) -> Error {
        self.error_caused(e.to_string(), e)
    }

    /// Leases a connection: an idle one, else a new one (unless in reconnect backoff).
    pub async fn acquire(&self) -> Result<Lease<'_, K>> {
        self.lease(true).await
    }

    /// Leases a connection: an idle one if `reuse`, else (or if none) a new one.
    async fn lease(&self, reuse: bool) -> Result<Lease<'_, K>> {
        let permit = self.permits.acquire().await.map_err(|_| Error::Closed)?;
        let idle = if reuse { self.idle.lock().pop() } else { None };
        let reused = idle.is_some();
        let conn = match idle {
            Some(c) => c,
            None => self.connect().await?,
        };
        Ok(Lease {
            pool: self,
            conn: Some(conn),
            reused,
            clean: false,
            _permit: permit,
        })
    }

    async fn connect(&self) -> Result<K::Conn> {
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
        let connector = self.connector.clone();
        let addr = self.addr.clone();
        let timeout = self.settings().connect_timeout;
        let task = super::io_runtime()?.spawn(async move {
            match tokio::time::timeout(timeout, connector.clone().open(addr)).await {
                Ok(r) => r,
                Err(_) => Err(ConnectError::Other(connector.timed_out(timeout))),
            }
        });
        let r = match task.await {
            Ok(r) => r,
            Err(e) => Err(ConnectError::caused("connect task failed", e)),
        };
        let counters = &self.settings().counters;
        match r {
            Ok(c) => {
                bump(&counters.connects);
                self.mark_up();
                Ok(c)
            }
            Err(e) => {
                bump(&counters.connect_failures);
                let (msg, source) = match e {
                    ConnectError::Auth(m) => {
                        bump(&counters.auth_failures);
                        (m, None)
                    }
                    ConnectError::Other(m) => (m, None),
                    ConnectError::Caused { message, source } => (message, Some(source)),
                };
                self.mark_connect_failed(&msg);
                Err(match source {
                    Some(source) => self.error_caused(msg, source),
                    None => self.error(msg),
                })
            }
        }
    }

    fn mark_up(&self) {
        let s = self.settings();
        let mut h = self.health.lock();
        match h.link {
            Link::Unknown => {
                tracing::info!(tier = %s.tier, addr = %self.addr, "connected to {}", s.kind)
            }
            Link::Down => {
                tracing::warn!(tier = %s.tier, addr = %self.addr, "reconnected to {}", s.kind)
            }
            Link::Up => {}
        }
        h.link = Link::Up;
        h.next_attempt = None;
        h.backoff = BACKOFF_INITIAL;
    }

    fn mark_connect_failed(&self, msg: &str) {
        let s = self.settings();
        let mut h = self.health.lock();
        let retry_ms = h.backoff.as_millis();
        match h.link {
            Link::Unknown => tracing::warn!(
                tier = %s.tier, addr = %self.addr, error = %msg, retry_ms,
                "{} unreachable; will keep retrying with backoff", s.kind
            ),
            Link::Up => tracing::warn!(
                tier = %s.tier, addr = %self.addr, error = %msg, retry_ms,
                "lost connection to {}; reconnecting with backoff", s.kind
            ),
            Link::Down => {
                tracing::debug!(tier = %s.tier, addr = %self.addr, error = %msg, "reconnect failed")
            }
        }
        h.link = Link::Down;
        h.next_attempt = Some(Instant::now() + h.backoff);
        h.backoff = (h.backoff * 2).min(s.retry_max);
    }

    /// Runs `req` on a pooled connection. A pooled connection that fails with an I/O error
    /// (stale after a server restart) is replaced by a fresh one, once; a protocol error
    /// (`InvalidData`) or a failure on a fresh connection is returned as a tier error.
    ///
    /// A stale connection says nothing about the server now, so the retry is not held back
    /// by the link's down state: marking the link down first would make concurrent
    /// requests that found stale connections too fail their retry ("reconnect in
    /// progress") while the first one reconnects. The link is marked down only when the
    /// fresh connection fails as well.
    pub async fn exec<E: Exchange<K::Conn>>(&self, req: &E) -> Result<E::Out> {
        let mut lease = self.acquire().await?;
        let retry = match req.run(lease.conn()).await {
            Ok(out) => {
                lease.done();
                return Ok(out);
            }
            Err(e) => {
                let stale = lease.reused && e.kind() != io::ErrorKind::InvalidData;
                drop(lease);
                if !stale {
                    self.io_failed(&e);
                    return Err(self.io_error(e));
                }
                self.dropped_stale(&e);
                // A fresh connection, never an idle one: an idle one may be as stale.
                self.lease(false).await
            }
        };
        let mut lease = retry?;
        match req.run(lease.conn()).await {
            Ok(out) => {
                lease.done();
                Ok(out)
            }
            Err(e) => {
                drop(lease);
                self.io_failed(&e);
                Err(self.io_error(e))
            }
        }
    }

    /// A pooled connection failed (`e`) where a fresh one will be tried: drop the idle
    /// connections (they likely share its fate: the server restarted or closed idle
    /// connections), without marking the link down.
    fn dropped_stale(&self, e: &io::Error) {
        let s = self.settings();
        bump(&s.counters.io_errors);
        self.idle.lock().clear();
        tracing::debug!(tier = %s.tier, addr = %self.addr, error = %e, "pooled connection was stale; retrying on a fresh one");
    }

    /// An established connection failed: drop the idle ones too (they likely share its
    /// fate: server restarted or gone), so the next request reconnects.
    pub fn io_failed(&self, e: &io::Error) {
        let s = self.settings();
        bump(&s.counters.io_errors);
        self.idle.lock().clear();
        let mut h = self.health.lock();
        if h.link == Link::Up {
            tracing::warn!(
                tier = %s.tier, addr = %self.addr, error = %e,
                "lost connection to {}; reconnecting", s.kind
            );
            h.link = Link::Down;
        }
    }

    /// Opens one connection in the background (startup probe, logs the link state).
    pub fn warm_up(self: &Arc<Self>) {
        let pool = self.clone();
        if let Ok(rt) = super::io_runtime() {
            rt.spawn(async move {
                if let Ok(lease) = pool.acquire().await {
                    lease.done();
                }
            });
        }
    }
}
