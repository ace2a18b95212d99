use std::collections::{HashMap, HashSet};

use proptest::prelude::*;

use super::*;
use crate::policy::{Eviction, Lru, PolicyKind, PromptReport};

fn k(i: u32) -> ChunkKey {
    let mut b = [0u8; 32];
    b[..4].copy_from_slice(&i.to_le_bytes());
    b[31] = 0x5A;
    ChunkKey(b)
}

/// A prompt: keys `base..base + n`, each extending the previous one's prefix.
fn chain(base: u32, n: u32) -> Vec<ChunkKey> {
    (base..base + n).map(k).collect()
}

/// What the engine does per request: report the prompt, then insert its missing keys in
/// order, evicting to stay within `cap` keys. Returns the keys evicted.
fn store(
    p: &mut dyn EvictionPolicy,
    resident: &mut HashSet<ChunkKey>,
    cap: usize,
    keys: &[ChunkKey],
) -> Vec<ChunkKey> {
    p.observe_prompt(keys, PromptReport::Store);
    let mut out = Vec::new();
    for (j, key) in keys.iter().enumerate() {
        if resident.contains(key) {
            continue;
        }
        while resident.len() >= cap {
            let v = p.evict(&mut |_| true).expect("something is evictable");
            assert!(resident.remove(&v), "evicted a key that was not resident");
            out.push(v);
        }
        if j > 0 && !resident.contains(&keys[j - 1]) {
            break; // its predecessor just went: the rest would be worthless
        }
        p.insert(*key, 4096);
        resident.insert(*key);
    }
    out
}

/// Leading keys of `keys` resident.
fn hits(resident: &HashSet<ChunkKey>, keys: &[ChunkKey]) -> usize {
    keys.iter().take_while(|x| resident.contains(x)).count()
}

#[test]
fn eviction_takes_prompt_tails_first() {
    let mut p = PrefixLrfu::new();
    let mut res = HashSet::new();
    // Two prompts sharing key 0, then an older one-time prompt is pushed out tail first.
    let a: Vec<ChunkKey> = [0, 1, 2, 3].map(k).to_vec();
    let b: Vec<ChunkKey> = [0, 11, 12, 13].map(k).to_vec();
    store(&mut p, &mut res, 7, &a);
    store(&mut p, &mut res, 7, &b);
    let victims = store(&mut p, &mut res, 7, &chain(100, 3));
    assert_eq!(victims, vec![k(3), k(2), k(1)], "a's tail, from its end");
    // The shared key 0 outlives both of its branches (and the newer one-time prompt).
    let victims = store(&mut p, &mut res, 7, &chain(200, 4));
    assert_eq!(victims, vec![k(13), k(12), k(11), k(102)]);
    assert!(res.contains(&k(0)));
}

#[test]
fn a_reused_prompt_outlives_newer_one_time_prompts_where_lru_does_not() {
    // A conversation comes back every 30 requests; the cache holds ~12 prompts. LRU keeps
    // only the newest prompts and misses every turn; the policy sees the conversations
    // are reused and keeps them.
    let run = |p: &mut dyn EvictionPolicy| {
        let mut res = HashSet::new();
        let (mut hit, mut total) = (0, 0);
        let mut fresh = 1000;
        for r in 0..600u32 {
            let keys = if r % 3 == 0 {
                // Ten conversations of 8 chunks after a shared root 0, in turn.
                let c = (r / 3) % 10;
                std::iter::once(k(0))
                    .chain(chain(10 + c * 8, 8))
                    .collect::<Vec<_>>()
            } else {
                fresh += 8;
                std::iter::once(k(0)).chain(chain(fresh, 8)).collect()
            };
            if r >= 300 {
                hit += hits(&res, &keys);
                total += keys.len();
            }
            store(p, &mut res, 100, &keys);
        }
        hit as f64 / total as f64
    };
    let lrfu = run(&mut PrefixLrfu::new());
    let lru = run(&mut Lru::default());
    assert!(lru < 0.15, "LRU only keeps the shared root: {lru}");
    assert!(
        lrfu > 0.35,
        "the reused conversations stay resident: {lrfu} (LRU {lru})"
    );
}

#[test]
fn out_of_order_inserts_are_linked_when_their_parent_comes() {
    let mut p = PrefixLrfu::new();
    let keys = chain(0, 4);
    p.observe_prompt(&keys, PromptReport::Lookup);
    // Out of order (as concurrent disk writes finish): 2 and 3 before 0 and 1. 2 has no
    // resident predecessor yet; it still ranks by its score (its head may be in L1).
    p.insert(k(2), 1);
    p.insert(k(3), 1);
    p.insert(k(0), 1);
    p.insert(k(1), 1); // takes 2 as its successor: the chain is whole
    p.observe_prompt(&chain(50, 1), PromptReport::Lookup);
    p.insert(k(50), 1); // newer: worth more than the chain
    let order: Vec<ChunkKey> = std::iter::from_fn(|| p.evict(&mut |_| true)).collect();
    assert_eq!(order, vec![k(3), k(2), k(1), k(0), k(50)], "tail first");
    assert!(p.is_empty());
}

#[test]
fn a_removed_head_leaves_its_tail_to_go_by_score() {
    let mut p = PrefixLrfu::new();
    let mut res = HashSet::new();
    let hot = chain(0, 3);
    for _ in 0..5 {
        store(&mut p, &mut res, 16, &hot);
    }
    store(&mut p, &mut res, 16, &chain(50, 2));
    p.remove(&k(0));
    assert_eq!(p.len(), 4);
    // 1 and 2 are still linked: 2 (hot) stays ahead of the fresh prompt's keys.
    assert_eq!(p.evict(&mut |_| true), Some(k(51)));
    assert_eq!(p.evict(&mut |_| true), Some(k(50)));
    assert_eq!(p.evict(&mut |_| true), Some(k(2)));
    assert_eq!(p.evict(&mut |_| true), Some(k(1)));
}

#[test]
fn held_leaves_make_it_fall_back_to_their_prefix() {
    let mut p = PrefixLrfu::new();
    let mut res = HashSet::new();
    store(&mut p, &mut res, 16, &chain(0, 3));
    // The only leaf (2) is pinned: the deepest other key goes, cutting off only 2.
    assert_eq!(p.evict(&mut |x| *x != k(2)), Some(k(1)));
    // Then 2 and 0 are leaves of equal score: the later inserted (2) goes first.
    assert_eq!(p.evict(&mut |_| true), Some(k(2)));
    assert_eq!(p.evict(&mut |_| false), None);
    assert_eq!(p.len(), 1);
}

#[test]
fn history_of_ghosts_is_bounded() {
    let mut p = PrefixLrfu::new();
    let mut res = HashSet::new();
    for r in 0..40_000u32 {
        store(&mut p, &mut res, 64, &chain(r * 4, 4));
    }
    // 160k one-time keys went through a 64-key tier: only ~3 half-lives are remembered.
    let bound = (GHOST_HALF_LIVES * MIN_HALF_LIFE) as usize + 64 + 16;
    assert!(
        p.entries.len() <= bound,
        "{} entries remembered (bound {bound})",
        p.entries.len()
    );
    assert!(p.history.len() <= 2 * bound);
}

#[test]
fn without_prompt_reports_touches_count_as_references() {
    let mut p = PrefixLrfu::new();
    for i in 0..4 {
        p.insert(k(i), 1);
    }
    for _ in 0..3 {
        p.touch(&k(0));
    }
    p.touch(&k(2));
    assert_eq!(p.evict(&mut |_| true), Some(k(1)));
    assert_eq!(p.evict(&mut |_| true), Some(k(3)));
    assert_eq!(p.evict(&mut |_| true), Some(k(2)));
    assert_eq!(p.evict(&mut |_| true), Some(k(0)));
}

#[test]
fn a_request_looked_up_then_stored_counts_once() {
    let state = |reports: &[(usize, PromptReport)]| {
        let mut p = PrefixLrfu::new();
        let keys = chain(0, 4);
        for &(n, r) in reports {
            p.observe_prompt(&keys[..n], r);
        }
        p.insert(k(0), 1);
        (p.entries[&k(0)].score, p.now)
    };
    use PromptReport::{Lookup, Store};
    // Lookup, then the store of its full chunks (a prefix), in pieces: one reference.
    assert_eq!(
        state(&[(4, Lookup), (2, Store), (4, Store)]),
        state(&[(4, Lookup)])
    );
    // Two lookups are two requests; so are two stores without a lookup.
    assert_eq!(state(&[(4, Lookup), (4, Lookup)]).1, 8.0);
    assert_eq!(state(&[(4, Store), (4, Store)]).1, 8.0);
    // A store long after the lookup is another request.
    let mut p = PrefixLrfu::new();
    p.observe_prompt(&chain(0, 4), Lookup);
    for i in 0..STORE_AFTER_LOOKUP as u32 {
        p.observe_prompt(&chain(100 + 10 * i, 1), Lookup);
    }
    p.observe_prompt(&chain(0, 4), Store);
    assert_eq!(p.now, 8.0 + STORE_AFTER_LOOKUP as f64);
}

#[test]
fn a_store_is_declined_rather_than_push_out_more_valuable_chunks() {
    let mut p = PrefixLrfu::new();
    let mut res = HashSet::new();
    let hot = chain(0, 3);
    for _ in 0..3 {
        store(&mut p, &mut res, 3, &hot);
    }
    // A one-time prompt is worth less than the reused one: it is not cached.
    p.observe_prompt(&chain(10, 2), PromptReport::Store);
    assert_eq!(p.evict_for(&k(10), &mut |_| true), Eviction::Declined);
    assert_eq!(p.len(), 3, "nothing was evicted");
    // A key the policy never heard of is admitted (no grounds to refuse it).
    assert_eq!(p.evict_for(&k(99), &mut |_| true), Eviction::Victim(k(2)));
    // A prompt reused as often, more recently, is worth more: it gets in (1, the hot
    // prompt's tail now, goes).
    for _ in 0..3 {
        p.observe_prompt(&chain(20, 2), PromptReport::Store);
    }
    assert_eq!(p.evict_for(&k(20), &mut |_| true), Eviction::Victim(k(1)));
    assert_eq!(p.evict_for(&k(10), &mut |_| false), Eviction::Nothing);
}

#[test]
fn kind_parses_and_prints() {
    for s in ["prefix-lrfu", "PREFIX_LRFU", "prefixlrfu"] {
        assert_eq!(s.parse::<PolicyKind>().unwrap(), PolicyKind::PrefixLrfu);
    }
    assert_eq!(PolicyKind::PrefixLrfu.to_string(), "prefix-lrfu");
    assert_eq!(PolicyKind::PrefixLrfu.build(1 << 20).name(), "prefix-lrfu");
}

// ---- model-based property test --------------------------------------------------------

/// Keys 0..16 form a binary tree: the parent of `i > 0` is `(i - 1) / 2`.
fn tree_parent(i: u32) -> Option<u32> {
    (i > 0).then(|| (i - 1) / 2)
}

fn tree_prompt(i: u32) -> Vec<ChunkKey> {
    let mut path = vec![i];
    while let Some(p) = tree_parent(*path.last().unwrap()) {
        path.push(p);
    }
    path.iter().rev().map(|&x| k(x)).collect()
}

/// The policy's rules written the slow, obvious way: O(n) scans, no indexes.
#[derive(Default)]
struct Model {
    score: HashMap<ChunkKey, f64>,
    last: HashMap<ChunkKey, f64>,
    parent: HashMap<ChunkKey, ChunkKey>,
    seq: HashMap<ChunkKey, u64>,
    now: f64,
    observed: bool,
    next_seq: u64,
    reports: u64,
    last_lookup: HashMap<ChunkKey, u64>,
}

impl Model {
    fn h(&self) -> f64 {
        (self.seq.len() as f64 * 1.5).max(MIN_HALF_LIFE)
    }
    fn reference(&mut self, key: ChunkKey) {
        let (t, h) = (self.now, self.h());
        if self.last.get(&key).is_some_and(|&l| l >= t) {
            return;
        }
        let s = match self.score.get(&key) {
            None => t,
            Some(&s) => add_reference(s, t, h),
        };
        self.score.insert(key, s);
        self.last.insert(key, t);
    }
    fn observe(&mut self, keys: &[ChunkKey], lookup: bool) {
        self.observed = true;
        self.reports += 1;
        let n = self.reports;
        let last = keys.last().unwrap();
        if !lookup
            && self
                .last_lookup
                .get(last)
                .is_some_and(|&r| n - r <= STORE_AFTER_LOOKUP)
        {
            return;
        }
        if lookup {
            for k in keys {
                self.last_lookup.insert(*k, n);
            }
        }
        self.now += keys.len() as f64;
        let mut parent = None;
        for &key in keys {
            self.reference(key);
            if let Some(p) = parent {
                self.parent.entry(key).or_insert(p);
            }
            parent = Some(key);
        }
    }
    fn insert(&mut self, key: ChunkKey) {
        if self.seq.contains_key(&key) {
            return;
        }
        if !self.observed || !self.score.contains_key(&key) {
            self.now += 1.0;
            self.reference(key);
        }
        self.next_seq += 1;
        self.seq.insert(key, self.next_seq);
    }
    fn touch(&mut self, key: ChunkKey) {
        if !self.observed && self.seq.contains_key(&key) {
            self.now += 1.0;
            self.reference(key);
        }
    }
    fn remove(&mut self, key: ChunkKey) {
        self.seq.remove(&key);
    }
    fn evict_for(&mut self, incoming: ChunkKey, evictable: impl Fn(&ChunkKey) -> bool) -> Eviction {
        let Some(v) = self.pick(&evictable) else {
            return Eviction::Nothing;
        };
        if let (Some(a), Some(b)) = (self.score.get(&v), self.score.get(&incoming)) {
            if a > b {
                return Eviction::Declined;
            }
        }
        self.seq.remove(&v);
        Eviction::Victim(v)
    }
    fn evict(&mut self, evictable: impl Fn(&ChunkKey) -> bool) -> Option<ChunkKey> {
        let v = self.pick(&evictable)?;
        self.seq.remove(&v);
        Some(v)
    }
    fn pick(&self, evictable: &impl Fn(&ChunkKey) -> bool) -> Option<ChunkKey> {
        let resident = |x: &ChunkKey| self.seq.contains_key(x);
        let leaf = |x: &ChunkKey| {
            !self
                .seq
                .keys()
                .any(|c| self.parent.get(c) == Some(x) && resident(c))
        };
        let score = |x: &ChunkKey| Score(self.score[x]);
        let candidates = self
            .seq
            .keys()
            .filter(|x| evictable(x))
            .filter(|x| leaf(x))
            .map(|x| (score(x), std::cmp::Reverse(self.seq[x]), *x))
            .min()
            .map(|r| r.2);
        let v = candidates.or_else(|| {
            self.seq
                .keys()
                .filter(|x| evictable(x))
                .map(|x| (score(x), std::cmp::Reverse(self.seq[x]), *x))
                .min()
                .map(|r| r.2)
        })?;
        Some(v)
    }
}

#[derive(Clone, Debug)]
enum Op {
    Observe(u32, bool),
    Insert(u32),
    Touch(u32),
    Remove(u32),
    Evict(u16),
    EvictFor(u32, u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u32..16, any::<bool>()).prop_map(|(i, l)| Op::Observe(i, l)),
        4 => (0u32..16).prop_map(Op::Insert),
        1 => (0u32..16).prop_map(Op::Touch),
        1 => (0u32..16).prop_map(Op::Remove),
        2 => any::<u16>().prop_map(Op::Evict),
        2 => (0u32..16, any::<u16>()).prop_map(|(i, m)| Op::EvictFor(i, m)),
    ]
}

proptest! {
    #[test]
    fn matches_the_model(ops in proptest::collection::vec(op(), 1..250)) {
        let mut p = PrefixLrfu::new();
        let mut m = Model::default();
        for op in ops {
            match op {
                Op::Observe(i, lookup) => {
                    let keys = tree_prompt(i);
                    let r = if lookup { PromptReport::Lookup } else { PromptReport::Store };
                    p.observe_prompt(&keys, r);
                    m.observe(&keys, lookup);
                }
                Op::Insert(i) => { p.insert(k(i), 1); m.insert(k(i)); }
                Op::Touch(i) => { p.touch(&k(i)); m.touch(k(i)); }
                Op::Remove(i) => { p.remove(&k(i)); m.remove(k(i)); }
                Op::Evict(pinned) => {
                    // Keys whose bit is set in `pinned` are held.
                    let free = |x: &ChunkKey| pinned & (1 << (x.0[0] % 16)) == 0;
                    let got = p.evict(&mut |x| free(x));
                    let want = m.evict(free);
                    prop_assert_eq!(got, want);
                }
                Op::EvictFor(i, pinned) => {
                    let free = |x: &ChunkKey| pinned & (1 << (x.0[0] % 16)) == 0;
                    let got = p.evict_for(&k(i), &mut |x| free(x));
                    let want = m.evict_for(k(i), free);
                    prop_assert_eq!(got, want);
                }
            }
            prop_assert_eq!(p.len(), m.seq.len());
        }
    }

    #[test]
    fn without_holds_the_resident_set_stays_prefix_closed(
        prompts in proptest::collection::vec(0u32..64, 1..200),
        cap in 4usize..24,
    ) {
        // Prompts are paths in a tree of 64 keys; the engine stores each (report, then
        // insert the missing keys in order). Nothing is held, so no key ever loses its
        // predecessor: every resident key's parent is resident.
        let parent = |i: u32| (i > 0).then(|| (i - 1) / 3);
        let prompt = |i: u32| {
            let mut path = vec![i];
            while let Some(p) = parent(*path.last().unwrap()) { path.push(p); }
            path.iter().rev().map(|&x| k(x)).collect::<Vec<_>>()
        };
        let mut p = PrefixLrfu::new();
        let mut res = HashSet::new();
        for i in prompts {
            let keys = prompt(i);
            let keys = &keys[..keys.len().min(cap)];
            store(&mut p, &mut res, cap, keys);
            prop_assert!(res.len() <= cap);
            for x in &res {
                let i = u32::from_le_bytes(x.0[..4].try_into().unwrap());
                if let Some(pp) = parent(i) {
                    prop_assert!(res.contains(&k(pp)), "{i} is resident without {pp}");
                }
            }
        }
    }
}
