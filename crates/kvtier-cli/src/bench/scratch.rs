//! What a bench writes into a store it does not own (a `kvtier serve` it was pointed at, a
//! user's Redis): kept under a namespace private to the run (a salt, a key prefix) and
//! removed at the end, on an error, and on Ctrl-C. A bench never deletes anything it did
//! not write: no `Clear`, no flush, only its own namespace.

use std::sync::{Arc, Mutex, Weak};

use anyhow::Result;
use tracing::{info, warn};

/// A name unique to this run (`kvtier-bench-<pid>-<16 hex digits>`): the salt or key
/// prefix of the data it writes.
pub fn run_id() -> String {
    format!(
        "kvtier-bench-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    )
}

/// How the scratch data is removed; returns how much was.
type Cleanup = Box<dyn FnOnce() -> Result<u64> + Send>;

struct Inner {
    /// What the data is, for logs (`salt ... on unix:/run/kvtier.sock`).
    what: String,
    cleanup: Mutex<Option<Cleanup>>,
}

impl Inner {
    /// Runs the cleanup unless it already ran.
    fn run(&self) -> Option<Result<u64>> {
        let f = self
            .cleanup
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        let r = f();
        match &r {
            Ok(n) => info!(what = %self.what, removed = n, "bench data removed"),
            Err(e) => warn!(
                what = %self.what,
                error = %format!("{e:#}"),
                "could not remove the bench's data; remove it by hand"
            ),
        }
        Some(r)
    }
}

/// The data of one run in a shared store, removed exactly once: by [`Scratch::finish`],
/// when dropped (an error path), or on Ctrl-C (then the process exits with status 130; a
/// second Ctrl-C exits at once).
pub struct Scratch {
    inner: Arc<Inner>,
}

impl Scratch {
    /// Registers data described by `what`, which `cleanup` removes.
    pub fn new(what: String, cleanup: impl FnOnce() -> Result<u64> + Send + 'static) -> Scratch {
        info!(what = %what, "bench writes only under a private namespace, removed at the end");
        let inner = Arc::new(Inner {
            what,
            cleanup: Mutex::new(Some(Box::new(cleanup))),
        });
        on_interrupt(Arc::downgrade(&inner));
        Scratch { inner }
    }

    /// Removes the data now; returns how much was removed.
    pub fn finish(self) -> Result<u64> {
        self.inner.run().unwrap_or(Ok(0))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Errors are logged by `run`.
        let _ = self.inner.run();
    }
}

/// The scratch data to remove on Ctrl-C.
static PENDING: Mutex<Vec<Weak<Inner>>> = Mutex::new(Vec::new());

/// Registers `inner` for Ctrl-C, starting the watcher thread on first use (benches that
/// write nothing shared keep the default Ctrl-C behaviour).
fn on_interrupt(inner: Weak<Inner>) {
    let mut pending = PENDING.lock().unwrap_or_else(|p| p.into_inner());
    let first = pending.is_empty();
    pending.retain(|w| w.strong_count() > 0);
    pending.push(inner);
    drop(pending);
    if !first {
        return;
    }
    let started = std::thread::Builder::new()
        .name("kvtier-bench-ctrl-c".into())
        .spawn(watch_interrupt);
    if let Err(e) = started {
        warn!(error = %e, "no Ctrl-C handler: an interrupted bench leaves its data behind");
    }
}

/// Waits for Ctrl-C, removes the pending scratch data (unless Ctrl-C comes again), exits.
fn watch_interrupt() {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            warn!(error = %e, "no Ctrl-C handler: an interrupted bench leaves its data behind");
            return;
        }
    };
    rt.block_on(async {
        if tokio::signal::ctrl_c().await.is_err() {
            return;
        }
        warn!("interrupted: removing the bench's data (Ctrl-C again to skip)");
        let pending: Vec<Arc<Inner>> = PENDING
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        let cleanup = tokio::task::spawn_blocking(move || {
            for p in pending {
                let _ = p.run();
            }
        });
        tokio::select! {
            _ = cleanup => {}
            _ = tokio::signal::ctrl_c() => warn!("interrupted again: the bench's data is left behind"),
        }
        std::process::exit(130);
    });
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn run_ids_differ() {
        let (a, b) = (run_id(), run_id());
        assert_ne!(a, b);
        assert!(a.starts_with("kvtier-bench-"), "{a}");
    }

    #[test]
    fn cleanup_runs_once_at_finish_or_drop() {
        static RUNS: AtomicUsize = AtomicUsize::new(0);
        let s = Scratch::new("test".into(), || {
            Ok(RUNS.fetch_add(1, Ordering::SeqCst) as u64 + 7)
        });
        assert_eq!(s.finish().unwrap(), 7);
        assert_eq!(RUNS.load(Ordering::SeqCst), 1);
        {
            let _s = Scratch::new("test".into(), || {
                RUNS.fetch_add(1, Ordering::SeqCst);
                anyhow::bail!("store gone")
            });
        }
        assert_eq!(RUNS.load(Ordering::SeqCst), 2, "dropped: cleaned up");
    }
}
