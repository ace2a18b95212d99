//! Committing pool pages ahead of use, and measuring what a shared pool has committed.
//!
//! One `madvise(MADV_POPULATE_*)` (Linux 5.14) faults a whole range in: pages not yet
//! backed are allocated and every page is mapped, without the trap per 4 KiB page that a
//! first copy would take. A server uses it to prefault its pool at start
//! (`local_cpu_prefault`); a client uses it per region of the shared pool on first use
//! instead of populating the whole mapping at connect.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// How [`populate`] faults pages in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Populate {
    /// `MADV_POPULATE_WRITE`: allocates every page, private anonymous memory included. What
    /// a prefault needs.
    Write,
    /// `MADV_POPULATE_READ`: on a shared memfd/tmpfs mapping, maps pages already allocated
    /// several at a time (fault-around) and writable (shmem needs no write notification), and
    /// allocates the missing ones; on private anonymous memory it maps the zero page only.
    Read,
}

/// Faults `len` bytes at `ptr` in with one `madvise` (Linux 5.14). `Ok(false)`: the kernel
/// cannot do it (older than 5.14, or a mapping type it refuses); the pages then fault in on
/// first touch as usual. An error means the memory cannot be had (`ENOMEM`, or `EFAULT`
/// where touching it would raise `SIGBUS`, e.g. a full tmpfs or no free huge page): touching
/// the range would kill the process.
///
/// # Safety
/// `ptr..ptr + len` must lie inside one live mapping (writable for [`Populate::Write`]).
pub unsafe fn populate(ptr: *mut u8, len: usize, how: Populate) -> io::Result<bool> {
    if len == 0 {
        return Ok(true);
    }
    let advice = match how {
        Populate::Write => libc::MADV_POPULATE_WRITE,
        Populate::Read => libc::MADV_POPULATE_READ,
    };
    loop {
        // SAFETY: the caller guarantees the range is a live mapping; populating does not
        // change its contents.
        let rc = unsafe { libc::madvise(ptr.cast(), len, advice) };
        if rc == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) | Some(libc::EAGAIN) => continue,
            Some(libc::EINVAL) => return Ok(false),
            _ => return Err(e),
        }
    }
}

/// Bytes of memory a file-backed pool (memfd, tmpfs or hugetlbfs file) has committed: its
/// allocated blocks (`fstat` `st_blocks`), an O(1) count kept by the file system, whoever
/// faulted the pages in. Shared memory shows in no process's RSS, so this is the only place
/// it is seen.
pub fn committed_bytes(file: &File) -> io::Result<u64> {
    // SAFETY: zeroed stat is a valid out-value; fstat writes within it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a live descriptor and a valid out-pointer.
    if unsafe { libc::fstat(file.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // st_blocks counts 512-byte units whatever the file system's block size.
    Ok((st.st_blocks as u64).saturating_mul(512))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd(len: u64) -> File {
        // SAFETY: static NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"kvtier-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fresh descriptor we own.
        let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f
    }

    #[test]
    fn populating_commits_exactly_the_range() {
        let f = memfd(8 << 20);
        // SAFETY: the memfd is ours; its size is fixed.
        let mut map = unsafe { memmap2::MmapMut::map_mut(&f) }.unwrap();
        assert_eq!(committed_bytes(&f).unwrap(), 0, "a fresh memfd is sparse");
        let p = map.as_mut_ptr();
        // SAFETY: 1 MiB at offsets 2 and 4 MiB lie inside the 8 MiB mapping.
        let w = unsafe { populate(p.add(2 << 20), 1 << 20, Populate::Write) }.unwrap();
        let r = unsafe { populate(p.add(4 << 20), 1 << 20, Populate::Read) }.unwrap();
        if w && r {
            assert_eq!(committed_bytes(&f).unwrap(), 2 << 20);
        }
        map[7 << 20] = 1;
        assert!(committed_bytes(&f).unwrap() >= 4096);
        assert!(committed_bytes(&f).unwrap() <= (3 << 20));
    }
}
