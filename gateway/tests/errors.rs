//! Errors and close codes end to end (PROTOCOL.md §3, §6, §7): every bad input gets
//! the `error` code or close code the protocol names, and nothing else.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn goaway<'a>(frames: &'a [Value], reason: &str) -> &'a Value {
    let g = frames
        .iter()
        .find(|f| f["type"] == "goaway")
        .unwrap_or_else(|| {
            panic!("expected goaway{{reason:{reason}}} before the close, frames: {frames:?}")
        });
    assert_eq!(g["reason"], reason, "{g}");
    assert!(
        g["reconnect_after_ms"].is_u64(),
        "goaway.reconnect_after_ms: {g}"
    );
    g
}

/// An `error` with `code` must be among the frames received before the close.
fn error_in<'a>(frames: &'a [Value], code: &str, ctx: &str) -> &'a Value {
    let e = frames
        .iter()
        .find(|f| f["type"] == "error")
        .unwrap_or_else(|| {
            panic!("{ctx}: expected error{{code:{code}}} before the close, frames: {frames:?}")
        });
    assert_eq!(e["code"], code, "{ctx}: {e}");
    assert!(e["message"].is_string(), "{ctx}: error.message: {e}");
    e
}

/// bad_frame for each kind of bad frame; the connection stays open.
#[test]
fn bad_frame_keeps_the_connection_open() {
    let s = Server::start();
    let (mut c, _) = s.login("alice", "phone", None);
    let long_id = "i".repeat(65);
    let cases: Vec<String> = vec![
        "{not json".into(),
        "[1,2,3]".into(),
        "\"auth\"".into(),
        r#"{"type":"nope"}"#.into(),
        r#"{"no_type":1}"#.into(),
        r#"{"type":"send","id":"x","to":{"user":"bob"}}"#.into(),
        r#"{"type":"send","id":"x","body":"b"}"#.into(),
        r#"{"type":"send","to":{"user":"bob"},"body":"b"}"#.into(),
        r#"{"type":"send","id":"x","to":{"user":"bob"},"body":5}"#.into(),
        r#"{"type":"send","id":"x","to":{"planet":"mars"},"body":"b"}"#.into(),
        r#"{"type":"send","id":"x","to":{"user":"b o b"},"body":"b"}"#.into(),
        r#"{"type":"send","id":"","to":{"user":"bob"},"body":"b"}"#.into(),
        r#"{"type":"send","id":"x y","to":{"user":"bob"},"body":"b"}"#.into(),
        format!(r#"{{"type":"send","id":"{long_id}","to":{{"user":"bob"}},"body":"b"}}"#),
        r#"{"type":"ack"}"#.into(),
        r#"{"type":"ack","seq":-1}"#.into(),
        r#"{"type":"ack","seq":"7"}"#.into(),
        r#"{"type":"sync","after":0}"#.into(),
    ];
    for case in &cases {
        c.send_text(case);
        let e = c.recv();
        assert_error(&e, "bad_frame", None);
        // A good frame in between: the "10 in a row" count restarts, the connection is fine.
        c.ping_pong();
    }
    c.send_ok("ok-1", "alice", "still works");
}

/// §6: "after 10 in a row, close 4000".
#[test]
fn ten_bad_frames_in_a_row_close_4000() {
    let s = Server::start();
    let (mut c, _) = s.login("alice", "phone", None);
    // 9 in a row, one good frame, 9 more: still open.
    for _ in 0..9 {
        c.send_text("{oops");
    }
    c.ping_pong();
    let errs = c
        .stashed()
        .iter()
        .filter(|f| f["code"] == "bad_frame")
        .count();
    assert_eq!(errs, 9, "one bad_frame per bad frame: {:?}", c.stashed());
    for _ in 0..9 {
        c.send_text("{oops");
    }
    c.ping_pong();
    // 10 in a row: close 4000.
    for _ in 0..10 {
        if c.try_send_json(&json!("bad")).is_err() {
            break;
        }
    }
    let (code, frames) = c.expect_close();
    assert_eq!(
        code,
        Some(4000),
        "close after 10 bad frames in a row (frames {frames:?})"
    );
}

/// §3.1: any frame before `auth` → error unauthenticated, close 4001.
#[test]
fn frames_before_auth_are_unauthenticated_4001() {
    let s = Server::start();
    let frames = [
        json!({"type": "send", "id": "x", "to": {"user": "bob"}, "body": "hi"}),
        json!({"type": "ping"}),
        json!({"type": "ack", "seq": 1}),
        json!({"type": "sync", "after": 0, "limit": 10}),
    ];
    for f in frames {
        let mut c = s.client();
        c.send_json(f.clone());
        let (code, got) = c.expect_close();
        error_in(&got, "unauthenticated", &format!("first frame {f}"));
        assert_eq!(
            code,
            Some(4001),
            "first frame {f}: close code (frames {got:?})"
        );
    }
}

/// §3.1: an unparseable first frame is "anything else" too: close 4001.
/// (PROTOCOL.md does not say whether its error is `unauthenticated` or `bad_frame`.)
#[test]
fn garbage_before_auth_closes_4001() {
    let s = Server::start();
    let mut c = s.client();
    c.send_text("{garbage");
    let (code, got) = c.expect_close();
    let e = got.iter().find(|f| f["type"] == "error");
    if let Some(e) = e {
        assert!(
            e["code"] == "unauthenticated" || e["code"] == "bad_frame",
            "{e}"
        );
    }
    assert_eq!(code, Some(4001), "frames {got:?}");
}

/// §3.1: silence → close 4001 after the auth timeout.
#[test]
fn silence_before_auth_closes_4001() {
    let s = Server::with_args(&["--auth-timeout-ms", "500"]);
    let mut c = s.client();
    let (code, got) = c.expect_close_within(Duration::from_secs(30));
    assert_eq!(code, Some(4001), "frames {got:?}");
    // Same with a raw socket that completes the upgrade and says nothing at all.
    let mut r = RawWs::connect(s.ws, None);
    assert_eq!(r.status, 101);
    let (code, got) = r.expect_close_within(Duration::from_secs(30));
    assert_eq!(code, Some(4001), "frames {got:?}");
}

/// §3.2, §6: each way a token can be wrong → error auth_failed, close 4001.
#[test]
fn auth_failed_variants_close_4001() {
    let s = Server::start();
    let exp = now_secs() + 3600;
    let hs256 = json!({"alg": "HS256", "typ": "JWT"});
    let good = token("alice");
    let gp: Vec<&str> = good.split('.').collect();
    let forged_payload = b64url(json!({"sub": "mallory", "exp": exp}).to_string().as_bytes());
    let cases: Vec<(&str, String, Option<&str>)> = vec![
        (
            "wrong secret",
            jwt_hs256(
                &hs256,
                &json!({"sub": "alice", "exp": exp}),
                b"not-the-secret",
            ),
            None,
        ),
        (
            "payload swapped under a valid signature",
            format!("{}.{}.{}", gp[0], forged_payload, gp[2]),
            None,
        ),
        ("signature stripped", format!("{}.{}.", gp[0], gp[1]), None),
        (
            "alg none",
            jwt_none(&json!({"sub": "alice", "exp": exp})),
            None,
        ),
        (
            "alg none, signature kept",
            {
                let n = jwt_none(&json!({"sub": "alice", "exp": exp}));
                format!("{n}{}", gp[2])
            },
            None,
        ),
        (
            "HS384 with the right secret",
            jwt_hs384(&json!({"sub": "alice", "exp": exp}), SECRET.as_bytes()),
            None,
        ),
        (
            "header says HS384, HS256 signature",
            jwt_hs256(
                &json!({"alg": "HS384", "typ": "JWT"}),
                &json!({"sub": "alice", "exp": exp}),
                SECRET.as_bytes(),
            ),
            None,
        ),
        ("missing sub", token_claims(&json!({"exp": exp})), None),
        ("missing exp", token_claims(&json!({"sub": "alice"})), None),
        (
            "empty sub",
            token_claims(&json!({"sub": "", "exp": exp})),
            None,
        ),
        (
            "sub with a space",
            token_claims(&json!({"sub": "al ice", "exp": exp})),
            None,
        ),
        (
            "sub with a slash",
            token_claims(&json!({"sub": "alice/x", "exp": exp})),
            None,
        ),
        (
            "sub with non-ASCII",
            token_claims(&json!({"sub": "alicé", "exp": exp})),
            None,
        ),
        (
            "sub of 65 bytes",
            token_claims(&json!({"sub": "a".repeat(65), "exp": exp})),
            None,
        ),
        (
            "dev claim with a space",
            token_claims(&json!({"sub": "alice", "exp": exp, "dev": "my phone"})),
            None,
        ),
        ("auth.device with a space", token("alice"), Some("my phone")),
        (
            "auth.device of 65 bytes",
            token("alice"),
            Some("dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd"),
        ),
        ("not a JWT", "garbage".to_string(), None),
        ("three garbage parts", "a.b.c".to_string(), None),
        ("empty token", String::new(), None),
    ];
    for (what, tok, device) in cases {
        let mut c = s.client();
        c.name = what.to_string();
        let mut f = json!({"type": "auth", "token": tok});
        if let Some(d) = device {
            f["device"] = json!(d);
        }
        c.send_json(f);
        let (code, got) = c.expect_close();
        assert!(
            !got.iter().any(|f| f["type"] == "auth_ok"),
            "{what}: the server accepted the token: {got:?}"
        );
        error_in(&got, "auth_failed", what);
        assert_eq!(code, Some(4001), "{what}: close code (frames {got:?})");
    }
}

/// §3, §6: `exp` in the past at auth → error token_expired, close 4002.
#[test]
fn expired_token_at_auth_closes_4002() {
    let s = Server::start();
    let mut c = s.client();
    c.send_json(json!({"type": "auth", "token": token_claims(&json!({"sub": "alice", "exp": now_secs() - 3600}))}));
    let (code, got) = c.expect_close();
    error_in(&got, "token_expired", "exp an hour ago");
    assert_eq!(code, Some(4002), "frames {got:?}");
}

/// §3.4: a token that expires during the session → goaway{token_expired}, close 4002.
#[test]
fn token_expiring_during_session_goaway_4002() {
    let s = Server::start();
    let mut c = s.client();
    let ok = c.auth(
        &token_claims(&json!({"sub": "alice", "exp": now_secs() + 4})),
        Some("phone"),
        None,
    );
    assert_eq!(ok["type"], "auth_ok");
    let (code, got) = c.expect_close_within(Duration::from_secs(40));
    goaway(&got, "token_expired");
    assert_eq!(code, Some(4002), "frames {got:?}");
}

/// §6 too_large: body over max_body_bytes (bytes, not characters); the connection stays open.
#[test]
fn body_over_max_body_bytes_is_too_large() {
    let s = Server::with_args(&["--max-body-bytes", "1024"]);
    let (mut c, _) = s.login("alice", "phone", None);
    c.send_ok("fits", "bob", &"x".repeat(1024));
    c.send_to_user("big", "bob", &"x".repeat(1025));
    assert_error(&c.answer_to("big"), "too_large", Some("big"));
    c.ping_pong();
    // 600 two-byte characters: 1200 bytes.
    c.send_to_user("big-utf8", "bob", &"é".repeat(600));
    assert_error(&c.answer_to("big-utf8"), "too_large", Some("big-utf8"));
    c.ping_pong();
    c.send_ok("after", "bob", "small");
    // Nothing of the refused sends reached the inbox.
    let (mut b, _) = s.login("bob", "phone", Some(0));
    let ms = b.recv_msgs(2);
    assert_eq!(seqs(&ms), vec![1, 2]);
    assert_eq!(ms[1]["body"], "small");
    b.ping_pong();
    assert!(b.stashed().is_empty(), "{:?}", b.stashed());
}

/// §6 rate_limited: `--sends-per-sec 5` (burst 5); 50 sends at once; the refused
/// ones name their send and are not stored; the connection stays open.
#[test]
fn sends_over_the_rate_are_rate_limited() {
    let s = Server::with_args(&["--sends-per-sec", "5"]);
    let (mut c, _) = s.login("alice", "phone", None);
    for i in 0..50 {
        c.send_to_user(&format!("r{i}"), "bob", &format!("r{i}"));
    }
    let mut ok = Vec::new();
    let mut limited = 0;
    for i in 0..50 {
        let id = format!("r{i}");
        let a = c.answer_to(&id);
        match a["type"].as_str() {
            Some("send_ok") => ok.push(id),
            _ => {
                assert_error(&a, "rate_limited", Some(&id));
                limited += 1;
            }
        }
    }
    assert!(
        ok.len() >= 5,
        "a burst of 5 must pass, got {} send_ok",
        ok.len()
    );
    assert!(
        limited >= 1,
        "50 sends at once with --sends-per-sec 5: none was rate_limited"
    );
    c.ping_pong();
    // The bucket refills: a send succeeds again (retry until it does, bounded).
    let mut again = false;
    for k in 0..40 {
        let id = format!("later-{k}");
        c.send_to_user(&id, "bob", &id);
        let a = c.answer_to(&id);
        if a["type"] == "send_ok" {
            ok.push(id.clone());
            again = true;
            break;
        }
        assert_error(&a, "rate_limited", Some(&id));
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(again, "no send accepted again after the bucket refilled");
    // Only the accepted sends are in bob's inbox.
    let (mut b, _) = s.login("bob", "phone", None);
    let all = b.sync_all(0);
    assert_eq!(
        bodies(&all),
        ok,
        "bob's inbox must hold exactly the accepted sends, in order"
    );
}

/// §7 1009: a WebSocket message over `--max-frame-bytes`.
#[test]
fn message_over_max_frame_bytes_closes_1009() {
    // (The server requires max_body_bytes <= max_frame_bytes.)
    let s = Server::with_args(&["--max-frame-bytes", "4096", "--max-body-bytes", "4000"]);
    let (mut c, _) = s.login("alice", "phone", None);
    // Just under the limit is fine.
    c.send_ok("fits", "alice", &"x".repeat(3900));
    let big =
        json!({"type": "send", "id": "big", "to": {"user": "alice"}, "body": "x".repeat(8192)});
    let _ = c.try_send_json(&big);
    let (code, got) = c.expect_close();
    assert_eq!(
        code,
        Some(1009),
        "frames {:?}",
        got.iter().map(|f| f["type"].clone()).collect::<Vec<_>>()
    );
}

/// §7 1002: an unmasked client frame (RFC 6455 §5.1: the server must fail the connection).
#[test]
fn unmasked_client_frame_closes_1002() {
    let s = Server::start();
    let mut r = RawWs::connect(s.ws, None);
    assert_eq!(r.status, 101);
    r.send_json(json!({"type": "auth", "token": token("alice"), "device": "phone"}));
    assert_eq!(r.recv_json()["type"], "auth_ok");
    r.write_frame(true, OP_TEXT, br#"{"type":"ping"}"#, false)
        .unwrap();
    let (code, got) = r.expect_close_within(CLOSE_TIMEOUT);
    assert_eq!(code, Some(1002), "frames {got:?}");
}

/// §7 1002: other RFC 6455 violations, each on its own connection.
#[test]
fn websocket_protocol_violations_close_1002() {
    let s = Server::start();
    type Violation = (&'static str, Box<dyn Fn(&mut RawWs)>);
    let cases: Vec<Violation> = vec![
        (
            "RSV1 set without an extension",
            Box::new(|r: &mut RawWs| {
                // 0xC1: FIN | RSV1 | text
                write_raw(r, 0xC1, br#"{"type":"ping"}"#);
            }),
        ),
        (
            "reserved opcode 0x3",
            Box::new(|r: &mut RawWs| r.write_frame(true, 0x3, b"x", true).unwrap()),
        ),
        (
            "continuation without a start",
            Box::new(|r: &mut RawWs| r.write_frame(true, OP_CONT, b"x", true).unwrap()),
        ),
        (
            "fragmented ping",
            Box::new(|r: &mut RawWs| r.write_frame(false, OP_PING, b"x", true).unwrap()),
        ),
        (
            "ping of 126 bytes",
            Box::new(|r: &mut RawWs| r.write_frame(true, OP_PING, &[b'p'; 126], true).unwrap()),
        ),
        (
            "new text message inside a fragmented one",
            Box::new(|r: &mut RawWs| {
                r.write_frame(false, OP_TEXT, b"{\"type\":", true).unwrap();
                r.write_frame(true, OP_TEXT, b"\"ping\"}", true).unwrap();
            }),
        ),
    ];
    for (what, act) in cases {
        let mut r = RawWs::connect(s.ws, None);
        assert_eq!(r.status, 101);
        r.send_json(json!({"type": "auth", "token": token("alice"), "device": "phone"}));
        assert_eq!(r.recv_json()["type"], "auth_ok", "{what}");
        act(&mut r);
        let (code, got) = r.expect_close_within(CLOSE_TIMEOUT);
        assert_eq!(code, Some(1002), "{what}: frames {got:?}");
    }
}

/// A masked frame with an arbitrary first byte.
fn write_raw(r: &mut RawWs, b0: u8, payload: &[u8]) {
    use std::io::Write;
    assert!(payload.len() < 126);
    let key = rand_bytes::<4>();
    let mut f = vec![b0, 0x80 | payload.len() as u8];
    f.extend_from_slice(&key);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    r.stream.write_all(&f).unwrap();
}

/// §7 1007: invalid UTF-8 in a text message.
#[test]
fn invalid_utf8_text_closes_1007() {
    let s = Server::start();
    let mut r = RawWs::connect(s.ws, None);
    assert_eq!(r.status, 101);
    r.send_json(json!({"type": "auth", "token": token("alice"), "device": "phone"}));
    assert_eq!(r.recv_json()["type"], "auth_ok");
    let mut payload = br#"{"type":"send","id":"u","to":{"user":"bob"},"body":""#.to_vec();
    payload.extend_from_slice(&[0xC3, 0x28, 0xFF]);
    payload.extend_from_slice(br#""}"#);
    r.write_frame(true, OP_TEXT, &payload, true).unwrap();
    let (code, got) = r.expect_close_within(CLOSE_TIMEOUT);
    assert_eq!(code, Some(1007), "frames {got:?}");
}

/// RFC 6455 §5.4: a fragmented message with a control frame in the middle is one
/// protocol frame; the ping is answered with a pong.
#[test]
fn fragmented_message_is_one_frame() {
    let s = Server::start();
    let mut r = RawWs::connect(s.ws, None);
    assert_eq!(r.status, 101);
    let auth = json!({"type": "auth", "token": token("alice"), "device": "phone"}).to_string();
    let b = auth.as_bytes();
    let (p1, rest) = b.split_at(10);
    let (p2, p3) = rest.split_at(rest.len() / 2);
    r.write_frame(false, OP_TEXT, p1, true).unwrap();
    r.write_frame(false, OP_CONT, p2, true).unwrap();
    r.write_frame(true, OP_PING, b"hb", true).unwrap();
    r.write_frame(true, OP_CONT, p3, true).unwrap();
    let mut got_pong = false;
    let mut got_auth_ok = false;
    while !(got_pong && got_auth_ok) {
        match r.read_frame(RECV_TIMEOUT) {
            RawEvent::Frame {
                opcode: OP_PONG,
                payload,
                ..
            } => {
                assert_eq!(payload, b"hb", "pong must echo the ping's payload");
                got_pong = true;
            }
            RawEvent::Frame {
                opcode: OP_TEXT,
                payload,
                ..
            } => {
                let v: Value = serde_json::from_slice(&payload).unwrap();
                assert_eq!(v["type"], "auth_ok", "{v}");
                got_auth_ok = true;
            }
            RawEvent::Frame {
                opcode, payload, ..
            } => panic!("unexpected opcode {opcode:#x}: {payload:?}"),
            RawEvent::Eof => panic!("EOF (pong {got_pong}, auth_ok {got_auth_ok})"),
            RawEvent::Timeout => panic!("timeout (pong {got_pong}, auth_ok {got_auth_ok})"),
        }
    }
}

/// §3.3, §7: replaced → goaway{replaced}, close 4003 (also in session.rs across shards).
#[test]
fn replaced_session_goaway_4003() {
    let s = Server::start();
    let (mut old, _) = s.login("alice", "phone", None);
    let (mut new, _) = s.login("alice", "phone", None);
    let (code, got) = old.expect_close();
    goaway(&got, "replaced");
    assert_eq!(code, Some(4003), "frames {got:?}");
    new.ping_pong();
    new.send_ok("n", "alice", "new session works");
}

/// Bad input on one connection harms no other connection.
#[test]
fn bad_connections_do_not_harm_others() {
    let s = Server::with_args(&["--max-frame-bytes", "4096", "--max-body-bytes", "1024"]);
    let (mut a, _) = s.login("alice", "phone", None);
    let (mut b, _) = s.login("bob", "phone", None);
    // A burst of misbehaving clients.
    for i in 0..10 {
        let mut r = RawWs::connect(s.ws, None);
        match i % 3 {
            0 => r
                .write_frame(true, OP_TEXT, br#"{"type":"ping"}"#, false)
                .unwrap(),
            1 => r.write_frame(true, OP_TEXT, &[0xFF, 0xFE], true).unwrap(),
            _ => {
                let _ = r.write_frame(true, OP_BINARY, &vec![0u8; 10_000], true);
            }
        }
        let _ = r.expect_close_within(CLOSE_TIMEOUT);
    }
    let ok = a.send_ok("fine", "bob", "fine");
    let m = b.recv_until("msg", |v| v["type"] == "msg");
    assert_eq!(m["msg_id"], ok["msg_id"]);
    a.ping_pong();
    b.ping_pong();
}

/// §7 4008: a client that does not read while messages pile up is closed 4008 once
/// its outbound queue passes `--outbound-bytes-max`; the sender is never held up, and
/// nothing is lost (the messages are in the inbox).
#[test]
fn slow_consumer_closes_4008_without_holding_up_the_sender() {
    const N: usize = 200;
    // (The server requires outbound_bytes_max >= max_frame_bytes >= max_body_bytes.)
    let s = Server::with_args(&[
        "--outbound-bytes-max",
        "262144",
        "--max-frame-bytes",
        "131072",
    ]);
    // bob and alice on one shard: while bob is being closed and is still not
    // reading, his shard must keep serving alice.
    let mut slow = (0..60)
        .find_map(|_| {
            let mut slow = RawWs::connect_small_rcvbuf(s.ws, 4096);
            assert_eq!(slow.status, 101);
            slow.send_json(json!({"type": "auth", "token": token("bob"), "device": "slow"}));
            let ok = slow.recv_json();
            assert_eq!(ok["type"], "auth_ok");
            (session_shard(&ok) == 0).then_some(slow)
        })
        .expect("a session on shard 0 within 60 connections");
    // bob stops reading; alice sends 200 × 60 KB (12 MB) to him.
    let (mut a, _) = s.login_on_shard("alice", "phone", 0, None);
    let body = "y".repeat(60_000);
    // One send at a time, reading our own answer and inbox copy each time, so that
    // alice's own outbound queue stays far below the limit.
    for i in 0..N {
        let r = alice_send(&mut a, &format!("s{i}"), &body);
        assert_eq!(
            r["type"], "send_ok",
            "the sender must not be refused because bob is slow: {r}"
        );
        a.recv_until("alice's own copy", |v| v["type"] == "msg");
    }
    // Now bob reads: whatever was queued, then close 4008.
    let (code, frames) = slow.expect_close_within(Duration::from_secs(60));
    assert_eq!(
        code,
        Some(4008),
        "slow consumer close code after {} frames",
        frames.len()
    );
    // Everything is in bob's inbox (small pages: 3 × 60 KB stays under the limit).
    let (mut b, _) = s.login("bob", "audit", None);
    let all = b.sync_all_by(0, 3);
    assert_eq!(all.len(), N, "bob's inbox");
}

fn alice_send(a: &mut Client, id: &str, body: &str) -> Value {
    a.send_to_user(id, "bob", body);
    a.answer_to(id)
}
