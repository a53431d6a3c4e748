//! The admin HTTP API (PROTOCOL.md §8), `/metrics` and health checks, served by one
//! monoio thread that is an endpoint of the pipeline like a shard is.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_channel::oneshot;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use serde::Deserialize;
use serde_json::json;

use flare_codec::frame::{ErrorCode, Target};
use flare_codec::ids::is_valid_id;
use flare_pipeline::api::{
    AdminOp, AdminReply, Event, FlushTimes, Request, Stats, FLUSH_BUCKETS_US,
};
use flare_shard::mailbox::{self, MonoioWaker, Receiver, Sender};

use crate::metrics::ShardMetrics;

/// Largest admin request (head and body).
const MAX_REQUEST_BYTES: usize = 1 << 20;
/// How long an admin call waits for the pipeline.
const PIPELINE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may take to send one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

pub struct AdminInit {
    pub token: String,
    pub node: String,
    pub max_body_bytes: usize,
    pub to_pipeline: Sender<Request>,
    pub events: Receiver<Event>,
    pub shard_metrics: Vec<Arc<ShardMetrics>>,
    pub draining: Arc<AtomicBool>,
    pub driver: &'static str,
}

struct Admin {
    token: String,
    max_body_bytes: usize,
    to_pipeline: Sender<Request>,
    pending: RefCell<HashMap<u64, oneshot::Sender<AdminReply>>>,
    next_token: Cell<u64>,
    shard_metrics: Vec<Arc<ShardMetrics>>,
    draining: Arc<AtomicBool>,
    node: String,
    driver: &'static str,
}

struct HttpRequest {
    method: String,
    path: String,
    authorization: Option<String>,
    body: Vec<u8>,
    close: bool,
}

struct HttpResponse {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
}

impl HttpResponse {
    fn json(status: u16, v: serde_json::Value) -> Self {
        HttpResponse {
            status,
            content_type: "application/json",
            body: serde_json::to_vec(&v).expect("json serializes"),
        }
    }

    fn error(status: u16, code: &str, message: impl Into<String>) -> Self {
        Self::json(
            status,
            json!({"error": {"code": code, "message": message.into()}}),
        )
    }

    fn empty(status: u16) -> Self {
        HttpResponse {
            status,
            content_type: "text/plain",
            body: Vec::new(),
        }
    }

    fn text(status: u16, body: impl Into<String>) -> Self {
        HttpResponse {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into().into_bytes(),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Runs the admin server on `listener` until the process exits.
pub async fn run(init: AdminInit, listener: std::net::TcpListener) {
    let AdminInit {
        token,
        node,
        max_body_bytes,
        to_pipeline,
        mut events,
        shard_metrics,
        draining,
        driver,
    } = init;
    let waker = match events.take_wake_socket().map(MonoioWaker::new) {
        Some(Ok(w)) => w,
        _ => {
            tracing::error!("admin: cannot watch the pipeline mailbox");
            return;
        }
    };
    let listener = match monoio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "admin: cannot adopt the listening socket");
            return;
        }
    };
    let admin = Rc::new(Admin {
        token,
        max_body_bytes,
        to_pipeline,
        pending: RefCell::new(HashMap::new()),
        next_token: Cell::new(1),
        shard_metrics,
        draining,
        node,
        driver,
    });
    let a = admin.clone();
    monoio::spawn(async move {
        while let Ok(ev) = mailbox::recv_monoio(&mut events, &waker).await {
            if let Event::Admin { token, reply } = ev {
                if let Some(tx) = a.pending.borrow_mut().remove(&token) {
                    let _ = tx.send(reply);
                }
            }
        }
    });
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                monoio::spawn(serve_conn(admin.clone(), stream));
            }
            Err(e) => {
                tracing::warn!(error = %e, "admin: accept failed");
                monoio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_conn(admin: Rc<Admin>, mut stream: TcpStream) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let req = match monoio::time::timeout(REQUEST_TIMEOUT, read_request(&mut stream, &mut buf))
            .await
        {
            Ok(Ok(Some(req))) => req,
            Ok(Ok(None)) | Err(_) => return,
            Ok(Err(resp)) => {
                let _ = write_response(&mut stream, resp, true).await;
                return;
            }
        };
        let close = req.close;
        let resp = admin.handle(req).await;
        if write_response(&mut stream, resp, close).await.is_err() || close {
            return;
        }
    }
}

/// Reads one request. `Ok(None)` at a clean end of stream; `Err` is the answer to a bad request.
async fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Result<Option<HttpRequest>, HttpResponse> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let mut content_length = 0usize;
                let mut authorization = None;
                let mut close = req.version == Some(0);
                for h in req.headers.iter() {
                    if h.name.eq_ignore_ascii_case("content-length") {
                        content_length = std::str::from_utf8(h.value)
                            .ok()
                            .and_then(|v| v.trim().parse().ok())
                            .ok_or_else(|| {
                                HttpResponse::error(400, "bad_request", "bad Content-Length")
                            })?;
                    } else if h.name.eq_ignore_ascii_case("authorization") {
                        authorization = std::str::from_utf8(h.value).ok().map(str::to_string);
                    } else if h.name.eq_ignore_ascii_case("connection") {
                        close = h.value.eq_ignore_ascii_case(b"close");
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        return Err(HttpResponse::error(
                            400,
                            "bad_request",
                            "chunked bodies are not supported; send Content-Length",
                        ));
                    }
                }
                if head_len + content_length > MAX_REQUEST_BYTES {
                    return Err(HttpResponse::error(413, "too_large", "request over 1 MiB"));
                }
                let method = req.method.unwrap_or("").to_string();
                let path = req.path.unwrap_or("").to_string();
                while buf.len() < head_len + content_length {
                    if !fill(stream, buf).await {
                        return Ok(None);
                    }
                }
                let body = buf[head_len..head_len + content_length].to_vec();
                buf.drain(..head_len + content_length);
                return Ok(Some(HttpRequest {
                    method,
                    path,
                    authorization,
                    body,
                    close,
                }));
            }
            Ok(httparse::Status::Partial) => {
                if buf.len() > MAX_REQUEST_BYTES {
                    return Err(HttpResponse::error(
                        413,
                        "too_large",
                        "request head too large",
                    ));
                }
                if !fill(stream, buf).await {
                    return Ok(None);
                }
            }
            Err(e) => {
                return Err(HttpResponse::error(
                    400,
                    "bad_request",
                    format!("malformed HTTP request: {e}"),
                ))
            }
        }
    }
}

async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let chunk = Vec::with_capacity(8192);
    let (r, chunk) = stream.read(chunk).await;
    match r {
        Ok(0) | Err(_) => false,
        Ok(_) => {
            buf.extend_from_slice(&chunk);
            true
        }
    }
}

async fn write_response(stream: &mut TcpStream, resp: HttpResponse, close: bool) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}\r\n",
        resp.status,
        reason(resp.status),
        resp.content_type,
        resp.body.len(),
        if close { "Connection: close\r\n" } else { "" }
    )
    .into_bytes();
    out.extend_from_slice(&resp.body);
    let (r, _) = stream.write_all(out).await;
    r.map(|_| ())
}

#[derive(Deserialize)]
struct PostMessage {
    from: String,
    to: Target,
    body: String,
    #[serde(default)]
    id: Option<String>,
}

#[derive(Deserialize)]
struct Members {
    members: Vec<String>,
}

#[derive(Deserialize)]
struct MemberChange {
    #[serde(default)]
    add: Vec<String>,
    #[serde(default)]
    remove: Vec<String>,
}

#[derive(Deserialize)]
struct Blocked {
    users: Vec<String>,
}

#[derive(Deserialize, Default)]
struct Kick {
    #[serde(default)]
    device: Option<String>,
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, HttpResponse> {
    serde_json::from_slice(body)
        .map_err(|e| HttpResponse::error(400, "bad_request", format!("bad JSON: {e}")))
}

fn check_ids<'a>(
    what: &str,
    ids: impl IntoIterator<Item = &'a String>,
) -> Result<(), HttpResponse> {
    for id in ids {
        if !is_valid_id(id) {
            return Err(HttpResponse::error(
                400,
                "bad_request",
                format!("{what} {id:?} is not 1..=64 characters of [A-Za-z0-9_.@:-]"),
            ));
        }
    }
    Ok(())
}

impl Admin {
    async fn handle(&self, req: HttpRequest) -> HttpResponse {
        let path = req.path.split('?').next().unwrap_or("").to_string();
        match (req.method.as_str(), path.as_str()) {
            ("GET", "/healthz") => return HttpResponse::text(200, "ok\n"),
            ("GET", "/readyz") => return self.readyz().await,
            ("GET", "/metrics") => return self.metrics().await,
            _ => {}
        }
        if !path.starts_with("/v1/") {
            return HttpResponse::error(404, "not_found", "no such path");
        }
        let authorized = req
            .authorization
            .as_deref()
            .and_then(|h| h.strip_prefix("Bearer "))
            .is_some_and(|t| constant_time_eq(t.trim().as_bytes(), self.token.as_bytes()));
        if !authorized {
            return HttpResponse::error(
                401,
                "unauthorized",
                "missing or wrong admin token (Authorization: Bearer <token>)",
            );
        }
        match self.route(&req.method, &path, &req.body).await {
            Ok(r) | Err(r) => r,
        }
    }

    async fn route(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<HttpResponse, HttpResponse> {
        let parts: Vec<&str> = path.trim_start_matches("/v1/").split('/').collect();
        match (method, parts.as_slice()) {
            ("POST", ["messages"]) => {
                let m: PostMessage = parse(body)?;
                check_ids("from", [&m.from])?;
                match &m.to {
                    Target::User(u) => check_ids("to.user", [u])?,
                    Target::Group(g) => check_ids("to.group", [g])?,
                }
                if let Some(id) = &m.id {
                    check_ids("id", [id])?;
                }
                if m.body.len() > self.max_body_bytes {
                    return Err(HttpResponse::error(
                        413,
                        "too_large",
                        format!(
                            "body is {} bytes, the limit is {}",
                            m.body.len(),
                            self.max_body_bytes
                        ),
                    ));
                }
                let reply = self
                    .call(AdminOp::PostMessage {
                        from: m.from,
                        to: m.to,
                        body: m.body,
                        id: m.id,
                    })
                    .await?;
                match reply {
                    AdminReply::Posted { msg_id, ts, dup } => Ok(HttpResponse::json(
                        200,
                        json!({"msg_id": msg_id.to_string(), "ts": ts, "dup": dup}),
                    )),
                    AdminReply::Refused { code, message } => Err(refusal(code, message)),
                    other => Err(unexpected(other)),
                }
            }
            ("PUT", ["groups", g]) => {
                check_ids("group", [&g.to_string()])?;
                let m: Members = parse(body)?;
                check_ids("member", &m.members)?;
                self.done(AdminOp::PutGroup {
                    group: g.to_string(),
                    members: m.members,
                })
                .await
            }
            ("POST", ["groups", g, "members"]) => {
                check_ids("group", [&g.to_string()])?;
                let m: MemberChange = parse(body)?;
                check_ids("member", m.add.iter().chain(&m.remove))?;
                self.done(AdminOp::ModifyGroup {
                    group: g.to_string(),
                    add: m.add,
                    remove: m.remove,
                })
                .await
            }
            ("GET", ["groups", g]) => {
                check_ids("group", [&g.to_string()])?;
                match self
                    .call(AdminOp::GetGroup {
                        group: g.to_string(),
                    })
                    .await?
                {
                    AdminReply::Group {
                        group,
                        members: Some(members),
                    } => Ok(HttpResponse::json(
                        200,
                        json!({"group": group, "members": members}),
                    )),
                    AdminReply::Group { members: None, .. } => {
                        Err(HttpResponse::error(404, "not_found", "no such group"))
                    }
                    other => Err(unexpected(other)),
                }
            }
            ("PUT", ["users", u, "blocked"]) => {
                check_ids("user", [&u.to_string()])?;
                let b: Blocked = parse(body)?;
                check_ids("blocked user", &b.users)?;
                self.done(AdminOp::PutBlocked {
                    user: u.to_string(),
                    users: b.users,
                })
                .await
            }
            ("GET", ["users", u, "presence"]) => {
                check_ids("user", [&u.to_string()])?;
                match self
                    .call(AdminOp::Presence {
                        user: u.to_string(),
                    })
                    .await?
                {
                    AdminReply::Presence { user, devices } => {
                        let devices: Vec<_> = devices
                            .iter()
                            .map(|d| json!({"device": d.device, "node": d.node, "since": d.since}))
                            .collect();
                        Ok(HttpResponse::json(
                            200,
                            json!({"user": user, "online": !devices.is_empty(), "devices": devices}),
                        ))
                    }
                    other => Err(unexpected(other)),
                }
            }
            ("POST", ["users", u, "kick"]) => {
                check_ids("user", [&u.to_string()])?;
                let k: Kick = if body.iter().all(u8::is_ascii_whitespace) {
                    Kick::default()
                } else {
                    parse(body)?
                };
                if let Some(d) = &k.device {
                    check_ids("device", [d])?;
                }
                self.done(AdminOp::Kick {
                    user: u.to_string(),
                    device: k.device,
                })
                .await
            }
            (_, ["messages"])
            | (_, ["groups", _])
            | (_, ["groups", _, "members"])
            | (_, ["users", _, _]) => Err(HttpResponse::error(
                405,
                "method_not_allowed",
                format!("{method} is not allowed on {path}"),
            )),
            _ => Err(HttpResponse::error(404, "not_found", "no such path")),
        }
    }

    async fn done(&self, op: AdminOp) -> Result<HttpResponse, HttpResponse> {
        match self.call(op).await? {
            AdminReply::Done => Ok(HttpResponse::empty(204)),
            AdminReply::Refused { code, message } => Err(refusal(code, message)),
            other => Err(unexpected(other)),
        }
    }

    async fn call(&self, op: AdminOp) -> Result<AdminReply, HttpResponse> {
        let token = self.next_token.get();
        self.next_token.set(token + 1);
        let (tx, rx) = oneshot::channel();
        self.pending.borrow_mut().insert(token, tx);
        if self.to_pipeline.send(Request::Admin { token, op }).is_err() {
            self.pending.borrow_mut().remove(&token);
            return Err(HttpResponse::error(
                503,
                "unavailable",
                "the pipeline is overloaded; retry",
            ));
        }
        match monoio::time::timeout(PIPELINE_TIMEOUT, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            _ => {
                self.pending.borrow_mut().remove(&token);
                Err(HttpResponse::error(
                    503,
                    "unavailable",
                    "the pipeline did not answer in time",
                ))
            }
        }
    }

    async fn stats(&self) -> Option<Stats> {
        match monoio::time::timeout(Duration::from_secs(2), self.call(AdminOp::Stats)).await {
            Ok(Ok(AdminReply::Stats(s))) => Some(s),
            _ => None,
        }
    }

    async fn readyz(&self) -> HttpResponse {
        if self.draining.load(Ordering::Relaxed) {
            return HttpResponse::text(503, "draining\n");
        }
        match self.stats().await {
            Some(s) if s.log_healthy => HttpResponse::text(200, "ready\n"),
            Some(_) => HttpResponse::text(503, "log unhealthy\n"),
            None => HttpResponse::text(503, "pipeline not answering\n"),
        }
    }

    async fn metrics(&self) -> HttpResponse {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP flare_info Build and runtime of this node.\n# TYPE flare_info gauge"
        );
        let _ = writeln!(
            out,
            "flare_info{{node=\"{}\",version=\"{}\",driver=\"{}\"}} 1",
            self.node,
            env!("CARGO_PKG_VERSION"),
            self.driver
        );
        let series: Vec<_> = self.shard_metrics.iter().map(|m| m.series()).collect();
        if let Some(first) = series.first() {
            for (i, (name, help, kind, _)) in first.iter().enumerate() {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
                for (shard, s) in series.iter().enumerate() {
                    let _ = writeln!(out, "{name}{{shard=\"{shard}\"}} {}", s[i].3);
                }
            }
        }
        let _ = writeln!(
            out,
            "# HELP flare_draining 1 while the node drains\n# TYPE flare_draining gauge\nflare_draining {}",
            u8::from(self.draining.load(Ordering::Relaxed))
        );
        if let Some(s) = self.stats().await {
            let rows: [(&str, &str, &str, u64); 10] = [
                (
                    "flare_messages_accepted_total",
                    "messages made durable",
                    "counter",
                    s.messages_accepted,
                ),
                (
                    "flare_messages_dup_total",
                    "sends answered as duplicates",
                    "counter",
                    s.messages_dup,
                ),
                (
                    "flare_log_commits_total",
                    "group commits of the log",
                    "counter",
                    s.log_commits,
                ),
                ("flare_log_bytes", "bytes in the log", "gauge", s.log_bytes),
                (
                    "flare_log_healthy",
                    "1 while the log accepts writes",
                    "gauge",
                    u64::from(s.log_healthy),
                ),
                (
                    "flare_pipeline_sessions",
                    "sessions known to the pipeline",
                    "gauge",
                    s.sessions,
                ),
                ("flare_users", "users with an inbox", "gauge", s.users),
                (
                    "flare_inbox_entries",
                    "inbox entries held",
                    "gauge",
                    s.inbox_entries,
                ),
                (
                    "flare_dedup_entries",
                    "sends remembered for the dedup window",
                    "gauge",
                    s.dedup_entries,
                ),
                (
                    "flare_dedup_evicted_total",
                    "dedup entries forgotten before their window ended (the table was full)",
                    "counter",
                    s.dedup_evicted,
                ),
            ];
            for (name, help, kind, v) in rows {
                let _ = writeln!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
                );
            }
            write_flush_histogram(&mut out, &s.log_flush);
        }
        HttpResponse {
            status: 200,
            content_type: "text/plain; version=0.0.4",
            body: out.into_bytes(),
        }
    }
}

/// The log's flush times as a Prometheus histogram (cumulative buckets, in seconds).
fn write_flush_histogram(out: &mut String, times: &FlushTimes) {
    use std::fmt::Write;
    let name = "flare_log_flush_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} time a group commit took to write and fdatasync the log\n# TYPE {name} histogram"
    );
    let mut below = 0;
    for (bound_us, n) in FLUSH_BUCKETS_US.iter().zip(&times.counts) {
        below += n;
        let le = *bound_us as f64 / 1e6;
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {below}");
    }
    let count = times.count();
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "{name}_sum {}", times.sum_us as f64 / 1e6);
    let _ = writeln!(out, "{name}_count {count}");
}

fn refusal(code: ErrorCode, message: String) -> HttpResponse {
    let status = match code {
        ErrorCode::Forbidden => 403,
        ErrorCode::Unavailable => 503,
        ErrorCode::TooLarge => 413,
        ErrorCode::BadFrame => 400,
        _ => 500,
    };
    HttpResponse::error(status, code.as_str(), message)
}

fn unexpected(reply: AdminReply) -> HttpResponse {
    tracing::error!(?reply, "admin: unexpected pipeline reply");
    HttpResponse::error(500, "internal", "unexpected pipeline reply")
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
