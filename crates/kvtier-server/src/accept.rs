//! Accept loops: the wire listeners' (connection cap, one task per connection) and, shared
//! with the admin listener, how accept failures are paced and logged.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvtier::transport::wire::{self as proto, ErrorCode, Response};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::limits::Admitted;
use crate::state::ServerState;

/// First pause after a failed accept; it doubles up to [`MAX_PAUSE`] while accepts fail.
const FIRST_PAUSE: Duration = Duration::from_millis(10);
/// Longest pause between accepts while they fail.
const MAX_PAUSE: Duration = Duration::from_secs(1);

/// Paces and logs accept failures: out of file descriptors (EMFILE, ENFILE) or memory,
/// accept fails again at once until something closes, so the loop pauses (10 ms doubling
/// to 1 s) and logs one line when an episode starts and one when it ends.
pub(crate) struct AcceptBackoff {
    listener: &'static str,
    episode: Option<(Instant, u64)>,
    pause: Duration,
}

impl AcceptBackoff {
    /// Backoff for the listener named `listener` in logs.
    pub(crate) fn new(listener: &'static str) -> AcceptBackoff {
        AcceptBackoff {
            listener,
            episode: None,
            pause: FIRST_PAUSE,
        }
    }

    /// Records a failed accept and waits before the next one.
    pub(crate) async fn failed(&mut self, e: &io::Error) {
        let pause = self.record_failure(e);
        tokio::time::sleep(pause).await;
    }

    /// Records a failed accept (logging it when it starts an episode); the pause to make.
    fn record_failure(&mut self, e: &io::Error) -> Duration {
        match &mut self.episode {
            Some((_, n)) => *n += 1,
            None => {
                warn!(
                    listener = self.listener,
                    error = %e,
                    "accept failed; retrying with a pause, logged again once it works"
                );
                self.episode = Some((Instant::now(), 1));
            }
        }
        let pause = self.pause;
        self.pause = (self.pause * 2).min(MAX_PAUSE);
        pause
    }

    /// Records a successful accept (ends an episode of failures).
    pub(crate) fn succeeded(&mut self) {
        if let Some((since, failures)) = self.episode.take() {
            info!(
                listener = self.listener,
                failures,
                after = ?since.elapsed(),
                "accepting again"
            );
        }
        self.pause = FIRST_PAUSE;
    }
}

/// A listener the wire accept loop drives: Unix socket or TCP.
pub(crate) trait Listener: Send + 'static {
    /// The connection type it yields.
    type Stream: Send + 'static;
    /// Name in logs.
    const NAME: &'static str;
    /// Waits for the next connection.
    fn next(&self) -> impl std::future::Future<Output = io::Result<Self::Stream>> + Send + '_;
    /// Writes what fits of `bytes` without waiting (to a connection about to be closed).
    fn try_send(stream: &Self::Stream, bytes: &[u8]);
}

impl Listener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    const NAME: &'static str = "unix";
    async fn next(&self) -> io::Result<Self::Stream> {
        self.accept().await.map(|(s, _)| s)
    }
    fn try_send(stream: &Self::Stream, bytes: &[u8]) {
        let _ = stream.try_write(bytes);
    }
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    const NAME: &'static str = "tcp";
    async fn next(&self) -> io::Result<Self::Stream> {
        self.accept().await.map(|(s, _)| s)
    }
    fn try_send(stream: &Self::Stream, bytes: &[u8]) {
        let _ = stream.try_write(bytes);
    }
}

/// Accepts connections until shutdown, each served on its own task while it holds one of
/// the [`crate::limits::Limits::max_connections`] slots; over the cap, a connection gets an
/// error frame and is closed at once (one log line per episode).
pub(crate) fn spawn_accept_loop<L, F, Fut>(
    listener: L,
    state: Arc<ServerState>,
    mut shutdown: watch::Receiver<bool>,
    serve: F,
) -> tokio::task::JoinHandle<()>
where
    L: Listener,
    F: Fn(L::Stream, Arc<ServerState>, Admitted) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut backoff = AcceptBackoff::new(L::NAME);
        let mut refusing = false;
        let busy = busy_frame(state.gates.limits().max_connections);
        loop {
            let stream = tokio::select! {
                r = listener.next() => r,
                _ = shutdown.changed() => break,
            };
            let stream = match stream {
                Ok(s) => {
                    backoff.succeeded();
                    s
                }
                Err(e) => {
                    backoff.failed(&e).await;
                    continue;
                }
            };
            match state.gates.admit() {
                Some(slot) => {
                    if refusing {
                        refusing = false;
                        info!(listener = L::NAME, "below the connection cap again");
                    }
                    tokio::spawn(serve(stream, state.clone(), slot));
                }
                None => {
                    if !refusing {
                        refusing = true;
                        warn!(
                            listener = L::NAME,
                            max_connections = state.gates.limits().max_connections,
                            "connection cap reached: refusing new connections (--max-connections)"
                        );
                    }
                    L::try_send(&stream, &busy);
                }
            }
        }
    })
}

/// The error frame a connection over the cap gets.
fn busy_frame(max: usize) -> Vec<u8> {
    let reply = Response::Error {
        code: ErrorCode::Engine,
        message: format!(
            "server busy: {max} connections are open (--max-connections); try again later"
        ),
    };
    proto::encode(&reply, &[]).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_a_second_and_reset_on_success() {
        let mut b = AcceptBackoff::new("test");
        let e = io::Error::from_raw_os_error(libc::EMFILE);
        let pauses: Vec<Duration> = (0..10).map(|_| b.record_failure(&e)).collect();
        assert_eq!(pauses[0], FIRST_PAUSE);
        assert_eq!(pauses[1], FIRST_PAUSE * 2);
        assert_eq!(pauses[9], MAX_PAUSE);
        assert_eq!(b.episode.map(|x| x.1), Some(10));
        b.succeeded();
        assert_eq!((b.pause, b.episode.is_none()), (FIRST_PAUSE, true));
    }
}
