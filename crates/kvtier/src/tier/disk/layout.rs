//! What a disk tier directory holds, by name: the file names kvtier writes, the marker file
//! that says a directory is kvtier's, and the survey that sorts a directory's entries into
//! kvtier's own files and everything else before anything in it is deleted.
//!
//! # The data-safety rule
//! kvtier deletes only files it names itself, and only in a directory it recognises as its
//! own: one carrying the marker [`MARKER`], or (a directory made by a kvtier build from
//! before the marker) one whose every entry matches the layout below. Anything else found
//! under the root is left in place; a non-empty directory without the marker that holds
//! anything else is refused. Layout:
//!
//! ```text
//! <root>/kvtier-disk.json                          the marker (JSON: layout version, note)
//! <root>/tmp/<64 hex key>.<16 hex>                 a record being written
//! <root>/tmp/.probe[.<16 hex>]                     the O_DIRECT / writability probe
//! <root>/tmp/.marker.<16 hex>                      the marker being written
//! <root>/<2 hex>/<64 hex key>.<16 hex|none>.kvr    a record
//! <root>/<2 hex>/<64 hex key>.<16 hex|none>.kvc    a record of the older header-first layout
//! <root>/lost+found/                               a file system's own; never entered
//! ```

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rayon::prelude::*;

use super::io::sync_dir;
use crate::error::{Error, Result};
use crate::keys::ChunkKey;

/// Name of the marker file at the root of every kvtier disk directory.
pub const MARKER: &str = "kvtier-disk.json";
/// Layout version written into the marker; a marker with a higher one is refused.
const LAYOUT_VERSION: u64 = 1;
/// Extension of committed record files.
pub(crate) const EXT: &str = "kvr";
/// Extension of the header-first layout of earlier builds: deleted at startup.
pub(crate) const OLD_EXT: &str = "kvc";
/// Name of the scratch directory for files being written.
pub(crate) const TMP_DIR: &str = "tmp";
/// Salt tag of chunks stored without a tenant salt.
const NO_SALT: &str = "none";
/// A file system's recovery directory at the root of a mount point: allowed, never entered.
const LOST_FOUND: &str = "lost+found";
/// Foreign entries named in an error or a log line (the rest are counted).
const SHOWN: usize = 5;

/// Short, stable tag of a tenant salt used in file names (so `remove_salt` and recovery
/// need no header reads).
pub(crate) fn salt_tag(salt: Option<&str>) -> Option<u64> {
    salt.map(|s| xxhash_rust::xxh3::xxh3_64(s.as_bytes()))
}

/// File name of a committed record: `<64 hex key>.<16 hex salt tag | none>.kvr`.
pub(crate) fn file_name(key: &ChunkKey, salt: Option<u64>) -> String {
    match salt {
        Some(t) => format!("{}.{t:016x}.{EXT}", key.to_hex()),
        None => format!("{}.{NO_SALT}.{EXT}", key.to_hex()),
    }
}

/// Name of the shard directory of `key`.
pub(crate) fn shard_name(byte: u8) -> String {
    format!("{byte:02x}")
}

/// Path of the committed record of `key` under `root`.
pub(crate) fn record_path(root: &Path, key: &ChunkKey, salt: Option<u64>) -> PathBuf {
    root.join(shard_name(key.0[0])).join(file_name(key, salt))
}

/// Name of a record's tmp file while it is written.
pub(crate) fn tmp_name(key: &ChunkKey) -> String {
    format!("{}.{:016x}", key.to_hex(), rand::random::<u64>())
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Parses a record name with extension `ext`; `None` for anything else.
fn parse_with_ext(name: &str, ext: &str) -> Option<(ChunkKey, Option<u64>)> {
    let mut parts = name.split('.');
    let (k, s, e) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || e != ext || !is_lower_hex(k, 64) {
        return None;
    }
    let key = ChunkKey::from_hex(k).ok()?;
    let salt = if s == NO_SALT {
        None
    } else if is_lower_hex(s, 16) {
        Some(u64::from_str_radix(s, 16).ok()?)
    } else {
        return None;
    };
    Some((key, salt))
}

/// Parses a committed record name; `None` for anything else.
pub(crate) fn parse_name(name: &str) -> Option<(ChunkKey, Option<u64>)> {
    parse_with_ext(name, EXT)
}

/// Whether `name` is a file kvtier writes into `tmp/` (record, probe or marker in the
/// making).
fn is_tmp_name(name: &str) -> bool {
    if name == ".probe" {
        return true;
    }
    if let Some(r) = name
        .strip_prefix(".probe.")
        .or_else(|| name.strip_prefix(".marker."))
    {
        return is_lower_hex(r, 16);
    }
    matches!(name.split_once('.'), Some((k, r)) if is_lower_hex(k, 64) && is_lower_hex(r, 16))
}

/// The shard byte a root entry's name stands for (`00`..`ff`, lowercase).
fn shard_byte(name: &str) -> Option<u8> {
    if is_lower_hex(name, 2) {
        u8::from_str_radix(name, 16).ok()
    } else {
        None
    }
}

/// A record file found by the survey: key, salt tag, size, mtime.
pub(crate) type Found = (ChunkKey, Option<u64>, u64, SystemTime);

/// Entries that are not kvtier's: a few named, all counted.
#[derive(Debug, Default)]
pub(crate) struct Foreign {
    /// The first few, for messages.
    pub shown: Vec<PathBuf>,
    /// How many in all.
    pub count: u64,
}

impl Foreign {
    fn add(&mut self, p: PathBuf) {
        self.count += 1;
        if self.shown.len() < SHOWN {
            self.shown.push(p);
        }
    }

    fn merge(&mut self, o: Foreign) {
        self.count += o.count;
        for p in o.shown {
            if self.shown.len() < SHOWN {
                self.shown.push(p);
            }
        }
    }

    /// `` `a`, `b` (and 3 more) `` for messages.
    pub(crate) fn describe(&self) -> String {
        let mut s = self
            .shown
            .iter()
            .map(|p| format!("`{}`", p.display()))
            .collect::<Vec<_>>()
            .join(", ");
        let more = self.count.saturating_sub(self.shown.len() as u64);
        if more > 0 {
            s.push_str(&format!(" and {more} more"));
        }
        s
    }
}

/// What the marker says.
#[derive(Debug)]
pub(crate) enum Marker {
    /// Present and kvtier's, owned by this uid.
    Present {
        /// The marker file's owner.
        uid: u32,
    },
    /// No marker file.
    Absent,
}

/// A read-only listing of a disk directory, sorted by who made each entry. Nothing is
/// deleted while surveying; the caller decides from the whole picture.
#[derive(Debug, Default)]
pub(crate) struct Survey {
    /// Owner of the marker, when there is one (the caller decides whom it trusts).
    pub marker_owner: Option<u32>,
    /// Whether anything of kvtier's layout is there (`tmp/`, a shard directory).
    pub has_layout: bool,
    /// Regular files named like records, in their own shard directory.
    pub records: Vec<Found>,
    /// Files kvtier named that are not records to index: tmp leftovers, records of the
    /// older layout, records in the wrong shard. Deleted by the tier, counted by `inspect`.
    pub leftovers: Vec<PathBuf>,
    /// How many of the leftovers sit in `tmp/`.
    pub tmp_leftovers: u64,
    /// Entries kvtier did not make (never deleted).
    pub foreign: Foreign,
}

/// Lists `root` (which must exist) without changing anything. Fails when the root, `tmp/`
/// or a shard directory cannot be listed, or when the marker is not kvtier's.
pub(crate) fn survey(root: &Path) -> Result<Survey> {
    let marker_owner = match read_marker(root)? {
        Marker::Present { uid } => Some(uid),
        Marker::Absent => None,
    };
    let mut s = Survey {
        marker_owner,
        ..Survey::default()
    };
    let mut shards = Vec::new();
    let rd = fs::read_dir(root).map_err(|e| path_err("cannot list directory", root, e))?;
    for e in rd {
        let e = e.map_err(|e| path_err("cannot list directory", root, e))?;
        let name = e.file_name();
        let ty = e
            .file_type()
            .map_err(|err| path_err("cannot stat", &e.path(), err))?;
        match name.to_str() {
            Some(MARKER) if ty.is_file() => {}
            Some(TMP_DIR) if ty.is_dir() => {
                s.has_layout = true;
                survey_tmp(&e.path(), &mut s)?;
            }
            Some(LOST_FOUND) if ty.is_dir() => {}
            Some(n) if ty.is_dir() && shard_byte(n).is_some() => {
                s.has_layout = true;
                shards.push((e.path(), shard_byte(n).unwrap_or(0)));
            }
            _ => s.foreign.add(e.path()),
        }
    }
    // The shard directories in parallel: readdir + fstatat, no payload reads.
    let listed: Vec<Result<ShardList>> = shards
        .par_iter()
        .map(|(p, b)| survey_shard(p, *b))
        .collect();
    for l in listed {
        let l = l?;
        s.records.extend(l.records);
        s.leftovers.extend(l.leftovers);
        s.foreign.merge(l.foreign);
    }
    Ok(s)
}

fn survey_tmp(tmp: &Path, s: &mut Survey) -> Result<()> {
    let rd = fs::read_dir(tmp).map_err(|e| path_err("cannot list directory", tmp, e))?;
    for e in rd {
        let e = e.map_err(|e| path_err("cannot list directory", tmp, e))?;
        let regular = e.file_type().is_ok_and(|t| t.is_file());
        if regular && e.file_name().to_str().is_some_and(is_tmp_name) {
            s.leftovers.push(e.path());
            s.tmp_leftovers += 1;
        } else {
            s.foreign.add(e.path());
        }
    }
    Ok(())
}

#[derive(Default)]
struct ShardList {
    records: Vec<Found>,
    leftovers: Vec<PathBuf>,
    foreign: Foreign,
}

fn survey_shard(dir: &Path, byte: u8) -> Result<ShardList> {
    let mut out = ShardList::default();
    let rd = fs::read_dir(dir).map_err(|e| path_err("cannot list directory", dir, e))?;
    for e in rd {
        let e = e.map_err(|e| path_err("cannot list directory", dir, e))?;
        let name = e.file_name();
        let name = name.to_str().unwrap_or("");
        // The type from the directory entry: symlinks, FIFOs, sockets and devices are never
        // kvtier's, whatever their name, and are never opened.
        if !e.file_type().is_ok_and(|t| t.is_file()) {
            out.foreign.add(e.path());
            continue;
        }
        match parse_name(name) {
            Some((key, salt)) if key.0[0] == byte => {
                // Gone meanwhile (evicted by a running tier, for `inspect`): skip it.
                let Ok(meta) = e.metadata() else { continue };
                let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                out.records.push((key, salt, meta.len(), mtime));
            }
            Some(_) => out.leftovers.push(e.path()),
            None if parse_with_ext(name, OLD_EXT).is_some() => out.leftovers.push(e.path()),
            None => out.foreign.add(e.path()),
        }
    }
    Ok(out)
}

fn path_err(what: &str, path: &Path, e: io::Error) -> Error {
    Error::io(format!("disk tier: {what} `{}`", path.display()), e)
}

/// Opens a file for reading without following a symlink and without blocking on a FIFO.
pub(crate) fn open_nofollow(path: &Path) -> io::Result<fs::File> {
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
}

/// Reads the marker of `root`: `Absent` when there is none; an error when it is not a
/// regular file, is unreadable, or is not kvtier's.
pub(crate) fn read_marker(root: &Path) -> Result<Marker> {
    let path = root.join(MARKER);
    let f = match open_nofollow(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Marker::Absent),
        Err(e) => return Err(marker_err(&path, &format!("cannot be opened ({e})"))),
    };
    let meta = f
        .metadata()
        .map_err(|e| marker_err(&path, &format!("cannot be read ({e})")))?;
    if !meta.is_file() {
        return Err(marker_err(&path, "is not a regular file"));
    }
    let mut text = String::new();
    f.take(64 << 10)
        .read_to_string(&mut text)
        .map_err(|e| marker_err(&path, &format!("cannot be read ({e})")))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|_| marker_err(&path, "is not a kvtier marker (not JSON)"))?;
    let version = v
        .get("kvtier_disk_layout")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| marker_err(&path, "is not a kvtier marker (no `kvtier_disk_layout`)"))?;
    if version > LAYOUT_VERSION {
        return Err(marker_err(
            &path,
            &format!(
                "says layout version {version}, written by a newer kvtier; this build reads version {LAYOUT_VERSION}: run the newer kvtier or point local_disk at another directory"
            ),
        ));
    }
    Ok(Marker::Present { uid: meta.uid() })
}

fn marker_err(path: &Path, what: &str) -> Error {
    Error::config(
        "local_disk",
        format!(
            "the marker `{}` {what}; kvtier uses a directory only when it can tell the directory is its own",
            path.display()
        ),
    )
}

/// Refuses a file or directory another unprivileged user owns (`uid`): whoever owns a
/// kvtier directory could read every tenant's cached KV and plant files kvtier would trust.
pub(crate) fn check_owner(path: &Path, uid: u32, what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if uid != me && uid != 0 {
        return Err(Error::config(
            "local_disk",
            format!(
                "{what} `{}` belongs to uid {}, not to this process (uid {me}) or root: another user could read or plant cache files there; use a directory this user owns (kvtier creates it when missing)",
                path.display(),
                uid
            ),
        ));
    }
    Ok(())
}

/// The marker's text: a layout version and a note for whoever finds the directory.
fn marker_text() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let v = serde_json::json!({
        "kvtier_disk_layout": LAYOUT_VERSION,
        "record_format": crate::chunk::record::FORMAT_VERSION,
        "created_by": concat!("kvtier ", env!("CARGO_PKG_VERSION")),
        "created_unix_secs": secs,
        "note": "This directory is a kvtier disk tier (local_disk). kvtier deletes files here that it \
                 names itself (tmp/*, <2 hex>/<64 hex>.<tag>.kvr): keep nothing else in it. It is a \
                 cache: deleting the whole directory while kvtier is stopped loses nothing but cached KV.",
    });
    let mut s = serde_json::to_string_pretty(&v).unwrap_or_default();
    s.push('\n');
    s
}

/// Writes the marker durably: written and flushed under `tmp/`, renamed into place, the
/// root fsynced (a crash leaves either no marker or a whole one).
pub(crate) fn write_marker(root: &Path) -> Result<()> {
    let tmp = root
        .join(TMP_DIR)
        .join(format!(".marker.{:016x}", rand::random::<u64>()));
    let dst = root.join(MARKER);
    let r = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(marker_text().as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, &dst)?;
        sync_dir(root)
    })();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r.map_err(|e| path_err("cannot write the marker file", &dst, e))
}

/// Creates `dir` with mode 0700 (cached KV holds every tenant's prompts) unless a directory
/// of that name exists; whether it was created. The root may be a symlink to a directory
/// (a user's choice); below it kvtier makes real directories only, and a symlink there
/// (`tmp` -> elsewhere) is refused rather than followed.
pub(crate) fn create_dir(dir: &Path, is_root: bool) -> Result<bool> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let meta = if is_root {
                fs::metadata(dir)
            } else {
                fs::symlink_metadata(dir)
            };
            match meta {
                Ok(m) if m.is_dir() => Ok(false),
                Ok(_) => Err(path_err(
                    "cannot create directory",
                    dir,
                    io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        "something that is not a directory has that name",
                    ),
                )),
                Err(e) => Err(path_err("cannot stat", dir, e)),
            }
        }
        Err(e) => Err(path_err("cannot create directory", dir, e)),
    }
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

    #[test]
    fn tmp_names_are_kvtiers_only() {
        let k = ChunkKey([0x0c; 32]);
        assert!(is_tmp_name(&tmp_name(&k)));
        for ok in [
            ".probe",
            ".probe.0123456789abcdef",
            ".marker.0123456789abcdef",
        ] {
            assert!(is_tmp_name(ok), "{ok}");
        }
        for foreign in [
            "notes.txt",
            "partial.123",
            ".probe.x",
            ".marker.",
            "0123456789abcdef",
            &format!("{}.0123456789ABCDEF", k.to_hex()),
            &format!("{}.0123", k.to_hex()),
        ] {
            assert!(!is_tmp_name(foreign), "{foreign}");
        }
        assert_eq!(shard_byte("0f"), Some(0x0f));
        assert_eq!(shard_byte("0F"), None);
        assert_eq!(shard_byte("0fa"), None);
    }

    #[test]
    fn the_marker_round_trips_and_a_newer_one_is_refused() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join(TMP_DIR)).unwrap();
        assert!(matches!(read_marker(d.path()).unwrap(), Marker::Absent));
        write_marker(d.path()).unwrap();
        assert!(matches!(
            read_marker(d.path()).unwrap(),
            Marker::Present { .. }
        ));
        assert_eq!(fs::read_dir(d.path().join(TMP_DIR)).unwrap().count(), 0);
        fs::write(d.path().join(MARKER), "{\"kvtier_disk_layout\": 99}").unwrap();
        let e = read_marker(d.path()).unwrap_err().to_string();
        assert!(e.contains("newer kvtier"), "{e}");
        fs::write(d.path().join(MARKER), "hello").unwrap();
        let e = read_marker(d.path()).unwrap_err().to_string();
        assert!(e.contains("not a kvtier marker"), "{e}");
    }
}
