//! The wire protocol between a `kvtier serve` server and its clients.
//!
//! Every message travels in one frame ([`frame`]: length, kind, postcard meta, blob). Bulk
//! data (tokens as u32 LE, chunk keys as 32-byte digests, KV payload) goes in the blob so it
//! is never serialised element by element. A body longer than the receiver's maximum frame
//! size is refused and the connection closed; an unknown kind or an undecodable meta gets an
//! [`Response::Error`] reply and the connection goes on.
//!
//! The first frame on a connection is [`Request::Hello`] (magic, protocol version, client
//! name, model identity, chunk size check, optional auth token). On a Unix socket where the
//! client asked for shared memory, the server follows its [`Response::HelloOk`] with one
//! byte carrying the pool's file descriptor (SCM_RIGHTS). Such a model connection then
//! speaks the requests whose payloads are in [`rpc`].
//!
//! Version 2 adds chunk-level access for another engine using the server as a tier
//! (`kvtier://host:port`): the connection opens with [`Request::HelloPeer`] (no model: chunk
//! keys already name the model through their hash chain), then speaks
//! [`Request::ContainsChunks`], [`Request::GetChunk`], [`Request::PutChunk`] and
//! [`Request::RemoveChunk`] ([`chunk`]). Chunks travel as whole records (header + payload,
//! see [`crate::chunk::record`]) so the reader verifies the checksum itself. New variants
//! are only ever appended to [`Request`] and [`Response`] ([`message`]), so the frames of
//! version 1 keep their encoding and a version-2 server still serves version-1 clients.
//!
//! Version 3 adds the windowed requests of a model connection ([`Request::LookupFrom`],
//! [`Request::BeginStoreFrom`], [`Request::AcquireFrom`]): operations over chunks
//! `first_chunk..` of a prompt only (sliding-window layer groups). A server before version 3
//! refuses a Hello whose version is above its own, so clients keep announcing
//! [`HELLO_VERSION`] and learn the server's version from its [`Response::HelloOk`]; they send
//! windowed requests only to a server of [`WINDOW_PROTOCOL_VERSION`] or later, and tell the
//! caller to upgrade an older one.
//!
//! Files: [`frame`] (framing, the one frame-head parser and readers), [`message`] (the
//! message enums and error replies), [`rpc`] (model connections), [`chunk`] (chunk-level
//! connections), [`socket_path`] (where the server listens by default).

pub mod chunk;
pub mod frame;
pub mod message;
pub mod rpc;
pub mod socket_path;

pub use chunk::{keys_from_bytes, keys_to_bytes, PutResult};
pub use frame::{
    body_len, decode, encode, encode_head, ProtoError, DEFAULT_MAX_FRAME, FRAME_MSG, HEADER_LEN,
    MAX_META,
};
pub use message::{error_from_reply, error_reply, ErrorCode, Request, Response};
pub use rpc::{tokens_from_bytes, tokens_to_bytes, Slot, StoreCounts};

/// First field of every Hello.
pub const MAGIC: u32 = 0x4b56_5431; // "KVT1"
/// Newest protocol version spoken by this crate: what a server accepts in a Hello at most
/// and reports in its HelloOk.
pub const PROTOCOL_VERSION: u16 = 3;
/// Version this crate's clients (the model client and the `kvtier://` peer tier) announce in
/// their Hello: the newest version whose frames they send to any server. Frames of later
/// versions go only to servers whose HelloOk reports them, so a client stays compatible with
/// version-2 servers, which refuse a Hello version above 2.
pub const HELLO_VERSION: u16 = 2;
/// Oldest client version a server still accepts (version 1 lacks only the chunk frames).
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// First version with [`Request::HelloPeer`] and the chunk frames.
pub const PEER_PROTOCOL_VERSION: u16 = 2;
/// First version with the windowed requests ([`Request::LookupFrom`],
/// [`Request::BeginStoreFrom`], [`Request::AcquireFrom`]).
pub const WINDOW_PROTOCOL_VERSION: u16 = 3;
