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
    for (i, url) in config.remote_url.iter().enumerate() {
        lower.push(TierSpec::new(remote_tier_from_url(url, i)?));
    }
    Ok(lower)
}
