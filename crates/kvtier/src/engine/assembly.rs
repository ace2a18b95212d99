//! Assembly: the one place an [`EngineConfig`] turns into the options of the parts it
//! configures: the L1 pool and tier, the manager, the disk tier and the remote tiers (by URL).
//! The parts take their own option types and never read the config.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{EngineConfig, PathSharding};
use crate::error::Error;
use crate::error::Result;
use crate::manager::{ManagerOptions, TierSpec};
use crate::memory::{PoolBacking, PoolOptions};
use crate::tier::redis::tls::TlsSettings;
use crate::tier::{
    CpuTierOptions, DiskTier, DiskTierOptions, ObjectTier, ObjectUrl, PeerTier, RedisTier,
    ThrottleLimits, ThrottledTier, Tier,
};

/// The L1 tier (and its pool, backed by `backing`).
pub(crate) fn l1_options(config: &EngineConfig, backing: PoolBacking) -> CpuTierOptions {
    CpuTierOptions {
        name: "cpu".into(),
        pool: PoolOptions {
            bytes: config.max_local_cpu_size,
            backing,
            huge_pages: config.local_cpu_huge_pages,
            prefault: config.local_cpu_prefault,
        },
        policy: config.cache_policy,
        pin_timeout: Duration::from_secs_f64(config.pin_timeout_sec),
    }
}

/// The storage manager's deadlines and queue bounds.
pub(crate) fn manager_options(config: &EngineConfig) -> ManagerOptions {
    ManagerOptions {
        read_deadline: Duration::from_millis(config.read_deadline_ms),
        store_deadline: Duration::from_millis(config.store_deadline_ms),
        write_queue_chunks: config.write_queue_chunks,
        // Queued writes hold pool memory; never let them take more than half of it.
        write_queue_bytes: config.max_local_cpu_size / 2,
        prefetch_concurrency: config.prefetch_concurrency,
        write_dedupe_chunks: config.write_dedupe_chunks,
        ..ManagerOptions::default()
    }
}

/// The disk tier the config asks for (`None` without `local_disk`). `by_rank` picks path
/// `rank % paths`; `striped` spreads chunks over every path.
pub(crate) fn disk_options(config: &EngineConfig, rank: u32) -> Option<DiskTierOptions> {
    if config.local_disk.is_empty() {
        return None;
    }
    let paths = match config.local_disk_path_sharding {
        PathSharding::ByRank => {
            vec![config.local_disk[rank as usize % config.local_disk.len()].clone()]
        }
        PathSharding::Striped => config.local_disk.clone(),
    };
    Some(DiskTierOptions {
        paths,
        policy: config.cache_policy,
        admit_after: config.disk_admit_after.max(1),
        durability: config.local_disk_durability,
        // A chunk is staged in the L1 pool: no record holds more than the pool.
        max_payload: config.max_local_cpu_size,
        ..DiskTierOptions::new(PathBuf::new(), config.max_local_disk_size)
    })
}

/// The TLS settings of `rediss://` remote tiers.
pub(crate) fn remote_tls(config: &EngineConfig) -> TlsSettings {
    TlsSettings {
        ca_file: config.remote_tls_ca_file.clone(),
        cert_file: config.remote_tls_cert_file.clone(),
        key_file: config.remote_tls_key_file.clone(),
        insecure_skip_verify: config.remote_tls_insecure_skip_verify,
    }
}

/// Builds the remote tier a `remote_url` entry names, by scheme: `kvtier://` is another
/// node's `kvtier serve` ([`PeerTier`]), `s3://`, `gs://` and `az://` an object store
/// ([`ObjectTier`]), anything else goes to the Redis parser (which accepts `redis://`,
/// `valkey://`, `redis+cluster://` and explains the rest). `index` is the entry's position,
/// for default tier names; `tls` applies to `rediss://` and `https` object-store endpoints.
pub(crate) fn remote_tier_from_url(
    url: &str,
    index: usize,
    tls: &TlsSettings,
) -> Result<Arc<dyn Tier>> {
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    if scheme.as_deref() == Some("kvtier") {
        return Ok(PeerTier::from_url(url, index)?);
    }
    if ObjectUrl::is_object_url(url) {
        return Ok(Arc::new(ObjectTier::from_url(url, index, tls)?));
    }
    Ok(Arc::new(RedisTier::from_url_with_tls(url, index, tls)?))
}

/// The tiers below L1 that the config names, in lookup order: disk, then remote stores.
pub(crate) fn lower_tiers(config: &EngineConfig, rank: u32) -> Result<Vec<TierSpec>> {
    let mut lower = Vec::new();
    if let Some(opts) = disk_options(config, rank) {
        lower.push(TierSpec::new(Arc::new(DiskTier::open(opts)?)));
    }
    // Remote stores after the disk, consulted in the order given (Redis and kvtier servers
    // mixed freely). Built without waiting for them: an unreachable server is a tier fault
    // (misses, skipped stores), not a startup failure.
    let tls = remote_tls(config);
    for (i, url) in config.remote_url.iter().enumerate() {
        lower.push(TierSpec::new(remote_tier_from_url(url, i, &tls)?));
    }
    throttle(config, lower)
}

/// Wraps the tiers `tier_max_mbps` / `tier_max_iops` name in their limits; a name that is
/// no lower tier is an error listing the tiers.
fn throttle(config: &EngineConfig, mut lower: Vec<TierSpec>) -> Result<Vec<TierSpec>> {
    let named = [
        ("tier_max_mbps", &config.tier_max_mbps),
        ("tier_max_iops", &config.tier_max_iops),
    ];
    for (key, limits) in named {
        for (name, _) in limits.iter() {
            if !lower.iter().any(|s| s.tier.name() == name) {
                let names: Vec<&str> = lower.iter().map(|s| s.tier.name()).collect();
                return Err(Error::config(
                    key,
                    format!(
                        "no tier named `{name}` below L1 (the tiers are: {}); the CPU tier cannot be throttled",
                        if names.is_empty() { "none".to_string() } else { names.join(", ") }
                    ),
                ));
            }
        }
    }
    let find = |v: &[(String, f64)], name: &str| v.iter().find(|(n, _)| n == name).map(|(_, x)| *x);
    for spec in &mut lower {
        let name = spec.tier.name();
        let limits = ThrottleLimits {
            bytes_per_sec: find(&config.tier_max_mbps, name).map(|m| m * 1e6),
            ops_per_sec: find(&config.tier_max_iops, name),
        };
        if limits.is_set() {
            tracing::info!(tier = %name, mb_per_sec = ?find(&config.tier_max_mbps, name), ops_per_sec = ?limits.ops_per_sec, "tier throttled");
            spec.tier = Arc::new(ThrottledTier::new(spec.tier.clone(), limits));
        }
    }
    Ok(lower)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(urls: &[&str]) -> Result<Vec<String>> {
        let cfg = EngineConfig {
            remote_url: urls.iter().map(|u| u.to_string()).collect(),
            ..EngineConfig::default()
        };
        Ok(lower_tiers(&cfg, 0)?
            .iter()
            .map(|s| s.tier.name().to_string())
            .collect())
    }

    #[test]
    fn each_scheme_builds_its_tier_in_order() {
        // Nothing listens on port 1: tiers are built without waiting for their servers.
        let n = names(&[
            "redis://127.0.0.1:1?connect_timeout_ms=10",
            "kvtier://127.0.0.1:1?connect_timeout_ms=10",
            "kvtier://127.0.0.1:2?name=rack2",
        ])
        .unwrap();
        assert_eq!(n, ["redis", "peer2", "rack2"]);
        // Object stores: built without contacting them either.
        let n = names(&[
            "s3://b/p?endpoint=http://127.0.0.1:1",
            "gs://b?endpoint=http://127.0.0.1:1&anonymous=true",
            "az://c?endpoint=http://127.0.0.1:1/acct&account=acct&anonymous=true",
            "s3://b2?endpoint=http://127.0.0.1:1&name=cold",
        ])
        .unwrap();
        assert_eq!(n, ["s3", "gs2", "az3", "cold"]);
        let e = names(&["s3://b?bogus=1"]).unwrap_err().to_string();
        assert!(
            e.contains("remote_url") && e.contains("unknown option"),
            "{e}"
        );
        let e = names(&["kvtier://h"]).unwrap_err().to_string();
        assert!(
            e.contains("remote_url") && e.contains("missing port"),
            "{e}"
        );
        let e = names(&["ftp://h:1"]).unwrap_err().to_string();
        assert!(e.contains("kvtier://") && e.contains("s3://"), "{e}");
    }

    #[test]
    fn a_cluster_url_given_as_one_string_is_one_cluster_tier() {
        // Split on every comma, the seeds used to become a cluster URL plus `127.0.0.1:2`,
        // which failed as "not a URL".
        let c = EngineConfig::from_yaml_str(
            "remote_url: redis+cluster://127.0.0.1:1,127.0.0.1:2?connect_timeout_ms=10",
        )
        .unwrap();
        let tiers = lower_tiers(&c, 0).unwrap();
        assert_eq!(tiers.len(), 1);
        assert_eq!(tiers[0].tier.name(), "redis");
    }

    #[test]
    fn tls_keys_become_tls_settings() {
        let mut c = EngineConfig::from_yaml_str(
            "remote_url: rediss://h:6380\nremote_tls_ca_file: /etc/ca.pem\n",
        )
        .unwrap();
        assert_eq!(remote_tls(&c).ca_file, Some(PathBuf::from("/etc/ca.pem")));
        c.remote_tls_cert_file = Some("/c.pem".into());
        c.remote_tls_key_file = Some("/k.pem".into());
        c.remote_tls_insecure_skip_verify = true;
        let t = remote_tls(&c);
        assert_eq!(t.cert_file, Some(PathBuf::from("/c.pem")));
        assert_eq!(t.key_file, Some(PathBuf::from("/k.pem")));
        assert!(t.insecure_skip_verify);
    }

    #[test]
    fn disk_paths_by_rank_or_striped() {
        let mut c = EngineConfig {
            local_disk: vec!["/a".into(), "/b".into()],
            disk_admit_after: 0,
            ..EngineConfig::default()
        };
        assert!(disk_options(&EngineConfig::default(), 0).is_none());
        let o = disk_options(&c, 3).unwrap();
        assert_eq!(o.paths, [PathBuf::from("/b")]);
        assert_eq!(o.admit_after, 1);
        assert_eq!(o.capacity_per_path, c.max_local_disk_size);
        assert_eq!(o.max_payload, c.max_local_cpu_size);
        c.local_disk_path_sharding = PathSharding::Striped;
        assert_eq!(disk_options(&c, 3).unwrap().paths.len(), 2);
    }
}
