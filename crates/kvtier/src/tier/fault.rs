//! Fault injection: a wrapper around a real tier that fails, stalls, drops or corrupts chosen
//! operations on demand. Used by tests of write-back (C3), prefix continuity (C4), integrity
//! (C7) and deadlines (C8). It is not a stand-in for a tier: every operation it lets through
//! goes to the wrapped tier.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{PutOutcome, Tier, TierCounters, TierFuture, TierUsage};
use crate::chunk::Chunk;
use crate::error::Error;
use crate::keys::ChunkKey;
use crate::memory::BufferSource;

/// Which operation a rule applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOp {
    /// `contains_prefix`.
    Contains,
    /// `get`.
    Get,
    /// `put`.
    Put,
    /// Every operation above.
    Any,
}

/// What happens to a matching operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Return an error.
    Fail,
    /// Wait this long, then run the operation.
    Stall(Duration),
    /// Pretend: `contains` finds nothing, `get` misses, `put` reports success without storing.
    Drop,
    /// `get` returns a copy with one byte flipped (other operations run normally).
    Corrupt,
}

/// One injection rule.
#[derive(Clone, Debug)]
pub struct FaultRule {
    /// Operation to match.
    pub op: FaultOp,
    /// Fault to inject.
    pub fault: Fault,
    /// Only these keys (`None` = any key; `contains` matches on its first key).
    pub keys: Option<Vec<ChunkKey>>,
    /// Probability of firing when matched, 0..=1.
    pub probability: f64,
    /// Fire at most this many times (`None` = unlimited).
    pub remaining: Option<u64>,
}

impl FaultRule {
    /// A rule that always fires for `op`.
    pub fn always(op: FaultOp, fault: Fault) -> FaultRule {
        FaultRule {
            op,
            fault,
            keys: None,
            probability: 1.0,
            remaining: None,
        }
    }

    /// Restricts the rule to `keys`.
    pub fn for_keys(mut self, keys: impl IntoIterator<Item = ChunkKey>) -> FaultRule {
        self.keys = Some(keys.into_iter().collect());
        self
    }

    /// Makes the rule fire with probability `p`.
    pub fn with_probability(mut self, p: f64) -> FaultRule {
        self.probability = p;
        self
    }

    /// Makes the rule fire at most `n` times.
    pub fn times(mut self, n: u64) -> FaultRule {
        self.remaining = Some(n);
        self
    }
}

/// A tier wrapper that injects faults.
pub struct FaultTier {
    name: String,
    inner: Arc<dyn Tier>,
    rules: Mutex<Vec<FaultRule>>,
    rng: Mutex<StdRng>,
    fired: AtomicU64,
}

impl FaultTier {
    /// Wraps `inner`; the wrapper takes the inner tier's name. `seed` makes random rules
    /// reproducible.
    pub fn new(inner: Arc<dyn Tier>, seed: u64) -> FaultTier {
        FaultTier {
            name: inner.name().to_string(),
            inner,
            rules: Mutex::new(Vec::new()),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            fired: AtomicU64::new(0),
        }
    }

    /// Adds a rule (rules are tried in insertion order; the first that fires wins).
    pub fn add_rule(&self, rule: FaultRule) {
        self.rules.lock().push(rule);
    }

    /// Removes every rule.
    pub fn clear_rules(&self) {
        self.rules.lock().clear();
    }

    /// How many faults fired so far.
    pub fn fired(&self) -> u64 {
        self.fired.load(Ordering::Relaxed)
    }

    /// The wrapped tier.
    pub fn inner(&self) -> &Arc<dyn Tier> {
        &self.inner
    }

    fn pick(&self, op: FaultOp, key: Option<&ChunkKey>) -> Option<Fault> {
        let mut rules = self.rules.lock();
        let mut rng = self.rng.lock();
        for i in 0..rules.len() {
            let r = &mut rules[i];
            if r.op != op && r.op != FaultOp::Any {
                continue;
            }
            if let (Some(keys), Some(k)) = (&r.keys, key) {
                if !keys.contains(k) {
                    continue;
                }
            } else if r.keys.is_some() {
                continue;
            }
            if r.probability < 1.0 && !rng.random_bool(r.probability.clamp(0.0, 1.0)) {
                continue;
            }
            let fault = r.fault;
            if let Some(n) = &mut r.remaining {
                *n -= 1;
                if *n == 0 {
                    rules.remove(i);
                }
            }
            self.fired.fetch_add(1, Ordering::Relaxed);
            return Some(fault);
        }
        None
    }

    fn injected(&self, op: &str) -> Error {
        Error::tier(&self.name, format!("injected {op} failure"))
    }
}

impl Tier for FaultTier {
    fn name(&self) -> &str {
        &self.name
    }

    fn observe_prompt(&self, keys: &[ChunkKey], report: crate::policy::PromptReport) {
        self.inner.observe_prompt(keys, report);
    }

    fn contains_prefix<'a>(&'a self, keys: &'a [ChunkKey]) -> TierFuture<'a, usize> {
        let fault = self.pick(FaultOp::Contains, keys.first());
        Box::pin(async move {
            match fault {
                Some(Fault::Fail) => Err(self.injected("contains")),
                Some(Fault::Drop) => Ok(0),
                Some(Fault::Stall(d)) => {
                    tokio::time::sleep(d).await;
                    self.inner.contains_prefix(keys).await
                }
                Some(Fault::Corrupt) | None => self.inner.contains_prefix(keys).await,
            }
        })
    }

    fn get<'a>(
        &'a self,
        key: ChunkKey,
        bufs: &'a dyn BufferSource,
    ) -> TierFuture<'a, Option<Chunk>> {
        let fault = self.pick(FaultOp::Get, Some(&key));
        Box::pin(async move {
            match fault {
                Some(Fault::Fail) => Err(self.injected("get")),
                Some(Fault::Drop) => Ok(None),
                Some(Fault::Stall(d)) => {
                    tokio::time::sleep(d).await;
                    self.inner.get(key, bufs).await
                }
                Some(Fault::Corrupt) => {
                    let Some(c) = self.inner.get(key, bufs).await? else {
                        return Ok(None);
                    };
                    let Some(mut copy) = bufs.allocate(c.buf.len()) else {
                        return Ok(None);
                    };
                    copy.as_mut_slice().copy_from_slice(c.payload());
                    if let Some(b) = copy.as_mut_slice().get_mut(c.buf.len() / 2) {
                        *b ^= 0x5A;
                    }
                    Ok(Some(Chunk {
                        info: c.info.clone(),
                        buf: copy.seal(),
                    }))
                }
                None => self.inner.get(key, bufs).await,
            }
        })
    }

    fn put(&self, chunk: Chunk) -> TierFuture<'_, PutOutcome> {
        let fault = self.pick(FaultOp::Put, Some(&chunk.info.key));
        Box::pin(async move {
            match fault {
                Some(Fault::Fail) => Err(self.injected("put")),
                Some(Fault::Drop) => Ok(PutOutcome::Stored),
                Some(Fault::Stall(d)) => {
                    tokio::time::sleep(d).await;
                    self.inner.put(chunk).await
                }
                Some(Fault::Corrupt) | None => self.inner.put(chunk).await,
            }
        })
    }

    fn remove(&self, key: ChunkKey) -> TierFuture<'_, bool> {
        self.inner.remove(key)
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
        self.inner.details()
    }
}
