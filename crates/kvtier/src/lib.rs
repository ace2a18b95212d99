//! kvtier: a tiered KV-cache engine for LLM serving.
//!
//! The crate is laid out the way data flows. Its modules form layers, lowest first; a module
//! uses only modules listed before it (`python3 tools/check_layers.py` checks this in CI, with
//! the same list):
//!
//! 1. [`error`], [`metrics`], [`layout`]: leaves. The error type; the Prometheus metrics
//!    (fed plain numbers); a model's KV layout (dtype, layer groups, bytes per token).
//! 2. [`keys`]: tokens to chained chunk keys.
//! 3. [`api`]: the [`KvCache`] trait and the values it returns, shared by the embedded
//!    [`Engine`] and the client of a `kvtier serve` server.
//! 4. [`memory`]: the pool chunks live in, its buffers, and [`memory::BufferSource`] (where
//!    a reader gets buffers).
//! 5. [`chunk`]: chunk metadata, checksums and the record encoding (a chunk holds a pool
//!    buffer, so it sits above memory).
//! 6. [`policy`]: eviction order.
//! 7. [`transport`]: network links, RESP and the kvtier wire protocol, below the tiers that
//!    use them.
//! 8. [`tier`]: the `Tier` trait and the storage levels (CPU, disk, Redis, kvtier server).
//! 9. [`manager`]: the ordered tier list as one hierarchy.
//! 10. [`config`]: the engine's settings; it names the option types of the parts it
//!     configures, which never read it.
//! 11. the engine ([`Engine`], [`EngineCore`]): builds every part from the config (its
//!     assembly module is the one place that does) and is the API over tokens and KV bytes.
#![warn(missing_docs)]

pub mod api;
pub mod chunk;
pub mod config;
mod engine;
pub mod error;
pub mod keys;
pub mod layout;
pub mod manager;
pub mod memory;
pub mod metrics;
pub mod policy;
pub mod tier;
pub mod transport;

pub use api::{KvCache, LookupResult, PendingLoad, PinToken, RetrieveReport, StoreSummary};
pub use config::EngineConfig;
pub use engine::{Acquired, Engine, EngineCore, EngineStats, StoreReport, StoreSession, TierStats};
pub use error::{Error, Result};
