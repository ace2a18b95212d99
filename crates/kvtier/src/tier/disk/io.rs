//! Low-level file I/O of the disk tier: aligned scratch buffers, `O_DIRECT` opens with a
//! buffered fallback, and directory fsync.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Block size of the on-disk format and of `O_DIRECT` transfers.
pub(crate) const BLOCK: usize = 4096;

/// Rounds `n` up to a whole number of blocks.
pub(crate) fn round_block(n: u64) -> u64 {
    n.div_ceil(BLOCK as u64) * BLOCK as u64
}

/// A zeroed, 4096-aligned heap buffer for direct I/O of headers and tails.
pub(crate) struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is uniquely owned heap memory.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (`len` > 0, a multiple of [`BLOCK`]).
    pub(crate) fn zeroed(len: usize) -> io::Result<AlignedBuf> {
        let len = len.max(BLOCK).div_ceil(BLOCK) * BLOCK;
        let layout =
            Layout::from_size_align(len, BLOCK).map_err(|e| io::Error::other(e.to_string()))?;
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        Ok(AlignedBuf { ptr, len })
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` owns `len` initialised (zeroed) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, uniquely owned.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this exact layout.
        unsafe { dealloc(self.ptr, Layout::from_size_align_unchecked(self.len, BLOCK)) }
    }
}

/// Whether `s` can be handed to `O_DIRECT` as is (aligned address and length).
pub(crate) fn is_aligned(s: &[u8]) -> bool {
    (s.as_ptr() as usize) % BLOCK == 0 && s.len() % BLOCK == 0
}

/// Whether an error means "this file system does not do `O_DIRECT`".
pub(crate) fn is_direct_unsupported(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(libc::EOPNOTSUPP)
}

/// Whether an error means the device is out of space (or quota).
pub(crate) fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || e.kind() == io::ErrorKind::StorageFull
}

/// Whether a failed read speaks against the record or its device: an error from the system,
/// other than this process lacking a resource (file descriptors, memory) or an interrupted
/// or would-block call, after which the record is likely fine.
pub(crate) fn blames_the_record(e: &io::Error) -> bool {
    match e.raw_os_error() {
        Some(
            libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS | libc::EINTR | libc::EAGAIN,
        ) => false,
        Some(_) => true,
        None => false,
    }
}

/// Creates a new file for writing (`O_EXCL`, owner-only: cached KV is every tenant's
/// prompts), with `O_DIRECT` when `direct`.
pub(crate) fn create_new(path: &Path, direct: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.write(true).create_new(true).mode(0o600);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
}

/// Opens a record for reading, with `O_DIRECT` when `direct`. A record is never a
/// symlink or a FIFO: neither is followed nor waited on (`O_NOFOLLOW | O_NONBLOCK`).
pub(crate) fn open_read(path: &Path, direct: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true);
    let flags = libc::O_NOFOLLOW | libc::O_NONBLOCK;
    o.custom_flags(if direct {
        flags | libc::O_DIRECT
    } else {
        flags
    });
    o.open(path)
}

/// Bytes an unprivileged writer can still use on the file system holding `dir` (`statvfs`).
pub(crate) fn free_bytes(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Opens a directory (to fsync it).
pub(crate) fn open_dir(dir: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(dir)
}

/// fsyncs a directory so renames and unlinks in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    open_dir(dir)?.sync_all()
}

/// Drops the slices (or their parts) already transferred.
fn advance<T: AsRef<[u8]>>(bufs: &mut Vec<T>, first: &mut usize, mut done: usize) {
    while done > 0 && !bufs.is_empty() {
        let left = bufs[0].as_ref().len() - *first;
        if done >= left {
            done -= left;
            bufs.remove(0);
            *first = 0;
        } else {
            *first += done;
            done = 0;
        }
    }
    while !bufs.is_empty() && bufs[0].as_ref().len() == *first {
        bufs.remove(0);
        *first = 0;
    }
}

/// Writes all of `bufs` at `offset` with `pwritev(2)` (one call in the common case).
pub(crate) fn write_all_vectored_at(f: &File, bufs: &[&[u8]], mut offset: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut bufs: Vec<&[u8]> = bufs.to_vec();
    let mut first = 0usize;
    advance(&mut bufs, &mut first, 0);
    while !bufs.is_empty() {
        let iov: Vec<libc::iovec> = bufs
            .iter()
            .enumerate()
            .take(libc::UIO_MAXIOV as usize)
            .map(|(i, b)| {
                let b = if i == 0 { &b[first..] } else { b };
                libc::iovec {
                    iov_base: b.as_ptr() as *mut libc::c_void,
                    iov_len: b.len(),
                }
            })
            .collect();
        // SAFETY: every iovec points into a live borrowed slice.
        let n = unsafe {
            libc::pwritev(
                f.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as libc::c_int,
                offset as libc::off_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        offset += n as u64;
        advance(&mut bufs, &mut first, n as usize);
    }
    Ok(())
}

/// Fills all of `bufs` from `offset` with `preadv(2)` (one call in the common case);
/// `UnexpectedEof` when the file ends first.
pub(crate) fn read_exact_vectored_at(
    f: &File,
    bufs: &mut [&mut [u8]],
    mut offset: u64,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut bufs: Vec<&mut [u8]> = bufs.iter_mut().map(|b| &mut **b).collect();
    let mut first = 0usize;
    advance(&mut bufs, &mut first, 0);
    while !bufs.is_empty() {
        let iov: Vec<libc::iovec> = bufs
            .iter_mut()
            .enumerate()
            .take(libc::UIO_MAXIOV as usize)
            .map(|(i, b)| {
                let b = if i == 0 { &mut b[first..] } else { &mut b[..] };
                libc::iovec {
                    iov_base: b.as_mut_ptr() as *mut libc::c_void,
                    iov_len: b.len(),
                }
            })
            .collect();
        // SAFETY: every iovec points into a live, exclusively borrowed slice.
        let n = unsafe {
            libc::preadv(
                f.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as libc::c_int,
                offset as libc::off_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        offset += n as u64;
        advance(&mut bufs, &mut first, n as usize);
    }
    Ok(())
}

/// Probes whether `dir` accepts `O_DIRECT` writes and reads; errors other than "unsupported"
/// (permissions, read-only file system, missing directory) are returned.
pub(crate) fn probe_direct(dir: &Path) -> io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let path = dir.join(format!(".probe.{:016x}", rand::random::<u64>()));
    let result = (|| {
        let f = match create_new(&path, true) {
            Ok(f) => f,
            Err(e) if is_direct_unsupported(&e) => {
                // The open may have created the file before rejecting O_DIRECT. Still check
                // the directory is writable at all.
                let _ = std::fs::remove_file(&path);
                create_new(&path, false)?;
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        let buf = AlignedBuf::zeroed(BLOCK)?;
        match f.write_all_at(buf.as_slice(), 0) {
            Ok(()) => {}
            Err(e) if is_direct_unsupported(&e) => return Ok(false),
            Err(e) => return Err(e),
        }
        drop(f);
        let r = open_read(&path, true);
        match r {
            Ok(f) => {
                let mut b = AlignedBuf::zeroed(BLOCK)?;
                match f.read_exact_at(b.as_mut_slice(), 0) {
                    Ok(()) => Ok(true),
                    Err(e) if is_direct_unsupported(&e) => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Err(e) if is_direct_unsupported(&e) => Ok(false),
            Err(e) => Err(e),
        }
    })();
    let _ = std::fs::remove_file(&path);
    result
}
