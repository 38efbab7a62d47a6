//! The ready queue: work that runs on the next iteration, in FIFO order.
//!
//! Ground rules: an iteration runs exactly the items that were queued when it began
//! (`begin_iteration` fixes that count); items queued while it runs wait for the next one.

use std::collections::VecDeque;

/// What a queue keeps at an idle point, at least (entries).
pub const IDLE_KEEP: usize = 1024;

/// The capacity to shrink a queue (the ready queue, the timer heap) to when the loop goes
/// idle, if its room is more than four times the most it held since the last idle point
/// (`peak`) and more than `IDLE_KEEP`: twice that peak, at least `IDLE_KEEP`. A burst's
/// room is given back at the first idle point after the one that ends it (the burst is that
/// one's peak); a load that comes back every time (a thread's `call_soon_threadsafe` burst
/// per GIL turn) keeps its room and does not reallocate.
pub fn idle_capacity(capacity: usize, peak: usize) -> Option<usize> {
    sparse_capacity(capacity, peak, IDLE_KEEP)
}

/// The shrink rule shared by the loop's queues and a transport's write buffer: room for more
/// than four times what is `used`, and over `keep`, goes down to twice `used`, at least `keep`.
pub fn sparse_capacity(capacity: usize, used: usize, keep: usize) -> Option<usize> {
    (capacity > keep && capacity / 4 > used).then(|| used.saturating_mul(2).max(keep))
}

pub struct ReadyQueue<T> {
    q: VecDeque<T>,
}

impl<T> Default for ReadyQueue<T> {
    fn default() -> Self {
        Self { q: VecDeque::with_capacity(64) }
    }
}

impl<T> ReadyQueue<T> {
    #[inline]
    pub fn push(&mut self, item: T) {
        self.q.push_back(item);
    }

    /// `push`, or the item back when the queue cannot grow (out of memory: the caller raises
    /// `MemoryError`, as asyncio's `deque.append` does, instead of the process aborting).
    #[inline(always)]
    pub fn try_push(&mut self, item: T) -> Result<(), T> {
        if self.q.len() == self.q.capacity() {
            return self.grow_and_push(item);
        }
        self.q.push_back(item);
        Ok(())
    }

    /// `try_push` when the queue is full (out of line: the common push stays a few
    /// instructions, as `push_back` inlined was).
    #[cold]
    #[inline(never)]
    fn grow_and_push(&mut self, item: T) -> Result<(), T> {
        if self.q.try_reserve(1).is_err() {
            return Err(item);
        }
        self.q.push_back(item);
        Ok(())
    }

    #[inline]
    pub fn pop(&mut self) -> Option<T> {
        self.q.pop_front()
    }

    pub fn len(&self) -> usize {
        self.q.len()
    }

    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.q.capacity()
    }

    /// Give back room beyond `capacity` items (never below the length).
    pub fn shrink_to(&mut self, capacity: usize) {
        self.q.shrink_to(capacity);
    }

    /// How many items this iteration owns.
    pub fn begin_iteration(&self) -> usize {
        self.q.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.q.iter()
    }

    pub fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.q.drain(..)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_capacity_gives_back_only_sparse_room() {
        // Small queues are left alone.
        assert_eq!(idle_capacity(IDLE_KEEP, 0), None);
        assert_eq!(idle_capacity(64, 0), None);
        // Room used at the last peak, or a quarter of it, is kept.
        assert_eq!(idle_capacity(1 << 20, 1 << 20), None);
        assert_eq!(idle_capacity(1 << 20, 1 << 18), None);
        // A write buffer's floor (`keep`) is its own.
        assert_eq!(sparse_capacity(1 << 20, 1000, 1 << 18), Some(1 << 18));
        assert_eq!(sparse_capacity(1 << 18, 0, 1 << 18), None);
        // Sparse room goes back to twice the peak, at least IDLE_KEEP.
        assert_eq!(idle_capacity(1 << 20, (1 << 18) - 1), Some((1 << 19) - 2));
        assert_eq!(idle_capacity(1 << 20, 0), Some(IDLE_KEEP));
        assert_eq!(idle_capacity(1 << 20, 10), Some(IDLE_KEEP));
    }

    #[test]
    fn shrink_keeps_items_and_order() {
        let mut q = ReadyQueue::default();
        for i in 0..100_000 {
            q.push(i);
        }
        for _ in 0..99_990 {
            q.pop();
        }
        let cap = idle_capacity(q.capacity(), q.len()).unwrap();
        q.shrink_to(cap);
        assert!(q.capacity() < 4 * IDLE_KEEP);
        assert_eq!(q.drain().collect::<Vec<_>>(), (99_990..100_000).collect::<Vec<_>>());
    }

    #[test]
    fn fifo_and_iteration_boundary() {
        let mut q = ReadyQueue::default();
        q.push(1);
        q.push(2);
        let n = q.begin_iteration();
        let mut ran = vec![];
        for _ in 0..n {
            let v = q.pop().unwrap();
            ran.push(v);
            // Work scheduled from inside a callback waits for the next iteration.
            q.push(v * 10);
        }
        assert_eq!(ran, vec![1, 2]);
        assert_eq!(q.drain().collect::<Vec<_>>(), vec![10, 20]);
        assert!(q.is_empty());
    }
}
