//! `kvtier inspect` as a user runs it: it never waits on a FIFO planted in the directory,
//! ends quietly when its reader goes away (`kvtier inspect DIR | head -1`), and says "not a
//! kvtier directory" for a directory that is not one.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kvtier::tier::{DiskTier, DiskTierOptions};

/// A fresh kvtier disk directory (marker and layout, no chunks) under `parent`.
fn kvtier_dir(parent: &Path) -> std::path::PathBuf {
    let root = parent.join("disk");
    drop(DiskTier::open(DiskTierOptions::new(&root, 64 << 20)).unwrap());
    root
}

fn inspect(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kvtier"));
    c.arg("inspect").arg(dir).env_remove("KVTIER_CONFIG_FILE");
    c
}

/// Waits for `child` up to `limit`; kills it and fails the test if it is still running.
fn wait_or_kill(mut child: Child, limit: Duration, what: &str) -> Output {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("{what}: still running after {limit:?} (hung)");
}

#[test]
fn inspect_does_not_hang_on_a_fifo_named_like_a_record() {
    let d = tempfile::tempdir().unwrap();
    let root = kvtier_dir(d.path());
    let name = format!("{}.none.kvr", "ab".repeat(32));
    let fifo = root.join("ab").join(&name);
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let child = inspect(&root)
        .arg("--json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_or_kill(child, Duration::from_secs(30), "kvtier inspect over a FIFO");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let rep: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rep["chunks"], 0);
    assert_eq!(
        rep["other_files"], 1,
        "the FIFO is counted, not read: {rep}"
    );
}

#[test]
fn inspect_into_a_closed_pipe_ends_quietly() {
    let d = tempfile::tempdir().unwrap();
    let root = kvtier_dir(d.path());
    // A pipe whose reader is already gone, as after `| head -1` has exited.
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors were just created and are owned here only.
    let (reader, writer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(reader);
    let child = inspect(&root)
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_or_kill(
        child,
        Duration::from_secs(30),
        "kvtier inspect into a closed pipe",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
}

#[test]
fn inspect_says_not_a_kvtier_directory() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("tmp")).unwrap();
    std::fs::write(d.path().join("tmp").join("notes.txt"), "mine").unwrap();
    let out = inspect(d.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("not a kvtier directory") && stderr.contains("notes.txt"),
        "{stderr}"
    );
}
