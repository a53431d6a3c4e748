//! Log records and their on-disk framing. Sans-IO: bytes in, records out.
//!
//! A frame is `[u32 len][u32 crc32][payload]` (little-endian); `crc32` covers the
//! payload only. A zero `len` ends the log (the file is zero-padded to its block
//! size), and so does a bad CRC, an oversized length or an undecodable payload: all
//! of them are what a torn tail write looks like.
//!
//! The payload is a small hand-rolled binary format: a tag byte, then fields in
//! order. Integers are little-endian `u64`; strings and lists carry a `u32` length.
//! It is read back only from our own log and only after its CRC matched, but it is
//! still decoded with bounds checks so a corrupt record is an error, not a panic.

use std::sync::Arc;

use flare_codec::frame::Target;

use crate::api::Message;

/// Frame header: `u32` length and `u32` CRC.
pub const FRAME_HEADER_BYTES: usize = 8;

/// Largest payload one record may have. A longer length in a header is corruption;
/// the engine refuses to create a record that would not fit.
pub const MAX_RECORD_BYTES: usize = 16 << 20;

/// One durable change of pipeline state, applied in log order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// An accepted message. Inbox `seq`s are not stored: applying the records in log
    /// order assigns them again, identically.
    Message {
        msg: Arc<Message>,
        /// The sender's client id, kept for dedup; `None` for admin posts without one.
        dedup_id: Option<String>,
    },
    /// A device's ack cursor moved to `seq` (never backwards).
    Cursor {
        user: String,
        device: String,
        seq: u64,
    },
    /// Replaces a group's member list (creates the group).
    PutGroup { group: String, members: Vec<String> },
    /// Adds and removes members (creates the group if missing).
    ModifyGroup {
        group: String,
        add: Vec<String>,
        remove: Vec<String>,
    },
    /// Replaces the list of users whose messages to `user` are refused.
    PutBlocked { user: String, users: Vec<String> },
}

const TAG_MESSAGE: u8 = 1;
const TAG_CURSOR: u8 = 2;
const TAG_PUT_GROUP: u8 = 3;
const TAG_MODIFY_GROUP: u8 = 4;
const TAG_PUT_BLOCKED: u8 = 5;
const TARGET_USER: u8 = 1;
const TARGET_GROUP: u8 = 2;

fn str_len(s: &str) -> usize {
    4 + s.len()
}

fn list_len(v: &[String]) -> usize {
    4 + v.iter().map(|s| str_len(s)).sum::<usize>()
}

impl Record {
    /// Exact length of the encoded payload (without the frame header).
    pub fn encoded_len(&self) -> usize {
        1 + match self {
            Record::Message { msg, dedup_id } => {
                8 + 8
                    + str_len(&msg.from)
                    + str_len(&msg.from_device)
                    + 1
                    + match &msg.to {
                        Target::User(u) => str_len(u),
                        Target::Group(g) => str_len(g),
                    }
                    + str_len(&msg.body)
                    + 1
                    + dedup_id.as_deref().map_or(0, str_len)
            }
            Record::Cursor { user, device, .. } => str_len(user) + str_len(device) + 8,
            Record::PutGroup { group, members } => str_len(group) + list_len(members),
            Record::ModifyGroup { group, add, remove } => {
                str_len(group) + list_len(add) + list_len(remove)
            }
            Record::PutBlocked { user, users } => str_len(user) + list_len(users),
        }
    }

    /// Length of the whole frame on disk.
    pub fn frame_len(&self) -> usize {
        FRAME_HEADER_BYTES + self.encoded_len()
    }

    /// Appends the encoded payload to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Record::Message { msg, dedup_id } => {
                out.push(TAG_MESSAGE);
                put_u64(out, msg.msg_id);
                put_u64(out, msg.ts);
                put_str(out, &msg.from);
                put_str(out, &msg.from_device);
                match &msg.to {
                    Target::User(u) => {
                        out.push(TARGET_USER);
                        put_str(out, u);
                    }
                    Target::Group(g) => {
                        out.push(TARGET_GROUP);
                        put_str(out, g);
                    }
                }
                put_str(out, &msg.body);
                match dedup_id {
                    Some(id) => {
                        out.push(1);
                        put_str(out, id);
                    }
                    None => out.push(0),
                }
            }
            Record::Cursor { user, device, seq } => {
                out.push(TAG_CURSOR);
                put_str(out, user);
                put_str(out, device);
                put_u64(out, *seq);
            }
            Record::PutGroup { group, members } => {
                out.push(TAG_PUT_GROUP);
                put_str(out, group);
                put_list(out, members);
            }
            Record::ModifyGroup { group, add, remove } => {
                out.push(TAG_MODIFY_GROUP);
                put_str(out, group);
                put_list(out, add);
                put_list(out, remove);
            }
            Record::PutBlocked { user, users } => {
                out.push(TAG_PUT_BLOCKED);
                put_str(out, user);
                put_list(out, users);
            }
        }
    }

    /// Decodes one payload; the whole slice must be consumed.
    pub fn decode(payload: &[u8]) -> Result<Record, DecodeError> {
        let mut r = Reader { buf: payload };
        let rec = match r.u8()? {
            TAG_MESSAGE => {
                let msg_id = r.u64()?;
                let ts = r.u64()?;
                let from = r.string()?.into();
                let from_device = r.string()?.into();
                let to = match r.u8()? {
                    TARGET_USER => Target::User(r.string()?),
                    TARGET_GROUP => Target::Group(r.string()?),
                    _ => return Err(DecodeError),
                };
                let body = r.string()?;
                let dedup_id = match r.u8()? {
                    0 => None,
                    1 => Some(r.string()?),
                    _ => return Err(DecodeError),
                };
                Record::Message {
                    msg: Arc::new(Message {
                        msg_id,
                        ts,
                        from,
                        from_device,
                        to,
                        body,
                    }),
                    dedup_id,
                }
            }
            TAG_CURSOR => Record::Cursor {
                user: r.string()?,
                device: r.string()?,
                seq: r.u64()?,
            },
            TAG_PUT_GROUP => Record::PutGroup {
                group: r.string()?,
                members: r.list()?,
            },
            TAG_MODIFY_GROUP => Record::ModifyGroup {
                group: r.string()?,
                add: r.list()?,
                remove: r.list()?,
            },
            TAG_PUT_BLOCKED => Record::PutBlocked {
                user: r.string()?,
                users: r.list()?,
            },
            _ => return Err(DecodeError),
        };
        if !r.buf.is_empty() {
            return Err(DecodeError);
        }
        Ok(rec)
    }
}

/// Appends one framed record to `out`.
pub fn encode_frame(rec: &Record, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_BYTES]);
    rec.encode(out);
    let payload_len = out.len() - start - FRAME_HEADER_BYTES;
    debug_assert_eq!(payload_len, rec.encoded_len(), "encoded_len matches encode");
    assert!(
        payload_len <= MAX_RECORD_BYTES,
        "records are checked against MAX_RECORD_BYTES before they are made"
    );
    let crc = crc32fast::hash(&out[start + FRAME_HEADER_BYTES..]);
    out[start..start + 4].copy_from_slice(&(payload_len as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// A payload that does not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeError;

/// Why the valid part of a log ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// A zero length: the zero padding after the last record.
    Zero,
    /// A length over [`MAX_RECORD_BYTES`].
    BadLength,
    /// The CRC does not match the payload.
    BadCrc,
    /// The CRC matched but the payload does not decode.
    BadPayload,
    /// The file ends inside a frame.
    Truncated,
}

/// Result of decoding the frame at the start of a buffer.
#[derive(Debug)]
pub enum Decoded {
    /// A record and the frame's length in bytes.
    Record(Record, usize),
    /// The log ends here.
    End(End),
    /// The frame continues past the buffer: this many bytes are needed in total.
    Insufficient(usize),
}

/// Decodes the frame at the start of `buf`.
pub fn decode_frame(buf: &[u8]) -> Decoded {
    if buf.len() < FRAME_HEADER_BYTES {
        return Decoded::Insufficient(FRAME_HEADER_BYTES);
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    if len == 0 {
        return Decoded::End(End::Zero);
    }
    if len > MAX_RECORD_BYTES {
        return Decoded::End(End::BadLength);
    }
    let total = FRAME_HEADER_BYTES + len;
    if buf.len() < total {
        return Decoded::Insufficient(total);
    }
    let payload = &buf[FRAME_HEADER_BYTES..total];
    if crc32fast::hash(payload) != crc {
        return Decoded::End(End::BadCrc);
    }
    match Record::decode(payload) {
        Ok(rec) => Decoded::Record(rec, total),
        Err(DecodeError) => Decoded::End(End::BadPayload),
    }
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_list(out: &mut Vec<u8>, v: &[String]) {
    out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    for s in v {
        put_str(out, s);
    }
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let n = self.u32()? as usize;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError)
    }

    fn list(&mut self) -> Result<Vec<String>, DecodeError> {
        let n = self.u32()? as usize;
        // Each string needs at least its 4-byte length: refuse counts the buffer cannot hold.
        if n > self.buf.len() / 4 {
            return Err(DecodeError);
        }
        (0..n).map(|_| self.string()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn samples() -> Vec<Record> {
        vec![
            Record::Message {
                msg: Arc::new(Message {
                    msg_id: 7281956375040,
                    ts: 1795322556625,
                    from: "alice".into(),
                    from_device: "phone".into(),
                    to: Target::User("bob".into()),
                    body: "hi bob ✓".into(),
                }),
                dedup_id: Some("c-1".into()),
            },
            Record::Message {
                msg: Arc::new(Message {
                    msg_id: 1,
                    ts: 2,
                    from: "system".into(),
                    from_device: "admin".into(),
                    to: Target::Group("g".into()),
                    body: String::new(),
                }),
                dedup_id: None,
            },
            Record::Cursor {
                user: "alice".into(),
                device: "phone".into(),
                seq: u64::MAX,
            },
            Record::PutGroup {
                group: "g".into(),
                members: vec!["a".into(), "b".into()],
            },
            Record::ModifyGroup {
                group: "g".into(),
                add: vec![],
                remove: vec!["b".into()],
            },
            Record::PutBlocked {
                user: "bob".into(),
                users: vec!["eve".into()],
            },
        ]
    }

    #[test]
    fn every_record_kind_round_trips_and_encoded_len_is_exact() {
        let mut log = Vec::new();
        for rec in samples() {
            let mut payload = Vec::new();
            rec.encode(&mut payload);
            assert_eq!(payload.len(), rec.encoded_len());
            assert_eq!(Record::decode(&payload).unwrap(), rec);
            encode_frame(&rec, &mut log);
        }
        let mut pos = 0;
        let mut got = Vec::new();
        loop {
            match decode_frame(&log[pos..]) {
                Decoded::Record(rec, n) => {
                    got.push(rec);
                    pos += n;
                }
                Decoded::Insufficient(8) if pos == log.len() => break,
                other => panic!("unexpected {other:?} at {pos}"),
            }
        }
        assert_eq!(got, samples());
    }

    #[test]
    fn torn_and_corrupt_frames_end_the_log() {
        let mut buf = Vec::new();
        encode_frame(&samples()[0], &mut buf);
        let full = buf.len();
        assert!(matches!(decode_frame(&buf[..full - 1]), Decoded::Insufficient(n) if n == full));
        assert!(matches!(decode_frame(&buf[..3]), Decoded::Insufficient(8)));
        assert!(matches!(decode_frame(&[0u8; 16]), Decoded::End(End::Zero)));
        let mut flipped = buf.clone();
        flipped[full - 1] ^= 1;
        assert!(matches!(decode_frame(&flipped), Decoded::End(End::BadCrc)));
        let mut huge = buf.clone();
        huge[0..4].copy_from_slice(&(MAX_RECORD_BYTES as u32 + 1).to_le_bytes());
        assert!(matches!(decode_frame(&huge), Decoded::End(End::BadLength)));
        // A payload with a valid CRC but an unknown tag.
        let payload = [99u8, 1, 2];
        let mut bad = Vec::new();
        bad.extend_from_slice(&3u32.to_le_bytes());
        bad.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        bad.extend_from_slice(&payload);
        assert!(matches!(decode_frame(&bad), Decoded::End(End::BadPayload)));
    }

    #[test]
    fn decode_rejects_truncated_trailing_and_overlong_payloads() {
        for rec in samples() {
            let mut payload = Vec::new();
            rec.encode(&mut payload);
            for cut in 0..payload.len() {
                assert_eq!(
                    Record::decode(&payload[..cut]),
                    Err(DecodeError),
                    "cut at {cut} of {rec:?}"
                );
            }
            payload.push(0);
            assert_eq!(Record::decode(&payload), Err(DecodeError), "trailing byte");
        }
        // A list that claims more strings than bytes.
        let mut p = vec![TAG_PUT_GROUP];
        put_str(&mut p, "g");
        p.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Record::decode(&p), Err(DecodeError));
        // Invalid UTF-8.
        let mut p = vec![TAG_CURSOR];
        p.extend_from_slice(&1u32.to_le_bytes());
        p.push(0xff);
        put_str(&mut p, "d");
        put_u64(&mut p, 1);
        assert_eq!(Record::decode(&p), Err(DecodeError));
    }
}
