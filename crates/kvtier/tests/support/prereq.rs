//! Test prerequisites from outside the repository (`redis-server`, object-store servers, ...).
//!
//! A test whose prerequisite is missing is skipped with a `SKIPPED` line, so the tests run on a
//! bare machine; with `KVTIER_REQUIRE_TEST_SERVERS=1` (set by `.ci/run`) it fails instead,
//! naming what to install, so CI can never pass by skipping. Include with
//! `#[path = "support/prereq.rs"] mod prereq;` (the server harnesses here include it).
#![allow(dead_code)]

use std::path::PathBuf;

/// Environment variable that turns a missing prerequisite into a test failure.
pub const REQUIRE_ENV: &str = "KVTIER_REQUIRE_TEST_SERVERS";

/// Whether a missing prerequisite fails the test: `KVTIER_REQUIRE_TEST_SERVERS` set to
/// anything but empty or `0`.
pub fn required() -> bool {
    std::env::var_os(REQUIRE_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

/// Reports that `what` is missing, `install` saying how to get it: panics when
/// [`required`], else prints why the test is skipped (the caller then returns).
#[track_caller]
pub fn missing(what: &str, install: &str) {
    if required() {
        panic!("{what}: required by this test ({REQUIRE_ENV} is set); {install}");
    }
    eprintln!("SKIPPED: {what}; {install} (set {REQUIRE_ENV}=1 to fail instead)");
}

/// Finds an executable on `PATH` or in the usual system directories.
pub fn find_bin(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/bin", "/usr/sbin", "/usr/local/bin"].map(PathBuf::from));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}
