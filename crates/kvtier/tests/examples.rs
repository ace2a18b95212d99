//! Every config the repository ships loads through the real config loader: each file in
//! `examples/`, and the engine config embedded in the Kubernetes example's ConfigMap.

use std::path::{Path, PathBuf};

use kvtier::config::EngineConfig;
use yaml_rust2::{Yaml, YamlLoader};

const GIB: u64 = 1 << 30;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn load(path: &Path) -> EngineConfig {
    EngineConfig::load(Some(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn every_example_config_loads() {
    let dir = repo_root().join("examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(files.len() >= 4, "examples/ holds only {files:?}");
    let default = EngineConfig::default();
    for f in &files {
        let cfg = load(f);
        assert_ne!(cfg, default, "{} sets nothing", f.display());
    }

    let embedded = load(&dir.join("embedded.yaml"));
    assert_eq!(embedded.max_local_cpu_size, 8 * GIB);
    assert!(embedded.local_disk.is_empty() && embedded.remote_url.is_empty());

    let disk = load(&dir.join("disk.yaml"));
    assert_eq!(disk.local_disk, [PathBuf::from("/var/lib/kvtier/disk")]);
    assert_eq!(disk.max_local_disk_size, 200 * GIB);

    let server = load(&dir.join("server.yaml"));
    assert_eq!(server.admin_port, Some(9090));
    assert!(server.local_cpu_prefault);

    let redis = load(&dir.join("redis.yaml"));
    assert_eq!(redis.remote_url.len(), 1);
    assert!(redis.remote_url[0].starts_with("redis://redis.internal:6379/0?"));
}

/// The `kvtier.yaml` of every ConfigMap in `deploy/kubernetes/`.
fn configmap_configs() -> Vec<(PathBuf, String)> {
    let dir = repo_root().join("deploy/kubernetes");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let docs = YamlLoader::load_from_str(&text)
            .unwrap_or_else(|e| panic!("{}: not valid YAML: {e}", path.display()));
        for doc in docs {
            if doc["kind"].as_str() == Some("ConfigMap") {
                if let Some(cfg) = doc["data"]["kvtier.yaml"].as_str() {
                    out.push((path.clone(), cfg.to_string()));
                }
            }
            assert!(
                !matches!(doc["kind"], Yaml::BadValue),
                "{}: a document without a kind",
                path.display()
            );
        }
    }
    out
}

/// `34Gi`-style Kubernetes quantities (binary suffixes only), in bytes.
fn quantity(q: &str) -> u64 {
    let (num, unit) = q.split_at(q.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(q.len()));
    let mult = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => GIB,
        "Ti" => GIB << 10,
        _ => panic!("quantity {q}: use a binary suffix (Ki, Mi, Gi, Ti)"),
    };
    num.parse::<u64>()
        .unwrap_or_else(|_| panic!("quantity {q}"))
        * mult
}

#[test]
fn the_kubernetes_example_config_loads_and_its_shm_holds_the_pool() {
    let configs = configmap_configs();
    assert!(
        !configs.is_empty(),
        "no ConfigMap with a kvtier.yaml in deploy/kubernetes"
    );
    let path = repo_root().join("deploy/kubernetes/kvtier-daemonset.yaml");
    let docs = YamlLoader::load_from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let ds = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some("DaemonSet"))
        .expect("a DaemonSet");
    let spec = &ds["spec"]["template"]["spec"];
    let shm = spec["volumes"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|v| v["emptyDir"]["medium"].as_str() == Some("Memory"))
        .expect("a memory-backed emptyDir for /dev/shm");
    let shm_bytes = quantity(shm["emptyDir"]["sizeLimit"].as_str().expect("sizeLimit"));
    let limit = quantity(
        spec["containers"][0]["resources"]["limits"]["memory"]
            .as_str()
            .expect("a memory limit"),
    );
    for (path, text) in configs {
        let cfg = EngineConfig::from_yaml_str(&text)
            .unwrap_or_else(|e| panic!("{}: kvtier.yaml: {e}", path.display()));
        let pool = cfg.max_local_cpu_size;
        assert!(
            shm_bytes >= pool,
            "/dev/shm ({shm_bytes} B) is smaller than the pool ({pool} B)"
        );
        assert!(
            limit >= pool + GIB,
            "memory limit {limit} B leaves no headroom over the pool"
        );
    }
}

/// LMCache configs written as LMCache documents them load, with one warning per key kvtier
/// has no use for.
#[test]
fn lmcache_configs_load_with_a_warning_per_foreign_key() {
    let dir = repo_root().join("examples/lmcache");
    for (file, foreign) in [
        ("cpu-offload.yaml", 0),
        ("disk-offload.yaml", 0),
        ("redis.yaml", 1),
        ("production.yaml", 9),
    ] {
        let path = dir.join(file);
        let (cfg, warnings) = EngineConfig::load_with_warnings(Some(&path))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let from_file: Vec<&String> = warnings
            .iter()
            .filter(|w| w.contains("(LMCache) ignored"))
            .collect();
        assert_eq!(from_file.len(), foreign, "{file}: {warnings:?}");
        assert_eq!(cfg.chunk_size, 256, "{file}");
    }
    let (prod, _) = EngineConfig::load_with_warnings(Some(&dir.join("production.yaml"))).unwrap();
    assert_eq!(prod.max_local_cpu_size, 20 * GIB);
    assert!(!prod.local_cpu_huge_pages);
    assert_eq!(prod.read_deadline_ms, 10_000);
    assert_eq!(prod.local_disk, [PathBuf::from("/mnt/nvme/lmcache/")]);
}
