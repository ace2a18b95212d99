//! Measurement helpers and the bench report: a human table or one JSON object.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

/// Bytes moved by a series of timed calls.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Throughput {
    /// Bytes moved.
    pub bytes: u64,
    /// Summed time of the timed calls, seconds.
    pub secs: f64,
    /// Timed calls.
    pub calls: u64,
}

impl Throughput {
    /// Adds one timed call.
    pub fn add(&mut self, bytes: u64, elapsed: Duration) {
        self.bytes += bytes;
        self.secs += elapsed.as_secs_f64();
        self.calls += 1;
    }

    /// Decimal GB per second; 0 when nothing was timed (keeps the JSON numeric).
    pub fn gbps(&self) -> f64 {
        gbps(self.bytes, self.secs)
    }
}

/// Decimal GB per second for `bytes` in `secs`; 0 when `secs` is not positive.
pub fn gbps(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 / secs / 1e9
    } else {
        0.0
    }
}

/// Nearest-rank percentile (`p` in 0..=100) of unsorted samples; 0 for no samples.
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Median of unsorted samples.
pub fn median(samples: &[f64]) -> f64 {
    percentile(samples, 50.0)
}

/// Minimum, median and maximum of repeated measurements.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Spread {
    /// Smallest sample.
    pub min: f64,
    /// Median sample.
    pub median: f64,
    /// Largest sample.
    pub max: f64,
}

impl Spread {
    /// The spread of unsorted samples (all zero for none).
    pub fn of(samples: &[f64]) -> Spread {
        Spread {
            min: percentile(samples, 0.0),
            median: median(samples),
            max: percentile(samples, 100.0),
        }
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.2} / {:.2} / {:.2}", self.min, self.median, self.max)
    }
}

/// The distinct chunk keys a workload stored (its denominator of write amplification).
#[derive(Clone, Debug, Default)]
pub struct UniqueChunks(std::collections::HashSet<kvtier::keys::ChunkKey>);

impl UniqueChunks {
    /// Notes the chunks a store of `tokens` under `salt` covers.
    pub fn note(
        &mut self,
        engine: &kvtier::Engine,
        tokens: &[u32],
        salt: Option<&str>,
    ) -> anyhow::Result<()> {
        let spans = engine.key_space().chunk_spans(tokens, salt)?;
        self.0.extend(spans.iter().map(|s| s.key));
        Ok(())
    }

    /// How many distinct chunks.
    pub fn count(&self) -> u64 {
        self.0.len() as u64
    }
}

/// Chunk writes a lower tier was sent, against the chunks the workload stored.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TierWrites {
    /// Writes issued to the tier (`kvtier_tier_writes_total`).
    pub writes: u64,
    /// Writes not issued: the tier was known to hold the chunk (`kvtier_writes_deduped_total`).
    pub deduped: u64,
    /// writes / unique chunks.
    pub writes_per_unique_chunk: f64,
}

/// Write amplification of the lower tiers: writes per distinct chunk stored (1.0: each
/// chunk written once; a growing prompt that re-sent its earlier chunks showed 2.5).
#[derive(Clone, Debug, Default, Serialize)]
pub struct WriteAmplification {
    /// Distinct chunk keys the workload stored.
    pub unique_chunks: u64,
    /// The disk tier's writes / unique chunks (null without a disk tier).
    pub disk: Option<f64>,
    /// The remote tiers' writes / unique chunks, the highest of them (null without one).
    pub remote: Option<f64>,
    /// Every lower tier by name.
    pub tiers: BTreeMap<String, TierWrites>,
}

impl WriteAmplification {
    /// From an engine's counters (tiers after L1) and the workload's unique chunks.
    pub fn of(stats: &kvtier::EngineStats, unique_chunks: u64) -> WriteAmplification {
        let per = |w: u64| {
            if unique_chunks == 0 {
                0.0
            } else {
                w as f64 / unique_chunks as f64
            }
        };
        let mut out = WriteAmplification {
            unique_chunks,
            ..WriteAmplification::default()
        };
        for t in stats.tiers.iter().skip(1) {
            let w = TierWrites {
                writes: t.writes,
                deduped: t.writes_deduped,
                writes_per_unique_chunk: per(t.writes),
            };
            let slot = if t.name == "disk" {
                &mut out.disk
            } else {
                &mut out.remote
            };
            *slot = Some(slot.unwrap_or(0.0).max(w.writes_per_unique_chunk));
            out.tiers.insert(t.name.clone(), w);
        }
        out
    }
}

/// The run's parameters.
#[derive(Clone, Debug, Serialize)]
pub struct ConfigSection {
    /// Model preset name.
    pub model: String,
    /// Per-rank layout, e.g. `32x8x128 bf16 kv`.
    pub layout: String,
    /// Tensor-parallel degree (kv heads are divided by it).
    pub tp: u32,
    /// KV bytes per token (per rank).
    pub bytes_per_token: usize,
    /// Tokens per chunk.
    pub chunk_size: usize,
    /// Bytes of one full chunk.
    pub chunk_bytes: usize,
    /// L1 (CPU tier) budget, bytes.
    pub l1_bytes: u64,
    /// Eviction policy.
    pub cache_policy: String,
    /// Whether the L1 pool asked for huge pages.
    pub huge_pages: bool,
    /// Whether the L1 pool was prefaulted.
    pub prefault: bool,
    /// Documents (long-doc-qa) or requests (random).
    pub docs: usize,
    /// Tokens per document / request.
    pub doc_tokens: usize,
    /// Payload bytes per document.
    pub doc_bytes: usize,
    /// Queries per document (long-doc-qa).
    pub queries_per_doc: usize,
    /// Total queries (long-doc-qa) or requests (random).
    pub queries: usize,
    /// Random seed.
    pub seed: u64,
    /// Bytes in the synthetic source ring.
    pub source_ring_bytes: usize,
}

/// The in-run memcpy baseline.
#[derive(Clone, Debug, Serialize)]
pub struct BaselineSection {
    /// Median single-thread memcpy throughput of one chunk, decimal GB/s.
    pub memcpy_gbps: f64,
    /// Bytes per copy (one chunk).
    pub memcpy_copy_bytes: usize,
    /// Destination span the copies rotate over.
    pub memcpy_dst_span_bytes: usize,
    /// Throughput of each pass.
    pub memcpy_pass_gbps: Vec<f64>,
}

/// What the workload measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ResultsSection {
    /// New bytes stored / summed `store` time, GB/s.
    pub store_gbps: f64,
    /// Bytes newly written into L1 by timed stores.
    pub store_bytes: u64,
    /// Summed `store` time.
    pub store_secs: f64,
    /// Timed `store` calls.
    pub store_calls: u64,
    /// Bytes retrieved / summed `retrieve` time (null for workloads without retrieves).
    pub retrieve_gbps: Option<f64>,
    /// Bytes copied out by timed retrieves.
    pub retrieve_bytes: u64,
    /// Summed `retrieve` time.
    pub retrieve_secs: f64,
    /// Timed `retrieve` calls.
    pub retrieve_calls: u64,
    /// Workload lookups (hashing included), p50 µs.
    pub lookup_p50_us: f64,
    /// Workload lookups, p99 µs.
    pub lookup_p99_us: f64,
    /// Workload lookups timed.
    pub lookup_samples: usize,
    /// Hit tokens / requested tokens over the workload's lookups.
    pub hit_rate: f64,
    /// Tokens requested by workload lookups.
    pub requested_tokens: u64,
    /// Tokens found by workload lookups.
    pub hit_tokens: u64,
    /// Chunk hits served by each tier (engine counters).
    pub tier_hits: BTreeMap<String, u64>,
    /// Chunks promoted into L1 from lower tiers.
    pub write_backs: u64,
    /// L1 evictions.
    pub evictions: u64,
    /// Chunks a store could not place because L1 had no room.
    pub dropped_chunks: u64,
    /// Documents stored again after a partial hit.
    pub restores: u64,
    /// Distinct chunks the workload stored.
    pub unique_chunks: u64,
    /// Lower-tier writes per distinct chunk stored (disk, remote).
    pub writes_per_unique_chunk: WriteAmplification,
    /// Retrieved chunks whose bytes were checked against what was stored.
    pub verified_chunks: u64,
    /// Lookup of a 128K-token prompt (512 chunks, hashing included), p50 µs.
    pub lookup_128k_p50_us: f64,
    /// Same, p99 µs.
    pub lookup_128k_p99_us: f64,
    /// Index probe alone for 512 precomputed keys, p50 µs.
    pub probe_512_p50_us: f64,
    /// Same, p99 µs.
    pub probe_512_p99_us: f64,
    /// Random workload: (store time - memcpy time of the same bytes) per GB stored, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overhead_ms_per_gb: Option<f64>,
    /// Random workload: memcpy of the same bytes, same chunking, GB/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memcpy_same_bytes_gbps: Option<f64>,
    /// Every workload lookup latency, µs (for plots; not in the JSON).
    #[serde(skip)]
    pub lookup_us_samples: Vec<f64>,
    /// Cumulative hit rate after each lookup (for plots; not in the JSON).
    #[serde(skip)]
    pub hit_rate_series: Vec<f64>,
}

/// Results relative to the memcpy baseline.
#[derive(Clone, Debug, Serialize)]
pub struct Ratios {
    /// store_gbps / memcpy_gbps.
    pub store: f64,
    /// retrieve_gbps / memcpy_gbps (null without retrieves).
    pub retrieve: Option<f64>,
}

/// Everything a run reports.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Workload name.
    pub workload: String,
    /// Parameters.
    pub config: ConfigSection,
    /// memcpy baseline.
    pub baseline: BaselineSection,
    /// Measurements.
    pub results: ResultsSection,
    /// Ratios to the baseline.
    pub ratios: Ratios,
    /// Wall time of the whole run, seconds.
    pub wall_secs: f64,
    /// Full engine counters at the end of the workload.
    pub engine: kvtier::EngineStats,
}

impl Report {
    /// Computes the ratios from results and baseline.
    pub fn ratios(results: &ResultsSection, baseline: &BaselineSection) -> Ratios {
        let rel = |x: f64| {
            if baseline.memcpy_gbps > 0.0 {
                x / baseline.memcpy_gbps
            } else {
                0.0
            }
        };
        Ratios {
            store: rel(results.store_gbps),
            retrieve: results.retrieve_gbps.map(rel),
        }
    }

    /// Prints the JSON object (the only thing written to stdout with `--json`).
    pub fn print_json(&self) -> anyhow::Result<()> {
        println!("{}", serde_json::to_string_pretty(self)?);
        Ok(())
    }

    /// Prints the human-readable summary table, then the legend of its figures.
    pub fn print_table(&self) {
        for (k, v) in self.rows() {
            println!("{k:<30} {v}");
        }
        println!();
        print!("{LEGEND}");
    }

    fn rows(&self) -> Vec<(String, String)> {
        let c = &self.config;
        let r = &self.results;
        let mut rows = vec![
            ("workload".into(), self.workload.clone()),
            (
                "model".into(),
                format!("{} ({}, tp {})", c.model, c.layout, c.tp),
            ),
            (
                "chunk".into(),
                format!(
                    "{} tokens, {}",
                    c.chunk_size,
                    human_bytes(c.chunk_bytes as u64)
                ),
            ),
            (
                "L1".into(),
                format!("{} ({})", human_bytes(c.l1_bytes), c.cache_policy),
            ),
            (
                "docs x tokens".into(),
                format!(
                    "{} x {} ({} each)",
                    c.docs,
                    c.doc_tokens,
                    human_bytes(c.doc_bytes as u64)
                ),
            ),
            (
                "memcpy baseline".into(),
                format!("{:.2} GB/s", self.baseline.memcpy_gbps),
            ),
            (
                "store".into(),
                format!(
                    "{:.2} GB/s  ({:.2}x memcpy)",
                    r.store_gbps, self.ratios.store
                ),
            ),
        ];
        if let (Some(g), Some(x)) = (r.retrieve_gbps, self.ratios.retrieve) {
            rows.push(("retrieve".into(), format!("{g:.2} GB/s  ({x:.2}x memcpy)")));
        }
        if let Some(o) = r.overhead_ms_per_gb {
            rows.push(("store overhead vs memcpy".into(), format!("{o:.1} ms/GB")));
        }
        rows.extend([
            (
                "lookup p50 / p99".into(),
                format!("{:.1} / {:.1} us", r.lookup_p50_us, r.lookup_p99_us),
            ),
            ("hit rate".into(), format!("{:.3}", r.hit_rate)),
            ("tier hits (chunks)".into(), format!("{:?}", r.tier_hits)),
            (
                "evictions / write-backs".into(),
                format!("{} / {}", r.evictions, r.write_backs),
            ),
            (
                "restores / dropped chunks".into(),
                format!("{} / {}", r.restores, r.dropped_chunks),
            ),
            ("verified chunks".into(), r.verified_chunks.to_string()),
            (
                "lookup 128K tok p50 / p99".into(),
                format!(
                    "{:.1} / {:.1} us",
                    r.lookup_128k_p50_us, r.lookup_128k_p99_us
                ),
            ),
            (
                "probe 512 keys p50 / p99".into(),
                format!("{:.1} / {:.1} us", r.probe_512_p50_us, r.probe_512_p99_us),
            ),
            ("wall time".into(), format!("{:.1} s", self.wall_secs)),
        ]);
        rows
    }
}

/// What each figure of the long-doc-qa / random table means and what to expect; printed
/// under it (`--json` carries the same figures, documented field by field).
pub const LEGEND: &str = "\
What the figures mean (GB/s are decimal, 1e9 bytes per second):
  memcpy baseline   one thread copying one chunk at a time through cold memory, measured in
                    this run: the reference for every ratio (absolute numbers vary by machine)
  store             bytes newly written into L1 / time spent in store calls (copy, checksum,
                    index). random: the extra ms per GB over a memcpy of the same bytes is
                    the store overhead
  retrieve          bytes copied out / time in retrieve calls (copy, checksum check). Chunks
                    of 4 MiB or more are copied by several threads with streaming stores, so
                    store and retrieve can beat the one-thread baseline (ratios above 1x)
  lookup p50 / p99  lookup of one workload prompt, hashing its tokens included
  hit rate          hit tokens / requested tokens over the workload's lookups. long-doc-qa
                    stores 1.5x the L1 budget by default and queries each document twice in
                    random order, so about 0.5 is expected (1.0 when --docs fits in L1);
                    random never repeats a prompt: 0
  tier hits         chunks served by each tier (cpu = L1)
  evictions         chunks L1 dropped to make room; write-backs: chunks copied up into L1
                    from a lower tier (0 without a disk or remote tier)
  restores          queries that hit only part of a document, which was then stored again
                    (as a serving engine stores KV it had to recompute)
  dropped chunks    chunks a store found no room for (should be 0)
  verified chunks   retrieved chunks compared byte for byte with what was stored (any
                    mismatch fails the run)
  lookup 128K tok   side engine: lookup of one 131,072-token prompt (512 chunks), hashing
                    included; probe 512 keys: the index probe alone for the same keys
";

/// `1.50 GiB`-style sizes for the table.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        let s: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&s, 50.0), 50.0);
        assert_eq!(percentile(&s, 99.0), 99.0);
        assert_eq!(percentile(&s, 100.0), 100.0);
        assert_eq!(percentile(&s, 0.0), 1.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
        assert_eq!(median(&[5.0, 1.0, 3.0]), 3.0);
    }

    #[test]
    fn throughput_is_decimal_gb_and_never_nan() {
        let mut t = Throughput::default();
        assert_eq!(t.gbps(), 0.0);
        t.add(2_000_000_000, Duration::from_millis(500));
        t.add(2_000_000_000, Duration::from_millis(500));
        assert!((t.gbps() - 4.0).abs() < 1e-9);
        assert_eq!(t.calls, 2);
    }

    #[test]
    fn human_bytes_picks_a_unit() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(32 << 20), "32.00 MiB");
        assert_eq!(human_bytes(3 << 29), "1.50 GiB");
    }
}
