//! Live deliveries, written connection by connection.
//!
//! A `Deliver` event lists its entries message by message: a group message has one
//! entry per member, and the next message of the batch the same members again.
//! Written in that order, every member's queue is visited once per message, and
//! each queue is sent only once the mailbox is empty, so between a queue's first
//! write and its `send` the shard has written every other member's queue: with a
//! thousand members and tens of messages a batch, megabytes, out of the cache by
//! the time the kernel reads them back.
//!
//! A [`DeliverRun`] gathers the `Deliver` events that wait in the mailbox one after
//! another, chains each connection's entries (in order, without sorting), and then
//! queues and sends one connection's entries at a time: its queue is written while
//! its state is in the cache, the kernel copies it while it still is, and the
//! emptied queue goes back to the pool for the next connection to reuse.

use std::cell::OnceCell;
use std::sync::Arc;

use flare_codec::frame::{Encoding, MsgParts, MsgTemplate};
use flare_pipeline::api::{Live, Message};

/// The end of a chain.
const END: u32 = u32::MAX;

/// A run of `Deliver` events, gathered to be written connection by connection.
#[derive(Default)]
pub struct DeliverRun {
    /// Every message of the run; an entry's `msg` indexes this.
    msgs: Vec<Arc<Message>>,
    /// Each message's `msg` frame per encoding (JSON, rkyv), made on first use.
    templates: Vec<[OnceCell<MsgTemplate>; 2]>,
    /// Every entry of the run, in the events' order.
    items: Vec<Live>,
    /// `next[i]`: the next entry after `items[i]` for the same connection slot, or
    /// [`END`].
    next: Vec<u32>,
    /// By connection slot (the slab index of the id): the last entry chained, or
    /// [`END`]. Kept between runs, all [`END`], so no run clears more than it used.
    last: Vec<u32>,
    /// The first entry of each slot's chain, in the order the slots first appear.
    firsts: Vec<u32>,
}

impl DeliverRun {
    /// Adds one `Deliver` event to the run.
    pub fn gather(&mut self, msgs: Vec<Arc<Message>>, items: Vec<Live>) {
        let base = self.msgs.len();
        if base == 0 && self.items.is_empty() {
            self.items = items;
        } else {
            self.items.extend(items.into_iter().map(|live| Live {
                msg: live.msg + base,
                ..live
            }));
        }
        self.templates
            .extend(std::iter::repeat_with(Default::default).take(msgs.len()));
        self.msgs.extend(msgs);
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Chains the entries by connection slot; [`firsts`](Self::firsts) then lists
    /// the chains, and [`chain`](Self::chain) walks one.
    pub fn chain_by_slot(&mut self) {
        assert!(
            self.items.len() < END as usize,
            "a run holds fewer than 2^32 entries (the mailbox is bounded)"
        );
        self.next.clear();
        self.next.resize(self.items.len(), END);
        self.firsts.clear();
        for (i, live) in self.items.iter().enumerate() {
            let slot = live.conn as u32 as usize;
            if self.last.len() <= slot {
                self.last.resize(slot + 1, END);
            }
            match self.last[slot] {
                END => self.firsts.push(i as u32),
                prev => self.next[prev as usize] = i as u32,
            }
            self.last[slot] = i as u32;
        }
        for &first in &self.firsts {
            let slot = self.items[first as usize].conn as u32 as usize;
            self.last[slot] = END;
        }
    }

    /// The first entry of each chain, in the order the slots first appear.
    pub fn firsts(&self) -> &[u32] {
        &self.firsts
    }

    /// The entries of the chain that starts at `first`, in order. A slot's chain can
    /// hold entries for an earlier connection in that slot: callers compare `conn`.
    pub fn chain(&self, first: u32) -> impl Iterator<Item = &Live> {
        let mut i = first;
        std::iter::from_fn(move || {
            let live = self.items.get(i as usize)?;
            i = self.next[i as usize];
            Some(live)
        })
    }

    /// Appends the WebSocket message of entry `live` in `enc` to `out`: the message's
    /// frame is encoded once per encoding, and each recipient's `seq` written into
    /// its copy (DESIGN.md §4).
    pub fn write_msg(&self, live: &Live, enc: Encoding, out: &mut Vec<u8>) {
        let msg = &self.msgs[live.msg];
        let i = match enc {
            Encoding::Json => 0,
            Encoding::Rkyv => 1,
        };
        self.templates[live.msg][i]
            .get_or_init(|| {
                let parts = MsgParts {
                    msg_id: msg.msg_id,
                    from: &msg.from,
                    from_device: &msg.from_device,
                    to: &msg.to,
                    body: &msg.body,
                    ts: msg.ts,
                };
                MsgTemplate::of(&parts, enc)
            })
            .write_ws_message(live.seq, out);
    }

    /// Ends the run: drops its messages and entries, keeps the buffers.
    pub fn clear(&mut self) {
        self.msgs.clear();
        self.templates.clear();
        self.items.clear();
        self.next.clear();
        self.firsts.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flare_codec::frame::Target;

    fn msg(id: u64) -> Arc<Message> {
        Arc::new(Message {
            msg_id: id,
            from: "alice".into(),
            from_device: "d".into(),
            to: Target::Group("g".into()),
            body: format!("body {id}"),
            ts: 1,
        })
    }

    fn live(conn: u64, seq: u64, msg: usize) -> Live {
        Live { conn, seq, msg }
    }

    fn chains(run: &mut DeliverRun) -> Vec<Vec<(u64, u64, u64)>> {
        run.chain_by_slot();
        run.firsts()
            .iter()
            .map(|&f| {
                run.chain(f)
                    .map(|l| (l.conn, l.seq, run.msgs[l.msg].msg_id))
                    .collect()
            })
            .collect()
    }

    #[test]
    fn entries_are_chained_by_connection_in_order_across_events() {
        let mut run = DeliverRun::default();
        // Two messages to connections 1 and 2, message-major, then one more event.
        run.gather(
            vec![msg(10), msg(11)],
            vec![live(1, 5, 0), live(2, 7, 0), live(1, 6, 1), live(2, 8, 1)],
        );
        run.gather(vec![msg(12)], vec![live(2, 9, 0), live(3, 1, 0)]);
        assert_eq!(
            chains(&mut run),
            vec![
                vec![(1, 5, 10), (1, 6, 11)],
                vec![(2, 7, 10), (2, 8, 11), (2, 9, 12)],
                vec![(3, 1, 12)],
            ]
        );
        run.clear();
        assert!(run.is_empty());
        // The next run starts from clean slots.
        run.gather(vec![msg(13)], vec![live(3, 2, 0), live(1, 7, 0)]);
        assert_eq!(chains(&mut run), vec![vec![(3, 2, 13)], vec![(1, 7, 13)]]);
    }

    #[test]
    fn a_slot_chain_keeps_an_earlier_connections_entries_for_the_caller_to_skip() {
        let old = 4u64; // slot 4, generation 0
        let new = (1u64 << 32) | 4; // slot 4, generation 1
        let mut run = DeliverRun::default();
        run.gather(vec![msg(1)], vec![live(old, 1, 0), live(new, 1, 0)]);
        assert_eq!(chains(&mut run), vec![vec![(old, 1, 1), (new, 1, 1)]]);
    }

    #[test]
    fn a_message_is_written_with_each_recipients_seq() {
        let mut run = DeliverRun::default();
        run.gather(vec![msg(1)], vec![live(1, 41, 0), live(2, 42, 0)]);
        let template = MsgTemplate::of(
            &MsgParts {
                msg_id: 1,
                from: "alice",
                from_device: "d",
                to: &Target::Group("g".into()),
                body: "body 1",
                ts: 1,
            },
            Encoding::Rkyv,
        );
        for (i, seq) in [(0, 41), (1, 42)] {
            let mut out = Vec::new();
            run.write_msg(&run.items[i], Encoding::Rkyv, &mut out);
            assert_eq!(out, template.ws_message(seq));
        }
    }
}
