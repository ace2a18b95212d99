//! Least-recently-used order.

use hashlink::LinkedHashMap;

use super::EvictionPolicy;
use crate::keys::{ChunkKey, KeyBuildHasher};

/// LRU: front = least recent.
#[derive(Default)]
pub struct Lru {
    order: LinkedHashMap<ChunkKey, (), KeyBuildHasher>,
}

impl EvictionPolicy for Lru {
    fn name(&self) -> &'static str {
        "lru"
    }

    fn insert(&mut self, key: ChunkKey, _size: u64) {
        self.order.replace(key, ());
    }

    fn touch(&mut self, key: &ChunkKey) {
        if self.order.contains_key(key) {
            self.order.to_back(key);
        }
    }

    fn remove(&mut self, key: &ChunkKey) {
        self.order.remove(key);
    }

    fn evict(&mut self, evictable: &mut dyn FnMut(&ChunkKey) -> bool) -> Option<ChunkKey> {
        let victim = self.order.keys().find(|k| evictable(k)).copied()?;
        self.order.remove(&victim);
        Some(victim)
    }

    fn len(&self) -> usize {
        self.order.len()
    }
}
