//! Group commit: puts that reach the durability step together share one round of flushes.
//!
//! Every put thread writes its own tmp file (so several are written in parallel), then
//! [`GroupCommit::submit`]s it. If no commit round is running, the submitter becomes the
//! leader: it takes every item queued so far (its own included) and runs the round for all
//! of them; the others wait. Items that arrive while a round runs queue up and form the next
//! group, led by one of their own submitters as soon as the running round ends. A submitter
//! returns once the round that carried its item has finished, with that item's result.

use std::io;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

/// The result slot of one submitted item.
type Slot = Arc<Mutex<Option<io::Result<()>>>>;

struct Queue<T> {
    /// Items waiting for the next round, with their result slots.
    pending: Vec<(T, Slot)>,
    /// Whether a round is running.
    leading: bool,
}

/// Batches items submitted concurrently into rounds run by one thread at a time.
pub(crate) struct GroupCommit<T> {
    queue: Mutex<Queue<T>>,
    done: Condvar,
}

impl<T> Default for GroupCommit<T> {
    fn default() -> Self {
        GroupCommit {
            queue: Mutex::new(Queue {
                pending: Vec::new(),
                leading: false,
            }),
            done: Condvar::new(),
        }
    }
}

/// Ends a round: fills the slots the round left empty (it panicked) and lets the next
/// leader in.
struct RoundGuard<'a, T> {
    gc: &'a GroupCommit<T>,
    slots: Vec<Slot>,
}

impl<T> Drop for RoundGuard<'_, T> {
    fn drop(&mut self) {
        for s in &self.slots {
            let mut s = s.lock();
            if s.is_none() {
                *s = Some(Err(io::Error::other("disk tier: commit round failed")));
            }
        }
        self.gc.queue.lock().leading = false;
        self.gc.done.notify_all();
    }
}

impl<T> GroupCommit<T> {
    /// Queues `item` and returns once a round has committed it. `round` runs (at most once)
    /// on the calling thread when it becomes the leader and must return one result per item,
    /// in order.
    pub(crate) fn submit(
        &self,
        item: T,
        round: impl FnOnce(Vec<T>) -> Vec<io::Result<()>>,
    ) -> io::Result<()> {
        // A submitter leads at most one round: the one that carries its own item.
        let mut round = Some(round);
        let mine: Slot = Arc::new(Mutex::new(None));
        let mut q = self.queue.lock();
        q.pending.push((item, mine.clone()));
        loop {
            if let Some(r) = mine.lock().take() {
                return r;
            }
            if !q.leading && round.is_some() {
                // Our item is still queued (its slot is empty), so this round carries it.
                q.leading = true;
                let (items, slots): (Vec<T>, Vec<Slot>) =
                    std::mem::take(&mut q.pending).into_iter().unzip();
                drop(q);
                let guard = RoundGuard { gc: self, slots };
                let n = items.len();
                let run = round.take().expect("checked above");
                let mut results = run(items).into_iter();
                for s in &guard.slots {
                    *s.lock() = Some(results.next().unwrap_or_else(|| {
                        Err(io::Error::other(format!(
                            "disk tier: commit round returned fewer than {n} results"
                        )))
                    }));
                }
                drop(guard);
                q = self.queue.lock();
                continue;
            }
            self.done.wait(&mut q);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier};
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_lone_submit_is_its_own_round() {
        let gc = GroupCommit::default();
        let mut seen = Vec::new();
        let r = gc.submit(7, |g| {
            seen.extend(g.iter().copied());
            vec![Ok(())]
        });
        assert!(r.is_ok());
        let r = gc.submit(8, |g| {
            g.iter().map(|_| Err(io::Error::other("x"))).collect()
        });
        assert!(r.is_err());
    }

    #[test]
    fn concurrent_submits_are_grouped_and_each_gets_its_own_result() {
        const N: usize = 32;
        let gc = Arc::new(GroupCommit::<usize>::default());
        let running = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicUsize::new(0));
        let items = Arc::new(Mutex::new(Vec::new()));
        let start = Arc::new(Barrier::new(N));
        let threads: Vec<_> = (0..N)
            .map(|i| {
                let (gc, running, rounds, items, start) = (
                    gc.clone(),
                    running.clone(),
                    rounds.clone(),
                    items.clone(),
                    start.clone(),
                );
                std::thread::spawn(move || {
                    start.wait();
                    let r = gc.submit(i, |g| {
                        assert!(!running.swap(true, Ordering::SeqCst), "rounds overlap");
                        rounds.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(20));
                        items.lock().extend(g.iter().copied());
                        running.store(false, Ordering::SeqCst);
                        // Odd items fail: results must reach the right submitters.
                        g.iter()
                            .map(|x| {
                                if x % 2 == 1 {
                                    Err(io::Error::other("odd"))
                                } else {
                                    Ok(())
                                }
                            })
                            .collect()
                    });
                    assert_eq!(r.is_ok(), i % 2 == 0, "item {i}");
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut all = items.lock().clone();
        all.sort_unstable();
        assert_eq!(all, (0..N).collect::<Vec<_>>(), "every item committed once");
        let r = rounds.load(Ordering::SeqCst);
        assert!(r < N, "{N} concurrent submits took {r} rounds: no grouping");
    }

    #[test]
    fn a_panicking_round_fails_its_group_and_frees_the_leader_seat() {
        let gc = Arc::new(GroupCommit::<u32>::default());
        let entered = Arc::new(Barrier::new(2));
        let leader = {
            let (gc, entered) = (gc.clone(), entered.clone());
            std::thread::spawn(move || {
                gc.submit(1, |_| {
                    entered.wait();
                    // Give the follower time to queue behind this round.
                    std::thread::sleep(Duration::from_millis(50));
                    panic!("injected");
                })
            })
        };
        entered.wait();
        // Queued while the round runs: carried by the next round, led by this thread.
        let r = gc.submit(2, |g| {
            assert_eq!(g, vec![2]);
            vec![Ok(())]
        });
        assert!(r.is_ok());
        assert!(leader.join().is_err(), "the leader's panic propagates");
        assert!(gc.submit(3, |_| vec![Ok(())]).is_ok());
    }

    #[test]
    fn a_short_result_list_fails_the_rest() {
        let gc = GroupCommit::default();
        assert!(gc.submit((), |_| Vec::new()).is_err());
    }
}
