//! One directory of the disk tier: index, byte budget, eviction, the durable write path,
//! verified reads and startup recovery.
//!
//! Every method here blocks on I/O; [`super::DiskTier`] runs them on blocking threads.

use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use hashlink::LruCache;
use parking_lot::Mutex;
use rayon::prelude::*;

use super::commit::GroupCommit;
use super::io::{
    create_new, is_aligned, is_direct_unsupported, is_no_space, open_read, probe_direct,
    read_exact_vectored_at, round_block, sync_dir, write_all_vectored_at, AlignedBuf, BLOCK,
};
use crate::chunk::{record, Chunk, ChunkInfo};
use crate::error::{Error, Result};
use crate::keys::{ChunkKey, KeyMap};
use crate::memory::WritableBuf;
use crate::policy::{Eviction, EvictionPolicy, PolicyKind, PromptReport};
use crate::tier::PutOutcome;

/// Extension of committed record files.
pub(crate) const EXT: &str = "kvr";
/// Extension of the header-first layout of earlier builds: deleted at startup.
const OLD_EXT: &str = ".kvc";
/// Name of the scratch directory for files being written.
const TMP_DIR: &str = "tmp";
/// Salt tag of chunks stored without a tenant salt.
const NO_SALT: &str = "none";

/// Short, stable tag of a tenant salt used in file names (so `remove_salt` and recovery
/// need no header reads).
pub(crate) fn salt_tag(salt: Option<&str>) -> Option<u64> {
    salt.map(|s| xxhash_rust::xxh3::xxh3_64(s.as_bytes()))
}

/// File name of a committed record: `<64 hex key>.<16 hex salt tag | none>.kvr`.
fn file_name(key: &ChunkKey, salt: Option<u64>) -> String {
    match salt {
        Some(t) => format!("{}.{t:016x}.{EXT}", key.to_hex()),
        None => format!("{}.{NO_SALT}.{EXT}", key.to_hex()),
    }
}

/// Parses a committed file name; `None` for anything else.
fn parse_name(name: &str) -> Option<(ChunkKey, Option<u64>)> {
    let mut parts = name.split('.');
    let (k, s, e) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some()
        || e != EXT
        || k.len() != 64
        || k.bytes().any(|b| b.is_ascii_uppercase())
    {
        return None;
    }
    let key = ChunkKey::from_hex(k).ok()?;
    let salt = if s == NO_SALT {
        None
    } else if s.len() == 16 && !s.bytes().any(|b| b.is_ascii_uppercase()) {
        Some(u64::from_str_radix(s, 16).ok()?)
    } else {
        return None;
    };
    Some((key, salt))
}

/// A record file found at startup: key, salt tag, size, mtime.
type Found = (ChunkKey, Option<u64>, u64, SystemTime);

/// Options of one directory.
#[derive(Clone, Debug)]
pub(crate) struct DirOptions {
    pub root: PathBuf,
    pub capacity: u64,
    pub policy: PolicyKind,
    pub admit_after: u32,
    pub admit_tracking: usize,
    pub allow_direct_io: bool,
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
    state: Mutex<State>,
    /// Batches the durability step of concurrent puts.
    commit: GroupCommit<Pending>,
    /// Whether a commit flushes to the device (else it only renames: process-crash safe).
    flush: bool,
    pub(crate) counters: Counters,
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

impl DiskDir {
    /// Opens (creating if needed) the directory, deletes leftovers and rebuilds the index.
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
        match fs::create_dir(&root) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && root.is_dir() => {}
            Err(e) => return Err(path_err("cannot create directory", &root, e)),
        }
        let tmp = root.join(TMP_DIR);
        let mkdir = |p: &Path| match fs::create_dir(p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && p.is_dir() => Ok(()),
            Err(e) => Err(path_err("cannot create directory", p, e)),
        };
        mkdir(&tmp)?;
        for b in 0..=255u8 {
            mkdir(&root.join(format!("{b:02x}")))?;
        }
        sync_dir(&root).map_err(|e| path_err("cannot sync directory", &root, e))?;
        let t0 = Instant::now();
        let mut removed = 0u64;
        // Files being written when the process died: never acknowledged, drop them.
        let entries = fs::read_dir(&tmp).map_err(|e| path_err("cannot list directory", &tmp, e))?;
        for e in entries.flatten() {
            if fs::remove_file(e.path()).is_ok() {
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
        // Scan the 256 shard directories in parallel: readdir + fstatat, no payload reads.
        let scanned: Vec<(Vec<Found>, u64)> = (0..=255u8)
            .into_par_iter()
            .map(|b| scan_shard(&root.join(format!("{b:02x}")), b))
            .collect();
        let mut found = Vec::new();
        for (v, r) in scanned {
            removed += r;
            found.extend(v);
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
                let _ = fs::remove_file(
                    root.join(format!("{:02x}", key.0[0]))
                        .join(file_name(&key, salt)),
                );
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
            state: Mutex::new(st),
            counters: Counters::default(),
            root,
        };
        // A smaller budget than last time: evict down to it.
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
        dir.unlink_reserved(&victims);
        let n = dir.state.lock().index.len() as u64;
        let dt = t0.elapsed();
        dir.counters.recovered_chunks.store(n, Ordering::Relaxed);
        dir.counters
            .recovery_removed
            .store(removed, Ordering::Relaxed);
        dir.counters
            .recovery_micros
            .store(dt.as_micros() as u64, Ordering::Relaxed);
        tracing::info!(path = %dir.root.display(), chunks = n, removed, direct_io = direct, ms = dt.as_millis() as u64, "disk tier recovered");
        Ok(dir)
    }

    fn final_path(&self, key: &ChunkKey, salt: Option<u64>) -> PathBuf {
        self.root
            .join(format!("{:02x}", key.0[0]))
            .join(file_name(key, salt))
    }

    /// Root directory.
    pub(crate) fn root(&self) -> &Path {
        &self.root
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
    fn take_locked(st: &mut State, key: &ChunkKey) -> Option<(ChunkKey, Option<u64>, u64)> {
        let e = st.index.remove(key)?;
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
        let salt = salt_tag(chunk.info.origin.cache_salt.as_deref());
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
        let r = self.write_file(&key, salt, &header, chunk);
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
        let tmp = self
            .tmp
            .join(format!("{}.{:016x}", key.to_hex(), rand::random::<u64>()));
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
                Some(e) if e.gen == gen => Self::take_locked(&mut st, key),
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
        let v = Self::take_locked(&mut self.state.lock(), key);
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
                .filter_map(|k| Self::take_locked(&mut st, k))
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

/// Lists one shard directory: valid record files (key, salt tag, size, mtime) and the
/// number of invalid files deleted.
fn scan_shard(dir: &Path, byte: u8) -> (Vec<Found>, u64) {
    let mut out = Vec::new();
    let mut removed = 0;
    let Ok(rd) = fs::read_dir(dir) else {
        return (out, 0);
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let parsed = name
            .to_str()
            .and_then(parse_name)
            .filter(|(k, _)| k.0[0] == byte);
        let Ok(meta) = e.metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        let size = meta.len();
        match parsed {
            Some((key, salt)) if size >= 2 * BLOCK as u64 && size % BLOCK as u64 == 0 => {
                out.push((
                    key,
                    salt,
                    size,
                    meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                ));
            }
            _ => {
                if name.to_str().is_some_and(|n| n.ends_with(OLD_EXT)) {
                    tracing::debug!(path = %e.path().display(), "disk tier: deleting a record of the older header-first layout");
                } else {
                    tracing::warn!(path = %e.path().display(), "disk tier: deleting a file that is not a valid record");
                }
                if fs::remove_file(e.path()).is_ok() {
                    removed += 1;
                }
            }
        }
    }
    (out, removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_reject_garbage() {
        let k = ChunkKey([0xab; 32]);
        for salt in [None, Some(0x0123_4567_89ab_cdef)] {
            assert_eq!(parse_name(&file_name(&k, salt)), Some((k, salt)));
        }
        for bad in [
            "x.kvr",
            "ab.none.kvr",
            &format!("{}.none.kvc", k.to_hex()),
            &format!("{}.none.tmp", k.to_hex()),
            &format!("{}.zz.kvr", k.to_hex()),
            &format!("{}.none.kvr.1", k.to_hex()),
            &format!("{}.none.kvr", k.to_hex().to_uppercase()),
        ] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
    }
}
