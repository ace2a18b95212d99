//! Prefix-aware LRFU: frequency with exponential aging, evicting prompt tails first.
//!
//! Replaying the Mooncake traces (`kvtier bench trace`, docs/benchmarks.md "Hit rate") showed
//! where LRU loses: a conversation comes back minutes after its previous turn, far beyond
//! the window an LRU cache of realistic size covers, so LRU keeps only the newest prompts
//! and almost never hits. What an online policy can tell apart is how often a prefix has
//! been used, and how recently:
//!
//! - **Score** (LRFU, Lee et al. 2001): each reference at time `t` weighs `2^(t/H)`; a key
//!   ranks by the sum over its references. One reference now outranks one reference a
//!   half-life `H` ago, but a key referenced twice within `H` outranks a fresh one. Scores
//!   are kept as the equivalent time of a single reference, `H·log2(Σ 2^(t_i/H))`, so they
//!   never overflow and stay comparable when `H` grows with the tier.
//! - **History**: references are counted for keys that are not resident too (ghosts, kept
//!   for `3·H`), so a prompt that comes back after being evicted is recognised as reused.
//! - **Prefix closure**: a chunk is worthless without its predecessors, so only *leaves*
//!   (resident keys with no resident successor) are candidates: a prompt's tail always goes
//!   before its head. A key whose predecessor is not in this tier is not taken for
//!   worthless, though: the disk tier often holds the tail of a prefix whose head is in L1
//!   (hits are not written down again), and lookups join the tiers. Giving such keys no
//!   value cost 4 points at 16k blocks with a disk tier.
//!
//! Time is counted in chunk references. The policy learns references and prefix links from
//! [`EvictionPolicy::observe_prompt`]; until it has seen a report, every insert and touch
//! is a reference instead, so it still works (as a plain LRFU) for callers that use keys
//! only. A serving engine looks each request up once, then stores it unless everything
//! hit: a lookup counts, and a store counts unless it is a prefix of a prompt looked up
//! in the last [`STORE_AFTER_LOOKUP`] reports (the same request). Chained keys make that
//! check one map lookup: a prompt is a prefix of another exactly when its last key is one
//! of the other's keys. Reads are not references once reports come: a request's hits are
//! in its lookup.

use std::cmp::Ordering;
use std::collections::{BTreeSet, VecDeque};

use super::{Eviction, EvictionPolicy, PromptReport};
use crate::keys::{ChunkKey, KeyMap};

/// Smallest half-life, in chunk references. Measured on both Mooncake traces: 20k (about
/// 800 conversation requests) is where the gains over LRU peak at 1k-4k chunks; a shorter
/// one forgets conversations before their next turn, a longer one lets old hot prefixes
/// squat.
pub const MIN_HALF_LIFE: f64 = 20_000.0;
/// The half-life is also at least this many times the resident chunk count, so a large
/// tier does not forget frequencies faster than it turns over.
const HALF_LIFE_PER_CHUNK: f64 = 1.5;
/// Ghosts (non-resident keys' scores) are forgotten this many half-lives after their last
/// reference; by then a new reference ranks them like a fresh key anyway.
const GHOST_HALF_LIVES: f64 = 3.0;
/// Hard bound on remembered references, whatever the half-life.
const MAX_HISTORY: usize = 1 << 20;
/// A store that is a prefix of a prompt looked up within this many reports is the store of
/// that request (lookups from other requests may come in between while it computes).
pub const STORE_AFTER_LOOKUP: u64 = 1024;

/// A score: equivalent reference time (higher = more valuable).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Score(f64);

impl Eq for Score {}

impl PartialOrd for Score {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Score {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// Adds a reference at `t` to `score` (both equivalent times) with half-life `h`.
fn add_reference(score: f64, t: f64, h: f64) -> f64 {
    let (hi, lo) = if score >= t { (score, t) } else { (t, score) };
    hi + h * (1.0 + ((lo - hi) / h).exp2()).log2()
}

/// Position of a leaf in the eviction order: by score, the latest inserted first among
/// equals (the deepest, when a prompt's chain was cut).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Rank {
    score: Score,
    seq: std::cmp::Reverse<u64>,
    key: ChunkKey,
}

#[derive(Debug)]
struct Resident {
    /// Resident successors linked to this key.
    children: Vec<ChunkKey>,
    /// Index of this key in its parent's `children`.
    slot: usize,
    /// The predecessor is known and not resident (an orphan, linked when it comes).
    orphan: bool,
    /// Insert sequence number.
    seq: u64,
    /// Its current place in `order`, if it is a candidate.
    rank: Option<Rank>,
}

#[derive(Debug)]
struct Entry {
    score: f64,
    last_ref: f64,
    /// The key whose prefix this key extends (from `observe_prompt`), if known.
    parent: Option<ChunkKey>,
    /// Number of the last lookup report that held this key (0: none).
    last_lookup: u64,
    res: Option<Resident>,
}

/// Prefix-aware LRFU policy (see the module docs).
#[derive(Debug, Default)]
pub struct PrefixLrfu {
    entries: KeyMap<Entry>,
    /// Eviction candidates: the leaves.
    order: BTreeSet<Rank>,
    /// References in time order, to forget ghosts.
    history: VecDeque<(f64, ChunkKey)>,
    /// Orphans by their missing parent, re-linked when it comes back.
    orphans: KeyMap<Vec<ChunkKey>>,
    /// Chunk references so far.
    now: f64,
    /// Whether `observe_prompt` has been called (then it alone counts references).
    observed: bool,
    /// Prompt reports so far.
    reports: u64,
    resident: usize,
    seq: u64,
}

impl PrefixLrfu {
    /// An empty policy.
    pub fn new() -> PrefixLrfu {
        PrefixLrfu::default()
    }

    fn half_life(&self) -> f64 {
        (self.resident as f64 * HALF_LIFE_PER_CHUNK).max(MIN_HALF_LIFE)
    }

    /// Counts a reference of `key` at the current time (once per time step).
    fn reference(&mut self, key: ChunkKey) {
        let (t, h) = (self.now, self.half_life());
        let e = self.entries.entry(key).or_insert(Entry {
            score: f64::NEG_INFINITY,
            last_ref: f64::NEG_INFINITY,
            parent: None,
            last_lookup: 0,
            res: None,
        });
        if e.last_ref >= t {
            return;
        }
        e.score = if e.score == f64::NEG_INFINITY {
            t
        } else {
            add_reference(e.score, t, h)
        };
        e.last_ref = t;
        self.history.push_back((t, key));
        self.rerank(&key);
    }

    /// Recomputes `key`'s place among the candidates (resident keys only).
    fn rerank(&mut self, key: &ChunkKey) {
        let Some(e) = self.entries.get_mut(key) else {
            return;
        };
        let score = Score(e.score);
        let Some(r) = e.res.as_mut() else { return };
        let new = r.children.is_empty().then_some(Rank {
            score,
            seq: std::cmp::Reverse(r.seq),
            key: *key,
        });
        if r.rank == new {
            return;
        }
        if let Some(old) = r.rank.take() {
            self.order.remove(&old);
        }
        if let Some(n) = new {
            self.order.insert(n);
        }
        r.rank = new;
    }

    /// Links resident `key` under its parent (or marks it an orphan when the parent is known
    /// and not resident).
    fn attach(&mut self, key: ChunkKey) {
        let Some(parent) = self.entries.get(&key).and_then(|e| e.parent) else {
            return;
        };
        let parent_resident = self.entries.get(&parent).is_some_and(|p| p.res.is_some());
        if parent_resident {
            let slot = match self.entries.get_mut(&parent).and_then(|p| p.res.as_mut()) {
                Some(pr) => {
                    pr.children.push(key);
                    pr.children.len() - 1
                }
                None => return,
            };
            if let Some(r) = self.entries.get_mut(&key).and_then(|e| e.res.as_mut()) {
                r.slot = slot;
                r.orphan = false;
            }
            self.rerank(&parent);
        } else {
            if let Some(r) = self.entries.get_mut(&key).and_then(|e| e.res.as_mut()) {
                r.orphan = true;
            }
            self.orphans.entry(parent).or_default().push(key);
        }
        self.rerank(&key);
    }

    /// Takes `key` out of the resident set (it stays as a ghost); its resident children
    /// become orphans.
    fn detach(&mut self, key: &ChunkKey) -> bool {
        let Some(e) = self.entries.get_mut(key) else {
            return false;
        };
        let Some(res) = e.res.take() else {
            return false;
        };
        let parent = e.parent;
        self.resident -= 1;
        if let Some(rank) = res.rank {
            self.order.remove(&rank);
        }
        if let Some(p) = parent {
            if res.orphan {
                if let Some(v) = self.orphans.get_mut(&p) {
                    v.retain(|k| k != key);
                    if v.is_empty() {
                        self.orphans.remove(&p);
                    }
                }
            } else if let Some(pr) = self.entries.get_mut(&p).and_then(|p| p.res.as_mut()) {
                if pr.children.get(res.slot) == Some(key) {
                    pr.children.swap_remove(res.slot);
                    if let Some(&moved) = pr.children.get(res.slot) {
                        if let Some(m) = self.entries.get_mut(&moved).and_then(|e| e.res.as_mut()) {
                            m.slot = res.slot;
                        }
                    }
                    self.rerank(&p);
                }
            }
        }
        for c in res.children {
            if let Some(r) = self.entries.get_mut(&c).and_then(|e| e.res.as_mut()) {
                r.orphan = true;
            }
            self.orphans.entry(*key).or_default().push(c);
            self.rerank(&c);
        }
        true
    }

    /// Forgets ghosts whose last reference left the history window.
    fn expire(&mut self) {
        let horizon = self.now - GHOST_HALF_LIVES * self.half_life();
        while let Some(&(t, k)) = self.history.front() {
            if t >= horizon && self.history.len() <= MAX_HISTORY {
                break;
            }
            self.history.pop_front();
            if self
                .entries
                .get(&k)
                .is_some_and(|e| e.res.is_none() && e.last_ref <= t)
            {
                self.entries.remove(&k);
            }
        }
    }
}

impl PrefixLrfu {
    /// The next victim among evictable keys: leaves by score; when every leaf is held, any
    /// resident key, lowest score first and, among equals, the latest inserted (the deepest
    /// of a prompt, which cuts the fewest successors off).
    fn pick(&self, evictable: &mut dyn FnMut(&ChunkKey) -> bool) -> Option<ChunkKey> {
        self.order
            .iter()
            .map(|r| r.key)
            .find(|k| evictable(k))
            .or_else(|| {
                self.entries
                    .iter()
                    .filter_map(|(k, e)| {
                        e.res
                            .as_ref()
                            .map(|r| (Score(e.score), std::cmp::Reverse(r.seq), *k))
                    })
                    .filter(|(_, _, k)| evictable(k))
                    .min()
                    .map(|(_, _, k)| k)
            })
    }

    /// Evicts `v`; its ghost expires a history window after now.
    fn take(&mut self, v: ChunkKey) {
        self.detach(&v);
        self.history.push_back((self.now, v));
    }
}

impl EvictionPolicy for PrefixLrfu {
    fn name(&self) -> &'static str {
        "prefix-lrfu"
    }

    fn observe_prompt(&mut self, keys: &[ChunkKey], report: PromptReport) {
        let Some(last) = keys.last() else { return };
        self.observed = true;
        self.reports += 1;
        let n = self.reports;
        let looked_up = |e: &Entry| e.last_lookup > 0 && n - e.last_lookup <= STORE_AFTER_LOOKUP;
        if report == PromptReport::Store && self.entries.get(last).is_some_and(looked_up) {
            return; // the store of a request its lookup counted
        }
        let lookup = report == PromptReport::Lookup;
        // A prompt is one request: all its keys are referenced at the same time.
        self.now += keys.len() as f64;
        let mut parent = None;
        for &k in keys {
            self.reference(k);
            if let Some(e) = self.entries.get_mut(&k) {
                if lookup {
                    e.last_lookup = n;
                }
                // A chained key has one parent; the first one learned stays.
                if e.parent.is_none() && parent.is_some() {
                    e.parent = parent;
                    if e.res.is_some() {
                        self.attach(k);
                    }
                }
            }
            parent = Some(k);
        }
        self.expire();
    }

    fn insert(&mut self, key: ChunkKey, _size: u64) {
        if self.entries.get(&key).is_some_and(|e| e.res.is_some()) {
            return;
        }
        if !self.observed || !self.entries.contains_key(&key) {
            // Without prompt reports, an insert is the reference (a miss).
            self.now += 1.0;
            self.reference(key);
        }
        self.seq += 1;
        self.resident += 1;
        if let Some(e) = self.entries.get_mut(&key) {
            e.res = Some(Resident {
                children: Vec::new(),
                slot: 0,
                orphan: false,
                seq: self.seq,
                rank: None,
            });
        }
        // Successors that arrived first (out-of-order writes) are linked under it now.
        if let Some(kids) = self.orphans.remove(&key) {
            for c in kids {
                if let Some(r) = self.entries.get_mut(&c).and_then(|e| e.res.as_mut()) {
                    r.orphan = false;
                }
                self.attach(c);
            }
        }
        self.attach(key);
        self.rerank(&key);
    }

    fn touch(&mut self, key: &ChunkKey) {
        // With prompt reports, a read is part of the request its prompt report counts.
        if !self.observed && self.entries.get(key).is_some_and(|e| e.res.is_some()) {
            self.now += 1.0;
            self.reference(*key);
        }
    }

    fn remove(&mut self, key: &ChunkKey) {
        // Like an eviction for the order; its history stays (a re-stored key is the same
        // prefix) and expires as usual.
        if self.detach(key) {
            self.history.push_back((self.now, *key));
        }
    }

    fn evict(&mut self, evictable: &mut dyn FnMut(&ChunkKey) -> bool) -> Option<ChunkKey> {
        self.expire();
        let v = self.pick(evictable)?;
        self.take(v);
        Some(v)
    }

    fn evict_for(
        &mut self,
        incoming: &ChunkKey,
        evictable: &mut dyn FnMut(&ChunkKey) -> bool,
    ) -> Eviction {
        self.expire();
        let Some(v) = self.pick(evictable) else {
            return Eviction::Nothing;
        };
        // Admission: a chunk worth less than the cheapest resident one is not cached. On
        // the conversation trace at 1k chunks this is 0.4 points: without it a one-time
        // prompt pushes out reused ones.
        let worth = |k: &ChunkKey| self.entries.get(k).map(|e| e.score);
        if let (Some(victim), Some(new)) = (worth(&v), worth(incoming)) {
            if victim > new {
                return Eviction::Declined;
            }
        }
        self.take(v);
        Eviction::Victim(v)
    }

    fn len(&self) -> usize {
        self.resident
    }
}

#[cfg(test)]
mod tests;
