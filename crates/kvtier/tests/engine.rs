//! Engine-level contracts over tokens and KV bytes (embedded engine, CPU tier only; the
//! multi-tier contracts are pinned down in the manager's unit tests).

use std::sync::Arc;
use std::time::Duration;

use kvtier::keys::{ChunkKey, ModelIdentity};
use kvtier::layout::{Dtype, KvLayout};
use kvtier::{Engine, EngineConfig};

const CHUNK: usize = 16;

fn engine_with(l1_bytes: u64, f: impl FnOnce(&mut EngineConfig)) -> Engine {
    let mut cfg = EngineConfig {
        chunk_size: CHUNK,
        max_local_cpu_size: l1_bytes,
        local_cpu_huge_pages: false,
        ..EngineConfig::default()
    };
    f(&mut cfg);
    // 2 layers x 2 heads x 16 dims x f16 x K/V = 256 bytes per token, 4 KiB per chunk.
    Engine::new(
        cfg,
        ModelIdentity::new("test/model", KvLayout::simple(2, 2, 16, Dtype::F16)),
    )
    .unwrap()
}

fn engine(l1_bytes: u64) -> Engine {
    engine_with(l1_bytes, |_| {})
}

/// Deterministic KV bytes for a prompt: each token's bytes derive from its position and id.
fn kv_for(e: &Engine, tokens: &[u32]) -> Vec<u8> {
    let bpt = e.bytes_per_token();
    let mut out = vec![0u8; tokens.len() * bpt];
    for (i, t) in tokens.iter().enumerate() {
        for (j, b) in out[i * bpt..(i + 1) * bpt].iter_mut().enumerate() {
            *b = (t.wrapping_mul(31) as usize + i * 7 + j) as u8;
        }
    }
    out
}

/// The chunk keys of a prompt, as a server's client computes them.
fn keys_of(e: &Engine, tokens: &[u32]) -> Vec<ChunkKey> {
    e.chunk_spans(tokens, None)
        .unwrap()
        .iter()
        .map(|s| s.key)
        .collect()
}

fn prompt(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| seed.wrapping_mul(1_000_003).wrapping_add(i * 17))
        .collect()
}

#[test]
fn store_lookup_retrieve_round_trip() {
    let e = engine(1 << 20);
    let tokens = prompt(1, 100);
    let kv = kv_for(&e, &tokens);
    let r = e.store(&tokens, None, &kv).unwrap();
    assert_eq!((r.stored_tokens, r.new_chunks), (96, 6));
    let l = e.lookup(&tokens, None).unwrap();
    assert_eq!((l.hit_tokens, l.hit_chunks), (96, 6));
    let mut out = vec![0u8; kv.len()];
    let got = e.retrieve(&tokens, None, &mut out).unwrap();
    assert_eq!(got.hit_tokens, 96);
    let n = 96 * e.bytes_per_token();
    assert_eq!(out[..n], kv[..n]);
    // A second store of the same prompt is deduplicated.
    let again = e.store(&tokens, None, &kv).unwrap();
    assert_eq!((again.new_chunks, again.present_chunks), (0, 6));
    // A prompt sharing 3 chunks hits exactly those.
    let mut other = tokens.clone();
    other[3 * CHUNK + 1] ^= 1;
    assert_eq!(e.lookup(&other, None).unwrap().hit_tokens, 3 * CHUNK);
}

#[test]
fn trailing_partial_chunk_is_stored_only_when_configured() {
    let tokens = prompt(2, 40);
    let e = engine(1 << 20);
    let kv = kv_for(&e, &tokens);
    assert_eq!(e.store(&tokens, None, &kv).unwrap().stored_tokens, 32);
    let e = engine_with(1 << 20, |c| c.save_unfull_chunk = true);
    assert_eq!(e.store(&tokens, None, &kv).unwrap().stored_tokens, 40);
    assert_eq!(e.lookup(&tokens, None).unwrap().hit_tokens, 40);
    let mut out = vec![0u8; kv.len()];
    assert_eq!(e.retrieve(&tokens, None, &mut out).unwrap().hit_tokens, 40);
    assert_eq!(out, kv);
    // The partial chunk is keyed by its exact tokens: a longer prompt does not reuse it.
    let longer = prompt(2, 44);
    assert_eq!(e.lookup(&longer, None).unwrap().hit_tokens, 32);
}

#[test]
fn tenants_with_different_salts_never_share_chunks() {
    let e = engine(1 << 20);
    let tokens = prompt(3, 64);
    let kv = kv_for(&e, &tokens);
    e.store(&tokens, Some("tenant-a"), &kv).unwrap();
    assert_eq!(e.lookup(&tokens, Some("tenant-a")).unwrap().hit_tokens, 64);
    assert_eq!(e.lookup(&tokens, Some("tenant-b")).unwrap().hit_tokens, 0);
    assert_eq!(e.lookup(&tokens, None).unwrap().hit_tokens, 0);
    e.store(&tokens, None, &kv).unwrap();
    let removed = e.remove_salt("tenant-a").unwrap();
    assert_eq!(removed[0], ("cpu".to_string(), 4));
    assert_eq!(e.lookup(&tokens, Some("tenant-a")).unwrap().hit_tokens, 0);
    assert_eq!(
        e.lookup(&tokens, None).unwrap().hit_tokens,
        64,
        "other tenants untouched"
    );
}

#[test]
fn store_under_memory_pressure_keeps_a_prefix_and_never_blocks() {
    // Room for 4 chunks of 4 KiB.
    let e = engine(4 * 4096);
    let a = prompt(4, 4 * CHUNK);
    let kv_a = kv_for(&e, &a);
    e.store(&a, None, &kv_a).unwrap();
    // A reader holds all of prompt A: nothing is evictable, so B stores nothing and says so.
    let held = e.prefetch(&a, None).unwrap().wait().unwrap();
    assert_eq!(held.len(), 4);
    let b = prompt(5, 3 * CHUNK);
    let kv_b = kv_for(&e, &b);
    let t0 = std::time::Instant::now();
    let r = e.store(&b, None, &kv_b).unwrap();
    assert!(t0.elapsed() < Duration::from_millis(500));
    assert_eq!((r.stored_tokens, r.new_chunks, r.dropped_chunks), (0, 0, 3));
    // Once released, A's chunks can be evicted and B fits (tail of A goes first).
    drop(held);
    let r = e.store(&b, None, &kv_b).unwrap();
    assert_eq!(r.stored_tokens, 3 * CHUNK);
    assert_eq!(
        e.lookup(&a, None).unwrap().hit_tokens,
        CHUNK,
        "A's head survived, its tail was evicted"
    );
    let s = e.stats();
    assert_eq!(s.l1.evictions, 3);
    assert!(s.l1.pool_used <= s.l1.pool_capacity);
}

#[test]
fn bad_input_gets_clear_errors() {
    let e = engine(1 << 20);
    let tokens = prompt(6, 32);
    let err = e.store(&tokens, None, &[0u8; 10]).unwrap_err().to_string();
    assert!(err.contains("bytes per token"), "{err}");
    let mut small = vec![0u8; 10];
    let err = e
        .retrieve(&tokens, None, &mut small)
        .unwrap_err()
        .to_string();
    assert!(err.contains("output buffer"), "{err}");
    let err = e
        .lookup(&tokens, Some(&"s".repeat(300)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cache_salt"), "{err}");
    // A budget too small for one chunk is a config error naming the key.
    let cfg = EngineConfig {
        max_local_cpu_size: 8192,
        ..EngineConfig::default()
    };
    let err = Engine::new(
        cfg,
        ModelIdentity::new("m", KvLayout::simple(32, 8, 128, Dtype::Bf16)),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("max_local_cpu_size"), "{err}");
}

#[test]
fn pins_protect_chunks_and_expire() {
    let e = engine_with(4 * 4096, |c| c.pin_timeout_sec = 0.2);
    let a = prompt(7, 4 * CHUNK);
    e.store(&a, None, &kv_for(&e, &a)).unwrap();
    let pins = e.pin(&a, None, None).unwrap();
    assert_eq!(pins.len(), 4);
    let b = prompt(8, CHUNK);
    assert_eq!(e.store(&b, None, &kv_for(&e, &b)).unwrap().stored_tokens, 0);
    std::thread::sleep(Duration::from_millis(250));
    assert_eq!(
        e.store(&b, None, &kv_for(&e, &b)).unwrap().stored_tokens,
        CHUNK,
        "expired pins release"
    );
    e.unpin(&pins);
    assert_eq!(e.stats().l1.pins, 0);
}

#[test]
fn metrics_count_requested_and_hit_tokens() {
    let e = engine(1 << 20);
    let tokens = prompt(9, 64);
    e.store(&tokens, None, &kv_for(&e, &tokens)).unwrap();
    e.lookup(&tokens, None).unwrap();
    e.lookup(&prompt(10, 64), None).unwrap();
    let s = e.stats();
    assert_eq!((s.lookups, s.requested_tokens, s.hit_tokens), (2, 128, 64));
    let text = e.metrics_text();
    assert!(text.contains("kvtier_hit_tokens_total 64"), "{text}");
    assert!(text.contains("kvtier_requested_tokens_total 128"));
    assert!(text.contains("kvtier_stored_chunks_total{tier=\"cpu\"} 4"));
}

#[test]
fn lookup_by_keys_answers_and_counts_like_lookup() {
    // With a stored partial tail chunk, a full hit ends at the prompt's end (not at a
    // multiple of the chunk size), a partial hit at a chunk boundary; both entries must say
    // so and record the same metrics.
    let e = engine_with(1 << 20, |c| c.save_unfull_chunk = true);
    let stored = prompt(11, 3 * CHUNK + 5);
    e.store(&stored, None, &kv_for(&e, &stored)).unwrap();
    let mut diverged = stored.clone();
    diverged[2 * CHUNK + 1] ^= 1;
    let mut by_tokens = Vec::new();
    for tokens in [&stored, &diverged, &prompt(12, 40)] {
        let keys = keys_of(&e, tokens);
        let a = e.lookup(tokens, None).unwrap();
        let before = e.stats();
        let b = e.lookup_keys(&keys, tokens.len()).unwrap();
        let after = e.stats();
        assert_eq!(a, b);
        assert_eq!(
            (
                after.lookups - before.lookups,
                after.requested_tokens - before.requested_tokens,
                after.hit_tokens - before.hit_tokens
            ),
            (1, tokens.len() as u64, a.hit_tokens as u64)
        );
        by_tokens.push(a.hit_tokens);
    }
    assert_eq!(by_tokens, [3 * CHUNK + 5, 2 * CHUNK, 0]);
    // Keys that cannot be the prompt's are refused, and counted nowhere.
    let before = e.stats().lookups;
    let err = e
        .lookup_keys(&keys_of(&e, &stored), stored.len() - 5)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("4 keys sent for a 48-token prompt of 3 chunks"),
        "{err}"
    );
    assert_eq!(e.stats().lookups, before);
}

#[test]
fn many_threads_store_lookup_and_retrieve_consistently() {
    let e = Arc::new(engine(64 * 4096));
    let threads: Vec<_> = (0..8u32)
        .map(|t| {
            let e = e.clone();
            std::thread::spawn(move || {
                for round in 0..40u32 {
                    // Threads share prompts pairwise so stores race on the same keys.
                    let tokens = prompt((t / 2) * 100 + round % 5, 3 * CHUNK);
                    let kv = kv_for(&e, &tokens);
                    e.store(&tokens, None, &kv).unwrap();
                    let mut out = vec![0u8; kv.len()];
                    let r = e.retrieve(&tokens, None, &mut out).unwrap();
                    let n = r.hit_tokens * e.bytes_per_token();
                    assert_eq!(
                        out[..n],
                        kv[..n],
                        "retrieved bytes must be the stored bytes"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let s = e.stats();
    assert_eq!(s.l1.in_use, 0);
    assert_eq!(s.l1.pins, 0);
    assert!(s.l1.pool_used <= s.l1.pool_capacity);
    assert_eq!(s.l1.pool_used, s.l1.bytes);
}

#[test]
fn remove_forgets_a_prompts_chunks() {
    let e = engine(1 << 20);
    let tokens = prompt(11, 4 * CHUNK);
    e.store(&tokens, None, &kv_for(&e, &tokens)).unwrap();
    assert_eq!(e.remove(&tokens[..2 * CHUNK], None).unwrap(), 2);
    assert_eq!(
        e.lookup(&tokens, None).unwrap().hit_tokens,
        0,
        "the head is gone"
    );
    assert_eq!(
        e.remove(&tokens, None).unwrap(),
        2,
        "the two remaining chunks"
    );
    assert_eq!(e.stats().l1.chunks, 0);
}

#[test]
fn a_layout_whose_size_overflows_is_refused_not_zero_bytes_per_token() {
    // 2 planes x 2^31 heads x 2^31 dims x 4 bytes x 2^31 layers = 2^96 bytes per token:
    // unchecked, that wraps to 0 in 64 bits and every store would carry no bytes.
    let cfg = EngineConfig {
        chunk_size: CHUNK,
        max_local_cpu_size: 1 << 20,
        local_cpu_huge_pages: false,
        ..EngineConfig::default()
    };
    let huge = KvLayout::simple(1 << 31, 1 << 31, 1 << 31, Dtype::F32);
    let e = Engine::new(cfg, ModelIdentity::new("test/huge", huge.clone()))
        .map(|e| e.bytes_per_token())
        .unwrap_err()
        .to_string();
    assert!(e.contains("too large") && e.contains("overflow"), "{e}");
    assert!(ModelIdentity::new("test/huge", huge).validate().is_err());
}
