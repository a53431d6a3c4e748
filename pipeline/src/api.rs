//! What the gateway and the pipeline say to each other.
//!
//! Every gateway endpoint (each shard, and the admin server) has one mailbox queue
//! to the pipeline for [`Request`]s and one mailbox from it for [`Event`]s. Each
//! queue is FIFO, so an endpoint sees events in the order the pipeline made them:
//! a session's catch-up page always arrives before live entries that follow it.

use std::sync::Arc;

use flare_codec::frame::{ErrorCode, Target};

/// Which gateway endpoint: shard index `0..shards`, the admin server is `shards`.
pub type Endpoint = u16;

/// One connection somewhere in this node: its endpoint and the endpoint's
/// generation-checked connection id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnRef {
    pub endpoint: Endpoint,
    pub conn: u64,
}

/// A message as accepted and made durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub msg_id: u64,
    pub ts: u64,
    /// The sender's id: the node's one copy of it (`State::user`), shared by every
    /// message the user sends, not an allocation per message.
    pub from: Arc<str>,
    /// The sending device's id, shared the same way (the engine interns device ids).
    pub from_device: Arc<str>,
    pub to: Target,
    pub body: String,
}

/// One inbox entry: a message at a position of one user's inbox.
#[derive(Debug, Clone)]
pub struct Entry {
    pub seq: u64,
    pub msg: Arc<Message>,
}

/// Who a session is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionIds {
    pub user: String,
    pub device: String,
}

/// Requests from gateway endpoints. User, device, group and client ids are already
/// validated by the gateway (PROTOCOL.md §2); bodies are within `max_body_bytes`.
#[derive(Debug)]
pub enum Request {
    /// A session authenticated. `last_seq` is `auth.last_seq`.
    Open {
        conn: ConnRef,
        user: String,
        device: String,
        last_seq: Option<u64>,
    },
    /// The connection wrote the previous catch-up page; send the next after `after`.
    CatchUp { conn: ConnRef, after: u64 },
    /// The connection is gone (closed, replaced, kicked, timed out).
    Closed { conn: ConnRef },
    /// A client `send`.
    Send {
        conn: ConnRef,
        id: String,
        to: Target,
        body: String,
    },
    /// A client `ack` (cumulative).
    Ack { conn: ConnRef, seq: u64 },
    /// A client `sync` page request; `limit` is already in 1..=1000.
    Sync {
        conn: ConnRef,
        after: u64,
        limit: u32,
    },
    /// An admin API call; the answer comes back as `Event::Admin` with the same `token`.
    Admin { token: u64, op: AdminOp },
}

/// Admin API operations (PROTOCOL.md §8).
#[derive(Debug)]
pub enum AdminOp {
    /// `id: None` means the caller gave none: the message is not deduplicated.
    PostMessage {
        from: String,
        to: Target,
        body: String,
        id: Option<String>,
    },
    PutGroup {
        group: String,
        members: Vec<String>,
    },
    ModifyGroup {
        group: String,
        add: Vec<String>,
        remove: Vec<String>,
    },
    GetGroup {
        group: String,
    },
    PutBlocked {
        user: String,
        users: Vec<String>,
    },
    Presence {
        user: String,
    },
    Kick {
        user: String,
        device: Option<String>,
    },
    /// Counters for `/metrics` and whether the log is healthy, for `/readyz`.
    Stats,
}

/// Events for one gateway endpoint.
/// One entry of an [`Event::Deliver`] for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Live {
    pub conn: u64,
    pub seq: u64,
    /// Index of the message in the event's `msgs`.
    pub msg: usize,
}

#[derive(Debug)]
pub enum Event {
    /// Answer to `Open`: the session is registered. `entries` is the first catch-up
    /// page (`seq > after`, ascending). While `caught_up` is false the pipeline holds
    /// back live entries for this connection; the gateway writes the page and asks
    /// for the next with `CatchUp`. Once a page comes with `caught_up: true`, live
    /// entries follow as `Deliver`.
    Opened {
        conn: ConnRef,
        /// The session's user and device, for `auth_ok`: the gateway keeps neither.
        /// Boxed, so that this event is no larger than the others.
        ids: Box<SessionIds>,
        head_seq: u64,
        entries: Vec<Entry>,
        caught_up: bool,
    },
    /// Answer to `CatchUp`.
    CatchUpPage {
        conn: ConnRef,
        entries: Vec<Entry>,
        caught_up: bool,
    },
    /// Live inbox entries for connections of this endpoint, in commit order. A
    /// message is in `msgs` once however many of the endpoint's connections get it:
    /// one reference count change per event, not one per recipient (that count's
    /// cache line is the pipeline thread's too).
    Deliver {
        msgs: Vec<Arc<Message>>,
        items: Vec<Live>,
    },
    /// Answer to `Send` once the message is durable (or a duplicate).
    SendOk {
        conn: ConnRef,
        id: String,
        msg_id: u64,
        ts: u64,
        dup: bool,
    },
    /// `Send` refused: `Forbidden`, `Unavailable` or `Internal`.
    SendFailed {
        conn: ConnRef,
        id: String,
        code: ErrorCode,
        message: String,
    },
    /// Answer to `Sync`: the page, then the `sync_done` fields.
    SyncPage {
        conn: ConnRef,
        entries: Vec<Entry>,
        after: u64,
        last: u64,
        more: bool,
        truncated: bool,
    },
    /// A newer session of the same user and device opened: goaway `replaced`, close 4003.
    Replaced { conn: u64 },
    /// Kicked by the admin API: goaway `kicked`, close 4003.
    Kicked { conn: u64 },
    /// Answer to an admin call.
    Admin { token: u64, reply: AdminReply },
}

/// Answers to [`AdminOp`]s.
#[derive(Debug)]
pub enum AdminReply {
    Posted {
        msg_id: u64,
        ts: u64,
        dup: bool,
    },
    /// A refused admin post: `Forbidden` (not a member, blocked), `Unavailable`.
    Refused {
        code: ErrorCode,
        message: String,
    },
    Done,
    Group {
        group: String,
        members: Option<Vec<String>>,
    },
    Presence {
        user: String,
        devices: Vec<DevicePresence>,
    },
    Stats(Stats),
}

/// One online device of a user.
#[derive(Debug, Clone)]
pub struct DevicePresence {
    pub device: String,
    pub node: String,
    /// Session start, ms since the Unix epoch.
    pub since: u64,
}

/// Pipeline counters.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub messages_accepted: u64,
    pub messages_dup: u64,
    pub log_commits: u64,
    pub log_bytes: u64,
    pub log_healthy: bool,
    pub sessions: u64,
    pub users: u64,
    pub inbox_entries: u64,
    /// Entries in the dedup table.
    pub dedup_entries: u64,
    /// Dedup entries forgotten before their window ended (the table was full).
    pub dedup_evicted: u64,
    /// How long the log's flushes took.
    pub log_flush: FlushTimes,
}

/// Upper bounds, in µs, of the buckets of [`FlushTimes`]; one more bucket holds
/// everything longer.
pub const FLUSH_BUCKETS_US: [u64; 12] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];

/// A histogram of flush times: a flush (one write and `fdatasync` of a group commit)
/// is what every acknowledged message waits for, so its tail is the disk's share of
/// the latency tail.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlushTimes {
    /// Flushes per bucket (not cumulative): `counts[i]` took at most
    /// `FLUSH_BUCKETS_US[i]` and more than the bound before; the last took longer
    /// than every bound.
    pub counts: [u64; FLUSH_BUCKETS_US.len() + 1],
    /// Sum of all flush times, µs.
    pub sum_us: u64,
}

impl FlushTimes {
    pub fn record(&mut self, us: u64) {
        let bucket = FLUSH_BUCKETS_US.partition_point(|&bound| bound < us);
        self.counts[bucket] += 1;
        self.sum_us = self.sum_us.saturating_add(us);
    }

    /// Flushes recorded.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flush_time_lands_in_the_first_bucket_that_holds_it() {
        let mut t = FlushTimes::default();
        for us in [
            0,
            100,
            101,
            999,
            1_000,
            1_001,
            1_000_000,
            1_000_001,
            u64::MAX / 2,
        ] {
            t.record(us);
        }
        let mut want = [0u64; FLUSH_BUCKETS_US.len() + 1];
        want[0] = 2; // 0 and 100: a bound is inclusive
        want[1] = 1; // 101
        want[3] = 2; // 999 and 1000
        want[4] = 1; // 1001
        want[11] = 1; // 1 s
        want[12] = 2; // longer than every bound
        assert_eq!(t.counts, want);
        assert_eq!(t.count(), 9);
        assert_eq!(
            t.sum_us,
            100 + 101 + 999 + 1_000 + 1_001 + 1_000_000 + 1_000_001 + u64::MAX / 2
        );
        // The sum stops at its largest value rather than wrapping.
        t.record(u64::MAX);
        assert_eq!(t.sum_us, u64::MAX);
        assert_eq!(t.counts[12], 3);
    }
}
