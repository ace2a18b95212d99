//! Payloads of chunk-level connections (opened with [`super::Request::HelloPeer`], spoken
//! by the `kvtier://` tier): key blobs and what a put did. A chunk itself travels as a
//! record (header + payload, [`crate::chunk::record`]) in the frame's blob.

use serde::{Deserialize, Serialize};

use super::frame::blob_items;
use super::ProtoError;
use crate::keys::ChunkKey;

/// What a [`super::Request::PutChunk`] did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PutResult {
    /// Stored in the server's L1 (and queued to its lower tiers).
    Stored,
    /// The key was already present or being stored.
    AlreadyPresent,
    /// Not stored, for the given reason (e.g. no memory); not an error.
    Skipped(String),
}

/// Chunk keys as a blob, 32 bytes each (the blob of `Lookup` and `ContainsChunks`).
pub fn keys_to_bytes(keys: &[ChunkKey]) -> Vec<u8> {
    keys.iter().flat_map(|k| k.0).collect()
}

/// Parses a key blob.
pub fn keys_from_bytes(blob: &[u8]) -> Result<Vec<ChunkKey>, ProtoError> {
    Ok(blob_items(blob, "key")?.map(ChunkKey).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_blobs() {
        let keys = [ChunkKey([1; 32]), ChunkKey([2; 32])];
        assert_eq!(keys_from_bytes(&keys_to_bytes(&keys)).unwrap(), keys);
        assert!(keys_from_bytes(&[0; 33]).is_err());
    }
}
