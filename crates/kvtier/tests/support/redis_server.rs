//! Test harness: real `redis-server` processes on free loopback ports, killed on drop and
//! when the test process dies.
//!
//! Include with `#[path = "support/redis_server.rs"] mod redis_server;`. When `redis-server`
//! is not installed, [`RedisServer::start`] prints `SKIPPED: redis-server ...` and returns
//! `None`, or fails the test under `KVTIER_REQUIRE_TEST_SERVERS=1` (see `prereq.rs`; CI
//! installs it with `apt-get install -y redis-server redis-tools`).
#![allow(dead_code)]

#[path = "prereq.rs"]
mod prereq;
#[path = "process.rs"]
mod process;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use prereq::find_bin;

/// How to install the servers these tests run.
const INSTALL: &str = "install it with `apt-get install -y redis-server redis-tools`";

/// Whether the tests can run; reports the missing server when not (see [`prereq::missing`]).
pub fn available() -> bool {
    if find_bin("redis-server").is_some() {
        true
    } else {
        prereq::missing("redis-server not found", INSTALL);
        false
    }
}

/// A free loopback port `p` (with `p + 10000` free too, for the cluster bus).
pub fn free_port() -> u16 {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let p = l.local_addr().unwrap().port();
        if p < 55_000 && TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return p;
        }
    }
}

/// Whether this redis-server was built with TLS; prints the skip message when not.
pub fn tls_available() -> bool {
    let Some(bin) = find_bin("redis-server") else {
        return available();
    };
    // A TLS build rejects the missing certificate; a build without TLS the directive itself.
    let out = Command::new(bin)
        .args([
            "--port",
            "0",
            "--tls-port",
            "1",
            "--tls-cert-file",
            "/nonexistent",
        ])
        .output();
    let text = match out {
        Ok(o) => format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(_) => String::new(),
    };
    if text.contains("Bad directive") || text.contains("not compiled") || text.is_empty() {
        prereq::missing(
            "this redis-server has no TLS support",
            "install one built with TLS (Debian's and Ubuntu's redis-server 6+ are)",
        );
        false
    } else {
        true
    }
}

/// A running `redis-server`.
pub struct RedisServer {
    child: Option<Child>,
    /// Its port on 127.0.0.1 (the TLS port for a TLS server, which has no plaintext port).
    pub port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
    tls: bool,
}

/// Sends one inline command on a fresh connection and returns the first reply line.
pub fn raw_command(port: u16, cmd: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_millis(500),
    )?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(format!("{cmd}\r\n").as_bytes())?;
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

impl RedisServer {
    /// Starts a server with extra arguments (e.g. `["--requirepass", "pw"]`); `None` (after
    /// printing the skip message) when redis-server is not installed.
    pub fn start(extra: &[&str]) -> Option<RedisServer> {
        if !available() {
            return None;
        }
        Some(RedisServer::launch(extra, false))
    }

    /// Starts a TLS-only server (`--port 0 --tls-port <port>`); `extra` names the
    /// certificate files. `None` (after printing why) without redis-server or TLS support.
    pub fn start_tls(extra: &[&str]) -> Option<RedisServer> {
        if !available() || !tls_available() {
            return None;
        }
        Some(RedisServer::launch(extra, true))
    }

    /// Starts a server on a free port (TLS-only when `tls`).
    fn launch(extra: &[&str], tls: bool) -> RedisServer {
        let mut s = RedisServer {
            child: None,
            port: free_port(),
            // Under the target directory, where tools/no_leftover_processes.sh looks.
            dir: tempfile::Builder::new()
                .prefix("redis-")
                .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
                .expect("temp dir"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            tls,
        };
        s.spawn();
        s
    }

    /// Working directory of the server.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn spawn(&mut self) {
        let bin = find_bin("redis-server").expect("redis-server");
        let port = self.port.to_string();
        // No TLS directive for plaintext servers: builds without TLS reject it.
        let ports: Vec<&str> = if self.tls {
            vec!["--port", "0", "--tls-port", &port]
        } else {
            vec!["--port", &port]
        };
        let mut cmd = Command::new(bin);
        // Dies with the test process too: a static or leaked guard never outlives the run.
        let child = process::die_with_parent(&mut cmd)
            .current_dir(self.dir.path())
            .args(ports)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--protected-mode", "no"])
            .args(["--logfile", "redis.log"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning redis-server");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(15) {
            // A TLS port cannot be PINGed in plaintext: accepting connections is enough.
            let addr = format!("127.0.0.1:{}", self.port).parse().unwrap();
            if self.tls && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            if let Ok(r) = raw_command(self.port, "PING") {
                // A password-protected server answers NOAUTH: it is up.
                if r.starts_with("+PONG") || r.starts_with("-NOAUTH") {
                    return;
                }
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    let log = std::fs::read_to_string(self.dir.path().join("redis.log"))
                        .unwrap_or_default();
                    panic!(
                        "redis-server exited ({status}) on port {}:\n{log}",
                        self.port
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not answer PING", self.port);
    }

    /// `redis://127.0.0.1:<port>` plus `suffix` (e.g. `"/0?prefix=t:"`).
    pub fn url(&self, suffix: &str) -> String {
        format!("redis://127.0.0.1:{}{suffix}", self.port)
    }

    /// Kills the server (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port and directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Runs `redis-cli -p <port> args...` and returns its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let bin = find_bin("redis-cli").expect("redis-cli");
        let out = Command::new(bin)
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("running redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of `n` masters (no replicas) on loopback.
pub struct RedisCluster {
    /// The masters.
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `n` cluster-enabled servers and joins them with `redis-cli --cluster create`.
    pub fn start(n: usize) -> Option<RedisCluster> {
        if !available() {
            return None;
        }
        if find_bin("redis-cli").is_none() {
            prereq::missing("redis-cli not found", INSTALL);
            return None;
        }
        let args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "5000",
        ];
        let nodes: Vec<RedisServer> = (0..n)
            .map(|_| RedisServer::start(&args).expect("redis-server"))
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        let out = Command::new(find_bin("redis-cli").unwrap())
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let t0 = Instant::now();
        loop {
            let ok = nodes
                .iter()
                .all(|s| s.cli(&["cluster", "info"]).contains("cluster_state:ok"));
            if ok {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "cluster never became ok"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(RedisCluster { nodes })
    }

    /// `redis+cluster://` URL naming the first node as the only seed, plus `suffix`.
    pub fn url(&self, suffix: &str) -> String {
        format!("redis+cluster://127.0.0.1:{}{suffix}", self.nodes[0].port)
    }
}
