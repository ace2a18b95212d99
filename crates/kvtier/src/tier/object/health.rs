//! Whether an object store answers, and the backoff while it does not.
//!
//! HTTP clients keep their own connection pools, so the link state of an object store is
//! judged by requests rather than connects: a request that got any answer from the store
//! (a 404 included) means it is up; one that failed without an answer (refused, reset,
//! timed out, 5xx after retries) means it is down. While down, requests fail at once for a
//! backoff (100 ms doubling to `retry_max`), then one request at a time probes the store
//! while the others keep failing fast, so a dead store costs callers nothing and is not
//! hammered. One log line per state change.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

const BACKOFF_INITIAL: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Unknown,
    Up,
    Down,
}

#[derive(Debug)]
struct Inner {
    state: State,
    next_attempt: Option<Instant>,
    backoff: Duration,
}

/// The link state of one store.
#[derive(Debug)]
pub(super) struct Health {
    tier: String,
    what: String,
    retry_max: Duration,
    inner: Mutex<Inner>,
    probing: AtomicBool,
    /// Transitions to down.
    pub outages: AtomicU64,
    /// Requests refused at once while the store was down.
    pub fast_failures: AtomicU64,
}

/// Permission to send one request; tells the health what came of it. Dropped without a
/// verdict (the caller's deadline cancelled the request), it changes nothing.
pub(super) struct Attempt<'a> {
    health: &'a Health,
    probe: bool,
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if self.probe {
            self.health.probing.store(false, Ordering::Release);
        }
    }
}

impl Attempt<'_> {
    /// The store answered.
    pub fn answered(self) {
        self.health.up();
    }

    /// The store did not answer (`error` says why).
    pub fn failed(self, error: &dyn std::fmt::Display) {
        self.health.down(error);
    }
}

impl Health {
    /// The state of the store `what` (e.g. `s3 bucket b`) of tier `tier`.
    pub fn new(tier: &str, what: String, retry_max: Duration) -> Health {
        Health {
            tier: tier.to_string(),
            what,
            retry_max,
            inner: Mutex::new(Inner {
                state: State::Unknown,
                next_attempt: None,
                backoff: BACKOFF_INITIAL,
            }),
            probing: AtomicBool::new(false),
            outages: AtomicU64::new(0),
            fast_failures: AtomicU64::new(0),
        }
    }

    /// Whether the last verdict was "up".
    pub fn is_up(&self) -> bool {
        self.inner.lock().state == State::Up
    }

    /// An attempt, or why the store is not tried now (the message for the caller's error).
    pub fn attempt(&self) -> std::result::Result<Attempt<'_>, String> {
        let h = self.inner.lock();
        if h.state != State::Down {
            return Ok(Attempt {
                health: self,
                probe: false,
            });
        }
        let refuse = |msg: String| {
            self.fast_failures.fetch_add(1, Ordering::Relaxed);
            Err(msg)
        };
        let now = Instant::now();
        if let Some(t) = h.next_attempt.filter(|&t| now < t) {
            return refuse(format!(
                "unreachable; next attempt in {} ms",
                (t - now).as_millis()
            ));
        }
        if self.probing.swap(true, Ordering::AcqRel) {
            return refuse("unreachable; a reconnect attempt is in progress".to_string());
        }
        Ok(Attempt {
            health: self,
            probe: true,
        })
    }

    fn up(&self) {
        let mut h = self.inner.lock();
        match h.state {
            State::Unknown => {
                tracing::info!(tier = %self.tier, store = %self.what, "object store reachable")
            }
            State::Down => {
                tracing::warn!(tier = %self.tier, store = %self.what, "object store reachable again")
            }
            State::Up => return,
        }
        h.state = State::Up;
        h.next_attempt = None;
        h.backoff = BACKOFF_INITIAL;
    }

    fn down(&self, error: &dyn std::fmt::Display) {
        let mut h = self.inner.lock();
        let retry_ms = h.backoff.as_millis() as u64;
        match h.state {
            State::Unknown => tracing::warn!(
                tier = %self.tier, store = %self.what, error = %error, retry_ms,
                "object store unreachable; will keep retrying with backoff"
            ),
            State::Up => tracing::warn!(
                tier = %self.tier, store = %self.what, error = %error, retry_ms,
                "object store stopped answering; retrying with backoff"
            ),
            State::Down => {
                tracing::debug!(tier = %self.tier, store = %self.what, error = %error, "object store still unreachable")
            }
        }
        if h.state != State::Down {
            self.outages.fetch_add(1, Ordering::Relaxed);
        }
        h.state = State::Down;
        h.next_attempt = Some(Instant::now() + h.backoff);
        h.backoff = (h.backoff * 2).min(self.retry_max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_fails_fast_until_the_backoff_then_probes_one_at_a_time() {
        let h = Health::new("t", "s3 bucket b".into(), Duration::from_millis(400));
        h.attempt().unwrap().failed(&"refused");
        assert!(!h.is_up());
        let e = h.attempt().err().expect("in backoff");
        assert!(e.contains("next attempt in"), "{e}");
        std::thread::sleep(BACKOFF_INITIAL + Duration::from_millis(20));
        let probe = h.attempt().expect("backoff over: one probe");
        let e = h.attempt().err().expect("a probe is running");
        assert!(e.contains("in progress"), "{e}");
        // A probe cancelled by a deadline lets the next request probe.
        drop(probe);
        let probe = h.attempt().expect("probe again");
        probe.failed(&"still refused");
        // The backoff doubled.
        std::thread::sleep(BACKOFF_INITIAL + Duration::from_millis(20));
        assert!(h.attempt().is_err(), "200 ms backoff not over yet");
        std::thread::sleep(BACKOFF_INITIAL + Duration::from_millis(20));
        h.attempt().unwrap().answered();
        assert!(h.is_up());
        assert!(h.attempt().is_ok() && h.attempt().is_ok(), "up: no gate");
        assert_eq!(h.outages.load(Ordering::Relaxed), 1);
        assert_eq!(h.fast_failures.load(Ordering::Relaxed), 3);
    }
}
