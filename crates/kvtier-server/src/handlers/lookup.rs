//! `Lookup` and `LookupFrom`: the stored prefix (or run of chunks from `first_chunk` on) of
//! a prompt whose chunk keys the client computed.

use kvtier::transport::wire::{self as proto, Response};

use super::{block, chunk_index, engine_err, proto_err, Handled, Session};

/// Looks up the keys in the blob, those of chunks `first_chunk..` of an `n_tokens`-token
/// prompt, through the engine (which checks the key count and the window, and records the
/// lookup metrics).
pub(super) fn lookup(
    s: &Session,
    n_tokens: u64,
    first_chunk: u64,
    blob: &[u8],
) -> Handled<Response> {
    let keys = proto::keys_from_bytes(blob).map_err(proto_err)?;
    let n = usize::try_from(n_tokens).unwrap_or(usize::MAX);
    let first = chunk_index(first_chunk);
    let r = block(|| s.engine.lookup_keys_from(&keys, n, first)).map_err(engine_err)?;
    Ok(Response::Lookup {
        hit_chunks: r.hit_chunks as u32,
        tiers: r.tiers.iter().map(|&t| t as u8).collect(),
    })
}
