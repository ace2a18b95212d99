//! Eviction policies shared by every tier that evicts (the CPU tier and the disk tier).
//!
//! A policy only orders keys; the tier decides what is evictable (not pinned, not in use)
//! and passes that predicate in, so a policy can never pick a chunk somebody holds.

mod lru;
mod prefix_lrfu;
mod s3fifo;

use std::fmt;
use std::str::FromStr;

pub use lru::Lru;
pub use prefix_lrfu::{PrefixLrfu, MIN_HALF_LIFE, STORE_AFTER_LOOKUP};
pub use s3fifo::S3Fifo;

use crate::error::Error;
use crate::keys::ChunkKey;

/// Orders resident keys for eviction.
pub trait EvictionPolicy: Send {
    /// Policy name for stats and logs.
    fn name(&self) -> &'static str;
    /// A request referenced these chunk keys of one prompt, in order (key `i` extends the
    /// prefix of key `i - 1`), whether resident or not; reported on lookup and again on
    /// store (before the prompt's new chunks are inserted). Policies that learn from the
    /// request stream (frequency, prefix links) use it; by default it is ignored.
    fn observe_prompt(&mut self, _keys: &[ChunkKey], _report: PromptReport) {}
    /// A key became resident with `size` bytes.
    fn insert(&mut self, key: ChunkKey, size: u64);
    /// A resident key was used.
    fn touch(&mut self, key: &ChunkKey);
    /// A key left the tier for a reason other than eviction (explicit remove, clear).
    fn remove(&mut self, key: &ChunkKey);
    /// Picks the next victim among keys for which `evictable` is true, forgets it and
    /// returns it; the tier must then drop it. `None` when nothing is evictable.
    fn evict(&mut self, evictable: &mut dyn FnMut(&ChunkKey) -> bool) -> Option<ChunkKey>;
    /// Like [`evict`](Self::evict), to make room for `incoming`, a key about to be stored:
    /// a policy may decline when every candidate is worth more than `incoming` (which is
    /// then not cached). By default it never declines.
    fn evict_for(
        &mut self,
        _incoming: &ChunkKey,
        evictable: &mut dyn FnMut(&ChunkKey) -> bool,
    ) -> Eviction {
        match self.evict(evictable) {
            Some(k) => Eviction::Victim(k),
            None => Eviction::Nothing,
        }
    }
    /// Resident keys tracked.
    fn len(&self) -> usize;
    /// Whether no key is tracked.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What [`EvictionPolicy::evict_for`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Eviction {
    /// Evict this key (the policy has forgotten it).
    Victim(ChunkKey),
    /// Every candidate is worth more than the incoming key: keep them, do not cache it.
    Declined,
    /// Nothing is evictable.
    Nothing,
}

/// Which engine call reports a prompt to [`EvictionPolicy::observe_prompt`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromptReport {
    /// A lookup: a request arrived (a serving engine looks each request up once).
    Lookup,
    /// A store: the request that looked the prompt up, or one that never did.
    Store,
}

/// Which policy to build.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKind {
    /// Least recently used (default).
    #[default]
    Lru,
    /// S3-FIFO: scan-resistant (one-hit wonders leave through a small probationary queue).
    S3Fifo,
    /// Prefix-aware LRFU: frequency with exponential aging, prompt tails evicted first.
    #[serde(rename = "prefix-lrfu")]
    PrefixLrfu,
}

impl PolicyKind {
    /// Every kind, for listings and tests.
    pub const ALL: [PolicyKind; 3] = [PolicyKind::Lru, PolicyKind::S3Fifo, PolicyKind::PrefixLrfu];

    /// Builds the policy for a tier of `capacity` bytes.
    pub fn build(self, capacity: u64) -> Box<dyn EvictionPolicy> {
        match self {
            PolicyKind::Lru => Box::new(Lru::default()),
            PolicyKind::S3Fifo => Box::new(S3Fifo::new(capacity)),
            PolicyKind::PrefixLrfu => Box::new(PrefixLrfu::new()),
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PolicyKind::Lru => "lru",
            PolicyKind::S3Fifo => "s3fifo",
            PolicyKind::PrefixLrfu => "prefix-lrfu",
        })
    }
}

impl FromStr for PolicyKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s
            .trim()
            .to_ascii_lowercase()
            .replace(['-', '_'], "")
            .as_str()
        {
            "lru" => Ok(PolicyKind::Lru),
            "s3fifo" => Ok(PolicyKind::S3Fifo),
            "prefixlrfu" => Ok(PolicyKind::PrefixLrfu),
            _ => Err(Error::invalid(format!(
                "unknown cache policy `{s}`; allowed: lru, s3fifo, prefix-lrfu"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn k(i: u8) -> ChunkKey {
        ChunkKey([i; 32])
    }

    #[test]
    fn lru_evicts_least_recent_and_skips_non_evictable() {
        let mut p = PolicyKind::Lru.build(100);
        for i in 0..4 {
            p.insert(k(i), 10);
        }
        p.touch(&k(0));
        // order now 1,2,3,0; 1 is pinned.
        assert_eq!(p.evict(&mut |x| *x != k(1)), Some(k(2)));
        assert_eq!(p.evict(&mut |_| true), Some(k(1)));
        assert_eq!(p.len(), 2);
        assert_eq!(p.evict(&mut |_| false), None);
        assert_eq!(p.len(), 2, "a refused selection changes nothing");
    }

    #[test]
    fn s3fifo_resists_a_scan() {
        // A hot working set touched repeatedly survives a long scan of one-hit keys.
        let mut p = PolicyKind::S3Fifo.build(100 * 10);
        let mut resident: HashSet<ChunkKey> = HashSet::new();
        let admit =
            |p: &mut Box<dyn EvictionPolicy>, resident: &mut HashSet<ChunkKey>, key: ChunkKey| {
                while resident.len() >= 100 {
                    let v = p.evict(&mut |_| true).unwrap();
                    resident.remove(&v);
                }
                p.insert(key, 10);
                resident.insert(key);
            };
        let hot: Vec<ChunkKey> = (0..50u8).map(k).collect();
        for &h in &hot {
            admit(&mut p, &mut resident, h);
        }
        for round in 0..3 {
            for &h in &hot {
                p.touch(&h);
            }
            for i in 0..200u32 {
                let mut b = [0u8; 32];
                b[..4].copy_from_slice(&(i + round * 1000 + 1000).to_le_bytes());
                b[31] = 1;
                admit(&mut p, &mut resident, ChunkKey(b));
            }
        }
        let survived = hot.iter().filter(|h| resident.contains(h)).count();
        assert!(
            survived >= 45,
            "only {survived} of 50 hot keys survived the scan"
        );
    }

    proptest! {
        #[test]
        fn policies_never_return_non_evictable_or_unknown_keys(
            kind in proptest::sample::select(PolicyKind::ALL.to_vec()),
            ops in proptest::collection::vec((0u8..4, 0u8..16), 1..300),
        ) {
            let mut p = kind.build(16 * 8);
            let mut resident: HashSet<ChunkKey> = HashSet::new();
            let pinned = |x: &ChunkKey| x.0[0] % 5 == 0;
            for (op, i) in ops {
                let key = k(i);
                match op {
                    0 => if resident.insert(key) { p.insert(key, 8) },
                    1 => if resident.contains(&key) { p.touch(&key) },
                    2 => if resident.remove(&key) { p.remove(&key) },
                    _ => {
                        if let Some(v) = p.evict(&mut |x| !pinned(x)) {
                            prop_assert!(!pinned(&v));
                            prop_assert!(resident.remove(&v), "evicted a key that was not resident");
                        } else {
                            prop_assert!(resident.iter().all(pinned));
                        }
                    }
                }
                prop_assert_eq!(p.len(), resident.len());
            }
        }
    }
}
