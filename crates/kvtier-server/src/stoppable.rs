//! A background service thread (admin listener, KV-event publisher) that runs until told
//! to stop; stopping signals it and joins it, and so does dropping it.

use tokio::sync::oneshot;

/// A thread with its stop signal; stopped and joined on [`StoppableThread::stop`] or drop.
pub(crate) struct StoppableThread {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StoppableThread {
    /// Owns `thread`, which stops when `stop` fires (or is dropped).
    pub(crate) fn new(stop: oneshot::Sender<()>, thread: std::thread::JoinHandle<()>) -> Self {
        StoppableThread {
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Signals the thread and waits for it; later calls do nothing.
    pub(crate) fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for StoppableThread {
    fn drop(&mut self) {
        self.stop();
    }
}
