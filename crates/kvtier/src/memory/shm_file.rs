//! The pool's file in a shared-memory directory (`kvtier serve --shm-dir`, e.g. `/dev/shm`
//! or a hugetlbfs mount).
//!
//! Such a directory is normally writable by every user, so the file is made the way a
//! hostile neighbour cannot influence:
//! - created with `O_EXCL | O_NOFOLLOW | O_CLOEXEC`, mode 0600, under a name nobody can
//!   predict: a symlink or a file planted in advance is never opened, let alone truncated;
//! - checked after opening (`fstat`: a regular file, ours, no group/other permission bits);
//! - unlinked at once, before it is even sized: from then on only holders of the
//!   descriptor (the server, and clients it passes the descriptor to with SCM_RIGHTS) can
//!   reach it, and a crash leaves no file behind.
//!
//! A server killed inside the few system calls between creating and unlinking its file
//! leaves an empty file. The name records its creator, `kvtier-pool-<pid>-<start>-<random>`
//! with `<start>` the process start time (clock ticks after boot, field 22 of
//! `/proc/<pid>/stat`), so the next start removes files whose creator is gone: a pid that no
//! longer runs, or now runs a process that started at another time (the pid was reused).
//! Only regular files owned by the caller's uid and named that way are removed; the name
//! older versions used, `kvtier-pool-<pid>`, counts as stale once no process has that pid.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{Error, Result};

/// Start of every pool file name.
pub const NAME_PREFIX: &str = "kvtier-pool-";

/// Creates the pool's file for `bytes` of pool in `dir`: removes stale pool files first,
/// refuses a file system with less free space than `bytes` (touching a page past it would
/// kill the process with SIGBUS), and returns the created file already unlinked.
pub(crate) fn create_unlinked(dir: &Path, bytes: u64) -> Result<File> {
    let shown = dir.display();
    let dir_file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(dir)
        .map_err(|e| Error::io(format!("opening the shared-memory directory {shown}"), e))?;
    let dfd = dir_file.as_raw_fd();
    let st = fstat(dfd).map_err(|e| Error::io(format!("stat of {shown}"), e))?;
    check_free_space(dfd, dir, bytes)?;
    remove_stale(dir, dfd, &st);

    let me = Creator::current();
    for _ in 0..4 {
        let name = pool_name(me, random_u64()?);
        let c_name = CString::new(name.clone()).expect("pool file names hold no NUL");
        // SAFETY: openat on a directory descriptor we hold with a NUL-terminated name.
        let fd = unsafe {
            libc::openat(
                dfd,
                c_name.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600 as libc::c_uint,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::AlreadyExists {
                continue; // 64 random bits collided: draw again
            }
            return Err(Error::io(format!("creating a pool file in {shown}"), e));
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        let checked = check_created(&file, dir, &name);
        // Unlink before anything else, whether the checks passed or not. ENOENT is fine:
        // another server that cannot see our pid (another pid namespace) took the file for
        // stale; the descriptor is all the pool needs.
        if let Err(e) = unlinkat(dfd, &c_name) {
            if e.kind() != io::ErrorKind::NotFound {
                return Err(Error::io(
                    format!("unlinking the pool file {shown}/{name}"),
                    e,
                ));
            }
        }
        checked?;
        return Ok(file);
    }
    Err(Error::invalid(format!(
        "could not create a pool file with a fresh random name in {shown}"
    )))
}

/// Checks the file we just created: a regular file, ours, readable by us alone. `O_EXCL`
/// already guarantees we created it; this catches file systems that do not keep owners
/// or modes (vfat, some network mounts), where other users could open it.
fn check_created(file: &File, dir: &Path, name: &str) -> Result<()> {
    let st = fstat(file.as_raw_fd())
        .map_err(|e| Error::io(format!("stat of the pool file {}/{name}", dir.display()), e))?;
    // SAFETY: geteuid never fails.
    let euid = unsafe { libc::geteuid() };
    let mode = st.st_mode & 0o7777;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_uid != euid || mode & 0o077 != 0 {
        return Err(Error::invalid(format!(
            "the pool file created in {} is owned by uid {} with mode {mode:04o} (expected uid \
             {euid}, mode 0600): that file system does not keep owners or modes, so other users \
             could open the pool; use a tmpfs such as /dev/shm for --shm-dir",
            dir.display(),
            st.st_uid
        )));
    }
    Ok(())
}

/// Refuses a pool that does not fit in the free space of the directory's file system.
fn check_free_space(dfd: RawFd, dir: &Path, bytes: u64) -> Result<()> {
    // SAFETY: zeroed statvfs is a valid out-parameter; dfd is an open directory.
    let mut sv: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstatvfs(dfd, &mut sv) } != 0 {
        let e = io::Error::last_os_error();
        return Err(Error::io(format!("statvfs of {}", dir.display()), e));
    }
    // A file system reporting no size (hugetlbfs without `size=`) has no limit to check.
    if sv.f_blocks == 0 || sv.f_blocks == u64::MAX as libc::fsblkcnt_t {
        return Ok(());
    }
    let free = (sv.f_bavail as u64).saturating_mul(sv.f_frsize as u64);
    if bytes > free {
        return Err(Error::invalid(format!(
            "the memory pool needs {} but {} has only {} free: pages past that would crash the \
             server (SIGBUS) once the pool fills; lower max_local_cpu_size, enlarge that file \
             system (e.g. `mount -o remount,size=... /dev/shm`), or drop --shm-dir (the default \
             memfd pool has no such limit)",
            crate::memory::host::human(bytes),
            dir.display(),
            crate::memory::host::human(free),
        )));
    }
    Ok(())
}

/// Who created a pool file: a process id and that process's start time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Creator {
    pid: u32,
    start: u64,
}

impl Creator {
    /// This process (start time 0 when `/proc` cannot tell: the name is then never
    /// recognised as live by others, which only costs the file its name early; see
    /// [`create_unlinked`]).
    fn current() -> Creator {
        let pid = std::process::id();
        Creator {
            pid,
            start: start_time(pid).unwrap_or(0),
        }
    }
}

fn pool_name(c: Creator, random: u64) -> String {
    format!("{NAME_PREFIX}{}-{}-{random:016x}", c.pid, c.start)
}

/// What a directory entry's name says about it.
#[derive(Debug, PartialEq, Eq)]
enum PoolName {
    /// `kvtier-pool-<pid>-<start>-<16 hex digits>`.
    Current(Creator),
    /// `kvtier-pool-<pid>` (versions before the random name).
    Legacy(u32),
}

fn parse_name(name: &OsStr) -> Option<PoolName> {
    let rest = name.to_str()?.strip_prefix(NAME_PREFIX)?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let parts: Vec<&str> = rest.split('-').collect();
    match parts[..] {
        [pid] if digits(pid) => Some(PoolName::Legacy(pid.parse().ok()?)),
        [pid, start, random]
            if digits(pid)
                && digits(start)
                && random.len() == 16
                && random.bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            Some(PoolName::Current(Creator {
                pid: pid.parse().ok()?,
                start: start.parse().ok()?,
            }))
        }
        _ => None,
    }
}

/// Whether the process a pool file names may still be running.
fn creator_alive(name: &PoolName) -> bool {
    match name {
        PoolName::Current(c) => start_time(c.pid) == Some(c.start),
        PoolName::Legacy(pid) => Path::new(&format!("/proc/{pid}")).exists(),
    }
}

/// Start time of `pid` in clock ticks after boot (field 22 of `/proc/<pid>/stat`).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&stat)
}

/// Field 22 of a `/proc/<pid>/stat` line. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted from the last `)`.
fn parse_start_time(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    // After the name: field 3 (state) is the first; field 22 is the 20th.
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Removes the stale pool files in `dir` (see the module doc); logs each removal. Best
/// effort: a failure only leaves a file behind.
fn remove_stale(dir: &Path, dfd: RawFd, dir_stat: &libc::stat) {
    // Where others may rename files (group/world-writable without the sticky bit), the entry
    // checked might be swapped before it is removed: remove nothing there.
    if dir_stat.st_mode & 0o022 != 0 && dir_stat.st_mode & libc::S_ISVTX == 0 {
        tracing::warn!(
            dir = %dir.display(),
            "not cleaning stale pool files: the directory is writable by others without the \
             sticky bit (any user can rename files in it); prefer /dev/shm for --shm-dir"
        );
        return;
    }
    if start_time(std::process::id()).is_none() {
        tracing::warn!("not cleaning stale pool files: /proc does not show process start times");
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    // SAFETY: geteuid never fails.
    let euid = unsafe { libc::geteuid() };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(parsed) = parse_name(&name) else {
            continue;
        };
        let Ok(c_name) = CString::new(name.as_bytes()) else {
            continue;
        };
        let Ok(st) = fstatat_nofollow(dfd, &c_name) else {
            continue;
        };
        if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_uid != euid {
            continue; // not a file we could have made
        }
        if creator_alive(&parsed) {
            continue;
        }
        match unlinkat(dfd, &c_name) {
            Ok(()) => tracing::info!(
                file = %dir.join(&name).display(),
                bytes = st.st_size,
                "removed the pool file of a server that is no longer running"
            ),
            Err(e) => tracing::warn!(
                file = %dir.join(&name).display(),
                error = %e,
                "could not remove a stale pool file"
            ),
        }
    }
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: zeroed stat is a valid out-parameter; fd is open.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn fstatat_nofollow(dfd: RawFd, name: &CStr) -> io::Result<libc::stat> {
    // SAFETY: zeroed stat is a valid out-parameter; dfd is an open directory.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; name is NUL-terminated.
    if unsafe { libc::fstatat(dfd, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn unlinkat(dfd: RawFd, name: &CStr) -> io::Result<()> {
    // SAFETY: dfd is an open directory; name is NUL-terminated.
    if unsafe { libc::unlinkat(dfd, name.as_ptr(), 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// 64 bits from the kernel's random source.
fn random_u64() -> Result<u64> {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        return Err(Error::io(
            "getrandom for the pool file name",
            io::Error::last_os_error(),
        ));
    }
    Ok(u64::from_ne_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn names_in(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn names_round_trip_and_strangers_are_not_ours() {
        let c = Creator {
            pid: 4242,
            start: 987_654,
        };
        let n = pool_name(c, 0xabcdef);
        assert_eq!(n, "kvtier-pool-4242-987654-0000000000abcdef");
        assert_eq!(parse_name(OsStr::new(&n)), Some(PoolName::Current(c)));
        assert_eq!(
            parse_name(OsStr::new("kvtier-pool-17")),
            Some(PoolName::Legacy(17))
        );
        for stranger in [
            "kvtier-pool-",
            "kvtier-pool-x",
            "kvtier-pool-17.bak",
            "kvtier-pool-1-2-zz",
            "kvtier-pool-1-2-0000000000abcdef-x",
            "other-pool-17",
            "kvtier-pool-1--0000000000abcdef",
        ] {
            assert_eq!(parse_name(OsStr::new(stranger)), None, "{stranger}");
        }
    }

    #[test]
    fn start_time_skips_names_with_spaces_and_parentheses() {
        let line = "77 (a b) c) S 1 77 77 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 123456 1000 10";
        assert_eq!(parse_start_time(line), Some(123_456));
        let me = start_time(std::process::id()).expect("our own start time");
        assert!(me > 0);
        assert!(creator_alive(&PoolName::Current(Creator {
            pid: std::process::id(),
            start: me
        })));
        assert!(!creator_alive(&PoolName::Current(Creator {
            pid: std::process::id(),
            start: me + 1
        })));
    }

    #[test]
    fn created_file_is_private_unlinked_and_ignores_planted_names() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        // Planted: the name older versions would have used, as a symlink to a victim.
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep me").unwrap();
        let legacy = dir
            .path()
            .join(format!("{NAME_PREFIX}{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &legacy).unwrap();

        let f = create_unlinked(dir.path(), 1 << 20).unwrap();
        let md = f.metadata().unwrap();
        assert_eq!(md.mode() & 0o7777, 0o600);
        assert_eq!(md.nlink(), 0, "the pool file is unlinked once created");
        f.set_len(1 << 20).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
        assert_eq!(
            names_in(dir.path()),
            vec![
                format!("{NAME_PREFIX}{}", std::process::id()),
                "victim".to_string()
            ],
            "only the planted entries remain"
        );
    }

    #[test]
    fn stale_files_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let me = Creator::current();
        let mut dead = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = dead.id();
        dead.wait().unwrap();
        let write = |n: &str| std::fs::write(dir.path().join(n), b"x").unwrap();
        // Stale: our pid with another start time (pid reused), and a dead legacy pid.
        let reused = pool_name(
            Creator {
                start: me.start + 1,
                ..me
            },
            1,
        );
        write(&reused);
        write(&format!("{NAME_PREFIX}{dead_pid}"));
        // Kept: a live creator, a stranger's name, a symlink named like a stale file.
        let live = pool_name(me, 2);
        write(&live);
        write("kvtier-pool-notes.txt");
        let link = pool_name(
            Creator {
                pid: dead_pid,
                start: 1,
            },
            3,
        );
        std::os::unix::fs::symlink("/nonexistent", dir.path().join(&link)).unwrap();

        let f = create_unlinked(dir.path(), 4096).unwrap();
        drop(f);
        let mut want = vec![live, "kvtier-pool-notes.txt".to_string(), link];
        want.sort();
        assert_eq!(names_in(dir.path()), want);
    }

    #[test]
    fn a_pool_larger_than_the_free_space_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = create_unlinked(dir.path(), u64::MAX / 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("free") && e.contains("SIGBUS"), "{e}");
        assert!(names_in(dir.path()).is_empty());
    }
}
