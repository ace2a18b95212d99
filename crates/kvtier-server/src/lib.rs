//! `kvtier serve`: one cache server per node shared by many engine processes.
//!
//! The server owns one [`EngineCore`] (L1 pool in shared memory, disk and remote tiers) and
//! attaches one engine per model identity its clients announce. Clients speak the
//! [`kvtier::transport::wire`] protocol on a Unix socket (mapping the pool for zero-copy
//! transfers) or on TCP (payload in frames, shared token when `KVTIER_AUTH_TOKEN` is set).
//! An admin HTTP listener ([`admin`]) serves health, Prometheus metrics, stats and cache
//! operations (those behind `KVTIER_ADMIN_TOKEN`). What clients can make the server hold
//! (connections, frame bytes, time) is bounded by [`Limits`].
#![warn(missing_docs)]

mod accept;
pub mod admin;
pub mod cli;
mod conn;
pub mod events;
mod fdpass;
mod handlers;
mod handshake;
mod io;
mod lease;
pub mod limits;
pub mod models;
mod peer;
pub mod socket;
mod state;
mod stoppable;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kvtier::memory::PoolBacking;
use kvtier::{EngineConfig, EngineCore};
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use state::ServerState;

pub use handshake::Transport;
pub use limits::Limits;
pub use models::Models;

/// Server settings (the engine's own come from [`EngineConfig`]).
#[derive(Clone)]
pub struct ServeConfig {
    /// Engine configuration (tiers, sizes, policy).
    pub engine: EngineConfig,
    /// Unix socket path (None: no Unix listener); [`socket::default_path`] by default.
    pub socket: Option<PathBuf>,
    /// TCP listen address.
    pub tcp: Option<SocketAddr>,
    /// Admin HTTP listen address.
    pub admin: Option<SocketAddr>,
    /// Put the pool in a private, unlinked file created in this directory instead of a
    /// memfd ([`kvtier::memory::shm_file`]).
    pub shm_dir: Option<PathBuf>,
    /// How long a store or retrieve lease lives without activity.
    pub lease_timeout: Duration,
    /// Largest frame body accepted.
    pub max_frame: usize,
    /// Shared token required on TCP.
    pub auth_token: Option<String>,
    /// Token guarding the admin endpoints that probe or change the cache.
    pub admin_token: Option<String>,
    /// Allow a non-loopback admin bind without an admin token (only the read-only
    /// endpoints are then usable).
    pub admin_insecure: bool,
    /// What clients can make the server hold.
    pub limits: Limits,
    /// How long shutdown waits for connections to finish their current request.
    pub shutdown_grace: Duration,
    /// How long shutdown waits for queued durable writes.
    pub flush_timeout: Duration,
    /// Rank for disk path sharding.
    pub rank: u32,
    /// Server name in handshakes.
    pub name: String,
    /// Write a JSON file with the bound addresses once listening.
    pub ready_file: Option<PathBuf>,
    /// KV-event stream of what L1 holds (vLLM's format); off by default.
    pub kv_events: events::KvEventsConfig,
}

impl std::fmt::Debug for ServeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeConfig")
            .field("socket", &self.socket)
            .field("tcp", &self.tcp)
            .field("admin", &self.admin)
            .field("shm_dir", &self.shm_dir)
            .field("lease_timeout", &self.lease_timeout)
            .field("max_frame", &self.max_frame)
            .field(
                "auth_token",
                &self.auth_token.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "admin_token",
                &self.admin_token.as_ref().map(|_| "<redacted>"),
            )
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl ServeConfig {
    /// Defaults around an engine config: socket [`socket::default_path`]
    /// (`/run/kvtier/kvtier.sock` for root), memfd pool, 30 s leases.
    pub fn new(engine: EngineConfig) -> ServeConfig {
        ServeConfig {
            engine,
            socket: Some(socket::default_path()),
            tcp: None,
            admin: None,
            shm_dir: None,
            lease_timeout: Duration::from_secs(30),
            max_frame: kvtier::transport::wire::DEFAULT_MAX_FRAME,
            auth_token: None,
            admin_token: None,
            admin_insecure: false,
            limits: Limits::default(),
            shutdown_grace: Duration::from_secs(10),
            flush_timeout: Duration::from_secs(60),
            rank: 0,
            name: format!("kvtier-{}", env!("CARGO_PKG_VERSION")),
            ready_file: None,
            kv_events: events::KvEventsConfig::default(),
        }
    }
}

/// Where a running server listens.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Bound {
    /// Unix socket path.
    pub socket: Option<PathBuf>,
    /// TCP address.
    pub tcp: Option<SocketAddr>,
    /// Admin HTTP address.
    pub admin: Option<SocketAddr>,
    /// Server process id.
    pub pid: u32,
    /// KV-event PUB endpoint, when the stream is on.
    #[serde(default)]
    pub kv_events: Option<String>,
    /// KV-event replay (ROUTER) endpoint, when the stream has one.
    #[serde(default)]
    pub kv_events_replay: Option<String>,
}

/// Runs a server until SIGTERM/SIGINT (or `stop` turning true): stops accepting, lets
/// in-flight requests finish, flushes durable writes, removes the socket.
pub async fn serve(cfg: ServeConfig, mut stop: Option<watch::Receiver<bool>>) -> Result<()> {
    let backing = cfg
        .shm_dir
        .clone()
        .map_or(PoolBacking::Memfd, PoolBacking::ShmDir);
    let core = tokio::task::block_in_place(|| {
        EngineCore::open(cfg.engine.clone(), cfg.rank, backing.clone())
    })
    .context("opening the engine")?;
    let models = Models::new(core.clone());
    let kv_events = if cfg.kv_events.enabled() {
        let c = cfg.kv_events.clone();
        let core = core.clone();
        Some(tokio::task::block_in_place(|| {
            events::EventStream::start(&core, c)
        })?)
    } else {
        None
    };
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let state = Arc::new(ServerState {
        models: models.clone(),
        name: cfg.name.clone(),
        auth_token: cfg.auth_token.clone().filter(|t| !t.is_empty()),
        pool_fd: core.manager().pool().raw_fd(),
        max_frame: cfg.max_frame,
        lease_timeout: cfg.lease_timeout,
        shutdown: shutdown_rx.clone(),
        active: AtomicUsize::new(0),
        idle: Notify::new(),
        expired_leases: AtomicU64::new(0),
        gates: limits::Gates::new(cfg.limits.clone(), cfg.max_frame),
    });

    // The socket file is removed when `serve` returns (if it is still ours).
    let (unix, _socket_file) = match &cfg.socket {
        Some(p) => {
            let (l, f) = socket::bind(p)?;
            (Some(l), Some(f))
        }
        None => (None, None),
    };
    let tcp = match cfg.tcp {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("binding TCP {a}"))?,
        ),
        None => None,
    };
    let tcp_addr = tcp.as_ref().map(|l| l.local_addr()).transpose()?;
    if let Some(a) = tcp_addr {
        if state.auth_token.is_none() {
            let who = if a.ip().is_loopback() {
                "every local user"
            } else {
                "anyone who can reach it"
            };
            warn!(%a, "TCP listener without KVTIER_AUTH_TOKEN: {who} can read and wipe the cache; set KVTIER_AUTH_TOKEN");
        }
    }
    let admin_token = cfg.admin_token.clone().filter(|t| !t.is_empty());
    let admin = match cfg.admin {
        Some(a) => {
            check_admin_bind(a, admin_token.is_some(), cfg.admin_insecure)?;
            Some(admin::spawn_admin(models.clone(), a, admin_token)?)
        }
        None => None,
    };
    let bound = Bound {
        socket: cfg.socket.clone(),
        tcp: tcp_addr,
        admin: admin.as_ref().map(|a| a.local_addr()),
        pid: std::process::id(),
        kv_events: kv_events.as_ref().map(|e| e.endpoints().publish.clone()),
        kv_events_replay: kv_events
            .as_ref()
            .and_then(|e| e.endpoints().replay.clone()),
    };
    info!(
        socket = ?bound.socket,
        tcp = ?bound.tcp,
        admin = ?bound.admin,
        pool_bytes = core.manager().pool().capacity(),
        // Committed at start with local_cpu_prefault, else as the pool fills (GET /stats).
        pool_committed = ?core.manager().pool().committed_bytes(),
        tiers = ?core.manager().tier_names(),
        auth = state.auth_token.is_some(),
        "kvtier server listening"
    );
    if let Some(f) = &cfg.ready_file {
        let tmp = f.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&bound)?)?;
        std::fs::rename(&tmp, f)?;
    }

    let mut accepts = Vec::new();
    if let Some(l) = unix {
        accepts.push(accept::spawn_accept_loop(
            l,
            state.clone(),
            shutdown_rx.clone(),
            conn::serve_unix,
        ));
    }
    if let Some(l) = tcp {
        accepts.push(accept::spawn_accept_loop(
            l,
            state.clone(),
            shutdown_rx.clone(),
            conn::serve_tcp,
        ));
    }

    wait_for_signal(stop.as_mut()).await?;
    info!("shutting down: no new connections; finishing in-flight requests");
    let _ = shutdown_tx.send(true);
    for a in accepts {
        let _ = a.await;
    }
    wait_for_connections(&state, cfg.shutdown_grace).await;
    flush_before_exit(&models, cfg.flush_timeout).await?;
    if let Some(a) = admin {
        a.shutdown();
    }
    if let Some(e) = kv_events {
        tokio::task::block_in_place(|| e.shutdown());
    }
    info!("kvtier server stopped");
    Ok(())
}

/// Refuses an admin bind other users of other machines could reach without a token:
/// anyone there could otherwise wipe or probe the cache.
fn check_admin_bind(addr: SocketAddr, has_token: bool, insecure: bool) -> Result<()> {
    if addr.ip().is_loopback() || has_token {
        return Ok(());
    }
    if insecure {
        warn!(%addr, "admin HTTP on a non-loopback address without an admin token (--admin-insecure): \
               only /health, /metrics and /stats answer");
        return Ok(());
    }
    bail!(
        "the admin port would listen on {addr} without an admin token; set {} \
         (or --admin-token-file FILE), bind it to loopback (--admin-host 127.0.0.1), \
         or pass --admin-insecure to expose only /health, /metrics and /stats",
        admin::ADMIN_TOKEN_ENV
    )
}

/// Waits, at most `grace`, for the open connections to finish their current request.
async fn wait_for_connections(state: &ServerState, grace: Duration) {
    let deadline = Instant::now() + grace;
    while state.active.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
        let notified = state.idle.notified();
        let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
    }
    let left = state.active.load(Ordering::Acquire);
    if left > 0 {
        warn!(connections = left, "grace period over; closing the rest");
    }
}

/// Waits, at most `timeout`, for the queued lower-tier writes.
async fn flush_before_exit(models: &Models, timeout: Duration) -> Result<()> {
    let eng = models.any()?;
    let flushed = tokio::task::spawn_blocking(move || eng.flush(timeout)).await?;
    if flushed {
        info!("durable writes flushed");
    } else {
        warn!(?timeout, "queued writes did not all finish in time");
    }
    Ok(())
}

async fn wait_for_signal(stop: Option<&mut watch::Receiver<bool>>) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let stopped = async move {
        match stop {
            Some(rx) => {
                while !*rx.borrow() {
                    if rx.changed().await.is_err() {
                        break;
                    }
                }
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
        _ = stopped => info!("stop requested"),
    }
    Ok(())
}

/// Runs a server on a fresh multi-threaded runtime (the entry point of `kvtier serve`).
pub fn run(cfg: ServeConfig) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kvtier-serve")
        .build()
        .context("starting the server runtime")?;
    rt.block_on(serve(cfg, None))
}
