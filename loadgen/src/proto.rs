//! Flare's protocol frames (PROTOCOL.md §5) as the load generator speaks them.
//!
//! JSON goes through this module's own serde structs, not the gateway's, so a change
//! on either side that breaks the wire contract shows up as an error here. The rkyv
//! encoding uses `flare_codec::frame::{ClientFrame, ServerFrame}` because those Rust
//! types *are* the normative schema of that encoding; server archives are validated
//! (bytecheck) and read in place.

use std::borrow::Cow;

use flare_codec::frame::{ArchivedServerFrame, ClientFrame, ErrorCode, GoawayReason, Target};
use serde::{Deserialize, Serialize};

mod fast_json;

/// The encoding of a session (PROTOCOL.md §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// `flare.v1.json`: JSON text messages.
    Json,
    /// `flare.v1.rkyv`: rkyv archives in binary messages.
    Rkyv,
}

impl Encoding {
    /// The WebSocket subprotocol that selects this encoding.
    pub fn subprotocol(self) -> &'static str {
        match self {
            Encoding::Json => "flare.v1.json",
            Encoding::Rkyv => "flare.v1.rkyv",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Json => "json",
            Encoding::Rkyv => "rkyv",
        }
    }
}

/// Where a `send` goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum To<'a> {
    User(&'a str),
    Group(&'a str),
}

/// A frame the load generator sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outgoing<'a> {
    Auth {
        token: &'a str,
        device: Option<&'a str>,
    },
    Send {
        id: &'a str,
        to: To<'a>,
        body: &'a str,
    },
    Ping,
}

#[derive(Serialize)]
#[serde(rename_all = "lowercase")]
enum JsonTarget<'a> {
    User(&'a str),
    Group(&'a str),
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum JsonClientFrame<'a> {
    Auth {
        token: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        device: Option<&'a str>,
    },
    Send {
        id: &'a str,
        to: JsonTarget<'a>,
        body: &'a str,
    },
    Ping,
}

/// Appends the payload of `frame` in `enc` to `out` (not yet a WebSocket frame).
pub fn encode(enc: Encoding, frame: &Outgoing<'_>, out: &mut Vec<u8>) {
    match enc {
        Encoding::Json => {
            let f = match *frame {
                Outgoing::Auth { token, device } => JsonClientFrame::Auth { token, device },
                Outgoing::Send { id, to, body } => JsonClientFrame::Send {
                    id,
                    to: match to {
                        To::User(u) => JsonTarget::User(u),
                        To::Group(g) => JsonTarget::Group(g),
                    },
                    body,
                },
                Outgoing::Ping => JsonClientFrame::Ping,
            };
            serde_json::to_writer(&mut *out, &f).expect("a client frame serializes to JSON");
        }
        Encoding::Rkyv => {
            let f = match *frame {
                Outgoing::Auth { token, device } => ClientFrame::Auth {
                    token: token.to_owned(),
                    device: device.map(str::to_owned),
                    last_seq: None,
                },
                Outgoing::Send { id, to, body } => ClientFrame::Send {
                    id: id.to_owned(),
                    to: match to {
                        To::User(u) => Target::User(u.to_owned()),
                        To::Group(g) => Target::Group(g.to_owned()),
                    },
                    body: body.to_owned(),
                },
                Outgoing::Ping => ClientFrame::Ping,
            };
            f.encode_into(flare_codec::Encoding::Rkyv, out);
        }
    }
}

/// A frame from the server, with only what the scenarios look at; strings borrow
/// from the received bytes where they can.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming<'a> {
    AuthOk {
        head_seq: u64,
        heartbeat_ms: u64,
    },
    SendOk {
        id: Cow<'a, str>,
        dup: bool,
    },
    Msg {
        seq: u64,
        from: Cow<'a, str>,
        body: Cow<'a, str>,
    },
    Error {
        code: Cow<'a, str>,
        id: Option<Cow<'a, str>>,
    },
    Pong,
    Goaway {
        reason: Cow<'a, str>,
    },
    SyncDone,
}

/// A server frame that is not valid in the session's encoding; its text is the
/// failure reason reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadServerFrame(pub &'static str);

/// Every field any server frame may carry; which ones are required depends on `type`.
#[derive(Deserialize)]
struct JsonServerFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    head_seq: Option<u64>,
    heartbeat_ms: Option<u64>,
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
    dup: Option<bool>,
    seq: Option<u64>,
    #[serde(borrow)]
    from: Option<Cow<'a, str>>,
    #[serde(borrow)]
    body: Option<Cow<'a, str>>,
    #[serde(borrow)]
    code: Option<Cow<'a, str>>,
    #[serde(borrow)]
    reason: Option<Cow<'a, str>>,
}

fn need<T>(v: Option<T>) -> Result<T, BadServerFrame> {
    v.ok_or(BadServerFrame("bad_server_frame:missing_field"))
}

/// Decodes one server message. `is_text` is whether it came in a text message: JSON
/// must, rkyv must not (PROTOCOL.md §1).
pub fn decode(enc: Encoding, is_text: bool, bytes: &[u8]) -> Result<Incoming<'_>, BadServerFrame> {
    match enc {
        Encoding::Json => {
            if !is_text {
                return Err(BadServerFrame("bad_server_frame:binary_in_json_session"));
            }
            if let Some(frame) = fast_json::decode(bytes) {
                return Ok(frame);
            }
            decode_json(bytes)
        }
        Encoding::Rkyv => {
            if is_text {
                return Err(BadServerFrame("bad_server_frame:text_in_rkyv_session"));
            }
            let f = rkyv::access::<ArchivedServerFrame, rkyv::rancor::Error>(bytes)
                .map_err(|_| BadServerFrame("bad_server_frame:invalid_rkyv"))?;
            Ok(match f {
                ArchivedServerFrame::AuthOk {
                    head_seq,
                    heartbeat_ms,
                    ..
                } => Incoming::AuthOk {
                    head_seq: head_seq.to_native(),
                    heartbeat_ms: heartbeat_ms.to_native(),
                },
                ArchivedServerFrame::SendOk { id, dup, .. } => Incoming::SendOk {
                    id: Cow::Borrowed(id.as_str()),
                    dup: *dup,
                },
                ArchivedServerFrame::Msg {
                    seq, from, body, ..
                } => Incoming::Msg {
                    seq: seq.to_native(),
                    from: Cow::Borrowed(from.as_str()),
                    body: Cow::Borrowed(body.as_str()),
                },
                ArchivedServerFrame::Error { code, id, .. } => {
                    let code: ErrorCode = rkyv::deserialize::<ErrorCode, rkyv::rancor::Error>(code)
                        .map_err(|_| BadServerFrame("bad_server_frame:invalid_rkyv"))?;
                    Incoming::Error {
                        code: Cow::Borrowed(code.as_str()),
                        id: id.as_ref().map(|s| Cow::Borrowed(s.as_str())),
                    }
                }
                ArchivedServerFrame::Pong => Incoming::Pong,
                ArchivedServerFrame::Goaway { reason, .. } => {
                    let reason: GoawayReason =
                        rkyv::deserialize::<GoawayReason, rkyv::rancor::Error>(reason)
                            .map_err(|_| BadServerFrame("bad_server_frame:invalid_rkyv"))?;
                    Incoming::Goaway {
                        reason: Cow::Borrowed(reason.as_str()),
                    }
                }
                ArchivedServerFrame::SyncDone { .. } => Incoming::SyncDone,
            })
        }
    }
}

/// Decodes a JSON server frame with serde: the judge of every frame the shortcut in
/// `fast_json` does not take.
fn decode_json(bytes: &[u8]) -> Result<Incoming<'_>, BadServerFrame> {
    let f: JsonServerFrame<'_> = serde_json::from_slice(bytes)
        .map_err(|_| BadServerFrame("bad_server_frame:invalid_json"))?;
    Ok(match &*f.kind {
        "auth_ok" => Incoming::AuthOk {
            head_seq: need(f.head_seq)?,
            heartbeat_ms: need(f.heartbeat_ms)?,
        },
        "send_ok" => Incoming::SendOk {
            id: need(f.id)?,
            dup: need(f.dup)?,
        },
        "msg" => Incoming::Msg {
            seq: need(f.seq)?,
            from: need(f.from)?,
            body: need(f.body)?,
        },
        "error" => Incoming::Error {
            code: need(f.code)?,
            id: f.id,
        },
        "pong" => Incoming::Pong,
        "goaway" => Incoming::Goaway {
            reason: need(f.reason)?,
        },
        "sync_done" => Incoming::SyncDone,
        _ => return Err(BadServerFrame("bad_server_frame:unknown_type")),
    })
}

/// The body of a load-generator message: `<sender seq>.<scheduled send time, ns of
/// CLOCK_MONOTONIC>.` then `x` padding up to `min_len` bytes. CLOCK_MONOTONIC is one
/// clock for every process of the host, so a receiver in another worker process can
/// compute the latency from the scheduled time.
pub fn message_body(seq: u64, scheduled_ns: u64, min_len: usize, out: &mut String) {
    use std::fmt::Write as _;
    out.clear();
    write!(out, "{seq}.{scheduled_ns}.").expect("writing to a String cannot fail");
    while out.len() < min_len {
        out.push('x');
    }
}

/// Parses a body written by [`message_body`]: `(seq, scheduled_ns)`. Byte by byte:
/// a fan-out load generator parses one body per delivery, millions a second.
pub fn parse_body(body: &str) -> Option<(u64, u64)> {
    /// The decimal number `b` starts with, which a `.` ends, and what follows the `.`.
    fn number(b: &[u8]) -> Option<(u64, &[u8])> {
        let end = b.iter().position(|c| !c.is_ascii_digit())?;
        if end == 0 || b[end] != b'.' {
            return None;
        }
        let n = b[..end].iter().try_fold(0u64, |n, &c| {
            n.checked_mul(10)?.checked_add(u64::from(c - b'0'))
        })?;
        Some((n, &b[end + 1..]))
    }
    let (seq, rest) = number(body.as_bytes())?;
    let (sched, _) = number(rest)?;
    Some((seq, sched))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flare_codec::frame::ServerFrame;

    fn server_frames() -> Vec<ServerFrame> {
        vec![
            ServerFrame::AuthOk {
                user: "u1".into(),
                device: "d".into(),
                session: "s".into(),
                node: "n".into(),
                head_seq: 7,
                heartbeat_ms: 30000,
            },
            ServerFrame::SendOk {
                id: "12".into(),
                msg_id: 99,
                ts: 5,
                dup: false,
            },
            ServerFrame::Msg {
                seq: 8,
                msg_id: 99,
                from: "u\"2".into(),
                from_device: "d".into(),
                to: Target::User("u1".into()),
                body: "3.1000.xx".into(),
                ts: 5,
            },
            ServerFrame::Error {
                code: ErrorCode::RateLimited,
                message: "slow down".into(),
                id: Some("13".into()),
            },
            ServerFrame::Pong,
            ServerFrame::Goaway {
                reason: GoawayReason::Replaced,
                reconnect_after_ms: 0,
            },
        ]
    }

    fn expected() -> Vec<Incoming<'static>> {
        vec![
            Incoming::AuthOk {
                head_seq: 7,
                heartbeat_ms: 30000,
            },
            Incoming::SendOk {
                id: "12".into(),
                dup: false,
            },
            Incoming::Msg {
                seq: 8,
                from: "u\"2".into(),
                body: "3.1000.xx".into(),
            },
            Incoming::Error {
                code: "rate_limited".into(),
                id: Some("13".into()),
            },
            Incoming::Pong,
            Incoming::Goaway {
                reason: "replaced".into(),
            },
        ]
    }

    #[test]
    fn decodes_what_the_normative_types_encode_in_both_encodings() {
        for (enc, codec_enc, text) in [
            (Encoding::Json, flare_codec::Encoding::Json, true),
            (Encoding::Rkyv, flare_codec::Encoding::Rkyv, false),
        ] {
            for (frame, want) in server_frames().iter().zip(expected()) {
                let bytes = frame.encode(codec_enc);
                assert_eq!(decode(enc, text, &bytes), Ok(want), "{enc:?} {frame:?}");
            }
            assert!(decode(enc, !text, &server_frames()[4].encode(codec_enc)).is_err());
        }
    }

    #[test]
    fn rejects_bad_server_frames() {
        assert!(decode(Encoding::Json, true, br#"{"type":"msg","seq":1}"#).is_err());
        assert!(decode(Encoding::Json, true, br#"{"type":"nope"}"#).is_err());
        assert!(decode(Encoding::Json, true, b"not json").is_err());
        assert!(decode(Encoding::Rkyv, false, b"\x01\x02\x03").is_err());
    }

    #[test]
    fn encodes_what_the_normative_types_decode() {
        let frames = [
            (
                Outgoing::Auth {
                    token: "t.o.k",
                    device: Some("d1"),
                },
                ClientFrame::Auth {
                    token: "t.o.k".into(),
                    device: Some("d1".into()),
                    last_seq: None,
                },
            ),
            (
                Outgoing::Send {
                    id: "5",
                    to: To::User("bob"),
                    body: "hi \"you\"",
                },
                ClientFrame::Send {
                    id: "5".into(),
                    to: Target::User("bob".into()),
                    body: "hi \"you\"".into(),
                },
            ),
            (
                Outgoing::Send {
                    id: "6",
                    to: To::Group("g1"),
                    body: "",
                },
                ClientFrame::Send {
                    id: "6".into(),
                    to: Target::Group("g1".into()),
                    body: "".into(),
                },
            ),
            (Outgoing::Ping, ClientFrame::Ping),
        ];
        for (enc, codec_enc) in [
            (Encoding::Json, flare_codec::Encoding::Json),
            (Encoding::Rkyv, flare_codec::Encoding::Rkyv),
        ] {
            for (ours, normative) in &frames {
                let mut out = Vec::new();
                encode(enc, ours, &mut out);
                assert_eq!(&ClientFrame::decode(codec_enc, &out).unwrap(), normative);
            }
        }
    }

    #[test]
    fn body_round_trip_and_padding() {
        let mut s = String::new();
        message_body(42, 123_456_789, 64, &mut s);
        assert_eq!(s.len(), 64);
        assert_eq!(parse_body(&s), Some((42, 123_456_789)));
        message_body(1, 2, 0, &mut s);
        assert_eq!(s, "1.2.");
        assert_eq!(parse_body(&s), Some((1, 2)));
        assert_eq!(parse_body("hello"), None);
        for bad in [
            "",
            ".1.",
            "1..",
            "1.2",
            "1.2x.",
            "-1.2.",
            "1.99999999999999999999.",
        ] {
            assert_eq!(parse_body(bad), None, "{bad:?}");
        }
        assert_eq!(parse_body("18446744073709551615.0.xx"), Some((u64::MAX, 0)));
    }
}
