use super::*;

#[test]
fn rfc_6455_masked_hello() {
    // RFC 6455 §5.7: a single-frame masked text message "Hello".
    let wire = [
        0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
    ];
    assert_eq!(client_frame(Opcode::Text, b"Hello", true), wire);
    assert_eq!(
        decode_one(&wire),
        (vec![WsEvent::Text(b"Hello".to_vec())], None)
    );
}

#[test]
fn rfc_6455_fragmented_unmasked_hello_for_a_client() {
    // RFC 6455 §5.7: "Hel" then "lo", unmasked (server to client), and an unmasked ping.
    let wire = [
        0x01, 0x03, 0x48, 0x65, 0x6c, 0x80, 0x02, 0x6c, 0x6f, 0x89, 0x05, b'H', b'e', b'l', b'l',
        b'o',
    ];
    let (events, error) = feed(&mut WsDecoder::new(Role::Client, LIMIT), &[&wire]);
    assert_eq!(error, None);
    assert_eq!(
        events,
        [
            WsEvent::Text(b"Hello".to_vec()),
            WsEvent::Ping(b"Hello".to_vec())
        ]
    );
}

#[test]
fn data_and_control_frames() {
    let mut wire = client_frame(Opcode::Binary, &[0, 1, 2, 255], true);
    wire.extend(client_frame(Opcode::Text, b"", true));
    wire.extend(client_frame(Opcode::Ping, b"p", true));
    wire.extend(client_frame(Opcode::Pong, &[7; 125], true));
    wire.extend(client_frame(Opcode::Binary, b"", true));
    let (events, error) = decode_one(&wire);
    assert_eq!(error, None);
    assert_eq!(
        events,
        [
            WsEvent::Binary(vec![0, 1, 2, 255]),
            WsEvent::Text(Vec::new()),
            WsEvent::Ping(b"p".to_vec()),
            WsEvent::Pong(vec![7; 125]),
            WsEvent::Binary(Vec::new()),
        ]
    );
}

#[test]
fn extended_lengths() {
    let mut decoder = WsDecoder::new(Role::Server, 1 << 17);
    for len in [125, 126, 127, 65535, 65536, 70000] {
        let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let wire = client_frame(Opcode::Binary, &payload, true);
        let header = wire.len() - len;
        assert_eq!(
            header,
            if len <= 125 {
                6
            } else if len <= 65535 {
                8
            } else {
                14
            }
        );
        assert_eq!(
            feed(&mut decoder, &[&wire]),
            (vec![WsEvent::Binary(payload)], None),
            "{len}"
        );
    }
}

#[test]
fn non_minimal_lengths_are_allowed() {
    let masked = |p: &[u8]| {
        let mut p = p.to_vec();
        apply_mask(&mut p, MASK, 0);
        p
    };
    let mut wire = vec![0x82, 0x80 | 126, 0, 3];
    wire.extend(MASK);
    wire.extend(masked(b"abc"));
    wire.extend([0x82, 0x80 | 127, 0, 0, 0, 0, 0, 0, 0, 2]);
    wire.extend(MASK);
    wire.extend(masked(b"de"));
    assert_eq!(
        decode_one(&wire),
        (
            vec![
                WsEvent::Binary(b"abc".to_vec()),
                WsEvent::Binary(b"de".to_vec())
            ],
            None
        )
    );
}

#[test]
fn unmasked_client_frame_is_1002_from_the_first_two_bytes() {
    let mut decoder = server();
    let mut input: &[u8] = &[0x81, 0x05];
    let error = decoder.decode(&mut input).unwrap_err();
    assert_eq!(error, WsError::Unmasked);
    assert_eq!(error.close_code(), 1002);
}

#[test]
fn masked_server_frame_is_1002_for_a_client() {
    let (_, error) = feed(
        &mut WsDecoder::new(Role::Client, LIMIT),
        &[&client_frame(Opcode::Text, b"x", true)],
    );
    assert_eq!(error, Some(WsError::Masked));
    assert_eq!(WsError::Masked.close_code(), 1002);
}

#[test]
fn reserved_bits_are_1002() {
    for rsv in [0x40, 0x20, 0x10, 0x70] {
        let mut wire = client_frame(Opcode::Text, b"x", true);
        wire[0] |= rsv;
        assert_eq!(error_of(&wire), WsError::ReservedBits);
    }
    assert_eq!(WsError::ReservedBits.close_code(), 1002);
}

#[test]
fn unknown_opcodes_are_1002() {
    for op in [3u8, 4, 5, 6, 7, 0xb, 0xc, 0xd, 0xe, 0xf] {
        let wire = [0x80 | op, 0x80, 1, 2, 3, 4];
        let error = error_of(&wire);
        assert_eq!(error, WsError::UnknownOpcode(op));
        assert_eq!(error.close_code(), 1002);
    }
}

#[test]
fn control_frames_must_be_whole_and_short() {
    for opcode in [Opcode::Ping, Opcode::Pong, Opcode::Close] {
        let fragmented = client_frame(opcode, b"", false);
        assert_eq!(error_of(&fragmented), WsError::FragmentedControl);
        let long = client_frame(opcode, &[b'a'; 126], true);
        assert_eq!(error_of(&long), WsError::ControlTooLong);
    }
    // A control frame with a 16-bit length field is over 125 whatever it says.
    assert_eq!(
        error_of(&[0x89, 0x80 | 126, 0, 1, 1, 2, 3, 4, 0]),
        WsError::ControlTooLong
    );
    assert_eq!(WsError::FragmentedControl.close_code(), 1002);
    assert_eq!(WsError::ControlTooLong.close_code(), 1002);
}

#[test]
fn fragments_reassemble_with_control_frames_between() {
    let mut wire = client_frame(Opcode::Text, b"he", false);
    wire.extend(client_frame(Opcode::Ping, b"1", true));
    wire.extend(client_frame(Opcode::Continuation, b"", false));
    wire.extend(client_frame(Opcode::Pong, b"2", true));
    wire.extend(client_frame(Opcode::Continuation, b"llo", true));
    wire.extend(client_frame(Opcode::Binary, b"b1", false));
    wire.extend(client_frame(Opcode::Continuation, b"b2", true));
    let (events, error) = decode_one(&wire);
    assert_eq!(error, None);
    assert_eq!(
        events,
        [
            WsEvent::Ping(b"1".to_vec()),
            WsEvent::Pong(b"2".to_vec()),
            WsEvent::Text(b"hello".to_vec()),
            WsEvent::Binary(b"b1b2".to_vec()),
        ]
    );
}

#[test]
fn continuation_without_a_message_is_1002() {
    assert_eq!(
        error_of(&client_frame(Opcode::Continuation, b"x", true)),
        WsError::UnexpectedContinuation
    );
    let mut wire = client_frame(Opcode::Text, b"done", true);
    wire.extend(client_frame(Opcode::Continuation, b"x", false));
    assert_eq!(
        decode_one(&wire),
        (
            vec![WsEvent::Text(b"done".to_vec())],
            Some(WsError::UnexpectedContinuation)
        )
    );
    assert_eq!(WsError::UnexpectedContinuation.close_code(), 1002);
}

#[test]
fn new_data_frame_inside_a_fragmented_message_is_1002() {
    for opcode in [Opcode::Text, Opcode::Binary] {
        let mut wire = client_frame(Opcode::Binary, b"a", false);
        wire.extend(client_frame(opcode, b"b", true));
        assert_eq!(error_of(&wire), WsError::InterruptedMessage);
    }
    assert_eq!(WsError::InterruptedMessage.close_code(), 1002);
}

#[test]
fn length_with_the_high_bit_is_1002() {
    let mut wire = vec![0x82, 0x80 | 127, 0x80, 0, 0, 0, 0, 0, 0, 1];
    wire.extend(MASK);
    let mut big = WsDecoder::new(Role::Server, usize::MAX);
    assert_eq!(feed(&mut big, &[&wire]), (vec![], Some(WsError::LengthMsb)));
    assert_eq!(WsError::LengthMsb.close_code(), 1002);
}

#[test]
fn oversize_message_is_1009_from_the_header_alone() {
    // Only the header of a frame one byte over the limit: refused, nothing buffered.
    let wire = client_frame(Opcode::Binary, &vec![0; LIMIT + 1], true);
    let mut decoder = server();
    let (events, error) = feed(&mut decoder, &[&wire[..8]]);
    assert_eq!((events, error), (vec![], Some(WsError::TooLarge)));
    assert_eq!(decoder.buffered_capacity(), 0);
    assert_eq!(WsError::TooLarge.close_code(), 1009);
    // Exactly at the limit is fine.
    let at_limit = client_frame(Opcode::Binary, &vec![1; LIMIT], true);
    assert_eq!(
        decode_one(&at_limit),
        (vec![WsEvent::Binary(vec![1; LIMIT])], None)
    );
    // A huge announced length allocates nothing.
    let mut huge = vec![
        0x82,
        0x80 | 127,
        0x7f,
        0xff,
        0xff,
        0xff,
        0xff,
        0xff,
        0xff,
        0xff,
    ];
    huge.extend(MASK);
    assert_eq!(error_of(&huge), WsError::TooLarge);
}

#[test]
fn oversize_fragmented_message_is_1009_at_the_fragment_header() {
    let half = LIMIT / 2;
    let mut wire = client_frame(Opcode::Text, &vec![b'a'; half], false);
    wire.extend(client_frame(
        Opcode::Ping,
        b"control frames do not count",
        true,
    ));
    wire.extend(client_frame(Opcode::Continuation, &vec![b'b'; half], false));
    let ok_len = wire.len();
    wire.extend(client_frame(Opcode::Continuation, b"!", true));
    let mut decoder = server();
    // The last frame's header (6 bytes with the mask), none of its payload.
    let (events, error) = feed(&mut decoder, &[&wire[..ok_len + 6]]);
    assert_eq!(
        events,
        [WsEvent::Ping(b"control frames do not count".to_vec())]
    );
    assert_eq!(error, Some(WsError::TooLarge));
    // A fragmented message of exactly the limit, ended by an empty fragment, passes.
    let mut exact = client_frame(Opcode::Text, &vec![b'a'; half], false);
    exact.extend(client_frame(Opcode::Continuation, &vec![b'b'; half], false));
    exact.extend(client_frame(Opcode::Continuation, b"", true));
    let (events, error) = decode_one(&exact);
    assert_eq!(error, None);
    assert_eq!(events.len(), 1);
}

#[test]
fn buffering_never_exceeds_the_limit() {
    let wire = client_frame(Opcode::Binary, &vec![3; LIMIT], true);
    let mut decoder = server();
    let mut peak = 0;
    for byte in wire.chunks(1) {
        let (events, error) = feed(&mut decoder, &[byte]);
        assert_eq!(error, None);
        peak = peak.max(decoder.buffered_capacity());
        assert!(decoder.buffered_capacity() <= LIMIT);
        if !events.is_empty() {
            assert_eq!(events, [WsEvent::Binary(vec![3; LIMIT])]);
        }
    }
    assert_eq!(peak, LIMIT);
    // Chunked arrival grows the buffer with what arrived, not with what was announced.
    let mut decoder = server();
    feed(&mut decoder, &[&wire[..8 + 10]]);
    assert!(
        decoder.buffered_capacity() < 64,
        "{}",
        decoder.buffered_capacity()
    );
}

#[test]
fn invalid_utf8_text_is_1007_after_reassembly() {
    assert_eq!(
        error_of(&client_frame(Opcode::Text, b"ok \xff", true)),
        WsError::InvalidUtf8
    );
    assert_eq!(WsError::InvalidUtf8.close_code(), 1007);
    // A character split across fragments is fine once reassembled.
    let e_acute = "é".as_bytes();
    let mut wire = client_frame(Opcode::Text, &e_acute[..1], false);
    wire.extend(client_frame(Opcode::Continuation, &e_acute[1..], true));
    assert_eq!(
        decode_one(&wire),
        (vec![WsEvent::Text(e_acute.to_vec())], None)
    );
    // A truncated character at the end is not.
    let mut wire = client_frame(Opcode::Text, b"a", false);
    wire.extend(client_frame(Opcode::Continuation, &e_acute[..1], true));
    assert_eq!(error_of(&wire), WsError::InvalidUtf8);
    // Binary messages are not checked.
    assert_eq!(
        decode_one(&client_frame(Opcode::Binary, b"\xff", true)),
        (vec![WsEvent::Binary(vec![0xff])], None)
    );
}

#[test]
fn close_frames() {
    assert_eq!(
        decode_one(&client_frame(Opcode::Close, b"", true)),
        (
            vec![WsEvent::Close {
                code: None,
                reason: String::new()
            }],
            None
        )
    );
    assert_eq!(
        decode_one(&client_frame(
            Opcode::Close,
            &close_payload(1000, b"bye"),
            true
        )),
        (
            vec![WsEvent::Close {
                code: Some(1000),
                reason: "bye".into()
            }],
            None
        )
    );
    for code in [
        1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999,
    ] {
        let (events, error) = decode_one(&client_frame(
            Opcode::Close,
            &close_payload(code, b""),
            true,
        ));
        assert_eq!(error, None, "{code}");
        assert_eq!(
            events,
            [WsEvent::Close {
                code: Some(code),
                reason: String::new()
            }]
        );
    }
}

#[test]
fn close_with_one_byte_is_1002() {
    assert_eq!(
        error_of(&client_frame(Opcode::Close, &[3], true)),
        WsError::CloseTooShort
    );
    assert_eq!(WsError::CloseTooShort.close_code(), 1002);
}

#[test]
fn close_with_an_invalid_code_is_1002() {
    for code in [
        0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535,
    ] {
        let error = error_of(&client_frame(
            Opcode::Close,
            &close_payload(code, b"x"),
            true,
        ));
        assert_eq!(error, WsError::InvalidCloseCode(code));
        assert_eq!(error.close_code(), 1002);
    }
}

#[test]
fn close_with_a_bad_reason_is_1007() {
    let error = error_of(&client_frame(
        Opcode::Close,
        &close_payload(1000, b"\xc3("),
        true,
    ));
    assert_eq!(error, WsError::CloseReasonUtf8);
    assert_eq!(error.close_code(), 1007);
}

#[test]
fn errors_are_sticky_and_release_buffers() {
    let mut decoder = server();
    let mut wire = client_frame(Opcode::Binary, &[1; 100], false);
    wire.extend([0x81, 0x05]); // unmasked
    let (_, error) = feed(&mut decoder, &[&wire]);
    assert_eq!(error, Some(WsError::Unmasked));
    assert_eq!(decoder.buffered_capacity(), 0);
    let good = client_frame(Opcode::Continuation, b"", true);
    assert_eq!(decoder.decode(&mut &good[..]), Err(WsError::Unmasked));
}

#[test]
fn an_idle_decoder_is_small_and_holds_no_heap() {
    assert!(
        std::mem::size_of::<WsDecoder>() <= 112,
        "{}",
        std::mem::size_of::<WsDecoder>()
    );
    let mut decoder = server();
    assert!(decoder.is_idle());
    let mut wire = client_frame(Opcode::Text, &[b'a'; 300], false);
    wire.extend(client_frame(Opcode::Ping, b"p", true));
    wire.extend(client_frame(Opcode::Continuation, &[b'b'; 300], true));
    let (events, _) = feed(&mut decoder, &[&wire[..200]]);
    assert!(events.is_empty());
    assert!(!decoder.is_idle());
    assert!(decoder.buffered_capacity() > 0);
    let (events, error) = feed(&mut decoder, &[&wire[200..]]);
    assert_eq!(error, None);
    assert_eq!(events.len(), 2);
    assert!(decoder.is_idle());
    assert_eq!(decoder.buffered_capacity(), 0);
    // A partial header alone is not idle, but holds no heap either.
    feed(&mut decoder, &[&wire[..1]]);
    assert!(!decoder.is_idle());
    assert_eq!(decoder.buffered_capacity(), 0);
}

#[test]
fn byte_at_a_time_equals_all_at_once() {
    let mut wire = client_frame(Opcode::Text, "héllo".as_bytes(), false);
    wire.extend(client_frame(Opcode::Ping, b"", true));
    wire.extend(client_frame(Opcode::Continuation, &[b'x'; 200], true));
    wire.extend(client_frame(Opcode::Binary, &[9; 70], true));
    wire.extend(client_frame(Opcode::Close, &close_payload(1000, b""), true));
    let whole = decode_one(&wire);
    let chunks: Vec<&[u8]> = wire.chunks(1).collect();
    assert_eq!(feed(&mut server(), &chunks), whole);
    assert_eq!(whole.0.len(), 4);
}
