//! Requests of a model connection, one handler per request, grouped by family: lookup,
//! store, retrieve (acquire, read, prefetch), pins, and cache maintenance.
//!
//! Handlers are synchronous: they run engine work through [`block`] and return the reply;
//! the connection loop does the socket I/O.

mod lookup;
mod maintenance;
mod pin;
mod retrieve;
mod store;

use std::sync::Arc;

use kvtier::transport::wire::{self as proto, ErrorCode, ProtoError, Request, Response};
use kvtier::Engine;

use crate::io::err;
use crate::lease::Leases;
use crate::state::ServerState;

/// What a request handler sees of its connection.
pub(crate) struct Session {
    /// Server-wide state.
    pub(crate) state: Arc<ServerState>,
    /// The engine of the connection's model.
    pub(crate) engine: Arc<Engine>,
    /// Whether the client maps the pool (its checksums are then trusted).
    pub(crate) shm: bool,
    /// What the connection holds.
    pub(crate) leases: Leases,
}

/// What to send back for a request.
pub(crate) enum Reply<'a> {
    /// A message.
    Msg(Response),
    /// [`Response::Data`] with these bytes (of a held chunk) as its blob.
    Data(&'a [u8]),
    /// Nothing: a one-way request.
    None,
}

/// A handler's outcome: the reply, or an error reply.
type Handled<T> = Result<T, Response>;

/// Handles one request of a model connection.
pub(crate) fn dispatch<'a>(s: &'a mut Session, req: Request, blob: &[u8]) -> Reply<'a> {
    let reply = match req {
        Request::Hello { .. } | Request::HelloPeer { .. } => {
            Err(err(ErrorCode::Protocol, "already greeted"))
        }
        Request::ContainsChunks
        | Request::GetChunk { .. }
        | Request::PutChunk
        | Request::RemoveChunk { .. } => Err(err(
            ErrorCode::Protocol,
            "chunk frames need a connection opened with HelloPeer (the kvtier:// tier does this)",
        )),
        Request::Ping => Ok(Reply::Msg(Response::Pong)),
        Request::Lookup { n_tokens } => lookup::lookup(s, n_tokens, 0, blob).map(Reply::Msg),
        Request::LookupFrom {
            n_tokens,
            first_chunk,
        } => lookup::lookup(s, n_tokens, first_chunk, blob).map(Reply::Msg),
        Request::BeginStore { salt } => store::begin(s, salt, 0, blob).map(Reply::Msg),
        Request::BeginStoreFrom { salt, first_chunk } => {
            store::begin(s, salt, first_chunk, blob).map(Reply::Msg)
        }
        Request::WriteSlot {
            lease,
            slot,
            offset,
        } => store::write_slot(s, lease, slot, offset, blob).map(Reply::Msg),
        Request::CommitStore {
            lease,
            checksums,
            durable,
        } => store::commit(s, lease, checksums, durable).map(Reply::Msg),
        Request::AbortStore { lease } => {
            store::abort(s, lease);
            Ok(Reply::None)
        }
        Request::Acquire { salt } => retrieve::acquire(s, salt, 0, blob).map(Reply::Msg),
        Request::AcquireFrom { salt, first_chunk } => {
            retrieve::acquire(s, salt, first_chunk, blob).map(Reply::Msg)
        }
        Request::ReadSlot {
            lease,
            slot,
            offset,
            len,
        } => retrieve::read_slot(s, lease, slot, offset, len).map(Reply::Data),
        Request::Release { lease } => {
            retrieve::release(s, lease);
            Ok(Reply::None)
        }
        Request::Prefetch { salt } => retrieve::prefetch(s, salt, blob).map(Reply::Msg),
        Request::WaitPrefetch { id, timeout_ms } => {
            retrieve::wait_prefetch(s, id, timeout_ms).map(Reply::Msg)
        }
        Request::Pin { salt, ttl_ms } => pin::pin(s, salt, ttl_ms, blob).map(Reply::Msg),
        Request::Unpin { pins } => Ok(Reply::Msg(pin::unpin(s, pins))),
        Request::Remove { salt } => maintenance::remove(s, salt, blob).map(Reply::Msg),
        Request::RemoveSalt { salt } => maintenance::remove_salt(s, &salt).map(Reply::Msg),
        Request::Clear => maintenance::clear(s).map(Reply::Msg),
        Request::Flush { timeout_ms } => Ok(Reply::Msg(maintenance::flush(s, timeout_ms))),
        Request::Stats => maintenance::stats(s).map(Reply::Msg),
    };
    reply.unwrap_or_else(Reply::Msg)
}

/// Runs blocking engine work without stalling the runtime's other tasks.
pub(crate) fn block<R>(f: impl FnOnce() -> R) -> R {
    tokio::task::block_in_place(f)
}

/// A malformed blob is a protocol error.
fn proto_err(e: ProtoError) -> Response {
    err(ErrorCode::Protocol, e.to_string())
}

/// An engine error, classed for the client.
fn engine_err(e: kvtier::Error) -> Response {
    proto::error_reply(&e)
}

/// A chunk index from the wire. One that does not fit a `usize` is past any prompt's chunks:
/// it saturates, and the engine's window check refuses it with a clear error.
fn chunk_index(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

/// The tokens of a token blob.
fn tokens(blob: &[u8]) -> Handled<Vec<u32>> {
    proto::tokens_from_bytes(blob).map_err(proto_err)
}
