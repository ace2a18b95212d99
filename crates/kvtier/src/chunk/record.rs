//! The record encoding: a self-describing header followed by the payload. Disk files and
//! network/Redis values use exactly this, so any tier can validate what another wrote.
//!
//! ```text
//! offset size  field
//!  0      4    magic "KVTR"
//!  4      2    format version (1)
//!  6      2    flags: bit 0 = replicated layout (the same KV on every tensor-parallel rank)
//!  8      4    header_len: bytes of the header including its trailing checksum
//! 12      4    num_tokens
//! 16     32    chunk key
//! 48      8    payload_len
//! 56      8    payload checksum (xxh3-64)
//! 64      8    created, ms since the Unix epoch
//! 72      ..   origin: str model, str revision, u32 world_size, u32 rank, u32 pp_size,
//!              u32 pp_rank, str layout tag, u16 groups, per group (u32 layers, u32 kv_heads,
//!              u32 head_dim, u8 dtype code, u8 planes), u8 has_salt, str salt
//! len-8   8    header checksum: xxh3-64 of bytes [0, header_len - 8)
//! ```
//! Integers are little-endian; `str` is a u16 length then UTF-8 bytes. The header is at most
//! [`MAX_HEADER_LEN`] bytes, so a tier can always read it with one 4 KiB block.

use std::sync::Arc;

use super::ChunkInfo;
use crate::error::{Error, Result};
use crate::keys::{ChunkKey, ModelIdentity, Origin};
use crate::layout::{Dtype, KvLayout, LayerGroup};

/// Magic bytes at the start of every record.
pub const MAGIC: &[u8; 4] = b"KVTR";
/// Current record format version.
pub const FORMAT_VERSION: u16 = 1;
/// Header flag: the origin's layout is replicated over tensor-parallel ranks.
const FLAG_REPLICATED: u16 = 1;
/// Upper bound on an encoded header.
pub const MAX_HEADER_LEN: usize = 4096;
/// Bytes of the fixed part before the origin.
const FIXED_LEN: usize = 72;

fn put_str(out: &mut Vec<u8>, s: &str) -> Result<()> {
    let len = u16::try_from(s.len())
        .map_err(|_| Error::invalid("record string longer than 65535 bytes"))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

/// Encodes the header of `info`.
pub fn encode_header(info: &ChunkInfo) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    let flags = if info.origin.identity.replicated {
        FLAG_REPLICATED
    } else {
        0
    };
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes()); // header_len, patched below
    out.extend_from_slice(&info.num_tokens.to_le_bytes());
    out.extend_from_slice(&info.key.0);
    out.extend_from_slice(&info.len.to_le_bytes());
    out.extend_from_slice(&info.checksum.to_le_bytes());
    out.extend_from_slice(&info.created_ms.to_le_bytes());
    let id = &*info.origin.identity;
    put_str(&mut out, &id.model_name)?;
    put_str(&mut out, id.model_revision.as_deref().unwrap_or(""))?;
    for v in [id.world_size, id.rank, id.pp_size, id.pp_rank] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    put_str(&mut out, &id.layout.tag)?;
    let groups = u16::try_from(id.layout.groups.len())
        .map_err(|_| Error::invalid("too many layer groups"))?;
    out.extend_from_slice(&groups.to_le_bytes());
    for g in &id.layout.groups {
        for v in [g.num_layers, g.num_kv_heads, g.head_dim] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.push(g.dtype.code());
        out.push(g.planes as u8);
    }
    match &info.origin.cache_salt {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_str(&mut out, s)?;
        }
    }
    let total = out.len() + 8;
    if total > MAX_HEADER_LEN {
        return Err(Error::invalid(format!(
            "record header would be {total} bytes; the limit is {MAX_HEADER_LEN}"
        )));
    }
    out[8..12].copy_from_slice(&(total as u32).to_le_bytes());
    let sum = xxhash_rust::xxh3::xxh3_64(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    Ok(out)
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or_else(|| Error::Corrupt("record header truncated".into()))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn str(&mut self) -> Result<String> {
        let n = self.u16()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| Error::Corrupt("record string is not UTF-8".into()))
    }
}

/// Reads the header length field of a buffer that starts with a record, validating the magic.
pub fn peek_header_len(buf: &[u8]) -> Result<usize> {
    if buf.len() < 12 || &buf[..4] != MAGIC {
        return Err(Error::Corrupt("not a kvtier record (bad magic)".into()));
    }
    let len = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes")) as usize;
    if !(FIXED_LEN + 8..=MAX_HEADER_LEN).contains(&len) {
        return Err(Error::Corrupt(format!(
            "record header length {len} out of range"
        )));
    }
    Ok(len)
}

/// Decodes a header from the start of `buf`, returning the chunk info and the header length.
/// Never panics: any malformed input is [`Error::Corrupt`].
pub fn decode_header(buf: &[u8]) -> Result<(ChunkInfo, usize)> {
    let len = peek_header_len(buf)?;
    if buf.len() < len {
        return Err(Error::Corrupt("record header truncated".into()));
    }
    let stored = u64::from_le_bytes(buf[len - 8..len].try_into().expect("8 bytes"));
    if xxhash_rust::xxh3::xxh3_64(&buf[..len - 8]) != stored {
        return Err(Error::Corrupt("record header checksum mismatch".into()));
    }
    let mut r = Reader {
        buf: &buf[..len - 8],
        pos: 4,
    };
    let version = r.u16()?;
    if version != FORMAT_VERSION {
        return Err(Error::Corrupt(format!(
            "record format version {version} is not supported (this build reads {FORMAT_VERSION})"
        )));
    }
    let flags = r.u16()?;
    let _len = r.u32()?;
    let num_tokens = r.u32()?;
    let key = ChunkKey(r.take(32)?.try_into().expect("32 bytes"));
    let payload_len = r.u64()?;
    let checksum = r.u64()?;
    let created_ms = r.u64()?;
    let model_name = r.str()?;
    let revision = r.str()?;
    let (world_size, rank, pp_size, pp_rank) = (r.u32()?, r.u32()?, r.u32()?, r.u32()?);
    let tag = r.str()?;
    let n_groups = r.u16()? as usize;
    let mut groups = Vec::with_capacity(n_groups.min(64));
    for _ in 0..n_groups {
        let (num_layers, num_kv_heads, head_dim) = (r.u32()?, r.u32()?, r.u32()?);
        let code = r.u8()?;
        let dtype = Dtype::from_code(code)
            .ok_or_else(|| Error::Corrupt(format!("unknown dtype code {code}")))?;
        let planes = u32::from(r.u8()?);
        groups.push(LayerGroup {
            num_layers,
            num_kv_heads,
            head_dim,
            dtype,
            planes,
        });
    }
    let cache_salt = match r.u8()? {
        0 => None,
        1 => Some(r.str()?),
        x => return Err(Error::Corrupt(format!("bad salt flag {x}"))),
    };
    if r.pos != r.buf.len() {
        return Err(Error::Corrupt("record header has trailing bytes".into()));
    }
    let identity = ModelIdentity {
        model_name,
        model_revision: if revision.is_empty() {
            None
        } else {
            Some(revision)
        },
        layout: KvLayout { groups, tag },
        world_size,
        rank,
        pp_size,
        pp_rank,
        replicated: flags & FLAG_REPLICATED != 0,
    };
    let info = ChunkInfo {
        key,
        num_tokens,
        len: payload_len,
        checksum,
        origin: Arc::new(Origin {
            identity: Arc::new(identity),
            cache_salt,
        }),
        created_ms,
    };
    Ok((info, len))
}

/// Encodes a whole record (header then payload) into one buffer.
pub fn encode_record(info: &ChunkInfo, payload: &[u8]) -> Result<Vec<u8>> {
    let mut out = encode_header(info)?;
    out.extend_from_slice(payload);
    Ok(out)
}

/// Decodes a whole record and verifies its payload checksum.
pub fn decode_record(buf: &[u8]) -> Result<(ChunkInfo, &[u8])> {
    let (info, hlen) = decode_header(buf)?;
    let payload = &buf[hlen..];
    info.verify(payload)?;
    Ok((info, payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::checksum;
    use proptest::prelude::*;

    fn sample(salt: Option<&str>) -> (ChunkInfo, Vec<u8>) {
        let payload: Vec<u8> = (0..1000u32).map(|i| (i % 253) as u8).collect();
        let mut id = ModelIdentity::new("m/x", KvLayout::simple(2, 1, 4, Dtype::F16));
        id.model_revision = Some("rev".into());
        let info = ChunkInfo {
            key: ChunkKey([7; 32]),
            num_tokens: 5,
            len: payload.len() as u64,
            checksum: checksum(&payload),
            origin: Arc::new(Origin {
                identity: Arc::new(id),
                cache_salt: salt.map(str::to_string),
            }),
            created_ms: 1234,
        };
        (info, payload)
    }

    #[test]
    fn round_trip_with_and_without_salt() {
        for salt in [None, Some("tenant-a")] {
            let (info, payload) = sample(salt);
            let rec = encode_record(&info, &payload).unwrap();
            let (back, p) = decode_record(&rec).unwrap();
            assert_eq!(back, info);
            assert_eq!(p, &payload[..]);
        }
    }

    #[test]
    fn a_replicated_origin_round_trips_through_the_header_flags() {
        let (mut info, payload) = sample(None);
        let mut id = (*info.origin.identity).clone();
        id.layout = KvLayout {
            groups: vec![LayerGroup {
                num_layers: 2,
                num_kv_heads: 1,
                head_dim: 576,
                dtype: Dtype::Bf16,
                planes: 1,
            }],
            tag: "layer-major".into(),
        };
        (id.world_size, id.rank, id.replicated) = (2, 1, true);
        info.origin = Arc::new(Origin {
            identity: Arc::new(id),
            cache_salt: None,
        });
        let rec = encode_record(&info, &payload).unwrap();
        assert_eq!(u16::from_le_bytes([rec[6], rec[7]]), FLAG_REPLICATED);
        let (back, _) = decode_record(&rec).unwrap();
        assert!(back.origin.identity.replicated);
        assert_eq!(back, info);
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let (info, payload) = sample(Some("s"));
        let rec = encode_record(&info, &payload).unwrap();
        // Flip every bit of the header and a sample of payload bits.
        let hlen = peek_header_len(&rec).unwrap();
        let positions: Vec<usize> = (0..hlen).chain((hlen..rec.len()).step_by(7)).collect();
        for pos in positions {
            for bit in 0..8 {
                let mut bad = rec.clone();
                bad[pos] ^= 1 << bit;
                assert!(
                    decode_record(&bad).is_err(),
                    "flip at {pos}:{bit} undetected"
                );
            }
        }
    }

    #[test]
    fn torn_records_are_rejected() {
        let (info, payload) = sample(None);
        let rec = encode_record(&info, &payload).unwrap();
        for cut in [0, 3, 11, 40, 100, rec.len() - 1] {
            assert!(decode_record(&rec[..cut]).is_err(), "cut at {cut}");
        }
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode_record(&bytes);
        }

        #[test]
        fn decoding_mutated_headers_never_panics(pos in 0usize..200, val in any::<u8>(), cut in 0usize..400) {
            let (info, payload) = sample(Some("t"));
            let mut rec = encode_record(&info, &payload).unwrap();
            let p = pos % rec.len();
            rec[p] = val;
            rec.truncate(cut.max(1).min(rec.len()));
            let _ = decode_record(&rec);
        }
    }
}
