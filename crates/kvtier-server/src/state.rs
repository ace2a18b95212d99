//! What every connection of a running server shares.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

use crate::limits::Gates;
use crate::models::Models;

/// State shared by every connection.
pub(crate) struct ServerState {
    pub(crate) models: Arc<Models>,
    pub(crate) name: String,
    pub(crate) auth_token: Option<String>,
    pub(crate) pool_fd: Option<RawFd>,
    pub(crate) max_frame: usize,
    pub(crate) lease_timeout: Duration,
    pub(crate) shutdown: watch::Receiver<bool>,
    pub(crate) active: AtomicUsize,
    pub(crate) idle: Notify,
    pub(crate) expired_leases: AtomicU64,
    /// Connection caps, the frame budget and the timeouts ([`crate::limits`]).
    pub(crate) gates: Gates,
}

/// Counts a connection as active while it lives (shutdown waits for none to be left).
pub(crate) struct ActiveGuard<'a>(&'a ServerState);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl ServerState {
    pub(crate) fn track(&self) -> ActiveGuard<'_> {
        self.active.fetch_add(1, Ordering::AcqRel);
        ActiveGuard(self)
    }
}
