//! The loss / duplicate / order check. Every sender numbers its messages 0, 1, 2, …
//! (the number travels in the message body). For each stream (one sender, one
//! receiving connection) the checker knows which numbers were sent and acknowledged
//! (`send_ok`) and which arrived; at the end, every acknowledged message must have
//! arrived exactly once, and in the order sent. Sets are bitmaps: one bit per
//! message per stream.
//!
//! [`InboxSeq`] checks the server's own numbering on one connection: the `seq` of its
//! `msg` frames must go head+1, head+2, … with no gap and no repeat (PROTOCOL.md §4).

use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Clone)]
struct BitSet(Vec<u64>);

impl BitSet {
    /// Sets bit `i`; true if it was not set.
    fn insert(&mut self, i: u64) -> bool {
        let (w, b) = ((i / 64) as usize, i % 64);
        if w >= self.0.len() {
            self.0.resize(w + 1, 0);
        }
        let was = self.0[w] & (1 << b) != 0;
        self.0[w] |= 1 << b;
        !was
    }

    fn contains(&self, i: u64) -> bool {
        let (w, b) = ((i / 64) as usize, i % 64);
        self.0.get(w).is_some_and(|x| x & (1 << b) != 0)
    }

    /// Bits set here and not in `other`.
    fn count_missing_from(&self, other: &BitSet) -> u64 {
        self.0
            .iter()
            .enumerate()
            .map(|(i, w)| (w & !other.0.get(i).copied().unwrap_or(0)).count_ones() as u64)
            .sum()
    }
}

#[derive(Debug, Default, Clone)]
struct Stream {
    sent: BitSet,
    acked: BitSet,
    received: BitSet,
    max_received: Option<u64>,
    abandoned: bool,
}

/// What one receipt was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receipt {
    /// First arrival, in order.
    InOrder,
    /// First arrival, but after a higher number of the same stream.
    Reordered,
    /// Arrived before.
    Duplicate,
    /// Never sent.
    Unexpected,
}

/// Totals of a check; they add up across workers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckSummary {
    /// Messages acknowledged with `send_ok`.
    pub acked: u64,
    /// Distinct messages that arrived.
    pub received: u64,
    /// Acknowledged but never arrived.
    pub lost: u64,
    /// Arrivals of a message that had already arrived.
    pub duplicates: u64,
    /// First arrivals after a later message of the same sender.
    pub reordered: u64,
    /// Arrivals of a number that was never sent.
    pub unexpected: u64,
    /// Acknowledged, not arrived, and the receiving session ended before the end of
    /// the run (already counted as a dropped connection, so not a loss here).
    #[serde(default)]
    pub abandoned: u64,
}

impl CheckSummary {
    pub fn add(&mut self, o: &CheckSummary) {
        self.acked += o.acked;
        self.received += o.received;
        self.lost += o.lost;
        self.duplicates += o.duplicates;
        self.reordered += o.reordered;
        self.unexpected += o.unexpected;
        self.abandoned += o.abandoned;
    }

    /// Violations of "every acknowledged message arrived exactly once, in order".
    pub fn violations(&self) -> u64 {
        self.lost + self.duplicates + self.reordered + self.unexpected
    }
}

/// See the module doc. Streams are numbered densely by the caller.
#[derive(Debug, Clone)]
pub struct Checker {
    streams: Vec<Stream>,
    /// Whether a receipt must match a recorded send (false when the senders are in
    /// other processes: then only duplicates and order are checked here).
    check_sent: bool,
    acked: u64,
    received: u64,
    duplicates: u64,
    reordered: u64,
    unexpected: u64,
    /// Acknowledged and not (yet) arrived: what a drain waits for.
    outstanding: u64,
}

impl Checker {
    pub fn new(streams: usize) -> Checker {
        Checker {
            streams: vec![Stream::default(); streams],
            check_sent: true,
            acked: 0,
            received: 0,
            duplicates: 0,
            reordered: 0,
            unexpected: 0,
            outstanding: 0,
        }
    }

    /// A checker for receivers only: no sends or acks are recorded, a receipt is
    /// judged for duplicates and order.
    pub fn receive_only(streams: usize) -> Checker {
        Checker {
            check_sent: false,
            ..Checker::new(streams)
        }
    }

    /// The receiver of `stream` is gone: what it still lacks is not waited for, and is
    /// reported as abandoned rather than lost.
    pub fn abandon(&mut self, stream: usize) {
        let s = &mut self.streams[stream];
        if !s.abandoned {
            s.abandoned = true;
            self.outstanding -= s.acked.count_missing_from(&s.received);
        }
    }

    pub fn sent(&mut self, stream: usize, seq: u64) {
        self.streams[stream].sent.insert(seq);
    }

    pub fn acked(&mut self, stream: usize, seq: u64) {
        let s = &mut self.streams[stream];
        if s.acked.insert(seq) {
            self.acked += 1;
            if !s.received.contains(seq) && !s.abandoned {
                self.outstanding += 1;
            }
        }
    }

    pub fn received(&mut self, stream: usize, seq: u64) -> Receipt {
        let s = &mut self.streams[stream];
        if self.check_sent && !s.sent.contains(seq) {
            self.unexpected += 1;
            return Receipt::Unexpected;
        }
        if !s.received.insert(seq) {
            self.duplicates += 1;
            return Receipt::Duplicate;
        }
        self.received += 1;
        if s.acked.contains(seq) && !s.abandoned {
            self.outstanding -= 1;
        }
        let receipt = match s.max_received {
            Some(m) if seq < m => {
                self.reordered += 1;
                Receipt::Reordered
            }
            _ => Receipt::InOrder,
        };
        s.max_received = Some(s.max_received.map_or(seq, |m| m.max(seq)));
        receipt
    }

    /// Acknowledged messages that have not arrived yet.
    pub fn outstanding(&self) -> u64 {
        self.outstanding
    }

    pub fn summary(&self) -> CheckSummary {
        let missing = |abandoned: bool| -> u64 {
            self.streams
                .iter()
                .filter(|s| s.abandoned == abandoned)
                .map(|s| s.acked.count_missing_from(&s.received))
                .sum()
        };
        let lost = missing(false);
        debug_assert_eq!(
            lost, self.outstanding,
            "outstanding counts acked-not-received"
        );
        CheckSummary {
            abandoned: missing(true),
            acked: self.acked,
            received: self.received,
            lost,
            duplicates: self.duplicates,
            reordered: self.reordered,
            unexpected: self.unexpected,
        }
    }
}

/// The inbox `seq` of one connection's `msg` frames (see the module doc).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InboxSeq {
    next: u64,
}

/// Totals of inbox `seq` checks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqSummary {
    /// `seq` numbers skipped.
    pub gaps: u64,
    /// `msg` frames whose `seq` was not above the previous one.
    pub repeats: u64,
}

impl SeqSummary {
    pub fn add(&mut self, o: &SeqSummary) {
        self.gaps += o.gaps;
        self.repeats += o.repeats;
    }
}

impl InboxSeq {
    /// A session whose `auth_ok` said `head_seq`: live messages start at head+1.
    pub fn new(head_seq: u64) -> InboxSeq {
        InboxSeq { next: head_seq + 1 }
    }

    pub fn on_msg(&mut self, seq: u64, totals: &mut SeqSummary) {
        if seq == self.next {
            self.next += 1;
        } else if seq > self.next {
            totals.gaps += seq - self.next;
            self.next = seq + 1;
        } else {
            totals.repeats += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(events: &[(&str, u64)]) -> CheckSummary {
        let mut c = Checker::new(1);
        for &(what, seq) in events {
            match what {
                "sent" => c.sent(0, seq),
                "ack" => c.acked(0, seq),
                "recv" => {
                    c.received(0, seq);
                }
                _ => unreachable!(),
            }
        }
        c.summary()
    }

    fn sent_acked(n: u64) -> Vec<(&'static str, u64)> {
        (0..n).flat_map(|i| [("sent", i), ("ack", i)]).collect()
    }

    #[test]
    fn clean_stream_passes() {
        let mut ev = sent_acked(100);
        ev.extend((0..100).map(|i| ("recv", i)));
        let s = run(&ev);
        assert_eq!(s.violations(), 0, "{s:?}");
        assert_eq!((s.acked, s.received), (100, 100));
    }

    #[test]
    fn detects_a_loss() {
        let mut ev = sent_acked(100);
        ev.extend((0..100).filter(|&i| i != 37).map(|i| ("recv", i)));
        let s = run(&ev);
        assert_eq!(s.lost, 1, "{s:?}");
        assert_eq!(s.violations(), 1);
    }

    #[test]
    fn unacked_message_that_never_arrives_is_not_a_loss() {
        let mut ev = sent_acked(10);
        ev.push(("sent", 10)); // an error or a timeout: no send_ok
        ev.extend((0..10).map(|i| ("recv", i)));
        assert_eq!(run(&ev).violations(), 0);
    }

    #[test]
    fn detects_a_duplicate() {
        let mut ev = sent_acked(10);
        ev.extend((0..10).map(|i| ("recv", i)));
        ev.push(("recv", 4));
        let s = run(&ev);
        assert_eq!((s.duplicates, s.lost, s.reordered), (1, 0, 0), "{s:?}");
    }

    #[test]
    fn detects_a_reorder() {
        let mut ev = sent_acked(10);
        ev.extend([0, 1, 3, 2, 4, 5, 6, 7, 8, 9].map(|i| ("recv", i)));
        let s = run(&ev);
        assert_eq!((s.reordered, s.lost, s.duplicates), (1, 0, 0), "{s:?}");
    }

    #[test]
    fn detects_an_unexpected_message_and_tracks_outstanding() {
        let mut c = Checker::new(2);
        c.sent(0, 0);
        c.sent(1, 0);
        c.acked(0, 0);
        assert_eq!(c.outstanding(), 1);
        // Arrival before send_ok (another connection may be faster): still counted.
        assert_eq!(c.received(1, 0), Receipt::InOrder);
        c.acked(1, 0);
        assert_eq!(c.outstanding(), 1);
        assert_eq!(c.received(0, 0), Receipt::InOrder);
        assert_eq!(c.outstanding(), 0);
        assert_eq!(c.received(0, 5), Receipt::Unexpected);
        assert_eq!(c.summary().unexpected, 1);
    }

    #[test]
    fn abandoned_streams_are_not_losses_and_receive_only_checks_order() {
        let mut c = Checker::new(2);
        for s in 0..2 {
            for i in 0..5 {
                c.sent(s, i);
                c.acked(s, i);
            }
        }
        for i in 0..3 {
            c.received(1, i);
        }
        assert_eq!(c.outstanding(), 7);
        c.abandon(1);
        assert_eq!(c.outstanding(), 5);
        let s = c.summary();
        assert_eq!((s.lost, s.abandoned), (5, 2), "{s:?}");

        let mut r = Checker::receive_only(1);
        assert_eq!(r.received(0, 0), Receipt::InOrder);
        assert_eq!(r.received(0, 2), Receipt::InOrder);
        assert_eq!(r.received(0, 1), Receipt::Reordered);
        assert_eq!(r.received(0, 2), Receipt::Duplicate);
        let s = r.summary();
        assert_eq!(
            (s.received, s.reordered, s.duplicates, s.unexpected),
            (3, 1, 1, 0)
        );
    }

    #[test]
    fn inbox_seq_detects_gaps_and_repeats() {
        let mut t = SeqSummary::default();
        let mut s = InboxSeq::new(41);
        for seq in [42, 43, 44] {
            s.on_msg(seq, &mut t);
        }
        assert_eq!(t, SeqSummary::default());
        s.on_msg(47, &mut t); // 45 and 46 skipped
        s.on_msg(47, &mut t); // repeated
        s.on_msg(48, &mut t);
        assert_eq!(
            t,
            SeqSummary {
                gaps: 2,
                repeats: 1
            }
        );
    }
}
