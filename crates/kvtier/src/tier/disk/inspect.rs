//! Read-only inspection of a disk tier directory (`kvtier inspect`): what it holds, per
//! model and tenant, and optionally whether every record verifies. Never modifies anything,
//! never opens anything but regular files named like records (a FIFO there is not waited
//! on), and says "not a kvtier directory" for a directory kvtier would refuse to use.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::io::BLOCK;
use super::layout::{self, open_nofollow};
use crate::chunk::record::{decode_header, MAX_HEADER_LEN};
use crate::error::{Error, Result};

/// Counts for one group of chunks (a model, or a tenant salt).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct GroupCount {
    /// Chunks.
    pub chunks: u64,
    /// Payload bytes.
    pub payload_bytes: u64,
    /// Tokens covered.
    pub tokens: u64,
}

/// A file that failed to read or verify.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BadRecord {
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub problem: String,
}

/// What a disk tier directory holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct InspectReport {
    /// The directory inspected.
    pub root: PathBuf,
    /// Chunk files found.
    pub chunks: u64,
    /// Bytes on disk (headers and padding included).
    pub file_bytes: u64,
    /// Payload bytes.
    pub payload_bytes: u64,
    /// Per model: `name [revision] layout rank/world`.
    pub models: BTreeMap<String, GroupCount>,
    /// Per tenant salt (`(none)` for unsalted chunks).
    pub salts: BTreeMap<String, GroupCount>,
    /// Whether payload checksums were verified.
    pub verified: bool,
    /// Records that failed to decode or verify.
    pub bad: Vec<BadRecord>,
    /// Whether the directory carries kvtier's marker file (an older kvtier's directory
    /// has none; the next start adds it).
    pub marker: bool,
    /// Leftover temporary files of interrupted writes (removed by the next start).
    pub tmp_files: u64,
    /// Entries that are not chunk records: kvtier's own leftovers (older layout, removed by
    /// the next start) and anything kvtier did not create (never touched).
    pub other_files: u64,
}

fn describe_model(info: &crate::chunk::ChunkInfo) -> String {
    let id = &info.origin.identity;
    let rev = id
        .model_revision
        .as_deref()
        .map(|r| format!(" @{r}"))
        .unwrap_or_default();
    let placement = if id.replicated {
        format!("replicated over {} ranks", id.world_size)
    } else {
        format!("rank {}/{}", id.rank, id.world_size)
    };
    format!(
        "{}{rev} [{}] {placement}",
        id.model_name,
        id.layout.describe()
    )
}

/// Inspects `root` (one disk tier path). With `verify`, every payload is read and its
/// checksum checked. `progress(done, total)` is called after each file.
pub fn inspect(
    root: &Path,
    verify: bool,
    mut progress: impl FnMut(usize, usize),
) -> Result<InspectReport> {
    if !root.is_dir() {
        return Err(Error::invalid(format!(
            "{} is not a directory",
            root.display()
        )));
    }
    let survey = layout::survey(root)?;
    let marker = survey.marker_owner.is_some();
    if !marker && survey.foreign.count > 0 {
        return Err(Error::invalid(format!(
            "{} is not a kvtier directory: it has no marker file `{}` and holds entries kvtier did not create ({})",
            root.display(),
            layout::MARKER,
            survey.foreign.describe()
        )));
    }
    if !marker && !survey.has_layout {
        return Err(Error::invalid(format!(
            "{} is not a kvtier directory: it has no marker file `{}` and nothing of kvtier's layout",
            root.display(),
            layout::MARKER
        )));
    }
    let mut rep = InspectReport {
        root: root.to_path_buf(),
        verified: verify,
        marker,
        tmp_files: survey.tmp_leftovers,
        other_files: survey.foreign.count + survey.leftovers.len() as u64 - survey.tmp_leftovers,
        ..InspectReport::default()
    };
    let mut files: Vec<PathBuf> = survey
        .records
        .iter()
        .map(|(key, salt, _, _)| layout::record_path(root, key, *salt))
        .collect();
    files.sort();
    let total = files.len();
    let mut header = vec![0u8; MAX_HEADER_LEN];
    for (i, path) in files.iter().enumerate() {
        progress(i + 1, total);
        let bad = |problem: String| BadRecord {
            path: path.clone(),
            problem,
        };
        // Swapped for a FIFO or a symlink since the listing: neither waited on nor followed.
        let f = match open_nofollow(path) {
            Ok(f) => f,
            Err(e) => {
                rep.bad.push(bad(format!("cannot open: {e}")));
                continue;
            }
        };
        let meta = match f.metadata() {
            Ok(m) if m.is_file() => m,
            Ok(_) => {
                rep.bad.push(bad("not a regular file".into()));
                continue;
            }
            Err(e) => {
                rep.bad.push(bad(format!("cannot stat: {e}")));
                continue;
            }
        };
        let size = meta.len();
        if size < BLOCK as u64 || size % BLOCK as u64 != 0 {
            rep.bad.push(bad(format!(
                "file is {size} bytes, not whole {BLOCK}-byte blocks (torn write?)"
            )));
            continue;
        }
        // The header is the last block.
        if let Err(e) = f.read_exact_at(&mut header, size - BLOCK as u64) {
            rep.bad.push(bad(format!("header unreadable: {e}")));
            continue;
        }
        let info = match decode_header(&header) {
            Ok((info, _)) => info,
            Err(e) => {
                rep.bad.push(bad(e.to_string()));
                continue;
            }
        };
        let expect_size = BLOCK as u64 + info.len.div_ceil(BLOCK as u64) * BLOCK as u64;
        if size != expect_size {
            rep.bad.push(bad(format!(
                "file is {size} bytes, a {}-byte record needs {expect_size} (torn write?)",
                info.len
            )));
            continue;
        }
        if verify {
            let mut payload = vec![0u8; info.len as usize];
            let read = f.read_exact_at(&mut payload, 0);
            if let Err(e) = read {
                rep.bad.push(bad(format!("payload unreadable: {e}")));
                continue;
            }
            if let Err(e) = info.verify(&payload) {
                rep.bad.push(bad(e.to_string()));
                continue;
            }
        }
        rep.chunks += 1;
        rep.file_bytes += size;
        rep.payload_bytes += info.len;
        for (map, name) in [
            (&mut rep.models, describe_model(&info)),
            (
                &mut rep.salts,
                info.origin
                    .cache_salt
                    .clone()
                    .unwrap_or_else(|| "(none)".into()),
            ),
        ] {
            let g = map.entry(name).or_default();
            g.chunks += 1;
            g.payload_bytes += info.len;
            g.tokens += u64::from(info.num_tokens);
        }
    }
    Ok(rep)
}
