//! The batch form of `POST /lookup`, for routers placing requests: many prompts, or many
//! lists of chunk keys, answered in one call.
//!
//! A batch is a probe: it reads the tiers but is not a request of the model, so it neither
//! feeds the eviction policy nor counts in the lookup metrics (a router asking about every
//! instance would otherwise make each one keep what it never served).

use std::sync::Arc;

use kvtier::keys::ChunkKey;
use kvtier::{Engine, Error, Result};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::models::Models;

/// Most prompts or key lists in one batch.
pub const MAX_BATCH: usize = 256;

/// One prompt of a batch.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Prompt {
    tokens: Vec<u32>,
    #[serde(default)]
    cache_salt: Option<String>,
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
    let spans = e
        .key_space()
        .chunk_spans(&p.tokens, p.cache_salt.as_deref())?;
    let keys: Vec<ChunkKey> = spans.iter().map(|s| s.key).collect();
    let r = e.manager().lookup(&keys)?;
    let hit_tokens = spans
        .get(r.hit_chunks.wrapping_sub(1))
        .filter(|_| r.hit_chunks > 0)
        .map_or(0, |s| s.end);
    Ok(json!({
        "hit_tokens": hit_tokens,
        "hit_chunks": r.hit_chunks,
        "requested_tokens": p.tokens.len(),
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
            prompts
                .iter()
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
