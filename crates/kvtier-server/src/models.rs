//! The engines a server (or an embedded process exposing admin endpoints) serves: one
//! [`Engine`] per model identity, all attached to one [`EngineCore`].

use std::collections::HashMap;
use std::sync::Arc;

use kvtier::keys::ModelIdentity;
use kvtier::layout::{Dtype, KvLayout};
use kvtier::{Engine, EngineCore, Result};
use parking_lot::Mutex;

/// Model identity → engine, over one shared core.
pub struct Models {
    core: Arc<EngineCore>,
    map: Mutex<HashMap<ModelIdentity, Arc<Engine>>>,
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
        let e = Arc::new(Engine::attach(self.core.clone(), identity.clone())?);
        map.insert(identity, e.clone());
        Ok(e)
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
