//! `Pin` and `Unpin`: pins taken on a connection are released when it closes.

use std::time::Duration;

use kvtier::keys::ChunkKey;
use kvtier::transport::wire::Response;
use kvtier::PinToken;

use super::{engine_err, tokens, Handled, Session};

/// Pins the L1-resident prefix of the prompt in the blob.
pub(super) fn pin(
    s: &mut Session,
    salt: Option<String>,
    ttl_ms: Option<u64>,
    blob: &[u8],
) -> Handled<Response> {
    let tokens = tokens(blob)?;
    let pins = s
        .engine
        .pin(&tokens, salt.as_deref(), ttl_ms.map(Duration::from_millis))
        .map_err(engine_err)?;
    let pins = s.leases.add_pins(pins)?;
    Ok(Response::Pins {
        pins: pins.into_iter().map(|p| (p.key.0, p.id)).collect(),
    })
}

/// Releases pins.
pub(super) fn unpin(s: &mut Session, pins: Vec<([u8; 32], u64)>) -> Response {
    let pins: Vec<PinToken> = pins
        .into_iter()
        .map(|(k, id)| PinToken {
            key: ChunkKey(k),
            id,
        })
        .collect();
    s.leases.unpin(&pins);
    Response::Ok
}
