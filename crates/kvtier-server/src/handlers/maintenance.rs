//! Cache maintenance over a model connection: `Remove`, `RemoveSalt`, `Clear`, `Flush`,
//! `Stats`.

use std::time::Duration;

use kvtier::transport::wire::{ErrorCode, Response};

use super::{block, engine_err, tokens, Handled, Session};
use crate::io::err;

/// Longest flush wait a client may ask for.
const MAX_FLUSH: Duration = Duration::from_secs(600);

/// Removes the chunks of the prompt in the blob from every tier.
pub(super) fn remove(s: &Session, salt: Option<String>, blob: &[u8]) -> Handled<Response> {
    let tokens = tokens(blob)?;
    let n = block(|| s.engine.remove(&tokens, salt.as_deref())).map_err(engine_err)?;
    Ok(Response::Count(n))
}

/// Forgets a tenant's chunks in every tier.
pub(super) fn remove_salt(s: &Session, salt: &str) -> Handled<Response> {
    let r = block(|| s.engine.remove_salt(salt)).map_err(engine_err)?;
    Ok(Response::Count(r.iter().map(|x| x.1).sum()))
}

/// Empties every tier.
pub(super) fn clear(s: &Session) -> Handled<Response> {
    let r = block(|| s.engine.clear()).map_err(engine_err)?;
    Ok(Response::Count(r.iter().map(|x| x.1).sum()))
}

/// Waits for queued lower-tier writes.
pub(super) fn flush(s: &Session, timeout_ms: u64) -> Response {
    let t = Duration::from_millis(timeout_ms).min(MAX_FLUSH);
    Response::Flushed(block(|| s.engine.flush(t)))
}

/// Engine and tier numbers as JSON.
pub(super) fn stats(s: &Session) -> Handled<Response> {
    let stats = block(|| s.engine.stats());
    let json = serde_json::to_string(&stats)
        .map_err(|e| err(ErrorCode::Engine, format!("stats are not JSON: {e}")))?;
    Ok(Response::Stats(json))
}
