//! xxh3-64 computed with AVX2 while the bytes are copied: one pass over memory per segment.
//!
//! Why: the checksum crate picks its SIMD width at compile time, so a portable build hashes
//! with SSE2, and a store used to copy a block and then hash it: on the 2-core VM that made
//! an L1 store of a 4 MiB chunk slower than a single-thread `memcpy` (issue 21). Here each
//! 64-byte stripe is loaded once, written to the destination and folded into the hash, with
//! AVX2 chosen at run time. The result is bit-identical to `xxhash_rust::xxh3::xxh3_64`
//! (seed 0, default secret): checksums already on disk stay valid. Only the long-input
//! path (more than 240 bytes) is implemented; shorter inputs go to the crate.

/// The XXH3 default secret (192 bytes), a constant of the algorithm's specification.
const SECRET: [u8; 192] = [
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
];

const PRIME32_1: u64 = 0x9E37_79B1;
const PRIME32_2: u64 = 0x85EB_CA77;
const PRIME32_3: u64 = 0xC2B2_AE3D;
const PRIME64_1: u64 = 0x9E37_79B1_85EB_CA87;
const PRIME64_2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const PRIME64_3: u64 = 0x1656_67B1_9E37_79F9;
const PRIME64_4: u64 = 0x85EB_CA77_C2B2_AE63;
const PRIME64_5: u64 = 0x27D4_EB2F_1656_67C5;

/// Inputs of at most this many bytes take xxh3's short paths (left to the crate).
const MIDSIZE_MAX: usize = 240;
/// Bytes per stripe, stripes per block, bytes per block (with the 192-byte secret).
const STRIPE: usize = 64;
const STRIPES_PER_BLOCK: usize = (SECRET.len() - STRIPE) / 8;
const BLOCK: usize = STRIPE * STRIPES_PER_BLOCK;

/// Whether [`copy_xxh3`] can run on this CPU (AVX2, detected once by std).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// xxh3-64 of `src`, also copying it into `dst` (same length) when given; `streaming`
/// writes `dst` with non-temporal stores (see `stream_copy`). `None` when this path does
/// not apply (no AVX2, input of 240 bytes or less, a streaming destination not 32-byte
/// aligned): the caller then uses the crate's hash and a plain copy.
pub(crate) fn copy_xxh3(dst: Option<&mut [u8]>, src: &[u8], streaming: bool) -> Option<u64> {
    if src.len() <= MIDSIZE_MAX || !available() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let dst_ptr = match dst {
            Some(d) => {
                assert_eq!(d.len(), src.len(), "copy_xxh3: length mismatch");
                if streaming && d.as_ptr().align_offset(32) != 0 {
                    return None;
                }
                d.as_mut_ptr()
            }
            None => std::ptr::null_mut(),
        };
        // SAFETY: AVX2 is present (checked above); `src` is valid for its length and
        // `dst_ptr`, when not null, for the same length (asserted), 32-byte aligned when
        // streaming (checked); `&mut` guarantees the two do not overlap.
        Some(unsafe { avx2::copy_hash(dst_ptr, src, streaming) })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (dst, streaming);
        None
    }
}

fn read64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

fn mul128_fold64(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ ((p >> 64) as u64)
}

/// Merges the eight accumulators into the 64-bit result (long inputs).
fn finish(acc: &[u64; 8], len: usize) -> u64 {
    // The merge reads the secret from byte 11 on, 16 bytes per accumulator pair.
    let mut r = (len as u64).wrapping_mul(PRIME64_1);
    for i in 0..4 {
        r = r.wrapping_add(mul128_fold64(
            acc[2 * i] ^ read64(&SECRET, 11 + 16 * i),
            acc[2 * i + 1] ^ read64(&SECRET, 11 + 16 * i + 8),
        ));
    }
    r ^= r >> 37;
    r = r.wrapping_mul(0x1656_6791_9E37_79F9);
    r ^ (r >> 32)
}

const INIT_ACC: [u64; 8] = [
    PRIME32_3, PRIME64_1, PRIME64_2, PRIME64_3, PRIME64_4, PRIME32_2, PRIME64_5, PRIME32_1,
];

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::{
        __m256i, _mm256_add_epi64, _mm256_loadu_si256, _mm256_mul_epu32, _mm256_set1_epi32,
        _mm256_shuffle_epi32, _mm256_slli_epi64, _mm256_srli_epi64, _mm256_storeu_si256,
        _mm256_stream_si256, _mm256_xor_si256, _mm_sfence,
    };

    use super::{finish, BLOCK, INIT_ACC, PRIME32_1, SECRET, STRIPE, STRIPES_PER_BLOCK};

    /// Folds one 64-byte stripe at `src` into `acc` with the secret at `key`, first storing
    /// it at `dst` (when not null).
    ///
    /// # Safety
    /// AVX2 present; `src` readable for 64 bytes, `key` for 64 bytes; `dst` null or writable
    /// for 64 bytes (32-byte aligned when `streaming`).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn stripe(
        acc: &mut [__m256i; 2],
        src: *const u8,
        key: *const u8,
        dst: *mut u8,
        streaming: bool,
    ) {
        for (j, a) in acc.iter_mut().enumerate() {
            let data = _mm256_loadu_si256(src.add(32 * j).cast());
            if !dst.is_null() {
                let d = dst.add(32 * j).cast();
                if streaming {
                    _mm256_stream_si256(d, data);
                } else {
                    _mm256_storeu_si256(d, data);
                }
            }
            let k = _mm256_xor_si256(data, _mm256_loadu_si256(key.add(32 * j).cast()));
            // (low 32 bits × high 32 bits) of each 64-bit lane of data ^ key.
            let product = _mm256_mul_epu32(k, _mm256_srli_epi64::<32>(k));
            // Each lane also gets its neighbour's input word (lanes 0<->1, 2<->3).
            let swapped = _mm256_shuffle_epi32::<0b01_00_11_10>(data);
            *a = _mm256_add_epi64(product, _mm256_add_epi64(*a, swapped));
        }
    }

    /// The scramble at the end of each block.
    ///
    /// # Safety
    /// AVX2 present.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn scramble(acc: &mut [__m256i; 2]) {
        let key = SECRET.as_ptr().add(SECRET.len() - STRIPE);
        let prime = _mm256_set1_epi32(PRIME32_1 as i32);
        for (j, a) in acc.iter_mut().enumerate() {
            let mut x = *a;
            x = _mm256_xor_si256(x, _mm256_srli_epi64::<47>(x));
            x = _mm256_xor_si256(x, _mm256_loadu_si256(key.add(32 * j).cast()));
            let lo = _mm256_mul_epu32(x, prime);
            let hi = _mm256_mul_epu32(_mm256_srli_epi64::<32>(x), prime);
            *a = _mm256_add_epi64(lo, _mm256_slli_epi64::<32>(hi));
        }
    }

    /// xxh3-64 of `src` (longer than 240 bytes), copying it to `dst` when not null.
    ///
    /// # Safety
    /// AVX2 present; `dst` null or valid for `src.len()` bytes, not overlapping `src`, and
    /// 32-byte aligned when `streaming`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn copy_hash(dst: *mut u8, src: &[u8], streaming: bool) -> u64 {
        let len = src.len();
        let s = src.as_ptr();
        let at = |off: usize| if dst.is_null() { dst } else { dst.add(off) };
        let mut acc = [
            _mm256_loadu_si256(INIT_ACC.as_ptr().cast()),
            _mm256_loadu_si256(INIT_ACC.as_ptr().add(4).cast()),
        ];
        let secret = SECRET.as_ptr();
        let blocks = (len - 1) / BLOCK;
        for b in 0..blocks {
            for i in 0..STRIPES_PER_BLOCK {
                let off = b * BLOCK + i * STRIPE;
                stripe(&mut acc, s.add(off), secret.add(i * 8), at(off), streaming);
            }
            scramble(&mut acc);
        }
        let stripes = ((len - 1) - blocks * BLOCK) / STRIPE;
        for i in 0..stripes {
            let off = blocks * BLOCK + i * STRIPE;
            stripe(&mut acc, s.add(off), secret.add(i * 8), at(off), streaming);
        }
        let done = blocks * BLOCK + stripes * STRIPE;
        if !dst.is_null() {
            if streaming {
                // Streaming stores are weakly ordered: fence before anyone may look.
                _mm_sfence();
            }
            std::ptr::copy_nonoverlapping(s.add(done), dst.add(done), len - done);
        }
        // The last 64 input bytes (overlapping what came before) with the secret at
        // 192 - 64 - 7; never stored again.
        let last_key = secret.add(SECRET.len() - STRIPE - 7);
        stripe(
            &mut acc,
            s.add(len - STRIPE),
            last_key,
            std::ptr::null_mut(),
            false,
        );
        let mut out = [0u64; 8];
        _mm256_storeu_si256(out.as_mut_ptr().cast(), acc[0]);
        _mm256_storeu_si256(out.as_mut_ptr().add(4).cast(), acc[1]);
        finish(&out, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 33) as u8
            })
            .collect()
    }

    #[test]
    fn matches_the_crate_and_copies_at_every_length_and_alignment() {
        if !available() {
            eprintln!("no AVX2 on this CPU: the fused path is not used, nothing to compare");
            return;
        }
        let src = bytes((1 << 20) + 4096, 9);
        let mut dst = vec![0u8; src.len() + 64];
        let lens = [
            241,
            255,
            256,
            1023,
            1024,
            1025,
            1088,
            4096,
            65_536,
            (1 << 20) - 1,
            1 << 20,
        ];
        for &len in &lens {
            for src_off in [0usize, 3] {
                let s = &src[src_off..src_off + len];
                let want = xxhash_rust::xxh3::xxh3_64(s);
                assert_eq!(
                    copy_xxh3(None, s, false),
                    Some(want),
                    "hash only, len {len}"
                );
                // 32-byte aligned destination, streaming and not; unaligned not streaming.
                let base = dst.as_ptr().align_offset(32);
                for (d_off, streaming) in [(base, true), (base, false), (base + 1, false)] {
                    let d = &mut dst[d_off..d_off + len];
                    d.fill(0);
                    assert_eq!(
                        copy_xxh3(Some(d), s, streaming),
                        Some(want),
                        "len {len} src+{src_off} dst+{d_off} streaming {streaming}"
                    );
                    assert_eq!(&dst[d_off..d_off + len], s, "copy, len {len}");
                }
            }
        }
        // Unaligned streaming destinations and short inputs are declined, not mishandled.
        let base = dst.as_ptr().align_offset(32);
        assert_eq!(
            copy_xxh3(
                Some(&mut dst[base + 1..base + 1 + 4096]),
                &src[..4096],
                true
            ),
            None
        );
        assert_eq!(copy_xxh3(None, &src[..240], false), None);
    }
}
