//! The ready queue: work that runs on the next iteration, in FIFO order.
//!
//! Ground rules: an iteration runs exactly the items that were queued when it began
//! (`begin_iteration` fixes that count); items queued while it runs wait for the next one.

use std::collections::VecDeque;

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
