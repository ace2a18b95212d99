//! Page-aligned buffers and the ring of synthetic KV chunks that payloads are built from.

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// One GiB.
pub const GIB: usize = 1 << 30;
/// One MiB.
pub const MIB: usize = 1 << 20;
/// Size (and alignment) of a transparent huge page on x86-64 and most arm64 kernels.
const HUGE_PAGE: usize = 2 * MIB;

/// A heap buffer aligned to a page (to a 2 MiB huge page when at least that big), zero-filled (so every page is resident) on creation.
///
/// Large copies are much slower from/to 16-byte-aligned `Vec<u8>` storage on some
/// machines (4.5x measured on the reference box), so every I/O buffer in the bench uses
/// this instead, matching the page-aligned pool the engine copies into.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer exclusively owns its allocation; `&`/`&mut` access follows the usual
// borrow rules through `Deref`/`DerefMut`.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Alignment of every buffer.
    pub const ALIGN: usize = 4096;

    /// Allocates `len` zeroed bytes. Zeroing writes every page, so later timed copies
    /// never pay for first-touch page faults.
    pub fn new(len: usize) -> AlignedBuf {
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size (see `layout`).
        let raw = unsafe { alloc::alloc(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        advise_huge_pages(ptr, layout.size());
        // SAFETY: `ptr` is valid for `layout.size()` bytes; after this they are initialised.
        unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, layout.size()) };
        AlignedBuf { ptr, len }
    }

    fn layout(len: usize) -> Layout {
        // Buffers that can hold a huge page are aligned to one so THP can back all of it.
        let align = if len >= HUGE_PAGE {
            HUGE_PAGE
        } else {
            Self::ALIGN
        };
        // A zero-length request still allocates one byte: `alloc` forbids zero sizes.
        Layout::from_size_align(len.max(1), align).expect("buffer size overflows a Layout")
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` initialised (zeroed) bytes owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with exactly this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

/// Asks for transparent huge pages before the first touch, like the engine's pool does
/// (`local_cpu_huge_pages`). With THP in `madvise` mode this cuts page-fault time for
/// gigabyte buffers from seconds to milliseconds on slow VMs, and keeps TLB behaviour of
/// the baseline comparable to the engine's. Purely advisory: failure is ignored.
fn advise_huge_pages(ptr: NonNull<u8>, len: usize) {
    #[cfg(target_os = "linux")]
    if len >= HUGE_PAGE {
        // SAFETY: `ptr` is page-aligned and the range is one live allocation we own;
        // MADV_HUGEPAGE does not change its contents.
        unsafe {
            libc::madvise(ptr.as_ptr().cast(), len, libc::MADV_HUGEPAGE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, len);
}

/// SplitMix64: a tiny, fast generator, good enough to make bytes incompressible.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `buf` with pseudo-random bytes derived from `seed`.
pub fn fill_pseudo_random(buf: &mut [u8], seed: u64) {
    let mut state = seed;
    let mut words = buf.chunks_exact_mut(8);
    for w in &mut words {
        w.copy_from_slice(&splitmix64(&mut state).to_le_bytes());
    }
    let tail = words.into_remainder();
    let last = splitmix64(&mut state).to_le_bytes();
    tail.copy_from_slice(&last[..tail.len()]);
}

/// Bytes of a chunk's identity stamp: document id then chunk index, both little-endian u64.
const STAMP_LEN: usize = 16;

/// A fixed set of pseudo-random chunk-sized source buffers.
///
/// Generating gigabytes of random KV per run would dominate the bench and its memory, so
/// payloads are composed by copying ring slots and stamping each chunk with its
/// (document, chunk) identity; the stamp makes every chunk's content unique, which lets
/// verification catch a chunk served for the wrong document or position.
pub struct SourceRing {
    buf: AlignedBuf,
    chunk_bytes: usize,
    slots: usize,
}

impl SourceRing {
    /// Target size of the ring: larger than any last-level cache so copies from it are cold.
    const TARGET_BYTES: usize = 256 * MIB;
    /// Smallest ring, whatever the chunk size.
    const MIN_BYTES: usize = 64 * MIB;
    /// Largest ring (unless a single chunk is bigger).
    const MAX_BYTES: usize = GIB;

    /// Builds a ring of chunks of `chunk_bytes` bytes, filled once from `seed`.
    pub fn new(chunk_bytes: usize, seed: u64) -> SourceRing {
        let slots = Self::slot_count(chunk_bytes);
        let mut buf = AlignedBuf::new(slots * chunk_bytes);
        fill_pseudo_random(&mut buf, seed ^ 0x6B76_7469_6572);
        SourceRing {
            buf,
            chunk_bytes,
            slots,
        }
    }

    /// How many slots a ring of chunks of `chunk_bytes` holds.
    pub fn slot_count(chunk_bytes: usize) -> usize {
        let chunk = chunk_bytes.max(1);
        let want = Self::TARGET_BYTES.div_ceil(chunk).max(4);
        let at_least = Self::MIN_BYTES.div_ceil(chunk);
        let at_most = (Self::MAX_BYTES / chunk).max(1);
        want.max(at_least).min(at_most)
    }

    /// Total bytes held.
    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// Slot `i` (wrapping around).
    pub fn slot(&self, i: usize) -> &[u8] {
        let s = i % self.slots;
        &self.buf[s * self.chunk_bytes..(s + 1) * self.chunk_bytes]
    }

    /// Which slot chunk `chunk` of document `doc` is copied from. Consecutive chunks use
    /// consecutive slots; documents start at scattered offsets.
    fn slot_of(&self, doc: u64, chunk: usize) -> usize {
        (doc.wrapping_mul(0x9E37_79B9) as usize).wrapping_add(chunk) % self.slots
    }

    /// Writes document `doc`'s payload into `out`: chunk `i` occupies
    /// `i * chunk_bytes ..`, the last chunk may be short.
    pub fn compose(&self, doc: u64, out: &mut [u8]) {
        for (i, piece) in out.chunks_mut(self.chunk_bytes).enumerate() {
            piece.copy_from_slice(&self.slot(self.slot_of(doc, i))[..piece.len()]);
            let stamp = stamp(doc, i);
            let n = piece.len().min(STAMP_LEN);
            piece[..n].copy_from_slice(&stamp[..n]);
        }
    }

    /// Whether `got` is exactly (a prefix of) chunk `chunk` of document `doc` as
    /// [`SourceRing::compose`] writes it.
    pub fn chunk_matches(&self, doc: u64, chunk: usize, got: &[u8]) -> bool {
        if got.len() > self.chunk_bytes {
            return false;
        }
        let n = got.len().min(STAMP_LEN);
        let src = &self.slot(self.slot_of(doc, chunk))[..got.len()];
        got[..n] == stamp(doc, chunk)[..n] && got[n..] == src[n..]
    }
}

fn stamp(doc: u64, chunk: usize) -> [u8; STAMP_LEN] {
    let mut s = [0u8; STAMP_LEN];
    s[..8].copy_from_slice(&doc.to_le_bytes());
    s[8..].copy_from_slice(&(chunk as u64).to_le_bytes());
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_is_page_aligned_and_zeroed() {
        for len in [0, 1, 4095, 4096, 3 * MIB + 7] {
            let b = AlignedBuf::new(len);
            assert_eq!(b.as_ptr() as usize % AlignedBuf::ALIGN, 0, "len {len}");
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn ring_size_is_bounded() {
        assert_eq!(SourceRing::slot_count(32 * MIB), 8);
        assert_eq!(SourceRing::slot_count(512 * 1024), 512);
        assert_eq!(SourceRing::slot_count(80 * MIB), 4);
        assert_eq!(SourceRing::slot_count(2 * GIB), 1);
        assert_eq!(SourceRing::slot_count(16), 16 * MIB);
    }

    #[test]
    fn composed_chunks_verify_and_differ_between_docs() {
        let chunk = 4096 + 12;
        let ring = SourceRing::new(chunk, 7);
        let mut a = vec![0u8; chunk * 3 + 100];
        ring.compose(1, &mut a);
        for (i, piece) in a.chunks(chunk).enumerate() {
            assert!(ring.chunk_matches(1, i, piece), "chunk {i}");
            assert!(
                !ring.chunk_matches(2, i, piece),
                "chunk {i} must not match doc 2"
            );
        }
        assert!(!ring.chunk_matches(1, 1, &a[..chunk]));
        a[chunk + 500] ^= 1;
        assert!(!ring.chunk_matches(1, 1, &a[chunk..2 * chunk]));
    }
}
