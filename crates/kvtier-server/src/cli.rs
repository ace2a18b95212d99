//! Command-line options of `kvtier serve` (shared by the `kvtier` CLI and the
//! `kvtier-server` binary).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use clap::Args;
use kvtier::EngineConfig;

use crate::ServeConfig;

/// Options of `kvtier serve`. The shared token comes from `KVTIER_AUTH_TOKEN` only (never
/// a flag: flags show in `ps`).
#[derive(Clone, Debug, Args)]
pub struct ServeArgs {
    /// Engine config file (YAML); `KVTIER_<KEY>` environment overrides apply too.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Unix socket path for local clients [default: /run/kvtier/kvtier.sock as root, else
    /// $XDG_RUNTIME_DIR/kvtier/kvtier.sock].
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Do not listen on a Unix socket.
    #[arg(long)]
    pub no_socket: bool,
    /// Also listen on TCP (host:port; port 0 picks one).
    #[arg(long)]
    pub tcp: Option<SocketAddr>,
    /// Admin HTTP port [default: the config's admin_port; none when unset].
    #[arg(long)]
    pub admin_port: Option<u16>,
    /// Admin HTTP bind address.
    #[arg(long, default_value = "127.0.0.1")]
    pub admin_host: std::net::IpAddr,
    /// Keep the L1 pool in a private file created in this directory (e.g. /dev/shm or a
    /// hugetlbfs mount) and unlinked at once, instead of a memfd; clients get its descriptor
    /// either way.
    #[arg(long)]
    pub shm_dir: Option<PathBuf>,
    /// Seconds a store/retrieve lease lives without activity before it is released.
    #[arg(long, default_value_t = 30.0)]
    pub lease_timeout_sec: f64,
    /// Largest frame body accepted, in MiB.
    #[arg(long, default_value_t = 65)]
    pub max_frame_mib: usize,
    /// Seconds shutdown waits for connections to finish their request.
    #[arg(long, default_value_t = 10.0)]
    pub shutdown_grace_sec: f64,
    /// Seconds shutdown waits for queued durable writes.
    #[arg(long, default_value_t = 60.0)]
    pub flush_timeout_sec: f64,
    /// Rank used for disk path sharding.
    #[arg(long, default_value_t = 0)]
    pub rank: u32,
    /// Write the bound addresses (JSON) to this file once listening.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
}

fn secs(v: f64, flag: &str) -> Result<Duration> {
    ensure!(
        v.is_finite() && v > 0.0 && v < 1e7,
        "{flag} must be a positive number of seconds"
    );
    Ok(Duration::from_secs_f64(v))
}

impl ServeArgs {
    /// Resolves the options into a server config.
    pub fn to_config(&self) -> Result<ServeConfig> {
        let engine =
            EngineConfig::load(self.config.as_deref()).context("loading the engine config")?;
        let admin_port = self.admin_port.or(engine.admin_port);
        ensure!(
            self.max_frame_mib >= 1,
            "--max-frame-mib must be at least 1"
        );
        let mut cfg = ServeConfig::new(engine);
        cfg.socket = (!self.no_socket).then(|| {
            self.socket
                .clone()
                .unwrap_or_else(crate::socket::default_path)
        });
        ensure!(
            cfg.socket.is_some() || self.tcp.is_some(),
            "--no-socket needs --tcp: the server must listen somewhere"
        );
        cfg.tcp = self.tcp;
        cfg.admin = admin_port.map(|p| SocketAddr::new(self.admin_host, p));
        cfg.shm_dir = self.shm_dir.clone();
        cfg.lease_timeout = secs(self.lease_timeout_sec, "--lease-timeout-sec")?;
        cfg.max_frame = self.max_frame_mib << 20;
        cfg.shutdown_grace = secs(self.shutdown_grace_sec, "--shutdown-grace-sec")?;
        cfg.flush_timeout = secs(self.flush_timeout_sec, "--flush-timeout-sec")?;
        cfg.auth_token = std::env::var("KVTIER_AUTH_TOKEN")
            .ok()
            .filter(|t| !t.is_empty());
        cfg.rank = self.rank;
        cfg.ready_file = self.ready_file.clone();
        Ok(cfg)
    }
}

/// Runs `kvtier serve`.
pub fn run(args: &ServeArgs) -> Result<()> {
    crate::run(args.to_config()?)
}
