//! vLLM's KV-event wire format, written with `rmp`.
//!
//! vLLM 0.32 (`vllm/distributed/kv_events.py`) encodes with msgspec: the batch is an
//! array-like struct `[ts, events, data_parallel_rank]`; each event is a map tagged by its
//! class name under `"type"`, holding every field without a default (`null` included) and
//! those with a default only when set. Chunk keys go out as 32-byte binaries, which vLLM's
//! `ExternalBlockHash` (`bytes | int`) decodes as bytes.

use kvtier::keys::ChunkKey;
use rmp::encode;

/// Where the announced blocks live, in vLLM's `medium` vocabulary.
pub const MEDIUM_CPU: &str = "CPU";
/// The disk tier's blocks (Dynamo maps `STORAGE` to its disk tier).
pub const MEDIUM_STORAGE: &str = "STORAGE";

/// One event of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvEvent {
    /// A block (a kvtier chunk) is held: a load of its key hits from now on.
    BlockStored {
        /// The chunk key.
        key: ChunkKey,
        /// Tokens the chunk covers (vLLM's `block_size` of this block).
        tokens: u32,
        /// Where it is held.
        medium: &'static str,
    },
    /// These blocks are no longer held.
    BlockRemoved {
        /// The chunk keys.
        keys: Vec<ChunkKey>,
        /// Where they were held.
        medium: &'static str,
    },
    /// Everything previously announced is gone (or can no longer be vouched for).
    AllBlocksCleared,
}

fn str_(out: &mut Vec<u8>, s: &str) {
    // Writing into a Vec cannot fail.
    let _ = encode::write_str(out, s);
}

fn key_(out: &mut Vec<u8>, k: &ChunkKey) {
    let _ = encode::write_bin(out, &k.0);
}

fn event(out: &mut Vec<u8>, e: &KvEvent) {
    match e {
        KvEvent::BlockStored {
            key,
            tokens,
            medium,
        } => {
            let _ = encode::write_map_len(out, 8);
            str_(out, "type");
            str_(out, "BlockStored");
            str_(out, "block_hashes");
            let _ = encode::write_array_len(out, 1);
            key_(out, key);
            // Each kvtier key commits to its whole prefix: no parent is needed to place it.
            str_(out, "parent_block_hash");
            let _ = encode::write_nil(out);
            // The server holds keys, not the tokens they were derived from.
            str_(out, "token_ids");
            let _ = encode::write_array_len(out, 0);
            str_(out, "block_size");
            let _ = encode::write_uint(out, u64::from(*tokens));
            str_(out, "lora_id");
            let _ = encode::write_nil(out);
            str_(out, "medium");
            str_(out, medium);
            str_(out, "lora_name");
            let _ = encode::write_nil(out);
        }
        KvEvent::BlockRemoved { keys, medium } => {
            let _ = encode::write_map_len(out, 3);
            str_(out, "type");
            str_(out, "BlockRemoved");
            str_(out, "block_hashes");
            let _ = encode::write_array_len(out, keys.len() as u32);
            for k in keys {
                key_(out, k);
            }
            str_(out, "medium");
            str_(out, medium);
        }
        KvEvent::AllBlocksCleared => {
            let _ = encode::write_map_len(out, 1);
            str_(out, "type");
            str_(out, "AllBlocksCleared");
        }
    }
}

/// Encodes a `KVEventBatch` `[ts, events, data_parallel_rank]`.
pub fn encode_batch(ts: f64, events: &[KvEvent], data_parallel_rank: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + events.len() * 96);
    let _ = encode::write_array_len(&mut out, 3);
    let _ = encode::write_f64(&mut out, ts);
    let _ = encode::write_array_len(&mut out, events.len() as u32);
    for e in events {
        event(&mut out, e);
    }
    let _ = encode::write_uint(&mut out, u64::from(data_parallel_rank));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-decoded batch: the exact bytes msgspec reads (the Python test decodes them
    /// with vLLM's own types).
    #[test]
    fn batch_layout() {
        let k = ChunkKey([7; 32]);
        let b = encode_batch(
            1.5,
            &[
                KvEvent::BlockStored {
                    key: k,
                    tokens: 256,
                    medium: MEDIUM_CPU,
                },
                KvEvent::BlockRemoved {
                    keys: vec![k, k],
                    medium: MEDIUM_CPU,
                },
                KvEvent::AllBlocksCleared,
            ],
            0,
        );
        // array of 3, f64 1.5, array of 3 events
        assert_eq!(&b[..11], &[0x93, 0xcb, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0, 0x93]);
        // first event: map of 8, "type": "BlockStored"
        assert_eq!(b[11], 0x88);
        assert_eq!(&b[12..17], b"\xa4type");
        assert_eq!(&b[17..29], b"\xabBlockStored");
        assert_eq!(&b[29..42], b"\xacblock_hashes");
        // [bin8 32 bytes]
        assert_eq!(&b[42..45], &[0x91, 0xc4, 32]);
        assert_eq!(&b[45..77], &[7; 32]);
        // the batch ends with data_parallel_rank 0, after the AllBlocksCleared map
        assert!(b.ends_with(b"\x81\xa4type\xb0AllBlocksCleared\x00"));
    }
}
