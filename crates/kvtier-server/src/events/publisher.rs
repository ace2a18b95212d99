//! The ZeroMQ side: a PUB socket sending `[topic, seq, batch]` and a ROUTER socket that
//! resends buffered batches from a sequence number, as vLLM's `ZmqEventPublisher` does.
//!
//! Replay protocol (vLLM's): a client (DEALER, or REQ) sends `[b"", start_seq]` with the
//! sequence number as 8 bytes big-endian; it gets `[b"", topic, seq, batch]` for every
//! buffered batch from `start_seq` on, then the end marker `[b"", b"", -1, b""]`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use bytes::Bytes;
use tokio::sync::oneshot;
use zeromq::{PubSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use super::collector::Collector;
use super::wire::encode_batch;
use super::KvEventsConfig;

/// Most events in one batch (bigger backlogs go out as several batches).
const MAX_EVENTS_PER_BATCH: usize = 4096;
/// A send to subscribers that takes longer than this is abandoned (a stuck subscriber must
/// not stall the stream for the others; it will see a gap in the sequence and replay).
const SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// The end-of-replay marker's sequence frame: -1 as 8 bytes big-endian.
const END_SEQ: [u8; 8] = [0xff; 8];

/// The bound endpoints.
#[derive(Clone, Debug)]
pub struct Endpoints {
    /// PUB endpoint.
    pub publish: String,
    /// ROUTER (replay) endpoint.
    pub replay: Option<String>,
}

/// A ZeroMQ endpoint the Rust implementation binds: vLLM's `tcp://*:P` means all
/// interfaces.
fn bindable(endpoint: &str) -> Result<String> {
    let Some(rest) = endpoint.strip_prefix("tcp://") else {
        anyhow::bail!(
            "KV-event endpoint `{endpoint}` is not tcp://HOST:PORT (ipc and inproc endpoints are \
             not supported by `kvtier serve`)"
        );
    };
    Ok(match rest.strip_prefix("*:") {
        Some(port) => format!("tcp://0.0.0.0:{port}"),
        None => endpoint.to_string(),
    })
}

fn endpoint_string(e: &zeromq::Endpoint) -> String {
    e.to_string()
}

struct Ring {
    batches: VecDeque<(u64, Bytes)>,
    cap: usize,
}

impl Ring {
    fn push(&mut self, seq: u64, payload: Bytes) {
        if self.batches.len() >= self.cap {
            self.batches.pop_front();
        }
        self.batches.push_back((seq, payload));
    }
}

/// Runs the publisher until `stop` fires (then publishes what is still queued).
pub(super) async fn run(
    cfg: KvEventsConfig,
    collector: Arc<Collector>,
    bound: oneshot::Sender<Result<Endpoints>>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut publish = PubSocket::new();
    let mut replay = cfg.replay_endpoint.as_ref().map(|_| RouterSocket::new());
    let setup = async {
        let pe = publish
            .bind(&bindable(&cfg.endpoint)?)
            .await
            .with_context(|| format!("binding the KV-event endpoint {}", cfg.endpoint))?;
        let re = match (&mut replay, &cfg.replay_endpoint) {
            (Some(r), Some(e)) => {
                Some(endpoint_string(&r.bind(&bindable(e)?).await.with_context(
                    || format!("binding the KV-event replay endpoint {e}"),
                )?))
            }
            _ => None,
        };
        Ok(Endpoints {
            publish: endpoint_string(&pe),
            replay: re,
        })
    };
    let res: Result<Endpoints> = setup.await;
    let ok = res.is_ok();
    let _ = bound.send(res);
    if !ok {
        return;
    }
    let topic = Bytes::from(cfg.topic.clone().into_bytes());
    let mut ring = Ring {
        batches: VecDeque::new(),
        cap: cfg.buffer_steps.max(1),
    };
    let mut seq: u64 = 0;
    let mut tick = tokio::time::interval(cfg.flush_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = &mut stop => true,
            req = recv_replay(&mut replay) => {
                if let Some(req) = req {
                    serve_replay(replay.as_mut(), &ring, &topic, req).await;
                }
                continue;
            }
        };
        let (events, overflowed) = collector.take();
        if overflowed {
            tracing::warn!(
                max_queue_size = cfg.max_queue_size,
                "KV events: the publisher fell behind; sent AllBlocksCleared (subscribers \
                 relearn this node's blocks from later stores)"
            );
        }
        for part in events.chunks(MAX_EVENTS_PER_BATCH) {
            let payload = Bytes::from(encode_batch(now(), part, 0));
            let mut msg = ZmqMessage::from(topic.clone());
            msg.push_back(Bytes::copy_from_slice(&seq.to_be_bytes()));
            msg.push_back(payload.clone());
            match tokio::time::timeout(SEND_TIMEOUT, publish.send(msg)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, seq, "KV events: publishing a batch failed")
                }
                Err(_) => tracing::warn!(
                    seq,
                    "KV events: a subscriber is not reading; batch skipped for it"
                ),
            }
            ring.push(seq, payload);
            seq += 1;
        }
        if stopping {
            break;
        }
    }
}

async fn recv_replay(replay: &mut Option<RouterSocket>) -> Option<ZmqMessage> {
    match replay {
        Some(r) => r.recv().await.ok(),
        None => std::future::pending().await,
    }
}

async fn serve_replay(
    replay: Option<&mut RouterSocket>,
    ring: &Ring,
    topic: &Bytes,
    req: ZmqMessage,
) {
    let Some(r) = replay else { return };
    let frames = req.into_vec();
    // [identity, empty delimiter, start sequence number]
    let (id, start) = match frames.as_slice() {
        [id, delim, start] if delim.is_empty() && start.len() == 8 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(start);
            (id.clone(), u64::from_be_bytes(b))
        }
        _ => {
            tracing::warn!(
                frames = frames.len(),
                "KV events: malformed replay request ignored"
            );
            return;
        }
    };
    let reply = |parts: [Bytes; 4]| {
        let mut m = ZmqMessage::from(id.clone());
        for p in parts {
            m.push_back(p);
        }
        m
    };
    for (s, payload) in ring.batches.iter().filter(|(s, _)| *s >= start) {
        let m = reply([
            Bytes::new(),
            topic.clone(),
            Bytes::copy_from_slice(&s.to_be_bytes()),
            payload.clone(),
        ]);
        if !matches!(
            tokio::time::timeout(SEND_TIMEOUT, r.send(m)).await,
            Ok(Ok(()))
        ) {
            tracing::warn!(start, "KV events: replay client gone or not reading");
            return;
        }
    }
    let end = reply([
        Bytes::new(),
        Bytes::new(),
        Bytes::from_static(&END_SEQ),
        Bytes::new(),
    ]);
    let _ = tokio::time::timeout(SEND_TIMEOUT, r.send(end)).await;
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_hosts_bind_all_interfaces() {
        assert_eq!(bindable("tcp://*:5557").unwrap(), "tcp://0.0.0.0:5557");
        assert_eq!(bindable("tcp://127.0.0.1:0").unwrap(), "tcp://127.0.0.1:0");
        let e = bindable("ipc:///tmp/x").unwrap_err().to_string();
        assert!(e.contains("tcp://HOST:PORT"), "{e}");
    }
}
