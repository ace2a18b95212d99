//! Injected corruption (torn files, bit flips) and a full device (ENOSPC on a small tmpfs,
//! which also exercises the buffered fallback: tmpfs rejects O_DIRECT).

#[path = "support/disk_util.rs"]
mod util;

#[path = "support/log_capture.rs"]
mod logs;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use kvtier::tier::{DiskTier, DiskTierOptions, PutOutcome};
use util::*;

const LEN: usize = 50_000; // 13 blocks of payload

fn setup(root: &Path, n: u64) -> DiskTier {
    let tier = DiskTier::open(DiskTierOptions::new(root, 64 << 20)).unwrap();
    let l1 = l1(16 << 20);
    for i in 0..n {
        assert_eq!(
            tier.put_blocking(&chunk(&l1, i, LEN, Some("s"))),
            PutOutcome::Stored
        );
    }
    tier
}

fn flip(path: &Path, at: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x10;
    f.write_all_at(&b, at).unwrap();
    f.sync_all().unwrap();
}

/// File offset of the header block of a `len`-byte record (the last block).
fn header_at(len: usize) -> u64 {
    (len as u64).div_ceil(4096) * 4096
}

fn assert_miss_and_removed(tier: &DiskTier, root: &Path, i: u64, failures: u64) {
    let l1 = l1(16 << 20);
    assert!(
        tier.get_blocking(key(i), &l1).unwrap().is_none(),
        "corrupt chunk {i} served"
    );
    assert!(
        file_of(root, &key(i)).is_none(),
        "corrupt file {i} not deleted"
    );
    assert!(!tier.contains(&key(i)));
    assert_eq!(tier.stats().checksum_failures, failures);
}

#[test]
fn corruption_while_open_is_a_miss_and_is_deleted() {
    let d = tempdir();
    let root = d.path().join("c");
    let tier = setup(&root, 6);
    // Header bit flip, payload bit flip, last payload byte flip.
    flip(&file_of(&root, &key(0)).unwrap(), header_at(LEN) + 20);
    assert_miss_and_removed(&tier, &root, 0, 1);
    flip(&file_of(&root, &key(1)).unwrap(), 1234);
    assert_miss_and_removed(&tier, &root, 1, 2);
    flip(&file_of(&root, &key(2)).unwrap(), LEN as u64 - 1);
    assert_miss_and_removed(&tier, &root, 2, 3);
    // Torn: cut inside the payload / to the header only.
    let f = OpenOptions::new()
        .write(true)
        .open(file_of(&root, &key(3)).unwrap())
        .unwrap();
    f.set_len(4096 + 8192).unwrap();
    assert_miss_and_removed(&tier, &root, 3, 4);
    let f = OpenOptions::new()
        .write(true)
        .open(file_of(&root, &key(4)).unwrap())
        .unwrap();
    f.set_len(100).unwrap();
    assert_miss_and_removed(&tier, &root, 4, 5);
    // The untouched chunk is fine; accounting matches the files left.
    let l1 = l1(16 << 20);
    let c = tier.get_blocking(key(5), &l1).unwrap().unwrap();
    assert_eq!(c.payload(), &expected(5, LEN)[..]);
    assert_eq!(tier.stats().chunks, 1);
    assert_eq!(disk_bytes(&root), tier.stats().bytes);
}

#[test]
fn corruption_found_after_restart() {
    let d = tempdir();
    let root = d.path().join("c");
    drop(setup(&root, 5));
    flip(&file_of(&root, &key(0)).unwrap(), header_at(LEN) + 60);
    flip(&file_of(&root, &key(1)).unwrap(), 40_000);
    // Torn at a block boundary (recovery cannot tell; the read does).
    OpenOptions::new()
        .write(true)
        .open(file_of(&root, &key(2)).unwrap())
        .unwrap()
        .set_len(4096 * 3)
        .unwrap();
    // Torn mid-block: recovery deletes it by size.
    OpenOptions::new()
        .write(true)
        .open(file_of(&root, &key(3)).unwrap())
        .unwrap()
        .set_len(4096 + 777)
        .unwrap();
    // A record of the older header-first layout and a tmp leftover (kvtier's: deleted), and
    // files kvtier did not name (left alone).
    let old = format!("{}.none.kvc", key(9).to_hex());
    std::fs::write(root.join(&old[..2]).join(&old), vec![0u8; 8192]).unwrap();
    let tmp = root
        .join("tmp")
        .join(format!("{}.0000000000000001", key(8).to_hex()));
    std::fs::write(&tmp, b"junk").unwrap();
    let foreign = [
        root.join("ab").join("not-a-record.kvr"),
        root.join("tmp").join("partial.123"),
    ];
    for f in &foreign {
        std::fs::write(f, b"junk").unwrap();
    }
    let tier = DiskTier::open(DiskTierOptions::new(&root, 64 << 20)).unwrap();
    let s = tier.stats();
    assert_eq!(s.chunks, 4, "{s:?}");
    assert_eq!(s.recovery_removed, 3, "{s:?}");
    assert!(foreign.iter().all(|f| f.exists()) && !tmp.exists());
    assert!(file_of(&root, &key(3)).is_none());
    assert_miss_and_removed(&tier, &root, 0, 1);
    assert_miss_and_removed(&tier, &root, 1, 2);
    assert_miss_and_removed(&tier, &root, 2, 3);
    let l1 = l1(16 << 20);
    assert_eq!(
        tier.get_blocking(key(4), &l1).unwrap().unwrap().payload(),
        &expected(4, LEN)[..]
    );
}

/// The engine's retrieve checks a disk chunk's checksum in its copy out (the disk tier
/// leaves that pass to it): a flipped payload bit still ends the prefix there, is counted
/// by the disk tier, deleted, and neither it nor anything after it is written back.
#[test]
fn retrieve_checks_disk_payloads_in_its_copy_and_cuts_the_prefix_at_a_corrupt_one() {
    let d = tempdir();
    let root = d.path().join("c");
    let config = kvtier::EngineConfig {
        chunk_size: 16,
        max_local_cpu_size: 16 << 20,
        local_disk: vec![root.clone()],
        max_local_disk_size: 256 << 20,
        ..kvtier::EngineConfig::default()
    };
    let engine = kvtier::Engine::new(config, identity()).unwrap();
    let tokens: Vec<u32> = (0..6 * 16).map(|t| t * 7 + 3).collect();
    let payload = expected(9, engine.payload_bytes(tokens.len()));
    let outs = engine.store(&tokens, None, &payload).unwrap().ticket.wait();
    assert!(
        outs.iter().all(|o| o.result == Ok(PutOutcome::Stored)),
        "{outs:?}"
    );
    let keys: Vec<_> = engine
        .chunk_spans(&tokens, None)
        .unwrap()
        .iter()
        .map(|s| s.key)
        .collect();
    flip(&file_of(&root, &keys[3]).unwrap(), 777);
    engine.manager().clear_l1();
    let chunk_bytes = payload.len() / 6;
    let mut out = vec![0u8; payload.len()];
    let rr = engine.retrieve(&tokens, None, &mut out).unwrap();
    assert_eq!(rr.hit_tokens, 3 * 16);
    assert_eq!(rr.tiers, vec![1; 3]);
    assert_eq!(out[..3 * chunk_bytes], payload[..3 * chunk_bytes]);
    assert!(
        out[3 * chunk_bytes..].iter().all(|&b| b == 0),
        "bytes of the corrupt chunk (or beyond) left in the output"
    );
    let m = engine.manager();
    assert!(
        keys[..3].iter().all(|k| m.l1_holds(k)),
        "good prefix cached"
    );
    assert!(
        keys[3..].iter().all(|k| !m.l1_holds(k)),
        "cached past the corrupt chunk"
    );
    // The deletion runs in the background.
    let t0 = std::time::Instant::now();
    while file_of(&root, &keys[3]).is_some() && t0.elapsed().as_secs() < 5 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(
        file_of(&root, &keys[3]).is_none(),
        "corrupt file not deleted"
    );
    let disk = engine.stats().tiers[1].clone();
    assert_eq!(disk.name, "disk");
    assert_eq!(disk.checksum_failures, 1, "{disk:?}");
    assert_eq!(disk.details["checksum_failures"], 1);
    // Next time: chunks 0..3 from L1, then a miss at the deleted chunk.
    let rr = engine.retrieve(&tokens, None, &mut out).unwrap();
    assert_eq!((rr.hit_tokens, rr.tiers), (3 * 16, vec![0; 3]));
}

#[test]
fn a_file_swapped_for_another_keys_record_is_rejected() {
    let d = tempdir();
    let root = d.path().join("c");
    let tier = setup(&root, 2);
    let (a, b) = (
        file_of(&root, &key(0)).unwrap(),
        file_of(&root, &key(1)).unwrap(),
    );
    std::fs::copy(&b, &a).unwrap();
    assert_miss_and_removed(&tier, &root, 0, 1);
}

struct Mount(std::path::PathBuf);

/// Mounts a fresh file system of `fstype` under a new temp dir, or `None` when not permitted.
fn mount(fstype: &str, opts: &str) -> Option<(tempfile::TempDir, Mount)> {
    let d = tempfile::tempdir().unwrap();
    let mnt = d.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut cmd = Command::new("mount");
    cmd.args(["-t", fstype]);
    if !opts.is_empty() {
        cmd.args(["-o", opts]);
    }
    let ok = cmd
        .arg(fstype)
        .arg(&mnt)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then(|| (d, Mount(mnt)))
}

#[test]
fn buffered_fallback_where_o_direct_is_rejected() {
    // ramfs rejects O_DIRECT with EINVAL.
    let Some((_d, m)) = mount("ramfs", "") else {
        eprintln!("SKIPPED buffered_fallback_where_o_direct_is_rejected: cannot mount ramfs here (not permitted)");
        return;
    };
    let root = m.0.join("c");
    let l1 = l1(16 << 20);
    {
        let tier = DiskTier::open(DiskTierOptions::new(&root, 64 << 20)).unwrap();
        assert!(
            !tier.stats().direct_io,
            "ramfs rejects O_DIRECT: expected the buffered fallback"
        );
        for i in 0..5 {
            assert_eq!(
                tier.put_blocking(&chunk(&l1, i, LEN + i as usize, None)),
                PutOutcome::Stored
            );
        }
        for i in 0..5 {
            let c = tier.get_blocking(key(i), &l1).unwrap().unwrap();
            assert_eq!(c.payload(), &expected(i, LEN + i as usize)[..]);
        }
    }
    let tier = DiskTier::open(DiskTierOptions::new(&root, 64 << 20)).unwrap();
    assert_eq!(tier.stats().chunks, 5);
    let c = tier.get_blocking(key(3), &l1).unwrap().unwrap();
    assert_eq!(c.payload(), &expected(3, LEN + 3)[..]);
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A device that fills before the budget (here an 8 MiB tmpfs under a 1 GiB budget) used to
/// freeze the tier: every later write failed with ENOSPC and nothing was evicted. Startup now
/// warns that the budget exceeds the file system (`statvfs`), and a write that hits ENOSPC
/// evicts the oldest records and is retried: every put is stored, nothing is damaged.
#[test]
fn enospc_evicts_to_make_room_and_the_tier_keeps_storing() {
    let Some((_d, m)) = mount("tmpfs", "size=8m") else {
        panic!("cannot mount a tmpfs here: this test needs root (CI runs as root)");
    };
    let root = m.0.join("c");
    // Budget far above the device: the device fills first.
    let (tier, log) =
        logs::capture(|| DiskTier::open(DiskTierOptions::new(&root, 1 << 30)).unwrap());
    assert!(
        log.contains("larger than the room on this file system"),
        "no statvfs warning:\n{log}"
    );
    // tmpfs takes O_DIRECT since Linux 6.6; older kernels exercise the fallback here too.
    eprintln!("tmpfs direct_io = {}", tier.stats().direct_io);
    let l1 = l1(32 << 20);
    let (outcomes, log) = logs::capture(|| {
        (0..24u64)
            .map(|i| tier.put_blocking(&chunk(&l1, i, 1 << 20, None)))
            .collect::<Vec<_>>()
    });
    assert!(
        outcomes.iter().all(|o| *o == PutOutcome::Stored),
        "{outcomes:?}\n{log}"
    );
    assert!(log.contains("device is full before the budget"), "{log}");
    let s = tier.stats();
    assert!(
        s.no_space_evictions > 0 && s.evictions >= s.no_space_evictions,
        "{s:?}"
    );
    assert!(s.chunks >= 4, "{s:?}");
    assert_eq!(s.reserved, 0);
    assert_eq!(
        std::fs::read_dir(root.join("tmp")).unwrap().count(),
        0,
        "partial tmp files left"
    );
    assert_eq!(disk_bytes(&root), s.bytes, "index and files agree");
    // The newest chunks are the ones kept, and they read back intact.
    for i in 24 - s.chunks..24 {
        let c = tier.get_blocking(key(i), &l1).unwrap().unwrap();
        assert_eq!(c.payload(), &expected(i, 1 << 20)[..]);
    }
    // A restart over the full device recovers the same set.
    let n = s.chunks;
    drop(tier);
    let tier = DiskTier::open(DiskTierOptions::new(&root, 1 << 30)).unwrap();
    assert_eq!(tier.stats().chunks, n);
}

/// A device filled by someone else's file: nothing of kvtier's to evict, so the put is
/// skipped (not retried forever), and the other file is untouched.
#[test]
fn enospc_with_nothing_to_evict_skips_and_touches_no_other_file() {
    let Some((_d, m)) = mount("tmpfs", "size=4m") else {
        panic!("cannot mount a tmpfs here: this test needs root (CI runs as root)");
    };
    let root = m.0.join("c");
    let tier = DiskTier::open(DiskTierOptions::new(&root, 1 << 30)).unwrap();
    let other = m.0.join("someone-elses.bin");
    let filler = vec![7u8; 64 << 10];
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&other).unwrap();
        while f.write_all(&filler).is_ok() {}
    }
    let size = std::fs::metadata(&other).unwrap().len();
    let l1 = l1(8 << 20);
    assert_eq!(
        tier.put_blocking(&chunk(&l1, 1, 1 << 20, None)),
        PutOutcome::Skipped("disk full")
    );
    assert_eq!(std::fs::metadata(&other).unwrap().len(), size);
    std::fs::remove_file(&other).unwrap();
    assert_eq!(
        tier.put_blocking(&chunk(&l1, 1, 1 << 20, None)),
        PutOutcome::Stored
    );
}
