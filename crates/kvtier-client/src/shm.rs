//! The client's view of the server's shared pool: descriptor passing and the mapping.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use kvtier::memory::populate::{populate, Populate};
use kvtier::{Error, Result};

/// The background side of [`ShmMap::map_committed_in_background`].
fn map_committed(weak: &Weak<ShmMap>) {
    let mut off = 0;
    loop {
        let Some(map) = weak.upgrade() else { return };
        if off >= map.len() || map.no_populate.load(Ordering::Relaxed) {
            return;
        }
        let len = GRANULE.min(map.len() - off);
        if map.resident(off, len) && map.populate(off, len).is_err() {
            return;
        }
        off += len;
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

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

/// Granularity at which a client maps the pool in: the first copy into or out of a granule
/// maps all of it with one `madvise` (2 MiB: 512 pages per call instead of a fault per
/// 4 KiB page).
const GRANULE: usize = 2 << 20;

/// The server's pool mapped into this process.
///
/// The mapping is lazy: connecting maps no page (`MAP_POPULATE` allocated every page of a
/// pool the server keeps sparse: about a second per GiB, charged to this process's cgroup
/// and to no one's RSS). Each region is instead populated once, with one
/// `MADV_POPULATE_READ`, by the first copy that touches it ([`ShmMap::populate`]).
pub struct ShmMap {
    map: memmap2::MmapRaw,
    /// Device, inode and change time of the mapped file: a later descriptor with the same
    /// triple is the same pool (a differing time only costs a second mapping).
    file_id: [i64; 4],
    /// One bit per [`GRANULE`]: set once this process has populated it.
    populated: Vec<AtomicU64>,
    /// The kernel cannot populate (older than 5.14): let pages fault in on first touch.
    no_populate: AtomicBool,
}

impl std::fmt::Debug for ShmMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmMap")
            .field("len", &self.map.len())
            .finish()
    }
}

impl ShmMap {
    /// Maps `len` bytes of the pool descriptor read/write (shared), populating nothing.
    pub fn map(fd: OwnedFd, len: u64) -> Result<ShmMap> {
        let file = File::from(fd);
        let meta = file
            .metadata()
            .map_err(|e| Error::io("stat of the server's pool descriptor", e))?;
        let size = meta.len();
        if size < len {
            return Err(Error::Corrupt(format!(
                "server pool descriptor holds {size} bytes, handshake said {len}"
            )));
        }
        let len = usize::try_from(len).map_err(|_| Error::invalid("pool exceeds address space"))?;
        let map = memmap2::MmapOptions::new()
            .len(len)
            .map_raw(&file)
            .map_err(|e| Error::io("mapping the server's pool", e))?;
        let granules = len.div_ceil(GRANULE);
        Ok(ShmMap {
            map,
            file_id: [
                meta.dev() as i64,
                meta.ino() as i64,
                meta.ctime(),
                meta.ctime_nsec(),
            ],
            populated: (0..granules.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            no_populate: AtomicBool::new(false),
        })
    }

    /// Whether `fd` (a pool descriptor a later connection received) is the pool this maps,
    /// at the same length: then the connection can share this mapping.
    pub fn maps(&self, fd: &OwnedFd, len: u64) -> bool {
        // SAFETY: zeroed stat is a valid out-value; fstat writes within it.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: a live descriptor and a valid out-pointer.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return false;
        }
        let id = [
            st.st_dev as i64,
            st.st_ino as i64,
            st.st_ctime as i64,
            st.st_ctime_nsec as i64,
        ];
        id == self.file_id && usize::try_from(len).is_ok_and(|l| l == self.map.len())
    }

    /// Populates the granules of `off..off + len` this process has not populated yet, one
    /// `madvise` per run of them, so a copy takes no fault per page. Pages the server has
    /// not committed are committed here (the slot is about to be written). Read, not write,
    /// population: on this shared memfd mapping it maps resident pages 16 at a time and
    /// writable, about 1.7x faster than `MADV_POPULATE_WRITE`'s page-by-page write faults
    /// for a prefaulted pool, and the same for pages it must allocate.
    fn populate(&self, off: usize, len: usize) -> Result<()> {
        if len == 0 || self.no_populate.load(Ordering::Relaxed) {
            return Ok(());
        }
        let bit = |g: usize| (&self.populated[g / 64], 1u64 << (g % 64));
        let is_set = |g: usize| {
            let (w, m) = bit(g);
            w.load(Ordering::Relaxed) & m != 0
        };
        let last = (off + len - 1) / GRANULE;
        let mut g = off / GRANULE;
        while g <= last {
            if is_set(g) {
                g += 1;
                continue;
            }
            let first = g;
            while g <= last && !is_set(g) {
                g += 1;
            }
            let start = first * GRANULE;
            let end = (g * GRANULE).min(self.map.len());
            // SAFETY: start < end <= len: inside our live shared mapping; populating maps
            // pages without changing their bytes, so extents other clients hold are safe.
            let done = unsafe {
                populate(
                    self.map.as_mut_ptr().add(start),
                    end - start,
                    Populate::Read,
                )
            }
            .map_err(|e| {
                Error::io(
                    "committing shared memory for a slot of the server's pool (the \
                         server's memory is exhausted: lower its max_local_cpu_size)",
                    e,
                )
            })?;
            if !done {
                self.no_populate.store(true, Ordering::Relaxed);
                return Ok(());
            }
            for x in first..g {
                let (w, m) = bit(x);
                w.fetch_or(m, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Starts a background thread that maps in, granule by granule, the regions of the
    /// pool the server has already committed (every page resident, by `mincore`), so the
    /// first copies through a new connection take no page-table faults (they ran at about
    /// 0.6x the embedded engine's speed). Regions with pages the server has not committed
    /// are left to the first copy that needs them: nothing is committed here. The thread
    /// stops when the mapping is dropped.
    pub fn map_committed_in_background(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("kvtier-shm-map".into())
            .spawn(move || map_committed(&weak));
        if let Err(e) = spawned {
            tracing::debug!("not mapping the shared pool in the background: {e}");
        }
    }

    /// Whether every page of `off..off + len` is resident (the server committed it).
    fn resident(&self, off: usize, len: usize) -> bool {
        let page = page_size();
        let mut vec = vec![0u8; len.div_ceil(page)];
        // SAFETY: off..off + len lies inside our live mapping (page aligned: off is a
        // multiple of GRANULE); `vec` has one byte per page of it.
        let rc = unsafe {
            libc::mincore(
                self.map.as_mut_ptr().add(off).cast(),
                len,
                vec.as_mut_ptr().cast(),
            )
        };
        rc == 0 && vec.iter().all(|b| b & 1 == 1)
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
        self.populate(off, src.len())?;
        // SAFETY: bounds checked above; the server handed this extent to us exclusively
        // under a store lease, so no one else reads or writes it until we commit.
        let dst =
            unsafe { std::slice::from_raw_parts_mut(self.map.as_mut_ptr().add(off), src.len()) };
        Ok(kvtier::chunk::copy_with_checksum(dst, src))
    }

    /// Copies pool bytes at `offset` into `dst`.
    pub fn read(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        let off = self.check(offset, dst.len())?;
        self.populate(off, dst.len())?;
        // SAFETY: bounds checked above; the extent is a sealed chunk held (unevictable,
        // immutable) by our retrieve lease.
        let src = unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(off), dst.len()) };
        kvtier::chunk::copy_payload(dst, src);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};
    use std::time::{Duration, Instant};

    fn memfd(len: u64) -> File {
        // SAFETY: memfd_create with a static NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"shm-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: a fresh descriptor we own.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f
    }

    fn is_populated(m: &ShmMap, g: usize) -> bool {
        m.populated[g / 64].load(Ordering::Relaxed) & (1 << (g % 64)) != 0
    }

    #[test]
    fn the_background_thread_maps_committed_regions_and_commits_nothing() {
        // Four granules; the "server" committed the first and the third only.
        let mut f = memfd(4 * GRANULE as u64);
        for g in [0u64, 2] {
            f.seek(SeekFrom::Start(g * GRANULE as u64)).unwrap();
            f.write_all(&vec![7u8; GRANULE]).unwrap();
        }
        let fd = OwnedFd::from(f.try_clone().unwrap());
        let m = Arc::new(ShmMap::map(fd, 4 * GRANULE as u64).unwrap());
        assert!(m.resident(0, GRANULE) && !m.resident(GRANULE, GRANULE));
        m.map_committed_in_background();
        let t0 = Instant::now();
        while !(is_populated(&m, 0) && is_populated(&m, 2)) {
            if m.no_populate.load(Ordering::Relaxed) {
                return; // kernel older than 5.14: nothing to map ahead of the copies
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "committed granules never mapped"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(50)); // the thread has passed every granule
        assert!(!is_populated(&m, 1) && !is_populated(&m, 3));
        // The uncommitted granules are still not in memory: nothing was committed for them.
        assert!(!m.resident(GRANULE, GRANULE) && !m.resident(3 * GRANULE, GRANULE));
        // The mapped bytes are the server's.
        let mut out = vec![0u8; 16];
        m.read(2 * GRANULE as u64, &mut out).unwrap();
        assert_eq!(out, vec![7u8; 16]);
    }

    #[test]
    fn the_background_thread_stops_when_the_mapping_is_dropped() {
        let f = memfd(GRANULE as u64);
        let m = Arc::new(ShmMap::map(OwnedFd::from(f), GRANULE as u64).unwrap());
        let weak = Arc::downgrade(&m);
        drop(m);
        map_committed(&weak); // returns at once: nothing to map
        assert!(weak.upgrade().is_none());
    }
}
