//! Tests of the WebSocket module, and the helpers they share.

mod decoder;
mod encoder;
mod handshake;
mod properties;

use super::*;

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
const LIMIT: usize = 1024;

fn server() -> WsDecoder {
    WsDecoder::new(Role::Server, LIMIT)
}

fn client_frame(opcode: Opcode, payload: &[u8], fin: bool) -> Vec<u8> {
    let mut out = Vec::new();
    encode_client_frame(opcode, payload, MASK, fin, &mut out);
    out
}

/// Feeds `chunks` in order; returns the events and the error that stopped decoding.
fn feed(decoder: &mut WsDecoder, chunks: &[&[u8]]) -> (Vec<WsEvent>, Option<WsError>) {
    let mut events = Vec::new();
    for chunk in chunks {
        let mut input = *chunk;
        loop {
            match decoder.decode(&mut input) {
                Ok(Some(event)) => events.push(event),
                Ok(None) => {
                    assert!(input.is_empty(), "None leaves no input behind");
                    break;
                }
                Err(e) => return (events, Some(e)),
            }
        }
    }
    (events, None)
}

fn decode_one(wire: &[u8]) -> (Vec<WsEvent>, Option<WsError>) {
    feed(&mut server(), &[wire])
}

fn error_of(wire: &[u8]) -> WsError {
    let (events, error) = decode_one(wire);
    assert_eq!(events, [], "no event before the error");
    error.expect("an error")
}

fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason);
    payload
}
