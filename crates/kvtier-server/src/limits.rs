//! What clients can make the server hold: connections, bytes of frames in flight, and time.
//!
//! - Connections: at most [`Limits::max_connections`] at once (Unix socket and TCP
//!   together); one more is answered with an error and closed. Of those, at most
//!   [`Limits::max_handshakes`] may still be waiting for their Hello: a new one makes the
//!   one that waited longest give up, so silent or slow strangers cannot lock real clients
//!   out (a real client sends its Hello as soon as it connects).
//! - Memory: a frame body is allocated as its bytes arrive, never whole when announced.
//!   Bodies up to [`SMALL_FRAME`] (requests of clients that map the pool, Hellos, the
//!   pieces of small transfers) are read at once. A larger body first reserves its length
//!   from the connection's share (one frame limit: a connection holds at most one large
//!   body at a time) and from the server's in-flight budget ([`Limits::max_inflight`],
//!   shared by all connections); while the budget is spent, further large frames wait
//!   unread (the sender's socket fills up: backpressure). The reservation is returned when
//!   the request has been handled.
//! - Time: an admitted body must arrive within [`Limits::frame_timeout`], and a greeted
//!   connection that sends nothing for [`Limits::idle_timeout`] while holding nothing is
//!   closed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// Frame bodies up to this size are read without drawing on the in-flight budget.
pub const SMALL_FRAME: usize = 64 << 10;

/// Bounds on what clients can make a server hold (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most client connections open at once, Unix socket and TCP together.
    pub max_connections: usize,
    /// Most connections waiting for their Hello; a new one drops the oldest.
    pub max_handshakes: usize,
    /// Bytes of large frame bodies held at once by all connections (at least one frame).
    pub max_inflight: usize,
    /// A greeted connection that sends nothing for this long, holding no lease, prefetch
    /// or pin, is closed.
    pub idle_timeout: Duration,
    /// Once admitted, a frame's body must arrive within this long.
    pub frame_timeout: Duration,
}

impl Default for Limits {
    /// 1024 connections, 128 of them before their Hello, 256 MiB of frames in flight,
    /// 10 min idle, 30 s per frame.
    fn default() -> Limits {
        Limits {
            max_connections: 1024,
            max_handshakes: 128,
            max_inflight: 256 << 20,
            idle_timeout: Duration::from_secs(600),
            frame_timeout: Duration::from_secs(30),
        }
    }
}

/// The limits at run time: connection slots, waiting handshakes and the frame budget.
pub(crate) struct Gates {
    limits: Limits,
    max_frame: usize,
    connections: Arc<Semaphore>,
    budget: Arc<Semaphore>,
    handshakes: Mutex<VecDeque<(u64, Arc<Notify>)>>,
    next_handshake: AtomicU64,
}

/// A connection's slot under [`Limits::max_connections`]; freed when dropped.
pub(crate) struct Admitted(#[allow(dead_code)] OwnedSemaphorePermit);

/// A connection waiting for its Hello; [`HandshakeSlot::evicted`] completes when a newer
/// connection took its place.
pub(crate) struct HandshakeSlot<'a> {
    gates: &'a Gates,
    id: u64,
    evicted: Arc<Notify>,
}

impl HandshakeSlot<'_> {
    /// Completes when this connection must give up its handshake for a newer one.
    pub(crate) async fn evicted(&self) {
        self.evicted.notified().await
    }
}

impl Drop for HandshakeSlot<'_> {
    fn drop(&mut self) {
        let mut q = self.gates.handshakes.lock();
        if let Some(i) = q.iter().position(|(id, _)| *id == self.id) {
            q.remove(i);
        }
    }
}

/// A large frame's reservation (connection share and server budget); returned when dropped.
#[derive(Default)]
pub(crate) struct FrameHold {
    _connection: Option<OwnedSemaphorePermit>,
    _server: Option<OwnedSemaphorePermit>,
}

/// A connection's share of the frame budget: one frame limit.
pub(crate) type ConnShare = Arc<Semaphore>;

impl Gates {
    /// Gates for `limits`, with frames up to `max_frame` bytes (the budget is raised to one
    /// frame if it is smaller, so every admissible frame can be read).
    pub(crate) fn new(limits: Limits, max_frame: usize) -> Gates {
        let budget = limits
            .max_inflight
            .max(max_frame)
            .min(Semaphore::MAX_PERMITS);
        Gates {
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            budget: Arc::new(Semaphore::new(budget)),
            handshakes: Mutex::new(VecDeque::new()),
            next_handshake: AtomicU64::new(0),
            max_frame,
            limits,
        }
    }

    /// The limits.
    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
    }

    /// A slot for a new connection, or `None` when [`Limits::max_connections`] are open.
    pub(crate) fn admit(&self) -> Option<Admitted> {
        self.connections
            .clone()
            .try_acquire_owned()
            .ok()
            .map(Admitted)
    }

    /// Registers a connection waiting for its Hello, making the longest-waiting one give up
    /// when [`Limits::max_handshakes`] are waiting already.
    pub(crate) fn handshake(&self) -> HandshakeSlot<'_> {
        let id = self.next_handshake.fetch_add(1, Ordering::Relaxed);
        let evicted = Arc::new(Notify::new());
        let mut q = self.handshakes.lock();
        while q.len() >= self.limits.max_handshakes.max(1) {
            if let Some((_, oldest)) = q.pop_front() {
                // Stored as a permit if that connection is not waiting on it yet.
                oldest.notify_one();
            }
        }
        q.push_back((id, evicted.clone()));
        HandshakeSlot {
            gates: self,
            id,
            evicted,
        }
    }

    /// A new connection's share of the frame budget.
    pub(crate) fn conn_share(&self) -> ConnShare {
        Arc::new(Semaphore::new(self.max_frame))
    }

    /// Reserves room for a frame body of `len` bytes (at most the frame limit): nothing for
    /// a small one; for a large one, waits until the connection's share and the server's
    /// budget both have room.
    pub(crate) async fn reserve(&self, len: usize, share: &ConnShare) -> FrameHold {
        if len <= SMALL_FRAME {
            return FrameHold::default();
        }
        // Frame lengths are u32 on the wire, so this never saturates.
        let n = u32::try_from(len).unwrap_or(u32::MAX);
        // Neither semaphore is ever closed, so acquiring only fails if it were.
        let connection = share.clone().acquire_many_owned(n).await.ok();
        let server = self.budget.clone().acquire_many_owned(n).await.ok();
        FrameHold {
            _connection: connection,
            _server: server,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    }

    fn gates(max_inflight: usize, max_frame: usize) -> Gates {
        let limits = Limits {
            max_connections: 2,
            max_handshakes: 2,
            max_inflight,
            ..Limits::default()
        };
        Gates::new(limits, max_frame)
    }

    #[test]
    fn connections_are_capped() {
        let g = gates(1 << 20, 1 << 20);
        let a = g.admit().unwrap();
        let _b = g.admit().unwrap();
        assert!(g.admit().is_none());
        drop(a);
        assert!(g.admit().is_some());
    }

    #[test]
    fn the_longest_waiting_handshake_makes_room() {
        let g = gates(1 << 20, 1 << 20);
        let first = g.handshake();
        let second = g.handshake();
        let third = g.handshake();
        let waited = |s: &HandshakeSlot<'_>| {
            rt().block_on(async {
                tokio::time::timeout(Duration::from_millis(20), s.evicted())
                    .await
                    .is_ok()
            })
        };
        assert!(waited(&first));
        assert!(!waited(&second));
        assert!(!waited(&third));
        // A finished handshake leaves the queue: the next one evicts nobody.
        drop(second);
        let _fourth = g.handshake();
        assert!(!waited(&third));
    }

    #[test]
    fn large_frames_wait_for_the_budget_small_ones_do_not() {
        let g = gates(3 << 20, 2 << 20);
        let rt = rt();
        let (a, b) = (g.conn_share(), g.conn_share());
        let big = rt.block_on(g.reserve(2 << 20, &a));
        // Another connection's 2 MiB frame does not fit the 1 MiB left ...
        let blocked = rt.block_on(async {
            tokio::time::timeout(Duration::from_millis(20), g.reserve(2 << 20, &b))
                .await
                .is_err()
        });
        assert!(blocked);
        // ... small frames never wait ...
        let _small = rt.block_on(g.reserve(SMALL_FRAME, &b));
        // ... and the same connection waits for its own previous large frame.
        let own = rt.block_on(async {
            tokio::time::timeout(Duration::from_millis(20), g.reserve(SMALL_FRAME + 1, &a))
                .await
                .is_err()
        });
        assert!(own);
        drop(big);
        let _next = rt.block_on(g.reserve(2 << 20, &b));
    }

    #[test]
    fn the_budget_holds_at_least_one_frame() {
        let g = gates(1 << 20, 4 << 20);
        let rt = rt();
        let _f = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(1), g.reserve(4 << 20, &g.conn_share()))
                .await
                .expect("a frame at the frame limit must fit the budget")
        });
    }
}
