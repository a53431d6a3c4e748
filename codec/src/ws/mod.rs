//! WebSocket (RFC 6455), server side, sans-IO.
//!
//! - [`handshake`]: parse the `GET /ws` upgrade request, negotiate the encoding
//!   (PROTOCOL.md §1), build the `101` answer or an HTTP error.
//! - [`decoder`]: [`WsDecoder`] turns the bytes of a connection into whole messages and
//!   control frames, enforcing RFC 6455 and the message size limit; every violation is a
//!   [`WsError`] that names the close code to send.
//! - [`encoder`]: server frames (unmasked, never fragmented) and, for tests and load
//!   generation, masked client frames.

pub mod decoder;
pub mod encoder;
pub mod handshake;

pub use decoder::{Role, WsDecoder, WsError, WsEvent};
pub use encoder::{
    binary, close, encode_client_frame, encode_frame, encode_header, ping, pong, text,
    unmasked_frame_len, Opcode, MAX_CONTROL_PAYLOAD, MAX_FRAME_HEADER_BYTES,
};
pub use handshake::{
    accept_key, accept_response, choose_encoding, client_request, error_response, parse_upgrade,
    Accepted, HandshakeError, Upgrade, WS_PATH,
};

/// XORs `buf` with `mask`, where `buf[0]` is payload byte number `phase` of its frame.
pub(crate) fn apply_mask(buf: &mut [u8], mask: [u8; 4], phase: usize) {
    let m = [
        mask[phase & 3],
        mask[(phase + 1) & 3],
        mask[(phase + 2) & 3],
        mask[(phase + 3) & 3],
    ];
    let wide = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes([
            chunk[0], chunk[1], chunk[2], chunk[3], chunk[4], chunk[5], chunk[6], chunk[7],
        ]);
        chunk.copy_from_slice(&(word ^ wide).to_ne_bytes());
    }
    // The remainder starts at a multiple of 8, so the mask phase is unchanged.
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m[i & 3];
    }
}

#[cfg(test)]
mod tests;
