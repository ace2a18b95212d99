//! Which process a client talks to on a Unix socket: the kernel says who listens
//! (`SO_PEERCRED`), and a client sends nothing (no Hello, no prompt) to a server that is
//! not run by root, by the client's own uid, or by a uid the user names.
//!
//! A socket path in a directory other users can write could be theirs; this check keeps an
//! impostor listening there from receiving a client's identity, tokens and KV bytes.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use kvtier::{Error, Result};

/// Environment variable naming more server uids to trust (comma-separated).
pub const SERVER_UID_ENV: &str = "KVTIER_SERVER_UID";

/// Credentials of the process that listens on the other end of `s`.
fn peer_cred(s: &UnixStream) -> std::io::Result<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a valid ucred.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred)
}

/// Parses the value of [`SERVER_UID_ENV`]: uids separated by commas.
pub fn parse_uid_list(text: &str) -> Result<Vec<u32>> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u32>().map_err(|_| {
                Error::invalid(format!(
                    "{SERVER_UID_ENV}=`{text}`: expected numeric uids separated by commas"
                ))
            })
        })
        .collect()
}

/// The uids a client trusts besides root and its own: `extra`, and those of
/// [`SERVER_UID_ENV`].
pub(crate) fn trusted_uids(extra: &[u32]) -> Result<Vec<u32>> {
    let mut v = extra.to_vec();
    if let Ok(text) = std::env::var(SERVER_UID_ENV) {
        v.extend(parse_uid_list(&text)?);
    }
    Ok(v)
}

/// Refuses the server on `s` unless it runs as root, as us, or as one of `trusted`.
pub(crate) fn check_server(s: &UnixStream, shown: &str, trusted: &[u32]) -> Result<()> {
    let cred = peer_cred(s).map_err(|e| {
        Error::io(
            format!("kvtier server at {shown}: reading its credentials (SO_PEERCRED)"),
            e,
        )
    })?;
    // SAFETY: geteuid never fails.
    let me = unsafe { libc::geteuid() };
    if cred.uid == 0 || cred.uid == me || trusted.contains(&cred.uid) {
        return Ok(());
    }
    Err(Error::io(
        format!(
            "kvtier server at {shown}: refusing it, the socket is served by uid {} (pid {}), \
             which is neither root nor this user (uid {me}) and could be an impostor; if that \
             server is yours, set {SERVER_UID_ENV}={} (or ClientOptions::trusted_server_uids)",
            cred.uid, cred.pid, cred.uid
        ),
        std::io::Error::from(std::io::ErrorKind::PermissionDenied),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_lists() {
        assert_eq!(parse_uid_list("1000").unwrap(), vec![1000]);
        assert_eq!(parse_uid_list(" 1000, 0 ,").unwrap(), vec![1000, 0]);
        assert!(parse_uid_list("").unwrap().is_empty());
        let e = parse_uid_list("alice").unwrap_err().to_string();
        assert!(e.contains(SERVER_UID_ENV), "{e}");
    }

    #[test]
    fn our_own_listener_is_trusted() {
        let dir = std::env::temp_dir().join(format!("kvtier-trust-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("s");
        let _ = std::fs::remove_file(&p);
        let _l = std::os::unix::net::UnixListener::bind(&p).unwrap();
        let s = UnixStream::connect(&p).unwrap();
        let cred = peer_cred(&s).unwrap();
        assert_eq!(cred.pid as u32, std::process::id());
        check_server(&s, "test", &[]).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
