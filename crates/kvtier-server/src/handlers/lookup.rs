//! `Lookup`: the stored prefix of a prompt whose chunk keys the client computed.

use kvtier::transport::wire::{self as proto, Response};

use super::{block, engine_err, proto_err, Handled, Session};

/// Looks up the keys in the blob through the engine (which records the lookup metrics).
pub(super) fn lookup(s: &Session, n_tokens: u64, blob: &[u8]) -> Handled<Response> {
    let keys = proto::keys_from_bytes(blob).map_err(proto_err)?;
    let n = usize::try_from(n_tokens).unwrap_or(usize::MAX);
    let r = block(|| s.engine.lookup_keys(&keys, n)).map_err(engine_err)?;
    Ok(Response::Lookup {
        hit_chunks: r.hit_chunks as u32,
        tiers: r.tiers.iter().map(|&t| t as u8).collect(),
    })
}
