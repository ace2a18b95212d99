//! Stores: `BeginStore` (or `BeginStoreFrom`, chunks `first_chunk..` only) leases the slots
//! to fill, `WriteSlot` fills them over TCP (a client mapping the pool writes in place),
//! `CommitStore` seals them, `AbortStore` drops them.

use std::time::Instant;

use kvtier::tier::PutOutcome;
use kvtier::transport::wire::{ErrorCode, Response, Slot, StoreCounts};
use kvtier::StoreReport;

use super::{block, chunk_index, engine_err, tokens, Handled, Session};
use crate::io::err;
use crate::lease::StoreLease;

/// Claims and allocates chunks `first_chunk..` of the prompt in the blob; replies with the
/// slots to fill under a lease, or at once when there is nothing to write.
pub(super) fn begin(
    s: &mut Session,
    salt: Option<String>,
    first_chunk: u64,
    blob: &[u8],
) -> Handled<Response> {
    let tokens = tokens(blob)?;
    let t0 = Instant::now();
    let first = chunk_index(first_chunk);
    let session =
        block(|| s.engine.begin_store_from(&tokens, salt.as_deref(), first)).map_err(engine_err)?;
    if session.slots.is_empty() {
        let report = block(|| s.engine.commit_store(session));
        return Ok(Response::Stored(counts(&report)));
    }
    let slots = session
        .slots
        .iter()
        .map(|s| Slot {
            start: s.span.start as u64,
            end: s.span.end as u64,
            offset: s.buf.offset(),
            len: s.buf.len() as u64,
        })
        .collect();
    let (stored_tokens, present_chunks, inflight_chunks, dropped_chunks) = (
        session.stored_tokens as u64,
        session.present_chunks as u32,
        session.inflight_chunks as u32,
        session.dropped_chunks as u32,
    );
    let lease = s.leases.add_store(StoreLease { session, t0 })?;
    Ok(Response::StoreLease {
        lease,
        slots,
        stored_tokens,
        present_chunks,
        inflight_chunks,
        dropped_chunks,
    })
}

/// Copies the blob into a slot of a store lease at `offset`.
pub(super) fn write_slot(
    s: &mut Session,
    lease: u64,
    slot: u32,
    offset: u64,
    blob: &[u8],
) -> Handled<Response> {
    let Some(mut held) = s.leases.store(lease) else {
        return Err(err(ErrorCode::NoLease, "unknown or expired store lease"));
    };
    let Some(target) = held.get().slots.get_mut(slot as usize) else {
        return Err(err(ErrorCode::InvalidInput, "no such slot"));
    };
    let buf = target.buf.as_mut_slice();
    let o = usize::try_from(offset).unwrap_or(usize::MAX);
    match o.checked_add(blob.len()) {
        Some(end) if end <= buf.len() => buf[o..end].copy_from_slice(blob),
        _ => return Err(err(ErrorCode::InvalidInput, "write outside the slot")),
    }
    held.renew();
    Ok(Response::Written)
}

/// Seals a store lease; with `durable`, replies once the lower-tier writes finished.
pub(super) fn commit(
    s: &mut Session,
    lease: u64,
    checksums: Vec<Option<u64>>,
    durable: bool,
) -> Handled<Response> {
    let Some(StoreLease { mut session, t0 }) = s.leases.take_store(lease) else {
        return Err(err(ErrorCode::NoLease, "unknown or expired store lease"));
    };
    // Checksums computed by a local writer while copying are trusted (the socket is the
    // trust boundary); remote writers' bytes are checksummed here.
    if s.shm && checksums.len() == session.slots.len() {
        for (slot, c) in session.slots.iter_mut().zip(checksums) {
            slot.checksum = c;
        }
    }
    let report = block(|| s.engine.commit_store(session));
    let m = s.state.models.core().metrics();
    let dt = t0.elapsed().as_secs_f64();
    m.store_seconds.observe(dt);
    if report.new_bytes > 0 && dt > 0.0 {
        m.store_gbps.observe(report.new_bytes as f64 / dt / 1e9);
    }
    if !durable {
        return Ok(Response::Stored(counts(&report)));
    }
    let summary = counts(&report);
    let durable = block(|| reached_every_tier(s, report));
    Ok(Response::StoredDurable { summary, durable })
}

/// Waits for a store's lower-tier writes: whether every new chunk reached every lower tier.
fn reached_every_tier(s: &Session, report: StoreReport) -> bool {
    let lower = s
        .state
        .models
        .core()
        .manager()
        .tier_names()
        .len()
        .saturating_sub(1);
    let want = report.new_chunks * lower;
    let outcomes = report.ticket.wait();
    let ok = outcomes
        .iter()
        .filter(|o| {
            matches!(
                o.result,
                Ok(PutOutcome::Stored | PutOutcome::AlreadyPresent)
            )
        })
        .count();
    ok == want
}

/// Drops a store lease without storing.
pub(super) fn abort(s: &mut Session, lease: u64) {
    drop(s.leases.take_store(lease));
}

/// A store's counts as they travel.
fn counts(report: &StoreReport) -> StoreCounts {
    StoreCounts::from(&report.summary)
}
