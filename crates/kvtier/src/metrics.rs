//! Metrics (C9), kept in `prometheus-client` types and rendered in Prometheus text format.
//! The same values feed `stats()` snapshots, so there is one source of truth.

use std::sync::atomic::AtomicU64;

use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Label set naming a tier.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabel {
    /// Tier name.
    pub tier: String,
}

/// Label set naming a tier and an operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierOpLabel {
    /// Tier name.
    pub tier: String,
    /// Operation (`contains`, `get`, `put`, ...).
    pub op: String,
}

/// Label set naming a tier and a reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierReasonLabel {
    /// Tier name.
    pub tier: String,
    /// Why.
    pub reason: String,
}

type GaugeU64 = Gauge<u64, AtomicU64>;

fn latency_histogram() -> Histogram {
    // 10 µs .. ~10 s
    Histogram::new(exponential_buckets(1e-5, 2.0, 21))
}

fn throughput_histogram() -> Histogram {
    // 0.05 .. ~100 GB/s
    Histogram::new(exponential_buckets(0.05, 2.0, 12))
}

/// Every metric the engine exports.
pub struct Metrics {
    registry: Registry,
    /// Tokens asked for by lookups and retrieves.
    pub requested_tokens: Counter,
    /// Tokens found (contiguous prefix) by lookups and retrieves.
    pub hit_tokens: Counter,
    /// Lookup calls.
    pub lookups: Counter,
    /// Chunk hits per tier (lookups and reads).
    pub tier_hits: Family<TierLabel, Counter>,
    /// Payload bytes written per tier.
    pub stored_bytes: Family<TierLabel, Counter>,
    /// Payload bytes read per tier.
    pub loaded_bytes: Family<TierLabel, Counter>,
    /// Chunks stored per tier.
    pub stored_chunks: Family<TierLabel, Counter>,
    /// Chunk writes issued per lower tier (payloads handed to its put).
    pub tier_writes: Family<TierLabel, Counter>,
    /// Chunk writes not issued because the tier was known to hold the chunk already.
    pub writes_deduped: Family<TierLabel, Counter>,
    /// Bytes used per tier.
    pub used_bytes: Family<TierLabel, GaugeU64>,
    /// Byte budget per tier.
    pub capacity_bytes: Family<TierLabel, GaugeU64>,
    /// Chunks resident per tier.
    pub resident_chunks: Family<TierLabel, GaugeU64>,
    /// Evictions per tier.
    pub evictions: Family<TierLabel, Counter>,
    /// Chunks promoted into L1 by reads, per source tier.
    pub write_backs: Family<TierLabel, Counter>,
    /// Checksum mismatches caught per tier.
    pub checksum_failures: Family<TierLabel, Counter>,
    /// Tier errors by tier and operation.
    pub tier_errors: Family<TierOpLabel, Counter>,
    /// Tier deadline expiries by tier and operation.
    pub tier_timeouts: Family<TierOpLabel, Counter>,
    /// Stores not done, by tier and reason (queue full, tier down, no memory, ...).
    pub store_skipped: Family<TierReasonLabel, Counter>,
    /// Lookup latency (hashing included).
    pub lookup_seconds: Histogram,
    /// Store call latency.
    pub store_seconds: Histogram,
    /// Retrieve call latency.
    pub retrieve_seconds: Histogram,
    /// Store throughput per call, GB/s.
    pub store_gbps: Histogram,
    /// Retrieve throughput per call, GB/s.
    pub retrieve_gbps: Histogram,
    tier_seen: Mutex<std::collections::HashMap<String, SeenTotals>>,
}

/// The totals of a tier's own counters already brought into the exported ones.
#[derive(Debug, Default)]
struct SeenTotals {
    evictions: u64,
    checksum_failures: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Creates and registers every metric under the `kvtier` prefix.
    pub fn new() -> Metrics {
        let mut m = Metrics {
            registry: Registry::with_prefix("kvtier"),
            requested_tokens: Counter::default(),
            hit_tokens: Counter::default(),
            lookups: Counter::default(),
            tier_hits: Family::default(),
            stored_bytes: Family::default(),
            loaded_bytes: Family::default(),
            stored_chunks: Family::default(),
            tier_writes: Family::default(),
            writes_deduped: Family::default(),
            used_bytes: Family::default(),
            capacity_bytes: Family::default(),
            resident_chunks: Family::default(),
            evictions: Family::default(),
            write_backs: Family::default(),
            checksum_failures: Family::default(),
            tier_errors: Family::default(),
            tier_timeouts: Family::default(),
            store_skipped: Family::default(),
            lookup_seconds: latency_histogram(),
            store_seconds: latency_histogram(),
            retrieve_seconds: latency_histogram(),
            store_gbps: throughput_histogram(),
            retrieve_gbps: throughput_histogram(),
            tier_seen: Mutex::default(),
        };
        let r = &mut m.registry;
        r.register(
            "requested_tokens",
            "Tokens asked for by lookups and retrieves",
            m.requested_tokens.clone(),
        );
        r.register(
            "hit_tokens",
            "Tokens found as a contiguous stored prefix",
            m.hit_tokens.clone(),
        );
        r.register("lookups", "Prefix lookups", m.lookups.clone());
        r.register("tier_hits", "Chunk hits per tier", m.tier_hits.clone());
        r.register(
            "stored_bytes",
            "Payload bytes written per tier",
            m.stored_bytes.clone(),
        );
        r.register(
            "loaded_bytes",
            "Payload bytes read per tier",
            m.loaded_bytes.clone(),
        );
        r.register(
            "stored_chunks",
            "Chunks written per tier",
            m.stored_chunks.clone(),
        );
        r.register(
            "tier_writes",
            "Chunk writes issued per lower tier",
            m.tier_writes.clone(),
        );
        r.register(
            "writes_deduped",
            "Chunk writes not issued: the tier was known to hold the chunk",
            m.writes_deduped.clone(),
        );
        r.register("used_bytes", "Bytes used per tier", m.used_bytes.clone());
        r.register(
            "capacity_bytes",
            "Byte budget per tier",
            m.capacity_bytes.clone(),
        );
        r.register(
            "resident_chunks",
            "Chunks resident per tier",
            m.resident_chunks.clone(),
        );
        r.register("evictions", "Chunks evicted per tier", m.evictions.clone());
        r.register(
            "write_backs",
            "Chunks promoted into L1 by reads, by source tier",
            m.write_backs.clone(),
        );
        r.register(
            "checksum_failures",
            "Checksum mismatches caught, by tier",
            m.checksum_failures.clone(),
        );
        r.register(
            "tier_errors",
            "Tier operation errors",
            m.tier_errors.clone(),
        );
        r.register(
            "tier_timeouts",
            "Tier operations that missed their deadline",
            m.tier_timeouts.clone(),
        );
        r.register(
            "store_skipped",
            "Chunk stores not done, by tier and reason",
            m.store_skipped.clone(),
        );
        r.register(
            "lookup_seconds",
            "Lookup latency, hashing included",
            m.lookup_seconds.clone(),
        );
        r.register(
            "store_seconds",
            "Store call latency",
            m.store_seconds.clone(),
        );
        r.register(
            "retrieve_seconds",
            "Retrieve call latency",
            m.retrieve_seconds.clone(),
        );
        r.register(
            "store_throughput_gbps",
            "Store throughput per call (GB/s)",
            m.store_gbps.clone(),
        );
        r.register(
            "retrieve_throughput_gbps",
            "Retrieve throughput per call (GB/s)",
            m.retrieve_gbps.clone(),
        );
        m
    }

    /// Label for a tier.
    pub fn tier(name: &str) -> TierLabel {
        TierLabel {
            tier: name.to_string(),
        }
    }

    /// Label for a tier and operation.
    pub fn tier_op(name: &str, op: &str) -> TierOpLabel {
        TierOpLabel {
            tier: name.to_string(),
            op: op.to_string(),
        }
    }

    /// Label for a tier and reason.
    pub fn tier_reason(name: &str, reason: &str) -> TierReasonLabel {
        TierReasonLabel {
            tier: name.to_string(),
            reason: reason.to_string(),
        }
    }

    /// Brings monotonic totals a tier keeps itself (`evictions`, `checksum_failures` it
    /// caught) into the exported counters.
    pub fn observe_tier_counters(&self, tier: &str, evictions: u64, checksum_failures: u64) {
        let mut seen = self.tier_seen.lock();
        let last = seen.entry(tier.to_string()).or_default();
        let l = Metrics::tier(tier);
        if evictions > last.evictions {
            self.evictions
                .get_or_create(&l)
                .inc_by(evictions - last.evictions);
        }
        if checksum_failures > last.checksum_failures {
            self.checksum_failures
                .get_or_create(&l)
                .inc_by(checksum_failures - last.checksum_failures);
        }
        last.evictions = last.evictions.max(evictions);
        last.checksum_failures = last.checksum_failures.max(checksum_failures);
    }

    /// Renders everything in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
