//! Manager contracts: C2 lookup, C3 write-back, C4 prefix continuity, C5 stores, C7
//! integrity, C8 deadlines. Lower tiers are real CPU tiers (own pools) behind the
//! fault-injection wrapper.

use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::chunk::{checksum, ChunkInfo};
use crate::keys::{ModelIdentity, Origin};
use crate::layout::{Dtype, KvLayout};
use crate::memory::PAGE;
use crate::tier::{CpuTierOptions, Fault, FaultOp, FaultRule, FaultTier};

const LEN: usize = 3000;

fn key(i: usize) -> ChunkKey {
    let mut b = [0u8; 32];
    b[..8].copy_from_slice(&(i as u64).to_le_bytes());
    b[31] = 0xAB;
    ChunkKey(b)
}

fn byte_of(k: &ChunkKey) -> u8 {
    k.0[0].wrapping_mul(7).wrapping_add(1)
}

fn origin() -> Arc<Origin> {
    Arc::new(Origin {
        identity: Arc::new(ModelIdentity::new(
            "m",
            KvLayout::simple(1, 1, 8, Dtype::U8),
        )),
        cache_salt: None,
    })
}

fn cpu(name: &str, pages: u64) -> Arc<CpuTier> {
    let mut o = CpuTierOptions::with_bytes(pages * PAGE);
    o.name = name.into();
    o.pool.huge_pages = false;
    Arc::new(CpuTier::new(o).unwrap())
}

fn chunk_in(t: &CpuTier, i: usize) -> Chunk {
    let k = key(i);
    let mut b = t.allocate(LEN).unwrap();
    b.as_mut_slice().fill(byte_of(&k));
    Chunk {
        info: ChunkInfo {
            key: k,
            num_tokens: 4,
            len: LEN as u64,
            checksum: checksum(b.as_slice()),
            origin: origin(),
            created_ms: 0,
        },
        buf: b.seal(),
    }
}

fn check(c: &Chunk) {
    let b = byte_of(&c.info.key);
    assert!(
        c.payload().iter().all(|&x| x == b),
        "wrong bytes for {:?}",
        c.info.key
    );
}

struct Rig {
    m: StorageManager,
    l1: Arc<CpuTier>,
    lower: Vec<(Arc<CpuTier>, Arc<FaultTier>)>,
}

fn rig_with(n_lower: usize, l1_enabled: bool, write_back: &[bool], read_deadline_ms: u64) -> Rig {
    let opts = ManagerOptions {
        read_deadline: Duration::from_millis(read_deadline_ms),
        store_deadline: Duration::from_secs(5),
        health: HealthPolicy {
            failure_threshold: 1000,
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_millis(100),
        },
        ..ManagerOptions::default()
    };
    rig_opts(n_lower, l1_enabled, write_back, opts)
}

fn rig_opts(n_lower: usize, l1_enabled: bool, write_back: &[bool], opts: ManagerOptions) -> Rig {
    let l1 = cpu("cpu", 256);
    let lower: Vec<(Arc<CpuTier>, Arc<FaultTier>)> = (0..n_lower)
        .map(|i| {
            let t = cpu(&format!("t{}", i + 1), 256);
            let f = Arc::new(FaultTier::new(t.clone(), i as u64));
            (t, f)
        })
        .collect();
    let specs = lower
        .iter()
        .enumerate()
        .map(|(i, (_, f))| TierSpec {
            tier: f.clone(),
            write_back: write_back.get(i).copied().unwrap_or(true),
        })
        .collect();
    let m = StorageManager::new(
        l1.clone(),
        l1_enabled,
        specs,
        opts,
        Arc::new(Metrics::new()),
    )
    .unwrap();
    Rig { m, l1, lower }
}

fn rig(n_lower: usize) -> Rig {
    rig_with(n_lower, true, &[], 500)
}

/// Places chunk `i` in tier `t` (0 = L1).
fn place(r: &Rig, t: usize, i: usize) {
    if t == 0 {
        r.l1.insert(chunk_in(&r.l1, i));
    } else {
        let tier = &r.lower[t - 1].0;
        tier.insert(chunk_in(tier, i));
    }
}

fn keys(n: usize) -> Vec<ChunkKey> {
    (0..n).map(key).collect()
}

#[test]
fn lookup_walks_tiers_in_order_and_stops_at_the_first_gap() {
    let r = rig(2);
    for i in 0..3 {
        place(&r, 0, i);
    }
    place(&r, 1, 3);
    place(&r, 1, 4);
    place(&r, 2, 5);
    place(&r, 0, 6); // L1 again right after the tier-2 segment: still contiguous
    place(&r, 1, 8); // after the gap at 7: not part of the answer
    place(&r, 0, 9);
    let l = r.m.lookup(&keys(10)).unwrap();
    assert_eq!(l.hit_chunks, 7);
    assert_eq!(l.tiers, vec![0, 0, 0, 1, 1, 2, 0]);
    // A chunk in L1 is not looked for below even if a lower tier has the next ones.
    place(&r, 2, 0);
    assert_eq!(r.m.lookup(&keys(1)).unwrap().tiers, vec![0]);
}

#[test]
fn blocking_get_writes_back_lower_hits_only() {
    let r = rig_with(2, true, &[true, false], 500);
    place(&r, 1, 1);
    place(&r, 2, 2);
    place(&r, 0, 3);
    let c = r.m.get(key(1)).unwrap().unwrap();
    check(&c);
    assert!(r.l1.contains(&key(1)), "hit in tier 1 promoted into L1");
    let c = r.m.get(key(2)).unwrap().unwrap();
    check(&c);
    assert!(
        !r.l1.contains(&key(2)),
        "tier marked write_back=false is not promoted"
    );
    let before = r.l1.stats().chunks;
    r.m.get(key(3)).unwrap().unwrap();
    assert_eq!(
        r.l1.stats().chunks,
        before,
        "an L1 hit is not written again"
    );
    assert!(r.m.get(key(99)).unwrap().is_none());
    // Nothing is ever written into a lower tier by a read.
    assert!(!r.lower[1].0.contains(&key(1)));
    let wb =
        r.m.metrics()
            .write_backs
            .get_or_create(&Metrics::tier("t1"))
            .get();
    assert_eq!(wb, 1);
}

#[test]
fn no_write_back_when_l1_is_disabled() {
    let r = rig_with(1, false, &[], 500);
    place(&r, 1, 1);
    check(&r.m.get(key(1)).unwrap().unwrap());
    check(&r.m.get_async(key(1)).wait().unwrap().unwrap());
    assert_eq!(r.l1.stats().chunks, 0);
    assert_eq!(r.m.lookup(&[key(1)]).unwrap().tiers, vec![1]);
}

#[test]
fn batched_get_writes_back_only_when_every_key_hit() {
    let r = rig(1);
    place(&r, 1, 0);
    place(&r, 1, 1);
    let got = r.m.batched_get(&[key(0), key(1), key(2)]).unwrap();
    assert!(got[0].is_some() && got[1].is_some() && got[2].is_none());
    assert_eq!(r.l1.stats().chunks, 0, "one miss: nothing promoted");
    let got = r.m.batched_get(&[key(0), key(1)]).unwrap();
    got.iter().for_each(|c| check(c.as_ref().unwrap()));
    assert!(r.l1.contains(&key(0)) && r.l1.contains(&key(1)));
}

#[test]
fn non_blocking_get_writes_back_when_it_completes() {
    let r = rig(1);
    place(&r, 1, 5);
    r.lower[0].1.add_rule(FaultRule::always(
        FaultOp::Get,
        Fault::Stall(Duration::from_millis(100)),
    ));
    let h = r.m.get_async(key(5));
    assert!(!r.l1.contains(&key(5)), "not promoted before it completes");
    let c = h.wait().unwrap().unwrap();
    check(&c);
    assert!(r.l1.contains(&key(5)), "promoted once the future completed");
    // Awaiting from async code works too.
    place(&r, 1, 6);
    let c = futures::executor::block_on(r.m.get_async(key(6)))
        .unwrap()
        .unwrap();
    check(&c);
    assert!(r.l1.contains(&key(6)));
}

#[test]
fn prefetch_truncates_at_the_first_failure_and_caches_nothing_beyond() {
    // The five LMCache cases, chunk counts per tier.
    let r = rig(2);
    for i in 0..3 {
        place(&r, 0, i);
    }
    for i in 3..5 {
        place(&r, 1, i);
    }
    for i in 5..7 {
        place(&r, 2, i);
    }
    // Tier 1 delivers only chunk 3: chunk 4 fails, so 5 and 6 (tier 2) are released.
    r.lower[0]
        .1
        .add_rule(FaultRule::always(FaultOp::Get, Fault::Fail).for_keys([key(4)]));
    let res = r.m.prefetch(keys(7)).wait().unwrap();
    assert_eq!(res.len(), 4);
    assert_eq!(res.tiers, vec![0, 0, 0, 1]);
    assert_eq!(res.failed_chunks, 3);
    res.chunks.iter().for_each(check);
    assert!(r.l1.contains(&key(3)), "validated prefix written back");
    for i in 4..7 {
        assert!(
            !r.l1.contains(&key(i)),
            "chunk {i} beyond the gap must not be cached"
        );
    }
    drop(res);
    assert_eq!(r.l1.stats().in_use, 0, "released chunks hold no references");
    // All delivered: the whole prompt comes back and is promoted.
    r.lower[0].1.clear_rules();
    let res = r.m.prefetch(keys(7)).wait().unwrap();
    assert_eq!(res.len(), 7);
    assert_eq!(res.tokens(), 28);
    assert!((0..7).all(|i| r.l1.contains(&key(i))));
}

#[test]
fn streaming_prefetch_hands_out_the_contiguous_prefix_in_order_and_nothing_beyond() {
    let r = rig(2);
    for i in 0..2 {
        place(&r, 0, i);
    }
    for i in 2..5 {
        place(&r, 1, i);
    }
    for i in 5..8 {
        place(&r, 2, i);
    }
    // Chunk 6 fails: 0..=5 arrive, in order; 7 never does.
    r.lower[1]
        .1
        .add_rule(FaultRule::always(FaultOp::Get, Fault::Fail).for_keys([key(6)]));
    let (handle, arriving) = r.m.prefetch_streaming(keys(8));
    let mut got = Vec::new();
    for c in arriving.iter() {
        let k = c.key();
        let mut bytes = vec![0u8; c.len()];
        assert!(
            c.copy_to(&mut bytes).unwrap(),
            "chunk {k:?} failed its check"
        );
        let b = byte_of(&k);
        assert!(bytes.iter().all(|&x| x == b), "wrong bytes for {k:?}");
        got.push(k);
    }
    assert_eq!(got, (0..6).map(key).collect::<Vec<_>>());
    let res = handle.wait().unwrap();
    assert_eq!(res.len(), 6);
    assert_eq!(res.failed_chunks, 2);
    assert!(
        !r.l1.contains(&key(7)),
        "chunk beyond the gap must not be cached"
    );
    drop((got, res));
    assert_eq!(r.l1.stats().in_use, 0, "streamed chunks hold no references");
    // A receiver dropped early does not stop the prefetch or its write-back.
    r.lower[1].1.clear_rules();
    let (handle, arriving) = r.m.prefetch_streaming(keys(8));
    drop(arriving);
    assert_eq!(handle.wait().unwrap().len(), 8);
    assert!((0..8).all(|i| r.l1.contains(&key(i))));
}

#[test]
fn a_stalled_tier_turns_into_misses_within_the_deadline_and_recovers() {
    let r = rig_with(1, true, &[], 100);
    place(&r, 1, 0);
    r.lower[0].1.add_rule(FaultRule::always(
        FaultOp::Any,
        Fault::Stall(Duration::from_secs(3)),
    ));
    let t0 = Instant::now();
    assert_eq!(r.m.lookup(&keys(1)).unwrap().hit_chunks, 0);
    assert!(r.m.get(key(0)).unwrap().is_none());
    let res = r.m.prefetch(keys(1)).wait().unwrap();
    assert!(res.is_empty());
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "took {:?}",
        t0.elapsed()
    );
    assert!(r.m.tier_is_down(1));
    let timeouts =
        r.m.metrics()
            .tier_timeouts
            .get_or_create(&Metrics::tier_op("t1", "contains"))
            .get();
    assert!(timeouts >= 1);
    // While down, the tier is skipped at once.
    let t1 = Instant::now();
    assert!(r.m.get(key(0)).unwrap().is_none());
    assert!(t1.elapsed() < Duration::from_millis(50));
    // Fault cleared: after the backoff the next call probes and the tier is back.
    r.lower[0].1.clear_rules();
    std::thread::sleep(Duration::from_millis(120));
    check(&r.m.get(key(0)).unwrap().unwrap());
    assert!(!r.m.tier_is_down(1));
}

#[test]
fn corrupt_reads_are_misses_counted_and_removed() {
    let r = rig(2);
    place(&r, 1, 0);
    place(&r, 2, 0);
    r.lower[0]
        .1
        .add_rule(FaultRule::always(FaultOp::Get, Fault::Corrupt).times(1));
    // Tier 1's copy is corrupt: a miss there; the good copy in tier 2 is returned.
    let c = r.m.get(key(0)).unwrap().unwrap();
    check(&c);
    let fails =
        r.m.metrics()
            .checksum_failures
            .get_or_create(&Metrics::tier("t1"))
            .get();
    assert_eq!(fails, 1);
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !r.lower[0].0.contains(&key(0)),
        "bad copy removed from its tier"
    );
}

#[test]
fn a_streamed_chunk_that_fails_its_check_in_the_copy_ends_the_prefix_uncached() {
    let r = rig(1);
    for i in 0..6 {
        place(&r, 1, i);
    }
    r.lower[0]
        .1
        .add_rule(FaultRule::always(FaultOp::Get, Fault::Corrupt).for_keys([key(3)]));
    let (handle, arriving) = r.m.prefetch_streaming(keys(6));
    let mut verdicts = Vec::new();
    for c in arriving.iter() {
        let mut bytes = vec![1u8; c.len()];
        let ok = c.copy_to(&mut bytes).unwrap();
        if !ok {
            assert!(
                bytes.iter().all(|&b| b == 0),
                "corrupt bytes left in the copy"
            );
        }
        verdicts.push(ok);
    }
    // The tier left the check to the reader: chunk 3 arrives and fails in the copy.
    assert_eq!(verdicts[..4], [true, true, true, false]);
    let res = handle.wait().unwrap();
    assert_eq!(res.len(), 3);
    assert_eq!(res.failed_chunks, 3);
    assert!(
        (0..3).all(|i| r.l1.contains(&key(i))),
        "good prefix written back"
    );
    assert!(
        (3..6).all(|i| !r.l1.contains(&key(i))),
        "nothing from the corrupt chunk on is cached"
    );
    let fails =
        r.m.metrics()
            .checksum_failures
            .get_or_create(&Metrics::tier("t1"))
            .get();
    assert_eq!(fails, 1);
    std::thread::sleep(Duration::from_millis(50));
    assert!(!r.lower[0].0.contains(&key(3)), "bad copy removed");
    drop(res);
    // A reader that drops chunks unread leaves the check to the prefetch, which still
    // cuts the prefix at the corrupt chunk.
    place(&r, 1, 3);
    r.l1.clear_all();
    let (handle, arriving) = r.m.prefetch_streaming(keys(6));
    drop(arriving);
    assert_eq!(handle.wait().unwrap().len(), 3);
    assert!(!r.l1.contains(&key(3)));
}

#[test]
fn commit_writes_through_and_dedupes_in_flight_keys() {
    let r = rig(2);
    let StoreClaim::New(claim) = r.m.claim(key(1)) else {
        panic!("fresh key")
    };
    assert!(matches!(r.m.claim(key(1)), StoreClaim::InFlight));
    let ticket = r.m.commit(claim, chunk_in(&r.l1, 1));
    let outcomes = ticket.wait();
    assert_eq!(outcomes.len(), 2);
    assert!(outcomes.iter().all(|o| o.result == Ok(PutOutcome::Stored)));
    assert!(r.lower[0].0.contains(&key(1)) && r.lower[1].0.contains(&key(1)));
    assert!(matches!(r.m.claim(key(1)), StoreClaim::Present(_)));
    // A failing lower tier does not fail the store, and is reported in the ticket.
    r.lower[1]
        .1
        .add_rule(FaultRule::always(FaultOp::Put, Fault::Fail));
    let StoreClaim::New(claim) = r.m.claim(key(2)) else {
        panic!()
    };
    let outcomes = r.m.commit(claim, chunk_in(&r.l1, 2)).wait();
    assert!(outcomes.iter().any(|o| o.tier == 2 && o.result.is_err()));
    assert!(r.m.flush(Duration::from_secs(2)));
}

#[test]
fn a_lower_tier_never_gets_two_puts_of_one_key_at_once() {
    // Why remote tiers keep no in-flight map of their own: while a put of a key to a tier is
    // queued or running, the manager sends that tier no other put of the key.
    let r = rig(1);
    r.lower[0].1.add_rule(FaultRule::always(
        FaultOp::Put,
        Fault::Stall(Duration::from_millis(300)),
    ));
    let c = chunk_in(&r.l1, 1);
    let (mut first, mut again) = (StoreTicket::default(), StoreTicket::default());
    r.m.write_through(&c, &mut first);
    r.m.write_through(&c, &mut again);
    assert_eq!((first.len(), again.len()), (1, 0));
    assert!(r.m.flush(Duration::from_secs(5)));
    assert_eq!(
        r.lower[0].1.fired(),
        1,
        "the tier got a second put of the key"
    );
    // Once the first put has returned, the tier is known to hold the key: it is not
    // written again (write once per tier), and the skipped write is counted.
    r.m.write_through(&c, &mut again);
    assert_eq!(again.len(), 0);
    assert_eq!(r.lower[0].1.fired(), 1);
    let m = r.m.metrics();
    let l = crate::metrics::Metrics::tier(r.lower[0].1.name());
    assert_eq!(m.tier_writes.get_or_create(&l).get(), 1);
    assert_eq!(m.writes_deduped.get_or_create(&l).get(), 1);
    // A read that misses (another node removed it) makes the key unknown again.
    r.lower[0].0.remove_key(&c.info.key);
    assert!(r.m.get(c.info.key).unwrap().is_none());
    r.m.write_through(&c, &mut again);
    assert_eq!(again.len(), 1, "a key the tier lost is written again");
    assert!(r.m.flush(Duration::from_secs(5)));
}

#[test]
fn a_full_write_queue_skips_the_tier_without_blocking_and_counts_it() {
    let opts = ManagerOptions {
        write_queue_chunks: 2,
        store_deadline: Duration::from_secs(5),
        ..ManagerOptions::default()
    };
    let r = rig_opts(1, true, &[], opts);
    r.lower[0].1.add_rule(FaultRule::always(
        FaultOp::Put,
        Fault::Stall(Duration::from_millis(300)),
    ));
    let t0 = std::time::Instant::now();
    let tickets: Vec<_> = (0..4)
        .map(|i| {
            let StoreClaim::New(claim) = r.m.claim(key(i)) else {
                panic!("fresh key")
            };
            r.m.commit(claim, chunk_in(&r.l1, i))
        })
        .collect();
    assert!(
        t0.elapsed() < Duration::from_millis(250),
        "stores must not wait for the queue"
    );
    let written: usize = tickets.into_iter().map(|t| t.wait().len()).sum();
    assert_eq!(written, 2, "two writes fit the queue, two were skipped");
    let text = r.m.metrics().render();
    assert!(
        text.lines()
            .any(|l| l.starts_with("kvtier_store_skipped_total")
                && l.contains("queue_full")
                && l.ends_with(" 2")),
        "{text}"
    );
    // Once drained, the tier takes writes again.
    r.lower[0].1.clear_rules();
    let StoreClaim::New(claim) = r.m.claim(key(9)) else {
        panic!("fresh key")
    };
    assert_eq!(r.m.commit(claim, chunk_in(&r.l1, 9)).wait().len(), 1);
    assert!(r.lower[0].0.contains(&key(9)));
}

#[test]
fn metrics_render_in_prometheus_text() {
    let r = rig(1);
    place(&r, 1, 0);
    r.m.get(key(0)).unwrap();
    r.m.refresh_metrics();
    let text = r.m.metrics().render();
    for needle in [
        "kvtier_tier_hits_total{tier=\"t1\"} 1",
        "kvtier_write_backs_total{tier=\"t1\"} 1",
        "kvtier_used_bytes{tier=\"cpu\"}",
        "# TYPE kvtier_lookup_seconds histogram",
    ] {
        assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
    }
}

#[derive(Debug, Clone, Copy)]
enum ChunkFate {
    Ok,
    Fail,
    Corrupt,
    Drop,
    Slow,
    Timeout,
}

fn fate() -> impl Strategy<Value = ChunkFate> {
    prop_oneof![
        8 => Just(ChunkFate::Ok),
        1 => Just(ChunkFate::Fail),
        1 => Just(ChunkFate::Corrupt),
        1 => Just(ChunkFate::Drop),
        1 => Just(ChunkFate::Slow),
        1 => Just(ChunkFate::Timeout),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// C3 + C4 over three tiers with random placement, failures and stalls: the prefetch
    /// result is always a correct contiguous prefix, nothing beyond it is cached, and every
    /// reference is returned afterwards.
    #[test]
    fn prefetch_over_three_tiers_always_yields_a_contiguous_prefix(
        placement in proptest::collection::vec(0usize..4, 1..12),
        fates in proptest::collection::vec(fate(), 12),
    ) {
        let r = rig_with(2, true, &[true, true], 150);
        let n = placement.len();
        for (i, &t) in placement.iter().enumerate() {
            if t < 3 { place(&r, t, i); } // 3 = missing everywhere
        }
        for (i, f) in fates.iter().enumerate().take(n) {
            let t = placement[i];
            if t == 0 || t == 3 { continue; }
            let rule = match f {
                ChunkFate::Ok => continue,
                ChunkFate::Fail => FaultRule::always(FaultOp::Get, Fault::Fail),
                ChunkFate::Corrupt => FaultRule::always(FaultOp::Get, Fault::Corrupt),
                ChunkFate::Drop => FaultRule::always(FaultOp::Get, Fault::Drop),
                ChunkFate::Slow => FaultRule::always(FaultOp::Get, Fault::Stall(Duration::from_millis(20))),
                ChunkFate::Timeout => FaultRule::always(FaultOp::Get, Fault::Stall(Duration::from_millis(400))),
            };
            r.lower[t - 1].1.add_rule(rule.for_keys([key(i)]));
        }
        let before: Vec<bool> = (0..n).map(|i| r.l1.contains(&key(i))).collect();
        let lookup = r.m.lookup(&keys(n)).unwrap();
        let t0 = Instant::now();
        let res = r.m.prefetch(keys(n)).wait().unwrap();
        prop_assert!(t0.elapsed() < Duration::from_secs(3));
        // Contiguous from chunk 0, correct bytes, within what lookup promised.
        prop_assert!(res.len() <= lookup.hit_chunks);
        for (j, c) in res.chunks.iter().enumerate() {
            prop_assert_eq!(c.info.key, key(j));
            let b = byte_of(&c.info.key);
            prop_assert!(c.payload().iter().all(|&x| x == b));
        }
        // Exactly the expected prefix: up to the first chunk that is missing or faulty.
        let expected = (0..n).position(|i| {
            let t = placement[i];
            t == 3 || (t != 0 && !matches!(fates[i], ChunkFate::Ok | ChunkFate::Slow))
        }).unwrap_or(n);
        prop_assert_eq!(res.len(), expected, "placement {:?} fates {:?}", placement, &fates[..n]);
        // Written back: the prefix; beyond it nothing new is cached.
        for (i, was) in before.iter().enumerate() {
            let now = r.l1.contains(&key(i));
            if i < res.len() { prop_assert!(now, "prefix chunk {} not in L1", i); }
            else { prop_assert_eq!(now, *was, "chunk {} beyond the prefix changed in L1", i); }
        }
        drop(res);
        let s = r.l1.stats();
        prop_assert_eq!(s.in_use, 0);
        prop_assert_eq!(s.pins, 0);
        for (t, _) in &r.lower {
            prop_assert_eq!(t.stats().in_use, 0);
        }
    }
}

#[test]
fn a_tier_observer_is_set_on_the_named_tier_that_keeps_an_index() {
    use crate::tier::{
        DiskTier, DiskTierOptions, ResidencyChange, ResidencyLog, ThrottleLimits, ThrottledTier,
        DISK_TIER_NAME,
    };
    let d = tempfile::tempdir().unwrap();
    let disk = Arc::new(DiskTier::open(DiskTierOptions::new(d.path().join("c"), 1 << 20)).unwrap());
    // Behind a throttle, as `tier_max_mbps` wraps it: the observer reaches the disk tier.
    let limits = ThrottleLimits {
        bytes_per_sec: Some(1e12),
        ops_per_sec: None,
    };
    let l1 = cpu("cpu", 256);
    let remote = Arc::new(FaultTier::new(cpu("t1", 256), 0));
    let specs = vec![
        TierSpec::new(Arc::new(ThrottledTier::new(disk.clone(), limits))),
        TierSpec::new(remote),
    ];
    let m = StorageManager::new(
        l1.clone(),
        true,
        specs,
        ManagerOptions::default(),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let log = Arc::new(ResidencyLog::new(16));
    assert!(!m.set_tier_observer("nope", log.clone()), "no such tier");
    assert!(
        !m.set_tier_observer("t1", log.clone()),
        "no index of its own"
    );
    assert!(m.set_tier_observer(DISK_TIER_NAME, log.clone()));
    assert!(
        !m.set_tier_observer(DISK_TIER_NAME, log.clone()),
        "already set"
    );
    let c = chunk_in(&l1, 1);
    assert_eq!(disk.put_blocking(&c), PutOutcome::Stored);
    assert_eq!(log.take().changes, vec![ResidencyChange::Stored(key(1), 4)]);
}
