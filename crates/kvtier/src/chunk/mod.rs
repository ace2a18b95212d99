//! Chunks: metadata, checksums (C7) and the record encoding shared by disk and network tiers.

mod layout;
pub mod record;

use std::sync::Arc;

pub use layout::{Dtype, KvLayout, LayerGroup, LAYER_MAJOR};

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
        if payload.len() as u64 != self.len {
            return Err(Error::Corrupt(format!(
                "chunk {}: payload is {} bytes, header says {}",
                self.key,
                payload.len(),
                self.len
            )));
        }
        let sum = checksum(payload);
        if sum != self.checksum {
            return Err(Error::Corrupt(format!(
                "chunk {}: checksum {sum:016x} does not match {:016x}",
                self.key, self.checksum
            )));
        }
        Ok(())
    }
}

/// Checksum of a payload (xxh3-64).
pub fn checksum(payload: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(payload)
}

/// Block size for fused copy + checksum: small enough that the block is still in L2 when
/// it is hashed right after being copied.
const FUSED_BLOCK: usize = 256 * 1024;

/// Copies `src` into `dst` (same length) and returns the checksum of the bytes, reading
/// each block from cache rather than DRAM a second time.
pub fn copy_with_checksum(dst: &mut [u8], src: &[u8]) -> u64 {
    assert_eq!(dst.len(), src.len(), "copy_with_checksum: length mismatch");
    if src.len() <= FUSED_BLOCK {
        dst.copy_from_slice(src);
        return checksum(dst);
    }
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for (d, s) in dst.chunks_mut(FUSED_BLOCK).zip(src.chunks(FUSED_BLOCK)) {
        d.copy_from_slice(s);
        h.update(d);
    }
    h.digest()
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
        for len in [0usize, 1, 4095, FUSED_BLOCK, FUSED_BLOCK + 1, 3 * FUSED_BLOCK + 17] {
            let src: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let mut dst = vec![0u8; len];
            let sum = copy_with_checksum(&mut dst, &src);
            assert_eq!(dst, src);
            assert_eq!(sum, checksum(&src), "len {len}");
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
