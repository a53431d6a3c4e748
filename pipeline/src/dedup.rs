//! The dedup table: (sender, client `id`) → the original `msg_id` and `ts`, and the
//! batch that holds the message, for the configured window (PROTOCOL.md §4, ten
//! minutes by default).
//!
//! The engine enters a message when it accepts it, before its batch is durable, so a
//! send costs one lookup in this table, not a lookup and a later insert: the table
//! outgrows the caches, and each probe was a miss. The batch id tells the engine
//! whether the original is durable yet, and the engine
//! [forgets](DedupTable::forget) the entries of a batch that fails.
//!
//! At a steady send rate the table holds every message of the window, so it is the
//! pipeline's largest map and the one that grows fastest: 86 million entries at 144k
//! messages a second over the default ten minutes. So it also has a bound on entries
//! (`--dedup-max-entries`): a full table forgets its oldest entry for each new one,
//! which shortens the window for as long as the rate stays that high, and counts what
//! it forgot early ([`DedupStats::evicted`]) for the engine to warn about.
//!
//! Two things keep it from stalling the pipeline while it grows:
//!
//! - It is split into [`SHARDS`] maps chosen by the key, so growing rehashes one small
//!   map at a time. One `HashMap` doubling from 256k to 512k entries took the pipeline
//!   60–100 ms (a p99 of 75 ms in `flare-loadgen chat` at 30k msgs/s); a shard's
//!   doubling is [`SHARDS`] times smaller.
//! - Keys are fixed-size fingerprints, not copies of the two strings, and the expiry
//!   queue is a list of fixed-size chunks, not one ring that is copied as it doubles.
//!   An entry costs 85–115 bytes (with the maps' spare room and the expiry queue; 1M
//!   to 16M entries in a release build) and no allocation of its own; with the two
//!   strings copied twice it was about 250.
//!
//! A map keeps each key beside what it maps to (`Slot`), so a new send's
//! lookup, which misses the caches at this size, brings in the line its entry is then
//! written to.
//!
//! A fingerprint is 128 bits of two SipHash-1-3 keyed with random keys per process.
//! Two different keys share one with a probability of 2^-128, and a client cannot
//! aim for a collision without the keys. The table is rebuilt from the log at start,
//! under the new process's keys.

use std::collections::VecDeque;
use std::hash::{BuildHasher, RandomState};

/// Maps in the table. A power of two.
pub const SHARDS: usize = 1024;

/// Entries the table holds at most unless configured: about 1.6 GB at ~100 bytes
/// each, and the full ten-minute window up to ~26k messages a second.
pub const MAX_ENTRIES_DEFAULT: usize = 16_000_000;

/// The smallest bound the table accepts: well above what the batches that are not
/// durable yet can hold (one of at most
/// [`REQUESTS_PER_ROUND`](crate::config::REQUESTS_PER_ROUND) requests, and the one
/// being written), so an entry is never evicted before its message is durable.
pub const MAX_ENTRIES_MIN: usize = 65_536;

/// Entries per chunk of the expiry queue.
const CHUNK: usize = 4096;

/// The fingerprint of a (sender, client `id`) pair, computed once per message. Never
/// all zeros, which marks a free slot.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct DedupKey(u64, u64);

/// The key of a free slot.
const FREE: DedupKey = DedupKey(0, 0);

/// What the table remembers of an accepted message.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Accepted {
    /// The message's `msg_id`.
    pub msg_id: u64,
    /// When it was accepted (ms since the Unix epoch).
    pub ts: u64,
    /// The engine's id of the batch that holds it.
    pub batch: u64,
}

/// A key and what it maps to, side by side: a lookup reads the line that an insert
/// then writes. (A `HashMap` kept its control bytes apart from its entries, so a new
/// key cost two cache misses, the lookup's and the insert's.)
#[derive(Clone, Copy, Default)]
struct Slot {
    key: DedupKey,
    accepted: Accepted,
}

/// One of the table's maps: open addressing with linear probing from the slot that the
/// key's low bits name (the key is random already), at most three quarters full, and
/// removal by shifting the entries after a hole back, so no slot is ever a tombstone.
#[derive(Default)]
struct Shard {
    /// A power of two of them, or none.
    slots: Box<[Slot]>,
    len: usize,
}

impl Shard {
    fn home(&self, key: DedupKey) -> usize {
        key.0 as usize & (self.slots.len() - 1)
    }

    /// The slot holding `key`, or the free slot where it would go. `None` when the
    /// shard has no slots.
    fn probe(&self, key: DedupKey) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.slots.len() - 1;
        let mut i = self.home(key);
        // At most three quarters full, so a free slot ends every probe.
        while self.slots[i].key != key && self.slots[i].key != FREE {
            i = (i + 1) & mask;
        }
        Some(i)
    }

    fn get(&self, key: DedupKey) -> Option<&Accepted> {
        let slot = &self.slots[self.probe(key)?];
        (slot.key == key).then_some(&slot.accepted)
    }

    /// Enters or replaces `key`; returns whether it is new.
    fn insert(&mut self, key: DedupKey, accepted: Accepted) -> bool {
        if 4 * (self.len + 1) > 3 * self.slots.len() {
            self.grow();
        }
        let i = self.probe(key).expect("grown above");
        let new = self.slots[i].key == FREE;
        self.slots[i] = Slot { key, accepted };
        self.len += usize::from(new);
        new
    }

    fn grow(&mut self) {
        let size = (2 * self.slots.len()).max(16);
        let old = std::mem::replace(&mut self.slots, vec![Slot::default(); size].into());
        for slot in old.iter().filter(|s| s.key != FREE) {
            let i = self.probe(slot.key).expect("just made");
            self.slots[i] = *slot;
        }
    }

    fn remove(&mut self, key: DedupKey) -> bool {
        let Some(mut hole) = self.probe(key).filter(|&i| self.slots[i].key == key) else {
            return false;
        };
        // Move back every entry after the hole, up to the next free slot, whose probe
        // passes over the hole: its home is not cyclically in (hole, i].
        let mask = self.slots.len() - 1;
        let mut i = hole;
        loop {
            i = (i + 1) & mask;
            let slot = self.slots[i];
            if slot.key == FREE {
                break;
            }
            let home = self.home(slot.key);
            if (i.wrapping_sub(home) & mask) >= (i.wrapping_sub(hole) & mask) {
                self.slots[hole] = slot;
                hole = i;
            }
        }
        self.slots[hole] = Slot::default();
        self.len -= 1;
        if self.len == 0 {
            // A burst's map shrinks back once the window has passed it.
            self.slots = Box::default();
        }
        true
    }
}

/// The table's size, for `/metrics` and the engine's warning when it is full.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct DedupStats {
    /// Entries held.
    pub entries: u64,
    /// Entries forgotten before their window ended, to stay within the bound.
    pub evicted: u64,
    /// When the oldest entry the expiry queue still names was accepted (ms since the
    /// Unix epoch): with a full table, about how far back duplicates are still caught.
    pub oldest_ts: Option<u64>,
}

/// (sender, `id`) → [`Accepted`], with expiry by age.
pub struct DedupTable {
    keys: [RandomState; 2],
    shards: Box<[Shard]>,
    /// Keys in acceptance order, for expiry: `(ts, key)`.
    order: ChunkedQueue<(u64, DedupKey)>,
    len: usize,
    max_len: usize,
    /// Entries forgotten to stay within `max_len` while still inside the window.
    evicted: u64,
}

impl Default for DedupTable {
    fn default() -> Self {
        Self::new(MAX_ENTRIES_DEFAULT)
    }
}

impl DedupTable {
    /// An empty table that holds at most `max_len` entries (at least
    /// [`MAX_ENTRIES_MIN`]).
    pub fn new(max_len: usize) -> Self {
        assert!(
            max_len >= MAX_ENTRIES_MIN,
            "the dedup table holds at least {MAX_ENTRIES_MIN} entries"
        );
        Self {
            keys: [RandomState::new(), RandomState::new()],
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            order: ChunkedQueue::default(),
            len: 0,
            max_len,
            evicted: 0,
        }
    }

    /// The key of (`user`, `id`).
    pub fn key(&self, user: &str, id: &str) -> DedupKey {
        let key = DedupKey(
            self.keys[0].hash_one((user, id)),
            self.keys[1].hash_one((user, id)),
        );
        // All zeros marks a free slot. Moving that one fingerprint onto another keeps
        // the chance of two keys sharing one at about 2^-128.
        if key == FREE {
            DedupKey(0, 1)
        } else {
            key
        }
    }

    fn shard(key: DedupKey) -> usize {
        // The high bits: a shard takes the slot from the low ones of `key.0`.
        (key.1 >> 32) as usize & (SHARDS - 1)
    }

    /// What `key` was accepted as, if at or after `min_ts`.
    pub fn get(&self, key: DedupKey, min_ts: u64) -> Option<Accepted> {
        let hit = *self.shards[Self::shard(key)].get(key)?;
        (hit.ts >= min_ts).then_some(hit)
    }

    /// Remembers `key` → `accepted`, replacing an older entry. A full table forgets
    /// its oldest entry to make room; returns whether it did.
    pub fn put(&mut self, key: DedupKey, accepted: Accepted) -> bool {
        if self.shards[Self::shard(key)].insert(key, accepted) {
            self.len += 1;
        }
        self.order.push((accepted.ts, key));
        let mut evicted = false;
        while self.len > self.max_len {
            // The queue names every entry held, so this ends.
            if self.pop_oldest() {
                self.evicted += 1;
                evicted = true;
            }
        }
        evicted
    }

    /// Forgets `key` if batch `batch` holds its entry (the batch failed).
    pub fn forget(&mut self, key: DedupKey, batch: u64) {
        let shard = &mut self.shards[Self::shard(key)];
        if shard.get(key).is_some_and(|a| a.batch == batch) {
            shard.remove(key);
            self.len -= 1;
        }
    }

    /// Forgets the entries accepted before `min_ts`.
    pub fn expire(&mut self, min_ts: u64) {
        while self.order.front().is_some_and(|&(ts, _)| ts < min_ts) {
            self.pop_oldest();
        }
    }

    /// Takes the front of the expiry queue and forgets its entry, unless the key was
    /// forgotten or accepted again since. Returns whether an entry was forgotten.
    fn pop_oldest(&mut self) -> bool {
        let Some((ts, key)) = self.order.pop_front() else {
            return false;
        };
        let shard = &mut self.shards[Self::shard(key)];
        if shard.get(key).is_none_or(|a| a.ts != ts) {
            return false;
        }
        shard.remove(key);
        self.len -= 1;
        true
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// What the table holds and what it forgot early.
    pub fn stats(&self) -> DedupStats {
        DedupStats {
            entries: self.len as u64,
            evicted: self.evicted,
            oldest_ts: self.order.front().map(|&(ts, _)| ts),
        }
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A FIFO queue in fixed-size chunks: it grows a chunk at a time and never copies
/// what it holds, unlike a `VecDeque`, whose doubling copies everything.
struct ChunkedQueue<T> {
    chunks: VecDeque<Vec<T>>,
    /// Index of the front element in `chunks[0]`.
    front: usize,
}

impl<T> Default for ChunkedQueue<T> {
    fn default() -> Self {
        Self {
            chunks: VecDeque::new(),
            front: 0,
        }
    }
}

impl<T: Copy> ChunkedQueue<T> {
    fn push(&mut self, item: T) {
        match self.chunks.back_mut() {
            Some(last) if last.len() < CHUNK => last.push(item),
            _ => {
                let mut chunk = Vec::with_capacity(CHUNK);
                chunk.push(item);
                self.chunks.push_back(chunk);
            }
        }
    }

    fn front(&self) -> Option<&T> {
        self.chunks.front()?.get(self.front)
    }

    /// Removes and returns the front element.
    fn pop_front(&mut self) -> Option<T> {
        let first = self.chunks.front()?;
        let item = *first.get(self.front)?;
        self.front += 1;
        if self.front == first.len() && (first.len() == CHUNK || self.chunks.len() > 1) {
            self.chunks.pop_front();
            self.front = 0;
        }
        Some(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(t: &mut DedupTable, user: &str, id: &str, msg_id: u64, ts: u64) {
        let key = t.key(user, id);
        t.put(
            key,
            Accepted {
                msg_id,
                ts,
                batch: 0,
            },
        );
    }

    fn get(t: &DedupTable, user: &str, id: &str, min_ts: u64) -> Option<(u64, u64)> {
        t.get(t.key(user, id), min_ts).map(|a| (a.msg_id, a.ts))
    }

    /// Keys crowded onto five home slots (the first, the second, the last of a small
    /// map, two in the middle) so that probes collide, run into each other and wrap
    /// around, and removals shift long runs back; checked against a `HashMap`.
    #[test]
    fn a_shard_agrees_with_a_map_through_collisions_removals_and_growth() {
        let mut shard = Shard::default();
        let mut model = std::collections::HashMap::new();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let lows = [0, 1, 15, 255, 1023];
        for step in 0..300_000u64 {
            let r = next();
            let n = r % 700;
            let key = DedupKey((n << 20) | lows[(n % 5) as usize], 1);
            let accepted = Accepted {
                msg_id: step,
                ts: step,
                batch: r >> 40,
            };
            match (r >> 10) % 10 {
                0..=4 => assert_eq!(
                    shard.insert(key, accepted),
                    model.insert(key, accepted).is_none()
                ),
                5..=7 => assert_eq!(shard.remove(key), model.remove(&key).is_some()),
                _ => assert_eq!(shard.get(key), model.get(&key)),
            }
            assert_eq!(shard.len, model.len());
            if step % 10_000 == 0 {
                for (k, a) in &model {
                    assert_eq!(shard.get(*k), Some(a), "step {step}");
                }
            }
        }
        for k in model.keys() {
            assert!(shard.remove(*k));
        }
        assert_eq!(shard.len, 0);
        assert!(
            shard.slots.is_empty(),
            "an emptied map gives its slots back"
        );
    }

    #[test]
    fn finds_what_it_holds_within_the_window() {
        let mut t = DedupTable::default();
        put(&mut t, "a", "x", 1, 10);
        put(&mut t, "a", "y", 2, 20);
        put(&mut t, "b", "x", 3, 20);
        assert_eq!(get(&t, "a", "x", 5), Some((1, 10)));
        assert_eq!(get(&t, "b", "x", 5), Some((3, 20)));
        assert_eq!(get(&t, "a", "x", 11), None, "outside the window");
        assert_eq!(get(&t, "a", "z", 0), None);
        // The parts are kept apart: ("ab", "c") is not ("a", "bc").
        put(&mut t, "ab", "c", 4, 30);
        assert_eq!(get(&t, "a", "bc", 0), None);
        assert_eq!(t.len(), 4);
    }

    #[test]
    fn expiry_keeps_reaccepted_keys() {
        let mut t = DedupTable::default();
        put(&mut t, "a", "x", 1, 10);
        put(&mut t, "a", "y", 2, 20);
        put(&mut t, "a", "x", 3, 30);
        assert_eq!(t.len(), 2);
        t.expire(25);
        assert_eq!(get(&t, "a", "x", 0), Some((3, 30)));
        assert_eq!(get(&t, "a", "y", 0), None);
        assert_eq!(t.len(), 1);
        t.expire(31);
        assert!(t.is_empty());
        assert_eq!(get(&t, "a", "x", 0), None);
    }

    /// Many chunks in, all out in order, and the queue works again after emptying.
    #[test]
    fn expiry_across_chunks() {
        let mut t = DedupTable::default();
        let n = 3 * CHUNK as u64 + 17;
        for i in 0..n {
            put(&mut t, "u", &i.to_string(), i, i);
        }
        assert_eq!(t.len(), n as usize);
        t.expire(CHUNK as u64 + 5);
        assert_eq!(t.len(), (n - CHUNK as u64 - 5) as usize);
        assert_eq!(get(&t, "u", &(CHUNK + 4).to_string(), 0), None);
        assert_eq!(
            get(&t, "u", &(CHUNK + 5).to_string(), 0),
            Some((CHUNK as u64 + 5, CHUNK as u64 + 5))
        );
        t.expire(n);
        assert!(t.is_empty());
        put(&mut t, "u", "again", 1, n + 1);
        put(&mut t, "u", "more", 2, n + 2);
        t.expire(n + 2);
        assert_eq!(get(&t, "u", "more", 0), Some((2, n + 2)));
        assert_eq!(t.len(), 1);
    }

    /// A full table forgets its oldest entries first, counts them, and still expires
    /// by age; a key forgotten by its failed batch does not count against it.
    #[test]
    fn a_full_table_forgets_its_oldest_entries() {
        let max = MAX_ENTRIES_MIN;
        let mut t = DedupTable::new(max);
        let forgotten = t.key("a", "failed");
        t.put(
            forgotten,
            Accepted {
                msg_id: 0,
                ts: 0,
                batch: 7,
            },
        );
        t.forget(forgotten, 7);
        for i in 0..max as u64 {
            put(&mut t, "u", &i.to_string(), i, 1 + i);
        }
        assert_eq!(t.stats().evicted, 0, "the forgotten key left room");
        assert_eq!(t.len(), max);
        put(&mut t, "u", "new", 1, 10 + max as u64);
        put(&mut t, "u", "newer", 2, 11 + max as u64);
        let stats = t.stats();
        assert_eq!((stats.entries, stats.evicted), (max as u64, 2));
        assert_eq!(stats.oldest_ts, Some(3), "the two oldest went");
        assert_eq!(get(&t, "u", "0", 0), None);
        assert_eq!(get(&t, "u", "1", 0), None);
        assert_eq!(get(&t, "u", "2", 0), Some((2, 3)));
        assert_eq!(get(&t, "u", "new", 0), Some((1, 10 + max as u64)));
        t.expire(11 + max as u64);
        assert_eq!(t.len(), 1);
        assert_eq!(t.stats().evicted, 2, "expiry is not eviction");
    }

    #[test]
    #[should_panic(expected = "at least")]
    fn a_bound_below_the_minimum_is_refused() {
        DedupTable::new(MAX_ENTRIES_MIN - 1);
    }

    #[test]
    fn forget_drops_only_the_named_batch_entry() {
        let mut t = DedupTable::default();
        let key = t.key("a", "x");
        let accepted = |batch| Accepted {
            msg_id: 1,
            ts: 10,
            batch,
        };
        t.put(key, accepted(3));
        t.forget(key, 2);
        assert_eq!(
            t.get(key, 0),
            Some(accepted(3)),
            "another batch's entry stays"
        );
        t.forget(key, 3);
        assert_eq!(t.get(key, 0), None);
        assert!(t.is_empty());
        // The expiry queue still names the key; expiring it is harmless.
        t.expire(11);
        assert!(t.is_empty());
    }

    #[test]
    fn the_queue_is_fifo_through_partial_chunks() {
        let mut q = ChunkedQueue::default();
        for i in 0..10 {
            q.push(i);
        }
        for i in 0..10 {
            assert_eq!(q.front(), Some(&i));
            assert_eq!(q.pop_front(), Some(i));
        }
        assert_eq!(q.front(), None);
        assert_eq!(q.pop_front(), None);
        q.push(42);
        assert_eq!(q.front(), Some(&42));
        assert_eq!(q.pop_front(), Some(42));
        assert_eq!(q.pop_front(), None);
    }
}
