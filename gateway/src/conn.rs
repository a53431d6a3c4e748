//! One client connection: WebSocket handshake, frame loop, session, outbound queue.
//!
//! A connection is one monoio task that waits for *readiness* (not for a read with
//! a buffer of its own), then reads into the shard's shared buffer with non-blocking
//! `recv`: an idle connection holds no read or write buffer (DESIGN.md §6). Bytes of
//! an incomplete frame are the only thing kept between reads. Outbound frames wait
//! in a bounded queue (`outbound_bytes_max`, overflow closes with 4008), allocated
//! while it holds frames, and are written with `sendmsg` straight from the queue.
//! Timeouts live in the shard's timer wheel, one entry per connection.
//!
//! An idle authenticated connection is the [`Conn`] (104 bytes in an `Rc`), its task
//! (about 176 bytes plus monoio's header), and monoio's shared fd and readiness op;
//! the `an_idle_connection_is_small` test holds the first two to their sizes.

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::pin::pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use flare_codec::frame::{ClientFrame, Encoding, ErrorCode, GoawayReason, ServerFrame, Target};
use flare_codec::ids::is_valid_id;
use flare_codec::ws::{self, WsDecoder, WsEvent};
use flare_codec::Decoded;
use flare_pipeline::api::{Entry, Request, SessionIds};

use crate::deliver::DeliverRun;
use crate::jwt::{self, TokenError};
use crate::metrics::ShardMetrics;
use crate::shard::{msg_frame, now_ms, Shard};

/// Bad frames in a row that close a connection with 4000.
const BAD_FRAMES_MAX: u8 = 10;
/// How long a closing connection may take to flush and say goodbye.
const CLOSE_FLUSH_MS: u64 = 2_000;
const CLOSE_LINGER_MS: u64 = 1_000;
/// Once this many bytes of a connection's queue are written, and they are at least half
/// of it, the unwritten rest moves to the front (a reader that never quite catches up
/// would otherwise grow the queue's buffer without end).
const COMPACT_AFTER_BYTES: usize = 64 << 10;
/// The buffer bytes a shard's pool of emptied outbound queues may hold, and the
/// largest buffer it keeps. Bounded by bytes, not count: a group message queues on
/// every member's connection at once, and a pool smaller than that burst would
/// allocate and grow a buffer for each member past it, every time.
///
/// A commit of a busy group is tens of frames on each member's connection, and a
/// reader that lags lets its queue grow to hundreds of KiB. A buffer dropped for its
/// size is grown again from empty by doubling, with a copy at each step: in
/// `flare-loadgen fanout` to 1000 members at 4934 msgs/s, with 16 KiB and 4 MiB here,
/// `realloc`'s copies were 9% of the server's CPU samples, and 2% with these sizes.
/// The pool frees what no connection took for [`OUT_POOL_TRIM_MS`]
/// ([`OutPool::trim`]), so a burst does not keep its memory.
const OUT_POOL_BYTES: usize = 256 << 20;
const OUT_POOL_BUF_BYTES: usize = 4 << 20;
/// How often a shard frees the queues its pool kept but did not hand out.
pub const OUT_POOL_TRIM_MS: u64 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading the HTTP upgrade request.
    Handshake,
    /// WebSocket open; the first frame must be `auth`.
    AwaitAuth,
    /// Token accepted; waiting for the pipeline to open the session.
    Authenticating,
    /// Session open.
    Open,
}

/// How a connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    /// Flush what is queued, send a close frame with this code, then close TCP.
    Ws(u16, &'static str),
    /// Flush what is queued (an HTTP answer), then close TCP.
    Raw,
}

/// Bytes a connection could not use yet. Only a read that ends inside an upgrade
/// request or inside a WebSocket frame leaves one behind, so an idle connection has none.
enum Partial {
    /// The start of the HTTP upgrade request.
    Handshake(Vec<u8>),
    /// A decoder holding part of a frame (or of a fragmented message).
    Frame(WsDecoder),
}

/// Bytes waiting for the socket, in order, in one buffer: the HTTP upgrade answer, then
/// whole WebSocket messages, each written straight into it (no allocation per message,
/// one `send` for all of them). Allocated when something is queued and freed once the
/// last byte is written: an idle connection holds no queue.
#[derive(Default)]
pub struct Outbound {
    buf: Vec<u8>,
    /// `buf[..written]` is on the wire.
    written: usize,
    /// A boundary not to cut before: `buf[..unit_end]` is the HTTP answer or messages
    /// written at least in part, and `buf[unit_end..]` is whole messages.
    unit_end: usize,
}

/// A shard's emptied outbound queues. A connection that queues something takes one
/// whose buffer has already grown and been touched, instead of allocating, growing
/// and page-faulting a new one for every burst (a group message is a burst on every
/// member's connection).
// Boxes, as connections hold them: taking one from the pool allocates nothing.
#[allow(clippy::vec_box)]
#[derive(Default)]
pub struct OutPool {
    /// A stack: the queue given back last is taken first, and the bottom is what
    /// waited longest.
    free: RefCell<Vec<Box<Outbound>>>,
    /// What the queues in `free` hold: [`Outbound::pooled_bytes`] summed.
    bytes: Cell<usize>,
    /// The fewest queues `free` held since the last [`trim`](Self::trim): the bottom
    /// that many were not taken since.
    untaken: Cell<usize>,
}

impl OutPool {
    fn take(&self) -> Box<Outbound> {
        let mut free = self.free.borrow_mut();
        match free.pop() {
            Some(out) => {
                self.bytes.set(self.bytes.get() - out.pooled_bytes());
                self.untaken.set(self.untaken.get().min(free.len()));
                out
            }
            None => {
                self.untaken.set(0);
                Box::default()
            }
        }
    }

    fn give(&self, mut out: Box<Outbound>) {
        let bytes = out.pooled_bytes();
        if out.buf.capacity() > OUT_POOL_BUF_BYTES || self.bytes.get() + bytes > OUT_POOL_BYTES {
            return;
        }
        out.buf.clear();
        out.written = 0;
        out.unit_end = 0;
        self.free.borrow_mut().push(out);
        self.bytes.set(self.bytes.get() + bytes);
    }

    /// Frees the queues that were not taken since the last call.
    pub fn trim(&self) {
        let mut free = self.free.borrow_mut();
        let n = self.untaken.get().min(free.len());
        for out in free.drain(..n) {
            self.bytes.set(self.bytes.get() - out.pooled_bytes());
        }
        self.untaken.set(free.len());
    }
}

impl Outbound {
    /// The memory a pooled queue holds: its box and its buffer.
    fn pooled_bytes(&self) -> usize {
        std::mem::size_of::<Self>() + self.buf.capacity()
    }

    fn queued(&self) -> usize {
        self.buf.len() - self.written
    }

    /// Moves `unit_end` over the messages written so far, to the end of the one that
    /// is partly written, if any.
    fn settle(&mut self) {
        while self.unit_end < self.written {
            let len = ws::unmasked_frame_len(&self.buf[self.unit_end..])
                .expect("the queue after `unit_end` is whole frames");
            self.unit_end += len;
        }
    }

    /// Drops what is not written yet, except the rest of a message partly written:
    /// a half-sent frame would garble the stream.
    fn drop_unwritten(&mut self) {
        self.settle();
        self.buf.truncate(self.unit_end);
    }

    /// Counts `n` more bytes as written.
    fn wrote(&mut self, n: usize) {
        self.written += n;
        if self.written >= COMPACT_AFTER_BYTES && self.written * 2 >= self.buf.len() {
            self.settle();
            self.buf.drain(..self.written);
            self.unit_end -= self.written;
            self.written = 0;
        }
    }
}

/// Where a session is in getting its inbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    /// A catch-up page is on its way or being written; live entries wait.
    Paging,
    /// Ask for the next catch-up page once the queue is written.
    NextPage,
    /// Caught up: live entries go out as they come.
    Live,
}

/// A connection's protocol state. Every field is sized for the idle case (DESIGN.md §6):
/// what only a busy, closing or half-read connection needs sits behind an `Option<Box>`
/// that is `None` when idle, the small fields share one word, and the session's user
/// and device are not kept here at all (the pipeline holds them and sends them back
/// for `auth_ok`). The pipeline knows the connection (and is told when it goes) from
/// [`Phase::Authenticating`] on.
struct ConnState {
    phase: Phase,
    enc: Encoding,
    bad_frames: u8,
    delivery: Delivery,
    /// When the session's token expires, seconds since the Unix epoch (`u32::MAX`,
    /// in 2106, for later).
    exp_secs: u32,
    partial: Option<Box<Partial>>,
    out: Option<Box<Outbound>>,
    close: Option<Box<Close>>,
    /// Before the session opens: when the connection was accepted (the auth deadline
    /// counts from it). Once open: when bytes last arrived (the heartbeat counts from it).
    mark_ms: u64,
    /// The send rate limit: the theoretical arrival time of the next send, ns since
    /// the Unix epoch (see [`take_send_token`](Self::take_send_token)).
    send_tat_ns: u64,
    /// Highest `seq` written to this connection (catch-up or live).
    delivered: u64,
}

pub struct Conn {
    id: u64,
    /// The socket.
    io: Readiness,
    /// Set by [`wake`](Self::wake) until the task sees it.
    woken: Cell<bool>,
    /// In the shard's list of connections to write once the mailbox is empty.
    write_later: Cell<bool>,
    /// The connection's task while it waits.
    waker: Cell<Option<Waker>>,
    st: RefCell<ConnState>,
}

/// The handle a connection's task waits on for readiness.
///
/// monoio's `TcpStream` carries 72 bytes of cached address metadata that a connection
/// never reads, inside every connection's task; its `UnixStream` is the bare shared fd.
/// `readable`/`writable` are fd-level polls, blind to the socket's family, so the
/// accepted TCP socket is held as one (DESIGN.md §6). Nothing else is called on it.
type Readiness = monoio::net::UnixStream;

/// Turns an accepted stream into the handle its task waits on.
fn readiness(stream: monoio::net::TcpStream) -> io::Result<Readiness> {
    let fd = stream.into_raw_fd();
    // SAFETY: `fd` is the open socket `stream` owned; `into_raw_fd` gave up that
    // ownership, and the new std stream is now its only owner.
    let std = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
    monoio::net::UnixStream::from_std(std)
}

/// Serves one accepted TCP connection until it closes.
///
/// This future is the connection's task, so it is kept small (DESIGN.md §6; the
/// `an_idle_connection_is_small` test holds it to a bound): the decisions are plain
/// methods of [`Conn`], the paths an idle connection never takes are boxed, and it is
/// an `async move` block rather than an `async fn`, whose future would keep a second
/// copy of its arguments.
#[allow(clippy::manual_async_fn)] // an `async fn` would be 16 bytes larger, see above
pub fn serve(shard: Rc<Shard>, conn: Rc<Conn>) -> impl Future<Output = ()> {
    async move {
        let ended = loop {
            match conn.next_step(&shard) {
                Err(e) => break Err(e),
                Ok(Step::Flush) => {
                    // The peer is not reading: wait for it in a boxed future, so an
                    // idle connection's task holds only the readiness wait below.
                    if let Err(e) = Box::pin(conn.flush(&shard)).await {
                        break Err(e);
                    }
                }
                Ok(Step::Finish(close)) => {
                    // Boxed: the closing path's state would otherwise sit in every idle
                    // connection's task.
                    Box::pin(conn.finish(&shard, close)).await;
                    break Ok(());
                }
                Ok(Step::Wait) => {
                    // One readiness op per wait for bytes: wake-ups that only queue
                    // frames are written from here without cancelling and re-arming it.
                    let mut readable = pin!(conn.io.readable(false));
                    let read = loop {
                        let woke = poll_fn(|cx| {
                            if let Poll::Ready(r) = readable.as_mut().poll(cx) {
                                Poll::Ready(Woke::Readable(r))
                            } else if conn.poll_woken(cx) {
                                Poll::Ready(Woke::Notified)
                            } else {
                                Poll::Pending
                            }
                        })
                        .await;
                        match woke {
                            Woke::Readable(r) => break r.and_then(|()| conn.read_ready(&shard)),
                            Woke::Notified => match conn.on_woken(&shard) {
                                Ok(true) => {}
                                Ok(false) => break Ok(true),
                                Err(e) => break Err(e),
                            },
                        }
                    };
                    match read {
                        Ok(true) => {}
                        Ok(false) => break Ok(()),
                        Err(e) => break Err(e),
                    }
                }
            }
        };
        if let Err(e) = ended {
            tracing::debug!(shard = shard.index, conn = conn.id, error = %e, "connection ended with an error");
        }
        conn.closed(&shard);
    }
}

/// What a connection's task does next.
enum Step {
    /// Wait for the socket to take the rest of the queue.
    Flush,
    /// Say goodbye and close.
    Finish(Close),
    /// Wait for bytes or a wake-up.
    Wait,
}

/// Why an idle connection's task woke up.
enum Woke {
    Readable(io::Result<()>),
    Notified,
}

impl Conn {
    /// Registers an accepted connection with its shard (a slab id and the auth
    /// deadline); [`serve`] then runs it.
    pub fn accept(shard: &Shard, stream: monoio::net::TcpStream) -> io::Result<Rc<Conn>> {
        let io = readiness(stream)?;
        let now = now_ms();
        let id = shard.conns.borrow_mut().insert_with(|id| {
            Rc::new(Conn {
                id,
                io,
                woken: Cell::new(false),
                write_later: Cell::new(false),
                waker: Cell::new(None),
                st: RefCell::new(ConnState {
                    phase: Phase::Handshake,
                    enc: Encoding::Json,
                    bad_frames: 0,
                    delivery: Delivery::Paging,
                    exp_secs: u32::MAX,
                    partial: None,
                    out: None,
                    close: None,
                    mark_ms: now,
                    send_tat_ns: 0,
                    delivered: 0,
                }),
            })
        });
        ShardMetrics::inc(&shard.metrics.connections_open);
        shard.schedule(id, now + shard.limits.auth_timeout_ms);
        Ok(shard.conn(id).expect("inserted above"))
    }

    fn fd(&self) -> RawFd {
        self.io.as_raw_fd()
    }

    /// Unregisters a connection whose task ends.
    fn closed(&self, shard: &Shard) {
        shard.conns.borrow_mut().remove(self.id);
        ShardMetrics::dec(&shard.metrics.connections_open);
        let st = self.st.borrow();
        if st.phase == Phase::Open {
            ShardMetrics::dec(&shard.metrics.sessions_open);
        }
        if st.registered() {
            shard.to_pipeline(Request::Closed {
                conn: shard.conn_ref(self.id),
            });
        }
    }

    pub fn phase(&self) -> Phase {
        self.st.borrow().phase
    }

    /// Wakes the task: frames were queued, or a close was requested.
    fn wake(&self) {
        self.woken.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Whether [`wake`](Self::wake) was called since the last look; if not, the task
    /// is woken by the next call.
    fn poll_woken(&self, cx: &Context<'_>) -> bool {
        if self.woken.replace(false) {
            return true;
        }
        self.waker.set(Some(cx.waker().clone()));
        false
    }

    /// What the task does next, once the queue has been written as far as the socket
    /// takes it and the next catch-up page has been asked for. A close goes ahead of
    /// a queue the peer is not reading: `finish` flushes it with its own deadline.
    fn next_step(&self, shard: &Shard) -> io::Result<Step> {
        let written = self.write_some(shard)?;
        if let Some(&close) = self.st.borrow().close.as_deref() {
            return Ok(Step::Finish(close));
        }
        if !written {
            return Ok(Step::Flush);
        }
        self.ask_catch_up(shard);
        Ok(Step::Wait)
    }

    /// After a wake-up: writes what was queued. Returns whether the task may keep
    /// waiting on the readiness op it has (nothing is left to write and no close).
    fn on_woken(&self, shard: &Shard) -> io::Result<bool> {
        if !self.write_some(shard)? || self.st.borrow().close.is_some() {
            return Ok(false);
        }
        self.ask_catch_up(shard);
        Ok(true)
    }

    /// Asks the pipeline for the next catch-up page if the last one was written.
    fn ask_catch_up(&self, shard: &Shard) {
        let mut st = self.st.borrow_mut();
        if st.delivery == Delivery::NextPage && st.out.is_none() {
            st.delivery = Delivery::Paging;
            let after = st.delivered;
            drop(st);
            shard.to_pipeline(Request::CatchUp {
                conn: shard.conn_ref(self.id),
                after,
            });
        }
    }

    /// Reads everything the socket has. Returns false at end of stream.
    fn read_ready(&self, shard: &Shard) -> io::Result<bool> {
        let mut buf = shard.read_buf.borrow_mut();
        loop {
            // SAFETY: `buf` is a live, exclusively borrowed allocation of `buf.len()`
            // bytes; recv writes at most that many and we only read what it reports.
            let n = unsafe {
                libc::recv(
                    self.fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(true),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(e),
                };
            }
            if n == 0 {
                return Ok(false);
            }
            let n = n as usize;
            ShardMetrics::add(&shard.metrics.bytes_in, n as u64);
            self.st.borrow_mut().on_bytes(shard, self.id, &buf[..n]);
            if self.st.borrow().close.is_some() || n < buf.len() {
                return Ok(true);
            }
        }
    }

    /// Writes the queue until it is empty, or until a close is requested while the
    /// peer is not reading (then `finish` takes over with its own deadline).
    async fn flush(&self, shard: &Shard) -> io::Result<()> {
        loop {
            if self.write_some(shard)? {
                return Ok(());
            }
            if self.st.borrow().close.is_some() {
                return Ok(());
            }
            let writable = self.io.writable(false);
            let mut writable = pin!(writable);
            let woke = poll_fn(|cx| {
                if let Poll::Ready(r) = writable.as_mut().poll(cx) {
                    Poll::Ready(Some(r))
                } else if self.poll_woken(cx) {
                    Poll::Ready(None)
                } else {
                    Poll::Pending
                }
            })
            .await;
            if let Some(r) = woke {
                r?;
            }
        }
    }

    /// Writes what is queued until the socket is full. Returns true when the queue is
    /// empty (and then frees it).
    fn write_some(&self, shard: &Shard) -> io::Result<bool> {
        let mut st = self.st.borrow_mut();
        loop {
            let Some(out) = st.out.as_deref_mut() else {
                return Ok(true);
            };
            if out.queued() == 0 {
                if let Some(out) = st.out.take() {
                    shard.out_pool.give(out);
                }
                return Ok(true);
            }
            let rest = &out.buf[out.written..];
            // SAFETY: `rest` borrows `out.buf`, which stays borrowed and unchanged until
            // send returns.
            let n = unsafe {
                libc::send(
                    self.fd(),
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(false),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(e),
                };
            }
            ShardMetrics::add(&shard.metrics.bytes_out, n as u64);
            out.wrote(n as usize);
        }
    }

    /// Flushes, sends the close frame, half-closes, and lingers briefly for the peer.
    async fn finish(&self, shard: &Shard, close: Close) {
        if let Close::Ws(code, reason) = close {
            let mut st = self.st.borrow_mut();
            let out = st.queue(shard);
            ws::close(code, reason, &mut out.buf);
        }
        let flushed = monoio::time::timeout(Duration::from_millis(CLOSE_FLUSH_MS), async {
            loop {
                match self.write_some(shard) {
                    Ok(true) => return true,
                    Ok(false) => {
                        if self.io.writable(false).await.is_err() {
                            return false;
                        }
                    }
                    Err(_) => return false,
                }
            }
        })
        .await;
        // SAFETY: plain syscall on our own open socket.
        unsafe { libc::shutdown(self.fd(), libc::SHUT_WR) };
        if matches!(flushed, Ok(true)) {
            let _ = monoio::time::timeout(Duration::from_millis(CLOSE_LINGER_MS), async {
                let mut sink = [0u8; 512];
                loop {
                    if self.io.readable(false).await.is_err() {
                        return;
                    }
                    // SAFETY: `sink` is a live local buffer of the given length.
                    let n = unsafe {
                        libc::recv(
                            self.fd(),
                            sink.as_mut_ptr().cast(),
                            sink.len(),
                            libc::MSG_DONTWAIT,
                        )
                    };
                    if n == 0
                        || (n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock)
                    {
                        return;
                    }
                }
            })
            .await;
        }
    }

    /// Queues a frame for this connection.
    pub fn push_frame(&self, shard: &Shard, frame: &ServerFrame) {
        self.st.borrow_mut().push(shard, frame);
        self.wake();
    }

    /// Queues a frame that a pipeline event brought, to be written with the others
    /// once the shard has handled every waiting event ([`write_later`](Self::write_later)).
    pub fn queue_frame(&self, shard: &Shard, frame: &ServerFrame) {
        self.st.borrow_mut().push(shard, frame);
        self.write_later(shard);
    }

    /// Puts the connection on the shard's list to write once the mailbox is empty,
    /// instead of waking its task. A group message queues a frame on every member's
    /// connection: written from the list, that is one `send` each and no task to wake
    /// and poll.
    fn write_later(&self, shard: &Shard) {
        if !self.write_later.replace(true) {
            shard.write_later.borrow_mut().push(self.id);
        }
    }

    /// Writes what [`write_later`](Self::write_later) left. The task is woken only
    /// when it has something to do: the socket did not take it all, the write
    /// failed, or a close was requested.
    pub fn write_queued(&self, shard: &Shard) {
        self.write_later.set(false);
        self.write_now(shard);
    }

    /// Writes what is queued; wakes the task if the socket did not take it all, the
    /// write failed, or a close was requested.
    fn write_now(&self, shard: &Shard) {
        match self.write_some(shard) {
            Ok(true) if self.st.borrow().close.is_none() => {}
            _ => self.wake(),
        }
    }

    pub fn push_error(&self, shard: &Shard, code: ErrorCode, message: &str, id: Option<String>) {
        self.st.borrow_mut().error(shard, code, message, id);
        self.wake();
    }

    /// `goaway{reason}` then close with `code`.
    pub fn goaway(&self, shard: &Shard, reason: GoawayReason, code: u16, text: &'static str) {
        let mut st = self.st.borrow_mut();
        if st.close.is_none() {
            let reconnect_after_ms = if reason == GoawayReason::Draining {
                1000
            } else {
                0
            };
            st.push(
                shard,
                &ServerFrame::Goaway {
                    reason,
                    reconnect_after_ms,
                },
            );
            st.close_ws(code, text);
        }
        drop(st);
        self.wake();
    }

    pub fn request_close(&self, _shard: &Shard, code: u16, text: &'static str) {
        let mut st = self.st.borrow_mut();
        if st.phase == Phase::Handshake {
            st.close.get_or_insert(Box::new(Close::Raw));
        } else {
            st.close_ws(code, text);
        }
        drop(st);
        self.wake();
    }

    pub fn on_opened(
        &self,
        shard: &Shard,
        ids: SessionIds,
        head_seq: u64,
        entries: Vec<Entry>,
        caught_up: bool,
    ) {
        let mut st = self.st.borrow_mut();
        if st.phase != Phase::Authenticating || st.close.is_some() {
            return;
        }
        st.phase = Phase::Open;
        st.mark_ms = now_ms();
        ShardMetrics::inc(&shard.metrics.sessions_open);
        st.push(
            shard,
            &ServerFrame::AuthOk {
                user: ids.user,
                device: ids.device,
                session: shard.next_session_id(),
                node: shard.node.to_string(),
                head_seq,
                heartbeat_ms: shard.limits.heartbeat_ms,
            },
        );
        st.page(shard, &entries, caught_up);
        drop(st);
        self.wake();
    }

    pub fn on_catch_up(&self, shard: &Shard, entries: Vec<Entry>, caught_up: bool) {
        let mut st = self.st.borrow_mut();
        if st.phase != Phase::Open {
            return;
        }
        st.page(shard, &entries, caught_up);
        drop(st);
        self.wake();
    }

    /// Queues this connection's entries of a run of `Deliver`s (the chain from
    /// `first`) and writes its queue at once, while it is in the cache (see
    /// [`crate::deliver`]).
    pub fn on_live_run(&self, shard: &Shard, run: &DeliverRun, first: u32) {
        let mut st = self.st.borrow_mut();
        if st.phase != Phase::Open || st.delivery != Delivery::Live {
            return;
        }
        let enc = st.enc;
        let mut queued = false;
        for live in run.chain(first) {
            // An earlier connection in this slot, or an entry already written.
            if live.conn != self.id || live.seq <= st.delivered {
                continue;
            }
            st.delivered = live.seq;
            st.push_with(shard, |buf| run.write_msg(live, enc, buf));
            queued = true;
        }
        drop(st);
        if queued {
            self.write_now(shard);
        }
    }

    pub fn on_timer(&self, shard: &Shard, now: u64) {
        let mut st = self.st.borrow_mut();
        if st.close.is_some() {
            return;
        }
        let id = self.id;
        let next = match st.phase {
            Phase::Handshake | Phase::AwaitAuth | Phase::Authenticating => {
                let deadline = st.mark_ms + shard.limits.auth_timeout_ms;
                if now >= deadline {
                    if st.phase == Phase::Handshake {
                        st.close = Some(Box::new(Close::Raw));
                    } else {
                        st.close_ws(4001, "authentication timeout");
                    }
                    None
                } else {
                    Some(deadline)
                }
            }
            Phase::Open => {
                let idle_deadline = st.mark_ms + 3 * shard.limits.heartbeat_ms;
                let exp_ms = u64::from(st.exp_secs) * 1000;
                if now >= exp_ms {
                    st.push(
                        shard,
                        &ServerFrame::Goaway {
                            reason: GoawayReason::TokenExpired,
                            reconnect_after_ms: 0,
                        },
                    );
                    st.close_ws(4002, "token expired");
                    None
                } else if now >= idle_deadline {
                    st.close_ws(1001, "heartbeat timeout");
                    None
                } else {
                    Some(idle_deadline.min(exp_ms))
                }
            }
        };
        drop(st);
        match next {
            Some(deadline) => shard.schedule(id, deadline),
            None => self.wake(),
        }
    }
}

impl ConnState {
    /// Whether the pipeline knows this connection: it got `Open`.
    fn registered(&self) -> bool {
        matches!(self.phase, Phase::Authenticating | Phase::Open)
    }

    fn close_ws(&mut self, code: u16, text: &'static str) {
        if self.close.is_none() {
            self.close = Some(Box::new(Close::Ws(code, text)));
        }
    }

    fn push(&mut self, shard: &Shard, frame: &ServerFrame) {
        if matches!(frame, ServerFrame::Error { .. }) {
            ShardMetrics::inc(&shard.metrics.errors_sent);
        }
        let enc = self.enc;
        self.push_with(shard, |buf| shard.write_frame(frame, enc, buf));
    }

    /// Queues the one WebSocket message `write` appends. If the queue would pass
    /// `outbound_bytes_max`, the message is not queued: the connection is a slow
    /// consumer and closes with 4008.
    fn push_with(&mut self, shard: &Shard, write: impl FnOnce(&mut Vec<u8>)) {
        if self.close.is_some() {
            return;
        }
        let out = self.queue(shard);
        let before = out.buf.len();
        write(&mut out.buf);
        if out.queued() > shard.limits.outbound_bytes_max {
            // Slow consumer: drop what it has not read (but never half a frame) and close.
            out.buf.truncate(before);
            out.drop_unwritten();
            ShardMetrics::inc(&shard.metrics.slow_consumer_closes);
            self.close = Some(Box::new(Close::Ws(4008, "slow consumer")));
            return;
        }
        ShardMetrics::inc(&shard.metrics.frames_out);
    }

    /// The outbound queue, taken from the shard's pool if there is none. Every queue
    /// comes from here: the pool takes back every emptied one, so a queue made
    /// elsewhere would add to the pool for good.
    fn queue(&mut self, shard: &Shard) -> &mut Outbound {
        self.out.get_or_insert_with(|| shard.out_pool.take())
    }

    /// Queues the HTTP answer to the upgrade request, the first bytes of a connection.
    fn push_http(&mut self, shard: &Shard, answer: &[u8]) {
        let out = self.queue(shard);
        debug_assert!(out.buf.is_empty(), "the HTTP answer comes first");
        out.buf.extend_from_slice(answer);
        out.unit_end = out.buf.len();
    }

    fn error(&mut self, shard: &Shard, code: ErrorCode, message: &str, id: Option<String>) {
        self.push(
            shard,
            &ServerFrame::Error {
                code,
                message: message.to_string(),
                id,
            },
        );
    }

    fn page(&mut self, shard: &Shard, entries: &[Entry], caught_up: bool) {
        for e in entries {
            if e.seq > self.delivered {
                self.delivered = e.seq;
                self.push(shard, &msg_frame(e.seq, &e.msg));
            }
        }
        self.delivery = if caught_up {
            Delivery::Live
        } else {
            Delivery::NextPage
        };
    }

    fn on_bytes(&mut self, shard: &Shard, id: u64, bytes: &[u8]) {
        if self.phase == Phase::Open {
            self.mark_ms = now_ms();
        }
        if self.phase != Phase::Handshake {
            self.frames(shard, id, bytes);
            return;
        }
        let data = match self.partial.take().map(|p| *p) {
            Some(Partial::Handshake(mut partial)) => {
                partial.extend_from_slice(bytes);
                partial
            }
            Some(Partial::Frame(_)) => unreachable!("no frames before the handshake"),
            None => bytes.to_vec(),
        };
        if let Some(consumed) = self.handshake(shard, &data) {
            if consumed < data.len() {
                self.frames(shard, id, &data[consumed..]);
            }
        }
    }

    /// Parses the upgrade request in `data`. Returns how many bytes it used once the
    /// WebSocket is open; keeps `data` in `partial` while incomplete.
    fn handshake(&mut self, shard: &Shard, data: &[u8]) -> Option<usize> {
        let max = shard.limits.max_handshake_bytes;
        match ws::parse_upgrade(data, max) {
            Ok(Decoded::Insufficient) => {
                self.partial = Some(Box::new(Partial::Handshake(data.to_vec())));
                None
            }
            Ok(Decoded::Complete { value, consumed }) => match value.accept() {
                Ok(accepted) => {
                    self.enc = accepted.encoding;
                    self.push_http(shard, &accepted.response);
                    self.phase = Phase::AwaitAuth;
                    Some(consumed)
                }
                Err(e) => {
                    self.http_error(shard, e);
                    None
                }
            },
            Err(e) => {
                self.http_error(shard, e);
                None
            }
        }
    }

    fn http_error(&mut self, shard: &Shard, e: ws::HandshakeError) {
        self.push_http(shard, &e.response());
        self.close = Some(Box::new(Close::Raw));
    }

    /// Decodes WebSocket frames. The decoder lives on the stack unless a read ends
    /// inside a frame: only then is it kept (boxed) for the next read.
    fn frames(&mut self, shard: &Shard, id: u64, data: &[u8]) {
        let mut decoder = match self.partial.take().map(|p| *p) {
            Some(Partial::Frame(decoder)) => decoder,
            Some(Partial::Handshake(_)) => unreachable!("frames are decoded after the handshake"),
            None => WsDecoder::new(ws::Role::Server, shard.limits.max_frame_bytes),
        };
        let mut input = data;
        while !input.is_empty() && self.close.is_none() {
            match decoder.decode(&mut input) {
                Ok(Some(event)) => self.on_event(shard, id, event),
                Ok(None) => break,
                Err(e) => {
                    self.close_ws(e.close_code(), e.message());
                    return;
                }
            }
        }
        if !decoder.is_idle() && self.close.is_none() {
            self.partial = Some(Box::new(Partial::Frame(decoder)));
        }
    }

    fn on_event(&mut self, shard: &Shard, id: u64, ev: WsEvent) {
        match ev {
            WsEvent::Ping(payload) => {
                self.push_with(shard, |buf| ws::pong(&payload, buf));
            }
            WsEvent::Pong(_) => {}
            WsEvent::Close { code, .. } => {
                let echo = code.unwrap_or(1000);
                self.close_ws(echo, "");
            }
            WsEvent::Text(bytes) => self.on_message(shard, id, &bytes, Encoding::Json),
            WsEvent::Binary(bytes) => self.on_message(shard, id, &bytes, Encoding::Rkyv),
        }
    }

    fn on_message(&mut self, shard: &Shard, id: u64, bytes: &[u8], kind: Encoding) {
        ShardMetrics::inc(&shard.metrics.frames_in);
        let decoded = if kind != self.enc {
            Err(match self.enc {
                Encoding::Json => "this session speaks JSON: send text messages".to_string(),
                Encoding::Rkyv => "this session speaks rkyv: send binary messages".to_string(),
            })
        } else {
            ClientFrame::decode(self.enc, bytes).map_err(|e| e.to_string())
        };
        match self.phase {
            Phase::Handshake => unreachable!("no frames before the handshake"),
            Phase::AwaitAuth => match decoded {
                Ok(ClientFrame::Auth {
                    token,
                    device,
                    last_seq,
                }) => self.auth(shard, id, &token, device, last_seq),
                _ => {
                    self.error(
                        shard,
                        ErrorCode::Unauthenticated,
                        "the first frame must be auth",
                        None,
                    );
                    self.close_ws(4001, "not authenticated");
                }
            },
            Phase::Authenticating => {
                self.error(
                    shard,
                    ErrorCode::Unauthenticated,
                    "wait for auth_ok before sending frames",
                    None,
                );
                self.close_ws(4001, "not authenticated");
            }
            Phase::Open => match decoded {
                Ok(frame) => self.on_frame(shard, id, frame),
                Err(message) => self.bad_frame(shard, &message, None),
            },
        }
    }

    fn bad_frame(&mut self, shard: &Shard, message: &str, id: Option<String>) {
        self.bad_frames += 1;
        self.error(shard, ErrorCode::BadFrame, message, id);
        if self.bad_frames >= BAD_FRAMES_MAX {
            self.close_ws(4000, "too many bad frames");
        }
    }

    fn auth(
        &mut self,
        shard: &Shard,
        id: u64,
        token: &str,
        device: Option<String>,
        last_seq: Option<u64>,
    ) {
        let now = now_ms();
        let claims = match jwt::verify(token, &shard.jwt_secret, now / 1000) {
            Ok(c) => c,
            Err(TokenError::Expired) => {
                self.error(shard, ErrorCode::TokenExpired, "token expired", None);
                self.close_ws(4002, "token expired");
                return;
            }
            Err(TokenError::Invalid(why)) => {
                self.error(shard, ErrorCode::AuthFailed, why, None);
                self.close_ws(4001, "authentication failed");
                return;
            }
        };
        let device = device
            .or(claims.dev)
            .unwrap_or_else(|| "default".to_string());
        if !is_valid_id(&device) {
            self.error(
                shard,
                ErrorCode::AuthFailed,
                "device is not a valid id",
                None,
            );
            self.close_ws(4001, "authentication failed");
            return;
        }
        self.exp_secs = u32::try_from(claims.exp).unwrap_or(u32::MAX);
        let queued = shard.to_pipeline(Request::Open {
            conn: shard.conn_ref(id),
            user: claims.sub,
            device,
            last_seq,
        });
        if queued {
            self.phase = Phase::Authenticating;
        } else {
            self.error(
                shard,
                ErrorCode::Unavailable,
                "server overloaded, retry later",
                None,
            );
            self.close_ws(1011, "overloaded");
        }
    }

    fn on_frame(&mut self, shard: &Shard, id: u64, frame: ClientFrame) {
        match frame {
            ClientFrame::Auth { .. } => self.bad_frame(shard, "already authenticated", None),
            ClientFrame::Ping => {
                self.bad_frames = 0;
                self.push(shard, &ServerFrame::Pong);
            }
            ClientFrame::Ack { seq } => {
                self.bad_frames = 0;
                shard.to_pipeline(Request::Ack {
                    conn: shard.conn_ref(id),
                    seq,
                });
            }
            ClientFrame::Sync { after, limit } => {
                if !(1..=1000).contains(&limit) {
                    self.bad_frame(shard, "sync.limit must be 1..=1000", None);
                    return;
                }
                self.bad_frames = 0;
                shard.to_pipeline(Request::Sync {
                    conn: shard.conn_ref(id),
                    after,
                    limit,
                });
            }
            ClientFrame::Send {
                id: msg_id,
                to,
                body,
            } => self.send(shard, id, msg_id, to, body),
        }
    }

    fn send(&mut self, shard: &Shard, id: u64, msg_id: String, to: Target, body: String) {
        if !is_valid_id(&msg_id) {
            self.bad_frame(
                shard,
                "send.id must be 1..=64 characters of [A-Za-z0-9_.@:-]",
                None,
            );
            return;
        }
        let target_ok = match &to {
            Target::User(u) => is_valid_id(u),
            Target::Group(g) => is_valid_id(g),
        };
        if !target_ok {
            self.bad_frame(
                shard,
                "send.to names an invalid user or group id",
                Some(msg_id),
            );
            return;
        }
        self.bad_frames = 0;
        if body.len() > shard.limits.max_body_bytes {
            let message = format!(
                "body is {} bytes, the limit is {}",
                body.len(),
                shard.limits.max_body_bytes
            );
            self.error(shard, ErrorCode::TooLarge, &message, Some(msg_id));
            return;
        }
        if !self.take_send_token(shard) {
            self.error(
                shard,
                ErrorCode::RateLimited,
                "too many sends per second on this connection",
                Some(msg_id),
            );
            return;
        }
        let req = Request::Send {
            conn: shard.conn_ref(id),
            id: msg_id,
            to,
            body,
        };
        match shard.try_send_to_pipeline(req) {
            Ok(()) => ShardMetrics::inc(&shard.metrics.sends),
            Err(Request::Send { id: msg_id, .. }) => self.error(
                shard,
                ErrorCode::Unavailable,
                "the pipeline is overloaded; retry with the same id",
                Some(msg_id),
            ),
            Err(_) => unreachable!("the request given back is the send"),
        }
    }

    /// The send rate limit: `sends_per_sec`, in bursts of up to as many. This is the
    /// generic cell rate algorithm, a token bucket of that rate and size kept as one
    /// number (the time the bucket is full again, less a burst).
    fn take_send_token(&mut self, shard: &Shard) -> bool {
        let rate = u64::from(shard.limits.sends_per_sec.max(1));
        let interval_ns = 1_000_000_000 / rate;
        let burst_ns = interval_ns * (rate - 1);
        let now_ns = now_ms().saturating_mul(1_000_000);
        let tat = self.send_tat_ns.max(now_ns);
        if tat - now_ns > burst_ns {
            return false;
        }
        self.send_tat_ns = tat + interval_ns;
        true
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    use super::*;
    use crate::config::Limits;

    fn test_shard() -> Rc<Shard> {
        let (mut to_pipeline, _requests) =
            flare_shard::mailbox::mailbox::<Request>(1, 16).expect("mailbox");
        Rc::new(Shard::new(
            0,
            Rc::from("n"),
            Limits::default(),
            Vec::new(),
            to_pipeline.pop().expect("one sender"),
            Arc::new(ShardMetrics::default()),
            Arc::new(AtomicBool::new(false)),
        ))
    }

    fn block_on<F: Future>(f: F) -> F::Output {
        monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    fn set_buffer(fd: RawFd, option: libc::c_int, bytes: libc::c_int) {
        // SAFETY: setsockopt reads an int of the given size from a live local.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                (&bytes as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "setsockopt: {}", io::Error::last_os_error());
    }

    /// The pool keeps a burst's worth of queues, more than any fixed count of them,
    /// up to its byte bound; it keeps no buffer past the largest size, and a queue
    /// taken from it comes back empty.
    #[test]
    fn the_queue_pool_is_bounded_by_bytes() {
        let queue = |bytes: usize| {
            let mut out = Box::<Outbound>::default();
            out.buf.reserve_exact(bytes);
            out.buf.extend_from_slice(b"abc");
            out.written = 2;
            out
        };
        let pool = OutPool::default();
        pool.give(queue(OUT_POOL_BUF_BYTES + 1));
        assert_eq!(
            pool.bytes.get(),
            0,
            "a buffer past the largest size is freed"
        );

        let each = queue(64 << 10).pooled_bytes();
        let fits = OUT_POOL_BYTES / each;
        assert!(fits > 1000, "64 KiB on each of a thousand connections fits");
        for _ in 0..fits + 10 {
            pool.give(queue(64 << 10));
        }
        assert_eq!(pool.free.borrow().len(), fits);
        assert_eq!(pool.bytes.get(), fits * each);
        assert!(pool.bytes.get() <= OUT_POOL_BYTES);

        let out = pool.take();
        assert_eq!((out.buf.len(), out.written, out.unit_end), (0, 0, 0));
        assert!(out.buf.capacity() >= 64 << 10, "its grown buffer is reused");
        assert_eq!(pool.bytes.get(), (fits - 1) * each);
    }

    /// A trim frees the queues that stayed in the pool since the last one, and keeps
    /// as many as were taken meanwhile.
    #[test]
    fn a_trim_frees_what_was_not_taken_since_the_last() {
        let pool = OutPool::default();
        let give = |n: usize| {
            for _ in 0..n {
                let mut out = Box::<Outbound>::default();
                out.buf.reserve_exact(1000);
                pool.give(out);
            }
        };
        give(10);
        pool.trim();
        assert_eq!(
            pool.free.borrow().len(),
            10,
            "the first trim only starts counting"
        );
        // Three taken and given back: seven of the ten were never needed.
        let taken: Vec<_> = (0..3).map(|_| pool.take()).collect();
        for out in taken {
            pool.give(out);
        }
        pool.trim();
        assert_eq!(pool.free.borrow().len(), 3);
        assert_eq!(pool.bytes.get(), 3 * pool.free.borrow()[0].pooled_bytes());
        // Nothing taken since: the rest goes.
        pool.trim();
        assert_eq!((pool.free.borrow().len(), pool.bytes.get()), (0, 0));
        // A take that empties the pool: the next trim frees nothing.
        give(1);
        drop(pool.take());
        give(2);
        pool.trim();
        assert_eq!(pool.free.borrow().len(), 2);
    }

    /// The queue cuts only between messages: after the HTTP answer, after the message
    /// being written, and it keeps that through compaction.
    #[test]
    fn the_outbound_queue_cuts_only_between_messages() {
        let answer = b"HTTP/1.1 101 Switching Protocols\r\n\r\n";
        let message = |n: usize, byte: u8| {
            let mut m = Vec::new();
            ws::binary(&vec![byte; n], &mut m);
            m
        };
        let (small, big) = (message(100, 1), message(70_000, 2));
        let mut out = Outbound::default();
        out.buf.extend_from_slice(answer);
        out.unit_end = out.buf.len();
        out.buf.extend_from_slice(&small);
        out.buf.extend_from_slice(&small);
        // Part of the answer written: only the answer stays.
        out.wrote(5);
        out.drop_unwritten();
        assert_eq!(out.buf, answer);

        out.buf.extend_from_slice(&small);
        out.buf.extend_from_slice(&big);
        out.buf.extend_from_slice(&small);
        // The answer, the first message and part of the big one written: the big one's
        // rest stays, the last message goes.
        out.wrote(answer.len() - 5 + small.len() + 10);
        out.drop_unwritten();
        assert_eq!(out.buf.len(), answer.len() + small.len() + big.len());
        assert_eq!(out.queued(), big.len() - 10);

        // Written past COMPACT_AFTER_BYTES and half the buffer: the written part goes,
        // and a later cut still lands at the end of the message being written.
        out.buf.extend_from_slice(&small);
        let big_end = answer.len() + small.len() + big.len();
        let at = out.written + 66_000;
        assert!(at >= COMPACT_AFTER_BYTES && at < big_end);
        out.wrote(66_000);
        assert_eq!(out.written, 0, "compacted");
        assert_eq!(out.buf.len(), big_end - at + small.len());
        out.drop_unwritten();
        assert_eq!(out.buf.len(), big_end - at);
        assert!(out.buf.iter().all(|&b| b == 2));
    }

    /// A close requested while the peer reads nothing goes to `finish` (which flushes
    /// with a deadline) instead of waiting for the queue to drain.
    #[test]
    fn a_close_goes_ahead_of_a_queue_the_peer_does_not_read() {
        let shard = test_shard();
        block_on(async {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("address");
            let stream = monoio::net::TcpStream::connect(addr)
                .await
                .expect("connect");
            let (peer, _) = listener.accept().expect("accept");
            set_buffer(peer.as_raw_fd(), libc::SO_RCVBUF, 4096);
            let conn = Conn::accept(&shard, stream).expect("accept");
            set_buffer(conn.fd(), libc::SO_SNDBUF, 4096);
            conn.st.borrow_mut().push_http(&shard, &vec![0; 4 << 20]);
            assert!(
                !conn.write_some(&shard).expect("write"),
                "the peer reads nothing"
            );
            assert!(matches!(conn.next_step(&shard), Ok(Step::Flush)));
            conn.st.borrow_mut().close_ws(1001, "going away");
            assert!(matches!(
                conn.next_step(&shard),
                Ok(Step::Finish(Close::Ws(1001, _)))
            ));
            drop(peer);
        });
    }

    /// DESIGN.md §6: an idle authenticated connection costs at most 1 KiB. In the
    /// gateway it is two allocations, its `Conn` (in an `Rc`) and its task (this
    /// future plus monoio's task header, 48 bytes), besides monoio's shared fd and
    /// readiness op. These bounds are today's sizes: raise one only with the
    /// README's memory measurement redone.
    #[test]
    fn an_idle_connection_is_small() {
        assert!(
            std::mem::size_of::<Conn>() <= 104,
            "Conn is {} bytes",
            std::mem::size_of::<Conn>()
        );
        let shard = test_shard();
        let task_bytes = block_on(async {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("address");
            let stream = monoio::net::TcpStream::connect(addr)
                .await
                .expect("connect");
            let conn = Conn::accept(&shard, stream).expect("accept");
            std::mem::size_of_val(&serve(shard.clone(), conn))
        });
        assert!(
            task_bytes <= 176,
            "a connection's task is {task_bytes} bytes"
        );
    }
}
