//! Offline cache simulations of a trace, counting prefix hits only (a block hits when it
//! and every block before it in the prompt are cached):
//!
//! - any kvtier policy, through the same `EvictionPolicy` calls the engine's L1 makes when
//!   it is the only tier (hits touched last-to-first, the prompt reported, missing blocks
//!   allocated in order and then inserted; a store stops where nothing is evictable or the
//!   policy declines);
//! - a kvtier policy given a perfect reuse predictor: a block the trace never references
//!   again is not stored (the policy still decides everything else). No online policy
//!   knows this; the column says how much of the gap to OPT predicting reuse is worth;
//! - prefix-aware Belady-OPT: on a miss, evict the cached block whose next use is farthest
//!   away (the deeper one on a tie, so a prompt's tail goes before its head), or skip
//!   the incoming block when it is the farthest itself.

use std::collections::BTreeSet;

use kvtier::keys::ChunkKey;
use kvtier::policy::{Eviction, PolicyKind, PromptReport};

use super::format::Trace;

/// Hits counted by a simulation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Outcome {
    /// Blocks that hit.
    pub hits: u64,
    /// Blocks referenced.
    pub references: u64,
}

impl Outcome {
    /// Hits / references (0 for no reference).
    pub fn rate(&self) -> f64 {
        if self.references == 0 {
            0.0
        } else {
            self.hits as f64 / self.references as f64
        }
    }
}

/// A chunk key standing for block `b` (spread over the key space like a real hash, so
/// kvtier's pass-through key hasher sees uniform keys).
pub fn block_key(b: u32) -> ChunkKey {
    let mut z = u64::from(b).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&z.to_le_bytes());
    k[8..12].copy_from_slice(&b.to_le_bytes());
    ChunkKey(k)
}

/// Blocks of request `r` that can be cached: its full blocks, or all with `unfull`.
fn cacheable(trace: &Trace, r: usize, unfull: bool) -> usize {
    let req = &trace.requests[r];
    if unfull {
        req.blocks.len()
    } else {
        req.full_blocks(trace.block_tokens)
    }
}

/// Replays `trace` through a cache of `capacity` blocks ordered by `kind`.
pub fn simulate(trace: &Trace, capacity: usize, kind: PolicyKind, unfull: bool) -> Outcome {
    run_policy(trace, capacity, kind, unfull, None)
}

/// Like [`simulate`], with a perfect reuse predictor: a block is stored only when a later
/// request references it again.
pub fn simulate_with_reuse_oracle(
    trace: &Trace,
    capacity: usize,
    kind: PolicyKind,
    unfull: bool,
) -> Outcome {
    // Last request referencing each block: a block is reused after request `i` exactly
    // when its last reference comes later.
    let mut last = vec![0u32; trace.unique_blocks];
    for (i, req) in trace.requests.iter().enumerate() {
        for &b in &req.blocks {
            last[b as usize] = i as u32;
        }
    }
    run_policy(trace, capacity, kind, unfull, Some(&last))
}

/// [`simulate`]'s loop; with `last_use`, a block not referenced after the current request
/// is not stored, and neither is anything after it in the prompt (chained blocks: nothing
/// extending a prefix that never comes back can come back).
fn run_policy(
    trace: &Trace,
    capacity: usize,
    kind: PolicyKind,
    unfull: bool,
    last_use: Option<&[u32]>,
) -> Outcome {
    let mut policy = kind.build(capacity as u64 * 4096);
    let mut resident = vec![false; trace.unique_blocks];
    let mut count = 0usize;
    let mut out = Outcome::default();
    let mut keys = Vec::new();
    for (i, req) in trace.requests.iter().enumerate() {
        let n = cacheable(trace, i, unfull);
        let hit = req.blocks[..n]
            .iter()
            .take_while(|&&b| resident[b as usize])
            .count();
        out.hits += hit as u64;
        out.references += req.blocks.len() as u64;
        for &b in req.blocks[..hit].iter().rev() {
            policy.touch(&block_key(b));
        }
        keys.clear();
        keys.extend(req.blocks[..n].iter().map(|&b| block_key(b)));
        policy.observe_prompt(&keys, PromptReport::Lookup);
        // Allocate room for every missing block first (they are not evictable until
        // inserted), then insert them, as a store does.
        let mut new = Vec::new();
        'alloc: for &b in &req.blocks[..n] {
            if resident[b as usize] {
                continue;
            }
            if last_use.is_some_and(|l| l[b as usize] as usize <= i) {
                break;
            }
            while count + new.len() >= capacity {
                // As the engine's L1 when it is the only tier: the policy may decline.
                match policy.evict_for(&block_key(b), &mut |_| true) {
                    Eviction::Victim(v) => {
                        let v = u32::from_le_bytes(v.0[8..12].try_into().unwrap_or_default());
                        resident[v as usize] = false;
                        count -= 1;
                    }
                    Eviction::Declined | Eviction::Nothing => break 'alloc,
                }
            }
            new.push(b);
        }
        for b in new {
            policy.insert(block_key(b), 4096);
            resident[b as usize] = true;
            count += 1;
        }
    }
    out
}

/// Prefix-aware Belady-OPT with a cache of `capacity` blocks.
pub fn belady(trace: &Trace, capacity: usize, unfull: bool) -> Outcome {
    const NEVER: u32 = u32::MAX;
    // Next request using each (request, position)'s block.
    let mut last = vec![NEVER; trace.unique_blocks];
    let mut next: Vec<Vec<u32>> = vec![Vec::new(); trace.requests.len()];
    for (t, req) in trace.requests.iter().enumerate().rev() {
        next[t] = req
            .blocks
            .iter()
            .map(|&b| std::mem::replace(&mut last[b as usize], t as u32))
            .collect();
    }
    // Cached blocks by (next use, depth): the last one is the victim.
    let mut cached: BTreeSet<(u32, u32, u32)> = BTreeSet::new();
    let mut at: Vec<Option<(u32, u32)>> = vec![None; trace.unique_blocks];
    let mut out = Outcome::default();
    for (t, req) in trace.requests.iter().enumerate() {
        let n = cacheable(trace, t, unfull);
        out.hits += req.blocks[..n]
            .iter()
            .take_while(|&&b| at[b as usize].is_some())
            .count() as u64;
        out.references += req.blocks.len() as u64;
        for (j, &b) in req.blocks.iter().enumerate() {
            let rank = (next[t][j], j as u32);
            if let Some((u, d)) = at[b as usize].take() {
                cached.remove(&(u, d, b));
            } else if j >= n || rank.0 == NEVER || capacity == 0 {
                continue;
            }
            if cached.len() >= capacity {
                match cached.last().copied() {
                    Some((u, d, v)) if (u, d) > rank => {
                        cached.remove(&(u, d, v));
                        at[v as usize] = None;
                    }
                    _ => continue, // the incoming block is the farthest: skip it
                }
            }
            cached.insert((rank.0, rank.1, b));
            at[b as usize] = Some(rank);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::format::{Trace, TraceFormat};
    use super::*;

    fn trace(text: &str) -> Trace {
        Trace::parse(text, TraceFormat::Simple, 16).unwrap()
    }

    #[test]
    fn lru_and_opt_on_a_hand_checked_trace() {
        // Two prompts alternate; a cache of 3 blocks holds one prompt and a bit.
        let t = trace("0 a b c\n1 x y z\n2 a b c\n3 x y z\n4 a b c\n");
        // LRU: each prompt was evicted by the other: only misses.
        let lru = simulate(&t, 3, PolicyKind::Lru, false);
        assert_eq!((lru.hits, lru.references), (0, 15));
        // OPT keeps `a b c` (used again at request 2, before `x y z` at 3) and skips
        // `x y z`, then hits 3 blocks at requests 2 and 4.
        assert_eq!(belady(&t, 3, false).hits, 6);
        // With room for both prompts, both hit every time after the first.
        assert_eq!(simulate(&t, 6, PolicyKind::Lru, false).hits, 9);
        assert_eq!(belady(&t, 6, false).hits, 9);
    }

    #[test]
    fn only_prefix_hits_count_and_partial_blocks_are_not_cached() {
        // `b` after `a` is cached, but the second prompt starts with another block.
        let t = trace("0 a b +3\n1 z a b\n2 a b +3\n");
        let lru = simulate(&t, 10, PolicyKind::Lru, false);
        // Request 2 hits a, b; its partial block was never cached.
        assert_eq!((lru.hits, lru.references), (2, 9));
        assert_eq!(belady(&t, 10, false).hits, 2);
        // Caching partial blocks too (save_unfull_chunk) makes the tail hit.
        assert_eq!(simulate(&t, 10, PolicyKind::Lru, true).hits, 3);
        assert_eq!(belady(&t, 10, true).hits, 3);
    }

    #[test]
    fn the_reuse_oracle_stores_only_blocks_that_come_back() {
        // A one-time prompt between two uses of `a b c`: LRU lets it push `a b c` out; with
        // the oracle it is not stored, and `a b c` hits.
        let t = trace("0 a b c\n1 x y z\n2 a b c\n");
        assert_eq!(simulate(&t, 3, PolicyKind::Lru, false).hits, 0);
        let o = simulate_with_reuse_oracle(&t, 3, PolicyKind::Lru, false);
        assert_eq!((o.hits, o.references), (3, 9));
        // The branch `d` never comes back: not stored, so `c` stays (LRU would evict it).
        let t = trace("0 a b c\n1 a b d\n2 a b c\n");
        assert_eq!(simulate(&t, 3, PolicyKind::Lru, false).hits, 2 + 2);
        assert_eq!(
            simulate_with_reuse_oracle(&t, 3, PolicyKind::Lru, false).hits,
            2 + 3
        );
    }

    #[test]
    fn opt_is_an_upper_bound_for_every_policy() {
        // A generated conversation-like trace: reused prefixes, one-time prompts.
        let mut text = String::new();
        let mut rng = 12345u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for r in 0..400u64 {
            let conv = next() % 30;
            let turns = next() % 4 + 1;
            text.push_str(&format!("{r} sys"));
            for t in 0..turns * 3 {
                text.push_str(&format!(" c{conv}t{t}"));
            }
            text.push_str(&format!(" q{r}\n"));
        }
        let t = trace(&text);
        for cap in [5, 20, 60, 200] {
            let opt = belady(&t, cap, false);
            for kind in PolicyKind::ALL {
                let p = simulate(&t, cap, kind, false);
                assert!(p.hits <= opt.hits, "{kind} at {cap}: {p:?} > OPT {opt:?}");
                let o = simulate_with_reuse_oracle(&t, cap, kind, false);
                assert!(
                    o.hits <= opt.hits,
                    "{kind}+oracle at {cap}: {o:?} > OPT {opt:?}"
                );
            }
            assert!(opt.hits as f64 <= t.ceiling() * t.references() as f64 + 0.5);
        }
    }
}
