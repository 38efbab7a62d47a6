//! The timer heap: deadlines in integer nanoseconds, ties broken by scheduling order.
//!
//! Ground rules: the heap owns its entries; it never looks inside them except through the
//! `is_cancelled` predicate its callers pass, so it stays free of Python and unit-testable.
//! Cancelled entries are dropped lazily from the head, or all at once by `compact` when they
//! outnumber the live ones (asyncio's rule: more than 100 entries, over half cancelled).

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// asyncio's `_MIN_SCHEDULED_TIMER_HANDLES`.
pub const MIN_SCHEDULED_FOR_COMPACTION: usize = 100;

struct Entry<T> {
    when_ns: i64,
    seq: u64,
    item: T,
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        self.when_ns == other.when_ns && self.seq == other.seq
    }
}
impl<T> Eq for Entry<T> {}
impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Entry<T> {
    // Reversed, so std's max-heap pops the earliest deadline (then the earliest scheduled).
    fn cmp(&self, other: &Self) -> Ordering {
        other.when_ns.cmp(&self.when_ns).then_with(|| other.seq.cmp(&self.seq))
    }
}

pub struct TimerHeap<T> {
    heap: BinaryHeap<Entry<T>>,
    next_seq: u64,
}

impl<T> Default for TimerHeap<T> {
    fn default() -> Self {
        Self { heap: BinaryHeap::new(), next_seq: 0 }
    }
}

impl<T> TimerHeap<T> {
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    pub fn push(&mut self, when_ns: i64, item: T) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.heap.push(Entry { when_ns, seq, item });
    }

    pub fn peek_when(&self) -> Option<i64> {
        self.heap.peek().map(|e| e.when_ns)
    }

    /// Pop the earliest entry if it is due at `now_ns` (deadline not after now).
    pub fn pop_due(&mut self, now_ns: i64) -> Option<T> {
        if self.heap.peek()?.when_ns <= now_ns {
            self.heap.pop().map(|e| e.item)
        } else {
            None
        }
    }

    /// Move cancelled entries sitting at the head into `out` (the caller drops them later,
    /// outside any borrow, since dropping a Python object can run Python code).
    pub fn pop_cancelled_head(&mut self, is_cancelled: impl Fn(&T) -> bool, out: &mut Vec<T>) {
        while let Some(e) = self.heap.peek() {
            if !is_cancelled(&e.item) {
                break;
            }
            if let Some(e) = self.heap.pop() {
                out.push(e.item);
            }
        }
    }

    /// Rebuild the heap without cancelled entries, moving those into `out`.
    pub fn compact(&mut self, is_cancelled: impl Fn(&T) -> bool, out: &mut Vec<T>) {
        let mut live = Vec::with_capacity(self.heap.len());
        for e in std::mem::take(&mut self.heap).into_vec() {
            if is_cancelled(&e.item) {
                out.push(e.item);
            } else {
                live.push(e);
            }
        }
        self.heap = BinaryHeap::from(live);
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.heap.iter().map(|e| &e.item)
    }

    pub fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.heap.drain().map(|e| e.item)
    }
}

/// asyncio's compaction rule, on counts.
pub fn should_compact(scheduled: usize, cancelled: usize) -> bool {
    scheduled > MIN_SCHEDULED_FOR_COMPACTION && cancelled * 2 > scheduled
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn pops_in_deadline_order() {
        let mut h = TimerHeap::default();
        for (w, v) in [(30, 'c'), (10, 'a'), (20, 'b')] {
            h.push(w, v);
        }
        assert_eq!(h.pop_due(5), None);
        assert_eq!(h.pop_due(100), Some('a'));
        assert_eq!(h.pop_due(100), Some('b'));
        assert_eq!(h.pop_due(25), None);
        assert_eq!(h.pop_due(30), Some('c'));
        assert!(h.is_empty());
    }

    #[test]
    fn equal_deadlines_keep_scheduling_order() {
        let mut h = TimerHeap::default();
        for i in 0..1000 {
            h.push(7, i);
        }
        let got: Vec<i32> = std::iter::from_fn(|| h.pop_due(7)).collect();
        assert_eq!(got, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn cancelled_head_is_dropped_and_rest_kept() {
        let mut h = TimerHeap::default();
        for i in 0..10 {
            h.push(i, i);
        }
        let mut gone = vec![];
        h.pop_cancelled_head(|&v| v < 3 || v == 5, &mut gone);
        assert_eq!(gone, vec![0, 1, 2]);
        assert_eq!(h.peek_when(), Some(3));
        assert_eq!(h.len(), 7);
    }

    #[test]
    fn compaction_removes_only_cancelled() {
        let mut h = TimerHeap::default();
        for i in 0..300 {
            h.push(300 - i, i);
        }
        let mut gone = vec![];
        h.compact(|&v| v % 3 != 0, &mut gone);
        assert_eq!(gone.len(), 200);
        let calls = Cell::new(0);
        let rest: Vec<i64> = std::iter::from_fn(|| {
            calls.set(calls.get() + 1);
            h.pop_due(i64::MAX)
        })
        .collect();
        assert_eq!(rest.len(), 100);
        assert!(rest.iter().all(|v| v % 3 == 0));
        assert!(rest.windows(2).all(|w| w[0] > w[1]), "deadline order kept after compaction");
    }

    #[test]
    fn compaction_rule_matches_asyncio() {
        assert!(!should_compact(100, 90), "needs more than 100 scheduled");
        assert!(!should_compact(101, 50));
        assert!(should_compact(101, 51));
        assert!(should_compact(1000, 501));
        assert!(!should_compact(1000, 500));
    }
}
