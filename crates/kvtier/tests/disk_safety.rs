//! The disk tier only ever deletes files it created (issue 12, rows 1 and 7): a directory
//! it cannot tell is its own is refused and left as it was, foreign files in its own
//! directory are left alone, a directory of an older kvtier is adopted, a file too large to
//! be a record never counts toward the budget, and what startup evicts is logged.

#[path = "support/disk_util.rs"]
mod util;

#[path = "support/log_capture.rs"]
mod logs;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use kvtier::keys::ModelIdentity;
use kvtier::layout::{Dtype, KvLayout};
use kvtier::tier::{inspect_disk, DiskTier, DiskTierOptions, PutOutcome};
use kvtier::{Engine, EngineConfig};
use util::*;

const MARKER: &str = "kvtier-disk.json";
const LEN: usize = 50_000;

/// Writes `text` to `root/rel`, creating parent directories.
fn plant(root: &Path, rel: &str, text: &str) -> PathBuf {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, text).unwrap();
    p
}

/// Every path under `root` (files and directories), relative, sorted.
fn listing(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(root).unwrap().display().to_string());
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

fn legacy_plus(listing: &[String], extra: &str) -> Vec<String> {
    let mut v = listing.to_vec();
    v.push(extra.to_string());
    v.sort();
    v
}

fn store(tier: &DiskTier, ids: std::ops::Range<u64>) {
    let l1 = l1(16 << 20);
    for i in ids {
        assert_eq!(
            tier.put_blocking(&chunk(&l1, i, LEN, None)),
            PutOutcome::Stored
        );
    }
}

/// `local_disk: /home/user` used to empty `~/tmp` and delete non-records in two-hex-digit
/// folders. Now the directory is refused, with its path and what to do, and left as it was.
#[test]
fn a_directory_that_is_not_kvtiers_is_refused_and_left_untouched() {
    let d = tempdir();
    let home = d.path().join("home");
    plant(&home, "tmp/notes.txt", "mine");
    plant(&home, "ab/holiday.jpg", "mine");
    plant(&home, "Documents/cv.pdf", "mine");
    // Even a file named like a kvtier record does not make the directory kvtier's.
    plant(&home, &format!("cd/{}.none.kvr", key(1).to_hex()), "mine");
    let before = listing(&home);
    let e = DiskTier::open(DiskTierOptions::new(&home, 64 << 20))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&home.display().to_string())
            && e.contains("not a kvtier directory")
            && e.contains(MARKER)
            && e.contains("point local_disk at a new or empty directory"),
        "{e}"
    );
    assert_eq!(listing(&home), before, "nothing created or deleted");

    // The same through the engine config, as a user would write it.
    let cfg = EngineConfig::from_yaml_str(&format!(
        "local_disk: {}\nmax_local_disk_size: 64MiB\nmax_local_cpu_size: 4MiB\nlocal_cpu_huge_pages: false\n",
        home.display()
    ))
    .unwrap();
    let id = ModelIdentity::new("m", KvLayout::simple(2, 2, 16, Dtype::F16));
    let e = Engine::new(cfg, id).unwrap_err().to_string();
    assert!(e.contains("not a kvtier directory"), "{e}");
    assert_eq!(listing(&home), before);

    // `kvtier inspect` says so too.
    let e = inspect_disk(&home, false, |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a kvtier directory"), "{e}");
    let empty = d.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = inspect_disk(&empty, false, |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a kvtier directory"), "{e}");
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0);
}

/// First use writes the marker (a layout version and a note). Files that turn up later in a
/// kvtier directory and that kvtier did not name are left alone; its own leftovers go.
#[test]
fn the_marker_is_written_on_first_use_and_only_kvtier_named_files_are_removed() {
    let d = tempdir();
    // An empty existing directory is fine too (e.g. a fresh mount point).
    let root = d.path().join("c");
    std::fs::create_dir(&root).unwrap();
    std::fs::create_dir(root.join("lost+found")).unwrap();
    let tier = DiskTier::open(DiskTierOptions::new(&root, 64 << 20)).unwrap();
    let marker: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join(MARKER)).unwrap()).unwrap();
    assert_eq!(marker["kvtier_disk_layout"], 1, "{marker}");
    assert!(marker["note"].as_str().unwrap().contains("kvtier"));
    store(&tier, 0..3);
    drop(tier);

    let foreign = [
        plant(&root, "tmp/notes.txt", "mine"),
        plant(&root, "tmp/partial.123", "mine"),
        plant(&root, "ab/holiday.jpg", "mine"),
        plant(&root, "ab/not-a-record.kvr", "mine"),
        plant(
            &root,
            &format!("{}/{}.none.kvr.bak", &key(0).to_hex()[..2], key(0).to_hex()),
            "mine",
        ),
        plant(&root, "README.txt", "mine"),
        plant(&root, "lost+found/x", "fsck's"),
    ];
    // kvtier's own: a write the process died in, a record of the older layout, a record in
    // the wrong shard.
    let tmp = plant(
        &root,
        &format!("tmp/{}.0123456789abcdef", key(7).to_hex()),
        "x",
    );
    let old = format!("{}.none.kvc", key(8).to_hex());
    let old = plant(&root, &format!("{}/{old}", &old[..2]), "x");
    let misplaced = format!("{}.none.kvr", key(9).to_hex());
    let shard = if &misplaced[..2] == "00" { "01" } else { "00" };
    let misplaced = plant(&root, &format!("{shard}/{misplaced}"), "x");

    let tier = DiskTier::open(DiskTierOptions::new(&root, 64 << 20)).unwrap();
    let s = tier.stats();
    assert_eq!(s.chunks, 3, "{s:?}");
    assert_eq!(s.recovery_removed, 3, "{s:?}");
    for p in &foreign {
        assert!(p.exists(), "{} deleted", p.display());
    }
    for p in [&tmp, &old, &misplaced] {
        assert!(!p.exists(), "{} left", p.display());
    }
    // Clear and eviction only ever delete records.
    futures::executor::block_on(kvtier::tier::Tier::clear(&tier)).unwrap();
    for p in &foreign {
        assert!(p.exists(), "{} deleted by clear", p.display());
    }
    let rep = inspect_disk(&root, false, |_, _| {}).unwrap();
    assert_eq!(rep.chunks, 0);
}

/// A directory made by kvtier before the marker existed (only kvtier's layout inside) keeps
/// working: adopted, every chunk recovered, the marker added. One foreign file in it, and it
/// is refused like any other directory.
#[test]
fn a_directory_of_an_older_kvtier_is_adopted_but_not_one_with_foreign_files() {
    let d = tempdir();
    let root = d.path().join("c");
    store(
        &DiskTier::open(DiskTierOptions::new(&root, 64 << 20)).unwrap(),
        0..4,
    );
    // What an older build leaves: no marker, a tmp leftover, a record of the older layout.
    let _ = std::fs::remove_file(root.join(MARKER));
    plant(
        &root,
        &format!("tmp/{}.00000000000000ff", key(5).to_hex()),
        "x",
    );
    let old = format!("{}.none.kvc", key(6).to_hex());
    plant(&root, &format!("{}/{old}", &old[..2]), "x");
    let legacy = listing(&root);

    let with_foreign = d.path().join("c2");
    std::fs::create_dir(&with_foreign).unwrap();
    for rel in &legacy {
        let (src, dst) = (root.join(rel), with_foreign.join(rel));
        if src.is_dir() {
            std::fs::create_dir_all(&dst).unwrap();
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
    let photo = plant(&with_foreign, "tmp/photo.jpg", "mine");
    let e = DiskTier::open(DiskTierOptions::new(&with_foreign, 64 << 20))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("not a kvtier directory") && e.contains("photo.jpg"),
        "{e}"
    );
    assert!(photo.exists());
    assert_eq!(
        listing(&with_foreign),
        legacy_plus(&legacy, "tmp/photo.jpg")
    );

    // An older kvtier's directory still reads as kvtier's (no marker yet).
    let rep = inspect_disk(&root, false, |_, _| {}).unwrap();
    assert_eq!(rep.chunks, 4);
    let tier = DiskTier::open(DiskTierOptions::new(&root, 64 << 20)).unwrap();
    let s = tier.stats();
    assert_eq!((s.chunks, s.recovery_removed), (4, 2), "{s:?}");
    assert!(root.join(MARKER).is_file(), "marker added on adoption");
    let l1 = l1(16 << 20);
    let c = tier.get_blocking(key(2), &l1).unwrap().unwrap();
    assert_eq!(c.payload(), &expected(2, LEN)[..]);
}

/// Runs `script` with `sh -c` as user `nobody` (uid/gid 65534), in `dir`.
fn as_nobody(dir: &Path, script: &str) {
    let st = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
            script,
        ])
        .current_dir(dir)
        .status()
        .expect("setpriv (util-linux) runs the unprivileged part of this test");
    assert!(st.success(), "as nobody: {script}");
}

/// Running as root (CI does), kvtier refuses a directory another user owns, even with a
/// forged marker (that user could read every tenant's KV there, and plant or swap files),
/// and a directory every user can write.
#[test]
fn a_directory_owned_or_writable_by_another_user_is_refused() {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test needs root (CI runs as root) to act as a second, unprivileged user");
    }
    // A world-writable, sticky scratch directory like /tmp.
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    as_nobody(
        d.path(),
        "mkdir cache && mkdir cache/tmp && printf '{\"kvtier_disk_layout\": 1}' > cache/kvtier-disk.json",
    );
    let planted = d.path().join("cache");
    let before = listing(&planted);
    let e = DiskTier::open(DiskTierOptions::new(&planted, 64 << 20))
        .unwrap_err()
        .to_string();
    assert!(e.contains("uid 65534") && e.contains("belongs to"), "{e}");
    assert_eq!(listing(&planted), before, "nothing written into it");

    // Root's own directory, but a marker planted by someone else: refused too.
    let shared = d.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let e = DiskTier::open(DiskTierOptions::new(&shared, 64 << 20))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("writable by every user") && e.contains("chmod o-w"),
        "{e}"
    );
    as_nobody(
        &shared,
        "printf '{\"kvtier_disk_layout\": 1}' > kvtier-disk.json",
    );
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
    let e = DiskTier::open(DiskTierOptions::new(&shared, 64 << 20))
        .unwrap_err()
        .to_string();
    assert!(e.contains("marker") && e.contains("uid 65534"), "{e}");

    // A directory kvtier creates is private to its user, and so are its records.
    let mine = d.path().join("mine");
    store(
        &DiskTier::open(DiskTierOptions::new(&mine, 64 << 20)).unwrap(),
        0..1,
    );
    let mode = std::fs::metadata(&mine).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    let rec = file_of(&mine, &key(0)).unwrap();
    assert_eq!(
        std::fs::metadata(rec).unwrap().permissions().mode() & 0o077,
        0
    );
}

/// One junk file named like a chunk, larger than any record could be, made startup evict
/// every valid chunk "down to budget". Now it is rejected at the scan and never counted; it
/// is deleted only when its header proves kvtier wrote it (a record staged through a larger
/// L1 pool than today's), and a stranger's file with a record's name is left where it is.
#[test]
fn a_file_larger_than_any_record_is_rejected_at_scan_not_counted() {
    let d = tempdir();
    let root = d.path().join("c");
    let budget = 8u64 << 20;
    let tier = DiskTier::open(DiskTierOptions::new(&root, budget)).unwrap();
    store(&tier, 0..5);
    // A whole 1 MiB record of kvtier's, written while the L1 pool allowed it.
    let l1 = l1(16 << 20);
    assert_eq!(
        tier.put_blocking(&chunk(&l1, 5, 1 << 20, None)),
        PutOutcome::Stored
    );
    drop(tier);
    let big = file_of(&root, &key(5)).unwrap();
    // Sparse: costs no space, but its size is twice the budget.
    let junk = root
        .join(&key(99).to_hex()[..2])
        .join(format!("{}.none.kvr", key(99).to_hex()));
    std::fs::File::create(&junk)
        .unwrap()
        .set_len(2 * budget)
        .unwrap();
    // Reopened with a pool that holds at most 256 KiB per chunk.
    let opts = DiskTierOptions {
        max_payload: 256 << 10,
        ..DiskTierOptions::new(&root, budget)
    };
    let (tier, log) = logs::capture(|| DiskTier::open(opts).unwrap());
    let s = tier.stats();
    assert_eq!(s.chunks, 5, "valid chunks kept: {s:?}\n{log}");
    assert_eq!(s.evictions, 0, "{s:?}");
    assert_eq!(s.recovery_removed, 1, "{s:?}");
    assert!(!tier.contains(&key(99)) && !tier.contains(&key(5)));
    assert!(
        junk.exists(),
        "a file kvtier cannot prove it wrote is left in place"
    );
    assert!(
        !big.exists(),
        "kvtier's own record that no longer fits is deleted"
    );
    let junk_len = std::fs::metadata(&junk).unwrap().len();
    assert_eq!(s.bytes, disk_bytes(&root) - junk_len, "{s:?}");
    assert!(
        log.contains("larger than any record")
            && log.contains(&key(99).to_hex())
            && log.contains("left in place"),
        "{log}"
    );
}

/// A lowered budget evicts down to it at startup: the log says how many, how many bytes, and
/// why (it said `removed=0` before).
#[test]
fn startup_eviction_down_to_a_lowered_budget_is_logged() {
    let d = tempdir();
    let root = d.path().join("c");
    store(
        &DiskTier::open(DiskTierOptions::new(&root, 64 << 20)).unwrap(),
        0..6,
    );
    let file = 4096 + (LEN as u64).div_ceil(4096) * 4096;
    let (tier, log) =
        logs::capture(|| DiskTier::open(DiskTierOptions::new(&root, 2 * file)).unwrap());
    assert_eq!(tier.stats().chunks, 2);
    let line = log
        .lines()
        .find(|l| l.contains("exceed the budget"))
        .unwrap_or_else(|| panic!("no eviction line in:\n{log}"));
    assert!(
        line.contains("evicted=4") && line.contains(&format!("evicted_bytes={}", 4 * file)),
        "{line}"
    );
}

/// A budget smaller than one chunk used to be accepted and every store silently skipped:
/// the engine refuses it for its model, and a chunk larger than a budget is warned about.
#[test]
fn a_budget_smaller_than_one_chunk_is_an_error_or_a_warning_not_silence() {
    let d = tempdir();
    let id = ModelIdentity::new("m", KvLayout::simple(4, 4, 64, Dtype::F16));
    // 256 tokens x 4 KiB = 1 MiB per chunk; 512 KiB of disk cannot hold one.
    let cfg = EngineConfig::from_yaml_str(&format!(
        "chunk_size: 256\nlocal_disk: {}\nmax_local_disk_size: 512KiB\nmax_local_cpu_size: 8MiB\nlocal_cpu_huge_pages: false\n",
        d.path().join("c").display()
    ))
    .unwrap();
    let e = Engine::new(cfg, id).unwrap_err().to_string();
    assert!(
        e.contains("max_local_disk_size") && e.contains("one chunk") && e.contains("raise it"),
        "{e}"
    );

    let tier = DiskTier::open(DiskTierOptions::new(d.path().join("t"), 64 << 10)).unwrap();
    let l1 = l1(16 << 20);
    let (r, log) = logs::capture(|| tier.put_blocking(&chunk(&l1, 1, 1 << 20, None)));
    assert_eq!(r, PutOutcome::Skipped("disk full"));
    assert!(
        log.contains("never stored") && log.contains("max_local_disk_size"),
        "{log}"
    );
}
