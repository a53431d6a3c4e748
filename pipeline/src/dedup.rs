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
//! pipeline's largest map and the one that grows fastest. Two things keep it from
//! stalling the pipeline while it grows:
//!
//! - It is split into [`SHARDS`] maps chosen by the key, so growing rehashes one small
//!   map at a time. One `HashMap` doubling from 256k to 512k entries took the pipeline
//!   60–100 ms (a p99 of 75 ms in `flare-loadgen chat` at 30k msgs/s); a shard's
//!   doubling is [`SHARDS`] times smaller.
//! - Keys are fixed-size fingerprints, not copies of the two strings, and the expiry
//!   queue is a list of fixed-size chunks, not one ring that is copied as it doubles.
//!   An entry costs 70–120 bytes (with the maps' spare room, the batch id included)
//!   and no allocation of its own; with the two strings copied twice it was about 250.
//!
//! A fingerprint is 128 bits of two SipHash-1-3 keyed with random keys per process.
//! Two different keys share one with a probability of 2^-128, and a client cannot
//! aim for a collision without the keys. The table is rebuilt from the log at start,
//! under the new process's keys.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState};

/// Maps in the table. A power of two.
pub const SHARDS: usize = 1024;

/// Entries per chunk of the expiry queue.
const CHUNK: usize = 4096;

/// The fingerprint of a (sender, client `id`) pair, computed once per message.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct DedupKey(u64, u64);

/// What the table remembers of an accepted message.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Accepted {
    /// The message's `msg_id`.
    pub msg_id: u64,
    /// When it was accepted (ms since the Unix epoch).
    pub ts: u64,
    /// The engine's id of the batch that holds it.
    pub batch: u64,
}

impl Hash for DedupKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Already uniformly random: the maps use it as it is (see `TakeU64`).
        state.write_u64(self.0);
    }
}

/// A hasher for keys that are random already: the hash is the last `u64` written.
#[derive(Default)]
struct TakeU64(u64);

impl Hasher for TakeU64 {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `DedupKey` is hashed here, through `write_u64`; fold anything else.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type Shard = HashMap<DedupKey, Accepted, BuildHasherDefault<TakeU64>>;

/// (sender, `id`) → [`Accepted`], with expiry by age.
pub struct DedupTable {
    keys: [RandomState; 2],
    shards: Box<[Shard]>,
    /// Keys in acceptance order, for expiry: `(ts, key)`.
    order: ChunkedQueue<(u64, DedupKey)>,
    len: usize,
}

impl Default for DedupTable {
    fn default() -> Self {
        Self {
            keys: [RandomState::new(), RandomState::new()],
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            order: ChunkedQueue::default(),
            len: 0,
        }
    }
}

impl DedupTable {
    /// The key of (`user`, `id`).
    pub fn key(&self, user: &str, id: &str) -> DedupKey {
        DedupKey(
            self.keys[0].hash_one((user, id)),
            self.keys[1].hash_one((user, id)),
        )
    }

    fn shard(key: DedupKey) -> usize {
        // The high bits: hashbrown takes the bucket from the low ones of `key.0`.
        (key.1 >> 32) as usize & (SHARDS - 1)
    }

    /// What `key` was accepted as, if at or after `min_ts`.
    pub fn get(&self, key: DedupKey, min_ts: u64) -> Option<Accepted> {
        let hit = *self.shards[Self::shard(key)].get(&key)?;
        (hit.ts >= min_ts).then_some(hit)
    }

    /// Remembers `key` → `accepted`, replacing an older entry.
    pub fn put(&mut self, key: DedupKey, accepted: Accepted) {
        if self.shards[Self::shard(key)]
            .insert(key, accepted)
            .is_none()
        {
            self.len += 1;
        }
        self.order.push((accepted.ts, key));
    }

    /// Forgets `key` if batch `batch` holds its entry (the batch failed).
    pub fn forget(&mut self, key: DedupKey, batch: u64) {
        let shard = &mut self.shards[Self::shard(key)];
        if shard.get(&key).is_some_and(|a| a.batch == batch) {
            shard.remove(&key);
            self.len -= 1;
        }
    }

    /// Forgets the entries accepted before `min_ts`.
    pub fn expire(&mut self, min_ts: u64) {
        while let Some((ts, key)) = self.order.pop_if(|&(ts, _)| ts < min_ts) {
            let shard = &mut self.shards[Self::shard(key)];
            // Only forget the key if it was not accepted again later.
            if shard.get(&key).is_some_and(|a| a.ts == ts) {
                shard.remove(&key);
                self.len -= 1;
                if shard.is_empty() {
                    // A burst's table shrinks back once the window has passed it.
                    shard.shrink_to_fit();
                }
            }
        }
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.len
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

    /// Removes and returns the front element if `take` says so.
    fn pop_if(&mut self, take: impl FnOnce(&T) -> bool) -> Option<T> {
        let first = self.chunks.front()?;
        let item = *first.get(self.front)?;
        if !take(&item) {
            return None;
        }
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
            assert_eq!(q.pop_if(|_| true), Some(i));
        }
        assert_eq!(q.pop_if(|_| true), None);
        q.push(42);
        assert_eq!(q.pop_if(|&v| v > 50), None);
        assert_eq!(q.pop_if(|&v| v == 42), Some(42));
        assert_eq!(q.pop_if(|_| true), None);
    }
}
