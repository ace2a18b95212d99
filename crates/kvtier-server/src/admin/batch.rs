//! The batch form of `POST /lookup`, for routers placing requests: many prompts, or many
//! lists of chunk keys, answered in one call.
//!
//! A batch is a probe: it reads the tiers but is not a request of the model, so it neither
//! feeds the eviction policy nor counts in the lookup metrics (a router asking about every
//! instance would otherwise make each one keep what it never served).

use std::borrow::Cow;
use std::sync::Arc;

use base64::Engine as _;
use rayon::prelude::*;

use kvtier::keys::ChunkKey;
use kvtier::{Engine, Error, Result};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::models::Models;

/// Most prompts or key lists in one batch.
pub const MAX_BATCH: usize = 256;

/// One prompt of a batch: `tokens` (a JSON array), or `tokens_b64` (the token ids as
/// little-endian u32, base64: a router's hot path, parsed ~20x faster than the array).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Prompt {
    #[serde(default)]
    tokens: Option<Vec<u32>>,
    #[serde(default)]
    tokens_b64: Option<String>,
    #[serde(default)]
    cache_salt: Option<String>,
}

impl Prompt {
    /// The prompt's token ids, whichever form they came in.
    fn token_ids(&self) -> Result<Cow<'_, [u32]>> {
        match (&self.tokens, &self.tokens_b64) {
            (Some(t), None) => Ok(Cow::Borrowed(t)),
            (None, Some(b)) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .map_err(|e| Error::invalid(format!("tokens_b64 is not base64: {e}")))?;
                if bytes.len() % 4 != 0 {
                    return Err(Error::invalid(format!(
                        "tokens_b64 decodes to {} bytes; token ids are 4 bytes each \
                         (little-endian u32)",
                        bytes.len()
                    )));
                }
                Ok(Cow::Owned(
                    bytes
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                ))
            }
            _ => Err(Error::invalid(
                "each prompt needs exactly one of `tokens` (an array of token ids) or \
                 `tokens_b64` (little-endian u32 token ids, base64)",
            )),
        }
    }
}

/// A batch: `prompts` (tokens, with `model`) or `block_hashes` (lists of kvtier chunk keys
/// in hex, as the KV-event stream announces them; no model needed).
pub(super) enum Batch {
    Prompts(Value, Vec<Prompt>),
    Keys(Vec<Vec<String>>),
}

fn check_len(n: usize) -> Result<()> {
    if n > MAX_BATCH {
        return Err(Error::invalid(format!(
            "a batch holds at most {MAX_BATCH} prompts or key lists (got {n}); split it"
        )));
    }
    Ok(())
}

/// Per-tier chunk counts of a lookup, every tier named.
fn per_tier(names: &[String], tiers: &[usize]) -> Value {
    let mut counts = vec![0u64; names.len()];
    for &t in tiers {
        if let Some(c) = counts.get_mut(t) {
            *c += 1;
        }
    }
    let map: serde_json::Map<String, Value> = names
        .iter()
        .zip(counts)
        .map(|(n, c)| (n.clone(), json!(c)))
        .collect();
    Value::Object(map)
}

fn prompt_result(e: &Engine, names: &[String], p: &Prompt) -> Result<Value> {
    let tokens = p.token_ids()?;
    let spans = e
        .key_space()
        .chunk_spans(&tokens, p.cache_salt.as_deref())?;
    let keys: Vec<ChunkKey> = spans.iter().map(|s| s.key).collect();
    let r = e.manager().lookup(&keys)?;
    let hit_tokens = spans
        .get(r.hit_chunks.wrapping_sub(1))
        .filter(|_| r.hit_chunks > 0)
        .map_or(0, |s| s.end);
    Ok(json!({
        "hit_tokens": hit_tokens,
        "hit_chunks": r.hit_chunks,
        "requested_tokens": tokens.len(),
        "chunks_per_tier": per_tier(names, &r.tiers),
    }))
}

/// Answers a batch: `{"results": [...]}` in request order.
pub(super) fn lookup(
    m: &Arc<Models>,
    batch: Batch,
    resolve: impl Fn(&Models, &Value) -> Result<Arc<Engine>>,
) -> Result<Value> {
    let names = m.core().manager().tier_names();
    let results: Vec<Value> = match batch {
        Batch::Prompts(model, prompts) => {
            check_len(prompts.len())?;
            let e = resolve(m, &model)?;
            // Decoding and hashing dominate (a 1 KiB chunk digest gets no SIMD width of
            // its own): prompts go to the cores in parallel; results stay in request order.
            prompts
                .par_iter()
                .map(|p| prompt_result(&e, &names, p))
                .collect::<Result<_>>()?
        }
        Batch::Keys(lists) => {
            check_len(lists.len())?;
            let manager = m.core().manager();
            lists
                .iter()
                .map(|l| {
                    let keys = l
                        .iter()
                        .map(|h| ChunkKey::from_hex(h))
                        .collect::<Result<Vec<_>>>()?;
                    let r = manager.lookup(&keys)?;
                    Ok(json!({
                        "hit_chunks": r.hit_chunks,
                        "requested_chunks": keys.len(),
                        "chunks_per_tier": per_tier(&names, &r.tiers),
                    }))
                })
                .collect::<Result<_>>()?
        }
    };
    Ok(json!({ "results": results }))
}
