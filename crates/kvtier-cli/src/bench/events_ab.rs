//! `kvtier bench long-doc-qa --kv-events-ab`: what a KV-event stream costs the store and
//! retrieve paths. Each round runs the long-doc-qa workload twice on fresh engines, once
//! with `kvtier serve`'s event stream publishing L1's changes (loopback, port picked) and
//! once without, in alternating order, so a noisy neighbour hits both sides of a pair. The
//! figure is the median of the per-round on/off ratios (goal: within 1%).

use anyhow::{Context, Result};
use kvtier::{Engine, EngineConfig};
use kvtier_server::events::{EventStream, KvEventsConfig};
use serde::Serialize;
use tracing::info;

use super::buffers::SourceRing;
use super::report::{median, Spread};
use super::{workload, ModelShape, Plan};

/// The A/B report.
#[derive(Debug, Serialize)]
pub struct EventsAbReport {
    /// Workload measured.
    pub workload: &'static str,
    /// Rounds (each one run with events off and one with events on).
    pub rounds: usize,
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
    /// Chunks the streams announced or withdrew (summed over the "on" runs).
    pub events_published: u64,
}

/// One run of the workload; `events` starts the server's stream on the engine first.
fn one_run(
    cfg: &EngineConfig,
    shape: &ModelShape,
    plan: &Plan,
    ring: &SourceRing,
    events: bool,
) -> Result<(f64, f64, u64)> {
    let engine = Engine::new(cfg.clone(), shape.identity()).context("building the bench engine")?;
    let stream = if events {
        let ev = KvEventsConfig {
            enable_kv_cache_events: true,
            endpoint: "tcp://127.0.0.1:0".into(),
            ..KvEventsConfig::default()
        };
        Some(EventStream::start(engine.core(), ev).context("starting the KV-event stream")?)
    } else {
        None
    };
    let r = workload::long_doc_qa(&engine, plan, ring)?;
    let published = stream.map_or(0, EventStream::shutdown);
    Ok((r.store_gbps, r.retrieve_gbps.unwrap_or(0.0), published))
}

/// Runs `rounds` alternating pairs.
pub fn run(
    cfg: &EngineConfig,
    shape: &ModelShape,
    plan: &Plan,
    ring: &SourceRing,
    rounds: usize,
) -> Result<EventsAbReport> {
    let rounds = rounds.max(1);
    let mut rep = EventsAbReport {
        workload: "long-doc-qa",
        rounds,
        store_gbps_off: vec![],
        store_gbps_on: vec![],
        retrieve_gbps_off: vec![],
        retrieve_gbps_on: vec![],
        store_ratio: Spread::default(),
        retrieve_ratio: Spread::default(),
        events_published: 0,
    };
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for on in order {
            let (s, r, n) = one_run(cfg, shape, plan, ring, on)?;
            info!(
                round,
                events = on,
                store_gbps = format!("{s:.2}"),
                retrieve_gbps = format!("{r:.2}"),
                "events A/B run"
            );
            if on {
                rep.store_gbps_on.push(s);
                rep.retrieve_gbps_on.push(r);
                rep.events_published += n;
            } else {
                rep.store_gbps_off.push(s);
                rep.retrieve_gbps_off.push(r);
            }
        }
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
            "KV events A/B, {} ({} alternating rounds; ratio = events on / off, per round)",
            self.workload, self.rounds
        );
        println!(
            "  store    GB/s off median {:.2}, on median {:.2}; ratio {}",
            median(&self.store_gbps_off),
            median(&self.store_gbps_on),
            self.store_ratio
        );
        println!(
            "  retrieve GB/s off median {:.2}, on median {:.2}; ratio {}",
            median(&self.retrieve_gbps_off),
            median(&self.retrieve_gbps_on),
            self.retrieve_ratio
        );
        println!("  events published: {}", self.events_published);
    }
}
