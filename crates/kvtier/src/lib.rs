//! kvtier: a tiered KV-cache engine for LLM serving.
//!
//! The crate is laid out the way data flows: [`keys`] turn tokens into chunk keys,
//! [`chunk`] describes chunks and their record encoding, [`memory`] is the pool chunks live
//! in, [`policy`] orders eviction, [`tier`] holds the storage levels, [`manager`] runs them
//! as one hierarchy, and [`Engine`] is the API over tokens and KV bytes.
#![warn(missing_docs)]

pub mod api;
pub mod chunk;
pub mod config;
mod engine;
pub mod error;
pub mod keys;
pub mod manager;
pub mod memory;
pub mod metrics;
pub mod policy;
pub mod tier;
pub mod transport;

pub use api::{KvCache, PendingLoad, StoreSummary};
pub use config::EngineConfig;
pub use engine::{
    Acquired, Engine, EngineCore, EngineStats, LookupResult, RetrieveReport, StoreReport,
    StoreSession, TierStats,
};
pub use error::{Error, Result};
