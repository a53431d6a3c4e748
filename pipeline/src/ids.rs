//! Cluster-unique, time-ordered message ids.
//!
//! `msg_id = (ms since 2024-01-01T00:00:00Z) << 22 | node << 12 | sequence`, with a
//! 10-bit node number hashed from the node id and a 12-bit sequence within one
//! millisecond. Ids are strictly increasing within a process and, because the
//! generator starts above the largest id in the log, across restarts; when the clock
//! stands still or goes back, the generator borrows from the future.

/// 2024-01-01T00:00:00Z in ms since the Unix epoch.
pub const EPOCH_MS: u64 = 1_704_067_200_000;
const NODE_BITS: u32 = 10;
const SEQ_BITS: u32 = 12;
const NODE_MASK: u64 = (1 << NODE_BITS) - 1;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;
const TIME_SHIFT: u32 = NODE_BITS + SEQ_BITS;

/// The 10-bit node number of a node id: FNV-1a, low bits.
pub fn node_number(node_id: &str) -> u64 {
    let mut h: u32 = 0x811c_9dc5;
    for b in node_id.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    u64::from(h) & NODE_MASK
}

/// Hands out message ids.
#[derive(Debug)]
pub struct MsgIds {
    node: u64,
    last: u64,
}

impl MsgIds {
    pub fn new(node_id: &str) -> Self {
        Self {
            node: node_number(node_id),
            last: 0,
        }
    }

    fn compose(&self, time: u64, seq: u64) -> u64 {
        time << TIME_SHIFT | self.node << SEQ_BITS | seq
    }

    /// The next id at `now_ms` (ms since the Unix epoch).
    pub fn next(&mut self, now_ms: u64) -> u64 {
        let fresh = self.compose(now_ms.saturating_sub(EPOCH_MS), 0);
        let id = if fresh > self.last {
            fresh
        } else {
            let time = self.last >> TIME_SHIFT;
            let node = (self.last >> SEQ_BITS) & NODE_MASK;
            let seq = self.last & SEQ_MASK;
            if node == self.node && seq < SEQ_MASK {
                self.last + 1
            } else if node < self.node {
                self.compose(time, 0)
            } else {
                self.compose(time + 1, 0)
            }
        };
        debug_assert!(id > self.last, "msg ids strictly increase");
        self.last = id;
        id
    }

    /// Makes later ids larger than `id` (one read back from the log).
    pub fn observe(&mut self, id: u64) {
        self.last = self.last.max(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_strict_increase() {
        let mut ids = MsgIds::new("gw-1");
        let node = node_number("gw-1");
        let a = ids.next(EPOCH_MS + 5);
        assert_eq!(a, 5 << 22 | node << 12);
        let b = ids.next(EPOCH_MS + 5);
        assert_eq!(b, a + 1);
        let c = ids.next(EPOCH_MS + 3);
        assert!(c > b, "a clock going back does not go back");
        let d = ids.next(EPOCH_MS + 6);
        assert_eq!(d, 6 << 22 | node << 12);
        // 4096 ids in one millisecond overflow into the next millisecond, same node.
        let mut last = d;
        for _ in 0..5000 {
            let n = ids.next(EPOCH_MS + 6);
            assert!(n > last);
            assert_eq!((n >> 12) & 0x3ff, node);
            last = n;
        }
    }

    #[test]
    fn observed_ids_of_any_node_are_exceeded() {
        for other in ["a", "b", "c", "node-7", "gw-1"] {
            let mut ids = MsgIds::new("gw-1");
            let mut theirs = MsgIds::new(other);
            let mut seen = 0;
            for _ in 0..4097 {
                seen = theirs.next(EPOCH_MS + 100);
            }
            ids.observe(seen);
            let mine = ids.next(EPOCH_MS + 100);
            assert!(mine > seen, "{other}: {mine} > {seen}");
            assert_eq!((mine >> 12) & 0x3ff, node_number("gw-1"));
        }
    }
}
