//! The counters every remote tier keeps, and their snapshot.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::transport::link::LinkCounters;

/// Snapshot of the counters every remote tier keeps (a tier's own stats add what only its
/// store counts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RemoteStats {
    /// `get` calls that reached the store.
    pub gets: u64,
    /// Gets that returned a verified chunk.
    pub hits: u64,
    /// Gets of keys the store does not hold.
    pub misses: u64,
    /// Chunks written.
    pub puts: u64,
    /// Puts the store already held (it said so; a store that overwrites never does).
    pub puts_deduped: u64,
    /// Puts the store declined (no memory, too large for it).
    pub puts_skipped: u64,
    /// Payload bytes written.
    pub put_bytes: u64,
    /// Payload bytes read.
    pub get_bytes: u64,
    /// Values that failed validation (bad record, wrong key, checksum): treated as misses.
    pub checksum_failures: u64,
    /// Gets dropped because the L1 pool had no room for the payload.
    pub alloc_failures: u64,
    /// Connections opened.
    pub connects: u64,
    /// Failed connects (refused, timed out, handshake or authentication refused).
    pub connect_failures: u64,
    /// Connects refused for bad credentials.
    pub auth_failures: u64,
    /// I/O errors on established connections.
    pub io_errors: u64,
}

/// The live counters behind [`RemoteStats`] (the link ones live in the store's pools).
#[derive(Debug, Default)]
pub(super) struct RemoteCounters {
    pub gets: AtomicU64,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub puts: AtomicU64,
    pub puts_deduped: AtomicU64,
    pub puts_skipped: AtomicU64,
    pub put_bytes: AtomicU64,
    pub get_bytes: AtomicU64,
    pub checksum_failures: AtomicU64,
    pub alloc_failures: AtomicU64,
}

impl RemoteCounters {
    /// Adds `n` to a counter.
    pub fn bump(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// The snapshot, with the link counters of `links` when the store has pools.
    pub fn snapshot(&self, links: Option<&LinkCounters>) -> RemoteStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut s = RemoteStats {
            gets: g(&self.gets),
            hits: g(&self.hits),
            misses: g(&self.misses),
            puts: g(&self.puts),
            puts_deduped: g(&self.puts_deduped),
            puts_skipped: g(&self.puts_skipped),
            put_bytes: g(&self.put_bytes),
            get_bytes: g(&self.get_bytes),
            checksum_failures: g(&self.checksum_failures),
            alloc_failures: g(&self.alloc_failures),
            ..RemoteStats::default()
        };
        if let Some(l) = links {
            s.connects = g(&l.connects);
            s.connect_failures = g(&l.connect_failures);
            s.auth_failures = g(&l.auth_failures);
            s.io_errors = g(&l.io_errors);
        }
        s
    }
}
