use proptest::prelude::*;

use super::*;

#[derive(Debug, Clone)]
enum Sent {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
}

fn sent() -> impl Strategy<Value = Sent> {
    prop_oneof![
        any::<String>().prop_map(Sent::Text),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(Sent::Binary),
        proptest::collection::vec(any::<u8>(), 0..=125).prop_map(Sent::Ping),
    ]
}

/// One message of a session, as a client sends it.
#[derive(Debug, Clone)]
struct Planned {
    message: Sent,
    /// Where the payload is cut into fragments.
    cuts: Vec<prop::sample::Index>,
    /// Pings sent after the first fragments (as many as there are cuts, at most).
    pings: Vec<Vec<u8>>,
    mask: [u8; 4],
}

fn session() -> impl Strategy<Value = Vec<Planned>> {
    let planned = (
        sent(),
        proptest::collection::vec(any::<prop::sample::Index>(), 0..4),
        proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..8), 0..3),
        any::<[u8; 4]>(),
    )
        .prop_map(|(message, cuts, pings, mask)| Planned {
            message,
            cuts,
            pings,
            mask,
        });
    proptest::collection::vec(planned, 0..8)
}

/// Encodes a session as a client would (fragments, interleaved pings, random masks) and
/// returns the wire bytes and the events a server must see.
fn encode_session(session: &[Planned]) -> (Vec<u8>, Vec<WsEvent>) {
    let mut wire = Vec::new();
    let mut expected = Vec::new();
    for Planned {
        message,
        cuts,
        pings,
        mask,
    } in session
    {
        let (opcode, payload, event) = match message {
            Sent::Ping(p) => {
                encode_client_frame(Opcode::Ping, p, *mask, true, &mut wire);
                expected.push(WsEvent::Ping(p.clone()));
                continue;
            }
            Sent::Text(s) => (
                Opcode::Text,
                s.as_bytes(),
                WsEvent::Text(s.clone().into_bytes()),
            ),
            Sent::Binary(b) => (Opcode::Binary, &b[..], WsEvent::Binary(b.clone())),
        };
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(payload.len() + 1)).collect();
        cuts.sort_unstable();
        let mut from = 0;
        for (i, &cut) in cuts.iter().enumerate() {
            let op = if i == 0 { opcode } else { Opcode::Continuation };
            encode_client_frame(op, &payload[from..cut], *mask, false, &mut wire);
            from = cut;
            if let Some(ping) = pings.get(i) {
                encode_client_frame(
                    Opcode::Ping,
                    ping,
                    [mask[1], mask[2], mask[3], mask[0]],
                    true,
                    &mut wire,
                );
                expected.push(WsEvent::Ping(ping.clone()));
            }
        }
        let op = if cuts.is_empty() {
            opcode
        } else {
            Opcode::Continuation
        };
        encode_client_frame(op, &payload[from..], *mask, true, &mut wire);
        expected.push(event);
    }
    (wire, expected)
}

fn split_at(wire: &[u8], cuts: &[prop::sample::Index]) -> Vec<Vec<u8>> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
    cuts.push(wire.len());
    cuts.sort_unstable();
    let mut from = 0;
    cuts.into_iter()
        .map(|cut| {
            let chunk = wire[from..cut].to_vec();
            from = cut;
            chunk
        })
        .collect()
}

proptest! {
    #[test]
    fn fragmented_sessions_survive_any_split(session in session(),
                                             cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..16)) {
        let (wire, expected) = encode_session(&session);
        let chunks = split_at(&wire, &cuts);
        let chunks: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        let mut decoder = server();
        prop_assert_eq!(feed(&mut decoder, &chunks), (expected, None));
        prop_assert!(decoder.is_idle());
        prop_assert_eq!(decoder.buffered_capacity(), 0);
    }

    #[test]
    fn server_frames_decode_as_a_client(messages in proptest::collection::vec(sent(), 0..8),
                                        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8)) {
        let mut wire = Vec::new();
        let mut expected = Vec::new();
        for message in &messages {
            match message {
                Sent::Text(s) => { text(s.as_bytes(), &mut wire); expected.push(WsEvent::Text(s.clone().into_bytes())); }
                Sent::Binary(b) => { binary(b, &mut wire); expected.push(WsEvent::Binary(b.clone())); }
                Sent::Ping(p) => { pong(p, &mut wire); expected.push(WsEvent::Pong(p.clone())); }
            }
        }
        let chunks = split_at(&wire, &cuts);
        let chunks: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        prop_assert_eq!(feed(&mut WsDecoder::new(Role::Client, LIMIT), &chunks), (expected, None));
    }

    #[test]
    fn arbitrary_bytes_decode_the_same_at_any_split(wire in proptest::collection::vec(any::<u8>(), 0..200),
                                                    cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..16),
                                                    role in prop_oneof![Just(Role::Server), Just(Role::Client)]) {
        let whole = feed(&mut WsDecoder::new(role, 64), &[&wire]);
        let chunks = split_at(&wire, &cuts);
        let chunks: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        prop_assert_eq!(feed(&mut WsDecoder::new(role, 64), &chunks), whole);
    }
}
