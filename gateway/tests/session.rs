//! Sessions end to end (PROTOCOL.md §1, §3, §4): subprotocols, auth and device
//! naming, resume by ack cursor and by `last_seq`, replacement, heartbeats, drain,
//! and the `flare token` CLI.

mod common;

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use common::*;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

fn range(a: u64, b: u64) -> Vec<u64> {
    (a..=b).collect()
}

fn bodies_for(seqs: std::ops::RangeInclusive<u64>) -> Vec<String> {
    seqs.map(|i| format!("m{i}")).collect()
}

/// Resume by ack cursor: exactly the entries after the cursor, ascending, then live.
#[test]
fn resume_after_ack_cursor_then_live() {
    let s = Server::start();
    let (mut a, _) = s.login("alice", "phone", None);
    let (mut b, ok) = s.login("bob", "phone", None);
    assert_eq!(ok["head_seq"], 0);
    b.ping_pong();
    for i in 1..=3 {
        a.send_ok(&format!("m{i}"), "bob", &format!("m{i}"));
    }
    let ms = b.recv_msgs(3);
    assert_eq!(seqs(&ms), range(1, 3));
    b.ack(2);
    b.ping_pong(); // the ack is processed before the pong
    b.close();

    for i in 4..=6 {
        a.send_ok(&format!("m{i}"), "bob", &format!("m{i}"));
    }
    let (mut b, ok) = s.login("bob", "phone", None);
    assert_eq!(ok["head_seq"], 6, "auth_ok.head_seq: {ok}");
    let ms = b.recv_msgs(4);
    assert_eq!(seqs(&ms), range(3, 6), "resume after ack cursor 2: {ms:?}");
    assert_eq!(bodies(&ms), bodies_for(3..=6));
    // Then live.
    let ok7 = a.send_ok("m7", "bob", "m7");
    let m = b.recv_until("msg", |v| v["type"] == "msg");
    assert_eq!(seq(&m), 7, "live after resume: {m}");
    assert_eq!(m["msg_id"], ok7["msg_id"]);
    b.ping_pong();
    assert!(
        b.stashed().is_empty(),
        "extra frames after resume: {:?}",
        b.stashed()
    );

    // ack is cumulative and never moves backwards.
    b.ack(7);
    b.ack(3);
    b.ping_pong();
    b.close();
    let (mut b, ok) = s.login("bob", "phone", None);
    assert_eq!(ok["head_seq"], 7);
    a.send_ok("m8", "bob", "m8");
    let m = b.recv_until("msg", |v| v["type"] == "msg");
    assert_eq!(
        seq(&m),
        8,
        "after ack 7 then ack 3 the cursor must stay at 7: {m}"
    );
}

/// Resume by explicit `last_seq` (overrides the cursor); a new device without
/// `last_seq` starts at the head.
#[test]
fn resume_by_last_seq_and_new_device_starts_at_head() {
    let s = Server::start();
    let (mut a, _) = s.login("alice", "phone", None);
    for i in 1..=7 {
        a.send_ok(&format!("m{i}"), "bob", &format!("m{i}"));
    }
    // New device with last_seq 4.
    let (mut t, ok) = s.login("bob", "tablet", Some(4));
    assert_eq!(ok["head_seq"], 7);
    let ms = t.recv_msgs(3);
    assert_eq!(seqs(&ms), range(5, 7));
    assert_eq!(bodies(&ms), bodies_for(5..=7));
    t.ack(7);
    t.ping_pong();
    t.close();
    // last_seq overrides the ack cursor (7).
    let (mut t, _) = s.login("bob", "tablet", Some(5));
    assert_eq!(seqs(&t.recv_msgs(2)), range(6, 7));
    t.close();
    // last_seq 0 replays everything.
    let (mut d, _) = s.login("bob", "desk", Some(0));
    let ms = d.recv_msgs(7);
    assert_eq!(seqs(&ms), range(1, 7));
    assert_eq!(bodies(&ms), bodies_for(1..=7));

    // A device never seen, no last_seq: head_seq 7, no backlog, then live.
    let (mut w, ok) = s.login("bob", "watch", None);
    assert_eq!(ok["head_seq"], 7);
    let ok8 = a.send_ok("m8", "bob", "m8");
    let m = w.recv_until("msg", |v| v["type"] == "msg");
    assert_eq!(seq(&m), 8, "a new device must start at the head, got {m}");
    assert_eq!(m["msg_id"], ok8["msg_id"]);
    w.ping_pong();
    assert!(w.stashed().is_empty(), "{:?}", w.stashed());
}

/// §4: "Within one connection the client sees each seq at most once and never a gap,
/// even when live messages arrive during the catch-up."
#[test]
fn resume_catch_up_with_concurrent_live_messages_has_no_gap_or_duplicate() {
    const BACKLOG: u64 = 300;
    const LIVE: u64 = 150;
    let s = Server::start();
    let (mut a, _) = s.login("alice", "phone", None);
    for i in 1..=BACKLOG {
        a.send_to_user(&format!("m{i}"), "bob", &format!("m{i}"));
    }
    for i in 1..=BACKLOG {
        let r = a.answer_to(&format!("m{i}"));
        assert_eq!(r["type"], "send_ok", "{r}");
    }
    let ws = s.ws;
    let sender = thread::spawn(move || {
        for i in BACKLOG + 1..=BACKLOG + LIVE {
            a.send_to_user(&format!("m{i}"), "bob", &format!("m{i}"));
        }
        for i in BACKLOG + 1..=BACKLOG + LIVE {
            let r = a.answer_to(&format!("m{i}"));
            assert_eq!(r["type"], "send_ok", "{r}");
        }
    });
    let mut b = Client::connect(ws, None).unwrap();
    b.name = "bob/phone".into();
    b.auth(&token("bob"), Some("phone"), Some(0));
    let ms = b.recv_msgs((BACKLOG + LIVE) as usize);
    sender.join().expect("sender thread");
    assert_eq!(
        seqs(&ms),
        range(1, BACKLOG + LIVE),
        "catch-up + live must be one gap-free stream"
    );
    assert_eq!(bodies(&ms), bodies_for(1..=BACKLOG + LIVE));
    b.ping_pong();
    assert!(
        b.stashed().is_empty(),
        "duplicates after catch-up: {:?}",
        b.stashed()
    );
}

/// §3.2: `auth.device` overrides the `dev` claim; with neither, the device is `default`.
#[test]
fn device_from_claim_from_field_or_default() {
    let s = Server::start();
    let mut c = s.client();
    let ok = c.auth(&token_dev("alice", "from-claim"), None, None);
    assert_eq!(ok["device"], "from-claim", "{ok}");
    let mut c = s.client();
    let ok = c.auth(&token_dev("bob", "from-claim"), Some("from-field"), None);
    assert_eq!(ok["device"], "from-field", "{ok}");
    let mut c = s.client();
    let ok = c.auth(&token("carol"), None, None);
    assert_eq!(ok["device"], "default", "{ok}");
    assert_eq!(ok["user"], "carol");
    // The longest legal ids, every legal character.
    let user = format!("{}{}", "a.b@c:d-e_F9", "x".repeat(52));
    assert_eq!(user.len(), 64);
    let dev = "D".repeat(64);
    let mut c = s.client();
    let ok = c.auth(&token(&user), Some(&dev), None);
    assert_eq!(ok["user"], user.as_str());
    assert_eq!(ok["device"], dev.as_str());
    c.ping_pong();
}

/// §3.3: the same user/device connecting again replaces the older session (goaway
/// replaced + close 4003), on the same shard or another one; the new one works.
#[test]
fn same_device_replaces_older_session_on_any_shard() {
    let s = Server::start();
    let (mut b, _) = s.login("bob", "phone", None);
    let (mut old, ok) = s.login("alice", "phone", None);
    let mut old_shard = session_shard(&ok);
    let mut saw_same = false;
    let mut saw_cross = false;
    for round in 0..40 {
        // alice's inbox holds r0..r{round-1} (seqs 1..=round): resume after them.
        let (mut new, ok) = s.login("alice", "phone", Some(round));
        let new_shard = session_shard(&ok);
        let (code, frames) = old.expect_close();
        let goaway = frames.iter().find(|f| f["type"] == "goaway");
        let goaway = goaway
            .unwrap_or_else(|| panic!("round {round}: replaced session got no goaway: {frames:?}"));
        assert_eq!(goaway["reason"], "replaced", "{goaway}");
        assert!(
            goaway["reconnect_after_ms"].is_u64(),
            "goaway.reconnect_after_ms: {goaway}"
        );
        assert_eq!(
            code,
            Some(4003),
            "round {round}: close code of the replaced session (frames {frames:?})"
        );
        // The new session works.
        new.ping_pong();
        let id = format!("r{round}");
        b.send_ok(&id, "alice", &id);
        let m = new.recv_until("msg", |v| v["type"] == "msg");
        assert_eq!(
            m["body"],
            id.as_str(),
            "round {round}: the new session must get live messages"
        );
        if new_shard == old_shard {
            saw_same = true;
        } else {
            saw_cross = true;
        }
        old = new;
        old_shard = new_shard;
        if saw_same && saw_cross {
            return;
        }
    }
    panic!("40 rounds without both a same-shard and a cross-shard replacement (same {saw_same}, cross {saw_cross})");
}

/// §3.5: a silent authenticated connection is closed 1001 after 3 × heartbeat_ms.
/// Raw socket: nothing is sent after auth, not even a pong.
#[test]
fn heartbeat_silent_connection_is_closed_1001() {
    let s = Server::with_args(&["--heartbeat-ms", "300"]);
    let mut r = RawWs::connect(s.ws, None);
    assert_eq!(r.status, 101);
    r.send_json(json!({"type": "auth", "token": token("alice"), "device": "phone"}));
    let ok = r.recv_json();
    assert_eq!(ok["type"], "auth_ok", "{ok}");
    assert_eq!(
        ok["heartbeat_ms"], 300,
        "auth_ok.heartbeat_ms must announce the configured value: {ok}"
    );
    let (code, frames) = r.expect_close_within(Duration::from_secs(30));
    assert_eq!(
        code,
        Some(1001),
        "heartbeat timeout close code (frames {frames:?})"
    );
}

/// §3.5: a connection that sends `ping` (answered by `pong`) stays open well past 3 × heartbeat.
#[test]
fn heartbeat_protocol_pings_keep_the_connection_open() {
    let s = Server::with_args(&["--heartbeat-ms", "300"]);
    let (mut c, _) = s.login("alice", "phone", None);
    let end = Instant::now() + Duration::from_millis(3000);
    while Instant::now() < end {
        c.send_json(json!({"type": "ping"}));
        let p = c.recv();
        assert_eq!(p["type"], "pong", "{p}");
        thread::sleep(Duration::from_millis(100));
    }
    c.ping_pong();
    // And it still carries messages.
    c.send_ok("x", "alice", "still here");
}

/// §3.5: "the client sends ping (or a WebSocket ping)".
#[test]
fn heartbeat_websocket_pings_keep_the_connection_open() {
    let s = Server::with_args(&["--heartbeat-ms", "300"]);
    let (mut c, _) = s.login("alice", "phone", None);
    let end = Instant::now() + Duration::from_millis(3000);
    while Instant::now() < end {
        c.send_ws_ping();
        // Reads (and drops) the WebSocket pong; a Close here fails the test.
        match c.next_event(Duration::from_millis(100)) {
            Event::Timeout => {}
            other => panic!("while sending WebSocket pings: {other:?}"),
        }
    }
    c.ping_pong();
}

/// §1: `flare.v1.json` is echoed; it is chosen among other offers; no offer means
/// JSON and no header; only unknown offers → HTTP 400.
#[test]
fn subprotocol_negotiation() {
    let s = Server::start();
    let r = RawWs::connect(s.ws, Some("flare.v1.json"));
    assert_eq!(r.status, 101);
    assert_eq!(r.header("Sec-WebSocket-Protocol"), Some("flare.v1.json"));

    let r = RawWs::connect(s.ws, Some("chat.v9, flare.v1.json"));
    assert_eq!(r.status, 101);
    assert_eq!(r.header("Sec-WebSocket-Protocol"), Some("flare.v1.json"));

    let r = RawWs::connect(s.ws, Some("flare.v1.rkyv"));
    assert_eq!(r.status, 101);
    assert_eq!(r.header("Sec-WebSocket-Protocol"), Some("flare.v1.rkyv"));

    let r = RawWs::connect(s.ws, None);
    assert_eq!(r.status, 101);
    assert_eq!(
        r.header("Sec-WebSocket-Protocol"),
        None,
        "no subprotocol offered: none may be answered (RFC 6455 §4.1)"
    );

    let r = RawWs::connect(s.ws, Some("chat.v9"));
    assert_eq!(
        r.status, 400,
        "only unknown subprotocols offered: {:?}",
        r.headers
    );
    let r = RawWs::connect(s.ws, Some("flare.v2.json, mqtt"));
    assert_eq!(
        r.status, 400,
        "only unknown subprotocols offered: {:?}",
        r.headers
    );

    // A JSON session with the explicit subprotocol works end to end.
    let mut c = Client::connect(s.ws, Some("flare.v1.json")).unwrap();
    assert_eq!(c.protocol.as_deref(), Some("flare.v1.json"));
    let ok = c.auth(&token("alice"), Some("phone"), None);
    assert_eq!(ok["user"], "alice");
    c.send_ok("j-1", "alice", "json");
}

/// The upgrade is on `/ws`.
#[test]
fn upgrade_on_other_path_is_refused() {
    let s = Server::start();
    let mut st = std::net::TcpStream::connect(s.ws).unwrap();
    use std::io::{Read, Write};
    st.set_read_timeout(Some(RECV_TIMEOUT)).unwrap();
    st.write_all(
        format!(
            "GET /not-ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            s.ws
        )
        .as_bytes(),
    )
    .unwrap();
    let mut buf = [0u8; 256];
    let n = st.read(&mut buf).unwrap_or(0);
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(
        !head.starts_with("HTTP/1.1 101"),
        "upgrade on /not-ws must not succeed: {head:?}"
    );
}

/// SIGTERM drains: sessions get goaway{draining} and close 1001, the process exits 0.
#[test]
fn sigterm_drains_sessions_and_exits_zero() {
    let mut s = Server::start();
    let (mut a, _) = s.login("alice", "phone", None);
    let (mut b, _) = s.login("bob", "phone", None);
    a.ping_pong();
    b.ping_pong();
    s.sigterm();
    for c in [&mut a, &mut b] {
        let (code, frames) = c.expect_close_within(Duration::from_secs(40));
        let g = frames.iter().find(|f| f["type"] == "goaway");
        let g = g
            .unwrap_or_else(|| panic!("[{}] no goaway before the drain close: {frames:?}", c.name));
        assert_eq!(g["reason"], "draining", "{g}");
        assert!(g["reconnect_after_ms"].is_u64(), "{g}");
        assert_eq!(code, Some(1001), "[{}] drain close code", c.name);
    }
    let st = s
        .wait_exit(Duration::from_secs(60))
        .expect("flare did not exit within 60 s of SIGTERM");
    assert_eq!(st.code(), Some(0), "exit status after SIGTERM: {st:?}");
}

/// The dedup table's bound is a flag: `--print-config` shows it, and a value below the
/// minimum is refused before anything starts, with a message naming the flag.
#[test]
fn cli_dedup_bound_is_shown_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let serve = |bound: &str, extra: &[&str]| {
        Command::new(bin())
            .arg("serve")
            .arg("--data")
            .arg(&data)
            .args(["--dedup-max-entries", bound])
            .args(extra)
            .output()
            .expect("run flare serve")
    };
    let out = serve("1000000", &["--print-config"]);
    assert!(out.status.success(), "{out:?}");
    let config = String::from_utf8(out.stdout).unwrap();
    assert!(
        config.lines().any(|l| l == "dedup_max_entries = 1000000"),
        "{config}"
    );
    let out = serve("10", &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--dedup-max-entries must be at least 65536"),
        "{err}"
    );
    assert!(!data.exists(), "nothing was started or created");
}

/// `flare token` mints an HS256 token with sub/dev/exp that the server accepts.
#[test]
fn cli_token_is_accepted() {
    let out = Command::new(bin())
        .args([
            "token",
            "--user",
            "carol",
            "--device",
            "tab",
            "--ttl",
            "1h",
            "--jwt-secret",
            SECRET,
        ])
        .output()
        .expect("run flare token");
    assert!(
        out.status.success(),
        "flare token failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tok = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let parts: Vec<&str> = tok.split('.').collect();
    assert_eq!(parts.len(), 3, "not a JWT: {tok:?}");
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    assert_eq!(header["alg"], "HS256", "{header}");
    assert_eq!(claims["sub"], "carol", "{claims}");
    assert_eq!(claims["dev"], "tab", "{claims}");
    let exp = claims["exp"].as_u64().expect("exp is a number");
    let now = now_secs();
    assert!(
        exp > now + 3000 && exp <= now + 3700,
        "--ttl 1h: exp {exp}, now {now}"
    );
    // HMAC-SHA256 over `header.payload` with the secret's bytes.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{}.{}", parts[0], parts[1]).as_bytes());
    assert_eq!(
        parts[2],
        b64url(&mac.finalize().into_bytes()),
        "signature is not HS256 over the secret"
    );
    let s = Server::start();
    let mut c = s.client();
    let ok = c.auth(&tok, None, None);
    assert_eq!(ok["user"], "carol");
    assert_eq!(ok["device"], "tab");
}
