//! Helpers: run `kvtier-server` as a child process, talk HTTP to its admin port, make
//! deterministic prompts.
#![allow(dead_code)]

/// Child processes that die with the test (shared with the kvtier crate's tests).
#[path = "../../../kvtier/tests/support/process.rs"]
pub mod process;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kvtier::keys::ModelIdentity;
use kvtier::layout::{Dtype, KvLayout};
use serde_json::Value;

/// Tiny model: 128 bytes per token; with chunk_size 16, 2 KiB chunks.
pub fn identity() -> ModelIdentity {
    ModelIdentity::new("tiny-test", KvLayout::simple(2, 2, 8, Dtype::F16))
}

pub const BPT: usize = 128;
pub const CHUNK: usize = 16;

pub fn tokens(doc: u64, n: usize) -> Vec<u32> {
    (0..n as u64)
        .map(|i| ((doc.wrapping_mul(1_000_003) ^ i.wrapping_mul(7919)) % 128_000) as u32)
        .collect()
}

pub fn payload(doc: u64, n_tokens: usize) -> Vec<u8> {
    (0..n_tokens * BPT)
        .map(|i| {
            let x = (doc as usize).wrapping_mul(2654435761) ^ i.wrapping_mul(40503);
            (x ^ (x >> 11)) as u8
        })
        .collect()
}

pub struct Server {
    pub child: Child,
    pub dir: PathBuf,
    pub bound: Value,
    pub log: PathBuf,
    /// The admin token it was started with (`KVTIER_ADMIN_TOKEN`); [`Server::http`] sends it.
    pub admin_token: Option<String>,
}

impl Server {
    /// Starts `kvtier-server` with `yaml` as its config, in `dir`.
    pub fn start(dir: &Path, yaml: &str, extra: &[&str], envs: &[(&str, &str)]) -> Server {
        Server::start_with(dir, yaml, extra, envs, |_| {})
    }

    /// [`Server::start`] with a last say on the command (e.g. resource limits).
    pub fn start_with(
        dir: &Path,
        yaml: &str,
        extra: &[&str],
        envs: &[(&str, &str)],
        customize: impl FnOnce(&mut Command),
    ) -> Server {
        let cfg = dir.join("kvtier.yaml");
        std::fs::write(&cfg, yaml).unwrap();
        let ready = dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let n = (0..)
            .find(|i| !dir.join(format!("server-{i}.log")).exists())
            .unwrap();
        let log = dir.join(format!("server-{n}.log"));
        let logf = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvtier-server"));
        cmd.arg("--config")
            .arg(&cfg)
            .arg("--socket")
            .arg(dir.join("kv.sock"))
            .arg("--ready-file")
            .arg(&ready)
            .arg("--admin-port")
            .arg("0")
            .args(extra)
            .env_remove("KVTIER_AUTH_TOKEN")
            .env_remove("KVTIER_ADMIN_TOKEN")
            .stdout(Stdio::null())
            .stderr(logf);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let admin_token = envs
            .iter()
            .find(|(k, _)| *k == "KVTIER_ADMIN_TOKEN")
            .map(|(_, v)| v.to_string());
        customize(&mut cmd);
        let mut child = process::die_with_parent(&mut cmd)
            .spawn()
            .expect("spawning kvtier-server");
        let t0 = Instant::now();
        loop {
            if let Ok(s) = std::fs::read_to_string(&ready) {
                if let Ok(bound) = serde_json::from_str::<Value>(&s) {
                    return Server {
                        child,
                        dir: dir.to_path_buf(),
                        bound,
                        log,
                        admin_token,
                    };
                }
            }
            if let Some(st) = child.try_wait().unwrap() {
                panic!(
                    "server exited early ({st}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "server not ready");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn unix(&self) -> String {
        format!("unix:{}", self.bound["socket"].as_str().unwrap())
    }

    pub fn tcp(&self) -> String {
        format!("tcp:{}", self.bound["tcp"].as_str().unwrap())
    }

    pub fn admin(&self) -> String {
        self.bound["admin"].as_str().unwrap().to_string()
    }

    /// An admin request, with the server's admin token when it has one.
    pub fn http(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
        http_with(
            &self.admin(),
            method,
            path,
            body,
            self.admin_token.as_deref(),
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stats(&self) -> Value {
        let (code, body) = self.http("GET", "/stats", None);
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// SIGTERM and wait (at most 60 s).
    pub fn term(&mut self) -> ExitStatus {
        // SAFETY: signalling our own child process by pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "server did not stop"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Minimal HTTP/1.1 client (Connection: close), without credentials.
pub fn http(addr: &str, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
    http_with(addr, method, path, body, None)
}

/// [`http`] with `Authorization: Bearer <token>` when a token is given.
pub fn http_with(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
    token: Option<&str>,
) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let b = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
        b.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code: u16 = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (code, body)
}

/// Value of a metric line `name{labels} value` (labels must match exactly, or none).
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == name_and_labels).then(|| v.parse().ok())?
    })
}

pub fn base_yaml() -> String {
    format!("chunk_size: {CHUNK}\nmax_local_cpu_size: 32MiB\nlocal_cpu_huge_pages: false\n")
}

/// Resident memory of process `pid`, in bytes (`VmRSS`: anonymous, file and shared pages,
/// the L1 pool included once touched).
pub fn rss_bytes(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib << 10
}

/// Open file descriptors of process `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Runs `kvtier-server` with `args` until it exits (at most `limit`): its status and
/// stderr, or `None` (and it is killed) when it was still running.
pub fn run_server_to_exit(
    args: &[&str],
    envs: &[(&str, &str)],
    limit: Duration,
) -> Option<(ExitStatus, String)> {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr.log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvtier-server"));
    cmd.args(args)
        .env_remove("KVTIER_AUTH_TOKEN")
        .env_remove("KVTIER_ADMIN_TOKEN")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = process::ChildGuard::spawn(&mut cmd).unwrap();
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if let Some(st) = child.try_wait().unwrap() {
            return Some((st, std::fs::read_to_string(&log).unwrap_or_default()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Raises this test process's descriptor limit to its hard limit (floods open many sockets).
pub fn raise_fd_limit() -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
    }
    l.rlim_cur
}
