//! A hashed timing wheel: one per shard for every auth deadline and heartbeat, instead
//! of a timer per connection.
//!
//! Time is cut into ticks of `tick_ms`. An item with deadline `d` belongs to tick
//! `ceil(d / tick_ms)` and fires at the first [`advance`](TimerWheel::advance) whose
//! `now_ms` reaches that tick's start: never before its deadline, and at most one tick
//! after it. The wheel has `slots` slots; slot `t % slots` holds the items of tick `t`
//! while `t` is less than one turn ahead, so firing a slot takes every item in it
//! without looking at any. Items further ahead wait in an overflow heap and move into
//! their slot when the wheel comes within one turn of them (once per item). An advance
//! therefore costs the slots it passes (at most one turn) plus the items it fires.
//!
//! There is no cancel: an item names what it is for (say a connection id from the
//! shard's slab and the deadline it was armed for), and the owner ignores a firing
//! that no longer matches. A heartbeat re-arms by inserting a new item.

use std::{cmp::Ordering, collections::BinaryHeap};

/// An item waiting beyond the wheel's current turn, ordered for a min-heap on its tick.
#[derive(Debug)]
struct Far<T> {
    tick: u64,
    item: T,
}

impl<T> PartialEq for Far<T> {
    fn eq(&self, other: &Self) -> bool {
        self.tick == other.tick
    }
}

impl<T> Eq for Far<T> {}

impl<T> PartialOrd for Far<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<T> Ord for Far<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        // Reversed: BinaryHeap is a max-heap, the nearest tick must come out first.
        other.tick.cmp(&self.tick)
    }
}

/// A hashed timing wheel. See the [module](self) docs.
#[derive(Debug)]
pub struct TimerWheel<T> {
    tick_ms: u64,
    /// The last tick processed: every item of a tick up to this one has fired.
    tick: u64,
    /// `slots[t % len]` holds the items of tick `t`, for `tick < t <= tick + len`.
    slots: Vec<Vec<T>>,
    /// Items whose tick had already been processed when they were inserted.
    due: Vec<T>,
    /// Items of ticks beyond `tick + slots.len()`.
    overflow: BinaryHeap<Far<T>>,
    len: usize,
}

impl<T> TimerWheel<T> {
    /// A wheel of `slots` slots of `tick_ms` each (one turn covers `slots * tick_ms`),
    /// with the time `now_ms` already processed.
    ///
    /// # Panics
    /// If `tick_ms` or `slots` is zero.
    pub fn new(tick_ms: u64, slots: usize, now_ms: u64) -> Self {
        assert!(tick_ms > 0, "a timer wheel's tick is at least 1 ms");
        assert!(slots > 0, "a timer wheel has at least one slot");
        TimerWheel {
            tick_ms,
            tick: now_ms / tick_ms,
            slots: (0..slots).map(|_| Vec::new()).collect(),
            due: Vec::new(),
            overflow: BinaryHeap::new(),
            len: 0,
        }
    }

    /// The length of a tick, in milliseconds.
    pub fn tick_ms(&self) -> u64 {
        self.tick_ms
    }

    /// Arms `item` to fire at `deadline_ms`. A deadline already passed fires on the next
    /// [`advance`](Self::advance).
    pub fn insert(&mut self, deadline_ms: u64, item: T) {
        let tick = deadline_ms.div_ceil(self.tick_ms);
        self.len += 1;
        if tick <= self.tick {
            self.due.push(item);
        } else if tick - self.tick <= self.slots.len() as u64 {
            let slot = self.slot_of(tick);
            self.slots[slot].push(item);
        } else {
            self.overflow.push(Far { tick, item });
        }
    }

    /// Moves time to `now_ms` and appends to `out` every item that is due: each item
    /// inserted with a passed deadline since the last advance (first, in insertion
    /// order), then each item whose deadline is at most `now_ms` rounded down to a tick,
    /// in the order of their ticks. A `now_ms` earlier than a previous one fires only the
    /// passed items.
    pub fn advance(&mut self, now_ms: u64, out: &mut Vec<T>) {
        let fired_before = out.len();
        out.append(&mut self.due);
        let target = now_ms / self.tick_ms;
        let turn = self.slots.len() as u64;
        while self.tick < target {
            if self.len == out.len() - fired_before {
                // Nothing left armed: skip the empty ticks.
                self.tick = target;
                break;
            }
            if target - self.tick >= turn {
                // A whole turn or more: every slot is due. Take them from the next
                // tick's slot on, so items still come out in tick order.
                let next = self.slot_of(self.tick + 1);
                let (later, earlier) = self.slots.split_at_mut(next);
                for slot in earlier.iter_mut().chain(later) {
                    out.append(slot);
                }
                self.tick = target;
                while self.overflow.peek().is_some_and(|far| far.tick <= target) {
                    out.push(self.overflow.pop().expect("peeked").item);
                }
            } else {
                self.tick += 1;
                let slot = self.slot_of(self.tick);
                out.append(&mut self.slots[slot]);
            }
            self.refill();
        }
        self.len -= out.len() - fired_before;
    }

    /// How many items are armed.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no item is armed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn slot_of(&self, tick: u64) -> usize {
        (tick % self.slots.len() as u64) as usize
    }

    /// Moves overflow items that are now within one turn into their slots.
    fn refill(&mut self) {
        let horizon = self.tick.saturating_add(self.slots.len() as u64);
        while self.overflow.peek().is_some_and(|far| far.tick <= horizon) {
            let Far { tick, item } = self.overflow.pop().expect("peeked");
            debug_assert!(
                tick > self.tick,
                "overflow items of processed ticks fire, not refill"
            );
            let slot = self.slot_of(tick);
            self.slots[slot].push(item);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn fire<T>(wheel: &mut TimerWheel<T>, now_ms: u64) -> Vec<T> {
        let mut out = Vec::new();
        wheel.advance(now_ms, &mut out);
        out
    }

    #[test]
    fn deadlines_round_up_to_a_tick() {
        let mut wheel = TimerWheel::new(10, 8, 0);
        wheel.insert(25, "b");
        wheel.insert(30, "a");
        assert_eq!(
            fire(&mut wheel, 29),
            Vec::<&str>::new(),
            "never early: 25 and 30 belong to the tick at 30"
        );
        assert_eq!(fire(&mut wheel, 30), ["b", "a"]);
        assert!(wheel.is_empty());
        // Exactly on a tick boundary: fires when now reaches it.
        wheel.insert(40, "c");
        assert_eq!(fire(&mut wheel, 39), Vec::<&str>::new());
        assert_eq!(fire(&mut wheel, 40), ["c"]);
    }

    #[test]
    fn passed_deadlines_fire_on_the_next_advance() {
        let mut wheel = TimerWheel::new(10, 8, 1000);
        wheel.insert(0, "long ago");
        wheel.insert(1000, "now");
        wheel.insert(995, "inside the processed tick");
        assert_eq!(wheel.len(), 3);
        assert_eq!(
            fire(&mut wheel, 1000),
            ["long ago", "now", "inside the processed tick"]
        );
        assert_eq!(wheel.len(), 0);
        // Even when time does not move, or moves back.
        wheel.insert(3, "late");
        assert_eq!(fire(&mut wheel, 500), ["late"]);
    }

    #[test]
    fn far_deadlines_wait_in_overflow() {
        let mut wheel = TimerWheel::new(10, 4, 0); // one turn: 40 ms
        wheel.insert(1000, "far");
        wheel.insert(45, "next turn");
        wheel.insert(20, "near");
        assert_eq!(fire(&mut wheel, 20), ["near"]);
        assert_eq!(fire(&mut wheel, 44), Vec::<&str>::new());
        assert_eq!(fire(&mut wheel, 50), ["next turn"]);
        assert_eq!(fire(&mut wheel, 990), Vec::<&str>::new());
        assert_eq!(wheel.len(), 1);
        assert_eq!(fire(&mut wheel, 1000), ["far"]);
        assert!(wheel.is_empty());
    }

    #[test]
    fn a_long_jump_fires_everything_due_in_tick_order() {
        let mut wheel = TimerWheel::new(1, 16, 0);
        for d in [500, 3, 70, 15, 16, 17, 1_000_000] {
            wheel.insert(d, d);
        }
        assert_eq!(fire(&mut wheel, 10_000), [3, 15, 16, 17, 70, 500]);
        assert_eq!(fire(&mut wheel, u64::MAX), [1_000_000]);
    }

    #[test]
    fn items_of_the_same_slot_in_different_turns_stay_apart() {
        let mut wheel = TimerWheel::new(10, 4, 0);
        wheel.insert(10, "turn 0");
        wheel.insert(50, "turn 1"); // same slot as 10, one turn later: overflow
        wheel.insert(90, "turn 2");
        assert_eq!(fire(&mut wheel, 10), ["turn 0"]);
        assert_eq!(fire(&mut wheel, 49), Vec::<&str>::new());
        assert_eq!(fire(&mut wheel, 50), ["turn 1"]);
        assert_eq!(fire(&mut wheel, 89), Vec::<&str>::new());
        assert_eq!(fire(&mut wheel, 90), ["turn 2"]);
    }

    #[test]
    fn advance_appends_to_out() {
        let mut wheel = TimerWheel::new(5, 4, 0);
        wheel.insert(5, 2);
        let mut out = vec![1];
        wheel.advance(5, &mut out);
        assert_eq!(out, [1, 2]);
        assert!(wheel.is_empty());
        assert_eq!(wheel.tick_ms(), 5);
    }

    #[test]
    #[should_panic(expected = "tick is at least 1 ms")]
    fn zero_tick_is_a_bug() {
        let _ = TimerWheel::<()>::new(0, 4, 0);
    }

    /// A small deterministic generator (xorshift64*), so the model check below needs no
    /// dependency and replays the same walks on every run.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Random inserts and advances against a naive model: a BTreeMap of deadlines. After
    /// each advance to `now`: no item fired early; every item with a deadline at most
    /// `now` rounded down to a tick fired, and the passed items inserted before it;
    /// nothing fired twice; `len` matches.
    #[test]
    fn model_check_against_a_btreemap() {
        for seed in 1..=300u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let tick_ms = 1 + rng.below(20);
            let slots = 1 + rng.below(16) as usize;
            let mut now = rng.below(1000);
            let mut wheel = TimerWheel::new(tick_ms, slots, now);
            // deadline -> ids armed for it; plus ids inserted with a passed deadline.
            let mut model: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
            let mut passed: Vec<u64> = Vec::new();
            let mut processed_to = now / tick_ms * tick_ms;
            let mut deadline_of = std::collections::HashMap::new();
            let mut next_id = 0u64;
            for _ in 0..200 {
                if rng.below(3) != 0 {
                    let horizon = tick_ms * slots as u64 * 3;
                    let deadline =
                        (now + rng.below(horizon + 1)).saturating_sub(rng.below(2 * tick_ms + 1));
                    wheel.insert(deadline, next_id);
                    deadline_of.insert(next_id, deadline);
                    if deadline <= processed_to {
                        passed.push(next_id);
                    } else {
                        model.entry(deadline).or_default().push(next_id);
                    }
                    next_id += 1;
                } else {
                    now += match rng.below(10) {
                        0 => 0,
                        1 => rng.below(tick_ms * slots as u64 * 4),
                        _ => rng.below(2 * tick_ms + 1),
                    };
                    let mut fired = fire(&mut wheel, now);
                    processed_to = now / tick_ms * tick_ms;
                    let passed_count = passed.len();
                    let mut expected = std::mem::take(&mut passed);
                    let later = model.split_off(&(processed_to + 1));
                    expected.extend(std::mem::replace(&mut model, later).into_values().flatten());
                    for id in &fired {
                        assert!(deadline_of[id] <= now, "seed {seed}: {id} fired early");
                    }
                    if let Some((&first_left, _)) = model.first_key_value() {
                        assert!(
                            first_left + tick_ms > now,
                            "seed {seed}: an item is over a tick late"
                        );
                    }
                    // After the passed items, in tick order.
                    let ticks: Vec<u64> = fired[passed_count..]
                        .iter()
                        .map(|id| deadline_of[id].div_ceil(tick_ms))
                        .collect();
                    assert!(
                        ticks.windows(2).all(|w| w[0] <= w[1]),
                        "seed {seed}: out of order {ticks:?}"
                    );
                    fired.sort_unstable();
                    expected.sort_unstable();
                    assert_eq!(fired, expected, "seed {seed} at {now}");
                }
                let armed: usize = model.values().map(Vec::len).sum::<usize>() + passed.len();
                assert_eq!(wheel.len(), armed, "seed {seed}");
            }
        }
    }
}
