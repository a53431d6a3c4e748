//! [`ShardedMap`]: a hash map split in 256 by key, for the maps that grow with users and
//! connections (inboxes, sessions, presence).

use std::borrow::Borrow;
use std::hash::{BuildHasher, Hash};
use std::ops::Index;

use hashbrown::HashTable;

/// How many maps a [`ShardedMap`] is split into: the top 8 bits of a key's hash pick one.
const SHARDS: usize = 256;
/// Entries at which a [`ShardedMap`] splits its one table into [`SHARDS`]. Below, one
/// table: a few thousand entries stay in few cache lines, where 256 small tables
/// touched a line of each (a group's fan-out walks every member: the pipeline thread
/// spent 40% more time). Splitting at this size moves as many entries as one doubling
/// of that table does.
const SPLIT_AT_LEN: usize = 1 << 16;

/// A hash map made of [`SHARDS`] tables, one picked by the top bits of the key's hash,
/// once it holds [`SPLIT_AT_LEN`] entries (one table until then).
///
/// A hash map grows by doubling, and a doubling moves every entry at once: a map of two
/// million users stopped its thread for 0.25-0.8 s on one insert (two runs), and every message
/// waiting on the pipeline waits with it (the stall the dedup table had, see `dedup.rs`).
/// Split, a doubling moves 1/256 of the entries. The key is hashed once (aHash, random
/// keys per process), for both the pick and the lookup.
pub(crate) struct ShardedMap<K, V> {
    hasher: ahash::RandomState,
    /// One table, or [`SHARDS`].
    tables: Vec<HashTable<(K, V)>>,
    len: usize,
}

impl<K, V> Default for ShardedMap<K, V> {
    fn default() -> Self {
        ShardedMap {
            hasher: ahash::RandomState::new(),
            tables: vec![HashTable::new()],
            len: 0,
        }
    }
}

/// The table of `hash` among [`SHARDS`].
fn shard_of(hash: u64) -> usize {
    (hash >> (64 - SHARDS.trailing_zeros())) as usize
}

impl<K: Hash + Eq, V> ShardedMap<K, V> {
    fn hash<Q: Hash + ?Sized>(&self, key: &Q) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The table of a key's hash.
    fn shard(&self, hash: u64) -> usize {
        if self.tables.len() == 1 {
            0
        } else {
            shard_of(hash)
        }
    }

    /// Moves the entries of the one table into [`SHARDS`] tables.
    fn split(&mut self) {
        let hasher = &self.hasher;
        let one = std::mem::take(&mut self.tables[0]);
        let mut tables: Vec<HashTable<(K, V)>> = (0..SHARDS).map(|_| HashTable::new()).collect();
        for (k, v) in one {
            let hash = hasher.hash_one(&k);
            tables[shard_of(hash)].insert_unique(hash, (k, v), |(k, _)| hasher.hash_one(k));
        }
        self.tables = tables;
    }

    pub(crate) fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.get_key_value(key).map(|(_, v)| v)
    }

    pub(crate) fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.get_key_value_mut(key).map(|(_, v)| v)
    }

    pub(crate) fn get_key_value_mut<Q>(&mut self, key: &Q) -> Option<(&K, &mut V)>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let hash = self.hash(key);
        let shard = self.shard(hash);
        self.tables[shard]
            .find_mut(hash, |(k, _)| k.borrow() == key)
            .map(|(k, v)| (&*k, v))
    }

    pub(crate) fn get_key_value<Q>(&self, key: &Q) -> Option<(&K, &V)>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let hash = self.hash(key);
        self.tables[self.shard(hash)]
            .find(hash, |(k, _)| k.borrow() == key)
            .map(|(k, v)| (k, v))
    }

    /// The hash `key` is filed under, for [`find_hashed_mut`](Self::find_hashed_mut).
    pub(crate) fn hash_of<Q: Hash + ?Sized>(&self, key: &Q) -> u64 {
        self.hash(key)
    }

    /// The entry filed under `hash` (from [`hash_of`](Self::hash_of)) whose key `is`
    /// accepts. A caller that holds a key it took from the map can compare addresses,
    /// not the key's contents.
    pub(crate) fn find_hashed_mut(
        &mut self,
        hash: u64,
        mut is: impl FnMut(&K) -> bool,
    ) -> Option<(&K, &mut V)> {
        let shard = self.shard(hash);
        self.tables[shard]
            .find_mut(hash, |(k, _)| is(k))
            .map(|(k, v)| (&*k, v))
    }

    pub(crate) fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.get_key_value(key).is_some()
    }

    /// Inserts `value` under `key`; returns the value it replaces.
    pub(crate) fn insert(&mut self, key: K, value: V) -> Option<V> {
        if self.tables.len() == 1 && self.len == SPLIT_AT_LEN {
            self.split();
        }
        let hash = self.hash(&key);
        let shard = self.shard(hash);
        let hasher = &self.hasher;
        let table = &mut self.tables[shard];
        if let Some((_, old)) = table.find_mut(hash, |(k, _)| *k == key) {
            return Some(std::mem::replace(old, value));
        }
        table.insert_unique(hash, (key, value), |(k, _)| hasher.hash_one(k));
        self.len += 1;
        None
    }

    pub(crate) fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let hash = self.hash(key);
        let shard = self.shard(hash);
        let entry = self.tables[shard]
            .find_entry(hash, |(k, _)| k.borrow() == key)
            .ok()?;
        let ((_, value), _) = entry.remove();
        self.len -= 1;
        Some(value)
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl<K, Q, V> Index<&Q> for ShardedMap<K, V>
where
    K: Hash + Eq + Borrow<Q>,
    Q: Hash + Eq + ?Sized,
{
    type Output = V;

    fn index(&self, key: &Q) -> &V {
        self.get(key).expect("ShardedMap: no entry for the key")
    }
}

#[cfg(test)]
mod tests {
    use std::rc::Rc;

    use super::*;

    #[test]
    fn behaves_as_one_map_and_spreads_its_keys() {
        let mut m: ShardedMap<Rc<str>, u32> = ShardedMap::default();
        let n = SPLIT_AT_LEN as u32 + 20_000;
        for i in 0..n {
            assert_eq!(m.insert(Rc::from(format!("user-{i}").as_str()), i), None);
        }
        assert_eq!(
            m.insert(Rc::from("user-7"), 70),
            Some(7),
            "a second insert replaces"
        );
        assert_eq!(m.len(), n as usize);
        assert_eq!(m.tables.len(), SHARDS, "split at {SPLIT_AT_LEN}");
        for i in 0..n {
            let key = format!("user-{i}");
            let want = if i == 7 { 70 } else { i };
            assert_eq!(m.get(key.as_str()), Some(&want));
            assert_eq!(m[key.as_str()], want);
            assert!(m.contains_key(key.as_str()));
            assert_eq!(
                m.get_key_value(key.as_str()).map(|(k, _)| &**k),
                Some(key.as_str())
            );
        }
        *m.get_mut("user-1").expect("present") += 100;
        assert_eq!(m["user-1"], 101);
        assert_eq!(m.remove("user-1"), Some(101));
        assert_eq!(m.remove("user-1"), None);
        assert_eq!(m.len(), n as usize - 1);
        assert_eq!(m.get("user-1"), None);
        assert_eq!(m.get("nobody"), None);
        // Every map gets a share: none holds more than twice the average.
        let most = m.tables.iter().map(|t| t.len()).max().expect("tables");
        assert!(
            most < 2 * n as usize / SHARDS,
            "{most} keys in one map of {SHARDS}"
        );
    }

    #[test]
    fn a_key_taken_from_the_map_finds_its_entry_by_address_across_a_split() {
        let mut m: ShardedMap<Rc<str>, u32> = ShardedMap::default();
        m.insert(Rc::from("early"), 1);
        let key = m.get_key_value("early").expect("inserted").0.clone();
        let hash = m.hash_of("early");
        assert_eq!(hash, m.hash_of(&key), "a key and its text hash alike");
        for i in 0..SPLIT_AT_LEN as u32 {
            m.insert(Rc::from(format!("user-{i}").as_str()), i);
        }
        assert_eq!(m.tables.len(), SHARDS, "split");
        let (found, value) = m
            .find_hashed_mut(hash, |k| Rc::ptr_eq(k, &key))
            .expect("still there after the split");
        assert!(Rc::ptr_eq(found, &key));
        *value += 1;
        assert_eq!(m["early"], 2);
        let other: Rc<str> = Rc::from("early");
        assert!(
            m.find_hashed_mut(hash, |k| Rc::ptr_eq(k, &other)).is_none(),
            "an equal key at another address is not the map's"
        );
    }
}
