//! What one connection holds: store sessions and held retrieves (leases), prefetches and
//! pins.
//!
//! Everything here belongs to the connection that took it: a lease ends on commit/release,
//! when it expires, or when the connection closes — the values are dropped, which releases
//! claims, buffers and holds (RAII); pins are released when the table drops. A client that
//! dies therefore leaves nothing behind.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvtier::keys::ChunkKey;
use kvtier::manager::PrefetchHandle;
use kvtier::transport::wire::{ErrorCode, Response};
use kvtier::PinToken;
use kvtier::{Acquired, Engine, StoreSession};

use crate::io::err;

/// Most leases, and most prefetches, one connection may hold at once.
const MAX_LEASES: usize = 4096;
/// Most pins one connection may hold at once.
const MAX_PINS: usize = 1 << 20;

/// A store session, with when it began (for the store metrics).
pub(crate) struct StoreLease {
    pub(crate) session: StoreSession,
    pub(crate) t0: Instant,
}

/// A held retrieve, with when it began and its bytes (for the retrieve metrics).
pub(crate) struct ReadLease {
    pub(crate) acquired: Acquired,
    pub(crate) t0: Instant,
    pub(crate) bytes: u64,
}

enum LeaseKind {
    Store(StoreLease),
    Read(ReadLease),
}

struct Lease {
    kind: LeaseKind,
    deadline: Instant,
}

/// A lease in use by a request: renew it once the request succeeded.
pub(crate) struct Held<'a, T> {
    value: &'a mut T,
    deadline: &'a mut Instant,
    timeout: Duration,
}

impl<'a, T> Held<'a, T> {
    /// The leased value.
    pub(crate) fn get(&mut self) -> &mut T {
        self.value
    }

    /// Pushes the lease's expiry a full lease timeout away; gives the value back.
    pub(crate) fn renew(self) -> &'a mut T {
        *self.deadline = Instant::now() + self.timeout;
        self.value
    }
}

/// The leases, prefetches and pins of one connection.
pub(crate) struct Leases {
    engine: Arc<Engine>,
    timeout: Duration,
    leases: HashMap<u64, Lease>,
    prefetches: HashMap<u64, PrefetchHandle>,
    /// Pins taken on this connection: released when it closes, so a dead client leaves
    /// none behind (pins also expire by their TTL).
    pins: HashSet<(ChunkKey, u64)>,
    next_id: u64,
}

impl Drop for Leases {
    fn drop(&mut self) {
        if !self.pins.is_empty() {
            let pins: Vec<PinToken> = self
                .pins
                .iter()
                .map(|&(key, id)| PinToken { key, id })
                .collect();
            self.engine.unpin(&pins);
        }
    }
}

impl Leases {
    /// An empty table; leases expire after `timeout` without use.
    pub(crate) fn new(engine: Arc<Engine>, timeout: Duration) -> Leases {
        Leases {
            engine,
            timeout,
            leases: HashMap::new(),
            prefetches: HashMap::new(),
            pins: HashSet::new(),
            next_id: 1,
        }
    }

    /// Leases held.
    pub(crate) fn len(&self) -> usize {
        self.leases.len()
    }

    /// Whether the connection holds no lease, prefetch or pin (it may be closed when idle).
    pub(crate) fn holds_nothing(&self) -> bool {
        self.leases.is_empty() && self.prefetches.is_empty() && self.pins.is_empty()
    }

    fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn add(&mut self, kind: LeaseKind) -> Result<u64, Response> {
        if self.leases.len() >= MAX_LEASES {
            return Err(err(
                ErrorCode::InvalidInput,
                format!("connection holds {MAX_LEASES} leases; commit or release some"),
            ));
        }
        let id = self.next_id();
        let deadline = Instant::now() + self.timeout;
        self.leases.insert(id, Lease { kind, deadline });
        Ok(id)
    }

    /// Leases a store session; returns its id.
    pub(crate) fn add_store(&mut self, lease: StoreLease) -> Result<u64, Response> {
        self.add(LeaseKind::Store(lease))
    }

    /// Leases a held retrieve; returns its id.
    pub(crate) fn add_read(&mut self, lease: ReadLease) -> Result<u64, Response> {
        self.add(LeaseKind::Read(lease))
    }

    /// The store session of lease `id`.
    pub(crate) fn store(&mut self, id: u64) -> Option<Held<'_, StoreSession>> {
        let timeout = self.timeout;
        match self.leases.get_mut(&id)? {
            Lease {
                kind: LeaseKind::Store(s),
                deadline,
            } => Some(Held {
                value: &mut s.session,
                deadline,
                timeout,
            }),
            _ => None,
        }
    }

    /// The held retrieve of lease `id`.
    pub(crate) fn read(&mut self, id: u64) -> Option<Held<'_, Acquired>> {
        let timeout = self.timeout;
        match self.leases.get_mut(&id)? {
            Lease {
                kind: LeaseKind::Read(r),
                deadline,
            } => Some(Held {
                value: &mut r.acquired,
                deadline,
                timeout,
            }),
            _ => None,
        }
    }

    /// Ends store lease `id` and hands its session over.
    pub(crate) fn take_store(&mut self, id: u64) -> Option<StoreLease> {
        match self.leases.remove(&id)? {
            Lease {
                kind: LeaseKind::Store(s),
                ..
            } => Some(s),
            other => {
                self.leases.insert(id, other);
                None
            }
        }
    }

    /// Ends retrieve lease `id` and hands it over.
    pub(crate) fn take_read(&mut self, id: u64) -> Option<ReadLease> {
        match self.leases.remove(&id)? {
            Lease {
                kind: LeaseKind::Read(r),
                ..
            } => Some(r),
            other => {
                self.leases.insert(id, other);
                None
            }
        }
    }

    /// Drops the leases whose deadline passed; returns how many.
    pub(crate) fn expire(&mut self, now: Instant) -> usize {
        let before = self.leases.len();
        self.leases.retain(|_, l| l.deadline > now);
        before - self.leases.len()
    }

    /// Keeps a prefetch until it is waited for; returns its id.
    pub(crate) fn add_prefetch(&mut self, h: PrefetchHandle) -> u64 {
        let id = self.next_id();
        self.prefetches.insert(id, h);
        id
    }

    /// Whether another prefetch may start.
    pub(crate) fn prefetch_room(&self) -> Result<(), Response> {
        if self.prefetches.len() >= MAX_LEASES {
            return Err(err(
                ErrorCode::InvalidInput,
                "too many prefetches in flight",
            ));
        }
        Ok(())
    }

    /// Takes prefetch `id` to wait for it.
    pub(crate) fn take_prefetch(&mut self, id: u64) -> Option<PrefetchHandle> {
        self.prefetches.remove(&id)
    }

    /// Records pins taken on this connection; over the limit they are released and refused.
    pub(crate) fn add_pins(&mut self, pins: Vec<PinToken>) -> Result<Vec<PinToken>, Response> {
        if self.pins.len() + pins.len() > MAX_PINS {
            self.engine.unpin(&pins);
            return Err(err(
                ErrorCode::InvalidInput,
                "too many pins on one connection",
            ));
        }
        self.pins.extend(pins.iter().map(|p| (p.key, p.id)));
        Ok(pins)
    }

    /// Releases pins (those of this connection stop being tracked).
    pub(crate) fn unpin(&mut self, pins: &[PinToken]) {
        for p in pins {
            self.pins.remove(&(p.key, p.id));
        }
        self.engine.unpin(pins);
    }
}
