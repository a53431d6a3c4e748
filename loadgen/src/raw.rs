//! `--target raw-ws`: the same scenarios against WebSocket servers that do not speak
//! Flare's protocol (the peers of `bench/compare`).
//!
//! The contract such a server keeps is the smallest a broadcast server has: a client
//! connects to `<url path>/<room>` with no subprotocol and no auth; every text message
//! a client sends goes, unchanged, to every connection in the same room, the sender
//! included, in the order the server read them from that sender. Scenarios pick the
//! rooms: one per user for `connect` and `churn` (like a user's own channel), one per
//! pair for `chat`, one for the whole group in `fanout`.
//!
//! A message is `<sender> <body>`, the body being [`message_body`]'s
//! `<n>.<scheduled ns>.` and padding, so a receiver knows who sent it and when it was
//! due. Such a server acknowledges nothing: a message counts as acknowledged once it
//! is written to the socket, so loss is judged against everything sent. The sender's
//! own copy is counted as a delivery but not checked (not every server echoes it).
//!
//! [`message_body`]: crate::proto::message_body

use std::borrow::Cow;

use crate::proto::{BadServerFrame, Incoming};

/// The request path of `room` under the URL's path `base` (`/ws` + `r1` → `/ws/r1`).
pub fn room_path(base: &str, room: &str) -> String {
    format!("{}/{room}", base.trim_end_matches('/'))
}

/// Writes the text of a message from `from` with `body` into `out`.
pub fn encode(from: &str, body: &str, out: &mut String) {
    out.clear();
    out.push_str(from);
    out.push(' ');
    out.push_str(body);
}

/// Reads a room message as the `msg` it stands for (no inbox, so `seq` 0).
pub fn decode(is_text: bool, bytes: &[u8]) -> Result<Incoming<'_>, BadServerFrame> {
    if !is_text {
        return Err(BadServerFrame("bad_server_frame:binary_in_raw_room"));
    }
    let text =
        std::str::from_utf8(bytes).map_err(|_| BadServerFrame("bad_server_frame:invalid_utf8"))?;
    let (from, body) = text
        .split_once(' ')
        .ok_or(BadServerFrame("bad_server_frame:not_a_room_message"))?;
    Ok(Incoming::Msg {
        seq: 0,
        from: Cow::Borrowed(from),
        body: Cow::Borrowed(body),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{message_body, parse_body};

    #[test]
    fn a_room_message_round_trips() {
        let mut body = String::new();
        message_body(7, 123_456_789, 32, &mut body);
        let mut text = String::new();
        encode("lg-1-p3", &body, &mut text);
        match decode(true, text.as_bytes()).expect("decodes") {
            Incoming::Msg { seq, from, body } => {
                assert_eq!((seq, &*from), (0, "lg-1-p3"));
                assert_eq!(parse_body(&body), Some((7, 123_456_789)));
            }
            other => panic!("decoded as {other:?}"),
        }
        assert!(decode(false, text.as_bytes()).is_err());
        assert!(decode(true, b"no-space").is_err());
        assert!(decode(true, &[0xff, b' ', b'x']).is_err());
    }

    #[test]
    fn rooms_live_under_the_url_path() {
        assert_eq!(room_path("/ws", "r1"), "/ws/r1");
        assert_eq!(room_path("/ws/", "r1"), "/ws/r1");
        assert_eq!(room_path("/", "r1"), "/r1");
    }
}
