//! Decoding WebSocket frames into messages (RFC 6455 §5).
//!
//! Unlike the other decoders of this crate, [`WsDecoder`] takes **every** byte it is
//! given: a partial frame header is kept in a 14-byte array and a partial payload in a
//! buffer sized from the frame header (never over the message limit), so the caller
//! can hand its read buffer back to the shard's pool right after each read. Between
//! messages the decoder holds no heap memory.

use std::fmt;

use super::{apply_mask, encoder::MAX_FRAME_HEADER_BYTES, Opcode};
use crate::close;

/// Which end of the connection decodes: a server reads masked client frames, a client
/// reads unmasked server frames. A frame with the wrong masking is a protocol error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

/// What a peer sent: a whole data message (fragments reassembled) or a control frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsEvent {
    /// A text message; its bytes are valid UTF-8.
    Text(Vec<u8>),
    /// A binary message.
    Binary(Vec<u8>),
    /// A ping: answer with a pong carrying the same payload.
    Ping(Vec<u8>),
    /// A pong.
    Pong(Vec<u8>),
    /// A close frame: `code` is `None` for an empty payload; `reason` may be empty.
    Close { code: Option<u16>, reason: String },
}

/// A violation of RFC 6455 or of the message limit. The connection must be closed with
/// [`close_code`](WsError::close_code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsError {
    /// RSV1-3 set without a negotiated extension (1002).
    ReservedBits,
    /// An opcode RFC 6455 does not define (1002).
    UnknownOpcode(u8),
    /// A control frame without FIN (1002).
    FragmentedControl,
    /// A control frame with a payload over 125 bytes (1002).
    ControlTooLong,
    /// An unmasked frame sent to a server (1002).
    Unmasked,
    /// A masked frame sent to a client (1002).
    Masked,
    /// A continuation frame with no fragmented message open (1002).
    UnexpectedContinuation,
    /// A new text or binary frame while a fragmented message is open (1002).
    InterruptedMessage,
    /// A 64-bit payload length with its most significant bit set (1002).
    LengthMsb,
    /// The message (all its fragments) would exceed the limit (1009).
    TooLarge,
    /// A text message that is not UTF-8 (1007).
    InvalidUtf8,
    /// A close frame with a 1-byte payload (1002).
    CloseTooShort,
    /// A close frame with a code that may not be sent (1002).
    InvalidCloseCode(u16),
    /// A close reason that is not UTF-8 (1007).
    CloseReasonUtf8,
}

impl WsError {
    /// The close code to send (PROTOCOL.md §7).
    pub const fn close_code(&self) -> u16 {
        match self {
            WsError::TooLarge => close::MESSAGE_TOO_BIG,
            WsError::InvalidUtf8 | WsError::CloseReasonUtf8 => close::INVALID_PAYLOAD,
            _ => close::PROTOCOL_ERROR,
        }
    }

    /// A short reason, fit for the close frame.
    pub const fn message(&self) -> &'static str {
        match self {
            WsError::ReservedBits => "reserved bits set",
            WsError::UnknownOpcode(_) => "unknown opcode",
            WsError::FragmentedControl => "fragmented control frame",
            WsError::ControlTooLong => "control frame over 125 bytes",
            WsError::Unmasked => "unmasked client frame",
            WsError::Masked => "masked server frame",
            WsError::UnexpectedContinuation => "continuation without a message",
            WsError::InterruptedMessage => "new message inside a fragmented message",
            WsError::LengthMsb => "payload length with the high bit set",
            WsError::TooLarge => "message too large",
            WsError::InvalidUtf8 => "text message is not UTF-8",
            WsError::CloseTooShort => "close payload of 1 byte",
            WsError::InvalidCloseCode(_) => "invalid close code",
            WsError::CloseReasonUtf8 => "close reason is not UTF-8",
        }
    }
}

impl fmt::Display for WsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WsError::UnknownOpcode(op) => {
                write!(f, "{} {op:#x} ({})", self.message(), self.close_code())
            }
            WsError::InvalidCloseCode(code) => {
                write!(f, "{} {code} ({})", self.message(), self.close_code())
            }
            _ => write!(f, "{} ({})", self.message(), self.close_code()),
        }
    }
}

impl std::error::Error for WsError {}

/// The header of the frame whose payload is being read.
#[derive(Debug, Clone, Copy)]
struct FrameHead {
    opcode: Opcode,
    fin: bool,
    mask: Option<[u8; 4]>,
    /// Payload bytes not read yet.
    remaining: u64,
    /// Payload bytes read so far (the phase of the mask).
    read: u64,
}

/// The per-connection WebSocket frame decoder. See the [module](self) docs.
///
/// ```
/// use flare_codec::ws::{encode_client_frame, Opcode, Role, WsDecoder, WsEvent};
///
/// let mut wire = Vec::new();
/// encode_client_frame(Opcode::Text, b"{\"type\":\"ping\"}", [1, 2, 3, 4], true, &mut wire);
/// let mut decoder = WsDecoder::new(Role::Server, 1 << 20);
/// let mut input = &wire[..];
/// assert_eq!(decoder.decode(&mut input), Ok(Some(WsEvent::Text(b"{\"type\":\"ping\"}".to_vec()))));
/// assert!(input.is_empty());
/// assert_eq!(decoder.decode(&mut input), Ok(None));
/// ```
#[derive(Debug)]
pub struct WsDecoder {
    max_message_bytes: usize,
    role: Role,
    /// Bytes of a frame header received so far.
    head: [u8; MAX_FRAME_HEADER_BYTES],
    head_len: u8,
    /// Once the header is complete: the frame whose payload is being read.
    frame: Option<FrameHead>,
    /// The opcode (text or binary) of the data message being received, if any.
    message_opcode: Option<Opcode>,
    /// The payload of that message so far (fragments concatenated, unmasked).
    message: Vec<u8>,
    /// The payload of the control frame being read.
    control: Vec<u8>,
    /// The first error: the decoder refuses all input after it.
    failed: Option<WsError>,
}

impl WsDecoder {
    /// A decoder for `role` that refuses data messages over `max_message_bytes` (1009).
    pub fn new(role: Role, max_message_bytes: usize) -> WsDecoder {
        WsDecoder {
            max_message_bytes,
            role,
            head: [0; MAX_FRAME_HEADER_BYTES],
            head_len: 0,
            frame: None,
            message_opcode: None,
            message: Vec::new(),
            control: Vec::new(),
            failed: None,
        }
    }

    /// The message size limit.
    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    /// Whether the decoder is between messages: no partial frame, no open fragmented
    /// message. An idle decoder holds no heap memory.
    pub fn is_idle(&self) -> bool {
        self.head_len == 0 && self.frame.is_none() && self.message_opcode.is_none()
    }

    /// The heap memory the decoder holds for a partially received message (bytes of
    /// capacity), for memory accounting. Zero when idle.
    pub fn buffered_capacity(&self) -> usize {
        self.message.capacity() + self.control.capacity()
    }

    /// Takes bytes from the front of `input` until one event is complete.
    ///
    /// - `Ok(Some(event))`: `input` now starts after the event's last frame; call again
    ///   while `input` is not empty.
    /// - `Ok(None)`: every byte of `input` was taken (it is now empty) and no event is
    ///   complete yet; call again when more bytes arrive.
    /// - `Err(e)`: close the connection with `e.close_code()`. The decoder keeps
    ///   answering the same error and holds no buffers after it.
    pub fn decode(&mut self, input: &mut &[u8]) -> Result<Option<WsEvent>, WsError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let result = self.decode_inner(input);
        if let Err(e) = result {
            self.failed = Some(e);
            self.message = Vec::new();
            self.control = Vec::new();
        }
        result
    }

    fn decode_inner(&mut self, input: &mut &[u8]) -> Result<Option<WsEvent>, WsError> {
        loop {
            let mut frame = match self.frame {
                Some(frame) => frame,
                None => match self.read_head(input)? {
                    Some(frame) => frame,
                    None => return Ok(None),
                },
            };
            if frame.remaining > 0 {
                let take =
                    usize::try_from(frame.remaining).map_or(input.len(), |r| r.min(input.len()));
                if take == 0 {
                    self.frame = Some(frame);
                    return Ok(None);
                }
                let (chunk, rest) = input.split_at(take);
                *input = rest;
                self.take_payload(&frame, chunk);
                frame.read += take as u64;
                frame.remaining -= take as u64;
                if frame.remaining > 0 {
                    self.frame = Some(frame);
                    return Ok(None);
                }
            }
            self.frame = None;
            if let Some(event) = self.finish_frame(&frame)? {
                return Ok(Some(event));
            }
            // A non-final fragment: the message continues in the next frame.
        }
    }

    /// Gathers header bytes; returns the frame once its header is complete and valid.
    fn read_head(&mut self, input: &mut &[u8]) -> Result<Option<FrameHead>, WsError> {
        loop {
            // The first two bytes are checked as soon as they are here (and again on
            // each call while the rest of the header trickles in: it is cheap).
            let needed = if self.head_len >= 2 {
                self.check_first_bytes()?
            } else {
                2
            };
            let have = usize::from(self.head_len);
            if have == needed {
                break;
            }
            let take = (needed - have).min(input.len());
            if take == 0 {
                return Ok(None);
            }
            self.head[have..have + take].copy_from_slice(&input[..take]);
            *input = &input[take..];
            self.head_len += take as u8;
        }
        self.head_len = 0;
        let frame = self.parse_head()?;
        Ok(Some(frame))
    }

    /// Checks the first two header bytes, as soon as they are here, and returns the
    /// header's full length.
    fn check_first_bytes(&self) -> Result<usize, WsError> {
        let [b0, b1, ..] = self.head;
        if b0 & 0x70 != 0 {
            return Err(WsError::ReservedBits);
        }
        let opcode = Opcode::from_bits(b0 & 0x0f).ok_or(WsError::UnknownOpcode(b0 & 0x0f))?;
        let fin = b0 & 0x80 != 0;
        let masked = b1 & 0x80 != 0;
        let len7 = b1 & 0x7f;
        match (self.role, masked) {
            (Role::Server, false) => return Err(WsError::Unmasked),
            (Role::Client, true) => return Err(WsError::Masked),
            _ => {}
        }
        if opcode.is_control() {
            if !fin {
                return Err(WsError::FragmentedControl);
            }
            if len7 > 125 {
                return Err(WsError::ControlTooLong);
            }
        } else {
            match (opcode, self.message_opcode) {
                (Opcode::Continuation, None) => return Err(WsError::UnexpectedContinuation),
                (Opcode::Text | Opcode::Binary, Some(_)) => {
                    return Err(WsError::InterruptedMessage)
                }
                _ => {}
            }
        }
        let extended = match len7 {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        Ok(2 + extended + if masked { 4 } else { 0 })
    }

    /// Parses a complete, first-bytes-checked header and applies the size limit.
    fn parse_head(&mut self) -> Result<FrameHead, WsError> {
        let head = &self.head;
        let opcode =
            Opcode::from_bits(head[0] & 0x0f).expect("opcode checked with the first bytes");
        let fin = head[0] & 0x80 != 0;
        let (len, at) = match head[1] & 0x7f {
            126 => (u64::from(u16::from_be_bytes([head[2], head[3]])), 4),
            127 => {
                let len = u64::from_be_bytes([
                    head[2], head[3], head[4], head[5], head[6], head[7], head[8], head[9],
                ]);
                if len >> 63 != 0 {
                    return Err(WsError::LengthMsb);
                }
                (len, 10)
            }
            len7 => (u64::from(len7), 2),
        };
        let mask =
            (head[1] & 0x80 != 0).then(|| [head[at], head[at + 1], head[at + 2], head[at + 3]]);
        if !opcode.is_control() {
            // The limit is checked here, before any payload byte is buffered.
            let total = self.message.len() as u64 + len;
            if total > self.max_message_bytes as u64 {
                return Err(WsError::TooLarge);
            }
            if opcode != Opcode::Continuation {
                self.message_opcode = Some(opcode);
            }
        }
        Ok(FrameHead {
            opcode,
            fin,
            mask,
            remaining: len,
            read: 0,
        })
    }

    /// Appends (unmasked) payload bytes of `frame` to the message or control buffer.
    fn take_payload(&mut self, frame: &FrameHead, chunk: &[u8]) {
        let dest = if frame.opcode.is_control() {
            &mut self.control
        } else {
            &mut self.message
        };
        if dest.capacity() - dest.len() < chunk.len() {
            // Grow geometrically, but never past what the frame header announced:
            // the limit was checked against that, so capacity stays within it.
            let announced = dest.len()
                + usize::try_from(frame.remaining).expect("remaining is within the limit");
            let target = (dest.capacity() * 2)
                .max(dest.len() + chunk.len())
                .min(announced);
            dest.reserve_exact(target - dest.len());
        }
        let start = dest.len();
        dest.extend_from_slice(chunk);
        if let Some(mask) = frame.mask {
            apply_mask(&mut dest[start..], mask, (frame.read & 3) as usize);
        }
    }

    /// Completes a frame whose payload is all here; returns the event it ends, if any.
    fn finish_frame(&mut self, frame: &FrameHead) -> Result<Option<WsEvent>, WsError> {
        match frame.opcode {
            Opcode::Ping => Ok(Some(WsEvent::Ping(std::mem::take(&mut self.control)))),
            Opcode::Pong => Ok(Some(WsEvent::Pong(std::mem::take(&mut self.control)))),
            Opcode::Close => {
                let payload = std::mem::take(&mut self.control);
                parse_close(&payload).map(Some)
            }
            Opcode::Text | Opcode::Binary | Opcode::Continuation => {
                if !frame.fin {
                    return Ok(None);
                }
                let data = std::mem::take(&mut self.message);
                match self.message_opcode.take() {
                    Some(Opcode::Text) => {
                        if std::str::from_utf8(&data).is_err() {
                            return Err(WsError::InvalidUtf8);
                        }
                        Ok(Some(WsEvent::Text(data)))
                    }
                    Some(Opcode::Binary) => Ok(Some(WsEvent::Binary(data))),
                    other => unreachable!("a data message is text or binary, not {other:?}"),
                }
            }
        }
    }
}

/// Parses a close frame's payload (RFC 6455 §5.5.1, §7.4).
fn parse_close(payload: &[u8]) -> Result<WsEvent, WsError> {
    match payload {
        [] => Ok(WsEvent::Close {
            code: None,
            reason: String::new(),
        }),
        [_] => Err(WsError::CloseTooShort),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !close::is_valid_on_wire(code) {
                return Err(WsError::InvalidCloseCode(code));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| WsError::CloseReasonUtf8)?;
            Ok(WsEvent::Close {
                code: Some(code),
                reason: reason.to_owned(),
            })
        }
    }
}
