//! Checks over the repository's files: every `KVTIER_*` variable the code, scripts and docs
//! mention is known to the config (never warned about as a typo), and scripts install only
//! from the standard package registries.

use std::path::{Path, PathBuf};

use kvtier::config::{classify_env, EnvKind};

/// Names the tests use on purpose as typos of real keys.
const DELIBERATE_TYPOS: &[&str] = &[
    "KVTIER_MAX_LOCAL_CPU_SIZ",
    "KVTIER_AUTH_TOKN",
    "KVTIER_CHUNK_SIZ",
    "KVTIER_SOMETHING_ELSE_ENTIRELY",
];

/// Folders and files at the repository root that hold code, scripts or docs.
const SCANNED: &[&str] = &[
    "crates",
    "python",
    "bench",
    "e2e",
    "tools",
    "docs",
    "examples",
    "deploy",
    ".ci",
    "README.md",
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn walk(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_file() {
        out.push(path.to_path_buf());
        return;
    }
    let Ok(entries) = std::fs::read_dir(path) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name == "target" || name.starts_with('.') && name != ".ci" || name == "__pycache__" {
            continue;
        }
        walk(&p, out);
    }
}

/// `KVTIER_[A-Z0-9_]+` names in `text`.
fn names_in(text: &str) -> Vec<String> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(off) = text[i..].find("KVTIER_") {
        let start = i + off;
        let mut end = start + "KVTIER_".len();
        while end < b.len()
            && (b[end].is_ascii_uppercase() || b[end].is_ascii_digit() || b[end] == b'_')
        {
            end += 1;
        }
        let preceded_by_word =
            start > 0 && (b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        let name = text[start..end].trim_end_matches('_');
        if !preceded_by_word && name.len() > "KVTIER_".len() {
            out.push(name.to_string());
        }
        i = end;
    }
    out
}

#[test]
fn every_kvtier_variable_in_the_repo_is_known() {
    let root = repo_root();
    let mut files = Vec::new();
    for s in SCANNED {
        walk(&root.join(s), &mut files);
    }
    assert!(files.len() > 50, "scanned only {} files", files.len());
    let mut seen = 0;
    let mut unknown = Vec::new();
    for f in &files {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue; // binary files (images)
        };
        for name in names_in(&text) {
            seen += 1;
            if DELIBERATE_TYPOS.contains(&name.as_str()) {
                continue;
            }
            if let EnvKind::Unknown { .. } = classify_env(&name) {
                unknown.push(format!(
                    "{name} in {}",
                    f.strip_prefix(&root).unwrap_or(f).display()
                ));
            }
        }
    }
    assert!(seen > 20, "found only {seen} KVTIER_ names");
    unknown.sort();
    unknown.dedup();
    assert!(
        unknown.is_empty(),
        "KVTIER_ variables that are neither config keys nor listed in config::ENV_VARS / \
         ENV_TOOL_VARS (add them there):\n{}",
        unknown.join("\n")
    );
}

#[test]
fn names_in_finds_whole_names_only() {
    assert_eq!(
        names_in("a KVTIER_LOG=debug, $KVTIER_CONFIG_FILE; XKVTIER_NO `KVTIER_<KEY>` KVTIER_"),
        ["KVTIER_LOG", "KVTIER_CONFIG_FILE"]
    );
}

/// Option spellings that point pip (or uv) at another package index.
const OTHER_INDEX: &[&str] = &[
    "--index-url",
    "--extra-index-url",
    "--find-links",
    "PIP_INDEX_URL",
    "UV_INDEX",
];

#[test]
fn scripts_use_only_the_standard_package_registries() {
    let root = repo_root();
    let mut files = Vec::new();
    for s in SCANNED.iter().chain(&["pyproject.toml", "Containerfile"]) {
        walk(&root.join(s), &mut files);
    }
    let mut found = Vec::new();
    let mut scripts = 0;
    for f in &files {
        let name = f.file_name().unwrap_or_default().to_string_lossy();
        let script = name.ends_with(".sh")
            || name.ends_with(".txt") && name.starts_with("requirements")
            || name == "run"
            || name == "pyproject.toml"
            || name.starts_with("Containerfile")
            || name == "Dockerfile";
        if !script {
            continue;
        }
        scripts += 1;
        let text = std::fs::read_to_string(f).unwrap_or_default();
        for (i, line) in text.lines().enumerate() {
            if OTHER_INDEX.iter().any(|o| line.contains(o)) || line.contains(" -i http") {
                found.push(format!(
                    "{}:{}: {line}",
                    f.strip_prefix(&root).unwrap_or(f).display(),
                    i + 1
                ));
            }
        }
    }
    assert!(scripts >= 5, "scanned only {scripts} scripts");
    assert!(
        found.is_empty(),
        "package index other than the default:\n{}",
        found.join("\n")
    );
}
