//! Flare's wire protocol (PROTOCOL.md), sans-IO: bytes in, frames and bytes out.
//!
//! Nothing in this crate awaits, owns a socket or reads a clock, so every rule can be
//! tested by feeding bytes. Decoders of self-delimited units (the upgrade request, a
//! QUIC length-framed frame) look at the caller's bytes and answer either
//! [`Decoded::Complete`] (a value, and how many bytes it used) or
//! [`Decoded::Insufficient`] ("nothing taken: call again with these bytes and more").
//! The WebSocket decoder, which lives as long as its connection, instead takes every
//! byte it is given and keeps partial frames itself, so the caller can return its read
//! buffer to the shard's pool after each read. Encoders append to a caller-owned
//! `Vec<u8>`. Bad input is a typed error that names the protocol's answer (an HTTP
//! status, a close code, or the `message` of a `bad_frame` error), never a panic.
//!
//! - [`close`]: the close codes of PROTOCOL.md §7.
//! - [`frame`]: the protocol frames of PROTOCOL.md §5 in both encodings (JSON, rkyv).
//! - [`ids`]: the identifier rule of PROTOCOL.md §2.
//! - [`ws`]: the server side of RFC 6455 (handshake, frame decoder, frame encoder), plus
//!   the client-side encoder used by tests and load generation.
//! - [`quic`]: the length framing of one protocol frame on a QUIC stream.
//!
//! Every size limit of the wire is a named constant below; the gateway's configuration
//! starts from these defaults.

pub mod close;
pub mod frame;
pub mod ids;
pub mod quic;
pub mod ws;

pub use frame::{ClientFrame, DecodeError, Encoding, ErrorCode, GoawayReason, ServerFrame, Target};

/// Default limit of one protocol frame: one WebSocket message (all fragments) or one
/// QUIC length-framed frame. Over it: close 1009 (PROTOCOL.md §7).
pub const DEFAULT_MAX_FRAME_BYTES: usize = 1 << 20;

/// Default limit of a `send` body (`max_body_bytes`, PROTOCOL.md §5). Over it: `too_large`.
pub const DEFAULT_MAX_BODY_BYTES: usize = 65536;

/// Default limit of a WebSocket upgrade request (request line and headers).
pub const DEFAULT_MAX_HANDSHAKE_BYTES: usize = 8192;

/// The outcome of one decoding step that did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<T> {
    /// A whole value was decoded from the first `consumed` bytes of the input.
    Complete { value: T, consumed: usize },
    /// The input holds only a prefix of a value: nothing was consumed; call again with
    /// the same bytes followed by more.
    Insufficient,
}

impl<T> Decoded<T> {
    /// The value, if complete.
    pub fn complete(self) -> Option<(T, usize)> {
        match self {
            Decoded::Complete { value, consumed } => Some((value, consumed)),
            Decoded::Insufficient => None,
        }
    }
}
