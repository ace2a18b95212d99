//! Engine configuration: a YAML (or JSON) file plus `KVTIER_<KEY>` environment overrides.
//!
//! LMCache's key names are accepted where the meaning is the same (`chunk_size`,
//! `local_cpu`, `max_local_cpu_size` in GB, `local_disk`, `max_local_disk_size`,
//! `remote_url`, `save_unfull_chunk`, ...). Unknown keys and bad values are errors naming
//! the key and what is allowed; nothing is silently ignored.
//!
//! ```
//! let cfg = kvtier::config::EngineConfig::from_yaml_str("chunk_size: 128\nmax_local_cpu_size: 0.5\n").unwrap();
//! assert_eq!(cfg.chunk_size, 128);
//! assert_eq!(cfg.max_local_cpu_size, 512 << 20);
//! let err = kvtier::config::EngineConfig::from_yaml_str("chunk_sise: 128").unwrap_err();
//! assert!(err.to_string().contains("did you mean `chunk_size`"));
//! ```

use std::path::{Path, PathBuf};

use yaml_rust2::{Yaml, YamlLoader};

use crate::error::{Error, Result};
use crate::policy::PolicyKind;
use crate::tier::remote::url::redact;
use crate::tier::DiskDurability;

mod lmcache;

/// Environment variable naming the config file.
pub const CONFIG_FILE_ENV: &str = "KVTIER_CONFIG_FILE";
/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "KVTIER_";

/// A `KVTIER_*` environment variable that is not a config key, and what it is for.
#[derive(Clone, Copy, Debug)]
pub struct EnvVar {
    /// Full variable name.
    pub name: &'static str,
    /// One line on what it does.
    pub about: &'static str,
}

/// `KVTIER_*` variables users set that are not config keys (shown in `kvtier --help`).
pub const ENV_VARS: &[EnvVar] = &[
    EnvVar {
        name: CONFIG_FILE_ENV,
        about: "engine config file (YAML) to load when --config is not given",
    },
    EnvVar {
        name: "KVTIER_LOG",
        about: "log filter: a level (error, warn, info, debug, trace) or directives such as kvtier=debug",
    },
    EnvVar {
        name: "KVTIER_AUTH_TOKEN",
        about: "shared token: `kvtier serve --tcp` requires it, kvtier:// tiers send it",
    },
    EnvVar {
        name: "KVTIER_ADMIN_TOKEN",
        about: "bearer token of the admin HTTP endpoint",
    },
    EnvVar {
        name: "KVTIER_REDIS_USERNAME",
        about: "Redis/Valkey user when the remote_url has none",
    },
    EnvVar {
        name: "KVTIER_REDIS_PASSWORD",
        about: "Redis/Valkey password when the remote_url has none",
    },
    EnvVar {
        name: "KVTIER_KV_EVENTS_CONFIG",
        about: "`kvtier serve --kv-events-config`: KV events of what L1 holds (vLLM's format)",
    },
    EnvVar {
        name: "KVTIER_SERVER_UID",
        about: "clients: further uids (comma-separated) trusted to run the kvtier server",
    },
];

/// `KVTIER_*` variables of the project's scripts and test harnesses: never config keys,
/// never warned about.
pub const ENV_TOOL_VARS: &[&str] = &[
    // bench/compare/run.sh: venv of the comparison.
    "KVTIER_COMPARE_VENV",
    // CI: a missing test server fails the test instead of skipping it.
    "KVTIER_REQUIRE_TEST_SERVERS",
    // Test binaries re-executed as child processes, and their knobs.
    "KVTIER_TEST_CHILD",
    "KVTIER_TEST_ADDR",
    "KVTIER_TEST_IDX",
    "KVTIER_PEER_CHILD",
    "KVTIER_PEER_URL",
    "KVTIER_PEER_DISK",
    "KVTIER_CRASH_CHILD_DIR",
    "KVTIER_CRASH_CHILD_BASE",
    "KVTIER_CRASH_CHILD_NO_FLUSH",
    "KVTIER_CRASH_DEBUG",
    "KVTIER_SOAK",
    "KVTIER_SOAK_ITERS",
    "KVTIER_RECOVERY_N",
    // crates/kvtier-server/tests/events.rs: a Python with vLLM to decode the KV events.
    "KVTIER_VLLM_PYTHON",
    // crates/kvtier-server/tests/metric_reference.rs: rewrite docs/metrics.md's table.
    "KVTIER_BLESS",
];

/// What a `KVTIER_*` environment variable is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EnvKind {
    /// `KVTIER_<KEY>`: overrides config key `key` (lower case).
    Key(String),
    /// On [`ENV_VARS`] or [`ENV_TOOL_VARS`]: read by whoever needs it, not by the config.
    NotKey,
    /// Neither: ignored with a warning (typically a typo).
    Unknown {
        /// The warning, naming the closest known variable.
        warning: String,
    },
    /// Not a `KVTIER_*` variable.
    Other,
}

/// Classifies an environment variable name.
pub fn classify_env(name: &str) -> EnvKind {
    let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
        return EnvKind::Other;
    };
    if ENV_VARS.iter().any(|v| v.name == name) || ENV_TOOL_VARS.contains(&name) {
        return EnvKind::NotKey;
    }
    let key = rest.to_ascii_lowercase();
    if find_key(&key).is_some() {
        return EnvKind::Key(key);
    }
    let keys = KEYS
        .iter()
        .flat_map(|k| std::iter::once(k.name).chain(k.aliases.iter().copied()))
        .map(|k| format!("{ENV_PREFIX}{}", k.to_ascii_uppercase()));
    let others = ENV_VARS.iter().map(|v| v.name.to_string());
    let closest = keys
        .chain(others)
        .map(|n| (edit_distance(name, &n), n))
        .min();
    let hint = match closest {
        Some((d, n)) if d <= 3 => format!("did you mean {n}?"),
        Some((_, n)) => format!("the closest kvtier variable is {n}"),
        None => String::new(),
    };
    EnvKind::Unknown {
        warning: format!(
            "ignoring environment variable {name}: it is neither a config key nor a kvtier \
             variable ({hint}; `kvtier --help` lists them)"
        ),
    }
}

const GIB: f64 = (1u64 << 30) as f64;

/// How a process with several disk paths picks where chunks go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathSharding {
    /// Rank r uses path `r % paths` (LMCache's `by_gpu`).
    #[default]
    ByRank,
    /// Chunks spread over all paths by key hash.
    Striped,
}

/// Every engine setting, with defaults. `Debug` and `Serialize` redact credentials in
/// `remote_url`, so a config dump, a log line or `/stats` never shows a password.
#[derive(Clone, PartialEq, serde::Serialize)]
pub struct EngineConfig {
    /// Tokens per chunk.
    pub chunk_size: usize,
    /// Store the trailing partial chunk of a prompt.
    pub save_unfull_chunk: bool,
    /// Keep chunks in the CPU tier (false: the pool only stages I/O for lower tiers).
    pub local_cpu: bool,
    /// CPU pool size in bytes (config value in GB, i.e. GiB as in LMCache).
    pub max_local_cpu_size: u64,
    /// Ask for transparent huge pages for the pool.
    pub local_cpu_huge_pages: bool,
    /// Touch the whole pool at start so its memory is resident.
    pub local_cpu_prefault: bool,
    /// Eviction policy.
    pub cache_policy: PolicyKind,
    /// Abandoned pins expire after this many seconds.
    pub pin_timeout_sec: f64,
    /// Deadline of one lookup/read call on a tier, ms.
    pub read_deadline_ms: u64,
    /// Deadline of one write call on a tier, ms.
    pub store_deadline_ms: u64,
    /// Chunks queued per lower tier before stores to it are skipped.
    pub write_queue_chunks: usize,
    /// Per remote tier: chunk keys remembered as written there, so they are not written
    /// again (0: off, every store of a growing prompt re-sends its earlier chunks).
    pub write_dedupe_chunks: usize,
    /// Chunk loads a prefetch runs at once.
    pub prefetch_concurrency: usize,
    /// Disk tier directories.
    pub local_disk: Vec<PathBuf>,
    /// Disk tier budget per path, bytes (config value in GB).
    pub max_local_disk_size: u64,
    /// Disk path sharding.
    pub local_disk_path_sharding: PathSharding,
    /// What an acknowledged disk store survives.
    pub local_disk_durability: DiskDurability,
    /// Write a chunk to disk only once it has been stored this many times.
    pub disk_admit_after: u32,
    /// Remote tiers, consulted in order after local tiers.
    #[serde(serialize_with = "serialize_redacted_urls")]
    pub remote_url: Vec<String>,
    /// `rediss://`: PEM CA bundle to verify servers with (none: the system trust store).
    pub remote_tls_ca_file: Option<PathBuf>,
    /// `rediss://`: PEM client certificate chain for mutual TLS.
    pub remote_tls_cert_file: Option<PathBuf>,
    /// `rediss://`: PEM private key of the client certificate (the path only is ever shown).
    pub remote_tls_key_file: Option<PathBuf>,
    /// `rediss://`: accept any server certificate (testing only; warned about when on).
    pub remote_tls_insecure_skip_verify: bool,
    /// Port of the admin HTTP endpoint (none by default).
    pub admin_port: Option<u16>,
    /// Per-tier bandwidth limits, MB/s (decimal), by tier name (none by default).
    pub tier_max_mbps: Vec<(String, f64)>,
    /// Per-tier operation limits, operations per second, by tier name (none by default).
    pub tier_max_iops: Vec<(String, f64)>,
}

fn serialize_redacted_urls<S: serde::Serializer>(
    urls: &[String],
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.collect_seq(urls.iter().map(|u| redact(u)))
}

impl std::fmt::Debug for EngineConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Through the redacting serializer, so secrets never reach logs.
        match serde_json::to_string(self) {
            Ok(j) => write!(f, "EngineConfig {j}"),
            Err(_) => f.write_str("EngineConfig { .. }"),
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            chunk_size: 256,
            save_unfull_chunk: false,
            local_cpu: true,
            max_local_cpu_size: 5 << 30,
            local_cpu_huge_pages: true,
            local_cpu_prefault: false,
            cache_policy: PolicyKind::Lru,
            pin_timeout_sec: 300.0,
            read_deadline_ms: 2000,
            store_deadline_ms: 30_000,
            write_queue_chunks: 64,
            write_dedupe_chunks: 1 << 18,
            prefetch_concurrency: 8,
            local_disk: Vec::new(),
            max_local_disk_size: 0,
            local_disk_path_sharding: PathSharding::ByRank,
            local_disk_durability: DiskDurability::default(),
            disk_admit_after: 1,
            remote_url: Vec::new(),
            remote_tls_ca_file: None,
            remote_tls_cert_file: None,
            remote_tls_key_file: None,
            remote_tls_insecure_skip_verify: false,
            admin_port: None,
            tier_max_mbps: Vec::new(),
            tier_max_iops: Vec::new(),
        }
    }
}

/// A raw value: from YAML, or a string from the environment.
enum Raw<'a> {
    Yaml(&'a Yaml),
    Env(&'a str),
}

impl Raw<'_> {
    fn show(&self) -> String {
        match self {
            Raw::Env(s) => format!("\"{s}\""),
            Raw::Yaml(Yaml::String(s)) => format!("\"{s}\""),
            Raw::Yaml(Yaml::Integer(i)) => i.to_string(),
            Raw::Yaml(Yaml::Real(r)) => r.clone(),
            Raw::Yaml(Yaml::Boolean(b)) => b.to_string(),
            Raw::Yaml(Yaml::Null) => "null".into(),
            Raw::Yaml(Yaml::Array(_)) => "a list".into(),
            Raw::Yaml(Yaml::Hash(_)) => "a mapping".into(),
            Raw::Yaml(_) => "an unsupported value".into(),
        }
    }

    fn text(&self) -> Option<String> {
        match self {
            Raw::Env(s) => Some(s.trim().to_string()),
            Raw::Yaml(Yaml::String(s)) | Raw::Yaml(Yaml::Real(s)) => Some(s.trim().to_string()),
            Raw::Yaml(Yaml::Integer(i)) => Some(i.to_string()),
            Raw::Yaml(Yaml::Boolean(b)) => Some(b.to_string()),
            _ => None,
        }
    }

    fn bool(&self) -> std::result::Result<bool, String> {
        match self
            .text()
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("true" | "1" | "yes" | "on") => Ok(true),
            Some("false" | "0" | "no" | "off") => Ok(false),
            _ => Err(format!("expected true or false, got {}", self.show())),
        }
    }

    fn u64_in(&self, min: u64, max: u64) -> std::result::Result<u64, String> {
        let t = self
            .text()
            .ok_or_else(|| format!("expected a whole number, got {}", self.show()))?;
        let v: u64 = t
            .replace('_', "")
            .parse()
            .map_err(|_| format!("expected a whole number, got {}", self.show()))?;
        if v < min || v > max {
            return Err(format!("must be between {min} and {max}, got {v}"));
        }
        Ok(v)
    }

    fn f64_in(&self, min: f64, max: f64) -> std::result::Result<f64, String> {
        let t = self
            .text()
            .ok_or_else(|| format!("expected a number, got {}", self.show()))?;
        let v: f64 = t
            .parse()
            .map_err(|_| format!("expected a number, got {}", self.show()))?;
        if v.is_nan() || v < min || v > max {
            return Err(format!("must be between {min} and {max}, got {v}"));
        }
        Ok(v)
    }

    /// A size: a number of GB (GiB, as LMCache counts them) or a string with a unit.
    fn size(&self) -> std::result::Result<u64, String> {
        let t = self.text().ok_or_else(|| {
            format!(
                "expected a size in GB (e.g. 4 or \"512MiB\"), got {}",
                self.show()
            )
        })?;
        let lower = t.to_ascii_lowercase().replace(' ', "");
        let units: [(&str, f64); 9] = [
            ("gib", GIB),
            ("gb", GIB),
            ("g", GIB),
            ("mib", GIB / 1024.0),
            ("mb", GIB / 1024.0),
            ("m", GIB / 1024.0),
            ("kib", 1024.0),
            ("kb", 1024.0),
            ("b", 1.0),
        ];
        let (num, mult) = units
            .iter()
            .find_map(|(u, m)| lower.strip_suffix(u).map(|n| (n.to_string(), *m)))
            .unwrap_or((lower.clone(), GIB));
        let v: f64 = num.parse().map_err(|_| {
            format!(
                "expected a size in GB (e.g. 4 or \"512MiB\"), got {}",
                self.show()
            )
        })?;
        if v.is_nan() || v < 0.0 || v * mult > 1e15 {
            return Err(format!(
                "size must be between 0 and 1 PB, got {}",
                self.show()
            ));
        }
        Ok((v * mult) as u64)
    }

    /// Per-tier numbers: `name=value` comma list (or a YAML mapping / list of them).
    fn per_tier(&self, max: f64) -> std::result::Result<Vec<(String, f64)>, String> {
        let items: Vec<String> = match self {
            Raw::Yaml(Yaml::Hash(h)) => h
                .iter()
                .map(|(k, v)| {
                    let k = Raw::Yaml(k).text().unwrap_or_default();
                    let v = Raw::Yaml(v).text().unwrap_or_default();
                    format!("{k}={v}")
                })
                .collect(),
            _ => self.list()?,
        };
        items
            .iter()
            .map(|item| {
                let (name, v) = item.split_once('=').ok_or_else(|| {
                    format!(
                        "expected tier=number entries (e.g. \"disk=200,redis=50\"), got \"{item}\""
                    )
                })?;
                let name = name.trim();
                if name.is_empty() {
                    return Err(format!("missing tier name in \"{item}\""));
                }
                let v: f64 = v.trim().parse().map_err(|_| {
                    format!("expected a number for tier `{name}`, got \"{}\"", v.trim())
                })?;
                if !(v > 0.0 && v <= max) {
                    return Err(format!(
                        "the limit of tier `{name}` must be above 0 and at most {max}, got {v}"
                    ));
                }
                Ok((name.to_string(), v))
            })
            .collect()
    }

    fn list(&self) -> std::result::Result<Vec<String>, String> {
        match self {
            Raw::Yaml(Yaml::Array(items)) => items
                .iter()
                .map(|y| {
                    Raw::Yaml(y).text().ok_or_else(|| {
                        format!("list items must be strings, got {}", Raw::Yaml(y).show())
                    })
                })
                .collect(),
            Raw::Yaml(Yaml::Null) => Ok(Vec::new()),
            _ => {
                let t = self
                    .text()
                    .ok_or_else(|| format!("expected a string or list, got {}", self.show()))?;
                Ok(t.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect())
            }
        }
    }
}

type Apply = fn(&mut EngineConfig, &Raw<'_>) -> std::result::Result<(), String>;

struct KeyDef {
    name: &'static str,
    aliases: &'static [&'static str],
    apply: Apply,
}

fn disk_paths(raw: &Raw<'_>) -> std::result::Result<Vec<PathBuf>, String> {
    let items = raw.list()?;
    // `local_disk: ","` (or "", or []) used to turn the disk tier off without a word.
    if items.is_empty() && !matches!(raw, Raw::Yaml(Yaml::Null)) {
        return Err(format!(
            "no disk path in {}: write a directory (e.g. local_disk: /var/cache/kvtier; several as a comma list or a YAML list), or leave local_disk out (null in YAML, unset in the environment) to run without a disk tier",
            raw.show()
        ));
    }
    items
        .into_iter()
        .map(|s| {
            let p = s.strip_prefix("file://").unwrap_or(&s).to_string();
            if p.is_empty() {
                return Err("a disk path is empty".to_string());
            }
            Ok(PathBuf::from(p))
        })
        .collect()
}

/// `remote_url`: a list of URLs, or one string of them separated by commas. In a string a
/// comma starts a new URL only where a `scheme://` follows it, so the seed list of a
/// cluster URL (`redis+cluster://h1:p1,h2:p2`) and a comma in a password stay inside
/// their URL, while `redis://a:1,kvtier://b:2` still names two tiers.
fn url_list(raw: &Raw<'_>) -> std::result::Result<Vec<String>, String> {
    match raw {
        Raw::Yaml(Yaml::Array(_)) | Raw::Yaml(Yaml::Null) => raw.list(),
        _ => {
            let t = raw
                .text()
                .ok_or_else(|| format!("expected a string or list, got {}", raw.show()))?;
            Ok(split_url_list(&t))
        }
    }
}

/// Splits `text` at the commas followed by `scheme://` (see [`url_list`]); empty pieces
/// are dropped.
fn split_url_list(text: &str) -> Vec<String> {
    fn starts_url(s: &str) -> bool {
        let Some((scheme, _)) = s.split_once("://") else {
            return false;
        };
        let mut chars = scheme.chars();
        chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    }
    let mut urls: Vec<String> = Vec::new();
    for piece in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match urls.last_mut() {
            Some(url) if !starts_url(piece) => {
                url.push(',');
                url.push_str(piece);
            }
            _ => urls.push(piece.to_string()),
        }
    }
    urls
}

/// A TLS file path; empty (or null) means unset.
fn tls_path(raw: &Raw<'_>) -> std::result::Result<Option<PathBuf>, String> {
    match raw {
        Raw::Yaml(Yaml::Null) => Ok(None),
        _ => {
            let t = raw
                .text()
                .ok_or_else(|| format!("expected a file path, got {}", raw.show()))?;
            Ok((!t.is_empty()).then(|| PathBuf::from(t)))
        }
    }
}

const KEYS: &[KeyDef] = &[
    KeyDef {
        name: "chunk_size",
        aliases: &[],
        apply: |c, v| {
            c.chunk_size = v.u64_in(1, 1 << 20)? as usize;
            Ok(())
        },
    },
    KeyDef {
        name: "save_unfull_chunk",
        aliases: &[],
        apply: |c, v| {
            c.save_unfull_chunk = v.bool()?;
            Ok(())
        },
    },
    KeyDef {
        name: "local_cpu",
        aliases: &[],
        apply: |c, v| {
            c.local_cpu = v.bool()?;
            Ok(())
        },
    },
    KeyDef {
        name: "max_local_cpu_size",
        aliases: &[],
        apply: |c, v| {
            let s = v.size()?;
            if s < 4096 {
                return Err(format!("must be at least 4 KiB, got {s} bytes"));
            }
            c.max_local_cpu_size = s;
            Ok(())
        },
    },
    KeyDef {
        name: "local_cpu_huge_pages",
        aliases: &["local_cpu_use_hugepages"],
        apply: |c, v| {
            c.local_cpu_huge_pages = v.bool()?;
            Ok(())
        },
    },
    KeyDef {
        name: "local_cpu_prefault",
        aliases: &[],
        apply: |c, v| {
            c.local_cpu_prefault = v.bool()?;
            Ok(())
        },
    },
    KeyDef {
        name: "cache_policy",
        aliases: &[],
        apply: |c, v| {
            let t = v.text().unwrap_or_default();
            c.cache_policy = t
                .parse()
                .map_err(|e: Error| e.to_string().replace("invalid input: ", ""))?;
            Ok(())
        },
    },
    KeyDef {
        name: "pin_timeout_sec",
        aliases: &[],
        apply: |c, v| {
            c.pin_timeout_sec = v.f64_in(0.001, 86_400.0)?;
            Ok(())
        },
    },
    KeyDef {
        name: "read_deadline_ms",
        aliases: &[],
        apply: |c, v| {
            c.read_deadline_ms = v.u64_in(1, 600_000)?;
            Ok(())
        },
    },
    KeyDef {
        name: "blocking_timeout_secs",
        aliases: &[],
        apply: |c, v| {
            c.read_deadline_ms = (v.f64_in(0.001, 600.0)? * 1000.0) as u64;
            Ok(())
        },
    },
    KeyDef {
        name: "store_deadline_ms",
        aliases: &[],
        apply: |c, v| {
            c.store_deadline_ms = v.u64_in(1, 3_600_000)?;
            Ok(())
        },
    },
    KeyDef {
        name: "write_queue_chunks",
        aliases: &[],
        apply: |c, v| {
            c.write_queue_chunks = v.u64_in(1, 1 << 20)? as usize;
            Ok(())
        },
    },
    KeyDef {
        name: "write_dedupe_chunks",
        aliases: &[],
        apply: |c, v| {
            c.write_dedupe_chunks = v.u64_in(0, 1 << 26)? as usize;
            Ok(())
        },
    },
    KeyDef {
        name: "tier_max_mbps",
        aliases: &[],
        apply: |c, v| {
            c.tier_max_mbps = v.per_tier(1e7)?;
            Ok(())
        },
    },
    KeyDef {
        name: "tier_max_iops",
        aliases: &[],
        apply: |c, v| {
            c.tier_max_iops = v.per_tier(1e9)?;
            Ok(())
        },
    },
    KeyDef {
        name: "prefetch_concurrency",
        aliases: &[],
        apply: |c, v| {
            c.prefetch_concurrency = v.u64_in(1, 1024)? as usize;
            Ok(())
        },
    },
    KeyDef {
        name: "local_disk",
        aliases: &[],
        apply: |c, v| {
            c.local_disk = disk_paths(v)?;
            Ok(())
        },
    },
    KeyDef {
        name: "max_local_disk_size",
        aliases: &[],
        apply: |c, v| {
            c.max_local_disk_size = v.size()?;
            Ok(())
        },
    },
    KeyDef {
        name: "local_disk_path_sharding",
        aliases: &[],
        apply: |c, v| {
            c.local_disk_path_sharding =
                match v.text().unwrap_or_default().to_ascii_lowercase().as_str() {
                    "by_rank" | "by_gpu" => PathSharding::ByRank,
                    "striped" => PathSharding::Striped,
                    _ => {
                        return Err(format!(
                            "expected by_rank (alias by_gpu) or striped, got {}",
                            v.show()
                        ))
                    }
                };
            Ok(())
        },
    },
    KeyDef {
        name: "local_disk_durability",
        aliases: &[],
        apply: |c, v| {
            c.local_disk_durability =
                match v.text().unwrap_or_default().to_ascii_lowercase().as_str() {
                    "power_loss" => DiskDurability::PowerLoss,
                    "process_crash" => DiskDurability::ProcessCrash,
                    _ => {
                        return Err(format!(
                        "expected process_crash (the default) or power_loss (flush before acknowledging), got {}",
                        v.show()
                    ))
                    }
                };
            Ok(())
        },
    },
    KeyDef {
        name: "disk_admit_after",
        aliases: &["ssd_gate_min_access_count"],
        apply: |c, v| {
            c.disk_admit_after = v.u64_in(1, 1000)? as u32;
            Ok(())
        },
    },
    KeyDef {
        name: "remote_url",
        aliases: &[],
        apply: |c, v| {
            c.remote_url = url_list(v)?;
            Ok(())
        },
    },
    KeyDef {
        name: "remote_tls_ca_file",
        aliases: &[],
        apply: |c, v| {
            c.remote_tls_ca_file = tls_path(v)?;
            Ok(())
        },
    },
    KeyDef {
        name: "remote_tls_cert_file",
        aliases: &[],
        apply: |c, v| {
            c.remote_tls_cert_file = tls_path(v)?;
            Ok(())
        },
    },
    KeyDef {
        name: "remote_tls_key_file",
        aliases: &[],
        apply: |c, v| {
            c.remote_tls_key_file = tls_path(v)?;
            Ok(())
        },
    },
    KeyDef {
        name: "remote_tls_insecure_skip_verify",
        aliases: &[],
        apply: |c, v| {
            c.remote_tls_insecure_skip_verify = v.bool()?;
            Ok(())
        },
    },
    KeyDef {
        name: "admin_port",
        aliases: &[],
        apply: |c, v| {
            c.admin_port = Some(v.u64_in(1, 65535)? as u16);
            Ok(())
        },
    },
];

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The definition of a (lower-case) key or alias.
fn find_key(norm: &str) -> Option<&'static KeyDef> {
    KEYS.iter()
        .find(|k| k.name == norm || k.aliases.contains(&norm))
}

fn unknown_key(key: &str, source: &str) -> Error {
    let all = KEYS
        .iter()
        .flat_map(|k| std::iter::once(k.name).chain(k.aliases.iter().copied()));
    let best = all.map(|n| (edit_distance(key, n), n)).min();
    let hint = match best {
        Some((d, n)) if d <= 3 => format!(" (did you mean `{n}`?)"),
        _ => String::new(),
    };
    let names: Vec<&str> = KEYS.iter().map(|k| k.name).collect();
    Error::config(
        key,
        format!(
            "unknown key{source}{hint}; known keys: {}",
            names.join(", ")
        ),
    )
}

/// Logs configuration warnings (LMCache keys ignored, stray environment variables).
fn log_warnings(warnings: Vec<String>) {
    for w in warnings {
        tracing::warn!("{w}");
    }
}

impl EngineConfig {
    /// Sets one key. An LMCache key kvtier has no use for is ignored with a warning (pushed
    /// on `warnings`) or refused when its value asks for what kvtier does not do; any other
    /// unknown key is an error.
    fn set(
        &mut self,
        key: &str,
        raw: &Raw<'_>,
        source: &str,
        warnings: &mut Vec<String>,
    ) -> Result<()> {
        let norm = key.trim().to_ascii_lowercase();
        let Some(def) = find_key(&norm) else {
            return match lmcache::foreign(&norm, raw) {
                Some(lmcache::Foreign::Ignored(w)) => {
                    warnings.push(format!("{w}{source}"));
                    Ok(())
                }
                Some(lmcache::Foreign::Refused(m)) => {
                    Err(Error::config(key, format!("{m}{source}")))
                }
                None => Err(unknown_key(key, source)),
            };
        };
        (def.apply)(self, raw).map_err(|m| Error::config(key, format!("{m}{source}")))
    }

    /// Parses YAML (or JSON) text; keys not given keep their defaults. Warnings (LMCache
    /// keys that kvtier ignores) are logged.
    pub fn from_yaml_str(text: &str) -> Result<EngineConfig> {
        let (cfg, warnings) = EngineConfig::from_yaml_str_with_warnings(text)?;
        log_warnings(warnings);
        Ok(cfg)
    }

    /// [`EngineConfig::from_yaml_str`] that returns the warnings instead of logging them.
    pub fn from_yaml_str_with_warnings(text: &str) -> Result<(EngineConfig, Vec<String>)> {
        let mut cfg = EngineConfig::default();
        let mut warnings = Vec::new();
        cfg.apply_yaml(text, "", &mut warnings)?;
        cfg.validate()?;
        Ok((cfg, warnings))
    }

    fn apply_yaml(&mut self, text: &str, source: &str, warnings: &mut Vec<String>) -> Result<()> {
        let docs = YamlLoader::load_from_str(text)
            .map_err(|e| Error::config("<file>", format!("not valid YAML{source}: {e}")))?;
        let Some(doc) = docs.into_iter().next() else {
            return Ok(());
        };
        let map = match doc {
            Yaml::Hash(h) => h,
            Yaml::Null => return Ok(()),
            _ => {
                return Err(Error::config(
                    "<file>",
                    format!("the top level must be a mapping of keys to values{source}"),
                ))
            }
        };
        for (k, v) in &map {
            let key = k.as_str().ok_or_else(|| {
                Error::config(
                    format!("{k:?}"),
                    format!("config keys must be strings{source}"),
                )
            })?;
            self.set(key, &Raw::Yaml(v), source, warnings)?;
        }
        Ok(())
    }

    /// Applies `(key, value)` string pairs (e.g. from a CLI or Python dict).
    pub fn apply_pairs<'a>(
        &mut self,
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<()> {
        let mut warnings = Vec::new();
        for (k, v) in pairs {
            self.set(k, &Raw::Env(v), "", &mut warnings)?;
        }
        log_warnings(warnings);
        self.validate()
    }

    /// Applies `KVTIER_<KEY>` variables from `vars` (normally `std::env::vars()`).
    /// Variables that are neither config keys nor on [`ENV_VARS`]/[`ENV_TOOL_VARS`] are
    /// skipped and returned as warnings: a stray variable never stops the engine. A bad
    /// value of a real key is an error.
    ///
    /// LMCache's `LMCACHE_<KEY>` variables are applied first (so `KVTIER_<KEY>` wins), each
    /// with a deprecation warning; those of LMCache keys kvtier has no use for are ignored
    /// with a warning, other `LMCACHE_*` variables silently.
    pub fn apply_env(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Vec<String>> {
        let vars: Vec<(String, String)> = vars.into_iter().collect();
        let mut warnings = Vec::new();
        for (name, value) in &vars {
            let Some(rest) = name.strip_prefix(lmcache::LMCACHE_ENV_PREFIX) else {
                continue;
            };
            let key = rest.to_ascii_lowercase();
            let source = format!(" (from environment variable {name})");
            if find_key(&key).is_some() {
                self.set(&key, &Raw::Env(value), &source, &mut warnings)?;
                warnings.push(format!(
                    "environment variable {name} is deprecated: read as config key {key}; \
                     name it {ENV_PREFIX}{rest}"
                ));
            } else if lmcache::is_lmcache_key(&key) {
                self.set(&key, &Raw::Env(value), &source, &mut warnings)?;
            }
        }
        for (name, value) in &vars {
            match classify_env(name) {
                EnvKind::Key(key) => {
                    let source = format!(" (from environment variable {name})");
                    self.set(&key, &Raw::Env(value), &source, &mut warnings)?;
                }
                EnvKind::Unknown { warning } => warnings.push(warning),
                EnvKind::NotKey | EnvKind::Other => {}
            }
        }
        self.validate()?;
        Ok(warnings)
    }

    /// Loads the file given (or named by `KVTIER_CONFIG_FILE`, or, deprecated, by LMCache's
    /// `LMCACHE_CONFIG_FILE`), then environment overrides; warnings are logged.
    pub fn load(path: Option<&Path>) -> Result<EngineConfig> {
        let (cfg, warnings) = EngineConfig::load_with_warnings(path)?;
        log_warnings(warnings);
        Ok(cfg)
    }

    /// [`EngineConfig::load`] that returns the warnings instead of logging them.
    pub fn load_with_warnings(path: Option<&Path>) -> Result<(EngineConfig, Vec<String>)> {
        let mut cfg = EngineConfig::default();
        let mut warnings = Vec::new();
        let from_env = std::env::var_os(CONFIG_FILE_ENV).map(PathBuf::from);
        let from_lmcache = || {
            let p = std::env::var_os(lmcache::LMCACHE_CONFIG_FILE_ENV).map(PathBuf::from)?;
            warnings.push(format!(
                "reading the config file named by {} (deprecated): name it with --config or {CONFIG_FILE_ENV}",
                lmcache::LMCACHE_CONFIG_FILE_ENV
            ));
            Some(p)
        };
        let file = path
            .map(Path::to_path_buf)
            .or(from_env)
            .or_else(from_lmcache);
        if let Some(p) = file {
            let text = std::fs::read_to_string(&p)
                .map_err(|e| Error::io(format!("reading config file {}", p.display()), e))?;
            cfg.apply_yaml(&text, &format!(" (in {})", p.display()), &mut warnings)?;
        }
        warnings.extend(cfg.apply_env(std::env::vars())?);
        Ok((cfg, warnings))
    }

    /// Cross-key checks.
    pub fn validate(&self) -> Result<()> {
        if let Some(url) = self.remote_url.iter().find(|u| {
            u.trim()
                .get(..5)
                .is_some_and(|s| s.eq_ignore_ascii_case("lm://"))
        }) {
            return Err(Error::config(
                "remote_url",
                format!(
                    "{} is LMCache's cache server, whose protocol kvtier does not speak; run \
                     `kvtier serve --tcp HOST:PORT` there and use kvtier://HOST:PORT",
                    redact(url)
                ),
            ));
        }
        if !self.local_disk.is_empty() && self.max_local_disk_size == 0 {
            return Err(Error::config(
                "max_local_disk_size",
                "local_disk is set but max_local_disk_size is 0; give the disk budget per path in GB",
            ));
        }
        match (&self.remote_tls_cert_file, &self.remote_tls_key_file) {
            (Some(_), None) => return Err(Error::config(
                "remote_tls_key_file",
                "remote_tls_cert_file is set but remote_tls_key_file is not; mutual TLS needs both",
            )),
            (None, Some(_)) => return Err(Error::config(
                "remote_tls_cert_file",
                "remote_tls_key_file is set but remote_tls_cert_file is not; mutual TLS needs both",
            )),
            _ => {}
        }
        Ok(())
    }

    /// Every accepted key name (aliases included).
    pub fn known_keys() -> Vec<&'static str> {
        KEYS.iter()
            .flat_map(|k| std::iter::once(k.name).chain(k.aliases.iter().copied()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lmcache_style_file_parses() {
        let c = EngineConfig::from_yaml_str(
            "chunk_size: 256\nlocal_cpu: true\nmax_local_cpu_size: 2.5\nlocal_disk: \"file:///a,/b\"\nmax_local_disk_size: 10\nsave_unfull_chunk: true\nremote_url: redis://h:6379\ncache_policy: S3FIFO\nlocal_cpu_use_hugepages: false\n",
        )
        .unwrap();
        assert_eq!(c.max_local_cpu_size, (2.5 * GIB) as u64);
        assert_eq!(c.local_disk, vec![PathBuf::from("/a"), PathBuf::from("/b")]);
        assert_eq!(c.max_local_disk_size, 10 << 30);
        assert!(c.save_unfull_chunk && !c.local_cpu_huge_pages);
        assert_eq!(c.cache_policy, PolicyKind::S3Fifo);
        assert_eq!(c.remote_url, vec!["redis://h:6379".to_string()]);
    }

    #[test]
    fn a_cluster_seed_list_in_a_string_stays_one_url() {
        let urls = |yaml: &str| EngineConfig::from_yaml_str(yaml).unwrap().remote_url;
        assert_eq!(
            urls("remote_url: redis+cluster://h1:7000,h2:7001/?prefix=kv-"),
            ["redis+cluster://h1:7000,h2:7001/?prefix=kv-"]
        );
        // Several URLs in one string still split, spaces and empty entries allowed.
        assert_eq!(
            urls("remote_url: \"redis+cluster://a:1, b:2,,kvtier://n:7070 , rediss://c:3\""),
            ["redis+cluster://a:1,b:2", "kvtier://n:7070", "rediss://c:3"]
        );
        assert_eq!(
            urls("remote_url: redis://a:1,redis://b:2"),
            ["redis://a:1", "redis://b:2"]
        );
        // A comma inside a password does not cut the URL.
        assert_eq!(urls("remote_url: redis://u:p,w@h:1"), ["redis://u:p,w@h:1"]);
        // A list keeps each item whole; the environment splits like a string.
        assert_eq!(
            urls("remote_url: [\"redis+cluster://a:1,b:2\", \"redis://c:3\"]"),
            ["redis+cluster://a:1,b:2", "redis://c:3"]
        );
        let mut c = EngineConfig::default();
        c.apply_env([(
            "KVTIER_REMOTE_URL".to_string(),
            "redis+cluster://a:1,b:2,redis://c:3".to_string(),
        )])
        .unwrap();
        assert_eq!(c.remote_url, ["redis+cluster://a:1,b:2", "redis://c:3"]);
    }

    #[test]
    fn credentials_never_show_in_debug_or_serialized_config() {
        let c = EngineConfig::from_yaml_str("remote_url: redis://user:hunter2@h:6379/0").unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!serde_json::to_string(&c).unwrap().contains("hunter2"));
        assert_eq!(
            c.remote_url[0], "redis://user:hunter2@h:6379/0",
            "the value itself is kept"
        );
        let c = EngineConfig::from_yaml_str(
            "remote_url: [\"redis://:pw1@h:1\", \"kvtier://tok-secret@n2:7070\"]",
        )
        .unwrap();
        for s in [format!("{c:?}"), serde_json::to_string(&c).unwrap()] {
            assert!(!s.contains("pw1") && !s.contains("tok-secret"), "{s}");
            assert!(s.contains("kvtier://:***@n2:7070"), "{s}");
        }
    }

    #[test]
    fn disk_durability_defaults_to_process_crash_and_rejects_other_words() {
        assert_eq!(
            EngineConfig::default().local_disk_durability,
            DiskDurability::ProcessCrash
        );
        let c = EngineConfig::from_yaml_str("local_disk_durability: power_loss").unwrap();
        assert_eq!(c.local_disk_durability, DiskDurability::PowerLoss);
        let e = EngineConfig::from_yaml_str("local_disk_durability: fast")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("local_disk_durability") && e.contains("process_crash"),
            "{e}"
        );
    }

    #[test]
    fn tls_keys_from_file_and_env() {
        let mut c = EngineConfig::from_yaml_str(
            "remote_url: rediss://h:6380\nremote_tls_ca_file: /etc/ca.pem\n",
        )
        .unwrap();
        assert_eq!(c.remote_tls_ca_file, Some(PathBuf::from("/etc/ca.pem")));
        c.apply_env([
            (
                "KVTIER_REMOTE_TLS_CERT_FILE".to_string(),
                "/c.pem".to_string(),
            ),
            (
                "KVTIER_REMOTE_TLS_KEY_FILE".to_string(),
                "/k.pem".to_string(),
            ),
            (
                "KVTIER_REMOTE_TLS_INSECURE_SKIP_VERIFY".to_string(),
                "yes".to_string(),
            ),
        ])
        .unwrap();
        assert_eq!(c.remote_tls_cert_file, Some(PathBuf::from("/c.pem")));
        assert_eq!(c.remote_tls_key_file, Some(PathBuf::from("/k.pem")));
        assert!(c.remote_tls_insecure_skip_verify);
        // Paths may show in dumps; they are not secrets.
        assert!(format!("{c:?}").contains("/k.pem"));
        let e = EngineConfig::from_yaml_str("remote_tls_cert_file: /c.pem")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("remote_tls_key_file") && e.contains("needs both"),
            "{e}"
        );
        let e = EngineConfig::from_yaml_str("remote_tls_ca_fil: /c.pem")
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean `remote_tls_ca_file`"), "{e}");
    }

    #[test]
    fn json_is_accepted_too() {
        let c =
            EngineConfig::from_yaml_str(r#"{"chunk_size": 64, "max_local_cpu_size": "256MiB"}"#)
                .unwrap();
        assert_eq!((c.chunk_size, c.max_local_cpu_size), (64, 256 << 20));
    }

    #[test]
    fn errors_name_the_key_and_what_is_allowed() {
        let e = EngineConfig::from_yaml_str("chunk_size: -3")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("chunk_size") && e.contains("whole number"),
            "{e}"
        );
        let e = EngineConfig::from_yaml_str("cache_policy: arc")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cache_policy") && e.contains("lru, s3fifo"),
            "{e}"
        );
        let e = EngineConfig::from_yaml_str("max_local_cpu_size: lots")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_local_cpu_size") && e.contains("GB"), "{e}");
        let e = EngineConfig::from_yaml_str("local_disk: /x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_local_disk_size"), "{e}");
        let e = EngineConfig::from_yaml_str("- a\n- b")
            .unwrap_err()
            .to_string();
        assert!(e.contains("mapping"), "{e}");
        let e = EngineConfig::from_yaml_str("chunk_size: [1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("YAML"), "{e}");
    }

    #[test]
    fn an_empty_disk_path_list_is_an_error_not_a_silently_disabled_tier() {
        for yaml in [
            "local_disk: \",\"",
            "local_disk: \" , \"",
            "local_disk: \"\"",
            "local_disk: []",
        ] {
            let e = EngineConfig::from_yaml_str(&format!("{yaml}\nmax_local_disk_size: 1"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("local_disk")
                    && e.contains("no disk path")
                    && e.contains("/var/cache/kvtier"),
                "{yaml}: {e}"
            );
        }
        let e = EngineConfig::default()
            .apply_env([("KVTIER_LOCAL_DISK".to_string(), ",".to_string())])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("KVTIER_LOCAL_DISK") && e.contains("no disk path"),
            "{e}"
        );
        // Null (or leaving the key out) is the way to run without a disk tier.
        for yaml in ["local_disk: null", "local_disk:", "local_disk: ~"] {
            assert!(EngineConfig::from_yaml_str(yaml)
                .unwrap()
                .local_disk
                .is_empty());
        }
        let c =
            EngineConfig::from_yaml_str("local_disk: \"/a,,/b\"\nmax_local_disk_size: 1").unwrap();
        assert_eq!(c.local_disk.len(), 2);
    }

    #[test]
    fn env_overrides_file_and_stray_variables_only_warn() {
        let mut c = EngineConfig::from_yaml_str("chunk_size: 64").unwrap();
        let warnings = c
            .apply_env([
                ("KVTIER_CHUNK_SIZE".to_string(), "32".to_string()),
                ("KVTIER_LOCAL_CPU".to_string(), "false".to_string()),
                (
                    "KVTIER_LOCAL_CPU_USE_HUGEPAGES".to_string(),
                    "0".to_string(),
                ),
                ("KVTIER_AUTH_TOKEN".to_string(), "secret".to_string()),
                ("KVTIER_LOG".to_string(), "debug".to_string()),
                // Set by .ci/run for the whole test run, and by bench/compare users.
                ("KVTIER_REQUIRE_TEST_SERVERS".to_string(), "1".to_string()),
                ("KVTIER_COMPARE_VENV".to_string(), "/tmp/v".to_string()),
                ("OTHER".to_string(), "x".to_string()),
            ])
            .unwrap();
        assert_eq!(warnings, Vec::<String>::new());
        assert_eq!(c.chunk_size, 32);
        assert!(!c.local_cpu && !c.local_cpu_huge_pages);
        // A typo warns, naming the closest key, and changes nothing.
        let before = c.clone();
        let warnings = c
            .apply_env([
                ("KVTIER_MAX_LOCAL_CPU_SIZ".to_string(), "1".to_string()),
                ("KVTIER_AUTH_TOKN".to_string(), "x".to_string()),
                (
                    "KVTIER_SOMETHING_ELSE_ENTIRELY".to_string(),
                    "x".to_string(),
                ),
            ])
            .unwrap();
        assert_eq!(c, before);
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        assert!(
            warnings[0].contains("KVTIER_MAX_LOCAL_CPU_SIZ")
                && warnings[0].contains("did you mean KVTIER_MAX_LOCAL_CPU_SIZE?"),
            "{warnings:?}"
        );
        assert!(
            warnings[1].contains("did you mean KVTIER_AUTH_TOKEN?"),
            "{warnings:?}"
        );
        assert!(
            warnings[2].contains("KVTIER_SOMETHING_ELSE_ENTIRELY")
                && warnings[2].contains("closest kvtier variable is KVTIER_"),
            "{warnings:?}"
        );
        // A bad value of a real key is still an error naming the variable.
        let e = c
            .apply_env([("KVTIER_CHUNK_SIZE".to_string(), "lots".to_string())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("KVTIER_CHUNK_SIZE"), "{e}");
    }

    #[test]
    fn env_lists_do_not_shadow_config_keys() {
        for name in ENV_VARS
            .iter()
            .map(|v| v.name)
            .chain(ENV_TOOL_VARS.iter().copied())
        {
            let key = name.strip_prefix(ENV_PREFIX).unwrap().to_ascii_lowercase();
            assert!(find_key(&key).is_none(), "{name} is also a config key");
            assert_eq!(classify_env(name), EnvKind::NotKey);
        }
        for key in EngineConfig::known_keys() {
            let name = format!("KVTIER_{}", key.to_ascii_uppercase());
            assert_eq!(classify_env(&name), EnvKind::Key(key.to_string()));
        }
        assert_eq!(classify_env("PATH"), EnvKind::Other);
    }

    #[test]
    fn lmcache_keys_without_kvtier_meaning_warn_and_features_are_refused() {
        let (c, w) = EngineConfig::from_yaml_str_with_warnings(
            "chunk_size: 256\nremote_serde: naive\nsave_decode_cache: false\nuse_layerwise: true\nextra_config: {use_odirect: true}\n",
        )
        .unwrap();
        assert_eq!(c.chunk_size, 256);
        assert_eq!(w.len(), 3 + 1, "{w:?}");
        for key in [
            "remote_serde",
            "save_decode_cache",
            "use_layerwise",
            "extra_config",
        ] {
            assert!(
                w.iter().any(|w| w.contains(key) && w.contains("ignored")),
                "{key}: {w:?}"
            );
        }
        for (yaml, key) in [
            ("remote_serde: cachegen", "remote_serde"),
            ("enable_blending: true", "enable_blending"),
            ("enable_pd: True", "enable_pd"),
        ] {
            let e = EngineConfig::from_yaml_str(yaml).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains("cannot honour"), "{e}");
        }
        // A typo is still an error, not an LMCache key.
        let e = EngineConfig::from_yaml_str("remote_serd: naive")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown key"), "{e}");
    }

    #[test]
    fn lm_urls_are_refused_naming_kvtier_urls() {
        let e = EngineConfig::from_yaml_str("remote_url: lm://cache-host:65432")
            .unwrap_err()
            .to_string();
        assert!(e.contains("LMCache") && e.contains("kvtier://"), "{e}");
    }

    #[test]
    fn lmcache_env_is_read_with_a_deprecation_warning_and_kvtier_env_wins() {
        let mut c = EngineConfig::default();
        let w = c
            .apply_env([
                ("LMCACHE_CHUNK_SIZE".to_string(), "64".to_string()),
                ("LMCACHE_MAX_LOCAL_CPU_SIZE".to_string(), "2".to_string()),
                ("KVTIER_MAX_LOCAL_CPU_SIZE".to_string(), "1".to_string()),
                ("LMCACHE_REMOTE_SERDE".to_string(), "naive".to_string()),
                ("LMCACHE_LOG_LEVEL".to_string(), "WARNING".to_string()),
            ])
            .unwrap();
        assert_eq!(c.chunk_size, 64);
        assert_eq!(c.max_local_cpu_size, 1 << 30);
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(
            w.iter()
                .any(|w| w.contains("LMCACHE_CHUNK_SIZE is deprecated")
                    && w.contains("KVTIER_CHUNK_SIZE")),
            "{w:?}"
        );
        assert!(w.iter().any(|w| w.contains("remote_serde")), "{w:?}");
        let e = c
            .apply_env([("LMCACHE_ENABLE_BLENDING".to_string(), "true".to_string())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("LMCACHE_ENABLE_BLENDING"), "{e}");
    }
}
