//! The chunk digests `d_i` of the key spec (§3): BLAKE3 of each chunk's token bytes, many
//! chunks at a time.
//!
//! BLAKE3's SIMD parallelism runs across the 1 KiB pieces of *one* input, so hashing a
//! 256-token chunk (exactly 1 KiB) on its own uses one lane of the vector unit. A 128K-token
//! prompt is 512 such inputs: here they are hashed side by side instead, up to 16 per pass
//! with AVX-512, by the `hash_many` routine BLAKE3's own hasher runs over the pieces of a
//! large input. A digest is the same bytes `blake3::hash` gives (the tests compare them over
//! every shape): an input of at most 1 KiB is a single BLAKE3 piece whose last block carries
//! the root flag, and an input of whole KiB pieces is its pieces' chaining values merged as
//! BLAKE3's tree merges them.
//!
//! `hash_many` is public but hidden in blake3 (meant for its benchmarks), which is why the
//! workspace pins blake3 to one release; shapes it cannot take (a chunk that is neither a
//! multiple of 64 bytes up to 1 KiB nor a multiple of 1 KiB, a partial tail chunk) are
//! hashed one by one with the public API.

#[allow(deprecated)]
use blake3::platform::Platform;
use blake3::IncrementCounter;
use rayon::prelude::*;

/// A 32-byte digest or chaining value.
pub(crate) type Digest = [u8; 32];

/// BLAKE3's block and piece ("chunk" in its spec) sizes, in bytes.
const BLOCK_LEN: usize = blake3::BLOCK_LEN;
const PIECE_LEN: usize = blake3::CHUNK_LEN;
/// BLAKE3's initialisation vector: the key words of the default (unkeyed) hash mode.
const IV: [u32; 8] = [
    0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19,
];
/// BLAKE3's domain flags (its spec, table 3).
const CHUNK_START: u8 = 1 << 0;
const CHUNK_END: u8 = 1 << 1;
const ROOT: u8 = 1 << 3;
/// Chunks of a shape `hash_many` cannot take are hashed on the rayon pool from this many on.
const PARALLEL_MIN_CHUNKS: usize = 64;

/// BLAKE3 of each of the `n` consecutive `chunk_len`-byte inputs at the start of `bytes`
/// (`n * chunk_len <= bytes.len()`).
pub(crate) fn digests(bytes: &[u8], chunk_len: usize, n: usize) -> Vec<Digest> {
    let bytes = &bytes[..n * chunk_len];
    if n == 0 {
        return Vec::new();
    }
    if chunk_len % BLOCK_LEN == 0 && chunk_len <= PIECE_LEN {
        return single_piece(bytes, chunk_len, n);
    }
    if chunk_len % PIECE_LEN == 0 {
        return whole_pieces(bytes, chunk_len, n);
    }
    let one = |i: usize| *blake3::hash(&bytes[i * chunk_len..(i + 1) * chunk_len]).as_bytes();
    if n >= PARALLEL_MIN_CHUNKS {
        (0..n).into_par_iter().map(one).collect()
    } else {
        (0..n).map(one).collect()
    }
}

/// Inputs of 1..=16 whole blocks: one BLAKE3 piece each, finished as the root. `hash_many`
/// takes the input length as a constant, so each block count is its own instance.
fn single_piece(bytes: &[u8], chunk_len: usize, n: usize) -> Vec<Digest> {
    let mut out = vec![[0u8; 32]; n];
    macro_rules! by_blocks {
        ($($b:literal),*) => {
            match chunk_len / BLOCK_LEN {
                $($b => hash_many::<{ $b * BLOCK_LEN }>(
                    bytes, $b * BLOCK_LEN, 0, 0, CHUNK_END | ROOT, &mut out,
                ),)*
                _ => unreachable!("1..=16 blocks"),
            }
        };
    }
    by_blocks!(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16);
    out
}

/// Inputs of k >= 2 whole pieces: the chaining values of piece j of every input in one
/// `hash_many` pass (they share the piece counter j), then each input's tree.
fn whole_pieces(bytes: &[u8], chunk_len: usize, n: usize) -> Vec<Digest> {
    let k = chunk_len / PIECE_LEN;
    // cvs[j * n + i]: the chaining value of piece j of input i.
    let mut cvs = vec![[0u8; 32]; k * n];
    for (j, out) in cvs.chunks_exact_mut(n).enumerate() {
        hash_many::<PIECE_LEN>(bytes, chunk_len, j * PIECE_LEN, j as u64, CHUNK_END, out);
    }
    (0..n)
        .map(|i| {
            let mine: Vec<Digest> = (0..k).map(|j| cvs[j * n + i]).collect();
            root_of(&mine)
        })
        .collect()
}

/// The root hash of a tree over >= 2 piece chaining values.
fn root_of(cvs: &[Digest]) -> Digest {
    use blake3::hazmat::{merge_subtrees_root, Mode};
    let left = left_len(cvs.len());
    let (l, r) = (subtree_cv(&cvs[..left]), subtree_cv(&cvs[left..]));
    *merge_subtrees_root(&l, &r, Mode::Hash).as_bytes()
}

/// The chaining value of a (non-root) subtree over >= 1 piece chaining values.
fn subtree_cv(cvs: &[Digest]) -> Digest {
    use blake3::hazmat::{merge_subtrees_non_root, Mode};
    if cvs.len() == 1 {
        return cvs[0];
    }
    let left = left_len(cvs.len());
    let (l, r) = (subtree_cv(&cvs[..left]), subtree_cv(&cvs[left..]));
    merge_subtrees_non_root(&l, &r, Mode::Hash)
}

/// BLAKE3's left subtree over `len >= 2` whole pieces: the largest power of two below `len`.
fn left_len(len: usize) -> usize {
    1 << (usize::BITS - 1 - (len - 1).leading_zeros())
}

/// `blake3::platform::Platform::hash_many` over `out.len()` inputs of `N` bytes, input `i` at
/// `bytes[i * stride + offset..]`, all at piece counter `counter`, in the default hash mode.
fn hash_many<const N: usize>(
    bytes: &[u8],
    stride: usize,
    offset: usize,
    counter: u64,
    flags_end: u8,
    out: &mut [Digest],
) {
    let inputs: Vec<&[u8; N]> = (0..out.len())
        .map(|i| {
            let at = i * stride + offset;
            <&[u8; N]>::try_from(&bytes[at..at + N]).expect("a slice of N bytes")
        })
        .collect();
    #[allow(deprecated)]
    Platform::detect().hash_many(
        &inputs,
        &IV,
        counter,
        IncrementCounter::No,
        0,
        CHUNK_START,
        flags_end,
        out.as_flattened_mut(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
            .collect()
    }

    fn one_by_one(bytes: &[u8], chunk_len: usize, n: usize) -> Vec<Digest> {
        (0..n)
            .map(|i| *blake3::hash(&bytes[i * chunk_len..(i + 1) * chunk_len]).as_bytes())
            .collect()
    }

    #[test]
    fn every_shape_matches_blake3_hash() {
        // Block multiples up to one piece (single_piece), whole pieces (whole_pieces, trees of
        // 2..=5 pieces: balanced and not), and lengths neither path takes; chunk counts below
        // and above the SIMD width and the rayon threshold.
        let lens = (1..=16).map(|b| b * BLOCK_LEN).chain([
            2 * PIECE_LEN,
            3 * PIECE_LEN,
            4 * PIECE_LEN,
            5 * PIECE_LEN,
            4,
            60,
            1028,
            1088,
            2048 + 64,
        ]);
        for len in lens {
            for n in [0, 1, 3, 16, 17, 70] {
                let b = bytes(len * n + 5, len as u8);
                assert_eq!(
                    digests(&b, len, n),
                    one_by_one(&b, len, n),
                    "{n} inputs of {len} bytes"
                );
            }
        }
    }

    #[test]
    fn left_subtree_is_the_largest_power_of_two_below() {
        let got: Vec<usize> = (2..=9).map(left_len).collect();
        assert_eq!(got, [1, 2, 2, 4, 4, 4, 4, 8]);
    }
}
