//! Builds the tiers below L1 that a configuration names: disk, then remote stores.

use std::sync::Arc;

use crate::config::EngineConfig;
use crate::error::{Error, Result};
use crate::manager::TierSpec;
use crate::tier::DiskTier;

/// The lower tiers of `config`, in lookup order.
pub(crate) fn lower_tiers_from_config(config: &EngineConfig, rank: u32) -> Result<Vec<TierSpec>> {
    let mut lower = Vec::new();
    if let Some(disk) = DiskTier::from_config(config, rank)? {
        lower.push(TierSpec::new(Arc::new(disk)));
    }
    if !config.remote_url.is_empty() {
        return Err(Error::config(
            "remote_url",
            "remote tiers are not available in this build yet; remove remote_url",
        ));
    }
    Ok(lower)
}
