//! Python bindings of the kvtier engine (`kvtier._native`, re-exported by the `kvtier`
//! package in `python/kvtier`).
//!
//! KV payloads cross the boundary without copies: numpy arrays (and anything else with the
//! buffer protocol) are read through `PyObject_GetBuffer`, CPU torch tensors through their
//! `data_ptr()`. The GIL is released while the engine works.
//!
//! Every operation goes through the [`kvtier::KvCache`] trait, so the embedded engine and a
//! client of a `kvtier serve` server are interchangeable behind one Python class.
//!
//! Built against the stable ABI (`abi3-py310`): one wheel loads on every CPython >= 3.10.
//! Embedded engines also lend their L1 pool memory to zero-copy GPU transfers
//! (`pool_region`, `acquire`, `begin_store`; see `kvtier.transfer.PoolMemory`).

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use kvtier::keys::{KeySpace, ModelIdentity};
use kvtier::layout::{Dtype, KvLayout, LayerGroup};
use kvtier::tier::{ResidencyChange, ResidencyLog, DISK_TIER_NAME};
use kvtier::{Engine, EngineConfig, KvCache, PendingLoad};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

pyo3::create_exception!(
    _native,
    KvTierError,
    PyRuntimeError,
    "An error reported by the kvtier engine; the message is the engine's."
);

mod buffer;
mod tokens;

use buffer::ByteView;
use tokens::tokens_of;

fn engine_err(e: kvtier::Error) -> PyErr {
    KvTierError::new_err(e.to_string())
}

/// vLLM's KV-event medium of L1's chunks (Dynamo maps it to host memory).
const MEDIUM_L1: &str = "CPU";
/// vLLM's KV-event medium of the disk tier's chunks (Dynamo maps it to its disk tier).
const MEDIUM_DISK: &str = "STORAGE";

/// What `take_residency_changes` returns: the media whose log overflowed, and the changes
/// as `(stored, key_hex, medium)`.
type ResidencyTake = (Vec<&'static str>, Vec<(bool, String, &'static str)>);

// ---------------------------------------------------------------------------------------
// Configuration and identity.

fn value_text(v: &Bound<'_, PyAny>) -> PyResult<String> {
    if let Ok(b) = v.extract::<bool>() {
        return Ok(if b { "true" } else { "false" }.into());
    }
    if let Ok(l) = v.downcast::<PyList>() {
        let parts: PyResult<Vec<String>> = l.iter().map(|x| value_text(&x)).collect();
        return Ok(parts?.join(","));
    }
    Ok(v.str()?.to_string())
}

enum Backend {
    // Boxed: the config is large, the server address small.
    Embedded(Box<EngineConfig>),
    Server(String),
}

fn config_of(py: Python<'_>, config: Option<&Bound<'_, PyAny>>) -> PyResult<Backend> {
    let Some(config) = config.filter(|c| !c.is_none()) else {
        return EngineConfig::load(None)
            .map(|c| Backend::Embedded(Box::new(c)))
            .map_err(engine_err);
    };
    if let Ok(d) = config.downcast::<PyDict>() {
        let mut pairs = Vec::new();
        let mut server = None;
        for (k, v) in d.iter() {
            let key: String = k.extract()?;
            if v.is_none() {
                continue;
            }
            if key == "server" {
                server = Some(value_text(&v)?);
                continue;
            }
            pairs.push((key, value_text(&v)?));
        }
        if let Some(addr) = server {
            if !pairs.is_empty() {
                let keys: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
                return Err(PyValueError::new_err(format!(
                    "config key `server` selects a kvtier server, which owns its own tiers; the keys {keys:?} configure an embedded engine and cannot be combined with it"
                )));
            }
            return Ok(Backend::Server(addr));
        }
        let mut cfg = EngineConfig::default();
        cfg.apply_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .map_err(engine_err)?;
        return Ok(Backend::Embedded(Box::new(cfg)));
    }
    let os = py.import("os")?;
    let path: String = os
        .call_method1("fspath", (config,))
        .map_err(|_| PyTypeError::new_err("config must be a dict, a path to a YAML file, or None"))?
        .extract()?;
    EngineConfig::load(Some(std::path::Path::new(&path)))
        .map(|c| Backend::Embedded(Box::new(c)))
        .map_err(engine_err)
}

/// Parses an identity dict shaped like `docs/key-vectors.json`'s `identity` objects.
fn identity_of(py: Python<'_>, d: &Bound<'_, PyAny>) -> PyResult<ModelIdentity> {
    let json: String = py.import("json")?.call_method1("dumps", (d,))?.extract()?;
    let mut v: serde_json::Value =
        serde_json::from_str(&json).map_err(|e| PyValueError::new_err(format!("identity: {e}")))?;
    if let Some(o) = v.as_object_mut() {
        // Defaults for everything but the model name and layout.
        o.entry("model_revision").or_insert(serde_json::Value::Null);
        for (k, def) in [
            ("world_size", 1),
            ("rank", 0),
            ("pp_size", 1),
            ("pp_rank", 0),
        ] {
            o.entry(k).or_insert(def.into());
        }
        if let Some(l) = o.get_mut("layout").and_then(|l| l.as_object_mut()) {
            l.entry("tag").or_insert("layer-major".into());
            if let Some(gs) = l.get_mut("groups").and_then(|g| g.as_array_mut()) {
                for g in gs.iter_mut().filter_map(|g| g.as_object_mut()) {
                    g.entry("planes").or_insert(2.into());
                }
            }
        }
    }
    let id: ModelIdentity = serde_json::from_value(v).map_err(|e| {
        PyValueError::new_err(format!(
            "identity: {e} (expected {{model_name, model_revision?, world_size?, rank?, pp_size?, pp_rank?, replicated?, layout: {{tag?, groups: [{{num_layers, num_kv_heads, head_dim, dtype, planes?}}]}}}})"
        ))
    })?;
    id.validate().map_err(engine_err)?;
    Ok(id)
}

fn dtype_of(s: &str) -> PyResult<Dtype> {
    Dtype::parse(s).map_err(engine_err)
}

/// The chunk keys of `tokens` (hex strings), per docs/key-spec.md.
#[pyfunction]
#[pyo3(signature = (identity, chunk_size, save_unfull_chunk, salt, tokens))]
fn chunk_keys(
    py: Python<'_>,
    identity: &Bound<'_, PyAny>,
    chunk_size: usize,
    save_unfull_chunk: bool,
    salt: Option<String>,
    tokens: &Bound<'_, PyAny>,
) -> PyResult<Vec<String>> {
    let id = identity_of(py, identity)?;
    let ks = KeySpace::new(id, chunk_size, save_unfull_chunk).map_err(engine_err)?;
    let toks = tokens_of(tokens)?;
    let spans = py
        .allow_threads(|| ks.chunk_spans(&toks, salt.as_deref()))
        .map_err(engine_err)?;
    Ok(spans.iter().map(|s| s.key.to_hex()).collect())
}

// ---------------------------------------------------------------------------------------
// Engine.

/// A kvtier cache handle: an embedded engine, or (with `config={"server": addr}`) a client
/// of a `kvtier serve` server.
#[pyclass(module = "kvtier._native", name = "Engine", frozen)]
struct PyEngine {
    cache: Arc<dyn KvCache>,
    embedded: Option<Arc<Engine>>,
    identity: ModelIdentity,
    server: Option<String>,
    /// The admin HTTP endpoint of an embedded engine with `admin_port` configured; it stops
    /// when the engine is dropped.
    _admin: Option<kvtier_server::admin::AdminHandle>,
    /// (address, bytes) of an embedded engine's L1 pool mapping.
    pool: Option<(usize, usize)>,
    /// Whether a prompt's trailing partial chunk is stored and found (the engine's config,
    /// or the server's: its handshake says).
    save_unfull_chunk: bool,
    /// The residency changes of each watched tier with its vLLM medium (L1: `CPU`, the
    /// disk tier: `STORAGE`), once `watch_residency` was called (embedded engines).
    residency: OnceLock<Vec<(&'static str, Arc<ResidencyLog>)>>,
}

/// Where an engine's L1 pool is mapped: the address of a probe buffer less its offset in
/// the pool (the pool is empty when this runs, right after the engine is opened).
fn pool_region_of(engine: &Engine) -> Option<(usize, usize)> {
    let pool = engine.manager().pool();
    let mut probe = pool.try_alloc(1)?;
    let base = probe.as_mut_capacity().as_mut_ptr() as usize - probe.offset() as usize;
    Some((base, pool.capacity() as usize))
}

#[pymethods]
impl PyEngine {
    /// Engine(config=None, *, identity=None, model="kvtier/model", layers=..., kv_heads=...,
    /// head_dim=..., dtype="f16", layout_tag="layer-major", model_revision=None,
    /// world_size=1, rank=0, pp_size=1, pp_rank=0)
    #[new]
    #[pyo3(signature = (config=None, *, identity=None, model=None, layers=None, kv_heads=None,
        head_dim=None, dtype="f16", layout_tag=None, model_revision=None, world_size=1, rank=0,
        pp_size=1, pp_rank=0, planes=2))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        config: Option<&Bound<'_, PyAny>>,
        identity: Option<&Bound<'_, PyAny>>,
        model: Option<String>,
        layers: Option<u32>,
        kv_heads: Option<u32>,
        head_dim: Option<u32>,
        dtype: &str,
        layout_tag: Option<String>,
        model_revision: Option<String>,
        world_size: u32,
        rank: u32,
        pp_size: u32,
        pp_rank: u32,
        planes: u32,
    ) -> PyResult<PyEngine> {
        let identity = match identity {
            Some(d) => identity_of(py, d)?,
            None => {
                let (Some(layers), Some(kv_heads), Some(head_dim)) = (layers, kv_heads, head_dim)
                else {
                    return Err(PyValueError::new_err(
                        "give the model's KV shape: layers=, kv_heads=, head_dim= (and dtype=), or identity={...}",
                    ));
                };
                let mut layout = KvLayout {
                    groups: vec![LayerGroup {
                        num_layers: layers,
                        num_kv_heads: kv_heads,
                        head_dim,
                        dtype: dtype_of(dtype)?,
                        planes,
                    }],
                    tag: kvtier::layout::LAYER_MAJOR.to_string(),
                };
                if let Some(t) = layout_tag {
                    layout.tag = t;
                }
                let mut id =
                    ModelIdentity::new(model.unwrap_or_else(|| "kvtier/model".into()), layout);
                id.model_revision = model_revision;
                id.world_size = world_size;
                id.rank = rank;
                id.pp_size = pp_size;
                id.pp_rank = pp_rank;
                id.validate().map_err(engine_err)?;
                id
            }
        };
        match config_of(py, config)? {
            Backend::Embedded(cfg) => {
                let id = identity.clone();
                let engine = py
                    .allow_threads(move || Engine::new(*cfg, id))
                    .map_err(engine_err)?;
                let engine = Arc::new(engine);
                let admin = match engine.config().admin_port {
                    Some(port) => Some(
                        kvtier_server::admin::spawn_embedded_admin(
                            engine.core().clone(),
                            std::slice::from_ref(&engine),
                            port,
                        )
                        .map_err(|e| {
                            KvTierError::new_err(format!(
                                "starting the admin endpoint on port {port}: {e:#}"
                            ))
                        })?
                        .0,
                    ),
                    None => None,
                };
                Ok(PyEngine {
                    cache: engine.clone(),
                    pool: pool_region_of(&engine),
                    save_unfull_chunk: engine.key_space().save_unfull_chunk(),
                    embedded: Some(engine),
                    identity,
                    server: None,
                    _admin: admin,
                    residency: OnceLock::new(),
                })
            }
            Backend::Server(addr) => {
                let (cache, save_unfull_chunk) = connect_server(py, &addr, &identity)?;
                Ok(PyEngine {
                    cache,
                    save_unfull_chunk,
                    embedded: None,
                    identity,
                    server: Some(addr),
                    _admin: None,
                    pool: None,
                    residency: OnceLock::new(),
                })
            }
        }
    }

    /// Tokens per chunk.
    #[getter]
    fn chunk_size(&self) -> usize {
        self.cache.chunk_size()
    }

    /// KV bytes per token of this model.
    #[getter]
    fn bytes_per_token(&self) -> usize {
        self.cache.bytes_per_token()
    }

    /// Whether a prompt's trailing partial chunk (fewer than `chunk_size` tokens) is stored
    /// and counted by lookups: `save_unfull_chunk` of the engine's config, or in server mode
    /// of the server's.
    #[getter]
    fn save_unfull_chunk(&self) -> bool {
        self.save_unfull_chunk
    }

    /// The server address in server mode, else None.
    #[getter]
    fn server(&self) -> Option<String> {
        self.server.clone()
    }

    /// The model identity as a dict (the shape `chunk_keys` accepts).
    fn identity(&self, py: Python<'_>) -> PyResult<PyObject> {
        let s = serde_json::to_string(&self.identity)
            .map_err(|e| KvTierError::new_err(e.to_string()))?;
        Ok(py.import("json")?.call_method1("loads", (s,))?.unbind())
    }

    /// Payload bytes of `n_tokens` tokens.
    fn payload_bytes(&self, n_tokens: usize) -> usize {
        n_tokens * self.cache.bytes_per_token()
    }

    /// The chunk keys of `tokens` under this engine's identity (embedded mode).
    #[pyo3(signature = (tokens, salt=None))]
    fn chunk_keys(
        &self,
        py: Python<'_>,
        tokens: &Bound<'_, PyAny>,
        salt: Option<String>,
    ) -> PyResult<Vec<String>> {
        let toks = tokens_of(tokens)?;
        let ks = self.key_space()?;
        let spans = py
            .allow_threads(|| ks.chunk_spans(&toks, salt.as_deref()))
            .map_err(engine_err)?;
        Ok(spans.iter().map(|s| s.key.to_hex()).collect())
    }

    /// How many leading tokens of `tokens` are stored (over all tiers). With `first_chunk=k`
    /// (a windowed lookup, e.g. a sliding-window layer group) only chunks k.. are looked at:
    /// the result is the absolute token where the run of stored chunks starting at chunk k
    /// ends, which is chunk k's first token when none is stored (`lookup_detail`'s
    /// `hit_chunks` tells). `first_chunk` may be the prompt's chunk count (an empty window);
    /// beyond it is an error.
    #[pyo3(signature = (tokens, salt=None, *, first_chunk=0))]
    fn lookup(
        &self,
        py: Python<'_>,
        tokens: &Bound<'_, PyAny>,
        salt: Option<String>,
        first_chunk: usize,
    ) -> PyResult<usize> {
        let toks = tokens_of(tokens)?;
        let cache = &self.cache;
        py.allow_threads(|| cache.lookup_from(&toks, salt.as_deref(), first_chunk))
            .map(|r| r.hit_tokens)
            .map_err(engine_err)
    }

    /// Lookup with details: {"hit_tokens", "hit_chunks", "tiers", "start_token"}. With
    /// `first_chunk=k`, `hit_chunks` (and `tiers`) count from chunk k, `hit_tokens` is
    /// absolute (as in `lookup`) and `start_token` is chunk k's first token (0 without).
    #[pyo3(signature = (tokens, salt=None, *, first_chunk=0))]
    fn lookup_detail<'py>(
        &self,
        py: Python<'py>,
        tokens: &Bound<'py, PyAny>,
        salt: Option<String>,
        first_chunk: usize,
    ) -> PyResult<Bound<'py, PyDict>> {
        let toks = tokens_of(tokens)?;
        let cache = &self.cache;
        let r = py
            .allow_threads(|| cache.lookup_from(&toks, salt.as_deref(), first_chunk))
            .map_err(engine_err)?;
        // The whole-prompt lookup (the connector's hot path) needs no key space for this.
        let start = match first_chunk {
            0 => 0,
            k => self
                .key_space()?
                .window_start(toks.len(), k)
                .map_err(engine_err)?,
        };
        let d = PyDict::new(py);
        d.set_item("hit_tokens", r.hit_tokens)?;
        d.set_item("hit_chunks", r.hit_chunks)?;
        d.set_item("tiers", r.tiers)?;
        d.set_item("start_token", start)?;
        Ok(d)
    }

    /// Stores the prompt's KV. `kv` is a C-contiguous numpy array / CPU torch tensor of any
    /// dtype holding the chunk payloads back to back (tokens x bytes_per_token bytes, or
    /// only the chunked tokens' bytes). Read in place, no copy on the Python side. With
    /// `first_chunk=k` only chunks k.. are stored and `kv` starts at chunk k's first token
    /// (`tokens` is still the whole prompt: keys chain over it); `stored_tokens` is then the
    /// absolute token where the stored run ends.
    #[pyo3(signature = (tokens, kv, salt=None, *, first_chunk=0))]
    fn store<'py>(
        &self,
        py: Python<'py>,
        tokens: &Bound<'py, PyAny>,
        kv: &Bound<'py, PyAny>,
        salt: Option<String>,
        first_chunk: usize,
    ) -> PyResult<Bound<'py, PyDict>> {
        let toks = tokens_of(tokens)?;
        let view = ByteView::new(kv, false, "kv")?;
        let payload = view.as_slice();
        let cache = &self.cache;
        let s = py
            .allow_threads(|| cache.store_from(&toks, salt.as_deref(), first_chunk, payload))
            .map_err(engine_err)?;
        drop(view);
        store_report(py, &s)
    }

    /// Loads the stored prefix into `out` (writable, C-contiguous, laid out like `store`'s
    /// payload, at least as large as the chunked tokens' bytes). Returns the tokens loaded.
    /// With `first_chunk=k` it loads the stored run of chunks starting at chunk k into `out`
    /// from its byte 0 (chunk k's first token) and returns the absolute token where that run
    /// ends (chunk k's first token when nothing was loaded).
    #[pyo3(signature = (tokens, out, salt=None, *, first_chunk=0))]
    fn retrieve(
        &self,
        py: Python<'_>,
        tokens: &Bound<'_, PyAny>,
        out: &Bound<'_, PyAny>,
        salt: Option<String>,
        first_chunk: usize,
    ) -> PyResult<usize> {
        let toks = tokens_of(tokens)?;
        let mut view = ByteView::new(out, true, "out")?;
        let buf = view.as_mut_slice();
        let cache = &self.cache;
        let r = py
            .allow_threads(|| cache.retrieve_from(&toks, salt.as_deref(), first_chunk, buf))
            .map_err(engine_err)?;
        drop(view);
        Ok(r.hit_tokens)
    }

    /// Another model identity (a dict shaped like `identity()`'s, e.g. the same model with
    /// another layout tag and layer count: one per vLLM KV-cache group) over the same cache:
    /// in embedded mode an engine sharing this one's tiers and L1 pool (`pool_region` is the
    /// same; an admin endpoint stays this engine's), in server mode a new connection to the
    /// same server. Its chunk keys differ from this engine's: the identity is in every key.
    fn for_identity(&self, py: Python<'_>, identity: &Bound<'_, PyAny>) -> PyResult<PyEngine> {
        let id = identity_of(py, identity)?;
        match (&self.embedded, &self.server) {
            (Some(engine), _) => {
                let child = id.clone();
                let engine = py
                    .allow_threads(|| engine.for_model(child))
                    .map_err(engine_err)?;
                let engine = Arc::new(engine);
                Ok(PyEngine {
                    cache: engine.clone(),
                    save_unfull_chunk: engine.key_space().save_unfull_chunk(),
                    embedded: Some(engine),
                    identity: id,
                    server: None,
                    _admin: None,
                    pool: self.pool,
                    residency: OnceLock::new(),
                })
            }
            (None, Some(addr)) => {
                let (cache, save_unfull_chunk) = connect_server(py, addr, &id)?;
                Ok(PyEngine {
                    cache,
                    save_unfull_chunk,
                    embedded: None,
                    identity: id,
                    server: Some(addr.clone()),
                    _admin: None,
                    pool: None,
                    residency: OnceLock::new(),
                })
            }
            (None, None) => Err(KvTierError::new_err(
                "for_identity(): this engine is neither embedded nor a server client",
            )),
        }
    }

    /// Starts loading the stored prefix into L1; returns a handle with `wait(timeout=None)`.
    #[pyo3(signature = (tokens, salt=None))]
    fn prefetch(
        &self,
        py: Python<'_>,
        tokens: &Bound<'_, PyAny>,
        salt: Option<String>,
    ) -> PyResult<PrefetchHandle> {
        let toks = tokens_of(tokens)?;
        let cache = &self.cache;
        let h = py
            .allow_threads(|| cache.prefetch(&toks, salt.as_deref()))
            .map_err(engine_err)?;
        Ok(PrefetchHandle {
            inner: Mutex::new((Some(h), None)),
        })
    }

    /// Waits (at most `timeout` seconds) for queued lower-tier writes; True when all done.
    #[pyo3(signature = (timeout=30.0))]
    fn flush(&self, py: Python<'_>, timeout: f64) -> PyResult<bool> {
        let cache = &self.cache;
        py.allow_threads(|| cache.flush(Duration::from_secs_f64(timeout.max(0.0))))
            .map_err(engine_err)
    }

    /// Empties every tier; returns the chunks dropped.
    fn clear(&self, py: Python<'_>) -> PyResult<u64> {
        let cache = &self.cache;
        py.allow_threads(|| cache.clear()).map_err(engine_err)
    }

    /// Removes the prompt's chunks from every tier; returns how many were held somewhere.
    #[pyo3(signature = (tokens, salt=None))]
    fn remove(
        &self,
        py: Python<'_>,
        tokens: &Bound<'_, PyAny>,
        salt: Option<String>,
    ) -> PyResult<u64> {
        let toks = tokens_of(tokens)?;
        let cache = &self.cache;
        py.allow_threads(|| cache.remove(&toks, salt.as_deref()))
            .map_err(engine_err)
    }

    /// Forgets one tenant's chunks in every tier; returns the chunks dropped.
    fn remove_salt(&self, py: Python<'_>, salt: String) -> PyResult<u64> {
        let cache = &self.cache;
        py.allow_threads(|| cache.remove_salt(&salt))
            .map_err(engine_err)
    }

    /// Engine and per-tier numbers (hits, checksum_failures, write_backs, ...) as a dict.
    fn stats(&self, py: Python<'_>) -> PyResult<PyObject> {
        let cache = &self.cache;
        let v = py
            .allow_threads(|| cache.stats_json())
            .map_err(engine_err)?;
        let s = serde_json::to_string(&v).map_err(|e| KvTierError::new_err(e.to_string()))?;
        Ok(py.import("json")?.call_method1("loads", (s,))?.unbind())
    }

    /// Starts recording which chunks enter and leave L1 (stores, write-backs, evictions,
    /// removals) and the local-disk tier (committed writes, evictions, removals), at most
    /// `limit` changes per tier between two `take_residency_changes` calls (then that
    /// tier's log starts over and says so). Embedded engines only; returns False when
    /// neither tier reports (L1 does not cache and there is no disk tier, or another
    /// observer was installed first). Chunks the disk tier found at startup are not
    /// reported.
    #[pyo3(signature = (limit=100_000))]
    fn watch_residency(&self, limit: usize) -> PyResult<bool> {
        let engine = self.embedded_engine("watch_residency")?;
        if let Some(logs) = self.residency.get() {
            return Ok(!logs.is_empty());
        }
        let mut logs = Vec::new();
        let l1 = Arc::new(ResidencyLog::new(limit));
        if engine.manager().set_l1_observer(l1.clone()) {
            logs.push((MEDIUM_L1, l1));
        }
        let disk = Arc::new(ResidencyLog::new(limit));
        if engine
            .manager()
            .set_tier_observer(DISK_TIER_NAME, disk.clone())
        {
            logs.push((MEDIUM_DISK, disk));
        }
        let watching = !logs.is_empty();
        let _ = self.residency.set(logs);
        Ok(watching)
    }

    /// The changes since the last call: `(overflowed, [(stored, key_hex, medium), ...])`.
    /// `medium` is vLLM's name of the tier: `CPU` (L1) or `STORAGE` (the disk tier);
    /// `stored` is False for a chunk that left that tier. Each medium's changes are oldest
    /// first (L1's listed before the disk tier's; the order across media means nothing).
    /// `overflowed` lists the media whose log exceeded its limit and dropped changes:
    /// forget what was learnt of those media before.
    fn take_residency_changes(&self) -> PyResult<ResidencyTake> {
        let Some(logs) = self.residency.get() else {
            return Err(KvTierError::new_err(
                "take_residency_changes(): call watch_residency() first",
            ));
        };
        let mut overflowed = Vec::new();
        let mut changes = Vec::new();
        for (medium, log) in logs {
            let taken = log.take();
            if taken.overflowed {
                overflowed.push(*medium);
            }
            changes.extend(taken.changes.iter().map(|c| match c {
                ResidencyChange::Stored(k, _) => (true, k.to_hex(), *medium),
                ResidencyChange::Removed(k) => (false, k.to_hex(), *medium),
            }));
        }
        Ok((overflowed, changes))
    }

    /// (address, bytes) of the embedded engine's L1 memory pool: chunks held by `acquire`
    /// and buffers claimed by `begin_store` lie in it, so registering it once with a device
    /// runtime (`cudaHostRegister`) lets DMA engines read and write them directly.
    fn pool_region(&self) -> PyResult<(usize, usize)> {
        self.pool.ok_or_else(|| {
            KvTierError::new_err(
                "pool_region() is for embedded engines (a server's pool belongs to the server)",
            )
        })
    }

    /// Holds the stored prefix of `tokens` in L1 (loading lower-tier chunks into it) until
    /// `release()`: a `HeldChunks` whose `chunks` are (token_start, token_end, address,
    /// nbytes) of pool memory to read in place (embedded mode). Checksums were verified when
    /// the chunks entered L1. With `first_chunk=k`: the stored run of chunks starting at
    /// chunk k (token ranges stay absolute; `hit_tokens` is where the run ends, chunk k's
    /// first token when nothing is held).
    #[pyo3(signature = (tokens, salt=None, *, first_chunk=0))]
    fn acquire(
        &self,
        py: Python<'_>,
        tokens: &Bound<'_, PyAny>,
        salt: Option<String>,
        first_chunk: usize,
    ) -> PyResult<HeldChunks> {
        let eng = self.embedded_engine("acquire")?;
        let toks = tokens_of(tokens)?;
        let held = py
            .allow_threads(|| eng.acquire_from(&toks, salt.as_deref(), first_chunk))
            .map_err(engine_err)?;
        let chunks = held
            .spans
            .iter()
            .zip(&held.chunks)
            .map(|(sp, c)| {
                let p = c.payload();
                (sp.start, sp.end, p.as_ptr() as usize, p.len())
            })
            .collect();
        Ok(HeldChunks {
            hit_tokens: held.hit_tokens,
            chunks,
            held: Mutex::new(Some(held)),
        })
    }

    /// Claims pool buffers for the chunks of `tokens` that are not stored yet (embedded
    /// mode): a `StoreSession` whose `slots` are (token_start, token_end, address, nbytes)
    /// to fill in place, then `commit()` (checksums and stores them) or `abort()`. With
    /// `first_chunk=k` only chunks k.. are claimed (token ranges stay absolute).
    #[pyo3(signature = (tokens, salt=None, *, first_chunk=0))]
    fn begin_store(
        &self,
        py: Python<'_>,
        tokens: &Bound<'_, PyAny>,
        salt: Option<String>,
        first_chunk: usize,
    ) -> PyResult<StoreSession> {
        let eng = self.embedded_engine("begin_store")?.clone();
        let toks = tokens_of(tokens)?;
        let mut session = py
            .allow_threads(|| eng.begin_store_from(&toks, salt.as_deref(), first_chunk))
            .map_err(engine_err)?;
        let slots = session
            .slots
            .iter_mut()
            .map(|s| {
                let len = s.buf.len();
                (
                    s.span.start,
                    s.span.end,
                    s.buf.as_mut_slice().as_mut_ptr() as usize,
                    len,
                )
            })
            .collect();
        Ok(StoreSession {
            engine: eng,
            slots,
            session: Mutex::new(Some(session)),
        })
    }

    /// Prometheus text exposition of the engine's metrics (embedded mode).
    fn metrics_text(&self, py: Python<'_>) -> PyResult<String> {
        match &self.embedded {
            Some(e) => Ok(py.allow_threads(|| e.metrics_text())),
            None => Err(KvTierError::new_err(
                "metrics_text() is for embedded engines; a server exposes its metrics itself",
            )),
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "kvtier.Engine(model={:?}, chunk_size={}, bytes_per_token={}, mode={})",
            self.identity.model_name,
            self.cache.chunk_size(),
            self.cache.bytes_per_token(),
            self.server
                .as_ref()
                .map_or("embedded".to_string(), |a| format!("server {a}"))
        )
    }
}

impl PyEngine {
    /// The key space this handle hashes with: the engine's, or in server mode the same rule
    /// built from the server's chunking.
    fn key_space(&self) -> PyResult<KeySpace> {
        match &self.embedded {
            Some(e) => Ok(e.key_space().clone()),
            None => KeySpace::new(
                self.identity.clone(),
                self.cache.chunk_size(),
                self.save_unfull_chunk,
            )
            .map_err(engine_err),
        }
    }

    fn embedded_engine(&self, what: &str) -> PyResult<&Arc<Engine>> {
        self.embedded.as_ref().ok_or_else(|| {
            KvTierError::new_err(format!(
                "{what}() reads and writes the pool in place and is for embedded engines; a server client uses store/retrieve"
            ))
        })
    }
}

fn store_report<'py>(py: Python<'py>, s: &kvtier::StoreSummary) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("stored_tokens", s.stored_tokens)?;
    d.set_item("new_chunks", s.new_chunks)?;
    d.set_item("present_chunks", s.present_chunks)?;
    d.set_item("inflight_chunks", s.inflight_chunks)?;
    d.set_item("dropped_chunks", s.dropped_chunks)?;
    d.set_item("new_bytes", s.new_bytes)?;
    Ok(d)
}

type Region = (usize, usize, usize, usize);

fn lock<T>(m: &Mutex<T>) -> PyResult<std::sync::MutexGuard<'_, T>> {
    m.lock().map_err(|_| KvTierError::new_err("poisoned"))
}

/// `regions` while the handle in `slot` is live, else none (its memory may be reused).
fn live_regions<T>(slot: &Mutex<Option<T>>, regions: &[Region]) -> PyResult<Vec<Region>> {
    Ok(if lock(slot)?.is_some() {
        regions.to_vec()
    } else {
        Vec::new()
    })
}

/// A stored prefix held in L1 by `Engine.acquire` (unevictable until released).
#[pyclass(module = "kvtier._native", frozen)]
struct HeldChunks {
    hit_tokens: usize,
    chunks: Vec<Region>,
    held: Mutex<Option<kvtier::Acquired>>,
}

#[pymethods]
impl HeldChunks {
    /// Tokens of the held prefix.
    #[getter]
    fn hit_tokens(&self) -> usize {
        self.hit_tokens
    }

    /// (token_start, token_end, address, nbytes) of each held chunk in prompt order; empty
    /// once released (the memory may then be reused).
    #[getter]
    fn chunks(&self) -> PyResult<Vec<Region>> {
        live_regions(&self.held, &self.chunks)
    }

    /// Lets the engine evict the chunks again. Idempotent.
    fn release(&self) -> PyResult<()> {
        lock(&self.held)?.take();
        Ok(())
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(&self, _t: PyObject, _v: PyObject, _tb: PyObject) -> PyResult<()> {
        self.release()
    }
}

/// A store filling pool buffers in place, from `Engine.begin_store`.
#[pyclass(module = "kvtier._native", frozen)]
struct StoreSession {
    engine: Arc<Engine>,
    slots: Vec<Region>,
    session: Mutex<Option<kvtier::StoreSession>>,
}

impl StoreSession {
    fn take(&self) -> PyResult<kvtier::StoreSession> {
        lock(&self.session)?.take().ok_or_else(|| {
            KvTierError::new_err("this store session was already committed or aborted")
        })
    }
}

#[pymethods]
impl StoreSession {
    /// (token_start, token_end, address, nbytes) of each claimed chunk to fill (only the
    /// chunks not stored yet); empty once committed or aborted.
    #[getter]
    fn slots(&self) -> PyResult<Vec<Region>> {
        live_regions(&self.session, &self.slots)
    }

    /// Checksums the filled buffers and stores them; the report `store` returns.
    fn commit<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let session = self.take()?;
        let engine = &self.engine;
        let report = py.allow_threads(|| engine.commit_store(session));
        store_report(py, &report.summary)
    }

    /// Gives the claims and buffers back; nothing is stored. Idempotent.
    fn abort(&self) -> PyResult<()> {
        lock(&self.session)?.take();
        Ok(())
    }
}

type PendingState = (Option<Box<dyn PendingLoad>>, Option<usize>);

/// A prefetch in progress.
#[pyclass(module = "kvtier._native", frozen)]
struct PrefetchHandle {
    inner: Mutex<PendingState>,
}

#[pymethods]
impl PrefetchHandle {
    /// Waits (at most `timeout` seconds, if given) and returns the tokens of the contiguous
    /// prefix now in L1. Later calls return the same number.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<usize> {
        let mut g = self
            .inner
            .lock()
            .map_err(|_| KvTierError::new_err("poisoned"))?;
        if let Some(n) = g.1 {
            return Ok(n);
        }
        let h = g.0.take().expect("pending load present until resolved");
        let n = py
            .allow_threads(|| h.wait(timeout.map(|t| Duration::from_secs_f64(t.max(0.0)))))
            .map_err(engine_err)?;
        g.1 = Some(n);
        Ok(n)
    }
}

/// A client of the server at `addr`, and whether that server stores partial chunks.
fn connect_server(
    py: Python<'_>,
    addr: &str,
    identity: &ModelIdentity,
) -> PyResult<(Arc<dyn KvCache>, bool)> {
    let id = identity.clone();
    let a = addr.to_string();
    let client = py
        .allow_threads(move || kvtier_client::KvClient::connect(&a, id))
        .map_err(|e| KvTierError::new_err(format!("kvtier server {addr}: {e}")))?;
    let unfull = client.server_info().save_unfull_chunk;
    Ok((Arc::new(client), unfull))
}

/// The native module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyEngine>()?;
    m.add_class::<PrefetchHandle>()?;
    m.add_class::<HeldChunks>()?;
    m.add_class::<StoreSession>()?;
    m.add_function(wrap_pyfunction!(chunk_keys, m)?)?;
    m.add_function(wrap_pyfunction!(tokens::token_list_reader, m)?)?;
    m.add("KvTierError", m.py().get_type::<KvTierError>())?;
    m.add("KEY_SPEC_VERSION", kvtier::keys::KEY_SPEC_VERSION)?;
    // The package version is the crates' (one number, set in the workspace manifest).
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
