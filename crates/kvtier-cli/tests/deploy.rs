//! The deployment material in `deploy/` stays true to the binary: every `kvtier` command line
//! it holds (systemd unit, container file, Kubernetes manifests) parses with this build's
//! flags, and the systemd unit passes `systemd-analyze verify`.

use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "../../kvtier/tests/support/prereq.rs"]
mod prereq;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(rel: &str) -> String {
    let p = repo_root().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

const UNIT: &str = "deploy/systemd/kvtier.service";

/// The arguments after the binary in the unit's `ExecStart=`.
fn unit_args() -> Vec<String> {
    let unit = read(UNIT);
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("an ExecStart= line");
    let mut words = line.split_whitespace().map(str::to_string);
    assert_eq!(words.next().as_deref(), Some("/usr/local/bin/kvtier"));
    words.collect()
}

/// The JSON array of the Containerfile's `CMD`.
fn containerfile_args() -> Vec<String> {
    let text = read("deploy/Containerfile");
    let cmd = text
        .lines()
        .find_map(|l| l.strip_prefix("CMD "))
        .expect("a CMD line");
    serde_json::from_str(cmd).expect("CMD in exec (JSON array) form")
}

/// `args` of the DaemonSet's kvtier container (a YAML list of plain or quoted words).
fn daemonset_args() -> Vec<String> {
    let text = read("deploy/kubernetes/kvtier-daemonset.yaml");
    let mut lines = text.lines().skip_while(|l| l.trim() != "- name: kvtier");
    lines.next().expect("the kvtier container");
    let mut lines = lines.skip_while(|l| l.trim() != "args:");
    lines.next().expect("its args");
    lines
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .map_while(|l| l.strip_prefix("- "))
        .map(|w| w.trim_matches('"').to_string())
        .collect()
}

/// Runs `kvtier ARGS --help`: clap reads the arguments in order, so an unknown flag or a
/// bad value before `--help` fails the run.
fn assert_parses(what: &str, args: &[String]) {
    assert_eq!(
        args.first().map(String::as_str),
        Some("serve"),
        "{what}: {args:?}"
    );
    assert!(args.len() >= 3, "{what}: {args:?}");
    let out = Command::new(env!("CARGO_BIN_EXE_kvtier"))
        .args(args)
        .arg("--help")
        .output()
        .expect("running kvtier");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what}: `kvtier {}` does not parse: {stderr}",
        args.join(" ")
    );
}

#[test]
fn every_deploy_command_line_parses() {
    assert_parses(UNIT, &unit_args());
    assert_parses("deploy/Containerfile", &containerfile_args());
    let ds = daemonset_args();
    assert!(ds.contains(&"--admin-host".to_string()), "{ds:?}");
    assert_parses("deploy/kubernetes/kvtier-daemonset.yaml", &ds);
}

#[test]
fn a_bad_flag_would_be_caught() {
    let mut args = unit_args();
    args.push("--no-such-flag".into());
    let out = Command::new(env!("CARGO_BIN_EXE_kvtier"))
        .args(&args)
        .arg("--help")
        .output()
        .expect("running kvtier");
    assert!(!out.status.success());
}

/// `systemd-analyze verify` on the unit, with `ExecStart` pointing at this build's binary
/// (verify checks that the command exists).
#[test]
fn the_systemd_unit_verifies() {
    let Some(analyze) = prereq::find_bin("systemd-analyze") else {
        prereq::missing(
            "systemd-analyze",
            "install systemd (apt-get install systemd)",
        );
        return;
    };
    let dir = std::env::temp_dir().join(format!("kvtier-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let unit = dir.join("kvtier.service");
    let text = read(UNIT).replace("/usr/local/bin/kvtier", env!("CARGO_BIN_EXE_kvtier"));
    std::fs::write(&unit, text).unwrap();
    let out = Command::new(analyze).arg("verify").arg(&unit).output();
    std::fs::remove_dir_all(&dir).ok();
    let out = out.expect("running systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed: {stderr}"
    );
    assert!(
        !stderr.contains("kvtier.service"),
        "warnings about the unit: {stderr}"
    );
}
