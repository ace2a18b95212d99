//! Copies that bypass the CPU caches on the destination side (non-temporal stores).
//!
//! Why: a chunk copy is 4–32 MiB, far larger than the caches, and its destination is not
//! read again soon by this core (a store's L1 copy goes to disk by DMA; a retrieve's copy
//! goes to the model). A plain copy first reads every destination line from memory
//! (read-for-ownership), then writes it back: three passes over memory per byte. Streaming
//! stores skip the read, so a copy costs two. Memory bandwidth is what the copies share
//! with the device's DMA; measured on the 2-core VM, a concurrent cached copy cut `O_DIRECT`
//! reads by about a quarter.

/// Copies `src` into `dst` (same length) with non-temporal stores where the CPU has them;
/// a plain copy elsewhere. Ends with a store fence, so the bytes are visible to other
/// threads (and to a device) once this returns, like any other write.
pub(crate) fn copy_nt(dst: &mut [u8], src: &[u8]) {
    debug_assert_eq!(dst.len(), src.len());
    let n = dst.len().min(src.len());
    #[cfg(target_arch = "x86_64")]
    {
        // SSE2 is part of x86_64, so no runtime detection is needed; the copy is bound by
        // memory, not by the vector width.
        // SAFETY: both slices are valid for `n` bytes and do not overlap (`&mut` vs `&`).
        unsafe { copy_nt_sse2(dst.as_mut_ptr(), src.as_ptr(), n) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    dst[..n].copy_from_slice(&src[..n]);
}

/// # Safety
/// `dst` and `src` must be valid for `n` bytes and must not overlap.
#[cfg(target_arch = "x86_64")]
unsafe fn copy_nt_sse2(dst: *mut u8, src: *const u8, n: usize) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
    const LINE: usize = 64;
    // Head: plain copy up to the first 64-byte boundary of the destination.
    let head = (dst.align_offset(LINE)).min(n);
    std::ptr::copy_nonoverlapping(src, dst, head);
    let mut off = head;
    while off + LINE <= n {
        let s = src.add(off) as *const __m128i;
        let d = dst.add(off) as *mut __m128i;
        let a = _mm_loadu_si128(s);
        let b = _mm_loadu_si128(s.add(1));
        let c = _mm_loadu_si128(s.add(2));
        let e = _mm_loadu_si128(s.add(3));
        _mm_stream_si128(d, a);
        _mm_stream_si128(d.add(1), b);
        _mm_stream_si128(d.add(2), c);
        _mm_stream_si128(d.add(3), e);
        off += LINE;
    }
    // Streaming stores are weakly ordered: fence before anyone may look at the bytes.
    _mm_sfence();
    std::ptr::copy_nonoverlapping(src.add(off), dst.add(off), n - off);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_every_byte_at_any_alignment_and_length() {
        let src: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 253) as u8).collect();
        for (dst_off, src_off, len) in [
            (0, 0, 0),
            (0, 0, 63),
            (1, 0, 64),
            (0, 3, 65),
            (17, 5, 4096),
            (63, 1, 65_000),
            (0, 0, 69_000),
        ] {
            let mut dst = vec![0u8; len + dst_off + 8];
            copy_nt(
                &mut dst[dst_off..dst_off + len],
                &src[src_off..src_off + len],
            );
            assert_eq!(&dst[dst_off..dst_off + len], &src[src_off..src_off + len]);
            assert!(
                dst[..dst_off].iter().all(|&b| b == 0),
                "wrote before the slice"
            );
            assert!(
                dst[dst_off + len..].iter().all(|&b| b == 0),
                "wrote past the slice"
            );
        }
    }
}
