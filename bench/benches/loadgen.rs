//! Micro-benchmarks of the load generator's own decoding of server frames, which it
//! does once per arrival: millions a second in `fanout`, three per message in `chat`.
//!
//! `cargo bench -p flare-bench --bench loadgen`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use flare_codec::frame::{ServerFrame, Target};
use flare_loadgen::proto::{decode, Encoding};

fn server_frames(c: &mut Criterion) {
    let msg = ServerFrame::Msg {
        seq: 812,
        msg_id: 7281956375040,
        from: "p-000123".into(),
        from_device: "d".into(),
        to: Target::User("p-000122".into()),
        body: "1234.98127398127398.xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx".into(),
        ts: 1795322556625,
    };
    let send_ok = ServerFrame::SendOk {
        id: "1234".into(),
        msg_id: 7281956375040,
        ts: 1795322556625,
        dup: false,
    };
    for (name, frame) in [("msg", &msg), ("send_ok", &send_ok)] {
        let mut group = c.benchmark_group(format!("loadgen_decode_{name}"));
        for (enc, codec_enc, text) in [
            (Encoding::Json, flare_codec::Encoding::Json, true),
            (Encoding::Rkyv, flare_codec::Encoding::Rkyv, false),
        ] {
            let bytes = frame.encode(codec_enc);
            group.bench_function(enc.subprotocol(), |b| {
                b.iter(|| decode(enc, text, black_box(&bytes)).expect("a valid frame"))
            });
        }
        group.finish();
    }
}

criterion_group!(benches, server_frames);
criterion_main!(benches);
