//! The durable local-disk tier.
//!
//! # Format
//! One file per chunk, `<root>/<first key byte, 2 hex>/<64 hex key>.<16 hex salt tag|none>.kvr`:
//! the payload zero-padded to a whole 4096-byte block, then the record header
//! ([`crate::chunk::record`]) zero-padded to one block. The file size is therefore
//! `round_up(len) + 4096`, which is also exactly what the byte budget counts.
//!
//! Why the header comes last: the payload then starts at file offset 0, so a large
//! transfer splits into device requests aligned like the file's extents. With the header
//! first, every request of a 32 MiB `O_DIRECT` write was 4 KiB off, and the virtual disk
//! measured here wrote about 30% slower. (`.kvc` files, the header-first layout of earlier
//! builds, are deleted at startup.)
//!
//! # Durability (C5) and group commit
//! A put writes `<root>/tmp/<key>.<random>` (payload, zeroed tail and header block in one
//! `pwritev`, no flush yet) on its own thread, so concurrent puts write in parallel. It then
//! joins a *commit round* (`commit.rs`): the first put to arrive while no round runs leads
//! one for every tmp file queued so far; puts arriving meanwhile queue for the next round.
//! A round, in this order:
//! 1. fdatasyncs every file of the group, in parallel (the file system commits their
//!    metadata in one journal transaction; the block layer merges the device flushes);
//! 2. renames each file whose flush succeeded to `<root>/<2hex>/<name>.kvr`;
//! 3. fsyncs each shard directory the group touched once, in parallel.
//!
//! Only then are the group's puts acknowledged (`PutOutcome::Stored`). A file's data is
//! durable before its name appears, and its name is durable before the put returns, so a
//! crash at any point leaves either no file or a complete one; tmp leftovers are deleted at
//! startup. Errors are per file: a failed flush or rename fails only that put (its tmp file
//! is removed); a failed directory fsync fails the puts renamed into that directory (their
//! files are removed). [`DiskTierStats::commit_groups`] counts rounds.
//!
//! # I/O
//! `O_DIRECT` with 4096-aligned buffers: the payload goes straight from / into L1 pool
//! buffers (a read fetches payload and header with one `preadv`). A file system that
//! rejects `O_DIRECT` (tmpfs) is detected at startup (or on the first `EINVAL`) and the tier falls back to buffered I/O + fdatasync, logged once and
//! visible in [`DiskTierStats::direct_io`]. Reads verify the header, the key and the payload
//! checksum (C7); a bad file is a miss, is deleted and counted.
//!
//! # Whose files
//! The tier deletes only files it names itself, in a directory it knows is its own: one
//! holding the marker `kvtier-disk.json` (written on first use), or one made by an earlier
//! build whose every entry matches kvtier's layout (adopted: the marker is added). A
//! non-empty directory without the marker that holds anything else is refused, naming the
//! path and what it found; other files that turn up in a marked directory are left in
//! place. The root must belong to this user (or root) and not be writable by everyone.
//! Names and the survey that sorts a directory: `layout.rs`.
//!
//! # Recovery
//! Startup lists the 256 shard directories in parallel (readdir + fstatat, no payload or
//! header reads) and rebuilds the index from file names and sizes, oldest first in the
//! eviction order. Torn records (not whole blocks) are deleted. A file larger than any
//! record (above one chunk of the L1 pool, or the budget) is never counted: deleted when
//! its trailing header proves it a whole kvtier record, else left in place and logged.
//! Evictions down to a lowered budget are logged with their count and bytes.
//!
//! # Residency reports
//! An observer ([`DiskTier::set_observer`], for KV events) hears of every index change
//! under the directory's index lock: a store once its file is committed and indexed, a
//! removal whenever an entry leaves the index. Records recovered at startup are indexed
//! before an observer can be set and are not reported.
//!
//! # A full device
//! A write that fails with ENOSPC before the budget is reached evicts at least its own
//! size (records nobody reads, in eviction order) and is retried once; startup warns when
//! the budget exceeds what the file system has room for (`statvfs`).

mod commit;
mod dir;
mod inspect;
mod io;
mod layout;

use std::path::PathBuf;
use std::sync::Arc;

use dir::{DirOptions, DiskDir, ReadError};
pub use inspect::{inspect, BadRecord, GroupCount, InspectReport};
use io::blames_the_record;
pub use layout::MARKER;

use super::{PutOutcome, ResidencyObserver, Tier, TierFuture, TierUsage};
use crate::chunk::Chunk;
use crate::error::{Error, Result};
use crate::keys::ChunkKey;
use crate::memory::BufferSource;
use crate::policy::{PolicyKind, PromptReport};

/// The disk tier's name: in stats and metrics, and for `StorageManager::set_tier_observer`.
pub const DISK_TIER_NAME: &str = "disk";

/// What an acknowledged disk store survives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskDurability {
    /// Acknowledged after fdatasync of the file and fsync of its directory: survives power
    /// loss and kernel crashes, at the device's flush rate.
    PowerLoss,
    /// The default (contract C5): acknowledged once written (`O_DIRECT`, so the data has
    /// left the page cache) and renamed into place, without a device flush: survives a crash
    /// of the process (kill -9), not a power cut. A cache loses nothing it cannot recompute
    /// by that, and a record lost or torn by a power cut is never served (checksums): it is
    /// a miss.
    #[default]
    ProcessCrash,
}

/// How to build a disk tier.
#[derive(Clone, Debug)]
pub struct DiskTierOptions {
    /// Tier name (`disk`).
    pub name: String,
    /// Directories; chunks are spread over them by key hash (one path is the common case).
    pub paths: Vec<PathBuf>,
    /// Byte budget of each path.
    pub capacity_per_path: u64,
    /// Eviction policy.
    pub policy: PolicyKind,
    /// Write a chunk only the N-th time it is put (1 = always).
    pub admit_after: u32,
    /// Keys tracked by the admission gate (least recently put forgotten first).
    pub admit_tracking: usize,
    /// Use `O_DIRECT` where the file system supports it.
    pub direct_io: bool,
    /// What an acknowledged put survives.
    pub durability: DiskDurability,
    /// Largest chunk payload the tier can be given (a chunk is staged in the L1 pool, so
    /// the pool size bounds it): a file larger than such a record is not one and is
    /// rejected at startup. Record files are always bounded by the budget too.
    pub max_payload: u64,
}

impl DiskTierOptions {
    /// One path with a budget; LRU, admit all, `O_DIRECT` when possible, the default
    /// durability.
    pub fn new(path: impl Into<PathBuf>, capacity: u64) -> DiskTierOptions {
        DiskTierOptions {
            name: DISK_TIER_NAME.into(),
            paths: vec![path.into()],
            capacity_per_path: capacity,
            policy: PolicyKind::Lru,
            admit_after: 1,
            admit_tracking: 1 << 18,
            direct_io: true,
            durability: DiskDurability::default(),
            max_payload: u64::MAX,
        }
    }
}

/// Counters and occupancy of a disk tier (summed over its paths).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DiskTierStats {
    /// Chunks indexed.
    pub chunks: u64,
    /// Bytes of indexed files (headers and padding included).
    pub bytes: u64,
    /// Bytes reserved by writes in flight and files being deleted.
    pub reserved: u64,
    /// Byte budget (all paths).
    pub capacity: u64,
    /// Whether every path uses `O_DIRECT` (false: buffered fallback somewhere).
    pub direct_io: bool,
    /// Reads that found a corrupt or torn file (deleted, served as a miss).
    pub checksum_failures: u64,
    /// Chunks evicted.
    pub evictions: u64,
    /// Bytes evicted.
    pub evicted_bytes: u64,
    /// Writes that failed (ENOSPC, EIO, ...).
    pub write_errors: u64,
    /// Reads that failed with an I/O error.
    pub read_errors: u64,
    /// Puts skipped for lack of space (or a failed write).
    pub skipped_full: u64,
    /// Puts skipped by the admission gate.
    pub skipped_not_admitted: u64,
    /// Chunks found at startup.
    pub recovered_chunks: u64,
    /// Leftover or invalid files deleted at startup.
    pub recovery_removed: u64,
    /// Startup scan time, microseconds (slowest path).
    pub recovery_micros: u64,
    /// Commit rounds run (one round makes a whole group of puts durable).
    pub commit_groups: u64,
    /// Files that went through a commit round; `/ commit_groups` is the mean group size.
    pub committed_files: u64,
    /// Chunks evicted because the device was full before the budget (ENOSPC).
    pub no_space_evictions: u64,
}

/// The local-disk tier.
pub struct DiskTier {
    name: String,
    dirs: Vec<Arc<DiskDir>>,
}

impl std::fmt::Debug for DiskTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskTier")
            .field("name", &self.name)
            .field(
                "paths",
                &self
                    .dirs
                    .iter()
                    .map(|d| d.root().to_path_buf())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Runs blocking work off the async threads (inline when there is no tokio runtime).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => h
            .spawn_blocking(f)
            .await
            .map_err(|e| Error::tier_caused("disk", format!("I/O task failed: {e}"), e)),
        Err(_) => Ok(f()),
    }
}

/// Keeps a file from being evicted while it is read; released on drop (also when the
/// read's future is dropped at a deadline).
struct ReadGuard {
    dir: Arc<DiskDir>,
    key: ChunkKey,
    gen: u64,
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        self.dir.end_read(&self.key, self.gen);
    }
}

impl DiskTier {
    /// Opens every path (creating directories, recovering the index). Fails, naming the
    /// path, when a directory cannot be created or written.
    pub fn open(opts: DiskTierOptions) -> Result<DiskTier> {
        if opts.paths.is_empty() {
            return Err(Error::config("local_disk", "no disk path given"));
        }
        let mut dirs = Vec::with_capacity(opts.paths.len());
        for p in &opts.paths {
            if dirs.iter().any(|d: &Arc<DiskDir>| d.root() == p.as_path()) {
                return Err(Error::config(
                    "local_disk",
                    format!("path `{}` is listed twice", p.display()),
                ));
            }
            dirs.push(Arc::new(DiskDir::open(&DirOptions {
                root: p.clone(),
                capacity: opts.capacity_per_path,
                policy: opts.policy,
                admit_after: opts.admit_after,
                admit_tracking: opts.admit_tracking,
                allow_direct_io: opts.direct_io,
                max_payload: opts.max_payload,
                flush: opts.durability == DiskDurability::PowerLoss,
            })?));
        }
        Ok(DiskTier {
            name: opts.name,
            dirs,
        })
    }

    /// Bytes on disk of a record of `payload` bytes (what the budget counts): the payload
    /// rounded up to whole 4 KiB blocks plus the header block.
    pub fn file_bytes(payload: u64) -> u64 {
        io::BLOCK as u64 + io::round_block(payload)
    }

    /// The directory holding `key`.
    fn dir(&self, key: &ChunkKey) -> &Arc<DiskDir> {
        // Bytes 8..16: independent of the shard-directory byte and of `prefix_u64`.
        let h = u64::from_le_bytes(key.0[8..16].try_into().unwrap_or([0; 8]));
        &self.dirs[(h % self.dirs.len() as u64) as usize]
    }

    /// Sets the observer told of every key this tier starts or stops holding: `stored` once
    /// a put's file is in place and indexed (a read hits from then on), `removed` whenever
    /// an entry leaves the index (eviction, remove, tenant deletion, clear, a corrupt or
    /// vanished record found by a read). Only the first call takes effect (returns whether
    /// this one did). Records found at startup are not reported, so call it right after
    /// [`DiskTier::open`]: a consumer then never hears of them (it under-claims them until
    /// they are evicted, never the reverse); their removals are reported like any other.
    pub fn set_observer(&self, observer: Arc<dyn ResidencyObserver>) -> bool {
        // Each directory reports its own keys under its own lock (a key lives in one
        // directory, so its reports stay ordered); all are set here, so all or none are.
        let mut set = true;
        for d in &self.dirs {
            set &= d.set_observer(observer.clone());
        }
        set
    }

    /// The paths this tier writes to.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.root().to_path_buf()).collect()
    }

    /// Whether `key` is indexed.
    pub fn contains(&self, key: &ChunkKey) -> bool {
        self.dir(key).contains(key)
    }

    /// Counter and occupancy snapshot.
    pub fn stats(&self) -> DiskTierStats {
        let mut s = DiskTierStats {
            direct_io: true,
            ..DiskTierStats::default()
        };
        for d in &self.dirs {
            let u = d.usage();
            let c = &d.counters;
            let ld =
                |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            s.chunks += u.chunks;
            s.bytes += u.bytes;
            s.reserved += u.reserved;
            s.capacity += u.capacity;
            s.direct_io &= u.direct_io;
            s.checksum_failures += ld(&c.checksum_failures);
            s.evictions += ld(&c.evictions);
            s.evicted_bytes += ld(&c.evicted_bytes);
            s.write_errors += ld(&c.write_errors);
            s.read_errors += ld(&c.read_errors);
            s.skipped_full += ld(&c.skipped_full);
            s.skipped_not_admitted += ld(&c.skipped_not_admitted);
            s.recovered_chunks += ld(&c.recovered_chunks);
            s.recovery_removed += ld(&c.recovery_removed);
            s.recovery_micros = s.recovery_micros.max(ld(&c.recovery_micros));
            s.commit_groups += ld(&c.commit_groups);
            s.committed_files += ld(&c.committed);
            s.no_space_evictions += ld(&c.no_space_evictions);
        }
        s
    }

    /// Stores a chunk durably, blocking the calling thread.
    pub fn put_blocking(&self, chunk: &Chunk) -> PutOutcome {
        self.dir(&chunk.info.key).put(chunk)
    }

    /// Reads a chunk, blocking the calling thread.
    pub fn get_blocking(&self, key: ChunkKey, bufs: &dyn BufferSource) -> Result<Option<Chunk>> {
        let Some((dir, guard, mut buf)) = self.begin_read(key, bufs) else {
            return Ok(None);
        };
        let r = dir.read(&key, guard.gen, &mut buf, true);
        self.finish_read(&dir, key, guard, r, buf)
    }

    /// Reads a chunk on a blocking thread; `verify: false` leaves the payload checksum
    /// to the caller (header, key and size are still checked).
    async fn read(
        &self,
        key: ChunkKey,
        bufs: &dyn BufferSource,
        verify: bool,
    ) -> Result<Option<Chunk>> {
        let Some((dir, guard, mut buf)) = self.begin_read(key, bufs) else {
            return Ok(None);
        };
        let d = dir.clone();
        let (guard, r, buf) = blocking(move || {
            let r = d.read(&key, guard.gen, &mut buf, verify);
            (guard, r, buf)
        })
        .await?;
        self.finish_read(&dir, key, guard, r, buf)
    }

    /// Counts a corrupt record and logs it (the caller deletes it).
    fn corrupt(&self, dir: &DiskDir, key: ChunkKey, why: &str) {
        dir.counters
            .checksum_failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(tier = %self.name, key = %key, reason = %why, "disk tier: corrupt record; treated as a miss and deleted");
    }

    /// Registers a read of `key` (its file is kept from eviction until the guard drops) and
    /// allocates the buffer it lands in; `None`: not held, or no memory for it (a miss).
    fn begin_read(
        &self,
        key: ChunkKey,
        bufs: &dyn BufferSource,
    ) -> Option<(Arc<DiskDir>, ReadGuard, crate::memory::WritableBuf)> {
        let dir = self.dir(&key).clone();
        let (cap, gen) = dir.begin_read(&key)?;
        let guard = ReadGuard {
            dir: dir.clone(),
            key,
            gen,
        };
        let buf = bufs.allocate(cap as usize)?;
        Some((dir, guard, buf))
    }

    fn finish_read(
        &self,
        dir: &Arc<DiskDir>,
        key: ChunkKey,
        guard: ReadGuard,
        r: std::result::Result<crate::chunk::ChunkInfo, ReadError>,
        buf: crate::memory::WritableBuf,
    ) -> Result<Option<Chunk>> {
        let gen = guard.gen;
        drop(guard);
        match r {
            Ok(info) => Ok(Some(Chunk {
                info,
                buf: buf.seal(),
            })),
            Err(ReadError::Missing) => {
                // Deleted behind our back (or removed meanwhile): forget it.
                dir.drop_entry(&key, gen);
                Ok(None)
            }
            Err(ReadError::Corrupt(why)) => {
                self.corrupt(dir, key, &why);
                dir.drop_entry(&key, gen);
                Ok(None)
            }
            Err(ReadError::Io(e)) => {
                dir.counters
                    .read_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // A record the device cannot read would be a hit on every lookup and a
                // failed load on every retrieve: forget it (and reclaim its space). Not when
                // the process ran short of a resource: the record is likely fine then.
                if blames_the_record(&e) {
                    tracing::warn!(tier = %self.name, key = %key, error = %e, "disk tier: record unreadable; forgotten and deleted");
                    dir.drop_entry(&key, gen);
                }
                Err(Error::io(
                    format!(
                        "disk tier: reading chunk {key} under `{}`",
                        dir.root().display()
                    ),
                    e,
                ))
            }
        }
    }
}

impl Tier for DiskTier {
    fn name(&self) -> &str {
        &self.name
    }

    fn verifies_reads(&self) -> bool {
        true
    }

    fn holds(&self, key: &ChunkKey) -> Option<bool> {
        Some(self.dir(key).holds(key))
    }

    fn set_residency_observer(&self, observer: Arc<dyn ResidencyObserver>) -> bool {
        self.set_observer(observer)
    }

    fn observe_prompt(&self, keys: &[ChunkKey], report: PromptReport) {
        match self.dirs.as_slice() {
            [d] => d.observe_prompt(keys, report),
            // Striped: a prompt's chunks are spread over the paths, so a path sees its own
            // keys as one-key prompts (references counted, no prefix links across paths).
            _ => {
                for k in keys {
                    self.dir(k).observe_prompt(std::slice::from_ref(k), report);
                }
            }
        }
    }

    fn contains_prefix<'a>(&'a self, keys: &'a [ChunkKey]) -> TierFuture<'a, usize> {
        let n = keys.iter().take_while(|k| self.contains(k)).count();
        Box::pin(futures::future::ready(Ok(n)))
    }

    fn get<'a>(
        &'a self,
        key: ChunkKey,
        bufs: &'a dyn BufferSource,
    ) -> TierFuture<'a, Option<Chunk>> {
        Box::pin(self.read(key, bufs, true))
    }

    fn get_deferred<'a>(
        &'a self,
        key: ChunkKey,
        bufs: &'a dyn BufferSource,
    ) -> TierFuture<'a, Option<(Chunk, bool)>> {
        // The payload checksum is the one full pass over the bytes a disk read needs
        // besides the device's DMA; a copying caller does it in its copy instead.
        Box::pin(async move { Ok(self.read(key, bufs, false).await?.map(|c| (c, false))) })
    }

    fn discard_corrupt(&self, key: ChunkKey) -> TierFuture<'_, bool> {
        let dir = self.dir(&key).clone();
        self.corrupt(&dir, key, "payload checksum mismatch (found by the reader)");
        Box::pin(blocking(move || dir.remove(&key)))
    }

    fn put(&self, chunk: Chunk) -> TierFuture<'_, PutOutcome> {
        let dir = self.dir(&chunk.info.key).clone();
        Box::pin(blocking(move || dir.put(&chunk)))
    }

    fn remove(&self, key: ChunkKey) -> TierFuture<'_, bool> {
        let dir = self.dir(&key).clone();
        Box::pin(blocking(move || dir.remove(&key)))
    }

    fn clear(&self) -> TierFuture<'_, u64> {
        let dirs = self.dirs.clone();
        Box::pin(blocking(move || {
            dirs.iter().map(|d| d.remove_where(|_| true)).sum()
        }))
    }

    fn remove_salt<'a>(&'a self, salt: &'a str) -> TierFuture<'a, u64> {
        let dirs = self.dirs.clone();
        let tag = layout::salt_tag(Some(salt));
        Box::pin(blocking(move || {
            dirs.iter().map(|d| d.remove_where(|s| s == tag)).sum()
        }))
    }

    fn counters(&self) -> super::TierCounters {
        let st = self.stats();
        super::TierCounters {
            evictions: st.evictions,
            checksum_failures: st.checksum_failures,
        }
    }

    fn details(&self) -> serde_json::Value {
        serde_json::to_value(self.stats()).unwrap_or_default()
    }

    fn usage(&self) -> TierUsage {
        let s = self.stats();
        TierUsage {
            used_bytes: s.bytes,
            capacity_bytes: s.capacity,
            chunks: s.chunks,
        }
    }
}

#[cfg(test)]
mod tests;
