//! `inspect` reads a disk tier directory without changing it: per-model and per-tenant
//! counts, and with verification every bad record is reported (and left in place).

use std::time::Duration;

use kvtier::keys::ModelIdentity;
use kvtier::layout::{Dtype, KvLayout};
use kvtier::tier::inspect_disk;
use kvtier::{Engine, EngineConfig};

#[test]
fn inspect_lists_models_and_salts_and_finds_corruption_without_touching_files() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = EngineConfig::from_yaml_str(&format!(
        "chunk_size: 16\nmax_local_cpu_size: 4MiB\nlocal_disk: {}\nmax_local_disk_size: 64MiB\nlocal_cpu_huge_pages: false\n",
        dir.path().display()
    ))
    .unwrap();
    let id = ModelIdentity::new("inspect/model", KvLayout::simple(2, 2, 16, Dtype::F16));
    let engine = Engine::new(cfg, id).unwrap();
    let tokens: Vec<u32> = (0..64).collect();
    let kv = vec![3u8; engine.payload_bytes(tokens.len())];
    engine.store(&tokens, None, &kv).unwrap();
    engine.store(&tokens, Some("tenant-a"), &kv).unwrap();
    assert!(engine.flush(Duration::from_secs(30)));
    drop(engine);

    let rep = inspect_disk(dir.path(), true, |_, _| {}).unwrap();
    assert_eq!(rep.chunks, 8);
    assert!(rep.bad.is_empty(), "{:?}", rep.bad);
    assert_eq!(rep.payload_bytes, 8 * 16 * 256);
    assert_eq!(rep.salts["(none)"].chunks, 4);
    assert_eq!(rep.salts["tenant-a"].tokens, 64);
    assert_eq!(rep.models.len(), 1);
    assert!(rep
        .models
        .keys()
        .next()
        .unwrap()
        .starts_with("inspect/model"));

    // Flip one payload byte of one record: only --verify sees it, and the file stays.
    let victim = walk(dir.path())
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "kvr"))
        .unwrap();
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[10] ^= 0xFF;
    std::fs::write(&victim, &bytes).unwrap();
    assert!(inspect_disk(dir.path(), false, |_, _| {})
        .unwrap()
        .bad
        .is_empty());
    let rep = inspect_disk(dir.path(), true, |_, _| {}).unwrap();
    assert_eq!(rep.bad.len(), 1);
    assert!(
        rep.bad[0].problem.contains("checksum"),
        "{}",
        rep.bad[0].problem
    );
    assert!(victim.exists(), "inspect never deletes");
    assert!(inspect_disk(&dir.path().join("missing"), false, |_, _| {}).is_err());
}

fn walk(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(root).unwrap().flatten() {
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}
