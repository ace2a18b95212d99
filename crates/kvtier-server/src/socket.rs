//! The Unix socket local clients connect to: the checks on its directory, and binding it
//! with its final mode from the first moment.
//!
//! Default: [`default_path`], `/run/kvtier/kvtier.sock` for root,
//! `$XDG_RUNTIME_DIR/kvtier/kvtier.sock` for other users (clients compute the same path,
//! [`kvtier::transport::wire::socket_path`]). That directory is created when missing (0755
//! for root, so other users can reach a socket root opens to them; 0700 otherwise) and
//! refused when another user owns it or it is writable by group or others. A socket given
//! with `--socket` elsewhere is the user's choice: its directory only gets a warning when
//! others could replace the socket.
//!
//! The socket is bound inside a fresh private (0700) directory next to its final place,
//! given mode 0600 there, then hard-linked to its final name (which fails rather than
//! replaces when the name exists) and the private directory removed: nobody can ever
//! connect to it with looser permissions, and no umask change races other threads.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use kvtier::transport::wire::socket_path;
use tracing::{info, warn};

/// Mode of the socket file: only its owner connects.
const SOCKET_MODE: u32 = 0o600;

fn euid() -> u32 {
    // SAFETY: geteuid never fails.
    unsafe { libc::geteuid() }
}

/// The default socket path of this user ([`socket_path::default_socket_path`]).
pub fn default_path() -> PathBuf {
    socket_path::default_socket_path()
}

/// The socket file a server created; removed when dropped, unless something else has
/// replaced it meanwhile (kvtier removes only what it created).
#[derive(Debug)]
pub(crate) struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(md) = std::fs::symlink_metadata(&self.path) {
            if md.dev() == self.dev && md.ino() == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Binds the Unix socket at `path` with mode 0600 from the start (see the module doc).
pub(crate) fn bind(path: &Path) -> Result<(tokio::net::UnixListener, SocketFile)> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if parent == socket_path::socket_dir() {
        prepare_socket_dir(&parent, if euid() == 0 { 0o755 } else { 0o700 })?;
    } else {
        warn_if_others_can_replace(&parent, path)?;
    }
    clear_stale(path)?;

    let private = PrivateDir::create(&parent)?;
    let tmp = private.path.join("s");
    let std_listener = std::os::unix::net::UnixListener::bind(&tmp)
        .with_context(|| format!("binding the Unix socket {}", path.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(SOCKET_MODE))
        .with_context(|| format!("setting the mode of {}", tmp.display()))?;
    let md = std::fs::symlink_metadata(&tmp)?;
    if let Err(e) = std::fs::hard_link(&tmp, path) {
        if e.kind() == io::ErrorKind::AlreadyExists {
            bail!(
                "{} appeared while the server was binding it: another process created it; \
                 stop that process or pick another --socket",
                path.display()
            );
        }
        return Err(e).with_context(|| format!("creating the Unix socket {}", path.display()));
    }
    let file = SocketFile {
        path: path.to_path_buf(),
        dev: md.dev(),
        ino: md.ino(),
    };
    drop(private);
    std_listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(std_listener)
        .context("registering the Unix listener")?;
    Ok((listener, file))
}

/// Creates the default socket directory when missing, then refuses it unless it is a
/// directory (not a symlink) of ours that neither group nor others can write.
fn prepare_socket_dir(dir: &Path, mode: u32) -> Result<()> {
    match std::fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {
            // The umask may have taken bits off: make it exactly `mode`.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("setting the mode of {}", dir.display()))?;
            info!(dir = %dir.display(), mode = format!("{mode:04o}"), "created the socket directory");
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "creating the socket directory {} (set XDG_RUNTIME_DIR to a directory of \
                     yours, or pass --socket PATH)",
                    dir.display()
                )
            })
        }
    }
    let md =
        std::fs::symlink_metadata(dir).with_context(|| format!("stat of {}", dir.display()))?;
    let me = euid();
    let problem = if !md.is_dir() {
        Some("is not a directory".to_string())
    } else if md.uid() != me {
        Some(format!("is owned by uid {} (expected uid {me})", md.uid()))
    } else if md.mode() & 0o022 != 0 {
        Some(format!(
            "is writable by group or others (mode {:04o})",
            md.mode() & 0o7777
        ))
    } else {
        None
    };
    if let Some(p) = problem {
        bail!(
            "unsafe socket directory {}: it {p}, so another user could replace the socket and \
             impersonate the server; remove it or fix it (chown {me} and chmod {mode:04o}), or \
             pass --socket PATH in a directory only you can write",
            dir.display()
        );
    }
    Ok(())
}

/// A socket outside the default directory: warns when users other than root and us could
/// delete or replace it, or take its name first (a shared directory such as `/tmp`, where
/// the old default `/tmp/kvtier.sock` lives). Fails only when the directory is not there.
fn warn_if_others_can_replace(dir: &Path, socket: &Path) -> Result<()> {
    let md = std::fs::metadata(dir)
        .with_context(|| format!("the directory of the socket {}", socket.display()))?;
    let mode = md.mode();
    let (why, risk) = if mode & 0o022 != 0 && mode & libc::S_ISVTX == 0 {
        (
            format!(
                "is writable by other users and lacks the sticky bit (mode {:04o})",
                mode & 0o7777
            ),
            "delete or replace the socket",
        )
    } else if md.uid() != 0 && md.uid() != euid() {
        (
            format!("belongs to uid {}", md.uid()),
            "delete or replace the socket",
        )
    } else if mode & 0o022 != 0 {
        (
            format!("is shared with other users (mode {:04o})", mode & 0o7777),
            "take the socket's name while no server listens (this server then refuses to start)",
        )
    } else {
        return Ok(());
    };
    warn!(
        socket = %socket.display(),
        "the socket's directory {} {why}: other users can {risk}; clients still refuse a \
         server of another uid; prefer the default {}",
        dir.display(),
        default_path().display()
    );
    Ok(())
}

/// Removes a stale socket of ours at `path`; refuses anything else there.
fn clear_stale(path: &Path) -> Result<()> {
    let md = match std::fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("stat of {}", path.display())),
    };
    if !md.file_type().is_socket() {
        bail!(
            "{} exists and is not a socket; kvtier does not remove it: remove it yourself or \
             pick another --socket",
            path.display()
        );
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        bail!(
            "another server is listening on {}; stop it or pick another --socket",
            path.display()
        );
    }
    if md.uid() != euid() {
        bail!(
            "{} is a socket of uid {}, not ours; kvtier removes only its own: remove it \
             yourself or pick another --socket",
            path.display(),
            md.uid()
        );
    }
    std::fs::remove_file(path)
        .with_context(|| format!("removing the stale socket {}", path.display()))?;
    info!(socket = %path.display(), "removed a stale socket of a server that is gone");
    Ok(())
}

/// A fresh 0700 directory (random name) for binding the socket; removed with what it holds.
struct PrivateDir {
    path: PathBuf,
}

impl PrivateDir {
    fn create(parent: &Path) -> Result<PrivateDir> {
        for _ in 0..8 {
            let path = parent.join(format!(".kvtier-{:08x}", random_u32()?));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(PrivateDir { path }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("creating a private directory in {}", parent.display())
                    })
                }
            }
        }
        bail!(
            "could not create a private directory in {}",
            parent.display()
        )
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.path.join("s"));
        let _ = std::fs::remove_dir(&self.path);
    }
}

fn random_u32() -> Result<u32> {
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        return Err(io::Error::last_os_error()).context("getrandom");
    }
    Ok(u32::from_ne_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_dir_is_created_private_and_unsafe_ones_refused() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("rt");
        prepare_socket_dir(&d, 0o755).unwrap();
        let md = std::fs::metadata(&d).unwrap();
        assert_eq!(md.mode() & 0o7777, 0o755);
        prepare_socket_dir(&d, 0o755).unwrap(); // an existing safe one is fine
        for bad in [0o777, 0o1777, 0o775] {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(bad)).unwrap();
            let e = format!("{:#}", prepare_socket_dir(&d, 0o755).unwrap_err());
            assert!(e.contains("unsafe socket directory"), "{e}");
            assert!(e.contains(&format!("{bad:04o}")), "{e}");
        }
        std::fs::remove_dir(&d).unwrap();
        std::fs::write(&d, b"").unwrap();
        let e = format!("{:#}", prepare_socket_dir(&d, 0o755).unwrap_err());
        assert!(e.contains("not a directory"), "{e}");
    }

    #[tokio::test]
    async fn socket_is_0600_and_only_our_own_stale_socket_is_removed() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("kv.sock");
        // A regular file where the socket goes stays untouched.
        std::fs::write(&p, b"data").unwrap();
        let e = format!("{:#}", bind(&p).unwrap_err());
        assert!(e.contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"data");
        std::fs::remove_file(&p).unwrap();

        // A stale socket of ours (nobody listening) is replaced.
        drop(std::os::unix::net::UnixListener::bind(&p).unwrap());
        let (l, file) = bind(&p).unwrap();
        let md = std::fs::symlink_metadata(&p).unwrap();
        assert!(md.file_type().is_socket());
        assert_eq!(md.mode() & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(t.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "the private bind directory is gone");
        let c = tokio::net::UnixStream::connect(&p).await.unwrap();
        l.accept().await.unwrap();
        drop(c);
        // A second server on the same path is refused while the first listens.
        let e = format!("{:#}", bind(&p).unwrap_err());
        assert!(e.contains("another server is listening"), "{e}");
        drop(l);
        drop(file);
        assert!(!p.exists(), "the socket is removed with its owner");
    }
}
