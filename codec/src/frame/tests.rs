use proptest::prelude::*;

use super::*;

fn json(frame: &ServerFrame) -> String {
    String::from_utf8(frame.encode(Encoding::Json)).expect("JSON is UTF-8")
}

fn client_json(frame: &ClientFrame) -> String {
    String::from_utf8(frame.encode(Encoding::Json)).expect("JSON is UTF-8")
}

fn decode_client_json(s: &str) -> Result<ClientFrame, DecodeError> {
    ClientFrame::decode(Encoding::Json, s.as_bytes())
}

// --- PROTOCOL.md §5, the example session, byte for byte ---

#[test]
fn protocol_example_auth_decodes() {
    let frame = decode_client_json(r#"{"type":"auth","token":"eyJ...","device":"phone"}"#).unwrap();
    assert_eq!(
        frame,
        ClientFrame::Auth {
            token: "eyJ...".into(),
            device: Some("phone".into()),
            last_seq: None
        }
    );
}

#[test]
fn protocol_example_auth_ok_encodes_exactly() {
    let frame = ServerFrame::AuthOk {
        user: "alice".into(),
        device: "phone".into(),
        session: "s-9f2c".into(),
        node: "gw-1".into(),
        head_seq: 41,
        heartbeat_ms: 30000,
    };
    let expected = r#"{"type":"auth_ok","user":"alice","device":"phone","session":"s-9f2c","node":"gw-1","head_seq":41,"heartbeat_ms":30000}"#;
    assert_eq!(json(&frame), expected);
    assert_eq!(
        ServerFrame::decode(Encoding::Json, expected.as_bytes()).unwrap(),
        frame
    );
}

#[test]
fn protocol_example_send_decodes() {
    let frame =
        decode_client_json(r#"{"type":"send","id":"c-1","to":{"user":"bob"},"body":"hi bob"}"#)
            .unwrap();
    assert_eq!(
        frame,
        ClientFrame::Send {
            id: "c-1".into(),
            to: Target::User("bob".into()),
            body: "hi bob".into()
        }
    );
    assert_eq!(
        client_json(&frame),
        r#"{"type":"send","id":"c-1","to":{"user":"bob"},"body":"hi bob"}"#
    );
}

#[test]
fn protocol_example_send_ok_encodes_exactly() {
    let frame = ServerFrame::SendOk {
        id: "c-1".into(),
        msg_id: 7281956375040,
        ts: 1795322556625,
        dup: false,
    };
    let expected =
        r#"{"type":"send_ok","id":"c-1","msg_id":"7281956375040","ts":1795322556625,"dup":false}"#;
    assert_eq!(json(&frame), expected);
    assert_eq!(
        ServerFrame::decode(Encoding::Json, expected.as_bytes()).unwrap(),
        frame
    );
}

#[test]
fn protocol_example_msg_encodes_exactly() {
    let frame = ServerFrame::Msg {
        seq: 42,
        msg_id: 7281956375040,
        from: "alice".into(),
        from_device: "phone".into(),
        to: Target::User("bob".into()),
        body: "hi bob".into(),
        ts: 1795322556625,
    };
    let expected = r#"{"type":"msg","seq":42,"msg_id":"7281956375040","from":"alice","from_device":"phone","to":{"user":"bob"},"body":"hi bob","ts":1795322556625}"#;
    assert_eq!(json(&frame), expected);
    assert_eq!(
        ServerFrame::decode(Encoding::Json, expected.as_bytes()).unwrap(),
        frame
    );
}

// --- every client frame type in JSON ---

#[test]
fn client_frames_json_shapes() {
    let cases = [
        (
            r#"{"type":"auth","token":"t","last_seq":7}"#,
            ClientFrame::Auth {
                token: "t".into(),
                device: None,
                last_seq: Some(7),
            },
        ),
        (
            r#"{"type":"send","id":"c","to":{"group":"g"},"body":""}"#,
            ClientFrame::Send {
                id: "c".into(),
                to: Target::Group("g".into()),
                body: String::new(),
            },
        ),
        (
            r#"{"type":"ack","seq":18446744073709551615}"#,
            ClientFrame::Ack { seq: u64::MAX },
        ),
        (
            r#"{"type":"sync","after":0,"limit":1000}"#,
            ClientFrame::Sync {
                after: 0,
                limit: 1000,
            },
        ),
        (r#"{"type":"ping"}"#, ClientFrame::Ping),
    ];
    for (text, frame) in cases {
        assert_eq!(decode_client_json(text).unwrap(), frame, "{text}");
        assert_eq!(client_json(&frame), text);
        assert_eq!(frame.type_name(), text.split('"').nth(3).unwrap());
    }
}

#[test]
fn auth_optional_fields_absent_when_none() {
    let frame = ClientFrame::Auth {
        token: "t".into(),
        device: None,
        last_seq: None,
    };
    assert_eq!(client_json(&frame), r#"{"type":"auth","token":"t"}"#);
    let frame = ClientFrame::Auth {
        token: "t".into(),
        device: Some("d".into()),
        last_seq: Some(0),
    };
    assert_eq!(
        client_json(&frame),
        r#"{"type":"auth","token":"t","device":"d","last_seq":0}"#
    );
}

#[test]
fn error_id_absent_when_none() {
    let frame = ServerFrame::Error {
        code: ErrorCode::BadFrame,
        message: "m".into(),
        id: None,
    };
    assert_eq!(
        json(&frame),
        r#"{"type":"error","code":"bad_frame","message":"m"}"#
    );
    let frame = ServerFrame::Error {
        code: ErrorCode::TooLarge,
        message: "m".into(),
        id: Some("c-1".into()),
    };
    assert_eq!(
        json(&frame),
        r#"{"type":"error","code":"too_large","message":"m","id":"c-1"}"#
    );
}

#[test]
fn other_server_frames_json_shapes() {
    let cases = [
        (ServerFrame::Pong, r#"{"type":"pong"}"#),
        (
            ServerFrame::SyncDone {
                after: 1,
                last: 9,
                more: true,
                truncated: false,
            },
            r#"{"type":"sync_done","after":1,"last":9,"more":true,"truncated":false}"#,
        ),
        (
            ServerFrame::Goaway {
                reason: GoawayReason::TokenExpired,
                reconnect_after_ms: 0,
            },
            r#"{"type":"goaway","reason":"token_expired","reconnect_after_ms":0}"#,
        ),
    ];
    for (frame, text) in cases {
        assert_eq!(json(&frame), text);
        assert_eq!(
            ServerFrame::decode(Encoding::Json, text.as_bytes()).unwrap(),
            frame
        );
        assert_eq!(frame.type_name(), text.split('"').nth(3).unwrap());
    }
}

#[test]
fn error_code_strings_match_serde() {
    let all = [
        ErrorCode::BadFrame,
        ErrorCode::Unauthenticated,
        ErrorCode::AuthFailed,
        ErrorCode::TokenExpired,
        ErrorCode::TooLarge,
        ErrorCode::Forbidden,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
    ];
    let names: Vec<&str> = all.iter().map(|c| c.as_str()).collect();
    assert_eq!(
        names,
        [
            "bad_frame",
            "unauthenticated",
            "auth_failed",
            "token_expired",
            "too_large",
            "forbidden",
            "rate_limited",
            "unavailable",
            "internal"
        ]
    );
    for code in all {
        assert_eq!(
            serde_json::to_string(&code).unwrap(),
            format!("\"{}\"", code.as_str())
        );
        assert_eq!(code.to_string(), code.as_str());
    }
}

#[test]
fn goaway_reason_strings_match_serde() {
    let all = [
        GoawayReason::Draining,
        GoawayReason::Replaced,
        GoawayReason::Kicked,
        GoawayReason::TokenExpired,
    ];
    let names: Vec<&str> = all.iter().map(|r| r.as_str()).collect();
    assert_eq!(names, ["draining", "replaced", "kicked", "token_expired"]);
    for reason in all {
        assert_eq!(
            serde_json::to_string(&reason).unwrap(),
            format!("\"{}\"", reason.as_str())
        );
    }
}

#[test]
fn encoding_names() {
    assert_eq!(Encoding::Json.subprotocol(), "flare.v1.json");
    assert_eq!(Encoding::Rkyv.subprotocol(), "flare.v1.rkyv");
    for enc in Encoding::ALL {
        assert_eq!(Encoding::from_subprotocol(enc.subprotocol()), Some(enc));
        assert_eq!(Encoding::from_alpn(enc.alpn()), Some(enc));
    }
    assert_eq!(Encoding::from_subprotocol("flare.v1.JSON"), None);
    assert_eq!(Encoding::from_subprotocol("flare.v2.json"), None);
    assert_eq!(Encoding::from_subprotocol(""), None);
    assert!(Encoding::Json.is_text());
    assert!(!Encoding::Rkyv.is_text());
}

// --- JSON input rules ---

#[test]
fn unknown_fields_are_ignored() {
    assert_eq!(
        decode_client_json(r#"{"type":"ping","extra":[1,{"a":null}]}"#).unwrap(),
        ClientFrame::Ping
    );
    assert_eq!(
        decode_client_json(r#"{"seq":5,"x":"y","type":"ack"}"#).unwrap(),
        ClientFrame::Ack { seq: 5 }
    );
    assert_eq!(
        decode_client_json(r#"{"type":"auth","token":"t","future":true}"#).unwrap(),
        ClientFrame::Auth {
            token: "t".into(),
            device: None,
            last_seq: None
        }
    );
}

#[test]
fn explicit_null_optional_fields_are_none() {
    assert_eq!(
        decode_client_json(r#"{"type":"auth","token":"t","device":null,"last_seq":null}"#).unwrap(),
        ClientFrame::Auth {
            token: "t".into(),
            device: None,
            last_seq: None
        }
    );
}

/// JSON that no client frame is, whichever way it is decoded.
const BAD_JSON: &[&str] = &[
    "",
    "null",
    "[]",
    "42",
    "{",
    r#"{"type":"ping"} trailing"#,
    r#"{}"#,
    r#"{"type":"pang"}"#,
    r#"{"type":"PING"}"#,
    r#"{"type":7}"#,
    r#"{"type":"send","id":"c","to":{"user":"b"}}"#,
    r#"{"type":"send","id":"c","to":{"users":"b"},"body":"x"}"#,
    r#"{"type":"send","id":"c","to":{"user":"b","group":"g"},"body":"x"}"#,
    r#"{"type":"send","id":"c","to":"bob","body":"x"}"#,
    r#"{"type":"send","id":5,"to":{"user":"b"},"body":"x"}"#,
    r#"{"type":"ack"}"#,
    r#"{"type":"ack","seq":-1}"#,
    r#"{"type":"ack","seq":"5"}"#,
    r#"{"type":"ack","seq":1.5}"#,
    r#"{"type":"ack","seq":18446744073709551616}"#,
    r#"{"type":"sync","after":0,"limit":4294967296}"#,
    r#"{"type":"auth"}"#,
    r#"{"type":"auth","token":"t","last_seq":"1"}"#,
    r#"{"type":"ack","seq":1,"seq":2}"#,
    r#"{"type":null}"#,
    r#"{"type":"ping","type":"ping"}"#,
    r#"{"type":"ack","seq":1,"type":"ping"}"#,
    r#"{"type":"auth","token":"t","device":null,"device":"d"}"#,
    r#"{"type":"ping""#,
    r#"{"type":"ping",}"#,
    r#"{"type":"sync","after":0}"#,
    r#"{"type":"auth","token":null}"#,
];

#[test]
fn bad_json_is_an_error() {
    for text in BAD_JSON {
        assert!(
            decode_client_json(text).is_err(),
            "{text:?} must not decode"
        );
    }
    assert!(
        ClientFrame::decode(Encoding::Json, b"{\"type\":\"auth\",\"token\":\"\xff\"}").is_err()
    );
}

#[test]
fn errors_say_what_is_wrong() {
    let e = decode_client_json(r#"{"type":"send","id":"c","to":{"user":"b"}}"#).unwrap_err();
    assert!(e.message().contains("missing field `body`"), "{e}");
    let e = decode_client_json(r#"{"type":"pang"}"#).unwrap_err();
    assert!(e.message().contains("unknown variant `pang`"), "{e}");
}

#[test]
fn error_messages_are_bounded() {
    let long = format!(r#"{{"type":"{}é"}}"#, "x".repeat(10_000));
    let e = decode_client_json(&long).unwrap_err();
    assert!(e.message().len() <= DecodeError::MAX_MESSAGE_BYTES);
    assert!(
        e.message()
            .starts_with("invalid JSON frame: unknown variant"),
        "{e}"
    );
    // Cutting at a char boundary: 199 ASCII bytes, then a 2-byte char across the limit.
    let e = DecodeError::new(&"k".repeat(197), "é");
    assert_eq!(e.message().len(), 199);
    assert_eq!(e.to_string(), e.message());
}

#[test]
fn msg_id_must_be_a_decimal_string() {
    let with =
        |id: &str| format!(r#"{{"type":"send_ok","id":"c","msg_id":{id},"ts":1,"dup":true}}"#);
    let ok =
        ServerFrame::decode(Encoding::Json, with(r#""18446744073709551615""#).as_bytes()).unwrap();
    assert_eq!(
        ok,
        ServerFrame::SendOk {
            id: "c".into(),
            msg_id: u64::MAX,
            ts: 1,
            dup: true
        }
    );
    for bad in [
        r#""18446744073709551616""#,
        r#""""#,
        r#""+5""#,
        r#""-5""#,
        r#"" 5""#,
        r#""5 ""#,
        r#""0x5""#,
        "5",
    ] {
        assert!(
            ServerFrame::decode(Encoding::Json, with(bad).as_bytes()).is_err(),
            "{bad}"
        );
    }
}

// --- rkyv ---

fn sample_client_frames() -> Vec<ClientFrame> {
    vec![
        ClientFrame::Auth {
            token: "eyJhbGciOiJIUzI1NiJ9.x.y".into(),
            device: Some("phone".into()),
            last_seq: Some(41),
        },
        ClientFrame::Auth {
            token: String::new(),
            device: None,
            last_seq: None,
        },
        ClientFrame::Send {
            id: "c-1".into(),
            to: Target::User("bob".into()),
            body: "hi bob, a longer body".into(),
        },
        ClientFrame::Send {
            id: "c-2".into(),
            to: Target::Group("g".into()),
            body: "é".repeat(100),
        },
        ClientFrame::Ack { seq: u64::MAX },
        ClientFrame::Sync {
            after: 3,
            limit: 1000,
        },
        ClientFrame::Ping,
    ]
}

fn sample_server_frames() -> Vec<ServerFrame> {
    vec![
        ServerFrame::AuthOk {
            user: "alice".into(),
            device: "phone".into(),
            session: "s-9f2c".into(),
            node: "gw-1".into(),
            head_seq: 41,
            heartbeat_ms: 30000,
        },
        ServerFrame::SendOk {
            id: "c-1".into(),
            msg_id: 7281956375040,
            ts: 1795322556625,
            dup: true,
        },
        ServerFrame::Msg {
            seq: 42,
            msg_id: 7281956375040,
            from: "alice".into(),
            from_device: "phone".into(),
            to: Target::Group("friends".into()),
            body: "hi all".into(),
            ts: 1795322556625,
        },
        ServerFrame::SyncDone {
            after: 0,
            last: 42,
            more: false,
            truncated: true,
        },
        ServerFrame::Error {
            code: ErrorCode::Unavailable,
            message: "log down".into(),
            id: Some("c-9".into()),
        },
        ServerFrame::Error {
            code: ErrorCode::Internal,
            message: String::new(),
            id: None,
        },
        ServerFrame::Pong,
        ServerFrame::Goaway {
            reason: GoawayReason::Draining,
            reconnect_after_ms: 5000,
        },
    ]
}

#[test]
fn rkyv_round_trips_every_variant() {
    for frame in sample_client_frames() {
        let bytes = frame.encode(Encoding::Rkyv);
        assert_eq!(ClientFrame::decode(Encoding::Rkyv, &bytes).unwrap(), frame);
    }
    for frame in sample_server_frames() {
        let bytes = frame.encode(Encoding::Rkyv);
        assert_eq!(ServerFrame::decode(Encoding::Rkyv, &bytes).unwrap(), frame);
    }
}

#[test]
fn rkyv_archive_appended_after_other_bytes_reads_in_place() {
    let frame = sample_server_frames().remove(2);
    let mut out = b"prefix".to_vec();
    frame.encode_into(Encoding::Rkyv, &mut out);
    assert_eq!(&out[..6], b"prefix");
    assert_eq!(
        ServerFrame::decode(Encoding::Rkyv, &out[6..]).unwrap(),
        frame
    );
    // The format is unaligned: a copy at an odd address reads the same.
    let mut shifted = vec![0u8; 1];
    shifted.extend_from_slice(&out[6..]);
    assert_eq!(
        ServerFrame::decode(Encoding::Rkyv, &shifted[1..]).unwrap(),
        frame
    );
}

#[test]
fn rkyv_truncated_archives_are_errors() {
    for frame in sample_client_frames() {
        let bytes = frame.encode(Encoding::Rkyv);
        for len in 0..bytes.len() {
            // Cutting the end moves the root; any outcome but a panic or a wrong
            // frame of the same bytes is fine, and most cuts must fail outright.
            if let Ok(decoded) = ClientFrame::decode(Encoding::Rkyv, &bytes[..len]) {
                assert_ne!(
                    decoded, frame,
                    "a truncated archive decoded to the original"
                );
            }
        }
        assert!(ClientFrame::decode(Encoding::Rkyv, &bytes[..bytes.len() - 1]).is_err());
    }
    assert!(ClientFrame::decode(Encoding::Rkyv, &[]).is_err());
}

#[test]
fn rkyv_garbage_is_an_error() {
    assert!(ClientFrame::decode(Encoding::Rkyv, &[0xff; 64]).is_err());
    assert!(ClientFrame::decode(Encoding::Rkyv, br#"{"type":"ping"}"#).is_err());
    let e = ClientFrame::decode(Encoding::Rkyv, &[0xff; 3]).unwrap_err();
    assert!(e.message().starts_with("invalid rkyv frame"), "{e}");
}

#[test]
fn rkyv_invalid_utf8_in_a_string_is_an_error() {
    for body in ["hi", "a body long enough to live out of line"] {
        let frame = ClientFrame::Send {
            id: "c".into(),
            to: Target::User("bob".into()),
            body: body.into(),
        };
        let mut bytes = frame.encode(Encoding::Rkyv);
        let at = bytes
            .windows(2)
            .position(|w| w == &body.as_bytes()[..2])
            .expect("body bytes in the archive");
        // A UTF-8 lead byte followed by ASCII. (Not 0xff: rkyv pads inline strings
        // with 0xff, so that would just end the string early, validly.)
        bytes[at] = 0xc3;
        assert!(
            ClientFrame::decode(Encoding::Rkyv, &bytes).is_err(),
            "{body}"
        );
    }
}

#[test]
fn rkyv_out_of_range_enum_tag_is_an_error() {
    let bytes = ClientFrame::Ping.encode(Encoding::Rkyv);
    // The root object sits at the end of the archive and starts with its u8 tag.
    let root = bytes.len() - std::mem::size_of::<ArchivedClientFrame>();
    assert!(ClientFrame::decode(Encoding::Rkyv, &bytes).is_ok());
    for tag in 0..=255u8 {
        let mut bad = bytes.clone();
        bad[root] = tag;
        let decoded = ClientFrame::decode(Encoding::Rkyv, &bad);
        // Tags 0..=4 name real variants (which may or may not validate on Ping's
        // bytes); every other tag must be refused.
        if tag > 4 {
            assert!(decoded.is_err(), "tag {tag}");
        }
    }
    let mut ack = bytes.clone();
    ack[root] = 2; // Ack { seq: 0 }: the zeroed payload is a valid u64.
    assert_eq!(
        ClientFrame::decode(Encoding::Rkyv, &ack).unwrap(),
        ClientFrame::Ack { seq: 0 }
    );
}

// --- the type-first JSON decoder (frame/json.rs) against serde's derive ---

/// Decodes `text` both ways; both must accept it as the same frame or both refuse it.
fn both_ways(text: &str) -> Result<ClientFrame, ()> {
    assert!(super::json::type_first(text.as_bytes()), "{text:?}");
    let fast = super::json::decode_client(text.as_bytes());
    let derive = serde_json::from_str::<ClientFrame>(text);
    match (fast, derive) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a, b, "{text:?}");
            Ok(a)
        }
        (Err(_), Err(_)) => Err(()),
        (a, b) => panic!("{text:?}: type-first {a:?}, derive {b:?}"),
    }
}

#[test]
fn only_a_plain_first_type_key_takes_the_direct_way() {
    for yes in [
        r#"{"type":"ping"}"#,
        " \n{ \t\"type\" : \"ping\" }",
        r#"{"type""#,
    ] {
        assert!(super::json::type_first(yes.as_bytes()), "{yes:?}");
    }
    for no in [
        r#"{"seq":1,"type":"ack"}"#,
        r#"{"\u0074ype":"ping"}"#,
        r#"["type"]"#,
        r#""type""#,
        r#"{"typ"#,
        "",
    ] {
        assert!(!super::json::type_first(no.as_bytes()), "{no:?}");
    }
    // Either way, the same frame.
    assert_eq!(
        decode_client_json(r#"{"seq":1,"type":"ack"}"#).unwrap(),
        decode_client_json(r#"{"type":"ack","seq":1}"#).unwrap()
    );
}

#[test]
fn the_type_first_decoder_accepts_and_refuses_what_the_derive_does() {
    let good = [
        r#"{"type":"ping"}"#,
        r#"{"type":"ping","x":1,"seq":"not a number","to":[1,{"a":null}]}"#,
        r#"{"type":"ack","seq":1,"id":5,"token":{"x":[]}}"#,
        r#"{"type":"ack","seq":18446744073709551615}"#,
        r#"{"type":"auth","token":"t"}"#,
        r#"{"type":"auth","token":"t","device":null,"last_seq":null}"#,
        r#"{"type":"auth","token":"t\u00e9\n","device":"d","last_seq":7}"#,
        r#"{"type":"send","id":"c-1","to":{"user":"bob"},"body":"hi"}"#,
        r#"{"type":"send","body":"\ud83d\ude00 \"q\"","to":{"group":"g"},"id":"c"}"#,
        r#"{"type":"send","id":"c","to":{"user":"b"},"body":"x","limit":-1}"#,
        r#"{"type":"s\u0065nd","id":"c","t\u006f":{"user":"b"},"body":"x"}"#,
        r#"{"type":"sync","after":0,"limit":4294967295}"#,
        "{ \"type\" : \"sync\" , \"limit\" : 1 , \"after\" : 2 }\n",
    ];
    for text in good {
        assert!(both_ways(text).is_ok(), "{text:?} must decode");
    }
    let type_first = BAD_JSON
        .iter()
        .filter(|text| super::json::type_first(text.as_bytes()));
    for text in type_first {
        assert!(both_ways(text).is_err(), "{text:?} must not decode");
    }
    assert!(super::json::decode_client(b"{\"type\":\"auth\",\"token\":\"\xff\"}").is_err());
    // The derive's words for what is wrong, both ways.
    let e = decode_client_json(r#"{"type":"send","id":"c","to":{"user":"b"}}"#).unwrap_err();
    assert!(e.message().contains("missing field `body`"), "{e}");
    let e = decode_client_json(r#"{"type":"ack","seq":1,"seq":2}"#).unwrap_err();
    assert!(e.message().contains("duplicate field `seq`"), "{e}");
}

// --- property tests ---

fn id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_.@:-]{1,64}"
}

fn text() -> impl Strategy<Value = String> {
    any::<String>()
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![id().prop_map(Target::User), id().prop_map(Target::Group)]
}

fn client_frame() -> impl Strategy<Value = ClientFrame> {
    prop_oneof![
        (
            text(),
            proptest::option::of(id()),
            proptest::option::of(any::<u64>())
        )
            .prop_map(|(token, device, last_seq)| ClientFrame::Auth {
                token,
                device,
                last_seq
            }),
        (id(), target(), text()).prop_map(|(id, to, body)| ClientFrame::Send { id, to, body }),
        any::<u64>().prop_map(|seq| ClientFrame::Ack { seq }),
        (any::<u64>(), any::<u32>()).prop_map(|(after, limit)| ClientFrame::Sync { after, limit }),
        Just(ClientFrame::Ping),
    ]
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        Just(ErrorCode::BadFrame),
        Just(ErrorCode::Unauthenticated),
        Just(ErrorCode::AuthFailed),
        Just(ErrorCode::TokenExpired),
        Just(ErrorCode::TooLarge),
        Just(ErrorCode::Forbidden),
        Just(ErrorCode::RateLimited),
        Just(ErrorCode::Unavailable),
        Just(ErrorCode::Internal),
    ]
}

fn goaway_reason() -> impl Strategy<Value = GoawayReason> {
    prop_oneof![
        Just(GoawayReason::Draining),
        Just(GoawayReason::Replaced),
        Just(GoawayReason::Kicked),
        Just(GoawayReason::TokenExpired),
    ]
}

fn server_frame() -> impl Strategy<Value = ServerFrame> {
    prop_oneof![
        (id(), id(), text(), text(), any::<u64>(), any::<u64>()).prop_map(
            |(user, device, session, node, head_seq, heartbeat_ms)| ServerFrame::AuthOk {
                user,
                device,
                session,
                node,
                head_seq,
                heartbeat_ms
            }
        ),
        (id(), any::<u64>(), any::<u64>(), any::<bool>()).prop_map(|(id, msg_id, ts, dup)| {
            ServerFrame::SendOk {
                id,
                msg_id,
                ts,
                dup,
            }
        }),
        (
            any::<u64>(),
            any::<u64>(),
            id(),
            id(),
            target(),
            text(),
            any::<u64>()
        )
            .prop_map(
                |(seq, msg_id, from, from_device, to, body, ts)| ServerFrame::Msg {
                    seq,
                    msg_id,
                    from,
                    from_device,
                    to,
                    body,
                    ts
                }
            ),
        (any::<u64>(), any::<u64>(), any::<bool>(), any::<bool>()).prop_map(
            |(after, last, more, truncated)| ServerFrame::SyncDone {
                after,
                last,
                more,
                truncated
            }
        ),
        (error_code(), text(), proptest::option::of(id()))
            .prop_map(|(code, message, id)| ServerFrame::Error { code, message, id }),
        Just(ServerFrame::Pong),
        (goaway_reason(), any::<u64>()).prop_map(|(reason, reconnect_after_ms)| {
            ServerFrame::Goaway {
                reason,
                reconnect_after_ms,
            }
        }),
    ]
}

fn encoding() -> impl Strategy<Value = Encoding> {
    prop_oneof![Just(Encoding::Json), Just(Encoding::Rkyv)]
}

proptest! {
    #[test]
    fn client_frames_round_trip(frame in client_frame(), enc in encoding()) {
        let bytes = frame.encode(enc);
        prop_assert_eq!(ClientFrame::decode(enc, &bytes).unwrap(), frame);
    }

    #[test]
    fn server_frames_round_trip(frame in server_frame(), enc in encoding()) {
        let bytes = frame.encode(enc);
        prop_assert_eq!(ServerFrame::decode(enc, &bytes).unwrap(), frame);
    }

    #[test]
    fn json_client_frames_decode_the_same_both_ways(frame in client_frame(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut bytes = frame.encode(Encoding::Json);
        prop_assert!(super::json::type_first(&bytes));
        prop_assert_eq!(super::json::decode_client(&bytes).unwrap(), frame);
        // One byte changed: where it is still type-first, both ways agree.
        let i = at.index(bytes.len());
        bytes[i] = byte;
        if super::json::type_first(&bytes) {
            let fast = super::json::decode_client(&bytes).ok();
            let derive = serde_json::from_slice::<ClientFrame>(&bytes).ok();
            prop_assert_eq!(fast, derive);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256), enc in encoding()) {
        let _ = ClientFrame::decode(enc, &bytes);
        let _ = ServerFrame::decode(enc, &bytes);
    }

    #[test]
    fn corrupted_archives_never_panic(frame in client_frame(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut bytes = frame.encode(Encoding::Rkyv);
        let i = at.index(bytes.len());
        bytes[i] = byte;
        if let Ok(decoded) = ClientFrame::decode(Encoding::Rkyv, &bytes) {
            // A flip that still validates must decode to a well-formed frame that
            // re-encodes to an archive that validates.
            let again = decoded.encode(Encoding::Rkyv);
            prop_assert!(ClientFrame::decode(Encoding::Rkyv, &again).is_ok());
        }
    }
}
