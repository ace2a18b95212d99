//! Runs the built `kvtier` binary on a small long-doc-qa workload and checks its JSON.

use std::process::Command;

use serde_json::Value;

/// Looks up a dotted path such as `results.hit_rate`.
fn get<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(v, |v, k| &v[k])
}

#[test]
fn long_doc_qa_json_has_the_documented_keys() {
    let out = Command::new(env!("CARGO_BIN_EXE_kvtier"))
        .args(["bench", "long-doc-qa", "--model", "tiny", "--l1-gb", "0.05"])
        .args(["--docs", "6", "--doc-tokens", "2048", "--json"])
        // Keep the run independent of the caller's engine config.
        .env_remove("KVTIER_CONFIG_FILE")
        .output()
        .expect("running kvtier");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kvtier failed: {stderr}");
    let json: Value =
        serde_json::from_slice(&out.stdout).expect("stdout must be exactly one JSON object");
    assert_eq!(json["workload"], "long-doc-qa");

    for key in [
        "config.model",
        "config.layout",
        "config.chunk_bytes",
        "config.l1_bytes",
        "config.docs",
        "config.doc_tokens",
        "config.queries",
        "baseline.memcpy_gbps",
        "results.store_gbps",
        "results.retrieve_gbps",
        "results.lookup_p50_us",
        "results.lookup_p99_us",
        "results.hit_rate",
        "results.write_backs",
        "results.evictions",
        "results.lookup_128k_p50_us",
        "results.lookup_128k_p99_us",
        "results.probe_512_p50_us",
        "results.probe_512_p99_us",
    ] {
        assert!(
            get(&json, key).is_number() || get(&json, key).is_string(),
            "missing {key}"
        );
    }
    assert!(get(&json, "results.tier_hits").is_object());
    for key in [
        "ratios.store",
        "ratios.retrieve",
        "baseline.memcpy_gbps",
        "results.store_gbps",
    ] {
        let x = get(&json, key)
            .as_f64()
            .unwrap_or_else(|| panic!("{key} is not a number"));
        assert!(x.is_finite() && x > 0.0, "{key} = {x}");
    }
    let hit_rate = get(&json, "results.hit_rate").as_f64().unwrap();
    assert!((0.0..=1.0).contains(&hit_rate), "hit_rate = {hit_rate}");
    assert_eq!(get(&json, "config.docs").as_u64(), Some(6));
}

#[test]
fn disk_json_has_the_issue_keys_and_every_round_hits_every_chunk() {
    let json = run_disk_bench(&[]);
    assert_eq!(json["config"]["durability"], "process_crash");
    for key in [
        "baseline.disk_write_gbps",
        "baseline.disk_write_durable_gbps",
        "baseline.disk_read_gbps",
        "results.disk_write_gbps",
        "results.disk_read_gbps",
        "ratios.disk_write",
        "ratios.disk_write_vs_durable",
        "ratios.disk_read",
        "spread.ratio_disk_read.min",
        "spread.ratio_disk_read.max",
    ] {
        let x = get(&json, key)
            .as_f64()
            .unwrap_or_else(|| panic!("{key} is not a number"));
        assert!(x.is_finite() && x > 0.0, "{key} = {x}");
    }
    let rounds = json["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 2);
    // Alternating order, so neither pass always gets the device's fresh write cache.
    assert_ne!(rounds[0]["baseline_first"], rounds[1]["baseline_first"]);
    assert_every_chunk_stored_and_hit(&json);
}

/// `--disk-only` (L1 only stages I/O): every chunk of the growing prompts is written once and
/// found after the restart; none is dropped by the write queue.
#[test]
fn disk_only_bench_stores_and_hits_every_chunk() {
    let json = run_disk_bench(&["--disk-only"]);
    assert_eq!(json["config"]["disk_only"], true);
    assert_every_chunk_stored_and_hit(&json);
}

fn run_disk_bench(extra: &[&str]) -> Value {
    let dir = std::env::temp_dir().join(format!(
        "kvtier-bench-disk-test-{}-{}",
        std::process::id(),
        extra.len()
    ));
    let out = Command::new(env!("CARGO_BIN_EXE_kvtier"))
        .args(["bench", "disk", "--model", "tiny", "--docs", "2"])
        .args(["--doc-tokens", "1024", "--reps", "2", "--json"])
        .args(extra)
        .arg("--disk-dir")
        .arg(&dir)
        .env_remove("KVTIER_CONFIG_FILE")
        .env_remove("KVTIER_LOCAL_DISK_DURABILITY")
        .output()
        .expect("running kvtier");
    std::fs::remove_dir_all(&dir).ok();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kvtier failed: {stderr}");
    let json: Value =
        serde_json::from_slice(&out.stdout).expect("stdout must be exactly one JSON object");
    assert_eq!(json["workload"], "disk");
    json
}

fn assert_every_chunk_stored_and_hit(json: &Value) {
    for r in json["rounds"].as_array().expect("rounds") {
        let res = &r["results"];
        assert_eq!(res["chunks_acknowledged"].as_u64(), Some(8), "{r}");
        assert_eq!(res["chunks_skipped"].as_u64(), Some(0), "{r}");
        assert_eq!(res["restart_hit_rate"].as_f64(), Some(1.0), "{r}");
        assert_eq!(res["verified_chunks"].as_u64(), Some(8), "{r}");
    }
}

#[path = "../../kvtier/tests/support/prereq.rs"]
mod prereq;

/// Runs `kvtier` with `args` and a clean engine environment; returns (success, stdout, stderr).
/// `p[key]` holds one positive figure per round, `rounds` of them.
fn assert_positive_per_round(p: &Value, key: &str, rounds: usize) {
    let v = p[key].as_array().unwrap_or_else(|| panic!("{key}: {p}"));
    assert_eq!(v.len(), rounds, "one figure per round: {p}");
    assert!(v.iter().all(|x| x.as_f64().unwrap() > 0.0), "{key}: {p}");
}

/// `p[key]` is a spread of positive figures: 0 < min <= median <= max.
fn assert_ordered_spread(p: &Value, key: &str) {
    let s = &p[key];
    let (lo, mid, hi) = (
        s["min"].as_f64().unwrap(),
        s["median"].as_f64().unwrap(),
        s["max"].as_f64().unwrap(),
    );
    assert!(0.0 < lo && lo <= mid && mid <= hi, "{key}: {p}");
}

fn kvtier(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvtier"));
    cmd.args(args)
        .env_remove("KVTIER_CONFIG_FILE")
        .env_remove("KVTIER_MAX_LOCAL_CPU_SIZE")
        .env_remove("KVTIER_LOG")
        .env_remove("NO_COLOR");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("running kvtier");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `--model tiny` with no size flags is a quick run on a 64 MiB L1; its table ends with the
/// legend; logs going to a pipe carry no ANSI colour codes; stray `KVTIER_*` variables (the
/// comparison's venv, a typo) only warn.
#[test]
fn tiny_default_run_is_small_explained_plain_and_survives_stray_variables() {
    let (ok, stdout, stderr) = kvtier(
        &["bench", "long-doc-qa", "--model", "tiny"],
        &[
            ("KVTIER_COMPARE_VENV", "/nonexistent/venv"),
            ("KVTIER_CHUNK_SIZ", "64"),
        ],
    );
    assert!(ok, "kvtier failed: {stderr}");
    let l1 = stdout
        .lines()
        .find(|l| l.starts_with("L1 "))
        .unwrap_or_else(|| panic!("no L1 row: {stdout}"));
    assert!(l1.contains("64.00 MiB"), "{l1}");
    assert!(stdout.contains("What the figures mean"), "{stdout}");
    for figure in ["memcpy baseline", "hit rate", "restores", "write-backs"] {
        let explained = stdout
            .split("What the figures mean")
            .nth(1)
            .is_some_and(|legend| legend.contains(figure));
        assert!(explained, "the legend does not explain {figure}: {stdout}");
    }
    assert!(
        !stderr.contains('\x1b'),
        "ANSI codes in piped logs: {stderr:?}"
    );
    assert!(
        stderr.contains("KVTIER_CHUNK_SIZ") && stderr.contains("did you mean KVTIER_CHUNK_SIZE?"),
        "{stderr}"
    );
    assert!(!stderr.contains("KVTIER_COMPARE_VENV"), "{stderr}");
    assert!(
        stdout.contains("256 tokens"),
        "the typo must not set chunk_size: {stdout}"
    );
}

#[test]
fn l1_sweep_reports_a_ratio_per_size_and_round_for_both_checksum_paths() {
    let out = Command::new(env!("CARGO_BIN_EXE_kvtier"))
        .args([
            "bench",
            "l1",
            "--chunk-mib",
            "1,2",
            "--reps",
            "2",
            "--l1-gb",
            "0.05",
        ])
        .arg("--json")
        .env_remove("KVTIER_CONFIG_FILE")
        .output()
        .expect("running kvtier");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kvtier failed: {stderr}");
    let json: Value =
        serde_json::from_slice(&out.stdout).expect("stdout must be exactly one JSON object");
    assert_eq!(json["workload"], "l1");
    let points = json["points"].as_array().expect("points");
    let sizes: Vec<u64> = points
        .iter()
        .map(|p| p["chunk_mib"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, [1, 2], "{json}");
    for p in points {
        for key in ["memcpy_gbps", "store_gbps", "retrieve_gbps"] {
            assert_positive_per_round(p, key, 2);
        }
        for key in [
            "store_vs_memcpy",
            "retrieve_vs_memcpy",
            "portable_store_vs_memcpy",
            "portable_retrieve_vs_memcpy",
        ] {
            assert_ordered_spread(p, key);
        }
    }
}

#[test]
fn chunk_size_sweep_reports_every_size_per_round_against_its_baselines() {
    let out = Command::new(env!("CARGO_BIN_EXE_kvtier"))
        .args([
            "bench",
            "chunk-size",
            "--model",
            "tiny",
            "--chunk-sizes",
            "64,16,256",
        ])
        .args([
            "--reps",
            "2",
            "--l1-gb",
            "0.02",
            "--doc-tokens",
            "1024",
            "--json",
        ])
        .env_remove("KVTIER_CONFIG_FILE")
        .output()
        .expect("running kvtier");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kvtier failed: {stderr}");
    let json: Value =
        serde_json::from_slice(&out.stdout).expect("stdout must be exactly one JSON object");
    assert_eq!(json["workload"], "chunk-size");
    assert_eq!(json["reference_chunk_tokens"], 256);
    assert_eq!(json["call_tokens"], 1024, "{json}");
    let points = json["points"].as_array().expect("points");
    let sizes: Vec<u64> = points
        .iter()
        .map(|p| p["chunk_tokens"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, [64, 16, 256], "{json}");
    for p in points {
        let cs = p["chunk_tokens"].as_f64().unwrap();
        assert_eq!(p["chunks_per_lookup"].as_f64().unwrap(), 131072.0 / cs);
        assert_eq!(p["lost_tokens_per_hit"].as_f64().unwrap(), cs / 2.0);
        assert_eq!(
            p["lost_fraction_short"].as_f64().unwrap(),
            cs / 2.0 / 1024.0
        );
        for key in [
            "lookup_us",
            "keys_us",
            "memcpy_gbps",
            "store_gbps",
            "retrieve_gbps",
        ] {
            assert_positive_per_round(p, key, 2);
        }
        for key in [
            "lookup_vs_reference",
            "keys_vs_reference",
            "store_vs_memcpy",
            "retrieve_vs_memcpy",
        ] {
            assert_ordered_spread(p, key);
        }
    }
    // The reference size is its own baseline.
    assert_eq!(points[2]["lookup_vs_reference"]["median"], 1.0);
}

#[test]
fn plot_is_refused_by_workloads_that_do_not_draw() {
    let dir = std::env::temp_dir().join(format!("kvtier-plot-refused-{}", std::process::id()));
    let disk_dir = dir.join("disk");
    let plot_dir = dir.join("plots");
    for workload in ["disk", "remote", "l1", "chunk-size"] {
        let (ok, _, stderr) = kvtier(
            &[
                "bench",
                workload,
                "--model",
                "tiny",
                "--disk-dir",
                disk_dir.to_str().unwrap(),
                "--plot",
                plot_dir.to_str().unwrap(),
            ],
            &[],
        );
        assert!(!ok, "{workload} accepted --plot");
        assert!(
            stderr.contains(&format!(
                "--plot is not supported by the {workload} workload"
            )),
            "{stderr}"
        );
        assert!(!dir.exists(), "{workload} started before refusing --plot");
    }
}

/// An explicit `--tp 1` is honoured by the remote workload (it used to become 8, which
/// does not divide tiny's 2 KV heads).
#[test]
fn remote_honours_an_explicit_tp() {
    for bin in ["redis-server", "redis-benchmark"] {
        if prereq::find_bin(bin).is_none() {
            prereq::missing(bin, "install redis-server and redis-tools (apt-get)");
            return;
        }
    }
    let (ok, stdout, stderr) = kvtier(
        &[
            "bench",
            "remote",
            "--model",
            "tiny",
            "--tp",
            "1",
            "--docs",
            "2",
            "--doc-tokens",
            "512",
            "--json",
        ],
        &[],
    );
    assert!(ok, "kvtier failed: {stderr}");
    let json: Value = serde_json::from_str(&stdout).expect("one JSON object");
    assert_eq!(json["config"]["tp"], 1, "{json}");
    assert_eq!(json["results"]["hit_chunks"], 4, "{json}");
}

#[test]
fn help_lists_the_environment_variables() {
    let cases: [&[&str]; 3] = [&["--help"], &["bench", "--help"], &["serve", "--help"]];
    for args in cases {
        let (ok, stdout, stderr) = kvtier(args, &[]);
        assert!(ok, "{args:?}: {stderr}");
        for var in [
            "KVTIER_LOG",
            "KVTIER_AUTH_TOKEN",
            "KVTIER_CONFIG_FILE",
            "KVTIER_<KEY>",
        ] {
            assert!(
                stdout.contains(var),
                "{args:?} --help lacks {var}: {stdout}"
            );
        }
    }
}
