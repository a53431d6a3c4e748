//! Framing of protocol frames on a QUIC stream (PROTOCOL.md §1): a 4-byte big-endian
//! length, then that many bytes of frame.

use std::{fmt, ops::Range};

use crate::{close, Decoded};

/// The length prefix of each frame, in bytes.
pub const LEN_PREFIX_BYTES: usize = 4;

/// A frame whose announced length is over the limit: close the stream's connection with
/// [`TooLarge::close_code`] (1009). Detected from the prefix, before any payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge {
    /// The announced length.
    pub len: u32,
    /// The limit it exceeds.
    pub max_frame_bytes: usize,
}

impl TooLarge {
    /// The application error code to close with (PROTOCOL.md §7).
    pub const fn close_code(&self) -> u16 {
        close::MESSAGE_TOO_BIG
    }
}

impl fmt::Display for TooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "frame of {} bytes is over the limit of {}",
            self.len, self.max_frame_bytes
        )
    }
}

impl std::error::Error for TooLarge {}

/// Appends `frame` with its length prefix.
///
/// # Panics
/// If `frame` is 4 GiB or longer: frames are bounded far below that, so it is a bug.
pub fn encode(frame: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(frame.len()).expect("a frame is shorter than 4 GiB");
    out.reserve(LEN_PREFIX_BYTES + frame.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(frame);
}

/// Finds the first frame in `buf`: `Complete { value, consumed }` where `value` is the
/// frame's byte range in `buf` and `consumed` is prefix plus frame; `Insufficient` until
/// the whole frame is here. A length over `max_frame_bytes` is an error as soon as the
/// prefix is here.
pub fn decode(buf: &[u8], max_frame_bytes: usize) -> Result<Decoded<Range<usize>>, TooLarge> {
    let Some(prefix) = buf.first_chunk::<LEN_PREFIX_BYTES>() else {
        return Ok(Decoded::Insufficient);
    };
    let len = u32::from_be_bytes(*prefix);
    let frame_len = usize::try_from(len).ok().filter(|&l| l <= max_frame_bytes);
    let Some(frame_len) = frame_len else {
        return Err(TooLarge {
            len,
            max_frame_bytes,
        });
    };
    let end = LEN_PREFIX_BYTES + frame_len;
    if buf.len() < end {
        return Ok(Decoded::Insufficient);
    }
    Ok(Decoded::Complete {
        value: LEN_PREFIX_BYTES..end,
        consumed: end,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn encodes_big_endian_length_then_bytes() {
        let mut out = vec![9];
        encode(b"hello", &mut out);
        assert_eq!(out, [9, 0, 0, 0, 5, b'h', b'e', b'l', b'l', b'o']);
        let mut out = Vec::new();
        encode(&[7; 0x0001_0203], &mut out);
        assert_eq!(&out[..4], &[0, 1, 2, 3]);
        assert_eq!(out.len(), 4 + 0x0001_0203);
    }

    #[test]
    fn decodes_a_frame_and_leaves_the_rest() {
        let mut buf = Vec::new();
        encode(b"one", &mut buf);
        encode(b"", &mut buf);
        encode(b"three", &mut buf);
        let mut at = 0;
        let mut frames = Vec::new();
        while let Decoded::Complete { value, consumed } = decode(&buf[at..], 16).unwrap() {
            frames.push(buf[at..][value].to_vec());
            at += consumed;
        }
        assert_eq!(frames, [b"one".to_vec(), Vec::new(), b"three".to_vec()]);
        assert_eq!(at, buf.len());
    }

    #[test]
    fn incomplete_is_insufficient() {
        let mut buf = Vec::new();
        encode(b"abcdef", &mut buf);
        for len in 0..buf.len() {
            assert_eq!(
                decode(&buf[..len], 16),
                Ok(Decoded::Insufficient),
                "{len} bytes"
            );
        }
        assert_eq!(
            decode(&buf, 16),
            Ok(Decoded::Complete {
                value: 4..10,
                consumed: 10
            })
        );
    }

    #[test]
    fn oversize_is_refused_from_the_prefix_alone() {
        assert_eq!(
            decode(&[0, 0, 0, 17], 16),
            Err(TooLarge {
                len: 17,
                max_frame_bytes: 16
            })
        );
        assert_eq!(
            decode(&[0xff, 0xff, 0xff, 0xff], 1 << 20).unwrap_err().len,
            u32::MAX
        );
        assert_eq!(decode(&[0, 0, 0, 16], 16), Ok(Decoded::Insufficient));
        let e = decode(&[0, 0, 0, 17], 16).unwrap_err();
        assert_eq!(e.close_code(), 1009);
        assert_eq!(e.to_string(), "frame of 17 bytes is over the limit of 16");
    }

    proptest! {
        #[test]
        fn round_trip_at_any_split(frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8),
                                   cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8)) {
            let mut wire = Vec::new();
            for frame in &frames {
                encode(frame, &mut wire);
            }
            // Feed the bytes in chunks, as a stream delivers them, buffering the rest.
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
            cuts.push(wire.len());
            cuts.sort_unstable();
            let mut buffered = Vec::new();
            let mut decoded = Vec::new();
            let mut from = 0;
            for cut in cuts {
                buffered.extend_from_slice(&wire[from..cut]);
                from = cut;
                while let Decoded::Complete { value, consumed } = decode(&buffered, 64).unwrap() {
                    decoded.push(buffered[value].to_vec());
                    buffered.drain(..consumed);
                }
            }
            prop_assert!(buffered.is_empty());
            prop_assert_eq!(decoded, frames);
        }
    }
}
