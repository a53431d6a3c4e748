//! The rkyv encoding end to end (PROTOCOL.md §1): subprotocol `flare.v1.rkyv`, one
//! validated archive of `ClientFrame`/`ServerFrame` per WebSocket binary message,
//! interoperating with JSON sessions.

mod common;

use common::*;
use flare_codec::frame::{ClientFrame, Encoding, ErrorCode, ServerFrame, Target};
use serde_json::json;

struct RkyvClient {
    c: Client,
}

impl RkyvClient {
    fn connect(s: &Server) -> RkyvClient {
        let c = Client::connect(s.ws, Some("flare.v1.rkyv")).expect("connect with flare.v1.rkyv");
        assert_eq!(
            c.protocol.as_deref(),
            Some("flare.v1.rkyv"),
            "the server must echo flare.v1.rkyv"
        );
        RkyvClient { c }
    }

    fn send(&mut self, f: ClientFrame) {
        self.c
            .try_send_binary(f.encode(Encoding::Rkyv))
            .expect("send rkyv frame");
    }

    fn recv(&mut self) -> ServerFrame {
        match self.c.next_event(RECV_TIMEOUT) {
            Event::Binary(b) => ServerFrame::decode(Encoding::Rkyv, &b).unwrap_or_else(|e| {
                panic!(
                    "server sent an archive that does not validate: {e} ({} bytes)",
                    b.len()
                )
            }),
            Event::Frame(v) => panic!("rkyv session got a text (JSON) message: {v}"),
            other => panic!("rkyv session: expected a binary message, got {other:?}"),
        }
    }

    fn recv_until(&mut self, pred: impl Fn(&ServerFrame) -> bool) -> ServerFrame {
        for _ in 0..1000 {
            let f = self.recv();
            if pred(&f) {
                return f;
            }
        }
        panic!("rkyv session: 1000 frames without the one expected");
    }
}

fn user(u: &str) -> Target {
    Target::User(u.to_string())
}

#[test]
fn rkyv_session_interoperates_with_json() {
    let s = Server::start();
    let (mut b, _) = s.login("bob", "phone", None);
    b.ping_pong();
    let mut a = RkyvClient::connect(&s);
    a.send(ClientFrame::Auth {
        token: token("alice"),
        device: Some("rk".into()),
        last_seq: None,
    });
    match a.recv() {
        ServerFrame::AuthOk {
            user,
            device,
            node,
            head_seq,
            heartbeat_ms,
            session,
        } => {
            assert_eq!(
                (user.as_str(), device.as_str(), node.as_str()),
                ("alice", "rk", NODE_ID)
            );
            assert_eq!(head_seq, 0);
            assert_eq!(heartbeat_ms, 30000);
            assert!(!session.is_empty());
        }
        other => panic!("expected AuthOk, got {other:?}"),
    }
    a.send(ClientFrame::Ping);
    assert_eq!(a.recv(), ServerFrame::Pong);

    // rkyv → JSON.
    a.send(ClientFrame::Send {
        id: "r-1".into(),
        to: user("bob"),
        body: "hi from rkyv ✓".into(),
    });
    let (mid, ts) = match a.recv() {
        ServerFrame::SendOk {
            id,
            msg_id,
            ts,
            dup,
        } => {
            assert_eq!(id, "r-1");
            assert!(!dup);
            (msg_id, ts)
        }
        other => panic!("expected SendOk, got {other:?}"),
    };
    let own = a.recv();
    assert_eq!(
        own,
        ServerFrame::Msg {
            seq: 1,
            msg_id: mid,
            from: "alice".into(),
            from_device: "rk".into(),
            to: user("bob"),
            body: "hi from rkyv ✓".into(),
            ts
        }
    );
    let m = b.recv_until("msg", |v| v["type"] == "msg");
    assert_eq!(
        m["msg_id"],
        mid.to_string(),
        "same msg_id in both encodings: {m}"
    );
    assert_eq!(m["body"], "hi from rkyv ✓");
    assert_eq!(m["ts"], ts);
    assert_eq!(m["from_device"], "rk");

    // JSON → rkyv.
    let ok = b.send_ok("j-1", "alice", "hi from json");
    let f = a.recv_until(|f| matches!(f, ServerFrame::Msg { .. }));
    match f {
        ServerFrame::Msg {
            seq,
            msg_id,
            from,
            from_device,
            to,
            body,
            ts,
        } => {
            assert_eq!(seq, 2);
            assert_eq!(msg_id.to_string(), ok["msg_id"].as_str().unwrap());
            assert_eq!(
                (from.as_str(), from_device.as_str(), body.as_str()),
                ("bob", "phone", "hi from json")
            );
            assert_eq!(to, user("alice"));
            assert_eq!(json!(ts), ok["ts"]);
        }
        _ => unreachable!(),
    }

    // Dedup.
    a.send(ClientFrame::Send {
        id: "r-1".into(),
        to: user("bob"),
        body: "again".into(),
    });
    match a.recv() {
        ServerFrame::SendOk {
            id, msg_id, dup, ..
        } => {
            assert_eq!(id, "r-1");
            assert!(dup);
            assert_eq!(msg_id, mid);
        }
        other => panic!("expected SendOk dup, got {other:?}"),
    }

    // Sync.
    a.send(ClientFrame::Sync { after: 0, limit: 1 });
    assert!(matches!(a.recv(), ServerFrame::Msg { seq: 1, .. }));
    assert_eq!(
        a.recv(),
        ServerFrame::SyncDone {
            after: 0,
            last: 1,
            more: true,
            truncated: false
        }
    );
    a.send(ClientFrame::Sync {
        after: 1,
        limit: 1000,
    });
    assert!(matches!(a.recv(), ServerFrame::Msg { seq: 2, .. }));
    assert_eq!(
        a.recv(),
        ServerFrame::SyncDone {
            after: 1,
            last: 2,
            more: false,
            truncated: false
        }
    );

    // Errors come back as rkyv too; a failed validation is bad_frame and the session stays.
    a.c.try_send_binary(vec![0xde, 0xad, 0xbe, 0xef, 1, 2, 3])
        .unwrap();
    match a.recv() {
        ServerFrame::Error { code, .. } => assert_eq!(code, ErrorCode::BadFrame),
        other => panic!("expected Error bad_frame for a garbage archive, got {other:?}"),
    }
    a.send(ClientFrame::Sync { after: 0, limit: 0 });
    match a.recv() {
        ServerFrame::Error { code, .. } => assert_eq!(code, ErrorCode::BadFrame),
        other => panic!("expected Error bad_frame for limit 0, got {other:?}"),
    }
    // Truncated valid archive.
    let mut bytes = ClientFrame::Ping.encode(Encoding::Rkyv);
    bytes.truncate(bytes.len().saturating_sub(1));
    a.c.try_send_binary(bytes).unwrap();
    match a.recv() {
        ServerFrame::Error { code, .. } => assert_eq!(code, ErrorCode::BadFrame),
        other => panic!("expected Error bad_frame for a truncated archive, got {other:?}"),
    }
    a.send(ClientFrame::Ping);
    assert_eq!(a.recv(), ServerFrame::Pong);
}

#[test]
fn rkyv_unauthenticated_and_auth_failed_close_4001() {
    let s = Server::start();
    let mut a = RkyvClient::connect(&s);
    a.send(ClientFrame::Ping);
    match a.recv() {
        ServerFrame::Error { code, .. } => assert_eq!(code, ErrorCode::Unauthenticated),
        other => panic!("expected Error unauthenticated, got {other:?}"),
    }
    let (code, _) = a.c.expect_close();
    assert_eq!(code, Some(4001));

    let mut a = RkyvClient::connect(&s);
    a.send(ClientFrame::Auth {
        token: jwt_none(&json!({"sub": "alice", "exp": now_secs() + 60})),
        device: None,
        last_seq: None,
    });
    match a.recv() {
        ServerFrame::Error { code, .. } => assert_eq!(code, ErrorCode::AuthFailed),
        other => panic!("expected Error auth_failed, got {other:?}"),
    }
    let (code, _) = a.c.expect_close();
    assert_eq!(code, Some(4001));
}
