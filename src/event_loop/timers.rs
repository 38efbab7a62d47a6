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

/// A key packs the deadline (high half, sign bit flipped so signed order becomes unsigned
/// order) and the scheduling sequence number (low half): one integer comparison orders by
/// deadline, then FIFO among equal deadlines. Kept as two words (no 16-byte alignment).
struct Entry<T> {
    hi: u64,
    lo: u64,
    item: T,
}

const SIGN: u64 = 1 << 63;

impl<T> Entry<T> {
    #[inline]
    fn key(&self) -> u128 {
        (u128::from(self.hi) << 64) | u128::from(self.lo)
    }
    #[inline]
    fn when_ns(&self) -> i64 {
        (self.hi ^ SIGN) as i64
    }
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}
impl<T> Eq for Entry<T> {}
impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
    // Reversed, so std's max-heap pops the earliest deadline (then the earliest scheduled).
    #[inline]
    fn le(&self, other: &Self) -> bool {
        other.key() <= self.key()
    }
    #[inline]
    fn lt(&self, other: &Self) -> bool {
        other.key() < self.key()
    }
    #[inline]
    fn ge(&self, other: &Self) -> bool {
        other.key() >= self.key()
    }
    #[inline]
    fn gt(&self, other: &Self) -> bool {
        other.key() > self.key()
    }
}
impl<T> Ord for Entry<T> {
    #[inline]
    fn cmp(&self, other: &Self) -> Ordering {
        other.key().cmp(&self.key())
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

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.heap.capacity()
    }

    /// Give back room beyond `capacity` entries (never below the length).
    pub fn shrink_to(&mut self, capacity: usize) {
        self.heap.shrink_to(capacity);
    }

    pub fn push(&mut self, when_ns: i64, item: T) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.heap.push(Entry { hi: when_ns as u64 ^ SIGN, lo: seq, item });
    }

    /// `push`, or the item back when the heap cannot grow (out of memory: see
    /// `ReadyQueue::try_push`).
    #[inline]
    pub fn try_push(&mut self, when_ns: i64, item: T) -> Result<(), T> {
        if self.heap.len() == self.heap.capacity() && self.reserve_failed() {
            return Err(item);
        }
        self.push(when_ns, item);
        Ok(())
    }

    /// Room for one more entry could not be made (out of line: rare).
    #[cold]
    #[inline(never)]
    fn reserve_failed(&mut self) -> bool {
        self.heap.try_reserve(1).is_err()
    }

    pub fn peek_when(&self) -> Option<i64> {
        self.heap.peek().map(Entry::when_ns)
    }

    /// Pop the earliest entry if it is due at `now_ns` (deadline not after now).
    pub fn pop_due(&mut self, now_ns: i64) -> Option<T> {
        if self.heap.peek()?.when_ns() <= now_ns {
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

    /// Rebuild the heap without cancelled entries, moving those into `out`. The new heap
    /// reserves the old length (the same churn then refills it without growing), but gives
    /// back what a large purge leaves sparse (`ready::idle_capacity`), or a burst of
    /// cancelled timers would keep its whole size allocated.
    pub fn compact(&mut self, is_cancelled: impl Fn(&T) -> bool, out: &mut Vec<T>) {
        let mut live = Vec::with_capacity(self.heap.len());
        for e in std::mem::take(&mut self.heap).into_vec() {
            if is_cancelled(&e.item) {
                out.push(e.item);
            } else {
                live.push(e);
            }
        }
        if let Some(cap) = super::ready::idle_capacity(live.capacity(), live.len()) {
            live.shrink_to(cap);
        }
        self.heap = BinaryHeap::from(live);
    }

    /// Give every entry the key `key(item)` (the clock changed: `Clock`), keeping each one's
    /// sequence number, so ties still fire in scheduling order.
    pub fn rekey(&mut self, key: impl Fn(&T) -> i64) {
        let mut entries = std::mem::take(&mut self.heap).into_vec();
        for e in &mut entries {
            e.hi = key(&e.item) as u64 ^ SIGN;
        }
        self.heap = BinaryHeap::from(entries);
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.heap.iter().map(|e| &e.item)
    }

    pub fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.heap.drain().map(|e| e.item)
    }
}

/// How deadlines become the heap's `i64` keys, and "now" with them.
///
/// - `Monotonic` (the loop's own `time()`): integer nanoseconds of `CLOCK_MONOTONIC`, a float
///   deadline rounded up, so a timer never fires before its `when()`. "Now" is read without
///   calling Python.
/// - `Custom` (`time()` replaced by a subclass or a patch): the float itself, as an integer
///   with the same order (`f64::total_cmp`'s mapping). Every value a Python clock can return
///   orders as asyncio's float comparisons order it, with nothing to overflow: nanoseconds
///   of a clock beyond 2**63 ns (9.2e9 s) would saturate, and every timer would be due.
///   -0.0 is keyed as 0.0 (asyncio's floats compare them equal); NaN as -inf, due at once,
///   as on the monotonic scale (where it converts to 0 ns). A timer is due by asyncio's
///   rule, `when < now + resolution` in floats (`due_key`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Clock {
    Monotonic,
    Custom,
}

impl Clock {
    #[inline(always)]
    pub fn key(self, when: f64) -> i64 {
        match self {
            Clock::Monotonic => secs_to_ns(when),
            Clock::Custom => float_key(when),
        }
    }

    /// On a custom clock reading `now`, the key at or below which a timer is due: asyncio's
    /// `when < now + clock_resolution`, computed in floats as asyncio does (so near 1e10,
    /// where adding 1e-9 changes nothing, a deadline equal to "now" is not due yet).
    pub fn due_key(now: f64) -> i64 {
        float_key(now + RESOLUTION).saturating_sub(1)
    }

    /// How long a poll may wait for the deadline `when_key`, in milliseconds rounded up
    /// (waking early would just poll again), at most `max_ms`; 0 when due.
    pub fn timeout_ms(self, when_key: i64, now_key: i64, max_ms: i64) -> i64 {
        match self {
            Clock::Monotonic => {
                let delta = when_key.saturating_sub(now_key);
                if delta <= 0 {
                    0
                } else {
                    (delta.saturating_add(999_999) / 1_000_000).min(max_ms)
                }
            }
            Clock::Custom => {
                let delta = key_float(when_key) - key_float(now_key);
                if delta > 0.0 {
                    // A float-to-int `as` saturates (+inf becomes i64::MAX).
                    ((delta * 1e3).ceil() as i64).clamp(1, max_ms)
                } else {
                    0
                }
            }
        }
    }
}

/// asyncio's `_clock_resolution` (`time.get_clock_info("monotonic").resolution` on Linux).
const RESOLUTION: f64 = 1e-9;

/// Seconds (float) to integer nanoseconds, rounding up so a timer never fires before its
/// time (saturating at the ends of `i64`; NaN becomes 0).
#[inline(always)]
pub fn secs_to_ns(when: f64) -> i64 {
    (when * 1e9).ceil() as i64
}

/// `x`'s bits as an `i64` whose order is `f64::total_cmp`'s, after mapping -0.0 to 0.0 and
/// NaN to -inf (see `Clock`).
#[inline]
fn float_key(x: f64) -> i64 {
    let x = if x.is_nan() { f64::NEG_INFINITY } else { x + 0.0 };
    let bits = x.to_bits() as i64;
    // Negative floats: flip every bit but the sign, so larger magnitudes order lower.
    bits ^ (((bits >> 63) as u64) >> 1) as i64
}

/// The float behind a `float_key` (the mask depends only on the sign bit, which it keeps).
#[inline]
fn key_float(key: i64) -> f64 {
    f64::from_bits((key ^ (((key >> 63) as u64) >> 1) as i64) as u64)
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
    fn compaction_and_shrink_give_back_room() {
        let mut h = TimerHeap::default();
        for i in 0..100_000 {
            h.push(i, i);
        }
        let mut gone = vec![];
        h.compact(|&v| v >= 10, &mut gone);
        assert_eq!(gone.len(), 99_990);
        // The rebuilt heap is sized by what stayed, not by the old length.
        assert!(h.capacity() <= crate::event_loop::ready::IDLE_KEEP, "{}", h.capacity());
        for i in 0..100_000 {
            h.push(1_000_000 + i, 0);
        }
        while h.len() > 10 {
            h.pop_due(i64::MAX);
        }
        let cap = crate::event_loop::ready::idle_capacity(h.capacity(), h.len()).unwrap();
        h.shrink_to(cap);
        assert!(h.capacity() < 4096, "{}", h.capacity());
        let rest: Vec<i64> = std::iter::from_fn(|| h.pop_due(i64::MAX)).collect();
        assert_eq!(rest.len(), 10);
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

    /// xorshift64*: a deterministic generator for the randomised tests (no dependency).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// The reference: a plain list, searched for the minimum (deadline, then push order).
    #[derive(Default)]
    struct Model {
        entries: Vec<(i64, u64, u32)>,
        seq: u64,
    }
    impl Model {
        fn push(&mut self, when: i64, id: u32) {
            self.entries.push((when, self.seq, id));
            self.seq += 1;
        }
        fn min(&self) -> Option<usize> {
            (0..self.entries.len()).min_by_key(|&i| (self.entries[i].0, self.entries[i].1))
        }
        fn peek_when(&self) -> Option<i64> {
            self.min().map(|i| self.entries[i].0)
        }
        fn pop_due(&mut self, now: i64) -> Option<u32> {
            let i = self.min()?;
            (self.entries[i].0 <= now).then(|| self.entries.remove(i).2)
        }
        fn pop_cancelled_head(&mut self, cancelled: &[bool]) -> Vec<u32> {
            let mut out = vec![];
            while let Some(i) = self.min() {
                if !cancelled[self.entries[i].2 as usize] {
                    break;
                }
                out.push(self.entries.remove(i).2);
            }
            out
        }
        fn compact(&mut self, cancelled: &[bool]) -> Vec<u32> {
            let mut out: Vec<u32> = self.entries.iter().map(|e| e.2).filter(|&id| cancelled[id as usize]).collect();
            self.entries.retain(|e| !cancelled[e.2 as usize]);
            out.sort_unstable();
            out
        }
    }

    /// Random pushes (few distinct deadlines, so many ties, some negative), due pops with a
    /// moving "now" (and some in the past), cancellations, head purges and compactions,
    /// checked step by step against the model.
    fn random_ops(seed: u64, steps: usize, deadlines: u64) {
        let mut rng = Rng(seed);
        let mut heap = TimerHeap::default();
        let mut model = Model::default();
        let mut cancelled: Vec<bool> = vec![];
        let mut now: i64 = 0;
        for _ in 0..steps {
            match rng.below(100) {
                0..=44 => {
                    let when = now + rng.below(deadlines) as i64 - (deadlines / 8) as i64;
                    let id = cancelled.len() as u32;
                    cancelled.push(false);
                    heap.push(when, id);
                    model.push(when, id);
                }
                45..=79 => {
                    if rng.below(4) != 0 {
                        now += rng.below(deadlines / 4 + 1) as i64;
                    }
                    let probe = if rng.below(10) == 0 { now - 5 } else { now };
                    for _ in 0..=rng.below(8) {
                        let want = model.pop_due(probe);
                        assert_eq!(heap.pop_due(probe), want, "seed {seed}");
                        if want.is_none() {
                            break;
                        }
                    }
                }
                80..=89 => {
                    if !model.entries.is_empty() {
                        let i = rng.below(model.entries.len() as u64) as usize;
                        cancelled[model.entries[i].2 as usize] = true;
                    }
                }
                90..=96 => {
                    let mut got = vec![];
                    heap.pop_cancelled_head(|&id| cancelled[id as usize], &mut got);
                    assert_eq!(got, model.pop_cancelled_head(&cancelled), "seed {seed}");
                }
                _ => {
                    let mut got = vec![];
                    heap.compact(|&id| cancelled[id as usize], &mut got);
                    got.sort_unstable();
                    assert_eq!(got, model.compact(&cancelled), "seed {seed}");
                }
            }
            assert_eq!(heap.len(), model.entries.len(), "seed {seed}");
            assert_eq!(heap.peek_when(), model.peek_when(), "seed {seed}");
        }
        // Drain in order: everything left comes out exactly as the model says.
        while let Some(want) = model.pop_due(i64::MAX) {
            assert_eq!(heap.pop_due(i64::MAX), Some(want), "seed {seed}");
        }
        assert!(heap.is_empty());
        assert_eq!(heap.pop_due(i64::MAX), None);
    }

    #[test]
    fn random_operations_match_reference_model() {
        for seed in 1..=300 {
            // Few distinct deadlines (heavy ties), then a wide spread.
            random_ops(seed, 400, 4);
            random_ops(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15), 400, 1_000_000);
        }
        // A few long runs, so the heap grows several levels deep.
        for seed in 1000..1005 {
            random_ops(seed, 20_000, 50);
        }
    }

    #[test]
    fn extreme_deadlines_order_correctly() {
        let mut h = TimerHeap::default();
        let whens = [i64::MAX, 0, -1, i64::MIN, 1, i64::MIN, i64::MAX, -1];
        for (i, &w) in whens.iter().enumerate() {
            h.push(w, i);
        }
        assert_eq!(h.peek_when(), Some(i64::MIN));
        let mut want: Vec<(i64, usize)> = whens.iter().copied().zip(0..).collect();
        want.sort();
        let got: Vec<usize> = std::iter::from_fn(|| h.pop_due(i64::MAX)).collect();
        assert_eq!(got, want.iter().map(|w| w.1).collect::<Vec<_>>());
        h.push(i64::MIN, 9);
        assert_eq!(h.pop_due(i64::MIN), Some(9));
    }

    #[test]
    fn float_keys_order_as_floats() {
        let xs = [
            f64::NEG_INFINITY,
            -1e300,
            -1e10 - 0.5,
            -1e10,
            -1.0,
            -f64::MIN_POSITIVE,
            0.0,
            5e-324,
            1e-9,
            1.0,
            9.3e9,
            1e10,
            1e10 + 0.1,
            1e300,
            f64::MAX,
            f64::INFINITY,
        ];
        for w in xs.windows(2) {
            assert!(float_key(w[0]) < float_key(w[1]), "{} < {}", w[0], w[1]);
        }
        for &x in &xs {
            assert_eq!(key_float(float_key(x)), x);
        }
        assert_eq!(float_key(-0.0), float_key(0.0));
        assert_eq!(float_key(f64::NAN), float_key(f64::NEG_INFINITY));
        assert_eq!(float_key(-f64::NAN), float_key(f64::NEG_INFINITY));
    }

    #[test]
    fn custom_clock_far_from_zero_keeps_distinct_deadlines() {
        // The monotonic scale saturates there: every deadline and "now" become one key.
        let now = 1e10 + 12.5;
        assert_eq!(Clock::Monotonic.key(now), Clock::Monotonic.key(now + 0.3));
        let c = Clock::Custom;
        assert!(c.key(now) < c.key(now + 0.1) && c.key(now + 0.1) < c.key(now + 0.3));
        // Float steps of 2e-6 s at 1e10: within a millisecond of 100.
        assert!((100..=101).contains(&c.timeout_ms(c.key(now + 0.1), c.key(now), 86_400_000)));
        assert_eq!(c.timeout_ms(c.key(now), c.key(now + 0.1), 86_400_000), 0);
        assert!((100..=101).contains(&c.timeout_ms(c.key(now + 0.1), Clock::due_key(now), 86_400_000)));
        // asyncio's `when < now + 1e-9`: equal is due near 0, not near 1e10.
        assert!(c.key(5.0) <= Clock::due_key(5.0));
        assert!(c.key(5.0 + 1e-9) > Clock::due_key(5.0));
        assert!(c.key(now) > Clock::due_key(now));
        assert!(c.key(now - 2e-6) <= Clock::due_key(now));
        assert!(c.key(-1e300) <= Clock::due_key(0.0) && c.key(0.0) <= Clock::due_key(0.0));
        assert!(c.key(f64::MAX) <= Clock::due_key(f64::INFINITY));
        assert!(c.key(f64::INFINITY) > Clock::due_key(f64::INFINITY));
        assert!(c.key(f64::NAN) <= Clock::due_key(-1e300));
        assert_eq!(c.timeout_ms(c.key(f64::INFINITY), c.key(now), 86_400_000), 86_400_000);
        assert_eq!(c.timeout_ms(c.key(-1e10 + 0.0001), c.key(-1e10), 86_400_000), 1);
        let m = Clock::Monotonic;
        assert_eq!(m.timeout_ms(m.key(1.0001), m.key(1.0), 86_400_000), 1);
        assert_eq!(m.timeout_ms(m.key(1.0), m.key(2.0), 86_400_000), 0);
    }

    #[test]
    fn rekey_reorders_and_keeps_ties_in_order() {
        let mut h = TimerHeap::default();
        for (i, w) in [5, 4, 3, 2, 1].into_iter().enumerate() {
            h.push(w, i as i64);
        }
        // New keys: item order, with items 1 and 2 tied (push order must win).
        h.rekey(|&item| if item == 2 { 1 } else { item });
        let got: Vec<i64> = std::iter::from_fn(|| h.pop_due(i64::MAX)).collect();
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn drain_and_iter_see_every_entry() {
        let mut h = TimerHeap::default();
        for i in 0..50 {
            h.push((i * 37) % 11, i);
        }
        let mut seen: Vec<i64> = h.iter().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..50).collect::<Vec<_>>());
        let mut drained: Vec<i64> = h.drain().collect();
        drained.sort_unstable();
        assert_eq!(drained, (0..50).collect::<Vec<_>>());
        assert!(h.is_empty());
        assert_eq!(h.peek_when(), None);
        h.push(3, 7);
        assert_eq!(h.pop_due(3), Some(7));
    }
}
