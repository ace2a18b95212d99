//! The client's view of the server's shared pool: descriptor passing and the mapping.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use kvtier::{Error, Result};

/// Receives one byte carrying one descriptor (SCM_RIGHTS) on a Unix socket.
pub fn recv_fd(sock: RawFd) -> io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // u64 array: cmsg headers need 8-byte alignment.
    let mut control = [0u64; 8];
    // SAFETY: zeroed msghdr is a valid "empty" value; pointers set below point to live
    // buffers for the duration of the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: msg is fully initialised; the kernel writes within the given lengths.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "server closed before sending the pool descriptor",
        ));
    }
    let mut fd: Option<OwnedFd> = None;
    // SAFETY: CMSG_* walk the control buffer the kernel filled, bounded by msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<libc::c_int>();
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<libc::c_int>();
                for i in 0..count {
                    let raw = std::ptr::read_unaligned(data.add(i));
                    let owned = OwnedFd::from_raw_fd(raw);
                    if fd.is_none() {
                        fd = Some(owned);
                    } // extra descriptors are closed by dropping `owned`
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    fd.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "server sent no pool descriptor (control message missing or truncated)",
        )
    })
}

/// The server's pool mapped into this process.
pub struct ShmMap {
    map: memmap2::MmapRaw,
}

impl std::fmt::Debug for ShmMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmMap")
            .field("len", &self.map.len())
            .finish()
    }
}

impl ShmMap {
    /// Maps `len` bytes of the pool descriptor read/write (shared).
    pub fn map(fd: OwnedFd, len: u64) -> Result<ShmMap> {
        let file = File::from(fd);
        let size = file
            .metadata()
            .map_err(|e| Error::io("stat of the server's pool descriptor", e))?
            .len();
        if size < len {
            return Err(Error::Corrupt(format!(
                "server pool descriptor holds {size} bytes, handshake said {len}"
            )));
        }
        let len = usize::try_from(len).map_err(|_| Error::invalid("pool exceeds address space"))?;
        // Populate: map every (already resident) pool page now, so the first copy into a
        // slot does not pay a page fault per 4 KiB.
        let map = memmap2::MmapOptions::new()
            .len(len)
            .populate()
            .map_raw(&file)
            .map_err(|e| Error::io("mapping the server's pool", e))?;
        Ok(ShmMap { map })
    }

    /// Mapping length.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the mapping is empty.
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    fn check(&self, offset: u64, len: usize) -> Result<usize> {
        let off = usize::try_from(offset).map_err(|_| Error::Corrupt("bad offset".into()))?;
        match off.checked_add(len) {
            Some(end) if end <= self.map.len() => Ok(off),
            _ => Err(Error::Corrupt(format!(
                "server slot {offset}+{len} lies outside the {}-byte pool",
                self.map.len()
            ))),
        }
    }

    /// Copies `src` into the pool at `offset`, returning its checksum.
    pub fn write_with_checksum(&self, offset: u64, src: &[u8]) -> Result<u64> {
        let off = self.check(offset, src.len())?;
        // SAFETY: bounds checked above; the server handed this extent to us exclusively
        // under a store lease, so no one else reads or writes it until we commit.
        let dst =
            unsafe { std::slice::from_raw_parts_mut(self.map.as_mut_ptr().add(off), src.len()) };
        Ok(kvtier::chunk::copy_with_checksum(dst, src))
    }

    /// Copies pool bytes at `offset` into `dst`.
    pub fn read(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        let off = self.check(offset, dst.len())?;
        // SAFETY: bounds checked above; the extent is a sealed chunk held (unevictable,
        // immutable) by our retrieve lease.
        let src = unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(off), dst.len()) };
        kvtier::chunk::copy_payload(dst, src);
        Ok(())
    }
}
