use super::*;
use crate::{Decoded, Encoding, DEFAULT_MAX_HANDSHAKE_BYTES};

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn request(lines: &[&str]) -> Vec<u8> {
    let mut s = String::new();
    for line in lines {
        s.push_str(line);
        s.push_str("\r\n");
    }
    s.push_str("\r\n");
    s.into_bytes()
}

fn good_lines() -> Vec<&'static str> {
    vec![
        "GET /ws HTTP/1.1",
        "Host: gw.example:8080",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ]
}

fn parse(buf: &[u8]) -> Result<Decoded<Upgrade>, HandshakeError> {
    parse_upgrade(buf, DEFAULT_MAX_HANDSHAKE_BYTES)
}

fn parse_lines(lines: &[&str]) -> Result<Upgrade, HandshakeError> {
    match parse(&request(lines))? {
        Decoded::Complete { value, .. } => Ok(value),
        Decoded::Insufficient => panic!("a whole request is not insufficient"),
    }
}

/// The good request with the line starting with `line_prefix` replaced or removed.
fn replace(line_prefix: &str, with: Option<&'static str>) -> Vec<&'static str> {
    good_lines()
        .into_iter()
        .filter_map(|line| {
            if line.starts_with(line_prefix) {
                with
            } else {
                Some(line)
            }
        })
        .collect()
}

#[test]
fn parses_a_valid_upgrade_and_reports_its_length() {
    let mut buf = request(&[
        "GET /ws?client=web&v=2 HTTP/1.1",
        "Host: gw.example",
        "User-Agent: test",
        "Upgrade: websocket",
        "Connection: keep-alive, Upgrade",
        "Sec-WebSocket-Key:  dGhlIHNhbXBsZSBub25jZQ==  ",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Protocol: chat, flare.v1.rkyv",
        "Sec-WebSocket-Protocol: flare.v1.json,,",
        "Origin: https://app.example",
    ]);
    let request_len = buf.len();
    buf.extend_from_slice(b"\x81\x80early frame bytes");
    let Decoded::Complete { value, consumed } = parse(&buf).unwrap() else {
        panic!("complete")
    };
    assert_eq!(consumed, request_len);
    assert_eq!(
        value,
        Upgrade {
            key: KEY.into(),
            protocols: vec![
                "chat".into(),
                "flare.v1.rkyv".into(),
                "flare.v1.json".into()
            ],
            path: "/ws?client=web&v=2".into(),
        }
    );
}

#[test]
fn header_names_and_tokens_are_case_insensitive() {
    let up = parse_lines(&[
        "GET /ws HTTP/1.1",
        "host: h",
        "UPGRADE: WebSocket",
        "connection: UPGRADE",
        "SEC-WEBSOCKET-KEY: dGhlIHNhbXBsZSBub25jZQ==",
        "sec-websocket-version: 13",
    ])
    .unwrap();
    assert_eq!(up.protocols, Vec::<String>::new());
    assert_eq!(up.path, "/ws");
}

#[test]
fn every_prefix_is_insufficient() {
    let buf = request(&good_lines());
    for len in 0..buf.len() {
        assert_eq!(parse(&buf[..len]), Ok(Decoded::Insufficient), "{len} bytes");
    }
    assert!(matches!(parse(&buf), Ok(Decoded::Complete { consumed, .. }) if consumed == buf.len()));
}

#[test]
fn too_large_without_a_complete_request() {
    let buf = request(&good_lines());
    // The limit cuts the request: a prefix at the limit is refused.
    assert_eq!(
        parse_upgrade(&buf, buf.len() - 1),
        Err(HandshakeError::TooLarge)
    );
    assert_eq!(
        parse_upgrade(&buf[..buf.len() - 1], buf.len() - 1),
        Err(HandshakeError::TooLarge)
    );
    assert_eq!(
        parse_upgrade(&buf[..buf.len() - 2], buf.len() - 1),
        Ok(Decoded::Insufficient)
    );
    assert!(matches!(
        parse_upgrade(&buf, buf.len()),
        Ok(Decoded::Complete { .. })
    ));
    // A flood of header bytes.
    let mut flood = b"GET /ws HTTP/1.1\r\nX-Pad: ".to_vec();
    flood.resize(DEFAULT_MAX_HANDSHAKE_BYTES + 100, b'a');
    assert_eq!(parse(&flood), Err(HandshakeError::TooLarge));
    assert_eq!(HandshakeError::TooLarge.status(), 431);
}

#[test]
fn too_many_header_lines_is_too_large() {
    let mut lines = good_lines();
    lines.extend(std::iter::repeat_n("X-A: b", 70));
    assert_eq!(parse_lines(&lines), Err(HandshakeError::TooLarge));
}

#[test]
fn refuses_what_is_not_a_websocket_upgrade() {
    let cases: Vec<(Vec<&str>, HandshakeError, u16)> = vec![
        (
            replace("GET", Some("POST /ws HTTP/1.1")),
            HandshakeError::MethodNotAllowed,
            405,
        ),
        (
            replace("GET", Some("GET /ws HTTP/1.0")),
            HandshakeError::HttpVersion,
            400,
        ),
        (
            replace("GET", Some("GET / HTTP/1.1")),
            HandshakeError::NotFound,
            404,
        ),
        (
            replace("GET", Some("GET /ws/ HTTP/1.1")),
            HandshakeError::NotFound,
            404,
        ),
        (
            replace("GET", Some("GET /wss HTTP/1.1")),
            HandshakeError::NotFound,
            404,
        ),
        (replace("Upgrade", None), HandshakeError::NotUpgrade, 400),
        (
            replace("Upgrade", Some("Upgrade: h2c")),
            HandshakeError::NotUpgrade,
            400,
        ),
        (replace("Connection", None), HandshakeError::NotUpgrade, 400),
        (
            replace("Connection", Some("Connection: keep-alive")),
            HandshakeError::NotUpgrade,
            400,
        ),
        (
            replace("Connection", Some("Connection: upgraded")),
            HandshakeError::NotUpgrade,
            400,
        ),
        (
            replace("Sec-WebSocket-Version", None),
            HandshakeError::UnsupportedVersion,
            426,
        ),
        (
            replace("Sec-WebSocket-Version", Some("Sec-WebSocket-Version: 8")),
            HandshakeError::UnsupportedVersion,
            426,
        ),
        (
            replace("Sec-WebSocket-Key", None),
            HandshakeError::BadKey,
            400,
        ),
        (
            replace(
                "Sec-WebSocket-Key",
                Some("Sec-WebSocket-Key: not base64!!!!!!!!!!!!!"),
            ),
            HandshakeError::BadKey,
            400,
        ),
        // base64 of 15 bytes, and of 17 bytes
        (
            replace(
                "Sec-WebSocket-Key",
                Some("Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAA"),
            ),
            HandshakeError::BadKey,
            400,
        ),
        (
            replace(
                "Sec-WebSocket-Key",
                Some("Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAAA="),
            ),
            HandshakeError::BadKey,
            400,
        ),
    ];
    for (lines, error, status) in cases {
        assert_eq!(parse_lines(&lines), Err(error), "{lines:?}");
        assert_eq!(error.status(), status);
    }
    let mut twice = good_lines();
    twice.push("Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==");
    assert_eq!(parse_lines(&twice), Err(HandshakeError::BadKey));
    let mut two_versions = good_lines();
    two_versions.push("Sec-WebSocket-Version: 8");
    assert_eq!(
        parse_lines(&two_versions),
        Err(HandshakeError::UnsupportedVersion)
    );
}

#[test]
fn garbage_is_malformed() {
    assert_eq!(
        parse(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
        Err(HandshakeError::Malformed)
    );
    assert_eq!(
        parse(b"GET /ws HTTP/1.1\r\nBad Header\r\n\r\n"),
        Err(HandshakeError::Malformed)
    );
    assert_eq!(
        parse(b"GET /ws HTTP/2.0\r\n\r\n"),
        Err(HandshakeError::Malformed)
    );
    let mut lines = good_lines();
    lines.push("Sec-WebSocket-Protocol: \u{e9}");
    // UTF-8 outside ASCII is a (useless) token; only non-UTF-8 bytes are malformed.
    let odd = parse_lines(&lines).unwrap();
    assert_eq!(odd.protocols, ["\u{e9}"]);
    assert_eq!(odd.accept(), Err(HandshakeError::NoSupportedSubprotocol));
    let mut raw = request(&good_lines());
    let at = raw.len() - 2;
    raw.splice(at..at, b"Sec-WebSocket-Protocol: \xff\r\n".iter().copied());
    assert_eq!(parse(&raw), Err(HandshakeError::Malformed));
}

#[test]
fn negotiation_follows_protocol_md() {
    let offer = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(choose_encoding(&[]), Ok(None));
    assert_eq!(
        choose_encoding(&offer(&["flare.v1.json"])),
        Ok(Some(Encoding::Json))
    );
    assert_eq!(
        choose_encoding(&offer(&["flare.v1.rkyv", "flare.v1.json"])),
        Ok(Some(Encoding::Rkyv))
    );
    assert_eq!(
        choose_encoding(&offer(&["chat", "flare.v1.json", "flare.v1.rkyv"])),
        Ok(Some(Encoding::Json))
    );
    assert_eq!(
        choose_encoding(&offer(&["chat"])),
        Err(HandshakeError::NoSupportedSubprotocol)
    );
    assert_eq!(
        choose_encoding(&offer(&["FLARE.V1.JSON"])),
        Err(HandshakeError::NoSupportedSubprotocol)
    );
    assert_eq!(HandshakeError::NoSupportedSubprotocol.status(), 400);
}

#[test]
fn accept_key_matches_rfc_6455_example() {
    assert_eq!(accept_key(KEY), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
}

#[test]
fn accept_responses() {
    assert_eq!(
        accept_response(KEY, None),
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
    );
    assert_eq!(
        accept_response(KEY, Some("flare.v1.rkyv")),
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: flare.v1.rkyv\r\n\r\n"
    );
}

#[test]
fn upgrade_accept_negotiates_and_answers() {
    let up = |protocols: &[&str]| Upgrade {
        key: KEY.into(),
        protocols: protocols.iter().map(|s| s.to_string()).collect(),
        path: "/ws".into(),
    };
    let plain = up(&[]).accept().unwrap();
    assert_eq!(plain.encoding, Encoding::Json);
    assert_eq!(plain.response, accept_response(KEY, None));
    let rkyv = up(&["x", "flare.v1.rkyv"]).accept().unwrap();
    assert_eq!(rkyv.encoding, Encoding::Rkyv);
    assert_eq!(rkyv.response, accept_response(KEY, Some("flare.v1.rkyv")));
    assert_eq!(
        up(&["x"]).accept(),
        Err(HandshakeError::NoSupportedSubprotocol)
    );
}

#[test]
fn error_responses() {
    assert_eq!(
        error_response(404, "Not Found", "nope"),
        b"HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 4\r\n\r\nnope"
    );
    let upgrade_required = String::from_utf8(error_response(426, "Upgrade Required", "")).unwrap();
    assert!(
        upgrade_required.contains("\r\nSec-WebSocket-Version: 13\r\n"),
        "{upgrade_required}"
    );
    assert!(upgrade_required.ends_with("Content-Length: 0\r\nSec-WebSocket-Version: 13\r\n\r\n"));
}

#[test]
fn every_handshake_error_answers_with_its_status() {
    let all = [
        HandshakeError::TooLarge,
        HandshakeError::Malformed,
        HandshakeError::MethodNotAllowed,
        HandshakeError::HttpVersion,
        HandshakeError::NotFound,
        HandshakeError::NotUpgrade,
        HandshakeError::UnsupportedVersion,
        HandshakeError::BadKey,
        HandshakeError::NoSupportedSubprotocol,
    ];
    for error in all {
        let bytes = error.response();
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut response = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(head_len) = response.parse(&bytes).unwrap() else {
            panic!("complete")
        };
        assert_eq!(response.code, Some(error.status()));
        assert_eq!(response.reason, Some(error.reason()));
        let length = response
            .headers
            .iter()
            .find(|h| h.name == "Content-Length")
            .unwrap()
            .value;
        assert_eq!(
            std::str::from_utf8(length)
                .unwrap()
                .parse::<usize>()
                .unwrap(),
            bytes.len() - head_len
        );
        assert_eq!(&bytes[head_len..], error.message().as_bytes());
        assert!(response
            .headers
            .iter()
            .any(|h| h.name == "Connection" && h.value == b"close"));
        assert!(error.to_string().contains(&error.status().to_string()));
    }
}

#[test]
fn client_request_is_a_valid_upgrade() {
    let bytes = client_request(
        "localhost:8080",
        "/ws",
        KEY,
        &["flare.v1.rkyv", "flare.v1.json"],
    );
    let Decoded::Complete { value, consumed } = parse(&bytes).unwrap() else {
        panic!("complete")
    };
    assert_eq!(consumed, bytes.len());
    assert_eq!(value.protocols, ["flare.v1.rkyv", "flare.v1.json"]);
    assert_eq!(value.accept().unwrap().encoding, Encoding::Rkyv);
    let bytes = client_request("h", "/ws", KEY, &[]);
    assert!(!String::from_utf8(bytes.clone())
        .unwrap()
        .contains("Protocol"));
    assert_eq!(
        parse(&bytes).unwrap().complete().unwrap().0.protocols,
        Vec::<String>::new()
    );
}
