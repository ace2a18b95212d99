//! Metrics (C9), kept in `prometheus-client` types and rendered in Prometheus text format.
//! The same values feed `stats()` snapshots, so there is one source of truth.

use std::sync::atomic::AtomicU64;

use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Metric, Registry};

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

/// Prefix of every exported metric name.
const PREFIX: &str = "kvtier";

/// One exported metric family, as the metric reference (`docs/metrics.md`) lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricInfo {
    /// Family name as exported (`kvtier_` included; counters' samples add `_total`).
    pub name: String,
    /// Prometheus type (`counter`, `gauge`, `histogram`).
    pub kind: String,
    /// Help text.
    pub help: &'static str,
    /// Label names of its series.
    pub labels: &'static [&'static str],
}

/// Registers metrics and records each in the catalog, so the reference is the registry.
struct Registrar<'a> {
    registry: &'a mut Registry,
    catalog: &'a mut Vec<MetricInfo>,
}

impl Registrar<'_> {
    fn add(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
        metric: impl Metric,
    ) {
        self.catalog.push(MetricInfo {
            name: format!("{PREFIX}_{name}"),
            kind: metric.metric_type().as_str().to_string(),
            help,
            labels,
        });
        self.registry.register(name, help, metric);
    }
}

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
    /// Shared memory committed by the L1 pool (memfd or file backing only).
    pub pool_committed_bytes: Family<TierLabel, GaugeU64>,
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
    catalog: Vec<MetricInfo>,
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
            registry: Registry::with_prefix(PREFIX),
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
            pool_committed_bytes: Family::default(),
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
            catalog: Vec::new(),
        };
        let mut r = Registrar {
            registry: &mut m.registry,
            catalog: &mut m.catalog,
        };
        r.add(
            "requested_tokens",
            "Tokens asked for by lookups and retrieves",
            &[],
            m.requested_tokens.clone(),
        );
        r.add(
            "hit_tokens",
            "Tokens found as a contiguous stored prefix",
            &[],
            m.hit_tokens.clone(),
        );
        r.add("lookups", "Prefix lookups", &[], m.lookups.clone());
        r.add(
            "tier_hits",
            "Chunk hits per tier",
            &["tier"],
            m.tier_hits.clone(),
        );
        r.add(
            "stored_bytes",
            "Payload bytes written per tier",
            &["tier"],
            m.stored_bytes.clone(),
        );
        r.add(
            "loaded_bytes",
            "Payload bytes read per tier",
            &["tier"],
            m.loaded_bytes.clone(),
        );
        r.add(
            "stored_chunks",
            "Chunks written per tier",
            &["tier"],
            m.stored_chunks.clone(),
        );
        r.add(
            "tier_writes",
            "Chunk writes issued per lower tier",
            &["tier"],
            m.tier_writes.clone(),
        );
        r.add(
            "writes_deduped",
            "Chunk writes not issued: the tier was known to hold the chunk",
            &["tier"],
            m.writes_deduped.clone(),
        );
        r.add(
            "used_bytes",
            "Bytes used per tier",
            &["tier"],
            m.used_bytes.clone(),
        );
        r.add(
            "capacity_bytes",
            "Byte budget per tier",
            &["tier"],
            m.capacity_bytes.clone(),
        );
        r.add(
            "resident_chunks",
            "Chunks resident per tier",
            &["tier"],
            m.resident_chunks.clone(),
        );
        r.add(
            "pool_committed_bytes",
            "Shared memory committed by the L1 pool (memfd or file pool: in no process's RSS)",
            &["tier"],
            m.pool_committed_bytes.clone(),
        );
        r.add(
            "evictions",
            "Chunks evicted per tier",
            &["tier"],
            m.evictions.clone(),
        );
        r.add(
            "write_backs",
            "Chunks promoted into L1 by reads, by source tier",
            &["tier"],
            m.write_backs.clone(),
        );
        r.add(
            "checksum_failures",
            "Checksum mismatches caught, by tier",
            &["tier"],
            m.checksum_failures.clone(),
        );
        r.add(
            "tier_errors",
            "Tier operation errors",
            &["tier", "op"],
            m.tier_errors.clone(),
        );
        r.add(
            "tier_timeouts",
            "Tier operations that missed their deadline",
            &["tier", "op"],
            m.tier_timeouts.clone(),
        );
        r.add(
            "store_skipped",
            "Chunk stores not done, by tier and reason",
            &["tier", "reason"],
            m.store_skipped.clone(),
        );
        r.add(
            "lookup_seconds",
            "Lookup latency, hashing included",
            &[],
            m.lookup_seconds.clone(),
        );
        r.add(
            "store_seconds",
            "Store call latency",
            &[],
            m.store_seconds.clone(),
        );
        r.add(
            "retrieve_seconds",
            "Retrieve call latency",
            &[],
            m.retrieve_seconds.clone(),
        );
        r.add(
            "store_throughput_gbps",
            "Store throughput per call (GB/s)",
            &[],
            m.store_gbps.clone(),
        );
        r.add(
            "retrieve_throughput_gbps",
            "Retrieve throughput per call (GB/s)",
            &[],
            m.retrieve_gbps.clone(),
        );
        m
    }

    /// Every metric family this registry exports, in registration order (also those with
    /// no series yet, which `render` leaves out).
    pub fn catalog(&self) -> &[MetricInfo] {
        &self.catalog
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Once every family has a series, what `render` declares is exactly the catalog.
    #[test]
    fn the_catalog_is_what_render_declares() {
        let m = Metrics::new();
        m.requested_tokens.inc();
        m.hit_tokens.inc();
        m.lookups.inc();
        let t = Metrics::tier("cpu");
        for f in [
            &m.tier_hits,
            &m.stored_bytes,
            &m.loaded_bytes,
            &m.stored_chunks,
            &m.evictions,
            &m.write_backs,
            &m.checksum_failures,
            &m.tier_writes,
            &m.writes_deduped,
        ] {
            f.get_or_create(&t).inc();
        }
        for f in [
            &m.used_bytes,
            &m.capacity_bytes,
            &m.resident_chunks,
            &m.pool_committed_bytes,
        ] {
            f.get_or_create(&t).set(1);
        }
        m.tier_errors
            .get_or_create(&Metrics::tier_op("cpu", "get"))
            .inc();
        m.tier_timeouts
            .get_or_create(&Metrics::tier_op("cpu", "get"))
            .inc();
        m.store_skipped
            .get_or_create(&Metrics::tier_reason("cpu", "queue_full"))
            .inc();
        let text = m.render();
        let mut declared: Vec<(String, String)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_once(' '))
            .map(|(n, k)| (n.to_string(), k.to_string()))
            .collect();
        let mut catalog: Vec<(String, String)> = m
            .catalog()
            .iter()
            .map(|i| (i.name.clone(), i.kind.clone()))
            .collect();
        declared.sort();
        catalog.sort();
        assert_eq!(declared, catalog);
        // Label names in the catalog are those the series carry.
        for info in m.catalog().iter().filter(|i| !i.labels.is_empty()) {
            let line = text
                .lines()
                .find(|l| l.starts_with(&info.name) && l.contains('{'))
                .unwrap_or_else(|| panic!("no series of {}", info.name));
            for label in info.labels {
                assert!(
                    line.contains(&format!("{label}=\"")),
                    "{}: {line}",
                    info.name
                );
            }
        }
    }
}
