//! Offset-based extent allocator over one contiguous region: best-fit with coalescing.
//!
//! Pure bookkeeping (no memory is touched), so it can live beside a region mapped by other
//! processes: everything is an offset into the pool, never a process pointer.

use std::collections::{BTreeMap, BTreeSet};

/// Allocation granularity: every extent starts and ends on a 4 KiB boundary, which O_DIRECT
/// needs and which avoids the 16-byte-offset slow path of `read()` into the pool.
pub const PAGE: u64 = 4096;

/// Rounds `len` up to the allocation granularity (at least one page).
pub fn round_up(len: u64) -> u64 {
    len.max(1).div_ceil(PAGE) * PAGE
}

/// Free and used extents of a region.
#[derive(Debug)]
pub struct ExtentAllocator {
    capacity: u64,
    free_by_offset: BTreeMap<u64, u64>,
    free_by_size: BTreeSet<(u64, u64)>,
    used: BTreeMap<u64, u64>,
    used_bytes: u64,
}

impl ExtentAllocator {
    /// An allocator over `capacity` bytes (rounded down to whole pages).
    pub fn new(capacity: u64) -> ExtentAllocator {
        let capacity = capacity / PAGE * PAGE;
        let mut a = ExtentAllocator {
            capacity,
            free_by_offset: BTreeMap::new(),
            free_by_size: BTreeSet::new(),
            used: BTreeMap::new(),
            used_bytes: 0,
        };
        if capacity > 0 {
            a.insert_free(0, capacity);
        }
        a
    }

    fn insert_free(&mut self, off: u64, len: u64) {
        self.free_by_offset.insert(off, len);
        self.free_by_size.insert((len, off));
    }

    fn remove_free(&mut self, off: u64, len: u64) {
        self.free_by_offset.remove(&off);
        self.free_by_size.remove(&(len, off));
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes currently allocated.
    pub fn used_bytes(&self) -> u64 {
        self.used_bytes
    }

    /// Bytes currently free (possibly fragmented).
    pub fn free_bytes(&self) -> u64 {
        self.capacity - self.used_bytes
    }

    /// Largest contiguous free extent.
    pub fn largest_free(&self) -> u64 {
        self.free_by_size.iter().next_back().map_or(0, |&(l, _)| l)
    }

    /// Allocates `cap` bytes (a multiple of [`PAGE`]); best fit, lowest offset on ties.
    pub fn alloc(&mut self, cap: u64) -> Option<u64> {
        debug_assert!(cap > 0 && cap % PAGE == 0);
        let &(len, off) = self.free_by_size.range((cap, 0)..).next()?;
        self.remove_free(off, len);
        if len > cap {
            self.insert_free(off + cap, len - cap);
        }
        self.used.insert(off, cap);
        self.used_bytes += cap;
        Some(off)
    }

    /// Frees an extent returned by [`ExtentAllocator::alloc`], merging with free neighbours.
    /// Returns false (and changes nothing) for an unknown extent.
    pub fn free(&mut self, off: u64, cap: u64) -> bool {
        if self.used.get(&off) != Some(&cap) {
            return false;
        }
        self.used.remove(&off);
        self.used_bytes -= cap;
        let (mut start, mut len) = (off, cap);
        if let Some((&poff, &plen)) = self.free_by_offset.range(..off).next_back() {
            if poff + plen == off {
                self.remove_free(poff, plen);
                start = poff;
                len += plen;
            }
        }
        if let Some(&nlen) = self.free_by_offset.get(&(off + cap)) {
            self.remove_free(off + cap, nlen);
            len += nlen;
        }
        self.insert_free(start, len);
        true
    }

    /// Used extents in offset order.
    pub fn used_extents(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.used.iter().map(|(&o, &l)| (o, l))
    }

    /// Plans a compaction: slides every extent for which `movable(offset)` is true towards
    /// offset 0, leaving the others in place. Returns the moves `(from, to, cap)` in an order
    /// that is safe to execute with overlapping `memmove`s, and updates the bookkeeping.
    pub fn compact(&mut self, mut movable: impl FnMut(u64) -> bool) -> Vec<(u64, u64, u64)> {
        let extents: Vec<(u64, u64)> = self.used_extents().collect();
        let mut moves = Vec::new();
        let mut used = BTreeMap::new();
        let mut cursor = 0u64;
        // Pinned extents split the region into windows; movable ones fill each window from
        // its start. `next_fixed` is the start of the next immovable extent.
        let fixed: Vec<(u64, u64)> = extents
            .iter()
            .copied()
            .filter(|&(o, _)| !movable(o))
            .collect();
        let mut fixed_iter = fixed.iter().peekable();
        for &(off, cap) in &extents {
            if fixed.binary_search(&(off, cap)).is_ok() {
                used.insert(off, cap);
                cursor = cursor.max(off + cap);
                fixed_iter.next();
                continue;
            }
            // Skip past fixed extents that the move would overlap.
            let mut target = cursor;
            for &(fo, fl) in fixed_iter.clone() {
                if target + cap <= fo {
                    break;
                }
                target = target.max(fo + fl);
            }
            if target > off {
                target = off; // never move up
            }
            if target != off {
                moves.push((off, target, cap));
            }
            used.insert(target, cap);
            cursor = target + cap;
        }
        // Rebuild the free lists from the new used map.
        self.used = used;
        self.free_by_offset.clear();
        self.free_by_size.clear();
        let mut pos = 0u64;
        let used: Vec<(u64, u64)> = self.used.iter().map(|(&o, &l)| (o, l)).collect();
        for (o, l) in used {
            if o > pos {
                self.insert_free(pos, o - pos);
            }
            pos = o + l;
        }
        if pos < self.capacity {
            self.insert_free(pos, self.capacity - pos);
        }
        moves
    }

    /// Checks internal consistency (tests and debug assertions).
    pub fn check(&self) -> Result<(), String> {
        let mut all: Vec<(u64, u64, bool)> = self
            .used
            .iter()
            .map(|(&o, &l)| (o, l, true))
            .chain(self.free_by_offset.iter().map(|(&o, &l)| (o, l, false)))
            .collect();
        all.sort();
        let mut pos = 0;
        let mut prev_free = false;
        for (o, l, is_used) in all {
            if o != pos {
                return Err(format!("gap or overlap at {pos} (next extent at {o})"));
            }
            if !is_used && prev_free {
                return Err(format!("uncoalesced free extents at {o}"));
            }
            prev_free = !is_used;
            pos = o + l;
        }
        if pos != self.capacity {
            return Err(format!("extents end at {pos}, capacity {}", self.capacity));
        }
        if self.free_by_size.len() != self.free_by_offset.len() {
            return Err("free lists disagree".into());
        }
        let used: u64 = self.used.values().sum();
        if used != self.used_bytes {
            return Err(format!("used bytes {} != sum {used}", self.used_bytes));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn alloc_free_coalesces_back_to_one_extent() {
        let mut a = ExtentAllocator::new(16 * PAGE);
        let x = a.alloc(4 * PAGE).unwrap();
        let y = a.alloc(4 * PAGE).unwrap();
        let z = a.alloc(8 * PAGE).unwrap();
        assert!(a.alloc(PAGE).is_none());
        assert!(a.free(y, 4 * PAGE));
        assert!(!a.free(y, 4 * PAGE), "double free is refused");
        assert!(a.free(x, 4 * PAGE));
        assert!(a.free(z, 8 * PAGE));
        a.check().unwrap();
        assert_eq!(a.largest_free(), 16 * PAGE);
    }

    #[test]
    fn compaction_joins_fragmented_free_space_around_pinned_extents() {
        let mut a = ExtentAllocator::new(10 * PAGE);
        let offs: Vec<u64> = (0..10).map(|_| a.alloc(PAGE).unwrap()).collect();
        for &o in offs.iter().step_by(2) {
            a.free(o, PAGE);
        }
        assert_eq!(a.largest_free(), PAGE);
        // Extent at offset 9*PAGE is pinned; the other used ones move down.
        let pinned = 9 * PAGE;
        let moves = a.compact(|o| o != pinned);
        a.check().unwrap();
        assert!(moves
            .iter()
            .all(|&(from, to, _)| to < from && from != pinned));
        assert_eq!(a.largest_free(), 5 * PAGE);
    }

    proptest! {
        #[test]
        fn random_alloc_free_compact_keeps_accounting_exact(
            ops in proptest::collection::vec((0u8..3, 1u64..6, any::<u16>()), 1..200)
        ) {
            let mut a = ExtentAllocator::new(64 * PAGE);
            let mut live: Vec<(u64, u64)> = Vec::new();
            for (op, pages, pick) in ops {
                match op {
                    0 => if let Some(o) = a.alloc(pages * PAGE) { live.push((o, pages * PAGE)); },
                    1 if !live.is_empty() => {
                        let (o, l) = live.swap_remove(pick as usize % live.len());
                        prop_assert!(a.free(o, l));
                    }
                    _ => {
                        let pinned: Vec<u64> = live.iter().filter(|(o, _)| (o / PAGE) % 3 == 0).map(|x| x.0).collect();
                        let moves = a.compact(|o| !pinned.contains(&o));
                        for (from, to, cap) in moves {
                            let e = live.iter_mut().find(|e| e.0 == from).unwrap();
                            prop_assert_eq!(e.1, cap);
                            e.0 = to;
                        }
                    }
                }
                prop_assert!(a.check().is_ok(), "{:?}", a.check());
                prop_assert_eq!(a.used_bytes(), live.iter().map(|e| e.1).sum::<u64>());
                prop_assert!(a.used_bytes() <= a.capacity());
            }
        }
    }
}
