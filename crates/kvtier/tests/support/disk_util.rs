//! Helpers shared by the disk tier tests: `#[path = "support/disk_util.rs"] mod util;`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvtier::chunk::{checksum, Chunk, ChunkInfo};
use kvtier::keys::{ChunkKey, ModelIdentity, Origin};
use kvtier::layout::{Dtype, KvLayout};
use kvtier::tier::{CpuTier, CpuTierOptions};

/// A model whose tokens are 4 KiB of KV (4 layers x K/V x 4 heads x 64 dims x f16).
pub fn identity() -> ModelIdentity {
    ModelIdentity::new("disk-test", KvLayout::simple(4, 4, 64, Dtype::F16))
}

pub fn origin(salt: Option<&str>) -> Arc<Origin> {
    Arc::new(Origin {
        identity: Arc::new(identity()),
        cache_salt: salt.map(str::to_string),
    })
}

/// Deterministic, well-spread key of index `i`.
pub fn key(i: u64) -> ChunkKey {
    let h = blake3_like(i);
    ChunkKey(h)
}

fn blake3_like(i: u64) -> [u8; 32] {
    let mut out = [0u8; 32];
    let mut x = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    for c in out.chunks_mut(8) {
        // splitmix64
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        c.copy_from_slice(&z.to_le_bytes());
    }
    out
}

/// Payload length of index `i` (not block-aligned on purpose, up to `max`).
pub fn len_of(i: u64, max: usize) -> usize {
    let r = u64::from_le_bytes(blake3_like(i ^ 0xABCD)[..8].try_into().unwrap());
    1 + (r % max as u64) as usize
}

/// Expected payload byte `j` of index `i`.
pub fn fill(i: u64, out: &mut [u8]) {
    let mut x = i.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1;
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

pub fn expected(i: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill(i, &mut v);
    v
}

/// A chunk of index `i` with `len` payload bytes, in a buffer of `l1`'s pool.
pub fn chunk(l1: &CpuTier, i: u64, len: usize, salt: Option<&str>) -> Chunk {
    let mut buf = l1.allocate(len).expect("pool has room");
    fill(i, buf.as_mut_slice());
    let sum = checksum(buf.as_slice());
    Chunk {
        info: ChunkInfo {
            key: key(i),
            num_tokens: 16,
            len: len as u64,
            checksum: sum,
            origin: origin(salt),
            created_ms: 1,
        },
        buf: buf.seal(),
    }
}

pub fn l1(bytes: u64) -> CpuTier {
    CpuTier::new(CpuTierOptions::with_bytes(bytes)).unwrap()
}

/// The committed file of `key` under `root`, if any.
pub fn file_of(root: &Path, key: &ChunkKey) -> Option<PathBuf> {
    let hex = key.to_hex();
    let shard = root.join(&hex[..2]);
    std::fs::read_dir(shard)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&hex))
        })
}

/// Sum of the sizes of all files under `root` (recursively), but the marker file.
pub fn disk_bytes(root: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else if e.file_name() != "kvtier-disk.json" {
                // Records and tmp files; not the marker, which the budget does not count.
                total += m.len();
            }
        }
    }
    total
}

/// A temp dir on the same file system as the build (ext4 here, so O_DIRECT is exercised).
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("kvtier-disk-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
}
