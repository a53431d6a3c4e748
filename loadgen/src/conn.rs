//! One load-generator connection on a monoio runtime: connect (optionally from a
//! given source address), WebSocket handshake, `auth`, then frames in and out until
//! either side closes.
//!
//! A connection is cheap while idle: it waits for readiness with no buffer, reads into
//! the worker thread's one read buffer, and holds bytes of its own only for a frame
//! that is not complete yet or for output the kernel did not take. Sends go straight
//! to the socket (`send(2)`, non-blocking) from whoever sends — the scheduler of a
//! scenario — so a send costs no task switch; only what the kernel refuses waits in
//! the connection's queue for its task to flush.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use monoio::net::TcpStream;
use socket2::{Domain, Protocol, Socket, Type};

use crate::cli::TargetKind;
use crate::clock::mono_ns;
use crate::proto::{self, BadServerFrame, Encoding, Incoming, Outgoing};
use crate::{raw, ws};

/// Bytes of the worker thread's read buffer.
const READ_BUF_BYTES: usize = 64 * 1024;

/// The close code of a normal closure (RFC 6455 §7.4.1).
const CLOSE_NORMAL: u16 = 1000;

/// How long a closing connection waits for the server to finish the close handshake.
const CLOSE_WAIT: Duration = Duration::from_secs(3);

thread_local! {
    static READ_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0u8; READ_BUF_BYTES]);
    static SCRATCH: RefCell<(Vec<u8>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let t = mono_ns();
    let tid = std::thread::current().id();
    let h = format!("{tid:?}")
        .bytes()
        .fold(t, |a, b| a.rotate_left(5) ^ b as u64);
    h | 1
}

/// A fast non-cryptographic random number (masking keys, handshake keys): xorshift64*.
pub fn rand_u64() -> u64 {
    RNG.with(|r| {
        let mut x = r.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        r.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}

/// A single-waiter wake-up flag (the connection's own task is the only waiter).
#[derive(Default)]
pub struct Notify {
    set: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Notify {
    pub fn notify(&self) {
        self.set.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    pub fn notified(&self) -> Notified<'_> {
        Notified(self)
    }
}

pub struct Notified<'a>(&'a Notify);

impl Future for Notified<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.set.replace(false) {
            return Poll::Ready(());
        }
        *self.0.waker.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// What a connection is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Setup,
    Open,
    Ended,
}

/// The per-connection state shared by its task and the scenario.
pub struct Conn {
    /// The scenario's index of this connection in its worker.
    pub index: usize,
    fd: Cell<RawFd>,
    state: Cell<State>,
    closing: Cell<bool>,
    broken: Cell<bool>,
    /// Bytes the kernel did not take yet; empty (no allocation) when idle.
    out: RefCell<Vec<u8>>,
    dec: RefCell<ws::Decoder>,
    wake: Notify,
    last_send_ns: Cell<u64>,
    heartbeat_ms: Cell<u64>,
}

impl Conn {
    pub fn new(index: usize) -> Rc<Conn> {
        Rc::new(Conn {
            index,
            fd: Cell::new(-1),
            state: Cell::new(State::Setup),
            closing: Cell::new(false),
            broken: Cell::new(false),
            out: RefCell::new(Vec::new()),
            dec: RefCell::new(ws::Decoder::new()),
            wake: Notify::default(),
            last_send_ns: Cell::new(0),
            heartbeat_ms: Cell::new(0),
        })
    }

    /// Marks the connection over before its socket is closed, so nothing can write to
    /// the number once the kernel reuses it.
    fn end(&self) {
        self.state.set(State::Ended);
        self.broken.set(true);
        self.fd.set(-1);
        *self.out.borrow_mut() = Vec::new();
        *self.dec.borrow_mut() = ws::Decoder::new();
    }

    pub fn state(&self) -> State {
        self.state.get()
    }

    pub fn is_open(&self) -> bool {
        self.state.get() == State::Open && !self.closing.get() && !self.broken.get()
    }

    /// Asks the connection's task to close (close frame 1000, then wait for the server).
    pub fn close(&self) {
        self.closing.set(true);
        self.wake.notify();
    }

    /// Sends one protocol frame. False when the connection cannot send any more.
    pub fn send(&self, enc: Encoding, frame: &Outgoing<'_>) -> bool {
        if self.broken.get() || self.fd.get() < 0 {
            return false;
        }
        SCRATCH.with(|s| {
            let (payload, framed) = &mut *s.borrow_mut();
            payload.clear();
            framed.clear();
            proto::encode(enc, frame, payload);
            let opcode = match enc {
                Encoding::Json => ws::Opcode::Text,
                Encoding::Rkyv => ws::Opcode::Binary,
            };
            ws::encode_frame(opcode, payload, mask(), framed);
            self.send_bytes(framed)
        })
    }

    /// Sends one text message as it is (raw-ws rooms). False when the connection
    /// cannot send any more.
    pub fn send_text(&self, text: &str) -> bool {
        if self.broken.get() || self.fd.get() < 0 {
            return false;
        }
        SCRATCH.with(|s| {
            let (_, framed) = &mut *s.borrow_mut();
            framed.clear();
            ws::encode_frame(ws::Opcode::Text, text.as_bytes(), mask(), framed);
            self.send_bytes(framed)
        })
    }

    /// Sends a protocol `ping` if nothing was sent for half the heartbeat interval.
    pub fn ping_if_idle(&self, enc: Encoding, now_ns: u64) {
        let hb = self.heartbeat_ms.get();
        if hb > 0
            && self.is_open()
            && now_ns.saturating_sub(self.last_send_ns.get()) >= hb * 500_000
        {
            self.send(enc, &Outgoing::Ping);
        }
    }

    fn send_bytes(&self, bytes: &[u8]) -> bool {
        self.last_send_ns.set(mono_ns());
        send_or_mark_broken(self.fd.get(), &self.out, &self.wake, &self.broken, bytes)
    }

    /// Writes queued output. Ok(true) when the queue is empty.
    fn flush(&self) -> io::Result<bool> {
        flush_queue(self.fd.get(), &mut self.out.borrow_mut())
    }
}

/// Sends `bytes` now unless earlier bytes wait in `out`, and queues what the socket does
/// not take. Ok(true) when `out` went from empty to not: the writer must be woken to
/// wait for writability. Err when the connection failed.
pub(crate) fn send_or_queue(fd: RawFd, out: &mut Vec<u8>, mut bytes: &[u8]) -> io::Result<bool> {
    if !out.is_empty() {
        out.extend_from_slice(bytes);
        return Ok(false);
    }
    while !bytes.is_empty() {
        match raw_send(fd, bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    out.extend_from_slice(bytes);
    Ok(!bytes.is_empty())
}

/// Writes from the front of `out` until the socket is full; frees `out` once all of it
/// is written. Ok(true) when it is.
pub(crate) fn flush_queue(fd: RawFd, out: &mut Vec<u8>) -> io::Result<bool> {
    let mut done = 0;
    while done < out.len() {
        match raw_send(fd, &out[done..]) {
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    if done == out.len() {
        *out = Vec::new();
        Ok(true)
    } else {
        out.drain(..done);
        Ok(false)
    }
}

fn mask() -> [u8; 4] {
    (rand_u64() as u32).to_ne_bytes()
}

/// One non-blocking `send(2)` (retried on EINTR).
pub(crate) fn raw_send(fd: RawFd, bytes: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `bytes` is a live slice of the given length; send(2) only reads it.
        let n = unsafe {
            libc::send(
                fd,
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// [`send_or_queue`] for a connection's owner: wakes the writer when `out` starts to
/// hold bytes; on failure marks the connection `broken`, wakes the writer to notice,
/// and returns false.
pub(crate) fn send_or_mark_broken(
    fd: RawFd,
    out: &RefCell<Vec<u8>>,
    wake: &Notify,
    broken: &Cell<bool>,
    bytes: &[u8],
) -> bool {
    match send_or_queue(fd, &mut out.borrow_mut(), bytes) {
        Ok(false) => true,
        Ok(true) => {
            wake.notify();
            true
        }
        Err(_) => {
            broken.set(true);
            wake.notify();
            false
        }
    }
}

/// Reads everything the socket has into the thread's buffer and feeds `on_bytes`,
/// until it returns false or a read comes back short. Ok(false) at end of stream.
pub(crate) fn read_available(
    fd: RawFd,
    mut on_bytes: impl FnMut(&[u8]) -> bool,
) -> io::Result<bool> {
    READ_BUF.with(|b| {
        let mut buf = b.borrow_mut();
        loop {
            // SAFETY: `buf` is a live, exclusively borrowed allocation of `buf.len()`
            // bytes; recv(2) writes at most that many, and we read only what it reports.
            let n =
                unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => return Ok(true),
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(e),
                }
            }
            if n == 0 {
                return Ok(false);
            }
            let n = n as usize;
            if !on_bytes(&buf[..n]) || n < buf.len() {
                return Ok(true);
            }
        }
    })
}

/// The failure reason of an I/O error, as reports name it.
pub fn io_reason(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "refused".into(),
        Some(libc::ETIMEDOUT) => "tcp_timeout".into(),
        Some(libc::ECONNRESET) => "reset".into(),
        Some(libc::EPIPE) => "broken_pipe".into(),
        Some(libc::EADDRNOTAVAIL) => "addr_not_available".into(),
        Some(libc::EADDRINUSE) => "addr_in_use".into(),
        Some(libc::EMFILE) | Some(libc::ENFILE) => "too_many_open_files".into(),
        Some(libc::EHOSTUNREACH) | Some(libc::ENETUNREACH) => "unreachable".into(),
        Some(n) => format!("errno_{n}"),
        None => format!("io_{:?}", e.kind()).to_lowercase(),
    }
}

/// Where and how connections connect.
#[derive(Debug, Clone)]
pub struct Target {
    pub kind: TargetKind,
    pub addr: SocketAddr,
    /// The `Host` header.
    pub host: String,
    pub path: String,
    pub encoding: Encoding,
    pub connect_timeout: Duration,
}

impl Target {
    /// Reads one server message in this target's protocol.
    fn decode<'a>(&self, is_text: bool, bytes: &'a [u8]) -> Result<Incoming<'a>, BadServerFrame> {
        match self.kind {
            TargetKind::Flare => proto::decode(self.encoding, is_text, bytes),
            TargetKind::RawWs => raw::decode(is_text, bytes),
        }
    }
}

/// How a connection opens its session once the WebSocket is up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Login {
    /// Flare: `auth` with this token, then wait for `auth_ok`.
    Token(String),
    /// raw-ws: the room to join, a path below the URL's; open once upgraded.
    Room(String),
}

/// What a connection's owner hears from it.
pub trait Handler {
    /// `auth_ok` arrived: the session is open. `started_ns` is when the attempt was
    /// scheduled.
    fn on_open(&self, conn: &Rc<Conn>, head_seq: u64, started_ns: u64, now_ns: u64);
    /// The attempt failed before `auth_ok`, for `reason`.
    fn on_setup_failed(&self, conn: &Rc<Conn>, reason: String);
    /// A frame of the open session.
    fn on_frame(&self, conn: &Rc<Conn>, frame: Incoming<'_>, now_ns: u64);
    /// A server frame that was not valid in the session's encoding.
    fn on_bad_frame(&self, conn: &Rc<Conn>, reason: &'static str);
    /// The open session ended: `dropped` is None when we closed it, else why the
    /// server or the network ended it.
    fn on_closed(&self, conn: &Rc<Conn>, dropped: Option<String>);
}

/// Setup steps, to name which one timed out.
#[derive(Clone, Copy)]
enum Step {
    Connect,
    Handshake,
    Auth,
}

/// Runs one connection to its end: connect from `source` (if any), handshake, log in
/// (`auth`, or a raw-ws room), then the session until it closes. `started_ns` is when
/// the attempt was scheduled (latency counts from it).
pub async fn drive<H: Handler>(
    conn: Rc<Conn>,
    handler: Rc<H>,
    target: Rc<Target>,
    source: Option<IpAddr>,
    login: Login,
    started_ns: u64,
) {
    let step = Cell::new(Step::Connect);
    // Setup's state (handshake buffers, the connect and timeout futures) is boxed, so
    // it is freed once the session is open instead of sizing every idle connection.
    let setup = Box::pin(monoio::time::timeout(
        target.connect_timeout,
        establish(&conn, &target, source, &login, &step),
    ))
    .await;
    drop(login);
    let (stream, head_seq, leftover) = match setup {
        Ok(Ok(v)) => v,
        Ok(Err(reason)) => {
            conn.end();
            handler.on_setup_failed(&conn, reason);
            return;
        }
        Err(_) => {
            conn.end();
            let reason = match step.get() {
                Step::Connect => "connect_timeout",
                Step::Handshake => "handshake_timeout",
                Step::Auth => "auth_timeout",
            };
            handler.on_setup_failed(&conn, reason.into());
            return;
        }
    };
    conn.state.set(State::Open);
    handler.on_open(&conn, head_seq, started_ns, mono_ns());
    let dropped = session(&conn, &*handler, &target, &stream, leftover).await;
    conn.end();
    drop(stream);
    handler.on_closed(&conn, dropped);
}

/// Connects, upgrades and logs in. Returns the stream, the inbox head (0 for raw-ws)
/// and the bytes read past the login, which belong to the session.
async fn establish(
    conn: &Rc<Conn>,
    target: &Target,
    source: Option<IpAddr>,
    login: &Login,
    step: &Cell<Step>,
) -> Result<(TcpStream, u64, Vec<u8>), String> {
    let stream = connect(target.addr, source)
        .await
        .map_err(|e| io_reason(&e))?;
    conn.fd.set(stream.as_raw_fd());

    step.set(Step::Handshake);
    let key = ws::handshake_key({
        let mut k = [0u8; 16];
        k[..8].copy_from_slice(&rand_u64().to_ne_bytes());
        k[8..].copy_from_slice(&rand_u64().to_ne_bytes());
        k
    });
    let (path, protocol) = match login {
        Login::Token(_) => (target.path.clone(), Some(target.encoding.subprotocol())),
        Login::Room(room) => (raw::room_path(&target.path, room), None),
    };
    let request = ws::handshake_request(&target.host, &path, &key, protocol);
    if !conn.send_bytes(&request) {
        return Err("handshake_send_failed".into());
    }
    let mut head: Vec<u8> = Vec::new();
    let leftover = loop {
        wait_io(conn, &stream).await.map_err(|e| io_reason(&e))?;
        let mut result: Option<Result<usize, ws::HandshakeError>> = None;
        let open = read_available(conn.fd.get(), |bytes| {
            head.extend_from_slice(bytes);
            match ws::parse_handshake_response(&head, &key, protocol) {
                Ok(None) => true,
                Ok(Some(n)) => {
                    result = Some(Ok(n));
                    false
                }
                Err(e) => {
                    result = Some(Err(e));
                    false
                }
            }
        })
        .map_err(|e| io_reason(&e))?;
        match result {
            Some(Ok(n)) => break head.split_off(n),
            Some(Err(e)) => return Err(e.reason()),
            None if !open => return Err("eof_in_handshake".into()),
            None => {}
        }
    };
    drop(head);
    let Login::Token(token) = login else {
        // A room is joined by the upgrade itself.
        return Ok((stream, 0, leftover));
    };

    step.set(Step::Auth);
    let enc = target.encoding;
    if !conn.send(
        enc,
        &Outgoing::Auth {
            token,
            device: Some("lg"),
        },
    ) {
        return Err("auth_send_failed".into());
    }
    let mut outcome: Option<Result<u64, String>> = None;
    let on_message = |m: ws::Message<'_>, outcome: &mut Option<Result<u64, String>>| match m {
        ws::Message::Text(p) | ws::Message::Binary(p) if outcome.is_none() => {
            let text = matches!(m, ws::Message::Text(_));
            *outcome = match proto::decode(enc, text, p) {
                Ok(Incoming::AuthOk {
                    head_seq,
                    heartbeat_ms,
                }) => {
                    conn.heartbeat_ms.set(heartbeat_ms);
                    Some(Ok(head_seq))
                }
                Ok(Incoming::Error { code, .. }) => Some(Err(format!("auth:{code}"))),
                Ok(Incoming::Goaway { reason }) => Some(Err(format!("goaway:{reason}"))),
                Ok(_) => Some(Err("unexpected_frame_before_auth_ok".into())),
                Err(e) => Some(Err(e.0.to_string())),
            };
        }
        ws::Message::Ping(p) => {
            pong(conn, p);
        }
        ws::Message::Close(code) if outcome.is_none() => {
            *outcome = Some(Err(close_reason(code)));
        }
        _ => {}
    };
    if !leftover.is_empty() {
        let r = conn
            .dec
            .borrow_mut()
            .feed(&leftover, |m| on_message(m, &mut outcome));
        r.map_err(|e| e.reason().to_string())?;
    }
    loop {
        if let Some(done) = outcome {
            // A frame in the same read after `auth_ok` was passed over above; none is
            // due then: sessions start at the inbox head, before the run sends.
            return done.map(|head_seq| (stream, head_seq, Vec::new()));
        }
        wait_io(conn, &stream).await.map_err(|e| io_reason(&e))?;
        let mut frame_error = None;
        let open = read_available(conn.fd.get(), |bytes| {
            let r = conn
                .dec
                .borrow_mut()
                .feed(bytes, |m| on_message(m, &mut outcome));
            if let Err(e) = r {
                frame_error = Some(e);
                return false;
            }
            outcome.is_none()
        })
        .map_err(|e| io_reason(&e))?;
        if let Some(e) = frame_error {
            return Err(e.reason().into());
        }
        if !open && outcome.is_none() {
            return Err("eof_in_auth".into());
        }
    }
}

/// Waits until the socket is readable, flushing queued output meanwhile.
async fn wait_io(conn: &Conn, stream: &TcpStream) -> io::Result<()> {
    loop {
        if conn.flush()? {
            return stream.readable(false).await;
        }
        monoio::select! {
            r = stream.readable(false) => return r,
            r = stream.writable(false) => r?,
        }
    }
}

fn pong(conn: &Conn, payload: &[u8]) {
    let mut frame = Vec::with_capacity(payload.len() + 6);
    ws::encode_frame(ws::Opcode::Pong, payload, mask(), &mut frame);
    conn.send_bytes(&frame);
}

fn close_reason(code: Option<u16>) -> String {
    match code {
        Some(c) => format!("close:{c}"),
        None => "close:no_code".into(),
    }
}

/// A TCP connection to `addr`, from `source` when given. The socket is bound with
/// `IP_BIND_ADDRESS_NO_PORT`, so the kernel picks the port at connect time from the
/// whole 4-tuple space: each source address brings its own ephemeral port range.
async fn connect(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let socket = Socket::new(
        domain,
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_nodelay(true)?;
    if let Some(ip) = source {
        let on: libc::c_int = 1;
        // SAFETY: setsockopt reads one c_int from a live local; the fd is ours.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 && ip.is_ipv4() {
            return Err(io::Error::last_os_error());
        }
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    stream.writable(false).await?;
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into the live local `err`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if err != 0 {
        return Err(io::Error::from_raw_os_error(err));
    }
    Ok(stream)
}

/// What the reader saw of the end of a session.
#[derive(Default)]
struct Ending {
    /// A close frame from the server, with its code if it had one.
    server_close: Option<Option<u16>>,
    /// A `goaway` frame's reason, as a failure reason.
    goaway: Option<String>,
}

impl Ending {
    /// Why the server ended the session: its `goaway`, else its close code, else
    /// what the socket said.
    fn reason(&self, fallback: String) -> String {
        self.goaway
            .clone()
            .or_else(|| self.server_close.map(close_reason))
            .unwrap_or(fallback)
    }
}

enum Read {
    /// Everything available was read; the socket is still open.
    Open,
    /// End of stream.
    Eof,
    /// A socket error or a WebSocket violation, as a reason.
    Failed(String),
}

/// Decodes `bytes` of the session and hands each frame to the handler. Err: the
/// server broke RFC 6455, as a reason.
///
/// Every frame of `bytes` had arrived when the read returned, so they share one
/// arrival time, taken before any is decoded: decoding the first frames does not
/// count in the latency of the later ones, and the clock is read once per read
/// rather than once per frame (a fan-out read carries dozens).
fn feed_frames<H: Handler>(
    conn: &Rc<Conn>,
    handler: &H,
    target: &Target,
    ending: &mut Ending,
    bytes: &[u8],
) -> Result<(), &'static str> {
    let arrived_ns = mono_ns();
    let r = conn.dec.borrow_mut().feed(bytes, |m| match m {
        ws::Message::Text(p) | ws::Message::Binary(p) => {
            let text = matches!(m, ws::Message::Text(_));
            match target.decode(text, p) {
                Ok(Incoming::Goaway { reason }) => {
                    ending.goaway = Some(format!("goaway:{reason}"));
                }
                Ok(f) => handler.on_frame(conn, f, arrived_ns),
                Err(e) => handler.on_bad_frame(conn, e.0),
            }
        }
        ws::Message::Ping(p) => pong(conn, p),
        ws::Message::Pong => {}
        ws::Message::Close(code) => {
            if ending.server_close.is_none() {
                ending.server_close = Some(code);
            }
        }
    });
    r.map_err(|e| e.reason())
}

/// Reads what the socket has and hands each frame to the handler.
fn read_frames<H: Handler>(
    conn: &Rc<Conn>,
    handler: &H,
    target: &Target,
    ending: &mut Ending,
) -> Read {
    let mut violation: Option<String> = None;
    let read = read_available(conn.fd.get(), |bytes| {
        match feed_frames(conn, handler, target, ending, bytes) {
            Ok(()) => true,
            Err(why) => {
                violation = Some(why.into());
                false
            }
        }
    });
    match (violation, read) {
        (Some(v), _) => Read::Failed(v),
        (None, Ok(true)) => Read::Open,
        (None, Ok(false)) => Read::Eof,
        (None, Err(e)) => Read::Failed(io_reason(&e)),
    }
}

/// The open session: frames to the handler until the end. Returns None when we
/// closed it, else why it was dropped. Only readiness waits live in this loop, so an
/// idle connection's task stays small; the close handshake has its own function.
async fn session<H: Handler>(
    conn: &Rc<Conn>,
    handler: &H,
    target: &Target,
    stream: &TcpStream,
    leftover: Vec<u8>,
) -> Option<String> {
    let mut ending = Ending::default();
    if let Err(why) = feed_frames(conn, handler, target, &mut ending, &leftover) {
        return Some(ending.reason(why.into()));
    }
    drop(leftover);
    loop {
        if let Some(code) = ending.server_close {
            // Answer the server's close: the server ended the session.
            let mut frame = Vec::with_capacity(8);
            ws::encode_close(code.unwrap_or(CLOSE_NORMAL), mask(), &mut frame);
            conn.send_bytes(&frame);
            let _ = conn.flush();
            return Some(ending.reason(String::new()));
        }
        if conn.closing.get() {
            Box::pin(close_handshake(conn, handler, target, stream, ending)).await;
            return None;
        }
        if conn.broken.get() {
            return Some("send_failed".into());
        }
        let want_write = match conn.flush() {
            Ok(empty) => !empty,
            Err(e) => return Some(io_reason(&e)),
        };
        monoio::select! {
            r = stream.readable(false) => {
                if let Err(e) = r {
                    return Some(io_reason(&e));
                }
                match read_frames(conn, handler, target, &mut ending) {
                    Read::Open => {}
                    Read::Eof => return Some(ending.reason("eof".into())),
                    Read::Failed(why) => return Some(ending.reason(why)),
                }
            }
            r = stream.writable(false), if want_write => {
                if let Err(e) = r {
                    return Some(io_reason(&e));
                }
            }
            _ = conn.wake.notified() => {}
        }
    }
}

/// Our close: a close frame 1000, then frames (still handed over) until the server's
/// close and end of stream, for at most [`CLOSE_WAIT`].
async fn close_handshake<H: Handler>(
    conn: &Rc<Conn>,
    handler: &H,
    target: &Target,
    stream: &TcpStream,
    mut ending: Ending,
) {
    let mut frame = Vec::with_capacity(8);
    ws::encode_close(CLOSE_NORMAL, mask(), &mut frame);
    conn.send_bytes(&frame);
    let _ = monoio::time::timeout(CLOSE_WAIT, async {
        let mut half_closed = false;
        loop {
            let want_write = match conn.flush() {
                Ok(empty) => !empty,
                Err(_) => return,
            };
            if !want_write && ending.server_close.is_some() && !half_closed {
                // SAFETY: plain syscall on our own open socket.
                unsafe { libc::shutdown(conn.fd.get(), libc::SHUT_WR) };
                half_closed = true;
            }
            monoio::select! {
                r = stream.readable(false) => {
                    if r.is_err() {
                        return;
                    }
                    match read_frames(conn, handler, target, &mut ending) {
                        Read::Open => {}
                        Read::Eof | Read::Failed(_) => return,
                    }
                }
                r = stream.writable(false), if want_write => {
                    if r.is_err() {
                        return;
                    }
                }
                _ = conn.wake.notified() => {}
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Quiet;

    impl Handler for Quiet {
        fn on_open(&self, _: &Rc<Conn>, _: u64, _: u64, _: u64) {}
        fn on_setup_failed(&self, _: &Rc<Conn>, _: String) {}
        fn on_frame(&self, _: &Rc<Conn>, _: Incoming<'_>, _: u64) {}
        fn on_bad_frame(&self, _: &Rc<Conn>, _: &'static str) {}
        fn on_closed(&self, _: &Rc<Conn>, _: Option<String>) {}
    }

    /// One process holds ~20k connections: the state of an idle one (its task's
    /// future and its shared struct) must stay small. Setup and close are boxed so
    /// they do not size the idle state.
    #[test]
    fn an_idle_connection_stays_small() {
        let target = Rc::new(Target {
            kind: TargetKind::Flare,
            addr: "127.0.0.1:9".parse().expect("addr"),
            host: "h".into(),
            path: "/".into(),
            encoding: Encoding::Json,
            connect_timeout: Duration::from_secs(1),
        });
        let task = drive(
            Conn::new(0),
            Rc::new(Quiet),
            target,
            None,
            Login::Token(String::new()),
            0,
        );
        let task_bytes = std::mem::size_of_val(&task);
        let conn_bytes = std::mem::size_of::<Conn>();
        assert!(
            task_bytes <= 1024,
            "connection task future is {task_bytes} bytes"
        );
        assert!(conn_bytes <= 256, "Conn is {conn_bytes} bytes");
    }

    #[test]
    fn connects_from_the_source_address_it_is_given() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .build()
            .expect("runtime");
        for source in ["127.0.0.2", "127.0.0.3"] {
            let ip: IpAddr = source.parse().expect("ip");
            let stream = rt.block_on(connect(addr, Some(ip))).expect("connect");
            let (_peer, from) = listener.accept().expect("accept");
            assert_eq!(from.ip(), ip);
            assert_eq!(stream.local_addr().expect("local").ip(), ip);
        }
        // Nobody listening: the reason is named.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let err = rt.block_on(connect(closed, None)).expect_err("refused");
        assert_eq!(io_reason(&err), "refused");
    }

    #[test]
    fn notify_wakes_once_and_remembers_an_early_notify() {
        let n = Notify::default();
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut f = Box::pin(n.notified());
        assert!(f.as_mut().poll(&mut cx).is_pending());
        n.notify();
        assert!(f.as_mut().poll(&mut cx).is_ready());
        n.notify();
        assert!(Box::pin(n.notified()).as_mut().poll(&mut cx).is_ready());
        assert!(Box::pin(n.notified()).as_mut().poll(&mut cx).is_pending());
    }
}
