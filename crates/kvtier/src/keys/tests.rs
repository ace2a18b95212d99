use super::*;
use crate::layout::{Dtype, KvLayout};
use proptest::prelude::*;

const VECTORS: &str = include_str!("../../../../docs/key-vectors.json");
const SPEC: &str = include_str!("../../../../docs/key-spec.md");

#[derive(serde::Deserialize)]
struct Vector {
    name: String,
    identity: ModelIdentity,
    chunk_size: usize,
    save_unfull_chunk: bool,
    cache_salt: Option<String>,
    tokens: serde_json::Value,
    keys: Vec<String>,
}

fn tokens_of(v: &serde_json::Value) -> Vec<u32> {
    if let Some(r) = v.get("range") {
        let (a, b) = (r[0].as_u64().unwrap() as u32, r[1].as_u64().unwrap() as u32);
        return (a..b).collect();
    }
    v.as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn golden_vectors_match_the_published_file() {
    let file: serde_json::Value = serde_json::from_str(VECTORS).unwrap();
    assert_eq!(file["key_spec_version"], KEY_SPEC_VERSION);
    let vectors: Vec<Vector> = serde_json::from_value(file["vectors"].clone()).unwrap();
    assert!(vectors.len() >= 10);
    for v in vectors {
        let ks = KeySpace::new(v.identity, v.chunk_size, v.save_unfull_chunk).unwrap();
        let got: Vec<String> = ks
            .chunk_spans(&tokens_of(&v.tokens), v.cache_salt.as_deref())
            .unwrap()
            .iter()
            .map(|s| s.key.to_hex())
            .collect();
        assert_eq!(got, v.keys, "vector `{}`", v.name);
        for k in &v.keys {
            assert!(
                SPEC.contains(k.as_str()),
                "key {k} of `{}` is not in docs/key-spec.md",
                v.name
            );
        }
    }
}

#[test]
fn the_spec_quotes_the_first_vector_in_full() {
    let file: serde_json::Value = serde_json::from_str(VECTORS).unwrap();
    let first = file["vectors"][0]["keys"][0].as_str().unwrap();
    assert!(SPEC.contains(first), "docs/key-spec.md must quote {first}");
}

fn space(salt_free_rank: u32) -> KeySpace {
    let mut id = ModelIdentity::new("m", KvLayout::simple(2, 2, 4, Dtype::F16));
    id.world_size = 2;
    id.rank = salt_free_rank;
    KeySpace::new(id, 4, true).unwrap()
}

#[test]
fn invalid_identities_and_salts_are_rejected() {
    let mut id = ModelIdentity::new("m", KvLayout::simple(2, 2, 4, Dtype::F16));
    id.rank = 1;
    assert!(KeySpace::new(id, 4, false)
        .unwrap_err()
        .to_string()
        .contains("rank"));
    let ks = space(0);
    assert!(ks
        .chunk_spans(&[1, 2, 3, 4], Some(&"x".repeat(200)))
        .is_err());
    assert!(ks.chunk_spans(&[1, 2, 3, 4], Some("a\0b")).is_err());
    assert_eq!(
        ks.chunk_spans(&[1, 2, 3, 4], Some("")).unwrap(),
        ks.chunk_spans(&[1, 2, 3, 4], None).unwrap(),
        "an empty salt is no salt"
    );
    assert!(ChunkKey::from_hex("zz").is_err());
}

#[test]
fn parallel_and_serial_digests_agree() {
    // 64+ chunks take the rayon path; their prefix must equal the serial result.
    let ks = space(0);
    let tokens: Vec<u32> = (0..4 * 100).collect();
    let many = ks.chunk_spans(&tokens, None).unwrap();
    let few = ks.chunk_spans(&tokens[..4 * 10], None).unwrap();
    assert_eq!(&many[..10], &few[..]);
}

proptest! {
    #[test]
    fn keys_commit_to_the_whole_prefix(
        tokens in proptest::collection::vec(any::<u32>(), 1..64),
        at in any::<prop::sample::Index>(),
        delta in 1u32..,
    ) {
        let ks = space(0);
        let a = ks.chunk_spans(&tokens, None).unwrap();
        let i = at.index(tokens.len());
        let mut changed = tokens.clone();
        changed[i] = changed[i].wrapping_add(delta);
        let b = ks.chunk_spans(&changed, None).unwrap();
        let chunk = i / 4;
        for j in 0..a.len() {
            if j < chunk {
                prop_assert_eq!(a[j].key, b[j].key);
            } else {
                prop_assert_ne!(a[j].key, b[j].key);
            }
        }
    }

    #[test]
    fn prefix_keys_are_a_prefix_and_salts_and_ranks_separate(
        tokens in proptest::collection::vec(any::<u32>(), 0..64),
        cut in any::<prop::sample::Index>(),
    ) {
        let ks = space(0);
        let full = ks.chunk_spans(&tokens, None).unwrap();
        let c = (cut.index(tokens.len() + 1) / 4) * 4;
        let part = ks.chunk_spans(&tokens[..c], None).unwrap();
        prop_assert_eq!(&full[..part.len()], &part[..]);
        let salted = ks.chunk_spans(&tokens, Some("t")).unwrap();
        let other_rank = space(1).chunk_spans(&tokens, None).unwrap();
        for j in 0..full.len() {
            prop_assert_ne!(full[j].key, salted[j].key);
            prop_assert_ne!(full[j].key, other_rank[j].key);
        }
        prop_assert_eq!(full.len(), tokens.len().div_ceil(4));
        if let Some(last) = full.last() {
            prop_assert_eq!(last.end, tokens.len());
        }
    }
}

fn mla_space(world_size: u32, rank: u32, replicated: bool) -> KeySpace {
    let layout = KvLayout {
        groups: vec![crate::layout::LayerGroup {
            num_layers: 4,
            num_kv_heads: 1,
            head_dim: 576,
            dtype: Dtype::Bf16,
            planes: 1,
        }],
        tag: crate::layout::LAYER_MAJOR.into(),
    };
    let mut id = ModelIdentity::new("deepseek/mla", layout);
    (id.world_size, id.rank, id.replicated) = (world_size, rank, replicated);
    KeySpace::new(id, 4, false).unwrap()
}

#[test]
fn replicated_layouts_give_every_rank_the_same_keys() {
    let tokens: Vec<u32> = (0..12).collect();
    let keys = |ks: KeySpace| ks.chunk_spans(&tokens, None).unwrap();
    // One rank's chunks serve all ranks of the same world size...
    assert_eq!(keys(mla_space(2, 0, true)), keys(mla_space(2, 1, true)));
    assert_eq!(keys(mla_space(4, 0, true)), keys(mla_space(4, 3, true)));
    // ...never a per-rank (sharded) identity's, nor another world size's.
    assert_ne!(keys(mla_space(2, 0, true)), keys(mla_space(2, 0, false)));
    assert_ne!(keys(mla_space(2, 0, true)), keys(mla_space(1, 0, true)));
    assert_ne!(keys(mla_space(2, 0, false)), keys(mla_space(2, 1, false)));
    assert_eq!(mla_space(2, 1, true).identity().key_rank(), REPLICATED_RANK);
}

#[test]
fn the_replicated_flag_is_omitted_from_json_when_false() {
    // Identities sent to an older `kvtier serve` keep their exact JSON shape.
    let id = ModelIdentity::new("m", KvLayout::simple(2, 2, 4, Dtype::F16));
    let json = serde_json::to_string(&id).unwrap();
    assert!(!json.contains("replicated"), "{json}");
    let back: ModelIdentity = serde_json::from_str(&json).unwrap();
    assert!(!back.replicated);
    let mut rep = id.clone();
    rep.replicated = true;
    let json = serde_json::to_string(&rep).unwrap();
    assert_eq!(serde_json::from_str::<ModelIdentity>(&json).unwrap(), rep);
}
