//! The JSON decoder of client frames whose `type` comes first, as every client we know
//! writes them (serde's own encoder included).
//!
//! serde's derive for an internally tagged enum cannot know the variant before it has
//! seen `type`, so it first copies the whole object into a generic tree and then reads
//! the variant's fields from that: 434 ns for a `send` (`cargo bench -p flare-bench
//! --bench codec -- decode_send`). Once `type` has been read first, the fields can be
//! read straight into the variant. Frames whose first key is not a plain `"type"` go
//! the derive's way: the two ways accept the same frames and build the same values
//! (the tests compare them).
//!
//! What the derive does and this does too: unknown fields are skipped whatever they
//! hold, fields of other variants are unknown fields, a repeated field or a second
//! `type` is an error, a missing field is named in the error, and `null` for an
//! optional field is its absence.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer as _, IgnoredAny, MapAccess, Visitor};

use super::ClientFrame;

/// The `type`s of client frames, for the "unknown variant" error.
const TYPES: &[&str] = &["auth", "send", "ack", "sync", "ping"];

/// Whether `bytes` is an object whose first key is written exactly `"type"`.
pub(super) fn type_first(bytes: &[u8]) -> bool {
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while bytes
            .get(*i)
            .is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        {
            *i += 1;
        }
    };
    skip_ws(&mut i);
    if bytes.get(i) != Some(&b'{') {
        return false;
    }
    i += 1;
    skip_ws(&mut i);
    bytes.get(i..i + 6) == Some(b"\"type\"")
}

/// Decodes a frame for which [`type_first`] holds.
pub(super) fn decode_client(bytes: &[u8]) -> Result<ClientFrame, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let frame = (&mut de).deserialize_map(FrameVisitor)?;
    de.end()?;
    Ok(frame)
}

/// A string borrowed from the input when it has no escapes, copied when it has.
struct Str<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Str<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Str<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

struct FrameVisitor;

impl<'de> Visitor<'de> for FrameVisitor {
    type Value = ClientFrame;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a client frame")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ClientFrame, A::Error> {
        match map.next_key::<Str<'de>>()? {
            Some(key) if key.0 == "type" => {}
            // `type_first` checked the bytes; this is for a caller that did not.
            _ => {
                return Err(de::Error::custom(
                    "the frame's `type` is not its first field",
                ))
            }
        }
        let kind = map.next_value::<Str<'de>>()?;
        match &*kind.0 {
            "auth" => {
                let (mut token, mut device, mut last_seq) = (None, None, None);
                fields(&mut map, |key, map| match key {
                    "token" => put(&mut token, "token", map),
                    "device" => put(&mut device, "device", map),
                    "last_seq" => put(&mut last_seq, "last_seq", map),
                    _ => Ok(false),
                })?;
                Ok(ClientFrame::Auth {
                    token: need(token, "token")?,
                    device: device.flatten(),
                    last_seq: last_seq.flatten(),
                })
            }
            "send" => {
                let (mut id, mut to, mut body) = (None, None, None);
                fields(&mut map, |key, map| match key {
                    "id" => put(&mut id, "id", map),
                    "to" => put(&mut to, "to", map),
                    "body" => put(&mut body, "body", map),
                    _ => Ok(false),
                })?;
                Ok(ClientFrame::Send {
                    id: need(id, "id")?,
                    to: need(to, "to")?,
                    body: need(body, "body")?,
                })
            }
            "ack" => {
                let mut seq = None;
                fields(&mut map, |key, map| match key {
                    "seq" => put(&mut seq, "seq", map),
                    _ => Ok(false),
                })?;
                Ok(ClientFrame::Ack {
                    seq: need(seq, "seq")?,
                })
            }
            "sync" => {
                let (mut after, mut limit) = (None, None);
                fields(&mut map, |key, map| match key {
                    "after" => put(&mut after, "after", map),
                    "limit" => put(&mut limit, "limit", map),
                    _ => Ok(false),
                })?;
                Ok(ClientFrame::Sync {
                    after: need(after, "after")?,
                    limit: need(limit, "limit")?,
                })
            }
            "ping" => {
                fields(&mut map, |_, _| Ok(false))?;
                Ok(ClientFrame::Ping)
            }
            other => Err(de::Error::unknown_variant(other, TYPES)),
        }
    }
}

/// Reads the rest of the object: `field` reads the value of a key it knows and says
/// so; the values of the others are skipped. A second `type` is an error.
fn fields<'de, A: MapAccess<'de>>(
    map: &mut A,
    mut field: impl FnMut(&str, &mut A) -> Result<bool, A::Error>,
) -> Result<(), A::Error> {
    while let Some(key) = map.next_key::<Str<'de>>()? {
        if key.0 == "type" {
            return Err(de::Error::duplicate_field("type"));
        }
        if !field(&key.0, map)? {
            map.next_value::<IgnoredAny>()?;
        }
    }
    Ok(())
}

/// Reads a field's value into its empty slot; a second value is an error.
fn put<'de, T: Deserialize<'de>, A: MapAccess<'de>>(
    slot: &mut Option<T>,
    name: &'static str,
    map: &mut A,
) -> Result<bool, A::Error> {
    if slot.is_some() {
        return Err(de::Error::duplicate_field(name));
    }
    *slot = Some(map.next_value()?);
    Ok(true)
}

fn need<T, E: de::Error>(value: Option<T>, name: &'static str) -> Result<T, E> {
    value.ok_or_else(|| E::missing_field(name))
}
