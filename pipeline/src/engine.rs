//! The pipeline's decisions, sans-IO: requests and `now` in, log records and events out.
//!
//! [`Engine::handle`] validates a request, runs the pre-send hooks and dedup, gives a
//! message its `msg_id`, and appends [`Record`]s to the pending batch. The driver
//! [`seal`](Engine::seal)s the batch, makes it durable, and calls
//! [`commit_done`](Engine::commit_done) (or [`commit_failed`](Engine::commit_failed)).
//! Only then are the records applied to the [`State`]: inbox `seq`s are assigned at
//! apply time, in log order, so [`replay`](Engine::replay) at start assigns exactly
//! the same ones. Answers that promise durability (`SendOk`, admin `Posted`/`Done`
//! for writes) and live `Deliver`s of the new entries go out at commit; read-only
//! answers go out at once.
//!
//! Decisions taken before a batch is durable see the effect of the uncommitted
//! batches where it matters: dedup (a message enters the dedup table when accepted,
//! with its batch id, so a resend in the same batch is answered with the original ids
//! after the commit) and group/block changes (kept in an overlay until their batch
//! commits). If a batch fails, everything uncommitted fails with it: later batches
//! were decided on top of it, and their dedup entries are forgotten.
//!
//! Ack cursors are the exception: they are applied at once and logged, because a
//! cursor only ever moves forward and nothing waits for it to be durable.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use flare_codec::frame::{ErrorCode, Target};

use crate::api::{
    AdminOp, AdminReply, ConnRef, DevicePresence, Endpoint, Event, Live, Message, Request,
    SessionIds, Stats,
};
use crate::config::PipelineConfig;
use crate::dedup::{Accepted, DedupKey};
use crate::ids::MsgIds;
use crate::intern::{DeviceId, Interner};
use crate::record::{Record, MAX_RECORD_BYTES};
use crate::sharded::ShardedMap;
use crate::state::{MemState, Page, State, UserId};

/// Live entries of a commit by endpoint (the index).
type Routed = Vec<Routes>;

/// The `Deliver` of one endpoint, being built.
#[derive(Default)]
struct Routes {
    msgs: Vec<Arc<Message>>,
    items: Vec<Live>,
}

/// What one entry costs on the wire beyond its body, for page budgets.
const PAGE_ENTRY_OVERHEAD_BYTES: usize = 256;

/// `from_device` of messages posted through the admin API.
pub const ADMIN_DEVICE: &str = "admin";

/// One open session. Small, because every online device has one (DESIGN.md §6): the
/// user id is the state's shared copy and the device id is interned.
struct Session {
    user: Arc<str>,
    device: DeviceId,
    /// Session start, ms since the Unix epoch.
    since: u64,
}

/// One of a user's open sessions, as [`Online`] lists it: a group message routes to
/// every member's sessions from here, with no lookup of the session itself.
#[derive(Debug, Clone, Copy)]
struct OnlineConn {
    conn: u64,
    endpoint: Endpoint,
    /// Caught up: new entries go out as `Deliver`; before that, catch-up pages carry them.
    live: bool,
}

impl OnlineConn {
    fn conn_ref(&self) -> ConnRef {
        ConnRef {
            endpoint: self.endpoint,
            conn: self.conn,
        }
    }
}

/// A user's open sessions, one per device. One is the common case and needs no
/// allocation.
enum Online {
    One(OnlineConn),
    Many(Vec<OnlineConn>),
}

impl Online {
    fn conns(&self) -> &[OnlineConn] {
        match self {
            Online::One(c) => std::slice::from_ref(c),
            Online::Many(all) => all,
        }
    }

    fn get(&self, conn: ConnRef) -> Option<&OnlineConn> {
        self.conns().iter().find(|c| c.conn_ref() == conn)
    }

    fn get_mut(&mut self, conn: ConnRef) -> Option<&mut OnlineConn> {
        let all = match self {
            Online::One(c) => std::slice::from_mut(c),
            Online::Many(all) => all,
        };
        all.iter_mut().find(|c| c.conn_ref() == conn)
    }

    fn push(&mut self, conn: OnlineConn) {
        match self {
            Online::One(c) => *self = Online::Many(vec![*c, conn]),
            Online::Many(all) => all.push(conn),
        }
    }

    /// Removes `conn`; returns whether no session is left.
    fn remove(&mut self, conn: ConnRef) -> bool {
        match self {
            Online::One(c) => c.conn_ref() == conn,
            Online::Many(all) => {
                all.retain(|c| c.conn_ref() != conn);
                match all[..] {
                    [] => true,
                    [one] => {
                        *self = Online::One(one);
                        false
                    }
                    _ => false,
                }
            }
        }
    }
}

/// An answer that waits for its batch to be durable.
enum Held {
    SendOk {
        conn: ConnRef,
        id: String,
        msg_id: u64,
        ts: u64,
        dup: bool,
    },
    Posted {
        token: u64,
        msg_id: u64,
        ts: u64,
        dup: bool,
    },
    Done {
        token: u64,
    },
}

struct Batch {
    id: u64,
    records: Vec<Record>,
    held: Vec<Held>,
    /// The dedup entries of its messages, to forget if it fails.
    dedup_keys: Vec<DedupKey>,
    bytes: usize,
}

impl Batch {
    fn new(id: u64) -> Self {
        Self {
            id,
            records: Vec::new(),
            held: Vec::new(),
            dedup_keys: Vec::new(),
            bytes: 0,
        }
    }

    /// An empty batch `id` in `self`'s vectors. The next batch is likely as large as
    /// the last, and growing fresh vectors to that size took a chain of reallocations
    /// per commit.
    fn reuse(mut self, id: u64) -> Self {
        self.id = id;
        self.records.clear();
        self.held.clear();
        self.dedup_keys.clear();
        self.bytes = 0;
        self
    }
}

/// The batch id of dedup entries rebuilt from the log: below every live batch's.
const REPLAYED_BATCH: u64 = 0;

/// Who asked for a message to be sent, to answer them.
enum Origin {
    Conn { conn: ConnRef, id: String },
    Admin { token: u64 },
}

impl Origin {
    fn held(self, msg_id: u64, ts: u64, dup: bool) -> Held {
        match self {
            Origin::Conn { conn, id } => Held::SendOk {
                conn,
                id,
                msg_id,
                ts,
                dup,
            },
            Origin::Admin { token } => Held::Posted {
                token,
                msg_id,
                ts,
                dup,
            },
        }
    }
}

/// The pipeline of one node as a state machine.
pub struct Engine<S: State = MemState> {
    node_id: String,
    retention_ms: u64,
    dedup_window_ms: u64,
    catchup_page: usize,
    page_bytes_max: usize,
    /// Where answers to admin requests go.
    admin: Endpoint,
    state: S,
    ids: MsgIds,
    sessions: ShardedMap<ConnRef, Session>,
    /// Open sessions per user, one per device; keyed by the identity of the state's
    /// copy of the user id, which every session of the user holds.
    online: ShardedMap<UserId, Online>,
    /// Device ids of sessions.
    devices: Interner,
    pending: Batch,
    inflight: Option<Batch>,
    /// The last committed batch, emptied, for [`Batch::reuse`].
    spare: Option<Batch>,
    /// Live entries of the commit being applied, by endpoint. Each endpoint's vectors
    /// leave in its `Deliver`; the next ones are made with the sizes of the last.
    routed: Routed,
    /// Batches with a lower id are durable.
    durable_below: u64,
    /// Group member lists as uncommitted batches leave them, with the batch id.
    pending_groups: HashMap<String, (BTreeSet<String>, u64)>,
    /// Block lists as uncommitted batches leave them, with the batch id.
    pending_blocked: HashMap<String, (HashSet<String>, u64)>,
    outputs: VecDeque<(Endpoint, Event)>,
    stats: Stats,
    /// The dedup table's evictions at the last warning that it is full, and when.
    dedup_warned: (u64, u64),
}

/// How often, at most, the engine warns that the dedup table is full.
pub const DEDUP_FULL_WARN_EVERY_MS: u64 = 60_000;

impl Engine<MemState> {
    /// An engine on empty in-memory state; admin answers go to endpoint `admin`.
    pub fn new(cfg: &PipelineConfig, admin: Endpoint) -> Self {
        let state =
            MemState::new(cfg.retention_messages).with_dedup_max_entries(cfg.dedup_max_entries);
        Self::with_state(cfg, admin, state)
    }
}

impl<S: State> Engine<S> {
    /// An engine over `state`.
    pub fn with_state(cfg: &PipelineConfig, admin: Endpoint, state: S) -> Self {
        assert!(
            cfg.retention_messages > 0,
            "an inbox keeps at least one entry"
        );
        assert!(
            cfg.catchup_page > 0,
            "a catch-up page holds at least one entry"
        );
        Self {
            node_id: cfg.node_id.clone(),
            retention_ms: cfg.retention_ms,
            dedup_window_ms: cfg.dedup_window_ms,
            catchup_page: cfg.catchup_page,
            page_bytes_max: cfg.page_bytes_max,
            admin,
            state,
            ids: MsgIds::new(&cfg.node_id),
            sessions: ShardedMap::default(),
            online: ShardedMap::default(),
            devices: Interner::default(),
            pending: Batch::new(REPLAYED_BATCH + 1),
            inflight: None,
            spare: None,
            routed: Routed::new(),
            durable_below: REPLAYED_BATCH + 1,
            pending_groups: HashMap::new(),
            pending_blocked: HashMap::new(),
            outputs: VecDeque::new(),
            stats: Stats {
                log_healthy: true,
                ..Stats::default()
            },
            dedup_warned: (0, 0),
        }
    }

    /// The state, for inspection.
    pub fn state(&self) -> &S {
        &self.state
    }

    /// Applies one record read back from the log at start, as a commit would, but
    /// answers nobody.
    pub fn replay(&mut self, rec: Record, now_ms: u64) {
        assert!(
            self.inflight.is_none() && self.pending.records.is_empty(),
            "replay happens before any request"
        );
        self.apply(rec, now_ms, None);
    }

    /// Takes one request. Its answers are in [`take_outputs`](Self::take_outputs),
    /// now or after the commit of the batch it joined.
    pub fn handle(&mut self, req: Request, now_ms: u64) {
        self.state
            .expire_dedup(now_ms.saturating_sub(self.dedup_window_ms));
        match req {
            Request::Open {
                conn,
                user,
                device,
                last_seq,
            } => self.open(conn, user, device, last_seq, now_ms),
            Request::CatchUp { conn, after } => self.catch_up(conn, after, now_ms),
            Request::Closed { conn } => {
                self.remove_session(conn);
            }
            Request::Send { conn, id, to, body } => match self.sessions.get(&conn) {
                Some(s) => {
                    let (user, device) = (s.user.clone(), self.devices.name(s.device).clone());
                    let dedup_id = Some(id.clone());
                    self.submit(
                        Origin::Conn { conn, id },
                        user,
                        device,
                        to,
                        body,
                        dedup_id,
                        now_ms,
                    );
                }
                None => self.outputs.push_back((
                    conn.endpoint,
                    Event::SendFailed {
                        conn,
                        id,
                        code: ErrorCode::Unavailable,
                        message: "the session is not open".into(),
                    },
                )),
            },
            Request::Ack { conn, seq } => self.ack(conn, seq),
            Request::Sync { conn, after, limit } => self.sync(conn, after, limit, now_ms),
            Request::Admin { token, op } => self.admin(token, op, now_ms),
        }
    }

    /// Moves the pending batch in flight and returns its records for the log, or
    /// `None` when there is nothing to write. One batch is in flight at a time.
    pub fn seal(&mut self) -> Option<&[Record]> {
        assert!(self.inflight.is_none(), "one batch in flight at a time");
        if self.pending.records.is_empty() {
            debug_assert!(
                self.pending.held.is_empty(),
                "held answers belong to batches with records"
            );
            return None;
        }
        let id = self.pending.id + 1;
        let next = match self.spare.take() {
            Some(spare) => spare.reuse(id),
            None => Batch::new(id),
        };
        let batch = std::mem::replace(&mut self.pending, next);
        Some(&self.inflight.insert(batch).records)
    }

    /// Whether a batch is in flight or records are pending.
    pub fn has_uncommitted(&self) -> bool {
        self.inflight.is_some() || !self.pending.records.is_empty()
    }

    /// Encoded bytes of the pending (not yet sealed) records.
    pub fn pending_bytes(&self) -> usize {
        self.pending.bytes
    }

    /// The sealed batch is durable: apply it, answer, deliver.
    pub fn commit_done(&mut self, now_ms: u64) {
        let mut batch = self
            .inflight
            .take()
            .expect("commit_done needs a sealed batch");
        let mut deliveries = std::mem::take(&mut self.routed);
        for rec in batch.records.drain(..) {
            self.apply(rec, now_ms, Some(&mut deliveries));
        }
        for held in batch.held.drain(..) {
            let out = self.answer(held);
            self.outputs.push_back(out);
        }
        for (endpoint, routes) in deliveries.iter_mut().enumerate() {
            if !routes.items.is_empty() {
                let next = Routes {
                    msgs: Vec::with_capacity(routes.msgs.len()),
                    items: Vec::with_capacity(routes.items.len()),
                };
                let Routes { msgs, items } = std::mem::replace(routes, next);
                self.outputs
                    .push_back((endpoint as Endpoint, Event::Deliver { msgs, items }));
            }
        }
        self.routed = deliveries;
        let id = batch.id;
        self.spare = Some(batch);
        self.durable_below = id + 1;
        self.pending_groups.retain(|_, v| v.1 > id);
        self.pending_blocked.retain(|_, v| v.1 > id);
        self.stats.log_commits += 1;
        self.stats.log_healthy = true;
    }

    /// The sealed batch could not be made durable: it and everything pending
    /// behind it fail with `Unavailable`, and none of it is applied.
    pub fn commit_failed(&mut self, reason: &str) {
        let next = Batch::new(self.pending.id + 1);
        let pending = std::mem::replace(&mut self.pending, next);
        for batch in self.inflight.take().into_iter().chain([pending]) {
            for key in batch.dedup_keys {
                self.state.forget_dedup(key, batch.id);
            }
            for held in batch.held {
                let message = format!("the message could not be made durable: {reason}");
                let out = match held {
                    Held::SendOk { conn, id, .. } => (
                        conn.endpoint,
                        Event::SendFailed {
                            conn,
                            id,
                            code: ErrorCode::Unavailable,
                            message,
                        },
                    ),
                    Held::Posted { token, .. } | Held::Done { token } => (
                        self.admin,
                        Event::Admin {
                            token,
                            reply: AdminReply::Refused {
                                code: ErrorCode::Unavailable,
                                message,
                            },
                        },
                    ),
                };
                self.outputs.push_back(out);
            }
        }
        self.pending_groups.clear();
        self.pending_blocked.clear();
        self.stats.log_healthy = false;
    }

    /// Tells the engine how long a flush took (whether or not it succeeded), for `Stats`.
    pub fn record_flush(&mut self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.stats.log_flush.record(us);
    }

    /// Tells the engine how many bytes the log holds, for `Stats`.
    pub fn set_log_bytes(&mut self, bytes: u64) {
        self.stats.log_bytes = bytes;
    }

    /// Events to push to the endpoints, in order.
    pub fn take_outputs(&mut self) -> impl Iterator<Item = (Endpoint, Event)> + '_ {
        self.outputs.drain(..)
    }

    fn open(
        &mut self,
        conn: ConnRef,
        user: String,
        device: String,
        last_seq: Option<u64>,
        now_ms: u64,
    ) {
        let key = self.state.user(&user);
        let id = UserId::of(&key);
        let device_id = self.devices.intern(&device);
        let sessions = &self.sessions;
        let older = self.online.get(&id).and_then(|online| {
            online
                .conns()
                .iter()
                .map(OnlineConn::conn_ref)
                .find(|c| sessions[c].device == device_id)
        });
        if let Some(old) = older {
            self.remove_session(old);
            if old != conn {
                self.outputs
                    .push_back((old.endpoint, Event::Replaced { conn: old.conn }));
            }
        }
        // A connection id opened twice (for another user or device) keeps only the newest.
        self.remove_session(conn);
        self.expire_inbox(&user, now_ms);
        let head = self.state.head(&user);
        let after = match last_seq.or_else(|| self.state.cursor(&user, &device)) {
            Some(after) => after.min(head),
            None => {
                // First time we see this device: it starts at the head, and is "seen".
                self.log_cursor(&user, &device, head);
                head
            }
        };
        let page = self.bounded(self.state.page(&user, after, self.catchup_page));
        let caught_up = !page.more;
        let listed = OnlineConn {
            conn: conn.conn,
            endpoint: conn.endpoint,
            live: caught_up,
        };
        match self.online.get_mut(&id) {
            Some(online) => online.push(listed),
            None => {
                self.online.insert(id, Online::One(listed));
            }
        }
        self.sessions.insert(
            conn,
            Session {
                user: key,
                device: device_id,
                since: now_ms,
            },
        );
        self.outputs.push_back((
            conn.endpoint,
            Event::Opened {
                conn,
                ids: Box::new(SessionIds { user, device }),
                head_seq: head,
                entries: page.entries,
                caught_up,
            },
        ));
    }

    fn catch_up(&mut self, conn: ConnRef, after: u64, now_ms: u64) {
        let Some(session) = self.sessions.get(&conn) else {
            return;
        };
        let live = self
            .online
            .get(&UserId::of(&session.user))
            .and_then(|online| online.get(conn))
            .is_some_and(|c| c.live);
        if live {
            // Already live: anything after its last page came as `Deliver`.
            self.outputs.push_back((
                conn.endpoint,
                Event::CatchUpPage {
                    conn,
                    entries: Vec::new(),
                    caught_up: true,
                },
            ));
            return;
        }
        let user = session.user.clone();
        self.expire_inbox(&user, now_ms);
        let after = after.min(self.state.head(&user));
        let page = self.bounded(self.state.page(&user, after, self.catchup_page));
        let caught_up = !page.more;
        if caught_up {
            let id = UserId::of(&user);
            if let Some(listed) = self.online.get_mut(&id).and_then(|o| o.get_mut(conn)) {
                listed.live = true;
            }
        }
        self.outputs.push_back((
            conn.endpoint,
            Event::CatchUpPage {
                conn,
                entries: page.entries,
                caught_up,
            },
        ));
    }

    /// Cuts a page at `page_bytes_max` bytes of bodies (keeping at least one entry),
    /// so one page never overflows a connection's outbound queue.
    fn bounded(&self, mut page: Page) -> Page {
        let mut bytes = 0usize;
        let keep = page
            .entries
            .iter()
            .position(|e| {
                bytes += e.msg.body.len() + PAGE_ENTRY_OVERHEAD_BYTES;
                bytes > self.page_bytes_max
            })
            .map_or(page.entries.len(), |i| i.max(1));
        if keep < page.entries.len() {
            page.entries.truncate(keep);
            page.more = true;
        }
        page
    }

    fn ack(&mut self, conn: ConnRef, seq: u64) {
        let Some(session) = self.sessions.get(&conn) else {
            return;
        };
        let (user, device) = (
            session.user.clone(),
            self.devices.name(session.device).clone(),
        );
        let seq = seq.min(self.state.head(&user));
        if self.state.cursor(&user, &device).is_none_or(|c| seq > c) {
            self.log_cursor(&user, &device, seq);
        }
    }

    fn sync(&mut self, conn: ConnRef, after: u64, limit: u32, now_ms: u64) {
        let Some(session) = self.sessions.get(&conn) else {
            return;
        };
        let user = session.user.clone();
        self.expire_inbox(&user, now_ms);
        let truncated = after.saturating_add(1) < self.state.first_seq(&user);
        let page = self.bounded(self.state.page(&user, after, limit as usize));
        let last = page.entries.last().map_or(after, |e| e.seq);
        self.outputs.push_back((
            conn.endpoint,
            Event::SyncPage {
                conn,
                entries: page.entries,
                after,
                last,
                more: page.more,
                truncated,
            },
        ));
    }

    fn admin(&mut self, token: u64, op: AdminOp, now_ms: u64) {
        let reply = match op {
            AdminOp::PostMessage { from, to, body, id } => {
                let from = self.state.known_user(&from).unwrap_or_else(|| from.into());
                let admin_device = self.devices.intern(ADMIN_DEVICE);
                let from_device = self.devices.name(admin_device).clone();
                self.submit(
                    Origin::Admin { token },
                    from,
                    from_device,
                    to,
                    body,
                    id,
                    now_ms,
                );
                return;
            }
            AdminOp::PutGroup { group, members } => {
                let set: BTreeSet<String> = members.iter().cloned().collect();
                let rec = Record::PutGroup {
                    group: group.clone(),
                    members,
                };
                if self.log_admin(token, rec) {
                    self.pending_groups.insert(group, (set, self.pending.id));
                }
                return;
            }
            AdminOp::ModifyGroup { group, add, remove } => {
                let mut set = self.group_view(&group).cloned().unwrap_or_default();
                set.extend(add.iter().cloned());
                for u in &remove {
                    set.remove(u);
                }
                let rec = Record::ModifyGroup {
                    group: group.clone(),
                    add,
                    remove,
                };
                if self.log_admin(token, rec) {
                    self.pending_groups.insert(group, (set, self.pending.id));
                }
                return;
            }
            AdminOp::PutBlocked { user, users } => {
                let set: HashSet<String> = users.iter().cloned().collect();
                let rec = Record::PutBlocked {
                    user: user.clone(),
                    users,
                };
                if self.log_admin(token, rec) {
                    self.pending_blocked.insert(user, (set, self.pending.id));
                }
                return;
            }
            AdminOp::GetGroup { group } => AdminReply::Group {
                members: self
                    .state
                    .group(&group)
                    .map(|m| m.iter().cloned().collect()),
                group,
            },
            AdminOp::Presence { user } => {
                let devices = self
                    .online_conns(&user)
                    .iter()
                    .map(|c| {
                        let s = &self.sessions[&c.conn_ref()];
                        DevicePresence {
                            device: self.devices.name(s.device).to_string(),
                            node: self.node_id.clone(),
                            since: s.since,
                        }
                    })
                    .collect();
                AdminReply::Presence { user, devices }
            }
            AdminOp::Kick { user, device } => {
                let kicked: Vec<ConnRef> = self
                    .online_conns(&user)
                    .iter()
                    .map(OnlineConn::conn_ref)
                    .filter(|c| {
                        device
                            .as_deref()
                            .is_none_or(|d| **self.devices.name(self.sessions[c].device) == *d)
                    })
                    .collect();
                for conn in kicked {
                    self.remove_session(conn);
                    self.outputs
                        .push_back((conn.endpoint, Event::Kicked { conn: conn.conn }));
                }
                AdminReply::Done
            }
            AdminOp::Stats => {
                let dedup = self.state.dedup_stats();
                AdminReply::Stats(Stats {
                    sessions: self.sessions.len() as u64,
                    users: self.state.users(),
                    inbox_entries: self.state.inbox_entries(),
                    dedup_entries: dedup.entries,
                    dedup_evicted: dedup.evicted,
                    ..self.stats.clone()
                })
            }
        };
        self.outputs
            .push_back((self.admin, Event::Admin { token, reply }));
    }

    /// Pre-send hooks, dedup, `msg_id`, then the record.
    #[allow(clippy::too_many_arguments)] // one call per origin; a struct would only rename them
    fn submit(
        &mut self,
        origin: Origin,
        from: Arc<str>,
        from_device: Arc<str>,
        to: Target,
        body: String,
        dedup_id: Option<String>,
        now_ms: u64,
    ) {
        let dedup_key = dedup_id.as_ref().map(|id| self.state.dedup_key(&from, id));
        if let Some(key) = dedup_key {
            let min_ts = now_ms.saturating_sub(self.dedup_window_ms);
            if let Some(original) = self.state.dedup(key, min_ts) {
                self.stats.messages_dup += 1;
                let held = origin.held(original.msg_id, original.ts, true);
                if original.batch < self.durable_below {
                    let out = self.answer(held);
                    self.outputs.push_back(out);
                    return;
                }
                // The original is not durable yet: answer when its batch is.
                match &mut self.inflight {
                    Some(b) if b.id == original.batch => b.held.push(held),
                    _ => {
                        assert_eq!(
                            self.pending.id, original.batch,
                            "uncommitted dedup entries name a live batch"
                        );
                        self.pending.held.push(held);
                    }
                }
                return;
            }
        }
        let trusted = matches!(origin, Origin::Admin { .. });
        if let Err(why) = self.pre_send_hooks(&from, &to, trusted) {
            self.refuse(origin, ErrorCode::Forbidden, why);
            return;
        }
        let msg_id = self.ids.next(now_ms);
        let rec = Record::Message {
            msg: Arc::new(Message {
                msg_id,
                ts: now_ms,
                from,
                from_device,
                to,
                body,
            }),
            dedup_id,
        };
        if rec.encoded_len() > MAX_RECORD_BYTES {
            self.refuse(origin, ErrorCode::TooLarge, "the message is too large");
            return;
        }
        if let Some(key) = dedup_key {
            let accepted = Accepted {
                msg_id,
                ts: now_ms,
                batch: self.pending.id,
            };
            self.put_dedup(key, accepted, now_ms);
            self.pending.dedup_keys.push(key);
        }
        self.pending.held.push(origin.held(msg_id, now_ms, false));
        self.push_record(rec);
    }

    /// Enters `key` in the dedup table, and warns (at most once per
    /// [`DEDUP_FULL_WARN_EVERY_MS`]) when the table is full and forgets entries that
    /// are still inside the window.
    fn put_dedup(&mut self, key: DedupKey, accepted: Accepted, now_ms: u64) {
        let (warned_evicted, warned_at) = self.dedup_warned;
        if !self.state.put_dedup(key, accepted)
            || now_ms.saturating_sub(warned_at) < DEDUP_FULL_WARN_EVERY_MS
        {
            return;
        }
        let stats = self.state.dedup_stats();
        let caught_secs = now_ms.saturating_sub(stats.oldest_ts.unwrap_or(now_ms)) / 1000;
        tracing::warn!(
            entries = stats.entries,
            forgotten_early = stats.evicted - warned_evicted,
            caught_secs,
            window_secs = self.dedup_window_ms / 1000,
            "the dedup table is full, so a send retried more than caught_secs after \
             the original is stored again; raise --dedup-max-entries (about 100 bytes \
             an entry) or shorten --dedup-window-secs"
        );
        self.dedup_warned = (stats.evicted, now_ms);
    }

    /// Group membership and block lists. The admin API is `trusted`: a business
    /// back-end may post to a group as a sender that is not a member (`system`).
    fn pre_send_hooks(&self, from: &str, to: &Target, trusted: bool) -> Result<(), &'static str> {
        match to {
            Target::Group(g) => match self.group_view(g) {
                None => Err("unknown group"),
                Some(members) if !trusted && !members.contains(from) => {
                    Err("not a member of the group")
                }
                Some(_) => Ok(()),
            },
            Target::User(u) => {
                let blocked = match self.pending_blocked.get(u) {
                    Some((set, _)) => set.contains(from),
                    None => self.state.blocks(u, from),
                };
                if blocked {
                    Err("blocked by the recipient")
                } else {
                    Ok(())
                }
            }
        }
    }

    /// A group's members including uncommitted changes.
    fn group_view(&self, group: &str) -> Option<&BTreeSet<String>> {
        match self.pending_groups.get(group) {
            Some((set, _)) => Some(set),
            None => self.state.group(group),
        }
    }

    fn refuse(&mut self, origin: Origin, code: ErrorCode, why: &str) {
        let out = match origin {
            Origin::Conn { conn, id } => (
                conn.endpoint,
                Event::SendFailed {
                    conn,
                    id,
                    code,
                    message: why.into(),
                },
            ),
            Origin::Admin { token } => (
                self.admin,
                Event::Admin {
                    token,
                    reply: AdminReply::Refused {
                        code,
                        message: why.into(),
                    },
                },
            ),
        };
        self.outputs.push_back(out);
    }

    /// Logs an admin change to be answered `Done` at commit; `false` if refused.
    fn log_admin(&mut self, token: u64, rec: Record) -> bool {
        if rec.encoded_len() > MAX_RECORD_BYTES {
            self.refuse(
                Origin::Admin { token },
                ErrorCode::TooLarge,
                "the list is too large",
            );
            return false;
        }
        self.pending.held.push(Held::Done { token });
        self.push_record(rec);
        true
    }

    fn log_cursor(&mut self, user: &str, device: &str, seq: u64) {
        self.state.set_cursor(user, device, seq);
        self.push_record(Record::Cursor {
            user: user.to_owned(),
            device: device.to_owned(),
            seq,
        });
    }

    fn push_record(&mut self, rec: Record) {
        self.pending.bytes += rec.frame_len();
        self.pending.records.push(rec);
    }

    fn answer(&self, held: Held) -> (Endpoint, Event) {
        match held {
            Held::SendOk {
                conn,
                id,
                msg_id,
                ts,
                dup,
            } => (
                conn.endpoint,
                Event::SendOk {
                    conn,
                    id,
                    msg_id,
                    ts,
                    dup,
                },
            ),
            Held::Posted {
                token,
                msg_id,
                ts,
                dup,
            } => (
                self.admin,
                Event::Admin {
                    token,
                    reply: AdminReply::Posted { msg_id, ts, dup },
                },
            ),
            Held::Done { token } => (
                self.admin,
                Event::Admin {
                    token,
                    reply: AdminReply::Done,
                },
            ),
        }
    }

    /// The open sessions of `user`.
    fn online_conns(&self, user: &str) -> &[OnlineConn] {
        self.state
            .known_user(user)
            .and_then(|key| self.online.get(&UserId::of(&key)))
            .map_or(&[], Online::conns)
    }

    fn remove_session(&mut self, conn: ConnRef) -> Option<Session> {
        let session = self.sessions.remove(&conn)?;
        let id = UserId::of(&session.user);
        if let Some(online) = self.online.get_mut(&id) {
            if online.remove(conn) {
                self.online.remove(&id);
            }
        }
        Some(session)
    }

    fn expire_inbox(&mut self, user: &str, now_ms: u64) {
        self.state
            .expire(user, now_ms.saturating_sub(self.retention_ms));
    }

    /// Appends `msg` to `user`'s inbox (retention applied as [`State::append`] says)
    /// and routes the entry to the user's live sessions (`None`: replaying, no
    /// routing).
    fn append_and_route(
        &mut self,
        user: &str,
        msg: &Arc<Message>,
        min_ts: u64,
        deliveries: Option<&mut Routed>,
    ) {
        let (seq, id) = self.state.append_to(user, msg, min_ts);
        if let Some(out) = deliveries {
            route(&self.online, out, msg, seq, id);
        }
    }

    /// Points a replayed message at the node's copies of its sender's and device's ids,
    /// as a live message is made with them: each retained message would otherwise keep
    /// two strings of its own. A sender with no inbox yet keeps the message's copy.
    fn share_ids(&mut self, msg: &mut Arc<Message>) {
        let Some(m) = Arc::get_mut(msg) else {
            return;
        };
        if let Some(from) = self.state.known_user(&m.from) {
            m.from = from;
        }
        let device = self.devices.intern(&m.from_device);
        m.from_device = self.devices.name(device).clone();
    }

    /// Applies a durable record. `deliveries` collects live entries per endpoint;
    /// `None` while replaying.
    fn apply(&mut self, rec: Record, now_ms: u64, mut deliveries: Option<&mut Routed>) {
        match rec {
            Record::Message { mut msg, dedup_id } => {
                self.ids.observe(msg.msg_id);
                if deliveries.is_none() {
                    self.share_ids(&mut msg);
                }
                // A live message entered the dedup table when it was accepted; a
                // replayed one outside the window would only be expired again.
                if let (Some(id), None) = (&dedup_id, &deliveries) {
                    if msg.ts >= now_ms.saturating_sub(self.dedup_window_ms) {
                        let key = self.state.dedup_key(&msg.from, id);
                        let accepted = Accepted {
                            msg_id: msg.msg_id,
                            ts: msg.ts,
                            batch: REPLAYED_BATCH,
                        };
                        self.put_dedup(key, accepted, now_ms);
                    }
                }
                let min_ts = now_ms.saturating_sub(self.retention_ms);
                match &msg.to {
                    Target::User(u) => {
                        self.append_and_route(u, &msg, min_ts, deliveries.as_deref_mut());
                        if **u != *msg.from {
                            let from = &msg.from;
                            self.append_and_route(from, &msg, min_ts, deliveries.as_deref_mut());
                        }
                    }
                    Target::Group(g) => {
                        let online = &self.online;
                        let mut out = deliveries.as_deref_mut();
                        self.state.append_to_group(g, &msg, min_ts, |seq, id| {
                            if let Some(out) = out.as_deref_mut() {
                                route(online, out, &msg, seq, id);
                            }
                        });
                    }
                }
                if deliveries.is_some() {
                    self.stats.messages_accepted += 1;
                }
            }
            Record::Cursor { user, device, seq } => self.state.set_cursor(&user, &device, seq),
            Record::PutGroup { group, members } => {
                self.state.put_group(&group, members.into_iter().collect())
            }
            Record::ModifyGroup { group, add, remove } => {
                let mut set = self.state.group(&group).cloned().unwrap_or_default();
                set.extend(add);
                for u in &remove {
                    set.remove(u);
                }
                self.state.put_group(&group, set);
            }
            Record::PutBlocked { user, users } => {
                self.state.put_blocked(&user, users.into_iter().collect())
            }
        }
    }
}

/// Adds the inbox entry `seq` of `msg` to the deliveries of the user `id`'s live
/// sessions.
fn route(
    online: &ShardedMap<UserId, Online>,
    out: &mut Routed,
    msg: &Arc<Message>,
    seq: u64,
    id: UserId,
) {
    let conns = online.get(&id).map_or(&[][..], Online::conns);
    for conn in conns {
        if conn.live {
            let e = usize::from(conn.endpoint);
            if out.len() <= e {
                out.resize_with(e + 1, Routes::default);
            }
            let routes = &mut out[e];
            // Consecutive entries of one message (a group's members) share its handle.
            if !routes.msgs.last().is_some_and(|m| Arc::ptr_eq(m, msg)) {
                routes.msgs.push(msg.clone());
            }
            routes.items.push(Live {
                conn: conn.conn,
                seq,
                msg: routes.msgs.len() - 1,
            });
        }
    }
}

#[cfg(test)]
mod tests;
