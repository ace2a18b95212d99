//! The messages: every [`Request`] and [`Response`] of both connection kinds, and error
//! replies.
//!
//! Both kinds share one enum per direction because postcard encodes a variant as its index:
//! the enums are the registry of those numbers. New variants are only ever appended, so the
//! frames of version 1 keep their encoding (pinned by a test below). The payload types of
//! model connections are in [`super::rpc`], those of chunk-level connections in
//! [`super::chunk`].

use serde::{Deserialize, Serialize};

use super::chunk::PutResult;
use super::rpc::{Slot, StoreCounts};
#[cfg(doc)]
use super::{
    HELLO_VERSION, MAGIC, PEER_PROTOCOL_VERSION, PROTOCOL_VERSION, WINDOW_PROTOCOL_VERSION,
};
use crate::error::Error;

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

/// Client → server messages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Handshake; must be the first frame.
    Hello {
        /// [`MAGIC`].
        magic: u32,
        /// The client's version: [`HELLO_VERSION`] for this crate's client (a server
        /// accepts up to its [`PROTOCOL_VERSION`]).
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
        /// The client's version, at least [`PEER_PROTOCOL_VERSION`] (this crate's peer tier
        /// sends [`HELLO_VERSION`]).
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
    // ----- version 3: windowed operations on a model connection; append only -----
    // Sent only to a server whose HelloOk reports at least [`WINDOW_PROTOCOL_VERSION`]: an
    // older one cannot decode them. Their replies are those of the whole-prompt forms, with
    // chunk indices counted from `first_chunk` and token positions absolute.
    /// [`Request::Lookup`] over chunks `first_chunk..` of the prompt; blob = the keys of
    /// those chunks only, 32 bytes each. Replies [`Response::Lookup`] (`hit_chunks` counted
    /// from `first_chunk`).
    LookupFrom {
        /// Prompt length in tokens.
        n_tokens: u64,
        /// First chunk addressed (at most the prompt's chunk count).
        first_chunk: u64,
    },
    /// [`Request::BeginStore`] of chunks `first_chunk..` only; blob = the whole prompt's
    /// tokens (the keys chain over all of them). Replies [`Response::StoreLease`] or
    /// [`Response::Stored`]; slot token ranges stay absolute.
    BeginStoreFrom {
        /// Tenant salt.
        salt: Option<String>,
        /// First chunk stored.
        first_chunk: u64,
    },
    /// [`Request::Acquire`] of the stored run of chunks starting at `first_chunk`; blob = the
    /// whole prompt's tokens. Replies [`Response::Acquired`] (`hit_tokens` absolute: where
    /// the run ends, the window start when nothing is held).
    AcquireFrom {
        /// Tenant salt.
        salt: Option<String>,
        /// First chunk loaded.
        first_chunk: u64,
    },
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
    Stored(StoreCounts),
    /// A durable store was committed and its lower-tier writes finished.
    StoredDurable {
        /// What the store did.
        summary: StoreCounts,
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

/// Maps a kvtier error to an error reply.
pub fn error_reply(e: &Error) -> Response {
    use Error as E;
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
pub fn error_from_reply(code: ErrorCode, message: String) -> Error {
    match code {
        ErrorCode::InvalidInput => Error::InvalidInput(message),
        ErrorCode::Corrupt => Error::Corrupt(message),
        ErrorCode::Closed => Error::Closed,
        _ => Error::tier("server", format!("{code:?}: {message}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::wire::{decode, encode};

    #[test]
    fn version_1_frames_keep_their_numbers() {
        // postcard encodes a variant as its index: appending variants must not move these.
        let req = |r: &Request| postcard::to_stdvec(r).unwrap();
        let resp = |r: &Response| postcard::to_stdvec(r).unwrap();
        assert_eq!(req(&Request::Ping), [17]);
        assert_eq!(req(&Request::Remove { salt: None }), [18, 0]);
        assert_eq!(req(&Request::ContainsChunks), [20]);
        assert_eq!(req(&Request::PutChunk), [22]);
        // Version 3's windowed requests come after every older variant.
        let lf = Request::LookupFrom {
            n_tokens: 1,
            first_chunk: 2,
        };
        assert_eq!(req(&lf), [24, 1, 2]);
        let bs = Request::BeginStoreFrom {
            salt: None,
            first_chunk: 3,
        };
        assert_eq!(req(&bs), [25, 0, 3]);
        let ac = Request::AcquireFrom {
            salt: None,
            first_chunk: 4,
        };
        assert_eq!(req(&ac), [26, 0, 4]);
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
    fn store_replies_keep_their_bytes() {
        // The store counts travel as six varints after the variant index, as they did when
        // the reply carried the API's summary type directly.
        let c = StoreCounts {
            stored_tokens: 1,
            new_chunks: 2,
            present_chunks: 3,
            inflight_chunks: 4,
            dropped_chunks: 5,
            new_bytes: 300,
        };
        let b = postcard::to_stdvec(&Response::Stored(c.clone())).unwrap();
        assert_eq!(b, [4, 1, 2, 3, 4, 5, 0xac, 0x02]);
        let d = Response::StoredDurable {
            summary: c,
            durable: true,
        };
        assert_eq!(postcard::to_stdvec(&d).unwrap()[..2], [5, 1]);
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(body in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = decode::<Request>(&body);
            let _ = decode::<Response>(&body);
        }
    }
}
