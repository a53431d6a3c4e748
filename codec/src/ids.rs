//! Identifiers of PROTOCOL.md §2: user, device, group and client message ids.

/// The longest identifier, in bytes.
pub const MAX_ID_BYTES: usize = 64;

/// Whether `s` is a valid user, device, group or client message id:
/// 1..=[`MAX_ID_BYTES`] bytes of `[A-Za-z0-9_.@:-]`.
pub fn is_valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_BYTES
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'@' | b':' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_allowed_alphabet() {
        assert!(is_valid_id("a"));
        assert!(is_valid_id("alice"));
        assert!(is_valid_id("Bob_01.x@host:phone-2"));
        assert!(is_valid_id("0123456789"));
        assert!(is_valid_id("_.@:-"));
    }

    #[test]
    fn length_bounds() {
        assert!(!is_valid_id(""));
        assert!(is_valid_id(&"x".repeat(MAX_ID_BYTES)));
        assert!(!is_valid_id(&"x".repeat(MAX_ID_BYTES + 1)));
    }

    #[test]
    fn rejects_other_bytes() {
        for bad in [
            "a b", "a/b", "a\0", "é", "a+b", "a#b", "a,b", "\"a\"", "a\n", "ü",
        ] {
            assert!(!is_valid_id(bad), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn every_ascii_byte_is_classified() {
        let allowed: Vec<u8> = (0u8..128)
            .filter(|&b| is_valid_id(std::str::from_utf8(&[b]).expect("ascii")))
            .collect();
        let expected: Vec<u8> =
            b"-.0123456789:@ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz".to_vec();
        assert_eq!(allowed, expected);
    }
}
