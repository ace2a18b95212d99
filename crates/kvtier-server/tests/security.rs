//! A hostile or careless local user against the server's shared memory and its socket
//! (issue 12, rows 2 and 6, and the oversized-pool warning of row 9). The attacker is a real
//! second user: the tests run as root (as CI does) and drop to uid/gid 65534 in child
//! processes (`Command::uid`, which also clears supplementary groups).

mod common;

#[path = "../../kvtier/tests/support/prereq.rs"]
mod prereq;

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use kvtier::KvCache;
use kvtier_client::{ClientOptions, KvClient};

/// The unprivileged user the attacks run as.
const NOBODY: u32 = 65534;

/// Whether the test can switch users; reports a skip (or a failure in CI) when it cannot.
fn root_or_skip() -> bool {
    // SAFETY: geteuid never fails.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    prereq::missing(
        "root (this test acts as a second, unprivileged user)",
        "run the tests as root, as CI does",
    );
    false
}

/// Runs `script` with `sh` as uid/gid 65534; panics unless it succeeds.
fn as_nobody(script: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "`{script}` as uid {NOBODY}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn set_mode(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A directory on the shared-memory file system (`/dev/shm` when there is one), mode 1777
/// like `/dev/shm` itself: every user may create files in it.
fn shared_dir() -> tempfile::TempDir {
    let d = if Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm").unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    set_mode(d.path(), 0o1777);
    d
}

/// A directory owned by the unprivileged user.
fn nobodys_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(d.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    d
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// How to start a server for these tests.
struct Launch<'a> {
    dir: &'a Path,
    yaml: String,
    /// `--socket` (None: the default place).
    socket: Option<PathBuf>,
    args: Vec<OsString>,
    envs: Vec<(&'a str, OsString)>,
    uid: Option<u32>,
    umask: Option<libc::mode_t>,
}

impl<'a> Launch<'a> {
    fn new(dir: &'a Path) -> Launch<'a> {
        Launch {
            dir,
            yaml: base_yaml(),
            socket: Some(dir.join("kv.sock")),
            args: Vec::new(),
            envs: Vec::new(),
            uid: None,
            umask: None,
        }
    }

    fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    /// Starts the server; `gate` runs with its pid before it does anything (it waits on its
    /// stdin in a shell that then `exec`s it, so the pid stays the same). `Err(log)` when it
    /// exits before it is ready.
    fn start_gated(self, gate: impl FnOnce(u32)) -> Result<Server, String> {
        let cfg = self.dir.join("kvtier.yaml");
        std::fs::write(&cfg, &self.yaml).unwrap();
        set_mode(&cfg, 0o644);
        let ready = self.dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let n = (0..)
            .find(|i| !self.dir.join(format!("server-{i}.log")).exists())
            .unwrap();
        let log = self.dir.join(format!("server-{n}.log"));
        let logf = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("read _go; exec \"$0\" \"$@\"")
            .arg(env!("CARGO_BIN_EXE_kvtier-server"))
            .arg("--config")
            .arg(&cfg)
            .arg("--ready-file")
            .arg(&ready)
            .arg("--admin-port")
            .arg("0");
        if let Some(s) = &self.socket {
            cmd.arg("--socket").arg(s);
        }
        cmd.args(&self.args)
            .env_remove("KVTIER_AUTH_TOKEN")
            .env("KVTIER_LOG", "debug")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(logf);
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        if let Some(u) = self.uid {
            cmd.uid(u).gid(u);
        }
        if let Some(m) = self.umask {
            // SAFETY: umask is async-signal-safe and only affects the child.
            unsafe {
                cmd.pre_exec(move || {
                    libc::umask(m);
                    Ok(())
                })
            };
        }
        let mut child = process::die_with_parent(&mut cmd).spawn().unwrap();
        gate(child.id());
        child.stdin.take().unwrap().write_all(b"go\n").unwrap();
        let t0 = Instant::now();
        loop {
            if let Ok(s) = std::fs::read_to_string(&ready) {
                if let Ok(bound) = serde_json::from_str(&s) {
                    return Ok(Server {
                        child,
                        dir: self.dir.to_path_buf(),
                        bound,
                        log,
                        admin_token: None,
                    });
                }
            }
            if child.try_wait().unwrap().is_some() {
                return Err(std::fs::read_to_string(&log).unwrap_or_default());
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "server not ready");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn start(self) -> Result<Server, String> {
        self.start_gated(|_| {})
    }
}

fn client(addr: &str, opts: ClientOptions) -> kvtier::Result<KvClient> {
    KvClient::connect_with(addr, identity(), opts)
}

/// Stores a document over shared memory and reads it back.
fn roundtrip_shm(addr: &str) {
    let c = client(addr, ClientOptions::default()).unwrap();
    assert!(
        c.server_info().shared_memory,
        "the pool descriptor was passed"
    );
    let (t, p) = (tokens(7, 64), payload(7, 64));
    assert_eq!(c.store(&t, None, &p).unwrap().stored_tokens, 64);
    let mut out = vec![0u8; p.len()];
    assert_eq!(c.retrieve(&t, None, &mut out).unwrap().hit_tokens, 64);
    assert_eq!(out, p);
}

/// Row 2: the pool's name is unpredictable and nothing planted is ever opened. Versions
/// before used `<shm-dir>/kvtier-pool-<pid>`, opened without O_EXCL/O_NOFOLLOW: the attacker
/// plants that name before the server starts (the test holds the server at its first
/// instruction, as a patient attacker watching pids would get it).
#[test]
fn planted_pool_files_and_symlinks_are_never_opened() {
    if !root_or_skip() {
        return;
    }
    let shm = shared_dir();
    let work = tempfile::tempdir().unwrap();
    let victim = work.path().join("victim");
    std::fs::write(&victim, b"root's precious file").unwrap();
    set_mode(work.path(), 0o755);

    // A symlink where the pool goes: root would truncate and regrow the victim.
    let mut s = Launch::new(work.path())
        .arg("--shm-dir")
        .arg(shm.path())
        .start_gated(|pid| {
            as_nobody(&format!(
                "ln -s {} {}/kvtier-pool-{pid}",
                victim.display(),
                shm.path().display()
            ));
        })
        .unwrap_or_else(|log| panic!("server refused to start: {log}"));
    roundtrip_shm(&s.unix());
    assert_eq!(std::fs::read(&victim).unwrap(), b"root's precious file");
    let planted = shm.path().join(format!("kvtier-pool-{}", s.child.id()));
    assert!(std::fs::symlink_metadata(&planted).unwrap().is_symlink());
    assert_eq!(
        entries(shm.path()),
        vec![format!("kvtier-pool-{}", s.child.id())],
        "the server's own pool file is unlinked once created"
    );
    s.term();

    // A world-readable file where the pool goes: the attacker would read and rewrite the KV.
    let mut s = Launch::new(work.path())
        .arg("--shm-dir")
        .arg(shm.path())
        .start_gated(|pid| {
            as_nobody(&format!(
                "umask 0; : > {}/kvtier-pool-{pid}",
                shm.path().display()
            ));
        })
        .unwrap_or_else(|log| panic!("server refused to start: {log}"));
    roundtrip_shm(&s.unix());
    let planted = shm.path().join(format!("kvtier-pool-{}", s.child.id()));
    let md = std::fs::metadata(&planted).unwrap();
    assert_eq!(
        (md.uid(), md.len()),
        (NOBODY, 0),
        "the planted file is untouched"
    );
    assert_eq!(
        as_nobody(&format!("wc -c < {}", planted.display())).trim(),
        "0"
    );
    s.term();
}

/// Field 22 of /proc/self/stat (start time in clock ticks after boot).
fn own_start_time() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 1..];
    after.split_whitespace().nth(19).unwrap().parse().unwrap()
}

/// Row 2: pool files left by dead servers are removed at start; nothing else is: not a
/// live server's, not another user's, not a stranger's name.
#[test]
fn stale_pool_files_of_dead_servers_are_removed_at_start() {
    if !root_or_skip() {
        return;
    }
    let shm = shared_dir();
    let work = tempfile::tempdir().unwrap();
    let mut gone = Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let (me, start) = (std::process::id(), own_start_time());
    let put = |name: &str| std::fs::write(shm.path().join(name), vec![7u8; 1 << 16]).unwrap();
    // Stale: an old-style name of a dead pid; a live pid with another start time (reused).
    put(&format!("kvtier-pool-{dead}"));
    put(&format!("kvtier-pool-{me}-{}-00000000000000aa", start + 1));
    // Kept: a live creator (this test), a stranger's name, another user's file.
    let live = format!("kvtier-pool-{me}-{start}-00000000000000bb");
    put(&live);
    put("kvtier-pool-notes");
    let foreign = format!("kvtier-pool-{dead}-1-00000000000000cc");
    as_nobody(&format!(": > {}/{foreign}", shm.path().display()));

    let mut s = Launch::new(work.path())
        .arg("--shm-dir")
        .arg(shm.path())
        .start()
        .unwrap_or_else(|log| panic!("server refused to start: {log}"));
    let mut want = vec![live, "kvtier-pool-notes".to_string(), foreign];
    want.sort();
    assert_eq!(entries(shm.path()), want);
    let log = s.log_text();
    assert_eq!(
        log.matches("removed the pool file of a server that is no longer running")
            .count(),
        2,
        "{log}"
    );
    s.term();
}

/// Row 9: a shm-dir pool the file system cannot hold is refused (pages past its free space
/// would SIGBUS the server once the pool fills), with the figures.
#[test]
fn shm_pool_larger_than_the_free_space_is_refused() {
    let shm = shared_dir();
    let work = tempfile::tempdir().unwrap();
    // SAFETY: zeroed statvfs is a valid out-parameter; the path is NUL-terminated.
    let mut sv: libc::statvfs = unsafe { std::mem::zeroed() };
    let c = std::ffi::CString::new(shm.path().to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut sv) }, 0);
    let free = sv.f_bavail * sv.f_frsize;
    let mut l = Launch::new(work.path()).arg("--shm-dir").arg(shm.path());
    l.yaml = format!(
        "{}max_local_cpu_size: {}MiB\nlocal_cpu_prefault: false\n",
        l.yaml.replace("max_local_cpu_size: 32MiB\n", ""),
        (free >> 20) + 1024
    );
    let log = match l.start() {
        Ok(mut s) => {
            s.term();
            panic!("a pool larger than the free space of its file system was accepted")
        }
        Err(log) => log,
    };
    assert!(
        log.contains("has only") && log.contains("free") && log.contains("SIGBUS"),
        "{log}"
    );
    assert!(entries(shm.path()).is_empty(), "nothing left behind");
}

/// Row 9: a pool larger than the machine's memory starts, with a warning saying the
/// figures.
#[test]
fn pool_larger_than_the_machine_warns_with_the_figures() {
    let work = tempfile::tempdir().unwrap();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kb: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    let mut l = Launch::new(work.path());
    // Sparse memfd, never touched: no memory is used (prefault off, huge pages off).
    l.yaml = format!(
        "{}max_local_cpu_size: {}MiB\nlocal_cpu_prefault: false\n",
        l.yaml.replace("max_local_cpu_size: 32MiB\n", ""),
        (kb >> 10) + 1024
    );
    let mut s = l
        .start()
        .unwrap_or_else(|log| panic!("server refused to start: {log}"));
    let log = s.log_text();
    assert!(
        log.contains("larger than the machine's memory (MemTotal") && log.contains("GiB"),
        "{log}"
    );
    s.term();
}

/// Row 6: a client sends nothing to a server run by another uid (an impostor on a socket
/// path it could take), unless told to trust that uid.
#[test]
fn client_refuses_a_server_run_by_another_user() {
    if !root_or_skip() {
        return;
    }
    let home = nobodys_dir();
    set_mode(home.path(), 0o755);
    let mut l = Launch::new(home.path());
    l.uid = Some(NOBODY);
    let mut impostor = l
        .start()
        .unwrap_or_else(|log| panic!("impostor did not start: {log}"));
    let addr = impostor.unix();
    let md = std::fs::metadata(home.path().join("kv.sock")).unwrap();
    assert_eq!(md.uid(), NOBODY);

    let opts = ClientOptions {
        client_name: "victim-client".into(),
        ..ClientOptions::default()
    };
    let e = client(&addr, opts.clone()).unwrap_err().to_string();
    assert!(
        e.contains(&format!("uid {NOBODY}")) && e.contains("refusing"),
        "{e}"
    );
    assert!(
        !impostor.log_text().contains("victim-client"),
        "the impostor received the client's Hello"
    );

    // Trusted by configuration: the same server is usable.
    let trusting = ClientOptions {
        trusted_server_uids: vec![NOBODY],
        ..opts
    };
    let c = client(&addr, trusting).unwrap();
    c.ping().unwrap();
    assert!(impostor.log_text().contains("victim-client"));
    drop(c);
    impostor.term();
}

/// Row 6: without `--socket` the socket goes to `$XDG_RUNTIME_DIR/kvtier/` (created 0700),
/// mode 0600 from the start whatever the umask; a socket directory others can write, or one
/// of another user, is refused.
#[test]
fn default_socket_lives_in_a_private_runtime_dir() {
    if !root_or_skip() {
        return;
    }
    let home = nobodys_dir();
    set_mode(home.path(), 0o755);
    let rt = home.path().join("rt");
    std::fs::create_dir(&rt).unwrap();
    std::os::unix::fs::chown(&rt, Some(NOBODY), Some(NOBODY)).unwrap();
    set_mode(&rt, 0o700);
    let launch = || {
        let mut l = Launch::new(home.path());
        l.socket = None;
        l.uid = Some(NOBODY);
        l.umask = Some(0);
        l.envs.push(("XDG_RUNTIME_DIR", rt.clone().into()));
        l
    };
    let mut s = launch()
        .start()
        .unwrap_or_else(|log| panic!("server refused to start: {log}"));
    let dir = rt.join("kvtier");
    let sock = dir.join("kvtier.sock");
    assert_eq!(s.bound["socket"].as_str(), sock.to_str());
    let md = std::fs::symlink_metadata(&dir).unwrap();
    assert!(md.is_dir());
    assert_eq!((md.uid(), md.mode() & 0o7777), (NOBODY, 0o700));
    let md = std::fs::symlink_metadata(&sock).unwrap();
    assert!(md.file_type().is_socket());
    assert_eq!((md.uid(), md.mode() & 0o777), (NOBODY, 0o600));
    assert_eq!(
        entries(&dir),
        vec!["kvtier.sock".to_string()],
        "nothing else left"
    );
    s.term();
    assert!(!sock.exists(), "removed at shutdown");

    let refused = |want: &str| {
        let log = match launch().start() {
            Ok(mut s) => {
                s.term();
                panic!("an unsafe socket directory was accepted")
            }
            Err(log) => log,
        };
        assert!(
            log.contains("unsafe socket directory") && log.contains(want),
            "{log}"
        );
    };
    set_mode(&dir, 0o777);
    refused("0777");
    set_mode(&dir, 0o700);
    std::os::unix::fs::chown(&dir, Some(0), Some(0)).unwrap();
    refused("owned by uid 0");
}

/// Row 6: another user's file where the socket goes is refused and left alone (versions
/// before deleted whatever was there).
#[test]
fn another_users_file_at_the_socket_path_is_left_alone() {
    if !root_or_skip() {
        return;
    }
    let shared = shared_dir();
    let work = tempfile::tempdir().unwrap();
    let path = shared.path().join("kv.sock");
    as_nobody(&format!("echo mine > {}", path.display()));
    let mut l = Launch::new(work.path());
    l.socket = Some(path.clone());
    let log = match l.start() {
        Ok(mut s) => {
            s.term();
            panic!("the server took over another user's file")
        }
        Err(log) => log,
    };
    assert!(log.contains("is not a socket"), "{log}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "mine\n");
}

/// Row 6: an explicit socket in a directory anyone can write (with or without the sticky
/// bit) still works, with a warning; TCP without a token warns even on loopback.
#[test]
fn unsafe_socket_dir_and_tokenless_loopback_tcp_warn() {
    let work = tempfile::tempdir().unwrap();
    let open = work.path().join("open");
    std::fs::create_dir(&open).unwrap();
    set_mode(&open, 0o777);
    let mut l = Launch::new(work.path()).arg("--tcp").arg("127.0.0.1:0");
    l.socket = Some(open.join("kv.sock"));
    let mut s = l
        .start()
        .unwrap_or_else(|log| panic!("server refused to start: {log}"));
    roundtrip_shm(&s.unix());
    let log = s.log_text();
    assert!(log.contains("lacks the sticky bit"), "{log}");
    assert!(
        log.contains("TCP listener without KVTIER_AUTH_TOKEN: every local user"),
        "{log}"
    );
    s.term();

    // A shared sticky directory like /tmp (the old default /tmp/kvtier.sock): still works,
    // with a warning that others can take the name first.
    set_mode(&open, 0o1777);
    let mut l = Launch::new(work.path());
    l.socket = Some(open.join("kv.sock"));
    let mut s = l
        .start()
        .unwrap_or_else(|log| panic!("server refused to start: {log}"));
    roundtrip_shm(&s.unix());
    let log = s.log_text();
    assert!(log.contains("take the socket's name"), "{log}");
    s.term();
}
