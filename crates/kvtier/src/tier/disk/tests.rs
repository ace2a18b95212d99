use std::sync::Arc;

use super::*;
use crate::chunk::{checksum, ChunkInfo};
use crate::keys::{ModelIdentity, Origin};
use crate::layout::{Dtype, KvLayout};
use crate::tier::{CpuTier, CpuTierOptions};

fn origin(salt: Option<&str>) -> Arc<Origin> {
    Arc::new(Origin {
        identity: Arc::new(ModelIdentity::new(
            "m",
            KvLayout::simple(2, 1, 8, Dtype::F16),
        )),
        cache_salt: salt.map(str::to_string),
    })
}

fn key(i: u32) -> ChunkKey {
    let mut b = [0u8; 32];
    b[..4].copy_from_slice(&i.to_le_bytes());
    b[4..8].copy_from_slice(&i.wrapping_mul(2_654_435_761).to_le_bytes());
    b[8..12].copy_from_slice(&i.wrapping_mul(40503).to_le_bytes());
    b[0] = (i.wrapping_mul(97) % 256) as u8;
    ChunkKey(b)
}

fn chunk(l1: &CpuTier, i: u32, len: usize, salt: Option<&str>) -> Chunk {
    let mut buf = l1.allocate(len).expect("pool room");
    for (j, b) in buf.as_mut_slice().iter_mut().enumerate() {
        *b = (j as u32).wrapping_mul(31).wrapping_add(i) as u8;
    }
    let sum = checksum(buf.as_slice());
    Chunk {
        info: ChunkInfo {
            key: key(i),
            num_tokens: 4,
            len: len as u64,
            checksum: sum,
            origin: origin(salt),
            created_ms: 1,
        },
        buf: buf.seal(),
    }
}

fn l1() -> CpuTier {
    CpuTier::new(CpuTierOptions::with_bytes(8 << 20)).unwrap()
}

#[test]
fn blocking_round_trip_and_budget_accounting() {
    let d = tempfile::tempdir().unwrap();
    let tier = DiskTier::open(DiskTierOptions::new(d.path().join("c"), 1 << 20)).unwrap();
    let l1 = l1();
    let c = chunk(&l1, 1, 10_000, None);
    assert_eq!(tier.put_blocking(&c), PutOutcome::Stored);
    assert_eq!(tier.put_blocking(&c), PutOutcome::AlreadyPresent);
    let s = tier.stats();
    assert_eq!(s.chunks, 1);
    assert_eq!(s.bytes, 4096 + 12288);
    let back = tier.get_blocking(key(1), &l1).unwrap().unwrap();
    assert_eq!(back.payload(), c.payload());
    assert_eq!(back.info, c.info);
}

#[test]
fn a_file_being_read_is_never_evicted() {
    let d = tempfile::tempdir().unwrap();
    // Room for exactly two 8 KiB-payload files.
    let tier = DiskTier::open(DiskTierOptions::new(d.path().join("c"), 2 * (4096 + 8192))).unwrap();
    let l1 = l1();
    assert_eq!(
        tier.put_blocking(&chunk(&l1, 1, 8192, None)),
        PutOutcome::Stored
    );
    assert_eq!(
        tier.put_blocking(&chunk(&l1, 2, 8192, None)),
        PutOutcome::Stored
    );
    // Key 1 is the LRU victim, but a reader holds it: key 2 goes instead.
    let dir = tier.dir(&key(1)).clone();
    let (_, gen) = dir.begin_read(&key(1)).unwrap();
    assert_eq!(
        tier.put_blocking(&chunk(&l1, 3, 8192, None)),
        PutOutcome::Stored
    );
    assert!(tier.contains(&key(1)) && !tier.contains(&key(2)));
    // Both remaining files are being read: nothing can make room.
    let (_, gen3) = dir.begin_read(&key(3)).unwrap();
    assert_eq!(
        tier.put_blocking(&chunk(&l1, 4, 8192, None)),
        PutOutcome::Skipped("disk full")
    );
    dir.end_read(&key(1), gen);
    dir.end_read(&key(3), gen3);
    assert_eq!(
        tier.put_blocking(&chunk(&l1, 4, 8192, None)),
        PutOutcome::Stored
    );
    assert_eq!(tier.stats().reserved, 0);
}

#[test]
fn admission_counts_are_bounded() {
    let d = tempfile::tempdir().unwrap();
    let mut o = DiskTierOptions::new(d.path().join("c"), 1 << 20);
    o.admit_after = 2;
    o.admit_tracking = 2;
    let tier = DiskTier::open(o).unwrap();
    let l1 = l1();
    let (a, b, c) = (
        chunk(&l1, 1, 100, None),
        chunk(&l1, 2, 100, None),
        chunk(&l1, 3, 100, None),
    );
    for x in [&a, &b, &c] {
        assert_eq!(tier.put_blocking(x), PutOutcome::Skipped("not admitted"));
    }
    // `a` was forgotten (only two keys tracked): it starts over; `c` is admitted.
    assert_eq!(tier.put_blocking(&a), PutOutcome::Skipped("not admitted"));
    assert_eq!(tier.put_blocking(&c), PutOutcome::Stored);
}

#[test]
fn works_without_a_tokio_runtime() {
    let d = tempfile::tempdir().unwrap();
    let tier = DiskTier::open(DiskTierOptions::new(d.path().join("c"), 1 << 20)).unwrap();
    let l1 = l1();
    let c = chunk(&l1, 9, 5000, Some("t"));
    assert_eq!(
        futures::executor::block_on(tier.put(c.clone())).unwrap(),
        PutOutcome::Stored
    );
    let back = futures::executor::block_on(tier.get(key(9), &l1))
        .unwrap()
        .unwrap();
    assert_eq!(back.payload(), c.payload());
    assert_eq!(
        futures::executor::block_on(tier.remove_salt("t")).unwrap(),
        1
    );
}
