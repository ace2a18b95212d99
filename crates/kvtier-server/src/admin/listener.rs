//! The admin HTTP listener: HTTP/1.1 connections served by hyper under bounds a flood of
//! the port cannot get around.
//!
//! - At most [`MAX_CONNECTIONS`] connections. When they are all open, a new one replaces the
//!   oldest connection that is not in the middle of a request (a request head never
//!   finished, or an idle keep-alive); when every one is busy, it gets `503` and is closed.
//!   The cache's own clients therefore always have descriptors, and a real request gets in.
//! - A request head must arrive within [`HEADER_TIMEOUT`] (idle keep-alive connections
//!   too) and fit [`MAX_HEAD`] bytes; a body within [`BODY_TIMEOUT`] and
//!   [`MAX_BODY`] bytes ([`bounded_body`], after the token check).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::sync::{oneshot, watch, Notify};

use super::ApiError;
use crate::accept::AcceptBackoff;

/// Most admin connections open at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a client has to send a request head (also how long an idle keep-alive lasts).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 64 << 10;
/// Time a client has to send a request body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request body (a `/lookup` of about 500K tokens).
pub const MAX_BODY: usize = 4 << 20;
/// How long shutdown waits for requests in progress.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The open connections, oldest first, with whether each is in the middle of a request.
#[derive(Default)]
struct Connections {
    open: Mutex<VecDeque<Conn>>,
    next_id: AtomicU64,
}

struct Conn {
    id: u64,
    busy: Arc<AtomicBool>,
    evict: Arc<Notify>,
}

impl Connections {
    /// Room for one more connection: its id, busy flag and eviction signal, or `None` when
    /// every open connection is busy.
    fn admit(&self) -> Option<(u64, Arc<AtomicBool>, Arc<Notify>)> {
        let mut open = self.open.lock();
        if open.len() >= MAX_CONNECTIONS {
            let idle = open.iter().position(|c| !c.busy.load(Ordering::Acquire))?;
            if let Some(c) = open.remove(idle) {
                c.evict.notify_one();
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (busy, evict) = (Arc::new(AtomicBool::new(false)), Arc::new(Notify::new()));
        open.push_back(Conn {
            id,
            busy: busy.clone(),
            evict: evict.clone(),
        });
        Some((id, busy, evict))
    }

    fn remove(&self, id: u64) {
        let mut open = self.open.lock();
        if let Some(i) = open.iter().position(|c| c.id == id) {
            open.remove(i);
        }
    }
}

/// The router as a hyper service that marks its connection busy while a request runs.
#[derive(Clone)]
struct Tracked {
    app: Router,
    busy: Arc<AtomicBool>,
}

impl hyper::service::Service<Request<hyper::body::Incoming>> for Tracked {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn call(&self, req: Request<hyper::body::Incoming>) -> Self::Future {
        self.busy.store(true, Ordering::Release);
        let busy = self.busy.clone();
        // A Router is always ready, so it may be called without polling readiness.
        let fut = tower_service::Service::call(&mut self.app.clone(), req);
        Box::pin(async move {
            let r = fut.await;
            busy.store(false, Ordering::Release);
            r
        })
    }
}

/// The `503` a connection over the cap gets before it is closed.
fn busy_response() -> Vec<u8> {
    let body = format!(
        r#"{{"error":"admin port busy: {MAX_CONNECTIONS} requests in progress; try again later"}}"#
    );
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves `app` on `listener` until `stop` fires, then lets requests in progress finish
/// (at most [`SHUTDOWN_GRACE`]).
pub(super) async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    stop: oneshot::Receiver<()>,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .keep_alive(true);
    let conns = Arc::new(Connections::default());
    let (closing_tx, closing) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let mut backoff = AcceptBackoff::new("admin");
    let busy = busy_response();
    let mut stop = std::pin::pin!(stop);
    loop {
        let stream = tokio::select! {
            r = listener.accept() => r,
            _ = &mut stop => break,
        };
        let stream = match stream {
            Ok((s, _)) => {
                backoff.succeeded();
                s
            }
            Err(e) => {
                backoff.failed(&e).await;
                continue;
            }
        };
        while tasks.try_join_next().is_some() {}
        let Some((id, flag, evict)) = conns.admit() else {
            let _ = stream.try_write(&busy);
            continue;
        };
        let service = Tracked {
            app: app.clone(),
            busy: flag,
        };
        let conn = http.serve_connection(TokioIo::new(stream), service);
        let (conns, mut closing) = (conns.clone(), closing.clone());
        tasks.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                // Dropping the connection closes it.
                _ = evict.notified() => {}
                _ = closing.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            conns.remove(id);
        });
    }
    let _ = closing_tx.send(true);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
}

/// Reads a request body within [`BODY_TIMEOUT`] and [`MAX_BODY`] before the handler runs
/// (on the guarded routes, after the token check).
pub(super) async fn bounded_body(req: Request, next: Next) -> Response {
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_BODY as u64) {
        return too_large();
    }
    let (parts, body) = req.into_parts();
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY)).await
    {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => return too_large(),
        Err(_) => {
            return ApiError(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s",
                    BODY_TIMEOUT.as_secs()
                ),
            )
            .into_response()
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

fn too_large() -> Response {
    ApiError(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "request body unreadable or larger than {} MiB",
            MAX_BODY >> 20
        ),
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_port_replaces_its_oldest_idle_connection() {
        let c = Connections::default();
        let admitted: Vec<_> = (0..MAX_CONNECTIONS).map(|_| c.admit().unwrap()).collect();
        // Every connection but the second is in a request.
        for (i, (_, busy, _)) in admitted.iter().enumerate() {
            busy.store(i != 1, Ordering::Release);
        }
        assert!(c.admit().is_some());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let evicted = |n: &Arc<Notify>| {
            rt.block_on(async {
                tokio::time::timeout(Duration::from_millis(10), n.notified())
                    .await
                    .is_ok()
            })
        };
        assert!(evicted(&admitted[1].2));
        assert!(!evicted(&admitted[0].2));
        // Now the newest is the only idle one; once it is busy too, the port is full.
        assert!(c.admit().is_some());
        let last = c.open.lock().back().map(|x| x.busy.clone()).unwrap();
        last.store(true, Ordering::Release);
        assert!(c.admit().is_none());
        c.remove(admitted[0].0);
        assert!(c.admit().is_some());
    }
}
