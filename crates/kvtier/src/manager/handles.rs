//! Handles for operations that complete later: non-blocking get, prefetch, durable writes.
//! Each is RAII: dropping a handle releases whatever it would have returned.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::chunk::Chunk;
use crate::error::{Error, Result};
use crate::keys::ChunkKey;
use crate::tier::PutOutcome;

fn wait_blocking<T: Send + 'static>(
    rx: oneshot::Receiver<T>,
    timeout: Option<Duration>,
    rt: &Handle,
) -> Result<T> {
    let Some(d) = timeout else {
        return futures::executor::block_on(rx).map_err(|_| Error::Closed);
    };
    let (tx, done) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(tokio::time::timeout(d, rx).await);
    });
    match done.recv() {
        Ok(Ok(Ok(v))) => Ok(v),
        Ok(Err(_)) => Err(Error::Timeout {
            tier: "engine".into(),
            op: "wait",
            after: d,
        }),
        Ok(Ok(Err(_))) | Err(_) => Err(Error::Closed),
    }
}

/// A non-blocking get in flight. Await it, or call [`GetHandle::wait`]. A hit from a lower
/// tier has already been written back into L1 when the handle completes.
pub struct GetHandle {
    pub(crate) rx: oneshot::Receiver<Option<Chunk>>,
    pub(crate) rt: Handle,
}

impl GetHandle {
    pub(crate) fn ready(v: Option<Chunk>, rt: Handle) -> GetHandle {
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(v);
        GetHandle { rx, rt }
    }

    /// Blocks until the get completes.
    pub fn wait(self) -> Result<Option<Chunk>> {
        wait_blocking(self.rx, None, &self.rt)
    }

    /// Blocks at most `timeout`.
    pub fn wait_timeout(self, timeout: Duration) -> Result<Option<Chunk>> {
        wait_blocking(self.rx, Some(timeout), &self.rt)
    }

    /// Returns the result if it is already there, else gives the handle back.
    pub fn try_take(mut self) -> std::result::Result<Result<Option<Chunk>>, GetHandle> {
        match self.rx.try_recv() {
            Ok(v) => Ok(Ok(v)),
            Err(oneshot::error::TryRecvError::Empty) => Err(self),
            Err(oneshot::error::TryRecvError::Closed) => Ok(Err(Error::Closed)),
        }
    }
}

impl Future for GetHandle {
    type Output = Result<Option<Chunk>>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.map_err(|_| Error::Closed))
    }
}

/// A chunk handed out by [`StorageManager::prefetch_streaming`](super::StorageManager::prefetch_streaming)
/// as soon as it, and every chunk before it, has loaded. Its payload may not be verified
/// yet, so the bytes are only reachable through [`StreamedChunk::copy_to`], which checks
/// the checksum in the same pass as the copy and reports the verdict to the prefetch: a
/// chunk that fails is cut from the prefix with everything after it, and is never written
/// back into L1. Dropping one without copying leaves the check to the prefetch.
pub struct StreamedChunk {
    pub(crate) chunk: Chunk,
    /// `Some` while the payload is unverified: where the verdict goes.
    pub(crate) verdict: Option<oneshot::Sender<bool>>,
}

impl StreamedChunk {
    /// The chunk key.
    pub fn key(&self) -> ChunkKey {
        self.chunk.key()
    }

    /// Payload length in bytes.
    pub fn len(&self) -> usize {
        self.chunk.payload().len()
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies the payload into `dst` (exactly [`len`](Self::len) bytes), verifying it on
    /// the way when the tier left that to the reader. `Ok(false)`: the payload is corrupt,
    /// `dst` has been zeroed and the chunk ends the prefix (a miss, counted).
    pub fn copy_to(mut self, dst: &mut [u8]) -> Result<bool> {
        if dst.len() != self.len() {
            return Err(Error::invalid(format!(
                "chunk {}: destination is {} bytes, the payload {}",
                self.key(),
                dst.len(),
                self.len()
            )));
        }
        let Some(verdict) = self.verdict.take() else {
            crate::chunk::copy_payload(dst, self.chunk.payload());
            return Ok(true);
        };
        let ok = self
            .chunk
            .info
            .copy_verified(dst, self.chunk.payload())
            .is_ok();
        if !ok {
            dst.fill(0);
        }
        let _ = verdict.send(ok);
        Ok(ok)
    }
}

impl std::fmt::Debug for StreamedChunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamedChunk")
            .field("key", &self.key())
            .field("len", &self.len())
            .field("verified", &self.verdict.is_none())
            .finish()
    }
}

/// What a prefetch loaded: a contiguous prefix of the requested chunks.
#[derive(Debug, Default)]
pub struct PrefetchResult {
    /// Handles on the loaded chunks, in prompt order (chunk 0 first).
    pub chunks: Vec<Chunk>,
    /// Tier index each chunk came from (0 = L1).
    pub tiers: Vec<usize>,
    /// Chunks that were found by lookup but failed to load (the prefix was cut there).
    pub failed_chunks: usize,
}

impl PrefetchResult {
    /// Number of chunks in the contiguous prefix.
    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    /// Whether nothing was loaded.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Tokens covered by the loaded prefix.
    pub fn tokens(&self) -> usize {
        self.chunks.iter().map(|c| c.info.num_tokens as usize).sum()
    }
}

/// A prefetch in flight. Dropping it releases the chunks once loaded.
pub struct PrefetchHandle {
    pub(crate) rx: oneshot::Receiver<PrefetchResult>,
    pub(crate) rt: Handle,
}

impl PrefetchHandle {
    /// Blocks until the prefetch completes.
    pub fn wait(self) -> Result<PrefetchResult> {
        wait_blocking(self.rx, None, &self.rt)
    }

    /// Blocks at most `timeout`.
    pub fn wait_timeout(self, timeout: Duration) -> Result<PrefetchResult> {
        wait_blocking(self.rx, Some(timeout), &self.rt)
    }

    /// Returns the result if it is already there, else gives the handle back.
    pub fn try_take(mut self) -> std::result::Result<Result<PrefetchResult>, PrefetchHandle> {
        match self.rx.try_recv() {
            Ok(v) => Ok(Ok(v)),
            Err(oneshot::error::TryRecvError::Empty) => Err(self),
            Err(oneshot::error::TryRecvError::Closed) => Ok(Err(Error::Closed)),
        }
    }
}

impl Future for PrefetchHandle {
    type Output = Result<PrefetchResult>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.map_err(|_| Error::Closed))
    }
}

/// Outcome of one queued write to a lower tier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteOutcome {
    /// Chunk key.
    pub key: ChunkKey,
    /// Tier index (1 = first tier below L1).
    pub tier: usize,
    /// What the tier did, or why it failed.
    pub result: std::result::Result<PutOutcome, String>,
}

/// Tracks the lower-tier writes started by a store. A write reported `Stored` by a durable
/// tier is acknowledged: it survives a crash (C5).
#[derive(Default)]
pub struct StoreTicket {
    rxs: Vec<oneshot::Receiver<WriteOutcome>>,
}

impl StoreTicket {
    pub(crate) fn push(&mut self, rx: oneshot::Receiver<WriteOutcome>) {
        self.rxs.push(rx);
    }

    /// Adds another ticket's writes to this one.
    pub fn merge(&mut self, other: StoreTicket) {
        self.rxs.extend(other.rxs);
    }

    /// Number of writes tracked.
    pub fn len(&self) -> usize {
        self.rxs.len()
    }

    /// Whether no write was queued.
    pub fn is_empty(&self) -> bool {
        self.rxs.is_empty()
    }

    /// Blocks until every write finished; returns their outcomes.
    pub fn wait(self) -> Vec<WriteOutcome> {
        futures::executor::block_on(self.wait_async())
    }

    /// Waits until every write finished.
    pub async fn wait_async(self) -> Vec<WriteOutcome> {
        let mut out = Vec::with_capacity(self.rxs.len());
        for rx in self.rxs {
            if let Ok(o) = rx.await {
                out.push(o);
            }
        }
        out
    }
}
