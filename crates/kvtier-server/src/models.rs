//! The engines a server (or an embedded process exposing admin endpoints) serves: one
//! [`Engine`] per model identity, all attached to one [`EngineCore`].
//!
//! Models clients connect with are kept while the server runs. Models that only admin calls
//! named (`/lookup`, `/pin` with a full identity) go to a second, bounded registry
//! ([`MAX_PROBED`], least recently used dropped first): anyone can make up identities, and
//! each would otherwise be kept forever.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use kvtier::keys::ModelIdentity;
use kvtier::layout::{Dtype, KvLayout};
use kvtier::{Engine, EngineCore, Result};
use parking_lot::Mutex;

/// Most models kept that only admin calls named.
pub const MAX_PROBED: usize = 64;

/// Model identity → engine, over one shared core.
pub struct Models {
    core: Arc<EngineCore>,
    map: Mutex<HashMap<ModelIdentity, Arc<Engine>>>,
    /// Models only admin calls named, least recently used first.
    probed: Mutex<VecDeque<(ModelIdentity, Arc<Engine>)>>,
    admin: Mutex<Option<Arc<Engine>>>,
}

impl std::fmt::Debug for Models {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Models")
            .field("models", &self.map.lock().len())
            .finish()
    }
}

impl Models {
    /// An empty registry over `core`.
    pub fn new(core: Arc<EngineCore>) -> Arc<Models> {
        Arc::new(Models {
            core,
            map: Mutex::new(HashMap::new()),
            probed: Mutex::new(VecDeque::new()),
            admin: Mutex::new(None),
        })
    }

    /// The shared core.
    pub fn core(&self) -> &Arc<EngineCore> {
        &self.core
    }

    /// The engine for `identity`, attaching one on first use.
    pub fn get_or_attach(&self, identity: ModelIdentity) -> Result<Arc<Engine>> {
        let mut map = self.map.lock();
        if let Some(e) = map.get(&identity) {
            return Ok(e.clone());
        }
        // A model an admin call named first moves over (one engine per identity).
        let probed = {
            let mut probed = self.probed.lock();
            let i = probed.iter().position(|(id, _)| *id == identity);
            i.and_then(|i| probed.remove(i)).map(|x| x.1)
        };
        let e = match probed {
            Some(e) => e,
            None => Arc::new(Engine::attach(self.core.clone(), identity.clone())?),
        };
        map.insert(identity, e.clone());
        Ok(e)
    }

    /// The engine for `identity` for an admin call: a client's model when one connected
    /// with it, else one from the bounded registry of probed models (attached on first
    /// use, the least recently used one dropped when [`MAX_PROBED`] are kept).
    pub fn get_or_probe(&self, identity: ModelIdentity) -> Result<Arc<Engine>> {
        if let Some(e) = self.map.lock().get(&identity) {
            return Ok(e.clone());
        }
        let mut probed = self.probed.lock();
        if let Some(i) = probed.iter().position(|(id, _)| *id == identity) {
            if let Some(hit) = probed.remove(i) {
                let e = hit.1.clone();
                probed.push_back(hit);
                return Ok(e);
            }
        }
        let e = Arc::new(Engine::attach(self.core.clone(), identity.clone())?);
        while probed.len() >= MAX_PROBED {
            probed.pop_front();
        }
        probed.push_back((identity, e.clone()));
        Ok(e)
    }

    /// How many models only admin calls named are kept.
    pub fn probed_len(&self) -> usize {
        self.probed.lock().len()
    }

    /// Registers an engine built elsewhere (an embedded process's own engine).
    pub fn register(&self, engine: Arc<Engine>) {
        let id = (**engine.key_space().identity()).clone();
        self.map.lock().insert(id, engine);
    }

    /// The first registered engine whose model name is `name` (any rank).
    pub fn by_name(&self, name: &str) -> Option<Arc<Engine>> {
        let map = self.map.lock();
        let mut hits: Vec<&Arc<Engine>> = map
            .iter()
            .filter(|(id, _)| id.model_name == name)
            .map(|(_, e)| e)
            .collect();
        hits.sort_by_key(|e| e.key_space().identity().rank);
        hits.first().map(|e| (*e).clone())
    }

    /// Registered identities.
    pub fn identities(&self) -> Vec<ModelIdentity> {
        self.map.lock().keys().cloned().collect()
    }

    /// An engine for core-wide operations (stats, metrics, clear): any registered one, or
    /// a private tiny one when no model is registered yet.
    pub fn any(&self) -> Result<Arc<Engine>> {
        if let Some(e) = self.map.lock().values().next() {
            return Ok(e.clone());
        }
        let mut admin = self.admin.lock();
        if let Some(e) = admin.as_ref() {
            return Ok(e.clone());
        }
        let id = ModelIdentity::new("_kvtier_admin", KvLayout::simple(1, 1, 1, Dtype::F16));
        let e = Arc::new(Engine::attach(self.core.clone(), id)?);
        *admin = Some(e.clone());
        Ok(e)
    }
}
