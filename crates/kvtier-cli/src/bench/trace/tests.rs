use clap::Parser;

use super::*;

/// A small conversation-like trace: a shared system block, `convs` conversations that come
/// back in turn every third request (each turn adds two blocks, up to `turns`), and
/// one-time prompts of 7 blocks in between.
fn conversations(requests: u32, convs: u32, turns: u32) -> String {
    let mut text = String::from("# generated\n");
    let mut fresh = 0;
    for r in 0..requests {
        text.push_str(&format!("{} sys", r * 100));
        if r % 3 == 0 {
            let c = (r / 3) % convs;
            let turn = r / (3 * convs);
            for t in 0..=turn.min(turns) {
                text.push_str(&format!(" c{c}u{t} c{c}a{t}"));
            }
            text.push_str(" +5\n");
        } else {
            fresh += 1;
            for j in 0..6 {
                text.push_str(&format!(" f{fresh}b{j}"));
            }
            text.push('\n');
        }
    }
    text
}

fn trace(requests: u32) -> Trace {
    Trace::parse(&conversations(requests, 10, 4), TraceFormat::Simple, 16).unwrap()
}

fn l1_only(policy: PolicyKind, blocks: u64) -> Setup {
    Setup {
        base: EngineConfig {
            cache_policy: policy,
            ..EngineConfig::default()
        },
        l1_blocks: blocks,
        disk: None,
        speed: None,
    }
}

#[test]
fn the_engine_makes_the_decisions_of_the_offline_model_of_its_policy() {
    // The replay goes through the real engine (retrieve, store, L1 pool and policy); the
    // offline simulation drives the same policy through the trait. Equal hits mean the
    // engine's budget in blocks and its call sequence are what the offline model assumes
    // (for prefix-lrfu this includes the prompt reports the engine sends on store).
    let t = trace(300);
    for kind in PolicyKind::ALL {
        let e = replay::replay(&t, &l1_only(kind, 40)).unwrap();
        let o = offline::simulate(&t, 40, kind, false);
        assert_eq!(e.references, o.references);
        assert_eq!(e.hits_per_tier, vec![o.hits], "{kind}");
        assert_eq!(e.written_chunks.len(), 1);
    }
}

#[test]
fn prefix_lrfu_beats_lru_and_stays_under_opt() {
    // Five conversations of up to 7 blocks come back every 15 requests; 40 blocks hold
    // them all, but LRU's window is 6 requests: it keeps only the newest prompts.
    let t = Trace::parse(&conversations(600, 5, 2), TraceFormat::Simple, 16).unwrap();
    let lru = replay::replay(&t, &l1_only(PolicyKind::Lru, 40)).unwrap();
    let new = replay::replay(&t, &l1_only(PolicyKind::PrefixLrfu, 40)).unwrap();
    let opt = offline::belady(&t, 40, false);
    assert!(
        new.hit_rate() > 2.0 * lru.hit_rate(),
        "prefix-lrfu {} vs LRU {}",
        new.hit_rate(),
        lru.hit_rate()
    );
    assert!(new.hit_rate() <= opt.rate());
}

#[test]
fn a_disk_tier_serves_hits_and_counts_its_writes() {
    let t = trace(300);
    let dir = tempfile::tempdir().unwrap();
    let mut setup = l1_only(PolicyKind::PrefixLrfu, 20);
    setup.disk = Some((60, dir.path().join("disk")));
    let r = replay::replay(&t, &setup).unwrap();
    assert_eq!(r.tiers, vec!["cpu".to_string(), "disk".to_string()]);
    assert!(r.hits_per_tier[1] > 0, "{r:?}");
    assert!(r.written_chunks[1] > 0 && r.written_bytes[1] == r.written_chunks[1] * 4096);
    assert!(r.write_backs[1] > 0, "disk hits are promoted into L1");
    let opt = offline::belady(&t, 80, false);
    assert!(r.hits_per_tier.iter().sum::<u64>() <= opt.hits);
    // Writes are sliced to the queue's limit and drained: none is dropped for a full queue.
    assert!(!r.store_skipped.contains_key("disk/queue_full"), "{r:?}");
    assert!(
        r.store_skipped
            .get("disk/not admitted")
            .is_some_and(|&n| n > 0),
        "{r:?}"
    );
}

#[test]
fn timestamps_are_honoured_with_speed() {
    let t = trace(20); // 20 requests, 100 ms apart
    let mut setup = l1_only(PolicyKind::Lru, 40);
    setup.speed = Some(10.0); // 1.9 s of trace in 0.19 s
    let r = replay::replay(&t, &setup).unwrap();
    assert!(r.secs >= 0.19, "{}", r.secs);
    assert!(r.late_ms.is_some());
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    bench: BenchArgs,
}

#[test]
fn command_line() {
    let a = Cli::parse_from([
        "kvtier",
        "trace",
        "--file",
        "t.jsonl",
        "--blocks",
        "1000,4000",
        "--disk",
        "--policy",
        "lru",
        "--speed",
        "2",
    ])
    .bench;
    assert_eq!(a.workload, super::super::WorkloadKind::Trace);
    assert_eq!(a.trace.blocks, vec![1000, 4000]);
    assert!(a.trace.disk);
    assert_eq!(a.trace.policy, Some(PolicyKind::Lru));
    assert_eq!(a.trace.speed, Some(2.0));
    let e = run(&Cli::parse_from(["kvtier", "trace"]).bench).unwrap_err();
    assert!(e.to_string().contains("--file"), "{e}");
}

#[test]
fn run_writes_a_json_report_for_a_simple_trace() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("t.txt");
    std::fs::write(&f, conversations(60, 10, 4)).unwrap();
    let f = f.to_str().unwrap();
    let a = Cli::parse_from([
        "kvtier",
        "trace",
        "--file",
        f,
        "--block-tokens",
        "16",
        "--blocks",
        "20,40",
        "--json",
    ])
    .bench;
    run(&a).unwrap();
}

#[test]
fn every_run_has_its_policy_with_the_reuse_oracle_before_opt() {
    let t = trace(120);
    let a = Cli::parse_from(["kvtier", "trace", "--file", "t.txt"]).bench;
    let base = EngineConfig {
        cache_policy: PolicyKind::PrefixLrfu,
        ..EngineConfig::default()
    };
    let run = run_one(&t, &base, &a.trace, 30, None).unwrap();
    let names: Vec<&str> = run.offline.iter().map(|o| o.0.as_str()).collect();
    assert_eq!(
        names,
        ["lru", "s3fifo", "prefix-lrfu", "prefix-lrfu+oracle", "opt"]
    );
    // The one-time prompts of the generated trace are not stored: the oracle hits more.
    let (plain, oracle, opt) = (run.offline[2].1, run.offline[3].1, run.offline[4].1);
    assert!(
        plain.hits < oracle.hits && oracle.hits <= opt.hits,
        "{run:?}"
    );
}
