//! Protocol frames of PROTOCOL.md §5, in both encodings.
//!
//! The same Rust types carry the JSON encoding (serde, `type`-tagged objects) and
//! the rkyv encoding (rkyv 0.8 archives in the wire format pinned by the workspace).

use serde::{Deserialize, Serialize};

/// Where a message goes: `{"user":U}` or `{"group":G}`.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    User(String),
    Group(String),
}

/// A frame sent by a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
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
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
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
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum GoawayReason {
    Draining,
    Replaced,
    Kicked,
    TokenExpired,
}

/// A frame sent by the server. `msg_id` is a u64 written in JSON as a decimal string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
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

mod u64_as_string {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(D::Error::custom)
    }
}
