//! The batch form of `POST /lookup` on a real `kvtier-server`: answers match the one-prompt
//! form, keys and prompts agree, bad batches get a clear error; and its latency for 16
//! prompts of 8K tokens (goal: p99 <= 1 ms) is measured and printed, never asserted.

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;

use common::*;
use kvtier::keys::{KeySpace, ModelIdentity};
use kvtier::layout::{Dtype, KvLayout};
use kvtier::KvCache;
use kvtier_client::KvClient;
use serde_json::{json, Value};

const TOKEN: &str = "batch-lookup-test-token-not-a-secret";
const CHUNK_TOKENS: usize = 256;
const PROMPT: usize = 8192;

/// 16 bytes per token: 16 prompts of 8K tokens are 2 MiB of KV.
fn small() -> ModelIdentity {
    ModelIdentity::new("batch-test", KvLayout::simple(1, 1, 4, Dtype::F16))
}

fn post(srv: &Server, body: &Value) -> Value {
    let (code, text) = srv.http("POST", "/lookup", Some(body));
    assert_eq!(code, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[test]
fn batch_lookup_answers_like_single_lookups_and_is_timed() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "chunk_size: {CHUNK_TOKENS}\nmax_local_cpu_size: 16MiB\nlocal_cpu_huge_pages: false\n"
    );
    let srv = Server::start(dir.path(), &yaml, &[], &[("KVTIER_ADMIN_TOKEN", TOKEN)]);
    let c = KvClient::connect(&srv.unix(), small()).unwrap();
    let bpt = 16;
    // 16 prompts: prompt i is stored for its first (i % 4 + 1) * 2K tokens.
    let prompts: Vec<Vec<u32>> = (0..16).map(|i| tokens(100 + i, PROMPT)).collect();
    for (i, p) in prompts.iter().enumerate() {
        let n = (i % 4 + 1) * 2048;
        c.store(&p[..n], None, &vec![i as u8; n * bpt]).unwrap();
    }
    let body = json!({
        "model": "batch-test",
        "prompts": prompts.iter().map(|p| json!({"tokens": p})).collect::<Vec<_>>(),
    });
    let v = post(&srv, &body);
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 16);
    for (i, (r, p)) in results.iter().zip(&prompts).enumerate() {
        let want = (i % 4 + 1) * 2048;
        assert_eq!(r["hit_tokens"], want, "prompt {i}: {r}");
        assert_eq!(r["requested_tokens"], PROMPT);
        assert_eq!(r["chunks_per_tier"]["cpu"], want / CHUNK_TOKENS);
        // The one-prompt form agrees.
        let one = post(&srv, &json!({"model": "batch-test", "tokens": p}));
        assert_eq!(one["hit_tokens"], r["hit_tokens"]);
    }
    // Key lists (as the event stream announces them) agree with prompts.
    let ks = KeySpace::new(small(), CHUNK_TOKENS, false).unwrap();
    let lists: Vec<Vec<String>> = prompts
        .iter()
        .map(|p| {
            ks.chunk_spans(p, None)
                .unwrap()
                .iter()
                .map(|s| s.key.to_hex())
                .collect()
        })
        .collect();
    let kv = post(&srv, &json!({ "block_hashes": lists }));
    for (i, r) in kv["results"].as_array().unwrap().iter().enumerate() {
        assert_eq!(r["hit_chunks"], (i % 4 + 1) * 2048 / CHUNK_TOKENS, "{r}");
        assert_eq!(r["requested_chunks"], PROMPT / CHUNK_TOKENS);
    }
    // The compact form (little-endian u32 token ids, base64) agrees with the arrays.
    let b64 = |p: &[u32]| {
        let bytes: Vec<u8> = p.iter().flat_map(|t| t.to_le_bytes()).collect();
        base64::engine::general_purpose::STANDARD.encode(bytes)
    };
    let body_b64 = json!({
        "model": "batch-test",
        "prompts": prompts.iter().map(|p| json!({"tokens_b64": b64(p)})).collect::<Vec<_>>(),
    });
    assert_eq!(post(&srv, &body_b64), v, "tokens_b64 answers like tokens");
    for (bad, says) in [
        (json!({"tokens_b64": "!!"}), "not base64"),
        (json!({"tokens_b64": b64(&[1])[..4]}), "4 bytes each"),
        (
            json!({"tokens": [1], "tokens_b64": b64(&[1])}),
            "exactly one of",
        ),
        (json!({}), "exactly one of"),
    ] {
        let (code, text) = srv.http(
            "POST",
            "/lookup",
            Some(&json!({"model": "batch-test", "prompts": [bad]})),
        );
        assert_eq!(code, 400, "{text}");
        assert!(text.contains(says), "{says}: {text}");
    }

    // A probe is not a request: the lookup metrics did not move for the batches.
    let lookups = |srv: &Server| {
        let (_, m) = srv.http("GET", "/metrics", None);
        metric(&m, "kvtier_lookups_total").expect("kvtier_lookups_total")
    };
    let before = lookups(&srv);
    post(&srv, &body);
    assert_eq!(lookups(&srv), before, "a batch counted as lookups");
    post(&srv, &json!({"model": "batch-test", "tokens": prompts[0]}));
    assert_eq!(lookups(&srv), before + 1.0, "a one-prompt lookup counts");

    // Errors say what to send.
    for bad in [
        json!({"model": "batch-test"}),
        json!({"model": "batch-test", "tokens": [1], "prompts": []}),
    ] {
        let (code, text) = srv.http("POST", "/lookup", Some(&bad));
        assert_eq!(code, 400, "{text}");
        assert!(text.contains("exactly one of"), "{text}");
    }
    let (code, text) = srv.http("POST", "/lookup", Some(&json!({"block_hashes": [["zz"]]})));
    assert_eq!(code, 400, "{text}");
    let many: Vec<Value> = (0..300).map(|_| json!({"tokens": [1, 2]})).collect();
    let (code, text) = srv.http(
        "POST",
        "/lookup",
        Some(&json!({"model": "batch-test", "prompts": many})),
    );
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("at most 256"), "{text}");

    // Latency, measured (not asserted): 16 prompts of 8K tokens, and their 16 key lists.
    for (name, b) in [
        ("prompts", &body),
        ("prompts, tokens_b64", &body_b64),
        ("block_hashes", &json!({ "block_hashes": lists })),
    ] {
        let mut t = Vec::new();
        for _ in 0..100 {
            let t0 = Instant::now();
            post(&srv, b);
            t.push(t0.elapsed());
        }
        t.sort();
        eprintln!(
            "batch lookup ({name}, 16 x {PROMPT} tokens, HTTP round trip incl. JSON): p50 {:?} p99 {:?}",
            pct(&t, 0.5),
            pct(&t, 0.99)
        );
    }
}
