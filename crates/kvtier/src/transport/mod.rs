//! Network transports used by remote tiers.

pub mod resp;
pub mod stream;
