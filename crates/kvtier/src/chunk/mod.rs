//! Chunks: metadata, checksums (C7) and the record encoding shared by disk and network tiers.

mod fused;
pub mod record;
mod stream_copy;

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::keys::{ChunkKey, Origin};

/// Metadata of a stored chunk. The payload itself lives in a pool buffer or on a tier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkInfo {
    /// Chunk key.
    pub key: ChunkKey,
    /// Tokens covered by the chunk.
    pub num_tokens: u32,
    /// Payload length in bytes.
    pub len: u64,
    /// xxh3-64 of the payload, computed when the chunk was created.
    pub checksum: u64,
    /// Model identity and tenant salt.
    pub origin: Arc<Origin>,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: u64,
}

impl ChunkInfo {
    /// Checks `payload` against the stored length and checksum.
    pub fn verify(&self, payload: &[u8]) -> Result<()> {
        self.check_len(payload.len())?;
        self.check_sum(checksum(payload))
    }

    /// Copies `payload` into `dst` (same length) and checks it against the stored length
    /// and checksum in the same pass over memory. On `Err`, `dst` holds the unverified
    /// bytes: the caller must not use them.
    pub fn copy_verified(&self, dst: &mut [u8], payload: &[u8]) -> Result<()> {
        self.check_len(payload.len())?;
        if dst.len() != payload.len() {
            return Err(Error::invalid(format!(
                "chunk {}: destination is {} bytes, the payload {}",
                self.key,
                dst.len(),
                payload.len()
            )));
        }
        self.check_sum(copy_with_checksum(dst, payload))
    }

    fn check_len(&self, len: usize) -> Result<()> {
        if len as u64 != self.len {
            return Err(Error::Corrupt(format!(
                "chunk {}: payload is {len} bytes, header says {}",
                self.key, self.len
            )));
        }
        Ok(())
    }

    fn check_sum(&self, sum: u64) -> Result<()> {
        if sum != self.checksum {
            return Err(Error::Corrupt(format!(
                "chunk {}: checksum {sum:016x} does not match {:016x}",
                self.key, self.checksum
            )));
        }
        Ok(())
    }
}

/// Payloads are checksummed in segments of this size (see [`checksum`]).
pub const CHECKSUM_SEGMENT: usize = 1 << 20;
/// Payloads of at least this many bytes are copied and checksummed on the rayon pool.
const PARALLEL_MIN: usize = 4 * CHECKSUM_SEGMENT;
/// Sub-block of a segment for fused copy + checksum: small enough that it is still in the
/// core's L2 cache when it is hashed right after being copied.
const FUSED_BLOCK: usize = 256 * 1024;

fn combine(digests: impl IntoIterator<Item = u64>) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for d in digests {
        h.update(&d.to_le_bytes());
    }
    h.digest()
}

/// Checksum of a payload: xxh3-64 of each 1 MiB segment, then xxh3-64 of those digests
/// (little-endian u64s, in order). The two levels make it computable in parallel with a
/// result independent of the thread count; an empty payload has no segments.
pub fn checksum(payload: &[u8]) -> u64 {
    use rayon::prelude::*;
    if payload.len() >= PARALLEL_MIN {
        let d: Vec<u64> = payload
            .par_chunks(CHECKSUM_SEGMENT)
            .map(segment_hash)
            .collect();
        combine(d)
    } else {
        combine(payload.chunks(CHECKSUM_SEGMENT).map(segment_hash))
    }
}

/// Whether copies and checksums may use the AVX2 path (`fused`); see [`set_fused_checksum`].
static FUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turns the AVX2 fused copy-and-checksum off (or back on) for the whole process: for
/// same-run A/B benchmarks against the portable path. The checksums are identical either way.
pub fn set_fused_checksum(on: bool) {
    FUSED.store(on, std::sync::atomic::Ordering::Relaxed);
}

fn fused_on() -> bool {
    FUSED.load(std::sync::atomic::Ordering::Relaxed)
}

/// xxh3-64 of one segment: AVX2 where the CPU has it (`fused`), the crate's otherwise.
fn segment_hash(segment: &[u8]) -> u64 {
    fused_on()
        .then(|| fused::copy_xxh3(None, segment, false))
        .flatten()
        .unwrap_or_else(|| xxhash_rust::xxh3::xxh3_64(segment))
}

/// Copies one segment and returns its hash. With AVX2 (`fused`) each 64-byte stripe is
/// loaded once, stored and hashed: one pass over memory. Otherwise block by block, hashing
/// each block while it is in cache; large payloads (`streaming`) copy with non-temporal
/// stores and hash the source block instead: the destination lines are then not in cache,
/// the source lines are.
fn copy_segment(dst: &mut [u8], src: &[u8], streaming: bool) -> u64 {
    if fused_on() {
        if let Some(h) = fused::copy_xxh3(Some(&mut *dst), src, streaming) {
            return h;
        }
    }
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for (d, s) in dst.chunks_mut(FUSED_BLOCK).zip(src.chunks(FUSED_BLOCK)) {
        if streaming {
            stream_copy::copy_nt(d, s);
            h.update(s);
        } else {
            d.copy_from_slice(s);
            h.update(d);
        }
    }
    h.digest()
}

/// Copies `src` into `dst` (same length) and returns [`checksum`] of the bytes, hashing
/// each block while it is still in cache; large payloads use both memory paths (rayon) and
/// non-temporal stores (see `stream_copy`).
pub fn copy_with_checksum(dst: &mut [u8], src: &[u8]) -> u64 {
    use rayon::prelude::*;
    assert_eq!(dst.len(), src.len(), "copy_with_checksum: length mismatch");
    if src.len() >= PARALLEL_MIN {
        let d: Vec<u64> = dst
            .par_chunks_mut(CHECKSUM_SEGMENT)
            .zip(src.par_chunks(CHECKSUM_SEGMENT))
            .map(|(d, s)| copy_segment(d, s, true))
            .collect();
        combine(d)
    } else {
        combine(
            dst.chunks_mut(CHECKSUM_SEGMENT)
                .zip(src.chunks(CHECKSUM_SEGMENT))
                .map(|(d, s)| copy_segment(d, s, false)),
        )
    }
}

/// Copies `src` into `dst` (same length); large payloads in parallel with non-temporal
/// stores (see `stream_copy`).
pub fn copy_payload(dst: &mut [u8], src: &[u8]) {
    use rayon::prelude::*;
    assert_eq!(dst.len(), src.len(), "copy_payload: length mismatch");
    if src.len() >= PARALLEL_MIN {
        dst.par_chunks_mut(CHECKSUM_SEGMENT)
            .zip(src.par_chunks(CHECKSUM_SEGMENT))
            .for_each(|(d, s)| stream_copy::copy_nt(d, s));
    } else {
        dst.copy_from_slice(src);
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_copy_checksum_equals_plain_checksum() {
        for len in [
            0usize,
            1,
            4095,
            FUSED_BLOCK,
            FUSED_BLOCK + 1,
            3 * FUSED_BLOCK + 17,
            PARALLEL_MIN + 3 * FUSED_BLOCK + 17,
        ] {
            let src: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let mut dst = vec![0u8; len];
            let sum = copy_with_checksum(&mut dst, &src);
            assert_eq!(dst, src);
            assert_eq!(sum, checksum(&src), "len {len}");
            // Same value as the definition computed serially.
            let serial = combine(src.chunks(CHECKSUM_SEGMENT).map(xxhash_rust::xxh3::xxh3_64));
            assert_eq!(sum, serial, "len {len}");
            let mut out = vec![0u8; len];
            copy_payload(&mut out, &src);
            assert_eq!(out, src);
            // A page-aligned destination, like a pool buffer: large payloads then take the
            // streaming (non-temporal) fused path where the CPU has AVX2.
            let mut backing = vec![0u8; len + 4096];
            let at = backing.as_ptr().align_offset(4096);
            let aligned = &mut backing[at..at + len];
            assert_eq!(
                copy_with_checksum(aligned, &src),
                serial,
                "aligned, len {len}"
            );
            assert_eq!(aligned, &src[..], "aligned copy, len {len}");
        }
    }
}

/// A chunk in memory: metadata plus a sealed pool buffer. Cloning is cheap (a reference);
/// each clone keeps the bytes alive and makes the chunk "in use" for eviction until dropped.
#[derive(Clone, Debug)]
pub struct Chunk {
    /// Metadata.
    pub info: ChunkInfo,
    /// Payload.
    pub buf: crate::memory::ChunkBuf,
}

impl Chunk {
    /// The payload bytes.
    pub fn payload(&self) -> &[u8] {
        self.buf.as_slice()
    }

    /// The chunk key.
    pub fn key(&self) -> ChunkKey {
        self.info.key
    }
}
