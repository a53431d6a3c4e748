use super::*;

#[test]
fn server_frames_are_unmasked_and_final() {
    let mut out = Vec::new();
    text(b"hi", &mut out);
    assert_eq!(out, [0x81, 0x02, b'h', b'i']);
    out.clear();
    binary(&[0; 126], &mut out);
    assert_eq!(&out[..4], &[0x82, 126, 0, 126]);
    assert_eq!(out.len(), 4 + 126);
    out.clear();
    binary(&vec![0; 65536], &mut out);
    assert_eq!(&out[..10], &[0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
    out.clear();
    ping(b"p", &mut out);
    pong(b"q", &mut out);
    assert_eq!(out, [0x89, 1, b'p', 0x8a, 1, b'q']);
    out.clear();
    close(1000, "bye", &mut out);
    assert_eq!(out, [0x88, 5, 0x03, 0xe8, b'b', b'y', b'e']);
}

#[test]
fn close_reason_is_cut_at_a_char_boundary() {
    let reason = "é".repeat(100); // 200 bytes
    let mut out = Vec::new();
    close(4000, &reason, &mut out);
    assert_eq!(out[1] as usize, out.len() - 2);
    assert!(out.len() - 2 <= MAX_CONTROL_PAYLOAD);
    let (events, error) = feed(&mut WsDecoder::new(Role::Client, LIMIT), &[&out]);
    assert_eq!(error, None);
    assert_eq!(
        events,
        [WsEvent::Close {
            code: Some(4000),
            reason: "é".repeat(61)
        }]
    );
    out.clear();
    close(1000, &"a".repeat(123), &mut out);
    assert_eq!(out.len(), 2 + 125);
}

#[test]
#[should_panic(expected = "control frame payload")]
fn oversize_ping_is_a_bug() {
    ping(&[0; 126], &mut Vec::new());
}

#[test]
fn mask_phase_is_kept_across_pieces() {
    let data: Vec<u8> = (0..100).collect();
    let mut whole = data.clone();
    apply_mask(&mut whole, MASK, 0);
    for split in 0..data.len() {
        let mut pieces = data.clone();
        let (a, b) = pieces.split_at_mut(split);
        apply_mask(a, MASK, 0);
        apply_mask(b, MASK, split);
        assert_eq!(pieces, whole, "split at {split}");
    }
    let mut twice = whole.clone();
    apply_mask(&mut twice, MASK, 0);
    assert_eq!(twice, data);
}
