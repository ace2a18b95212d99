//! KV layout: how many bytes a token of KV takes and where each layer lives in a chunk payload.
//!
//! A chunk payload is **layer-major**: for each layer group in order, for each layer of the
//! group, one contiguous segment of `planes × tokens × kv_heads × head_dim × dtype` bytes.
//! Within a segment the recommended order is `[plane][token][head][dim]` (plane 0 = K,
//! plane 1 = V), but the engine only relies on segment boundaries, so one layer can be read
//! or written alone.

use std::fmt;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Element type of the KV tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// 32-bit IEEE float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16.
    Bf16,
    /// 8-bit float, e4m3.
    F8E4M3,
    /// 8-bit float, e5m2.
    F8E5M2,
    /// Raw bytes (quantised or serialised KV).
    U8,
}

impl Dtype {
    /// All dtypes, in code order.
    pub const ALL: [Dtype; 6] = [
        Dtype::F32,
        Dtype::F16,
        Dtype::Bf16,
        Dtype::F8E4M3,
        Dtype::F8E5M2,
        Dtype::U8,
    ];

    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
            Dtype::F8E4M3 | Dtype::F8E5M2 | Dtype::U8 => 1,
        }
    }

    /// Canonical name, used in keys, records and config.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
            Dtype::F8E4M3 => "f8e4m3",
            Dtype::F8E5M2 => "f8e5m2",
            Dtype::U8 => "u8",
        }
    }

    /// Parses a canonical name or a common alias (`float32`, `half`, `bfloat16`, ...).
    pub fn parse(s: &str) -> Result<Dtype> {
        let lower = s.trim().to_ascii_lowercase();
        let d = match lower.as_str() {
            "f32" | "float32" | "float" | "fp32" => Dtype::F32,
            "f16" | "float16" | "half" | "fp16" => Dtype::F16,
            "bf16" | "bfloat16" => Dtype::Bf16,
            "f8e4m3" | "fp8_e4m3fn" | "float8_e4m3fn" | "fp8" => Dtype::F8E4M3,
            "f8e5m2" | "fp8_e5m2" | "float8_e5m2" => Dtype::F8E5M2,
            "u8" | "uint8" | "bytes" => Dtype::U8,
            _ => {
                return Err(Error::invalid(format!(
                    "unknown dtype `{s}`; allowed: f32, f16, bf16, f8e4m3, f8e5m2, u8"
                )))
            }
        };
        Ok(d)
    }

    /// Stable one-byte code used in the record header.
    pub fn code(self) -> u8 {
        match self {
            Dtype::F32 => 1,
            Dtype::F16 => 2,
            Dtype::Bf16 => 3,
            Dtype::F8E4M3 => 4,
            Dtype::F8E5M2 => 5,
            Dtype::U8 => 6,
        }
    }

    /// Inverse of [`Dtype::code`].
    pub fn from_code(code: u8) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.code() == code)
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A group of layers sharing one shape (hybrid models have several groups).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LayerGroup {
    /// Number of layers in the group.
    pub num_layers: u32,
    /// KV heads per layer (per rank).
    pub num_kv_heads: u32,
    /// Elements per head.
    pub head_dim: u32,
    /// Element type.
    pub dtype: Dtype,
    /// Planes per layer: 2 for separate K and V, 1 for a fused latent (MLA).
    pub planes: u32,
}

impl LayerGroup {
    /// Bytes one token occupies in one layer of this group (saturating: a layout that
    /// overflows fails [`KvLayout::validate`]).
    pub fn layer_bytes_per_token(&self) -> usize {
        self.checked_layer_bytes_per_token().unwrap_or(usize::MAX)
    }

    /// Bytes one token occupies across all layers of this group (saturating).
    pub fn bytes_per_token(&self) -> usize {
        self.checked_bytes_per_token().unwrap_or(usize::MAX)
    }

    /// [`LayerGroup::layer_bytes_per_token`], `None` on overflow.
    fn checked_layer_bytes_per_token(&self) -> Option<usize> {
        (self.planes as usize)
            .checked_mul(self.num_kv_heads as usize)?
            .checked_mul(self.head_dim as usize)?
            .checked_mul(self.dtype.size())
    }

    /// [`LayerGroup::bytes_per_token`], `None` on overflow.
    fn checked_bytes_per_token(&self) -> Option<usize> {
        self.checked_layer_bytes_per_token()?
            .checked_mul(self.num_layers as usize)
    }
}

/// The KV layout of a model (per rank): its layer groups plus a tag naming the byte order
/// inside a layer segment (`layer-major` by default; a connector may use its own tag, such
/// as vLLM's block layout, which then also separates its keys).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KvLayout {
    /// Layer groups in payload order (one for ordinary models).
    pub groups: Vec<LayerGroup>,
    /// Name of the byte order inside a layer segment.
    pub tag: String,
}

/// Default layout tag.
pub const LAYER_MAJOR: &str = "layer-major";

/// Most tokens a chunk can hold (the largest `chunk_size`).
pub const MAX_CHUNK_TOKENS: usize = 1 << 20;

impl KvLayout {
    /// A single-group layout with K and V planes.
    pub fn simple(num_layers: u32, num_kv_heads: u32, head_dim: u32, dtype: Dtype) -> KvLayout {
        KvLayout {
            groups: vec![LayerGroup {
                num_layers,
                num_kv_heads,
                head_dim,
                dtype,
                planes: 2,
            }],
            tag: LAYER_MAJOR.to_string(),
        }
    }

    /// Checks that the layout is usable (non-empty, non-zero dims, sane tag).
    pub fn validate(&self) -> Result<()> {
        if self.groups.is_empty() {
            return Err(Error::invalid("KV layout has no layer groups"));
        }
        if self.groups.len() > 64 {
            return Err(Error::invalid("KV layout has more than 64 layer groups"));
        }
        for (i, g) in self.groups.iter().enumerate() {
            if g.num_layers == 0 || g.num_kv_heads == 0 || g.head_dim == 0 {
                return Err(Error::invalid(format!(
                    "KV layout group {i}: layers, kv heads and head dim must all be > 0 (got {}/{}/{})",
                    g.num_layers, g.num_kv_heads, g.head_dim
                )));
            }
            if g.planes == 0 || g.planes > 2 {
                return Err(Error::invalid(format!(
                    "KV layout group {i}: planes must be 1 (MLA latent) or 2 (K and V), got {}",
                    g.planes
                )));
            }
        }
        if self.tag.is_empty() || self.tag.len() > 64 {
            return Err(Error::invalid("KV layout tag must be 1..=64 bytes"));
        }
        let Some(bpt) = self.checked_bytes_per_token() else {
            return Err(Error::invalid(format!(
                "KV layout `{}` is too large: its bytes per token overflow a {}-bit size; \
                 check the layer count, kv heads and head dim",
                self.describe(),
                usize::BITS
            )));
        };
        // A chunk has at most `MAX_CHUNK_TOKENS` tokens: its size must fit too.
        if bpt.checked_mul(MAX_CHUNK_TOKENS).is_none() {
            return Err(Error::invalid(format!(
                "KV layout `{}` is too large: {bpt} bytes per token overflow the size of a \
                 chunk; check the layer count, kv heads and head dim",
                self.describe()
            )));
        }
        Ok(())
    }

    /// Bytes one token of KV occupies (all groups, all layers); saturating, so a layout
    /// too large for `usize` (which [`KvLayout::validate`] rejects) is never 0 bytes.
    pub fn bytes_per_token(&self) -> usize {
        self.checked_bytes_per_token().unwrap_or(usize::MAX)
    }

    /// [`KvLayout::bytes_per_token`], `None` on overflow.
    pub fn checked_bytes_per_token(&self) -> Option<usize> {
        self.groups.iter().try_fold(0usize, |sum, g| {
            sum.checked_add(g.checked_bytes_per_token()?)
        })
    }

    /// Payload bytes of a chunk holding `tokens` tokens (saturating, like
    /// [`KvLayout::bytes_per_token`]).
    pub fn chunk_bytes(&self, tokens: usize) -> usize {
        self.bytes_per_token().saturating_mul(tokens)
    }

    /// Total number of layers over all groups.
    pub fn total_layers(&self) -> usize {
        self.groups.iter().map(|g| g.num_layers as usize).sum()
    }

    /// Byte range of one layer (numbered across all groups) inside a chunk of `tokens` tokens.
    pub fn layer_range(&self, layer: usize, tokens: usize) -> Option<Range<usize>> {
        let mut start = 0usize;
        let mut first = 0usize;
        for g in &self.groups {
            let n = g.num_layers as usize;
            let seg = g.layer_bytes_per_token() * tokens;
            if layer < first + n {
                let s = start + (layer - first) * seg;
                return Some(s..s + seg);
            }
            start += seg * n;
            first += n;
        }
        None
    }

    /// Short human form, e.g. `32x8x128 bf16 kv`.
    pub fn describe(&self) -> String {
        self.groups
            .iter()
            .map(|g| {
                format!(
                    "{}x{}x{} {} {}",
                    g.num_layers,
                    g.num_kv_heads,
                    g.head_dim,
                    g.dtype,
                    if g.planes == 2 { "kv" } else { "latent" }
                )
            })
            .collect::<Vec<_>>()
            .join(" + ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_8b_chunk_is_32_mib() {
        let l = KvLayout::simple(32, 8, 128, Dtype::Bf16);
        assert_eq!(l.chunk_bytes(256), 32 << 20);
        assert_eq!(l.layer_range(1, 256), Some((1 << 20)..(2 << 20)));
        assert_eq!(l.layer_range(32, 256), None);
    }

    #[test]
    fn layer_ranges_tile_the_payload_across_groups() {
        let l = KvLayout {
            groups: vec![
                LayerGroup {
                    num_layers: 2,
                    num_kv_heads: 2,
                    head_dim: 4,
                    dtype: Dtype::F16,
                    planes: 2,
                },
                LayerGroup {
                    num_layers: 3,
                    num_kv_heads: 1,
                    head_dim: 8,
                    dtype: Dtype::U8,
                    planes: 1,
                },
            ],
            tag: LAYER_MAJOR.into(),
        };
        l.validate().unwrap();
        let tokens = 5;
        let mut end = 0;
        for layer in 0..l.total_layers() {
            let r = l.layer_range(layer, tokens).unwrap();
            assert_eq!(r.start, end);
            end = r.end;
        }
        assert_eq!(end, l.chunk_bytes(tokens));
    }

    #[test]
    fn a_layout_whose_size_overflows_is_an_error_never_zero_bytes() {
        // 2 x 2^31 x 2^31 x 4 x 2^31 = 2^96: wraps to 0 in 64 bits.
        let huge = KvLayout::simple(1 << 31, 1 << 31, 1 << 31, Dtype::F32);
        let e = huge.validate().unwrap_err().to_string();
        assert!(e.contains("too large") && e.contains("overflow"), "{e}");
        assert_eq!(huge.checked_bytes_per_token(), None);
        assert_eq!(huge.bytes_per_token(), usize::MAX, "saturates, never 0");
        assert_eq!(huge.chunk_bytes(256), usize::MAX);
        // Each group fits, their sum does not.
        let g = LayerGroup {
            num_layers: 1 << 31,
            num_kv_heads: 1 << 31,
            head_dim: 1,
            dtype: Dtype::U8,
            planes: 2,
        };
        let two = KvLayout {
            groups: vec![g, g],
            tag: LAYER_MAJOR.into(),
        };
        assert!(two.groups[0].checked_bytes_per_token().is_some());
        assert!(two
            .validate()
            .unwrap_err()
            .to_string()
            .contains("too large"));
        // Bytes per token fit, a chunk of the largest chunk size does not.
        let big = KvLayout::simple(1 << 20, 1 << 12, 1 << 12, Dtype::F32);
        assert!(big.checked_bytes_per_token().is_some());
        assert!(big
            .validate()
            .unwrap_err()
            .to_string()
            .contains("size of a chunk"));
        KvLayout::simple(80, 8, 128, Dtype::F32).validate().unwrap();
    }

    #[test]
    fn dtype_codes_round_trip_and_aliases_parse() {
        for d in Dtype::ALL {
            assert_eq!(Dtype::from_code(d.code()), Some(d));
            assert_eq!(Dtype::parse(d.name()).unwrap(), d);
        }
        assert_eq!(Dtype::parse("bfloat16").unwrap(), Dtype::Bf16);
        assert!(Dtype::parse("int4")
            .unwrap_err()
            .to_string()
            .contains("allowed"));
    }
}
