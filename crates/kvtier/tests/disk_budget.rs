//! Property: over random put / get / remove sequences, the bytes on disk never exceed the
//! budget, always equal the tier's own accounting, and every read returns the right bytes.

#[path = "support/disk_util.rs"]
mod util;

use kvtier::tier::{DiskTier, DiskTierOptions, PutOutcome, Tier};
use proptest::prelude::*;
use util::*;

#[derive(Clone, Debug)]
enum Op {
    Put(u64, usize),
    Get(u64),
    Remove(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..24, 1usize..150_000).prop_map(|(k, l)| Op::Put(k, l)),
        2 => (0u64..24).prop_map(Op::Get),
        1 => (0u64..24).prop_map(Op::Remove),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn disk_bytes_never_exceed_the_budget(cap_kib in 160u64..1200, ops in proptest::collection::vec(op(), 1..40)) {
        let cap = cap_kib << 10;
        let d = tempdir();
        let root = d.path().join("c");
        let tier = DiskTier::open(DiskTierOptions::new(&root, cap)).unwrap();
        let l1 = l1(8 << 20);
        // Payload length of each stored key (a key keeps its first length while stored).
        let mut lens = std::collections::HashMap::new();
        for op in ops {
            match op {
                Op::Put(k, len) => {
                    let i = k * 1_000_003 + len as u64;
                    let c = chunk(&l1, i, len, None);
                    // Re-key so the same k can be stored with different bytes over time.
                    let mut c = c;
                    c.info.key = key(k);
                    match tier.put_blocking(&c) {
                        PutOutcome::Stored => { lens.insert(k, (i, len)); }
                        PutOutcome::AlreadyPresent => prop_assert!(tier.contains(&key(k))),
                        PutOutcome::Skipped(why) => {
                            prop_assert_eq!(why, "disk full");
                            prop_assert!(4096 + (len as u64).div_ceil(4096) * 4096 > cap);
                        }
                    }
                }
                Op::Get(k) => {
                    if let Some(c) = tier.get_blocking(key(k), &l1).unwrap() {
                        let (i, len) = lens[&k];
                        prop_assert_eq!(c.payload(), &expected(i, len)[..]);
                    }
                }
                Op::Remove(k) => {
                    futures::executor::block_on(tier.remove(key(k))).unwrap();
                }
            }
            let s = tier.stats();
            let on_disk = disk_bytes(&root);
            prop_assert!(on_disk <= cap, "{} bytes on disk, budget {}", on_disk, cap);
            prop_assert_eq!(on_disk, s.bytes);
            prop_assert_eq!(s.reserved, 0);
            prop_assert_eq!(s.checksum_failures, 0);
        }
    }
}
