//! Shared harness of Flare's end-to-end tests.
//!
//! Every test starts the real `flare` binary on free loopback ports with a fresh
//! data dir (`Server`), talks to it as a client would (`Client`, a tungstenite
//! WebSocket; `RawWs`, hand-written RFC 6455 frames for protocol violations; `http`,
//! a tiny HTTP/1.1 client for the admin API) and mints its own HS256 tokens.
//! Every wait is bounded: a test fails with the server's log, it never hangs.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::{Sha256, Sha384};
use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::WebSocket;
use tungstenite::Message;

pub const SECRET: &str = "flare-e2e-secret-5b1f0c3a9d";
pub const ADMIN_TOKEN: &str = "flare-e2e-admin-token-77c2";
pub const NODE_ID: &str = "gw-e2e";
pub const SHARDS: u32 = 2;

/// Bounds of every wait. Generous: the machine is small and shared.
pub const READY_TIMEOUT: Duration = Duration::from_secs(40);
pub const RECV_TIMEOUT: Duration = Duration::from_secs(15);
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(20);
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------
// Server process
// ---------------------------------------------------------------------------

/// One `flare serve` process on free ports; killed on drop. Restartable on the
/// same data dir.
pub struct Server {
    pub ws: SocketAddr,
    pub admin: SocketAddr,
    data: tempfile::TempDir,
    logs: tempfile::TempDir,
    extra: Vec<String>,
    child: Option<Child>,
    generation: u32,
}

pub fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr")
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_flare")
}

impl Server {
    /// `flare serve --shards 2` with the test secret and admin token.
    pub fn start() -> Server {
        Server::with_args(&[])
    }

    /// Same, with extra `serve` flags (e.g. `["--heartbeat-ms", "300"]`). Unless the
    /// test sets `--sends-per-sec`, the rate limit is lifted (its default is not part of
    /// the contract, and most tests send in bursts).
    pub fn with_args(extra: &[&str]) -> Server {
        let mut extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        if !extra.iter().any(|a| a == "--sends-per-sec") {
            extra.extend(["--sends-per-sec".to_string(), "1000000".to_string()]);
        }
        let mut s = Server {
            ws: free_port(),
            admin: free_port(),
            data: tempfile::tempdir().expect("tempdir"),
            logs: tempfile::tempdir().expect("tempdir"),
            extra,
            child: None,
            generation: 0,
        };
        s.spawn();
        s
    }

    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    fn log_path(&self, generation: u32) -> PathBuf {
        self.logs.path().join(format!("flare-{generation}.log"))
    }

    fn spawn(&mut self) {
        const ATTEMPTS: u32 = 3;
        for attempt in 1..=ATTEMPTS {
            self.generation += 1;
            if attempt > 1 {
                // Ports picked by bind-and-drop may have been taken meanwhile.
                self.ws = free_port();
                self.admin = free_port();
            }
            let log = File::create(self.log_path(self.generation)).expect("create log file");
            let mut cmd = Command::new(bin());
            for (k, _) in std::env::vars() {
                if k.starts_with("FLARE_") {
                    cmd.env_remove(k);
                }
            }
            cmd.arg("serve")
                .arg("--ws")
                .arg(self.ws.to_string())
                .arg("--admin")
                .arg(self.admin.to_string())
                .arg("--quic")
                .arg(free_port().to_string())
                .arg("--data")
                .arg(self.data.path())
                .arg("--shards")
                .arg(SHARDS.to_string())
                .arg("--node-id")
                .arg(NODE_ID)
                .arg("--jwt-secret")
                .arg(SECRET)
                .arg("--admin-token")
                .arg(ADMIN_TOKEN)
                .args(&self.extra)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("clone log"))
                .stderr(log);
            let child = cmd.spawn().expect("spawn flare");
            self.child = Some(child);
            match self.wait_ready() {
                Ok(()) => return,
                Err(exited) => {
                    let log = self.log(self.generation);
                    if exited && attempt < ATTEMPTS && log.to_lowercase().contains("in use") {
                        continue;
                    }
                    self.kill9();
                    panic!(
                        "flare serve did not become ready (attempt {attempt}, args {:?}):\n{}",
                        self.extra,
                        tail(&log, 80)
                    );
                }
            }
        }
    }

    /// Ok when /readyz answered 200; Err(true) when the process exited, Err(false) on timeout.
    fn wait_ready(&mut self) -> Result<(), bool> {
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    return Err(true);
                }
            }
            if let Ok(r) = try_http(
                self.admin,
                "GET",
                "/readyz",
                None,
                None,
                Duration::from_secs(2),
            ) {
                if r.status == 200 {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(false)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM (drain) without waiting.
    pub fn sigterm(&self) {
        let c = self.child.as_ref().expect("server running");
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped yet.
        unsafe {
            libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
        }
    }

    /// SIGTERM, then wait (bounded) for the exit status.
    pub fn terminate(&mut self, within: Duration) -> Option<ExitStatus> {
        self.sigterm();
        self.wait_exit(within)
    }

    /// Waits (bounded) for the process to exit; None (and SIGKILL) if it does not.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9 if still running, then start again on the same data dir (new ports).
    pub fn restart(&mut self) {
        self.kill9();
        self.ws = free_port();
        self.admin = free_port();
        self.spawn();
    }

    pub fn log(&self, generation: u32) -> String {
        std::fs::read(self.log_path(generation))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    pub fn all_logs(&self) -> String {
        let mut out = String::new();
        for g in 1..=self.generation {
            out.push_str(&format!("----- flare log, start #{g} -----\n"));
            out.push_str(&tail(&self.log(g), 150));
        }
        out
    }

    // --- admin API -----------------------------------------------------------

    /// A `/v1` call with the admin token.
    pub fn admin(&self, method: &str, path: &str, body: Option<Value>) -> HttpResponse {
        let body = body.map(|b| b.to_string());
        http(self.admin, method, path, Some(ADMIN_TOKEN), body.as_deref())
    }

    pub fn put_group(&self, group: &str, members: &[&str]) {
        let r = self.admin(
            "PUT",
            &format!("/v1/groups/{group}"),
            Some(json!({ "members": members })),
        );
        assert_eq!(r.status, 204, "PUT /v1/groups/{group}: {r:?}");
    }

    pub fn set_blocked(&self, user: &str, blocked: &[&str]) {
        let r = self.admin(
            "PUT",
            &format!("/v1/users/{user}/blocked"),
            Some(json!({ "users": blocked })),
        );
        assert_eq!(r.status, 204, "PUT /v1/users/{user}/blocked: {r:?}");
    }

    // --- clients -------------------------------------------------------------

    pub fn client(&self) -> Client {
        Client::connect(self.ws, None).unwrap_or_else(|e| panic!("connect {}: {e}", self.ws))
    }

    /// Connect and authenticate `user`/`device` (token carries no `dev`).
    pub fn login(&self, user: &str, device: &str, last_seq: Option<u64>) -> (Client, Value) {
        let mut c = self.client();
        c.name = format!("{user}/{device}");
        let ok = c.auth(&token(user), Some(device), last_seq);
        (c, ok)
    }

    /// Connect `user`/`device` until the session lands on `shard` (the kernel spreads
    /// connections between the shards' SO_REUSEPORT listeners). Connections on the
    /// wrong shard are closed before the next try.
    pub fn login_on_shard(
        &self,
        user: &str,
        device: &str,
        shard: u32,
        last_seq: Option<u64>,
    ) -> (Client, Value) {
        for _ in 0..60 {
            let (mut c, ok) = self.login(user, device, last_seq);
            if session_shard(&ok) == shard {
                return (c, ok);
            }
            c.close();
        }
        panic!("60 connections of {user}/{device}: none landed on shard {shard}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("{}", self.all_logs());
        }
    }
}

pub fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    let start = v.len().saturating_sub(lines);
    let mut out = v[start..].join("\n");
    out.push('\n');
    out
}

/// The shard of `auth_ok.session` (`<node>.<shard>.<n>`).
pub fn session_shard(auth_ok: &Value) -> u32 {
    let s = auth_ok["session"]
        .as_str()
        .unwrap_or_else(|| panic!("auth_ok without session: {auth_ok}"));
    let parts: Vec<&str> = s.rsplitn(3, '.').collect();
    assert_eq!(parts.len(), 3, "session {s:?} is not <node>.<shard>.<n>");
    parts[1]
        .parse()
        .unwrap_or_else(|_| panic!("session {s:?}: shard is not a number"))
}

// ---------------------------------------------------------------------------
// Tokens (HS256 JWT, minted here, not by the server)
// ---------------------------------------------------------------------------

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

pub fn b64url(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

/// A JWT signed with HMAC-SHA256 over `key`, whatever `header` claims.
pub fn jwt_hs256(header: &Value, claims: &Value, key: &[u8]) -> String {
    let signing_input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(signing_input.as_bytes());
    format!("{signing_input}.{}", b64url(&mac.finalize().into_bytes()))
}

/// A JWT signed with HMAC-SHA384 (a valid token of the wrong algorithm).
pub fn jwt_hs384(claims: &Value, key: &[u8]) -> String {
    let header = json!({"alg": "HS384", "typ": "JWT"});
    let signing_input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let mut mac = Hmac::<Sha384>::new_from_slice(key).unwrap();
    mac.update(signing_input.as_bytes());
    format!("{signing_input}.{}", b64url(&mac.finalize().into_bytes()))
}

/// An unsigned `alg: none` JWT.
pub fn jwt_none(claims: &Value) -> String {
    let header = json!({"alg": "none", "typ": "JWT"});
    format!(
        "{}.{}.",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    )
}

pub fn token_claims(claims: &Value) -> String {
    jwt_hs256(
        &json!({"alg": "HS256", "typ": "JWT"}),
        claims,
        SECRET.as_bytes(),
    )
}

/// A valid token for `user`, one hour.
pub fn token(user: &str) -> String {
    token_claims(&json!({"sub": user, "exp": now_secs() + 3600}))
}

/// A valid token for `user` with the `dev` claim.
pub fn token_dev(user: &str, dev: &str) -> String {
    token_claims(&json!({"sub": user, "exp": now_secs() + 3600, "dev": dev}))
}

// ---------------------------------------------------------------------------
// Admin HTTP client
// ---------------------------------------------------------------------------

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {self:?}"))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&str>,
) -> HttpResponse {
    try_http(addr, method, path, bearer, body, HTTP_TIMEOUT)
        .unwrap_or_else(|e| panic!("HTTP {method} {path} on {addr}: {e}"))
}

/// HTTP/1.1 with `Connection: close` and a Content-Length body; reads to EOF.
pub fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&str>,
    timeout: Duration,
) -> std::io::Result<HttpResponse> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = bearer {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || matches!(method, "POST" | "PUT") {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes())?;
    let deadline = Instant::now() + timeout;
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if Instant::now() > deadline {
            return Err(std::io::Error::new(
                ErrorKind::TimedOut,
                "HTTP response not complete in time",
            ));
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                raw.extend_from_slice(&buf[..n]);
                if let Some(r) = parse_http_response(&raw, false) {
                    return Ok(r);
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset && !raw.is_empty() => break,
            Err(e) => return Err(e),
        }
    }
    parse_http_response(&raw, true).ok_or_else(|| {
        std::io::Error::new(
            ErrorKind::InvalidData,
            format!("bad HTTP response: {:?}", String::from_utf8_lossy(&raw)),
        )
    })
}

/// A complete response out of `raw`, or None if more bytes are needed (unless `eof`).
fn parse_http_response(raw: &[u8], eof: bool) -> Option<HttpResponse> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let rest = &raw[end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let status: u16 = status_line.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.clone())
    };
    let body: Vec<u8> = if let Some(len) = get("content-length") {
        let len: usize = len.parse().ok()?;
        if rest.len() < len {
            return None;
        }
        rest[..len].to_vec()
    } else if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let mut out = Vec::new();
        let mut r = rest;
        loop {
            let nl = r.windows(2).position(|w| w == b"\r\n")?;
            let size = usize::from_str_radix(
                String::from_utf8_lossy(&r[..nl]).split(';').next()?.trim(),
                16,
            )
            .ok()?;
            r = &r[nl + 2..];
            if size == 0 {
                break;
            }
            if r.len() < size + 2 {
                return None;
            }
            out.extend_from_slice(&r[..size]);
            r = &r[size + 2..];
        }
        out
    } else if status == 204 || status == 304 || (100..200).contains(&status) {
        Vec::new()
    } else if eof {
        rest.to_vec()
    } else {
        return None;
    };
    Some(HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

// ---------------------------------------------------------------------------
// WebSocket client (tungstenite)
// ---------------------------------------------------------------------------

/// What the next read produced.
#[derive(Debug)]
pub enum Event {
    /// A JSON text message, parsed.
    Frame(Value),
    /// A binary message (rkyv sessions).
    Binary(Vec<u8>),
    /// A Close frame with its code (None: close frame without a code).
    Close(Option<u16>),
    /// The TCP connection ended without a Close frame.
    Eof(String),
    Timeout,
}

pub struct Client {
    ws: WebSocket<TcpStream>,
    /// Frames read while looking for something else; `recv` consumes them first.
    stash: VecDeque<Value>,
    pub protocol: Option<String>,
    pub name: String,
    closed: bool,
}

impl Client {
    /// WebSocket handshake on `/ws`, offering `protocols` (comma-separated, no spaces) if any.
    pub fn connect(addr: SocketAddr, protocols: Option<&str>) -> Result<Client, String> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        stream.set_nodelay(true).ok();
        stream
            .set_read_timeout(Some(RECV_TIMEOUT))
            .map_err(|e| e.to_string())?;
        stream
            .set_write_timeout(Some(RECV_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let mut req = format!("ws://{addr}/ws")
            .into_client_request()
            .map_err(|e| e.to_string())?;
        if let Some(p) = protocols {
            req.headers_mut()
                .insert("Sec-WebSocket-Protocol", p.parse().unwrap());
        }
        let (ws, resp) = tungstenite::client::client(req, stream).map_err(|e| match e {
            tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r)) => {
                format!("HTTP {}", r.status().as_u16())
            }
            other => other.to_string(),
        })?;
        let protocol = resp
            .headers()
            .get("Sec-WebSocket-Protocol")
            .map(|v| v.to_str().unwrap_or("").to_string());
        Ok(Client {
            ws,
            stash: VecDeque::new(),
            protocol,
            name: String::from("client"),
            closed: false,
        })
    }

    pub fn try_send_json(&mut self, v: &Value) -> Result<(), String> {
        self.ws
            .send(Message::text(v.to_string()))
            .map_err(|e| e.to_string())
    }

    pub fn send_json(&mut self, v: Value) {
        let name = self.name.clone();
        self.try_send_json(&v)
            .unwrap_or_else(|e| panic!("[{name}] send {v}: {e}"));
    }

    pub fn send_text(&mut self, s: &str) {
        let name = self.name.clone();
        self.ws
            .send(Message::text(s))
            .unwrap_or_else(|e| panic!("[{name}] send text: {e}"));
    }

    pub fn try_send_binary(&mut self, b: Vec<u8>) -> Result<(), String> {
        self.ws.send(Message::binary(b)).map_err(|e| e.to_string())
    }

    /// A WebSocket-level ping (not the protocol's `ping` frame).
    pub fn send_ws_ping(&mut self) {
        let name = self.name.clone();
        self.ws
            .send(Message::Ping(Vec::new()))
            .unwrap_or_else(|e| panic!("[{name}] ws ping: {e}"));
    }

    /// Next event from the socket (ignores the stash), waiting at most `timeout`.
    pub fn next_event(&mut self, timeout: Duration) -> Event {
        if self.closed {
            return Event::Eof("already closed".into());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Event::Timeout;
            }
            let left = (deadline - now).max(Duration::from_millis(1));
            let _ = self.ws.get_mut().set_read_timeout(Some(left));
            match self.ws.read() {
                Ok(Message::Text(t)) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap_or_else(|e| {
                        panic!(
                            "[{}] server sent a text message that is not JSON ({e}): {t:?}",
                            self.name
                        )
                    });
                    return Event::Frame(v);
                }
                Ok(Message::Binary(b)) => return Event::Binary(b.to_vec()),
                Ok(Message::Close(cf)) => {
                    self.closed = true;
                    // Let tungstenite finish the closing handshake, bounded.
                    let _ = self
                        .ws
                        .get_mut()
                        .set_read_timeout(Some(Duration::from_millis(200)));
                    let _ = self.ws.flush();
                    return Event::Close(cf.map(|f| u16::from(f.code)));
                }
                Ok(_) => continue, // ping/pong (tungstenite answers pings itself), raw frames
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    return Event::Timeout
                }
                Err(e) => {
                    self.closed = true;
                    return Event::Eof(e.to_string());
                }
            }
        }
    }

    /// Next frame: from the stash, else from the socket. Panics on anything but a frame.
    pub fn recv(&mut self) -> Value {
        self.recv_within(RECV_TIMEOUT)
    }

    pub fn recv_within(&mut self, timeout: Duration) -> Value {
        if let Some(v) = self.stash.pop_front() {
            return v;
        }
        match self.next_event(timeout) {
            Event::Frame(v) => v,
            other => panic!(
                "[{}] expected a frame within {timeout:?}, got {other:?}",
                self.name
            ),
        }
    }

    /// Next frame, which must be of `ty`.
    pub fn recv_type(&mut self, ty: &str) -> Value {
        let v = self.recv();
        assert_eq!(
            v["type"], ty,
            "[{}] expected a `{ty}` frame, got {v}",
            self.name
        );
        v
    }

    /// The first frame (stash first, then socket) matching `pred`; the others stay stashed, in order.
    pub fn recv_until(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.recv_until_within(what, RECV_TIMEOUT, pred)
    }

    pub fn recv_until_within(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        if let Some(i) = self.stash.iter().position(&pred) {
            return self.stash.remove(i).unwrap();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left) {
                Event::Frame(v) if pred(&v) => return v,
                Event::Frame(v) => self.stash.push_back(v),
                other => panic!(
                    "[{}] waiting for {what}: got {other:?}; frames seen meanwhile: {:?}",
                    self.name,
                    self.stash.iter().map(|v| v.to_string()).collect::<Vec<_>>()
                ),
            }
        }
    }

    /// Frames already received and not yet consumed.
    pub fn stashed(&self) -> Vec<Value> {
        self.stash.iter().cloned().collect()
    }

    /// The `send_ok` or `error` answering send `id` (other frames are stashed).
    pub fn answer_to(&mut self, id: &str) -> Value {
        self.recv_until(&format!("send_ok/error for id {id:?}"), |v| {
            (v["type"] == "send_ok" || v["type"] == "error") && v["id"] == id
        })
    }

    /// The next `n` `msg` frames in arrival order (other frames are stashed).
    pub fn recv_msgs(&mut self, n: usize) -> Vec<Value> {
        (0..n)
            .map(|i| self.recv_until(&format!("msg #{} of {n}", i + 1), |v| v["type"] == "msg"))
            .collect()
    }

    /// Asserts that nothing arrives (and nothing is stashed) for `d`.
    pub fn assert_silent(&mut self, d: Duration) {
        assert!(
            self.stash.is_empty(),
            "[{}] unexpected frames: {:?}",
            self.name,
            self.stash
        );
        match self.next_event(d) {
            Event::Timeout => {}
            other => panic!("[{}] expected nothing for {d:?}, got {other:?}", self.name),
        }
    }

    /// Reads until a Close frame or EOF (bounded); returns the close code (None: EOF
    /// without a Close frame, or a Close without code) and the frames received first
    /// (stash included).
    pub fn expect_close(&mut self) -> (Option<u16>, Vec<Value>) {
        self.expect_close_within(CLOSE_TIMEOUT)
    }

    pub fn expect_close_within(&mut self, timeout: Duration) -> (Option<u16>, Vec<Value>) {
        let mut frames: Vec<Value> = self.stash.drain(..).collect();
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left) {
                Event::Frame(v) => frames.push(v),
                Event::Binary(_) => {}
                Event::Close(code) => return (code, frames),
                Event::Eof(_) => return (None, frames),
                Event::Timeout => panic!(
                    "[{}] connection not closed within {timeout:?}; frames: {:?}",
                    self.name,
                    frames.iter().map(|v| v.to_string()).collect::<Vec<_>>()
                ),
            }
        }
    }

    /// `auth`; returns `auth_ok` or panics with what came instead.
    pub fn auth(&mut self, token: &str, device: Option<&str>, last_seq: Option<u64>) -> Value {
        let mut f = json!({"type": "auth", "token": token});
        if let Some(d) = device {
            f["device"] = json!(d);
        }
        if let Some(s) = last_seq {
            f["last_seq"] = json!(s);
        }
        self.send_json(f);
        let v = self.recv();
        assert_eq!(
            v["type"], "auth_ok",
            "[{}] auth: expected auth_ok, got {v}",
            self.name
        );
        v
    }

    /// `send` to a user; does not wait.
    pub fn send_to_user(&mut self, id: &str, to: &str, body: &str) {
        self.send_json(json!({"type": "send", "id": id, "to": {"user": to}, "body": body}));
    }

    pub fn send_to_group(&mut self, id: &str, group: &str, body: &str) {
        self.send_json(json!({"type": "send", "id": id, "to": {"group": group}, "body": body}));
    }

    /// `send` to a user and wait for its `send_ok` (panics on `error`).
    pub fn send_ok(&mut self, id: &str, to: &str, body: &str) -> Value {
        self.send_to_user(id, to, body);
        let a = self.answer_to(id);
        assert_eq!(
            a["type"], "send_ok",
            "[{}] send {id:?} to {to}: {a}",
            self.name
        );
        a
    }

    pub fn ack(&mut self, seq: u64) {
        self.send_json(json!({"type": "ack", "seq": seq}));
    }

    /// Protocol `ping` → `pong` (frames arriving meanwhile are stashed).
    pub fn ping_pong(&mut self) {
        self.send_json(json!({"type": "ping"}));
        self.recv_until("pong", |v| v["type"] == "pong");
    }

    /// One `sync` page: the `msg` frames up to `sync_done`, and the `sync_done`.
    /// Meant for connections that receive no live messages meanwhile.
    pub fn sync_page(&mut self, after: u64, limit: u32) -> (Vec<Value>, Value) {
        self.send_json(json!({"type": "sync", "after": after, "limit": limit}));
        let mut msgs = Vec::new();
        let mut other = Vec::new();
        let done = loop {
            let v = self.recv();
            match v["type"].as_str() {
                Some("msg") => msgs.push(v),
                Some("sync_done") => break v,
                _ => other.push(v),
            }
        };
        for v in other.into_iter().rev() {
            self.stash.push_front(v);
        }
        (msgs, done)
    }

    /// The whole inbox after `after`, by `sync` pages of 1000.
    pub fn sync_all(&mut self, after: u64) -> Vec<Value> {
        self.sync_all_by(after, 1000)
    }

    /// The whole inbox after `after`, by `sync` pages of `limit`.
    pub fn sync_all_by(&mut self, mut after: u64, limit: u32) -> Vec<Value> {
        let mut all = Vec::new();
        for _ in 0..100_000 {
            let (msgs, done) = self.sync_page(after, limit);
            assert_eq!(
                done["after"], after,
                "[{}] sync_done.after: {done}",
                self.name
            );
            if let Some(last) = msgs.last() {
                after = seq(last);
            }
            all.extend(msgs);
            if done["more"] != true {
                return all;
            }
        }
        panic!("[{}] sync_all: more than 100000 pages", self.name);
    }

    /// Close handshake (bounded); never panics.
    pub fn close(&mut self) {
        if self.closed {
            return;
        }
        let _ = self.ws.close(None);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let _ = self
                .ws
                .get_mut()
                .set_read_timeout(Some(Duration::from_millis(500)));
            match self.ws.read() {
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    continue
                }
                Err(_) => break,
            }
        }
        self.closed = true;
    }
}

/// `seq` of a `msg` frame.
pub fn seq(m: &Value) -> u64 {
    m["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("frame without numeric seq: {m}"))
}

pub fn seqs(ms: &[Value]) -> Vec<u64> {
    ms.iter().map(seq).collect()
}

pub fn bodies(ms: &[Value]) -> Vec<String> {
    ms.iter()
        .map(|m| {
            m["body"]
                .as_str()
                .unwrap_or_else(|| panic!("msg without body: {m}"))
                .to_string()
        })
        .collect()
}

/// Checks that `msg_id` is a u64 written as a decimal string (PROTOCOL §2).
pub fn msg_id(v: &Value) -> u64 {
    let s = v["msg_id"]
        .as_str()
        .unwrap_or_else(|| panic!("msg_id must be a decimal string: {v}"));
    assert!(
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()),
        "msg_id {s:?} is not a decimal string: {v}"
    );
    s.parse()
        .unwrap_or_else(|_| panic!("msg_id {s:?} is not a u64"))
}

pub fn assert_error(v: &Value, code: &str, id: Option<&str>) {
    assert_eq!(v["type"], "error", "expected error {code}, got {v}");
    assert_eq!(v["code"], code, "expected error {code}, got {v}");
    assert!(
        v["message"].is_string(),
        "error without message string: {v}"
    );
    if let Some(id) = id {
        assert_eq!(
            v["id"], id,
            "error {code} must name the send it answers (id {id:?}): {v}"
        );
    }
}

// ---------------------------------------------------------------------------
// Raw WebSocket (hand-made frames, for protocol violations)
// ---------------------------------------------------------------------------

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

pub enum RawEvent {
    Frame {
        fin: bool,
        opcode: u8,
        payload: Vec<u8>,
    },
    Eof,
    Timeout,
}

/// A WebSocket connection driven byte by byte: it answers nothing by itself.
pub struct RawWs {
    pub stream: TcpStream,
    buf: Vec<u8>,
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl RawWs {
    /// Upgrade request on `/ws` with an optional `Sec-WebSocket-Protocol` header value.
    /// Returns the connection whatever the status (check `status`).
    pub fn connect(addr: SocketAddr, protocols: Option<&str>) -> RawWs {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
        RawWs::handshake(stream, addr, protocols)
    }

    /// Like `connect`, with a tiny kernel receive buffer (set before connecting, so
    /// the advertised window stays small): a client that reads slowly, or not at all.
    pub fn connect_small_rcvbuf(addr: SocketAddr, rcvbuf: i32) -> RawWs {
        use std::os::fd::FromRawFd;
        let SocketAddr::V4(v4) = addr else {
            panic!("IPv4 only")
        };
        // SAFETY: plain socket syscalls on a descriptor we create and then hand to
        // TcpStream, which owns (and closes) it from then on.
        let stream = unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let stream = TcpStream::from_raw_fd(fd);
            let r = libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                &rcvbuf as *const i32 as *const libc::c_void,
                std::mem::size_of::<i32>() as libc::socklen_t,
            );
            assert_eq!(r, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            let r = libc::connect(
                fd,
                &sin as *const libc::sockaddr_in as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            assert_eq!(r, 0, "connect: {}", std::io::Error::last_os_error());
            stream
        };
        RawWs::handshake(stream, addr, None)
    }

    fn handshake(mut stream: TcpStream, addr: SocketAddr, protocols: Option<&str>) -> RawWs {
        stream.set_nodelay(true).ok();
        stream.set_write_timeout(Some(RECV_TIMEOUT)).ok();
        let key = STANDARD.encode(rand_bytes::<16>());
        let mut req = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        );
        if let Some(p) = protocols {
            req.push_str(&format!("Sec-WebSocket-Protocol: {p}\r\n"));
        }
        req.push_str("\r\n");
        stream
            .write_all(req.as_bytes())
            .expect("write upgrade request");
        let deadline = Instant::now() + RECV_TIMEOUT;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no upgrade response within {RECV_TIMEOUT:?}: {:?}",
                String::from_utf8_lossy(&buf)
            );
            stream.set_read_timeout(Some(left)).unwrap();
            match stream.read(&mut chunk) {
                Ok(0) => panic!(
                    "EOF before the upgrade response: {:?}",
                    String::from_utf8_lossy(&buf)
                ),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => panic!("reading the upgrade response: {e}"),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let rest = buf[end + 4..].to_vec();
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line: {head:?}"));
        let headers = lines
            .filter_map(|l| {
                l.split_once(':')
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            })
            .collect();
        RawWs {
            stream,
            buf: rest,
            status,
            headers,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Writes one frame; `mask` false makes an (illegal) unmasked client frame.
    pub fn write_frame(
        &mut self,
        fin: bool,
        opcode: u8,
        payload: &[u8],
        mask: bool,
    ) -> std::io::Result<()> {
        let mut f = Vec::with_capacity(payload.len() + 14);
        f.push(if fin { 0x80 } else { 0 } | opcode);
        let m = if mask { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => f.push(m | n as u8),
            n if n <= 0xFFFF => {
                f.push(m | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(m | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if mask {
            let key = rand_bytes::<4>();
            f.extend_from_slice(&key);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            f.extend_from_slice(payload);
        }
        self.stream.write_all(&f)
    }

    pub fn send_json(&mut self, v: Value) {
        self.write_frame(true, OP_TEXT, v.to_string().as_bytes(), true)
            .expect("raw send");
    }

    pub fn read_frame(&mut self, timeout: Duration) -> RawEvent {
        let deadline = Instant::now() + timeout;
        let mut chunk = [0u8; 8192];
        loop {
            if let Some((fin, opcode, payload, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return RawEvent::Frame {
                    fin,
                    opcode,
                    payload,
                };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return RawEvent::Timeout;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            match self.stream.read(&mut chunk) {
                Ok(0) => return RawEvent::Eof,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return RawEvent::Timeout
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return RawEvent::Eof,
            }
        }
    }

    /// Next text message as JSON (control frames other than close are skipped, unanswered).
    pub fn recv_json(&mut self) -> Value {
        loop {
            match self.read_frame(RECV_TIMEOUT) {
                RawEvent::Frame {
                    opcode: OP_TEXT,
                    payload,
                    ..
                } => return serde_json::from_slice(&payload).expect("text frame is JSON"),
                RawEvent::Frame {
                    opcode: OP_PING | OP_PONG,
                    ..
                } => continue,
                RawEvent::Frame {
                    opcode, payload, ..
                } => {
                    panic!(
                        "expected a text frame, got opcode {opcode:#x} {:?}",
                        payload
                    )
                }
                RawEvent::Eof => panic!("EOF while waiting for a text frame"),
                RawEvent::Timeout => panic!("no text frame within {RECV_TIMEOUT:?}"),
            }
        }
    }

    /// Reads (never writes) until a Close frame or EOF, bounded. Returns the close code
    /// (None: EOF without Close, or Close without code) and the JSON frames seen first.
    pub fn expect_close_within(&mut self, timeout: Duration) -> (Option<u16>, Vec<Value>) {
        let deadline = Instant::now() + timeout;
        let mut frames = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_frame(left) {
                RawEvent::Frame {
                    opcode: OP_CLOSE,
                    payload,
                    ..
                } => {
                    let code =
                        (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                    return (code, frames);
                }
                RawEvent::Frame {
                    opcode: OP_TEXT,
                    payload,
                    ..
                } => frames.push(serde_json::from_slice(&payload).unwrap_or(Value::Null)),
                RawEvent::Frame { .. } => {}
                RawEvent::Eof => return (None, frames),
                RawEvent::Timeout => {
                    panic!("raw connection not closed within {timeout:?}; frames {frames:?}")
                }
            }
        }
    }
}

/// (fin, opcode, payload, bytes used) of one server→client frame at the start of `b`.
fn parse_server_frame(b: &[u8]) -> Option<(bool, u8, Vec<u8>, usize)> {
    if b.len() < 2 {
        return None;
    }
    let fin = b[0] & 0x80 != 0;
    let opcode = b[0] & 0x0F;
    let masked = b[1] & 0x80 != 0;
    let (len, mut at) = match b[1] & 0x7F {
        126 => {
            if b.len() < 4 {
                return None;
            }
            (u16::from_be_bytes([b[2], b[3]]) as usize, 4)
        }
        127 => {
            if b.len() < 10 {
                return None;
            }
            (
                u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize,
                10,
            )
        }
        n => (n as usize, 2),
    };
    let key = if masked {
        if b.len() < at + 4 {
            return None;
        }
        let k = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        at += 4;
        Some(k)
    } else {
        None
    };
    if b.len() < at + len {
        return None;
    }
    let mut payload = b[at..at + len].to_vec();
    if let Some(k) = key {
        for (i, x) in payload.iter_mut().enumerate() {
            *x ^= k[i % 4];
        }
    }
    Some((fin, opcode, payload, at + len))
}

/// Non-cryptographic randomness for mask keys and handshake nonces.
pub fn rand_bytes<const N: usize>() -> [u8; N] {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut out = [0u8; N];
    for chunk in out.chunks_mut(8) {
        let mut h = RandomState::new().build_hasher();
        h.write_u128(Instant::now().elapsed().as_nanos() ^ now_ms() as u128);
        let x = h.finish().to_le_bytes();
        chunk.copy_from_slice(&x[..chunk.len()]);
    }
    out
}

/// Unique-ish names so that tests sharing nothing still never collide in logs.
pub fn uniq(prefix: &str) -> String {
    let r = u32::from_le_bytes(rand_bytes::<4>());
    format!("{prefix}-{r:08x}")
}
