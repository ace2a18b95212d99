//! Payloads of model connections (opened with [`super::Request::Hello`]): the buffers a
//! client fills or reads, the token blob, and the counts a store reports.

use serde::{Deserialize, Serialize};

use super::frame::blob_items;
use super::ProtoError;

/// A chunk buffer handed to a client: where its bytes are and which tokens they hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    /// First token of the chunk.
    pub start: u64,
    /// End token (exclusive).
    pub end: u64,
    /// Offset in the shared pool (meaningless over TCP).
    pub offset: u64,
    /// Payload bytes.
    pub len: u64,
}

/// What a store did, as it travels in [`super::Response::Stored`]: the wire form of the
/// API's `StoreSummary` (which converts to and from it). Its fields are frozen by the
/// protocol version: a change to the API type must not move these bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreCounts {
    /// Leading tokens now stored (or being stored by a concurrent call).
    pub stored_tokens: u64,
    /// Chunks newly written.
    pub new_chunks: u64,
    /// Chunks already present.
    pub present_chunks: u64,
    /// Chunks another store was writing.
    pub inflight_chunks: u64,
    /// Chunks dropped because L1 had no room.
    pub dropped_chunks: u64,
    /// Payload bytes copied in.
    pub new_bytes: u64,
}

/// Tokens as little-endian bytes (the blob of token-carrying requests).
pub fn tokens_to_bytes(tokens: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(tokens.len() * 4);
    for t in tokens {
        out.extend_from_slice(&t.to_le_bytes());
    }
    out
}

/// Parses a token blob.
pub fn tokens_from_bytes(blob: &[u8]) -> Result<Vec<u32>, ProtoError> {
    Ok(blob_items(blob, "token")?.map(u32::from_le_bytes).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_blobs() {
        assert!(tokens_from_bytes(&[1, 2, 3]).is_err());
        assert_eq!(
            tokens_from_bytes(&tokens_to_bytes(&[1, 70000])).unwrap(),
            [1, 70000]
        );
    }
}
