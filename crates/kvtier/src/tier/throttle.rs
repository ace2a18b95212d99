//! A bandwidth and IOPS limit around a real tier: token buckets that make the tier's
//! operations wait, so it moves at most the configured bytes and operations per second.
//!
//! In production it keeps kvtier from saturating a disk or a network link it shares with
//! other work; in tests it makes a real tier slow on purpose (the manager's deadlines then
//! turn it into misses and skipped stores, C8). Every operation still goes to the wrapped
//! tier.
//!
//! What is charged: a `put` its payload bytes and one operation, before it runs; a `get`
//! one operation before and its payload bytes once read (the size is known only then), so
//! reads are delivered at the rate too; a prefix probe one operation (one round trip or
//! index walk, whatever its length); a `remove` one operation. Sweeps are not charged.
//! A bucket holds at most a tenth of a second of its rate, so an idle tier cannot bank a
//! burst; a request larger than that waits for its whole size. A waiter cancelled by its
//! deadline keeps its charge: the limit errs towards less traffic, never more.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::{PutOutcome, Tier, TierCounters, TierFuture, TierUsage};
use crate::chunk::Chunk;
use crate::keys::ChunkKey;
use crate::memory::BufferSource;

/// Limits of one tier (each `None` = unlimited).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct ThrottleLimits {
    /// Payload bytes per second.
    pub bytes_per_sec: Option<f64>,
    /// Operations per second.
    pub ops_per_sec: Option<f64>,
}

impl ThrottleLimits {
    /// Whether any limit is set.
    pub fn is_set(&self) -> bool {
        self.bytes_per_sec.is_some() || self.ops_per_sec.is_some()
    }
}

/// A token bucket: `rate` units per second, at most a tenth of a second banked. Tokens may
/// go negative (debt): a caller waits until its own debt is paid, so concurrent callers
/// are served in order at the rate.
struct Bucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    fn new(rate: f64) -> Bucket {
        let burst = (rate / 10.0).max(1.0);
        Bucket {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Takes `n` units; returns how long the caller must wait before using them.
    fn reserve(&self, n: f64) -> Duration {
        let mut st = self.state.lock();
        let now = Instant::now();
        let refill = now.duration_since(st.1).as_secs_f64() * self.rate;
        st.0 = (st.0 + refill).min(self.burst) - n;
        st.1 = now;
        if st.0 >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-st.0 / self.rate)
        }
    }
}

/// A tier whose operations wait for [`ThrottleLimits`].
pub struct ThrottledTier {
    inner: Arc<dyn Tier>,
    limits: ThrottleLimits,
    bytes: Option<Bucket>,
    ops: Option<Bucket>,
    /// Time operations spent waiting for the limit, µs.
    waited_us: AtomicU64,
}

impl ThrottledTier {
    /// Wraps `inner` (its name stays the tier's name).
    pub fn new(inner: Arc<dyn Tier>, limits: ThrottleLimits) -> ThrottledTier {
        ThrottledTier {
            inner,
            limits,
            bytes: limits.bytes_per_sec.map(Bucket::new),
            ops: limits.ops_per_sec.map(Bucket::new),
            waited_us: AtomicU64::new(0),
        }
    }

    /// The wrapped tier.
    pub fn inner(&self) -> &Arc<dyn Tier> {
        &self.inner
    }

    /// Waits until `ops` operations and `bytes` payload bytes fit the limits.
    async fn pace(&self, ops: u64, bytes: u64) {
        let mut wait = Duration::ZERO;
        if let (Some(b), true) = (&self.ops, ops > 0) {
            wait = wait.max(b.reserve(ops as f64));
        }
        if let (Some(b), true) = (&self.bytes, bytes > 0) {
            wait = wait.max(b.reserve(bytes as f64));
        }
        if !wait.is_zero() {
            self.waited_us
                .fetch_add(wait.as_micros() as u64, Ordering::Relaxed);
            tokio::time::sleep(wait).await;
        }
    }
}

impl std::fmt::Debug for ThrottledTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThrottledTier")
            .field("tier", &self.inner.name())
            .field("limits", &self.limits)
            .finish()
    }
}

impl Tier for ThrottledTier {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn verifies_reads(&self) -> bool {
        self.inner.verifies_reads()
    }

    fn holds(&self, key: &ChunkKey) -> Option<bool> {
        self.inner.holds(key)
    }

    fn retention(&self) -> Option<Duration> {
        self.inner.retention()
    }

    fn set_residency_observer(&self, observer: Arc<dyn super::ResidencyObserver>) -> bool {
        // Pacing delays reads, it never makes them miss: the inner tier's index is the truth.
        self.inner.set_residency_observer(observer)
    }

    fn observe_prompt(&self, keys: &[ChunkKey], report: crate::policy::PromptReport) {
        self.inner.observe_prompt(keys, report);
    }

    fn contains_prefix<'a>(&'a self, keys: &'a [ChunkKey]) -> TierFuture<'a, usize> {
        Box::pin(async move {
            self.pace(1, 0).await;
            self.inner.contains_prefix(keys).await
        })
    }

    fn get<'a>(
        &'a self,
        key: ChunkKey,
        bufs: &'a dyn BufferSource,
    ) -> TierFuture<'a, Option<Chunk>> {
        Box::pin(async move {
            self.pace(1, 0).await;
            let got = self.inner.get(key, bufs).await?;
            if let Some(c) = &got {
                self.pace(0, c.buf.len() as u64).await;
            }
            Ok(got)
        })
    }

    fn get_deferred<'a>(
        &'a self,
        key: ChunkKey,
        bufs: &'a dyn BufferSource,
    ) -> TierFuture<'a, Option<(Chunk, bool)>> {
        Box::pin(async move {
            self.pace(1, 0).await;
            let got = self.inner.get_deferred(key, bufs).await?;
            if let Some((c, _)) = &got {
                self.pace(0, c.buf.len() as u64).await;
            }
            Ok(got)
        })
    }

    fn discard_corrupt(&self, key: ChunkKey) -> TierFuture<'_, bool> {
        self.inner.discard_corrupt(key)
    }

    fn put(&self, chunk: Chunk) -> TierFuture<'_, PutOutcome> {
        Box::pin(async move {
            self.pace(1, chunk.buf.len() as u64).await;
            self.inner.put(chunk).await
        })
    }

    fn remove(&self, key: ChunkKey) -> TierFuture<'_, bool> {
        Box::pin(async move {
            self.pace(1, 0).await;
            self.inner.remove(key).await
        })
    }

    fn clear(&self) -> TierFuture<'_, u64> {
        self.inner.clear()
    }

    fn remove_salt<'a>(&'a self, salt: &'a str) -> TierFuture<'a, u64> {
        self.inner.remove_salt(salt)
    }

    fn usage(&self) -> TierUsage {
        self.inner.usage()
    }

    fn counters(&self) -> TierCounters {
        self.inner.counters()
    }

    fn details(&self) -> serde_json::Value {
        let mut d = self.inner.details();
        let t = serde_json::json!({
            "bytes_per_sec": self.limits.bytes_per_sec,
            "ops_per_sec": self.limits.ops_per_sec,
            "waited_ms": self.waited_us.load(Ordering::Relaxed) / 1000,
        });
        match &mut d {
            serde_json::Value::Object(m) => {
                m.insert("throttle".into(), t);
            }
            _ => d = serde_json::json!({ "throttle": t }),
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_charges_debt_in_order() {
        let b = Bucket::new(1000.0);
        // 100 units banked at start; the next 1000 wait one second in all.
        assert_eq!(b.reserve(100.0), Duration::ZERO);
        let w1 = b.reserve(500.0).as_secs_f64();
        let w2 = b.reserve(500.0).as_secs_f64();
        assert!((0.45..0.55).contains(&w1), "{w1}");
        assert!((0.95..1.05).contains(&w2), "{w2}");
    }
}
