//! Where a Redis tier's requests go: one server, or a cluster's nodes with their slot map.
//!
//! A cluster discovers slots with `CLUSTER SLOTS` and routes each key by its CRC16 slot. A
//! background task reloads the slot map periodically (`slot_refresh_sec`) and soon after a
//! node fails, so slot migrations and failovers are followed before requests run into them;
//! it asks every known node in turn (seeds first) and keeps the old map when none answers.
//! Requests mark the map stale on `MOVED` and cluster errors, and reload it before routing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;

use super::pool::{self, Node, Shared};
use super::slots::{host_of, key_slot, parse_slots, SlotRange, SLOTS};
use crate::error::{Error, Result};
use crate::transport::resp::Reply;

/// Least time between two background slot-map refreshes: node failures wake the refresher,
/// and a burst of failing requests must not turn into a burst of `CLUSTER SLOTS`.
const MIN_REFRESH_GAP: Duration = Duration::from_millis(200);

/// Where requests go.
pub(super) enum Topology {
    /// One server (or a proxy in front of several).
    Single(Arc<Node>),
    /// A Redis Cluster.
    Cluster(Cluster),
}

/// A cluster's state and its background refresher, stopped when dropped.
pub(super) struct Cluster {
    pub(super) state: Arc<ClusterState>,
    pub(super) refresher: Option<tokio::task::AbortHandle>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(t) = self.refresher.take() {
            t.abort();
        }
    }
}

impl Topology {
    /// One server at `addr`; opens one connection in the background.
    pub(super) fn single(addr: String, shared: Arc<Shared>) -> Topology {
        let node = Arc::new(Node::new(addr, shared));
        node.warm_up();
        Topology::Single(node)
    }

    /// A cluster known by its `seeds`; starts the refresher (every `every`, if given, and
    /// when woken), which loads the slot map at once.
    pub(super) fn cluster(
        tier: &str,
        shared: Arc<Shared>,
        seeds: Vec<String>,
        every: Option<Duration>,
    ) -> Topology {
        let state = Arc::new(ClusterState {
            tier: tier.to_string(),
            shared,
            seeds,
            nodes: Mutex::default(),
            map: RwLock::new(None),
            stale: AtomicBool::new(true),
            generation: AtomicU64::new(0),
            refresh_lock: tokio::sync::Mutex::new(()),
            refreshes: AtomicU64::new(0),
            refresh_failures: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            wake: Arc::new(Notify::new()),
        });
        let refresher = spawn_refresher(&state, every);
        Topology::Cluster(Cluster { state, refresher })
    }

    /// Slot-map reloads, and those where no node answered.
    pub(super) fn refresh_counts(&self) -> (u64, u64) {
        match self {
            Topology::Cluster(c) => (
                c.state.refreshes.load(Ordering::Relaxed),
                c.state.refresh_failures.load(Ordering::Relaxed),
            ),
            Topology::Single(_) => (0, 0),
        }
    }

    /// A node failed (connect or I/O error): in a cluster, wake the refresher, since a failed
    /// node is often a failover or a topology change in progress.
    pub(super) fn node_failed(&self) {
        if let Topology::Cluster(c) = self {
            c.state.wake.notify_one();
        }
    }

    /// The slot map needs reloading before the next request.
    pub(super) fn mark_stale(&self) {
        if let Topology::Cluster(c) = self {
            c.state.stale.store(true, Ordering::Release);
        }
    }

    /// The node owning `rkey`.
    pub(super) async fn route(&self, rkey: &[u8]) -> Result<Arc<Node>> {
        match self {
            Topology::Single(n) => Ok(n.clone()),
            Topology::Cluster(c) => {
                let map = c.state.slot_map().await?;
                let slot = key_slot(rkey) as usize;
                match map.owner.get(slot).cloned().flatten() {
                    Some(n) => Ok(n),
                    None => {
                        c.state.stale.store(true, Ordering::Release);
                        Err(c.state.err(format!("cluster slot {slot} has no master")))
                    }
                }
            }
        }
    }

    /// The node a redirect names (`tier` for the error when the server is no cluster node).
    pub(super) fn redirect_node(&self, tier: &str, addr: &str) -> Result<Arc<Node>> {
        match self {
            Topology::Cluster(c) => Ok(c.state.node(addr)),
            Topology::Single(_) => Err(Error::tier(
                tier,
                format!("server redirected to {addr}: it is a cluster node; use redis+cluster://"),
            )),
        }
    }

    /// Every master: the standalone node, or the cluster's slot owners (map reloaded first).
    pub(super) async fn masters(&self) -> Result<Vec<Arc<Node>>> {
        match self {
            Topology::Single(n) => Ok(vec![n.clone()]),
            Topology::Cluster(c) => {
                c.state.stale.store(true, Ordering::Release);
                let map = c.state.slot_map().await?;
                let mut out: Vec<Arc<Node>> = Vec::new();
                for n in map.owner.iter().flatten() {
                    if !out.iter().any(|o| Arc::ptr_eq(o, n)) {
                        out.push(n.clone());
                    }
                }
                Ok(out)
            }
        }
    }
}

/// Slot owners of a cluster.
struct SlotMap {
    owner: Vec<Option<Arc<Node>>>,
}

/// A cluster's nodes and slot map; shared (weakly) with the background refresher.
pub(super) struct ClusterState {
    tier: String,
    shared: Arc<Shared>,
    seeds: Vec<String>,
    nodes: Mutex<HashMap<String, Arc<Node>>>,
    map: RwLock<Option<Arc<SlotMap>>>,
    stale: AtomicBool,
    generation: AtomicU64,
    refresh_lock: tokio::sync::Mutex<()>,
    refreshes: AtomicU64,
    refresh_failures: AtomicU64,
    /// Whether the last refresh failed (log the first failure and the recovery only).
    failing: AtomicBool,
    /// Wakes the background refresher ahead of its period.
    wake: Arc<Notify>,
}

impl ClusterState {
    fn err(&self, msg: impl Into<String>) -> Error {
        Error::tier(&self.tier, msg)
    }

    fn node(&self, addr: &str) -> Arc<Node> {
        self.nodes
            .lock()
            .entry(addr.to_string())
            .or_insert_with(|| Arc::new(Node::new(addr.to_string(), self.shared.clone())))
            .clone()
    }

    /// Asks one node for the slot ranges.
    async fn ask_slots(&self, node: &Node, addr: &str) -> Result<Vec<SlotRange>> {
        let mut lease = node.acquire().await?;
        let reply = match lease.conn().command(&[b"CLUSTER", b"SLOTS"]).await {
            Ok(r) => r,
            Err(e) => {
                drop(lease);
                node.io_failed(&e);
                return Err(node.io_error(e));
            }
        };
        lease.done();
        match parse_slots(&reply, host_of(addr)) {
            Some(r) if !r.is_empty() => Ok(r),
            _ => Err(node.error(format_args!(
                "CLUSTER SLOTS gave no usable slot map ({})",
                match &reply {
                    Reply::Error(e) => e.as_str(),
                    _ => "malformed or empty reply",
                }
            ))),
        }
    }

    /// Reloads the slot map from the first node that answers `CLUSTER SLOTS`: the seeds,
    /// then every node discovered so far. When none answers, the old map stays.
    /// `per_node` bounds each node's turn (the background task; requests have deadlines).
    async fn refresh(&self, per_node: Option<Duration>) -> Result<()> {
        let seen = self.generation.load(Ordering::Acquire);
        let _g = self.refresh_lock.lock().await;
        if self.generation.load(Ordering::Acquire) != seen {
            return Ok(()); // refreshed while we waited
        }
        let mut candidates = self.seeds.clone();
        let mut known: Vec<String> = self.nodes.lock().keys().cloned().collect();
        known.sort();
        for k in known {
            if !candidates.contains(&k) {
                candidates.push(k);
            }
        }
        let mut last = self.err("no cluster node to ask for slots");
        for addr in candidates {
            let node = self.node(&addr);
            let asked = match per_node {
                Some(t) => tokio::time::timeout(t, self.ask_slots(&node, &addr))
                    .await
                    .unwrap_or_else(|_| {
                        Err(node.error(format_args!(
                            "CLUSTER SLOTS took longer than {} ms",
                            t.as_millis()
                        )))
                    }),
                None => self.ask_slots(&node, &addr).await,
            };
            let ranges = match asked {
                Ok(r) => r,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            let mut owner: Vec<Option<Arc<Node>>> = vec![None; SLOTS];
            for r in &ranges {
                let n = self.node(&r.addr);
                for slot in owner[r.start as usize..=r.end as usize].iter_mut() {
                    *slot = Some(n.clone());
                }
            }
            let served = owner.iter().filter(|o| o.is_some()).count();
            let old = self.map.read().clone();
            let moved = old.as_ref().map_or(0, |m| {
                m.owner
                    .iter()
                    .zip(&owner)
                    .filter(|(a, b)| match (a, b) {
                        (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
                        (None, None) => false,
                        _ => true,
                    })
                    .count()
            });
            if moved > 0 {
                tracing::info!(tier = %self.tier, moved, served, "cluster slot map changed");
            } else {
                tracing::debug!(tier = %self.tier, ranges = ranges.len(), served, "cluster slot map loaded");
            }
            if self.failing.swap(false, Ordering::AcqRel) {
                tracing::info!(tier = %self.tier, from = %addr, "cluster slot map reloaded again");
            }
            *self.map.write() = Some(Arc::new(SlotMap { owner }));
            self.stale.store(false, Ordering::Release);
            self.refreshes.fetch_add(1, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::AcqRel);
            return Ok(());
        }
        self.refresh_failures.fetch_add(1, Ordering::Relaxed);
        if !self.failing.swap(true, Ordering::AcqRel) {
            tracing::warn!(tier = %self.tier, error = %last, "no cluster node answered CLUSTER SLOTS; keeping the previous slot map");
        }
        Err(last)
    }

    async fn slot_map(&self) -> Result<Arc<SlotMap>> {
        if self.stale.load(Ordering::Acquire) {
            let r = self.refresh(None).await;
            let have = self.map.read().clone();
            match (r, have) {
                (_, Some(m)) => return Ok(m), // a failed refresh keeps the old map
                (Err(e), None) => return Err(e),
                (Ok(()), None) => {}
            }
        }
        self.map
            .read()
            .clone()
            .ok_or_else(|| self.err("cluster slot map unavailable"))
    }
}

/// Starts the background slot-map refresher of a cluster: every `every` (if any), and when
/// woken (startup, node failures). It holds the state weakly and is aborted when the tier is
/// dropped, so no task outlives the tier.
fn spawn_refresher(
    cs: &Arc<ClusterState>,
    every: Option<Duration>,
) -> Option<tokio::task::AbortHandle> {
    let weak: Weak<ClusterState> = Arc::downgrade(cs);
    let wake = cs.wake.clone();
    let per_node = (cs.shared.link.connect_timeout * 2).max(Duration::from_secs(1));
    let rt = pool::runtime().ok()?;
    // Load the map at startup instead of on the first request.
    wake.notify_one();
    let task = rt.spawn(async move {
        loop {
            match every {
                Some(period) => {
                    tokio::select! {
                        _ = tokio::time::sleep(period) => {}
                        _ = wake.notified() => {}
                    }
                }
                None => wake.notified().await,
            }
            let Some(cs) = weak.upgrade() else { return };
            // Failures are logged (once) and counted inside.
            let _ = cs.refresh(Some(per_node)).await;
            drop(cs);
            tokio::time::sleep(MIN_REFRESH_GAP).await;
        }
    });
    Some(task.abort_handle())
}
