//! The dedup table: (sender, client `id`) → the original `(msg_id, ts)`, for the
//! configured window (PROTOCOL.md §4, ten minutes by default).
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
//!   An entry costs 60–100 bytes (with the maps' spare room) and no allocation of
//!   its own; with the two strings copied twice it was about 250.
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

/// A key's fingerprint.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Fingerprint(u64, u64);

impl Hash for Fingerprint {
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
        // Only `Fingerprint` is hashed here, through `write_u64`; fold anything else.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type Shard = HashMap<Fingerprint, (u64, u64), BuildHasherDefault<TakeU64>>;

/// (sender, `id`) → `(msg_id, ts)`, with expiry by age.
pub struct DedupTable {
    keys: [RandomState; 2],
    shards: Box<[Shard]>,
    /// Keys in acceptance order, for expiry: `(ts, key)`.
    order: ChunkedQueue<(u64, Fingerprint)>,
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
    fn fingerprint(&self, user: &str, id: &str) -> Fingerprint {
        Fingerprint(
            self.keys[0].hash_one((user, id)),
            self.keys[1].hash_one((user, id)),
        )
    }

    fn shard(&self, key: Fingerprint) -> usize {
        // The high bits: hashbrown takes the bucket from the low ones of `key.0`.
        (key.1 >> 32) as usize & (SHARDS - 1)
    }

    /// The `(msg_id, ts)` of (`user`, `id`) if it was accepted at or after `min_ts`.
    pub fn get(&self, user: &str, id: &str, min_ts: u64) -> Option<(u64, u64)> {
        let key = self.fingerprint(user, id);
        let hit = *self.shards[self.shard(key)].get(&key)?;
        (hit.1 >= min_ts).then_some(hit)
    }

    /// Remembers (`user`, `id`) → (`msg_id`, `ts`), replacing an older entry.
    pub fn put(&mut self, user: &str, id: &str, msg_id: u64, ts: u64) {
        let key = self.fingerprint(user, id);
        let shard = self.shard(key);
        if self.shards[shard].insert(key, (msg_id, ts)).is_none() {
            self.len += 1;
        }
        self.order.push((ts, key));
    }

    /// Forgets the entries accepted before `min_ts`.
    pub fn expire(&mut self, min_ts: u64) {
        while let Some((ts, key)) = self.order.pop_if(|&(ts, _)| ts < min_ts) {
            let shard = &mut self.shards[(key.1 >> 32) as usize & (SHARDS - 1)];
            // Only forget the key if it was not accepted again later.
            if shard.get(&key).is_some_and(|&(_, t)| t == ts) {
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

    #[test]
    fn finds_what_it_holds_within_the_window() {
        let mut t = DedupTable::default();
        t.put("a", "x", 1, 10);
        t.put("a", "y", 2, 20);
        t.put("b", "x", 3, 20);
        assert_eq!(t.get("a", "x", 5), Some((1, 10)));
        assert_eq!(t.get("b", "x", 5), Some((3, 20)));
        assert_eq!(t.get("a", "x", 11), None, "outside the window");
        assert_eq!(t.get("a", "z", 0), None);
        // The parts are kept apart: ("ab", "c") is not ("a", "bc").
        t.put("ab", "c", 4, 30);
        assert_eq!(t.get("a", "bc", 0), None);
        assert_eq!(t.len(), 4);
    }

    #[test]
    fn expiry_keeps_reaccepted_keys() {
        let mut t = DedupTable::default();
        t.put("a", "x", 1, 10);
        t.put("a", "y", 2, 20);
        t.put("a", "x", 3, 30);
        assert_eq!(t.len(), 2);
        t.expire(25);
        assert_eq!(t.get("a", "x", 0), Some((3, 30)));
        assert_eq!(t.get("a", "y", 0), None);
        assert_eq!(t.len(), 1);
        t.expire(31);
        assert!(t.is_empty());
        assert_eq!(t.get("a", "x", 0), None);
    }

    /// Many chunks in, all out in order, and the queue works again after emptying.
    #[test]
    fn expiry_across_chunks() {
        let mut t = DedupTable::default();
        let n = 3 * CHUNK as u64 + 17;
        for i in 0..n {
            t.put("u", &i.to_string(), i, i);
        }
        assert_eq!(t.len(), n as usize);
        t.expire(CHUNK as u64 + 5);
        assert_eq!(t.len(), (n - CHUNK as u64 - 5) as usize);
        assert_eq!(t.get("u", &(CHUNK + 4).to_string(), 0), None);
        assert_eq!(
            t.get("u", &(CHUNK + 5).to_string(), 0),
            Some((CHUNK as u64 + 5, CHUNK as u64 + 5))
        );
        t.expire(n);
        assert!(t.is_empty());
        t.put("u", "again", 1, n + 1);
        t.put("u", "more", 2, n + 2);
        t.expire(n + 2);
        assert_eq!(t.get("u", "more", 0), Some((2, n + 2)));
        assert_eq!(t.len(), 1);
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
