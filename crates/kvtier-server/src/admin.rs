//! Admin HTTP endpoints, for the server and for embedded engines.
//!
//! | method and path | body | answer | token |
//! | --- | --- | --- | --- |
//! | `GET /health` | | `{"status":"ok"}` | no |
//! | `GET /metrics` | | Prometheus (OpenMetrics) text of the core's metrics | no |
//! | `GET /stats` | | engine and tier numbers (JSON) plus the registered models | no |
//! | `POST /lookup` | `{"model", "tokens", "cache_salt"}` | hit tokens, chunks per tier | yes |
//! | `POST /lookup` (batch) | `{"model", "prompts": [{"tokens", "cache_salt"}]}` or `{"block_hashes": [[hex key]]}` | `{"results": [...]}` in order ([`batch`]) | yes |
//! | `POST /clear` | | chunks dropped per tier | yes |
//! | `POST /pin` | `{"model", "tokens", "cache_salt", "ttl_sec"}` | pinned chunk count | yes |
//! | `DELETE /salt/{cache_salt}` | | chunks dropped per tier (disk included) | yes |
//!
//! `model` is a model identity (kvtier's JSON form) or the name of a model a client has
//! registered.
//!
//! Endpoints that change the cache or tell whether a prompt is cached need the admin token
//! (`KVTIER_ADMIN_TOKEN`) as `Authorization: Bearer <token>`, compared in constant time and
//! never logged; without a configured token they are refused (`403`), so any local user can
//! read health and metrics but none can wipe or probe another tenant's data. The listener
//! bounds what a flood of the port can hold ([`listener`]).
//!
//! The listener runs on its own thread and runtime, so an embedded engine (no tokio of its
//! own) can expose it too: see [`spawn_embedded_admin`].

pub mod batch;
pub mod listener;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use bytes::Bytes;
use kvtier::keys::ModelIdentity;
use kvtier::{Engine, EngineCore};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::handshake::tokens_eq_ct;
use crate::models::Models;
use crate::stoppable::StoppableThread;

/// A running admin listener; dropping it stops the listener.
pub struct AdminHandle {
    addr: SocketAddr,
    thread: StoppableThread,
}

impl std::fmt::Debug for AdminHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminHandle")
            .field("addr", &self.addr)
            .finish()
    }
}

impl AdminHandle {
    /// Bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the listener and waits for its thread.
    pub fn shutdown(mut self) {
        self.thread.stop();
    }
}

/// The environment variable holding the admin token.
pub const ADMIN_TOKEN_ENV: &str = "KVTIER_ADMIN_TOKEN";

/// The admin token from [`ADMIN_TOKEN_ENV`] (unset or empty: none).
pub fn token_from_env() -> Option<String> {
    std::env::var(ADMIN_TOKEN_ENV)
        .ok()
        .filter(|t| !t.is_empty())
}

/// Serves the admin endpoints for `models` on `addr` from a dedicated thread; `token`
/// guards the endpoints that probe or change the cache (none: they are refused).
pub fn spawn_admin(
    models: Arc<Models>,
    addr: SocketAddr,
    token: Option<String>,
) -> Result<AdminHandle> {
    let std_listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("binding the admin HTTP listener on {addr}"))?;
    std_listener.set_nonblocking(true)?;
    let local = std_listener.local_addr()?;
    let (tx, rx) = oneshot::channel::<()>();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the admin runtime")?;
    let guarded = token.is_some();
    let app = router(models, token);
    let thread = std::thread::Builder::new()
        .name("kvtier-admin".into())
        .spawn(move || {
            rt.block_on(async move {
                match tokio::net::TcpListener::from_std(std_listener) {
                    Ok(l) => listener::serve(l, app, rx).await,
                    Err(e) => tracing::error!(error = %e, "admin listener unusable"),
                }
            });
        })
        .context("spawning the admin thread")?;
    tracing::info!(addr = %local, token = guarded, "admin HTTP listening");
    Ok(AdminHandle {
        addr: local,
        thread: StoppableThread::new(tx, thread),
    })
}

/// For an embedded engine: serves the admin endpoints over `core` on
/// `127.0.0.1:port` (the config's `admin_port`), guarded by `KVTIER_ADMIN_TOKEN` when set.
/// Register the process's engines on the returned registry so `/lookup` and `/pin` can
/// name them.
pub fn spawn_embedded_admin(
    core: Arc<EngineCore>,
    engines: &[Arc<Engine>],
    port: u16,
) -> Result<(AdminHandle, Arc<Models>)> {
    let models = Models::new(core);
    for e in engines {
        models.register(e.clone());
    }
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let h = spawn_admin(models.clone(), addr, token_from_env())?;
    Ok((h, models))
}

/// The admin router (exposed for embedding in another axum app); `token` guards the
/// endpoints that probe or change the cache.
pub fn router(models: Arc<Models>, token: Option<String>) -> Router {
    let token = Arc::new(token.filter(|t| !t.is_empty()));
    let guarded = Router::new()
        .route("/lookup", post(lookup))
        .route("/clear", post(clear))
        .route("/pin", post(pin))
        .route("/salt/{cache_salt}", delete(remove_salt))
        // Layers run outside in: the token first, then the bounded body read.
        .route_layer(middleware::from_fn(listener::bounded_body))
        .route_layer(middleware::from_fn_with_state(token, require_token));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/stats", get(stats))
        .merge(guarded)
        .with_state(models)
}

/// Lets a request through when it carries the admin token.
async fn require_token(
    State(token): State<Arc<Option<String>>>,
    req: Request,
    next: Next,
) -> Response {
    match check_token(token.as_deref(), req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// Whether `headers` carry `Authorization: Bearer <want>`; the refusal says what to do.
fn check_token(want: Option<&str>, headers: &HeaderMap) -> std::result::Result<(), ApiError> {
    let Some(want) = want else {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "this endpoint is disabled: no admin token is set; start the server with \
                 {ADMIN_TOKEN_ENV} (or --admin-token-file FILE) and send the token as \
                 `Authorization: Bearer <token>`"
            ),
        ));
    };
    let sent = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    if sent.is_some_and(|t| tokens_eq_ct(t, want)) {
        return Ok(());
    }
    Err(ApiError(
        StatusCode::UNAUTHORIZED,
        format!(
            "missing or wrong admin token: send the server's {ADMIN_TOKEN_ENV} as \
             `Authorization: Bearer <token>`"
        ),
    ))
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<kvtier::Error> for ApiError {
    fn from(e: kvtier::Error) -> Self {
        let code = match e {
            kvtier::Error::InvalidInput(_) | kvtier::Error::Config { .. } => {
                StatusCode::BAD_REQUEST
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(code, e.to_string())
    }
}

type ApiResult<T> = std::result::Result<T, ApiError>;

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> kvtier::Result<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(ApiError::from)
}

async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn metrics(State(m): State<Arc<Models>>) -> Response {
    let text = tokio::task::spawn_blocking(move || {
        let core = m.core();
        core.manager().refresh_metrics();
        core.metrics().render()
    })
    .await
    .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn stats(State(m): State<Arc<Models>>) -> ApiResult<Json<Value>> {
    let v = blocking(move || {
        let s = m.any()?.stats();
        let mut v = serde_json::to_value(s)
            .map_err(|e| kvtier::Error::invalid(format!("stats are not JSON: {e}")))?;
        let names: Vec<Value> = m
            .identities()
            .into_iter()
            .filter_map(|i| serde_json::to_value(i).ok())
            .collect();
        v["models"] = Value::Array(names);
        v["admin_models"] = json!(m.probed_len());
        Ok(v)
    })
    .await?;
    Ok(Json(v))
}

/// `/lookup`'s body: one prompt (`tokens`), or a batch (`prompts` or `block_hashes`).
#[derive(Deserialize)]
struct LookupBody {
    #[serde(default)]
    model: Value,
    #[serde(default)]
    tokens: Option<Vec<u32>>,
    #[serde(default)]
    cache_salt: Option<String>,
    #[serde(default)]
    prompts: Option<Vec<batch::Prompt>>,
    #[serde(default)]
    block_hashes: Option<Vec<Vec<String>>>,
}

#[derive(Deserialize)]
struct PinBody {
    model: Value,
    tokens: Vec<u32>,
    #[serde(default)]
    cache_salt: Option<String>,
    #[serde(default)]
    ttl_sec: Option<f64>,
}

fn resolve(m: &Models, model: &Value) -> kvtier::Result<Arc<Engine>> {
    match model {
        Value::String(name) => m.by_name(name).ok_or_else(|| {
            kvtier::Error::invalid(format!(
                "no client has registered model `{name}`; pass its full identity instead"
            ))
        }),
        v => {
            let id: ModelIdentity = serde_json::from_value(v.clone())
                .map_err(|e| kvtier::Error::invalid(format!("bad model identity: {e}")))?;
            m.get_or_probe(id)
        }
    }
}

async fn lookup(State(m): State<Arc<Models>>, body: Bytes) -> ApiResult<Json<Value>> {
    let v = blocking(move || {
        // Parsed here rather than by axum's `Json`: its per-element error paths cost a fifth
        // of the time of a batch of 16 8K-token prompts, and the parse moves off the runtime.
        let b: LookupBody = serde_json::from_slice(&body)
            .map_err(|e| kvtier::Error::invalid(format!("bad /lookup body: {e}")))?;
        let tokens = match (b.tokens, b.prompts, b.block_hashes) {
            (Some(t), None, None) => t,
            (None, Some(p), None) => {
                return batch::lookup(&m, batch::Batch::Prompts(b.model, p), resolve)
            }
            (None, None, Some(k)) => return batch::lookup(&m, batch::Batch::Keys(k), resolve),
            _ => {
                return Err(kvtier::Error::invalid(
                    "send exactly one of `tokens` (one prompt), `prompts` (a batch of \
                     {\"tokens\", \"cache_salt\"}) or `block_hashes` (a batch of chunk-key lists)",
                ))
            }
        };
        let e = resolve(&m, &b.model)?;
        let r = e.lookup(&tokens, b.cache_salt.as_deref())?;
        let names = m.core().manager().tier_names();
        let mut per_tier = serde_json::Map::new();
        for n in &names {
            per_tier.insert(n.clone(), json!(0));
        }
        for &t in &r.tiers {
            if let Some(n) = names.get(t) {
                let c = per_tier[n].as_u64().unwrap_or(0) + 1;
                per_tier.insert(n.clone(), json!(c));
            }
        }
        Ok(json!({
            "hit_tokens": r.hit_tokens,
            "hit_chunks": r.hit_chunks,
            "requested_tokens": tokens.len(),
            "chunks_per_tier": per_tier,
        }))
    })
    .await?;
    Ok(Json(v))
}

fn per_tier(v: Vec<(String, u64)>) -> Value {
    let total: u64 = v.iter().map(|x| x.1).sum();
    let map: serde_json::Map<String, Value> = v.into_iter().map(|(k, n)| (k, json!(n))).collect();
    json!({ "dropped": map, "total": total })
}

async fn clear(State(m): State<Arc<Models>>) -> ApiResult<Json<Value>> {
    let v = blocking(move || Ok(per_tier(m.core().manager().clear()?))).await?;
    Ok(Json(v))
}

async fn pin(State(m): State<Arc<Models>>, Json(b): Json<PinBody>) -> ApiResult<Json<Value>> {
    let max = m.core().config().pin_timeout_sec;
    let ttl = match b.ttl_sec {
        Some(t) if t.is_finite() && t > 0.0 && t <= max => {
            Some(std::time::Duration::from_secs_f64(t))
        }
        Some(t) if t.is_finite() && t > max => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!(
                    "ttl_sec {t} is longer than this server's pin_timeout_sec ({max} s); \
                     ask for at most that, or raise pin_timeout_sec in its config"
                ),
            ))
        }
        Some(_) => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "ttl_sec must be a positive number of seconds".into(),
            ))
        }
        None => None,
    };
    let v = blocking(move || {
        let e = resolve(&m, &b.model)?;
        let pins = e.pin(&b.tokens, b.cache_salt.as_deref(), ttl)?;
        Ok(json!({ "pinned_chunks": pins.len() }))
    })
    .await?;
    Ok(Json(v))
}

async fn remove_salt(
    State(m): State<Arc<Models>>,
    Path(salt): Path<String>,
) -> ApiResult<Json<Value>> {
    let v = blocking(move || Ok(per_tier(m.core().manager().remove_salt(&salt)?))).await?;
    Ok(Json(v))
}
