//! `kvtier bench long-doc-qa --kv-events-ab`: what a KV-event stream costs the store and
//! retrieve paths. Each round builds two engines, one with `kvtier serve`'s event stream
//! publishing its L1 changes (loopback, port picked) and one without, and runs the
//! long-doc-qa pattern on both: every document stored, then retrieved `--queries` times,
//! each operation on the two engines back to back with the side going first alternating by
//! round, so a noisy neighbour hits both sides of a pair. The figure is the median of the
//! per-round on/off ratios (goal: within 1%).

use anyhow::{ensure, Context, Result};
use kvtier::{Engine, EngineConfig, KvCache};
use kvtier_server::events::{EventStream, KvEventsConfig};
use rand::{rngs::StdRng, SeedableRng};
use serde::Serialize;
use tracing::info;

use super::buffers::{AlignedBuf, SourceRing};
use super::report::{gbps, median, Spread};
use super::server::{paired_round, tokens};
use super::{ModelShape, Plan};

/// The A/B report.
#[derive(Debug, Serialize)]
pub struct EventsAbReport {
    /// Workload pattern measured.
    pub workload: &'static str,
    /// Rounds (each: both engines store every document, retrieve it, remove it).
    pub rounds: usize,
    /// Documents per round.
    pub docs: usize,
    /// Tokens per document.
    pub doc_tokens: usize,
    /// Store GB/s with events off, per round.
    pub store_gbps_off: Vec<f64>,
    /// Store GB/s with events on, per round.
    pub store_gbps_on: Vec<f64>,
    /// Retrieve GB/s with events off, per round.
    pub retrieve_gbps_off: Vec<f64>,
    /// Retrieve GB/s with events on, per round.
    pub retrieve_gbps_on: Vec<f64>,
    /// Per-round store ratio on/off: min, median, max.
    pub store_ratio: Spread,
    /// Per-round retrieve ratio on/off: min, median, max.
    pub retrieve_ratio: Spread,
    /// Events the streams published (announcements, withdrawals), all rounds.
    pub events_published: u64,
}

/// Runs `rounds` rounds.
pub fn run(
    cfg: &EngineConfig,
    shape: &ModelShape,
    plan: &Plan,
    ring: &SourceRing,
    rounds: usize,
) -> Result<EventsAbReport> {
    let rounds = rounds.max(1);
    let doc_tokens = plan.doc_tokens.div_ceil(plan.chunk_size) * plan.chunk_size;
    let doc_bytes = doc_tokens * plan.bytes_per_token;
    // Both engines hold every document (no eviction: the pairs stay comparable).
    let fit = (cfg.max_local_cpu_size as f64 * 0.8) as usize / doc_bytes.max(1);
    ensure!(
        fit >= 1,
        "one {doc_tokens}-token document does not fit L1; raise --l1-gb or lower --doc-tokens"
    );
    let docs = plan.docs.clamp(1, fit);
    let mut rng = StdRng::seed_from_u64(plan.seed ^ 0xe7e7);
    let toks: Vec<Vec<u32>> = (0..docs).map(|_| tokens(&mut rng, doc_tokens)).collect();
    let payloads: Vec<AlignedBuf> = (0..docs)
        .map(|d| {
            let mut b = AlignedBuf::new(doc_bytes);
            ring.compose(d as u64, &mut b);
            b
        })
        .collect();
    let mut out = AlignedBuf::new(doc_bytes);
    let mut rep = EventsAbReport {
        workload: "long-doc-qa",
        rounds,
        docs,
        doc_tokens,
        store_gbps_off: vec![],
        store_gbps_on: vec![],
        retrieve_gbps_off: vec![],
        retrieve_gbps_on: vec![],
        store_ratio: Spread::default(),
        retrieve_ratio: Spread::default(),
        events_published: 0,
    };
    for round in 0..rounds {
        let on = Engine::new(cfg.clone(), shape.identity()).context("building the bench engine")?;
        let off =
            Engine::new(cfg.clone(), shape.identity()).context("building the bench engine")?;
        let ev = KvEventsConfig {
            enable_kv_cache_events: true,
            endpoint: "tcp://127.0.0.1:0".into(),
            ..KvEventsConfig::default()
        };
        let stream = EventStream::start(on.core(), ev).context("starting the KV-event stream")?;
        let sides: [&dyn KvCache; 2] = [&on, &off];
        let salt = format!("events-ab-{round}");
        let [a, b] = paired_round(
            sides,
            round % 2,
            &salt,
            &toks,
            &payloads,
            &mut out,
            plan.queries_per_doc.max(1),
        )?;
        rep.events_published += stream.shutdown();
        let (s_on, r_on) = (
            gbps(a.store_bytes, a.store_secs),
            gbps(a.retrieve_bytes, a.retrieve_secs),
        );
        let (s_off, r_off) = (
            gbps(b.store_bytes, b.store_secs),
            gbps(b.retrieve_bytes, b.retrieve_secs),
        );
        info!(
            round,
            store_on = format!("{s_on:.2}"),
            store_off = format!("{s_off:.2}"),
            retrieve_on = format!("{r_on:.2}"),
            retrieve_off = format!("{r_off:.2}"),
            "events A/B round (GB/s)"
        );
        rep.store_gbps_on.push(s_on);
        rep.store_gbps_off.push(s_off);
        rep.retrieve_gbps_on.push(r_on);
        rep.retrieve_gbps_off.push(r_off);
    }
    let ratios = |on: &[f64], off: &[f64]| -> Vec<f64> {
        on.iter()
            .zip(off)
            .filter(|(_, b)| **b > 0.0)
            .map(|(a, b)| a / b)
            .collect()
    };
    rep.store_ratio = Spread::of(&ratios(&rep.store_gbps_on, &rep.store_gbps_off));
    rep.retrieve_ratio = Spread::of(&ratios(&rep.retrieve_gbps_on, &rep.retrieve_gbps_off));
    Ok(rep)
}

impl EventsAbReport {
    /// The human form.
    pub fn print_table(&self) {
        println!(
            "KV events A/B, {} pattern ({} rounds of {} documents x {} tokens; each operation \
             on both engines back to back; ratio = events on / off, per round)",
            self.workload, self.rounds, self.docs, self.doc_tokens
        );
        println!(
            "  store    GB/s off median {:.2}, on median {:.2}; ratio min / median / max {}",
            median(&self.store_gbps_off),
            median(&self.store_gbps_on),
            self.store_ratio
        );
        println!(
            "  retrieve GB/s off median {:.2}, on median {:.2}; ratio min / median / max {}",
            median(&self.retrieve_gbps_off),
            median(&self.retrieve_gbps_on),
            self.retrieve_ratio
        );
        println!("  events published: {}", self.events_published);
    }
}
