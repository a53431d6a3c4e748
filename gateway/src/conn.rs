//! One client connection: WebSocket handshake, frame loop, session, outbound queue.
//!
//! A connection is one monoio task that waits for *readiness* (not for a read with
//! a buffer of its own), then reads into the shard's shared buffer with non-blocking
//! `recv`: an idle connection holds no read or write buffer (DESIGN.md §6). Bytes of
//! an incomplete frame are the only thing kept between reads. Outbound frames wait
//! in a bounded queue (`outbound_bytes_max`, overflow closes with 4008) and are
//! written with `sendmsg` straight from the queue. Timeouts live in the shard's
//! timer wheel, one entry per connection.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

use flare_codec::frame::{ClientFrame, Encoding, ErrorCode, GoawayReason, ServerFrame, Target};
use flare_codec::ids::is_valid_id;
use flare_codec::ws::{self, WsDecoder, WsEvent};
use flare_codec::Decoded;
use flare_pipeline::api::{Entry, Request};

use crate::jwt::{self, TokenError};
use crate::metrics::ShardMetrics;
use crate::notify::Notify;
use crate::shard::{msg_frame, now_ms, ws_message, Shard};

/// Bad frames in a row that close a connection with 4000.
const BAD_FRAMES_MAX: u8 = 10;
/// How long a closing connection may take to flush and say goodbye.
const CLOSE_FLUSH_MS: u64 = 2_000;
const CLOSE_LINGER_MS: u64 = 1_000;
/// iovecs handed to one `sendmsg`.
const IOV_MAX: usize = 64;

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

struct Session {
    user: String,
    device: String,
    exp_ms: u64,
    /// Highest `seq` written to this connection (catch-up or live).
    delivered: u64,
    /// Caught up: live entries go out as they come.
    live: bool,
}

struct ConnState {
    phase: Phase,
    enc: Encoding,
    decoder: Option<WsDecoder>,
    /// Bytes of an incomplete upgrade request; empty (no allocation) once upgraded.
    partial: Vec<u8>,
    out: VecDeque<Vec<u8>>,
    out_bytes: usize,
    /// Bytes of `out.front()` already written.
    front_written: usize,
    close: Option<Close>,
    accepted_ms: u64,
    last_rx_ms: u64,
    bad_frames: u8,
    send_tokens: f64,
    tokens_at_ms: u64,
    session: Option<Box<Session>>,
    /// After the queue is flushed, ask the pipeline for the catch-up page after this seq.
    catch_up_after: Option<u64>,
    /// The pipeline knows this connection (it got `Open`): tell it when we go.
    registered: bool,
}

pub struct Conn {
    id: Cell<u64>,
    fd: RawFd,
    st: RefCell<ConnState>,
    wake: Notify,
}

/// Serves one accepted TCP connection until it closes.
pub async fn serve(shard: Rc<Shard>, stream: monoio::net::TcpStream) {
    let now = now_ms();
    let conn = Rc::new(Conn {
        id: Cell::new(0),
        fd: stream.as_raw_fd(),
        st: RefCell::new(ConnState {
            phase: Phase::Handshake,
            enc: Encoding::Json,
            decoder: None,
            partial: Vec::new(),
            out: VecDeque::new(),
            out_bytes: 0,
            front_written: 0,
            close: None,
            accepted_ms: now,
            last_rx_ms: now,
            bad_frames: 0,
            send_tokens: f64::from(shard.limits.sends_per_sec),
            tokens_at_ms: now,
            session: None,
            catch_up_after: None,
            registered: false,
        }),
        wake: Notify::default(),
    });
    let id = shard.conns.borrow_mut().insert(conn.clone());
    conn.id.set(id);
    ShardMetrics::inc(&shard.metrics.connections_open);
    shard.schedule(id, now + shard.limits.auth_timeout_ms);

    if let Err(e) = conn.run(&shard, &stream).await {
        tracing::debug!(shard = shard.index, conn = id, error = %e, "connection ended with an error");
    }

    shard.conns.borrow_mut().remove(id);
    ShardMetrics::dec(&shard.metrics.connections_open);
    let st = conn.st.borrow();
    if st.phase == Phase::Open {
        ShardMetrics::dec(&shard.metrics.sessions_open);
    }
    if st.registered {
        shard.to_pipeline(Request::Closed {
            conn: shard.conn_ref(id),
        });
    }
}

impl Conn {
    pub fn phase(&self) -> Phase {
        self.st.borrow().phase
    }

    async fn run(&self, shard: &Shard, stream: &monoio::net::TcpStream) -> io::Result<()> {
        loop {
            if !self.write_some(shard)? {
                // The peer is not reading: wait for it in a boxed future, so an idle
                // connection's task holds only the readiness wait below.
                Box::pin(self.flush(shard, stream)).await?;
            }
            let catch_up = self.st.borrow_mut().catch_up_after.take();
            if let Some(after) = catch_up {
                shard.to_pipeline(Request::CatchUp {
                    conn: shard.conn_ref(self.id.get()),
                    after,
                });
            }
            let close = self.st.borrow().close;
            if let Some(close) = close {
                // Boxed: the closing path's state would otherwise sit in every idle
                // connection's task (DESIGN.md §6).
                Box::pin(self.finish(shard, stream, close)).await;
                return Ok(());
            }
            monoio::select! {
                r = stream.readable(false) => {
                    r?;
                    if !self.read_ready(shard)? {
                        return Ok(());
                    }
                }
                _ = self.wake.notified() => {}
            }
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
                    self.fd,
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
            self.st
                .borrow_mut()
                .on_bytes(shard, self.id.get(), &buf[..n]);
            if self.st.borrow().close.is_some() || n < buf.len() {
                return Ok(true);
            }
        }
    }

    /// Writes the queue until it is empty, or until a close is requested while the
    /// peer is not reading (then `finish` takes over with its own deadline).
    async fn flush(&self, shard: &Shard, stream: &monoio::net::TcpStream) -> io::Result<()> {
        loop {
            if self.write_some(shard)? {
                return Ok(());
            }
            if self.st.borrow().close.is_some() {
                return Ok(());
            }
            monoio::select! {
                r = stream.writable(false) => r?,
                _ = self.wake.notified() => {}
            }
        }
    }

    /// One non-blocking `sendmsg` round. Returns true when the queue is empty.
    fn write_some(&self, shard: &Shard) -> io::Result<bool> {
        let mut st = self.st.borrow_mut();
        loop {
            if st.out.is_empty() {
                return Ok(true);
            }
            let mut iov: [libc::iovec; IOV_MAX] = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; IOV_MAX];
            let mut count = 0;
            for (i, frame) in st.out.iter().take(IOV_MAX).enumerate() {
                let skip = if i == 0 { st.front_written } else { 0 };
                iov[i] = libc::iovec {
                    iov_base: frame[skip..].as_ptr() as *mut libc::c_void,
                    iov_len: frame.len() - skip,
                };
                count += 1;
            }
            // SAFETY: an all-zero msghdr is valid; we point it at `count` iovecs that
            // borrow frames of `st.out`, which stays borrowed and unchanged until
            // sendmsg returns.
            let n = unsafe {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = iov.as_mut_ptr();
                msg.msg_iovlen = count as _;
                libc::sendmsg(self.fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(false),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(e),
                };
            }
            let mut n = n as usize;
            ShardMetrics::add(&shard.metrics.bytes_out, n as u64);
            st.out_bytes -= n;
            while n > 0 {
                let front_left = st.out.front().map(|f| f.len()).unwrap_or(0) - st.front_written;
                if n >= front_left {
                    n -= front_left;
                    st.out.pop_front();
                    st.front_written = 0;
                } else {
                    st.front_written += n;
                    n = 0;
                }
            }
        }
    }

    /// Flushes, sends the close frame, half-closes, and lingers briefly for the peer.
    async fn finish(&self, shard: &Shard, stream: &monoio::net::TcpStream, close: Close) {
        if let Close::Ws(code, reason) = close {
            let mut st = self.st.borrow_mut();
            let mut frame = Vec::with_capacity(2 + reason.len() + 4);
            ws::close(code, reason, &mut frame);
            st.out_bytes += frame.len();
            st.out.push_back(frame);
        }
        let flushed = monoio::time::timeout(Duration::from_millis(CLOSE_FLUSH_MS), async {
            loop {
                match self.write_some(shard) {
                    Ok(true) => return true,
                    Ok(false) => {
                        if stream.writable(false).await.is_err() {
                            return false;
                        }
                    }
                    Err(_) => return false,
                }
            }
        })
        .await;
        // SAFETY: plain syscall on our own open socket.
        unsafe { libc::shutdown(self.fd, libc::SHUT_WR) };
        if matches!(flushed, Ok(true)) {
            let _ = monoio::time::timeout(Duration::from_millis(CLOSE_LINGER_MS), async {
                let mut sink = [0u8; 512];
                loop {
                    if stream.readable(false).await.is_err() {
                        return;
                    }
                    // SAFETY: `sink` is a live local buffer of the given length.
                    let n = unsafe {
                        libc::recv(
                            self.fd,
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
        self.wake.notify();
    }

    pub fn push_error(&self, shard: &Shard, code: ErrorCode, message: &str, id: Option<String>) {
        self.st.borrow_mut().error(shard, code, message, id);
        self.wake.notify();
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
        self.wake.notify();
    }

    pub fn request_close(&self, _shard: &Shard, code: u16, text: &'static str) {
        let mut st = self.st.borrow_mut();
        if st.phase == Phase::Handshake {
            st.close.get_or_insert(Close::Raw);
        } else {
            st.close_ws(code, text);
        }
        drop(st);
        self.wake.notify();
    }

    pub fn on_opened(&self, shard: &Shard, head_seq: u64, entries: Vec<Entry>, caught_up: bool) {
        let mut st = self.st.borrow_mut();
        if st.phase != Phase::Authenticating || st.close.is_some() {
            return;
        }
        st.phase = Phase::Open;
        ShardMetrics::inc(&shard.metrics.sessions_open);
        let (user, device) = {
            let s = st
                .session
                .as_ref()
                .expect("an authenticating connection has a session");
            (s.user.clone(), s.device.clone())
        };
        st.push(
            shard,
            &ServerFrame::AuthOk {
                user,
                device,
                session: shard.next_session_id(),
                node: shard.node.to_string(),
                head_seq,
                heartbeat_ms: shard.limits.heartbeat_ms,
            },
        );
        st.page(shard, &entries, caught_up);
        drop(st);
        self.wake.notify();
    }

    pub fn on_catch_up(&self, shard: &Shard, entries: Vec<Entry>, caught_up: bool) {
        let mut st = self.st.borrow_mut();
        if st.phase != Phase::Open {
            return;
        }
        st.page(shard, &entries, caught_up);
        drop(st);
        self.wake.notify();
    }

    pub fn on_live(&self, shard: &Shard, entry: &Entry) {
        let mut st = self.st.borrow_mut();
        if st.phase != Phase::Open {
            return;
        }
        let Some(s) = st.session.as_mut() else { return };
        if !s.live || entry.seq <= s.delivered {
            return;
        }
        s.delivered = entry.seq;
        st.push(shard, &msg_frame(entry));
        drop(st);
        self.wake.notify();
    }

    pub fn on_timer(&self, shard: &Shard, now: u64) {
        let mut st = self.st.borrow_mut();
        if st.close.is_some() {
            return;
        }
        let id = self.id.get();
        let next = match st.phase {
            Phase::Handshake | Phase::AwaitAuth | Phase::Authenticating => {
                let deadline = st.accepted_ms + shard.limits.auth_timeout_ms;
                if now >= deadline {
                    if st.phase == Phase::Handshake {
                        st.close = Some(Close::Raw);
                    } else {
                        st.close_ws(4001, "authentication timeout");
                    }
                    None
                } else {
                    Some(deadline)
                }
            }
            Phase::Open => {
                let idle_deadline = st.last_rx_ms + 3 * shard.limits.heartbeat_ms;
                let exp_ms = st.session.as_ref().map(|s| s.exp_ms).unwrap_or(u64::MAX);
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
            None => self.wake.notify(),
        }
    }
}

impl ConnState {
    fn close_ws(&mut self, code: u16, text: &'static str) {
        if self.close.is_none() {
            self.close = Some(Close::Ws(code, text));
        }
    }

    fn push(&mut self, shard: &Shard, frame: &ServerFrame) {
        if matches!(frame, ServerFrame::Error { .. }) {
            ShardMetrics::inc(&shard.metrics.errors_sent);
        }
        let bytes = ws_message(frame, self.enc);
        self.push_bytes(shard, bytes);
    }

    fn push_bytes(&mut self, shard: &Shard, bytes: Vec<u8>) {
        if self.close.is_some() {
            return;
        }
        if self.out_bytes + bytes.len() > shard.limits.outbound_bytes_max {
            // Slow consumer: drop what it has not read (but never half a frame) and close.
            ShardMetrics::inc(&shard.metrics.slow_consumer_closes);
            let keep = if self.front_written > 0 { 1 } else { 0 };
            while self.out.len() > keep {
                let f = self.out.pop_back().expect("len checked");
                self.out_bytes -= f.len();
            }
            self.close = Some(Close::Ws(4008, "slow consumer"));
            return;
        }
        ShardMetrics::inc(&shard.metrics.frames_out);
        self.out_bytes += bytes.len();
        self.out.push_back(bytes);
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
        let mut delivered = self.session.as_ref().map(|s| s.delivered).unwrap_or(0);
        for e in entries {
            if e.seq > delivered {
                delivered = e.seq;
                self.push(shard, &msg_frame(e));
            }
        }
        let s = self
            .session
            .as_mut()
            .expect("an open connection has a session");
        s.delivered = delivered;
        if caught_up {
            s.live = true;
        } else {
            self.catch_up_after = Some(delivered);
        }
    }

    fn on_bytes(&mut self, shard: &Shard, id: u64, bytes: &[u8]) {
        self.last_rx_ms = now_ms();
        if self.phase == Phase::Handshake {
            self.partial.extend_from_slice(bytes);
            let data = std::mem::take(&mut self.partial);
            let consumed = self.handshake(shard, &data);
            if let Some(consumed) = consumed {
                if consumed < data.len() {
                    self.frames(shard, id, &data[consumed..]);
                }
            }
            return;
        }
        self.frames(shard, id, bytes);
    }

    /// Parses the upgrade request in `data`. Returns how many bytes it used once the
    /// WebSocket is open; keeps `data` in `partial` while incomplete.
    fn handshake(&mut self, shard: &Shard, data: &[u8]) -> Option<usize> {
        let max = shard.limits.max_handshake_bytes;
        match ws::parse_upgrade(data, max) {
            Ok(Decoded::Insufficient) => {
                self.partial = data.to_vec();
                None
            }
            Ok(Decoded::Complete { value, consumed }) => match value.accept() {
                Ok(accepted) => {
                    self.enc = accepted.encoding;
                    self.push_raw(accepted.response);
                    self.decoder = Some(WsDecoder::new(
                        ws::Role::Server,
                        shard.limits.max_frame_bytes,
                    ));
                    self.phase = Phase::AwaitAuth;
                    Some(consumed)
                }
                Err(e) => {
                    self.http_error(e);
                    None
                }
            },
            Err(e) => {
                self.http_error(e);
                None
            }
        }
    }

    fn push_raw(&mut self, bytes: Vec<u8>) {
        self.out_bytes += bytes.len();
        self.out.push_back(bytes);
    }

    fn http_error(&mut self, e: ws::HandshakeError) {
        self.push_raw(e.response());
        self.close = Some(Close::Raw);
    }

    fn frames(&mut self, shard: &Shard, id: u64, data: &[u8]) {
        let mut input = data;
        while !input.is_empty() && self.close.is_none() {
            let decoder = self
                .decoder
                .as_mut()
                .expect("frames are decoded after the handshake");
            match decoder.decode(&mut input) {
                Ok(Some(event)) => self.on_event(shard, id, event),
                Ok(None) => break,
                Err(e) => {
                    self.close_ws(e.close_code(), e.message());
                    return;
                }
            }
        }
    }

    fn on_event(&mut self, shard: &Shard, id: u64, ev: WsEvent) {
        match ev {
            WsEvent::Ping(payload) => {
                let mut out = Vec::with_capacity(payload.len() + 2);
                ws::pong(&payload, &mut out);
                self.push_bytes(shard, out);
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
        self.session = Some(Box::new(Session {
            user: claims.sub.clone(),
            device: device.clone(),
            exp_ms: claims.exp.saturating_mul(1000),
            delivered: 0,
            live: false,
        }));
        self.phase = Phase::Authenticating;
        let queued = shard.to_pipeline(Request::Open {
            conn: shard.conn_ref(id),
            user: claims.sub,
            device,
            last_seq,
        });
        if queued {
            self.registered = true;
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

    fn take_send_token(&mut self, shard: &Shard) -> bool {
        let rate = f64::from(shard.limits.sends_per_sec);
        let now = now_ms();
        let elapsed = now.saturating_sub(self.tokens_at_ms) as f64 / 1000.0;
        self.tokens_at_ms = now;
        self.send_tokens = (self.send_tokens + elapsed * rate).min(rate);
        if self.send_tokens >= 1.0 {
            self.send_tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
