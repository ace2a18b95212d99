//! One directory of the disk tier: index, byte budget, eviction, the durable write path,
//! verified reads and startup recovery.
//!
//! Every method here blocks on I/O; [`super::DiskTier`] runs them on blocking threads.

use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use hashlink::LruCache;
use parking_lot::Mutex;

use super::commit::GroupCommit;
use super::io::{
    create_new, free_bytes, is_aligned, is_direct_unsupported, is_no_space, open_read,
    probe_direct, read_exact_vectored_at, round_block, sync_dir, write_all_vectored_at, AlignedBuf,
    BLOCK,
};
use super::layout;
use crate::chunk::{record, Chunk, ChunkInfo};
use crate::error::{Error, Result};
use crate::keys::{ChunkKey, KeyMap};
use crate::memory::WritableBuf;
use crate::policy::{Eviction, EvictionPolicy, PolicyKind, PromptReport};
use crate::tier::{PutOutcome, ResidencyObserver};

/// Options of one directory.
#[derive(Clone, Debug)]
pub(crate) struct DirOptions {
    pub root: PathBuf,
    pub capacity: u64,
    pub policy: PolicyKind,
    pub admit_after: u32,
    pub admit_tracking: usize,
    pub allow_direct_io: bool,
    /// Largest chunk payload the tier can be given (files above one such record are not
    /// records).
    pub max_payload: u64,
    /// Flush data and directory entries before acknowledging (survive power loss).
    pub flush: bool,
}

struct Entry {
    size: u64,
    salt: Option<u64>,
    readers: u32,
    gen: u64,
}

struct State {
    index: KeyMap<Entry>,
    policy: Box<dyn EvictionPolicy>,
    /// Bytes of indexed files.
    bytes: u64,
    /// Bytes reserved by writes in flight and by files being unlinked.
    reserved: u64,
    /// Keys being written.
    inflight: KeyMap<()>,
    /// Keys whose file is being unlinked (a new write must not race the unlink).
    deleting: KeyMap<u32>,
    /// Puts seen per key, for the admission gate.
    admit: LruCache<ChunkKey, u32>,
    next_gen: u64,
}

/// Counters of one directory.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub checksum_failures: AtomicU64,
    pub evictions: AtomicU64,
    pub evicted_bytes: AtomicU64,
    pub write_errors: AtomicU64,
    pub read_errors: AtomicU64,
    pub skipped_full: AtomicU64,
    pub skipped_not_admitted: AtomicU64,
    pub recovered_chunks: AtomicU64,
    pub recovery_removed: AtomicU64,
    pub recovery_micros: AtomicU64,
    pub commit_groups: AtomicU64,
    pub committed: AtomicU64,
    pub no_space_evictions: AtomicU64,
}

/// How a read failed.
pub(crate) enum ReadError {
    /// The file is gone.
    Missing,
    /// The file exists but is not a valid record of the key.
    Corrupt(String),
    /// The device failed.
    Io(io::Error),
}

/// One directory of the disk tier.
pub(crate) struct DiskDir {
    root: PathBuf,
    tmp: PathBuf,
    capacity: u64,
    admit_after: u32,
    direct: AtomicBool,
    full: AtomicBool,
    /// A chunk larger than the whole budget was logged.
    warned_oversize: AtomicBool,
    /// The device filled before the budget was logged.
    warned_device: AtomicBool,
    state: Mutex<State>,
    /// Batches the durability step of concurrent puts.
    commit: GroupCommit<Pending>,
    /// Whether a commit flushes to the device (else it only renames: process-crash safe).
    flush: bool,
    pub(crate) counters: Counters,
    /// Told of every index change once set (KV events); unset: no work. Called under
    /// `state`'s lock, so the reports about one key arrive in the order the index changed.
    observer: OnceLock<Arc<dyn ResidencyObserver>>,
}

/// A tmp file written (not yet flushed) and waiting for its commit round.
struct Pending {
    file: fs::File,
    tmp: PathBuf,
    dst: PathBuf,
    shard: u8,
}

impl std::fmt::Debug for DiskDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskDir")
            .field("root", &self.root)
            .field("capacity", &self.capacity)
            .finish()
    }
}

/// Snapshot of one directory's occupancy.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct DirUsage {
    pub chunks: u64,
    pub bytes: u64,
    pub reserved: u64,
    pub capacity: u64,
    pub direct_io: bool,
}

fn path_err(what: &str, path: &Path, e: io::Error) -> Error {
    Error::io(format!("disk tier: {what} `{}`", path.display()), e)
}

/// Refuses a root another user owns or every user may write: they could read every
/// tenant's cached KV, or plant and swap the files kvtier trusts.
fn check_root(root: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::metadata(root).map_err(|e| path_err("cannot stat", root, e))?;
    layout::check_owner(
        root,
        std::os::unix::fs::MetadataExt::uid(&meta),
        "disk directory",
    )?;
    let mode = meta.permissions().mode();
    if mode & 0o002 != 0 {
        return Err(Error::config(
            "local_disk",
            format!(
                "`{}` is writable by every user (mode {:o}): another user could plant or swap files kvtier trusts; run `chmod o-w` on it or point local_disk at a new directory (kvtier creates it with mode 700)",
                root.display(),
                mode & 0o7777
            ),
        ));
    }
    Ok(())
}

impl DiskDir {
    /// Opens (creating if needed) the directory, deletes kvtier's own leftovers and rebuilds
    /// the index. Refuses a directory kvtier cannot tell is its own (see [`super::layout`]).
    pub(crate) fn open(opts: &DirOptions) -> Result<DiskDir> {
        if opts.capacity < 2 * BLOCK as u64 {
            return Err(Error::config(
                "max_local_disk_size",
                format!(
                    "{} bytes for `{}` cannot hold one chunk; raise it",
                    opts.capacity,
                    opts.root.display()
                ),
            ));
        }
        let root = opts.root.clone();
        layout::create_dir(&root, true)?;
        check_root(&root)?;
        let t0 = Instant::now();
        // Nothing is deleted or created until the whole directory is known to be kvtier's.
        let survey = layout::survey(&root)?;
        if let Some(uid) = survey.marker_owner {
            layout::check_owner(&root.join(layout::MARKER), uid, "marker file")?;
        }
        let marked = survey.marker_owner.is_some();
        if !marked && survey.foreign.count > 0 {
            return Err(Error::config(
                "local_disk",
                format!(
                    "`{}` is not a kvtier directory: it has no marker file `{}` and holds {} entries kvtier did not create ({}). kvtier refuses it so that it never deletes them: point local_disk at a new or empty directory (kvtier creates it), e.g. /var/cache/kvtier",
                    root.display(),
                    layout::MARKER,
                    survey.foreign.count,
                    survey.foreign.describe()
                ),
            ));
        }
        if survey.foreign.count > 0 {
            tracing::warn!(path = %root.display(), count = survey.foreign.count, examples = %survey.foreign.describe(), "disk tier: entries that kvtier did not create are in its directory; left in place (kvtier only deletes files it names)");
        }
        let tmp = root.join(layout::TMP_DIR);
        layout::create_dir(&tmp, false)?;
        for b in 0..=255u8 {
            layout::create_dir(&root.join(layout::shard_name(b)), false)?;
        }
        if !marked {
            if survey.has_layout {
                tracing::info!(path = %root.display(), "disk tier: adopting a directory of kvtier's layout made before the marker file existed");
            }
            layout::write_marker(&root)?;
        }
        sync_dir(&root).map_err(|e| path_err("cannot sync directory", &root, e))?;
        // kvtier's own leftovers: tmp files of writes the process died in (never
        // acknowledged), records of the older layout, records in the wrong shard.
        let mut removed = 0u64;
        for p in &survey.leftovers {
            tracing::debug!(path = %p.display(), "disk tier: deleting a leftover file");
            if fs::remove_file(p).is_ok() {
                removed += 1;
            }
        }
        let direct = if opts.allow_direct_io {
            probe_direct(&tmp).map_err(|e| path_err("directory is not writable", &root, e))?
        } else {
            // Still check writability.
            let p = tmp.join(".probe");
            let _ = fs::remove_file(&p);
            create_new(&p, false).map_err(|e| path_err("directory is not writable", &root, e))?;
            let _ = fs::remove_file(&p);
            false
        };
        if opts.allow_direct_io && !direct {
            tracing::warn!(path = %root.display(), "file system rejects O_DIRECT; the disk tier uses buffered I/O + fdatasync");
        }
        // A record file is at most one chunk (no larger than the L1 pool it is staged in)
        // and never larger than the budget: anything bigger is not a record this tier
        // wrote, and counting it would evict every valid chunk "down to budget".
        let largest = opts
            .capacity
            .min((BLOCK as u64).saturating_add(round_block(opts.max_payload.min(u64::MAX / 2))));
        let mut found = Vec::with_capacity(survey.records.len());
        for f in survey.records {
            let (key, salt, size, _) = f;
            let p = layout::record_path(&root, &key, salt);
            if size < 2 * BLOCK as u64 || size % BLOCK as u64 != 0 {
                // A kvtier-named record in kvtier's own directory, damaged (truncated).
                tracing::warn!(path = %p.display(), size, "disk tier: deleting a torn record (not a whole number of 4 KiB blocks); not counted");
                if fs::remove_file(&p).is_ok() {
                    removed += 1;
                }
            } else if size > largest {
                // kvtier never writes such a file: deleted only when its trailing header
                // proves it is a whole kvtier record (staged through a larger L1 pool than
                // today's); a stranger's file that merely has a record's name stays.
                if is_whole_record(&p, &key, size) {
                    tracing::warn!(path = %p.display(), size, largest, "disk tier: deleting a record larger than any record this tier holds now (a smaller L1 pool?); not counted");
                    if fs::remove_file(&p).is_ok() {
                        removed += 1;
                    }
                } else {
                    tracing::warn!(path = %p.display(), size, largest, "disk tier: a file named like a record is larger than any record and has no valid record header: not kvtier's, not counted, left in place; remove it");
                }
            } else {
                found.push(f);
            }
        }
        found.sort_by_key(|f| f.3);
        let mut st = State {
            index: KeyMap::default(),
            policy: opts.policy.build(opts.capacity),
            bytes: 0,
            reserved: 0,
            inflight: KeyMap::default(),
            deleting: KeyMap::default(),
            admit: LruCache::new(opts.admit_tracking.max(1)),
            next_gen: 1,
        };
        for (key, salt, size, _) in found {
            if st.index.contains_key(&key) {
                let _ = fs::remove_file(layout::record_path(&root, &key, salt));
                removed += 1;
                continue;
            }
            let gen = st.next_gen;
            st.next_gen += 1;
            st.index.insert(
                key,
                Entry {
                    size,
                    salt,
                    readers: 0,
                    gen,
                },
            );
            st.policy.insert(key, size);
            st.bytes += size;
        }
        let dir = DiskDir {
            commit: GroupCommit::default(),
            flush: opts.flush,
            tmp,
            capacity: opts.capacity,
            admit_after: opts.admit_after.max(1),
            direct: AtomicBool::new(direct),
            full: AtomicBool::new(false),
            warned_oversize: AtomicBool::new(false),
            warned_device: AtomicBool::new(false),
            state: Mutex::new(st),
            counters: Counters::default(),
            observer: OnceLock::new(),
            root,
        };
        // A smaller budget than last time: evict down to it, and say so.
        let found_bytes = dir.state.lock().bytes;
        let mut victims = Vec::new();
        {
            let mut st = dir.state.lock();
            while st.bytes > dir.capacity {
                match dir.evict_one(&mut st, None).ok().flatten() {
                    Some(v) => victims.push(v),
                    None => break,
                }
            }
        }
        if !victims.is_empty() {
            let bytes: u64 = victims.iter().map(|v| v.2).sum();
            tracing::warn!(path = %dir.root.display(), evicted = victims.len(), evicted_bytes = bytes, found_bytes, budget = dir.capacity, "disk tier: the records found exceed the budget (max_local_disk_size was lowered?); evicted the oldest down to it");
        }
        dir.unlink_reserved(&victims);
        let (n, held) = {
            let st = dir.state.lock();
            (st.index.len() as u64, st.bytes)
        };
        dir.check_device_room(held);
        let dt = t0.elapsed();
        dir.counters.recovered_chunks.store(n, Ordering::Relaxed);
        dir.counters
            .recovery_removed
            .store(removed, Ordering::Relaxed);
        dir.counters
            .recovery_micros
            .store(dt.as_micros() as u64, Ordering::Relaxed);
        tracing::info!(path = %dir.root.display(), chunks = n, removed, evicted = victims.len(), direct_io = direct, ms = dt.as_millis() as u64, "disk tier recovered");
        Ok(dir)
    }

    /// Warns when the file system has less room than the budget still allows the tier to
    /// take (`held`: bytes the tier holds already): writes will then fill the device before
    /// the budget, and each full-device write evicts (see [`DiskDir::put`]).
    fn check_device_room(&self, held: u64) {
        match free_bytes(&self.root) {
            Ok(free) if self.capacity > held.saturating_add(free) => {
                tracing::warn!(path = %self.root.display(), budget = self.capacity, held, free, "disk tier: the budget (max_local_disk_size) is larger than the room on this file system: the device will fill first, and then the tier evicts to make room; lower max_local_disk_size to at most held + free");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(path = %self.root.display(), error = %e, "disk tier: cannot read the file system's free space (statvfs); the budget is not checked against it");
            }
        }
    }

    fn final_path(&self, key: &ChunkKey, salt: Option<u64>) -> PathBuf {
        layout::record_path(&self.root, key, salt)
    }

    /// Root directory.
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    /// Sets the observer told of every key this directory starts or stops indexing; only
    /// the first call takes effect (returns whether this one did). Records indexed before
    /// (found at startup) are not reported: their token counts are in record headers the
    /// startup scan does not read.
    pub(crate) fn set_observer(&self, observer: Arc<dyn ResidencyObserver>) -> bool {
        self.observer.set(observer).is_ok()
    }

    /// Tells the observer `key` left the index (call under `state`'s lock).
    fn report_removed(&self, key: &ChunkKey) {
        if let Some(o) = self.observer.get() {
            o.removed(std::slice::from_ref(key));
        }
    }

    pub(crate) fn usage(&self) -> DirUsage {
        let st = self.state.lock();
        DirUsage {
            chunks: st.index.len() as u64,
            bytes: st.bytes,
            reserved: st.reserved,
            capacity: self.capacity,
            direct_io: self.direct.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn contains(&self, key: &ChunkKey) -> bool {
        self.state.lock().index.contains_key(key)
    }

    /// Tells the eviction policy a request referenced this prompt's keys, in order.
    pub(crate) fn observe_prompt(&self, keys: &[ChunkKey], report: PromptReport) {
        self.state.lock().policy.observe_prompt(keys, report);
    }

    /// Whether `key` is indexed or being written.
    pub(crate) fn holds(&self, key: &ChunkKey) -> bool {
        let st = self.state.lock();
        st.index.contains_key(key) || st.inflight.contains_key(key)
    }

    /// Evicts the policy's next victim that nobody reads. Its bytes move from `bytes` to
    /// `reserved` until the file is unlinked (see [`DiskDir::unlink_reserved`]).
    /// For `incoming` (a put), the policy may decline (`Err(())`: keep everything).
    fn evict_one(
        &self,
        st: &mut State,
        incoming: Option<&ChunkKey>,
    ) -> Result<Option<(ChunkKey, Option<u64>, u64)>, ()> {
        let State { index, policy, .. } = st;
        let mut evictable = |k: &ChunkKey| index.get(k).is_none_or(|e| e.readers == 0);
        let victim = match incoming {
            None => policy.evict(&mut evictable),
            Some(key) => match policy.evict_for(key, &mut evictable) {
                Eviction::Victim(v) => Some(v),
                Eviction::Declined => return Err(()),
                Eviction::Nothing => None,
            },
        };
        Ok(victim.and_then(|v| self.take_victim(st, v)))
    }

    fn take_victim(
        &self,
        st: &mut State,
        victim: ChunkKey,
    ) -> Option<(ChunkKey, Option<u64>, u64)> {
        let e = st.index.remove(&victim)?;
        self.report_removed(&victim);
        st.bytes -= e.size;
        st.reserved += e.size;
        *st.deleting.entry(victim).or_insert(0) += 1;
        self.counters.evictions.fetch_add(1, Ordering::Relaxed);
        self.counters
            .evicted_bytes
            .fetch_add(e.size, Ordering::Relaxed);
        Some((victim, e.salt, e.size))
    }

    /// Takes an entry out of the index for deletion, like an eviction.
    fn take_locked(&self, st: &mut State, key: &ChunkKey) -> Option<(ChunkKey, Option<u64>, u64)> {
        let e = st.index.remove(key)?;
        self.report_removed(key);
        st.policy.remove(key);
        st.bytes -= e.size;
        st.reserved += e.size;
        *st.deleting.entry(*key).or_insert(0) += 1;
        Some((*key, e.salt, e.size))
    }

    /// Unlinks files taken out of the index and releases their reserved bytes.
    fn unlink_reserved(&self, victims: &[(ChunkKey, Option<u64>, u64)]) {
        if victims.is_empty() {
            return;
        }
        for (key, salt, _) in victims {
            let p = self.final_path(key, *salt);
            if let Err(e) = fs::remove_file(&p) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %p.display(), error = %e, "disk tier: cannot delete record file");
                }
            }
        }
        let mut st = self.state.lock();
        for (key, _, size) in victims {
            st.reserved -= size;
            if let Some(c) = st.deleting.get_mut(key) {
                *c -= 1;
                if *c == 0 {
                    st.deleting.remove(key);
                }
            }
        }
    }

    /// Stores a chunk durably (C5): tmp file, then a commit round shared with concurrent
    /// puts (fdatasync, rename, shard directory fsync).
    pub(crate) fn put(&self, chunk: &Chunk) -> PutOutcome {
        let key = chunk.info.key;
        let len = chunk.info.len;
        if chunk.buf.len() as u64 != len {
            tracing::warn!(key = %key, "disk tier: chunk length does not match its metadata; not stored");
            return PutOutcome::Skipped("invalid chunk");
        }
        let header = match record::encode_header(&chunk.info) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "disk tier: cannot encode record header");
                return PutOutcome::Skipped("invalid chunk");
            }
        };
        let salt = layout::salt_tag(chunk.info.origin.cache_salt.as_deref());
        let need = BLOCK as u64 + round_block(len);
        let mut victims = Vec::new();
        let mut got = 0u64;
        let fits;
        let mut declined = false;
        {
            let mut st = self.state.lock();
            if st.index.contains_key(&key) || st.inflight.contains_key(&key) {
                return PutOutcome::AlreadyPresent;
            }
            if st.deleting.contains_key(&key) {
                return PutOutcome::Skipped("being evicted");
            }
            if self.admit_after > 1 {
                let seen = st.admit.get(&key).copied().unwrap_or(0) + 1;
                if seen < self.admit_after {
                    st.admit.insert(key, seen);
                    self.counters
                        .skipped_not_admitted
                        .fetch_add(1, Ordering::Relaxed);
                    return PutOutcome::Skipped("not admitted");
                }
                st.admit.remove(&key);
            }
            if need > self.capacity {
                self.counters.skipped_full.fetch_add(1, Ordering::Relaxed);
                if !self.warned_oversize.swap(true, Ordering::Relaxed) {
                    tracing::warn!(path = %self.root.display(), chunk_bytes = len, file_bytes = need, budget = self.capacity, "disk tier: a chunk needs more room than the whole budget of this path; chunks this large are never stored on disk: raise max_local_disk_size");
                }
                return PutOutcome::Skipped("disk full");
            }
            loop {
                let free = self.capacity.saturating_sub(st.bytes + st.reserved);
                if got + free >= need {
                    let take = need.saturating_sub(got);
                    st.reserved += take;
                    got += take;
                    fits = true;
                    break;
                }
                match self.evict_one(&mut st, Some(&key)) {
                    Ok(Some(v)) => {
                        got += v.2;
                        victims.push(v);
                    }
                    Ok(None) => {
                        fits = false;
                        break;
                    }
                    Err(()) => {
                        fits = false;
                        declined = true;
                        break;
                    }
                }
            }
            if fits {
                st.inflight.insert(key, ());
            }
        }
        // Victims' bytes are part of `got`; unlink them, then keep exactly `need` reserved.
        for (k, s, _) in &victims {
            let p = self.final_path(k, *s);
            if let Err(e) = fs::remove_file(&p) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %p.display(), error = %e, "disk tier: cannot delete evicted file");
                }
            }
        }
        {
            let mut st = self.state.lock();
            for (k, _, _) in &victims {
                if let Some(c) = st.deleting.get_mut(k) {
                    *c -= 1;
                    if *c == 0 {
                        st.deleting.remove(k);
                    }
                }
            }
            let keep = if fits { need } else { 0 };
            st.reserved -= got - keep;
        }
        if declined {
            // The policy keeps what it holds: everything is worth more than this chunk.
            self.counters
                .skipped_not_admitted
                .fetch_add(1, Ordering::Relaxed);
            return PutOutcome::Skipped("not admitted");
        }
        if !fits {
            self.counters.skipped_full.fetch_add(1, Ordering::Relaxed);
            return PutOutcome::Skipped("disk full");
        }
        let mut r = self.write_file(&key, salt, &header, chunk);
        if r.as_ref().is_err_and(is_no_space) && self.make_room(need) {
            // The device filled before the budget: evicted as much as the write needs.
            r = self.write_file(&key, salt, &header, chunk);
        }
        let mut st = self.state.lock();
        st.inflight.remove(&key);
        st.reserved -= need;
        match r {
            Ok(()) => {
                let gen = st.next_gen;
                st.next_gen += 1;
                st.bytes += need;
                st.index.insert(
                    key,
                    Entry {
                        size: need,
                        salt,
                        readers: 0,
                        gen,
                    },
                );
                st.policy.insert(key, need);
                // Reported only now: the file is in place and indexed, so a read hits.
                if let Some(o) = self.observer.get() {
                    o.stored(&chunk.info);
                }
                drop(st);
                if self.full.swap(false, Ordering::Relaxed) {
                    tracing::info!(path = %self.root.display(), "disk tier: writes succeed again");
                }
                PutOutcome::Stored
            }
            Err(e) => {
                drop(st);
                self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
                self.counters.skipped_full.fetch_add(1, Ordering::Relaxed);
                if !self.full.swap(true, Ordering::Relaxed) {
                    if is_no_space(&e) {
                        tracing::warn!(path = %self.root.display(), error = %e, "disk tier: device full; chunks are skipped until writes succeed again");
                    } else {
                        tracing::warn!(path = %self.root.display(), error = %e, "disk tier: write failed; chunks are skipped until writes succeed again");
                    }
                }
                PutOutcome::Skipped("disk full")
            }
        }
    }

    /// The device is full before the budget (other files on it, or a budget larger than
    /// the device): evicts at least `need` bytes of records nobody reads, so the tier keeps
    /// storing (newest kept) instead of refusing every write from now on. Whether anything
    /// was evicted.
    fn make_room(&self, need: u64) -> bool {
        let victims = {
            let mut st = self.state.lock();
            let mut got = 0u64;
            let mut v = Vec::new();
            while got < need {
                match self.evict_one(&mut st, None).ok().flatten() {
                    Some(x) => {
                        got += x.2;
                        v.push(x);
                    }
                    None => break,
                }
            }
            v
        };
        if victims.is_empty() {
            return false;
        }
        let bytes: u64 = victims.iter().map(|v| v.2).sum();
        self.counters
            .no_space_evictions
            .fetch_add(victims.len() as u64, Ordering::Relaxed);
        let held = self.state.lock().bytes;
        if !self.warned_device.swap(true, Ordering::Relaxed) {
            tracing::warn!(path = %self.root.display(), evicted = victims.len(), evicted_bytes = bytes, held, budget = self.capacity, "disk tier: the device is full before the budget; evicting to make room (from now on whenever it is full; counted in no_space_evictions): lower max_local_disk_size to what the device holds");
        } else {
            tracing::debug!(path = %self.root.display(), evicted = victims.len(), evicted_bytes = bytes, "disk tier: device full; evicted to make room");
        }
        self.unlink_reserved(&victims);
        true
    }

    fn disable_direct(&self, e: &io::Error) {
        if self.direct.swap(false, Ordering::Relaxed) {
            tracing::warn!(path = %self.root.display(), error = %e, "file system rejects O_DIRECT; the disk tier falls back to buffered I/O + fdatasync");
        }
    }

    /// Writes the record file durably; on error nothing is left behind.
    fn write_file(
        &self,
        key: &ChunkKey,
        salt: Option<u64>,
        header: &[u8],
        chunk: &Chunk,
    ) -> io::Result<()> {
        let tmp = self.tmp.join(layout::tmp_name(key));
        let direct = self.direct.load(Ordering::Relaxed);
        let file = match write_tmp(&tmp, header, chunk, direct) {
            Err(e) if direct && is_direct_unsupported(&e) => {
                let _ = fs::remove_file(&tmp);
                self.disable_direct(&e);
                write_tmp(&tmp, header, chunk, false)
            }
            r => r,
        };
        let file = match file {
            Ok(f) => f,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let p = Pending {
            file,
            dst: self.final_path(key, salt),
            tmp,
            shard: key.0[0],
        };
        self.commit.submit(p, |group| self.commit_round(group))
    }

    /// One commit round for a group of written tmp files: make their data durable, rename
    /// them into place, make the new directory entries durable. One result per file; a
    /// failed file is removed (under either name).
    fn commit_round(&self, group: Vec<Pending>) -> Vec<io::Result<()>> {
        self.counters.commit_groups.fetch_add(1, Ordering::Relaxed);
        self.counters
            .committed
            .fetch_add(group.len() as u64, Ordering::Relaxed);
        // 1. Data (and file size) durable: the fdatasyncs run in parallel, so the file
        //    system commits the group's metadata in one journal transaction and the block
        //    layer merges the device flushes. (`syncfs` measured no faster here, and would
        //    also write back unrelated dirty data and blame every file for any error.)
        let mut res = if self.flush {
            parallel(&group, |p| p.file.sync_data())
        } else {
            // Process-crash durability: the kernel holds the written data either way.
            group.iter().map(|_| Ok(())).collect()
        };
        // 2. Renames.
        for (p, r) in group.iter().zip(res.iter_mut()) {
            if r.is_ok() {
                *r = fs::rename(&p.tmp, &p.dst);
            }
            if r.is_err() {
                let _ = fs::remove_file(&p.tmp);
            }
        }
        if !self.flush {
            // Process-crash durability: the renamed entries are in the kernel already.
            return res;
        }
        // 3. Directory entries durable: each touched shard directory once.
        let mut touched: Vec<u8> = group
            .iter()
            .zip(&res)
            .filter(|(_, r)| r.is_ok())
            .map(|(p, _)| p.shard)
            .collect();
        touched.sort_unstable();
        touched.dedup();
        let dir_res = parallel(&touched, |b| sync_dir(&self.root.join(format!("{b:02x}"))));
        for (p, r) in group.iter().zip(res.iter_mut()) {
            let synced = touched
                .binary_search(&p.shard)
                .ok()
                .and_then(|i| dir_res.get(i));
            if let (true, Some(Err(e))) = (r.is_ok(), synced) {
                *r = Err(clone_err(e));
                let _ = fs::remove_file(&p.dst);
            }
        }
        res
    }

    /// Registers a reader of `key`: its file will not be evicted until [`DiskDir::end_read`].
    /// Returns the payload capacity to allocate (file size minus the header block).
    pub(crate) fn begin_read(&self, key: &ChunkKey) -> Option<(u64, u64)> {
        let mut st = self.state.lock();
        let e = st.index.get_mut(key)?;
        e.readers += 1;
        let out = (e.size - BLOCK as u64, e.gen);
        st.policy.touch(key);
        Some(out)
    }

    pub(crate) fn end_read(&self, key: &ChunkKey, gen: u64) {
        let mut st = self.state.lock();
        if let Some(e) = st.index.get_mut(key) {
            if e.gen == gen {
                e.readers = e.readers.saturating_sub(1);
            }
        }
    }

    /// Reads the record of `key` into `buf` (capacity = file size - 4096), checking its
    /// header, and its payload checksum when `verify`.
    pub(crate) fn read(
        &self,
        key: &ChunkKey,
        gen: u64,
        buf: &mut WritableBuf,
        verify: bool,
    ) -> std::result::Result<ChunkInfo, ReadError> {
        let path = {
            let st = self.state.lock();
            match st.index.get(key) {
                Some(e) if e.gen == gen => self.final_path(key, e.salt),
                _ => return Err(ReadError::Missing),
            }
        };
        let direct = self.direct.load(Ordering::Relaxed);
        match read_record(&path, key, buf, direct, verify) {
            Err(ReadError::Io(e)) if direct && is_direct_unsupported(&e) => {
                self.disable_direct(&e);
                read_record(&path, key, buf, false, verify)
            }
            r => r,
        }
    }

    /// Drops the index entry of generation `gen` of `key` and deletes its file.
    pub(crate) fn drop_entry(&self, key: &ChunkKey, gen: u64) -> bool {
        let v = {
            let mut st = self.state.lock();
            match st.index.get(key) {
                Some(e) if e.gen == gen => self.take_locked(&mut st, key),
                _ => None,
            }
        };
        match v {
            Some(v) => {
                self.unlink_reserved(&[v]);
                true
            }
            None => false,
        }
    }

    pub(crate) fn remove(&self, key: &ChunkKey) -> bool {
        let v = self.take_locked(&mut self.state.lock(), key);
        match v {
            Some(v) => {
                self.unlink_reserved(&[v]);
                true
            }
            None => false,
        }
    }

    /// Removes every entry matching `pred` (on the salt tag); returns how many.
    pub(crate) fn remove_where(&self, pred: impl Fn(Option<u64>) -> bool) -> u64 {
        let victims: Vec<_> = {
            let mut st = self.state.lock();
            let keys: Vec<ChunkKey> = st
                .index
                .iter()
                .filter(|(_, e)| pred(e.salt))
                .map(|(k, _)| *k)
                .collect();
            keys.iter()
                .filter_map(|k| self.take_locked(&mut st, k))
                .collect()
        };
        let n = victims.len() as u64;
        self.unlink_reserved(&victims);
        if n > 0 {
            let _ = sync_dir(&self.root);
        }
        n
    }
}

fn clone_err(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(c) => io::Error::from_raw_os_error(c),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

/// Runs `f` on every item, the first on the calling thread and the others on scoped
/// threads, so blocking syscalls (fdatasync, fsync) are in flight together.
fn parallel<T: Sync>(items: &[T], f: impl Fn(&T) -> io::Result<()> + Sync) -> Vec<io::Result<()>> {
    match items {
        [] => Vec::new(),
        [one] => vec![f(one)],
        [first, rest @ ..] => std::thread::scope(|s| {
            let f = &f;
            let handles: Vec<_> = rest.iter().map(|x| s.spawn(move || f(x))).collect();
            let mut out = vec![f(first)];
            out.extend(handles.into_iter().map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(io::Error::other("disk tier: sync thread panicked")))
            }));
            out
        }),
    }
}

/// Writes payload (+ zero padding to a whole block) + header block into a new file (not
/// yet flushed: the commit round does that). One `pwritev` when the payload is a pool
/// buffer.
fn write_tmp(path: &Path, header: &[u8], chunk: &Chunk, direct: bool) -> io::Result<fs::File> {
    let f = create_new(path, direct)?;
    let payload = chunk.payload();
    let len = payload.len();
    let whole = len / BLOCK * BLOCK;
    let mut head = AlignedBuf::zeroed(BLOCK)?;
    head.as_mut_slice()[..header.len()].copy_from_slice(header);
    let cap = chunk.buf.as_capacity_slice();
    let body = &cap[..whole];
    let mut tail = None;
    if whole < len {
        // The last partial block goes through a zeroed buffer: no stale pool bytes on disk.
        let mut t = AlignedBuf::zeroed(BLOCK)?;
        t.as_mut_slice()[..len - whole].copy_from_slice(&payload[whole..]);
        tail = Some(t);
    }
    let head_at = round_block(len as u64);
    if !direct || is_aligned(body) {
        let mut bufs: Vec<&[u8]> = vec![body];
        if let Some(t) = &tail {
            bufs.push(t.as_slice());
        }
        bufs.push(head.as_slice());
        write_all_vectored_at(&f, &bufs, 0)?;
        return Ok(f);
    }
    if whole > 0 {
        // Not a pool buffer: go through an aligned bounce buffer.
        let step = (1 << 20).min(whole);
        let mut bounce = AlignedBuf::zeroed(step)?;
        let mut off = 0;
        while off < whole {
            let n = step.min(whole - off);
            bounce.as_mut_slice()[..n].copy_from_slice(&body[off..off + n]);
            f.write_all_at(&bounce.as_slice()[..n], off as u64)?;
            off += n;
        }
    }
    if let Some(t) = &tail {
        f.write_all_at(t.as_slice(), whole as u64)?;
    }
    f.write_all_at(head.as_slice(), head_at)?;
    Ok(f)
}

fn eof_to_corrupt(e: io::Error, what: &str) -> ReadError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        ReadError::Corrupt(format!("{what}: file truncated"))
    } else {
        ReadError::Io(e)
    }
}

/// Reads one record file into `buf`, checking header, key, size and (when `verify`) the
/// payload checksum.
fn read_record(
    path: &Path,
    key: &ChunkKey,
    buf: &mut WritableBuf,
    direct: bool,
    verify: bool,
) -> std::result::Result<ChunkInfo, ReadError> {
    let f = match open_read(path, direct) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ReadError::Missing),
        Err(e) => return Err(ReadError::Io(e)),
    };
    let size = f.metadata().map_err(ReadError::Io)?.len();
    let cap = buf.capacity();
    if size != BLOCK as u64 + cap {
        return Err(ReadError::Corrupt(format!(
            "file is {size} bytes, expected {}",
            BLOCK as u64 + cap
        )));
    }
    let mut head = AlignedBuf::zeroed(BLOCK).map_err(ReadError::Io)?;
    // Payload and header in one `preadv` when the buffer suits `O_DIRECT` (pool buffers do).
    let together = !direct || is_aligned(buf.as_mut_capacity());
    if together {
        read_exact_vectored_at(&f, &mut [buf.as_mut_capacity(), head.as_mut_slice()], 0)
            .map_err(|e| eof_to_corrupt(e, "record"))?;
    } else {
        f.read_exact_at(head.as_mut_slice(), cap)
            .map_err(|e| eof_to_corrupt(e, "header"))?;
    }
    let (info, _) =
        record::decode_header(head.as_slice()).map_err(|e| ReadError::Corrupt(e.to_string()))?;
    if info.key != *key {
        return Err(ReadError::Corrupt(format!(
            "header names chunk {}",
            info.key
        )));
    }
    if round_block(info.len) != cap || info.len == 0 {
        return Err(ReadError::Corrupt(format!(
            "header says {} payload bytes; the file holds {cap}",
            info.len
        )));
    }
    if !together {
        f.read_exact_at(buf.as_mut_capacity(), 0)
            .map_err(|e| eof_to_corrupt(e, "payload"))?;
    }
    buf.truncate(info.len as usize);
    if verify {
        info.verify(buf.as_slice())
            .map_err(|e| ReadError::Corrupt(e.to_string()))?;
    }
    Ok(info)
}

/// Whether `path` (of `size` bytes) ends with a valid kvtier record header for `key` whose
/// payload length accounts for the whole file: proof that kvtier wrote it, so the tier may
/// delete it. Never follows a symlink or waits on a FIFO.
fn is_whole_record(path: &Path, key: &ChunkKey, size: u64) -> bool {
    let Ok(f) = layout::open_nofollow(path) else {
        return false;
    };
    if !f.metadata().is_ok_and(|m| m.is_file() && m.len() == size) {
        return false;
    }
    let mut head = vec![0u8; BLOCK];
    if f.read_exact_at(&mut head, size - BLOCK as u64).is_err() {
        return false;
    }
    record::decode_header(&head).is_ok_and(|(info, _)| {
        let whole = info.len.checked_next_multiple_of(BLOCK as u64);
        info.key == *key && whole.and_then(|w| w.checked_add(BLOCK as u64)) == Some(size)
    })
}
