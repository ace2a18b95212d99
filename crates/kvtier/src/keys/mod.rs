//! Chunk keys (contract C1): token chunking and chained BLAKE3 prefix hashes.
//!
//! The byte encoding is specified in `docs/key-spec.md` (version 1) with golden vectors; it is
//! deterministic across processes, hosts, restarts and languages: no random seed anywhere.
//!
//! ```
//! use kvtier::keys::{KeySpace, ModelIdentity};
//! use kvtier::layout::{Dtype, KvLayout};
//!
//! let id = ModelIdentity::new("meta-llama/Llama-3.1-8B", KvLayout::simple(32, 8, 128, Dtype::Bf16));
//! let ks = KeySpace::new(id, 256, false).unwrap();
//! let tokens: Vec<u32> = (0..600).collect();
//! let spans = ks.chunk_spans(&tokens, None).unwrap();
//! assert_eq!(spans.len(), 2); // the 88-token tail is not a chunk unless save_unfull_chunk
//! assert_eq!(spans[1].end, 512);
//! ```

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::layout::KvLayout;

mod digest;

/// Version of the key encoding; bumped whenever the bytes hashed change.
pub const KEY_SPEC_VERSION: u32 = 1;
/// Domain tag hashed first into every namespace.
pub const KEY_DOMAIN_TAG: &[u8] = b"kvtier-key-v1";
/// The rank hashed for a replicated layout ([`ModelIdentity::replicated`]); never a real rank,
/// which is always below the world size.
pub const REPLICATED_RANK: u32 = u32::MAX;
/// Longest accepted `cache_salt`, in bytes.
pub const MAX_SALT_LEN: usize = 128;

/// A 32-byte chunk key: commits to the namespace and every token of the prefix up to the
/// end of its chunk.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkKey(pub [u8; 32]);

impl ChunkKey {
    /// Lower-case hex form (64 characters).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses the hex form.
    pub fn from_hex(s: &str) -> Result<ChunkKey> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out)
            .map_err(|e| Error::invalid(format!("chunk key `{s}` is not 64 hex digits: {e}")))?;
        Ok(ChunkKey(out))
    }

    /// The first 8 bytes as an integer; keys are uniform, so this is a perfect hash.
    pub fn prefix_u64(&self) -> u64 {
        u64::from_le_bytes(self.0[..8].try_into().expect("8 bytes"))
    }
}

impl std::hash::Hash for ChunkKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.prefix_u64());
    }
}

impl fmt::Debug for ChunkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkKey({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for ChunkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Hasher for maps keyed by [`ChunkKey`]: keys are already uniform, so it passes through.
#[derive(Default, Clone, Copy)]
pub struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only reached for non-ChunkKey uses; fold the bytes in so it is still a hash.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// Build-hasher for [`KeyHasher`].
pub type KeyBuildHasher = std::hash::BuildHasherDefault<KeyHasher>;
/// A hash map keyed by chunk keys.
pub type KeyMap<V> = std::collections::HashMap<ChunkKey, V, KeyBuildHasher>;

/// Everything that makes KV bytes differ besides the tokens: model, layout, parallel placement.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ModelIdentity {
    /// Model name, e.g. `meta-llama/Llama-3.1-8B`.
    pub model_name: String,
    /// Optional revision (commit, checkpoint tag); part of the fingerprint when given.
    pub model_revision: Option<String>,
    /// KV layout of one rank.
    pub layout: KvLayout,
    /// Tensor-parallel world size.
    pub world_size: u32,
    /// Tensor-parallel rank.
    pub rank: u32,
    /// Pipeline-parallel size.
    pub pp_size: u32,
    /// Pipeline stage.
    pub pp_rank: u32,
    /// Every tensor-parallel rank holds the same KV bytes (MLA's latent cache): keys carry
    /// [`REPLICATED_RANK`] instead of the rank, so one rank's chunks serve every rank.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replicated: bool,
}

impl ModelIdentity {
    /// An identity for rank 0 of 1, no pipeline parallelism, no revision.
    pub fn new(model_name: impl Into<String>, layout: KvLayout) -> ModelIdentity {
        ModelIdentity {
            model_name: model_name.into(),
            model_revision: None,
            layout,
            world_size: 1,
            rank: 0,
            pp_size: 1,
            pp_rank: 0,
            replicated: false,
        }
    }

    /// The rank written into keys: [`REPLICATED_RANK`] for a replicated layout, else the rank.
    pub fn key_rank(&self) -> u32 {
        if self.replicated {
            REPLICATED_RANK
        } else {
            self.rank
        }
    }

    /// Checks field ranges.
    pub fn validate(&self) -> Result<()> {
        if self.model_name.is_empty() || self.model_name.len() > 512 {
            return Err(Error::invalid("model name must be 1..=512 bytes"));
        }
        if self.model_revision.as_ref().is_some_and(|r| r.len() > 256) {
            return Err(Error::invalid("model revision must be at most 256 bytes"));
        }
        if self.world_size == 0 || self.rank >= self.world_size {
            return Err(Error::invalid(format!(
                "rank {} is not below world size {}",
                self.rank, self.world_size
            )));
        }
        if self.pp_size == 0 || self.pp_rank >= self.pp_size {
            return Err(Error::invalid(format!(
                "pipeline rank {} is not below pipeline size {}",
                self.pp_rank, self.pp_size
            )));
        }
        self.layout.validate()
    }
}

/// Checks a tenant salt and normalises the empty string to "no salt".
pub fn normalize_salt(salt: Option<&str>) -> Result<Option<&str>> {
    match salt {
        None | Some("") => Ok(None),
        Some(s) if s.len() > MAX_SALT_LEN => Err(Error::invalid(format!(
            "cache_salt is {} bytes; at most {MAX_SALT_LEN} are allowed",
            s.len()
        ))),
        Some(s) if s.chars().any(char::is_control) => Err(Error::invalid(
            "cache_salt must not contain control characters",
        )),
        Some(s) => Ok(Some(s)),
    }
}

/// Where a chunk came from: the model identity and the tenant salt. Carried in record
/// headers so a tier's content can be listed and forgotten per model or per tenant.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Origin {
    /// Model identity.
    pub identity: Arc<ModelIdentity>,
    /// Tenant salt, if any.
    pub cache_salt: Option<String>,
}

/// One chunk of a prompt: its token range and key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkSpan {
    /// Chunk index within the prompt.
    pub index: usize,
    /// First token (inclusive).
    pub start: usize,
    /// Last token (exclusive).
    pub end: usize,
    /// Chunk key.
    pub key: ChunkKey,
}

impl ChunkSpan {
    /// Number of tokens in the chunk.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Whether the chunk holds no tokens (never true for spans the engine makes).
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// Derives chunk keys for one model identity: chunking rule plus the hash chain.
#[derive(Clone, Debug)]
pub struct KeySpace {
    identity: Arc<ModelIdentity>,
    chunk_size: usize,
    save_unfull_chunk: bool,
}

fn put_str(h: &mut blake3::Hasher, s: &str) {
    h.update(&(s.len() as u32).to_le_bytes());
    h.update(s.as_bytes());
}

fn tokens_as_le_bytes(tokens: &[u32]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        std::borrow::Cow::Borrowed(bytemuck::cast_slice(tokens))
    } else {
        std::borrow::Cow::Owned(tokens.iter().flat_map(|t| t.to_le_bytes()).collect())
    }
}

impl KeySpace {
    /// A key space; `chunk_size` must be in 1..=1_048_576.
    pub fn new(
        identity: ModelIdentity,
        chunk_size: usize,
        save_unfull_chunk: bool,
    ) -> Result<KeySpace> {
        identity.validate()?;
        if chunk_size == 0 || chunk_size > crate::layout::MAX_CHUNK_TOKENS {
            return Err(Error::invalid(format!(
                "chunk_size must be in 1..={} tokens, got {chunk_size}",
                crate::layout::MAX_CHUNK_TOKENS
            )));
        }
        Ok(KeySpace {
            identity: Arc::new(identity),
            chunk_size,
            save_unfull_chunk,
        })
    }

    /// The model identity.
    pub fn identity(&self) -> &Arc<ModelIdentity> {
        &self.identity
    }

    /// Tokens per chunk.
    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    /// Whether a trailing partial chunk gets a key.
    pub fn save_unfull_chunk(&self) -> bool {
        self.save_unfull_chunk
    }

    /// The namespace digest `h_{-1}` for a salt (see the key spec).
    pub fn namespace(&self, cache_salt: Option<&str>) -> Result<[u8; 32]> {
        let salt = normalize_salt(cache_salt)?;
        let id = &*self.identity;
        let mut h = blake3::Hasher::new();
        h.update(KEY_DOMAIN_TAG);
        put_str(&mut h, &id.model_name);
        put_str(&mut h, id.model_revision.as_deref().unwrap_or(""));
        for v in [id.world_size, id.key_rank(), id.pp_size, id.pp_rank] {
            h.update(&v.to_le_bytes());
        }
        put_str(&mut h, &id.layout.tag);
        h.update(&(id.layout.groups.len() as u32).to_le_bytes());
        for g in &id.layout.groups {
            for v in [g.num_layers, g.num_kv_heads, g.head_dim, g.planes] {
                h.update(&v.to_le_bytes());
            }
            put_str(&mut h, g.dtype.name());
        }
        match salt {
            None => {
                h.update(&[0u8]);
            }
            Some(s) => {
                h.update(&[1u8]);
                put_str(&mut h, s);
            }
        }
        Ok(*h.finalize().as_bytes())
    }

    /// The origin record for a salt.
    pub fn origin(&self, cache_salt: Option<&str>) -> Result<Origin> {
        Ok(Origin {
            identity: self.identity.clone(),
            cache_salt: normalize_salt(cache_salt)?.map(str::to_string),
        })
    }

    /// Number of chunks (with keys) a prompt of `n_tokens` has under this key space.
    pub fn num_chunks(&self, n_tokens: usize) -> usize {
        if self.save_unfull_chunk {
            n_tokens.div_ceil(self.chunk_size)
        } else {
            n_tokens / self.chunk_size
        }
    }

    /// Tokens covered by the chunks (with keys) of a prompt of `n_tokens` tokens.
    pub fn covered_tokens(&self, n_tokens: usize) -> usize {
        // Saturating: a server is told prompt lengths by its clients, and a tail chunk
        // rounds a length near `usize::MAX` past it.
        self.num_chunks(n_tokens)
            .saturating_mul(self.chunk_size)
            .min(n_tokens)
    }

    /// First token of chunk `first_chunk` of a prompt of `n_tokens` tokens: where a windowed
    /// operation (one over chunks `first_chunk..` only) lays out its payload from. The chunk
    /// count itself is allowed (an empty window, starting at the end of the chunked tokens):
    /// that is what makes a prompt shorter than one chunk valid at `first_chunk` 0. A larger
    /// index is [`Error::InvalidInput`].
    pub fn window_start(&self, n_tokens: usize, first_chunk: usize) -> Result<usize> {
        let chunks = self.num_chunks(n_tokens);
        if first_chunk > chunks {
            return Err(Error::invalid(format!(
                "first_chunk {first_chunk} is past the {chunks} chunks of a {n_tokens}-token prompt"
            )));
        }
        // Below the chunk count this is chunk `first_chunk`'s start; at it, the clamp gives
        // the end of the chunked tokens (a partial last chunk ends at `n_tokens`).
        Ok(first_chunk
            .saturating_mul(self.chunk_size)
            .min(self.covered_tokens(n_tokens)))
    }

    /// Checks the length of a store payload for a prompt of `n_tokens` tokens: the chunk
    /// payloads back to back, for all tokens or for the chunked ones only.
    pub fn check_payload_len(
        &self,
        n_tokens: usize,
        bytes_per_token: usize,
        len: usize,
    ) -> Result<()> {
        self.check_window_payload_len(n_tokens, 0, bytes_per_token, len)
    }

    /// [`KeySpace::check_payload_len`] for a windowed store: the payload starts at chunk
    /// `first_chunk`'s first token ([`KeySpace::window_start`]) and runs to the end of the
    /// chunked tokens or of the prompt.
    pub fn check_window_payload_len(
        &self,
        n_tokens: usize,
        first_chunk: usize,
        bytes_per_token: usize,
        len: usize,
    ) -> Result<()> {
        let start = self.window_start(n_tokens, first_chunk)?;
        let covered = self.covered_tokens(n_tokens);
        let (all, chunked) = (n_tokens - start, covered - start);
        if len == chunked * bytes_per_token || len == all * bytes_per_token {
            return Ok(());
        }
        let from = if first_chunk == 0 {
            String::new()
        } else {
            format!(" from chunk {first_chunk} (token {start}) on")
        };
        Err(Error::invalid(format!(
            "KV payload is {len} bytes; {all} tokens of this model{from} need {} bytes ({bytes_per_token} bytes per token; {} if only the {chunked} chunked tokens are passed)",
            all * bytes_per_token,
            chunked * bytes_per_token
        )))
    }

    /// Cuts `tokens` into chunks and derives every chunk key.
    pub fn chunk_spans(&self, tokens: &[u32], cache_salt: Option<&str>) -> Result<Vec<ChunkSpan>> {
        self.chunk_spans_limited(tokens, cache_salt, usize::MAX)
    }

    /// The chunks a windowed operation addresses: the window start
    /// ([`KeySpace::window_start`], checked before any hashing) and the spans of chunks
    /// `first_chunk..` (chained keys: every chunk before them is hashed too).
    pub fn window_spans(
        &self,
        tokens: &[u32],
        cache_salt: Option<&str>,
        first_chunk: usize,
    ) -> Result<(usize, Vec<ChunkSpan>)> {
        let start = self.window_start(tokens.len(), first_chunk)?;
        let mut spans = self.chunk_spans(tokens, cache_salt)?;
        Ok((start, spans.split_off(first_chunk)))
    }

    /// Like [`KeySpace::chunk_spans`] but stops after `max_chunks` chunks.
    pub fn chunk_spans_limited(
        &self,
        tokens: &[u32],
        cache_salt: Option<&str>,
        max_chunks: usize,
    ) -> Result<Vec<ChunkSpan>> {
        let ns = self.namespace(cache_salt)?;
        let n = self.num_chunks(tokens.len()).min(max_chunks);
        let cs = self.chunk_size;
        let bounds = |i: usize| (i * cs, ((i + 1) * cs).min(tokens.len()));
        // The digests are independent (hashed many at a time); only the short chain below
        // is sequential. A partial tail chunk (save_unfull_chunk) is hashed on its own.
        let full = n.min(tokens.len() / cs);
        let mut digests = digest::digests(&tokens_as_le_bytes(&tokens[..full * cs]), cs * 4, full);
        if full < n {
            let (s, e) = bounds(full);
            digests.push(*blake3::hash(&tokens_as_le_bytes(&tokens[s..e])).as_bytes());
        }
        let mut prev = ns;
        let mut out = Vec::with_capacity(n);
        // h_i = BLAKE3(h_(i-1) ‖ u32(tokens in chunk i) ‖ d_i): 68 bytes, hashed in one call.
        let mut link = [0u8; 68];
        for (i, d) in digests.iter().enumerate() {
            let (s, e) = bounds(i);
            link[..32].copy_from_slice(&prev);
            link[32..36].copy_from_slice(&((e - s) as u32).to_le_bytes());
            link[36..].copy_from_slice(d);
            prev = *blake3::hash(&link).as_bytes();
            out.push(ChunkSpan {
                index: i,
                start: s,
                end: e,
                key: ChunkKey(prev),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
