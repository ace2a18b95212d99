//! The first frame of a connection: `Hello` (a model connection) or `HelloPeer` (a
//! chunk-level one), its version and auth token checks, and the `HelloOk` reply.

use std::sync::Arc;
use std::time::Duration;

use kvtier::keys::ModelIdentity;
use kvtier::transport::wire::{self as proto, ErrorCode, Request, Response};
use kvtier::Engine;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::warn;

use crate::io::{err, read_body, read_len, write_msg};
use crate::limits::SMALL_FRAME;
use crate::state::ServerState;

/// Which listener a connection came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Local Unix socket (may map the pool).
    Unix,
    /// TCP (payload in frames, token required when configured).
    Tcp,
}

/// Time a new connection has to send its Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest Hello frame accepted (a model identity is well under 1 KiB): what a connection
/// that has not authenticated can make the server hold.
const MAX_HELLO: usize = SMALL_FRAME;
/// Characters of a client name kept for logs.
const MAX_CLIENT_NAME: usize = 128;

/// An accepted model connection.
pub(crate) struct Hello {
    /// The engine of the client's model.
    pub(crate) engine: Arc<Engine>,
    /// Whether the client maps the pool (the descriptor follows `HelloOk`).
    pub(crate) shm: bool,
    /// Client name for logs.
    pub(crate) client: String,
}

/// What the first frame opened.
pub(crate) enum Greeting {
    /// A model connection ([`Request::Hello`]).
    Model(Hello),
    /// A chunk-level connection of another engine using this server as a tier
    /// ([`Request::HelloPeer`]).
    Peer {
        /// Client name for logs.
        client: String,
    },
}

/// Reads and checks the Hello (or HelloPeer); replies HelloOk or an error. While it waits,
/// the connection holds one of the [`crate::limits::Limits::max_handshakes`] places and
/// gives up when a newer connection takes it.
pub(crate) async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    state: &ServerState,
    transport: Transport,
) -> Option<Greeting> {
    let body = {
        let slot = state.gates.handshake();
        tokio::select! {
            b = read_hello(stream) => b?,
            _ = slot.evicted() => return None,
        }
    };
    match greet(state, transport, &body) {
        Ok(g) => {
            write_msg(stream, &hello_ok(state, &g), &[]).await.ok()?;
            Some(g)
        }
        Err(reply) => {
            if let Response::Error { message, .. } = &reply {
                // Debug-formatted: the message may quote client input (no forged lines).
                warn!(?transport, ?message, "handshake refused");
            }
            let _ = write_msg(stream, &reply, &[]).await;
            None
        }
    }
}

/// The first frame's body, within [`HELLO_TIMEOUT`]; a failure is answered and gives `None`.
async fn read_hello<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) -> Option<Vec<u8>> {
    let read = async {
        match read_len(stream, MAX_HELLO).await? {
            Some(len) => read_body(stream, len, HELLO_TIMEOUT).await.map(Some),
            None => Ok(None),
        }
    };
    let why = match tokio::time::timeout(HELLO_TIMEOUT, read).await {
        Ok(Ok(body)) => return body,
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no Hello in time".to_string(),
    };
    let _ = write_msg(stream, &err(ErrorCode::Protocol, why), &[]).await;
    None
}

/// Checks a first frame and opens what it asks for.
fn greet(state: &ServerState, transport: Transport, body: &[u8]) -> Result<Greeting, Response> {
    let (req, _) =
        proto::decode::<Request>(body).map_err(|e| err(ErrorCode::Protocol, e.to_string()))?;
    match req {
        Request::HelloPeer {
            magic,
            version,
            client_name,
            auth_token,
        } => {
            check_magic(magic)?;
            check_version(version, proto::PEER_PROTOCOL_VERSION)?;
            check_token(state, transport, auth_token.as_deref())?;
            Ok(Greeting::Peer {
                client: log_name(&client_name),
            })
        }
        Request::Hello {
            magic,
            version,
            client_name,
            identity_json,
            chunk_size,
            auth_token,
            want_shm,
        } => {
            check_magic(magic)?;
            check_version(version, proto::MIN_PROTOCOL_VERSION)?;
            check_token(state, transport, auth_token.as_deref())?;
            let engine = attach_model(state, &identity_json, chunk_size)?;
            Ok(Greeting::Model(Hello {
                engine,
                shm: want_shm && transport == Transport::Unix && state.pool_fd.is_some(),
                client: log_name(&client_name),
            }))
        }
        _ => Err(err(ErrorCode::Protocol, "the first frame must be Hello")),
    }
}

/// A client's name as logs show it: at most [`MAX_CLIENT_NAME`] characters, control
/// characters escaped (a line break in a name cannot forge a log line).
fn log_name(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars().take(MAX_CLIENT_NAME) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The engine of the model a Hello names, once its chunk size matches the server's.
fn attach_model(
    state: &ServerState,
    identity_json: &str,
    chunk_size: Option<u32>,
) -> Result<Arc<Engine>, Response> {
    let identity: ModelIdentity = serde_json::from_str(identity_json).map_err(|e| {
        err(
            ErrorCode::InvalidInput,
            format!("model identity is not valid JSON: {e}"),
        )
    })?;
    let cs = state.models.core().config().chunk_size;
    if let Some(c) = chunk_size {
        if c as usize != cs {
            return Err(err(
                ErrorCode::InvalidInput,
                format!("client expects chunk_size {c}; this server uses {cs}"),
            ));
        }
    }
    state
        .models
        .get_or_attach(identity)
        .map_err(|e| proto::error_reply(&e))
}

/// The reply to an accepted first frame.
fn hello_ok(state: &ServerState, g: &Greeting) -> Response {
    let core = state.models.core();
    let cfg = core.config();
    let (bytes_per_token, shm) = match g {
        Greeting::Model(h) => (h.engine.bytes_per_token() as u64, h.shm),
        Greeting::Peer { .. } => (0, false),
    };
    Response::HelloOk {
        version: proto::PROTOCOL_VERSION,
        server_name: state.name.clone(),
        chunk_size: cfg.chunk_size as u32,
        save_unfull_chunk: cfg.save_unfull_chunk,
        bytes_per_token,
        shm_pool_bytes: shm.then(|| core.manager().pool().capacity()),
        max_frame: state.max_frame as u64,
    }
}

fn check_magic(magic: u32) -> Result<(), Response> {
    if magic == proto::MAGIC {
        Ok(())
    } else {
        Err(err(ErrorCode::Protocol, "bad magic"))
    }
}

fn check_version(version: u16, min: u16) -> Result<(), Response> {
    if (min..=proto::PROTOCOL_VERSION).contains(&version) {
        return Ok(());
    }
    Err(err(
        ErrorCode::Protocol,
        format!(
            "protocol version {version} is not supported here (this server speaks {min} to {}); upgrade the older side",
            proto::PROTOCOL_VERSION
        ),
    ))
}

fn check_token(
    state: &ServerState,
    transport: Transport,
    token: Option<&str>,
) -> Result<(), Response> {
    if transport == Transport::Tcp {
        if let Some(want) = &state.auth_token {
            if !token.is_some_and(|t| tokens_eq_ct(t, want)) {
                return Err(err(
                    ErrorCode::Unauthorized,
                    "missing or wrong auth token (set KVTIER_AUTH_TOKEN)",
                ));
            }
        }
    }
    Ok(())
}

/// Whether two tokens are equal, in constant time whatever their lengths.
pub(crate) fn tokens_eq_ct(a: &str, b: &str) -> bool {
    // Compare digests: blake3::Hash's == is constant time.
    blake3::hash(a.as_bytes()) == blake3::hash(b.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_names_in_logs_have_no_control_characters() {
        assert_eq!(log_name("a\nb\r\u{1b}[31m"), "a\\nb\\r\\u{1b}[31m");
        assert_eq!(log_name("gpu-0 é"), "gpu-0 é");
        assert_eq!(log_name(&"x".repeat(500)).len(), MAX_CLIENT_NAME);
    }
}
