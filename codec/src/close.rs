//! Close codes of PROTOCOL.md §7. WebSocket sends them in close frames; QUIC uses the
//! same numbers as application error codes.

/// Normal closure.
pub const NORMAL: u16 = 1000;
/// Going away: the server drains, or the client missed its heartbeats.
pub const GOING_AWAY: u16 = 1001;
/// WebSocket protocol violation.
pub const PROTOCOL_ERROR: u16 = 1002;
/// Invalid UTF-8 in a text message (or a close reason).
pub const INVALID_PAYLOAD: u16 = 1007;
/// A message over the frame size limit.
pub const MESSAGE_TOO_BIG: u16 = 1009;
/// Internal error.
pub const INTERNAL_ERROR: u16 = 1011;
/// Too many `bad_frame` errors in a row.
pub const TOO_MANY_BAD_FRAMES: u16 = 4000;
/// Not authenticated: missing, failed or late `auth`.
pub const UNAUTHENTICATED: u16 = 4001;
/// The session's token expired.
pub const TOKEN_EXPIRED: u16 = 4002;
/// Replaced by a newer session of the same user and device, or kicked.
pub const REPLACED: u16 = 4003;
/// Slow consumer: the connection's outbound queue overflowed.
pub const SLOW_CONSUMER: u16 = 4008;

/// Whether a peer may send `code` in a close frame (RFC 6455 §7.4): the defined codes
/// 1000-1003 and 1007-1011, the IANA-registered 1012-1014 (service restart, try again
/// later, bad gateway), and the ranges 3000-4999 for libraries and applications.
/// 1004 (reserved), 1005, 1006 and 1015 (never sent on the wire), the rest of 1000-2999
/// and everything outside 1000-4999 are invalid.
pub const fn is_valid_on_wire(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_validity() {
        for code in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999,
            4000, 4999,
        ] {
            assert!(is_valid_on_wire(code), "{code}");
        }
        for code in [
            0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            assert!(!is_valid_on_wire(code), "{code}");
        }
        for code in [
            NORMAL,
            GOING_AWAY,
            PROTOCOL_ERROR,
            INVALID_PAYLOAD,
            MESSAGE_TOO_BIG,
            INTERNAL_ERROR,
        ] {
            assert!(is_valid_on_wire(code));
        }
        for code in [
            TOO_MANY_BAD_FRAMES,
            UNAUTHENTICATED,
            TOKEN_EXPIRED,
            REPLACED,
            SLOW_CONSUMER,
        ] {
            assert!(is_valid_on_wire(code));
        }
    }
}
