//! Read paths: blocking get, batched get, non-blocking get and prefetch, with write-back
//! into L1 (C3) and prefix truncation (C4).

use std::sync::Arc;

use futures::stream::{self, StreamExt};
use tokio::sync::oneshot;

use super::handles::{GetHandle, PrefetchHandle, PrefetchResult, StreamedChunk};
use super::{Inner, StorageManager};
use crate::chunk::Chunk;
use crate::error::Result;
use crate::keys::ChunkKey;
use crate::metrics::Metrics;
use crate::tier::PutOutcome;

impl Inner {
    fn tier_name(&self, t: usize) -> &str {
        if t == 0 {
            self.l1.name()
        } else {
            &self.lower[t - 1].name
        }
    }

    pub(crate) fn count_hit(&self, t: usize, bytes: u64) {
        let l = Metrics::tier(self.tier_name(t));
        self.metrics.tier_hits.get_or_create(&l).inc();
        self.metrics.loaded_bytes.get_or_create(&l).inc_by(bytes);
    }

    /// Reads `key` from lower tier `i` (0-based in `lower`), verifying its checksum unless
    /// the tier already did. A corrupt copy is a miss, is removed from that tier and counted.
    async fn load_from(self: &Arc<Self>, i: usize, key: ChunkKey) -> Option<Chunk> {
        // Not deferred: what comes back is verified.
        self.load_deferred(i, key, false).await.map(|(c, _)| c)
    }

    /// Like [`Inner::load_from`]; with `defer`, a tier may leave the payload checksum to
    /// the reader (`false` in the pair), and the hit is counted once the reader's verdict
    /// is in (see [`Inner::settle_verdicts`]).
    async fn load_deferred(
        self: &Arc<Self>,
        i: usize,
        key: ChunkKey,
        defer: bool,
    ) -> Option<(Chunk, bool)> {
        let slot = &self.lower[i];
        if !slot.health.available() {
            return None;
        }
        let deadline = self.opts.read_deadline;
        let r = if defer {
            tokio::time::timeout(deadline, slot.tier.get_deferred(key, &*self.l1)).await
        } else {
            let verified = slot.tier.verifies_reads();
            tokio::time::timeout(deadline, slot.tier.get(key, &*self.l1))
                .await
                .map(|r| r.map(|c| c.map(|c| (c, verified))))
        };
        let Some((chunk, verified)) = self.settle(slot, "get", r)? else {
            slot.presence.forget(&key);
            return None;
        };
        slot.learn([&key]);
        let bad = chunk.info.key != key
            || (!verified && !defer && chunk.info.verify(chunk.payload()).is_err());
        if bad {
            self.discard(i, key, false);
            return None;
        }
        if verified || !defer {
            self.count_hit(i + 1, chunk.buf.len() as u64);
            return Some((chunk, true));
        }
        Some((chunk, false))
    }

    /// Counts and logs a corrupt copy from lower tier `i` and drops it in the background.
    /// `by_reader`: found by a deferred check; a tier that verifies its own reads then
    /// counts and logs it itself, in `discard_corrupt`.
    fn discard(self: &Arc<Self>, i: usize, key: ChunkKey, by_reader: bool) {
        let slot = &self.lower[i];
        slot.presence.forget(&key);
        if !(by_reader && slot.tier.verifies_reads()) {
            tracing::warn!(tier = %slot.name, key = %key, "checksum mismatch on read: treated as a miss, copy removed");
            self.metrics
                .checksum_failures
                .get_or_create(&Metrics::tier(&slot.name))
                .inc();
        }
        let inner = self.clone();
        self.handle.spawn(async move {
            let slot = &inner.lower[i];
            let op = if by_reader {
                slot.tier.discard_corrupt(key)
            } else {
                slot.tier.remove(key)
            };
            let _ = tokio::time::timeout(inner.opts.store_deadline, op).await;
        });
    }

    /// Collects the readers' verdicts on deferred chunks, in order, and returns how many
    /// leading chunks are good: the prefix ends at the first corrupt one (C4, C7). A
    /// verdict never given (the reader dropped the chunk) is reached here by checking the
    /// payload after all.
    async fn settle_verdicts(
        self: &Arc<Self>,
        loaded: &mut [(Chunk, Option<oneshot::Receiver<bool>>)],
        tiers: &[usize],
    ) -> usize {
        for (j, ((c, verdict), &t)) in loaded.iter_mut().zip(tiers).enumerate() {
            let Some(rx) = verdict.take() else { continue };
            let ok = match rx.await {
                Ok(ok) => ok,
                Err(_) => c.info.verify(c.payload()).is_ok(),
            };
            if !ok {
                self.discard(t - 1, c.key(), true);
                return j;
            }
            self.count_hit(t, c.buf.len() as u64);
        }
        loaded.len()
    }

    /// First lower tier that has `key`.
    async fn get_lower(self: &Arc<Self>, key: ChunkKey) -> Option<(Chunk, usize)> {
        for i in 0..self.lower.len() {
            if let Some(c) = self.load_from(i, key).await {
                return Some((c, i + 1));
            }
        }
        None
    }

    /// Promotes a chunk read from tier `t` into L1 when the rules allow (C3).
    pub(crate) fn write_back(&self, chunk: &Chunk, t: usize) -> bool {
        if t == 0 || !self.l1_enabled || !self.lower[t - 1].write_back {
            return false;
        }
        let promoted = self.l1.insert(chunk.clone()) == PutOutcome::Stored;
        if promoted {
            self.metrics
                .write_backs
                .get_or_create(&Metrics::tier(self.tier_name(t)))
                .inc();
        }
        promoted
    }

    fn l1_get(&self, key: &ChunkKey) -> Option<Chunk> {
        if !self.l1_enabled {
            return None;
        }
        let c = self.l1.lookup(key)?;
        self.l1.touch_reverse(std::slice::from_ref(key));
        self.count_hit(0, c.buf.len() as u64);
        Some(c)
    }

    /// Loads the plan of `keys`; each chunk of the contiguous prefix also goes to `sink`
    /// as soon as it and every chunk before it are loaded. With a sink, tiers may leave
    /// the checksum to the sink's reader, who checks it while copying.
    async fn prefetch_task(
        self: Arc<Self>,
        keys: Vec<ChunkKey>,
        sink: Option<std::sync::mpsc::Sender<StreamedChunk>>,
    ) -> PrefetchResult {
        // Plan first. Handles on L1 chunks keep them from eviction while the rest loads.
        let (tiers, l1_handles) = self.plan_prefix(&keys, true).await;
        let defer = sink.is_some();
        // Load every lower-tier chunk of the plan concurrently (order preserved).
        let loads: Vec<_> = tiers
            .iter()
            .zip(l1_handles)
            .enumerate()
            .map(|(j, (&t, h))| {
                let inner = self.clone();
                let k = keys[j];
                async move {
                    match h {
                        Some(c) => {
                            inner.count_hit(0, c.buf.len() as u64);
                            Some((c, true))
                        }
                        None if t > 0 => inner.load_deferred(t - 1, k, defer).await,
                        None => None,
                    }
                }
            })
            .collect();
        let mut loading = stream::iter(loads).buffered(self.opts.prefetch_concurrency.max(1));
        let mut loaded = Vec::with_capacity(tiers.len());
        while let Some(Some((c, verified))) = loading.next().await {
            let (tx, rx) = match verified {
                true => (None, None),
                false => {
                    let (tx, rx) = oneshot::channel();
                    (Some(tx), Some(rx))
                }
            };
            if let Some(sink) = &sink {
                // A receiver that hung up only stops wanting copies; the prefetch goes on
                // (and checks what it deferred itself).
                let _ = sink.send(StreamedChunk {
                    chunk: c.clone(),
                    verdict: tx,
                });
            }
            loaded.push((c, rx));
        }
        // Keep the contiguous prefix only: loads after the first failure are cancelled and
        // their buffers released here, before any write-back (C4).
        drop(loading);
        drop(sink);
        let good = self.settle_verdicts(&mut loaded, &tiers).await;
        loaded.truncate(good);
        let chunks: Vec<Chunk> = loaded.into_iter().map(|(c, _)| c).collect();
        let valid = chunks.len();
        let failed_chunks = tiers.len() - valid;
        for (c, &t) in chunks.iter().zip(&tiers) {
            self.write_back(c, t);
        }
        if self.l1_enabled && !chunks.is_empty() {
            let prefix: Vec<ChunkKey> = chunks.iter().map(Chunk::key).collect();
            self.l1.touch_reverse(&prefix);
        }
        PrefetchResult {
            chunks,
            tiers: tiers[..valid].to_vec(),
            failed_chunks,
        }
    }
}

impl StorageManager {
    /// Blocking get of one chunk from the first tier that has it; a lower-tier hit is
    /// written back into L1.
    pub fn get(&self, key: ChunkKey) -> Result<Option<Chunk>> {
        if let Some(c) = self.inner.l1_get(&key) {
            return Ok(Some(c));
        }
        if self.inner.lower.is_empty() {
            return Ok(None);
        }
        let inner = self.inner.clone();
        self.run_sync(async move {
            let (c, t) = inner.get_lower(key).await?;
            inner.write_back(&c, t);
            Some(c)
        })
    }

    /// Non-blocking get: returns at once; the handle completes with the chunk, after
    /// writing a lower-tier hit back into L1.
    pub fn get_async(&self, key: ChunkKey) -> GetHandle {
        if let Some(c) = self.inner.l1_get(&key) {
            return GetHandle::ready(Some(c), self.inner.handle.clone());
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let inner = self.inner.clone();
        self.inner.handle.spawn(async move {
            let r = inner.get_lower(key).await;
            if let Some((c, t)) = &r {
                inner.write_back(c, *t);
            }
            let _ = tx.send(r.map(|x| x.0));
        });
        GetHandle {
            rx,
            rt: self.inner.handle.clone(),
        }
    }

    /// Batched get: one result per key. Lower-tier hits are written back into L1 only when
    /// every key hit (C3).
    pub fn batched_get(&self, keys: &[ChunkKey]) -> Result<Vec<Option<Chunk>>> {
        let mut out: Vec<Option<Chunk>> = keys.iter().map(|k| self.inner.l1_get(k)).collect();
        let missing: Vec<usize> = (0..keys.len()).filter(|&i| out[i].is_none()).collect();
        if missing.is_empty() || self.inner.lower.is_empty() {
            return Ok(out);
        }
        let inner = self.inner.clone();
        let want: Vec<ChunkKey> = missing.iter().map(|&i| keys[i]).collect();
        let found = self.run_sync(async move {
            let futs = want.into_iter().map(|k| {
                let inner = inner.clone();
                async move { inner.get_lower(k).await }
            });
            stream::iter(futs)
                .buffered(inner.opts.prefetch_concurrency.max(1))
                .collect::<Vec<_>>()
                .await
        })?;
        let all_hit = found.iter().all(Option::is_some);
        for (&i, f) in missing.iter().zip(found) {
            if let Some((c, t)) = f {
                if all_hit {
                    self.inner.write_back(&c, t);
                }
                out[i] = Some(c);
            }
        }
        Ok(out)
    }

    /// Starts loading the chunks of `keys` (a prompt's chunk keys, in order) from wherever
    /// they are. The result is the contiguous prefix that loaded (C4); its lower-tier chunks
    /// are written back into L1 (C3).
    pub fn prefetch(&self, keys: Vec<ChunkKey>) -> PrefetchHandle {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let inner = self.inner.clone();
        self.inner.handle.spawn(async move {
            let r = inner.prefetch_task(keys, None).await;
            let _ = tx.send(r);
        });
        PrefetchHandle {
            rx,
            rt: self.inner.handle.clone(),
        }
    }

    /// The L1 fast path of a read, on the caller's thread: when L1 alone answers it (every
    /// key is resident there, or there is no lower tier to look in), handles on the leading
    /// run of `keys` resident in L1, counted as hits and touched as
    /// [`prefetch`](Self::prefetch) would count and touch them. `None` when a lower tier
    /// may hold more of the prefix (or L1 is off): the caller then takes the full path.
    /// Saves a read served from L1 the hand-off to the runtime and back (two thread
    /// wake-ups, ~20 µs per call on a 2-core VM: a tenth of a 1 MiB chunk's copy).
    pub fn l1_read(&self, keys: &[ChunkKey]) -> Option<Vec<Chunk>> {
        let inner = &self.inner;
        if !inner.l1_enabled {
            return None;
        }
        let got = inner.l1.lookup_prefix(keys);
        if got.len() < keys.len() && !inner.lower.is_empty() {
            return None;
        }
        for c in &got {
            inner.count_hit(0, c.buf.len() as u64);
        }
        if !got.is_empty() {
            inner.l1.touch_reverse(&keys[..got.len()]);
        }
        Some(got)
    }

    /// Like [`prefetch`](Self::prefetch), and the receiver also gets each chunk of the
    /// contiguous prefix, in order, as soon as it is loaded: a caller copies chunk `i` out
    /// (verifying it in the same pass, see [`StreamedChunk`]) while later chunks are still
    /// loading. The receiver ends when the prefetch is done. Copy or drop every streamed
    /// chunk, or drop the receiver, before waiting on the handle: the prefetch waits for
    /// their verdicts before it writes anything back.
    pub fn prefetch_streaming(
        &self,
        keys: Vec<ChunkKey>,
    ) -> (PrefetchHandle, std::sync::mpsc::Receiver<StreamedChunk>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (sink, chunks) = std::sync::mpsc::channel();
        let inner = self.inner.clone();
        self.inner.handle.spawn(async move {
            let r = inner.prefetch_task(keys, Some(sink)).await;
            let _ = tx.send(r);
        });
        let handle = PrefetchHandle {
            rx,
            rt: self.inner.handle.clone(),
        };
        (handle, chunks)
    }
}
