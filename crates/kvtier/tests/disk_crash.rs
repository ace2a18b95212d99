//! Crash safety: a child process (this test binary, re-executed) writes chunks to a disk
//! tier and prints every acknowledged key; the parent SIGKILLs it at a random moment, then
//! reopens the directory and checks that every acknowledged chunk is there with the right
//! bytes and that nothing returns wrong bytes.
//!
//! The soak runs many more kills (`KVTIER_SOAK_ITERS`, default 2000):
//! `cargo test -p kvtier --test disk_crash -- --ignored --exact sigkill_soak`.

#[path = "support/process.rs"]
mod process;
#[path = "support/disk_util.rs"]
mod util;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kvtier::tier::DiskDurability;
use kvtier::tier::{DiskTier, DiskTierOptions, PutOutcome};
use rand::Rng;
use util::*;

const CHILD_DIR_ENV: &str = "KVTIER_CRASH_CHILD_DIR";
const CHILD_BASE_ENV: &str = "KVTIER_CRASH_CHILD_BASE";
/// Set (to anything) when the child acknowledges without flushing (`process_crash`).
const CHILD_NO_FLUSH_ENV: &str = "KVTIER_CRASH_CHILD_NO_FLUSH";
const MAX_LEN: usize = 200_000;
const BUDGET: u64 = 1 << 36;
const WRITERS: u64 = 3;

/// The writer child: the process the `sigkill_*` tests start and kill (this binary run with
/// `--ignored --exact crash_child_writer`). Ignored so it never counts as a passing test; it
/// does nothing when run by hand without the parent's environment.
#[test]
#[ignore = "child process of the sigkill_* tests, which run it"]
fn crash_child_writer() {
    let Ok(dir) = std::env::var(CHILD_DIR_ENV) else {
        eprintln!("crash_child_writer: only the sigkill_* tests run it ({CHILD_DIR_ENV} unset)");
        return;
    };
    let base: u64 = std::env::var(CHILD_BASE_ENV).unwrap().parse().unwrap();
    let durability = if std::env::var_os(CHILD_NO_FLUSH_ENV).is_some() {
        DiskDurability::ProcessCrash
    } else {
        DiskDurability::PowerLoss
    };
    let opts = DiskTierOptions {
        durability,
        ..DiskTierOptions::new(&dir, BUDGET)
    };
    let tier = std::sync::Arc::new(DiskTier::open(opts).unwrap());
    let l1 = std::sync::Arc::new(l1(64 << 20));
    println!("READY");
    let threads: Vec<_> = (0..WRITERS)
        .map(|t| {
            let (tier, l1) = (tier.clone(), l1.clone());
            std::thread::spawn(move || {
                for j in 0.. {
                    let i = base + t * 1_000_000 + j;
                    let c = chunk(&l1, i, len_of(i, MAX_LEN), None);
                    println!("START {i}");
                    if tier.put_blocking(&c) == PutOutcome::Stored {
                        println!("ACK {i}");
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

struct Iteration {
    acked: Vec<u64>,
    started: BTreeSet<u64>,
}

fn run_child(dir: &Path, base: u64, rng: &mut impl Rng, no_flush: bool) -> Iteration {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    if no_flush {
        cmd.env(CHILD_NO_FLUSH_ENV, "1");
    }
    cmd.args([
        "--ignored",
        "--exact",
        "crash_child_writer",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_DIR_ENV, dir)
    .env(CHILD_BASE_ENV, base.to_string())
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    let mut child = process::ChildGuard::spawn(&mut cmd).unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Kill either during start-up/recovery (sometimes) or while writes are under way.
    let before_ready = rng.random_bool(0.1);
    let delay = Duration::from_micros(rng.random_range(0..120_000));
    let t0 = Instant::now();
    let mut lines = Vec::new();
    if !before_ready {
        // Wait for READY (bounded).
        while t0.elapsed() < Duration::from_secs(10) {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(l) => {
                    let ready = l.ends_with("READY");
                    lines.push(l);
                    if ready {
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(_) => break,
            }
        }
    }
    std::thread::sleep(delay);
    // SIGKILL: no destructors, no flushing.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGKILL);
    }
    let _ = child.wait();
    reader.join().unwrap();
    lines.extend(rx.try_iter());
    let mut acked = Vec::new();
    let mut started = BTreeSet::new();
    for l in lines {
        if let Some(i) = l.strip_prefix("ACK ") {
            acked.push(i.trim().parse().unwrap());
        } else if let Some(i) = l.strip_prefix("START ") {
            started.insert(i.trim().parse().unwrap());
        }
    }
    Iteration { acked, started }
}

fn crash_iterations(iters: u64, time_limit: Duration, no_flush: bool) {
    let d = tempdir();
    let dir = d.path().join("cache");
    let mut rng = rand::rng();
    let l1 = l1(64 << 20);
    let mut all_acked: Vec<u64> = Vec::new();
    let t0 = Instant::now();
    let mut done = 0;
    let mut kills_mid_write = 0u64;
    for it in 0..iters {
        if t0.elapsed() > time_limit {
            break;
        }
        let base = (it + 1) * 10_000_000;
        let t_it = Instant::now();
        let res = run_child(&dir, base, &mut rng, no_flush);
        let t_child = t_it.elapsed();
        // Reopen (recovery) and check.
        let tier = DiskTier::open(DiskTierOptions::new(&dir, BUDGET)).unwrap();
        let t_open = t_it.elapsed();
        for &i in &res.acked {
            let c = tier
                .get_blocking(key(i), &l1)
                .unwrap()
                .unwrap_or_else(|| panic!("iteration {it}: acknowledged chunk {i} lost"));
            assert_eq!(
                c.payload(),
                &expected(i, len_of(i, MAX_LEN))[..],
                "iteration {it}: chunk {i} bytes"
            );
        }
        // Chunks started but not acknowledged: either absent or exactly right.
        let acked: BTreeSet<u64> = res.acked.iter().copied().collect();
        for &i in res.started.difference(&acked) {
            if let Some(c) = tier.get_blocking(key(i), &l1).unwrap() {
                assert_eq!(
                    c.payload(),
                    &expected(i, len_of(i, MAX_LEN))[..],
                    "iteration {it}: chunk {i} bytes"
                );
            }
        }
        kills_mid_write += u64::from(res.started.len() > res.acked.len());
        let s = tier.stats();
        assert_eq!(
            s.checksum_failures, 0,
            "iteration {it}: a committed file was torn: {s:?}"
        );
        assert_eq!(
            std::fs::read_dir(dir.join("tmp")).unwrap().count(),
            0,
            "tmp files left after recovery"
        );
        if std::env::var("KVTIER_CRASH_DEBUG").is_ok() {
            eprintln!(
                "it {it}: child {t_child:?} open {t_open:?} total {:?} acked {} started {}",
                t_it.elapsed(),
                res.acked.len(),
                res.started.len()
            );
        }
        all_acked.extend(res.acked);
        done += 1;
        // Keep the directory from growing without bound: clear every 20 iterations.
        if it % 20 == 19 {
            for &i in &all_acked {
                let c = tier
                    .get_blocking(key(i), &l1)
                    .unwrap()
                    .expect("acknowledged chunk kept");
                assert_eq!(c.payload(), &expected(i, len_of(i, MAX_LEN))[..]);
            }
            all_acked.clear();
            futures::executor::block_on(kvtier::tier::Tier::clear(&tier)).unwrap();
        }
    }
    eprintln!(
        "crash test: {done} SIGKILLed writers in {:?}, {kills_mid_write} killed with writes in flight",
        t0.elapsed()
    );
    assert!(done >= iters.min(100), "only {done} iterations ran");
    assert!(
        kills_mid_write * 2 >= done,
        "most kills should land mid-write ({kills_mid_write}/{done})"
    );
}

#[test]
fn sigkill_at_random_moments_never_loses_acknowledged_chunks() {
    crash_iterations(100, Duration::from_secs(55), false);
}

/// `local_disk_durability: process_crash` (the default) acknowledges before any flush: a
/// killed process must still lose nothing acknowledged (the kernel holds the data).
#[test]
fn sigkill_without_flushing_never_loses_acknowledged_chunks() {
    crash_iterations(100, Duration::from_secs(40), true);
}

#[test]
#[ignore = "soak, up to an hour: --ignored --exact sigkill_soak"]
fn sigkill_soak() {
    let iters = std::env::var("KVTIER_SOAK_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    crash_iterations(iters, Duration::from_secs(3600), false);
}
