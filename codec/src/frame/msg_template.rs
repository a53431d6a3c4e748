//! One `msg` frame encoded once for every recipient of a message (DESIGN.md §4): the
//! recipients' frames differ only by their inbox `seq`, which is written into a copy
//! of the encoding instead of encoding the frame again.
//!
//! JSON: the payload is kept in two parts around the decimal `seq` (its width varies,
//! so the WebSocket header is written per recipient). rkyv: `seq` is a fixed-width
//! little-endian u64 at a fixed distance from the end of the archive (rkyv writes the
//! root object last, and `seq` has a fixed place in it), found once per process by
//! encoding a frame with two different values; the copy is patched there.

use std::sync::OnceLock;

use serde::Serialize;

use super::{Encoding, ServerFrame, Target};
use crate::ws::{self, Opcode};

/// A `msg` frame, encoded once in one encoding, ready to be written as a WebSocket
/// message for any `seq`.
#[derive(Debug, Clone)]
pub struct MsgTemplate {
    enc: Encoding,
    /// JSON: the payload without its `seq` digits. rkyv: the archive with `seq` 0.
    bytes: Vec<u8>,
    /// JSON: where the `seq` digits go. rkyv: offset of `seq`'s 8 bytes.
    at: usize,
}

/// `seq` as decimal digits, without allocating.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// A `msg` frame but its `seq`, borrowed from wherever the message is kept, so a
/// template is made without copying the message into a frame first.
#[derive(Debug, Clone, Copy)]
pub struct MsgParts<'a> {
    pub msg_id: u64,
    pub from: &'a str,
    pub from_device: &'a str,
    pub to: &'a Target,
    pub body: &'a str,
    pub ts: u64,
}

/// The JSON of a [`ServerFrame::Msg`], field for field as its derive writes it (the
/// tests compare the bytes), from borrowed parts.
#[derive(Serialize)]
struct MsgJson<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    seq: u64,
    #[serde(with = "super::u64_as_string")]
    msg_id: u64,
    from: &'a str,
    from_device: &'a str,
    to: &'a Target,
    body: &'a str,
    ts: u64,
}

/// Room for an rkyv `msg` archive's root object, beside its strings.
const RKYV_MSG_ROOT_MAX: usize = 128;

/// The distance from `seq`'s 8 bytes to the end of an rkyv `msg` archive: the same for
/// every `msg`, because rkyv writes the root object last (its readers find it at the
/// end) and `seq` has a fixed place in it. Found once, by encoding a frame with `seq` 0
/// and with `u64::MAX` and comparing.
fn rkyv_seq_from_end() -> usize {
    static FROM_END: OnceLock<usize> = OnceLock::new();
    *FROM_END.get_or_init(|| {
        let probe = |seq| ServerFrame::Msg {
            seq,
            msg_id: 1,
            from: "a sender past the inline length".into(),
            from_device: "d".into(),
            to: Target::User("u".into()),
            body: "b".into(),
            ts: 1,
        };
        let zero = probe(0).encode(Encoding::Rkyv);
        let ones = probe(u64::MAX).encode(Encoding::Rkyv);
        assert_eq!(zero.len(), ones.len(), "rkyv's seq has a fixed width");
        let at = zero
            .iter()
            .zip(&ones)
            .position(|(a, b)| a != b)
            .expect("seq is in the archive");
        assert!(
            zero[at..at + 8] == [0; 8] && ones[at..at + 8] == [0xff; 8],
            "seq is 8 contiguous little-endian bytes"
        );
        assert!(
            zero.len() - at <= RKYV_MSG_ROOT_MAX,
            "seq is in the root object"
        );
        zero.len() - at
    })
}

impl MsgTemplate {
    /// Encodes `frame`, which must be a [`ServerFrame::Msg`] (its own `seq` is ignored).
    ///
    /// # Panics
    /// If `frame` is not a `msg` frame: a bug of the caller.
    pub fn new(frame: &ServerFrame, enc: Encoding) -> MsgTemplate {
        let ServerFrame::Msg {
            msg_id,
            from,
            from_device,
            to,
            body,
            ts,
            ..
        } = frame
        else {
            panic!(
                "a MsgTemplate is made of a msg frame, not {}",
                frame.type_name()
            );
        };
        MsgTemplate::of(
            &MsgParts {
                msg_id: *msg_id,
                from,
                from_device,
                to,
                body,
                ts: *ts,
            },
            enc,
        )
    }

    /// Encodes the `msg` frame of `parts`.
    pub fn of(parts: &MsgParts<'_>, enc: Encoding) -> MsgTemplate {
        match enc {
            Encoding::Json => {
                let json = MsgJson {
                    kind: "msg",
                    seq: 0,
                    msg_id: parts.msg_id,
                    from: parts.from,
                    from_device: parts.from_device,
                    to: parts.to,
                    body: parts.body,
                    ts: parts.ts,
                };
                let mut bytes = Vec::with_capacity(128 + parts.body.len());
                serde_json::to_writer(&mut bytes, &json)
                    .expect("a msg frame always serializes to JSON");
                // `seq` is the second field: its digit follows the `type` and the key.
                const BEFORE_SEQ: &[u8] = b"{\"type\":\"msg\",\"seq\":";
                assert!(bytes.starts_with(BEFORE_SEQ) && bytes[BEFORE_SEQ.len()] == b'0');
                let at = BEFORE_SEQ.len();
                bytes.remove(at);
                MsgTemplate { enc, bytes, at }
            }
            Encoding::Rkyv => {
                let frame = ServerFrame::Msg {
                    seq: 0,
                    msg_id: parts.msg_id,
                    from: parts.from.to_owned(),
                    from_device: parts.from_device.to_owned(),
                    to: parts.to.clone(),
                    body: parts.body.to_owned(),
                    ts: parts.ts,
                };
                // The root object and the strings, each padded to 8 bytes at most.
                let strings = parts.from.len() + parts.from_device.len() + parts.body.len();
                let mut bytes = Vec::with_capacity(RKYV_MSG_ROOT_MAX + strings + 64);
                frame.encode_into(enc, &mut bytes);
                let at = bytes.len() - rkyv_seq_from_end();
                // Eight bytes to compare: cheap insurance that the layout holds.
                assert_eq!(bytes[at..at + 8], [0; 8], "seq 0 is where it was found");
                MsgTemplate { enc, bytes, at }
            }
        }
    }

    /// The encoding of this template.
    pub fn encoding(&self) -> Encoding {
        self.enc
    }

    /// The whole WebSocket message (header and payload) of the frame with `seq`.
    pub fn ws_message(&self, seq: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(ws::MAX_FRAME_HEADER_BYTES + self.bytes.len() + 20);
        self.write_ws_message(seq, &mut out);
        out
    }

    /// Appends the whole WebSocket message of the frame with `seq` to `out`, such as a
    /// connection's queue of bytes for its socket.
    pub fn write_ws_message(&self, seq: u64, out: &mut Vec<u8>) {
        match self.enc {
            Encoding::Json => {
                let mut buf = [0u8; 20];
                let digits = decimal(seq, &mut buf);
                let len = self.bytes.len() + digits.len();
                out.reserve(ws::MAX_FRAME_HEADER_BYTES + len);
                ws::encode_header(Opcode::Text, true, len, None, out);
                out.extend_from_slice(&self.bytes[..self.at]);
                out.extend_from_slice(digits);
                out.extend_from_slice(&self.bytes[self.at..]);
            }
            Encoding::Rkyv => {
                let len = self.bytes.len();
                out.reserve(ws::MAX_FRAME_HEADER_BYTES + len);
                ws::encode_header(Opcode::Binary, true, len, None, out);
                let at = out.len() + self.at;
                out.extend_from_slice(&self.bytes);
                out[at..at + 8].copy_from_slice(&seq.to_le_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Target;
    use crate::ws::{Role, WsDecoder, WsEvent};
    use crate::DEFAULT_MAX_FRAME_BYTES;

    fn msg(seq: u64, body: &str, to: Target) -> ServerFrame {
        ServerFrame::Msg {
            seq,
            msg_id: 7281956375040,
            from: "alice".into(),
            from_device: "phone".into(),
            to,
            body: body.into(),
            ts: 1795322556625,
        }
    }

    /// Reads one whole server WebSocket message back into a frame.
    fn read_back(wire: &[u8], enc: Encoding) -> ServerFrame {
        let mut dec = WsDecoder::new(Role::Client, DEFAULT_MAX_FRAME_BYTES);
        let mut input = wire;
        let payload = match dec.decode(&mut input) {
            Ok(Some(WsEvent::Text(p))) if enc == Encoding::Json => p,
            Ok(Some(WsEvent::Binary(p))) if enc == Encoding::Rkyv => p,
            other => panic!("one whole {enc:?} message expected, got {other:?}"),
        };
        assert!(input.is_empty(), "nothing after the message");
        ServerFrame::decode(enc, &payload).expect("a valid frame")
    }

    #[test]
    fn every_seq_reads_back_as_the_frame_encoded_whole() {
        let bodies = [
            String::new(),
            "hi".to_string(),
            // Text that looks like the field, and non-ASCII text.
            r#""seq":0,"seq":0 ünï ✓"#.to_string(),
            // Long enough for a 16-bit and a 64-bit WebSocket length.
            "x".repeat(300),
            "y".repeat(70_000),
        ];
        let seqs = [0, 1, 9, 10, 99, 100, 12345, 1 << 40, u64::MAX];
        for enc in [Encoding::Json, Encoding::Rkyv] {
            for body in &bodies {
                for to in [Target::User("bob".into()), Target::Group("team".into())] {
                    let t = MsgTemplate::new(&msg(777, body, to.clone()), enc);
                    assert_eq!(t.encoding(), enc);
                    for seq in seqs {
                        let want = msg(seq, body, to.clone());
                        let wire = t.ws_message(seq);
                        assert_eq!(read_back(&wire, enc), want, "{enc:?} seq {seq}");
                        // Byte for byte what encoding the whole frame gives.
                        let mut whole = Vec::new();
                        let payload = want.encode(enc);
                        let op = match enc {
                            Encoding::Json => Opcode::Text,
                            Encoding::Rkyv => Opcode::Binary,
                        };
                        ws::encode_frame(op, &payload, &mut whole);
                        assert_eq!(wire, whole, "{enc:?} seq {seq}");
                        // Appended after other bytes: the same message, the bytes kept.
                        let mut queue = vec![1, 2, 3];
                        t.write_ws_message(seq, &mut queue);
                        assert_eq!(queue[..3], [1, 2, 3]);
                        assert_eq!(queue[3..], whole[..], "{enc:?} seq {seq}");
                    }
                }
            }
        }
    }

    /// rkyv keeps short strings inside the root object and longer ones before it: the
    /// patched `seq` must land right on both sides of that limit, for every field.
    #[test]
    fn rkyv_seq_is_found_whatever_the_string_lengths() {
        let text = |n: usize| "s".repeat(n);
        for n in 0..=20 {
            for (from, device, body, to) in [
                (text(n), text(1), text(1), Target::User(text(1))),
                (text(1), text(n), text(1), Target::User(text(n))),
                (text(n), text(n), text(n), Target::Group(text(n))),
            ] {
                let frame = |seq| ServerFrame::Msg {
                    seq,
                    msg_id: 5,
                    from: from.clone(),
                    from_device: device.clone(),
                    to: to.clone(),
                    body: body.clone(),
                    ts: 6,
                };
                let t = MsgTemplate::new(&frame(0), Encoding::Rkyv);
                for seq in [0, 1, 1 << 33, u64::MAX] {
                    let mut whole = Vec::new();
                    ws::encode_frame(
                        Opcode::Binary,
                        &frame(seq).encode(Encoding::Rkyv),
                        &mut whole,
                    );
                    assert_eq!(t.ws_message(seq), whole, "length {n}, seq {seq}");
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "made of a msg frame")]
    fn only_msg_frames_make_templates() {
        MsgTemplate::new(&ServerFrame::Pong, Encoding::Json);
    }
}
