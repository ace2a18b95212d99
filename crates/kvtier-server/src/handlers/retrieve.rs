//! Retrieves: `Acquire` holds the stored prefix under a lease (`AcquireFrom`: the stored run
//! of chunks from `first_chunk` on), `ReadSlot` reads it over TCP
//! (a client mapping the pool reads in place), `Release` ends it; `Prefetch` and
//! `WaitPrefetch` load a prefix into L1.

use std::time::{Duration, Instant};

use kvtier::transport::wire::{ErrorCode, Response, Slot};

use super::{block, chunk_index, engine_err, tokens, Handled, Session};
use crate::io::err;
use crate::lease::ReadLease;

/// How long `WaitPrefetch` without a limit waits.
const DEFAULT_PREFETCH_WAIT: Duration = Duration::from_secs(3600);

/// Loads and holds the stored run of chunks from `first_chunk` on (0: the stored prefix) of
/// the prompt in the blob; replies with where its chunks are, under a lease (0 when nothing
/// is held).
pub(super) fn acquire(
    s: &mut Session,
    salt: Option<String>,
    first_chunk: u64,
    blob: &[u8],
) -> Handled<Response> {
    let tokens = tokens(blob)?;
    let t0 = Instant::now();
    let first = chunk_index(first_chunk);
    let acquired =
        block(|| s.engine.acquire_from(&tokens, salt.as_deref(), first)).map_err(engine_err)?;
    let bpt = s.engine.bytes_per_token();
    let mut chunks = Vec::with_capacity(acquired.chunks.len());
    let mut bytes = 0u64;
    for (span, c) in acquired.spans.iter().zip(&acquired.chunks) {
        let len = c.payload().len();
        if len != span.len() * bpt {
            return Err(err(
                ErrorCode::Corrupt,
                format!(
                    "chunk {} holds {len} bytes, expected {}",
                    span.key,
                    span.len() * bpt
                ),
            ));
        }
        bytes += len as u64;
        chunks.push(Slot {
            start: span.start as u64,
            end: span.end as u64,
            offset: c.buf.offset(),
            len: len as u64,
        });
    }
    let hit_tokens = acquired.hit_tokens as u64;
    let tiers = acquired.tiers.iter().map(|&t| t as u8).collect();
    let lease = if chunks.is_empty() {
        0
    } else {
        s.leases.add_read(ReadLease {
            acquired,
            t0,
            bytes,
        })?
    };
    Ok(Response::Acquired {
        lease,
        hit_tokens,
        chunks,
        tiers,
    })
}

/// The bytes `offset..offset + len` of a held chunk (sent straight from the pool).
pub(super) fn read_slot(
    s: &mut Session,
    lease: u64,
    slot: u32,
    offset: u64,
    len: u64,
) -> Handled<&[u8]> {
    let max = s.state.max_frame;
    let Some(mut held) = s.leases.read(lease) else {
        return Err(err(ErrorCode::NoLease, "unknown retrieve lease"));
    };
    let Some(chunk) = held.get().chunks.get(slot as usize) else {
        return Err(err(ErrorCode::InvalidInput, "no such slot"));
    };
    let p = chunk.payload().len();
    let o = usize::try_from(offset).unwrap_or(usize::MAX);
    let l = usize::try_from(len).unwrap_or(usize::MAX);
    if o.checked_add(l).is_none_or(|e| e > p) || l > max {
        return Err(err(ErrorCode::InvalidInput, "range outside the slot"));
    }
    let acquired = held.renew();
    Ok(&acquired.chunks[slot as usize].payload()[o..o + l])
}

/// Ends a retrieve lease and records the retrieve metrics.
pub(super) fn release(s: &mut Session, lease: u64) {
    let Some(ReadLease { t0, bytes, .. }) = s.leases.take_read(lease) else {
        return;
    };
    let m = s.state.models.core().metrics();
    let dt = t0.elapsed().as_secs_f64();
    m.retrieve_seconds.observe(dt);
    if dt > 0.0 {
        m.retrieve_gbps.observe(bytes as f64 / dt / 1e9);
    }
}

/// Starts loading the stored prefix of the prompt in the blob into L1.
pub(super) fn prefetch(s: &mut Session, salt: Option<String>, blob: &[u8]) -> Handled<Response> {
    let tokens = tokens(blob)?;
    s.leases.prefetch_room()?;
    let h = s
        .engine
        .prefetch(&tokens, salt.as_deref())
        .map_err(engine_err)?;
    Ok(Response::PrefetchStarted {
        id: s.leases.add_prefetch(h),
    })
}

/// Waits for a prefetch started on this connection.
pub(super) fn wait_prefetch(
    s: &mut Session,
    id: u64,
    timeout_ms: Option<u64>,
) -> Handled<Response> {
    let Some(h) = s.leases.take_prefetch(id) else {
        return Err(err(ErrorCode::NoLease, "unknown prefetch id"));
    };
    let wait = timeout_ms.map_or(DEFAULT_PREFETCH_WAIT, Duration::from_millis);
    let r = block(|| h.wait_timeout(wait)).map_err(engine_err)?;
    Ok(Response::Prefetched {
        tokens: r.tokens() as u64,
    })
}
