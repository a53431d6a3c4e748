//! The opening handshake, server side (RFC 6455 §4.2), and the encoding negotiation of
//! PROTOCOL.md §1.

use std::fmt;

use base64::{engine::general_purpose::STANDARD, Engine as _};
use sha1::{Digest, Sha1};

use crate::{Decoded, Encoding};

/// The path of the upgrade request (a query string is allowed and ignored).
pub const WS_PATH: &str = "/ws";

/// The GUID of RFC 6455 §1.3 that `Sec-WebSocket-Accept` hashes with the key.
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The most header lines an upgrade request may have (browsers send about 15).
const MAX_HEADERS: usize = 64;

/// A valid upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    /// `Sec-WebSocket-Key`, trimmed (base64 of 16 bytes).
    pub key: String,
    /// The offered subprotocols, in the client's order, from every
    /// `Sec-WebSocket-Protocol` header (comma-separated lists, empty items dropped).
    pub protocols: Vec<String>,
    /// The request target as sent: `/ws`, possibly with a query string.
    pub path: String,
}

/// What to do with an accepted upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The session's encoding.
    pub encoding: Encoding,
    /// The `101 Switching Protocols` answer to write.
    pub response: Vec<u8>,
}

impl Upgrade {
    /// Negotiates the encoding and builds the `101` answer (see [`choose_encoding`]).
    pub fn accept(&self) -> Result<Accepted, HandshakeError> {
        let chosen = choose_encoding(&self.protocols)?;
        Ok(Accepted {
            encoding: chosen.unwrap_or(Encoding::Json),
            response: accept_response(&self.key, chosen.map(Encoding::subprotocol)),
        })
    }
}

/// Why an upgrade request is refused; each names the HTTP answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeError {
    /// No complete request within the handshake size limit, or too many header lines.
    TooLarge,
    /// Not parseable as an HTTP/1.x request.
    Malformed,
    /// A method other than GET.
    MethodNotAllowed,
    /// HTTP/1.0 (RFC 6455 needs HTTP/1.1).
    HttpVersion,
    /// A path other than [`WS_PATH`].
    NotFound,
    /// No `Upgrade: websocket`, or no `upgrade` token in `Connection`.
    NotUpgrade,
    /// `Sec-WebSocket-Version` missing or not 13.
    UnsupportedVersion,
    /// `Sec-WebSocket-Key` missing, repeated, or not base64 of 16 bytes.
    BadKey,
    /// Subprotocols were offered and none of them is ours.
    NoSupportedSubprotocol,
}

impl HandshakeError {
    /// The HTTP status of the answer.
    pub const fn status(self) -> u16 {
        match self {
            HandshakeError::TooLarge => 431,
            HandshakeError::MethodNotAllowed => 405,
            HandshakeError::NotFound => 404,
            HandshakeError::UnsupportedVersion => 426,
            HandshakeError::Malformed
            | HandshakeError::HttpVersion
            | HandshakeError::NotUpgrade
            | HandshakeError::BadKey
            | HandshakeError::NoSupportedSubprotocol => 400,
        }
    }

    /// The HTTP reason phrase of [`status`](Self::status).
    pub const fn reason(self) -> &'static str {
        match self.status() {
            404 => "Not Found",
            405 => "Method Not Allowed",
            426 => "Upgrade Required",
            431 => "Request Header Fields Too Large",
            _ => "Bad Request",
        }
    }

    /// A one-line explanation, sent as the body of the answer.
    pub const fn message(self) -> &'static str {
        match self {
            HandshakeError::TooLarge => "upgrade request too large",
            HandshakeError::Malformed => "malformed HTTP request",
            HandshakeError::MethodNotAllowed => "the upgrade request must be a GET",
            HandshakeError::HttpVersion => "the upgrade request must be HTTP/1.1",
            HandshakeError::NotFound => "the WebSocket endpoint is /ws",
            HandshakeError::NotUpgrade => "not a WebSocket upgrade request",
            HandshakeError::UnsupportedVersion => "Sec-WebSocket-Version must be 13",
            HandshakeError::BadKey => "Sec-WebSocket-Key must be base64 of 16 bytes",
            HandshakeError::NoSupportedSubprotocol => {
                "supported subprotocols: flare.v1.json, flare.v1.rkyv"
            }
        }
    }

    /// The whole HTTP answer (see [`error_response`]).
    pub fn response(self) -> Vec<u8> {
        error_response(self.status(), self.reason(), self.message())
    }
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message(), self.status())
    }
}

impl std::error::Error for HandshakeError {}

/// Parses a WebSocket upgrade request from the start of `buf`.
///
/// `Insufficient` while `buf` holds a prefix of a request shorter than `max_bytes`;
/// [`HandshakeError::TooLarge`] once `max_bytes` bytes hold no complete request. On
/// success `consumed` is the length of the request: bytes after it are not part of it.
pub fn parse_upgrade(buf: &[u8], max_bytes: usize) -> Result<Decoded<Upgrade>, HandshakeError> {
    let window = &buf[..buf.len().min(max_bytes)];
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let consumed = match request.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if window.len() < max_bytes => {
            return Ok(Decoded::Insufficient)
        }
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
            return Err(HandshakeError::TooLarge)
        }
        Err(_) => return Err(HandshakeError::Malformed),
    };
    // httparse fills these three on Complete.
    let (Some(method), Some(target), Some(version)) =
        (request.method, request.path, request.version)
    else {
        return Err(HandshakeError::Malformed);
    };
    if method != "GET" {
        return Err(HandshakeError::MethodNotAllowed);
    }
    if version != 1 {
        return Err(HandshakeError::HttpVersion);
    }
    let path = target.split_once('?').map_or(target, |(path, _query)| path);
    if path != WS_PATH {
        return Err(HandshakeError::NotFound);
    }

    let mut upgrade = false;
    let mut connection_upgrade = false;
    let mut version_13 = None;
    let mut key = None;
    let mut protocols = Vec::new();
    for header in request.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade |= has_token(header.value, b"websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            connection_upgrade |= has_token(header.value, b"upgrade");
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            let ok = header.value.trim_ascii() == b"13";
            version_13 = Some(version_13.unwrap_or(true) && ok);
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            if key.is_some() {
                return Err(HandshakeError::BadKey);
            }
            key = Some(header.value.trim_ascii());
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            let value = std::str::from_utf8(header.value).map_err(|_| HandshakeError::Malformed)?;
            protocols.extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(String::from),
            );
        }
    }
    if !upgrade || !connection_upgrade {
        return Err(HandshakeError::NotUpgrade);
    }
    if version_13 != Some(true) {
        return Err(HandshakeError::UnsupportedVersion);
    }
    let key = key
        .filter(|k| is_valid_key(k))
        .ok_or(HandshakeError::BadKey)?;
    let key = std::str::from_utf8(key)
        .map_err(|_| HandshakeError::BadKey)?
        .to_owned();
    Ok(Decoded::Complete {
        value: Upgrade {
            key,
            protocols,
            path: target.to_owned(),
        },
        consumed,
    })
}

/// Whether a comma-separated header value holds `token` (ASCII case-insensitive).
fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|item| item.trim_ascii().eq_ignore_ascii_case(token))
}

/// A key is the base64 of 16 bytes: 24 characters, the last two `==`.
fn is_valid_key(key: &[u8]) -> bool {
    key.len() == 24 && STANDARD.decode(key).is_ok_and(|raw| raw.len() == 16)
}

/// Picks the session's encoding from the offered subprotocols (PROTOCOL.md §1).
///
/// - none offered: `Ok(None)`: JSON, and the answer has no `Sec-WebSocket-Protocol`;
/// - some of ours offered: `Ok(Some(e))` for the first one in the client's order, to be
///   echoed in the answer;
/// - offered, none ours: [`HandshakeError::NoSupportedSubprotocol`] (HTTP 400).
pub fn choose_encoding(protocols: &[String]) -> Result<Option<Encoding>, HandshakeError> {
    if protocols.is_empty() {
        return Ok(None);
    }
    protocols
        .iter()
        .find_map(|p| Encoding::from_subprotocol(p))
        .map(Some)
        .ok_or(HandshakeError::NoSupportedSubprotocol)
}

/// `Sec-WebSocket-Accept` for `key`: base64(SHA-1(key + GUID)).
pub fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(ACCEPT_GUID);
    STANDARD.encode(sha.finalize())
}

/// The `101 Switching Protocols` answer, echoing `subprotocol` when one was chosen.
pub fn accept_response(key: &str, subprotocol: Option<&str>) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
        accept_key(key)
    );
    if let Some(protocol) = subprotocol {
        out.push_str("Sec-WebSocket-Protocol: ");
        out.push_str(protocol);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// An HTTP error answer that closes the connection: `status reason`, a plain-text
/// `body`, `Content-Length`, `Connection: close`, and for 426 the
/// `Sec-WebSocket-Version: 13` that RFC 6455 §4.4 asks for.
pub fn error_response(status: u16, reason: &str, body: &str) -> Vec<u8> {
    debug_assert!(
        !reason.contains(['\r', '\n']),
        "reason phrase with a line break"
    );
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n",
        body.len()
    );
    if status == 426 {
        out.push_str("Sec-WebSocket-Version: 13\r\n");
    }
    out.push_str("\r\n");
    out.push_str(body);
    out.into_bytes()
}

/// An upgrade request as a client sends it (tests and load generation). `key` should be
/// base64 of 16 random bytes.
pub fn client_request(host: &str, path: &str, key: &str, protocols: &[&str]) -> Vec<u8> {
    let mut out = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
    );
    if !protocols.is_empty() {
        out.push_str("Sec-WebSocket-Protocol: ");
        out.push_str(&protocols.join(", "));
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}
