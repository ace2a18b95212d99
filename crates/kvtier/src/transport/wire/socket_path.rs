//! Where a `kvtier serve` server listens by default, so the server and its clients agree:
//! `<runtime dir>/kvtier/kvtier.sock`, with the runtime dir `/run` for root and
//! `$XDG_RUNTIME_DIR` (a private per-user directory) for other users, `/run/user/<uid>`
//! when that is unset. Never a world-writable directory such as `/tmp`, where any local user
//! could take the name first.

use std::ffi::OsString;
use std::path::PathBuf;

/// The socket's file name in [`socket_dir`].
pub const SOCKET_NAME: &str = "kvtier.sock";
/// The socket directory of a server run by root.
pub const ROOT_SOCKET_DIR: &str = "/run/kvtier";
/// The default socket of earlier versions, in world-writable `/tmp`.
pub const OLD_DEFAULT_SOCKET: &str = "/tmp/kvtier.sock";

/// The default socket directory of this user ([`ROOT_SOCKET_DIR`] for root,
/// `$XDG_RUNTIME_DIR/kvtier` otherwise).
pub fn socket_dir() -> PathBuf {
    // SAFETY: geteuid never fails.
    socket_dir_for(
        unsafe { libc::geteuid() },
        std::env::var_os("XDG_RUNTIME_DIR"),
    )
}

/// [`socket_dir`] of user `euid` with `XDG_RUNTIME_DIR` set to `xdg`.
pub fn socket_dir_for(euid: u32, xdg: Option<OsString>) -> PathBuf {
    if euid == 0 {
        return PathBuf::from(ROOT_SOCKET_DIR);
    }
    let runtime = match xdg.map(PathBuf::from) {
        Some(p) if p.is_absolute() => p,
        _ => PathBuf::from(format!("/run/user/{euid}")),
    };
    runtime.join("kvtier")
}

/// The default socket path of this user ([`socket_dir`]/[`SOCKET_NAME`]).
pub fn default_socket_path() -> PathBuf {
    socket_dir().join(SOCKET_NAME)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_places() {
        assert_eq!(
            socket_dir_for(0, Some("/run/user/0".into())),
            PathBuf::from("/run/kvtier")
        );
        assert_eq!(
            socket_dir_for(1000, Some("/run/user/1000".into())),
            PathBuf::from("/run/user/1000/kvtier")
        );
        assert_eq!(
            socket_dir_for(1000, Some("relative".into())),
            PathBuf::from("/run/user/1000/kvtier")
        );
        assert_eq!(
            socket_dir_for(1000, None),
            PathBuf::from("/run/user/1000/kvtier")
        );
        assert_ne!(default_socket_path(), PathBuf::from(OLD_DEFAULT_SOCKET));
    }
}
