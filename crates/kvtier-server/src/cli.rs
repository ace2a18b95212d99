//! Command-line options of `kvtier serve` (shared by the `kvtier` CLI and the
//! `kvtier-server` binary).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use clap::Args;
use kvtier::EngineConfig;

use crate::{Limits, ServeConfig};

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
    /// Largest frame body accepted, in MiB (1 to 4095: frame lengths are 32-bit).
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
    /// Read the admin token from this file instead of `KVTIER_ADMIN_TOKEN` (first line).
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    /// Allow a non-loopback --admin-host without an admin token (then only /health,
    /// /metrics and /stats answer).
    #[arg(long)]
    pub admin_insecure: bool,
    /// Most client connections open at once (Unix socket and TCP together).
    #[arg(long, default_value_t = Limits::default().max_connections)]
    pub max_connections: usize,
    /// Most connections still waiting for their Hello (the longest waiting is dropped).
    #[arg(long, default_value_t = Limits::default().max_handshakes)]
    pub max_handshakes: usize,
    /// MiB of large frame bodies all connections may hold at once (at least one frame).
    #[arg(long, default_value_t = Limits::default().max_inflight >> 20)]
    pub max_inflight_mib: usize,
    /// Seconds a connection may stay silent, holding nothing, before it is closed.
    #[arg(long, default_value_t = Limits::default().idle_timeout.as_secs_f64())]
    pub idle_timeout_sec: f64,
    /// Seconds a frame body may take to arrive once it started.
    #[arg(long, default_value_t = Limits::default().frame_timeout.as_secs_f64())]
    pub frame_timeout_sec: f64,
    /// KV events of what L1 holds, in vLLM's format: a JSON object with vLLM's
    /// `--kv-events-config` keys, e.g. '{"enable_kv_cache_events": true, "endpoint":
    /// "tcp://*:5557", "replay_endpoint": "tcp://*:5558", "topic": "kv-events"}' [default: off].
    #[arg(long, env = "KVTIER_KV_EVENTS_CONFIG")]
    pub kv_events_config: Option<String>,
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
        // Frame lengths are 32-bit on the wire (and a larger value would wrap when shifted).
        ensure!(
            (1..=4095).contains(&self.max_frame_mib),
            "--max-frame-mib must be between 1 and 4095 (got {})",
            self.max_frame_mib
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
        cfg.admin_token = self.admin_token()?;
        cfg.admin_insecure = self.admin_insecure;
        cfg.limits = self.limits()?;
        if let Some(j) = &self.kv_events_config {
            cfg.kv_events = crate::events::KvEventsConfig::from_json(j)?;
        }
        Ok(cfg)
    }

    /// The admin token: from --admin-token-file, else `KVTIER_ADMIN_TOKEN`.
    fn admin_token(&self) -> Result<Option<String>> {
        let Some(f) = &self.admin_token_file else {
            return Ok(crate::admin::token_from_env());
        };
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("reading --admin-token-file {}", f.display()))?;
        let token = text.lines().next().unwrap_or("").trim().to_string();
        ensure!(
            !token.is_empty(),
            "--admin-token-file {} is empty: write the token on its first line",
            f.display()
        );
        Ok(Some(token))
    }

    fn limits(&self) -> Result<Limits> {
        ensure!(
            self.max_connections >= 1 && self.max_handshakes >= 1,
            "--max-connections and --max-handshakes must be at least 1"
        );
        ensure!(
            (1..=1 << 20).contains(&self.max_inflight_mib),
            "--max-inflight-mib must be between 1 and 1048576"
        );
        Ok(Limits {
            max_connections: self.max_connections,
            max_handshakes: self.max_handshakes,
            max_inflight: self.max_inflight_mib << 20,
            idle_timeout: secs(self.idle_timeout_sec, "--idle-timeout-sec")?,
            frame_timeout: secs(self.frame_timeout_sec, "--frame-timeout-sec")?,
        })
    }
}

/// Runs `kvtier serve`.
pub fn run(args: &ServeArgs) -> Result<()> {
    crate::run(args.to_config()?)
}
