//! The JSON server frames a run receives by the million (`msg`, `send_ok`), read
//! without serde when they have the plain shape a server writes them in: no
//! whitespace, strings of ASCII without escapes or control characters, unsigned
//! integers, `true`/`false`, and objects of those.
//!
//! This is a shortcut, not a second judge: [`decode`] returns `None` for anything
//! outside that shape, and for anything the serde path would refuse (an unknown
//! `type`, a missing, repeated or ill-typed field, trailing bytes); then the serde
//! path decides. Where it returns a frame, it is the frame the serde path returns
//! (the tests compare the two on every frame they decode). serde_json was about a
//! tenth of the load generator's CPU in `chat`; `cargo bench -p flare-bench --bench
//! loadgen` gives 286 -> 148 ns for a `msg`, 185 -> 85 ns for a `send_ok`.

use std::borrow::Cow;

use super::Incoming;

/// The frame in `bytes` if it has the plain shape; `None`: ask serde.
pub(super) fn decode(bytes: &[u8]) -> Option<Incoming<'_>> {
    let mut p = Plain { b: bytes, i: 0 };
    let mut f = Fields::default();
    p.eat(b'{')?;
    if p.eat(b'}').is_none() {
        loop {
            let key = p.string()?;
            p.eat(b':')?;
            match key {
                "type" => set(&mut f.kind, p.string()?)?,
                "head_seq" => set(&mut f.head_seq, p.uint()?)?,
                "heartbeat_ms" => set(&mut f.heartbeat_ms, p.uint()?)?,
                "id" => set(&mut f.id, p.string()?)?,
                "dup" => set(&mut f.dup, p.boolean()?)?,
                "seq" => set(&mut f.seq, p.uint()?)?,
                "from" => set(&mut f.from, p.string()?)?,
                "body" => set(&mut f.body, p.string()?)?,
                "code" => set(&mut f.code, p.string()?)?,
                "reason" => set(&mut f.reason, p.string()?)?,
                _ => p.skip_value(0)?,
            }
            if p.eat(b',').is_none() {
                p.eat(b'}')?;
                break;
            }
        }
    }
    if p.i != bytes.len() {
        return None;
    }
    let b = Cow::Borrowed;
    Some(match f.kind? {
        "auth_ok" => Incoming::AuthOk {
            head_seq: f.head_seq?,
            heartbeat_ms: f.heartbeat_ms?,
        },
        "send_ok" => Incoming::SendOk {
            id: b(f.id?),
            dup: f.dup?,
        },
        "msg" => Incoming::Msg {
            seq: f.seq?,
            from: b(f.from?),
            body: b(f.body?),
        },
        "error" => Incoming::Error {
            code: b(f.code?),
            id: f.id.map(b),
        },
        "pong" => Incoming::Pong,
        "goaway" => Incoming::Goaway {
            reason: b(f.reason?),
        },
        "sync_done" => Incoming::SyncDone,
        _ => return None,
    })
}

/// Objects nested in a skipped value beyond this depth are left to serde.
const MAX_DEPTH: usize = 8;

/// The fields the serde path reads (`JsonServerFrame`).
#[derive(Default)]
struct Fields<'a> {
    kind: Option<&'a str>,
    head_seq: Option<u64>,
    heartbeat_ms: Option<u64>,
    id: Option<&'a str>,
    dup: Option<bool>,
    seq: Option<u64>,
    from: Option<&'a str>,
    body: Option<&'a str>,
    code: Option<&'a str>,
    reason: Option<&'a str>,
}

/// Fills a field once: serde refuses a repeated field.
fn set<T>(slot: &mut Option<T>, value: T) -> Option<()> {
    if slot.is_some() {
        return None;
    }
    *slot = Some(value);
    Some(())
}

/// A cursor over the plain shape; every method returns `None` outside it.
struct Plain<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Plain<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.peek()? == c).then(|| self.i += 1)
    }

    /// A string of ASCII without escapes or control characters.
    fn string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let rest = &self.b[self.i..];
        let len = memchr::memchr(b'"', rest)?;
        let s = &rest[..len];
        // Checked without an early exit: a loop without branches.
        let plain = s
            .iter()
            .fold(true, |ok, &c| ok & (0x20..0x80).contains(&c) & (c != b'\\'));
        if !plain {
            return None;
        }
        self.i += len + 1;
        // SAFETY: every byte of `s` is ASCII (checked above), and ASCII is UTF-8.
        // `from_utf8` took a quarter of this decoder's time.
        Some(unsafe { std::str::from_utf8_unchecked(s) })
    }

    /// An unsigned integer that fits a u64, in JSON's form (no leading zero), and not
    /// the integer part of a fraction or an exponent.
    fn uint(&mut self) -> Option<u64> {
        let start = self.i;
        let mut n: u64 = 0;
        while let Some(d @ b'0'..=b'9') = self.peek() {
            n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
            self.i += 1;
        }
        let digits = self.i - start;
        if digits == 0 || (digits > 1 && self.b[start] == b'0') {
            return None;
        }
        if matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        Some(n)
    }

    fn boolean(&mut self) -> Option<bool> {
        for (word, value) in [(&b"true"[..], true), (&b"false"[..], false)] {
            if self.b[self.i..].starts_with(word) {
                self.i += word.len();
                return Some(value);
            }
        }
        None
    }

    /// The value of a field the frame does not use: anything of the plain shape,
    /// nested [`MAX_DEPTH`] objects deep at most.
    fn skip_value(&mut self, depth: usize) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'0'..=b'9' => self.uint().map(drop),
            b't' | b'f' => self.boolean().map(drop),
            b'{' if depth < MAX_DEPTH => {
                self.i += 1;
                if self.eat(b'}').is_some() {
                    return Some(());
                }
                loop {
                    self.string()?;
                    self.eat(b':')?;
                    self.skip_value(depth + 1)?;
                    if self.eat(b',').is_none() {
                        return self.eat(b'}');
                    }
                }
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use flare_codec::frame::{ErrorCode, GoawayReason, ServerFrame, Target};
    use proptest::prelude::*;

    use super::super::decode_json;
    use super::*;

    /// Where the shortcut takes a frame, serde must take the same one.
    fn agrees(bytes: &[u8]) -> Option<Incoming<'_>> {
        let fast = decode(bytes);
        if let Some(f) = &fast {
            assert_eq!(
                decode_json(bytes).as_ref(),
                Ok(f),
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        fast
    }

    #[test]
    fn takes_the_frames_a_server_writes() {
        let frames = [
            ServerFrame::SendOk {
                id: "12".into(),
                msg_id: u64::MAX,
                ts: 5,
                dup: true,
            },
            ServerFrame::Msg {
                seq: 8,
                msg_id: 99,
                from: "p-000001".into(),
                from_device: "d".into(),
                to: Target::Group("g".into()),
                body: "3.1000.xxxx".into(),
                ts: 5,
            },
            ServerFrame::AuthOk {
                user: "u1".into(),
                device: "d".into(),
                session: "s".into(),
                node: "n".into(),
                head_seq: 0,
                heartbeat_ms: 30000,
            },
            ServerFrame::Error {
                code: ErrorCode::RateLimited,
                message: "slow down".into(),
                id: None,
            },
            ServerFrame::Pong,
            ServerFrame::Goaway {
                reason: GoawayReason::Draining,
                reconnect_after_ms: 10,
            },
            ServerFrame::SyncDone {
                after: 1,
                last: 2,
                more: false,
                truncated: true,
            },
        ];
        for frame in frames {
            let bytes = frame.encode(flare_codec::Encoding::Json);
            assert!(agrees(&bytes).is_some(), "{frame:?}");
        }
    }

    #[test]
    fn leaves_everything_else_to_serde() {
        let others = [
            // Not the plain shape (serde takes some of these, refuses others).
            r#"{"type":"send_ok","id":"a\"b","dup":true}"#,
            r#"{"type":"send_ok","id":"é","dup":true}"#,
            r#"{ "type":"pong"}"#,
            r#"{"type":"pong"} "#,
            r#"{"type":"pong","x":null}"#,
            r#"{"type":"pong","x":[1]}"#,
            r#"{"type":"pong","x":-1}"#,
            r#"{"type":"pong","x":1.5}"#,
            r#"{"type":"send_ok","id":null,"dup":true}"#,
            r#"{"type":"pong","x":{"a":{"a":{"a":{"a":{"a":{"a":{"a":{"a":{"a":1}}}}}}}}}}"#,
            // What serde refuses.
            r#"{"type":"nope"}"#,
            r#"{"type":"msg","seq":1}"#,
            r#"{"type":"msg","seq":1,"seq":2,"from":"a","body":"b"}"#,
            r#"{"type":"msg","seq":01,"from":"a","body":"b"}"#,
            r#"{"type":"msg","seq":18446744073709551616,"from":"a","body":"b"}"#,
            r#"{"type":"msg","seq":1e3,"from":"a","body":"b"}"#,
            r#"{"type":"msg","seq":"1","from":"a","body":"b"}"#,
            r#"{"type":"send_ok","id":"1","dup":1}"#,
            r#"{"type":"send_ok","id":"1","dup":truex}"#,
            r#"{"type":"pong"}x"#,
            r#"{"type":"pong",}"#,
            r#"{"type":"pong""#,
            r#"{}"#,
            "",
        ];
        for text in others {
            assert_eq!(agrees(text.as_bytes()), None, "{text}");
        }
        // Unknown fields of the plain shape are skipped, as serde skips them.
        let text = r#"{"x":{},"type":"msg","seq":0,"to":{"user":"b","n":{"m":true}},"from":"a","body":"","x":7}"#;
        assert!(agrees(text.as_bytes()).is_some());
    }

    fn frame() -> impl Strategy<Value = ServerFrame> {
        let s = || "[ -~]{0,12}";
        prop_oneof![
            (s(), any::<u64>(), any::<u64>(), any::<bool>()).prop_map(|(id, msg_id, ts, dup)| {
                ServerFrame::SendOk {
                    id,
                    msg_id,
                    ts,
                    dup,
                }
            }),
            (any::<u64>(), s(), s(), s()).prop_map(|(seq, from, to, body)| ServerFrame::Msg {
                seq,
                msg_id: 1,
                from,
                from_device: "d".into(),
                to: Target::User(to),
                body,
                ts: 2,
            }),
        ]
    }

    proptest! {
        /// Frames as encoded, and with one byte changed: wherever the shortcut
        /// decodes, serde decodes the same.
        #[test]
        fn decodes_what_serde_decodes(f in frame(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut bytes = f.encode(flare_codec::Encoding::Json);
            agrees(&bytes);
            let i = at.index(bytes.len());
            bytes[i] = byte;
            agrees(&bytes);
        }
    }
}
