//! Redis connections: the per-node pool ([`Node`], a [`crate::transport::link::Pool`] with
//! its reconnect backoff and link-state logging) and how a connection is opened: TCP, TLS
//! handshake for `rediss://`, then `AUTH` and `SELECT`.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use super::tls;
use super::url::Credentials;
use crate::error::Result;
use crate::transport::link::{ConnectError, Connector, LinkSettings, Pool};
use crate::transport::resp::{Conn, Reply, Stream};

/// The runtime that owns sockets' I/O registration and runs connects (and the cluster's
/// background slot refresh).
pub(crate) fn runtime() -> Result<&'static tokio::runtime::Runtime> {
    crate::transport::io_runtime()
}

/// One Redis server: its pool and link state.
pub(crate) type Node = Pool<Shared>;

/// Settings shared by a tier's nodes.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Pool size, timeouts, counters.
    pub link: LinkSettings,
    pub credentials: Credentials,
    pub db: u32,
    /// TLS client configuration (`rediss://`), `None` for plain TCP.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Connector for Shared {
    type Conn = Conn;

    fn settings(&self) -> &LinkSettings {
        &self.link
    }

    async fn open(self: Arc<Self>, addr: String) -> std::result::Result<Conn, ConnectError> {
        open(&addr, &self).await
    }

    fn timed_out(&self, timeout: Duration) -> String {
        if self.tls.is_some() {
            format!(
                "connect + TLS handshake timed out after {} ms (is this port serving TLS? a plaintext server can leave a TLS handshake hanging)",
                timeout.as_millis()
            )
        } else {
            format!("connect timed out after {} ms", timeout.as_millis())
        }
    }
}

async fn open(addr: &str, shared: &Shared) -> std::result::Result<Conn, ConnectError> {
    let other = ConnectError::Other;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| ConnectError::caused("connect", e))?;
    // Requests are small writes followed by a wait for the reply: Nagle would add a delay.
    tcp.set_nodelay(true)
        .map_err(|e| ConnectError::caused("socket setup", e))?;
    let stream = match &shared.tls {
        None => Stream::Tcp(tcp),
        Some(cfg) => {
            let name = tls::server_name(addr).map_err(other)?;
            let s = tokio_rustls::TlsConnector::from(cfg.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| ConnectError::described(tls::describe(&e), e))?;
            Stream::Tls(Box::new(s))
        }
    };
    let is_tls = shared.tls.is_some();
    // Errors of the first exchanges over TLS are usually TLS errors (TLS 1.3 servers reject
    // a missing client certificate only after the client's side of the handshake is done).
    let io_err = |what: &str, e: io::Error| {
        if is_tls {
            ConnectError::described(tls::describe(&e), e)
        } else {
            ConnectError::caused(what, e)
        }
    };
    let mut conn = Conn::new(stream);
    let creds = &shared.credentials;
    if let Some(pass) = &creds.password {
        let mut args: Vec<&[u8]> = vec![b"AUTH"];
        if let Some(user) = &creds.username {
            args.push(user.as_bytes());
        }
        args.push(pass.as_bytes());
        match conn.command(&args).await {
            Ok(Reply::Status(_)) => {}
            // The server's text names no secret (e.g. "WRONGPASS invalid username-password pair").
            Ok(Reply::Error(e)) => {
                return Err(ConnectError::Auth(format!("authentication failed: {e}")))
            }
            Ok(reply) => return Err(other(format!("unexpected AUTH reply {reply:?}"))),
            Err(e) => return Err(io_err("AUTH", e)),
        }
    } else if is_tls {
        // One round trip so a server that refuses this client fails the connect, with a
        // TLS explanation, instead of the first request.
        match conn.command(&[b"PING"]).await {
            Ok(Reply::Status(_)) | Ok(Reply::Error(_)) => {}
            Ok(reply) => return Err(other(format!("unexpected PING reply {reply:?}"))),
            Err(e) => return Err(io_err("PING", e)),
        }
    }
    if shared.db != 0 {
        let db = shared.db.to_string();
        match conn.command(&[b"SELECT", db.as_bytes()]).await {
            Ok(Reply::Status(_)) => {}
            Ok(Reply::Error(e)) => return Err(other(format!("SELECT {db} failed: {e}"))),
            Ok(reply) => return Err(other(format!("unexpected SELECT reply {reply:?}"))),
            Err(e) => return Err(io_err("SELECT", e)),
        }
    }
    Ok(conn)
}
