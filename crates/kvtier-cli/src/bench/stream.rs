//! Streaming stores for the tier scenarios (disk, remote): each document is stored one
//! chunk at a time (the prompt grows by a chunk per store, earlier chunks are already
//! present), with at most `window` lower-tier writes in flight, until every write is
//! acknowledged. This measures a lower tier's sustained write throughput without letting the
//! engine's bounded write queue drop stores.
//!
//! The window frees a slot as soon as *any* write finishes, as the raw baselines'
//! `buffer_unordered` loops do: waiting for the oldest store instead let one slow write (an
//! object PUT that meets a server hiccup) idle the other slots, so the engine ran with about
//! 5.4 writes in flight against the raw loop's 7.4 and looked ~30% slower than the store.
//!
//! The clock runs only while the engine works: generating a document's synthetic KV (a
//! copy as large as the document) is the model's job, not the cache's, so documents are
//! composed before the clock starts, as many at a time as fit [`COMPOSE_AHEAD_BYTES`]
//! (the remote scenarios' whole run), and the writes in flight are drained and the clock
//! stopped before the next batch is composed. That costs the engine a pipeline restart per
//! batch (the raw loops pay one per run), never the other way round.

use std::future::Future;
use std::time::Instant;

use anyhow::Result;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use kvtier::manager::WriteOutcome;
use kvtier::tier::PutOutcome;
use kvtier::Engine;

use super::buffers::{AlignedBuf, SourceRing};
use super::report::UniqueChunks;

/// Lower-tier write outcomes of a streaming store.
#[derive(Clone, Copy, Debug, Default)]
pub struct Streamed {
    /// Chunk writes that stored the chunk (bytes moved).
    pub acked: usize,
    /// Chunk writes the tier answered with "already there": nothing stored, no bytes
    /// counted as stored.
    pub already: usize,
    /// Chunk writes skipped or failed.
    pub skipped: usize,
    /// Distinct chunks stored (every document's full chunk list).
    pub unique_chunks: u64,
    /// Time from each document's first store to its last acknowledgement, summed.
    pub secs: f64,
}

impl Streamed {
    fn count(&mut self, outcomes: Vec<WriteOutcome>) {
        for o in outcomes {
            match o.result {
                Ok(PutOutcome::Stored) => self.acked += 1,
                Ok(PutOutcome::AlreadyPresent) => self.already += 1,
                _ => self.skipped += 1,
            }
        }
    }
}

/// Writes in flight, each group (a store's ticket) weighted by its number of writes; groups
/// finish in any order.
struct InFlight<T> {
    writes: usize,
    pending: FuturesUnordered<BoxFuture<'static, (usize, T)>>,
}

impl<T: Send + 'static> InFlight<T> {
    fn new() -> InFlight<T> {
        InFlight {
            writes: 0,
            pending: FuturesUnordered::new(),
        }
    }

    /// Tracks `done`, which resolves when its `writes` writes have finished.
    fn push(&mut self, writes: usize, done: impl Future<Output = T> + Send + 'static) {
        self.writes += writes;
        self.pending.push(done.map(move |t| (writes, t)).boxed());
    }

    /// Waits until at most `keep` writes are in flight, handing each finished group to
    /// `finished` in the order they finish.
    async fn settle(&mut self, keep: usize, mut finished: impl FnMut(T)) {
        while self.writes > keep {
            let Some((n, t)) = self.pending.next().await else {
                break;
            };
            self.writes -= n;
            finished(t);
        }
    }
}

/// Payload bytes composed ahead of the clock: documents are stored in batches of as many as
/// fit (at least one), and the pipeline drains only between batches.
const COMPOSE_AHEAD_BYTES: usize = 256 << 20;

/// Stores `docs` documents (tokens from `tokens_of`, payload from the ring, under `salt`)
/// as described above.
pub fn store_documents(
    engine: &Engine,
    ring: &SourceRing,
    salt: Option<&str>,
    docs: usize,
    doc_tokens: usize,
    tokens_of: impl Fn(usize) -> Vec<u32>,
    window: usize,
) -> Result<Streamed> {
    let chunk = engine.key_space().chunk_size();
    let bpt = engine.bytes_per_token();
    let doc_bytes = doc_tokens * bpt;
    let batch = (COMPOSE_AHEAD_BYTES / doc_bytes.max(1)).clamp(1, docs.max(1));
    let mut payload = AlignedBuf::new(batch * doc_bytes);
    let mut inflight = InFlight::new();
    let mut s = Streamed::default();
    let mut unique = UniqueChunks::default();
    let mut secs = 0.0;
    for first in (0..docs).step_by(batch) {
        let batch_docs = first..(first + batch).min(docs);
        let mut tokens = Vec::with_capacity(batch);
        for (d, out) in batch_docs.clone().zip(payload.chunks_mut(doc_bytes)) {
            ring.compose(d as u64, out);
            tokens.push(tokens_of(d));
        }
        let t0 = Instant::now();
        for (tokens, payload) in tokens.iter().zip(payload.chunks(doc_bytes)) {
            for c in 1..=doc_tokens / chunk {
                // A slot for this store's write before it is issued: at most `window` in
                // flight, like the raw loops.
                futures::executor::block_on(
                    inflight.settle(window.saturating_sub(1), |o| s.count(o)),
                );
                let n = c * chunk;
                let ticket = engine
                    .store(&tokens[..n], salt, &payload[..n * bpt])?
                    .ticket;
                if !ticket.is_empty() {
                    inflight.push(ticket.len(), ticket.wait_async());
                }
            }
        }
        futures::executor::block_on(inflight.settle(0, |o| s.count(o)));
        secs += t0.elapsed().as_secs_f64();
        for tokens in &tokens {
            unique.note(engine, &tokens[..doc_tokens / chunk * chunk], salt)?;
        }
    }
    s.secs = secs;
    s.unique_chunks = unique.count();
    Ok(s)
}

/// What [`retrieve_documents`] read back.
#[derive(Clone, Copy, Debug, Default)]
pub struct Retrieved {
    /// Chunks of the documents' hit prefixes.
    pub hits: usize,
    /// Of those, chunks whose bytes matched what the ring wrote.
    pub verified: usize,
    /// Time spent in `Engine::retrieve`, summed (verification excluded).
    pub secs: f64,
}

/// Retrieves `docs` documents (tokens from `tokens_of`, under `salt`) and checks every hit
/// chunk against the ring: a chunk that differs is an error naming `source`.
pub fn retrieve_documents(
    engine: &Engine,
    ring: &SourceRing,
    salt: Option<&str>,
    docs: usize,
    doc_tokens: usize,
    tokens_of: impl Fn(usize) -> Vec<u32>,
    source: &str,
) -> Result<Retrieved> {
    let chunk = engine.key_space().chunk_size();
    let chunk_bytes = chunk * engine.bytes_per_token();
    let mut out = AlignedBuf::new(doc_tokens * engine.bytes_per_token());
    let mut r = Retrieved::default();
    for d in 0..docs {
        let t0 = Instant::now();
        let got = engine.retrieve(&tokens_of(d), salt, &mut out)?;
        r.secs += t0.elapsed().as_secs_f64();
        let n = got.hit_tokens / chunk;
        r.hits += n;
        for i in 0..n {
            if !ring.chunk_matches(d as u64, i, &out[i * chunk_bytes..(i + 1) * chunk_bytes]) {
                anyhow::bail!("chunk {i} of document {d} read back from {source} differs");
            }
            r.verified += 1;
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use futures::channel::oneshot;
    use futures::executor::block_on;

    use super::*;

    #[test]
    fn a_slow_write_does_not_hold_back_the_others() {
        let mut w = InFlight::new();
        let (slow_tx, slow_rx) = oneshot::channel::<u32>();
        w.push(1, async move { slow_rx.await.unwrap_or(0) });
        w.push(1, async { 2 });
        w.push(2, async { 3 });
        let mut done = Vec::new();
        // Room for one more write: the finished ones free it while the oldest still runs
        // (a first-in-first-out window would wait here for the slow write).
        let settled = w.settle(1, |t| done.push(t)).now_or_never();
        assert!(settled.is_some(), "waited for the slow write");
        done.sort_unstable();
        assert_eq!((done.as_slice(), w.writes), ([2, 3].as_slice(), 1));
        slow_tx.send(1).unwrap();
        block_on(w.settle(0, |t| done.push(t)));
        assert_eq!((done.as_slice(), w.writes), ([2, 3, 1].as_slice(), 0));
    }
}
