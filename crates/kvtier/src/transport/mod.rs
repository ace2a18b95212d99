//! Network transports used by remote tiers: RESP for Redis/Valkey, and the framed protocol
//! of `kvtier serve` ([`wire`]), shared by the server, its client and the `kvtier://` tier.

pub(crate) mod link;
pub(crate) mod record;
pub mod resp;
pub mod stream;
pub mod wire;

use std::sync::OnceLock;

use crate::error::{Error, Result};

/// The runtime that owns network sockets' I/O registration and runs connects. The
/// manager's runtime has only a timer; established connections registered here are then
/// driven directly by the caller's task, so a connect never depends on the caller's
/// runtime having an I/O driver.
pub(crate) fn io_runtime() -> Result<&'static tokio::runtime::Runtime> {
    static RT: OnceLock<Option<tokio::runtime::Runtime>> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("kvtier-net-io")
            .enable_all()
            .build()
            .map_err(|e| tracing::error!(error = %e, "cannot start the network I/O runtime"))
            .ok()
    })
    .as_ref()
    .ok_or_else(|| Error::invalid("the network I/O runtime could not be started"))
}
