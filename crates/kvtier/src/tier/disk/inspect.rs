//! Read-only inspection of a disk tier directory (`kvtier inspect`): what it holds, per
//! model and tenant, and optionally whether every record verifies. Never modifies anything.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::io::BLOCK;
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
    /// Leftover temporary files of interrupted writes (removed by the next start).
    pub tmp_files: u64,
    /// Files that are not chunk records (ignored).
    pub other_files: u64,
}

fn chunk_files(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let rd =
        std::fs::read_dir(root).map_err(|e| Error::io(format!("reading {}", root.display()), e))?;
    for shard in rd.flatten() {
        let p = shard.path();
        let name = shard.file_name();
        let name = name.to_string_lossy();
        if !p.is_dir() || name.len() != 2 || !name.chars().all(|c| c.is_ascii_hexdigit()) {
            continue;
        }
        let files =
            std::fs::read_dir(&p).map_err(|e| Error::io(format!("reading {}", p.display()), e))?;
        out.extend(files.flatten().map(|f| f.path()));
    }
    out.sort();
    Ok(out)
}

fn describe_model(info: &crate::chunk::ChunkInfo) -> String {
    let id = &info.origin.identity;
    let rev = id
        .model_revision
        .as_deref()
        .map(|r| format!(" @{r}"))
        .unwrap_or_default();
    format!(
        "{}{rev} [{}] rank {}/{}",
        id.model_name,
        id.layout.describe(),
        id.rank,
        id.world_size
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
    let mut rep = InspectReport {
        root: root.to_path_buf(),
        verified: verify,
        ..InspectReport::default()
    };
    if let Ok(rd) = std::fs::read_dir(root.join("tmp")) {
        rep.tmp_files = rd.flatten().count() as u64;
    }
    let files = chunk_files(root)?;
    let total = files.len();
    let mut header = vec![0u8; MAX_HEADER_LEN];
    for (i, path) in files.iter().enumerate() {
        progress(i + 1, total);
        if path.extension().and_then(|e| e.to_str()) != Some(super::dir::EXT) {
            rep.other_files += 1;
            continue;
        }
        let bad = |problem: String| BadRecord {
            path: path.clone(),
            problem,
        };
        let f = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) => {
                rep.bad.push(bad(format!("cannot open: {e}")));
                continue;
            }
        };
        let size = f.metadata().map(|m| m.len()).unwrap_or(0);
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
