use std::sync::Arc;

use super::*;
use crate::chunk::{checksum, ChunkInfo};
use crate::keys::{ModelIdentity, Origin};
use crate::layout::{Dtype, KvLayout};
use crate::tier::residency::Mirror;
use crate::tier::{CpuTier, CpuTierOptions, ResidencyChange, ResidencyLog};

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

/// The mirror holds exactly the keys a read hits (reads also refresh the LRU order; no
/// record is damaged here, so a read never drops one).
fn assert_mirrors(tier: &DiskTier, mirror: &Mirror, l1: &CpuTier, keys: u32) {
    let hits: std::collections::BTreeSet<ChunkKey> = (0..keys)
        .map(key)
        .filter(|k| tier.get_blocking(*k, l1).unwrap().is_some())
        .collect();
    assert_eq!(*mirror.0.lock(), hits);
}

#[test]
fn residency_reports_mirror_what_reads_hit() {
    let d = tempfile::tempdir().unwrap();
    // Two striped paths (each reports its own keys), room for three 8 KiB files each.
    let mut o = DiskTierOptions::new(d.path().join("a"), 3 * (4096 + 8192));
    o.paths.push(d.path().join("b"));
    let tier = DiskTier::open(o).unwrap();
    let mirror = Arc::new(Mirror::default());
    assert!(tier.set_observer(mirror.clone()));
    assert!(
        !tier.set_observer(Arc::new(Mirror::default())),
        "the first observer stays"
    );
    let l1 = l1();
    const KEYS: u32 = 16;
    // A fixed pseudo-random mix of stores (evicting once full), removals, tenant
    // deletions and clears.
    let mut x = 12_345u32;
    for step in 0..120 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let k = (x >> 8) % KEYS;
        let salt = [None, Some("t1"), Some("t2")][(k % 3) as usize];
        match (x >> 20) % 10 {
            0..=5 => {
                tier.put_blocking(&chunk(&l1, k, 8192, salt));
            }
            6 | 7 => {
                futures::executor::block_on(Tier::remove(&tier, key(k))).unwrap();
            }
            8 => {
                futures::executor::block_on(tier.remove_salt("t1")).unwrap();
            }
            _ if step % 4 == 0 => {
                futures::executor::block_on(tier.clear()).unwrap();
            }
            _ => {}
        }
        assert_mirrors(&tier, &mirror, &l1, KEYS);
    }
    assert!(tier.stats().evictions > 0, "the mix evicted");
}

#[test]
fn residency_reports_a_damaged_or_vanished_record_when_a_read_finds_it() {
    let d = tempfile::tempdir().unwrap();
    let tier = DiskTier::open(DiskTierOptions::new(d.path().join("c"), 1 << 20)).unwrap();
    let log = Arc::new(ResidencyLog::new(64));
    assert!(tier.set_observer(log.clone()));
    let l1 = l1();
    for i in 1..=2 {
        assert_eq!(
            tier.put_blocking(&chunk(&l1, i, 5000, None)),
            PutOutcome::Stored
        );
    }
    let root = tier.paths()[0].clone();
    // Damage key 1's payload; delete key 2's file behind the tier's back.
    let p1 = layout::record_path(&root, &key(1), None);
    let f = std::fs::OpenOptions::new().write(true).open(&p1).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xff; 64], 0).unwrap();
    std::fs::remove_file(layout::record_path(&root, &key(2), None)).unwrap();
    assert!(tier.get_blocking(key(1), &l1).unwrap().is_none());
    assert!(tier.get_blocking(key(2), &l1).unwrap().is_none());
    assert_eq!(
        log.take().changes,
        vec![
            ResidencyChange::Stored(key(1), 4),
            ResidencyChange::Stored(key(2), 4),
            ResidencyChange::Removed(key(1)),
            ResidencyChange::Removed(key(2)),
        ]
    );
}

#[test]
fn an_unreadable_record_is_forgotten_but_not_one_read_short_of_resources() {
    let d = tempfile::tempdir().unwrap();
    let tier = DiskTier::open(DiskTierOptions::new(d.path().join("c"), 1 << 20)).unwrap();
    let l1 = l1();
    assert_eq!(
        tier.put_blocking(&chunk(&l1, 1, 5000, None)),
        PutOutcome::Stored
    );
    // A unix socket where the record was: open() fails with ENXIO, a real I/O error.
    let p1 = layout::record_path(&tier.paths()[0], &key(1), None);
    std::fs::remove_file(&p1).unwrap();
    let _socket = std::os::unix::net::UnixListener::bind(&p1).unwrap();
    assert!(
        tier.get_blocking(key(1), &l1).is_err(),
        "the failed read is reported"
    );
    assert_eq!(tier.stats().read_errors, 1);
    assert_eq!(
        tier.holds(&key(1)),
        Some(false),
        "and the record is forgotten"
    );
    assert!(!p1.exists(), "its file is deleted");
    assert!(
        tier.get_blocking(key(1), &l1).unwrap().is_none(),
        "later reads miss"
    );

    let os = std::io::Error::from_raw_os_error;
    assert!(
        !blames_the_record(&os(libc::EMFILE)),
        "out of file descriptors"
    );
    assert!(blames_the_record(&os(libc::EIO)));
}

#[test]
fn records_found_at_startup_are_not_reported_but_their_removal_is() {
    let d = tempfile::tempdir().unwrap();
    let l1 = l1();
    {
        let tier = DiskTier::open(DiskTierOptions::new(d.path().join("c"), 1 << 20)).unwrap();
        assert_eq!(
            tier.put_blocking(&chunk(&l1, 1, 5000, None)),
            PutOutcome::Stored
        );
    }
    let tier = DiskTier::open(DiskTierOptions::new(d.path().join("c"), 1 << 20)).unwrap();
    let log = Arc::new(ResidencyLog::new(64));
    assert!(tier.set_observer(log.clone()));
    assert!(tier.contains(&key(1)));
    assert_eq!(log.take(), Default::default());
    assert!(futures::executor::block_on(Tier::remove(&tier, key(1))).unwrap());
    assert_eq!(log.take().changes, vec![ResidencyChange::Removed(key(1))]);
}
