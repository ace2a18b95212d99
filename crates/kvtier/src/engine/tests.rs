//! Windowed operations (`*_from`): chunks `first_chunk..` of a prompt, payloads laid out
//! from the window start, results in absolute token positions; `first_chunk` 0 is the
//! whole-prompt operation.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use proptest::prelude::*;

use super::*;
use crate::chunk::Chunk;
use crate::layout::{Dtype, KvLayout};
use crate::memory::BufferSource;
use crate::tier::{
    CpuTierOptions, Fault, FaultOp, FaultRule, FaultTier, PutOutcome, Tier, TierFuture,
};

const CS: usize = 16;

fn config(f: impl FnOnce(&mut EngineConfig)) -> EngineConfig {
    let mut cfg = EngineConfig {
        chunk_size: CS,
        max_local_cpu_size: 4 << 20,
        local_cpu_huge_pages: false,
        ..EngineConfig::default()
    };
    f(&mut cfg);
    cfg
}

fn identity() -> ModelIdentity {
    // 2 layers x 2 heads x 16 dims x f16 x K/V = 256 bytes per token, 4 KiB per chunk.
    ModelIdentity::new("test/window", KvLayout::simple(2, 2, 16, Dtype::F16))
}

fn engine_with(f: impl FnOnce(&mut EngineConfig)) -> Engine {
    Engine::new(config(f), identity()).unwrap()
}

fn engine() -> Engine {
    engine_with(|_| {})
}

/// A default engine (L1 on) over one lower tier.
fn engine_over(lower: Arc<dyn Tier>) -> Engine {
    Engine::with_lower_tiers(config(|_| {}), identity(), vec![TierSpec::new(lower)]).unwrap()
}

fn prompt(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| seed.wrapping_mul(1_000_003).wrapping_add(i * 17))
        .collect()
}

/// Deterministic KV bytes of a whole prompt: each token's bytes derive from its position and
/// id, so a chunk's bytes are the same in every prompt that shares its key.
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

fn keys_of(e: &Engine, tokens: &[u32]) -> Vec<ChunkKey> {
    e.chunk_spans(tokens, None)
        .unwrap()
        .iter()
        .map(|s| s.key)
        .collect()
}

#[test]
fn a_window_stores_and_reads_back_byte_exact() {
    let e = engine();
    let bpt = e.bytes_per_token();
    let tokens = prompt(1, 100); // 6 full chunks (96 tokens) and a 4-token tail
    let kv = kv_for(&e, &tokens);
    let w = 3 * CS; // chunk 3 starts at token 48
    let r = e.store_from(&tokens, None, 3, &kv[w * bpt..]).unwrap();
    assert_eq!(
        (r.stored_tokens, r.new_chunks, r.present_chunks, r.new_bytes),
        (96, 3, 0, (48 * bpt) as u64)
    );
    let before = e.stats();
    let l = e.lookup_from(&tokens, None, 3).unwrap();
    assert_eq!(
        l,
        LookupResult {
            hit_tokens: 96,
            hit_chunks: 3,
            tiers: vec![0; 3]
        }
    );
    // A window counts its own tokens: 52 asked (48..100), 48 found.
    let after = e.stats();
    assert_eq!(
        (
            after.lookups - before.lookups,
            after.requested_tokens - before.requested_tokens,
            after.hit_tokens - before.hit_tokens
        ),
        (1, 52, 48)
    );
    let mut out = vec![0u8; (100 - w) * bpt];
    let got = e.retrieve_from(&tokens, None, 3, &mut out).unwrap();
    assert_eq!((got.hit_tokens, got.tiers), (96, vec![0; 3]));
    assert_eq!(out[..48 * bpt], kv[w * bpt..96 * bpt]);
    assert!(out[48 * bpt..].iter().all(|&b| b == 0), "the tail is left");
    // The chunked tokens only are enough, for the payload and for the output.
    let again = e
        .store_from(&tokens, None, 3, &kv[w * bpt..96 * bpt])
        .unwrap();
    assert_eq!((again.new_chunks, again.present_chunks), (0, 3));
    let mut exact = vec![0u8; 48 * bpt];
    assert_eq!(
        e.retrieve_from(&tokens, None, 3, &mut exact)
            .unwrap()
            .hit_tokens,
        96
    );
    assert_eq!(exact[..], kv[w * bpt..96 * bpt]);
    // A later window of the same prompt is a sub-run of what was stored.
    let mut later = vec![0u8; 32 * bpt];
    assert_eq!(
        e.retrieve_from(&tokens, None, 4, &mut later)
            .unwrap()
            .hit_tokens,
        96
    );
    assert_eq!(later[..], kv[64 * bpt..96 * bpt]);
}

#[test]
fn a_prefix_lookup_sees_nothing_when_chunk_0_is_absent() {
    let e = engine();
    let bpt = e.bytes_per_token();
    let tokens = prompt(2, 100);
    let kv = kv_for(&e, &tokens);
    e.store_from(&tokens, None, 3, &kv[48 * bpt..]).unwrap();
    assert_eq!(e.lookup(&tokens, None).unwrap().hit_tokens, 0);
    let mut out = vec![0u8; kv.len()];
    let r = e.retrieve(&tokens, None, &mut out).unwrap();
    assert_eq!((r.hit_tokens, r.tiers.len()), (0, 0));
    assert!(out.iter().all(|&b| b == 0));
    // Before the window: nothing from chunk 2 on, and the answer says where it starts.
    let l = e.lookup_from(&tokens, None, 2).unwrap();
    assert_eq!((l.hit_tokens, l.hit_chunks), (32, 0));
    let mut out = vec![0u8; 68 * bpt];
    assert_eq!(
        e.retrieve_from(&tokens, None, 2, &mut out)
            .unwrap()
            .hit_tokens,
        32
    );
    assert!(out.iter().all(|&b| b == 0));
    let held = e.acquire(&tokens, None).unwrap();
    assert_eq!((held.hit_tokens, held.chunks.len()), (0, 0));
}

#[test]
fn a_windowed_lookup_and_retrieve_stop_at_a_gap() {
    let e = engine();
    let bpt = e.bytes_per_token();
    let tokens = prompt(3, 96);
    let kv = kv_for(&e, &tokens);
    e.store_from(&tokens, None, 1, &kv[CS * bpt..]).unwrap();
    let keys = keys_of(&e, &tokens);
    assert!(e.manager().remove(keys[3]).unwrap() > 0);
    let l = e.lookup_from(&tokens, None, 1).unwrap();
    assert_eq!((l.hit_tokens, l.hit_chunks), (48, 2));
    let mut out = vec![0u8; 80 * bpt];
    let r = e.retrieve_from(&tokens, None, 1, &mut out).unwrap();
    assert_eq!((r.hit_tokens, r.tiers.len()), (48, 2));
    assert_eq!(out[..32 * bpt], kv[CS * bpt..48 * bpt]);
    assert!(
        out[32 * bpt..].iter().all(|&b| b == 0),
        "nothing past the gap"
    );
    // Past the gap another run starts.
    let l = e.lookup_from(&tokens, None, 4).unwrap();
    assert_eq!((l.hit_tokens, l.hit_chunks), (96, 2));
    let held = e.acquire_from(&tokens, None, 4).unwrap();
    assert_eq!(held.hit_tokens, 96);
    let spans: Vec<(usize, usize)> = held.spans.iter().map(|s| (s.start, s.end)).collect();
    assert_eq!(spans, [(64, 80), (80, 96)]);
    assert_eq!(held.chunks[0].payload(), &kv[64 * bpt..80 * bpt]);
}

#[test]
fn first_chunk_0_is_the_whole_prompt_operation() {
    // Full, partial and tail-keeping cases: the numbers the whole-prompt operations have
    // always given (see tests/engine.rs), from both entries.
    for unfull in [false, true] {
        let a = engine_with(|c| c.save_unfull_chunk = unfull);
        let b = engine_with(|c| c.save_unfull_chunk = unfull);
        let tokens = prompt(4, 3 * CS + 5);
        let kv = kv_for(&a, &tokens);
        let covered = if unfull { 3 * CS + 5 } else { 3 * CS };
        let sa = a.store(&tokens, None, &kv).unwrap();
        let sb = b.store_from(&tokens, None, 0, &kv).unwrap();
        assert_eq!(sa.summary, sb.summary);
        assert_eq!(sa.stored_tokens, covered);
        let mut diverged = tokens.clone();
        diverged[2 * CS + 1] ^= 1;
        for (t, want) in [
            (&tokens, covered),
            (&diverged, 2 * CS),
            (&prompt(5, 40), 0),
            (&tokens[..5].to_vec(), 0),
        ] {
            let l = a.lookup(t, None).unwrap();
            assert_eq!(l, a.lookup_from(t, None, 0).unwrap());
            assert_eq!(l.hit_tokens, want, "unfull {unfull}");
            let keys = keys_of(&a, t);
            assert_eq!(l, a.lookup_keys_from(&keys, t.len(), 0).unwrap());
            let (mut o1, mut o2) = (vec![0u8; kv.len()], vec![0u8; kv.len()]);
            let r1 = a.retrieve(t, None, &mut o1).unwrap();
            let r2 = a.retrieve_from(t, None, 0, &mut o2).unwrap();
            assert_eq!((r1, &o1), (r2, &o2));
        }
    }
}

#[test]
fn a_payload_or_output_of_the_wrong_size_is_refused() {
    let e = engine();
    let bpt = e.bytes_per_token();
    let tokens = prompt(6, 100);
    let kv = kv_for(&e, &tokens);
    for bad in [&kv[48 * bpt + 1..], &kv[..], &kv[48 * bpt..96 * bpt - 1]] {
        let err = e.store_from(&tokens, None, 3, bad).unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)), "{err}");
        assert!(
            err.to_string().contains("from chunk 3 (token 48) on"),
            "{err}"
        );
    }
    assert_eq!(e.lookup_from(&tokens, None, 3).unwrap().hit_chunks, 0);
    let mut short = vec![0u8; 48 * bpt - 1];
    let err = e
        .retrieve_from(&tokens, None, 3, &mut short)
        .unwrap_err()
        .to_string();
    assert!(err.contains("the 48 chunked tokens from chunk 3"), "{err}");
    // The whole-prompt message is unchanged.
    let err = e.store(&tokens, None, &kv[1..]).unwrap_err().to_string();
    assert!(
        err.contains("100 tokens of this model need 25600 bytes") && !err.contains("from chunk"),
        "{err}"
    );
}

#[test]
fn first_chunk_may_be_the_chunk_count_but_not_beyond() {
    for unfull in [false, true] {
        let e = engine_with(|c| c.save_unfull_chunk = unfull);
        let bpt = e.bytes_per_token();
        let tokens = prompt(7, 100);
        let kv = kv_for(&e, &tokens);
        let (chunks, covered) = if unfull { (7, 100) } else { (6, 96) };
        // The chunk count: an empty window at the end of the chunked tokens.
        let l = e.lookup_from(&tokens, None, chunks).unwrap();
        assert_eq!((l.hit_tokens, l.hit_chunks), (covered, 0));
        let s = e
            .store_from(&tokens, None, chunks, &kv[covered * bpt..])
            .unwrap();
        assert_eq!((s.stored_tokens, s.new_chunks), (covered, 0));
        let r = e.retrieve_from(&tokens, None, chunks, &mut []).unwrap();
        assert_eq!(r.hit_tokens, covered);
        assert_eq!(
            e.lookup_keys_from(&[], tokens.len(), chunks)
                .unwrap()
                .hit_tokens,
            covered
        );
        // Beyond it: a clear error from every entry, nothing counted.
        let lookups = e.stats().lookups;
        for bad in [chunks + 1, usize::MAX] {
            let errs = [
                e.lookup_from(&tokens, None, bad).unwrap_err(),
                e.store_from(&tokens, None, bad, &[]).unwrap_err(),
                e.retrieve_from(&tokens, None, bad, &mut []).unwrap_err(),
                e.acquire_from(&tokens, None, bad).map(|_| ()).unwrap_err(),
                e.begin_store_from(&tokens, None, bad)
                    .map(|_| ())
                    .unwrap_err(),
                e.lookup_keys_from(&[], tokens.len(), bad).unwrap_err(),
            ];
            for err in errs {
                assert!(matches!(err, Error::InvalidInput(_)), "{err}");
                assert!(
                    err.to_string().contains(&format!(
                        "first_chunk {bad} is past the {chunks} chunks of a 100-token prompt"
                    )),
                    "{err}"
                );
            }
        }
        assert_eq!(e.stats().lookups, lookups);
        // A key count that is not the window's is refused too.
        let keys = keys_of(&e, &tokens);
        let err = e
            .lookup_keys_from(&keys, tokens.len(), 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("from chunk 2 on"), "{err}");
        assert_eq!(
            e.lookup_keys_from(&keys[2..], tokens.len(), 2)
                .unwrap()
                .hit_chunks,
            0
        );
        // Prompt lengths near the top of `usize` (a server is told them by its clients):
        // answered or refused, never overflowed, even when the one key sent is stored.
        e.store(&tokens, None, &kv).unwrap();
        for n in [usize::MAX, usize::MAX - 1] {
            let c = e.key_space().num_chunks(n);
            for first in [0, c - 1, c, c + 1] {
                let r = e.lookup_keys_from(&keys[..1], n, first);
                if first == c - 1 {
                    let r = r.unwrap();
                    assert_eq!(r.hit_chunks, 1);
                    assert!(r.hit_tokens <= n && r.hit_tokens > first * CS, "{r:?}");
                } else {
                    assert!(matches!(r, Err(Error::InvalidInput(_))), "{r:?}");
                }
            }
        }
    }
}

#[test]
fn a_corrupt_chunk_inside_the_window_is_a_miss_from_there() {
    // L1 off: every read comes from the lower tier, which corrupts chunk 3 on the way.
    let lower = Arc::new(CpuTier::new(lower_options()).unwrap());
    let fault = Arc::new(FaultTier::new(lower, 1));
    let e = Engine::with_lower_tiers(
        config(|c| c.local_cpu = false),
        identity(),
        vec![TierSpec::new(fault.clone())],
    )
    .unwrap();
    let bpt = e.bytes_per_token();
    let tokens = prompt(8, 96);
    let kv = kv_for(&e, &tokens);
    let s = e.store_from(&tokens, None, 1, &kv[CS * bpt..]).unwrap();
    assert_eq!(s.new_chunks, 5);
    assert!(e.flush(Duration::from_secs(10)));
    let keys = keys_of(&e, &tokens);
    fault.add_rule(FaultRule::always(FaultOp::Get, Fault::Corrupt).for_keys([keys[3]]));
    let mut out = vec![0u8; 80 * bpt];
    let r = e.retrieve_from(&tokens, None, 1, &mut out).unwrap();
    assert_eq!((r.hit_tokens, r.tiers), (48, vec![1, 1]));
    assert_eq!(out[..32 * bpt], kv[CS * bpt..48 * bpt]);
    assert!(
        out[32 * bpt..].iter().all(|&b| b == 0),
        "nothing from the corrupt chunk on"
    );
    assert!(fault.fired() > 0);
}

fn lower_options() -> CpuTierOptions {
    let mut o = CpuTierOptions::with_bytes(4 << 20);
    o.name = "lower".into();
    o.pool.huge_pages = false;
    o
}

/// A lower tier that records the prompt reports it gets.
struct Observing {
    inner: CpuTier,
    seen: Mutex<Vec<(Vec<ChunkKey>, PromptReport)>>,
}

impl Tier for Observing {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn observe_prompt(&self, keys: &[ChunkKey], report: PromptReport) {
        self.seen.lock().push((keys.to_vec(), report));
    }
    fn contains_prefix<'a>(&'a self, keys: &'a [ChunkKey]) -> TierFuture<'a, usize> {
        self.inner.contains_prefix(keys)
    }
    fn get<'a>(
        &'a self,
        key: ChunkKey,
        bufs: &'a dyn BufferSource,
    ) -> TierFuture<'a, Option<Chunk>> {
        self.inner.get(key, bufs)
    }
    fn put(&self, chunk: Chunk) -> TierFuture<'_, PutOutcome> {
        self.inner.put(chunk)
    }
    fn remove(&self, key: ChunkKey) -> TierFuture<'_, bool> {
        self.inner.remove(key)
    }
    fn clear(&self) -> TierFuture<'_, u64> {
        self.inner.clear()
    }
    fn remove_salt<'a>(&'a self, salt: &'a str) -> TierFuture<'a, u64> {
        self.inner.remove_salt(salt)
    }
    fn usage(&self) -> TierUsage {
        self.inner.usage()
    }
}

#[test]
fn prompt_reports_name_the_keys_addressed() {
    let tier = Arc::new(Observing {
        inner: CpuTier::new(lower_options()).unwrap(),
        seen: Mutex::default(),
    });
    let e = engine_over(tier.clone());
    let bpt = e.bytes_per_token();
    let tokens = prompt(9, 96);
    let kv = kv_for(&e, &tokens);
    let keys = keys_of(&e, &tokens);
    e.lookup_from(&tokens, None, 2).unwrap();
    e.store_from(&tokens, None, 4, &kv[64 * bpt..]).unwrap();
    e.lookup_keys_from(&keys[5..], tokens.len(), 5).unwrap();
    e.lookup(&tokens, None).unwrap();
    let seen = tier.seen.lock().clone();
    assert_eq!(
        seen,
        [
            (keys[2..].to_vec(), PromptReport::Lookup),
            (keys[4..].to_vec(), PromptReport::Store),
            (keys[5..].to_vec(), PromptReport::Lookup),
            (keys.clone(), PromptReport::Lookup),
        ]
    );
}

/// One step of the property test.
#[derive(Clone, Debug)]
enum Op {
    /// Store the first `len` tokens of base prompt `base` from chunk `first` (an index past
    /// the chunks is expected to fail).
    Store {
        base: usize,
        len: usize,
        first: usize,
    },
    /// Look up and retrieve the same window.
    Read {
        base: usize,
        len: usize,
        first: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let args = (0usize..2, 0usize..120, 0usize..10);
    prop_oneof![
        args.clone()
            .prop_map(|(base, len, first)| Op::Store { base, len, first }),
        args.prop_map(|(base, len, first)| Op::Read { base, len, first }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Against a model (the set of chunk keys stored so far, with L1 large enough never to
    /// evict): a windowed store adds exactly the window's keys, and a windowed lookup and
    /// retrieve find the contiguous run of stored keys from `first_chunk` on, with the
    /// window's bytes. Prompts are prefixes of two base prompts, so windows overlap,
    /// extend and share chunks.
    #[test]
    fn windowed_operations_agree_with_a_model(
        unfull in any::<bool>(),
        ops in proptest::collection::vec(op(), 1..24),
    ) {
        let e = engine_with(|c| c.save_unfull_chunk = unfull);
        let bpt = e.bytes_per_token();
        let bases = [prompt(100, 120), prompt(200, 120)];
        let mut stored: HashSet<ChunkKey> = HashSet::new();
        for op in ops {
            let (Op::Store { base, len, first } | Op::Read { base, len, first }) = op.clone();
            let tokens = &bases[base][..len];
            let spans = e.chunk_spans(tokens, None).unwrap();
            let kv = kv_for(&e, tokens);
            if first > spans.len() {
                prop_assert!(e.lookup_from(tokens, None, first).is_err());
                prop_assert!(e.store_from(tokens, None, first, &[]).is_err());
                prop_assert!(e.retrieve_from(tokens, None, first, &mut []).is_err());
                continue;
            }
            let window = &spans[first..];
            let start = window.first().map_or(e.key_space().covered_tokens(len), |s| s.start);
            let covered = window.last().map_or(start, |s| s.end);
            match op {
                Op::Store { .. } => {
                    let r = e.store_from(tokens, None, first, &kv[start * bpt..]).unwrap();
                    let new = window.iter().filter(|s| !stored.contains(&s.key)).count();
                    prop_assert_eq!(r.stored_tokens, covered);
                    prop_assert_eq!((r.new_chunks, r.present_chunks), (new, window.len() - new));
                    stored.extend(window.iter().map(|s| s.key));
                }
                Op::Read { .. } => {
                    let run = window.iter().take_while(|s| stored.contains(&s.key)).count();
                    let end = if run == 0 { start } else { window[run - 1].end };
                    let l = e.lookup_from(tokens, None, first).unwrap();
                    prop_assert_eq!((l.hit_tokens, l.hit_chunks), (end, run));
                    let mut out = vec![0u8; (len - start) * bpt];
                    let r = e.retrieve_from(tokens, None, first, &mut out).unwrap();
                    prop_assert_eq!(r.hit_tokens, end);
                    let n = (end - start) * bpt;
                    prop_assert!(out[..n] == kv[start * bpt..end * bpt]);
                    prop_assert!(out[n..].iter().all(|&b| b == 0));
                }
            }
        }
    }
}

fn l1_hits(e: &Engine) -> u64 {
    e.stats().tiers[0].hits
}

#[test]
fn a_read_l1_answers_alone_counts_and_copies_like_the_full_path() {
    // L1 only: the whole prompt, then a prompt of which L1 holds the first 3 chunks.
    let e = engine();
    let bpt = e.bytes_per_token();
    let tokens = prompt(10, 96);
    let kv = kv_for(&e, &tokens);
    e.store(&tokens[..48], None, &kv[..48 * bpt]).unwrap();
    let mut out = vec![0u8; 96 * bpt];
    let r = e.retrieve(&tokens, None, &mut out).unwrap();
    assert_eq!((r.hit_tokens, r.tiers), (48, vec![0, 0, 0]));
    assert_eq!(out[..48 * bpt], kv[..48 * bpt]);
    assert!(
        out[48 * bpt..].iter().all(|&b| b == 0),
        "nothing past the prefix"
    );
    assert_eq!(l1_hits(&e), 3);
    e.store(&tokens, None, &kv).unwrap();
    let r = e.retrieve(&tokens, None, &mut out).unwrap();
    assert_eq!((r.hit_tokens, r.tiers), (96, vec![0; 6]));
    assert_eq!(out, kv);
    assert_eq!(l1_hits(&e), 9);
    // A window, and a prompt L1 does not hold.
    let mut w = vec![0u8; 64 * bpt];
    let r = e.retrieve_from(&tokens, None, 2, &mut w).unwrap();
    assert_eq!((r.hit_tokens, r.tiers.len()), (96, 4));
    assert_eq!(w, kv[32 * bpt..]);
    let r = e.retrieve(&prompt(11, 32), None, &mut out).unwrap();
    assert_eq!((r.hit_tokens, r.tiers), (0, vec![]));
}

#[test]
fn a_read_l1_answers_in_part_still_loads_the_rest_from_below() {
    let lower = Arc::new(CpuTier::new(lower_options()).unwrap());
    let writer = engine_over(lower.clone());
    let bpt = writer.bytes_per_token();
    let tokens = prompt(12, 96);
    let kv = kv_for(&writer, &tokens);
    writer.store(&tokens, None, &kv).unwrap();
    assert!(writer.flush(Duration::from_secs(10)));
    // A fresh L1 over the same lower tier: reading the first 2 chunks promotes them.
    let e = engine_over(lower);
    let mut out = vec![0u8; 96 * bpt];
    let r = e
        .retrieve(&tokens[..32], None, &mut out[..32 * bpt])
        .unwrap();
    assert_eq!((r.hit_tokens, r.tiers), (32, vec![1, 1]));
    out.fill(0);
    let r = e.retrieve(&tokens, None, &mut out).unwrap();
    assert_eq!((r.hit_tokens, r.tiers), (96, vec![0, 0, 1, 1, 1, 1]));
    assert_eq!(out, kv);
    // Now all of it is in L1.
    let r = e.retrieve(&tokens, None, &mut out).unwrap();
    assert_eq!((r.hit_tokens, r.tiers), (96, vec![0; 6]));
    assert_eq!(out, kv);
}
