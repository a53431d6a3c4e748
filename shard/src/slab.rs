//! Generation-checked ids for a shard's connections (and anything else it owns).
//!
//! A [`Slab`] stores values in a vector and names each by a `u64` id:
//! `(generation << 32) | index`. Removing a value bumps its slot's generation, so an id
//! kept by a timer, a mailbox message or a delivery after its connection closed misses
//! instead of reaching whichever connection reuses the slot. Vacant slots are chained
//! in a free list and reused last-freed-first (their memory is the warmest).
//!
//! A slot's generation wraps after 2^32 removals; an id would have to outlive four
//! billion reuses of its slot to be mistaken, which a shard's timers and queues do not.

/// End of the free list.
const NONE: u32 = u32::MAX;

#[derive(Debug, Clone)]
enum Slot<T> {
    Occupied(T),
    Vacant { next_free: u32 },
}

#[derive(Debug, Clone)]
struct Entry<T> {
    generation: u32,
    slot: Slot<T>,
}

/// A vector of values named by generation-checked `u64` ids. See the [module](self) docs.
#[derive(Debug, Clone)]
pub struct Slab<T> {
    entries: Vec<Entry<T>>,
    /// The most recently freed vacant slot, or [`NONE`].
    free_head: u32,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// The id of slot `index` at `generation`.
const fn make_id(generation: u32, index: u32) -> u64 {
    (generation as u64) << 32 | index as u64
}

/// The (generation, index) of an id.
const fn split_id(id: u64) -> (u32, u32) {
    ((id >> 32) as u32, id as u32)
}

impl<T> Slab<T> {
    /// An empty slab.
    pub const fn new() -> Self {
        Slab {
            entries: Vec::new(),
            free_head: NONE,
            len: 0,
        }
    }

    /// An empty slab with room for `capacity` values before it reallocates.
    pub fn with_capacity(capacity: usize) -> Self {
        Slab {
            entries: Vec::with_capacity(capacity),
            free_head: NONE,
            len: 0,
        }
    }

    /// Stores `value` and returns its id.
    pub fn insert(&mut self, value: T) -> u64 {
        self.insert_with(|_| value)
    }

    /// Stores the value `make` builds from its own id (a connection that knows its id).
    ///
    /// # Panics
    /// If the slab would hold more than `u32::MAX - 1` slots (ids have 32 index bits).
    pub fn insert_with(&mut self, make: impl FnOnce(u64) -> T) -> u64 {
        let id = if self.free_head != NONE {
            let index = self.free_head;
            let entry = &mut self.entries[index as usize];
            let Slot::Vacant { next_free } = entry.slot else {
                unreachable!("the free list holds only vacant slots")
            };
            let id = make_id(entry.generation, index);
            entry.slot = Slot::Occupied(make(id));
            self.free_head = next_free;
            id
        } else {
            let index = u32::try_from(self.entries.len())
                .ok()
                .filter(|&i| i != NONE)
                .expect("a slab holds fewer than 2^32 - 1 slots");
            let id = make_id(0, index);
            self.entries.push(Entry {
                generation: 0,
                slot: Slot::Occupied(make(id)),
            });
            id
        };
        self.len += 1;
        id
    }

    /// The value named by `id`, unless it was removed.
    pub fn get(&self, id: u64) -> Option<&T> {
        let (generation, index) = split_id(id);
        match self.entries.get(index as usize) {
            Some(Entry {
                generation: g,
                slot: Slot::Occupied(value),
            }) if *g == generation => Some(value),
            _ => None,
        }
    }

    /// The value named by `id`, mutably, unless it was removed.
    pub fn get_mut(&mut self, id: u64) -> Option<&mut T> {
        let (generation, index) = split_id(id);
        match self.entries.get_mut(index as usize) {
            Some(Entry {
                generation: g,
                slot: Slot::Occupied(value),
            }) if *g == generation => Some(value),
            _ => None,
        }
    }

    /// Whether `id` names a stored value.
    pub fn contains(&self, id: u64) -> bool {
        self.get(id).is_some()
    }

    /// Removes and returns the value named by `id`; `None` if `id` is stale or unknown.
    /// The slot's generation moves on, so `id` never names anything again.
    pub fn remove(&mut self, id: u64) -> Option<T> {
        let (generation, index) = split_id(id);
        let entry = self.entries.get_mut(index as usize)?;
        if entry.generation != generation || matches!(entry.slot, Slot::Vacant { .. }) {
            return None;
        }
        let Slot::Occupied(value) = std::mem::replace(
            &mut entry.slot,
            Slot::Vacant {
                next_free: self.free_head,
            },
        ) else {
            unreachable!("checked occupied above")
        };
        entry.generation = entry.generation.wrapping_add(1);
        self.free_head = index;
        self.len -= 1;
        Some(value)
    }

    /// How many values are stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no value is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every stored value with its id, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &T)> + '_ {
        self.entries
            .iter()
            .enumerate()
            .filter_map(|(index, entry)| match &entry.slot {
                Slot::Occupied(value) => Some((make_id(entry.generation, index as u32), value)),
                Slot::Vacant { .. } => None,
            })
    }

    /// Every stored value, mutably, with its id, in slot order.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (u64, &mut T)> + '_ {
        self.entries
            .iter_mut()
            .enumerate()
            .filter_map(|(index, entry)| match &mut entry.slot {
                Slot::Occupied(value) => Some((make_id(entry.generation, index as u32), value)),
                Slot::Vacant { .. } => None,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_get_remove() {
        let mut slab = Slab::new();
        assert!(slab.is_empty());
        let a = slab.insert("a");
        let b = slab.insert("b");
        assert_ne!(a, b);
        assert_eq!(slab.len(), 2);
        assert_eq!(slab.get(a), Some(&"a"));
        assert_eq!(slab.get(b), Some(&"b"));
        *slab.get_mut(b).unwrap() = "B";
        assert_eq!(slab.remove(b), Some("B"));
        assert_eq!(slab.len(), 1);
        assert_eq!(slab.get(b), None);
        assert_eq!(slab.get_mut(b), None);
        assert_eq!(slab.remove(b), None, "a second remove misses");
        assert_eq!(slab.len(), 1);
        assert!(slab.contains(a));
        assert!(!slab.contains(b));
    }

    #[test]
    fn id_layout_is_generation_then_index() {
        let mut slab = Slab::new();
        let first = slab.insert(1);
        let second = slab.insert(2);
        assert_eq!(first, 0);
        assert_eq!(second, 1);
        slab.remove(first);
        let reused = slab.insert(3);
        assert_eq!(reused, 1 << 32, "slot 0, generation 1");
    }

    #[test]
    fn stale_id_misses_after_reuse() {
        let mut slab = Slab::new();
        let old = slab.insert("old");
        assert_eq!(slab.remove(old), Some("old"));
        let new = slab.insert("new");
        assert_eq!(new as u32, old as u32, "the slot is reused");
        assert_ne!(new, old);
        assert_eq!(slab.get(old), None);
        assert_eq!(slab.get_mut(old), None);
        assert_eq!(slab.remove(old), None);
        assert_eq!(
            slab.get(new),
            Some(&"new"),
            "the stale remove did not touch the new value"
        );
        assert_eq!(slab.len(), 1);
    }

    #[test]
    fn free_slots_are_reused_last_freed_first() {
        let mut slab = Slab::new();
        let ids: Vec<u64> = (0..4).map(|i| slab.insert(i)).collect();
        slab.remove(ids[1]);
        slab.remove(ids[3]);
        assert_eq!(slab.insert(10) as u32, 3);
        assert_eq!(slab.insert(11) as u32, 1);
        assert_eq!(slab.insert(12) as u32, 4, "no free slot left: a new one");
        assert_eq!(slab.len(), 5);
    }

    #[test]
    fn unknown_ids_miss() {
        let mut slab: Slab<u8> = Slab::with_capacity(4);
        assert_eq!(slab.get(0), None);
        assert_eq!(slab.remove(7), None);
        let id = slab.insert(1);
        assert_eq!(slab.get(id + 1), None);
        assert_eq!(
            slab.get(id | 5 << 32),
            None,
            "a future generation misses too"
        );
    }

    #[test]
    fn insert_with_sees_its_own_id() {
        let mut slab = Slab::new();
        let a = slab.insert_with(|id| id);
        slab.remove(a);
        let b = slab.insert_with(|id| id);
        assert_eq!(slab.get(b), Some(&b));
        assert_ne!(a, b);
    }

    #[test]
    fn iter_yields_live_values_with_their_ids() {
        let mut slab = Slab::new();
        let ids: Vec<u64> = (0..5).map(|i| slab.insert(i * 10)).collect();
        slab.remove(ids[2]);
        let again = slab.insert(99);
        let seen: Vec<(u64, i32)> = slab.iter().map(|(id, v)| (id, *v)).collect();
        assert_eq!(
            seen,
            [
                (ids[0], 0),
                (ids[1], 10),
                (again, 99),
                (ids[3], 30),
                (ids[4], 40)
            ]
        );
        for (id, value) in slab.iter_mut() {
            *value += id as u32 as i32;
        }
        assert_eq!(slab.get(ids[4]), Some(&44));
        assert_eq!(slab.iter().count(), slab.len());
    }

    #[test]
    fn generations_wrap_without_panicking() {
        let mut slab = Slab::new();
        let first = slab.insert(0);
        // Walk slot 0 to the last generation, then once more.
        slab.entries[0].generation = u32::MAX;
        let last = make_id(u32::MAX, 0);
        assert_eq!(slab.get(first), None);
        assert_eq!(slab.remove(last), Some(0));
        let wrapped = slab.insert(1);
        assert_eq!(wrapped, 0);
        assert_eq!(slab.get(last), None);
    }

    #[test]
    fn model_check_against_a_map() {
        // A deterministic random walk of inserts and removes (live and stale ids),
        // checked against a HashMap after every step.
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut slab = Slab::new();
        let mut model = std::collections::HashMap::new();
        let mut dead = Vec::new();
        for step in 0..20_000u64 {
            match next() % 3 {
                0 | 1 if model.len() < 300 => {
                    let id = slab.insert(step);
                    assert!(
                        model.insert(id, step).is_none(),
                        "ids are unique among live values"
                    );
                }
                _ => {
                    let id = if !model.is_empty() && next() % 4 != 0 {
                        *model
                            .keys()
                            .nth((next() % model.len() as u64) as usize)
                            .unwrap()
                    } else if let Some(&stale) =
                        dead.get((next() % (dead.len() as u64 + 1)) as usize)
                    {
                        stale
                    } else {
                        continue;
                    };
                    assert_eq!(slab.remove(id), model.remove(&id));
                    dead.push(id);
                }
            }
            assert_eq!(slab.len(), model.len());
            if step % 97 == 0 {
                let mut live: Vec<(u64, u64)> = slab.iter().map(|(id, v)| (id, *v)).collect();
                let mut expected: Vec<(u64, u64)> = model.iter().map(|(id, v)| (*id, *v)).collect();
                live.sort_unstable();
                expected.sort_unstable();
                assert_eq!(live, expected);
                for &id in &dead {
                    assert_eq!(slab.get(id), model.get(&id));
                }
            }
        }
    }
}
