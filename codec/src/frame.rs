//! Protocol frames of PROTOCOL.md §5, in both encodings.
//!
//! The same Rust types carry the JSON encoding (serde, `type`-tagged objects) and
//! the rkyv encoding (rkyv 0.8 archives in the wire format pinned by the workspace).

use std::fmt;

use serde::{Deserialize, Serialize};

/// Where a message goes: `{"user":U}` or `{"group":G}`.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    User(String),
    Group(String),
}

/// A frame sent by a client.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Auth {
        token: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last_seq: Option<u64>,
    },
    Send {
        id: String,
        to: Target,
        body: String,
    },
    Ack {
        seq: u64,
    },
    Sync {
        after: u64,
        limit: u32,
    },
    Ping,
}

/// Error codes of PROTOCOL.md §6.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadFrame,
    Unauthenticated,
    AuthFailed,
    TokenExpired,
    TooLarge,
    Forbidden,
    RateLimited,
    Unavailable,
    Internal,
}

/// Reasons of a `goaway` frame.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum GoawayReason {
    Draining,
    Replaced,
    Kicked,
    TokenExpired,
}

/// A frame sent by the server. `msg_id` is a u64 written in JSON as a decimal string.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    AuthOk {
        user: String,
        device: String,
        session: String,
        node: String,
        head_seq: u64,
        heartbeat_ms: u64,
    },
    SendOk {
        id: String,
        #[serde(with = "u64_as_string")]
        msg_id: u64,
        ts: u64,
        dup: bool,
    },
    Msg {
        seq: u64,
        #[serde(with = "u64_as_string")]
        msg_id: u64,
        from: String,
        from_device: String,
        to: Target,
        body: String,
        ts: u64,
    },
    SyncDone {
        after: u64,
        last: u64,
        more: bool,
        truncated: bool,
    },
    Error {
        code: ErrorCode,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    Pong,
    Goaway {
        reason: GoawayReason,
        reconnect_after_ms: u64,
    },
}

impl ErrorCode {
    /// The protocol string of this code (PROTOCOL.md §6), as written in JSON.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::AuthFailed => "auth_failed",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl GoawayReason {
    /// The protocol string of this reason (PROTOCOL.md §5), as written in JSON.
    pub const fn as_str(self) -> &'static str {
        match self {
            GoawayReason::Draining => "draining",
            GoawayReason::Replaced => "replaced",
            GoawayReason::Kicked => "kicked",
            GoawayReason::TokenExpired => "token_expired",
        }
    }
}

impl fmt::Display for GoawayReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The encoding of a session's frames, chosen at connect time (PROTOCOL.md §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// One UTF-8 JSON object per frame; WebSocket text messages.
    Json,
    /// One validated rkyv archive per frame; WebSocket binary messages.
    Rkyv,
}

impl Encoding {
    /// Every encoding, in the server's order of preference when nothing else decides.
    pub const ALL: [Encoding; 2] = [Encoding::Json, Encoding::Rkyv];

    /// The WebSocket subprotocol (and QUIC ALPN) name of this encoding.
    pub const fn subprotocol(self) -> &'static str {
        match self {
            Encoding::Json => "flare.v1.json",
            Encoding::Rkyv => "flare.v1.rkyv",
        }
    }

    /// The encoding named by a WebSocket subprotocol token (exact, case-sensitive match).
    pub fn from_subprotocol(name: &str) -> Option<Encoding> {
        Encoding::ALL.into_iter().find(|e| e.subprotocol() == name)
    }

    /// The QUIC ALPN identifier of this encoding (the same name as the subprotocol).
    pub const fn alpn(self) -> &'static [u8] {
        self.subprotocol().as_bytes()
    }

    /// The encoding named by a QUIC ALPN identifier.
    pub fn from_alpn(alpn: &[u8]) -> Option<Encoding> {
        Encoding::ALL.into_iter().find(|e| e.alpn() == alpn)
    }

    /// Whether frames travel in WebSocket text messages (JSON) rather than binary ones.
    pub const fn is_text(self) -> bool {
        matches!(self, Encoding::Json)
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.subprotocol())
    }
}

/// Why bytes are not a protocol frame. Its [`message`](DecodeError::message) becomes the
/// `message` of a `bad_frame` error; it is bounded in length because it may quote input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    message: String,
}

impl DecodeError {
    /// The longest message kept, in bytes (longer ones are cut at a char boundary).
    pub const MAX_MESSAGE_BYTES: usize = 200;

    fn new(kind: &str, detail: impl fmt::Display) -> DecodeError {
        let mut message = format!("{kind}: {detail}");
        if message.len() > Self::MAX_MESSAGE_BYTES {
            let mut end = Self::MAX_MESSAGE_BYTES;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        DecodeError { message }
    }

    /// A human-readable description, at most [`DecodeError::MAX_MESSAGE_BYTES`] long.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DecodeError {}

/// Parses JSON, or validates (bytecheck) and deserializes an rkyv archive. The rkyv path
/// never uses unchecked access: these bytes may come from anyone.
fn decode_with<T>(enc: Encoding, bytes: &[u8]) -> Result<T, DecodeError>
where
    T: for<'de> Deserialize<'de> + rkyv::Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>>
        + rkyv::Deserialize<T, rkyv::rancor::Strategy<rkyv::de::Pool, rkyv::rancor::Error>>,
{
    match enc {
        Encoding::Json => {
            serde_json::from_slice(bytes).map_err(|e| DecodeError::new("invalid JSON frame", e))
        }
        Encoding::Rkyv => rkyv::from_bytes::<T, rkyv::rancor::Error>(bytes)
            .map_err(|e| DecodeError::new("invalid rkyv frame", e)),
    }
}

/// Appends `value` in `enc` to `out`. An rkyv archive's pointers are relative, so the
/// archive is valid when read from where it starts in `out`, whatever precedes it.
fn encode_with<T>(value: &T, enc: Encoding, out: &mut Vec<u8>)
where
    T: Serialize
        + for<'a> rkyv::Serialize<
            rkyv::api::high::HighSerializer<
                Vec<u8>,
                rkyv::ser::allocator::ArenaHandle<'a>,
                rkyv::rancor::Error,
            >,
        >,
{
    match enc {
        Encoding::Json => {
            // Frames hold only strings, integers, booleans and string-keyed objects.
            serde_json::to_writer(&mut *out, value)
                .expect("a protocol frame always serializes to JSON");
        }
        Encoding::Rkyv => {
            let buf = std::mem::take(out);
            // Writing to a Vec cannot fail; only a string beyond the 32-bit relative
            // pointer range (2 GiB) could, and every frame is bounded far below that.
            *out = rkyv::api::high::to_bytes_in::<_, rkyv::rancor::Error>(value, buf)
                .expect("a protocol frame always fits the 32-bit rkyv format");
        }
    }
}

impl ClientFrame {
    /// Decodes one frame a client sent. JSON: unknown fields are ignored; an unknown
    /// `type` or a missing or ill-formed field is an error. rkyv: the archive is always
    /// validated before it is read.
    pub fn decode(enc: Encoding, bytes: &[u8]) -> Result<ClientFrame, DecodeError> {
        if enc == Encoding::Json && json::type_first(bytes) {
            return json::decode_client(bytes)
                .map_err(|e| DecodeError::new("invalid JSON frame", e));
        }
        decode_with(enc, bytes)
    }

    /// Encodes this frame (clients, tests and load generation).
    pub fn encode(&self, enc: Encoding) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(enc, &mut out);
        out
    }

    /// Appends this frame's encoding to `out`.
    pub fn encode_into(&self, enc: Encoding, out: &mut Vec<u8>) {
        encode_with(self, enc, out)
    }

    /// The frame's `type` as written in JSON.
    pub const fn type_name(&self) -> &'static str {
        match self {
            ClientFrame::Auth { .. } => "auth",
            ClientFrame::Send { .. } => "send",
            ClientFrame::Ack { .. } => "ack",
            ClientFrame::Sync { .. } => "sync",
            ClientFrame::Ping => "ping",
        }
    }
}

impl ServerFrame {
    /// Encodes this frame: a JSON object or an rkyv archive.
    pub fn encode(&self, enc: Encoding) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(enc, &mut out);
        out
    }

    /// Appends this frame's encoding to `out`.
    pub fn encode_into(&self, enc: Encoding, out: &mut Vec<u8>) {
        encode_with(self, enc, out)
    }

    /// Decodes one frame the server sent (clients, tests and load generation). rkyv
    /// archives are validated like client input.
    pub fn decode(enc: Encoding, bytes: &[u8]) -> Result<ServerFrame, DecodeError> {
        decode_with(enc, bytes)
    }

    /// The frame's `type` as written in JSON.
    pub const fn type_name(&self) -> &'static str {
        match self {
            ServerFrame::AuthOk { .. } => "auth_ok",
            ServerFrame::SendOk { .. } => "send_ok",
            ServerFrame::Msg { .. } => "msg",
            ServerFrame::SyncDone { .. } => "sync_done",
            ServerFrame::Error { .. } => "error",
            ServerFrame::Pong => "pong",
            ServerFrame::Goaway { .. } => "goaway",
        }
    }
}

mod json;
mod msg_template;
pub use msg_template::{MsgParts, MsgTemplate};

/// `msg_id` in JSON: a u64 as a decimal string of ASCII digits (no sign, no spaces).
mod u64_as_string {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(D::Error::custom("expected a decimal string of digits"));
        }
        s.parse().map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests;
