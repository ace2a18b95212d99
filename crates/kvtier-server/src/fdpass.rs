//! Passing the pool descriptor to a local client (SCM_RIGHTS).

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use tokio::io::Interest;
use tokio::net::UnixStream;

fn send_fd_once(sock: RawFd, fd: RawFd) -> io::Result<()> {
    let mut byte = [0x46u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut control = [0u64; 8];
    // SAFETY: zeroed msghdr is valid; every pointer set below refers to a live buffer, and
    // CMSG_* stay within `control` (CMSG_SPACE(4) = 24 bytes < 64).
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) as _;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>(), fd);
        let n = libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "sendmsg sent nothing",
            ));
        }
    }
    Ok(())
}

/// Sends one byte carrying `fd` on a tokio Unix stream.
pub async fn send_fd(stream: &UnixStream, fd: RawFd) -> io::Result<()> {
    let sock = stream.as_raw_fd();
    stream
        .async_io(Interest::WRITABLE, || send_fd_once(sock, fd))
        .await
}
