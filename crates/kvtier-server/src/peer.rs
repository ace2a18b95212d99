//! Chunk-level connections: another engine using this server as one of its tiers
//! (`kvtier://host:port` in its `remote_url`).
//!
//! Such a connection opens with `HelloPeer` and carries no model: chunk keys are global (the
//! model identity and tenant salt are hashed into the first key of every chain), so the
//! requests go straight to the shared [`kvtier::manager::StorageManager`] of the server's
//! `EngineCore`. A lookup probes L1 then the server's own lower tiers; a get may come from
//! any of them (and is written back into the server's L1); a put takes the normal store
//! path: claim, L1, write-through to the server's lower tiers.

use std::sync::Arc;

use kvtier::chunk::record::{decode_header, encode_header};
use kvtier::chunk::{copy_with_checksum, Chunk};
use kvtier::keys::ChunkKey;
use kvtier::manager::StoreClaim;
use kvtier::transport::wire::{self as proto, ErrorCode, PutResult, Request, Response};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::{debug, warn};

use crate::handlers::block;
use crate::handshake::Transport;
use crate::io::{decode_request, err, read_frame, write_msg};
use crate::state::ServerState;

/// Serves one chunk-level connection until the peer closes it or the server shuts down.
pub(crate) async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    state: Arc<ServerState>,
    client: String,
    transport: Transport,
) {
    debug!(%client, ?transport, "peer tier connected");
    let mut shutdown = state.shutdown.clone();
    let share = state.gates.conn_share();
    let idle = state.gates.limits().idle_timeout;
    loop {
        // A peer holds nothing between requests: silent for the idle timeout, it is closed.
        let read = read_frame(&mut stream, &state.gates, &share, state.max_frame, || {});
        let frame = tokio::select! {
            r = tokio::time::timeout(idle, read) => match r {
                Ok(r) => r,
                Err(_) => {
                    debug!(%client, ?idle, "closing an idle peer connection");
                    break;
                }
            },
            _ = shutdown.changed() => break,
        };
        let (body, _hold) = match frame {
            Ok(Some(b)) => b,
            Ok(None) => break,
            Err(e) => {
                debug!(%client, error = %e, "closing peer connection after a bad frame");
                let _ = write_msg(&mut stream, &err(ErrorCode::Protocol, e.to_string()), &[]).await;
                break;
            }
        };
        if let Err(e) = handle(&state, &body, &mut stream).await {
            debug!(%client, error = %e, "peer connection write failed");
            break;
        }
    }
    debug!(%client, "peer tier disconnected");
}

async fn handle<W: AsyncWrite + Unpin>(
    state: &ServerState,
    body: &[u8],
    wr: &mut W,
) -> std::io::Result<()> {
    let Some((req, blob)) = decode_request(body, wr).await? else {
        return Ok(());
    };
    let manager = state.models.core().manager();
    let reply = match req {
        Request::Ping => Response::Pong,
        Request::ContainsChunks => match proto::keys_from_bytes(blob) {
            Err(e) => err(ErrorCode::Protocol, e.to_string()),
            Ok(keys) => match block(|| manager.lookup(&keys)) {
                Ok(l) => Response::ContainsChunks {
                    chunks: u32::try_from(l.hit_chunks).unwrap_or(u32::MAX),
                },
                Err(e) => proto::error_reply(&e),
            },
        },
        Request::GetChunk { key } => match block(|| manager.get(ChunkKey(key))) {
            Ok(Some(chunk)) => return send_record(wr, &chunk).await,
            Ok(None) => Response::NotFound,
            Err(e) => proto::error_reply(&e),
        },
        Request::PutChunk => put(state, blob),
        Request::RemoveChunk { key } => match block(|| manager.remove(ChunkKey(key))) {
            Ok(n) => Response::Count(n as u64),
            Err(e) => proto::error_reply(&e),
        },
        Request::Clear => match block(|| manager.clear()) {
            Ok(v) => Response::Count(v.iter().map(|x| x.1).sum()),
            Err(e) => proto::error_reply(&e),
        },
        Request::RemoveSalt { salt } => match block(|| manager.remove_salt(&salt)) {
            Ok(v) => Response::Count(v.iter().map(|x| x.1).sum()),
            Err(e) => proto::error_reply(&e),
        },
        Request::Hello { .. } | Request::HelloPeer { .. } => {
            err(ErrorCode::Protocol, "already greeted")
        }
        other => err(
            ErrorCode::Protocol,
            format!(
                "{} is a model request; this connection was opened with HelloPeer (chunk frames only)",
                request_name(&other)
            ),
        ),
    };
    write_msg(wr, &reply, &[]).await
}

fn request_name(r: &Request) -> String {
    let s = format!("{r:?}");
    s.split([' ', '{', '('])
        .next()
        .unwrap_or("request")
        .to_string()
}

/// Sends a chunk as a record: header, then the payload straight from the pool buffer.
async fn send_record<W: AsyncWrite + Unpin>(wr: &mut W, chunk: &Chunk) -> std::io::Result<()> {
    let header = match encode_header(&chunk.info) {
        Ok(h) => h,
        Err(e) => return write_msg(wr, &proto::error_reply(&e), &[]).await,
    };
    let payload = chunk.payload();
    let head = proto::encode_head(&Response::Record, header.len() + payload.len())?;
    wr.write_all(&head).await?;
    wr.write_all(&header).await?;
    wr.write_all(payload).await
}

/// Stores a record through the server's normal store path, verifying it first: the bytes
/// crossed a network, and a corrupt chunk must never be stored as valid.
fn put(state: &ServerState, blob: &[u8]) -> Response {
    let manager = state.models.core().manager();
    let (info, hlen) = match decode_header(blob) {
        Ok(x) => x,
        Err(e) => return proto::error_reply(&e),
    };
    let payload = &blob[hlen..];
    if payload.len() as u64 != info.len {
        return err(
            ErrorCode::Corrupt,
            format!(
                "record of chunk {} announces {} payload bytes but carries {}",
                info.key,
                info.len,
                payload.len()
            ),
        );
    }
    let guard = match manager.claim(info.key) {
        StoreClaim::Present(_) | StoreClaim::Stored | StoreClaim::InFlight => {
            return Response::PutChunk(PutResult::AlreadyPresent)
        }
        StoreClaim::New(g) => g,
    };
    let Some(mut buf) = manager.allocate(payload.len()) else {
        return Response::PutChunk(PutResult::Skipped("no_memory".into()));
    };
    // One pass copies and checksums, so verification costs no extra read of the payload.
    let sum = copy_with_checksum(buf.as_mut_slice(), payload);
    if sum != info.checksum {
        warn!(key = %info.key, "peer sent a chunk whose checksum does not match: refused");
        return err(
            ErrorCode::Corrupt,
            format!(
                "chunk {}: payload checksum {sum:016x} does not match the record's {:016x}",
                info.key, info.checksum
            ),
        );
    }
    let chunk = Chunk {
        info,
        buf: buf.seal(),
    };
    // Lower-tier writes run in the background like any store; the peer does not wait.
    drop(manager.commit(guard, chunk));
    Response::PutChunk(PutResult::Stored)
}
