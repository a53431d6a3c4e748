//! The client side of RFC 6455, sans-IO, written here on purpose rather than taken
//! from `flare-codec` (DESIGN.md §2: the load generator must not share a code path with
//! the gateway that would hide its bugs).
//!
//! - [`handshake_request`] / [`parse_handshake_response`]: the `GET` upgrade and the
//!   server's `101` answer, checked (status, `Sec-WebSocket-Accept`, subprotocol).
//! - [`encode_frame`]: one masked, unfragmented client frame.
//! - [`Decoder`]: unmasked server frames in, whole messages out. It keeps bytes only
//!   while a frame is incomplete and frees them once it is whole, so an idle connection
//!   holds no buffer.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use sha1::{Digest, Sha1};

/// The GUID of RFC 6455 §1.3 that the accept key hashes with.
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Longest `101` answer accepted (status line and headers).
pub const MAX_RESPONSE_HEAD_BYTES: usize = 8192;

/// Largest server message accepted, all fragments together. Flare's own default limit
/// of a frame is 1 MiB; anything much larger is a server bug worth reporting.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// A frame's opcode (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

impl Opcode {
    fn from_u8(b: u8) -> Option<Opcode> {
        Some(match b {
            0x0 => Opcode::Continuation,
            0x1 => Opcode::Text,
            0x2 => Opcode::Binary,
            0x8 => Opcode::Close,
            0x9 => Opcode::Ping,
            0xA => Opcode::Pong,
            _ => return None,
        })
    }

    fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// The request of the opening handshake for `path` on `host`, offering `protocol`.
/// The upgrade request; `protocol` is the subprotocol offered, if any.
pub fn handshake_request(host: &str, path: &str, key_b64: &str, protocol: Option<&str>) -> Vec<u8> {
    let offer = match protocol {
        Some(p) => format!("Sec-WebSocket-Protocol: {p}\r\n"),
        None => String::new(),
    };
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key_b64}\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n"
    )
    .into_bytes()
}

/// A `Sec-WebSocket-Key`: 16 bytes, base64.
pub fn handshake_key(random: [u8; 16]) -> String {
    STANDARD.encode(random)
}

/// The `Sec-WebSocket-Accept` a server must answer to `key_b64`.
pub fn expected_accept(key_b64: &str) -> String {
    let mut h = Sha1::new();
    h.update(key_b64.as_bytes());
    h.update(ACCEPT_GUID.as_bytes());
    STANDARD.encode(h.finalize())
}

/// Why the opening handshake failed; [`HandshakeError::reason`] is the failure
/// reason reported by the scenarios.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeError {
    /// The server answered with this status instead of 101.
    Status(u16),
    /// Not HTTP, or a head over [`MAX_RESPONSE_HEAD_BYTES`].
    Malformed,
    /// 101 but a missing or wrong `Sec-WebSocket-Accept`.
    BadAccept,
    /// 101 but not the subprotocol offered.
    BadProtocol,
}

impl HandshakeError {
    pub fn reason(&self) -> String {
        match self {
            HandshakeError::Status(s) => format!("http_{s}"),
            HandshakeError::Malformed => "handshake_malformed".into(),
            HandshakeError::BadAccept => "handshake_bad_accept".into(),
            HandshakeError::BadProtocol => "handshake_bad_protocol".into(),
        }
    }
}

/// Parses the server's answer from the start of `buf`. `Ok(None)`: the head is not
/// complete yet. `Ok(Some(n))`: a valid `101` of `n` bytes (what follows are frames).
/// `protocol` is the subprotocol offered: the server must choose it; with none
/// offered, it must choose none (RFC 6455 §4.1).
pub fn parse_handshake_response(
    buf: &[u8],
    key_b64: &str,
    protocol: Option<&str>,
) -> Result<Option<usize>, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let consumed = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_RESPONSE_HEAD_BYTES {
                return Err(HandshakeError::Malformed);
            }
            return Ok(None);
        }
        Err(_) => return Err(HandshakeError::Malformed),
    };
    let status = resp.code.ok_or(HandshakeError::Malformed)?;
    if status != 101 {
        return Err(HandshakeError::Status(status));
    }
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    if header("Sec-WebSocket-Accept") != Some(expected_accept(key_b64).as_bytes()) {
        return Err(HandshakeError::BadAccept);
    }
    if header("Sec-WebSocket-Protocol") != protocol.map(str::as_bytes) {
        return Err(HandshakeError::BadProtocol);
    }
    Ok(Some(consumed))
}

/// Appends one final, masked client frame carrying `payload` to `out`.
pub fn encode_frame(opcode: Opcode, payload: &[u8], mask: [u8; 4], out: &mut Vec<u8>) {
    out.reserve(payload.len() + 14);
    out.push(0x80 | opcode as u8);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
}

/// Appends a masked close frame with `code` and no reason.
pub fn encode_close(code: u16, mask: [u8; 4], out: &mut Vec<u8>) {
    encode_frame(Opcode::Close, &code.to_be_bytes(), mask, out);
}

/// One whole message or control frame from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    Text(&'a [u8]),
    Binary(&'a [u8]),
    Ping(&'a [u8]),
    Pong,
    /// A close frame: its code (None when the frame had no payload).
    Close(Option<u16>),
}

/// A violation of RFC 6455 by the server; the connection is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// A frame from the server carried a mask (servers must not mask).
    Masked,
    /// Reserved bits set, unknown opcode, fragmented control frame, or a continuation
    /// with nothing to continue, or a new message inside a fragmented one.
    Protocol,
    /// A message over [`MAX_MESSAGE_BYTES`].
    TooBig,
}

impl FrameError {
    pub fn reason(self) -> &'static str {
        match self {
            FrameError::Masked => "ws_masked_server_frame",
            FrameError::Protocol => "ws_protocol_error",
            FrameError::TooBig => "ws_message_too_big",
        }
    }
}

/// Server frames in, messages out (see the module doc).
#[derive(Debug, Default)]
pub struct Decoder {
    /// Bytes of a frame that is not complete yet; empty (no allocation) otherwise.
    pending: Vec<u8>,
    /// The payload so far of a fragmented message, and its opcode.
    fragments: Vec<u8>,
    fragment_opcode: Option<Opcode>,
}

/// One frame header, parsed.
struct Header {
    fin: bool,
    opcode: Opcode,
    header_len: usize,
    payload_len: usize,
}

fn parse_header(buf: &[u8]) -> Result<Option<Header>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err(FrameError::Protocol);
    }
    if b1 & 0x80 != 0 {
        return Err(FrameError::Masked);
    }
    let opcode = Opcode::from_u8(b0 & 0x0f).ok_or(FrameError::Protocol)?;
    let fin = b0 & 0x80 != 0;
    let (header_len, payload_len) = match b1 & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (4, u16::from_be_bytes([buf[2], buf[3]]) as u64)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (10, u64::from_be_bytes(b))
        }
        n => (2, n as u64),
    };
    if opcode.is_control() && (!fin || payload_len > 125) {
        return Err(FrameError::Protocol);
    }
    if payload_len > MAX_MESSAGE_BYTES as u64 {
        return Err(FrameError::TooBig);
    }
    Ok(Some(Header {
        fin,
        opcode,
        header_len,
        payload_len: payload_len as usize,
    }))
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Bytes held for incomplete frames or messages (0 when idle).
    pub fn buffered_capacity(&self) -> usize {
        self.pending.capacity() + self.fragments.capacity()
    }

    /// Takes every byte of `data` and calls `on_message` for each whole message or
    /// control frame, in order. Stops at the first violation.
    pub fn feed(
        &mut self,
        data: &[u8],
        mut on_message: impl FnMut(Message<'_>),
    ) -> Result<(), FrameError> {
        if self.pending.is_empty() {
            let used = self.parse_frames(data, &mut on_message)?;
            if used < data.len() {
                self.pending.extend_from_slice(&data[used..]);
            }
            return Ok(());
        }
        let mut pending = std::mem::take(&mut self.pending);
        pending.extend_from_slice(data);
        let used = self.parse_frames(&pending, &mut on_message)?;
        if used < pending.len() {
            pending.drain(..used);
            self.pending = pending;
        }
        // Otherwise `pending` is dropped here: nothing stays allocated while idle.
        Ok(())
    }

    /// Parses whole frames from `buf`; returns how many bytes they used.
    fn parse_frames(
        &mut self,
        buf: &[u8],
        on_message: &mut impl FnMut(Message<'_>),
    ) -> Result<usize, FrameError> {
        let mut at = 0;
        while let Some(h) = parse_header(&buf[at..])? {
            let total = h.header_len + h.payload_len;
            if buf.len() - at < total {
                break;
            }
            let payload = &buf[at + h.header_len..at + total];
            at += total;
            self.on_frame(&h, payload, on_message)?;
        }
        Ok(at)
    }

    fn on_frame(
        &mut self,
        h: &Header,
        payload: &[u8],
        on_message: &mut impl FnMut(Message<'_>),
    ) -> Result<(), FrameError> {
        match h.opcode {
            Opcode::Ping => on_message(Message::Ping(payload)),
            Opcode::Pong => on_message(Message::Pong),
            Opcode::Close => {
                let code =
                    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                on_message(Message::Close(code));
            }
            Opcode::Text | Opcode::Binary => {
                if self.fragment_opcode.is_some() {
                    return Err(FrameError::Protocol);
                }
                if h.fin {
                    on_message(data_message(h.opcode, payload));
                } else {
                    self.fragment_opcode = Some(h.opcode);
                    self.fragments.extend_from_slice(payload);
                }
            }
            Opcode::Continuation => {
                let opcode = self.fragment_opcode.ok_or(FrameError::Protocol)?;
                if self.fragments.len() + payload.len() > MAX_MESSAGE_BYTES {
                    return Err(FrameError::TooBig);
                }
                self.fragments.extend_from_slice(payload);
                if h.fin {
                    let whole = std::mem::take(&mut self.fragments);
                    self.fragment_opcode = None;
                    on_message(data_message(opcode, &whole));
                }
            }
        }
        Ok(())
    }
}

fn data_message(opcode: Opcode, payload: &[u8]) -> Message<'_> {
    if opcode == Opcode::Text {
        Message::Text(payload)
    } else {
        Message::Binary(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server frame (unmasked), as a server would write it.
    fn server_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let len = payload.len();
        if len < 126 {
            out.push(len as u8);
        } else if len <= 65535 {
            out.push(126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        out.extend_from_slice(payload);
        out
    }

    fn collect(dec: &mut Decoder, data: &[u8]) -> Result<Vec<String>, FrameError> {
        let mut got = Vec::new();
        dec.feed(data, |m| {
            got.push(match m {
                Message::Text(p) => format!("text:{}", String::from_utf8_lossy(p)),
                Message::Binary(p) => format!("bin:{}", p.len()),
                Message::Ping(p) => format!("ping:{}", p.len()),
                Message::Pong => "pong".into(),
                Message::Close(c) => format!("close:{c:?}"),
            })
        })?;
        Ok(got)
    }

    #[test]
    fn accept_key_matches_rfc_example() {
        // RFC 6455 §1.3.
        assert_eq!(
            expected_accept("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn handshake_response_is_checked() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let ok = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: flare.v1.json\r\n\r\n";
        let mut with_frame = ok.as_bytes().to_vec();
        with_frame.extend_from_slice(&server_frame(true, 1, b"x"));
        assert_eq!(
            parse_handshake_response(&with_frame, key, Some("flare.v1.json")),
            Ok(Some(ok.len()))
        );
        assert_eq!(
            parse_handshake_response(&ok.as_bytes()[..40], key, Some("flare.v1.json")),
            Ok(None)
        );
        assert_eq!(
            parse_handshake_response(ok.as_bytes(), key, Some("flare.v1.rkyv")),
            Err(HandshakeError::BadProtocol)
        );
        assert_eq!(
            parse_handshake_response(
                ok.as_bytes(),
                "AAAAAAAAAAAAAAAAAAAAAA==",
                Some("flare.v1.json")
            ),
            Err(HandshakeError::BadAccept)
        );
        assert_eq!(
            parse_handshake_response(
                b"HTTP/1.1 400 Bad Request\r\n\r\n",
                key,
                Some("flare.v1.json")
            ),
            Err(HandshakeError::Status(400))
        );
        // No subprotocol offered (raw-ws peers): the server must choose none.
        let plain = ok.replace("Sec-WebSocket-Protocol: flare.v1.json\r\n", "");
        assert_eq!(
            parse_handshake_response(plain.as_bytes(), key, None),
            Ok(Some(plain.len()))
        );
        assert_eq!(
            parse_handshake_response(ok.as_bytes(), key, None),
            Err(HandshakeError::BadProtocol)
        );
        let request = String::from_utf8(handshake_request("h:1", "/ws/r1", key, None)).unwrap();
        assert!(request.starts_with("GET /ws/r1 HTTP/1.1\r\n") && request.ends_with("\r\n\r\n"));
        assert!(!request.contains("Sec-WebSocket-Protocol"));
    }

    #[test]
    fn client_frames_are_masked_and_sized() {
        for len in [0usize, 5, 125, 126, 65535, 65536] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mask = [1, 2, 3, 4];
            let mut out = Vec::new();
            encode_frame(Opcode::Binary, &payload, mask, &mut out);
            assert_eq!(out[0], 0x82);
            assert_eq!(out[1] & 0x80, 0x80, "mask bit");
            let (hlen, plen) = match out[1] & 0x7f {
                126 => (4, u16::from_be_bytes([out[2], out[3]]) as usize),
                127 => (
                    10,
                    u64::from_be_bytes(out[2..10].try_into().unwrap()) as usize,
                ),
                n => (2, n as usize),
            };
            assert_eq!(plen, len);
            assert_eq!(&out[hlen..hlen + 4], &mask);
            let unmasked: Vec<u8> = out[hlen + 4..]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i & 3])
                .collect();
            assert_eq!(unmasked, payload);
        }
    }

    #[test]
    fn decoder_handles_split_and_fragmented_frames_and_frees_buffers() {
        let mut bytes = server_frame(true, 1, b"hello");
        bytes.extend(server_frame(false, 2, &[0u8; 200]));
        bytes.extend(server_frame(true, 9, b"pi"));
        bytes.extend(server_frame(true, 0, &[0u8; 70000]));
        bytes.extend(server_frame(true, 8, &4001u16.to_be_bytes()));
        // Byte by byte and all at once give the same messages.
        let mut one = Decoder::new();
        let mut got = Vec::new();
        for b in &bytes {
            got.extend(collect(&mut one, std::slice::from_ref(b)).unwrap());
        }
        let mut all = Decoder::new();
        assert_eq!(collect(&mut all, &bytes).unwrap(), got);
        assert_eq!(
            got,
            vec!["text:hello", "ping:2", "bin:70200", "close:Some(4001)"]
        );
        assert_eq!(one.buffered_capacity(), 0);
        assert_eq!(all.buffered_capacity(), 0);
    }

    #[test]
    fn decoder_rejects_violations() {
        let mut masked = server_frame(true, 1, b"x");
        masked[1] |= 0x80;
        assert_eq!(
            collect(&mut Decoder::new(), &masked),
            Err(FrameError::Masked)
        );
        let rsv = {
            let mut f = server_frame(true, 1, b"x");
            f[0] |= 0x40;
            f
        };
        assert_eq!(
            collect(&mut Decoder::new(), &rsv),
            Err(FrameError::Protocol)
        );
        let stray = server_frame(true, 0, b"x");
        assert_eq!(
            collect(&mut Decoder::new(), &stray),
            Err(FrameError::Protocol)
        );
        let big = [0x82u8, 127, 0xff, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(collect(&mut Decoder::new(), &big), Err(FrameError::TooBig));
    }
}
