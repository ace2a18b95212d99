use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::chunk::{checksum, ChunkInfo};
use crate::keys::{ModelIdentity, Origin};
use crate::layout::{Dtype, KvLayout};
use crate::memory::PAGE;
use crate::tier::residency::Mirror;

fn origin() -> Arc<Origin> {
    Arc::new(Origin {
        identity: Arc::new(ModelIdentity::new(
            "m",
            KvLayout::simple(1, 1, 8, Dtype::U8),
        )),
        cache_salt: None,
    })
}

fn key(i: u32) -> ChunkKey {
    let mut b = [0u8; 32];
    b[..4].copy_from_slice(&i.to_le_bytes());
    b[31] = 0xEE;
    ChunkKey(b)
}

fn tier(bytes: u64) -> CpuTier {
    let mut o = CpuTierOptions::with_bytes(bytes);
    o.pool.huge_pages = false;
    CpuTier::new(o).unwrap()
}

fn put(t: &CpuTier, i: u32, len: usize) -> PutOutcome {
    put_with(t, i, len, false)
}

/// `put`, through the store path (`allocate_for`) when `store` is set: the policy may
/// decline to make room.
fn put_with(t: &CpuTier, i: u32, len: usize, store: bool) -> PutOutcome {
    let b = if store {
        t.allocate_for(&key(i), len)
    } else {
        t.allocate(len)
    };
    let Some(mut b) = b else {
        return PutOutcome::Skipped("full");
    };
    b.as_mut_slice().fill(i as u8);
    let info = ChunkInfo {
        key: key(i),
        num_tokens: 1,
        len: len as u64,
        checksum: checksum(b.as_slice()),
        origin: origin(),
        created_ms: 0,
    };
    t.insert(Chunk {
        info,
        buf: b.seal(),
    })
}

#[test]
fn put_get_contains_remove_clear() {
    let t = tier(64 * PAGE);
    assert_eq!(put(&t, 1, 5000), PutOutcome::Stored);
    assert_eq!(put(&t, 1, 5000), PutOutcome::AlreadyPresent);
    assert!(t.contains(&key(1)));
    let h = t.lookup(&key(1)).unwrap();
    assert!(h.payload().iter().all(|&b| b == 1));
    assert!(t.remove_key(&key(1)));
    assert!(!t.contains(&key(1)));
    // The reader's handle keeps the bytes until dropped.
    assert!(h.payload().iter().all(|&b| b == 1));
    assert_eq!(t.pool_stats().used, 2 * PAGE);
    drop(h);
    assert_eq!(t.pool_stats().used, 0);
    put(&t, 2, 10);
    put(&t, 3, 10);
    assert_eq!(t.clear_all(), 2);
    assert_eq!(t.stats().chunks, 0);
}

#[test]
fn in_use_and_pinned_chunks_are_never_evicted() {
    let t = tier(4 * PAGE);
    for i in 0..4 {
        assert_eq!(put(&t, i, 4096), PutOutcome::Stored);
    }
    let reader = t.lookup(&key(0)).unwrap();
    let pins = t.pin(&[key(1)], None);
    assert_eq!(pins.len(), 1);
    // Two new chunks evict 2 and 3, never 0 (read) or 1 (pinned).
    assert_eq!(put(&t, 10, 4096), PutOutcome::Stored);
    assert_eq!(put(&t, 11, 4096), PutOutcome::Stored);
    assert!(t.contains(&key(0)) && t.contains(&key(1)));
    assert!(!t.contains(&key(2)) && !t.contains(&key(3)));
    // Everything left is held: the next store is refused rather than waiting or evicting.
    let _r10 = t.lookup(&key(10)).unwrap();
    let _r11 = t.lookup(&key(11)).unwrap();
    assert_eq!(put(&t, 12, 4096), PutOutcome::Skipped("full"));
    t.unpin(&pins);
    drop(reader);
    assert_eq!(put(&t, 12, 4096), PutOutcome::Stored);
    let s = t.stats();
    assert_eq!(s.evictions, 3);
    assert_eq!(s.alloc_failures, 1);
}

#[test]
fn abandoned_pins_expire() {
    let t = tier(2 * PAGE);
    put(&t, 0, 4096);
    put(&t, 1, 4096);
    let _pins = t.pin(&[key(0), key(1)], Some(Duration::from_millis(30)));
    assert_eq!(t.stats().pins, 2);
    assert_eq!(put(&t, 2, 4096), PutOutcome::Skipped("full"));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(put(&t, 2, 4096), PutOutcome::Stored);
    assert_eq!(t.stats().pins, 0);
}

#[test]
fn reverse_touch_keeps_prompt_heads_and_evicts_tails_first() {
    let t = tier(8 * PAGE);
    // One prompt of 4 chunks, then an access that touches it in reverse (as a hit does).
    for i in 0..4 {
        put(&t, i, 4096);
    }
    t.touch_reverse(&[key(0), key(1), key(2), key(3)]);
    for i in 10..14 {
        put(&t, i, 4096);
    }
    // Pressure: new chunks evict the prompt's tail first.
    put(&t, 20, 4096);
    put(&t, 21, 4096);
    assert!(t.contains(&key(0)) && t.contains(&key(1)), "head survives");
    assert!(
        !t.contains(&key(3)) && !t.contains(&key(2)),
        "tail goes first"
    );
}

#[test]
fn fragmentation_does_not_fail_a_store_while_evictable_bytes_exist() {
    // Mixed sizes: 1-page tails between 3-page chunks, every other tail pinned, so once the
    // rest is evicted the free space is scattered between pinned extents. Pins forbid
    // eviction, not moving: a store of everything unpinned must succeed by compacting.
    let t = tier(32 * PAGE);
    let mut i = 0;
    let mut held = Vec::new();
    while put(&t, i, 3 * 4096) == PutOutcome::Stored && put(&t, i + 1, 4096) == PutOutcome::Stored {
        if i % 4 == 0 {
            held.extend(t.pin(&[key(i + 1)], None));
        }
        i += 2;
        if t.pool_stats().used >= 32 * PAGE {
            break;
        }
    }
    let held_pages = held.len() as u64;
    // Largest possible store: everything not held.
    let big = ((32 - held_pages) * PAGE) as usize;
    assert_eq!(
        put(&t, 1000, big),
        PutOutcome::Stored,
        "stats: {:?}",
        t.stats()
    );
    assert!(t.stats().compactions >= 1);
    for p in &held {
        let h = t.lookup(&p.key).expect("pinned chunk kept");
        let expect = u32::from_le_bytes(p.key.0[..4].try_into().unwrap()) as u8;
        assert!(
            h.payload().iter().all(|&b| b == expect),
            "pinned chunk intact after compaction"
        );
    }
}

#[derive(Debug, Clone)]
enum Op {
    Put(u8, u16),
    Read(u8),
    Release(u8),
    Pin(u8),
    Unpin(u8),
    Remove(u8),
    /// A prompt of keys `0..n` is reported (prefix-lrfu learns references and links).
    Observe(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..24, 1u16..20_000).prop_map(|(k, l)| Op::Put(k, l)),
        1 => (1u8..24).prop_map(Op::Observe),
        2 => (0u8..24).prop_map(Op::Read),
        2 => any::<u8>().prop_map(Op::Release),
        1 => (0u8..24).prop_map(Op::Pin),
        1 => any::<u8>().prop_map(Op::Unpin),
        1 => (0u8..24).prop_map(Op::Remove),
    ]
}

proptest! {
    #[test]
    fn budget_refs_and_pins_return_to_baseline(
        ops in proptest::collection::vec(op(), 1..120),
        kind in proptest::sample::select(crate::policy::PolicyKind::ALL.to_vec()),
        store in any::<bool>(),
    ) {
        let mut o = CpuTierOptions::with_bytes(24 * PAGE);
        o.pool.huge_pages = false;
        o.policy = kind;
        let t = CpuTier::new(o).unwrap();
        let mut readers: Vec<Chunk> = Vec::new();
        let mut pins: Vec<PinToken> = Vec::new();
        for op in ops {
            match op {
                Op::Put(k, l) => { put_with(&t, u32::from(k), usize::from(l), store); }
                Op::Observe(n) => {
                    let keys: Vec<ChunkKey> = (0..u32::from(n)).map(key).collect();
                    t.observe_prompt(&keys, crate::policy::PromptReport::Lookup);
                }
                Op::Read(k) => if let Some(c) = t.lookup(&key(u32::from(k))) { readers.push(c) },
                Op::Release(i) => if !readers.is_empty() { let n = readers.len(); readers.swap_remove(i as usize % n); },
                Op::Pin(k) => pins.extend(t.pin(&[key(u32::from(k))], None)),
                Op::Unpin(i) => if !pins.is_empty() { let n = pins.len(); let p = pins.swap_remove(i as usize % n); t.unpin(&[p]); },
                Op::Remove(k) => { t.remove_key(&key(u32::from(k))); }
            }
            let s = t.stats();
            prop_assert!(s.pool_used <= s.pool_capacity, "budget exceeded");
            prop_assert!(s.bytes <= s.pool_used);
            // Every reader still sees its own bytes.
            for r in &readers {
                let expect = r.info.key.0[0];
                prop_assert!(r.payload().iter().all(|&b| b == expect));
            }
        }
        t.unpin(&pins);
        drop(readers);
        let s = t.stats();
        prop_assert_eq!(s.pins, 0);
        prop_assert_eq!(s.in_use, 0);
        prop_assert_eq!(s.pool_used, s.bytes, "only resident chunks hold pool memory");
        t.clear_all();
        prop_assert_eq!(t.stats().pool_used, 0);
    }
}

proptest! {
    /// The reports replayed in order give exactly the resident keys, whatever mix of
    /// stores, evictions, removals, tenant deletions and clears happened (KV events).
    #[test]
    fn residency_reports_mirror_the_index(
        ops in proptest::collection::vec(op(), 1..120),
        kind in proptest::sample::select(crate::policy::PolicyKind::ALL.to_vec()),
        clear_at in 0usize..200,
    ) {
        let mut o = CpuTierOptions::with_bytes(16 * PAGE);
        o.pool.huge_pages = false;
        o.policy = kind;
        let t = CpuTier::new(o).unwrap();
        let mirror = Arc::new(Mirror::default());
        prop_assert!(t.set_observer(mirror.clone()));
        prop_assert!(!t.set_observer(Arc::new(Mirror::default())), "the first observer stays");
        let mut readers = Vec::new();
        for (i, op) in ops.into_iter().enumerate() {
            match op {
                Op::Put(k, l) => { put_with(&t, u32::from(k), usize::from(l), false); }
                Op::Read(k) => readers.extend(t.lookup(&key(u32::from(k)))),
                Op::Release(_) => { readers.pop(); }
                Op::Remove(k) => { t.remove_key(&key(u32::from(k))); }
                Op::Observe(_) | Op::Pin(_) | Op::Unpin(_) => {
                    futures::executor::block_on(Tier::remove_salt(&t, "nobody")).unwrap();
                }
            }
            if i == clear_at {
                t.clear_all();
            }
            let resident: std::collections::BTreeSet<ChunkKey> =
                (0..24).map(key).filter(|k| t.contains(k)).collect();
            prop_assert_eq!(&*mirror.0.lock(), &resident);
        }
    }
}

#[test]
fn residency_log_keeps_the_tiers_changes_in_order_and_starts_over_past_its_limit() {
    use crate::tier::{ResidencyChange, ResidencyLog};

    let t = tier(64 * PAGE);
    let log = Arc::new(ResidencyLog::new(4));
    assert!(t.set_observer(log.clone()));
    assert_eq!(put(&t, 1, 5000), PutOutcome::Stored);
    assert_eq!(put(&t, 2, 5000), PutOutcome::Stored);
    assert_eq!(put(&t, 1, 5000), PutOutcome::AlreadyPresent); // not a change
    assert!(t.remove_key(&key(1)));
    let taken = log.take();
    assert!(!taken.overflowed);
    assert_eq!(
        taken.changes,
        vec![
            ResidencyChange::Stored(key(1), 1),
            ResidencyChange::Stored(key(2), 1),
            ResidencyChange::Removed(key(1)),
        ]
    );
    assert_eq!(log.take(), Default::default());
    // Five changes into a log of four: it drops what it held and says so.
    for i in 3..8 {
        assert_eq!(put(&t, i, 100), PutOutcome::Stored);
    }
    let taken = log.take();
    assert!(taken.overflowed);
    assert_eq!(taken.changes, vec![ResidencyChange::Stored(key(7), 1)]);
    assert!(!log.take().overflowed);
}
