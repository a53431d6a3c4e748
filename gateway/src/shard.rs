//! One gateway shard: the connections it accepted, their sessions, its timer wheel
//! and its two mailboxes with the pipeline. Everything here runs on the shard's own
//! monoio thread; nothing is shared with other shards.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flare_codec::frame::{Encoding, GoawayReason, ServerFrame};
use flare_codec::ws::{self, Opcode};
use flare_pipeline::api::{ConnRef, Event, Message, Request};
use flare_shard::mailbox::{self, MonoioWaker, Receiver, Sender};
use flare_shard::slab::Slab;
use flare_shard::timer::TimerWheel;

use crate::config::Limits;
use crate::conn::{self, Conn, OutPool, Phase};
use crate::deliver::DeliverRun;
use crate::metrics::ShardMetrics;
use crate::notify::Notify;

/// Resolution of the shard's timer wheel.
pub const TICK_MS: u64 = 50;
const WHEEL_SLOTS: usize = 4096;
/// Size of the shard-owned read buffer that every connection reads into.
pub const READ_BUF_BYTES: usize = 64 * 1024;
/// The frame buffer's capacity past which it is freed after use.
const FRAME_BUF_KEEP_BYTES: usize = 64 * 1024;
/// Requests kept for the pipeline while its queue is full (then sends get `unavailable`).
const PIPELINE_BACKLOG_MAX: usize = 65_536;

/// What a shard is given at start.
pub struct ShardInit {
    pub index: u16,
    pub node: Rc<str>,
    pub limits: Limits,
    pub jwt_secret: Vec<u8>,
    pub to_pipeline: Sender<Request>,
    pub events: Receiver<Event>,
    pub metrics: Arc<ShardMetrics>,
    pub draining: Arc<AtomicBool>,
}

pub struct Shard {
    pub index: u16,
    pub node: Rc<str>,
    pub limits: Limits,
    pub jwt_secret: Vec<u8>,
    pub metrics: Arc<ShardMetrics>,
    pub conns: RefCell<Slab<Rc<Conn>>>,
    pub timers: RefCell<TimerWheel<u64>>,
    pub read_buf: RefCell<Vec<u8>>,
    /// Where a frame's payload is encoded before its WebSocket header, which holds
    /// its length, is written to a connection's queue.
    frame_buf: RefCell<Vec<u8>>,
    to_pipeline: Sender<Request>,
    backlog: RefCell<VecDeque<Request>>,
    session_counter: Cell<u64>,
    pub draining: Arc<AtomicBool>,
    pub drain_started: Cell<bool>,
    pub stop_accepting: Notify,
    /// `Deliver` events taken from the mailbox one after another, to be written
    /// connection by connection ([`deliver_run`](Self::deliver_run)).
    run: RefCell<DeliverRun>,
    /// Emptied outbound queues, for the next connection that queues something.
    pub out_pool: OutPool,
    /// When `out_pool` was last trimmed, ms since the Unix epoch.
    pool_trimmed_ms: Cell<u64>,
    /// Connections that pipeline events queued frames for, to be written once the
    /// mailbox is empty ([`Conn::write_later`]).
    pub write_later: RefCell<Vec<u64>>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Shard {
    /// A shard with no connections yet.
    pub fn new(
        index: u16,
        node: Rc<str>,
        limits: Limits,
        jwt_secret: Vec<u8>,
        to_pipeline: Sender<Request>,
        metrics: Arc<ShardMetrics>,
        draining: Arc<AtomicBool>,
    ) -> Shard {
        Shard {
            index,
            node,
            limits,
            jwt_secret,
            metrics,
            conns: RefCell::new(Slab::new()),
            timers: RefCell::new(TimerWheel::new(TICK_MS, WHEEL_SLOTS, now_ms())),
            read_buf: RefCell::new(vec![0u8; READ_BUF_BYTES]),
            frame_buf: RefCell::new(Vec::new()),
            to_pipeline,
            backlog: RefCell::new(VecDeque::new()),
            session_counter: Cell::new(0),
            draining,
            drain_started: Cell::new(false),
            stop_accepting: Notify::default(),
            run: RefCell::new(DeliverRun::default()),
            out_pool: OutPool::default(),
            pool_trimmed_ms: Cell::new(now_ms()),
            write_later: RefCell::new(Vec::new()),
        }
    }

    /// Writes the gathered run of `Deliver` events, one connection at a time: its
    /// entries are queued and its queue sent before the next connection's (see
    /// [`crate::deliver`]). Called before any other event is handled, so every
    /// connection sees its frames in the order the pipeline sent them.
    pub fn deliver_run(&self) {
        let mut run = self.run.borrow_mut();
        if run.is_empty() {
            return;
        }
        run.chain_by_slot();
        for &first in run.firsts() {
            // The slot's connection now, found from the first entry that names it.
            if let Some(c) = run.chain(first).find_map(|live| self.conn(live.conn)) {
                c.on_live_run(self, &run, first);
            }
        }
        run.clear();
    }

    /// Appends the WebSocket message of `frame` in `enc` to `out` (a connection's
    /// queue): no buffer of its own per frame.
    pub fn write_frame(&self, frame: &ServerFrame, enc: Encoding, out: &mut Vec<u8>) {
        let mut payload = self.frame_buf.borrow_mut();
        payload.clear();
        frame.encode_into(enc, &mut payload);
        let opcode = match enc {
            Encoding::Json => Opcode::Text,
            Encoding::Rkyv => Opcode::Binary,
        };
        ws::encode_header(opcode, true, payload.len(), None, out);
        out.extend_from_slice(&payload);
        if payload.capacity() > FRAME_BUF_KEEP_BYTES {
            // A sync page can be a megabyte: do not hold that for the small frames.
            *payload = Vec::new();
        }
    }

    /// Writes what pipeline events queued since the last call (see
    /// [`Conn::write_later`]).
    fn write_queued(&self) {
        let mut ids = std::mem::take(&mut *self.write_later.borrow_mut());
        for &id in &ids {
            if let Some(c) = self.conn(id) {
                c.write_queued(self);
            }
        }
        // The list's allocation is kept for the next round.
        ids.clear();
        let mut later = self.write_later.borrow_mut();
        if later.is_empty() {
            *later = ids;
        }
    }

    pub fn conn(&self, id: u64) -> Option<Rc<Conn>> {
        self.conns.borrow().get(id).cloned()
    }

    pub fn conn_ref(&self, id: u64) -> ConnRef {
        ConnRef {
            endpoint: self.index,
            conn: id,
        }
    }

    pub fn next_session_id(&self) -> String {
        let n = self.session_counter.get() + 1;
        self.session_counter.set(n);
        format!("{}.{}.{}", self.node, self.index, n)
    }

    /// Queues a request for the pipeline. Requests that must not be lost wait in a
    /// bounded backlog when the queue is full; returns false when even that is full.
    pub fn to_pipeline(&self, req: Request) -> bool {
        let mut backlog = self.backlog.borrow_mut();
        if !backlog.is_empty() {
            if backlog.len() >= PIPELINE_BACKLOG_MAX {
                return false;
            }
            backlog.push_back(req);
            return true;
        }
        match self.to_pipeline.send(req) {
            Ok(()) => true,
            Err(mailbox::Full(req)) => {
                backlog.push_back(req);
                true
            }
        }
    }

    /// Queues a send unless the pipeline is behind: a send is refused, not buffered.
    pub fn try_send_to_pipeline(&self, req: Request) -> Result<(), Request> {
        if !self.backlog.borrow().is_empty() {
            return Err(req);
        }
        self.to_pipeline.send(req).map_err(|mailbox::Full(req)| req)
    }

    fn retry_backlog(&self) {
        let mut backlog = self.backlog.borrow_mut();
        while let Some(req) = backlog.pop_front() {
            if let Err(mailbox::Full(req)) = self.to_pipeline.send(req) {
                backlog.push_front(req);
                break;
            }
        }
    }

    /// Places `id` in the timer wheel at `deadline_ms`.
    pub fn schedule(&self, id: u64, deadline_ms: u64) {
        self.timers.borrow_mut().insert(deadline_ms, id);
    }

    fn handle_event(&self, ev: Event) {
        match ev {
            Event::Opened {
                conn,
                ids,
                head_seq,
                entries,
                caught_up,
            } => {
                if let Some(c) = self.conn(conn.conn) {
                    c.on_opened(self, *ids, head_seq, entries, caught_up);
                }
            }
            Event::CatchUpPage {
                conn,
                entries,
                caught_up,
            } => {
                if let Some(c) = self.conn(conn.conn) {
                    c.on_catch_up(self, entries, caught_up);
                }
            }
            Event::Deliver { msgs, items } => {
                self.run.borrow_mut().gather(msgs, items);
                self.deliver_run();
            }
            Event::SendOk {
                conn,
                id,
                msg_id,
                ts,
                dup,
            } => {
                if let Some(c) = self.conn(conn.conn) {
                    c.queue_frame(
                        self,
                        &ServerFrame::SendOk {
                            id,
                            msg_id,
                            ts,
                            dup,
                        },
                    );
                }
            }
            Event::SendFailed {
                conn,
                id,
                code,
                message,
            } => {
                if let Some(c) = self.conn(conn.conn) {
                    c.push_error(self, code, &message, Some(id));
                }
            }
            Event::SyncPage {
                conn,
                entries,
                after,
                last,
                more,
                truncated,
            } => {
                if let Some(c) = self.conn(conn.conn) {
                    for e in &entries {
                        c.push_frame(self, &msg_frame(e.seq, &e.msg));
                    }
                    c.push_frame(
                        self,
                        &ServerFrame::SyncDone {
                            after,
                            last,
                            more,
                            truncated,
                        },
                    );
                }
            }
            Event::Replaced { conn } => {
                if let Some(c) = self.conn(conn) {
                    c.goaway(
                        self,
                        GoawayReason::Replaced,
                        4003,
                        "replaced by a newer session",
                    );
                }
            }
            Event::Kicked { conn } => {
                if let Some(c) = self.conn(conn) {
                    c.goaway(self, GoawayReason::Kicked, 4003, "kicked");
                }
            }
            Event::Admin { .. } => {
                debug_assert!(false, "admin replies go to the admin endpoint, not a shard");
            }
        }
    }

    fn on_tick(&self, now: u64) {
        self.retry_backlog();
        if now >= self.pool_trimmed_ms.get() + conn::OUT_POOL_TRIM_MS {
            self.pool_trimmed_ms.set(now);
            self.out_pool.trim();
        }
        let mut due = Vec::new();
        self.timers.borrow_mut().advance(now, &mut due);
        for id in due {
            if let Some(c) = self.conn(id) {
                c.on_timer(self, now);
            }
        }
        if self.draining.load(Ordering::Relaxed) && !self.drain_started.get() {
            self.drain_started.set(true);
            self.stop_accepting.notify();
            let all: Vec<Rc<Conn>> = self.conns.borrow().iter().map(|(_, c)| c.clone()).collect();
            for c in all {
                if c.phase() == Phase::Open {
                    c.goaway(self, GoawayReason::Draining, 1001, "server draining");
                } else {
                    c.request_close(self, 1001, "server draining");
                }
            }
        }
    }
}

/// The `msg` frame of one inbox entry.
pub fn msg_frame(seq: u64, msg: &Message) -> ServerFrame {
    ServerFrame::Msg {
        seq,
        msg_id: msg.msg_id,
        from: msg.from.to_string(),
        from_device: msg.from_device.to_string(),
        to: msg.to.clone(),
        body: msg.body.clone(),
        ts: msg.ts,
    }
}

/// Runs one shard until it has drained.
pub async fn run(init: ShardInit, listener: std::net::TcpListener) {
    let ShardInit {
        index,
        node,
        limits,
        jwt_secret,
        to_pipeline,
        mut events,
        metrics,
        draining,
    } = init;
    let wake_socket = events
        .take_wake_socket()
        .expect("a fresh receiver has its wake socket");
    let waker = match MonoioWaker::new(wake_socket) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(shard = index, error = %e, "cannot watch the pipeline mailbox");
            return;
        }
    };
    let listener = match monoio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(shard = index, error = %e, "cannot adopt the listening socket");
            return;
        }
    };
    let drain_timeout = Duration::from_millis(limits.drain_timeout_ms);
    let shard = Rc::new(Shard::new(
        index,
        node,
        limits,
        jwt_secret,
        to_pipeline,
        metrics,
        draining,
    ));

    let s = shard.clone();
    monoio::spawn(async move {
        loop {
            while let Some(ev) = events.try_recv() {
                match ev {
                    Event::Deliver { msgs, items } => s.run.borrow_mut().gather(msgs, items),
                    ev => {
                        s.deliver_run();
                        s.handle_event(ev);
                    }
                }
            }
            s.deliver_run();
            // Every event that was waiting is handled: what they queued goes out now,
            // one `send` per connection however many of them it got.
            s.write_queued();
            if events.prepare_wait() {
                if let Err(e) = waker.wait().await {
                    tracing::error!(shard = s.index, error = %e, "pipeline mailbox failed");
                    return;
                }
            } else {
                // More came meanwhile: let the connections' tasks read first, so a
                // busy mailbox cannot keep the clients' requests waiting.
                yield_once().await;
            }
        }
    });
    let s = shard.clone();
    monoio::spawn(async move {
        loop {
            monoio::time::sleep(Duration::from_millis(TICK_MS)).await;
            s.on_tick(now_ms());
        }
    });

    accept_loop(&shard, &listener).await;
    drop(listener);
    tracing::info!(
        shard = index,
        conns = shard.conns.borrow().len(),
        "shard stopped accepting; draining"
    );
    let deadline = std::time::Instant::now() + drain_timeout;
    while !shard.conns.borrow().is_empty() && std::time::Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(TICK_MS)).await;
    }
    tracing::info!(
        shard = index,
        left = shard.conns.borrow().len(),
        "shard drained"
    );
}

/// Returns after the runtime has run its other ready tasks once.
async fn yield_once() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            return std::task::Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await
}

async fn accept_loop(shard: &Rc<Shard>, listener: &monoio::net::TcpListener) {
    let mut last_emfile_log = 0u64;
    loop {
        let accepted = monoio::select! {
            r = listener.accept() => r,
            _ = shard.stop_accepting.notified() => return,
        };
        match accepted {
            Ok((stream, _peer)) => {
                ShardMetrics::inc(&shard.metrics.connections_accepted);
                if shard.conns.borrow().len() >= shard.limits.conns_per_shard {
                    // Over the shard's connection bound: refuse at once, keep serving the rest.
                    drop(stream);
                    continue;
                }
                let _ = stream.set_nodelay(true);
                match Conn::accept(shard, stream) {
                    Ok(conn) => {
                        monoio::spawn(conn::serve(shard.clone(), conn));
                    }
                    Err(e) => {
                        tracing::warn!(shard = shard.index, error = %e, "cannot watch an accepted socket")
                    }
                }
            }
            Err(e) => {
                ShardMetrics::inc(&shard.metrics.accept_errors);
                let out_of_files =
                    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE));
                let now = now_ms();
                if now - last_emfile_log > 5_000 {
                    last_emfile_log = now;
                    if out_of_files {
                        tracing::warn!(shard = shard.index, error = %e, "out of file descriptors: backing off accepts, existing connections keep being served");
                    } else {
                        tracing::warn!(shard = shard.index, error = %e, "accept failed");
                    }
                }
                monoio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
