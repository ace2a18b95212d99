//! What the manager knows, without I/O, that a lower tier holds: the keys this process wrote
//! there or saw there, so a growing prompt's earlier chunks are not written again (write
//! once per tier).
//!
//! A tier with its own in-memory index (the disk tier, [`Tier::holds`]) answers for itself;
//! this set is for the others (Redis, kvtier servers, object stores). It learns from what
//! the tier said: a put that stored (or found) the chunk, a prefix probe that counted it, a
//! read that returned it. It forgets on evidence of absence: a probe that stopped at the
//! key (and the keys after it, useless until it is back), a read that missed, a removal, a sweep, and on any failure of the tier (a server
//! that restarted may have lost everything). Entries also go stale after half the tier's
//! retention (a Redis `ttl_sec`), so a chunk still being stored is rewritten before the
//! store expires it.
//!
//! Being wrong costs little either way: a key wrongly unknown is written once more (the
//! write is idempotent: a key names its content); a key wrongly known (another node deleted
//! it, the server evicted it) is skipped until the next lookup, which finds it absent and
//! forgets it, since a serving engine looks a prompt up before it stores it. Writes by other
//! nodes sharing the store are learnt the same way, from that lookup.
//!
//! [`Tier::holds`]: crate::tier::Tier::holds

use std::time::{Duration, Instant};

use hashlink::LruCache;
use parking_lot::Mutex;

use crate::keys::{ChunkKey, KeyBuildHasher};

/// Keys one tier is known to hold, bounded (least recently learnt or used go first).
pub(crate) struct Presence {
    /// `None`: tracking is off (capacity 0).
    known: Option<Mutex<LruCache<ChunkKey, Instant, KeyBuildHasher>>>,
    /// Knowledge older than this is stale.
    fresh_for: Option<Duration>,
}

impl Presence {
    /// Remembers up to `capacity` keys (0: none); `retention` is how long the tier keeps a
    /// chunk after it was written, when it expires chunks.
    pub(crate) fn new(capacity: usize, retention: Option<Duration>) -> Presence {
        Presence {
            known: (capacity > 0)
                .then(|| Mutex::new(LruCache::with_hasher(capacity, KeyBuildHasher::default()))),
            fresh_for: retention.map(|r| r / 2),
        }
    }

    /// Whether the tier is known to hold `key`.
    pub(crate) fn knows(&self, key: &ChunkKey) -> bool {
        let Some(known) = &self.known else {
            return false;
        };
        let mut known = known.lock();
        match known.get(key) {
            Some(at) if self.fresh_for.is_none_or(|f| at.elapsed() < f) => true,
            Some(_) => {
                known.remove(key);
                false
            }
            None => false,
        }
    }

    /// The tier holds these keys (as of now).
    pub(crate) fn learn<'a>(&self, keys: impl IntoIterator<Item = &'a ChunkKey>) {
        if let Some(known) = &self.known {
            let now = Instant::now();
            let mut known = known.lock();
            for k in keys {
                known.insert(*k, now);
            }
        }
    }

    /// The tier lacks `key` (or may).
    pub(crate) fn forget(&self, key: &ChunkKey) {
        if let Some(known) = &self.known {
            known.lock().remove(key);
        }
    }

    /// Nothing is known any more (the tier failed, was cleared or swept).
    pub(crate) fn forget_all(&self) {
        if let Some(known) = &self.known {
            known.lock().clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(b: u8) -> ChunkKey {
        ChunkKey([b; 32])
    }

    #[test]
    fn learns_forgets_and_stays_bounded() {
        let p = Presence::new(2, None);
        p.learn(&[k(1), k(2)]);
        assert!(p.knows(&k(1)) && p.knows(&k(2)));
        p.learn(&[k(3)]);
        // Bounded: the least recently used key (1 was used before 2) went.
        assert!(!p.knows(&k(1)) && p.knows(&k(2)) && p.knows(&k(3)));
        p.forget(&k(2));
        assert!(!p.knows(&k(2)));
        p.forget_all();
        assert!(!p.knows(&k(3)));
        let off = Presence::new(0, None);
        off.learn(&[k(1)]);
        assert!(!off.knows(&k(1)), "capacity 0 turns tracking off");
    }

    #[test]
    fn knowledge_goes_stale_after_half_the_retention() {
        let p = Presence::new(8, Some(Duration::from_millis(80)));
        p.learn(&[k(1)]);
        assert!(p.knows(&k(1)));
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !p.knows(&k(1)),
            "a chunk the store will expire soon is written again"
        );
    }
}
