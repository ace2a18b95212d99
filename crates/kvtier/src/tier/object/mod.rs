//! The object-store tier: S3 (and S3-compatible servers), Google Cloud Storage and Azure Blob
//! Storage, shared by every node pointing at the same bucket and prefix, surviving restarts.
//!
//! * One object per chunk, named `<prefix>/<64 hex chars of the chunk key>`, holding exactly
//!   the record encoding of the disk and Redis tiers ([`crate::chunk::record`]): header, then
//!   payload. A read checks the header against the key and the object's length, then the
//!   payload against its checksum; a corrupt or truncated object is a miss, counted in
//!   [`RemoteStats::checksum_failures`], and deleted.
//! * `put` is one PUT of the header and the chunk's own buffer (no copy), or with
//!   `part_size_mb`, a multipart upload of parts sent in parallel; `get` is one GET whose body
//!   is copied straight into an L1 buffer, or ranged GETs in parallel. Objects are written
//!   whole (S3, GCS and Azure never show a half-written object), so two nodes writing the
//!   same key race harmlessly: both write the same record, the last one stays.
//! * `contains_prefix` sends HEAD requests for the keys concurrently (up to `concurrency`)
//!   and stops at the first missing one: a lookup of n chunks costs about n / concurrency
//!   round trips, never n sequential ones.
//! * Every request holds one of `concurrency` permits, so stores and loads stay bounded
//!   beside the manager's own queue bounds. Calls are bounded by the manager's deadlines
//!   and by `timeout_ms`; a store that stops answering fails calls at once during a backoff
//!   and is probed by one request at a time ([`health`]), one log line per state change.
//! * Credentials come from the provider's standard chain (environment variables, credential
//!   files named by them, instance/workload identity), never from the URL; they are never
//!   logged, and `Debug`, stats and errors show only the redacted URL.
//!
//! The tier is a [`RemoteTier`] over a [`BucketStore`]. URL syntax and options: [`url`].

mod body;
mod client;
mod health;
pub mod url;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload};
use tokio::sync::{Semaphore, SemaphorePermit};

use self::body::Body;
use self::health::{Attempt, Health};
use self::url::ObjectUrl;
use super::remote::{default_name, RemoteStats, RemoteStore, RemoteTier};
use super::PutOutcome;
use crate::chunk::record::{decode_header, encode_header, MAX_HEADER_LEN};
use crate::chunk::Chunk;
use crate::error::{Error, Result};
use crate::keys::ChunkKey;
use crate::memory::{BufferSource, ChunkBuf};
use crate::tier::redis::tls::TlsSettings;
use crate::transport::link::LinkCounters;
use crate::transport::record::{read_record, RecordInput, RecordRead, Terminator};

/// An object-store tier.
pub type ObjectTier = RemoteTier<BucketStore>;

/// Snapshot of an object tier's counters: the remote-tier ones, then the store's requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ObjectTierStats {
    /// The counters every remote tier keeps.
    #[serde(flatten)]
    pub remote: RemoteStats,
    /// PUT requests (a multipart upload counts its parts, its start and its completion).
    pub put_requests: u64,
    /// GET requests (whole or ranged).
    pub get_requests: u64,
    /// HEAD requests (prefix probes, removals).
    pub head_requests: u64,
    /// LIST pages read (sweeps).
    pub list_requests: u64,
    /// DELETE requests (removals, sweeps, corrupt objects).
    pub delete_requests: u64,
    /// Requests that failed (the store did not answer, or refused).
    pub request_failures: u64,
    /// Calls refused at once because the store was down (backoff).
    pub fast_failures: u64,
    /// Times the store went from answering to not answering.
    pub outages: u64,
    /// Whether the last request got an answer.
    pub reachable: bool,
}

impl std::ops::Deref for ObjectTierStats {
    type Target = RemoteStats;
    fn deref(&self) -> &RemoteStats {
        &self.remote
    }
}

#[derive(Debug, Default)]
struct Requests {
    put: AtomicU64,
    get: AtomicU64,
    head: AtomicU64,
    list: AtomicU64,
    delete: AtomicU64,
}

/// The object-store side of an [`ObjectTier`]: object names, requests and link state.
pub struct BucketStore {
    url: ObjectUrl,
    name: String,
    client: Arc<dyn ObjectStore>,
    permits: Semaphore,
    health: Health,
    requests: Requests,
    /// `io_errors` counts failed requests (the other link counters stay 0: HTTP clients
    /// pool their connections themselves).
    links: LinkCounters,
}

impl std::fmt::Debug for BucketStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The client holds credentials: never shown.
        f.debug_struct("BucketStore")
            .field("name", &self.name)
            .field("url", &format_args!("{}", self.url))
            .finish()
    }
}

impl ObjectTier {
    /// Builds the tier for the `index`-th entry of `remote_url` (default names `s3`, `gs`,
    /// `az`, then `s32`, ...). Does not contact the store: an unreachable one makes calls
    /// miss (and the manager mark the tier down) rather than the engine fail to start.
    /// `tls` applies to `https` endpoints (a `tls_ca_file` option overrides its CA).
    pub fn from_url(url: &str, index: usize, tls: &TlsSettings) -> Result<ObjectTier> {
        ObjectTier::new(ObjectUrl::parse(url)?, index, tls)
    }

    /// Builds the tier from a parsed URL; reads the TLS files now.
    pub fn new(url: ObjectUrl, index: usize, tls: &TlsSettings) -> Result<ObjectTier> {
        let name = url
            .name
            .clone()
            .unwrap_or_else(|| default_name(url.provider.scheme(), index));
        let client = client::build(&url, tls)?;
        let what = format!("{}://{}", url.provider.scheme(), url.bucket);
        tracing::info!(tier = %name, url = %url, "object-store tier configured");
        Ok(RemoteTier::with_store(
            name.clone(),
            url.to_string(),
            BucketStore {
                permits: Semaphore::new(url.concurrency),
                health: Health::new(&name, what, url.retry_max),
                url,
                name,
                client,
                requests: Requests::default(),
                links: LinkCounters::default(),
            },
        ))
    }

    /// The URL, redacted.
    pub fn url(&self) -> &ObjectUrl {
        &self.store().url
    }

    /// The object name of a chunk.
    pub fn object_name(&self, key: &ChunkKey) -> String {
        self.store().path(key).to_string()
    }

    /// The client the tier uses, for tools that measure the store itself with the same
    /// library and settings (`kvtier bench remote`'s raw baseline).
    pub fn client(&self) -> Arc<dyn ObjectStore> {
        self.store().client.clone()
    }
}

/// A chunk's pool buffer as the owner of a [`Bytes`]: the upload reads the chunk in place,
/// and the buffer stays alive (and in place) until the client is done with it.
struct Payload(ChunkBuf);

impl AsRef<[u8]> for Payload {
    fn as_ref(&self) -> &[u8] {
        self.0.as_slice()
    }
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Whether an `object_store` error is an answer from the store (it is up, the request was
/// just refused) rather than a failure to reach it.
fn answered(e: &object_store::Error) -> bool {
    use object_store::Error as E;
    matches!(
        e,
        E::NotFound { .. }
            | E::AlreadyExists { .. }
            | E::Precondition { .. }
            | E::NotModified { .. }
            | E::PermissionDenied { .. }
            | E::Unauthenticated { .. }
            | E::NotImplemented { .. }
            | E::NotSupported { .. }
    )
}

impl BucketStore {
    /// The object of a chunk.
    fn path(&self, key: &ChunkKey) -> Path {
        Path::from(format!("{}/{}", self.url.prefix, key.to_hex()))
    }

    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::tier(&self.name, format!("{}: {msg}", self.url))
    }

    fn err_caused(&self, what: &str, e: object_store::Error) -> Error {
        Error::tier_caused(&self.name, format!("{}: {what}: {e}", self.url), e)
    }

    /// Runs one request under a permit and the health gate; `what` names it in errors.
    /// A missing object is `Ok(None)`.
    async fn request<T>(
        &self,
        what: &str,
        counter: &AtomicU64,
        req: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<Option<T>> {
        let _permit: SemaphorePermit<'_> =
            self.permits.acquire().await.map_err(|_| Error::Closed)?;
        let attempt = self.health.attempt().map_err(|m| self.err(m))?;
        bump(counter, 1);
        match req.await {
            Ok(v) => {
                attempt.answered();
                Ok(Some(v))
            }
            Err(object_store::Error::NotFound { .. }) => {
                attempt.answered();
                Ok(None)
            }
            Err(e) => Err(self.failed(attempt, what, e)),
        }
    }

    /// A request that failed: counted, judged (an answer or a link failure), returned.
    fn failed(&self, attempt: Attempt<'_>, what: &str, e: object_store::Error) -> Error {
        bump(&self.links.io_errors, 1);
        if answered(&e) {
            attempt.answered();
        } else {
            attempt.failed(&e);
        }
        self.err_caused(what, e)
    }

    /// Whether the store holds `key`'s object (one HEAD).
    async fn exists(&self, key: &ChunkKey) -> Result<bool> {
        let path = self.path(key);
        let r = self
            .request("HEAD", &self.requests.head, self.client.head(&path))
            .await?;
        Ok(r.is_some())
    }

    /// Reads `key`'s record: one GET, or ranged GETs in parallel for objects larger than the
    /// part size.
    async fn read(&self, key: ChunkKey, bufs: &dyn BufferSource) -> Result<Option<RecordRead>> {
        let path = self.path(&key);
        let part = self.url.part_size;
        let opts = GetOptions {
            range: (part > 0).then_some(GetRange::Bounded(0..part as u64)),
            ..GetOptions::default()
        };
        // The request (and its permit) lasts until the body is read: bodies stream.
        let _permit = self.permits.acquire().await.map_err(|_| Error::Closed)?;
        let attempt = self.health.attempt().map_err(|m| self.err(m))?;
        bump(&self.requests.get, 1);
        let res = match self.client.get_opts(&path, opts).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => {
                attempt.answered();
                return Ok(None);
            }
            Err(e) => return Err(self.failed(attempt, "GET", e)),
        };
        attempt.answered();
        let total = res.meta.size;
        let first = res.range.clone();
        let len = usize::try_from(total).map_err(|_| self.err("object too large"))?;
        let mut body = Body::new(res.into_stream());
        if first.end >= total {
            let rec = read_record(&mut body, len, key, bufs, Terminator::None)
                .await
                .map_err(|e| self.io_error("GET body", e))?;
            return Ok(Some(rec));
        }
        drop(_permit);
        self.read_parts(key, body, first.end as usize, len, bufs)
            .await
            .map(Some)
    }

    /// The rest of a ranged read: the header from the first part's body, then the payload
    /// from that body and from parallel ranged GETs straight into the L1 buffer.
    async fn read_parts(
        &self,
        key: ChunkKey,
        mut body: Body,
        first_len: usize,
        len: usize,
        bufs: &dyn BufferSource,
    ) -> Result<RecordRead> {
        let io = |e| self.io_error("GET body", e);
        let mut head = vec![0u8; first_len.min(MAX_HEADER_LEN)];
        body.read_exact_into(&mut head).await.map_err(io)?;
        let (info, hlen) = match decode_header(&head) {
            Ok(x) => x,
            Err(e) => return Ok(RecordRead::Corrupt(e.to_string())),
        };
        let payload_len = len - hlen;
        if info.key != key || info.len != payload_len as u64 {
            return Ok(RecordRead::Corrupt(format!(
                "record for key {} of {} payload bytes received for key {key} with {payload_len}",
                info.key, info.len
            )));
        }
        let Some(mut buf) = bufs.allocate(payload_len) else {
            return Ok(RecordRead::NoBuffer);
        };
        let dst = buf.as_mut_slice();
        // The first part's bytes past the header we already have.
        let in_head = head.len() - hlen;
        dst[..in_head].copy_from_slice(&head[hlen..]);
        let (first, rest) = dst.split_at_mut(first_len - hlen);
        body.read_exact_into(&mut first[in_head..])
            .await
            .map_err(io)?;
        drop(body);
        let path = self.path(&key);
        let part = self.url.part_size;
        let reads = rest.chunks_mut(part).enumerate().map(|(i, slot)| {
            let start = (first_len + i * part) as u64;
            let range = start..start + slot.len() as u64;
            let path = &path;
            async move {
                let bytes = self
                    .request(
                        "GET range",
                        &self.requests.get,
                        self.client.get_range(path, range),
                    )
                    .await?
                    .ok_or_else(|| self.err("object deleted while being read"))?;
                if bytes.len() != slot.len() {
                    return Err(self.err("object changed while being read"));
                }
                slot.copy_from_slice(&bytes);
                Ok::<(), Error>(())
            }
        });
        futures::future::try_join_all(reads).await?;
        if let Err(e) = info.verify(buf.as_slice()) {
            return Ok(RecordRead::Corrupt(e.to_string()));
        }
        Ok(RecordRead::Chunk(Chunk {
            info,
            buf: buf.seal(),
        }))
    }

    fn io_error(&self, what: &str, e: std::io::Error) -> Error {
        bump(&self.links.io_errors, 1);
        Error::tier_caused(&self.name, format!("{}: {what}: {e}", self.url), e)
    }

    /// Writes `chunk`'s record: one PUT, or a multipart upload with parts in parallel.
    async fn write(&self, chunk: &Chunk) -> Result<()> {
        let header = Bytes::from(encode_header(&chunk.info)?);
        let payload = Bytes::from_owner(Payload(chunk.buf.clone()));
        let path = self.path(&chunk.info.key);
        let total = header.len() + payload.len();
        let part = self.url.part_size;
        if part == 0 || total <= part {
            let body = PutPayload::from_iter([header, payload]);
            self.request("PUT", &self.requests.put, self.client.put(&path, body))
                .await?;
            return Ok(());
        }
        let mut upload = self
            .request(
                "multipart start",
                &self.requests.put,
                self.client.put_multipart(&path),
            )
            .await?
            .ok_or_else(|| self.err("multipart upload refused"))?;
        // Part 0 is the header and the start of the payload; the others slice the payload.
        let first = part - header.len();
        let mut parts = vec![PutPayload::from_iter([header, payload.slice(..first)])];
        let mut off = first;
        while off < payload.len() {
            let end = (off + part).min(payload.len());
            parts.push(PutPayload::from(payload.slice(off..end)));
            off = end;
        }
        let sends: Vec<_> = parts.into_iter().map(|p| upload.put_part(p)).collect();
        let sent = futures::future::try_join_all(
            sends
                .into_iter()
                .map(|f| self.request("multipart part", &self.requests.put, f)),
        )
        .await;
        match sent {
            Ok(_) => {
                self.request("multipart complete", &self.requests.put, upload.complete())
                    .await?;
                Ok(())
            }
            Err(e) => {
                let _ = upload.abort().await;
                Err(e)
            }
        }
    }

    /// Whether an object name is one of this tier's chunks (`<prefix>/<64 hex>`): a sweep
    /// never touches anything else under the prefix.
    fn is_chunk_object(&self, path: &Path) -> bool {
        let s = path.as_ref();
        s.strip_prefix(self.url.prefix.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
    }

    /// Deletes this tier's objects, or with `salt` only that tenant's; returns how many.
    async fn sweep_objects(&self, salt: Option<&str>) -> Result<u64> {
        let started = Instant::now();
        let prefix = Path::from(self.url.prefix.as_str());
        bump(&self.requests.list, 1);
        let listed: Vec<object_store::ObjectMeta> = self
            .client
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| self.err_caused("LIST", e))?;
        let mut doomed = Vec::new();
        for meta in listed
            .into_iter()
            .filter(|m| self.is_chunk_object(&m.location))
        {
            let take = match salt {
                None => true,
                Some(salt) => {
                    let end = meta.size.min(MAX_HEADER_LEN as u64);
                    let head = self
                        .request(
                            "GET header",
                            &self.requests.get,
                            self.client.get_range(&meta.location, 0..end),
                        )
                        .await?;
                    head.is_some_and(|h| {
                        decode_header(&h)
                            .is_ok_and(|(info, _)| info.origin.cache_salt.as_deref() == Some(salt))
                    })
                }
            };
            if take {
                doomed.push(meta.location);
            }
        }
        let n = doomed.len() as u64;
        bump(&self.requests.delete, n);
        let locations = futures::stream::iter(doomed.into_iter().map(Ok)).boxed();
        let deleted: Vec<Path> = self
            .client
            .delete_stream(locations)
            .try_collect()
            .await
            .map_err(|e| self.err_caused("DELETE", e))?;
        tracing::info!(tier = %self.name, removed = deleted.len(), salt = salt.is_some(), elapsed_ms = started.elapsed().as_millis() as u64, "objects removed");
        Ok(deleted.len() as u64)
    }
}

impl RemoteStore for BucketStore {
    type Stats = ObjectTierStats;

    async fn prefix_len(&self, keys: &[ChunkKey]) -> Result<usize> {
        // Probes in flight together, answers in key order; the first missing key ends the
        // prefix and drops (cancels) the probes after it.
        let mut probes = futures::stream::iter(
            keys.iter()
                .copied()
                .map(|k| async move { self.exists(&k).await }),
        )
        .buffered(self.url.concurrency);
        let mut n = 0;
        while let Some(here) = probes.next().await {
            if !here? {
                break;
            }
            n += 1;
        }
        Ok(n)
    }

    async fn fetch(&self, key: ChunkKey, bufs: &dyn BufferSource) -> Result<Option<RecordRead>> {
        self.read(key, bufs).await
    }

    async fn discard(&self, key: ChunkKey, why: &str) {
        tracing::warn!(tier = %self.name, key = %key, reason = %why, "invalid object in the store: treated as a miss and deleted");
        let path = self.path(&key);
        if let Err(e) = self
            .request("DELETE", &self.requests.delete, self.client.delete(&path))
            .await
        {
            tracing::debug!(tier = %self.name, key = %key, error = %e, "could not delete the invalid object");
        }
    }

    async fn store(&self, chunk: &Chunk) -> Result<PutOutcome> {
        self.write(chunk).await?;
        Ok(PutOutcome::Stored)
    }

    async fn remove(&self, key: ChunkKey) -> Result<bool> {
        // DELETE answers the same whether or not the object was there: ask first.
        if !self.exists(&key).await? {
            return Ok(false);
        }
        let path = self.path(&key);
        self.request("DELETE", &self.requests.delete, self.client.delete(&path))
            .await?;
        Ok(true)
    }

    async fn sweep(&self, salt: Option<&str>) -> Result<u64> {
        self.sweep_objects(salt).await
    }

    fn links(&self) -> Option<&LinkCounters> {
        Some(&self.links)
    }

    fn stats(&self, remote: RemoteStats) -> ObjectTierStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let r = &self.requests;
        ObjectTierStats {
            remote,
            put_requests: g(&r.put),
            get_requests: g(&r.get),
            head_requests: g(&r.head),
            list_requests: g(&r.list),
            delete_requests: g(&r.delete),
            request_failures: g(&self.links.io_errors),
            fast_failures: g(&self.health.fast_failures),
            outages: g(&self.health.outages),
            reachable: self.health.is_up(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tier::Tier;

    fn tier(url: &str) -> ObjectTier {
        ObjectTier::from_url(url, 0, &TlsSettings::default()).unwrap()
    }

    #[test]
    fn names_objects_and_redacts() {
        let t = tier("s3://b/run1?endpoint=http://u:hunter2@127.0.0.1:1&name=cold");
        assert_eq!(t.name(), "cold");
        let key = ChunkKey([0xab; 32]);
        assert_eq!(t.object_name(&key), format!("run1/{}", "ab".repeat(32)));
        let dbg = format!("{t:?} {:?}", t.store());
        assert!(!dbg.contains("hunter2") && dbg.contains("u:***@"), "{dbg}");
        assert_eq!(tier("s3://b?endpoint=http://127.0.0.1:1").name(), "s3");
        let t2 = ObjectTier::from_url(
            "az://c?endpoint=http://127.0.0.1:1/acct&account=acct",
            1,
            &TlsSettings::default(),
        );
        assert_eq!(t2.unwrap().name(), "az2");
        let s = t.store();
        assert!(s.is_chunk_object(&Path::from(format!("run1/{}", "0f".repeat(32)))));
        assert!(!s.is_chunk_object(&Path::from(format!("run1/x/{}", "0f".repeat(32)))));
        assert!(!s.is_chunk_object(&Path::from("run1/notes.txt")));
        assert!(!s.is_chunk_object(&Path::from(format!("run10/{}", "0f".repeat(32)))));
    }
}
