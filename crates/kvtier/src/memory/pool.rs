//! The pool region and its buffer handles.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use memmap2::{MmapMut, MmapOptions};
use parking_lot::Mutex;

use super::extent::{round_up, ExtentAllocator, PAGE};
use super::populate::{populate, Populate};
use crate::error::{Error, Result};

/// What memory backs the pool.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PoolBacking {
    /// Private anonymous memory (embedded engine).
    #[default]
    Anonymous,
    /// An anonymous memfd, shareable by passing its descriptor to another process.
    Memfd,
    /// A file created privately in this directory (normally `/dev/shm`, or a hugetlbfs
    /// mount) and unlinked at once ([`super::shm_file`]): shareable by passing its
    /// descriptor, like a memfd, and never reachable by name.
    ShmDir(PathBuf),
}

/// How to build a pool.
#[derive(Clone, Debug)]
pub struct PoolOptions {
    /// Size in bytes; rounded down to a multiple of 4 KiB.
    pub bytes: u64,
    /// Backing memory.
    pub backing: PoolBacking,
    /// Ask for transparent huge pages (`MADV_HUGEPAGE`).
    pub huge_pages: bool,
    /// Touch every page at start, so the budget is resident and first use is not slowed by
    /// page faults.
    pub prefault: bool,
}

impl PoolOptions {
    /// Anonymous memory of `bytes`, huge pages on, no prefault.
    pub fn anonymous(bytes: u64) -> PoolOptions {
        PoolOptions {
            bytes,
            backing: PoolBacking::Anonymous,
            huge_pages: true,
            prefault: false,
        }
    }
}

/// Point-in-time usage of a pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Pool size in bytes.
    pub capacity: u64,
    /// Bytes in live buffers.
    pub used: u64,
    /// Largest contiguous free extent.
    pub largest_free: u64,
}

pub(crate) struct PoolInner {
    base: *mut u8,
    capacity: u64,
    alloc: Mutex<ExtentAllocator>,
    backing: PoolBacking,
    fd: Option<File>,
    _map: MmapMut,
}

// SAFETY: the raw base pointer is only dereferenced within extents that the allocator hands
// out exclusively (WritableBuf) or shares read-only (ChunkBuf); the map lives as long as the
// PoolInner.
unsafe impl Send for PoolInner {}
unsafe impl Sync for PoolInner {}

/// A fixed-size memory pool; cheap to clone (shared).
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("capacity", &self.inner.capacity)
            .finish()
    }
}

impl Pool {
    /// Maps a pool. Fails with a clear error when the memory cannot be had; warns when the
    /// pool is larger than the machine's memory or the cgroup limit (refuses it when
    /// `prefault` would touch all of it at start).
    pub fn new(opts: &PoolOptions) -> Result<Pool> {
        let capacity = opts.bytes / PAGE * PAGE;
        if capacity == 0 {
            return Err(Error::invalid(format!(
                "memory pool of {} bytes is smaller than one 4 KiB page",
                opts.bytes
            )));
        }
        let len = usize::try_from(capacity)
            .map_err(|_| Error::invalid("pool size exceeds the address space"))?;
        super::host::check_pool_size(capacity, opts.prefault)?;
        let (map, fd) = match &opts.backing {
            PoolBacking::Anonymous => (
                MmapOptions::new()
                    .len(len)
                    .map_anon()
                    .map_err(|e| Error::io(format!("mapping a {len}-byte memory pool"), e))?,
                None,
            ),
            PoolBacking::Memfd => {
                // SAFETY: memfd_create with a static NUL-terminated name.
                let fd: RawFd =
                    unsafe { libc::memfd_create(c"kvtier-pool".as_ptr(), libc::MFD_CLOEXEC) };
                if fd < 0 {
                    return Err(Error::io(
                        "memfd_create for the memory pool",
                        std::io::Error::last_os_error(),
                    ));
                }
                // SAFETY: fd is a fresh descriptor we own.
                let file = unsafe { File::from_raw_fd(fd) };
                file.set_len(capacity).map_err(|e| {
                    Error::io(format!("sizing the memfd pool to {capacity} bytes"), e)
                })?;
                // SAFETY: the memfd is private to us until we share it; its size is fixed.
                let map = unsafe { MmapOptions::new().len(len).map_mut(&file) }
                    .map_err(|e| Error::io("mapping the memfd pool", e))?;
                (map, Some(file))
            }
            PoolBacking::ShmDir(dir) => {
                let file = super::shm_file::create_unlinked(dir, capacity)?;
                file.set_len(capacity).map_err(|e| {
                    Error::io(format!("sizing the pool file in {}", dir.display()), e)
                })?;
                // SAFETY: the file is ours alone (created exclusively, already unlinked);
                // clients it is passed to map it read/write by agreement and only touch
                // extents the server hands them.
                let map = unsafe { MmapOptions::new().len(len).map_mut(&file) }.map_err(|e| {
                    Error::io(format!("mapping the pool file in {}", dir.display()), e)
                })?;
                (map, Some(file))
            }
        };
        if opts.huge_pages {
            // Best effort: THP may be off or `never` for shmem; the pool works either way.
            let _ = map.advise(memmap2::Advice::HugePage);
        }
        let mut map = map;
        if opts.prefault {
            prefault(&mut map)?;
        }
        let base = map.as_mut_ptr();
        Ok(Pool {
            inner: Arc::new(PoolInner {
                base,
                capacity,
                alloc: Mutex::new(ExtentAllocator::new(capacity)),
                backing: opts.backing.clone(),
                fd,
                _map: map,
            }),
        })
    }

    /// Pool size in bytes.
    pub fn capacity(&self) -> u64 {
        self.inner.capacity
    }

    /// Bytes of shared memory the pool has committed so far (whichever process faulted
    /// them in), for a memfd or file backing; `None` for anonymous memory, which shows in
    /// the process's own RSS instead. One `fstat`: cheap enough for every scrape.
    pub fn committed_bytes(&self) -> Option<u64> {
        let f = self.inner.fd.as_ref()?;
        match super::populate::committed_bytes(f) {
            Ok(b) => Some(b.min(self.inner.capacity)),
            Err(e) => {
                tracing::warn!(error = %e, "fstat of the pool's memory failed");
                None
            }
        }
    }

    /// Usage snapshot.
    pub fn stats(&self) -> PoolStats {
        let a = self.inner.alloc.lock();
        PoolStats {
            capacity: a.capacity(),
            used: a.used_bytes(),
            largest_free: a.largest_free(),
        }
    }

    /// The backing, for sharing the pool with other processes.
    pub fn backing(&self) -> &PoolBacking {
        &self.inner.backing
    }

    /// Descriptor of a memfd or file backing, to hand to a client process.
    pub fn raw_fd(&self) -> Option<RawFd> {
        self.inner.fd.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Whether two handles are the same pool.
    pub fn same_as(&self, other: &Pool) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Allocates a buffer of `len` bytes without evicting anything; `None` when no free
    /// extent is large enough.
    pub fn try_alloc(&self, len: usize) -> Option<WritableBuf> {
        let cap = round_up(len as u64);
        let off = self.inner.alloc.lock().alloc(cap)?;
        Some(WritableBuf {
            ext: Extent {
                pool: self.inner.clone(),
                offset: AtomicU64::new(off),
                len,
                cap,
            },
        })
    }

    /// Compacts the pool: every buffer in `movable` slides towards offset 0 (its bytes
    /// moved with `memmove`), everything else stays. Callers must guarantee that nobody
    /// else can reach the buffers in `movable` during the call (the CPU tier holds its
    /// index lock and passes only buffers whose sole holder is the index).
    pub(crate) fn compact(&self, movable: &[&ChunkBuf]) -> usize {
        let mut by_offset: std::collections::HashMap<u64, &ChunkBuf> =
            movable.iter().map(|b| (b.offset(), *b)).collect();
        let mut a = self.inner.alloc.lock();
        let moves = a.compact(|o| by_offset.contains_key(&o));
        for &(from, to, cap) in &moves {
            let buf = by_offset
                .remove(&from)
                .expect("planned move of a movable buffer");
            // SAFETY: both ranges are inside the mapping; the source extent is exclusively
            // ours (sole holder, under the tier lock) and the target range was free or
            // belonged to extents already moved out of it; `copy` handles the overlap.
            unsafe {
                std::ptr::copy(
                    self.inner.base.add(from as usize),
                    self.inner.base.add(to as usize),
                    cap as usize,
                )
            };
            buf.ext.offset.store(to, Ordering::Release);
        }
        moves.len()
    }
}

/// Commits the whole pool now (`local_cpu_prefault`), in steps so a large pool reports its
/// progress; a pool whose memory cannot be had is an error here, at start, not a crash later.
fn prefault(map: &mut MmapMut) -> Result<()> {
    const STEP: usize = 256 << 20;
    let len = map.len();
    let gib = |b: usize| b as f64 / f64::from(1u32 << 30);
    let started = Instant::now();
    let mut reported = started;
    let p = map.as_mut_ptr();
    let mut off = 0usize;
    while off < len {
        let n = STEP.min(len - off);
        // SAFETY: off + n <= len, inside the mapping we own.
        let populated = unsafe { populate(p.add(off), n, Populate::Write) }.map_err(|e| {
            Error::io(
                format!(
                    "prefaulting the memory pool ({:.1} of {:.1} GiB done): the memory cannot \
                     be had; lower max_local_cpu_size or turn local_cpu_prefault off",
                    gib(off),
                    gib(len)
                ),
                e,
            )
        })?;
        if !populated {
            // Kernel without MADV_POPULATE_WRITE: write one byte per page.
            let mut o = off;
            while o < off + n {
                // SAFETY: o < len, inside the mapping.
                unsafe { p.add(o).write_volatile(0) };
                o += PAGE as usize;
            }
        }
        off += n;
        if reported.elapsed() >= Duration::from_secs(2) && off < len {
            reported = Instant::now();
            tracing::info!(
                done_gib = format!("{:.1}", gib(off)),
                total_gib = format!("{:.1}", gib(len)),
                "prefaulting the L1 pool (local_cpu_prefault)"
            );
        }
    }
    tracing::info!(
        gib = format!("{:.1}", gib(len)),
        secs = format!("{:.1}", started.elapsed().as_secs_f64()),
        "L1 pool prefaulted (local_cpu_prefault)"
    );
    Ok(())
}

struct Extent {
    pool: Arc<PoolInner>,
    offset: AtomicU64,
    len: usize,
    cap: u64,
}

impl Extent {
    fn ptr(&self) -> *mut u8 {
        // SAFETY: offset + cap <= capacity by construction of the allocator.
        unsafe {
            self.pool
                .base
                .add(self.offset.load(Ordering::Acquire) as usize)
        }
    }
}

impl Drop for Extent {
    fn drop(&mut self) {
        let off = self.offset.load(Ordering::Acquire);
        let freed = self.pool.alloc.lock().free(off, self.cap);
        debug_assert!(freed, "pool extent freed twice or never allocated");
    }
}

/// A freshly allocated buffer with a single owner: the only state in which bytes may be
/// written. Dropping it returns the extent to the pool.
pub struct WritableBuf {
    ext: Extent,
}

impl WritableBuf {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.ext.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.ext.len == 0
    }

    /// Offset of the buffer in its pool.
    pub fn offset(&self) -> u64 {
        self.ext.offset.load(Ordering::Acquire)
    }

    /// Bytes reserved in the pool (length rounded up to 4 KiB).
    pub fn capacity(&self) -> u64 {
        self.ext.cap
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the extent is exclusively owned by this buffer.
        unsafe { std::slice::from_raw_parts_mut(self.ext.ptr(), self.ext.len) }
    }

    /// The bytes, read-only.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts(self.ext.ptr(), self.ext.len) }
    }

    /// The whole reserved capacity (a multiple of 4 KiB), for direct I/O of whole pages.
    pub fn as_mut_capacity(&mut self) -> &mut [u8] {
        // SAFETY: the reserved extent is `cap` bytes and exclusively owned.
        unsafe { std::slice::from_raw_parts_mut(self.ext.ptr(), self.ext.cap as usize) }
    }

    /// Shrinks the logical length (the reservation stays).
    pub fn truncate(&mut self, len: usize) {
        self.ext.len = self.ext.len.min(len);
    }

    /// Whether the buffer belongs to `pool`.
    pub fn is_from(&self, pool: &Pool) -> bool {
        Arc::ptr_eq(&self.ext.pool, &pool.inner)
    }

    /// Freezes the contents and makes the buffer shareable.
    pub fn seal(self) -> ChunkBuf {
        ChunkBuf {
            ext: Arc::new(self.ext),
        }
    }
}

/// A sealed, read-only, reference-counted buffer. Each clone is a reader's handle; the
/// extent returns to the pool when the last clone drops.
#[derive(Clone)]
pub struct ChunkBuf {
    ext: Arc<Extent>,
}

impl std::fmt::Debug for ChunkBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkBuf")
            .field("offset", &self.offset())
            .field("len", &self.ext.len)
            .finish()
    }
}

impl ChunkBuf {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.ext.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.ext.len == 0
    }

    /// Offset of the buffer in its pool (the same in every process mapping the pool).
    pub fn offset(&self) -> u64 {
        self.ext.offset.load(Ordering::Acquire)
    }

    /// Bytes reserved in the pool.
    pub fn capacity(&self) -> u64 {
        self.ext.cap
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: sealed buffers are never written; the extent lives while `self` does and
        // is only relocated when no handle other than the index's exists.
        unsafe { std::slice::from_raw_parts(self.ext.ptr(), self.ext.len) }
    }

    /// The whole reserved extent (length rounded up to 4 KiB), for direct I/O of whole
    /// pages; bytes past `len()` are unspecified.
    pub fn as_capacity_slice(&self) -> &[u8] {
        // SAFETY: the extent is `cap` bytes; sealed buffers are read-only.
        unsafe { std::slice::from_raw_parts(self.ext.ptr(), self.ext.cap as usize) }
    }

    /// Number of live handles to this buffer (the cache's own included).
    pub fn handle_count(&self) -> usize {
        Arc::strong_count(&self.ext)
    }

    /// Whether the buffer belongs to `pool`.
    pub fn is_from(&self, pool: &Pool) -> bool {
        Arc::ptr_eq(&self.ext.pool, &pool.inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_page_aligned_and_return_on_drop() {
        let pool = Pool::new(&PoolOptions::anonymous(1 << 20)).unwrap();
        let mut a = pool.try_alloc(5000).unwrap();
        assert_eq!(a.capacity(), 8192);
        assert_eq!(a.as_mut_slice().as_ptr() as usize % 4096, 0);
        a.as_mut_slice().fill(3);
        let sealed = a.seal();
        let reader = sealed.clone();
        assert_eq!(reader.handle_count(), 2);
        drop(sealed);
        assert_eq!(pool.stats().used, 8192);
        assert!(reader.as_slice().iter().all(|&b| b == 3));
        drop(reader);
        assert_eq!(pool.stats().used, 0);
    }

    #[test]
    fn budget_is_never_exceeded() {
        let pool = Pool::new(&PoolOptions::anonymous(64 * 4096)).unwrap();
        let mut held = Vec::new();
        while let Some(b) = pool.try_alloc(10_000) {
            held.push(b);
        }
        assert_eq!(held.len(), 21); // 3 pages each, 64 pages total
        assert!(pool.stats().used <= pool.capacity());
    }

    #[test]
    fn shm_dir_and_memfd_backings_map() {
        let dir = tempfile::tempdir().unwrap();
        for backing in [PoolBacking::Memfd, PoolBacking::ShmDir(dir.path().into())] {
            let pool = Pool::new(&PoolOptions {
                bytes: 1 << 20,
                backing,
                huge_pages: false,
                prefault: true,
            })
            .unwrap();
            assert!(pool.raw_fd().is_some());
            let mut b = pool.try_alloc(100).unwrap();
            b.as_mut_slice()[99] = 9;
            assert_eq!(
                std::fs::read_dir(dir.path()).unwrap().count(),
                0,
                "the pool file has no name while the pool lives"
            );
        }
    }

    #[test]
    fn a_shared_pool_commits_memory_as_it_is_written_unless_prefaulted() {
        let anon = Pool::new(&PoolOptions::anonymous(1 << 20)).unwrap();
        assert_eq!(
            anon.committed_bytes(),
            None,
            "anonymous memory is in the RSS"
        );
        let shared = |prefault| {
            Pool::new(&PoolOptions {
                bytes: 64 << 20,
                backing: PoolBacking::Memfd,
                huge_pages: false,
                prefault,
            })
            .unwrap()
        };
        let lazy = shared(false);
        assert_eq!(
            lazy.committed_bytes(),
            Some(0),
            "nothing committed at start"
        );
        let mut b = lazy.try_alloc(3 * 4096).unwrap();
        b.as_mut_slice().fill(1);
        assert_eq!(lazy.committed_bytes(), Some(3 * 4096));
        assert_eq!(shared(true).committed_bytes(), Some(64 << 20));
    }

    #[test]
    fn compaction_moves_bytes_and_offsets_together() {
        let pool = Pool::new(&PoolOptions::anonymous(8 * 4096)).unwrap();
        let mut bufs: Vec<ChunkBuf> = (0..8u8)
            .map(|i| {
                let mut b = pool.try_alloc(4096).unwrap();
                b.as_mut_slice().fill(i);
                b.seal()
            })
            .collect();
        // Free every other buffer: 4 pages free but no two adjacent.
        let kept: Vec<ChunkBuf> = bufs
            .drain(..)
            .enumerate()
            .filter(|(i, _)| i % 2 == 1)
            .map(|x| x.1)
            .collect();
        assert_eq!(pool.stats().largest_free, 4096);
        let refs: Vec<&ChunkBuf> = kept.iter().collect();
        pool.compact(&refs);
        assert_eq!(pool.stats().largest_free, 4 * 4096);
        for (j, b) in kept.iter().enumerate() {
            let expect = (2 * j + 1) as u8;
            assert!(b.as_slice().iter().all(|&x| x == expect));
        }
    }
}
