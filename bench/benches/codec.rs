//! Micro-benchmarks of the wire codec and the shard's timer wheel, on fixed inputs.
//!
//! `cargo bench -p flare-bench --bench codec`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use flare_codec::{
    frame::MsgTemplate,
    ws::{self, Opcode, Role, WsDecoder, WsEvent},
    ClientFrame, Encoding, ServerFrame, Target, DEFAULT_MAX_FRAME_BYTES,
};
use flare_shard::timer::TimerWheel;

const MASK: [u8; 4] = [0x12, 0x34, 0x56, 0x78];

/// A JSON-looking text payload of exactly `len` bytes.
fn text_payload(len: usize) -> Vec<u8> {
    let mut payload = br#"{"type":"send","id":"c-1","to":{"user":"bob"},"body":""#.to_vec();
    payload.resize(len - 2, b'x');
    payload.extend_from_slice(br#""}"#);
    payload
}

fn websocket(c: &mut Criterion) {
    for (name, len) in [("100B", 100), ("4KiB", 4096)] {
        let payload = text_payload(len);
        let mut wire = Vec::new();
        ws::encode_client_frame(Opcode::Text, &payload, MASK, true, &mut wire);

        let mut group = c.benchmark_group("ws_parse");
        group.throughput(Throughput::Bytes(wire.len() as u64));
        group.bench_function(format!("masked_text_{name}"), |b| {
            let mut decoder = WsDecoder::new(Role::Server, DEFAULT_MAX_FRAME_BYTES);
            b.iter(|| {
                let mut input = black_box(&wire[..]);
                match decoder.decode(&mut input) {
                    Ok(Some(WsEvent::Text(text))) => text,
                    other => panic!("a whole text frame decodes to text, got {other:?}"),
                }
            })
        });
        group.finish();

        let mut group = c.benchmark_group("ws_build");
        group.throughput(Throughput::Bytes(payload.len() as u64));
        group.bench_function(format!("text_{name}"), |b| {
            let mut out = Vec::with_capacity(len + 16);
            b.iter(|| {
                out.clear();
                ws::text(black_box(&payload), &mut out);
                black_box(out.len())
            })
        });
        group.finish();
    }
}

fn frames(c: &mut Criterion) {
    let send = ClientFrame::Send {
        id: "c-1842".into(),
        to: Target::User("bob".into()),
        body: "hi bob, are we still on for lunch tomorrow at noon?".into(),
    };
    let msg = ServerFrame::Msg {
        seq: 42,
        msg_id: 7281956375040,
        from: "alice".into(),
        from_device: "phone".into(),
        to: Target::User("bob".into()),
        body: "hi bob, are we still on for lunch tomorrow at noon?".into(),
        ts: 1795322556625,
    };

    let mut group = c.benchmark_group("decode_send");
    for enc in [Encoding::Json, Encoding::Rkyv] {
        let bytes = send.encode(enc);
        group.bench_function(enc.subprotocol(), |b| {
            b.iter(|| ClientFrame::decode(enc, black_box(&bytes)).expect("a valid frame"))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("encode_send");
    for enc in [Encoding::Json, Encoding::Rkyv] {
        group.bench_function(enc.subprotocol(), |b| {
            let mut out = Vec::with_capacity(512);
            b.iter(|| {
                out.clear();
                black_box(&send).encode_into(enc, &mut out);
                black_box(out.len())
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("decode_msg");
    for enc in [Encoding::Json, Encoding::Rkyv] {
        let bytes = msg.encode(enc);
        group.bench_function(enc.subprotocol(), |b| {
            b.iter(|| ServerFrame::decode(enc, black_box(&bytes)).expect("a valid frame"))
        });
    }
    group.finish();

    // A live delivery: the whole WebSocket message of a `msg` frame, encoded for this
    // recipient, or written from the message's template with this recipient's `seq`.
    let mut group = c.benchmark_group("live_msg_ws_message");
    for enc in [Encoding::Json, Encoding::Rkyv] {
        group.bench_function(format!("{}/encode_whole", enc.subprotocol()), |b| {
            let mut payload = Vec::with_capacity(512);
            b.iter(|| {
                payload.clear();
                black_box(&msg).encode_into(enc, &mut payload);
                let mut out = Vec::with_capacity(payload.len() + 10);
                match enc {
                    Encoding::Json => ws::text(&payload, &mut out),
                    Encoding::Rkyv => ws::binary(&payload, &mut out),
                }
                out
            })
        });
        let template = MsgTemplate::new(&msg, enc);
        group.bench_function(format!("{}/template", enc.subprotocol()), |b| {
            b.iter(|| template.ws_message(black_box(42)))
        });
    }
    group.finish();

    // Making a message's template: once per message, shard and encoding.
    let mut group = c.benchmark_group("msg_template_new");
    for enc in [Encoding::Json, Encoding::Rkyv] {
        group.bench_function(enc.subprotocol(), |b| {
            b.iter(|| MsgTemplate::new(black_box(&msg), enc))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("encode_msg");
    for enc in [Encoding::Json, Encoding::Rkyv] {
        group.bench_function(enc.subprotocol(), |b| {
            let mut out = Vec::with_capacity(512);
            b.iter(|| {
                out.clear();
                black_box(&msg).encode_into(enc, &mut out);
                black_box(out.len())
            })
        });
    }
    group.finish();
}

fn timer_wheel(c: &mut Criterion) {
    const ITEMS: u64 = 10_000;
    // Deadlines spread over 90 s (three heartbeats of 30 s), a 100 ms tick, 1024 slots
    // (a 102.4 s turn), advanced every 100 ms like a shard's tick.
    let deadlines: Vec<u64> = (0..ITEMS).map(|i| (i * 7919) % 90_000).collect();
    let mut group = c.benchmark_group("timer_wheel");
    group.throughput(Throughput::Elements(ITEMS));
    group.bench_function("insert_advance_10k", |b| {
        b.iter_batched(
            || {
                (
                    TimerWheel::new(100, 1024, 0),
                    Vec::with_capacity(ITEMS as usize),
                )
            },
            |(mut wheel, mut out)| {
                for (id, &deadline) in deadlines.iter().enumerate() {
                    wheel.insert(deadline, id as u32);
                }
                let mut fired = 0;
                for now in (0..=90_000).step_by(100) {
                    wheel.advance(now, &mut out);
                    fired += out.len();
                    out.clear();
                }
                assert_eq!(fired, ITEMS as usize);
                wheel
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, websocket, frames, timer_wheel);
criterion_main!(benches);
