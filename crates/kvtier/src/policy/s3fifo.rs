//! S3-FIFO (Yang et al., SOSP'23), size-aware: a small probationary FIFO (10% of bytes), a
//! main FIFO with 2-bit access counters, and a ghost list of recently evicted keys. New keys
//! enter the small queue; only keys touched while there are promoted, so a scan of one-hit
//! keys flows through the small queue without displacing the working set.

use std::collections::VecDeque;

use hashlink::LinkedHashMap;

use super::EvictionPolicy;
use crate::keys::{ChunkKey, KeyBuildHasher, KeyMap};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Queue {
    Small,
    Main,
}

struct Entry {
    size: u64,
    freq: u8,
    queue: Queue,
    seq: u64,
}

/// S3-FIFO policy.
pub struct S3Fifo {
    capacity: u64,
    entries: KeyMap<Entry>,
    small: VecDeque<(ChunkKey, u64)>,
    main: VecDeque<(ChunkKey, u64)>,
    small_bytes: u64,
    ghost: LinkedHashMap<ChunkKey, (), KeyBuildHasher>,
    seq: u64,
}

impl S3Fifo {
    /// A policy for a tier of `capacity` bytes.
    pub fn new(capacity: u64) -> S3Fifo {
        S3Fifo {
            capacity: capacity.max(1),
            entries: KeyMap::default(),
            small: VecDeque::new(),
            main: VecDeque::new(),
            small_bytes: 0,
            ghost: LinkedHashMap::default(),
            seq: 0,
        }
    }

    fn push(&mut self, key: ChunkKey, queue: Queue) {
        self.seq += 1;
        let seq = self.seq;
        if let Some(e) = self.entries.get_mut(&key) {
            if e.queue == Queue::Small {
                self.small_bytes -= e.size;
            }
            e.queue = queue;
            e.seq = seq;
            if queue == Queue::Small {
                self.small_bytes += e.size;
            }
        }
        match queue {
            Queue::Small => self.small.push_back((key, seq)),
            Queue::Main => self.main.push_back((key, seq)),
        }
    }

    fn forget(&mut self, key: &ChunkKey) -> Option<Entry> {
        let e = self.entries.remove(key)?;
        if e.queue == Queue::Small {
            self.small_bytes -= e.size;
        }
        Some(e)
    }

    fn remember_ghost(&mut self, key: ChunkKey) {
        self.ghost.replace(key, ());
        let cap = self.entries.len().max(1024);
        while self.ghost.len() > cap {
            self.ghost.pop_front();
        }
    }
}

impl EvictionPolicy for S3Fifo {
    fn name(&self) -> &'static str {
        "s3fifo"
    }

    fn insert(&mut self, key: ChunkKey, size: u64) {
        if self.entries.contains_key(&key) {
            self.touch(&key);
            return;
        }
        let queue = if self.ghost.remove(&key).is_some() {
            Queue::Main
        } else {
            Queue::Small
        };
        self.entries.insert(
            key,
            Entry {
                size,
                freq: 0,
                queue,
                seq: 0,
            },
        );
        if queue == Queue::Small {
            self.small_bytes += size;
        }
        self.push(key, queue);
        // The queues hold stale entries after removals; rebuild them when they grow too large.
        if self.small.len() + self.main.len() > 4 * self.entries.len() + 64 {
            let entries = &self.entries;
            self.small
                .retain(|(k, s)| entries.get(k).is_some_and(|e| e.seq == *s));
            self.main
                .retain(|(k, s)| entries.get(k).is_some_and(|e| e.seq == *s));
        }
    }

    fn touch(&mut self, key: &ChunkKey) {
        if let Some(e) = self.entries.get_mut(key) {
            e.freq = (e.freq + 1).min(3);
        }
    }

    fn remove(&mut self, key: &ChunkKey) {
        self.forget(key);
    }

    fn evict(&mut self, evictable: &mut dyn FnMut(&ChunkKey) -> bool) -> Option<ChunkKey> {
        // Every pass over a queue lowers each counter; after 4 passes all evictable keys are
        // at 0, so this bound is enough to find one if one exists.
        let mut budget = 5 * (self.small.len() + self.main.len()) + 8;
        // Consecutive non-evictable pops per queue: a queue whose every entry is held is
        // skipped so the other one can still give a victim.
        let (mut small_held, mut main_held) = (0usize, 0usize);
        while budget > 0 {
            budget -= 1;
            let small_blocked = small_held >= self.small.len();
            let main_blocked = main_held >= self.main.len();
            if small_blocked && main_blocked {
                return None;
            }
            let from_small =
                !small_blocked && (main_blocked || self.small_bytes * 10 >= self.capacity);
            let popped = if from_small {
                self.small.pop_front()
            } else {
                self.main.pop_front()
            };
            let (key, seq) = popped?;
            let Some(e) = self.entries.get(&key) else {
                continue;
            };
            if e.seq != seq {
                continue; // stale queue slot
            }
            let (queue, freq) = (e.queue, e.freq);
            if !evictable(&key) {
                if from_small {
                    small_held += 1;
                } else {
                    main_held += 1;
                }
                self.push(key, queue);
                continue;
            }
            if freq > 0 {
                // Touched: small promotes to main; main gets another round with one less.
                if let Some(e) = self.entries.get_mut(&key) {
                    e.freq = if from_small { 0 } else { freq - 1 };
                }
                self.push(key, Queue::Main);
                continue;
            }
            self.forget(&key);
            if from_small {
                self.remember_ghost(key);
            }
            return Some(key);
        }
        None
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}
