//! Payloads of model connections (opened with [`super::Request::Hello`]): the buffers a
//! client fills or reads, the token blob, and the counts a store reports.

use serde::{Deserialize, Serialize};

use super::frame::blob_items;
use super::ProtoError;
use crate::api::StoreSummary;

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

impl From<&StoreSummary> for StoreCounts {
    fn from(s: &StoreSummary) -> StoreCounts {
        StoreCounts {
            stored_tokens: s.stored_tokens as u64,
            new_chunks: s.new_chunks as u64,
            present_chunks: s.present_chunks as u64,
            inflight_chunks: s.inflight_chunks as u64,
            dropped_chunks: s.dropped_chunks as u64,
            new_bytes: s.new_bytes,
        }
    }
}

impl From<StoreCounts> for StoreSummary {
    fn from(c: StoreCounts) -> StoreSummary {
        let n = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        StoreSummary {
            stored_tokens: n(c.stored_tokens),
            new_chunks: n(c.new_chunks),
            present_chunks: n(c.present_chunks),
            inflight_chunks: n(c.inflight_chunks),
            dropped_chunks: n(c.dropped_chunks),
            new_bytes: c.new_bytes,
        }
    }
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
    fn store_summary_crosses_the_wire_unchanged() {
        let s = StoreSummary {
            stored_tokens: 4096,
            new_chunks: 16,
            present_chunks: 1,
            inflight_chunks: 2,
            dropped_chunks: 3,
            new_bytes: 1 << 33,
        };
        let c = StoreCounts::from(&s);
        // Same bytes as the summary itself had on the wire before it got a wire form.
        assert_eq!(
            postcard::to_stdvec(&c).unwrap(),
            postcard::to_stdvec(&s).unwrap()
        );
        assert_eq!(StoreSummary::from(c), s);
    }

    #[test]
    fn token_blobs() {
        assert!(tokens_from_bytes(&[1, 2, 3]).is_err());
        assert_eq!(
            tokens_from_bytes(&tokens_to_bytes(&[1, 70000])).unwrap(),
            [1, 70000]
        );
    }
}
