//! Encoding WebSocket frames: server frames (never masked, never fragmented) and
//! client frames (always masked) for tests and load generation.

use super::apply_mask;

/// The longest frame header: 2 bytes, an 8-byte extended length, a 4-byte mask.
pub const MAX_FRAME_HEADER_BYTES: usize = 14;

/// The largest payload of a control frame (close, ping, pong).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Frame opcodes of RFC 6455 §5.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

impl Opcode {
    /// The opcode of the 4-bit value `bits`, if defined.
    pub const fn from_bits(bits: u8) -> Option<Opcode> {
        Some(match bits {
            0x0 => Opcode::Continuation,
            0x1 => Opcode::Text,
            0x2 => Opcode::Binary,
            0x8 => Opcode::Close,
            0x9 => Opcode::Ping,
            0xA => Opcode::Pong,
            _ => return None,
        })
    }

    /// Close, ping and pong.
    pub const fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// Appends a frame header. `mask` is `Some` for client frames only.
pub fn encode_header(
    opcode: Opcode,
    fin: bool,
    payload_len: usize,
    mask: Option<[u8; 4]>,
    out: &mut Vec<u8>,
) {
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    out.push(if fin { 0x80 } else { 0 } | opcode as u8);
    if payload_len <= 125 {
        out.push(mask_bit | payload_len as u8);
    } else if let Ok(len) = u16::try_from(payload_len) {
        out.push(mask_bit | 126);
        out.extend_from_slice(&len.to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&(payload_len as u64).to_be_bytes());
    }
    if let Some(mask) = mask {
        out.extend_from_slice(&mask);
    }
}

/// The length, header included, of the unmasked frame that starts at `bytes[0]` (a frame
/// this side encoded), or `None` while its header is incomplete. For cutting a queue of
/// encoded frames at a frame boundary.
pub fn unmasked_frame_len(bytes: &[u8]) -> Option<usize> {
    let len7 = usize::from(*bytes.get(1)? & 0x7f);
    let (header, payload): (usize, usize) = match len7 {
        126 => (
            4,
            usize::from(u16::from_be_bytes(bytes.get(2..4)?.try_into().ok()?)),
        ),
        127 => {
            let len = u64::from_be_bytes(bytes.get(2..10)?.try_into().ok()?);
            (10, usize::try_from(len).ok()?)
        }
        n => (2, n),
    };
    header.checked_add(payload)
}

/// Appends one whole server frame (FIN set, unmasked).
///
/// # Panics
/// If a control frame's payload is over [`MAX_CONTROL_PAYLOAD`]: that is a bug of the
/// caller (ping and pong payloads come from validated frames, close goes through [`close`]).
pub fn encode_frame(opcode: Opcode, payload: &[u8], out: &mut Vec<u8>) {
    assert!(
        !opcode.is_control() || payload.len() <= MAX_CONTROL_PAYLOAD,
        "control frame payload of {} bytes is over {MAX_CONTROL_PAYLOAD}",
        payload.len()
    );
    out.reserve(MAX_FRAME_HEADER_BYTES + payload.len());
    encode_header(opcode, true, payload.len(), None, out);
    out.extend_from_slice(payload);
}

/// Appends a text message. `payload` must be UTF-8 (a JSON frame is).
pub fn text(payload: &[u8], out: &mut Vec<u8>) {
    debug_assert!(
        std::str::from_utf8(payload).is_ok(),
        "text payload is not UTF-8"
    );
    encode_frame(Opcode::Text, payload, out)
}

/// Appends a binary message.
pub fn binary(payload: &[u8], out: &mut Vec<u8>) {
    encode_frame(Opcode::Binary, payload, out)
}

/// Appends a ping. Panics if `payload` is over [`MAX_CONTROL_PAYLOAD`].
pub fn ping(payload: &[u8], out: &mut Vec<u8>) {
    encode_frame(Opcode::Ping, payload, out)
}

/// Appends a pong (the answer to a ping carries the ping's payload). Panics if
/// `payload` is over [`MAX_CONTROL_PAYLOAD`].
pub fn pong(payload: &[u8], out: &mut Vec<u8>) {
    encode_frame(Opcode::Pong, payload, out)
}

/// Appends a close frame with `code` and `reason`, the reason cut at a char boundary
/// to fit the 123 bytes a control frame leaves after the code.
pub fn close(code: u16, reason: &str, out: &mut Vec<u8>) {
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let reason = &reason.as_bytes()[..end];
    encode_header(Opcode::Close, true, 2 + reason.len(), None, out);
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(reason);
}

/// Appends a client frame, masked with `mask` (tests and load generation; a real
/// client picks each mask at random). `fin: false` makes a fragment of a data message.
pub fn encode_client_frame(
    opcode: Opcode,
    payload: &[u8],
    mask: [u8; 4],
    fin: bool,
    out: &mut Vec<u8>,
) {
    out.reserve(MAX_FRAME_HEADER_BYTES + payload.len());
    encode_header(opcode, fin, payload.len(), Some(mask), out);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask, 0);
}
