//! Builds the tiers below L1 that a configuration names: disk, then remote stores.

use std::sync::Arc;

use crate::config::EngineConfig;
use crate::error::Result;
use crate::manager::TierSpec;
use crate::tier::{remote_tier_from_url, DiskTier};

/// The lower tiers of `config`, in lookup order.
pub(crate) fn lower_tiers_from_config(config: &EngineConfig, rank: u32) -> Result<Vec<TierSpec>> {
    let mut lower = Vec::new();
    if let Some(disk) = DiskTier::from_config(config, rank)? {
        lower.push(TierSpec::new(Arc::new(disk)));
    }
    // Remote stores after the disk, consulted in the order given (Redis and kvtier servers
    // mixed freely). Built without waiting for them: an unreachable server is a tier fault
    // (misses, skipped stores), not a startup failure.
    let tls = config.remote_tls();
    for (i, url) in config.remote_url.iter().enumerate() {
        lower.push(TierSpec::new(remote_tier_from_url(url, i, &tls)?));
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
        Ok(lower_tiers_from_config(&cfg, 0)?
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
        let e = names(&["kvtier://h"]).unwrap_err().to_string();
        assert!(
            e.contains("remote_url") && e.contains("missing port"),
            "{e}"
        );
        let e = names(&["ftp://h:1"]).unwrap_err().to_string();
        assert!(e.contains("kvtier://"), "{e}");
    }
}
