//! LMCache compatibility of the config: LMCache keys that have no kvtier meaning, and the
//! `LMCACHE_*` environment variables.
//!
//! An LMCache config file loads: the keys kvtier shares are read (the key table in
//! `docs/migrating-from-lmcache.md`), each LMCache key kvtier has no use for is ignored with
//! a warning saying what kvtier does instead, and a key that asks for something kvtier
//! does not do (CacheBlend, disaggregated prefill, a compressing serializer, ...) is
//! refused, since ignoring it would change what the user asked for. A key neither kvtier
//! nor LMCache knows stays an error (a typo).

use super::Raw;

/// What kvtier does with a config key of LMCache's that is not one of its own.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Foreign {
    /// Ignored; the warning says why and what kvtier does instead.
    Ignored(String),
    /// Refused with this message: the value asks for something kvtier does not do.
    Refused(String),
}

/// When a value of a foreign key is refused instead of ignored.
#[derive(Clone, Copy)]
enum Refuse {
    /// Never: the key only tunes something kvtier does its own way.
    Never,
    /// When the value is true: the key turns on a feature kvtier lacks.
    IfTrue,
    /// When the value is none of these (lower case): other values change the stored data.
    UnlessOneOf(&'static [&'static str]),
}

/// One LMCache key (or every key with a prefix, when `name` ends in `*`).
struct Key {
    name: &'static str,
    instead: &'static str,
    refuse: Refuse,
}

const fn key(name: &'static str, instead: &'static str) -> Key {
    Key {
        name,
        instead,
        refuse: Refuse::Never,
    }
}

const fn feature(name: &'static str, instead: &'static str) -> Key {
    Key {
        name,
        instead,
        refuse: Refuse::IfTrue,
    }
}

const NO_EQUIVALENT: &str = "kvtier has no equivalent";
const CONNECTOR_LOOKUP: &str =
    "the kvtier connector's lookups are always asynchronous, bounded by its kvtier.lookup_budget_ms and kvtier.lookup_deadline_s settings";
const BLEND: &str = "CacheBlend (reusing chunks that are not a prefix) is not supported: kvtier reuses prefixes only";
const SHARING: &str = "kvtier has no controller, P2P or multiprocess server of LMCache's kind; share a cache through remote_url (kvtier://host:port of a `kvtier serve --tcp`, or Redis/Valkey)";
const PD: &str = "disaggregated prefill (PD / NIXL transfer) is not supported";
const STORAGE: &str =
    "GPU-direct and vendor storage backends are not supported; use local_disk on that device";
const PLUGINS: &str = "storage and runtime plugins are not supported";

/// LMCache's config keys (as of LMCache 0.5) that kvtier does not take as its own. The keys
/// kvtier shares with LMCache are in the main key table, some as aliases.
const KEYS: &[Key] = &[
    Key {
        name: "remote_serde",
        instead: "kvtier stores chunks as checksummed raw records (LMCache's `naive`) and compresses nothing",
        refuse: Refuse::UnlessOneOf(&["naive"]),
    },
    feature("save_decode_cache", "the kvtier connector stores prompt chunks only"),
    key(
        "use_layerwise",
        "per-layer loads and saves are the vLLM connector's kvtier.layerwise setting (kv_connector_extra_config)",
    ),
    key(
        "pre_caching_hash_algorithm",
        "chunk keys are kvtier's own (a chained BLAKE3 hash, docs/key-spec.md), the same in every process",
    ),
    key("enable_async_loading", CONNECTOR_LOOKUP),
    key("lookup_timeout_ms", CONNECTOR_LOOKUP),
    key("lookup_server_worker_ids", CONNECTOR_LOOKUP),
    key("enable_scheduler_bypass_lookup", CONNECTOR_LOOKUP),
    key("external_lookup_client", NO_EQUIVALENT),
    key("hit_miss_ratio", NO_EQUIVALENT),
    key("min_retrieve_tokens", NO_EQUIVALENT),
    key("priority_limit", NO_EQUIVALENT),
    key("retrieve_locations", "kvtier reads every tier in order"),
    key("store_location", "kvtier stores to every tier"),
    key(
        "reserve_local_cpu_size",
        "the L1 pool is exactly max_local_cpu_size, allocated once",
    ),
    key("enable_lazy_memory_allocator", "the L1 pool is allocated once (local_cpu_prefault commits it at start)"),
    key("lazy_memory_*", "the L1 pool is allocated once (local_cpu_prefault commits it at start)"),
    key("py_enable_gc", "kvtier's engine is not Python"),
    key("numa_mode", NO_EQUIVALENT),
    key("gpu_to_numa_mapping", NO_EQUIVALENT),
    key("pin_check_interval_sec", "abandoned pins expire after pin_timeout_sec"),
    key("cost_aware_*", "cache_policy is lru or s3fifo"),
    key("enable_kv_events", NO_EQUIVALENT),
    key("use_gpu_connector_v3", "the vLLM connector copies through kvtier.transfer"),
    key("enable_chunk_statistics", "kvtier's counters are in /metrics and /stats"),
    key("chunk_statistics_*", "kvtier's counters are in /metrics and /stats"),
    feature("enable_hidden_state_cache", NO_EQUIVALENT),
    key("max_hidden_state_cpu_size", NO_EQUIVALENT),
    key("hidden_state_layers", NO_EQUIVALENT),
    key("hidden_states_retrieve_mode", NO_EQUIVALENT),
    key(
        "extra_config",
        "its keys have no kvtier meaning (ssd_gate_min_access_count is disk_admit_after, a top-level key)",
    ),
    key("audit_actual_remote_url", NO_EQUIVALENT),
    feature("enable_blending", BLEND),
    key("blend_*", BLEND),
    feature("enable_p2p", SHARING),
    key("p2p_*", SHARING),
    key("transfer_channel", SHARING),
    feature("enable_controller", SHARING),
    key("controller_*", SHARING),
    key("lmcache_instance_id", SHARING),
    key("lmcache_worker_*", SHARING),
    key("mp_host", SHARING),
    key("mp_port", SHARING),
    feature("enable_pd", PD),
    feature("enable_xpyd", PD),
    key("pd_*", PD),
    key("nixl_*", PD),
    key("use_gds", STORAGE),
    key("gds_*", STORAGE),
    key("maru_*", STORAGE),
    key("weka_path", STORAGE),
    key("internal_api_server_*", "kvtier's admin endpoint is admin_port"),
    key("script_allowed_imports", "kvtier's admin endpoint is admin_port"),
    key("runtime_plugin_locations", PLUGINS),
    key("plugin_locations", PLUGINS),
    key("storage_plugins", PLUGINS),
    key("remote_storage_plugins", PLUGINS),
    key("external_backends", PLUGINS),
    key("ec", "the encoder cache is not supported"),
    key("ec_*", "the encoder cache is not supported"),
    key("remote_config_url", "kvtier reads its config from the file and the environment only"),
    key("app_id", "kvtier reads its config from the file and the environment only"),
];

fn find(norm: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| match k.name.strip_suffix('*') {
        Some(prefix) => norm.starts_with(prefix),
        None => k.name == norm,
    })
}

/// What to do with `norm` (a lower-case key kvtier does not know) set to `raw`; `None`
/// when LMCache does not know it either.
pub(super) fn foreign(norm: &str, raw: &Raw<'_>) -> Option<Foreign> {
    let k = find(norm)?;
    let refused = match k.refuse {
        Refuse::Never => false,
        Refuse::IfTrue => raw.bool() == Ok(true),
        Refuse::UnlessOneOf(ok) => raw
            .text()
            .is_some_and(|t| !ok.contains(&t.trim().to_ascii_lowercase().as_str())),
    };
    Some(if refused {
        Foreign::Refused(format!(
            "LMCache key set to {}, which kvtier cannot honour: {}; remove the key",
            raw.show(),
            k.instead
        ))
    } else {
        Foreign::Ignored(format!(
            "config key {norm} (LMCache) ignored: {}",
            k.instead
        ))
    })
}

/// Prefix of LMCache's environment variables.
pub(super) const LMCACHE_ENV_PREFIX: &str = "LMCACHE_";
/// LMCache's variable naming its config file.
pub(super) const LMCACHE_CONFIG_FILE_ENV: &str = "LMCACHE_CONFIG_FILE";

/// Whether `key` (lower case, from `LMCACHE_<KEY>`) is one of LMCache's config keys that
/// kvtier does not share (the caller checks kvtier's own keys first).
pub(super) fn is_lmcache_key(norm: &str) -> bool {
    find(norm).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use yaml_rust2::{Yaml, YamlLoader};

    fn verdict(key: &str, yaml: &str) -> Option<Foreign> {
        let v: Yaml = YamlLoader::load_from_str(yaml).unwrap().remove(0);
        foreign(key, &Raw::Yaml(&v))
    }

    #[test]
    fn tuning_keys_are_ignored_and_features_refused_only_when_on() {
        assert!(matches!(
            verdict("remote_serde", "naive"),
            Some(Foreign::Ignored(_))
        ));
        assert!(matches!(
            verdict("remote_serde", "cachegen"),
            Some(Foreign::Refused(_))
        ));
        assert!(matches!(
            verdict("enable_blending", "false"),
            Some(Foreign::Ignored(_))
        ));
        assert!(matches!(
            verdict("enable_blending", "true"),
            Some(Foreign::Refused(_))
        ));
        assert!(matches!(
            verdict("enable_pd", "True"),
            Some(Foreign::Refused(_))
        ));
        assert!(matches!(
            verdict("pd_role", "sender"),
            Some(Foreign::Ignored(_))
        ));
        assert!(matches!(
            verdict("blend_special_str", "' # # '"),
            Some(Foreign::Ignored(_))
        ));
        assert!(matches!(
            verdict("use_layerwise", "true"),
            Some(Foreign::Ignored(_))
        ));
        assert_eq!(verdict("chunk_sise", "256"), None);
        assert_eq!(verdict("blend", "1"), None);
        let Some(Foreign::Ignored(w)) = verdict("save_decode_cache", "false") else {
            panic!("save_decode_cache: false is harmless");
        };
        assert!(
            w.contains("save_decode_cache") && w.contains("prompt chunks"),
            "{w}"
        );
    }

    #[test]
    fn no_lmcache_entry_shadows_a_kvtier_key() {
        for name in super::super::EngineConfig::known_keys() {
            assert!(find(name).is_none(), "{name} is kvtier's own");
        }
    }
}
