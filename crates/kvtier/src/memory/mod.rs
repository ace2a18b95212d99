//! Memory: one pre-allocated, page-aligned pool and the buffers carved out of it.
//!
//! # Design
//! The CPU tier owns a single region of exactly the configured budget, mapped once
//! (anonymous memory, or a memfd or a private unlinked file under `/dev/shm` whose
//! descriptor other processes can map; transparent huge pages requested where the kernel
//! allows). A pool larger than the machine's memory or the cgroup limit is reported at
//! start ([`host`]). Buffers are extents of that
//! region addressed by **offset**, so a handle means the same bytes in every process that
//! maps the pool.
//!
//! Buffers of any size come from a best-fit extent allocator with coalescing (4 KiB
//! granularity): a short last chunk and two models' chunk sizes share the pool without
//! per-chunk `malloc`. Fragmentation is handled in two steps when an allocation fails: the
//! CPU tier first evicts in policy order until enough bytes are free, then **compacts**:
//! every chunk that no reader holds and no pin protects slides down (one `memmove` each,
//! offsets updated under the tier lock), merging the free space. Only buffers somebody is
//! using stay put, so a store fails only when the bytes it needs are really held.
//!
//! Lifetimes are RAII: a [`WritableBuf`] is the unique, writable state of a fresh buffer;
//! [`WritableBuf::seal`] turns it into a shared, read-only [`ChunkBuf`]; the extent returns
//! to the pool when the last handle drops.

mod extent;
pub mod host;
mod pool;
pub mod populate;
pub mod shm_file;

pub use extent::{round_up, ExtentAllocator, PAGE};
pub use host::HostMemory;
pub use pool::{ChunkBuf, Pool, PoolBacking, PoolOptions, PoolStats, WritableBuf};

/// Where a reader gets buffers to read into (the L1 pool, with eviction), so a lower-tier read
/// lands directly in memory that can be written back without another copy.
pub trait BufferSource: Send + Sync {
    /// A buffer of `len` bytes, or `None` when the pool cannot make room.
    fn allocate(&self, len: usize) -> Option<WritableBuf>;
}
