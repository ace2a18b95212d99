//! KV events from `kvtier serve`: a node-level stream of the blocks this server holds in
//! L1, in vLLM's KV-event wire format, so routers that index vLLM's events (Dynamo's KV
//! router, llm-d's precise prefix-cache scorer) see kvtier too.
//!
//! - **What**: `BlockStored` when a chunk enters L1 (a store, or a read from a lower tier
//!   written back), `BlockRemoved` when it leaves (eviction, `remove`, tenant deletion,
//!   clear), medium `CPU`; the same for the disk tier, medium `STORAGE`; all models and
//!   clients of the server. Block hashes are kvtier's
//!   32-byte chunk keys; `block_size` is the chunk's token count.
//! - **When**: a change is published at most `flush_interval` (20 ms) after L1's index
//!   changed. A store is announced only once its chunk is in L1's index (a load hits it),
//!   a removal only after the chunk left it.
//! - **Cost when off**: none; L1 has no observer and does no work for events.
//!
//! Configured like vLLM's `--kv-events-config` ([`KvEventsConfig`]).

mod collector;
mod publisher;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kvtier::EngineCore;
use serde::Deserialize;
use tokio::sync::oneshot;

pub use publisher::Endpoints;

use crate::stoppable::StoppableThread;
use collector::Collector;

/// Settings of the KV-event stream, in vLLM's `KVEventsConfig` keys (JSON), e.g.
/// `{"enable_kv_cache_events": true, "endpoint": "tcp://*:5557",
/// "replay_endpoint": "tcp://*:5558", "topic": "kv-events"}`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KvEventsConfig {
    /// On/off (off by default).
    pub enable_kv_cache_events: bool,
    /// `zmq` (the only publisher) or `null` (off).
    pub publisher: String,
    /// PUB endpoint, `tcp://HOST:PORT` (`*` binds all interfaces, port 0 picks one).
    pub endpoint: String,
    /// ROUTER endpoint answering replay requests; none: no replay.
    pub replay_endpoint: Option<String>,
    /// Batches kept for replay.
    pub buffer_steps: usize,
    /// Accepted for compatibility with vLLM's config; the Rust sockets have no HWM.
    pub hwm: usize,
    /// Index changes queued between two batches before the queue is dropped and the stream
    /// restarts with `AllBlocksCleared`.
    pub max_queue_size: usize,
    /// Topic frame of every message.
    pub topic: String,
    /// How often queued changes are published (not a vLLM key).
    #[serde(skip)]
    pub flush_interval: Duration,
}

impl Default for KvEventsConfig {
    fn default() -> Self {
        KvEventsConfig {
            enable_kv_cache_events: false,
            publisher: "zmq".into(),
            endpoint: "tcp://*:5557".into(),
            replay_endpoint: None,
            buffer_steps: 10_000,
            hwm: 100_000,
            max_queue_size: 100_000,
            topic: String::new(),
            flush_interval: Duration::from_millis(20),
        }
    }
}

impl KvEventsConfig {
    /// Parses the JSON form; the error names the accepted keys.
    pub fn from_json(text: &str) -> Result<KvEventsConfig> {
        let c: KvEventsConfig = serde_json::from_str(text).with_context(|| {
            "bad --kv-events-config: expected a JSON object with vLLM's KVEventsConfig keys \
             (enable_kv_cache_events, publisher, endpoint, replay_endpoint, buffer_steps, hwm, \
             max_queue_size, topic)"
        })?;
        if !matches!(c.publisher.as_str(), "zmq" | "null") {
            bail!(
                "--kv-events-config publisher `{}` is unknown: use \"zmq\" (or \"null\" for off)",
                c.publisher
            );
        }
        if c.buffer_steps == 0 || c.max_queue_size == 0 {
            bail!("--kv-events-config buffer_steps and max_queue_size must be at least 1");
        }
        Ok(c)
    }

    /// Whether a stream is to be started.
    pub fn enabled(&self) -> bool {
        self.enable_kv_cache_events && self.publisher == "zmq"
    }
}

/// A running KV-event stream; [`EventStream::shutdown`] publishes what is queued and stops.
pub struct EventStream {
    endpoints: Endpoints,
    thread: StoppableThread,
    collector: Arc<Collector>,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream")
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

impl EventStream {
    /// Binds the sockets and starts publishing `core`'s L1 changes from a thread of its own.
    /// Fails when an endpoint cannot be bound or L1 does not cache (`local_cpu: false`).
    pub fn start(core: &EngineCore, cfg: KvEventsConfig) -> Result<EventStream> {
        let collector = Arc::new(Collector::new(cfg.max_queue_size));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the KV-event runtime")?;
        let (bound_tx, bound_rx) = oneshot::channel();
        let (stop_tx, stop_rx) = oneshot::channel();
        let c = collector.clone();
        let thread = std::thread::Builder::new()
            .name("kvtier-events".into())
            .spawn(move || rt.block_on(publisher::run(cfg, c, bound_tx, stop_rx)))
            .context("spawning the KV-event thread")?;
        let endpoints = match bound_rx.blocking_recv() {
            Ok(Ok(e)) => e,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => bail!("the KV-event thread stopped while binding its sockets"),
        };
        let mut stream = EventStream {
            endpoints,
            thread: StoppableThread::new(stop_tx, thread),
            collector: collector.clone(),
        };
        if !core.manager().set_l1_observer(collector.l1.clone()) {
            stream.thread.stop();
            bail!(
                "KV events report what L1 holds, and this config has no L1 cache \
                 (local_cpu: false): set local_cpu: true or leave --kv-events-config off"
            );
        }
        // The disk tier's chunks too, when there is one (false: none).
        let disk = core
            .manager()
            .set_tier_observer(kvtier::tier::DISK_TIER_NAME, collector.disk.clone());
        tracing::info!(publish = %stream.endpoints.publish, replay = ?stream.endpoints.replay, disk, "KV events publishing");
        Ok(stream)
    }

    /// The bound endpoints (with the port picked for port 0).
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// Publishes what is still queued, then stops; returns how many events (announcements,
    /// withdrawals, clears) the stream published in all.
    pub fn shutdown(mut self) -> u64 {
        self.thread.stop();
        self.collector.events_taken()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_takes_vllm_keys_and_names_them_on_a_typo() {
        let c = KvEventsConfig::from_json(
            r#"{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:5557",
                "replay_endpoint": "tcp://*:5558", "topic": "kv", "buffer_steps": 5, "hwm": 1}"#,
        )
        .unwrap();
        assert!(c.enabled());
        assert_eq!(c.replay_endpoint.as_deref(), Some("tcp://*:5558"));
        assert_eq!((c.topic.as_str(), c.buffer_steps), ("kv", 5));
        assert!(!KvEventsConfig::from_json("{}").unwrap().enabled());
        let e = format!(
            "{:#}",
            KvEventsConfig::from_json(r#"{"enable_kv_events": true}"#).unwrap_err()
        );
        assert!(
            e.contains("enable_kv_cache_events") && e.contains("unknown field"),
            "{e}"
        );
        assert!(KvEventsConfig::from_json(r#"{"publisher": "nats"}"#).is_err());
    }
}
