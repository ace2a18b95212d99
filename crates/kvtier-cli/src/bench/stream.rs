//! Streaming stores for the tier scenarios (disk, remote): each document is stored one
//! chunk at a time (the prompt grows by a chunk per store, earlier chunks are already
//! present), with at most `window` stores' lower-tier writes in flight, until every write is
//! acknowledged. This measures a lower tier's sustained write throughput without letting the
//! engine's bounded write queue drop stores.
//!
//! The clock runs only while the engine works: generating a document's synthetic KV (a
//! copy as large as the document) is the model's job, not the cache's, so the writes in
//! flight are drained and the clock stopped before each document is composed. That costs
//! the engine a pipeline restart per document, never the other way round.

use std::collections::VecDeque;
use std::time::Instant;

use anyhow::Result;
use kvtier::manager::StoreTicket;
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

fn drain(window: &mut VecDeque<StoreTicket>, keep: usize, s: &mut Streamed) {
    while window.len() > keep {
        let Some(t) = window.pop_front() else { break };
        for o in t.wait() {
            match o.result {
                Ok(PutOutcome::Stored) => s.acked += 1,
                Ok(PutOutcome::AlreadyPresent) => s.already += 1,
                _ => s.skipped += 1,
            }
        }
    }
}

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
    let mut payload = AlignedBuf::new(doc_tokens * bpt);
    let mut pending = VecDeque::new();
    let mut s = Streamed::default();
    let mut unique = UniqueChunks::default();
    let mut secs = 0.0;
    for d in 0..docs {
        ring.compose(d as u64, &mut payload);
        let tokens = tokens_of(d);
        let t0 = Instant::now();
        for c in 1..=doc_tokens / chunk {
            let n = c * chunk;
            pending.push_back(
                engine
                    .store(&tokens[..n], salt, &payload[..n * bpt])?
                    .ticket,
            );
            drain(&mut pending, window, &mut s);
        }
        drain(&mut pending, 0, &mut s);
        secs += t0.elapsed().as_secs_f64();
        unique.note(engine, &tokens[..doc_tokens / chunk * chunk], salt)?;
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
