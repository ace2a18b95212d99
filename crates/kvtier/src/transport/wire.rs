//! The wire protocol between a `kvtier serve` server and its clients.
//!
//! Every message travels in one frame:
//!
//! ```text
//! u32 LE  body length (everything after these 4 bytes)
//! u8      frame kind (FRAME_MSG)
//! u32 LE  meta length
//! meta    postcard-encoded Request or Response
//! blob    raw bytes (tokens, keys, payload), the rest of the body
//! ```
//!
//! Bulk data (tokens as u32 LE, chunk keys as 32-byte digests, KV payload) goes in the blob
//! so it is never serialised element by element. A body longer than the receiver's maximum
//! frame size is refused and the connection closed; an unknown kind or an undecodable meta
//! gets an [`Response::Error`] reply and the connection goes on.
//!
//! The first frame on a connection is [`Request::Hello`] (magic, protocol version, client
//! name, model identity, chunk size check, optional auth token). On a Unix socket where the
//! client asked for shared memory, the server follows its [`Response::HelloOk`] with one
//! byte carrying the pool's file descriptor (SCM_RIGHTS).
//!
//! Version 2 adds chunk-level access for another engine using the server as a tier
//! (`kvtier://host:port`): the connection opens with [`Request::HelloPeer`] (no model: chunk
//! keys already name the model through their hash chain), then speaks
//! [`Request::ContainsChunks`], [`Request::GetChunk`], [`Request::PutChunk`] and
//! [`Request::RemoveChunk`]. Chunks travel as whole records (header + payload, see
//! [`crate::chunk::record`]) so the reader verifies the checksum itself. New variants are
//! only ever appended to [`Request`] and [`Response`], so the frames of version 1 keep
//! their encoding and a version-2 server still serves version-1 clients.

use serde::{Deserialize, Serialize};

/// First field of every Hello.
pub const MAGIC: u32 = 0x4b56_5431; // "KVT1"
/// Protocol version spoken by this crate.
pub const PROTOCOL_VERSION: u16 = 2;
/// Oldest client version a server still accepts (version 1 lacks only the chunk frames).
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// First version with [`Request::HelloPeer`] and the chunk frames.
pub const PEER_PROTOCOL_VERSION: u16 = 2;
/// Frame kind of a message frame (the only kind so far; others are refused).
pub const FRAME_MSG: u8 = 1;
/// Bytes before the meta: body length, kind, meta length.
pub const HEADER_LEN: usize = 9;
/// Default largest body accepted: 64 MiB of blob plus 1 MiB of meta.
pub const DEFAULT_MAX_FRAME: usize = (64 << 20) + (1 << 20);
/// Largest meta accepted, whatever the frame limit.
pub const MAX_META: usize = 1 << 20;

/// Errors of frame encoding and decoding.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The body is larger than the limit.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// The frame is structurally wrong.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The frame kind is not known.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
}

/// Machine-readable class of an error reply; maps onto [`crate::Error`] on the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// Bad request contents.
    InvalidInput,
    /// Bad frame or message, wrong handshake.
    Protocol,
    /// Auth token missing or wrong.
    Unauthorized,
    /// Unknown or expired lease.
    NoLease,
    /// Corrupt data.
    Corrupt,
    /// A tier timed out.
    Timeout,
    /// A tier failed, or another engine error.
    Engine,
    /// The server is shutting down.
    Closed,
}

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

/// Client → server messages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Handshake; must be the first frame.
    Hello {
        /// [`MAGIC`].
        magic: u32,
        /// [`PROTOCOL_VERSION`].
        version: u16,
        /// Free-form client name for logs.
        client_name: String,
        /// The model identity as JSON (kvtier's serde form).
        identity_json: String,
        /// The chunk size the client expects, checked against the server's.
        chunk_size: Option<u32>,
        /// Shared token (required on TCP when the server has one).
        auth_token: Option<String>,
        /// Ask for the pool descriptor (Unix sockets only).
        want_shm: bool,
    },
    /// Prefix lookup; blob = chunk keys, 32 bytes each, computed by the client.
    Lookup {
        /// Prompt length in tokens.
        n_tokens: u64,
    },
    /// Claims and allocates the chunks to store; blob = tokens (u32 LE).
    BeginStore {
        /// Tenant salt.
        salt: Option<String>,
    },
    /// Writes payload bytes into a slot of a store lease (TCP path); blob = bytes.
    WriteSlot {
        /// Lease id.
        lease: u64,
        /// Slot index in the lease.
        slot: u32,
        /// Byte offset inside the slot.
        offset: u64,
    },
    /// Seals a store lease.
    CommitStore {
        /// Lease id.
        lease: u64,
        /// Per-slot checksums the writer computed (None: server computes).
        checksums: Vec<Option<u64>>,
        /// Reply only once every lower-tier write of the new chunks finished, and say
        /// whether all of them were stored ([`Response::StoredDurable`]).
        durable: bool,
    },
    /// Drops a store lease without storing (no reply).
    AbortStore {
        /// Lease id.
        lease: u64,
    },
    /// Loads and holds the stored prefix; blob = tokens (u32 LE).
    Acquire {
        /// Tenant salt.
        salt: Option<String>,
    },
    /// Reads bytes of a held chunk (TCP path); the reply's blob holds them.
    ReadSlot {
        /// Lease id.
        lease: u64,
        /// Slot index in the lease.
        slot: u32,
        /// Byte offset inside the slot.
        offset: u64,
        /// Bytes wanted.
        len: u64,
    },
    /// Releases a retrieve lease (no reply).
    Release {
        /// Lease id.
        lease: u64,
    },
    /// Starts loading the stored prefix into L1; blob = tokens.
    Prefetch {
        /// Tenant salt.
        salt: Option<String>,
    },
    /// Waits for a prefetch started on this connection.
    WaitPrefetch {
        /// Prefetch id.
        id: u64,
        /// Wait limit.
        timeout_ms: Option<u64>,
    },
    /// Pins the L1-resident prefix; blob = tokens.
    Pin {
        /// Tenant salt.
        salt: Option<String>,
        /// Pin lifetime.
        ttl_ms: Option<u64>,
    },
    /// Releases pins.
    Unpin {
        /// (key, pin id) pairs.
        pins: Vec<([u8; 32], u64)>,
    },
    /// Forgets a tenant's chunks in every tier.
    RemoveSalt {
        /// The salt.
        salt: String,
    },
    /// Empties every tier.
    Clear,
    /// Waits for queued lower-tier writes.
    Flush {
        /// Wait limit.
        timeout_ms: u64,
    },
    /// Engine and tier numbers.
    Stats,
    /// Liveness check.
    Ping,
    /// Removes a prompt's chunks from every tier; blob = tokens (u32 LE). Replies `Count`.
    Remove {
        /// Tenant salt.
        salt: Option<String>,
    },
    // ----- version 2: chunk-level access (the `kvtier://` tier); append only -----
    /// Handshake of a chunk-level connection (instead of [`Request::Hello`]): no model
    /// identity, only the chunk frames below (and Ping, Stats, Clear, RemoveSalt).
    /// Replies [`Response::HelloOk`] with `bytes_per_token` 0.
    HelloPeer {
        /// [`MAGIC`].
        magic: u32,
        /// [`PROTOCOL_VERSION`] (at least [`PEER_PROTOCOL_VERSION`]).
        version: u16,
        /// Free-form client name for logs.
        client_name: String,
        /// Shared token (required on TCP when the server has one).
        auth_token: Option<String>,
    },
    /// How many leading keys the server holds in any of its tiers; blob = chunk keys, 32
    /// bytes each (a whole prefix in one round trip). Replies [`Response::ContainsChunks`].
    ContainsChunks,
    /// Reads one chunk from the server's tiers. Replies [`Response::Record`] (blob = record
    /// header + payload) or [`Response::NotFound`].
    GetChunk {
        /// The chunk key.
        key: [u8; 32],
    },
    /// Stores one chunk through the server's store path (its L1, then its lower tiers);
    /// blob = record header + payload. The server verifies the checksum. Replies
    /// [`Response::PutChunk`].
    PutChunk,
    /// Forgets one chunk in every tier of the server. Replies [`Response::Count`] (how many
    /// tiers held it).
    RemoveChunk {
        /// The chunk key.
        key: [u8; 32],
    },
}

/// What a [`Request::PutChunk`] did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PutResult {
    /// Stored in the server's L1 (and queued to its lower tiers).
    Stored,
    /// The key was already present or being stored.
    AlreadyPresent,
    /// Not stored, for the given reason (e.g. no memory); not an error.
    Skipped(String),
}

/// Server → client messages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// Handshake accepted.
    HelloOk {
        /// Server protocol version.
        version: u16,
        /// Server name.
        server_name: String,
        /// Tokens per chunk.
        chunk_size: u32,
        /// Whether a trailing partial chunk is stored.
        save_unfull_chunk: bool,
        /// KV bytes per token of the client's model.
        bytes_per_token: u64,
        /// Pool size when a descriptor follows (shared memory granted).
        shm_pool_bytes: Option<u64>,
        /// Largest frame body the server accepts.
        max_frame: u64,
    },
    /// The request failed.
    Error {
        /// Class.
        code: ErrorCode,
        /// Human-readable message.
        message: String,
    },
    /// Lookup answer.
    Lookup {
        /// Leading chunks found.
        hit_chunks: u32,
        /// Tier of each hit chunk.
        tiers: Vec<u8>,
    },
    /// A store lease: fill the slots, then commit.
    StoreLease {
        /// Lease id.
        lease: u64,
        /// Buffers to fill, in prompt order.
        slots: Vec<Slot>,
        /// Leading tokens covered once committed.
        stored_tokens: u64,
        /// Chunks already present.
        present_chunks: u32,
        /// Chunks another store is writing.
        inflight_chunks: u32,
        /// Chunks with no room.
        dropped_chunks: u32,
    },
    /// A store was committed.
    Stored(crate::StoreSummary),
    /// A durable store was committed and its lower-tier writes finished.
    StoredDurable {
        /// What the store did.
        summary: crate::StoreSummary,
        /// Whether every new chunk reached every lower tier (false when a write failed or
        /// was skipped, e.g. a full write queue or a tier down).
        durable: bool,
    },
    /// A retrieve lease: read the chunks, then release.
    Acquired {
        /// Lease id (0 when nothing is held).
        lease: u64,
        /// Leading tokens held.
        hit_tokens: u64,
        /// The held chunks.
        chunks: Vec<Slot>,
        /// Tier each chunk came from.
        tiers: Vec<u8>,
    },
    /// Bytes of a slot in the blob.
    Data,
    /// Write accepted.
    Written,
    /// Prefetch started.
    PrefetchStarted {
        /// Id for WaitPrefetch.
        id: u64,
    },
    /// Prefetch finished.
    Prefetched {
        /// Tokens of the contiguous prefix now loaded.
        tokens: u64,
    },
    /// Pins taken.
    Pins {
        /// (key, pin id) pairs.
        pins: Vec<([u8; 32], u64)>,
    },
    /// Generic success.
    Ok,
    /// A count (chunks dropped by clear / remove_salt).
    Count(u64),
    /// Flush result.
    Flushed(bool),
    /// Stats as JSON text.
    Stats(String),
    /// Reply to Ping.
    Pong,
    // ----- version 2 (append only) -----
    /// Reply to [`Request::ContainsChunks`].
    ContainsChunks {
        /// Leading keys held.
        chunks: u32,
    },
    /// A chunk record (header + payload) in the blob.
    Record,
    /// The chunk is not stored.
    NotFound,
    /// Reply to [`Request::PutChunk`].
    PutChunk(PutResult),
}

/// Encodes a frame: header, postcard meta, blob.
pub fn encode<T: Serialize>(msg: &T, blob: &[u8]) -> Result<Vec<u8>, ProtoError> {
    let meta = postcard::to_stdvec(msg).map_err(|e| ProtoError::Malformed(e.to_string()))?;
    let body = 1 + 4 + meta.len() + blob.len();
    let body_u32 = u32::try_from(body).map_err(|_| ProtoError::TooLarge {
        len: body,
        max: u32::MAX as usize,
    })?;
    let mut out = Vec::with_capacity(4 + body);
    out.extend_from_slice(&body_u32.to_le_bytes());
    out.push(FRAME_MSG);
    out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    out.extend_from_slice(&meta);
    out.extend_from_slice(blob);
    Ok(out)
}

/// Encodes only the header and meta of a frame whose blob of `blob_len` bytes is written
/// separately (avoids copying large payloads).
pub fn encode_head<T: Serialize>(msg: &T, blob_len: usize) -> Result<Vec<u8>, ProtoError> {
    let meta = postcard::to_stdvec(msg).map_err(|e| ProtoError::Malformed(e.to_string()))?;
    let body = 1 + 4 + meta.len() + blob_len;
    let body_u32 = u32::try_from(body).map_err(|_| ProtoError::TooLarge {
        len: body,
        max: u32::MAX as usize,
    })?;
    let mut out = Vec::with_capacity(4 + 5 + meta.len());
    out.extend_from_slice(&body_u32.to_le_bytes());
    out.push(FRAME_MSG);
    out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    out.extend_from_slice(&meta);
    Ok(out)
}

/// Reads the body length from the first 4 bytes and checks it against `max`.
pub fn body_len(prefix: [u8; 4], max: usize) -> Result<usize, ProtoError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > max {
        return Err(ProtoError::TooLarge { len, max });
    }
    if len < 5 {
        return Err(ProtoError::Malformed(format!(
            "body of {len} bytes is shorter than its 5-byte header"
        )));
    }
    Ok(len)
}

/// Splits a body (everything after the length) into the decoded message and the blob
/// range inside `body`.
pub fn decode<'de, T: Deserialize<'de>>(
    body: &'de [u8],
) -> Result<(T, std::ops::Range<usize>), ProtoError> {
    if body.len() < 5 {
        return Err(ProtoError::Malformed("body shorter than 5 bytes".into()));
    }
    if body[0] != FRAME_MSG {
        return Err(ProtoError::UnknownKind(body[0]));
    }
    let meta_len = u32::from_le_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if meta_len > MAX_META || 5 + meta_len > body.len() {
        return Err(ProtoError::Malformed(format!(
            "meta of {meta_len} bytes does not fit a {}-byte body",
            body.len()
        )));
    }
    let msg = postcard::from_bytes(&body[5..5 + meta_len])
        .map_err(|e| ProtoError::Malformed(format!("undecodable message: {e}")))?;
    Ok((msg, 5 + meta_len..body.len()))
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
    if blob.len() % 4 != 0 {
        return Err(ProtoError::Malformed(format!(
            "token blob of {} bytes is not a multiple of 4",
            blob.len()
        )));
    }
    Ok(blob
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Parses a key blob.
pub fn keys_from_bytes(blob: &[u8]) -> Result<Vec<crate::keys::ChunkKey>, ProtoError> {
    if blob.len() % 32 != 0 {
        return Err(ProtoError::Malformed(format!(
            "key blob of {} bytes is not a multiple of 32",
            blob.len()
        )));
    }
    Ok(blob
        .chunks_exact(32)
        .map(|c| {
            let mut k = [0u8; 32];
            k.copy_from_slice(c);
            crate::keys::ChunkKey(k)
        })
        .collect())
}

/// Maps a kvtier error to an error reply.
pub fn error_reply(e: &crate::Error) -> Response {
    use crate::Error as E;
    let code = match e {
        E::InvalidInput(_) | E::Config { .. } => ErrorCode::InvalidInput,
        E::Corrupt(_) => ErrorCode::Corrupt,
        E::Timeout { .. } => ErrorCode::Timeout,
        E::Closed => ErrorCode::Closed,
        _ => ErrorCode::Engine,
    };
    Response::Error {
        code,
        message: e.to_string(),
    }
}

/// Maps an error reply back to a kvtier error on the client.
pub fn error_from_reply(code: ErrorCode, message: String) -> crate::Error {
    match code {
        ErrorCode::InvalidInput => crate::Error::InvalidInput(message),
        ErrorCode::Corrupt => crate::Error::Corrupt(message),
        ErrorCode::Closed => crate::Error::Closed,
        _ => crate::Error::tier("server", format!("{code:?}: {message}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let f = encode(&Request::Lookup { n_tokens: 7 }, b"abc").unwrap();
        let len = body_len(f[..4].try_into().unwrap(), DEFAULT_MAX_FRAME).unwrap();
        assert_eq!(len, f.len() - 4);
        let (m, blob): (Request, _) = decode(&f[4..]).unwrap();
        assert_eq!(m, Request::Lookup { n_tokens: 7 });
        assert_eq!(&f[4..][blob], b"abc");
        let h = encode_head(&Response::Data, 3).unwrap();
        assert_eq!(&h[..], &encode(&Response::Data, b"xyz").unwrap()[..h.len()]);
    }

    #[test]
    fn version_1_frames_keep_their_numbers() {
        // postcard encodes a variant as its index: appending variants must not move these.
        let req = |r: &Request| postcard::to_stdvec(r).unwrap();
        let resp = |r: &Response| postcard::to_stdvec(r).unwrap();
        assert_eq!(req(&Request::Ping), [17]);
        assert_eq!(req(&Request::Remove { salt: None }), [18, 0]);
        assert_eq!(req(&Request::ContainsChunks), [20]);
        assert_eq!(req(&Request::PutChunk), [22]);
        assert_eq!(resp(&Response::Pong), [16]);
        assert_eq!(resp(&Response::Record), [18]);
        assert_eq!(resp(&Response::NotFound), [19]);
        let k = Request::GetChunk { key: [7; 32] };
        let (m, _): (Request, _) = decode(&encode(&k, &[]).unwrap()[4..]).unwrap();
        assert_eq!(m, k);
        let p = Response::PutChunk(PutResult::Skipped("no_memory".into()));
        let (m, _): (Response, _) = decode(&encode(&p, &[]).unwrap()[4..]).unwrap();
        assert_eq!(m, p);
    }

    #[test]
    fn limits() {
        assert!(matches!(
            body_len(100u32.to_le_bytes(), 10),
            Err(ProtoError::TooLarge { .. })
        ));
        assert!(body_len(2u32.to_le_bytes(), 10).is_err());
        assert!(matches!(
            decode::<Request>(&[9, 0, 0, 0, 0]),
            Err(ProtoError::UnknownKind(9))
        ));
        assert!(decode::<Request>(&[1, 255, 255, 255, 255]).is_err());
        assert!(tokens_from_bytes(&[1, 2, 3]).is_err());
        assert_eq!(
            tokens_from_bytes(&tokens_to_bytes(&[1, 70000])).unwrap(),
            [1, 70000]
        );
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(body in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = decode::<Request>(&body);
            let _ = decode::<Response>(&body);
        }
    }
}
