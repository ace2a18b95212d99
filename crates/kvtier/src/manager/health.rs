//! Per-tier health: consecutive failures mark a tier down for a backoff period, during which
//! operations skip it (misses, skipped stores) instead of waiting on it (C8). After the
//! backoff the next operation probes it; success brings it back.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Backoff settings.
#[derive(Clone, Copy, Debug)]
pub struct HealthPolicy {
    /// Consecutive errors that mark a tier down (a timeout marks it down at once).
    pub failure_threshold: u32,
    /// First backoff.
    pub backoff_initial: Duration,
    /// Longest backoff.
    pub backoff_max: Duration,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        HealthPolicy {
            failure_threshold: 3,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
        }
    }
}

#[derive(Debug)]
struct State {
    consecutive: u32,
    down: bool,
    until: Option<Instant>,
    backoff: Duration,
}

/// Health of one tier.
#[derive(Debug)]
pub struct Health {
    tier: String,
    policy: HealthPolicy,
    state: Mutex<State>,
}

impl Health {
    /// A healthy tier.
    pub fn new(tier: &str, policy: HealthPolicy) -> Health {
        Health {
            tier: tier.to_string(),
            policy,
            state: Mutex::new(State {
                consecutive: 0,
                down: false,
                until: None,
                backoff: policy.backoff_initial,
            }),
        }
    }

    /// Whether operations should go to the tier now (true while up, and for a probe once
    /// the backoff has passed).
    pub fn available(&self) -> bool {
        let st = self.state.lock();
        st.until.is_none_or(|t| Instant::now() >= t)
    }

    /// Whether the tier is currently marked down.
    pub fn is_down(&self) -> bool {
        self.state.lock().down
    }

    /// Records a successful operation.
    pub fn success(&self) {
        let mut st = self.state.lock();
        if st.down {
            tracing::warn!(tier = %self.tier, "tier is back: operations use it again");
        }
        st.consecutive = 0;
        st.down = false;
        st.until = None;
        st.backoff = self.policy.backoff_initial;
    }

    /// Records a failed operation; `timeout` failures mark the tier down at once.
    pub fn failure(&self, timeout: bool, what: &str) {
        let mut st = self.state.lock();
        st.consecutive += 1;
        if !(timeout || st.consecutive >= self.policy.failure_threshold) {
            return;
        }
        if st.down {
            st.backoff = (st.backoff * 2).min(self.policy.backoff_max);
        } else {
            tracing::warn!(
                tier = %self.tier,
                error = %what,
                "tier marked down: its operations become misses and skipped stores; retrying with backoff"
            );
            st.down = true;
            st.backoff = self.policy.backoff_initial;
        }
        st.until = Some(Instant::now() + st.backoff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_mark_down_after_threshold_and_success_recovers() {
        let h = Health::new(
            "t",
            HealthPolicy {
                failure_threshold: 2,
                backoff_initial: Duration::from_millis(30),
                backoff_max: Duration::from_millis(100),
            },
        );
        h.failure(false, "x");
        assert!(h.available() && !h.is_down());
        h.failure(false, "x");
        assert!(h.is_down() && !h.available());
        std::thread::sleep(Duration::from_millis(40));
        assert!(h.available(), "probe allowed after backoff");
        h.success();
        assert!(!h.is_down());
        h.failure(true, "timeout");
        assert!(h.is_down(), "a timeout marks down at once");
    }
}
